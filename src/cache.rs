//! The local cache: URL to local path (pure) and the atomic write.
//!
//! The path mirrors the URL: cache root + the URL path after the host, split at
//! `/`, each segment taken literally (no percent-decoding), query and fragment
//! dropped. The last segment keeps any `!style` suffix, because the display
//! program looks the file up by that name.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Temporary files start with this, so a sweep at start-up can find and remove them.
pub const TEMP_PREFIX: &str = ".holosync-tmp-";

/// Longest name for one path component, in the units the file system
/// counts: NTFS allows 255 UTF-16 code units (92 CJK characters are 92 of
/// them, though 276 UTF-8 bytes), Unix file systems 255 bytes (NAME_MAX).
const MAX_SEGMENT_UNITS: usize = 255;

/// The length of a name in the units the platform's file system counts.
fn name_units(s: &str) -> usize {
    if cfg!(windows) {
        s.encode_utf16().count()
    } else {
        s.len()
    }
}

/// The path segments of `url` after the host, each checked to be a safe
/// Windows and Unix file name. Errors say which segment is wrong and why.
pub fn url_segments(url: &str) -> Result<Vec<&str>, String> {
    let rest = url
        .split_once("://")
        .map(|(_, r)| r)
        .ok_or_else(|| "not an absolute URL".to_string())?;
    let path_start = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let path = &rest[path_start..];
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    let path = path.strip_prefix('/').unwrap_or(path);
    if path.is_empty() {
        return Err("URL has no file name".into());
    }
    let segments: Vec<&str> = path.split('/').collect();
    for s in &segments {
        check_segment(s).map_err(|why| format!("path segment {s:?} {why}"))?;
    }
    Ok(segments)
}

/// Checks one path segment as a file or folder name on Windows and Unix.
pub fn check_segment(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("is empty (double or trailing slash)");
    }
    if s == "." || s == ".." {
        return Err("would leave its folder");
    }
    if name_units(s) > MAX_SEGMENT_UNITS {
        return Err(if cfg!(windows) {
            "is longer than 255 UTF-16 units (NTFS's limit)"
        } else {
            "is longer than 255 bytes (NAME_MAX)"
        });
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_control() || matches!(c, '\\' | ':' | '<' | '>' | '"' | '|' | '?' | '*'))
    {
        return Err(match c {
            '\\' => "contains a backslash",
            ':' => "contains a colon (a drive or stream name on Windows)",
            c if c.is_control() => "contains a control character",
            _ => "contains a character Windows forbids in file names",
        });
    }
    if s.ends_with('.') || s.ends_with(' ') {
        return Err("ends with a dot or space, which Windows strips");
    }
    if is_reserved_name(s) {
        return Err("is a reserved device name on Windows");
    }
    if s.starts_with(TEMP_PREFIX) {
        return Err("uses holosync's temporary file prefix");
    }
    if is_short_name_alias(s) {
        return Err(
            "looks like a Windows 8.3 short name (PHOTOG~1.JPG), which can be another file's alias",
        );
    }
    Ok(())
}

/// `NAME~N.EXT` as Windows makes it for long names: a stem of at most 8
/// characters ending in `~` and digits, an extension of at most 3. On volumes
/// with short names, writing such a name can overwrite another URL's file.
fn is_short_name_alias(s: &str) -> bool {
    let (stem, ext) = s.rsplit_once('.').unwrap_or((s, ""));
    let Some((head, digits)) = stem.rsplit_once('~') else {
        return false;
    };
    !head.is_empty()
        && !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && stem.len() <= 8
        && ext.len() <= 3
        && !ext.contains('~')
}

/// CON, PRN, AUX, NUL, COM0-9, LPT0-9 (and the superscript digits), with or
/// without an extension, in any case, ignoring trailing blanks before the dot.
fn is_reserved_name(s: &str) -> bool {
    let stem = s.split('.').next().unwrap_or(s).trim_end_matches(' ');
    let upper = stem.to_uppercase();
    if matches!(
        upper.as_str(),
        "CON" | "PRN" | "AUX" | "NUL" | "CONIN$" | "CONOUT$"
    ) {
        return true;
    }
    let mut chars = upper.chars();
    let prefix: String = chars.by_ref().take(3).collect();
    let rest: Vec<char> = chars.collect();
    (prefix == "COM" || prefix == "LPT")
        && rest.len() == 1
        && (rest[0].is_ascii_digit() || matches!(rest[0], '¹' | '²' | '³'))
}

/// The local file for `url` under `root`, or why there cannot be one.
pub fn local_path(root: &Path, url: &str) -> Result<PathBuf, String> {
    let mut path = root.to_path_buf();
    for s in url_segments(url)? {
        path.push(s);
    }
    // Defence in depth: the segment checks already make this impossible.
    if !path.starts_with(root) || path == root {
        return Err("resolved path is not inside the cache root".into());
    }
    Ok(path)
}

/// Why `path` (under `root`) cannot hold a file because of what is already
/// on disk: a file where a folder is needed, or a folder where the file goes.
/// Such a clash is another URL's doing and never resolves by retrying.
pub fn clash(root: &Path, path: &Path) -> Option<String> {
    let mut dir = path.parent();
    let mut ancestors = Vec::new();
    while let Some(d) = dir {
        if d == root || !d.starts_with(root) {
            break;
        }
        ancestors.push(d);
        dir = d.parent();
    }
    for d in ancestors.into_iter().rev() {
        match fs::symlink_metadata(d) {
            Ok(m) if !m.is_dir() => {
                return Some(format!(
                    "path clash: {} is a file (another URL's), but this URL needs a folder there",
                    d.display()
                ))
            }
            Ok(_) => {}
            Err(_) => return None,
        }
    }
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => Some(format!(
            "path clash: {} is a folder (holding other URLs' files), so this URL's file cannot go there",
            path.display()
        )),
        _ => None,
    }
}

/// Name of the temporary file used while writing `final_path`.
fn temp_path(final_path: &Path) -> PathBuf {
    // FNV-1a of the final name: short (long names stay under 255 chars), and
    // stable, so a retry of the same URL reuses the name of a crashed attempt.
    let name = final_path
        .file_name()
        .unwrap_or_default()
        .as_encoded_bytes();
    let hash = name.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    final_path.with_file_name(format!("{TEMP_PREFIX}{hash:016x}"))
}

/// Bytes written between two `sync_data` calls by default (a file of unknown
/// size), so the final fsync of a big file stays short (the loop must not
/// block long on one disk call), and an interrupted download keeps most of
/// what it got even through a power cut.
const SYNC_EVERY_BYTES: u64 = 1 << 20;

/// Longest time written bytes stay unsynced (slow links: keep what came).
const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A file being written next to its final name, invisible to the display
/// program until [`TempFile::commit`] renames it into place. It can be kept
/// across attempts (and restarts) to resume an interrupted download.
#[derive(Debug)]
pub struct TempFile {
    /// The final name.
    path: PathBuf,
    /// The temporary name in the same folder.
    tmp: PathBuf,
    /// The open temporary file.
    file: File,
    /// Bytes written.
    len: u64,
    /// Bytes known to be on disk (synced).
    synced: u64,
    /// When the file was last synced.
    synced_at: std::time::Instant,
    /// Bytes between two syncs while writing; None: only the final one.
    sync_every: Option<u64>,
}

impl TempFile {
    /// Creates (or truncates) the temporary file for `path`, making its folder.
    pub fn create(path: &Path) -> io::Result<TempFile> {
        let dir = path.parent().expect("a cache path always has a parent");
        fs::create_dir_all(dir)?;
        let tmp = temp_path(path);
        let file = File::create(&tmp)?;
        Ok(TempFile {
            path: path.to_path_buf(),
            tmp,
            file,
            len: 0,
            synced: 0,
            synced_at: std::time::Instant::now(),
            sync_every: Some(SYNC_EVERY_BYTES),
        })
    }

    /// Opens the temporary file an interrupted download of `path` left, cut
    /// to its first `keep` bytes (those it synced); None if it is missing or
    /// shorter.
    pub fn reopen(path: &Path, keep: u64) -> io::Result<Option<TempFile>> {
        let tmp = temp_path(path);
        let file = match fs::OpenOptions::new().read(true).write(true).open(&tmp) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if file.metadata()?.len() < keep {
            drop(file);
            let _ = fs::remove_file(&tmp);
            return Ok(None);
        }
        file.set_len(keep)?;
        let mut t = TempFile {
            path: path.to_path_buf(),
            tmp,
            file,
            len: keep,
            synced: keep,
            synced_at: std::time::Instant::now(),
            sync_every: Some(SYNC_EVERY_BYTES),
        };
        use std::io::Seek;
        t.file.seek(io::SeekFrom::Start(keep))?;
        Ok(Some(t))
    }

    /// Reads up to `max` bytes of the file from `offset` (to load a kept
    /// prefix in slices).
    pub fn read_at(&mut self, offset: u64, max: usize) -> io::Result<Vec<u8>> {
        use std::io::{Read, Seek};
        self.file.seek(io::SeekFrom::Start(offset))?;
        let mut buf = Vec::with_capacity(max);
        (&mut self.file).take(max as u64).read_to_end(&mut buf)?;
        self.file.seek(io::SeekFrom::Start(self.len))?;
        Ok(buf)
    }

    /// How often [`TempFile::write`] syncs: every `bytes` (and at least every
    /// second while bytes come), or with None only at the end (a small file:
    /// one fsync is all it needs, and it is cheap to fetch again).
    pub fn sync_every(&mut self, bytes: Option<u64>) {
        self.sync_every = bytes;
    }

    /// Appends `bytes`, syncing as [`TempFile::sync_every`] says.
    pub fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        if let Some(every) = self.sync_every {
            if self.len - self.synced >= every
                || (self.len > self.synced && self.synced_at.elapsed() >= SYNC_EVERY)
            {
                self.sync()?;
            }
        }
        Ok(())
    }

    /// Makes everything written so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()?;
        self.synced = self.len;
        self.synced_at = std::time::Instant::now();
        Ok(())
    }

    /// Bytes known to be on disk.
    pub fn synced(&self) -> u64 {
        self.synced
    }

    /// Bytes written.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Replaces everything written so far with `bytes` (re-encoded JPEGs, or
    /// a download that starts over).
    pub fn rewrite(&mut self, bytes: &[u8]) -> io::Result<()> {
        use std::io::Seek;
        self.file.set_len(0)?;
        self.file.seek(io::SeekFrom::Start(0))?;
        self.len = 0;
        self.synced = 0;
        self.write(bytes)
    }

    /// Fsyncs and renames over the final name; on error the temporary file
    /// is removed and the old file (if any) stays.
    ///
    /// The file's data is synced before the rename, so a power cut can never
    /// leave a partial file at the final name. A rename to a new name is not
    /// made durable: if a power cut undoes it, no file is there, and the audit
    /// at start-up queues the URL again. A rename over an old file is (the
    /// folder synced, or on Windows `MOVEFILE_WRITE_THROUGH`) before the row
    /// is marked done: undone, it would leave the old version, which passes
    /// the audit when its size is the same (found by `tests/powercut.rs`).
    pub fn commit(self) -> io::Result<()> {
        let TempFile {
            path, tmp, file, ..
        } = self;
        let result = file.sync_data().and_then(|()| {
            drop(file);
            // On Windows this fails with a sharing violation while the display
            // program holds the old file open; the caller retries later.
            if fs::symlink_metadata(&path).is_ok() {
                crate::os::rename_durably(&tmp, &path)
            } else {
                fs::rename(&tmp, &path)
            }
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Removes the temporary file.
    pub fn discard(self) {
        drop(self.file);
        let _ = fs::remove_file(&self.tmp);
    }

    /// Closes the file, keeping it for a later attempt; returns the bytes
    /// known to be on disk.
    pub fn keep(mut self) -> u64 {
        if self.len > self.synced && self.sync().is_err() {
            return self.synced;
        }
        self.synced
    }
}

/// The temporary file a download of `final_path` writes (kept to resume).
pub fn temp_file_of(final_path: &Path) -> PathBuf {
    temp_path(final_path)
}

/// Writes `bytes` to `path` so that a reader sees the old file or the complete
/// new one, never a part: temporary file in the same folder, flush, fsync,
/// rename over the final name. On any error the temporary file is removed and
/// the old file (if any) stays.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = TempFile::create(path)?;
    if let Err(e) = tmp.write(bytes) {
        tmp.discard();
        return Err(e);
    }
    tmp.commit()
}

/// Removes temporary files left anywhere under `root` (by a crash, or by
/// downloads no longer queued), except those in `keep` (interrupted
/// downloads to resume); returns how many were removed.
pub fn remove_temp_files(root: &Path, keep: &std::collections::HashSet<PathBuf>) -> usize {
    let mut removed = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if entry
                .file_name()
                .as_encoded_bytes()
                .starts_with(TEMP_PREFIX.as_bytes())
                && !keep.contains(&entry.path())
                && fs::remove_file(entry.path()).is_ok()
            {
                log::warn!(
                    "removed temporary file left by an interrupted download: {}",
                    entry.path().display()
                );
                removed += 1;
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(url: &str) -> Result<Vec<&str>, String> {
        url_segments(url)
    }

    #[test]
    fn path_mirrors_the_url_and_keeps_the_style_suffix() {
        assert_eq!(
            segs("https://b.oss-cn-hangzhou.aliyuncs.com/works/12/a.jpg!preview").unwrap(),
            ["works", "12", "a.jpg!preview"]
        );
        let root = Path::new("/cache");
        assert_eq!(
            local_path(root, "http://h.com:8080/x/y.png?v=2#top").unwrap(),
            Path::new("/cache/x/y.png")
        );
    }

    #[test]
    fn a_url_without_a_bang_keeps_its_last_character() {
        assert_eq!(
            segs("http://h.com/a/photo.jpg").unwrap(),
            ["a", "photo.jpg"]
        );
    }

    #[test]
    fn percent_escapes_are_kept_literally() {
        assert_eq!(
            segs("http://h.com/%2e%2e/%2E%2E/a%20b.jpg").unwrap(),
            ["%2e%2e", "%2E%2E", "a%20b.jpg"]
        );
    }

    #[test]
    fn url_with_dotdot_is_rejected() {
        assert!(segs("http://h.com/a/../../etc/passwd").is_err());
        assert!(segs("http://h.com/./a.jpg").is_err());
    }

    #[test]
    fn windows_unsafe_names_are_rejected() {
        for url in [
            "http://h.com/C:/x.jpg",
            "http://h.com/a\\b.jpg",
            "http://h.com/CON.jpg",
            "http://h.com/con",
            "http://h.com/x/nul.txt.jpg",
            "http://h.com/LPT1",
            "http://h.com/com9.png",
            "http://h.com/COM¹.png",
            "http://h.com/a.jpg.",
            "http://h.com/a.jpg ",
            "http://h.com/a<b.jpg",
            "http://h.com/a\"b.jpg",
            "http://h.com/a|b.jpg",
            "http://h.com/a*b.jpg",
            "http://h.com/a\u{1}b.jpg",
            "http://h.com/a//b.jpg",
            "http://h.com/dir/",
            "http://h.com/",
            "http://h.com",
            "http://h.com/.holosync-tmp-0123",
        ] {
            assert!(segs(url).is_err(), "{url} should be rejected");
        }
    }

    #[test]
    fn the_reason_names_what_is_wrong() {
        for (url, why) in [
            ("http://h.com/a\\b.jpg", "backslash"),
            ("http://h.com/C:/x.jpg", "colon"),
            ("http://h.com/a\u{1}b.jpg", "control character"),
            ("http://h.com/a*b.jpg", "Windows forbids"),
            ("http://h.com/a/../b.jpg", "would leave its folder"),
            ("http://h.com/./b.jpg", "would leave its folder"),
        ] {
            let e = segs(url).unwrap_err();
            assert!(e.contains(why), "{url}: {e}");
        }
    }

    #[test]
    fn names_that_only_look_reserved_are_fine() {
        for url in [
            "http://h.com/console.jpg",
            "http://h.com/COM10.jpg",
            "http://h.com/auxx",
        ] {
            assert!(segs(url).is_ok(), "{url} should be accepted");
        }
    }

    #[test]
    fn overlong_segment_is_rejected() {
        let url = format!("http://h.com/{}.jpg", "a".repeat(300));
        assert!(segs(&url).is_err());
        // 255 bytes is the longest name that fits, and it is taken.
        let url = format!("http://h.com/{}.jpg", "a".repeat(251));
        assert!(segs(&url).is_ok());
        let url = format!("http://h.com/{}.jpg", "a".repeat(252));
        assert!(segs(&url).is_err());
        // 92 CJK characters: 92 UTF-16 units (NTFS's count, fits) but 276
        // UTF-8 bytes (ext4's count, does not).
        let cjk = format!("http://h.com/{}", "\u{6f22}".repeat(92));
        assert_eq!(segs(&cjk).is_ok(), cfg!(windows), "{:?}", segs(&cjk));
        let url = format!("http://h.com/{}", "\u{6f22}".repeat(256));
        assert!(segs(&url).is_err());
    }

    #[test]
    fn temp_name_is_short_and_in_the_same_folder() {
        let p = Path::new("/c/works").join("a".repeat(250));
        let t = temp_path(&p);
        assert_eq!(t.parent(), p.parent());
        assert!(t.file_name().unwrap().len() < 40);
        // Two downloads in one folder (one finishing, the next starting)
        // must never share a temporary file.
        let names: std::collections::HashSet<PathBuf> = (0..1000)
            .map(|i| temp_path(&Path::new("/c/works").join(format!("{i}.jpg"))))
            .collect();
        assert_eq!(names.len(), 1000);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!("holosync-cachetest-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let path = dir.join("works/12/a.jpg!preview");
        write_atomic(&path, b"first").unwrap();
        write_atomic(&path, b"second").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"second");
        fs::write(dir.join("works").join(format!("{TEMP_PREFIX}dead")), b"x").unwrap();
        assert_eq!(remove_temp_files(&dir, &Default::default()), 1);
        let names: Vec<_> = fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
    #[test]
    fn only_names_shaped_like_8_3_aliases_are_refused() {
        for alias in [
            "PROGRA~1",
            "PHOTOG~1.JPG",
            "a~12.jpg",
            "abcd~123.png",
            "x~1.j",
        ] {
            assert!(is_short_name_alias(alias), "{alias}");
            assert!(check_segment(alias).unwrap_err().contains("8.3"), "{alias}");
        }
        for fine in [
            "~1.jpg",        // nothing before the tilde
            "photo~.jpg",    // no digits after it
            "photo~1a.jpg",  // not only digits
            "photogr~1.jpg", // a stem of nine characters
            "photo~1.jpeg",  // an extension of four
            "photo~1.j~g",   // a tilde in the extension
            "photo.jpg",     // no tilde at all
            "a~b~1x.png",    // the last tilde's digits are not only digits
        ] {
            assert!(!is_short_name_alias(fine), "{fine}");
            assert!(check_segment(fine).is_ok(), "{fine}");
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("holosync-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_clash_is_a_file_on_the_way_or_a_folder_at_the_end() {
        let root = scratch("clash");
        let path = root.join("a/b/c.jpg");
        // Nothing there yet, or only the folders: no clash.
        assert_eq!(clash(&root, &path), None);
        fs::create_dir_all(root.join("a/b")).unwrap();
        assert_eq!(clash(&root, &path), None);
        // The file itself exists: it is replaced, not a clash.
        fs::write(&path, b"x").unwrap();
        assert_eq!(clash(&root, &path), None);
        // A file where a folder is needed, at any depth.
        fs::write(root.join("f"), b"x").unwrap();
        let why = clash(&root, &root.join("f/g/h.jpg")).unwrap();
        assert!(why.contains("is a file") && why.contains("/f"), "{why}");
        fs::create_dir_all(root.join("d")).unwrap();
        fs::write(root.join("d/e"), b"x").unwrap();
        let why = clash(&root, &root.join("d/e/h.jpg")).unwrap();
        assert!(why.contains("is a file") && why.contains("d/e"), "{why}");
        // A folder where the file goes.
        let why = clash(&root, &root.join("a/b")).unwrap();
        assert!(why.contains("is a folder"), "{why}");
        // The root itself is never an ancestor to check (it may even be a
        // file's neighbour); a path outside the root is not walked.
        assert_eq!(clash(&root, &root.join("top.jpg")), None);
        assert_eq!(clash(&root.join("a"), &root.join("f/x.jpg")), None);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn reopen_keeps_the_synced_prefix_or_nothing() {
        let root = scratch("reopen");
        let path = root.join("film.bin");
        // No temporary file: nothing to resume.
        assert!(TempFile::reopen(&path, 3).unwrap().is_none());
        // A temporary file shorter than what was recorded: useless, removed.
        fs::write(temp_path(&path), b"ab").unwrap();
        assert!(TempFile::reopen(&path, 3).unwrap().is_none());
        assert!(!temp_path(&path).exists());
        // Exactly as long as recorded: kept as it is.
        fs::write(temp_path(&path), b"abcd").unwrap();
        assert_eq!(TempFile::reopen(&path, 4).unwrap().unwrap().synced(), 4);
        // Longer than recorded (bytes written after the last sync): cut back.
        fs::write(temp_path(&path), b"abcdef").unwrap();
        let mut t = TempFile::reopen(&path, 4).unwrap().unwrap();
        assert_eq!(t.synced(), 4);
        t.write(b"XY").unwrap();
        t.commit().unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"abcdXY");
        // Something that is not a file: an error, not a fresh start.
        fs::create_dir_all(temp_path(&root.join("dir.bin"))).unwrap();
        assert!(TempFile::reopen(&root.join("dir.bin"), 0).is_err());
        fs::remove_dir_all(&root).unwrap();
    }
    #[test]
    fn a_temp_file_syncs_by_its_cadence_and_keeps_what_it_synced() {
        let root = scratch("cadence");
        let path = root.join("film.bin");
        assert_eq!(temp_file_of(&path), temp_path(&path));
        // Bytes also get synced once a second: on a machine so busy that a
        // second passes between two lines, "not yet synced" is not checked.
        let started = std::time::Instant::now();
        let mut t = TempFile::create(&path).unwrap();
        assert!(t.is_empty());
        t.sync_every(Some(10));
        t.write(b"123456789").unwrap();
        assert_eq!(t.len(), 9);
        if started.elapsed() < std::time::Duration::from_millis(800) {
            assert_eq!(t.synced(), 0, "under the cadence: not synced");
        }
        assert!(!t.is_empty());
        t.write(b"0").unwrap();
        assert_eq!((t.len(), t.synced()), (10, 10), "at the cadence: synced");
        let started = std::time::Instant::now();
        t.write(b"abc").unwrap();
        assert_eq!(t.len(), 13);
        if started.elapsed() < std::time::Duration::from_millis(800) {
            assert_eq!(t.synced(), 10);
        }
        // Kept for a later attempt: what was written is synced and counted.
        assert_eq!(t.keep(), 13);
        assert_eq!(fs::read(temp_path(&path)).unwrap(), b"1234567890abc");
        // Without a cadence nothing is synced before the end.
        let mut t = TempFile::reopen(&path, 13).unwrap().unwrap();
        t.sync_every(None);
        t.write(&[7u8; 100]).unwrap();
        assert_eq!((t.len(), t.synced()), (113, 13));
        // Discarded: the temporary file is gone, nothing at the final path.
        t.discard();
        assert!(!temp_path(&path).exists() && !path.exists());
        // Left-over temporary files are removed and counted, kept ones stay.
        let kept = temp_path(&root.join("b/kept.bin"));
        fs::create_dir_all(root.join("b")).unwrap();
        for p in [
            temp_path(&root.join("a.bin")),
            temp_path(&root.join("b/c.bin")),
            kept.clone(),
        ] {
            fs::write(p, b"x").unwrap();
        }
        let keep = std::collections::HashSet::from([kept.clone()]);
        assert_eq!(remove_temp_files(&root, &keep), 2);
        assert!(kept.exists());
        fs::remove_dir_all(&root).unwrap();
    }
}

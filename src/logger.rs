//! A `log::Log` that writes one line per event to a size-rotated file.
//!
//! Write errors (a full disk, a removed folder) are swallowed: losing a log
//! line is better than stopping a kiosk. The file is reopened on the next line.

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// The file logger.
pub struct FileLogger {
    /// Lines above this level are dropped.
    level: log::LevelFilter,
    /// Also copy each line to the terminal the agent was started from.
    echo: Echo,
    /// The open file and its bookkeeping.
    state: Mutex<State>,
}

/// Where log lines are copied besides the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Echo {
    /// Nowhere (no terminal: a kiosk, a service, a test).
    None,
    /// Standard output is a terminal (or, on Windows, an attached console).
    Stdout,
    /// Only standard error is a terminal.
    Stderr,
}

struct State {
    /// The log file's path; rotated copies get `.1` ... `.keep` appended.
    path: PathBuf,
    /// Rotate before a line would make the file larger than this.
    max_bytes: u64,
    /// How many rotated files to keep.
    keep: u32,
    /// The open file, or None after a write error (reopened on the next line).
    file: Option<File>,
    /// Bytes in the current file.
    size: u64,
    /// The file ends in a partial line (a write failed, e.g. on a full disk):
    /// start the next line on a fresh line.
    needs_newline: bool,
}

impl FileLogger {
    /// Opens (appending) the log file and installs the logger globally;
    /// with `echo`, lines also go to the terminal the program runs in.
    pub fn install(
        path: &Path,
        level: log::LevelFilter,
        max_bytes: u64,
        keep: u32,
        echo: bool,
    ) -> std::io::Result<()> {
        let mut state = State {
            path: path.to_path_buf(),
            max_bytes,
            keep,
            file: None,
            size: 0,
            needs_newline: false,
        };
        state.open()?;
        let logger = FileLogger {
            level,
            echo: if !echo {
                Echo::None
            } else if std::io::stdout().is_terminal() {
                Echo::Stdout
            } else if std::io::stderr().is_terminal() {
                Echo::Stderr
            } else {
                Echo::None
            },
            state: Mutex::new(state),
        };
        log::set_boxed_logger(Box::new(logger))
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::AlreadyExists, e.to_string()))?;
        log::set_max_level(level);
        Ok(())
    }
}

impl State {
    fn open(&mut self) -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        self.size = file.metadata().map(|m| m.len()).unwrap_or(0);
        if self.size > 0 {
            let mut last = [0u8; 1];
            let ends_mid_line = file
                .seek(SeekFrom::End(-1))
                .and_then(|_| file.read_exact(&mut last))
                .map_or(true, |()| last[0] != b'\n');
            self.needs_newline |= ends_mid_line;
        }
        self.file = Some(file);
        Ok(())
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(format!(".{n}"));
        PathBuf::from(name)
    }

    /// Shifts `log` -> `log.1` -> ... -> `log.keep`, dropping the oldest.
    fn rotate(&mut self) {
        self.file = None;
        if self.keep == 0 {
            let _ = std::fs::remove_file(&self.path);
        } else {
            let _ = std::fs::remove_file(self.rotated(self.keep));
            for n in (1..self.keep).rev() {
                let _ = std::fs::rename(self.rotated(n), self.rotated(n + 1));
            }
            let _ = std::fs::rename(&self.path, self.rotated(1));
        }
        let _ = self.open();
    }

    fn write_line(&mut self, line: &[u8]) {
        if self.file.is_none() && self.open().is_err() {
            return;
        }
        if self.size > 0 && self.size + line.len() as u64 > self.max_bytes {
            self.rotate();
        }
        let Some(file) = self.file.as_mut() else {
            return;
        };
        let result = if self.needs_newline {
            file.write_all(b"\n").and_then(|()| file.write_all(line))
        } else {
            file.write_all(line)
        };
        match result {
            Ok(()) => {
                self.size += line.len() as u64 + u64::from(self.needs_newline);
                self.needs_newline = false;
            }
            // A part of the line may be in the file. Drop the handle; the next
            // line tries a fresh open (the disk may have room again) and starts
            // on a new line.
            Err(_) => {
                self.file = None;
                self.needs_newline = true;
            }
        }
    }
}

impl log::Log for FileLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= self.level && metadata.target().starts_with("holosync")
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let line = format!(
            "{} {:<5} {}\n",
            utc_timestamp(SystemTime::now()),
            record.level(),
            one_line(&record.args().to_string())
        );
        match self.echo {
            Echo::None => {}
            Echo::Stdout => {
                let _ = std::io::stdout().write_all(line.as_bytes());
            }
            Echo::Stderr => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.write_line(line.as_bytes());
    }

    fn flush(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = state.file.as_mut() {
            let _ = f.flush();
        }
    }
}

/// Keeps one event on one line: newlines and other control characters are escaped.
fn one_line(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .flat_map(|c| {
            if c.is_control() {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// `2026-11-25T20:35:18.123Z`.
pub fn utc_timestamp(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), after Howard Hinnant's `civil_from_days`.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps_are_utc_iso8601() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_638_918_123);
        assert_eq!(utc_timestamp(t), "2026-11-25T20:35:18.123Z");
        assert_eq!(utc_timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(utc_timestamp(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn control_characters_cannot_forge_log_lines() {
        assert_eq!(one_line("a\nWARN b"), "a\\nWARN b");
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn a_partial_last_line_is_ended_before_the_next_one() {
        let path =
            std::env::temp_dir().join(format!("holosync-partial-{}.log", std::process::id()));
        std::fs::write(&path, b"2026-01-01T00:00:00.000Z INFO  cut sho").unwrap();
        let mut st = State {
            path: path.clone(),
            max_bytes: 1 << 20,
            keep: 1,
            file: None,
            size: 0,
            needs_newline: false,
        };
        st.write_line(b"next line\n");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text, "2026-01-01T00:00:00.000Z INFO  cut sho\nnext line\n");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn rotation_keeps_at_most_keep_files_under_max_bytes() {
        let dir = std::env::temp_dir().join(format!("holosync-logtest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.log");
        let mut st = State {
            path: path.clone(),
            max_bytes: 100,
            keep: 2,
            file: None,
            size: 0,
            needs_newline: false,
        };
        for _ in 0..50 {
            st.write_line(&[b'x'; 30]);
        }
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["h.log", "h.log.1", "h.log.2"]);
        for n in &names {
            assert!(std::fs::metadata(dir.join(n)).unwrap().len() <= 100);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

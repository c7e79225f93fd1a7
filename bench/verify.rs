//! Benchmark helper for `bench/run` (`harness = false`).
//!
//! - `cargo bench --bench verify` (or the binary with `verify [RUNS]`):
//!   measures `holosync::verify::verify` on a 1920x1080 JPEG, a 4000x3000
//!   JPEG and a 1920x1080 PNG. Each figure is the median of RUNS calls
//!   (default 15) of the process's CPU time, all threads
//!   (`clock_gettime(CLOCK_PROCESS_CPUTIME_ID)`; verification no longer
//!   starts threads, so it equals the calling thread's), with the calling
//!   thread's share and the wall-clock
//!   median beside it, for 1080p JPEG, PNG, GIF, lossless WebP and (with
//!   `cwebp`) lossy WebP, and a 4000x3000 JPEG. With `--json` one JSON
//!   object is printed instead of a table.
//! - `gen DIR JPEGS PNGS`: writes the deterministic images `bench/run`
//!   serves: `DIR/drain/jNNNN.jpg` (1920x1080), `DIR/drain/pNNNN.png`
//!   (1920x1080) and `DIR/big/photo-4000x3000.jpg`, then prints one line
//!   per file group with the byte counts.
//! - `huge DIR`: writes the 100-megapixel pictures (10000x10000) of the
//!   verifier's memory promise, unless already there: `DIR/progressive-
//!   10000x10000.jpg` (RGB, 4:4:4, the most memory a progressive JPEG of
//!   that size needs) and `DIR/rgb-10000x10000.png`; prints their paths.
//! - `anim DIR`: writes a 100-frame 1920x1080 lossy animated WebP
//!   (`DIR/animated-100x1920x1080.webp`, one `cwebp` still repeated in
//!   ANMF chunks; needs Debian's `webp` package) and prints its path.
//! - `peak FILE`: reads FILE, verifies it with `verify::Verifier` in 5 ms
//!   slices on this thread, and prints one JSON object: the verdict, the
//!   verifier's largest `memory_bytes()`, the process's VmHWM before and
//!   after (from /proc/self/status), its thread count, and the longest
//!   step against its deadline. Run it in a fresh process per file.
//!
//! The images are a pure function of their seed: smooth colour fields with
//! a little per-pixel noise, so a 1080p JPEG at quality 85 is 300-500 KB,
//! like a photo.

#[path = "../tests/support/webp_animation.rs"]
mod webp_animation;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// `struct timespec` on 64-bit Linux.
#[cfg(target_os = "linux")]
#[repr(C)]
struct Timespec {
    tv_sec: i64,
    tv_nsec: i64,
}

#[cfg(target_os = "linux")]
extern "C" {
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
}

/// `CLOCK_PROCESS_CPUTIME_ID`: all threads of this process, including
/// threads that already exited (kept from when jpeg-decoder decoded each
/// colour component on a thread of its own: a check that nothing does now).
const PROCESS: i32 = 2;
/// `CLOCK_THREAD_CPUTIME_ID`: the calling thread only.
const THREAD: i32 = 3;

/// CPU time of `clock` in nanoseconds.
#[cfg(target_os = "linux")]
fn cpu_ns(clock: i32) -> u64 {
    let mut ts = Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; both clock ids are
    // constants every Linux kernel supports.
    let rc = unsafe { clock_gettime(clock, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime({clock}) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Elsewhere there is no CPU clock without a dependency: wall time instead.
#[cfg(not(target_os = "linux"))]
fn cpu_ns(_clock: i32) -> u64 {
    use std::sync::OnceLock;
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// SplitMix64 step.
fn mix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Deterministic RGB8 pixels: a few seeded smooth colour waves plus noise of
/// `noise` levels per channel.
fn pixels(width: usize, height: usize, seed: u64, noise: u8) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0xA076_1D64_78BD_642F) ^ 0xE703_7ED1_A0B4_28DB;
    let mut waves = [[0f32; 4]; 3];
    for wave in &mut waves {
        for (i, v) in wave.iter_mut().enumerate() {
            let r = (mix(&mut state) >> 11) as f32 / (1u64 << 53) as f32;
            *v = if i < 2 {
                1.0 + r * 9.0
            } else {
                r * std::f32::consts::TAU
            };
        }
    }
    let (w, h) = (width as f32, height as f32);
    let mut data = Vec::with_capacity(width * height * 3);
    for y in 0..height {
        let fy = y as f32 / h;
        for x in 0..width {
            let fx = x as f32 / w;
            let z = mix(&mut state);
            for (c, wave) in waves.iter().enumerate() {
                let a = (fx * wave[0] + wave[2]).sin();
                let b = (fy * wave[1] + wave[3] + fx * 2.0).cos();
                let base = 128.0 + 60.0 * a + 50.0 * b;
                let n = ((z >> (c * 8)) & 0xff) as u32 * u32::from(noise) / 256;
                let v = base as i32 + n as i32 - i32::from(noise / 2);
                data.push(v.clamp(0, 255) as u8);
            }
        }
    }
    data
}

/// A deterministic baseline JPEG, quality 85.
fn jpeg(width: u16, height: u16, seed: u64) -> Vec<u8> {
    let data = pixels(usize::from(width), usize::from(height), seed, 28);
    let mut out = Vec::new();
    jpeg_encoder::Encoder::new(&mut out, 85)
        .encode(&data, width, height, jpeg_encoder::ColorType::Rgb)
        .expect("encode jpeg");
    out
}

/// A deterministic RGB8 PNG (default compression).
fn png(width: u32, height: u32, seed: u64) -> Vec<u8> {
    png_with_noise(width, height, seed, 2)
}

/// A deterministic RGB8 PNG with `noise` levels of noise per channel.
fn png_with_noise(width: u32, height: u32, seed: u64, noise: u8) -> Vec<u8> {
    let data = pixels(width as usize, height as usize, seed, noise);
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("png header");
    writer.write_image_data(&data).expect("png data");
    writer.finish().expect("png finish");
    out
}

/// A deterministic GIF of `frames` frames (a 3-3-2 bit palette of the
/// same pixels as the JPEG rows, shifted per frame), LZW code size 8.
fn gif(width: u16, height: u16, frames: usize, seed: u64) -> Vec<u8> {
    let data = pixels(usize::from(width), usize::from(height), seed, 28);
    let mut g = b"GIF89a".to_vec();
    g.extend(width.to_le_bytes());
    g.extend(height.to_le_bytes());
    g.extend([0xf7, 0, 0]);
    for i in 0..=255u8 {
        g.extend([i & 0xe0, (i << 3) & 0xe0, (i << 6) & 0xc0]);
    }
    for f in 0..frames {
        let index: Vec<u8> = data
            .chunks_exact(3)
            .map(|p| (p[0] & 0xe0) | ((p[1] >> 3) & 0x1c) | (p[2] >> 6))
            .map(|i| i.wrapping_add(f as u8))
            .collect();
        let lzw = weezl::encode::Encoder::new(weezl::BitOrder::Lsb, 8)
            .encode(&index)
            .expect("LZW-encode");
        g.extend(b"\x21\xf9\x04\x00\x04\x00\x00\x00\x2c\x00\x00\x00\x00");
        g.extend(width.to_le_bytes());
        g.extend(height.to_le_bytes());
        g.extend([0, 8]);
        for block in lzw.chunks(255) {
            g.push(block.len() as u8);
            g.extend(block);
        }
        g.push(0);
    }
    g.push(0x3b);
    g
}

/// A deterministic lossless WebP (image-webp's encoder).
fn webp_lossless(width: u32, height: u32, seed: u64) -> Vec<u8> {
    let data = pixels(width as usize, height as usize, seed, 2);
    let mut out = Vec::new();
    image_webp::WebPEncoder::new(&mut out)
        .encode(&data, width, height, image_webp::ColorType::Rgb8)
        .expect("encode webp");
    out
}

/// A deterministic lossy WebP, quality 80, made by libwebp's `cwebp` from
/// a PNG of the same pixels; None when `cwebp` is not installed (Debian's
/// `webp` package).
fn webp_lossy(width: u32, height: u32, seed: u64) -> Option<Vec<u8>> {
    let dir = std::env::temp_dir().join(format!("holosync-bench-{}", std::process::id()));
    fs::create_dir_all(&dir).ok()?;
    let (png_path, webp_path) = (dir.join("in.png"), dir.join("out.webp"));
    fs::write(&png_path, png_with_noise(width, height, seed, 28)).ok()?;
    let ok = std::process::Command::new("cwebp")
        .args(["-quiet", "-q", "80"])
        .arg(&png_path)
        .arg("-o")
        .arg(&webp_path)
        .status()
        .is_ok_and(|s| s.success());
    let bytes = fs::read(&webp_path).ok().filter(|_| ok);
    let _ = fs::remove_dir_all(&dir);
    bytes
}

/// An animated WebP: `frames` copies of a lossy still's VP8 bitstream
/// (from `webp_lossy`, so None without `cwebp`) in ANMF chunks.
fn webp_animated(width: u32, height: u32, frames: usize) -> Option<Vec<u8>> {
    let still = webp_lossy(width, height, 79)?;
    Some(webp_animation::animated_webp(
        &still, width, height, frames, 40,
    ))
}

/// Median of `v` (sorted in place); 0 for an empty slice.
fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians over `runs` calls of verify, in ms.
struct Figures {
    /// Process CPU time (all threads).
    cpu: f64,
    /// CPU time of the calling thread alone.
    thread: f64,
    /// Wall-clock time.
    wall: f64,
}

/// Times `runs` calls of verify on `bytes` (after one warm-up call).
fn measure(bytes: &[u8], url: &str, ctype: &str, runs: usize) -> Figures {
    // One warm-up call (page faults of the first allocation, caches).
    holosync::verify::verify(bytes, url, Some(ctype)).expect("verify warm-up");
    let (mut cpu, mut thread, mut wall) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (p0, t0, w0) = (cpu_ns(PROCESS), cpu_ns(THREAD), Instant::now());
        let kind = holosync::verify::verify(bytes, url, Some(ctype));
        let (p1, t1, w1) = (cpu_ns(PROCESS), cpu_ns(THREAD), w0.elapsed());
        kind.expect("verify");
        cpu.push((p1 - p0) as f64 / 1e6);
        thread.push((t1 - t0) as f64 / 1e6);
        wall.push(w1.as_secs_f64() * 1e3);
    }
    Figures {
        cpu: median(&mut cpu),
        thread: median(&mut thread),
        wall: median(&mut wall),
    }
}

/// `verify [RUNS] [--json]`.
fn run_verify(args: &[String]) {
    let json = args.iter().any(|a| a == "--json");
    let runs = args
        .iter()
        .find_map(|a| a.parse::<usize>().ok())
        .unwrap_or(15)
        .max(1);
    let mut cases = vec![
        ("jpeg_1920x1080", jpeg(1920, 1080, 1), "a.jpg", "image/jpeg"),
        ("jpeg_4000x3000", jpeg(4000, 3000, 2), "b.jpg", "image/jpeg"),
        ("png_1920x1080", png(1920, 1080, 3), "c.png", "image/png"),
        ("gif_1920x1080", gif(1920, 1080, 1, 4), "d.gif", "image/gif"),
        (
            "webp_lossless_1920x1080",
            webp_lossless(1920, 1080, 5),
            "e.webp",
            "image/webp",
        ),
    ];
    match webp_lossy(1920, 1080, 6) {
        Some(bytes) => cases.push(("webp_lossy_1920x1080", bytes, "f.webp", "image/webp")),
        None => eprintln!("cwebp not found (Debian package webp): no lossy WebP row"),
    }
    let mut rows = Vec::new();
    for (name, bytes, url, ctype) in &cases {
        rows.push((*name, bytes.len(), measure(bytes, url, ctype, runs)));
    }
    if json {
        let items: Vec<String> = rows
            .iter()
            .map(|(name, len, f)| {
                format!(
                    "\"{name}\":{{\"bytes\":{len},\"cpu_ms\":{:.3},\"thread_ms\":{:.3},\"wall_ms\":{:.3},\"runs\":{runs}}}",
                    f.cpu, f.thread, f.wall
                )
            })
            .collect();
        println!("{{{}}}", items.join(","));
    } else {
        println!("verify: median of {runs} runs; CPU = process CPU time (all threads, CLOCK_PROCESS_CPUTIME_ID)");
        for (name, len, f) in rows {
            println!(
                "{name:<16} {len:>9} bytes  {:8.2} ms CPU ({:.2} ms on the calling thread)  {:8.2} ms wall",
                f.cpu, f.thread, f.wall
            );
        }
    }
}

/// `gen DIR JPEGS PNGS`.
fn run_gen(args: &[String]) {
    let usage = "usage: verify gen DIR JPEGS PNGS";
    let dir = Path::new(args.first().expect(usage));
    let jpegs: u64 = args.get(1).and_then(|s| s.parse().ok()).expect(usage);
    let pngs: u64 = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
    let drain = dir.join("drain");
    let big = dir.join("big");
    fs::create_dir_all(&drain).expect("create drain dir");
    fs::create_dir_all(&big).expect("create big dir");
    // Every file is a pure function of its name, so the work is split over
    // the cores without changing a byte.
    let mut jobs: Vec<(String, bool, u64)> = (0..jpegs)
        .map(|i| (format!("j{i:04}.jpg"), true, 1000 + i))
        .chain((0..pngs).map(|i| (format!("p{i:04}.png"), false, 5000 + i)))
        .collect();
    jobs.reverse();
    let jobs = std::sync::Mutex::new(jobs);
    let totals = std::sync::Mutex::new((0usize, 0usize));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let Some((name, is_jpeg, seed)) = jobs.lock().expect("jobs").pop() else {
                    return;
                };
                let bytes = if is_jpeg {
                    jpeg(1920, 1080, seed)
                } else {
                    png(1920, 1080, seed)
                };
                let mut t = totals.lock().expect("totals");
                if is_jpeg {
                    t.0 += bytes.len();
                } else {
                    t.1 += bytes.len();
                }
                drop(t);
                fs::write(drain.join(name), bytes).expect("write image");
            });
        }
    });
    let (jpeg_bytes, png_bytes) = *totals.lock().expect("totals");
    let photo = jpeg(4000, 3000, 9000);
    fs::write(big.join("photo-4000x3000.jpg"), &photo).expect("write big jpeg");
    println!("jpegs {jpegs} {jpeg_bytes}");
    println!("pngs {pngs} {png_bytes}");
    println!("big 1 {}", photo.len());
}

/// Side of the 100-megapixel pictures.
const HUGE_SIDE: u16 = 10_000;
/// Deadline of each slice in `peak`: what an agent turn could allow.
const PEAK_SLICE: Duration = Duration::from_millis(5);

/// `huge DIR`.
fn run_huge(args: &[String]) {
    let dir = Path::new(args.first().expect("usage: verify huge DIR"));
    fs::create_dir_all(dir).expect("create huge dir");
    let jpeg_path = dir.join(format!("progressive-{HUGE_SIDE}x{HUGE_SIDE}.jpg"));
    if !jpeg_path.exists() {
        let side = usize::from(HUGE_SIDE);
        let data = pixels(side, side, 77, 28);
        let mut out = Vec::new();
        let mut encoder = jpeg_encoder::Encoder::new(&mut out, 85);
        encoder.set_progressive(true);
        encoder.set_sampling_factor(jpeg_encoder::SamplingFactor::F_1_1);
        encoder
            .encode(&data, HUGE_SIDE, HUGE_SIDE, jpeg_encoder::ColorType::Rgb)
            .expect("encode huge jpeg");
        drop(data);
        write_whole(&jpeg_path, &out);
    }
    let png_path = dir.join(format!("rgb-{HUGE_SIDE}x{HUGE_SIDE}.png"));
    if !png_path.exists() {
        let side = u32::from(HUGE_SIDE);
        write_whole(&png_path, &png_with_noise(side, side, 78, 0));
    }
    println!("{}", jpeg_path.display());
    println!("{}", png_path.display());
}

/// `anim DIR`: a 100-frame 1920x1080 lossy animated WebP (needs `cwebp`).
fn run_anim(args: &[String]) {
    let dir = Path::new(args.first().expect("usage: verify anim DIR"));
    fs::create_dir_all(dir).expect("create anim dir");
    let path = dir.join("animated-100x1920x1080.webp");
    if !path.exists() {
        let bytes = webp_animated(1920, 1080, 100).expect("cwebp (Debian package webp)");
        write_whole(&path, &bytes);
    }
    println!("{}", path.display());
}

/// Writes `bytes` to a temporary name, then renames: a killed run leaves no
/// half file for the next one to trust.
fn write_whole(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, bytes).expect("write huge picture");
    fs::rename(&tmp, path).expect("rename huge picture");
}

/// A field of /proc/self/status in kB (0 elsewhere).
fn status_field(name: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// `peak FILE`.
fn run_peak(args: &[String]) {
    let path = args.first().expect("usage: verify peak FILE");
    let bytes = fs::read(path).expect("read file");
    let hwm_before = status_field("VmHWM");
    let url = format!(
        "http://bench/{}",
        Path::new(path).file_name().unwrap().to_string_lossy()
    );
    let mut verifier = holosync::verify::Verifier::new(&url, None);
    let (cpu0, wall0) = (cpu_ns(THREAD), Instant::now());
    let (mut steps, mut most_memory, mut most_threads) = (0u64, 0usize, 0u64);
    let mut overshoot = Duration::ZERO;
    let verdict = loop {
        let deadline = Instant::now() + PEAK_SLICE;
        let progress = verifier.step(&bytes, true, deadline);
        overshoot = overshoot.max(Instant::now().saturating_duration_since(deadline));
        steps += 1;
        most_memory = most_memory.max(verifier.memory_bytes());
        if steps % 64 == 1 {
            most_threads = most_threads.max(status_field("Threads"));
        }
        match progress {
            holosync::verify::Progress::Done(result) => break result,
            holosync::verify::Progress::Paused => {}
            holosync::verify::Progress::NeedMore => panic!("NeedMore on a complete body"),
        }
    };
    let (cpu, wall) = ((cpu_ns(THREAD) - cpu0) as f64 / 1e6, wall0.elapsed());
    let verdict = match verdict {
        Ok(kind) => format!("{kind}"),
        Err(e) => format!("refused: {e}"),
    };
    println!(
        "{{\"file\":{:?},\"bytes\":{},\"verdict\":{:?},\"steps\":{steps},\"slice_ms\":{},\
         \"max_overshoot_ms\":{:.3},\"cpu_ms\":{cpu:.1},\"wall_ms\":{:.1},\
         \"verifier_peak_bytes\":{most_memory},\"vmhwm_before_kb\":{hwm_before},\
         \"vmhwm_kb\":{},\"threads\":{most_threads}}}",
        path,
        bytes.len(),
        verdict,
        PEAK_SLICE.as_millis(),
        overshoot.as_secs_f64() * 1e3,
        wall.as_secs_f64() * 1e3,
        status_field("VmHWM"),
    );
}

fn main() {
    // `cargo bench` appends `--bench`; anything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("gen") => run_gen(&args[1..]),
        Some("verify") => run_verify(&args[1..]),
        Some("huge") => run_huge(&args[1..]),
        Some("peak") => run_peak(&args[1..]),
        Some("anim") => run_anim(&args[1..]),
        None => run_verify(&[]),
        Some(other) => {
            eprintln!(
                "unknown command {other:?}; use `verify [RUNS] [--json]`, `gen DIR JPEGS PNGS`, \
                 `huge DIR`, `anim DIR` or `peak FILE`"
            );
            std::process::exit(2);
        }
    }
}

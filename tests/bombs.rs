//! Decompression and scan bombs, end to end through the real binary: a
//! small file that asks for far more decoding work than its size is
//! refused early, with a reason naming the limit, and its verification
//! costs well under a second of CPU (read from the agent's own
//! `cpu for <url>: ... verify N us` debug line, so a busy machine does not
//! matter); legitimate pictures of the same shapes are still stored.

mod common;
#[path = "support/webp_animation.rs"]
mod webp_animation;

use std::time::Duration;

use common::{agent_with, poll_until, HttpServer, Mosquitto, Route, TempDir};
use serde_json::{json, Value};

/// How long a URL may take to settle (a busy 2-core machine, debug build).
const SETTLE: Duration = Duration::from_secs(120);
/// CPU a refused bomb's verification may cost, in microseconds: the issue's
/// one second (the refusals measured here take a few ms).
const BOMB_VERIFY_US: u64 = 1_000_000;

/// Bits written MSB first, with JPEG's 0xFF 0x00 stuffing and 1-bit padding.
#[derive(Default)]
struct BitWriter {
    out: Vec<u8>,
    acc: u32,
    n: u32,
}

impl BitWriter {
    fn put(&mut self, bits: u32, len: u32) {
        for i in (0..len).rev() {
            self.acc = (self.acc << 1) | ((bits >> i) & 1);
            self.n += 1;
            if self.n == 8 {
                self.out.push(self.acc as u8);
                if self.acc == 0xff {
                    self.out.push(0);
                }
                self.acc = 0;
                self.n = 0;
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        while self.n != 0 {
            self.put(1, 1);
        }
        self.out
    }
}

fn segment(out: &mut Vec<u8>, marker: u8, body: &[u8]) {
    out.extend([0xff, marker]);
    out.extend(((body.len() + 2) as u16).to_be_bytes());
    out.extend(body);
}

/// A greyscale progressive JPEG of `w`x`h` whose picture is flat: one DC
/// scan (every block a 1-bit "no change"), then one scan per `(Ss, Se, Ah,
/// Al)` of `scans`, each a run of end-of-band symbols over every block (a
/// few bytes for the whole picture: the scan bomb of issue 23).
fn progressive_jpeg(w: u16, h: u16, scans: &[(u8, u8, u8, u8)]) -> Vec<u8> {
    let blocks = u32::from(w).div_ceil(8) * u32::from(h).div_ceil(8);
    let mut out = vec![0xff, 0xd8];
    let mut dqt = vec![0];
    dqt.extend([1u8; 64]);
    segment(&mut out, 0xdb, &dqt);
    let mut sof = vec![8];
    sof.extend(h.to_be_bytes());
    sof.extend(w.to_be_bytes());
    sof.extend([1, 1, 0x11, 0]);
    segment(&mut out, 0xc2, &sof);
    // DC: one 1-bit code for category 0.
    let mut dht = vec![0x00, 1];
    dht.extend([0u8; 15]);
    dht.push(0);
    segment(&mut out, 0xc4, &dht);
    // AC: EOB0..EOB14 (0x00, 0x10, ... 0xE0) as fifteen 4-bit codes.
    let mut dht = vec![0x10, 0, 0, 0, 15];
    dht.extend([0u8; 12]);
    dht.extend((0..15).map(|r| r << 4));
    segment(&mut out, 0xc4, &dht);
    segment(&mut out, 0xda, &[1, 1, 0x00, 0, 0, 0]);
    let mut dc = BitWriter::default();
    for _ in 0..blocks {
        dc.put(0, 1);
    }
    out.extend(dc.finish());
    for &(ss, se, ah, al) in scans {
        segment(&mut out, 0xda, &[1, 1, 0x00, ss, se, (ah << 4) | al]);
        let mut ac = BitWriter::default();
        let mut left = blocks;
        while left > 0 {
            let run = left.min(0x7fff);
            let r = 31 - run.leading_zeros();
            ac.put(r, 4);
            ac.put(run - (1 << r), r);
            left -= run;
        }
        out.extend(ac.finish());
    }
    out.extend([0xff, 0xd9]);
    out
}

/// A GIF of `frames` frames of `w`x`h`, each one flat colour, LZW-coded.
fn gif(w: u16, h: u16, frames: usize) -> Vec<u8> {
    let mut g = b"GIF89a".to_vec();
    g.extend(w.to_le_bytes());
    g.extend(h.to_le_bytes());
    g.extend([0x81, 0, 0]);
    g.extend([0, 0, 0, 255, 255, 255, 255, 0, 0, 0, 0, 255]);
    let pixels = vec![1u8; usize::from(w) * usize::from(h)];
    let lzw = weezl::encode::Encoder::new(weezl::BitOrder::Lsb, 2)
        .encode(&pixels)
        .expect("LZW-encode test pixels");
    for _ in 0..frames {
        g.extend(b"\x21\xf9\x04\x00\x05\x00\x00\x00\x2c\x00\x00\x00\x00");
        g.extend(w.to_le_bytes());
        g.extend(h.to_le_bytes());
        g.extend([0, 2]);
        for block in lzw.chunks(255) {
            g.push(block.len() as u8);
            g.extend(block);
        }
        g.push(0);
    }
    g.push(0x3b);
    g
}

/// An animated WebP of `frames` lossless frames of `w`x`h` (image-webp's encoder).
fn animated_webp(w: u32, h: u32, frames: usize) -> Vec<u8> {
    let pixels = vec![90u8; (w * h * 3) as usize];
    let mut still = Vec::new();
    image_webp::WebPEncoder::new(&mut still)
        .encode(&pixels, w, h, image_webp::ColorType::Rgb8)
        .expect("encode a test WebP");
    webp_animation::animated_webp(&still, w, h, frames, 40)
}

/// An APNG of `frames` grey frames of `w`x`h` (the png crate's encoder).
fn apng(w: u32, h: u32, frames: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Grayscale);
    encoder.set_animated(frames, 0).expect("animated");
    let mut writer = encoder.write_header().expect("png header");
    let pixels = vec![120u8; (w * h) as usize];
    for _ in 0..frames {
        writer.write_image_data(&pixels).expect("png frame");
    }
    writer.finish().expect("png finish");
    out
}

/// How one URL ended: its state, its last error, and the verify CPU the
/// agent logged for it (microseconds).
struct Outcome {
    state: String,
    error: String,
    verify_us: u64,
}

/// Serves each `(name, body)` from 127.0.0.1, syncs them all through a real
/// mosquitto to the real binary with `config`, and waits for each to settle.
fn sync(files: Vec<(&str, Vec<u8>)>, config: Value) -> Vec<Outcome> {
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("bombs");
    let mut urls = Vec::new();
    for (name, body) in files {
        let path = format!("/{name}");
        http.set(&path, Route::Ok(body));
        urls.push(http.url(&path));
    }
    let mut patch =
        json!({"download": {"interval_ms": 0, "max_attempts": 1, "max_bytes": 64 << 20}});
    common::merge(&mut patch, config);
    let agent = agent_with(dir.path(), &broker, patch);
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    let settled = poll_until(SETTLE, || {
        let rows = agent.rows();
        let log = agent.log();
        urls.iter().all(|u| {
            rows.get(u)
                .is_some_and(|(s, _, _)| s == "done" || s == "failed")
                && log.contains(&format!("cpu for {u}:"))
        })
    });
    assert!(settled, "not settled:\n{}", agent.diagnostics());
    let rows = agent.rows();
    let log = agent.log();
    urls.iter()
        .map(|u| {
            let line = log
                .lines()
                .find(|l| l.contains(&format!("cpu for {u}:")))
                .expect("cpu line");
            let verify_us = line
                .split("verify ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .and_then(|n| n.parse().ok())
                .expect("verify us in the cpu line");
            let (state, _, error) = rows[u].clone();
            Outcome {
                state,
                error,
                verify_us,
            }
        })
        .collect()
}

/// Asserts `o` was refused for a reason containing `reason`, cheaply.
fn refused_cheaply(what: &str, o: &Outcome, reason: &str) {
    eprintln!(
        "{what}: {} after {} us of verify CPU: {}",
        o.state, o.verify_us, o.error
    );
    assert_eq!(o.state, "failed", "{what} was stored");
    assert!(o.error.contains(reason), "{what}: {}", o.error);
    assert!(
        o.verify_us < BOMB_VERIFY_US,
        "{what}: verifying cost {} us of CPU",
        o.verify_us
    );
}

/// The scan bomb (10000x10000, 1,000 identical AC scans, each one
/// end-of-band run over every block) is refused at its second AC scan: a
/// band coded twice adds nothing. A file of 101 scans that each add a bit
/// is refused by the scan cap (djpeg -maxscans 100), one that refines the
/// same bit twice by the progression rule. The same picture with
/// one AC scan, and with the 100 scans the cap allows, is stored.
/// Fails on the old code: both bombs were stored.
#[test]
fn jpeg_scan_bombs_are_refused_naming_the_rule() {
    let bomb = progressive_jpeg(10000, 10000, &vec![(1, 63, 0, 0); 1000]);
    // Coefficients 1-8, each first at bit 13 then refined down to bit 0:
    // 8 x 14 = 112 scans, every one adding a bit.
    let mut many = Vec::new();
    for k in 1..=8u8 {
        many.push((k, k, 0, 13));
        for bit in (0..13).rev() {
            many.push((k, k, bit + 1, bit));
        }
    }
    let over = progressive_jpeg(64, 64, &many[..101]);
    let at_cap = progressive_jpeg(64, 64, &many[..99]);
    let one = progressive_jpeg(10000, 10000, &[(1, 63, 0, 0)]);
    // Bit 0 refined twice: the second refinement adds nothing.
    let twice = progressive_jpeg(2000, 2000, &[(1, 63, 0, 1), (1, 63, 1, 0), (1, 63, 1, 0)]);
    let got = sync(
        vec![
            ("bomb.jpg", bomb),
            ("over.jpg", over),
            ("at-cap.jpg", at_cap),
            ("one.jpg", one),
            ("twice.jpg", twice),
        ],
        json!({}),
    );
    refused_cheaply("the scan bomb", &got[0], "a second time");
    refused_cheaply("101 scans", &got[1], "-maxscans 100");
    assert_eq!(got[2].state, "done", "100 scans: {}", got[2].error);
    assert_eq!(got[3].state, "done", "one AC scan: {}", got[3].error);
    refused_cheaply("a refinement repeated", &got[4], "already refined");
}

/// GIF, WebP and APNG animations whose frames declare more pixels together than
/// download.max_animation_pixels are refused at the frame that crosses it,
/// naming the key; 200-frame animations under it are stored.
/// Fails on the old code: GIF and WebP were stored unverified.
#[test]
fn animation_bombs_are_refused_naming_the_budget() {
    let got = sync(
        vec![
            ("bomb.gif", gif(1000, 1000, 40)),
            ("bomb.webp", animated_webp(1000, 1000, 40)),
            ("ok.gif", gif(64, 48, 200)),
            ("ok.webp", animated_webp(64, 48, 200)),
            ("bomb.png", apng(1000, 1000, 3)),
            ("ok.png", apng(64, 48, 200)),
        ],
        json!({"download": {"max_animation_pixels": 1_500_000}}),
    );
    refused_cheaply("the GIF bomb", &got[0], "download.max_animation_pixels");
    assert!(got[0].error.contains("frame 2"), "{}", got[0].error);
    refused_cheaply("the WebP bomb", &got[1], "download.max_animation_pixels");
    assert!(got[1].error.contains("frame 2"), "{}", got[1].error);
    assert_eq!(got[2].state, "done", "200-frame GIF: {}", got[2].error);
    assert_eq!(got[3].state, "done", "200-frame WebP: {}", got[3].error);
    refused_cheaply("the APNG bomb", &got[4], "download.max_animation_pixels");
    assert!(got[4].error.contains("frame 2"), "{}", got[4].error);
    assert_eq!(got[5].state, "done", "200-frame APNG: {}", got[5].error);
}

/// download.max_secs bounds the whole attempt: a 100 MP progressive JPEG
/// at the scan cap (100 scans, each a pass over 1.56 million blocks: over
/// a second of CPU even in a release build) served in two halves 0.3 s
/// apart, with max_secs 1, fails for good naming the key once its bytes
/// are in. Fails on the old code: the limit covered only the transfer,
/// and the file was stored.
#[test]
fn max_secs_bounds_transfer_and_verification_together() {
    let mut scans = Vec::new();
    for k in 1..=8u8 {
        scans.push((k, k, 0, 13));
        for bit in (0..13).rev() {
            scans.push((k, k, bit + 1, bit));
        }
    }
    let heavy = progressive_jpeg(10000, 10000, &scans[..99]);
    let broker = Mosquitto::start();
    let http = HttpServer::start();
    let dir = TempDir::new("bombs-max-secs");
    http.set("/heavy.jpg", Route::Slow(heavy, Duration::from_millis(300)));
    let url = http.url("/heavy.jpg");
    let agent = agent_with(
        dir.path(),
        &broker,
        json!({"download": {"timeout_secs": 1, "max_secs": 1, "max_attempts": 1, "interval_ms": 0}}),
    );
    broker.publish("sync", url.as_bytes(), 1);
    let mut row = None;
    let settled = poll_until(SETTLE, || {
        row = agent.rows().get(&url).cloned();
        row.as_ref()
            .is_some_and(|(s, _, _)| s == "done" || s == "failed")
    });
    assert!(settled, "not settled:\n{}", agent.diagnostics());
    let (state, _, error) = row.expect("settled");
    assert_eq!(
        state,
        "failed",
        "stored after max_secs:\n{}",
        agent.diagnostics()
    );
    assert!(
        error.contains("download.max_secs") && error.contains("transfer and verification"),
        "{error}"
    );
}

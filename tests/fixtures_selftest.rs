//! Self-tests for the shared end-to-end fixtures in `tests/common`.
//!
//! These do not run holosync; they check that the broker, HTTP server and
//! image helpers behave as the end-to-end tests assume.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A raw HTTP response as seen by a plain std client.
#[derive(Debug)]
struct Resp {
    /// Status code from the status line.
    status: u16,
    /// The status line itself.
    status_line: String,
    /// Header (name lowercased, value).
    headers: Vec<(String, String)>,
    /// Body bytes received before EOF or error.
    body: Vec<u8>,
    /// The read error that ended the response, if any.
    error: Option<io::ErrorKind>,
    /// Time from connect to end of response.
    elapsed: Duration,
}

impl Resp {
    /// The value of header `name` (case-insensitive).
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Content-Length as a number.
    fn content_length(&self) -> usize {
        self.header("content-length")
            .expect("content-length header")
            .parse()
            .expect("numeric content-length")
    }
}

/// `fetch` against `server`.
fn get(server: &HttpServer, target: &str) -> Resp {
    fetch(server.port(), target)
}

/// Sends `GET <target>` to 127.0.0.1:`port` over a plain TcpStream and reads
/// until EOF or error (10 s read timeout).
fn fetch(port: u16, target: &str) -> Resp {
    let started = Instant::now();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: selftest\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let mut error = None;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
            Err(e) => {
                error = Some(e.kind());
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8(raw[..split].to_vec()).expect("ascii head");
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap().to_owned();
    let status = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (k, v) = l.split_once(':').expect("header colon");
            (k.trim().to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    Resp {
        status,
        status_line,
        headers,
        body: raw[split + 4..].to_vec(),
        error,
        elapsed,
    }
}

/// Runs `fetch` on a thread, delivering the response through a channel.
fn get_async(server: &HttpServer, target: &str) -> mpsc::Receiver<Resp> {
    let port = server.port();
    let target = target.to_owned();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(fetch(port, &target));
    });
    rx
}

/// Deterministic non-image bytes of length `n`.
fn bytes(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn temp_dir_is_unique_and_removed() {
    let (a, b) = (TempDir::new("selftest"), TempDir::new("selftest"));
    assert_ne!(a.path(), b.path());
    assert!(a.path().starts_with(std::env::temp_dir()));
    std::fs::create_dir_all(a.path().join("x/y")).unwrap();
    std::fs::write(a.path().join("x/y/f.txt"), b"1").unwrap();
    std::fs::write(a.path().join("g.txt"), b"2").unwrap();
    assert_eq!(
        files_under(a.path()),
        vec![a.path().join("g.txt"), a.path().join("x/y/f.txt")]
    );
    assert!(files_under(&a.path().join("missing")).is_empty());
    let path = a.path().to_owned();
    drop(a);
    if std::env::var_os("HOLOSYNC_KEEP_TEST_DIRS").is_none() {
        assert!(!path.exists());
    }
}

#[test]
fn free_port_is_bindable() {
    let port = free_port();
    assert_ne!(port, 0);
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port is free");
}

#[test]
#[should_panic(expected = "waiting for the impossible")]
fn wait_until_panics_with_message() {
    wait_until("the impossible", Duration::from_millis(60), || false);
}

#[test]
fn wait_until_returns_when_true() {
    let mut n = 0;
    wait_until("third poll", Duration::from_secs(30), || {
        n += 1;
        n >= 3
    });
    // It returned at the first true, not at the deadline.
    assert_eq!(n, 3);
}

#[test]
fn mosquitto_publish_and_subscribe() {
    let broker = Mosquitto::start();
    let sub = broker.subscribe("t/#");
    broker.publish("t/a", b"hello", 1);
    assert_eq!(
        sub.wait_for(|l| l.starts_with("t/a "), Duration::from_secs(30)),
        "t/a hello"
    );

    // Empty payloads go out with -n; mosquitto_sub -v prints "(null)".
    broker.publish("t/empty", b"", 0);
    assert_eq!(
        sub.wait_for(|l| l.starts_with("t/empty"), Duration::from_secs(30)),
        "t/empty (null)"
    );

    // Large payloads go through stdin in one message.
    let big = vec![b'x'; 5 * 1024 * 1024];
    broker.publish("t/big", &big, 1);
    let line = sub.wait_for(|l| l.starts_with("t/big "), Duration::from_secs(60));
    assert_eq!(line.len(), "t/big ".len() + big.len());

    // Binary payloads arrive byte for byte.
    let binary: Vec<u8> = (0u8..=255).filter(|b| *b != b'\n').collect();
    broker.publish("t/bin", &binary, 0);
    wait_until("binary payload", Duration::from_secs(30), || {
        sub.raw()
            .windows(binary.len())
            .any(|w| w == binary.as_slice())
    });
    assert!(broker.log().contains("Received PUBLISH"));
}

#[test]
fn mosquitto_restart_keeps_retained_messages_and_sessions() {
    let mut broker = Mosquitto::start();
    let port = broker.port;
    broker.publish_with("r/x", b"keep", 1, &["-r"]);

    // A persistent session (clean session off) with a QoS 1 subscription...
    let id = format!("persist-{}", unique());
    let sub = broker.subscribe_with("s/q", &["-c", "-i", &id]);
    drop(sub);
    // ...gets a message queued while it is offline.
    broker.publish("s/q", b"queued", 1);

    broker.restart();
    assert_eq!(broker.port, port);
    assert!(broker.is_running());
    assert!(broker.dir().join("mosquitto.db").is_file());

    let retained = broker.subscribe("r/#");
    assert_eq!(
        retained.wait_for(|l| l.starts_with("r/x"), Duration::from_secs(30)),
        "r/x keep"
    );
    let again = broker.subscribe_with("s/q", &["-c", "-i", &id]);
    assert_eq!(
        again.wait_for(|l| l.starts_with("s/q"), Duration::from_secs(30)),
        "s/q queued"
    );
    broker.stop();
    assert!(!broker.is_running());
    assert_eq!(broker.log().matches(" running").count(), 2);
}

#[test]
fn mosquitto_start_with_extra_conf() {
    let broker = Mosquitto::start_with("message_size_limit 10");
    let conf = std::fs::read_to_string(broker.dir().join("mosquitto.conf")).unwrap();
    assert!(conf.contains("message_size_limit 10"));
    assert!(conf.contains(&format!("persistence_location {}/", broker.dir().display())));
    let sub = broker.subscribe("m/#");
    broker.publish("m/big", &[b'y'; 100], 1);
    broker.publish("m/small", b"ok", 1);
    sub.wait_for(|l| l == "m/small ok", Duration::from_secs(30));
    assert!(!sub.lines().iter().any(|l| l.starts_with("m/big")));
}

#[test]
fn http_ok_content_types_404_and_raw_targets() {
    let server = HttpServer::start();
    let (j, p, o) = (jpeg(16, 16, 1), png(16, 16, 1), bytes(1000));
    server.set("/a.jpg", Route::Ok(j.clone()));
    server.set("/b.png", Route::Ok(p.clone()));
    server.set("/c.bin", Route::Ok(o.clone()));
    server.set("/q?x=1%20y&z", Route::Ok(o.clone()));
    assert!(server.url("/a.jpg").starts_with("http://127.0.0.1:"));
    assert!(server.url("/a.jpg").ends_with("/a.jpg"));

    for (target, body, ctype) in [
        ("/a.jpg", &j, "image/jpeg"),
        ("/b.png", &p, "image/png"),
        ("/c.bin", &o, "application/octet-stream"),
        ("/q?x=1%20y&z", &o, "application/octet-stream"),
    ] {
        let r = get(&server, target);
        assert_eq!(r.status_line, "HTTP/1.1 200 OK", "{target}");
        assert_eq!(r.header("content-type"), Some(ctype), "{target}");
        assert_eq!(r.header("connection"), Some("close"));
        assert_eq!(r.content_length(), body.len());
        assert_eq!(&r.body, body);
        assert_eq!(r.error, None);
    }
    let r = get(&server, "/q?x=1 y&z".replace(' ', "%20").as_str());
    assert_eq!(r.status, 200);
    let r = get(&server, "/q");
    assert_eq!(r.status, 404);
    assert_eq!(r.content_length(), r.body.len());
    assert!(!r.body.is_empty());
    assert_eq!(server.hits("/q?x=1%20y&z"), 2);
    assert_eq!(server.hits("/q"), 1);
    assert_eq!(server.hits("/never"), 0);
    assert_eq!(
        server.requests(),
        [
            "/a.jpg",
            "/b.png",
            "/c.bin",
            "/q?x=1%20y&z",
            "/q?x=1%20y&z",
            "/q"
        ]
    );
}

#[test]
fn http_status_html_retry_after_redirect_raw() {
    let server = HttpServer::start();
    server.set("/s", Route::Status(500, b"boom".to_vec()));
    server.set("/h", Route::Html("<html>hi</html>".into()));
    server.set("/r429", Route::RetryAfter(429, 7));
    server.set("/r503", Route::RetryAfter(503, 1));
    server.set("/redir", Route::Redirect(server.url("/h")));
    server.set(
        "/raw",
        Route::Raw(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nno length".to_vec()),
    );

    let r = get(&server, "/s");
    assert_eq!(r.status_line, "HTTP/1.1 500 Internal Server Error");
    assert_eq!((r.content_length(), r.body.as_slice()), (4, &b"boom"[..]));

    let r = get(&server, "/h");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert_eq!(r.body, b"<html>hi</html>");

    let r = get(&server, "/r429");
    assert_eq!(r.status, 429);
    assert_eq!(r.header("retry-after"), Some("7"));
    assert_eq!(r.content_length(), r.body.len());
    let r = get(&server, "/r503");
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("1"));

    let r = get(&server, "/redir");
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some(server.url("/h").as_str()));

    let r = get(&server, "/raw");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-length"), None);
    assert_eq!(r.body, b"no length");
}

#[test]
fn http_short_body_and_reset() {
    let server = HttpServer::start();
    let body = jpeg(64, 64, 9);
    server.set("/short", Route::ShortBody(body.clone(), 100));
    server.set("/reset", Route::Reset(bytes(20_000)));

    let r = get(&server, "/short");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/jpeg"));
    assert_eq!(r.content_length(), body.len());
    assert_eq!(r.body, &body[..100]);
    assert_eq!(r.error, None, "short body ends with a clean EOF");

    let r = get(&server, "/reset");
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), 20_000);
    assert!(r.body.len() <= 10_000, "got {} bytes", r.body.len());
    assert_eq!(r.error, Some(io::ErrorKind::ConnectionReset), "{r:?}");
}

#[test]
fn http_slow_delays_and_ends_early_on_drop() {
    let server = HttpServer::start();
    let body = bytes(10_000);
    server.set(
        "/slow",
        Route::Slow(body.clone(), Duration::from_millis(400)),
    );
    let r = get(&server, "/slow");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, body);
    assert!(r.elapsed >= Duration::from_millis(400), "{:?}", r.elapsed);

    server.set(
        "/forever",
        Route::Slow(body.clone(), Duration::from_secs(60)),
    );
    let rx = get_async(&server, "/forever");
    server.wait_hits("/forever", 1, Duration::from_secs(30));
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    drop(server);
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("slow response ends early when the server drops");
    assert_eq!(r.body, body);
    assert!(r.elapsed < Duration::from_secs(10));
}

#[test]
fn http_sequence_repeats_last_and_resets_on_set() {
    let server = HttpServer::start();
    let body = png(8, 8, 3);
    let seq = Route::Sequence(vec![
        Route::Status(503, b"later".to_vec()),
        Route::ShortBody(body.clone(), 10),
        Route::Ok(body.clone()),
    ]);
    server.set("/seq", seq.clone());
    let got: Vec<(u16, usize)> = (0..5)
        .map(|_| {
            let r = get(&server, "/seq");
            (r.status, r.body.len())
        })
        .collect();
    let n = body.len();
    assert_eq!(got, [(503, 5), (200, 10), (200, n), (200, n), (200, n)]);
    server.set("/seq", seq);
    assert_eq!(get(&server, "/seq").status, 503);
    assert_eq!(server.hits("/seq"), 6);

    server.set("/empty", Route::Sequence(vec![]));
    assert_eq!(get(&server, "/empty").status, 500);
}

#[test]
fn http_hold_until_release_or_drop() {
    let server = HttpServer::start();
    let body = jpeg(32, 32, 4);
    server.set("/hold", Route::Hold(body.clone()));
    let rx = get_async(&server, "/hold");
    server.wait_hits("/hold", 1, Duration::from_secs(30));
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "held request must not be answered before release"
    );
    server.release("/hold");
    let r = rx.recv_timeout(Duration::from_secs(30)).expect("released");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/jpeg"));
    assert_eq!(r.body, body);
    // Release is sticky until the next `set`.
    assert_eq!(get(&server, "/hold").body, body);

    server.set("/hold", Route::Hold(body.clone()));
    let rx = get_async(&server, "/hold");
    server.wait_hits("/hold", 3, Duration::from_secs(30));
    assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
    drop(server);
    let r = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("answered on drop");
    assert_eq!(r.body, body);
}

#[test]
fn tcp_sink_records_bytes() {
    let sink = TcpSink::start();
    let mut a = TcpStream::connect(("127.0.0.1", sink.port)).unwrap();
    a.write_all(b"PWR ON\r").unwrap();
    let text = sink.wait_for(|t| t.contains("PWR ON"), Duration::from_secs(30));
    assert_eq!(text, "PWR ON\r");
    let mut b = TcpStream::connect(("127.0.0.1", sink.port)).unwrap();
    b.write_all(b"INPUT 1\r").unwrap();
    sink.wait_for(|t| t.contains("INPUT 1"), Duration::from_secs(30));
    assert_eq!(sink.connections(), 2);
}

#[test]
fn jpeg_is_valid_deterministic_and_seeded() {
    let a = jpeg(64, 48, 1);
    assert_eq!(&a[..2], &[0xFF, 0xD8], "SOI");
    assert_eq!(&a[a.len() - 2..], &[0xFF, 0xD9], "EOI");
    assert_eq!(a, jpeg(64, 48, 1));
    assert_ne!(a, jpeg(64, 48, 2));
    let mut decoder = jpeg_decoder::Decoder::new(a.as_slice());
    let pixels = decoder.decode().expect("decodes");
    let info = decoder.info().unwrap();
    assert_eq!((info.width, info.height), (64, 48));
    assert_eq!(pixels.len(), 64 * 48 * 3);
}

#[test]
fn png_is_valid_deterministic_and_seeded() {
    let a = png(40, 30, 1);
    assert_eq!(a, png(40, 30, 1));
    assert_ne!(a, png(40, 30, 2));
    let decoder = png::Decoder::new(a.as_slice());
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let frame = reader.next_frame(&mut buf).expect("png data");
    assert_eq!((frame.width, frame.height), (40, 30));
    assert_eq!(frame.color_type, png::ColorType::Rgb);
    assert_eq!(frame.bit_depth, png::BitDepth::Eight);
    assert_eq!(frame.buffer_size(), 40 * 30 * 3);
}

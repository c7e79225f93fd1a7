//! End-to-end tests of HTTP framing against hostile servers: a raw-socket
//! server written for this test (127.0.0.1, port 0) answers each path with
//! bytes the test chose, byte by byte, and the real agent fetches them.
//! Each case asserts the queue row's state (`done`, `retry` for a transient
//! failure, `failed` for a permanent one), the bytes at the final path, and
//! the reason.
//!
//! The cases are the ways a picture was stored cut short or a valid one
//! failed (each fails on the code before the strict framing; see the
//! README), and the rules that already held, kept by the same table.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{agent_with, Agent, Mosquitto, TempDir};
use serde_json::json;

/// Generous deadline for anything that should happen "soon" on a busy machine.
const WAIT: Duration = Duration::from_secs(180);

/// The agent's stall limit (download.timeout_secs) in these tests.
const STALL_SECS: u64 = 5;

/// The agent's cap on one attempt (download.max_secs) in these tests.
const MAX_SECS: u64 = 8;

/// What the server does, in order, after reading a request for a path.
#[derive(Clone, Debug)]
enum Act {
    /// Writes these bytes.
    Send(Vec<u8>),
    /// Waits this long.
    Pause(Duration),
    /// Writes one byte every interval until the client goes away (or a
    /// minute passes): a slowloris that never stalls.
    Trickle(Vec<u8>, Duration),
    /// Keeps the connection open and reads the next request on it (without
    /// this, the server closes the connection after the last act).
    KeepOpen,
}

/// A server on 127.0.0.1 that answers each path with a script of raw bytes
/// and records every request it reads.
struct RawServer {
    /// Its port.
    port: u16,
    /// The scripts, by request path.
    routes: Arc<Mutex<HashMap<String, Vec<Act>>>>,
    /// Every request head read, in order, with the connection's number.
    requests: Arc<Mutex<Vec<(usize, String)>>>,
}

impl RawServer {
    fn start() -> RawServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("bound").port();
        let routes: Arc<Mutex<HashMap<String, Vec<Act>>>> = Arc::default();
        let requests: Arc<Mutex<Vec<(usize, String)>>> = Arc::default();
        let (r, q) = (routes.clone(), requests.clone());
        std::thread::spawn(move || {
            for (n, stream) in listener.incoming().flatten().enumerate() {
                let (r, q) = (r.clone(), q.clone());
                std::thread::spawn(move || serve(stream, n, &r, &q));
            }
        });
        RawServer {
            port,
            routes,
            requests,
        }
    }

    /// `http://127.0.0.1:<port><path>`.
    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn set(&self, path: &str, acts: Vec<Act>) {
        self.routes.lock().unwrap().insert(path.to_string(), acts);
    }

    /// The request heads read so far, with their connection's number.
    fn requests(&self) -> Vec<(usize, String)> {
        self.requests.lock().unwrap().clone()
    }
}

/// Serves one connection: a request, its path's script, and again while
/// the script ends in [`Act::KeepOpen`].
fn serve(
    mut stream: TcpStream,
    n: usize,
    routes: &Mutex<HashMap<String, Vec<Act>>>,
    requests: &Mutex<Vec<(usize, String)>>,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    loop {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return,
            }
        }
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split(' ').nth(1).unwrap_or_default().to_string();
        requests.lock().unwrap().push((n, head));
        let acts = routes
            .lock()
            .unwrap()
            .get(&path)
            .cloned()
            .unwrap_or_else(|| {
                vec![Act::Send(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec(),
                )]
            });
        let mut keep_open = false;
        for act in acts {
            keep_open = false;
            match act {
                Act::Send(bytes) => {
                    if stream.write_all(&bytes).is_err() {
                        return;
                    }
                }
                Act::Pause(d) => std::thread::sleep(d),
                Act::Trickle(bytes, every) => {
                    let end = Instant::now() + Duration::from_secs(60);
                    for b in bytes.iter().cycle() {
                        if Instant::now() > end || stream.write_all(&[*b]).is_err() {
                            return;
                        }
                        std::thread::sleep(every);
                    }
                }
                Act::KeepOpen => keep_open = true,
            }
        }
        if !keep_open {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
    }
}

/// A GIF89a of exactly `len` bytes: a global and a local colour table, one
/// 2x2 image (real LZW data: holosync decodes it), a comment extension that
/// fills it out, the trailer.
fn gif(len: usize) -> Vec<u8> {
    let lzw = weezl::encode::Encoder::new(weezl::BitOrder::Lsb, 2)
        .encode(&[0, 1, 2, 3])
        .expect("LZW-encode 4 pixels");
    let fixed = 13 + 6 + 10 + 12 + 1 + (1 + lzw.len() + 1) + 3 + 1;
    let text = (0..len)
        .find(|d| fixed + d + d.div_ceil(255) == len)
        .expect("a GIF of this length can be made");
    let mut g = b"GIF89a\x02\x00\x02\x00\x80\x00\x00".to_vec();
    g.extend([0u8; 6]);
    g.extend(b"\x2c\x00\x00\x00\x00\x02\x00\x02\x00\x81");
    g.extend([0u8; 12]);
    g.push(2);
    g.push(lzw.len() as u8);
    g.extend(&lzw);
    g.push(0);
    g.extend(b"\x21\xfe");
    for chunk in vec![b'x'; text].chunks(255) {
        g.push(chunk.len() as u8);
        g.extend(chunk);
    }
    g.extend(b"\x00\x3b");
    assert_eq!(g.len(), len);
    g
}

/// `body` in chunks of `size` bytes, with the last chunk.
fn chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for c in body.chunks(size) {
        out.extend(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend(c);
        out.extend(b"\r\n");
    }
    out.extend(b"0\r\n\r\n");
    out
}

/// `head` then `body`, as one write.
fn reply(head: &str, body: &[u8]) -> Vec<Act> {
    let mut bytes = head.as_bytes().to_vec();
    bytes.extend(body);
    vec![Act::Send(bytes)]
}

/// What a case expects of its queue row.
struct Expect {
    /// `done`, `retry` or `failed`.
    state: &'static str,
    /// The file at the final path (None: nothing there).
    file: Option<Vec<u8>>,
    /// A part of the row's last error ("" for a done row).
    reason: &'static str,
}

fn stored(bytes: &[u8]) -> Expect {
    Expect {
        state: "done",
        file: Some(bytes.to_vec()),
        reason: "",
    }
}

fn refused(state: &'static str, reason: &'static str) -> Expect {
    Expect {
        state,
        file: None,
        reason,
    }
}

/// Fast and patient at once: downloads start back to back, a transient
/// failure waits ten minutes (so its row stays `retry` after one attempt).
fn config() -> serde_json::Value {
    json!({"download": {"interval_ms": 0, "timeout_secs": STALL_SECS, "max_secs": MAX_SECS,
                        "max_attempts": 100, "retry_base_ms": 600_000, "retry_max_ms": 600_000}})
}

/// Asserts each case's state, bytes on disk and reason; all failures at once.
fn check(
    agent: &Agent,
    rows: &HashMap<String, (String, i64, String)>,
    cases: &[(String, String, Expect)],
) {
    let mut wrong = Vec::new();
    for (name, url, want) in cases {
        let (state, _, reason) = &rows[url];
        let local = url
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('/'))
            .expect("a path")
            .1;
        let file = std::fs::read(agent.cache().join(Path::new(local))).ok();
        if state != want.state || file != want.file || !reason.contains(want.reason) {
            wrong.push(format!(
                "{name}: state {state} (want {}), file {:?} bytes (want {:?}), reason {reason:?} (want {:?})",
                want.state,
                file.as_ref().map(Vec::len),
                want.file.as_ref().map(Vec::len),
                want.reason
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{}\n{}",
        wrong.join("\n"),
        agent.diagnostics()
    );
}

/// The framing table: each hostile or unusual response, one URL each, all
/// fetched by one agent; the state, the bytes on disk and the reason of
/// every row are what the rules say.
#[test]
fn framing_table_stores_only_whole_bodies_and_says_why() {
    let broker = Mosquitto::start();
    let server = RawServer::start();
    let dir = TempDir::new("http-framing");
    let pic = gif(2105);
    let len = pic.len();
    let ok_head =
        format!("HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nContent-Length: {len}\r\n\r\n");
    let mut cases: Vec<(&str, Vec<Act>, Expect)> = vec![
        // 1. A body without a length, cut: on plain HTTP a close looks like
        // the end, so only a file that proves itself whole is stored.
        (
            "close-cut.gif",
            reply("HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nConnection: close\r\n\r\n", &pic[..400]),
            refused("retry", "the GIF ends before its trailer"),
        ),
        (
            "http10-cut.gif",
            reply("HTTP/1.0 200 OK\r\nContent-Type: image/gif\r\n\r\n", &pic[..400]),
            refused("retry", "cut short: the body had no length"),
        ),
        (
            "close-whole.gif",
            reply("HTTP/1.0 200 OK\r\nContent-Type: image/gif\r\n\r\n", &pic),
            stored(&pic),
        ),
        (
            "close-text.bin",
            reply("HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", b"some bytes of no known kind"),
            refused("failed", "can show it is whole"),
        ),
        // identity is no coding: the Content-Length still counts.
        (
            "te-identity.gif",
            reply(&format!("HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: {len}\r\n\r\n"), &pic[..300]),
            refused("retry", "got 300 of 2105 bytes"),
        ),
        (
            "te-chunked-gzip.gif",
            reply("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\nConnection: close\r\n\r\n", &chunked(&pic, 500)),
            refused("retry", "unsupported Transfer-Encoding \"chunked, gzip\""),
        ),
        // 3. A content coding nobody asked for is never stored.
        (
            "content-gzip.gif",
            reply(
                "HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nContent-Encoding: gzip\r\nContent-Length: 23\r\n\r\n",
                b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03GIF-ish-bytes",
            ),
            refused("retry", "Content-Encoding \"gzip\""),
        ),
        // 4. A chunked body without its last chunk is a cut.
        (
            "chunked-no-last.gif",
            reply("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", &{
                let mut c = chunked(&pic, 1000);
                c.truncate(c.len() - 5);
                c
            }),
            refused("retry", "closed inside the chunked body"),
        ),
        // 5. Smaller ones.
        (
            "dir/redirect.gif",
            reply("HTTP/1.1 302 Found\r\nLocation: sub/../moved.gif\r\nContent-Length: 0\r\n\r\n", b""),
            stored(&pic),
        ),
        ("dir/moved.gif", reply(&ok_head, &pic), stored(&pic)),
        (
            "many-headers.gif",
            reply(
                &format!(
                    "HTTP/1.1 200 OK\r\n{}Content-Length: {len}\r\n\r\n",
                    (0..150).map(|i| format!("X-Pad-{i}: v\r\n")).collect::<String>()
                ),
                &pic,
            ),
            stored(&pic),
        ),
        (
            "plus-length.gif",
            reply(&format!("HTTP/1.1 200 OK\r\nContent-Length: +{len}\r\n\r\n"), &pic),
            refused("failed", "invalid Content-Length \"+2105\""),
        ),
        ("plus-port.gif", reply(&ok_head, &pic), refused("failed", "invalid port \"+")),
        // Rules that already held.
        (
            "chunk-overflow.gif",
            reply("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"1ffffffffffffffff\r\nGIF89a\r\n0\r\n\r\n"),
            refused("retry", "invalid chunk size"),
        ),
        (
            "chunk-extensions.gif",
            reply("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n", &{
                let mut c = Vec::new();
                for part in pic.chunks(700) {
                    c.extend(format!("{:x};name=\"v;x\" ; q\r\n", part.len()).as_bytes());
                    c.extend(part);
                    c.extend(b"\r\n");
                }
                c.extend(b"0;last\r\nX-Sum: 1\r\nX-More: 2\r\n\r\n");
                c
            }),
            stored(&pic),
        ),
        (
            "chunked-and-length.gif",
            reply(&format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n", len + 1000), &chunked(&pic, 999)),
            stored(&pic),
        ),
        (
            "conflicting-length.gif",
            reply(&format!("HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nContent-Length: {}\r\n\r\n", len + 1), &pic),
            refused("failed", "conflicting Content-Length"),
        ),
        (
            "informational.gif",
            reply(
                &format!("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n{ok_head}"),
                &pic,
            ),
            stored(&pic),
        ),
        (
            "bare-lf.gif",
            reply(&format!("HTTP/1.1 200 OK\nContent-Type: image/gif\nContent-Length: {len}\n\n"), &pic),
            stored(&pic),
        ),
        (
            "obs-fold.gif",
            reply(&format!("HTTP/1.1 200 OK\r\nX-Folded: a\r\n b\r\nContent-Length:\r\n {len}\r\n\r\n"), &pic),
            stored(&pic),
        ),
        (
            "slowloris-body.gif",
            vec![
                Act::Send(ok_head.clone().into_bytes()),
                Act::Trickle(pic.clone(), Duration::from_millis(300)),
            ],
            refused("retry", "(download.max_secs)"),
        ),
        (
            "slowloris-head.gif",
            vec![
                Act::Send(b"HTTP/1.1 200 OK\r\nX-Slow: ".to_vec()),
                Act::Trickle(b"a".to_vec(), Duration::from_millis(300)),
            ],
            refused("retry", "(download.max_secs)"),
        ),
    ];
    let mut table = Vec::new();
    for (name, acts, want) in cases.drain(..) {
        let path = format!("/f/{name}");
        server.set(&path, acts);
        let url = if name == "plus-port.gif" {
            format!("http://127.0.0.1:+{}{path}", server.port)
        } else {
            server.url(&path)
        };
        table.push((name.to_string(), url, want));
    }
    let agent = agent_with(dir.path(), &broker, config());
    let urls: Vec<String> = table.iter().map(|(_, u, _)| u.clone()).collect();
    for url in &urls {
        broker.publish("sync", url.as_bytes(), 1);
    }
    let rows = agent.wait_tried(&urls, WAIT);
    check(&agent, &rows, &table);
    // Nothing but identity was accepted, and the redirect's dot segments
    // were removed before it was followed.
    let requests = server.requests();
    assert!(
        requests
            .iter()
            .all(|(_, h)| h.contains("\r\nAccept-Encoding: identity\r\n")),
        "{requests:#?}"
    );
    assert!(
        requests.iter().all(|(_, h)| !h.contains("sub/..")),
        "{requests:#?}"
    );
}

/// A server that double-frames a response (a stray `0\r\n\r\n` 50 ms after
/// a chunked body) on a kept-alive connection: the next picture, asked for
/// on that connection, reads the stray bytes first; the agent dials again
/// once instead of failing the valid picture.
#[test]
fn stray_bytes_on_a_kept_alive_connection_do_not_fail_the_next_picture() {
    let broker = Mosquitto::start();
    let server = RawServer::start();
    let dir = TempDir::new("http-stray");
    let (first, second) = (gif(2105), gif(3000));
    let mut acts = reply(
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        &chunked(&first, 1000),
    );
    acts.extend([
        Act::Pause(Duration::from_millis(50)),
        Act::Send(b"0\r\n\r\n".to_vec()),
        Act::KeepOpen,
    ]);
    server.set("/k/first.gif", acts);
    let mut acts = reply(
        &format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            second.len()
        ),
        &second,
    );
    acts.push(Act::KeepOpen);
    server.set("/k/second.gif", acts);
    let agent = agent_with(dir.path(), &broker, config());
    let urls = [server.url("/k/first.gif"), server.url("/k/second.gif")];
    // One message: the second download starts while the first's connection idles.
    broker.publish("sync", urls.join(",").as_bytes(), 1);
    let rows = agent.wait_tried(&urls, WAIT);
    let table = vec![
        ("first".to_string(), urls[0].clone(), stored(&first)),
        ("second".to_string(), urls[1].clone(), stored(&second)),
    ];
    check(&agent, &rows, &table);
    // The second picture was asked for on the kept connection and on a new
    // one (the server may record the two in either order: the first
    // connection's thread reads its request only after writing the stray bytes).
    let mut seconds: Vec<usize> = server
        .requests()
        .iter()
        .filter(|(_, h)| h.starts_with("GET /k/second.gif "))
        .map(|(n, _)| *n)
        .collect();
    seconds.sort_unstable();
    assert_eq!(seconds, vec![0, 1], "{:#?}", server.requests());
}

//! End-to-end tests of TLS: a real mosquitto with a TLS listener, an HTTPS
//! image server (rustls, in this test), and a private CA with server and
//! client certificates made by the `openssl` CLI for each test. The agent
//! must sync over MQTT-TLS with `mqtt.ca_file`, refuse a broker whose
//! certificate it cannot trust (one clear line per attempt), present its
//! client certificate where the broker wants one, and fetch from an HTTPS
//! server of the private CA with `download.ca_file`.
//!
//! Without `openssl` these tests fail (they do not skip): CI installs it.
#![cfg(feature = "tls")]

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{
    free_port, jpeg, merge, poll_until, run_bounded, Agent, HttpServer, Mosquitto, Route, TempDir,
};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);

/// openssl's config for the test PKI: a CA, a server certificate for
/// 127.0.0.1 and localhost, a client certificate.
const PKI_CNF: &str = "[req]\ndistinguished_name=dn\n[dn]\n\
[ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\n\
[server]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n\
[client]\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n";

/// Runs `openssl` in `dir`, panicking (not skipping) if it is missing or fails.
fn openssl(dir: &Path, args: &[&str]) {
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir).args(args);
    let out = run_bounded(cmd, None, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "openssl {} failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA with its certificates, as PEM files in a temp dir:
/// `<name>.pem` and `<name>.key` for `ca`, `server`, `client`, and a second,
/// unrelated CA `other-ca.pem`.
struct Pki {
    /// Holds the files.
    dir: TempDir,
}

impl Pki {
    fn make() -> Pki {
        assert!(
            Command::new("openssl").arg("version").output().is_ok(),
            "these tests need the openssl CLI (apt install openssl)"
        );
        let dir = TempDir::new("holosync-pki");
        let d = dir.path();
        fs::write(d.join("pki.cnf"), PKI_CNF).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let (key, pem, subj) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN=holosync test {ca}"),
            );
            let mut args = vec!["req", "-x509"];
            args.extend(ec);
            args.extend(["-keyout", &key, "-out", &pem, "-days", "3", "-subj", &subj]);
            args.extend(["-config", "pki.cnf", "-extensions", "ca"]);
            openssl(d, &args);
        }
        for (name, cn) in [("server", "localhost"), ("client", "holosync-kiosk")] {
            let (key, csr, pem, subj) = (
                format!("{name}.key"),
                format!("{name}.csr"),
                format!("{name}.pem"),
                format!("/CN={cn}"),
            );
            let mut args = vec!["req"];
            args.extend(ec);
            args.extend([
                "-keyout", &key, "-out", &csr, "-subj", &subj, "-config", "pki.cnf",
            ]);
            openssl(d, &args);
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "3",
                    "-extfile",
                    "pki.cnf",
                    "-extensions",
                    name,
                ],
            );
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Copies `names` into the agent's folder, so the config names them
    /// relative to it (the same under Wine, where Unix paths mean nothing).
    fn copy_to(&self, agent_dir: &Path, names: &[&str]) {
        fs::create_dir_all(agent_dir).unwrap();
        for n in names {
            fs::copy(self.path(n), agent_dir.join(n)).unwrap();
        }
    }
}

/// A broker with its usual plain listener (the tests publish there) and a TLS
/// listener on `tls_port` with the test CA's server certificate.
fn tls_broker(pki: &Pki, require_client_cert: bool) -> (Mosquitto, u16) {
    let tls_port = free_port();
    let conf = format!(
        "listener {tls_port} 127.0.0.1\n\
         cafile {}\n\
         certfile {}\n\
         keyfile {}\n\
         require_certificate {require_client_cert}\n",
        pki.path("ca.pem").display(),
        pki.path("server.pem").display(),
        pki.path("server.key").display(),
    );
    (Mosquitto::start_with(&conf), tls_port)
}

/// An agent on the broker's TLS port with `patch` merged into its `mqtt` section.
fn tls_agent(dir: &Path, tls_port: u16, mqtt: Value) -> Agent {
    let mut config = Agent::default_config(tls_port);
    merge(&mut config, json!({ "mqtt": { "tls": true } }));
    merge(&mut config, json!({ "mqtt": mqtt }));
    let mut agent = Agent::new(dir, config);
    agent.start();
    agent
}

/// The agent trusts the private CA from `mqtt.ca_file`, connects over TLS
/// (the name checked is 127.0.0.1) and syncs a picture.
#[test]
fn agent_syncs_over_mqtt_tls_with_a_private_ca() {
    let pki = Pki::make();
    let (broker, tls_port) = tls_broker(&pki, false);
    let http = HttpServer::start();
    let picture = jpeg(32, 24, 7);
    http.set("/works/1/a.jpg", Route::Ok(picture.clone()));
    let dir = TempDir::new("tls-mqtt");
    pki.copy_to(dir.path(), &["ca.pem"]);
    let agent = tls_agent(dir.path(), tls_port, json!({ "ca_file": "ca.pem" }));
    agent.wait_log("subscribed to", WAIT);
    assert!(
        agent
            .log()
            .contains(&format!("connected to broker 127.0.0.1:{tls_port}")),
        "{}",
        agent.diagnostics()
    );
    broker.publish("sync", http.url("/works/1/a.jpg").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(
        fs::read(agent.cache().join("works/1/a.jpg")).unwrap(),
        picture
    );
}

/// A broker certificate from a CA the agent does not trust is refused: one
/// clear line per attempt names the broker and the reason, the agent keeps
/// running and trying (paced by its backoff), and nothing is synced.
#[test]
fn broker_with_an_untrusted_ca_is_refused_with_a_clear_line() {
    let pki = Pki::make();
    let (_broker, tls_port) = tls_broker(&pki, false);
    let dir = TempDir::new("tls-wrong-ca");
    pki.copy_to(dir.path(), &["other-ca.pem"]);
    let mut agent = tls_agent(dir.path(), tls_port, json!({ "ca_file": "other-ca.pem" }));
    let line = format!(
        "could not connect to broker 127.0.0.1:{tls_port}: TLS handshake failed: invalid peer certificate: UnknownIssuer"
    );
    let two_attempts = poll_until(WAIT, || agent.log().matches(&line).count() >= 2);
    assert!(
        two_attempts,
        "expected {line:?} twice\n{}",
        agent.diagnostics()
    );
    assert!(agent.is_running(), "{}", agent.diagnostics());
    let log = agent.log();
    assert!(!log.contains("connected to broker"), "{log}");
    assert!(!log.contains("subscribed to"), "{log}");
}

/// A listener with `require_certificate true` accepts the client certificate
/// and key named by `mqtt.client_cert` and `mqtt.client_key`.
#[test]
fn client_certificate_broker_accepts_the_configured_certificate() {
    let pki = Pki::make();
    let (broker, tls_port) = tls_broker(&pki, true);
    let http = HttpServer::start();
    let picture = jpeg(20, 20, 3);
    http.set("/c.jpg", Route::Ok(picture.clone()));
    let dir = TempDir::new("tls-client-cert");
    pki.copy_to(dir.path(), &["ca.pem", "client.pem", "client.key"]);
    let agent = tls_agent(
        dir.path(),
        tls_port,
        json!({ "ca_file": "ca.pem", "client_cert": "client.pem", "client_key": "client.key" }),
    );
    agent.wait_log("subscribed to", WAIT);
    broker.publish("sync", http.url("/c.jpg").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(fs::read(agent.cache().join("c.jpg")).unwrap(), picture);
}

/// A missing CA file is a config error at start-up naming the key: the agent
/// exits with code 2 and says so.
#[test]
fn missing_ca_file_is_a_config_error_naming_the_key() {
    let dir = TempDir::new("tls-missing-ca");
    let mut config = Agent::default_config(free_port());
    merge(
        &mut config,
        json!({ "mqtt": { "tls": true, "ca_file": "nowhere.pem" } }),
    );
    let agent = Agent::new(dir.path(), config);
    let out = agent.run(&["check"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("key `mqtt.ca_file`") && stderr.contains("nowhere.pem"),
        "{stderr}"
    );
}

/// An HTTPS server whose certificate the test CA signed: the picture is
/// fetched with `download.ca_file`, and refused without it.
#[test]
fn https_image_server_of_a_private_ca_works_with_download_ca_file() {
    let pki = Pki::make();
    let picture = jpeg(40, 30, 9);
    let port = https_server(&pki, picture.clone());
    let url = format!("https://127.0.0.1:{port}/works/2/h.jpg!preview");
    let broker = Mosquitto::start();

    let trusted = TempDir::new("tls-https");
    pki.copy_to(trusted.path(), &["ca.pem"]);
    let mut config = Agent::default_config(broker.port);
    merge(&mut config, json!({ "download": { "ca_file": "ca.pem" } }));
    let mut agent = Agent::new(trusted.path(), config);
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    broker.publish("sync", url.as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(
        fs::read(agent.cache().join("works/2/h.jpg!preview")).unwrap(),
        picture
    );

    let untrusted = TempDir::new("tls-https-untrusted");
    let mut plain = Agent::new(untrusted.path(), Agent::default_config(broker.port));
    plain.start();
    plain.wait_log("subscribed to", WAIT);
    broker.publish("sync", url.as_bytes(), 1);
    plain.wait_log("UnknownIssuer", WAIT);
    assert!(files_none(&plain.cache()), "{}", plain.diagnostics());
}

fn files_none(dir: &Path) -> bool {
    common::files_under(dir).is_empty()
}

/// An HTTPS/1.1 server on 127.0.0.1 (rustls with the test CA's server
/// certificate) that answers every request with `body` as a JPEG; returns its port.
fn https_server(pki: &Pki, body: Vec<u8>) -> u16 {
    let mut reply = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    reply.extend(body);
    https_raw(pki, move |_| (reply.clone(), true))
}

/// An HTTPS server on 127.0.0.1 (rustls with the test CA's server
/// certificate) that writes the raw bytes `answer` gives for a request's
/// path, then closes the connection, with a TLS close_notify first if
/// `answer` says so; returns its port.
fn https_raw(pki: &Pki, answer: impl Fn(&str) -> (Vec<u8>, bool) + Send + Sync + 'static) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(pki.path("server.pem"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let config = Arc::new(config);
    let answer = Arc::new(answer);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let config = config.clone();
            let answer = answer.clone();
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let conn = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, stream);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match tls.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let (reply, close_notify) = answer(head.split(' ').nth(1).unwrap_or_default());
                let _ = tls.write_all(&reply);
                if close_notify {
                    tls.conn.send_close_notify();
                }
                let _ = tls.flush();
            });
        }
    });
    port
}

/// A GIF89a of a few hundred bytes: a 300-byte comment, then one pixel of
/// real LZW data (holosync decodes it).
fn gif() -> Vec<u8> {
    let mut g = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff\x21\xfe".to_vec();
    for _ in 0..3 {
        g.push(100);
        g.extend([b'x'; 100]);
    }
    g.push(0);
    g.extend(b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02\x44\x01\x00\x3b");
    g
}

/// An agent trusting the test CA (`download.ca_file`), with `download`
/// merged into its download settings; transient failures wait ten minutes,
/// so a row's first verdict stays in place.
fn https_agent(dir: &Path, pki: &Pki, broker: &Mosquitto, download: Value) -> Agent {
    pki.copy_to(dir, &["ca.pem"]);
    let mut config = Agent::default_config(broker.port);
    merge(
        &mut config,
        json!({ "download": { "ca_file": "ca.pem", "interval_ms": 0, "max_attempts": 100,
                              "retry_base_ms": 600_000, "retry_max_ms": 600_000 } }),
    );
    merge(&mut config, json!({ "download": download }));
    let mut agent = Agent::new(dir, config);
    agent.start();
    agent.wait_log("subscribed to", WAIT);
    agent
}

/// A body without a length over HTTPS ends only with the server's
/// close_notify: with it the picture is stored, and a TCP close without it
/// (what an attacker on the path can do) is a transient failure, the file
/// not stored.
#[test]
fn https_body_without_length_needs_close_notify() {
    let pki = Pki::make();
    let picture = gif();
    let body = picture.clone();
    let port = https_raw(&pki, move |path| {
        let mut reply =
            b"HTTP/1.1 200 OK\r\nContent-Type: image/gif\r\nConnection: close\r\n\r\n".to_vec();
        reply.extend(&body);
        (reply, path == "/notify.gif")
    });
    let broker = Mosquitto::start();
    let dir = TempDir::new("tls-close-notify");
    let agent = https_agent(dir.path(), &pki, &broker, json!({}));
    let urls = ["/notify.gif", "/cut.gif"].map(|p| format!("https://127.0.0.1:{port}{p}"));
    for url in &urls {
        broker.publish("sync", url.as_bytes(), 1);
    }
    let rows = agent.wait_tried(&urls, WAIT);
    let (state, _, reason) = &rows[&urls[0]];
    assert_eq!(state, "done", "{reason}\n{}", agent.diagnostics());
    assert_eq!(fs::read(agent.cache().join("notify.gif")).unwrap(), picture);
    let (state, _, reason) = &rows[&urls[1]];
    assert_eq!(state, "retry", "{reason}\n{}", agent.diagnostics());
    assert!(reason.contains("without close_notify"), "{reason}");
    assert!(!agent.cache().join("cut.gif").exists());
}

/// An https page redirecting to http is refused (permanently, with the
/// reason) and the http server is never asked.
#[test]
fn https_to_http_redirect_is_refused() {
    let pki = Pki::make();
    let http = HttpServer::start();
    http.set("/plain.jpg", Route::Ok(jpeg(32, 24, 3)));
    let target = http.url("/plain.jpg");
    let port = https_raw(&pki, move |_| {
        let reply =
            format!("HTTP/1.1 302 Found\r\nLocation: {target}\r\nContent-Length: 0\r\n\r\n");
        (reply.into_bytes(), true)
    });
    let broker = Mosquitto::start();
    let dir = TempDir::new("tls-downgrade");
    let agent = https_agent(dir.path(), &pki, &broker, json!({}));
    let url = format!("https://127.0.0.1:{port}/secure.jpg");
    broker.publish("sync", url.as_bytes(), 1);
    let rows = agent.wait_tried(std::slice::from_ref(&url), WAIT);
    let (state, _, reason) = &rows[&url];
    assert_eq!(state, "failed", "{reason}\n{}", agent.diagnostics());
    assert!(
        reason.contains("refused a redirect from https to http"),
        "{reason}"
    );
    assert_eq!(http.hits("/plain.jpg"), 0);
    assert!(files_none(&agent.cache()), "{}", agent.diagnostics());
}

/// A TLS handshake that trickles in (100 bytes every 700 ms through a
/// proxy, far longer in all than the 3 s stall limit, no gap near it) is
/// progress, not a stall: the picture arrives.
#[test]
fn a_tls_handshake_trickling_in_is_not_a_stall() {
    let pki = Pki::make();
    let picture = jpeg(40, 30, 9);
    let server = https_server(&pki, picture.clone());
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = proxy.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for client in proxy.incoming().flatten() {
            let Ok(upstream) = TcpStream::connect(("127.0.0.1", server)) else {
                return;
            };
            let (mut c_in, mut u_out) =
                (client.try_clone().unwrap(), upstream.try_clone().unwrap());
            std::thread::spawn(move || std::io::copy(&mut c_in, &mut u_out));
            let (mut u_in, mut c_out) = (upstream, client);
            std::thread::spawn(move || {
                // The first 2,000 bytes (the server's whole handshake) in
                // pieces, then the rest as it comes.
                let mut trickled = 0;
                let mut buf = [0u8; 100];
                while trickled < 2000 {
                    match u_in.read(&mut buf) {
                        Ok(n) if n > 0 => {
                            if c_out.write_all(&buf[..n]).is_err() {
                                return;
                            }
                            trickled += n;
                            std::thread::sleep(Duration::from_millis(700));
                        }
                        _ => return,
                    }
                }
                let _ = std::io::copy(&mut u_in, &mut c_out);
            });
        }
    });
    let broker = Mosquitto::start();
    let dir = TempDir::new("tls-trickle");
    let agent = https_agent(dir.path(), &pki, &broker, json!({ "timeout_secs": 3 }));
    let url = format!("https://127.0.0.1:{port}/slow.jpg");
    broker.publish("sync", url.as_bytes(), 1);
    let rows = agent.wait_tried(std::slice::from_ref(&url), WAIT);
    let (state, _, reason) = &rows[&url];
    assert_eq!(state, "done", "{reason}\n{}", agent.diagnostics());
    assert_eq!(fs::read(agent.cache().join("slow.jpg")).unwrap(), picture);
}

/// HTTPS behind a venue's proxy (`HTTPS_PROXY` in the environment): the
/// agent asks the proxy for a tunnel (`CONNECT localhost:<port>`, a name the
/// proxy resolves), speaks TLS to the origin inside it, checks the
/// certificate against `download.ca_file` and the name `localhost`, and
/// stores the picture.
#[test]
fn https_goes_through_the_proxy_tunnel_with_download_ca_file() {
    let pki = Pki::make();
    let picture = jpeg(30, 20, 4);
    let port = https_server(&pki, picture.clone());
    let proxy = common::TestProxy::start(&["localhost"], Some(("kiosk", "pw")));
    let broker = Mosquitto::start();
    let dir = TempDir::new("tls-https-proxy");
    pki.copy_to(dir.path(), &["ca.pem"]);
    let mut config = Agent::default_config(broker.port);
    merge(&mut config, json!({ "download": { "ca_file": "ca.pem" } }));
    let mut agent = Agent::new(dir.path(), config);
    agent.start_with_env(&[("HTTPS_PROXY", &proxy.url(Some(("kiosk", "pw"))))]);
    agent.wait_log("subscribed to", WAIT);
    broker.publish(
        "sync",
        format!("https://localhost:{port}/venue/t.jpg").as_bytes(),
        1,
    );
    agent.wait_done(1, WAIT);
    assert_eq!(
        fs::read(agent.cache().join("venue/t.jpg")).unwrap(),
        picture
    );
    let seen = proxy.seen();
    assert!(
        seen.requests
            .iter()
            .any(|r| r.starts_with(&format!("CONNECT localhost:{port} "))),
        "{seen:?}"
    );
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "proxy none for http, http://kiosk:****@127.0.0.1:{} for https (from the environment)",
            proxy.port
        )),
        "{log}"
    );
    assert!(!log.contains(":pw@"), "{log}");
}

/// MQTT over WebSockets over TLS (`"transport": "wss"`) to RabbitMQ's Web
/// MQTT TLS listener with the test CA's server certificate: the broker is
/// checked against `mqtt.ca_file` and the name `localhost`, and a sync
/// message arrives; with a CA the agent does not trust, the line says why.
#[test]
fn wss_to_rabbitmq_with_a_private_ca() {
    let pki = Pki::make();
    // The broker runs as its own user: give it copies it can read.
    let served = TempDir::new("tls-wss-broker");
    for name in ["server.pem", "server.key"] {
        fs::copy(pki.path(name), served.path().join(name)).unwrap();
        let mut perm = fs::metadata(served.path().join(name))
            .unwrap()
            .permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o644);
        fs::set_permissions(served.path().join(name), perm).unwrap();
    }
    let (rabbit, wss_port) = match common::RabbitWebMqtt::start_tls(
        &served.path().join("server.pem"),
        &served.path().join("server.key"),
    ) {
        Ok(r) => r,
        Err(why) => {
            common::cannot_run(&why);
            return;
        }
    };
    let http = HttpServer::start();
    let picture = jpeg(12, 12, 5);
    http.set("/wss/p.jpg", Route::Ok(picture.clone()));
    let wss = |dir: &TempDir, ca: &str| {
        pki.copy_to(dir.path(), &[ca]);
        let mut config = Agent::default_config(wss_port);
        merge(
            &mut config,
            json!({"mqtt": {"host": "localhost", "transport": "wss", "ws_path": "/ws",
                            "ca_file": ca, "username": "guest", "password": "guest"}}),
        );
        let mut agent = Agent::new(dir.path(), config);
        agent.start();
        agent
    };
    let dir = TempDir::new("tls-wss");
    let agent = wss(&dir, "ca.pem");
    agent.wait_log("subscribed to", WAIT);
    assert!(agent.log().contains(&format!(
        "connected to broker wss://localhost:{wss_port}/ws"
    )));
    rabbit
        .endpoint
        .publish("sync", http.url("/wss/p.jpg").as_bytes(), 1);
    agent.wait_done(1, WAIT);
    assert_eq!(fs::read(agent.cache().join("wss/p.jpg")).unwrap(), picture);
    drop(agent);

    let dir = TempDir::new("tls-wss-untrusted");
    let agent = wss(&dir, "other-ca.pem");
    let log = agent.wait_log("could not connect to broker", WAIT);
    assert!(log.contains("UnknownIssuer"), "{log}");
}

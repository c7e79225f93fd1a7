//! Name lookup and TCP connect without blocking the loop.
//!
//! `getaddrinfo` has no timeout of its own (a hung DNS server can hold it for
//! minutes) and a TCP connect waits for the network, so both run on a
//! short-lived helper thread that owns nothing but that OS call. The loop
//! polls for the result with a bounded wait and gives up at its own deadline;
//! a thread still stuck in the OS finishes on its own and its late result is
//! dropped. This is the one place holosync uses a second thread (rumqttc's
//! runtime does the same for the broker's name).

use std::io;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::task::Poll;
use std::time::{Duration, Instant};

/// Helper threads that may be stuck in the OS at once. Past this, new dials
/// fail at once: something (usually DNS) hangs, and more threads would not help.
const MAX_DIALS_IN_FLIGHT: usize = 16;

/// Helper threads connecting to an IP address at once. Such a thread ends
/// within its connect timeout (no lookup can hang it), so a batch of
/// projectors may dial all at once; the cap only bounds a flood.
const MAX_ADDRESS_DIALS_IN_FLIGHT: usize = 128;

/// Dials of a host name whose helper thread has not finished yet (including abandoned ones).
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Dials of an IP address whose helper thread has not finished yet.
static ADDRESS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// Counts a helper thread as running until dropped (when the thread ends).
struct InFlight(&'static AtomicUsize);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A lookup and connect in progress on a helper thread.
pub struct Dial {
    /// `host:port` as given, for error messages.
    target: String,
    /// Where the helper thread sends its one result.
    rx: Receiver<io::Result<TcpStream>>,
    /// When the loop stops waiting for the result.
    give_up_at: Instant,
}

impl Dial {
    /// Starts resolving `host` and connecting to `port`, trying each address
    /// with `connect_timeout`; the whole dial is abandoned after `limit`.
    pub fn start(host: &str, port: u16, connect_timeout: Duration, limit: Duration) -> Dial {
        Dial::start_with(host, port, connect_timeout, limit, None)
    }

    /// Like [`Dial::start`], with the socket's receive buffer set to
    /// `recv_buffer` bytes before connecting (a small window lets a reader
    /// that paces itself pace the sender too).
    pub fn start_with(
        host: &str,
        port: u16,
        connect_timeout: Duration,
        limit: Duration,
        recv_buffer: Option<usize>,
    ) -> Dial {
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let (tx, rx) = mpsc::channel();
        let give_up_at = Instant::now() + limit;
        let (counter, cap) = if host.parse::<std::net::IpAddr>().is_ok() {
            (&ADDRESS_IN_FLIGHT, MAX_ADDRESS_DIALS_IN_FLIGHT)
        } else {
            (&IN_FLIGHT, MAX_DIALS_IN_FLIGHT)
        };
        if counter.fetch_add(1, Ordering::SeqCst) >= cap {
            counter.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send(Err(io::Error::other(format!(
                "{cap} earlier name lookups or connects are still hanging"
            ))));
            return Dial {
                target,
                rx,
                give_up_at,
            };
        }
        let guard = InFlight(counter);
        let host = host.to_string();
        let spawned = std::thread::Builder::new()
            .name("holosync-dial".into())
            .spawn(move || {
                let _guard = guard;
                let _ = tx.send(connect(&host, port, connect_timeout, recv_buffer));
            });
        if let Err(e) = spawned {
            // The closure (and with it the guard and the sender) is dropped:
            // poll reports the channel as closed.
            log::error!("could not start a thread to connect to {target}: {e}");
        }
        Dial {
            target,
            rx,
            give_up_at,
        }
    }

    /// Waits at most `wait` for the connection. `Ready(Err)` when the lookup or
    /// every connect failed, or the dial's own limit passed.
    pub fn poll(&mut self, wait: Duration) -> Poll<io::Result<TcpStream>> {
        let now = Instant::now();
        let wait = wait.min(self.give_up_at.saturating_duration_since(now));
        match self.rx.recv_timeout(wait) {
            Ok(result) => Poll::Ready(result),
            Err(RecvTimeoutError::Timeout) if Instant::now() < self.give_up_at => Poll::Pending,
            Err(RecvTimeoutError::Timeout) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("name lookup and connect to {} timed out", self.target),
            ))),
            Err(RecvTimeoutError::Disconnected) => Poll::Ready(Err(io::Error::other(format!(
                "connecting to {} failed: no connect thread",
                self.target
            )))),
        }
    }
}

/// Resolves and connects (on the helper thread): every address in turn, the last error wins.
fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
    recv_buffer: Option<usize>,
) -> io::Result<TcpStream> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve {host}: {e}")))?
        .collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address"));
    for addr in addrs {
        match connect_one(addr, timeout, recv_buffer) {
            Ok(s) => return Ok(s),
            Err(e) => last = io::Error::new(e.kind(), format!("connect to {addr} failed: {e}")),
        }
    }
    Err(last)
}

fn connect_one(
    addr: SocketAddr,
    timeout: Duration,
    recv_buffer: Option<usize>,
) -> io::Result<TcpStream> {
    let Some(size) = recv_buffer else {
        return TcpStream::connect_timeout(&addr, timeout);
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // Before the connect, so the window offered to the server is small.
    socket.set_recv_buffer_size(size)?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// Shared with tests/fleet_traffic.rs.
#[cfg(test)]
#[path = "../tests/support/hanging_listener.rs"]
mod hanging;

#[cfg(test)]
mod tests {
    use super::hanging::hanging_listener;
    use super::*;
    use std::net::TcpListener;

    fn finish(mut d: Dial) -> io::Result<TcpStream> {
        loop {
            if let Poll::Ready(r) = d.poll(Duration::from_millis(50)) {
                return r;
            }
        }
    }

    #[test]
    fn connects_to_a_listener() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let d = Dial::start(
            "127.0.0.1",
            port,
            Duration::from_secs(5),
            Duration::from_secs(30),
        );
        assert!(finish(d).is_ok());
    }

    #[test]
    fn refused_port_is_an_error_naming_the_address() {
        let port = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let d = Dial::start(
            "127.0.0.1",
            port,
            Duration::from_secs(5),
            Duration::from_secs(30),
        );
        let e = finish(d).unwrap_err();
        assert!(e.to_string().contains("127.0.0.1"), "{e}");
    }

    #[test]
    fn poll_waits_no_longer_than_asked() {
        let (_l, _fill, port) = hanging_listener();
        let mut d = Dial::start(
            "127.0.0.1",
            port,
            Duration::from_secs(30),
            Duration::from_secs(60),
        );
        let t = Instant::now();
        assert!(d.poll(Duration::from_millis(30)).is_pending());
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn address_dials_are_not_held_back_by_the_lookup_cap() {
        let (_l, _fill, port) = hanging_listener();
        let hanging: Vec<Dial> = (0..MAX_DIALS_IN_FLIGHT + 4)
            .map(|_| {
                Dial::start(
                    "127.0.0.1",
                    port,
                    Duration::from_secs(5),
                    Duration::from_secs(10),
                )
            })
            .collect();
        let ok = TcpListener::bind("127.0.0.1:0").unwrap();
        let d = Dial::start(
            "127.0.0.1",
            ok.local_addr().unwrap().port(),
            Duration::from_secs(5),
            Duration::from_secs(30),
        );
        assert!(finish(d).is_ok());
        drop(hanging);
    }
}

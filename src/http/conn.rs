//! A connection, plain TCP or TLS over it, read and written with
//! socket timeouts so no call waits past the caller's deadline.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Instant;

use super::MIN_SOCKET_WAIT;

/// A socket, plain or wrapped in TLS.
pub(super) enum Conn {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    #[cfg(feature = "tls")]
    Tls(Box<(rustls::ClientConnection, TcpStream)>),
}

/// A read that found nothing yet (socket timeouts are WouldBlock on Unix and TimedOut on Windows).
pub(super) fn is_wait(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl Conn {
    pub(super) fn socket(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            #[cfg(feature = "tls")]
            Conn::Tls(t) => &t.1,
        }
    }

    /// Lets the next socket call wait at most until `deadline`.
    pub(super) fn wait_until(&self, deadline: Instant) -> io::Result<()> {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .max(MIN_SOCKET_WAIT);
        self.socket().set_read_timeout(Some(wait))?;
        self.socket().set_write_timeout(Some(wait))
    }

    /// Drives the TLS handshake; true once it is done (plain sockets: at
    /// once). Adds the bytes read from the server to `received`.
    pub(super) fn handshake(&mut self, received: &mut usize) -> io::Result<bool> {
        #[cfg(not(feature = "tls"))]
        let _ = received;
        match self {
            Conn::Plain(_) => Ok(true),
            #[cfg(feature = "tls")]
            Conn::Tls(t) => {
                let (conn, sock) = &mut **t;
                while conn.is_handshaking() {
                    if conn.wants_write() {
                        conn.write_tls(sock)?;
                    } else if conn.wants_read() {
                        let n = conn.read_tls(sock)?;
                        *received += n;
                        if n == 0 {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "server closed the connection during the TLS handshake",
                            ));
                        }
                        conn.process_new_packets().map_err(tls_error)?;
                    } else {
                        break;
                    }
                }
                Ok(!conn.is_handshaking())
            }
        }
    }

    /// Writes some of `buf`; returns how much was taken.
    pub(super) fn send(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Conn::Tls(t) => {
                let (conn, sock) = &mut **t;
                // rustls buffers the plaintext; it goes out with write_tls.
                let n = conn.writer().write(buf)?;
                while conn.wants_write() {
                    conn.write_tls(sock)?;
                }
                Ok(n)
            }
        }
    }

    /// Reads what is there: 0 at the end of the stream, which over TLS means
    /// a close_notify came (an end without one is an `UnexpectedEof` error).
    /// Adds the bytes read from the socket to `wire` (over TLS, records that
    /// carry no data yet, such as session tickets, count: they are progress).
    pub(super) fn recv(&mut self, buf: &mut [u8], wire: &mut usize) -> io::Result<usize> {
        match self {
            Conn::Plain(s) => {
                let n = s.read(buf)?;
                *wire += n;
                Ok(n)
            }
            #[cfg(feature = "tls")]
            Conn::Tls(t) => {
                let (conn, sock) = &mut **t;
                loop {
                    match conn.reader().read(buf) {
                        Ok(n) => return Ok(n),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                    while conn.wants_write() {
                        conn.write_tls(sock)?;
                    }
                    let n = conn.read_tls(sock)?;
                    *wire += n;
                    if n == 0 {
                        // The TCP stream ended: rustls gives what is left,
                        // then Ok(0) after a close_notify, else UnexpectedEof
                        // (an attacker on the path can cut a TCP stream, not
                        // forge a close_notify), which callers must not take
                        // for the end of a body without a length.
                        conn.process_new_packets().map_err(tls_error)?;
                        return conn.reader().read(buf);
                    }
                    conn.process_new_packets().map_err(tls_error)?;
                }
            }
        }
    }
}

#[cfg(feature = "tls")]
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

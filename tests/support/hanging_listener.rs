//! A TCP listener on 127.0.0.1 that never completes a connect, like a
//! projector or server switched off at the mains, without leaving the
//! machine (`src/dial.rs`'s unit tests and `tests/fleet_traffic.rs` include
//! this file with `#[path]`).

/// A listener whose accept queue is full (backlog 0, filled by connects
/// never accepted): a further connect to it hangs until its timeout. Keep
/// the returned sockets alive; the port is the last value.
pub fn hanging_listener() -> (socket2::Socket, Vec<socket2::Socket>, u16) {
    use socket2::{Domain, Socket, Type};
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let any: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    l.bind(&any.into()).unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let fill = (0..3)
        .map(|_| {
            let c = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            c.set_nonblocking(true).unwrap();
            let _ = c.connect(&addr.into());
            c
        })
        .collect();
    (l, fill, addr.port())
}

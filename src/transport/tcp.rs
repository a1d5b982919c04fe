//! TCP: binding a listening socket with the options the builder set, and setting up each
//! accepted connection (no Nagle delay, keepalive).

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::task::{Context, Poll};
use std::time::Duration;

use log::debug;
use smol::Async;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

/// Binds the first address of `addrs` that can be bound, with the given listen backlog.
pub(super) fn bind(
    addrs: &[SocketAddr],
    backlog: u32,
    reuse_port: bool,
) -> io::Result<TcpListener> {
    let mut last_error = None;
    for &addr in addrs {
        match bind_one(addr, backlog, reuse_port) {
            Ok(listener) => return Ok(listener),
            Err(e) => {
                last_error = Some(io::Error::new(
                    e.kind(),
                    format!("failed to bind {addr}: {e}"),
                ))
            }
        }
    }
    Err(last_error
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address to bind")))
}

fn bind_one(addr: SocketAddr, backlog: u32, reuse_port: bool) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // As std does on Unix: a restarted server can bind while old connections sit in TIME_WAIT.
    // It does not let two servers share a port.
    socket.set_reuse_address(true)?;
    // This does: every socket of the group must set it (and belong to the same user); the
    // kernel spreads new connections over them.
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(clamp_backlog(backlog))?;
    Ok(socket.into())
}

/// TCP keepalive as [`keepalive`] sets it up for each connection.
#[derive(Debug, Clone)]
pub(super) struct Keepalive {
    probes: TcpKeepalive,
    /// How long data sent may stay unacknowledged before the connection is given up
    /// (TCP_USER_TIMEOUT): as long as the probes take. Keepalive probes only a connection with
    /// nothing in flight; a peer that vanishes while a reply to it is unacknowledged would
    /// otherwise be retransmitted to for some 15 minutes (`tcp_retries2`), not found in time.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    give_up_after: Duration,
}

/// Keepalive probes after `idle` without traffic, then every third of it (at least a second),
/// three of them: a dead peer is found within twice `idle`, and on Linux so is one that stops
/// acknowledging what was sent to it.
pub(super) fn keepalive(idle: Duration) -> Keepalive {
    let interval = (idle / 3).max(Duration::from_secs(1));
    let probes = TcpKeepalive::new().with_time(idle);
    #[cfg(any(target_os = "linux", target_os = "android", target_os = "macos"))]
    let probes = probes.with_interval(interval).with_retries(3);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = interval;
    Keepalive {
        probes,
        #[cfg(any(target_os = "linux", target_os = "android"))]
        give_up_after: idle + interval * 3,
    }
}

/// Sets up a connection just accepted from `peer`. A failure is logged and the connection
/// served all the same: these only tune it.
pub(super) fn set_up(stream: &TcpStream, peer: SocketAddr, keepalive: Option<&Keepalive>) {
    // Without TCP_NODELAY, a reply written in two parts (prefix, then payload) waits for the
    // client's delayed ACK: Nagle's algorithm turns each round trip into 40 ms.
    if let Err(e) = stream.set_nodelay(true) {
        debug!("{peer}: cannot set TCP_NODELAY: {e}");
    }
    if let Some(keepalive) = keepalive {
        let socket = SockRef::from(stream);
        if let Err(e) = socket.set_tcp_keepalive(&keepalive.probes) {
            debug!("{peer}: cannot set TCP keepalive: {e}");
        }
        #[cfg(any(target_os = "linux", target_os = "android"))]
        if let Err(e) = socket.set_tcp_user_timeout(Some(keepalive.give_up_after)) {
            debug!("{peer}: cannot set TCP_USER_TIMEOUT: {e}");
        }
    }
}

/// The backlog as listen(2) takes it.
pub(super) fn clamp_backlog(backlog: u32) -> i32 {
    backlog.min(i32::MAX as u32) as i32
}

/// One recv(2) on a non-blocking socket, whose readiness the caller waits for: for reads into
/// a worker thread's buffer, which cannot be lent to a future that may wait.
#[cfg(unix)]
pub(crate) fn recv(socket: &std::net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::net::recv(socket, buf, rustix::net::RecvFlags::empty())?.0)
}

/// One send(2) on a non-blocking socket.
#[cfg(unix)]
pub(crate) fn send(socket: &std::net::TcpStream, buf: &[u8]) -> io::Result<usize> {
    // NOSIGNAL: a client gone away is an EPIPE error here, not a SIGPIPE for the process (std
    // ignores SIGPIPE in binaries, but a library cannot count on its host doing so).
    Ok(rustix::net::send(
        socket,
        buf,
        rustix::net::SendFlags::NOSIGNAL,
    )?)
}

#[cfg(not(unix))]
pub(crate) fn recv(mut socket: &std::net::TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    io::Read::read(&mut socket, buf)
}

#[cfg(not(unix))]
pub(crate) fn send(mut socket: &std::net::TcpStream, buf: &[u8]) -> io::Result<usize> {
    io::Write::write(&mut socket, buf)
}

/// A wait for a socket to be readable, for a reader that makes its own system calls (`recv`):
/// once the task has waited, being woken counts as readable, and the read that follows tells.
///
/// async-io alone would often say "not yet" to a task woken for bytes that are already here: an
/// event that comes in the same reactor turn as the wait began cannot be told from an older one,
/// so it re-arms the socket and waits again, at the cost of a second wait and a second wake (for
/// about a fifth of the requests of a 2-thread ping-pong). It is still asked, so that readiness
/// it holds is used up rather than reported on the next wait.
#[derive(Default)]
pub(crate) struct ReadableWait {
    waiting: bool,
}

impl ReadableWait {
    pub(crate) fn poll(
        &mut self,
        socket: &Async<TcpStream>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<()>> {
        match socket.poll_readable(cx) {
            Poll::Pending if !self.waiting => {
                self.waiting = true;
                Poll::Pending
            }
            Poll::Ready(Err(e)) => {
                self.waiting = false;
                Poll::Ready(Err(e))
            }
            _ => {
                self.waiting = false;
                Poll::Ready(Ok(()))
            }
        }
    }
}

//! What a server tells of its clients: its counters at one moment ([`Stats`]), why a client was
//! refused or how a connection ended, and each connection's [`ConnectionReport`] for the end hook.

use std::fmt;
use std::time::Duration;

use crate::addr::Addr;
use crate::info::Transport;

/// Why a client was refused: closed as soon as it was accepted, never served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RefusalReason {
    /// [`Builder::max_connections`](crate::Builder::max_connections) were open already.
    ConnectionLimit,
    /// Its address had as many connections open as one client may have. Counted by the
    /// per-client limit; 0 where there is none.
    PerClientLimit,
    /// It connected to a PROXY protocol listener from an address not trusted to send the
    /// header, and was closed at once, before anything was read; 0 without such a listener.
    UntrustedProxy,
}

impl RefusalReason {
    /// Every reason, in the order the metrics list them.
    pub const ALL: [RefusalReason; 3] = [
        RefusalReason::ConnectionLimit,
        RefusalReason::PerClientLimit,
        RefusalReason::UntrustedProxy,
    ];

    /// The value of the metric's `reason` label: `connection_limit`, `per_client_limit`,
    /// `untrusted_proxy`.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::ConnectionLimit => "connection_limit",
            RefusalReason::PerClientLimit => "per_client_limit",
            RefusalReason::UntrustedProxy => "untrusted_proxy",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// How a connection that was served ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// The handler returned `Ok`: for [`echo`](crate::echo), the client closed its side. A
    /// handler that hangs up by itself ends this way too.
    ClientClosed,
    /// No activity for the idle timeout.
    IdleTimeout,
    /// The handler returned an error other than the peer's reset or disappearance
    /// ([`CloseReason::PeerReset`]).
    HandlerError,
    /// The handler panicked.
    HandlerPanic,
    /// A stage before the handler ended it: the TLS handshake failed or timed out.
    HandshakeFailed,
    /// On a PROXY listener, the header was missing, late or malformed.
    ProxyHeaderFailed,
    /// On a PROXY listener, the client the header named was over the per-client limit
    /// (elsewhere such a client is refused before it is served, and counted as refused).
    PerClientLimit,
    /// The server stopped, and the connection was still open when the drain ran out of time
    /// (or was asked to hurry).
    Stopped,
    /// The client reset the connection (the handler's read or write failed with
    /// `ConnectionReset`, or `BrokenPipe` from writing to a client that had gone), or was found
    /// gone by [TCP keepalive](crate::Builder::keepalive) (`TimedOut`): the client left
    /// abruptly, which is no fault of the server's, so not a [`CloseReason::HandlerError`].
    PeerReset,
    /// A health check: on a PROXY listener, a connection whose header was a v2 `LOCAL` (the
    /// load balancer's own, not a client's) that sent no byte after it, and then closed or
    /// reset. Counted apart so that a dashboard of errors shows none for HAProxy's checks; its
    /// two log lines are at debug.
    HealthCheck,
}

impl CloseReason {
    /// Every way, in the order the metrics list them.
    pub const ALL: [CloseReason; 10] = [
        CloseReason::ClientClosed,
        CloseReason::IdleTimeout,
        CloseReason::HandlerError,
        CloseReason::HandlerPanic,
        CloseReason::HandshakeFailed,
        CloseReason::ProxyHeaderFailed,
        CloseReason::PerClientLimit,
        CloseReason::Stopped,
        CloseReason::PeerReset,
        CloseReason::HealthCheck,
    ];

    /// The value of the metric's `reason` label: `client_closed`, `idle_timeout`,
    /// `handler_error`, `handler_panic`, `handshake_failed`, `proxy_header_failed`,
    /// `per_client_limit`, `stopped`, `peer_reset`, `health_check`.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::HandlerError => "handler_error",
            CloseReason::HandlerPanic => "handler_panic",
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::ProxyHeaderFailed => "proxy_header_failed",
            CloseReason::PerClientLimit => "per_client_limit",
            CloseReason::Stopped => "stopped",
            CloseReason::PeerReset => "peer_reset",
            CloseReason::HealthCheck => "health_check",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

/// `client closed`, `idle timeout`, `handler error`, `handler panic`, `handshake failed`,
/// `closed by a stop`, `reset by the client`, `health check`: as the log's `Connection closed`
/// line ends.
impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CloseReason::ClientClosed => "client closed",
            CloseReason::IdleTimeout => "idle timeout",
            CloseReason::HandlerError => "handler error",
            CloseReason::HandlerPanic => "handler panic",
            CloseReason::HandshakeFailed => "handshake failed",
            CloseReason::ProxyHeaderFailed => "no valid PROXY header",
            CloseReason::PerClientLimit => "at the per-client limit",
            CloseReason::Stopped => "closed by a stop",
            CloseReason::PeerReset => "reset by the client",
            CloseReason::HealthCheck => "health check",
        })
    }
}

/// A server's counters at one moment, from [`Server::stats`](crate::Server::stats).
///
/// Every count is since the server started, and never decreases. The fields are read one after
/// the other, not all at one instant, so while clients come and go they may disagree by the few
/// connections that changed meanwhile. Once the server is quiet,
/// `accepted == refused_total() + open + closed_total()`.
///
/// # Examples
///
/// ```
/// use std::io::{Read, Write};
///
/// let server = taskserve::Server::builder().listen_tcp("127.0.0.1:0").start(taskserve::echo)?;
/// let mut client = std::net::TcpStream::connect(server.local_addr()?)?;
/// client.write_all(b"hello")?;
/// client.read_exact(&mut [0; 9])?; // GOT:hello
/// let stats = server.stats();
/// assert_eq!((stats.accepted, stats.open), (1, 1));
/// server.stop();
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Client connections open now (as [`Server::connections`](crate::Server::connections)).
    pub open: usize,
    /// Clients accepted, refused ones included.
    pub accepted: u64,
    /// Failed accepts: clients that gave up while queued, or the server out of file descriptors.
    pub accept_errors: u64,
    /// Bytes handlers read from their clients (for TLS, the decrypted bytes). An open
    /// connection's last bytes, up to 64 KiB each way, are added when it ends.
    pub bytes_read: u64,
    /// Bytes handlers wrote to their clients (for TLS, before encryption); as `bytes_read`.
    pub bytes_written: u64,
    /// How long the server has been running.
    pub uptime: Duration,
    pub(crate) refused: [u64; RefusalReason::ALL.len()],
    pub(crate) closed: [u64; CloseReason::ALL.len()],
}

impl Stats {
    /// Clients refused for `reason`.
    pub fn refused(&self, reason: RefusalReason) -> u64 {
        self.refused[reason.index()]
    }

    /// Clients refused, for any reason.
    pub fn refused_total(&self) -> u64 {
        self.refused.iter().sum()
    }

    /// Connections that ended in the way `how` says.
    pub fn closed(&self, how: CloseReason) -> u64 {
        self.closed[how.index()]
    }

    /// Connections that ended, in any way.
    pub fn closed_total(&self) -> u64 {
        self.closed.iter().sum()
    }
}

/// One connection, told to [`Builder::on_connection_end`](crate::Builder::on_connection_end)
/// when it has ended: who, where, how long, how much and how it ended.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConnectionReport {
    /// The client's address.
    pub peer_addr: Addr,
    /// The address of the listener it came to.
    pub local_addr: Addr,
    /// How it came.
    pub transport: Transport,
    /// From its accept to its close.
    pub duration: Duration,
    /// Bytes its handler read (for TLS, decrypted).
    pub bytes_read: u64,
    /// Bytes its handler wrote (for TLS, before encryption).
    pub bytes_written: u64,
    /// How it ended.
    pub closed: CloseReason,
}

//! What a server counts: its totals ([`Stats`]), each connection's bytes and how it ended (a
//! [`ConnectionReport`] for the hooks, a summary for the log), and the hooks themselves.
//!
//! The per-message path writes nothing shared: a connection counts its own bytes in a meter of
//! its own, written by one task at a time (so a plain load and store, no locked instruction),
//! and adds them to the server's totals when it ends, or every [`FLUSH_EVERY`] bytes while it
//! lasts, so that a long connection's bytes show before it closes.

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::error;

use crate::connection::{Addr, ConnectionInfo, Transport};
use crate::shutdown::Tracker;

/// Bytes a connection counts before it adds them to the server's totals: what a snapshot may
/// miss of each open connection, each way.
pub(crate) const FLUSH_EVERY: u64 = 64 * 1024;

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

    fn index(self) -> usize {
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
    /// The handler returned an error (a client's reset among them).
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
}

impl CloseReason {
    /// Every way, in the order the metrics list them.
    pub const ALL: [CloseReason; 8] = [
        CloseReason::ClientClosed,
        CloseReason::IdleTimeout,
        CloseReason::HandlerError,
        CloseReason::HandlerPanic,
        CloseReason::HandshakeFailed,
        CloseReason::ProxyHeaderFailed,
        CloseReason::PerClientLimit,
        CloseReason::Stopped,
    ];

    /// The value of the metric's `reason` label: `client_closed`, `idle_timeout`,
    /// `handler_error`, `handler_panic`, `handshake_failed`, `proxy_header_failed`,
    /// `per_client_limit`, `stopped`.
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
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// `client closed`, `idle timeout`, `handler error`, `handler panic`, `handshake failed`,
/// `closed by a stop`: as the log's `Connection closed` line ends.
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
/// let server = taskserve::Server::builder().start("127.0.0.1:0", taskserve::echo)?;
/// let mut client = std::net::TcpStream::connect(server.local_addr())?;
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
    refused: [u64; RefusalReason::ALL.len()],
    closed: [u64; CloseReason::ALL.len()],
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

/// The upper bounds, in seconds, of the connection-duration histogram's buckets.
pub(crate) const DURATION_BUCKETS: [f64; 9] = [0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 600.0, 3600.0];

/// A user's callback on a connection's start, or on its end.
type StartHook = Arc<dyn Fn(&ConnectionInfo) + Send + Sync>;
type EndHook = Arc<dyn Fn(&ConnectionReport) + Send + Sync>;

/// The callbacks a [`Builder`](crate::Builder) was given.
#[derive(Clone, Default)]
pub(crate) struct Hooks {
    pub(crate) start: Option<StartHook>,
    pub(crate) end: Option<EndHook>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hooks")
            .field("start", &self.start.is_some())
            .field("end", &self.end.is_some())
            .finish()
    }
}

/// A server's totals, shared by its accept loops, its connections and whoever reads them. Each
/// field is written once per accept or per connection end, never per message.
pub(crate) struct Metrics {
    started: Instant,
    tracker: Arc<Tracker>,
    hooks: Hooks,
    accepted: AtomicU64,
    accept_errors: AtomicU64,
    refused: [AtomicU64; RefusalReason::ALL.len()],
    closed: [AtomicU64; CloseReason::ALL.len()],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    /// Connections that ended by each bucket's bound (not cumulative); the last is above all.
    durations: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_sum_micros: AtomicU64,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics")
            .field("stats", &self.snapshot())
            .finish_non_exhaustive()
    }
}

impl Metrics {
    pub(crate) fn new(tracker: Arc<Tracker>, hooks: Hooks) -> Arc<Self> {
        Arc::new(Metrics {
            started: Instant::now(),
            tracker,
            hooks,
            accepted: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            refused: Default::default(),
            closed: Default::default(),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            durations: Default::default(),
            duration_sum_micros: AtomicU64::new(0),
        })
    }

    /// Counts a client accepted by accept(2), refused or not.
    pub(crate) fn count_accepted(&self) {
        self.accepted.fetch_add(1, Relaxed);
    }

    /// Counts a failed accept(2).
    pub(crate) fn count_accept_error(&self) {
        self.accept_errors.fetch_add(1, Relaxed);
    }

    /// Counts a client accepted and then refused for `reason`, never served.
    pub(crate) fn count_refused(&self, reason: RefusalReason) {
        self.refused[reason.index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        Stats {
            open: self.tracker.open(),
            accepted: self.accepted.load(Relaxed),
            accept_errors: self.accept_errors.load(Relaxed),
            bytes_read: self.bytes_read.load(Relaxed),
            bytes_written: self.bytes_written.load(Relaxed),
            uptime: self.started.elapsed(),
            refused: self.refused.each_ref().map(|n| n.load(Relaxed)),
            closed: self.closed.each_ref().map(|n| n.load(Relaxed)),
        }
    }

    /// The duration histogram: each bucket's bound and count (not cumulative), the number of
    /// connections, and the sum of their durations in seconds.
    #[cfg(any(test, feature = "metrics"))]
    pub(crate) fn durations(&self) -> (Vec<(f64, u64)>, u64, f64) {
        let counts = self.durations.each_ref().map(|n| n.load(Relaxed));
        let bounds = DURATION_BUCKETS.iter().copied().chain([f64::INFINITY]);
        let buckets: Vec<_> = bounds.zip(counts).collect();
        let count = counts.iter().sum();
        let sum = self.duration_sum_micros.load(Relaxed) as f64 / 1e6;
        (buckets, count, sum)
    }
}

/// One connection's counters, shared by its task (which reads them at the end) and its
/// [`Connection`](crate::Connection) (which writes them): made when the connection gets its slot.
pub(crate) struct Meter {
    /// Written only through the connection, which one task at a time polls through `&mut`:
    /// a relaxed load and store, which compile to plain moves, lose no update.
    read: AtomicU64,
    written: AtomicU64,
    /// How much of `read` and `written` the server's totals have already.
    read_flushed: AtomicU64,
    written_flushed: AtomicU64,
    started: Instant,
    /// Whether the start hook has run: on a PROXY listener, not until the header names the
    /// client. The end hook runs only for connections the start hook saw.
    announced: AtomicBool,
    /// How a stage before the handler ended the connection, when one did: the index of its
    /// [`CloseReason`] plus one, or 0.
    stage_failure: AtomicU8,
    /// What the end hook reports besides the counts; only kept when there is an end hook, so
    /// that a server without one spends no memory per connection on it.
    who: Option<Box<Who>>,
    metrics: Arc<Metrics>,
}

/// Who a connection was with, for the end hook's report.
struct Who {
    /// Until a PROXY header names the client, the load balancer's address.
    peer_addr: Mutex<Addr>,
    local_addr: Addr,
    transport: Transport,
}

impl fmt::Debug for Meter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Meter")
            .field("read", &self.read.load(Relaxed))
            .field("written", &self.written.load(Relaxed))
            .finish_non_exhaustive()
    }
}

impl Meter {
    /// A meter for the connection `info` describes, which has just got its slot; runs the start
    /// hook, unless `announce` is false (a PROXY listener's connection, whose client is not
    /// known yet: [`Meter::announce`] runs it then).
    pub(crate) fn start(
        metrics: &Arc<Metrics>,
        info: &ConnectionInfo,
        announce: bool,
    ) -> Arc<Meter> {
        let meter = Arc::new(Meter {
            read: AtomicU64::new(0),
            written: AtomicU64::new(0),
            read_flushed: AtomicU64::new(0),
            written_flushed: AtomicU64::new(0),
            started: Instant::now(),
            announced: AtomicBool::new(false),
            stage_failure: AtomicU8::new(0),
            who: metrics.hooks.end.as_ref().map(|_| {
                Box::new(Who {
                    peer_addr: Mutex::new(info.peer_addr.clone()),
                    local_addr: info.local_addr.clone(),
                    transport: info.transport,
                })
            }),
            metrics: Arc::clone(metrics),
        });
        if announce {
            meter.announce(info);
        }
        meter
    }

    /// The client is known (`info`, after a PROXY header): runs the start hook.
    pub(crate) fn announce(&self, info: &ConnectionInfo) {
        if let Some(who) = &self.who {
            *who.peer_addr.lock().unwrap_or_else(PoisonError::into_inner) = info.peer_addr.clone();
        }
        self.announced.store(true, Relaxed);
        if let Some(hook) = &self.metrics.hooks.start {
            run_hook("on_connection_start", || hook(info));
        }
    }

    /// A stage before the handler is ending the connection, for this reason.
    pub(crate) fn stage_failed(&self, reason: CloseReason) {
        self.stage_failure.store(reason.index() as u8 + 1, Relaxed);
    }

    /// How a stage ended the connection (the TLS handshake, unless another stage said).
    pub(crate) fn stage_failure(&self) -> CloseReason {
        match self.stage_failure.load(Relaxed) {
            0 => CloseReason::HandshakeFailed,
            n => CloseReason::ALL[usize::from(n) - 1],
        }
    }

    #[inline]
    pub(crate) fn add_read(&self, n: usize) {
        add(&self.read, &self.read_flushed, &self.metrics.bytes_read, n);
    }

    #[inline]
    pub(crate) fn add_written(&self, n: usize) {
        add(
            &self.written,
            &self.written_flushed,
            &self.metrics.bytes_written,
            n,
        );
    }

    /// Counts the connection's end in the server's totals, runs the end hook, and returns what
    /// the log line says after the peer: `after 2.41 s, in 1.2 KiB, out 1.2 KiB, client closed`.
    pub(crate) fn finish(&self, closed: CloseReason) -> Summary {
        let duration = self.started.elapsed();
        let (read, written) = (self.read.load(Relaxed), self.written.load(Relaxed));
        let metrics = &*self.metrics;
        flush(read, &self.read_flushed, &metrics.bytes_read);
        flush(written, &self.written_flushed, &metrics.bytes_written);
        let seconds = duration.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        metrics.durations[bucket].fetch_add(1, Relaxed);
        metrics
            .duration_sum_micros
            .fetch_add(duration.as_micros() as u64, Relaxed);
        metrics.closed[closed.index()].fetch_add(1, Relaxed);
        let hook = metrics.hooks.end.as_ref().zip(self.who.as_ref());
        if let Some((hook, who)) = hook.filter(|_| self.announced.load(Relaxed)) {
            let peer_addr = who.peer_addr.lock().unwrap_or_else(PoisonError::into_inner);
            let report = ConnectionReport {
                peer_addr: peer_addr.clone(),
                local_addr: who.local_addr.clone(),
                transport: who.transport,
                duration,
                bytes_read: read,
                bytes_written: written,
                closed,
            };
            run_hook("on_connection_end", || hook(&report));
        }
        Summary {
            duration,
            read,
            written,
            closed,
        }
    }
}

/// Adds `n` to a connection's `count`, and what has built up to the server's `total` once it
/// reaches [`FLUSH_EVERY`].
#[inline]
fn add(count: &AtomicU64, flushed: &AtomicU64, total: &AtomicU64, n: usize) {
    let now = count.load(Relaxed) + n as u64;
    count.store(now, Relaxed);
    if now.saturating_sub(flushed.load(Relaxed)) >= FLUSH_EVERY {
        flush(now, flushed, total);
    }
}

/// Adds to `total` what of `now` it does not have yet. `fetch_max`, because the end of a
/// connection can flush while a stream handed to another task still counts: each byte is added
/// once, and the totals never go back.
fn flush(now: u64, flushed: &AtomicU64, total: &AtomicU64) {
    let before = flushed.fetch_max(now, Relaxed);
    if now > before {
        total.fetch_add(now - before, Relaxed);
    }
}

/// Runs a user's hook, catching its panic: it runs inside the accept loop or a connection's
/// task, which must go on.
fn run_hook(name: &str, hook: impl FnOnce()) {
    if panic::catch_unwind(AssertUnwindSafe(hook)).is_err() {
        error!("the {name} hook panicked");
    }
}

/// How a connection went, as its `Connection closed` log line says after the peer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Summary {
    duration: Duration,
    read: u64,
    written: u64,
    closed: CloseReason,
}

/// `after 2.41 s, in 1.2 KiB, out 1.2 KiB, client closed`.
impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "after {:.2} s, in {}, out {}, {}",
            self.duration.as_secs_f64(),
            Bytes(self.read),
            Bytes(self.written),
            self.closed
        )
    }
}

/// `512 B`, `1.2 KiB`, `3.4 MiB`, `5.6 GiB`.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        write!(f, "{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_as_people_write_them() {
        let shown: Vec<_> = [0, 1023, 1024, 1229, 1024 * 1024 * 3 / 2, 5 << 30]
            .map(|n| Bytes(n).to_string())
            .into();
        assert_eq!(
            shown,
            ["0 B", "1023 B", "1.0 KiB", "1.2 KiB", "1.5 MiB", "5.0 GiB"]
        );
    }

    #[test]
    fn summary_reads_as_the_log_line_ends() {
        let summary = Summary {
            duration: Duration::from_millis(2412),
            read: 1229,
            written: 1234,
            closed: CloseReason::ClientClosed,
        };
        assert_eq!(
            summary.to_string(),
            "after 2.41 s, in 1.2 KiB, out 1.2 KiB, client closed"
        );
    }

    #[test]
    fn a_meter_adds_to_the_totals_every_64_kib_and_at_the_end() {
        let metrics = Metrics::new(Arc::default(), Hooks::default());
        let info = ConnectionInfo {
            peer_addr: Addr::Inet("127.0.0.1:1".parse().unwrap()),
            local_addr: Addr::Inet("127.0.0.1:2".parse().unwrap()),
            transport: Transport::Tcp,
            tls: None,
            peer_credentials: None,
            proxy: None,
        };
        let meter = Meter::start(&metrics, &info, true);
        meter.add_read(60 * 1024);
        assert_eq!(metrics.snapshot().bytes_read, 0);
        meter.add_read(5 * 1024);
        assert_eq!(metrics.snapshot().bytes_read, 65 * 1024);
        meter.add_read(7);
        meter.add_written(9);
        meter.finish(CloseReason::IdleTimeout);
        let stats = metrics.snapshot();
        assert_eq!((stats.bytes_read, stats.bytes_written), (65 * 1024 + 7, 9));
        assert_eq!(stats.closed(CloseReason::IdleTimeout), 1);
        assert_eq!(metrics.durations().1, 1);
    }
}

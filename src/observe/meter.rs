//! One connection's counters: its bytes each way and how it ended, added to the server's
//! [`Counters`] at its end (and every [`FLUSH_EVERY`] bytes while it lasts), told to the hooks,
//! and summed up for its `Connection closed` log line.
//!
//! The per-message path writes nothing shared: the meter is written by one task at a time (so a
//! plain load and store, no locked instruction).

use std::fmt;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use log::error;

use super::counters::Counters;
use super::stats::{CloseReason, ConnectionReport};
use crate::addr::Addr;
use crate::info::{ConnectionInfo, Transport};

/// Bytes a connection counts before it adds them to the server's totals: what a snapshot may
/// miss of each open connection, each way.
pub(crate) const FLUSH_EVERY: u64 = 64 * 1024;

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
    /// Whether its PROXY header was a v2 `LOCAL`: the proxy's own connection, a health check
    /// if it sends no data.
    local: AtomicBool,
    /// How a stage before the handler ended the connection, when one did: the index of its
    /// [`CloseReason`] plus one, or 0.
    stage_failure: AtomicU8,
    /// What the end hook reports besides the counts; only kept when there is an end hook, so
    /// that a server without one spends no memory per connection on it.
    who: Option<Box<Who>>,
    counters: Arc<Counters>,
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
        counters: &Arc<Counters>,
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
            local: AtomicBool::new(false),
            stage_failure: AtomicU8::new(0),
            who: counters.hooks.end.as_ref().map(|_| {
                Box::new(Who {
                    peer_addr: Mutex::new(info.peer_addr.clone()),
                    local_addr: info.local_addr.clone(),
                    transport: info.transport,
                })
            }),
            counters: Arc::clone(counters),
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
        let local = info.proxy.as_ref().is_some_and(|proxy| proxy.local);
        self.local.store(local, Relaxed);
        if let Some(hook) = &self.counters.hooks.start {
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

    /// Whether the connection is a health check so far: its PROXY header was a v2 `LOCAL`, and
    /// its handler has read nothing since.
    pub(crate) fn is_health_check(&self) -> bool {
        self.local.load(Relaxed) && self.read.load(Relaxed) == 0
    }

    #[inline]
    pub(crate) fn add_read(&self, n: usize) {
        add(&self.read, &self.read_flushed, &self.counters.bytes_read, n);
    }

    #[inline]
    pub(crate) fn add_written(&self, n: usize) {
        add(
            &self.written,
            &self.written_flushed,
            &self.counters.bytes_written,
            n,
        );
    }

    /// Counts the connection's end in the server's totals, runs the end hook, and returns what
    /// the log line says after the peer: `after 2.41 s, in 1.2 KiB, out 1.2 KiB, client closed`.
    pub(crate) fn finish(&self, closed: CloseReason) -> Summary {
        let duration = self.started.elapsed();
        let (read, written) = (self.read.load(Relaxed), self.written.load(Relaxed));
        let counters = &*self.counters;
        flush(read, &self.read_flushed, &counters.bytes_read);
        flush(written, &self.written_flushed, &counters.bytes_written);
        counters.count_closed(closed, duration);
        let hook = counters.hooks.end.as_ref().zip(self.who.as_ref());
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
    use crate::observe::counters::Hooks;

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
        let counters = Counters::new(Arc::default(), Arc::default(), Hooks::default());
        let info = ConnectionInfo {
            peer_addr: Addr::Inet("127.0.0.1:1".parse().unwrap()),
            local_addr: Addr::Inet("127.0.0.1:2".parse().unwrap()),
            transport: Transport::Tcp,
            tls: None,
            peer_credentials: None,
            proxy: None,
        };
        let meter = Meter::start(&counters, &info, true);
        meter.add_read(60 * 1024);
        assert_eq!(counters.snapshot().bytes_read, 0);
        meter.add_read(5 * 1024);
        assert_eq!(counters.snapshot().bytes_read, 65 * 1024);
        meter.add_read(7);
        meter.add_written(9);
        meter.finish(CloseReason::IdleTimeout);
        let stats = counters.snapshot();
        assert_eq!((stats.bytes_read, stats.bytes_written), (65 * 1024 + 7, 9));
        assert_eq!(stats.closed(CloseReason::IdleTimeout), 1);
        assert_eq!(counters.durations().1, 1);
    }
}

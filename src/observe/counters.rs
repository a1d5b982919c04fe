//! A server's totals: the counters every accept loop and connection adds to, read as [`Stats`],
//! and the hooks a user gave the builder.
//!
//! The per-message path writes nothing shared: a connection counts its own bytes in a
//! [`Meter`](super::meter::Meter) and adds them here when it ends, or every
//! [`FLUSH_EVERY`](super::meter::FLUSH_EVERY) bytes while it lasts.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::stats::{CloseReason, ConnectionReport, RefusalReason, Stats};
use crate::info::ConnectionInfo;

use crate::stop::{Lifecycle, Phase, Tracker};

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
pub(crate) struct Counters {
    started: Instant,
    tracker: Arc<Tracker>,
    /// Where the server is in its life: serving, in its drain delay, draining, stopped.
    lifecycle: Arc<Lifecycle>,
    pub(super) hooks: Hooks,
    accepted: AtomicU64,
    accept_errors: AtomicU64,
    refused: [AtomicU64; RefusalReason::ALL.len()],
    closed: [AtomicU64; CloseReason::ALL.len()],
    pub(super) bytes_read: AtomicU64,
    pub(super) bytes_written: AtomicU64,
    /// Connections that ended by each bucket's bound (not cumulative); the last is above all.
    durations: [AtomicU64; DURATION_BUCKETS.len() + 1],
    duration_sum_micros: AtomicU64,
}

impl fmt::Debug for Counters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Counters")
            .field("phase", &self.phase())
            .field("stats", &self.snapshot())
            .finish_non_exhaustive()
    }
}

impl Counters {
    pub(crate) fn new(tracker: Arc<Tracker>, lifecycle: Arc<Lifecycle>, hooks: Hooks) -> Arc<Self> {
        Arc::new(Counters {
            started: Instant::now(),
            tracker,
            lifecycle,
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

    /// Where the server is in its life now.
    pub(crate) fn phase(&self) -> Phase {
        self.lifecycle.phase()
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

    /// Counts a connection's end: how it ended, and how long it lasted.
    pub(super) fn count_closed(&self, closed: CloseReason, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = DURATION_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(DURATION_BUCKETS.len());
        self.durations[bucket].fetch_add(1, Relaxed);
        self.duration_sum_micros
            .fetch_add(duration.as_micros() as u64, Relaxed);
        self.closed[closed.index()].fetch_add(1, Relaxed);
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

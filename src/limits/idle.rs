//! The idle timeout: one sweeper per server counts quiet ticks for every connection, so that
//! neither the per-message path nor the reactor pays for a timer per connection.
//!
//! A connection is active when its handler is woken: data or a close arrived, a blocked write
//! made progress, or whatever else the handler awaits happened. "No wake-up for the timeout"
//! therefore covers both an idle client and a write stalled by a client that stopped reading,
//! for any handler, without wrapping its socket. The handler is polled with a waker that raises
//! the connection's `active` flag; the sweeper wakes every eighth of the timeout, lowers the flags
//! and closes the connections that stayed quiet for eight ticks in a row.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Wake, Waker};
use std::time::Duration;

use smol::stream::StreamExt;
use smol::Timer;

/// Sweeps per timeout: a connection closes between the timeout and an eighth more after its
/// last activity.
const TICKS_PER_TIMEOUT: u32 = 8;

/// Watches the connections of one server for idleness.
#[derive(Debug)]
pub(crate) struct IdleSweeper {
    tick: Duration,
    watches: Mutex<Watches>,
}

#[derive(Debug)]
struct Watches {
    /// Weak, so that a connection's end needs no call here: dead entries are dropped by the
    /// sweep, or by the compaction on registration that keeps this at most twice the live ones.
    list: Vec<Weak<Watch>>,
    compact_at: usize,
}

impl IdleSweeper {
    pub(crate) fn new(timeout: Duration) -> Arc<Self> {
        Arc::new(IdleSweeper {
            tick: (timeout / TICKS_PER_TIMEOUT).max(Duration::from_millis(1)),
            watches: Mutex::new(Watches {
                list: Vec::new(),
                compact_at: 64,
            }),
        })
    }

    /// Sweeps every tick, forever: spawn it on the server's executor.
    pub(crate) async fn run(self: Arc<Self>) {
        // An interval, not a sleep per loop: ticks do not drift by the time each sweep takes.
        let mut ticks = Timer::interval(self.tick);
        while ticks.next().await.is_some() {
            let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
            watches.list.retain(|watch| match watch.upgrade() {
                Some(watch) => {
                    watch.tick();
                    true
                }
                None => false,
            });
        }
    }

    fn register(&self, watch: &Arc<Watch>) {
        let mut watches = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        if watches.list.len() >= watches.compact_at {
            watches.list.retain(|w| w.strong_count() > 0);
            watches.compact_at = (watches.list.len() * 2).max(64);
        }
        watches.list.push(Arc::downgrade(watch));
    }
}

/// One connection's idle state, and the waker its handler is polled with.
#[derive(Debug)]
struct Watch {
    active: AtomicBool,
    quiet_ticks: AtomicU32,
    expired: AtomicBool,
    task: Waker,
}

impl Watch {
    /// One sweep: a quiet tick more, or none if the connection was active since the last one.
    fn tick(&self) {
        if self.active.swap(false, Ordering::Relaxed) {
            self.quiet_ticks.store(0, Ordering::Relaxed);
        } else if self.quiet_ticks.fetch_add(1, Ordering::Relaxed) + 1 >= TICKS_PER_TIMEOUT {
            self.expired.store(true, Ordering::Release);
            self.task.wake_by_ref();
        }
    }
}

impl Wake for Watch {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.active.store(true, Ordering::Relaxed);
        self.task.wake_by_ref();
    }
}

/// One connection's watch: hands out the waker to poll its handler with, until the connection
/// has been quiet for the timeout.
#[derive(Debug)]
pub(crate) struct IdleWatch {
    sweeper: Arc<IdleSweeper>,
    watch: Option<(Arc<Watch>, Waker)>,
}

impl IdleWatch {
    pub(crate) fn new(sweeper: Arc<IdleSweeper>) -> Self {
        IdleWatch {
            sweeper,
            watch: None,
        }
    }

    /// The waker to poll the handler with, which marks the connection active when woken and
    /// wakes `task`; `None` once the sweeper has found the connection quiet for the timeout.
    pub(crate) fn waker(&mut self, task: &Waker) -> Option<&Waker> {
        let current = matches!(&self.watch, Some((watch, _)) if watch.task.will_wake(task));
        if !current {
            // First poll (or a new task waker): the watch needs the task's waker to wake it.
            let watch = Arc::new(Watch {
                // Counting the start as activity keeps a connection opened just before a
                // sweep from being charged a whole quiet tick for it.
                active: AtomicBool::new(true),
                quiet_ticks: AtomicU32::new(0),
                expired: AtomicBool::new(false),
                task: task.clone(),
            });
            self.sweeper.register(&watch);
            self.watch = Some((Arc::clone(&watch), Waker::from(watch)));
        }
        let (watch, waker) = self.watch.as_ref()?;
        (!watch.expired.load(Ordering::Acquire)).then_some(waker)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{self, Future};
    use std::pin::pin;
    use std::task::{Context, Poll};
    use std::time::Instant;

    /// Runs `fut` under an idle watch, with the sweeper beside it on one thread.
    fn run_watched<F: Future>(timeout: Duration, fut: F) -> Option<F::Output> {
        let sweeper = IdleSweeper::new(timeout);
        let sweeping = smol::spawn(Arc::clone(&sweeper).run());
        let mut watch = IdleWatch::new(sweeper);
        let mut fut = pin!(fut);
        let out = smol::block_on(future::poll_fn(|cx| match watch.waker(cx.waker()) {
            Some(waker) => fut.as_mut().poll(&mut Context::from_waker(waker)).map(Some),
            None => Poll::Ready(None),
        }));
        drop(sweeping);
        out
    }

    #[test]
    fn a_future_that_is_never_woken_times_out_after_the_timeout() {
        let timeout = Duration::from_millis(200);
        let start = Instant::now();
        let out = run_watched(timeout, future::pending::<()>());
        let waited = start.elapsed();
        assert!(out.is_none());
        assert!(waited >= timeout, "closed early, after {waited:?}");
        // Generous: the bound is 1.125 × the timeout, but this machine may be busy.
        assert!(waited < timeout * 10, "closed late, after {waited:?}");
    }

    #[test]
    fn a_future_woken_more_often_than_the_timeout_runs_to_completion() {
        // 150 wake-ups 20 ms apart: 3 s in all, three times the timeout, and 50 wake-ups within
        // each timeout: only a stall of this thread for a whole second, fifty times the gap,
        // could make it look quiet.
        let woken_often = async {
            for _ in 0..150 {
                Timer::after(Duration::from_millis(20)).await;
            }
            7
        };
        assert_eq!(run_watched(Duration::from_secs(1), woken_often), Some(7));
    }

    #[test]
    fn registration_keeps_the_list_within_twice_the_live_watches_or_64() {
        let sweeper = IdleSweeper::new(Duration::from_secs(60));
        let live: Vec<_> = (0..10).map(|_| Arc::new(watch_for_test())).collect();
        for watch in &live {
            sweeper.register(watch);
        }
        for _ in 0..1000 {
            sweeper.register(&Arc::new(watch_for_test())); // dropped at once
        }
        let watches = sweeper.watches.lock().unwrap();
        let len = watches.list.len();
        // Compaction keeps the list under max(2 × live, 64) entries.
        assert!(len <= 64, "{len} entries kept for 10 live watches");
        let kept = |watch: &Arc<Watch>| {
            watches
                .list
                .iter()
                .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(watch)))
        };
        assert!(live.iter().all(kept), "a live watch was dropped");
    }

    fn watch_for_test() -> Watch {
        Watch {
            active: AtomicBool::new(false),
            quiet_ticks: AtomicU32::new(0),
            expired: AtomicBool::new(false),
            task: Waker::noop().clone(),
        }
    }
}

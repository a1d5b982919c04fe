//! The lifecycle of a stop: the requests that ask for one ([`StopHandle`], signals), the notice
//! handlers can await, the stop itself on a thread of its own, and the count of open
//! connections it waits on.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use event_listener::Event;
use log::error;

/// How a server stops: made by `start`, shared by the server, its stop handles and its tasks.
///
/// The first request starts the stop on a thread of its own, so that a request made from
/// anywhere (another thread, a signal, a handler on a worker thread) stops the server whether or
/// not anyone waits for it; later requests ask that stop to hurry.
#[derive(Default)]
pub(crate) struct Lifecycle {
    requests: AtomicUsize,
    requested: Event,
    /// Set when the server stops accepting: after the drain delay, if there is one.
    draining: AtomicBool,
    stopped: AtomicBool,
    stopped_event: Event,
    /// What the first request runs; set once the server is running.
    stop: Mutex<Option<StopFn>>,
}

/// Where a server is in its life, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Accepting and serving; ready for new clients.
    Serving,
    /// A stop has begun, but the server still accepts for the drain delay, so that load
    /// balancers that saw it is not ready take it out of rotation before it stops accepting.
    DrainDelay,
    /// No longer accepting; open connections finish, up to the shutdown timeout.
    Draining,
    /// Stopped: every connection closed, the threads joined.
    Stopped,
}

// Only the Prometheus endpoint lists and names the phases.
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
impl Phase {
    /// Every phase, in order.
    pub(crate) const ALL: [Phase; 4] = [
        Phase::Serving,
        Phase::DrainDelay,
        Phase::Draining,
        Phase::Stopped,
    ];

    /// `serving`, `drain_delay`, `draining`, `stopped`: as the metrics label it.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Phase::Serving => "serving",
            Phase::DrainDelay => "drain_delay",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        }
    }
}

/// Takes a running server apart. It may wait for further requests to cut its drain short.
pub(crate) type StopFn = Box<dyn FnOnce(&Lifecycle) + Send>;

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("requests", &self.requests())
            .field("stopped", &self.is_stopped())
            .finish_non_exhaustive()
    }
}

impl Lifecycle {
    /// Sets what the first stop request runs; runs it at once if a request came first.
    pub(crate) fn set_stop(self: &Arc<Self>, stop: StopFn) {
        let mut slot = self.stop.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(stop);
        if self.requests() > 0 {
            self.begin_stop(&mut slot);
        }
    }

    /// Asks for a stop: the first request begins it, any later one asks it to hurry.
    pub(crate) fn request(self: &Arc<Self>) {
        // Under the lock, so that `set_stop` sees either this request or none.
        let mut slot = self.stop.lock().unwrap_or_else(PoisonError::into_inner);
        self.requests.fetch_add(1, Ordering::SeqCst);
        self.requested.notify(usize::MAX);
        self.begin_stop(&mut slot);
    }

    /// Asks for a stop unless one was asked for already: two callers at once make one request
    /// between them, not a request and a hurry.
    pub(crate) fn request_once(self: &Arc<Self>) {
        let mut slot = self.stop.lock().unwrap_or_else(PoisonError::into_inner);
        if self.requests() == 0 {
            self.requests.fetch_add(1, Ordering::SeqCst);
            self.requested.notify(usize::MAX);
            self.begin_stop(&mut slot);
        }
    }

    fn begin_stop(self: &Arc<Self>, slot: &mut Option<StopFn>) {
        let Some(stop) = slot.take() else {
            return;
        };
        let lifecycle = Arc::clone(self);
        let stopping = thread::Builder::new()
            .name("taskserve-stop".into())
            .spawn(move || {
                stop(&lifecycle);
                lifecycle.set_stopped();
            });
        if let Err(e) = stopping {
            // The closure was dropped with the failed spawn, and with it the server's parts:
            // the workers end when their channel closes, and the executor with the last one.
            error!("cannot start a thread to stop the server ({e}); stopping without a drain");
            self.set_stopped();
        }
    }

    /// Marks the server stopped without a stop having run: for a `start` that failed and took
    /// its parts apart itself, so that dropping its half-made server does not wait for ever.
    pub(crate) fn set_stopped(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.stopped_event.notify(usize::MAX);
    }

    pub(crate) fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Completes once a stop has been asked for `n` times in all: once to begin it, and more to
    /// hurry it (end the drain delay, then the drain).
    pub(crate) async fn requested(&self, n: usize) {
        until(&self.requested, || self.requests() >= n).await;
    }

    /// Marks the moment the server stops accepting.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Where the server is in its life.
    pub(crate) fn phase(&self) -> Phase {
        if self.is_stopped() {
            Phase::Stopped
        } else if self.draining.load(Ordering::SeqCst) {
            Phase::Draining
        } else if self.requests() > 0 {
            Phase::DrainDelay
        } else {
            Phase::Serving
        }
    }

    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    /// Completes once the stop has finished: the threads are joined and every connection closed.
    pub(crate) async fn stopped(&self) {
        until(&self.stopped_event, || self.is_stopped()).await;
    }
}

/// Counts open connections, refuses one past the limit, and wakes whoever waits for the count to
/// fall: the drain at shutdown, and an accept loop backing off for lack of file descriptors.
#[derive(Debug, Default)]
pub(crate) struct Tracker {
    open: AtomicUsize,
    closed: Event,
}

impl Tracker {
    /// Takes a slot for a new connection, or `None` when `max` are open already.
    pub(crate) fn try_open(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |open| {
                (open < max).then_some(open + 1)
            });
        taken.ok().map(|_| Slot(Arc::clone(self)))
    }

    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Completes when a connection closes after this call.
    pub(crate) async fn some_closed(&self) {
        self.closed.listen().await;
    }

    /// Completes when no connection is open.
    pub(crate) async fn all_closed(&self) {
        until(&self.closed, || self.open() == 0).await;
    }
}

/// Completes once `done()` holds, re-checking it each time `event` is notified.
async fn until(event: &Event, done: impl Fn() -> bool) {
    while !done() {
        // Listen first, then check again: a notification between the check and the listen is
        // not missed.
        let listener = event.listen();
        if done() {
            break;
        }
        listener.await;
    }
}

/// One open connection's place in the [`Tracker`]; dropping it frees the place, however the
/// connection ended (returned, failed, panicked or was cancelled).
#[derive(Debug)]
pub(crate) struct Slot(Arc<Tracker>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        // Cheap when nobody listens: event-listener checks an atomic before taking any lock.
        self.0.closed.notify(usize::MAX);
    }
}

/// Stops a [`Server`](crate::Server) from anywhere, and tells when a stop has begun; it is cheap
/// to clone.
///
/// # Examples
///
/// ```
/// let server = taskserve::Server::builder().listen_tcp("127.0.0.1:0").start(taskserve::echo)?;
/// let handle = server.stop_handle();
/// std::thread::spawn(move || handle.stop());
/// server.wait(); // returns once the handle has asked and the server has stopped
/// # std::io::Result::Ok(())
/// ```
#[derive(Debug, Clone)]
pub struct StopHandle(Arc<Lifecycle>);

impl StopHandle {
    pub(crate) fn new(lifecycle: &Arc<Lifecycle>) -> Self {
        StopHandle(Arc::clone(lifecycle))
    }

    /// Asks the server to stop gracefully, and returns at once: the server stops accepting,
    /// lets open connections finish for up to the shutdown timeout and closes the rest, whether
    /// or not anyone waits for it. Asking again (or a signal, with
    /// [`Builder::stop_on_signals`](crate::Builder::stop_on_signals)) closes open connections at
    /// once.
    pub fn stop(&self) {
        self.0.request();
    }

    /// Whether a stop has been asked for. From then on the server is not ready for new
    /// clients: the metrics endpoint's `/readyz` answers 503, though during a drain delay
    /// ([`Builder::drain_delay`](crate::Builder::drain_delay)) it still accepts them.
    pub fn is_stopping(&self) -> bool {
        self.0.requests() > 0
    }

    /// Completes once a stop has been asked for (at once if it has been): a handler can race
    /// its reads against it to finish what it is doing, say goodbye and close before the
    /// shutdown timeout closes the connection for it.
    pub async fn stopping(&self) {
        self.0.requested(1).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smol::future;

    #[test]
    fn tracker_refuses_past_max_and_frees_on_drop() {
        let tracker = Arc::new(Tracker::default());
        let first = tracker.try_open(2).unwrap();
        let _second = tracker.try_open(2).unwrap();
        assert!(tracker.try_open(2).is_none());
        drop(first);
        assert_eq!(tracker.open(), 1);
        assert!(tracker.try_open(2).is_some());
    }

    #[test]
    fn all_closed_completes_when_the_last_slot_drops() {
        let tracker = Arc::new(Tracker::default());
        let slot = tracker.try_open(1).unwrap();
        let waiter = std::thread::spawn({
            let tracker = Arc::clone(&tracker);
            move || future::block_on(tracker.all_closed())
        });
        drop(slot);
        waiter.join().unwrap();
        assert_eq!(tracker.open(), 0);
    }

    #[test]
    fn a_request_made_before_the_stop_is_set_runs_it_once_it_is() {
        let lifecycle = Arc::new(Lifecycle::default());
        lifecycle.request();
        lifecycle.request();
        future::block_on(lifecycle.requested(2));
        let (ran, runs) = std::sync::mpsc::channel();
        lifecycle.set_stop(Box::new(move |_| ran.send(()).unwrap()));
        future::block_on(lifecycle.stopped());
        assert_eq!(runs.try_iter().count(), 1);
        lifecycle.request();
        assert!(runs.try_recv().is_err(), "the stop ran twice");
    }
}

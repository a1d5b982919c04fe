//! The two facts a stopping server waits on: "a stop was asked for" and "no connection is open".

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use event_listener::Event;

/// Stop requests, counted: the first asks a server to stop gracefully, any later one to hurry.
/// A `StopHandle` and a signal count alike.
#[derive(Debug, Default)]
pub(crate) struct StopRequests {
    count: AtomicUsize,
    event: Event,
}

impl StopRequests {
    pub(crate) fn request(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Completes once `n` requests have been made, counting those made before the call.
    pub(crate) async fn reached(&self, n: usize) {
        until(&self.event, || self.count() >= n).await;
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
    fn reached_counts_requests_made_before_the_wait() {
        let requests = StopRequests::default();
        requests.request();
        requests.request();
        future::block_on(requests.reached(2));
        assert_eq!(requests.count(), 2);
    }
}

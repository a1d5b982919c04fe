//! The metrics endpoint's slots: how many scrapes it serves at once, and who gives way when
//! they are all taken.
//!
//! A client that opens connections and sends nothing (or one byte) would otherwise hold every
//! slot until its deadline, and every real scrape meanwhile would be turned away. So when the
//! slots are full, a new connection takes the slot of the oldest one that is still waiting for
//! its request, which is told to go (it answers 503). Only when every slot is answering a
//! request already is the new one refused. Prometheus makes one scrape at a time and sends its
//! request at once, so it is never the oldest for long.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use smol::channel::{self, Receiver, Sender};

/// The scrapes served at once.
#[derive(Debug)]
pub(super) struct Slots {
    max: usize,
    taken: Mutex<Taken>,
}

#[derive(Debug, Default)]
struct Taken {
    /// Oldest first.
    slots: VecDeque<Taker>,
    next_id: u64,
}

/// A slot as the [`Slots`] see it.
#[derive(Debug)]
struct Taker {
    id: u64,
    /// Still waiting for its request: it may be evicted.
    reading: bool,
    /// Dropped to evict it: its [`Slot::evicted`] then returns.
    _evict: Sender<()>,
}

/// One scrape's slot, given back when dropped.
#[derive(Debug)]
pub(super) struct Slot {
    slots: Arc<Slots>,
    id: u64,
    evicted: Receiver<()>,
}

impl Slots {
    /// At most `max` scrapes at once.
    pub(super) fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max,
            taken: Mutex::default(),
        })
    }

    /// A slot for a new connection, evicting the oldest one still reading its request if all
    /// are taken; `None` if every slot is answering a request.
    pub(super) fn admit(self: &Arc<Self>) -> Option<Slot> {
        let mut taken = self.lock();
        if taken.slots.len() >= self.max {
            let oldest_reading = taken.slots.iter().position(|taker| taker.reading)?;
            // Dropping its sender tells it to go.
            taken.slots.remove(oldest_reading);
        }
        let (evict, evicted) = channel::bounded(1);
        let id = taken.next_id;
        taken.next_id += 1;
        taken.slots.push_back(Taker {
            id,
            reading: true,
            _evict: evict,
        });
        Some(Slot {
            slots: Arc::clone(self),
            id,
            evicted,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Taken> {
        self.taken.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Slot {
    /// Returns once a newer connection has taken this slot (never, once it is answering).
    pub(super) async fn evicted(&self) {
        // Nothing is ever sent: `recv` fails when the sender is dropped.
        let _ = self.evicted.recv().await;
    }

    /// Its request is read: from now on it is not evicted.
    pub(super) fn answering(&self) {
        let mut taken = self.slots.lock();
        if let Some(taker) = taken.slots.iter_mut().find(|taker| taker.id == self.id) {
            taker.reading = false;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut taken = self.slots.lock();
        // Not there if it was evicted.
        taken.slots.retain(|taker| taker.id != self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smol::future::{block_on, poll_once};

    fn is_evicted(slot: &Slot) -> bool {
        block_on(poll_once(slot.evicted())).is_some()
    }

    #[test]
    fn when_full_the_oldest_reading_slot_gives_way_and_answering_ones_stay() {
        let slots = Slots::new(2);
        let first = slots.admit().unwrap();
        let second = slots.admit().unwrap();
        first.answering();
        let third = slots.admit().expect("the second gives way");
        assert!(!is_evicted(&first));
        assert!(is_evicted(&second));
        third.answering();
        assert!(slots.admit().is_none(), "both answering: refused");
        drop(first);
        let fourth = slots.admit().expect("a slot given back");
        assert!(!is_evicted(&third) && !is_evicted(&fourth));
    }
}

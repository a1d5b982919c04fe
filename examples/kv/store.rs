//! The keys and values, shared by every connection task on every worker thread.
//!
//! The map is cut into shards, each a `HashMap` behind its own `Mutex`, and a key's hash picks
//! its shard. A command locks one shard for a few hundred nanoseconds, so tasks on different
//! cores rarely want the same lock: with 64 shards and 64 busy cores, a lock is contended about
//! as often as two tasks pick the same one of 64. One `Mutex<HashMap>` (`--shards 1`) puts
//! every core in one queue. docs/performance.md measures both.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

/// A value, and when it expires.
#[derive(Debug)]
pub struct Entry {
    pub value: Vec<u8>,
    pub expires_at: Option<Instant>,
}

impl Entry {
    fn is_expired(&self, now: &mut Option<Instant>) -> bool {
        // The clock is read only for keys that can expire, once per command.
        self.expires_at
            .is_some_and(|at| at <= *now.get_or_insert_with(Instant::now))
    }
}

/// One shard: its part of the keys.
#[derive(Debug, Default)]
pub struct Shard {
    map: HashMap<Box<[u8]>, Entry>,
    /// Some key here has an expiry, so the sweeper looks at this shard.
    expiring: bool,
}

impl Shard {
    /// The live entry at `key`. An expired one is removed first, as Redis does when a client
    /// touches it.
    pub fn get(&mut self, key: &[u8]) -> Option<&mut Entry> {
        if self.map.get(key)?.is_expired(&mut None) {
            self.map.remove(key);
            return None;
        }
        self.map.get_mut(key)
    }

    /// Sets `key` to `value`, with `expires_at`: the buffers of an existing entry are reused.
    pub fn set(&mut self, key: &[u8], value: &[u8], expires_at: Option<Instant>) {
        self.expiring |= expires_at.is_some();
        if let Some(entry) = self.map.get_mut(key) {
            entry.value.clear();
            entry.value.extend_from_slice(value);
            entry.expires_at = expires_at;
        } else {
            let value = value.to_vec();
            self.map.insert(key.into(), Entry { value, expires_at });
        }
    }

    /// Sets when the live `key` expires; false if there is no such key.
    pub fn set_expiry(&mut self, key: &[u8], expires_at: Option<Instant>) -> bool {
        self.expiring |= expires_at.is_some();
        self.get(key)
            .map(|entry| entry.expires_at = expires_at)
            .is_some()
    }

    /// Removes `key`; whether a live one was there.
    pub fn remove(&mut self, key: &[u8]) -> bool {
        self.map
            .remove(key)
            .is_some_and(|entry| !entry.is_expired(&mut None))
    }

    /// Drops every expired entry.
    fn sweep(&mut self, now: Instant) {
        let mut now = Some(now);
        self.map.retain(|_, entry| !entry.is_expired(&mut now));
        self.expiring = self.map.values().any(|entry| entry.expires_at.is_some());
    }
}

/// Every key, in shards.
#[derive(Debug)]
pub struct Store {
    shards: Box<[Mutex<Shard>]>,
    /// Picks a key's shard; seeded at random, so that no client can aim every key at one shard.
    hasher: RandomState,
}

impl Store {
    /// An empty store of `shards` shards (at least 1).
    pub fn new(shards: usize) -> Store {
        let shards = (0..shards.max(1)).map(|_| Mutex::default()).collect();
        Store {
            shards,
            hasher: RandomState::new(),
        }
    }

    /// Locks the shard that holds `key`.
    pub fn shard(&self, key: &[u8]) -> MutexGuard<'_, Shard> {
        let index = self.hasher.hash_one(key) as usize % self.shards.len();
        lock(&self.shards[index])
    }

    /// How many keys there are, expired ones not yet swept included, as Redis counts them.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|shard| lock(shard).map.len()).sum()
    }

    /// Removes every key.
    pub fn clear(&self) {
        for shard in self.shards.iter() {
            *lock(shard) = Shard::default();
        }
    }
}

/// Removes expired keys that no client touches, every `period`, on a thread of its own, until
/// the store is dropped. Each sweep passes over the shards that hold keys with an expiry, one
/// shard locked at a time: simpler than Redis's sampling of 20 keys ten times a second, and it
/// bounds the memory the same way, for a cost that grows with the keys (a million keys with an
/// expiry take some milliseconds a sweep, and hold each of 64 shards for a few hundred µs).
pub fn sweep_expired(store: &Arc<Store>, period: Duration) -> std::io::Result<()> {
    let store: Weak<Store> = Arc::downgrade(store);
    std::thread::Builder::new()
        .name("kv-sweeper".into())
        .spawn(move || loop {
            std::thread::sleep(period);
            let Some(store) = store.upgrade() else { return };
            for shard in store.shards.iter() {
                let mut shard = lock(shard);
                if shard.expiring {
                    shard.sweep(Instant::now());
                }
            }
        })
        .map(drop)
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // No code panics while holding a shard, and a map is whole even if some did.
    shard.lock().unwrap_or_else(PoisonError::into_inner)
}

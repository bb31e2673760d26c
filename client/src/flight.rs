//! Local single-flight: one load per key per process, its outcome (value or error) shared by every
//! caller that arrived while it ran.
//!
//! Not `quick_cache`'s own placeholder guard (`get_value_or_guard_async`): its waiters receive only a
//! value that was inserted into the cache, so a failed load (guard dropped) hands the guard to the next
//! waiter, which loads again, one after another, each failing in turn; and an insert that an
//! invalidation voided (the L1 ticket check) would leave the waiters loading in turn too. A watch
//! channel per key hands the leader's `Result` itself, error included, to every waiter.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

/// The outcome of a load, type-erased (the concrete type is `Result<Loaded<T>, Error<E>>`).
pub(crate) type Outcome = Arc<dyn Any + Send + Sync>;

type Slot = tokio::sync::watch::Receiver<Option<Outcome>>;

/// Keys being loaded by this process.
#[derive(Default)]
pub(crate) struct Flights {
    map: Mutex<HashMap<String, (u64, Slot)>>,
    next: AtomicU64,
}

/// What a caller is to do for a key.
pub(crate) enum Role<'a> {
    /// Load, then [`Leader::publish`]. Dropping it unpublished (cancelled, panicked) wakes the waiters,
    /// which then elect a new leader among themselves.
    Lead(Leader<'a>),
    /// Wait for the leader's outcome.
    Wait(Slot),
}

pub(crate) struct Leader<'a> {
    flights: &'a Flights,
    key: String,
    id: u64,
    tx: tokio::sync::watch::Sender<Option<Outcome>>,
}

impl Flights {
    pub(crate) fn join(&self, key: &str) -> Role<'_> {
        let mut map = self.map.lock();
        if let Some((_, rx)) = map.get(key) {
            return Role::Wait(rx.clone());
        }
        let id = self.next.fetch_add(1, Relaxed);
        let (tx, rx) = tokio::sync::watch::channel(None);
        map.insert(key.to_owned(), (id, rx));
        Role::Lead(Leader { flights: self, key: key.to_owned(), id, tx })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().len()
    }
}

impl Leader<'_> {
    /// Hands the outcome to every waiter (and ends the flight: later callers start a new one).
    pub(crate) fn publish(self, outcome: Outcome) {
        self.tx.send_replace(Some(outcome));
        // Drop removes the flight.
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        let mut map = self.flights.map.lock();
        if map.get(&self.key).is_some_and(|(id, _)| *id == self.id) {
            map.remove(&self.key);
        }
    }
}

/// Waits for the leader: `None` when it was dropped without an outcome (the caller joins again).
pub(crate) async fn wait(mut slot: Slot) -> Option<Outcome> {
    // `wait_for` looks at the current value first: an outcome published before the leader's drop is seen.
    let outcome = slot.wait_for(|v| v.is_some()).await.ok().and_then(|v| v.clone());
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waiters_share_the_outcome_and_a_dropped_leader_hands_over() {
        let f = Flights::default();
        let Role::Lead(leader) = f.join("k") else { panic!("first caller leads") };
        let Role::Wait(w) = f.join("k") else { panic!("second caller waits") };
        leader.publish(Arc::new(7u32));
        let got = wait(w).await.expect("an outcome");
        assert_eq!(got.downcast_ref::<u32>(), Some(&7));
        assert_eq!(f.len(), 0, "a published flight is over");

        let Role::Lead(leader) = f.join("k") else { panic!("a new flight") };
        let Role::Wait(w) = f.join("k") else { panic!("waits") };
        drop(leader);
        assert!(wait(w).await.is_none(), "a dropped leader wakes its waiters with no outcome");
        assert!(matches!(f.join("k"), Role::Lead(_)), "and a waiter can lead next");
    }
}

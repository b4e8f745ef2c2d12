//! Connection slots for the small HTTP endpoints (the broker's metrics, the
//! manager's admin API), where a client sends one request and is answered.
//!
//! At most `max` connections are served at once. A connection is
//! *waiting* until it has sent its whole request; when all slots are taken,
//! a newcomer closes the oldest waiting connection and takes the slot it
//! frees. So silent clients cannot keep out one that talks, and the
//! endpoint never holds more than `max` descriptors of clients plus the
//! few newcomers waiting for a slot they freed (at most one per waiting
//! connection closed). With every slot busy answering, a newcomer is closed
//! at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

/// How long a newcomer waits for the slot of the connection it closed.
const TAKEOVER_WAIT: Duration = Duration::from_secs(1);

pub struct Slots {
    open: Arc<Semaphore>,
    /// Waiting connections by age, with the token that closes each.
    waiting: Mutex<BTreeMap<u64, CancellationToken>>,
    next: AtomicU64,
}

impl Slots {
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            open: Arc::new(Semaphore::new(max)),
            waiting: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
        })
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, CancellationToken>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// For a connection just accepted, in the accept loop: its claim on a
    /// slot, or `None` if it is to be closed at once (every slot is busy
    /// answering).
    pub fn claim(self: &Arc<Self>) -> Option<Claim> {
        let permit = match self.open.clone().try_acquire_owned() {
            Ok(permit) => Some(permit),
            Err(_) => {
                let oldest = self.waiting().pop_first();
                oldest?.1.cancel();
                None
            }
        };
        Some(Claim {
            slots: self.clone(),
            permit,
        })
    }
}

/// A connection's claim on a slot, taken with [`Claim::take`] in its task.
pub struct Claim {
    slots: Arc<Slots>,
    /// `None` when it closed a waiting connection for its slot.
    permit: Option<OwnedSemaphorePermit>,
}

impl Claim {
    /// The slot, once free; `None` if another newcomer took it first.
    pub async fn take(self) -> Option<Held> {
        let permit = match self.permit {
            Some(permit) => permit,
            None => tokio::time::timeout(TAKEOVER_WAIT, self.slots.open.clone().acquire_owned())
                .await
                .ok()?
                .ok()?,
        };
        let id = self.slots.next.fetch_add(1, Ordering::Relaxed);
        let closing = CancellationToken::new();
        self.slots.waiting().insert(id, closing.clone());
        Some(Held {
            slots: self.slots,
            _permit: permit,
            id,
            closing,
        })
    }
}

/// A slot held by a connection, waiting for its request until
/// [`Held::received`].
pub struct Held {
    slots: Arc<Slots>,
    _permit: OwnedSemaphorePermit,
    id: u64,
    closing: CancellationToken,
}

impl Held {
    /// Cancelled when a newcomer closes this connection for its slot.
    pub fn closing(&self) -> &CancellationToken {
        &self.closing
    }

    /// The request is in: the connection is no longer closed for others.
    pub fn received(&self) {
        self.slots.waiting().remove(&self.id);
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.received();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_newcomer_closes_the_oldest_connection_still_waiting() {
        let slots = Slots::new(2);
        let first = slots.claim().unwrap().take().await.unwrap();
        let second = slots.claim().unwrap().take().await.unwrap();
        // Full: the third closes the first, and gets its slot once the
        // first lets go of it.
        let third = slots.claim().unwrap();
        assert!(first.closing().is_cancelled());
        assert!(!second.closing().is_cancelled());
        drop(first);
        let third = third.take().await.expect("the freed slot");
        // The second has its request now: nobody closes it, and with no
        // connection waiting but the third, the fourth closes the third.
        second.received();
        let fourth = slots.claim().unwrap();
        assert!(third.closing().is_cancelled());
        assert!(!second.closing().is_cancelled());
        drop(third);
        let fourth = fourth.take().await.unwrap();
        fourth.received();
        // Both slots answer requests: a newcomer is closed at once.
        assert!(slots.claim().is_none());
        drop(second);
        assert!(slots.claim().is_some());
    }

    #[tokio::test]
    async fn a_newcomer_whose_slot_another_took_gives_up() {
        let slots = Slots::new(1);
        let first = slots.claim().unwrap().take().await.unwrap();
        let a = slots.claim().unwrap();
        assert!(first.closing().is_cancelled());
        // The first is gone, and a newcomer that claimed a free slot takes it.
        drop(first);
        let b = slots.claim().unwrap().take().await.unwrap();
        assert!(a.take().await.is_none(), "no slot within the wait");
        drop(b);
    }
}

//! Service-change announcements, paced: a change reaches a device as its
//! notices (two: its tenant's topic and its bootstrap topic) or as `change`
//! in a poll reply, and the manager announces at most
//! `max_notices_per_sec / 2` changes a second whichever way they go, so a
//! fleet-wide change does not arrive as one thundering herd of re-keys and
//! reconnects. The operator API, the manager's broker connection (every
//! pending change again after a reconnect), `online` reports and polls
//! that find the allowance spent queue changes here, and one task sends
//! their notices ([`pace_notices`]).

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::AsyncClient;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::handlers::Core;

/// A device's change whose notices are to be sent: built when they go
/// out, and only if the change is still the device's pending one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueuedChange {
    pub device_id: String,
    pub change_id: String,
}

impl QueuedChange {
    /// The device's pending change, if it has one.
    pub fn pending_of(device: &crate::store::DeviceRecord) -> Option<QueuedChange> {
        Some(QueuedChange {
            device_id: device.device_id.clone(),
            change_id: device.pending.as_ref()?.change_id.clone(),
        })
    }
}

/// How many changes a second may be announced, taken as they go: a token
/// bucket holding a tenth of a second's worth at most.
pub struct Allowance {
    per_sec: f64,
    most: f64,
    left: Mutex<(f64, Instant)>,
}

impl Allowance {
    pub fn new(per_sec: usize) -> Allowance {
        let most = (per_sec / 10).max(1) as f64;
        Allowance {
            per_sec: per_sec.max(1) as f64,
            most,
            left: Mutex::new((most, Instant::now())),
        }
    }

    /// Takes up to `want` announcements; returns how many were allowed.
    pub fn take(&self, want: usize) -> usize {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let (tokens, since) = *left;
        let tokens =
            (tokens + now.duration_since(since).as_secs_f64() * self.per_sec).min(self.most);
        let taken = (tokens.floor() as usize).min(want);
        *left = (tokens - taken as f64, now);
        taken
    }
}

/// The changes waiting to be announced, and the allowance every way of
/// announcing one draws from.
///
/// A change takes its turn once per device while the manager runs: once
/// announced (its notices sent, or carried in a poll reply), it goes out
/// again at once whenever its device asks (its device's `online` report,
/// its polls), with no turn of its own. Announcing it to the same device
/// again starts no new re-key, and a device (compromised, or broken) that
/// polls as fast as it may would otherwise spend the allowance that the
/// rest of the fleet's changes wait for.
pub struct Announcements {
    queue: mpsc::UnboundedSender<Vec<QueuedChange>>,
    queued: Mutex<Option<mpsc::UnboundedReceiver<Vec<QueuedChange>>>>,
    pub allowance: Allowance,
    /// Changes waiting in [`pace_notices`], as it last counted.
    waiting: Arc<AtomicUsize>,
    /// The change last announced to each device, by device id: one entry
    /// per device at most.
    announced: Mutex<std::collections::HashMap<String, String>>,
}

impl Announcements {
    /// `notices_per_sec`: the manager's `max_notices_per_sec`.
    pub fn new(notices_per_sec: usize) -> Announcements {
        let (queue, queued) = mpsc::unbounded_channel();
        let changes_per_sec = (notices_per_sec / crate::handlers::NOTICES_PER_CHANGE).max(1);
        Announcements {
            queue,
            queued: Mutex::new(Some(queued)),
            allowance: Allowance::new(changes_per_sec),
            waiting: Arc::default(),
            announced: Mutex::default(),
        }
    }

    /// Notes that `change` was announced to its device.
    pub fn announced(&self, change: &QueuedChange) {
        self.announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(change.device_id.clone(), change.change_id.clone());
    }

    /// Whether `change` was announced to its device since the manager
    /// started: it then needs no turn.
    pub fn was_announced(&self, change: &QueuedChange) -> bool {
        self.announced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&change.device_id)
            .is_some_and(|c| *c == change.change_id)
    }

    /// Whether `change` may be announced now: if it was already, or if the
    /// allowance has room (then it counts as announced). If not, it is
    /// queued for its notices, which follow when its turn comes.
    pub fn may_announce(&self, change: &QueuedChange) -> bool {
        if self.was_announced(change) {
            return true;
        }
        if self.allowance.take(1) == 1 {
            self.announced(change);
            return true;
        }
        self.queue(vec![change.clone()]);
        false
    }

    /// Queues changes whose notices are to be sent. One already waiting is
    /// not queued twice.
    pub fn queue(&self, changes: Vec<QueuedChange>) {
        if changes.is_empty() {
            return;
        }
        // The pacer ends only at shutdown; the change is recorded, and its
        // notices are sent again when the manager next starts.
        let _ = self.queue.send(changes);
    }

    /// The receiving end of the queue, once: [`pace_notices`] takes it.
    pub fn take_queue(&self) -> Option<mpsc::UnboundedReceiver<Vec<QueuedChange>>> {
        self.queued.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// How many changes wait for their notices.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// Sends the notices of the queued changes as [`Announcements::allowance`]
/// allows, in ticks of 100 ms. It runs on its own, not in the operator's
/// request: a change of a whole fleet takes longer to announce than any
/// request may take (5,000 devices at 200 notices a second: 50 s). A
/// notice is built when it goes out, and not at all for a change applied
/// or replaced meanwhile (a device would take a replaced change's notice,
/// whose `seq` is above its last, and be refused the service at its
/// `update`). Returns at once if another pacer has the queue.
pub async fn pace_notices(core: Arc<Core>, client: AsyncClient, shutdown: CancellationToken) {
    let Some(queued) = core.announcements.take_queue() else {
        return;
    };
    let waiting = core.announcements.waiting.clone();
    let take = |want| core.announcements.allowance.take(want);
    pace(queued, take, &waiting, shutdown, |tick| {
        let (core, client) = (core.clone(), client.clone());
        async move {
            let built = tokio::task::spawn_blocking(move || {
                let mut notices = Vec::new();
                for q in &tick {
                    let built = core.notices_if_pending(&q.device_id, &q.change_id);
                    if !built.is_empty() {
                        core.announcements.announced(q);
                    }
                    notices.extend(built);
                }
                notices
            })
            .await;
            if let Ok(notices) = built {
                crate::mqtt::publish_all(&client, notices).await;
            }
        }
    })
    .await
}

/// [`pace_notices`] with the allowance and the sending given.
async fn pace<T, F, Fut>(
    mut queued: mpsc::UnboundedReceiver<Vec<T>>,
    take: impl Fn(usize) -> usize,
    waiting_count: &AtomicUsize,
    shutdown: CancellationToken,
    mut send: F,
) where
    T: Clone + Eq + Hash,
    F: FnMut(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // In order, and as a set: a change queued again while it waits keeps
    // its place.
    let mut waiting = VecDeque::new();
    let mut queued_now = HashSet::new();
    let add = |items: Vec<T>, waiting: &mut VecDeque<T>, queued_now: &mut HashSet<T>| {
        for item in items {
            if queued_now.insert(item.clone()) {
                waiting.push_back(item);
            }
        }
    };
    let mut next = Instant::now();
    loop {
        waiting_count.store(waiting.len(), Ordering::Relaxed);
        if waiting.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                got = queued.recv() => match got {
                    Some(items) => add(items, &mut waiting, &mut queued_now),
                    None => return,
                },
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        while let Ok(items) = queued.try_recv() {
            add(items, &mut waiting, &mut queued_now);
        }
        let n = take(waiting.len());
        let tick: Vec<_> = waiting.drain(..n).collect();
        next = Instant::now() + Duration::from_millis(100);
        if tick.is_empty() {
            continue;
        }
        for item in &tick {
            queued_now.remove(item);
        }
        waiting_count.store(waiting.len(), Ordering::Relaxed);
        send(tick).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Sent = Arc<Mutex<Vec<(u128, Vec<u32>)>>>;

    /// A pacer of `u32`s drawing from `allowance`, and what it sent, by
    /// milliseconds since the start.
    fn pacer(
        allowance: Arc<Allowance>,
        shutdown: CancellationToken,
    ) -> (
        mpsc::UnboundedSender<Vec<u32>>,
        Sent,
        Arc<AtomicUsize>,
        tokio::task::JoinHandle<()>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let sent = Sent::default();
        let waiting = Arc::new(AtomicUsize::new(0));
        let start = Instant::now();
        let task = tokio::spawn({
            let (sent, waiting) = (sent.clone(), waiting.clone());
            async move {
                let take = |want| allowance.take(want);
                pace(rx, take, &waiting, shutdown, move |tick: Vec<u32>| {
                    sent.lock()
                        .unwrap()
                        .push((start.elapsed().as_millis(), tick));
                    async {}
                })
                .await
            }
        });
        (tx, sent, waiting, task)
    }

    /// Notices go out at most a tenth of the rate every 100 ms, however they
    /// were queued, and all of them: those of a second change too, and after
    /// the request that queued them is long over.
    #[tokio::test(start_paused = true)]
    async fn notices_are_paced_and_none_is_dropped() {
        let shutdown = CancellationToken::new();
        let (tx, sent, waiting, pacer) = pacer(Arc::new(Allowance::new(100)), shutdown.clone());
        tx.send((0..25).collect()).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(waiting.load(Ordering::Relaxed), 5, "counted as they wait");
        // A second change while the first is still being announced: its
        // notices fill the first one's last tick...
        tx.send((100..103).collect()).unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(waiting.load(Ordering::Relaxed), 0);
        // ...and a third long after: sent at once.
        tx.send(vec![200]).unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        shutdown.cancel();
        pacer.await.unwrap();

        let sent = sent.lock().unwrap();
        let at: Vec<u128> = sent.iter().map(|(t, _)| *t).collect();
        let sizes: Vec<usize> = sent.iter().map(|(_, n)| n.len()).collect();
        assert_eq!(at, [0, 100, 200, 1250]);
        assert_eq!(sizes, [10, 10, 8, 1], "{sent:?}");
        let all: Vec<u32> = sent.iter().flat_map(|(_, n)| n.clone()).collect();
        let want: Vec<u32> = (0..25).chain(100..103).chain([200]).collect();
        assert_eq!(all, want);
    }

    /// A change queued again while it waits (a restarted manager queues
    /// every pending change, and then each device that comes back and
    /// reports `online` queues its own) is sent once, in its first place;
    /// once sent, it may be queued again.
    #[tokio::test(start_paused = true)]
    async fn a_change_queued_twice_while_it_waits_is_sent_once() {
        let shutdown = CancellationToken::new();
        let (tx, sent, _, pacer) = pacer(Arc::new(Allowance::new(20)), shutdown.clone());
        tx.send((0..6).collect()).unwrap();
        tx.send(vec![5, 4, 0, 6]).unwrap();
        // 0 to 3 are sent by now, 6 still waits.
        tokio::time::sleep(Duration::from_millis(150)).await;
        tx.send(vec![6, 0]).unwrap();
        tokio::time::sleep(Duration::from_millis(400)).await;
        shutdown.cancel();
        pacer.await.unwrap();
        let all: Vec<u32> = sent
            .lock()
            .unwrap()
            .iter()
            .flat_map(|(_, n)| n.clone())
            .collect();
        assert_eq!(all, [0, 1, 2, 3, 4, 5, 6, 0]);
    }

    /// What others take from the allowance (poll replies that carry the
    /// change) the pacer does not send: together they stay within it.
    #[tokio::test(start_paused = true)]
    async fn the_pacer_and_poll_replies_share_one_allowance() {
        let shutdown = CancellationToken::new();
        let allowance = Arc::new(Allowance::new(100));
        let (tx, sent, _, pacer) = pacer(allowance.clone(), shutdown.clone());
        // Poll replies take 7 of the first tenth of a second's 10.
        assert_eq!(allowance.take(7), 7);
        tx.send((0..20).collect()).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // And all that came back 50 ms later (5 of them).
        assert_eq!(allowance.take(10), 5);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        shutdown.cancel();
        pacer.await.unwrap();
        let sent = sent.lock().unwrap();
        let sizes: Vec<usize> = sent.iter().map(|(_, n)| n.len()).collect();
        assert_eq!(sizes, [3, 5, 10, 2], "{sent:?}");
    }

    /// The allowance refills at its rate, up to a tenth of a second's worth.
    #[tokio::test(start_paused = true)]
    async fn the_allowance_refills_at_its_rate_up_to_a_tenth_of_a_second() {
        let allowance = Allowance::new(50);
        assert_eq!(allowance.take(100), 5);
        assert_eq!(allowance.take(1), 0);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(allowance.take(100), 2);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(allowance.take(100), 5);
        // Below 10 a second, one at a time.
        let slow = Allowance::new(2);
        assert_eq!(slow.take(5), 1);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(slow.take(5), 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(slow.take(5), 1);
    }
}

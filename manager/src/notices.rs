//! Service-change announcements, paced: a change reaches a device as its
//! notices (two: its tenant's topic and its bootstrap topic) or as `change`
//! in a poll reply, and the manager announces at most
//! `max_notices_per_sec / 2` changes a second whichever way they go, so a
//! fleet-wide change does not arrive as one thundering herd of re-keys and
//! reconnects. The operator API, the manager's broker connection (every
//! pending change again after a reconnect), `online` reports and polls
//! that find the allowance spent queue changes here, and one task sends
//! their notices ([`pace_notices`]). Where notices go, or whether they
//! reach anyone, is the broker's business: a change announced in its
//! notices is counted, not remembered (see [`Announcements`]).

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::AsyncClient;
use tokio::sync::Notify;
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
/// bucket holding a tenth of a second's worth at most. Its clock is
/// Tokio's.
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

    /// Gives back `n` taken and not used.
    pub fn give_back(&self, n: usize) {
        let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        left.0 = (left.0 + n as f64).min(self.most);
    }
}

/// Items waiting their turn, in order and each once: one queued again
/// while it waits keeps its place. One withdrawn (announced another way)
/// leaves the count at once and its place when its turn comes.
pub struct Queue<T> {
    order: VecDeque<T>,
    waiting: HashSet<T>,
}

impl<T: Clone + Eq + Hash> Default for Queue<T> {
    fn default() -> Queue<T> {
        Queue {
            order: VecDeque::new(),
            waiting: HashSet::new(),
        }
    }
}

impl<T: Clone + Eq + Hash> Queue<T> {
    fn push(&mut self, items: impl IntoIterator<Item = T>) {
        for item in items {
            if self.waiting.insert(item.clone()) {
                self.order.push_back(item);
            }
        }
    }

    fn withdraw(&mut self, item: &T) {
        self.waiting.remove(item);
        if self.waiting.is_empty() {
            self.order.clear();
        }
    }

    /// How many wait.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Up to `n` items from the front.
    fn pop(&mut self, n: usize) -> Vec<T> {
        let mut out = Vec::new();
        while out.len() < n {
            let Some(item) = self.order.pop_front() else {
                break;
            };
            if self.waiting.remove(&item) {
                out.push(item);
            }
        }
        out
    }
}

/// How long a change announced in a poll reply goes out again at once when
/// its device asks, with no turn of its own.
pub const ANNOUNCED_FOR: Duration = Duration::from_secs(60);

/// The changes waiting to be announced, and the allowance every way of
/// announcing one draws from.
///
/// A change announced in a poll reply (so to a device that was there to
/// take it) goes out again at once whenever its device asks within
/// [`ANNOUNCED_FOR`] (its polls, the notice after its `online` report),
/// with no turn of its own: announcing it to the same device again starts
/// no new re-key, and a device (compromised, or broken) that polls as fast
/// as it may would otherwise spend the allowance the rest of the fleet's
/// changes wait for; it spends one turn a minute at most. A notice the
/// pacer sends counts for no such thing: its device may have been away,
/// and when a fleet that was away comes back, each of its changes takes a
/// turn again.
pub struct Announcements {
    queue: Mutex<Queue<QueuedChange>>,
    queued: Notify,
    pub allowance: Allowance,
    /// The change last announced in a poll reply to each device, and when,
    /// by device id: one entry per device at most, dropped once its change
    /// is applied or replaced.
    announced: Mutex<std::collections::HashMap<String, (String, Instant)>>,
}

impl Announcements {
    /// `notices_per_sec`: the manager's `max_notices_per_sec`.
    pub fn new(notices_per_sec: usize) -> Announcements {
        let changes_per_sec = (notices_per_sec / crate::handlers::NOTICES_PER_CHANGE).max(1);
        Announcements {
            queue: Mutex::default(),
            queued: Notify::new(),
            allowance: Allowance::new(changes_per_sec),
            announced: Mutex::default(),
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue<QueuedChange>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn announced_map(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (String, Instant)>> {
        self.announced.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues changes whose notices are to be sent. One already waiting is
    /// not queued twice.
    pub fn push(&self, changes: Vec<QueuedChange>) {
        if changes.is_empty() {
            return;
        }
        self.queue().push(changes);
        self.queued.notify_one();
    }

    /// How many changes wait for their notices.
    pub fn waiting(&self) -> usize {
        self.queue().len()
    }

    /// The changes waiting, in their order.
    pub fn waiting_now(&self) -> Vec<QueuedChange> {
        let queue = self.queue();
        let mut seen = HashSet::new();
        queue
            .order
            .iter()
            .filter(|q| queue.waiting.contains(*q) && seen.insert(*q))
            .cloned()
            .collect()
    }

    /// Whether `change` was announced in a poll reply within
    /// [`ANNOUNCED_FOR`]: it then goes out again with no turn.
    pub fn was_announced(&self, change: &QueuedChange) -> bool {
        self.announced_map()
            .get(&change.device_id)
            .is_some_and(|(c, at)| *c == change.change_id && at.elapsed() < ANNOUNCED_FOR)
    }

    /// Whether `change` may go in a poll reply now: if it was announced
    /// in one lately, or if the allowance has room (it then counts as
    /// announced, and leaves the queue if it waits there). If not, it is
    /// queued for its notices, which follow when its turn comes.
    pub fn may_announce(&self, change: &QueuedChange) -> bool {
        if self.was_announced(change) {
            return true;
        }
        if self.allowance.take(1) == 1 {
            self.announced_map().insert(
                change.device_id.clone(),
                (change.change_id.clone(), Instant::now()),
            );
            self.queue().withdraw(change);
            return true;
        }
        self.push(vec![change.clone()]);
        false
    }

    /// `change` is no longer pending (applied, replaced, or its device
    /// reset): it leaves the queue, and is forgotten.
    pub fn settled(&self, change: &QueuedChange) {
        self.queue().withdraw(change);
        let mut announced = self.announced_map();
        if announced
            .get(&change.device_id)
            .is_some_and(|(c, _)| *c == change.change_id)
        {
            announced.remove(&change.device_id);
        }
    }

    /// Forgets every announcement: after the manager's broker connection
    /// was down, a device may have missed any of them.
    pub fn forget(&self) {
        self.announced_map().clear();
    }
}

/// Sends the notices of the queued changes as [`Announcements::allowance`]
/// allows, in ticks of 100 ms, until `shutdown`. It runs on its own, not
/// in the operator's request: a change of a whole fleet takes longer to
/// announce than any request may take (5,000 devices at 200 notices a
/// second: 50 s). A change takes the allowance only if it still needs its
/// notices when its turn comes: not if it was announced in a poll reply
/// meanwhile, nor once it is applied or replaced (a device would take a
/// replaced change's notice, whose `seq` is above its last, and be refused
/// the service at its `update`): its notices are built as they go out, from
/// the store.
pub async fn pace_notices(core: Arc<Core>, client: AsyncClient, shutdown: CancellationToken) {
    let announcements = &core.announcements;
    let needed = |q: &QueuedChange| !announcements.was_announced(q);
    pace(
        &announcements.queue,
        &announcements.queued,
        &announcements.allowance,
        needed,
        shutdown,
        |tick| {
            let (core, client) = (core.clone(), client.clone());
            async move {
                let built = tokio::task::spawn_blocking(move || core.notices_on_disk(&tick)).await;
                match built {
                    Ok((sent, notices)) => {
                        crate::mqtt::publish_all(&client, notices).await;
                        sent
                    }
                    Err(_) => 0,
                }
            }
        },
    )
    .await
}

/// [`pace_notices`] with the queue, the allowance, what still needs
/// sending and the sending given; `send` returns how many of its tick it
/// sent, and the allowance of the rest is given back.
async fn pace<T, F, Fut>(
    queue: &Mutex<Queue<T>>,
    queued: &Notify,
    allowance: &Allowance,
    mut needed: impl FnMut(&T) -> bool,
    shutdown: CancellationToken,
    mut send: F,
) where
    T: Clone + Eq + Hash,
    F: FnMut(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = usize>,
{
    let lock = || queue.lock().unwrap_or_else(|p| p.into_inner());
    let mut next = Instant::now();
    loop {
        // Told before looking: a push after the look wakes the wait.
        let told = queued.notified();
        if lock().is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = told => continue,
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(next) => {}
        }
        // Those that no longer need a turn leave on the way, taking none
        // of the allowance.
        let want = lock().len();
        let allowed = allowance.take(want);
        let mut tick = Vec::new();
        while tick.len() < allowed {
            let popped = lock().pop(allowed - tick.len());
            if popped.is_empty() {
                break;
            }
            tick.extend(popped.into_iter().filter(|t| needed(t)));
        }
        next = Instant::now() + Duration::from_millis(100);
        let sent = if tick.is_empty() {
            0
        } else {
            let n = tick.len();
            send(tick).await.min(n)
        };
        allowance.give_back(allowed - sent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Sent = Arc<Mutex<Vec<(u128, Vec<u32>)>>>;

    /// A pacer of `u32`s, with what it needs to run, and what it sent, by
    /// milliseconds since the start.
    struct Pacer {
        queue: Arc<Mutex<Queue<u32>>>,
        queued: Arc<Notify>,
        allowance: Arc<Allowance>,
        /// Items that need sending no more when their turn comes.
        done: Arc<Mutex<HashSet<u32>>>,
        sent: Sent,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl Pacer {
        fn start(per_sec: usize) -> Pacer {
            let queue = Arc::new(Mutex::new(Queue::default()));
            let queued = Arc::new(Notify::new());
            let allowance = Arc::new(Allowance::new(per_sec));
            let done = Arc::new(Mutex::new(HashSet::new()));
            let sent = Sent::default();
            let shutdown = CancellationToken::new();
            let start = Instant::now();
            let task = tokio::spawn({
                let (queue, queued, allowance) = (queue.clone(), queued.clone(), allowance.clone());
                let (done, sent, shutdown) = (done.clone(), sent.clone(), shutdown.clone());
                async move {
                    // Items `done` are not sent when their turn comes (as
                    // a change applied meanwhile has no notices).
                    let needed = |_: &u32| true;
                    pace(
                        &queue,
                        &queued,
                        &allowance,
                        needed,
                        shutdown,
                        move |tick: Vec<u32>| {
                            let tick: Vec<u32> = {
                                let done = done.lock().unwrap();
                                tick.into_iter().filter(|n| !done.contains(n)).collect()
                            };
                            let n = tick.len();
                            if n > 0 {
                                sent.lock()
                                    .unwrap()
                                    .push((start.elapsed().as_millis(), tick));
                            }
                            async move { n }
                        },
                    )
                    .await
                }
            });
            Pacer {
                queue,
                queued,
                allowance,
                done,
                sent,
                shutdown,
                task,
            }
        }

        fn push(&self, items: impl IntoIterator<Item = u32>) {
            self.queue.lock().unwrap().push(items);
            self.queued.notify_one();
        }

        fn waiting(&self) -> usize {
            self.queue.lock().unwrap().len()
        }

        async fn stop(self) -> Vec<(u128, Vec<u32>)> {
            self.shutdown.cancel();
            self.task.await.unwrap();
            let sent = self.sent.lock().unwrap();
            sent.clone()
        }
    }

    fn flat(sent: &[(u128, Vec<u32>)]) -> Vec<u32> {
        sent.iter().flat_map(|(_, n)| n.clone()).collect()
    }

    /// Notices go out at most a tenth of the rate every 100 ms, however they
    /// were queued, and all of them: those of a second change too, and after
    /// the request that queued them is long over.
    #[tokio::test(start_paused = true)]
    async fn notices_are_paced_and_none_is_dropped() {
        let pacer = Pacer::start(100);
        pacer.push(0..25);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(pacer.waiting(), 5, "counted as they wait");
        // A second change while the first is still being announced: its
        // notices fill the first one's last tick...
        pacer.push(100..103);
        tokio::time::sleep(Duration::from_millis(1100)).await;
        assert_eq!(pacer.waiting(), 0);
        // ...and a third long after: sent at once.
        pacer.push([200]);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let sent = pacer.stop().await;
        let at: Vec<u128> = sent.iter().map(|(t, _)| *t).collect();
        let sizes: Vec<usize> = sent.iter().map(|(_, n)| n.len()).collect();
        assert_eq!(at, [0, 100, 200, 1250]);
        assert_eq!(sizes, [10, 10, 8, 1], "{sent:?}");
        let want: Vec<u32> = (0..25).chain(100..103).chain([200]).collect();
        assert_eq!(flat(&sent), want);
    }

    /// A change queued again while it waits (a restarted manager queues
    /// every pending change, and then each device that comes back and
    /// reports `online` queues its own) is sent once, in its first place;
    /// once sent, it may be queued again.
    #[tokio::test(start_paused = true)]
    async fn a_change_queued_twice_while_it_waits_is_sent_once() {
        let pacer = Pacer::start(20);
        pacer.push(0..6);
        pacer.push([5, 4, 0, 6]);
        // 0 to 3 are sent by now, 6 still waits.
        tokio::time::sleep(Duration::from_millis(150)).await;
        pacer.push([6, 0]);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(flat(&pacer.stop().await), [0, 1, 2, 3, 4, 5, 6, 0]);
    }

    /// What others take from the allowance (poll replies that carry the
    /// change) the pacer does not send: together they stay within it. A
    /// change withdrawn (announced in a poll reply), or that needs no
    /// notice by its turn (applied, replaced), takes none of it, and
    /// leaves the count at once.
    #[tokio::test(start_paused = true)]
    async fn the_pacer_and_poll_replies_share_one_allowance() {
        let pacer = Pacer::start(100);
        // Poll replies take 7 of the first tenth of a second's 10.
        assert_eq!(pacer.allowance.take(7), 7);
        pacer.push(0..20);
        tokio::time::sleep(Duration::from_millis(50)).await;
        // And all that came back 50 ms later (5 of them), announcing 3, 4,
        // 5, 6 and 7, which leave the queue.
        assert_eq!(pacer.allowance.take(10), 5);
        for n in 3..8 {
            pacer.queue.lock().unwrap().withdraw(&n);
        }
        assert_eq!(pacer.waiting(), 20 - 3 - 5);
        // 8 to 11 were applied meanwhile: they need no notice.
        pacer.done.lock().unwrap().extend(8..12);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let sent = pacer.stop().await;
        let ticks: Vec<Vec<u32>> = sent.iter().map(|(_, n)| n.clone()).collect();
        // (8 to 11 took their places in the second tick, and gave their
        // allowance back for the third.)
        assert_eq!(
            ticks,
            [vec![0, 1, 2], vec![12], (13..20).collect()],
            "{sent:?}"
        );
    }

    fn change(d: &str, c: &str) -> QueuedChange {
        QueuedChange {
            device_id: d.into(),
            change_id: c.into(),
        }
    }

    /// A change announced in a poll reply goes out again with no turn for
    /// a minute, and not once it is settled, replaced or forgotten; one
    /// that found no room waits in the queue, once.
    #[tokio::test(start_paused = true)]
    async fn a_change_announced_in_a_poll_reply_needs_no_turn_for_a_while() {
        let announcements = Announcements::new(20); // one tick holds one change
        let (a, b) = (change("d1", "c1"), change("d2", "c2"));
        assert!(announcements.may_announce(&a));
        assert!(announcements.was_announced(&a));
        assert!(!announcements.may_announce(&b), "no room left");
        assert!(!announcements.may_announce(&b));
        assert_eq!(announcements.waiting_now(), std::slice::from_ref(&b));
        for _ in 0..10 {
            assert!(announcements.may_announce(&a), "announced lately");
        }
        // Its turn comes back after a minute.
        tokio::time::advance(ANNOUNCED_FOR).await;
        assert!(!announcements.was_announced(&a));
        // Room again: b is announced, and leaves the queue.
        assert!(announcements.may_announce(&b));
        assert!(announcements.waiting_now().is_empty());
        // A newer change of d2 is not the one announced.
        assert!(!announcements.was_announced(&change("d2", "c3")));
        announcements.settled(&b);
        assert!(!announcements.was_announced(&b));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(announcements.may_announce(&a));
        announcements.forget();
        assert!(!announcements.was_announced(&a));
        // Settled while it waits: it leaves the queue.
        announcements.push(vec![change("d3", "c4")]);
        assert_eq!(announcements.waiting(), 1);
        announcements.settled(&change("d3", "c4"));
        assert_eq!(announcements.waiting(), 0);
    }

    /// The allowance refills at its rate, up to a tenth of a second's worth.
    #[tokio::test(start_paused = true)]
    async fn the_allowance_refills_at_its_rate_up_to_a_tenth_of_a_second() {
        let allowance = Allowance::new(50);
        assert_eq!(allowance.take(100), 5);
        assert_eq!(allowance.take(1), 0);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(allowance.take(100), 2);
        allowance.give_back(1);
        assert_eq!(allowance.take(100), 1);
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

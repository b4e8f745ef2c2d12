//! The manager's MQTT side: one task polls the rumqttc event loop and hands
//! each request to a pool of workers; handlers run on blocking threads.
//!
//! Requests wait in four queues ([`Class`]): those on tenant topics, which
//! only a device connected with its certificate can publish, before those
//! on bootstrap topics, which anyone can; a flood on the bootstrap listener
//! does not delay devices in their services, nor registered devices whose
//! ids it does not name. A request that waited longer than `shed_after_ms`
//! is answered `busy` (topics.md §5.4), or dropped if anyone could have
//! sent it; one that finds its queue full ([`QUEUED_BYTES_MAX`]) is
//! dropped, so the event loop never stops reading (the workers' replies go
//! out through it), and no class of requests takes the room of another.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_protocol::topic::manager_filters;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use std::collections::{HashMap, VecDeque};

use crate::handlers::{Core, Intake, Outgoing};
use crate::ManagerConfig;

/// Longest a revocation waits for its CRL, so revocations close together
/// share one write. With the broker's polling and grace it stays well
/// under a second from re-key to the old session's end.
const CRL_DEBOUNCE: Duration = Duration::from_millis(100);

pub fn connect(config: &ManagerConfig) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (host, port) = config.broker_host_port()?;
    let mut opts = MqttOptions::new(&config.client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    // A persistent session: requests published while the manager restarts
    // wait for it in the broker.
    opts.set_clean_session(false);
    opts.set_max_packet_size(512 * 1024, 512 * 1024);
    opts.set_inflight(200);
    if let Some(user) = &config.broker_username {
        let password = match (&config.broker_password, &config.broker_password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("broker_password_file {}: {e}", file.display()))?
                .trim()
                .to_string(),
            (None, None) => String::new(),
        };
        opts.set_credentials(user.clone(), password);
    }
    Ok(AsyncClient::new(opts, 10_000))
}

/// Bytes of requests that may wait for a worker, by [`Class`]; past it,
/// more of that class are dropped. Each class has its own, so a bootstrap
/// flood takes no room from the others.
pub const QUEUED_BYTES_MAX: [usize; CLASSES] = [16 << 20, 40 << 20, 40 << 20, 8 << 20];

/// How many [`Class`]es there are.
pub const CLASSES: usize = 4;

/// Who sent a request, as far as its topic tells, in the order workers
/// take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// On a tenant topic: a device connected with its certificate.
    Tenant = 0,
    /// On a bootstrap topic, for a device id the registry has and no
    /// request for which failed its checks lately.
    Registered = 1,
    /// On a bootstrap topic, for a registered id with a request refused
    /// within the failure window (`auth_failed`, `stale`, `replayed`):
    /// someone besides the device may be sending under its id. A flood
    /// that names registered ids lands here after one refusal per id.
    Contested = 2,
    /// On a bootstrap topic, for any other id: anyone may send these.
    Unknown = 3,
}

impl Class {
    fn of(core: &Core, topic: &str) -> Class {
        match fleet_protocol::Topic::parse(topic) {
            Ok(t) if t.tenant.is_some() => Class::Tenant,
            Ok(fleet_protocol::Topic {
                route: fleet_protocol::Route::Request(_, device),
                ..
            }) if core.store.is_registered(&device) => {
                if core.contested(&device) {
                    Class::Contested
                } else {
                    Class::Registered
                }
            }
            _ => Class::Unknown,
        }
    }

    /// Whether a late request of this class is dropped rather than
    /// answered `busy`: most of its kind are a flood's, and each `busy` is
    /// a signature.
    fn dropped_when_late(self) -> bool {
        matches!(self, Class::Contested | Class::Unknown)
    }
}

/// What a queued request is counted as besides its payload and topic.
const QUEUED_OVERHEAD: usize = 256;

/// A request waiting for a worker.
struct Queued {
    arrived: Instant,
    publish: Publish,
    class: Class,
}

impl Queued {
    fn size(&self) -> usize {
        self.publish.payload.len() + self.publish.topic.len() + QUEUED_OVERHEAD
    }

    /// The same request counted in `class` from now on.
    fn reclassed(mut self, class: Class, intake: &Intake) -> Queued {
        intake.waiting_bytes[self.class as usize].fetch_sub(self.size(), Ordering::Relaxed);
        intake.waiting_bytes[class as usize].fetch_add(self.size(), Ordering::Relaxed);
        self.class = class;
        self
    }
}

/// Contested requests waiting for the same device id at most: past it, more
/// for that id are dropped, so a flood naming one id holds little room.
const CONTESTED_PER_ID: usize = 8;

/// The queues, one per [`Class`], taken in its order; contested requests
/// one device id at a time, in turn.
struct Queues {
    rx: [mpsc::UnboundedReceiver<Queued>; CLASSES],
    turns: Turns,
}

impl Queues {
    /// The queues and their senders, by class.
    fn new() -> (Queues, [mpsc::UnboundedSender<Queued>; CLASSES]) {
        let channels: [_; CLASSES] = std::array::from_fn(|_| mpsc::unbounded_channel());
        let [a, b, c, d] = channels;
        let queues = Queues {
            rx: [a.1, b.1, c.1, d.1],
            turns: Turns::default(),
        };
        (queues, [a.0, b.0, c.0, d.0])
    }

    /// The next request to carry out. Contested ones that came in join
    /// their device's turn first; one dropped there is counted in `intake`.
    /// A registered id's request is looked at again when its turn comes:
    /// if its id was contested meanwhile (`contested`: a burst for one id
    /// arrives before the first of it is refused), it joins the turns.
    async fn next(
        &mut self,
        intake: &Intake,
        contested_now: impl Fn(&str) -> bool,
    ) -> Option<Queued> {
        loop {
            let [tenant, registered, contested, unknown] = &mut self.rx;
            while let Ok(job) = contested.try_recv() {
                self.turns.push(job, intake);
            }
            if let Ok(q) = tenant.try_recv() {
                return Some(q);
            }
            if let Ok(q) = registered.try_recv() {
                match self.turns.unless_contested(q, intake, &contested_now) {
                    Some(q) => return Some(q),
                    None => continue,
                }
            }
            if let Some(q) = self.turns.pop() {
                return Some(q);
            }
            if let Ok(q) = unknown.try_recv() {
                return Some(q);
            }
            tokio::select! {
                biased;
                Some(q) = tenant.recv() => return Some(q),
                Some(q) = registered.recv() => {
                    if let Some(q) = self.turns.unless_contested(q, intake, &contested_now) {
                        return Some(q);
                    }
                }
                Some(q) = contested.recv() => self.turns.push(q, intake),
                Some(q) = unknown.recv() => return Some(q),
                else => return None,
            }
        }
    }
}

/// Contested requests by device id, served in turn: each id with a request
/// waiting gives one in its turn, so a flood of many requests naming a few
/// ids delays another id's by a request per id it names, not by the flood.
#[derive(Default)]
struct Turns {
    by_id: HashMap<String, VecDeque<Queued>>,
    order: VecDeque<String>,
}

impl Turns {
    /// The device id of a request topic: its last level.
    fn device_of(topic: &str) -> &str {
        topic.rsplit('/').next().unwrap_or_default()
    }

    fn push(&mut self, job: Queued, intake: &Intake) {
        let id = Self::device_of(&job.publish.topic);
        let waiting = self.by_id.entry(id.to_owned()).or_default();
        if waiting.len() >= CONTESTED_PER_ID {
            intake.waiting_bytes[job.class as usize].fetch_sub(job.size(), Ordering::Relaxed);
            intake.dropped.fetch_add(1, Ordering::Relaxed);
            debug!(topic = %job.publish.topic, "request dropped: {CONTESTED_PER_ID} wait for its id already");
            return;
        }
        if waiting.is_empty() {
            self.order.push_back(id.to_owned());
        }
        waiting.push_back(job);
    }

    /// `job`, a registered id's request, back if its id is not contested
    /// now; otherwise it joins the turns.
    fn unless_contested(
        &mut self,
        job: Queued,
        intake: &Intake,
        contested_now: impl Fn(&str) -> bool,
    ) -> Option<Queued> {
        if !contested_now(Self::device_of(&job.publish.topic)) {
            return Some(job);
        }
        self.push(job.reclassed(Class::Contested, intake), intake);
        None
    }

    fn pop(&mut self) -> Option<Queued> {
        let id = self.order.pop_front()?;
        let waiting = self.by_id.get_mut(&id)?;
        let job = waiting.pop_front();
        if waiting.is_empty() {
            self.by_id.remove(&id);
        } else {
            self.order.push_back(id);
        }
        job
    }
}

pub async fn publish_all(client: &AsyncClient, out: Vec<Outgoing>) {
    for msg in out {
        if let Err(err) = client
            .publish(msg.topic.clone(), QoS::AtLeastOnce, false, msg.payload)
            .await
        {
            warn!(topic = %msg.topic, error = %err, "publish failed");
        }
    }
}

/// Polls the event loop until shutdown. `subscribed` turns true once the
/// request filters are acknowledged.
pub async fn serve(
    core: Arc<Core>,
    client: AsyncClient,
    mut eventloop: EventLoop,
    subscribed: watch::Sender<bool>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let (queues, senders) = Queues::new();
    let shed_after = Duration::from_millis(core.config.shed_after_ms);
    // CRLs are rewritten by one task, at most every CRL_DEBOUNCE, after the
    // replies that revoked certificates are published: a migration of many
    // devices writes a few CRLs, not one per device.
    let crl_due = Arc::new(tokio::sync::Notify::new());
    {
        let (core, due, stop) = (core.clone(), crl_due.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = due.notified() => {}
                }
                tokio::time::sleep(CRL_DEBOUNCE).await;
                let core = core.clone();
                let _ = tokio::task::spawn_blocking(move || core.write_pending_crls()).await;
            }
            // Whatever is still pending is written before the manager stops.
            let _ = tokio::task::spawn_blocking(move || core.write_pending_crls()).await;
        });
    }
    let queues = Arc::new(tokio::sync::Mutex::new(queues));
    for _ in 0..core.config.workers {
        let (core, client, queues, crl_due, stop) = (
            core.clone(),
            client.clone(),
            queues.clone(),
            crl_due.clone(),
            shutdown.clone(),
        );
        tracker.spawn(async move {
            loop {
                // At shutdown what is still queued is left: its replies
                // could not be sent.
                let next = tokio::select! {
                    biased;
                    _ = stop.cancelled() => None,
                    next = async {
                        queues.lock().await.next(&core.intake, |id| core.contested(id)).await
                    } => next,
                };
                let Some(job) = next else { break };
                core.intake.waiting_bytes[job.class as usize]
                    .fetch_sub(job.size(), Ordering::Relaxed);
                let waited = job.arrived.elapsed();
                // For an id nobody registered, or one under contest, `busy`
                // (a signature) is not worth its cost: such a request is
                // dropped (§5.4).
                if job.class.dropped_when_late() && waited > shed_after {
                    core.intake.dropped.fetch_add(1, Ordering::Relaxed);
                    debug!(topic = %job.publish.topic, class = ?job.class, "request dropped: it waited {waited:?}");
                    continue;
                }
                let core2 = core.clone();
                let publish = job.publish;
                let out = tokio::task::spawn_blocking(move || {
                    if waited > shed_after {
                        core2.busy(&publish.topic, &publish.payload, waited)
                    } else {
                        core2.handle(&publish.topic, &publish.payload)
                    }
                })
                .await;
                match out {
                    Ok(out) => {
                        publish_all(&client, out).await;
                        if core.has_pending_crls() {
                            crl_due.notify_one();
                        }
                    }
                    Err(err) => warn!(error = %err, "handler panicked"),
                }
            }
        });
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(100);
                info!(
                    session_present = ack.session_present,
                    "manager connected to broker"
                );
                // Sent from a task of their own: the client's channel is
                // the one the workers' replies fill while the connection is
                // down, and only this loop's polling empties it.
                let subscriber = client.clone();
                tracker.spawn(async move {
                    // Bootstrap requests at QoS 0: the broker then hands
                    // them over without waiting for an acknowledgement of
                    // each 100, which held the manager to about 5,600 a
                    // second under a flood, while the broker skipped the
                    // rest (BENCHMARKS.md, "A request flood"); the manager's
                    // own queues decide what is dropped. A request in
                    // flight when the connection drops is lost; its device
                    // asks again. Tenant requests stay at QoS 1.
                    for filter in manager_filters() {
                        let qos = if filter.starts_with("/tenants/") {
                            QoS::AtLeastOnce
                        } else {
                            QoS::AtMostOnce
                        };
                        if let Err(err) = subscriber.subscribe(filter, qos).await {
                            warn!(error = %err, "subscribe failed");
                        }
                    }
                });
                // Every pending change is announced again, paced with
                // the operator's changes (a reconnect with thousands
                // pending sent them all at once): while the connection was
                // down, a device may have missed any announcement.
                core.announcements.forget();
                let core = core.clone();
                tracker.spawn(async move {
                    let reading = core.clone();
                    match tokio::task::spawn_blocking(move || reading.pending_changes()).await {
                        Ok(Ok(pending)) => {
                            if !pending.is_empty() {
                                info!(
                                    devices = pending.len(),
                                    "re-sending pending service-change notices"
                                );
                            }
                            core.announcements.push(pending)
                        }
                        Ok(Err(err)) => warn!(error = %err, "pending changes not read"),
                        Err(err) => warn!(error = %err, "pending changes task failed"),
                    }
                });
            }
            // Subscribed only if the broker granted the filters (an
            // external broker's ACL may refuse them).
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let granted = !ack
                    .return_codes
                    .contains(&rumqttc::SubscribeReasonCode::Failure);
                if !granted {
                    warn!("the broker refused the manager's subscription");
                }
                let _ = subscribed.send(granted);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let class = Class::of(&core, &p.topic);
                let job = Queued {
                    arrived: Instant::now(),
                    publish: p,
                    class,
                };
                let size = job.size();
                let intake = &core.intake;
                intake.received.fetch_add(1, Ordering::Relaxed);
                let max = QUEUED_BYTES_MAX[class as usize];
                let queue = &intake.waiting_bytes[class as usize];
                if queue.fetch_add(size, Ordering::Relaxed) + size > max {
                    queue.fetch_sub(size, Ordering::Relaxed);
                    intake.dropped.fetch_add(1, Ordering::Relaxed);
                    let loud = fleet_broker::log_pace::LogPace::loud_in(&core.dropped_logged);
                    let topic = fleet_broker::frontdoor::shown::Shown(&job.publish.topic);
                    fleet_broker::paced!(loud, warn, %topic, "request dropped: {max} bytes of its kind wait already");
                    continue;
                }
                if senders[class as usize].send(job).is_err() {
                    break;
                }
            }
            Ok(other) => debug!(event = ?other, "mqtt"),
            Err(err) => {
                let _ = subscribed.send(false);
                warn!(error = %err, "broker connection lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    // Not awaited: with the client's channel full, nothing would take it.
    let _ = client.try_disconnect();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(topic: &str, class: Class) -> Queued {
        Queued {
            arrived: Instant::now(),
            publish: Publish::new(topic, QoS::AtLeastOnce, vec![0u8; 10]),
            class,
        }
    }

    #[test]
    fn a_request_is_classed_by_its_topic_and_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("store")).unwrap();
        let pki = fleet_pki::Pki::open_or_create(&dir.path().join("certs")).unwrap();
        let core = Core::new(store, Arc::new(pki), ManagerConfig::default());
        core.store
            .put_registration(&crate::store::Registration {
                sv: crate::store::SCHEMA_VERSION,
                device_id: "dev1".into(),
                initial_service: "svcA".into(),
                factory_key: None,
                registered_ms: fleet_protocol::now_ms(),
            })
            .unwrap();
        let classes = |core: &Core| {
            [
                "/tenants/svcA/fleet/v1/poll/dev1",
                "/tenants/svcA/fleet/v1/poll/ghost",
                "fleet/v1/activate/dev1",
                "fleet/v1/update/dev1",
                "fleet/v1/activate/ghost",
                "fleet/v1/activate/dev1/reply",
                "garbage",
            ]
            .map(|topic| Class::of(core, topic))
        };
        use Class::*;
        assert_eq!(
            classes(&core),
            [Tenant, Tenant, Registered, Registered, Unknown, Unknown, Unknown]
        );
        // A request for dev1 fails its checks: dev1's id is contested.
        use fleet_protocol::{crypto, ActivateRequest, Envelope, Kind};
        let body = ActivateRequest {
            device_id: "dev1".into(),
            service_id: None,
            nonce: crypto::random_bytes(16),
            ts: fleet_protocol::now_ms(),
            eph: crypto::public_point(&crypto::generate_p256().unwrap()).unwrap(),
        };
        let someone = crypto::generate_p256().unwrap();
        let forged = Envelope::build(Kind::Activate, &body, |tbs| crypto::sign(&someone, tbs))
            .unwrap()
            .encode();
        core.handle("fleet/v1/activate/dev1", &forged);
        assert_eq!(
            classes(&core),
            [Tenant, Tenant, Contested, Contested, Unknown, Unknown, Unknown]
        );
        // Late, these two are dropped rather than answered `busy`.
        let dropped = [Tenant, Registered, Contested, Unknown].map(Class::dropped_when_late);
        assert_eq!(dropped, [false, false, true, true]);
    }

    #[tokio::test]
    async fn contested_requests_are_taken_a_device_id_at_a_time() {
        let (mut queues, senders) = Queues::new();
        let intake = Intake::default();
        let mut sent = Vec::new();
        // A flood naming x and y, 20 each, then one request for z.
        for i in 0..20 {
            sent.push(format!("fleet/v1/activate/x#{i}"));
            sent.push(format!("fleet/v1/activate/y#{i}"));
        }
        sent.push("fleet/v1/activate/z".to_string());
        for topic in &sent {
            // The device id is the last segment; `#{i}` only tells copies apart.
            let job = queued(topic, Class::Contested);
            let mut job = job;
            job.publish.topic = topic.split('#').next().unwrap().to_string();
            job.publish.payload = topic.clone().into_bytes().into();
            intake.waiting_bytes[Class::Contested as usize]
                .fetch_add(job.size(), Ordering::Relaxed);
            senders[Class::Contested as usize].send(job).unwrap();
        }
        drop(senders);
        let mut order = Vec::new();
        while let Some(q) = queues.next(&intake, |_| false).await {
            order.push(String::from_utf8(q.publish.payload.to_vec()).unwrap());
        }
        // x and y in turn, 8 each (the rest dropped), z after one of each.
        let short = |s: &String| s.trim_start_matches("fleet/v1/activate/").to_string();
        let order: Vec<_> = order.iter().map(short).collect();
        assert_eq!(&order[..3], ["x#0", "y#0", "z"]);
        assert_eq!(order.len(), 2 * CONTESTED_PER_ID + 1);
        assert_eq!(
            order[3..],
            (1..CONTESTED_PER_ID)
                .flat_map(|i| [format!("x#{i}"), format!("y#{i}")])
                .collect::<Vec<_>>()
        );
        assert_eq!(
            intake.dropped.load(Ordering::Relaxed),
            2 * (20 - CONTESTED_PER_ID) as u64
        );
    }

    /// A burst for one id arrives before the first of it is refused: the
    /// rest of it joins the turns once the id is contested.
    #[tokio::test]
    async fn a_registered_request_whose_id_was_contested_meanwhile_waits_its_turn() {
        let (mut queues, senders) = Queues::new();
        let intake = Intake::default();
        for topic in [
            "fleet/v1/activate/x",
            "fleet/v1/activate/x",
            "fleet/v1/activate/x",
            "fleet/v1/activate/y",
        ] {
            let job = queued(topic, Class::Registered);
            intake.waiting_bytes[Class::Registered as usize]
                .fetch_add(job.size(), Ordering::Relaxed);
            senders[Class::Registered as usize].send(job).unwrap();
        }
        let z = queued("fleet/v1/activate/z", Class::Contested);
        intake.waiting_bytes[Class::Contested as usize].fetch_add(z.size(), Ordering::Relaxed);
        senders[Class::Contested as usize].send(z).unwrap();
        drop(senders);
        let contested = |id: &str| id == "x";
        let mut order = Vec::new();
        while let Some(q) = queues.next(&intake, contested).await {
            intake.waiting_bytes[q.class as usize].fetch_sub(q.size(), Ordering::Relaxed);
            order.push((q.publish.topic, q.class));
        }
        use Class::*;
        let x = "fleet/v1/activate/x".to_string();
        assert_eq!(
            order,
            [
                ("fleet/v1/activate/y".to_string(), Registered),
                ("fleet/v1/activate/z".to_string(), Contested),
                (x.clone(), Contested),
                (x.clone(), Contested),
                (x, Contested),
            ]
        );
        assert_eq!(intake.waiting(), 0, "bytes moved with the requests");
    }

    #[tokio::test]
    async fn tenant_then_registered_then_contested_then_unknown() {
        let (mut queues, senders) = Queues::new();
        for (topic, class) in [
            ("fleet/v1/activate/ghost", Class::Unknown),
            ("fleet/v1/activate/forged", Class::Contested),
            ("fleet/v1/activate/dev1", Class::Registered),
            ("/tenants/svcA/fleet/v1/poll/c", Class::Tenant),
            ("fleet/v1/poll/ghost2", Class::Unknown),
            ("fleet/v1/update/dev2", Class::Registered),
            ("fleet/v1/update/forged2", Class::Contested),
            ("/tenants/svcB/fleet/v1/status/e", Class::Tenant),
        ] {
            senders[class as usize].send(queued(topic, class)).unwrap();
        }
        drop(senders);
        let intake = Intake::default();
        let mut order = Vec::new();
        while let Some(q) = queues.next(&intake, |_| false).await {
            order.push(q.publish.topic);
        }
        assert_eq!(
            order,
            [
                "/tenants/svcA/fleet/v1/poll/c",
                "/tenants/svcB/fleet/v1/status/e",
                "fleet/v1/activate/dev1",
                "fleet/v1/update/dev2",
                "fleet/v1/activate/forged",
                "fleet/v1/update/forged2",
                "fleet/v1/activate/ghost",
                "fleet/v1/poll/ghost2",
            ]
        );
    }
}

//! A manager behind its load (topics.md §5.4): requests that waited too long
//! are answered `busy` and change nothing, and requests on tenant topics go
//! before a backlog of bootstrap ones. The backlog is made by publishing
//! while the manager is stopped: its persistent session keeps the requests
//! in the broker, and they reach the restarted manager at once.

use std::sync::atomic::Ordering;
use std::time::Duration;

use fleet_protocol::crypto;
use fleet_protocol::{Envelope, Reply, RequestKind, Route, Status, Topic};
use fleet_testkit::{eventually, Fleet, Probe};

use crate::wire::{activate, activate_request, poll, with_device, HandDevice};

const T: Duration = Duration::from_secs(20);

/// A fleet whose manager has one worker and sheds after `shed_after_ms`,
/// with `dev1` registered (and activated if `active`), and a privileged
/// probe that sees every reply.
async fn fleet(shed_after_ms: u64, active: bool) -> (Fleet, Probe, HandDevice) {
    let fleet = Fleet::start_with(|c| {
        c.workers = 1;
        c.shed_after_ms = shed_after_ms;
    })
    .await
    .unwrap();
    let (fleet, probe, mut dev) = with_device(fleet, "dev1").await;
    probe
        .subscribe("/tenants/+/fleet/v1/+/+/reply")
        .await
        .unwrap();
    // Its own requests back: all are in the broker once all are back.
    probe.subscribe("fleet/v1/activate/+").await.unwrap();
    probe.subscribe("/tenants/+/fleet/v1/poll/+").await.unwrap();
    if active {
        activate(&fleet, &probe, &mut dev).await;
    }
    (fleet, probe, dev)
}

/// `n` ids nobody registered.
fn ghosts(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("ghost-{i:04}")).collect()
}

/// Registers `n` ids, `reg-0000` and on, with a factory key nobody holds.
async fn register(fleet: &Fleet, n: usize) -> Vec<String> {
    let point = crypto::public_point(&crypto::generate_p256().unwrap()).unwrap();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = format!("reg-{i:04}");
        fleet.register(&id, "svcA", Some(&point)).await.unwrap();
        ids.push(id);
    }
    ids
}

/// Activate requests for `ids`, signed with a key that is none of theirs,
/// published on their bootstrap topics; their nonces by id.
async fn activations(probe: &Probe, ids: &[String]) -> Vec<(String, Vec<u8>)> {
    let key = crypto::generate_p256().unwrap();
    let mut sent = Vec::new();
    for id in ids {
        let eph = crypto::generate_p256().unwrap();
        let request = activate_request(id, &eph, &key);
        let nonce = Envelope::decode(&request)
            .unwrap()
            .body::<fleet_protocol::ActivateRequest>()
            .unwrap()
            .nonce;
        let topic = Topic::bootstrap(Route::Request(RequestKind::Activate, id.clone()));
        probe.publish(&topic.to_string(), request).await.unwrap();
        sent.push((id.clone(), nonce));
    }
    sent
}

/// Waits until the broker has routed the `n` requests whose topics start
/// with `prefix` (the probe subscribes to its own requests).
async fn routed(probe: &Probe, prefix: &str, n: usize) {
    eventually(T, "the requests to reach the broker", || {
        let got = probe
            .messages()
            .iter()
            .filter(|m| m.topic.starts_with(prefix) && !m.topic.ends_with("/reply"))
            .count();
        async move { (got >= n).then_some(()) }
    })
    .await
    .unwrap();
}

/// Waits until the manager has taken `n` requests from the broker, polled
/// every millisecond: `eventually` backs off to 200 ms, in which its one
/// worker would carry out some 2,000.
async fn taken_in(fleet: &Fleet, n: usize) {
    let received = &fleet.core().intake.received;
    tokio::time::timeout(T, async {
        while received.load(Ordering::Relaxed) < n as u64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the backlog to reach the manager");
}

/// The reply on `topic`, its manager signature checked.
fn reply_on(fleet: &Fleet, probe: &Probe, topic: &str) -> Option<Reply> {
    let got = probe.on(topic).pop()?;
    let env = Envelope::decode(&got.payload).expect("reply decodes");
    assert!(env.crc_ok());
    assert!(
        crypto::verify(&fleet.core().pki.signing_key(), &env.tbs(), &env.auth),
        "reply is signed by the manager"
    );
    Some(env.body().expect("reply body"))
}

/// The bootstrap activate reply topic of `id`.
fn reply_topic(id: &str) -> String {
    Topic::bootstrap(Route::Reply(RequestKind::Activate, id.to_owned())).to_string()
}

/// Makes `ids` contested (topics.md §5.4): one refused activation each,
/// waited for.
async fn contest(probe: &Probe, ids: &[String]) {
    let first = activations(probe, ids).await;
    eventually(T, "the first requests refused", || {
        let refused = first
            .iter()
            .all(|(id, _)| !probe.on(&reply_topic(id)).is_empty());
        async move { refused.then_some(()) }
    })
    .await
    .unwrap();
}

/// dev1's activation `request`, sealed to `eph`, published by `activator`;
/// waits for its `nth` reply, which must carry its UUID.
async fn activated(
    fleet: &Fleet,
    probe: &Probe,
    activator: &Probe,
    dev: &mut HandDevice,
    (eph, request): (&openssl::pkey::PKey<openssl::pkey::Private>, Vec<u8>),
    nth: usize,
) {
    let topic = Topic::bootstrap(Route::Request(RequestKind::Activate, dev.id.clone()));
    activator
        .publish(&topic.to_string(), request)
        .await
        .unwrap();
    probe.wait_for(&reply_topic(&dev.id), nth, T).await.unwrap();
    let reply = reply_on(fleet, probe, &reply_topic(&dev.id)).unwrap();
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    dev.uuid = crypto::unseal(eph, &dev.id, reply.uuid.as_ref().unwrap()).ok();
    assert!(dev.uuid.is_some());
}

/// Waits until every one of `total` requests the manager took is answered
/// with a flood reply or dropped (`not_flood` of them are neither: a
/// request of dev1's); the flood replies after message `at`, and how many
/// were dropped.
async fn settled(
    fleet: &Fleet,
    probe: &Probe,
    total: u64,
    not_flood: u64,
    at: usize,
) -> (usize, u64) {
    let intake = &fleet.core().intake;
    let dropped = eventually(T, "every request of the flood answered or dropped", || {
        let answered = probe
            .messages()
            .iter()
            .filter(|m| is_flood_reply(m))
            .count() as u64;
        let dropped = intake.dropped.load(Ordering::Relaxed);
        async move { (answered + dropped + not_flood == total).then_some(dropped) }
    })
    .await
    .unwrap();
    let after = probe.messages()[at..]
        .iter()
        .filter(|m| is_flood_reply(m))
        .count();
    (after, dropped)
}

/// A reply to a request of [`flood`] (the ids of [`register`]).
fn is_flood_reply(m: &fleet_testkit::Received) -> bool {
    m.topic.starts_with("fleet/v1/activate/reg-") && m.topic.ends_with("/reply")
}

/// A flood naming `named`, 60 activations each that no key of theirs
/// signed (or, `unreadable`, 60 payloads that are not CBOR), built first
/// and then published at once; how many.
async fn flood(probe: &Probe, named: &[String], unreadable: bool) -> usize {
    let key = crypto::generate_p256().unwrap();
    let mut flood = Vec::new();
    for _ in 0..60 {
        for id in named {
            let topic = Topic::bootstrap(Route::Request(RequestKind::Activate, id.clone()));
            let payload = if unreadable {
                b"\xff not cbor".to_vec()
            } else {
                activate_request(id, &crypto::generate_p256().unwrap(), &key)
            };
            flood.push((topic.to_string(), payload));
        }
    }
    let sent = flood.len();
    for (topic, request) in flood {
        probe.publish(&topic, request).await.unwrap();
    }
    sent
}

#[tokio::test]
async fn requests_that_waited_too_long_are_answered_busy_and_change_nothing() {
    let (mut fleet, probe, mut dev) = fleet(1, false).await;
    // Requests for registered ids (with a wrong key): answered `busy`
    // when shed, `auth_failed` when carried out.
    let imposters = register(&fleet, 300).await;
    let before = fleet.snapshot();
    fleet.stop_manager().await;
    let ghosts = activations(&probe, &imposters).await;
    // dev1's real activation, behind them.
    let eph = crypto::generate_p256().unwrap();
    let request = activate_request(&dev.id, &eph, &dev.factory);
    let topic = Topic::bootstrap(Route::Request(RequestKind::Activate, dev.id.clone()));
    probe
        .publish(&topic.to_string(), request.clone())
        .await
        .unwrap();
    routed(&probe, "fleet/v1/activate/", 301).await;
    fleet.start_manager().await.unwrap();

    eventually(T, "every request answered", || {
        let answered = ghosts
            .iter()
            .chain([&(dev.id.clone(), Vec::new())])
            .all(|(id, _)| !probe.on(&reply_topic(id)).is_empty());
        async move { answered.then_some(()) }
    })
    .await
    .unwrap();
    let mut busy = 0;
    for (id, nonce) in &ghosts {
        assert_eq!(probe.on(&reply_topic(id)).len(), 1, "{id}: one reply");
        let reply = reply_on(&fleet, &probe, &reply_topic(id)).unwrap();
        match reply.status {
            Status::Busy => {
                busy += 1;
                assert_eq!(&reply.nonce, nonce, "{id}: a busy reply echoes the nonce");
                assert!(reply.detail.is_some());
            }
            Status::AuthFailed => {}
            other => panic!("{id}: {other}"),
        }
    }
    // One worker, 301 requests at once and 1 ms of patience: the last ones
    // waited longer.
    assert!(busy > 100, "only {busy} of 300 answered busy");
    let real = reply_on(&fleet, &probe, &reply_topic(&dev.id)).unwrap();
    assert_eq!(real.status, Status::Busy, "the last request waited too");
    assert!(
        fleet.snapshot() == before,
        "a busy answer changed the registry"
    );

    // The same request again, on an idle manager: carried out.
    probe.publish(&topic.to_string(), request).await.unwrap();
    probe.wait_for(&reply_topic(&dev.id), 2, T).await.unwrap();
    let again = reply_on(&fleet, &probe, &reply_topic(&dev.id)).unwrap();
    assert_eq!(again.status, Status::Ok, "{again:?}");
    dev.uuid = crypto::unseal(&eph, &dev.id, again.uuid.as_ref().unwrap()).ok();
    assert!(dev.uuid.is_some());
}

/// Bootstrap requests in the backlog a tenant request overtakes.
const GHOSTS: usize = 5000;

#[tokio::test]
async fn tenant_requests_go_before_a_backlog_of_bootstrap_ones() {
    let (mut fleet, probe, dev) = fleet(60_000, true).await;
    fleet.stop_manager().await;
    let ghosts = activations(&probe, &ghosts(GHOSTS)).await;
    routed(&probe, "fleet/v1/activate/ghost-", GHOSTS).await;
    // The poll goes out on a connection of its own, not behind the replies.
    let poller = fleet.privileged("poller").await.unwrap();
    fleet.start_manager().await.unwrap();
    // Once the manager has taken them all in (its one worker needs some
    // 400 ms for them), dev1 polls from its tenant.
    taken_in(&fleet, GHOSTS).await;
    let uuid = dev.uuid.clone().unwrap();
    let request = poll(
        &dev,
        "svcA",
        crypto::random_bytes(16),
        fleet_protocol::now_ms(),
        &uuid,
    );
    let topic = Topic::in_tenant("svcA", Route::Request(RequestKind::Poll, dev.id.clone()));
    poller.publish(&topic.to_string(), request).await.unwrap();

    let reply_topic =
        Topic::in_tenant("svcA", Route::Reply(RequestKind::Poll, dev.id.clone())).to_string();
    probe.wait_for(&reply_topic, 1, T).await.unwrap();
    let reply = reply_on(&fleet, &probe, &reply_topic).unwrap();
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    let messages = probe.messages();
    let at = messages
        .iter()
        .position(|m| m.topic == reply_topic)
        .unwrap();
    let is_ghost_reply = |m: &&fleet_testkit::Received| {
        m.topic.starts_with("fleet/v1/activate/ghost-") && m.topic.ends_with("/reply")
    };
    let ghosts_before = messages[..at].iter().filter(is_ghost_reply).count();
    // In arrival order it would be answered after all of them.
    assert!(
        ghosts_before < ghosts.len(),
        "the tenant's poll was answered after all {} bootstrap requests",
        ghosts.len()
    );
    let sent = ghosts.len();
    eventually(T, "every bootstrap request answered", || {
        let n = probe.messages().iter().filter(is_ghost_reply).count();
        async move { (n == sent).then_some(()) }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn late_requests_for_ids_nobody_registered_are_dropped_not_answered_busy() {
    let (mut fleet, probe, mut dev) = fleet(20, false).await;
    fleet.stop_manager().await;
    let ghosts = activations(&probe, &ghosts(GHOSTS)).await;
    routed(&probe, "fleet/v1/activate/ghost-", GHOSTS).await;
    let activator = fleet.privileged("activator").await.unwrap();
    fleet.start_manager().await.unwrap();
    taken_in(&fleet, GHOSTS).await;
    let intake = &fleet.core().intake;
    // dev1, registered, activates behind them (the manager's unit tests
    // fix the order in which it takes them): it is carried out.
    let eph = crypto::generate_p256().unwrap();
    let request = activate_request(&dev.id, &eph, &dev.factory);
    activated(&fleet, &probe, &activator, &mut dev, (&eph, request), 1).await;

    // Those that waited more than 20 ms are dropped, unanswered: never
    // `busy`, whose signature an anonymous flood is not worth.
    let is_ghost_reply = |m: &&fleet_testkit::Received| {
        m.topic.starts_with("fleet/v1/activate/ghost-") && m.topic.ends_with("/reply")
    };
    let settled = eventually(T, "every ghost answered or dropped", || {
        let answered = probe.messages().iter().filter(is_ghost_reply).count() as u64;
        let dropped = intake.dropped.load(Ordering::Relaxed);
        async move { (answered + dropped == GHOSTS as u64).then_some((answered, dropped)) }
    })
    .await
    .unwrap();
    assert!(
        settled.1 > 0,
        "none dropped: the backlog never waited 100 ms"
    );
    assert_eq!(
        intake.shed.load(Ordering::Relaxed),
        0,
        "a ghost answered busy"
    );
    for m in probe.messages().iter().filter(is_ghost_reply) {
        let reply: Reply = Envelope::decode(&m.payload).unwrap().body().unwrap();
        assert_eq!(reply.status, Status::UnknownDevice);
    }
    drop(ghosts);
}

/// A flood that names registered ids (their factory keys unknown to it)
/// goes behind a registered device it does not name: after one refusal
/// per id, its requests wait in a class of their own (topics.md §5.4).
#[tokio::test]
async fn a_flood_naming_registered_ids_goes_behind_devices_it_does_not_name() {
    let (fleet, probe, mut dev) = fleet(60_000, false).await;
    let named = register(&fleet, 50).await;
    // One refusal each: their ids are contested from then on.
    contest(&probe, &named).await;
    // dev1's connection and request, ready before the flood.
    let activator = fleet.privileged("activator").await.unwrap();
    let eph = crypto::generate_p256().unwrap();
    let request = activate_request(&dev.id, &eph, &dev.factory);
    let sent = flood(&probe, &named, false).await;
    taken_in(&fleet, named.len() + sent).await;
    // dev1 activates, from a connection of its own.
    activated(&fleet, &probe, &activator, &mut dev, (&eph, request), 1).await;

    let messages = probe.messages();
    let at = messages
        .iter()
        .position(|m| m.topic == reply_topic(&dev.id))
        .unwrap();
    let is_named_reply = |m: &&fleet_testkit::Received| is_flood_reply(m);
    let before = messages[..at].iter().filter(is_named_reply).count();
    println!(
        "dev1 answered after {before} of {} replies to the flood",
        named.len() + sent
    );
    // In arrival order it would be answered after all of them.
    assert!(
        before < named.len() + sent,
        "dev1 was answered after the whole flood"
    );
    // The rest of the flood is refused, or dropped past the 8 requests
    // that may wait for one id: none is carried out.
    let (_, dropped) = settled(&fleet, &probe, (named.len() + sent) as u64, 0, at).await;
    assert!(dropped > 0, "no id had more than 8 requests waiting");
    for m in probe.messages().iter().filter(is_named_reply) {
        let reply: Reply = Envelope::decode(&m.payload).unwrap().body().unwrap();
        assert!(
            matches!(reply.status, Status::AuthFailed | Status::RateLimited),
            "{reply:?}"
        );
    }
}

/// Anyone can make any registered id contested, one refused request each.
/// There each id gets its turn: a device whose id was made so waits behind
/// one request of each id the flood names, not behind the flood.
#[tokio::test]
async fn a_contested_device_waits_for_one_turn_of_each_named_id() {
    let (fleet, probe, mut dev) = fleet(60_000, false).await;
    let named = register(&fleet, 50).await;
    // One refusal for each of them, and one for dev1 too.
    let mut ids = named.clone();
    ids.push(dev.id.clone());
    contest(&probe, &ids).await;
    let activator = fleet.privileged("activator").await.unwrap();
    let eph = crypto::generate_p256().unwrap();
    let request = activate_request(&dev.id, &eph, &dev.factory);
    let sent = flood(&probe, &named, false).await;
    taken_in(&fleet, ids.len() + sent).await;
    let is_named_reply = is_flood_reply;
    let seen = probe
        .messages()
        .iter()
        .filter(|m| is_named_reply(m))
        .count();
    activated(&fleet, &probe, &activator, &mut dev, (&eph, request), 2).await;
    let messages = probe.messages();
    let at = messages
        .iter()
        .rposition(|m| m.topic == reply_topic(&dev.id))
        .unwrap();
    let between = messages[..at].iter().filter(|m| is_named_reply(m)).count() - seen;
    // In arrival order dev1 would be answered after every request of the
    // flood: some of it is answered after dev1. (dev1's own first request
    // is among `ids` but gets no flood reply.)
    let (after, _) = settled(&fleet, &probe, (ids.len() + sent) as u64, 1, at).await;
    println!("dev1 answered with {between} replies to the flood seen since it asked, before {after} more");
    assert!(after > 0, "dev1 was answered after the whole flood");
}

/// Requests anyone can send under a registered id, that are refused before
/// any check (here: not CBOR), contest it too: such a flood goes behind
/// the devices it does not name.
#[tokio::test]
async fn an_unreadable_flood_naming_registered_ids_goes_behind_devices_it_does_not_name() {
    let (fleet, probe, mut dev) = fleet(60_000, false).await;
    let named = register(&fleet, 50).await;
    let activator = fleet.privileged("activator").await.unwrap();
    let eph = crypto::generate_p256().unwrap();
    let request = activate_request(&dev.id, &eph, &dev.factory);
    // A first burst, 60 for each id, the manager takes at once, then the
    // rest of the flood.
    let sent = flood(&probe, &named, true).await + flood(&probe, &named, true).await;
    taken_in(&fleet, sent).await;
    activated(&fleet, &probe, &activator, &mut dev, (&eph, request), 1).await;
    let at = probe
        .messages()
        .iter()
        .position(|m| m.topic == reply_topic(&dev.id))
        .unwrap();
    let (after, _) = settled(&fleet, &probe, sent as u64, 0, at).await;
    println!("dev1 answered before {after} replies to the flood");
    assert!(after > 0, "dev1 was answered after the whole flood");
}

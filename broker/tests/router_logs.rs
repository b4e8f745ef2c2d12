//! The vendored router's changes to how it keeps messages and
//! subscriptions (`vendor/rumqttd/PATCHES.md`), through the broker.
//!
//! The router keeps a message only until every subscriber of its filter has
//! read it. rumqttd keeps a log per subscription filter and, as published,
//! drops from it only by size (4 segments of 1 MiB here): a device's reply
//! and notice filters, one per device and topic, held every message sent on
//! them for as long as the broker ran, so the broker grew with every
//! migration of the fleet. The vendored router trims each log to what some
//! reader has still to read (`vendor/rumqttd/PATCHES.md`).

use std::sync::atomic::Ordering;
use std::time::Duration;

use fleet_broker::{BrokerConfig, RunningBroker};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(20);
const TOPIC: &str = "fleet/v1/update/dev1/reply";
const SIZE: usize = 8 * 1024;
/// More than the router sends a QoS 1 subscriber before it acknowledges
/// (100).
const FIRST: u32 = 200;
/// Then as many more, read by both: more than one trim's worth (1 MiB).
const SECOND: u32 = 200;

/// A broker with the internal listener only, on an ephemeral port, and the
/// manager's secret for it.
fn internal_broker() -> (tempfile::TempDir, RunningBroker, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = BrokerConfig {
        bootstrap_tls_listen: None,
        service_listen: None,
        internal_listen: "127.0.0.1:0".parse().unwrap(),
        certs_dir: dir.path().to_path_buf(),
        ..BrokerConfig::default()
    };
    let broker = fleet_broker::start(&config).unwrap();
    let secret = std::fs::read_to_string(config.secret_path()).unwrap();
    (dir, broker, secret)
}

fn options(broker: &RunningBroker, secret: &str, id: &str) -> MqttOptions {
    let mut options = MqttOptions::new(id, "127.0.0.1", broker.internal_addr.port());
    options
        .set_credentials("fleet-manager", secret)
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(64 * 1024, 64 * 1024);
    options
}

/// A client whose session the router keeps past its connection.
fn keeping(broker: &RunningBroker, secret: &str, id: &str) -> (AsyncClient, rumqttc::EventLoop) {
    let mut options = options(broker, secret, id);
    options.set_clean_session(false);
    AsyncClient::new(options, 256)
}

fn client(
    broker: &RunningBroker,
    secret: &str,
    id: &str,
    manual_acks: bool,
) -> (AsyncClient, rumqttc::EventLoop) {
    let mut options = options(broker, secret, id);
    options.set_manual_acks(manual_acks);
    AsyncClient::new(options, 256)
}

/// Runs a subscriber's event loop, sending each PUBLISH it receives on;
/// returns once the router has acknowledged its subscription to `TOPIC`.
async fn subscribe(
    client: &AsyncClient,
    mut events: rumqttc::EventLoop,
) -> mpsc::UnboundedReceiver<Publish> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (subscribed, suback) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut subscribed = Some(subscribed);
        while let Ok(event) = events.poll().await {
            match event {
                Event::Incoming(Packet::Publish(p)) => {
                    // The test is over once its receiver is gone.
                    let _ = tx.send(p);
                }
                Event::Incoming(Packet::SubAck(ack)) => {
                    if let Some(s) = subscribed.take() {
                        let _ = s.send(ack.return_codes);
                    }
                }
                _ => {}
            }
        }
    });
    client.subscribe(TOPIC, QoS::AtLeastOnce).await.unwrap();
    let codes = tokio::time::timeout(T, suback).await.unwrap().unwrap();
    assert_eq!(
        codes,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    rx
}

fn message(i: u32) -> Vec<u8> {
    let mut payload = vec![0u8; SIZE];
    payload[..4].copy_from_slice(&i.to_be_bytes());
    payload
}

fn index(p: &Publish) -> u32 {
    u32::from_be_bytes(p.payload[..4].try_into().unwrap())
}

/// Receives messages `*next` to `last`, checking that they come in order
/// with none missing, acknowledging each with `acks` if given.
async fn receive_through(
    rx: &mut mpsc::UnboundedReceiver<Publish>,
    next: &mut u32,
    last: u32,
    acks: Option<&AsyncClient>,
) {
    while *next <= last {
        let p = tokio::time::timeout(T, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("message {next} never came"))
            .unwrap();
        assert_eq!(index(&p), *next, "a message skipped or out of order");
        assert_eq!(p.payload.len(), SIZE);
        *next += 1;
        if let Some(client) = acks {
            client.ack(&p).await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_router_drops_what_every_subscriber_has_read_and_keeps_what_one_has_not() {
    let (_dir, broker, secret) = internal_broker();
    let held = || broker.metrics.router_log_bytes.load(Ordering::Relaxed);

    let (reader, events) = client(&broker, &secret, "reader", false);
    let mut to_reader = subscribe(&reader, events).await;
    // Takes what the router sends and acknowledges none until told.
    let (laggard, events) = client(&broker, &secret, "laggard", true);
    let mut to_laggard = subscribe(&laggard, events).await;
    let (publisher, mut events) = client(&broker, &secret, "publisher", false);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });

    let (mut next_reader, mut next_laggard) = (0, 0);
    for i in 0..FIRST {
        publisher
            .publish(TOPIC, QoS::AtLeastOnce, false, message(i))
            .await
            .unwrap();
    }
    receive_through(&mut to_reader, &mut next_reader, FIRST - 1, None).await;
    // The laggard has been sent at most what the router lets a QoS 1
    // subscriber have unacknowledged; what it has not been sent is held.
    let held_now = held();
    let mut unacked = Vec::new();
    while let Ok(p) = to_laggard.try_recv() {
        unacked.push(p);
    }
    let sent_to_laggard = unacked.len() as u32;
    assert!(
        sent_to_laggard < FIRST,
        "the laggard was sent all of them unacknowledged"
    );
    let unsent = u64::from(FIRST - sent_to_laggard);
    assert!(
        held_now >= unsent * SIZE as u64,
        "{held_now} bytes held, while {unsent} messages of {SIZE} bytes were not yet sent to one subscriber"
    );

    // The laggard acknowledges and gets the rest: nothing it had not read
    // was dropped.
    for p in unacked {
        assert_eq!(index(&p), next_laggard, "a message skipped or out of order");
        next_laggard += 1;
        laggard.ack(&p).await.unwrap();
    }
    receive_through(
        &mut to_laggard,
        &mut next_laggard,
        FIRST - 1,
        Some(&laggard),
    )
    .await;

    // Both read everything from now on. However much goes through the log,
    // it holds about one trim's worth at most (1 MiB of appends, each
    // counted with 256 bytes more) beyond what a subscriber has still to
    // read, and nothing once the router has been idle for a second.
    let last = FIRST + SECOND - 1;
    let acking = tokio::spawn(async move {
        receive_through(&mut to_laggard, &mut next_laggard, last, Some(&laggard)).await;
    });
    for i in FIRST..=last {
        publisher
            .publish(TOPIC, QoS::AtLeastOnce, false, message(i))
            .await
            .unwrap();
    }
    receive_through(&mut to_reader, &mut next_reader, last, None).await;
    tokio::time::timeout(T, acking).await.unwrap().unwrap();
    let deadline = std::time::Instant::now() + T;
    while held() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} bytes still held of {} sent and read",
            held(),
            u64::from(FIRST + SECOND) * SIZE as u64
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A session that keeps state (clean session off) and is offline reads the
/// log from where it left off when it comes back: a trim, brought on by
/// another subscriber reading far more than a trim's worth meanwhile, keeps
/// everything from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_session_that_keeps_state_gets_every_message_sent_meanwhile() {
    let (_dir, broker, secret) = internal_broker();

    let kept = || keeping(&broker, &secret, "keeper");
    let (keeper, events) = kept();
    let mut to_keeper = subscribe(&keeper, events).await;
    let (reader, events) = client(&broker, &secret, "reader", false);
    let mut to_reader = subscribe(&reader, events).await;
    let (publisher, mut events) = client(&broker, &secret, "publisher", false);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });

    // One message both read, then the keeper goes away.
    publisher
        .publish(TOPIC, QoS::AtLeastOnce, false, message(0))
        .await
        .unwrap();
    let (mut next_keeper, mut next_reader) = (0, 0);
    receive_through(&mut to_keeper, &mut next_keeper, 0, None).await;
    receive_through(&mut to_reader, &mut next_reader, 0, None).await;
    keeper.disconnect().await.unwrap();
    // Its client acknowledges what it receives until its connection has
    // ended; whatever the router sends the old connection after that is not
    // acknowledged, and comes again with the session.
    tokio::time::timeout(T, async { while to_keeper.recv().await.is_some() {} })
        .await
        .expect("the connection never ended");

    let last = FIRST + SECOND - 1;
    for i in 1..=last {
        publisher
            .publish(TOPIC, QoS::AtLeastOnce, false, message(i))
            .await
            .unwrap();
    }
    receive_through(&mut to_reader, &mut next_reader, last, None).await;

    // Back with its session: everything since it left, in order.
    let (back, mut events) = kept();
    let (tx, mut to_back) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                if tx.send(p).is_err() {
                    break;
                }
            }
        }
    });
    receive_through(&mut to_back, &mut next_keeper, last, None).await;
    drop(back);
}

/// Forwards every packet a client receives.
fn packets(mut events: rumqttc::EventLoop) -> mpsc::UnboundedReceiver<Packet> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(p) = event {
                let _ = tx.send(p);
            }
        }
    });
    rx
}

/// The next packet `pick` takes, skipping others.
async fn next_of<T>(
    rx: &mut mpsc::UnboundedReceiver<Packet>,
    mut pick: impl FnMut(Packet) -> Option<T>,
) -> T {
    tokio::time::timeout(T, async {
        loop {
            if let Some(t) = pick(rx.recv().await.expect("event loop ended")) {
                return t;
            }
        }
    })
    .await
    .expect("timed out")
}

/// Subscribes `client` to `filter` and waits for the SUBACK on `rx`.
async fn subscribed(client: &AsyncClient, rx: &mut mpsc::UnboundedReceiver<Packet>, filter: &str) {
    client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    next_of(rx, |p| matches!(p, Packet::SubAck(_)).then_some(())).await;
}

/// Publishes `payload` to `topic` at QoS 1.
async fn send(publisher: &AsyncClient, topic: &str, payload: &[u8]) {
    publisher
        .publish(topic, QoS::AtLeastOnce, false, payload.to_vec())
        .await
        .unwrap();
}

fn published(p: Packet) -> Option<(String, Vec<u8>)> {
    match p {
        Packet::Publish(p) => Some((p.topic, p.payload.to_vec())),
        _ => None,
    }
}

/// A connection that unsubscribes from a shared subscription gets nothing
/// more from it, and neither does a later connection given the same router
/// slot: the router looked for the subscription's parked request under
/// `$share/{group}/{filter}` instead of `{filter}`, left it there, and it
/// went on waking whichever connection held that slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_ended_delivers_nothing_more() {
    const SHARED: &str = "$share/g/fleet/v1/poll/dev1";
    const LOG: &str = "fleet/v1/poll/dev1";
    const MARK: &str = "fleet/v1/status/dev1";
    let (_dir, broker, secret) = internal_broker();
    let (publisher, mut events) = client(&broker, &secret, "publisher", false);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });

    let (sharer, events) = client(&broker, &secret, "sharer", false);
    let mut to_sharer = packets(events);
    sharer.subscribe(SHARED, QoS::AtLeastOnce).await.unwrap();
    sharer.subscribe(MARK, QoS::AtLeastOnce).await.unwrap();
    for _ in 0..2 {
        next_of(&mut to_sharer, |p| {
            matches!(p, Packet::SubAck(_)).then_some(())
        })
        .await;
    }
    // Read, so that its request waits on the log for more.
    send(&publisher, LOG, b"one").await;
    assert_eq!(
        next_of(&mut to_sharer, published).await,
        (LOG.to_string(), b"one".to_vec())
    );

    sharer.unsubscribe(SHARED).await.unwrap();
    next_of(&mut to_sharer, |p| {
        matches!(p, Packet::UnsubAck(_)).then_some(())
    })
    .await;
    send(&publisher, LOG, b"two").await;
    // A mark on a filter it still has comes after anything sent before it.
    send(&publisher, MARK, b"mark").await;
    assert_eq!(
        next_of(&mut to_sharer, published).await,
        (MARK.to_string(), b"mark".to_vec())
    );

    // Its slot goes to the next connection, which subscribes only to the mark.
    sharer.disconnect().await.unwrap();
    tokio::time::timeout(T, async { while to_sharer.recv().await.is_some() {} })
        .await
        .expect("the connection never ended");
    let (next, events) = client(&broker, &secret, "next", false);
    let mut to_next = packets(events);
    subscribed(&next, &mut to_next, MARK).await;
    send(&publisher, LOG, b"three").await;
    send(&publisher, MARK, b"mark").await;
    assert_eq!(
        next_of(&mut to_next, published).await,
        (MARK.to_string(), b"mark".to_vec())
    );
}

/// A topic whose first character takes more than one byte is matched
/// against wildcard filters like any other: the router took its first byte
/// as a string slice, panicked, and every connect was refused from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_topic_starting_with_a_multibyte_character_is_matched() {
    let (_dir, broker, secret) = internal_broker();
    let (publisher, mut events) = client(&broker, &secret, "publisher", false);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let (watcher, events) = client(&broker, &secret, "watcher", false);
    let mut to_watcher = packets(events);
    subscribed(&watcher, &mut to_watcher, "+/y").await;
    for topic in ["\u{feff}x/y", "\u{e9}/y", "a/y"] {
        send(&publisher, topic, b"m").await;
        assert_eq!(
            next_of(&mut to_watcher, published).await,
            (topic.to_string(), b"m".to_vec())
        );
    }
    // And the router still takes new connections.
    let (late, events) = client(&broker, &secret, "late", false);
    let mut to_late = packets(events);
    subscribed(&late, &mut to_late, "a/y").await;
}

/// The router forgets a filter once no one subscribes to it: a client id's
/// own topics, subscribed to and left, cost nothing afterwards. It kept
/// every filter anyone ever subscribed to, each with its log, and so grew
/// with every new client id (anonymous clients on the bootstrap listener
/// choose theirs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_no_one_subscribes_to_are_forgotten() {
    let (_dir, broker, secret) = internal_broker();
    let filters = || broker.metrics.router_filters.load(Ordering::Relaxed);
    // One subscription that stays, and gets what is published to it.
    let (keeper, events) = client(&broker, &secret, "keeper", false);
    let mut to_keeper = packets(events);
    subscribed(&keeper, &mut to_keeper, "fleet/v1/poll/kept").await;
    for i in 0..50 {
        let (visitor, events) = client(&broker, &secret, &format!("visitor{i}"), false);
        let mut to_visitor = packets(events);
        for kind in ["activate", "update", "poll"] {
            let filter = format!("fleet/v1/{kind}/visitor{i}/reply");
            subscribed(&visitor, &mut to_visitor, &filter).await;
        }
        visitor.disconnect().await.unwrap();
        tokio::time::timeout(T, async { while to_visitor.recv().await.is_some() {} })
            .await
            .expect("the visitor's connection never ended");
    }
    assert!(filters() >= 1, "the gauge counts filters");
    let deadline = std::time::Instant::now() + T;
    while filters() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "{} filters held after 150 subscriptions ended",
            filters()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (publisher, mut events) = client(&broker, &secret, "publisher", false);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    publisher
        .publish(
            "fleet/v1/poll/kept",
            QoS::AtLeastOnce,
            false,
            b"still".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(
        next_of(&mut to_keeper, published).await,
        ("fleet/v1/poll/kept".to_string(), b"still".to_vec())
    );
    // A filter forgotten is made again by the next subscription to it.
    let (again, events) = client(&broker, &secret, "visitor0", false);
    let mut to_again = packets(events);
    subscribed(&again, &mut to_again, "fleet/v1/poll/visitor0/reply").await;
    publisher
        .publish(
            "fleet/v1/poll/visitor0/reply",
            QoS::AtLeastOnce,
            false,
            b"back".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(
        next_of(&mut to_again, published).await,
        ("fleet/v1/poll/visitor0/reply".to_string(), b"back".to_vec())
    );
}

/// Subscriptions made and left on a router that is never idle are
/// forgotten too: a trim also comes after enough new filters, not only
/// after a trim's worth of messages or an idle second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_are_forgotten_on_a_busy_router() {
    let (_dir, broker, secret) = internal_broker();
    let filters = || broker.metrics.router_filters.load(Ordering::Relaxed);
    // Keeps the router from an idle second.
    let (ticker, mut events) = client(&broker, &secret, "ticker", false);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let ticking = tokio::spawn(async move {
        loop {
            send(&ticker, "fleet/v1/status/ticker", b"t").await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let (churner, events) = client(&broker, &secret, "churner", false);
    let mut to_churner = packets(events);
    let mut most = 0;
    for round in 0..40 {
        let batch: Vec<rumqttc::SubscribeFilter> = (0..100)
            .map(|i| {
                rumqttc::SubscribeFilter::new(
                    format!("fleet/v1/poll/c{round}x{i}"),
                    QoS::AtMostOnce,
                )
            })
            .collect();
        let names: Vec<String> = batch.iter().map(|f| f.path.clone()).collect();
        churner.subscribe_many(batch).await.unwrap();
        next_of(&mut to_churner, |p| {
            matches!(p, Packet::SubAck(_)).then_some(())
        })
        .await;
        for name in names {
            churner.unsubscribe(name).await.unwrap();
        }
        for _ in 0..100 {
            next_of(&mut to_churner, |p| {
                matches!(p, Packet::UnsubAck(_)).then_some(())
            })
            .await;
        }
        most = most.max(filters());
    }
    ticking.abort();
    assert!(
        most < 2_500,
        "{most} filters held at once, of 4,000 made and left"
    );
}

/// A session restored on reconnect can leave a filter it subscribed to
/// before: the router did not count a restored session among its filters'
/// subscribers, ignored the UNSUBSCRIBE, and went on delivering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_session_can_unsubscribe() {
    const MARK: &str = "fleet/v1/status/keeper";
    let (_dir, broker, secret) = internal_broker();
    let kept = || keeping(&broker, &secret, "keeper");
    let (keeper, events) = kept();
    let mut to_keeper = packets(events);
    subscribed(&keeper, &mut to_keeper, TOPIC).await;
    subscribed(&keeper, &mut to_keeper, MARK).await;
    keeper.disconnect().await.unwrap();
    tokio::time::timeout(T, async { while to_keeper.recv().await.is_some() {} })
        .await
        .expect("the connection never ended");

    let (keeper, events) = kept();
    let mut to_keeper = packets(events);
    keeper.unsubscribe(TOPIC).await.unwrap();
    next_of(&mut to_keeper, |p| {
        matches!(p, Packet::UnsubAck(_)).then_some(())
    })
    .await;
    let (publisher, mut events) = client(&broker, &secret, "publisher", false);
    tokio::spawn(async move { while events.poll().await.is_ok() {} });
    send(&publisher, TOPIC, b"after").await;
    // A mark on a filter it still has comes after anything sent before it.
    send(&publisher, MARK, b"mark").await;
    assert_eq!(
        next_of(&mut to_keeper, published).await,
        (MARK.to_string(), b"mark".to_vec())
    );
}

/// A subscriber that falls more than the router keeps per filter (4 MiB)
/// behind never gets the oldest of what it missed; the broker counts them
/// (`fleetshift_broker_router_messages_skipped_total`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_a_slow_subscriber_never_gets_are_counted() {
    let (_dir, broker, secret) = internal_broker();
    let skipped = || broker.metrics.router_skipped.load(Ordering::Relaxed);
    let (slow, events) = client(&broker, &secret, "slow", true);
    let mut to_slow = subscribe(&slow, events).await;
    let (publisher, events) = client(&broker, &secret, "publisher", false);
    let mut acked = acks_counted(events);

    // 6 MiB to a subscriber that acknowledges nothing: the router sends it
    // 100 and keeps the rest, up to 4 MiB. All of it is in the router (the
    // broker has acknowledged every one) before the subscriber reads on.
    let total: u32 = 6 * 1024 * 1024 / SIZE as u32;
    for i in 0..total {
        publisher
            .publish(TOPIC, QoS::AtLeastOnce, false, message(i))
            .await
            .unwrap();
    }
    tokio::time::timeout(T, acked.wait_for(|n| *n == total))
        .await
        .expect("every message acknowledged by the broker")
        .unwrap();
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(
            tokio::time::timeout(T, to_slow.recv())
                .await
                .expect("the first 100")
                .unwrap(),
        );
    }
    assert_eq!(skipped(), 0);
    // It catches up: acknowledging lets the router read on, from a log
    // that no longer has what came after those 100.
    let mut got: Vec<u32> = held.iter().map(index).collect();
    for p in &held {
        slow.ack(p).await.unwrap();
    }
    while got.last() != Some(&(total - 1)) {
        let p = tokio::time::timeout(T, to_slow.recv())
            .await
            .expect("the last message")
            .unwrap();
        got.push(index(&p));
        slow.ack(&p).await.unwrap();
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
    let missing = u64::from(total) - got.len() as u64;
    assert!(missing > 0, "nothing was dropped: the test sent too little");
    assert_eq!(skipped(), missing);
}

/// A subscriber that stops reading its socket holds in its link no more
/// than about twice the router's `MAX_OUTGOING_BYTES` (1 MiB) besides a
/// message, whatever the size of the messages: the rest stays in the log,
/// where it is counted and trimmed, and the oldest of it is skipped. The
/// router used to give a link up to 200 messages of any size (50 MB of
/// 256 KB telemetry for a provider that stopped reading).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_that_stops_reading_holds_little_of_large_messages() {
    const BIG: usize = 128 * 1024;
    const MIB: usize = 1024 * 1024;
    // What the subscriber may get once it reads again: what its link held
    // (two batches of at most 1 MiB and a message each), what the log kept
    // (4 segments of 1 MiB, and the one being written), and what the
    // kernel's send buffer took (at most `tcp_wmem`'s largest), with some
    // slack. 92 messages with a 4 MiB `tcp_wmem`; 56 came here.
    let wmem_max: usize = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|t| t.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 * MIB);
    let at_most = (2 * (MIB + BIG) + 5 * MIB + wmem_max + MIB / 4) / BIG;
    // Sent: well over that, and over the 200 messages a link was given
    // before.
    let total = (at_most as u32 + 50).max(200);
    let (_dir, broker, secret) = internal_broker();
    let skipped = || broker.metrics.router_skipped.load(Ordering::Relaxed);

    let mut slow = stalled_subscriber(&broker, &secret, TOPIC);

    let mut options = options(&broker, &secret, "publisher");
    options.set_max_packet_size(2 * BIG, 2 * BIG);
    let (publisher, events) = AsyncClient::new(options, 256);
    let mut acked = acks_counted(events);
    // 25 MiB or more, one message at a time (each acknowledged by the broker
    // before the next, so that the router keeps up and gives the link all
    // it may take), before the subscriber reads again.
    for i in 0..total {
        let mut payload = vec![0u8; BIG];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        publisher
            .publish(TOPIC, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
        tokio::time::timeout(T, acked.wait_for(|n| *n > i))
            .await
            .expect("acknowledged by the broker")
            .unwrap();
    }

    let got = tokio::task::spawn_blocking(move || indices_through(&mut slow, total - 1))
        .await
        .unwrap();
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order");
    let missing = u64::from(total) - got.len() as u64;
    // The link alone used to hold all 200.
    assert!(
        got.len() <= at_most,
        "{} of {total} messages were held for a subscriber that stopped reading (at most {at_most})",
        got.len()
    );
    assert_eq!(skipped(), missing);
}

/// A member of a shared subscription gets each message once, in order,
/// though the router stops after each MiB it gives the member's link: the
/// group's cursor moves on with the member's. (The member reads nothing
/// until all are sent, so the router does stop at each MiB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_subscription_member_gets_each_message_once() {
    const SHARED: &str = "$share/g/fleet/v1/poll/dev1";
    const LOG: &str = "fleet/v1/poll/dev1";
    const BIG: usize = 60 * 1024;
    // About 3.5 MiB, then a last one to read up to.
    const N: u32 = 60;
    let (_dir, broker, secret) = internal_broker();
    let (publisher, events) = client(&broker, &secret, "publisher", false);
    let mut acked = acks_counted(events);
    let mut sharer = stalled_subscriber(&broker, &secret, SHARED);
    // Sent at once, so that the router reads many at a time.
    for i in 0..=N {
        let mut payload = vec![0u8; BIG];
        payload[..4].copy_from_slice(&i.to_be_bytes());
        publisher
            .publish(LOG, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }
    tokio::time::timeout(T, acked.wait_for(|n| *n > N))
        .await
        .expect("acknowledged by the broker")
        .unwrap();
    let got = tokio::task::spawn_blocking(move || indices_through(&mut sharer, N))
        .await
        .unwrap();
    assert_eq!(
        got,
        (0..=N).collect::<Vec<_>>(),
        "each message once, in order"
    );
}

/// A raw subscriber to `filter` at QoS 0 that reads nothing more once it
/// has its SUBACK, with a 4 KiB receive buffer, so that the kernel takes
/// little of what the broker writes to it meanwhile.
fn stalled_subscriber(broker: &RunningBroker, secret: &str, filter: &str) -> std::net::TcpStream {
    use std::io::Write;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&broker.internal_addr.into()).unwrap();
    let mut slow: std::net::TcpStream = socket.into();
    slow.set_read_timeout(Some(T)).unwrap();
    let mut connect = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0xC2, 0, 60];
    for field in ["slow-reader", "fleet-manager", secret] {
        connect.extend((field.len() as u16).to_be_bytes());
        connect.extend(field.as_bytes());
    }
    slow.write_all(&frame(0x10, &connect)).unwrap();
    let mut subscribe = vec![0, 1];
    subscribe.extend((filter.len() as u16).to_be_bytes());
    subscribe.extend(filter.as_bytes());
    subscribe.push(0); // QoS 0
    slow.write_all(&frame(0x82, &subscribe)).unwrap();
    let (kind, _) = read_packet(&mut slow);
    assert_eq!(kind, 0x20, "CONNACK");
    let (kind, suback) = read_packet(&mut slow);
    assert_eq!((kind, suback), (0x90, vec![0, 1, 0]), "SUBACK");
    slow
}

/// The first four bytes of each PUBLISH's payload (its index), read from
/// a raw subscriber until index `last` comes.
fn indices_through(slow: &mut std::net::TcpStream, last: u32) -> Vec<u32> {
    let mut got = Vec::new();
    while got.last() != Some(&last) {
        let (kind, body) = read_packet(slow);
        assert_eq!(kind & 0xF0, 0x30, "PUBLISH");
        let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
        let payload = &body[2 + topic_len..];
        got.push(u32::from_be_bytes(payload[..4].try_into().unwrap()));
    }
    got
}

/// Runs a publisher's event loop; the count of PUBACKs it has received.
fn acks_counted(mut events: rumqttc::EventLoop) -> tokio::sync::watch::Receiver<u32> {
    let (acked_tx, acked) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::PubAck(_)) = event {
                n += 1;
                let _ = acked_tx.send(n);
            }
        }
    });
    acked
}

/// `body` framed as one MQTT packet whose first byte is `first`.
fn frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    let mut n = body.len();
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        out.push(if n > 0 { byte | 0x80 } else { byte });
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// The next packet from `stream`: its first byte and its body.
fn read_packet(stream: &mut std::net::TcpStream) -> (u8, Vec<u8>) {
    use std::io::Read;
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).unwrap();
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).unwrap();
        len |= usize::from(byte[0] & 0x7F) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).unwrap();
    (first[0], body)
}

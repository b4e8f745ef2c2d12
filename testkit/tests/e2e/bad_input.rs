//! Bad input through the broker: each gets its error reply with a code, and
//! the stored registry and history do not change.

use fleet_protocol::crypto;
use fleet_protocol::{Envelope, Kind, RequestKind, Status, MAX_MESSAGE_LEN};
use fleet_testkit::{Fleet, Probe};

use crate::wire::{
    activate, activate_request, ask, fleet_with_active_device, poll, update, with_device,
    HandDevice,
};

struct Setup {
    fleet: Fleet,
    probe: Probe,
    dev: HandDevice,
}

async fn setup() -> Setup {
    let (fleet, probe, dev) = fleet_with_active_device("dev1").await;
    Setup { fleet, probe, dev }
}

/// Sends `payload` and expects `status`, with the store unchanged.
async fn expect_refused(
    s: &Setup,
    device: &str,
    kind: RequestKind,
    payload: Vec<u8>,
    status: Status,
) -> fleet_protocol::Reply {
    let before = s.fleet.snapshot();
    let (reply, _) = ask(&s.fleet, &s.probe, device, kind, payload).await;
    assert_eq!(reply.status, status, "{reply:?}");
    assert!(reply.detail.is_some(), "an error reply says why");
    assert!(
        s.fleet.snapshot() == before,
        "stored state changed after a refused request"
    );
    reply
}

#[tokio::test]
async fn malformed_cbor_gets_malformed() {
    let s = setup().await;
    let reply = expect_refused(
        &s,
        "dev1",
        RequestKind::Update,
        b"\xff\x00 not cbor".to_vec(),
        Status::Malformed,
    )
    .await;
    assert!(reply.nonce.is_empty());
    // A well-formed envelope whose body is not an update body.
    let env = Envelope::build(Kind::Update, &("just", "a", "tuple"), |_| Ok(vec![])).unwrap();
    expect_refused(
        &s,
        "dev1",
        RequestKind::Update,
        env.encode(),
        Status::Malformed,
    )
    .await;
    // A kind that does not belong on the topic.
    let uuid = s.dev.uuid.clone().unwrap();
    let fresh_poll = || {
        let nonce = crypto::random_bytes(16);
        poll(&s.dev, "svcA", nonce, fleet_protocol::now_ms(), &uuid)
    };
    let wrong_kind = fresh_poll();
    expect_refused(
        &s,
        "dev1",
        RequestKind::Update,
        wrong_kind,
        Status::Malformed,
    )
    .await;
    // A poll that would pass but for a key given twice: an unknown one, in
    // the envelope (two more pairs in its map of five).
    let good = fresh_poll();
    assert_eq!(good[0], 0xa5);
    let twice = [&[0xa7][..], &good[1..], &[0x61, b'x', 0, 0x61, b'x', 1]].concat();
    expect_refused(&s, "dev1", RequestKind::Poll, twice, Status::Malformed).await;
    // A poll whose nonce is a text string, or an array of integers, not
    // a byte string (authenticated all the same).
    let ts = fleet_protocol::now_ms();
    let poll_with = |nonce: serde_cbor::Value| {
        use serde_cbor::Value::{Integer, Text};
        let body: std::collections::BTreeMap<&str, serde_cbor::Value> = [
            ("device_id", Text("dev1".into())),
            ("service_id", Text("svcA".into())),
            ("nonce", nonce),
            ("ts", Integer(ts.into())),
        ]
        .into();
        Envelope::build(Kind::Poll, &body, |tbs| crypto::hmac(&uuid, tbs))
            .unwrap()
            .encode()
    };
    let as_text = serde_cbor::Value::Text("0123456789abcdef".into());
    let as_array = serde_cbor::Value::Array(vec![serde_cbor::Value::Integer(7); 16]);
    for wrong in [as_text, as_array] {
        expect_refused(
            &s,
            "dev1",
            RequestKind::Poll,
            poll_with(wrong),
            Status::Malformed,
        )
        .await;
    }
    // The same poll done right is served.
    let (reply, _) = ask(&s.fleet, &s.probe, "dev1", RequestKind::Poll, good).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
}

#[tokio::test]
async fn wrong_crc_gets_bad_crc() {
    let s = setup().await;
    let uuid = s.dev.uuid.clone().unwrap();
    let good = poll(
        &s.dev,
        "svcA",
        crypto::random_bytes(16),
        fleet_protocol::now_ms(),
        &uuid,
    );
    let mut env = Envelope::decode(&good).unwrap();
    env.crc ^= 1;
    expect_refused(&s, "dev1", RequestKind::Poll, env.encode(), Status::BadCrc).await;
}

#[tokio::test]
async fn unknown_device_gets_unknown_device() {
    let s = setup().await;
    let mut ghost = HandDevice::new("ghost7");
    let probe = &s.probe;
    probe
        .subscribe("fleet/v1/activate/ghost7/reply")
        .await
        .unwrap();
    let before = s.fleet.snapshot();
    let eph = crypto::generate_p256().unwrap();
    let request = activate_request(&ghost.id, &eph, &ghost.factory);
    let (reply, _) = ask(&s.fleet, probe, &ghost.id, RequestKind::Activate, request).await;
    assert_eq!(reply.status, Status::UnknownDevice);
    assert!(reply.uuid.is_none());
    ghost.uuid = Some(vec![0; 16]);
    let p = poll(
        &ghost,
        "svcA",
        crypto::random_bytes(16),
        fleet_protocol::now_ms(),
        &[0; 16],
    );
    expect_refused(&s, "ghost7", RequestKind::Poll, p, Status::UnknownDevice).await;
    assert!(s.fleet.snapshot() == before, "stored state changed");
}

#[tokio::test]
async fn wrong_hmac_gets_auth_failed() {
    let s = setup().await;
    let p = poll(
        &s.dev,
        "svcA",
        crypto::random_bytes(16),
        fleet_protocol::now_ms(),
        &[7u8; 16],
    );
    expect_refused(&s, "dev1", RequestKind::Poll, p, Status::AuthFailed).await;
}

#[tokio::test]
async fn activation_needs_the_factory_key_and_happens_once() {
    let s = setup().await;
    // Someone who knows only the device id signs with a key of their own.
    let impostor = HandDevice::new("dev1");
    let eph = crypto::generate_p256().unwrap();
    let forged = activate_request("dev1", &eph, &impostor.factory);
    expect_refused(
        &s,
        "dev1",
        RequestKind::Activate,
        forged,
        Status::AuthFailed,
    )
    .await;
    // The real device cannot activate twice without an operator reset.
    let again = activate_request("dev1", &eph, &s.dev.factory);
    expect_refused(
        &s,
        "dev1",
        RequestKind::Activate,
        again,
        Status::AlreadyActive,
    )
    .await;
}

#[tokio::test]
async fn an_impostor_flooding_activations_does_not_keep_the_real_device_out() {
    let s = setup().await;
    let mut real = HandDevice::new("dev3");
    s.fleet
        .register(&real.id, "svcA", Some(&real.factory_point()))
        .await
        .unwrap();
    // Someone who knows only the id: every forged activation is refused,
    // and past the failure limit told to back off.
    let impostor = HandDevice::new("dev3");
    for i in 0..s.fleet.config.max_auth_failures + 2 {
        let eph = crypto::generate_p256().unwrap();
        let forged = activate_request("dev3", &eph, &impostor.factory);
        let want = if i < s.fleet.config.max_auth_failures {
            Status::AuthFailed
        } else {
            Status::RateLimited
        };
        expect_refused(&s, "dev3", RequestKind::Activate, forged, want).await;
    }
    assert!(s.fleet.core().store.device("dev3").unwrap().is_none());
    // The real device, signing with its factory key, activates at once.
    activate(&s.fleet, &s.probe, &mut real).await;
    assert!(s.fleet.core().store.device("dev3").unwrap().is_some());
}

#[tokio::test]
async fn replay_is_refused_and_identical_retry_gets_the_same_answer() {
    let s = setup().await;
    let uuid = s.dev.uuid.clone().unwrap();
    let nonce = crypto::random_bytes(16);
    let first = poll(
        &s.dev,
        "svcA",
        nonce.clone(),
        fleet_protocol::now_ms(),
        &uuid,
    );
    let (reply, bytes) = ask(&s.fleet, &s.probe, "dev1", RequestKind::Poll, first.clone()).await;
    assert_eq!(reply.status, Status::Ok);
    // The same bytes again (a retry or a replay): the cached answer, byte for byte.
    let before = s.fleet.snapshot();
    let (_, again) = ask(&s.fleet, &s.probe, "dev1", RequestKind::Poll, first).await;
    assert_eq!(again, bytes);
    assert!(s.fleet.snapshot() == before, "stored state changed");
    // The same nonce on a different request: replayed.
    let other = poll(&s.dev, "svcA", nonce, fleet_protocol::now_ms() + 1, &uuid);
    expect_refused(&s, "dev1", RequestKind::Poll, other, Status::Replayed).await;
}

#[tokio::test]
async fn stale_timestamp_gets_stale() {
    let s = setup().await;
    let uuid = s.dev.uuid.clone().unwrap();
    let old = fleet_protocol::now_ms() - 10 * 60 * 1000;
    let p = poll(&s.dev, "svcA", crypto::random_bytes(16), old, &uuid);
    expect_refused(&s, "dev1", RequestKind::Poll, p, Status::Stale).await;
    let future = fleet_protocol::now_ms() + 10 * 60 * 1000;
    let p = poll(&s.dev, "svcA", crypto::random_bytes(16), future, &uuid);
    expect_refused(&s, "dev1", RequestKind::Poll, p, Status::Stale).await;
}

#[tokio::test]
async fn oversized_payload_gets_too_large() {
    let s = setup().await;
    let big = vec![0xa5u8; MAX_MESSAGE_LEN + 1];
    expect_refused(&s, "dev1", RequestKind::Update, big, Status::TooLarge).await;
}

#[tokio::test]
async fn repeated_failures_are_rate_limited_and_the_manager_keeps_serving() {
    let s = setup().await;
    for _ in 0..s.fleet.config.max_auth_failures {
        let p = poll(
            &s.dev,
            "svcA",
            crypto::random_bytes(16),
            fleet_protocol::now_ms(),
            &[1u8; 16],
        );
        expect_refused(&s, "dev1", RequestKind::Poll, p, Status::AuthFailed).await;
    }
    // The next failing request is told to back off ...
    let bad = poll(
        &s.dev,
        "svcA",
        crypto::random_bytes(16),
        fleet_protocol::now_ms(),
        &[1u8; 16],
    );
    expect_refused(&s, "dev1", RequestKind::Poll, bad, Status::RateLimited).await;
    // ... but the real device, whose request authenticates, is still
    // served: failures by someone who only knows its id lock nobody out.
    let uuid = s.dev.uuid.clone().unwrap();
    let good = poll(
        &s.dev,
        "svcA",
        crypto::random_bytes(16),
        fleet_protocol::now_ms(),
        &uuid,
    );
    let (reply, _) = ask(&s.fleet, &s.probe, "dev1", RequestKind::Poll, good).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    // Other devices are unaffected.
    let mut dev2 = HandDevice::new("dev2");
    s.fleet
        .register(&dev2.id, "svcA", Some(&dev2.factory_point()))
        .await
        .unwrap();
    activate(&s.fleet, &s.probe, &mut dev2).await;
}

/// A device is issued at most `max_certificates_per_device` certificates
/// within `certificate_window_secs`: the next `update` is answered
/// `rate_limited`, issues nothing and leaves the store as it was, and an
/// identical retry of an earlier one is still answered from the cache.
#[tokio::test]
async fn certificates_past_a_device_s_limit_are_refused() {
    let fleet = Fleet::start_tuned(|_| {}, |m| m.max_certificates_per_device = 3)
        .await
        .unwrap();
    let (fleet, probe, mut dev) = with_device(fleet, "dev1").await;
    activate(&fleet, &probe, &mut dev).await;
    let first = update(&dev, "svcA");
    for (n, request) in [first.clone(), update(&dev, "svcA"), update(&dev, "svcA")]
        .into_iter()
        .enumerate()
    {
        let (reply, _) = ask(&fleet, &probe, "dev1", RequestKind::Update, request).await;
        assert_eq!(reply.status, Status::Ok, "update {n}: {reply:?}");
    }
    let s = Setup { fleet, probe, dev };
    let next = update(&s.dev, "svcA");
    let reply = expect_refused(&s, "dev1", RequestKind::Update, next, Status::RateLimited).await;
    assert!(reply.chain.is_none());
    assert!(
        reply.detail.unwrap().starts_with("3 certificates issued"),
        "says why"
    );
    let (reply, _) = ask(&s.fleet, &s.probe, "dev1", RequestKind::Update, first).await;
    assert_eq!(reply.status, Status::Ok, "the identical retry: {reply:?}");
    // An operator's reset revokes them all and starts the count again.
    let Setup {
        fleet,
        probe,
        mut dev,
    } = s;
    fleet_manager::admin::call(&fleet.api(), "POST", "/v1/devices/dev1/reset", None)
        .await
        .unwrap();
    activate(&fleet, &probe, &mut dev).await;
    let (reply, _) = ask(
        &fleet,
        &probe,
        "dev1",
        RequestKind::Update,
        update(&dev, "svcA"),
    )
    .await;
    assert_eq!(reply.status, Status::Ok, "after a reset: {reply:?}");
}

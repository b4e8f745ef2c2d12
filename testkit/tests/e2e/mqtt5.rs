//! MQTT 5 clients on the front door's listeners, through real TLS: the same
//! grants as for MQTT 3.1.1, refused with MQTT 5 reason codes.

use fleet_device_sim::DeviceEvent;
use fleet_pki::RevokedEntry;
use std::time::{Duration, Instant};

use fleet_testkit::v5::{
    ConnectReturnCode, DisconnectReasonCode, LastWill, LastWillProperties, MqttOptions,
    PubAckReason, PubRecReason, PublishProperties, QoS, SubscribeReasonCode, UnsubAckReason,
};
use fleet_testkit::{eventually, mqtt_frame as frame, mqtt_varint, Fleet, Probe, Probe5};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::frontdoor::{bootstrap_tls, certified, revoked_entry, running_fleet, traffic_after, T};

fn alias(n: u16) -> PublishProperties {
    PublishProperties {
        topic_alias: Some(n),
        ..Default::default()
    }
}

#[tokio::test]
async fn subscriptions_outside_the_grants_get_not_authorized() {
    let (fleet, _devices, observer) = running_fleet().await;
    let root = fleet.certs_dir().join("root-ca.pem");
    let boot = Probe5::tls(fleet.broker.bootstrap_tls_addr.unwrap(), "evil1", &root)
        .await
        .unwrap();
    let (chain, key) = certified(&fleet, "evil2", "svcB");
    let svc = Probe5::mtls(fleet.service_addr(), "evil2", &root, chain, key)
        .await
        .unwrap();
    let hostile = [
        "#",
        "+/#",
        "fleet/v1/+/dev1/reply",
        "fleet/v1/activate/dev1/reply",
        "/tenants/svcA/#",
        "/tenants/svcB/telemetry/dev2",
        "/tenants/svcA/fleet/v1/service/change/dev1",
        "$share/g/#",
        "$share/g/fleet/v1/update/evil1/reply",
        "$share/g//tenants/svcB/fleet/v1/service/change/evil2",
    ];
    for probe in [&boot, &svc] {
        for filter in hostile {
            assert_eq!(
                probe.subscribe(filter).await.unwrap(),
                [SubscribeReasonCode::NotAuthorized],
                "{filter} granted"
            );
        }
    }
    // A refused filter beside a granted one: the granted one is subscribed.
    let before = boot.subacks.lock().unwrap().len();
    boot.client
        .subscribe_many([
            filter("#"),
            filter("fleet/v1/update/evil1/reply"),
            filter("/tenants/svcA/telemetry/dev1"),
        ])
        .await
        .unwrap();
    let acks = boot.subacks.clone();
    let codes = eventually(T, "SUBACK", || {
        let got = acks.lock().unwrap().get(before).cloned();
        async move { got }
    })
    .await
    .unwrap();
    assert_eq!(
        codes,
        [
            SubscribeReasonCode::NotAuthorized,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::NotAuthorized
        ]
    );
    assert_eq!(
        svc.subscribe("/tenants/svcB/fleet/v1/service/change/evil2")
            .await
            .unwrap(),
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    let mark = observer.messages().len();
    traffic_after(&observer, mark).await;
    assert!(boot.messages().is_empty(), "{:?}", boot.messages());
    assert!(svc.messages().is_empty(), "{:?}", svc.messages());
    assert!(!boot.is_cut() && !svc.is_cut());
    assert!(fleet.broker.metrics.get(|m| &m.refused_subscribes) >= 2 * hostile.len() as u64 + 2);
}

fn filter(path: &str) -> rumqttc::v5::mqttbytes::v5::Filter {
    rumqttc::v5::mqttbytes::v5::Filter::new(path, QoS::AtLeastOnce)
}

#[tokio::test]
async fn publishes_outside_the_grants_get_not_authorized_and_deliver_nothing() {
    let (fleet, devices, observer) = running_fleet().await;
    let root = fleet.certs_dir().join("root-ca.pem");
    let before = fleet.snapshot();
    let refused_before = fleet.broker.metrics.get(|m| &m.refused_publishes);
    let boot = Probe5::tls(fleet.broker.bootstrap_tls_addr.unwrap(), "evil1", &root)
        .await
        .unwrap();
    let (chain, key) = certified(&fleet, "evil2", "svcB");
    let svc = Probe5::mtls(
        fleet.service_addr(),
        "evil2",
        &root,
        chain.clone(),
        key.clone(),
    )
    .await
    .unwrap();
    let cases = [
        (&boot, "fleet/v1/update/dev1"),
        (&boot, "fleet/v1/service/change/dev1"),
        (&boot, "/tenants/svcA/telemetry/dev1"),
        (&svc, "/tenants/svcB/fleet/v1/update/dev2"),
        (&svc, "/tenants/svcB/telemetry/dev2"),
        (&svc, "/tenants/svcA/fleet/v1/service/change/dev1"),
        (&svc, "fleet/v1/update/dev2"),
    ];
    // QoS 1: PUBACK 0x87, and the connection stays open for the next one.
    for (probe, topic) in cases {
        let reason = probe
            .publish_acked(topic, None, b"injected".to_vec())
            .await
            .unwrap();
        assert_eq!(reason, PubAckReason::NotAuthorized, "{topic}");
    }
    // QoS 2: PUBREC 0x87.
    assert_eq!(
        svc.publish_exactly_once("/tenants/svcB/telemetry/dev2", b"injected".to_vec())
            .await
            .unwrap(),
        PubRecReason::NotAuthorized
    );
    // A topic alias names the topic it was set for, whatever else it was
    // set up with: the effective topic is what is authorized.
    assert_eq!(
        svc.publish_acked(
            "/tenants/svcB/telemetry/evil2",
            Some(alias(1)),
            b"own".to_vec()
        )
        .await
        .unwrap(),
        PubAckReason::Success
    );
    assert_eq!(
        svc.publish_acked(
            "/tenants/svcB/telemetry/dev2",
            Some(alias(2)),
            b"injected".to_vec()
        )
        .await
        .unwrap(),
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        svc.publish_acked("", Some(alias(2)), b"injected".to_vec())
            .await
            .unwrap(),
        PubAckReason::NotAuthorized
    );
    assert_eq!(
        svc.publish_acked("", Some(alias(1)), b"own".to_vec())
            .await
            .unwrap(),
        PubAckReason::Success
    );
    assert!(
        !boot.is_cut() && !svc.is_cut(),
        "a QoS 1 refusal closed the connection"
    );
    observer
        .wait_for("/tenants/svcB/telemetry/evil2", 2, T)
        .await
        .unwrap();

    // QoS 0 has no acknowledgement to carry a code: DISCONNECT 0x87.
    let qos0 = Probe5::mtls(fleet.service_addr(), "evil2", &root, chain, key)
        .await
        .unwrap();
    qos0.publish(
        "/tenants/svcB/telemetry/dev2",
        QoS::AtMostOnce,
        b"injected".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(
        qos0.wait_cut(T).await.unwrap(),
        Some(DisconnectReasonCode::NotAuthorized)
    );

    let mark = observer.messages().len();
    traffic_after(&observer, mark).await;
    assert!(
        observer.messages().iter().all(|m| m.payload != b"injected"),
        "an injected message was delivered"
    );
    assert!(fleet.snapshot() == before, "stored history changed");
    for d in ["dev1", "dev2"] {
        let rejected = devices
            .events_of(d)
            .iter()
            .any(|e| matches!(e, DeviceEvent::NoticeRejected { .. }));
        assert!(!rejected, "{d} saw an injected notice");
    }
    assert_eq!(
        fleet.broker.metrics.get(|m| &m.refused_publishes) - refused_before,
        cases.len() as u64 + 4
    );
}

#[tokio::test]
async fn refused_connects_get_mqtt5_reason_codes() {
    let fleet = Fleet::start().await.unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let auth = certified(&fleet, "evil2", "svcB");
    let service = |id: &str| service_options(&fleet, id, &auth);
    let refused = |r: anyhow::Result<Probe5>| match r {
        Ok(_) => panic!("connection accepted"),
        Err(err) => Probe5::refusal(&err).unwrap_or_else(|| panic!("no CONNACK code: {err:#}")),
    };
    for id in ["dev1", "d.svcB.evil2", ""] {
        assert_eq!(
            refused(Probe5::connect(service(id)).await),
            ConnectReturnCode::ClientIdentifierNotValid,
            "{id:?}"
        );
    }
    let boot = fleet.broker.bootstrap_tls_addr.unwrap();
    assert_eq!(
        refused(Probe5::tls(boot, "dev1/x", &root).await),
        ConnectReturnCode::ClientIdentifierNotValid
    );
    let (user, _) = &fleet.broker.manager_credentials;
    let mut internal = Probe5::options(fleet.broker.internal_addr, "m1", None).unwrap();
    internal.set_credentials(user, "guess");
    assert_eq!(
        refused(Probe5::connect(internal).await),
        ConnectReturnCode::BadUserNamePassword
    );
    let mut enhanced = service("evil2");
    enhanced.set_authentication_method(Some("SCRAM-SHA-1".into()));
    assert_eq!(
        refused(Probe5::connect(enhanced).await),
        ConnectReturnCode::BadAuthenticationMethod
    );
    // Authentication Data with no Authentication Method: a protocol error.
    let mut data_only = service("evil2");
    data_only.set_authentication_data(Some(b"secret".to_vec().into()));
    assert_eq!(
        refused(Probe5::connect(data_only).await),
        ConnectReturnCode::ProtocolError
    );
    // A Will is a PUBLISH: its topic must be granted too.
    let mut will = service("evil2");
    will.set_last_will(LastWill::new(
        "/tenants/svcA/fleet/v1/update/dev1",
        "injected",
        QoS::AtLeastOnce,
        false,
        None,
    ));
    assert_eq!(
        refused(Probe5::connect(will).await),
        ConnectReturnCode::NotAuthorized
    );
    // MQTT 5 forbids a Receive Maximum or Maximum Packet Size of 0.
    let mut zero = service("evil2");
    zero.set_receive_maximum(Some(0));
    assert_eq!(
        refused(Probe5::connect(zero).await),
        ConnectReturnCode::ProtocolError
    );
    // The certificate's own id is accepted, with the broker's limits.
    let ok = Probe5::connect(service("evil2")).await.unwrap();
    let props = ok.connack.properties.clone().unwrap();
    assert_eq!(props.max_packet_size, Some(256 * 1024));
    assert_eq!(props.topic_alias_max, Some(16));
    assert!(fleet.broker.metrics.get(|m| &m.refused_connects) >= 8);
}

#[tokio::test]
async fn wills_are_checked_at_connect_and_published_on_abnormal_close() {
    let (fleet, _devices, observer) = running_fleet().await;
    let plain = fleet.broker.bootstrap_plain_addr.unwrap();
    // MQTT 3.1.1: a Will outside the grants refuses the CONNECT (0x05).
    let mut opts = rumqttc::MqttOptions::new("evil1", plain.ip().to_string(), plain.port());
    opts.set_last_will(rumqttc::LastWill::new(
        "fleet/v1/update/dev1",
        "injected",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    let err = Probe::connect(opts).await.err().expect("CONNECT accepted");
    assert!(format!("{err:#}").contains("NotAuthorized"), "{err:#}");
    // A granted Will is accepted, and published when the connection drops.
    let own = "fleet/v1/status/w311";
    let mut opts = rumqttc::MqttOptions::new("w311", plain.ip().to_string(), plain.port());
    opts.set_last_will(rumqttc::LastWill::new(
        own,
        "gone",
        rumqttc::QoS::AtLeastOnce,
        false,
    ));
    drop(Probe::connect(opts).await.unwrap());
    assert_eq!(observer.wait_for(own, 1, T).await.unwrap().payload, b"gone");

    // MQTT 5: published on a dropped connection, not after a normal DISCONNECT.
    let will = |id: &str, payload: &str| {
        let mut o = Probe5::options(plain, id, None).unwrap();
        o.set_last_will(LastWill::new(
            format!("fleet/v1/status/{id}"),
            payload,
            QoS::AtLeastOnce,
            false,
            None,
        ));
        o
    };
    let polite = Probe5::connect(will("w5a", "polite")).await.unwrap();
    polite.client.disconnect().await.unwrap();
    polite.wait_cut(T).await.unwrap();
    drop(Probe5::connect(will("w5b", "dropped")).await.unwrap());
    assert_eq!(
        observer
            .wait_for("fleet/v1/status/w5b", 1, T)
            .await
            .unwrap()
            .payload,
        b"dropped"
    );
    let mark = observer.messages().len();
    traffic_after(&observer, mark).await;
    assert!(observer.on("fleet/v1/status/w5a").is_empty());
    assert!(observer.messages().iter().all(|m| m.payload != b"injected"));
}

#[tokio::test]
async fn a_granted_mqtt5_device_gets_its_replies() {
    let fleet = Fleet::start().await.unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let boot = Probe5::tls(fleet.broker.bootstrap_tls_addr.unwrap(), "v5dev", &root)
        .await
        .unwrap();
    let (chain, key) = certified(&fleet, "v5dev", "svcA");
    let svc = Probe5::mtls(
        fleet.service_addr(),
        "v5dev",
        &root,
        chain.clone(),
        key.clone(),
    )
    .await
    .unwrap();
    for (probe, base) in [
        (&boot, "fleet/v1/poll/v5dev".to_string()),
        (&svc, "/tenants/svcA/fleet/v1/poll/v5dev".to_string()),
    ] {
        let reply = format!("{base}/reply");
        assert_eq!(
            probe.subscribe(&reply).await.unwrap(),
            [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
        );
        // The manager answers every request, garbage included (topics.md §5.2);
        // the second request names its topic by alias only.
        for topic in [base.as_str(), ""] {
            assert_eq!(
                probe
                    .publish_acked(topic, Some(alias(1)), b"not cbor".to_vec())
                    .await
                    .unwrap(),
                PubAckReason::Success
            );
        }
        assert_eq!(
            probe
                .publish_exactly_once(&base, b"not cbor".to_vec())
                .await
                .unwrap(),
            PubRecReason::Success
        );
        probe.wait_for(&reply, 3, T).await.unwrap();
        // UNSUBSCRIBE is answered, one code per filter, and the connection stays up.
        assert_eq!(
            probe.unsubscribe(&reply).await.unwrap(),
            [UnsubAckReason::Success]
        );
        assert_eq!(
            probe.unsubscribe("#").await.unwrap(),
            [UnsubAckReason::NoSubscriptionExisted]
        );
    }
    // A second connection of the same certificate takes the session over:
    // the first is told so.
    let again = Probe5::mtls(fleet.service_addr(), "v5dev", &root, chain, key)
        .await
        .unwrap();
    assert_eq!(
        svc.wait_cut(T).await.unwrap(),
        Some(DisconnectReasonCode::SessionTakenOver)
    );
    assert!(!again.is_cut() && !boot.is_cut());
}

/// Raw MQTT 5 on the plain bootstrap listener, for packets no client
/// library sends.
async fn raw_v5(fleet: &Fleet, client_id: &str) -> tokio::net::TcpStream {
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    let mut s = tokio::time::timeout(T, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    s.write_all(&raw_connect(client_id, 60, &[])).await.unwrap();
    let mut head = [0u8; 2];
    tokio::time::timeout(T, s.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(head[0], 0x20, "CONNACK");
    let mut rest = vec![0u8; head[1] as usize];
    tokio::time::timeout(T, s.read_exact(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest[1], 0, "CONNACK code");
    s
}

/// Reads until the broker closes; returns everything it sent.
async fn until_closed(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut all))
        .await
        .expect("connection closed")
        .ok();
    all
}

/// The reason code of the DISCONNECT that `sent` consists of.
fn disconnect_reason(sent: &[u8]) -> u8 {
    assert!(
        sent.len() >= 3 && sent[0] == 0xE0,
        "not a DISCONNECT: {sent:02x?}"
    );
    assert_eq!(
        sent[1] as usize,
        sent.len() - 2,
        "remaining length: {sent:02x?}"
    );
    sent[2]
}

#[tokio::test]
async fn oversized_and_server_only_packets_close_with_a_reason() {
    let fleet = Fleet::start().await.unwrap();
    // A PUBLISH announcing 1 MiB: refused on its fixed header.
    let mut s = raw_v5(&fleet, "raw1").await;
    s.write_all(&[0x30, 0x80, 0x80, 0x40]).await.unwrap();
    assert_eq!(disconnect_reason(&until_closed(&mut s).await), 0x95);
    // One announcing 40 KiB: over the bootstrap listeners' 32 KiB.
    let mut s = raw_v5(&fleet, "raw4").await;
    s.write_all(&[0x30, 0x80, 0xC0, 0x02]).await.unwrap();
    assert_eq!(disconnect_reason(&until_closed(&mut s).await), 0x95);
    // A topic or a filter with U+0000 is a malformed packet.
    let mut s = raw_v5(&fleet, "raw5").await;
    assert_eq!(
        publish_until_closed(&mut s, "fleet/v1/status/raw5\0", 1).await,
        0x81
    );
    let mut s = raw_v5(&fleet, "raw6").await;
    let filter = b"fleet/v1/status/raw6\0";
    let mut body = vec![0, 1, 0, 0, filter.len() as u8];
    body.extend_from_slice(filter);
    body.push(0);
    s.write_all(&frame(0x82, &body)).await.unwrap();
    assert_eq!(disconnect_reason(&until_closed(&mut s).await), 0x81);
    // A CONNACK from a client is a protocol error, not a crash.
    let mut s = raw_v5(&fleet, "raw2").await;
    s.write_all(&[0x20, 0x03, 0x00, 0x00, 0x00]).await.unwrap();
    assert_eq!(disconnect_reason(&until_closed(&mut s).await), 0x82);
    // An unknown protocol level gets CONNACK 0x01.
    refused_level(&fleet, 6).await;
    // The listener still serves.
    let ok = raw_v5(&fleet, "raw3").await;
    drop(ok);
}

/// An MQTT 5 CONNECT that breaks the protocol is answered with a CONNACK
/// that says how, and the connection closed; an MQTT 3.1.1 one, which has
/// no code for it, only closed.
#[tokio::test]
async fn a_connect_that_breaks_the_protocol_is_told_why() {
    let fleet = Fleet::start().await.unwrap();
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    let answer = |connect: Vec<u8>| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&connect).await.unwrap();
        until_closed(&mut s).await
    };
    let connack = |code: u8| vec![0x20, 0x03, 0x00, code, 0x00];
    // 40 KiB announced, over the bootstrap listeners' 32 KiB: refused on
    // the fixed header, before the rest comes.
    let level = |level: u8| {
        let mut head = vec![0x10, 0x80, 0xC0, 0x02, 0, 4, b'M', b'Q', b'T', b'T', level];
        head.extend([0x02, 0, 60]);
        head
    };
    assert_eq!(answer(level(5)).await, connack(0x95));
    assert_eq!(answer(level(4)).await, b"");
    // Its remaining length in two bytes where one does.
    let mut long = raw_connect("raw7", 60, &[]);
    long.splice(1..2, [long[1] | 0x80, 0x00]);
    assert_eq!(answer(long).await, connack(0x81));
    // Request Problem Information 2.
    assert_eq!(
        answer(raw_connect("raw8", 60, &[0x17, 2])).await,
        connack(0x82)
    );
    // Session Expiry Interval twice.
    let twice = [0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2];
    assert_eq!(answer(raw_connect("raw9", 60, &twice)).await, connack(0x82));
    // The listener still serves.
    drop(raw_v5(&fleet, "raw3").await);
}

/// A packet with more than 64 User Properties (empty ones included: 5
/// bytes each on the wire, ten times that in memory) ends the connection
/// with DISCONNECT 0x83 (a CONNECT: CONNACK 0x83); 64 are taken.
#[tokio::test]
async fn more_than_64_user_properties_end_the_connection() {
    let fleet = Fleet::start().await.unwrap();
    // `pairs` empty User Properties.
    let properties = |pairs: usize| [0x26, 0, 0, 0, 0].repeat(pairs);
    let publish = |pairs: usize| {
        let topic = b"fleet/v1/status/up1";
        let mut body = (topic.len() as u16).to_be_bytes().to_vec();
        body.extend(topic);
        body.extend(mqtt_varint(pairs * 5));
        body.extend(properties(pairs));
        body.push(b'x');
        frame(0x30, &body)
    };
    let mut s = raw_v5(&fleet, "up1").await;
    s.write_all(&publish(64)).await.unwrap();
    s.write_all(&[0xC0, 0x00]).await.unwrap();
    assert_eq!(read_async(&mut s).await.0, 0xD0, "PINGRESP after 64");
    s.write_all(&publish(65)).await.unwrap();
    assert_eq!(disconnect_reason(&until_closed(&mut s).await), 0x83);

    // A CONNECT with 65 is refused with CONNACK 0x83.
    let connect = raw_connect("up2", 60, &properties(65));
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect).await.unwrap();
    assert_eq!(until_closed(&mut s).await, [0x20, 0x03, 0x00, 0x83, 0x00]);
}

/// After its last word (here a DISCONNECT 0x95) the broker ends its side
/// and reads and drops what the client still sends until it closes, for up
/// to a second: a client that writes once more before it reads is not
/// reset, which on many TCP stacks would cost it what it had not read yet.
#[tokio::test]
async fn a_client_that_writes_after_the_broker_s_last_word_is_not_reset() {
    let fleet = Fleet::start().await.unwrap();
    let mut s = raw_v5(&fleet, "raw1").await;
    s.write_all(&[0x30, 0x80, 0x80, 0x40]).await.unwrap();
    assert_eq!(disconnect_reason(&until_closed(&mut s).await), 0x95);
    writes_go_through(&mut s, "the DISCONNECT").await;
    // The same after a CONNECT refused as it is read: an unknown protocol
    // level, CONNACK 0x01.
    let mut s = refused_level(&fleet, 3).await;
    writes_go_through(&mut s, "the CONNACK").await;
}

/// Three PINGREQs written to a connection the broker has ended, after
/// `what`: each goes through (the broker still reads), none is reset.
async fn writes_go_through(s: &mut tokio::net::TcpStream, what: &str) {
    for n in 0..3 {
        let written = tokio::time::timeout(T, s.write_all(&[0xC0, 0x00]))
            .await
            .unwrap();
        assert!(written.is_ok(), "write {n} after {what}: {written:?}");
    }
}

/// A CONNECT of protocol `level` on the plain bootstrap listener, refused
/// with CONNACK 0x01 and the broker's end of the connection.
async fn refused_level(fleet: &Fleet, level: u8) -> tokio::net::TcpStream {
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&[
        0x10, 13, 0, 4, b'M', b'Q', b'T', b'T', level, 2, 0, 60, 0, 1, b'x',
    ])
    .await
    .unwrap();
    assert_eq!(until_closed(&mut s).await, [0x20, 0x02, 0x00, 0x01]);
    s
}

/// MQTT 5 options for `client_id` on the service listener, presenting
/// `auth` (chain and key, PEM).
fn service_options(fleet: &Fleet, client_id: &str, auth: &(Vec<u8>, Vec<u8>)) -> MqttOptions {
    let root = fleet.certs_dir().join("root-ca.pem");
    Probe5::options(
        fleet.service_addr(),
        client_id,
        Some((root.as_path(), Some(auth.clone()))),
    )
    .unwrap()
}

/// A connection with `o` that resumes the session its identity kept, once
/// the broker has let go of the connection before it.
async fn resumed(o: &MqttOptions) -> Probe5 {
    eventually(T, "the session to be let go", || {
        let o = o.clone();
        async move {
            let back = Probe5::connect(o).await.ok()?;
            back.connack.session_present.then_some(back)
        }
    })
    .await
    .unwrap()
}

/// Options for a service connection of `device` (certified on svcA) that
/// keeps its session, with a Will on its own telemetry topic sent after
/// `will_delay` seconds.
fn lingering(
    fleet: &Fleet,
    device: &str,
    auth: &(Vec<u8>, Vec<u8>),
    will_delay: u32,
    keep_session: bool,
) -> MqttOptions {
    lingering_at(
        fleet,
        device,
        auth,
        will_delay,
        keep_session,
        QoS::AtLeastOnce,
    )
}

/// [`lingering`] with a Will of QoS `will_qos`.
fn lingering_at(
    fleet: &Fleet,
    device: &str,
    auth: &(Vec<u8>, Vec<u8>),
    will_delay: u32,
    keep_session: bool,
    will_qos: QoS,
) -> MqttOptions {
    let mut o = service_options(fleet, device, auth);
    if keep_session {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(60));
    }
    let properties = LastWillProperties {
        delay_interval: Some(will_delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    o.set_last_will(LastWill::new(
        format!("/tenants/svcA/telemetry/{device}"),
        "gone",
        will_qos,
        false,
        Some(properties),
    ));
    o
}

/// A fleet, and an observer with the manager's rights that receives svcA's
/// telemetry.
async fn watching_telemetry() -> (Fleet, Probe) {
    let fleet = Fleet::start().await.unwrap();
    let observer = fleet.privileged("observer").await.unwrap();
    observer
        .subscribe("/tenants/svcA/telemetry/#")
        .await
        .unwrap();
    (fleet, observer)
}

/// Waits until a marker published now has reached `observer`: whatever was
/// on its way before has arrived.
async fn traffic_marker(observer: &Probe) {
    traffic_marker_on(observer, "/tenants/svcA/telemetry/marker").await
}

/// [`traffic_marker`] on `topic`, which `observer` subscribes to.
async fn traffic_marker_on(observer: &Probe, topic: &str) {
    let n = observer.on(topic).len();
    observer.publish(topic, b"m".to_vec()).await.unwrap();
    observer.wait_for(topic, n + 1, T).await.unwrap();
}

/// Two devices of svcA, each connected with a kept session and a Will
/// delayed by its own number of seconds; their credentials and probes.
async fn delayed_wills(
    fleet: &Fleet,
    devices: [&str; 2],
    delays: (u32, u32),
) -> (Vec<(Vec<u8>, Vec<u8>)>, Probe5, Probe5) {
    let auth: Vec<_> = devices
        .iter()
        .map(|d| certified(fleet, d, "svcA"))
        .collect();
    let first = Probe5::connect(lingering(fleet, devices[0], &auth[0], delays.0, true))
        .await
        .unwrap();
    let second = Probe5::connect(lingering(fleet, devices[1], &auth[1], delays.1, true))
        .await
        .unwrap();
    (auth, first, second)
}

#[tokio::test]
async fn a_will_waits_for_its_delay_and_a_reconnect_cancels_it() {
    let (fleet, observer) = watching_telemetry().await;
    // wd1 comes back before its delay; wd2 does not, and its Will is due
    // two seconds after wd1's would have been.
    let (delay, later) = (4, 6);
    let (auth, wd1, wd2) = delayed_wills(&fleet, ["wd1", "wd2"], (delay, later)).await;
    drop(wd1);
    let dropped = Instant::now();
    drop(wd2);
    let back = Probe5::connect(lingering(&fleet, "wd1", &auth[0], delay, true))
        .await
        .unwrap();
    assert!(
        dropped.elapsed() < Duration::from_secs(delay.into()),
        "the reconnect came after the will was due"
    );
    let will = observer
        .wait_for("/tenants/svcA/telemetry/wd2", 1, T)
        .await
        .unwrap();
    assert_eq!(will.payload, b"gone");
    assert!(
        dropped.elapsed() >= Duration::from_secs(later.into()),
        "the will came {:?} after the connection ended",
        dropped.elapsed()
    );
    // wd1's Will was due two seconds before wd2's: a marker published now
    // arrives after it, had it been sent.
    traffic_marker(&observer).await;
    assert!(observer.on("/tenants/svcA/telemetry/wd1").is_empty());
    assert!(!back.is_cut());
    // The reconnected session has its own Will, delayed as before.
    drop(back);
    observer
        .wait_for("/tenants/svcA/telemetry/wd1", 1, T)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_will_goes_at_once_when_the_session_ends_with_the_connection() {
    let (fleet, observer) = watching_telemetry().await;
    let auth = certified(&fleet, "wd3", "svcA");
    // A Will Delay Interval far beyond the test's timeout, and no session
    // kept: the session ends, so the Will goes.
    let probe = Probe5::connect(lingering(&fleet, "wd3", &auth, 3600, false))
        .await
        .unwrap();
    drop(probe);
    let will = observer
        .wait_for("/tenants/svcA/telemetry/wd3", 1, T)
        .await
        .unwrap();
    assert_eq!(will.payload, b"gone");
}

#[tokio::test]
async fn a_will_whose_certificate_expires_while_it_waits_is_dropped() {
    let (fleet, observer) = watching_telemetry().await;
    let (ca, ca_key) = fleet.core().pki.service_ca("svcA").unwrap();
    fleet_pki::grants::add_grant(fleet.certs_dir(), "we1", "svcA").unwrap();
    // we1's certificate is valid through the second 4 s from now; both
    // Wills wait 6 s once the connections drop. we2's is the control.
    let short = super::frontdoor::forged_leaf_secs("we1", "svcA", (&ca, &ca_key), (-60, 4));
    let expired_at =
        std::time::UNIX_EPOCH + Duration::from_secs(fleet_protocol::now_ms() / 1000 + 5);
    let long = certified(&fleet, "we2", "svcA");
    let we1 = eventually(T, "svcA's CA to be trusted", || {
        let options = lingering(&fleet, "we1", &short, 6, true);
        async move { Probe5::connect(options).await.ok() }
    })
    .await
    .unwrap();
    let we2 = Probe5::connect(lingering(&fleet, "we2", &long, 6, true))
        .await
        .unwrap();
    drop((we1, we2));
    let due = std::time::SystemTime::now() + Duration::from_secs(6);
    assert!(due > expired_at, "the Will would be due before the expiry");
    observer
        .wait_for("/tenants/svcA/telemetry/we2", 1, T)
        .await
        .unwrap();
    // we1's was due with we2's: a marker published now arrives after it,
    // had it been sent.
    traffic_marker(&observer).await;
    assert!(observer.on("/tenants/svcA/telemetry/we1").is_empty());
}

#[tokio::test]
async fn a_will_whose_certificate_is_revoked_while_it_waits_is_dropped() {
    let (fleet, observer) = watching_telemetry().await;
    let revoked = certified(&fleet, "wd4", "svcA");
    let control = certified(&fleet, "wd5", "svcA");
    // Revoked with wd4's, to see the revocation loaded: a connection with
    // wd4's own certificate would take its session and cancel the Will.
    let witness = certified(&fleet, "wd6", "svcA");
    let connect_witness = || Probe5::connect(service_options(&fleet, "wd6", &witness));
    // The witness connects while not revoked.
    drop(connect_witness().await.unwrap());
    // wd5's Will is due two seconds after wd4's.
    let delay = 3;
    let a = Probe5::connect(lingering(&fleet, "wd4", &revoked, delay, true))
        .await
        .unwrap();
    let b = Probe5::connect(lingering(&fleet, "wd5", &control, delay + 2, true))
        .await
        .unwrap();
    drop(a);
    let dropped = Instant::now();
    drop(b);
    // wd4's certificate is revoked while its Will waits.
    let entries: Vec<RevokedEntry> = [&revoked.0, &witness.0]
        .into_iter()
        .map(|pem| revoked_entry(pem, 0))
        .collect();
    fleet
        .core()
        .pki
        .write_crl("svcA", 1, &entries, 1_000)
        .unwrap();
    eventually(T, "the revocation to be loaded", || async {
        connect_witness().await.is_err().then_some(())
    })
    .await
    .unwrap();
    assert!(
        dropped.elapsed() < Duration::from_secs(delay.into()),
        "the revocation loaded only after the Will was due"
    );
    // The control device's Will, due after wd4's, arrives; a marker
    // published after it would follow wd4's, had that been sent.
    observer
        .wait_for("/tenants/svcA/telemetry/wd5", 1, T)
        .await
        .unwrap();
    traffic_marker(&observer).await;
    assert!(observer.on("/tenants/svcA/telemetry/wd4").is_empty());
}

/// A service connection of a device certified on svcA with `tune` applied
/// to its options, subscribed at QoS 1 to its service-change topic (which
/// it returns) and at QoS 0 to its poll replies.
async fn subscriber(
    fleet: &Fleet,
    device: &str,
    tune: impl FnOnce(&mut MqttOptions),
) -> (Probe5, String, String) {
    let auth = certified(fleet, device, "svcA");
    let mut opts = service_options(fleet, device, &auth);
    tune(&mut opts);
    let probe = Probe5::connect(opts).await.unwrap();
    let acked = format!("/tenants/svcA/fleet/v1/service/change/{device}");
    let unacked = format!("/tenants/svcA/fleet/v1/poll/{device}/reply");
    assert_eq!(
        probe.subscribe(&acked).await.unwrap(),
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let before = probe.subacks.lock().unwrap().len();
    probe
        .client
        .subscribe(&unacked, QoS::AtMostOnce)
        .await
        .unwrap();
    let acks = probe.subacks.clone();
    eventually(T, "SUBACK", || {
        let n = acks.lock().unwrap().len();
        async move { (n > before).then_some(()) }
    })
    .await
    .unwrap();
    (probe, acked, unacked)
}

/// What `probe` received on `topic`: payloads and QoS, in order.
fn received(probe: &Probe5, topic: &str) -> Vec<(String, QoS)> {
    let publishes = probe.publishes.lock().unwrap();
    publishes
        .iter()
        .filter(|p| p.topic == topic.as_bytes())
        .map(|p| (String::from_utf8_lossy(&p.payload).into_owned(), p.qos))
        .collect()
}

/// A message reaches a subscriber at the lower of the QoS it was published
/// with and the subscription's (MQTT 5 §3.8.4). When a kept session comes
/// back, what it had not acknowledged at QoS 1 comes again; what went at
/// QoS 0 does not, though it sat among those in the router's log.
#[tokio::test]
async fn a_message_goes_at_the_lower_of_its_qos_and_the_subscription_s() {
    let fleet = Fleet::start().await.unwrap();
    let sender = sender5(&fleet).await;
    let kept = |o: &mut MqttOptions| {
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(600));
    };
    let (probe, acked, unacked) = subscriber(&fleet, "dq1", |o| {
        kept(o);
        o.set_manual_acks(true);
    })
    .await;
    let sent = |topic: &str, m: &str| {
        let (topic, m) = (topic.to_string(), m.as_bytes().to_vec());
        let sender = &sender;
        async move {
            let reason = sender.publish_acked(&topic, None, m).await.unwrap();
            assert_eq!(reason, PubAckReason::Success);
        }
    };
    sent(&acked, "m0").await;
    sender
        .publish(&acked, QoS::AtMostOnce, b"m1".to_vec())
        .await
        .unwrap();
    sent(&acked, "m2").await;
    sent(&unacked, "m3").await;
    probe.wait_for(&acked, 3, T).await.unwrap();
    probe.wait_for(&unacked, 1, T).await.unwrap();
    let m = |s: &str, qos| (s.to_string(), qos);
    assert_eq!(
        received(&probe, &acked),
        [
            m("m0", QoS::AtLeastOnce),
            m("m1", QoS::AtMostOnce),
            m("m2", QoS::AtLeastOnce)
        ],
        "on a QoS 1 subscription"
    );
    assert_eq!(
        received(&probe, &unacked),
        [m("m3", QoS::AtMostOnce)],
        "on a QoS 0 subscription"
    );
    // None acknowledged; back in the same session.
    drop(probe);
    let mut o = service_options(&fleet, "dq1", &certified(&fleet, "dq1", "svcA"));
    kept(&mut o);
    let back = resumed(&o).await;
    back.wait_for(&acked, 2, T).await.unwrap();
    // m1 would have come before m2, outside the quota.
    assert_eq!(
        received(&back, &acked),
        [m("m0", QoS::AtLeastOnce), m("m2", QoS::AtLeastOnce)]
    );
}

/// A Will reaches a subscriber at the lower of its own QoS and the
/// subscription's: published when its connection ends, through the
/// session's own link, and published later, delayed, through the front
/// door's Will link.
#[tokio::test]
async fn a_will_goes_at_the_lower_of_its_qos_and_the_subscription_s() {
    let fleet = Fleet::start().await.unwrap();
    let observer = sender5(&fleet).await;
    let filter = "/tenants/svcA/telemetry/+";
    assert_eq!(
        observer.subscribe(filter).await.unwrap(),
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    // Device, the Will's QoS, its delay, the QoS it reaches the observer at.
    let cases = [
        ("wq0", QoS::AtMostOnce, 0, QoS::AtMostOnce),
        ("wq1", QoS::AtLeastOnce, 0, QoS::AtLeastOnce),
        ("wq2", QoS::ExactlyOnce, 0, QoS::AtLeastOnce),
        ("wq3", QoS::AtLeastOnce, 1, QoS::AtLeastOnce),
        ("wq4", QoS::ExactlyOnce, 1, QoS::AtLeastOnce),
        ("wq5", QoS::AtLeastOnce, 1, QoS::AtLeastOnce),
    ];
    for (device, qos, delay, delivered) in cases {
        let auth = certified(&fleet, device, "svcA");
        let o = lingering_at(&fleet, device, &auth, delay, delay > 0, qos);
        let topic = format!("/tenants/svcA/telemetry/{device}");
        let probe = eventually(T, "svcA's CA to be trusted", || {
            let o = o.clone();
            async move { Probe5::connect(o).await.ok() }
        })
        .await
        .unwrap();
        drop(probe);
        observer.wait_for(&topic, 1, T).await.unwrap();
        assert_eq!(
            received(&observer, &topic),
            [("gone".to_string(), delivered)],
            "{device}"
        );
    }
}

#[tokio::test]
async fn no_more_than_the_receive_maximum_is_unacknowledged() {
    let fleet = Fleet::start().await.unwrap();
    let manager = fleet.privileged("sender").await.unwrap();
    let (probe, acked, unacked) = subscriber(&fleet, "rm1", |o| {
        o.set_receive_maximum(Some(2));
        o.set_manual_acks(true);
    })
    .await;
    for i in 0..5 {
        manager
            .publish(&acked, format!("m{i}").into_bytes())
            .await
            .unwrap();
    }
    probe.wait_for(&acked, 2, T).await.unwrap();
    // A QoS 0 message is outside the quota: it overtakes the held ones,
    // and by the time it arrives the router has handed over all five.
    manager.publish(&unacked, b"marker".to_vec()).await.unwrap();
    probe.wait_for(&unacked, 1, T).await.unwrap();
    assert_eq!(probe.on(&acked).len(), 2, "more than Receive Maximum sent");
    // Each acknowledgement lets one more through, in order.
    for n in 3..=5 {
        let oldest = probe
            .publishes
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.topic == acked.as_bytes())
            .nth(n - 3)
            .cloned()
            .unwrap();
        probe.client.ack(&oldest).await.unwrap();
        probe.wait_for(&acked, n, T).await.unwrap();
        assert_eq!(probe.on(&acked).len(), n);
    }
    let payloads: Vec<_> = probe.on(&acked).into_iter().map(|m| m.payload).collect();
    let sent: Vec<_> = (0..5).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads, sent);
    assert!(!probe.is_cut());
}

#[tokio::test]
async fn publishes_over_the_clients_maximum_packet_size_are_skipped() {
    let fleet = Fleet::start().await.unwrap();
    let manager = fleet.privileged("sender").await.unwrap();
    // The probe's own decoder refuses anything larger, closing the
    // connection: so a delivered oversized packet would show as a cut.
    let (probe, acked, unacked) = subscriber(&fleet, "mp1", |o| {
        o.set_max_packet_size(Some(512));
    })
    .await;
    // More oversized QoS 1 messages than the router keeps unacknowledged:
    // each must count as delivered, or the small one after them would never
    // come.
    for i in 0..150 {
        manager
            .publish(&acked, format!("{i:0>600}").into_bytes())
            .await
            .unwrap();
    }
    manager.publish(&unacked, vec![b'x'; 600]).await.unwrap();
    manager.publish(&acked, b"small".to_vec()).await.unwrap();
    manager.publish(&unacked, b"small".to_vec()).await.unwrap();
    assert_eq!(
        probe.wait_for(&acked, 1, T).await.unwrap().payload,
        b"small"
    );
    assert_eq!(
        probe.wait_for(&unacked, 1, T).await.unwrap().payload,
        b"small"
    );
    assert!(!probe.is_cut(), "{:?}", probe.errors.lock().unwrap());
    assert_eq!(probe.messages().len(), 2);
    assert_eq!(fleet.broker.metrics.get(|m| &m.outgoing_discarded), 151);
}

/// A PUBACK, PUBREC or PUBCOMP for a packet id the broker never sent: the
/// client is told it broke the protocol (DISCONNECT 0x82), and the
/// connection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_to_a_packet_never_sent_is_a_protocol_error() {
    use tokio::task::block_in_place;
    let fleet = Fleet::start().await.unwrap();
    for (i, first) in [0x40u8, 0x50, 0x70].into_iter().enumerate() {
        let id = format!("ack{i}");
        let mut raw = block_in_place(|| RawTls::connect(&fleet, &id, 60, &[]));
        let (kind, body) = block_in_place(|| {
            raw.send(&frame(first, &[0, 77])).unwrap();
            raw.next()
        });
        assert_eq!((kind, body[0]), (0xE0, 0x82), "answer {first:#x}: {body:?}");
        let end = block_in_place(|| read_packet(&mut raw.tls));
        assert!(end.is_err(), "answer {first:#x}: the connection went on");
    }
}

/// A Subscription Identifier of 0 is a protocol error whether or not the
/// SUBSCRIBE's filters are granted (it used to get a SUBACK 0x87 when none
/// was).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_identifier_0_is_a_protocol_error_whatever_the_filters() {
    use tokio::task::block_in_place;
    let fleet = Fleet::start().await.unwrap();
    for (i, filter) in ["fleet/v1/poll/sid0/reply", "fleet/v1/poll/other/reply"]
        .into_iter()
        .enumerate()
    {
        let id = format!("sid{i}");
        let filter = filter.replace("sid0", &id);
        let mut raw = block_in_place(|| RawTls::connect(&fleet, &id, 60, &[]));
        // Packet id 1, properties: Subscription Identifier 0, then the filter at QoS 1.
        let mut body = vec![0, 1, 2, 0x0B, 0];
        body.extend((filter.len() as u16).to_be_bytes());
        body.extend(filter.as_bytes());
        body.push(1);
        let (kind, body) = block_in_place(|| {
            raw.send(&frame(0x82, &body)).unwrap();
            raw.next()
        });
        assert_eq!((kind, body[0]), (0xE0, 0x82), "{filter}: {body:?}");
    }
}

/// An MQTT 5 client driven by hand over blocking OpenSSL TLS on the
/// bootstrap TLS listener, for what rumqttc cannot do: send a refusing
/// PUBREC, see every packet in the order it came, or stop reading. Its
/// calls block: tests using it run on the multi-threaded runtime and make
/// them through [`tokio::task::block_in_place`].
struct RawTls {
    tls: openssl::ssl::SslStream<std::net::TcpStream>,
}

/// A packet as [`RawTls`] reads it: the fixed header's first byte and the
/// rest.
type RawPacket = (u8, Vec<u8>);

/// An MQTT 5 CONNECT (Clean Start) of `client_id` with `keep_alive`
/// seconds and the CONNECT properties `properties` (encoded).
fn raw_connect(client_id: &str, keep_alive: u16, properties: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0x02];
    body.extend(keep_alive.to_be_bytes());
    body.extend(mqtt_varint(properties.len()));
    body.extend_from_slice(properties);
    body.extend((client_id.len() as u16).to_be_bytes());
    body.extend(client_id.as_bytes());
    frame(0x10, &body)
}

impl RawTls {
    /// Opens TLS to the bootstrap TLS listener, sends `connect` and returns
    /// the connection with the CONNACK's reason code.
    fn open(fleet: &Fleet, connect: &[u8]) -> (RawTls, u8) {
        let tls = bootstrap_tls(
            &fleet.certs_dir().join("root-ca.pem"),
            fleet.broker.bootstrap_tls_addr.unwrap(),
        );
        let mut raw = RawTls { tls };
        raw.send(connect).unwrap();
        let (first, body) = raw.next();
        assert_eq!(first, 0x20, "not a CONNACK");
        (raw, body[1])
    }

    /// Connects as bootstrap device `client_id`; fails unless accepted.
    fn connect(fleet: &Fleet, client_id: &str, keep_alive: u16, properties: &[u8]) -> RawTls {
        let (raw, code) = RawTls::open(fleet, &raw_connect(client_id, keep_alive, properties));
        assert_eq!(code, 0, "CONNACK code");
        raw
    }

    fn send(&mut self, packet: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.tls.write_all(packet)?;
        self.tls.flush()
    }

    /// The next packet the broker sent; fails after `T` without one.
    fn next(&mut self) -> RawPacket {
        read_packet(&mut self.tls).expect("a packet")
    }

    /// Subscribes to `filter` at `qos`; fails unless granted that QoS.
    fn subscribe(&mut self, pkid: u16, filter: &str, qos: u8) {
        let mut body = pkid.to_be_bytes().to_vec();
        body.push(0);
        body.extend((filter.len() as u16).to_be_bytes());
        body.extend(filter.as_bytes());
        body.push(qos);
        self.send(&frame(0x82, &body)).unwrap();
        let (first, body) = self.next();
        assert_eq!(first, 0x90, "not a SUBACK");
        assert_eq!(body[..2], pkid.to_be_bytes());
        let codes = &body[3 + body[2] as usize..];
        assert_eq!(codes, [qos], "{filter}");
    }
}

/// What a raw client read, decoded as far as a test looks at it.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Publish {
        qos: u8,
        pkid: u16,
        payload: Vec<u8>,
    },
    PubRel(u16),
    PingResp,
    Other(u8),
}

fn seen((first, body): RawPacket) -> Seen {
    match first >> 4 {
        3 => {
            let qos = (first >> 1) & 0b11;
            let topic_len = u16::from_be_bytes([body[0], body[1]]) as usize;
            let mut at = 2 + topic_len;
            let mut pkid = 0;
            if qos > 0 {
                pkid = u16::from_be_bytes([body[at], body[at + 1]]);
                at += 2;
            }
            // Properties: the broker sends few enough for one length byte.
            at += 1 + body[at] as usize;
            Seen::Publish {
                qos,
                pkid,
                payload: body[at..].to_vec(),
            }
        }
        6 => Seen::PubRel(u16::from_be_bytes([body[0], body[1]])),
        13 => Seen::PingResp,
        _ => Seen::Other(first),
    }
}

fn pubrec(pkid: u16, reason: u8) -> Vec<u8> {
    let [hi, lo] = pkid.to_be_bytes();
    frame(0x50, &[hi, lo, reason])
}

fn pubcomp(pkid: u16) -> Vec<u8> {
    frame(0x70, &pkid.to_be_bytes())
}

const PINGREQ: [u8; 2] = [0xC0, 0x00];

/// An MQTT 5 client with the manager's rights on the internal listener:
/// it sees the PUBREC of each QoS 2 message it publishes.
async fn sender5(fleet: &Fleet) -> Probe5 {
    let (user, secret) = &fleet.broker.manager_credentials;
    let mut o = Probe5::options(fleet.broker.internal_addr, "sender5", None).unwrap();
    o.set_credentials(user, secret);
    Probe5::connect(o).await.unwrap()
}

/// Publishes `m{i}` for each `i` at QoS 2 to `topic`, one after the other:
/// each PUBREC is awaited, so each message is in the router's log before
/// anything published after it.
async fn publish_qos2(sender: &Probe5, topic: &str, range: std::ops::Range<usize>) {
    for i in range {
        assert_eq!(
            sender
                .publish_exactly_once(topic, format!("m{i}").into_bytes())
                .await
                .unwrap(),
            PubRecReason::Success
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_pubrec_ends_the_qos2_flow_without_a_pubrel() {
    use tokio::task::block_in_place;
    let fleet = Fleet::start().await.unwrap();
    let sender = sender5(&fleet).await;
    let (reply, marker) = ("fleet/v1/update/qr1/reply", "fleet/v1/service/change/qr1");
    // Receive Maximum 1 (property 0x21).
    let mut raw = block_in_place(|| {
        let mut raw = RawTls::connect(&fleet, "qr1", 60, &[0x21, 0, 1]);
        raw.subscribe(1, reply, 2);
        raw.subscribe(2, marker, 0);
        raw
    });
    publish_qos2(&sender, reply, 0..3).await;
    let m0 = seen(block_in_place(|| raw.next()));
    let Seen::Publish {
        qos: 2, pkid: a, ..
    } = m0
    else {
        panic!("{m0:?}")
    };
    // A QoS 0 marker overtakes m1 and m2, which wait for the quota: had
    // either come, it would be here first.
    sender
        .publish(marker, QoS::AtMostOnce, b"marker".to_vec())
        .await
        .unwrap();
    assert_eq!(
        seen(block_in_place(|| raw.next())),
        Seen::Publish {
            qos: 0,
            pkid: 0,
            payload: b"marker".to_vec()
        }
    );
    let mut got = Vec::new();
    block_in_place(|| {
        // m0 refused: the slot is free, and no PUBREL may follow.
        raw.send(&pubrec(a, 0x80)).unwrap();
        let m1 = seen(raw.next());
        let Seen::Publish { pkid: b, .. } = m1 else {
            panic!("m1 expected, {m1:?} came after {got:?}")
        };
        got.push(m1);
        // m1 accepted: the next packet is its PUBREL, not one for m0.
        raw.send(&pubrec(b, 0x00)).unwrap();
        got.push(seen(raw.next()));
        raw.send(&pubcomp(b)).unwrap();
        let m2 = seen(raw.next());
        let Seen::Publish { pkid: c, .. } = m2 else {
            panic!("m2 expected, {m2:?} came after {got:?}")
        };
        got.push(m2);
        raw.send(&pubrec(c, 0x00)).unwrap();
        got.push(seen(raw.next()));
        raw.send(&pubcomp(c)).unwrap();
        // Still served, and nothing else came.
        raw.send(&PINGREQ).unwrap();
        got.push(seen(raw.next()));
    });
    let publish = |pkid, payload: &str| Seen::Publish {
        qos: 2,
        pkid,
        payload: payload.as_bytes().to_vec(),
    };
    let pkid = |s: &Seen| match s {
        Seen::Publish { pkid, .. } => *pkid,
        _ => 0,
    };
    let (b, c) = (pkid(&got[0]), pkid(&got[2]));
    assert_eq!(
        got,
        [
            publish(b, "m1"),
            Seen::PubRel(b),
            publish(c, "m2"),
            Seen::PubRel(c),
            Seen::PingResp
        ]
    );
}

/// An MQTT 5 PUBLISH at QoS 1 or 2 of `payload` to `topic` under `pkid`,
/// with no properties.
fn raw_publish(qos: u8, pkid: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend(topic.as_bytes());
    body.extend(pkid.to_be_bytes());
    body.push(0);
    body.extend_from_slice(payload);
    frame(0x30 | qos << 1, &body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_answered_in_the_order_they_came_refused_or_not() {
    let fleet = Fleet::start().await.unwrap();
    // Its own request topic goes through to the router, which answers a
    // little later; another device's is refused by the front door at once.
    let (own, other) = ("fleet/v1/activate/po1", "fleet/v1/activate/po2");
    let sent = [
        (1, 1, own),
        (1, 2, other),
        (1, 3, own),
        (1, 4, other),
        (1, 5, other),
        (2, 6, own),
        (2, 7, other),
        (2, 8, own),
    ];
    let answers = tokio::task::block_in_place(|| {
        let mut raw = RawTls::connect(&fleet, "po1", 60, &[]);
        let burst: Vec<u8> = sent
            .iter()
            .flat_map(|(qos, pkid, topic)| raw_publish(*qos, *pkid, topic, b"x"))
            .collect();
        raw.send(&burst).unwrap();
        (0..sent.len()).map(|_| raw.next()).collect::<Vec<_>>()
    });
    // (packet type, packet id, reason code; a success may leave it out)
    let answers: Vec<(u8, u16, u8)> = answers
        .iter()
        .map(|(first, body)| {
            let pkid = u16::from_be_bytes([body[0], body[1]]);
            (first >> 4, pkid, body.get(2).copied().unwrap_or(0))
        })
        .collect();
    let of = |kind: u8| -> Vec<(u16, u8)> {
        answers
            .iter()
            .filter(|a| a.0 == kind)
            .map(|a| (a.1, a.2))
            .collect()
    };
    // PUBACKs in the order of their PUBLISHes, and PUBRECs in theirs
    // (MQTT 5 §4.6); how the two interleave is not the client's business.
    assert_eq!(
        of(4),
        [(1, 0), (2, 0x87), (3, 0), (4, 0x87), (5, 0x87)],
        "{answers:?}"
    );
    assert_eq!(of(5), [(6, 0), (7, 0x87), (8, 0)], "{answers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_maximum_packet_size_of_0_is_refused() {
    let fleet = Fleet::start().await.unwrap();
    // Maximum Packet Size (property 0x27) 0. rumqttc cannot send it: it
    // takes the value as its own limit and cannot read the CONNACK.
    let connect = raw_connect("mp0", 60, &[0x27, 0, 0, 0, 0]);
    let (_raw, code) = tokio::task::block_in_place(|| RawTls::open(&fleet, &connect));
    assert_eq!(code, 0x82, "CONNACK code");
    assert_eq!(fleet.broker.metrics.get(|m| &m.refused_connects), 1);
}

/// A service connection of `device` (certified on svcA) with manual acks
/// and Receive Maximum `receive_max`, subscribed at QoS 2 to its
/// service-change topic (returned first) and at QoS 0 to its poll replies.
async fn qos2_subscriber(
    fleet: &Fleet,
    device: &str,
    receive_max: u16,
) -> (Probe5, String, String) {
    let auth = certified(fleet, device, "svcA");
    let mut opts = service_options(fleet, device, &auth);
    opts.set_receive_maximum(Some(receive_max));
    opts.set_manual_acks(true);
    let probe = Probe5::connect(opts).await.unwrap();
    let acked = format!("/tenants/svcA/fleet/v1/service/change/{device}");
    let unacked = format!("/tenants/svcA/fleet/v1/poll/{device}/reply");
    for (filter, qos, granted) in [
        (
            &acked,
            QoS::ExactlyOnce,
            SubscribeReasonCode::Success(QoS::ExactlyOnce),
        ),
        (
            &unacked,
            QoS::AtMostOnce,
            SubscribeReasonCode::Success(QoS::AtMostOnce),
        ),
    ] {
        let before = probe.subacks.lock().unwrap().len();
        probe.client.subscribe(filter.as_str(), qos).await.unwrap();
        let acks = probe.subacks.clone();
        let codes = eventually(T, "SUBACK", || {
            let got = acks.lock().unwrap().get(before).cloned();
            async move { got }
        })
        .await
        .unwrap();
        assert_eq!(codes, [granted]);
    }
    (probe, acked, unacked)
}

/// The `n`-th (0-based) PUBLISH `probe` received on `topic`, whole.
fn nth_on(probe: &Probe5, topic: &str, n: usize) -> fleet_testkit::v5::Publish {
    probe
        .publishes
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.topic == topic.as_bytes())
        .nth(n)
        .cloned()
        .unwrap()
}

/// Sends a QoS 0 marker to `probe` on `unacked` and waits for it (the
/// `n`-th there): whatever the router handed over before it has been
/// through the front door by then, so counts taken now are final.
async fn round_trip_marker(sender: &Probe5, probe: &Probe5, unacked: &str, n: usize) {
    sender
        .publish(unacked, QoS::AtMostOnce, format!("marker{n}").into_bytes())
        .await
        .unwrap();
    probe.wait_for(unacked, n, T).await.unwrap();
}

#[tokio::test]
async fn qos2_deliveries_keep_to_the_receive_maximum_whatever_the_ack_order() {
    let fleet = Fleet::start().await.unwrap();
    let sender = sender5(&fleet).await;
    let (probe, acked, unacked) = qos2_subscriber(&fleet, "rm2", 2).await;
    publish_qos2(&sender, &acked, 0..5).await;
    probe.wait_for(&acked, 2, T).await.unwrap();
    round_trip_marker(&sender, &probe, &unacked, 1).await;
    assert_eq!(probe.on(&acked).len(), 2, "more than Receive Maximum sent");
    // m1's PUBREC before m0's: the router hears of both in its order, and
    // the link stays up. A QoS 2 slot frees at PUBCOMP, which the probe
    // sends as each PUBREL comes, and a PUBREL comes only once the router
    // has the PUBREC.
    let mut markers = 1;
    for (first, second, expected) in [(1, 0, 4), (3, 2, 5)] {
        let before = probe.on(&acked).len();
        probe
            .client
            .ack(&nth_on(&probe, &acked, first))
            .await
            .unwrap();
        markers += 1;
        round_trip_marker(&sender, &probe, &unacked, markers).await;
        assert_eq!(probe.on(&acked).len(), before, "a slot freed early");
        probe
            .client
            .ack(&nth_on(&probe, &acked, second))
            .await
            .unwrap();
        probe.wait_for(&acked, expected, T).await.unwrap();
        markers += 1;
        round_trip_marker(&sender, &probe, &unacked, markers).await;
        assert_eq!(probe.on(&acked).len(), expected);
    }
    probe.client.ack(&nth_on(&probe, &acked, 4)).await.unwrap();
    // More after all that: delivered, so the router still serves the link.
    publish_qos2(&sender, &acked, 5..6).await;
    probe.wait_for(&acked, 6, T).await.unwrap();
    let payloads: Vec<_> = probe.on(&acked).into_iter().map(|m| m.payload).collect();
    let sent: Vec<_> = (0..6).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads, sent);
    assert!(!probe.is_cut(), "{:?}", probe.errors.lock().unwrap());
}

#[tokio::test]
async fn qos1_acknowledgements_out_of_order_do_not_cut_the_link() {
    let fleet = Fleet::start().await.unwrap();
    let sender = sender5(&fleet).await;
    let (probe, acked, unacked) = subscriber(&fleet, "oo1", |o| {
        o.set_receive_maximum(Some(2));
        o.set_manual_acks(true);
    })
    .await;
    for i in 0..4 {
        assert_eq!(
            sender
                .publish_acked(&acked, None, format!("m{i}").into_bytes())
                .await
                .unwrap(),
            PubAckReason::Success
        );
    }
    probe.wait_for(&acked, 2, T).await.unwrap();
    // m1 before m0: m1's slot frees at once, but the router hears of m1
    // only after m0.
    probe.client.ack(&nth_on(&probe, &acked, 1)).await.unwrap();
    probe.wait_for(&acked, 3, T).await.unwrap();
    round_trip_marker(&sender, &probe, &unacked, 1).await;
    assert_eq!(probe.on(&acked).len(), 3);
    probe.client.ack(&nth_on(&probe, &acked, 0)).await.unwrap();
    probe.wait_for(&acked, 4, T).await.unwrap();
    for n in [3, 2] {
        probe.client.ack(&nth_on(&probe, &acked, n)).await.unwrap();
    }
    round_trip_marker(&sender, &probe, &unacked, 2).await;
    let payloads: Vec<_> = probe.on(&acked).into_iter().map(|m| m.payload).collect();
    let sent: Vec<_> = (0..4).map(|i| format!("m{i}").into_bytes()).collect();
    assert_eq!(payloads, sent);
    assert!(!probe.is_cut(), "{:?}", probe.errors.lock().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed() {
    let fleet = Fleet::start().await.unwrap();
    let sender = fleet.privileged("sender").await.unwrap();
    let topic = "fleet/v1/update/ws1/reply";
    let live = fleet.broker.metrics.get(|m| &m.live);
    // Keep-alive 1 s: a write may stall 1.5 s.
    let mut raw = tokio::task::block_in_place(|| {
        let mut raw = RawTls::connect(&fleet, "ws1", 1, &[]);
        raw.subscribe(1, topic, 0);
        raw
    });
    // From now on it never reads, but keeps its keep-alive: what closes it
    // is the stalled write.
    let client = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + T;
        while Instant::now() < deadline {
            if let Err(err) = raw.send(&PINGREQ) {
                return Ok(err);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Err("still open")
    });
    // Far more than the sockets between them hold.
    for _ in 0..100 {
        sender.publish(topic, vec![b'x'; 200 * 1024]).await.unwrap();
    }
    let closed = client.await.unwrap();
    assert!(closed.is_ok(), "{closed:?}");
    // Its connection slot is free again.
    eventually(T, "the connection to be gone", || {
        let now = fleet.broker.metrics.get(|m| &m.live);
        async move { (now == live).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(fleet.broker.metrics.get(|m| &m.write_stalls), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_sends_nothing_is_timed_out_whatever_it_receives() {
    let fleet = Fleet::start().await.unwrap();
    let sender = fleet.privileged("sender").await.unwrap();
    let topic = "fleet/v1/update/ka1/reply";
    // Keep-alive 1 s: the broker gives it 1.5 s between packets.
    let mut raw = tokio::task::block_in_place(|| {
        let mut raw = RawTls::connect(&fleet, "ka1", 1, &[]);
        raw.subscribe(1, topic, 0);
        raw
    });
    // Traffic to the client, far more often than its keep-alive, while it
    // sends nothing at all.
    let stop = tokio_util::sync::CancellationToken::new();
    let ticking = {
        let stop = stop.clone();
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                sender.publish(topic, b"tick".to_vec()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let started = Instant::now();
    let (received, lasted) = tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut received = Vec::new();
        let mut chunk = [0u8; 4096];
        // Read until the broker closes; give up well before the test's
        // timeout, which a broker that never closes would reach.
        while started.elapsed() < Duration::from_secs(10) {
            match raw.tls.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&chunk[..n]),
            }
        }
        (received, started.elapsed())
    })
    .await
    .unwrap();
    stop.cancel();
    ticking.await.unwrap();
    assert!(
        lasted < Duration::from_secs(10),
        "still open after {lasted:?}"
    );
    assert!(
        lasted >= Duration::from_millis(1400),
        "closed after {lasted:?}"
    );
    // The DISCONNECT: 0xE0, its remaining length, reason 0x8D (Keep Alive
    // timeout). Nothing else the broker sent here has a 0xE0 byte.
    assert!(
        received.windows(3).any(|w| w[0] == 0xE0 && w[2] == 0x8D),
        "no DISCONNECT 0x8D (Keep Alive timeout): {:02x?}",
        &received[received.len().saturating_sub(40)..]
    );
}

#[tokio::test]
async fn a_session_taken_over_publishes_its_will_unless_it_is_delayed() {
    let (fleet, observer) = watching_telemetry().await;
    let root = fleet.certs_dir().join("root-ca.pem");
    // MQTT 3.1.1: a Will has no delay, so it goes when a newer connection
    // of the same certificate takes the session over.
    let (chain, key) = certified(&fleet, "wt1", "svcA");
    let will_of = |id: &str| {
        let mut o = rumqttc::MqttOptions::new(id, "localhost", fleet.service_addr().port());
        o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Simple {
            ca: std::fs::read(&root).unwrap(),
            alpn: None,
            client_auth: Some((chain.clone(), key.clone())),
        }));
        o.set_last_will(rumqttc::LastWill::new(
            format!("/tenants/svcA/telemetry/{id}"),
            "taken",
            rumqttc::QoS::AtLeastOnce,
            false,
        ));
        o
    };
    let first = eventually(T, "svcA's CA to be trusted", || {
        let opts = will_of("wt1");
        async move { Probe::connect(opts).await.ok() }
    })
    .await
    .unwrap();
    // The newer connection says it is back as soon as it is connected: the
    // Will of the one it replaced comes first, and once.
    let second = Probe::connect(will_of("wt1")).await.unwrap();
    second
        .publish("/tenants/svcA/telemetry/wt1", b"back".to_vec())
        .await
        .unwrap();
    first
        .wait_cut(T, "the first connection to be cut")
        .await
        .unwrap();
    observer
        .wait_for("/tenants/svcA/telemetry/wt1", 2, T)
        .await
        .unwrap();
    traffic_marker(&observer).await;
    let seen: Vec<_> = observer
        .on("/tenants/svcA/telemetry/wt1")
        .into_iter()
        .map(|m| m.payload)
        .collect();
    assert_eq!(seen, [b"taken".to_vec(), b"back".to_vec()]);
    // MQTT 5 with a Will Delay Interval and a kept session: the newer
    // connection comes before the delay is over, so the Will never goes.
    // wt3's Will, due two seconds after wt2's would be, is the clock.
    let (delay, later) = (2, 4);
    let (auth, first, clock) = delayed_wills(&fleet, ["wt2", "wt3"], (delay, later)).await;
    drop(clock);
    let second = Probe5::connect(lingering(&fleet, "wt2", &auth[0], delay, true))
        .await
        .unwrap();
    first.wait_cut(T).await.unwrap();
    observer
        .wait_for("/tenants/svcA/telemetry/wt3", 1, T)
        .await
        .unwrap();
    assert!(observer.on("/tenants/svcA/telemetry/wt2").is_empty());
    assert!(!second.is_cut());
}

/// An MQTT 5 CONNECT of certified device `client_id` with a Will to its
/// telemetry (QoS 1, payload `gone`) delayed by `will_delay` seconds, and
/// the Session Expiry Interval `session_expiry`.
fn will_connect(
    client_id: &str,
    clean_start: bool,
    session_expiry: u32,
    will_delay: u32,
) -> Vec<u8> {
    let flags = 0x04 | 0x08 | if clean_start { 0x02 } else { 0 };
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, flags];
    body.extend(60u16.to_be_bytes());
    body.extend([5, 0x11]);
    body.extend(session_expiry.to_be_bytes());
    body.extend((client_id.len() as u16).to_be_bytes());
    body.extend(client_id.as_bytes());
    body.extend([5, 0x18]);
    body.extend(will_delay.to_be_bytes());
    let topic = format!("/tenants/svcA/telemetry/{client_id}");
    body.extend((topic.len() as u16).to_be_bytes());
    body.extend(topic.as_bytes());
    body.extend(4u16.to_be_bytes());
    body.extend(b"gone");
    frame(0x10, &body)
}

/// A packet read from `r`: the fixed header's first byte and the rest.
fn read_packet(r: &mut impl std::io::Read) -> std::io::Result<RawPacket> {
    let mut first = [0u8; 1];
    r.read_exact(&mut first)?;
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut byte = [0u8; 1];
        r.read_exact(&mut byte)?;
        len |= usize::from(byte[0] & 0x7F) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok((first[0], body))
}

/// Connects certified `device` to the service listener over blocking
/// rustls, sends `connect` and `disconnect`, and returns what the broker
/// sent after its accepting CONNACK, up to the end of the connection.
fn connect_and_disconnect(
    fleet: &Fleet,
    device: &str,
    auth: &(Vec<u8>, Vec<u8>),
    connect: &[u8],
    disconnect: &[u8],
) -> Vec<RawPacket> {
    use std::io::Write;
    let root = std::fs::read(fleet.certs_dir().join("root-ca.pem")).unwrap();
    let client = fleet_testkit::Resuming::new(
        fleet.service_addr(),
        device,
        &root,
        (&auth.0, &auth.1),
        &rustls::version::TLS13,
    )
    .unwrap();
    let tcp = std::net::TcpStream::connect(fleet.service_addr()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(client.config, name).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(connect).unwrap();
    let (first, body) = read_packet(&mut tls).unwrap();
    assert_eq!((first, body[1]), (0x20, 0), "not an accepting CONNACK");
    tls.write_all(disconnect).unwrap();
    tls.flush().unwrap();
    let mut after = Vec::new();
    while let Ok(packet) = read_packet(&mut tls) {
        after.push(packet);
    }
    after
}

/// A DISCONNECT's Session Expiry Interval replaces the CONNECT's in the
/// Will's wait (MQTT 5 §3.14.2.2.2, §3.1.3.2.2): 0 after an hour at
/// CONNECT sends a Will delayed by an hour at once (it would wait 300 s
/// otherwise); an error reason keeps the Will; an interval set after 0 at
/// CONNECT is a protocol error, answered with DISCONNECT 0x82, and the Will
/// goes as for any connection that ends without a valid DISCONNECT.
#[tokio::test]
async fn a_disconnect_says_when_the_will_goes() {
    let (fleet, observer) = watching_telemetry().await;
    let fleet = std::sync::Arc::new(fleet);
    let ended = |device: &'static str, connect: Vec<u8>, disconnect: Vec<u8>| {
        let fleet = fleet.clone();
        tokio::task::spawn_blocking(move || {
            let auth = certified(&fleet, device, "svcA");
            connect_and_disconnect(&fleet, device, &auth, &connect, &disconnect)
        })
    };
    // A kept session and a Will delayed by an hour; the DISCONNECT asks
    // for its Will (0x04) and ends the session now.
    let after = ended(
        "wd5",
        will_connect("wd5", false, 3600, 3600),
        frame(0xE0, &[0x04, 5, 0x11, 0, 0, 0, 0]),
    )
    .await
    .unwrap();
    assert!(after.is_empty(), "{after:?}");
    let will = observer
        .wait_for("/tenants/svcA/telemetry/wd5", 1, T)
        .await
        .unwrap();
    assert_eq!(will.payload, b"gone");
    // The session ended with it.
    let expired = || fleet.broker.metrics.get(|m| &m.sessions_expired);
    eventually(T, "the session to end", || async {
        (expired() == 1).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(fleet.broker.metrics.get(|m| &m.sessions_kept), 0);
    // A DISCONNECT with an error reason (0x80) keeps the Will: only 0x00
    // deletes it.
    let after = ended(
        "wd7",
        will_connect("wd7", true, 0, 0),
        frame(0xE0, &[0x80, 0]),
    )
    .await
    .unwrap();
    assert!(after.is_empty(), "{after:?}");
    let will = observer
        .wait_for("/tenants/svcA/telemetry/wd7", 1, T)
        .await
        .unwrap();
    assert_eq!(will.payload, b"gone");
    // No session kept; a normal DISCONNECT that would keep one for 30 s.
    let after = ended(
        "wd6",
        will_connect("wd6", true, 0, 0),
        frame(0xE0, &[0x00, 5, 0x11, 0, 0, 0, 30]),
    )
    .await
    .unwrap();
    assert_eq!(
        after.iter().map(|(f, b)| (*f, b[0])).collect::<Vec<_>>(),
        [(0xE0, 0x82)],
        "a DISCONNECT with Protocol Error"
    );
    let will = observer
        .wait_for("/tenants/svcA/telemetry/wd6", 1, T)
        .await
        .unwrap();
    assert_eq!(will.payload, b"gone");
}

/// A session kept past its connection ends when its expiry passes with no
/// connection of its identity: an MQTT 5 Session Expiry Interval cut to
/// `max_session_expiry_secs` (the CONNACK says so), and an MQTT 3.1.1
/// session with clean session 0 after that long. Until then it keeps what
/// comes for it.
#[tokio::test]
async fn a_kept_session_ends_when_its_expiry_passes() {
    let fleet = Fleet::start_tuned(|b| b.max_session_expiry_secs = 3, |_| {})
        .await
        .unwrap();
    let observer = fleet.privileged("observer").await.unwrap();
    let metric = |m: fn(&fleet_broker::frontdoor::Metrics) -> &std::sync::atomic::AtomicU64| {
        fleet.broker.metrics.get(m)
    };
    let auth = certified(&fleet, "se1", "svcA");
    let notices = "/tenants/svcA/fleet/v1/service/change/se1";
    let kept = || {
        let mut o = service_options(&fleet, "se1", &auth);
        o.set_clean_start(false);
        o.set_session_expiry_interval(Some(3600));
        o
    };
    let first = eventually(T, "svcA's CA to be trusted", || {
        let o = kept();
        async move { Probe5::connect(o).await.ok() }
    })
    .await
    .unwrap();
    assert!(!first.connack.session_present);
    let granted = first.connack.properties.as_ref();
    assert_eq!(granted.and_then(|p| p.session_expiry_interval), Some(3));
    away_with_a_notice_waiting(&fleet, &observer, first, notices).await;
    // Back within its expiry: the session, and what came for it.
    let back = Probe5::connect(kept()).await.unwrap();
    assert!(back.connack.session_present);
    let kept_for_it = back.wait_for(notices, 1, T).await.unwrap();
    assert_eq!(kept_for_it.payload, b"while away");
    assert_eq!(metric(|m| &m.sessions_kept), 0);
    drop(back);
    // Away for longer: it ends.
    eventually(T, "the session to expire", || async {
        (metric(|m| &m.sessions_expired) == 1).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(metric(|m| &m.sessions_kept), 0);
    let after = Probe5::connect(kept()).await.unwrap();
    assert!(!after.connack.session_present);
    after.client.disconnect().await.unwrap();
    eventually(T, "the session to be kept again", || async {
        (metric(|m| &m.sessions_kept) == 1).then_some(())
    })
    .await
    .unwrap();
    // MQTT 3.1.1 names no expiry: clean session 0 keeps it for
    // max_session_expiry_secs.
    let (chain, key) = certified(&fleet, "se2", "svcA");
    let mut o = rumqttc::MqttOptions::new("se2", "localhost", fleet.service_addr().port());
    o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Simple {
        ca: std::fs::read(fleet.certs_dir().join("root-ca.pem")).unwrap(),
        alpn: None,
        client_auth: Some((chain.clone(), key.clone())),
    }));
    o.set_clean_session(false);
    let old = Probe::connect(o).await.unwrap();
    old.subscribe("/tenants/svcA/fleet/v1/service/change/se2")
        .await
        .unwrap();
    drop(old);
    eventually(T, "both sessions to expire", || async {
        (metric(|m| &m.sessions_expired) == 3).then_some(())
    })
    .await
    .unwrap();
    // Whatever version comes back finds no session.
    let mut o = service_options(&fleet, "se2", &(chain, key));
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(60));
    let back = Probe5::connect(o).await.unwrap();
    assert!(!back.connack.session_present);
}

/// Clean Start 0 resumes the identity's session whatever the new
/// connection's own Session Expiry Interval (MQTT 5 §3.1.2.4); with none
/// (0), the session then ends with that connection.
#[tokio::test]
async fn a_session_is_resumed_by_a_connection_that_will_not_keep_it() {
    let fleet = Fleet::start().await.unwrap();
    let observer = fleet.privileged("observer").await.unwrap();
    let metric = |m: fn(&fleet_broker::frontdoor::Metrics) -> &std::sync::atomic::AtomicU64| {
        fleet.broker.metrics.get(m)
    };
    let auth = certified(&fleet, "se3", "svcA");
    let notices = "/tenants/svcA/fleet/v1/service/change/se3";
    let resuming = |expiry: Option<u32>| {
        let mut o = service_options(&fleet, "se3", &auth);
        o.set_clean_start(false);
        o.set_session_expiry_interval(expiry);
        o
    };
    let first = eventually(T, "svcA's CA to be trusted", || {
        let o = resuming(Some(60));
        async move { Probe5::connect(o).await.ok() }
    })
    .await
    .unwrap();
    away_with_a_notice_waiting(&fleet, &observer, first, notices).await;
    let back = Probe5::connect(resuming(None)).await.unwrap();
    assert!(back.connack.session_present);
    let kept_for_it = back.wait_for(notices, 1, T).await.unwrap();
    assert_eq!(kept_for_it.payload, b"while away");
    drop(back);
    eventually(T, "the session to end with its connection", || async {
        (metric(|m| &m.sessions_expired) == 1).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(metric(|m| &m.sessions_kept), 0);
    let after = Probe5::connect(resuming(Some(60))).await.unwrap();
    assert!(!after.connack.session_present);
}

/// Subscribes `first` (a connection whose session is kept) to `notices`,
/// ends it, waits until its session is kept, and has `observer` publish
/// "while away" to `notices`.
async fn away_with_a_notice_waiting(fleet: &Fleet, observer: &Probe, first: Probe5, notices: &str) {
    first.subscribe(notices).await.unwrap();
    drop(first);
    eventually(T, "the session to be kept", || async {
        (fleet.broker.metrics.get(|m| &m.sessions_kept) == 1).then_some(())
    })
    .await
    .unwrap();
    observer
        .publish(notices, b"while away".to_vec())
        .await
        .unwrap();
}

/// Reads one packet's fixed-header byte and body.
async fn read_async(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    let mut first = [0u8; 1];
    tokio::time::timeout(T, s.read_exact(&mut first))
        .await
        .unwrap()
        .unwrap();
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        tokio::time::timeout(T, s.read_exact(&mut b))
            .await
            .unwrap()
            .unwrap();
        len |= usize::from(b[0] & 0x7f) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    tokio::time::timeout(T, s.read_exact(&mut body))
        .await
        .unwrap()
        .unwrap();
    (first[0], body)
}

/// The broker keeps the packet id of every QoS 2 PUBLISH until its PUBREL:
/// a client may have at most Receive Maximum (32) of them unreleased, and
/// one more ends its connection with DISCONNECT 0x93. A client that
/// releases them may send as many as it likes, of any size.
#[tokio::test]
async fn qos2_publishes_not_released_are_capped_at_the_receive_maximum() {
    let fleet = Fleet::start().await.unwrap();
    let topic = "fleet/v1/status/q2a";
    let mut s = raw_v5(&fleet, "q2a").await;
    for pkid in 1..=40u16 {
        s.write_all(&raw_publish(2, pkid, topic, b"x"))
            .await
            .unwrap();
        let (first, body) = read_async(&mut s).await;
        assert_eq!(
            (first, &body[..2]),
            (0x50, &pkid.to_be_bytes()[..]),
            "PUBREC"
        );
        s.write_all(&[0x62, 0x02, (pkid >> 8) as u8, pkid as u8])
            .await
            .unwrap();
        let (first, body) = read_async(&mut s).await;
        assert_eq!(
            (first, &body[..2]),
            (0x70, &pkid.to_be_bytes()[..]),
            "PUBCOMP"
        );
    }
    drop(s);

    let mut s = raw_v5(&fleet, "q2b").await;
    let topic = "fleet/v1/status/q2b";
    for pkid in 1..=32u16 {
        s.write_all(&raw_publish(2, pkid, topic, &[0u8; 1024]))
            .await
            .unwrap();
        let (first, _) = read_async(&mut s).await;
        assert_eq!(first, 0x50, "PUBREC {pkid}");
    }
    s.write_all(&raw_publish(2, 33, topic, b"one too many"))
        .await
        .unwrap();
    assert_eq!(disconnect_reason(&until_closed(&mut s).await), 0x93);
}

/// A raw MQTT 5 connection to the internal listener as the manager, client
/// id `client_id`, with Clean Start 0 and a Session Expiry Interval of 600 s;
/// the CONNACK's session-present flag.
async fn raw_kept(fleet: &Fleet, client_id: &str) -> (tokio::net::TcpStream, bool) {
    let (user, secret) = &fleet.broker.manager_credentials;
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 5, 0xC0, 0, 60];
    body.extend([5, 0x11, 0, 0, 0x02, 0x58]);
    for field in [client_id, user.as_str(), secret.as_str()] {
        body.extend((field.len() as u16).to_be_bytes());
        body.extend(field.as_bytes());
    }
    let addr = fleet.broker.internal_addr;
    let mut s = tokio::time::timeout(T, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    s.write_all(&frame(0x10, &body)).await.unwrap();
    let (first, body) = read_async(&mut s).await;
    assert_eq!((first, body[1]), (0x20, 0), "CONNACK accepting");
    (s, body[0] & 1 == 1)
}

/// An observer with the manager's rights subscribed to `topic`, and a raw
/// kept connection `client_id` (in a new session) to publish there.
async fn kept_publisher(
    fleet: &Fleet,
    client_id: &str,
    topic: &str,
) -> (Probe, tokio::net::TcpStream) {
    let observer = fleet
        .privileged(&format!("{client_id}-observer"))
        .await
        .unwrap();
    observer.subscribe(topic).await.unwrap();
    let (s, present) = raw_kept(fleet, client_id).await;
    assert!(!present);
    (observer, s)
}

/// `client_id` connected again, in its kept session.
async fn back_in_session(fleet: &Fleet, client_id: &str) -> tokio::net::TcpStream {
    eventually(T, "the session to be let go", || async {
        let (s, present) = raw_kept(fleet, client_id).await;
        present.then_some(s)
    })
    .await
    .unwrap()
}

/// A QoS 2 PUBLISH sent again (DUP set).
fn qos2_again(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    let mut again = raw_publish(2, pkid, topic, payload);
    again[0] |= 0x08;
    again
}

/// A QoS 2 PUBLISH is delivered once, when it comes, and its packet id is
/// kept with the session: after a reconnect the client's resend is not
/// delivered again and its PUBREL is completed (MQTT 5 §4.3.3, §4.4).
#[tokio::test]
async fn a_qos2_exchange_is_completed_across_a_reconnect() {
    let fleet = Fleet::start().await.unwrap();
    let topic = "/tenants/svcA/fleet/v1/service/change/q2r";
    let (observer, mut s) = kept_publisher(&fleet, "q2r", topic).await;
    s.write_all(&raw_publish(2, 7, topic, b"once"))
        .await
        .unwrap();
    let (first, body) = read_async(&mut s).await;
    assert_eq!((first, &body[..2]), (0x50, &[0u8, 7][..]), "PUBREC");
    observer.wait_for(topic, 1, T).await.unwrap();
    // Gone before its PUBREL; back in the same session.
    drop(s);
    let mut s = back_in_session(&fleet, "q2r").await;
    s.write_all(&qos2_again(topic, 7, b"once")).await.unwrap();
    let (first, body) = read_async(&mut s).await;
    assert_eq!((first, &body[..2]), (0x50, &[0u8, 7][..]), "PUBREC again");
    s.write_all(&[0x62, 0x02, 0, 7]).await.unwrap();
    let (first, body) = read_async(&mut s).await;
    assert_eq!((first, &body[..2]), (0x70, &[0u8, 7][..]), "PUBCOMP");
    assert_eq!(body.get(2).copied().unwrap_or(0), 0, "PUBCOMP Success");
    // Delivered once: a marker published after it comes with nothing between.
    s.write_all(&raw_publish(2, 8, topic, b"marker"))
        .await
        .unwrap();
    observer.wait_for(topic, 2, T).await.unwrap();
    let got: Vec<_> = observer.on(topic).into_iter().map(|m| m.payload).collect();
    assert_eq!(got, [b"once".to_vec(), b"marker".to_vec()]);
}

/// A QoS 2 PUBLISH over the Receive Maximum ends the connection and is
/// not taken: sent again in the same kept session (after the client has
/// released the others), it is delivered. The ids carried over do not
/// count against the next connection's Receive Maximum.
#[tokio::test]
async fn a_qos2_publish_over_the_receive_maximum_is_not_taken() {
    let fleet = Fleet::start().await.unwrap();
    let topic = "/tenants/svcA/fleet/v1/service/change/q2m";
    let (observer, mut s) = kept_publisher(&fleet, "q2m", topic).await;
    for pkid in 1..=32u16 {
        s.write_all(&raw_publish(2, pkid, topic, b"held"))
            .await
            .unwrap();
        assert_eq!(read_async(&mut s).await.0, 0x50, "PUBREC {pkid}");
    }
    s.write_all(&raw_publish(2, 33, topic, b"over"))
        .await
        .unwrap();
    assert_eq!(disconnect_reason(&until_closed(&mut s).await), 0x93);
    let mut s = back_in_session(&fleet, "q2m").await;
    // A new connection has a Receive Maximum of its own (MQTT 5 §4.9): the
    // 32 carried over leave it room.
    s.write_all(&raw_publish(2, 34, topic, b"new"))
        .await
        .unwrap();
    assert_eq!(read_async(&mut s).await.0, 0x50, "PUBREC 34");
    // It releases what it had, then sends the one refused again.
    for pkid in (1..=32u16).chain([34]) {
        s.write_all(&[0x62, 0x02, (pkid >> 8) as u8, pkid as u8])
            .await
            .unwrap();
        assert_eq!(read_async(&mut s).await.0, 0x70, "PUBCOMP {pkid}");
    }
    s.write_all(&qos2_again(topic, 33, b"over")).await.unwrap();
    assert_eq!(read_async(&mut s).await.0, 0x50, "PUBREC 33");
    observer.wait_for(topic, 34, T).await.unwrap();
    assert_eq!(observer.on(topic).last().unwrap().payload, b"over");
}

/// A kept session that was the last member of a shared subscription, and
/// left a message of it unacknowledged, comes back to it: its leaving does
/// not bring the router down.
#[tokio::test]
async fn the_last_member_of_a_shared_subscription_leaves_and_comes_back() {
    let fleet = Fleet::start().await.unwrap();
    let sender = sender5(&fleet).await;
    let (user, secret) = &fleet.broker.manager_credentials;
    let mut o = Probe5::options(fleet.broker.internal_addr, "sh1", None).unwrap();
    o.set_credentials(user, secret);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    o.set_manual_acks(true);
    let member = Probe5::connect(o.clone()).await.unwrap();
    let topic = "fleet/v1/status/sh1";
    assert_eq!(
        member
            .subscribe(&format!("$share/g/{topic}"))
            .await
            .unwrap(),
        [SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );
    let reason = sender
        .publish_acked(topic, None, b"m".to_vec())
        .await
        .unwrap();
    assert_eq!(reason, PubAckReason::Success);
    member.wait_for(topic, 1, T).await.unwrap();
    drop(member);
    let back = resumed(&o).await;
    assert!(!back.is_cut());
    assert!(!sender.is_cut());
}

/// Sends `n` QoS 0 PUBLISHes of one byte to `topic` at once and reads until
/// the broker closes; returns the reason code of its DISCONNECT.
async fn publish_until_closed(s: &mut tokio::net::TcpStream, topic: &str, n: usize) -> u8 {
    let mut publish = vec![0x30, (2 + topic.len() + 1 + 1) as u8];
    publish.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    publish.extend_from_slice(topic.as_bytes());
    publish.extend_from_slice(&[0, b'x']);
    let burst: Vec<u8> = publish
        .iter()
        .copied()
        .cycle()
        .take(publish.len() * n)
        .collect();
    // The broker may close before it has read all of them.
    let _ = s.write_all(&burst).await;
    let sent = until_closed(s).await;
    // Error replies from the manager may come first; the DISCONNECT ends it.
    let at = sent.iter().rposition(|&b| b == 0xE0).expect("a DISCONNECT");
    disconnect_reason(&sent[at..])
}

/// A device connection publishing faster than its pace (a burst of 50,
/// then 20 a second) is closed with DISCONNECT 0x96: a flood of requests
/// would keep the manager from answering anyone else.
#[tokio::test]
async fn a_device_publishing_too_fast_is_disconnected() {
    let fleet = Fleet::start().await.unwrap();
    let mut s = raw_v5(&fleet, "fast1").await;
    assert_eq!(
        publish_until_closed(&mut s, "fleet/v1/status/fast1", 200).await,
        0x96
    );
    assert!(fleet.broker.metrics.get(|m| &m.publish_rate_exceeded) >= 1);
}

/// A certified device's publish pace is the device's, not its
/// connection's: a reconnect does not refill it. A Will is a PUBLISH too:
/// it takes from the pace when it goes, and is dropped when none is left.
/// A connection with a Will keeps the pace's last token for it, so that
/// one closed for its pace still has its Will published.
#[tokio::test]
async fn a_device_s_publish_pace_outlives_its_connection() {
    let fleet = Fleet::start_tuned(
        |b| {
            b.publishes_per_sec_per_device = 0.01;
            b.publish_burst_per_device = 10.0;
        },
        |_| {},
    )
    .await
    .unwrap();
    let observer = fleet.privileged("observer").await.unwrap();
    observer
        .subscribe("/tenants/svcA/telemetry/#")
        .await
        .unwrap();
    let auth = certified(&fleet, "pace1", "svcA");
    let topic = "/tenants/svcA/telemetry/pace1";
    // Eight of its ten, then its Will (the connection dropped): nine.
    let first = Probe5::connect(lingering(&fleet, "pace1", &auth, 0, false))
        .await
        .unwrap();
    for _ in 0..8 {
        let reason = first.publish_acked(topic, None, b"t".to_vec()).await;
        assert_eq!(reason.unwrap(), PubAckReason::Success);
    }
    drop(first);
    observer.wait_for(topic, 9, T).await.unwrap();
    // The next connection may not take the tenth, its Will's: its PUBLISH
    // closes it, and its Will goes.
    let too_fast = || async {
        let next = Probe5::connect(lingering(&fleet, "pace1", &auth, 0, false))
            .await
            .unwrap();
        next.publish(topic, QoS::AtLeastOnce, b"t".to_vec())
            .await
            .unwrap();
        assert_eq!(
            next.wait_cut(T).await.unwrap(),
            Some(DisconnectReasonCode::MessageRateTooHigh)
        );
    };
    too_fast().await;
    observer.wait_for(topic, 10, T).await.unwrap();
    // The same again, and its Will finds nothing left.
    too_fast().await;
    traffic_marker(&observer).await;
    let seen: Vec<_> = observer.on(topic).into_iter().map(|m| m.payload).collect();
    let gone = seen.iter().filter(|p| p.as_slice() == b"gone").count();
    assert_eq!((seen.len(), gone), (10, 2), "{seen:?}");
    assert_eq!(fleet.broker.metrics.get(|m| &m.publish_rate_exceeded), 3);

    // A delayed Will that a reconnect cancels never goes, and takes
    // nothing: twelve such leave the next connection all ten, nine for
    // its PUBLISHes and one for its Will.
    let auth = certified(&fleet, "pace2", "svcA");
    let topic = "/tenants/svcA/telemetry/pace2";
    for _ in 0..12 {
        let dropped = Probe5::connect(lingering(&fleet, "pace2", &auth, 30, true))
            .await
            .unwrap();
        drop(dropped);
    }
    let last = Probe5::connect(lingering(&fleet, "pace2", &auth, 30, true))
        .await
        .unwrap();
    for n in 0..9 {
        let reason = last.publish_acked(topic, None, b"t".to_vec()).await;
        assert_eq!(reason.unwrap(), PubAckReason::Success, "PUBLISH {n}");
    }

    // A delayed Will takes from the pace when its delay is over, and one
    // that finds it spent then is dropped. (The device's connection in
    // svcB is another session: it does not cancel the Will, but it spends
    // the same pace.)
    let (auth_a, auth_b) = (
        certified(&fleet, "pace3", "svcA"),
        certified(&fleet, "pace3", "svcB"),
    );
    let away = Probe5::connect(lingering(&fleet, "pace3", &auth_a, 3, true))
        .await
        .unwrap();
    drop(away);
    let other = Probe5::connect(service_options(&fleet, "pace3", &auth_b))
        .await
        .unwrap();
    for n in 0..10 {
        let reason = other
            .publish_acked("/tenants/svcB/telemetry/pace3", None, b"t".to_vec())
            .await;
        assert_eq!(reason.unwrap(), PubAckReason::Success, "PUBLISH {n}");
    }
    let exceeded = fleet.broker.metrics.get(|m| &m.publish_rate_exceeded);
    eventually(T, "the delayed Will to be dropped", || async {
        (fleet.broker.metrics.get(|m| &m.publish_rate_exceeded) > exceeded).then_some(())
    })
    .await
    .unwrap();
    traffic_marker(&observer).await;
    assert!(observer.on("/tenants/svcA/telemetry/pace3").is_empty());
}

/// Under a burst below 2 the token kept for a Will is less than one: a
/// connection with a Will still gets its PUBLISH through a full pace.
#[tokio::test]
async fn a_burst_of_one_lets_a_connection_with_a_will_publish() {
    let fleet = Fleet::start_tuned(
        |b| {
            b.publishes_per_sec_per_device = 0.01;
            b.publish_burst_per_device = 1.0;
        },
        |_| {},
    )
    .await
    .unwrap();
    let auth = certified(&fleet, "pace4", "svcA");
    let will = Probe5::connect(lingering(&fleet, "pace4", &auth, 0, false))
        .await
        .unwrap();
    let reason = will
        .publish_acked("/tenants/svcA/telemetry/pace4", None, b"t".to_vec())
        .await;
    assert_eq!(reason.unwrap(), PubAckReason::Success);
}

/// The bootstrap listeners take a budget of PUBLISHes from each source
/// address over all its connections: one connection well within its own
/// pace (30 against a burst of 50) is closed with DISCONNECT 0x96 once its
/// address's budget (a burst of 20 here) is spent, and so is the next
/// connection from that address; the Will of a third is dropped.
#[tokio::test]
async fn an_address_spending_its_bootstrap_budget_is_disconnected() {
    let fleet = Fleet::start_tuned(
        |b| {
            b.bootstrap_publishes_per_sec_per_source = 0.1;
            b.bootstrap_publish_burst_per_source = 20.0;
        },
        |_| {},
    )
    .await
    .unwrap();
    for id in ["src1", "src2"] {
        let mut s = raw_v5(&fleet, id).await;
        let topic = format!("fleet/v1/status/{id}");
        assert_eq!(publish_until_closed(&mut s, &topic, 30).await, 0x96, "{id}");
    }
    assert!(fleet.broker.metrics.get(|m| &m.publish_rate_exceeded) >= 2);
    // A Will is a PUBLISH from its address too: with the budget spent, it
    // is dropped.
    let observer = fleet.privileged("observer").await.unwrap();
    observer.subscribe("fleet/v1/status/+").await.unwrap();
    let exceeded = fleet.broker.metrics.get(|m| &m.publish_rate_exceeded);
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    let mut o = rumqttc::MqttOptions::new("src3", addr.ip().to_string(), addr.port());
    o.set_last_will(rumqttc::LastWill::new(
        "fleet/v1/status/src3",
        "gone",
        rumqttc::QoS::AtMostOnce,
        false,
    ));
    drop(Probe::connect(o).await.unwrap());
    eventually(T, "the Will to be dropped", || {
        let now = fleet.broker.metrics.get(|m| &m.publish_rate_exceeded);
        async move { (now > exceeded).then_some(()) }
    })
    .await
    .unwrap();
    traffic_marker_on(&observer, "fleet/v1/status/marker").await;
    assert!(observer.on("fleet/v1/status/src3").is_empty());
}

/// A QoS 2 PUBLISH sent again under a packet id not yet released is the
/// same message: answered PUBREC, delivered once. A PUBREL for a packet id
/// the broker has nothing unreleased for is completed with PUBCOMP 0x92
/// and the connection goes on.
#[tokio::test]
async fn qos2_resends_and_unknown_pubrels_release_nothing_twice() {
    let fleet = Fleet::start().await.unwrap();
    let topic = "fleet/v1/status/q2c";
    let observer = fleet.privileged("q2c-observer").await.unwrap();
    observer.subscribe(topic).await.unwrap();
    let mut s = raw_v5(&fleet, "q2c").await;
    let expect = |(first, body): (u8, Vec<u8>), kind: u8, pkid: u16, what: &str| {
        assert_eq!(
            (first, &body[..2]),
            (kind, &pkid.to_be_bytes()[..]),
            "{what}"
        );
        body
    };
    // Sent twice (the second as a resend, DUP set), released once.
    s.write_all(&raw_publish(2, 7, topic, b"one"))
        .await
        .unwrap();
    expect(read_async(&mut s).await, 0x50, 7, "PUBREC");
    let mut again = raw_publish(2, 7, topic, b"one");
    again[0] |= 0x08;
    s.write_all(&again).await.unwrap();
    expect(read_async(&mut s).await, 0x50, 7, "PUBREC of the resend");
    s.write_all(&[0x62, 0x02, 0, 7]).await.unwrap();
    expect(read_async(&mut s).await, 0x70, 7, "PUBCOMP");
    // A PUBREL for nothing held.
    s.write_all(&[0x62, 0x02, 0, 99]).await.unwrap();
    let body = expect(
        read_async(&mut s).await,
        0x70,
        99,
        "PUBCOMP of an unknown id",
    );
    assert_eq!(body.get(2), Some(&0x92), "Packet Identifier not found");
    // The connection goes on.
    s.write_all(&raw_publish(2, 8, topic, b"two"))
        .await
        .unwrap();
    expect(read_async(&mut s).await, 0x50, 8, "PUBREC");
    s.write_all(&[0x62, 0x02, 0, 8]).await.unwrap();
    expect(read_async(&mut s).await, 0x70, 8, "PUBCOMP");
    eventually(T, "both messages at the observer", || {
        let got: Vec<Vec<u8>> = observer.messages().into_iter().map(|m| m.payload).collect();
        async move { got.contains(&b"two".to_vec()).then_some(got) }
    })
    .await
    .map(|got| {
        assert_eq!(
            got.iter().filter(|p| p.as_slice() == b"one").count(),
            1,
            "{got:?}"
        );
    })
    .unwrap();
}

/// A broker that stops tells its MQTT 5 clients so (DISCONNECT 0x8B), and
/// counts no revocation for it. `shut_down`, what the binaries do at
/// SIGTERM, returns once every connection has ended.
#[tokio::test]
async fn a_broker_that_stops_says_it_is_shutting_down() {
    let fleet = Fleet::start().await.unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let boot = fleet.broker.bootstrap_tls_addr.unwrap();
    let probe = Probe5::tls(boot, "bye1", &root).await.unwrap();
    tokio::time::timeout(T, fleet.broker.shut_down(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_eq!(fleet.broker.metrics.get(|m| &m.live), 0, "connections left");
    assert_eq!(
        probe.wait_cut(T).await.unwrap(),
        Some(DisconnectReasonCode::ServerShuttingDown)
    );
    assert_eq!(fleet.broker.metrics.get(|m| &m.revoked_cuts), 0);
}

/// What an [`a_client_that_acknowledges_nothing_is_closed`] client heard
/// next: a reply (when), or the end of its connection (the reason).
async fn next_heard(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Result<Instant, Option<DisconnectReasonCode>>>,
) -> Result<Instant, Option<DisconnectReasonCode>> {
    tokio::time::timeout(T, rx.recv()).await.unwrap().unwrap()
}

/// A client that owes acknowledgements and gives none is closed once it
/// has owed one for 1.5 × its keep-alive (at most 30 s), though it keeps
/// pinging: otherwise the router would keep what it sends it, up to 4 MiB
/// a filter, for the connection's life. One that acknowledges stays.
#[tokio::test]
async fn a_client_that_acknowledges_nothing_is_closed() {
    use rumqttc::v5::mqttbytes::v5::Packet as P;
    use rumqttc::v5::{ConnectionError, Event, StateError};
    let fleet = Fleet::start().await.unwrap();
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    // A bootstrap client that asks for replies (its polls are malformed)
    // and acknowledges them or not; what it receives (Ok: when a reply
    // came; Err: why its connection ended).
    let start = |device: &'static str, acknowledges: bool| {
        let mut o = MqttOptions::new(device, addr.ip().to_string(), addr.port());
        o.set_keep_alive(Duration::from_secs(5));
        o.set_manual_acks(true);
        let (client, mut events) = rumqttc::v5::AsyncClient::new(o, 10);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let acker = client.clone();
        tokio::spawn(async move {
            loop {
                let ended = match events.poll().await {
                    Ok(Event::Incoming(P::Publish(p))) => {
                        if acknowledges {
                            acker.ack(&p).await.unwrap();
                        }
                        let _ = tx.send(Ok(Instant::now()));
                        continue;
                    }
                    Ok(Event::Incoming(P::Disconnect(bye))) => Some(bye.reason_code),
                    Ok(_) => continue,
                    Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                        reason_code,
                        ..
                    })) => Some(reason_code),
                    Err(_) => None,
                };
                let _ = tx.send(Err(ended));
                return;
            }
        });
        (client, rx)
    };
    let ask = |client: &rumqttc::v5::AsyncClient, device: &str| {
        let (client, device) = (client.clone(), device.to_string());
        async move {
            let reply = format!("fleet/v1/poll/{device}/reply");
            client.subscribe(&reply, QoS::AtLeastOnce).await.unwrap();
            let request = format!("fleet/v1/poll/{device}");
            client
                .publish(request, QoS::AtLeastOnce, false, b"junk".to_vec())
                .await
                .unwrap();
        }
    };
    let (silent, mut from_silent) = start("dev-silent", false);
    let (acking, mut from_acking) = start("dev-acking", true);
    ask(&silent, "dev-silent").await;
    ask(&acking, "dev-acking").await;
    let replied = next_heard(&mut from_silent).await.expect("its reply");
    assert!(next_heard(&mut from_acking).await.is_ok(), "its reply");

    let ended = next_heard(&mut from_silent).await;
    assert_eq!(ended, Err(Some(DisconnectReasonCode::QuotaExceeded)));
    // 1.5 × 5 s after the broker wrote its reply (a little before the
    // client saw it), though it pinged meanwhile.
    let owed = replied.elapsed();
    assert!(
        owed >= Duration::from_millis(6500),
        "closed {owed:?} after its reply"
    );

    // The acknowledging client, connected as long, is still served.
    ask(&acking, "dev-acking").await;
    assert!(next_heard(&mut from_acking).await.is_ok(), "a second reply");
}

/// Deliveries carry the Subscription Identifier of the latest SUBSCRIBE
/// of their filter, none if it gave none (MQTT 5 §3.8.2.1.2), and a
/// resumed session's carry the identifiers it subscribed with.
#[tokio::test]
async fn subscription_identifiers_follow_the_latest_subscribe_and_the_session() {
    use rumqttc::v5::mqttbytes::v5::SubscribeProperties;
    let fleet = Fleet::start().await.unwrap();
    let sender = sender5(&fleet).await;
    let auth = certified(&fleet, "sid1", "svcA");
    let mut o = service_options(&fleet, "sid1", &auth);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    let topic = "/tenants/svcA/fleet/v1/poll/sid1/reply";
    let with_id = |id| SubscribeProperties {
        id: Some(id),
        user_properties: Vec::new(),
    };
    let subscribe = |probe: &Probe5, id: Option<usize>| {
        let client = probe.client.clone();
        let acks = probe.subacks.clone();
        async move {
            let before = acks.lock().unwrap().len();
            match id {
                Some(id) => client
                    .subscribe_with_properties(topic, QoS::AtLeastOnce, with_id(id))
                    .await
                    .unwrap(),
                None => client.subscribe(topic, QoS::AtLeastOnce).await.unwrap(),
            }
            eventually(T, "SUBACK", || {
                let n = acks.lock().unwrap().len();
                async move { (n > before).then_some(()) }
            })
            .await
            .unwrap();
        }
    };
    // The identifiers of the `n`th delivery on the topic, once it came.
    let ids_of = |probe: &Probe5, n: usize| {
        let publishes = probe.publishes.clone();
        async move {
            eventually(T, "the delivery", || {
                let ids = publishes
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|p| p.topic == topic.as_bytes())
                    .nth(n)
                    .map(|p| {
                        p.properties
                            .as_ref()
                            .map(|props| props.subscription_identifiers.clone())
                            .unwrap_or_default()
                    });
                async move { ids }
            })
            .await
            .unwrap()
        }
    };
    let live = fleet.broker.metrics.get(|m| &m.live);
    let probe = Probe5::connect(o.clone()).await.unwrap();
    subscribe(&probe, Some(6)).await;
    sender
        .publish_acked(topic, None, b"m0".to_vec())
        .await
        .unwrap();
    assert_eq!(ids_of(&probe, 0).await, [6]);
    subscribe(&probe, None).await;
    sender
        .publish_acked(topic, None, b"m1".to_vec())
        .await
        .unwrap();
    assert_eq!(ids_of(&probe, 1).await, Vec::<usize>::new(), "none given");
    subscribe(&probe, Some(42)).await;
    drop(probe);
    // Sent while it is away, delivered when its session comes back.
    eventually(T, "the connection to be gone", || {
        let now = fleet.broker.metrics.get(|m| &m.live);
        async move { (now == live).then_some(()) }
    })
    .await
    .unwrap();
    sender
        .publish_acked(topic, None, b"m2".to_vec())
        .await
        .unwrap();
    let back = resumed(&o).await;
    assert_eq!(ids_of(&back, 0).await, [42], "in the resumed session");
}

/// A client that reads slowly, but reads, and acknowledges what it is
/// sent once it has it, is not closed for owing an answer: a PUBLISH still
/// being written to it is not owed yet. (200 KiB at about 20 KiB/s: its
/// PUBACK goes some 9 s after the broker took the message, past the 7.5 s
/// a client with a keep-alive of 5 s may owe one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_that_acknowledges_is_not_closed() {
    use std::io::Write;
    /// Reads at most one 4 KiB receive buffer's worth every 200 ms, and
    /// pings every 2 s.
    struct Throttled {
        inner: std::net::TcpStream,
        pinger: std::net::TcpStream,
        pinged: Instant,
    }
    impl std::io::Read for Throttled {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::thread::sleep(Duration::from_millis(200));
            if self.pinged.elapsed() >= Duration::from_secs(2) {
                self.pinger.write_all(&PINGREQ)?;
                self.pinged = Instant::now();
            }
            self.inner.read(buf)
        }
    }
    let fleet = Fleet::start().await.unwrap();
    let sender = sender5(&fleet).await;
    let device = "slow-acker";
    let topic = format!("fleet/v1/poll/{device}/reply");
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    let tcp = tokio::task::block_in_place(|| {
        // A 4 KiB receive buffer: the kernel takes little for it.
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket.connect(&addr.into()).unwrap();
        let mut tcp: std::net::TcpStream = socket.into();
        tcp.set_read_timeout(Some(T)).unwrap();
        tcp.write_all(&raw_connect(device, 5, &[])).unwrap();
        assert_eq!(read_packet(&mut tcp).unwrap().0, 0x20, "CONNACK");
        let mut body = vec![0, 1, 0];
        body.extend((topic.len() as u16).to_be_bytes());
        body.extend(topic.as_bytes());
        body.push(1);
        tcp.write_all(&frame(0x82, &body)).unwrap();
        let (first, body) = read_packet(&mut tcp).unwrap();
        assert_eq!((first, body.last()), (0x90, Some(&1)), "SUBACK, QoS 1");
        tcp
    });
    sender
        .publish_acked(&topic, None, vec![b'x'; 200 * 1024])
        .await
        .unwrap();
    let after = tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let pinger = tcp.try_clone().unwrap();
        let mut slow = Throttled {
            inner: tcp,
            pinger,
            pinged: Instant::now(),
        };
        let (first, body) = read_packet(&mut slow).unwrap();
        assert_eq!(first & 0xF6, 0x32, "a QoS 1 PUBLISH");
        let at = 2 + usize::from(u16::from_be_bytes([body[0], body[1]]));
        let took = started.elapsed();
        // PUBACK, then a PINGREQ; then whatever comes, until nothing
        // more does (alive) or the connection ends.
        let mut tcp = slow.inner;
        tcp.write_all(&frame(0x40, &body[at..at + 2])).unwrap();
        tcp.write_all(&PINGREQ).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut seen = Vec::new();
        let end = loop {
            match read_packet(&mut tcp) {
                Ok((first, _)) => seen.push(first),
                Err(err) => break err.kind(),
            }
        };
        (took, seen, end)
    })
    .await
    .unwrap();
    let (took, seen, end) = after;
    assert!(
        took > Duration::from_millis(7500),
        "read in {took:?}: too fast to owe an answer past the limit"
    );
    assert!(
        !seen.is_empty() && seen.iter().all(|first| *first == 0xD0),
        "after its PUBACK: {seen:x?}"
    );
    assert!(
        matches!(
            end,
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "the connection ended: {end:?}"
    );
}

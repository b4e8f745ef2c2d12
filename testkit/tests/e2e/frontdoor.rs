//! Hostile clients on every listener of the front door, through real TLS.

use std::time::{Duration, Instant};

use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_protocol::crypto;
use fleet_testkit::{eventually, Devices, Fleet, Probe};
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::x509::{X509NameBuilder, X509};
use rumqttc::SubscribeReasonCode;

pub(crate) const T: Duration = Duration::from_secs(30);

/// A fleet with dev1 on svcA and dev2 on svcB running, and an observer
/// with the manager's rights that sees everything delivered.
pub(crate) async fn running_fleet() -> (Fleet, Devices, Probe) {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let observer = fleet.privileged("observer").await.unwrap();
    observer.subscribe("#").await.unwrap();
    for (d, s) in [("dev1", "svcA"), ("dev2", "svcB")] {
        devices.provision(&fleet, d, s).await.unwrap();
        devices.spawn(devices.config(&fleet, d, KeyMode::Csr));
    }
    for d in ["dev1", "dev2"] {
        devices
            .wait_event(d, T, "connected", |e| {
                matches!(e, DeviceEvent::Connected { .. })
            })
            .await
            .unwrap();
        // ... and its `online` report recorded, so the store is settled.
        eventually(T, "online recorded", || {
            let seen = fleet
                .core()
                .store
                .device(d)
                .unwrap()
                .is_some_and(|r| r.last_seen_ms.is_some());
            async move { seen.then_some(()) }
        })
        .await
        .unwrap();
    }
    (fleet, devices, observer)
}

/// A certificate the fleet's own CA issued to a device that turns hostile.
pub(crate) fn certified(fleet: &Fleet, device: &str, service: &str) -> (Vec<u8>, Vec<u8>) {
    let key = crypto::generate_p256().unwrap();
    let public = PKey::public_key_from_der(&key.public_key_to_der().unwrap()).unwrap();
    let issued = fleet
        .core()
        .pki
        .issue_device_certificate(device, service, &public, 1)
        .unwrap();
    (
        fleet_pki::chain_to_pem(&issued.chain).unwrap(),
        key.private_key_to_pem_pkcs8().unwrap(),
    )
}

/// A leaf signed by `issuer`, with the given subject and validity.
fn forged_leaf(
    cn: &str,
    o: &str,
    issuer: (&X509, &PKey<Private>),
    days: (i64, i64),
) -> (Vec<u8>, Vec<u8>) {
    let key = crypto::generate_p256().unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    name.append_entry_by_text("O", o).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(120, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.0.subject_name()).unwrap();
    b.set_pubkey(&key).unwrap();
    let now = fleet_protocol::now_ms() as i64 / 1000;
    b.set_not_before(&Asn1Time::from_unix(now + days.0 * 86_400).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::from_unix(now + days.1 * 86_400).unwrap())
        .unwrap();
    b.sign(issuer.1, MessageDigest::sha256()).unwrap();
    let leaf = b.build();
    let mut chain = leaf.to_pem().unwrap();
    chain.extend(issuer.0.to_pem().unwrap());
    (chain, key.private_key_to_pem_pkcs8().unwrap())
}

async fn codes(probe: &Probe, filter: &str) -> Vec<SubscribeReasonCode> {
    probe.subscribe(filter).await.unwrap();
    probe.subacks.lock().unwrap().last().cloned().unwrap()
}

/// Waits until telemetry of both devices has flowed again after `mark`.
pub(crate) async fn traffic_after(observer: &Probe, mark: usize) {
    eventually(T, "fresh telemetry from both devices", || {
        let fresh: Vec<String> = observer.messages()[mark..]
            .iter()
            .map(|m| m.topic.clone())
            .collect();
        let both = [
            "/tenants/svcA/telemetry/dev1",
            "/tenants/svcB/telemetry/dev2",
        ]
        .iter()
        .all(|t| fresh.iter().any(|f| f == t));
        async move { both.then_some(()) }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn wildcards_and_foreign_topics_are_refused_on_every_listener() {
    let (fleet, _devices, observer) = running_fleet().await;
    let root = fleet.certs_dir().join("root-ca.pem");
    let boot = Probe::tls(fleet.broker.bootstrap_tls_addr.unwrap(), "evil1", &root)
        .await
        .unwrap();
    let (chain, key) = certified(&fleet, "evil2", "svcB");
    let svc = Probe::mtls(fleet.service_addr(), "evil2", &root, chain, key)
        .await
        .unwrap();
    let hostile = [
        "#",
        "+/#",
        "+",
        "fleet/#",
        "fleet/v1/+/dev1/reply",
        "fleet/v1/activate/dev1/reply",
        "fleet/v1/service/change/dev1",
        "/tenants/svcA/#",
        "/tenants/svcB/#",
        "/tenants/+/telemetry/+",
        "/tenants/svcB/telemetry/dev2",
        "/tenants/svcA/fleet/v1/service/change/dev1",
        "$share/g/#",
        "$share/g//tenants/svcB/telemetry/dev2",
        "$SYS/#",
    ];
    for probe in [&boot, &svc] {
        for filter in hostile {
            assert_eq!(
                codes(probe, filter).await,
                [SubscribeReasonCode::Failure],
                "{filter} granted"
            );
        }
    }
    // Their own topics are granted.
    assert!(matches!(
        codes(&boot, "fleet/v1/update/evil1/reply").await[..],
        [SubscribeReasonCode::Success(_)]
    ));
    assert!(matches!(
        codes(&svc, "/tenants/svcB/fleet/v1/service/change/evil2").await[..],
        [SubscribeReasonCode::Success(_)]
    ));
    let mark = observer.messages().len();
    traffic_after(&observer, mark).await;
    assert!(
        boot.messages().is_empty(),
        "bootstrap intruder received {:?}",
        boot.messages()
    );
    assert!(
        svc.messages().is_empty(),
        "service intruder received {:?}",
        svc.messages()
    );
    assert!(
        !boot.is_cut() && !svc.is_cut(),
        "refused subscriptions do not close the connection"
    );
    assert!(fleet.broker.metrics.get(|m| &m.refused_subscribes) >= 2 * hostile.len() as u64);
}

#[tokio::test]
async fn publishing_outside_the_grants_is_cut_and_delivers_nothing() {
    let (fleet, devices, observer) = running_fleet().await;
    let root = fleet.certs_dir().join("root-ca.pem");
    let before = fleet.snapshot();
    let cases: Vec<(&str, &str)> = vec![
        ("bootstrap", "fleet/v1/update/dev1"),
        ("bootstrap", "fleet/v1/service/change/dev1"),
        ("bootstrap", "fleet/v1/activate/dev1/reply"),
        ("bootstrap", "/tenants/svcA/telemetry/dev1"),
        ("service", "/tenants/svcB/fleet/v1/update/dev2"),
        ("service", "/tenants/svcB/telemetry/dev2"),
        ("service", "/tenants/svcA/telemetry/dev1"),
        ("service", "/tenants/svcB/fleet/v1/service/change/dev2"),
        ("service", "fleet/v1/update/dev2"),
    ];
    for (listener, topic) in &cases {
        let probe = match *listener {
            "bootstrap" => Probe::tls(fleet.broker.bootstrap_tls_addr.unwrap(), "evil1", &root)
                .await
                .unwrap(),
            _ => {
                let (chain, key) = certified(&fleet, "evil2", "svcB");
                Probe::mtls(fleet.service_addr(), "evil2", &root, chain, key)
                    .await
                    .unwrap()
            }
        };
        probe.publish(topic, b"injected".to_vec()).await.unwrap();
        eventually(T, &format!("{listener} publisher to {topic} cut"), || {
            let cut = probe.is_cut();
            async move { cut.then_some(()) }
        })
        .await
        .unwrap();
    }
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
    assert!(fleet.broker.metrics.get(|m| &m.refused_publishes) >= cases.len() as u64);
}

#[tokio::test]
async fn no_client_id_spelling_takes_over_a_device() {
    let (fleet, devices, observer) = running_fleet().await;
    let root = fleet.certs_dir().join("root-ca.pem");
    let (chain, key) = certified(&fleet, "evil2", "svcA");
    for id in [
        "dev1",
        "DEV1",
        "svcA.dev1",
        "d.svcA.dev1",
        "dev1 ",
        "/tenants/svcA/dev1",
        "",
    ] {
        let r = Probe::mtls(fleet.service_addr(), id, &root, chain.clone(), key.clone()).await;
        assert!(
            r.is_err(),
            "service listener accepted client id {id:?} for certificate evil2"
        );
    }
    let tls = fleet.broker.bootstrap_tls_addr.unwrap();
    for id in [
        "svcA.dev1",
        "d.svcA.dev1",
        "b.dev1.1",
        "m.fleet-manager.fleet-manager",
        "dev1/x",
        "dev1+",
    ] {
        assert!(
            Probe::tls(tls, id, &root).await.is_err(),
            "bootstrap accepted client id {id:?}"
        );
    }
    // The bare device id on the bootstrap listener gets a session of its own.
    let same = Probe::tls(tls, "dev1", &root).await.unwrap();
    let wrong_secret = Probe::with_credentials(
        fleet.broker.internal_addr,
        "fleet-manager",
        "fleet-manager",
        "guess",
    )
    .await;
    assert!(
        wrong_secret.is_err(),
        "internal listener accepted a wrong secret"
    );

    let mark = observer.messages().len();
    traffic_after(&observer, mark).await;
    let connects = devices
        .events_of("dev1")
        .iter()
        .filter(|e| matches!(e, DeviceEvent::Connected { .. }))
        .count();
    assert_eq!(connects, 1, "dev1 was disconnected and had to reconnect");
    assert!(!same.is_cut());
}

#[tokio::test]
async fn bad_certificates_fail_the_handshake() {
    let fleet = Fleet::start().await.unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let pki = &fleet.core().pki;
    let (ca_a, ca_a_key) = pki.service_ca("svcA").unwrap();
    pki.service_ca("svcB").unwrap();
    let stranger_key = crypto::generate_p256().unwrap();
    let stranger = {
        let (pem, _) = forged_leaf("Stranger CA", "svcA", (&ca_a, &stranger_key), (-1, 30));
        X509::from_pem(&pem).unwrap()
    };
    let cases = [
        (
            "expired",
            forged_leaf("dev1", "svcA", (&ca_a, &ca_a_key), (-30, -1)),
        ),
        (
            "not yet valid",
            forged_leaf("dev1", "svcA", (&ca_a, &ca_a_key), (5, 30)),
        ),
        (
            "service A's CA, service B's identity",
            forged_leaf("dev1", "svcB", (&ca_a, &ca_a_key), (-1, 30)),
        ),
        (
            "unknown CA",
            forged_leaf("dev1", "svcA", (&stranger, &stranger_key), (-1, 30)),
        ),
    ];
    for (what, (chain, key)) in cases {
        let r = Probe::mtls(fleet.service_addr(), "dev1", &root, chain, key).await;
        assert!(r.is_err(), "{what} certificate accepted");
    }
    // No certificate at all on the service listener.
    assert!(Probe::tls(fleet.service_addr(), "dev1", &root)
        .await
        .is_err());
    // A certificate the fleet issued works, for contrast.
    let (chain, key) = certified(&fleet, "dev1", "svcA");
    Probe::mtls(fleet.service_addr(), "dev1", &root, chain, key)
        .await
        .unwrap();
    assert!(fleet.broker.metrics.get(|m| &m.handshake_failures) >= 5);
}

#[tokio::test]
async fn revocation_cuts_the_live_session_and_refuses_the_next_handshake() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "rev1", "svcA").await.unwrap();
    let task = devices.spawn(devices.config(&fleet, "rev1", KeyMode::Csr));
    devices
        .wait_event("rev1", T, "connected", |e| {
            matches!(e, DeviceEvent::Connected { .. })
        })
        .await
        .unwrap();
    devices.shutdown.cancel();
    tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let creds = devices
        .store("rev1")
        .unwrap()
        .service_credentials("svcA")
        .unwrap()
        .unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let live = Probe::mtls(
        fleet.service_addr(),
        "rev1",
        &root,
        creds.chain_pem.clone(),
        creds.key_pem.clone(),
    )
    .await
    .unwrap();

    let revoked_at = Instant::now();
    fleet_manager::admin::call(&fleet.admin(), "POST", "/v1/devices/rev1/reset", None)
        .await
        .unwrap();
    eventually(T, "the revoked session to be cut", || {
        let cut = live.is_cut();
        async move { cut.then_some(()) }
    })
    .await
    .unwrap();
    let took = revoked_at.elapsed();
    println!("live session of a revoked certificate closed {took:?} after the reset");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let again = Probe::mtls(
        fleet.service_addr(),
        "rev1",
        &root,
        creds.chain_pem,
        creds.key_pem,
    )
    .await;
    assert!(
        again.is_err(),
        "revoked certificate accepted at the next handshake"
    );
    assert!(fleet.broker.metrics.get(|m| &m.revoked_cuts) >= 1);
}

#[tokio::test]
async fn half_open_connections_do_not_keep_devices_out() {
    let fleet = Fleet::start().await.unwrap();
    let mut idle = Vec::new();
    for _ in 0..150 {
        for addr in [
            fleet.broker.bootstrap_tls_addr.unwrap(),
            fleet.service_addr(),
        ] {
            idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
    }
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "dev9", "svcA").await.unwrap();
    let started = Instant::now();
    devices.spawn(devices.config(&fleet, "dev9", KeyMode::Csr));
    devices
        .wait_event(
            "dev9",
            Duration::from_secs(10),
            "connected despite 300 idle connections",
            |e| matches!(e, DeviceEvent::Connected { .. }),
        )
        .await
        .unwrap();
    println!(
        "device online in {:?} beside {} half-open connections",
        started.elapsed(),
        idle.len()
    );
    assert!(fleet.broker.metrics.get(|m| &m.live) >= idle.len() as u64);
}

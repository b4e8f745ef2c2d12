//! Hostile clients on every listener of the front door, through real TLS.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_pki::grants;
use fleet_protocol::crypto;
use fleet_testkit::{connack, eventually, Devices, Fleet, Probe, Probe5, Resuming};
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
        devices.wait_connected(d, T).await.unwrap();
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

/// A certificate the fleet's own CA issued to a device that turns hostile,
/// with the registry's grant of that service, as the manager writes it for
/// an active device.
pub(crate) fn certified(fleet: &Fleet, device: &str, service: &str) -> (Vec<u8>, Vec<u8>) {
    grants::add_grant(fleet.certs_dir(), device, service).unwrap();
    minted(fleet, device, service)
}

/// A certificate a service CA signed, with no grant from the registry
/// (as if the CA's key had signed outside the manager).
fn minted(fleet: &Fleet, device: &str, service: &str) -> (Vec<u8>, Vec<u8>) {
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

/// A leaf signed by `issuer`, with the given subject and validity in days
/// from now.
pub(crate) fn forged_leaf(
    cn: &str,
    o: &str,
    issuer: (&X509, &PKey<Private>),
    days: (i64, i64),
) -> (Vec<u8>, Vec<u8>) {
    forged_leaf_secs(cn, o, issuer, (days.0 * 86_400, days.1 * 86_400))
}

/// The same, with validity in seconds from now.
pub(crate) fn forged_leaf_secs(
    cn: &str,
    o: &str,
    issuer: (&X509, &PKey<Private>),
    secs: (i64, i64),
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
    b.set_not_before(&Asn1Time::from_unix(now + secs.0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::from_unix(now + secs.1).unwrap())
        .unwrap();
    b.sign(issuer.1, MessageDigest::sha256()).unwrap();
    let leaf = b.build();
    let mut chain = leaf.to_pem().unwrap();
    chain.extend(issuer.0.to_pem().unwrap());
    (chain, key.private_key_to_pem_pkcs8().unwrap())
}

/// A CA certificate (CA:TRUE) for service `o`, signed by `issuer`: what a
/// service CA's key could mint, but no fleet chain contains.
fn forged_sub_ca(o: &str, issuer: (&X509, &PKey<Private>)) -> (X509, PKey<Private>) {
    let key = crypto::generate_p256().unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "sub CA").unwrap();
    name.append_entry_by_text("O", o).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    b.set_serial_number(&BigNum::from_u32(77).unwrap().to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.0.subject_name()).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    b.append_extension(
        openssl::x509::extension::BasicConstraints::new()
            .critical()
            .ca()
            .build()
            .unwrap(),
    )
    .unwrap();
    b.sign(issuer.1, MessageDigest::sha256()).unwrap();
    (b.build(), key)
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
    let boot = Probe::tls(fleet.broker.bootstrap_tls_addr.unwrap(), "wild1", &root)
        .await
        .unwrap();
    // The plain bootstrap listener (development only) is the same policy.
    let plain = Probe::plain(fleet.broker.bootstrap_plain_addr.unwrap(), "wild3")
        .await
        .unwrap();
    let (chain, key) = certified(&fleet, "wild2", "svcB");
    let svc = Probe::mtls(fleet.service_addr(), "wild2", &root, chain, key)
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
    for probe in [&boot, &plain, &svc] {
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
        codes(&boot, "fleet/v1/update/wild1/reply").await[..],
        [SubscribeReasonCode::Success(_)]
    ));
    assert!(matches!(
        codes(&plain, "fleet/v1/update/wild3/reply").await[..],
        [SubscribeReasonCode::Success(_)]
    ));
    assert!(matches!(
        codes(&svc, "/tenants/svcB/fleet/v1/service/change/wild2").await[..],
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
        plain.messages().is_empty(),
        "plain bootstrap intruder received {:?}",
        plain.messages()
    );
    assert!(
        !boot.is_cut() && !svc.is_cut() && !plain.is_cut(),
        "refused subscriptions do not close the connection"
    );
    assert!(fleet.broker.metrics.get(|m| &m.refused_subscribes) >= 3 * hostile.len() as u64);
    // Refusals are logged with the identity that asked (the first ten of
    // a connection at WARN, the rest counted at DEBUG).
    for label in ["bootstrap:wild1", "bootstrap:wild3", "device:svcB/wild2"] {
        let lines = fleet_testkit::logged("subscription refused");
        assert!(
            lines
                .iter()
                .any(|l| l.contains(label) && l.contains("filter=\"/tenants/svcA/#\"")),
            "no refusal logged for {label}: {lines:?}"
        );
    }
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
            "bootstrap" => Probe::tls(fleet.broker.bootstrap_tls_addr.unwrap(), "inject1", &root)
                .await
                .unwrap(),
            _ => {
                let (chain, key) = certified(&fleet, "inject2", "svcB");
                Probe::mtls(fleet.service_addr(), "inject2", &root, chain, key)
                    .await
                    .unwrap()
            }
        };
        probe.publish(topic, b"injected".to_vec()).await.unwrap();
        probe
            .wait_cut(T, &format!("{listener} publisher to {topic} cut"))
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
    // Each refusal is logged with the identity and the topic.
    let lines = fleet_testkit::logged("publish refused");
    for (listener, topic) in &cases {
        let label = match *listener {
            "bootstrap" => "bootstrap:inject1",
            _ => "device:svcB/inject2",
        };
        assert!(
            lines
                .iter()
                .any(|l| l.contains(label) && l.contains(&format!("topic=\"{topic}\""))),
            "no refusal logged for {label} on {topic}: {lines:?}"
        );
    }
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

/// A certificate of dev1 in svcA issued by a CA the fleet does not know
/// (itself issued by svcA's CA's key, so only its chain is wrong): chain and
/// key, PEM.
fn from_a_stranger(fleet: &Fleet) -> (Vec<u8>, Vec<u8>) {
    let (ca_a, _) = fleet.core().pki.service_ca("svcA").unwrap();
    let stranger_key = crypto::generate_p256().unwrap();
    let stranger = {
        let (pem, _) = forged_leaf("Stranger CA", "svcA", (&ca_a, &stranger_key), (-1, 30));
        X509::from_pem(&pem).unwrap()
    };
    forged_leaf("dev1", "svcA", (&stranger, &stranger_key), (-1, 30))
}

/// A refused certificate is told why: the TLS alert reaches the client in
/// both versions. In TLS 1.3 it is sent encrypted, after the client's
/// Finished, as the ticket would have been (the front door holds that back
/// until the CONNACK, but not an alert). Here: `certificate_unknown` for a
/// chain through a certificate that is not a CA, and for one with more
/// certificates after the leaf than the service CA and the root (refused
/// before any is checked: each would be a signature the broker verifies
/// and the client never made); `unknown_ca` for a leaf that names its
/// service's CA as issuer but was not signed by it. A fleet chain with the
/// root after the service CA is taken.
#[tokio::test]
async fn a_refused_certificate_gets_the_alert_that_says_why() {
    let fleet = Fleet::start().await.unwrap();
    let root_pem = fleet.certs_dir().join("root-ca.pem");
    let root = std::fs::read(&root_pem).unwrap();
    let (ca_a, _) = fleet.core().pki.service_ca("svcA").unwrap();
    let forged = forged_leaf(
        "dev1",
        "svcA",
        (&ca_a, &crypto::generate_p256().unwrap()),
        (-1, 30),
    );
    let (chain, key) = certified(&fleet, "long1", "svcA");
    let with_root = [chain.clone(), root.clone()].concat();
    let too_long = [with_root.clone(), root.repeat(2)].concat();
    let addr = fleet.service_addr();
    let cases = [
        (
            from_a_stranger(&fleet),
            rustls::AlertDescription::CertificateUnknown,
        ),
        (
            (too_long, key.clone()),
            rustls::AlertDescription::CertificateUnknown,
        ),
        (forged, rustls::AlertDescription::UnknownCA),
    ];
    for ((chain, key), expected) in cases {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let config =
                fleet_device_sim::link::mutual_tls_over(&[version], &root, &chain, &key).unwrap();
            let alert = first_read(addr, config).await;
            assert_eq!(alert, Err(expected), "{version:?}");
        }
    }
    Probe::mtls(addr, "long1", &root_pem, with_root, key)
        .await
        .unwrap();
}

/// Connects with `config`, finishes the client's side of the handshake
/// and reads once: the bytes read, or the alert that came instead
/// (panics on anything else).
async fn first_read(
    addr: std::net::SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<usize, rustls::AlertDescription> {
    use std::io::Read;
    let result = tokio::task::spawn_blocking(move || -> std::io::Result<usize> {
        let mut tcp = std::net::TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(T))?;
        let name = "localhost".try_into().unwrap();
        let mut tls = rustls::ClientConnection::new(config, name).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp)?;
        }
        rustls::Stream::new(&mut tls, &mut tcp).read(&mut [0u8; 1])
    })
    .await
    .unwrap();
    match result {
        Ok(n) => Ok(n),
        Err(e) => match e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::AlertReceived(alert)) => Err(*alert),
            _ => panic!("{e:?}, not an alert"),
        },
    }
}

/// A certificate the broker cannot check for now (its device's grant
/// file unreadable) gets `handshake_failure`, which a device retries, not
/// `access_denied`, which would have it renew a certificate that is fine;
/// once the file can be read the device connects.
#[tokio::test]
async fn a_grant_file_that_cannot_be_read_is_not_a_refusal() {
    let fleet = Fleet::start().await.unwrap();
    let root_pem = fleet.certs_dir().join("root-ca.pem");
    let root = std::fs::read(&root_pem).unwrap();
    let (chain, key) = certified(&fleet, "gu1", "svcA");
    let grant = grants::grants_dir(fleet.certs_dir()).join("gu1");
    std::fs::remove_file(&grant).unwrap();
    std::fs::create_dir(&grant).unwrap();
    let config =
        fleet_device_sim::link::mutual_tls_over(&[&rustls::version::TLS13], &root, &chain, &key)
            .unwrap();
    let addr = fleet.service_addr();
    let alert = eventually(T, "svcA's CA to be trusted", || {
        let config = config.clone();
        async move {
            let alert = first_read(addr, config).await;
            (alert != Err(rustls::AlertDescription::UnknownCA)).then_some(alert)
        }
    })
    .await
    .unwrap();
    assert_eq!(alert, Err(rustls::AlertDescription::HandshakeFailure));
    std::fs::remove_dir(&grant).unwrap();
    grants::add_grant(fleet.certs_dir(), "gu1", "svcA").unwrap();
    Probe::mtls(addr, "gu1", &root_pem, chain, key)
        .await
        .unwrap();
}

/// A TLS 1.3 client has finished its side of the handshake before the
/// broker checks its certificate, and may go on writing (the JDK's sends its
/// next message before it reads). The broker ends its side after the alert
/// and reads what follows until the client closes, so those writes are not
/// answered with a reset, under which the client would fail with a broken
/// pipe and never read the alert.
#[tokio::test]
async fn a_refused_client_that_goes_on_writing_is_not_reset() {
    use std::io::{Read, Write};
    let fleet = Fleet::start().await.unwrap();
    let root = std::fs::read(fleet.certs_dir().join("root-ca.pem")).unwrap();
    let (chain, key) = from_a_stranger(&fleet);
    let config =
        fleet_device_sim::link::mutual_tls_over(&[&rustls::version::TLS13], &root, &chain, &key)
            .unwrap();
    let addr = fleet.service_addr();
    let (alert, writes) = tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(T)).unwrap();
        tcp.set_write_timeout(Some(T)).unwrap();
        let name = "localhost".try_into().unwrap();
        let mut tls = rustls::ClientConnection::new(config, name).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).unwrap();
        }
        let alert = rustls::Stream::new(&mut tls, &mut tcp).read(&mut [0u8; 1]);
        // The broker's end of the connection (its FIN, or a reset).
        let end = tcp.read(&mut [0u8; 64]);
        let writes: Vec<_> = (0..3)
            .map(|_| tcp.write_all(&[0x17, 0x03, 0x03, 0x00, 0x01, 0x00]))
            .collect();
        (
            alert.map_err(|e| format!("{e:?}")),
            (end.map_err(|e| e.kind()), writes),
        )
    })
    .await
    .unwrap();
    assert!(
        alert.as_ref().is_err_and(|e| e.contains("AlertReceived")),
        "{alert:?}, not an alert"
    );
    let (end, writes) = writes;
    assert_eq!(end, Ok(0), "the broker's end of the connection");
    assert!(
        writes.iter().all(Result::is_ok),
        "writes after the alert: {writes:?}"
    );
}

/// What a refused client chose is logged as text, quoted, escaped and cut:
/// a line break in its client id forges no line of the log, and a long id
/// is not copied whole into it.
#[tokio::test]
async fn a_refused_client_id_forges_no_log_line() {
    let fleet = Fleet::start().await.unwrap();
    let marker = format!("forged-{}", uuid::Uuid::new_v4().simple());
    let client_id = format!(
        "x\n{marker} WARN fleet_broker: device admitted\r\n{}",
        "A".repeat(2_000)
    );
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    let ack = fleet_testkit::plain_connack(addr, &client_id, T)
        .await
        .unwrap();
    assert_eq!(ack, [0x20, 0x02, 0x00, 0x02], "identifier rejected");

    let lines = eventually(T, "the refusal logged", || {
        let lines = fleet_testkit::logged(&marker);
        async move { (!lines.is_empty()).then_some(lines) }
    })
    .await
    .unwrap();
    assert_eq!(lines.len(), 1, "one line for the refusal: {lines:#?}");
    let line = &lines[0];
    assert!(line.contains("connection refused"), "{line}");
    assert!(
        line.contains(&format!("\\n{marker}")),
        "the line break shown escaped: {line}"
    );
    assert!(
        line.contains(&format!("({} bytes)", client_id.len())),
        "its length shown: {line}"
    );
    assert!(
        line.len() < 1_000,
        "{} bytes logged for it: {line}",
        line.len()
    );
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
    // A chain one CA longer than the fleet's, through a CA that svcA's CA
    // minted: valid signatures all the way, and the registry grants the
    // device, yet no fleet chain has that shape.
    // First svcA's CA must be loaded: a leaf sent without its CA connects.
    let (chain, key) = certified(&fleet, "dev8", "svcA");
    let leaf_only = X509::stack_from_pem(&chain).unwrap()[0].to_pem().unwrap();
    eventually(T, "svcA's CA to be trusted", || {
        let (leaf, key, root) = (leaf_only.clone(), key.clone(), root.clone());
        let addr = fleet.service_addr();
        async move { Probe::mtls(addr, "dev8", &root, leaf, key).await.ok() }
    })
    .await
    .unwrap();
    grants::add_grant(fleet.certs_dir(), "dev9", "svcA").unwrap();
    // For contrast, the same helper's leaf straight from svcA's CA works.
    let (chain, key) = forged_leaf("dev9", "svcA", (&ca_a, &ca_a_key), (-1, 30));
    Probe::mtls(fleet.service_addr(), "dev9", &root, chain, key)
        .await
        .unwrap();
    let failures = fleet.broker.metrics.get(|m| &m.handshake_failures);
    let (sub, sub_key) = forged_sub_ca("svcA", (&ca_a, &ca_a_key));
    let (mut chain, key) = forged_leaf("dev9", "svcA", (&sub, &sub_key), (-1, 30));
    chain.extend(ca_a.to_pem().unwrap());
    let r = Probe::mtls(fleet.service_addr(), "dev9", &root, chain, key).await;
    assert!(r.is_err(), "a chain through a sub-CA accepted");
    assert_eq!(fleet.broker.metrics.get(|m| &m.not_granted), 0);
    // The client may see the alert before the broker has counted it.
    eventually(T, "the refusal counted as a handshake failure", || {
        let n = fleet.broker.metrics.get(|m| &m.handshake_failures);
        async move { (n == failures + 1).then_some(()) }
    })
    .await
    .unwrap();
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

/// MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s) over blocking
/// OpenSSL TLS limited to `version`; returns the CONNACK's return code.
fn connack_over(
    fleet: &Fleet,
    version: openssl::ssl::SslVersion,
    client_id: &str,
    (chain, key): (Vec<u8>, Vec<u8>),
) -> anyhow::Result<u8> {
    use openssl::ssl::{SslConnector, SslMethod};
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    b.set_min_proto_version(Some(version))?;
    b.set_max_proto_version(Some(version))?;
    b.set_ca_file(fleet.certs_dir().join("root-ca.pem"))?;
    let mut certs = X509::stack_from_pem(&chain)?.into_iter();
    b.set_certificate(&certs.next().expect("leaf"))?;
    for ca in certs {
        b.add_extra_chain_cert(ca)?;
    }
    let key: PKey<Private> = PKey::private_key_from_pem(&key)?;
    b.set_private_key(&key)?;
    let tcp = std::net::TcpStream::connect(fleet.service_addr())?;
    tcp.set_read_timeout(Some(T))?;
    let mut tls = b.build().connect("localhost", tcp)?;
    Ok(connack(&mut tls, client_id)?[3])
}

#[tokio::test]
async fn tls_1_2_and_1_3_clients_are_served_and_checked_alike() {
    use openssl::ssl::SslVersion;
    let fleet = Fleet::start().await.unwrap();
    let granted = certified(&fleet, "tls1", "svcA");
    let stranger = minted(&fleet, "tls2", "svcA");
    let f = std::sync::Arc::new(fleet);
    for version in [SslVersion::TLS1_2, SslVersion::TLS1_3] {
        let (fleet, granted, stranger) = (f.clone(), granted.clone(), stranger.clone());
        tokio::task::spawn_blocking(move || {
            assert_eq!(
                connack_over(&fleet, version, "tls1", granted).unwrap(),
                0,
                "{version:?}"
            );
            // Not granted by the registry: refused at the handshake, or at
            // the first read for TLS 1.3, whose client finishes first.
            assert!(
                connack_over(&fleet, version, "tls2", stranger).is_err(),
                "{version:?}: an ungranted certificate was served"
            );
        })
        .await
        .unwrap();
    }
    assert!(f.broker.metrics.get(|m| &m.not_granted) >= 2);
}

#[tokio::test]
async fn a_retired_service_ca_admits_no_one() {
    let fleet = Fleet::start().await.unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let addr = fleet.service_addr();
    // Issued by svcA's first CA, which the client sends along.
    let (old_chain, old_key) = certified(&fleet, "ret1", "svcA");
    eventually(T, "the first CA's leaf to be accepted", || {
        let (chain, key, root) = (old_chain.clone(), old_key.clone(), root.clone());
        async move { Probe::mtls(addr, "ret1", &root, chain, key).await.ok() }
    })
    .await
    .unwrap();
    // A device holding a session ticket from the first CA's days.
    let resuming = resuming(
        &fleet,
        "ret1",
        (old_chain.clone(), old_key.clone()),
        &rustls::version::TLS13,
    );
    resuming.connect().await.unwrap();
    assert!(resuming.connect().await.unwrap(), "not resumed");
    // The operator retires that CA: its files go, and svcA gets a new one,
    // signed by the same root.
    let services = fleet.certs_dir().join("services");
    std::fs::remove_file(services.join("svcA-ca.pem")).unwrap();
    std::fs::remove_file(services.join("svcA-ca.key")).unwrap();
    let pki = fleet_pki::Pki::open_or_create(fleet.certs_dir()).unwrap();
    let key = crypto::generate_p256().unwrap();
    let public = PKey::public_key_from_der(&key.public_key_to_der().unwrap()).unwrap();
    let issued = pki
        .issue_device_certificate("ret2", "svcA", &public, 1)
        .unwrap();
    grants::add_grant(fleet.certs_dir(), "ret2", "svcA").unwrap();
    let new_chain = fleet_pki::chain_to_pem(&issued.chain).unwrap();
    let new_key = key.private_key_to_pem_pkcs8().unwrap();
    // The old CA's leaves are refused even with the old CA presented, and
    // the new CA's are accepted.
    eventually(T, "the retired CA's leaf to be refused", || {
        let (chain, key, root) = (old_chain.clone(), old_key.clone(), root.clone());
        async move {
            Probe::mtls(addr, "ret1", &root, chain, key)
                .await
                .is_err()
                .then_some(())
        }
    })
    .await
    .unwrap();
    // Nor does a session ticket from before bring one back.
    let before = fleet.broker.metrics.get(|m| &m.resumed);
    assert!(
        resuming.connect().await.is_err(),
        "a retired CA's leaf resumed its session"
    );
    assert_eq!(fleet.broker.metrics.get(|m| &m.resumed), before);
    Probe::mtls(addr, "ret2", &root, new_chain, new_key)
        .await
        .unwrap();
}

#[tokio::test]
async fn certificates_the_registry_does_not_grant_fail_the_handshake() {
    let fleet = Fleet::start().await.unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let certs = fleet.certs_dir();
    fleet.core().pki.service_ca("svcB").unwrap();
    // Valid chains from the right service CAs, not revoked, but:
    // a CN that is not registered at all,
    let (ghost_chain, ghost_key) = minted(&fleet, "ghost1", "svcA");
    // and a registered device with a certificate of a service the registry
    // never granted it (dev1 is on svcA only).
    let (_, _) = certified(&fleet, "dev1", "svcA");
    let (other_chain, other_key) = minted(&fleet, "dev1", "svcB");
    for (what, id, chain, key) in [
        ("unregistered CN", "ghost1", &ghost_chain, &ghost_key),
        ("service not granted", "dev1", &other_chain, &other_key),
    ] {
        let r = Probe::mtls(fleet.service_addr(), id, &root, chain.clone(), key.clone()).await;
        assert!(r.is_err(), "{what}: certificate accepted");
    }
    assert_eq!(fleet.broker.metrics.get(|m| &m.not_granted), 2);
    let scraped = fleet_testkit::http_get(fleet.broker.metrics_addr.unwrap(), "/metrics")
        .await
        .unwrap();
    assert!(
        scraped
            .lines()
            .any(|l| l == "fleetshift_broker_certificates_not_granted_total 2"),
        "{scraped}"
    );
    // The same certificates once the registry grants them: the grant was
    // the only thing missing.
    grants::write_grants(certs, "ghost1", &["svcA".to_owned()]).unwrap();
    Probe::mtls(
        fleet.service_addr(),
        "ghost1",
        &root,
        ghost_chain,
        ghost_key,
    )
    .await
    .unwrap();
    grants::write_grants(certs, "dev1", &["svcA".to_owned(), "svcB".to_owned()]).unwrap();
    Probe::mtls(fleet.service_addr(), "dev1", &root, other_chain, other_key)
        .await
        .unwrap();
}

#[tokio::test]
async fn the_registry_grants_follow_a_device_through_migration_and_reset() {
    let fleet = Fleet::start().await.unwrap();
    let certs = fleet.certs_dir();
    let root = certs.join("root-ca.pem");
    let store_root = fleet.dir.path().join("devices");
    let granted = || grants::read_grants(certs, "mig1").unwrap();
    let online = || {
        let seen = fleet
            .core()
            .store
            .device("mig1")
            .unwrap()
            .and_then(|r| r.last_seen_ms);
        async move { seen.map(|_| ()) }
    };

    // Activated and online in svcA, then switched off.
    let first = Devices::new(store_root.clone());
    first.provision(&fleet, "mig1", "svcA").await.unwrap();
    let task = first.spawn(first.config(&fleet, "mig1", KeyMode::Csr));
    eventually(T, "mig1 online in svcA", online).await.unwrap();
    first.shutdown.cancel();
    tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(granted(), ["svcA"]);

    // The operator assigns svcB while the device is off: granted before
    // the device can hear of it.
    fleet.change(&["mig1"], "svcB").await.unwrap();
    assert_eq!(granted(), ["svcA", "svcB"]);

    // Switched on again, the device gets its notice, re-keys and reports
    // from its svcB certificate; the svcA one is then revoked and its grant
    // withdrawn.
    let second = Devices::new(store_root);
    second.spawn(second.config(&fleet, "mig1", KeyMode::Csr));
    eventually(T, "svcA withdrawn", || {
        let g = granted();
        async move { (g == ["svcB"]).then_some(()) }
    })
    .await
    .unwrap();
    let creds = second
        .store("mig1")
        .unwrap()
        .service_credentials("svcB")
        .unwrap()
        .unwrap();
    second.shutdown.cancel();

    fleet_manager::admin::call(&fleet.api(), "POST", "/v1/devices/mig1/reset", None)
        .await
        .unwrap();
    assert!(granted().is_empty(), "reset left grants behind");
    assert!(
        Probe::mtls(
            fleet.service_addr(),
            "mig1",
            &root,
            creds.chain_pem,
            creds.key_pem
        )
        .await
        .is_err(),
        "a reset device's certificate was accepted"
    );
}

#[tokio::test]
async fn revocation_cuts_the_live_session_and_refuses_the_next_handshake() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let (live, creds) = held_session(&fleet, &devices, "rev1").await;

    let revoked_at = Instant::now();
    fleet_manager::admin::call(&fleet.api(), "POST", "/v1/devices/rev1/reset", None)
        .await
        .unwrap();
    let reason = live.wait_cut(T).await.unwrap();
    let took = revoked_at.elapsed();
    println!("live session of a revoked certificate closed {took:?} after the reset");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    cut_and_refused(&fleet, reason, "rev1", creds).await;
    assert!(fleet.broker.metrics.get(|m| &m.revoked_cuts) >= 1);
}

/// `device`, provisioned for svcA, brought online by its simulator and
/// switched off; then a live session of its svcA certificate, held by the
/// test, and those credentials.
async fn held_session(
    fleet: &Fleet,
    devices: &Devices,
    device: &str,
) -> (Probe5, fleet_device_sim::store::ServiceCredentials) {
    devices.provision(fleet, device, "svcA").await.unwrap();
    let task = devices.spawn(devices.config(fleet, device, KeyMode::Csr));
    devices.wait_connected(device, T).await.unwrap();
    devices.shutdown.cancel();
    tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let creds = devices
        .store(device)
        .unwrap()
        .service_credentials("svcA")
        .unwrap()
        .unwrap();
    let live = Probe5::mtls(
        fleet.service_addr(),
        device,
        &fleet.certs_dir().join("root-ca.pem"),
        creds.chain_pem.clone(),
        creds.key_pem.clone(),
    )
    .await
    .unwrap();
    (live, creds)
}

/// A live session cut for its revoked certificate was told why, and the
/// certificate is refused at the next handshake.
async fn cut_and_refused(
    fleet: &Fleet,
    reason: Option<rumqttc::v5::mqttbytes::v5::DisconnectReasonCode>,
    device: &str,
    creds: fleet_device_sim::store::ServiceCredentials,
) {
    assert_eq!(
        reason,
        Some(rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::AdministrativeAction)
    );
    let again = Probe::mtls(
        fleet.service_addr(),
        device,
        &fleet.certs_dir().join("root-ca.pem"),
        creds.chain_pem,
        creds.key_pem,
    )
    .await;
    assert!(
        again.is_err(),
        "revoked certificate accepted at the next handshake"
    );
}

/// After A → B, a session still on A with the certificate the move
/// superseded is cut once that certificate is revoked (here by
/// `revoke_superseded_after_secs`, as for a device that never reports from
/// B), though nobody takes its client id over; the certificate is then
/// refused at the handshake. A device that moved keeps nothing on A.
#[tokio::test]
async fn a_session_left_on_the_old_service_is_cut_after_a_migration() {
    let fleet = Fleet::start_with(|c| c.revoke_superseded_after_secs = 1)
        .await
        .unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    // What stays on A: the svcA certificate's live session.
    let (left, creds) = held_session(&fleet, &devices, "mig2").await;
    let serial_a = fleet
        .core()
        .store
        .device("mig2")
        .unwrap()
        .unwrap()
        .current_cert
        .unwrap();

    // The operator moves it to svcB; the device takes its svcB
    // certificate (here by hand, on the bootstrap listener) and never
    // connects to B, so no session of its id on B takes the one on A over.
    fleet.change(&["mig2"], "svcB").await.unwrap();
    let probe = fleet.privileged("tester").await.unwrap();
    probe.subscribe("fleet/v1/+/+/reply").await.unwrap();
    let dev = crate::wire::HandDevice {
        uuid: devices.store("mig2").unwrap().state().uuid.clone(),
        ..crate::wire::HandDevice::new("mig2")
    };
    let (reply, _) = crate::wire::ask(
        &fleet,
        &probe,
        "mig2",
        fleet_protocol::RequestKind::Update,
        crate::wire::update(&dev, "svcB"),
    )
    .await;
    assert_eq!(reply.status, fleet_protocol::Status::Ok, "{reply:?}");
    assert!(!left.is_cut(), "cut before its certificate was revoked");

    // Revoked a second after it was superseded, at housekeeping's next
    // look (every 10 s); then the session is cut, and told why.
    let reason = left.wait_cut(T).await.unwrap();
    let revoked = fleet
        .core()
        .store
        .cert(&serial_a)
        .unwrap()
        .unwrap()
        .revoked_ms
        .expect("the svcA certificate revoked");
    let after_ms = fleet_protocol::now_ms().saturating_sub(revoked);
    println!("session on svcA cut {after_ms} ms after its certificate was revoked");
    // Within a second by design (trust::RELOAD_EVERY + CUT_GRACE); twice
    // that allowed for a loaded machine, as for a reset's revocation.
    assert!(after_ms < 2000, "cut {after_ms} ms after the revocation");
    cut_and_refused(&fleet, reason, "mig2", creds).await;
    assert_eq!(
        grants::read_grants(fleet.certs_dir(), "mig2").unwrap(),
        ["svcB"]
    );
}

/// The reply an attacker on the bootstrap listener gets to its `activate`
/// for `device`, with the manager's signature checked.
async fn activate_as(
    fleet: &Fleet,
    attacker: &Probe,
    device: &str,
    signer: &PKey<Private>,
) -> fleet_protocol::Reply {
    let reply_topic = format!("fleet/v1/activate/{device}/reply");
    let eph = crypto::generate_p256().unwrap();
    let request = crate::wire::activate_request(device, &eph, signer);
    let nonce = fleet_protocol::Envelope::decode(&request)
        .unwrap()
        .body::<fleet_protocol::ActivateRequest>()
        .unwrap()
        .nonce;
    attacker
        .publish(&format!("fleet/v1/activate/{device}"), request)
        .await
        .unwrap();
    // The answer to this request: the device's own replies come on the
    // same topic.
    eventually(T, "the reply to the activate", || {
        let replies = attacker.on(&reply_topic);
        let key = fleet.core().pki.signing_key().clone();
        let nonce = nonce.clone();
        async move {
            replies.iter().find_map(|got| {
                let env = fleet_protocol::Envelope::decode(&got.payload).ok()?;
                let reply: fleet_protocol::Reply = env.body().ok()?;
                (reply.nonce == nonce && crypto::verify(&key, &env.tbs(), &env.auth))
                    .then_some(reply)
            })
        }
    })
    .await
    .unwrap()
}

/// Someone who knows only a device's id, on the bootstrap listener under
/// that id, cannot activate it: `auth_failed`, nothing stored; the real
/// device then activates and connects at its first attempt, and once it
/// is active nobody activates it again (`already_active`) until an
/// operator resets it.
#[tokio::test]
async fn knowing_a_device_id_is_not_enough_to_activate_it() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "known1", "svcA").await.unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let boot = fleet.broker.bootstrap_tls_addr.unwrap();
    let attacker = Probe::tls(boot, "known1", &root).await.unwrap();
    attacker
        .subscribe("fleet/v1/activate/known1/reply")
        .await
        .unwrap();
    let own_key = crypto::generate_p256().unwrap();
    let reply = activate_as(&fleet, &attacker, "known1", &own_key).await;
    assert_eq!(
        reply.status,
        fleet_protocol::Status::AuthFailed,
        "{reply:?}"
    );
    assert!(reply.uuid.is_none());
    assert!(fleet.core().store.device("known1").unwrap().is_none());

    devices.spawn(devices.config(&fleet, "known1", KeyMode::Csr));
    devices.wait_connected("known1", T).await.unwrap();
    let failed: Vec<_> = devices
        .events_of("known1")
        .into_iter()
        .filter(|e| matches!(e, DeviceEvent::Failed { .. }))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");

    // Active now: not even its own factory key activates it again.
    let factory = devices.store("known1").unwrap().factory_key().clone();
    let reply = activate_as(&fleet, &attacker, "known1", &factory).await;
    assert_eq!(
        reply.status,
        fleet_protocol::Status::AlreadyActive,
        "{reply:?}"
    );
    let reply = activate_as(&fleet, &attacker, "known1", &own_key).await;
    assert_eq!(
        reply.status,
        fleet_protocol::Status::AuthFailed,
        "{reply:?}"
    );
    // After an operator's reset, the factory key does.
    fleet_manager::admin::call(&fleet.api(), "POST", "/v1/devices/known1/reset", None)
        .await
        .unwrap();
    let reply = activate_as(&fleet, &attacker, "known1", &factory).await;
    assert_eq!(reply.status, fleet_protocol::Status::Ok, "{reply:?}");
}

/// Open enrollment is a policy the operator turns on: without it a device
/// registered with no factory key cannot activate; with it, it can, with
/// any `auth`. A device registered with a factory key still needs it.
#[tokio::test]
async fn open_enrollment_is_an_explicit_policy() {
    for open in [false, true] {
        let fleet = Fleet::start_with(|c| c.open_enrollment = open)
            .await
            .unwrap();
        fleet.register("nokey1", "svcA", None).await.unwrap();
        let keyed = crypto::generate_p256().unwrap();
        fleet
            .register(
                "keyed1",
                "svcA",
                Some(&crypto::public_point(&keyed).unwrap()),
            )
            .await
            .unwrap();
        let root = fleet.certs_dir().join("root-ca.pem");
        let boot = fleet.broker.bootstrap_tls_addr.unwrap();
        let anyone = crypto::generate_p256().unwrap();
        for device in ["nokey1", "keyed1"] {
            let client = Probe::tls(boot, device, &root).await.unwrap();
            client
                .subscribe(&format!("fleet/v1/activate/{device}/reply"))
                .await
                .unwrap();
            let reply = activate_as(&fleet, &client, device, &anyone).await;
            let expected = if open && device == "nokey1" {
                fleet_protocol::Status::Ok
            } else {
                fleet_protocol::Status::AuthFailed
            };
            assert_eq!(reply.status, expected, "open enrollment {open}, {device}");
            assert_eq!(
                fleet.core().store.device(device).unwrap().is_some(),
                expected == fleet_protocol::Status::Ok,
                "open enrollment {open}, {device}"
            );
        }
    }
}

/// Anyone may publish under a device's id on the bootstrap listener. The
/// manager answers unreadable requests with an empty nonce, which is no
/// answer to the device's own request (topics.md §5.2): a device that
/// activates among them goes on and gets its certificate.
#[tokio::test]
async fn unreadable_requests_under_a_device_id_do_not_stop_its_activation() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "target1", "svcA").await.unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let boot = fleet.broker.bootstrap_tls_addr.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let mut attackers = Vec::new();
    let mut garbage = Vec::new();
    // Ten connections under the device's id, each within the
    // per-connection publish rate: an unreadable request every 6 ms.
    for _ in 0..10 {
        let attacker = Arc::new(Probe::tls(boot, "target1", &root).await.unwrap());
        for kind in ["activate", "update"] {
            let reply = format!("fleet/v1/{kind}/target1/reply");
            attacker.subscribe(&reply).await.unwrap();
        }
        garbage.push(tokio::spawn({
            let (attacker, stop) = (attacker.clone(), stop.clone());
            async move {
                let mut pace = tokio::time::interval(Duration::from_millis(60));
                let mut sent = 0u32;
                for kind in ["activate", "update"].iter().cycle() {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = pace.tick() => {}
                    }
                    let topic = format!("fleet/v1/{kind}/target1");
                    attacker
                        .publish(&topic, b"\xffnot cbor".to_vec())
                        .await
                        .unwrap();
                    sent += 1;
                }
                sent
            }
        }));
        attackers.push(attacker);
    }
    // The unreadable requests are answered, with an empty nonce.
    eventually(T, "replies to the unreadable requests", || {
        let n = attackers[0].messages().len();
        async move { (n >= 2).then_some(()) }
    })
    .await
    .unwrap();
    devices.spawn(devices.config(&fleet, "target1", KeyMode::Csr));
    devices.wait_connected("target1", T).await.unwrap();
    stop.cancel();
    let failed = devices.events_of("target1");
    let failed: Vec<_> = failed
        .iter()
        .filter(|e| matches!(e, DeviceEvent::Failed { .. }))
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    let mut sent = 0;
    for task in garbage {
        sent += tokio::time::timeout(T, task).await.unwrap().unwrap();
    }
    let replies = attackers[0].messages();
    let empty = replies
        .iter()
        .filter_map(|m| fleet_protocol::Envelope::decode(&m.payload).ok())
        .filter_map(|env| env.body::<fleet_protocol::Reply>().ok())
        .filter(|r| r.nonce.is_empty() && r.status == fleet_protocol::Status::Malformed)
        .count();
    println!("{sent} unreadable requests under the device's id; one of their senders saw {empty} empty-nonce replies");
    assert!(empty >= 2, "{empty} empty-nonce replies");
    assert!(attackers.iter().all(|a| !a.is_cut()));
}

/// How long until the broker closes `stream`, which sends nothing: `None`
/// if it is still open after `within`.
async fn closed_within(mut stream: tokio::net::TcpStream, within: Duration) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let start = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout_at((start + within).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// `tls_handshake_timeout_ms`: a connection that never sends its
/// ClientHello is closed once it is up, on both TLS listeners, and counted
/// as a failed handshake; with the default (10 s) it is still open after
/// that long.
#[tokio::test]
async fn a_handshake_that_does_not_finish_in_time_is_closed() {
    let fleet = Fleet::start_tuned(|b| b.tls_handshake_timeout_ms = 500, |_| {})
        .await
        .unwrap();
    let failures = fleet.broker.metrics.get(|m| &m.handshake_failures);
    for addr in [
        fleet.broker.bootstrap_tls_addr.unwrap(),
        fleet.service_addr(),
    ] {
        let silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        let took = closed_within(silent, T).await.expect("closed");
        println!("{addr}: a silent connection closed after {took:?}");
        assert!(took >= Duration::from_millis(450), "closed after {took:?}");
    }
    eventually(T, "both counted as failed handshakes", || {
        let now = fleet.broker.metrics.get(|m| &m.handshake_failures);
        async move { (now >= failures + 2).then_some(()) }
    })
    .await
    .unwrap();

    let fleet = Fleet::start().await.unwrap();
    let silent = tokio::net::TcpStream::connect(fleet.service_addr())
        .await
        .unwrap();
    assert_eq!(
        closed_within(silent, Duration::from_millis(1500)).await,
        None
    );
}

/// `connects_per_sec_per_source`: past its burst, a source's new
/// connections are closed at once, unread, and counted; once its tokens
/// come back, it connects again. The manager's own connection, from the
/// same address, was made before.
#[tokio::test]
async fn connects_past_a_sources_rate_are_closed_at_once() {
    let fleet = Fleet::start_tuned(
        |b| {
            b.connects_per_sec_per_source = 2.0;
            b.connect_burst_per_source = 10.0;
            // Admitted connections wait for their ClientHello past the test.
            b.tls_handshake_timeout_ms = 60_000;
        },
        |_| {},
    )
    .await
    .unwrap();
    let boot = fleet.broker.bootstrap_tls_addr.unwrap();
    let before = fleet.broker.metrics.get(|m| &m.rate_limited);
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..30 {
        let stream = tokio::net::TcpStream::connect(boot).await.unwrap();
        held.push(stream);
    }
    for stream in held {
        // Admitted ones wait for their ClientHello (10 s); the others are
        // closed at once.
        if closed_within(stream, Duration::from_millis(1000))
            .await
            .is_some()
        {
            refused += 1;
        }
    }
    let counted = fleet.broker.metrics.get(|m| &m.rate_limited) - before;
    println!("{refused} of 30 connects closed at once; {counted} counted");
    assert!(refused >= 15, "{refused} closed");
    assert_eq!(counted, refused as u64);
    // Two a second come back: a device connects again within its timeout.
    let root = fleet.certs_dir().join("root-ca.pem");
    eventually(T, "a TLS connect admitted again", || {
        let root = root.clone();
        async move { Probe::tls(boot, "later1", &root).await.ok().map(|_| ()) }
    })
    .await
    .unwrap();
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

/// A fleet whose broker has `tune` applied and handshake and CONNECT
/// timeouts longer than any test, so that a flood's connections stay until
/// the broker closes them for others; and `device`, provisioned on svcA.
async fn flooded_fleet(
    device: &str,
    tune: impl FnOnce(&mut fleet_broker::BrokerConfig),
) -> (Fleet, Devices) {
    let fleet = Fleet::start_tuned(
        |b| {
            b.tls_handshake_timeout_ms = 120_000;
            b.connect_timeout_ms = 120_000;
            tune(b);
        },
        |_| {},
    )
    .await
    .unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, device, "svcA").await.unwrap();
    (fleet, devices)
}

/// A flood of connections that stop talking, kept up on the device
/// listeners while a device activates and connects: half never send a
/// byte, the other half (on the TLS listeners) send a recorded ClientHello
/// and never answer the broker's flight. The flood keeps more of them open
/// than `max_connections` (the handshake and CONNECT timeouts are longer
/// than the test), but only `max_pending_handshakes` are held, and the
/// device gets in.
#[tokio::test]
async fn a_flood_of_connections_that_stop_talking_keeps_no_device_out() {
    let (slots, pending) = (300, 40);
    let (fleet, devices) = flooded_fleet("dev10", |b| {
        b.max_connections = slots;
        b.max_pending_handshakes = pending;
        // The flood outruns the age floor here (PendingSet's unit test
        // has it): every pending connection may be closed.
        b.pending_min_age_ms = 0;
    })
    .await;
    // A ClientHello as a device of svcA sends it, replayed by the flood.
    let hello = {
        let device = resuming(
            &fleet,
            "replayed",
            certified(&fleet, "replayed", "svcA"),
            &rustls::version::TLS13,
        );
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut client = rustls::ClientConnection::new(device.config, name).unwrap();
        let mut hello = Vec::new();
        client.write_tls(&mut hello).unwrap();
        hello
    };
    let flooding = tokio_util::sync::CancellationToken::new();
    let opened = Arc::new(AtomicUsize::new(0));
    let flood = {
        let listeners = [
            (fleet.broker.bootstrap_tls_addr.unwrap(), true),
            (fleet.service_addr(), true),
            (fleet.broker.bootstrap_plain_addr.unwrap(), false),
        ];
        let (stop, opened) = (flooding.clone(), opened.clone());
        // `slots` + 50 connections open at all times: each closed by the
        // broker is opened again. At most 750 a second, under the
        // per-source connect rate the device shares (all is 127.0.0.1).
        let room = Arc::new(tokio::sync::Semaphore::new(slots + 50));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0usize;
            while !stop.is_cancelled() {
                tick.tick().await;
                for (addr, tls) in listeners {
                    let Ok(held) = room.clone().try_acquire_owned() else {
                        continue;
                    };
                    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
                        continue;
                    };
                    n += 1;
                    if tls && n % 2 == 0 {
                        use tokio::io::AsyncWriteExt;
                        if s.write_all(&hello).await.is_err() {
                            continue;
                        }
                    }
                    opened.fetch_add(1, Ordering::Relaxed);
                    let stop = stop.clone();
                    // Held, what the broker sends read and dropped, until
                    // the broker closes it.
                    tokio::spawn(async move {
                        let _held = held;
                        let mut buf = [0u8; 4096];
                        loop {
                            tokio::select! {
                                _ = stop.cancelled() => break,
                                read = tokio::io::AsyncReadExt::read(&mut s, &mut buf) => {
                                    if !matches!(read, Ok(n) if n > 0) {
                                        break;
                                    }
                                }
                            }
                        }
                    });
                }
            }
        })
    };
    // Enough that stalled handshakes would hold every slot by now, were
    // only silent connections closed.
    eventually(T, "the flood to outgrow max_connections", || {
        let opened = opened.load(Ordering::Relaxed);
        async move { (opened >= 4 * slots).then_some(()) }
    })
    .await
    .unwrap();
    devices.spawn(devices.config(&fleet, "dev10", KeyMode::Csr));
    devices
        .wait_event(
            "dev10",
            Duration::from_secs(10),
            "connected during the flood",
            |e| matches!(e, DeviceEvent::Connected { .. }),
        )
        .await
        .unwrap();
    let live = fleet.broker.metrics.get(|m| &m.live);
    flooding.cancel();
    flood.await.unwrap();
    assert!(
        live < (slots / 2) as u64,
        "{live} connections held during the flood"
    );
    assert!(fleet.broker.metrics.get(|m| &m.evicted) >= slots as u64);
}

/// A flood that takes every slot at once, faster than `pending_min_age`
/// (so that none of its connections may be closed as they come), keeps no
/// device out once its connections are older: a full listener closes the
/// oldest pending connection (holding a bootstrap slot, for the bootstrap
/// listeners) for each newcomer.
#[tokio::test]
async fn a_flood_that_takes_every_slot_at_once_keeps_no_device_out() {
    let (slots, bootstrap) = (120, 60);
    let (fleet, devices) = flooded_fleet("dev11", |b| {
        b.max_connections = slots;
        b.max_bootstrap_connections = bootstrap;
        b.pending_min_age_ms = 300;
    })
    .await;
    // Every bootstrap slot on the TLS bootstrap listener, the rest on the
    // service listener, and a few more, refused.
    let mut idle = Vec::new();
    for n in 0..slots + 10 {
        let addr = match n < bootstrap {
            true => fleet.broker.bootstrap_tls_addr.unwrap(),
            false => fleet.service_addr(),
        };
        idle.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    eventually(T, "the listeners to be full", || {
        let refused = fleet.broker.metrics.get(|m| &m.over_capacity);
        async move { (refused > 0).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(fleet.broker.metrics.get(|m| &m.evicted), 0);
    devices.spawn(devices.config(&fleet, "dev11", KeyMode::Csr));
    devices.wait_connected("dev11", T).await.unwrap();
    // Closed for the device: a bootstrap one, and one for its service
    // connection.
    assert!(fleet.broker.metrics.get(|m| &m.evicted) >= 2);
    drop(idle);
}

/// Clients that finish their handshake on the bootstrap listeners and
/// then idle, before or after their CONNECT, keep no device from
/// activating once they have sent nothing for
/// `bootstrap_session_min_age_ms`: a full bootstrap listener closes, for a
/// newcomer, the oldest such session of the source with the most. A
/// client that keeps talking, the oldest of them all, is left alone.
#[tokio::test]
async fn idle_bootstrap_clients_keep_no_device_from_activating() {
    let bootstrap = 20;
    for connect in [true, false] {
        let (fleet, devices) = flooded_fleet("dev12", |b| {
            b.max_bootstrap_connections = bootstrap;
            b.bootstrap_session_min_age_ms = 300;
        })
        .await;
        let (talking, talked) = talking_bootstrap_client(&fleet, LOCAL).await;
        let mut clients = Vec::new();
        let mut silent = Vec::new();
        for n in 1..bootstrap {
            match connect {
                true => clients.push(fleet.bootstrap_client(&format!("idle{n}")).await.unwrap()),
                false => silent.push(tls_and_nothing_more(&fleet).await),
            }
        }
        devices.spawn(devices.config(&fleet, "dev12", KeyMode::Csr));
        devices.wait_connected("dev12", T).await.unwrap();
        assert!(
            fleet.broker.metrics.get(|m| &m.evicted) >= 1,
            "CONNECT {connect}"
        );
        assert!(clients.iter().any(|p| p.is_cut()) || !connect);
        assert!(!talking.is_finished(), "the client that talks was closed");
        assert!(talked.load(Ordering::Relaxed) > 0);
        talking.abort();
    }
}

/// Clients that keep talking on the bootstrap listeners, all from one
/// address and holding every bootstrap slot, keep no device of another
/// address from activating: a full listener with no idle session closes,
/// for a newcomer, the oldest session of a source that holds more than
/// the newcomer's.
#[tokio::test]
async fn talking_bootstrap_clients_of_one_address_keep_no_device_from_activating() {
    let bootstrap = 20;
    let (fleet, devices) = flooded_fleet("dev13", |b| {
        b.max_bootstrap_connections = bootstrap;
    })
    .await;
    let mut talking = Vec::new();
    for _ in 0..bootstrap {
        talking.push(talking_bootstrap_client(&fleet, "127.0.0.2").await);
    }
    devices.spawn(devices.config(&fleet, "dev13", KeyMode::Csr));
    devices.wait_connected("dev13", T).await.unwrap();
    assert!(fleet.broker.metrics.get(|m| &m.evicted) >= 1);
    // The oldest were the ones closed.
    assert!(talking[0].0.is_finished());
    assert!(!talking[bootstrap - 1].0.is_finished());
    for (task, talked) in talking {
        assert!(talked.load(Ordering::Relaxed) > 0);
        task.abort();
    }
}

/// Newcomers that hold nothing (silent connections from another address,
/// each dropped within the pending age floor) trim a source's talking
/// bootstrap sessions to its share of the listener, and no further: of 6
/// slots, 4 held by 127.0.0.2 and the rest churned by 127.0.0.3, one
/// session of 127.0.0.2 is closed and three keep talking.
#[tokio::test]
async fn newcomers_that_hold_nothing_close_no_session_below_its_share() {
    let fleet = Fleet::start_tuned(
        |b| {
            b.max_bootstrap_connections = 6;
            b.tls_handshake_timeout_ms = 120_000;
            b.connect_timeout_ms = 120_000;
        },
        |_| {},
    )
    .await
    .unwrap();
    let mut talking = Vec::new();
    for _ in 0..4 {
        talking.push(talking_bootstrap_client(&fleet, "127.0.0.2").await);
    }
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    let flooding = tokio_util::sync::CancellationToken::new();
    let opened = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, opened) = (flooding.clone(), opened.clone());
        tokio::spawn(async move {
            let mut held = std::collections::VecDeque::new();
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            while !stop.is_cancelled() {
                tick.tick().await;
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                socket.bind("127.0.0.3:0".parse().unwrap()).unwrap();
                if let Ok(s) = socket.connect(addr).await {
                    held.push_back((Instant::now(), s));
                    opened.fetch_add(1, Ordering::Relaxed);
                }
                // Each dropped before it is old enough to be closed.
                while held
                    .front()
                    .is_some_and(|(t, _)| t.elapsed() > Duration::from_millis(600))
                {
                    held.pop_front();
                }
            }
        })
    };
    let closed = || talking.iter().filter(|t| t.0.is_finished()).count();
    eventually(T, "a session over its share to be closed", || async {
        (closed() >= 1).then_some(())
    })
    .await
    .unwrap();
    // The flood goes on past the first closing: 40 newcomers more.
    let evicted = fleet.broker.metrics.get(|m| &m.evicted);
    let then = opened.load(Ordering::Relaxed);
    eventually(T, "40 more newcomers of the flood", || async {
        (opened.load(Ordering::Relaxed) >= then + 40).then_some(())
    })
    .await
    .unwrap();
    flooding.cancel();
    tokio::time::timeout(T, flood).await.unwrap().unwrap();
    assert_eq!(closed(), 1);
    assert_eq!(fleet.broker.metrics.get(|m| &m.evicted), evicted);
    for (task, talked) in talking {
        assert!(talked.load(Ordering::Relaxed) > 0);
        task.abort();
    }
}

/// The address the tests' devices connect from.
const LOCAL: &str = "127.0.0.1";

/// A 3.1.1 client on the plain bootstrap listener, from loopback address
/// `from`, that sends a PINGREQ every 100 ms; its task ends when the
/// broker closes the connection. With the count of PINGRESPs it got.
async fn talking_bootstrap_client(
    fleet: &Fleet,
    from: &str,
) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    let mut s = socket.connect(addr).await.unwrap();
    // CONNECT, clean session, keep-alive 60 s, client id "talk".
    let connect = [
        0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 4, b't', b'a', b'l', b'k',
    ];
    s.write_all(&connect).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let talked = Arc::new(AtomicUsize::new(0));
    let count = talked.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut pong = [0u8; 2];
        loop {
            tick.tick().await;
            if s.write_all(&[0xC0, 0]).await.is_err() {
                return;
            }
            match s.read_exact(&mut pong).await {
                Ok(_) if pong == [0xD0, 0] => count.fetch_add(1, Ordering::Relaxed),
                _ => return,
            };
        }
    });
    (task, talked)
}

/// A certified device's connection that finishes its handshake and sends
/// no CONNECT is closed as soon as its certificate is revoked, not at the
/// end of its CONNECT timeout.
#[tokio::test]
async fn a_connection_waiting_for_its_connect_ends_when_its_certificate_is_revoked() {
    let fleet = Fleet::start_tuned(|b| b.connect_timeout_ms = 120_000, |_| {})
        .await
        .unwrap();
    let auth = certified(&fleet, "quiet1", "svcA");
    let revoked = revoked_entry(&auth.0, fleet_protocol::now_ms() / 1000);
    let device = resuming(&fleet, "quiet1", auth, &rustls::version::TLS13);
    let addr = fleet.service_addr();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let reader = tokio::task::spawn_blocking(move || {
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = rustls::ClientConnection::new(device.config, name).unwrap();
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).unwrap();
        }
        tx.send(()).unwrap();
        // Whatever the broker still sends (a ticket), then its end.
        let started = Instant::now();
        let mut stream = rustls::Stream::new(&mut tls, &mut tcp);
        let mut buf = [0u8; 512];
        while matches!(std::io::Read::read(&mut stream, &mut buf), Ok(n) if n > 0) {}
        started.elapsed()
    });
    tokio::time::timeout(T, rx).await.unwrap().unwrap();
    fleet
        .core()
        .pki
        .write_crl("svcA", 1, &[revoked], 1)
        .unwrap();
    let waited = tokio::time::timeout(T, reader).await.unwrap().unwrap();
    assert!(waited < Duration::from_secs(10), "closed after {waited:?}");
}

/// The CRL entry revoking, at `revoked_at` (Unix seconds), the leaf of the
/// chain `pem`.
pub(crate) fn revoked_entry(pem: &[u8], revoked_at: u64) -> fleet_pki::RevokedEntry {
    let serial = X509::from_pem(pem)
        .unwrap()
        .serial_number()
        .to_bn()
        .unwrap();
    fleet_pki::RevokedEntry {
        serial_hex: serial.to_hex_str().unwrap().to_lowercase(),
        revoked_at,
    }
}

/// A connection to the bootstrap TLS listener that finishes its handshake
/// and sends nothing more.
async fn tls_and_nothing_more(fleet: &Fleet) -> openssl::ssl::SslStream<std::net::TcpStream> {
    let root = fleet.certs_dir().join("root-ca.pem");
    let addr = fleet.broker.bootstrap_tls_addr.unwrap();
    tokio::task::spawn_blocking(move || bootstrap_tls(&root, addr))
        .await
        .unwrap()
}

/// A blocking OpenSSL connection to the bootstrap TLS listener at `addr`,
/// trusting `root`, its handshake done; reads and writes time out after
/// [`T`].
pub(crate) fn bootstrap_tls(
    root: &std::path::Path,
    addr: std::net::SocketAddr,
) -> openssl::ssl::SslStream<std::net::TcpStream> {
    use openssl::ssl::{SslConnector, SslMethod};
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_ca_file(root).unwrap();
    let tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    tcp.set_write_timeout(Some(T)).unwrap();
    b.build().connect("localhost", tcp).unwrap()
}

/// A device that answers the broker's flight late (1.5 s, past the age
/// floor) while another address floods the service listener with
/// connections that never speak, far over `max_pending_handshakes`: the
/// flood's own connections are closed, and the slow handshake completes.
#[tokio::test]
async fn a_flood_from_another_address_spares_a_slow_handshake() {
    let fleet = Fleet::start_tuned(|b| b.max_pending_handshakes = 20, |_| {})
        .await
        .unwrap();
    let service = fleet.service_addr();
    let flooding = tokio_util::sync::CancellationToken::new();
    let flood = {
        let stop = flooding.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(4));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            while !stop.is_cancelled() {
                tick.tick().await;
                let socket = tokio::net::TcpSocket::new_v4().unwrap();
                if socket.bind("127.0.0.2:0".parse().unwrap()).is_err() {
                    continue;
                }
                let Ok(mut s) = socket.connect(service).await else {
                    continue;
                };
                let stop = stop.clone();
                // Held until the broker closes it.
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf) => {}
                    }
                });
            }
        })
    };
    let evicted = || fleet.broker.metrics.get(|m| &m.evicted);
    eventually(
        T,
        "the flood to be closed for newer connections",
        || async move { (evicted() > 0).then_some(()) },
    )
    .await
    .unwrap();
    let (chain, key) = certified(&fleet, "slow1", "svcA");
    let root = std::fs::read(fleet.certs_dir().join("root-ca.pem")).unwrap();
    let config = Resuming::new(
        service,
        "slow1",
        &root,
        (&chain, &key),
        &rustls::version::TLS13,
    )
    .unwrap()
    .config;
    let before = evicted();
    let slow = tokio::task::spawn_blocking(move || -> anyhow::Result<[u8; 4]> {
        let mut tcp = std::net::TcpStream::connect(service)?;
        tcp.set_read_timeout(Some(T))?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let mut conn = rustls::ClientConnection::new(config, name)?;
        conn.write_tls(&mut tcp)?;
        // The broker's flight, read and taken in; then a long pause.
        while !conn.wants_write() {
            conn.read_tls(&mut tcp)?;
            conn.process_new_packets()?;
        }
        std::thread::sleep(Duration::from_millis(1500));
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        connack(&mut tls, "slow1")
    });
    let ack = slow.await.unwrap();
    let closed_meanwhile = evicted() - before;
    flooding.cancel();
    flood.await.unwrap();
    assert_eq!(ack.unwrap(), [0x20, 2, 0, 0], "the slow handshake");
    assert!(
        closed_meanwhile > 0,
        "no connection was closed for others while the device was slow"
    );
}

/// `fleet-manager provider-add` for `name` on `service`: what it printed,
/// the directory it wrote to, the chain and the key (PEM).
async fn provider_add(
    fleet: &Fleet,
    name: &str,
    service: &str,
) -> (serde_json::Value, std::path::PathBuf, Vec<u8>, Vec<u8>) {
    let out = fleet.dir.path().join("provider");
    let (admin, token) = (fleet.admin(), fleet.admin_token_file());
    let args = [
        "fleet-manager",
        "provider-add",
        "--admin",
        &admin,
        "--admin-token-file",
        &token,
        "--name",
        name,
        "--service",
        service,
        "--out",
        out.to_str().unwrap(),
    ];
    let cli = <fleet_manager::cli::Cli as clap::Parser>::try_parse_from(args).unwrap();
    let printed = fleet_manager::cli::execute(cli).await.unwrap();
    let chain = std::fs::read(out.join(format!("provider.{name}.pem"))).unwrap();
    let key = std::fs::read(out.join(format!("provider.{name}.key"))).unwrap();
    (printed[0].clone(), out, chain, key)
}

#[tokio::test]
async fn a_service_provider_reads_its_own_tenants_telemetry_and_nothing_else() {
    let (fleet, _devices, observer) = running_fleet().await;
    let root = fleet.certs_dir().join("root-ca.pem");
    // The operator's CLI issues the provider of svcA its certificate.
    let (printed, out, chain, key) = provider_add(&fleet, "weather", "svcA").await;
    assert_eq!(printed["client_id"], "provider.weather");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("provider.weather.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // Its certificate is its identity: the client id must be its CN.
    for wrong in ["weather", "provider.other", "dev1", "provider.weather "] {
        assert!(
            Probe::mtls(
                fleet.service_addr(),
                wrong,
                &root,
                chain.clone(),
                key.clone()
            )
            .await
            .is_err(),
            "client id {wrong:?} accepted for provider.weather"
        );
    }
    let provider = Probe::mtls(
        fleet.service_addr(),
        "provider.weather",
        &root,
        chain.clone(),
        key.clone(),
    )
    .await
    .unwrap();
    for filter in [
        "#",
        "/tenants/svcA/#",
        "/tenants/svcB/telemetry/+",
        "/tenants/+/telemetry/+",
        "/tenants/svcA/fleet/v1/poll/dev1/reply",
        "/tenants/svcA/fleet/v1/service/change/dev1",
        "fleet/v1/+/+",
        "$share/g//tenants/svcA/telemetry/+",
    ] {
        assert_eq!(
            codes(&provider, filter).await,
            [SubscribeReasonCode::Failure],
            "{filter} granted to a provider"
        );
    }
    assert!(matches!(
        codes(&provider, "/tenants/svcA/telemetry/+").await[..],
        [SubscribeReasonCode::Success(_)]
    ));
    let mark = observer.messages().len();
    traffic_after(&observer, mark).await;
    eventually(T, "dev1's telemetry at the provider", || {
        let got = !provider.on("/tenants/svcA/telemetry/dev1").is_empty();
        async move { got.then_some(()) }
    })
    .await
    .unwrap();
    assert!(
        provider
            .messages()
            .iter()
            .all(|m| m.topic.starts_with("/tenants/svcA/telemetry/")),
        "the provider received {:?}",
        provider.messages()
    );

    // It may not publish, not even into its own tenant.
    let before = fleet.snapshot();
    provider
        .publish("/tenants/svcA/fleet/v1/poll/dev1", b"injected".to_vec())
        .await
        .unwrap();
    provider
        .wait_cut(T, "the publishing provider cut")
        .await
        .unwrap();
    assert!(fleet.snapshot() == before, "stored history changed");

    // Revoked by the operator: a live session is cut, the next handshake
    // refused.
    let live = Probe::mtls(
        fleet.service_addr(),
        "provider.weather",
        &root,
        chain.clone(),
        key.clone(),
    )
    .await
    .unwrap();
    let res =
        fleet_manager::admin::call(&fleet.api(), "POST", "/v1/providers/weather/revoke", None)
            .await
            .unwrap();
    assert_eq!(res["revoked"], 1);
    live.wait_cut(T, "the revoked provider's session cut")
        .await
        .unwrap();
    assert!(
        Probe::mtls(fleet.service_addr(), "provider.weather", &root, chain, key)
            .await
            .is_err(),
        "a revoked provider certificate was accepted"
    );
    assert!(grants::read_grants(fleet.certs_dir(), "provider.weather")
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn a_device_cannot_leave_a_retained_message_behind() {
    let fleet = Fleet::start().await.unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let (chain, key) = certified(&fleet, "ret1", "svcA");
    let device = Probe::mtls(fleet.service_addr(), "ret1", &root, chain, key)
        .await
        .unwrap();
    let topic = "/tenants/svcA/telemetry/ret1";
    let live = fleet.privileged("live").await.unwrap();
    live.subscribe(topic).await.unwrap();
    device
        .client
        .publish(topic, rumqttc::QoS::AtLeastOnce, true, b"sticky".to_vec())
        .await
        .unwrap();
    // Delivered to whoever listens now ...
    live.wait_for(topic, 1, T).await.unwrap();
    // ... but not kept for whoever subscribes later.
    let late = fleet.privileged("late").await.unwrap();
    late.subscribe(topic).await.unwrap();
    device.publish(topic, b"marker".to_vec()).await.unwrap();
    late.wait_for(topic, 1, T).await.unwrap();
    assert!(
        late.on(topic).iter().all(|m| m.payload == b"marker"),
        "a retained message reached a later subscriber"
    );
    assert!(!device.is_cut());
}

/// A resuming client of the fleet's service listener, in TLS `version` only.
fn resuming(
    fleet: &Fleet,
    client_id: &str,
    (chain, key): (Vec<u8>, Vec<u8>),
    version: &'static rustls::SupportedProtocolVersion,
) -> Resuming {
    let root = std::fs::read(fleet.certs_dir().join("root-ca.pem")).unwrap();
    Resuming::new(
        fleet.service_addr(),
        client_id,
        &root,
        (&chain, &key),
        version,
    )
    .unwrap()
}

/// `device`'s first connect, made again until svcA's CA is trusted (the
/// manager writes it to `services/` when the test begins); whether it
/// resumed.
async fn connect_once_trusted(device: &Resuming) -> bool {
    eventually(T, "svcA's CA to be trusted", || {
        let device = device.clone();
        async move { device.connect().await.ok() }
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn a_device_that_leaves_its_tickets_unused_is_given_fewer() {
    let fleet = Fleet::start().await.unwrap();
    let withheld = || fleet.broker.metrics.get(|m| &m.tickets_withheld);
    let (chain, key) = certified(&fleet, "forgetful", "svcA");
    // A client that asks for a ticket at every connect and keeps none: a
    // session store of its own each time.
    let forgetful = || {
        resuming(
            &fleet,
            "forgetful",
            (chain.clone(), key.clone()),
            &rustls::version::TLS13,
        )
    };
    assert!(!connect_once_trusted(&forgetful()).await);
    assert!(!forgetful().connect().await.unwrap());
    assert_eq!(withheld(), 0, "the first two connects are given tickets");
    for n in 1..=3 {
        assert!(!forgetful().connect().await.unwrap());
        assert_eq!(withheld(), n, "connect {n} after two unused tickets");
    }
    // The same certificate in a client that keeps its tickets: it resumes
    // with the first one it is given, and is given one at every connect
    // from then on.
    let keeper = forgetful();
    let mut connects = 0;
    while !keeper.connect().await.unwrap() {
        connects += 1;
        assert!(connects <= 16, "no ticket in 16 connects");
    }
    let after = withheld();
    for n in 1..=3 {
        assert!(keeper.connect().await.unwrap(), "resumption {n}");
    }
    assert_eq!(withheld(), after);
}

/// A TLS 1.3 handshake with `chain` and `key`, then closed with no CONNECT.
async fn handshake_only(fleet: &Fleet, chain: &[u8], key: &[u8]) {
    let root = std::fs::read(fleet.certs_dir().join("root-ca.pem")).unwrap();
    let config =
        fleet_device_sim::link::mutual_tls_over(&[&rustls::version::TLS13], &root, chain, key)
            .unwrap();
    let addr = fleet.service_addr();
    tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(T)).unwrap();
        let name = "localhost".try_into().unwrap();
        let mut tls = rustls::ClientConnection::new(config, name).unwrap();
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).unwrap();
        }
    })
    .await
    .unwrap();
}

/// The one ticket in 16 a certificate that leaves its tickets unused is
/// given, if never sent, leaves it where it was: the next connect is given
/// none.
#[tokio::test]
async fn a_probe_ticket_never_sent_gives_no_ticket_back() {
    let fleet = Fleet::start().await.unwrap();
    let withheld = || fleet.broker.metrics.get(|m| &m.tickets_withheld);
    let unsent = || fleet.broker.metrics.get(|m| &m.tickets_unsent);
    let (chain, key) = certified(&fleet, "prober", "svcA");
    let forgetful = || {
        resuming(
            &fleet,
            "prober",
            (chain.clone(), key.clone()),
            &rustls::version::TLS13,
        )
    };
    assert!(!connect_once_trusted(&forgetful()).await);
    // Given: the first two; withheld: the next 15.
    for _ in 2..=17 {
        assert!(!forgetful().connect().await.unwrap());
    }
    assert_eq!(withheld(), 15);
    // The 18th is the probe, and its connection ends before the CONNACK.
    handshake_only(&fleet, &chain, &key).await;
    eventually(T, "the probe counted unsent", || {
        let done = unsent() >= 1;
        async move { done.then_some(()) }
    })
    .await
    .unwrap();
    assert!(!forgetful().connect().await.unwrap());
    assert_eq!(
        withheld(),
        16,
        "the connect after the probe was given a ticket"
    );
}

/// The ticket made at the end of a handshake goes out with the CONNACK; a
/// connection that ends before it never sends it, and that ticket does not
/// count against its certificate (`topics.md` §1): two handshakes dropped
/// before their CONNECT leave the next two connects their tickets.
#[tokio::test]
async fn a_ticket_never_sent_does_not_count_as_given() {
    let fleet = Fleet::start().await.unwrap();
    let withheld = || fleet.broker.metrics.get(|m| &m.tickets_withheld);
    let unsent = || fleet.broker.metrics.get(|m| &m.tickets_unsent);
    // svcA's CA trusted, by another device's connect.
    let other = certified(&fleet, "other", "svcA");
    connect_once_trusted(&resuming(&fleet, "other", other, &rustls::version::TLS13)).await;
    let (chain, key) = certified(&fleet, "dropper", "svcA");
    for n in 1..=2 {
        handshake_only(&fleet, &chain, &key).await;
        eventually(T, "the dropped connection's ticket counted unsent", || {
            let done = unsent() >= n;
            async move { done.then_some(()) }
        })
        .await
        .unwrap();
    }
    let forgetful = || {
        resuming(
            &fleet,
            "dropper",
            (chain.clone(), key.clone()),
            &rustls::version::TLS13,
        )
    };
    for n in 1..=2 {
        assert!(!forgetful().connect().await.unwrap());
        assert_eq!(withheld(), 0, "connect {n} was given no ticket");
    }
    assert!(!forgetful().connect().await.unwrap());
    assert_eq!(withheld(), 1, "two unused tickets, then none");
}

#[tokio::test]
async fn a_reconnecting_device_resumes_its_session_and_every_resumption_is_checked_again() {
    let fleet = Fleet::start().await.unwrap();
    let certs = fleet.certs_dir();
    let resumed = || fleet.broker.metrics.get(|m| &m.resumed);
    for (id, version) in [
        ("res13", &rustls::version::TLS13),
        ("res12", &rustls::version::TLS12),
    ] {
        let (chain, key) = certified(&fleet, id, "svcA");
        let serial = X509::from_pem(&chain)
            .unwrap()
            .serial_number()
            .to_bn()
            .unwrap();
        let device = resuming(&fleet, id, (chain.clone(), key.clone()), version);
        let first = connect_once_trusted(&device).await;
        assert!(!first, "{id}: a first connection cannot resume");
        let before = resumed();
        assert!(device.connect().await.unwrap(), "{id}: not resumed");
        assert!(device.connect().await.unwrap(), "{id}: resumed only once");
        assert_eq!(resumed(), before + 2);

        // The registry withdraws the grant: the ticket is not taken, and the
        // full handshake that follows is refused.
        grants::write_grants(certs, id, &[]).unwrap();
        assert!(
            device.connect().await.is_err(),
            "{id}: resumed without a grant"
        );
        assert_eq!(resumed(), before + 2);
        grants::write_grants(certs, id, &["svcA".to_owned()]).unwrap();
        device.connect().await.unwrap();
        assert!(
            device.connect().await.unwrap(),
            "{id}: not resumed once granted"
        );

        // The certificate is revoked while the device holds a ticket: once
        // a full handshake is refused, so is the ticket.
        assert!(device.connect().await.unwrap(), "{id}: not resumed");
        let revoked = fleet_pki::RevokedEntry {
            serial_hex: serial.to_hex_str().unwrap().to_lowercase(),
            revoked_at: fleet_protocol::now_ms() / 1000,
        };
        let crl_number = 1_000 + before;
        fleet
            .core()
            .pki
            .write_crl("svcA", 1, &[revoked], crl_number)
            .unwrap();
        let root = certs.join("root-ca.pem");
        eventually(T, "the revoked certificate to be refused", || {
            let (chain, key, root) = (chain.clone(), key.clone(), root.clone());
            let addr = fleet.service_addr();
            async move {
                Probe::mtls(addr, id, &root, chain, key)
                    .await
                    .is_err()
                    .then_some(())
            }
        })
        .await
        .unwrap();
        let at = resumed();
        assert!(device.connect().await.is_err(), "{id}: revoked, yet served");
        assert_eq!(resumed(), at, "{id}: a revoked certificate resumed");
        fleet
            .core()
            .pki
            .write_crl("svcA", 1, &[], crl_number + 1)
            .unwrap();
    }
    // No resumption by TLS 1.2 session id: the broker keeps no sessions.
    let (chain, key) = certified(&fleet, "res12id", "svcA");
    let mut device = resuming(&fleet, "res12id", (chain, key), &rustls::version::TLS12);
    let mut config = (*device.config).clone();
    config.resumption = rustls::client::Resumption::in_memory_sessions(8)
        .tls12_resumption(rustls::client::Tls12Resumption::SessionIdOnly);
    device.config = std::sync::Arc::new(config);
    assert!(!device.connect().await.unwrap());
    assert!(!device.connect().await.unwrap(), "resumed by session id");
}

#[tokio::test]
async fn a_certificate_that_expires_is_refused_from_then_on_though_it_connected_before() {
    let fleet = Fleet::start().await.unwrap();
    let (ca, ca_key) = fleet.core().pki.service_ca("svcA").unwrap();
    grants::add_grant(fleet.certs_dir(), "exp1", "svcA").unwrap();
    // Valid for 6 more seconds: connections before then verify its chain,
    // and later ones recall it, until it expires.
    let (chain, key) = forged_leaf_secs("exp1", "svcA", (&ca, &ca_key), (-60, 6));
    let expires = Instant::now() + Duration::from_secs(6);
    let device = resuming(&fleet, "exp1", (chain, key), &rustls::version::TLS13);
    connect_once_trusted(&device).await;
    device.connect().await.unwrap();
    // A new client each time: full handshakes, no ticket.
    let fresh = || {
        let mut config = (*device.config).clone();
        config.resumption = rustls::client::Resumption::disabled();
        Resuming {
            config: std::sync::Arc::new(config),
            ..device.clone()
        }
    };
    assert!(!fresh().connect().await.unwrap(), "a fresh client resumed");
    // Once svcA's CA is loaded (not only found on disk), its chain is
    // remembered: a full handshake does not verify it again.
    let recalled = || fleet.broker.metrics.get(|m| &m.chains_recalled);
    eventually(T, "the chain to be recalled", || {
        let (fresh, before) = (fresh(), recalled());
        async move {
            fresh.connect().await.ok()?;
            (recalled() > before).then_some(())
        }
    })
    .await
    .unwrap();
    eventually(T, "the expired certificate to be refused", || {
        let (fresh, device) = (fresh(), device.clone());
        async move {
            let (full, resumed) = (fresh.connect().await, device.connect().await);
            (full.is_err() && resumed.is_err()).then_some(())
        }
    })
    .await
    .unwrap();
    // notAfter is in whole seconds, and the broker looks at its clock in
    // whole seconds.
    let refused_at = Instant::now();
    assert!(
        refused_at + Duration::from_secs(1) >= expires,
        "refused too early"
    );
    assert!(
        refused_at <= expires + Duration::from_secs(3),
        "served {:?} after it expired",
        refused_at - expires
    );
}

#[tokio::test]
async fn the_live_session_of_a_certificate_that_expires_is_cut() {
    let fleet = Fleet::start().await.unwrap();
    let (ca, ca_key) = fleet.core().pki.service_ca("svcA").unwrap();
    grants::add_grant(fleet.certs_dir(), "exp2", "svcA").unwrap();
    grants::add_grant(fleet.certs_dir(), "exp3", "svcA").unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    // exp2's certificate is valid through the second 5 s from now; exp3's
    // for a day. notAfter is in whole seconds.
    let not_after = fleet_protocol::now_ms() / 1000 + 5;
    let (chain, key) = forged_leaf_secs("exp2", "svcA", (&ca, &ca_key), (-60, 5));
    let (long_chain, long_key) = forged_leaf_secs("exp3", "svcA", (&ca, &ca_key), (-60, 86_400));
    let expiring = eventually(T, "svcA's CA to be trusted", || {
        let (chain, key, root) = (chain.clone(), key.clone(), root.clone());
        let addr = fleet.service_addr();
        async move { Probe5::mtls(addr, "exp2", &root, chain, key).await.ok() }
    })
    .await
    .unwrap();
    let lasting = Probe5::mtls(fleet.service_addr(), "exp3", &root, long_chain, long_key)
        .await
        .unwrap();
    let expired_at = std::time::UNIX_EPOCH + Duration::from_secs(not_after + 1);
    let reason = expiring.wait_cut(T).await.unwrap();
    let now = std::time::SystemTime::now();
    assert!(
        now + Duration::from_millis(50) >= expired_at,
        "cut {:?} before its certificate expired",
        expired_at.duration_since(now).unwrap_or_default()
    );
    let late = now.duration_since(expired_at).unwrap_or_default();
    println!("session of an expired certificate cut {late:?} after it expired");
    assert!(
        late < Duration::from_secs(3),
        "cut {late:?} after it expired"
    );
    assert_eq!(
        reason,
        Some(rumqttc::v5::mqttbytes::v5::DisconnectReasonCode::AdministrativeAction)
    );
    assert!(!lasting.is_cut(), "a certificate still valid was cut");
    assert_eq!(fleet.broker.metrics.get(|m| &m.expired_cuts), 1);
    assert_eq!(fleet.broker.metrics.get(|m| &m.revoked_cuts), 0);
}

#[tokio::test]
async fn a_simulated_device_resumes_its_tls_session_when_it_reconnects() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "sim1", "svcA").await.unwrap();
    devices.spawn(devices.config(&fleet, "sim1", KeyMode::Csr));
    let connects = || {
        devices
            .events_of("sim1")
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Connected { .. }))
            .count()
    };
    eventually(T, "sim1 connected", || {
        let n = connects();
        async move { (n >= 1).then_some(()) }
    })
    .await
    .unwrap();
    let resumed = || fleet.broker.metrics.get(|m| &m.resumed);
    let (before, connected) = (resumed(), connects());
    // Its certificate connects from elsewhere and takes the session over;
    // the device connects again, with the ticket its last connection got.
    let creds = devices
        .store("sim1")
        .unwrap()
        .service_credentials("svcA")
        .unwrap()
        .unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let _taker = Probe::mtls(
        fleet.service_addr(),
        "sim1",
        &root,
        creds.chain_pem,
        creds.key_pem,
    )
    .await
    .unwrap();
    eventually(T, "sim1 connected again", || {
        let n = connects();
        async move { (n > connected).then_some(()) }
    })
    .await
    .unwrap();
    assert!(
        resumed() > before,
        "the device's reconnect was a full handshake"
    );
    // Moved to svcB, it connects with its new certificate: a full
    // handshake, in the new tenant (a ticket of the old one would land it
    // in svcA).
    let before = resumed();
    fleet.change(&["sim1"], "svcB").await.unwrap();
    devices
        .wait_event(
            "sim1",
            T,
            "connected to svcB",
            |e| matches!(e, DeviceEvent::Connected { service_id } if service_id == "svcB"),
        )
        .await
        .unwrap();
    assert_eq!(
        resumed(),
        before,
        "the new certificate's first connect resumed"
    );
}

/// Clients that connect to the bootstrap listeners and idle there hold at
/// most `max_bootstrap_connections`: a certified device still connects to
/// the service listener, and the manager's listener has slots of its own
/// even when the device listeners are full.
#[tokio::test]
async fn idle_bootstrap_clients_leave_room_for_devices_and_the_manager() {
    let fleet = Fleet::start_tuned(
        |b| {
            b.max_connections = 12;
            b.max_bootstrap_connections = 6;
        },
        |_| {},
    )
    .await
    .unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let mut idle = Vec::new();
    let mut refused = 0;
    for i in 0..10 {
        let addr = if i % 2 == 0 {
            fleet.broker.bootstrap_plain_addr.unwrap()
        } else {
            fleet.broker.bootstrap_tls_addr.unwrap()
        };
        let id = format!("idle{i}");
        let probe = if i % 2 == 0 {
            Probe::plain(addr, &id).await
        } else {
            Probe::tls(addr, &id, &root).await
        };
        match probe {
            Ok(p) => idle.push(p),
            Err(_) => refused += 1,
        }
    }
    assert_eq!(
        (idle.len(), refused),
        (6, 4),
        "bootstrap clients held, refused"
    );
    assert!(fleet.broker.metrics.get(|m| &m.over_capacity) >= 4);
    // The service listener has the rest of max_connections.
    let mut devices = Vec::new();
    for i in 0..6 {
        let id = format!("svc{i}");
        let (chain, key) = certified(&fleet, &id, "svcA");
        let device = Probe::mtls(fleet.service_addr(), &id, &root, chain, key).await;
        devices.push(device.unwrap_or_else(|e| panic!("{id} kept out: {e}")));
    }
    // Every device slot is taken now; the manager's listener is apart.
    let (chain, key) = certified(&fleet, "svc6", "svcA");
    assert!(Probe::mtls(fleet.service_addr(), "svc6", &root, chain, key)
        .await
        .is_err());
    let manager = fleet.privileged("operator-probe").await;
    assert!(
        manager.is_ok(),
        "the internal listener is full: {:?}",
        manager.err()
    );
    // A slot given back is taken again.
    drop(idle.pop());
    let addr = fleet.broker.bootstrap_plain_addr.unwrap();
    eventually(T, "a bootstrap slot to come free", || async move {
        Probe::plain(addr, "later").await.ok()
    })
    .await
    .unwrap();
}

/// A connection other than the manager's holds at most 1,000 filters (the
/// router keeps each, with its log, while anyone subscribes to it): a
/// provider's 1,001st is refused, one it holds may be asked for again, and
/// one it leaves makes room.
#[tokio::test]
async fn a_provider_holds_at_most_a_thousand_filters() {
    let fleet = Fleet::start().await.unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let (_, _, chain, key) = provider_add(&fleet, "many", "svcA").await;
    let provider = Probe::mtls(fleet.service_addr(), "provider.many", &root, chain, key)
        .await
        .unwrap();
    let filter = |i: usize| format!("/tenants/svcA/telemetry/d{i}");
    for i in 0..1_000 {
        let got = codes(&provider, &filter(i)).await;
        assert!(
            !got.contains(&SubscribeReasonCode::Failure),
            "filter {i}: {got:?}"
        );
    }
    assert_eq!(
        codes(&provider, &filter(1_000)).await,
        [SubscribeReasonCode::Failure]
    );
    assert!(!codes(&provider, &filter(0))
        .await
        .contains(&SubscribeReasonCode::Failure));
    provider.client.unsubscribe(filter(1)).await.unwrap();
    eventually(T, "room for one more filter", || async {
        let got = codes(&provider, &filter(1_000)).await;
        (!got.contains(&SubscribeReasonCode::Failure)).then_some(())
    })
    .await
    .unwrap();
}

/// A session the router keeps past its connection (clean session off)
/// comes back with its filters, and they count towards the 1,000 again: a
/// provider cannot add a thousand more with every reconnect.
#[tokio::test]
async fn a_kept_session_counts_its_filters_when_it_comes_back() {
    let fleet = Fleet::start().await.unwrap();
    let root = std::fs::read(fleet.certs_dir().join("root-ca.pem")).unwrap();
    let (_, _, chain, key) = provider_add(&fleet, "keeps", "svcA").await;
    let addr = fleet.service_addr();
    let options = || {
        let mut o = rumqttc::MqttOptions::new("provider.keeps", "localhost", addr.port());
        o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Simple {
            ca: root.clone(),
            alpn: None,
            client_auth: Some((chain.clone(), key.clone())),
        }));
        o.set_clean_session(false);
        o
    };
    let live_before = fleet.broker.metrics.get(|m| &m.live);
    let first = Probe::connect(options()).await.unwrap();
    for batch in 0..10 {
        let before = first.subacks.lock().unwrap().len();
        let filters = (0..100).map(|i| {
            rumqttc::SubscribeFilter::new(
                format!("/tenants/svcA/telemetry/d{}", batch * 100 + i),
                rumqttc::QoS::AtLeastOnce,
            )
        });
        first.client.subscribe_many(filters).await.unwrap();
        let codes = eventually(T, "the SUBACK", || {
            let acks = first.subacks.lock().unwrap().clone();
            async move { (acks.len() > before).then(|| acks.last().cloned().unwrap()) }
        })
        .await
        .unwrap();
        assert!(
            !codes.contains(&SubscribeReasonCode::Failure),
            "batch {batch}"
        );
    }
    first.client.disconnect().await.unwrap();
    drop(first);
    eventually(T, "the first connection to end", || {
        let live = fleet.broker.metrics.get(|m| &m.live);
        async move { (live <= live_before).then_some(()) }
    })
    .await
    .unwrap();
    let second = Probe::connect(options()).await.unwrap();
    assert_eq!(
        codes(&second, "/tenants/svcA/telemetry/d5000").await,
        [SubscribeReasonCode::Failure]
    );
    assert!(!codes(&second, "/tenants/svcA/telemetry/d7")
        .await
        .contains(&SubscribeReasonCode::Failure));
    // The same when a newer connection takes the session over from a live
    // one: the filters come with it.
    let third = Probe::connect(options()).await.unwrap();
    second
        .wait_cut(T, "the second connection to be taken over")
        .await
        .unwrap();
    assert_eq!(
        codes(&third, "/tenants/svcA/telemetry/d5001").await,
        [SubscribeReasonCode::Failure]
    );
}

/// Silent connections cannot keep the manager out of the internal
/// listener: when its slots are full, the oldest connection that has not
/// authenticated is closed and the new one takes its slot. Full of
/// authenticated ones, it refuses the next.
#[tokio::test]
async fn silent_connections_keep_no_manager_out_of_the_internal_listener() {
    let fleet = Fleet::start_tuned(
        |b| {
            b.max_internal_connections = 4;
            // Silent connections would hold their slots for the whole test.
            b.connect_timeout_ms = 120_000;
        },
        |_| {},
    )
    .await
    .unwrap();
    let mut silent = Vec::new();
    for _ in 0..10 {
        silent.push(
            tokio::net::TcpStream::connect(fleet.broker.internal_addr)
                .await
                .unwrap(),
        );
    }
    // Every slot but the manager's is held by a connection that said nothing.
    eventually(T, "the silent connections to take the slots", || {
        let live = fleet.broker.metrics.get(|m| &m.live);
        async move { (live >= 4).then_some(()) }
    })
    .await
    .unwrap();
    // As the manager does, a client refused tries again.
    let first = eventually(T, "the manager's credentials to get in", || async {
        fleet.privileged("operator-probe").await.ok()
    })
    .await
    .unwrap();
    // Once every slot is held by an authenticated connection (the
    // manager's among them), one more is refused: it takes no slot of the
    // device listeners either.
    let mut held = vec![first];
    for n in 0..10 {
        match fleet.privileged(&format!("operator-{n}")).await {
            Ok(probe) => held.push(probe),
            Err(_) => break,
        }
    }
    assert_eq!(held.len(), 3, "connections beside the manager's");
    assert!(fleet.broker.metrics.get(|m| &m.over_capacity) >= 1);
}

#[tokio::test]
async fn the_broker_certificate_names_the_hosts_devices_reach_it_by() {
    use fleet_testkit::server_name_served;
    // The broker starts on the PKI's first certificate (local names only);
    // the manager issues it again for its server names, and both TLS
    // listeners take it up while they run.
    let mut fleet = Fleet::start_with(|c| {
        c.server_names = Some(vec!["Fleet.Test".into(), "10.9.8.7".into()]);
    })
    .await
    .unwrap();
    let root = std::fs::read(fleet.certs_dir().join("root-ca.pem")).unwrap();
    let listeners = [
        ("bootstrap", fleet.broker.bootstrap_tls_addr.unwrap()),
        ("service", fleet.service_addr()),
    ];
    let served = |addr, name: &'static str| {
        let root = root.clone();
        async move { server_name_served(addr, &root, name).await.unwrap() }
    };
    for (listener, addr) in listeners {
        for name in ["fleet.test", "10.9.8.7", "localhost", "127.0.0.1", "::1"] {
            eventually(
                T,
                &format!("{listener} listener served as {name}"),
                || async move { served(addr, name).await.then_some(()) },
            )
            .await
            .unwrap();
        }
        for name in ["other.test", "test", "10.9.8.8"] {
            assert!(
                !served(addr, name).await,
                "{listener} listener served as {name}"
            );
        }
    }
    let (cert, root_file) = (
        fleet.certs_dir().join("broker.pem"),
        fleet.certs_dir().join("root-ca.pem"),
    );
    let verify = |name: &str| {
        std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(&root_file)
            .args(["-verify_hostname", name])
            .arg(&cert)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(verify("fleet.test") && !verify("other.test"));

    // Devices that reach it as localhost still activate and connect.
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "named1", "svcA").await.unwrap();
    devices.spawn(devices.config(&fleet, "named1", KeyMode::Csr));
    devices.wait_connected("named1", T).await.unwrap();

    // Another name in place of the first: the first is no longer served.
    fleet.config.server_names = Some(vec!["other.test".into()]);
    fleet.restart_manager().await.unwrap();
    for (listener, addr) in listeners {
        eventually(
            T,
            &format!("{listener} listener served as other.test"),
            || async move { served(addr, "other.test").await.then_some(()) },
        )
        .await
        .unwrap();
        assert!(
            !served(addr, "fleet.test").await,
            "{listener}: the old name stayed"
        );
        assert!(
            !served(addr, "10.9.8.7").await,
            "{listener}: the old address stayed"
        );
        assert!(served(addr, "localhost").await, "{listener}");
    }
    // A bad name stops the manager at start, saying which.
    fleet.stop_manager().await;
    fleet.config.server_names = Some(vec!["other test".into()]);
    let err = fleet.start_manager().await.unwrap_err();
    assert!(format!("{err:#}").contains("server_names"), "{err:#}");
    assert!(
        verify("other.test"),
        "the certificate was changed by a refused start"
    );
}

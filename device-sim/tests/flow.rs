//! One simulated device against the fleetshift broker (plain bootstrap
//! listener, mutual-TLS service listener) and a manager played by the test:
//! activation, certificate, service session, a forged notice, a real
//! service change, a replayed notice. The real manager's end-to-end tests
//! live in the test kit; this checks the device side on its own.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_device_sim::{provision, run_device, DeviceConfig, DeviceEvent, Endpoint, KeyMode};
use fleet_protocol::crypto;
use fleet_protocol::{
    ActivateRequest, Envelope, Kind, Reply, RequestKind, Route, ServiceChange, StatusReport, Topic,
    UpdateRequest,
};
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{HasPublic, PKey, PKeyRef, Private};
use openssl::x509::extension::{BasicConstraints, SubjectAlternativeName};
use openssl::x509::{X509NameBuilder, X509Req, X509};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_bytes::ByteBuf;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

fn cert<T: HasPublic>(
    cn: &str,
    org: Option<&str>,
    key: &PKeyRef<T>,
    issuer: Option<(&X509, &PKey<Private>)>,
    signer: &PKey<Private>,
    ca: bool,
) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    if let Some(o) = org {
        name.append_entry_by_text("O", o).unwrap();
    }
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(127, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map_or(&*name, |(c, _)| c.subject_name()))
        .unwrap();
    b.set_pubkey(key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(2).unwrap())
        .unwrap();
    if ca {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
    } else {
        let san = SubjectAlternativeName::new()
            .dns(cn)
            .build(&b.x509v3_context(issuer.map(|(c, _)| &**c), None))
            .unwrap();
        b.append_extension(san).unwrap();
    }
    b.sign(issuer.map_or(signer, |(_, k)| k), MessageDigest::sha256())
        .unwrap();
    b.build()
}

/// Root CA, one CA per service, the manager signing key and the broker certificate.
struct Pki {
    root: X509,
    root_key: PKey<Private>,
    services: Mutex<HashMap<String, (X509, PKey<Private>)>>,
    manager: PKey<Private>,
    dir: std::path::PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let root_key = crypto::generate_p256().unwrap();
        let root = cert("test root", None, &root_key, None, &root_key, true);
        let broker_key = crypto::generate_p256().unwrap();
        let broker = cert(
            "localhost",
            None,
            &broker_key,
            Some((&root, &root_key)),
            &root_key,
            false,
        );
        let manager = crypto::generate_p256().unwrap();
        std::fs::write(dir.join("root-ca.pem"), root.to_pem().unwrap()).unwrap();
        std::fs::write(dir.join("broker.pem"), broker.to_pem().unwrap()).unwrap();
        std::fs::write(
            dir.join("broker.key"),
            broker_key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        std::fs::write(
            dir.join("manager-sign.pub.pem"),
            manager.public_key_to_pem().unwrap(),
        )
        .unwrap();
        Pki {
            root,
            root_key,
            services: Mutex::new(HashMap::new()),
            manager,
            dir: dir.to_path_buf(),
        }
    }

    /// Device certificate (CN = device, O = service, the rumqttd tenant) and
    /// its service CA, written to `services/` on first use, with the
    /// registry's grant of that service at the broker, as the manager
    /// writes them.
    fn issue<T: HasPublic>(&self, device: &str, service: &str, key: &PKeyRef<T>) -> Vec<X509> {
        fleet_pki::grants::add_grant(&self.dir, device, service).unwrap();
        let mut services = self.services.lock().unwrap();
        let (ca, ca_key) = services.entry(service.to_owned()).or_insert_with(|| {
            let k = crypto::generate_p256().unwrap();
            let c = cert(
                &format!("{service} CA"),
                Some(service),
                &k,
                Some((&self.root, &self.root_key)),
                &k,
                true,
            );
            // Where the fleet's PKI keeps it, and the broker trusts it.
            let services = self.dir.join("services");
            std::fs::create_dir_all(&services).unwrap();
            std::fs::write(
                services.join(format!("{service}-ca.pem")),
                c.to_pem().unwrap(),
            )
            .unwrap();
            (c, k)
        });
        let leaf = cert(
            device,
            Some(service),
            key,
            Some((ca, ca_key)),
            ca_key,
            false,
        );
        vec![leaf, ca.clone()]
    }

    fn sign<T: serde::Serialize>(&self, kind: Kind, body: &T) -> Vec<u8> {
        Envelope::build(kind, body, |tbs| crypto::sign(&self.manager, tbs))
            .unwrap()
            .encode()
    }
}

/// The fleetshift broker on ephemeral ports: plain bootstrap, mutual-TLS
/// service listener, and the internal listener the test's manager uses.
fn start_broker(certs: &Path) -> fleet_broker::RunningBroker {
    let any = || Some("127.0.0.1:0".parse().unwrap());
    fleet_broker::start(&fleet_broker::BrokerConfig {
        internal_listen: "127.0.0.1:0".parse().unwrap(),
        bootstrap_plain_listen: any(),
        bootstrap_tls_listen: None,
        service_listen: any(),
        certs_dir: certs.to_path_buf(),
        ..Default::default()
    })
    .expect("broker starts")
}

/// What the fake manager saw.
#[derive(Default)]
struct Seen {
    /// Encoded activate requests, in arrival order.
    activates: Vec<Vec<u8>>,
    /// (tenant, event, change_id)
    statuses: Vec<(Option<String>, String, Option<String>)>,
    updates: Vec<(Option<String>, String, bool)>,
}

async fn run_manager(
    pki: Arc<Pki>,
    broker: &fleet_broker::RunningBroker,
    factory: Vec<u8>,
    seen: Arc<Mutex<Seen>>,
) -> AsyncClient {
    let addr = broker.internal_addr;
    let mut opts = MqttOptions::new("manager", addr.ip().to_string(), addr.port());
    let (user, secret) = &broker.manager_credentials;
    opts.set_credentials(user, secret);
    opts.set_max_packet_size(64 * 1024, 64 * 1024);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    for filter in fleet_protocol::topic::manager_filters() {
        client.subscribe(filter, QoS::AtLeastOnce).await.unwrap();
    }
    let factory = crypto::public_from_point(&factory).unwrap();
    let (ready_tx, mut ready_rx) = mpsc::channel(1);
    let replier = client.clone();
    tokio::spawn(async move {
        let mut uuid: Option<Vec<u8>> = None;
        let mut seq = 0u64;
        let mut subacks = 0;
        loop {
            let publish = match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => p,
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subacks += 1;
                    if subacks == 2 {
                        let _ = ready_tx.send(()).await;
                    }
                    continue;
                }
                Ok(_) => continue,
                Err(e) => panic!("manager connection: {e}"),
            };
            let topic = Topic::parse(&publish.topic).unwrap();
            let Route::Request(kind, device) = topic.route.clone() else {
                continue;
            };
            let env = Envelope::decode(&publish.payload).unwrap();
            assert!(env.crc_ok());
            seq += 1;
            let mut reply = Reply {
                device_id: device.clone(),
                seq,
                ..Reply::default()
            };
            match kind {
                RequestKind::Activate => {
                    let count = {
                        let mut s = seen.lock().unwrap();
                        s.activates.push(publish.payload.to_vec());
                        s.activates.len()
                    };
                    // Drop the first request: the device must publish the same bytes again.
                    if count == 1 {
                        continue;
                    }
                    assert!(crypto::verify(&factory, &env.tbs(), &env.auth));
                    let body: ActivateRequest = env.body().unwrap();
                    let id = uuid.get_or_insert_with(|| crypto::random_bytes(16)).clone();
                    reply.nonce = body.nonce;
                    reply.service_id = Some("svcA".into());
                    reply.uuid = Some(crypto::seal(&body.eph, &device, &id).unwrap());
                }
                RequestKind::Update => {
                    assert!(crypto::hmac_matches(
                        uuid.as_ref().unwrap(),
                        &env.tbs(),
                        &env.auth
                    ));
                    let body: UpdateRequest = env.body().unwrap();
                    reply.nonce = body.nonce.clone();
                    reply.service_id = Some(body.service_id.clone());
                    let chain = match &body.csr {
                        Some(csr) => {
                            let csr = X509Req::from_der(csr).unwrap();
                            pki.issue(&device, &body.service_id, &csr.public_key().unwrap())
                        }
                        None => {
                            let key = crypto::generate_p256().unwrap();
                            let der = key.private_key_to_pkcs8().unwrap();
                            reply.key = Some(crypto::seal(&body.eph, &device, &der).unwrap());
                            pki.issue(&device, &body.service_id, &key)
                        }
                    };
                    reply.chain = Some(
                        chain
                            .iter()
                            .map(|c| ByteBuf::from(c.to_der().unwrap()))
                            .collect(),
                    );
                    seen.lock().unwrap().updates.push((
                        topic.tenant.clone(),
                        body.service_id,
                        body.csr.is_some(),
                    ));
                }
                RequestKind::Poll => {
                    assert!(crypto::hmac_matches(
                        uuid.as_ref().unwrap(),
                        &env.tbs(),
                        &env.auth
                    ));
                    let body: fleet_protocol::PollRequest = env.body().unwrap();
                    reply.nonce = body.nonce;
                }
                RequestKind::Status => {
                    assert!(crypto::hmac_matches(
                        uuid.as_ref().unwrap(),
                        &env.tbs(),
                        &env.auth
                    ));
                    let body: StatusReport = env.body().unwrap();
                    reply.nonce = body.nonce;
                    seen.lock().unwrap().statuses.push((
                        topic.tenant.clone(),
                        body.event,
                        body.change_id,
                    ));
                }
            }
            let bytes = pki.sign(Kind::from(kind).reply().unwrap(), &reply);
            let reply_topic = topic.reply_topic().unwrap().to_string();
            replier
                .publish(reply_topic, QoS::AtLeastOnce, false, bytes)
                .await
                .unwrap();
        }
    });
    tokio::time::timeout(WAIT, ready_rx.recv()).await.unwrap();
    client
}

async fn expect(
    rx: &mut mpsc::UnboundedReceiver<(String, DeviceEvent)>,
    what: &str,
    mut pred: impl FnMut(&DeviceEvent) -> bool,
) -> DeviceEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, event) = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
            .expect("event channel closed");
        if pred(&event) {
            return event;
        }
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn full_flow(key_mode: KeyMode) {
    let certs = tempfile::tempdir().unwrap();
    let store = tempfile::tempdir().unwrap();
    let pki = Arc::new(Pki::new(certs.path()));
    let broker = start_broker(certs.path());
    let plain = broker.bootstrap_plain_addr.unwrap().port();
    let tls = broker.service_addr.unwrap().port();
    let factory = provision(store.path(), "dev1").unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let manager = run_manager(pki.clone(), &broker, factory, seen.clone()).await;

    let cfg = DeviceConfig {
        device_id: "dev1".into(),
        store_root: store.path().to_owned(),
        bootstrap: Endpoint::new("127.0.0.1", plain),
        bootstrap_tls: false,
        service: Endpoint::new("localhost", tls),
        root_ca_pem: certs.path().join("root-ca.pem"),
        manager_pub_pem: certs.path().join("manager-sign.pub.pem"),
        key_mode,
        telemetry_interval: Duration::from_millis(200),
        request_timeout: Duration::from_secs(1),
        renew_window: fleet_device_sim::RENEW_WINDOW,
        unknown_ca_patience: fleet_device_sim::UNKNOWN_CA_PATIENCE,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let shutdown = CancellationToken::new();
    let device = tokio::spawn(run_device(cfg, tx, shutdown.clone()));

    expect(
        &mut rx,
        "activation",
        |e| matches!(e, DeviceEvent::Activated { service_id } if service_id == "svcA"),
    )
    .await;
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.activates.len(), 2);
        assert_eq!(
            s.activates[0], s.activates[1],
            "a retry re-publishes the identical bytes"
        );
    }
    expect(&mut rx, "certificate", |e| matches!(e, DeviceEvent::CertificateInstalled { service_id, .. } if service_id == "svcA")).await;
    expect(
        &mut rx,
        "connected",
        |e| matches!(e, DeviceEvent::Connected { service_id } if service_id == "svcA"),
    )
    .await;
    expect(
        &mut rx,
        "telemetry",
        |e| matches!(e, DeviceEvent::Telemetry { service_id, .. } if service_id == "svcA"),
    )
    .await;
    eventually("online status", || {
        seen.lock()
            .unwrap()
            .statuses
            .iter()
            .any(|(t, e, _)| t.as_deref() == Some("svcA") && e == "online")
    })
    .await;
    assert_eq!(
        seen.lock().unwrap().updates[0],
        (None, "svcA".to_string(), key_mode == KeyMode::Csr),
        "first update over bootstrap"
    );

    // A notice signed by someone else is ignored and reported.
    let notice = ServiceChange {
        device_id: "dev1".into(),
        seq: 100,
        change_id: "chg1".into(),
        service_id: "svcB".into(),
        provider: None,
        application: None,
        endpoint: None,
        ts: fleet_protocol::now_ms(),
    };
    let forged = Envelope::build(Kind::ServiceChange, &notice, |tbs| {
        crypto::sign(&crypto::generate_p256().unwrap(), tbs)
    })
    .unwrap()
    .encode();
    let notice_topic =
        |svc: &str| Topic::in_tenant(svc, Route::ServiceChange("dev1".into())).to_string();
    manager
        .publish(notice_topic("svcA"), QoS::AtLeastOnce, false, forged)
        .await
        .unwrap();
    expect(&mut rx, "forged notice rejected", |e| {
        matches!(e, DeviceEvent::NoticeRejected { .. })
    })
    .await;
    eventually("notice_rejected status", || {
        seen.lock()
            .unwrap()
            .statuses
            .iter()
            .any(|(_, e, _)| e == "notice_rejected")
    })
    .await;

    // The real notice moves the device to svcB.
    let genuine = pki.sign(Kind::ServiceChange, &notice);
    manager
        .publish(
            notice_topic("svcA"),
            QoS::AtLeastOnce,
            false,
            genuine.clone(),
        )
        .await
        .unwrap();
    expect(&mut rx, "svcB certificate", |e| matches!(e, DeviceEvent::CertificateInstalled { service_id, .. } if service_id == "svcB")).await;
    expect(
        &mut rx,
        "svcB connected",
        |e| matches!(e, DeviceEvent::Connected { service_id } if service_id == "svcB"),
    )
    .await;
    let accepted = expect(&mut rx, "change accepted", |e| {
        matches!(e, DeviceEvent::ChangeAccepted { .. })
    })
    .await;
    assert_eq!(
        accepted,
        DeviceEvent::ChangeAccepted {
            change_id: "chg1".into(),
            service_id: "svcB".into()
        }
    );
    expect(
        &mut rx,
        "svcB telemetry",
        |e| matches!(e, DeviceEvent::Telemetry { service_id, .. } if service_id == "svcB"),
    )
    .await;
    eventually("change_applied status in svcB", || {
        seen.lock().unwrap().statuses.iter().any(|(t, e, c)| {
            t.as_deref() == Some("svcB") && e == "change_applied" && c.as_deref() == Some("chg1")
        })
    })
    .await;
    assert!(
        seen.lock().unwrap().updates.contains(&(
            Some("svcA".into()),
            "svcB".into(),
            key_mode == KeyMode::Csr
        )),
        "re-key for svcB goes through the old tenant"
    );

    // A copy of the accepted notice (the manager re-sends pending notices)
    // is ignored quietly; an older genuine notice is a replay, rejected.
    manager
        .publish(notice_topic("svcB"), QoS::AtLeastOnce, false, genuine)
        .await
        .unwrap();
    let older = pki.sign(
        Kind::ServiceChange,
        &ServiceChange {
            seq: 99,
            change_id: "chg0".into(),
            service_id: "svcC".into(),
            ..notice.clone()
        },
    );
    manager
        .publish(notice_topic("svcB"), QoS::AtLeastOnce, false, older)
        .await
        .unwrap();
    let rejected = expect(&mut rx, "replay rejected", |e| {
        matches!(e, DeviceEvent::NoticeRejected { .. })
    })
    .await;
    // Events come in order: had the copy been rejected, this would be its
    // rejection (seq 100), not the older notice's.
    assert!(format!("{rejected:?}").contains("99"), "{rejected:?}");

    shutdown.cancel();
    tokio::time::timeout(WAIT, device)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // The store remembers everything across a restart.
    let st = std::fs::read(store.path().join("dev1/state.cbor")).unwrap();
    let st: serde_cbor::Value = serde_cbor::from_slice(&st).unwrap();
    let text = format!("{st:?}");
    assert!(text.contains("svcB") && text.contains("100"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csr_mode_full_flow() {
    full_flow(KeyMode::Csr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_key_mode_full_flow() {
    full_flow(KeyMode::ManagerGenerated).await;
}

#[tokio::test]
async fn unprovisioned_device_fails_at_load() {
    let store = tempfile::tempdir().unwrap();
    let cfg = DeviceConfig {
        device_id: "ghost".into(),
        store_root: store.path().to_owned(),
        bootstrap: Endpoint::new("127.0.0.1", 1),
        bootstrap_tls: false,
        service: Endpoint::new("localhost", 1),
        root_ca_pem: store.path().join("root-ca.pem"),
        manager_pub_pem: store.path().join("manager-sign.pub.pem"),
        key_mode: KeyMode::Csr,
        telemetry_interval: Duration::from_secs(1),
        request_timeout: Duration::from_secs(1),
        renew_window: fleet_device_sim::RENEW_WINDOW,
        unknown_ca_patience: fleet_device_sim::UNKNOWN_CA_PATIENCE,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let res = run_device(cfg, tx, CancellationToken::new()).await;
    assert!(res.is_err());
    let (id, event) = rx.recv().await.unwrap();
    assert_eq!(id, "ghost");
    assert!(
        matches!(event, DeviceEvent::Failed { ref stage, status: None, .. } if stage == "load"),
        "{event:?}"
    );
}

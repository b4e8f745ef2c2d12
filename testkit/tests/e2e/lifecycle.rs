//! One device moves A -> B -> C through the real broker, in both key modes.

use std::time::Duration;

use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_manager::store::CertStatus;
use fleet_protocol::crypto;
use fleet_protocol::{Envelope, Kind, Route, ServiceChange, Topic};
use fleet_testkit::{openssl_verify, write_file, Devices, Fleet, Probe};
use openssl::nid::Nid;
use openssl::x509::X509;

const T: Duration = Duration::from_secs(30);

fn telemetry(service: &str, device: &str) -> String {
    Topic::in_tenant(service, Route::Telemetry(device.into())).to_string()
}

async fn wait_telemetry(observer: &Probe, service: &str, device: &str) {
    observer
        .wait_for(&telemetry(service, device), 1, T)
        .await
        .unwrap_or_else(|e| panic!("telemetry on {service}: {e}"));
}

fn subject(cert: &X509, nid: Nid) -> String {
    cert.subject_name()
        .entries_by_nid(nid)
        .next()
        .map(|e| e.data().to_string().unwrap())
        .unwrap_or_default()
}

/// The serials of the certificates `device` installed, each for svcA,
/// in order, spelled as the manager writes them.
fn installed_in_svca(devices: &Devices, device: &str) -> Vec<String> {
    devices
        .events_of(device)
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::CertificateInstalled {
                service_id,
                serial_hex,
            } => {
                assert_eq!(service_id, "svcA");
                Some(serial_hex.to_ascii_lowercase())
            }
            _ => None,
        })
        .collect()
}

/// A renewal window that has a device renew `secs` after its certificate
/// was issued, under `cert_lifetime_days = 1` (notBefore 300 s back).
fn renews_after(secs: f64) -> (f64, f64) {
    let at = (300.0 + secs) / (86_400.0 + 300.0);
    (at, at)
}

async fn moves_a_b_c(key_mode: KeyMode) {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "dev1", "svcA").await.unwrap();
    let observer = fleet.privileged("observer").await.unwrap();
    observer.subscribe("/tenants/+/telemetry/+").await.unwrap();
    let task = devices.spawn(devices.config(&fleet, "dev1", key_mode));

    devices
        .wait_event(
            "dev1",
            T,
            "connected to svcA",
            |e| matches!(e, DeviceEvent::Connected { service_id } if service_id == "svcA"),
        )
        .await
        .unwrap();
    wait_telemetry(&observer, "svcA", "dev1").await;

    // A forged notice from another client is ignored and changes nothing.
    let before = fleet.snapshot();
    let attacker = fleet.privileged("attacker").await.unwrap();
    let forged = ServiceChange {
        device_id: "dev1".into(),
        seq: u64::MAX / 2,
        change_id: "forged".into(),
        service_id: "evil".into(),
        provider: None,
        application: None,
        endpoint: None,
        ts: fleet_protocol::now_ms(),
    };
    let attacker_key = crypto::generate_p256().unwrap();
    let env = Envelope::build(Kind::ServiceChange, &forged, |tbs| {
        crypto::sign(&attacker_key, tbs)
    })
    .unwrap();
    for topic in [
        Topic::in_tenant("svcA", Route::ServiceChange("dev1".into())),
        Topic::bootstrap(Route::ServiceChange("dev1".into())),
    ] {
        attacker
            .publish(&topic.to_string(), env.encode())
            .await
            .unwrap();
    }
    devices
        .wait_event("dev1", T, "forged notice rejected", |e| {
            matches!(e, DeviceEvent::NoticeRejected { .. })
        })
        .await
        .unwrap();
    assert!(
        fleet.snapshot() == before,
        "a forged notice changed the store"
    );
    assert_eq!(
        devices.store("dev1").unwrap().state().service_id.as_deref(),
        Some("svcA")
    );

    for (n, service) in ["svcB", "svcC"].into_iter().enumerate() {
        fleet.change(&["dev1"], service).await.unwrap();
        devices
            .wait_event("dev1", T, &format!("change to {service}"), |e| {
                matches!(e, DeviceEvent::ChangeAccepted { service_id, .. } if service_id == service)
            })
            .await
            .unwrap();
        wait_telemetry(&observer, service, "dev1").await;
        let accepted = devices
            .events_of("dev1")
            .iter()
            .filter(|e| matches!(e, DeviceEvent::ChangeAccepted { .. }))
            .count();
        assert_eq!(accepted, n + 1);
    }

    // History: three periods, the first two closed by the service changes.
    let core = fleet.core();
    let history: Vec<_> = core
        .store
        .history("dev1")
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect();
    let services: Vec<_> = history.iter().map(|p| p.service_id.as_str()).collect();
    assert_eq!(services, ["svcA", "svcB", "svcC"]);
    for (i, p) in history.iter().enumerate() {
        assert!(
            p.confirmed_ms.is_some(),
            "period {i} confirmed by the device"
        );
        if i < 2 {
            let ended = p.ended_ms.expect("older periods are closed");
            assert!(ended >= p.started_ms);
            assert_eq!(
                ended,
                history[i + 1].started_ms,
                "the next period starts when this one ends"
            );
            assert_eq!(p.end_reason.as_deref(), Some("service_change"));
        } else {
            assert!(p.ended_ms.is_none(), "the current period is open");
        }
    }
    assert_eq!(history[0].reason, "activated");
    assert!(history[1].change_id.is_some());

    // Certificates: three, O = service, verified by openssl against the
    // right chain; the two older ones superseded and, once the device
    // reported from its new certificate, revoked and in their CA's CRL.
    let certs = fleet_testkit::eventually(T, "the superseded certificates to be revoked", || {
        let certs = core.store.certs_of("dev1").unwrap();
        let crls_written = certs[..certs.len().saturating_sub(1)].iter().all(|c| {
            let crl = std::fs::read(core.pki.crl_path(&c.service_id)).unwrap_or_default();
            openssl::x509::X509Crl::from_pem(&crl).is_ok_and(|crl| {
                let serial = openssl::bn::BigNum::from_hex_str(&c.serial)
                    .unwrap()
                    .to_asn1_integer()
                    .unwrap();
                matches!(
                    crl.get_by_serial(&serial),
                    openssl::x509::CrlStatus::Revoked(_)
                )
            })
        });
        async move { (certs.len() == 3 && crls_written).then_some(certs) }
    })
    .await
    .unwrap();
    assert_eq!(certs.len(), 3);
    let dir = fleet.dir.path();
    let root = fleet.certs_dir().join("root-ca.pem");
    for (i, rec) in certs.iter().enumerate() {
        let leaf = X509::from_der(&rec.der).unwrap();
        assert_eq!(subject(&leaf, Nid::ORGANIZATIONNAME), rec.service_id);
        assert_eq!(subject(&leaf, Nid::COMMONNAME), "dev1");
        assert_eq!(rec.service_id, services[i]);
        assert_eq!(
            rec.key_mode,
            if key_mode == KeyMode::Csr {
                "csr"
            } else {
                "manager"
            }
        );
        let leaf_path = write_file(dir, &format!("leaf{i}.pem"), &leaf.to_pem().unwrap()).unwrap();
        let ca = core.pki.service_ca_path(&rec.service_id);
        openssl_verify(&root, &ca, &leaf_path, None).unwrap();
        let other = core.pki.service_ca_path(services[(i + 1) % 3]);
        assert!(
            openssl_verify(&root, &other, &leaf_path, None).is_err(),
            "verifies only against its own service CA"
        );
        let crl = core.pki.crl_path(&rec.service_id);
        if i < 2 {
            assert_eq!(rec.status, CertStatus::Superseded);
            assert_eq!(
                rec.superseded_by.as_deref(),
                Some(certs[i + 1].serial.as_str())
            );
            assert!(rec.revoked_ms.is_some());
            let err = openssl_verify(&root, &ca, &leaf_path, Some(&crl))
                .unwrap_err()
                .to_string();
            assert!(err.contains("certificate revoked"), "{err}");
        } else {
            assert_eq!(rec.status, CertStatus::Active);
        }
    }
    let device = core.store.device("dev1").unwrap().unwrap();
    assert_eq!(device.service_id, "svcC");
    assert_eq!(
        device.current_cert.as_deref(),
        Some(certs[2].serial.as_str())
    );
    assert!(device.pending.is_none());

    devices.shutdown.cancel();
    tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // At the broker: the superseded certificates are refused at the
    // handshake; the current one only under its own client id, and only in
    // its own tenant.
    let store = devices.store("dev1").unwrap();
    // (The broker reads a rewritten CRL within its polling interval.)
    for old in ["svcA", "svcB"] {
        let creds = store.service_credentials(old).unwrap().unwrap();
        fleet_testkit::eventually(
            Duration::from_secs(5),
            &format!("the {old} certificate refused"),
            || {
                let creds = creds.clone();
                let (addr, root) = (fleet.service_addr(), root.clone());
                async move {
                    Probe::mtls(addr, "dev1", &root, creds.chain_pem, creds.key_pem)
                        .await
                        .is_err()
                        .then_some(())
                }
            },
        )
        .await
        .unwrap();
    }
    let creds = store.service_credentials("svcC").unwrap().unwrap();
    let spoofed = Probe::mtls(
        fleet.service_addr(),
        "dev2",
        &root,
        creds.chain_pem.clone(),
        creds.key_pem.clone(),
    )
    .await;
    assert!(
        spoofed.is_err(),
        "client id other than the certificate's CN accepted"
    );
    let seen_on_a = observer.on(&telemetry("svcA", "dev1")).len();
    let intruder = Probe::mtls(
        fleet.service_addr(),
        "dev1",
        &root,
        creds.chain_pem,
        creds.key_pem,
    )
    .await
    .unwrap();
    intruder
        .publish(&telemetry("svcA", "dev1"), b"injected".to_vec())
        .await
        .unwrap();
    intruder
        .wait_cut(T, "the broker to cut the cross-tenant publisher")
        .await
        .unwrap();
    assert_eq!(
        observer.on(&telemetry("svcA", "dev1")).len(),
        seen_on_a,
        "nothing reached svcA"
    );
}

#[tokio::test]
async fn device_moves_a_b_c_with_csr() {
    moves_a_b_c(KeyMode::Csr).await;
}

#[tokio::test]
async fn device_moves_a_b_c_with_manager_generated_keys() {
    moves_a_b_c(KeyMode::ManagerGenerated).await;
}

/// A device whose re-keying reply is lost (the manager moved it to svcB,
/// the reply never reached it) and whose svcA certificate is then revoked
/// at the end of the grace period: refused in svcA, it asks the bootstrap
/// listener for a certificate for the change it accepted, not for svcA,
/// which the manager would refuse (`wrong_service`), and comes back in
/// svcB (topics.md §10.1, step 7).
#[tokio::test]
async fn a_device_whose_rekey_reply_was_lost_comes_back_in_its_new_service() {
    use fleet_protocol::{RequestKind, Status};
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "lost1", "svcA").await.unwrap();
    let config = || devices.config(&fleet, "lost1", KeyMode::Csr);
    let task = devices.spawn(config());
    devices
        .wait_event(
            "lost1",
            T,
            "connected to svcA",
            |e| matches!(e, DeviceEvent::Connected { service_id } if service_id == "svcA"),
        )
        .await
        .unwrap();
    task.abort();
    let _ = task.await;

    // The change, and its notice, which the device accepted (stored as
    // pending) before its connection went.
    let notices = fleet.privileged("notices").await.unwrap();
    let notice_topic = Topic::in_tenant("svcA", Route::ServiceChange("lost1".into())).to_string();
    notices.subscribe(&notice_topic).await.unwrap();
    let body = serde_json::json!({ "devices": ["lost1"], "service_id": "svcB" });
    fleet_manager::admin::call(&fleet.api(), "POST", "/v1/service-change", Some(&body))
        .await
        .unwrap();
    let sent = notices.wait_for(&notice_topic, 1, T).await.unwrap();
    let notice: ServiceChange = Envelope::decode(&sent.payload).unwrap().body().unwrap();
    let mut store = devices.store("lost1").unwrap();
    store
        .update_state(|st| {
            st.last_notice_seq = notice.seq;
            st.pending_change = Some(notice.clone());
        })
        .unwrap();

    // Its update for svcB, whose reply it never gets: the manager moves it.
    let uuid = store.state().uuid.clone().unwrap();
    let request =
        fleet_device_sim::requests::build_update("lost1", "svcB", &uuid, KeyMode::Csr).unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let thief = Probe::tls(fleet.broker.bootstrap_tls_addr.unwrap(), "lost1", &root)
        .await
        .unwrap();
    thief
        .subscribe("fleet/v1/update/lost1/reply")
        .await
        .unwrap();
    let (reply, _) =
        crate::wire::ask(&fleet, &thief, "lost1", RequestKind::Update, request.bytes).await;
    assert_eq!(reply.status, Status::Ok, "{:?}", reply.detail);
    drop(thief);
    // The grace period ends: its svcA certificate is revoked, and listed
    // as revoked there (an external broker's watcher cuts its connection).
    assert_eq!(fleet.core().revoke_overdue(0).unwrap(), 1);
    let revoked = fleet_manager::admin::call(&fleet.api(), "GET", "/v1/revoked-certificates", None)
        .await
        .unwrap();
    let listed: Vec<_> = revoked
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["device_id"] == "lost1")
        .map(|c| {
            (
                c["service_id"].clone(),
                c["status"].clone(),
                c["revoked_at_grace_end"].clone(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        [(
            serde_json::json!("svcA"),
            serde_json::json!("superseded"),
            serde_json::json!(true)
        )]
    );
    // The operator sees the change made, and not confirmed by the device.
    let summary = || async {
        fleet_manager::admin::call(&fleet.api(), "GET", "/v1/summary", None)
            .await
            .unwrap()
    };
    let before = summary().await;
    assert_eq!(
        (&before["pending_changes"], &before["unconfirmed"]),
        (&serde_json::json!(0), &serde_json::json!(1)),
        "{before}"
    );

    let task = devices.spawn(config());
    devices
        .wait_event(
            "lost1",
            T,
            "the change applied in svcB",
            |e| matches!(e, DeviceEvent::ChangeAccepted { service_id, .. } if service_id == "svcB"),
        )
        .await
        .unwrap();
    let failed_for_good = devices.events_of("lost1").iter().any(|e| {
        matches!(
            e,
            DeviceEvent::Failed {
                status: Some(Status::WrongService),
                ..
            }
        )
    });
    assert!(!failed_for_good, "{:?}", devices.events_of("lost1"));
    let shown = fleet_manager::admin::call(&fleet.api(), "GET", "/v1/devices/lost1", None)
        .await
        .unwrap();
    assert_eq!(shown["device"]["service_id"], "svcB", "{shown}");
    fleet_testkit::eventually(T, "the change to be confirmed", || async {
        (summary().await["unconfirmed"] == 0).then_some(())
    })
    .await
    .unwrap();
    devices.shutdown.cancel();
    let _ = tokio::time::timeout(T, task).await;
}

/// A `status` report answered `busy` (not carried out, §5.1 code 14) is
/// sent again after a pause: a `change_applied` or `online` lost so would
/// leave the device's service period unconfirmed. The manager is stopped
/// and its part played by a client holding its signing key, which answers
/// the first report `busy`.
#[tokio::test]
async fn a_status_report_answered_busy_is_sent_again() {
    use fleet_protocol::{Reply, Status, StatusReport};
    let mut fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "busy1", "svcA").await.unwrap();
    let config = devices.config(&fleet, "busy1", KeyMode::Csr);
    let task = devices.spawn(config.clone());
    let connected = |n: usize| {
        let devices = &devices;
        async move {
            devices
                .wait_event("busy1", T, "connected to svcA", |_| {
                    devices
                        .events_of("busy1")
                        .iter()
                        .filter(|e| matches!(e, DeviceEvent::Connected { .. }))
                        .count()
                        >= n
                })
                .await
                .unwrap()
        }
    };
    connected(1).await;
    task.abort();
    let _ = task.await;
    let signing = fleet.core().pki.signing_key().clone();
    fleet.stop_manager().await;

    let stand_in = fleet.privileged("stand-in").await.unwrap();
    let status_topic = Topic::in_tenant(
        "svcA",
        Route::Request(fleet_protocol::RequestKind::Status, "busy1".into()),
    );
    let reply_topic = status_topic.reply_topic().unwrap().to_string();
    let status_topic = status_topic.to_string();
    stand_in.subscribe(&status_topic).await.unwrap();
    let task = devices.spawn(config);
    connected(2).await;
    let first = stand_in.wait_for(&status_topic, 1, T).await.unwrap();
    let report: StatusReport = Envelope::decode(&first.payload).unwrap().body().unwrap();
    let busy = Reply {
        device_id: "busy1".into(),
        nonce: report.nonce.clone(),
        seq: u64::MAX / 4,
        status: Status::Busy,
        service_id: None,
        uuid: None,
        chain: None,
        key: None,
        change: None,
        roots: None,
        crosses: None,
        detail: Some("behind".into()),
    };
    let env = Envelope::build(Kind::StatusReply, &busy, |tbs| crypto::sign(&signing, tbs)).unwrap();
    stand_in.publish(&reply_topic, env.encode()).await.unwrap();
    // The same report again (§5.1 allows the same bytes: nothing was
    // recorded), after the pause and well before the wait for a reply.
    let again = stand_in.wait_for(&status_topic, 2, T).await.unwrap();
    assert_eq!(again.payload, first.payload);
    devices.shutdown.cancel();
    let _ = tokio::time::timeout(T, task).await;
}

/// A device renews its certificate before it expires, while connected: a
/// new certificate for the same service (`update` in its tenant), a new
/// connection with it, and the old one revoked as superseded once the
/// device reports from the new one; its service period stays open and its
/// telemetry goes on. Here the renewal window is moved to 3.5 s after the
/// first certificate was issued (its notBefore is 5 minutes before that,
/// its lifetime a day); the device waits for its `online` to be answered
/// first (`request_timeout`, 5 s here), so it renews every 5 s or so.
#[tokio::test]
async fn a_device_renews_its_certificate_before_it_expires() {
    let fleet = Fleet::start_with(|c| c.cert_lifetime_days = 1)
        .await
        .unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let observer = fleet.privileged("observer").await.unwrap();
    observer
        .subscribe(&telemetry("svcA", "renew1"))
        .await
        .unwrap();
    devices.provision(&fleet, "renew1", "svcA").await.unwrap();
    let mut config = devices.config(&fleet, "renew1", KeyMode::Csr);
    config.renew_window = renews_after(3.5);
    devices.spawn(config);
    let installed = |devices: &Devices| installed_in_svca(devices, "renew1");
    devices
        .wait_event("renew1", T, "a second certificate", |_| {
            installed(&devices).len() >= 2
        })
        .await
        .unwrap();
    let serials = installed(&devices);
    let (first, second) = (serials[0].clone(), serials[1].clone());
    assert_ne!(first, second);
    // Superseded by it, and revoked (in svcA's CRL) once the device
    // reported from it. (The test's window renews every 3.5 s from here.)
    let first_cert = fleet.core().store.cert(&first).unwrap().unwrap();
    assert_eq!(first_cert.status, CertStatus::Superseded);
    assert_eq!(first_cert.superseded_by.as_deref(), Some(second.as_str()));
    fleet_testkit::eventually(T, "the first certificate revoked", || {
        let revoked = fleet.core().store.revoked_of("svcA").unwrap();
        let done = revoked.iter().any(|r| r.serial == first);
        async move { done.then_some(()) }
    })
    .await
    .unwrap();
    // The manager records a certificate as it issues it, before the device
    // has stored it: read the device's record first.
    let record = fleet.core().store.device("renew1").unwrap().unwrap();
    let current = record.current_cert.clone().unwrap();
    assert_ne!(current, first);
    fleet_testkit::eventually(T, "the current certificate installed", || {
        let done = installed(&devices).contains(&current);
        async move { done.then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(record.service_id, "svcA");
    assert_eq!(fleet.core().store.history("renew1").unwrap().len(), 1);
    let seen = observer.on(&telemetry("svcA", "renew1")).len();
    observer
        .wait_for(&telemetry("svcA", "renew1"), seen + 2, T)
        .await
        .unwrap();
    assert!(
        devices
            .events_of("renew1")
            .iter()
            .all(|e| !matches!(e, DeviceEvent::Failed { .. })),
        "{:?}",
        devices.events_of("renew1")
    );
    devices.shutdown.cancel();
}

/// A renewal whose reply never reached the device (its connection ended
/// first) is asked again, byte for byte, when it reconnects and before it
/// reports `online` from the certificate it still holds (topics.md §10.1
/// step 5): the manager answers the repeat from its replay cache, so one
/// renewal is one certificate, and the device ends up with the one the
/// manager recorded. The manager is stopped while the renewal is in
/// flight (the broker keeps its session's requests for it) and the
/// device's connection is taken over by a client with its certificate.
#[tokio::test]
async fn a_renewal_whose_reply_was_lost_is_asked_again_and_issues_once() {
    use fleet_protocol::RequestKind;
    let mut fleet = Fleet::start_with(|c| c.cert_lifetime_days = 1)
        .await
        .unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let observer = fleet.privileged("observer").await.unwrap();
    let in_tenant = |route| Topic::in_tenant("svcA", route).to_string();
    let renewals = in_tenant(Route::Request(RequestKind::Update, "lost2".into()));
    let status_replies = in_tenant(Route::Reply(RequestKind::Status, "lost2".into()));
    let reports = in_tenant(Route::Request(RequestKind::Status, "lost2".into()));
    observer.subscribe(&renewals).await.unwrap();
    observer.subscribe(&status_replies).await.unwrap();
    observer.subscribe(&reports).await.unwrap();
    devices.provision(&fleet, "lost2", "svcA").await.unwrap();
    let mut config = devices.config(&fleet, "lost2", KeyMode::Csr);
    // Renews 10 s after its certificate was issued (never before its
    // `online` could have been answered: 5 s, the request timeout, after
    // it connected), time enough to stop the manager first.
    config.renew_window = renews_after(10.0);
    devices.spawn(config);
    let installed = |devices: &Devices| installed_in_svca(devices, "lost2");
    // Its `online` answered, the manager stops; the renewal comes later.
    observer.wait_for(&status_replies, 1, T).await.unwrap();
    fleet.stop_manager().await;
    let first = observer.wait_for(&renewals, 1, T).await.unwrap();
    assert_eq!(installed(&devices).len(), 1);

    // The connection ends before any reply: a client with the device's
    // own certificate takes its session over.
    let creds = devices
        .store("lost2")
        .unwrap()
        .service_credentials("svcA")
        .unwrap()
        .unwrap();
    let root = fleet.certs_dir().join("root-ca.pem");
    let taker = Probe::mtls(
        fleet.service_addr(),
        "lost2",
        &root,
        creds.chain_pem.clone(),
        creds.key_pem.clone(),
    )
    .await
    .unwrap();
    // Reconnected, it asks again, identical, and reports nothing first.
    let again = observer.wait_for(&renewals, 2, T).await.unwrap();
    drop(taker);
    assert_eq!(again.payload, first.payload, "the renewal was built anew");
    assert_eq!(
        observer.on(&reports).len(),
        1,
        "a report before the renewal"
    );

    fleet.start_manager().await.unwrap();
    devices
        .wait_event("lost2", T, "the renewed certificate", |_| {
            installed(&devices).len() >= 2
        })
        .await
        .unwrap();
    let serials = installed(&devices);
    let record = fleet.core().store.device("lost2").unwrap().unwrap();
    assert_eq!(record.current_cert.as_deref(), Some(serials[1].as_str()));
    // One certificate for the two copies (the broker kept both for the
    // manager's session: the second is answered from its replay cache).
    let certs = fleet.core().store.certs_of("lost2").unwrap();
    assert_eq!(certs.len(), 2, "{certs:?}");
    fleet_testkit::eventually(T, "the first certificate revoked", || {
        let revoked = fleet.core().store.revoked_of("svcA").unwrap();
        let done = revoked.iter().any(|r| r.serial == serials[0]);
        async move { done.then_some(()) }
    })
    .await
    .unwrap();
    devices.shutdown.cancel();
}

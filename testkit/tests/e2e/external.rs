//! The manager unchanged against an external broker given by URL: mosquitto
//! from Debian, one device moving A -> B through it.

use std::time::Duration;

use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_manager::cli::Reload;
use fleet_manager::ManagerConfig;
use fleet_protocol::{Route, Topic};
use fleet_testkit::{eventually, Devices, Mosquitto, Probe};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn lifecycle_through_mosquitto() {
    fleet_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fleet_pki::Pki::open_or_create(&certs).unwrap();
    let mosquitto = Mosquitto::start(dir.path(), &certs).unwrap();
    let config = ManagerConfig {
        broker_url: format!("mqtt://{}", mosquitto.plain),
        data_dir: dir.path().join("store"),
        certs_dir: certs.clone(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let manager = fleet_manager::start(config, CancellationToken::new())
        .await
        .unwrap();
    let admin = manager.api();

    let devices = Devices::new(dir.path().join("devices"));
    let key = fleet_device_sim::provision(&devices.store_root, "ext1").unwrap();
    let regs =
        json!([{ "device_id": "ext1", "service_id": "svcA", "factory_key_hex": hex::encode(key) }]);
    fleet_manager::admin::call(&admin, "POST", "/v1/registrations", Some(&regs))
        .await
        .unwrap();
    let observer = Probe::plain(mosquitto.plain, "observer").await.unwrap();
    observer.subscribe("/tenants/+/telemetry/+").await.unwrap();

    let task =
        devices.spawn(devices.config_for(&mosquitto.endpoints(), &certs, "ext1", KeyMode::Csr));
    devices
        .wait_event("ext1", T, "connected to svcA", |e| {
            matches!(e, DeviceEvent::Connected { .. })
        })
        .await
        .unwrap();
    let on = |svc: &str| Topic::in_tenant(svc, Route::Telemetry("ext1".into())).to_string();
    observer.wait_for(&on("svcA"), 1, T).await.unwrap();

    let body = json!({ "devices": ["ext1"], "service_id": "svcB" });
    fleet_manager::admin::call(&admin, "POST", "/v1/service-change", Some(&body))
        .await
        .unwrap();
    devices
        .wait_event("ext1", T, "moved to svcB", |e| {
            matches!(e, DeviceEvent::ChangeAccepted { .. })
        })
        .await
        .unwrap();
    observer.wait_for(&on("svcB"), 1, T).await.unwrap();

    let history = manager.core.store.history("ext1").unwrap();
    let services: Vec<_> = history.iter().map(|(_, p)| p.service_id.as_str()).collect();
    assert_eq!(services, ["svcA", "svcB"]);
    assert!(history[0].1.ended_ms.is_some());
    let certs = manager.core.store.certs_of("ext1").unwrap();
    assert_eq!(certs.len(), 2);
    assert_eq!(
        certs[0].status,
        fleet_manager::store::CertStatus::Superseded
    );

    devices.shutdown.cancel();
    tokio::time::timeout(T, task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    manager.stop().await;
}

/// The front door's rules generated for mosquitto (`fleet-manager
/// mosquitto-config`): a device moves A -> B with the ACL following the
/// registry, and hostile clients get nothing of others.
#[tokio::test]
async fn generated_mosquitto_rules_hold() {
    use fleet_broker::mosquitto::MosquittoParams;

    fleet_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    fleet_pki::Pki::open_or_create(&certs).unwrap();
    let secret = "manager-secret-for-this-test";
    // On free ports, picked again if one was taken before mosquitto bound it.
    let mut attempt = 0;
    let (params, mosquitto, bootstrap) = loop {
        let free = || fleet_testkit::free_port().unwrap();
        let params = MosquittoParams {
            internal: free(),
            bootstrap_tls: free(),
            service: free(),
            certs_dir: certs.clone(),
            out_dir: dir.path().join("mosquitto"),
            user: fleet_manager::cli::current_user(),
            max_packet_size: 256 * 1024,
            max_bootstrap_packet_size: 32 * 1024,
        };
        // First render, before the manager runs: no grants yet.
        let files = fleet_broker::mosquitto::render(&params, &[]).unwrap();
        fleet_broker::mosquitto::write(&params, &files, Some(secret)).unwrap();
        let conf = params.out_dir.join("mosquitto.conf");
        // Both are killed when dropped, when the test fails too. The
        // bootstrap listener is a mosquitto of its own, bridged to the first.
        let bootstrap_conf = params.out_dir.join("bootstrap.conf");
        let spawned = fleet_testkit::Mosquitto::spawn(&conf, dir.path()).and_then(|main| {
            let bootstrap = fleet_testkit::Mosquitto::spawn(&bootstrap_conf, dir.path())?;
            Ok((main, bootstrap))
        });
        match spawned {
            Ok((main, bootstrap)) => break (params, main, bootstrap),
            Err(err) if fleet_testkit::port_taken(&err) && attempt < 3 => attempt += 1,
            Err(err) => panic!("mosquitto: {err:#}"),
        }
    };
    let conf = params.out_dir.join("mosquitto.conf");
    let pid = mosquitto.id();
    assert_eq!(
        fleet_broker::mosquitto::runs_with_openssl_cnf(pid, &params.out_dir),
        Some(true)
    );

    let config = ManagerConfig {
        broker_url: format!("mqtt://{}", params.internal),
        broker_username: Some(fleet_broker::MANAGER_USER.into()),
        broker_password: Some(secret.into()),
        data_dir: dir.path().join("store"),
        certs_dir: certs.clone(),
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let manager = fleet_manager::start(config, CancellationToken::new())
        .await
        .unwrap();
    let admin = manager.api();
    let regenerate = || {
        fleet_manager::cli::write_mosquitto_config(&admin, &params, None, Some(Reload::Pid(pid)))
    };

    let devices = Devices::new(dir.path().join("devices"));
    let mut regs = Vec::new();
    for (d, s) in [("ext1", "svcA"), ("ext2", "svcB"), ("ext3", "svcB")] {
        let key = fleet_device_sim::provision(&devices.store_root, d).unwrap();
        regs.push(json!({ "device_id": d, "service_id": s, "factory_key_hex": hex::encode(key) }));
    }
    fleet_manager::admin::call(&admin, "POST", "/v1/registrations", Some(&json!(regs)))
        .await
        .unwrap();
    assert_eq!(regenerate().await.unwrap(), 3);

    let endpoints = fleet_testkit::DeviceEndpoints {
        bootstrap: params.bootstrap_tls,
        bootstrap_tls: true,
        service: params.service,
    };
    let observer = Probe::with_credentials(
        params.internal,
        "observer",
        fleet_broker::MANAGER_USER,
        secret,
    )
    .await
    .unwrap();
    observer.subscribe("#").await.unwrap();
    let tasks: Vec<_> = ["ext1", "ext2", "ext3"]
        .into_iter()
        .map(|d| devices.spawn(devices.config_for(&endpoints, &certs, d, KeyMode::Csr)))
        .collect();
    let on = |svc: &str, d: &str| Topic::in_tenant(svc, Route::Telemetry(d.into())).to_string();
    // Registers a device in a service, starts it and waits for its first
    // telemetry there; yields the device's task for the caller to stop.
    #[allow(clippy::async_yields_async)]
    let enroll = |d: &'static str, svc: &'static str| {
        let (devices, admin, endpoints, certs, observer) =
            (&devices, &admin, &endpoints, &certs, &observer);
        async move {
            let key = fleet_device_sim::provision(&devices.store_root, d).unwrap();
            let reg =
                json!([{ "device_id": d, "service_id": svc, "factory_key_hex": hex::encode(key) }]);
            fleet_manager::admin::call(admin, "POST", "/v1/registrations", Some(&reg))
                .await
                .unwrap();
            let task = devices.spawn(devices.config_for(endpoints, certs, d, KeyMode::Csr));
            let topic = Topic::in_tenant(svc, Route::Telemetry(d.into())).to_string();
            observer.wait_for(&topic, 1, T).await.unwrap();
            task
        }
    };
    // Waits for two more messages on a topic than it has now.
    let two_more = |topic: String| {
        let n = observer.on(&topic).len() + 2;
        let observer = &observer;
        async move { observer.wait_for(&topic, n, T).await }
    };
    for (svc, d) in [("svcA", "ext1"), ("svcB", "ext2"), ("svcB", "ext3")] {
        observer.wait_for(&on(svc, d), 1, T).await.unwrap();
    }
    // ext3 goes offline; its certificate is the certified intruder's below.
    tasks[2].abort();
    let creds = devices
        .store("ext3")
        .unwrap()
        .service_credentials("svcB")
        .unwrap()
        .unwrap();
    let connects = |d: &str| {
        devices
            .events_of(d)
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Connected { .. }))
            .count()
    };
    let connected_before = [connects("ext1"), connects("ext2")];

    // Hostile clients: an anonymous bootstrap client and a certified device
    // of svcB reading and writing where they have no grant. The certified
    // one asks for other devices' client ids, in several spellings:
    // mosquitto gives it its certificate's CN instead
    // (`use_username_as_clientid`), so it displaces no one.
    let root = certs.join("root-ca.pem");
    let stored = manager.core.store.snapshot().unwrap();
    let evil = Probe::tls(params.bootstrap_tls, "evil1", &root)
        .await
        .unwrap();
    // A bootstrap client may call itself anything, connected devices too:
    // on its own mosquitto it displaces none of them.
    let mut namesakes = Vec::new();
    for id in ["ext1", "ext2"] {
        namesakes.push(Probe::tls(params.bootstrap_tls, id, &root).await.unwrap());
    }
    let (chain, key) = (&creds.chain_pem, &creds.key_pem);
    let certified =
        |id: &'static str| Probe::mtls(params.service, id, &root, chain.clone(), key.clone());
    for id in ["ext1", "EXT1", "ext1 ", "provider.weather"] {
        drop(certified(id).await.unwrap());
    }
    let nosy = certified("ext2").await.unwrap();
    for probe in [&evil, &nosy] {
        for filter in [
            "#",
            "+/#",
            "/tenants/svcA/#",
            "fleet/v1/update/ext1/reply",
            "$share/g/#",
        ] {
            probe.subscribe(filter).await.unwrap();
        }
    }
    let injected = [
        (&evil, "fleet/v1/update/ext1".to_string()),
        (&evil, "fleet/v1/service/change/ext1".to_string()),
        (&nosy, on("svcA", "ext1")),
        (
            &nosy,
            "/tenants/svcA/fleet/v1/service/change/ext1".to_string(),
        ),
    ];
    for (probe, topic) in &injected {
        probe.publish(topic, b"injected".to_vec()).await.unwrap();
    }
    two_more(on("svcA", "ext1")).await.unwrap();
    assert!(
        evil.messages().is_empty(),
        "bootstrap intruder received {:?}",
        evil.messages().len()
    );
    assert!(
        nosy.messages().iter().all(|m| m.topic.ends_with("/ext3")),
        "service intruder received another device's traffic"
    );
    // ext1 and ext2 kept their connections through it all: telemetry of
    // both arrived after the intruders, and neither device reconnected.
    two_more(on("svcB", "ext2")).await.unwrap();
    assert_eq!(
        [connects("ext1"), connects("ext2")],
        connected_before,
        "a device was displaced: {:?} {:?}",
        devices.events_of("ext1"),
        devices.events_of("ext2")
    );
    assert!(
        observer.messages().iter().all(|m| m.payload != b"injected"),
        "an injected message was delivered"
    );
    assert!(
        manager.core.store.snapshot().unwrap() == stored,
        "stored history changed"
    );

    // Certificates mosquitto must refuse at the handshake: expired, signed
    // by a key that is not the CA's, none at all.
    let pki = &manager.core.pki;
    let (ca_a, ca_a_key) = pki.service_ca("svcA").unwrap();
    let stranger_key = fleet_protocol::crypto::generate_p256().unwrap();
    let forged = crate::frontdoor::forged_leaf;
    for (what, (chain, key)) in [
        (
            "expired",
            forged("ext1", "svcA", (&ca_a, &ca_a_key), (-30, -1)),
        ),
        (
            "unknown CA",
            forged("ext1", "svcA", (&ca_a, &stranger_key), (-1, 30)),
        ),
    ] {
        let r = Probe::mtls(params.service, "ext1", &root, chain, key).await;
        assert!(r.is_err(), "{what} certificate accepted");
    }
    assert!(Probe::tls(params.service, "ext1", &root).await.is_err());
    // For contrast, the same helper's valid leaf is accepted: mosquitto
    // cannot ask the registry at the handshake (topics.md §10.3). ext9 is
    // registered nowhere, so the ACL file grants it nothing: it reads
    // nothing and nothing it writes is delivered, its own service's topics
    // included.
    let (chain, key) = forged("ext9", "svcA", (&ca_a, &ca_a_key), (-1, 30));
    let unregistered = Probe::mtls(params.service, "ext9", &root, chain, key)
        .await
        .unwrap();
    for filter in ["#", "/tenants/svcA/#", &on("svcA", "ext9")] {
        unregistered.subscribe(filter).await.unwrap();
    }
    for topic in [on("svcA", "ext9"), on("svcA", "ext1")] {
        unregistered
            .publish(&topic, b"unregistered".to_vec())
            .await
            .unwrap();
    }
    two_more(on("svcA", "ext1")).await.unwrap();
    assert!(
        unregistered.messages().is_empty(),
        "an unregistered certificate read {} messages",
        unregistered.messages().len()
    );
    assert!(
        observer
            .messages()
            .iter()
            .all(|m| m.payload != b"unregistered"),
        "a message of an unregistered certificate was delivered"
    );
    drop(unregistered);

    // A service provider of svcA, issued by the manager, reads svcA's
    // telemetry through mosquitto and nothing of svcB's.
    let issued = fleet_manager::admin::call(
        &admin,
        "POST",
        "/v1/providers",
        Some(&json!({ "name": "weather", "service_id": "svcA" })),
    )
    .await
    .unwrap();
    assert_eq!(regenerate().await.unwrap(), 4);
    let pem = |k: &str| issued[k].as_str().unwrap().as_bytes().to_vec();
    let provider = Probe::mtls(
        params.service,
        "provider.weather",
        &root,
        pem("chain_pem"),
        pem("key_pem"),
    )
    .await
    .unwrap();
    for filter in [
        "/tenants/svcA/telemetry/+",
        "/tenants/svcB/telemetry/+",
        "#",
    ] {
        provider.subscribe(filter).await.unwrap();
    }
    provider.wait_for(&on("svcA", "ext1"), 1, T).await.unwrap();
    two_more(on("svcB", "ext2")).await.unwrap();
    assert!(
        provider
            .messages()
            .iter()
            .all(|m| m.topic.starts_with("/tenants/svcA/telemetry/")),
        "the provider received {:?}",
        provider
            .messages()
            .iter()
            .map(|m| &m.topic)
            .collect::<Vec<_>>()
    );

    // ext1's svcA certificate, which the migration will supersede.
    let old = devices
        .store("ext1")
        .unwrap()
        .service_credentials("svcA")
        .unwrap()
        .unwrap();
    // A client that keeps its TLS sessions, with that certificate: mosquitto
    // resumes none (openssl.cnf), so the certificate is checked at every
    // connect, not only at the first after a reload.
    let root_pem = std::fs::read(&root).unwrap();
    let old_key = (&old.chain_pem[..], &old.key_pem[..]);
    let keeper = |version| {
        fleet_testkit::Resuming::new(params.service, "ext1-keeper", &root_pem, old_key, version)
            .unwrap()
    };
    let keeper13 = keeper(&rustls::version::TLS13);
    assert!(!keeper13.connect().await.unwrap());
    assert!(
        !keeper13.connect().await.unwrap(),
        "mosquitto resumed a TLS session"
    );
    // TLS 1.2 would resume by session id, from mosquitto's own cache.
    assert!(
        keeper(&rustls::version::TLS12).connect().await.is_err(),
        "TLS 1.2 on mosquitto's service listener"
    );

    // From here on a watcher keeps mosquitto's files in step with the
    // registry and the CRLs (`mosquitto-config --watch-ms`), as a
    // deployment runs it: nothing below regenerates by hand.
    let watch = || {
        let watching = CancellationToken::new();
        let (admin, params, stop) = (admin.clone(), params.clone(), watching.clone());
        let watcher = tokio::spawn(async move {
            let looks = fleet_manager::cli::WatchTimes {
                every: Duration::from_millis(100),
                coalesce: Duration::from_millis(1000),
            };
            fleet_manager::cli::watch_mosquitto_config(
                &admin,
                &params,
                Some(secret),
                Some(Reload::Main),
                looks,
                stop,
            )
            .await
        });
        (watching, watcher)
    };
    let (watching, watcher) = watch();

    // Migration: the ACL grants both tenants while ext1 moves, then only the new one.
    let body = json!({ "devices": ["ext1"], "service_id": "svcC" });
    fleet_manager::admin::call(&admin, "POST", "/v1/service-change", Some(&body))
        .await
        .unwrap();
    devices
        .wait_event("ext1", T, "moved to svcC", |e| {
            matches!(e, DeviceEvent::ChangeAccepted { .. })
        })
        .await
        .unwrap();
    // Its svcA certificate is revoked as superseded once it reports from
    // svcC, and is not cut (checked at the end): it is no longer in use.
    let ext1_connects = connects("ext1");
    observer.wait_for(&on("svcC", "ext1"), 1, T).await.unwrap();
    eventually(T, "the old tenant to leave the ACL", || {
        let acl = std::fs::read_to_string(params.out_dir.join("acl")).unwrap_or_default();
        async move {
            (acl.contains("topic write /tenants/svcC/telemetry/ext1")
                && !acl.contains("/tenants/svcA/telemetry/ext1"))
            .then_some(())
        }
    })
    .await
    .unwrap();
    let history = manager.core.store.history("ext1").unwrap();
    assert_eq!(history.len(), 2);

    // The superseded svcA certificate is revoked, and mosquitto, reloaded
    // with the new CRL, refuses it at the handshake (it was started before
    // any service had a CRL: its `crlfile` holds the root's from the start).
    // (Looked at without an MQTT CONNECT: accepted, it would take ext1's
    // session over, the client id being the CN.)
    eventually(T, "the old certificate to be refused", || {
        let refused = fleet_testkit::tls_refused(
            params.service,
            &root_pem,
            old_key,
            Duration::from_millis(300),
        );
        async move { refused.await.unwrap().then_some(()) }
    })
    .await
    .unwrap();
    // Nor does the client that kept its sessions get back in (the reload
    // that brought the CRL would have ended its session anyway).
    assert!(
        keeper13.connect().await.is_err(),
        "a revoked certificate connected again"
    );
    // For contrast, a svcA certificate still valid (the provider's) is not
    // refused, and connects.
    let (weather_chain, weather_key) = (pem("chain_pem"), pem("key_pem"));
    assert!(!fleet_testkit::tls_refused(
        params.service,
        &root_pem,
        (&weather_chain, &weather_key),
        Duration::from_millis(300),
    )
    .await
    .unwrap());
    let weather = Probe::mtls(
        params.service,
        "weather-check",
        &root,
        pem("chain_pem"),
        pem("key_pem"),
    )
    .await
    .unwrap();
    weather
        .subscribe("/tenants/svcA/telemetry/+")
        .await
        .unwrap();

    // Revoked, the provider's live connection is cut (mosquitto alone
    // would keep it until it reconnects), and it cannot come back.
    let revoked_at = std::time::Instant::now();
    fleet_manager::admin::call(&admin, "POST", "/v1/providers/weather/revoke", None)
        .await
        .unwrap();
    weather
        .wait_cut(T, "the revoked provider's connection to be cut")
        .await
        .unwrap();
    tracing::info!(elapsed = ?revoked_at.elapsed(), "revoked connection cut");
    // Refused at the handshake from mosquitto's reload on. A connect that
    // raced the reload (the cut follows the signal at once, and a loaded
    // mosquitto may take a moment) is cut at the watcher's next look.
    eventually(
        T,
        "the revoked provider's certificate to be refused",
        || {
            let refused = fleet_testkit::tls_refused(
                params.service,
                &root_pem,
                (&weather_chain, &weather_key),
                Duration::from_millis(300),
            );
            let again = || {
                Probe::mtls(
                    params.service,
                    "weather-again",
                    &root,
                    weather_chain.clone(),
                    weather_key.clone(),
                )
            };
            async move {
                if refused.await.unwrap() {
                    return Some(());
                }
                if let Ok(raced) = again().await {
                    raced
                        .wait_cut(T, "a revoked provider that raced the reload to be cut")
                        .await
                        .unwrap();
                }
                None
            }
        },
    )
    .await
    .unwrap();
    // ext1, whose svcA certificate was superseded, not revoked, was not cut.
    assert_eq!(
        connects("ext1"),
        ext1_connects,
        "{:?}",
        devices.events_of("ext1")
    );
    assert_eq!(connects("ext2"), connected_before[1]);

    // svcB's CA is rolled over. Reloaded by the watcher with the successor
    // and its CRL, mosquitto (which checks the CRL of every leaf's CA)
    // takes a device the successor certified, and ext2's first-generation
    // certificate still passes its handshake.
    let rolled = fleet_manager::admin::call(&admin, "POST", "/v1/services/svcB/ca/roll", None)
        .await
        .unwrap();
    assert_eq!(rolled["generation"], json!(2));
    let successor = std::fs::read_to_string(pki.service_ca_path_of("svcB", 2)).unwrap();
    eventually(T, "the successor in mosquitto's CA file", || {
        let cafile = std::fs::read_to_string(params.out_dir.join("cafile.pem")).unwrap_or_default();
        let found = cafile.contains(successor.trim());
        async move { found.then_some(()) }
    })
    .await
    .unwrap();
    let ext4 = enroll("ext4", "svcB").await;
    let ext4_chain = devices
        .store("ext4")
        .unwrap()
        .service_credentials("svcB")
        .unwrap()
        .unwrap()
        .chain_pem;
    let ext4_ca = openssl::x509::X509::stack_from_pem(&ext4_chain).unwrap()[1]
        .to_pem()
        .unwrap();
    assert_eq!(String::from_utf8(ext4_ca).unwrap().trim(), successor.trim());
    let ext2 = devices
        .store("ext2")
        .unwrap()
        .service_credentials("svcB")
        .unwrap()
        .unwrap();
    // A whole new connection, CONNACK and all (mosquitto gives it ext2's
    // client id, the CN: ext2's session is taken over, and ext2 comes back).
    drop(
        Probe::mtls(
            params.service,
            "ext2",
            &root,
            ext2.chain_pem.clone(),
            ext2.key_pem.clone(),
        )
        .await
        .unwrap(),
    );
    two_more(on("svcB", "ext2")).await.unwrap();
    ext4.abort();

    // svcA's first CA key is stolen. svcA is rolled over, and ext5, a
    // device of svcA, is certified by the successor and goes offline; the
    // registry still grants it svcA. The thief makes itself a certificate
    // named ext5 with the old key, which chains to the root through the
    // old CA it presents, and holds a session with it. Then the older
    // generation is retired (`service-ca svcA --retire-older`): mosquitto
    // refuses the thief's certificate because that CA's CRL leaves its
    // CRL file with the CA (the PKI keeps the CRL a while), and the
    // watcher cuts the thief's session, whose serial is on no CRL, as it
    // cuts every principal of a service whose CA was retired early.
    fleet_manager::admin::call(&admin, "POST", "/v1/services/svcA/ca/roll", None)
        .await
        .unwrap();
    let ext5 = enroll("ext5", "svcA").await;
    ext5.abort();
    let _ = ext5.await;
    let (thief_chain, thief_key) = forged("ext5", "svcA", (&ca_a, &ca_a_key), (-1, 30));
    let thief = (&thief_chain[..], &thief_key[..]);
    let wait = Duration::from_millis(300);
    let held = eventually(T, "the thief connected as ext5", || async {
        Probe::mtls(
            params.service,
            "ext5",
            &root,
            thief_chain.clone(),
            thief_key.clone(),
        )
        .await
        .ok()
    })
    .await
    .unwrap();
    let retired =
        fleet_manager::admin::call(&admin, "POST", "/v1/services/svcA/ca/retire-older", None)
            .await
            .unwrap();
    assert_eq!(retired["retired"], json!([1]));
    held.wait_cut(T, "the thief's session cut").await.unwrap();
    eventually(T, "the thief's certificate refused", || async {
        fleet_testkit::tls_refused(params.service, &root_pem, thief, wait)
            .await
            .unwrap()
            .then_some(())
    })
    .await
    .unwrap();

    // The main mosquitto is restarted, under a new pid: the watcher
    // follows it through the pid file mosquitto writes. An operator resets
    // ext3, whose certificate a client then holds a connection with: the
    // reset device leaves the ACL, and the restarted mosquitto, reloaded,
    // refuses its certificate, and its connection is cut.
    drop(mosquitto);
    let mosquitto = fleet_testkit::Mosquitto::spawn(&conf, dir.path()).unwrap();
    assert_ne!(mosquitto.id(), pid);
    assert_eq!(
        fleet_broker::mosquitto::main_pid(&params.out_dir),
        Some(mosquitto.id())
    );
    // A second mosquitto of the same configuration fails to start (its
    // ports are taken) and removes the pid file as it goes: the main one
    // is then found among the processes.
    let mut second = std::process::Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = second.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > T {
            let _ = second.kill();
            panic!("a second mosquitto of the same configuration kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let pid_file = params.out_dir.join(fleet_broker::mosquitto::MAIN_PID_FILE);
    assert!(!pid_file.exists(), "the pid file stayed");
    assert_eq!(
        fleet_broker::mosquitto::main_pid(&params.out_dir),
        Some(mosquitto.id())
    );
    let ext3 = |id| {
        let (chain, key) = (creds.chain_pem.clone(), creds.key_pem.clone());
        Probe::mtls(params.service, id, &root, chain, key)
    };
    let held = ext3("ext3-held").await.unwrap();
    fleet_manager::admin::call(&admin, "POST", "/v1/devices/ext3/reset", None)
        .await
        .unwrap();
    held.wait_cut(T, "the reset device's connection to be cut")
        .await
        .unwrap();
    eventually(T, "the reset device's certificate to be refused", || {
        let refused = ext3("ext3-again");
        async move { refused.await.is_err().then_some(()) }
    })
    .await
    .unwrap();
    let acl = std::fs::read_to_string(params.out_dir.join("acl")).unwrap();
    assert!(!acl.contains("\nuser ext3\n"), "{acl}");
    assert!(acl.contains("\nuser ext2\n"), "{acl}");
    // ext2's certificate past its notAfter, as the registry has it (not
    // as mosquitto sees it, so mosquitto alone would keep ext2's
    // connection): the ACL leaves ext2 out from the next reload on, and
    // the watcher cuts ext2's connection, granted nothing now.
    // (It connected again when mosquitto restarted.)
    eventually(T, "ext2 to connect to the restarted mosquitto", || {
        let n = connects("ext2");
        async move { (n > connected_before[1]).then_some(()) }
    })
    .await
    .unwrap();
    let ext2_connects = connects("ext2");
    let store = &manager.core.store;
    let serial = store.device("ext2").unwrap().unwrap().current_cert.unwrap();
    let mut cert = store.cert(&serial).unwrap().unwrap();
    cert.not_after = fleet_protocol::now_ms() / 1000 - 1;
    store.put_cert(&cert).unwrap();
    eventually(T, "the expired device to leave the ACL", || {
        let acl = std::fs::read_to_string(params.out_dir.join("acl")).unwrap_or_default();
        async move { (!acl.contains("\nuser ext2\n")).then_some(()) }
    })
    .await
    .unwrap();
    eventually(T, "the expired device's connection to be cut", || {
        let n = connects("ext2");
        async move { (n > ext2_connects).then_some(()) }
    })
    .await
    .unwrap();

    // A watcher started afresh cuts, at its first look, every principal
    // the registry grants nothing: ext2 again, whose certificate a client
    // holds a connection with while no watcher runs.
    watching.cancel();
    watcher.await.unwrap().unwrap();
    tasks[1].abort();
    let ext2_creds = devices
        .store("ext2")
        .unwrap()
        .service_credentials("svcB")
        .unwrap()
        .unwrap();
    let held2 = Probe::mtls(
        params.service,
        "ext2-held",
        &root,
        ext2_creds.chain_pem.clone(),
        ext2_creds.key_pem.clone(),
    )
    .await
    .unwrap();
    let (watching, watcher) = watch();
    held2
        .wait_cut(T, "the connection of a device granted nothing to be cut")
        .await
        .unwrap();

    // ext1 asks for its certificate for svcA (a change) over its svcC
    // connection, and the reply is lost: moved by the manager, it still
    // holds that connection, with the superseded certificate. At the end
    // of the grace period the certificate is revoked and the watcher cuts
    // the connection, which mosquitto alone would keep (its ACL is by CN:
    // the connection would have ext1's new grants).
    tasks[0].abort();
    let ext1_store = devices.store("ext1").unwrap();
    let c1 = ext1_store.service_credentials("svcC").unwrap().unwrap();
    let held1 = Probe::mtls(params.service, "ext1-held", &root, c1.chain_pem, c1.key_pem)
        .await
        .unwrap();
    let uuid = ext1_store.state().uuid.clone().unwrap();
    let (reply, key) = moved_reply_lost(&admin, &held1, &uuid, "svcC", "svcA").await;
    assert!(!held1.is_cut());
    assert_eq!(manager.core.revoke_overdue(0).unwrap(), 1);
    held1
        .wait_cut(
            T,
            "the connection of a certificate revoked at the grace end",
        )
        .await
        .unwrap();

    // The same while no watcher runs: ext1 holds a connection with the
    // certificate of the reply above (svcA), asks on it for its svcB one
    // after a change, and that reply is lost too. The svcA certificate is
    // revoked at the grace end before a watcher starts; ext1 keeps its
    // grants (svcB), so only the revocation since mosquitto started tells
    // the new watcher to cut it.
    watching.cancel();
    watcher.await.unwrap().unwrap();
    let chain_pem: Vec<u8> = reply
        .chain
        .unwrap()
        .iter()
        .flat_map(|der| {
            openssl::x509::X509::from_der(der)
                .unwrap()
                .to_pem()
                .unwrap()
        })
        .collect();
    let key_pem = key.private_key_to_pem_pkcs8().unwrap();
    let held3 = Probe::mtls(params.service, "ext1-held-3", &root, chain_pem, key_pem)
        .await
        .unwrap();
    moved_reply_lost(&admin, &held3, &uuid, "svcA", "svcB").await;
    assert_eq!(manager.core.revoke_overdue(0).unwrap(), 1);
    // Its CRL written now, as housekeeping would within 10 s: the new
    // watcher's first look finds the serial revoked already.
    manager.core.write_pending_crls();
    assert!(!held3.is_cut());
    let (watching, watcher) = watch();
    held3
        .wait_cut(
            T,
            "a connection of a certificate revoked while no watcher ran",
        )
        .await
        .unwrap();

    // The broker certificate issued again for a name devices reach the
    // broker by (`server_names`): both mosquittos serve it once a watcher
    // has reloaded them, though it changed while no watcher ran, and once
    // a one-shot run has (`mosquitto-config --reload`).
    watching.cancel();
    watcher.await.unwrap().unwrap();
    let served = |addr, name: &'static str| {
        let root = root_pem.clone();
        async move {
            fleet_testkit::server_name_served(addr, &root, name)
                .await
                .unwrap()
        }
    };
    let listeners = [
        ("service", params.service),
        ("bootstrap", params.bootstrap_tls),
    ];
    let pki = fleet_pki::Pki::open_or_create(&certs).unwrap();
    for (name, by) in [
        ("fleet.test", "a watcher"),
        ("other.test", "a one-shot run"),
    ] {
        for (_, addr) in listeners {
            assert!(!served(addr, name).await);
        }
        let names = fleet_pki::ServerNames::with_local(&[name]).unwrap();
        assert!(pki.ensure_broker_cert(Some(&names)).unwrap());
        let watched = match by {
            "a watcher" => Some(watch()),
            _ => {
                regenerate().await.unwrap();
                None
            }
        };
        for (mosquitto, addr) in listeners {
            let what = format!("the {mosquitto} mosquitto to serve {name}, reloaded by {by}");
            eventually(T, &what, || async move {
                served(addr, name).await.then_some(())
            })
            .await
            .unwrap();
        }
        if let Some((watching, watcher)) = watched {
            watching.cancel();
            watcher.await.unwrap().unwrap();
        }
    }

    // The root rolled over under a watcher: both mosquittos serve the
    // broker's certificate from the new root, followed by its
    // cross-certificate, so a client that pins either root alone verifies
    // it; the service mosquitto trusts both roots, and takes ext6, a
    // device that pins only the first root and whose service, svcD, is new:
    // its CA comes from the new root, which ext6 learns at activation.
    let (watching, watcher) = watch();
    let rolled = fleet_manager::admin::call(&admin, "POST", "/v1/root-ca/roll", None)
        .await
        .unwrap();
    assert_eq!(rolled["generation"], json!(2));
    let second_root = std::fs::read(certs.join("root-ca.2.pem")).unwrap();
    for (mosquitto, addr) in listeners {
        let what = format!("the {mosquitto} mosquitto to serve the new root's certificate");
        let second_root = &second_root;
        eventually(T, &what, || async move {
            fleet_testkit::server_name_served(addr, second_root, "localhost")
                .await
                .unwrap_or(false)
                .then_some(())
        })
        .await
        .unwrap();
        assert!(
            served(addr, "localhost").await,
            "through the cross-certificate"
        );
    }
    let key = fleet_device_sim::provision(&devices.store_root, "ext6").unwrap();
    let reg =
        json!([{ "device_id": "ext6", "service_id": "svcD", "factory_key_hex": hex::encode(key) }]);
    fleet_manager::admin::call(&admin, "POST", "/v1/registrations", Some(&reg))
        .await
        .unwrap();
    let ext6 = devices.spawn(devices.config_for(&endpoints, &certs, "ext6", KeyMode::Csr));
    devices
        .wait_event(
            "ext6",
            T,
            "connected to svcD",
            |e| matches!(e, DeviceEvent::Connected { service_id } if service_id == "svcD"),
        )
        .await
        .unwrap();
    let svc_d_ca =
        openssl::x509::X509::from_pem(&std::fs::read(certs.join("services/svcD-ca.pem")).unwrap())
            .unwrap();
    let new_root = openssl::x509::X509::from_pem(&second_root).unwrap();
    assert!(svc_d_ca.verify(&new_root.public_key().unwrap()).unwrap());
    let pinned = std::fs::read(
        devices
            .store_root
            .join("ext6")
            .join(fleet_device_sim::store::ROOTS_FILE),
    )
    .unwrap();
    assert_eq!(pinned, [second_root, root_pem.clone()].concat());
    ext6.abort();
    watching.cancel();
    watcher.await.unwrap().unwrap();

    devices.shutdown.cancel();
    manager.stop().await;
    drop((mosquitto, bootstrap));
}

/// Moves ext1 from `from` to `to` and asks for its certificate for `to`
/// over `held`, a connection ext1's certificate for `from` holds, as the
/// device would; the reply reaches only `held`, so for the device it is
/// lost. Returns the reply and the key its certificate is for.
async fn moved_reply_lost(
    admin: &fleet_manager::admin::AdminApi,
    held: &Probe,
    uuid: &[u8],
    from: &str,
    to: &str,
) -> (
    fleet_protocol::Reply,
    openssl::pkey::PKey<openssl::pkey::Private>,
) {
    let body = json!({ "devices": ["ext1"], "service_id": to });
    fleet_manager::admin::call(admin, "POST", "/v1/service-change", Some(&body))
        .await
        .unwrap();
    let update = fleet_device_sim::requests::build_update("ext1", to, uuid, KeyMode::Csr).unwrap();
    let topic = Topic::in_tenant(
        from,
        Route::Request(fleet_protocol::RequestKind::Update, "ext1".into()),
    );
    let reply_topic = topic.reply_topic().unwrap().to_string();
    held.subscribe(&reply_topic).await.unwrap();
    held.publish(&topic.to_string(), update.bytes)
        .await
        .unwrap();
    let reply = held.wait_for(&reply_topic, 1, T).await.unwrap();
    let reply: fleet_protocol::Reply = fleet_protocol::Envelope::decode(&reply.payload)
        .unwrap()
        .body()
        .unwrap();
    assert_eq!(reply.status, fleet_protocol::Status::Ok, "{reply:?}");
    (reply, update.service_key.unwrap())
}

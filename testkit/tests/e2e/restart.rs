//! Manager restart: stopped after activation, started again on the same
//! store; an update published while it was down is answered, the CA is
//! the same one, and the broker's grant files are back in step with the
//! store.

use std::time::Duration;

use fleet_pki::grants;
use fleet_protocol::crypto;
use fleet_protocol::{Envelope, Kind, Reply, Status, UpdateRequest};
use openssl::x509::X509;
use serde_bytes::ByteBuf;

#[tokio::test]
async fn restart_after_activation_loses_nothing() {
    let (mut fleet, probe, dev) = crate::wire::fleet_with_active_device("dev1").await;

    let root_before = fleet.core().pki.root_cert().to_der().unwrap();
    let signing_before = fleet.core().pki.signing_key().public_key_to_der().unwrap();
    let device_before = fleet.core().store.device("dev1").unwrap().unwrap();
    fleet.stop_manager().await;

    // Grant files out of step with the store while the manager is down:
    // dev1's lost, a stranger's planted.
    let certs = fleet.certs_dir().to_path_buf();
    assert_eq!(grants::read_grants(&certs, "dev1").unwrap(), ["svcA"]);
    assert!(grants::remove_grants(&certs, "dev1").unwrap());
    grants::write_grants(&certs, "planted1", &["svcA".to_owned()]).unwrap();

    // The device asks for its certificate while the manager is down.
    let eph = crypto::generate_p256().unwrap();
    let key = crypto::generate_p256().unwrap();
    let body = UpdateRequest {
        device_id: dev.id.clone(),
        service_id: "svcA".into(),
        nonce: crypto::random_bytes(16),
        ts: fleet_protocol::now_ms(),
        eph: crypto::public_point(&eph).unwrap(),
        csr: Some(ByteBuf::from(
            fleet_pki::generate_csr(&dev.id, &key).unwrap(),
        )),
    };
    let env = Envelope::build(Kind::Update, &body, |tbs| {
        crypto::hmac(dev.uuid.as_ref().unwrap(), tbs)
    })
    .unwrap();
    probe
        .publish("fleet/v1/update/dev1", env.encode())
        .await
        .unwrap();

    fleet.start_manager().await.unwrap();
    // Back in step as soon as the manager is up.
    assert_eq!(grants::read_grants(&certs, "dev1").unwrap(), ["svcA"]);
    assert!(grants::read_grants(&certs, "planted1").unwrap().is_empty());
    let got = probe
        .wait_for("fleet/v1/update/dev1/reply", 1, Duration::from_secs(20))
        .await
        .unwrap();
    let env = Envelope::decode(&got.payload).unwrap();
    assert!(crypto::verify(
        &fleet.core().pki.signing_key(),
        &env.tbs(),
        &env.auth
    ));
    let reply: Reply = env.body().unwrap();
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    assert_eq!(reply.nonce, body.nonce);

    // Same CA, same signing key, same device-auth UUID.
    assert_eq!(fleet.core().pki.root_cert().to_der().unwrap(), root_before);
    assert_eq!(
        fleet.core().pki.signing_key().public_key_to_der().unwrap(),
        signing_before
    );
    let device_after = fleet.core().store.device("dev1").unwrap().unwrap();
    assert_eq!(device_after.uuid, device_before.uuid);
    assert_eq!(device_after.activated_ms, device_before.activated_ms);

    // The certificate chains to the root that existed before the restart.
    let chain = reply.chain.unwrap();
    let leaf = X509::from_der(&chain[0]).unwrap();
    assert!(leaf.public_key().unwrap().public_eq(&key));
    let dir = fleet.dir.path();
    let leaf_path = fleet_testkit::write_file(dir, "leaf.pem", &leaf.to_pem().unwrap()).unwrap();
    let ca_path = fleet_testkit::write_file(
        dir,
        "ca.pem",
        &X509::from_der(&chain[1]).unwrap().to_pem().unwrap(),
    )
    .unwrap();
    let root_path = fleet_testkit::write_file(
        dir,
        "root.pem",
        &X509::from_der(&root_before).unwrap().to_pem().unwrap(),
    )
    .unwrap();
    fleet_testkit::openssl_verify(&root_path, &ca_path, &leaf_path, None).unwrap();
    let history = fleet.core().store.history("dev1").unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].1.service_id, "svcA");
}

/// A manager that restarts with service changes pending announces them at
/// its pace (topics.md §7.4, "Pace"), however the devices that come back
/// ask for them: each reports `online` (which queues its change again) and
/// polls (whose reply carries the change only while the pace allows). At
/// one change a second, four devices that come back together move one
/// after another, and all arrive in svcB.
#[tokio::test]
async fn changes_pending_across_a_restart_are_announced_at_the_managers_pace() {
    use fleet_device_sim::{DeviceEvent, KeyMode};
    use fleet_testkit::{Devices, Fleet};
    const T: Duration = Duration::from_secs(30);
    let mut fleet = Fleet::start_with(|c| c.max_notices_per_sec = 2)
        .await
        .unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let ids = ["pace1", "pace2", "pace3", "pace4"];
    let spawn_all = |devices: &Devices, fleet: &Fleet| {
        ids.map(|id| devices.spawn(devices.config(fleet, id, KeyMode::Csr)))
    };
    for id in ids {
        devices.provision(&fleet, id, "svcA").await.unwrap();
    }
    fn in_service(service: &'static str) -> impl Fn(&DeviceEvent) -> bool {
        move |e| matches!(e, DeviceEvent::Connected { service_id } if service_id == service)
    }
    let tasks = spawn_all(&devices, &fleet);
    for id in ids {
        devices
            .wait_event(id, T, "connected to svcA", in_service("svcA"))
            .await
            .unwrap();
    }
    for task in tasks {
        task.abort();
        let _ = task.await;
    }
    // Changed while they are away (their sessions are clean: the notices
    // sent now reach no one), and pending across the restart.
    fleet.change(&ids, "svcB").await.unwrap();
    fleet.restart_manager().await.unwrap();
    let tasks = spawn_all(&devices, &fleet);
    for id in ids {
        devices
            .wait_event(id, T, "connected to svcB", in_service("svcB"))
            .await
            .unwrap();
    }
    let moved: Vec<u64> = ids
        .iter()
        .map(|id| {
            let history = fleet.core().store.history(id).unwrap();
            let (_, period) = history.last().unwrap();
            assert_eq!(period.service_id, "svcB");
            period.started_ms
        })
        .collect();
    let spread = moved.iter().max().unwrap() - moved.iter().min().unwrap();
    // Four changes at one a second: the last announced at least three
    // seconds after the first. Each device moves some time after its
    // announcement, and that time varies on a loaded machine: half of it
    // is left for that. Announced as the devices asked, they moved within
    // milliseconds of each other.
    assert!(spread >= 1_500, "moved at {moved:?}");
    // Nothing is left waiting for a turn.
    fleet_testkit::eventually(T, "no change waiting for its notices", || async {
        let health = fleet_manager::admin::call(&fleet.api(), "GET", "/v1/health", None)
            .await
            .ok()?;
        (health["changes_waiting_for_notices"] == 0).then_some(())
    })
    .await
    .unwrap();
    devices.shutdown.cancel();
    for task in tasks {
        let _ = tokio::time::timeout(T, task).await;
    }
}

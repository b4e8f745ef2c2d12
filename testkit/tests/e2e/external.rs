//! The manager unchanged against an external broker given by URL: mosquitto
//! from Debian, one device moving A -> B through it.

use std::time::Duration;

use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_manager::ManagerConfig;
use fleet_protocol::{Route, Topic};
use fleet_testkit::{Devices, Mosquitto, Probe};
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
    let admin = manager.admin_addr.to_string();

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

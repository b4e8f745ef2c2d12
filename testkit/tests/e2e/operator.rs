//! The operator's side through the `fleet-manager` command line: register,
//! change by service, show, reset; and a device that was offline when its
//! change was requested catches up when it comes back.

use std::time::Duration;

use clap::Parser;
use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_manager::cli::{execute, Cli};
use fleet_protocol::{RequestKind, Status};
use fleet_testkit::{Devices, Fleet};
use serde_json::json;

use crate::wire::{activate, ask};

const T: Duration = Duration::from_secs(30);

async fn cli(args: &[&str]) -> Vec<serde_json::Value> {
    let cli =
        Cli::try_parse_from(std::iter::once("fleet-manager").chain(args.iter().copied())).unwrap();
    execute(cli).await.unwrap()
}

#[tokio::test]
async fn operator_commands_reach_the_running_manager() {
    let fleet = Fleet::start().await.unwrap();
    let admin = fleet.admin();
    // Subscribed at the broker: healthy (HTTP 200, which `call` requires).
    let health = fleet_manager::admin::call(&admin, "GET", "/v1/health", None)
        .await
        .unwrap();
    assert_eq!(health["ok"], true);
    // The address as a URL, too.
    let url = format!("http://{admin}/");
    let summary = fleet_manager::admin::call(&url, "GET", "/v1/summary", None).await;
    assert!(summary.is_ok(), "{summary:?}");
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let mut lines = String::new();
    for id in ["op1", "op2"] {
        let key = fleet_device_sim::provision(&devices.store_root, id).unwrap();
        lines
            .push_str(&json!({ "device_id": id, "factory_key_hex": hex::encode(key) }).to_string());
        lines.push('\n');
    }
    let file =
        fleet_testkit::write_file(fleet.dir.path(), "devices.jsonl", lines.as_bytes()).unwrap();
    let out = cli(&[
        "register",
        "--admin",
        &admin,
        "--service",
        "svcA",
        file.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out[0]["registered"], json!(2));

    let tasks: Vec<_> = ["op1", "op2"]
        .into_iter()
        .map(|id| devices.spawn(devices.config(&fleet, id, KeyMode::Csr)))
        .collect();
    for id in ["op1", "op2"] {
        devices.wait_connected(id, T).await.unwrap();
    }
    let out = cli(&[
        "change",
        "--admin",
        &admin,
        "--service",
        "svcB",
        "--from",
        "svcA",
        "--application",
        "metering",
    ])
    .await;
    let results = out[0]["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    // Two notices a device (tenant and bootstrap topics), sent after the answer.
    assert_eq!(out[0]["notices_queued"], json!(4));
    assert!(
        results.iter().all(|r| r["ok"] == json!(true)),
        "{results:?}"
    );
    for id in ["op1", "op2"] {
        devices
            .wait_event(id, T, "moved", |e| matches!(e, DeviceEvent::ChangeAccepted { service_id, .. } if service_id == "svcB"))
            .await
            .unwrap();
    }
    let shown = &cli(&["show", "--admin", &admin, "op1"]).await[0];
    assert_eq!(shown["device"]["service_id"], json!("svcB"));
    assert_eq!(shown["device"]["application"], json!("metering"));
    assert!(
        shown["device"].get("uuid").is_none(),
        "the API never shows the device-auth UUID"
    );
    assert_eq!(shown["history"].as_array().unwrap().len(), 2);
    let certs = shown["certs"].as_array().unwrap();
    assert_eq!(certs[0]["status"], json!("superseded"));
    assert!(certs[1]["pem"]
        .as_str()
        .unwrap()
        .starts_with("-----BEGIN CERTIFICATE-----"));

    // A change to the service a device is already on is refused, per device.
    let out = cli(&["change", "--admin", &admin, "--service", "svcB", "op1"]).await;
    assert_eq!(out[0]["results"][0]["ok"], json!(false));
    // Which makes `fleet-manager` exit with a failure, for scripts.
    assert_eq!(fleet_manager::cli::refused(&out), 1);

    let summary = &cli(&["summary", "--admin", &admin]).await[0];
    assert_eq!(summary["devices_per_service"]["svcB"], json!(2));
    // Without --admin, the admin API of the configuration file.
    let config = fleet.dir.path().join("operator.toml");
    std::fs::write(&config, format!("admin_listen = \"{admin}\"\n")).unwrap();
    let config = config.to_str().unwrap();
    assert_eq!(&cli(&["--config", config, "summary"]).await[0], summary);
    // Revoking a provider never issued is a 404, and writes nothing.
    let cli_args = [
        "fleet-manager",
        "provider-revoke",
        "--admin",
        &admin,
        "nosuch",
    ];
    let refused = execute(Cli::try_parse_from(cli_args).unwrap())
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("HTTP 404"), "{refused}");
    assert!(!fleet
        .certs_dir()
        .join("grants")
        .join("provider.nosuch")
        .exists());
    // An endpoint the devices would refuse records no change.
    let out = cli(&[
        "--config",
        config,
        "change",
        "--service",
        "svcC",
        "--endpoint",
        "svcC:8883",
        "op1",
    ])
    .await;
    assert_eq!(out[0]["results"][0]["ok"], json!(false));
    assert!(out[0]["results"][0]["detail"]
        .as_str()
        .unwrap()
        .starts_with("malformed"));
    assert_eq!(summary["certs"]["superseded"], json!(2));

    // One certificate by its serial, as a CRL names it.
    let serial = certs[0]["serial"].as_str().unwrap();
    let one =
        fleet_manager::admin::call(&admin, "GET", &format!("/v1/certificates/{serial}"), None)
            .await
            .unwrap();
    assert_eq!(one["device_id"], json!("op1"));
    assert_eq!(one["status"], json!("superseded"));
    assert!(
        fleet_manager::admin::call(&admin, "GET", "/v1/certificates/00ff", None)
            .await
            .is_err()
    );
    // Superseded certificates are not among the revoked ones.
    let revoked = fleet_manager::admin::call(&admin, "GET", "/v1/revoked-certificates", None)
        .await
        .unwrap();
    assert_eq!(revoked, json!([]));
    // The manager's name at the broker is no device id, in any case.
    for id in ["fleet-manager", "Fleet-Manager"] {
        let body = json!([{ "device_id": id, "service_id": "svcA" }]);
        let refused =
            fleet_manager::admin::call(&admin, "POST", "/v1/registrations", Some(&body)).await;
        assert!(refused.is_err(), "{id} registered: {refused:?}");
    }
    devices.shutdown.cancel();
    for t in tasks {
        tokio::time::timeout(T, t).await.unwrap().unwrap().unwrap();
    }
}

#[tokio::test]
async fn reset_lets_a_device_activate_again_with_a_new_uuid() {
    let (fleet, probe, mut dev) = crate::wire::fleet_with_active_device("rst1").await;
    let first_uuid = dev.uuid.clone().unwrap();

    cli(&["reset", "--admin", &fleet.admin(), "rst1"]).await;
    assert!(fleet.core().store.device("rst1").unwrap().is_none());
    // The old device-auth UUID no longer works ...
    let p = crate::wire::poll(
        &dev,
        "svcA",
        fleet_protocol::crypto::random_bytes(16),
        fleet_protocol::now_ms(),
        &first_uuid,
    );
    let (reply, _) = ask(&fleet, &probe, "rst1", RequestKind::Poll, p).await;
    assert_eq!(reply.status, Status::NotRegistered);
    // ... and the device activates again with a new one.
    activate(&fleet, &probe, &mut dev).await;
    assert_ne!(dev.uuid.clone().unwrap(), first_uuid);
    let audit = fleet.core().store.audit_log().unwrap();
    assert!(audit
        .iter()
        .any(|a| a.action == "reset" && a.device_id.as_deref() == Some("rst1")));
}

/// A running device that an operator resets comes back by itself
/// (topics.md §10.1, steps 7 and 8): its service refuses its revoked
/// certificate, so it asks for another; the manager answers `not_registered`,
/// so it activates again, and connects with a new certificate.
#[tokio::test]
async fn a_running_device_that_is_reset_activates_again_and_comes_back() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "rst2", "svcA").await.unwrap();
    let task = devices.spawn(devices.config(&fleet, "rst2", KeyMode::Csr));
    devices.wait_connected("rst2", T).await.unwrap();
    let before = fleet.core().store.device("rst2").unwrap().unwrap();
    cli(&["reset", "--admin", &fleet.admin(), "rst2"]).await;
    fleet_testkit::eventually(T, "rst2 activated and connected again", || {
        let events = devices.events_of("rst2");
        let last = |f: fn(&DeviceEvent) -> bool| events.iter().rposition(f);
        let activated = events
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Activated { .. }))
            .count();
        let back = activated == 2
            && last(|e| matches!(e, DeviceEvent::Connected { .. }))
                > last(|e| matches!(e, DeviceEvent::Activated { .. }));
        async move { back.then_some(()) }
    })
    .await
    .unwrap();
    let after = fleet.core().store.device("rst2").unwrap().unwrap();
    assert_ne!(after.uuid, before.uuid);
    assert_ne!(after.current_cert, before.current_cert);
    assert_eq!(after.service_id, "svcA");
    let refused = devices.events_of("rst2").into_iter().any(|e| {
        matches!(e, DeviceEvent::Failed { ref error, .. } if error.contains("certificate refused"))
    });
    assert!(refused, "{:?}", devices.events_of("rst2"));
    assert!(!task.is_finished());
}

/// A request whose reply a device never saw is sent again as it was on
/// the next connection (topics.md §10.1, step 6): an activation the
/// manager carries out while the device has given up waiting is answered
/// from the reply cache, not refused `already_active` as a second one.
#[tokio::test]
async fn an_activation_sent_again_after_a_lost_reply_is_answered_once() {
    let mut fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "lost1", "svcA").await.unwrap();
    let mut cfg = devices.config(&fleet, "lost1", KeyMode::Csr);
    cfg.request_timeout = Duration::from_millis(300);
    // No manager: the device's activations go unanswered; the broker keeps
    // them for the manager's session.
    fleet.stop_manager().await;
    let task = devices.spawn(cfg);
    fleet_testkit::eventually(T, "two passes without a reply", || {
        let unanswered = devices
            .events_of("lost1")
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Failed { stage, .. } if stage == "activate"))
            .count();
        async move { (unanswered >= 2).then_some(()) }
    })
    .await
    .unwrap();
    fleet.start_manager().await.unwrap();
    devices.wait_connected("lost1", T).await.unwrap();
    let refused = devices.events_of("lost1").into_iter().any(
        |e| matches!(e, DeviceEvent::Failed { status: Some(status), .. } if status != Status::Busy),
    );
    assert!(!refused, "{:?}", devices.events_of("lost1"));
    assert!(!task.is_finished());
}

#[tokio::test]
async fn a_device_offline_during_its_change_catches_up_when_it_returns() {
    let mut fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "off1", "svcA").await.unwrap();
    let cfg = devices.config(&fleet, "off1", KeyMode::Csr);
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let first = tokio::spawn(fleet_device_sim::run_device(cfg.clone(), tx, stop.clone()));
    fleet_testkit::eventually(T, "off1 on svcA", || {
        let on_a = fleet
            .core()
            .store
            .device("off1")
            .unwrap()
            .is_some_and(|d| d.last_seen_ms.is_some());
        async move { on_a.then_some(()) }
    })
    .await
    .unwrap();
    stop.cancel();
    tokio::time::timeout(T, first)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    // The change is requested while the device is off, and the manager
    // restarts before the device returns: its notice reached no one.
    fleet.change(&["off1"], "svcB").await.unwrap();
    fleet.restart_manager().await.unwrap();
    assert!(fleet
        .core()
        .store
        .device("off1")
        .unwrap()
        .unwrap()
        .pending
        .is_some());

    let back = devices.spawn(cfg);
    devices
        .wait_event(
            "off1",
            T,
            "change applied after coming back",
            |e| matches!(e, DeviceEvent::ChangeAccepted { service_id, .. } if service_id == "svcB"),
        )
        .await
        .unwrap();
    let device = fleet.core().store.device("off1").unwrap().unwrap();
    assert_eq!(device.service_id, "svcB");
    assert!(device.pending.is_none());
    devices.shutdown.cancel();
    tokio::time::timeout(T, back)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

/// Idle connections to the admin API hold at most 64 of the process's
/// descriptors (which it shares with the broker): one more is closed at
/// once, and a request is served again when one goes.
#[tokio::test]
async fn idle_admin_connections_are_capped() {
    let fleet = Fleet::start().await.unwrap();
    let admin = fleet.admin();
    // 200 connections that never send a request, one after the other.
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(tokio::net::TcpStream::connect(&admin).await.unwrap());
    }
    // The API holds at most 64: each newcomer beyond them closed the oldest
    // one still without a request (the descriptors are the process's, which
    // it shares with the broker).
    let open = |idle: &[tokio::net::TcpStream]| {
        idle.iter()
            .filter(|s| {
                let mut buf = [0u8; 1];
                matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
            })
            .count()
    };
    fleet_testkit::eventually(T, "at most 64 silent connections held", || {
        let n = open(&idle);
        async move { (n <= 64).then_some(()) }
    })
    .await
    .unwrap();
    assert!(
        open(&idle[..100]) == 0,
        "the oldest silent connections are closed first"
    );
    // While they are held, the operator gets in: its request closes the
    // oldest silent one and takes its slot.
    let cli = Cli::try_parse_from(["fleet-manager", "summary", "--admin", &admin]).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(5), execute(cli))
        .await
        .expect("the operator is answered while silent connections are held")
        .unwrap();
    assert!(summary[0]["devices_per_service"].is_object());
    assert!(open(&idle) <= 64);
    drop(idle);
}

/// `pki-init` also makes the secret the manager and an external broker
/// share (mode 0600, kept once made), and `mosquitto-config` finds the PKI
/// where the configuration says, without `--certs`.
#[tokio::test]
async fn pki_init_makes_the_shared_secret_and_mosquitto_config_finds_the_pki() {
    use std::os::unix::fs::PermissionsExt;
    let fleet = Fleet::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("pki");
    let certs_arg = certs.to_str().unwrap();
    cli(&["pki-init", "--dir", certs_arg]).await;
    let secret_path = certs.join("internal.secret");
    let secret = std::fs::read_to_string(&secret_path).unwrap();
    assert_eq!(secret.trim().len(), 64, "{secret:?}");
    let mode = std::fs::metadata(&secret_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    cli(&["pki-init", "--dir", certs_arg]).await;
    assert_eq!(std::fs::read_to_string(&secret_path).unwrap(), secret);

    // The fleet's own PKI, named by the configuration alone.
    let config = dir.path().join("manager.toml");
    let fleet_certs = fleet.certs_dir();
    std::fs::write(
        &config,
        format!("certs_dir = {:?}\n", fleet_certs.to_str().unwrap()),
    )
    .unwrap();
    let out = dir.path().join("mq");
    let admin = fleet.admin();
    let config_arg = config.to_str().unwrap();
    let out_arg = out.to_str().unwrap();
    cli(&[
        "--config",
        config_arg,
        "mosquitto-config",
        "--admin",
        &admin,
        "--out",
        out_arg,
    ])
    .await;
    let root = std::fs::read_to_string(fleet_certs.join("root-ca.pem")).unwrap();
    let cafile = std::fs::read_to_string(out.join("cafile.pem")).unwrap();
    assert!(cafile.starts_with(&root));
}

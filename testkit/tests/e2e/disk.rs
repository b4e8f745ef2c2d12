//! A whole manager with its embedded broker (what `fleet-manager serve
//! --embedded-broker` runs), in a process of its own, whose disk fills
//! while devices are online.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_manager::admin::{call, AdminApi, Token};
use fleet_protocol::{Route, Status, Topic};
use fleet_testkit::{eventually, Devices, KillOnDrop, Probe};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// Set to a directory: [`child_serves`] runs the manager in it.
const CHILD_DIR: &str = "FLEETSHIFT_E2E_SERVE_DIR";

/// Not a test of its own: the manager process of
/// [`a_manager_whose_disk_fills_refuses_changes_and_keeps_serving`], which
/// runs this binary again with [`CHILD_DIR`] set. It does what `serve
/// --embedded-broker` does, on ephemeral ports, writes the addresses it
/// got to `addresses.json` there, and serves until killed. Without it, it
/// returns at once.
#[tokio::test(flavor = "multi_thread")]
async fn child_serves() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    fleet_broker::init_logs();
    let dir = std::path::PathBuf::from(dir);
    let certs = dir.join("certs");
    fleet_pki::Pki::open_or_create(&certs).unwrap();
    let broker_config = fleet_broker::BrokerConfig {
        internal_listen: "127.0.0.1:0".parse().unwrap(),
        bootstrap_tls_listen: Some("127.0.0.1:0".parse().unwrap()),
        service_listen: Some("127.0.0.1:0".parse().unwrap()),
        certs_dir: certs.clone(),
        ..Default::default()
    };
    let broker = fleet_broker::start(&broker_config).unwrap();
    let config = fleet_manager::ManagerConfig {
        broker_url: format!("mqtt://{}", broker.internal_addr),
        broker_username: Some(broker.manager_credentials.0.clone()),
        broker_password: Some(broker.manager_credentials.1.clone()),
        data_dir: dir.join("store"),
        certs_dir: certs,
        admin_listen: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let manager = fleet_manager::start(config, Default::default())
        .await
        .unwrap();
    let addresses = json!({
        "admin": manager.admin_addr,
        "internal": broker.internal_addr,
        "bootstrap": broker.bootstrap_tls_addr,
        "service": broker.service_addr,
    });
    let path = dir.join("addresses.json");
    std::fs::write(dir.join("addresses.tmp"), addresses.to_string()).unwrap();
    std::fs::rename(dir.join("addresses.tmp"), path).unwrap();
    std::future::pending::<()>().await;
}

/// The operator API's health: its status and body.
async fn health(addr: SocketAddr) -> Option<(u16, Value)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let head = format!("GET /v1/health HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        anyhow::Ok(String::from_utf8_lossy(&out).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .ok()?
        .ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, serde_json::from_str(body).ok()?))
}

/// Prints the manager's log if the test fails.
struct ShownOnFailure(std::path::PathBuf);

impl Drop for ShownOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.0).unwrap_or_default();
            eprintln!("--- the manager's log ---\n{log}");
        }
    }
}

/// The store's records of `device`: as the operator API shows it, and
/// its history's length.
fn records(store: &Path, device: &str) -> (Option<Value>, usize) {
    let store = fleet_manager::store::Store::open(store).unwrap();
    let record = store
        .device(device)
        .unwrap()
        .map(|r| fleet_manager::admin::device_view(&r));
    (record, store.history(device).unwrap().len())
}

/// The manager's store may fill its disk (here: its files may not grow past
/// 8 MiB, `ulimit -f`) while devices are online. From the first failed
/// write on, the health says so (503, `store_ok` false); a device's request
/// that would change the store gets the error reply `internal`, and an
/// operator's change is refused; the broker keeps routing the devices online;
/// and what was stored before stays as it was.
#[tokio::test]
async fn a_manager_whose_disk_fills_refuses_changes_and_keeps_serving() {
    fleet_testkit::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let (certs, store) = (dir.path().join("certs"), dir.path().join("store"));
    // SIGXFSZ ignored, so that the write fails rather than the process.
    let log = std::fs::File::create(dir.path().join("manager.log")).unwrap();
    let child = std::process::Command::new("bash")
        .arg("-c")
        .arg("trap '' XFSZ; ulimit -f 8192; exec \"$0\" --exact disk::child_serves --nocapture")
        .arg(std::env::current_exe().unwrap())
        .env(CHILD_DIR, dir.path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    let _log = ShownOnFailure(dir.path().join("manager.log"));
    let addresses = dir.path().join("addresses.json");
    let at: Value = eventually(T, "the manager to serve", || {
        let read = std::fs::read_to_string(&addresses).ok();
        async move { read.and_then(|text| serde_json::from_str(&text).ok()) }
    })
    .await
    .unwrap();
    let addr = |name: &str| -> SocketAddr { at[name].as_str().unwrap().parse().unwrap() };
    let (admin, internal, bootstrap, service) = (
        addr("admin"),
        addr("internal"),
        addr("bootstrap"),
        addr("service"),
    );
    assert_eq!(health(admin).await.unwrap().0, 200);
    let api = AdminApi::new(admin.to_string(), Token::File(certs.join("admin.token")));

    let devices = Devices::new(dir.path().join("devices"));
    let mut regs = Vec::new();
    for d in ["full1", "full2"] {
        let key = fleet_device_sim::provision(&devices.store_root, d).unwrap();
        regs.push(
            json!({ "device_id": d, "service_id": "svcA", "factory_key_hex": hex::encode(key) }),
        );
    }
    call(&api, "POST", "/v1/registrations", Some(&json!(regs)))
        .await
        .unwrap();
    let endpoints = fleet_testkit::DeviceEndpoints {
        bootstrap,
        bootstrap_tls: true,
        service,
    };
    devices.spawn(devices.config_for(&endpoints, &certs, "full1", KeyMode::Csr));
    devices.wait_connected("full1", T).await.unwrap();
    let secret = std::fs::read_to_string(certs.join("internal.secret")).unwrap();
    let observer = Probe::with_credentials(
        internal,
        "observer",
        fleet_broker::MANAGER_USER,
        secret.trim(),
    )
    .await
    .unwrap();
    let telemetry = Topic::in_tenant("svcA", Route::Telemetry("full1".into())).to_string();
    observer.subscribe(&telemetry).await.unwrap();
    observer.wait_for(&telemetry, 1, T).await.unwrap();
    // Recorded online: the device's records settle.
    eventually(T, "full1 recorded online", || {
        let api = api.clone();
        async move {
            let shown = call(&api, "GET", "/v1/devices/full1", None).await.ok()?;
            shown["device"]["last_seen_ms"].is_u64().then_some(())
        }
    })
    .await
    .unwrap();
    let full1 = call(&api, "GET", "/v1/devices/full1", None).await.unwrap();

    // Registrations fill the store until a write fails.
    let mut refused = None;
    for batch in 0..400 {
        let regs: Vec<Value> = (0..2000)
            .map(|i| json!({ "device_id": format!("filler-{batch}-{i}"), "service_id": "svcB" }))
            .collect();
        if let Err(err) = call(&api, "POST", "/v1/registrations", Some(&json!(regs))).await {
            refused = Some(err.to_string());
            break;
        }
    }
    let refused = refused.expect("the store filled its 8 MiB");
    assert!(refused.contains("HTTP 500"), "{refused}");
    let (status, shown) = health(admin).await.unwrap();
    assert_eq!(status, 503, "{shown}");
    assert_eq!(shown["store_ok"], false, "{shown}");
    assert_eq!(shown["ok"], false, "{shown}");

    // A device's request that would change the store: refused with a
    // reply, not silence.
    devices.spawn(devices.config_for(&endpoints, &certs, "full2", KeyMode::Csr));
    devices
        .wait_event("full2", T, "activation answered internal", |e| {
            matches!(
                e,
                DeviceEvent::Failed { stage, status: Some(Status::Internal), .. } if stage == "activate"
            )
        })
        .await
        .unwrap();
    // An operator's change: refused for the device, saying why.
    let body = json!({ "devices": ["full1"], "service_id": "svcB" });
    let answer = call(&api, "POST", "/v1/service-change", Some(&body))
        .await
        .unwrap();
    let result = &answer["results"][0];
    assert_eq!(result["ok"], false, "{answer}");
    assert!(
        result["detail"].as_str().unwrap().starts_with("internal"),
        "{answer}"
    );
    assert_eq!(answer["notices_queued"], 0, "{answer}");
    // The broker keeps routing: full1's telemetry still arrives.
    let seen = observer.on(&telemetry).len();
    observer.wait_for(&telemetry, seen + 3, T).await.unwrap();
    // The manager still answers.
    assert_eq!(health(admin).await.unwrap().0, 503);
    assert!(devices
        .events_of("full2")
        .iter()
        .all(|e| !matches!(e, DeviceEvent::Activated { .. })));

    // What was stored before is there as it was: read once the manager
    // is gone (the store is its alone while it runs).
    devices.shutdown.cancel();
    drop(_child);
    let (full1_record, full1_history) = records(&store, "full1");
    let full1_record = full1_record.expect("full1's record");
    for field in ["service_id", "current_cert", "activated_ms", "pending"] {
        assert_eq!(full1_record[field], full1["device"][field], "{field}");
    }
    assert_eq!(full1_record["service_id"], "svcA");
    // Seen again since (its `online` went on being reported), never less.
    assert!(
        full1_record["last_seen_ms"].as_u64() >= full1["device"]["last_seen_ms"].as_u64(),
        "{full1_record} {full1}"
    );
    assert_eq!(full1_history, 1);
    assert_eq!(records(&store, "full2"), (None, 0));
}

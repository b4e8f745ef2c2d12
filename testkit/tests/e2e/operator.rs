//! The operator's side through the `fleet-manager` command line: register,
//! change by service, show, reset; and a device that was offline when its
//! change was requested catches up when it comes back.

use std::time::Duration;

use clap::Parser;
use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_manager::admin::{AdminApi, Token};
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

/// `fleet-manager COMMAND` at the fleet's operator API, with its token.
pub(crate) async fn cli_at(fleet: &Fleet, command: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let (admin, token) = (fleet.admin(), fleet.admin_token_file());
    let mut all = vec![command, "--admin", &admin, "--admin-token-file", &token];
    all.extend_from_slice(args);
    cli(&all).await
}

#[tokio::test]
async fn operator_commands_reach_the_running_manager() {
    let fleet = Fleet::start().await.unwrap();
    let admin = fleet.admin();
    let api = fleet.api();
    let token = fleet.admin_token_file();
    // Subscribed at the broker: healthy (HTTP 200, which `call` requires).
    let health = fleet_manager::admin::call(&api, "GET", "/v1/health", None)
        .await
        .unwrap();
    assert_eq!(health["ok"], true);
    // The address as a URL, too.
    let url = AdminApi::new(format!("http://{admin}/"), api.token.clone());
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
    let out = cli_at(
        &fleet,
        "register",
        &["--service", "svcA", file.to_str().unwrap()],
    )
    .await;
    assert_eq!(out[0]["registered"], json!(2));

    let tasks: Vec<_> = ["op1", "op2"]
        .into_iter()
        .map(|id| devices.spawn(devices.config(&fleet, id, KeyMode::Csr)))
        .collect();
    for id in ["op1", "op2"] {
        devices.wait_connected(id, T).await.unwrap();
    }
    let out = cli_at(
        &fleet,
        "change",
        &[
            "--service",
            "svcB",
            "--from",
            "svcA",
            "--application",
            "metering",
        ],
    )
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
    let shown = &cli_at(&fleet, "show", &["op1"]).await[0];
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
    let out = cli_at(&fleet, "change", &["--service", "svcB", "op1"]).await;
    assert_eq!(out[0]["results"][0]["ok"], json!(false));
    // Which makes `fleet-manager` exit with a failure, for scripts.
    assert_eq!(fleet_manager::cli::refused(&out), 1);

    let summary = &cli_at(&fleet, "summary", &[]).await[0];
    assert_eq!(summary["devices_per_service"]["svcB"], json!(2));
    // Without --admin, the admin API of the configuration file, and the
    // token in its certs_dir.
    let config = fleet.dir.path().join("operator.toml");
    std::fs::write(
        &config,
        format!(
            "admin_listen = \"{admin}\"\ncerts_dir = \"{}\"\n",
            fleet.certs_dir().display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    assert_eq!(&cli(&["--config", config, "summary"]).await[0], summary);
    // Revoking a provider never issued is a 404, and writes nothing.
    let cli_args = [
        "fleet-manager",
        "provider-revoke",
        "--admin",
        &admin,
        "--admin-token-file",
        &token,
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
    let one = fleet_manager::admin::call(&api, "GET", &format!("/v1/certificates/{serial}"), None)
        .await
        .unwrap();
    assert_eq!(one["device_id"], json!("op1"));
    assert_eq!(one["status"], json!("superseded"));
    assert!(
        fleet_manager::admin::call(&api, "GET", "/v1/certificates/00ff", None)
            .await
            .is_err()
    );
    // Superseded certificates are not among the revoked ones.
    let revoked = fleet_manager::admin::call(&api, "GET", "/v1/revoked-certificates", None)
        .await
        .unwrap();
    assert_eq!(revoked, json!([]));
    // The manager's name at the broker is no device id, in any case.
    for id in ["fleet-manager", "Fleet-Manager"] {
        let body = json!([{ "device_id": id, "service_id": "svcA" }]);
        let refused =
            fleet_manager::admin::call(&api, "POST", "/v1/registrations", Some(&body)).await;
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

    cli_at(&fleet, "reset", &["rst1"]).await;
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
    cli_at(&fleet, "reset", &["rst2"]).await;
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
    let token = fleet.admin_token_file();
    let cli = Cli::try_parse_from([
        "fleet-manager",
        "summary",
        "--admin",
        &admin,
        "--admin-token-file",
        &token,
    ])
    .unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(5), execute(cli))
        .await
        .expect("the operator is answered while silent connections are held")
        .unwrap();
    assert!(summary[0]["devices_per_service"].is_object());
    assert!(open(&idle) <= 64);
    drop(idle);
}

/// `pki-init` also makes the secret the manager and an external broker
/// share and the operator API's token (mode 0600, kept once made), names
/// the broker certificate's hosts (`--server-name`), and
/// `mosquitto-config` finds the PKI and the token where the configuration
/// says, without `--certs` or `--admin-token-file`.
#[tokio::test]
async fn pki_init_makes_the_shared_secret_and_mosquitto_config_finds_the_pki() {
    use std::os::unix::fs::PermissionsExt;
    let fleet = Fleet::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("pki");
    let certs_arg = certs.to_str().unwrap();
    cli(&["pki-init", "--dir", certs_arg]).await;
    let mut made = Vec::new();
    // The broker's internal secret, and the operator API's token.
    for name in ["internal.secret", "admin.token"] {
        let path = certs.join(name);
        let secret = std::fs::read_to_string(&path).unwrap();
        assert_eq!(secret.trim().len(), 64, "{name}: {secret:?}");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
        made.push((path, secret));
    }
    assert_ne!(made[0].1, made[1].1);
    cli(&["pki-init", "--dir", certs_arg]).await;
    for (path, secret) in &made {
        assert_eq!(&std::fs::read_to_string(path).unwrap(), secret);
    }
    // The broker certificate names what --server-name gives, and a run
    // without it keeps those names.
    let verifies_as = |flag: &str, name: &str| {
        std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(certs.join("root-ca.pem"))
            .args([flag, name])
            .arg(certs.join("broker.pem"))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(!verifies_as("-verify_hostname", "fleet.test"));
    let named = [
        "pki-init",
        "--dir",
        certs_arg,
        "--server-name",
        "fleet.test",
        "--server-name",
        "10.9.8.7",
    ];
    cli(&named).await;
    for _ in 0..2 {
        assert!(verifies_as("-verify_hostname", "fleet.test"));
        assert!(verifies_as("-verify_ip", "10.9.8.7"));
        assert!(verifies_as("-verify_hostname", "localhost"));
        assert!(!verifies_as("-verify_hostname", "other.test"));
        cli(&["pki-init", "--dir", certs_arg]).await;
    }

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

/// One HTTP request to the operator API as written, with `authorization`
/// if given: its status code.
async fn raw_status(addr: &str, method: &str, path: &str, authorization: Option<&str>) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::time::timeout(T, tokio::net::TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let auth = authorization
        .map(|a| format!("authorization: {a}\r\n"))
        .unwrap_or_default();
    let body = if method == "POST" { "{}" } else { "" };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(T, stream.read_to_end(&mut response))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&response);
    text.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Anyone who can reach the operator API without its token gets nothing
/// from it but liveness: every other route, read or write, is answered 401,
/// the store is unchanged, and the refusals are counted.
#[tokio::test]
async fn the_operator_api_serves_only_the_holder_of_its_token() {
    let (fleet, _probe, _dev) = crate::wire::fleet_with_active_device("tok1").await;
    let admin = fleet.admin();
    let api = fleet.api();
    let before = fleet.snapshot();
    let routes = [
        ("GET", "/v1/devices"),
        ("GET", "/v1/devices/tok1"),
        ("GET", "/v1/summary"),
        ("GET", "/v1/grants"),
        ("GET", "/v1/revoked-certificates"),
        ("POST", "/v1/registrations"),
        ("POST", "/v1/service-change"),
        ("POST", "/v1/devices/tok1/reset"),
        ("POST", "/v1/providers"),
        ("POST", "/v1/providers/p1/revoke"),
    ];
    // The right length, one digit off; another scheme; no header at all.
    let mut wrong = api.token().unwrap().into_bytes();
    wrong[0] = if wrong[0] == b'0' { b'1' } else { b'0' };
    let wrong = String::from_utf8(wrong).unwrap();
    let refusals = [
        None,
        Some(format!("Bearer {wrong}")),
        Some(format!("Basic {}", api.token().unwrap())),
        Some(format!("Bearer {}x", api.token().unwrap())),
        Some("Bearer".to_string()),
    ];
    let mut refused = 0;
    for (method, path) in routes {
        for auth in &refusals {
            let status = raw_status(&admin, method, path, auth.as_deref()).await;
            assert_eq!(status, 401, "{method} {path} with {auth:?}");
            refused += 1;
        }
    }
    // A body sent after the head, as the CLI sends it, gets the answer too,
    // though the manager does not read it.
    let regs: Vec<_> = (0..4000)
        .map(|n| json!({ "device_id": format!("tok-{n}"), "service_id": "svcA" }))
        .collect();
    let wrong_api = AdminApi::new(admin.clone(), Token::Given(wrong.clone()));
    let err =
        fleet_manager::admin::call(&wrong_api, "POST", "/v1/registrations", Some(&json!(regs)))
            .await
            .unwrap_err();
    assert!(err.to_string().contains("HTTP 401"), "{err:#}");
    refused += 1;
    // A device reset without the token leaves the device as it was.
    assert_eq!(
        fleet.snapshot(),
        before,
        "no refused request changed the store"
    );
    // Liveness needs no token; the refusals are counted there.
    assert_eq!(raw_status(&admin, "GET", "/v1/health", None).await, 200);
    let health = fleet_manager::admin::call(&api, "GET", "/v1/health", None)
        .await
        .unwrap();
    assert_eq!(health["operator_requests_refused"], json!(refused));
    // The token, its scheme in any case, is served.
    let auth = format!("bearer {}", api.token().unwrap());
    assert_eq!(
        raw_status(&admin, "GET", "/v1/devices/tok1", Some(&auth)).await,
        200
    );
    // The CLI without the token says where it looked.
    let missing = fleet.dir.path().join("no-such.token");
    let err = execute(
        Cli::try_parse_from([
            "fleet-manager",
            "summary",
            "--admin",
            &admin,
            "--admin-token-file",
            missing.to_str().unwrap(),
        ])
        .unwrap(),
    )
    .await
    .unwrap_err();
    assert!(format!("{err:#}").contains("no-such.token"), "{err:#}");
    // A client given the token's file reads it at each request: it follows
    // a token that changes while it runs (a watcher does).
    let file = fleet.dir.path().join("changing.token");
    let by_file = AdminApi::new(admin.clone(), Token::File(file.clone()));
    std::fs::write(&file, wrong).unwrap();
    let err = fleet_manager::admin::call(&by_file, "GET", "/v1/summary", None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("HTTP 401"), "{err:#}");
    std::fs::write(&file, format!("{}\n", api.token().unwrap())).unwrap();
    fleet_manager::admin::call(&by_file, "GET", "/v1/summary", None)
        .await
        .unwrap();
    // Liveness in any spelling of its path.
    for path in ["/v1/health?probe=1", "//v1/health/"] {
        assert_eq!(raw_status(&admin, "GET", path, None).await, 200, "{path}");
    }
}

/// With `admin_tls` the operator API speaks only TLS, with the broker's
/// certificate: the commands reach it as `https://` and check it against
/// the fleet root; a client that trusts another root, or speaks plain
/// HTTP, gets nothing from it.
#[tokio::test]
async fn the_operator_api_over_tls_is_checked_and_speaks_nothing_else() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fleet = Fleet::start_with(|c| c.admin_tls = true).await.unwrap();
    let api = fleet.api();
    assert!(api.is_https());
    let summary = fleet_manager::admin::call(&api, "GET", "/v1/summary", None)
        .await
        .unwrap();
    assert!(summary["devices_per_service"].is_object(), "{summary}");

    // The commands, given the address as https:// and the root.
    let https = format!("https://{}", fleet.admin());
    let (token, root) = (
        fleet.admin_token_file(),
        fleet.certs_dir().join("root-ca.pem"),
    );
    let root_arg = root.to_str().unwrap();
    let shown = cli(&[
        "summary",
        "--admin",
        &https,
        "--admin-token-file",
        &token,
        "--admin-ca",
        root_arg,
    ])
    .await;
    assert!(shown[0]["devices_per_service"].is_object(), "{shown:?}");
    // By name too: the certificate names localhost.
    let by_name = AdminApi::new(
        format!("https://localhost:{}", fleet.manager().admin_addr.port()),
        Token::File(token.clone().into()),
    )
    .with_root(root.clone());
    fleet_manager::admin::call(&by_name, "GET", "/v1/health", None)
        .await
        .unwrap();

    // A client that trusts another PKI's root refuses the API's
    // certificate before it sends its request (and its token).
    let other = tempfile::tempdir().unwrap();
    let other_pki = fleet_pki::Pki::open_or_create(other.path()).unwrap();
    let stranger = AdminApi::new(https.clone(), Token::File(token.clone().into()))
        .with_root(other_pki.root_pem_path());
    let err = fleet_manager::admin::call(&stranger, "GET", "/v1/summary", None)
        .await
        .unwrap_err();
    // (Both roots are named alike: the signature is what fails.)
    assert!(
        format!("{err:#}").contains("invalid peer certificate"),
        "{err:#}"
    );
    // An https:// address without a root to check it against is an error,
    // not a connection left unchecked.
    let unchecked = AdminApi::new(https.clone(), Token::File(token.into()));
    let err = fleet_manager::admin::call(&unchecked, "GET", "/v1/health", None)
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("no root CA"), "{err:#}");

    // The certificate is the API's own, not the broker's.
    let addr = fleet.manager().admin_addr;
    let ca = root.clone();
    let cn = tokio::task::spawn_blocking(move || {
        let mut tls = openssl::ssl::SslConnector::builder(openssl::ssl::SslMethod::tls()).unwrap();
        tls.set_ca_file(&ca).unwrap();
        let tcp = std::net::TcpStream::connect(addr).unwrap();
        let stream = tls.build().connect("localhost", tcp).unwrap();
        let cert = stream.ssl().peer_certificate().unwrap();
        let cn = cert
            .subject_name()
            .entries_by_nid(openssl::nid::Nid::COMMONNAME)
            .next()
            .unwrap()
            .data()
            .to_string();
        cn
    })
    .await
    .unwrap();
    assert_eq!(cn.unwrap(), "fleetshift operator API");

    // The everyday way: the configuration says admin_tls, and the commands
    // reach the API over TLS, at its address or at a bare --admin; an
    // http:// address is refused before anything is sent.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("manager.toml");
    std::fs::write(
        &config,
        format!(
            "admin_tls = true\nadmin_listen = \"{addr}\"\ncerts_dir = {:?}\n",
            fleet.certs_dir().to_str().unwrap()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let bare = addr.to_string();
    let plain = format!("http://{addr}");
    for args in [
        vec!["--config", config, "summary"],
        vec!["--config", config, "summary", "--admin", &bare],
    ] {
        let shown = cli(&args).await;
        assert!(
            shown[0]["devices_per_service"].is_object(),
            "{args:?}: {shown:?}"
        );
    }
    let args = [
        "fleet-manager",
        "--config",
        config,
        "summary",
        "--admin",
        &plain,
    ];
    let err = execute(Cli::try_parse_from(args).unwrap())
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("TLS only"), "{err:#}");
    // An external broker's configuration, from the registry over TLS.
    let out = dir.path().join("mq");
    let out_arg = out.to_str().unwrap();
    cli(&["--config", config, "mosquitto-config", "--out", out_arg]).await;
    assert!(std::fs::read_to_string(out.join("cafile.pem"))
        .unwrap()
        .starts_with(&std::fs::read_to_string(&root).unwrap()));

    // Plain HTTP gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(fleet.manager().admin_addr)
        .await
        .unwrap();
    plain
        .write_all(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(T, plain.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

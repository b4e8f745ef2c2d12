//! A service CA rolled over by the operator while its devices are online:
//! the devices it certified keep working, new certificates come from the
//! successor, and each generation revokes through its own CRL.

use std::path::Path;
use std::time::Duration;

use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_manager::admin::call;
use fleet_protocol::{Route, Topic};
use fleet_testkit::{openssl_verify, tls_refusal, tls_refused, write_file, Devices, Fleet, Probe};

use crate::operator::cli_at;
use openssl::x509::{CrlStatus, X509Crl, X509};
use serde_json::json;

const T: Duration = Duration::from_secs(30);

fn telemetry(service: &str, device: &str) -> String {
    Topic::in_tenant(service, Route::Telemetry(device.into())).to_string()
}

/// Whether the CRL at `crl` revokes `serial` (hex, as the store keeps it).
fn lists(crl: &Path, serial: &str) -> bool {
    let Some(crl) = std::fs::read(crl)
        .ok()
        .and_then(|pem| X509Crl::from_pem(&pem).ok())
    else {
        return false;
    };
    let serial = openssl::bn::BigNum::from_hex_str(serial)
        .unwrap()
        .to_asn1_integer()
        .unwrap();
    matches!(crl.get_by_serial(&serial), CrlStatus::Revoked(_))
}

/// `device`'s key and chain for svcA, as it stored them.
fn credentials(devices: &Devices, device: &str) -> (Vec<u8>, Vec<u8>) {
    let creds = devices
        .store(device)
        .unwrap()
        .service_credentials("svcA")
        .unwrap()
        .expect("credentials for svcA");
    (creds.chain_pem, creds.key_pem)
}

/// Waits until the service listener refuses `chain`/`key` (PEM) at the
/// handshake, with `alert` if given.
async fn refused(
    fleet: &Fleet,
    root: &[u8],
    (chain, key): (&[u8], &[u8]),
    alert: Option<rustls::AlertDescription>,
) {
    let addr = fleet.service_addr();
    let what = format!("the certificate refused ({alert:?})");
    fleet_testkit::eventually(T, &what, || async move {
        let said = tls_refusal(addr, root, (chain, key), Duration::from_millis(300))
            .await
            .unwrap();
        (said.is_some() && (alert.is_none() || said == alert)).then_some(())
    })
    .await
    .unwrap();
}

/// `device`'s current certificate, as the manager recorded it.
fn current_serial(fleet: &Fleet, device: &str) -> String {
    let record = fleet.core().store.device(device).unwrap().unwrap();
    record.current_cert.unwrap()
}

/// Provisions `device` in svcA, starts it and waits until it is connected.
async fn online_in_svca(fleet: &Fleet, devices: &Devices, device: &str) {
    devices.provision(fleet, device, "svcA").await.unwrap();
    devices.spawn(devices.config(fleet, device, KeyMode::Csr));
    connected_to(devices, device, "svcA").await;
}

async fn connected_to(devices: &Devices, device: &str, service: &str) {
    let service = service.to_owned();
    devices
        .wait_event(
            device,
            T,
            &format!("connected to {service}"),
            |e| matches!(e, DeviceEvent::Connected { service_id } if *service_id == service),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn a_rolled_over_service_ca_keeps_its_devices_and_certifies_under_the_successor() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let observer = fleet.privileged("observer").await.unwrap();
    observer.subscribe("/tenants/+/telemetry/+").await.unwrap();
    let api = fleet.api();
    let root_path = fleet.certs_dir().join("root-ca.pem");
    let root = std::fs::read(&root_path).unwrap();
    let pki = &fleet.core().pki;

    online_in_svca(&fleet, &devices, "old1").await;
    let (old_chain, old_key) = credentials(&devices, "old1");
    let old_serial = current_serial(&fleet, "old1");

    // The operator rolls svcA's CA over (`fleet-manager service-ca svcA
    // --roll`) and lists its generations.
    let rolled = cli_at(&fleet, "service-ca", &["svcA", "--roll"]).await[0].clone();
    assert_eq!(rolled["generation"], json!(2));
    assert_eq!(rolled["issuing"], json!(true));
    assert_eq!(
        rolled["subject"],
        json!("O=svcA, CN=fleetshift service CA svcA 2")
    );
    let listed = cli_at(&fleet, "service-ca", &["svcA"]).await[0].clone();
    let generations: Vec<_> = listed["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["generation"].clone(),
                g["issuing"].clone(),
                g["live_certificates"].clone(),
            )
        })
        .collect();
    // old1's certificate is the first generation's one live certificate.
    assert_eq!(
        generations,
        [
            (json!(1), json!(false), json!(1)),
            (json!(2), json!(true), json!(0))
        ]
    );
    for (path, code) in [
        ("/v1/services/svcZ/ca", "404"),
        ("/v1/services/sv-c/ca", "400"),
    ] {
        let err = call(&api, "GET", path, None).await.unwrap_err().to_string();
        assert!(err.contains(code), "{path}: {err}");
    }
    let err = call(&api, "POST", "/v1/services/svcZ/ca/roll", None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("404"), "{err}");
    assert!(
        !pki.service_ca_path_of("svcZ", 1).exists(),
        "no CA made for svcZ"
    );
    // The successor's CRL is there before it issues anything.
    let successor = pki.service_ca_path_of("svcA", 2);
    let out = std::process::Command::new("openssl")
        .args(["crl", "-noout", "-in"])
        .arg(pki.crl_path_of("svcA", 2))
        .arg("-CAfile")
        .arg(&successor)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("verify OK"),
        "{out:?}"
    );

    // A device certified now gets the successor's chain and connects with
    // it at once, before or after the broker looked at `services/` again.
    online_in_svca(&fleet, &devices, "new1").await;
    observer
        .wait_for(&telemetry("svcA", "new1"), 1, T)
        .await
        .unwrap();
    let (new_chain, new_key) = credentials(&devices, "new1");
    let new_certs = X509::stack_from_pem(&new_chain).unwrap();
    let successor_der = X509::from_pem(&std::fs::read(&successor).unwrap())
        .unwrap()
        .to_der()
        .unwrap();
    assert_eq!(new_certs[1].to_der().unwrap(), successor_der);
    let dir = fleet.dir.path();
    let new_leaf = write_file(dir, "new1.pem", &new_certs[0].to_pem().unwrap()).unwrap();
    openssl_verify(&root_path, &successor, &new_leaf, None).unwrap();
    assert!(openssl_verify(&root_path, &pki.service_ca_path("svcA"), &new_leaf, None).is_err());
    let new_serial = current_serial(&fleet, "new1");
    assert_eq!(
        fleet
            .core()
            .store
            .cert(&new_serial)
            .unwrap()
            .unwrap()
            .ca_generation,
        2
    );

    // Once the broker has the successor loaded, the leaf alone is enough
    // (the successor is a trust anchor); and the first generation's
    // certificate is still taken, so no device had to move.
    let leaf_only = new_certs[0].to_pem().unwrap();
    fleet_testkit::eventually(T, "the successor loaded by the broker", || {
        let (root, leaf, key) = (root.clone(), leaf_only.clone(), new_key.clone());
        let addr = fleet.service_addr();
        async move {
            let refused = tls_refused(addr, &root, (&leaf, &key), Duration::from_millis(300))
                .await
                .unwrap();
            (!refused).then_some(())
        }
    })
    .await
    .unwrap();
    // A whole new connection, CONNACK and all (the device's session is
    // taken over by it, and the device comes back).
    drop(
        Probe::mtls(
            fleet.service_addr(),
            "old1",
            &root_path,
            old_chain.clone(),
            old_key.clone(),
        )
        .await
        .unwrap(),
    );
    let seen = observer.on(&telemetry("svcA", "old1")).len();
    observer
        .wait_for(&telemetry("svcA", "old1"), seen + 2, T)
        .await
        .unwrap();

    // Both move to svcB: each svcA certificate is revoked in the CRL of
    // the generation that issued it, and refused at the handshake.
    fleet.change(&["old1", "new1"], "svcB").await.unwrap();
    for device in ["old1", "new1"] {
        connected_to(&devices, device, "svcB").await;
    }
    let (first_crl, second_crl) = (pki.crl_path_of("svcA", 1), pki.crl_path_of("svcA", 2));
    fleet_testkit::eventually(T, "both svcA certificates revoked", || {
        let done = lists(&first_crl, &old_serial) && lists(&second_crl, &new_serial);
        async move { done.then_some(()) }
    })
    .await
    .unwrap();
    assert!(!lists(&first_crl, &new_serial));
    assert!(!lists(&second_crl, &old_serial));
    let generations: Vec<(String, u32)> = fleet
        .core()
        .store
        .revoked_of("svcA")
        .unwrap()
        .into_iter()
        .map(|r| (r.serial, r.ca_generation))
        .collect();
    assert!(
        generations.contains(&(old_serial.clone(), 1)),
        "{generations:?}"
    );
    assert!(
        generations.contains(&(new_serial.clone(), 2)),
        "{generations:?}"
    );
    for (chain, key) in [(&old_chain, &old_key), (&new_chain, &new_key)] {
        refused(&fleet, &root, (chain, key), None).await;
    }
    // Each CRL as `openssl verify -crl_check` reads it with its CA.
    let old_leaf = write_file(
        dir,
        "old1.pem",
        &X509::stack_from_pem(&old_chain).unwrap()[0]
            .to_pem()
            .unwrap(),
    )
    .unwrap();
    for (ca, leaf, crl) in [
        (pki.service_ca_path("svcA"), &old_leaf, &first_crl),
        (successor.clone(), &new_leaf, &second_crl),
    ] {
        let err = openssl_verify(&root_path, &ca, leaf, Some(crl))
            .unwrap_err()
            .to_string();
        assert!(err.contains("revoked"), "{err}");
    }
    // No request refused; old1 lost only the connection taken over above.
    for device in ["old1", "new1"] {
        assert!(
            devices.events_of(device).iter().all(|e| match e {
                DeviceEvent::Failed { status, .. } => device == "old1" && status.is_none(),
                _ => true,
            }),
            "{:?}",
            devices.events_of(device)
        );
    }
    devices.shutdown.cancel();
}

/// A service CA key known to be stolen: the operator rolls the CA over and
/// retires the older generation at once (`service-ca svcA --roll
/// --retire-older`). Its certificates are revoked, so the live session of
/// one is cut; the old CA is trusted no more; and the device, refused,
/// comes back through the bootstrap listener with a certificate of the
/// successor.
#[tokio::test]
async fn a_stolen_service_ca_is_retired_at_once_and_its_devices_come_back_under_the_successor() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let observer = fleet.privileged("observer").await.unwrap();
    observer.subscribe("/tenants/+/telemetry/+").await.unwrap();
    let root = std::fs::read(fleet.certs_dir().join("root-ca.pem")).unwrap();
    let pki = &fleet.core().pki;

    online_in_svca(&fleet, &devices, "vic1").await;
    let (old_chain, old_key) = credentials(&devices, "vic1");
    let old_serial = current_serial(&fleet, "vic1");

    // The thief, with the old CA's key, makes itself a certificate for a
    // provider the registry grants svcA, and holds a session with it: a
    // serial on no CRL.
    call(
        &fleet.api(),
        "POST",
        "/v1/providers",
        Some(&json!({ "name": "prov1", "service_id": "svcA" })),
    )
    .await
    .unwrap();
    let (old_ca, old_ca_key) = pki.service_ca("svcA").unwrap();
    let (forged_chain, forged_key) =
        crate::frontdoor::forged_leaf("provider.prov1", "svcA", (&old_ca, &old_ca_key), (-1, 30));
    let thief = Probe::mtls(
        fleet.service_addr(),
        "provider.prov1",
        &fleet.certs_dir().join("root-ca.pem"),
        forged_chain.clone(),
        forged_key.clone(),
    )
    .await
    .unwrap();
    thief.subscribe("/tenants/svcA/telemetry/+").await.unwrap();
    thief
        .wait_for(&telemetry("svcA", "vic1"), 1, T)
        .await
        .unwrap();

    let rolled =
        cli_at(&fleet, "service-ca", &["svcA", "--roll", "--retire-older"]).await[0].clone();
    assert_eq!(rolled["generation"], json!(2));
    // The device's certificate and the provider's.
    assert_eq!(rolled["revoked"], json!(2));
    assert_eq!(rolled["retired"], json!([1]));
    // The forged session is cut too: its CA is no longer trusted.
    thief
        .wait_cut(T, "the session of the forged certificate cut")
        .await
        .unwrap();
    // And it cannot come back, old CA in hand.
    refused(&fleet, &root, (&forged_chain, &forged_key), None).await;
    // The old generation: its key gone, its certificate out of `services/`,
    // its CRL still there, listing the device's certificate.
    let services = fleet.certs_dir().join("services");
    assert!(!services.join("svcA-ca.key").exists());
    assert!(!services.join("svcA-ca.pem").exists());
    assert!(services.join("retired").join("svcA-ca.pem").exists());
    assert!(lists(&pki.crl_path("svcA"), &old_serial));
    let listed = cli_at(&fleet, "service-ca", &["svcA"]).await[0].clone();
    assert_eq!(listed["generations"].as_array().unwrap().len(), 1);
    refused(&fleet, &root, (&old_chain, &old_key), None).await;

    // Cut, refused, the device asks for another certificate and comes back.
    devices
        .wait_event("vic1", T, "a certificate of the successor", |_| {
            credentials(&devices, "vic1").0 != old_chain
        })
        .await
        .unwrap();
    let (new_chain, _) = credentials(&devices, "vic1");
    let successor =
        X509::from_pem(&std::fs::read(pki.service_ca_path_of("svcA", 2)).unwrap()).unwrap();
    assert_eq!(
        X509::stack_from_pem(&new_chain).unwrap()[1]
            .to_der()
            .unwrap(),
        successor.to_der().unwrap()
    );
    let connects = |devices: &Devices| {
        devices
            .events_of("vic1")
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Connected { .. }))
            .count()
    };
    devices
        .wait_event("vic1", T, "connected again", |_| connects(&devices) >= 2)
        .await
        .unwrap();
    let seen = observer.on(&telemetry("svcA", "vic1")).len();
    observer
        .wait_for(&telemetry("svcA", "vic1"), seen + 2, T)
        .await
        .unwrap();
    let old = fleet.core().store.cert(&old_serial).unwrap().unwrap();
    assert!(old.revoked_ms.is_some());
    let record = fleet.core().store.device("vic1").unwrap().unwrap();
    assert_eq!(record.service_id, "svcA");
    let current = fleet
        .core()
        .store
        .cert(record.current_cert.as_deref().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(current.ca_generation, 2);
    devices.shutdown.cancel();
}

/// A device away while its CA was retired for a stolen key, and long
/// enough for that CA's CRL to have been swept: its certificate is now
/// refused with `unknown_ca` only, and once its patience is out (here 2 s,
/// 60 by default) it asks the bootstrap listener for another.
#[tokio::test]
async fn a_device_away_while_its_ca_was_retired_asks_for_another_after_unknown_ca() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    devices.provision(&fleet, "away1", "svcA").await.unwrap();
    let task = devices.spawn(devices.config(&fleet, "away1", KeyMode::Csr));
    connected_to(&devices, "away1", "svcA").await;
    task.abort();
    let _ = task.await;
    let (old_chain, old_key) = credentials(&devices, "away1");
    let root = std::fs::read(fleet.certs_dir().join("root-ca.pem")).unwrap();
    let rolled =
        cli_at(&fleet, "service-ca", &["svcA", "--roll", "--retire-older"]).await[0].clone();
    assert_eq!(rolled["revoked"], json!(1));
    let old = (&old_chain[..], &old_key[..]);
    refused(
        &fleet,
        &root,
        old,
        Some(rustls::AlertDescription::CertificateRevoked),
    )
    .await;
    // Swept, as housekeeping does once it is past half its validity.
    let crl = fleet.core().pki.crl_path("svcA");
    let swept = crl.parent().unwrap().join("retired");
    std::fs::create_dir_all(&swept).unwrap();
    std::fs::rename(&crl, swept.join("svcA.crl.pem")).unwrap();
    refused(
        &fleet,
        &root,
        old,
        Some(rustls::AlertDescription::UnknownCA),
    )
    .await;

    let mut config = devices.config(&fleet, "away1", KeyMode::Csr);
    config.unknown_ca_patience = Duration::from_secs(2);
    devices.spawn(config);
    devices
        .wait_event("away1", T, "a certificate of the successor", |_| {
            credentials(&devices, "away1").0 != old_chain
        })
        .await
        .unwrap();
    devices
        .wait_event("away1", T, "connected again", |e| {
            matches!(e, DeviceEvent::Connected { .. })
        })
        .await
        .unwrap();
    let refusals: Vec<String> = devices
        .events_of("away1")
        .iter()
        .filter_map(|e| match e {
            DeviceEvent::Failed { error, .. } => Some(error.clone()),
            _ => None,
        })
        .collect();
    let unknown = refusals
        .iter()
        .filter(|e| e.contains("CA unknown to the server"))
        .count();
    assert!(unknown >= 3, "{refusals:?}");
    assert!(
        refusals.iter().all(|e| !e.contains("Revoked")),
        "{refusals:?}"
    );
    let (new_chain, _) = credentials(&devices, "away1");
    let successor = std::fs::read(fleet.core().pki.service_ca_path_of("svcA", 2)).unwrap();
    assert_eq!(
        X509::stack_from_pem(&new_chain).unwrap()[1]
            .to_der()
            .unwrap(),
        X509::from_pem(&successor).unwrap().to_der().unwrap()
    );
    devices.shutdown.cancel();
}

/// Whether the TLS listener at `addr` serves a certificate that `root`
/// (PEM) alone vouches for, as `localhost`.
async fn served_under(addr: std::net::SocketAddr, root: &[u8]) -> bool {
    fleet_testkit::server_name_served(addr, root, "localhost")
        .await
        .unwrap_or(false)
}

#[tokio::test]
async fn a_rolled_over_root_is_pinned_by_devices_and_either_root_verifies_the_broker() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let certs = fleet.certs_dir().to_path_buf();
    let first_root = std::fs::read(certs.join("root-ca.pem")).unwrap();
    let endpoints = fleet_testkit::DeviceEndpoints::of(&fleet.broker);
    assert!(
        endpoints.bootstrap_tls,
        "the bootstrap listener is TLS here"
    );

    online_in_svca(&fleet, &devices, "early1").await;
    // Before the roll there is nothing to learn.
    let stored = |device: &str| {
        std::fs::read(
            fleet
                .dir
                .path()
                .join("devices")
                .join(device)
                .join(fleet_device_sim::store::ROOTS_FILE),
        )
        .ok()
    };
    assert!(stored("early1").is_none());

    // The operator rolls the root over (`fleet-manager root-ca --roll`).
    let rolled = cli_at(&fleet, "root-ca", &["--roll"]).await[0].clone();
    assert_eq!(rolled["generation"], json!(2));
    assert_eq!(rolled["subject"], json!("CN=fleetshift root CA 2"));
    let listed = cli_at(&fleet, "root-ca", &[]).await[0].clone();
    let issuing: Vec<_> = listed["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["generation"].clone(), g["issuing"].clone()))
        .collect();
    assert_eq!(issuing, [(json!(1), json!(false)), (json!(2), json!(true))]);
    // early1 has not reported since: it pins only the first root so far,
    // as its reports said (`pinned_roots`).
    assert_eq!(listed["devices_reported_since_roll"], json!(0));
    assert_eq!(listed["not_reported"], json!(["early1"]));
    let pinning = |listed: &serde_json::Value| -> Vec<serde_json::Value> {
        listed["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["devices_pinning"].clone())
            .collect()
    };
    assert_eq!(pinning(&listed), [json!(1), json!(0)]);
    assert_eq!(listed["devices_pinning_newest"], json!(0));
    assert_eq!(listed["not_pinning_newest"], json!(["early1"]));
    assert_eq!(listed["devices_not_saying"], json!(0));
    let second_root = std::fs::read(certs.join("root-ca.2.pem")).unwrap();

    // Both listeners serve the new root's certificate within a second or
    // so, and a client that pins only the first root still verifies it,
    // through the cross-certificate served after it.
    for addr in [fleet.service_addr(), endpoints.bootstrap] {
        fleet_testkit::eventually(T, "the new root's certificate served", || {
            let root = second_root.clone();
            async move { served_under(addr, &root).await.then_some(()) }
        })
        .await
        .unwrap();
        assert!(
            served_under(addr, &first_root).await,
            "through the cross-certificate"
        );
    }

    // A device online since before the roll pins both roots, newest
    // first, at its next reply (here, its `online` report after a
    // reconnection forced by taking over its session).
    // Reports count from the second after the roll's (its time is in
    // whole seconds).
    let made_at = rolled["made_at"].as_u64().unwrap();
    fleet_testkit::eventually(T, "the second after the roll", || async move {
        (fleet_protocol::now_ms() / 1000 > made_at).then_some(())
    })
    .await
    .unwrap();
    let (chain, key) = credentials(&devices, "early1");
    let taker = Probe::mtls(
        fleet.service_addr(),
        "early1",
        &certs.join("root-ca.pem"),
        chain,
        key,
    )
    .await
    .unwrap();
    drop(taker);
    let expected: Vec<u8> = [second_root.clone(), first_root.clone()].concat();
    fleet_testkit::eventually(T, "early1 pins both roots", || {
        let found = stored("early1");
        let expected = expected.clone();
        async move { (found.as_deref() == Some(expected.as_slice())).then_some(()) }
    })
    .await
    .unwrap();
    // Its `online` report since counts (its answer, or a poll's, gave it
    // the roots).
    fleet_testkit::eventually(T, "early1 counted as reported since the roll", || {
        let fleet = &fleet;
        async move {
            let listed = cli_at(fleet, "root-ca", &[]).await[0].clone();
            (listed["devices_reported_since_roll"] == json!(1)
                && listed["devices_not_reported_since_roll"] == json!(0))
            .then_some(())
        }
    })
    .await
    .unwrap();
    // And it said it pins the new root (`roots_pinned`, at once).
    fleet_testkit::eventually(T, "early1 counted as pinning the new root", || {
        let fleet = &fleet;
        async move {
            let listed = cli_at(fleet, "root-ca", &[]).await[0].clone();
            (listed["devices_pinning_newest"] == json!(1)
                && listed["devices_not_pinning_newest"] == json!(0)
                && pinning(&listed) == [json!(1), json!(1)])
            .then_some(())
        }
    })
    .await
    .unwrap();

    // svcB is new: its CA comes from the second root, so early1 checks
    // its svcB chain with the root it learned, and connects.
    fleet.change(&["early1"], "svcB").await.unwrap();
    connected_to(&devices, "early1", "svcB").await;
    let svc_b_ca = certs.join("services/svcB-ca.pem");
    let roots_dir = fleet.dir.path();
    let second_root_path = write_file(roots_dir, "second-root.pem", &second_root).unwrap();
    let first_root_path = write_file(roots_dir, "first-root.pem", &first_root).unwrap();
    let leaf = write_file(roots_dir, "early1-svcb.pem", &{
        let creds = devices
            .store("early1")
            .unwrap()
            .service_credentials("svcB")
            .unwrap()
            .expect("credentials for svcB");
        creds.chain_pem
    })
    .unwrap();
    openssl_verify(&second_root_path, &svc_b_ca, &leaf, None).unwrap();
    assert!(openssl_verify(&first_root_path, &svc_b_ca, &leaf, None).is_err());

    // A device that pins only the first root and was away during the
    // roll: it activates through the bootstrap listener (the cross-
    // certificate), learns the new root from its activation's reply,
    // and takes a svcB certificate that only the new root verifies.
    devices.provision(&fleet, "away1", "svcB").await.unwrap();
    let away1 = devices.spawn(devices.config(&fleet, "away1", KeyMode::Csr));
    connected_to(&devices, "away1", "svcB").await;
    assert_eq!(stored("away1").as_deref(), Some(expected.as_slice()));
    // Started again with a configured root file no broker certificate
    // chains to, it connects with the roots it stored.
    away1.abort();
    let _ = away1.await;
    let connects = |device: &str| {
        devices
            .events_of(device)
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Connected { .. }))
            .count()
    };
    let before = connects("away1");
    let mut config = devices.config(&fleet, "away1", KeyMode::Csr);
    config.root_ca_pem = certs.join("services/svcA-ca.pem");
    devices.spawn(config);
    fleet_testkit::eventually(T, "away1 connected again, by its stored roots", || {
        let now = connects("away1");
        async move { (now > before).then_some(()) }
    })
    .await
    .unwrap();

    // A device made after the roll, given only the new root: it links the
    // first root to it by the back-certificate, and pins both.
    devices.provision(&fleet, "late1", "svcA").await.unwrap();
    let mut config = devices.config(&fleet, "late1", KeyMode::ManagerGenerated);
    config.root_ca_pem = certs.join("root-ca.2.pem");
    devices.spawn(config);
    connected_to(&devices, "late1", "svcA").await;
    assert_eq!(stored("late1").as_deref(), Some(expected.as_slice()));
    fleet_testkit::eventually(T, "all three counted as pinning the new root", || {
        let fleet = &fleet;
        async move {
            let listed = cli_at(fleet, "root-ca", &[]).await[0].clone();
            (listed["devices_pinning_newest"] == json!(3)
                && listed["not_pinning_newest"] == json!([]))
            .then_some(())
        }
    })
    .await
    .unwrap();
}

/// The operator rolls the manager's signing key over while a device is
/// online. Every message from then on is signed by the new key and
/// carries its certificate: the device takes the key by the root it pins
/// (a service-change notice moves it), stores it, and takes messages by
/// it after a restart too.
#[tokio::test]
async fn a_rolled_over_signing_key_is_taken_by_devices_from_its_certificate() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let certs = fleet.certs_dir().to_path_buf();
    let first_key = fleet.core().pki.signing_key();
    let task = {
        devices.provision(&fleet, "sig1", "svcA").await.unwrap();
        devices.spawn(devices.config(&fleet, "sig1", KeyMode::Csr))
    };
    connected_to(&devices, "sig1", "svcA").await;
    let stored = || {
        std::fs::read(
            fleet
                .dir
                .path()
                .join("devices/sig1")
                .join(fleet_device_sim::store::SIGNER_FILE),
        )
        .ok()
    };
    assert!(stored().is_none());
    // Its reports name the key it takes messages by: the first.
    let taking = |listed: &serde_json::Value| -> Vec<serde_json::Value> {
        listed["generations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["devices_taking"].clone())
            .collect()
    };
    fleet_testkit::eventually(T, "sig1 counted on the first key", || {
        let fleet = &fleet;
        async move {
            let listed = cli_at(fleet, "signing-key", &[]).await[0].clone();
            (taking(&listed) == [json!(1)] && listed["devices_not_saying"] == json!(0))
                .then_some(())
        }
    })
    .await
    .unwrap();

    let rolled = cli_at(&fleet, "signing-key", &["--roll"]).await[0].clone();
    assert_eq!(rolled["generation"], json!(2));
    assert_eq!(rolled["signing"], json!(true));
    let listed = cli_at(&fleet, "signing-key", &[]).await[0].clone();
    let generations: Vec<_> = listed["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["generation"].clone(), g["signing"].clone()))
        .collect();
    assert_eq!(
        generations,
        [(json!(1), json!(false)), (json!(2), json!(true))]
    );
    let cert_pem = std::fs::read(certs.join("manager-sign.2.pem")).unwrap();
    let cert = X509::from_pem(&cert_pem).unwrap();
    assert!(!cert.public_key().unwrap().public_eq(&first_key));
    // Its certificate verifies to the root, as a device checks it.
    let root = certs.join("root-ca.pem");
    let leaf = write_file(fleet.dir.path(), "signer.pem", &cert_pem).unwrap();
    openssl_verify(&root, &root, &leaf, None).unwrap();
    assert!(fleet
        .core()
        .store
        .audit_log()
        .unwrap()
        .iter()
        .any(|a| a.action == "signing_key_roll"));

    // The notice of a change is signed by the new key alone: the device
    // takes it, and moves.
    fleet.change(&["sig1"], "svcB").await.unwrap();
    connected_to(&devices, "sig1", "svcB").await;
    assert_eq!(stored(), Some(cert.to_pem().unwrap()));
    // Its report from svcB names the new key.
    fleet_testkit::eventually(T, "sig1 counted on the new key", || {
        let fleet = &fleet;
        async move {
            let listed = cli_at(fleet, "signing-key", &[]).await[0].clone();
            (taking(&listed) == [json!(0), json!(1)] && listed["devices_not_on_newest"] == json!(0))
                .then_some(())
        }
    })
    .await
    .unwrap();
    // Started again, it takes messages by the key it stored: a second
    // change moves it as well.
    task.abort();
    let _ = task.await;
    let connects = |service: &str| {
        devices
            .events_of("sig1")
            .iter()
            .filter(|e| matches!(e, DeviceEvent::Connected { service_id } if service_id == service))
            .count()
    };
    let before = connects("svcA");
    devices.spawn(devices.config(&fleet, "sig1", KeyMode::Csr));
    fleet.change(&["sig1"], "svcA").await.unwrap();
    fleet_testkit::eventually(T, "sig1 back in svcA", || {
        let now = connects("svcA");
        async move { (now > before).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(stored(), Some(cert.to_pem().unwrap()));
    // And it takes them by that key alone: a notice signed by the key
    // before, as whoever stole it would send one, is rejected.
    let rejected = || {
        devices
            .events_of("sig1")
            .iter()
            .filter(|e| matches!(e, DeviceEvent::NoticeRejected { .. }))
            .count()
    };
    let (before, in_b) = (rejected(), connects("svcB"));
    let forged = fleet_protocol::ServiceChange {
        device_id: "sig1".into(),
        seq: u64::MAX / 2,
        change_id: "forged".into(),
        service_id: "svcB".into(),
        provider: None,
        application: None,
        endpoint: None,
        ts: fleet_protocol::now_ms(),
    };
    let env =
        fleet_protocol::Envelope::build(fleet_protocol::Kind::ServiceChange, &forged, |tbs| {
            fleet_protocol::crypto::sign(&first_key, tbs)
        })
        .unwrap();
    let thief = fleet.privileged("thief").await.unwrap();
    thief
        .publish(
            &Topic::in_tenant("svcA", Route::ServiceChange("sig1".into())).to_string(),
            env.encode(),
        )
        .await
        .unwrap();
    fleet_testkit::eventually(T, "the forged notice rejected", || {
        let now = rejected();
        async move { (now > before).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(connects("svcB"), in_b, "it did not move");
}

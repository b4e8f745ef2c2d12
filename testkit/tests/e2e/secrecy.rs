//! A client subscribed to `#` through a full flow sees no device-auth UUID
//! and no private key in clear.

use std::time::Duration;

use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_testkit::{Devices, Fleet};
use openssl::pkey::PKey;

const T: Duration = Duration::from_secs(30);

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn sniffer_on_every_topic_sees_no_secret() {
    let fleet = Fleet::start().await.unwrap();
    let devices = Devices::new(fleet.dir.path().join("devices"));
    let sniffer = fleet.privileged("sniffer").await.unwrap();
    sniffer.subscribe("#").await.unwrap();
    devices.provision(&fleet, "dev1", "svcA").await.unwrap();
    devices.provision(&fleet, "dev2", "svcA").await.unwrap();
    let _t1 = devices.spawn(devices.config(&fleet, "dev1", KeyMode::ManagerGenerated));
    let _t2 = devices.spawn(devices.config(&fleet, "dev2", KeyMode::Csr));
    for d in ["dev1", "dev2"] {
        devices.wait_connected(d, T).await.unwrap();
    }
    fleet.change(&["dev1", "dev2"], "svcB").await.unwrap();
    for d in ["dev1", "dev2"] {
        devices
            .wait_event(d, T, "moved to svcB", |e| {
                matches!(e, DeviceEvent::ChangeAccepted { .. })
            })
            .await
            .unwrap();
    }

    sniffer
        .wait_for("/tenants/svcB/telemetry/dev1", 1, T)
        .await
        .unwrap();
    let messages = sniffer.messages();
    // The sniffer did see the whole exchange, tenant topics included.
    for topic in [
        "fleet/v1/activate/dev1/reply",
        "fleet/v1/update/dev1/reply",
        "/tenants/svcA/fleet/v1/update/dev1/reply",
        "/tenants/svcB/telemetry/dev1",
    ] {
        assert!(
            messages.iter().any(|m| m.topic == topic),
            "sniffer missed {topic}"
        );
    }

    let mut secrets: Vec<(String, Vec<u8>)> = Vec::new();
    for d in ["dev1", "dev2"] {
        let store = devices.store(d).unwrap();
        let uuid = store.state().uuid.clone().expect("activated");
        let text = uuid::Uuid::from_slice(&uuid).unwrap();
        secrets.push((format!("{d} uuid"), uuid.clone()));
        secrets.push((format!("{d} uuid text"), text.to_string().into_bytes()));
        secrets.push((format!("{d} uuid hex"), hex::encode(&uuid).into_bytes()));
        for service in ["svcA", "svcB"] {
            let creds = store
                .service_credentials(service)
                .unwrap()
                .expect("credentials kept");
            let key = PKey::private_key_from_pem(&creds.key_pem).unwrap();
            secrets.push((
                format!("{d} {service} key pkcs8"),
                key.private_key_to_pkcs8().unwrap(),
            ));
            let scalar = key.ec_key().unwrap().private_key().to_vec();
            secrets.push((format!("{d} {service} key scalar"), scalar));
        }
        let factory = store.factory_key().ec_key().unwrap().private_key().to_vec();
        secrets.push((format!("{d} factory scalar"), factory));
    }
    for m in &messages {
        assert!(
            !contains(&m.payload, b"PRIVATE KEY"),
            "PEM key on {}",
            m.topic
        );
        for (what, secret) in &secrets {
            assert!(
                !contains(&m.payload, secret),
                "{what} in clear on {}",
                m.topic
            );
        }
    }
}

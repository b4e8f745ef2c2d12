//! The manager's handling of a request, on any payload: envelope, CRC,
//! body, checks and the error reply, for every request kind on its
//! bootstrap and tenant topics, against a registry with one active device
//! and one registered device. The first byte picks the topic.
#![no_main]

use std::sync::{Arc, OnceLock};

use fleet_manager::store::{Registration, Store, SCHEMA_VERSION};
use fleet_manager::{Core, ManagerConfig};
use fleet_protocol::{crypto, ActivateRequest, Envelope, Kind};
use libfuzzer_sys::fuzz_target;

const TOPICS: [&str; 10] = [
    "fleet/v1/activate/dev1",
    "fleet/v1/activate/dev2",
    "fleet/v1/update/dev1",
    "fleet/v1/poll/dev1",
    "fleet/v1/status/dev1",
    "/tenants/svcA/fleet/v1/update/dev1",
    "/tenants/svcA/fleet/v1/poll/dev1",
    "/tenants/svcA/fleet/v1/status/dev1",
    "/tenants/svcB/fleet/v1/poll/dev1",
    "fleet/v1/update/ghost",
];

/// A manager with dev1 active on svcA and dev2 registered there.
fn core() -> &'static Core {
    static CORE: OnceLock<(tempfile::TempDir, Core)> = OnceLock::new();
    &CORE
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(&dir.path().join("store")).unwrap();
            let pki = fleet_pki::Pki::open_or_create(&dir.path().join("certs")).unwrap();
            let core = Core::new(store, Arc::new(pki), ManagerConfig::default());
            let keys = [
                crypto::generate_p256().unwrap(),
                crypto::generate_p256().unwrap(),
            ];
            for (id, key) in ["dev1", "dev2"].iter().zip(&keys) {
                let point = crypto::public_point(key).unwrap();
                core.store
                    .put_registration(&Registration {
                        sv: SCHEMA_VERSION,
                        device_id: (*id).into(),
                        initial_service: "svcA".into(),
                        factory_key: Some(point.into()),
                        registered_ms: fleet_protocol::now_ms(),
                    })
                    .unwrap();
            }
            let body = ActivateRequest {
                device_id: "dev1".into(),
                service_id: None,
                nonce: crypto::random_bytes(16),
                ts: fleet_protocol::now_ms(),
                eph: crypto::public_point(&crypto::generate_p256().unwrap()).unwrap(),
            };
            let activate =
                Envelope::build(Kind::Activate, &body, |tbs| crypto::sign(&keys[0], tbs))
                    .unwrap()
                    .encode();
            core.handle("fleet/v1/activate/dev1", &activate);
            (dir, core)
        })
        .1
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let topic = TOPICS[usize::from(pick) % TOPICS.len()];
    core().handle(topic, payload);
});

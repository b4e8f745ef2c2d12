//! Hand-built requests for tests that need to bend the protocol.

use std::time::Duration;

use fleet_protocol::crypto;
use fleet_protocol::{Envelope, Kind, Reply, RequestKind, Route, Topic};
use fleet_testkit::{Fleet, Probe};
use openssl::pkey::{PKey, Private};

/// A device played by the test: its factory key and, once activated, its UUID.
pub struct HandDevice {
    pub id: String,
    pub factory: PKey<Private>,
    pub uuid: Option<Vec<u8>>,
}

impl HandDevice {
    pub fn new(id: &str) -> HandDevice {
        HandDevice {
            id: id.into(),
            factory: crypto::generate_p256().unwrap(),
            uuid: None,
        }
    }

    pub fn factory_point(&self) -> Vec<u8> {
        crypto::public_point(&self.factory).unwrap()
    }
}

/// Publishes `payload` on `device`'s `kind` topic and returns the next reply,
/// with its manager signature checked.
pub async fn ask(
    fleet: &Fleet,
    probe: &Probe,
    device: &str,
    kind: RequestKind,
    payload: Vec<u8>,
) -> (Reply, Vec<u8>) {
    let topic = Topic::bootstrap(Route::Request(kind, device.into())).to_string();
    let reply_topic = Topic::bootstrap(Route::Reply(kind, device.into())).to_string();
    let n = probe.on(&reply_topic).len() + 1;
    probe.publish(&topic, payload).await.unwrap();
    let got = probe
        .wait_for(&reply_topic, n, Duration::from_secs(10))
        .await
        .unwrap();
    let env = Envelope::decode(&got.payload).expect("reply decodes");
    assert_eq!(env.kind, Kind::from(kind).reply().unwrap());
    assert!(env.crc_ok(), "reply CRC");
    assert!(
        crypto::verify(fleet.core().pki.signing_key(), &env.tbs(), &env.auth),
        "reply is signed by the manager"
    );
    (env.body().expect("reply body"), got.payload)
}

/// Activates `dev` by hand and keeps its UUID.
pub async fn activate(fleet: &Fleet, probe: &Probe, dev: &mut HandDevice) {
    let eph = crypto::generate_p256().unwrap();
    let body = fleet_protocol::ActivateRequest {
        device_id: dev.id.clone(),
        service_id: None,
        nonce: crypto::random_bytes(16),
        ts: fleet_protocol::now_ms(),
        eph: crypto::public_point(&eph).unwrap(),
    };
    let env =
        Envelope::build(Kind::Activate, &body, |tbs| crypto::sign(&dev.factory, tbs)).unwrap();
    let (reply, _) = ask(fleet, probe, &dev.id, RequestKind::Activate, env.encode()).await;
    assert_eq!(reply.status, fleet_protocol::Status::Ok, "{reply:?}");
    let uuid = crypto::unseal(&eph, &dev.id, reply.uuid.as_ref().unwrap()).unwrap();
    assert_eq!(uuid.len(), 16);
    dev.uuid = Some(uuid);
}

/// A poll request with the given nonce and timestamp, HMAC-keyed by `key`.
pub fn poll(dev: &HandDevice, service: &str, nonce: Vec<u8>, ts: u64, key: &[u8]) -> Vec<u8> {
    let body = fleet_protocol::PollRequest {
        device_id: dev.id.clone(),
        service_id: service.into(),
        nonce,
        ts,
    };
    Envelope::build(Kind::Poll, &body, |tbs| crypto::hmac(key, tbs))
        .unwrap()
        .encode()
}

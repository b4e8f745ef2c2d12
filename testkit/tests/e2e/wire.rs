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
        crypto::verify(&fleet.core().pki.signing_key(), &env.tbs(), &env.auth),
        "reply is signed by the manager"
    );
    (env.body().expect("reply body"), got.payload)
}

/// An activate request for `device_id`, sealed to `eph` and signed with `key`.
pub fn activate_request(device_id: &str, eph: &PKey<Private>, key: &PKey<Private>) -> Vec<u8> {
    let body = fleet_protocol::ActivateRequest {
        device_id: device_id.into(),
        service_id: None,
        nonce: crypto::random_bytes(16),
        ts: fleet_protocol::now_ms(),
        eph: crypto::public_point(eph).unwrap(),
    };
    Envelope::build(Kind::Activate, &body, |tbs| crypto::sign(key, tbs))
        .unwrap()
        .encode()
}

/// A fleet with `device_id` registered on `svcA` and activated by hand, and
/// a privileged client listening on every bootstrap reply topic.
pub async fn fleet_with_active_device(device_id: &str) -> (Fleet, Probe, HandDevice) {
    let (fleet, probe, mut dev) = with_device(Fleet::start().await.unwrap(), device_id).await;
    activate(&fleet, &probe, &mut dev).await;
    (fleet, probe, dev)
}

/// `fleet` with `device_id` registered on `svcA`, and a privileged client
/// listening on every bootstrap reply topic.
pub async fn with_device(fleet: Fleet, device_id: &str) -> (Fleet, Probe, HandDevice) {
    let dev = HandDevice::new(device_id);
    fleet
        .register(&dev.id, "svcA", Some(&dev.factory_point()))
        .await
        .unwrap();
    let probe = fleet.privileged("tester").await.unwrap();
    probe.subscribe("fleet/v1/+/+/reply").await.unwrap();
    (fleet, probe, dev)
}

/// Activates `dev` by hand and keeps its UUID.
pub async fn activate(fleet: &Fleet, probe: &Probe, dev: &mut HandDevice) {
    let eph = crypto::generate_p256().unwrap();
    let request = activate_request(&dev.id, &eph, &dev.factory);
    let (reply, _) = ask(fleet, probe, &dev.id, RequestKind::Activate, request).await;
    assert_eq!(reply.status, fleet_protocol::Status::Ok, "{reply:?}");
    let uuid = crypto::unseal(&eph, &dev.id, reply.uuid.as_ref().unwrap()).unwrap();
    assert_eq!(uuid.len(), 16);
    dev.uuid = Some(uuid);
}

/// An `update` request of `dev` for `service` with a CSR (fresh key,
/// nonce and `ts` now), HMAC-keyed by its UUID.
pub fn update(dev: &HandDevice, service: &str) -> Vec<u8> {
    let key = crypto::generate_p256().unwrap();
    let body = fleet_protocol::UpdateRequest {
        device_id: dev.id.clone(),
        service_id: service.into(),
        nonce: crypto::random_bytes(16),
        ts: fleet_protocol::now_ms(),
        eph: crypto::public_point(&crypto::generate_p256().unwrap()).unwrap(),
        csr: Some(serde_bytes::ByteBuf::from(
            fleet_pki::generate_csr(&dev.id, &key).unwrap(),
        )),
    };
    Envelope::build(Kind::Update, &body, |tbs| {
        crypto::hmac(dev.uuid.as_ref().unwrap(), tbs)
    })
    .unwrap()
    .encode()
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

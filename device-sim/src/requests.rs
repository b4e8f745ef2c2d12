//! Building the device's requests. Pure: no I/O, so every request can be
//! checked in unit tests against a manager played by the test.
//!
//! A [`Prepared`] request keeps its encoded bytes so a retry on timeout
//! publishes exactly the same message (the manager answers an identical
//! retry with its cached reply), and keeps the private halves the reply
//! will need: the ephemeral key secrets are sealed to and, in CSR mode, the
//! new service key.

use fleet_protocol::crypto;
use fleet_protocol::{
    ActivateRequest, Envelope, Kind, PollRequest, ProtocolError, RequestKind, StatusReport,
    UpdateRequest,
};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, PKeyRef, Private};
use openssl::x509::{X509NameBuilder, X509Req, X509ReqBuilder};
use serde_bytes::ByteBuf;

use crate::config::KeyMode;

/// Length of a request nonce.
pub const NONCE_LEN: usize = 16;

/// An encoded request and the secrets needed to read its reply.
pub struct Prepared {
    pub kind: RequestKind,
    pub nonce: Vec<u8>,
    /// The encoded envelope, published as is (and again, byte for byte, on a retry).
    pub bytes: Vec<u8>,
    /// Private half of the `eph` the reply's secrets are sealed to.
    pub eph: Option<PKey<Private>>,
    /// CSR mode: the new service key whose public half the CSR carries.
    pub service_key: Option<PKey<Private>>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("kind", &self.kind)
            .field("nonce", &hex::encode(&self.nonce))
            .field("len", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

/// A PKCS#10 request, DER, subject CN = `device_id`, signed with SHA-256.
pub fn generate_csr(device_id: &str, key: &PKeyRef<Private>) -> Result<Vec<u8>, ProtocolError> {
    let mut name = X509NameBuilder::new()?;
    name.append_entry_by_text("CN", device_id)?;
    let name = name.build();
    let mut req = X509ReqBuilder::new()?;
    req.set_version(0)?;
    req.set_subject_name(&name)?;
    req.set_pubkey(key)?;
    req.sign(key, MessageDigest::sha256())?;
    let req: X509Req = req.build();
    Ok(req.to_der()?)
}

/// `activate`, signed with the factory key.
pub fn build_activate(
    device_id: &str,
    service_id: Option<&str>,
    factory_key: &PKeyRef<Private>,
) -> Result<Prepared, ProtocolError> {
    let eph = crypto::generate_p256()?;
    let body = ActivateRequest {
        device_id: device_id.to_owned(),
        service_id: service_id.map(str::to_owned),
        nonce: crypto::random_bytes(NONCE_LEN),
        ts: fleet_protocol::now_ms(),
        eph: crypto::public_point(&eph)?,
    };
    let env = Envelope::build(Kind::Activate, &body, |tbs| crypto::sign(factory_key, tbs))?;
    Ok(Prepared {
        kind: RequestKind::Activate,
        nonce: body.nonce,
        bytes: env.encode(),
        eph: Some(eph),
        service_key: None,
    })
}

/// `update` for `service_id`, HMAC-keyed by the device-auth UUID.
pub fn build_update(
    device_id: &str,
    service_id: &str,
    uuid: &[u8],
    key_mode: KeyMode,
) -> Result<Prepared, ProtocolError> {
    let eph = crypto::generate_p256()?;
    let (service_key, csr) = match key_mode {
        KeyMode::Csr => {
            let key = crypto::generate_p256()?;
            let csr = generate_csr(device_id, &key)?;
            (Some(key), Some(ByteBuf::from(csr)))
        }
        KeyMode::ManagerGenerated => (None, None),
    };
    let body = UpdateRequest {
        device_id: device_id.to_owned(),
        service_id: service_id.to_owned(),
        nonce: crypto::random_bytes(NONCE_LEN),
        ts: fleet_protocol::now_ms(),
        eph: crypto::public_point(&eph)?,
        csr,
    };
    let env = Envelope::build(Kind::Update, &body, |tbs| crypto::hmac(uuid, tbs))?;
    Ok(Prepared {
        kind: RequestKind::Update,
        nonce: body.nonce,
        bytes: env.encode(),
        eph: Some(eph),
        service_key,
    })
}

/// `poll` for pending service changes.
pub fn build_poll(
    device_id: &str,
    service_id: &str,
    uuid: &[u8],
) -> Result<Prepared, ProtocolError> {
    let body = PollRequest {
        device_id: device_id.to_owned(),
        service_id: service_id.to_owned(),
        nonce: crypto::random_bytes(NONCE_LEN),
        ts: fleet_protocol::now_ms(),
    };
    let env = Envelope::build(Kind::Poll, &body, |tbs| crypto::hmac(uuid, tbs))?;
    Ok(Prepared {
        kind: RequestKind::Poll,
        nonce: body.nonce,
        bytes: env.encode(),
        eph: None,
        service_key: None,
    })
}

/// Status events the device reports.
pub mod event {
    pub const ONLINE: &str = "online";
    pub const CHANGE_APPLIED: &str = "change_applied";
    pub const NOTICE_REJECTED: &str = "notice_rejected";
    pub const ROOTS_PINNED: &str = "roots_pinned";
}

/// What a `status` report says of the device's trust (topics.md §3.5.4):
/// the SHA-256 of each root it pins, and of the manager signing key it
/// takes messages by (its DER SubjectPublicKeyInfo).
#[derive(Debug, Clone, Default)]
pub struct Pinned {
    pub roots: Vec<[u8; 32]>,
    pub signing_key: Option<[u8; 32]>,
}

/// `status`: `online`, `change_applied`, `notice_rejected` or
/// `roots_pinned`; what the device pins goes with every one.
pub fn build_status(
    device_id: &str,
    service_id: &str,
    uuid: &[u8],
    event: &str,
    change_id: Option<String>,
    detail: Option<String>,
    pinned: Pinned,
) -> Result<Prepared, ProtocolError> {
    let pinned_roots = pinned.roots;
    let body = StatusReport {
        device_id: device_id.to_owned(),
        service_id: service_id.to_owned(),
        nonce: crypto::random_bytes(NONCE_LEN),
        ts: fleet_protocol::now_ms(),
        event: event.to_owned(),
        change_id,
        detail,
        pinned_roots: (!pinned_roots.is_empty()).then(|| {
            pinned_roots
                .iter()
                .take(fleet_protocol::messages::MAX_PINNED_ROOTS_REPORTED)
                .map(|d| ByteBuf::from(d.to_vec()))
                .collect()
        }),
        signing_key: pinned.signing_key.map(|d| ByteBuf::from(d.to_vec())),
    };
    let env = Envelope::build(Kind::Status, &body, |tbs| crypto::hmac(uuid, tbs))?;
    Ok(Prepared {
        kind: RequestKind::Status,
        nonce: body.nonce,
        bytes: env.encode(),
        eph: None,
        service_key: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: [u8; 16] = [9u8; 16];

    #[test]
    fn activate_is_signed_by_the_factory_key() {
        let factory = crypto::generate_p256().unwrap();
        let p = build_activate("dev1", Some("svcA"), &factory).unwrap();
        let env = Envelope::decode(&p.bytes).unwrap();
        assert_eq!(env.kind, Kind::Activate);
        assert!(env.crc_ok());
        assert!(crypto::verify(&factory, &env.tbs(), &env.auth));
        let body: ActivateRequest = env.body().unwrap();
        assert_eq!(body.device_id, "dev1");
        assert_eq!(body.service_id.as_deref(), Some("svcA"));
        assert_eq!(body.nonce, p.nonce);
        assert_eq!(body.nonce.len(), NONCE_LEN);
        assert_eq!(
            body.eph,
            crypto::public_point(p.eph.as_ref().unwrap()).unwrap()
        );
        assert!(body.ts.abs_diff(fleet_protocol::now_ms()) < 60_000);
        let other = build_activate("dev1", None, &factory).unwrap();
        assert_ne!(other.nonce, p.nonce, "every request has a fresh nonce");
        let body: ActivateRequest = Envelope::decode(&other.bytes).unwrap().body().unwrap();
        assert_eq!(body.service_id, None);
    }

    #[test]
    fn update_in_csr_mode_carries_a_csr_for_a_fresh_key() {
        let p = build_update("dev1", "svcB", &UUID, KeyMode::Csr).unwrap();
        let env = Envelope::decode(&p.bytes).unwrap();
        assert_eq!(env.kind, Kind::Update);
        assert!(crypto::hmac_matches(&UUID, &env.tbs(), &env.auth));
        assert!(!crypto::hmac_matches(&[1u8; 16], &env.tbs(), &env.auth));
        let body: UpdateRequest = env.body().unwrap();
        assert_eq!(body.service_id, "svcB");
        let csr = X509Req::from_der(body.csr.as_ref().unwrap()).unwrap();
        let csr_key = csr.public_key().unwrap();
        assert!(csr.verify(&csr_key).unwrap(), "CSR is self-signed");
        assert!(csr_key.public_eq(p.service_key.as_ref().unwrap()));
        let cn = csr
            .subject_name()
            .entries_by_nid(openssl::nid::Nid::COMMONNAME)
            .next()
            .unwrap();
        assert_eq!(cn.data().to_string().unwrap(), "dev1");
        assert_eq!(body.eph.len(), 65);
    }

    #[test]
    fn update_in_manager_mode_has_no_csr() {
        let p = build_update("dev1", "svcB", &UUID, KeyMode::ManagerGenerated).unwrap();
        let body: UpdateRequest = Envelope::decode(&p.bytes).unwrap().body().unwrap();
        assert!(body.csr.is_none());
        assert!(p.service_key.is_none());
        assert!(p.eph.is_some());
    }

    #[test]
    fn poll_and_status_are_hmac_keyed() {
        let p = build_poll("dev1", "svcA", &UUID).unwrap();
        let env = Envelope::decode(&p.bytes).unwrap();
        assert_eq!(env.kind, Kind::Poll);
        assert!(crypto::hmac_matches(&UUID, &env.tbs(), &env.auth));
        let s = build_status(
            "dev1",
            "svcA",
            &UUID,
            event::CHANGE_APPLIED,
            Some("c1".into()),
            None,
            Pinned {
                roots: vec![[7; 32]],
                signing_key: Some([8; 32]),
            },
        )
        .unwrap();
        let env = Envelope::decode(&s.bytes).unwrap();
        assert_eq!(env.kind, Kind::Status);
        assert!(crypto::hmac_matches(&UUID, &env.tbs(), &env.auth));
        let body: StatusReport = env.body().unwrap();
        assert_eq!(body.event, "change_applied");
        assert_eq!(body.change_id.as_deref(), Some("c1"));
        assert_eq!(body.nonce, s.nonce);
        assert_eq!(body.pinned_roots, Some(vec![ByteBuf::from(vec![7; 32])]));
        assert_eq!(body.signing_key, Some(ByteBuf::from(vec![8; 32])));
    }
}

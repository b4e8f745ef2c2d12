//! A manager played by the unit tests: signing key, root CA and one service CA.

use fleet_protocol::crypto;
use fleet_protocol::{Envelope, Kind, Reply, UpdateRequest};
use openssl::asn1::Asn1Time;
use openssl::bn::{BigNum, MsbOption};
use openssl::hash::MessageDigest;
use openssl::pkey::{HasPublic, PKey, PKeyRef, Private, Public};
use openssl::x509::extension::BasicConstraints;
use openssl::x509::{X509NameBuilder, X509};
use serde::Serialize;
use serde_bytes::ByteBuf;

pub const UUID: [u8; 16] = [0x5a; 16];

/// A certificate for `subject_key`, signed by `issuer_key` under `issuer_name`
/// (the subject's own name when self-signed).
fn cert<T: HasPublic>(
    cn: &str,
    subject_key: &PKeyRef<T>,
    issuer: Option<&X509>,
    issuer_key: &PKey<Private>,
    ca: bool,
) -> X509 {
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", cn).unwrap();
    let name = name.build();
    let mut b = X509::builder().unwrap();
    b.set_version(2).unwrap();
    let mut serial = BigNum::new().unwrap();
    serial.rand(127, MsbOption::MAYBE_ZERO, false).unwrap();
    b.set_serial_number(&serial.to_asn1_integer().unwrap())
        .unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(issuer.map_or(&*name, |i| i.subject_name()))
        .unwrap();
    b.set_pubkey(subject_key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
        .unwrap();
    if ca {
        b.append_extension(BasicConstraints::new().critical().ca().build().unwrap())
            .unwrap();
    }
    b.sign(issuer_key, MessageDigest::sha256()).unwrap();
    b.build()
}

/// A self-signed CA certificate for `key`.
pub fn self_signed(cn: &str, key: &PKey<Private>) -> X509 {
    cert(cn, key, None, key, true)
}

pub struct FakeManager {
    pub signing: PKey<Private>,
    pub public: PKey<Public>,
    pub root: X509,
    pub service_ca: X509,
    service_key: PKey<Private>,
}

impl FakeManager {
    /// Its root, as the roots a device pins.
    pub fn roots(&self) -> &[X509] {
        std::slice::from_ref(&self.root)
    }

    pub fn new() -> Self {
        let signing = crypto::generate_p256().unwrap();
        let public = PKey::public_key_from_pem(&signing.public_key_to_pem().unwrap()).unwrap();
        let root_key = crypto::generate_p256().unwrap();
        let root = self_signed("test root", &root_key);
        let service_key = crypto::generate_p256().unwrap();
        let service_ca = cert("svcB CA", &service_key, Some(&root), &root_key, true);
        FakeManager {
            signing,
            public,
            root,
            service_ca,
            service_key,
        }
    }

    /// Encodes `body` as a manager message of `kind`, signed.
    pub fn sign<T: Serialize>(&self, kind: Kind, body: &T) -> Vec<u8> {
        Envelope::build(kind, body, |tbs| crypto::sign(&self.signing, tbs))
            .unwrap()
            .encode()
    }

    /// A device certificate for `key`, issued by the service CA.
    pub fn issue<T: HasPublic>(&self, cn: &str, key: &PKeyRef<T>) -> X509 {
        cert(cn, key, Some(&self.service_ca), &self.service_key, false)
    }

    pub fn update_reply(
        &self,
        req: &UpdateRequest,
        chain: Vec<X509>,
        key: Option<crypto::Sealed>,
    ) -> Reply {
        Reply {
            device_id: req.device_id.clone(),
            nonce: req.nonce.clone(),
            seq: 2,
            service_id: Some(req.service_id.clone()),
            chain: Some(
                chain
                    .iter()
                    .map(|c| ByteBuf::from(c.to_der().unwrap()))
                    .collect(),
            ),
            key,
            ..Reply::default()
        }
    }
}

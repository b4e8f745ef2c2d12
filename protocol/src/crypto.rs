//! Signing, HMAC proofs and sealing, all on OpenSSL.
//!
//! * Signatures: ECDSA P-256 with SHA-256, DER-encoded, over the
//!   to-be-signed bytes of [`crate::envelope::to_be_signed`].
//! * Proofs: HMAC-SHA256 keyed by the 16 bytes of the device-auth UUID.
//! * Sealing: ECDH-ES on P-256 with a fresh sender key, HKDF-SHA256
//!   (empty salt, info `"fleetshift/v1 seal"`), AES-256-GCM with a random
//!   12-byte IV and the device id as additional authenticated data.

use openssl::bn::BigNumContext;
use openssl::derive::Deriver;
use openssl::ec::{EcGroup, EcKey, EcPoint, PointConversionForm};
use openssl::ecdsa::EcdsaSig;
use openssl::hash::MessageDigest;
use openssl::md::Md;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, PKeyRef, Private, Public};
use openssl::pkey_ctx::PkeyCtx;
use openssl::sign::{Signer, Verifier};
use openssl::symm::{decrypt_aead, encrypt_aead, Cipher};
use serde::{Deserialize, Serialize};

use crate::ProtocolError;

const SEAL_INFO: &[u8] = b"fleetshift/v1 seal";

/// A secret sealed to one device's ephemeral key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// The sender's ephemeral P-256 public key, SEC1 uncompressed (65 bytes).
    #[serde(with = "crate::strict::bytes")]
    pub epk: Vec<u8>,
    /// AES-256-GCM IV (12 bytes).
    #[serde(with = "crate::strict::bytes")]
    pub iv: Vec<u8>,
    /// Ciphertext followed by the 16-byte GCM tag.
    #[serde(with = "crate::strict::bytes")]
    pub ct: Vec<u8>,
}

fn group() -> Result<EcGroup, ProtocolError> {
    Ok(EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?)
}

/// A fresh P-256 key pair.
pub fn generate_p256() -> Result<PKey<Private>, ProtocolError> {
    let group = group()?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

/// SEC1 uncompressed encoding (65 bytes) of a P-256 public key.
pub fn public_point<T: openssl::pkey::HasPublic>(
    key: &PKeyRef<T>,
) -> Result<Vec<u8>, ProtocolError> {
    let ec = key.ec_key()?;
    let mut ctx = BigNumContext::new()?;
    Ok(ec
        .public_key()
        .to_bytes(ec.group(), PointConversionForm::UNCOMPRESSED, &mut ctx)?)
}

/// Parses a SEC1 P-256 point; rejects anything not on the curve.
pub fn public_from_point(bytes: &[u8]) -> Result<PKey<Public>, ProtocolError> {
    if bytes.len() != 65 || bytes[0] != 4 {
        return Err(ProtocolError::BadKey);
    }
    let group = group()?;
    let mut ctx = BigNumContext::new()?;
    let point = EcPoint::from_bytes(&group, bytes, &mut ctx).map_err(|_| ProtocolError::BadKey)?;
    let key = EcKey::from_public_key(&group, &point).map_err(|_| ProtocolError::BadKey)?;
    key.check_key().map_err(|_| ProtocolError::BadKey)?;
    Ok(PKey::from_ec_key(key)?)
}

/// ECDSA P-256/SHA-256 signature, DER.
pub fn sign(key: &PKeyRef<Private>, data: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let mut signer = Signer::new(MessageDigest::sha256(), key)?;
    signer.update(data)?;
    Ok(signer.sign_to_vec()?)
}

/// Verifies an ECDSA P-256/SHA-256 DER signature. Malformed signatures are
/// simply not valid.
pub fn verify<T: openssl::pkey::HasPublic>(key: &PKeyRef<T>, data: &[u8], sig: &[u8]) -> bool {
    // Parse first: OpenSSL reports junk DER as an error, which we fold into "invalid".
    if EcdsaSig::from_der(sig).is_err() {
        return false;
    }
    Verifier::new(MessageDigest::sha256(), key)
        .and_then(|mut v| {
            v.update(data)?;
            v.verify(sig)
        })
        .unwrap_or(false)
}

/// HMAC-SHA256.
pub fn hmac(key: &[u8], data: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let pkey = PKey::hmac(key)?;
    let mut signer = Signer::new(MessageDigest::sha256(), &pkey)?;
    signer.update(data)?;
    Ok(signer.sign_to_vec()?)
}

/// Constant-time HMAC-SHA256 check.
pub fn hmac_matches(key: &[u8], data: &[u8], tag: &[u8]) -> bool {
    match hmac(key, data) {
        Ok(expected) => expected.len() == tag.len() && openssl::memcmp::eq(&expected, tag),
        Err(_) => false,
    }
}

fn seal_key(own: &PKeyRef<Private>, peer: &PKeyRef<Public>) -> Result<Vec<u8>, ProtocolError> {
    let mut deriver = Deriver::new(own)?;
    deriver.set_peer(peer)?;
    let shared = deriver.derive_to_vec()?;
    let mut ctx = PkeyCtx::new_id(Id::HKDF)?;
    ctx.derive_init()?;
    ctx.set_hkdf_md(Md::sha256())?;
    ctx.set_hkdf_key(&shared)?;
    ctx.add_hkdf_info(SEAL_INFO)?;
    let mut key = vec![0u8; 32];
    ctx.derive(Some(&mut key))?;
    Ok(key)
}

/// Seals `plaintext` to the holder of the private half of `recipient`.
pub fn seal(recipient: &[u8], device_id: &str, plaintext: &[u8]) -> Result<Sealed, ProtocolError> {
    let peer = public_from_point(recipient)?;
    let eph = generate_p256()?;
    let key = seal_key(&eph, &peer)?;
    let mut iv = vec![0u8; 12];
    openssl::rand::rand_bytes(&mut iv)?;
    let mut tag = [0u8; 16];
    let mut ct = encrypt_aead(
        Cipher::aes_256_gcm(),
        &key,
        Some(&iv),
        device_id.as_bytes(),
        plaintext,
        &mut tag,
    )?;
    ct.extend_from_slice(&tag);
    Ok(Sealed {
        epk: public_point(&eph)?,
        iv,
        ct,
    })
}

/// Opens a [`Sealed`] with the recipient's ephemeral private key.
pub fn unseal(
    own: &PKeyRef<Private>,
    device_id: &str,
    sealed: &Sealed,
) -> Result<Vec<u8>, ProtocolError> {
    if sealed.iv.len() != 12 || sealed.ct.len() < 16 {
        return Err(ProtocolError::SealBroken);
    }
    let peer = public_from_point(&sealed.epk)?;
    let key = seal_key(own, &peer)?;
    let (ct, tag) = sealed.ct.split_at(sealed.ct.len() - 16);
    decrypt_aead(
        Cipher::aes_256_gcm(),
        &key,
        Some(&sealed.iv),
        device_id.as_bytes(),
        ct,
        tag,
    )
    .map_err(|_| ProtocolError::SealBroken)
}

/// `n` random bytes from OpenSSL's CSPRNG.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    openssl::rand::rand_bytes(&mut buf).expect("OpenSSL RNG failed");
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_binding() {
        let device = generate_p256().unwrap();
        let point = public_point(&device).unwrap();
        let sealed = seal(&point, "dev1", b"secret").unwrap();
        assert_eq!(unseal(&device, "dev1", &sealed).unwrap(), b"secret");
        assert!(
            unseal(&device, "dev2", &sealed).is_err(),
            "AAD binds the device id"
        );
        let other = generate_p256().unwrap();
        assert!(unseal(&other, "dev1", &sealed).is_err());
        let mut tampered = sealed.clone();
        tampered.ct[0] ^= 1;
        assert!(unseal(&device, "dev1", &tampered).is_err());
    }

    #[test]
    fn signatures_and_hmac() {
        let key = generate_p256().unwrap();
        let sig = sign(&key, b"body").unwrap();
        assert!(verify(&key, b"body", &sig));
        assert!(!verify(&key, b"bodx", &sig));
        assert!(!verify(&key, b"body", b"junk"));
        let tag = hmac(b"k", b"m").unwrap();
        assert!(hmac_matches(b"k", b"m", &tag));
        assert!(!hmac_matches(b"k", b"n", &tag));
        assert!(!hmac_matches(b"k", b"m", &tag[..31]));
    }

    #[test]
    fn points_must_be_on_curve() {
        assert!(public_from_point(&[4u8; 65]).is_err());
        assert!(public_from_point(&[4u8; 10]).is_err());
    }
}

//! X.509 v2 CRLs (RFC 5280 section 5), encoded by hand with [`crate::der`]
//! and signed with OpenSSL's `Signer`: the CRL builder only exists in
//! rust-openssl 0.10.81 and later, and the workspace asks for any 0.10.

use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKeyRef, Private};
use openssl::sign::Signer;
use openssl::x509::X509Ref;

use crate::der;
use crate::{PkiError, RevokedEntry};

/// ecdsa-with-SHA256; RFC 5758 says its parameters are absent.
const ECDSA_WITH_SHA256: &[u64] = &[1, 2, 840, 10045, 4, 3, 2];
const CRL_NUMBER: &[u64] = &[2, 5, 29, 20];
const AUTHORITY_KEY_IDENTIFIER: &[u64] = &[2, 5, 29, 35];

/// What goes into one CRL besides the revoked list.
pub(crate) struct CrlParams {
    pub crl_number: u64,
    pub this_update: i64,
    pub next_update: i64,
}

/// The DER `CertificateList`, signed by `issuer_key`, which must be the EC
/// key of `issuer`.
pub(crate) fn build_crl_der(
    issuer: &X509Ref,
    issuer_key: &PKeyRef<Private>,
    revoked: &[RevokedEntry],
    params: &CrlParams,
) -> Result<Vec<u8>, PkiError> {
    let algorithm = der::sequence(&[&der::oid(ECDSA_WITH_SHA256)]);
    let issuer_name = issuer.subject_name().to_der()?;
    let key_id = issuer.subject_key_id().ok_or_else(|| {
        PkiError::Inconsistent("CRL issuer certificate has no subject key identifier".into())
    })?;

    let mut tbs_parts: Vec<Vec<u8>> = vec![
        der::u64_integer(1), // v2
        algorithm.clone(),
        issuer_name,
        der::time(params.this_update),
        der::time(params.next_update),
    ];

    // Sorted and deduplicated so the same input always gives the same bytes.
    let mut entries = revoked
        .iter()
        .map(|e| Ok((serial_magnitude(&e.serial_hex)?, e.revoked_at)))
        .collect::<Result<Vec<_>, PkiError>>()?;
    entries.sort();
    entries.dedup_by(|a, b| a.0 == b.0);
    if !entries.is_empty() {
        let mut list = Vec::new();
        for (serial, revoked_at) in &entries {
            let at = i64::try_from(*revoked_at).map_err(|_| {
                PkiError::BadSerial(format!("revocation time {revoked_at} out of range"))
            })?;
            list.extend(der::sequence(&[
                &der::unsigned_integer(serial),
                &der::time(at),
            ]));
        }
        tbs_parts.push(der::sequence(&[&list]));
    }

    let crl_number = extension(CRL_NUMBER, &der::u64_integer(params.crl_number));
    let aki = extension(
        AUTHORITY_KEY_IDENTIFIER,
        &der::sequence(&[&der::implicit_primitive(0, key_id.as_slice())]),
    );
    tbs_parts.push(der::explicit(0, &der::sequence(&[&crl_number, &aki])));

    let tbs = der::sequence(&tbs_parts.iter().map(Vec::as_slice).collect::<Vec<_>>());
    let mut signer = Signer::new(MessageDigest::sha256(), issuer_key)?;
    let signature = signer.sign_oneshot_to_vec(&tbs)?;
    Ok(der::sequence(&[
        &tbs,
        &algorithm,
        &der::bit_string(&signature),
    ]))
}

/// A non-critical extension (criticality FALSE is the DEFAULT, so omitted).
fn extension(oid: &[u64], value_der: &[u8]) -> Vec<u8> {
    der::sequence(&[&der::oid(oid), &der::octet_string(value_der)])
}

/// Big-endian magnitude of a positive hex serial as [`crate::IssuedCert`]
/// reports it.
fn serial_magnitude(serial_hex: &str) -> Result<Vec<u8>, PkiError> {
    let bad = || PkiError::BadSerial(serial_hex.to_owned());
    let valid = !serial_hex.is_empty()
        && serial_hex.len() <= 40 // RFC 5280: at most 20 octets
        && serial_hex.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid {
        return Err(bad());
    }
    let bn = BigNum::from_hex_str(serial_hex).map_err(|_| bad())?;
    Ok(bn.to_vec())
}

/// PEM with the `X509 CRL` label, 64 columns, as `openssl crl` writes it.
pub(crate) fn crl_der_to_pem(der: &[u8]) -> Vec<u8> {
    let b64 = openssl::base64::encode_block(der);
    let mut pem = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    pem.push_str("-----BEGIN X509 CRL-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk boundary is a char boundary.
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END X509 CRL-----\n");
    pem.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_must_be_hex() {
        assert_eq!(serial_magnitude("0a").unwrap(), [0x0a]);
        assert_eq!(serial_magnitude("00ff").unwrap(), [0xff]);
        for bad in ["", "-1", "xyz", "0x10", &"f".repeat(41)] {
            assert!(
                matches!(serial_magnitude(bad), Err(PkiError::BadSerial(_))),
                "{bad:?}"
            );
        }
    }
}

//! Certificate templates: the root CA, a service CA, the broker's server
//! certificate and a device certificate, all ECDSA P-256 with SHA-256.

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{HasPublic, PKey, PKeyRef, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{X509Builder, X509Name, X509NameRef, X509Ref, X509};

use crate::PkiError;

pub(crate) const DAY: u64 = 86_400;
/// Device certificates start a little in the past so a device whose clock
/// lags the manager's still accepts its fresh certificate.
pub(crate) const BACKDATE_SECS: u64 = 5 * 60;

pub(crate) fn new_p256_key() -> Result<PKey<Private>, PkiError> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    Ok(PKey::from_ec_key(EcKey::generate(&group)?)?)
}

/// True if `key` is an EC key on P-256.
pub(crate) fn is_p256<T: HasPublic>(key: &PKeyRef<T>) -> bool {
    key.ec_key()
        .ok()
        .and_then(|ec| ec.group().curve_name())
        .is_some_and(|nid| nid == Nid::X9_62_PRIME256V1)
}

/// A random positive 128-bit serial: 16 random bytes, top bit cleared so the
/// INTEGER stays positive in 16 octets, never zero.
pub(crate) fn random_serial() -> Result<BigNum, PkiError> {
    loop {
        let mut bytes = [0u8; 16];
        openssl::rand::rand_bytes(&mut bytes)?;
        bytes[0] &= 0x7f;
        if bytes.iter().any(|b| *b != 0) {
            return Ok(BigNum::from_slice(&bytes)?);
        }
    }
}

pub(crate) fn name(organization: Option<&str>, common_name: &str) -> Result<X509Name, PkiError> {
    let mut builder = X509Name::builder()?;
    if let Some(o) = organization {
        builder.append_entry_by_nid(Nid::ORGANIZATIONNAME, o)?;
    }
    builder.append_entry_by_nid(Nid::COMMONNAME, common_name)?;
    Ok(builder.build())
}

/// The issuer of a certificate being built; `None` means self-signed.
pub(crate) struct Issuer<'a> {
    pub cert: &'a X509Ref,
    pub key: &'a PKeyRef<Private>,
}

/// What kind of certificate, which decides its extensions.
pub(crate) enum Profile<'a> {
    /// A CA; `path_len` limits the CAs below it.
    Ca { path_len: Option<u32> },
    /// A TLS server: DNS names and IP addresses.
    Server {
        dns: &'a [&'a str],
        ips: &'a [&'a str],
    },
    /// A TLS client identified by SAN URIs.
    Client { uris: &'a [String] },
    /// A key that signs messages for the extended key usage `eku` only.
    MessageSigner { eku: &'a str },
}

pub(crate) struct Template<'a, T: HasPublic> {
    pub subject: &'a X509NameRef,
    pub public_key: &'a PKeyRef<T>,
    pub serial: &'a BigNum,
    pub not_before: u64,
    pub not_after: u64,
    pub profile: Profile<'a>,
}

/// Builds and signs a v3 certificate. Self-signed if `issuer` is `None`,
/// in which case `self_key` signs it.
pub(crate) fn build<T: HasPublic>(
    template: &Template<'_, T>,
    issuer: Option<&Issuer<'_>>,
    self_key: Option<&PKeyRef<Private>>,
) -> Result<X509, PkiError> {
    let mut b = X509Builder::new()?;
    b.set_version(2)?;
    let serial = Asn1Integer::from_bn(template.serial)?;
    b.set_serial_number(&serial)?;
    b.set_subject_name(template.subject)?;
    b.set_issuer_name(issuer.map_or(template.subject, |i| i.cert.subject_name()))?;
    b.set_pubkey(template.public_key)?;
    let (not_before, not_after) = (
        asn1_time(template.not_before)?,
        asn1_time(template.not_after)?,
    );
    b.set_not_before(&not_before)?;
    b.set_not_after(&not_after)?;

    match &template.profile {
        Profile::Ca { path_len } => {
            let mut bc = BasicConstraints::new();
            bc.critical().ca();
            if let Some(n) = path_len {
                bc.pathlen(*n);
            }
            b.append_extension(bc.build()?)?;
            b.append_extension(
                KeyUsage::new()
                    .critical()
                    .key_cert_sign()
                    .crl_sign()
                    .build()?,
            )?;
        }
        Profile::Server { dns, ips } => {
            b.append_extension(BasicConstraints::new().critical().build()?)?;
            b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
            b.append_extension(ExtendedKeyUsage::new().server_auth().build()?)?;
            let mut san = SubjectAlternativeName::new();
            for d in *dns {
                san.dns(d);
            }
            for ip in *ips {
                san.ip(ip);
            }
            let ext = san.build(&b.x509v3_context(issuer.map(|i| i.cert), None))?;
            b.append_extension(ext)?;
        }
        Profile::MessageSigner { eku } => {
            b.append_extension(BasicConstraints::new().critical().build()?)?;
            b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
            b.append_extension(ExtendedKeyUsage::new().critical().other(eku).build()?)?;
        }
        Profile::Client { uris } => {
            b.append_extension(BasicConstraints::new().critical().build()?)?;
            b.append_extension(KeyUsage::new().critical().digital_signature().build()?)?;
            b.append_extension(ExtendedKeyUsage::new().client_auth().build()?)?;
            let mut san = SubjectAlternativeName::new();
            for uri in *uris {
                san.uri(uri);
            }
            let ext = san.build(&b.x509v3_context(issuer.map(|i| i.cert), None))?;
            b.append_extension(ext)?;
        }
    }

    let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
    b.append_extension(ski)?;
    let signing_key = match (issuer, self_key) {
        (Some(i), _) => {
            let aki = AuthorityKeyIdentifier::new()
                .keyid(true)
                .build(&b.x509v3_context(Some(i.cert), None))?;
            b.append_extension(aki)?;
            i.key
        }
        (None, Some(key)) => key,
        (None, None) => {
            return Err(PkiError::Inconsistent(
                "self-signed certificate without a key".into(),
            ))
        }
    };
    b.sign(signing_key, MessageDigest::sha256())?;
    Ok(b.build())
}

/// A CA certificate for `subject` and `public_key` with a fresh serial,
/// valid over `validity` (Unix seconds): signed by `issuer`, or
/// self-signed with `self_key`.
pub(crate) fn ca<T: HasPublic>(
    subject: &X509NameRef,
    public_key: &PKeyRef<T>,
    (not_before, not_after): (u64, u64),
    path_len: Option<u32>,
    issuer: Option<&Issuer<'_>>,
    self_key: Option<&PKeyRef<Private>>,
) -> Result<X509, PkiError> {
    build(
        &Template {
            subject,
            public_key,
            serial: &random_serial()?,
            not_before,
            not_after,
            profile: Profile::Ca { path_len },
        },
        issuer,
        self_key,
    )
}

pub(crate) fn asn1_time(unix_seconds: u64) -> Result<Asn1Time, PkiError> {
    let t = i64::try_from(unix_seconds)
        .map_err(|_| PkiError::Inconsistent(format!("time {unix_seconds} out of range")))?;
    Ok(Asn1Time::from_unix(t as _)?)
}

//! Just enough DER to read the fields of a certificate that the fleet
//! decides on: the names, serial and validity of a client certificate (the
//! front door's identity comes from them once webpki has verified the
//! certificate; before that, they serve only to refuse one its issuer's
//! CRL lists), and the cA flag of a root a device is offered (topics.md
//! §3.5.5). Reading them here spares every handshake a second, far
//! costlier parse (OpenSSL 3 decodes the public key of every certificate
//! it parses), and gives the cA flag, which the `openssl` crate does not
//! expose.
//!
//! Anything this reader does not understand is `None`, which the caller
//! refuses; it never guesses.

/// The parts of a certificate the front door decides on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertNames {
    pub subject_cn: Option<String>,
    pub subject_o: Option<String>,
    pub issuer_o: Option<String>,
    /// Lowercase hex without leading zero bytes, as OpenSSL's `BN_bn2hex`
    /// writes it (and so as the CRLs' serials are read).
    pub serial: String,
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const INTEGER: u8 = 0x02;
const OID: u8 = 0x06;
const VERSION: u8 = 0xa0;
const UTF8_STRING: u8 = 0x0c;
const PRINTABLE_STRING: u8 = 0x13;
const IA5_STRING: u8 = 0x16;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
/// `[3] extensions` of a TBSCertificate.
const EXTENSIONS: u8 = 0xa3;

/// id-at-commonName, 2.5.4.3.
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// id-at-organizationName, 2.5.4.10.
const OID_O: &[u8] = &[0x55, 0x04, 0x0a];
/// id-ce-basicConstraints, 2.5.29.19.
const OID_BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];

/// SHA-256 without OpenSSL 3's one-shot `SHA256()`, which looks the
/// algorithm up by name on every call, under a lock every thread takes
/// (1.5 % of the broker's CPU per connect by `perf`, 8,000 connects).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut digest = openssl::sha::Sha256::new();
    digest.update(data);
    digest.finish()
}

/// One tag-length-value from the front of `input`: (tag, value, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        n if n < 0x80 => (usize::from(n), rest),
        0x81..=0x83 => {
            let width = usize::from(first & 0x7f);
            if rest.len() < width {
                return None;
            }
            let (bytes, rest) = rest.split_at(width);
            let len = bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
            (len, rest)
        }
        // Indefinite lengths are not DER; longer ones are not certificates.
        _ => return None,
    };
    if rest.len() < len {
        return None;
    }
    let (value, rest) = rest.split_at(len);
    Some((tag, value, rest))
}

/// The value of the element with `tag` at the front of `input`.
fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (t, value, rest) = tlv(input)?;
    (t == tag).then_some((value, rest))
}

/// The first attribute `oid` of a Name, as text.
fn attribute(name: &[u8], oid: &[u8]) -> Option<String> {
    let mut rdns = name;
    while !rdns.is_empty() {
        let (set, rest) = expect(rdns, SET)?;
        rdns = rest;
        let mut attrs = set;
        while !attrs.is_empty() {
            let (attr, rest) = expect(attrs, SEQUENCE)?;
            attrs = rest;
            let (kind, value) = expect(attr, OID)?;
            if kind != oid {
                continue;
            }
            let (tag, text, _) = tlv(value)?;
            return match tag {
                UTF8_STRING | PRINTABLE_STRING | IA5_STRING => {
                    std::str::from_utf8(text).ok().map(str::to_owned)
                }
                _ => None,
            };
        }
    }
    None
}

/// A positive serial as hex; `None` for an empty or negative one, which
/// RFC 5280 forbids and which would not match its CRL entry's spelling.
fn serial_hex(integer: &[u8]) -> Option<String> {
    match integer.first() {
        Some(&b) if b & 0x80 == 0 => {}
        _ => return None,
    }
    let digits: &[u8] = match integer.iter().position(|&b| b != 0) {
        Some(start) => &integer[start..],
        None => return Some("0".to_owned()),
    };
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(digits.len() * 2);
    for &b in digits {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    Some(out)
}

/// The fields of a certificate's TBSCertificate up to the subject.
struct Tbs<'a> {
    serial: &'a [u8],
    issuer: &'a [u8],
    validity: &'a [u8],
    subject: &'a [u8],
}

fn tbs(cert: &[u8]) -> Option<Tbs<'_>> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    let tbs = match tlv(tbs)? {
        (VERSION, _, rest) => rest,
        _ => tbs,
    };
    let (serial, rest) = expect(tbs, INTEGER)?;
    let (_signature, rest) = expect(rest, SEQUENCE)?;
    let (issuer, rest) = expect(rest, SEQUENCE)?;
    let (validity, rest) = expect(rest, SEQUENCE)?;
    let (subject, _) = expect(rest, SEQUENCE)?;
    Some(Tbs {
        serial,
        issuer,
        validity,
        subject,
    })
}

/// Days from 1970-01-01 to a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A UTCTime (`YYMMDDHHMMSSZ`) or GeneralizedTime (`YYYYMMDDHHMMSSZ`), the
/// only forms RFC 5280 §4.1.2.5 allows, as Unix seconds (0 for earlier).
fn time(tag: u8, text: &[u8]) -> Option<u64> {
    let (year, rest) = match (tag, text.len()) {
        (UTC_TIME, 13) => {
            let yy = digits(&text[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (GENERALIZED_TIME, 15) => (digits(&text[..4])?, &text[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let field = |at: usize| digits(&rest[at..at + 2]);
    let (month, day) = (field(0)?, field(2)?);
    let (hour, minute, second) = (field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second;
    Some(u64::try_from(secs).unwrap_or(0))
}

fn digits(text: &[u8]) -> Option<i64> {
    text.iter().try_fold(0i64, |acc, &b| {
        b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
    })
}

/// A certificate's notBefore and notAfter as Unix seconds.
pub fn validity(cert: &[u8]) -> Option<(u64, u64)> {
    let (tag, from, rest) = tlv(tbs(cert)?.validity)?;
    let from = time(tag, from)?;
    let (tag, until, _) = tlv(rest)?;
    Some((from, time(tag, until)?))
}

/// SHA-256 over the contents of a certificate's issuer Name: how a leaf is
/// matched to its CA ([`subject_key`]) and to its CA's CRLs ([`name_key`]).
pub fn issuer_key(cert: &[u8]) -> Option<[u8; 32]> {
    Some(sha256(tbs(cert)?.issuer))
}

/// SHA-256 over the contents of a certificate's subject Name.
pub fn subject_key(cert: &[u8]) -> Option<[u8; 32]> {
    Some(sha256(tbs(cert)?.subject))
}

/// SHA-256 over the contents of a DER Name, as a CRL's issuer is given.
pub fn name_key(name: &[u8]) -> Option<[u8; 32]> {
    let (contents, _) = expect(name, SEQUENCE)?;
    Some(sha256(contents))
}

/// Reads subject CN and O, issuer O and serial from a DER certificate.
pub fn names(cert: &[u8]) -> Option<CertNames> {
    let Tbs {
        serial,
        issuer,
        subject,
        ..
    } = tbs(cert)?;
    Some(CertNames {
        subject_cn: attribute(subject, OID_CN),
        subject_o: attribute(subject, OID_O),
        issuer_o: attribute(issuer, OID_O),
        serial: serial_hex(serial)?,
    })
}

/// id-ce-extKeyUsage, 2.5.29.37.
const OID_EXT_KEY_USAGE: &[u8] = &[0x55, 0x1d, 0x25];

/// The extended key usage of the manager's signing keys' certificates,
/// `2.25.122450229210474948527528967594312682113`, as DER content: a
/// message's `signer` must carry it (topics.md §4.3).
pub const MANAGER_SIGNING_EKU_DER: &[u8] = &[
    0x69, 0x81, 0xb8, 0x9f, 0x87, 0x9a, 0xd1, 0xd4, 0xda, 0xbd, 0xdd, 0x9a, 0x9e, 0x8a, 0xef, 0xd1,
    0xf0, 0xbd, 0x95, 0x01,
];

/// The value (the OCTET STRING's content) of the extension `oid` of a
/// certificate: `Some(None)` when it has no such extension, `None` when it
/// does not read.
fn extension<'a>(cert: &'a [u8], oid: &[u8]) -> Option<Option<&'a [u8]>> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (mut fields, _) = expect(certificate, SEQUENCE)?;
    // The TBSCertificate's fields up to `[3] extensions`, which is last.
    let extensions = loop {
        let (tag, value, rest) = tlv(fields)?;
        if tag == EXTENSIONS {
            break expect(value, SEQUENCE)?.0;
        }
        if rest.is_empty() {
            return Some(None);
        }
        fields = rest;
    };
    let mut list = extensions;
    while !list.is_empty() {
        let (extension, rest) = expect(list, SEQUENCE)?;
        list = rest;
        let (id, mut rest) = expect(extension, OID)?;
        if id != oid {
            continue;
        }
        // `critical`, when present.
        if let Some((BOOLEAN, _, after)) = tlv(rest) {
            rest = after;
        }
        return Some(Some(expect(rest, OCTET_STRING)?.0));
    }
    Some(None)
}

/// The cA flag of a certificate's basicConstraints extension: false when
/// the certificate has no such extension, `None` when it does not read.
pub fn basic_constraints_ca(cert: &[u8]) -> Option<bool> {
    let Some(value) = extension(cert, OID_BASIC_CONSTRAINTS)? else {
        return Some(false);
    };
    let (constraints, _) = expect(value, SEQUENCE)?;
    Some(matches!(tlv(constraints), Some((BOOLEAN, [0xff], _))))
}

/// The key purposes (OID contents) of a certificate's extendedKeyUsage:
/// empty when it has none, `None` when it does not read.
pub fn extended_key_usages(cert: &[u8]) -> Option<Vec<&[u8]>> {
    let Some(value) = extension(cert, OID_EXT_KEY_USAGE)? else {
        return Some(Vec::new());
    };
    let (mut list, _) = expect(value, SEQUENCE)?;
    let mut out = Vec::new();
    while !list.is_empty() {
        let (purpose, rest) = expect(list, OID)?;
        out.push(purpose);
        list = rest;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::asn1::{Asn1Integer, Asn1Time};
    use openssl::bn::BigNum;
    use openssl::ec::{EcGroup, EcKey};
    use openssl::hash::MessageDigest;
    use openssl::nid::Nid;
    use openssl::pkey::PKey;
    use openssl::x509::{X509Builder, X509NameBuilder, X509};
    use proptest::prelude::*;

    fn cert(serial: &[u8], subject: &[(&str, &str)], issuer_o: &str) -> X509 {
        let key = PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
        )
        .unwrap();
        let mut name = X509NameBuilder::new().unwrap();
        for (field, value) in subject {
            name.append_entry_by_text(field, value).unwrap();
        }
        let mut issuer = X509NameBuilder::new().unwrap();
        issuer.append_entry_by_text("O", issuer_o).unwrap();
        issuer.append_entry_by_text("CN", "Some CA").unwrap();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        let serial = Asn1Integer::from_bn(&BigNum::from_slice(serial).unwrap()).unwrap();
        b.set_serial_number(&serial).unwrap();
        b.set_subject_name(&name.build()).unwrap();
        b.set_issuer_name(&issuer.build()).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.set_pubkey(&key).unwrap();
        b.sign(&key, MessageDigest::sha256()).unwrap();
        b.build()
    }

    /// A self-signed certificate of `key` with the basicConstraints
    /// `constraints` gives, if any.
    fn with_constraints(
        key: &PKey<openssl::pkey::Private>,
        constraints: Option<openssl::x509::extension::BasicConstraints>,
    ) -> Vec<u8> {
        let key_usage = openssl::x509::extension::KeyUsage::new()
            .critical()
            .key_cert_sign()
            .build()
            .unwrap();
        let constraints = constraints.map(|c| c.build().unwrap());
        self_signed(key, constraints.into_iter().chain([key_usage]).collect())
    }

    /// A self-signed certificate of `key` (DER) with `extensions`.
    fn self_signed(
        key: &PKey<openssl::pkey::Private>,
        extensions: Vec<openssl::x509::X509Extension>,
    ) -> Vec<u8> {
        let mut name = X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "a root").unwrap();
        let name = name.build();
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(&name).unwrap();
        b.set_issuer_name(&name).unwrap();
        b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::days_from_now(1).unwrap())
            .unwrap();
        b.set_pubkey(key).unwrap();
        for extension in extensions {
            b.append_extension(extension).unwrap();
        }
        b.sign(key, MessageDigest::sha256()).unwrap();
        b.build().to_der().unwrap()
    }

    #[test]
    fn the_ca_flag_is_read_from_basic_constraints() {
        use openssl::x509::extension::BasicConstraints;
        let key = PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
        )
        .unwrap();
        let ca = |c: &mut BasicConstraints| {
            c.critical().ca();
        };
        let mut root = BasicConstraints::new();
        ca(&mut root);
        let root = with_constraints(&key, Some(root));
        assert_eq!(basic_constraints_ca(&root), Some(true));
        let mut limited = BasicConstraints::new();
        ca(&mut limited);
        limited.pathlen(0);
        assert_eq!(
            basic_constraints_ca(&with_constraints(&key, Some(limited))),
            Some(true)
        );
        // Not critical: the flag is what counts.
        let mut lax = BasicConstraints::new();
        lax.ca();
        assert_eq!(
            basic_constraints_ca(&with_constraints(&key, Some(lax))),
            Some(true)
        );
        // cA false (its DEFAULT, so left out), and no extension at all.
        let mut leaf = BasicConstraints::new();
        leaf.critical();
        assert_eq!(
            basic_constraints_ca(&with_constraints(&key, Some(leaf))),
            Some(false)
        );
        assert_eq!(
            basic_constraints_ca(&with_constraints(&key, None)),
            Some(false)
        );
        let plain = cert(&[1], &[("CN", "dev1")], "svcA");
        assert_eq!(basic_constraints_ca(&plain.to_der().unwrap()), Some(false));
        assert_eq!(basic_constraints_ca(&root[..root.len() / 2]), None);
    }

    #[test]
    fn key_purposes_are_read_from_extended_key_usage() {
        let key = PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
        )
        .unwrap();
        let plain = with_constraints(&key, None);
        assert_eq!(extended_key_usages(&plain), Some(vec![]));
        let eku = openssl::x509::extension::ExtendedKeyUsage::new()
            .critical()
            .server_auth()
            .other("2.25.122450229210474948527528967594312682113")
            .build()
            .unwrap();
        let der = self_signed(&key, vec![eku]);
        let server_auth: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
        assert_eq!(
            extended_key_usages(&der),
            Some(vec![server_auth, MANAGER_SIGNING_EKU_DER])
        );
        assert_eq!(extended_key_usages(&der[..der.len() / 2]), None);
    }

    fn openssl_serial(cert: &X509) -> String {
        cert.serial_number()
            .to_bn()
            .unwrap()
            .to_hex_str()
            .unwrap()
            .to_lowercase()
    }

    #[test]
    fn reads_what_openssl_reads() {
        let c = cert(&[0x0a, 0xbc], &[("O", "svcA"), ("CN", "dev-1")], "svcA");
        let names = names(&c.to_der().unwrap()).unwrap();
        assert_eq!(names.subject_cn.as_deref(), Some("dev-1"));
        assert_eq!(names.subject_o.as_deref(), Some("svcA"));
        assert_eq!(names.issuer_o.as_deref(), Some("svcA"));
        assert_eq!(names.serial, openssl_serial(&c));
        assert_eq!(names.serial, "0abc");
    }

    #[test]
    fn the_first_of_repeated_attributes_counts_and_absent_ones_are_none() {
        let c = cert(&[1], &[("CN", "first"), ("CN", "second")], "svcB");
        let names = names(&c.to_der().unwrap()).unwrap();
        assert_eq!(names.subject_cn.as_deref(), Some("first"));
        assert_eq!(names.subject_o, None);
        assert_eq!(names.issuer_o.as_deref(), Some("svcB"));
    }

    #[test]
    fn truncated_or_foreign_input_is_none() {
        let der = cert(&[7], &[("CN", "d")], "s").to_der().unwrap();
        for cut in [0, 1, 2, 10, der.len() / 2] {
            assert_eq!(names(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(names(&[0x30, 0x80, 0x00, 0x00]), None);
        assert_eq!(names(b"not a certificate"), None);
    }

    #[test]
    fn negative_or_empty_serials_are_refused() {
        assert_eq!(serial_hex(&[0x80, 0x01]), None);
        assert_eq!(serial_hex(&[]), None);
        assert_eq!(serial_hex(&[0x00]).as_deref(), Some("0"));
        assert_eq!(serial_hex(&[0x00, 0x80]).as_deref(), Some("80"));
    }

    /// A certificate valid from `from` to `until` (Unix seconds).
    fn valid_between(from: i64, until: i64) -> X509 {
        let c = cert(&[1], &[("CN", "d")], "s");
        let mut b = X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_serial_number(c.serial_number()).unwrap();
        b.set_subject_name(c.subject_name()).unwrap();
        b.set_issuer_name(c.issuer_name()).unwrap();
        b.set_not_before(&Asn1Time::from_unix(from).unwrap())
            .unwrap();
        b.set_not_after(&Asn1Time::from_unix(until).unwrap())
            .unwrap();
        let key = c.public_key().unwrap();
        b.set_pubkey(&key).unwrap();
        let signer = PKey::from_ec_key(
            EcKey::generate(&EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).unwrap()).unwrap(),
        )
        .unwrap();
        b.sign(&signer, MessageDigest::sha256()).unwrap();
        b.build()
    }

    #[test]
    fn validity_reads_utc_and_generalized_times() {
        // OpenSSL writes UTCTime up to 2049 and GeneralizedTime from 2050.
        let (from, until) = (1_764_000_000, 2_600_000_000);
        let c = valid_between(from, until);
        assert_eq!(
            validity(&c.to_der().unwrap()),
            Some((from as u64, until as u64))
        );
        assert_eq!(time(UTC_TIME, b"700101000000Z"), Some(0));
        assert_eq!(time(UTC_TIME, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(
            time(GENERALIZED_TIME, b"20000229120000Z"),
            Some(951_825_600)
        );
        assert_eq!(
            time(UTC_TIME, b"691231235959Z"),
            Some(0),
            "before 1970 is 0"
        );
        for bad in [
            &b"700101000000"[..],
            b"7001010000000",
            b"701301000000Z",
            b"70010100000aZ",
        ] {
            assert_eq!(
                time(UTC_TIME, bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(time(GENERALIZED_TIME, b"19700101000000.5Z"), None);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn validity_matches_openssl(from in 0i64..4_000_000_000, span in 0i64..2_000_000_000) {
            let c = valid_between(from, from + span);
            let der = c.to_der().unwrap();
            prop_assert_eq!(validity(&der), Some((from as u64, (from + span) as u64)));
        }

        #[test]
        fn serials_match_openssl(serial in proptest::collection::vec(any::<u8>(), 1..20)) {
            let c = cert(&serial, &[("CN", "d")], "s");
            prop_assert_eq!(names(&c.to_der().unwrap()).unwrap().serial, openssl_serial(&c));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = names(&bytes);
            let _ = validity(&bytes);
            let _ = basic_constraints_ca(&bytes);
            let _ = extended_key_usages(&bytes);
        }
    }
}

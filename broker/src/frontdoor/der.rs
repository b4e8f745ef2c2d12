//! Just enough DER to read the names and serial of a client certificate
//! that webpki has already verified: the front door's identity comes from
//! them, and reading them here spares every handshake a second, far
//! costlier parse (OpenSSL 3 decodes the public key of every certificate
//! it parses).
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

/// id-at-commonName, 2.5.4.3.
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// id-at-organizationName, 2.5.4.10.
const OID_O: &[u8] = &[0x55, 0x04, 0x0a];

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

/// Reads subject CN and O, issuer O and serial from a DER certificate.
pub fn names(cert: &[u8]) -> Option<CertNames> {
    let (certificate, _) = expect(cert, SEQUENCE)?;
    let (tbs, _) = expect(certificate, SEQUENCE)?;
    let tbs = match tlv(tbs)? {
        (VERSION, _, rest) => rest,
        _ => tbs,
    };
    let (serial, rest) = expect(tbs, INTEGER)?;
    let (_signature, rest) = expect(rest, SEQUENCE)?;
    let (issuer, rest) = expect(rest, SEQUENCE)?;
    let (_validity, rest) = expect(rest, SEQUENCE)?;
    let (subject, _) = expect(rest, SEQUENCE)?;
    Some(CertNames {
        subject_cn: attribute(subject, OID_CN),
        subject_o: attribute(subject, OID_O),
        issuer_o: attribute(issuer, OID_O),
        serial: serial_hex(serial)?,
    })
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn serials_match_openssl(serial in proptest::collection::vec(any::<u8>(), 1..20)) {
            let c = cert(&serial, &[("CN", "d")], "s");
            prop_assert_eq!(names(&c.to_der().unwrap()).unwrap().serial, openssl_serial(&c));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = names(&bytes);
        }
    }
}

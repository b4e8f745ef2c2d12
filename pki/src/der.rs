//! A minimal DER encoder: just the types a CRL needs (SEQUENCE, INTEGER,
//! OBJECT IDENTIFIER, OCTET STRING, BIT STRING, UTCTime/GeneralizedTime and
//! context tags). Encoding only; parsing is left to OpenSSL.

const TAG_INTEGER: u8 = 0x02;
const TAG_BIT_STRING: u8 = 0x03;
const TAG_OCTET_STRING: u8 = 0x04;
const TAG_OID: u8 = 0x06;
const TAG_UTC_TIME: u8 = 0x17;
const TAG_GENERALIZED_TIME: u8 = 0x18;
const TAG_SEQUENCE: u8 = 0x30;

/// One TLV with a definite length (short form below 128, long form above).
pub(crate) fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len() + 6);
    out.push(tag);
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(content);
    out
}

/// SEQUENCE of already encoded elements, in order.
pub(crate) fn sequence(elements: &[&[u8]]) -> Vec<u8> {
    tlv(TAG_SEQUENCE, &elements.concat())
}

/// A non-negative INTEGER from its big-endian magnitude (leading zeros allowed).
pub(crate) fn unsigned_integer(magnitude: &[u8]) -> Vec<u8> {
    let start = magnitude.iter().take_while(|b| **b == 0).count();
    let significant = &magnitude[start..];
    let mut content = Vec::with_capacity(significant.len() + 1);
    // A set top bit would read as negative, and zero still needs one octet.
    if significant.first().map_or(true, |b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(significant);
    tlv(TAG_INTEGER, &content)
}

pub(crate) fn u64_integer(value: u64) -> Vec<u8> {
    unsigned_integer(&value.to_be_bytes())
}

/// OBJECT IDENTIFIER from its arcs. The first two arcs must be valid (0–2, and
/// below 40 unless the first is 2); callers pass constants.
pub(crate) fn oid(arcs: &[u64]) -> Vec<u8> {
    assert!(arcs.len() >= 2, "an OID has at least two arcs");
    let mut content = Vec::new();
    let mut push_base128 = |mut v: u64| {
        let mut chunk = vec![(v & 0x7f) as u8];
        v >>= 7;
        while v > 0 {
            chunk.push(0x80 | (v & 0x7f) as u8);
            v >>= 7;
        }
        chunk.reverse();
        content.extend_from_slice(&chunk);
    };
    push_base128(arcs[0] * 40 + arcs[1]);
    for arc in &arcs[2..] {
        push_base128(*arc);
    }
    tlv(TAG_OID, &content)
}

pub(crate) fn octet_string(bytes: &[u8]) -> Vec<u8> {
    tlv(TAG_OCTET_STRING, bytes)
}

/// BIT STRING of whole octets (zero unused bits).
pub(crate) fn bit_string(bytes: &[u8]) -> Vec<u8> {
    let mut content = Vec::with_capacity(bytes.len() + 1);
    content.push(0);
    content.extend_from_slice(bytes);
    tlv(TAG_BIT_STRING, &content)
}

/// `[n] EXPLICIT` wrapper (constructed, context-specific).
pub(crate) fn explicit(n: u8, inner: &[u8]) -> Vec<u8> {
    tlv(0xa0 | n, inner)
}

/// `[n] IMPLICIT` primitive (context-specific), e.g. an OCTET STRING's contents.
pub(crate) fn implicit_primitive(n: u8, content: &[u8]) -> Vec<u8> {
    tlv(0x80 | n, content)
}

/// RFC 5280 `Time`: UTCTime for years 1950–2049, GeneralizedTime otherwise
/// (section 4.1.2.5). Seconds since the Unix epoch, always UTC with `Z`.
pub(crate) fn time(unix_seconds: i64) -> Vec<u8> {
    let days = unix_seconds.div_euclid(86_400);
    let secs = unix_seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if (1950..2050).contains(&year) {
        let text = format!("{:02}{month:02}{day:02}{h:02}{m:02}{s:02}Z", year % 100);
        tlv(TAG_UTC_TIME, text.as_bytes())
    } else {
        let text = format!("{year:04}{month:02}{day:02}{h:02}{m:02}{s:02}Z");
        tlv(TAG_GENERALIZED_TIME, text.as_bytes())
    }
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day);
/// Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use openssl::asn1::Asn1Time;

    #[test]
    fn lengths_switch_to_long_form_at_128() {
        assert_eq!(tlv(0x04, &[0; 127])[..2], [0x04, 127]);
        assert_eq!(tlv(0x04, &[0; 128])[..3], [0x04, 0x81, 128]);
        assert_eq!(tlv(0x04, &[0; 300])[..4], [0x04, 0x82, 0x01, 0x2c]);
    }

    #[test]
    fn integers_are_minimal_and_positive() {
        assert_eq!(u64_integer(0), [0x02, 0x01, 0x00]);
        assert_eq!(u64_integer(127), [0x02, 0x01, 0x7f]);
        assert_eq!(u64_integer(128), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(u64_integer(256), [0x02, 0x02, 0x01, 0x00]);
        assert_eq!(unsigned_integer(&[0, 0, 0xff]), [0x02, 0x02, 0x00, 0xff]);
        assert_eq!(unsigned_integer(&[]), [0x02, 0x01, 0x00]);
    }

    #[test]
    fn oids_match_known_encodings() {
        let ecdsa_sha256 = [0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];
        assert_eq!(oid(&[1, 2, 840, 10045, 4, 3, 2]), ecdsa_sha256);
        assert_eq!(oid(&[2, 5, 29, 20]), [0x06, 0x03, 0x55, 0x1d, 0x14]);
        assert_eq!(oid(&[2, 5, 29, 35]), [0x06, 0x03, 0x55, 0x1d, 0x23]);
    }

    #[test]
    fn times_agree_with_openssl() {
        let samples = [
            0,
            951_782_400,   // 2000-02-29, a leap day
            1_709_164_799, // 2024-02-28 23:59:59
            2_524_607_999, // 2049-12-31 23:59:59, last UTCTime second
            2_524_608_000, // 2050-01-01, first GeneralizedTime second
            4_102_444_800, // 2100-01-01, not a leap year
        ];
        for t in samples {
            let ours = time(t);
            let text = std::str::from_utf8(&ours[2..]).unwrap();
            let parsed = Asn1Time::from_str(text).unwrap();
            let reference = Asn1Time::from_unix(t as _).unwrap();
            let diff = parsed.diff(&reference).unwrap();
            assert_eq!((diff.days, diff.secs), (0, 0), "time {t} encoded as {text}");
            let expected_tag = if t < 2_524_608_000 {
                TAG_UTC_TIME
            } else {
                TAG_GENERALIZED_TIME
            };
            assert_eq!(ours[0], expected_tag, "time {t}");
        }
    }
}

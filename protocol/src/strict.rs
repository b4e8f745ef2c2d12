//! What `serde_cbor` takes and §3.1 of `topics.md` does not: a map that
//! holds a key twice or a key that is not a text string, a tag, and a byte
//! field sent as a text string or an array of integers (which
//! `serde_bytes` accepts). Each makes a message `malformed`.

use std::collections::HashSet;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Serializer;
use serde_bytes::ByteBuf;

use crate::ProtocolError;

/// Nesting deeper than this is refused (the bodies nest three levels).
const MAX_DEPTH: usize = 32;

/// Checks that every map in the CBOR item at the start of `bytes` has
/// text-string keys, none of them twice (RFC 8949 §5.6: such a map is not
/// valid, and decoders differ in which value they keep; `serde_cbor` would
/// also take an integer key as a field's position), and that no item is
/// tagged (§3.1: no tags). Keys are compared by their text, however each
/// is encoded. The walk reads each byte once; a map's keys are kept in a
/// hash set.
pub fn no_duplicate_keys(bytes: &[u8]) -> Result<(), ProtocolError> {
    let mut at = 0;
    item(bytes, &mut at, 0)
}

fn bad(why: &'static str) -> ProtocolError {
    ProtocolError::BadCbor(why)
}

/// The major type and argument of the item head at `at` (`None`: an
/// indefinite length, or for major type 7 the break code).
fn head(bytes: &[u8], at: &mut usize) -> Result<(u8, Option<u64>), ProtocolError> {
    let first = *bytes.get(*at).ok_or(bad("truncated"))?;
    *at += 1;
    let (major, info) = (first >> 5, first & 0x1f);
    let width = match info {
        0..=23 => return Ok((major, Some(info.into()))),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        31 => return Ok((major, None)),
        _ => return Err(bad("reserved additional information")),
    };
    let arg = bytes
        .get(*at..*at + width)
        .ok_or(bad("truncated"))?
        .iter()
        .fold(0u64, |n, b| n << 8 | u64::from(*b));
    *at += width;
    Ok((major, Some(arg)))
}

/// Whether the break code is next, taken if so.
fn broken(bytes: &[u8], at: &mut usize) -> Result<bool, ProtocolError> {
    match bytes.get(*at) {
        Some(0xff) => {
            *at += 1;
            Ok(true)
        }
        Some(_) => Ok(false),
        None => Err(bad("truncated")),
    }
}

/// Whether another element follows: `left` of a definite length, or no
/// break code yet of an indefinite one.
fn more(bytes: &[u8], at: &mut usize, left: Option<u64>) -> Result<bool, ProtocolError> {
    match left {
        Some(n) => Ok(n > 0),
        None => Ok(!broken(bytes, at)?),
    }
}

fn item(bytes: &[u8], at: &mut usize, depth: usize) -> Result<(), ProtocolError> {
    if depth > MAX_DEPTH {
        return Err(bad("nested too deep"));
    }
    match head(bytes, at)? {
        (0 | 1 | 7, Some(_)) => Ok(()),
        (2 | 3, Some(len)) => content(bytes, at, len).map(drop),
        (2 | 3, None) => {
            while !broken(bytes, at)? {
                item(bytes, at, depth + 1)?;
            }
            Ok(())
        }
        (4, len) => {
            let mut left = len;
            while more(bytes, at, left)? {
                item(bytes, at, depth + 1)?;
                left = left.map(|n| n - 1);
            }
            Ok(())
        }
        (5, len) => {
            let mut keys = HashSet::new();
            let mut left = len;
            while more(bytes, at, left)? {
                if !keys.insert(text(bytes, at)?) {
                    return Err(ProtocolError::DuplicateKey);
                }
                item(bytes, at, depth + 1)?;
                left = left.map(|n| n - 1);
            }
            Ok(())
        }
        (6, Some(_)) => Err(bad("a tag")),
        _ => Err(bad("unexpected break or indefinite length")),
    }
}

/// The `len` bytes at `at`, taken.
fn content<'a>(bytes: &'a [u8], at: &mut usize, len: u64) -> Result<&'a [u8], ProtocolError> {
    let end = usize::try_from(len)
        .ok()
        .and_then(|len| at.checked_add(len))
        .filter(|end| *end <= bytes.len())
        .ok_or(bad("truncated"))?;
    let taken = &bytes[*at..end];
    *at = end;
    Ok(taken)
}

/// The content of the text string at `at`, a map key: in one piece
/// whatever its encoding (a length longer than it needs, or chunks), so
/// that a key written twice is found however each was written.
fn text(bytes: &[u8], at: &mut usize) -> Result<Vec<u8>, ProtocolError> {
    match head(bytes, at)? {
        (3, Some(len)) => Ok(content(bytes, at, len)?.to_vec()),
        (3, None) => {
            let mut whole = Vec::new();
            while !broken(bytes, at)? {
                match head(bytes, at)? {
                    (3, Some(len)) => whole.extend_from_slice(content(bytes, at, len)?),
                    _ => return Err(bad("a text chunk that is not definite text")),
                }
            }
            Ok(whole)
        }
        _ => Err(bad("a map key that is not a text string")),
    }
}

/// A byte field: written as `serde_bytes` writes it (a byte string), and
/// read only from a byte string.
pub mod bytes {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        serde_bytes::serialize(bytes, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(ByteString)
    }
}

/// An optional byte field, absent when `None` (never `null`).
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(bytes: &Option<ByteBuf>, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(bytes, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ByteBuf>, D::Error> {
        d.deserialize_byte_buf(ByteString)
            .map(|b| Some(ByteBuf::from(b)))
    }
}

/// An optional array of byte strings, absent when `None`.
pub mod option_list {
    use super::*;

    pub fn serialize<S: Serializer>(list: &Option<Vec<ByteBuf>>, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(list, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<ByteBuf>>, D::Error> {
        d.deserialize_seq(ByteStrings).map(Some)
    }
}

struct ByteString;

impl<'de> Visitor<'de> for ByteString {
    type Value = Vec<u8>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a byte string")
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
        Ok(v.to_vec())
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
        Ok(v)
    }
}

struct ByteStrings;

impl<'de> Visitor<'de> for ByteStrings {
    type Value = Vec<ByteBuf>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an array of byte strings")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<ByteBuf>, A::Error> {
        let mut list = Vec::new();
        while let Some(Element(bytes)) = seq.next_element()? {
            list.push(ByteBuf::from(bytes));
        }
        Ok(list)
    }
}

struct Element(Vec<u8>);

impl<'de> serde::Deserialize<'de> for Element {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Element, D::Error> {
        bytes::deserialize(d).map(Element)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_with_a_key_twice_is_refused_at_any_depth() {
        // {"a": 1, "b": {"c": 2}}
        let fine = [0xa2, 0x61, b'a', 1, 0x61, b'b', 0xa1, 0x61, b'c', 2];
        assert!(no_duplicate_keys(&fine).is_ok());
        let twice = [0xa2, 0x61, b'a', 1, 0x61, b'a', 2];
        assert!(matches!(
            no_duplicate_keys(&twice),
            Err(ProtocolError::DuplicateKey)
        ));
        let inner = [0xa1, 0x61, b'b', 0xa2, 0x61, b'c', 1, 0x61, b'c', 2];
        assert!(matches!(
            no_duplicate_keys(&inner),
            Err(ProtocolError::DuplicateKey)
        ));
        // Indefinite map, array and text.
        let indefinite = [
            0xbf, 0x61, b'a', 0x9f, 1, 0xff, 0x7f, 0x61, b'x', 0xff, 0x02, 0xff,
        ];
        assert!(no_duplicate_keys(&indefinite).is_ok());
        let indefinite_twice = [0xbf, 0x61, b'a', 1, 0x61, b'a', 2, 0xff];
        assert!(no_duplicate_keys(&indefinite_twice).is_err());
        // The same key in a longer length, or in chunks.
        let longer = [0xa2, 0x62, b'z', b'z', 1, 0x78, 2, b'z', b'z', 2];
        assert!(matches!(
            no_duplicate_keys(&longer),
            Err(ProtocolError::DuplicateKey)
        ));
        let chunked = [
            0xa2, 0x62, b'z', b'z', 1, 0x7f, 0x61, b'z', 0x61, b'z', 0xff, 2,
        ];
        assert!(matches!(
            no_duplicate_keys(&chunked),
            Err(ProtocolError::DuplicateKey)
        ));
        // An integer key, a tag.
        assert!(no_duplicate_keys(&[0xa1, 0, 1]).is_err());
        assert!(no_duplicate_keys(&[0xa1, 0x61, b'a', 0xc2, 0x41, 0]).is_err());
        // Truncated, a length past the end, a stray break, deep nesting.
        for broken in [
            &[0xa2, 0x61, b'a'][..],
            &[0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[0xff],
            &[0x81; 40],
        ] {
            assert!(no_duplicate_keys(broken).is_err(), "{broken:02x?}");
        }
    }

    #[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
    struct Fields {
        #[serde(with = "bytes")]
        b: Vec<u8>,
        #[serde(default, skip_serializing_if = "Option::is_none", with = "option")]
        o: Option<ByteBuf>,
        #[serde(default, skip_serializing_if = "Option::is_none", with = "option_list")]
        l: Option<Vec<ByteBuf>>,
    }

    #[test]
    fn byte_fields_are_byte_strings_only() {
        let value = Fields {
            b: vec![1, 2],
            o: Some(ByteBuf::from(vec![3])),
            l: Some(vec![ByteBuf::from(vec![4])]),
        };
        let cbor = serde_cbor::to_vec(&value).unwrap();
        assert_eq!(serde_cbor::from_slice::<Fields>(&cbor).unwrap(), value);
        let absent = serde_cbor::to_vec(&Fields {
            b: vec![],
            o: None,
            l: None,
        })
        .unwrap();
        assert_eq!(absent, [0xa1, 0x61, b'b', 0x40]);
        assert!(serde_cbor::from_slice::<Fields>(&absent).is_ok());
        let wrong = [
            // "b": "ab"
            &[0xa1, 0x61, b'b', 0x62, b'a', b'b'][..],
            // "b": [1, 2]
            &[0xa1, 0x61, b'b', 0x82, 1, 2],
            // "o": null
            &[0xa2, 0x61, b'b', 0x40, 0x61, b'o', 0xf6],
            // "l": ["x"]
            &[0xa2, 0x61, b'b', 0x40, 0x61, b'l', 0x81, 0x61, b'x'],
        ];
        for cbor in wrong {
            assert!(
                serde_cbor::from_slice::<Fields>(cbor).is_err(),
                "{cbor:02x?}"
            );
        }
    }
}

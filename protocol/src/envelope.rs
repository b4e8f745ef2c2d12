//! The outer frame of every message: version, kind, encoded body, CRC-32
//! and authenticator.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{ProtocolError, MAX_MESSAGE_LEN, PROTOCOL_VERSION};

/// Message kinds. Encoded as text; an unknown kind decodes to
/// [`Kind::Unknown`] so the receiver can answer it instead of choking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Activate,
    ActivateReply,
    Update,
    UpdateReply,
    Poll,
    PollReply,
    Status,
    StatusReply,
    ServiceChange,
    #[serde(other)]
    Unknown,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Activate => "activate",
            Kind::ActivateReply => "activate_reply",
            Kind::Update => "update",
            Kind::UpdateReply => "update_reply",
            Kind::Poll => "poll",
            Kind::PollReply => "poll_reply",
            Kind::Status => "status",
            Kind::StatusReply => "status_reply",
            Kind::ServiceChange => "service_change",
            Kind::Unknown => "unknown",
        }
    }

    /// The reply kind answering a request kind.
    pub fn reply(self) -> Option<Kind> {
        Some(match self {
            Kind::Activate => Kind::ActivateReply,
            Kind::Update => Kind::UpdateReply,
            Kind::Poll => Kind::PollReply,
            Kind::Status => Kind::StatusReply,
            _ => return None,
        })
    }
}

impl From<crate::RequestKind> for Kind {
    fn from(k: crate::RequestKind) -> Kind {
        match k {
            crate::RequestKind::Activate => Kind::Activate,
            crate::RequestKind::Update => Kind::Update,
            crate::RequestKind::Poll => Kind::Poll,
            crate::RequestKind::Status => Kind::Status,
        }
    }
}

/// `{ "v": uint, "kind": tstr, "body": bstr, "crc": uint, "auth": bstr,
/// ? "signer": [+ bstr] }`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u8,
    pub kind: Kind,
    /// The CBOR-encoded body map.
    #[serde(with = "crate::strict::bytes")]
    pub body: Vec<u8>,
    /// CRC-32 (IEEE 802.3, as zlib's `crc32`) of `body`.
    pub crc: u32,
    /// Signature or HMAC over [`to_be_signed`]`(kind, body)`.
    #[serde(with = "crate::strict::bytes")]
    pub auth: Vec<u8>,
    /// Manager messages signed by a successor of the first signing key:
    /// that key's certificate (DER), then the cross-certificates from its
    /// root back to older roots (topics.md §4.3). Not covered by `auth`:
    /// it proves itself by the roots a device pins.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::strict::option_list"
    )]
    pub signer: Option<Vec<serde_bytes::ByteBuf>>,
}

/// CRC-32 (IEEE) of `data`.
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

/// The bytes every signature and HMAC covers: the CBOR array
/// `["fleetshift/v1", kind, body]`, so a body signed as one kind can never
/// pass as another.
pub fn to_be_signed(kind: Kind, body: &[u8]) -> Vec<u8> {
    let tbs = (
        "fleetshift/v1",
        kind.as_str(),
        serde_bytes::Bytes::new(body),
    );
    serde_cbor::to_vec(&tbs).expect("CBOR encoding of a tuple cannot fail")
}

impl Envelope {
    /// Encodes `body` and frames it with its CRC; `authenticate` gets the
    /// to-be-signed bytes and returns the authenticator.
    pub fn build<T: Serialize>(
        kind: Kind,
        body: &T,
        authenticate: impl FnOnce(&[u8]) -> Result<Vec<u8>, ProtocolError>,
    ) -> Result<Envelope, ProtocolError> {
        let body = serde_cbor::to_vec(body)?;
        let auth = authenticate(&to_be_signed(kind, &body))?;
        Ok(Envelope {
            v: PROTOCOL_VERSION,
            kind,
            crc: crc32(&body),
            body,
            auth,
            signer: None,
        })
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_cbor::to_vec(self).expect("CBOR encoding of an envelope cannot fail")
    }

    /// Checks size before parsing, then decodes the frame. Does not check
    /// the CRC or the authenticator.
    pub fn decode(bytes: &[u8]) -> Result<Envelope, ProtocolError> {
        if bytes.len() > MAX_MESSAGE_LEN {
            return Err(ProtocolError::TooLarge(bytes.len()));
        }
        let env: Envelope = serde_cbor::from_slice(bytes)?;
        crate::strict::no_duplicate_keys(bytes)?;
        if env.v != PROTOCOL_VERSION {
            return Err(ProtocolError::UnsupportedVersion(env.v));
        }
        Ok(env)
    }

    pub fn crc_ok(&self) -> bool {
        crc32(&self.body) == self.crc
    }

    pub fn tbs(&self) -> Vec<u8> {
        to_be_signed(self.kind, &self.body)
    }

    /// Decodes the body as `T`.
    pub fn body<T: DeserializeOwned>(&self) -> Result<T, ProtocolError> {
        let body = serde_cbor::from_slice(&self.body)?;
        crate::strict::no_duplicate_keys(&self.body)?;
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_kind_decodes() {
        let env = Envelope {
            v: 1,
            kind: Kind::Poll,
            body: vec![0xa0],
            crc: crc32(&[0xa0]),
            auth: vec![],
            signer: None,
        };
        let mut bytes = env.encode();
        // "poll" -> "pole": still a text string of the same length.
        let pos = bytes.windows(4).position(|w| w == b"poll").unwrap();
        bytes[pos + 3] = b'e';
        assert_eq!(Envelope::decode(&bytes).unwrap().kind, Kind::Unknown);
    }

    #[test]
    fn rejects_oversize_before_parsing() {
        let big = vec![0u8; MAX_MESSAGE_LEN + 1];
        assert!(matches!(
            Envelope::decode(&big),
            Err(ProtocolError::TooLarge(_))
        ));
    }

    #[test]
    fn crc_is_zlib_crc32() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }
}

#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Decoding never panics, whatever the bytes.
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = Envelope::decode(&bytes);
        }

        /// Any envelope round-trips byte for byte.
        #[test]
        fn round_trip(body in proptest::collection::vec(any::<u8>(), 0..512), auth in proptest::collection::vec(any::<u8>(), 0..80)) {
            let env = Envelope { v: PROTOCOL_VERSION, kind: Kind::Status, crc: crc32(&body), body, auth, signer: None };
            let bytes = env.encode();
            let back = Envelope::decode(&bytes).unwrap();
            prop_assert!(back.crc_ok());
            prop_assert_eq!(back.encode(), bytes);
            prop_assert_eq!(back, env);
        }
    }
}

//! The fleetshift v1 wire protocol: topics, message bodies, the CBOR frame
//! with its CRC, and the signing, HMAC and sealing helpers. No async, no I/O.
//!
//! `topics.md` at the top of the repository is the specification; this
//! crate is its reference implementation and tests its example payloads.
//!
//! # Layout
//! - [`topic`]: the typed topic names, parse and display.
//! - [`envelope`]: the frame (`v`, `kind`, `body`, `crc`, `auth`) and the to-be-signed bytes.
//! - [`messages`]: request, reply and notice bodies.
//! - [`status`]: the closed list of status codes.
//! - [`strict`]: what §3.1 refuses and `serde_cbor` would take (a key
//!   given twice, a byte field that is not a byte string).
//! - [`crypto`]: ECDSA P-256, HMAC-SHA256, ECDH-ES + HKDF + AES-256-GCM sealing.

pub mod certificate;
pub mod crypto;
pub mod envelope;
pub mod messages;
pub mod status;
pub mod strict;
pub mod topic;

pub use envelope::{Envelope, Kind};
pub use messages::{
    ActivateRequest, PollRequest, Reply, ServiceChange, StatusReport, UpdateRequest,
};
pub use status::Status;
pub use topic::{RequestKind, Route, Topic};

/// Version carried in every envelope.
pub const PROTOCOL_VERSION: u8 = 1;

/// Largest message a receiver decodes; larger ones get `too_large` unread.
pub const MAX_MESSAGE_LEN: usize = 16 * 1024;

/// How far a request timestamp may be from the manager's clock.
pub const MAX_CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// Errors of this layer.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad topic {0:?}")]
    BadTopic(String),
    #[error("bad id {0:?}")]
    BadId(String),
    #[error("bad endpoint {0:?}: not mqtts://HOST:PORT")]
    BadEndpoint(String),
    #[error("message of {0} bytes is larger than the limit")]
    TooLarge(usize),
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    #[error("malformed CBOR: {0}")]
    Cbor(#[from] serde_cbor::Error),
    #[error("malformed CBOR: {0}")]
    BadCbor(&'static str),
    #[error("malformed CBOR: a map holds a key twice")]
    DuplicateKey,
    #[error("bad public key")]
    BadKey,
    #[error("sealed secret does not open")]
    SealBroken,
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

//! Message bodies, named by direction: requests go device → manager, the
//! [`Reply`] and [`ServiceChange`] go manager → device.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::crypto::Sealed;
use crate::Status;

/// `activate`: signed with the device's factory key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivateRequest {
    pub device_id: String,
    /// The device's service id, if it has one; absent on first activation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    #[serde(with = "crate::strict::bytes")]
    pub nonce: Vec<u8>,
    /// Unix time in milliseconds.
    pub ts: u64,
    /// Fresh ephemeral P-256 public key (SEC1, 65 bytes) the reply's secrets are sealed to.
    #[serde(with = "crate::strict::bytes")]
    pub eph: Vec<u8>,
}

/// `update`: HMAC-SHA256 keyed by the device-auth UUID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateRequest {
    pub device_id: String,
    /// The service the certificate is for: the current one or a pending change's.
    pub service_id: String,
    #[serde(with = "crate::strict::bytes")]
    pub nonce: Vec<u8>,
    pub ts: u64,
    #[serde(with = "crate::strict::bytes")]
    pub eph: Vec<u8>,
    /// DER PKCS#10 request (CSR mode). Absent: the manager generates the key.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::strict::option"
    )]
    pub csr: Option<ByteBuf>,
}

/// `poll`: HMAC-SHA256 keyed by the device-auth UUID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollRequest {
    pub device_id: String,
    pub service_id: String,
    #[serde(with = "crate::strict::bytes")]
    pub nonce: Vec<u8>,
    pub ts: u64,
}

/// `status`: progress and acknowledgements, HMAC-SHA256 keyed by the UUID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub device_id: String,
    pub service_id: String,
    #[serde(with = "crate::strict::bytes")]
    pub nonce: Vec<u8>,
    pub ts: u64,
    /// `online`, `change_applied` or `notice_rejected`.
    pub event: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The SHA-256 of the DER of every root CA certificate the device pins
    /// (topics.md §3.5.4): the manager keeps which of its roots each
    /// device pins. 1 to [`MAX_PINNED_ROOTS_REPORTED`] digests of 32 bytes.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::strict::option_list"
    )]
    pub pinned_roots: Option<Vec<ByteBuf>>,
    /// The SHA-256 of the DER SubjectPublicKeyInfo of the manager signing
    /// key the device takes messages by (topics.md §3.5.4, §4.3): the
    /// manager keeps which of its signing keys each device has taken.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::strict::option"
    )]
    pub signing_key: Option<ByteBuf>,
}

/// The most root digests a `status` report may carry in `pinned_roots`.
pub const MAX_PINNED_ROOTS_REPORTED: usize = 8;

/// The one reply body of every request kind; the envelope's kind says which
/// request it answers and which optional fields it may carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Reply {
    pub device_id: String,
    /// The request's nonce, echoed; empty when the request could not be read.
    #[serde(with = "crate::strict::bytes")]
    pub nonce: Vec<u8>,
    /// Manager sequence number, increasing over every reply and notice.
    pub seq: u64,
    pub status: Status,
    /// activate: the assigned service; update: the certificate's service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_id: Option<String>,
    /// activate: the 16 UUID bytes, sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<Sealed>,
    /// update: DER certificates, device certificate first, then its service CA.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::strict::option_list"
    )]
    pub chain: Option<Vec<ByteBuf>>,
    /// update, manager-generated-key mode: the PKCS#8 DER private key, sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Sealed>,
    /// poll: the pending service change, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<ServiceChange>,
    /// Every reply with status `ok`, once the fleet's root CA has rolled
    /// over: the root CA certificates (DER) the device pins from now on,
    /// newest first.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::strict::option_list"
    )]
    pub roots: Option<Vec<ByteBuf>>,
    /// With `roots`: the cross-certificates (DER) that link each of them
    /// to the root before it, by which a device accepts a root it does
    /// not pin yet.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "crate::strict::option_list"
    )]
    pub crosses: Option<Vec<ByteBuf>>,
    /// A human-readable reason for a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// `service_change`: a signed notice that the device's service changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceChange {
    pub device_id: String,
    pub seq: u64,
    pub change_id: String,
    /// The new service id.
    pub service_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub application: Option<String>,
    /// `mqtts://host:port` of the new service's listener, if it moves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    pub ts: u64,
}

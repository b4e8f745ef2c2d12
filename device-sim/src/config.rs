//! What one simulated device, or a fleet of them, is told at start-up.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Default wait for a reply before the identical request is published again.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default telemetry period.
pub const DEFAULT_TELEMETRY_INTERVAL: Duration = Duration::from_secs(5);

/// A broker listener. `host` is also the TLS server name, so for the
/// service listener it must match the broker certificate (`localhost` in tests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        Endpoint {
            host: host.into(),
            port,
        }
    }

    /// Parses `mqtts://host:port` (the form a service-change notice carries,
    /// `fleet_protocol::topic::parse_endpoint`) or, as given on the command
    /// line, `mqtt://host:port` or a bare `host:port`.
    pub fn parse(s: &str) -> Option<Endpoint> {
        if s.starts_with("mqtts://") {
            let (host, port) = fleet_protocol::topic::parse_endpoint(s).ok()?;
            return Some(Endpoint::new(host, port));
        }
        let rest = s
            .strip_prefix("mqtts://")
            .or_else(|| s.strip_prefix("mqtt://"))
            .unwrap_or(s);
        let (host, port) = rest.rsplit_once(':')?;
        if host.is_empty() || host.contains('/') {
            return None;
        }
        Some(Endpoint::new(host, port.parse().ok()?))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Endpoint::parse(s).ok_or_else(|| format!("expected host:port, got {s:?}"))
    }
}

/// Who generates the device's service key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyMode {
    /// The device generates the key and sends a CSR; the key never leaves it.
    #[default]
    Csr,
    /// The manager generates the key and returns it sealed to the device.
    ManagerGenerated,
}

impl FromStr for KeyMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "csr" => Ok(KeyMode::Csr),
            "manager" | "manager_generated" | "manager-generated" => Ok(KeyMode::ManagerGenerated),
            _ => Err(format!("key mode must be csr or manager, got {s:?}")),
        }
    }
}

/// One device. Tests build it directly.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    pub device_id: String,
    /// Parent of the per-device store directories (see [`crate::store`]).
    pub store_root: PathBuf,
    /// Bootstrap listener (activate, first update).
    pub bootstrap: Endpoint,
    /// Reach the bootstrap listener over server-authenticated TLS (checked
    /// against `root_ca_pem`) instead of plain MQTT.
    pub bootstrap_tls: bool,
    /// Mutual-TLS service listener, unless a service-change notice names another.
    pub service: Endpoint,
    /// Fleet root CA (PEM): the trust anchor for the service listener and for issued chains.
    pub root_ca_pem: PathBuf,
    /// The manager's signing public key (PEM SubjectPublicKeyInfo), pinned.
    pub manager_pub_pem: PathBuf,
    pub key_mode: KeyMode,
    pub telemetry_interval: Duration,
    /// Wait for a reply before re-publishing the identical request (3 times at most).
    pub request_timeout: Duration,
}

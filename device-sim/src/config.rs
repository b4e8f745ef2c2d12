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
    /// When it renews its certificate while connected: at a random point
    /// between these two fractions of the certificate's validity (from
    /// notBefore to notAfter), so that a fleet certified at once does not
    /// renew at once ([`RENEW_WINDOW`] by default).
    pub renew_window: (f64, f64),
    /// How long its service may answer `unknown_ca` (3 times at least)
    /// before the device takes its CA for retired and asks for another
    /// certificate ([`UNKNOWN_CA_PATIENCE`] by default).
    pub unknown_ca_patience: Duration,
}

/// A broker loads a new service's CA within seconds; a minute of
/// `unknown_ca` means the CA was retired (topics.md §10.1, step 7).
pub const UNKNOWN_CA_PATIENCE: Duration = Duration::from_secs(60);

/// Renewal between two thirds and three quarters of a certificate's
/// validity: a 30-day certificate is renewed with 7.5 to 10 days left.
pub const RENEW_WINDOW: (f64, f64) = (2.0 / 3.0, 0.75);

/// Reads `FROM,TO` (fractions of a certificate's validity, 0 < FROM <= TO
/// <= 1; a window at 0 would renew at every connection).
pub fn parse_renew_window(s: &str) -> Result<(f64, f64), String> {
    let bad = || format!("expected FROM,TO with 0 < FROM <= TO <= 1, got {s:?}");
    let (from, to) = s.split_once(',').ok_or_else(bad)?;
    let (from, to): (f64, f64) = (
        from.trim().parse().map_err(|_| bad())?,
        to.trim().parse().map_err(|_| bad())?,
    );
    match from > 0.0 && from <= 1.0 && (from..=1.0).contains(&to) {
        true => Ok((from, to)),
        false => Err(bad()),
    }
}

#[cfg(test)]
mod renew_tests {
    use super::*;

    #[test]
    fn a_renewal_window_is_two_fractions_in_order() {
        assert_eq!(parse_renew_window("0.5, 0.75"), Ok((0.5, 0.75)));
        assert_eq!(parse_renew_window("1,1"), Ok((1.0, 1.0)));
        for bad in [
            "0.75,0.5",
            "0.5",
            "-0.1,0.5",
            "0,0",
            "0.5,1.5",
            "a,b",
            "0.5,0.6,0.7",
        ] {
            assert!(parse_renew_window(bad).is_err(), "{bad}");
        }
    }
}

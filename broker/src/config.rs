//! Broker configuration, with the defaults a single-machine deployment uses.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// Plain MQTT listener for activation and first update. Loopback by default.
    pub bootstrap_listen: SocketAddr,
    /// Server-authenticated TLS bootstrap listener (broker certificate, no
    /// client certificate), relayed to the plain bootstrap listener; `None`
    /// disables it.
    pub bootstrap_tls_listen: Option<SocketAddr>,
    /// Mutual-TLS service listener; `None` disables it.
    pub service_listen: Option<SocketAddr>,
    /// Directory of `root-ca.pem`, `broker.pem` and `broker.key`.
    pub certs_dir: PathBuf,
    /// Largest PUBLISH payload the broker accepts. Larger than the protocol's
    /// own limit on purpose, so the manager sees an oversized request and
    /// answers it with `too_large` instead of the device being cut off.
    pub max_payload_size: usize,
    /// Most connections the router holds.
    pub max_connections: usize,
    /// Time a client has to send CONNECT after the connection opens.
    pub connect_timeout_ms: u16,
    /// Time a client has to finish the TLS handshake on the bootstrap TLS listener.
    pub tls_handshake_timeout_ms: u64,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            bootstrap_listen: "127.0.0.1:1883".parse().expect("valid address"),
            bootstrap_tls_listen: Some("127.0.0.1:8884".parse().expect("valid address")),
            service_listen: Some("127.0.0.1:8883".parse().expect("valid address")),
            certs_dir: PathBuf::from("certs"),
            max_payload_size: 256 * 1024,
            max_connections: 20_000,
            connect_timeout_ms: 10_000,
            tls_handshake_timeout_ms: 10_000,
        }
    }
}

impl BrokerConfig {
    /// Defaults, then `file` (TOML) if given, then `FLEET_BROKER_*` variables.
    pub fn load(file: Option<&std::path::Path>) -> Result<BrokerConfig, config::ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(file) = file {
            builder = builder.add_source(config::File::from(file).format(config::FileFormat::Toml));
        }
        builder
            .add_source(config::Environment::with_prefix("FLEET_BROKER").try_parsing(true))
            .build()?
            .try_deserialize()
    }
}

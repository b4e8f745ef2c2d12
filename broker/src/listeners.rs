//! rumqttd configuration. The only module that knows rumqttd's listener
//! types, so the front door can replace them in one place.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

use crate::{BrokerConfig, BrokerError};

pub(crate) fn rumqttd_config(
    config: &BrokerConfig,
    bootstrap: SocketAddr,
    service: Option<SocketAddr>,
) -> Result<Config, BrokerError> {
    let connections = ConnectionSettings {
        connection_timeout_ms: config.connect_timeout_ms,
        max_payload_size: config.max_payload_size,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let mut v4 = HashMap::new();
    v4.insert(
        "bootstrap".to_string(),
        ServerSettings {
            name: "bootstrap".into(),
            listen: bootstrap,
            tls: None,
            next_connection_delay_ms: 0,
            connections: connections.clone(),
        },
    );
    if let Some(service) = service {
        let path = |name: &str| {
            let p = config.certs_dir.join(name);
            if p.exists() {
                Ok(p.to_string_lossy().into_owned())
            } else {
                Err(BrokerError::MissingFile(p.display().to_string()))
            }
        };
        v4.insert(
            "service".to_string(),
            ServerSettings {
                name: "service".into(),
                listen: service,
                tls: Some(TlsConfig::Rustls {
                    capath: Some(path("root-ca.pem")?),
                    certpath: path("broker.pem")?,
                    keypath: path("broker.key")?,
                }),
                next_connection_delay_ms: 0,
                connections,
            },
        );
    }
    Ok(Config {
        id: 0,
        router: RouterConfig {
            max_connections: config.max_connections,
            max_outgoing_packet_count: 200,
            // Per-topic commit logs: small segments keep memory flat with
            // thousands of device topics.
            max_segment_size: 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(v4),
        v5: None,
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    })
}

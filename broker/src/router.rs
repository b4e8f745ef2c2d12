//! The rumqttd router and its configuration: the one place that knows
//! rumqttd's configuration types.

use rumqttd::local::LinkBuilder;
use rumqttd::{Router, RouterConfig};

use crate::frontdoor::LinkFactory;
use crate::BrokerConfig;

/// Starts the router on its own thread and returns how to open links to it.
pub(crate) fn start_router(config: &BrokerConfig) -> LinkFactory {
    let router_config = RouterConfig {
        // The front door enforces the connection limit; the router's is a backstop.
        max_connections: config.max_connections + 16,
        max_outgoing_packet_count: 200,
        // Per-topic commit logs: small segments keep memory flat with
        // thousands of device topics.
        max_segment_size: 1024 * 1024,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let router_tx = Router::new(0, router_config).spawn();
    Box::new(move |client_id: &str, clean: bool| {
        LinkBuilder::new(client_id, router_tx.clone())
            .clean_session(clean)
            .dynamic_filters(true)
            .build()
            .map_err(|e| e.to_string())
    })
}

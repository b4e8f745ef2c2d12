//! The rumqttd router and its configuration: the one place that knows
//! rumqttd's configuration types.

use std::sync::Arc;

use rumqttd::local::LinkBuilder;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use rumqttd::{Router, RouterConfig};
use tokio::sync::oneshot;

use crate::frontdoor::Link;
use crate::BrokerConfig;

/// Opens router links for the front door's sessions.
///
/// Each link is opened by a task of its own, which waits for the router's
/// ConnAck without blocking a thread. If the session gave up waiting in the
/// meantime, the task tells the router the link is gone, so no link outlives
/// its connection.
pub struct LinkOpener {
    /// A link builder for a client id, on the router's channel (whose type
    /// rumqttd does not export).
    builder: Arc<dyn Fn(&str) -> LinkBuilder<'_> + Send + Sync>,
}

impl LinkOpener {
    /// Opens a link: client id, clean session. Fails with the router's reason.
    pub async fn open(&self, client_id: String, clean: bool) -> Result<Link, String> {
        let (answer, answered) = oneshot::channel();
        let builder = self.builder.clone();
        tokio::spawn(async move {
            let link = builder(&client_id)
                .clean_session(clean)
                .dynamic_filters(true)
                .build_async()
                .await
                .map_err(|e| e.to_string());
            // The session gave up waiting: tell the router the link is gone.
            if let Err(Ok((mut tx, _rx, _ack))) = answer.send(link) {
                let bye = Packet::Disconnect(
                    Disconnect {
                        reason_code: DisconnectReasonCode::NormalDisconnection,
                    },
                    None,
                );
                if let Ok(false) = tx.send_nowait(bye) {
                    let _ = tx.notify().await;
                }
            }
        });
        answered
            .await
            .map_err(|_| "router link not opened".to_string())?
    }
}

/// Starts the router as a task of the current runtime (the front door's)
/// and returns how to open links to it. The sessions' tasks and the router
/// then wake each other through the runtime's queues, mostly on the same
/// worker, instead of waking a thread of the router's own (about two
/// futex calls and a context switch per connect).
pub(crate) fn start_router(config: &BrokerConfig) -> LinkOpener {
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
    let (router_tx, router) = Router::new(0, router_config).spawn_async();
    tokio::spawn(router);
    LinkOpener {
        builder: Arc::new(move |client_id| LinkBuilder::new(client_id, router_tx.clone())),
    }
}

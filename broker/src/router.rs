//! The rumqttd router and its configuration: the one place that knows
//! rumqttd's configuration types.

use std::sync::mpsc;

use rumqttd::local::LinkBuilder;
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};
use rumqttd::{Router, RouterConfig};
use tokio::sync::oneshot;

use crate::frontdoor::Link;
use crate::BrokerConfig;

/// A request to open a router link: client id, clean session, where to answer.
type OpenRequest = (String, bool, oneshot::Sender<Result<Link, String>>);

/// Opens router links for the front door's sessions.
///
/// `LinkBuilder::build` blocks until the router answers. The router handles
/// one connect at a time anyway, so one thread of our own waits for it: a
/// connect costs a channel send and a wake-up instead of a hop through
/// Tokio's blocking pool (which grew to dozens of threads under a connect
/// storm, each with its own allocator arena).
pub struct LinkOpener {
    requests: mpsc::Sender<OpenRequest>,
}

impl LinkOpener {
    /// Opens a link: client id, clean session. Fails with the router's reason.
    pub async fn open(&self, client_id: String, clean: bool) -> Result<Link, String> {
        let (answer, answered) = oneshot::channel();
        self.requests
            .send((client_id, clean, answer))
            .map_err(|_| "link opener stopped".to_string())?;
        answered
            .await
            .map_err(|_| "link opener stopped".to_string())?
    }
}

/// Starts the router on its own thread and returns how to open links to it.
/// Must be called inside a Tokio runtime (links left unclaimed are closed
/// through it).
pub(crate) fn start_router(config: &BrokerConfig) -> std::io::Result<LinkOpener> {
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
    let runtime = tokio::runtime::Handle::current();
    let (requests, incoming) = mpsc::channel::<OpenRequest>();
    std::thread::Builder::new()
        .name("link-opener".into())
        .spawn(move || {
            for (client_id, clean, answer) in incoming {
                let link = LinkBuilder::new(&client_id, router_tx.clone())
                    .clean_session(clean)
                    .dynamic_filters(true)
                    .build()
                    .map_err(|e| e.to_string());
                // The session gave up waiting: tell the router the link is gone.
                if let Err(Ok((mut tx, _rx, _ack))) = answer.send(link) {
                    let bye = Packet::Disconnect(
                        Disconnect {
                            reason_code: DisconnectReasonCode::NormalDisconnection,
                        },
                        None,
                    );
                    let _ = runtime.block_on(tx.send(bye));
                }
            }
        })?;
    Ok(LinkOpener { requests })
}

//! The rumqttd router and its configuration: the one place that knows
//! rumqttd's configuration types.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use rumqttd::local::LinkBuilder;
use rumqttd::{Router, RouterConfig};
use tokio::sync::{mpsc, oneshot};

use crate::frontdoor::{session, Link};
use crate::BrokerConfig;

/// A request to open a router link: client id, clean session, where to answer.
type OpenRequest = (String, bool, oneshot::Sender<Result<Link, String>>);

/// Opens router links for the front door's sessions.
///
/// One task sends the router each link's Connect, in the order the sessions
/// asked (the order in which they claimed their identities, so a newer
/// connection's Connect never reaches the router before an older one's);
/// a task per link then waits for its ConnAck, so Connects are not held
/// up behind each other's answers. Neither blocks a thread. If the session
/// gave up waiting in the meantime, the link's task tells the router the
/// link is gone, so no link outlives its connection.
pub struct LinkOpener {
    requests: mpsc::UnboundedSender<OpenRequest>,
    /// The bytes of messages the router's logs hold.
    pub log_bytes: Arc<AtomicU64>,
    /// The subscription filters the router holds.
    pub filters: Arc<AtomicU64>,
    /// Messages subscribers never got: the router's log dropped them first.
    pub skipped: Arc<AtomicU64>,
}

impl LinkOpener {
    /// Opens a link: client id, clean session. Fails with the router's reason.
    pub async fn open(&self, client_id: String, clean: bool) -> Result<Link, String> {
        let (answer, answered) = oneshot::channel();
        self.requests
            .send((client_id, clean, answer))
            .map_err(|_| "router link not opened".to_string())?;
        answered
            .await
            .map_err(|_| "router link not opened".to_string())?
    }
}

/// Sends each request's Connect in turn and leaves its ConnAck to a task of
/// its own.
async fn open_links(
    builder: impl Fn(&str) -> LinkBuilder<'_>,
    mut requests: mpsc::UnboundedReceiver<OpenRequest>,
) {
    while let Some((client_id, clean, answer)) = requests.recv().await {
        let pending = builder(&client_id)
            .clean_session(clean)
            .dynamic_filters(true)
            .send_connect()
            .await;
        let pending = match pending {
            Ok(p) => p,
            Err(e) => {
                let _ = answer.send(Err(e.to_string()));
                continue;
            }
        };
        tokio::spawn(async move {
            let link = pending.connected().await.map_err(|e| e.to_string());
            // The session gave up waiting: tell the router the link is gone.
            if let Err(Ok((mut tx, _rx, _ack))) = answer.send(link) {
                let _ = session::send_now(&mut tx, session::router_goodbye()).await;
            }
        });
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
        max_connections: config.max_connections + config.max_internal_connections + 16,
        max_outgoing_packet_count: 200,
        // Per-topic commit logs: small segments keep memory flat with
        // thousands of device topics.
        max_segment_size: 1024 * 1024,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    };
    let router = Router::new(0, router_config);
    let log_bytes = router.log_bytes();
    let filters = router.filter_count();
    let skipped = router.skipped();
    let (router_tx, router) = router.spawn_async();
    let running = tokio::spawn(router);
    // Every link goes through the router: a broker whose router panicked
    // would refuse every connect from then on while its process lived on.
    // It ends instead, for its supervisor to start it again.
    tokio::spawn(async move {
        match running.await {
            Err(failed) if failed.is_panic() => {
                tracing::error!(error = %failed, "the router panicked; the broker cannot go on");
                std::process::exit(70);
            }
            // Done, or cancelled with the runtime at shutdown.
            _ => {}
        }
    });
    let (requests, incoming) = mpsc::unbounded_channel();
    tokio::spawn(open_links(
        move |client_id| LinkBuilder::new(client_id, router_tx.clone()),
        incoming,
    ));
    LinkOpener {
        requests,
        log_bytes,
        filters,
        skipped,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rumqttd::Notification;

    use super::*;

    const T: Duration = Duration::from_secs(10);

    /// Two links asked for one client id in a row: the router gets their
    /// Connects in that order and keeps the newer, whatever order the
    /// runtime runs the tasks in (one worker: a task spawned last runs
    /// first).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn links_for_one_client_id_reach_the_router_in_the_order_asked() {
        let opener = std::sync::Arc::new(start_router(&BrokerConfig::default()));
        for round in 0..20 {
            // Asked from a worker, as sessions do (the test's own body runs
            // outside the runtime's workers).
            let o = opener.clone();
            let (older, newer) = tokio::spawn(async move {
                tokio::join!(o.open("c".into(), true), o.open("c".into(), true))
            })
            .await
            .unwrap();
            // The older link is dropped by the router, before or after its
            // ConnAck...
            if let Ok((_older_tx, mut older_rx, _)) = older {
                let gone = tokio::time::timeout(T, older_rx.next()).await;
                assert!(
                    matches!(gone, Ok(Err(_))),
                    "round {round}: the older link still open"
                );
            }
            // ...and the newer one is the router's.
            let (mut newer_tx, mut newer_rx, _) =
                newer.unwrap_or_else(|e| panic!("round {round}: the newer link was dropped: {e}"));
            newer_tx.subscribe("a/b").unwrap();
            let ack = tokio::time::timeout(T, newer_rx.next()).await;
            assert!(
                matches!(ack, Ok(Ok(Some(Notification::DeviceAck(_))))),
                "round {round}: the newer link is not the router's: {ack:?}"
            );
        }
    }
}

//! The manager's MQTT side: one task polls the rumqttc event loop and hands
//! each request to a pool of workers; handlers run on blocking threads.

use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::topic::manager_filters;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::handlers::{Core, Outgoing};
use crate::ManagerConfig;

/// Longest a revocation waits for its CRL, so revocations close together
/// share one write. With the broker's polling and grace it stays well
/// under a second from re-key to the old session's end.
const CRL_DEBOUNCE: Duration = Duration::from_millis(100);

pub fn connect(config: &ManagerConfig) -> anyhow::Result<(AsyncClient, EventLoop)> {
    let (host, port) = config.broker_host_port()?;
    let mut opts = MqttOptions::new(&config.client_id, host, port);
    opts.set_keep_alive(Duration::from_secs(30));
    // A persistent session: requests published while the manager restarts
    // wait for it in the broker.
    opts.set_clean_session(false);
    opts.set_max_packet_size(512 * 1024, 512 * 1024);
    opts.set_inflight(200);
    if let Some(user) = &config.broker_username {
        let password = match (&config.broker_password, &config.broker_password_file) {
            (Some(p), _) => p.clone(),
            (None, Some(file)) => std::fs::read_to_string(file)
                .map_err(|e| anyhow::anyhow!("broker_password_file {}: {e}", file.display()))?
                .trim()
                .to_string(),
            (None, None) => String::new(),
        };
        opts.set_credentials(user.clone(), password);
    }
    Ok(AsyncClient::new(opts, 10_000))
}

pub async fn publish_all(client: &AsyncClient, out: Vec<Outgoing>) {
    for msg in out {
        if let Err(err) = client
            .publish(msg.topic.clone(), QoS::AtLeastOnce, false, msg.payload)
            .await
        {
            warn!(topic = %msg.topic, error = %err, "publish failed");
        }
    }
}

/// Polls the event loop until shutdown. `subscribed` turns true once the
/// request filters are acknowledged.
pub async fn serve(
    core: Arc<Core>,
    client: AsyncClient,
    notices: crate::notices::NoticeQueue,
    mut eventloop: EventLoop,
    subscribed: watch::Sender<bool>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let (tx, rx) = mpsc::channel::<Publish>(4096);
    // CRLs are rewritten by one task, at most every CRL_DEBOUNCE, after the
    // replies that revoked certificates are published: a migration of many
    // devices writes a few CRLs, not one per device.
    let crl_due = Arc::new(tokio::sync::Notify::new());
    {
        let (core, due, stop) = (core.clone(), crl_due.clone(), shutdown.clone());
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = due.notified() => {}
                }
                tokio::time::sleep(CRL_DEBOUNCE).await;
                let core = core.clone();
                let _ = tokio::task::spawn_blocking(move || core.write_pending_crls()).await;
            }
            // Whatever is still pending is written before the manager stops.
            let _ = tokio::task::spawn_blocking(move || core.write_pending_crls()).await;
        });
    }
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    for _ in 0..core.config.workers {
        let (core, client, rx, crl_due) =
            (core.clone(), client.clone(), rx.clone(), crl_due.clone());
        tracker.spawn(async move {
            loop {
                let next = rx.lock().await.recv().await;
                let Some(publish) = next else { break };
                let core2 = core.clone();
                let out = tokio::task::spawn_blocking(move || {
                    core2.handle(&publish.topic, &publish.payload)
                })
                .await;
                match out {
                    Ok(out) => {
                        publish_all(&client, out).await;
                        if core.has_pending_crls() {
                            crl_due.notify_one();
                        }
                    }
                    Err(err) => warn!(error = %err, "handler panicked"),
                }
            }
        });
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                backoff = Duration::from_millis(100);
                info!(
                    session_present = ack.session_present,
                    "manager connected to broker"
                );
                for filter in manager_filters() {
                    if let Err(err) = client.subscribe(filter, QoS::AtLeastOnce).await {
                        warn!(error = %err, "subscribe failed");
                    }
                }
                // Every pending change is announced again, paced with
                // the operator's changes (a reconnect with thousands
                // pending sent them all at once).
                let core = core.clone();
                let notices = notices.clone();
                tracker.spawn(async move {
                    match tokio::task::spawn_blocking(move || core.pending_changes()).await {
                        Ok(Ok(pending)) => {
                            if !pending.is_empty() {
                                info!(
                                    devices = pending.len(),
                                    "re-sending pending service-change notices"
                                );
                            }
                            notices.push(pending)
                        }
                        Ok(Err(err)) => warn!(error = %err, "pending changes not read"),
                        Err(err) => warn!(error = %err, "pending changes task failed"),
                    }
                });
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                let _ = subscribed.send(true);
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                if tx.send(p).await.is_err() {
                    break;
                }
            }
            Ok(other) => debug!(event = ?other, "mqtt"),
            Err(err) => {
                let _ = subscribed.send(false);
                warn!(error = %err, "broker connection lost; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    let _ = client.disconnect().await;
    drop(tx);
}

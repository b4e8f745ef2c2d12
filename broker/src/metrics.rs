//! The front door's counters over HTTP, in the Prometheus text format
//! (`GET /metrics`), on a listener of its own (`metrics_listen`, off unless
//! configured; keep it on loopback or behind the scraper's network).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::frontdoor::Metrics;
use crate::slots::{Held, Slots};

/// Longest request head read; a scrape is one short line and a few headers.
const MAX_HEAD: usize = 8 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once.
const MAX_CONNECTIONS: usize = 16;

/// Kind, name (after `fleetshift_broker_`), help, and the counter.
type Series = (
    &'static str,
    &'static str,
    &'static str,
    fn(&Metrics) -> &AtomicU64,
);

const SERIES: &[Series] = &[
    (
        "counter",
        "connections_accepted_total",
        "TCP connections accepted on every listener.",
        |m| &m.accepted,
    ),
    (
        "gauge",
        "connections_live",
        "Connections open now, handshakes included.",
        |m| &m.live,
    ),
    (
        "counter",
        "tls_handshake_failures_total",
        "TLS handshakes that failed or timed out.",
        |m| &m.handshake_failures,
    ),
    (
        "counter",
        "connections_evicted_total",
        "Connections closed to make room for newer ones: before their handshake finished, while their client owed the next message (max_pending_handshakes, a full listener), or idle bootstrap sessions on full bootstrap listeners (bootstrap_session_min_age_ms).",
        |m| &m.evicted,
    ),
    (
        "counter",
        "tls_sessions_resumed_total",
        "Service-listener handshakes that resumed a session from its ticket.",
        |m| &m.resumed,
    ),
    (
        "counter",
        "tls_chains_recalled_total",
        "Client certificate chains not verified again: the same certificate's chain had verified under the CAs loaded now.",
        |m| &m.chains_recalled,
    ),
    (
        "counter",
        "tls_tickets_withheld_total",
        "Session tickets not given to a certificate that left its last two unused (it is given one at one connect in 16 until it resumes).",
        |m| &m.tickets_withheld,
    ),
    (
        "counter",
        "tls_tickets_unsent_total",
        "Session tickets made at the end of a handshake and never sent, as the connection ended before its CONNACK (not counted against the certificate).",
        |m| &m.tickets_unsent,
    ),
    (
        "counter",
        "certificates_not_granted_total",
        "Client certificates refused because the registry grants their device no such service.",
        |m| &m.not_granted,
    ),
    (
        "counter",
        "connects_refused_total",
        "CONNECTs refused: identity, client id or credentials.",
        |m| &m.refused_connects,
    ),
    (
        "counter",
        "publishes_refused_total",
        "PUBLISHes outside the sender's grants.",
        |m| &m.refused_publishes,
    ),
    (
        "counter",
        "subscriptions_refused_total",
        "SUBSCRIBE filters outside the subscriber's grants.",
        |m| &m.refused_subscribes,
    ),
    (
        "counter",
        "connections_rate_limited_total",
        "Connections dropped by the per-source connect rate limit.",
        |m| &m.rate_limited,
    ),
    (
        "counter",
        "connections_over_capacity_total",
        "Connections dropped at max_connections.",
        |m| &m.over_capacity,
    ),
    (
        "counter",
        "revoked_sessions_cut_total",
        "Live sessions closed because their certificate was revoked.",
        |m| &m.revoked_cuts,
    ),
    (
        "counter",
        "expired_sessions_cut_total",
        "Live sessions closed because their certificate expired.",
        |m| &m.expired_cuts,
    ),
    (
        "gauge",
        "sessions_kept",
        "Sessions kept with no connection (MQTT 3.1.1 clean session 0, MQTT 5 Session Expiry Interval), waiting for their client or their expiry.",
        |m| &m.sessions_kept,
    ),
    (
        "counter",
        "sessions_expired_total",
        "Kept sessions ended because their expiry passed with no connection (max_session_expiry_secs, or the MQTT 5 Session Expiry Interval).",
        |m| &m.sessions_expired,
    ),
    (
        "counter",
        "publishes_discarded_total",
        "PUBLISHes not sent because they exceed the Maximum Packet Size the client announced.",
        |m| &m.outgoing_discarded,
    ),
    (
        "counter",
        "write_stalls_total",
        "Connections closed because the client stopped taking data.",
        |m| &m.write_stalls,
    ),
    (
        "counter",
        "publish_rate_exceeded_total",
        "Device connections closed for publishing faster than publishes_per_sec_per_device.",
        |m| &m.publish_rate_exceeded,
    ),
    (
        "gauge",
        "router_log_bytes",
        "Bytes of messages (topic and payload) the router holds for subscribers that have still to read them, and up to a trim's worth more.",
        |m| &m.router_log_bytes,
    ),
    (
        "gauge",
        "router_filters",
        "Subscription filters the router holds, each with its log.",
        |m| &m.router_filters,
    ),
    (
        "counter",
        "router_messages_skipped_total",
        "Messages subscribers never got, counted once per subscriber that missed them: the router keeps at most 4 MiB per subscription filter and drops the oldest past it, read or not (a subscriber that falls that far behind, the manager under a request flood among them).",
        |m| &m.router_skipped,
    ),
];

/// The Prometheus text exposition of `metrics`.
pub fn render(metrics: &Metrics) -> String {
    let mut out = String::new();
    for (kind, name, help, counter) in SERIES {
        let value = counter(metrics).load(Ordering::Relaxed);
        let _ = writeln!(out, "# HELP fleetshift_broker_{name} {help}");
        let _ = writeln!(out, "# TYPE fleetshift_broker_{name} {kind}");
        let _ = writeln!(out, "fleetshift_broker_{name} {value}");
    }
    out
}

/// Serves `GET /metrics` until `stop` is cancelled.
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, stop: CancellationToken) {
    // At most 16 scrapes at once; silent clients are closed for newer ones.
    let slots = Slots::new(MAX_CONNECTIONS);
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(err) => {
                    // Out of descriptors, say: the connection stays queued,
                    // so pause rather than spin on it.
                    debug!(error = %err, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let Some(claim) = slots.claim() else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let Some(held) = claim.take().await else {
                return;
            };
            tokio::select! {
                _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, &metrics, &held)) => {}
                _ = held.closing().cancelled() => {}
            }
        });
    }
}

async fn answer(mut stream: TcpStream, metrics: &Metrics, held: &Held) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&chunk[..n]);
    }
    held.received();
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|b| *b == b' ');
    let (method, path) = (parts.next(), parts.next());
    let (status, content_type, body) = match (method, path) {
        (Some(b"GET"), Some(b"/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(metrics),
        ),
        (Some(b"GET"), _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "GET only\n".into()),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_exposed_with_its_value() {
        let m = Metrics::default();
        m.not_granted.fetch_add(3, Ordering::Relaxed);
        m.live.fetch_add(2, Ordering::Relaxed);
        let text = render(&m);
        assert!(text.contains("fleetshift_broker_certificates_not_granted_total 3\n"));
        assert!(text.contains("# TYPE fleetshift_broker_connections_live gauge\n"));
        assert!(text.contains("fleetshift_broker_connections_live 2\n"));
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            SERIES.len()
        );
    }
}

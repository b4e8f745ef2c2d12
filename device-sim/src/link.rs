//! One MQTT connection. A task owns and polls the rumqttc event loop and
//! forwards what the device needs (CONNACK, SUBACK, PUBLISH, the end of the
//! connection) over a bounded channel, so the device's own work never
//! stalls the event loop's keep-alives and acknowledgements.
//!
//! The poller stops at the first connection error instead of letting
//! rumqttc reconnect on its own: the device decides when and where to
//! reconnect (after a service change the endpoint and identity differ).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use fleet_protocol::{Route, Topic};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS, SubscribeFilter, SubscribeReasonCode,
    TlsConfiguration, Transport,
};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, Instrument};

use crate::config::Endpoint;

/// MQTT keep-alive of every device connection.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// Largest packet either way; above the protocol's 16 KiB message limit plus topic and header.
const MAX_PACKET: usize = 20 * 1024;
/// Depth of the poller → device channel.
const CHANNEL_DEPTH: usize = 64;
/// How long a graceful disconnect may take before the connection is dropped.
const DISCONNECT_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("connection: {0}")]
    Connection(String),
    #[error("connection closed")]
    Closed,
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("broker refused subscription to {0}")]
    SubscribeRefused(String),
    #[error("client: {0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The server refused the client certificate with a TLS alert that
    /// says it will not take it again (revoked, expired, not granted, bad).
    #[error("certificate refused: {0}")]
    CertificateRefused(String),
    /// The server does not know the client certificate's CA (`unknown_ca`):
    /// usually for seconds, a new service's CA not yet loaded; for good
    /// when its CA was retired.
    #[error("certificate's CA unknown to the server")]
    UnknownCa,
}

/// The TLS alert in `e`'s chain by which a server refuses a client
/// certificate for good, if there is one: a retry with the same
/// certificate would be refused again. An unknown CA is not among them:
/// a broker takes a new service's CA some time after its first
/// certificate is issued.
fn certificate_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    use rustls::AlertDescription as A;
    alert_in(e)
        .filter(|alert| {
            matches!(
                alert,
                A::CertificateRevoked | A::CertificateExpired | A::AccessDenied | A::BadCertificate
            )
        })
        .map(|alert| format!("TLS alert {alert:?}"))
}

/// The TLS alert received in `e`'s chain, if there is one.
fn alert_in(e: &(dyn std::error::Error + 'static)) -> Option<rustls::AlertDescription> {
    let mut at = Some(e);
    while let Some(err) = at {
        if let Some(rustls::Error::AlertReceived(alert)) = err.downcast_ref::<rustls::Error>() {
            return Some(*alert);
        }
        at = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    None
}

/// A received PUBLISH.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
}

#[derive(Debug)]
enum LinkEvent {
    ConnAck,
    SubAck(Vec<SubscribeReasonCode>),
    Publish(Message),
    /// The connection ended: why (a connection error, or the certificate
    /// refused), unless the client itself disconnected.
    Closed(Option<LinkError>),
}

/// How to reach a listener.
#[derive(Clone)]
pub enum Security {
    /// Plain MQTT (the bootstrap listener; every secret on it is sealed).
    Plain,
    /// TLS with the broker's certificate checked against the trust anchor,
    /// no client certificate (the bootstrap TLS listener).
    ServerTls { root_ca_pem: Vec<u8> },
    /// Mutual TLS with a client configuration from [`mutual_tls`]. Kept
    /// from one connection to the next, it resumes the previous
    /// connection's TLS session.
    MutualTls(Arc<rustls::ClientConfig>),
}

/// A mutual-TLS client configuration: the trust anchor, the client chain
/// and its key (PEM). It keeps the session tickets the broker gives it (up
/// to 8, in memory), so a connection made with it resumes the last one's
/// TLS session. Build a new one when the certificate changes: a ticket
/// names the certificate it was issued for.
pub fn mutual_tls(
    root_ca_pem: &[u8],
    chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ClientConfig>, LinkError> {
    mutual_tls_over(rustls::DEFAULT_VERSIONS, root_ca_pem, chain_pem, key_pem)
}

/// [`mutual_tls`] limited to the TLS `versions` given.
pub fn mutual_tls_over(
    versions: &[&'static rustls::SupportedProtocolVersion],
    root_ca_pem: &[u8],
    chain_pem: &[u8],
    key_pem: &[u8],
) -> Result<Arc<rustls::ClientConfig>, LinkError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |e: &dyn std::fmt::Display| LinkError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_ca_pem) {
        roots.add(cert.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
    }
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| tls(&e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| tls(&e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| tls(&e))?;
    config.resumption = rustls::client::Resumption::in_memory_sessions(8);
    Ok(Arc::new(config))
}

pub struct Link {
    client: AsyncClient,
    rx: mpsc::Receiver<LinkEvent>,
    /// Messages received while waiting for something else, handed out first by [`Link::recv`].
    deferred: VecDeque<Message>,
    poller: JoinHandle<()>,
    timeout: Duration,
}

impl Drop for Link {
    fn drop(&mut self) {
        // Dropping the event loop closes the socket; no connection outlives its Link.
        self.poller.abort();
    }
}

fn options(client_id: &str, endpoint: &Endpoint, security: Security) -> MqttOptions {
    let mut opts = MqttOptions::new(client_id, endpoint.host.clone(), endpoint.port);
    opts.set_keep_alive(KEEP_ALIVE)
        .set_clean_session(true)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    match security {
        Security::Plain => {}
        Security::ServerTls { root_ca_pem } => {
            opts.set_transport(Transport::Tls(TlsConfiguration::Simple {
                ca: root_ca_pem,
                alpn: None,
                client_auth: None,
            }));
        }
        Security::MutualTls(config) => {
            opts.set_transport(Transport::Tls(TlsConfiguration::Rustls(config)));
        }
    }
    opts
}

async fn poll_events(mut eventloop: EventLoop, tx: mpsc::Sender<LinkEvent>) {
    loop {
        let event = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => LinkEvent::ConnAck,
            Ok(Event::Incoming(Packet::SubAck(ack))) => LinkEvent::SubAck(ack.return_codes),
            Ok(Event::Incoming(Packet::Publish(p))) => LinkEvent::Publish(Message {
                topic: p.topic,
                payload: p.payload.to_vec(),
            }),
            Ok(Event::Incoming(Packet::Disconnect)) => {
                let _ = tx
                    .send(LinkEvent::Closed(Some(LinkError::Connection(
                        "broker sent DISCONNECT".into(),
                    ))))
                    .await;
                return;
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                let _ = tx.send(LinkEvent::Closed(None)).await;
                return;
            }
            Ok(_) => continue,
            Err(e) => {
                debug!(error = %e, "connection ended");
                let why = match certificate_refusal(&e) {
                    Some(why) => LinkError::CertificateRefused(why),
                    None if alert_in(&e) == Some(rustls::AlertDescription::UnknownCA) => {
                        LinkError::UnknownCa
                    }
                    None => LinkError::Connection(e.to_string()),
                };
                let _ = tx.send(LinkEvent::Closed(Some(why))).await;
                return;
            }
        };
        if tx.send(event).await.is_err() {
            return; // the Link is gone
        }
    }
}

impl Link {
    /// Connects as `client_id`, subscribes to `subscriptions` at QoS 1 and
    /// returns once the broker has acknowledged both, so nothing published
    /// afterwards can miss its reply.
    pub async fn connect(
        client_id: &str,
        endpoint: &Endpoint,
        security: Security,
        subscriptions: &[Topic],
        timeout: Duration,
    ) -> Result<Link, LinkError> {
        let (client, mut eventloop) = AsyncClient::new(options(client_id, endpoint, security), 16);
        let mut net = eventloop.network_options();
        net.set_connection_timeout(timeout.as_secs().max(1));
        eventloop.set_network_options(net);
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let poller = tokio::spawn(poll_events(eventloop, tx).in_current_span());
        let mut link = Link {
            client,
            rx,
            deferred: VecDeque::new(),
            poller,
            timeout,
        };

        // rumqttc bounds the TCP/TLS connect by its connection timeout; this bounds the CONNACK too.
        match tokio::time::timeout(timeout * 2, link.rx.recv()).await {
            Err(_) => return Err(LinkError::Timeout("CONNACK")),
            Ok(None) => return Err(LinkError::Closed),
            Ok(Some(LinkEvent::ConnAck)) => {}
            Ok(Some(LinkEvent::Closed(why))) => {
                return Err(why.unwrap_or_else(|| LinkError::Connection("closed".into())))
            }
            Ok(Some(other)) => {
                return Err(LinkError::Connection(format!(
                    "expected CONNACK, got {other:?}"
                )))
            }
        }

        let filters: Vec<SubscribeFilter> = subscriptions
            .iter()
            .map(|t| SubscribeFilter::new(t.to_string(), QoS::AtLeastOnce))
            .collect();
        if !filters.is_empty() {
            tokio::time::timeout(timeout, link.client.subscribe_many(filters))
                .await
                .map_err(|_| LinkError::Timeout("SUBSCRIBE queue"))??;
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match tokio::time::timeout_at(deadline, link.rx.recv()).await {
                    Err(_) => return Err(LinkError::Timeout("SUBACK")),
                    Ok(None) => return Err(LinkError::Closed),
                    Ok(Some(LinkEvent::SubAck(codes))) => {
                        if let Some(i) = codes
                            .iter()
                            .position(|c| *c == SubscribeReasonCode::Failure)
                        {
                            let topic = subscriptions
                                .get(i)
                                .map(ToString::to_string)
                                .unwrap_or_default();
                            return Err(LinkError::SubscribeRefused(topic));
                        }
                        break;
                    }
                    // A retained or queued message may arrive before the SUBACK: keep it.
                    Ok(Some(LinkEvent::Publish(m))) => link.deferred.push_back(m),
                    Ok(Some(LinkEvent::Closed(why))) => {
                        return Err(why.unwrap_or_else(|| LinkError::Connection("closed".into())))
                    }
                    Ok(Some(LinkEvent::ConnAck)) => {}
                }
            }
        }
        Ok(link)
    }

    /// Publishes at QoS 1. Returns once rumqttc has queued the packet.
    pub async fn publish(&self, topic: &Topic, payload: Vec<u8>) -> Result<(), LinkError> {
        tokio::time::timeout(
            self.timeout,
            self.client
                .publish(topic.to_string(), QoS::AtLeastOnce, false, payload),
        )
        .await
        .map_err(|_| LinkError::Timeout("PUBLISH queue"))??;
        Ok(())
    }

    /// The next message: deferred ones first, then the network. Waits
    /// indefinitely; callers bound it with their own deadline.
    pub async fn recv(&mut self) -> Result<Message, LinkError> {
        if let Some(m) = self.deferred.pop_front() {
            return Ok(m);
        }
        self.recv_fresh().await
    }

    /// The next message from the network, skipping the deferred queue.
    pub async fn recv_fresh(&mut self) -> Result<Message, LinkError> {
        loop {
            match self.rx.recv().await {
                Some(LinkEvent::Publish(m)) => return Ok(m),
                Some(LinkEvent::Closed(Some(why))) => return Err(why),
                Some(LinkEvent::Closed(None)) | None => return Err(LinkError::Closed),
                Some(LinkEvent::ConnAck | LinkEvent::SubAck(_)) => {}
            }
        }
    }

    /// Keeps `m` for a later [`Link::recv`].
    pub fn defer(&mut self, m: Message) {
        self.deferred.push_back(m);
    }

    /// Sends DISCONNECT and waits briefly for the poller to finish; the
    /// connection is dropped either way.
    pub async fn disconnect(mut self) {
        if tokio::time::timeout(DISCONNECT_GRACE, self.client.disconnect())
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(DISCONNECT_GRACE, &mut self.poller).await;
        }
    }
}

/// Topics a device subscribes to on the bootstrap listener.
pub fn bootstrap_subscriptions(device_id: &str) -> Vec<Topic> {
    use fleet_protocol::RequestKind::{Activate, Update};
    vec![
        Topic::bootstrap(Route::Reply(Activate, device_id.to_owned())),
        Topic::bootstrap(Route::Reply(Update, device_id.to_owned())),
        Topic::bootstrap(Route::ServiceChange(device_id.to_owned())),
    ]
}

/// Topics a device subscribes to inside its service's tenant.
pub fn service_subscriptions(service_id: &str, device_id: &str) -> Vec<Topic> {
    use fleet_protocol::RequestKind::{Poll, Status, Update};
    let id = || device_id.to_owned();
    vec![
        Topic::in_tenant(service_id, Route::ServiceChange(id())),
        Topic::in_tenant(service_id, Route::Reply(Update, id())),
        Topic::in_tenant(service_id, Route::Reply(Poll, id())),
        Topic::in_tenant(service_id, Route::Reply(Status, id())),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscription_topics() {
        let names: Vec<String> = bootstrap_subscriptions("dev1")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            names,
            [
                "fleet/v1/activate/dev1/reply",
                "fleet/v1/update/dev1/reply",
                "fleet/v1/service/change/dev1"
            ]
        );
        let names: Vec<String> = service_subscriptions("svcA", "dev1")
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            names,
            [
                "/tenants/svcA/fleet/v1/service/change/dev1",
                "/tenants/svcA/fleet/v1/update/dev1/reply",
                "/tenants/svcA/fleet/v1/poll/dev1/reply",
                "/tenants/svcA/fleet/v1/status/dev1/reply"
            ]
        );
    }

    #[tokio::test]
    async fn connect_to_nothing_fails_within_the_timeout() {
        // Bind then drop a listener to get a port nobody listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let started = std::time::Instant::now();
        let res = Link::connect(
            "dev1",
            &Endpoint::new("127.0.0.1", port),
            Security::Plain,
            &bootstrap_subscriptions("dev1"),
            Duration::from_secs(1),
        )
        .await;
        assert!(res.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

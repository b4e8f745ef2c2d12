//! The in-process harness for end-to-end tests and the demo: a real
//! rumqttd broker on ephemeral loopback ports, a real manager on a sled
//! store in a temporary directory, real PKI, and plain MQTT clients for
//! hostile and observing roles.
//!
//! # Layout
//! - [`Fleet`]: broker + manager + PKI in one temporary directory; restart the manager on the same store.
//! - [`Probe`]: a raw MQTT client that records what it receives (sniffers, forgers, attackers).
//! - [`Probe5`]: the same over MQTT 5, also recording reason codes.
//! - [`eventually`]: wait until a condition holds, with a deadline.
//! - [`logged`]: the lines the broker and the manager logged at WARN and above.
//! - [`openssl_verify`]: run the real `openssl verify` on a certificate chain.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fleet_broker::{BrokerConfig, RunningBroker};
use fleet_manager::{Core, ManagerConfig, RunningManager};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Installs a test log subscriber once (`RUST_LOG` to see more). Lines
/// the broker and the manager log at WARN and above are also kept, as the
/// log file would have them, for [`logged`], whatever `RUST_LOG` says.
pub fn init_tracing() {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let shown = tracing_subscriber::fmt::layer()
        .with_test_writer()
        .with_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=error".into()),
        );
    let kept = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(|| KeptLines(Vec::new()))
        .with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("fleet_broker", tracing::Level::WARN)
                .with_target("fleet_manager", tracing::Level::WARN),
        );
    let _ = tracing_subscriber::registry()
        .with(shown)
        .with(kept)
        .try_init();
}

/// The lines kept by [`init_tracing`]'s second writer, the newest
/// [`KEPT_LINES`].
static KEPT: Mutex<std::collections::VecDeque<String>> =
    Mutex::new(std::collections::VecDeque::new());
const KEPT_LINES: usize = 100_000;

/// One event as the log writes it; split into its lines when it is done.
struct KeptLines(Vec<u8>);

impl std::io::Write for KeptLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for KeptLines {
    fn drop(&mut self) {
        let text = String::from_utf8_lossy(&self.0);
        let mut kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
        for line in text.lines() {
            if kept.len() == KEPT_LINES {
                kept.pop_front();
            }
            kept.push_back(line.to_owned());
        }
    }
}

/// The lines the broker and the manager of this test process logged at
/// WARN and above that contain `text`, oldest first (tests run side by
/// side: look for something only yours logs).
pub fn logged(text: &str) -> Vec<String> {
    let kept = KEPT.lock().unwrap_or_else(|p| p.into_inner());
    kept.iter().filter(|l| l.contains(text)).cloned().collect()
}

/// Waits until `check` returns `Some`, polling with a short backoff; fails
/// with `what` after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    let mut pause = Duration::from_millis(10);
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Broker, manager and PKI in one temporary directory.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub broker: RunningBroker,
    pub config: ManagerConfig,
    manager: Option<RunningManager>,
}

impl Fleet {
    pub async fn start() -> anyhow::Result<Fleet> {
        Self::start_with(|_| {}).await
    }

    /// Starts with a manager configuration adjusted by `tune`.
    pub async fn start_with(tune: impl FnOnce(&mut ManagerConfig)) -> anyhow::Result<Fleet> {
        Self::start_tuned(|_| {}, tune).await
    }

    /// Starts with the broker's and the manager's configurations adjusted.
    pub async fn start_tuned(
        tune_broker: impl FnOnce(&mut BrokerConfig),
        tune: impl FnOnce(&mut ManagerConfig),
    ) -> anyhow::Result<Fleet> {
        init_tracing();
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        fleet_pki::Pki::open_or_create(&certs)?;
        let mut broker_config = BrokerConfig {
            internal_listen: "127.0.0.1:0".parse()?,
            bootstrap_tls_listen: Some("127.0.0.1:0".parse()?),
            bootstrap_plain_listen: Some("127.0.0.1:0".parse()?),
            service_listen: Some("127.0.0.1:0".parse()?),
            metrics_listen: Some("127.0.0.1:0".parse()?),
            certs_dir: certs.clone(),
            ..Default::default()
        };
        tune_broker(&mut broker_config);
        let broker =
            tokio::task::spawn_blocking(move || fleet_broker::start(&broker_config)).await??;
        let mut config = ManagerConfig {
            broker_url: format!("mqtt://{}", broker.internal_addr),
            client_id: "fleet-manager".into(),
            broker_username: Some(broker.manager_credentials.0.clone()),
            broker_password: Some(broker.manager_credentials.1.clone()),
            data_dir: dir.path().join("store"),
            certs_dir: certs,
            admin_listen: "127.0.0.1:0".parse()?,
            ..Default::default()
        };
        tune(&mut config);
        let manager = fleet_manager::start(config.clone(), CancellationToken::new()).await?;
        Ok(Fleet {
            dir,
            broker,
            config,
            manager: Some(manager),
        })
    }

    pub fn manager(&self) -> &RunningManager {
        self.manager.as_ref().expect("manager is running")
    }

    pub fn core(&self) -> &Arc<Core> {
        &self.manager().core
    }

    pub fn certs_dir(&self) -> &Path {
        &self.config.certs_dir
    }

    /// The operator API's address (`host:port`).
    pub fn admin(&self) -> String {
        self.manager().admin_addr.to_string()
    }

    /// The operator API with its token, for `fleet_manager::admin::call`.
    pub fn api(&self) -> fleet_manager::admin::AdminApi {
        self.manager().api()
    }

    /// The file holding the operator API's token, for the CLI's
    /// `--admin-token-file`.
    pub fn admin_token_file(&self) -> String {
        self.config.admin_token_path().display().to_string()
    }

    /// A client with the manager's credentials on the internal listener: it
    /// may publish and subscribe anywhere (an observer, or a forger playing
    /// a compromised broker).
    pub async fn privileged(&self, client_id: &str) -> anyhow::Result<Probe> {
        let (user, secret) = &self.broker.manager_credentials;
        Probe::with_credentials(self.broker.internal_addr, client_id, user, secret).await
    }

    /// A client on the plain bootstrap listener, as device `client_id`.
    pub async fn bootstrap_client(&self, client_id: &str) -> anyhow::Result<Probe> {
        Probe::plain(
            self.broker
                .bootstrap_plain_addr
                .context("plain bootstrap listener")?,
            client_id,
        )
        .await
    }

    pub fn service_addr(&self) -> std::net::SocketAddr {
        self.broker
            .service_addr
            .expect("service listener configured")
    }

    /// Stops the manager, then starts a new one on the same store and PKI.
    pub async fn restart_manager(&mut self) -> anyhow::Result<()> {
        self.stop_manager().await;
        let manager = fleet_manager::start(self.config.clone(), CancellationToken::new()).await?;
        self.manager = Some(manager);
        Ok(())
    }

    pub async fn stop_manager(&mut self) {
        if let Some(m) = self.manager.take() {
            m.stop().await;
        }
    }

    pub async fn start_manager(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.manager.is_none(), "manager already running");
        self.manager =
            Some(fleet_manager::start(self.config.clone(), CancellationToken::new()).await?);
        Ok(())
    }

    /// Pre-registers a device through the operator API.
    pub async fn register(
        &self,
        device_id: &str,
        service_id: &str,
        factory_key: Option<&[u8]>,
    ) -> anyhow::Result<()> {
        let body = json!([{
            "device_id": device_id,
            "service_id": service_id,
            "factory_key_hex": factory_key.map(hex::encode),
        }]);
        fleet_manager::admin::call(&self.api(), "POST", "/v1/registrations", Some(&body)).await?;
        Ok(())
    }

    /// Requests a service change through the operator API; fails unless every device was notified.
    pub async fn change(&self, devices: &[&str], service_id: &str) -> anyhow::Result<Value> {
        let body = json!({ "devices": devices, "service_id": service_id });
        let res =
            fleet_manager::admin::call(&self.api(), "POST", "/v1/service-change", Some(&body))
                .await?;
        for r in res["results"].as_array().context("results")? {
            anyhow::ensure!(r["ok"] == json!(true), "change refused: {r}");
        }
        Ok(res)
    }

    /// The stored state of every tree, for "nothing changed" assertions.
    pub fn snapshot(&self) -> Vec<fleet_manager::store::SnapshotEntry> {
        self.core().store.snapshot().expect("store snapshot")
    }
}

/// What a probe received and the connection errors it saw, shared by
/// [`Probe`] and [`Probe5`] (both dereference to it).
#[derive(Clone, Default)]
pub struct Inbox {
    pub received: Arc<Mutex<Vec<Received>>>,
    pub errors: Arc<Mutex<Vec<String>>>,
}

impl Inbox {
    pub fn messages(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn on(&self, topic: &str) -> Vec<Received> {
        self.messages()
            .into_iter()
            .filter(|m| m.topic == topic)
            .collect()
    }

    /// Waits for the `n`-th message (1-based) on `topic` and returns it.
    pub async fn wait_for(
        &self,
        topic: &str,
        n: usize,
        within: Duration,
    ) -> anyhow::Result<Received> {
        eventually(within, &format!("message {n} on {topic}"), || {
            let got = self.on(topic);
            async move { got.get(n - 1).cloned() }
        })
        .await
    }

    pub fn is_cut(&self) -> bool {
        !self.errors.lock().unwrap().is_empty()
    }

    /// Waits until the connection is cut.
    pub async fn wait_cut(&self, within: Duration, what: &str) -> anyhow::Result<()> {
        eventually(within, what, || {
            let cut = self.is_cut();
            async move { cut.then_some(()) }
        })
        .await
    }
}

impl std::ops::Deref for Probe {
    type Target = Inbox;
    fn deref(&self) -> &Inbox {
        &self.inbox
    }
}

impl std::ops::Deref for Probe5 {
    type Target = Inbox;
    fn deref(&self) -> &Inbox {
        &self.inbox
    }
}

/// What a [`Probe`] received.
#[derive(Debug, Clone)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A raw MQTT client that subscribes where it is told and records everything.
pub struct Probe {
    pub client: AsyncClient,
    /// What it received, and the connection errors it saw (a refused
    /// publish ends in a disconnect).
    pub inbox: Inbox,
    pub subacks: Arc<Mutex<Vec<Vec<rumqttc::SubscribeReasonCode>>>>,
    shutdown: CancellationToken,
}

impl Probe {
    /// Connects over plain MQTT.
    pub async fn plain(addr: std::net::SocketAddr, client_id: &str) -> anyhow::Result<Probe> {
        let opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        Self::connect(opts).await
    }

    /// Connects over plain MQTT with a username and password.
    pub async fn with_credentials(
        addr: std::net::SocketAddr,
        client_id: &str,
        user: &str,
        password: &str,
    ) -> anyhow::Result<Probe> {
        let mut opts = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        opts.set_credentials(user, password);
        Self::connect(opts).await
    }

    /// Connects over TLS without a client certificate.
    pub async fn tls(
        addr: std::net::SocketAddr,
        client_id: &str,
        root_ca: &Path,
    ) -> anyhow::Result<Probe> {
        let mut opts = MqttOptions::new(client_id, "localhost", addr.port());
        opts.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca: std::fs::read(root_ca)?,
            alpn: None,
            client_auth: None,
        }));
        Self::connect(opts).await
    }

    /// Connects to the mutual-TLS listener with a chain and key (PEM).
    pub async fn mtls(
        addr: std::net::SocketAddr,
        client_id: &str,
        root_ca: &Path,
        chain_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> anyhow::Result<Probe> {
        let mut opts = MqttOptions::new(client_id, "localhost", addr.port());
        opts.set_transport(Transport::Tls(TlsConfiguration::Simple {
            ca: std::fs::read(root_ca)?,
            alpn: None,
            client_auth: Some((chain_pem, key_pem)),
        }));
        Self::connect(opts).await
    }

    /// Connects with `opts` (a Will, say); keep-alive and packet size are set here.
    pub async fn connect(mut opts: MqttOptions) -> anyhow::Result<Probe> {
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_max_packet_size(1024 * 1024, 1024 * 1024);
        let (client, mut eventloop) = AsyncClient::new(opts, 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let subacks = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
        let (r, e, s, stop) = (
            received.clone(),
            errors.clone(),
            subacks.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            let mut connected_tx = Some(connected_tx);
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = eventloop.poll() => ev,
                };
                match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(Ok(()));
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => r.lock().unwrap().push(Received {
                        topic: p.topic.clone(),
                        payload: p.payload.to_vec(),
                    }),
                    Ok(Event::Incoming(Packet::SubAck(ack))) => {
                        s.lock().unwrap().push(ack.return_codes)
                    }
                    Ok(_) => {}
                    Err(err) => {
                        e.lock().unwrap().push(err.to_string());
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(Err(err.to_string()));
                            break;
                        }
                        // A probe does not reconnect: a cut connection stays cut.
                        break;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), connected_rx).await {
            Ok(Ok(Ok(()))) => Ok(Probe {
                client,
                inbox: Inbox { received, errors },
                subacks,
                shutdown,
            }),
            Ok(Ok(Err(err))) => bail!("connect refused: {err}"),
            Ok(Err(_)) => bail!("probe event loop ended before CONNACK"),
            Err(_) => bail!("no CONNACK within 10 s"),
        }
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&self, filter: &str) -> anyhow::Result<()> {
        let before = self.subacks.lock().unwrap().len();
        self.client.subscribe(filter, QoS::AtLeastOnce).await?;
        let acks = self.subacks.clone();
        eventually(Duration::from_secs(10), "SUBACK", || {
            let n = acks.lock().unwrap().len();
            async move { (n > before).then_some(()) }
        })
        .await
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await?;
        Ok(())
    }
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A client certificate chain and its key, both PEM.
pub type ClientAuth = (Vec<u8>, Vec<u8>);

/// An MQTT 5 client that records what it receives and every reason code
/// the broker answers with.
pub struct Probe5 {
    pub client: rumqttc::v5::AsyncClient,
    /// What it received, and the connection errors it saw, the broker's
    /// DISCONNECT among them.
    pub inbox: Inbox,
    pub subacks: Arc<Mutex<Vec<Vec<v5::SubscribeReasonCode>>>>,
    /// Packet id and reason of every PUBACK.
    pub pubacks: Arc<Mutex<Vec<(u16, v5::PubAckReason)>>>,
    /// Packet id and reason of every PUBREC.
    pub pubrecs: Arc<Mutex<Vec<(u16, v5::PubRecReason)>>>,
    /// Every PUBLISH received, whole, for [`rumqttc::v5::AsyncClient::ack`]
    /// when the options asked for manual acknowledgements.
    pub publishes: Arc<Mutex<Vec<v5::Publish>>>,
    /// The reason codes of every UNSUBACK.
    pub unsubacks: Arc<Mutex<Vec<Vec<v5::UnsubAckReason>>>>,
    /// The reason code of the broker's DISCONNECT, if it sent one.
    pub disconnect: Arc<Mutex<Option<v5::DisconnectReasonCode>>>,
    pub connack: v5::ConnAck,
    shutdown: CancellationToken,
}

/// The MQTT 5 packet types [`Probe5`] uses.
pub mod v5 {
    pub use rumqttc::v5::mqttbytes::v5::{
        ConnAck, ConnectReturnCode, DisconnectReasonCode, LastWill, LastWillProperties,
        PubAckReason, PubRecReason, Publish, PublishProperties, SubscribeReasonCode,
        UnsubAckReason,
    };
    pub use rumqttc::v5::mqttbytes::QoS;
    pub use rumqttc::v5::MqttOptions;
}

impl Probe5 {
    /// Options for `client_id` at `addr`: plain, or TLS naming `localhost`
    /// and trusting `root_ca`, with a client certificate if given.
    pub fn options(
        addr: std::net::SocketAddr,
        client_id: &str,
        tls: Option<(&Path, Option<ClientAuth>)>,
    ) -> anyhow::Result<v5::MqttOptions> {
        let opts = match tls {
            None => v5::MqttOptions::new(client_id, addr.ip().to_string(), addr.port()),
            Some((root_ca, client_auth)) => {
                let mut opts = v5::MqttOptions::new(client_id, "localhost", addr.port());
                opts.set_transport(Transport::Tls(TlsConfiguration::Simple {
                    ca: std::fs::read(root_ca)?,
                    alpn: None,
                    client_auth,
                }));
                opts
            }
        };
        Ok(opts)
    }

    /// Connects over TLS without a client certificate.
    pub async fn tls(
        addr: std::net::SocketAddr,
        client_id: &str,
        root_ca: &Path,
    ) -> anyhow::Result<Probe5> {
        Self::connect(Self::options(addr, client_id, Some((root_ca, None)))?).await
    }

    /// Connects to the mutual-TLS listener with a chain and key (PEM).
    pub async fn mtls(
        addr: std::net::SocketAddr,
        client_id: &str,
        root_ca: &Path,
        chain_pem: Vec<u8>,
        key_pem: Vec<u8>,
    ) -> anyhow::Result<Probe5> {
        let auth = Some((chain_pem, key_pem));
        Self::connect(Self::options(addr, client_id, Some((root_ca, auth)))?).await
    }

    /// Connects with `opts`. A refused CONNECT fails with the
    /// [`rumqttc::v5::ConnectionError`] (see [`Probe5::refusal`]).
    pub async fn connect(mut opts: v5::MqttOptions) -> anyhow::Result<Probe5> {
        opts.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(opts, 100);
        let received = Arc::new(Mutex::new(Vec::new()));
        let subacks = Arc::new(Mutex::new(Vec::new()));
        let pubacks = Arc::new(Mutex::new(Vec::new()));
        let pubrecs = Arc::new(Mutex::new(Vec::new()));
        let unsubacks = Arc::new(Mutex::new(Vec::new()));
        let publishes = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let disconnect = Arc::new(Mutex::new(None));
        let shutdown = CancellationToken::new();
        let (connected_tx, connected_rx) = tokio::sync::oneshot::channel();
        let whole = publishes.clone();
        let (r, s, p, e, d, stop) = (
            received.clone(),
            subacks.clone(),
            (pubacks.clone(), pubrecs.clone(), unsubacks.clone()),
            errors.clone(),
            disconnect.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            use rumqttc::v5::mqttbytes::v5::Packet as P;
            use rumqttc::v5::{ConnectionError, Event as E, StateError};
            let mut connected_tx = Some(connected_tx);
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => break,
                    ev = eventloop.poll() => ev,
                };
                match event {
                    Ok(E::Incoming(P::ConnAck(ack))) => {
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(Ok(ack));
                        }
                    }
                    Ok(E::Incoming(P::Publish(m))) => {
                        r.lock().unwrap().push(Received {
                            topic: String::from_utf8_lossy(&m.topic).into_owned(),
                            payload: m.payload.to_vec(),
                        });
                        whole.lock().unwrap().push(m);
                    }
                    Ok(E::Incoming(P::SubAck(ack))) => s.lock().unwrap().push(ack.return_codes),
                    Ok(E::Incoming(P::PubAck(ack))) => {
                        p.0.lock().unwrap().push((ack.pkid, ack.reason))
                    }
                    Ok(E::Incoming(P::PubRec(rec))) => {
                        p.1.lock().unwrap().push((rec.pkid, rec.reason))
                    }
                    Ok(E::Incoming(P::UnsubAck(ack))) => p.2.lock().unwrap().push(ack.reasons),
                    Ok(E::Incoming(P::Disconnect(bye))) => {
                        *d.lock().unwrap() = Some(bye.reason_code)
                    }
                    Ok(_) => {}
                    Err(err) => {
                        if let ConnectionError::MqttState(StateError::ServerDisconnect {
                            reason_code,
                            ..
                        }) = &err
                        {
                            *d.lock().unwrap() = Some(*reason_code);
                        }
                        e.lock().unwrap().push(err.to_string());
                        if let Some(tx) = connected_tx.take() {
                            let _ = tx.send(Err(err));
                        }
                        // A probe does not reconnect: a cut connection stays cut.
                        break;
                    }
                }
            }
        });
        match tokio::time::timeout(Duration::from_secs(10), connected_rx).await {
            Ok(Ok(Ok(connack))) => Ok(Probe5 {
                client,
                inbox: Inbox { received, errors },
                subacks,
                pubacks,
                pubrecs,
                publishes,
                unsubacks,
                disconnect,
                connack,
                shutdown,
            }),
            Ok(Ok(Err(err))) => Err(anyhow::Error::new(err).context("connect refused")),
            Ok(Err(_)) => bail!("probe event loop ended before CONNACK"),
            Err(_) => bail!("no CONNACK within 10 s"),
        }
    }

    /// The CONNACK code a failed [`Probe5::connect`] was refused with.
    pub fn refusal(err: &anyhow::Error) -> Option<v5::ConnectReturnCode> {
        use rumqttc::v5::{ConnectionError, StateError};
        match err.downcast_ref::<ConnectionError>()? {
            ConnectionError::ConnectionRefused(code) => Some(*code),
            ConnectionError::MqttState(StateError::ConnFail { reason }) => Some(*reason),
            _ => None,
        }
    }

    /// Subscribes and returns the SUBACK's reason codes.
    pub async fn subscribe(&self, filter: &str) -> anyhow::Result<Vec<v5::SubscribeReasonCode>> {
        let before = self.subacks.lock().unwrap().len();
        self.client.subscribe(filter, v5::QoS::AtLeastOnce).await?;
        let acks = self.subacks.clone();
        eventually(Duration::from_secs(10), "SUBACK", || {
            let got = acks.lock().unwrap().get(before).cloned();
            async move { got }
        })
        .await
    }

    pub async fn publish(&self, topic: &str, qos: v5::QoS, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client.publish(topic, qos, false, payload).await?;
        Ok(())
    }

    /// Publishes at QoS 1 and returns the reason of its PUBACK.
    pub async fn publish_acked(
        &self,
        topic: &str,
        properties: Option<v5::PublishProperties>,
        payload: Vec<u8>,
    ) -> anyhow::Result<v5::PubAckReason> {
        let before = self.pubacks.lock().unwrap().len();
        let qos = v5::QoS::AtLeastOnce;
        match properties {
            Some(p) => {
                self.client
                    .publish_with_properties(topic, qos, false, payload, p)
                    .await?
            }
            None => self.client.publish(topic, qos, false, payload).await?,
        }
        let acks = self.pubacks.clone();
        eventually(Duration::from_secs(10), "PUBACK", || {
            let got = acks.lock().unwrap().get(before).map(|(_, r)| *r);
            async move { got }
        })
        .await
    }

    /// Publishes at QoS 2 and returns the reason of its PUBREC.
    pub async fn publish_exactly_once(
        &self,
        topic: &str,
        payload: Vec<u8>,
    ) -> anyhow::Result<v5::PubRecReason> {
        let before = self.pubrecs.lock().unwrap().len();
        self.publish(topic, v5::QoS::ExactlyOnce, payload).await?;
        let recs = self.pubrecs.clone();
        eventually(Duration::from_secs(10), "PUBREC", || {
            let got = recs.lock().unwrap().get(before).map(|(_, r)| *r);
            async move { got }
        })
        .await
    }

    /// Unsubscribes and returns the UNSUBACK's reason codes.
    pub async fn unsubscribe(&self, filter: &str) -> anyhow::Result<Vec<v5::UnsubAckReason>> {
        let before = self.unsubacks.lock().unwrap().len();
        self.client.unsubscribe(filter).await?;
        let acks = self.unsubacks.clone();
        eventually(Duration::from_secs(10), "UNSUBACK", || {
            let got = acks.lock().unwrap().get(before).cloned();
            async move { got }
        })
        .await
    }

    /// Waits until the broker has closed the connection; returns the
    /// reason of its DISCONNECT, if it sent one.
    pub async fn wait_cut(
        &self,
        within: Duration,
    ) -> anyhow::Result<Option<v5::DisconnectReasonCode>> {
        eventually(within, "the connection to close", || {
            let cut = self.is_cut();
            async move { cut.then_some(()) }
        })
        .await?;
        Ok(*self.disconnect.lock().unwrap())
    }
}

impl Drop for Probe5 {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Runs `openssl verify` for `leaf` against `root` with `intermediate`
/// untrusted, optionally with `-crl_check` and a CRL. Returns the tool's
/// output on success and an error with it on failure.
pub fn openssl_verify(
    root: &Path,
    intermediate: &Path,
    leaf: &Path,
    crl: Option<&Path>,
) -> anyhow::Result<String> {
    let mut cmd = Command::new("openssl");
    cmd.arg("verify")
        .arg("-CAfile")
        .arg(root)
        .arg("-untrusted")
        .arg(intermediate);
    if let Some(crl) = crl {
        cmd.arg("-crl_check").arg("-CRLfile").arg(crl);
    }
    let out = cmd.arg(leaf).output().context("running openssl verify")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        bail!("openssl verify failed: {text}")
    }
}

/// Writes `bytes` to `dir/name` and returns the path.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    std::fs::write(&path, bytes)?;
    Ok(path)
}

/// Where devices connect: the bootstrap listener (TLS or plain) and the
/// mutual-TLS service listener.
#[derive(Debug, Clone, Copy)]
pub struct DeviceEndpoints {
    pub bootstrap: std::net::SocketAddr,
    pub bootstrap_tls: bool,
    pub service: std::net::SocketAddr,
}

impl DeviceEndpoints {
    /// Devices bootstrap over TLS when the broker offers it.
    pub fn of(broker: &RunningBroker) -> DeviceEndpoints {
        let (bootstrap, bootstrap_tls) =
            match (broker.bootstrap_tls_addr, broker.bootstrap_plain_addr) {
                (Some(tls), _) => (tls, true),
                (None, Some(plain)) => (plain, false),
                (None, None) => panic!("broker has no bootstrap listener"),
            };
        DeviceEndpoints {
            bootstrap,
            bootstrap_tls,
            service: broker.service_addr.expect("service listener configured"),
        }
    }
}

/// Simulated devices run by a test, with every event they report recorded.
pub struct Devices {
    pub store_root: PathBuf,
    events: Arc<Mutex<Vec<(String, fleet_device_sim::DeviceEvent)>>>,
    tx: tokio::sync::mpsc::UnboundedSender<(String, fleet_device_sim::DeviceEvent)>,
    pub shutdown: CancellationToken,
}

impl Devices {
    pub fn new(store_root: PathBuf) -> Devices {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                sink.lock().unwrap().push(ev);
            }
        });
        Devices {
            store_root,
            events,
            tx,
            shutdown: CancellationToken::new(),
        }
    }

    /// Provisions `device_id` (factory key in its store) and registers it on `service_id`.
    pub async fn provision(
        &self,
        fleet: &Fleet,
        device_id: &str,
        service_id: &str,
    ) -> anyhow::Result<()> {
        let key = fleet_device_sim::provision(&self.store_root, device_id)?;
        fleet.register(device_id, service_id, Some(&key)).await
    }

    /// The device configuration for this fleet's listeners and PKI.
    pub fn config(
        &self,
        fleet: &Fleet,
        device_id: &str,
        key_mode: fleet_device_sim::KeyMode,
    ) -> fleet_device_sim::DeviceConfig {
        self.config_for(
            &DeviceEndpoints::of(&fleet.broker),
            fleet.certs_dir(),
            device_id,
            key_mode,
        )
    }

    /// The device configuration for a set of listeners and a PKI directory.
    pub fn config_for(
        &self,
        endpoints: &DeviceEndpoints,
        certs_dir: &Path,
        device_id: &str,
        key_mode: fleet_device_sim::KeyMode,
    ) -> fleet_device_sim::DeviceConfig {
        // The broker certificate names localhost; plain addresses are used as they are.
        let host = |a: std::net::SocketAddr, tls: bool| {
            fleet_device_sim::Endpoint::new(
                if tls {
                    "localhost".to_string()
                } else {
                    a.ip().to_string()
                },
                a.port(),
            )
        };
        fleet_device_sim::DeviceConfig {
            device_id: device_id.into(),
            store_root: self.store_root.clone(),
            bootstrap: host(endpoints.bootstrap, endpoints.bootstrap_tls),
            bootstrap_tls: endpoints.bootstrap_tls,
            service: host(endpoints.service, true),
            root_ca_pem: certs_dir.join("root-ca.pem"),
            manager_pub_pem: certs_dir.join("manager-sign.pub.pem"),
            key_mode,
            telemetry_interval: Duration::from_millis(200),
            request_timeout: Duration::from_secs(5),
            renew_window: fleet_device_sim::RENEW_WINDOW,
            unknown_ca_patience: fleet_device_sim::UNKNOWN_CA_PATIENCE,
        }
    }

    /// Starts a device task.
    pub fn spawn(
        &self,
        config: fleet_device_sim::DeviceConfig,
    ) -> tokio::task::JoinHandle<anyhow::Result<()>> {
        tokio::spawn(fleet_device_sim::run_device(
            config,
            self.tx.clone(),
            self.shutdown.child_token(),
        ))
    }

    pub fn events_of(&self, device_id: &str) -> Vec<fleet_device_sim::DeviceEvent> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|(d, _)| d == device_id)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// Waits until `device_id` has reported an event `matches` accepts.
    pub async fn wait_event(
        &self,
        device_id: &str,
        within: Duration,
        what: &str,
        matches: impl Fn(&fleet_device_sim::DeviceEvent) -> bool,
    ) -> anyhow::Result<fleet_device_sim::DeviceEvent> {
        eventually(within, &format!("{device_id}: {what}"), || {
            let found = self.events_of(device_id).into_iter().find(|e| matches(e));
            async move { found }
        })
        .await
        .with_context(|| format!("events so far: {:?}", self.events_of(device_id)))
    }

    /// [`Devices::wait_event`] for the device's first `Connected` event.
    pub async fn wait_connected(
        &self,
        device_id: &str,
        within: Duration,
    ) -> anyhow::Result<fleet_device_sim::DeviceEvent> {
        self.wait_event(device_id, within, "connected", |e| {
            matches!(e, fleet_device_sim::DeviceEvent::Connected { .. })
        })
        .await
    }

    /// The device's stored state (secure element).
    pub fn store(&self, device_id: &str) -> anyhow::Result<fleet_device_sim::store::Store> {
        Ok(fleet_device_sim::store::Store::open(
            &self.store_root,
            device_id,
        )?)
    }
}

impl Drop for Devices {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A device's TLS client that keeps its configuration, and with it the
/// session tickets a broker gives it, from one connection to the next.
#[derive(Clone)]
pub struct Resuming {
    pub config: Arc<rustls::ClientConfig>,
    pub addr: std::net::SocketAddr,
    pub client_id: String,
}

impl Resuming {
    /// To the mutual-TLS listener at `addr`, in TLS `version` only, with
    /// the broker checked against `root` (PEM) as `localhost`.
    pub fn new(
        addr: std::net::SocketAddr,
        client_id: &str,
        root: &[u8],
        (chain, key): (&[u8], &[u8]),
        version: &'static rustls::SupportedProtocolVersion,
    ) -> anyhow::Result<Resuming> {
        Ok(Resuming {
            config: fleet_device_sim::link::mutual_tls_over(&[version], root, chain, key)?,
            addr,
            client_id: client_id.to_owned(),
        })
    }

    /// TCP, TLS, CONNECT and a CONNACK that accepts, then DISCONNECT;
    /// whether the handshake resumed a session.
    pub async fn connect(&self) -> anyhow::Result<bool> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.connect_blocking()).await?
    }

    fn connect_blocking(&self) -> anyhow::Result<bool> {
        use std::io::Write;
        let tcp = std::net::TcpStream::connect(self.addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let conn = rustls::ClientConnection::new(self.config.clone(), name)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let ack = connack(&mut tls, &self.client_id)?;
        anyhow::ensure!(ack == [0x20, 2, 0, 0], "not an accepting CONNACK: {ack:?}");
        let resumed = tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        tls.write_all(&[0xe0, 0])?;
        tls.conn.send_close_notify();
        tls.flush()?;
        Ok(resumed)
    }
}

/// Whether the mutual-TLS listener at `addr` refuses the client
/// certificate `chain`/`key` (PEM), in TLS 1.3, with the broker checked
/// against `root` (PEM) as `localhost`: true only once the broker refuses
/// it with an alert about the certificate (any other failure is an error,
/// not a refusal). No MQTT
/// CONNECT is sent, so a certificate still accepted takes over no one's
/// session (on mosquitto the client id is the certificate's CN); it gives
/// false after `wait` with nothing read, for the caller to ask again.
pub async fn tls_refused(
    addr: std::net::SocketAddr,
    root: &[u8],
    chain_key: (&[u8], &[u8]),
    wait: Duration,
) -> anyhow::Result<bool> {
    Ok(tls_refusal(addr, root, chain_key, wait).await?.is_some())
}

/// [`tls_refused`], saying with which alert: `None` if not refused.
pub async fn tls_refusal(
    addr: std::net::SocketAddr,
    root: &[u8],
    (chain, key): (&[u8], &[u8]),
    wait: Duration,
) -> anyhow::Result<Option<rustls::AlertDescription>> {
    let config =
        fleet_device_sim::link::mutual_tls_over(&[&rustls::version::TLS13], root, chain, key)?;
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let tcp = std::net::TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(wait))?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let conn = rustls::ClientConnection::new(config, name)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut byte = [0u8; 1];
        match tls.read(&mut byte) {
            Ok(_) => Ok(None),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => {
                use rustls::AlertDescription as A;
                let alert = match rustls_error(&e) {
                    Some(rustls::Error::AlertReceived(
                        alert @ (A::BadCertificate
                        | A::CertificateRevoked
                        | A::CertificateExpired
                        | A::CertificateUnknown
                        | A::UnknownCA
                        | A::AccessDenied),
                    )) => *alert,
                    _ => anyhow::bail!("not a refusal of the certificate: {e}"),
                };
                Ok(Some(alert))
            }
        }
    })
    .await?
}

/// Whether the TLS listener at `addr` shows a certificate that `root`
/// (PEM) vouches for as `name`, a host name or an IP address, as a device
/// that reached the broker by that name checks it: true once the client's
/// side of the handshake completes, false if the certificate is not valid
/// for `name`; any other failure is an error. The client sends no
/// certificate, so on the service listener the broker refuses it after.
pub async fn server_name_served(
    addr: std::net::SocketAddr,
    root: &[u8],
    name: &str,
) -> anyhow::Result<bool> {
    let config = fleet_broker::frontdoor::trust::client_trusting(root)?;
    let name = rustls::pki_types::ServerName::try_from(name.to_owned())?;
    tokio::task::spawn_blocking(move || {
        let mut tcp = std::net::TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name)?;
        while conn.is_handshaking() {
            match conn.complete_io(&mut tcp) {
                Ok(_) => {}
                Err(e) => {
                    let invalid_for_name = rustls_error(&e).is_some_and(|err| {
                        matches!(
                            err,
                            rustls::Error::InvalidCertificate(
                                rustls::CertificateError::NotValidForName
                                    | rustls::CertificateError::NotValidForNameContext { .. }
                            )
                        )
                    });
                    anyhow::ensure!(invalid_for_name, "handshake failed otherwise: {e}");
                    return Ok(false);
                }
            }
        }
        Ok(true)
    })
    .await?
}

/// The TLS error inside an I/O error of a rustls stream, if it is one.
fn rustls_error(e: &std::io::Error) -> Option<&rustls::Error> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

/// An MQTT 3.1.1 CONNECT (clean session, keep-alive 60 s) for `client_id`
/// written to `tls`, and the CONNACK read back.
pub fn connack(
    tls: &mut (impl std::io::Read + std::io::Write),
    client_id: &str,
) -> anyhow::Result<[u8; 4]> {
    tls.write_all(&mqtt311_connect(client_id, 60))?;
    let mut ack = [0u8; 4];
    tls.read_exact(&mut ack)?;
    anyhow::ensure!(ack[0] == 0x20, "not a CONNACK: {ack:?}");
    Ok(ack)
}

/// A port no one listens on now, on loopback, for a process that cannot
/// bind port 0 and say which it got (mosquitto). Someone may take it before
/// that process binds it: see [`port_taken`].
pub fn free_port() -> anyhow::Result<std::net::SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Whether `err` (of [`Mosquitto::spawn`]) says a port was taken: then the
/// caller picks others and tries again.
pub fn port_taken(err: &anyhow::Error) -> bool {
    format!("{err:#}").contains("Address already in use")
}

/// A mosquitto broker run by a test: a plain listener (manager, bootstrap)
/// and a mutual-TLS listener trusting the fleet root, on ephemeral ports.
/// A child process killed (and reaped) when this is dropped, a failing
/// test's too.
pub struct KillOnDrop(pub std::process::Child);

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Mosquitto {
    _child: KillOnDrop,
    pub plain: std::net::SocketAddr,
    pub mtls: std::net::SocketAddr,
}

impl Mosquitto {
    /// On free ports: mosquitto cannot report ports it chose, so they are
    /// picked here, and picked again if one was taken in between.
    pub fn start(dir: &Path, certs: &Path) -> anyhow::Result<Mosquitto> {
        let mut attempt = 0;
        loop {
            match Self::start_once(dir, certs) {
                Err(err) if port_taken(&err) && attempt < 3 => attempt += 1,
                started => return started,
            }
        }
    }

    fn start_once(dir: &Path, certs: &Path) -> anyhow::Result<Mosquitto> {
        let (plain, mtls) = (free_port()?, free_port()?);
        let user = fleet_manager::cli::current_user();
        let conf = format!(
            "per_listener_settings false\nallow_anonymous true\npersistence false\nlog_dest stderr\n\
             # The CA and broker keys are 0600: keep the user that owns them.\n\
             user {}\n\
             listener {} 127.0.0.1\n\
             listener {} 127.0.0.1\nrequire_certificate true\ncafile {}\ncertfile {}\nkeyfile {}\ntls_version tlsv1.2\n",
            user.trim(),
            plain.port(),
            mtls.port(),
            certs.join("root-ca.pem").display(),
            certs.join("broker.pem").display(),
            certs.join("broker.key").display(),
        );
        let conf_path = write_file(dir, "mosquitto.conf", conf.as_bytes())?;
        let child = Self::spawn(&conf_path, dir)?;
        Ok(Mosquitto {
            _child: child,
            plain,
            mtls,
        })
    }

    /// Runs mosquitto with `conf`, logging to `dir/{conf's stem}.log`, and
    /// waits until it is running. An `openssl.cnf` beside `conf` (as
    /// `fleet-manager mosquitto-config` writes) is its `OPENSSL_CONF`.
    pub fn spawn(conf: &Path, dir: &Path) -> anyhow::Result<KillOnDrop> {
        let stem = conf
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("mosquitto");
        let log_path = dir.join(format!("{stem}.log"));
        let log = std::fs::File::create(&log_path)?;
        let mut command = Command::new("/usr/sbin/mosquitto");
        let openssl_cnf = conf.with_file_name("openssl.cnf");
        if openssl_cnf.exists() {
            command.env("OPENSSL_CONF", openssl_cnf);
        }
        let mut child = KillOnDrop(
            command
                .arg("-c")
                .arg(conf)
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting mosquitto (scripts/install-deps installs it)")?,
        );
        // mosquitto opens its sockets before it loads keys, so an accepting
        // port proves nothing: wait for its own "running" line instead.
        let started = Instant::now();
        loop {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if log.contains(" running") {
                return Ok(child);
            }
            if let Some(status) = child.try_wait()? {
                bail!("mosquitto exited ({status}): {log}");
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "mosquitto not running after 10 s: {log}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Where devices connect: plain bootstrap, mutual-TLS service.
    pub fn endpoints(&self) -> DeviceEndpoints {
        DeviceEndpoints {
            bootstrap: self.plain,
            bootstrap_tls: false,
            service: self.mtls,
        }
    }
}

/// The CONNACK to an MQTT 3.1.1 CONNECT for `client_id` sent over plain
/// TCP to `addr` (a plain bootstrap listener), within `within`.
pub async fn plain_connack(
    addr: std::net::SocketAddr,
    client_id: &str,
    within: Duration,
) -> anyhow::Result<[u8; 4]> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(&mqtt311_connect(client_id, 60)).await?;
    let mut ack = [0u8; 4];
    tokio::time::timeout(within, tcp.read_exact(&mut ack)).await??;
    Ok(ack)
}

/// An MQTT 3.1.1 CONNECT: clean session, no Will, no credentials.
pub fn mqtt311_connect(client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(12 + client_id.len());
    body.extend_from_slice(&[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    mqtt_frame(0x10, &body)
}

/// `first` (the fixed header's type and flags byte) and `body` framed as
/// one MQTT packet, with the remaining length as MQTT encodes it.
pub fn mqtt_frame(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    out.extend(mqtt_varint(body.len()));
    out.extend_from_slice(body);
    out
}

/// `n` as an MQTT Variable Byte Integer (a remaining or property length).
pub fn mqtt_varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return out;
        }
    }
}

/// The body of `GET {path}` from an HTTP/1.1 server at `addr`, with its
/// status line checked for 200. For the broker's `/metrics`.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
            .await?;
        let mut out = String::new();
        s.read_to_string(&mut out).await?;
        anyhow::Ok(out)
    };
    let out = tokio::time::timeout(Duration::from_secs(10), io).await??;
    let (head, body) = out.split_once("\r\n\r\n").context("no end of HTTP head")?;
    anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
    Ok(body.to_owned())
}

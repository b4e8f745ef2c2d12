//! The fleetshift broker: fleetshift's own front door in front of
//! rumqttd's router.
//!
//! rumqttd routes messages but authorizes nothing, so every listener is
//! ours ([`frontdoor`]): who connects, under which identity, and what each
//! connection may publish and subscribe to are decided here, and each
//! accepted connection is handed to the router in process.
//!
//! [`start`] binds every configured listener (port 0 means any free port),
//! starts the router and the listeners on threads of their own, and returns
//! their addresses once they accept connections.
//!
//! # Layout
//! - [`config`]: listener addresses and limits, with defaults.
//! - [`frontdoor`]: listeners, identity binding, per-packet authorization,
//!   revocation, limits.
//! - `router`: the rumqttd router and its configuration.

pub mod config;
pub mod frontdoor;
pub mod log_pace;
pub mod metrics;
pub mod mosquitto;
mod router;
pub mod slots;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

pub use config::BrokerConfig;
pub use frontdoor::Metrics;

/// The internal listener's user for the manager.
pub const MANAGER_USER: &str = "fleet-manager";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("missing TLS file {0}")]
    MissingFile(String),
    #[error("cannot listen on {0}: {1}")]
    NoPort(SocketAddr, std::io::Error),
    #[error("cannot start broker thread: {0}")]
    Thread(std::io::Error),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("internal secret {0}: {1}")]
    Secret(String, std::io::Error),
}

/// A broker that is up. Its listeners stay open until [`RunningBroker::stop`]
/// (the router itself lives as long as the process).
#[derive(Clone)]
pub struct RunningBroker {
    pub bootstrap_tls_addr: Option<SocketAddr>,
    pub bootstrap_plain_addr: Option<SocketAddr>,
    pub service_addr: Option<SocketAddr>,
    pub internal_addr: SocketAddr,
    /// `GET /metrics`, if `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// Username and secret for the manager on the internal listener.
    pub manager_credentials: (String, String),
    pub metrics: Arc<Metrics>,
    stop: CancellationToken,
}

impl RunningBroker {
    /// Closes every listener and every connection.
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Stops, then waits until every connection has ended (each told
    /// DISCONNECT 0x8B first, where its version has one), for at most
    /// `within`: for a process that exits next.
    pub async fn shut_down(&self, within: std::time::Duration) {
        self.stop();
        let deadline = tokio::time::Instant::now() + within;
        while self.metrics.live.load(std::sync::atomic::Ordering::Relaxed) > 0
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}

/// Logs for the programs (`fleet-broker`, `fleet-manager`): on standard
/// error (their output is on standard out), in colour only on a terminal,
/// at `RUST_LOG` or INFO. rustls's own warnings are about what a client
/// sent (an IP address as SNI, say), which the front door already judges
/// and logs.
pub fn init_logs() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn,rustls=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// How long a process that stops its broker waits for the broker's
/// connections to be told ([`RunningBroker::shut_down`]).
pub const SHUTDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Resolves at SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

impl std::fmt::Debug for RunningBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningBroker")
            .field("bootstrap_tls_addr", &self.bootstrap_tls_addr)
            .field("bootstrap_plain_addr", &self.bootstrap_plain_addr)
            .field("service_addr", &self.service_addr)
            .field("internal_addr", &self.internal_addr)
            .finish_non_exhaustive()
    }
}

/// Reads the internal secret, creating it (mode 0600) if missing.
pub fn internal_secret(path: &Path) -> Result<String, BrokerError> {
    let err = |e| BrokerError::Secret(path.display().to_string(), e);
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let mut bytes = [0u8; 32];
    openssl::rand::rand_bytes(&mut bytes).map_err(|e| err(std::io::Error::other(e)))?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(secret.as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(secret)
}

/// Starts the router and the front door; returns once every listener is bound.
pub fn start(config: &BrokerConfig) -> Result<RunningBroker, BrokerError> {
    let secret = internal_secret(&config.secret_path())?;
    // One worker per core for handshakes and sessions; nothing on them
    // blocks on the router (links open and packets go to it asynchronously).
    // Listeners are bound inside it, so `start` works with or without a
    // caller's runtime.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
        .thread_name("frontdoor")
        .enable_all()
        .build()
        .map_err(BrokerError::Thread)?;
    let entered = runtime.enter();
    let link = router::start_router(config);
    let stop = CancellationToken::new();
    let shared = frontdoor::Shared::new(
        link,
        config.limits(),
        HashMap::from([(MANAGER_USER.to_string(), secret.clone())]),
        stop.clone(),
    );
    let bind = |addr: SocketAddr| frontdoor::bind(addr).map_err(|e| BrokerError::NoPort(addr, e));

    let mut plan: Vec<(std::net::TcpListener, frontdoor::Transport)> = Vec::new();
    let internal = bind(config.internal_listen)?;
    let internal_addr = internal
        .local_addr()
        .map_err(|e| BrokerError::NoPort(config.internal_listen, e))?;
    plan.push((
        internal,
        frontdoor::Transport::Plain(frontdoor::ListenerKind::Internal),
    ));

    let mut bootstrap_tls_addr = None;
    let mut server_tls = None;
    if let Some(addr) = config.bootstrap_tls_listen {
        let l = bind(addr)?;
        bootstrap_tls_addr = Some(l.local_addr().map_err(|e| BrokerError::NoPort(addr, e))?);
        let tls = frontdoor::trust::ServerTls::load(
            &config.certs_dir,
            fleet_pki::BROKER_FILES,
            "bootstrap",
        )?;
        server_tls = Some(tls.clone());
        plan.push((l, frontdoor::Transport::ServerTls(tls)));
    }
    let mut bootstrap_plain_addr = None;
    if let Some(addr) = config.bootstrap_plain_listen {
        let l = bind(addr)?;
        bootstrap_plain_addr = Some(l.local_addr().map_err(|e| BrokerError::NoPort(addr, e))?);
        tracing::warn!(%addr, "plain bootstrap listener enabled (development only)");
        plan.push((
            l,
            frontdoor::Transport::Plain(frontdoor::ListenerKind::Bootstrap),
        ));
    }
    let mut service_addr = None;
    let mut trust = None;
    if let Some(addr) = config.service_listen {
        let l = bind(addr)?;
        service_addr = Some(l.local_addr().map_err(|e| BrokerError::NoPort(addr, e))?);
        let t = frontdoor::trust::Trust::load(
            &config.certs_dir,
            shared.metrics.clone(),
            shared.revoked.clone(),
            config.service_session_tickets,
            config.grant_cache,
        )?;
        trust = Some(t.clone());
        plan.push((l, frontdoor::Transport::MutualTls(t)));
    }

    let mut metrics_listener = None;
    let mut metrics_addr = None;
    if let Some(addr) = config.metrics_listen {
        let l = bind(addr)?;
        metrics_addr = Some(l.local_addr().map_err(|e| BrokerError::NoPort(addr, e))?);
        metrics_listener = Some(l);
    }

    drop(entered);
    let metrics = shared.metrics.clone();
    let stop2 = stop.clone();
    std::thread::Builder::new()
        .name("frontdoor".into())
        .spawn(move || {
            runtime.block_on(async move {
                if let Some(trust) = trust {
                    tokio::spawn(trust.watch(stop2.clone()));
                }
                if let Some(tls) = server_tls {
                    tokio::spawn(tls.watch(stop2.clone()));
                }
                let paced = shared.clone();
                tokio::spawn(log_pace::every_second(
                    move || paced.flush_refusals_logged(false),
                    stop2.clone(),
                ));
                if let Some(l) = metrics_listener {
                    match l
                        .set_nonblocking(true)
                        .and_then(|()| tokio::net::TcpListener::from_std(l))
                    {
                        Ok(l) => {
                            tokio::spawn(metrics::serve(l, shared.metrics.clone(), stop2.clone()));
                        }
                        Err(err) => tracing::error!(error = %err, "metrics listener setup failed"),
                    }
                }
                let mut tasks = Vec::new();
                for (listener, transport) in plan {
                    if let Err(err) = listener.set_nonblocking(true) {
                        tracing::error!(error = %err, "listener setup failed");
                        continue;
                    }
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => tasks.push(tokio::spawn(frontdoor::serve(
                            l,
                            transport,
                            shared.clone(),
                            stop2.clone(),
                        ))),
                        Err(err) => tracing::error!(error = %err, "listener setup failed"),
                    }
                }
                stop2.cancelled().await;
                for t in tasks {
                    let _ = t.await;
                }
                // The connections, each a task of this runtime, say their
                // farewell (MQTT 5: DISCONNECT 0x8B) before the runtime, and
                // they with it, is dropped.
                let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
                while shared
                    .metrics
                    .live
                    .load(std::sync::atomic::Ordering::Relaxed)
                    > 0
                    && tokio::time::Instant::now() < deadline
                {
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                // The second under way, and what was refused while the
                // connections drained, counted too.
                shared.flush_refusals_logged(true);
            })
        })
        .map_err(BrokerError::Thread)?;
    tracing::info!(%internal_addr, ?bootstrap_tls_addr, ?bootstrap_plain_addr, ?service_addr, ?metrics_addr, "broker ready");
    Ok(RunningBroker {
        bootstrap_tls_addr,
        bootstrap_plain_addr,
        service_addr,
        internal_addr,
        metrics_addr,
        manager_credentials: (MANAGER_USER.to_string(), secret),
        metrics,
        stop,
    })
}

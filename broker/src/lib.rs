//! The fleetshift broker: rumqttd as the router, with the listeners devices
//! connect to.
//!
//! Three listeners, all from [`BrokerConfig`]:
//! - the **bootstrap** listener, plain MQTT on loopback by default, where a
//!   device activates and fetches its first certificate (every secret on it
//!   is sealed end to end, so the channel itself carries nothing secret);
//! - the **bootstrap TLS** listener, the same with the broker's server
//!   certificate, terminated by [`tls_bootstrap`] and relayed to the plain one;
//! - the **service** listener, mutual TLS, where the client certificate's
//!   O is the rumqttd tenant: a device there may only use topics under
//!   `/tenants/{service_id}/` (rumqttd's `validate-tenant-prefix`).
//!
//! rumqttd cannot report the ports it bound and cannot be stopped, so
//! [`start`] chooses free ports for any port given as 0, runs the broker on a
//! thread of its own and returns once every listener accepts connections.
//!
//! # Layout
//! - [`config`]: listener addresses and limits, with defaults.
//! - [`listeners`]: the rumqttd configuration built from it, the one place
//!   that knows rumqttd's listener types.

pub mod config;
mod listeners;
pub mod tls_bootstrap;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

pub use config::BrokerConfig;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("missing TLS file {0}")]
    MissingFile(String),
    #[error("no free port on {0}: {1}")]
    NoPort(SocketAddr, std::io::Error),
    #[error("listener {0} did not start accepting within {1:?}")]
    NotReady(SocketAddr, Duration),
    #[error("cannot start broker thread: {0}")]
    Thread(std::io::Error),
    #[error("TLS setup: {0}")]
    Tls(String),
}

/// A broker that is up. Its listeners stay open for the life of the process.
#[derive(Debug, Clone)]
pub struct RunningBroker {
    pub bootstrap_addr: SocketAddr,
    pub bootstrap_tls_addr: Option<SocketAddr>,
    pub service_addr: Option<SocketAddr>,
}

/// Starts the embedded broker and waits until its listeners accept.
pub fn start(config: &BrokerConfig) -> Result<RunningBroker, BrokerError> {
    let bootstrap_addr = resolve_port(config.bootstrap_listen)?;
    let service_addr = config.service_listen.map(resolve_port).transpose()?;
    let rumqttd_config = listeners::rumqttd_config(config, bootstrap_addr, service_addr)?;
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(rumqttd_config);
            if let Err(err) = broker.start() {
                tracing::error!(error = %err, "broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    let deadline = Duration::from_secs(15);
    for addr in std::iter::once(bootstrap_addr).chain(service_addr) {
        wait_until_accepting(addr, deadline)?;
    }
    let bootstrap_tls_addr = match config.bootstrap_tls_listen {
        Some(addr) => Some(start_bootstrap_tls(config, addr, bootstrap_addr)?),
        None => None,
    };
    tracing::info!(%bootstrap_addr, ?bootstrap_tls_addr, ?service_addr, "broker ready");
    Ok(RunningBroker {
        bootstrap_addr,
        bootstrap_tls_addr,
        service_addr,
    })
}

/// Binds the bootstrap TLS listener and serves it on a runtime of its own
/// (the broker outlives any caller's runtime).
fn start_bootstrap_tls(
    config: &BrokerConfig,
    addr: SocketAddr,
    upstream: SocketAddr,
) -> Result<SocketAddr, BrokerError> {
    let acceptor = tls_bootstrap::acceptor(&config.certs_dir)?;
    let listener = TcpListener::bind(addr).map_err(|e| BrokerError::NoPort(addr, e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| BrokerError::NoPort(addr, e))?;
    let bound = listener
        .local_addr()
        .map_err(|e| BrokerError::NoPort(addr, e))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("bootstrap-tls")
        .enable_all()
        .build()
        .map_err(BrokerError::Thread)?;
    let handshake = Duration::from_millis(config.tls_handshake_timeout_ms);
    let max = config.max_connections;
    std::thread::Builder::new()
        .name("bootstrap-tls".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        tls_bootstrap::serve(listener, acceptor, upstream, handshake, max).await
                    }
                    Err(err) => tracing::error!(error = %err, "bootstrap TLS listener failed"),
                }
            })
        })
        .map_err(BrokerError::Thread)?;
    Ok(bound)
}

/// Port 0 means "any free port": bind one, note it, release it for rumqttd.
fn resolve_port(addr: SocketAddr) -> Result<SocketAddr, BrokerError> {
    if addr.port() != 0 {
        return Ok(addr);
    }
    let listener = TcpListener::bind(addr).map_err(|e| BrokerError::NoPort(addr, e))?;
    listener
        .local_addr()
        .map_err(|e| BrokerError::NoPort(addr, e))
}

fn wait_until_accepting(addr: SocketAddr, within: Duration) -> Result<(), BrokerError> {
    let started = Instant::now();
    let mut pause = Duration::from_millis(5);
    while started.elapsed() < within {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(200));
    }
    Err(BrokerError::NotReady(addr, within))
}

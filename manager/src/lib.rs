//! The fleetshift manager: registry and history, the CA, the request
//! handlers and the operator API. It talks to the broker only as an MQTT
//! client, so it runs unchanged against the embedded broker or an external one.
//!
//! # Layout
//! - [`config`]: [`ManagerConfig`], its defaults and loading.
//! - [`store`]: sled trees for registrations, devices, service history, certificates, nonces, audit.
//! - [`handlers`]: activate, update, poll and status, service changes and notices ([`handlers::Core`]).
//! - [`mqtt`]: the event-loop task and the worker pool.
//! - [`admin`]: the operator HTTP API and its small client.
//! - [`cli`]: the `fleet-manager` command line.

pub mod admin;
pub mod cli;
pub mod config;
pub mod handlers;
pub mod mqtt;
pub mod notices;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::ManagerConfig;
pub use handlers::Core;

/// A started manager.
pub struct RunningManager {
    pub admin_addr: SocketAddr,
    /// The root the operator API's certificate chains to, when it is
    /// served over TLS (`admin_tls`).
    admin_tls_root: Option<std::path::PathBuf>,
    pub core: Arc<Core>,
    admin: Arc<admin::Admin>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

impl RunningManager {
    /// Stops the manager and waits for its tasks; the store is flushed and
    /// released once the last handle to `core` is dropped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(10), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("manager tasks did not stop within 10 s");
        }
        // The second under way, and what was refused while the tasks
        // ended, counted too.
        self.admin.flush_logged(true);
        let _ = self.core.store.sync();
    }

    /// The operator API, with its token.
    pub fn api(&self) -> admin::AdminApi {
        let api = admin::AdminApi::new(
            admin::reachable(self.admin_addr).to_string(),
            admin::Token::Given(self.admin.token.clone()),
        );
        match &self.admin_tls_root {
            Some(root) => api.with_root(root.clone()),
            None => api,
        }
    }

    /// Waits until shutdown is requested, then stops.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.stop().await;
    }
}

/// Opens the store and PKI, connects to the broker, subscribes, and serves
/// the operator API. Returns once the request topics are subscribed.
pub async fn start(
    config: ManagerConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningManager> {
    config.validate()?;
    let store = store::Store::open(&config.data_dir)
        .with_context(|| format!("opening store {}", config.data_dir.display()))?;
    let pki = fleet_pki::Pki::open_or_create(&config.certs_dir)
        .with_context(|| format!("opening PKI {}", config.certs_dir.display()))?;
    let names = config.broker_names()?;
    if let Some(names) = &names {
        pki.ensure_broker_cert(Some(names))
            .context("issuing the broker certificate for server_names")?;
    }
    // The operator API's TLS, before anything runs: a certificate that does
    // not load stops the start with nothing left behind.
    let admin_tls = match config.admin_tls {
        true => {
            pki.ensure_admin_cert(names.as_ref())
                .context("issuing the operator API's certificate (admin_tls)")?;
            let tls = fleet_broker::frontdoor::trust::ServerTls::load(
                &config.certs_dir,
                fleet_pki::ADMIN_FILES,
                "operator API",
            )
            .context("the operator API's TLS (admin_tls)")?;
            Some(tls)
        }
        false => None,
    };
    let token_path = config.admin_token_path();
    let admin_token = fleet_broker::internal_secret(&token_path)
        .with_context(|| format!("the operator API's token {}", token_path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_path)
            .with_context(|| format!("the operator API's token {}", token_path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            tracing::warn!(
                file = %token_path.display(),
                mode = format!("{:o}", mode & 0o777),
                "others than its owner may read or write the operator API's token (chmod 600)"
            );
        }
    }
    let core = Arc::new(Core::new(store, Arc::new(pki), config.clone()));
    // The broker's grants follow the store, whatever happened while the
    // manager was down.
    let syncing = core.clone();
    let changed = tokio::task::spawn_blocking(move || syncing.sync_grants())
        .await?
        .map_err(|f| anyhow::anyhow!("writing broker grants: {f}"))?;
    tracing::info!(changed, "broker grants in step with the registry");
    let tracker = TaskTracker::new();

    let (client, eventloop) = mqtt::connect(&config)?;
    let (subscribed_tx, mut subscribed_rx) = watch::channel(false);
    tracker.spawn(notices::pace_notices(
        core.clone(),
        client.clone(),
        shutdown.clone(),
    ));
    tracker.spawn(mqtt::serve(
        core.clone(),
        client.clone(),
        eventloop,
        subscribed_tx,
        shutdown.clone(),
        tracker.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .with_context(|| format!("binding admin API on {}", config.admin_listen))?;
    let admin_addr = listener.local_addr()?;
    let admin = Arc::new(admin::Admin::new(
        core.clone(),
        client,
        subscribed_rx.clone(),
        admin_token,
    ));
    if let Some(tls) = &admin_tls {
        tracker.spawn(tls.clone().watch(shutdown.clone()));
    }
    tracker.spawn(admin::serve(
        admin.clone(),
        listener,
        admin_tls,
        shutdown.clone(),
    ));
    tracker.spawn(housekeeping(core.clone(), shutdown.clone()));
    let paced = admin.clone();
    tracker.spawn(fleet_broker::log_pace::every_second(
        move || paced.flush_logged(false),
        shutdown.clone(),
    ));

    tokio::time::timeout(Duration::from_secs(30), subscribed_rx.wait_for(|s| *s))
        .await
        .context("manager did not subscribe at the broker within 30 s")??;
    tracing::info!(%admin_addr, broker = %config.broker_url, "manager ready");
    Ok(RunningManager {
        admin_addr,
        admin_tls_root: config
            .admin_tls
            .then(|| fleet_pki::roots_pem_path(&config.certs_dir)),
        core,
        admin,
        tracker,
        shutdown,
    })
}

/// Housekeeping every 10 s: drops nonce records past the timestamp window
/// (such a request is refused as stale before its nonce is looked at) and
/// revokes superseded certificates past their grace period.
async fn housekeeping(core: Arc<Core>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let core = core.clone();
        let horizon = fleet_protocol::now_ms().saturating_sub(2 * core.config.max_clock_skew_ms);
        let grace = core.config.revoke_superseded_after_secs * 1000;
        let work = move || {
            if let Err(err) = core.store.prune_nonces(horizon) {
                tracing::warn!(error = %err, "nonce pruning failed");
            }
            core.prune_failures();
            core.retry_grants();
            if let Err(err) = core.revoke_overdue(grace) {
                tracing::warn!(error = %err, "overdue revocations failed");
            }
            core.write_pending_crls();
            core.maintain_root();
            core.maintain_service_cas();
            core.refresh_crls();
            core.renew_server_certs();
        };
        let _ = tokio::task::spawn_blocking(work).await;
    }
}

/// Runs until `shutdown` is cancelled.
pub async fn run(config: ManagerConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    start(config, shutdown).await?.wait().await;
    Ok(())
}

//! `fleet-device-sim`: provision simulated devices, or run a fleet of them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fleet_device_sim::{provision_fleet, run_fleet, DeviceConfig, Endpoint, FleetConfig, KeyMode};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about = "fleetshift device simulator")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create device stores with factory keys; prints one JSON line per
    /// device: {"device_id", "factory_key_hex"} (SEC1 public point).
    Provision {
        #[arg(long)]
        store: PathBuf,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value = "dev")]
        prefix: String,
        #[arg(long, default_value_t = 0)]
        first: usize,
    },
    /// Run provisioned devices until SIGINT or SIGTERM.
    Run {
        #[arg(long)]
        store: PathBuf,
        #[arg(long, default_value_t = 1)]
        count: usize,
        #[arg(long, default_value = "dev")]
        prefix: String,
        #[arg(long, default_value_t = 0)]
        first: usize,
        /// Bootstrap listener, host:port (plain MQTT unless --bootstrap-tls).
        #[arg(long)]
        bootstrap: Endpoint,
        /// Reach the bootstrap listener over TLS (the broker's bootstrap TLS listener).
        #[arg(long)]
        bootstrap_tls: bool,
        /// Service listener, host:port (mutual TLS; host is the TLS server name).
        #[arg(long)]
        service: Endpoint,
        /// Directory with roots.pem (or root-ca.pem) and manager-sign.pub.pem.
        #[arg(long)]
        certs: PathBuf,
        /// csr (device keeps its key) or manager (manager-generated key).
        #[arg(long, default_value = "csr")]
        key_mode: KeyMode,
        /// Devices started per second.
        #[arg(long, default_value_t = 100.0)]
        rate: f64,
        #[arg(long, default_value_t = 5000)]
        telemetry_interval_ms: u64,
        #[arg(long, default_value_t = 10_000)]
        request_timeout_ms: u64,
        /// Renew the certificate at a random point between these fractions
        /// of its validity, FROM,TO [default: 0.667,0.75]
        #[arg(long, value_parser = fleet_device_sim::parse_renew_window)]
        renew_window: Option<(f64, f64)>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Provision {
            store,
            count,
            prefix,
            first,
        } => {
            for (device_id, key) in provision_fleet(&store, &prefix, first, count)? {
                let line = serde_json::json!({ "device_id": device_id, "factory_key_hex": hex::encode(key) });
                println!("{line}");
            }
            Ok(())
        }
        Command::Run {
            store,
            count,
            prefix,
            first,
            bootstrap,
            bootstrap_tls,
            service,
            certs,
            key_mode,
            rate,
            telemetry_interval_ms,
            request_timeout_ms,
            renew_window,
        } => {
            // Every root that has not expired (`roots.pem`), as a device
            // made now is given; `root-ca.pem` in a PKI without successors.
            let root_ca_pem = match certs.join("roots.pem") {
                bundle if bundle.is_file() => bundle,
                _ => certs.join("root-ca.pem"),
            };
            let manager_pub_pem = certs.join("manager-sign.pub.pem");
            for path in [&root_ca_pem, &manager_pub_pem] {
                anyhow::ensure!(path.is_file(), "{} is missing", path.display());
            }
            let cfg = FleetConfig {
                prefix,
                count,
                first_index: first,
                connects_per_sec: rate,
                template: DeviceConfig {
                    device_id: String::new(),
                    store_root: store,
                    bootstrap,
                    bootstrap_tls,
                    service,
                    root_ca_pem,
                    manager_pub_pem,
                    key_mode,
                    telemetry_interval: Duration::from_millis(telemetry_interval_ms),
                    request_timeout: Duration::from_millis(request_timeout_ms),
                    renew_window: renew_window.unwrap_or(fleet_device_sim::RENEW_WINDOW),
                    unknown_ca_patience: fleet_device_sim::UNKNOWN_CA_PATIENCE,
                },
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let logger = tokio::spawn(async move {
                // At DEBUG: each device logs what happens to it itself (at
                // INFO, failures at WARN); these are the same facts as events.
                while let Some((device_id, event)) = rx.recv().await {
                    tracing::debug!(%device_id, ?event, "event");
                }
            });
            let report = run_fleet(cfg, tx, shutdown).await.context("fleet")?;
            let _ = logger.await;
            tracing::info!(
                started = report.started,
                stopped = report.stopped,
                failed = report.failed.len(),
                "fleet finished"
            );
            for (device_id, error) in &report.failed {
                tracing::warn!(%device_id, %error, "device failed");
            }
            Ok(())
        }
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGTERM handler");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}

//! `fleet-broker`: the embedded broker on its own.

use std::path::PathBuf;

use clap::Parser;
use fleet_broker::BrokerConfig;

#[derive(Parser)]
#[command(
    name = "fleet-broker",
    about = "fleetshift broker: rumqttd with the device listeners"
)]
struct Cli {
    /// TOML configuration file; FLEET_BROKER_* environment variables override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print the configuration it would run with (the defaults, overridden by
    /// --config and FLEET_BROKER_* variables) and exit.
    #[arg(long)]
    print_config: bool,
}

/// jemalloc, not the C library's malloc: a TLS handshake makes some 250
/// allocations, and with jemalloc's thread caches a mutual-TLS connect takes
/// 11 % less of the broker's CPU, for 0.7 KiB more per idle connection
/// (BENCHMARKS-connect.md, run 13).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    fleet_broker::init_logs();
    let cli = Cli::parse();
    let config = BrokerConfig::load(cli.config.as_deref())?;
    if cli.print_config {
        println!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let running = fleet_broker::start(&config)?;
    let show =
        |a: Option<std::net::SocketAddr>| a.map(|a| a.to_string()).unwrap_or_else(|| "-".into());
    println!(
        "broker ready: internal mqtt://{} (manager; secret in {})  bootstrap mqtts://{}  bootstrap plain mqtt://{}  service mqtts://{}  metrics http://{}",
        running.internal_addr,
        config.secret_path().display(),
        show(running.bootstrap_tls_addr),
        show(running.bootstrap_plain_addr),
        show(running.service_addr),
        show(running.metrics_addr),
    );
    // The router and the listeners run on threads of their own; this one
    // waits for the signal to stop them.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            fleet_broker::shutdown_signal().await;
            tracing::info!("stopping: telling every client");
            running.shut_down(fleet_broker::SHUTDOWN_WAIT).await;
            tracing::info!("stopped");
        });
    Ok(())
}

//! `fleet-manager`: serve, manage the PKI, and reach a running manager's
//! operator API. See [`fleet_manager::cli`].

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,rumqttd=warn".into()),
        )
        .init();
    fleet_manager::cli::execute(fleet_manager::cli::Cli::parse()).await?;
    Ok(())
}

//! `fleet-manager`: serve, manage the PKI, and reach a running manager's
//! operator API. See [`fleet_manager::cli`].

use clap::Parser;

/// The embedded broker's allocator, as in `fleet-broker`.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    fleet_broker::init_logs();
    let printed = fleet_manager::cli::execute(fleet_manager::cli::Cli::parse()).await?;
    // A command the manager answered with refusals (a service change some
    // devices did not take) fails, for scripts that look at the exit code.
    let refused = fleet_manager::cli::refused(&printed);
    anyhow::ensure!(refused == 0, "{refused} refused (\"ok\": false above)");
    Ok(())
}

//! `fleet-demo`: broker and manager with the default embedded configuration,
//! a simulated fleet, one migration, and the history it leaves.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use fleet_broker::BrokerConfig;
use fleet_device_sim::{DeviceEvent, KeyMode};
use fleet_manager::store::CertStatus;
use fleet_manager::ManagerConfig;
use fleet_testkit::Devices;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "fleet-demo",
    about = "Run a small fleet through activation, certificates and one migration"
)]
struct Cli {
    #[arg(long, default_value_t = 50)]
    devices: usize,
    #[arg(long, default_value = "structural")]
    from: String,
    #[arg(long, default_value = "weather")]
    to: String,
    /// csr (the device keeps its key) or manager (the manager generates it).
    #[arg(long, default_value = "csr")]
    key_mode: KeyMode,
    /// The PKI (made if missing); by default one of the run's own, under
    /// its directory in --data, so that the demo touches nothing a
    /// `fleet-manager serve` beside it uses.
    #[arg(long)]
    certs: Option<PathBuf>,
    #[arg(long, default_value = "fleet-data")]
    data: PathBuf,
    /// Seconds to wait for each phase.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

fn phase(n: usize, what: &str) {
    println!("\n== phase {n}: {what}");
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,rumqttd=off".into()),
        )
        .init();
    let cli = Cli::parse();
    let within = Duration::from_secs(cli.timeout);
    let run_dir = cli.data.join(format!("demo-{}", fleet_protocol::now_ms()));
    std::fs::create_dir_all(&run_dir)?;
    let certs = cli.certs.clone().unwrap_or_else(|| run_dir.join("certs"));

    phase(1, "PKI, broker and manager");
    let created = !certs.join("root-ca.pem").exists();
    let pki = fleet_pki::Pki::open_or_create(&certs).context("creating the development PKI")?;
    println!(
        "PKI in {} ({})",
        pki.dir().display(),
        if created { "created" } else { "existing" }
    );
    let broker = fleet_broker::start(&BrokerConfig {
        internal_listen: "127.0.0.1:0".parse()?,
        bootstrap_tls_listen: Some("127.0.0.1:0".parse()?),
        service_listen: Some("127.0.0.1:0".parse()?),
        certs_dir: certs.clone(),
        ..Default::default()
    })?;
    let service_addr = broker.service_addr.context("service listener")?;
    println!(
        "broker: internal mqtt://{} (manager)  bootstrap mqtts://{} (devices)  service mqtts://{} (mutual TLS)",
        broker.internal_addr,
        broker.bootstrap_tls_addr.context("bootstrap TLS listener")?,
        service_addr
    );
    let config = ManagerConfig {
        broker_url: format!("mqtt://{}", broker.internal_addr),
        broker_username: Some(broker.manager_credentials.0.clone()),
        broker_password: Some(broker.manager_credentials.1.clone()),
        data_dir: run_dir.join("manager"),
        certs_dir: certs.clone(),
        admin_listen: "127.0.0.1:0".parse()?,
        ..Default::default()
    };
    let manager = fleet_manager::start(config, CancellationToken::new()).await?;
    let admin = manager.api();
    println!(
        "manager: store {}  admin http://{}",
        run_dir.join("manager").display(),
        admin.addr
    );

    phase(
        2,
        &format!(
            "provision and register {} devices on {}",
            cli.devices, cli.from
        ),
    );
    let devices = Devices::new(run_dir.join("devices"));
    let ids: Vec<String> = (0..cli.devices)
        .map(|i| fleet_device_sim::fleet_device_id("dev", i))
        .collect();
    let mut regs = Vec::new();
    for id in &ids {
        let key = fleet_device_sim::provision(&devices.store_root, id)?;
        regs.push(
            json!({ "device_id": id, "service_id": cli.from, "factory_key_hex": hex::encode(key) }),
        );
    }
    fleet_manager::admin::call(&admin, "POST", "/v1/registrations", Some(&json!(regs))).await?;
    println!("{} devices registered with their factory keys", ids.len());

    let keys = match cli.key_mode {
        KeyMode::Csr => "each device makes its key and sends a CSR",
        KeyMode::ManagerGenerated => "the manager makes each device's key pair",
    };
    phase(
        3,
        &format!("power on: activate, get a certificate ({keys}), connect over mutual TLS"),
    );
    let started = Instant::now();
    for id in &ids {
        let mut cfg = devices.config_for(
            &fleet_testkit::DeviceEndpoints::of(&broker),
            &certs,
            id,
            cli.key_mode,
        );
        cfg.telemetry_interval = Duration::from_secs(1);
        devices.spawn(cfg);
        // Pace the start so connects do not pile up on two cores.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_all(&devices, &ids, within, |e| {
        matches!(e, DeviceEvent::Connected { .. })
    })
    .await?;
    println!(
        "{} devices online on {} in {:.1?}",
        ids.len(),
        cli.from,
        started.elapsed()
    );

    phase(4, &format!("service change {} -> {}", cli.from, cli.to));
    let started = Instant::now();
    let res = fleet_manager::admin::call(
        &admin,
        "POST",
        "/v1/service-change",
        Some(&json!({ "from_service": cli.from, "service_id": cli.to })),
    )
    .await?;
    let notified = res["results"]
        .as_array()
        .map(|r| r.iter().filter(|x| x["ok"] == json!(true)).count());
    println!("{} devices notified", notified.unwrap_or(0));
    wait_all(&devices, &ids, within, |e| {
        matches!(e, DeviceEvent::ChangeAccepted { .. })
    })
    .await?;
    println!(
        "{} devices re-keyed and online on {} in {:.1?}",
        ids.len(),
        cli.to,
        started.elapsed()
    );

    phase(5, "history");
    let summary = fleet_manager::admin::call(&admin, "GET", "/v1/summary", None).await?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    let core = manager.core.clone();
    let first = &ids[0];
    println!("\n{first} (times from its first service period):");
    let history = core.store.history(first)?;
    let t0 = history
        .first()
        .map(|(_, p)| p.started_ms)
        .unwrap_or_default();
    let rel = |t: u64| format!("+{:.3}s", t.saturating_sub(t0) as f64 / 1000.0);
    for (_, p) in history {
        println!(
            "  {:<12} from {:<9} to {:<10} started by {:<15} ended by {}",
            p.service_id,
            rel(p.started_ms),
            p.ended_ms.map(rel).unwrap_or_else(|| "(current)".into()),
            p.reason,
            p.end_reason.unwrap_or_else(|| "-".into()),
        );
    }
    for c in core.store.certs_of(first)? {
        println!(
            "  cert {} for {:<12} {:?}",
            c.serial, c.service_id, c.status
        );
    }
    // Superseded certificates are revoked once their devices report from
    // the new ones; give the last reports a moment to land.
    let deadline = Instant::now() + Duration::from_secs(10);
    let certs = loop {
        let certs = core.store.certs()?;
        let revoked = certs.iter().filter(|c| c.revoked_ms.is_some()).count();
        if revoked >= ids.len() || Instant::now() > deadline {
            break certs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let active = certs
        .iter()
        .filter(|c| c.status == CertStatus::Active)
        .count();
    let revoked = certs
        .iter()
        .filter(|c| c.status == CertStatus::Superseded && c.revoked_ms.is_some())
        .count();
    println!(
        "\n{} certificates: {active} active on {}, {revoked} superseded and revoked in {}",
        certs.len(),
        cli.to,
        core.pki.issuing_generation(&cli.from)?.crl_path.display()
    );
    anyhow::ensure!(
        active == ids.len() && revoked == ids.len(),
        "unexpected certificate counts"
    );

    devices.shutdown.cancel();
    manager.stop().await;
    println!("\ndone; store kept in {}", run_dir.display());
    Ok(())
}

async fn wait_all(
    devices: &Devices,
    ids: &[String],
    within: Duration,
    done: impl Fn(&DeviceEvent) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    let mut last = usize::MAX;
    loop {
        let ready = ids
            .iter()
            .filter(|id| devices.events_of(id).iter().any(&done))
            .count();
        if ready != last {
            println!("  {ready}/{}", ids.len());
            last = ready;
        }
        if ready == ids.len() {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {ready} of {} devices got there",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

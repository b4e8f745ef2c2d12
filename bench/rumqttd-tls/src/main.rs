//! rumqttd 0.20's own broker with one mutual-TLS MQTT 3.1.1 (v4) listener,
//! the third target of `scripts/bench-connect` next to fleetshift's front
//! door and mosquitto.
//!
//! ```sh
//! rumqttd-tls-bench --listen 127.0.0.1:18883 --certs /tmp/bench-connect.X/certs
//! ```
//!
//! The listener is rumqttd's rustls listener with `verify-client-cert`:
//! server certificate `{certs}/broker.pem` + `broker.key`, clients verified
//! against `{certs}/root-ca.pem`. rumqttd trusts only the first certificate
//! of its CA file; the fleet root is enough because every client sends its
//! service CA (`services/{service}-ca.pem`) as the chain after its leaf.
//!
//! rumqttd binds inside its own server thread and reports no address, so
//! this waits until the port is in LISTEN state in `/proc/net/tcp` (no probe
//! connection: rumqttd handshakes inline in its accept loop, a stray TCP
//! connection would hold it up) and then prints
//! `rumqttd ready: mqtts://ADDR` on stdout.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings, TlsConfig};

#[derive(Parser)]
#[command(
    name = "rumqttd-tls-bench",
    about = "rumqttd with one mutual-TLS v4 listener"
)]
struct Cli {
    /// Address of the mutual-TLS listener (a fixed port: rumqttd reports no bound port).
    #[arg(long)]
    listen: SocketAddr,
    /// PKI directory made by `fleet-manager pki-init` (broker.pem, broker.key, root-ca.pem).
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
    /// CA file for client certificates; rumqttd uses only its first certificate.
    /// Default: `{certs}/root-ca.pem`.
    #[arg(long)]
    client_ca: Option<PathBuf>,
    /// Router connection limit (rumqttd refuses CONNECTs beyond it).
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
    /// Pause after each accepted connection (rumqttd's `next_connection_delay_ms`;
    /// its sample config uses 1, 0 lets the accept loop run flat out).
    #[arg(long, default_value_t = 0)]
    next_connection_delay_ms: u64,
    /// Time a client has, after the TLS handshake, to send CONNECT.
    #[arg(long, default_value_t = 10_000)]
    connection_timeout_ms: u16,
}

fn path_str(p: &Path) -> anyhow::Result<String> {
    p.to_str()
        .map(str::to_owned)
        .with_context(|| format!("path is not UTF-8: {}", p.display()))
}

fn config(cli: &Cli) -> anyhow::Result<Config> {
    let ca = cli
        .client_ca
        .clone()
        .unwrap_or_else(|| cli.certs.join("root-ca.pem"));
    let tls = TlsConfig::Rustls {
        capath: Some(path_str(&ca)?),
        certpath: path_str(&cli.certs.join("broker.pem"))?,
        keypath: path_str(&cli.certs.join("broker.key"))?,
    };
    // rumqttd reads these files again on every connection; check them once
    // here so a wrong path fails at start, not at the first connect.
    if !tls.validate_paths() {
        bail!("missing broker.pem, broker.key or {}", ca.display());
    }
    let server = ServerSettings {
        name: "v4-mtls".into(),
        listen: cli.listen,
        tls: Some(tls),
        next_connection_delay_ms: cli.next_connection_delay_ms,
        connections: ConnectionSettings {
            connection_timeout_ms: cli.connection_timeout_ms,
            max_payload_size: 20_480,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    Ok(Config {
        id: 0,
        router: RouterConfig {
            max_connections: cli.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: 104_857_600,
            max_segment_count: 10,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("1".to_owned(), server)])),
        ..Config::default()
    })
}

/// Is some socket on `port` in LISTEN state (`/proc/net/tcp` and `tcp6`)?
fn listening(port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|file| {
        std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                f.get(1).is_some_and(|local| local.ends_with(&want)) && f.get(3) == Some(&"0A")
            })
    })
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "rumqttd=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let cli = Cli::parse();
    let config = config(&cli)?;
    if listening(cli.listen.port()) {
        bail!("port {} is already in use", cli.listen.port());
    }

    // Broker::start blocks for as long as its server threads run.
    let broker = std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || Broker::new(config).start().map_err(|e| e.to_string()))?;

    let deadline = Instant::now() + Duration::from_secs(10);
    while !listening(cli.listen.port()) {
        if broker.is_finished() || Instant::now() > deadline {
            bail!("rumqttd did not start listening on {}", cli.listen);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "rumqttd ready: mqtts://{}", cli.listen)?;
    out.flush()?;
    drop(out);

    match broker.join() {
        Ok(Ok(())) => bail!("rumqttd's listener stopped (see its log above)"),
        Ok(Err(e)) => bail!("rumqttd: {e}"),
        Err(_) => bail!("rumqttd panicked"),
    }
}

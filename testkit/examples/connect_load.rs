//! Mutual-TLS connect load generator: TCP + TLS 1.3 (OpenSSL, client
//! certificate) + MQTT 3.1.1 CONNECT / CONNACK, against any broker that
//! accepts fleetshift device certificates (the front door's service
//! listener, or mosquitto with `require_certificate true`).
//!
//! ```sh
//! connect_load prepare --certs certs --service svcA
//! connect_load rate --addr 127.0.0.1:8883 --certs certs --count 3000 --concurrency 200 --broker-pid PID
//! connect_load hold --addr 127.0.0.1:8883 --certs certs --count 2000 --broker-pid PID
//! connect_load burst --addr 127.0.0.1:8883 --certs certs --concurrency 200 --bursts 20
//! ```
//!
//! Workers are OS threads doing blocking TLS I/O, with OpenSSL (one shared
//! `SslConnector`, the default) or rustls on aws-lc-rs (`--client rustls`,
//! one `ClientConfig` per identity), TLS 1.3 with X25519 either way. With
//! `--resume` (rustls only) an identity resumes its TLS session from the
//! ticket its previous connection was given. Each prints one JSON line on
//! stdout.
//!
//! A rustls identity verifies the broker's chain at its first connect and
//! remembers it (see [`RememberedServer`]); the CertificateVerify, the
//! broker's proof that it holds the key, is checked on every connect.
//! `--verify-server-every-connect` verifies the chain every time, as the
//! OpenSSL client does. The generator shares the broker's CPU, and in the
//! field this work is done by each device's own.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use openssl::pkey::{PKey, Private};
use openssl::ssl::{SslConnector, SslMethod, SslStream, SslVersion};
use openssl::x509::X509;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::DigitallySignedStruct;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "connect_load",
    about = "mutual-TLS MQTT connect load generator"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Broker address (mutual-TLS MQTT listener).
    #[arg(long)]
    addr: SocketAddr,
    /// PKI directory (root-ca.pem, services/).
    #[arg(long, default_value = "certs")]
    certs: PathBuf,
    /// Service whose CA issues the client certificates (O of the certificate).
    #[arg(long, default_value = "svcA")]
    service: String,
    /// Label printed in the JSON line.
    #[arg(long, default_value = "broker")]
    target: String,
    /// Broker process id, for CPU time and resident memory from /proc.
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Connections in flight at once (worker threads).
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Device id prefix; ids are `{prefix}-{n:06}`.
    #[arg(long, default_value = "load")]
    prefix: String,
    /// MQTT keep-alive asked for, seconds.
    #[arg(long, default_value_t = 120)]
    keep_alive: u16,
    /// The generator's TLS library.
    #[arg(long, value_enum, default_value_t = Client::Openssl)]
    client: Client,
    /// Keep each identity's TLS session tickets and resume with them
    /// (`--client rustls` only). Without it no connection resumes.
    #[arg(long)]
    resume: bool,
    /// Verify the broker's certificate chain at every connect, not only at
    /// an identity's first (`--client rustls`; OpenSSL always does).
    #[arg(long)]
    verify_server_every_connect: bool,
}

impl Common {
    fn client_name(&self) -> &'static str {
        match self.client {
            Client::Openssl => "openssl",
            Client::Rustls => "rustls",
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum Client {
    Openssl,
    Rustls,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create the service CA (so brokers can load it) and write `{certs}/bench-cafile.pem`
    /// (root + service CA) for mosquitto.
    Prepare {
        #[arg(long, default_value = "certs")]
        certs: PathBuf,
        #[arg(long, default_value = "svcA")]
        service: String,
        /// Then roll the root CA over once, as a fleet's does two years
        /// before its end, and issue the broker's certificate again: it
        /// carries the cross-certificate to the first root, which the
        /// generator still pins alone.
        #[arg(long)]
        roll_root: bool,
    },
    /// Run the fleetshift broker alone in this process, as `fleet-broker
    /// --config FILE` does, but with a Tokio runtime entered around
    /// `fleet_broker::start` (its listeners are bound with Tokio sockets).
    Broker {
        #[arg(long)]
        config: PathBuf,
    },
    /// Connect, wait for CONNACK, DISCONNECT and close, `count` times.
    Rate {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 3000)]
        count: usize,
        /// Distinct identities, split among the workers so that no two
        /// connections in flight share a client id. At least `concurrency`.
        #[arg(long, default_value_t = 400)]
        identities: usize,
        /// Round number, printed.
        #[arg(long, default_value_t = 0)]
        round: u32,
        /// Write one line per connect to this file: its number in the round,
        /// milliseconds from the round's start to its start, and its latency
        /// in milliseconds.
        #[arg(long)]
        latencies: Option<PathBuf>,
    },
    /// Open `count` connections with distinct identities and hold them;
    /// report the broker's resident memory per connection.
    Hold {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Seconds to wait after the last CONNACK before reading memory.
        #[arg(long, default_value_t = 3)]
        settle_secs: u64,
        /// After its CONNACK each connection subscribes to the four topics a
        /// device subscribes to (topics.md §2.3) and publishes one telemetry
        /// message, as a device online in its service does.
        #[arg(long)]
        subscribe: bool,
    },
    /// `bursts` times: `concurrency` connections (distinct identities)
    /// started at the same instant, each timed from that instant to its
    /// CONNACK; then all close, and the next burst starts `pause_ms` later.
    /// One more burst before them warms up and is not counted.
    Burst {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 20)]
        bursts: usize,
        #[arg(long, default_value_t = 300)]
        pause_ms: u64,
    },
}

struct Identity {
    id: String,
    leaf: X509,
    ca: X509,
    key: PKey<Private>,
    /// With `--client rustls`: this identity's client configuration.
    rustls: Option<Arc<rustls::ClientConfig>>,
}

/// A rustls client configuration presenting `ident`'s certificate: TLS 1.3
/// and X25519 only, as the OpenSSL generator negotiates.
fn rustls_config(
    c: &Common,
    leaf: &X509,
    ca: &X509,
    key: &PKey<Private>,
) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.kx_groups = vec![rustls::crypto::aws_lc_rs::kx_group::X25519];
    let provider = Arc::new(provider);
    let mut roots = rustls::RootCertStore::empty();
    let root = X509::from_pem(&std::fs::read(c.certs.join("root-ca.pem"))?)?;
    roots.add(CertificateDer::from(root.to_der()?))?;
    let webpki =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let verifier: Arc<dyn ServerCertVerifier> = if c.verify_server_every_connect {
        webpki
    } else {
        Arc::new(RememberedServer {
            webpki,
            verified: Mutex::new(None),
        })
    };
    let chain = vec![
        CertificateDer::from(leaf.to_der()?),
        CertificateDer::from(ca.to_der()?),
    ];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.private_key_to_pkcs8()?));
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    if !c.resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    Ok(Arc::new(config))
}

/// How long an identity trusts a broker chain it verified without
/// verifying it again.
const REMEMBER_SERVER: Duration = Duration::from_secs(60);

/// One identity's check of the broker certificate: webpki's, done at the
/// identity's first connect; later connects that present the same chain
/// for the same name within [`REMEMBER_SERVER`] are taken without a second
/// chain verification (one ECDSA P-256 verification, about a fifth of the
/// generator's CPU per connect). The broker's CertificateVerify signature,
/// which proves it holds the certificate's key, is verified on every
/// connect.
#[derive(Debug)]
struct RememberedServer {
    webpki: Arc<WebPkiServerVerifier>,
    verified: Mutex<Option<Verified>>,
}

/// The chain a [`RememberedServer`] verified last (end entity first), the
/// name it was verified for, and when.
#[derive(Debug)]
struct Verified {
    chain: Vec<Vec<u8>>,
    name: String,
    at: Instant,
}

impl ServerCertVerifier for RememberedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let chain: Vec<Vec<u8>> = std::iter::once(end_entity)
            .chain(intermediates)
            .map(|c| c.to_vec())
            .collect();
        let name = server_name.to_str().into_owned();
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(known) = verified.as_ref() {
            if known.chain == chain && known.name == name && known.at.elapsed() < REMEMBER_SERVER {
                return Ok(ServerCertVerified::assertion());
            }
        }
        let ok = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        *verified = Some(Verified {
            chain,
            name,
            at: Instant::now(),
        });
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// One generator connection, over either TLS library.
enum Conn {
    OpenSsl(SslStream<TcpStream>),
    Rustls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::OpenSsl(s) => s.get_ref(),
            Conn::Rustls(s) => &s.sock,
        }
    }

    /// Whether the handshake resumed a session.
    fn resumed(&self) -> bool {
        match self {
            Conn::OpenSsl(s) => s.ssl().session_reused(),
            Conn::Rustls(s) => s.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }
    }

    fn close(&mut self) {
        match self {
            Conn::OpenSsl(s) => {
                let _ = s.shutdown();
            }
            Conn::Rustls(s) => {
                s.conn.send_close_notify();
                let _ = s.flush();
            }
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::OpenSsl(s) => s.read(buf),
            Conn::Rustls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::OpenSsl(s) => s.write(buf),
            Conn::Rustls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::OpenSsl(s) => s.flush(),
            Conn::Rustls(s) => s.flush(),
        }
    }
}

fn issue(c: &Common, n: usize) -> anyhow::Result<Vec<Identity>> {
    let (certs, service, prefix) = (&c.certs, &c.service, &c.prefix);
    if c.resume && c.client != Client::Rustls {
        bail!("--resume needs --client rustls");
    }
    let pki = fleet_pki::Pki::open_or_create(certs)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("{prefix}-{i:06}");
        let key = fleet_protocol::crypto::generate_p256()?;
        let public = PKey::public_key_from_der(&key.public_key_to_der()?)?;
        let issued = pki.issue_device_certificate(&id, service, &public, 30)?;
        // As the manager grants an active device its service.
        fleet_pki::grants::write_grants(certs, &id, &[service.to_owned()])?;
        let ca = issued
            .chain
            .get(1)
            .cloned()
            .ok_or_else(|| anyhow!("chain without service CA"))?;
        let rustls = match c.client {
            Client::Rustls => Some(rustls_config(c, &issued.leaf, &ca, &key)?),
            Client::Openssl => None,
        };
        out.push(Identity {
            id,
            leaf: issued.leaf,
            ca,
            key,
            rustls,
        });
    }
    Ok(out)
}

fn connector(certs: &Path) -> anyhow::Result<SslConnector> {
    let mut b = SslConnector::builder(SslMethod::tls_client())?;
    b.set_min_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_max_proto_version(Some(SslVersion::TLS1_3))?;
    b.set_ca_file(certs.join("root-ca.pem"))
        .context("root-ca.pem")?;
    Ok(b.build())
}

/// TCP + TLS + CONNECT + CONNACK. Returns the open stream.
fn connect_one(
    conn: &SslConnector,
    addr: SocketAddr,
    ident: &Identity,
    keep_alive: u16,
) -> anyhow::Result<Conn> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(30)).context("tcp")?;
    tcp.set_nodelay(true)?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut tls = if let Some(config) = &ident.rustls {
        let name = ServerName::try_from("localhost")?;
        let client = rustls::ClientConnection::new(config.clone(), name)?;
        let mut stream = rustls::StreamOwned::new(client, tcp);
        // The whole handshake, so that a refusal shows as a TLS error.
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| anyhow!("tls: {e}"))?;
        }
        Conn::Rustls(Box::new(stream))
    } else {
        let mut cfg = conn.configure()?;
        cfg.set_certificate(&ident.leaf)?;
        cfg.add_chain_cert(ident.ca.clone())?;
        cfg.set_private_key(&ident.key)?;
        Conn::OpenSsl(
            cfg.connect("localhost", tcp)
                .map_err(|e| anyhow!("tls: {e}"))?,
        )
    };
    tls.write_all(&fleet_testkit::mqtt311_connect(&ident.id, keep_alive))
        .context("write CONNECT")?;
    let mut ack = [0u8; 4];
    tls.read_exact(&mut ack).context("read CONNACK")?;
    if ack[0] != 0x20 || ack[1] != 0x02 {
        bail!("not a CONNACK: {ack:02x?}");
    }
    if ack[3] != 0 {
        bail!("CONNACK return code {}", ack[3]);
    }
    Ok(tls)
}

/// DISCONNECT, then close.
fn hang_up(mut s: Conn) {
    let _ = s.write_all(&[0xE0, 0x00]);
    s.close();
}

/// Keeps the first 1,000 errors.
fn keep_error(errors: &Mutex<Vec<String>>, error: String) {
    let mut errs = errors.lock().unwrap_or_else(|p| p.into_inner());
    if errs.len() < 1000 {
        errs.push(error);
    }
}

fn proc_cpu_secs(pid: &str, clk_tck: f64) -> Option<f64> {
    proc_user_sys_secs(pid, clk_tck).map(|(user, sys)| user + sys)
}

/// A process's user and system CPU seconds.
fn proc_user_sys_secs(pid: &str, clk_tck: f64) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ut: f64 = f.get(11)?.parse().ok()?;
    let st: f64 = f.get(12)?.parse().ok()?;
    Some((ut / clk_tck, st / clk_tck))
}

fn proc_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn proc_threads(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("Threads:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// TcpExt ListenOverflows + ListenDrops from /proc/net/netstat (whole host
/// network namespace): SYNs dropped because an accept queue was full.
fn listen_drops() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let (Some(h), Some(v)) = (lines.next(), lines.next()) {
        if h.starts_with("TcpExt:") {
            let names: Vec<&str> = h.split_whitespace().collect();
            let vals: Vec<&str> = v.split_whitespace().collect();
            let get = |n: &str| -> Option<u64> {
                vals.get(names.iter().position(|x| *x == n)?)?.parse().ok()
            };
            return Some(get("ListenOverflows")? + get("ListenDrops")?);
        }
    }
    None
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

const CLK_TCK: f64 = 100.0;

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// One connect of a `rate` round: its number in the round, when it
/// started (ms after the round's start) and how long it took.
struct Timed {
    n: usize,
    at_ms: f64,
    ms: f64,
}

fn rate(
    c: Common,
    count: usize,
    identities: usize,
    round: u32,
    latencies: Option<PathBuf>,
) -> anyhow::Result<()> {
    let identities = identities.max(c.concurrency);
    let idents = Arc::new(issue(&c, identities)?);
    let conn = Arc::new(connector(&c.certs)?);
    let next = Arc::new(AtomicUsize::new(0));
    let resumed = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let load_before = loadavg();
    let pid = c.broker_pid.map(|p| p.to_string());
    let cpu0 = pid.as_deref().and_then(|p| proc_user_sys_secs(p, CLK_TCK));
    let self0 = proc_cpu_secs("self", CLK_TCK);
    let drops0 = listen_drops();
    let start = Instant::now();
    let mut workers = Vec::new();
    for w in 0..c.concurrency {
        let (idents, conn, next, errors, resumed) = (
            idents.clone(),
            conn.clone(),
            next.clone(),
            errors.clone(),
            resumed.clone(),
        );
        let (addr, ka, conc) = (c.addr, c.keep_alive, c.concurrency);
        workers.push(std::thread::spawn(move || {
            let mut lat = Vec::new();
            let mut k = 0usize;
            // Worker w owns identities w, w + conc, w + 2 conc, ...
            let mine: Vec<usize> = (w..idents.len()).step_by(conc).collect();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= count {
                    break;
                }
                let ident = &idents[mine[k % mine.len()]];
                k += 1;
                let t = Instant::now();
                match connect_one(&conn, addr, ident, ka) {
                    Ok(s) => {
                        lat.push(Timed {
                            n,
                            at_ms: t.duration_since(start).as_secs_f64() * 1000.0,
                            ms: t.elapsed().as_secs_f64() * 1000.0,
                        });
                        if s.resumed() {
                            resumed.fetch_add(1, Ordering::Relaxed);
                        }
                        hang_up(s);
                    }
                    Err(e) => keep_error(&errors, format!("{e:#}")),
                }
            }
            lat
        }));
    }
    let mut timed: Vec<Timed> = Vec::with_capacity(count);
    for w in workers {
        timed.extend(w.join().map_err(|_| anyhow!("worker panicked"))?);
    }
    let secs = start.elapsed().as_secs_f64();
    timed.sort_by_key(|t| t.n);
    if let Some(path) = latencies {
        let lines: String = timed
            .iter()
            .map(|t| format!("{} {:.3} {:.3}\n", t.n, t.at_ms, t.ms))
            .collect();
        std::fs::write(&path, lines).with_context(|| path.display().to_string())?;
    }
    // Steady state: the round's first `concurrency` connects start at once
    // (a burst, which `burst` measures), and its last ones finish with
    // fewer and fewer in flight. Connect n is counted when it is neither:
    // concurrency <= n < count - 2 x concurrency.
    let steady_range = c.concurrency..count.saturating_sub(2 * c.concurrency);
    let mut steady: Vec<f64> = timed
        .iter()
        .filter(|t| steady_range.contains(&t.n))
        .map(|t| t.ms)
        .collect();
    steady.sort_by(|a, b| a.total_cmp(b));
    let mut lat: Vec<f64> = timed.iter().map(|t| t.ms).collect();
    let cpu1 = pid.as_deref().and_then(|p| proc_user_sys_secs(p, CLK_TCK));
    let self1 = proc_cpu_secs("self", CLK_TCK);
    let drops1 = listen_drops();
    lat.sort_by(|a, b| a.total_cmp(b));
    let ok = lat.len();
    let errs = errors.lock().unwrap_or_else(|p| p.into_inner());
    let per_1000 = |secs: f64| round3(secs * 1000.0 / ok.max(1) as f64);
    let user_sys = cpu0.zip(cpu1).map(|(a, b)| (b.0 - a.0, b.1 - a.1));
    let broker_cpu = user_sys.map(|(user, sys)| user + sys);
    println!(
        "{}",
        json!({
            "mode": "rate", "target": c.target, "client": c.client_name(), "round": round, "count": count,
            "concurrency": c.concurrency, "identities": identities,
            "ok": ok, "failed": count - ok, "resumed": resumed.load(Ordering::Relaxed),
            "secs": round3(secs), "connects_per_sec": (ok as f64 / secs).round(),
            "p50_ms": round3(percentile(&lat, 50.0)), "p90_ms": round3(percentile(&lat, 90.0)),
            "p99_ms": round3(percentile(&lat, 99.0)), "max_ms": round3(percentile(&lat, 100.0)),
            "steady_count": steady.len(), "steady_p50_ms": round3(percentile(&steady, 50.0)),
            "steady_p99_ms": round3(percentile(&steady, 99.0)),
            "broker_cpu_s": broker_cpu.map(round3),
            "broker_cpu_s_per_1000": broker_cpu.map(per_1000),
            "broker_user_s_per_1000": user_sys.map(|(user, _)| per_1000(user)),
            "broker_sys_s_per_1000": user_sys.map(|(_, sys)| per_1000(sys)),
            "generator_cpu_s": self0.zip(self1).map(|(a, b)| round3(b - a)),
            "listen_drops": drops0.zip(drops1).map(|(a, b)| b - a),
            "loadavg_before": load_before, "loadavg_after": loadavg(),
            "first_errors": errs.iter().take(3).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

/// What an online device does after its CONNACK: SUBSCRIBE (QoS 1) to its
/// notice and reply topics, wait for the SUBACK, PUBLISH one telemetry
/// message (QoS 0).
fn act_as_device(tls: &mut Conn, service: &str, id: &str) -> anyhow::Result<()> {
    use fleet_protocol::{RequestKind, Route, Topic};
    let topics = [
        Route::ServiceChange(id.to_owned()),
        Route::Reply(RequestKind::Update, id.to_owned()),
        Route::Reply(RequestKind::Poll, id.to_owned()),
        Route::Reply(RequestKind::Status, id.to_owned()),
    ]
    .map(|route| Topic::in_tenant(service, route).to_string());
    let mut body = vec![0x00, 0x01];
    for t in &topics {
        body.extend_from_slice(&(t.len() as u16).to_be_bytes());
        body.extend_from_slice(t.as_bytes());
        body.push(1);
    }
    tls.write_all(&fleet_testkit::mqtt_frame(0x82, &body))
        .context("write SUBSCRIBE")?;
    let mut ack = [0u8; 8];
    tls.read_exact(&mut ack).context("read SUBACK")?;
    if ack[..4] != [0x90, 0x06, 0x00, 0x01] || ack[4..].iter().any(|&c| c > 1) {
        bail!("SUBACK refused: {ack:02x?}");
    }
    let topic = Topic::in_tenant(service, Route::Telemetry(id.to_owned())).to_string();
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(b"{\"t\":21.5}");
    tls.write_all(&fleet_testkit::mqtt_frame(0x30, &body))
        .context("write PUBLISH")?;
    Ok(())
}

fn hold(c: Common, count: usize, settle_secs: u64, subscribe: bool) -> anyhow::Result<()> {
    let t_issue = Instant::now();
    let idents = Arc::new(issue(&c, count)?);
    let issue_secs = t_issue.elapsed().as_secs_f64();
    let conn = Arc::new(connector(&c.certs)?);
    let next = Arc::new(AtomicUsize::new(0));
    let held: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::with_capacity(count)));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let pid = c.broker_pid;
    std::thread::sleep(Duration::from_secs(1));
    let rss0 = pid.and_then(proc_rss_kib);
    let cpu0 = pid.and_then(|p| proc_cpu_secs(&p.to_string(), CLK_TCK));
    let start = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..c.concurrency {
        let (idents, conn, next, held, errors) = (
            idents.clone(),
            conn.clone(),
            next.clone(),
            held.clone(),
            errors.clone(),
        );
        let (addr, ka, service) = (c.addr, c.keep_alive, c.service.clone());
        workers.push(std::thread::spawn(move || loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i >= idents.len() {
                break;
            }
            let connected = connect_one(&conn, addr, &idents[i], ka).and_then(|mut s| {
                if subscribe {
                    act_as_device(&mut s, &service, &idents[i].id)?;
                }
                Ok(s)
            });
            match connected {
                Ok(s) => held.lock().unwrap_or_else(|p| p.into_inner()).push(s),
                Err(e) => keep_error(&errors, format!("{e:#}")),
            }
        }));
    }
    for w in workers {
        w.join().map_err(|_| anyhow!("worker panicked"))?;
    }
    let connect_secs = start.elapsed().as_secs_f64();
    let cpu1 = pid.and_then(|p| proc_cpu_secs(&p.to_string(), CLK_TCK));
    std::thread::sleep(Duration::from_secs(settle_secs));
    let rss1 = pid.and_then(proc_rss_kib);
    let threads = pid.and_then(proc_threads);
    let ok = held.lock().unwrap_or_else(|p| p.into_inner()).len();
    // Are the held connections still up? Probe a sample: the broker must not have closed them.
    let alive = {
        let mut h = held.lock().unwrap_or_else(|p| p.into_inner());
        let mut alive = 0usize;
        for s in h.iter_mut().step_by((ok / 50).max(1)) {
            s.tcp().set_nonblocking(true)?;
            let mut b = [0u8; 1];
            // Pending bytes (a session ticket) or nothing yet: open. Ok(0): closed.
            match s.tcp().peek(&mut b) {
                Ok(n) if n > 0 => alive += 1,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => alive += 1,
                _ => {}
            }
            s.tcp().set_nonblocking(false)?;
        }
        alive
    };
    let errs = errors.lock().unwrap_or_else(|p| p.into_inner());
    let delta = rss0.zip(rss1).map(|(a, b)| b as f64 - a as f64);
    println!(
        "{}",
        json!({
            "mode": "hold", "target": c.target, "client": c.client_name(), "count": count, "ok": ok, "failed": count - ok,
            "issue_secs": round3(issue_secs), "connect_secs": round3(connect_secs),
            "connects_per_sec": (ok as f64 / connect_secs).round(),
            "broker_cpu_s_per_1000": cpu0.zip(cpu1).map(|(a, b)| round3((b - a) * 1000.0 / ok.max(1) as f64)),
            "rss_before_kib": rss0, "rss_after_kib": rss1,
            "rss_kib_per_conn": delta.map(|d| round3(d / ok.max(1) as f64)),
            "broker_threads": threads,
            "broker_maps": pid.and_then(|p| std::fs::read_to_string(format!("/proc/{p}/maps")).ok()).map(|m| m.lines().count()),
            "subscribe": subscribe,
            "sampled_alive": alive, "sampled": ok.div_ceil((ok / 50).max(1)),
            "loadavg": loadavg(),
            "first_errors": errs.iter().take(3).collect::<Vec<_>>(),
        })
    );
    drop(held);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Prepare {
            certs,
            service,
            roll_root,
        } => {
            let pki = fleet_pki::Pki::open_or_create(&certs)?;
            pki.service_ca(&service)?;
            if roll_root {
                pki.roll_root()?;
                pki.ensure_broker_cert(None)?;
            }
            let mut pem = Vec::new();
            for root in pki.root_generations()? {
                pem.extend(root.cert.to_pem()?);
            }
            for ca in pki.service_ca_generations(&service)? {
                pem.extend(ca.cert.to_pem()?);
            }
            let path = certs.join("bench-cafile.pem");
            std::fs::write(&path, pem)?;
            println!("{}", json!({"mode": "prepare", "cafile": path}));
            Ok(())
        }
        Cmd::Broker { config } => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "warn".into()),
                )
                .init();
            let config = fleet_broker::BrokerConfig::load(Some(&config))?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let running = {
                let _guard = rt.enter();
                fleet_broker::start(&config)?
            };
            let show = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
            println!(
                "broker ready: internal mqtt://{}  service mqtts://{}",
                running.internal_addr,
                show(running.service_addr)
            );
            loop {
                std::thread::park();
            }
        }
        Cmd::Rate {
            common,
            count,
            identities,
            round,
            latencies,
        } => rate(common, count, identities, round, latencies),
        Cmd::Hold {
            common,
            count,
            settle_secs,
            subscribe,
        } => hold(common, count, settle_secs, subscribe),
        Cmd::Burst {
            common,
            bursts,
            pause_ms,
        } => burst(common, bursts, Duration::from_millis(pause_ms)),
    }
}

fn burst(c: Common, bursts: usize, pause: Duration) -> anyhow::Result<()> {
    let n = c.concurrency;
    let idents = Arc::new(issue(&c, n)?);
    let conn = Arc::new(connector(&c.certs)?);
    // Burst 0 warms up (every certificate new to the broker, no ticket
    // yet) and is not counted. Each burst starts at a time set by the
    // previous one's last worker; every connect is timed from it, so a
    // worker that the scheduler wakes late is counted late.
    let base = Instant::now();
    let next_start = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let finish_line = Arc::new(std::sync::Barrier::new(n));
    let resumed = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::default();
    let load_before = loadavg();
    let pid = c.broker_pid.map(|p| p.to_string());
    let counted = Arc::new(std::sync::Barrier::new(n + 1));
    let mut workers = Vec::new();
    for w in 0..n {
        let (idents, conn, resumed, errors) = (
            idents.clone(),
            conn.clone(),
            resumed.clone(),
            errors.clone(),
        );
        let (next_start, finish_line, counted) =
            (next_start.clone(), finish_line.clone(), counted.clone());
        let (addr, ka) = (c.addr, c.keep_alive);
        workers.push(std::thread::spawn(move || {
            // (burst, ms from the burst's start to CONNACK) per connect that succeeded.
            let mut lat = Vec::new();
            for b in 0..=bursts {
                let start = base + Duration::from_nanos(next_start.load(Ordering::Acquire));
                std::thread::sleep(start.saturating_duration_since(Instant::now()));
                match connect_one(&conn, addr, &idents[w], ka) {
                    Ok(s) => {
                        if b > 0 {
                            lat.push((b, start.elapsed().as_secs_f64() * 1000.0));
                            if s.resumed() {
                                resumed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        hang_up(s);
                    }
                    Err(e) => keep_error(&errors, format!("burst {b}: {e:#}")),
                }
                if finish_line.wait().is_leader() {
                    let at = base.elapsed() + pause;
                    next_start.store(at.as_nanos() as u64, Ordering::Release);
                }
                // Everyone sees the next start before anyone reads it; after
                // the warm-up, the counters start.
                if b == 0 {
                    counted.wait();
                }
                finish_line.wait();
            }
            lat
        }));
    }
    counted.wait();
    let cpu0 = pid.as_deref().and_then(|p| proc_user_sys_secs(p, CLK_TCK));
    let self0 = proc_cpu_secs("self", CLK_TCK);
    let drops0 = listen_drops();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().map_err(|_| anyhow!("worker panicked"))?);
    }
    let cpu1 = pid.as_deref().and_then(|p| proc_user_sys_secs(p, CLK_TCK));
    let self1 = proc_cpu_secs("self", CLK_TCK);
    let drops1 = listen_drops();
    let ok = all.len();
    // Each burst's last CONNACK, from its start; per-burst p99 too.
    let per_burst: Vec<(f64, f64)> = (1..=bursts)
        .map(|b| {
            let mut l: Vec<f64> = all
                .iter()
                .filter(|(burst, _)| *burst == b)
                .map(|(_, ms)| *ms)
                .collect();
            l.sort_by(|a, b| a.total_cmp(b));
            (percentile(&l, 100.0), percentile(&l, 99.0))
        })
        .collect();
    let mut spans: Vec<f64> = per_burst.iter().map(|(last, _)| *last).collect();
    spans.sort_by(|a, b| a.total_cmp(b));
    let mut lat: Vec<f64> = all.into_iter().map(|(_, ms)| ms).collect();
    lat.sort_by(|a, b| a.total_cmp(b));
    let errs = errors.lock().unwrap_or_else(|p| p.into_inner());
    let per_1000 = |secs: f64| round3(secs * 1000.0 / ok.max(1) as f64);
    let user_sys = cpu0.zip(cpu1).map(|(a, b)| (b.0 - a.0, b.1 - a.1));
    println!(
        "{}",
        json!({
            "mode": "burst", "target": c.target, "client": c.client_name(), "bursts": bursts,
            "concurrency": n, "ok": ok, "failed": bursts * n - ok,
            "resumed": resumed.load(Ordering::Relaxed),
            "p50_ms": round3(percentile(&lat, 50.0)), "p90_ms": round3(percentile(&lat, 90.0)),
            "p99_ms": round3(percentile(&lat, 99.0)), "max_ms": round3(percentile(&lat, 100.0)),
            "burst_ms_median": round3(percentile(&spans, 50.0)),
            "burst_last_ms": per_burst.iter().map(|(last, _)| round3(*last)).collect::<Vec<_>>(),
            "burst_p99_ms": per_burst.iter().map(|(_, p99)| round3(*p99)).collect::<Vec<_>>(),
            "broker_cpu_s_per_1000": user_sys.map(|(u, s)| per_1000(u + s)),
            "broker_user_s_per_1000": user_sys.map(|(u, _)| per_1000(u)),
            "broker_sys_s_per_1000": user_sys.map(|(_, s)| per_1000(s)),
            "generator_cpu_s": self0.zip(self1).map(|(a, b)| round3(b - a)),
            "listen_drops": drops0.zip(drops1).map(|(a, b)| b - a),
            "loadavg_before": load_before, "loadavg_after": loadavg(),
            "first_errors": errs.iter().take(3).collect::<Vec<_>>(),
        })
    );
    Ok(())
}

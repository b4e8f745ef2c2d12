//! Bootstrap request flood (`topics.md` §5.4): many plain MQTT 3.1.1
//! connections, each under a device id no one registered, publish signed
//! `activate` requests at a steady pace on the broker's plain bootstrap
//! listener (`bootstrap_plain_listen`), and count the manager's replies by
//! status. `scripts/bench-flood` runs it against a manager with its
//! embedded broker while a registered device polls and another activates.
//!
//! ```sh
//! cargo run --release -p fleet-testkit --example request_flood -- \
//!     --addr 127.0.0.1:1884 --connections 1100 --rate 18 --duration 60 --csv flood.csv
//! ```
//!
//! Connection `n` has the device id `{prefix}-{n}`, subscribes to its
//! `activate` reply topic at QoS 1 and acknowledges what it gets. The
//! connections take the source addresses 127.0.0.`src_first` to
//! `src_last` in turn (any 127.0.0.x works on Linux loopback), as a flood
//! from many hosts would: from one address, the broker's per-source limit
//! (`bootstrap_publishes_per_sec_per_source`, 500/s) would be measured
//! instead of the manager. `--rate` stays below `publishes_per_sec_per_device`
//! (20/s) or the broker closes the connections (`connections_lost`). A
//! connection that fails or is closed tries again after 1 s.
//!
//! Each connection sends `--payloads` requests in turn, each with a fresh
//! nonce and signed with the connection's own P-256 key, all signed before
//! the flood starts, so that the generator spends its share of the CPU on
//! sending. The manager refuses an unregistered id (`unknown_device`)
//! before it looks at the signature or the nonce (§5.3), so a repeated
//! request costs it as much as a new one.
//!
//! Prints one JSON line on stdout at the end, progress on stderr every
//! 10 s, and with `--csv` one row per second: per-second counts of
//! requests sent, PUBACKs, replies and replies by status, with the
//! connections up and the failure totals.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use fleet_protocol::{
    crypto, ActivateRequest, Envelope, Kind, Reply, RequestKind, Route, Status, Topic,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::{sleep, timeout, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest wait for the broker: connect, CONNACK and SUBACK, one write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Pause before a connection that failed or was closed tries again.
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// Largest packet taken from the broker; a reply is a few hundred bytes.
const MAX_PACKET: usize = 64 * 1024;
/// MQTT keep-alive asked for. Each connection publishes at least every
/// 10 s (`--rate` ≥ 0.1), so it needs no PINGREQ.
const KEEP_ALIVE_SECS: u16 = 60;
/// Reply counts by status: one slot per known code, the last for the rest.
const STATUS_SLOTS: usize = Status::KNOWN.len() + 1;
/// Distinct connection errors kept for the summary.
const ERRORS_KEPT: usize = 8;

#[derive(Parser)]
#[command(
    name = "request_flood",
    about = "flood a broker's plain bootstrap listener with activate requests from unregistered ids"
)]
struct Args {
    /// The broker's plain bootstrap listener (`bootstrap_plain_listen`).
    #[arg(long)]
    addr: SocketAddr,
    /// Connections, each with a device id of its own.
    #[arg(long, default_value_t = 1100)]
    connections: usize,
    /// Requests per second on each connection (0.1 to 1000).
    #[arg(long, default_value_t = 18.0)]
    rate: f64,
    /// Seconds of sending, from the start of the first connection.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Seconds over which the connections start, evenly spread.
    #[arg(long, default_value_t = 10.0)]
    ramp: f64,
    /// Seconds to go on taking replies after sending stops (under 60).
    #[arg(long, default_value_t = 2.0)]
    tail: f64,
    /// Last octet of the first source address 127.0.0.x.
    #[arg(long, default_value_t = 2)]
    src_first: u8,
    /// Last octet of the last source address 127.0.0.x.
    #[arg(long, default_value_t = 200)]
    src_last: u8,
    /// Requests signed per connection and sent in turn.
    #[arg(long, default_value_t = 16)]
    payloads: usize,
    /// Device id prefix; ids are `{prefix}-{n}`.
    #[arg(long, default_value = "flood")]
    prefix: String,
    /// Tokio worker threads; the generator shares the machine with the
    /// manager it floods.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Write one row per second to this file.
    #[arg(long)]
    csv: Option<PathBuf>,
}

/// One flooding client, ready to connect.
struct Flooder {
    source: Ipv4Addr,
    /// CONNECT and SUBSCRIBE, sent together.
    hello: Vec<u8>,
    /// Signed requests as PUBLISH packets, packet id 0 at `packet_id_at`.
    requests: Vec<Vec<u8>>,
    packet_id_at: usize,
}

impl Flooder {
    fn new(device_id: String, source: Ipv4Addr, payloads: usize) -> anyhow::Result<Flooder> {
        let request = Topic::bootstrap(Route::Request(RequestKind::Activate, device_id.clone()));
        let reply = Topic::bootstrap(Route::Reply(RequestKind::Activate, device_id.clone()));
        let mut hello = fleet_testkit::mqtt311_connect(&device_id, KEEP_ALIVE_SECS);
        let reply = reply.to_string();
        let mut subscribe = vec![0x00, 0x01];
        subscribe.extend_from_slice(&(reply.len() as u16).to_be_bytes());
        subscribe.extend_from_slice(reply.as_bytes());
        subscribe.push(1);
        hello.extend(fleet_testkit::mqtt_frame(0x82, &subscribe));

        let key = crypto::generate_p256()?;
        let eph = crypto::public_point(&*crypto::generate_p256()?)?;
        let topic = request.to_string();
        let mut requests = Vec::with_capacity(payloads);
        let mut packet_id_at = 0;
        for _ in 0..payloads {
            let body = ActivateRequest {
                device_id: device_id.clone(),
                service_id: None,
                nonce: crypto::random_bytes(16),
                ts: fleet_protocol::now_ms(),
                eph: eph.clone(),
            };
            let payload =
                Envelope::build(Kind::Activate, &body, |tbs| crypto::sign(&key, tbs))?.encode();
            let mut publish = (topic.len() as u16).to_be_bytes().to_vec();
            publish.extend_from_slice(topic.as_bytes());
            publish.extend_from_slice(&[0, 0]);
            publish.extend_from_slice(&payload);
            let frame = fleet_testkit::mqtt_frame(0x32, &publish);
            packet_id_at = frame.len() - payload.len() - 2;
            requests.push(frame);
        }
        Ok(Flooder {
            source,
            hello,
            requests,
            packet_id_at,
        })
    }
}

#[derive(Default)]
struct Counters {
    /// Connections past CONNACK and SUBACK (a gauge).
    connected: AtomicU64,
    /// Connects or handshakes that failed or timed out.
    connect_failures: AtomicU64,
    /// Established connections closed before the end, by the broker or
    /// because a write stalled.
    connections_lost: AtomicU64,
    sent: AtomicU64,
    pubacks: AtomicU64,
    replies: AtomicU64,
    by_status: [AtomicU64; STATUS_SLOTS],
    /// Replies whose payload is not an envelope with a reply body.
    undecodable: AtomicU64,
}

/// The counters at one moment.
#[derive(Clone, Copy, Default)]
struct Snapshot {
    connected: u64,
    connect_failures: u64,
    connections_lost: u64,
    sent: u64,
    pubacks: u64,
    replies: u64,
    by_status: [u64; STATUS_SLOTS],
    undecodable: u64,
}

impl Counters {
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            connected: self.connected.load(Relaxed),
            connect_failures: self.connect_failures.load(Relaxed),
            connections_lost: self.connections_lost.load(Relaxed),
            sent: self.sent.load(Relaxed),
            pubacks: self.pubacks.load(Relaxed),
            replies: self.replies.load(Relaxed),
            by_status: std::array::from_fn(|i| self.by_status[i].load(Relaxed)),
            undecodable: self.undecodable.load(Relaxed),
        }
    }

    fn count_reply(&self, payload: &[u8]) {
        self.replies.fetch_add(1, Relaxed);
        match Envelope::decode(payload).and_then(|e| e.body::<Reply>()) {
            Ok(reply) => {
                self.by_status[status_slot(reply.status)].fetch_add(1, Relaxed);
            }
            Err(_) => {
                self.undecodable.fetch_add(1, Relaxed);
            }
        }
    }
}

fn status_slot(status: Status) -> usize {
    Status::KNOWN
        .iter()
        .position(|s| *s == status)
        .unwrap_or(STATUS_SLOTS - 1)
}

fn status_name(slot: usize) -> &'static str {
    Status::KNOWN.get(slot).map_or("unknown", |s| s.name())
}

/// What every connection shares.
struct Shared {
    addr: SocketAddr,
    rate: f64,
    counters: Counters,
    errors: Mutex<Vec<String>>,
    /// Cancelled when sending stops.
    sending: CancellationToken,
    /// Cancelled when the tail is over: connections say DISCONNECT and close.
    done: CancellationToken,
}

impl Shared {
    fn keep_error(&self, error: &anyhow::Error) {
        let error = format!("{error:#}");
        let mut errors = self.errors.lock().unwrap_or_else(|e| e.into_inner());
        if errors.len() < ERRORS_KEPT && !errors.contains(&error) {
            errors.push(error);
        }
    }
}

/// A packet from the broker, as far as the flood cares.
enum Packet<'a> {
    ConnAck { code: u8 },
    SubAck { granted: u8 },
    PubAck,
    Publish { id: Option<u16>, payload: &'a [u8] },
    Other,
}

/// The first packet in `buf` and its length, or `None` while incomplete.
/// The remaining length is checked against [`MAX_PACKET`] before the body
/// is waited for.
fn next_packet(buf: &[u8]) -> anyhow::Result<Option<(Packet<'_>, usize)>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let mut len = 0usize;
    let mut at = 1;
    loop {
        ensure!(at <= 4, "remaining length over four bytes");
        let Some(&byte) = buf.get(at) else {
            return Ok(None);
        };
        len |= usize::from(byte & 0x7f) << (7 * (at - 1));
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
    }
    ensure!(len <= MAX_PACKET, "packet of {len} bytes from the broker");
    let Some(body) = buf.get(at..at + len) else {
        return Ok(None);
    };
    let short = || format!("short packet {first:#04x}");
    let packet = match first >> 4 {
        2 => Packet::ConnAck {
            code: *body.get(1).with_context(short)?,
        },
        9 => Packet::SubAck {
            granted: *body.get(2).with_context(short)?,
        },
        4 => Packet::PubAck,
        3 => {
            let topic_len = usize::from(u16::from_be_bytes([
                *body.first().with_context(short)?,
                *body.get(1).with_context(short)?,
            ]));
            let mut rest = body.get(2 + topic_len..).with_context(short)?;
            let id = if (first >> 1) & 3 > 0 {
                let (id, payload) = rest.split_first_chunk::<2>().with_context(short)?;
                rest = payload;
                Some(u16::from_be_bytes(*id))
            } else {
                None
            };
            Packet::Publish { id, payload: rest }
        }
        _ => Packet::Other,
    };
    Ok(Some((packet, at + len)))
}

/// Takes every complete packet from the front of `inbox`.
fn take_packets(
    inbox: &mut Vec<u8>,
    mut on_packet: impl FnMut(Packet<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut used = 0;
    while let Some((packet, len)) = next_packet(&inbox[used..])? {
        on_packet(packet)?;
        used += len;
    }
    inbox.drain(..used);
    Ok(())
}

/// Replies counted, PUBACKs for them added to `acks`.
fn on_steady_packet(packet: Packet<'_>, counters: &Counters, acks: &mut Vec<u8>) {
    match packet {
        Packet::PubAck => {
            counters.pubacks.fetch_add(1, Relaxed);
        }
        Packet::Publish { id, payload } => {
            counters.count_reply(payload);
            if let Some(id) = id {
                acks.extend_from_slice(&[0x40, 0x02]);
                acks.extend_from_slice(&id.to_be_bytes());
            }
        }
        Packet::ConnAck { .. } | Packet::SubAck { .. } | Packet::Other => {}
    }
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) -> anyhow::Result<()> {
    timeout(IO_TIMEOUT, stream.write_all(bytes))
        .await
        .context("write stalled")?
        .context("write")
}

/// A connection past CONNACK and SUBACK.
struct Session {
    stream: TcpStream,
    /// Bytes read and not yet taken as packets.
    inbox: Vec<u8>,
    /// PUBACKs owed for replies that came with the handshake.
    acks: Vec<u8>,
}

/// Connects from the flooder's source address, sends CONNECT and SUBSCRIBE
/// and waits for CONNACK and SUBACK.
async fn open(flooder: &Flooder, shared: &Shared) -> anyhow::Result<Session> {
    let socket = TcpSocket::new_v4()?;
    socket
        .bind(SocketAddr::from((flooder.source, 0)))
        .with_context(|| format!("bind {}", flooder.source))?;
    let mut stream = socket.connect(shared.addr).await.context("connect")?;
    stream.set_nodelay(true)?;
    stream
        .write_all(&flooder.hello)
        .await
        .context("write CONNECT")?;
    let mut inbox = Vec::with_capacity(4096);
    let mut acks = Vec::new();
    let (mut connack, mut suback) = (false, false);
    while !(connack && suback) {
        if stream.read_buf(&mut inbox).await? == 0 {
            bail!("closed before CONNACK and SUBACK");
        }
        take_packets(&mut inbox, |packet| {
            match packet {
                Packet::ConnAck { code: 0 } => connack = true,
                Packet::ConnAck { code } => bail!("CONNACK refused: {code}"),
                Packet::SubAck { granted: 0x80 } => bail!("SUBACK refused"),
                Packet::SubAck { .. } => suback = true,
                other => on_steady_packet(other, &shared.counters, &mut acks),
            }
            Ok(())
        })?;
    }
    Ok(Session {
        stream,
        inbox,
        acks,
    })
}

/// Sends requests at the paced rate and takes replies until sending stops,
/// then takes replies until the tail is over.
async fn exchange(
    flooder: &Flooder,
    shared: &Shared,
    session: Session,
    next_request: &mut usize,
) -> anyhow::Result<()> {
    let Session {
        mut stream,
        mut inbox,
        mut acks,
    } = session;
    let counters = &shared.counters;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / shared.rate));
    // A generator that falls behind sends less, rather than in bursts.
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // PUBACKs owed go out with the next request: one write instead of two.
    let mut out = Vec::new();
    let mut packet_id: u16 = 1;
    let mut sending = true;
    loop {
        inbox.reserve(4096);
        tokio::select! {
            _ = shared.done.cancelled() => break,
            _ = shared.sending.cancelled(), if sending => {
                sending = false;
                if !acks.is_empty() {
                    write(&mut stream, &acks).await?;
                    acks.clear();
                }
            }
            _ = tick.tick(), if sending => {
                out.clear();
                out.append(&mut acks);
                let at = out.len() + flooder.packet_id_at;
                out.extend_from_slice(&flooder.requests[*next_request % flooder.requests.len()]);
                out[at..at + 2].copy_from_slice(&packet_id.to_be_bytes());
                write(&mut stream, &out).await?;
                counters.sent.fetch_add(1, Relaxed);
                *next_request += 1;
                packet_id = packet_id.checked_add(1).unwrap_or(1);
            }
            read = stream.read_buf(&mut inbox) => {
                if read.context("read")? == 0 {
                    bail!("closed by the broker");
                }
                take_packets(&mut inbox, |packet| {
                    on_steady_packet(packet, counters, &mut acks);
                    Ok(())
                })?;
                if !sending && !acks.is_empty() {
                    write(&mut stream, &acks).await?;
                    acks.clear();
                }
            }
        }
    }
    // DISCONNECT; the broker may already be gone.
    let _ = write(&mut stream, &[0xe0, 0x00]).await;
    Ok(())
}

/// One connection after another until the tail is over.
async fn run_flooder(flooder: Flooder, shared: Arc<Shared>) {
    let mut next_request = 0;
    while !shared.sending.is_cancelled() {
        let failure = match timeout(IO_TIMEOUT, open(&flooder, &shared)).await {
            Err(_) => Some(anyhow::anyhow!(
                "no CONNACK and SUBACK within {IO_TIMEOUT:?}"
            )),
            Ok(Err(err)) => Some(err),
            Ok(Ok(session)) => {
                shared.counters.connected.fetch_add(1, Relaxed);
                let result = exchange(&flooder, &shared, session, &mut next_request).await;
                shared.counters.connected.fetch_sub(1, Relaxed);
                match result {
                    Ok(()) => return,
                    Err(err) => {
                        shared.counters.connections_lost.fetch_add(1, Relaxed);
                        shared.keep_error(&err.context("connection lost"));
                        None
                    }
                }
            }
        };
        if let Some(err) = failure {
            shared.counters.connect_failures.fetch_add(1, Relaxed);
            shared.keep_error(&err.context("connect failed"));
        }
        tokio::select! {
            _ = shared.sending.cancelled() => {}
            _ = sleep(RETRY_PAUSE) => {}
        }
    }
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// Once a second: a CSV row (with `--csv`), and progress on stderr every
/// 10 s. Returns the most connections seen up at once.
async fn report(
    shared: Arc<Shared>,
    mut csv: Option<std::io::BufWriter<std::fs::File>>,
    start: Instant,
    stop: CancellationToken,
) -> anyhow::Result<u64> {
    let (ok, unknown_device, busy) = (
        status_slot(Status::Ok),
        status_slot(Status::UnknownDevice),
        status_slot(Status::Busy),
    );
    if let Some(csv) = &mut csv {
        writeln!(
            csv,
            "unix_ms,t_s,connected,sent,pubacks,replies,ok,unknown_device,busy,other_status,\
             undecodable,connect_failures_total,connections_lost_total"
        )?;
    }
    let mut peak = 0;
    let mut before = Snapshot::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        let last = tokio::select! {
            _ = tick.tick() => false,
            _ = stop.cancelled() => true,
        };
        let now = shared.counters.snapshot();
        peak = peak.max(now.connected);
        let status: [u64; STATUS_SLOTS] =
            std::array::from_fn(|i| now.by_status[i] - before.by_status[i]);
        let other: u64 = (0..STATUS_SLOTS)
            .filter(|i| ![ok, unknown_device, busy].contains(i))
            .map(|i| status[i])
            .sum();
        let t = start.elapsed().as_secs_f64();
        if let Some(csv) = &mut csv {
            writeln!(
                csv,
                "{},{t:.1},{},{},{},{},{},{},{},{other},{},{},{}",
                unix_ms(),
                now.connected,
                now.sent - before.sent,
                now.pubacks - before.pubacks,
                now.replies - before.replies,
                status[ok],
                status[unknown_device],
                status[busy],
                now.undecodable - before.undecodable,
                now.connect_failures,
                now.connections_lost,
            )?;
            csv.flush()?;
        }
        if t.round() as u64 % 10 == 0 && !last {
            eprintln!(
                "t={t:.0}s connected={} sent/s={} replies/s={} (unknown_device {}, busy {}, other {other})",
                now.connected,
                now.sent - before.sent,
                now.replies - before.replies,
                status[unknown_device],
                status[busy],
            );
        }
        before = now;
        if last {
            return Ok(peak);
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn interrupted() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn flood(args: Args, flooders: Vec<Flooder>) -> anyhow::Result<serde_json::Value> {
    let csv = match &args.csv {
        Some(path) => Some(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => None,
    };
    let shared = Arc::new(Shared {
        addr: args.addr,
        rate: args.rate,
        counters: Counters::default(),
        errors: Mutex::new(Vec::new()),
        sending: CancellationToken::new(),
        done: CancellationToken::new(),
    });
    let start = Instant::now();
    let start_unix_ms = unix_ms();
    let reporting = CancellationToken::new();
    let reporter = tokio::spawn(report(shared.clone(), csv, start, reporting.clone()));
    let tracker = TaskTracker::new();
    let count = flooders.len();
    for (n, flooder) in flooders.into_iter().enumerate() {
        let shared = shared.clone();
        let delay = Duration::from_secs_f64(args.ramp * n as f64 / count as f64);
        tracker.spawn(async move {
            tokio::select! {
                _ = shared.sending.cancelled() => return,
                _ = sleep(delay) => {}
            }
            run_flooder(flooder, shared).await;
        });
    }
    tracker.close();

    let interrupted = tokio::select! {
        _ = sleep(Duration::from_secs_f64(args.duration)) => false,
        _ = interrupted() => true,
    };
    shared.sending.cancel();
    let sending_s = start.elapsed().as_secs_f64();
    let stop_unix_ms = unix_ms();
    if !interrupted {
        sleep(Duration::from_secs_f64(args.tail)).await;
    }
    shared.done.cancel();
    // Every wait in a connection is bounded by IO_TIMEOUT.
    let stragglers = timeout(IO_TIMEOUT + Duration::from_secs(1), tracker.wait())
        .await
        .is_err();
    reporting.cancel();
    let peak = reporter.await.context("reporter")??;

    let total = shared.counters.snapshot();
    let by_status: serde_json::Map<String, serde_json::Value> = (0..STATUS_SLOTS)
        .filter(|&i| total.by_status[i] > 0)
        .map(|i| (status_name(i).to_owned(), total.by_status[i].into()))
        .collect();
    let per_s = |n: u64| (n as f64 / sending_s).round();
    let errors = shared
        .errors
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(json!({
        "addr": args.addr.to_string(),
        "connections": count,
        "sources": format!("127.0.0.{}-{}", args.src_first, args.src_last),
        "rate_per_connection": args.rate,
        "start_unix_ms": start_unix_ms,
        "stop_unix_ms": stop_unix_ms,
        "sending_s": (sending_s * 10.0).round() / 10.0,
        "interrupted": interrupted,
        "connected_peak": peak,
        "connect_failures": total.connect_failures,
        "connections_lost": total.connections_lost,
        "sent": total.sent,
        "sent_per_s": per_s(total.sent),
        "pubacks": total.pubacks,
        "replies": total.replies,
        "replies_per_s": per_s(total.replies),
        "replies_by_status": by_status,
        "undecodable": total.undecodable,
        "unanswered": total.sent.saturating_sub(total.replies),
        "connections_not_closed_in_time": stragglers,
        "errors": errors,
    }))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.connections > 0, "--connections must be at least 1");
    ensure!(
        (0.1..=1000.0).contains(&args.rate),
        "--rate must be 0.1 to 1000 requests per second"
    );
    ensure!(
        args.duration > 0.0 && args.ramp >= 0.0,
        "--duration must be positive, --ramp not negative"
    );
    ensure!(
        (0.0..60.0).contains(&args.tail),
        "--tail must be 0 to 60 s (the keep-alive)"
    );
    ensure!(
        (1..=args.src_last).contains(&args.src_first),
        "--src-first must be 1 to --src-last"
    );
    ensure!(args.payloads > 0, "--payloads must be at least 1");
    ensure!(args.threads > 0, "--threads must be at least 1");
    let last_id = format!("{}-{}", args.prefix, args.connections - 1);
    fleet_protocol::topic::validate_device_id(&last_id)
        .with_context(|| format!("--prefix gives the device id {last_id:?}"))?;

    let started = Instant::now();
    let sources = usize::from(args.src_last - args.src_first) + 1;
    let flooders = (0..args.connections)
        .map(|n| {
            let source = Ipv4Addr::new(127, 0, 0, args.src_first + (n % sources) as u8);
            Flooder::new(format!("{}-{n}", args.prefix), source, args.payloads)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    eprintln!(
        "signed {} requests (PUBLISH packets of {} bytes) in {:.1} s; {} connections from {sources} source addresses",
        args.connections * args.payloads,
        flooders[0].requests[0].len(),
        started.elapsed().as_secs_f64(),
        args.connections,
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()?;
    let summary = runtime.block_on(flood(args, flooders))?;
    println!("{summary}");
    Ok(())
}

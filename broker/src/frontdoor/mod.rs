//! The front door: fleetshift's own device-facing listeners in front of
//! rumqttd's router. rumqttd routes; this module decides who connects and
//! what each connection may touch.
//!
//! Listeners (each optional, all from [`crate::BrokerConfig`]):
//! - **bootstrap TLS**: server-authenticated TLS; a device acts only under
//!   the device id it connected with ([`grants::Identity::Bootstrap`]);
//! - **bootstrap plain**: the same without TLS, for development only;
//! - **service**: mutual TLS; the certificate is the identity (CN = device
//!   id, O = service id), the client id must be the CN, a revoked
//!   certificate fails the handshake and its live sessions are cut, and
//!   so are an expired one's;
//! - **internal**: loopback, username and secret, for the manager.
//!
//! Every connection is handed to the router in process
//! ([`rumqttd::local::LinkBuilder`]), so it costs one file descriptor.
//!
//! # Layout
//! - [`grants`]: identities and their publish/subscribe grants.
//! - [`trust`]: the listeners' TLS configurations, the service listener's
//!   client verifier, CRLs and revocation.
//! - [`der`]: the names and serial of a verified client certificate.
//! - [`session`]: one MQTT connection, CONNECT to close.
//! - [`codec`]: MQTT 3.1.1 and 5 on the wire, and how each spells a refusal.

pub mod codec;
/// Certificate fields read from DER ([`fleet_protocol::certificate`]).
pub use fleet_protocol::certificate as der;
pub mod evict;
pub mod grants;
pub mod hold;
pub mod session;
pub mod shown;
pub mod trust;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use rustls::server::Acceptor;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_rustls::LazyConfigAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use trust::{CertIdentity, Trust};

/// Counters of what the front door refused and accepted.
#[derive(Debug, Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub live: AtomicU64,
    pub handshake_failures: AtomicU64,
    /// Connections closed to make room for newer ones: before their
    /// handshake finished, while their client owed the next message
    /// (`max_pending_handshakes`, a full listener), or bootstrap sessions
    /// idle past `bootstrap_session_min_age_ms` on full bootstrap
    /// listeners.
    pub evicted: AtomicU64,
    /// Service-listener handshakes that resumed from a session ticket.
    pub resumed: AtomicU64,
    /// Client chains not verified again: the same leaf's chain had
    /// verified under the CAs loaded now.
    pub chains_recalled: AtomicU64,
    /// Session tickets not given: the certificate left its last ones
    /// unused.
    pub tickets_withheld: AtomicU64,
    /// Session tickets made at a handshake's end and never written: the
    /// connection ended before its first write (the CONNACK).
    pub tickets_unsent: AtomicU64,
    /// Client certificates valid in themselves whose (device, service) the
    /// registry does not grant.
    pub not_granted: AtomicU64,
    pub refused_connects: AtomicU64,
    pub refused_publishes: AtomicU64,
    pub refused_subscribes: AtomicU64,
    pub rate_limited: AtomicU64,
    /// Device connections closed for publishing faster than
    /// `publishes_per_sec_per_device`.
    pub publish_rate_exceeded: AtomicU64,
    pub over_capacity: AtomicU64,
    pub revoked_cuts: AtomicU64,
    /// Live sessions closed because their certificate expired.
    pub expired_cuts: AtomicU64,
    /// Sessions the router keeps with no connection, and those ended when
    /// their expiry passed.
    pub sessions_kept: AtomicU64,
    pub sessions_expired: AtomicU64,
    /// PUBLISHes not sent to a client because they exceed the Maximum
    /// Packet Size it announced (MQTT 5).
    pub outgoing_discarded: AtomicU64,
    /// Connections closed because the client stopped taking data.
    pub write_stalls: AtomicU64,
    /// Bytes of messages (topic and payload) the router's logs hold:
    /// those some subscriber has still to read, and up to a trim's worth
    /// more (the router's).
    pub router_log_bytes: Arc<AtomicU64>,
    /// Subscription filters the router holds: those some connection or
    /// saved session subscribes to, and those a trim has yet to find
    /// without one.
    pub router_filters: Arc<AtomicU64>,
    /// Messages subscribers never got: the router keeps at most 4 MiB per
    /// subscription filter, and drops the oldest past it, read or not.
    pub router_skipped: Arc<AtomicU64>,
}

impl Metrics {
    pub fn get(&self, counter: fn(&Metrics) -> &AtomicU64) -> u64 {
        counter(self).load(Ordering::Relaxed)
    }
}

/// Limits every listener applies.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub max_bootstrap_connections: usize,
    pub max_internal_connections: usize,
    pub max_packet_size: usize,
    pub max_bootstrap_packet_size: usize,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    /// Most connections held whose TLS handshake has not finished (on the
    /// plain bootstrap listener: that have sent nothing).
    pub max_pending: usize,
    /// The youngest handshake [`Limits::max_pending`] may close.
    pub pending_min_age: Duration,
    /// See `bootstrap_session_min_age_ms` in the broker's configuration.
    pub bootstrap_session_min_age: Duration,
    /// Longest silence allowed when a client asks for no keep-alive, and the
    /// cap on 1.5 × the keep-alive it asks for.
    pub max_idle: Duration,
    /// Longest a session is kept with no connection: an MQTT 3.1.1
    /// session with clean session 0, and the cap on an MQTT 5 Session
    /// Expiry Interval.
    pub max_session_expiry: Duration,
    /// New connections per second from one source address, and the burst.
    pub connects_per_sec_per_source: f64,
    pub connect_burst_per_source: f64,
    pub publishes_per_sec_per_device: f64,
    pub publish_burst_per_device: f64,
    pub bootstrap_publishes_per_sec_per_source: f64,
    pub bootstrap_publish_burst_per_source: f64,
}

/// Takes a token from `key`'s bucket in `buckets` (full when new); buckets
/// idle for a minute are dropped once there are many.
fn take_from(buckets: &Mutex<HashMap<IpAddr, Bucket>>, key: IpAddr, rate: f64, burst: f64) -> bool {
    let mut map = buckets.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() > 100_000 {
        let now = tokio::time::Instant::now();
        map.retain(|_, b| now.duration_since(b.last) < Duration::from_secs(60));
    }
    map.entry(key)
        .or_insert_with(|| Bucket::full(rate, burst))
        .take()
}

/// A token bucket: `rate` tokens a second, at most `burst`.
pub(crate) struct Bucket {
    tokens: f64,
    last: tokio::time::Instant,
    rate: f64,
    burst: f64,
}

impl Bucket {
    pub(crate) fn full(rate: f64, burst: f64) -> Bucket {
        Bucket {
            tokens: burst,
            last: tokio::time::Instant::now(),
            rate,
            burst,
        }
    }

    /// Takes a token if there is one.
    pub(crate) fn take(&mut self) -> bool {
        self.take_leaving(0.0)
    }

    /// Takes a token if `kept` more are left after it.
    pub(crate) fn take_leaving(&mut self, kept: f64) -> bool {
        let now = tokio::time::Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 + kept {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The three halves of a router link: sender, receiver, the CONNACK.
pub type Link = (
    rumqttd::local::LinkTx,
    rumqttd::local::LinkRx,
    rumqttd::Notification,
);

pub use crate::router::LinkOpener;

/// State every connection shares.
pub struct Shared {
    pub link: LinkOpener,
    pub limits: Limits,
    pub metrics: Arc<Metrics>,
    /// Internal listener users: name → secret.
    pub internal_users: HashMap<String, String>,
    /// Device listeners' connections (`max_connections`).
    slots: Arc<Semaphore>,
    /// Of those, the bootstrap listeners' (`max_bootstrap_connections`).
    bootstrap_slots: Arc<Semaphore>,
    /// The internal listener's (`max_internal_connections`), apart.
    internal_slots: Arc<Semaphore>,
    next_connection: AtomicU64,
    /// Refused connections logged at WARN, 20 a second of each kind
    /// ([`Refused`]), so that a flood of one kind keeps the others in the
    /// log; the metrics count them all.
    refusals_logged: [Mutex<crate::log_pace::LogPace>; 3],
    rate: Mutex<HashMap<IpAddr, Bucket>>,
    /// Bootstrap PUBLISHes by source (`bootstrap_publishes_per_sec_per_source`).
    bootstrap_publishes: Mutex<HashMap<IpAddr, Bucket>>,
    /// Certified devices' publish paces (`publishes_per_sec_per_device`),
    /// by device id ([`Shared::device_pace`]).
    device_paces: Mutex<HashMap<String, Arc<Mutex<Bucket>>>>,
    /// Internal-listener connections that have not authenticated yet, by
    /// connection id (oldest first), each with the token that closes it.
    internal_unauthenticated: Mutex<std::collections::BTreeMap<u64, CancellationToken>>,
    /// Each session the router keeps past its connection, by router
    /// client id (see [`Kept`]).
    kept: Mutex<HashMap<String, Kept>>,
    /// Router client id → the connection that holds that session now.
    sessions: Mutex<HashMap<String, Holder>>,
    /// Router client id → its connections taken over while still running,
    /// until they end: one that ends after a newer connection has taken
    /// the session keeps nothing of it ([`Shared::keep_session`]). Locked
    /// after `sessions`.
    overtaken: Mutex<HashMap<String, Overtaken>>,
    /// The one router link delayed Wills are published through, opened
    /// when the first is due.
    /// With the packet id it last gave a Will (its answers are read and
    /// dropped by a task of its own).
    pub will_link: tokio::sync::Mutex<Option<(rumqttd::local::LinkTx, u16)>>,
    /// Serials of revoked certificates, kept by the service listener's
    /// [`Trust`] from the CRLs.
    pub revoked: Arc<RwLock<HashSet<String>>>,
    /// Connections whose handshake has not finished (see
    /// [`Limits::max_pending`]).
    pending: Mutex<evict::PendingSet>,
    /// Bootstrap sessions (after their handshake), each with the token that
    /// ends it, so that a full bootstrap listener can close one for a
    /// newcomer ([`room_for`]).
    bootstrap_sessions: Mutex<evict::PendingSet>,
    /// New connections waiting for a slot a pending connection was closed
    /// for ([`room_for`]); at most [`Limits::max_pending`].
    making_room: Arc<Semaphore>,
    /// Cancelled when the broker stops: every session is cut then.
    pub stopping: CancellationToken,
}

/// A connection counted among the pending ones until it drops.
struct Pending<'a> {
    shared: &'a Shared,
    source: IpAddr,
    id: u64,
    /// Cancelled when newer connections need its place.
    closing: CancellationToken,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(self.source, self.id);
    }
}

/// [`Shared::claim`] on `sessions`, locked.
fn claim_in(sessions: &mut HashMap<String, Holder>, router_id: &str, connection: u64) -> Claim {
    let ended = CancellationToken::new();
    let previous = sessions.insert(
        router_id.to_string(),
        Holder {
            connection,
            taken: CancellationToken::new(),
            ended: ended.clone(),
        },
    );
    Claim {
        ended: ended.drop_guard(),
        previous: previous.map(|holder| {
            holder.taken.cancel();
            holder.ended
        }),
    }
}

/// What a kept session carries from one connection to the next.
#[derive(Debug, Default)]
pub(crate) struct Carried {
    /// Its filters, counted again when it comes back.
    pub filters: HashSet<String>,
    /// Packet ids of the client's QoS 2 PUBLISHes it has not released
    /// (PUBREL): a resend under one is not delivered again, and its PUBREL
    /// is completed (MQTT 5 §4.3.3, §4.4). At most
    /// twice [`session::RECEIVE_MAXIMUM`], so a list. An id with [`UNCONFIRMED`]
    /// set is one the router has not yet confirmed: it is not kept past
    /// its connection (the client, which has had no PUBREC for it, sends
    /// it again).
    pub unreleased: Vec<u32>,
}

/// See [`Carried::unreleased`].
pub(crate) const UNCONFIRMED: u32 = 1 << 16;

/// Set on the ids of [`Carried::unreleased`] that an earlier connection
/// received: they do not count against the Receive Maximum of the next.
pub(crate) const CARRIED: u32 = 1 << 17;

/// A session the router keeps while no connection holds it.
struct Kept {
    /// The connection that held it last.
    connection: u64,
    carried: Carried,
    /// The task that publishes its delayed Will and ends the session when
    /// its expiry passes (`session::after_session`); aborted when a
    /// connection takes the session (`Shared::kept_state`), or it is kept
    /// anew.
    after: tokio::task::AbortHandle,
}

/// The connection holding a router session.
struct Holder {
    connection: u64,
    /// Cancelled when another connection claims the session.
    taken: CancellationToken,
    /// Cancelled when the holder's session has ended (see [`Claim`]).
    ended: CancellationToken,
}

/// The connections of one router session that a newer connection took
/// over while they still ran (see [`Shared::overtaken`]).
#[derive(Default)]
struct Overtaken {
    /// Those still running.
    running: Vec<u64>,
    /// The newest connection that has taken the session (its CONNACK
    /// sent) since the first of them was taken over.
    took: u64,
}

/// A connection's claim on a router session.
pub struct Claim {
    /// Cancels, when dropped, the token the next holder waits on: keep it
    /// until the session has ended and a Will due at once is published.
    pub ended: tokio_util::sync::DropGuard,
    /// When this claim takes the session over: the previous holder's,
    /// cancelled once that session has ended.
    pub previous: Option<CancellationToken>,
}

/// What a listener's connections prove about themselves.
#[derive(Debug, Clone)]
pub enum ListenerKind {
    Bootstrap,
    Service(CertIdentity),
    Internal,
}

/// How a listener secures its connections.
#[derive(Clone)]
pub enum Transport {
    Plain(ListenerKind),
    ServerTls(Arc<trust::ServerTls>),
    MutualTls(Arc<Trust>),
}

impl Transport {
    fn name(&self) -> &'static str {
        match self {
            Transport::Plain(ListenerKind::Internal) => "internal",
            Transport::Plain(_) | Transport::ServerTls(_) => "bootstrap",
            Transport::MutualTls(_) => "service",
        }
    }
}

impl Shared {
    /// Takes the slots a new connection on `transport` needs, or none if
    /// its listener is full.
    fn slots_for(&self, transport: &Transport) -> Option<Slots> {
        let take = |pool: &Arc<Semaphore>| pool.clone().try_acquire_owned().ok();
        match transport {
            Transport::Plain(ListenerKind::Internal) => Some((take(&self.internal_slots)?, None)),
            Transport::Plain(_) | Transport::ServerTls(_) => {
                let bootstrap = take(&self.bootstrap_slots)?;
                Some((take(&self.slots)?, Some(bootstrap)))
            }
            Transport::MutualTls(_) => Some((take(&self.slots)?, None)),
        }
        .map(|(a, b)| (Some(a), b))
    }

    /// `stopping` is the token that stops the listeners.
    pub fn new(
        link: LinkOpener,
        limits: Limits,
        internal_users: HashMap<String, String>,
        stopping: CancellationToken,
    ) -> Arc<Shared> {
        let metrics = Arc::new(Metrics {
            router_log_bytes: link.log_bytes.clone(),
            router_filters: link.filters.clone(),
            router_skipped: link.skipped.clone(),
            ..Metrics::default()
        });
        let making_room = Arc::new(Semaphore::new(limits.max_pending.max(1)));
        Arc::new(Shared {
            link,
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            bootstrap_slots: Arc::new(Semaphore::new(limits.max_bootstrap_connections)),
            internal_slots: Arc::new(Semaphore::new(limits.max_internal_connections)),
            limits,
            metrics,
            internal_users,
            next_connection: AtomicU64::new(1),
            refusals_logged: [
                "refused CONNECTs logged",
                "refused client certificates logged",
                "connections refused for a full listener logged",
            ]
            .map(|what| Mutex::new(crate::log_pace::LogPace::new(what, tracing::Level::WARN))),
            rate: Mutex::new(HashMap::new()),
            bootstrap_publishes: Mutex::new(HashMap::new()),
            device_paces: Mutex::new(HashMap::new()),
            kept: Mutex::new(HashMap::new()),
            internal_unauthenticated: Mutex::new(Default::default()),
            sessions: Mutex::new(HashMap::new()),
            overtaken: Mutex::new(HashMap::new()),
            will_link: tokio::sync::Mutex::new(None),
            revoked: Arc::new(RwLock::new(HashSet::new())),
            pending: Mutex::new(evict::PendingSet::default()),
            bootstrap_sessions: Mutex::new(evict::PendingSet::default()),
            making_room,
            stopping,
        })
    }

    /// Counts connection `id` from `source` (an IPv6 address by its /64) as
    /// pending until the guard drops; when that makes more than
    /// `max_pending`, the oldest pending connection of the source with the
    /// most, if older than `pending_min_age`, is told to close (it does if
    /// its client owes the next message: [`evict`]). `bootstrap`: whether
    /// the connection holds a bootstrap slot.
    fn pending(&self, source: IpAddr, id: u64, bootstrap: bool) -> Pending<'_> {
        let source = evict::source_key(source);
        let closing = CancellationToken::new();
        let victim = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                source,
                id,
                (closing.clone(), bootstrap),
                Instant::now(),
                evict::PendingLimit {
                    max: self.limits.max_pending,
                    min_age: self.limits.pending_min_age,
                },
            );
        if let Some(victim) = victim {
            victim.cancel();
        }
        Pending {
            shared: self,
            source,
            id,
            closing,
        }
    }

    /// Whether a connection refused as `kind` is logged at WARN now
    /// ([`Shared::refusals_logged`]).
    pub(crate) fn refusal_loud(&self, kind: Refused) -> bool {
        crate::log_pace::LogPace::loud_in(&self.refusals_logged[kind as usize])
    }

    /// Logs the count of refusals kept quiet in a second that has ended
    /// (with `at_end`, in the second under way too).
    pub(crate) fn flush_refusals_logged(&self, at_end: bool) {
        for pace in &self.refusals_logged {
            crate::log_pace::LogPace::flush_in(pace, at_end);
        }
    }

    /// Whether the certificate with this serial is revoked.
    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }

    /// Records that `connection` now holds the router session `router_id`;
    /// the previous holder's [`Shared::taken`] token is cancelled.
    pub fn claim(&self, router_id: &str, connection: u64) -> Claim {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(running) = sessions.get(router_id).filter(|h| !h.ended.is_cancelled()) {
            self.overtaken
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(router_id.to_string())
                .or_default()
                .running
                .push(running.connection);
        }
        claim_in(&mut sessions, router_id, connection)
    }

    /// The token cancelled when `connection`'s session `router_id` has
    /// ended (its Will published, the router told), if it holds it.
    pub fn ended(&self, router_id: &str, connection: u64) -> Option<CancellationToken> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions
            .get(router_id)
            .filter(|h| h.connection == connection)
            .map(|h| h.ended.clone())
    }

    /// Whether `connection` still holds the router session `router_id`.
    pub fn holds(&self, router_id: &str, connection: u64) -> bool {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.get(router_id).map(|h| h.connection) == Some(connection)
    }

    /// A token cancelled when another connection claims `router_id` from
    /// `connection` (already cancelled if one has).
    pub fn taken(&self, router_id: &str, connection: u64) -> CancellationToken {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        match sessions.get(router_id) {
            Some(holder) if holder.connection == connection => holder.taken.clone(),
            _ => {
                let gone = CancellationToken::new();
                gone.cancel();
                gone
            }
        }
    }

    /// Forgets `connection`'s hold on `router_id`, if it still has it, and
    /// that it was taken over (see [`Shared::overtaken_ends`]).
    pub fn release(&self, router_id: &str, connection: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.get(router_id).map(|h| h.connection) == Some(connection) {
            sessions.remove(router_id);
        }
        self.overtaken_ends(router_id, connection);
    }

    /// Connection `connection` of `router_id`, if it was taken over while
    /// it ran, has ended: it is no longer counted among the
    /// [`Shared::overtaken`] ones. Called by every connection that claimed
    /// a session, when it is done with it (through [`Shared::release`]).
    pub(crate) fn overtaken_ends(&self, router_id: &str, connection: u64) {
        let mut overtaken = self.overtaken.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(of) = overtaken.get_mut(router_id) {
            of.running.retain(|&c| c != connection);
            if of.running.is_empty() {
                overtaken.remove(router_id);
            }
        }
    }

    /// Token bucket per source address.
    fn admit(&self, ip: IpAddr) -> bool {
        let (rate, burst) = (
            self.limits.connects_per_sec_per_source,
            self.limits.connect_burst_per_source,
        );
        take_from(&self.rate, ip, rate, burst)
    }

    /// Counts internal connection `id` as not yet authenticated; the token
    /// closes it if the listener needs its slot first.
    fn unauthenticated_internal(&self, id: u64) -> CancellationToken {
        let token = CancellationToken::new();
        self.internal_unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, token.clone());
        token
    }

    /// Internal connection `id` authenticated, or ended: it is no longer
    /// closed for others.
    pub(crate) fn internal_settled(&self, id: u64) {
        self.internal_unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Whether an internal connection has not authenticated yet.
    fn has_unauthenticated_internal(&self) -> bool {
        !self
            .internal_unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Closes the oldest internal connection that has not authenticated;
    /// false if there is none.
    fn evict_unauthenticated_internal(&self) -> bool {
        let oldest = self
            .internal_unauthenticated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_first();
        oldest.map(|(_, token)| token.cancel()).is_some()
    }

    /// What a session carried when its last connection ended, if the
    /// router kept it (`clean` false); a clean session starts with
    /// nothing, and the router forgets what was kept. Either way the
    /// session is no longer waiting to expire, and `connection`, which
    /// has sent its CONNACK, has taken it.
    pub(crate) fn kept_state(&self, router_id: &str, connection: u64, clean: bool) -> Carried {
        // Under `sessions`, which `keep_session` holds from its look at
        // `overtaken` to its entry in `kept`: an older connection keeps the
        // session wholly before this (and `unkeep` below takes it) or sees
        // that this one took it.
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(of) = self
            .overtaken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(router_id)
        {
            of.took = of.took.max(connection);
        }
        drop(sessions);
        match self.unkeep(router_id) {
            Some(kept) => {
                kept.after.abort();
                if clean {
                    Carried::default()
                } else {
                    kept.carried
                }
            }
            None => Carried::default(),
        }
    }

    fn unkeep(&self, router_id: &str) -> Option<Kept> {
        self.unkeep_if(router_id, |_| true)
    }

    /// Forgets the kept session `router_id` if `which` says so.
    fn unkeep_if(&self, router_id: &str, which: impl Fn(&Kept) -> bool) -> Option<Kept> {
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        let held = kept
            .get(router_id)
            .is_some_and(which)
            .then(|| kept.remove(router_id))
            .flatten();
        self.metrics
            .sessions_kept
            .store(kept.len() as u64, Ordering::Relaxed);
        held
    }

    /// Keeps the session `router_id`, whose last connection `connection`
    /// has ended, with what it `carried`, until a connection takes it or
    /// it expires: `after` (`session::after_session`) runs meanwhile. A
    /// session that a newer connection has taken since it took this one
    /// over (its CONNACK sent while this one was still ending) is that
    /// connection's, whether it still runs, has ended, or has left the
    /// session kept itself: nothing of this one is kept, and `after` does
    /// not run. (Connections are numbered in the order they come.)
    pub(crate) fn keep_session(
        self: &Arc<Self>,
        router_id: String,
        connection: u64,
        mut carried: Carried,
        after: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        carried.unreleased.retain(|id| id & UNCONFIRMED == 0);
        for id in &mut carried.unreleased {
            *id |= CARRIED;
        }
        // Locked before `overtaken` and `kept`, and held: a newer
        // connection takes the session either before this (and nothing is
        // kept) or after (and takes what is).
        let _sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if self
            .overtaken
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&router_id)
            .is_some_and(|of| of.took > connection)
        {
            debug!(session = %router_id, "session taken over before its last connection ended");
            return;
        }
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        // Spawned under the lock: `after` finds its entry in place.
        let after = tokio::spawn(after).abort_handle();
        let before = kept.insert(
            router_id,
            Kept {
                connection,
                carried,
                after,
            },
        );
        if let Some(before) = before {
            before.after.abort();
        }
        self.metrics
            .sessions_kept
            .store(kept.len() as u64, Ordering::Relaxed);
    }

    /// Waits until no connection other than `connection` holds a live
    /// claim on the session `router_id`, then runs `then` on the sessions,
    /// locked. A connection that claimed the session takes it from the
    /// kept ones once its CONNACK is out (`kept_state`, which aborts the
    /// task waiting here); one that ends before leaves it kept. `None` if
    /// the broker stops first.
    async fn after_claims<R>(
        &self,
        router_id: &str,
        connection: u64,
        then: impl FnOnce(&mut HashMap<String, Holder>) -> R,
    ) -> Option<R> {
        let mut then = Some(then);
        loop {
            let holder = {
                let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                match sessions.get(router_id) {
                    // (One whose session has ended without letting it go
                    // holds it no longer.)
                    Some(holder)
                        if holder.connection != connection && !holder.ended.is_cancelled() =>
                    {
                        holder.ended.clone()
                    }
                    _ => return then.take().map(|then| then(&mut sessions)),
                }
            };
            tokio::select! {
                _ = self.stopping.cancelled() => return None,
                _ = holder.cancelled() => {}
            }
        }
    }

    /// Whether the session `router_id` is still kept as `connection` left
    /// it.
    fn kept_as_left(&self, router_id: &str, connection: u64) -> bool {
        self.kept
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(router_id)
            .is_some_and(|k| k.connection == connection)
    }

    /// For a delayed Will of the session `router_id`, kept since
    /// `connection` ended, whose identity has claimed it again: waits until
    /// that claim (and any that follow it) is settled. False if the broker
    /// stops or the session is no longer kept; true if every claim ended
    /// before its CONNACK, and then `connection` holds the session again,
    /// so that [`Shared::taken`] shows the next claim.
    pub(crate) async fn claims_failed(&self, router_id: &str, connection: u64) -> bool {
        self.after_claims(router_id, connection, |sessions| {
            let kept = self.kept_as_left(router_id, connection);
            if kept {
                // Ended at once: a connection that claims it next does not
                // wait for this one.
                drop(claim_in(sessions, router_id, connection).ended);
            }
            kept
        })
        .await
        .unwrap_or(false)
    }

    /// Ends the kept session `router_id` that connection `connection` left,
    /// unless a connection has taken it since: the router is told to
    /// forget it (a clean link of the same client id, opened and closed).
    /// While a connection holds a claim on it, this waits for that
    /// connection to take it or end. A connection that claims it while this
    /// runs gets a new session.
    pub(crate) async fn expire_session(&self, router_id: &str, connection: u64) {
        let me = self.next_connection.fetch_add(1, Ordering::Relaxed);
        let claim = self
            .after_claims(router_id, connection, |sessions| {
                self.unkeep_if(router_id, |k| k.connection == connection)
                    .map(|_| claim_in(sessions, router_id, me).ended)
            })
            .await
            .flatten();
        let Some(claim) = claim else {
            return;
        };
        match self.link.open(router_id.to_string(), true).await {
            Ok((mut tx, _rx, _ack)) => {
                let _ = session::send_now(&mut tx, session::router_goodbye()).await;
                self.metrics
                    .sessions_expired
                    .fetch_add(1, Ordering::Relaxed);
                info!(session = %router_id, "kept session expired");
            }
            Err(why) => warn!(session = %router_id, reason = %why, "kept session not ended"),
        }
        self.release(router_id, me);
        drop(claim);
    }

    /// The publish pace of certified device `device_id`, shared by its
    /// connections. Paces no connection holds are forgotten once there are
    /// many, those idle for a minute first.
    pub(crate) fn device_pace(&self, device_id: &str) -> Arc<Mutex<Bucket>> {
        let mut paces = self.device_paces.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pace) = paces.get(device_id) {
            return pace.clone();
        }
        let many = self.limits.max_connections.max(1024);
        if paces.len() >= 2 * many {
            let now = tokio::time::Instant::now();
            let held = |pace: &Arc<Mutex<Bucket>>| Arc::strong_count(pace) > 1;
            paces.retain(|_, pace| {
                held(pace)
                    || now.duration_since(pace.lock().unwrap_or_else(|p| p.into_inner()).last)
                        < Duration::from_secs(60)
            });
            if paces.len() >= many * 3 / 2 {
                paces.retain(|_, pace| held(pace));
            }
        }
        let pace = Arc::new(Mutex::new(Bucket::full(
            self.limits.publishes_per_sec_per_device,
            self.limits.publish_burst_per_device,
        )));
        paces.insert(device_id.to_string(), pace.clone());
        pace
    }

    /// Counts bootstrap session `connection` from `source`, which `cut`
    /// ends, until [`Shared::bootstrap_session_ends`].
    pub(crate) fn bootstrap_session(
        &self,
        source: IpAddr,
        connection: u64,
        cut: CancellationToken,
    ) {
        self.bootstrap_sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .add(
                evict::source_key(source),
                connection,
                (cut, false),
                Instant::now(),
            );
    }

    /// Bootstrap session `connection` from `source` has sent a packet now.
    pub(crate) fn bootstrap_session_heard(&self, source: IpAddr, connection: u64) {
        self.bootstrap_sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .touch(evict::source_key(source), connection, Instant::now());
    }

    pub(crate) fn bootstrap_session_ends(&self, source: IpAddr, connection: u64) {
        self.bootstrap_sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(evict::source_key(source), connection);
    }

    /// Whether the bootstrap listeners take one more PUBLISH from `source`.
    pub(crate) fn admit_bootstrap_publish(&self, source: IpAddr) -> bool {
        take_from(
            &self.bootstrap_publishes,
            evict::source_key(source),
            self.limits.bootstrap_publishes_per_sec_per_source,
            self.limits.bootstrap_publish_burst_per_source,
        )
    }
}

/// What a refused connection was refused for, as its log lines are paced.
#[derive(Clone, Copy)]
pub(crate) enum Refused {
    Connect,
    Certificate,
    Full,
}

/// A connection's slot and its place in the `live` gauge, both given back
/// when it is dropped: at the end of the connection, or if its task panics
/// or is never run.
struct Held {
    slots: Slots,
    metrics: Arc<Metrics>,
    /// On the internal listener: the connection's id, and the token that
    /// closes it if the listener needs its slot before it authenticates
    /// (registered as the slot is taken, so a full listener always finds
    /// whom to close).
    internal: Option<(u64, CancellationToken)>,
}

/// The slots a connection holds: one of its listener's pool, and on a
/// bootstrap listener one of the device listeners' too.
type Slots = (
    Option<tokio::sync::OwnedSemaphorePermit>,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

impl Held {
    fn new(slots: Slots, metrics: Arc<Metrics>) -> Held {
        metrics.live.fetch_add(1, Ordering::Relaxed);
        Held {
            slots,
            metrics,
            internal: None,
        }
    }

    /// An internal-listener connection, counted as not yet authenticated.
    fn internal(mut self, shared: &Shared) -> Held {
        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        self.internal = Some((id, shared.unauthenticated_internal(id)));
        self
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // The slots go back before `live` drops, so a connection that no
        // longer counts as live never holds a slot.
        drop((self.slots.0.take(), self.slots.1.take()));
        self.metrics.live.fetch_sub(1, Ordering::Release);
    }
}

/// Binds a listener with a deep accept backlog, and `TCP_NODELAY`, which
/// Linux passes on to every connection it accepts (one system call less
/// per connect than setting it on each).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    // The kernel wakes a writer once less than this of what it was given
    // is still unsent, not once half of its (self-tuned, up to MiBs) send
    // buffer is free: a client that reads slowly, but reads, lets each
    // write of ours go on within seconds, and is not taken for one that
    // stopped (`Framed::write_stall`); and a stalled client's unsent bytes
    // in the kernel stay near this. Accepted connections inherit it. Where
    // the kernel has no such option, writes wake as they did.
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(err) = socket2::SockRef::from(&socket).set_tcp_notsent_lowat(NOTSENT_LOWAT) {
        warn!(error = %err, "TCP_NOTSENT_LOWAT not set: slow readers may be taken for stalled ones");
    }
    socket.bind(addr)?;
    let listener = socket.listen(4096)?;
    listener.into_std()
}

/// `TCP_NOTSENT_LOWAT` of every connection (see [`bind`]).
#[cfg(any(target_os = "linux", target_os = "android"))]
const NOTSENT_LOWAT: u32 = 64 * 1024;

/// Accepts connections until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    transport: Transport,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let (stream, peer) = tokio::select! {
            // Once stopping, no connection is taken, though one waits: a
            // client that reconnects at the DISCONNECT it was told would
            // otherwise be served after the broker's connections had all
            // ended (`RunningBroker::shut_down`).
            biased;
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        if !shared.admit(peer.ip()) {
            shared.metrics.rate_limited.fetch_add(1, Ordering::Relaxed);
            debug!(%peer, "connect rate from this address exceeded");
            continue;
        }
        let Some(slots) = shared.slots_for(&transport) else {
            // The internal listener full: its oldest connection that has not
            // authenticated is closed, and this one waits for the slot, so
            // silent connections cannot keep the manager out.
            if matches!(transport, Transport::Plain(ListenerKind::Internal))
                && shared.has_unauthenticated_internal()
            {
                let (shared, transport, stop) = (shared.clone(), transport.clone(), stop.clone());
                tokio::spawn(async move {
                    // In the semaphore's queue before the slot is freed, so
                    // that it comes here and not to whoever connects next.
                    let slot = InLine::join(&shared.internal_slots).await;
                    if matches!(slot, InLine::Queued(_)) {
                        shared.evict_unauthenticated_internal();
                    }
                    let waited = tokio::time::timeout(shared.limits.connect_timeout, slot.permit());
                    if let Ok(Some(slot)) = waited.await {
                        let slots = (Some(slot), None);
                        accepted(stream, peer, transport, shared, stop, slots).await;
                    }
                });
                continue;
            }
            // A device listener full: a connection that stopped talking
            // in its handshake is closed for this one, as for too many
            // pending (`Shared::pending`), which alone would leave a flood
            // faster than `pending_min_age` every slot. (The internal
            // listener, full of authenticated connections, refuses.)
            let device = !matches!(transport, Transport::Plain(ListenerKind::Internal));
            let waiting = device
                .then(|| shared.making_room.clone().try_acquire_owned().ok())
                .flatten();
            if let Some(waiting) = waiting {
                let (shared, transport, stop) = (shared.clone(), transport.clone(), stop.clone());
                tokio::spawn(async move {
                    let room = room_for(&shared, &transport, peer.ip()).await;
                    drop(waiting);
                    match room {
                        Some(slots) => accepted(stream, peer, transport, shared, stop, slots).await,
                        None => over_capacity(&shared, peer, &transport),
                    }
                });
                continue;
            }
            over_capacity(&shared, peer, &transport);
            continue;
        };
        let task = accepted(
            stream,
            peer,
            transport.clone(),
            shared.clone(),
            stop.clone(),
            slots,
        );
        tokio::spawn(task);
    }
}

/// A connection refused for want of a slot.
fn over_capacity(shared: &Shared, peer: SocketAddr, transport: &Transport) {
    shared.metrics.over_capacity.fetch_add(1, Ordering::Relaxed);
    crate::paced!(
        shared.refusal_loud(Refused::Full),
        warn,
        %peer,
        listener = transport.name(),
        "connection limit reached"
    );
}

/// Longest a new connection waits for the slot of a pending connection
/// closed for it: one whose client owes the next message ends at once;
/// one whose client has sent it after all is spared, and then the wait
/// ends with no slot unless another is freed.
const ROOM_WAIT: Duration = Duration::from_secs(1);

/// The slots a new connection on a full device listener needs: in line
/// for them first, then a pending connection that holds one (a bootstrap
/// one if the bootstrap listeners are full) is closed for it (see
/// [`evict::PendingSet::make_room`]), or, on full bootstrap listeners, a
/// bootstrap session (an idle one, or else one of a source that holds
/// more than the newcomer's and more than its share,
/// [`evict::PendingSet::share_fairly`]). None if
/// nothing can be closed, or no slot comes within [`ROOM_WAIT`].
async fn room_for(shared: &Shared, transport: &Transport, source: IpAddr) -> Option<Slots> {
    let bootstrap = !matches!(transport, Transport::MutualTls(_));
    let slot = InLine::join(&shared.slots).await;
    let boot = match bootstrap {
        true => Some(InLine::join(&shared.bootstrap_slots).await),
        false => None,
    };
    let waiting = |line: &InLine| matches!(line, InLine::Queued(_));
    if waiting(&slot) || boot.as_ref().is_some_and(waiting) {
        let (source, now) = (evict::source_key(source), Instant::now());
        let bootstrap = boot.as_ref().is_some_and(waiting);
        let pending = shared
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .make_room(source, now, shared.limits.pending_min_age, bootstrap);
        // The bootstrap listeners full of clients past their handshake:
        // one of their sessions goes, an idle one if there is one, or else
        // one of a source that holds more than the newcomer's.
        let victim = pending.or_else(|| {
            let min_age = shared.limits.bootstrap_session_min_age;
            bootstrap
                .then(|| {
                    let mut sessions = shared
                        .bootstrap_sessions
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    sessions.make_room(source, now, min_age, false).or_else(|| {
                        sessions.share_fairly(source, shared.limits.max_bootstrap_connections)
                    })
                })
                .flatten()
                .inspect(|_| {
                    shared.metrics.evicted.fetch_add(1, Ordering::Relaxed);
                })
        })?;
        victim.cancel();
    }
    let both = async {
        let slot = slot.permit().await?;
        let boot = match boot {
            Some(boot) => Some(boot.permit().await?),
            None => None,
        };
        Some((Some(slot), boot))
    };
    tokio::time::timeout(ROOM_WAIT, both).await.ok().flatten()
}

/// A slot of a pool, or a place in its queue.
enum InLine {
    Got(tokio::sync::OwnedSemaphorePermit),
    Queued(
        std::pin::Pin<
            Box<
                dyn std::future::Future<
                        Output = Result<
                            tokio::sync::OwnedSemaphorePermit,
                            tokio::sync::AcquireError,
                        >,
                    > + Send,
            >,
        >,
    ),
}

impl InLine {
    /// Takes a slot of `pool` if one is free, or else a place in its
    /// queue, which is served before anyone who asks later (the semaphore
    /// is fair).
    async fn join(pool: &Arc<Semaphore>) -> InLine {
        let mut acquire = Box::pin(pool.clone().acquire_owned());
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(acquire.as_mut(), cx))
        })
        .await;
        match first {
            std::task::Poll::Ready(Ok(permit)) => InLine::Got(permit),
            // (The pools are never closed.)
            std::task::Poll::Ready(Err(_)) | std::task::Poll::Pending => InLine::Queued(acquire),
        }
    }

    async fn permit(self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        match self {
            InLine::Got(permit) => Some(permit),
            InLine::Queued(acquire) => acquire.await.ok(),
        }
    }
}

/// Counts a connection that holds `slots` as accepted, and returns its task.
fn accepted(
    stream: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    shared: Arc<Shared>,
    stop: CancellationToken,
    slots: Slots,
) -> std::pin::Pin<Box<impl std::future::Future<Output = ()>>> {
    // Live from the moment the slot is taken, so a connection that holds a
    // slot always counts; counted as accepted after that.
    let mut held = Held::new(slots, shared.metrics.clone());
    if matches!(transport, Transport::Plain(ListenerKind::Internal)) {
        held = held.internal(&shared);
    }
    shared.metrics.accepted.fetch_add(1, Ordering::Release);
    // Boxed: the connection's future is about 7 KB, and spawning it unboxed
    // copied it some eight times per connect (a copy for each layer of
    // `spawn`, and again when the task finished).
    Box::pin(connection_task(stream, peer, transport, shared, stop, held))
}

/// The task of one accepted connection, to its end.
///
/// Its future is the one allocation every connection keeps for its whole
/// life; a test holds it under [`CONNECTION_TASK_MAX`].
async fn connection_task(
    stream: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    shared: Arc<Shared>,
    stop: CancellationToken,
    held: Held,
) {
    let internal = held.internal.clone();
    if let Err(err) = connection(stream, peer, transport, &shared, stop, internal).await {
        debug!(%peer, error = %err, "connection ended");
    }
    // The slots are held to the end (not rebound: a second binding would
    // be a second copy in the future).
    drop(held);
}

/// Largest size, in bytes, of a connection task's future. A local kept
/// across an await point is kept in the future, whether it is still used or
/// was moved away, so a stray one can add a TLS stream's 1.2 KiB to every
/// connection.
#[cfg(test)]
const CONNECTION_TASK_MAX: usize = 8 * 1024;

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    shared: &Arc<Shared>,
    stop: CancellationToken,
    internal: Option<(u64, CancellationToken)>,
) -> Result<(), session::SessionError> {
    let id = match &internal {
        Some((id, _)) => *id,
        None => shared.next_connection.fetch_add(1, Ordering::Relaxed),
    };
    let cut = stop.child_token();
    // Handshakes are boxed: their state (over 4 KiB) is needed only until
    // they end, and in this future it would stay for the connection's life.
    match transport {
        Transport::Plain(kind) => {
            // The manager's listener is loopback only, and password-checked.
            if !matches!(kind, ListenerKind::Internal) {
                first_bytes(&stream, peer.ip(), shared, id).await?;
                return session::run(stream, kind, shared.clone(), id, peer.ip(), cut).await;
            }
            // Closed for a newer connection while it has not authenticated.
            let evicted = internal.map(|(_, token)| token).unwrap_or_default();
            let ran = tokio::select! {
                ran = session::run(stream, kind, shared.clone(), id, peer.ip(), cut) => ran,
                _ = evicted.cancelled() => Err(session::SessionError::Refused(
                    "closed for a newer connection before it authenticated".into(),
                )),
            };
            shared.internal_settled(id);
            ran
        }
        Transport::ServerTls(tls) => {
            let config = tls.config();
            let tls = Box::pin(handshake(stream, (peer.ip(), true), config, shared, id)).await?;
            session::run(
                tls,
                ListenerKind::Bootstrap,
                shared.clone(),
                id,
                peer.ip(),
                cut,
            )
            .await
        }
        Transport::MutualTls(trust) => {
            // The session is built in the block it awaits: the handshake's
            // stream and the certificate are moved into it, and a local that
            // held them past the block would stay in this future, a dead
            // 1.4 KiB, while the session runs.
            let registered;
            let result = {
                let mut tls = Box::pin(handshake(
                    stream,
                    (peer.ip(), false),
                    trust.config(),
                    shared,
                    id,
                ))
                .await?;
                if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    shared.metrics.resumed.fetch_add(1, Ordering::Relaxed);
                }
                let presented = tls.get_ref().1.peer_certificates();
                let mut cert = match trust::identity_of(presented) {
                    Ok(c) => c,
                    Err(why) => {
                        shared
                            .metrics
                            .refused_connects
                            .fetch_add(1, Ordering::Relaxed);
                        crate::paced!(
                            shared.refusal_loud(Refused::Certificate),
                            warn,
                            %peer,
                            reason = %why,
                            "client certificate refused"
                        );
                        return Err(session::SessionError::Refused(why));
                    }
                };
                // The anchor's end too, which a leaf alone does not show.
                let leaf = presented
                    .and_then(<[_]>::first)
                    .map(|leaf| trust::sha256(leaf));
                let issuer = presented
                    .and_then(<[_]>::first)
                    .and_then(|leaf| der::issuer_key(leaf))
                    .unwrap_or_default();
                if let Some(until) = leaf.as_ref().and_then(|leaf| trust.path_until(leaf)) {
                    cert.not_after = cert.not_after.min(until);
                }
                // A ticket held for the CONNACK that never goes out is not
                // counted against the certificate.
                let unsent = leaf
                    .filter(|_| tls.get_ref().0.holds())
                    .and_then(|leaf| trust.ticket_unsent(leaf));
                if let Some(unsent) = unsent {
                    tls.get_mut().0.on_unsent(unsent);
                }
                registered = trust.register(&cert.serial, cert.not_after, issuer, id, cut.clone());
                // A revocation, or a CA retired, that landed between the
                // handshake and now.
                if trust.is_revoked(&cert.serial)
                    || !trust.issuer_trusted(&cert.service_id, &issuer)
                {
                    cut.cancel();
                }
                session::run(
                    tls,
                    ListenerKind::Service(cert),
                    shared.clone(),
                    id,
                    peer.ip(),
                    cut,
                )
            }
            .await;
            // An expired certificate's cut is counted where it is made, and
            // a broker that stops cuts every session, revoked or not.
            let expired = registered.end();
            let stopping = shared.stopping.is_cancelled();
            if matches!(result, Err(session::SessionError::Revoked)) && !expired && !stopping {
                shared.metrics.revoked_cuts.fetch_add(1, Ordering::Relaxed);
            }
            result
        }
    }
}

/// Waits until a plain connection has sent something, counting it among
/// the pending connections until then.
async fn first_bytes(
    stream: &TcpStream,
    source: IpAddr,
    shared: &Shared,
    id: u64,
) -> Result<(), session::SessionError> {
    let pending = shared.pending(source, id, true);
    // Peeked, not awaited as readiness: a socket just accepted can be
    // reported readable before any byte has come.
    let mut first = [0u8; 1];
    let peek = stream.peek(&mut first);
    tokio::pin!(peek);
    tokio::select! {
        biased;
        peeked = &mut peek => return peeked.map(drop).map_err(session::SessionError::Io),
        _ = pending.closing.cancelled() => {}
    }
    if evict::has_waiting(stream) {
        return Ok(());
    }
    shared.metrics.evicted.fetch_add(1, Ordering::Relaxed);
    Err(session::SessionError::Refused(evict::Evicted.to_string()))
}

/// How long the alert of a failed handshake may take to write.
const ALERT_WRITE: Duration = Duration::from_secs(1);

/// A device connection's TLS stream.
type Tls = TlsStream<hold::TicketHold<evict::Evictable<TcpStream>>>;

/// `bootstrap`: whether the connection holds a bootstrap slot.
async fn handshake(
    stream: TcpStream,
    (source, bootstrap): (IpAddr, bool),
    configs: trust::Configs,
    shared: &Shared,
    id: u64,
) -> Result<Tls, session::SessionError> {
    let pending = shared.pending(source, id, bootstrap);
    let closing = &pending.closing;
    let accept = async {
        let io = hold::TicketHold::new(evict::Evictable::new(stream, closing.clone()));
        let hello = LazyConfigAcceptor::new(Acceptor::default(), io);
        // A ClientHello that cannot be read gets its alert from the acceptor.
        let start = hello.await?;
        let config = configs.for_client(start.client_hello().cipher_suites());
        match start.into_stream(config).into_fallible().await {
            Ok(tls) => Ok(tls),
            Err((err, mut io)) => {
                // The alert that tells the client why, if one was held,
                // and no reset under it: a TLS 1.3 client goes on writing
                // (its Finished, its CONNECT) after the certificate the
                // broker refused.
                let _ = tokio::time::timeout(ALERT_WRITE, io.release()).await;
                Box::pin(codec::linger(&mut io)).await;
                Err(err)
            }
        }
    };
    let accept = async {
        tokio::pin!(accept);
        // Told to close, the handshake is polled once more: its next read
        // fails unless the client has sent something (`evict`).
        tokio::select! {
            biased;
            done = &mut accept => done,
            _ = closing.cancelled() => accept.await,
        }
    };
    match tokio::time::timeout(shared.limits.handshake_timeout, accept).await {
        Ok(Ok(mut tls)) => {
            let io = tls.get_mut().0;
            io.handshake_done();
            io.get_mut().settle();
            Ok(tls)
        }
        Ok(Err(err)) if evict::is_evicted(&err) => {
            shared.metrics.evicted.fetch_add(1, Ordering::Relaxed);
            debug!("{err}");
            Err(session::SessionError::Refused(err.to_string()))
        }
        Ok(Err(err)) => {
            shared
                .metrics
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            debug!(error = %err, "TLS handshake failed");
            Err(session::SessionError::Refused(format!(
                "TLS handshake: {err}"
            )))
        }
        Err(_) => {
            shared
                .metrics
                .handshake_failures
                .fetch_add(1, Ordering::Relaxed);
            Err(session::SessionError::Refused(
                "TLS handshake timed out".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn size_of_returned<A, F>(_: impl FnOnce(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The future every connection keeps stays in its size class.
    #[test]
    fn a_connection_task_fits_its_size_class() {
        let size = size_of_returned(
            |(stream, peer, transport, shared, stop, held): (
                TcpStream,
                SocketAddr,
                Transport,
                Arc<Shared>,
                CancellationToken,
                Held,
            )| connection_task(stream, peer, transport, shared, stop, held),
        );
        assert!(
            size <= CONNECTION_TASK_MAX,
            "a connection task's future is {size} bytes"
        );
    }

    /// Connections accepted by a listener of [`bind`] have `TCP_NODELAY`
    /// and `TCP_NOTSENT_LOWAT` without setting them themselves.
    #[tokio::test]
    async fn accepted_connections_inherit_their_socket_options() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = bind(addr.parse().unwrap()) else {
                continue; // no IPv6 here
            };
            listener.set_nonblocking(true).unwrap();
            let listener = TcpListener::from_std(listener).unwrap();
            let client = TcpStream::connect(listener.local_addr().unwrap());
            let (client, accepted) = tokio::join!(client, listener.accept());
            let (accepted, _) = accepted.unwrap();
            assert!(accepted.nodelay().unwrap(), "{addr}");
            #[cfg(any(target_os = "linux", target_os = "android"))]
            assert_eq!(
                socket2::SockRef::from(&accepted)
                    .tcp_notsent_lowat()
                    .unwrap(),
                NOTSENT_LOWAT,
                "{addr}"
            );
            assert!(
                !client.unwrap().nodelay().unwrap(),
                "{addr}: the client's own default"
            );
        }
    }
}

//! Request handlers: every check DESIGN.md names, an error reply with a code
//! for every failure, and idempotent answers to retried requests.
//!
//! [`Core::handle`] is synchronous (OpenSSL and sled work) and is called off
//! the MQTT event loop. It returns the messages to publish.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use fleet_broker::frontdoor::shown::Shown;
use fleet_broker::log_pace::LogPace;
use fleet_pki::{grants, Pki, RevokedEntry};
use fleet_protocol::crypto::{self, Sealed};
use fleet_protocol::{
    now_ms, ActivateRequest, Envelope, Kind, PollRequest, ProtocolError, Reply, RequestKind, Route,
    ServiceChange, Status, StatusReport, Topic, UpdateRequest, MAX_MESSAGE_LEN,
};
use openssl::hash::{hash, MessageDigest};
use openssl::pkey::{PKey, Public};
use serde_bytes::ByteBuf;
use tracing::{info, warn};

use crate::store::{
    Batch, CertRecord, CertStatus, DeviceRecord, DeviceState, NonceRecord, PendingChange,
    ServicePeriod, Store, StoreError, SCHEMA_VERSION,
};
use crate::ManagerConfig;

/// One MQTT message to publish (QoS 1, not retained).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// Why a request failed: the status the device gets and a reason for it.
#[derive(Debug)]
pub struct Failure {
    pub status: Status,
    pub detail: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status, self.detail)
    }
}

fn fail<T>(status: Status, detail: impl Into<String>) -> Result<T, Failure> {
    Err(Failure {
        status,
        detail: detail.into(),
    })
}

impl Core {
    /// A cached reply as the signing key now signs it: the same body (and
    /// so the same `seq`), signed again if a key rolled over since, so a
    /// device that took the new key takes the answer to its retry
    /// (topics.md §6.1).
    fn signed_now(&self, cached: Vec<u8>) -> Vec<u8> {
        let signing = self.pki.signing();
        if signing.generation == 1 {
            return cached;
        }
        let Ok(mut env) = Envelope::decode(&cached) else {
            return cached;
        };
        if crypto::verify(&signing.key, &env.tbs(), &env.auth) {
            return cached;
        }
        match crypto::sign(&signing.key, &env.tbs()) {
            Ok(auth) => {
                env.auth = auth;
                env.signer = signer_of(&signing);
                env.encode()
            }
            Err(err) => {
                warn!(error = %err, "cached reply not signed again");
                cached
            }
        }
    }
}

/// The `signer` of a message signed by `signing` (topics.md §4.3): for a
/// successor of the first signing key, its certificate and the cross-
/// certificates after it.
fn signer_of(signing: &fleet_pki::Signing) -> Option<Vec<ByteBuf>> {
    signing
        .signer
        .as_ref()
        .map(|chain| chain.iter().cloned().map(ByteBuf::from).collect())
}

/// The digests of a `status` report's `pinned_roots`: 1 to
/// [`fleet_protocol::messages::MAX_PINNED_ROOTS_REPORTED`] of 32 bytes
/// each, or `malformed` (topics.md §5.3, check 20).
fn pinned_roots_of(body: &StatusReport) -> Result<Option<Vec<[u8; 32]>>, Failure> {
    let Some(list) = &body.pinned_roots else {
        return Ok(None);
    };
    if list.is_empty() || list.len() > fleet_protocol::messages::MAX_PINNED_ROOTS_REPORTED {
        return fail(
            Status::Malformed,
            format!(
                "pinned_roots holds {} digests (1 to {})",
                list.len(),
                fleet_protocol::messages::MAX_PINNED_ROOTS_REPORTED
            ),
        );
    }
    list.iter()
        .map(|d| <[u8; 32]>::try_from(d.as_slice()))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .or_else(|_| fail(Status::Malformed, "a pinned_roots digest is not 32 bytes"))
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure {
            status: Status::Internal,
            detail: format!("store: {e}"),
        }
    }
}

impl From<fleet_pki::PkiError> for Failure {
    fn from(e: fleet_pki::PkiError) -> Self {
        Failure {
            status: Status::Internal,
            detail: format!("pki: {e}"),
        }
    }
}

impl From<ProtocolError> for Failure {
    fn from(e: ProtocolError) -> Self {
        let status = match e {
            ProtocolError::TooLarge(_) => Status::TooLarge,
            ProtocolError::UnsupportedVersion(_) => Status::UnsupportedVersion,
            ProtocolError::OpenSsl(_) => Status::Internal,
            _ => Status::Malformed,
        };
        Failure {
            status,
            detail: e.to_string(),
        }
    }
}

/// What a handler produced.
// Built once per request and moved once; boxing buys nothing.
#[allow(clippy::large_enum_variant)]
enum Outcome {
    /// A fresh reply, plus the state to commit with its nonce record.
    Reply {
        reply: Box<Reply>,
        batch: Batch,
        after: After,
    },
    /// The cached reply of an identical earlier request.
    Cached(Vec<u8>),
}

/// Side effects once the batch is committed.
#[derive(Default)]
struct After {
    crl_for: std::collections::BTreeSet<String>,
    /// A pending change to announce again once the state is committed.
    announce: Option<crate::notices::QueuedChange>,
    /// A change applied, once the state is committed: it needs no notice.
    settled: Option<crate::notices::QueuedChange>,
    /// A certificate was counted for the device ([`Core::may_issue`]):
    /// taken back if the state is not committed.
    counted_certificate: bool,
}

/// The notices of one service change: on the device's tenant topic and on
/// its bootstrap topic.
pub const NOTICES_PER_CHANGE: usize = 2;

/// Result of a service-change request for one device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ChangeResult {
    pub device_id: String,
    pub ok: bool,
    pub change_id: Option<String>,
    pub detail: String,
}

/// The parts of a request every handler needs, once decoded.
struct Checked<'a, T> {
    env: &'a Envelope,
    body: T,
    nonce: Vec<u8>,
    digest: Vec<u8>,
}

/// What a service provider needs to connect: its client id, certificate
/// chain and private key (PEM).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ProviderCredentials {
    pub client_id: String,
    pub serial: String,
    pub chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

/// What [`Core::roll_service_ca`] did.
#[derive(Debug)]
pub struct RolledCa {
    /// The new generation, which issues from now on.
    pub ca: fleet_pki::CaGeneration,
    /// Certificates of the older generations revoked (`retire_older`).
    pub revoked: usize,
    /// Older generations retired (`retire_older`).
    pub retired: Vec<u32>,
}

/// The record of a certificate just issued to `owner` (a device id or a
/// provider's principal).
fn active_record(
    issued: &fleet_pki::IssuedCert,
    owner: &str,
    service_id: &str,
    key_mode: &str,
    now: u64,
) -> Result<CertRecord, Failure> {
    Ok(CertRecord {
        sv: SCHEMA_VERSION,
        serial: issued.serial_hex.clone(),
        device_id: owner.to_owned(),
        service_id: service_id.to_owned(),
        not_before: issued.not_before,
        not_after: issued.not_after,
        fingerprint_sha256: issued.fingerprint_sha256.clone(),
        key_mode: key_mode.into(),
        status: CertStatus::Active,
        issued_ms: now,
        superseded_by: None,
        superseded_ms: None,
        revoked_ms: None,
        revoked_at_grace_end: false,
        der: issued.leaf.to_der().map_err(ProtocolError::from)?,
        ca_generation: issued.ca_generation,
    })
}

/// Marks a certificate revoked at `now`; false if it already was.
fn revoke(c: &mut CertRecord, now: u64) -> bool {
    if c.revoked_ms.is_some() {
        return false;
    }
    c.status = CertStatus::Revoked;
    c.revoked_ms = Some(now);
    true
}

/// Most device ids whose recent failures are tracked at once.
const MAX_FAILURE_ENTRIES: usize = 100_000;

pub struct Core {
    pub store: Store,
    pub pki: Arc<Pki>,
    pub config: ManagerConfig,
    /// Requests taken from the broker and how they fared in the queue
    /// (topics.md §5.4).
    pub intake: Intake,
    /// Changes waiting for their notices, and how many may be announced.
    pub announcements: crate::notices::Announcements,
    failures: Mutex<HashMap<String, VecDeque<u64>>>,
    /// Registered device ids whose requests were refused before any
    /// authentication (unreadable, or `update` before activation), and
    /// when last: like `failures`, they make an id contested (§5.4).
    refused_unchecked: Mutex<HashMap<String, u64>>,
    /// When each device was last issued certificates, the newest
    /// `max_certificates_per_device` (only devices that authenticated).
    issued: Mutex<HashMap<String, VecDeque<u64>>>,
    /// Services whose CRL must be rewritten once the replies that revoked
    /// certificates are published.
    pending_crls: Mutex<std::collections::BTreeSet<String>>,
    /// Held while a CRL is read from the store and written: two writers
    /// interleaving could leave on disk a list read before a revocation.
    crl_writer: Mutex<()>,
    /// Devices and providers whose broker grants could not be written.
    grants_dirty: Mutex<std::collections::BTreeSet<String>>,
    /// Striped per-device locks: one request per device at a time.
    stripes: Vec<Mutex<()>>,
    /// How many refusals were logged at WARN in the current second.
    refusals_logged: Mutex<LogPace>,
    /// The same for requests answered `busy`.
    shed_logged: Mutex<LogPace>,
    /// The same for devices' `status` reports, at INFO.
    statuses_logged: Mutex<LogPace>,
    /// The same for requests dropped from a full queue ([`crate::mqtt`]).
    pub(crate) dropped_logged: Mutex<LogPace>,
    /// `roots` and `crosses` of replies, as last worked out: for the
    /// issuing root generation, at a second.
    pinned: Mutex<Option<PinnedRoots>>,
    /// When housekeeping last looked for devices that pin only roots
    /// near their end ([`Core::warn_roots_ending`]), Unix seconds.
    roots_ending_looked: Mutex<Option<u64>>,
}

/// `roots` and `crosses` of replies ([`Core::roots_to_pin`]), kept: they
/// change with a roll-over or when a root expires, and reading and checking
/// the cross-certificates for every reply would cost more than the reply.
struct PinnedRoots {
    generation: u32,
    at: u64,
    roots: Option<Vec<ByteBuf>>,
    crosses: Option<Vec<ByteBuf>>,
}

/// How far ahead [`Core::warn_roots_ending`] looks: half a year.
pub const ROOTS_ENDING_WITHIN_SECS: u64 = 183 * 86_400;

/// How often housekeeping runs [`Core::warn_roots_ending`]: daily.
const ROOTS_ENDING_EVERY_SECS: u64 = 86_400;

/// How long [`PinnedRoots`] are kept: a root that expires leaves the
/// replies within this long.
const PINNED_ROOTS_FOR_SECS: u64 = 60;

/// The request queue's counters, shown by `GET /v1/health`.
#[derive(Debug, Default)]
pub struct Intake {
    /// Requests taken from the broker since the start.
    pub received: std::sync::atomic::AtomicU64,
    /// Bytes of requests waiting for a worker now, by queue (tenant,
    /// registered ids, contested registered ids, other ids; topics.md §5.4).
    pub waiting_bytes: [std::sync::atomic::AtomicUsize; crate::mqtt::CLASSES],
    /// Requests answered `busy`.
    pub shed: std::sync::atomic::AtomicU64,
    /// Requests dropped because the queue was full.
    pub dropped: std::sync::atomic::AtomicU64,
}

/// Notes `now` in a device's `times` (oldest first), keeping the newest
/// `keep`.
fn note_time(times: &mut VecDeque<u64>, now: u64, keep: usize) {
    times.push_back(now);
    while times.len() > keep {
        times.pop_front();
    }
}

/// Drops from `times` (oldest first) those more than `window_ms` before
/// `now`.
fn forget_older(times: &mut VecDeque<u64>, now: u64, window_ms: u64) {
    while times
        .front()
        .is_some_and(|t| now.saturating_sub(*t) > window_ms)
    {
        times.pop_front();
    }
}

/// A request's nonce as a reply echoes it: empty if longer than any nonce a
/// device sends (64 bytes), so that a signed reply is never made to carry
/// kilobytes of the sender's choosing.
fn echoable(nonce: &[u8]) -> Vec<u8> {
    if nonce.len() <= 64 {
        nonce.to_vec()
    } else {
        Vec::new()
    }
}

/// The nonce of a request whose envelope and body pass checks 1 to 7 of
/// topics.md §5.3, without the rest; `None` otherwise.
fn request_nonce(kind: RequestKind, device_id: &str, payload: &[u8]) -> Option<Vec<u8>> {
    fn nonce_of<T: serde::de::DeserializeOwned + Identified>(
        env: &Envelope,
        device_id: &str,
    ) -> Option<Vec<u8>> {
        let body: T = env.body().ok()?;
        (body.device_id() == device_id).then(|| echoable(body.nonce()))
    }
    if payload.len() > MAX_MESSAGE_LEN {
        return None;
    }
    let env = Envelope::decode(payload).ok()?;
    if env.kind != Kind::from(kind) || !env.crc_ok() {
        return None;
    }
    match kind {
        RequestKind::Activate => nonce_of::<ActivateRequest>(&env, device_id),
        RequestKind::Update => nonce_of::<UpdateRequest>(&env, device_id),
        RequestKind::Poll => nonce_of::<PollRequest>(&env, device_id),
        RequestKind::Status => nonce_of::<StatusReport>(&env, device_id),
    }
}

impl Intake {
    /// Bytes of requests waiting for a worker now, in every queue.
    pub fn waiting(&self) -> usize {
        self.waiting_bytes
            .iter()
            .map(|b| b.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }
}

impl Core {
    /// Logs the count of lines each log pace kept quiet in a second that
    /// has ended (with `at_end`, in the second under way too).
    pub(crate) fn flush_logged(&self, at_end: bool) {
        for pace in [
            &self.refusals_logged,
            &self.shed_logged,
            &self.statuses_logged,
            &self.dropped_logged,
        ] {
            LogPace::flush_in(pace, at_end);
        }
    }

    pub fn new(store: Store, pki: Arc<Pki>, config: ManagerConfig) -> Core {
        let announcements = crate::notices::Announcements::new(config.max_notices_per_sec);
        Core {
            store,
            pki,
            config,
            intake: Intake::default(),
            announcements,
            failures: Mutex::new(HashMap::new()),
            refused_unchecked: Mutex::new(HashMap::new()),
            issued: Mutex::new(HashMap::new()),
            pinned: Mutex::new(None),
            roots_ending_looked: Mutex::new(None),
            refusals_logged: Mutex::new(LogPace::new(
                "refused requests logged",
                tracing::Level::WARN,
            )),
            shed_logged: Mutex::new(LogPace::new("requests answered busy", tracing::Level::WARN)),
            statuses_logged: Mutex::new(LogPace::new(
                "device statuses logged",
                tracing::Level::INFO,
            )),
            dropped_logged: Mutex::new(LogPace::new("requests dropped", tracing::Level::WARN)),
            pending_crls: Mutex::new(Default::default()),
            crl_writer: Mutex::new(()),
            grants_dirty: Mutex::new(Default::default()),
            stripes: (0..64).map(|_| Mutex::new(())).collect(),
        }
    }

    fn lock(&self, device_id: &str) -> std::sync::MutexGuard<'_, ()> {
        let h = crc32fast::hash(device_id.as_bytes()) as usize % self.stripes.len();
        self.stripes[h].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Handles one message from the broker. Anything on a request topic gets
    /// a reply; anything else is logged and dropped.
    pub fn handle(&self, topic: &str, payload: &[u8]) -> Vec<Outgoing> {
        let parsed = match Topic::parse(topic) {
            Ok(t) => t,
            Err(err) => {
                warn!(topic, error = ?err.to_string(), "message on an unknown topic dropped");
                return Vec::new();
            }
        };
        let (kind, device_id) = match &parsed.route {
            Route::Request(kind, device) => (*kind, device.clone()),
            _ => return Vec::new(),
        };
        let Some(reply_topic) = parsed.reply_topic() else {
            return Vec::new();
        };
        let _guard = self.lock(&device_id);
        let span = tracing::info_span!("request", device = %device_id, kind = %kind, tenant = ?parsed.tenant);
        let _enter = span.enter();

        let mut out = Vec::new();
        let (reply_bytes, after) = match self.process(kind, &parsed, &device_id, payload) {
            Ok(Outcome::Cached(bytes)) => {
                info!("identical retry answered from the reply cache");
                (self.signed_now(bytes), After::default())
            }
            Ok(Outcome::Reply {
                reply,
                mut batch,
                after,
            }) => {
                let nonce = reply.nonce.clone();
                match self.finish(kind, *reply, &mut batch) {
                    Ok(bytes) => (bytes, after),
                    Err(f) => {
                        if after.counted_certificate {
                            self.uncount_issued(&device_id);
                        }
                        (
                            self.error_reply(kind, &device_id, nonce, f),
                            After::default(),
                        )
                    }
                }
            }
            Err((nonce, f)) => (
                self.error_reply(kind, &device_id, nonce, f),
                After::default(),
            ),
        };
        out.push(Outgoing {
            topic: reply_topic.to_string(),
            payload: reply_bytes,
        });
        // Written once the reply is on its way (see `write_pending_crls`).
        self.crls_due(after.crl_for);
        if let Some(change) = after.settled {
            self.announcements.settled(&change);
        }
        // Sent again at once if it was announced lately; if not, it takes
        // its turn.
        if let Some(change) = after.announce {
            if self.announcements.was_announced(&change) {
                out.extend(self.notices_on_disk(&[change]).1);
            } else {
                self.announcements.push(vec![change]);
            }
        }
        out
    }

    /// Answers a request `busy` without carrying it out: it waited `waited`
    /// for a worker, longer than `shed_after_ms` (topics.md §5.4). Nothing
    /// is recorded (the reply takes a `seq`) and the request counts toward
    /// no limit; it takes no device lock. An identical copy of a request
    /// already carried out gets the reply recorded for it instead, as it
    /// would from [`Core::handle`]: a device whose reply was lost must not
    /// be sent to a fresh request that can no longer succeed (a second
    /// `activate`).
    pub fn busy(&self, topic: &str, payload: &[u8], waited: std::time::Duration) -> Vec<Outgoing> {
        let Ok(parsed) = Topic::parse(topic) else {
            return Vec::new();
        };
        let (Route::Request(kind, device_id), Some(reply_topic)) =
            (&parsed.route, parsed.reply_topic())
        else {
            return Vec::new();
        };
        let nonce = request_nonce(*kind, device_id, payload).unwrap_or_default();
        if let Some(cached) = self.recorded_reply(device_id, &nonce, payload) {
            return vec![Outgoing {
                topic: reply_topic.to_string(),
                payload: cached,
            }];
        }
        self.intake
            .shed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let loud = LogPace::loud_in(&self.shed_logged);
        let waited_ms = waited.as_millis();
        fleet_broker::paced!(loud, warn, device = %device_id, kind = %kind, waited_ms, "request answered busy: the manager is behind");
        let reply = Reply {
            device_id: device_id.clone(),
            nonce,
            status: Status::Busy,
            detail: Some(format!(
                "the manager is behind: this request waited {waited_ms} ms; send it again after a pause"
            )),
            ..Reply::default()
        };
        vec![Outgoing {
            topic: reply_topic.to_string(),
            payload: self.sign_reply(*kind, reply).unwrap_or_default(),
        }]
    }

    /// The reply recorded for `payload` under `nonce`, if this very request
    /// was carried out.
    fn recorded_reply(&self, device_id: &str, nonce: &[u8], payload: &[u8]) -> Option<Vec<u8>> {
        if nonce.is_empty() {
            return None;
        }
        let rec = self
            .store
            .nonce(&crate::store::nonce_key(device_id, nonce))
            .ok()??;
        let digest = hash(MessageDigest::sha256(), payload).ok()?;
        (rec.digest == digest.to_vec()).then_some(rec.reply)
    }

    /// Signs the reply, records it under the request's nonce together with
    /// the state change, and returns its bytes.
    fn finish(
        &self,
        kind: RequestKind,
        reply: Reply,
        batch: &mut Batch,
    ) -> Result<Vec<u8>, Failure> {
        let mut reply = reply;
        if reply.status == Status::Ok {
            (reply.roots, reply.crosses) = self.roots_to_pin();
        }
        // A change it carries is on disk before the device has it: an
        // operator's request for many devices flushes once at its end.
        let carries_change = reply.change.is_some();
        let bytes = self.sign_reply(kind, reply)?;
        if let Some((_, rec)) = batch.nonce.as_mut() {
            rec.reply = bytes.clone();
        }
        // An activation's UUID and an update's certificate are on disk
        // before the device has them: a device holding either that the
        // registry lost could not go on (its UUID refused; a certificate
        // for a service the registry does not give it); so is a
        // revocation, before its CRL. A poll or a status report otherwise
        // lost with the last half second before a crash changes nothing a
        // device relies on: sled writes it with its next flush, and the
        // device reports again at its next connection.
        let durable = matches!(kind, RequestKind::Activate | RequestKind::Update)
            || !batch.certs.is_empty()
            || carries_change;
        let committed = if durable {
            self.commit(batch)
        } else {
            self.apply(batch)
        };
        match committed {
            Ok(()) => Ok(bytes),
            Err(StoreError::Aborted(reason)) if reason == "nonce" => {
                fail(Status::Replayed, "nonce recorded concurrently")
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `roots` and `crosses` of a reply: every root that has not expired,
    /// newest first, and the cross-certificates that link them, once the
    /// first root has a successor (§8).
    fn roots_to_pin(&self) -> (Option<Vec<ByteBuf>>, Option<Vec<ByteBuf>>) {
        let now = fleet_protocol::now_ms() / 1000;
        let generation = self.pki.issuing_root_generation();
        let mut kept = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = kept.as_ref() {
            if p.generation == generation && now.abs_diff(p.at) < PINNED_ROOTS_FOR_SECS {
                return (p.roots.clone(), p.crosses.clone());
            }
        }
        let (roots, crosses) = self.pki.roots_to_pin(now);
        let der = |certs: Vec<openssl::x509::X509>| -> Option<Vec<ByteBuf>> {
            let ders: Vec<ByteBuf> = certs
                .iter()
                .filter_map(|c| c.to_der().ok().map(ByteBuf::from))
                .collect();
            (!ders.is_empty()).then_some(ders)
        };
        let (roots, crosses) = match der(roots) {
            Some(roots) => (Some(roots), der(crosses)),
            None => (None, None),
        };
        *kept = Some(PinnedRoots {
            generation,
            at: now,
            roots: roots.clone(),
            crosses: crosses.clone(),
        });
        (roots, crosses)
    }

    fn sign_reply(&self, kind: RequestKind, mut reply: Reply) -> Result<Vec<u8>, Failure> {
        reply.seq = self.store.next_id()?;
        let reply_kind = Kind::from(kind)
            .reply()
            .expect("request kinds have replies");
        Ok(self.manager_signed(reply_kind, &reply)?)
    }

    /// `body` as a manager message of `kind`: signed by the key that signs
    /// now, with its `signer` after a roll-over (topics.md §4.3).
    fn manager_signed<T: serde::Serialize>(
        &self,
        kind: Kind,
        body: &T,
    ) -> Result<Vec<u8>, ProtocolError> {
        let signing = self.pki.signing();
        let mut env = Envelope::build(kind, body, |tbs| crypto::sign(&signing.key, tbs))?;
        env.signer = signer_of(&signing);
        Ok(env.encode())
    }

    fn error_reply(
        &self,
        kind: RequestKind,
        device_id: &str,
        nonce: Vec<u8>,
        f: Failure,
    ) -> Vec<u8> {
        let mut f = f;
        if matches!(
            f.status,
            Status::AuthFailed | Status::Stale | Status::Replayed
        ) {
            // Too many recent failures: the answer becomes `rate_limited`,
            // telling the sender to back off. Only failing requests are
            // answered so; one that passes every check is served, so nobody
            // who merely knows a device id can lock the device out.
            if self.rate_limited(device_id) {
                f.detail = format!("too many failed attempts; back off ({})", f.detail);
                f.status = Status::RateLimited;
            }
            self.count_failure(device_id);
        } else if matches!(
            f.status,
            Status::BadCrc
                | Status::Malformed
                | Status::TooLarge
                | Status::UnsupportedVersion
                | Status::NotRegistered
        ) {
            // Anyone can send these under a registered id, and nothing
            // was checked to refuse them.
            self.count_unchecked(device_id);
        }
        let loud = LogPace::loud_in(&self.refusals_logged);
        // The detail may quote the request (a service id it named): cut.
        let detail = Shown(&f.detail);
        fleet_broker::paced!(loud, warn, status = %f.status, detail = %detail, "request refused");
        let reply = Reply {
            device_id: device_id.to_owned(),
            nonce,
            status: f.status,
            detail: Some(f.detail),
            ..Reply::default()
        };
        self.sign_reply(kind, reply).unwrap_or_default()
    }

    fn count_failure(&self, device_id: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Anyone may claim any device id: bound the table. Past the bound,
        // new ids go uncounted until housekeeping drops quiet ones.
        if map.len() >= MAX_FAILURE_ENTRIES && !map.contains_key(device_id) {
            return;
        }
        // Only the newest `max_auth_failures` matter.
        let times = map.entry(device_id.to_owned()).or_default();
        note_time(times, now_ms(), self.config.max_auth_failures.max(1));
    }

    /// Notes a refusal of a request for `device_id` that was refused before
    /// any authentication, if the id is registered (only then does it
    /// class a request, and ids nobody registered would fill the table).
    fn count_unchecked(&self, device_id: &str) {
        if !self.store.is_registered(device_id) {
            return;
        }
        let mut map = self
            .refused_unchecked
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_FAILURE_ENTRIES && !map.contains_key(device_id) {
            return;
        }
        map.insert(device_id.to_owned(), now_ms());
    }

    /// Forgets devices whose failures, and certificates issued, are all
    /// past their windows.
    pub fn prune_failures(&self) {
        let now = now_ms();
        // Devices whose newest time in `map` is older than `secs`.
        let forget = |map: &Mutex<HashMap<String, VecDeque<u64>>>, secs: u64| {
            map.lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, times| {
                    times
                        .back()
                        .is_some_and(|t| now.saturating_sub(*t) <= secs * 1000)
                });
        };
        forget(&self.failures, self.config.failure_window_secs);
        forget(&self.issued, self.config.certificate_window_secs);
        let window = self.config.failure_window_secs * 1000;
        self.refused_unchecked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, t| now.saturating_sub(*t) <= window);
    }

    /// Whether a request for `device_id` was refused within the failure
    /// window, failing its checks (`auth_failed`, `stale`, `replayed`) or
    /// before them (unreadable, `update` before activation): someone
    /// besides the device may be sending under its id (topics.md §5.4).
    pub fn contested(&self, device_id: &str) -> bool {
        let window = self.config.failure_window_secs * 1000;
        let now = now_ms();
        let recent = |t: &u64| now.saturating_sub(*t) <= window;
        let failed = self
            .failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(device_id)
            .and_then(VecDeque::back)
            .is_some_and(recent);
        failed
            || self
                .refused_unchecked
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(device_id)
                .is_some_and(recent)
    }

    /// Refuses (`rate_limited`) a certificate for `device_id` when it was
    /// issued `max_certificates_per_device` within
    /// `certificate_window_secs`.
    fn may_issue(&self, device_id: &str) -> Result<(), Failure> {
        let window = self.config.certificate_window_secs * 1000;
        let now = now_ms();
        let mut map = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        let Some(times) = map.get_mut(device_id) else {
            return Ok(());
        };
        forget_older(times, now, window);
        if times.len() < self.config.max_certificates_per_device {
            return Ok(());
        }
        let wait = times
            .front()
            .map_or(0, |t| (t + window).saturating_sub(now).div_ceil(1000));
        Err(Failure {
            status: Status::RateLimited,
            detail: format!(
                "{} certificates issued to this device within {} s; the next in {wait} s at the earliest",
                times.len(),
                window / 1000
            ),
        })
    }

    /// Takes back the newest certificate counted for `device_id`: its
    /// state was not committed, so the device got none.
    fn uncount_issued(&self, device_id: &str) {
        let mut map = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(times) = map.get_mut(device_id) {
            times.pop_back();
        }
    }

    fn count_issued(&self, device_id: &str) {
        let mut map = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        let times = map.entry(device_id.to_owned()).or_default();
        note_time(times, now_ms(), self.config.max_certificates_per_device);
    }

    fn rate_limited(&self, device_id: &str) -> bool {
        let window = self.config.failure_window_secs * 1000;
        let now = now_ms();
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let Some(times) = map.get_mut(device_id) else {
            return false;
        };
        forget_older(times, now, window);
        times.len() >= self.config.max_auth_failures
    }

    /// Envelope checks shared by every request: size, frame, kind, CRC,
    /// body, device id. Returns the nonce as soon as it is known so error
    /// replies can echo it.
    fn decode<'a, T: serde::de::DeserializeOwned + Identified>(
        &self,
        kind: RequestKind,
        device_id: &str,
        payload: &[u8],
        env: &'a Envelope,
    ) -> Result<Checked<'a, T>, (Vec<u8>, Failure)> {
        let nonce_less = |f: Failure| (Vec::new(), f);
        if env.kind != Kind::from(kind) {
            return Err(nonce_less(Failure {
                status: Status::Malformed,
                detail: format!("kind {} on the {kind} topic", env.kind.as_str()),
            }));
        }
        if !env.crc_ok() {
            return Err(nonce_less(Failure {
                status: Status::BadCrc,
                detail: "CRC-32 of body does not match".into(),
            }));
        }
        let body: T = env.body().map_err(|e| nonce_less(e.into()))?;
        let nonce = echoable(body.nonce());
        if body.device_id() != device_id {
            return Err((
                nonce,
                Failure {
                    status: Status::Malformed,
                    detail: "device id in body differs from the topic".into(),
                },
            ));
        }
        if nonce.len() < 8 || nonce.len() > 64 {
            return Err((
                nonce,
                Failure {
                    status: Status::Malformed,
                    detail: "nonce must be 8 to 64 bytes".into(),
                },
            ));
        }
        let digest = hash(MessageDigest::sha256(), payload)
            .map(|d| d.to_vec())
            .map_err(|e| (nonce.clone(), Failure::from(ProtocolError::from(e))))?;
        Ok(Checked {
            env,
            body,
            nonce,
            digest,
        })
    }

    /// Freshness and replay checks, after authentication.
    fn fresh<T: Identified>(&self, req: &Checked<'_, T>) -> Result<Option<Vec<u8>>, Failure> {
        let now = now_ms();
        if now.abs_diff(req.body.ts()) > self.config.max_clock_skew_ms {
            return fail(
                Status::Stale,
                format!(
                    "timestamp {} is {} ms from now",
                    req.body.ts(),
                    now.abs_diff(req.body.ts())
                ),
            );
        }
        match self
            .store
            .nonce(&crate::store::nonce_key(req.body.device_id(), &req.nonce))?
        {
            Some(rec) if rec.digest == req.digest => Ok(Some(rec.reply)),
            Some(_) => fail(
                Status::Replayed,
                "nonce already used by a different request",
            ),
            None => Ok(None),
        }
    }

    fn nonce_record<T: Identified>(&self, req: &Checked<'_, T>) -> (Vec<u8>, NonceRecord) {
        (
            crate::store::nonce_key(req.body.device_id(), &req.nonce),
            NonceRecord {
                sv: SCHEMA_VERSION,
                digest: req.digest.clone(),
                reply: Vec::new(),
                ts_ms: now_ms(),
            },
        )
    }

    fn process(
        &self,
        kind: RequestKind,
        topic: &Topic,
        device_id: &str,
        payload: &[u8],
    ) -> Result<Outcome, (Vec<u8>, Failure)> {
        if payload.len() > MAX_MESSAGE_LEN {
            return Err((Vec::new(), ProtocolError::TooLarge(payload.len()).into()));
        }
        let env = Envelope::decode(payload).map_err(|e| (Vec::new(), e.into()))?;
        match kind {
            RequestKind::Activate => {
                let req = self.decode::<ActivateRequest>(kind, device_id, payload, &env)?;
                let nonce = req.nonce.clone();
                self.activate(topic, req).map_err(|f| (nonce, f))
            }
            RequestKind::Update => {
                let req = self.decode::<UpdateRequest>(kind, device_id, payload, &env)?;
                let nonce = req.nonce.clone();
                self.update(topic, req).map_err(|f| (nonce, f))
            }
            RequestKind::Poll => {
                let req = self.decode::<PollRequest>(kind, device_id, payload, &env)?;
                let nonce = req.nonce.clone();
                self.poll(topic, req).map_err(|f| (nonce, f))
            }
            RequestKind::Status => {
                let req = self.decode::<StatusReport>(kind, device_id, payload, &env)?;
                let nonce = req.nonce.clone();
                self.status(topic, req).map_err(|f| (nonce, f))
            }
        }
    }

    fn activate(
        &self,
        topic: &Topic,
        req: Checked<'_, ActivateRequest>,
    ) -> Result<Outcome, Failure> {
        if topic.tenant.is_some() {
            return fail(Status::Malformed, "activate is a bootstrap request");
        }
        let d = &req.body.device_id;
        let Some(reg) = self.store.registration(d)? else {
            return fail(Status::UnknownDevice, "device id is not registered");
        };
        match &reg.factory_key {
            Some(key) => {
                let key = crypto::public_from_point(key).map_err(|_| Failure {
                    status: Status::Internal,
                    detail: "registered factory key is unusable".into(),
                })?;
                if !crypto::verify(&key, &req.env.tbs(), &req.env.auth) {
                    return fail(Status::AuthFailed, "factory-key signature does not verify");
                }
            }
            None if self.config.open_enrollment => {
                warn!(device = %d, "activation without factory key under open enrollment");
            }
            None => {
                return fail(
                    Status::AuthFailed,
                    "device has no factory key and open enrollment is off",
                )
            }
        }
        if let Some(cached) = self.fresh(&req)? {
            return Ok(Outcome::Cached(cached));
        }
        if self.store.device(d)?.is_some() {
            return fail(
                Status::AlreadyActive,
                "device is active; an operator must reset it first",
            );
        }
        let service_id = match &req.body.service_id {
            Some(s) if *s != reg.initial_service => {
                return fail(
                    Status::WrongService,
                    format!("device is registered for {}, not {s}", reg.initial_service),
                )
            }
            _ => reg.initial_service.clone(),
        };
        self.ensure_service(&service_id)?;
        let uuid = uuid::Uuid::new_v4();
        let sealed = crypto::seal(&req.body.eph, d, uuid.as_bytes())?;
        let device = DeviceRecord {
            sv: SCHEMA_VERSION,
            device_id: d.clone(),
            state: DeviceState::Active,
            uuid: uuid.as_bytes().to_vec(),
            service_id: service_id.clone(),
            provider: None,
            application: None,
            activated_ms: now_ms(),
            current_cert: None,
            open_period: None,
            pending: None,
            last_seen_ms: None,
            pending_revocation: Vec::new(),
            pinned_roots: None,
            pinned_roots_ts: None,
            signing_key: None,
            signing_key_ts: None,
        };
        info!(service = %service_id, "device activated");
        Ok(Outcome::Reply {
            reply: Box::new(Reply {
                device_id: d.clone(),
                nonce: req.nonce.clone(),
                status: Status::Ok,
                service_id: Some(service_id),
                uuid: Some(sealed),
                ..Reply::default()
            }),
            batch: Batch {
                device: Some(device),
                nonce: Some(self.nonce_record(&req)),
                ..Batch::default()
            },
            after: After::default(),
        })
    }

    /// Loads the device and checks the request's HMAC with its device-auth UUID.
    fn authenticate<T: Identified>(&self, req: &Checked<'_, T>) -> Result<DeviceRecord, Failure> {
        let d = req.body.device_id();
        let Some(device) = self.store.device(d)? else {
            if self.store.registration(d)?.is_some() {
                return fail(
                    Status::NotRegistered,
                    "device is registered but not activated",
                );
            }
            return fail(Status::UnknownDevice, "device id is not registered");
        };
        if !crypto::hmac_matches(&device.uuid, &req.env.tbs(), &req.env.auth) {
            return fail(Status::AuthFailed, "HMAC does not verify");
        }
        Ok(device)
    }

    /// Requests on a tenant topic must come from that tenant's current service.
    ///
    /// A device that has just re-keyed may still speak from its previous
    /// tenant (the reply with its new certificate was lost, say, and it asks
    /// again): until its old certificate is revoked, that tenant counts too.
    fn check_tenant(
        &self,
        topic: &Topic,
        device: &DeviceRecord,
        claimed: &str,
    ) -> Result<(), Failure> {
        if let Some(tenant) = &topic.tenant {
            let previous = || -> Result<bool, Failure> {
                for serial in &device.pending_revocation {
                    if self
                        .store
                        .cert(serial)?
                        .is_some_and(|c| c.service_id == *tenant)
                    {
                        return Ok(true);
                    }
                }
                Ok(false)
            };
            if *tenant != device.service_id && !previous()? {
                return fail(
                    Status::WrongService,
                    format!(
                        "request in tenant {tenant}, device is on {}",
                        device.service_id
                    ),
                );
            }
        }
        let pending = device.pending.as_ref().map(|p| p.service_id.as_str());
        if claimed != device.service_id && Some(claimed) != pending {
            return fail(
                Status::WrongService,
                format!("device is on {}, not {claimed}", device.service_id),
            );
        }
        Ok(())
    }

    fn update(&self, topic: &Topic, req: Checked<'_, UpdateRequest>) -> Result<Outcome, Failure> {
        let device = self.authenticate(&req)?;
        if let Some(cached) = self.fresh(&req)? {
            return Ok(Outcome::Cached(cached));
        }
        let target = req.body.service_id.clone();
        self.check_tenant(topic, &device, &target)?;
        let migrating = target != device.service_id;
        let d = device.device_id.clone();
        self.may_issue(&d)?;

        let eph = req.body.eph.clone();
        crypto::public_from_point(&eph).map_err(|_| Failure {
            status: Status::Malformed,
            detail: "eph is not a P-256 point".into(),
        })?;
        let (public, generated): (PKey<Public>, Option<Sealed>) = match &req.body.csr {
            Some(csr) => (
                Pki::public_key_from_csr(csr).map_err(|e| Failure {
                    status: Status::Malformed,
                    detail: format!("CSR refused: {e}"),
                })?,
                None,
            ),
            None => {
                let key = crypto::generate_p256()?;
                let der = key.private_key_to_pkcs8().map_err(ProtocolError::from)?;
                let public = PKey::public_key_from_der(
                    &key.public_key_to_der().map_err(ProtocolError::from)?,
                )
                .map_err(ProtocolError::from)?;
                (public, Some(crypto::seal(&eph, &d, &der)?))
            }
        };
        let issued = self.pki.issue_device_certificate(
            &d,
            &target,
            &public,
            self.config.cert_lifetime_days,
        )?;
        let now = now_ms();
        let mut batch = Batch {
            nonce: Some(self.nonce_record(&req)),
            ..Batch::default()
        };
        let mut after = After {
            counted_certificate: true,
            ..After::default()
        };
        let key_mode = if generated.is_some() {
            "manager"
        } else {
            "csr"
        };
        batch
            .certs
            .push(active_record(&issued, &d, &target, key_mode, now)?);
        let mut next = device.clone();
        if let Some(old_serial) = &device.current_cert {
            if let Some(mut old) = self.store.cert(old_serial)? {
                // Superseded now, revoked once the device reports with the
                // new certificate: until then this reply may still be on
                // its way over the old certificate's session.
                old.status = CertStatus::Superseded;
                old.superseded_by = Some(issued.serial_hex.clone());
                old.superseded_ms = Some(now);
                next.pending_revocation.push(old.serial.clone());
                batch.certs.push(old);
            }
        }
        next.current_cert = Some(issued.serial_hex.clone());
        let new_period =
            |reason: &str, change_id: Option<String>, provider, application| ServicePeriod {
                sv: SCHEMA_VERSION,
                device_id: d.clone(),
                service_id: target.clone(),
                provider,
                application,
                started_ms: now,
                ended_ms: None,
                reason: reason.into(),
                end_reason: None,
                change_id,
                confirmed_ms: None,
                cert_serial: issued.serial_hex.clone(),
            };
        if migrating {
            let pending = device
                .pending
                .clone()
                .expect("check_tenant allows only the pending service");
            if let Some(n) = device.open_period {
                if let Some(mut open) = self.store.period(&d, n)? {
                    open.ended_ms = Some(now);
                    open.end_reason = Some("service_change".into());
                    batch.periods.push((n, open));
                }
            }
            let n = self.store.next_id()?;
            batch.periods.push((
                n,
                new_period(
                    "service_change",
                    Some(pending.change_id.clone()),
                    pending.provider.clone(),
                    pending.application.clone(),
                ),
            ));
            next.open_period = Some(n);
            next.service_id = target.clone();
            next.provider = pending.provider;
            next.application = pending.application;
            next.pending = None;
            info!(service = %target, change = %pending.change_id, serial = %issued.serial_hex, "device re-keyed to its new service");
            after.settled = Some(crate::notices::QueuedChange {
                device_id: d.clone(),
                change_id: pending.change_id,
            });
        } else if device.open_period.is_none() {
            let n = self.store.next_id()?;
            batch.periods.push((
                n,
                new_period(
                    "activated",
                    None,
                    device.provider.clone(),
                    device.application.clone(),
                ),
            ));
            next.open_period = Some(n);
            info!(service = %target, serial = %issued.serial_hex, "first certificate issued");
        } else {
            info!(service = %target, serial = %issued.serial_hex, "certificate renewed");
        }
        batch.device = Some(next);
        let reply = Box::new(Reply {
            device_id: d,
            nonce: req.nonce.clone(),
            status: Status::Ok,
            service_id: Some(target),
            chain: Some(
                issued
                    .chain
                    .iter()
                    .map(|c| c.to_der().map(ByteBuf::from))
                    .collect::<Result<_, _>>()
                    .map_err(ProtocolError::from)?,
            ),
            key: generated,
            ..Reply::default()
        });
        // Counted once nothing here can fail; taken back if the commit does.
        self.count_issued(&reply.device_id);
        Ok(Outcome::Reply {
            reply,
            batch,
            after,
        })
    }

    fn poll(&self, topic: &Topic, req: Checked<'_, PollRequest>) -> Result<Outcome, Failure> {
        let device = self.authenticate(&req)?;
        if let Some(cached) = self.fresh(&req)? {
            return Ok(Outcome::Cached(cached));
        }
        self.check_tenant(topic, &device, &req.body.service_id)?;
        Ok(Outcome::Reply {
            reply: Box::new(Reply {
                device_id: device.device_id.clone(),
                nonce: req.nonce.clone(),
                status: Status::Ok,
                service_id: Some(device.service_id.clone()),
                change: self.announce_in_poll(&device),
                ..Reply::default()
            }),
            batch: Batch {
                nonce: Some(self.nonce_record(&req)),
                ..Batch::default()
            },
            after: After::default(),
        })
    }

    /// The pending change for a poll reply, if it may be announced now
    /// ([`crate::notices::Announcements::may_announce`]); if not, it is
    /// queued for its notices instead, which follow when its turn comes
    /// (topics.md §7.4, "Pace").
    fn announce_in_poll(&self, device: &DeviceRecord) -> Option<ServiceChange> {
        let pending = device.pending.as_ref()?;
        let change = crate::notices::QueuedChange::pending_of(device)?;
        self.announcements
            .may_announce(&change)
            .then(|| notice_body(&device.device_id, pending))
    }

    fn status(&self, topic: &Topic, req: Checked<'_, StatusReport>) -> Result<Outcome, Failure> {
        let device = self.authenticate(&req)?;
        if let Some(cached) = self.fresh(&req)? {
            return Ok(Outcome::Cached(cached));
        }
        self.check_tenant(topic, &device, &req.body.service_id)?;
        let pinned = pinned_roots_of(&req.body)?;
        let signing_key = match &req.body.signing_key {
            None => None,
            Some(d) => Some(
                <[u8; 32]>::try_from(d.as_slice())
                    .or_else(|_| fail(Status::Malformed, "signing_key is not 32 bytes"))?,
            ),
        };
        let mut batch = Batch {
            nonce: Some(self.nonce_record(&req)),
            ..Batch::default()
        };
        let mut after = After::default();
        let now = now_ms();
        // The device's words, quoted (a newline or an escape sequence in
        // them cannot forge a log line) and cut (`Shown`), at INFO up to 20
        // a second.
        let loud = LogPace::loud_in(&self.statuses_logged);
        let (event, detail) = (
            Shown(&req.body.event),
            Shown(req.body.detail.as_deref().unwrap_or_default()),
        );
        fleet_broker::paced!(loud, info, event = %event, detail = %detail, "device status");
        match req.body.event.as_str() {
            // From the tenant of the current service only: a device that
            // moved may still report from its old tenant (where it asked
            // for its new certificate), which proves nothing of the new one.
            "online" | "change_applied"
                if req.body.service_id == device.service_id
                    && topic.tenant.as_deref() == Some(device.service_id.as_str()) =>
            {
                let mut next = device.clone();
                next.last_seen_ms = Some(now);
                // It reports from its current certificate: the ones it
                // replaced are no longer needed by anyone.
                for serial in std::mem::take(&mut next.pending_revocation) {
                    if let Some(mut old) = self.store.cert(&serial)? {
                        old.revoked_ms = Some(now);
                        after.crl_for.insert(old.service_id.clone());
                        batch.certs.push(old);
                    }
                }
                if let Some(n) = device.open_period {
                    if let Some(mut p) = self.store.period(&device.device_id, n)? {
                        if p.confirmed_ms.is_none() {
                            p.confirmed_ms = Some(now);
                            batch.periods.push((n, p));
                        }
                    }
                }
                after.announce = crate::notices::QueuedChange::pending_of(&next);
                batch.device = Some(next);
            }
            _ => {}
        }
        // Which of the fleet's roots it pins, whatever the event, from any
        // tenant it may report from: its word about itself, under its HMAC.
        // A report older (by its `ts`) than the one that last changed them
        // says nothing new: a report sent again after a `busy` may carry
        // the roots from before a later `roots_pinned`.
        if let Some(digests) = pinned {
            let generations = self.pki.root_generations_of(&digests);
            let newer = device.pinned_roots_ts.map_or(true, |at| req.body.ts >= at);
            if newer && device.pinned_roots.as_ref() != Some(&generations) {
                let next = batch.device.get_or_insert_with(|| device.clone());
                next.pinned_roots = Some(generations);
                next.pinned_roots_ts = Some(req.body.ts);
            }
        }
        // Likewise the signing key it takes messages by.
        if let Some(digest) = signing_key {
            let generation = self.pki.signing().generation_of(&digest);
            let newer = device.signing_key_ts.map_or(true, |at| req.body.ts >= at);
            if newer && generation.is_some() && device.signing_key != generation {
                let next = batch.device.get_or_insert_with(|| device.clone());
                next.signing_key = generation;
                next.signing_key_ts = Some(req.body.ts);
            }
        }
        Ok(Outcome::Reply {
            reply: Box::new(Reply {
                device_id: device.device_id.clone(),
                nonce: req.nonce.clone(),
                status: Status::Ok,
                ..Reply::default()
            }),
            batch,
            after,
        })
    }

    /// Services whose CRLs are to be written (see `write_pending_crls`).
    fn crls_due(&self, services: std::collections::BTreeSet<String>) {
        self.pending_crls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(services);
    }

    /// Revokes superseded certificates whose devices never reported from
    /// their new certificate within `grace_ms`. Returns how many.
    pub fn revoke_overdue(&self, grace_ms: u64) -> Result<usize, StoreError> {
        let now = now_ms();
        let mut revoked = 0;
        let mut crl_for = std::collections::BTreeSet::new();
        for device in self.store.devices()? {
            if device.pending_revocation.is_empty() {
                continue;
            }
            let _guard = self.lock(&device.device_id);
            let Some(mut device) = self.store.device(&device.device_id)? else {
                continue;
            };
            let mut keep = Vec::new();
            let mut certs = Vec::new();
            for serial in std::mem::take(&mut device.pending_revocation) {
                match self.store.cert(&serial)? {
                    Some(mut c)
                        if c.superseded_ms
                            .is_some_and(|t| now.saturating_sub(t) >= grace_ms) =>
                    {
                        c.revoked_ms = Some(now);
                        c.revoked_at_grace_end = true;
                        crl_for.insert(c.service_id.clone());
                        certs.push(c);
                    }
                    Some(_) => keep.push(serial),
                    None => {}
                }
            }
            device.pending_revocation = keep;
            let n = certs.len();
            let applied = self.apply(&Batch {
                device: Some(device),
                certs,
                ..Batch::default()
            });
            if let Err(err) = applied {
                // What was applied is flushed and its CRLs written.
                self.store.sync()?;
                self.crls_due(crl_for);
                return Err(err);
            }
            revoked += n;
        }
        // One flush for them all; their CRLs are written after it, never
        // listing a revocation the store could lose.
        self.store.sync()?;
        self.crls_due(crl_for);
        if revoked > 0 {
            info!(
                revoked,
                "superseded certificates revoked after the grace period"
            );
        }
        Ok(revoked)
    }

    pub fn has_pending_crls(&self) -> bool {
        !self
            .pending_crls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// Rewrites the CRLs that handled requests left pending. Called after
    /// their replies are published.
    pub fn write_pending_crls(&self) {
        let services =
            std::mem::take(&mut *self.pending_crls.lock().unwrap_or_else(|p| p.into_inner()));
        for service in services {
            if let Err(err) = self.publish_crl(&service) {
                warn!(service, error = %err, "CRL not written");
            }
        }
    }

    /// Rewrites the CRL of every service that issued one of `certs`.
    fn publish_crls_of(&self, certs: &[CertRecord]) -> Result<(), Failure> {
        let services: std::collections::BTreeSet<&str> =
            certs.iter().map(|c| c.service_id.as_str()).collect();
        for service in services {
            self.publish_crl(service)?;
        }
        Ok(())
    }

    /// Rewrites the CRL of each generation of a service's CA from its
    /// revocation list: each lists the revoked certificates it issued.
    /// Returns the path of the issuing generation's CRL.
    pub fn publish_crl(&self, service_id: &str) -> Result<std::path::PathBuf, Failure> {
        let _writer = self.crl_writer.lock().unwrap_or_else(|p| p.into_inner());
        self.publish_crl_locked(service_id)
    }

    fn publish_crl_locked(&self, service_id: &str) -> Result<std::path::PathBuf, Failure> {
        let revoked = self.store.revoked_of(service_id)?;
        let mut generations = self.pki.service_ca_generations(service_id)?;
        if generations.is_empty() {
            // A service that never had a CA: its first is made here.
            self.pki.service_ca(service_id)?;
            generations = self.pki.service_ca_generations(service_id)?;
        }
        // The issuing generation first, and each one whatever became of
        // the others: one damaged older key must not hold back the rest.
        let mut written = None;
        let mut failed = None;
        for ca in generations.iter().rev() {
            let entries: Vec<RevokedEntry> = revoked
                .iter()
                .filter(|r| r.ca_generation == ca.generation)
                .map(|r| RevokedEntry {
                    serial_hex: r.serial.clone(),
                    revoked_at: r.at_ms / 1000,
                })
                .collect();
            let number = self.store.next_id()?;
            match self
                .pki
                .write_crl(service_id, ca.generation, &entries, number)
            {
                Ok(path) => {
                    written.get_or_insert(path);
                }
                Err(err) => {
                    warn!(service_id, generation = ca.generation, error = %err, "CRL not written");
                    failed.get_or_insert(Failure::from(err));
                }
            }
        }
        match (failed, written) {
            (Some(failure), _) => Err(failure),
            (None, Some(path)) => Ok(path),
            (None, None) => fail(
                Status::Internal,
                format!("service {service_id} has no CA files in services/"),
            ),
        }
    }

    /// Writes again the root's CRL and every service's CRLs past half
    /// their validity (housekeeping), so that none expires while nothing
    /// is revoked: a broker that checks CRLs would then refuse the
    /// service's certificates.
    pub fn refresh_crls(&self) {
        if let Err(err) = self.pki.refresh_root_crl() {
            warn!(error = %err, "root CRL not written");
        }
        let services = match self.pki.services_with_crls_due() {
            Ok(services) => services,
            Err(err) => {
                warn!(error = %err, "service CAs not listed: CRLs not renewed");
                return;
            }
        };
        for service in services {
            if let Err(err) = self.publish_crl(&service) {
                warn!(service, error = %err, "CRL not renewed");
            }
        }
    }

    /// Makes sure a service has its CA, created on first use, and a CRL
    /// file for it, empty if nothing is revoked: brokers that check CRLs
    /// (mosquitto's `crlfile`) refuse certificates of a CA without one.
    pub fn ensure_service(&self, service_id: &str) -> Result<(), Failure> {
        let ca = self.pki.issuing_generation(service_id)?;
        if !ca.crl_path.exists() {
            self.publish_crl(service_id)?;
        }
        Ok(())
    }

    /// Makes a successor of the service's issuing CA, with its CRL (see
    /// [`fleet_pki::Pki::roll_service_ca`]). The certificates the older
    /// CAs issued stay good: devices move to the new one as they renew.
    /// With `retire_older` (a CA key known to be stolen), then
    /// [`Core::retire_older_service_cas`].
    pub fn roll_service_ca(
        &self,
        service_id: &str,
        retire_older: bool,
    ) -> Result<RolledCa, Failure> {
        let ca = {
            let _writer = self.crl_writer.lock().unwrap_or_else(|p| p.into_inner());
            let number = self.store.next_id()?;
            self.pki.roll_service_ca(service_id, number)?
        };
        info!(
            service_id,
            generation = ca.generation,
            serial = %ca.serial_hex,
            not_after = ca.not_after,
            "service CA rolled over"
        );
        self.audit_quietly(
            "service_ca_roll",
            format!(
                "{service_id}: generation {} (serial {})",
                ca.generation, ca.serial_hex
            ),
        );
        let generation = ca.generation;
        let mut rolled = RolledCa {
            ca,
            revoked: 0,
            retired: Vec::new(),
        };
        if retire_older {
            let (revoked, retired) =
                self.retire_older_service_cas(service_id)
                    .map_err(|f| Failure {
                        status: f.status,
                        detail: format!(
                            "rolled over to generation {generation}, but the older generations are not all retired ({}): `service-ca {service_id} --retire-older` finishes it",
                            f.detail
                        ),
                    })?;
            rolled.revoked = revoked;
            rolled.retired = retired;
        }
        Ok(rolled)
    }

    /// For a CA key known to be stolen: every certificate of the service
    /// that a generation older than the issuing one issued, and that has
    /// neither expired nor been revoked, is revoked and listed in its CRL
    /// (so live sessions that use it are cut), and then those generations
    /// are retired at once: their keys deleted, their certificates no
    /// longer trusted ([`fleet_pki::Pki::retire_service_cas`]). Each device
    /// is refused at its next handshake and asks the bootstrap listener for
    /// a certificate from the issuing generation (topics.md §10.1 step 7);
    /// providers need new certificates (`provider-add`). Run again after an
    /// error, it finishes the job. Returns the certificates revoked and the
    /// generations retired.
    pub fn retire_older_service_cas(&self, service_id: &str) -> Result<(usize, Vec<u32>), Failure> {
        let issuing = self.pki.issuing_generation(service_id)?.generation;
        let done = (|| {
            // Each owner's certificates under its lock, and never with the
            // CRL writer held: `reset` and the providers' calls take an
            // owner's lock and then the CRL writer.
            let mut revoked = self.revoke_generations_before(service_id, issuing)?;
            self.publish_crl(service_id)?;
            // A certificate from an older generation whose issuing began
            // before the roll and was recorded since.
            let late = self.revoke_generations_before(service_id, issuing)?;
            let _writer = self.crl_writer.lock().unwrap_or_else(|p| p.into_inner());
            if late > 0 {
                revoked += late;
                self.publish_crl_locked(service_id)?;
            }
            // Their CRLs are signed: the keys can go.
            let retired: Vec<u32> = self
                .pki
                .retire_service_cas(service_id, issuing)?
                .into_iter()
                .map(|ca| ca.generation)
                .collect();
            Ok::<_, Failure>((revoked, retired))
        })();
        match &done {
            Ok((revoked, retired)) => {
                warn!(
                    service_id,
                    revoked,
                    retired = ?retired,
                    "older service CAs retired before their end and their certificates revoked"
                );
                self.audit_quietly(
                    "service_ca_retire",
                    format!(
                        "{service_id}: generations {retired:?} retired, {revoked} certificates revoked"
                    ),
                );
            }
            Err(f) => {
                warn!(service_id, error = %f, "older service CAs not retired");
                self.audit_quietly(
                    "service_ca_retire",
                    format!("{service_id}: failed, to be run again: {f}"),
                );
            }
        }
        done
    }

    /// An audit record whose failure is logged, not returned: for actions
    /// already done.
    fn audit_quietly(&self, action: &str, detail: String) {
        if let Err(err) = self.store.audit(action, None, detail) {
            warn!(action, error = %err, "not in the audit log");
        }
    }

    /// Revokes every certificate of `service_id` that a CA generation below
    /// `generation` issued and that has neither expired nor been revoked,
    /// each owner's under its lock; one flush for them all. Returns how
    /// many.
    fn revoke_generations_before(
        &self,
        service_id: &str,
        generation: u32,
    ) -> Result<usize, Failure> {
        let now = now_ms();
        // One scan, then each owner's records read again by serial under
        // its lock (a handler may have changed them meanwhile).
        let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for c in self.store.certs()? {
            if c.service_id == service_id && c.ca_generation < generation && c.is_live(now) {
                owners.entry(c.device_id).or_default().push(c.serial);
            }
        }
        let mut revoked = 0;
        for (owner, serials) in owners {
            let _guard = self.lock(&owner);
            let mut batch = Batch::default();
            for serial in serials {
                let Some(mut c) = self.store.cert(&serial)? else {
                    continue;
                };
                if c.is_live(now) && revoke(&mut c, now) {
                    batch.certs.push(c);
                }
            }
            if !batch.certs.is_empty() {
                revoked += batch.certs.len();
                self.apply(&batch)?;
            }
        }
        self.store.sync()?;
        Ok(revoked)
    }

    /// Makes a successor of the fleet's root CA
    /// ([`fleet_pki::Pki::roll_root`]) and issues the server certificates
    /// again from it at once, with its cross-certificate, so that brokers
    /// serve it within a second. Devices learn it from their next reply
    /// (`roots`, §8); service CAs move to it as they roll over.
    pub fn roll_root(&self) -> Result<fleet_pki::RootGeneration, Failure> {
        let root = self.pki.roll_root()?;
        self.rolled_root(&root);
        Ok(root)
    }

    /// After a root roll-over: the log, the audit log and the server
    /// certificates.
    fn rolled_root(&self, root: &fleet_pki::RootGeneration) {
        info!(
            generation = root.generation,
            serial = %root.serial_hex,
            not_after = root.not_after,
            "root CA rolled over"
        );
        self.audit_quietly(
            "root_ca_roll",
            format!(
                "generation {} (serial {})",
                root.generation, root.serial_hex
            ),
        );
        self.renew_server_certs();
    }

    /// A successor of the manager's signing key, certified by the root
    /// that issues now: it signs every message from then on, which carry
    /// its certificate (`signer`, topics.md §4.3), so devices take it by
    /// the roots they pin. Logged and audited.
    pub fn roll_signing_key(&self) -> Result<fleet_pki::SigningGeneration, Failure> {
        let rolled = self.pki.roll_signing_key()?;
        self.rolled_signing_key(&rolled, "");
        Ok(rolled)
    }

    /// Logs and audits a signing key roll-over (`why`, if any, said after
    /// its generation).
    fn rolled_signing_key(&self, rolled: &fleet_pki::SigningGeneration, why: &str) {
        info!(
            generation = rolled.generation,
            why, "manager signing key rolled over"
        );
        self.audit_quietly(
            "signing_key_roll",
            format!("generation {}{why}", rolled.generation),
        );
    }

    /// Housekeeping for the root CA: a successor once it has less than
    /// two years left.
    pub fn maintain_root(&self) {
        let now = fleet_protocol::now_ms() / 1000;
        match self.pki.roll_root_if_due(now) {
            Ok(None) => {}
            Ok(Some(root)) => self.rolled_root(&root),
            Err(err) => warn!(error = %err, "root CA not rolled over"),
        }
        // A successor signing key's certificate ends with its root at the
        // latest: rolled over with the root, after it.
        match self.pki.roll_signing_key_if_due(now) {
            Ok(None) => {}
            Ok(Some(rolled)) => self.rolled_signing_key(&rolled, " (with the root)"),
            Err(err) => warn!(error = %err, "manager signing key not rolled over"),
        }
        // Also drops a root that has expired, and retries a failed write.
        if let Err(err) = self.pki.write_roots_bundle() {
            warn!(error = %err, "roots.pem not written");
        }
        let due = {
            let mut looked = self
                .roots_ending_looked
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let due = looked.map_or(true, |at| now.saturating_sub(at) >= ROOTS_ENDING_EVERY_SECS);
            if due {
                *looked = Some(now);
            }
            due
        };
        if due {
            if let Err(err) = self.warn_roots_ending(now) {
                warn!(error = %err, "devices' pinned roots not looked at");
            }
        }
    }

    /// Says, at WARN, how many devices pin no root but those that end
    /// within [`ROOTS_ENDING_WITHIN_SECS`] from `now` (by the
    /// `pinned_roots` of their reports), and how many never said which
    /// roots they pin, while a root ends within that time: when it ends, a
    /// device that pins only it can verify the broker no more. Returns
    /// those counts.
    pub fn warn_roots_ending(&self, now: u64) -> Result<(usize, usize), Failure> {
        let roots = self.pki.root_generations()?;
        let ending: Vec<u32> = roots
            .iter()
            .filter(|r| (now..now + ROOTS_ENDING_WITHIN_SECS).contains(&r.not_after))
            .map(|r| r.generation)
            .collect();
        let Some(first_end) = roots
            .iter()
            .filter(|r| ending.contains(&r.generation))
            .map(|r| r.not_after)
            .min()
        else {
            return Ok((0, 0));
        };
        let (mut stranded, mut silent) = (0, 0);
        for d in self.store.devices()? {
            match &d.pinned_roots {
                Some(p) if p.iter().all(|g| ending.contains(g)) => stranded += 1,
                Some(_) => {}
                None => silent += 1,
            }
        }
        if stranded + silent > 0 {
            warn!(
                devices = stranded,
                not_saying = silent,
                ending = ?ending,
                days_left = first_end.saturating_sub(now) / 86_400,
                "devices pin no root that outlasts the root CA ending soonest: they need a report answered with the roots to pin before it ends (GET /v1/root-ca lists them)"
            );
        }
        Ok((stranded, silent))
    }

    /// The broker's (and with `admin_tls` the operator API's) server
    /// certificate, issued again past half its validity, after a root
    /// roll-over, or (with `server_names`) when the files no longer name
    /// those names.
    pub fn renew_server_certs(&self) {
        let names = self.config.broker_names().ok().flatten();
        if let Err(err) = self.pki.ensure_broker_cert(names.as_ref()) {
            warn!(error = %err, "broker certificate not renewed");
        }
        if self.config.admin_tls {
            if let Err(err) = self.pki.ensure_admin_cert(names.as_ref()) {
                warn!(error = %err, "operator API certificate not renewed");
            }
        }
    }

    /// Housekeeping for service CAs: a successor for each issuing CA with
    /// less than a year left, and the generations past their end retired.
    pub fn maintain_service_cas(&self) {
        let now = fleet_protocol::now_ms() / 1000;
        let services = match self.pki.services_with_ca() {
            Ok(services) => services,
            Err(err) => {
                warn!(error = %err, "service CAs not listed");
                return;
            }
        };
        for service in &services {
            match self.pki.roll_due(service, now) {
                Ok(false) => {}
                Ok(true) => {
                    if let Err(err) = self.roll_service_ca(service, false) {
                        warn!(service, error = %err, "service CA not rolled over");
                    }
                }
                Err(err) => warn!(service, error = %err, "service CA not checked"),
            }
        }
        let _writer = self.crl_writer.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(err) = self.pki.retire_expired_service_cas(now) {
            warn!(error = %err, "expired service CAs not retired");
        }
    }

    /// Commits a batch, then brings the broker's grants of the device it
    /// writes or removes up to date, before any reply relying on them is
    /// sent.
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.store.commit(batch)?;
        self.after_commit(batch);
        Ok(())
    }

    /// [`Core::commit`] without waiting for the disk, for a run of
    /// batches that ends with one [`Store::sync`].
    fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        self.store.apply(batch)?;
        self.after_commit(batch);
        Ok(())
    }

    /// The broker's grants after a batch.
    fn after_commit(&self, batch: &Batch) {
        if let Some(device) = &batch.device {
            self.publish_grants(device);
        }
        if let Some(id) = &batch.remove_device {
            if let Err(err) = grants::remove_grants(self.pki.dir(), id) {
                warn!(device = %id, error = %err, "broker grants not removed; retried later");
                self.grants_to_retry(id);
            }
        }
    }

    /// An operator's reset: closes the open period, revokes every
    /// certificate of the device not yet revoked, and forgets the device
    /// (its registration stays, so it may activate again), in one
    /// transaction; then withdraws its broker grants and rewrites the CRLs.
    /// Returns false if the device is not active.
    pub fn reset(&self, device_id: &str) -> Result<bool, Failure> {
        let _guard = self.lock(device_id);
        let Some(device) = self.store.device(device_id)? else {
            return Ok(false);
        };
        let now = now_ms();
        let mut batch = Batch {
            remove_device: Some(device_id.to_owned()),
            ..Batch::default()
        };
        if let Some(n) = device.open_period {
            if let Some(mut p) = self.store.period(device_id, n)? {
                p.ended_ms = Some(now);
                p.end_reason = Some("reset".into());
                batch.periods.push((n, p));
            }
        }
        for serial in device
            .current_cert
            .iter()
            .chain(device.pending_revocation.iter())
        {
            if let Some(mut c) = self.store.cert(serial)? {
                if revoke(&mut c, now) {
                    batch.certs.push(c);
                }
            }
        }
        self.commit(&batch)?;
        if let Some(change) = crate::notices::QueuedChange::pending_of(&device) {
            self.announcements.settled(&change);
        }
        // Its certificates are revoked: after its next activation it may
        // have its first at once, whatever it was issued this hour.
        self.issued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(device_id);
        self.store
            .audit("reset", Some(device_id), "device reset by operator".into())?;
        self.publish_crls_of(&batch.certs)?;
        info!(
            device = device_id,
            revoked = batch.certs.len(),
            "device reset"
        );
        Ok(true)
    }

    /// Issues service provider `name` a certificate for `service_id` with a
    /// key generated here, revokes its earlier certificates for that
    /// service, and grants it the service at the broker. The provider then
    /// reads `/tenants/{service_id}/telemetry/+` on the service listener
    /// with client id `provider.{name}`.
    pub fn issue_provider(
        &self,
        name: &str,
        service_id: &str,
    ) -> Result<ProviderCredentials, Failure> {
        fleet_protocol::topic::validate_service_id(service_id).map_err(|_| Failure {
            status: Status::Malformed,
            detail: format!("bad service id {service_id:?}"),
        })?;
        fleet_protocol::topic::validate_device_id(name).map_err(|_| Failure {
            status: Status::Malformed,
            detail: format!("bad provider name {name:?} (1-64 of A-Z a-z 0-9 - _)"),
        })?;
        let principal = grants::provider_principal(name);
        let _guard = self.lock(&principal);
        self.ensure_service(service_id)?;
        let key = crypto::generate_p256()?;
        let public =
            PKey::public_key_from_der(&key.public_key_to_der().map_err(ProtocolError::from)?)
                .map_err(ProtocolError::from)?;
        let issued = self.pki.issue_provider_certificate(
            name,
            service_id,
            &public,
            self.config.cert_lifetime_days,
        )?;
        let now = now_ms();
        let mut batch = Batch::default();
        for mut old in self.store.certs_of(&principal)? {
            if old.service_id == service_id && revoke(&mut old, now) {
                old.superseded_by = Some(issued.serial_hex.clone());
                old.superseded_ms = Some(now);
                batch.certs.push(old);
            }
        }
        let replaced = batch.certs.len();
        batch.certs.push(active_record(
            &issued, &principal, service_id, "manager", now,
        )?);
        self.commit(&batch)?;
        if replaced > 0 {
            self.publish_crl(service_id)?;
        }
        self.write_provider_grants(&principal);
        self.store.audit(
            "provider_issued",
            Some(&principal),
            format!("service {service_id} serial {}", issued.serial_hex),
        )?;
        info!(
            provider = name,
            service = service_id,
            replaced,
            "provider certificate issued"
        );
        Ok(ProviderCredentials {
            client_id: principal,
            serial: issued.serial_hex,
            chain_pem: fleet_pki::chain_to_pem(&issued.chain)?,
            key_pem: key
                .private_key_to_pem_pkcs8()
                .map_err(ProtocolError::from)?,
        })
    }

    /// Revokes every certificate of provider `name` and withdraws its
    /// grants. Returns how many certificates were revoked.
    pub fn revoke_provider(&self, name: &str) -> Result<usize, Failure> {
        let principal = grants::provider_principal(name);
        let _guard = self.lock(&principal);
        let now = now_ms();
        let mut batch = Batch::default();
        let certs = self.store.certs_of(&principal)?;
        // Nothing to revoke, and no grant file to write for a name never
        // issued (one that is no file name would be retried for ever).
        if certs.is_empty() {
            return fail(Status::UnknownDevice, format!("no provider {name:?}"));
        }
        for mut c in certs {
            if revoke(&mut c, now) {
                batch.certs.push(c);
            }
        }
        self.commit(&batch)?;
        self.publish_crls_of(&batch.certs)?;
        self.write_provider_grants(&principal);
        self.store.audit(
            "provider_revoked",
            Some(&principal),
            format!("{} certificate(s)", batch.certs.len()),
        )?;
        Ok(batch.certs.len())
    }

    /// Every provider's grants, by principal (`provider.{name}`).
    pub fn provider_grants(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        self.provider_grants_at(None)
    }

    /// [`Core::provider_grants`], leaving out certificates past their
    /// notAfter at `now` (Unix seconds) if given.
    fn provider_grants_at(
        &self,
        now: Option<u64>,
    ) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let mut providers: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for c in self.store.certs()? {
            let expired = now.is_some_and(|now| c.not_after < now);
            if !c.device_id.starts_with(grants::PROVIDER_PREFIX) {
                continue;
            }
            // Every provider is listed, one whose certificates are all
            // revoked or expired with no service.
            let services = providers.entry(c.device_id).or_default();
            if c.revoked_ms.is_none() && !expired {
                services.push(c.service_id);
            }
        }
        Ok(providers.into_iter().collect())
    }

    /// A provider's grants: the services of its unrevoked certificates. A
    /// failure is logged and the principal retried by housekeeping.
    fn write_provider_grants(&self, principal: &str) {
        let written = self
            .store
            .certs_of(principal)
            .map_err(|e| e.to_string())
            .and_then(|certs| {
                let services: Vec<String> = certs
                    .into_iter()
                    .filter(|c| c.revoked_ms.is_none())
                    .map(|c| c.service_id)
                    .collect();
                grants::write_grants(self.pki.dir(), principal, &services)
                    .map_err(|e| e.to_string())
            });
        if let Err(err) = written {
            warn!(principal, error = %err, "broker grants not written; retried later");
            self.grants_to_retry(principal);
        }
    }

    fn grants_to_retry(&self, principal: &str) {
        self.grants_dirty
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(principal.to_owned());
    }

    /// Writes again the grants whose last write failed (housekeeping).
    pub fn retry_grants(&self) {
        let dirty =
            std::mem::take(&mut *self.grants_dirty.lock().unwrap_or_else(|p| p.into_inner()));
        for principal in dirty {
            let _guard = self.lock(&principal);
            if principal.starts_with(grants::PROVIDER_PREFIX) {
                self.write_provider_grants(&principal);
                continue;
            }
            match self.store.device(&principal) {
                Ok(Some(device)) => self.publish_grants(&device),
                Ok(None) => {
                    if let Err(err) = grants::remove_grants(self.pki.dir(), &principal) {
                        warn!(device = %principal, error = %err, "broker grants not removed; retried later");
                        self.grants_to_retry(&principal);
                    }
                }
                Err(err) => {
                    warn!(device = %principal, error = %err, "store read failed; grants retried later");
                    self.grants_to_retry(&principal);
                }
            }
        }
    }

    /// The services an active device may connect to at the broker's service
    /// listener: its current one, the pending one while it migrates, and
    /// those of its superseded certificates not yet revoked (a device whose
    /// re-key reply was lost asks again from its old tenant).
    pub fn granted_services(&self, device: &DeviceRecord) -> Result<Vec<String>, StoreError> {
        let mut services = vec![device.service_id.clone()];
        services.extend(device.pending.as_ref().map(|p| p.service_id.clone()));
        for serial in &device.pending_revocation {
            if let Some(c) = self.store.cert(serial)? {
                if c.revoked_ms.is_none() {
                    services.push(c.service_id);
                }
            }
        }
        Ok(services)
    }

    /// Writes the broker's grant file of one device (`certs/grants/`, read
    /// at every mutual-TLS handshake). A failure is logged and the device
    /// retried by housekeeping ([`Core::retry_grants`]).
    fn publish_grants(&self, device: &DeviceRecord) {
        let written = self
            .granted_services(device)
            .map_err(|e| e.to_string())
            .and_then(|services| {
                grants::write_grants(self.pki.dir(), &device.device_id, &services)
                    .map_err(|e| e.to_string())
            });
        if let Err(err) = written {
            warn!(device = %device.device_id, error = %err, "broker grants not written; retried later");
            self.grants_to_retry(&device.device_id);
        }
    }

    /// Rewrites every grant file from the store and removes those of
    /// devices and providers it does not hold. Run at start, so grants lost
    /// in a crash between a commit and its file write come back. Returns
    /// how many files changed.
    pub fn sync_grants(&self) -> Result<usize, Failure> {
        let dir = self.pki.dir();
        let mut changed = 0;
        let mut active = std::collections::HashSet::new();
        for device in self.store.devices()? {
            let services = self.granted_services(&device)?;
            changed += usize::from(grants::write_grants(dir, &device.device_id, &services)?);
            active.insert(device.device_id);
        }
        for (principal, services) in self.provider_grants()? {
            changed += usize::from(grants::write_grants(dir, &principal, &services)?);
            active.insert(principal);
        }
        for id in grants::granted_devices(dir)? {
            if !active.contains(&id) {
                changed += usize::from(grants::remove_grants(dir, &id)?);
            }
        }
        Ok(changed)
    }

    /// The tenants each device may use at the broker (`GET /v1/grants`,
    /// the mosquitto ACL): its registered service until its first
    /// certificate (it holds none yet, and its first connection then need
    /// not wait for the ACL to catch up), then [`Core::granted_services`]
    /// while it is active, and none once an operator has reset it, until
    /// it has a certificate again, nor while its certificate is past its
    /// notAfter, until it has a new one: a
    /// connection of a certificate that mosquitto refuses now but still
    /// holds may then do nothing. Then each provider's services (those of
    /// its certificates neither revoked nor expired), under its principal
    /// `provider.{name}`. A principal granted nothing is listed with no
    /// service: the watcher cuts its connection (topics.md §10.3).
    pub fn grants(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let now = now_ms() / 1000;
        let mut out = Vec::new();
        for reg in self.store.registrations()? {
            let services = match self.store.device(&reg.device_id)? {
                Some(d) => {
                    let none_granted = match &d.current_cert {
                        // (notAfter is in whole seconds, valid through its last.)
                        Some(serial) => self.store.cert(serial)?.is_some_and(|c| c.not_after < now),
                        // Activated again after a reset, not certified yet.
                        None => self.store.has_history(&reg.device_id)?,
                    };
                    if none_granted {
                        Vec::new()
                    } else {
                        self.granted_services(&d)?
                    }
                }
                // Reset: it has had a service period, hence a certificate.
                None if self.store.has_history(&reg.device_id)? => Vec::new(),
                None => vec![reg.initial_service.clone()],
            };
            out.push((reg.device_id, services));
        }
        out.extend(self.provider_grants_at(Some(now))?);
        Ok(out)
    }

    /// Assigns a new service to each device and returns the notices to send.
    pub fn request_change(
        &self,
        device_ids: &[String],
        service_id: &str,
        provider: Option<String>,
        application: Option<String>,
        endpoint: Option<String>,
    ) -> (Vec<ChangeResult>, Vec<crate::notices::QueuedChange>) {
        let mut results = Vec::new();
        let mut out = Vec::new();
        for d in device_ids {
            let _guard = self.lock(d);
            let result = self.request_change_one(d, service_id, &provider, &application, &endpoint);
            match result {
                Ok((change_id, device)) => {
                    out.extend(crate::notices::QueuedChange::pending_of(&device));
                    results.push(ChangeResult {
                        device_id: d.clone(),
                        ok: true,
                        change_id: Some(change_id),
                        detail: format!("notified: {} -> {service_id}", device.service_id),
                    });
                }
                Err(f) => results.push(ChangeResult {
                    device_id: d.clone(),
                    ok: false,
                    change_id: None,
                    detail: format!("{}: {}", f.status.name(), f.detail),
                }),
            }
        }
        // One flush for the whole request, before anyone is told.
        if let Err(err) = self.store.sync() {
            warn!(error = %err, "service changes not saved");
            for r in results.iter_mut().filter(|r| r.ok) {
                r.ok = false;
                r.detail = format!("internal: not saved: {err}");
            }
            out.clear();
        }
        (results, out)
    }

    fn request_change_one(
        &self,
        d: &str,
        service_id: &str,
        provider: &Option<String>,
        application: &Option<String>,
        endpoint: &Option<String>,
    ) -> Result<(String, DeviceRecord), Failure> {
        fleet_protocol::topic::validate_service_id(service_id).map_err(|_| Failure {
            status: Status::Malformed,
            detail: format!("bad service id {service_id:?}"),
        })?;
        // A device refuses a notice whose endpoint it cannot use (§6.3), and
        // would never move.
        if let Some(endpoint) = endpoint {
            fleet_protocol::topic::parse_endpoint(endpoint).map_err(|e| Failure {
                status: Status::Malformed,
                detail: e.to_string(),
            })?;
        }
        let Some(mut device) = self.store.device(d)? else {
            return fail(Status::UnknownDevice, "device is not active");
        };
        if device.service_id == service_id {
            // Also while a change is pending: a "change" back to where the
            // device is would never be completed by a re-key, and the
            // device may already be acting on the pending notice.
            let detail = match &device.pending {
                Some(p) => format!(
                    "device is already on {service_id} (a change to {} is pending; a pending change cannot be taken back)",
                    p.service_id
                ),
                None => format!("device is already on {service_id}"),
            };
            return fail(Status::WrongService, detail);
        }
        // Create the service CA and its CRL now, so trust and revocation
        // exist at every broker before the device asks.
        self.ensure_service(service_id)?;
        let change_id = uuid::Uuid::new_v4().to_string();
        let replaced = crate::notices::QueuedChange::pending_of(&device);
        device.pending = Some(PendingChange {
            change_id: change_id.clone(),
            service_id: service_id.to_owned(),
            provider: provider.clone(),
            application: application.clone(),
            endpoint: endpoint
                .clone()
                .or_else(|| self.config.service_endpoint.clone()),
            requested_ms: now_ms(),
            seq: self.store.next_id()?,
        });
        // On disk with the rest of the request's ([`Core::request_change`]).
        self.apply(&Batch {
            device: Some(device.clone()),
            ..Batch::default()
        })?;
        if let Some(replaced) = replaced {
            self.announcements.settled(&replaced);
        }
        self.store.audit(
            "service_change",
            Some(d),
            format!("{} -> {service_id} provider={provider:?} application={application:?} change={change_id}", device.service_id),
        )?;
        info!(device = %d, from = %device.service_id, to = %service_id, change = %change_id, "service change requested");
        Ok((change_id, device))
    }

    /// The signed notices of a device's pending change, to its current tenant
    /// and to its bootstrap topic.
    pub fn notices(&self, device: &DeviceRecord) -> Vec<Outgoing> {
        let Some(pending) = &device.pending else {
            return Vec::new();
        };
        let body = notice_body(&device.device_id, pending);
        let env = match self.manager_signed(Kind::ServiceChange, &body) {
            Ok(env) => env,
            Err(err) => {
                warn!(error = %err, "notice not signed");
                return Vec::new();
            }
        };
        let route = Route::ServiceChange(device.device_id.clone());
        let topics: [Topic; NOTICES_PER_CHANGE] = [
            Topic::in_tenant(&device.service_id, route.clone()),
            Topic::bootstrap(route),
        ];
        topics
            .into_iter()
            .map(|t| Outgoing {
                topic: t.to_string(),
                payload: env.clone(),
            })
            .collect()
    }

    /// The notices of change `change_id` of `device_id`, if it is still the
    /// device's pending change: none once it is applied, or replaced by a
    /// newer change (whose own notices go out instead).
    pub fn notices_if_pending(&self, device_id: &str, change_id: &str) -> Vec<Outgoing> {
        match self.store.device(device_id) {
            Ok(Some(device))
                if device
                    .pending
                    .as_ref()
                    .is_some_and(|p| p.change_id == change_id) =>
            {
                self.notices(&device)
            }
            Ok(_) => Vec::new(),
            Err(err) => {
                warn!(device = device_id, error = %err, "notice not sent");
                Vec::new()
            }
        }
    }

    /// The notices of those of `changes` still pending
    /// ([`Core::notices_if_pending`]), once the store has them on disk (an
    /// operator's request for many devices flushes once at its end), and
    /// how many changes they announce; none if the flush fails.
    pub fn notices_on_disk(
        &self,
        changes: &[crate::notices::QueuedChange],
    ) -> (usize, Vec<Outgoing>) {
        let mut announced = 0;
        let mut notices = Vec::new();
        for q in changes {
            let built = self.notices_if_pending(&q.device_id, &q.change_id);
            announced += usize::from(!built.is_empty());
            notices.extend(built);
        }
        if !notices.is_empty() && self.store.sync().is_err() {
            return (0, Vec::new());
        }
        (announced, notices)
    }

    /// Every pending change, announced again after a (re)connect to the
    /// broker.
    pub fn pending_changes(&self) -> Result<Vec<crate::notices::QueuedChange>, StoreError> {
        Ok(self
            .store
            .devices()?
            .iter()
            .filter_map(crate::notices::QueuedChange::pending_of)
            .collect())
    }
}

fn notice_body(device_id: &str, p: &PendingChange) -> ServiceChange {
    ServiceChange {
        device_id: device_id.to_owned(),
        seq: p.seq,
        change_id: p.change_id.clone(),
        service_id: p.service_id.clone(),
        provider: p.provider.clone(),
        application: p.application.clone(),
        endpoint: p.endpoint.clone(),
        ts: p.requested_ms,
    }
}

/// Fields every request body has.
trait Identified {
    fn device_id(&self) -> &str;
    fn nonce(&self) -> &[u8];
    fn ts(&self) -> u64;
}

macro_rules! identified {
    ($($t:ty),*) => {$(
        impl Identified for $t {
            fn device_id(&self) -> &str { &self.device_id }
            fn nonce(&self) -> &[u8] { &self.nonce }
            fn ts(&self) -> u64 { self.ts }
        }
    )*};
}
identified!(ActivateRequest, UpdateRequest, PollRequest, StatusReport);

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    fn core() -> (tempfile::TempDir, Core) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let pki = Pki::open_or_create(&dir.path().join("certs")).unwrap();
        (
            dir,
            Core::new(store, Arc::new(pki), ManagerConfig::default()),
        )
    }

    /// Housekeeping rolls a service CA over once it has less than a year
    /// left (here one made to end in 100 days), with its CRL and an audit
    /// record, and then leaves the successor alone.
    #[test]
    fn housekeeping_rolls_over_a_service_ca_near_its_end() {
        use fleet_pki::testing;
        let (dir, core) = core();
        let certs = dir.path().join("certs");
        let read = |name: &str| std::fs::read(certs.join(name)).unwrap();
        let root = openssl::x509::X509::from_pem(&read("root-ca.pem")).unwrap();
        let root_key = PKey::private_key_from_pem(&read("root-ca.key")).unwrap();
        let key = crypto::generate_p256().unwrap();
        let name = testing::name(Some("svcQ"), "fleetshift service CA svcQ").unwrap();
        let ca =
            testing::ca_certificate(&name, &key, Some((&root, &root_key)), 100, Some(0)).unwrap();
        fleet_pki::write_private_key(&certs.join("services/svcQ-ca.key"), &key).unwrap();
        std::fs::write(certs.join("services/svcQ-ca.pem"), ca.to_pem().unwrap()).unwrap();
        core.ensure_service("svcQ").unwrap();
        core.ensure_service("svcA").unwrap();

        core.maintain_service_cas();
        let generations = core.pki.service_ca_generations("svcQ").unwrap();
        assert_eq!(generations.len(), 2);
        let successor = &generations[1];
        assert_eq!(successor.generation, 2);
        let now = now_ms() / 1000;
        assert!(successor.not_after > now + 4 * 365 * 86_400);
        let crl =
            openssl::x509::X509Crl::from_pem(&std::fs::read(&successor.crl_path).unwrap()).unwrap();
        assert!(crl.verify(&successor.cert.public_key().unwrap()).unwrap());
        let audit = core.store.audit_log().unwrap();
        assert!(
            audit.iter().any(
                |a| a.action == "service_ca_roll" && a.detail.starts_with("svcQ: generation 2")
            ),
            "{audit:?}"
        );
        // A new certificate comes from the successor.
        let device = crypto::generate_p256().unwrap();
        let public = PKey::public_key_from_der(&device.public_key_to_der().unwrap()).unwrap();
        let issued = core
            .pki
            .issue_device_certificate("dev1", "svcQ", &public, 30)
            .unwrap();
        assert_eq!(issued.ca_generation, 2);
        // Nothing more to do, for either service.
        core.maintain_service_cas();
        assert_eq!(core.pki.service_ca_generations("svcQ").unwrap().len(), 2);
        assert_eq!(core.pki.service_ca_generations("svcA").unwrap().len(), 1);
    }

    /// Housekeeping rolls the root over once it has less than two years
    /// left (here one made to end in 300 days): the broker's certificate
    /// comes from the successor with its cross-certificate, every ok reply
    /// carries both roots, and a service CA the old root capped to its
    /// end rolls over to the new root and gains its five years.
    #[test]
    fn housekeeping_rolls_over_a_root_near_its_end() {
        let (dir, core, key, _) = core_with_root_ending_in(300);
        let certs = dir.path().join("certs");
        let now = now_ms() / 1000;
        let first_end = core.pki.root_generations().unwrap()[0].not_after;
        assert!(core.pki.service_ca_generations("svcA").unwrap()[0].not_after <= first_end);
        // A successor signing key made now ends with this root.
        let signer = core.roll_signing_key().unwrap();
        assert!(signer.not_after.unwrap() <= first_end);
        assert_eq!(
            core.roots_to_pin(),
            (None, None),
            "one root: nothing to pin"
        );

        core.maintain_root();
        let roots = core.pki.root_generations().unwrap();
        assert_eq!(roots.len(), 2);
        let successor = roots[1].cert.clone();
        assert!(roots[1].not_after > now + 9 * 365 * 86_400);
        let audit = core.store.audit_log().unwrap();
        assert!(
            audit
                .iter()
                .any(|a| a.action == "root_ca_roll" && a.detail.starts_with("generation 2")),
            "{audit:?}"
        );
        let broker =
            openssl::x509::X509::stack_from_pem(&std::fs::read(certs.join("broker.pem")).unwrap())
                .unwrap();
        assert_eq!(broker.len(), 2, "leaf and cross-certificate");
        assert!(broker[0].verify(&successor.public_key().unwrap()).unwrap());
        assert!(broker[1].verify(&key).unwrap(), "the cross-certificate");
        let (pinned, crosses) = core.roots_to_pin();
        assert_eq!(
            pinned.unwrap(),
            vec![
                ByteBuf::from(successor.to_der().unwrap()),
                ByteBuf::from(roots[0].cert.to_der().unwrap())
            ]
        );
        // Both ways: the new root by the first (the broker serves it), and
        // the first by the new one.
        let crosses = crosses.unwrap();
        assert_eq!(crosses.len(), 2);
        assert_eq!(crosses[0], ByteBuf::from(broker[1].to_der().unwrap()));
        let back = openssl::x509::X509::from_der(&crosses[1]).unwrap();
        assert!(back.verify(&successor.public_key().unwrap()).unwrap());
        assert!(back.public_key().unwrap().public_eq(&key));
        // The signing key rolled with it, onto the new root: its
        // certificate lasts, and comes with the cross-certificate.
        let signing = core.pki.signing();
        assert_eq!(signing.generation, 3);
        assert!(signing.validity.unwrap().1 > now + 9 * 365 * 86_400);
        assert_eq!(signing.signer.as_ref().unwrap().len(), 2);
        // Once is enough.
        core.maintain_root();
        assert_eq!(core.pki.root_generations().unwrap().len(), 2);
        assert_eq!(core.pki.signing().generation, 3);

        // svcA's CA ends with the first root, within a year: its
        // successor comes from the new root, for five years.
        core.maintain_service_cas();
        let generations = core.pki.service_ca_generations("svcA").unwrap();
        assert_eq!(generations.len(), 2);
        assert!(generations[1]
            .cert
            .verify(&successor.public_key().unwrap())
            .unwrap());
        assert!(generations[1].not_after > now + 4 * 365 * 86_400);
    }

    /// `pinned_roots` of a `status` report is kept as the generations of
    /// the fleet's roots it names, whatever the event; a list that is not
    /// 1 to 8 digests of 32 bytes is `malformed` and changes nothing.
    #[test]
    fn status_reports_say_which_roots_a_device_pins() {
        let (_dir, core) = core();
        let uuid = activated(&core, "d1");
        assert_eq!(update(&core, "d1", "svcA", None, &uuid).status, Status::Ok);
        core.roll_root().unwrap();
        let roots = core.pki.root_generations().unwrap();
        let digest = |i: usize| {
            ByteBuf::from(openssl::sha::sha256(&roots[i].cert.to_der().unwrap()).to_vec())
        };
        let report_at = |event: &str, pinned: Option<Vec<ByteBuf>>, ts: u64| {
            let report = online_report("d1", "svcA", &uuid, |r| {
                (r.event, r.pinned_roots, r.ts) = (event.into(), pinned, ts);
            });
            ask(&core, &status_topic("svcA", "d1"), report)
        };
        let report = |event: &str, pinned: Option<Vec<ByteBuf>>| report_at(event, pinned, now_ms());
        let kept = || core.store.device("d1").unwrap().unwrap().pinned_roots;
        assert_eq!(kept(), None, "not said yet");

        assert_eq!(report("online", None).status, Status::Ok);
        assert_eq!(kept(), None);
        assert_eq!(report("online", Some(vec![digest(0)])).status, Status::Ok);
        assert_eq!(kept(), Some(vec![1]));
        let reply = report("roots_pinned", Some(vec![digest(1), digest(0)]));
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(
            reply.roots.map(|r| r.len()),
            Some(2),
            "the roots, offered again"
        );
        assert_eq!(kept(), Some(vec![1, 2]));
        // A root that is not the fleet's names nothing.
        let stranger = ByteBuf::from(vec![0xAB; 32]);
        assert_eq!(
            report("online", Some(vec![digest(1), stranger.clone()])).status,
            Status::Ok
        );
        assert_eq!(kept(), Some(vec![2]));
        // A report older than the one that changed them (sent again after
        // a `busy`, say) changes nothing.
        let stale = report_at("online", Some(vec![digest(0)]), now_ms() - 60_000);
        assert_eq!(stale.status, Status::Ok);
        assert_eq!(kept(), Some(vec![2]));

        let before = core.store.device("d1").unwrap().unwrap();
        for (bad, why) in [
            (vec![], "no digest"),
            (vec![ByteBuf::from(vec![1; 31])], "31 bytes"),
            (vec![digest(0), ByteBuf::from(vec![1; 33])], "33 bytes"),
            (vec![stranger; 9], "nine digests"),
        ] {
            let reply = report("roots_pinned", Some(bad));
            assert_eq!(reply.status, Status::Malformed, "{why}");
            assert!(reply.detail.unwrap().contains("pinned_roots"), "{why}");
            assert_eq!(core.store.device("d1").unwrap().unwrap(), before, "{why}");
        }
    }

    /// Half a year before a root ends, housekeeping says how many devices
    /// pin no root that outlasts it, and how many never said.
    #[test]
    fn devices_that_pin_only_an_ending_root_are_counted() {
        let (_dir, core, _, root) = core_with_root_ending_in(100);
        let now = now_ms() / 1000;
        let digest = |cert: &openssl::x509::X509| {
            ByteBuf::from(openssl::sha::sha256(&cert.to_der().unwrap()).to_vec())
        };
        let report = |d: &str, uuid: &[u8], pinned: Vec<ByteBuf>| {
            let report = online_report(d, "svcA", uuid, |r| r.pinned_roots = Some(pinned));
            assert_eq!(
                ask(&core, &status_topic("svcA", d), report).status,
                Status::Ok
            );
        };
        let uuid = activated(&core, "d1");
        assert_eq!(update(&core, "d1", "svcA", None, &uuid).status, Status::Ok);
        report("d1", &uuid, vec![digest(&root)]);
        activated(&core, "d2");

        // Housekeeping rolls the root (it ends within two years) and looks.
        core.maintain_root();
        let successor = core.pki.root_generations().unwrap()[1].cert.clone();
        assert_eq!(core.warn_roots_ending(now).unwrap(), (1, 1));
        report("d1", &uuid, vec![digest(&successor), digest(&root)]);
        assert_eq!(core.warn_roots_ending(now).unwrap(), (0, 1));
        // Once the first root has ended, nothing ends within half a year:
        // nothing to say.
        let later = now + 200 * 86_400;
        assert_eq!(core.warn_roots_ending(later).unwrap(), (0, 0));
    }

    /// `signing_key` of a report is kept as the generation of the signing
    /// key it names; one of no key of the manager's names nothing, and
    /// one that is not 32 bytes is `malformed`.
    #[test]
    fn status_reports_say_which_signing_key_a_device_takes() {
        let (_dir, core) = core();
        let uuid = activated(&core, "d1");
        let report = |key: Option<Vec<u8>>| {
            let report = online_report("d1", "svcA", &uuid, |r| {
                r.signing_key = key.map(ByteBuf::from)
            });
            ask(&core, &status_topic("svcA", "d1"), report).status
        };
        let digest = |key: &PKey<openssl::pkey::Private>| {
            openssl::sha::sha256(&key.public_key_to_der().unwrap()).to_vec()
        };
        let kept = || core.store.device("d1").unwrap().unwrap().signing_key;
        assert_eq!(report(Some(digest(&core.pki.signing_key()))), Status::Ok);
        assert_eq!(kept(), Some(1));
        core.roll_signing_key().unwrap();
        assert_eq!(report(Some(vec![0xAB; 32])), Status::Ok);
        assert_eq!(kept(), Some(1), "no key of the manager's");
        assert_eq!(report(Some(digest(&core.pki.signing_key()))), Status::Ok);
        assert_eq!(kept(), Some(2));
        assert_eq!(report(Some(vec![1; 31])), Status::Malformed);
        assert_eq!(kept(), Some(2));
    }

    /// A retry answered from the reply cache after the signing key rolled
    /// over comes signed by the new key, with its `signer`, and with the
    /// same body.
    #[test]
    fn a_cached_reply_is_signed_again_after_a_signing_key_roll() {
        let (_dir, core) = core();
        let uuid = activated(&core, "d1");
        assert_eq!(update(&core, "d1", "svcA", None, &uuid).status, Status::Ok);
        let body = PollRequest {
            device_id: "d1".into(),
            service_id: "svcA".into(),
            nonce: crypto::random_bytes(16),
            ts: now_ms(),
        };
        let request = Envelope::build(Kind::Poll, &body, |tbs| crypto::hmac(&uuid, tbs))
            .unwrap()
            .encode();
        let topic = Topic::in_tenant("svcA", Route::Request(RequestKind::Poll, "d1".into()));
        let first = core.handle(&topic.to_string(), &request);
        let first = Envelope::decode(&first[0].payload).unwrap();
        assert!(first.signer.is_none());
        core.roll_signing_key().unwrap();
        let again = core.handle(&topic.to_string(), &request);
        let again_env = Envelope::decode(&again[0].payload).unwrap();
        assert_eq!(again_env.body, first.body, "the same reply");
        assert!(crypto::verify(
            &core.pki.signing_key(),
            &again_env.tbs(),
            &again_env.auth
        ));
        assert_eq!(
            again_env.signer.map(|s| s.len()),
            Some(1),
            "with the new key's certificate"
        );
    }

    /// A core whose PKI has a first root that ends in `days`, with its
    /// key and certificate, and svcA.
    fn core_with_root_ending_in(
        days: u64,
    ) -> (
        tempfile::TempDir,
        Core,
        PKey<openssl::pkey::Private>,
        openssl::x509::X509,
    ) {
        use fleet_pki::testing;
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        let key = crypto::generate_p256().unwrap();
        let name = testing::name(None, "fleetshift root CA").unwrap();
        let root = testing::ca_certificate(&name, &key, None, days, None).unwrap();
        fleet_pki::write_private_key(&certs.join("root-ca.key"), &key).unwrap();
        std::fs::write(certs.join("root-ca.pem"), root.to_pem().unwrap()).unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let pki = Pki::open_or_create(&certs).unwrap();
        let core = Core::new(store, Arc::new(pki), ManagerConfig::default());
        core.ensure_service("svcA").unwrap();
        (dir, core, key, root)
    }

    /// An `online` report of `device` for `service`, keyed by `uuid`, as
    /// `fill` changes it.
    fn online_report(
        device: &str,
        service: &str,
        uuid: &[u8],
        fill: impl FnOnce(&mut StatusReport),
    ) -> Vec<u8> {
        let mut body = StatusReport {
            device_id: device.into(),
            service_id: service.into(),
            nonce: crypto::random_bytes(16),
            ts: now_ms(),
            event: "online".into(),
            change_id: None,
            detail: None,
            pinned_roots: None,
            signing_key: None,
        };
        fill(&mut body);
        Envelope::build(Kind::Status, &body, |tbs| crypto::hmac(uuid, tbs))
            .unwrap()
            .encode()
    }

    /// `device`'s status topic in `tenant`.
    fn status_topic(tenant: &str, device: &str) -> Topic {
        Topic::in_tenant(tenant, Route::Request(RequestKind::Status, device.into()))
    }

    /// Registers `device_id` for svcA with a new factory key, returned.
    fn registered(core: &Core, device_id: &str) -> PKey<openssl::pkey::Private> {
        let factory = crypto::generate_p256().unwrap();
        core.store
            .put_registration(&crate::store::Registration {
                sv: SCHEMA_VERSION,
                device_id: device_id.into(),
                initial_service: "svcA".into(),
                factory_key: Some(ByteBuf::from(crypto::public_point(&factory).unwrap())),
                registered_ms: now_ms(),
            })
            .unwrap();
        factory
    }

    /// An activate request of `device_id` signed with `factory`, and the
    /// ephemeral key its reply is sealed to.
    fn activate_request(
        device_id: &str,
        factory: &PKey<openssl::pkey::Private>,
    ) -> (Vec<u8>, PKey<openssl::pkey::Private>) {
        let eph = crypto::generate_p256().unwrap();
        let body = ActivateRequest {
            device_id: device_id.into(),
            service_id: None,
            nonce: crypto::random_bytes(16),
            ts: now_ms(),
            eph: crypto::public_point(&eph).unwrap(),
        };
        let request = Envelope::build(Kind::Activate, &body, |tbs| crypto::sign(factory, tbs))
            .unwrap()
            .encode();
        (request, eph)
    }

    fn only_reply(core: &Core, out: &[Outgoing], topic: &str) -> Reply {
        assert_eq!(out.len(), 1, "exactly one message");
        assert_eq!(out[0].topic, topic);
        let env = Envelope::decode(&out[0].payload).unwrap();
        assert!(env.crc_ok());
        assert!(crypto::verify(
            &core.pki.signing_key(),
            &env.tbs(),
            &env.auth
        ));
        env.body().unwrap()
    }

    /// Registers and activates device `d`; returns its UUID.
    fn activated(core: &Core, d: &str) -> Vec<u8> {
        let factory = registered(core, d);
        let (request, eph) = activate_request(d, &factory);
        let reply = ask(
            core,
            &Topic::bootstrap(Route::Request(RequestKind::Activate, d.into())),
            request,
        );
        assert_eq!(reply.status, Status::Ok);
        crypto::unseal(&eph, d, reply.uuid.as_ref().unwrap()).unwrap()
    }

    fn ask(core: &Core, topic: &Topic, payload: Vec<u8>) -> Reply {
        let out = core.handle(&topic.to_string(), &payload);
        only_reply(core, &out, &topic.reply_topic().unwrap().to_string())
    }

    fn update(core: &Core, d: &str, service: &str, tenant: Option<&str>, uuid: &[u8]) -> Reply {
        let eph = crypto::generate_p256().unwrap();
        let key = crypto::generate_p256().unwrap();
        let body = UpdateRequest {
            device_id: d.into(),
            service_id: service.into(),
            nonce: crypto::random_bytes(16),
            ts: now_ms(),
            eph: crypto::public_point(&eph).unwrap(),
            csr: Some(ByteBuf::from(fleet_pki::generate_csr(d, &key).unwrap())),
        };
        let env = Envelope::build(Kind::Update, &body, |tbs| crypto::hmac(uuid, tbs)).unwrap();
        let route = Route::Request(RequestKind::Update, d.into());
        let topic = match tenant {
            Some(t) => Topic::in_tenant(t, route),
            None => Topic::bootstrap(route),
        };
        ask(core, &topic, env.encode())
    }

    /// Requests anyone can have sent under a registered id, refused before
    /// any check of who sent them, make the id contested (topics.md §5.4),
    /// as refusals by authentication do; ids nobody registered are not
    /// noted.
    #[test]
    fn an_unreadable_request_for_a_registered_id_makes_it_contested() {
        let (_dir, core) = core();
        registered(&core, "dev1");
        registered(&core, "dev2");
        assert!(!core.contested("dev1"));
        core.handle("fleet/v1/activate/dev1", b"\xff not cbor");
        assert!(core.contested("dev1"));
        // `update` before activation is refused before its HMAC is looked at.
        let update = Envelope::build(Kind::Update, &("not", "a", "body"), |_| Ok(vec![]))
            .unwrap()
            .encode();
        core.handle("fleet/v1/update/dev2", &update);
        assert!(core.contested("dev2"));
        core.handle("fleet/v1/activate/ghost", b"\xff not cbor");
        assert!(!core.contested("ghost"));
        assert!(!core.refused_unchecked.lock().unwrap().contains_key("ghost"));
    }

    /// The grants an external broker's ACL is made from: a registered
    /// device's service before its first activation, its service once
    /// certified, none while its certificate is past its notAfter, none
    /// once reset (its revoked certificate's connection, if mosquitto still
    /// holds one, may then do nothing), activated again or not, and its
    /// service again once it has a new certificate. A device granted
    /// nothing is listed with no service (the watcher cuts its connection).
    #[test]
    fn a_reset_or_expired_device_is_granted_nothing_until_it_is_certified_again() {
        let (_dir, core) = core();
        let granted = |core: &Core, d: &str| {
            core.grants()
                .unwrap()
                .into_iter()
                .find(|(id, _)| id == d)
                .map(|(_, services)| services)
        };
        let factory = registered(&core, "d1");
        assert_eq!(granted(&core, "d1"), Some(vec!["svcA".to_string()]));
        let (request, eph) = activate_request("d1", &factory);
        let topic = Topic::bootstrap(Route::Request(RequestKind::Activate, "d1".into()));
        let reply = ask(&core, &topic, request);
        let uuid = crypto::unseal(&eph, "d1", reply.uuid.as_ref().unwrap()).unwrap();
        assert_eq!(update(&core, "d1", "svcA", None, &uuid).status, Status::Ok);
        assert_eq!(granted(&core, "d1"), Some(vec!["svcA".to_string()]));

        // Its certificate past its notAfter: nothing, until a new one.
        let serial = core
            .store
            .device("d1")
            .unwrap()
            .unwrap()
            .current_cert
            .unwrap();
        let mut cert = core.store.cert(&serial).unwrap().unwrap();
        let not_after = cert.not_after;
        cert.not_after = now_ms() / 1000 - 1;
        core.store.put_cert(&cert).unwrap();
        assert_eq!(granted(&core, "d1"), Some(vec![]));
        cert.not_after = not_after;
        core.store.put_cert(&cert).unwrap();
        assert_eq!(granted(&core, "d1"), Some(vec!["svcA".to_string()]));

        assert!(core.reset("d1").unwrap());
        assert_eq!(granted(&core, "d1"), Some(vec![]));

        // Activated again: nothing until its new certificate (a connection
        // of the old one that mosquitto still holds stays powerless).
        let (request, eph) = activate_request("d1", &factory);
        let reply = ask(&core, &topic, request);
        assert_eq!(reply.status, Status::Ok);
        let uuid = crypto::unseal(&eph, "d1", reply.uuid.as_ref().unwrap()).unwrap();
        assert_eq!(granted(&core, "d1"), Some(vec![]));
        assert_eq!(update(&core, "d1", "svcA", None, &uuid).status, Status::Ok);
        assert_eq!(granted(&core, "d1"), Some(vec!["svcA".to_string()]));
    }

    #[test]
    fn a_nonce_longer_than_64_bytes_is_not_echoed() {
        let (_dir, core) = core();
        let uuid = activated(&core, "d1");
        let topic = Topic::bootstrap(Route::Request(RequestKind::Poll, "d1".into()));
        let poll = |nonce: Vec<u8>| {
            let body = PollRequest {
                device_id: "d1".into(),
                service_id: "svcA".into(),
                nonce,
                ts: now_ms(),
            };
            let env = Envelope::build(Kind::Poll, &body, |tbs| crypto::hmac(&uuid, tbs)).unwrap();
            ask(&core, &topic, env.encode())
        };
        // Too short: malformed, echoed as §5.3 says.
        let short = poll(vec![1; 4]);
        assert_eq!((short.status, short.nonce), (Status::Malformed, vec![1; 4]));
        // 15,000 bytes: malformed, and the reply carries none of them.
        let long = poll(vec![2; 15_000]);
        assert_eq!(long.status, Status::Malformed);
        assert!(long.nonce.is_empty(), "{} bytes echoed", long.nonce.len());
        assert!(core
            .busy(
                &topic.to_string(),
                &{
                    let body = PollRequest {
                        device_id: "d1".into(),
                        service_id: "svcA".into(),
                        nonce: vec![3; 100],
                        ts: now_ms(),
                    };
                    Envelope::build(Kind::Poll, &body, |tbs| crypto::hmac(&uuid, tbs))
                        .unwrap()
                        .encode()
                },
                std::time::Duration::from_millis(6000)
            )
            .iter()
            .all(|o| {
                Envelope::decode(&o.payload)
                    .unwrap()
                    .body::<Reply>()
                    .unwrap()
                    .nonce
                    .is_empty()
            }));
    }

    #[test]
    fn busy_echoes_the_nonce_of_a_request_that_decodes_and_nothing_else() {
        let (_dir, core) = core();
        let waited = std::time::Duration::from_millis(6000);
        let topic = Topic::bootstrap(Route::Request(RequestKind::Poll, "d1".into()));
        let reply_topic = topic.reply_topic().unwrap().to_string();
        let body = PollRequest {
            device_id: "d1".into(),
            service_id: "svcA".into(),
            nonce: vec![7; 16],
            ts: now_ms(),
        };
        let good = Envelope::build(Kind::Poll, &body, |tbs| crypto::hmac(b"k", tbs))
            .unwrap()
            .encode();
        let reply = only_reply(
            &core,
            &core.busy(&topic.to_string(), &good, waited),
            &reply_topic,
        );
        assert_eq!(reply.status, Status::Busy);
        assert_eq!(reply.nonce, vec![7; 16]);
        assert!(reply.detail.unwrap().contains("6000 ms"));
        // Not CBOR, a body of another device, a corrupted CRC: no nonce.
        let other = PollRequest {
            device_id: "d2".into(),
            ..body
        };
        let mut corrupted = Envelope::decode(&good).unwrap();
        corrupted.crc ^= 1;
        let corrupted = corrupted.encode();
        for payload in [
            b"\xff not cbor".to_vec(),
            Envelope::build(Kind::Poll, &other, |tbs| crypto::hmac(b"k", tbs))
                .unwrap()
                .encode(),
            corrupted,
        ] {
            let out = core.busy(&topic.to_string(), &payload, waited);
            let reply = only_reply(&core, &out, &reply_topic);
            assert_eq!(reply.status, Status::Busy);
            assert!(reply.nonce.is_empty());
        }
        // Not a request topic: nothing.
        assert!(core
            .busy("fleet/v1/poll/d1/reply", &good, waited)
            .is_empty());
        assert_eq!(
            core.intake.shed.load(std::sync::atomic::Ordering::Relaxed),
            4
        );
    }

    /// A copy of a request already carried out gets the reply recorded for
    /// it, not `busy`: a device whose reply was lost, told `busy`, would
    /// activate afresh and be refused `already_active` for good.
    #[test]
    fn busy_answers_a_copy_of_a_request_carried_out_with_its_reply() {
        let (_dir, core) = core();
        let factory = registered(&core, "d1");
        let activate = || activate_request("d1", &factory).0;
        let topic =
            Topic::bootstrap(Route::Request(RequestKind::Activate, "d1".into())).to_string();
        let waited = std::time::Duration::from_secs(6);
        let request = activate();
        let carried_out = core.handle(&topic, &request);
        let again = core.busy(&topic, &request, waited);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].topic, carried_out[0].topic);
        assert_eq!(
            again[0].payload, carried_out[0].payload,
            "the recorded reply"
        );
        let reply_topic = &carried_out[0].topic;
        assert_eq!(
            only_reply(&core, &carried_out, reply_topic).status,
            Status::Ok
        );
        // Another request, which was not carried out: busy.
        let out = core.busy(&topic, &activate(), waited);
        assert_eq!(only_reply(&core, &out, reply_topic).status, Status::Busy);
        assert_eq!(
            core.intake.shed.load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    /// A device's words in its `status` are logged quoted: a newline or an
    /// escape sequence in them forges no log line.
    #[test]
    fn a_status_cannot_forge_a_log_line() {
        let (_dir, core) = core();
        let uuid = activated(&core, "d1");
        assert_eq!(update(&core, "d1", "svcA", None, &uuid).status, Status::Ok);
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let body = StatusReport {
            device_id: "d1".into(),
            service_id: "svcA".into(),
            nonce: crypto::random_bytes(16),
            ts: now_ms(),
            event: "x\nERROR forged by the device \u{1b}[2J".into(),
            change_id: None,
            detail: None,
            pinned_roots: None,
            signing_key: None,
        };
        let env = Envelope::build(Kind::Status, &body, |tbs| crypto::hmac(&uuid, tbs)).unwrap();
        let topic = Topic::in_tenant("svcA", Route::Request(RequestKind::Status, "d1".into()));
        tracing::subscriber::with_default(subscriber, || ask(&core, &topic, env.encode()));
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert!(text.contains("device status"), "{text}");
        assert!(
            !text.lines().any(|l| l.starts_with("ERROR forged")),
            "{text}"
        );
        assert!(!text.contains('\u{1b}'), "{text}");
    }

    /// `online` confirms the new service, and retires the certificates it
    /// replaced, only from the new tenant: the same report from the old
    /// tenant, over the old certificate, is answered and changes nothing.
    #[test]
    fn online_from_the_old_tenant_confirms_nothing() {
        let (_dir, core) = core();
        let uuid = activated(&core, "d1");
        assert_eq!(update(&core, "d1", "svcA", None, &uuid).status, Status::Ok);
        let (results, _) = core.request_change(&["d1".to_string()], "svcB", None, None, None);
        assert!(results[0].ok);
        assert_eq!(
            update(&core, "d1", "svcB", Some("svcA"), &uuid).status,
            Status::Ok
        );
        let online = |tenant: &str| {
            let report = online_report("d1", "svcB", &uuid, |_| {});
            ask(&core, &status_topic(tenant, "d1"), report)
        };
        let confirmed = || {
            let device = core.store.device("d1").unwrap().unwrap();
            let period = core
                .store
                .period("d1", device.open_period.unwrap())
                .unwrap()
                .unwrap();
            (
                period.confirmed_ms.is_some(),
                device.pending_revocation.len(),
            )
        };
        let before = confirmed();
        assert_eq!(before, (false, 1), "the svcB period, the svcA certificate");
        assert_eq!(online("svcA").status, Status::Ok);
        assert_eq!(confirmed(), before, "confirmed from the old tenant");
        assert_eq!(online("svcB").status, Status::Ok);
        assert_eq!(confirmed(), (true, 0));
    }

    /// A poll reply carries a pending change while the announcements'
    /// allowance has room; past it, the reply has none and the change is
    /// queued for its notices, and an `online` report queues it too, so
    /// however the devices ask, changes are announced at the pace set. A
    /// change announced once goes out again at once, with no turn: a
    /// device that polls as fast as it may spends nobody's allowance.
    #[tokio::test(start_paused = true)]
    async fn a_poll_reply_carries_the_change_only_within_the_allowance() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        let pki = Pki::open_or_create(&dir.path().join("certs")).unwrap();
        let config = ManagerConfig {
            // One change a second.
            max_notices_per_sec: 2,
            ..ManagerConfig::default()
        };
        let core = Core::new(store, Arc::new(pki), config);
        let queued = || core.announcements.waiting_now();
        let ids = ["d1".to_string(), "d2".to_string()];
        let uuids = ids.clone().map(|d| {
            let uuid = activated(&core, &d);
            assert_eq!(update(&core, &d, "svcA", None, &uuid).status, Status::Ok);
            uuid
        });
        let (results, changes) = core.request_change(&ids, "svcB", None, None, None);
        assert!(results.iter().all(|r| r.ok));
        fn signed<T: serde::Serialize>(kind: Kind, body: &T, uuid: &[u8]) -> Vec<u8> {
            Envelope::build(kind, body, |tbs| crypto::hmac(uuid, tbs))
                .unwrap()
                .encode()
        }
        let poll = |i: usize| {
            let body = PollRequest {
                device_id: ids[i].clone(),
                service_id: "svcA".into(),
                nonce: crypto::random_bytes(16),
                ts: now_ms(),
            };
            let route = Route::Request(RequestKind::Poll, ids[i].clone());
            let reply = ask(
                &core,
                &Topic::in_tenant("svcA", route),
                signed(Kind::Poll, &body, &uuids[i]),
            );
            assert_eq!(reply.status, Status::Ok);
            assert_eq!(reply.service_id.as_deref(), Some("svcA"));
            reply.change.map(|c| c.change_id)
        };
        let online = |i: usize| {
            let report = online_report(&ids[i], "svcA", &uuids[i], |_| {});
            core.handle(&status_topic("svcA", &ids[i]).to_string(), &report)
        };
        let change_id = |i: usize| results[i].change_id.clone();
        // d1's poll takes the second's one announcement.
        assert_eq!(poll(0), change_id(0));
        assert!(queued().is_empty(), "nothing queued");
        // The allowance is spent: d2's poll reply has no change, and the
        // change waits for its notices.
        assert_eq!(poll(1), None);
        assert_eq!(queued(), changes[1..]);
        // d2's `online` queues it again, where it waits already (its
        // notices follow; nothing goes out with the reply).
        assert_eq!(online(1).len(), 1, "the reply only");
        assert_eq!(queued(), changes[1..]);
        // d1's change, announced already, goes out at once, however often
        // d1 asks: in every poll reply, and its notices with the reply to
        // its `online`.
        for _ in 0..5 {
            assert_eq!(poll(0), change_id(0));
        }
        let out = online(0);
        assert_eq!(out.len(), 1 + NOTICES_PER_CHANGE);
        assert!(
            out[1..]
                .iter()
                .all(|o| o.topic.ends_with("/service/change/d1")),
            "{:?}",
            out.iter().map(|o| &o.topic).collect::<Vec<_>>()
        );
        assert_eq!(queued(), changes[1..]);
        // A second on (the allowance's clock is Tokio's), the allowance has
        // room for one again, and d1's asking takes none of it: d2's next
        // poll gets d2's change.
        tokio::time::advance(std::time::Duration::from_secs(1)).await;
        for _ in 0..5 {
            assert_eq!(poll(0), change_id(0));
        }
        assert_eq!(online(0).len(), 1 + NOTICES_PER_CHANGE);
        assert_eq!(poll(1), change_id(1));
        // Announced so, it leaves the queue: no notice will take a turn.
        assert!(queued().is_empty());
    }

    /// A device whose reply with its new certificate was lost asks again,
    /// with a fresh request, from its old tenant: it gets a certificate.
    #[test]
    fn a_lost_rekey_reply_can_be_asked_for_again() {
        let (_dir, core) = core();
        let uuid = activated(&core, "d1");

        assert_eq!(update(&core, "d1", "svcA", None, &uuid).status, Status::Ok);
        // An endpoint the device would refuse (§6.3) records no change.
        for endpoint in ["mqtt://broker:8883", "mqtts://broker", "mqtts://a_b:8883"] {
            let (results, notices) = core.request_change(
                &["d1".to_string()],
                "svcB",
                None,
                None,
                Some(endpoint.to_string()),
            );
            assert!(!results[0].ok, "{endpoint} accepted");
            assert!(
                results[0].detail.starts_with("malformed"),
                "{}",
                results[0].detail
            );
            assert!(notices.is_empty());
            assert!(core.store.device("d1").unwrap().unwrap().pending.is_none());
        }
        let (results, _) = core.request_change(&["d1".to_string()], "svcB", None, None, None);
        assert!(results[0].ok);
        // Notices are built when the pacer sends them, while the change is pending.
        let to_b = results[0].change_id.clone().unwrap();
        assert_eq!(core.notices_if_pending("d1", &to_b).len(), 2);
        // Announced again after a reconnect to the broker.
        let pending = core.pending_changes().unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(
            (pending[0].device_id.as_str(), pending[0].change_id.as_str()),
            ("d1", to_b.as_str())
        );
        assert_eq!(
            update(&core, "d1", "svcB", Some("svcA"), &uuid).status,
            Status::Ok
        );
        assert!(
            core.notices_if_pending("d1", &to_b).is_empty(),
            "a notice of a change already applied"
        );
        assert!(core.pending_changes().unwrap().is_empty());
        // The reply was lost; the device asks again from svcA.
        let again = update(&core, "d1", "svcB", Some("svcA"), &uuid);
        assert_eq!(again.status, Status::Ok, "{:?}", again.detail);
        assert_eq!(
            core.store.history("d1").unwrap().len(),
            2,
            "a retry opens no new period"
        );
        // A tenant the device never had stays closed.
        assert_eq!(
            update(&core, "d1", "svcB", Some("svcC"), &uuid).status,
            Status::WrongService
        );
        // The broker's grants: the new service, and the old one until its
        // certificate is revoked; then a pending one as soon as it is set.
        let granted = || grants::read_grants(core.pki.dir(), "d1").unwrap();
        assert_eq!(granted(), ["svcB", "svcA"]);
        let (results, _) = core.request_change(&["d1".to_string()], "svcC", None, None, None);
        assert!(results[0].ok);
        assert_eq!(granted(), ["svcB", "svcC", "svcA"]);
        let to_c = results[0].change_id.clone().unwrap();
        assert_eq!(core.notices_if_pending("d1", &to_c).len(), 2);
        // A "change" back to the current service while one is pending is
        // refused, and the pending one stands.
        let (results, notices) = core.request_change(&["d1".to_string()], "svcB", None, None, None);
        assert!(!results[0].ok, "{:?}", results[0]);
        assert!(notices.is_empty());
        let pending = core.store.device("d1").unwrap().unwrap().pending.unwrap();
        assert_eq!(pending.service_id, "svcC");
        // A change to yet another service replaces it: the replaced one's
        // queued notices are no longer sent, the new one's are.
        let (results, _) = core.request_change(&["d1".to_string()], "svcD", None, None, None);
        assert!(results[0].ok, "{:?}", results[0]);
        assert!(core.notices_if_pending("d1", &to_c).is_empty());
        let to_d = results[0].change_id.clone().unwrap();
        assert_eq!(core.notices_if_pending("d1", &to_d).len(), 2);
    }

    #[test]
    fn messages_off_request_topics_get_no_answer() {
        let (_dir, core) = core();
        assert!(core.handle("fleet/v1/update/dev1/reply", b"x").is_empty());
        assert!(core.handle("fleet/v1/service/change/dev1", b"x").is_empty());
        assert!(core.handle("fleet/v1/update/+", b"x").is_empty());
        assert!(core.handle("other/topic", b"x").is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Whatever arrives on a request topic, the sender gets one signed
        /// error reply and the store is untouched.
        #[test]
        fn garbage_gets_one_signed_error_reply(
            payload in proptest::collection::vec(any::<u8>(), 0..600),
            kind in 0usize..4,
        ) {
            let (_dir, core) = core();
            let kind = RequestKind::ALL[kind];
            let topic = Topic::bootstrap(Route::Request(kind, "dev1".into()));
            let before = core.store.snapshot().unwrap();
            let out = core.handle(&topic.to_string(), &payload);
            let reply = only_reply(&core, &out, &topic.reply_topic().unwrap().to_string());
            prop_assert_ne!(reply.status, Status::Ok);
            prop_assert_eq!(reply.device_id, "dev1");
            prop_assert_eq!(core.store.snapshot().unwrap(), before);
        }

        /// A valid frame around a random body is refused just the same.
        #[test]
        fn random_body_in_a_valid_frame_is_refused(body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let (_dir, core) = core();
            let env = Envelope {
                v: fleet_protocol::PROTOCOL_VERSION,
                kind: Kind::Update,
                crc: fleet_protocol::envelope::crc32(&body),
                body,
                auth: vec![0; 32],
                signer: None,
            };
            let out = core.handle("fleet/v1/update/dev1", &env.encode());
            let reply = only_reply(&core, &out, "fleet/v1/update/dev1/reply");
            prop_assert!(matches!(reply.status, Status::Malformed | Status::UnknownDevice), "{:?}", reply.status);
        }
    }
}

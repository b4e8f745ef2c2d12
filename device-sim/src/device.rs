//! The device state machine: activate, obtain a certificate, live on the
//! service listener, follow service changes.
//!
//! ```text
//! load store ─▶ no uuid? activate (bootstrap) ─▶ no cert for service? update (bootstrap)
//!      ▲                                                     │
//!      │ reconnect (backoff on error)                        ▼
//!      └──── change applied ◀── update in old tenant ◀── service session (mTLS):
//!                                                        online, poll, telemetry, notices
//! ```
//!
//! Each pass through this picture is [`Device::pass`]; [`Device::run`]
//! repeats it, with jittered backoff after transient errors, until shutdown
//! or a final error (a status the manager will not change its mind about,
//! a broken store, an unusable reply).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_protocol::{
    crypto, Kind, ProtocolError, Reply, RequestKind, Route, ServiceChange, Status, Topic,
};
use openssl::pkey::{PKey, Public};
use openssl::x509::X509;
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{DeviceConfig, Endpoint};
use crate::link::{
    bootstrap_subscriptions, service_subscriptions, Link, LinkError, Message, Security,
};
use crate::replies::{
    check_nonce, check_notice_seq, check_notice_target, finish_activate, finish_update,
    open_notice, open_reply, require_ok, roots_of, ManagerTrust, ReplyError, VerifyError,
};
use crate::requests::{self, event, Prepared};
use crate::store::{DeviceState, Store, StoreError};
use crate::DeviceEvent;

/// Times a request is published again, byte for byte, when no reply comes.
pub const MAX_REPUBLISH: u32 = 3;
/// Fresh attempts after a `rate_limited` or `internal` reply.
pub const MAX_BUSY_RETRIES: u32 = 5;
/// How long a pass may finish its work after shutdown before it is dropped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// How long a request left unanswered when its connection ended is sent
/// again as it is by the next attempt: within half the manager's clock
/// window (`MAX_CLOCK_SKEW_MS`), past which it would be `stale`.
const RESEND_WITHIN: Duration = Duration::from_millis(fleet_protocol::MAX_CLOCK_SKEW_MS / 2);
/// Refusals of a service certificate in a row after which the device asks
/// for another (topics.md §10.1, step 7).
pub const REFUSALS_TO_RENEW: u32 = 3;
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Errors of the device layer.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("link: {0}")]
    Link(#[from] LinkError),
    #[error(transparent)]
    Reply(#[from] ReplyError),
    #[error("protocol: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("no reply to {kind} after {attempts} attempts")]
    NoReply { kind: RequestKind, attempts: u32 },
    #[error("configuration: {0}")]
    Config(String),
    #[error("background task: {0}")]
    Task(String),
}

/// Statuses worth a fresh request after a pause.
pub fn is_retriable(status: Status) -> bool {
    matches!(
        status,
        Status::RateLimited | Status::Internal | Status::Busy
    )
}

impl DeviceError {
    pub fn status(&self) -> Option<Status> {
        match self {
            DeviceError::Reply(e) => e.status(),
            _ => None,
        }
    }

    /// Final errors end the device; others are retried after a backoff.
    pub fn is_final(&self) -> bool {
        match self {
            DeviceError::Link(_) | DeviceError::NoReply { .. } => false,
            DeviceError::Reply(e) => !e.status().is_some_and(is_retriable),
            DeviceError::Store(_)
            | DeviceError::Protocol(_)
            | DeviceError::Config(_)
            | DeviceError::Task(_) => true,
        }
    }
}

/// A [`DeviceError`] with the stage it happened in.
#[derive(Debug)]
pub struct Failure {
    pub stage: &'static str,
    pub error: DeviceError,
}

trait AtStage<T> {
    fn stage(self, stage: &'static str) -> Result<T, Failure>;
}

impl<T, E: Into<DeviceError>> AtStage<T> for Result<T, E> {
    fn stage(self, stage: &'static str) -> Result<T, Failure> {
        self.map_err(|e| Failure {
            stage,
            error: e.into(),
        })
    }
}

/// How a pass ended without error.
#[derive(Debug, PartialEq, Eq)]
enum Pass {
    Stopped,
    /// Connect again at once: the service changed, or a change was refused.
    Reconnect,
}

/// Exponential backoff with jitter in [50 %, 100 %] of the step, capped.
pub fn backoff(attempt: u32) -> Duration {
    let step = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(10))
        .min(BACKOFF_CAP);
    jittered(step)
}

/// `step`, less up to half of it at random.
fn jittered(step: Duration) -> Duration {
    step.mul_f64(0.5 + random_share() / 2.0)
}

/// A random fraction in [0, 1].
fn random_share() -> f64 {
    let r = crypto::random_bytes(2);
    f64::from(u16::from_le_bytes([r[0], r[1]])) / f64::from(u16::MAX)
}

/// Runs CPU or disk work off the async workers.
async fn blocking<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, DeviceError>
where
    T: Send + 'static,
    E: Into<DeviceError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DeviceError::Task(e.to_string()))?
        .map_err(Into::into)
}

/// The telemetry record published to `telemetry/{device_id}` in the tenant.
#[derive(Debug, Serialize)]
struct Telemetry<'a> {
    device_id: &'a str,
    service_id: &'a str,
    seq: u64,
    ts: u64,
    temp_c: f32,
}

/// Poll and status requests in flight on the service session, re-published
/// on timeout without blocking the session loop.
#[derive(Default)]
struct Outstanding {
    entries: Vec<Tracked>,
}

struct Tracked {
    kind: RequestKind,
    topic: Topic,
    nonce: Vec<u8>,
    bytes: Vec<u8>,
    deadline: Instant,
    attempts: u32,
    /// Times it was answered `busy` (or another status worth sending it
    /// again after a pause).
    busy: u32,
}

impl Outstanding {
    fn next_deadline(&self) -> Option<Instant> {
        self.entries.iter().map(|t| t.deadline).min()
    }

    fn take(&mut self, kind: RequestKind, nonce: &[u8]) -> Option<Tracked> {
        let i = self
            .entries
            .iter()
            .position(|t| t.kind == kind && t.nonce == nonce)?;
        Some(self.entries.swap_remove(i))
    }
}

pub(crate) struct Device {
    id: String,
    cfg: DeviceConfig,
    store: Arc<Mutex<Store>>,
    /// The pinned manager signing key: the last successor learned from a
    /// message's `signer` (stored), else the configured public key.
    signer: std::sync::RwLock<PinnedSigner>,
    /// The pinned root CAs: those the manager last gave (`roots`, stored),
    /// else the configured root file.
    roots: std::sync::RwLock<PinnedRoots>,
    events: UnboundedSender<(String, DeviceEvent)>,
    shutdown: CancellationToken,
    telemetry_seq: u64,
    /// Set when a service session came up; resets the backoff.
    established: bool,
    /// The service certificate's chain and the pinned roots (PEM), and
    /// the TLS configuration built for them, kept so that reconnecting
    /// resumes the TLS session.
    service_tls: Option<(Vec<u8>, Vec<u8>, Arc<rustls::ClientConfig>)>,
    /// A request whose reply had not come when its connection ended, with
    /// its topic and when it was built. The next attempt on that topic
    /// publishes the same bytes (topics.md §10.1, step 6), so the manager
    /// answers it from its reply cache rather than carrying out a second
    /// request: a second certificate for one update, or `already_active`
    /// for an activation that went through.
    unanswered: Mutex<Option<(String, Instant, Arc<Prepared>)>>,
    /// Refusals of the current service certificate in a row (see
    /// [`Device::recover`]).
    refusals: u32,
    /// The service refused the certificate often enough: the next pass gets
    /// another with `update`, and keeps this one until it has.
    renew: bool,
    /// `unknown_ca` refusals, and when to take them for a retired CA.
    unknown_ca: UnknownCa,
}

/// The manager signing key a device takes messages by, and the notBefore
/// of its certificate (`None`: the key the device was made with).
struct PinnedSigner {
    key: PKey<Public>,
    since: Option<u64>,
}

impl PinnedSigner {
    /// The SHA-256 of the key's DER SubjectPublicKeyInfo, as a `status`
    /// report names it (topics.md §3.5.4).
    fn digest(&self) -> Option<[u8; 32]> {
        let der = self.key.public_key_to_der().ok()?;
        Some(openssl::sha::sha256(&der))
    }

    fn from_pem(pem: &[u8]) -> Option<PinnedSigner> {
        Self::of(&X509::from_pem(pem).ok()?)
    }

    /// The key of a successor's certificate, since its notBefore.
    fn of(cert: &X509) -> Option<PinnedSigner> {
        Some(PinnedSigner {
            key: cert.public_key().ok()?,
            since: Some(crate::replies::unix_of(cert.not_before())?),
        })
    }
}

/// Root CAs a device trusts, as PEM (for TLS) and parsed (for chains).
#[derive(Clone)]
struct PinnedRoots {
    pem: Vec<u8>,
    certs: Vec<X509>,
}

impl PinnedRoots {
    fn from_pem(pem: Vec<u8>) -> Result<PinnedRoots, openssl::error::ErrorStack> {
        let certs = X509::stack_from_pem(&pem)?;
        Ok(PinnedRoots { pem, certs })
    }

    /// The SHA-256 of each root's DER, as a `status` report names them
    /// (topics.md §3.5.4).
    fn digests(&self) -> Vec<[u8; 32]> {
        self.certs
            .iter()
            .filter_map(|c| c.to_der().ok())
            .map(|der| openssl::sha::sha256(&der))
            .collect()
    }
}

/// `unknown_ca` refusals of the service certificate (topics.md §10.1
/// step 7): usually a new service CA the broker has not loaded yet, which
/// passes within seconds; a CA retired for good if it lasts. The device
/// asks for another certificate after [`REFUSALS_TO_RENEW`] in a row over
/// the patience, which doubles after each certificate so asked for until
/// the device connects again: a broker that never loads the new CA, or
/// forged alerts, cannot have it ask again and again.
#[derive(Debug, Default)]
struct UnknownCa {
    /// Refusals in a row, and when the first came.
    run: Option<(u32, Instant)>,
    /// Certificates asked for since the last connection.
    renewals: u32,
}

impl UnknownCa {
    /// One more refusal at `now`: whether to ask for another certificate.
    fn refused(&mut self, now: Instant, patience: Duration) -> bool {
        let (count, since) = self.run.get_or_insert((0, now));
        *count += 1;
        let patience = patience * (1u32 << self.renewals.min(6));
        *count >= REFUSALS_TO_RENEW && now.duration_since(*since) >= patience
    }

    /// A certificate asked for: the patience doubles, and the count starts over.
    fn renewing(&mut self) {
        self.renewals += 1;
        self.run = None;
    }

    /// Anything else happened (another failure, a new certificate): the
    /// run of refusals is broken.
    fn interrupted(&mut self) {
        self.run = None;
    }
}

impl Device {
    /// Loads the configuration files and the store.
    pub(crate) async fn load(
        cfg: DeviceConfig,
        events: UnboundedSender<(String, DeviceEvent)>,
        shutdown: CancellationToken,
    ) -> Result<Device, DeviceError> {
        if cfg.telemetry_interval.is_zero() || cfg.request_timeout.is_zero() {
            return Err(DeviceError::Config(
                "telemetry_interval and request_timeout must be positive".into(),
            ));
        }
        let (root, id) = (cfg.store_root.clone(), cfg.device_id.clone());
        let (store, pinned, learned_signer) = blocking(move || {
            let store = Store::open(&root, &id)?;
            let pinned = store.pinned_roots()?;
            let signer = store.pinned_signer()?;
            Ok::<_, StoreError>((store, pinned, signer))
        })
        .await?;
        let manager_pem = read(&cfg.manager_pub_pem).await?;
        let manager = PKey::public_key_from_pem(&manager_pem)
            .map_err(|e| DeviceError::Config(format!("{}: {e}", cfg.manager_pub_pem.display())))?;
        let signer = match learned_signer.map(|pem| PinnedSigner::from_pem(&pem)) {
            Some(Some(signer)) => signer,
            // Not the configured key in its place: that may be the very
            // key the roll-over replaced.
            Some(None) => {
                return Err(DeviceError::Config(format!(
                    "{}: the stored manager signing key does not read",
                    crate::store::SIGNER_FILE
                )))
            }
            None => PinnedSigner {
                key: manager,
                since: None,
            },
        };
        let learned = pinned.and_then(|pem| match PinnedRoots::from_pem(pem) {
            Ok(roots) if !roots.certs.is_empty() => Some(roots),
            _ => {
                warn!("stored roots unreadable; the configured root file is used");
                None
            }
        });
        let roots = match learned {
            Some(roots) => roots,
            None => PinnedRoots::from_pem(read(&cfg.root_ca_pem).await?)
                .ok()
                .filter(|r| !r.certs.is_empty())
                .ok_or_else(|| {
                    DeviceError::Config(format!(
                        "{}: no PEM certificate",
                        cfg.root_ca_pem.display()
                    ))
                })?,
        };
        Ok(Device {
            id: cfg.device_id.clone(),
            cfg,
            store: Arc::new(Mutex::new(store)),
            signer: std::sync::RwLock::new(signer),
            roots: std::sync::RwLock::new(roots),
            events,
            shutdown,
            telemetry_seq: 0,
            established: false,
            service_tls: None,
            unanswered: Mutex::new(None),
            refusals: 0,
            unknown_ca: UnknownCa::default(),
            renew: false,
        })
    }

    fn emit(&self, event: DeviceEvent) {
        // A dropped receiver only means nobody listens any more.
        let _ = self.events.send((self.id.clone(), event));
    }

    fn state(&self) -> DeviceState {
        self.store
            .lock()
            .expect("store lock poisoned")
            .state()
            .clone()
    }

    /// Runs `f` on the store off the async workers (it writes and syncs files).
    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, DeviceError> {
        let store = Arc::clone(&self.store);
        blocking(move || f(&mut store.lock().expect("store lock poisoned"))).await
    }

    /// Repeats passes until shutdown or a final error.
    pub(crate) async fn run(mut self) -> Result<(), Failure> {
        let shutdown = self.shutdown.clone();
        let mut attempt = 0u32;
        loop {
            let outcome = {
                let pass = self.pass();
                tokio::pin!(pass);
                tokio::select! {
                    r = &mut pass => r,
                    _ = shutdown.cancelled() => {
                        // The session loop disconnects cleanly on shutdown; give it a moment.
                        let _ = tokio::time::timeout(SHUTDOWN_GRACE, pass).await;
                        return Ok(());
                    }
                }
            };
            if std::mem::take(&mut self.established) {
                attempt = 0;
            }
            match outcome {
                Ok(Pass::Stopped) => return Ok(()),
                Ok(Pass::Reconnect) => continue,
                Err(failure) => {
                    self.emit(DeviceEvent::Failed {
                        stage: failure.stage.to_owned(),
                        status: failure.error.status(),
                        error: failure.error.to_string(),
                    });
                    let recovered = self.recover(&failure.error).await;
                    if failure.error.is_final() && !recovered {
                        warn!(stage = failure.stage, error = %failure.error, "device stopped");
                        return Err(failure);
                    }
                    let delay = backoff(attempt);
                    attempt = attempt.saturating_add(1);
                    warn!(stage = failure.stage, error = %failure.error, retry_in_ms = delay.as_millis() as u64, "retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// What the device does when the fleet has moved on without it
    /// (topics.md §10.1, steps 7 and 8):
    /// - its service refused its certificate [`REFUSALS_TO_RENEW`] times in
    ///   a row (revoked, expired, not granted), or did not know its CA as
    ///   many times over `unknown_ca_patience` (the CA retired): its next
    ///   pass asks for another with `update` on the bootstrap listener, and
    ///   it keeps this one until the new one has come (a refusal may pass,
    ///   or be forged);
    /// - the manager answered `not_registered`: an operator's reset ended
    ///   its activation, so it drops the activation and its certificate and
    ///   activates again.
    ///
    /// Returns whether it starts over (then the error is not final).
    async fn recover(&mut self, error: &DeviceError) -> bool {
        let service_id = self.state().service_id;
        // `unknown_ca` counts only in a row.
        if !matches!(error, DeviceError::Link(LinkError::UnknownCa)) {
            self.unknown_ca.interrupted();
        }
        let dropped = match error {
            DeviceError::Link(LinkError::CertificateRefused(why)) => {
                self.refusals += 1;
                if self.refusals >= REFUSALS_TO_RENEW && !self.renew {
                    warn!(service_id = ?service_id, reason = %why, refusals = self.refusals, "the service refuses the certificate; asking for another");
                    self.renew = true;
                }
                return true;
            }
            DeviceError::Link(LinkError::UnknownCa) => {
                let patience = self.cfg.unknown_ca_patience;
                if self.unknown_ca.refused(Instant::now(), patience) && !self.renew {
                    warn!(service_id = ?service_id, "the service has not known the certificate's CA for long: asking for another");
                    self.renew = true;
                    self.unknown_ca.renewing();
                }
                return true;
            }
            e if e.status() == Some(Status::NotRegistered) => {
                warn!("the activation has ended (an operator's reset); activating again");
                self.renew = false;
                self.with_store(move |s| {
                    if let Some(svc) = service_id {
                        s.forget_service_credentials(&svc)?;
                    }
                    s.forget_activation()
                })
                .await
            }
            _ => return false,
        };
        self.service_tls = None;
        match dropped {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "credentials not dropped");
                false
            }
        }
    }

    /// One pass: bootstrap what is missing, then live on the service listener.
    async fn pass(&mut self) -> Result<Pass, Failure> {
        let shutdown = self.shutdown.clone();
        // Everything before the session may be dropped at any await on
        // shutdown: each step is persisted before the next starts.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(Pass::Stopped),
            r = self.bootstrap_phase() => r?,
        }
        self.service_session().await
    }

    /// Activation and the first certificate, on the bootstrap listener, as far as missing.
    async fn bootstrap_phase(&mut self) -> Result<(), Failure> {
        let mut bootstrap: Option<Link> = None;
        if self.state().uuid.is_none() {
            let link = self.bootstrap_link(&mut bootstrap).await?;
            self.activate(link).await.stage("activate")?;
        }
        let state = self.state();
        let service_id = state
            .service_id
            .ok_or_else(|| DeviceError::Config("activated but no service id".into()))
            .stage("load")?;
        let svc = service_id.clone();
        if self.renew
            || self
                .with_store(move |s| s.service_credentials(&svc))
                .await
                .stage("load")?
                .is_none()
        {
            let link = self.bootstrap_link(&mut bootstrap).await?;
            // A change it accepted and has not applied comes first
            // (topics.md §6.3, §10.1 step 7): the manager may have re-keyed
            // it already, its reply lost and the old certificate revoked
            // since, and then takes an update for the new service only.
            let mut done = false;
            if let Some(change) = state.pending_change {
                match self.update(link, None, &change.service_id).await {
                    Ok(()) => {
                        self.adopt(&change).await.stage("update")?;
                        info!(change_id = %change.change_id, to = %change.service_id, "service change applied from the bootstrap listener");
                        done = true;
                    }
                    // No longer pending (the operator moved it elsewhere):
                    // its current service, then.
                    Err(e) if e.status() == Some(Status::WrongService) => {
                        warn!(change_id = %change.change_id, error = %e, "the accepted change is no longer pending; dropped");
                        self.forget_change().await.stage("update")?;
                    }
                    Err(e) => return Err(e).stage("update"),
                }
            }
            if !done {
                self.update(link, None, &service_id).await.stage("update")?;
            }
            // A new certificate: refusals of the old one count no more.
            self.renew = false;
            self.refusals = 0;
            self.unknown_ca.interrupted();
        }
        if let Some(link) = bootstrap.take() {
            link.disconnect().await;
        }
        Ok(())
    }

    fn bootstrap_security(&self) -> Security {
        if self.cfg.bootstrap_tls {
            Security::ServerTls {
                root_ca_pem: self.pinned().pem,
            }
        } else {
            Security::Plain
        }
    }

    async fn bootstrap_link<'a>(
        &self,
        slot: &'a mut Option<Link>,
    ) -> Result<&'a mut Link, Failure> {
        if slot.is_none() {
            let link = Link::connect(
                &self.id,
                &self.cfg.bootstrap,
                self.bootstrap_security(),
                &bootstrap_subscriptions(&self.id),
                self.cfg.request_timeout,
            )
            .await
            .stage("connect_bootstrap")?;
            debug!(endpoint = %self.cfg.bootstrap, "bootstrap connected");
            *slot = Some(link);
        }
        Ok(slot.as_mut().expect("just set"))
    }

    /// Publishes `req` and waits for its verified reply, re-publishing the
    /// identical bytes on timeout. Other messages are kept for later.
    async fn exchange(
        &self,
        link: &mut Link,
        topic: &Topic,
        req: &Prepared,
    ) -> Result<Reply, DeviceError> {
        let reply_kind = Kind::from(req.kind).reply().expect("requests have replies");
        let reply_topic = topic.reply_topic().expect("a request topic").to_string();
        for attempt in 0..=MAX_REPUBLISH {
            if attempt > 0 {
                debug!(kind = %req.kind, attempt, "no reply yet, publishing the same request again");
            }
            link.publish(topic, req.bytes.clone()).await?;
            let deadline = Instant::now() + self.cfg.request_timeout;
            loop {
                let msg = match tokio::time::timeout_at(deadline, link.recv_fresh()).await {
                    Err(_) => break,
                    Ok(msg) => msg?,
                };
                if msg.topic != reply_topic {
                    link.defer(msg);
                    continue;
                }
                let checked = self
                    .with_trust(|trust| open_reply(&msg.payload, reply_kind, trust, &self.id))
                    .and_then(|(r, signer)| check_nonce(&r, &req.nonce).map(|()| (r, signer)));
                match checked {
                    Ok((reply, signer)) => {
                        self.learn_signer(signer).await;
                        self.learn_roots(&reply).await;
                        return Ok(reply);
                    }
                    Err(VerifyError::NonceMismatch) => {
                        debug!("reply to an earlier request ignored")
                    }
                    Err(e) => warn!(error = %e, topic = %msg.topic, "unverifiable reply ignored"),
                }
            }
        }
        Err(DeviceError::NoReply {
            kind: req.kind,
            attempts: MAX_REPUBLISH + 1,
        })
    }

    fn pinned(&self) -> PinnedRoots {
        self.roots.read().expect("roots lock poisoned").clone()
    }

    /// `check` with what the device takes manager messages by now: its
    /// pinned signing key and roots (topics.md §4.3).
    fn with_trust<T>(&self, check: impl FnOnce(ManagerTrust<'_>) -> T) -> T {
        let signer = self.signer.read().expect("signer lock poisoned");
        let roots = self.roots.read().expect("roots lock poisoned");
        check(ManagerTrust {
            key: &signer.key,
            key_since: signer.since,
            roots: &roots.certs,
            now: wall_now() as u64,
        })
    }

    /// Pins the successor signing key a message proved (topics.md §4.3):
    /// stored first, then the only key messages are taken by.
    async fn learn_signer(&self, cert: Option<X509>) {
        let Some((pem, signer)) =
            cert.and_then(|cert| Some((cert.to_pem().ok()?, PinnedSigner::of(&cert)?)))
        else {
            return;
        };
        match self.with_store(move |s| s.pin_signer(&pem)).await {
            Ok(()) => {
                info!(since = ?signer.since, "pinned the manager's new signing key");
                *self.signer.write().expect("signer lock poisoned") = signer;
            }
            Err(e) => warn!(error = %e, "manager signing key not stored; pinned next time"),
        }
    }

    /// Pins the roots a verified reply gives (topics.md §8), if they
    /// differ from those pinned: stored first, then used for every
    /// connection and chain from then on. Roots that do not read are
    /// logged and left alone: the reply is still good. Says whether the
    /// roots pinned changed.
    async fn learn_roots(&self, reply: &Reply) -> bool {
        if reply.roots.is_none() {
            return false;
        }
        let pinned = self.pinned();
        let roots = match roots_of(reply, &pinned.certs, wall_now() as u64) {
            Ok(Some(roots)) => roots,
            Ok(None) => return false,
            Err(e) => {
                warn!(error = %e, "roots in a reply ignored");
                return false;
            }
        };
        let mut pem = Vec::new();
        for root in &roots {
            match root.to_pem() {
                Ok(one) => pem.extend(one),
                Err(_) => return false,
            }
        }
        if pem == pinned.pem {
            return false;
        }
        let stored = pem.clone();
        match self.with_store(move |s| s.pin_roots(&stored)).await {
            Ok(()) => {
                info!(roots = roots.len(), "pinned the roots the manager gave");
                *self.roots.write().expect("roots lock poisoned") =
                    PinnedRoots { pem, certs: roots };
                true
            }
            Err(e) => {
                warn!(error = %e, "roots not stored; pinned next time");
                false
            }
        }
    }

    /// [`Device::exchange`] of the request left unanswered on `topic` for
    /// `what` (the service an update is for: one topic carries updates for
    /// any) by the last connection, if it is recent enough to send again,
    /// else of a new one from `build`. The request is kept for the next
    /// attempt until a reply comes. Returns the reply and the request.
    async fn exchange_kept<E>(
        &self,
        link: &mut Link,
        (topic, what): (&Topic, &str),
        build: impl FnOnce() -> Result<Prepared, E> + Send + 'static,
    ) -> Result<(Reply, Arc<Prepared>), DeviceError>
    where
        E: Into<DeviceError> + Send + 'static,
    {
        let key = format!("{topic} {what}");
        let again = self
            .unanswered
            .lock()
            .expect("unanswered lock poisoned")
            .take()
            .filter(|(k, built, _)| *k == key && built.elapsed() < RESEND_WITHIN);
        let (req, built) = match again {
            Some((_, built, req)) => {
                debug!(kind = %req.kind, "the request left unanswered, sent again as it was");
                (req, built)
            }
            None => (Arc::new(blocking(build).await?), Instant::now()),
        };
        *self.unanswered.lock().expect("unanswered lock poisoned") =
            Some((key, built, req.clone()));
        let reply = self.exchange(link, topic, &req).await?;
        *self.unanswered.lock().expect("unanswered lock poisoned") = None;
        Ok((reply, req))
    }

    async fn activate(&self, link: &mut Link) -> Result<(), DeviceError> {
        let topic = Topic::bootstrap(Route::Request(RequestKind::Activate, self.id.clone()));
        let mut busy = 0;
        loop {
            let (id, svc) = (self.id.clone(), self.state().service_id);
            let key = self
                .store
                .lock()
                .expect("store lock poisoned")
                .factory_key()
                .clone();
            let (reply, req) = self
                .exchange_kept(link, (&topic, ""), move || {
                    requests::build_activate(&id, svc.as_deref(), &key)
                })
                .await?;
            match finish_activate(&reply, &req, &self.id) {
                Ok(act) => {
                    let service_id = act.service_id.clone();
                    self.with_store(move |s| s.set_activation(&act.service_id, &act.uuid))
                        .await?;
                    info!(service_id = %service_id, "activated");
                    self.emit(DeviceEvent::Activated { service_id });
                    return Ok(());
                }
                Err(e) if e.status().is_some_and(is_retriable) && busy < MAX_BUSY_RETRIES => {
                    self.pause_busy(&e, &mut busy).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn pause_busy(&self, e: &ReplyError, busy: &mut u32) {
        let delay = backoff(*busy);
        *busy += 1;
        debug!(error = %e, retry_in_ms = delay.as_millis() as u64, "manager busy");
        tokio::time::sleep(delay).await;
    }

    /// Obtains and stores a certificate for `service_id`, on the bootstrap
    /// listener (`tenant` None) or inside the current tenant.
    async fn update(
        &self,
        link: &mut Link,
        tenant: Option<&str>,
        service_id: &str,
    ) -> Result<(), DeviceError> {
        let route = Route::Request(RequestKind::Update, self.id.clone());
        let topic = match tenant {
            Some(t) => Topic::in_tenant(t, route),
            None => Topic::bootstrap(route),
        };
        let uuid = self
            .state()
            .uuid
            .ok_or_else(|| DeviceError::Config("update before activation".into()))?;
        let key_mode = self.cfg.key_mode;
        let mut busy = 0;
        loop {
            let (id, svc, uuid) = (self.id.clone(), service_id.to_owned(), uuid.clone());
            let (reply, req) = self
                .exchange_kept(link, (&topic, service_id), move || {
                    requests::build_update(&id, &svc, &uuid, key_mode)
                })
                .await?;
            let (id, svc, roots) = (self.id.clone(), service_id.to_owned(), self.pinned().certs);
            let finished = blocking(move || {
                finish_update(&reply, &req, &id, &svc, &roots).map_err(DeviceError::from)
            })
            .await;
            match finished {
                Ok(installed) => {
                    let serial_hex = installed.serial_hex.clone();
                    self.with_store(move |s| {
                        s.save_service_credentials(
                            &installed.service_id,
                            &installed.key,
                            &installed.chain,
                        )?;
                        s.update_state(|st| st.key_mode = key_mode)
                    })
                    .await?;
                    info!(service_id, serial = %serial_hex, ?key_mode, "certificate installed");
                    self.emit(DeviceEvent::CertificateInstalled {
                        service_id: service_id.to_owned(),
                        serial_hex,
                    });
                    return Ok(());
                }
                Err(DeviceError::Reply(e))
                    if e.status().is_some_and(is_retriable) && busy < MAX_BUSY_RETRIES =>
                {
                    self.pause_busy(&e, &mut busy).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Connected to the service listener until shutdown, an error, or an applied change.
    async fn service_session(&mut self) -> Result<Pass, Failure> {
        let state = self.state();
        let service_id = state
            .service_id
            .clone()
            .ok_or_else(|| DeviceError::Config("no service id".into()))
            .stage("connect_service")?;
        let svc = service_id.clone();
        let creds = self
            .with_store(move |s| s.service_credentials(&svc))
            .await
            .stage("connect_service")?
            .ok_or_else(|| DeviceError::Config(format!("no certificate for {service_id}")))
            .stage("connect_service")?;
        let endpoint = state
            .service_endpoint
            .as_deref()
            .and_then(Endpoint::parse)
            .unwrap_or_else(|| self.cfg.service.clone());
        let subscriptions = service_subscriptions(&service_id, &self.id);
        // Not before its `online` is answered (a report in the tenant
        // revokes a superseded certificate: it must come from the new one):
        // a reply's time at least, then until none is outstanding (below).
        // In wall-clock time, looked at again every hour at most: the
        // monotonic clock stands still while a host sleeps.
        let settled = wall_now() + self.cfg.request_timeout.as_secs_f64();
        let mut renew_at =
            renewal_due(&creds.chain_pem, self.cfg.renew_window).map(|at| at.max(settled));
        let roots = self.pinned().pem;
        let tls = match &self.service_tls {
            Some((chain, pinned, config)) if *chain == creds.chain_pem && *pinned == roots => {
                config.clone()
            }
            _ => {
                // A stored certificate or key that rustls cannot use will
                // not become usable by retrying.
                let config = crate::link::mutual_tls(&roots, &creds.chain_pem, &creds.key_pem)
                    .map_err(|e| DeviceError::Config(e.to_string()))
                    .stage("connect_service")?;
                self.service_tls = Some((creds.chain_pem, roots, config.clone()));
                config
            }
        };
        let connect = Link::connect(
            &self.id,
            &endpoint,
            Security::MutualTls(tls),
            &subscriptions,
            self.cfg.request_timeout,
        );
        let shutdown = self.shutdown.clone();
        let mut link = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Pass::Stopped),
            link = connect => link.stage("connect_service")?,
        };
        self.established = true;
        self.refusals = 0;
        self.unknown_ca = UnknownCa::default();
        info!(service_id = %service_id, %endpoint, "connected to service");
        self.emit(DeviceEvent::Connected {
            service_id: service_id.clone(),
        });

        if let Some(change) = state.pending_change {
            info!(change_id = %change.change_id, "resuming an accepted service change");
            return self.apply_change(link, &service_id, change).await;
        }

        // A renewal whose reply was lost (the connection ended first) is
        // asked again, identical, before anything is reported from this
        // certificate: its `online` would have the manager revoke it.
        if self.renewal_left(&service_id) {
            info!(service_id = %service_id, "a renewal left unanswered: asking again first");
            let renewed = self.renew(&mut link, &service_id).await.stage("renew")?;
            return Ok(closed(link, renewed).await);
        }

        let mut outstanding = Outstanding::default();
        if let Some(change_id) = state.unreported_change {
            self.send_status(
                &link,
                &mut outstanding,
                &service_id,
                event::CHANGE_APPLIED,
                Some(change_id.clone()),
                None,
            )
            .await
            .stage("session")?;
            self.with_store(|s| s.update_state(|st| st.unreported_change = None))
                .await
                .stage("session")?;
            info!(change_id = %change_id, service_id = %service_id, "service change applied");
            self.emit(DeviceEvent::ChangeAccepted {
                change_id,
                service_id: service_id.clone(),
            });
        }
        self.send_status(
            &link,
            &mut outstanding,
            &service_id,
            event::ONLINE,
            None,
            None,
        )
        .await
        .stage("session")?;
        self.send_poll(&link, &mut outstanding, &service_id)
            .await
            .stage("session")?;

        let period = self.cfg.telemetry_interval;
        let mut telemetry = tokio::time::interval_at(Instant::now() + period, period);
        telemetry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut repoll_at: Option<Instant> = None;
        let mut busy_polls = 0u32;
        let mut renewals_failed = 0u32;
        loop {
            let next_resend = outstanding.next_deadline();
            tokio::select! {
                _ = shutdown.cancelled() => {
                    link.disconnect().await;
                    return Ok(Pass::Stopped);
                }
                _ = sleep_until_opt(renew_at.map(wall_instant)) => {
                    if renew_at.is_some_and(|at| at > wall_now() + 0.5) {
                        continue;
                    }
                    // Its status reports answered first: an `online` the
                    // manager took after the renewal would revoke the
                    // certificate this connection still holds.
                    if outstanding.entries.iter().any(|t| t.kind == RequestKind::Status) {
                        renew_at = Some(wall_now() + 1.0);
                        continue;
                    }
                    match self.renew(&mut link, &service_id).await {
                        Ok(renewed) => return Ok(closed(link, renewed).await),
                        // An operator's reset: `recover` activates again.
                        Err(e) if e.status() == Some(Status::NotRegistered) => {
                            return Err(e).stage("renew");
                        }
                        Err(e) => {
                            // It keeps the certificate it has, and asks
                            // again later, later each time.
                            let again = renew_retry(renewals_failed);
                            renewals_failed += 1;
                            warn!(error = %e, retry_in_s = again.as_secs(), "certificate not renewed");
                            self.emit(DeviceEvent::Failed {
                                stage: "renew".into(),
                                status: e.status(),
                                error: e.to_string(),
                            });
                            renew_at = Some(wall_now() + again.as_secs_f64());
                        }
                    }
                }
                _ = telemetry.tick() => {
                    self.publish_telemetry(&link, &service_id).await.stage("session")?;
                }
                _ = sleep_until_opt(next_resend) => {
                    self.resend_due(&link, &mut outstanding).await.stage("session")?;
                }
                _ = sleep_until_opt(repoll_at) => {
                    repoll_at = None;
                    self.send_poll(&link, &mut outstanding, &service_id).await.stage("session")?;
                }
                msg = link.recv() => {
                    let msg = msg.stage("session")?;
                    let mut signer = None;
                    let incoming = self.classify(msg, &mut outstanding, &mut signer);
                    self.learn_signer(signer).await;
                    if let Incoming::PollReply(reply) | Incoming::StatusReply(reply) = &incoming {
                        // Newly pinned roots are reported at once, so the
                        // operator sees which devices pin them (§3.5.4).
                        if self.learn_roots(reply).await {
                            self.send_status(&link, &mut outstanding, &service_id, event::ROOTS_PINNED, None, None)
                                .await
                                .stage("session")?;
                        }
                    }
                    let notice = match incoming {
                        Incoming::Notice(n) => Some(n),
                        Incoming::PollReply(reply) => match require_ok(&reply) {
                            Ok(()) => {
                                busy_polls = 0;
                                reply.change.map(|c| check_notice_target(&c, &self.id).map(|()| c))
                            }
                            Err(e) if e.status().is_some_and(is_retriable) && busy_polls < MAX_BUSY_RETRIES => {
                                let delay = backoff(busy_polls);
                                busy_polls += 1;
                                debug!(error = %e, "poll refused, polling again later");
                                repoll_at = Some(Instant::now() + delay);
                                None
                            }
                            Err(e) => {
                                warn!(error = %e, "poll refused");
                                None
                            }
                        },
                        Incoming::StatusReply(_) | Incoming::Nothing => None,
                    };
                    if let Some(notice) = notice {
                        if let Some(change) = self
                            .consider_notice(notice, &link, &mut outstanding, &service_id)
                            .await
                            .stage("service_change")?
                        {
                            return self.apply_change(link, &service_id, change).await;
                        }
                    }
                }
            }
        }
    }

    /// Sorts a message received on the service session. Replies to poll and
    /// status are matched against what is outstanding; anything that does not
    /// verify is logged and dropped.
    /// What `msg` is; `signer`, the certificate of a successor signing key
    /// that signed it, to pin.
    fn classify(
        &self,
        msg: Message,
        outstanding: &mut Outstanding,
        signer: &mut Option<X509>,
    ) -> Incoming {
        let topic = match Topic::parse(&msg.topic) {
            Ok(t) => t,
            Err(e) => {
                warn!(topic = %msg.topic, error = %e, "message on an unexpected topic");
                return Incoming::Nothing;
            }
        };
        match topic.route {
            Route::ServiceChange(_) => {
                // A notice's `signer` is checked each time; the key is
                // pinned from a reply to a request of this device's only
                // (topics.md §4.3), after every check.
                match self.with_trust(|trust| open_notice(&msg.payload, trust, &self.id)) {
                    Ok((n, _)) => Incoming::Notice(Ok(n)),
                    Err(e) => Incoming::Notice(Err(e)),
                }
            }
            Route::Reply(kind @ (RequestKind::Poll | RequestKind::Status), _) => {
                let reply_kind = Kind::from(kind).reply().expect("requests have replies");
                let (reply, learned) = match self
                    .with_trust(|trust| open_reply(&msg.payload, reply_kind, trust, &self.id))
                {
                    Ok(opened) => opened,
                    Err(e) => {
                        warn!(topic = %msg.topic, error = %e, "unverifiable reply ignored");
                        return Incoming::Nothing;
                    }
                };
                let Some(mut tracked) = outstanding.take(kind, &reply.nonce) else {
                    debug!(%kind, "reply to no outstanding request ignored");
                    return Incoming::Nothing;
                };
                *signer = learned;
                match kind {
                    RequestKind::Poll => Incoming::PollReply(Box::new(reply)),
                    _ => {
                        match require_ok(&reply) {
                            Ok(()) => return Incoming::StatusReply(Box::new(reply)),
                            // Not carried out (§5.1, code 14): the same
                            // report goes again after a pause, as the
                            // manager records nothing of a request it sheds.
                            // A `change_applied` or `online` lost so would
                            // leave its service period unconfirmed.
                            Err(e)
                                if e.status().is_some_and(is_retriable)
                                    && tracked.busy < MAX_BUSY_RETRIES =>
                            {
                                let delay = backoff(tracked.busy);
                                debug!(error = %e, delay_ms = delay.as_millis() as u64, "status report not carried out; sending it again");
                                tracked.busy += 1;
                                // As if not yet sent: then as many resends
                                // for want of a reply as any request has.
                                tracked.attempts = 0;
                                tracked.deadline = Instant::now() + delay;
                                outstanding.entries.push(tracked);
                            }
                            Err(e) => warn!(error = %e, "status report refused"),
                        }
                        Incoming::Nothing
                    }
                }
            }
            _ => {
                debug!(topic = %msg.topic, "ignored");
                Incoming::Nothing
            }
        }
    }

    /// Accepts a notice (persisting its sequence number and the pending
    /// change) or rejects it and reports why.
    async fn consider_notice(
        &self,
        notice: Result<ServiceChange, VerifyError>,
        link: &Link,
        outstanding: &mut Outstanding,
        service_id: &str,
    ) -> Result<Option<ServiceChange>, DeviceError> {
        let last = self.state().last_notice_seq;
        // The manager re-sends a pending notice (after its restart, when the
        // device comes online) under the same sequence number; a copy of the
        // notice already accepted is no attack and needs no report.
        if let Ok(n) = &notice {
            if last != 0 && n.seq == last {
                debug!(seq = n.seq, "copy of the accepted notice ignored");
                return Ok(None);
            }
        }
        let checked = notice.and_then(|n| {
            check_notice_seq(&n, last)?;
            fleet_protocol::topic::validate_service_id(&n.service_id)
                .map_err(|e| VerifyError::Decode(e.to_string()))?;
            if let Some(ep) = &n.endpoint {
                fleet_protocol::topic::parse_endpoint(ep)
                    .map_err(|e| VerifyError::Decode(e.to_string()))?;
            }
            Ok(n)
        });
        match checked {
            Ok(change) => {
                let (seq, pending) = (change.seq, change.clone());
                self.with_store(move |s| {
                    s.update_state(|st| {
                        st.last_notice_seq = seq;
                        st.pending_change = Some(pending);
                    })
                })
                .await?;
                info!(change_id = %change.change_id, seq, to = %change.service_id, "service change accepted");
                Ok(Some(change))
            }
            Err(reason) => {
                let reason = reason.to_string();
                warn!(reason = %reason, "service-change notice rejected");
                self.emit(DeviceEvent::NoticeRejected {
                    reason: reason.clone(),
                });
                self.send_status(
                    link,
                    outstanding,
                    service_id,
                    event::NOTICE_REJECTED,
                    None,
                    Some(reason),
                )
                .await?;
                Ok(None)
            }
        }
    }

    /// Re-keys for the new service over the current tenant, then switches.
    async fn apply_change(
        &mut self,
        mut link: Link,
        current: &str,
        change: ServiceChange,
    ) -> Result<Pass, Failure> {
        let shutdown = self.shutdown.clone();
        // The accepted change is persisted as pending: dropping the update
        // on shutdown is safe, it resumes on the next start.
        let updated = tokio::select! {
            _ = shutdown.cancelled() => return Ok(Pass::Stopped),
            r = self.update(&mut link, Some(current), &change.service_id) => r,
        };
        match updated {
            Ok(()) => {
                self.adopt(&change).await.stage("service_change")?;
                link.disconnect().await;
                info!(change_id = %change.change_id, from = %current, to = %change.service_id, "switching service");
                Ok(Pass::Reconnect)
            }
            Err(e) if e.is_final() => {
                // The manager will not issue the certificate: stay where we are.
                warn!(change_id = %change.change_id, error = %e, "service change abandoned");
                self.emit(DeviceEvent::Failed {
                    stage: "service_change".into(),
                    status: e.status(),
                    error: e.to_string(),
                });
                self.forget_change().await.stage("service_change")?;
                link.disconnect().await;
                Ok(Pass::Reconnect)
            }
            // Transient: the pending change is resumed after reconnecting.
            Err(e) => Err(e).stage("service_change"),
        }
    }

    /// Renews the certificate for `service_id` over `link` (topics.md
    /// §10.1 step 5): an `update` for its own service in its tenant, the
    /// new certificate stored. Then the link is to be closed (`closed`),
    /// to connect with it; the manager revokes the old one once the device
    /// reports from the new. False if stopped first.
    async fn renew(&mut self, link: &mut Link, service_id: &str) -> Result<bool, DeviceError> {
        info!(service_id, "renewing the certificate");
        let shutdown = self.shutdown.clone();
        tokio::select! {
            _ = shutdown.cancelled() => Ok(false),
            r = self.update(link, Some(service_id), service_id) => r.map(|()| true),
        }
    }

    /// Whether a renewal for `service_id` was sent recently and left
    /// unanswered (see [`Device::exchange_kept`]).
    fn renewal_left(&self, service_id: &str) -> bool {
        let topic = Topic::in_tenant(
            service_id,
            Route::Request(RequestKind::Update, self.id.clone()),
        );
        let key = format!("{topic} {service_id}");
        self.unanswered
            .lock()
            .expect("unanswered lock poisoned")
            .as_ref()
            .is_some_and(|(k, built, _)| *k == key && built.elapsed() < RESEND_WITHIN)
    }

    /// Makes `change`'s service its own, once it holds that service's
    /// certificate: its next connection goes there and reports the change
    /// applied.
    async fn adopt(&self, change: &ServiceChange) -> Result<(), DeviceError> {
        let change = change.clone();
        self.with_store(move |s| {
            s.update_state(|st| {
                st.service_id = Some(change.service_id.clone());
                st.service_endpoint = change.endpoint.clone();
                st.pending_change = None;
                st.unreported_change = Some(change.change_id.clone());
            })
        })
        .await
    }

    /// Drops the change it accepted: the manager will not carry it out.
    async fn forget_change(&self) -> Result<(), DeviceError> {
        self.with_store(|s| s.update_state(|st| st.pending_change = None))
            .await
    }

    fn uuid(&self) -> Result<Vec<u8>, DeviceError> {
        self.state()
            .uuid
            .ok_or_else(|| DeviceError::Config("not activated".into()))
    }

    async fn send_tracked(
        &self,
        link: &Link,
        outstanding: &mut Outstanding,
        topic: Topic,
        req: Prepared,
    ) -> Result<(), DeviceError> {
        link.publish(&topic, req.bytes.clone()).await?;
        outstanding.entries.push(Tracked {
            kind: req.kind,
            topic,
            nonce: req.nonce,
            bytes: req.bytes,
            deadline: Instant::now() + self.cfg.request_timeout,
            attempts: 1,
            busy: 0,
        });
        Ok(())
    }

    async fn send_status(
        &self,
        link: &Link,
        outstanding: &mut Outstanding,
        service_id: &str,
        event: &str,
        change_id: Option<String>,
        detail: Option<String>,
    ) -> Result<(), DeviceError> {
        let req = requests::build_status(
            &self.id,
            service_id,
            &self.uuid()?,
            event,
            change_id,
            detail,
            requests::Pinned {
                roots: self.pinned().digests(),
                signing_key: self.signer.read().expect("signer lock poisoned").digest(),
            },
        )?;
        let topic = Topic::in_tenant(
            service_id,
            Route::Request(RequestKind::Status, self.id.clone()),
        );
        self.send_tracked(link, outstanding, topic, req).await
    }

    async fn send_poll(
        &self,
        link: &Link,
        outstanding: &mut Outstanding,
        service_id: &str,
    ) -> Result<(), DeviceError> {
        let req = requests::build_poll(&self.id, service_id, &self.uuid()?)?;
        let topic = Topic::in_tenant(
            service_id,
            Route::Request(RequestKind::Poll, self.id.clone()),
        );
        self.send_tracked(link, outstanding, topic, req).await
    }

    async fn resend_due(
        &self,
        link: &Link,
        outstanding: &mut Outstanding,
    ) -> Result<(), DeviceError> {
        let now = Instant::now();
        let mut i = 0;
        while i < outstanding.entries.len() {
            let t = &mut outstanding.entries[i];
            if t.deadline > now {
                i += 1;
            } else if t.attempts > MAX_REPUBLISH {
                warn!(kind = %t.kind, "no reply, giving up on this request");
                outstanding.entries.swap_remove(i);
            } else {
                t.attempts += 1;
                t.deadline = now + self.cfg.request_timeout;
                link.publish(&t.topic, t.bytes.clone()).await?;
                i += 1;
            }
        }
        Ok(())
    }

    async fn publish_telemetry(
        &mut self,
        link: &Link,
        service_id: &str,
    ) -> Result<(), DeviceError> {
        self.telemetry_seq += 1;
        let seq = self.telemetry_seq;
        let record = Telemetry {
            device_id: &self.id,
            service_id,
            seq,
            ts: fleet_protocol::now_ms(),
            // A slow saw-tooth between 20 and 25 °C.
            temp_c: 20.0 + (seq % 50) as f32 * 0.1,
        };
        let payload = serde_cbor::to_vec(&record).map_err(ProtocolError::from)?;
        let topic = Topic::in_tenant(service_id, Route::Telemetry(self.id.clone()));
        link.publish(&topic, payload).await?;
        self.emit(DeviceEvent::Telemetry {
            service_id: service_id.to_owned(),
            seq,
        });
        Ok(())
    }
}

enum Incoming {
    Notice(Result<ServiceChange, VerifyError>),
    PollReply(Box<Reply>),
    /// A status report's `ok` (the report is done).
    StatusReply(Box<Reply>),
    Nothing,
}

/// Closes `link` after a renewal: to connect with the new certificate if
/// `renewed`, else because the device stops.
async fn closed(link: Link, renewed: bool) -> Pass {
    link.disconnect().await;
    match renewed {
        true => {
            info!("certificate renewed; connecting with it");
            Pass::Reconnect
        }
        false => Pass::Stopped,
    }
}

/// The wait before a renewal that failed is asked again: a minute, twice
/// that at each failure after, an hour at most, less up to half at random,
/// so that devices refused together do not come back together.
fn renew_retry(failures: u32) -> Duration {
    let step = (Duration::from_secs(60) * (1u32 << failures.min(6))).min(Duration::from_secs(3600));
    jittered(step)
}

/// When to renew the certificate whose chain is `chain_pem` (its leaf
/// first): at a point of `window` of its validity that its serial picks,
/// the same at every connection; if that point has passed (the device was
/// away), after a random delay of up to a tenth of what is left, an hour at
/// most, so that a fleet coming back at once does not renew at once. Never
/// if its validity does not read (said).
/// In Unix seconds.
fn renewal_due(chain_pem: &[u8], window: (f64, f64)) -> Option<f64> {
    let now = wall_now();
    let at = renewal_point(chain_pem, window);
    let Some((at, to)) = at else {
        warn!("the certificate's validity does not read: it will not be renewed before it expires");
        return None;
    };
    let wait = if at > now {
        at - now
    } else {
        random_share() * ((to - now).max(0.0) / 10.0).min(3600.0)
    };
    Some(now + wait)
}

/// The wall clock, in Unix seconds.
fn wall_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// When to look at a wall-clock time `at` (Unix seconds) again: then, or in
/// an hour if that is sooner.
fn wall_instant(at: f64) -> Instant {
    Instant::now() + Duration::from_secs_f64((at - wall_now()).clamp(0.0, 3600.0))
}

/// The renewal point of the leaf of `chain_pem` in Unix seconds, and its
/// notAfter: `window` of its validity, the share of it taken from a hash of
/// the serial.
fn renewal_point(chain_pem: &[u8], window: (f64, f64)) -> Option<(f64, f64)> {
    let leaf = X509::from_pem(chain_pem).ok()?;
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let secs = |t: &openssl::asn1::Asn1TimeRef| {
        let d = epoch.diff(t).ok()?;
        Some(f64::from(d.days) * 86_400.0 + f64::from(d.secs))
    };
    let (from, to) = (secs(leaf.not_before())?, secs(leaf.not_after())?);
    let serial = leaf.serial_number().to_bn().ok()?.to_vec();
    let h = openssl::sha::sha256(&serial);
    let share = f64::from(u16::from_le_bytes([h[0], h[1]])) / f64::from(u16::MAX);
    Some((
        from + (to - from) * (window.0 + (window.1 - window.0) * share),
        to,
    ))
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

async fn read(path: &std::path::Path) -> Result<Vec<u8>, DeviceError> {
    tokio::fs::read(path)
        .await
        .map_err(|e| DeviceError::Config(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `unknown_ca` is taken for a retired CA only 3 times in a row over
    /// the patience, which doubles with each certificate so asked for.
    #[test]
    fn unknown_ca_asks_for_a_certificate_only_when_it_lasts() {
        let patience = Duration::from_secs(60);
        let t0 = Instant::now();
        let at = |secs| t0 + Duration::from_secs(secs);
        let mut u = UnknownCa::default();
        // Three quick ones: a CA not loaded yet.
        assert!(!u.refused(at(0), patience));
        assert!(!u.refused(at(1), patience));
        assert!(!u.refused(at(3), patience));
        // A minute on: it lasts.
        assert!(u.refused(at(61), patience));
        u.renewing();
        // The next certificate: two minutes now, counted afresh.
        assert!(!u.refused(at(62), patience));
        assert!(!u.refused(at(100), patience));
        assert!(!u.refused(at(150), patience));
        assert!(u.refused(at(182), patience));
        u.renewing();
        // Broken by anything else, it starts over.
        assert!(!u.refused(at(200), patience));
        assert!(!u.refused(at(300), patience));
        u.interrupted();
        assert!(!u.refused(at(500), patience));
        assert!(!u.refused(at(501), patience));
        assert!(!u.refused(at(502), patience));
        assert!(u.refused(at(500 + 240), patience));
        // Capped at 64 times the patience.
        let mut long = UnknownCa {
            run: None,
            renewals: 40,
        };
        assert!(!long.refused(at(0), patience));
        assert!(!long.refused(at(1), patience));
        assert!(!long.refused(at(64 * 60 - 1), patience));
        assert!(long.refused(at(64 * 60), patience));
    }

    #[test]
    fn a_certificate_is_renewed_at_the_point_its_serial_picks() {
        let key = crypto::generate_p256().unwrap();
        // Valid from now for a day.
        let pem = crate::testutil::self_signed("dev1", &key).to_pem().unwrap();
        let now = wall_now;
        let (at, to) = renewal_point(&pem, (0.5, 0.75)).unwrap();
        assert_eq!(
            renewal_point(&pem, (0.5, 0.75)),
            Some((at, to)),
            "the same each time"
        );
        let start = now();
        assert!(at > start + 0.5 * 86_400.0 - 5.0 && at < start + 0.75 * 86_400.0 + 5.0);
        // Ahead: then.
        let due = renewal_due(&pem, (0.5, 0.75)).unwrap();
        assert!((due - at).abs() < 0.001, "{due} {at}");
        // Looked at again within the hour.
        assert!(wall_instant(due) <= Instant::now() + Duration::from_secs(3600));
        // Passed: within a tenth of what is left, an hour at most.
        let due = renewal_due(&pem, (1e-9, 1e-9)).unwrap() - now();
        assert!((0.0..=3600.0).contains(&due), "{due}");
        // Unreadable: never.
        assert!(renewal_due(b"no certificate", (0.5, 0.75)).is_none());
        // After a failure: a minute or less at first, up to an hour.
        assert!((30..=60).contains(&renew_retry(0).as_secs()));
        assert!((1800..=3600).contains(&renew_retry(20).as_secs()));
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 0..20 {
            let d = backoff(attempt);
            let step = BACKOFF_BASE
                .saturating_mul(1 << attempt.min(10))
                .min(BACKOFF_CAP);
            assert!(d >= step / 2 && d <= step, "{attempt}: {d:?}");
        }
        assert!(backoff(30) <= BACKOFF_CAP);
    }

    #[test]
    fn finality() {
        let status = |s| {
            DeviceError::Reply(ReplyError::Status {
                status: s,
                detail: String::new(),
            })
        };
        assert!(status(Status::AuthFailed).is_final());
        assert!(status(Status::NotRegistered).is_final());
        assert!(!status(Status::RateLimited).is_final());
        assert!(!status(Status::Busy).is_final());
        assert!(!status(Status::Internal).is_final());
        assert_eq!(
            status(Status::AuthFailed).status(),
            Some(Status::AuthFailed)
        );
        assert!(!DeviceError::Link(LinkError::Closed).is_final());
        assert!(!DeviceError::NoReply {
            kind: RequestKind::Update,
            attempts: 4
        }
        .is_final());
        assert!(DeviceError::Reply(ReplyError::Missing("chain")).is_final());
    }
}

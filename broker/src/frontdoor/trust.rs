//! Trust for the service listener: the fleet root and every per-service CA
//! in `certs/`, the CRL of each service CA, the registry's grants
//! (`certs/grants/`, see [`fleet_pki::grants`]), and the sessions to cut
//! when a certificate is revoked.
//!
//! TLS is rustls on aws-lc-rs; the certificates and CRLs are read with
//! OpenSSL when they load. One rustls configuration (in the two suite
//! orders of [`Configs`]) serves every handshake; it is rebuilt only when
//! the root, the broker's certificate or a file under `certs/services/` or
//! `certs/crl/` changes, which a watcher notices within [`RELOAD_EVERY`].
//! Revocation and the registry's grant are checked by the client
//! verifier, so a revoked certificate, or one
//! whose device the registry does not grant its service, fails the
//! handshake itself; the live sessions of a newly revoked certificate are
//! cancelled on reload. Grants are checked at each handshake against
//! their files, kept in memory until inotify reports a change
//! ([`GrantFiles`]), so the manager's latest write always counts.
//!
//! A device that reconnects does not pay for its chain again: a leaf
//! whose chain verified is remembered, with the window in which the whole
//! path is valid, until the set of CAs changes ([`Chains`]). And it may
//! resume its TLS session with the ticket it was given ([`TicketGate`]):
//! a ticket is taken only if the certificate inside it passes every check
//! of a full handshake again, now.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fleet_pki::grants;
use openssl::asn1::{Asn1IntegerRef, Asn1Time};
use openssl::x509::{X509Crl, X509Ref, X509VerifyResult, X509};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ProducesTickets, ServerConfig};
use rustls::{
    CertificateError, CipherSuite, DigitallySignedStruct, DistinguishedName, SignatureScheme,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::grants::GrantFiles;
use super::{der, Metrics};
use crate::BrokerError;

/// How often the watcher looks at `certs/` for new CAs and CRLs.
pub const RELOAD_EVERY: Duration = Duration::from_millis(200);

/// How long a live session of a newly revoked certificate lives on, so a
/// reply already in flight to it (the device's new certificate, on
/// migration) is delivered. Polling plus grace stay under one second.
pub const CUT_GRACE: Duration = Duration::from_millis(400);

/// Lowercase hex of a serial number, as the PKI and the CRLs write it.
pub(crate) fn hex_serial(serial: &Asn1IntegerRef) -> String {
    serial
        .to_bn()
        .and_then(|b| b.to_hex_str().map(|s| s.to_lowercase()))
        .unwrap_or_default()
}

/// SHA-256 of `data`, by which certificates and tickets are known: it
/// runs on every handshake ([`der::sha256`]).
pub(crate) use der::sha256;

/// The identity a verified client certificate carries.
#[derive(Debug, Clone)]
pub struct CertIdentity {
    /// The CN: a device id, or `provider.{name}`; the client id must equal it.
    pub cn: String,
    pub service_id: String,
    pub serial: String,
    /// The earliest notAfter of the chain the client presented (its
    /// certificate and its service CA's), Unix seconds: past it the
    /// session is cut and its Will is not published.
    pub not_after: u64,
}

impl CertIdentity {
    /// The provider's name when the CN is `provider.{name}`. (Read from the
    /// CN, not kept beside it: every live session keeps its identity.)
    pub fn provider(&self) -> Option<&str> {
        self.cn.strip_prefix(grants::PROVIDER_PREFIX)
    }

    /// Whether the chain had expired at `now` (Unix seconds).
    pub fn expired(&self, now: u64) -> bool {
        now > self.not_after
    }
}

/// Reads the identity from the verified peer certificate: CN = device id
/// (or `provider.{name}` for a service provider), O = service id, and the
/// issuing CA must be that service's CA.
pub fn identity_of(peer: Option<&[CertificateDer<'_>]>) -> Result<CertIdentity, String> {
    let cert = peer.and_then(<[_]>::first).ok_or("no client certificate")?;
    let names = der::names(cert).ok_or("client certificate unreadable")?;
    let cn = names.subject_cn.ok_or("certificate has no CN")?;
    let service_id = names.subject_o.ok_or("certificate has no O")?;
    let provider = cn.strip_prefix(grants::PROVIDER_PREFIX).map(str::to_owned);
    fleet_protocol::topic::validate_device_id(provider.as_deref().unwrap_or(&cn))
        .map_err(|e| e.to_string())?;
    fleet_protocol::topic::validate_service_id(&service_id).map_err(|e| e.to_string())?;
    if names.issuer_o.as_deref() != Some(service_id.as_str()) {
        return Err(format!(
            "certificate for service {service_id} was not issued by that service's CA"
        ));
    }
    // Verified by webpki, so each reads.
    let not_after = peer
        .unwrap_or_default()
        .iter()
        .filter_map(|c| der::validity(c))
        .map(|(_, until)| until)
        .min()
        .unwrap_or(0);
    Ok(CertIdentity {
        cn,
        service_id,
        serial: names.serial,
        not_after,
    })
}

/// What is on disk: file name → modification time, inode and length, to
/// notice changes. The PKI replaces a file by renaming a new one over it,
/// so a file written twice within the file system's clock tick still
/// shows a new inode.
type Fingerprint = BTreeMap<PathBuf, Option<(SystemTime, u64, u64)>>;

fn stamp(meta: std::io::Result<std::fs::Metadata>) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let meta = meta.ok()?;
    Some((meta.modified().ok()?, meta.ino(), meta.len()))
}

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = BTreeMap::new();
    // Every root generation's certificate (`root-ca.pem` among them).
    let roots = fleet_pki::root_cert_files(dir);
    let files = ["broker.pem", "broker.key"].map(|f| dir.join(f));
    for p in files.into_iter().chain(roots) {
        let meta = std::fs::metadata(&p);
        out.insert(p, stamp(meta));
    }
    for sub in ["services", "crl"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "pem") {
                    out.insert(p, stamp(e.metadata()));
                }
            }
        }
    }
    out
}

/// One live session: connection, end, its certificate's issuer
/// ([`der::issuer_key`]) and its cut.
type Live = (u64, u64, [u8; 32], CancellationToken);

/// Live service sessions by certificate serial, and by the second their
/// certificate expires after.
#[derive(Default)]
struct Sessions {
    by_serial: HashMap<String, Vec<Live>>,
    /// (notAfter, connection): a certificate is valid through its
    /// notAfter second, as the verifier reads it.
    by_expiry: BTreeMap<(u64, u64), CancellationToken>,
}

/// A live session registered with [`Trust::register`]; unregistered when dropped.
#[must_use = "the session is unregistered when this is dropped"]
pub struct Registered<'a> {
    trust: &'a Trust,
    serial: String,
    connection: u64,
}

impl Registered<'_> {
    /// Unregisters the session, and tells whether it was cut because its
    /// certificate expired.
    pub fn end(self) -> bool {
        // Unregistered here, and not again by `Drop`.
        let mut this = std::mem::ManuallyDrop::new(self);
        let serial = std::mem::take(&mut this.serial);
        this.trust.unregister(&serial, this.connection)
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.trust.unregister(&self.serial, self.connection);
    }
}

/// Trust state shared by every service-listener connection.
pub struct Trust {
    certs_dir: PathBuf,
    metrics: Arc<Metrics>,
    config: RwLock<Configs>,
    /// The verifier of the current configuration, which tickets are
    /// checked with too.
    verifier: Arc<RwLock<Arc<ClientVerifier>>>,
    /// `None` when session tickets are off.
    tickets: Option<Arc<TicketGate>>,
    revoked: Arc<RwLock<HashSet<String>>>,
    sessions: Mutex<Sessions>,
    seen: Mutex<Fingerprint>,
    rebuild_failing: std::sync::atomic::AtomicBool,
}

impl Trust {
    /// Loads the trust in `certs_dir`; `revoked` is filled with the
    /// revoked serials and kept up to date.
    /// With `tickets`, the listener gives each client a TLS session ticket
    /// to resume with (see [`TicketGate`]).
    pub fn load(
        certs_dir: &Path,
        metrics: Arc<Metrics>,
        revoked: Arc<RwLock<HashSet<String>>>,
        tickets: bool,
        grant_cache: bool,
    ) -> Result<Arc<Trust>, BrokerError> {
        let seen = fingerprint(certs_dir);
        *revoked.write().unwrap_or_else(|p| p.into_inner()) = load_revoked(certs_dir);
        let first = Arc::new(build_verifier(
            certs_dir,
            revoked.clone(),
            metrics.clone(),
            None,
            Arc::new(GrantFiles::new(certs_dir, grant_cache)),
        )?);
        let verifier = Arc::new(RwLock::new(first.clone()));
        let tickets = if tickets {
            let keys = rustls::crypto::aws_lc_rs::Ticketer::new()
                .map_err(|e| BrokerError::Tls(format!("session tickets: {e}")))?;
            Some(Arc::new(TicketGate::new(
                keys,
                verifier.clone(),
                metrics.clone(),
            )))
        } else {
            None
        };
        let config = build_config(certs_dir, first, tickets.clone())?;
        Ok(Arc::new(Trust {
            certs_dir: certs_dir.to_path_buf(),
            metrics,
            config: RwLock::new(config),
            verifier,
            tickets,
            revoked,
            sessions: Mutex::new(Sessions::default()),
            seen: Mutex::new(seen),
            rebuild_failing: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// The TLS configuration for the next handshake.
    pub fn config(&self) -> Configs {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn is_revoked(&self, serial: &str) -> bool {
        self.revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(serial)
    }

    /// Whether a session of `service` whose certificate's issuer is
    /// `issuer` ([`der::issuer_key`]) may go on: its CA is loaded now, or
    /// is in the service's CA files and not loaded yet (a new service's,
    /// taken up at the next look), or not every file in `services/` could
    /// be read (then nothing is concluded).
    pub fn issuer_trusted(&self, service: &str, issuer: &[u8; 32]) -> bool {
        {
            let verifier = self.verifier.read().unwrap_or_else(|p| p.into_inner());
            if !verifier.all_read || verifier.ca_subjects.contains(issuer) {
                return true;
            }
        }
        in_service_ca_files(&self.certs_dir, service, |ca| {
            der::subject_key(ca) == Some(*issuer)
        })
    }

    /// What a connection whose handshake made a ticket for the client
    /// certificate whose SHA-256 is `leaf` calls if the ticket is never
    /// sent, so that it does not count as given; `None` with tickets off.
    pub fn ticket_unsent(&self, leaf: [u8; 32]) -> Option<Box<dyn FnOnce() + Send + Sync>> {
        let gate = self.tickets.clone()?;
        Some(Box::new(move || gate.unsent(&leaf)))
    }

    /// The last second in which the verified path of the client
    /// certificate whose SHA-256 is `leaf` is valid, its anchor included,
    /// if the verifier still holds it: a client that sends only its
    /// certificate presents no CA, whose expiry its session must not
    /// outlive.
    pub fn path_until(&self, leaf: &[u8; 32]) -> Option<u64> {
        let verifier = self.verifier.read().unwrap_or_else(|p| p.into_inner());
        verifier.chains.until(leaf)
    }

    /// Registers a live session, which is cancelled if its certificate is
    /// revoked or expires, or its issuer (`issuer`, [`der::issuer_key`]) is
    /// no longer a CA the broker trusts, until the returned guard is
    /// dropped (however the session's task ends, dropped with it too).
    /// `not_after` is the certificate's, in Unix seconds.
    pub fn register<'a>(
        &'a self,
        serial: &str,
        not_after: u64,
        issuer: [u8; 32],
        connection: u64,
        cut: CancellationToken,
    ) -> Registered<'a> {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.by_expiry.insert((not_after, connection), cut.clone());
        s.by_serial
            .entry(serial.to_owned())
            .or_default()
            .push((connection, not_after, issuer, cut));
        Registered {
            trust: self,
            serial: serial.to_owned(),
            connection,
        }
    }

    /// Whether the session had been cut for its certificate's expiry
    /// (it was registered, and [`Trust::cut_expired`] took it).
    fn unregister(&self, serial: &str, connection: u64) -> bool {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = s.by_serial.get_mut(serial) else {
            return false;
        };
        let Some(at) = list.iter().position(|(c, ..)| *c == connection) else {
            return false;
        };
        let (_, not_after, ..) = list.swap_remove(at);
        if list.is_empty() {
            s.by_serial.remove(serial);
        }
        s.by_expiry.remove(&(not_after, connection)).is_none()
    }

    /// Cuts the live sessions whose certificate expired before `now`
    /// (Unix seconds), and returns how many.
    pub fn cut_expired(&self, now: u64) -> usize {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut cut = 0;
        while let Some(entry) = s.by_expiry.first_entry() {
            let (not_after, connection) = *entry.key();
            if now <= not_after {
                break;
            }
            info!(
                connection,
                not_after, "certificate expired: closing its live session"
            );
            // Counted before the session can see its cut.
            self.metrics.expired_cuts.fetch_add(1, Ordering::Relaxed);
            entry.remove().cancel();
            cut += 1;
        }
        cut
    }

    /// Rebuilds the context if anything under `certs/` changed, and returns
    /// the live sessions to be cut: those of revoked certificates, and of
    /// certificates whose CA the broker no longer trusts (retired, its key
    /// stolen: a certificate the thief made is on no CRL).
    pub fn reload_if_changed(&self) -> Vec<CancellationToken> {
        self.verifier
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .grants
            .check_dir();
        let now = fingerprint(&self.certs_dir);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return Vec::new();
            }
            *seen = now;
        }
        let revoked = load_revoked(&self.certs_dir);
        *self.revoked.write().unwrap_or_else(|p| p.into_inner()) = revoked.clone();
        let (previous, grants) = {
            let current = self.verifier.read().unwrap_or_else(|p| p.into_inner());
            (current.chains.clone(), current.grants.clone())
        };
        let rebuilt = build_verifier(
            &self.certs_dir,
            self.revoked.clone(),
            self.metrics.clone(),
            Some(previous),
            grants,
        )
        .map(Arc::new)
        .and_then(|v| {
            Ok((
                v.clone(),
                build_config(&self.certs_dir, v, self.tickets.clone())?,
            ))
        });
        let mut trusted = None;
        match rebuilt {
            Ok((verifier, config)) => {
                trusted = verifier.all_read.then(|| verifier.ca_subjects.clone());
                if !verifier.all_read {
                    // Read again at the next look, not only when another
                    // file changes.
                    self.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
                }
                *self.verifier.write().unwrap_or_else(|p| p.into_inner()) = verifier;
                *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
                if self.rebuild_failing.swap(false, Ordering::Relaxed) {
                    info!("service TLS context rebuilt");
                }
            }
            Err(err) => {
                // Tried again at the next look, not only when another file
                // changes; reported once.
                self.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
                if !self.rebuild_failing.swap(true, Ordering::Relaxed) {
                    warn!(error = %err, "service TLS context not rebuilt; keeping the previous one until it can be")
                }
            }
        }
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut cuts = Vec::new();
        for (serial, list) in &sessions.by_serial {
            for (connection, _, issuer, cut) in list {
                if revoked.contains(serial) {
                    info!(
                        serial,
                        connection, "certificate revoked: closing its live session"
                    );
                } else if trusted.as_ref().is_some_and(|t| !t.contains(issuer)) {
                    warn!(
                        serial,
                        connection, "certificate's CA no longer trusted: closing its live session"
                    );
                } else {
                    continue;
                }
                cuts.push(cut.clone());
            }
        }
        if !self.rebuild_failing.load(Ordering::Relaxed) {
            let serials = revoked.iter().filter(|r| !r.contains(':')).count();
            info!(revoked = serials, "service trust reloaded");
        }
        cuts
    }

    /// Watches `certs/` until `stop` is cancelled.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        every_look(stop, || async {
            self.cut_expired(UnixTime::now().as_secs());
            let me = self.clone();
            if let Ok(cuts) = tokio::task::spawn_blocking(move || me.reload_if_changed()).await {
                if !cuts.is_empty() {
                    tokio::spawn(async move {
                        tokio::time::sleep(CUT_GRACE).await;
                        cuts.iter().for_each(CancellationToken::cancel);
                    });
                }
            }
        })
        .await
    }
}

/// Runs `look` every [`RELOAD_EVERY`] until `stop` is cancelled.
async fn every_look<F: std::future::Future<Output = ()>>(
    stop: CancellationToken,
    mut look: impl FnMut() -> F,
) {
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        look().await;
    }
}

/// Whether a certificate in one of `service`'s CA files in
/// `certs_dir/services/` (newest first) is one `wanted` takes.
fn in_service_ca_files(
    certs_dir: &Path,
    service: &str,
    wanted: impl Fn(&CertificateDer<'_>) -> bool,
) -> bool {
    if fleet_protocol::topic::validate_service_id(service).is_err() {
        return false;
    }
    fleet_pki::service_ca_cert_files(certs_dir, service)
        .iter()
        .rev()
        .any(|path| {
            CertificateDer::pem_file_iter(path)
                .is_ok_and(|mut certs| certs.any(|c| c.is_ok_and(|c| wanted(&c))))
        })
}

/// Every serial the CRLs in `certs/crl/` list, and each also as
/// [`issued_revoked`] spells it with its CRL's issuer.
fn load_revoked(certs_dir: &Path) -> HashSet<String> {
    let mut out = HashSet::new();
    let Ok(entries) = std::fs::read_dir(certs_dir.join("crl")) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        // Only CRLs: not the PKI's temporary files (`.NAME.tmp.PID.N`),
        // read half-written while it replaces a CRL.
        let hidden = e.file_name().to_string_lossy().starts_with('.');
        if hidden || !path.extension().is_some_and(|x| x == "pem") {
            continue;
        }
        let parsed = std::fs::read(&path)
            .ok()
            .and_then(|pem| X509Crl::from_pem(&pem).ok());
        let Some(crl) = parsed else {
            warn!(path = %path.display(), "CRL unreadable; ignored");
            continue;
        };
        let issuer = crl
            .issuer_name()
            .to_der()
            .ok()
            .and_then(|name| der::name_key(&name));
        for r in crl.get_revoked().into_iter().flatten() {
            let serial = hex_serial(r.serial_number());
            if let Some(issuer) = &issuer {
                out.insert(issued_revoked(issuer, &serial));
            }
            out.insert(serial);
        }
    }
    out
}

/// A revoked serial with its issuer ([`der::name_key`]), as the revoked
/// set holds it beside the bare serial (which has no `:`).
fn issued_revoked(issuer: &[u8; 32], serial: &str) -> String {
    use std::fmt::Write as _;
    let mut key = String::with_capacity(65 + serial.len());
    for byte in issuer {
        let _ = write!(key, "{byte:02x}");
    }
    key.push(':');
    key.push_str(serial);
    key
}

/// The rustls provider every listener uses: aws-lc-rs, whose P-256 and
/// X25519 are the ones the rest of the process already links, with its
/// SHA-256 suites ahead of its SHA-384 ones. The key exchange and the
/// certificates (P-256, X25519) give 128-bit security whichever suite is
/// chosen, and SHA-256 runs on this CPU's SHA extensions, where SHA-384
/// (the transcript hash and key schedule of AES-256-GCM-SHA384) is done in
/// software: about 9 % of the broker's CPU per handshake. Every suite of
/// aws-lc-rs is still accepted; see [`Configs`] for whose order counts.
fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        matches!(
            suite.suite(),
            CipherSuite::TLS13_AES_256_GCM_SHA384
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384
                | CipherSuite::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384
        )
    });
    Arc::new(provider)
}

/// A TLS client that checks servers against the CA certificates in
/// `root_pem` (PEM) and shows no certificate of its own: the operator
/// API's client, and tests that look at what a listener serves.
pub fn client_trusting(root_pem: &[u8]) -> Result<rustls::ClientConfig, BrokerError> {
    let tls = |e: &dyn std::fmt::Display| BrokerError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(root_pem) {
        roots.add(cert.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

/// The broker certificate chain and key from `certs/`.
fn broker_identity(
    certs_dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), BrokerError> {
    identity(certs_dir, fleet_pki::BROKER_FILES)
}

/// A certificate chain and its key from `certs/`: `files` names them.
fn identity(
    certs_dir: &Path,
    files: (&str, &str),
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), BrokerError> {
    let cert = certs_dir.join(files.0);
    let key = certs_dir.join(files.1);
    for p in [&cert, &key] {
        if !p.exists() {
            return Err(BrokerError::MissingFile(p.display().to_string()));
        }
    }
    let chain = CertificateDer::pem_file_iter(&cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", cert.display())))?;
    let key = PrivateKeyDer::from_pem_file(&key)
        .map_err(|e| BrokerError::Tls(format!("{}: {e}", key.display())))?;
    Ok((chain, key))
}

/// A listener's TLS configuration, in two orders of cipher suites and the
/// same in all else. Most TLS stacks put AES-256-GCM-SHA384 first, whose
/// SHA-384 costs the broker more than SHA-256 (see `provider`), so the
/// broker chooses in its own order (AES-128-GCM-SHA256 first) unless the
/// client puts ChaCha20-Poly1305 first: a device does that when it has no
/// AES instructions, and AES in software would be slow for it and, in
/// most implementations, not constant-time. That device gets the suite
/// it prefers.
#[derive(Clone)]
pub struct Configs {
    ours: Arc<ServerConfig>,
    theirs: Arc<ServerConfig>,
}

impl Configs {
    /// The configuration for a ClientHello that offers `suites`, most
    /// preferred first.
    pub fn for_client(&self, suites: &[CipherSuite]) -> Arc<ServerConfig> {
        let ours = &self.ours.crypto_provider().cipher_suites;
        let first = suites
            .iter()
            .find(|s| ours.iter().any(|o| o.suite() == **s));
        match first {
            Some(
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
                | CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
                | CipherSuite::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
            ) => self.theirs.clone(),
            _ => self.ours.clone(),
        }
    }
}

/// What every listener's configuration has in common:
/// - the cipher suite order of [`Configs`];
/// - resumption only through `tickets`, never from server-side state: the
///   session-id cache of TLS 1.2 and stateful TLS 1.3 tickets would resume
///   without the checks [`TicketGate`] makes. Without `tickets`, no session
///   is resumed and every connection shows its certificate.
fn finish(mut config: ServerConfig, tickets: Option<Arc<TicketGate>>) -> Configs {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    match tickets {
        Some(gate) => {
            config.ticketer = gate;
            // One per connection: a TLS 1.3 ticket is used once, and a
            // resumed connection is given the next.
            config.send_tls13_tickets = 1;
        }
        None => config.send_tls13_tickets = 0,
    }
    config.ignore_client_order = true;
    let ours = Arc::new(config.clone());
    config.ignore_client_order = false;
    Configs {
        ours,
        theirs: Arc::new(config),
    }
}

/// The service listener's session tickets (RFC 5077 construction, keys
/// rotated every 6 hours), and the gate on resuming one. A ticket holds
/// the client's certificate chain; it is taken only if it is at most
/// [`ProducesTickets::lifetime`] (12 hours) old and that chain passes,
/// now, every check a full handshake makes: the chain under the CAs
/// loaded now (a retired CA's leaves fail), the validity of every
/// certificate on the path, revocation and the registry's grant. A ticket
/// that fails is ignored, not refused: the client must then show its
/// certificate, and gets the same alert as without a ticket. A ticket
/// that failed once is not checked again (a ClientHello may offer the same
/// one many times over).
///
/// A certificate whose last [`UNUSED_TICKETS_MAX`] tickets went unused
/// (it made a full handshake each time since) is given a ticket at one
/// connect in [`TICKET_PROBE_EVERY`] only, until it resumes again. Many
/// TLS clients (OpenSSL's without a session cache among them) ask for
/// tickets and never use one; each costs the broker about 0.01 ms of CPU
/// and the device some 1.3 KB of downlink at every connect. A client that
/// does resume gets one at every connect.
#[derive(Debug)]
pub struct TicketGate {
    keys: Arc<dyn ProducesTickets>,
    verifier: Arc<RwLock<Arc<ClientVerifier>>>,
    metrics: Arc<Metrics>,
    /// SHA-256 of each ticket that failed, up to [`REFUSED_TICKETS_MAX`].
    refused: Mutex<HashSet<[u8; 32]>>,
    /// By SHA-256 of the leaf certificate, up to [`TICKET_USES_MAX`].
    uses: Mutex<HashMap<[u8; 32], TicketUses>>,
}

/// At most this many failed tickets are remembered; past it, all are
/// forgotten.
const REFUSED_TICKETS_MAX: usize = 10_000;

/// Tickets in a row a certificate may leave unused before it is given
/// fewer.
const UNUSED_TICKETS_MAX: u8 = 2;

/// A certificate that leaves its tickets unused is given one at this many
/// connects, in case its client has started to resume.
const TICKET_PROBE_EVERY: u8 = 16;

/// At most this many certificates' ticket use is remembered; past it, all
/// is forgotten (every certificate is given tickets again).
const TICKET_USES_MAX: usize = 100_000;

/// One certificate's tickets since it last resumed.
#[derive(Debug, Default)]
struct TicketUses {
    /// Tickets given since its last resumption.
    given: u8,
    /// Tickets withheld since then.
    withheld: u8,
}

impl TicketGate {
    fn new(
        keys: Arc<dyn ProducesTickets>,
        verifier: Arc<RwLock<Arc<ClientVerifier>>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        TicketGate {
            keys,
            verifier,
            metrics,
            refused: Mutex::new(HashSet::new()),
            uses: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the connection whose session is `plain` is given a ticket;
    /// counts it either way.
    fn wanted(&self, plain: &[u8]) -> bool {
        let Some(leaf) = leaf_of(plain) else {
            return true;
        };
        let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        if uses.len() >= TICKET_USES_MAX && !uses.contains_key(&leaf) {
            uses.clear();
        }
        let u = uses.entry(leaf).or_default();
        if u.given < UNUSED_TICKETS_MAX {
            u.given += 1;
            return true;
        }
        u.withheld = u.withheld.wrapping_add(1);
        let probe = u.withheld % TICKET_PROBE_EVERY == 0;
        // Counted like any other, so that [`TicketGate::unsent`] takes back
        // what was counted, a probe never sent included.
        if probe {
            u.given = u.given.saturating_add(1);
        }
        probe
    }

    /// A ticket made for the certificate whose SHA-256 is `leaf` was never
    /// sent (its connection ended before the CONNACK): it is not counted
    /// as given.
    fn unsent(&self, leaf: &[u8; 32]) {
        self.metrics.tickets_unsent.fetch_add(1, Ordering::Relaxed);
        let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = uses.get_mut(leaf) {
            u.given = u.given.saturating_sub(1);
        }
    }

    /// The certificate of the session `plain` is resuming with a ticket.
    /// Counted when the ticket is taken, before the handshake ends: the
    /// resumed connection's own new ticket is made before that. So whoever
    /// replays a ticket's bytes (they travel in clear) can reset its
    /// certificate's count, which only makes the broker give that
    /// certificate tickets again.
    fn used(&self, plain: &[u8]) {
        if let Some(leaf) = leaf_of(plain) {
            let mut uses = self.uses.lock().unwrap_or_else(|p| p.into_inner());
            uses.remove(&leaf);
        }
    }

    /// Whether the ticket `plain` (decrypted from `cipher`) may resume now.
    fn admits(&self, cipher: &[u8], plain: &[u8]) -> Result<(), String> {
        let digest = sha256(cipher);
        let mut refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if refused.contains(&digest) {
            return Err("refused before".into());
        }
        drop(refused);
        let result = self.check(plain);
        if let Err((_, true)) = result {
            refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
            if refused.len() >= REFUSED_TICKETS_MAX {
                refused.clear();
            }
            refused.insert(digest);
        }
        result.map_err(|(why, _)| why)
    }

    /// Whether the ticket `plain` passes every check now; if not, why, and
    /// whether for good (not if the checks could not be made: a grant file
    /// that could not be read).
    fn check(&self, plain: &[u8]) -> Result<(), (String, bool)> {
        let refused = |why: &str| (why.to_string(), true);
        let ticket = read_ticket(plain).ok_or(refused("not a ticket this broker writes"))?;
        let now = UnixTime::now();
        let age = now.as_secs().checked_sub(ticket.created);
        if !age.is_some_and(|age| age <= u64::from(self.keys.lifetime())) {
            return Err(refused(&format!(
                "issued at {}, too old or in the future",
                ticket.created
            )));
        }
        let (leaf, presented) = ticket
            .chain
            .split_first()
            .ok_or(refused("no certificate"))?;
        let verifier = self
            .verifier
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        verifier
            .check(leaf, presented, now)
            .map_err(|e| (e.to_string(), !matches!(e, rustls::Error::General(_))))
    }
}

impl ProducesTickets for TicketGate {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.keys.lifetime()
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        if !self.wanted(plain) {
            self.metrics
                .tickets_withheld
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.keys.encrypt(plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let plain = self.keys.decrypt(cipher)?;
        match self.admits(cipher, &plain) {
            Ok(()) => {
                self.used(&plain);
                Some(plain)
            }
            Err(why) => {
                debug!(reason = %why, "session ticket not taken");
                None
            }
        }
    }
}

/// SHA-256 of the leaf certificate of the session `plain` (a decrypted
/// ticket), by which [`TicketGate`] counts a certificate's tickets.
fn leaf_of(plain: &[u8]) -> Option<[u8; 32]> {
    let ticket = read_ticket(plain)?;
    ticket.chain.first().map(|leaf| sha256(leaf))
}

/// What the gate reads from a decrypted ticket.
#[derive(Debug)]
struct Ticket<'a> {
    chain: Vec<CertificateDer<'a>>,
    /// Unix seconds.
    created: u64,
}

/// Reads a decrypted ticket, which is rustls 0.23.46's `ServerSessionValue`
/// encoding (`msgs/persist.rs`; the workspace pins that version): SNI (a
/// flag, then a u8-length name), version (u16), cipher suite (u16), master
/// secret (u8 length), extended master secret (u8), a flag and the client
/// chain (u24 length; each certificate u24 length and DER), a flag and the
/// ALPN protocol (u8 length), application data (u16 length), creation time
/// (u64 seconds) and the age offset (u32), and nothing after. Anything else
/// is `None`, and the ticket is not taken.
fn read_ticket(plain: &[u8]) -> Option<Ticket<'_>> {
    fn take<'a>(input: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        let (head, rest) = (input.len() >= n).then(|| input.split_at(n))?;
        *input = rest;
        Some(head)
    }
    fn number(input: &mut &[u8], width: usize) -> Option<u64> {
        let bytes = take(input, width)?;
        Some(bytes.iter().fold(0, |acc, &b| acc << 8 | u64::from(b)))
    }
    fn length(input: &mut &[u8], width: usize) -> Option<usize> {
        number(input, width).and_then(|n| usize::try_from(n).ok())
    }
    let mut r = plain;
    if number(&mut r, 1)? == 1 {
        let len = length(&mut r, 1)?;
        take(&mut r, len)?;
    }
    take(&mut r, 4)?;
    let secret = length(&mut r, 1)?;
    take(&mut r, secret + 1)?;
    if number(&mut r, 1)? != 1 {
        return None;
    }
    let len = length(&mut r, 3)?;
    let mut list = take(&mut r, len)?;
    let mut chain = Vec::new();
    while !list.is_empty() {
        let len = length(&mut list, 3)?;
        chain.push(CertificateDer::from(take(&mut list, len)?));
    }
    if number(&mut r, 1)? == 1 {
        let len = length(&mut r, 1)?;
        take(&mut r, len)?;
    }
    let data = length(&mut r, 2)?;
    take(&mut r, data)?;
    let created = number(&mut r, 8)?;
    take(&mut r, 4)?;
    r.is_empty().then_some(Ticket { chain, created })
}

/// A server-authenticated TLS configuration with the certificate and key
/// `files` name in `certs_dir`, TLS 1.2 or 1.3, no client certificate, as
/// the files are now.
fn server_config(certs_dir: &Path, files: (&str, &str)) -> Result<Configs, BrokerError> {
    let tls = |e: rustls::Error| BrokerError::Tls(e.to_string());
    let (chain, key) = identity(certs_dir, files)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls)?;
    Ok(finish(config, None))
}

/// A server-authenticated TLS listener's configuration ([`server_config`]):
/// the bootstrap listener's, with the broker's certificate, and the
/// operator API's, with its own. Built again when the certificate or key
/// changes on disk, as the service listener's [`Trust`] is: the PKI issues
/// a server certificate again when its names change and renews it at half
/// its validity. A pair that does not load (read between the writes of a
/// new key and its certificate) leaves the previous configuration in use
/// until the next look.
pub struct ServerTls {
    certs_dir: PathBuf,
    files: (&'static str, &'static str),
    /// Whose configuration, for the log.
    label: &'static str,
    config: RwLock<Configs>,
    seen: Mutex<Fingerprint>,
    failing: std::sync::atomic::AtomicBool,
}

impl ServerTls {
    /// With the certificate and key `files` name in `certs_dir`.
    pub fn load(
        certs_dir: &Path,
        files: (&'static str, &'static str),
        label: &'static str,
    ) -> Result<Arc<ServerTls>, BrokerError> {
        let seen = identity_fingerprint(certs_dir, files);
        Ok(Arc::new(ServerTls {
            certs_dir: certs_dir.to_path_buf(),
            files,
            label,
            config: RwLock::new(server_config(certs_dir, files)?),
            seen: Mutex::new(seen),
            failing: Default::default(),
        }))
    }

    /// The configuration for the next handshake.
    pub fn config(&self) -> Configs {
        self.config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Rebuilds the configuration if its certificate or key changed on
    /// disk.
    pub fn reload_if_changed(&self) {
        let now = identity_fingerprint(&self.certs_dir, self.files);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                return;
            }
            *seen = now;
        }
        let label = self.label;
        match server_config(&self.certs_dir, self.files) {
            Ok(config) => {
                *self.config.write().unwrap_or_else(|p| p.into_inner()) = config;
                self.failing.store(false, Ordering::Relaxed);
                info!(
                    certificate = self.files.0,
                    "{label} TLS context rebuilt: its certificate changed"
                );
            }
            Err(err) => {
                self.seen.lock().unwrap_or_else(|p| p.into_inner()).clear();
                if !self.failing.swap(true, Ordering::Relaxed) {
                    warn!(error = %err, "{label} TLS context not rebuilt; keeping the previous one until it can be");
                }
            }
        }
    }

    /// Watches the certificate and key until `stop` is cancelled.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        every_look(stop, || async {
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload_if_changed()).await;
        })
        .await
    }
}

/// The [`Fingerprint`] of a certificate and key.
fn identity_fingerprint(dir: &Path, files: (&str, &str)) -> Fingerprint {
    [files.0, files.1]
        .into_iter()
        .map(|file| {
            let p = dir.join(file);
            let stamp = stamp(std::fs::metadata(&p));
            (p, stamp)
        })
        .collect()
}

/// Whether `root` issued `ca`: names match and the signature verifies.
fn issued_by(ca: &X509Ref, root: &X509Ref) -> bool {
    root.issued(ca) == X509VerifyResult::OK
        && root
            .public_key()
            .and_then(|key| ca.verify(&key))
            .unwrap_or(false)
}

/// A certificate's validity as Unix seconds.
fn validity(cert: &X509Ref) -> Result<(i64, i64), openssl::error::ErrorStack> {
    let epoch = Asn1Time::from_unix(0)?;
    let secs = |t: &openssl::asn1::Asn1TimeRef| {
        epoch
            .diff(t)
            .map(|d| i64::from(d.days) * 86_400 + i64::from(d.secs))
    };
    Ok((secs(cert.not_before())?, secs(cert.not_after())?))
}

/// Checks a service-listener client: its chain (webpki), then what the
/// fleet adds: the anchor still valid, O issued by that service's own CA,
/// not revoked, and granted by the registry.
#[derive(Debug)]
pub struct ClientVerifier {
    algorithms: WebPkiSupportedAlgorithms,
    anchors: Vec<TrustAnchor<'static>>,
    /// Certificates a chain may pass through to reach an anchor.
    intermediates: Vec<CertificateDer<'static>>,
    /// Each anchor by [`anchor_key`]: its validity, which webpki does not
    /// check, and whether it is the root.
    anchor_info: HashMap<Vec<u8>, AnchorInfo>,
    /// Every service CA loaded from `services/`: DER → validity (Unix
    /// seconds).
    service_cas: HashMap<Vec<u8>, (u64, u64)>,
    /// The subject of every service CA loaded ([`der::subject_key`]): the
    /// issuers a live session's certificate may have.
    ca_subjects: HashSet<[u8; 32]>,
    /// Whether every file in `services/` could be read: only then does a
    /// CA missing from `ca_subjects` mean it is no longer trusted.
    all_read: bool,
    chains: Arc<Chains>,
    revoked: Arc<RwLock<HashSet<String>>>,
    metrics: Arc<Metrics>,
    certs_dir: PathBuf,
    grants: Arc<GrantFiles>,
}

/// At most this many leaves are remembered; past it, all are forgotten.
const CHAINS_MAX: usize = 200_000;

/// Leaf certificates whose chain webpki verified under the CAs loaded now,
/// by SHA-256 of the leaf's DER, each with the window in which every
/// certificate of its path (leaf, service CA, anchor) is valid. A device
/// that reconnects within the window skips the chain's signature checks;
/// its identity, revocation and grant are still checked at every
/// handshake. Only verified chains are entered, so only holders of a
/// fleet certificate can fill it; it is replaced by an empty one whenever
/// the set of CAs changes (a CA added, replaced or removed).
#[derive(Debug)]
pub struct Chains {
    /// SHA-256 over the DER of the root and every loaded service CA.
    cas: [u8; 32],
    verified: Mutex<HashMap<[u8; 32], (u64, u64)>>,
}

impl Chains {
    fn holds(&self, leaf: &[u8; 32], now: u64) -> bool {
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(leaf)
            .is_some_and(|(from, until)| *from <= now && now <= *until)
    }

    /// The end of the window in which `leaf`'s verified path is valid.
    fn until(&self, leaf: &[u8; 32]) -> Option<u64> {
        let verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        verified.get(leaf).map(|(_, until)| *until)
    }

    fn insert(&self, leaf: [u8; 32], window: (u64, u64)) {
        let mut verified = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        if verified.len() >= CHAINS_MAX {
            verified.clear();
        }
        verified.insert(leaf, window);
    }
}

/// The later start and the earlier end of two validity windows.
fn within(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0.max(b.0), a.1.min(b.1))
}

#[derive(Debug, Clone, Copy)]
struct AnchorInfo {
    /// Unix seconds.
    not_before: u64,
    not_after: u64,
    root: bool,
}

/// An anchor's subject and key, as one lookup key.
fn anchor_key(anchor: &TrustAnchor<'_>) -> Vec<u8> {
    let (subject, spki) = (
        anchor.subject.as_ref(),
        anchor.subject_public_key_info.as_ref(),
    );
    let mut key = Vec::with_capacity(4 + subject.len() + spki.len());
    key.extend_from_slice(&(subject.len() as u32).to_be_bytes());
    key.extend_from_slice(subject);
    key.extend_from_slice(spki);
    key
}

/// Certificates a client may send after its leaf: its service CA, and
/// the root (which some TLS stacks send too).
const MAX_PRESENTED: usize = 2;

fn refuse(error: CertificateError) -> rustls::Error {
    rustls::Error::InvalidCertificate(error)
}

fn pki_error(error: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    refuse(match error {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        // A chain signature no known CA made: an unknown issuer, as
        // `topics.md` §2.3 says (`unknown_ca`, 48; rustls would send
        // `decrypt_error`, 51, which reads as a failed handshake).
        E::InvalidSignatureForPublicKey => CertificateError::UnknownIssuer,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

impl ClientVerifier {
    /// Every check of a handshake, quietly: for a session ticket, whose
    /// failure is followed by a full handshake that reports it.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        presented: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        self.verify(end_entity, presented, now, false)
    }

    /// The chain, from [`Chains`] when this leaf's chain verified under
    /// the CAs loaded now and `now` is within its window.
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        presented: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        // Checked before any signature: a fleet chain has at most the
        // service CA and the root after its leaf, and each certificate
        // more is a signature to try that the client never had to make.
        if presented.len() > MAX_PRESENTED {
            return Err(pki_error(webpki::Error::PathLenConstraintViolated));
        }
        let leaf = sha256(end_entity);
        if self.chains.holds(&leaf, now.as_secs()) {
            self.metrics.chains_recalled.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        // The service CAs join what the client sent only when they are not
        // anchors; usually nothing is copied.
        let joined: Vec<CertificateDer<'_>>;
        let intermediates = if self.intermediates.is_empty() {
            presented
        } else {
            joined = presented
                .iter()
                .cloned()
                .chain(
                    self.intermediates
                        .iter()
                        .map(|c| CertificateDer::from(c.as_ref())),
                )
                .collect();
            &joined
        };
        // The only shapes a fleet chain has: device → service CA (an
        // anchor), or device → service CA → root. webpki checks neither an
        // anchor's validity nor its path length, so both are checked here;
        // a path that fails is not taken, and webpki tries the next one.
        // The window in which the accepted path is valid, if it is one to
        // remember (not one through a CA not yet loaded).
        let window = Cell::new(None);
        let shape = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
            let info = self
                .anchor_info
                .get(&anchor_key(path.anchor()))
                .ok_or(webpki::Error::UnknownIssuer)?;
            let hops = path.intermediate_certificates().count();
            if hops != usize::from(info.root) {
                return Err(webpki::Error::PathLenConstraintViolated);
            }
            let mut valid = Some((info.not_before, info.not_after));
            // Through the root, only a service CA the fleet has now: not
            // one retired (replaced in `services/`), whose leaves the new
            // CA's CRL no longer lists.
            if let Some(ca) = path.intermediate_certificates().next() {
                let ca = ca.der();
                match self.service_cas.get(ca.as_ref()) {
                    Some(ca_valid) => valid = valid.map(|v| within(v, *ca_valid)),
                    None if self.service_ca_on_disk(&ca) => valid = None,
                    None => return Err(webpki::Error::UnknownIssuer),
                }
            }
            if now.as_secs() < info.not_before {
                return Err(webpki::Error::CertNotValidYet {
                    time: now,
                    not_before: UnixTime::since_unix_epoch(Duration::from_secs(info.not_before)),
                });
            }
            if now.as_secs() > info.not_after {
                return Err(webpki::Error::CertExpired {
                    time: now,
                    not_after: UnixTime::since_unix_epoch(Duration::from_secs(info.not_after)),
                });
            }
            window.set(valid);
            Ok(())
        };
        cert.verify_for_usage(
            self.algorithms.all,
            &self.anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            Some(&shape),
        )
        .map_err(pki_error)?;
        if let (Some(path), Some(own)) = (window.get(), der::validity(end_entity)) {
            self.chains.insert(leaf, within(path, own));
        }
        Ok(())
    }

    /// Every check of a handshake; with `report`, a refusal by the
    /// registry is logged and counted.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        presented: &[CertificateDer<'_>],
        now: UnixTime,
        report: bool,
    ) -> Result<(), rustls::Error> {
        // Revoked is said first, before the chain: a certificate whose CA
        // was retired before its end (a stolen key) is listed revoked, and
        // its device, told so rather than `unknown_ca`, asks for another
        // (topics.md §10.1 step 7). The lists come from the manager's own
        // CRLs; serials are 128-bit random, so one names one certificate.
        let names = der::names(end_entity);
        let issuer = der::issuer_key(end_entity);
        // Only for the issuer the CRL names: not an oracle on serials.
        let revoked = |(names, issuer): (&der::CertNames, &[u8; 32])| {
            self.revoked
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&issued_revoked(issuer, &names.serial))
        };
        if names.as_ref().zip(issuer.as_ref()).is_some_and(revoked) {
            return Err(refuse(CertificateError::Revoked));
        }
        self.verify_chain(end_entity, presented, now)?;
        // The device certificate: issued by the CA of the service it names
        // (a service CA cannot mint another service's devices), not
        // revoked, and granted that service by the registry.
        let names = names.ok_or(refuse(CertificateError::BadEncoding))?;
        let Some(service) = names
            .subject_o
            .filter(|o| Some(o) == names.issuer_o.as_ref())
        else {
            return Err(refuse(CertificateError::ApplicationVerificationFailure));
        };
        // Verified: its serial on any CRL is enough, whatever the CRL's
        // issuer is spelled as.
        if self
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&names.serial)
        {
            return Err(refuse(CertificateError::Revoked));
        }
        let device = names.subject_cn.unwrap_or_default();
        match self.grants.is_granted(&device, &service) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            // Not the device's fault: `handshake_failure` (40), which a
            // device retries, where `access_denied` would have it renew a
            // certificate that is fine (topics.md §2.3).
            Err(why) => {
                if report {
                    error!(device, service, error = %why, "certificate not checked: its grant file cannot be read");
                }
                return Err(rustls::Error::General(format!(
                    "grant file unreadable: {why}"
                )));
            }
        }
        if report {
            self.metrics.not_granted.fetch_add(1, Ordering::Relaxed);
            warn!(
                device,
                service, "certificate refused: the registry grants this device no such service"
            );
        }
        Err(refuse(CertificateError::ApplicationVerificationFailure))
    }

    /// Whether `ca` is in one of its service's CA files now: one created
    /// (a new service, or a successor of its CA) since the last reload
    /// (the watcher looks every [`RELOAD_EVERY`]).
    fn service_ca_on_disk(&self, ca: &CertificateDer<'_>) -> bool {
        let Some(service) = der::names(ca).and_then(|n| n.subject_o) else {
            return false;
        };
        in_service_ca_files(&self.certs_dir, &service, |c| c.as_ref() == ca.as_ref())
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verify(end_entity, intermediates, now, true)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The verifier for the CAs in `certs_dir`; it keeps `previous`'s
/// [`Chains`] if the CAs are the same.
fn build_verifier(
    certs_dir: &Path,
    revoked: Arc<RwLock<HashSet<String>>>,
    metrics: Arc<Metrics>,
    previous: Option<Arc<Chains>>,
    grants: Arc<GrantFiles>,
) -> Result<ClientVerifier, BrokerError> {
    let ssl = |e: openssl::error::ErrorStack| BrokerError::Tls(e.to_string());
    let read = |p: PathBuf| {
        std::fs::read(&p).map_err(|_| BrokerError::MissingFile(p.display().to_string()))
    };
    // Every root generation: the first one must be there; a successor
    // that does not read is left out (its service CAs with it).
    let mut roots = vec![X509::from_pem(&read(certs_dir.join("root-ca.pem"))?).map_err(ssl)?];
    for p in fleet_pki::root_cert_files(certs_dir).into_iter().skip(1) {
        match std::fs::read(&p)
            .ok()
            .and_then(|pem| X509::from_pem(&pem).ok())
        {
            Some(root) => roots.push(root),
            None => warn!(path = %p.display(), "root CA unreadable; ignored"),
        }
    }
    let mut root_ders = Vec::new();
    for root in &roots {
        root_ders.push(root.to_der().map_err(ssl)?);
    }
    // Service CAs, each checked against its root here, once.
    let mut service_cas = Vec::new();
    // Whether every file in `services/` was read: a CA missing for a
    // failed read (no file descriptor left, say) is not a CA retired.
    let mut all_read = true;
    let entries = std::fs::read_dir(certs_dir.join("services"));
    all_read &= entries.is_ok();
    if let Ok(entries) = entries {
        for e in entries {
            let Ok(e) = e else {
                all_read = false;
                continue;
            };
            let p = e.path();
            if p.extension().is_some_and(|x| x == "pem") {
                match std::fs::read(&p)
                    .ok()
                    .and_then(|pem| X509::from_pem(&pem).ok())
                {
                    Some(ca) => match roots.iter().position(|root| issued_by(&ca, root)) {
                        Some(i) if ca.to_der().ok().as_ref() != Some(&root_ders[i]) => {
                            service_cas.push((ca, i))
                        }
                        _ => {
                            warn!(path = %p.display(), "service CA not issued by a fleet root; ignored")
                        }
                    },
                    None => {
                        all_read = false;
                        warn!(path = %p.display(), "service CA unreadable; ignored")
                    }
                }
            }
        }
    }
    let mut root_validity = Vec::new();
    for root in &roots {
        root_validity.push(validity(root).map_err(ssl)?);
    }
    let mut cas = Vec::new();
    for (ca, root) in &service_cas {
        cas.push((ca.to_der().map_err(ssl)?, validity(ca).map_err(ssl)?, *root));
    }
    cas.sort();
    let mut digest = openssl::sha::Sha256::new();
    for der in root_ders.iter().chain(cas.iter().map(|(der, _, _)| der)) {
        digest.update(&(der.len() as u64).to_be_bytes());
        digest.update(der);
    }
    let digest = digest.finish();
    let chains = match previous {
        Some(chains) if chains.cas == digest => chains,
        _ => Arc::new(Chains {
            cas: digest,
            verified: Mutex::new(HashMap::new()),
        }),
    };
    let secs = |(from, until): (i64, i64)| {
        (
            u64::try_from(from).unwrap_or(0),
            u64::try_from(until).unwrap_or(0),
        )
    };
    // The roots are always anchors (a client may present its service CA).
    // A client's chain may also end at its service CA, already checked
    // against its root above: one signature check less per handshake. Only
    // while no service CA outlives its root, so that the service CA's
    // validity, still checked on every handshake, implies the root's.
    // Otherwise the service CAs are intermediates on the way to the roots.
    let within_root = cas.iter().all(|(_, (from, until), root)| {
        let (root_from, root_until) = root_validity[*root];
        *from >= root_from && *until <= root_until
    });
    let loaded: HashMap<Vec<u8>, (u64, u64)> = cas
        .iter()
        .map(|(der, window, _)| (der.clone(), secs(*window)))
        .collect();
    let mut anchor_certs: Vec<_> = root_ders
        .into_iter()
        .zip(root_validity)
        .map(|(der, window)| (der, window, true))
        .collect();
    let mut intermediates = Vec::new();
    for (der, window, _) in cas {
        if within_root {
            anchor_certs.push((der, window, false));
        } else {
            intermediates.push(CertificateDer::from(der));
        }
    }
    let mut anchors = Vec::new();
    let mut anchor_info = HashMap::new();
    for (der, (from, until), root) in anchor_certs {
        let der = CertificateDer::from(der);
        let anchor = webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| BrokerError::Tls(format!("trust anchor: {e}")))?
            .to_owned();
        let (not_before, not_after) = secs((from, until));
        let info = AnchorInfo {
            not_before,
            not_after,
            root,
        };
        anchor_info.insert(anchor_key(&anchor), info);
        anchors.push(anchor);
    }
    let ca_subjects = loaded
        .keys()
        .filter_map(|der| der::subject_key(der))
        .collect();
    Ok(ClientVerifier {
        algorithms: provider().signature_verification_algorithms,
        anchors,
        intermediates,
        anchor_info,
        ca_subjects,
        all_read,
        service_cas: loaded,
        chains,
        revoked,
        metrics,
        certs_dir: certs_dir.to_path_buf(),
        grants,
    })
}

/// The service listener's TLS: the broker certificate, TLS 1.2 or 1.3, a
/// client certificate required and checked by `verifier`.
fn build_config(
    certs_dir: &Path,
    verifier: Arc<ClientVerifier>,
    tickets: Option<Arc<TicketGate>>,
) -> Result<Configs, BrokerError> {
    let (chain, key) = broker_identity(certs_dir)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| BrokerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| BrokerError::Tls(e.to_string()))?;
    Ok(finish(config, tickets))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rustls::pki_types::ServerName;
    use std::io::{Read, Write};

    /// A session's task that is dropped (aborted, or its runtime shut down)
    /// leaves no registration behind.
    #[tokio::test]
    async fn a_dropped_session_task_unregisters() {
        let dir = tempfile::tempdir().unwrap();
        fleet_pki::Pki::open_or_create(dir.path()).unwrap();
        let trust = Trust::load(
            dir.path(),
            Arc::new(Metrics::default()),
            Default::default(),
            false,
            false,
        )
        .unwrap();
        let registered = |t: &Trust| {
            let s = t.sessions.lock().unwrap();
            let by_serial = s.by_serial.get("ab").map_or(0, Vec::len);
            assert_eq!(by_serial, s.by_expiry.len());
            by_serial
        };
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let task = tokio::spawn({
            let trust = trust.clone();
            async move {
                let _registered = trust.register("ab", 100, [0; 32], 7, CancellationToken::new());
                let _ = started_tx.send(());
                std::future::pending::<()>().await
            }
        });
        tokio::time::timeout(Duration::from_secs(10), started)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(registered(&trust), 1);
        task.abort();
        assert!(task.await.unwrap_err().is_cancelled());
        assert_eq!(registered(&trust), 0);
    }

    #[test]
    fn sessions_are_cut_once_their_certificate_expired() {
        let dir = tempfile::tempdir().unwrap();
        fleet_pki::Pki::open_or_create(dir.path()).unwrap();
        let metrics = Arc::new(Metrics::default());
        let trust = Trust::load(dir.path(), metrics, Default::default(), false, false).unwrap();
        let cuts: Vec<_> = (0..4).map(|_| CancellationToken::new()).collect();
        let a = trust.register("a", 100, [0; 32], 1, cuts[0].clone());
        let b = trust.register("b", 200, [0; 32], 2, cuts[1].clone());
        // Two sessions of one certificate.
        let c = trust.register("c", 300, [0; 32], 3, cuts[2].clone());
        let gone = trust.register("c", 300, [0; 32], 4, cuts[3].clone());
        assert!(!gone.end());
        let cut = || cuts.iter().map(|c| c.is_cancelled()).collect::<Vec<_>>();
        // Valid through its notAfter second.
        assert_eq!(trust.cut_expired(100), 0);
        assert_eq!(cut(), [false; 4]);
        assert_eq!(trust.cut_expired(201), 2);
        assert_eq!(cut(), [true, true, false, false]);
        assert_eq!(trust.cut_expired(201), 0);
        // An unregistered session is not cut.
        assert_eq!(trust.cut_expired(301), 1);
        assert_eq!(cut(), [true, true, true, false]);
        // Each ended session tells it was cut for its expiry.
        assert!(a.end() && b.end() && c.end());
        assert!(trust.sessions.lock().unwrap().by_serial.is_empty());
    }

    /// Records each ticket's plaintext on its way to `inner`.
    #[derive(Debug)]
    struct Recording {
        inner: Arc<dyn ProducesTickets>,
        seen: Mutex<Vec<Vec<u8>>>,
    }

    impl ProducesTickets for Recording {
        fn enabled(&self) -> bool {
            true
        }
        fn lifetime(&self) -> u32 {
            self.inner.lifetime()
        }
        fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
            self.seen.lock().unwrap().push(plain.to_vec());
            self.inner.encrypt(plain)
        }
        fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
            self.inner.decrypt(cipher)
        }
    }

    /// A fleet PKI with `dev1` granted `svcA`: the service listener's
    /// configuration (tickets recorded), and dev1's client configuration
    /// for `version`, which keeps its tickets.
    fn fleet(
        dir: &Path,
        version: &'static rustls::SupportedProtocolVersion,
    ) -> (
        Configs,
        Arc<rustls::ClientConfig>,
        Arc<Recording>,
        Vec<CertificateDer<'static>>,
    ) {
        // rustls's own order, as a device would have it: AES-256-GCM-SHA384 first.
        fleet_with(dir, version, rustls::crypto::aws_lc_rs::default_provider())
    }

    /// [`fleet`], with the client's `provider` (and its suites' order).
    fn fleet_with(
        dir: &Path,
        version: &'static rustls::SupportedProtocolVersion,
        provider: CryptoProvider,
    ) -> (
        Configs,
        Arc<rustls::ClientConfig>,
        Arc<Recording>,
        Vec<CertificateDer<'static>>,
    ) {
        let pki = fleet_pki::Pki::open_or_create(dir).unwrap();
        let key = fleet_protocol::crypto::generate_p256().unwrap();
        let public =
            openssl::pkey::PKey::public_key_from_der(&key.public_key_to_der().unwrap()).unwrap();
        let issued = pki
            .issue_device_certificate("dev1", "svcA", &public, 1)
            .unwrap();
        grants::add_grant(dir, "dev1", "svcA").unwrap();
        let chain: Vec<CertificateDer<'static>> = issued
            .chain
            .iter()
            .map(|c| CertificateDer::from(c.to_der().unwrap()))
            .collect();
        let metrics = Arc::new(Metrics::default());
        let revoked = Arc::new(RwLock::new(HashSet::new()));
        let verifier = Arc::new(
            build_verifier(
                dir,
                revoked,
                metrics,
                None,
                Arc::new(GrantFiles::new(dir, true)),
            )
            .unwrap(),
        );
        let recording = Arc::new(Recording {
            inner: rustls::crypto::aws_lc_rs::Ticketer::new().unwrap(),
            seen: Mutex::new(Vec::new()),
        });
        let gate = TicketGate::new(
            recording.clone(),
            Arc::new(RwLock::new(verifier.clone())),
            Arc::new(Metrics::default()),
        );
        let server = build_config(dir, verifier, Some(Arc::new(gate))).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(pki.root_cert().to_der().unwrap()))
            .unwrap();
        let key = PrivateKeyDer::try_from(key.private_key_to_pkcs8().unwrap()).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain.clone(), key)
            .unwrap();
        (server, Arc::new(client), recording, chain)
    }

    /// A handshake in memory, then a byte of data each way (which carries
    /// the ticket to the client); whether the server resumed.
    fn handshake(server: &Configs, client: &Arc<rustls::ClientConfig>) -> bool {
        connect(server, client).handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// [`handshake`]'s server end, the configuration chosen from the
    /// ClientHello as the listeners do.
    fn connect(server: &Configs, client: &Arc<rustls::ClientConfig>) -> rustls::ServerConnection {
        let name = ServerName::try_from("localhost").unwrap();
        let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
        c.writer().write_all(b"c").unwrap();
        let mut hello = Vec::new();
        while c.wants_write() {
            c.write_tls(&mut hello).unwrap();
        }
        let mut acceptor = rustls::server::Acceptor::default();
        acceptor.read_tls(&mut hello.as_slice()).unwrap();
        let accepted = match acceptor.accept() {
            Ok(Some(a)) => a,
            _ => panic!("no ClientHello"),
        };
        let config = server.for_client(accepted.client_hello().cipher_suites());
        let mut s = match accepted.into_connection(config) {
            Ok(s) => s,
            Err((e, _)) => panic!("{e}"),
        };
        s.writer().write_all(b"s").unwrap();
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        let (mut got_c, mut got_s) = (false, false);
        for _ in 0..20 {
            to_server.clear();
            while c.wants_write() {
                c.write_tls(&mut to_server).unwrap();
            }
            if !to_server.is_empty() {
                s.read_tls(&mut to_server.as_slice()).unwrap();
            }
            s.process_new_packets().unwrap();
            to_client.clear();
            while s.wants_write() {
                s.write_tls(&mut to_client).unwrap();
            }
            c.read_tls(&mut to_client.as_slice()).unwrap();
            c.process_new_packets().unwrap();
            let mut byte = [0u8; 1];
            got_s |= s.reader().read(&mut byte).is_ok_and(|n| n == 1);
            got_c |= c.reader().read(&mut byte).is_ok_and(|n| n == 1);
            if got_c && got_s && !c.is_handshaking() {
                return s;
            }
        }
        panic!("handshake did not finish");
    }

    #[test]
    fn a_certificate_that_leaves_its_tickets_unused_is_given_one_in_sixteen() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let dir = tempfile::tempdir().unwrap();
            let (server, resuming, recording, _) = fleet(dir.path(), version);
            let given = || recording.seen.lock().unwrap().len();
            // Asks for tickets (a session store of its own each time) and
            // never offers one.
            let never = || {
                let mut config = (*resuming).clone();
                config.resumption = rustls::client::Resumption::in_memory_sessions(4);
                Arc::new(config)
            };
            // Two tickets, both left unused.
            for n in 1..=2 {
                assert!(!handshake(&server, &never()), "{version:?}");
                assert_eq!(given(), n, "{version:?}: connect {n}");
            }
            // Then one at the 16th connect after them, and none between.
            for n in 1..=15 {
                assert!(!handshake(&server, &never()), "{version:?}");
                assert_eq!(given(), 2, "{version:?}: withheld connect {n}");
            }
            assert!(!handshake(&server, &never()), "{version:?}");
            assert_eq!(given(), 3, "{version:?}: the probe");
            // The same certificate resuming with its ticket is given one at
            // every connect again.
            assert!(
                !handshake(&server, &resuming),
                "{version:?}: nothing to resume yet"
            );
            assert_eq!(given(), 3, "{version:?}");
            let before = given();
            assert!(!handshake(&server, &never()), "{version:?}");
            assert_eq!(given(), before, "{version:?}");
            let mut probed = false;
            for n in 1..=16 {
                let resumed = handshake(&server, &resuming);
                if !probed {
                    assert!(!resumed, "{version:?}: resumed without a ticket");
                    probed = given() == before + 1;
                    if !probed {
                        assert_eq!(given(), before, "{version:?}: withheld until the probe");
                    }
                    continue;
                }
                assert!(resumed, "{version:?}: the probe's ticket not taken");
                for m in 1..=4 {
                    assert!(handshake(&server, &resuming), "{version:?}: resumption {m}");
                }
                assert_eq!(given(), before + 6, "{version:?}: after {n} connects");
                break;
            }
            assert!(probed, "{version:?}: no probe");
        }
    }

    #[test]
    fn the_gate_reads_the_chain_rustls_puts_in_its_tickets_and_resumes_with_them() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let dir = tempfile::tempdir().unwrap();
            let (server, client, recording, chain) = fleet(dir.path(), version);
            assert!(
                !handshake(&server, &client),
                "{version:?}: first handshake resumed"
            );
            let plain = recording
                .seen
                .lock()
                .unwrap()
                .last()
                .cloned()
                .expect("a ticket");
            let ticket = read_ticket(&plain).expect("ticket unreadable");
            assert_eq!(ticket.chain, chain, "{version:?}");
            let now = UnixTime::now().as_secs();
            assert!(
                ticket.created <= now && now - ticket.created < 60,
                "{version:?}"
            );
            assert!(handshake(&server, &client), "{version:?}: not resumed");
            // Withdrawn from the registry: the ticket is not taken.
            grants::write_grants(dir.path(), "dev1", &[]).unwrap();
            let name = ServerName::try_from("localhost").unwrap();
            let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
            let mut s = rustls::ServerConnection::new(server.for_client(&[])).unwrap();
            let mut hello = Vec::new();
            c.write_tls(&mut hello).unwrap();
            s.read_tls(&mut hello.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            assert_eq!(
                s.handshake_kind(),
                Some(rustls::HandshakeKind::Full),
                "{version:?}"
            );
        }
    }

    #[test]
    fn the_server_chooses_a_sha_256_suite_though_the_client_prefers_sha_384() {
        for (version, chosen) in [
            (
                &rustls::version::TLS13,
                CipherSuite::TLS13_AES_128_GCM_SHA256,
            ),
            (
                &rustls::version::TLS12,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (server, client, _, _) = fleet(dir.path(), version);
            let first = client
                .crypto_provider()
                .cipher_suites
                .iter()
                .find(|s| s.version() == version)
                .unwrap()
                .suite();
            assert!(
                format!("{first:?}").ends_with("SHA384"),
                "client's first: {first:?}"
            );
            let s = connect(&server, &client);
            assert_eq!(s.negotiated_cipher_suite().map(|s| s.suite()), Some(chosen));
        }
    }

    /// A client that puts ChaCha20-Poly1305 first (one without AES
    /// instructions) gets it.
    #[test]
    fn a_client_that_prefers_chacha20_gets_it() {
        for (version, chosen) in [
            (
                &rustls::version::TLS13,
                CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
            ),
            (
                &rustls::version::TLS12,
                CipherSuite::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let mut provider = rustls::crypto::aws_lc_rs::default_provider();
            provider
                .cipher_suites
                .sort_by_key(|s| !format!("{:?}", s.suite()).contains("CHACHA20"));
            let (server, client, _, _) = fleet_with(dir.path(), version, provider);
            let s = connect(&server, &client);
            assert_eq!(s.negotiated_cipher_suite().map(|s| s.suite()), Some(chosen));
        }
    }

    proptest! {
        #[test]
        fn arbitrary_tickets_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = read_ticket(&bytes);
        }
    }

    #[test]
    fn a_ticket_cut_short_or_with_bytes_after_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let (server, client, recording, _) = fleet(dir.path(), &rustls::version::TLS13);
        handshake(&server, &client);
        let plain = recording.seen.lock().unwrap().last().cloned().unwrap();
        assert!(read_ticket(&plain).is_some());
        for cut in 0..plain.len() {
            assert!(read_ticket(&plain[..cut]).is_none(), "cut at {cut}");
        }
        let mut longer = plain.clone();
        longer.push(0);
        assert!(read_ticket(&longer).is_none());
    }
}

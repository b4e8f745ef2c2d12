//! Trust for the service listener: the fleet root and every per-service CA
//! in `certs/`, the CRL of each service CA, the registry's grants
//! (`certs/grants/`, see [`fleet_pki::grants`]), and the sessions to cut
//! when a certificate is revoked.
//!
//! TLS is rustls on aws-lc-rs; the certificates and CRLs are read with
//! OpenSSL when they load. One rustls configuration serves every
//! handshake; it is rebuilt only when a file under `certs/services/` or
//! `certs/crl/` changes, which a watcher notices within [`RELOAD_EVERY`].
//! Revocation and the registry's grant are checked by the client
//! verifier, so a revoked certificate, or one
//! whose device the registry does not grant its service, fails the
//! handshake itself; the live sessions of a newly revoked certificate are
//! cancelled on reload. Grants are read from their file at each handshake,
//! so the manager's latest write always counts.

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
use rustls::server::ServerConfig;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{der, Metrics};
use crate::BrokerError;

/// How often the watcher looks at `certs/` for new CAs and CRLs.
pub const RELOAD_EVERY: Duration = Duration::from_millis(200);

/// How long a live session of a newly revoked certificate lives on, so a
/// reply already in flight to it (the device's new certificate, on
/// migration) is delivered. Polling plus grace stay under one second.
pub const CUT_GRACE: Duration = Duration::from_millis(400);

/// Lowercase hex of a serial number, as the PKI and the CRLs write it.
fn hex_serial(serial: &Asn1IntegerRef) -> String {
    serial
        .to_bn()
        .and_then(|b| b.to_hex_str().map(|s| s.to_lowercase()))
        .unwrap_or_default()
}

/// The identity a verified client certificate carries.
#[derive(Debug, Clone)]
pub struct CertIdentity {
    /// The CN: a device id, or `provider.{name}`; the client id must equal it.
    pub cn: String,
    /// The provider's name when the CN is `provider.{name}`.
    pub provider: Option<String>,
    pub service_id: String,
    pub serial: String,
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
    Ok(CertIdentity {
        cn,
        provider,
        service_id,
        serial: names.serial,
    })
}

/// What is on disk: file name → modification time, to notice changes.
type Fingerprint = BTreeMap<PathBuf, Option<SystemTime>>;

fn fingerprint(dir: &Path) -> Fingerprint {
    let mut out = BTreeMap::new();
    for sub in ["services", "crl"] {
        if let Ok(entries) = std::fs::read_dir(dir.join(sub)) {
            for e in entries.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "pem") {
                    let mtime = e.metadata().and_then(|m| m.modified()).ok();
                    out.insert(p, mtime);
                }
            }
        }
    }
    out
}

/// Live service sessions by certificate serial.
#[derive(Default)]
struct Sessions {
    by_serial: HashMap<String, Vec<(u64, CancellationToken)>>,
}

/// Trust state shared by every service-listener connection.
pub struct Trust {
    certs_dir: PathBuf,
    metrics: Arc<Metrics>,
    config: RwLock<Arc<ServerConfig>>,
    revoked: Arc<RwLock<HashSet<String>>>,
    sessions: Mutex<Sessions>,
    seen: Mutex<Fingerprint>,
}

impl Trust {
    /// Loads the trust in `certs_dir`; `revoked` is filled with the
    /// revoked serials and kept up to date.
    pub fn load(
        certs_dir: &Path,
        metrics: Arc<Metrics>,
        revoked: Arc<RwLock<HashSet<String>>>,
    ) -> Result<Arc<Trust>, BrokerError> {
        let seen = fingerprint(certs_dir);
        *revoked.write().unwrap_or_else(|p| p.into_inner()) = load_revoked(certs_dir);
        let config = build_config(certs_dir, revoked.clone(), metrics.clone())?;
        Ok(Arc::new(Trust {
            certs_dir: certs_dir.to_path_buf(),
            metrics,
            config: RwLock::new(config),
            revoked,
            sessions: Mutex::new(Sessions::default()),
            seen: Mutex::new(seen),
        }))
    }

    /// The TLS configuration for the next handshake.
    pub fn config(&self) -> Arc<ServerConfig> {
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

    /// Registers a live session; it is cancelled if its serial is revoked.
    pub fn register(&self, serial: &str, connection: u64, cut: CancellationToken) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        s.by_serial
            .entry(serial.to_owned())
            .or_default()
            .push((connection, cut));
    }

    pub fn unregister(&self, serial: &str, connection: u64) {
        let mut s = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = s.by_serial.get_mut(serial) {
            list.retain(|(c, _)| *c != connection);
            if list.is_empty() {
                s.by_serial.remove(serial);
            }
        }
    }

    /// Rebuilds the context if anything under `certs/` changed, and returns
    /// the live sessions of revoked certificates, to be cut.
    pub fn reload_if_changed(&self) -> Vec<CancellationToken> {
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
        match build_config(&self.certs_dir, self.revoked.clone(), self.metrics.clone()) {
            Ok(c) => *self.config.write().unwrap_or_else(|p| p.into_inner()) = c,
            Err(err) => {
                warn!(error = %err, "service TLS context not rebuilt; keeping the previous one")
            }
        }
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let mut cuts = Vec::new();
        for (serial, list) in &sessions.by_serial {
            if revoked.contains(serial) {
                for (connection, cut) in list {
                    info!(
                        serial,
                        connection, "certificate revoked: closing its live session"
                    );
                    cuts.push(cut.clone());
                }
            }
        }
        info!(revoked = revoked.len(), "service trust reloaded");
        cuts
    }

    /// Watches `certs/` until `stop` is cancelled.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let me = self.clone();
            if let Ok(cuts) = tokio::task::spawn_blocking(move || me.reload_if_changed()).await {
                if !cuts.is_empty() {
                    tokio::spawn(async move {
                        tokio::time::sleep(CUT_GRACE).await;
                        cuts.iter().for_each(CancellationToken::cancel);
                    });
                }
            }
        }
    }
}

fn load_revoked(certs_dir: &Path) -> HashSet<String> {
    let mut out = HashSet::new();
    let Ok(entries) = std::fs::read_dir(certs_dir.join("crl")) else {
        return out;
    };
    for e in entries.flatten() {
        let path = e.path();
        let parsed = std::fs::read(&path)
            .ok()
            .and_then(|pem| X509Crl::from_pem(&pem).ok());
        let Some(crl) = parsed else {
            warn!(path = %path.display(), "CRL unreadable; ignored");
            continue;
        };
        for r in crl.get_revoked().into_iter().flatten() {
            out.insert(hex_serial(r.serial_number()));
        }
    }
    out
}

/// The rustls provider every listener uses: aws-lc-rs, whose P-256 and
/// X25519 are the ones the rest of the process already links.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// The broker certificate chain and key from `certs/`.
fn broker_identity(
    certs_dir: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), BrokerError> {
    let cert = certs_dir.join("broker.pem");
    let key = certs_dir.join("broker.key");
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

/// Sessions are never resumed: every connection shows its certificate, so
/// revocation and the registry's grant apply to every handshake.
fn no_resumption(mut config: ServerConfig) -> Arc<ServerConfig> {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Arc::new(config)
}

/// The bootstrap listener's TLS: the broker certificate, TLS 1.2 or 1.3,
/// no client certificate. Built once; shared by every handshake.
pub fn server_config(certs_dir: &Path) -> Result<Arc<ServerConfig>, BrokerError> {
    let tls = |e: rustls::Error| BrokerError::Tls(e.to_string());
    let (chain, key) = broker_identity(certs_dir)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(tls)?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(tls)?;
    Ok(no_resumption(config))
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
struct ClientVerifier {
    algorithms: WebPkiSupportedAlgorithms,
    anchors: Vec<TrustAnchor<'static>>,
    /// Certificates a chain may pass through to reach an anchor.
    intermediates: Vec<CertificateDer<'static>>,
    /// Each anchor by [`anchor_key`]: its validity, which webpki does not
    /// check, and whether it is the root.
    anchor_info: HashMap<Vec<u8>, AnchorInfo>,
    /// The DER of every service CA loaded from `services/`.
    service_cas: HashSet<Vec<u8>>,
    revoked: Arc<RwLock<HashSet<String>>>,
    metrics: Arc<Metrics>,
    certs_dir: PathBuf,
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
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

impl ClientVerifier {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        presented: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
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
        let shape = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
            let info = self
                .anchor_info
                .get(&anchor_key(path.anchor()))
                .ok_or(webpki::Error::UnknownIssuer)?;
            let hops = path.intermediate_certificates().count();
            if hops != usize::from(info.root) {
                return Err(webpki::Error::PathLenConstraintViolated);
            }
            // Through the root, only a service CA the fleet has now: not
            // one retired (replaced in `services/`), whose leaves the new
            // CA's CRL no longer lists.
            if let Some(ca) = path.intermediate_certificates().next() {
                let ca = ca.der();
                if !self.service_cas.contains(ca.as_ref()) && !self.service_ca_on_disk(&ca) {
                    return Err(webpki::Error::UnknownIssuer);
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
        // The device certificate: issued by the CA of the service it names
        // (a service CA cannot mint another service's devices), not
        // revoked, and granted that service by the registry.
        let names = der::names(end_entity).ok_or(refuse(CertificateError::BadEncoding))?;
        let Some(service) = names
            .subject_o
            .filter(|o| Some(o) == names.issuer_o.as_ref())
        else {
            return Err(refuse(CertificateError::ApplicationVerificationFailure));
        };
        if self
            .revoked
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&names.serial)
        {
            return Err(refuse(CertificateError::Revoked));
        }
        let device = names.subject_cn.unwrap_or_default();
        if grants::is_granted(&self.certs_dir, &device, &service) {
            return Ok(());
        }
        self.metrics.not_granted.fetch_add(1, Ordering::Relaxed);
        warn!(
            device,
            service, "certificate refused: the registry grants this device no such service"
        );
        Err(refuse(CertificateError::ApplicationVerificationFailure))
    }

    /// Whether `ca` is its service's CA file now: one created since the
    /// last reload (the watcher looks every [`RELOAD_EVERY`]).
    fn service_ca_on_disk(&self, ca: &CertificateDer<'_>) -> bool {
        let Some(service) = der::names(ca).and_then(|n| n.subject_o) else {
            return false;
        };
        if fleet_protocol::topic::validate_service_id(&service).is_err() {
            return false;
        }
        let path = self
            .certs_dir
            .join("services")
            .join(format!("{service}-ca.pem"));
        CertificateDer::pem_file_iter(&path)
            .map(|certs| certs.flatten().any(|c| c.as_ref() == ca.as_ref()))
            .unwrap_or(false)
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
        self.verify(end_entity, intermediates, now)?;
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

fn build_config(
    certs_dir: &Path,
    revoked: Arc<RwLock<HashSet<String>>>,
    metrics: Arc<Metrics>,
) -> Result<Arc<ServerConfig>, BrokerError> {
    let ssl = |e: openssl::error::ErrorStack| BrokerError::Tls(e.to_string());
    let read = |p: PathBuf| {
        std::fs::read(&p).map_err(|_| BrokerError::MissingFile(p.display().to_string()))
    };
    let root = X509::from_pem(&read(certs_dir.join("root-ca.pem"))?).map_err(ssl)?;
    let root_der = root.to_der().map_err(ssl)?;
    // Service CAs, each checked against the root here, once.
    let mut service_cas = Vec::new();
    if let Ok(entries) = std::fs::read_dir(certs_dir.join("services")) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "pem") {
                match std::fs::read(&p)
                    .ok()
                    .and_then(|pem| X509::from_pem(&pem).ok())
                {
                    Some(ca)
                        if issued_by(&ca, &root)
                            && ca.to_der().ok().as_deref() != Some(root_der.as_slice()) =>
                    {
                        service_cas.push(ca)
                    }
                    Some(_) => {
                        warn!(path = %p.display(), "service CA not issued by the fleet root; ignored")
                    }
                    None => warn!(path = %p.display(), "service CA unreadable; ignored"),
                }
            }
        }
    }
    let root_validity = validity(&root).map_err(ssl)?;
    let mut cas = Vec::new();
    for ca in &service_cas {
        cas.push((ca.to_der().map_err(ssl)?, validity(ca).map_err(ssl)?));
    }
    // The root is always an anchor (a client may present its service CA).
    // A client's chain may also end at its service CA, already checked
    // against the root above: one signature check less per handshake. Only
    // while no service CA outlives the root, so that the service CA's
    // validity, still checked on every handshake, implies the root's.
    // Otherwise the service CAs are intermediates on the way to the root.
    let within_root = cas
        .iter()
        .all(|(_, (from, until))| *from >= root_validity.0 && *until <= root_validity.1);
    let loaded: HashSet<Vec<u8>> = cas.iter().map(|(der, _)| der.clone()).collect();
    let mut anchor_certs = vec![(root_der, root_validity, true)];
    let mut intermediates = Vec::new();
    for (der, window) in cas {
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
        let info = AnchorInfo {
            not_before: u64::try_from(from).unwrap_or(0),
            not_after: u64::try_from(until).unwrap_or(0),
            root,
        };
        anchor_info.insert(anchor_key(&anchor), info);
        anchors.push(anchor);
    }
    let provider = provider();
    let verifier = ClientVerifier {
        algorithms: provider.signature_verification_algorithms,
        anchors,
        intermediates,
        anchor_info,
        service_cas: loaded,
        revoked,
        metrics,
        certs_dir: certs_dir.to_path_buf(),
    };
    let (chain, key) = broker_identity(certs_dir)?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| BrokerError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(chain, key)
        .map_err(|e| BrokerError::Tls(e.to_string()))?;
    Ok(no_resumption(config))
}

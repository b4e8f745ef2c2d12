//! Trust for the service listener: the fleet root and every per-service CA
//! in `certs/`, the CRL of each service CA, the registry's grants
//! (`certs/grants/`, see [`fleet_pki::grants`]), and the sessions to cut
//! when a certificate is revoked.
//!
//! One OpenSSL context serves every handshake; it is rebuilt only when a
//! file under `certs/services/` or `certs/crl/` changes, which a watcher
//! notices within [`RELOAD_EVERY`]. Revocation and the registry's grant
//! are checked in the verify callback, so a revoked certificate, or one
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
use openssl::asn1::Asn1IntegerRef;
use openssl::nid::Nid;
use openssl::ssl::{SslAcceptor, SslAcceptorBuilder, SslMethod, SslRef, SslVerifyMode, SslVersion};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509Crl, X509NameRef, X509Ref, X509VerifyResult, X509};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Metrics;
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

/// Lowercase hex of a certificate's serial.
pub fn serial_hex(cert: &X509Ref) -> String {
    hex_serial(cert.serial_number())
}

fn name_entry(name: &X509NameRef, nid: Nid) -> Option<String> {
    name.entries_by_nid(nid)
        .next()
        .and_then(|e| e.data().to_string().ok())
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
pub fn identity_of(ssl: &SslRef) -> Result<CertIdentity, String> {
    let cert = ssl.peer_certificate().ok_or("no client certificate")?;
    let cn = name_entry(cert.subject_name(), Nid::COMMONNAME).ok_or("certificate has no CN")?;
    let service_id =
        name_entry(cert.subject_name(), Nid::ORGANIZATIONNAME).ok_or("certificate has no O")?;
    let provider = cn.strip_prefix(grants::PROVIDER_PREFIX).map(str::to_owned);
    fleet_protocol::topic::validate_device_id(provider.as_deref().unwrap_or(&cn))
        .map_err(|e| e.to_string())?;
    fleet_protocol::topic::validate_service_id(&service_id).map_err(|e| e.to_string())?;
    if name_entry(cert.issuer_name(), Nid::ORGANIZATIONNAME).as_deref() != Some(service_id.as_str())
    {
        return Err(format!(
            "certificate for service {service_id} was not issued by that service's CA"
        ));
    }
    Ok(CertIdentity {
        cn,
        provider,
        service_id,
        serial: serial_hex(&cert),
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
    acceptor: RwLock<Arc<SslAcceptor>>,
    revoked: Arc<RwLock<HashSet<String>>>,
    sessions: Mutex<Sessions>,
    seen: Mutex<Fingerprint>,
}

impl Trust {
    pub fn load(certs_dir: &Path, metrics: Arc<Metrics>) -> Result<Arc<Trust>, BrokerError> {
        let revoked = Arc::new(RwLock::new(HashSet::new()));
        let seen = fingerprint(certs_dir);
        *revoked.write().expect("fresh lock") = load_revoked(certs_dir);
        let acceptor = build_acceptor(certs_dir, revoked.clone(), metrics.clone())?;
        Ok(Arc::new(Trust {
            certs_dir: certs_dir.to_path_buf(),
            metrics,
            acceptor: RwLock::new(Arc::new(acceptor)),
            revoked,
            sessions: Mutex::new(Sessions::default()),
            seen: Mutex::new(seen),
        }))
    }

    pub fn acceptor(&self) -> Arc<SslAcceptor> {
        self.acceptor
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
        match build_acceptor(&self.certs_dir, self.revoked.clone(), self.metrics.clone()) {
            Ok(a) => *self.acceptor.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(a),
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

/// The broker's server side of TLS, shared by every TLS listener: the
/// broker certificate and key from `certs/`, TLS 1.2 or later.
pub fn server_builder(certs_dir: &Path) -> Result<SslAcceptorBuilder, BrokerError> {
    let tls = |e: openssl::error::ErrorStack| BrokerError::Tls(e.to_string());
    let cert = certs_dir.join("broker.pem");
    let key = certs_dir.join("broker.key");
    for p in [&cert, &key] {
        if !p.exists() {
            return Err(BrokerError::MissingFile(p.display().to_string()));
        }
    }
    let mut builder = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).map_err(tls)?;
    builder
        .set_min_proto_version(Some(SslVersion::TLS1_2))
        .map_err(tls)?;
    builder.set_certificate_chain_file(&cert).map_err(tls)?;
    builder
        .set_private_key_file(&key, openssl::ssl::SslFiletype::PEM)
        .map_err(tls)?;
    builder.check_private_key().map_err(tls)?;
    Ok(builder)
}

/// Whether `root` issued `ca`: names match and the signature verifies.
fn issued_by(ca: &X509Ref, root: &X509Ref) -> bool {
    root.issued(ca) == X509VerifyResult::OK
        && root
            .public_key()
            .and_then(|key| ca.verify(&key))
            .unwrap_or(false)
}

fn build_acceptor(
    certs_dir: &Path,
    revoked: Arc<RwLock<HashSet<String>>>,
    metrics: Arc<Metrics>,
) -> Result<SslAcceptor, BrokerError> {
    let tls = |e: openssl::error::ErrorStack| BrokerError::Tls(e.to_string());
    let read = |p: PathBuf| {
        std::fs::read(&p).map_err(|_| BrokerError::MissingFile(p.display().to_string()))
    };
    let mut store = X509StoreBuilder::new().map_err(tls)?;
    let root = X509::from_pem(&read(certs_dir.join("root-ca.pem"))?).map_err(tls)?;
    store.add_cert(root.clone()).map_err(tls)?;
    // Whether every service CA's validity lies within the root's.
    let mut within_root = true;
    if let Ok(entries) = std::fs::read_dir(certs_dir.join("services")) {
        for e in entries.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "pem") {
                match std::fs::read(&p)
                    .ok()
                    .and_then(|pem| X509::from_pem(&pem).ok())
                {
                    Some(ca) if issued_by(&ca, &root) => {
                        within_root &= ca.not_before() >= root.not_before()
                            && ca.not_after() <= root.not_after();
                        store.add_cert(ca).map_err(tls)?
                    }
                    Some(_) => {
                        warn!(path = %p.display(), "service CA not issued by the fleet root; ignored")
                    }
                    None => warn!(path = %p.display(), "service CA unreadable; ignored"),
                }
            }
        }
    }
    // Every service CA in the store was checked against the root above, so
    // a client's chain may end at its service CA: one signature check less
    // per handshake (about a tenth of its CPU). Only while no service CA
    // outlives the root, so that the service CA's validity, still checked
    // on every handshake, implies the root's.
    if within_root {
        store
            .set_flags(X509VerifyFlags::PARTIAL_CHAIN)
            .map_err(tls)?;
    }
    let mut builder = server_builder(certs_dir)?;
    builder.set_verify_cert_store(store.build()).map_err(tls)?;
    let certs = certs_dir.to_path_buf();
    builder.set_verify_callback(
        SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT,
        move |ok, ctx| {
            if !ok {
                return false;
            }
            if ctx.error_depth() != 0 {
                return true;
            }
            // The device certificate: not revoked, issued by the CA of the
            // service it names (a service CA cannot mint another service's
            // devices), and granted that service by the registry.
            let Some(cert) = ctx.current_cert() else {
                return false;
            };
            let own_service = name_entry(cert.subject_name(), Nid::ORGANIZATIONNAME);
            let ok = own_service.is_some()
                && own_service == name_entry(cert.issuer_name(), Nid::ORGANIZATIONNAME)
                && !revoked
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&serial_hex(cert));
            if !ok {
                return false;
            }
            let device = name_entry(cert.subject_name(), Nid::COMMONNAME).unwrap_or_default();
            let service = own_service.unwrap_or_default();
            if grants::is_granted(&certs, &device, &service) {
                return true;
            }
            metrics.not_granted.fetch_add(1, Ordering::Relaxed);
            warn!(
                device,
                service, "certificate refused: the registry grants this device no such service"
            );
            ctx.set_error(X509VerifyResult::APPLICATION_VERIFICATION);
            false
        },
    );
    // Sessions are not resumed: every connection shows its certificate, so
    // revocation applies to every handshake.
    builder.set_session_cache_mode(openssl::ssl::SslSessionCacheMode::OFF);
    builder.set_num_tickets(0).map_err(tls)?;
    Ok(builder.build())
}

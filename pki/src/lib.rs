//! The fleetshift PKI: a root CA, one intermediate CA per service id, the
//! broker's server certificate, the manager's message-signing key, device
//! certificates and per-service CRLs, all kept as PEM files in one directory.
//!
//! Everything is ECDSA P-256 with SHA-256 and goes through the `openssl`
//! crate. The calls here are blocking (file I/O and signatures); async
//! callers run them on `spawn_blocking`.
//!
//! # Layout
//! - this file: [`Pki`], the directory and its keys; [`IssuedCert`],
//!   [`RevokedEntry`], [`PkiError`]; the device-side helpers
//!   [`generate_csr`], [`chain_to_pem`], [`write_private_key`].
//! - `certs`: certificate templates (CA, server, client) and key and serial generation.
//! - `crl`: X.509 v2 CRLs, encoded with `der` and signed with OpenSSL.
//! - `der`: the few DER encoders a CRL needs.
//! - `files`: atomic writes with an explicit mode, PEM loading.
//! - [`grants`]: the registry's grants per device, read by the broker at
//!   every mutual-TLS handshake.
//! - `generations`: the file names of each generation of a service CA,
//!   and when one is rolled over or retired.
//!
//! # Directory
//! ```text
//! root-ca.pem, root-ca.key            fleet root CA
//! root-ca.{n}.pem, .key, .cross.pem   its successors (generation n ≥ 2), each
//!   .back.pem                         also certified by the one before, and
//!                                     certifying it back
//! roots.pem                           every root that has not expired
//! manager-sign.key, manager-sign.pub.pem
//! broker.pem, broker.key              broker server certificate (signed by the root)
//! services/{svc}-ca.pem, {svc}-ca.key per-service intermediate CAs
//! services/{svc}-ca.{n}.pem, .key     their successors (generation n ≥ 2)
//! services/retired/                   generations past their end
//! crl/{svc}.crl.pem, {svc}.{n}.crl.pem one CRL per service CA generation
//! crl/_root.crl.pem, _root.{n}.crl.pem one CRL per root generation
//! grants/{device_id}                  services the registry grants the device
//! ```
//! Private keys are PKCS#8 PEM with mode 0600; every file is written
//! atomically (temporary file, then rename).

mod certs;
mod crl;
mod der;
mod files;
mod generations;
pub mod grants;
mod names;
mod roots;
mod signing;

pub use generations::{service_ca_cert_files, RETIRED_DIR};
pub use names::ServerNames;
pub use roots::root_cert_files;
pub use signing::{Signing, SigningGeneration, MANAGER_SIGNING_EKU};

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, PKeyRef, Private, Public};
use openssl::x509::{X509Req, X509};

use certs::{Issuer, Profile, Template, DAY};
use files::{KEY_MODE, PUBLIC_MODE};
use roots::RootPart;

/// Root CA lifetime.
const ROOT_LIFETIME_DAYS: u64 = 10 * 365;
/// Service CA lifetime.
const SERVICE_CA_LIFETIME_DAYS: u64 = 5 * 365;
/// Broker server certificate lifetime.
const BROKER_LIFETIME_DAYS: u64 = 2 * 365;
/// A CRL's nextUpdate, counted from its thisUpdate.
const CRL_VALIDITY_DAYS: u64 = 7;
/// A key or certificate without its other half left by a roll-over is
/// taken for one that did not finish once this old; younger, it may be
/// another process's roll under way.
const LEFTOVER_AGE_SECS: u64 = 60;
/// Most roots a device is given to pin (`roots` in a reply): a fleet has
/// two during a roll-over.
pub const MAX_PINNED_ROOTS: usize = 4;
/// Longest device certificate we issue: it must not outlive a fresh service CA.
pub const MAX_DEVICE_LIFETIME_DAYS: u32 = 5 * 365;
/// Largest CSR we parse; a P-256 CSR is a few hundred bytes.
pub const MAX_CSR_LEN: usize = 4096;

const ROOT_CN: &str = "fleetshift root CA";
const BROKER_CN: &str = "fleetshift broker";
const ADMIN_CN: &str = "fleetshift operator API";
/// Every root CA that has not expired, newest first (PEM), in the PKI
/// directory: what to give a device or a client made now to pin.
pub const ROOTS_FILE: &str = "roots.pem";

/// The roots to trust in `certs_dir`: [`ROOTS_FILE`], or `root-ca.pem`
/// where that is missing (a directory no manager of this version opened).
pub fn roots_pem_path(certs_dir: &Path) -> PathBuf {
    let bundle = certs_dir.join(ROOTS_FILE);
    match bundle.exists() {
        true => bundle,
        false => certs_dir.join("root-ca.pem"),
    }
}

/// The broker's TLS server certificate and key, in the PKI directory.
pub const BROKER_FILES: (&str, &str) = ("broker.pem", "broker.key");
/// The operator API's TLS server certificate and key (`admin_tls`), in the
/// PKI directory.
pub const ADMIN_FILES: (&str, &str) = ("admin.pem", "admin.key");

/// Errors of this layer.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
    #[error("bad CSR: {0}")]
    BadCsr(String),
    #[error("bad service id {0:?}")]
    BadServiceId(String),
    #[error("bad device id {0:?}")]
    BadDeviceId(String),
    #[error("bad key: {0}")]
    BadKey(String),
    #[error("bad certificate lifetime {0} days (1..={max})", max = MAX_DEVICE_LIFETIME_DAYS)]
    BadLifetime(u32),
    #[error("bad serial {0:?}")]
    BadSerial(String),
    #[error("bad server name {0:?}: neither an IP address nor a DNS name")]
    BadServerName(String),
    #[error("service {0:?} has no CA")]
    NoServiceCa(String),
    #[error("service {service:?} has no CA generation {generation}")]
    NoGeneration { service: String, generation: u32 },
    /// The PKI directory holds something we did not expect, e.g. a
    /// certificate without its key or a service CA not signed by the root.
    #[error("inconsistent PKI directory: {0}")]
    Inconsistent(String),
}

/// A freshly issued device certificate.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub leaf: X509,
    /// `[leaf, service CA]`; the root is not included.
    pub chain: Vec<X509>,
    /// Lowercase hex of the serial, no leading zeros.
    pub serial_hex: String,
    /// Lowercase hex of SHA-256 over the leaf's DER.
    pub fingerprint_sha256: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
    /// The generation of the service CA that issued it (1 for the first).
    pub ca_generation: u32,
}

/// One generation of a service's CA.
#[derive(Debug, Clone)]
pub struct CaGeneration {
    pub service_id: String,
    /// 1 for the first CA of the service, n for its (n-1)th successor.
    pub generation: u32,
    pub cert: X509,
    /// Lowercase hex of the serial, no leading zeros.
    pub serial_hex: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
    pub cert_path: PathBuf,
    pub crl_path: PathBuf,
}

/// One generation of the fleet root CA.
#[derive(Debug, Clone)]
pub struct RootGeneration {
    /// 1 for the first root (`root-ca.pem`), n for its (n-1)th successor.
    pub generation: u32,
    pub cert: X509,
    /// Lowercase hex of the serial, no leading zeros.
    pub serial_hex: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
    /// When it was made, Unix seconds (its notBefore is backdated).
    pub made_at: u64,
    pub cert_path: PathBuf,
    /// Its certificate by the generation before it (none for the first).
    pub cross_path: Option<PathBuf>,
    /// Whether its key is on disk (it signs its CRL; the issuing one
    /// signs service CAs and server certificates too).
    pub has_key: bool,
}

/// One line of a CRL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevokedEntry {
    /// As in [`IssuedCert::serial_hex`].
    pub serial_hex: String,
    /// Unix seconds.
    pub revoked_at: u64,
}

#[derive(Clone)]
struct Root {
    cert: X509,
    key: PKey<Private>,
    generation: u32,
}

/// The root generations loaded: every one on disk, oldest first; the last
/// issues.
struct Roots {
    all: Vec<(u32, X509, Option<PKey<Private>>)>,
    issuing: Root,
}

#[derive(Clone)]
struct ServiceCa {
    cert: X509,
    key: PKey<Private>,
    generation: u32,
}

/// The PKI directory with its root CA, signing key and service CAs loaded.
/// `Send + Sync`; share it behind an `Arc`.
pub struct Pki {
    dir: PathBuf,
    roots: RwLock<Roots>,
    /// Held while `roots.pem` is written.
    bundle_writer: Mutex<()>,
    /// The key that signs messages now ([`Pki::signing`]).
    signing: RwLock<std::sync::Arc<Signing>>,
    /// Held while the signing key rolls over.
    signing_roll: Mutex<()>,
    service_cas: Mutex<HashMap<String, ServiceCa>>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Pki")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Pki {
    /// Opens the PKI directory, creating what is missing on first use. Existing
    /// files are kept, so reopening yields the same root, signing key and
    /// service CAs.
    ///
    /// Creates `root-ca.pem`/`.key` (CN "fleetshift root CA", 10 years),
    /// `manager-sign.key`/`.pub.pem`, `broker.pem`/`.key` (CN "fleetshift
    /// broker", SAN localhost, 127.0.0.1, ::1, serverAuth, 2 years) and the
    /// `services/` and `crl/` directories. The broker certificate is
    /// recreated if either of its files is missing; the root and signing key
    /// are never silently replaced.
    pub fn open_or_create(dir: &Path) -> Result<Pki, PkiError> {
        files::create_dir(dir)?;
        files::create_dir(&dir.join("services"))?;
        files::create_dir(&dir.join("crl"))?;

        let roots = load_or_create_roots(dir)?;
        let first = load_or_create_signing_key(dir)?;
        let pki = Pki {
            dir: dir.to_path_buf(),
            roots: RwLock::new(roots),
            bundle_writer: Mutex::new(()),
            signing: RwLock::new(std::sync::Arc::new(Signing {
                generation: 1,
                key: first.clone(),
                signer: None,
                validity: None,
                digests: Vec::new(),
            })),
            signing_roll: Mutex::new(()),
            service_cas: Mutex::new(HashMap::new()),
        };
        let signing = signing::load(dir, first, &pki.read_roots(), &pki)?;
        *pki.signing.write().unwrap_or_else(|e| e.into_inner()) = std::sync::Arc::new(signing);
        pki.ensure_broker_cert(None)?;
        pki.refresh_root_crl()?;
        pki.write_roots_bundle()?;
        Ok(pki)
    }

    /// `dir/crl/_root.crl.pem`: the first root's CRL (it revokes nothing;
    /// `_` keeps it apart from every service id). It makes `crl/` a CRL
    /// file any OpenSSL tool accepts from the start, before any service
    /// exists: mosquitto reads its `crlfile` setting only when it starts.
    /// Generation n's is `crl/_root.{n}.crl.pem`.
    pub fn root_crl_path(&self) -> PathBuf {
        roots::root_crl_file(&self.dir, 1)
    }

    /// Writes the CRL of every root generation whose key is here, if it
    /// is missing or past half its validity.
    pub fn refresh_root_crl(&self) -> Result<(), PkiError> {
        let roots = self.read_roots();
        let now = unix_now();
        for (generation, cert, key) in &roots.all {
            let Some(key) = key else { continue };
            let path = roots::root_crl_file(&self.dir, *generation);
            // An expired root vouches for nothing; neither does its CRL.
            if unix_of(cert.not_after())? < now || !crl_due(&path) {
                continue;
            }
            write_crl_file(&path, cert, key, &[], now)?;
        }
        Ok(())
    }

    /// Whether a CRL of `service_id` (one per CA generation) is to be
    /// written: past half its validity or unreadable, since a broker that
    /// checks CRLs refuses the service's certificates once it has expired;
    /// or missing for a generation while another has one (a roll-over
    /// whose CRL was not written). A service without any CRL has none to
    /// renew.
    pub fn crl_due(&self, service_id: &str) -> bool {
        let Ok(found) = self.on_disk(Some(service_id)) else {
            return true;
        };
        let generations: Vec<u32> = found.pairs.iter().map(|(_, g)| *g).collect();
        self.crls_due_of(service_id, &generations)
    }

    /// Every service with a CRL to write ([`Pki::crl_due`]), from one look
    /// at `services/`.
    pub fn services_with_crls_due(&self) -> Result<Vec<String>, PkiError> {
        let found = self.on_disk(None)?;
        let mut by_service: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
        for (service, generation) in &found.pairs {
            by_service.entry(service).or_default().push(*generation);
        }
        Ok(by_service
            .into_iter()
            .filter(|(service, generations)| self.crls_due_of(service, generations))
            .map(|(service, _)| service.to_owned())
            .collect())
    }

    fn crls_due_of(&self, service_id: &str, generations: &[u32]) -> bool {
        let paths: Vec<PathBuf> = generations
            .iter()
            .map(|generation| self.crl_path_of(service_id, *generation))
            .collect();
        if !paths.iter().any(|p| p.exists()) {
            return false;
        }
        paths.iter().any(|p| !p.exists() || crl_due(p))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The root CA that issues now: the newest generation.
    pub fn root_cert(&self) -> X509 {
        self.read_roots().issuing.cert.clone()
    }

    /// `dir/root-ca.pem`, the first root's certificate, which every
    /// device is given with its factory key. See
    /// [`Pki::root_generations`] for its successors.
    pub fn root_pem_path(&self) -> PathBuf {
        self.dir.join("root-ca.pem")
    }

    /// Every root generation on disk, oldest first; the last one issues.
    pub fn root_generations(&self) -> Result<Vec<RootGeneration>, PkiError> {
        let roots = self.read_roots();
        roots
            .all
            .iter()
            .map(|(generation, cert, key)| {
                let cross = roots::root_file(&self.dir, *generation, RootPart::Cross);
                Ok(RootGeneration {
                    generation: *generation,
                    cert: cert.clone(),
                    serial_hex: serial_hex(cert)?,
                    not_before: unix_of(cert.not_before())?,
                    not_after: unix_of(cert.not_after())?,
                    made_at: unix_of(cert.not_before())? + certs::BACKDATE_SECS,
                    cert_path: roots::root_file(&self.dir, *generation, RootPart::Cert),
                    cross_path: (*generation >= 2 && cross.exists()).then_some(cross),
                    has_key: key.is_some(),
                })
            })
            .collect()
    }

    /// The roots a device is to pin at `now`, newest first, and the
    /// cross-certificates that link each to the one before, both ways
    /// (§3.5.5 and §8 of topics.md): every generation that has not
    /// expired, at most [`MAX_PINNED_ROOTS`]. Empty while the first root
    /// is the only one: there is nothing to learn.
    pub fn roots_to_pin(&self, now: u64) -> (Vec<X509>, Vec<X509>) {
        let roots = self.read_roots();
        if roots.issuing.generation == 1 {
            return (Vec::new(), Vec::new());
        }
        let pinned: Vec<(u32, X509)> = roots
            .all
            .iter()
            .rev()
            .filter(|(_, cert, _)| unix_of(cert.not_after()).is_ok_and(|end| end >= now))
            .take(MAX_PINNED_ROOTS)
            .map(|(g, cert, _)| (*g, cert.clone()))
            .collect();
        // Each successor's link both ways, where both ends are pinned.
        let generations: Vec<u32> = pinned.iter().map(|(g, _)| *g).collect();
        let crosses = generations
            .iter()
            .filter(|g| generations.contains(&(*g - 1)))
            .flat_map(|g| [RootPart::Cross, RootPart::Back].map(|part| (*g, part)))
            .filter_map(|(g, part)| self.cross_of(&roots, g, part))
            .collect();
        (pinned.into_iter().map(|(_, cert)| cert).collect(), crosses)
    }

    /// Generation `generation`'s cross-certificate (`part` Cross, its name
    /// and key signed by the generation before) or back-certificate (Back,
    /// the one before's name and key signed by it), if it is on disk and
    /// is what it should be.
    fn cross_of(&self, roots: &Roots, generation: u32, part: RootPart) -> Option<X509> {
        let path = roots::root_file(&self.dir, generation, part);
        let root = |g: u32| {
            roots
                .all
                .iter()
                .find(|(n, _, _)| *n == g)
                .map(|(_, c, _)| c)
        };
        let (root, before) = match part {
            RootPart::Back => (root(generation - 1)?, root(generation)?),
            _ => (root(generation)?, root(generation - 1)?),
        };
        let cross = files::load_cert(&path).ok()?;
        let name = |c: &X509| c.subject_name().to_der().ok();
        let sound = name(&cross).is_some()
            && name(&cross) == name(root)
            && cross
                .public_key()
                .ok()
                .zip(root.public_key().ok())
                .is_some_and(|(a, b)| a.public_eq(&b))
            && before
                .public_key()
                .and_then(|key| cross.verify(&key))
                .unwrap_or(false);
        if !sound {
            tracing::warn!(path = %path.display(), "not the cross-certificate of its root; left out");
        }
        sound.then_some(cross)
    }

    /// The cross-certificates a server certificate of the issuing root
    /// carries after it at `now` ([`Pki::crosses_back_from`]).
    fn server_chain_of(&self, roots: &Roots, now: u64) -> Vec<X509> {
        self.crosses_back_from(roots, roots.issuing.generation, now)
    }

    /// The cross-certificates a certificate of root `generation` carries
    /// after it at `now`: that root's by the one before, that one's by the
    /// one before it, and so on while each lasts, so that a client that
    /// pins any root that has not expired verifies it.
    fn crosses_back_from(&self, roots: &Roots, generation: u32, now: u64) -> Vec<X509> {
        let mut chain = Vec::new();
        for generation in (2..=generation).rev() {
            match self.cross_of(roots, generation, RootPart::Cross) {
                Some(cross) if unix_of(cross.not_after()).is_ok_and(|end| end > now) => {
                    chain.push(cross)
                }
                _ => break,
            }
        }
        chain
    }

    /// The generation of the root that issues now.
    pub fn issuing_root_generation(&self) -> u32 {
        self.read_roots().issuing.generation
    }

    /// The generations of the roots loaded now whose certificate's DER
    /// hashes (SHA-256) to one of `digests`, in ascending order: which of
    /// this PKI's roots a device that reports those digests pins. A digest
    /// of no root here names nothing.
    pub fn root_generations_of(&self, digests: &[[u8; 32]]) -> Vec<u32> {
        let roots = self.read_roots();
        let mut found: Vec<u32> = roots
            .all
            .iter()
            .filter(|(_, cert, _)| {
                cert.to_der()
                    .is_ok_and(|der| digests.contains(&openssl::sha::sha256(&der)))
            })
            .map(|(generation, _, _)| *generation)
            .collect();
        found.sort_unstable();
        found
    }

    /// Whether the issuing root is due for a successor at `now`: less
    /// than two years left.
    pub fn root_roll_due(&self, now: u64) -> Result<bool, PkiError> {
        let end = unix_of(self.read_roots().issuing.cert.not_after())?;
        Ok(end < now + roots::ROOT_ROLL_BEFORE_SECS)
    }

    /// Makes a successor of the issuing root: generation n + 1, CN
    /// "fleetshift root CA {n+1}", a new key, ten years, self-signed
    /// (`root-ca.{n+1}.pem`); the same name and key certified by the root
    /// before it until that one's end (`root-ca.{n+1}.cross.pem`; none if
    /// that one has ended); and its CRL. It issues from then on: service
    /// CAs made after it (first CAs and roll-overs) and the server
    /// certificates, which carry the cross-certificates after them
    /// ([`Pki::ensure_broker_cert`]), so a device that pins only a root
    /// before still verifies them. The roots before it stay trusted, with
    /// their keys (they sign their CRLs), until they expire. Files are
    /// written key first, certificate last; on an error nothing loaded
    /// changes. A key or cross-certificate left by a roll that stopped
    /// midway is removed once a minute old (younger, it may be another
    /// process's roll under way: an error); a newer root on disk than the
    /// one loaded (another process rolled) is an error too.
    pub fn roll_root(&self) -> Result<RootGeneration, PkiError> {
        let rolled = {
            let mut roots = self.roots.write().unwrap_or_else(|e| e.into_inner());
            self.roll_root_locked(&mut roots)?
        };
        self.after_roll();
        Ok(rolled)
    }

    /// `roots.pem` after a roll that went through: a failure to write it
    /// is logged, and [`Pki::write_roots_bundle`] is tried again by
    /// housekeeping.
    fn after_roll(&self) {
        if let Err(err) = self.write_roots_bundle() {
            tracing::warn!(error = %err, "roots.pem not written; written again later");
        }
    }

    /// [`Pki::roll_root`] if [`Pki::root_roll_due`] at `now`, checked
    /// under the same lock, so that two callers make one successor.
    pub fn roll_root_if_due(&self, now: u64) -> Result<Option<RootGeneration>, PkiError> {
        let rolled = {
            let mut roots = self.roots.write().unwrap_or_else(|e| e.into_inner());
            let end = unix_of(roots.issuing.cert.not_after())?;
            if end >= now + roots::ROOT_ROLL_BEFORE_SECS {
                return Ok(None);
            }
            self.roll_root_locked(&mut roots)?
        };
        self.after_roll();
        Ok(Some(rolled))
    }

    fn roll_root_locked(&self, roots: &mut Roots) -> Result<RootGeneration, PkiError> {
        let before = roots.issuing.clone();
        let loaded = roots.all.last().map_or(before.generation, |(g, _, _)| *g);
        let on_disk = roots::generations_with(&self.dir, RootPart::Cert)
            .map_err(|e| files::file_error(&self.dir, e))?;
        if on_disk.last().is_some_and(|top| *top > loaded) {
            return Err(PkiError::Inconsistent(format!(
                "a root CA newer than generation {loaded} is on disk: another process rolled the root over; restart to load it"
            )));
        }
        let now = unix_now();
        let lasting = roots
            .all
            .iter()
            .filter(|(_, cert, _)| unix_of(cert.not_after()).is_ok_and(|end| end >= now))
            .count();
        if lasting >= MAX_PINNED_ROOTS {
            return Err(PkiError::Inconsistent(format!(
                "{lasting} root CAs have not expired: devices pin at most {MAX_PINNED_ROOTS}, so no more until one expires"
            )));
        }
        let generation = loaded + 1;
        let path = |part| roots::root_file(&self.dir, generation, part);
        for part in [RootPart::Key, RootPart::Cross, RootPart::Back] {
            let leftover = path(part);
            if !leftover.exists() {
                continue;
            }
            if !files::older_than(&leftover, LEFTOVER_AGE_SECS) {
                return Err(PkiError::Inconsistent(format!(
                    "{} is new: a root roll-over may be under way",
                    leftover.display()
                )));
            }
            std::fs::remove_file(&leftover).map_err(|e| files::file_error(&leftover, e))?;
            tracing::warn!(path = %leftover.display(), "removed what a root roll-over that did not finish left");
        }
        let (cert, key) = new_root(&format!("{ROOT_CN} {generation}"), now)?;
        // Nothing to link to once the root before has ended.
        let before_end = unix_of(before.cert.not_after())?;
        let links = match before_end > now {
            true => {
                let validity = (unix_of(cert.not_before())?, before_end);
                // The new root by the one before, and the one before by it.
                let link = |of: &Root, by: &Issuer<'_>| {
                    certs::ca(
                        of.cert.subject_name(),
                        &of.key,
                        validity,
                        None,
                        Some(by),
                        None,
                    )
                };
                let new = Root {
                    cert: cert.clone(),
                    key: key.clone(),
                    generation,
                };
                let cross = link(
                    &new,
                    &Issuer {
                        cert: &before.cert,
                        key: &before.key,
                    },
                )?;
                let back = link(
                    &before,
                    &Issuer {
                        cert: &cert,
                        key: &key,
                    },
                )?;
                Some((cross, back))
            }
            false => None,
        };
        let crl_path = roots::root_crl_file(&self.dir, generation);
        let written = (|| {
            write_private_key(&path(RootPart::Key), &key)?;
            if let Some((cross, back)) = &links {
                files::write_atomic(&path(RootPart::Cross), &cross.to_pem()?, PUBLIC_MODE)?;
                files::write_atomic(&path(RootPart::Back), &back.to_pem()?, PUBLIC_MODE)?;
            }
            write_crl_file(&crl_path, &cert, &key, &[], now)?;
            files::write_atomic(&path(RootPart::Cert), &cert.to_pem()?, PUBLIC_MODE)?;
            files::sync_dir(&self.dir)
        })();
        if let Err(err) = written {
            // Certificate first: if it cannot be removed, its key stays
            // with it, so the directory still loads.
            match std::fs::remove_file(path(RootPart::Cert)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => return Err(err),
            }
            for undo in [
                crl_path,
                path(RootPart::Back),
                path(RootPart::Cross),
                path(RootPart::Key),
            ] {
                let _ = std::fs::remove_file(undo);
            }
            return Err(err);
        }
        tracing::info!(generation, path = %path(RootPart::Cert).display(), "rolled the root CA over");
        roots
            .all
            .push((generation, cert.clone(), Some(key.clone())));
        roots.issuing = Root {
            cert: cert.clone(),
            key,
            generation,
        };
        Ok(RootGeneration {
            generation,
            serial_hex: serial_hex(&cert)?,
            not_before: unix_of(cert.not_before())?,
            not_after: unix_of(cert.not_after())?,
            made_at: now,
            cert,
            cert_path: path(RootPart::Cert),
            cross_path: links.is_some().then(|| path(RootPart::Cross)),
            has_key: true,
        })
    }

    /// Writes `roots.pem` ([`ROOTS_FILE`]): every root generation that has
    /// not expired, newest first, what a device or a client made now is
    /// to pin; if it differs from what is there (one writer at a time).
    pub fn write_roots_bundle(&self) -> Result<(), PkiError> {
        let _writing = self.bundle_writer.lock().unwrap_or_else(|e| e.into_inner());
        let now = unix_now();
        let mut pem = Vec::new();
        for (_, cert, _) in self.read_roots().all.iter().rev() {
            if unix_of(cert.not_after())? >= now {
                pem.extend(cert.to_pem()?);
            }
        }
        let path = self.dir.join(ROOTS_FILE);
        if std::fs::read(&path).ok().as_deref() != Some(pem.as_slice()) {
            files::write_atomic(&path, &pem, PUBLIC_MODE)?;
        }
        Ok(())
    }

    fn read_roots(&self) -> std::sync::RwLockReadGuard<'_, Roots> {
        // Replaced only whole under the write lock.
        self.roots.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn broker_cert_path(&self) -> PathBuf {
        self.dir.join(BROKER_FILES.0)
    }

    pub fn broker_key_path(&self) -> PathBuf {
        self.dir.join(BROKER_FILES.1)
    }

    /// The signing key's public half, SubjectPublicKeyInfo PEM; devices pin it.
    pub fn signing_pub_path(&self) -> PathBuf {
        self.dir.join("manager-sign.pub.pem")
    }

    /// `dir/services/{svc}-ca.pem`, the certificate of the service's first
    /// CA generation. The id is not checked here.
    pub fn service_ca_path(&self, service_id: &str) -> PathBuf {
        self.service_ca_path_of(service_id, 1)
    }

    /// The certificate of generation `generation` of the service's CA:
    /// `services/{svc}-ca.pem` for the first, `services/{svc}-ca.{n}.pem`
    /// for generation n ≥ 2.
    pub fn service_ca_path_of(&self, service_id: &str, generation: u32) -> PathBuf {
        generations::ca_file(&self.dir, service_id, generation, "pem")
    }

    fn service_ca_key_path(&self, service_id: &str, generation: u32) -> PathBuf {
        generations::ca_file(&self.dir, service_id, generation, "key")
    }

    /// `dir/crl/{svc}.crl.pem`, the CRL of the service's first CA
    /// generation. The id is not checked here.
    pub fn crl_path(&self, service_id: &str) -> PathBuf {
        self.crl_path_of(service_id, 1)
    }

    /// The CRL of generation `generation` of the service's CA:
    /// `crl/{svc}.crl.pem` for the first, `crl/{svc}.{n}.crl.pem` for
    /// generation n ≥ 2.
    pub fn crl_path_of(&self, service_id: &str, generation: u32) -> PathBuf {
        generations::crl_file(&self.dir, service_id, generation)
    }

    /// The issuing CA of `service_id`, loaded from `services/` or created
    /// there on first use (CN "fleetshift service CA {svc}", O = svc,
    /// pathlen 0, 5 years). Returns clones (reference-counted in OpenSSL).
    pub fn service_ca(&self, service_id: &str) -> Result<(X509, PKey<Private>), PkiError> {
        let ca = self.service_ca_entry(service_id)?;
        Ok((ca.cert, ca.key))
    }

    /// The generation of `service_id`'s CA that issues now, created on
    /// first use as [`Pki::service_ca`] does.
    pub fn issuing_generation(&self, service_id: &str) -> Result<CaGeneration, PkiError> {
        let ca = self.service_ca_entry(service_id)?;
        self.generation_info(service_id, ca.generation, ca.cert)
    }

    fn generation_info(
        &self,
        service_id: &str,
        generation: u32,
        cert: X509,
    ) -> Result<CaGeneration, PkiError> {
        Ok(CaGeneration {
            service_id: service_id.to_owned(),
            generation,
            serial_hex: serial_hex(&cert)?,
            not_before: unix_of(cert.not_before())?,
            not_after: unix_of(cert.not_after())?,
            cert,
            cert_path: self.service_ca_path_of(service_id, generation),
            crl_path: self.crl_path_of(service_id, generation),
        })
    }

    /// Every generation of `service_id`'s CA in `services/`, oldest first;
    /// the last one issues. Empty for a service without a CA.
    pub fn service_ca_generations(&self, service_id: &str) -> Result<Vec<CaGeneration>, PkiError> {
        check_service_id(service_id)?;
        let found = self.on_disk(Some(service_id))?;
        found
            .pairs
            .into_iter()
            .map(|(service, generation)| {
                let cert = files::load_cert(&self.service_ca_path_of(&service, generation))?;
                self.generation_info(&service, generation, cert)
            })
            .collect()
    }

    /// Every service with a CA in `services/`, sorted.
    pub fn services_with_ca(&self) -> Result<Vec<String>, PkiError> {
        let found = self.on_disk(None)?;
        let mut services: Vec<String> = found.pairs.into_iter().map(|(s, _)| s).collect();
        services.dedup();
        Ok(services)
    }

    /// Makes a successor of `service_id`'s issuing CA: generation n + 1,
    /// CN "fleetshift service CA {svc} {n+1}", O = svc, a new key, five
    /// years but no later than the root, and its CRL (empty, number
    /// `crl_number`), written before it issues anything: brokers that check
    /// CRLs want one for every CA. It issues from then on; the CAs before
    /// it stay trusted (and keep their CRLs) until they expire, so every
    /// certificate they issued stays good until it is renewed. On an error
    /// nothing has changed.
    pub fn roll_service_ca(
        &self,
        service_id: &str,
        crl_number: u64,
    ) -> Result<CaGeneration, PkiError> {
        check_service_id(service_id)?;
        let mut cache = self.lock_cache();
        let current = match cache.get(service_id) {
            Some(ca) => ca.clone(),
            None => self
                .load_service_ca(service_id)?
                .ok_or_else(|| PkiError::NoServiceCa(service_id.to_owned()))?,
        };
        let next = self.create_service_ca(service_id, current.generation + 1)?;
        if let Err(err) = self.sign_crl(service_id, &next, &[], crl_number) {
            // Not issuing without its CRL: undone, certificate first.
            let _ = std::fs::remove_file(self.service_ca_path_of(service_id, next.generation));
            let _ = std::fs::remove_file(self.service_ca_key_path(service_id, next.generation));
            return Err(err);
        }
        let info = self.generation_info(service_id, next.generation, next.cert.clone())?;
        cache.insert(service_id.to_owned(), next);
        Ok(info)
    }

    /// Whether `service_id`'s issuing CA is due for a successor at `now`:
    /// less than a year left, and a successor would end at least 30 days
    /// later (it cannot outlive the root).
    pub fn roll_due(&self, service_id: &str, now: u64) -> Result<bool, PkiError> {
        let current = self.issuing_generation(service_id)?;
        let successor_end = self.service_ca_end(now)?;
        Ok(current.not_after < now + generations::ROLL_BEFORE_SECS
            && successor_end >= current.not_after + generations::ROLL_GAIN_SECS)
    }

    /// Retires every generation of a service CA that has expired by `now`,
    /// other than the one that issues: every certificate it issued has
    /// expired with it. See [`Pki::retire_service_cas`]; its CRL goes to
    /// `crl/retired/` with it, as does, once past half its validity, the
    /// CRL of a generation retired before its end. Returns the generations
    /// retired.
    pub fn retire_expired_service_cas(&self, now: u64) -> Result<Vec<CaGeneration>, PkiError> {
        // Expired: with its CRL. Without its key but not expired: a
        // retirement before the end that stopped midway (the key goes
        // first), finished here, its CRL kept.
        let retired =
            self.retire_where(None, |ca, has_key| match (ca.not_after < now, has_key) {
                (true, _) => Some(true),
                (false, false) => Some(false),
                (false, true) => None,
            })?;
        // CRLs left behind by a retirement before the end, once stale.
        let kept = self.on_disk(None)?;
        let trusted: std::collections::HashSet<(String, u32)> =
            kept.pairs.into_iter().chain(kept.certs_alone).collect();
        let crl_dir = self.dir.join("crl");
        let entries = std::fs::read_dir(&crl_dir).map_err(|e| files::file_error(&crl_dir, e))?;
        for entry in entries.flatten() {
            let Some(id) = entry
                .file_name()
                .to_str()
                .and_then(generations::parse_crl_file)
            else {
                continue;
            };
            if !trusted.contains(&id) && crl_due(&entry.path()) {
                self.move_to_retired(&entry.path(), "crl")?;
            }
        }
        Ok(retired)
    }

    /// Retires every generation of `service_id`'s CA older than
    /// `generation` now, expired or not: what to do once a CA key is known
    /// to be stolen, after its certificates are revoked. Its key is
    /// deleted first, then its certificate is moved to `services/retired/`,
    /// so brokers that load `services/` trust it no more. Its CRL stays in
    /// `crl/` (see [`Pki::retire_expired_service_cas`]), so a broker that cuts live
    /// sessions by the serials it lists still does (moved once past half
    /// its validity). The issuing generation is never retired. Returns the generations retired.
    pub fn retire_service_cas(
        &self,
        service_id: &str,
        generation: u32,
    ) -> Result<Vec<CaGeneration>, PkiError> {
        check_service_id(service_id)?;
        self.retire_where(Some(service_id), |ca, _| {
            (ca.generation < generation).then_some(false)
        })
    }

    /// Retires the generations below each service's issuing one that
    /// `retire` picks (given the generation and whether its key is there;
    /// it answers whether the CRL goes too): key deleted first, then
    /// certificate (and CRL) moved, directories synced. An interruption
    /// leaves a certificate without its key, which is no longer loaded for
    /// signing, and which housekeeping retires
    /// ([`Pki::retire_expired_service_cas`]).
    fn retire_where(
        &self,
        only: Option<&str>,
        retire: impl Fn(&CaGeneration, bool) -> Option<bool>,
    ) -> Result<Vec<CaGeneration>, PkiError> {
        let found = self.on_disk(only)?;
        let mut top: HashMap<&str, u32> = HashMap::new();
        for (service, generation) in &found.pairs {
            top.insert(service, *generation);
        }
        let mut retired = Vec::new();
        let older = found
            .pairs
            .iter()
            .map(|id| (id, true))
            .chain(found.certs_alone.iter().map(|id| (id, false)))
            .filter(|((service, generation), _)| {
                top.get(service.as_str()).is_some_and(|t| generation < t)
            });
        for ((service, generation), has_key) in older {
            let cert = files::load_cert(&self.service_ca_path_of(service, *generation))?;
            let ca = self.generation_info(service, *generation, cert)?;
            let Some(with_crl) = retire(&ca, has_key) else {
                continue;
            };
            let key = self.service_ca_key_path(service, *generation);
            match std::fs::remove_file(&key) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(files::file_error(&key, e)),
            }
            let mut moves = vec![(&ca.cert_path, "services")];
            if with_crl {
                moves.push((&ca.crl_path, "crl"));
            }
            for (path, sub) in moves {
                self.move_to_retired(path, sub)?;
            }
            for sub in ["services", "crl"] {
                files::sync_dir(&self.dir.join(sub))?;
            }
            tracing::info!(
                service = %service,
                generation,
                with_crl,
                "retired a service CA"
            );
            retired.push(ca);
        }
        Ok(retired)
    }

    fn service_ca_entry(&self, service_id: &str) -> Result<ServiceCa, PkiError> {
        check_service_id(service_id)?;
        // Held across load-or-create so two callers cannot mint two CAs.
        let mut cache = self.lock_cache();
        if let Some(ca) = cache.get(service_id) {
            return Ok(ca.clone());
        }
        let ca = match self.load_service_ca(service_id)? {
            Some(ca) => ca,
            None => self.create_service_ca(service_id, 1)?,
        };
        cache.insert(service_id.to_owned(), ca.clone());
        Ok(ca)
    }

    /// Generation `generation` of `service_id`'s CA with its key: the
    /// issuing one (created on first use), or an older one from disk.
    fn service_ca_of(&self, service_id: &str, generation: u32) -> Result<ServiceCa, PkiError> {
        let issuing = self.service_ca_entry(service_id)?;
        if issuing.generation == generation {
            return Ok(issuing);
        }
        let cert_path = self.service_ca_path_of(service_id, generation);
        if !cert_path.exists() {
            return Err(PkiError::NoGeneration {
                service: service_id.to_owned(),
                generation,
            });
        }
        self.load_pair(service_id, generation)
    }

    /// What `services/` holds, of `only` or of every service.
    fn on_disk(&self, only: Option<&str>) -> Result<generations::OnDisk, PkiError> {
        generations::on_disk(&self.dir, only)
            .map_err(|e| files::file_error(&self.dir.join("services"), e))
    }

    /// Moves `path` into `retired/` under `sub` (`services` or `crl`); one
    /// already gone is no error.
    fn move_to_retired(&self, path: &Path, sub: &str) -> Result<(), PkiError> {
        let into = self.dir.join(sub).join(RETIRED_DIR);
        files::create_dir(&into)?;
        let Some(name) = path.file_name() else {
            return Ok(());
        };
        match std::fs::rename(path, into.join(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(files::file_error(path, e)),
        }
    }

    fn lock_cache(&self) -> MutexGuard<'_, HashMap<String, ServiceCa>> {
        // The map is only ever inserted into whole entries, so a panic while
        // it was held cannot have left it half-updated.
        self.service_cas.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The highest generation of `service_id`'s CA on disk with both its
    /// certificate and its key, checked; `None` if it has none.
    ///
    /// What an interruption leaves is told apart. A key without its
    /// certificate above that generation is a roll-over stopped midway
    /// (the key is written first): it never signed anything, and is
    /// removed once a minute old (younger, it may be another process's
    /// roll under way). A certificate without its key below it is a
    /// retirement stopped midway (the key is deleted first): it stays
    /// trusted until it is moved. A certificate without its key above it
    /// may have issued certificates that could then never be revoked: an
    /// error, as is a first generation that is half there.
    fn load_service_ca(&self, service_id: &str) -> Result<Option<ServiceCa>, PkiError> {
        let found = self.on_disk(Some(service_id))?;
        let top = found.pairs.last().map(|(_, g)| *g);
        let half = |generation: u32| {
            half_pair(
                &self.service_ca_path_of(service_id, generation),
                &self.service_ca_key_path(service_id, generation),
            )
        };
        if let Some((_, generation)) = found.certs_alone.iter().find(|(_, g)| Some(*g) > top) {
            return Err(half(*generation));
        }
        for (_, generation) in &found.keys_alone {
            match top {
                None if *generation == 1 => return Err(half(1)),
                Some(top) if *generation < top => {}
                _ => {
                    let key = self.service_ca_key_path(service_id, *generation);
                    if files::older_than(&key, LEFTOVER_AGE_SECS) {
                        tracing::warn!(path = %key.display(), "removed the key of a service CA roll-over that did not finish");
                        std::fs::remove_file(&key).map_err(|e| files::file_error(&key, e))?;
                    }
                }
            }
        }
        top.map(|generation| self.load_pair(service_id, generation))
            .transpose()
    }

    fn load_pair(&self, service_id: &str, generation: u32) -> Result<ServiceCa, PkiError> {
        let cert_path = self.service_ca_path_of(service_id, generation);
        let key_path = self.service_ca_key_path(service_id, generation);
        let cert = files::load_cert(&cert_path)?;
        let key = files::load_private_key(&key_path)?;
        check_pair(&cert, &key, &cert_path)?;
        if !self.signed_by_a_root(&cert)? {
            return Err(PkiError::Inconsistent(format!(
                "{} is not signed by a root CA",
                cert_path.display()
            )));
        }
        Ok(ServiceCa {
            cert,
            key,
            generation,
        })
    }

    /// Whether `cert` is signed by one of the root generations.
    fn signed_by_a_root(&self, cert: &X509) -> Result<bool, PkiError> {
        for (_, root, _) in &self.read_roots().all {
            if root.subject_name().to_der()? == cert.issuer_name().to_der()?
                && cert.verify(root.public_key()?.as_ref())?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The end of a service CA made at `now`: five years, but no later
    /// than the issuing root, which a CA cannot usefully outlive.
    fn service_ca_end(&self, now: u64) -> Result<u64, PkiError> {
        let root_end = unix_of(self.read_roots().issuing.cert.not_after())?;
        Ok((now + SERVICE_CA_LIFETIME_DAYS * DAY).min(root_end))
    }

    fn create_service_ca(&self, service_id: &str, generation: u32) -> Result<ServiceCa, PkiError> {
        let cert_path = self.service_ca_path_of(service_id, generation);
        let key_path = self.service_ca_key_path(service_id, generation);
        if cert_path.exists() || key_path.exists() {
            return Err(PkiError::Inconsistent(format!(
                "{} or its key is already there",
                cert_path.display()
            )));
        }
        let key = certs::new_p256_key()?;
        let now = unix_now();
        let cn = match generation {
            1 => format!("fleetshift service CA {service_id}"),
            n => format!("fleetshift service CA {service_id} {n}"),
        };
        let subject = certs::name(Some(service_id), &cn)?;
        let root = self.read_roots().issuing.clone();
        let cert = certs::ca(
            &subject,
            &key,
            (
                now.saturating_sub(certs::BACKDATE_SECS),
                self.service_ca_end(now)?,
            ),
            Some(0),
            Some(&Issuer {
                cert: &root.cert,
                key: &root.key,
            }),
            None,
        )?;
        // Key first: a crash in between leaves a key without a
        // certificate, which is reported (or, for a successor, removed),
        // never a certificate whose key is lost. A certificate that could
        // not be written takes its key with it, so the next try can start.
        write_private_key(&key_path, &key)?;
        if let Err(err) = cert
            .to_pem()
            .map_err(PkiError::from)
            .and_then(|pem| files::write_atomic(&cert_path, &pem, PUBLIC_MODE))
        {
            let _ = std::fs::remove_file(&key_path);
            return Err(err);
        }
        tracing::info!(service_id, generation, path = %cert_path.display(), "created service CA");
        Ok(ServiceCa {
            cert,
            key,
            generation,
        })
    }

    /// Checks a DER PKCS#10 CSR: size, parse, self-signature, EC P-256 key.
    /// Returns the public key; any failure is [`PkiError::BadCsr`].
    pub fn public_key_from_csr(csr_der: &[u8]) -> Result<PKey<Public>, PkiError> {
        let bad = |reason: &str| PkiError::BadCsr(reason.to_owned());
        if csr_der.len() > MAX_CSR_LEN {
            return Err(bad("too large"));
        }
        let req = X509Req::from_der(csr_der).map_err(|_| bad("not a DER PKCS#10 request"))?;
        // d2i stops at the end of the first object; trailing bytes are not ours to ignore.
        if req.to_der().map_err(|_| bad("cannot re-encode"))?.len() != csr_der.len() {
            return Err(bad("trailing bytes after the request"));
        }
        let key = req.public_key().map_err(|_| bad("unreadable public key"))?;
        if !certs::is_p256(&key) {
            return Err(bad("public key is not EC P-256"));
        }
        match req.verify(&key) {
            Ok(true) => Ok(key),
            _ => Err(bad("self-signature does not verify")),
        }
    }

    /// Issues a device certificate with the service's CA: CN = device id,
    /// O = service id, random 128-bit serial, valid from 5 minutes ago for
    /// `lifetime_days`, CA:FALSE, digitalSignature, clientAuth, SAN URIs
    /// `urn:fleetshift:device:{id}` and `urn:fleetshift:service:{svc}`.
    pub fn issue_device_certificate(
        &self,
        device_id: &str,
        service_id: &str,
        public_key: &PKeyRef<Public>,
        lifetime_days: u32,
    ) -> Result<IssuedCert, PkiError> {
        fleet_protocol::topic::validate_device_id(device_id)
            .map_err(|_| PkiError::BadDeviceId(device_id.to_owned()))?;
        let uris = [
            format!("urn:fleetshift:device:{device_id}"),
            format!("urn:fleetshift:service:{service_id}"),
        ];
        self.issue_client(device_id, service_id, &uris, public_key, lifetime_days)
    }

    /// Issues a service provider's certificate with the service's CA: CN =
    /// `provider.{name}` (see [`grants::provider_principal`]; the dot keeps
    /// it apart from every device id), O = service id, SAN URIs
    /// `urn:fleetshift:provider:{name}` and `urn:fleetshift:service:{svc}`;
    /// otherwise as a device certificate.
    pub fn issue_provider_certificate(
        &self,
        name: &str,
        service_id: &str,
        public_key: &PKeyRef<Public>,
        lifetime_days: u32,
    ) -> Result<IssuedCert, PkiError> {
        fleet_protocol::topic::validate_device_id(name)
            .map_err(|_| PkiError::BadDeviceId(name.to_owned()))?;
        let uris = [
            format!("urn:fleetshift:provider:{name}"),
            format!("urn:fleetshift:service:{service_id}"),
        ];
        let cn = grants::provider_principal(name);
        self.issue_client(&cn, service_id, &uris, public_key, lifetime_days)
    }

    fn issue_client(
        &self,
        cn: &str,
        service_id: &str,
        uris: &[String],
        public_key: &PKeyRef<Public>,
        lifetime_days: u32,
    ) -> Result<IssuedCert, PkiError> {
        if !(1..=MAX_DEVICE_LIFETIME_DAYS).contains(&lifetime_days) {
            return Err(PkiError::BadLifetime(lifetime_days));
        }
        if !certs::is_p256(public_key) {
            return Err(PkiError::BadKey("device key is not EC P-256".into()));
        }
        let ca = self.service_ca_entry(service_id)?;

        let now = unix_now();
        let not_before = now.saturating_sub(certs::BACKDATE_SECS);
        // Never past its CA: a client that presents its certificate alone
        // shows no CA, so its certificate must end no later.
        let not_after = (now + u64::from(lifetime_days) * DAY).min(unix_of(ca.cert.not_after())?);
        let serial = certs::random_serial()?;
        let subject = certs::name(Some(service_id), cn)?;
        let leaf = certs::build(
            &Template {
                subject: &subject,
                public_key,
                serial: &serial,
                not_before,
                not_after,
                profile: Profile::Client { uris },
            },
            Some(&Issuer {
                cert: &ca.cert,
                key: &ca.key,
            }),
            None,
        )?;
        let serial_hex = serial.to_hex_str()?.to_ascii_lowercase();
        let fingerprint_sha256 = hex::encode(leaf.digest(MessageDigest::sha256())?);
        tracing::debug!(cn, service_id, serial = %serial_hex, "issued client certificate");
        Ok(IssuedCert {
            chain: vec![leaf.clone(), ca.cert],
            leaf,
            serial_hex,
            fingerprint_sha256,
            not_before,
            not_after,
            ca_generation: ca.generation,
        })
    }

    /// Writes the CRL of generation `generation` of the service's CA
    /// ([`Pki::crl_path_of`]), signed by that CA, listing `revoked`
    /// (duplicates dropped), with `crl_number`, thisUpdate now and
    /// nextUpdate in 7 days. Atomic; returns the path. Callers keep
    /// `crl_number` increasing.
    pub fn write_crl(
        &self,
        service_id: &str,
        generation: u32,
        revoked: &[RevokedEntry],
        crl_number: u64,
    ) -> Result<PathBuf, PkiError> {
        check_service_id(service_id)?;
        let ca = self.service_ca_of(service_id, generation)?;
        self.sign_crl(service_id, &ca, revoked, crl_number)
    }

    fn sign_crl(
        &self,
        service_id: &str,
        ca: &ServiceCa,
        revoked: &[RevokedEntry],
        crl_number: u64,
    ) -> Result<PathBuf, PkiError> {
        let path = self.crl_path_of(service_id, ca.generation);
        write_crl_file(&path, &ca.cert, &ca.key, revoked, crl_number)?;
        tracing::info!(
            service_id,
            generation = ca.generation,
            crl_number,
            revoked = revoked.len(),
            "wrote CRL"
        );
        Ok(path)
    }

    /// Makes sure `broker.pem`/`broker.key` exist, match, come from this
    /// root, name exactly `names` (`None`: the names the certificate has,
    /// or only the local ones for a new one) and are not past half their
    /// validity; issues the certificate again if not, and says whether it
    /// did. It keeps its key if that key is sound, so the pair on disk
    /// matches at every moment; a new key is written before the
    /// certificate. A running broker takes the new certificate up within
    /// a second (the front door watches both files).
    pub fn ensure_broker_cert(&self, names: Option<&ServerNames>) -> Result<bool, PkiError> {
        self.ensure_broker_cert_at(names, unix_now())
    }

    fn ensure_broker_cert_at(
        &self,
        names: Option<&ServerNames>,
        now: u64,
    ) -> Result<bool, PkiError> {
        self.ensure_server_cert(ServerCert::Broker, names, now)
    }

    /// `admin.pem`/`admin.key`: the operator API's certificate over TLS
    /// (`admin_tls`), a pair of its own, so that whoever holds the broker's
    /// key (an external broker's user) cannot pose as the API and collect
    /// its token. As [`Pki::ensure_broker_cert`] in all else.
    pub fn ensure_admin_cert(&self, names: Option<&ServerNames>) -> Result<bool, PkiError> {
        self.ensure_server_cert(ServerCert::Admin, names, unix_now())
    }

    fn ensure_server_cert(
        &self,
        which: ServerCert,
        names: Option<&ServerNames>,
        now: u64,
    ) -> Result<bool, PkiError> {
        let (cert_file, key_file) = which.files();
        let cert_path = self.dir.join(cert_file);
        let key_path = self.dir.join(key_file);
        let mut have = None;
        // The cross-certificates the file carries after the certificate,
        // and those it should carry now.
        let mut tail = Vec::new();
        if cert_path.exists() && key_path.exists() {
            let pem = files::read(&cert_path)?;
            let cert = X509::from_pem(&pem)?;
            let key = files::load_private_key(&key_path)?;
            // A tail that does not read is one to write again.
            match X509::stack_from_pem(&pem) {
                Ok(certs) => {
                    for extra in certs.iter().skip(1) {
                        tail.push(extra.to_der()?);
                    }
                }
                Err(_) => tail.push(Vec::new()),
            }
            have = Some((cert, key));
        }
        let (root, chain) = {
            let roots = self.read_roots();
            (roots.issuing.clone(), self.server_chain_of(&roots, now))
        };
        let mut chain_der = Vec::new();
        for cross in &chain {
            chain_der.push(cross.to_der()?);
        }
        // Why, and whether the files on disk were wrong (not merely due).
        let (key, names, (why, wrong)) = match have {
            Some((cert, key)) if cert.public_key()?.public_eq(&key) => {
                let carried = ServerNames::of(&cert);
                let wanted = names.cloned().unwrap_or_else(|| carried.clone());
                let (from, until) = (unix_of(cert.not_before())?, unix_of(cert.not_after())?);
                if !cert.verify(&root.key)? {
                    if self.signed_by_a_root(&cert)? {
                        (Some(key), Some(wanted), ("the root rolled over", false))
                    } else {
                        // Another PKI's: its key is not kept either.
                        (None, Some(wanted), ("not signed by this root", true))
                    }
                } else {
                    let why = if wanted != carried {
                        ("its names change", false)
                    } else if until <= now || (until - now) * 2 < until.saturating_sub(from) {
                        ("past half its validity", false)
                    } else if tail != chain_der {
                        ("the cross-certificates after it change", false)
                    } else {
                        return Ok(false);
                    };
                    (Some(key), Some(wanted), why)
                }
            }
            Some((cert, _)) => {
                let names = names.cloned().unwrap_or_else(|| ServerNames::of(&cert));
                (None, Some(names), ("does not match its key", true))
            }
            // A certificate whose key is gone keeps its names, if it reads.
            None => {
                let orphan = || {
                    files::load_cert(&cert_path)
                        .ok()
                        .map(|c| ServerNames::of(&c))
                };
                (None, names.cloned().or_else(orphan), ("missing", false))
            }
        };
        let names = match names {
            Some(names) => names,
            None => ServerNames::with_local::<&str>(&[])?,
        };
        let fresh = key.is_none();
        let key = match key {
            Some(key) => key,
            None => certs::new_p256_key()?,
        };
        let subject = certs::name(None, which.common_name())?;
        let dns: Vec<&str> = names.dns().collect();
        let ips: Vec<String> = names.ips().map(|ip| ip.to_string()).collect();
        let ips: Vec<&str> = ips.iter().map(String::as_str).collect();
        let cert = certs::build(
            &Template {
                subject: &subject,
                public_key: &key,
                serial: &certs::random_serial()?,
                not_before: now.saturating_sub(certs::BACKDATE_SECS),
                not_after: now + BROKER_LIFETIME_DAYS * DAY,
                profile: Profile::Server {
                    dns: &dns,
                    ips: &ips,
                },
            },
            Some(&Issuer {
                cert: &root.cert,
                key: &root.key,
            }),
            None,
        )?;
        // After a successor root, the certificate carries the chain of
        // cross-certificates back to the oldest root that lasts: a client
        // that pins only a root before verifies it through that.
        let mut pem = cert.to_pem()?;
        for cross in &chain {
            pem.extend(cross.to_pem()?);
        }
        if fresh {
            write_private_key(&key_path, &key)?;
        }
        files::write_atomic(&cert_path, &pem, PUBLIC_MODE)?;
        let path = cert_path.display();
        if wrong {
            tracing::warn!(%path, %names, new_key = fresh, "replaced the {} certificate: {why}", which.common_name());
        } else {
            tracing::info!(%path, %names, new_key = fresh, "issued the {} certificate: {why}", which.common_name());
        }
        Ok(true)
    }
}

/// The TLS server certificates the PKI keeps, each in a pair of files.
#[derive(Debug, Clone, Copy)]
enum ServerCert {
    Broker,
    Admin,
}

impl ServerCert {
    fn files(self) -> (&'static str, &'static str) {
        match self {
            ServerCert::Broker => BROKER_FILES,
            ServerCert::Admin => ADMIN_FILES,
        }
    }

    fn common_name(self) -> &'static str {
        match self {
            ServerCert::Broker => BROKER_CN,
            ServerCert::Admin => ADMIN_CN,
        }
    }
}

fn load_or_create_root(dir: &Path) -> Result<(X509, PKey<Private>), PkiError> {
    let cert_path = dir.join("root-ca.pem");
    let key_path = dir.join("root-ca.key");
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            let cert = files::load_cert(&cert_path)?;
            let key = files::load_private_key(&key_path)?;
            check_pair(&cert, &key, &cert_path)?;
            Ok((cert, key))
        }
        (false, false) => {
            let (cert, key) = new_root(ROOT_CN, unix_now())?;
            write_private_key(&key_path, &key)?;
            files::write_atomic(&cert_path, &cert.to_pem()?, PUBLIC_MODE)?;
            tracing::info!(path = %cert_path.display(), "created root CA");
            Ok((cert, key))
        }
        _ => Err(half_pair(&cert_path, &key_path)),
    }
}

/// A new root CA made at `now`: a new key, self-signed, ten years.
fn new_root(common_name: &str, now: u64) -> Result<(X509, PKey<Private>), PkiError> {
    let key = certs::new_p256_key()?;
    let validity = (
        now.saturating_sub(certs::BACKDATE_SECS),
        now + ROOT_LIFETIME_DAYS * DAY,
    );
    let subject = certs::name(None, common_name)?;
    let cert = certs::ca(&subject, &key, validity, None, None, Some(&key))?;
    Ok((cert, key))
}

/// Writes at `path` a CRL signed by `cert`'s `key`, listing `revoked`,
/// with `crl_number`, thisUpdate now and nextUpdate in 7 days.
fn write_crl_file(
    path: &Path,
    cert: &X509,
    key: &PKey<Private>,
    revoked: &[RevokedEntry],
    crl_number: u64,
) -> Result<(), PkiError> {
    let now = unix_now();
    let params = crl::CrlParams {
        crl_number,
        this_update: now as i64,
        next_update: (now + CRL_VALIDITY_DAYS * DAY) as i64,
    };
    let der = crl::build_crl_der(cert, key, revoked, &params)?;
    files::write_atomic(path, &crl::crl_der_to_pem(&der), PUBLIC_MODE)
}

/// The first root (created if the directory is new) and its successors.
/// A successor's certificate without its key is an error when it is the
/// newest (it may have issued what no key can now revoke); a key without
/// its certificate above the newest is a roll-over that stopped midway,
/// left for the next roll to remove.
fn load_or_create_roots(dir: &Path) -> Result<Roots, PkiError> {
    let generations =
        roots::generations_with(dir, RootPart::Cert).map_err(|e| files::file_error(dir, e))?;
    // A new first root beside its successors would be trusted by every
    // broker and pinned by no device.
    if generations.iter().any(|g| *g >= 2) && !dir.join("root-ca.pem").exists() {
        return Err(PkiError::Inconsistent(format!(
            "{} is missing but its successors are there",
            dir.join("root-ca.pem").display()
        )));
    }
    let (first, first_key) = load_or_create_root(dir)?;
    let mut all = vec![(1, first, Some(first_key))];
    for generation in generations.into_iter().filter(|g| *g >= 2) {
        let cert_path = roots::root_file(dir, generation, RootPart::Cert);
        let key_path = roots::root_file(dir, generation, RootPart::Key);
        let cert = files::load_cert(&cert_path)?;
        if !cert.verify(cert.public_key()?.as_ref())? {
            return Err(PkiError::Inconsistent(format!(
                "{} is not self-signed",
                cert_path.display()
            )));
        }
        let key = if key_path.exists() {
            let key = files::load_private_key(&key_path)?;
            check_pair(&cert, &key, &cert_path)?;
            Some(key)
        } else {
            None
        };
        all.push((generation, cert, key));
    }
    let issuing = match all.last() {
        Some((generation, cert, Some(key))) => Root {
            cert: cert.clone(),
            key: key.clone(),
            generation: *generation,
        },
        Some((generation, _, None)) => {
            let generation = *generation;
            return Err(half_pair(
                &roots::root_file(dir, generation, RootPart::Cert),
                &roots::root_file(dir, generation, RootPart::Key),
            ));
        }
        None => unreachable!("the first root is always loaded"),
    };
    Ok(Roots { all, issuing })
}

fn load_or_create_signing_key(dir: &Path) -> Result<PKey<Private>, PkiError> {
    let key_path = dir.join("manager-sign.key");
    let pub_path = dir.join("manager-sign.pub.pem");
    let key = if key_path.exists() {
        files::load_private_key(&key_path)?
    } else if pub_path.exists() {
        // Devices pin the public key; a new key would silently break them.
        return Err(half_pair(&pub_path, &key_path));
    } else {
        let key = certs::new_p256_key()?;
        write_private_key(&key_path, &key)?;
        tracing::info!(path = %key_path.display(), "created manager signing key");
        key
    };
    if !certs::is_p256(&key) {
        return Err(PkiError::Inconsistent(format!(
            "{} is not a P-256 key",
            key_path.display()
        )));
    }
    let pub_pem = key.public_key_to_pem()?;
    if !pub_path.exists() {
        files::write_atomic(&pub_path, &pub_pem, PUBLIC_MODE)?;
    } else {
        let on_disk = PKey::public_key_from_pem(&files::read(&pub_path)?)?;
        if !on_disk.public_eq(&key) {
            return Err(PkiError::Inconsistent(format!(
                "{} does not match {}",
                pub_path.display(),
                key_path.display()
            )));
        }
    }
    Ok(key)
}

/// Certificates for tests elsewhere in the workspace, made as the PKI
/// makes its own: a root that ends soon, a service CA near its end, or a
/// thief's self-signed root under a name the PKI uses.
#[doc(hidden)]
pub mod testing {
    use openssl::pkey::{PKeyRef, Private};
    use openssl::x509::{X509Name, X509NameRef, X509Ref, X509};

    use crate::certs::{self, Issuer, DAY};
    use crate::PkiError;

    /// A name with an optional O and a CN.
    pub fn name(organization: Option<&str>, common_name: &str) -> Result<X509Name, PkiError> {
        certs::name(organization, common_name)
    }

    /// A CA certificate for `subject` and `key`, signed by `issuer` (self-
    /// signed if none), valid from now for `days`.
    pub fn ca_certificate(
        subject: &X509NameRef,
        key: &PKeyRef<Private>,
        issuer: Option<(&X509Ref, &PKeyRef<Private>)>,
        days: u64,
        path_len: Option<u32>,
    ) -> Result<X509, PkiError> {
        let now = super::unix_now();
        certs::ca(
            subject,
            key,
            (now - 60, now + days * DAY),
            path_len,
            issuer.map(|(cert, key)| Issuer { cert, key }).as_ref(),
            Some(key),
        )
    }
}

fn check_service_id(service_id: &str) -> Result<(), PkiError> {
    fleet_protocol::topic::validate_service_id(service_id)
        .map_err(|_| PkiError::BadServiceId(service_id.to_owned()))
}

fn check_pair(cert: &X509, key: &PKey<Private>, cert_path: &Path) -> Result<(), PkiError> {
    if cert.public_key()?.public_eq(key) {
        Ok(())
    } else {
        Err(PkiError::Inconsistent(format!(
            "{} does not match its key",
            cert_path.display()
        )))
    }
}

fn half_pair(a: &Path, b: &Path) -> PkiError {
    PkiError::Inconsistent(format!(
        "only one of {} and {} exists; restore the other or remove both",
        a.display(),
        b.display()
    ))
}

/// Whether the CRL at `path` is missing, unreadable or past half its
/// validity.
fn crl_due(path: &Path) -> bool {
    let Some(crl) = std::fs::read(path)
        .ok()
        .and_then(|pem| openssl::x509::X509Crl::from_pem(&pem).ok())
    else {
        return true;
    };
    let Some(next) = crl.next_update() else {
        return true;
    };
    let (this, now) = (crl.last_update(), openssl::asn1::Asn1Time::days_from_now(0));
    let (Ok(now), Ok(life)) = (now, this.diff(next)) else {
        return true;
    };
    // Written while the clock was ahead: not valid yet, so write it again.
    if this > now {
        return true;
    }
    let Ok(left) = now.diff(next) else {
        return true;
    };
    let secs = |d: openssl::asn1::TimeDiff| i64::from(d.days) * 86_400 + i64::from(d.secs);
    secs(left) * 2 < secs(life)
}

/// An ASN.1 time as Unix seconds (0 for one before 1970).
fn serial_hex(cert: &X509) -> Result<String, PkiError> {
    Ok(cert
        .serial_number()
        .to_bn()?
        .to_hex_str()?
        .to_ascii_lowercase())
}

fn unix_of(t: &openssl::asn1::Asn1TimeRef) -> Result<u64, PkiError> {
    let diff = openssl::asn1::Asn1Time::from_unix(0)?.diff(t)?;
    Ok(u64::try_from(i64::from(diff.days) * 86_400 + i64::from(diff.secs)).unwrap_or(0))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A DER PKCS#10 CSR for `device_id` (subject CN only), signed with `key`
/// using SHA-256.
pub fn generate_csr(device_id: &str, key: &PKeyRef<Private>) -> Result<Vec<u8>, PkiError> {
    let mut b = X509Req::builder()?;
    b.set_version(0)?;
    let subject = certs::name(None, device_id)?;
    b.set_subject_name(&subject)?;
    b.set_pubkey(key)?;
    b.sign(key, MessageDigest::sha256())?;
    Ok(b.build().to_der()?)
}

/// Concatenated PEM of `chain`, in order.
pub fn chain_to_pem(chain: &[X509]) -> Result<Vec<u8>, PkiError> {
    let mut out = Vec::new();
    for cert in chain {
        out.extend(cert.to_pem()?);
    }
    Ok(out)
}

/// Writes `bytes` to `path` with `mode` (for a new file; 0600 for secrets),
/// atomically and durably: a temporary file beside it (`.NAME.tmp.PID.N`,
/// one per writer), synced, then renamed over it.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    files::write_atomic(path, bytes, mode)
}

/// Writes `key` as PKCS#8 PEM with mode 0600, atomically.
pub fn write_private_key(path: &Path, key: &PKeyRef<Private>) -> Result<(), PkiError> {
    files::write_atomic(path, &key.private_key_to_pem_pkcs8()?, KEY_MODE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A rolled-over signing key: its key 0600 beside a certificate by the
    /// issuing root for the manager-signing usage only; it signs from then
    /// on, and again after the PKI is opened anew. A second roll that finds
    /// the files there (another process rolled) is refused.
    #[test]
    fn a_signing_key_rolls_over_to_a_key_the_root_certifies() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        let first = pki.signing_key();
        assert!(pki.signing().signer.is_none());
        let rolled = pki.roll_signing_key().unwrap();
        assert_eq!(rolled.generation, 2);
        assert_eq!(mode(&signing::key_file(tmp.path(), 2)), 0o600);
        let cert = X509::from_pem(&std::fs::read(&rolled.path).unwrap()).unwrap();
        let signing = pki.signing();
        assert!(cert.public_key().unwrap().public_eq(&signing.key));
        assert!(!signing.key.public_eq(&first));
        assert_eq!(signing.signer.as_ref().unwrap()[0], cert.to_der().unwrap());
        let root = pki.read_roots().issuing.cert.clone();
        assert!(cert.verify(&root.public_key().unwrap()).unwrap());
        let der = cert.to_der().unwrap();
        assert_eq!(
            fleet_protocol::certificate::basic_constraints_ca(&der),
            Some(false)
        );
        assert_eq!(
            fleet_protocol::certificate::extended_key_usages(&der),
            Some(vec![fleet_protocol::certificate::MANAGER_SIGNING_EKU_DER])
        );
        let generations = pki.signing_generations().unwrap();
        assert_eq!(
            generations
                .iter()
                .map(|g| (g.generation, g.signing))
                .collect::<Vec<_>>(),
            [(1, false), (2, true)]
        );

        let again = Pki::open_or_create(tmp.path()).unwrap();
        assert_eq!(again.signing().generation, 2);
        assert!(again.signing_key().public_eq(&signing.key));
        // The first process, not knowing of a third generation made by
        // another, refuses to make one over it.
        again.roll_signing_key().unwrap();
        assert!(pki.roll_signing_key().is_err());
    }

    #[test]
    fn crls_are_due_past_half_their_validity_and_the_root_has_one_from_the_start() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        let root_crl = std::fs::read(pki.root_crl_path()).unwrap();
        let crl = openssl::x509::X509Crl::from_pem(&root_crl).unwrap();
        assert!(crl.verify(&pki.root_cert().public_key().unwrap()).unwrap());
        assert!(crl.get_revoked().is_none_or(|r| r.is_empty()));
        assert!(!crl_due(&pki.root_crl_path()), "a fresh CRL is due");
        assert!(!pki.crl_due("svcA"), "a missing CRL is due");
        pki.write_crl("svcA", 1, &[], 1).unwrap();
        assert!(!pki.crl_due("svcA"));
        // Written 5 days ago for 7 days: past half.
        let (ca, key) = pki.service_ca("svcA").unwrap();
        let now = unix_now() as i64;
        let params = crl::CrlParams {
            crl_number: 2,
            this_update: now - 5 * 86_400,
            next_update: now + 2 * 86_400,
        };
        let der = crl::build_crl_der(&ca, &key, &[], &params).unwrap();
        std::fs::write(pki.crl_path("svcA"), crl::crl_der_to_pem(&der)).unwrap();
        assert!(pki.crl_due("svcA"));
        std::fs::write(pki.crl_path("svcA"), b"not a CRL").unwrap();
        assert!(pki.crl_due("svcA"));
        // A successor's CRL is written with it; if lost, it is due.
        pki.write_crl("svcA", 1, &[], 3).unwrap();
        pki.roll_service_ca("svcA", 9).unwrap();
        assert!(!pki.crl_due("svcA"));
        std::fs::remove_file(pki.crl_path_of("svcA", 2)).unwrap();
        assert!(pki.crl_due("svcA"));
        pki.write_crl("svcA", 2, &[], 4).unwrap();
        assert!(!pki.crl_due("svcA"));
    }

    /// Writes generation `generation` of `service`'s CA, signed by the
    /// root, valid from a minute ago until `not_after`, where the PKI
    /// keeps it.
    fn write_service_ca(pki: &Pki, service: &str, generation: u32, not_after: u64) {
        let key = certs::new_p256_key().unwrap();
        let cn = format!("fleetshift service CA {service} {generation}");
        let root = pki.read_roots().issuing.clone();
        let cert = certs::ca(
            &certs::name(Some(service), &cn).unwrap(),
            &key,
            (unix_now() - 60, not_after),
            Some(0),
            Some(&Issuer {
                cert: &root.cert,
                key: &root.key,
            }),
            None,
        )
        .unwrap();
        write_private_key(&pki.service_ca_key_path(service, generation), &key).unwrap();
        files::write_atomic(
            &pki.service_ca_path_of(service, generation),
            &cert.to_pem().unwrap(),
            PUBLIC_MODE,
        )
        .unwrap();
    }

    /// A certificate asked for longer than its service CA has left ends
    /// with the CA.
    #[test]
    fn a_certificate_ends_no_later_than_its_service_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        // svcQ's CA, valid 10 more days, written where the PKI keeps it.
        let ca_until = unix_now() + 10 * DAY;
        write_service_ca(&pki, "svcQ", 1, ca_until);
        let device = certs::new_p256_key().unwrap();
        let public = PKey::public_key_from_der(&device.public_key_to_der().unwrap()).unwrap();
        let issued = pki
            .issue_device_certificate("dev1", "svcQ", &public, 30)
            .unwrap();
        assert_eq!(issued.not_after, ca_until);
        assert_eq!(unix_of(issued.leaf.not_after()).unwrap(), ca_until);
        // One asked for less is not touched.
        let short = pki
            .issue_device_certificate("dev1", "svcQ", &public, 1)
            .unwrap();
        assert!(short.not_after < ca_until);
        assert_eq!(unix_of(short.leaf.not_after()).unwrap(), short.not_after);
    }

    #[test]
    fn creates_layout_with_private_keys_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        pki.service_ca("svcA").unwrap();
        for key in [
            "root-ca.key",
            "manager-sign.key",
            "broker.key",
            "services/svcA-ca.key",
        ] {
            assert_eq!(mode(&tmp.path().join(key)), 0o600, "{key}");
        }
        for public in [
            "root-ca.pem",
            "manager-sign.pub.pem",
            "broker.pem",
            "services/svcA-ca.pem",
        ] {
            assert!(tmp.path().join(public).is_file(), "{public}");
        }
        assert!(tmp.path().join("crl").is_dir());
        let pem = std::fs::read_to_string(tmp.path().join("root-ca.key")).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "PKCS#8");
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp."))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn reopen_loads_the_same_keys_and_cas() {
        let tmp = tempfile::tempdir().unwrap();
        let (root_der, sign_pub, ca_der, broker_pem) = {
            let pki = Pki::open_or_create(tmp.path()).unwrap();
            let key = certs::new_p256_key().unwrap();
            let public = PKey::public_key_from_pem(&key.public_key_to_pem().unwrap()).unwrap();
            pki.issue_device_certificate("dev1", "svcA", &public, 30)
                .unwrap();
            (
                pki.root_cert().to_der().unwrap(),
                pki.signing_key().public_key_to_der().unwrap(),
                pki.service_ca("svcA").unwrap().0.to_der().unwrap(),
                std::fs::read(pki.broker_cert_path()).unwrap(),
            )
        };
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        assert_eq!(pki.root_cert().to_der().unwrap(), root_der);
        assert_eq!(pki.signing_key().public_key_to_der().unwrap(), sign_pub);
        let (ca, ca_key) = pki.service_ca("svcA").unwrap();
        assert_eq!(ca.to_der().unwrap(), ca_der);
        assert!(ca.public_key().unwrap().public_eq(&ca_key));
        assert_eq!(std::fs::read(pki.broker_cert_path()).unwrap(), broker_pem);
    }

    /// `openssl verify` of the broker certificate against the root, as a
    /// client reaching the broker by `name` (`-verify_ip` for an address).
    fn verifies_as(pki: &Pki, name: &str) -> bool {
        let flag = match name.parse::<std::net::IpAddr>() {
            Ok(_) => "-verify_ip",
            Err(_) => "-verify_hostname",
        };
        let out = std::process::Command::new("openssl")
            .args(["verify", "-CAfile"])
            .arg(pki.root_pem_path())
            .args([flag, name])
            .arg(pki.broker_cert_path())
            .output()
            .expect("openssl runs");
        out.status.success()
    }

    #[test]
    fn the_broker_certificate_names_what_it_is_told_and_is_renewed_at_half_life() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        let key_pem = std::fs::read(pki.broker_key_path()).unwrap();
        let serial = |pki: &Pki| {
            let cert = files::load_cert(&pki.broker_cert_path()).unwrap();
            cert.serial_number()
                .to_bn()
                .unwrap()
                .to_hex_str()
                .unwrap()
                .to_string()
        };
        let first = serial(&pki);
        for name in ["localhost", "127.0.0.1", "::1"] {
            assert!(verifies_as(&pki, name), "{name}");
        }
        assert!(!verifies_as(&pki, "broker.example.com"));
        assert!(!pki.ensure_broker_cert(None).unwrap(), "nothing to change");

        // Names given: exactly those and the local ones, with the same key.
        let names = ServerNames::with_local(&["broker.example.com", "10.9.8.7"]).unwrap();
        assert!(pki.ensure_broker_cert(Some(&names)).unwrap());
        for name in [
            "broker.example.com",
            "BROKER.example.com",
            "10.9.8.7",
            "localhost",
            "::1",
        ] {
            assert!(verifies_as(&pki, name), "{name}");
        }
        for name in ["example.com", "other.example.com", "10.9.8.8"] {
            assert!(!verifies_as(&pki, name), "{name}");
        }
        assert_eq!(std::fs::read(pki.broker_key_path()).unwrap(), key_pem);
        let named = serial(&pki);
        assert_ne!(named, first);
        // Kept by whoever opens the PKI without names, and by a reopening.
        assert!(!pki.ensure_broker_cert(None).unwrap());
        assert!(!pki.ensure_broker_cert(Some(&names)).unwrap());
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        assert_eq!(serial(&pki), named);
        assert!(verifies_as(&pki, "broker.example.com"));

        // A name taken away is gone.
        let fewer = ServerNames::with_local(&["10.9.8.7"]).unwrap();
        assert!(pki.ensure_broker_cert(Some(&fewer)).unwrap());
        assert!(!verifies_as(&pki, "broker.example.com"));
        assert!(verifies_as(&pki, "10.9.8.7"));

        // Renewed, names and key kept, once past half its validity.
        let cert = files::load_cert(&pki.broker_cert_path()).unwrap();
        let (from, until) = (
            unix_of(cert.not_before()).unwrap(),
            unix_of(cert.not_after()).unwrap(),
        );
        let before_half = from + (until - from) / 2 - 60;
        let fewer_serial = serial(&pki);
        assert!(!pki.ensure_broker_cert_at(None, before_half).unwrap());
        assert_eq!(serial(&pki), fewer_serial);
        assert!(pki.ensure_broker_cert_at(None, before_half + 120).unwrap());
        assert_ne!(serial(&pki), fewer_serial);
        let renewed = files::load_cert(&pki.broker_cert_path()).unwrap();
        assert_eq!(ServerNames::of(&renewed), fewer);
        assert!(unix_of(renewed.not_after()).unwrap() > until);
        assert_eq!(std::fs::read(pki.broker_key_path()).unwrap(), key_pem);

        // Signed by another root (a PKI made again): a new pair.
        let other_dir = tempfile::tempdir().unwrap();
        let other = Pki::open_or_create(other_dir.path()).unwrap();
        let key = files::load_private_key(&pki.broker_key_path()).unwrap();
        let foreign = certs::build(
            &Template {
                subject: &certs::name(None, BROKER_CN).unwrap(),
                public_key: &key,
                serial: &certs::random_serial().unwrap(),
                not_before: unix_now() - 60,
                not_after: unix_now() + 365 * DAY,
                profile: Profile::Server {
                    dns: &["localhost"],
                    ips: &[],
                },
            },
            Some(&Issuer {
                cert: &other.read_roots().issuing.cert,
                key: &other.read_roots().issuing.key,
            }),
            None,
        )
        .unwrap();
        std::fs::write(pki.broker_cert_path(), foreign.to_pem().unwrap()).unwrap();
        assert!(pki.ensure_broker_cert(None).unwrap());
        assert!(verifies_as(&pki, "localhost"));
        assert_ne!(std::fs::read(pki.broker_key_path()).unwrap(), key_pem);

        // A key deleted (to have a new one made): a new pair, the same names.
        assert!(pki.ensure_broker_cert(Some(&fewer)).unwrap());
        std::fs::remove_file(pki.broker_key_path()).unwrap();
        assert!(pki.ensure_broker_cert(None).unwrap());
        assert_eq!(
            ServerNames::of(&files::load_cert(&pki.broker_cert_path()).unwrap()),
            fewer
        );
        let key_pem = std::fs::read(pki.broker_key_path()).unwrap();

        // A key that does not match gets a new pair, with the names asked.
        std::fs::write(
            pki.broker_key_path(),
            certs::new_p256_key()
                .unwrap()
                .private_key_to_pem_pkcs8()
                .unwrap(),
        )
        .unwrap();
        assert!(pki.ensure_broker_cert(Some(&names)).unwrap());
        let cert = files::load_cert(&pki.broker_cert_path()).unwrap();
        let key = files::load_private_key(&pki.broker_key_path()).unwrap();
        assert!(cert.public_key().unwrap().public_eq(&key));
        assert_ne!(std::fs::read(pki.broker_key_path()).unwrap(), key_pem);
        assert_eq!(mode(&pki.broker_key_path()), 0o600);
        assert!(verifies_as(&pki, "broker.example.com"));
    }

    #[test]
    fn half_a_root_pair_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        Pki::open_or_create(tmp.path()).unwrap();
        std::fs::remove_file(tmp.path().join("root-ca.key")).unwrap();
        let err = Pki::open_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, PkiError::Inconsistent(_)), "{err}");
    }

    #[test]
    fn a_root_roll_over_survives_interruptions() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        let now = unix_now();
        assert!(!pki.root_roll_due(now).unwrap());
        assert!(pki.root_roll_due(now + 8 * 365 * DAY + DAY).unwrap());
        // A roll that stopped after its key (and cross-certificate): the
        // directory still opens on the first root, and the next roll
        // starts that generation again.
        std::fs::write(tmp.path().join("root-ca.2.key"), b"half").unwrap();
        std::fs::write(tmp.path().join("root-ca.2.cross.pem"), b"half").unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        assert_eq!(pki.root_generations().unwrap().len(), 1);
        // Young, they may be another process's roll under way.
        let err = pki.roll_root().unwrap_err();
        assert!(err.to_string().contains("may be under way"), "{err}");
        for name in ["root-ca.2.key", "root-ca.2.cross.pem"] {
            std::fs::File::options()
                .write(true)
                .open(tmp.path().join(name))
                .unwrap()
                .set_modified(std::time::SystemTime::now() - std::time::Duration::from_secs(120))
                .unwrap();
        }
        let rolled = pki.roll_root().unwrap();
        assert_eq!(rolled.generation, 2);
        assert!(rolled
            .cert
            .verify(&rolled.cert.public_key().unwrap())
            .unwrap());
        let cross = files::load_cert(rolled.cross_path.as_ref().unwrap()).unwrap();
        let first = pki.root_generations().unwrap()[0].cert.clone();
        assert!(cross.verify(&first.public_key().unwrap()).unwrap());
        assert!(cross
            .public_key()
            .unwrap()
            .public_eq(&rolled.cert.public_key().unwrap()));
        assert!(!pki.root_roll_due(now).unwrap(), "ten years again");
        // The broker's certificate with a tail that does not read is
        // written again, once.
        assert!(pki.ensure_broker_cert(None).unwrap());
        let mut pem = std::fs::read(pki.broker_cert_path()).unwrap();
        pem.extend(b"-----BEGIN CERTIFICATE-----\nMIIB\n");
        std::fs::write(pki.broker_cert_path(), pem).unwrap();
        assert!(pki.ensure_broker_cert(None).unwrap());
        assert!(!pki.ensure_broker_cert(None).unwrap());
        // Devices pin four roots at most: no fifth while four last.
        pki.roll_root().unwrap();
        pki.roll_root().unwrap();
        let err = pki.roll_root().unwrap_err();
        assert!(err.to_string().contains("at most 4"), "{err}");
        assert_eq!(pki.root_generations().unwrap().len(), 4);
        let reopened = Pki::open_or_create(tmp.path()).unwrap();
        assert_eq!(reopened.root_generations().unwrap().len(), 4);
        assert_eq!(reopened.issuing_root_generation(), 4);
        // No new first root beside its successors.
        let first = tmp.path().join("root-ca.pem");
        std::fs::rename(&first, tmp.path().join("aside.pem")).unwrap();
        std::fs::rename(tmp.path().join("root-ca.key"), tmp.path().join("aside.key")).unwrap();
        let err = Pki::open_or_create(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("successors"), "{err}");
        assert!(!first.exists());
        std::fs::rename(tmp.path().join("aside.pem"), &first).unwrap();
        std::fs::rename(tmp.path().join("aside.key"), tmp.path().join("root-ca.key")).unwrap();
        // The newest root without its key: it may have issued what
        // nothing can revoke now.
        std::fs::remove_file(tmp.path().join("root-ca.4.key")).unwrap();
        let err = Pki::open_or_create(tmp.path()).unwrap_err();
        assert!(matches!(err, PkiError::Inconsistent(_)), "{err}");
    }

    #[test]
    fn service_ids_are_validated() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        for bad in ["", "svc/A", "../x", "svc.A", "+", "#"] {
            assert!(
                matches!(pki.service_ca(bad), Err(PkiError::BadServiceId(_))),
                "{bad:?}"
            );
        }
    }

    /// What a roll-over stopped midway leaves is cleaned up or reported;
    /// expired generations other than the issuing one are retired; no roll
    /// is due while a successor could not outlive the issuing CA.
    #[test]
    fn service_ca_generations_survive_interruptions_and_retire() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        assert!(matches!(
            pki.roll_service_ca("svcA", 9),
            Err(PkiError::NoServiceCa(_))
        ));
        pki.service_ca("svcA").unwrap();
        pki.roll_service_ca("svcA", 9).unwrap();

        // A key written for generation 3, then a crash before its
        // certificate: kept while it may be another process's roll under
        // way, removed once a minute old.
        let orphan = pki.service_ca_key_path("svcA", 3);
        write_private_key(&orphan, &certs::new_p256_key().unwrap()).unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        assert_eq!(pki.issuing_generation("svcA").unwrap().generation, 2);
        assert!(orphan.exists(), "a fresh key was removed");
        assert!(matches!(
            pki.roll_service_ca("svcA", 9),
            Err(PkiError::Inconsistent(_))
        ));
        std::fs::File::options()
            .write(true)
            .open(&orphan)
            .unwrap()
            .set_modified(SystemTime::now() - std::time::Duration::from_secs(120))
            .unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        assert_eq!(pki.issuing_generation("svcA").unwrap().generation, 2);
        assert!(!orphan.exists(), "the unfinished roll's key was removed");
        assert_eq!(pki.roll_service_ca("svcA", 9).unwrap().generation, 3);
        // Its CRL was written with it, signed by it.
        let crl =
            openssl::x509::X509Crl::from_pem(&std::fs::read(pki.crl_path_of("svcA", 3)).unwrap())
                .unwrap();
        let third = pki.issuing_generation("svcA").unwrap();
        assert!(crl.verify(&third.cert.public_key().unwrap()).unwrap());

        // A certificate whose key is gone is reported, not skipped.
        std::fs::remove_file(pki.service_ca_key_path("svcA", 3)).unwrap();
        let reopened = Pki::open_or_create(tmp.path()).unwrap();
        assert!(matches!(
            reopened.issuing_generation("svcA"),
            Err(PkiError::Inconsistent(_))
        ));
        std::fs::remove_file(pki.service_ca_path_of("svcA", 3)).unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        assert_eq!(pki.issuing_generation("svcA").unwrap().generation, 2);

        // Retired once expired, but never the one that issues: its key
        // deleted, its certificate and CRL moved.
        for generation in [1, 2] {
            pki.write_crl("svcA", generation, &[], u64::from(generation))
                .unwrap();
        }
        let cas = pki.service_ca_generations("svcA").unwrap();
        assert!(pki
            .retire_expired_service_cas(unix_now())
            .unwrap()
            .is_empty());
        let far = cas[1].not_after + DAY;
        // Stopped after the key went: loaded as before, finished next time.
        std::fs::remove_file(pki.service_ca_key_path("svcA", 1)).unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        assert_eq!(pki.issuing_generation("svcA").unwrap().generation, 2);
        pki.write_crl("svcA", 2, &[], 5).unwrap();
        let retired = pki.retire_expired_service_cas(far).unwrap();
        assert_eq!(retired.len(), 1);
        assert_eq!(retired[0].generation, 1);
        assert!(!pki.service_ca_path_of("svcA", 1).exists());
        assert!(!pki.crl_path_of("svcA", 1).exists());
        let away = tmp.path().join("services").join(RETIRED_DIR);
        assert!(away.join("svcA-ca.pem").exists() && !away.join("svcA-ca.key").exists());
        assert!(tmp
            .path()
            .join("crl")
            .join(RETIRED_DIR)
            .join("svcA.crl.pem")
            .exists());
        assert_eq!(pki.issuing_generation("svcA").unwrap().generation, 2);
        assert!(pki.crl_path_of("svcA", 2).exists());
        assert!(pki.retire_expired_service_cas(far).unwrap().is_empty());

        // Due a year before the end, while a successor gains something.
        let end = cas[1].not_after;
        assert!(!pki.roll_due("svcA", unix_now()).unwrap());
        assert!(pki.roll_due("svcA", end - 300 * DAY).unwrap());
        // A CA that ends with the root cannot be outlived: never due.
        let root_end = unix_of(pki.root_cert().not_after()).unwrap();
        write_service_ca(&pki, "svcA", 3, root_end - 10 * DAY);
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        assert_eq!(pki.issuing_generation("svcA").unwrap().generation, 3);
        assert!(!pki.roll_due("svcA", root_end - 100 * DAY).unwrap());
    }

    /// Retired before its end (a stolen key): the key deleted, the
    /// certificate moved, the CRL kept until past half its validity and
    /// then swept; the issuing generation stays; a retirement stopped after
    /// the key is finished by housekeeping.
    #[test]
    fn a_service_ca_retired_before_its_end_keeps_its_crl_a_while() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        pki.service_ca("svcA").unwrap();
        pki.write_crl("svcA", 1, &[], 1).unwrap();
        pki.roll_service_ca("svcA", 2).unwrap();
        pki.roll_service_ca("svcA", 3).unwrap();
        let retired = pki.retire_service_cas("svcA", 2).unwrap();
        assert_eq!(
            retired.iter().map(|c| c.generation).collect::<Vec<_>>(),
            [1]
        );
        let services = tmp.path().join("services");
        assert!(!services.join("svcA-ca.key").exists());
        assert!(!services.join("svcA-ca.pem").exists());
        assert!(services.join(RETIRED_DIR).join("svcA-ca.pem").exists());
        assert!(pki.crl_path("svcA").exists(), "its CRL is kept");
        let listed: Vec<u32> = pki
            .service_ca_generations("svcA")
            .unwrap()
            .iter()
            .map(|c| c.generation)
            .collect();
        assert_eq!(listed, [2, 3]);
        // Not the issuing one, whatever is asked.
        assert_eq!(pki.retire_service_cas("svcA", 99).unwrap().len(), 1);
        assert_eq!(pki.issuing_generation("svcA").unwrap().generation, 3);
        assert!(pki.service_ca_path_of("svcA", 3).exists());

        // The kept CRL goes once past half its validity, not before.
        let now = unix_now();
        assert!(pki.retire_expired_service_cas(now).unwrap().is_empty());
        assert!(pki.crl_path("svcA").exists());
        let ca =
            X509::from_pem(&std::fs::read(services.join(RETIRED_DIR).join("svcA-ca.pem")).unwrap())
                .unwrap();
        // Its key is gone: a stale CRL made with a stand-in key, named as
        // the retired one's.
        let stand_in = certs::new_p256_key().unwrap();
        let params = crl::CrlParams {
            crl_number: 9,
            this_update: now as i64 - 5 * 86_400,
            next_update: now as i64 + 2 * 86_400,
        };
        let der = crl::build_crl_der(&ca, &stand_in, &[], &params).unwrap();
        std::fs::write(pki.crl_path("svcA"), crl::crl_der_to_pem(&der)).unwrap();
        pki.retire_expired_service_cas(now).unwrap();
        assert!(!pki.crl_path("svcA").exists());
        assert!(tmp
            .path()
            .join("crl")
            .join(RETIRED_DIR)
            .join("svcA.crl.pem")
            .exists());
        assert!(
            pki.crl_path_of("svcA", 3).exists(),
            "the issuing one's stays"
        );

        // Stopped after deleting generation 3's key (once 4 issues):
        // finished by housekeeping, expired or not, its CRL kept.
        pki.roll_service_ca("svcA", 10).unwrap();
        std::fs::remove_file(pki.service_ca_key_path("svcA", 3)).unwrap();
        let retired = pki.retire_expired_service_cas(now).unwrap();
        assert_eq!(
            retired.iter().map(|c| c.generation).collect::<Vec<_>>(),
            [3]
        );
        assert!(!pki.service_ca_path_of("svcA", 3).exists());
        assert!(pki.crl_path_of("svcA", 3).exists());
        assert_eq!(pki.issuing_generation("svcA").unwrap().generation, 4);
    }

    #[test]
    fn service_ca_is_created_once_under_concurrency() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        let ders: Vec<Vec<u8>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| pki.service_ca("svcB").unwrap().0.to_der().unwrap()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(ders.windows(2).all(|w| w[0] == w[1]));
    }

    #[test]
    fn issued_certificate_fields() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        let device_key = certs::new_p256_key().unwrap();
        let csr = generate_csr("dev-7", &device_key).unwrap();
        let public = Pki::public_key_from_csr(&csr).unwrap();
        let issued = pki
            .issue_device_certificate("dev-7", "svcA", &public, 90)
            .unwrap();

        let leaf = &issued.leaf;
        let text = |nid| {
            let entry = leaf.subject_name().entries_by_nid(nid).next().unwrap();
            String::from_utf8(entry.data().as_slice().to_vec()).unwrap()
        };
        assert_eq!(text(openssl::nid::Nid::COMMONNAME), "dev-7");
        assert_eq!(text(openssl::nid::Nid::ORGANIZATIONNAME), "svcA");
        assert!(leaf.public_key().unwrap().public_eq(&device_key));
        let (ca, _) = pki.service_ca("svcA").unwrap();
        assert!(leaf.verify(&ca.public_key().unwrap()).unwrap());
        assert_eq!(issued.chain.len(), 2);
        assert_eq!(issued.chain[1].to_der().unwrap(), ca.to_der().unwrap());

        let serial = leaf.serial_number().to_bn().unwrap();
        assert_eq!(
            issued.serial_hex,
            serial.to_hex_str().unwrap().to_ascii_lowercase()
        );
        assert!(!serial.is_negative() && serial.num_bits() <= 127 && serial.num_bits() > 0);
        assert_eq!(issued.fingerprint_sha256.len(), 64);
        assert_eq!(
            issued.not_after - issued.not_before,
            90 * DAY + certs::BACKDATE_SECS
        );

        let uris: Vec<String> = leaf
            .subject_alt_names()
            .unwrap()
            .iter()
            .filter_map(|n| n.uri().map(str::to_owned))
            .collect();
        assert_eq!(
            uris,
            ["urn:fleetshift:device:dev-7", "urn:fleetshift:service:svcA"]
        );
        assert_eq!(leaf.subject_key_id().unwrap().as_slice().len(), 20);
        assert_eq!(
            leaf.authority_key_id().unwrap().as_slice(),
            ca.subject_key_id().unwrap().as_slice()
        );
    }

    #[test]
    fn issue_rejects_bad_input() {
        let tmp = tempfile::tempdir().unwrap();
        let pki = Pki::open_or_create(tmp.path()).unwrap();
        let key = certs::new_p256_key().unwrap();
        let public = PKey::public_key_from_der(&key.public_key_to_der().unwrap()).unwrap();
        let issue =
            |dev: &str, svc: &str, days| pki.issue_device_certificate(dev, svc, &public, days);
        assert!(matches!(
            issue("dev/1", "svcA", 30),
            Err(PkiError::BadDeviceId(_))
        ));
        assert!(matches!(
            issue("dev1", "svc A", 30),
            Err(PkiError::BadServiceId(_))
        ));
        assert!(matches!(
            issue("dev1", "svcA", 0),
            Err(PkiError::BadLifetime(0))
        ));
        assert!(matches!(
            issue("dev1", "svcA", 100_000),
            Err(PkiError::BadLifetime(_))
        ));

        let p384 = openssl::ec::EcGroup::from_curve_name(openssl::nid::Nid::SECP384R1).unwrap();
        let other = PKey::from_ec_key(openssl::ec::EcKey::generate(&p384).unwrap()).unwrap();
        let other = PKey::public_key_from_der(&other.public_key_to_der().unwrap()).unwrap();
        let err = pki
            .issue_device_certificate("dev1", "svcA", &other, 30)
            .unwrap_err();
        assert!(matches!(err, PkiError::BadKey(_)), "{err}");
    }

    #[test]
    fn bad_csrs_are_rejected() {
        let key = certs::new_p256_key().unwrap();
        let good = generate_csr("dev1", &key).unwrap();
        assert!(Pki::public_key_from_csr(&good).is_ok());

        let mut cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("garbage", b"definitely not a CSR".to_vec()),
            ("truncated", good[..good.len() - 10].to_vec()),
            ("trailing bytes", [good.as_slice(), &[0, 0]].concat()),
            ("oversized", vec![0x30; MAX_CSR_LEN + 1]),
        ];
        // The signature is the last element, so its last byte is part of `s`.
        let mut bad_signature = good.clone();
        *bad_signature.last_mut().unwrap() ^= 0x01;
        cases.push(("tampered signature", bad_signature));
        // Changing the subject ("dev1" -> "dev2") keeps the DER valid but breaks the signature.
        let pos = good.windows(4).position(|w| w == b"dev1").unwrap();
        let mut bad_subject = good.clone();
        bad_subject[pos + 3] = b'2';
        cases.push(("tampered subject", bad_subject));

        let rsa = PKey::from_rsa(openssl::rsa::Rsa::generate(2048).unwrap()).unwrap();
        cases.push(("RSA key", generate_csr("dev1", &rsa).unwrap()));

        for (what, der) in cases {
            let err = Pki::public_key_from_csr(&der).unwrap_err();
            assert!(matches!(err, PkiError::BadCsr(_)), "{what}: {err}");
        }
    }

    #[test]
    fn write_private_key_replaces_atomically_with_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("dev.key");
        std::fs::write(&path, "old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let key = certs::new_p256_key().unwrap();
        write_private_key(&path, &key).unwrap();
        assert_eq!(mode(&path), 0o600);
        let loaded = PKey::private_key_from_pem(&std::fs::read(&path).unwrap()).unwrap();
        assert!(loaded.public_eq(&key));
    }
}

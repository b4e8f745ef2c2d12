//! The simulated secure element: one directory per device holding its
//! secrets and state, each secret in its own 0600 file.
//!
//! ```text
//! {store_root}/{device_id}/            (0700)
//!   factory.key                        PKCS#8 PEM, the factory key pair
//!   state.cbor                         DeviceState, written atomically
//!   service-{svc}.key                  PKCS#8 PEM service key (rustls reads PKCS#8)
//!   service-{svc}.pem                  device certificate, then its service CA
//! ```
//!
//! Every write goes to a temporary file that is synced and renamed over the
//! target, so a crash leaves either the old or the new file, never half of one.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use fleet_protocol::crypto;
use fleet_protocol::topic::{validate_device_id, validate_service_id};
use fleet_protocol::ServiceChange;
use openssl::pkey::{PKey, Private};
use openssl::x509::X509;
use serde::{Deserialize, Serialize};

use crate::config::KeyMode;

const STATE_VERSION: u8 = 1;
const FACTORY_KEY: &str = "factory.key";
const STATE_FILE: &str = "state.cbor";
/// The root CAs learned from the manager (topics.md §8), PEM.
pub const ROOTS_FILE: &str = "roots.pem";
/// The certificate of the manager signing key learned from a message's
/// `signer` (topics.md §4.3), PEM.
pub const SIGNER_FILE: &str = "manager-sign.pem";

/// Errors of the store layer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("device {0:?} is not provisioned (no factory key)")]
    NotProvisioned(String),
    #[error("invalid id: {0}")]
    BadId(#[from] fleet_protocol::ProtocolError),
    #[error("state file: {0}")]
    State(#[from] serde_cbor::Error),
    #[error("state file belongs to {found:?}, not {expected:?}")]
    WrongDevice { expected: String, found: String },
    #[error("unsupported state version {0}")]
    Version(u8),
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
    #[error("device-auth uuid has {0} bytes, expected 16")]
    BadUuid(usize),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The bytes of `path`, or `None` if there is no such file.
fn read_if_there(path: &Path) -> Result<Option<Vec<u8>>, StoreError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Everything the device remembers besides its key files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub v: u8,
    pub device_id: String,
    /// The current service; before activation, the one to ask for, if any.
    #[serde(default)]
    pub service_id: Option<String>,
    /// The 16-byte device-auth UUID, once activated.
    #[serde(default, with = "serde_bytes")]
    pub uuid: Option<Vec<u8>>,
    /// Highest service-change sequence number accepted (replay protection).
    #[serde(default)]
    pub last_notice_seq: u64,
    /// The mode the current service key was obtained with.
    #[serde(default)]
    pub key_mode: KeyMode,
    /// `mqtts://host:port` of the current service listener when a notice moved it.
    #[serde(default)]
    pub service_endpoint: Option<String>,
    /// An accepted notice whose update has not finished; resumed after a restart.
    #[serde(default)]
    pub pending_change: Option<ServiceChange>,
    /// A change applied but not yet reported as `change_applied` on the new service.
    #[serde(default)]
    pub unreported_change: Option<String>,
}

impl DeviceState {
    fn new(device_id: &str) -> Self {
        DeviceState {
            v: STATE_VERSION,
            device_id: device_id.to_owned(),
            service_id: None,
            uuid: None,
            last_notice_seq: 0,
            key_mode: KeyMode::Csr,
            service_endpoint: None,
            pending_change: None,
            unreported_change: None,
        }
    }

    /// The UUID as the 16-byte HMAC key.
    pub fn uuid_key(&self) -> Option<&[u8]> {
        self.uuid.as_deref()
    }
}

/// Service key and chain as PEM, ready for the TLS client.
#[derive(Debug, Clone)]
pub struct ServiceCredentials {
    /// PKCS#8 PEM private key.
    pub key_pem: Vec<u8>,
    /// Device certificate PEM, then the service CA PEM.
    pub chain_pem: Vec<u8>,
}

/// One device's store, opened.
pub struct Store {
    dir: PathBuf,
    factory_key: PKey<Private>,
    state: DeviceState,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("device_id", &self.state.device_id)
            .finish_non_exhaustive()
    }
}

/// Writes `data` to `path` with mode 0600 through a synced temporary file and a rename.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    file.write_all(data).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn device_dir(store_root: &Path, device_id: &str) -> Result<PathBuf, StoreError> {
    // The id becomes a path component: validate before touching the file system.
    validate_device_id(device_id)?;
    Ok(store_root.join(device_id))
}

/// Creates the device's store with a fresh factory key if it has none and
/// returns the factory public key (SEC1 uncompressed). Idempotent: an
/// existing device keeps its key and gets the same answer.
pub fn provision(store_root: &Path, device_id: &str) -> Result<Vec<u8>, StoreError> {
    let dir = device_dir(store_root, device_id)?;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(io_err(&dir))?;
    let key_path = dir.join(FACTORY_KEY);
    let key = if key_path.exists() {
        read_key(&key_path)?
    } else {
        let key = crypto::generate_p256()?;
        write_atomic(&key_path, &key.private_key_to_pem_pkcs8()?)?;
        key
    };
    let state_path = dir.join(STATE_FILE);
    if !state_path.exists() {
        write_atomic(
            &state_path,
            &serde_cbor::to_vec(&DeviceState::new(device_id))?,
        )?;
    }
    Ok(crypto::public_point(&key)?)
}

fn read_key(path: &Path) -> Result<PKey<Private>, StoreError> {
    let pem = fs::read(path).map_err(io_err(path))?;
    Ok(PKey::private_key_from_pem(&pem)?)
}

impl Store {
    /// Opens a provisioned device.
    pub fn open(store_root: &Path, device_id: &str) -> Result<Store, StoreError> {
        let dir = device_dir(store_root, device_id)?;
        let key_path = dir.join(FACTORY_KEY);
        if !key_path.exists() {
            return Err(StoreError::NotProvisioned(device_id.to_owned()));
        }
        let factory_key = read_key(&key_path)?;
        let state_path = dir.join(STATE_FILE);
        let state = match fs::read(&state_path) {
            Ok(bytes) => serde_cbor::from_slice::<DeviceState>(&bytes)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DeviceState::new(device_id),
            Err(e) => return Err(io_err(&state_path)(e)),
        };
        if state.v != STATE_VERSION {
            return Err(StoreError::Version(state.v));
        }
        if state.device_id != device_id {
            return Err(StoreError::WrongDevice {
                expected: device_id.to_owned(),
                found: state.device_id,
            });
        }
        if let Some(uuid) = &state.uuid {
            if uuid.len() != 16 {
                return Err(StoreError::BadUuid(uuid.len()));
            }
        }
        Ok(Store {
            dir,
            factory_key,
            state,
        })
    }

    pub fn device_id(&self) -> &str {
        &self.state.device_id
    }

    pub fn state(&self) -> &DeviceState {
        &self.state
    }

    pub fn factory_key(&self) -> &PKey<Private> {
        &self.factory_key
    }

    /// Changes the state and persists it; on a failed write the in-memory
    /// state is rolled back so memory never runs ahead of the disk.
    pub fn update_state(
        &mut self,
        change: impl FnOnce(&mut DeviceState),
    ) -> Result<(), StoreError> {
        let mut next = self.state.clone();
        change(&mut next);
        write_atomic(&self.dir.join(STATE_FILE), &serde_cbor::to_vec(&next)?)?;
        self.state = next;
        Ok(())
    }

    /// Records a successful activation.
    pub fn set_activation(&mut self, service_id: &str, uuid: &[u8]) -> Result<(), StoreError> {
        validate_service_id(service_id)?;
        if uuid.len() != 16 {
            return Err(StoreError::BadUuid(uuid.len()));
        }
        self.update_state(|s| {
            s.service_id = Some(service_id.to_owned());
            s.uuid = Some(uuid.to_vec());
        })
    }

    fn service_paths(&self, service_id: &str) -> Result<(PathBuf, PathBuf), StoreError> {
        validate_service_id(service_id)?;
        Ok((
            self.dir.join(format!("service-{service_id}.key")),
            self.dir.join(format!("service-{service_id}.pem")),
        ))
    }

    /// The root CAs the manager gave the device to pin (`roots` in a
    /// reply), PEM, if it gave any; they replace the configured root file.
    pub fn pinned_roots(&self) -> Result<Option<Vec<u8>>, StoreError> {
        read_if_there(&self.dir.join(ROOTS_FILE))
    }

    /// Stores the roots to pin from now on (PEM), replacing those before.
    pub fn pin_roots(&self, pem: &[u8]) -> Result<(), StoreError> {
        write_atomic(&self.dir.join(ROOTS_FILE), pem)
    }

    /// The certificate of the manager signing key learned last (PEM), if
    /// any; it replaces the configured public key.
    pub fn pinned_signer(&self) -> Result<Option<Vec<u8>>, StoreError> {
        read_if_there(&self.dir.join(SIGNER_FILE))
    }

    /// Stores the certificate of the manager signing key to take messages
    /// by from now on (PEM), replacing the key before.
    pub fn pin_signer(&self, pem: &[u8]) -> Result<(), StoreError> {
        write_atomic(&self.dir.join(SIGNER_FILE), pem)
    }

    /// Stores the key and chain (DER, leaf first) for `service_id`. The key
    /// is written first: a chain on disk always has its key beside it.
    pub fn save_service_credentials(
        &self,
        service_id: &str,
        key: &PKey<Private>,
        chain: &[X509],
    ) -> Result<(), StoreError> {
        let (key_path, chain_path) = self.service_paths(service_id)?;
        write_atomic(&key_path, &key.private_key_to_pem_pkcs8()?)?;
        let mut pem = Vec::new();
        for cert in chain {
            pem.extend_from_slice(&cert.to_pem()?);
        }
        write_atomic(&chain_path, &pem)
    }

    /// Drops the chain and key for `service_id` (the chain first: a key
    /// alone is never taken for credentials), if stored.
    pub fn forget_service_credentials(&self, service_id: &str) -> Result<(), StoreError> {
        let (key_path, chain_path) = self.service_paths(service_id)?;
        for path in [&chain_path, &key_path] {
            match fs::remove_file(path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io_err(path)(e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Drops the activation (UUID and service id) after an operator's
    /// reset ended it: the device activates again, without a service id,
    /// and is given its registered service (topics.md §7.1).
    pub fn forget_activation(&mut self) -> Result<(), StoreError> {
        self.update_state(|s| {
            s.uuid = None;
            s.service_id = None;
        })
    }

    /// The key and chain for `service_id`, if stored.
    pub fn service_credentials(
        &self,
        service_id: &str,
    ) -> Result<Option<ServiceCredentials>, StoreError> {
        let (key_path, chain_path) = self.service_paths(service_id)?;
        if !key_path.exists() || !chain_path.exists() {
            return Ok(None);
        }
        let creds = ServiceCredentials {
            key_pem: fs::read(&key_path).map_err(io_err(&key_path))?,
            chain_pem: fs::read(&chain_path).map_err(io_err(&chain_path))?,
        };
        // The two files are replaced one after the other: a device stopped
        // between them (a renewal's new key beside the old chain) has no
        // usable pair, and asks for another as if it had none.
        let matches = PKey::private_key_from_pem(&creds.key_pem)
            .ok()
            .zip(X509::from_pem(&creds.chain_pem).ok())
            .is_some_and(|(key, leaf)| leaf.public_key().is_ok_and(|p| p.public_eq(&key)));
        if !matches {
            tracing::warn!(
                service_id,
                "the stored key and certificate do not match: asking for another"
            );
            return Ok(None);
        }
        Ok(Some(creds))
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn provision_is_idempotent_and_private() {
        let root = tempfile::tempdir().unwrap();
        let a = provision(root.path(), "dev-1").unwrap();
        let b = provision(root.path(), "dev-1").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 65);
        let dir = root.path().join("dev-1");
        assert_eq!(mode(&dir.join(FACTORY_KEY)), 0o600);
        assert_eq!(mode(&dir.join(STATE_FILE)), 0o600);
        assert_eq!(mode(&dir), 0o700);
        let other = provision(root.path(), "dev-2").unwrap();
        assert_ne!(a, other);
        let store = Store::open(root.path(), "dev-1").unwrap();
        assert_eq!(crypto::public_point(store.factory_key()).unwrap(), a);
        assert_eq!(store.state(), &DeviceState::new("dev-1"));
    }

    #[test]
    fn rejects_bad_ids_and_unprovisioned() {
        let root = tempfile::tempdir().unwrap();
        assert!(provision(root.path(), "../x").is_err());
        assert!(provision(root.path(), "").is_err());
        assert!(matches!(
            Store::open(root.path(), "nobody"),
            Err(StoreError::NotProvisioned(_))
        ));
    }

    #[test]
    fn state_survives_reopen() {
        let root = tempfile::tempdir().unwrap();
        provision(root.path(), "dev1").unwrap();
        let mut store = Store::open(root.path(), "dev1").unwrap();
        store.set_activation("svcA", &[7u8; 16]).unwrap();
        assert!(store.set_activation("svc-A", &[7u8; 16]).is_err());
        assert!(store.set_activation("svcA", &[7u8; 15]).is_err());
        store.update_state(|s| s.last_notice_seq = 42).unwrap();
        let reopened = Store::open(root.path(), "dev1").unwrap();
        assert_eq!(reopened.state().service_id.as_deref(), Some("svcA"));
        assert_eq!(reopened.state().uuid_key(), Some(&[7u8; 16][..]));
        assert_eq!(reopened.state().last_notice_seq, 42);
        // No temporary file is left behind.
        let names: Vec<_> = fs::read_dir(root.path().join("dev1"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn service_credentials_round_trip() {
        let root = tempfile::tempdir().unwrap();
        provision(root.path(), "dev1").unwrap();
        let store = Store::open(root.path(), "dev1").unwrap();
        assert!(store.service_credentials("svcA").unwrap().is_none());
        let key = crypto::generate_p256().unwrap();
        let cert = crate::testutil::self_signed("dev1", &key);
        store
            .save_service_credentials("svcA", &key, &[cert.clone(), cert.clone()])
            .unwrap();
        let creds = store.service_credentials("svcA").unwrap().unwrap();
        assert!(creds.key_pem.starts_with(b"-----BEGIN PRIVATE KEY-----"));
        assert_eq!(X509::stack_from_pem(&creds.chain_pem).unwrap().len(), 2);
        let dir = root.path().join("dev1");
        assert_eq!(mode(&dir.join("service-svcA.key")), 0o600);
        assert!(store.service_credentials("../x").is_err());
        // Stopped between the two writes of a renewal: a new key beside
        // the old chain is no pair at all.
        let new_key = crypto::generate_p256().unwrap();
        write_atomic(
            &dir.join("service-svcA.key"),
            &new_key.private_key_to_pem_pkcs8().unwrap(),
        )
        .unwrap();
        assert!(store.service_credentials("svcA").unwrap().is_none());
    }
}

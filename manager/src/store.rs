//! Registry and history in sled.
//!
//! Trees (values are CBOR maps carrying a schema version `sv`):
//! - `registrations`: device id → [`Registration`] (pre-registered devices, factory key).
//! - `devices`: device id → [`DeviceRecord`] (current service, uuid, state, pending change).
//! - `service_history`: device id ‖ 0x00 ‖ big-endian u64 → [`ServicePeriod`].
//! - `certs`: serial hex → [`CertRecord`].
//! - `nonces`: device id ‖ 0x00 ‖ nonce → [`NonceRecord`] (replay guard and reply cache).
//! - `revoked`: service id ‖ 0x00 ‖ serial → revocation time (ms, big-endian
//!   u64) ‖ the issuing CA's generation (big-endian u32; absent in entries
//!   written before CA roll-over, which are all of generation 1), the
//!   source of the service's CRLs.
//! - `audit`: big-endian u64 id → [`AuditRecord`] (operator actions).
//!
//! A transition that issues a certificate and opens a service period is one
//! sled transaction over `devices`, `service_history`, `certs` and `nonces`.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, TransactionalTree};
use sled::Transactional;

pub const SCHEMA_VERSION: u8 = 1;

/// One raw entry of [`Store::snapshot`]: tree name, key, value.
pub type SnapshotEntry = (String, Vec<u8>, Vec<u8>);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored value does not decode: {0}")]
    Decode(#[from] serde_cbor::Error),
    #[error("transaction aborted: {0}")]
    Aborted(String),
}

impl From<TransactionError<String>> for StoreError {
    fn from(e: TransactionError<String>) -> Self {
        match e {
            TransactionError::Abort(reason) => StoreError::Aborted(reason),
            TransactionError::Storage(err) => StoreError::Sled(err),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    pub sv: u8,
    pub device_id: String,
    pub initial_service: String,
    /// Factory public key, SEC1 P-256 point. `None` only under open enrollment.
    #[serde(default)]
    pub factory_key: Option<serde_bytes::ByteBuf>,
    pub registered_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Active,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingChange {
    pub change_id: String,
    pub service_id: String,
    pub provider: Option<String>,
    pub application: Option<String>,
    pub endpoint: Option<String>,
    pub requested_ms: u64,
    /// Sequence number of the notice, fixed when the change is requested so
    /// every re-send is the same notice.
    pub seq: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub sv: u8,
    pub device_id: String,
    pub state: DeviceState,
    #[serde(with = "serde_bytes")]
    pub uuid: Vec<u8>,
    pub service_id: String,
    pub provider: Option<String>,
    pub application: Option<String>,
    pub activated_ms: u64,
    /// Serial of the certificate in use, if any.
    pub current_cert: Option<String>,
    /// Key of the open service period in `service_history`, if any.
    pub open_period: Option<u64>,
    pub pending: Option<PendingChange>,
    /// Last time the device reported `online` on its current service.
    pub last_seen_ms: Option<u64>,
    /// Superseded certificates not yet revoked: revoked once the device
    /// reports from its new certificate (or after a grace period), so a
    /// device whose reply is still in flight is never stranded.
    #[serde(default)]
    pub pending_revocation: Vec<String>,
    /// The generations of the fleet's root CA the device said it pins
    /// (`pinned_roots` of its last `status` report that had them, topics.md
    /// §3.5.4), ascending; `None` until it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_roots: Option<Vec<u32>>,
    /// The `ts` of the report that last changed `pinned_roots`: an older
    /// report changes them no more (topics.md §3.5.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_roots_ts: Option<u64>,
    /// The generation of the manager signing key the device said it takes
    /// messages by (`signing_key` of its reports, topics.md §3.5.4); `None`
    /// until it says, or if it named no key of the manager's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<u32>,
    /// The `ts` of the report that last changed `signing_key`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key_ts: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePeriod {
    pub sv: u8,
    pub device_id: String,
    pub service_id: String,
    pub provider: Option<String>,
    pub application: Option<String>,
    pub started_ms: u64,
    pub ended_ms: Option<u64>,
    /// Why it started: `activated` or `service_change`.
    pub reason: String,
    pub end_reason: Option<String>,
    pub change_id: Option<String>,
    /// First time the device reported from this service.
    pub confirmed_ms: Option<u64>,
    pub cert_serial: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertStatus {
    Active,
    /// Replaced by a newer certificate and revoked.
    Superseded,
    Revoked,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRecord {
    pub sv: u8,
    pub serial: String,
    pub device_id: String,
    pub service_id: String,
    pub not_before: u64,
    pub not_after: u64,
    pub fingerprint_sha256: String,
    /// `csr` or `manager`.
    pub key_mode: String,
    pub status: CertStatus,
    pub issued_ms: u64,
    pub superseded_by: Option<String>,
    /// When a newer certificate replaced it.
    #[serde(default)]
    pub superseded_ms: Option<u64>,
    pub revoked_ms: Option<u64>,
    /// Revoked because its device did not report from the certificate that
    /// superseded it within `revoke_superseded_after_secs`: its device may
    /// still hold a connection with it (an external broker's is cut,
    /// topics.md §10.3).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub revoked_at_grace_end: bool,
    /// The certificate itself, DER.
    #[serde(with = "serde_bytes")]
    pub der: Vec<u8>,
    /// The generation of the service CA that issued it (1, the first, for
    /// records from before CA roll-over).
    #[serde(default = "first_generation")]
    pub ca_generation: u32,
}

impl CertRecord {
    /// Neither revoked nor expired at `now_ms`.
    pub fn is_live(&self, now_ms: u64) -> bool {
        self.revoked_ms.is_none() && self.not_after * 1000 > now_ms
    }
}

fn first_generation() -> u32 {
    1
}

/// A revocation list entry: the time and the issuing CA's generation.
fn revoked_value(c: &CertRecord, at_ms: u64) -> [u8; 12] {
    let mut v = [0u8; 12];
    v[..8].copy_from_slice(&at_ms.to_be_bytes());
    v[8..].copy_from_slice(&c.ca_generation.to_be_bytes());
    v
}

/// One entry of a service's revocation list ([`Store::revoked_of`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub serial: String,
    pub at_ms: u64,
    pub ca_generation: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NonceRecord {
    pub sv: u8,
    /// SHA-256 of the request envelope bytes.
    #[serde(with = "serde_bytes")]
    pub digest: Vec<u8>,
    /// The encoded reply sent for it.
    #[serde(with = "serde_bytes")]
    pub reply: Vec<u8>,
    pub ts_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub sv: u8,
    pub at_ms: u64,
    pub action: String,
    pub device_id: Option<String>,
    pub detail: String,
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_cbor::to_vec(v).expect("CBOR encoding of a record cannot fail")
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    Ok(serde_cbor::from_slice(bytes)?)
}

/// The prefix of a tree's keys under one id: the id and a 0 byte.
fn key_prefix(id: &str) -> Vec<u8> {
    let mut k = id.as_bytes().to_vec();
    k.push(0);
    k
}

pub fn period_key(device_id: &str, n: u64) -> Vec<u8> {
    let mut k = key_prefix(device_id);
    k.extend_from_slice(&n.to_be_bytes());
    k
}

pub fn nonce_key(device_id: &str, nonce: &[u8]) -> Vec<u8> {
    let mut k = key_prefix(device_id);
    k.extend_from_slice(nonce);
    k
}

/// Writes staged by a handler, applied atomically by [`Store::commit`].
#[derive(Default, Debug)]
pub struct Batch {
    pub device: Option<DeviceRecord>,
    pub periods: Vec<(u64, ServicePeriod)>,
    pub certs: Vec<CertRecord>,
    pub nonce: Option<(Vec<u8>, NonceRecord)>,
    /// A device record to delete (an operator's reset).
    pub remove_device: Option<String>,
}

fn revoked_key(service_id: &str, serial: &str) -> Vec<u8> {
    let mut k = key_prefix(service_id);
    k.extend_from_slice(serial.as_bytes());
    k
}

/// Group commit for [`Store::commit`]: what was committed before a caller
/// asked is on disk when it returns, and callers that ask while a flush
/// runs share the next one.
#[derive(Default)]
struct Durable {
    state: std::sync::Mutex<DurableState>,
    flushed: std::sync::Condvar,
}

#[derive(Default)]
struct DurableState {
    /// Callers that asked so far (each one's ticket).
    asked: u64,
    /// Every ticket up to this one is on disk.
    done: u64,
    flushing: bool,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    durable: std::sync::Arc<Durable>,
    /// Set at the first I/O error of a write or a flush: sled then fails
    /// every operation that follows, and the manager says so in its health.
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    registrations: sled::Tree,
    devices: sled::Tree,
    history: sled::Tree,
    certs: sled::Tree,
    nonces: sled::Tree,
    audit: sled::Tree,
    revoked: sled::Tree,
}

impl Store {
    pub fn open(path: &std::path::Path) -> Result<Store, StoreError> {
        let db = sled::open(path)?;
        Ok(Store {
            registrations: db.open_tree("registrations")?,
            devices: db.open_tree("devices")?,
            history: db.open_tree("service_history")?,
            certs: db.open_tree("certs")?,
            nonces: db.open_tree("nonces")?,
            audit: db.open_tree("audit")?,
            revoked: db.open_tree("revoked")?,
            db,
            durable: Default::default(),
            failed: Default::default(),
        })
    }

    /// Whether a write or a flush met an I/O error (a full or failing
    /// disk): from then on sled fails every operation, and what was
    /// answered since the last flush may not be on disk.
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `result`, noting an I/O error in it ([`Store::failed`]), logged once.
    /// A single write to a tree, [`Store::noted`].
    fn wrote<T>(&self, result: sled::Result<T>) -> Result<(), StoreError> {
        self.noted(result.map(drop).map_err(Into::into))
    }

    fn noted<T>(&self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(StoreError::Sled(sled::Error::Io(err))) = &result {
            if !self.failed.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::error!(
                    error = %err,
                    "the store failed to write: requests that change state are answered \
                     `internal` until the manager is restarted on a working disk"
                );
            }
        }
        result
    }

    /// Returns once everything written before the call is on disk. A reply
    /// goes out only after the state it reports is durable: sled writes
    /// its log to disk every 500 ms by itself, and a manager killed in
    /// between had sent certificates and moves that it then had no record
    /// of. Callers that ask while a flush runs wait for the next one, which
    /// covers them all.
    pub fn sync(&self) -> Result<(), StoreError> {
        let durable = &*self.durable;
        let lock = || durable.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = lock();
        state.asked += 1;
        let mine = state.asked;
        loop {
            if state.done >= mine {
                return Ok(());
            }
            if state.flushing {
                state = durable
                    .flushed
                    .wait(state)
                    .unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Covers every ticket taken so far: their writes came first.
            let upto = state.asked;
            state.flushing = true;
            drop(state);
            // Whatever the flush does, panics included, the next caller
            // may flush.
            struct Release<'a>(&'a Durable);
            impl Drop for Release<'_> {
                fn drop(&mut self) {
                    let mut state = self.0.state.lock().unwrap_or_else(|p| p.into_inner());
                    state.flushing = false;
                    self.0.flushed.notify_all();
                }
            }
            let release = Release(durable);
            let flushed = self.noted(self.db.flush().map_err(StoreError::from));
            if flushed.is_ok() {
                let mut state = lock();
                state.done = state.done.max(upto);
            }
            drop(release);
            flushed?;
            state = lock();
        }
    }

    /// A number greater than every one handed out before, across restarts.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        self.noted(self.db.generate_id().map(|id| id + 1).map_err(Into::into))
    }

    pub fn put_registration(&self, reg: &Registration) -> Result<(), StoreError> {
        let put = self
            .registrations
            .insert(reg.device_id.as_bytes(), encode(reg));
        self.wrote(put)
    }

    /// Whether the registry has `device_id` (a store error counts as no).
    pub fn is_registered(&self, device_id: &str) -> bool {
        self.registrations.contains_key(device_id).unwrap_or(false)
    }

    pub fn registration(&self, device_id: &str) -> Result<Option<Registration>, StoreError> {
        self.registrations
            .get(device_id)?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn device(&self, device_id: &str) -> Result<Option<DeviceRecord>, StoreError> {
        self.devices.get(device_id)?.map(|v| decode(&v)).transpose()
    }

    pub fn put_device(&self, device: &DeviceRecord) -> Result<(), StoreError> {
        let put = self
            .devices
            .insert(device.device_id.as_bytes(), encode(device));
        self.wrote(put)
    }

    pub fn remove_device(&self, device_id: &str) -> Result<(), StoreError> {
        self.wrote(self.devices.remove(device_id))
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.devices.iter().values().map(|v| decode(&v?)).collect()
    }

    pub fn registrations(&self) -> Result<Vec<Registration>, StoreError> {
        self.registrations
            .iter()
            .values()
            .map(|v| decode(&v?))
            .collect()
    }

    /// Every service period of a device, oldest first.
    pub fn history(&self, device_id: &str) -> Result<Vec<(u64, ServicePeriod)>, StoreError> {
        self.history
            .scan_prefix(key_prefix(device_id))
            .map(|kv| {
                let (k, v) = kv?;
                let mut n = [0u8; 8];
                n.copy_from_slice(&k[k.len() - 8..]);
                Ok((u64::from_be_bytes(n), decode(&v)?))
            })
            .collect()
    }

    /// Whether a device has had a service period (and so a certificate).
    pub fn has_history(&self, device_id: &str) -> Result<bool, StoreError> {
        Ok(self
            .history
            .scan_prefix(key_prefix(device_id))
            .next()
            .transpose()?
            .is_some())
    }

    pub fn period(&self, device_id: &str, n: u64) -> Result<Option<ServicePeriod>, StoreError> {
        self.history
            .get(period_key(device_id, n))?
            .map(|v| decode(&v))
            .transpose()
    }

    pub fn put_period(&self, device_id: &str, n: u64, p: &ServicePeriod) -> Result<(), StoreError> {
        let put = self.history.insert(period_key(device_id, n), encode(p));
        self.wrote(put)
    }

    pub fn cert(&self, serial: &str) -> Result<Option<CertRecord>, StoreError> {
        self.certs.get(serial)?.map(|v| decode(&v)).transpose()
    }

    pub fn certs(&self) -> Result<Vec<CertRecord>, StoreError> {
        self.certs.iter().values().map(|v| decode(&v?)).collect()
    }

    pub fn certs_of(&self, device_id: &str) -> Result<Vec<CertRecord>, StoreError> {
        let mut all: Vec<CertRecord> = self
            .certs()?
            .into_iter()
            .filter(|c| c.device_id == device_id)
            .collect();
        all.sort_by_key(|c| c.issued_ms);
        Ok(all)
    }

    pub fn nonce(&self, key: &[u8]) -> Result<Option<NonceRecord>, StoreError> {
        self.nonces.get(key)?.map(|v| decode(&v)).transpose()
    }

    pub fn put_nonce(&self, key: &[u8], rec: &NonceRecord) -> Result<(), StoreError> {
        let put = self.nonces.insert(key, encode(rec));
        self.wrote(put)
    }

    /// Drops nonce records older than `before_ms`; their requests are stale anyway.
    pub fn prune_nonces(&self, before_ms: u64) -> Result<usize, StoreError> {
        let mut dropped = 0;
        for kv in self.nonces.iter() {
            let (k, v) = kv?;
            let rec: NonceRecord = decode(&v)?;
            if rec.ts_ms < before_ms {
                // Only the write notes a failure (a read's is no full disk).
                self.noted(self.nonces.remove(k).map_err(Into::into))?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    pub fn audit(
        &self,
        action: &str,
        device_id: Option<&str>,
        detail: String,
    ) -> Result<(), StoreError> {
        let id = self.next_id()?;
        let rec = AuditRecord {
            sv: SCHEMA_VERSION,
            at_ms: fleet_protocol::now_ms(),
            action: action.to_owned(),
            device_id: device_id.map(str::to_owned),
            detail,
        };
        let put = self.audit.insert(id.to_be_bytes(), encode(&rec));
        self.wrote(put)
    }

    pub fn audit_log(&self) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit.iter().values().map(|v| decode(&v?)).collect()
    }

    /// Applies a batch atomically, and returns once it is on disk
    /// ([`Store::sync`]). Fails with `Aborted("nonce")` when the nonce was
    /// recorded meanwhile (a concurrent duplicate won).
    pub fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        self.apply(batch)?;
        self.sync()
    }

    /// [`Store::commit`] without waiting for the disk: for a run of
    /// batches (one operator request for thousands of devices) that is
    /// made durable at its end by one [`Store::sync`].
    pub fn apply(&self, batch: &Batch) -> Result<(), StoreError> {
        self.noted(self.transact(batch))
    }

    fn transact(&self, batch: &Batch) -> Result<(), StoreError> {
        (
            &self.devices,
            &self.history,
            &self.certs,
            &self.nonces,
            &self.revoked,
        )
            .transaction(|(devices, history, certs, nonces, revoked)| {
                if let Some((key, rec)) = &batch.nonce {
                    if nonces.get(key)?.is_some() {
                        return abort("nonce");
                    }
                    nonces.insert(key.as_slice(), encode(rec))?;
                }
                if let Some(device) = &batch.device {
                    devices.insert(device.device_id.as_bytes(), encode(device))?;
                }
                if let Some(id) = &batch.remove_device {
                    devices.remove(id.as_bytes())?;
                }
                for (n, period) in &batch.periods {
                    history.insert(period_key(&period.device_id, *n), encode(period))?;
                }
                put_certs(certs, &batch.certs)?;
                for c in &batch.certs {
                    if let Some(at) = c.revoked_ms {
                        revoked
                            .insert(revoked_key(&c.service_id, &c.serial), &revoked_value(c, at))?;
                    }
                }
                Ok(())
            })?;
        Ok(())
    }

    /// Raw dump of every tree, for "nothing changed" assertions.
    pub fn snapshot(&self) -> Result<Vec<SnapshotEntry>, StoreError> {
        let mut out = Vec::new();
        for (name, tree) in [
            ("registrations", &self.registrations),
            ("devices", &self.devices),
            ("service_history", &self.history),
            ("certs", &self.certs),
            ("audit", &self.audit),
        ] {
            for kv in tree.iter() {
                let (k, v) = kv?;
                out.push((name.to_string(), k.to_vec(), v.to_vec()));
            }
        }
        Ok(out)
    }
}

fn abort<T>(reason: &str) -> Result<T, ConflictableTransactionError<String>> {
    Err(ConflictableTransactionError::Abort(reason.to_owned()))
}

fn put_certs(
    tree: &TransactionalTree,
    certs: &[CertRecord],
) -> Result<(), ConflictableTransactionError<String>> {
    for c in certs {
        tree.insert(c.serial.as_bytes(), encode(c))?;
    }
    Ok(())
}

impl Store {
    /// Stores a certificate record; a revoked one also enters its CA's revocation list.
    pub fn put_cert(&self, c: &CertRecord) -> Result<(), StoreError> {
        let put = (&self.certs, &self.revoked).transaction(|(certs, revoked)| {
            certs.insert(c.serial.as_bytes(), encode(c))?;
            if let Some(at) = c.revoked_ms {
                revoked.insert(revoked_key(&c.service_id, &c.serial), &revoked_value(c, at))?;
            }
            Ok::<_, ConflictableTransactionError<String>>(())
        });
        self.noted(put.map_err(Into::into))
    }

    /// Revoked serials of one service CA with their revocation times (ms).
    pub fn revoked_of(&self, service_id: &str) -> Result<Vec<Revoked>, StoreError> {
        let prefix = key_prefix(service_id);
        self.revoked
            .scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let serial = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                let mut at = [0u8; 8];
                at.copy_from_slice(&v[..8.min(v.len())]);
                let ca_generation = v
                    .get(8..12)
                    .and_then(|g| <[u8; 4]>::try_from(g).ok())
                    .map_or(1, u32::from_be_bytes);
                Ok(Revoked {
                    serial,
                    at_ms: u64::from_be_bytes(at),
                    ca_generation,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set for the child process of
    /// [`a_batch_committed_is_on_disk_when_commit_returns`].
    const CHILD_STORE: &str = "FLEET_TEST_CHILD_STORE";

    fn nonce_batch(i: u8) -> Batch {
        Batch {
            nonce: Some((
                nonce_key("d1", &[i; 16]),
                NonceRecord {
                    sv: SCHEMA_VERSION,
                    digest: vec![i; 32],
                    reply: vec![i; 100],
                    ts_ms: 1,
                },
            )),
            ..Batch::default()
        }
    }

    /// The child's part: commits, then dies at once, as a killed manager
    /// would, with no flush on the way out.
    #[test]
    fn child_commits_and_dies() {
        let Some(dir) = std::env::var_os(CHILD_STORE) else {
            return;
        };
        let store = Store::open(std::path::Path::new(&dir)).unwrap();
        for i in 0..3 {
            store.commit(&nonce_batch(i)).unwrap();
        }
        std::process::abort();
    }

    /// Set for the child process of [`a_store_whose_disk_fills_says_so`].
    const CHILD_FULL: &str = "FLEET_TEST_CHILD_FULL";

    /// The child's part, run with a limit on the size of the files it
    /// writes (`ulimit -f`): commits until its disk is "full", then checks
    /// that the store says so and fails what follows. Prints what it saw.
    #[test]
    fn child_fills_its_disk() {
        let Some(dir) = std::env::var_os(CHILD_FULL) else {
            return;
        };
        let store = Store::open(std::path::Path::new(&dir)).unwrap();
        assert!(!store.failed());
        for i in 0..1000u32 {
            let mut batch = nonce_batch(0);
            if let Some((key, rec)) = &mut batch.nonce {
                key.extend_from_slice(&i.to_be_bytes());
                rec.reply = vec![7; 64 * 1024];
            }
            if store.commit(&batch).is_err() {
                assert!(store.failed(), "an I/O error noted");
                assert!(store.commit(&nonce_batch(1)).is_err());
                assert!(store.sync().is_err());
                println!("FULL after {i} batches");
                return;
            }
        }
        panic!("the disk never filled");
    }

    /// A store whose disk fills (here: a file grows past the process's
    /// limit, EFBIG) reports it through [`Store::failed`], which the
    /// health answers with, and fails every write that follows.
    #[test]
    fn a_store_whose_disk_fills_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        // 4 MiB of file at most (in 1 KiB blocks); SIGXFSZ ignored, so
        // that the write fails rather than the process.
        let out = std::process::Command::new("bash")
            .arg("-c")
            .arg("trap '' XFSZ; ulimit -f 4096; exec \"$0\" --exact store::tests::child_fills_its_disk --nocapture")
            .arg(exe)
            .env(CHILD_FULL, dir.path().join("store"))
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("FULL after"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// What `commit` has returned for is on disk: a process that dies the
    /// moment after (here by `abort`, with no flush on the way out) loses
    /// none of it. sled alone writes its log every 500 ms.
    #[test]
    fn a_batch_committed_is_on_disk_when_commit_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::child_commits_and_dies",
                "--nocapture",
            ])
            .env(CHILD_STORE, &path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(!status.success(), "the child did not die");
        let store = Store::open(&path).unwrap();
        for i in 0..3 {
            assert!(
                store.nonce(&nonce_key("d1", &[i; 16])).unwrap().is_some(),
                "batch {i} lost"
            );
        }
    }

    /// Callers side by side each find their batch on disk, sharing
    /// flushes.
    #[test]
    fn commits_side_by_side_all_return() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("store")).unwrap();
        std::thread::scope(|scope| {
            for t in 0..8u8 {
                let store = store.clone();
                scope.spawn(move || {
                    for i in 0..20u8 {
                        store.commit(&nonce_batch(t * 20 + i)).unwrap();
                    }
                });
            }
        });
        let state = store.durable.state.lock().unwrap();
        assert_eq!((state.asked, state.done), (160, 160));
        assert!(!state.flushing);
    }
}

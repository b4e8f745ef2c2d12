//! File helpers: atomic writes with an explicit mode, reads that name the
//! path in their error, and PEM loading.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use openssl::pkey::{PKey, Private};
use openssl::x509::X509;

use crate::PkiError;

/// Private keys: owner read/write only.
pub(crate) const KEY_MODE: u32 = 0o600;
/// Certificates, public keys and CRLs.
pub(crate) const PUBLIC_MODE: u32 = 0o644;

pub(crate) fn file_error(path: &Path, source: std::io::Error) -> PkiError {
    PkiError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to a fresh temporary file beside `path` created with
/// `mode`, syncs it and renames it over `path`. Readers see the old file or
/// the new one, never a torn one, and a key is never readable by others,
/// not even for a moment.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    replace(path, bytes, mode, true)
}

/// As [`write_atomic`], but without syncing: for files rebuilt from
/// elsewhere after a crash (the broker's grants, see `grants`).
pub(crate) fn replace_unsynced(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    replace(path, bytes, mode, false)
}

fn replace(path: &Path, bytes: &[u8], mode: u32, durable: bool) -> Result<(), PkiError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .ok_or_else(|| file_error(path, std::io::ErrorKind::InvalidInput.into()))?
        .to_string_lossy();
    let tmp: PathBuf = path.with_file_name(format!(
        ".{name}.tmp.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        if durable {
            file.sync_all()?;
        }
        fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let (true, Some(parent)) = (durable, path.parent()) {
            fs::File::open(parent)?.sync_all()?;
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = fs::remove_file(&tmp);
        file_error(path, e)
    })
}

/// Whether `path` was last modified at least `secs` seconds ago (false if
/// that cannot be told, a time ahead of the clock included).
pub(crate) fn older_than(path: &Path, secs: u64) -> bool {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|at| at.elapsed().ok())
        .is_some_and(|age| age.as_secs() >= secs)
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|e| file_error(path, e))
}

/// Makes the renames and removals in directory `path` durable.
pub(crate) fn sync_dir(path: &Path) -> Result<(), PkiError> {
    fs::File::open(path)
        .and_then(|dir| dir.sync_all())
        .map_err(|e| file_error(path, e))
}

pub(crate) fn create_dir(path: &Path) -> Result<(), PkiError> {
    fs::create_dir_all(path).map_err(|e| file_error(path, e))
}

pub(crate) fn load_cert(path: &Path) -> Result<X509, PkiError> {
    Ok(X509::from_pem(&read(path)?)?)
}

/// Loads a PEM private key, warning if the file is readable by others.
pub(crate) fn load_private_key(path: &Path) -> Result<PKey<Private>, PkiError> {
    let meta = fs::metadata(path).map_err(|e| file_error(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format_args!("{mode:o}"), "private key file is accessible to group or others");
    }
    Ok(PKey::private_key_from_pem(&read(path)?)?)
}

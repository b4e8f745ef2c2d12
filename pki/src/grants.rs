//! Registry grants on disk: which services each device (or service
//! provider) may connect to.
//!
//! `grants/{device_id}` holds the service ids the registry grants that
//! device at the broker's service listener, one per line: its current
//! service, the pending one while it migrates, and the services of
//! superseded certificates not yet revoked. The manager writes the file
//! before it sends any reply that relies on it and removes it when the
//! device is reset; the broker checks it at every mutual-TLS handshake and
//! refuses a certificate whose (CN, O) it does not list. No file means no
//! grant. A service provider's file is `grants/provider.{name}` and lists
//! the services it has a certificate for. The broker keeps what it read
//! and reads a file again when inotify reports it changed (the event is
//! queued by the system call that changes the file, so the next handshake
//! sees the change).
//!
//! Files are replaced by rename, so a reader sees the old list or the new
//! one. They are not synced: the manager rewrites every file from its
//! store when it starts, so a list lost in a crash comes back then.

use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use fleet_protocol::topic::{validate_device_id, validate_service_id};

use crate::files::{self, file_error, PUBLIC_MODE};
use crate::PkiError;

/// `certs_dir/grants`.
pub fn grants_dir(certs_dir: &Path) -> PathBuf {
    certs_dir.join("grants")
}

/// CN prefix of a service provider's certificate. Device ids never hold a
/// dot, so no device can be taken for a provider or the other way round.
pub const PROVIDER_PREFIX: &str = "provider.";

/// The principal (certificate CN, grant file name) of provider `name`.
pub fn provider_principal(name: &str) -> String {
    format!("{PROVIDER_PREFIX}{name}")
}

/// Whether `principal` is a device id or `provider.{name}` with `name`
/// spelled like a device id.
pub fn validate_principal(principal: &str) -> bool {
    let id = principal.strip_prefix(PROVIDER_PREFIX).unwrap_or(principal);
    validate_device_id(id).is_ok()
}

/// Grant files are named by principal: a device id, or a provider's CN.
fn grant_path(certs_dir: &Path, device_id: &str) -> Result<PathBuf, PkiError> {
    if !validate_principal(device_id) {
        return Err(PkiError::BadDeviceId(device_id.to_owned()));
    }
    Ok(grants_dir(certs_dir).join(device_id))
}

/// Replaces the grants of `device_id` with `services` (deduplicated, in
/// order); an empty list removes the file. Returns whether anything changed.
pub fn write_grants(
    certs_dir: &Path,
    device_id: &str,
    services: &[String],
) -> Result<bool, PkiError> {
    let path = grant_path(certs_dir, device_id)?;
    let mut lines: Vec<&str> = Vec::with_capacity(services.len());
    for s in services {
        validate_service_id(s).map_err(|_| PkiError::BadServiceId(s.clone()))?;
        if !lines.contains(&s.as_str()) {
            lines.push(s);
        }
    }
    if lines.is_empty() {
        return remove_grants(certs_dir, device_id);
    }
    let mut text = lines.join("\n");
    text.push('\n');
    match fs::read(&path) {
        Ok(old) if old == text.as_bytes() => return Ok(false),
        _ => {}
    }
    files::create_dir(&grants_dir(certs_dir))?;
    files::replace_unsynced(&path, text.as_bytes(), PUBLIC_MODE)?;
    Ok(true)
}

/// Adds `service_id` to the grants of `principal`, keeping the others.
pub fn add_grant(certs_dir: &Path, principal: &str, service_id: &str) -> Result<bool, PkiError> {
    let mut services = read_grants(certs_dir, principal)?;
    services.push(service_id.to_owned());
    write_grants(certs_dir, principal, &services)
}

/// Removes every grant of `device_id`. Returns whether a file was there.
pub fn remove_grants(certs_dir: &Path, device_id: &str) -> Result<bool, PkiError> {
    let path = grant_path(certs_dir, device_id)?;
    match fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(file_error(&path, e)),
    }
}

/// The services granted to `device_id`; empty if it has no grant file or
/// its id is not a device id.
pub fn read_grants(certs_dir: &Path, device_id: &str) -> Result<Vec<String>, PkiError> {
    let Ok(path) = grant_path(certs_dir, device_id) else {
        return Ok(Vec::new());
    };
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| validate_service_id(l).is_ok())
            .map(str::to_owned)
            .collect()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(file_error(&path, e)),
    }
}

/// Whether the registry grants `device_id` the service `service_id`.
/// Unreadable files grant nothing.
pub fn is_granted(certs_dir: &Path, device_id: &str, service_id: &str) -> bool {
    read_grants(certs_dir, device_id).is_ok_and(|s| s.iter().any(|g| g == service_id))
}

/// The device ids that have a grant file.
pub fn granted_devices(certs_dir: &Path) -> Result<Vec<String>, PkiError> {
    let dir = grants_dir(certs_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(file_error(&dir, e)),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|e| file_error(&dir, e))?;
        if let Some(name) = e.file_name().to_str() {
            if validate_principal(name) {
                out.push(name.to_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn write_read_replace_remove() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(!is_granted(d, "dev1", "svcA"));
        assert!(write_grants(d, "dev1", &svc(&["svcA", "svcB", "svcA"])).unwrap());
        assert_eq!(read_grants(d, "dev1").unwrap(), svc(&["svcA", "svcB"]));
        assert_eq!(
            fs::read_to_string(grants_dir(d).join("dev1")).unwrap(),
            "svcA\nsvcB\n"
        );
        // The same list again changes nothing.
        assert!(!write_grants(d, "dev1", &svc(&["svcA", "svcB"])).unwrap());
        assert!(!add_grant(d, "dev1", "svcB").unwrap());
        assert!(write_grants(d, "dev1", &svc(&["svcB"])).unwrap());
        assert!(!is_granted(d, "dev1", "svcA"));
        assert!(is_granted(d, "dev1", "svcB"));
        assert!(!is_granted(d, "dev2", "svcB"));
        assert_eq!(granted_devices(d).unwrap(), svc(&["dev1"]));
        // An empty list is no grant at all.
        assert!(write_grants(d, "dev1", &[]).unwrap());
        assert!(!is_granted(d, "dev1", "svcB"));
        assert!(!remove_grants(d, "dev1").unwrap());
        assert!(granted_devices(d).unwrap().is_empty());
        // No temporary file is left behind.
        assert_eq!(fs::read_dir(grants_dir(d)).unwrap().count(), 0);
    }

    #[test]
    fn ids_that_could_escape_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(write_grants(d, "provider.weather", &svc(&["svcA"])).unwrap());
        assert!(is_granted(d, "provider.weather", "svcA"));
        for bad in [
            "../x",
            "a/b",
            "",
            ".hidden",
            "a.b",
            "provider.",
            "provider.a.b",
            "provider../x",
        ] {
            assert!(write_grants(d, bad, &svc(&["svcA"])).is_err(), "{bad:?}");
            assert!(!is_granted(d, bad, "svcA"), "{bad:?}");
        }
        assert!(write_grants(d, "dev1", &svc(&["svc/A"])).is_err());
        assert!(write_grants(d, "dev1", &svc(&["svcA\nsvcB"])).is_err());
    }
}

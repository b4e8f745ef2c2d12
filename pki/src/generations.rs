//! Service CA generations: the file names of each, and which to roll or
//! retire when.
//!
//! A service's first CA keeps the names it always had
//! (`services/{svc}-ca.pem`, `.key`, `crl/{svc}.crl.pem`); each successor
//! made by a roll-over is generation n ≥ 2, `services/{svc}-ca.{n}.pem`,
//! `.key` and `crl/{svc}.{n}.crl.pem`. Service ids are alphanumeric, so no
//! name of one generation is a name of another service's. The highest
//! generation whose certificate and key are both on disk issues; every
//! generation on disk is trusted, each with a CRL of its own, until it
//! expires and is moved to `services/retired/` (its CRL to
//! `crl/retired/`).

use std::path::{Path, PathBuf};

/// A successor is made once the issuing CA has less than this left
/// (a fifth of a CA's five years). Device certificates are cut short to
/// their CA's end, so without a successor they would grow shorter.
pub(crate) const ROLL_BEFORE_SECS: u64 = 365 * 86_400;

/// A roll is worth making only if the successor would outlive the issuing
/// CA by this much; it cannot outlive the root, so near the root's end no
/// roll is made again and again.
pub(crate) const ROLL_GAIN_SECS: u64 = 30 * 86_400;

/// The directories, under `services/` and `crl/`, that retired
/// generations are moved to.
pub const RETIRED_DIR: &str = "retired";

/// `services/{svc}-ca{.n}.{ext}` for generation `generation`.
pub(crate) fn ca_file(dir: &Path, service_id: &str, generation: u32, ext: &str) -> PathBuf {
    let name = match generation {
        0 | 1 => format!("{service_id}-ca.{ext}"),
        n => format!("{service_id}-ca.{n}.{ext}"),
    };
    dir.join("services").join(name)
}

/// `crl/{svc}{.n}.crl.pem` for generation `generation`.
pub(crate) fn crl_file(dir: &Path, service_id: &str, generation: u32) -> PathBuf {
    let name = match generation {
        0 | 1 => format!("{service_id}.crl.pem"),
        n => format!("{service_id}.{n}.crl.pem"),
    };
    dir.join("crl").join(name)
}

/// A generation number as file names spell it: decimal, 2 or more, no
/// leading zero.
pub(crate) fn generation_of(digits: &str) -> Option<u32> {
    let ok = !digits.is_empty() && !digits.starts_with('0') && digits.len() <= 9;
    let n: u32 = digits.parse().ok().filter(|_| ok)?;
    (n >= 2).then_some(n)
}

fn service_of(id: &str) -> Option<String> {
    fleet_protocol::topic::validate_service_id(id)
        .is_ok()
        .then(|| id.to_owned())
}

/// The service and generation a file name in `services/` belongs to, and
/// whether it is the certificate (`pem`) or the key (`key`).
pub(crate) fn parse_ca_file(name: &str) -> Option<(String, u32, &str)> {
    let (stem, ext) = name.rsplit_once('.')?;
    if ext != "pem" && ext != "key" {
        return None;
    }
    if let Some(service) = stem.strip_suffix("-ca") {
        return Some((service_of(service)?, 1, ext));
    }
    let (head, digits) = stem.rsplit_once('.')?;
    let service = head.strip_suffix("-ca")?;
    Some((service_of(service)?, generation_of(digits)?, ext))
}

/// The service and generation a CRL's file name in `crl/` is for:
/// `{svc}.crl.pem` (generation 1) or `{svc}.{n}.crl.pem`. The root's
/// (`_root.crl.pem`) is no service's.
pub(crate) fn parse_crl_file(name: &str) -> Option<(String, u32)> {
    let stem = name.strip_suffix(".crl.pem")?;
    match stem.split_once('.') {
        None => Some((service_of(stem)?, 1)),
        Some((service, digits)) => Some((service_of(service)?, generation_of(digits)?)),
    }
}

/// The certificate files of every generation of `service_id`'s CA in
/// `certs_dir/services/`, oldest first (with or without their keys, as a
/// broker that holds no keys sees them).
pub fn service_ca_cert_files(certs_dir: &Path, service_id: &str) -> Vec<PathBuf> {
    let Ok(found) = on_disk(certs_dir, Some(service_id)) else {
        return Vec::new();
    };
    let mut generations: Vec<u32> = found
        .pairs
        .iter()
        .chain(&found.certs_alone)
        .map(|(_, g)| *g)
        .collect();
    generations.sort_unstable();
    generations
        .into_iter()
        .map(|g| ca_file(certs_dir, service_id, g, "pem"))
        .collect()
}

/// Every `(service, generation)` whose certificate and whose key are in
/// `services/`, the keys without a certificate and the certificates
/// without a key, each sorted.
#[derive(Default)]
pub(crate) struct OnDisk {
    pub pairs: Vec<(String, u32)>,
    pub keys_alone: Vec<(String, u32)>,
    pub certs_alone: Vec<(String, u32)>,
}

pub(crate) fn on_disk(dir: &Path, only: Option<&str>) -> std::io::Result<OnDisk> {
    use std::collections::BTreeMap;
    let mut seen: BTreeMap<(String, u32), (bool, bool)> = BTreeMap::new();
    let entries = match std::fs::read_dir(dir.join("services")) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OnDisk::default()),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let name = entry?.file_name();
        let Some((service, generation, ext)) = name.to_str().and_then(parse_ca_file) else {
            continue;
        };
        if only.is_some_and(|s| s != service) {
            continue;
        }
        let slot = seen.entry((service, generation)).or_default();
        match ext {
            "pem" => slot.0 = true,
            _ => slot.1 = true,
        }
    }
    let mut out = OnDisk::default();
    for (id, (cert, key)) in seen {
        match (cert, key) {
            (true, true) => out.pairs.push(id),
            (false, true) => out.keys_alone.push(id),
            _ => out.certs_alone.push(id),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_of_each_generation_are_told_apart() {
        let dir = Path::new("/c");
        assert_eq!(
            ca_file(dir, "svcA", 1, "pem"),
            Path::new("/c/services/svcA-ca.pem")
        );
        assert_eq!(
            ca_file(dir, "svcA", 12, "key"),
            Path::new("/c/services/svcA-ca.12.key")
        );
        assert_eq!(crl_file(dir, "svcA", 3), Path::new("/c/crl/svcA.3.crl.pem"));
        assert_eq!(
            parse_ca_file("svcA-ca.pem"),
            Some(("svcA".into(), 1, "pem"))
        );
        assert_eq!(
            parse_ca_file("svcA-ca.7.key"),
            Some(("svcA".into(), 7, "key"))
        );
        // A service whose id ends in "ca" is still told apart.
        assert_eq!(parse_ca_file("ca-ca.2.pem"), Some(("ca".into(), 2, "pem")));
        for bad in [
            "svcA-ca.1.pem",
            "svcA-ca.02.pem",
            "svcA-ca.x.pem",
            "svcA-ca..pem",
            "svcA.pem",
            "svcA-ca.2.crt",
            ".svcA-ca.pem.tmp.1.2",
            "sv-cA-ca.pem",
            "svcA-ca.99999999999.pem",
        ] {
            assert_eq!(parse_ca_file(bad), None, "{bad}");
        }
        assert_eq!(parse_crl_file("svcA.crl.pem"), Some(("svcA".into(), 1)));
        assert_eq!(parse_crl_file("svcA.4.crl.pem"), Some(("svcA".into(), 4)));
        for bad in [
            "_root.crl.pem",
            "svcA.1.crl.pem",
            "svcA.0.crl.pem",
            "svcA.crl",
            "svcA.4.5.crl.pem",
        ] {
            assert_eq!(parse_crl_file(bad), None, "{bad}");
        }
    }
}

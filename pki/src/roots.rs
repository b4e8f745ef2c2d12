//! Generations of the fleet root CA: the file names of each, and when a
//! successor is due.
//!
//! The first root keeps the names it always had (`root-ca.pem`, `.key`,
//! `crl/_root.crl.pem`). A successor made by a roll-over is generation
//! n ≥ 2: `root-ca.{n}.pem` (self-signed, CN "fleetshift root CA {n}"),
//! `root-ca.{n}.key`, `root-ca.{n}.cross.pem` (the same name and key,
//! certified by generation n-1, so that a device that pins only the
//! root before still verifies a chain of the new one, and takes the new
//! root), `root-ca.{n}.back.pem` (generation n-1's name and key certified
//! by generation n, so that a device that pins only the new root takes
//! the one before) and `crl/_root.{n}.crl.pem`. The highest generation with its certificate
//! and key both on disk issues; every generation that has not expired is
//! trusted, and is handed to devices to pin (`roots` in a reply).

use std::path::{Path, PathBuf};

/// A successor root is made once the issuing root has less than this
/// left: devices learn it over those two years, at any reply, and service
/// CAs move to it as they roll over (a year before their own end).
pub(crate) const ROOT_ROLL_BEFORE_SECS: u64 = 2 * 365 * 86_400;

/// What a file of a root generation holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RootPart {
    Cert,
    Key,
    /// The certificate of generation n's name and key by generation n-1.
    Cross,
    /// The certificate of generation n-1's name and key by generation n.
    Back,
}

impl RootPart {
    fn suffix(self) -> &'static str {
        match self {
            RootPart::Cert => "pem",
            RootPart::Key => "key",
            RootPart::Cross => "cross.pem",
            RootPart::Back => "back.pem",
        }
    }
}

/// `root-ca{.n}.{pem,key,cross.pem}` in `dir` for generation `generation`.
pub(crate) fn root_file(dir: &Path, generation: u32, part: RootPart) -> PathBuf {
    let name = match generation {
        0 | 1 => format!("root-ca.{}", part.suffix()),
        n => format!("root-ca.{n}.{}", part.suffix()),
    };
    dir.join(name)
}

/// `crl/_root{.n}.crl.pem`: `_` keeps it apart from every service id.
pub(crate) fn root_crl_file(dir: &Path, generation: u32) -> PathBuf {
    let name = match generation {
        0 | 1 => "_root.crl.pem".to_owned(),
        n => format!("_root.{n}.crl.pem"),
    };
    dir.join("crl").join(name)
}

/// The generation and part a file name in the PKI directory is of, if it
/// is a root's.
pub(crate) fn parse_root_file(name: &str) -> Option<(u32, RootPart)> {
    let rest = name.strip_prefix("root-ca.")?;
    let (digits, suffix) = match rest.split_once('.') {
        Some((digits, suffix))
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (digits, suffix)
        }
        _ => ("", rest),
    };
    let generation = if digits.is_empty() {
        1
    } else {
        super::generations::generation_of(digits)?
    };
    let part = [
        RootPart::Cert,
        RootPart::Key,
        RootPart::Cross,
        RootPart::Back,
    ]
    .into_iter()
    .find(|p| p.suffix() == suffix)?;
    // The first root has no cross-certificates.
    (generation >= 2 || matches!(part, RootPart::Cert | RootPart::Key))
        .then_some((generation, part))
}

/// The generations of the root in `dir` whose `part` is on disk, sorted.
pub(crate) fn generations_with(dir: &Path, part: RootPart) -> std::io::Result<Vec<u32>> {
    let mut found: Vec<u32> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(parse_root_file))
        .filter(|(_, p)| *p == part)
        .map(|(g, _)| g)
        .collect();
    found.sort_unstable();
    Ok(found)
}

/// The certificate files of every root generation in `certs_dir`, oldest
/// first: what a broker that holds no keys trusts (those that have not
/// expired).
pub fn root_cert_files(certs_dir: &Path) -> Vec<PathBuf> {
    generations_with(certs_dir, RootPart::Cert)
        .unwrap_or_default()
        .into_iter()
        .map(|g| root_file(certs_dir, g, RootPart::Cert))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_file_names_round_trip() {
        let dir = Path::new("/pki");
        for generation in [1, 2, 17] {
            for part in [
                RootPart::Cert,
                RootPart::Key,
                RootPart::Cross,
                RootPart::Back,
            ] {
                if generation == 1 && matches!(part, RootPart::Cross | RootPart::Back) {
                    continue;
                }
                let path = root_file(dir, generation, part);
                let name = path.file_name().unwrap().to_str().unwrap();
                assert_eq!(parse_root_file(name), Some((generation, part)), "{name}");
            }
        }
        for name in [
            "root-ca.cross.pem",
            "root-ca.back.pem",
            "root-ca.1.pem",
            "root-ca.02.pem",
            "root-ca.2.crt",
            "root-ca.2.pem.bak",
            "root-ca",
            "broker.pem",
            "root-ca.x.pem",
            "root-ca..pem",
        ] {
            assert_eq!(parse_root_file(name), None, "{name}");
        }
        assert_eq!(
            root_crl_file(dir, 1),
            Path::new("/pki/crl/_root.crl.pem"),
            "the first root's CRL keeps its name"
        );
        assert_eq!(root_crl_file(dir, 3), Path::new("/pki/crl/_root.3.crl.pem"));
    }
}

//! Generations of the manager's message-signing key (topics.md §8).
//!
//! Generation 1 is `manager-sign.key`, whose public half devices are made
//! with. A successor, generation n ≥ 2, is `manager-sign.{n}.key` with
//! `manager-sign.{n}.pem`: a certificate of its key by the root that
//! issued when it was made, for [`MANAGER_SIGNING_EKU`] only. Every
//! message signed by it carries that certificate and the cross-
//! certificates back to the oldest root that lasts (`signer`), by which a
//! device that pins any of those roots takes the new key.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use openssl::pkey::{PKey, Private};
use openssl::x509::X509;

use crate::certs::{self, Issuer, Profile, Template};
use crate::files::{self, PUBLIC_MODE};
use crate::{unix_of, Pki, PkiError, Roots};

/// The extended key usage a certificate of a manager signing key carries,
/// and no other certificate of the fleet: an OID under `2.25` (ITU-T
/// X.667, from a UUID), so that no server, device or CA certificate can
/// pass for one.
pub const MANAGER_SIGNING_EKU: &str = "2.25.122450229210474948527528967594312682113";

/// CN of generation n's certificate: `fleetshift manager signing key {n}`.
const SIGNING_CN: &str = "fleetshift manager signing key";

/// How long a signing key's certificate is valid at most (never past its
/// root's end).
const SIGNING_LIFETIME_SECS: u64 = 10 * 365 * 86_400;

/// The key the manager signs with now.
pub struct Signing {
    pub generation: u32,
    pub key: PKey<Private>,
    /// For a generation ≥ 2: its certificate (DER), then the cross-
    /// certificates from its root back to the oldest root that lasts.
    pub signer: Option<Vec<Vec<u8>>>,
    /// For a generation ≥ 2: its certificate's notBefore and notAfter.
    pub validity: Option<(u64, u64)>,
    /// The SHA-256 of the DER SubjectPublicKeyInfo of every generation's
    /// key, the first's first: how devices name the key they pin.
    pub digests: Vec<[u8; 32]>,
}

/// The SHA-256 of `key`'s DER SubjectPublicKeyInfo.
fn digest_of<T: openssl::pkey::HasPublic>(
    key: &openssl::pkey::PKeyRef<T>,
) -> Result<[u8; 32], PkiError> {
    Ok(openssl::sha::sha256(&key.public_key_to_der()?))
}

impl Signing {
    /// The generation of the signing key whose digest is `digest`.
    pub fn generation_of(&self, digest: &[u8; 32]) -> Option<u32> {
        let at = self.digests.iter().position(|d| d == digest)?;
        u32::try_from(at + 1).ok()
    }
}

/// A signing key generation as the operator API lists it.
#[derive(Debug, Clone)]
pub struct SigningGeneration {
    pub generation: u32,
    /// The generation that signs now (the newest).
    pub signing: bool,
    /// `manager-sign.pub.pem` for the first, else `manager-sign.{n}.pem`.
    pub path: PathBuf,
    /// Of its certificate (none for the first).
    pub not_before: Option<u64>,
    pub not_after: Option<u64>,
}

pub(crate) fn key_file(dir: &Path, generation: u32) -> PathBuf {
    dir.join(format!("manager-sign.{generation}.key"))
}

pub(crate) fn cert_file(dir: &Path, generation: u32) -> PathBuf {
    dir.join(format!("manager-sign.{generation}.pem"))
}

/// The newest generation on disk whose key and certificate are both there
/// and match: generation 1's key (`first`) if there is none.
pub(crate) fn load(
    dir: &Path,
    first: PKey<Private>,
    roots: &Roots,
    pki: &Pki,
) -> Result<Signing, PkiError> {
    let mut digests = vec![digest_of(&first)?];
    let mut signing = Signing {
        generation: 1,
        key: first,
        signer: None,
        validity: None,
        digests: digests.clone(),
    };
    let mut generation = 2;
    while key_file(dir, generation).exists() && cert_file(dir, generation).exists() {
        let key = files::load_private_key(&key_file(dir, generation))?;
        let cert = X509::from_pem(&files::read(&cert_file(dir, generation))?)?;
        if !cert.public_key()?.public_eq(&key) {
            return Err(PkiError::Inconsistent(format!(
                "{} does not match {}",
                cert_file(dir, generation).display(),
                key_file(dir, generation).display()
            )));
        }
        digests.push(digest_of(&key)?);
        signing = Signing {
            generation,
            key,
            signer: Some(pki.signer_chain(roots, &cert)?),
            validity: Some((unix_of(cert.not_before())?, unix_of(cert.not_after())?)),
            digests: digests.clone(),
        };
        generation += 1;
    }
    Ok(signing)
}

impl Pki {
    /// The key the manager signs its messages with now, and the `signer`
    /// its messages carry.
    pub fn signing(&self) -> Arc<Signing> {
        self.signing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The manager's message-signing key now.
    pub fn signing_key(&self) -> PKey<Private> {
        self.signing().key.clone()
    }

    /// A successor of the signing key: a new key, certified by the root
    /// that issues now, which signs every message from then on. The
    /// key is written before its certificate, so a certificate on disk
    /// always has its key.
    pub fn roll_signing_key(&self) -> Result<SigningGeneration, PkiError> {
        let _one = self.signing_roll.lock().unwrap_or_else(|e| e.into_inner());
        let before = self.signing();
        let generation = before.generation + 1;
        // Later than the key before's, always: a device takes a key only
        // if it began after the one it pins (topics.md §4.3), so two rolls
        // in one second, or a clock set back, must not give it an equal
        // or earlier one.
        let now = crate::unix_now();
        let not_before = match before.validity {
            Some((since, _)) => (now - 60).max(since + 1),
            None => now - 60,
        };
        if not_before > now {
            return Err(PkiError::Inconsistent(format!(
                "the signing key before begins {}s from now; roll again later",
                not_before - now + 60
            )));
        }
        let (key_path, cert_path) = (
            key_file(&self.dir, generation),
            cert_file(&self.dir, generation),
        );
        if key_path.exists() || cert_path.exists() {
            return Err(PkiError::Inconsistent(format!(
                "{} or its certificate is there already (another process rolled the signing key?)",
                key_path.display()
            )));
        }
        let key = certs::new_p256_key()?;
        let cert = {
            let roots = self.read_roots();
            let root_end = unix_of(roots.issuing.cert.not_after())?;
            let subject = certs::name(None, &format!("{SIGNING_CN} {generation}"))?;
            certs::build(
                &Template {
                    subject: &subject,
                    public_key: &key,
                    serial: &certs::random_serial()?,
                    not_before,
                    not_after: root_end.min(now + SIGNING_LIFETIME_SECS),
                    profile: Profile::MessageSigner {
                        eku: MANAGER_SIGNING_EKU,
                    },
                },
                Some(&Issuer {
                    cert: &roots.issuing.cert,
                    key: &roots.issuing.key,
                }),
                None,
            )?
        };
        crate::write_private_key(&key_path, &key)?;
        files::write_atomic(&cert_path, &cert.to_pem()?, PUBLIC_MODE)?;
        let signer = {
            let roots = self.read_roots();
            self.signer_chain(&roots, &cert)?
        };
        let validity = (unix_of(cert.not_before())?, unix_of(cert.not_after())?);
        let mut digests = before.digests.clone();
        digests.push(digest_of(&key)?);
        *self.signing.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Signing {
            generation,
            key,
            signer: Some(signer),
            validity: Some(validity),
            digests,
        });
        tracing::info!(generation, path = %cert_path.display(), "manager signing key rolled over");
        Ok(SigningGeneration {
            generation,
            signing: true,
            path: cert_path,
            not_before: Some(validity.0),
            not_after: Some(validity.1),
        })
    }

    /// A successor of the signing key if the one that signs now is a
    /// successor whose certificate ends within two years (it ends with its
    /// root at the latest): rolled by housekeeping with the root, so that
    /// a device that has not heard from the manager yet can still take
    /// the key messages are signed by. Says what it rolled.
    ///
    /// Only when the root that issues now ends later than that
    /// certificate, so that a successor gains something: after the root
    /// rolled over.
    pub fn roll_signing_key_if_due(&self, now: u64) -> Result<Option<SigningGeneration>, PkiError> {
        let Some((_, until)) = self.signing().validity else {
            return Ok(None);
        };
        let root_end = unix_of(self.read_roots().issuing.cert.not_after())?;
        if until < now + crate::roots::ROOT_ROLL_BEFORE_SECS && root_end > until {
            self.roll_signing_key().map(Some)
        } else {
            Ok(None)
        }
    }

    /// Every signing key generation, oldest first; the last signs.
    pub fn signing_generations(&self) -> Result<Vec<SigningGeneration>, PkiError> {
        let now = self.signing().generation;
        let mut out = vec![SigningGeneration {
            generation: 1,
            signing: now == 1,
            path: self.signing_pub_path(),
            not_before: None,
            not_after: None,
        }];
        for generation in 2..=now {
            let path = cert_file(&self.dir, generation);
            let cert = X509::from_pem(&files::read(&path)?)?;
            out.push(SigningGeneration {
                generation,
                signing: generation == now,
                path,
                not_before: Some(unix_of(cert.not_before())?),
                not_after: Some(unix_of(cert.not_after())?),
            });
        }
        Ok(out)
    }

    /// `cert`, then the cross-certificates from the root that signed it
    /// back to the oldest root that lasts, DER.
    fn signer_chain(&self, roots: &Roots, cert: &X509) -> Result<Vec<Vec<u8>>, PkiError> {
        let mut chain = vec![cert.to_der()?];
        let issuer = roots
            .all
            .iter()
            .find(|(_, root, _)| {
                root.public_key()
                    .and_then(|k| cert.verify(&k))
                    .unwrap_or(false)
            })
            .map(|(generation, _, _)| *generation)
            .ok_or_else(|| {
                PkiError::Inconsistent("a signing key's certificate from no root here".into())
            })?;
        for cross in self.crosses_back_from(roots, issuer, crate::unix_now()) {
            chain.push(cross.to_der()?);
        }
        Ok(chain)
    }
}

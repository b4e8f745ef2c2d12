//! Checking what the manager sends: replies and service-change notices.
//! Pure functions; the manager's key is pinned, so anything not signed by
//! it, or by a successor certified by a pinned root (topics.md §4.3), is
//! ignored, whatever topic it arrived on.

use fleet_protocol::crypto;
use fleet_protocol::{Envelope, Kind, ProtocolError, Reply, ServiceChange, Status};
use openssl::nid::Nid;
use openssl::pkey::{PKey, PKeyRef, Private, Public};
use openssl::stack::Stack;
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::{X509StoreContext, X509};

use crate::requests::Prepared;

/// Why a received message was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("undecodable: {0}")]
    Decode(String),
    #[error("CRC mismatch")]
    BadCrc,
    #[error("expected kind {expected:?}, got {got:?}")]
    WrongKind { expected: Kind, got: Kind },
    #[error("signature does not verify with the pinned manager key")]
    BadSignature,
    #[error("signer refused: {0}")]
    BadSigner(String),
    #[error("addressed to device {0:?}")]
    WrongDevice(String),
    #[error("nonce does not match the request")]
    NonceMismatch,
    #[error("notice seq {seq} is not above the last accepted {last}")]
    Replayed { seq: u64, last: u64 },
}

/// What a device takes manager messages by (topics.md §4.3): the signing
/// key it pins, and the roots it pins, by which it takes a successor of
/// that key from a message's `signer`.
#[derive(Clone, Copy)]
pub struct ManagerTrust<'a> {
    pub key: &'a PKeyRef<Public>,
    /// The notBefore of the pinned key's certificate; `None` for the key
    /// the device was made with.
    pub key_since: Option<u64>,
    pub roots: &'a [X509],
    /// Unix seconds.
    pub now: u64,
}

/// The most certificates a `signer` holds: the key's and a cross-
/// certificate per root before its own (devices pin at most four).
const MAX_SIGNER_LEN: usize = 4;

/// Decodes and authenticates a manager message of `kind`; returns the
/// envelope and, when a successor of the pinned key signed it, that key's
/// certificate, to pin.
fn open_signed(
    bytes: &[u8],
    kind: Kind,
    trust: ManagerTrust<'_>,
) -> Result<(Envelope, Option<X509>), VerifyError> {
    let env = Envelope::decode(bytes).map_err(|e| VerifyError::Decode(e.to_string()))?;
    if !env.crc_ok() {
        return Err(VerifyError::BadCrc);
    }
    if env.kind != kind {
        return Err(VerifyError::WrongKind {
            expected: kind,
            got: env.kind,
        });
    }
    if crypto::verify(trust.key, &env.tbs(), &env.auth) {
        return Ok((env, None));
    }
    let Some(signer) = &env.signer else {
        return Err(VerifyError::BadSignature);
    };
    let cert = signer_of(signer, trust).map_err(VerifyError::BadSigner)?;
    let key = cert
        .public_key()
        .map_err(|e| VerifyError::BadSigner(e.to_string()))?;
    if !crypto::verify(&key, &env.tbs(), &env.auth) {
        return Err(VerifyError::BadSignature);
    }
    Ok((env, Some(cert)))
}

/// The certificate of a successor signing key, if `signer` proves one
/// (topics.md §4.3): its first certificate is not a CA, has the manager
/// signing key usage, is valid now, began after the pinned key's, and
/// verifies to a pinned root through the cross-certificates after it,
/// each a root CA certificate.
pub fn signer_of(signer: &[serde_bytes::ByteBuf], trust: ManagerTrust<'_>) -> Result<X509, String> {
    use fleet_protocol::certificate::MANAGER_SIGNING_EKU_DER;
    use fleet_protocol::certificate::{basic_constraints_ca, extended_key_usages};
    if signer.is_empty() || signer.len() > MAX_SIGNER_LEN {
        return Err(format!("{} certificates", signer.len()));
    }
    let der = &signer[0];
    if basic_constraints_ca(der) != Some(false) {
        return Err("a CA certificate, or one that does not read".into());
    }
    if !extended_key_usages(der).is_some_and(|u| u.contains(&MANAGER_SIGNING_EKU_DER)) {
        return Err("not for signing the manager's messages".into());
    }
    let chain = signer
        .iter()
        .map(|c| X509::from_der(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate DER: {e}"))?;
    // Only roots' links may stand between the key and a pinned root: a
    // service CA (path length 0) signs devices, never the manager's key,
    // so the holder of a service CA's key cannot make one.
    if !chain[1..]
        .iter()
        .zip(&signer[1..])
        .all(|(cert, der)| is_root_ca(cert, der))
    {
        return Err("a certificate after the key's that is no root's link".into());
    }
    let since = unix_of(chain[0].not_before()).ok_or("notBefore out of range")?;
    if trust.key_since.is_some_and(|pinned| since <= pinned) {
        return Err("not newer than the signing key pinned".into());
    }
    verify_chain(trust.roots, &chain).map_err(|e| e.to_string())?;
    let until = unix_of(chain[0].not_after()).ok_or("notAfter out of range")?;
    if !(since..=until).contains(&trust.now) {
        return Err("not valid now".into());
    }
    Ok(chain.into_iter().next().expect("one certificate at least"))
}

/// A signed reply of `kind` for `device_id`; the nonce is checked by the caller
/// (see [`check_nonce`]) because some replies are matched against several
/// outstanding requests.
/// With the reply, the certificate of a successor signing key that signed
/// it, to pin.
pub fn open_reply(
    bytes: &[u8],
    kind: Kind,
    trust: ManagerTrust<'_>,
    device_id: &str,
) -> Result<(Reply, Option<X509>), VerifyError> {
    let (env, signer) = open_signed(bytes, kind, trust)?;
    let reply: Reply = env.body().map_err(|e| VerifyError::Decode(e.to_string()))?;
    if reply.device_id != device_id {
        return Err(VerifyError::WrongDevice(reply.device_id));
    }
    Ok((reply, signer))
}

pub fn check_nonce(reply: &Reply, nonce: &[u8]) -> Result<(), VerifyError> {
    // Nonces are not secret; a plain comparison is fine.
    if reply.nonce == nonce {
        Ok(())
    } else {
        Err(VerifyError::NonceMismatch)
    }
}

/// A signed `service_change` notice for `device_id`. Replay (sequence)
/// checking is [`check_notice_seq`], shared with notices inside poll replies.
pub fn open_notice(
    bytes: &[u8],
    trust: ManagerTrust<'_>,
    device_id: &str,
) -> Result<(ServiceChange, Option<X509>), VerifyError> {
    let (env, signer) = open_signed(bytes, Kind::ServiceChange, trust)?;
    let notice: ServiceChange = env.body().map_err(|e| VerifyError::Decode(e.to_string()))?;
    check_notice_target(&notice, device_id)?;
    Ok((notice, signer))
}

pub fn check_notice_target(notice: &ServiceChange, device_id: &str) -> Result<(), VerifyError> {
    if notice.device_id != device_id {
        return Err(VerifyError::WrongDevice(notice.device_id.clone()));
    }
    Ok(())
}

pub fn check_notice_seq(notice: &ServiceChange, last_accepted: u64) -> Result<(), VerifyError> {
    if notice.seq > last_accepted {
        Ok(())
    } else {
        Err(VerifyError::Replayed {
            seq: notice.seq,
            last: last_accepted,
        })
    }
}

/// A reply that is authentic but not usable.
#[derive(Debug, thiserror::Error)]
pub enum ReplyError {
    #[error("manager answered {status}: {detail}")]
    Status { status: Status, detail: String },
    #[error("reply lacks {0}")]
    Missing(&'static str),
    #[error("bad reply: {0}")]
    Invalid(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("openssl: {0}")]
    OpenSsl(#[from] openssl::error::ErrorStack),
}

impl ReplyError {
    /// The manager's status, when that is why the reply was refused.
    pub fn status(&self) -> Option<Status> {
        match self {
            ReplyError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Ok, or the reply's status as an error.
pub fn require_ok(reply: &Reply) -> Result<(), ReplyError> {
    if reply.status == Status::Ok {
        Ok(())
    } else {
        Err(ReplyError::Status {
            status: reply.status,
            detail: reply.detail.clone().unwrap_or_default(),
        })
    }
}

/// What an Ok activate reply gives the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    pub service_id: String,
    pub uuid: Vec<u8>,
}

pub fn finish_activate(
    reply: &Reply,
    request: &Prepared,
    device_id: &str,
) -> Result<Activation, ReplyError> {
    require_ok(reply)?;
    let service_id = reply
        .service_id
        .clone()
        .ok_or(ReplyError::Missing("service_id"))?;
    fleet_protocol::topic::validate_service_id(&service_id)?;
    let sealed = reply.uuid.as_ref().ok_or(ReplyError::Missing("uuid"))?;
    let eph = request
        .eph
        .as_ref()
        .ok_or(ReplyError::Missing("ephemeral key"))?;
    let uuid = crypto::unseal(eph, device_id, sealed)?;
    if uuid.len() != 16 {
        return Err(ReplyError::Invalid(format!("uuid of {} bytes", uuid.len())));
    }
    Ok(Activation { service_id, uuid })
}

/// What an Ok update reply gives the device.
pub struct Installed {
    pub service_id: String,
    pub key: PKey<Private>,
    /// Device certificate, then its service CA.
    pub chain: Vec<X509>,
    pub serial_hex: String,
}

impl std::fmt::Debug for Installed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installed")
            .field("service_id", &self.service_id)
            .field("serial_hex", &self.serial_hex)
            .finish_non_exhaustive()
    }
}

/// Checks an Ok update reply for `service_id` and extracts the key and
/// chain: the leaf names the device, holds our key (CSR mode) or the
/// unsealed key (manager mode), and chains to one of the pinned root CAs.
pub fn finish_update(
    reply: &Reply,
    request: &Prepared,
    device_id: &str,
    service_id: &str,
    roots: &[X509],
) -> Result<Installed, ReplyError> {
    require_ok(reply)?;
    if let Some(svc) = &reply.service_id {
        if svc != service_id {
            return Err(ReplyError::Invalid(format!(
                "certificate for service {svc:?}, asked for {service_id:?}"
            )));
        }
    }
    let der = reply.chain.as_ref().ok_or(ReplyError::Missing("chain"))?;
    if der.len() < 2 {
        return Err(ReplyError::Invalid(format!(
            "chain of {} certificates",
            der.len()
        )));
    }
    let chain = der
        .iter()
        .map(|c| X509::from_der(c))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ReplyError::Invalid(format!("certificate DER: {e}")))?;
    let key = match (&request.service_key, &reply.key) {
        (Some(own), _) => own.clone(),
        (None, Some(sealed)) => {
            let eph = request
                .eph
                .as_ref()
                .ok_or(ReplyError::Missing("ephemeral key"))?;
            let der = crypto::unseal(eph, device_id, sealed)?;
            PKey::private_key_from_pkcs8(&der)
                .map_err(|e| ReplyError::Invalid(format!("sealed key: {e}")))?
        }
        (None, None) => return Err(ReplyError::Missing("key")),
    };
    let leaf = &chain[0];
    if !leaf.public_key()?.public_eq(&key) {
        return Err(ReplyError::Invalid("certificate is not for our key".into()));
    }
    let cn = leaf
        .subject_name()
        .entries_by_nid(Nid::COMMONNAME)
        .next()
        .and_then(|e| e.data().to_string().ok());
    if cn.as_deref() != Some(device_id) {
        return Err(ReplyError::Invalid(format!("certificate CN {cn:?}")));
    }
    verify_chain(roots, &chain)?;
    let serial_hex = leaf.serial_number().to_bn()?.to_hex_str()?.to_string();
    Ok(Installed {
        service_id: service_id.to_owned(),
        key,
        chain,
        serial_hex,
    })
}

/// The roots to pin after an Ok reply's `roots` (topics.md §3.5.5), if it
/// has them (one to four self-signed root CA certificates), at `now`
/// (Unix seconds): those that `pinned` holds already or that a
/// cross-certificate in `crosses` (a root CA certificate too) links to a
/// root so kept (its name and key, signed by that root), in the order
/// given, then every root of `pinned` the reply left out; none that has
/// expired. An error if no root of the reply is kept. The manager's
/// signature alone does not make a root, nor drop one: whoever stole its
/// signing key cannot have the device trust a broker of their own, nor
/// forget the roots it has.
pub fn roots_of(reply: &Reply, pinned: &[X509], now: u64) -> Result<Option<Vec<X509>>, ReplyError> {
    let Some(ders) = reply.roots.as_ref().filter(|_| reply.status == Status::Ok) else {
        return Ok(None);
    };
    if ders.is_empty() || ders.len() > MAX_ROOTS {
        return Err(ReplyError::Invalid(format!("{} roots", ders.len())));
    }
    let crosses_der = reply.crosses.as_deref().unwrap_or_default();
    if crosses_der.len() > 2 * (MAX_ROOTS - 1) {
        return Err(ReplyError::Invalid(format!(
            "{} crosses",
            crosses_der.len()
        )));
    }
    let parse = |der: &[u8], what: &str| {
        let cert =
            X509::from_der(der).map_err(|e| ReplyError::Invalid(format!("{what} DER: {e}")))?;
        match is_root_ca(&cert, der) {
            true => Ok(cert),
            false => Err(ReplyError::Invalid(format!(
                "a {what} that is not a CA certificate without a path length limit and with keyCertSign"
            ))),
        }
    };
    let mut roots = Vec::with_capacity(ders.len());
    for der in ders {
        let root = parse(der, "root")?;
        if !root.verify(root.public_key()?.as_ref())? {
            return Err(ReplyError::Invalid("a root that is not self-signed".into()));
        }
        roots.push(root);
    }
    let mut crosses = Vec::with_capacity(crosses_der.len());
    for der in crosses_der {
        crosses.push(parse(der, "cross-certificate")?);
    }
    let pinned_der: Vec<Vec<u8>> = pinned.iter().filter_map(|r| r.to_der().ok()).collect();
    let mut trusted: Vec<X509> = pinned.to_vec();
    let mut kept = vec![false; roots.len()];
    // Until nothing more links: a link may run either way.
    loop {
        let mut more = false;
        for (i, root) in roots.iter().enumerate() {
            if kept[i] {
                continue;
            }
            if pinned_der.contains(&root.to_der()?)
                || crosses.iter().any(|c| links(c, root, &trusted))
            {
                kept[i] = true;
                trusted.push(root.clone());
                more = true;
            }
        }
        if !more {
            break;
        }
    }
    let mut answer: Vec<X509> = roots
        .into_iter()
        .zip(kept)
        .filter_map(|(root, kept)| kept.then_some(root))
        .collect();
    if answer.is_empty() {
        return Err(ReplyError::Invalid(
            "no root pinned or linked to one by a cross-certificate".into(),
        ));
    }
    let mut listed: Vec<Vec<u8>> = answer.iter().filter_map(|r| r.to_der().ok()).collect();
    for (root, der) in pinned.iter().zip(&pinned_der) {
        if !listed.contains(der) {
            listed.push(der.clone());
            answer.push(root.clone());
        }
    }
    answer.retain(|root| unix_of(root.not_after()).is_some_and(|end| end >= now));
    Ok(Some(answer))
}

/// An ASN.1 time as Unix seconds.
pub(crate) fn unix_of(t: &openssl::asn1::Asn1TimeRef) -> Option<u64> {
    let epoch = openssl::asn1::Asn1Time::from_unix(0).ok()?;
    let d = epoch.diff(t).ok()?;
    u64::try_from(i64::from(d.days) * 86_400 + i64::from(d.secs)).ok()
}

/// Whether `cert` (whose DER is `der`) is a CA certificate that may sign
/// other CAs: basicConstraints with cA true and no path length limit, and
/// keyUsage with keyCertSign. Roots and cross-certificates are; a server,
/// device or service CA certificate a root signed is not.
fn is_root_ca(cert: &X509, der: &[u8]) -> bool {
    use openssl::x509::X509KeyUsage;
    cert.key_usage()
        .is_some_and(|ku| ku.contains(X509KeyUsage::KEY_CERT_SIGN))
        && cert.pathlen().is_none()
        && fleet_protocol::certificate::basic_constraints_ca(der) == Some(true)
}

/// Whether `cross` carries `root`'s name and key and is signed by one of
/// `trusted`.
fn links(cross: &X509, root: &X509, trusted: &[X509]) -> bool {
    let der_eq = |a: Result<Vec<u8>, _>, b: Result<Vec<u8>, openssl::error::ErrorStack>| matches!((a, b), (Ok(a), Ok(b)) if a == b);
    let same_name = der_eq(cross.subject_name().to_der(), root.subject_name().to_der());
    let same_key = der_eq(
        cross.public_key().and_then(|k| k.public_key_to_der()),
        root.public_key().and_then(|k| k.public_key_to_der()),
    );
    same_name
        && same_key
        && trusted.iter().any(|t| {
            der_eq(cross.issuer_name().to_der(), t.subject_name().to_der())
                && t.public_key()
                    .and_then(|key| cross.verify(&key))
                    .unwrap_or(false)
        })
}

/// Most roots a reply may name: a fleet has two during a roll-over. It
/// names up to two cross-certificates for each pair of them, one each way.
const MAX_ROOTS: usize = 4;

/// The leaf must chain through the rest to one of `roots`.
fn verify_chain(roots: &[X509], chain: &[X509]) -> Result<(), ReplyError> {
    let mut store = X509StoreBuilder::new()?;
    for root in roots {
        store.add_cert(root.clone())?;
    }
    let store = store.build();
    let mut intermediates = Stack::new()?;
    for cert in &chain[1..] {
        intermediates.push(cert.clone())?;
    }
    let mut ctx = X509StoreContext::new()?;
    let ok = ctx.init(&store, &chain[0], &intermediates, |c| {
        let ok = c.verify_cert()?;
        Ok(ok.then_some(()).ok_or_else(|| c.error().to_string()))
    })?;
    ok.map_err(|e| ReplyError::Invalid(format!("chain does not verify: {e}")))
}

#[cfg(test)]
mod tests {
    use fleet_protocol::{ActivateRequest, UpdateRequest};
    use openssl::x509::X509Req;

    use super::*;
    use crate::config::KeyMode;
    use crate::requests::{build_activate, build_update};
    use crate::testutil::{FakeManager, UUID};

    /// Taking messages by `key` alone, as a device made with it.
    fn trusting(key: &PKeyRef<Public>) -> ManagerTrust<'_> {
        ManagerTrust {
            key,
            key_since: None,
            roots: &[],
            now: fleet_protocol::now_ms() / 1000,
        }
    }

    /// A reply for dev1 signed by `key`, with `signer`.
    fn signed_with(key: &PKeyRef<Private>, signer: Option<Vec<Vec<u8>>>) -> Vec<u8> {
        let reply = Reply {
            device_id: "dev1".into(),
            status: Status::Ok,
            ..Reply::default()
        };
        let mut env =
            Envelope::build(Kind::PollReply, &reply, |tbs| crypto::sign(key, tbs)).unwrap();
        env.signer =
            signer.map(|chain| chain.into_iter().map(serde_bytes::ByteBuf::from).collect());
        env.encode()
    }

    /// A successor signing key is taken from `signer` only when a pinned
    /// root certifies it for signing the manager's messages, it began
    /// after the key pinned, and it is valid now; the signature must then
    /// verify with it. The broker's key, or a key no pinned root
    /// certified, cannot pass for one.
    #[test]
    fn a_successor_signing_key_is_taken_only_as_the_roots_certify_it() {
        let dir = tempfile::tempdir().unwrap();
        let pki = fleet_pki::Pki::open_or_create(dir.path()).unwrap();
        let first = pki.signing_key();
        let first_pub = PKey::public_key_from_der(&first.public_key_to_der().unwrap()).unwrap();
        let root = X509::from_pem(&std::fs::read(dir.path().join("root-ca.pem")).unwrap()).unwrap();
        let roots = [root];
        let now = fleet_protocol::now_ms() / 1000;
        let trust = ManagerTrust {
            key: &first_pub,
            key_since: None,
            roots: &roots,
            now,
        };
        pki.roll_signing_key().unwrap();
        let second = pki.signing();
        let chain = second.signer.clone().unwrap();
        assert_eq!(
            chain.len(),
            1,
            "no roll-over of the root: no cross-certificate"
        );

        // Before: the first key still verifies, with no signer to take.
        let (_, learned) =
            open_reply(&signed_with(&first, None), Kind::PollReply, trust, "dev1").unwrap();
        assert!(learned.is_none());
        // The successor, certified by the pinned root: taken.
        let good = signed_with(&second.key, Some(chain.clone()));
        let (_, learned) = open_reply(&good, Kind::PollReply, trust, "dev1").unwrap();
        let cert = learned.expect("the successor's certificate");
        assert_eq!(cert.to_der().unwrap(), chain[0]);
        // Without its signer, or with a signature by another key.
        assert_eq!(
            open_reply(
                &signed_with(&second.key, None),
                Kind::PollReply,
                trust,
                "dev1"
            )
            .unwrap_err(),
            VerifyError::BadSignature
        );
        assert_eq!(
            open_reply(
                &signed_with(&crypto::generate_p256().unwrap(), Some(chain.clone())),
                Kind::PollReply,
                trust,
                "dev1"
            )
            .unwrap_err(),
            VerifyError::BadSignature
        );
        // Not by a pinned root.
        let stranger = FakeManager::new();
        let unrooted = ManagerTrust {
            roots: stranger.roots(),
            ..trust
        };
        assert!(matches!(
            open_reply(&good, Kind::PollReply, unrooted, "dev1"),
            Err(VerifyError::BadSigner(_))
        ));
        // The broker's certificate and key: the root certified them, but
        // not for signing the manager's messages.
        let broker_key =
            PKey::private_key_from_pem(&std::fs::read(dir.path().join("broker.key")).unwrap())
                .unwrap();
        let broker =
            X509::from_pem(&std::fs::read(dir.path().join("broker.pem")).unwrap()).unwrap();
        let forged = signed_with(&broker_key, Some(vec![broker.to_der().unwrap()]));
        assert!(matches!(
            open_reply(&forged, Kind::PollReply, trust, "dev1"),
            Err(VerifyError::BadSigner(why)) if why.contains("not for signing")
        ));
        // Nor a key a service CA certified for that usage: only roots'
        // links may stand between the key and the root.
        let (svc_ca, svc_key) = pki.service_ca("svcA").unwrap();
        let thief = crypto::generate_p256().unwrap();
        let mut b = openssl::x509::X509Builder::new().unwrap();
        b.set_version(2).unwrap();
        b.set_subject_name(svc_ca.subject_name()).unwrap();
        b.set_issuer_name(svc_ca.subject_name()).unwrap();
        b.set_pubkey(&thief).unwrap();
        b.set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        b.set_not_after(&openssl::asn1::Asn1Time::days_from_now(30).unwrap())
            .unwrap();
        b.append_extension(
            openssl::x509::extension::BasicConstraints::new()
                .critical()
                .build()
                .unwrap(),
        )
        .unwrap();
        b.append_extension(
            openssl::x509::extension::ExtendedKeyUsage::new()
                .critical()
                .other(fleet_pki::MANAGER_SIGNING_EKU)
                .build()
                .unwrap(),
        )
        .unwrap();
        b.sign(&svc_key, openssl::hash::MessageDigest::sha256())
            .unwrap();
        let by_service_ca = b.build();
        let forged = signed_with(
            &thief,
            Some(vec![
                by_service_ca.to_der().unwrap(),
                svc_ca.to_der().unwrap(),
            ]),
        );
        assert!(matches!(
            open_reply(&forged, Kind::PollReply, trust, "dev1"),
            Err(VerifyError::BadSigner(why)) if why.contains("no root's link")
        ));
        // A root (a CA) cannot either.
        let root_key =
            PKey::private_key_from_pem(&std::fs::read(dir.path().join("root-ca.key")).unwrap())
                .unwrap();
        let as_root = signed_with(&root_key, Some(vec![roots[0].to_der().unwrap()]));
        assert!(matches!(
            open_reply(&as_root, Kind::PollReply, trust, "dev1"),
            Err(VerifyError::BadSigner(_))
        ));
        // Once a later key is pinned, an earlier one is taken no more.
        let since = unix_of(cert.not_before()).unwrap();
        let pinned_pub = cert.public_key().unwrap();
        let moved_on = ManagerTrust {
            key: &pinned_pub,
            key_since: Some(since),
            ..trust
        };
        assert!(
            open_reply(&good, Kind::PollReply, moved_on, "dev1").is_ok(),
            "by the key pinned"
        );
        let (_, learned) = open_reply(&good, Kind::PollReply, moved_on, "dev1").unwrap();
        assert!(learned.is_none(), "nothing new to pin");
        assert_eq!(
            open_reply(
                &signed_with(&first, None),
                Kind::PollReply,
                moved_on,
                "dev1"
            )
            .unwrap_err(),
            VerifyError::BadSignature,
            "the first key, replaced"
        );
        // A third key, rolled within the same second: it begins later
        // all the same, so a device that pins the second takes it.
        pki.roll_signing_key().unwrap();
        let third = pki.signing();
        let newer = signed_with(&third.key, third.signer.clone());
        let (_, learned) = open_reply(&newer, Kind::PollReply, moved_on, "dev1").unwrap();
        assert!(learned.is_some(), "the third key, after the second");
        // A device that pins a key as new as it refuses it.
        let third_since = third.validity.unwrap().0;
        assert!(third_since > since);
        let as_new = ManagerTrust {
            key_since: Some(third_since),
            ..moved_on
        };
        assert!(matches!(
            open_reply(&newer, Kind::PollReply, as_new, "dev1"),
            Err(VerifyError::BadSigner(why)) if why.contains("not newer")
        ));
        // Not valid at the device's time.
        let later = ManagerTrust {
            now: now + 20 * 365 * 86_400,
            ..trust
        };
        assert!(matches!(
            open_reply(&good, Kind::PollReply, later, "dev1"),
            Err(VerifyError::BadSigner(_))
        ));
        // After a root roll-over, a key the new root certified comes with
        // the cross-certificate: a device that pins only the first root
        // takes it.
        pki.roll_root().unwrap();
        pki.roll_signing_key().unwrap();
        let fourth = pki.signing();
        let chain = fourth.signer.clone().unwrap();
        assert_eq!(
            chain.len(),
            2,
            "the key's certificate and the cross-certificate"
        );
        let (_, learned) = open_reply(
            &signed_with(&fourth.key, Some(chain.clone())),
            Kind::PollReply,
            trust,
            "dev1",
        )
        .unwrap();
        assert!(learned.is_some());
        assert!(
            matches!(
                open_reply(
                    &signed_with(&fourth.key, Some(chain[..1].to_vec())),
                    Kind::PollReply,
                    trust,
                    "dev1"
                ),
                Err(VerifyError::BadSigner(_))
            ),
            "without the cross-certificate"
        );
    }

    fn opened(
        bytes: &[u8],
        kind: Kind,
        key: &PKeyRef<Public>,
        device_id: &str,
    ) -> Result<Reply, VerifyError> {
        open_reply(bytes, kind, trusting(key), device_id).map(|(reply, _)| reply)
    }

    fn notice_opened(
        bytes: &[u8],
        key: &PKeyRef<Public>,
        device_id: &str,
    ) -> Result<ServiceChange, VerifyError> {
        open_notice(bytes, trusting(key), device_id).map(|(notice, _)| notice)
    }

    #[test]
    fn activate_reply_round_trip() {
        let mgr = FakeManager::new();
        let factory = crypto::generate_p256().unwrap();
        let req = build_activate("dev1", None, &factory).unwrap();
        let body: ActivateRequest = Envelope::decode(&req.bytes).unwrap().body().unwrap();
        let bytes = mgr.sign(
            Kind::ActivateReply,
            &Reply {
                device_id: "dev1".into(),
                nonce: body.nonce.clone(),
                seq: 1,
                service_id: Some("svcA".into()),
                uuid: Some(crypto::seal(&body.eph, "dev1", &UUID).unwrap()),
                ..Reply::default()
            },
        );
        let reply = opened(&bytes, Kind::ActivateReply, &mgr.public, "dev1").unwrap();
        check_nonce(&reply, &req.nonce).unwrap();
        let act = finish_activate(&reply, &req, "dev1").unwrap();
        assert_eq!(act.service_id, "svcA");
        assert_eq!(act.uuid, UUID);

        // Same reply, but to another request: the nonce and the seal both give it away.
        let other = build_activate("dev1", None, &factory).unwrap();
        assert_eq!(
            check_nonce(&reply, &other.nonce),
            Err(VerifyError::NonceMismatch)
        );
        assert!(finish_activate(&reply, &other, "dev1").is_err());
    }

    #[test]
    fn forged_and_misdirected_replies_are_rejected() {
        let mgr = FakeManager::new();
        let impostor = FakeManager::new();
        let reply = Reply {
            device_id: "dev1".into(),
            nonce: vec![1; 16],
            seq: 1,
            ..Reply::default()
        };
        let forged = impostor.sign(Kind::PollReply, &reply);
        assert_eq!(
            opened(&forged, Kind::PollReply, &mgr.public, "dev1"),
            Err(VerifyError::BadSignature)
        );
        let good = mgr.sign(Kind::PollReply, &reply);
        assert!(opened(&good, Kind::PollReply, &mgr.public, "dev1").is_ok());
        assert!(matches!(
            opened(&good, Kind::UpdateReply, &mgr.public, "dev1"),
            Err(VerifyError::WrongKind { .. })
        ));
        assert_eq!(
            opened(&good, Kind::PollReply, &mgr.public, "dev2"),
            Err(VerifyError::WrongDevice("dev1".into()))
        );
        let mut env = Envelope::decode(&good).unwrap();
        env.crc ^= 1;
        assert_eq!(
            opened(&env.encode(), Kind::PollReply, &mgr.public, "dev1"),
            Err(VerifyError::BadCrc)
        );
        assert!(matches!(
            opened(b"junk", Kind::PollReply, &mgr.public, "dev1"),
            Err(VerifyError::Decode(_))
        ));
    }

    #[test]
    fn status_errors_carry_the_status() {
        let reply = Reply {
            status: Status::RateLimited,
            detail: Some("slow down".into()),
            ..Reply::default()
        };
        let err = require_ok(&reply).unwrap_err();
        assert_eq!(err.status(), Some(Status::RateLimited));
    }

    #[test]
    fn notices_need_signature_target_and_fresh_seq() {
        let mgr = FakeManager::new();
        let notice = ServiceChange {
            device_id: "dev1".into(),
            seq: 10,
            change_id: "c1".into(),
            service_id: "svcB".into(),
            provider: None,
            application: None,
            endpoint: Some("mqtts://localhost:8883".into()),
            ts: fleet_protocol::now_ms(),
        };
        let bytes = mgr.sign(Kind::ServiceChange, &notice);
        assert_eq!(notice_opened(&bytes, &mgr.public, "dev1").unwrap(), notice);
        assert_eq!(
            notice_opened(&bytes, &FakeManager::new().public, "dev1"),
            Err(VerifyError::BadSignature)
        );
        assert!(matches!(
            notice_opened(&bytes, &mgr.public, "dev2"),
            Err(VerifyError::WrongDevice(_))
        ));
        // A reply signed by the manager cannot pass as a notice.
        let as_reply = mgr.sign(Kind::PollReply, &notice);
        assert!(matches!(
            notice_opened(&as_reply, &mgr.public, "dev1"),
            Err(VerifyError::WrongKind { .. })
        ));
        assert!(check_notice_seq(&notice, 9).is_ok());
        assert_eq!(
            check_notice_seq(&notice, 10),
            Err(VerifyError::Replayed { seq: 10, last: 10 })
        );
    }

    #[test]
    fn update_reply_in_csr_mode() {
        let mgr = FakeManager::new();
        let req = build_update("dev1", "svcB", &UUID, KeyMode::Csr).unwrap();
        let body: UpdateRequest = Envelope::decode(&req.bytes).unwrap().body().unwrap();
        let csr = X509Req::from_der(body.csr.as_ref().unwrap()).unwrap();
        let leaf = mgr.issue("dev1", &csr.public_key().unwrap());
        let reply = mgr.update_reply(&body, vec![leaf.clone(), mgr.service_ca.clone()], None);
        let installed = finish_update(&reply, &req, "dev1", "svcB", mgr.roots()).unwrap();
        assert_eq!(installed.chain[0], leaf);
        assert!(installed.key.public_eq(req.service_key.as_ref().unwrap()));
        assert_eq!(
            installed.serial_hex,
            leaf.serial_number()
                .to_bn()
                .unwrap()
                .to_hex_str()
                .unwrap()
                .to_string()
        );

        // A certificate for somebody else's key is refused.
        let stranger = crypto::generate_p256().unwrap();
        let wrong = mgr.issue("dev1", &stranger);
        let reply = mgr.update_reply(&body, vec![wrong, mgr.service_ca.clone()], None);
        assert!(finish_update(&reply, &req, "dev1", "svcB", mgr.roots()).is_err());
        // So is one that does not chain to the pinned root.
        let other = FakeManager::new();
        let foreign = other.issue("dev1", &csr.public_key().unwrap());
        let reply = mgr.update_reply(&body, vec![foreign, other.service_ca.clone()], None);
        assert!(finish_update(&reply, &req, "dev1", "svcB", mgr.roots()).is_err());
        // Unless that root is pinned too (after a root roll-over).
        let both = [other.root.clone(), mgr.root.clone()];
        assert!(finish_update(&reply, &req, "dev1", "svcB", &both).is_ok());
    }

    #[test]
    fn roots_are_taken_only_when_pinned_or_linked_to_a_pinned_one() {
        use serde_bytes::ByteBuf;
        let tmp = tempfile::tempdir().unwrap();
        let pki = fleet_pki::Pki::open_or_create(tmp.path()).unwrap();
        let r1 = pki.root_cert();
        pki.roll_root().unwrap();
        pki.roll_root().unwrap();
        let (roots, crosses) = pki.roots_to_pin(0);
        let (r3, r2) = (roots[0].clone(), roots[1].clone());
        let der = |certs: &[X509]| {
            Some(
                certs
                    .iter()
                    .map(|c| ByteBuf::from(c.to_der().unwrap()))
                    .collect::<Vec<_>>(),
            )
        };
        let mut reply = Reply {
            status: Status::Ok,
            roots: der(&roots),
            crosses: der(&crosses),
            ..Reply::default()
        };
        // Pinning the first root only, both successors are linked to it.
        let all = vec![r3.clone(), r2.clone(), r1.clone()];
        assert_eq!(
            roots_of(&reply, std::slice::from_ref(&r1), 0).unwrap(),
            Some(all.clone())
        );
        // Pinning the second only: the third is linked to it, and the
        // first too, by the back-certificate the second gave it.
        assert_eq!(
            roots_of(&reply, std::slice::from_ref(&r2), 0).unwrap(),
            Some(all.clone())
        );
        // Pinning the newest only: each before it by its back-certificate.
        assert_eq!(
            roots_of(&reply, std::slice::from_ref(&r3), 0).unwrap(),
            Some(all.clone())
        );
        // Without the back-certificates, pinning the newest only, the
        // others are left out.
        reply.crosses = der(&[crosses[0].clone(), crosses[2].clone()]);
        assert_eq!(
            roots_of(&reply, std::slice::from_ref(&r3), 0).unwrap(),
            Some(vec![r3.clone()])
        );
        // Without the cross-certificate that links the second root to the
        // first, neither successor is taken.
        reply.crosses = der(&crosses[..1]);
        assert_eq!(
            roots_of(&reply, std::slice::from_ref(&r1), 0).unwrap(),
            Some(vec![r1.clone()])
        );
        // Roots of another fleet, signed by the manager's key alone: none.
        let other = FakeManager::new();
        reply.roots = der(other.roots());
        reply.crosses = None;
        assert!(roots_of(&reply, std::slice::from_ref(&r1), 0).is_err());
        // Only from an ok reply.
        reply.roots = der(&all);
        reply.crosses = der(&crosses);
        reply.status = Status::Busy;
        assert!(roots_of(&reply, std::slice::from_ref(&r1), 0)
            .unwrap()
            .is_none());
        reply.status = Status::Ok;
        reply.roots = None;
        assert!(roots_of(&reply, std::slice::from_ref(&r1), 0)
            .unwrap()
            .is_none());
        for bad in [
            vec![],
            vec![ByteBuf::from(other.service_ca.to_der().unwrap())],
            vec![ByteBuf::from(vec![0x30, 0x03, 1, 2, 3])],
            vec![ByteBuf::from(r1.to_der().unwrap()); 5],
        ] {
            reply.roots = Some(bad);
            assert!(
                roots_of(&reply, std::slice::from_ref(&r1), 0).is_err(),
                "{:?}",
                reply.roots
            );
        }
    }

    /// What whoever holds the manager's signing key (and perhaps a key a
    /// root certified, such as the broker's) could send: none of it makes
    /// the device trust a root of its own or forget one it has.
    #[test]
    fn the_signing_key_alone_neither_adds_a_root_nor_drops_one() {
        use fleet_pki::testing;
        use serde_bytes::ByteBuf;
        let tmp = tempfile::tempdir().unwrap();
        // A first root that ends in 300 days, long before its successor.
        let key = crypto::generate_p256().unwrap();
        let name = testing::name(None, "fleetshift root CA").unwrap();
        let first = testing::ca_certificate(&name, &key, None, 300, None).unwrap();
        fleet_pki::write_private_key(&tmp.path().join("root-ca.key"), &key).unwrap();
        std::fs::write(tmp.path().join("root-ca.pem"), first.to_pem().unwrap()).unwrap();
        let pki = fleet_pki::Pki::open_or_create(tmp.path()).unwrap();
        let r1 = pki.root_cert();
        let read = |name: &str| std::fs::read(tmp.path().join(name)).unwrap();
        let der = |certs: &[&X509]| {
            Some(
                certs
                    .iter()
                    .map(|c| ByteBuf::from(c.to_der().unwrap()))
                    .collect::<Vec<_>>(),
            )
        };
        // A root CA of the thief's own, under the name and key of a
        // certificate the root signed.
        let forged_root = |of: &X509, key: &PKey<Private>| {
            testing::ca_certificate(of.subject_name(), key, None, 365, None).unwrap()
        };
        let broker = X509::from_pem(&read("broker.pem")).unwrap();
        let broker_key = PKey::private_key_from_pem(&read("broker.key")).unwrap();
        let (svc_ca, svc_key) = pki.service_ca("svcA").unwrap();
        for (cert, key) in [(&broker, &broker_key), (&svc_ca, &svc_key)] {
            let fake = forged_root(cert, key);
            let reply = Reply {
                status: Status::Ok,
                roots: der(&[&fake, &r1]),
                crosses: der(&[cert]),
                ..Reply::default()
            };
            assert!(
                roots_of(&reply, std::slice::from_ref(&r1), 0).is_err(),
                "a certificate that is no root CA links nothing"
            );
        }

        // A reply that leaves pinned roots out does not drop them while
        // they last; one that names an expired root does not keep it.
        pki.roll_root().unwrap();
        let r2 = pki.root_cert();
        let back = X509::from_pem(&read("root-ca.2.back.pem")).unwrap();
        let reply = Reply {
            status: Status::Ok,
            roots: der(&[&r1]),
            crosses: der(&[&back]),
            ..Reply::default()
        };
        let pinned = [r2.clone(), r1.clone()];
        let kept = roots_of(&reply, &pinned, 0).unwrap().unwrap();
        assert_eq!(kept, vec![r1.clone(), r2.clone()], "r2 stays");
        let kept = roots_of(&reply, std::slice::from_ref(&r2), 0)
            .unwrap()
            .unwrap();
        assert_eq!(kept, vec![r1.clone(), r2.clone()]);
        let r1_end = super::unix_of(r1.not_after()).unwrap();
        let kept = roots_of(&reply, std::slice::from_ref(&r2), r1_end + 1)
            .unwrap()
            .unwrap();
        assert_eq!(kept, vec![r2.clone()], "an expired root is not kept");
    }

    #[test]
    fn update_reply_in_manager_key_mode() {
        let mgr = FakeManager::new();
        let req = build_update("dev1", "svcB", &UUID, KeyMode::ManagerGenerated).unwrap();
        let body: UpdateRequest = Envelope::decode(&req.bytes).unwrap().body().unwrap();
        let key = crypto::generate_p256().unwrap();
        let sealed = crypto::seal(&body.eph, "dev1", &key.private_key_to_pkcs8().unwrap()).unwrap();
        let leaf = mgr.issue("dev1", &key);
        let reply = mgr.update_reply(&body, vec![leaf, mgr.service_ca.clone()], Some(sealed));
        let installed = finish_update(&reply, &req, "dev1", "svcB", mgr.roots()).unwrap();
        assert!(installed.key.public_eq(&key));
        // Without the sealed key there is nothing to install.
        let leaf = mgr.issue("dev1", &key);
        let reply = mgr.update_reply(&body, vec![leaf, mgr.service_ca.clone()], None);
        assert!(matches!(
            finish_update(&reply, &req, "dev1", "svcB", mgr.roots()),
            Err(ReplyError::Missing("key"))
        ));
    }
}

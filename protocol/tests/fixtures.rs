//! Every example in `topics.md` is a fixture: each payload there is decoded,
//! authenticated with the published test keys, opened where it carries
//! sealed secrets and re-encoded byte for byte, so the specification and the
//! code cannot drift apart.
//!
//! The generated blocks (payloads, their diagnostic notation, the test root
//! CA and the worked vectors) are rewritten from the published keys with
//! `cargo test -p fleet-protocol --test fixtures -- --ignored regenerate`.
//! Signatures, seals and certificates are randomized, so every run changes
//! those bytes; the checks here do not depend on them.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use fleet_protocol::crypto::{self, Sealed};
use fleet_protocol::envelope::{crc32, to_be_signed};
use fleet_protocol::topic::manager_filters;
use fleet_protocol::{
    ActivateRequest, Envelope, Kind, PollRequest, Reply, RequestKind, Route, ServiceChange, Status,
    StatusReport, Topic, UpdateRequest,
};
use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::BigNum;
use openssl::derive::Deriver;
use openssl::hash::{hash, MessageDigest};
use openssl::md::Md;
use openssl::nid::Nid;
use openssl::pkey::{HasPublic, Id, PKey, PKeyRef, Private};
use openssl::pkey_ctx::PkeyCtx;
use openssl::stack::Stack;
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::verify::X509VerifyFlags;
use openssl::x509::{X509Builder, X509Name, X509Req, X509ReqBuilder, X509StoreContext, X509};
use serde_bytes::ByteBuf;

/// Every fixture `topics.md` must carry. `{kind}` or `{kind}.{variant}`.
const EXPECTED_FIXTURES: [&str; 13] = [
    "activate",
    "activate_reply",
    "update",
    "update_reply",
    "update.generated_key",
    "update_reply.generated_key",
    "poll",
    "poll_reply",
    "status",
    "status_reply",
    "service_change",
    "poll_reply.bad_crc",
    "update_reply.wrong_service",
];

const ALL_KINDS: [Kind; 9] = [
    Kind::Activate,
    Kind::ActivateReply,
    Kind::Update,
    Kind::UpdateReply,
    Kind::Poll,
    Kind::PollReply,
    Kind::Status,
    Kind::StatusReply,
    Kind::ServiceChange,
];

const DEVICE: &str = "dev-0001";
/// 2026-12-01T00:00:00Z in milliseconds.
const T0: u64 = 1_796_083_200_000;
const DAY_SECS: u64 = 86_400;

// ---------------------------------------------------------------------------
// Reading topics.md

fn spec_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../topics.md")
}

/// A fenced block: ```` ```{lang} {key=value}... ````.
#[derive(Debug)]
struct Block {
    lang: String,
    attrs: Vec<(String, String)>,
    body: String,
    line: usize,
}

impl Block {
    fn attr(&self, key: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn hex(&self) -> Vec<u8> {
        let digits: String = self.body.split_whitespace().collect();
        hex::decode(&digits).unwrap_or_else(|e| panic!("block at line {}: bad hex: {e}", self.line))
    }
}

fn parse_info(info: &str) -> (String, Vec<(String, String)>) {
    let mut words = info.split_whitespace();
    let lang = words.next().unwrap_or_default().to_owned();
    let attrs = words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    (lang, attrs)
}

fn blocks(md: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut lines = md.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let (lang, attrs) = parse_info(info);
        let mut body = String::new();
        for (_, l) in lines.by_ref() {
            if l.starts_with("```") {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        out.push(Block {
            lang,
            attrs,
            body,
            line: i + 1,
        });
    }
    out
}

struct Spec {
    text: String,
    blocks: Vec<Block>,
}

impl Spec {
    fn load() -> Spec {
        let text = std::fs::read_to_string(spec_path()).expect("topics.md is readable");
        let blocks = blocks(&text);
        Spec { text, blocks }
    }

    fn all<'a>(&'a self, lang: &'a str, key: &'a str) -> impl Iterator<Item = &'a Block> + 'a {
        self.blocks
            .iter()
            .filter(move |b| b.lang == lang && b.attr(key).is_some())
    }

    fn one(&self, lang: &str, key: &str, value: &str) -> &Block {
        let found: Vec<&Block> = self
            .blocks
            .iter()
            .filter(|b| b.lang == lang && b.attr(key) == Some(value))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "topics.md must have exactly one ```{lang} {key}={value} block"
        );
        found[0]
    }

    fn private_key(&self, name: &str) -> PKey<Private> {
        let block = self.one("pem", "key", name);
        PKey::private_key_from_pem(block.body.as_bytes())
            .unwrap_or_else(|e| panic!("key {name}: {e}"))
    }

    fn uuid(&self) -> Vec<u8> {
        let uuid = self.one("hex", "value", "uuid").hex();
        assert_eq!(uuid.len(), 16);
        uuid
    }

    fn root_ca(&self) -> X509 {
        X509::from_pem(self.one("pem", "cert", "root-ca").body.as_bytes()).expect("root CA PEM")
    }
}

/// A fixture as the specification shows it.
struct Fixture<'a> {
    name: &'a str,
    topic: &'a str,
    bytes: Vec<u8>,
    diag: &'a str,
}

fn fixtures(spec: &Spec) -> BTreeMap<String, Fixture<'_>> {
    let mut out = BTreeMap::new();
    for block in spec.all("hex", "fixture") {
        let name = block.attr("fixture").expect("filtered on fixture");
        let topic = block
            .attr("topic")
            .unwrap_or_else(|| panic!("fixture {name} (line {}) has no topic=", block.line));
        let diag = spec.one("cbor-diag", "fixture", name);
        let previous = out.insert(
            name.to_owned(),
            Fixture {
                name,
                topic,
                bytes: block.hex(),
                diag: &diag.body,
            },
        );
        assert!(previous.is_none(), "fixture {name} appears twice");
    }
    out
}

fn kind_named(s: &str) -> Kind {
    ALL_KINDS
        .into_iter()
        .find(|k| k.as_str() == s)
        .unwrap_or_else(|| panic!("no kind {s:?}"))
}

/// The kind part of a fixture name.
fn fixture_kind(name: &str) -> Kind {
    kind_named(name.split('.').next().unwrap_or_default())
}

/// `update_reply.generated_key` answers `update.generated_key`.
fn request_of(reply_name: &str) -> String {
    reply_name.replacen("_reply", "", 1)
}

fn request_kind(kind: Kind) -> Option<RequestKind> {
    RequestKind::ALL
        .into_iter()
        .find(|rk| Kind::from(*rk) == kind || Kind::from(*rk).reply() == Some(kind))
}

// ---------------------------------------------------------------------------
// The tests

#[test]
fn every_fixture_is_present() {
    let spec = Spec::load();
    let found: BTreeSet<String> = fixtures(&spec).into_keys().collect();
    let expected: BTreeSet<String> = EXPECTED_FIXTURES.iter().map(|s| s.to_string()).collect();
    assert_eq!(found, expected);
    // Every kind has at least one example.
    for kind in ALL_KINDS {
        assert!(
            found.iter().any(|n| fixture_kind(n) == kind),
            "no fixture of kind {}",
            kind.as_str()
        );
    }
}

#[test]
fn fixtures_decode_authenticate_and_round_trip() {
    let spec = Spec::load();
    let all = fixtures(&spec);
    assert!(!all.is_empty());
    for fixture in all.values() {
        check_fixture(&spec, &all, fixture);
    }
}

fn check_fixture(spec: &Spec, all: &BTreeMap<String, Fixture<'_>>, f: &Fixture<'_>) {
    let name = f.name;
    let env = Envelope::decode(&f.bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(env.v, 1, "{name}: version");
    assert!(env.crc_ok(), "{name}: CRC");
    assert_eq!(env.crc, crc32(&env.body), "{name}: CRC");
    let kind = fixture_kind(name);
    assert_eq!(env.kind, kind, "{name}: kind");
    assert_eq!(env.encode(), f.bytes, "{name}: envelope round trip");
    assert!(
        f.bytes.len() <= fleet_protocol::MAX_MESSAGE_LEN,
        "{name}: size"
    );

    // The diagnostic notation is exactly what the bytes say, and names the kind.
    assert_eq!(
        f.diag.trim_end(),
        diag(&f.bytes).trim_end(),
        "{name}: cbor-diag block differs from the hex"
    );
    assert!(
        f.diag.contains(&format!("\"kind\": \"{}\"", kind.as_str())),
        "{name}: diag names the kind"
    );

    // Authenticator.
    let tbs = env.tbs();
    assert_eq!(tbs, to_be_signed(kind, &env.body));
    let factory = spec.private_key("factory");
    let manager = spec.private_key("manager-sign");
    match kind {
        Kind::Activate => assert!(crypto::verify(&factory, &tbs, &env.auth), "{name}: sig"),
        Kind::Update | Kind::Poll | Kind::Status => assert!(
            crypto::hmac_matches(&spec.uuid(), &tbs, &env.auth),
            "{name}: HMAC"
        ),
        _ => assert!(crypto::verify(&manager, &tbs, &env.auth), "{name}: sig"),
    }

    // Topic: parses, carries this kind and the body's device id.
    let topic = Topic::parse(f.topic).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(topic.to_string(), f.topic, "{name}: topic round trip");
    let rk = request_kind(kind);
    let expected_route = match kind {
        Kind::Activate | Kind::Update | Kind::Poll | Kind::Status => {
            Route::Request(rk.expect("request"), DEVICE.into())
        }
        Kind::ServiceChange => Route::ServiceChange(DEVICE.into()),
        _ => Route::Reply(rk.expect("reply"), DEVICE.into()),
    };
    assert_eq!(topic.route, expected_route, "{name}: topic route");
    if matches!(kind, Kind::Activate | Kind::ActivateReply) {
        assert!(topic.tenant.is_none(), "{name}: activate is bootstrap-only");
    }

    // Body: decodes as its type and re-encodes to the same bytes.
    match kind {
        Kind::Activate => {
            let body: ActivateRequest = typed(name, &env);
            check_request(name, &body.device_id, &body.nonce, body.ts);
            let eph = spec.private_key(&format!("eph.{name}"));
            assert_eq!(crypto::public_point(&eph).unwrap(), body.eph, "{name}: eph");
        }
        Kind::Update => {
            let body: UpdateRequest = typed(name, &env);
            check_request(name, &body.device_id, &body.nonce, body.ts);
            let eph = spec.private_key(&format!("eph.{name}"));
            assert_eq!(crypto::public_point(&eph).unwrap(), body.eph, "{name}: eph");
            assert_eq!(topic.tenant.is_some(), name != "update", "{name}: listener");
            if let Some(csr) = &body.csr {
                let req = X509Req::from_der(csr).expect("CSR DER");
                let key = req.public_key().unwrap();
                assert!(req.verify(&key).unwrap(), "{name}: CSR self-signature");
            }
        }
        Kind::Poll => {
            let body: PollRequest = typed(name, &env);
            check_request(name, &body.device_id, &body.nonce, body.ts);
            assert_eq!(topic.tenant.as_deref(), Some(body.service_id.as_str()));
        }
        Kind::Status => {
            let body: StatusReport = typed(name, &env);
            check_request(name, &body.device_id, &body.nonce, body.ts);
            assert!(["online", "change_applied", "notice_rejected"].contains(&body.event.as_str()));
        }
        Kind::ServiceChange => {
            let body: ServiceChange = typed(name, &env);
            assert_eq!(body.device_id, DEVICE);
            fleet_protocol::topic::validate_service_id(&body.service_id).unwrap();
        }
        _ => {
            let reply: Reply = typed(name, &env);
            check_reply(spec, all, name, &topic, &reply);
        }
    }
}

/// Decodes the body as `T` and checks that encoding it again gives the same bytes.
fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(name: &str, env: &Envelope) -> T {
    let body: T = env.body().unwrap_or_else(|e| panic!("{name}: body: {e}"));
    assert_eq!(
        serde_cbor::to_vec(&body).unwrap(),
        env.body,
        "{name}: body round trip"
    );
    body
}

fn check_request(name: &str, device_id: &str, nonce: &[u8], ts: u64) {
    assert_eq!(device_id, DEVICE, "{name}: device id");
    assert!((8..=64).contains(&nonce.len()), "{name}: nonce length");
    assert!(ts >= T0, "{name}: ts");
}

fn check_reply(
    spec: &Spec,
    all: &BTreeMap<String, Fixture<'_>>,
    name: &str,
    topic: &Topic,
    reply: &Reply,
) {
    assert_eq!(reply.device_id, DEVICE, "{name}: device id");
    assert!(reply.seq > 0, "{name}: seq");
    let request_name = request_of(name);
    let request = all.get(&request_name).map(|f| {
        let env = Envelope::decode(&f.bytes).unwrap();
        (f, env)
    });
    if let Some((req, _)) = &request {
        // A reply goes to the reply topic of its request: same tenant, same device.
        let req_topic = Topic::parse(req.topic).unwrap();
        assert_eq!(
            req_topic.reply_topic().as_ref(),
            Some(topic),
            "{name}: topic"
        );
    }
    if reply.status != Status::Ok {
        assert!(reply.detail.is_some(), "{name}: error replies say why");
        assert!(reply.uuid.is_none() && reply.chain.is_none() && reply.key.is_none());
        if reply.status == Status::BadCrc {
            assert!(
                reply.nonce.is_empty(),
                "{name}: unread request, empty nonce"
            );
        } else {
            assert!(!reply.nonce.is_empty(), "{name}: nonce echoed");
        }
        return;
    }
    let (_, req_env) = request.unwrap_or_else(|| panic!("{name}: no request fixture"));
    assert_eq!(reply.nonce, nonce_of(&req_env), "{name}: nonce echo");
    let eph = || spec.private_key(&format!("eph.{request_name}"));
    match fixture_kind(name) {
        Kind::ActivateReply => {
            let sealed = reply.uuid.as_ref().expect("activate reply seals the uuid");
            let uuid = crypto::unseal(&eph(), DEVICE, sealed).expect("uuid opens");
            assert_eq!(uuid, spec.uuid(), "{name}: sealed uuid");
            assert!(crypto::unseal(&eph(), "dev-0002", sealed).is_err(), "AAD");
            assert!(reply.service_id.is_some());
        }
        Kind::UpdateReply => {
            let req: UpdateRequest = req_env.body().unwrap();
            assert_eq!(reply.service_id.as_ref(), Some(&req.service_id));
            let chain = reply.chain.as_ref().expect("update reply has a chain");
            let leaf = check_chain(spec, name, chain, &req.service_id);
            let leaf_key = leaf.public_key().unwrap();
            match (&req.csr, &reply.key) {
                (Some(csr), None) => {
                    let csr_key = X509Req::from_der(csr).unwrap().public_key().unwrap();
                    assert!(
                        leaf_key.public_eq(&csr_key),
                        "{name}: leaf holds the CSR key"
                    );
                }
                (None, Some(sealed)) => {
                    let der = crypto::unseal(&eph(), DEVICE, sealed).expect("key opens");
                    let key = PKey::private_key_from_pkcs8(&der).expect("PKCS#8 DER");
                    assert!(
                        leaf_key.public_eq(&key),
                        "{name}: leaf holds the sealed key"
                    );
                }
                other => panic!("{name}: csr/key combination {other:?}"),
            }
        }
        Kind::PollReply => {
            let change = reply.change.as_ref().expect("poll reply with a change");
            let notice = all.get("service_change").expect("service_change fixture");
            let notice: ServiceChange = Envelope::decode(&notice.bytes).unwrap().body().unwrap();
            assert_eq!(change, &notice, "{name}: the change is the notice's body");
            assert!(reply.service_id.is_some());
        }
        Kind::StatusReply => {
            assert!(reply.service_id.is_none() && reply.change.is_none());
            check_roots(spec, name, reply);
        }
        other => panic!("{name}: unexpected reply kind {other:?}"),
    }
}

/// `roots` and `crosses` of an example after a root roll-over (§3.5.5):
/// the successor, then the published root; the successor certified by
/// the published root, and the published root by the successor; every one
/// a root CA certificate, as a device checks.
fn check_roots(spec: &Spec, name: &str, reply: &Reply) {
    let certs = |list: &Option<Vec<ByteBuf>>| -> Vec<X509> {
        list.as_ref()
            .unwrap_or_else(|| panic!("{name}: roots and crosses"))
            .iter()
            .map(|der| X509::from_der(der).unwrap())
            .collect()
    };
    let (roots, crosses) = (certs(&reply.roots), certs(&reply.crosses));
    assert_eq!(roots.len(), 2, "{name}: two roots");
    assert_eq!(crosses.len(), 2, "{name}: a link each way");
    let (new, first) = (&roots[0], &roots[1]);
    assert_eq!(
        first.to_der().unwrap(),
        spec.root_ca().to_der().unwrap(),
        "{name}: the published root second"
    );
    assert!(
        new.verify(&new.public_key().unwrap()).unwrap(),
        "{name}: self-signed"
    );
    let same = |a: &X509, b: &X509| {
        a.subject_name().to_der().unwrap() == b.subject_name().to_der().unwrap()
            && a.public_key().unwrap().public_eq(&b.public_key().unwrap())
    };
    for (link, of, by) in [(&crosses[0], new, first), (&crosses[1], first, new)] {
        assert!(
            same(link, of),
            "{name}: a link carries its root's name and key"
        );
        assert_eq!(
            link.issuer_name().to_der().unwrap(),
            by.subject_name().to_der().unwrap()
        );
        assert!(
            link.verify(&by.public_key().unwrap()).unwrap(),
            "{name}: signed by the other root"
        );
    }
    for cert in roots.iter().chain(&crosses) {
        let usage = cert.key_usage().expect("keyUsage");
        assert!(usage.contains(openssl::x509::X509KeyUsage::KEY_CERT_SIGN));
        assert!(cert.pathlen().is_none(), "{name}: no path length limit");
    }
}

fn nonce_of(env: &Envelope) -> Vec<u8> {
    match env.kind {
        Kind::Activate => env.body::<ActivateRequest>().unwrap().nonce,
        Kind::Update => env.body::<UpdateRequest>().unwrap().nonce,
        Kind::Poll => env.body::<PollRequest>().unwrap().nonce,
        Kind::Status => env.body::<StatusReport>().unwrap().nonce,
        other => panic!("{other:?} is no request"),
    }
}

/// The chain verifies to the published root (time not checked: the examples
/// are dated) and the leaf is a device certificate for `service_id`.
fn check_chain(spec: &Spec, name: &str, chain: &[ByteBuf], service_id: &str) -> X509 {
    assert_eq!(chain.len(), 2, "{name}: leaf and service CA");
    let certs: Vec<X509> = chain
        .iter()
        .map(|c| X509::from_der(c).expect("certificate DER"))
        .collect();
    let mut store = X509StoreBuilder::new().unwrap();
    store.add_cert(spec.root_ca()).unwrap();
    store.set_flags(X509VerifyFlags::NO_CHECK_TIME).unwrap();
    let store = store.build();
    let mut intermediates = Stack::new().unwrap();
    intermediates.push(certs[1].clone()).unwrap();
    let mut ctx = X509StoreContext::new().unwrap();
    let ok = ctx
        .init(&store, &certs[0], &intermediates, |c| c.verify_cert())
        .unwrap();
    assert!(ok, "{name}: chain verifies to the root CA");
    let leaf = certs[0].clone();
    let entry = |nid| {
        leaf.subject_name()
            .entries_by_nid(nid)
            .next()
            .and_then(|e| e.data().to_string().ok())
            .map(|s| s.to_string())
    };
    assert_eq!(entry(Nid::COMMONNAME).as_deref(), Some(DEVICE));
    assert_eq!(entry(Nid::ORGANIZATIONNAME).as_deref(), Some(service_id));
    let text = String::from_utf8(leaf.to_text().unwrap()).unwrap();
    for needle in [
        format!("URI:urn:fleetshift:device:{DEVICE}"),
        format!("URI:urn:fleetshift:service:{service_id}"),
        "TLS Web Client Authentication".to_string(),
        "CA:FALSE".to_string(),
    ] {
        assert!(text.contains(&needle), "{name}: leaf lacks {needle}");
    }
    leaf
}

#[test]
fn vectors() {
    let spec = Spec::load();
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert!(spec.text.contains("0xCBF43926"));
    let all = fixtures(&spec);

    let poll = Envelope::decode(&all["poll"].bytes).unwrap();
    assert_eq!(spec.one("hex", "vector", "tbs.poll").hex(), poll.tbs());

    let reply: Reply = Envelope::decode(&all["activate_reply"].bytes)
        .unwrap()
        .body()
        .unwrap();
    let sealed = reply.uuid.expect("sealed uuid");
    let (shared, key) = seal_trace(&spec.private_key("eph.activate"), &sealed);
    assert_eq!(
        spec.one("hex", "vector", "seal.activate_reply.ecdh").hex(),
        shared
    );
    assert_eq!(
        spec.one("hex", "vector", "seal.activate_reply.key").hex(),
        key
    );

    let public = spec.one("pem", "key", "manager-sign.pub");
    let public = PKey::public_key_from_pem(public.body.as_bytes()).unwrap();
    assert!(public.public_eq(&spec.private_key("manager-sign")));
}

#[test]
fn topic_examples_parse() {
    let spec = Spec::load();
    let valid = spec.one("text", "topics", "valid");
    let mut count = 0;
    for line in valid.body.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let topic = Topic::parse(line).unwrap_or_else(|e| panic!("{line}: {e}"));
        assert_eq!(topic.to_string(), line);
        count += 1;
    }
    assert!(count >= 14, "the valid-topic list is complete");
    let invalid = spec.one("text", "topics", "invalid");
    for line in invalid
        .body
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
    {
        assert!(Topic::parse(line).is_err(), "{line} parsed");
    }
    for filter in manager_filters() {
        assert!(
            spec.text.contains(&format!("`{filter}`")),
            "{filter} missing"
        );
    }
}

/// The shared secret (ECDH x-coordinate) and AES key of a seal, computed
/// independently of `crypto::unseal`.
fn seal_trace(own: &PKeyRef<Private>, sealed: &Sealed) -> (Vec<u8>, Vec<u8>) {
    let peer = crypto::public_from_point(&sealed.epk).unwrap();
    let mut deriver = Deriver::new(own).unwrap();
    deriver.set_peer(&peer).unwrap();
    let shared = deriver.derive_to_vec().unwrap();
    let mut ctx = PkeyCtx::new_id(Id::HKDF).unwrap();
    ctx.derive_init().unwrap();
    ctx.set_hkdf_md(Md::sha256()).unwrap();
    ctx.set_hkdf_key(&shared).unwrap();
    ctx.add_hkdf_info(b"fleetshift/v1 seal").unwrap();
    let mut key = vec![0u8; 32];
    ctx.derive(Some(&mut key)).unwrap();
    (shared, key)
}

// ---------------------------------------------------------------------------
// CBOR diagnostic notation (RFC 8949 §8, with `<<...>>` for the embedded body
// and `/ comments /`), pretty-printed.

enum Item {
    Uint(u64),
    Neg(u64),
    Bytes(Vec<u8>),
    Text(String),
    Array(Vec<Item>),
    Map(Vec<(Item, Item)>),
    Simple(u8),
}

fn read_item(b: &[u8], pos: &mut usize) -> Item {
    let initial = b[*pos];
    *pos += 1;
    let (major, info) = (initial >> 5, initial & 0x1f);
    let mut arg = |n: usize| {
        let v = b[*pos..*pos + n]
            .iter()
            .fold(0u64, |acc, x| acc << 8 | u64::from(*x));
        *pos += n;
        v
    };
    let value = match info {
        0..=23 => u64::from(info),
        24 => arg(1),
        25 => arg(2),
        26 => arg(4),
        27 => arg(8),
        _ => panic!("indefinite lengths and reserved values are not used"),
    };
    match major {
        0 => Item::Uint(value),
        1 => Item::Neg(value),
        2 | 3 => {
            let data = b[*pos..*pos + value as usize].to_vec();
            *pos += value as usize;
            if major == 2 {
                Item::Bytes(data)
            } else {
                Item::Text(String::from_utf8(data).expect("UTF-8 text"))
            }
        }
        4 => Item::Array((0..value).map(|_| read_item(b, pos)).collect()),
        5 => Item::Map(
            (0..value)
                .map(|_| (read_item(b, pos), read_item(b, pos)))
                .collect(),
        ),
        7 if info < 24 => Item::Simple(info),
        _ => panic!("CBOR major type {major} not used by this protocol"),
    }
}

fn parse_cbor(bytes: &[u8]) -> Item {
    let mut pos = 0;
    let item = read_item(bytes, &mut pos);
    assert_eq!(pos, bytes.len(), "trailing bytes after CBOR item");
    item
}

/// Diagnostic notation of one encoded message.
fn diag(bytes: &[u8]) -> String {
    let mut out = String::new();
    write_item(&mut out, &parse_cbor(bytes), 0, None);
    out.push('\n');
    out
}

const HEX_PER_LINE: usize = 64;

fn write_item(out: &mut String, item: &Item, indent: usize, key: Option<&str>) {
    let pad = |n: usize| " ".repeat(n);
    match item {
        Item::Uint(v) => {
            write!(out, "{v}").unwrap();
            match key {
                Some("status") => {
                    let code = u8::try_from(*v).unwrap_or(u8::MAX);
                    write!(out, " / {} /", Status::from_code(code).name()).unwrap();
                }
                Some("crc") => write!(out, " / 0x{v:08x} /").unwrap(),
                _ => {}
            }
        }
        Item::Neg(v) => write!(out, "-{}", u128::from(*v) + 1).unwrap(),
        Item::Bytes(data) if key == Some("body") => {
            out.push_str("<<");
            write_item(out, &parse_cbor(data), indent, None);
            out.push_str(">>");
        }
        Item::Bytes(data) => {
            let digits = hex::encode(data);
            out.push_str("h'");
            for (i, chunk) in digits.as_bytes().chunks(HEX_PER_LINE).enumerate() {
                if i > 0 {
                    out.push('\n');
                    out.push_str(&pad(indent + 2));
                }
                out.push_str(std::str::from_utf8(chunk).unwrap());
            }
            out.push('\'');
        }
        Item::Text(s) => write_text(out, s),
        Item::Array(items) if items.is_empty() => out.push_str("[]"),
        Item::Array(items) => {
            out.push_str("[\n");
            for (i, it) in items.iter().enumerate() {
                out.push_str(&pad(indent + 2));
                write_item(out, it, indent + 2, None);
                out.push_str(if i + 1 < items.len() { ",\n" } else { "\n" });
            }
            out.push_str(&pad(indent));
            out.push(']');
        }
        Item::Map(entries) if entries.is_empty() => out.push_str("{}"),
        Item::Map(entries) => {
            out.push_str("{\n");
            for (i, (k, v)) in entries.iter().enumerate() {
                out.push_str(&pad(indent + 2));
                write_item(out, k, indent + 2, None);
                out.push_str(": ");
                let name = match k {
                    Item::Text(s) => Some(s.as_str()),
                    _ => None,
                };
                write_item(out, v, indent + 2, name);
                out.push_str(if i + 1 < entries.len() { ",\n" } else { "\n" });
            }
            out.push_str(&pad(indent));
            out.push('}');
        }
        Item::Simple(20) => out.push_str("false"),
        Item::Simple(21) => out.push_str("true"),
        Item::Simple(22) => out.push_str("null"),
        Item::Simple(v) => write!(out, "simple({v})").unwrap(),
    }
}

fn write_text(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => write!(out, "\\u{:04x}", c as u32).unwrap(),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn hex_lines(bytes: &[u8]) -> String {
    let digits = hex::encode(bytes);
    let mut out = String::new();
    for chunk in digits.as_bytes().chunks(HEX_PER_LINE) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out
}

// ---------------------------------------------------------------------------
// Regeneration

/// Rewrites the generated blocks of `topics.md` from its published keys.
#[test]
#[ignore = "rewrites topics.md; run by hand after changing the protocol"]
fn regenerate() {
    let spec = Spec::load();
    let generated = generate(&spec);
    let mut out = String::new();
    let mut replaced = BTreeSet::new();
    let mut lines = spec.text.lines();
    while let Some(line) = lines.next() {
        out.push_str(line);
        out.push('\n');
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let (lang, attrs) = parse_info(info);
        let identity = attrs.first().map(|(k, v)| format!("{lang} {k}={v}"));
        let new_body = identity.as_ref().and_then(|id| generated.get(id));
        let mut old_body = String::new();
        for l in lines.by_ref() {
            if l.starts_with("```") {
                out.push_str(new_body.unwrap_or(&old_body));
                out.push_str(l);
                out.push('\n');
                break;
            }
            old_body.push_str(l);
            old_body.push('\n');
        }
        if new_body.is_some() {
            replaced.insert(identity.expect("matched"));
        }
    }
    let missing: Vec<&String> = generated
        .keys()
        .filter(|k| !replaced.contains(*k))
        .collect();
    assert!(missing.is_empty(), "topics.md lacks blocks for {missing:?}");
    std::fs::write(spec_path(), out).unwrap();
}

fn nonce(label: &str) -> Vec<u8> {
    hash(MessageDigest::sha256(), label.as_bytes()).unwrap()[..16].to_vec()
}

struct Generator<'a> {
    spec: &'a Spec,
    out: BTreeMap<String, String>,
}

impl Generator<'_> {
    fn fixture<T: serde::Serialize>(&mut self, name: &str, topic: &Topic, body: &T) -> Vec<u8> {
        let kind = fixture_kind(name);
        let env = Envelope::build(kind, body, |tbs| match kind {
            Kind::Activate => crypto::sign(&self.spec.private_key("factory"), tbs),
            Kind::Update | Kind::Poll | Kind::Status => crypto::hmac(&self.spec.uuid(), tbs),
            _ => crypto::sign(&self.spec.private_key("manager-sign"), tbs),
        })
        .unwrap();
        let bytes = env.encode();
        // The topic= attribute is part of the hand-written fence line; check it here.
        let block = self.spec.one("hex", "fixture", name);
        assert_eq!(block.attr("topic"), Some(topic.to_string().as_str()));
        self.out
            .insert(format!("hex fixture={name}"), hex_lines(&bytes));
        self.out
            .insert(format!("cbor-diag fixture={name}"), diag(&bytes));
        bytes
    }
}

fn generate(spec: &Spec) -> BTreeMap<String, String> {
    let mut g = Generator {
        spec,
        out: BTreeMap::new(),
    };
    let d = DEVICE.to_string();
    let eph = |name: &str| crypto::public_point(&spec.private_key(&format!("eph.{name}"))).unwrap();
    let boot = |kind| Topic::bootstrap(Route::Request(kind, d.clone()));
    let tenant = |svc: &str, kind| Topic::in_tenant(svc, Route::Request(kind, d.clone()));
    let reply_of = |t: &Topic| t.reply_topic().unwrap();

    // Test PKI: root CA, one CA per service.
    let t0 = T0 / 1000;
    let root_key = crypto::generate_p256().unwrap();
    let root = make_cert(
        &name(None, "fleetshift root CA"),
        &root_key,
        None,
        &root_key,
        Profile::Ca(None),
        (t0 - 300, t0 + 3650 * DAY_SECS),
    );
    g.out
        .insert("pem cert=root-ca".into(), pem(&root.to_pem().unwrap()));
    // Its successor (§8), and the links between the two, both ways.
    let root2_key = crypto::generate_p256().unwrap();
    let root2_name = name(None, "fleetshift root CA 2");
    let root2 = make_cert(
        &root2_name,
        &root2_key,
        None,
        &root2_key,
        Profile::Ca(None),
        (t0 - 300, t0 + 3650 * DAY_SECS),
    );
    let cross = make_cert(
        &root2_name,
        &root2_key,
        Some((&root, &root_key)),
        &root_key,
        Profile::Ca(None),
        (t0 - 300, t0 + 3650 * DAY_SECS),
    );
    let back = make_cert(
        &name(None, "fleetshift root CA"),
        &root_key,
        Some((&root2, &root2_key)),
        &root2_key,
        Profile::Ca(None),
        (t0 - 300, t0 + 3650 * DAY_SECS),
    );
    let der = |c: &X509| ByteBuf::from(c.to_der().unwrap());
    let service_ca = |svc: &str| {
        let key = crypto::generate_p256().unwrap();
        let cert = make_cert(
            &name(Some(svc), &format!("fleetshift service CA {svc}")),
            &key,
            Some((&root, &root_key)),
            &root_key,
            Profile::Ca(Some(0)),
            (t0 - 300, t0 + 1825 * DAY_SECS),
        );
        (cert, key)
    };
    let issue = |ca: &(X509, PKey<Private>), svc: &str, key: &PKeyRef<openssl::pkey::Public>| {
        let leaf = make_cert(
            &name(Some(svc), DEVICE),
            key,
            Some((&ca.0, &ca.1)),
            &ca.1,
            Profile::Device(svc),
            (t0 - 300, t0 + 30 * DAY_SECS),
        );
        vec![
            ByteBuf::from(leaf.to_der().unwrap()),
            ByteBuf::from(ca.0.to_der().unwrap()),
        ]
    };
    let weather_ca = service_ca("weather");
    let traffic_ca = service_ca("traffic");

    // 1. activate, on the bootstrap listener.
    let t = boot(RequestKind::Activate);
    let activate = ActivateRequest {
        device_id: d.clone(),
        service_id: None,
        nonce: nonce("activate"),
        ts: T0,
        eph: eph("activate"),
    };
    g.fixture("activate", &t, &activate);
    let sealed_uuid = crypto::seal(&activate.eph, DEVICE, &spec.uuid()).unwrap();
    let (shared, key) = seal_trace(&spec.private_key("eph.activate"), &sealed_uuid);
    g.out.insert(
        "hex vector=seal.activate_reply.ecdh".into(),
        hex_lines(&shared),
    );
    g.out
        .insert("hex vector=seal.activate_reply.key".into(), hex_lines(&key));
    g.fixture(
        "activate_reply",
        &reply_of(&t),
        &Reply {
            device_id: d.clone(),
            nonce: activate.nonce.clone(),
            seq: 3,
            status: Status::Ok,
            service_id: Some("weather".into()),
            uuid: Some(sealed_uuid),
            ..Reply::default()
        },
    );

    // 2. update (CSR mode), still on the bootstrap listener.
    let t = boot(RequestKind::Update);
    let service_key = crypto::generate_p256().unwrap();
    let csr = csr(DEVICE, &service_key);
    let update = UpdateRequest {
        device_id: d.clone(),
        service_id: "weather".into(),
        nonce: nonce("update"),
        ts: T0 + 2_000,
        eph: eph("update"),
        csr: Some(ByteBuf::from(csr)),
    };
    g.fixture("update", &t, &update);
    let public = PKey::public_key_from_der(&service_key.public_key_to_der().unwrap()).unwrap();
    g.fixture(
        "update_reply",
        &reply_of(&t),
        &Reply {
            device_id: d.clone(),
            nonce: update.nonce.clone(),
            seq: 6,
            status: Status::Ok,
            service_id: Some("weather".into()),
            chain: Some(issue(&weather_ca, "weather", &public)),
            ..Reply::default()
        },
    );

    // 3. The operator moves the device to `traffic`: the notice, to the old tenant.
    let change = ServiceChange {
        device_id: d.clone(),
        seq: 9,
        change_id: "7c9e6679-7425-40de-944b-e07fc1f90ae7".into(),
        service_id: "traffic".into(),
        provider: Some("acme".into()),
        application: Some("traffic-v2".into()),
        endpoint: Some("mqtts://127.0.0.1:8883".into()),
        ts: T0 + 60_000,
    };
    g.fixture(
        "service_change",
        &Topic::in_tenant("weather", Route::ServiceChange(d.clone())),
        &change,
    );

    // 4. poll in the old tenant (a device that missed the notice finds it here).
    let t = tenant("weather", RequestKind::Poll);
    let poll = PollRequest {
        device_id: d.clone(),
        service_id: "weather".into(),
        nonce: nonce("poll"),
        ts: T0 + 90_000,
    };
    let poll_bytes = g.fixture("poll", &t, &poll);
    let poll_env = Envelope::decode(&poll_bytes).unwrap();
    g.out
        .insert("hex vector=tbs.poll".into(), hex_lines(&poll_env.tbs()));
    g.fixture(
        "poll_reply",
        &reply_of(&t),
        &Reply {
            device_id: d.clone(),
            nonce: poll.nonce.clone(),
            seq: 10,
            status: Status::Ok,
            service_id: Some("weather".into()),
            change: Some(change.clone()),
            ..Reply::default()
        },
    );

    // 5. update for the new service, manager-generated key, in the old tenant.
    let t = tenant("weather", RequestKind::Update);
    let update2 = UpdateRequest {
        device_id: d.clone(),
        service_id: "traffic".into(),
        nonce: nonce("update.generated_key"),
        ts: T0 + 95_000,
        eph: eph("update.generated_key"),
        csr: None,
    };
    g.fixture("update.generated_key", &t, &update2);
    let generated = crypto::generate_p256().unwrap();
    let public = PKey::public_key_from_der(&generated.public_key_to_der().unwrap()).unwrap();
    let sealed_key = crypto::seal(
        &update2.eph,
        DEVICE,
        &generated.private_key_to_pkcs8().unwrap(),
    )
    .unwrap();
    g.fixture(
        "update_reply.generated_key",
        &reply_of(&t),
        &Reply {
            device_id: d.clone(),
            nonce: update2.nonce.clone(),
            seq: 13,
            status: Status::Ok,
            service_id: Some("traffic".into()),
            chain: Some(issue(&traffic_ca, "traffic", &public)),
            key: Some(sealed_key),
            ..Reply::default()
        },
    );

    // 6. Reconnected in the new tenant: change_applied.
    let t = tenant("traffic", RequestKind::Status);
    let status = StatusReport {
        device_id: d.clone(),
        service_id: "traffic".into(),
        nonce: nonce("status"),
        ts: T0 + 100_000,
        event: "change_applied".into(),
        change_id: Some(change.change_id.clone()),
        detail: None,
        // It pins the first root only: its reply brings the second.
        pinned_roots: Some(vec![ByteBuf::from(
            hash(MessageDigest::sha256(), &root.to_der().unwrap())
                .unwrap()
                .to_vec(),
        )]),
        signing_key: None,
    };
    g.fixture("status", &t, &status);
    g.fixture(
        "status_reply",
        &reply_of(&t),
        &Reply {
            device_id: d.clone(),
            nonce: status.nonce.clone(),
            seq: 14,
            status: Status::Ok,
            roots: Some(vec![der(&root2), der(&root)]),
            crosses: Some(vec![der(&cross), der(&back)]),
            ..Reply::default()
        },
    );

    // 7. Errors: an unreadable request (no nonce to echo) and a refused one.
    g.fixture(
        "poll_reply.bad_crc",
        &reply_of(&tenant("traffic", RequestKind::Poll)),
        &Reply {
            device_id: d.clone(),
            nonce: Vec::new(),
            seq: 15,
            status: Status::BadCrc,
            detail: Some("CRC-32 of body does not match".into()),
            ..Reply::default()
        },
    );
    g.fixture(
        "update_reply.wrong_service",
        &reply_of(&tenant("traffic", RequestKind::Update)),
        &Reply {
            device_id: d.clone(),
            nonce: nonce("update.wrong_service"),
            seq: 16,
            status: Status::WrongService,
            detail: Some("device is on traffic, not sun".into()),
            ..Reply::default()
        },
    );
    g.out
}

fn pem(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).unwrap()
}

fn name(organization: Option<&str>, common_name: &str) -> X509Name {
    let mut b = X509Name::builder().unwrap();
    if let Some(o) = organization {
        b.append_entry_by_nid(Nid::ORGANIZATIONNAME, o).unwrap();
    }
    b.append_entry_by_nid(Nid::COMMONNAME, common_name).unwrap();
    b.build()
}

/// A CSR as a device makes it: subject CN only, SHA-256.
fn csr(device_id: &str, key: &PKeyRef<Private>) -> Vec<u8> {
    let mut b = X509ReqBuilder::new().unwrap();
    b.set_version(0).unwrap();
    b.set_subject_name(&name(None, device_id)).unwrap();
    b.set_pubkey(key).unwrap();
    b.sign(key, MessageDigest::sha256()).unwrap();
    b.build().to_der().unwrap()
}

enum Profile<'a> {
    Ca(Option<u32>),
    Device(&'a str),
}

/// A certificate shaped like the ones `fleet-pki` issues.
fn make_cert<T: HasPublic>(
    subject: &X509Name,
    public_key: &PKeyRef<T>,
    issuer: Option<(&X509, &PKey<Private>)>,
    signing_key: &PKey<Private>,
    profile: Profile<'_>,
    (not_before, not_after): (u64, u64),
) -> X509 {
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    let mut serial = crypto::random_bytes(16);
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    let serial = Asn1Integer::from_bn(&BigNum::from_slice(&serial).unwrap()).unwrap();
    b.set_serial_number(&serial).unwrap();
    b.set_subject_name(subject).unwrap();
    b.set_issuer_name(issuer.map_or(subject, |(c, _)| c.subject_name()))
        .unwrap();
    b.set_pubkey(public_key).unwrap();
    let time = |s: u64| Asn1Time::from_unix(i64::try_from(s).unwrap()).unwrap();
    b.set_not_before(&time(not_before)).unwrap();
    b.set_not_after(&time(not_after)).unwrap();
    match profile {
        Profile::Ca(path_len) => {
            let mut bc = BasicConstraints::new();
            bc.critical().ca();
            if let Some(n) = path_len {
                bc.pathlen(n);
            }
            b.append_extension(bc.build().unwrap()).unwrap();
            let ku = KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build();
            b.append_extension(ku.unwrap()).unwrap();
        }
        Profile::Device(svc) => {
            b.append_extension(BasicConstraints::new().critical().build().unwrap())
                .unwrap();
            let ku = KeyUsage::new().critical().digital_signature().build();
            b.append_extension(ku.unwrap()).unwrap();
            let eku = ExtendedKeyUsage::new().client_auth().build();
            b.append_extension(eku.unwrap()).unwrap();
            let san = SubjectAlternativeName::new()
                .uri(&format!("urn:fleetshift:device:{DEVICE}"))
                .uri(&format!("urn:fleetshift:service:{svc}"))
                .build(&b.x509v3_context(issuer.map(|(c, _)| c.as_ref()), None))
                .unwrap();
            b.append_extension(san).unwrap();
        }
    }
    let ski = SubjectKeyIdentifier::new()
        .build(&b.x509v3_context(None, None))
        .unwrap();
    b.append_extension(ski).unwrap();
    if let Some((ca, _)) = issuer {
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(Some(ca.as_ref()), None))
            .unwrap();
        b.append_extension(aki).unwrap();
    }
    b.sign(signing_key, MessageDigest::sha256()).unwrap();
    b.build()
}

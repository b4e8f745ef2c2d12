//! The operator API: JSON over HTTP/1.1, on loopback, or over TLS with a
//! certificate of its own (`admin_tls`, `certs/admin.pem`). Its routes are listed in the
//! README ("Run it"), the one place they are described; `route` is where
//! they are served.

use anyhow::Context as _;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleet_broker::frontdoor::trust::ServerTls;
use fleet_broker::log_pace::LogPace;
use fleet_broker::slots::Slots;
use rumqttc::AsyncClient;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::handlers::Core;
use crate::store::{DeviceRecord, Registration, SCHEMA_VERSION};

const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// A connection of the API, over TLS or not.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Stream = Box<dyn Io>;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegistrationIn {
    pub device_id: String,
    pub service_id: String,
    #[serde(default)]
    pub factory_key_hex: Option<String>,
}

/// `POST /v1/providers`: a service provider's certificate for a service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderIn {
    pub name: String,
    pub service_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangeIn {
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub from_service: Option<String>,
    pub service_id: String,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub application: Option<String>,
    #[serde(default)]
    pub endpoint: Option<String>,
}

/// A device as the API shows it: never its device-auth UUID.
pub fn device_view(d: &DeviceRecord) -> Value {
    json!({
        "device_id": d.device_id,
        "service_id": d.service_id,
        "provider": d.provider,
        "application": d.application,
        "activated_ms": d.activated_ms,
        "current_cert": d.current_cert,
        "pending": d.pending,
        "last_seen_ms": d.last_seen_ms,
        "pinned_roots": d.pinned_roots,
        "signing_key": d.signing_key,
    })
}

pub struct Admin {
    pub core: Arc<Core>,
    pub client: AsyncClient,
    pub subscribed: watch::Receiver<bool>,
    /// The bearer token every route but `GET /v1/health` asks for
    /// (`admin_token_file`).
    pub token: String,
    /// Requests refused for a missing or wrong token, and the pace of
    /// their log lines.
    refused: AtomicU64,
    refused_logged: Mutex<LogPace>,
}

impl Admin {
    pub fn new(
        core: Arc<Core>,
        client: AsyncClient,
        subscribed: watch::Receiver<bool>,
        token: String,
    ) -> Admin {
        Admin {
            core,
            client,
            subscribed,
            token,
            refused: AtomicU64::new(0),
            refused_logged: Mutex::new(LogPace::new(
                "operator API requests refused",
                tracing::Level::WARN,
            )),
        }
    }

    /// Logs the count of lines each of the manager's log paces, this API's
    /// included, kept quiet in a second that has ended (with `at_end`, in
    /// the second under way too).
    pub(crate) fn flush_logged(&self, at_end: bool) {
        self.core.flush_logged(at_end);
        LogPace::flush_in(&self.refused_logged, at_end);
    }

    /// Whether `authorization` (the header's value) carries this API's
    /// token: `Bearer <token>`, compared in constant time.
    fn authorized(&self, authorization: Option<&str>) -> bool {
        let Some((scheme, token)) = authorization.and_then(|v| v.trim().split_once(' ')) else {
            return false;
        };
        let (given, want) = (token.trim().as_bytes(), self.token.as_bytes());
        scheme.eq_ignore_ascii_case("bearer")
            && given.len() == want.len()
            && openssl::memcmp::eq(given, want)
    }
}

/// Serves the API on `listener` until `shutdown`; over TLS with `tls`
/// (its own certificate, taken up again when it changes).
pub async fn serve(
    admin: Arc<Admin>,
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    shutdown: CancellationToken,
) {
    // At the limit, the oldest connection that has not sent its whole
    // request yet is closed for a newcomer: silent clients cannot keep the
    // operator out, nor hold the descriptors the process shares with the
    // broker.
    let slots = Slots::new(MAX_CONNECTIONS);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of descriptors, say: the connection stays queued,
                    // so pause rather than spin on it (and log it each time).
                    warn!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Some(claim) = slots.claim() else {
            debug!(%peer, "admin connection refused: {MAX_CONNECTIONS} requests in progress");
            continue;
        };
        let (admin, tls) = (admin.clone(), tls.clone());
        tokio::spawn(async move {
            let Some(held) = claim.take().await else {
                return;
            };
            // The TLS handshake counts in the time a client has to send its
            // request, and in the slot it holds.
            let read = async {
                let stream: Stream = match tls {
                    None => Box::new(stream),
                    Some(tls) => {
                        let config = tls.config().for_client(&[]);
                        match tokio_rustls::TlsAcceptor::from(config).accept(stream).await {
                            Ok(stream) => Box::new(stream),
                            Err(err) => {
                                // A client on plain HTTP, or one that does
                                // not trust the certificate: said, paced.
                                fleet_broker::paced!(
                                    LogPace::loud_in(&admin.refused_logged),
                                    warn,
                                    %peer,
                                    error = %err,
                                    "operator API: TLS handshake failed"
                                );
                                return None;
                            }
                        }
                    }
                };
                Some(read_request_from(&admin, stream).await)
            };
            let request = tokio::select! {
                // A request read in full is answered, even if a newcomer
                // has just asked for this slot.
                biased;
                r = tokio::time::timeout(READ_TIMEOUT, read) => r,
                _ = held.closing().cancelled() => {
                    debug!(%peer, "admin connection closed for a newer one: no request yet");
                    return;
                }
            };
            held.received();
            let (stream, request) = match request {
                Ok(Some(read)) => read,
                Ok(None) => return,
                Err(_) => {
                    debug!(%peer, "admin request not received within {READ_TIMEOUT:?}");
                    return;
                }
            };
            let answered =
                tokio::time::timeout(ANSWER_TIMEOUT, answer(&admin, stream, request, peer)).await;
            // The manager's state is let go before the drain: a stopped
            // manager's store is free once its requests are answered.
            drop(admin);
            match answered {
                Ok(stream) => drain(stream).await,
                Err(_) => warn!("admin request timed out"),
            }
        });
    }
}

/// Admin API connections open at once; each serves one request.
const MAX_CONNECTIONS: usize = 64;

/// How long a client has to send its whole request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a request may take to be carried out and answered.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// One request as read: its method, path, `authorization` header and body.
struct HttpRequest {
    method: String,
    path: String,
    authorization: Option<String>,
    /// `GET /v1/health`, or the token given: else the body is not read.
    allowed: bool,
    body: Vec<u8>,
}

/// Whether a request is for `GET /v1/health`, which needs no token: for
/// probes and load balancers, and it shows no registry data.
fn is_health(method: &str, path: &str) -> bool {
    let path = path.split('?').next().unwrap_or_default();
    method == "GET" && path.trim_matches('/') == "v1/health"
}

type Request = Result<HttpRequest, String>;

async fn read_request_from(admin: &Admin, mut stream: Stream) -> (Stream, Request) {
    let request = read_request(admin, &mut stream).await;
    (stream, request)
}

/// Answers `request`; returns the stream, its writing side shut.
async fn answer(admin: &Admin, mut stream: Stream, request: Request, peer: SocketAddr) -> Stream {
    let (status, body) = match request {
        Ok(r) if is_health(&r.method, &r.path) => health_of(admin),
        Ok(r) if !r.allowed => {
            admin.refused.fetch_add(1, Ordering::Relaxed);
            let why = match r.authorization {
                None => "no token",
                Some(_) => "wrong token",
            };
            // The client's words, escaped (`?`) and cut short.
            let cut = |s: &str| s.chars().take(120).collect::<String>();
            fleet_broker::paced!(
                LogPace::loud_in(&admin.refused_logged),
                warn,
                %peer,
                method = ?cut(&r.method),
                path = ?cut(&r.path),
                "operator API request refused: {why}"
            );
            (
                401,
                json!({ "error": format!("unauthorized: {why}; send `authorization: Bearer` with the admin token (admin_token_file)") }),
            )
        }
        Ok(r) => route(admin, &r.method, &r.path, &r.body).await,
        Err(msg) => (400, json!({ "error": msg })),
    };
    let body = serde_json::to_vec_pretty(&body).unwrap_or_default();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    };
    let challenge = match status {
        401 => "www-authenticate: Bearer\r\n",
        _ => "",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{challenge}connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
    stream
}

/// Reads what the client still sends (a body not read) and drops it, until
/// the client closes, for a second at most: a socket closed with unread
/// bytes is reset, and a client still sending would see the reset, not
/// the answer.
async fn drain(mut stream: Stream) {
    let mut sink = [0u8; 8192];
    let drain = async {
        let mut left = MAX_REQUEST + 64 * 1024;
        while left > 0 {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
}

/// How long an answered connection is read from, and what is read
/// dropped, before it is closed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

async fn read_request(admin: &Admin, stream: &mut Stream) -> Request {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed before the request head".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > 64 * 1024 {
            return Err("request head too large".into());
        }
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| "request head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let mut first = lines.next().unwrap_or_default().split(' ');
    let method = first.next().unwrap_or_default().to_string();
    let path = first.next().unwrap_or_default().to_string();
    let headers: Vec<(&str, &str)> = lines.filter_map(|l| l.split_once(':')).collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim())
    };
    let authorization = header("authorization").map(str::to_string);
    // Health, and a request without the token, are answered without their
    // body read: a client without the token holds no memory with what it
    // sends (what it sent is drained after the answer).
    let health = is_health(&method, &path);
    let allowed = health || admin.authorized(authorization.as_deref());
    if health || !allowed {
        return Ok(HttpRequest {
            method,
            path,
            authorization,
            allowed,
            body: Vec::new(),
        });
    }
    let length = header("content-length")
        .map(|v| v.parse::<usize>().map_err(|_| "bad content-length"))
        .transpose()?
        .unwrap_or(0);
    if length > MAX_REQUEST {
        return Err("request body too large".into());
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed inside the body".into());
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(length);
    Ok(HttpRequest {
        method,
        path,
        authorization,
        allowed,
        body,
    })
}

async fn route(admin: &Admin, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let core = admin.core.clone();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let result: Result<Value, (u16, String)> = match (method, segments.as_slice()) {
        ("POST", ["v1", "providers"]) => match serde_json::from_slice::<ProviderIn>(body) {
            Ok(p) => {
                blocking(move || match core.issue_provider(&p.name, &p.service_id) {
                    Ok(c) => Ok(json!({
                        "client_id": c.client_id,
                        "service_id": p.service_id,
                        "serial": c.serial,
                        "chain_pem": String::from_utf8_lossy(&c.chain_pem),
                        "key_pem": String::from_utf8_lossy(&c.key_pem),
                    })),
                    Err(f) if f.status == fleet_protocol::Status::Malformed => {
                        Err((400, f.to_string()))
                    }
                    Err(f) => Err((500, f.to_string())),
                })
                .await
            }
            Err(e) => Err((400, e.to_string())),
        },
        ("POST", ["v1", "providers", name, "revoke"]) => {
            let name = name.to_string();
            blocking(move || {
                core.revoke_provider(&name)
                    .map(|n| json!({ "provider": name, "revoked": n }))
                    .map_err(|f| match f.status {
                        fleet_protocol::Status::UnknownDevice => (404, f.to_string()),
                        _ => (500, f.to_string()),
                    })
            })
            .await
        }
        ("POST", ["v1", "registrations"]) => {
            match serde_json::from_slice::<Vec<RegistrationIn>>(body) {
                Ok(regs) => blocking(move || register(&core, regs)).await,
                Err(e) => Err((400, e.to_string())),
            }
        }
        ("POST", ["v1", "service-change"]) => match serde_json::from_slice::<ChangeIn>(body) {
            Ok(change) => {
                let res = blocking(move || {
                    let mut devices = change.devices.clone();
                    if let Some(from) = &change.from_service {
                        devices.extend(
                            core.store
                                .devices()
                                .map_err(|e| (500, e.to_string()))?
                                .into_iter()
                                .filter(|d| &d.service_id == from)
                                .map(|d| d.device_id),
                        );
                    }
                    Ok(core.request_change(
                        &devices,
                        &change.service_id,
                        change.provider,
                        change.application,
                        change.endpoint,
                    ))
                })
                .await;
                match res {
                    Ok((results, changes)) => {
                        let queued = changes.len() * crate::handlers::NOTICES_PER_CHANGE;
                        admin.core.announcements.push(changes);
                        Ok(json!({ "results": results, "notices_queued": queued }))
                    }
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err((400, e.to_string())),
        },
        ("GET", ["v1", "devices"]) => {
            blocking(move || {
                Ok(Value::Array(
                    core.store
                        .devices()
                        .map_err(internal)?
                        .iter()
                        .map(device_view)
                        .collect(),
                ))
            })
            .await
        }
        ("GET", ["v1", "devices", id]) => {
            let id = id.to_string();
            blocking(move || device_detail(&core, &id)).await
        }
        ("POST", ["v1", "devices", id, "reset"]) => {
            let id = id.to_string();
            blocking(move || reset(&core, &id)).await
        }
        ("GET", ["v1", "summary"]) => blocking(move || summary(&core)).await,
        ("GET", ["v1", "revoked-certificates"]) => {
            blocking(move || {
                let revoked = core
                    .store
                    .certs()
                    .map_err(internal)?
                    .into_iter()
                    .filter(|c| {
                        c.status == crate::store::CertStatus::Revoked || c.revoked_at_grace_end
                    });
                Ok(Value::Array(
                    revoked
                        .map(|c| {
                            json!({
                                "serial": c.serial,
                                "device_id": c.device_id,
                                "service_id": c.service_id,
                                "status": c.status,
                                "revoked_ms": c.revoked_ms,
                                "revoked_at_grace_end": c.revoked_at_grace_end,
                            })
                        })
                        .collect(),
                ))
            })
            .await
        }
        ("GET", ["v1", "certificates", serial]) => {
            let serial = serial.to_string();
            blocking(move || match core.store.cert(&serial).map_err(internal)? {
                Some(c) => Ok(cert_view(&c)),
                None => Err((404, format!("no certificate {serial}"))),
            })
            .await
        }
        ("GET", ["v1", "root-ca"]) => blocking(move || root_cas(&core)).await,
        ("GET", ["v1", "signing-key"]) => blocking(move || signing_keys(&core)).await,
        ("POST", ["v1", "signing-key", "roll"]) => {
            blocking(move || {
                let rolled = core.roll_signing_key().map_err(|f| (500, f.to_string()))?;
                Ok(signing_view(&rolled))
            })
            .await
        }
        ("POST", ["v1", "root-ca", "roll"]) => {
            blocking(move || {
                let rolled = core.roll_root().map_err(|f| (500, f.to_string()))?;
                Ok(root_view(&rolled, true))
            })
            .await
        }
        ("GET", ["v1", "services", service, "ca"]) => {
            let service = service.to_string();
            blocking(move || service_cas(&core, &service)).await
        }
        ("POST", ["v1", "services", service, "ca", "roll"]) => {
            let service = service.to_string();
            let retire_older = match body {
                [] => Ok(false),
                body => serde_json::from_slice::<RollIn>(body)
                    .map(|r| r.retire_older)
                    .map_err(|e| (400, e.to_string())),
            };
            match retire_older {
                Ok(retire_older) => {
                    blocking(move || {
                        service_cas(&core, &service)?;
                        let rolled = core
                            .roll_service_ca(&service, retire_older)
                            .map_err(|f| (500, f.to_string()))?;
                        let mut view = ca_view(&rolled.ca, true);
                        view["revoked"] = json!(rolled.revoked);
                        view["retired"] = json!(rolled.retired);
                        Ok(view)
                    })
                    .await
                }
                Err(e) => Err(e),
            }
        }
        ("POST", ["v1", "services", service, "ca", "retire-older"]) => {
            let service = service.to_string();
            blocking(move || {
                service_cas(&core, &service)?;
                let (revoked, retired) = core
                    .retire_older_service_cas(&service)
                    .map_err(|f| (500, f.to_string()))?;
                Ok(json!({ "service_id": service, "revoked": revoked, "retired": retired }))
            })
            .await
        }
        ("GET", ["v1", "grants"]) => {
            blocking(move || {
                let grants = core.grants().map_err(internal)?;
                Ok(Value::Array(
                    grants
                        .into_iter()
                        .map(|(d, s)| json!({ "device_id": d, "services": s }))
                        .collect(),
                ))
            })
            .await
        }
        _ => Err((404, format!("no route {method} {path}"))),
    };
    match result {
        Ok(v) => (200, v),
        Err((code, msg)) => (code, json!({ "error": msg })),
    }
}

fn health_of(admin: &Admin) -> (u16, Value) {
    let intake = &admin.core.intake;
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    health(
        *admin.subscribed.borrow(),
        [
            n(&intake.received),
            intake.waiting() as u64,
            n(&intake.shed),
            n(&intake.dropped),
        ],
        admin.core.announcements.waiting(),
        n(&admin.refused),
        !admin.core.store.failed(),
    )
}

/// `GET /v1/health`: `ok` (and HTTP 200, else 503) while the manager is
/// subscribed at the broker, so that it hears devices, and its store
/// writes (`store_ok`: no I/O error since it started); and its requests
/// received, bytes waiting, answered busy and dropped; and the service
/// changes whose notices wait for their turn; and the operator API's
/// requests refused for their token.
fn health(
    subscribed: bool,
    [received, waiting, busy, dropped]: [u64; 4],
    changes_waiting: usize,
    refused: u64,
    store_ok: bool,
) -> (u16, Value) {
    let ok = subscribed && store_ok;
    let report = json!({
        "ok": ok,
        "subscribed": subscribed,
        "store_ok": store_ok,
        "requests": {
            "received": received,
            "waiting_bytes": waiting,
            "answered_busy": busy,
            "dropped": dropped,
        },
        "changes_waiting_for_notices": changes_waiting,
        "operator_requests_refused": refused,
    });
    (if ok { 200 } else { 503 }, report)
}

fn internal(e: impl std::fmt::Display) -> (u16, String) {
    (500, e.to_string())
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, (u16, String)> + Send + 'static,
) -> Result<T, (u16, String)> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

fn register(core: &Core, regs: Vec<RegistrationIn>) -> Result<Value, (u16, String)> {
    for r in &regs {
        fleet_protocol::topic::validate_device_id(&r.device_id)
            .map_err(|e| (400, e.to_string()))?;
        fleet_protocol::topic::validate_service_id(&r.service_id)
            .map_err(|e| (400, e.to_string()))?;
        if let Some(k) = &r.factory_key_hex {
            let bytes =
                hex::decode(k).map_err(|e| (400, format!("{}: factory key: {e}", r.device_id)))?;
            fleet_protocol::crypto::public_from_point(&bytes)
                .map_err(|e| (400, format!("{}: factory key: {e}", r.device_id)))?;
        }
    }
    // Each service's CA and CRL now, so trust and revocation exist at every
    // broker before the device asks (a broker checking CRLs, as mosquitto
    // does, refuses a certificate whose CA has none).
    let services: std::collections::BTreeSet<&str> =
        regs.iter().map(|r| r.service_id.as_str()).collect();
    for service in services {
        core.ensure_service(service)
            .map_err(|e| (500, format!("service {service}: {e}")))?;
    }
    for r in &regs {
        core.store
            .put_registration(&Registration {
                sv: SCHEMA_VERSION,
                device_id: r.device_id.clone(),
                initial_service: r.service_id.clone(),
                factory_key: r
                    .factory_key_hex
                    .as_ref()
                    .map(|k| serde_bytes::ByteBuf::from(hex::decode(k).unwrap_or_default())),
                registered_ms: fleet_protocol::now_ms(),
            })
            .map_err(internal)?;
    }
    core.store
        .audit("register", None, format!("{} devices", regs.len()))
        .map_err(internal)?;
    // Answered once on disk, as a device's requests are.
    core.store.sync().map_err(internal)?;
    Ok(json!({ "registered": regs.len() }))
}

fn device_detail(core: &Core, id: &str) -> Result<Value, (u16, String)> {
    let device = core.store.device(id).map_err(internal)?;
    let registration = core.store.registration(id).map_err(internal)?;
    if device.is_none() && registration.is_none() {
        return Err((404, format!("no device {id}")));
    }
    let history: Vec<Value> = core
        .store
        .history(id)
        .map_err(internal)?
        .into_iter()
        .map(|(_, p)| serde_json::to_value(p).unwrap_or_default())
        .collect();
    let certs: Vec<Value> = core
        .store
        .certs_of(id)
        .map_err(internal)?
        .iter()
        .map(cert_view)
        .collect();
    Ok(json!({
        "device": device.as_ref().map(device_view),
        "registered_service": registration.map(|r| r.initial_service),
        "history": history,
        "certs": certs,
    }))
}

/// A certificate record with the certificate as PEM.
pub fn cert_view(c: &crate::store::CertRecord) -> Value {
    let pem = openssl::x509::X509::from_der(&c.der)
        .and_then(|x| x.to_pem())
        .map(|p| String::from_utf8_lossy(&p).into_owned())
        .unwrap_or_default();
    json!({
        "serial": c.serial,
        "device_id": c.device_id,
        "service_id": c.service_id,
        "status": c.status,
        "key_mode": c.key_mode,
        "not_before": c.not_before,
        "not_after": c.not_after,
        "issued_ms": c.issued_ms,
        "revoked_ms": c.revoked_ms,
        "revoked_at_grace_end": c.revoked_at_grace_end,
        "superseded_by": c.superseded_by,
        "fingerprint_sha256": c.fingerprint_sha256,
        "ca_generation": c.ca_generation,
        "pem": pem,
    })
}

/// The body of `POST /v1/services/{service}/ca/roll` (optional).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RollIn {
    #[serde(default)]
    retire_older: bool,
}

/// The generations of a service's CA, oldest first; 404 for a service
/// without one.
fn service_cas(core: &Core, service: &str) -> Result<Value, (u16, String)> {
    let generations = core
        .pki
        .service_ca_generations(service)
        .map_err(|e| match e {
            fleet_pki::PkiError::BadServiceId(_) => (400, e.to_string()),
            _ => internal(e),
        })?;
    let Some(last) = generations.last().map(|ca| ca.generation) else {
        return Err((404, format!("service {service} has no CA")));
    };
    // What each generation issued that is still good (neither revoked nor
    // expired): what a retirement would cut off.
    let now = fleet_protocol::now_ms();
    let mut live: HashMap<u32, usize> = HashMap::new();
    for c in core.store.certs().map_err(internal)? {
        if c.service_id == service && c.is_live(now) {
            *live.entry(c.ca_generation).or_default() += 1;
        }
    }
    Ok(json!({
        "service_id": service,
        "generations": generations
            .iter()
            .map(|ca| {
                let mut view = ca_view(ca, ca.generation == last);
                view["live_certificates"] = json!(live.get(&ca.generation).copied().unwrap_or(0));
                view
            })
            .collect::<Vec<_>>(),
    }))
}

/// The generations of the fleet's root CA, oldest first; the last one
/// issues; each with how many devices said they pin it (`pinned_roots`,
/// topics.md §3.5.4). After a roll-over, also:
/// - the devices that have reported `online` since (the answer offered
///   them the roots to pin) and how many have not, with the first 100 of
///   those;
/// - the devices that said they pin the newest root, and how many have
///   not, with the first 100 of those: they must before the oldest root
///   expires. A device that never said which roots it pins (built without
///   `pinned_roots`) is among them, and counted in `devices_not_saying`.
fn root_cas(core: &Core) -> Result<Value, (u16, String)> {
    let generations = core.pki.root_generations().map_err(internal)?;
    let devices = core.store.devices().map_err(internal)?;
    let last = generations.last().map(|r| r.generation);
    let pinning = |generation: u32| {
        devices
            .iter()
            .filter(|d| {
                d.pinned_roots
                    .as_ref()
                    .is_some_and(|p| p.contains(&generation))
            })
            .count()
    };
    let mut view = json!({
        "generations": generations
            .iter()
            .map(|r| {
                let mut view = root_view(r, Some(r.generation) == last);
                view["devices_pinning"] = json!(pinning(r.generation));
                view
            })
            .collect::<Vec<_>>(),
    });
    if let Some(newest) = generations.last().filter(|r| r.generation >= 2) {
        // `made_at` is whole seconds: a report in that second may have been
        // answered before the roll, so it does not count.
        let since_ms = (newest.made_at + 1).saturating_mul(1000);
        let (mut reported, mut not_reported) = (0, Vec::new());
        let (mut pinned, mut not_pinned, mut not_saying) = (0, Vec::new(), 0);
        for d in &devices {
            if d.last_seen_ms.is_some_and(|at| at >= since_ms) {
                reported += 1;
            } else {
                not_reported.push(d.device_id.clone());
            }
            match &d.pinned_roots {
                Some(p) if p.contains(&newest.generation) => pinned += 1,
                Some(_) => not_pinned.push(d.device_id.clone()),
                None => {
                    not_saying += 1;
                    not_pinned.push(d.device_id.clone());
                }
            }
        }
        view["devices_reported_since_roll"] = json!(reported);
        view["devices_not_reported_since_roll"] = json!(not_reported.len());
        view["not_reported"] = json!(first_hundred(not_reported));
        view["devices_pinning_newest"] = json!(pinned);
        view["devices_not_pinning_newest"] = json!(not_pinned.len());
        view["devices_not_saying"] = json!(not_saying);
        view["not_pinning_newest"] = json!(first_hundred(not_pinned));
    }
    Ok(view)
}

/// The generations of the manager's signing key, oldest first; the last
/// signs. Each with how many devices said they take messages by it
/// (`signing_key` of their reports, topics.md §3.5.4); also how many
/// devices have not said they take the newest, with the first 100 of
/// those, and how many never said which key they take (firmware without
/// `signing_key`, which may not implement `signer` either: roll only once
/// none is left).
fn signing_keys(core: &Core) -> Result<Value, (u16, String)> {
    let generations = core.pki.signing_generations().map_err(internal)?;
    let devices = core.store.devices().map_err(internal)?;
    let newest = generations.last().map(|g| g.generation);
    let mut not_on_newest = Vec::new();
    let mut not_saying = 0;
    for d in &devices {
        if d.signing_key.is_none() {
            not_saying += 1;
        }
        if d.signing_key != newest {
            not_on_newest.push(d.device_id.clone());
        }
    }
    let count = not_on_newest.len();
    Ok(json!({
        "generations": generations
            .iter()
            .map(|g| {
                let mut view = signing_view(g);
                view["devices_taking"] = json!(devices
                    .iter()
                    .filter(|d| d.signing_key == Some(g.generation))
                    .count());
                view
            })
            .collect::<Vec<_>>(),
        "devices_not_on_newest": count,
        "not_on_newest": first_hundred(not_on_newest),
        "devices_not_saying": not_saying,
    }))
}

/// The first 100 of `ids`, sorted: the devices a listing names.
fn first_hundred(mut ids: Vec<String>) -> Vec<String> {
    ids.sort();
    ids.truncate(100);
    ids
}

fn signing_view(g: &fleet_pki::SigningGeneration) -> Value {
    json!({
        "generation": g.generation,
        "signing": g.signing,
        "path": g.path,
        "not_before": g.not_before,
        "not_after": g.not_after,
    })
}

fn root_view(root: &fleet_pki::RootGeneration, issuing: bool) -> Value {
    json!({
        "generation": root.generation,
        "issuing": issuing,
        "subject": subject_of(&root.cert),
        "serial": root.serial_hex,
        "not_before": root.not_before,
        "not_after": root.not_after,
        "made_at": root.made_at,
        "cert_path": root.cert_path,
        "cross_path": root.cross_path,
        "has_key": root.has_key,
    })
}

/// A certificate's subject as `CN=..., O=...`.
fn subject_of(cert: &openssl::x509::X509) -> String {
    cert.subject_name()
        .entries()
        .filter_map(|e| {
            let value = e.data().to_string().ok()?;
            Some(format!("{}={}", e.object().nid().short_name().ok()?, value))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn ca_view(ca: &fleet_pki::CaGeneration, issuing: bool) -> Value {
    json!({
        "generation": ca.generation,
        "issuing": issuing,
        "subject": subject_of(&ca.cert),
        "serial": ca.serial_hex,
        "not_before": ca.not_before,
        "not_after": ca.not_after,
        "cert_path": ca.cert_path,
        "crl_path": ca.crl_path,
    })
}

fn reset(core: &Core, id: &str) -> Result<Value, (u16, String)> {
    match core.reset(id) {
        Ok(true) => Ok(json!({ "reset": id })),
        Ok(false) => Err((404, format!("device {id} is not active"))),
        Err(f) => Err((500, f.to_string())),
    }
}

fn summary(core: &Core) -> Result<Value, (u16, String)> {
    let mut per_service: BTreeMap<String, usize> = BTreeMap::new();
    let mut pending = 0;
    let mut confirmed = 0;
    // Moved to (or certified for) a service it has not reported from yet:
    // a change the manager has made but the device has not.
    let mut unconfirmed = 0;
    for d in core.store.devices().map_err(internal)? {
        *per_service.entry(d.service_id.clone()).or_default() += 1;
        pending += d.pending.is_some() as usize;
        confirmed += d.last_seen_ms.is_some() as usize;
        if let Some(n) = d.open_period {
            let period = core.store.period(&d.device_id, n).map_err(internal)?;
            unconfirmed += period.is_some_and(|p| p.confirmed_ms.is_none()) as usize;
        }
    }
    let mut certs: BTreeMap<String, usize> = BTreeMap::new();
    for c in core.store.certs().map_err(internal)? {
        *certs
            .entry(format!("{:?}", c.status).to_lowercase())
            .or_default() += 1;
    }
    Ok(json!({
        "registered": core.store.registrations().map_err(internal)?.len(),
        "devices_per_service": per_service,
        "pending_changes": pending,
        "unconfirmed": unconfirmed,
        "seen_online": confirmed,
        "certs": certs,
    }))
}

/// The address to reach a listener bound to `addr` at: loopback for a
/// listener on every address (which the certificates name).
pub fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// Where the operator API is and the token it asks for: what the CLI and
/// the tests call it with.
#[derive(Debug, Clone)]
pub struct AdminApi {
    /// `host:port`, as `admin_listen` (a URL's scheme is let go).
    pub addr: String,
    pub token: Token,
    /// Over TLS (`admin_tls`): an `https://` address, or a root given.
    https: bool,
    /// The root CA (PEM file) the API's certificate is checked against.
    root: Option<PathBuf>,
    /// The TLS client's configuration, made from `root` at the first call.
    tls_config: Arc<std::sync::OnceLock<Arc<rustls::ClientConfig>>>,
}

/// The operator API's token: given, or read from its file at every call,
/// so that a long-running command (`mosquitto-config --watch-ms`) follows
/// a token changed while it runs, and may start before the manager has
/// made the file.
#[derive(Debug, Clone)]
pub enum Token {
    Given(String),
    File(PathBuf),
}

impl Token {
    fn read(&self) -> anyhow::Result<String> {
        match self {
            Token::Given(token) => Ok(token.clone()),
            Token::File(path) => {
                let token = std::fs::read_to_string(path).with_context(|| {
                    format!(
                        "reading the operator API's token from {} (admin_token_file; `fleet-manager serve` and `pki-init` write it)",
                        path.display()
                    )
                })?;
                Ok(token.trim().to_string())
            }
        }
    }
}

impl AdminApi {
    /// At `addr`, `host:port` or a URL: `https://` is over TLS, which
    /// needs [`AdminApi::with_root`].
    pub fn new(addr: impl Into<String>, token: Token) -> AdminApi {
        let addr: String = addr.into();
        let https = addr.starts_with("https://");
        let addr = addr
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/');
        AdminApi {
            addr: addr.to_string(),
            token,
            https,
            root: None,
            tls_config: Default::default(),
        }
    }

    /// Over TLS, the API's certificate checked against `root` (PEM), for
    /// the name or address in `addr`.
    pub fn with_root(self, root: PathBuf) -> AdminApi {
        AdminApi {
            https: true,
            root: Some(root),
            tls_config: Default::default(),
            ..self
        }
    }

    /// A TLS client that trusts `root` alone.
    fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let root = self.root.as_ref().with_context(|| {
            format!(
                "https://{}: no root CA to check the operator API's certificate against (--admin-ca)",
                self.addr
            )
        })?;
        let reading = || format!("reading {}", root.display());
        let pem = std::fs::read(root).with_context(reading)?;
        let config = fleet_broker::frontdoor::trust::client_trusting(&pem).with_context(reading)?;
        Ok(Arc::new(config))
    }

    /// Whether requests go over TLS.
    pub fn is_https(&self) -> bool {
        self.https
    }

    /// A TLS connection over `tcp` to the API, its certificate checked.
    async fn tls(&self, tcp: TcpStream) -> anyhow::Result<Stream> {
        let config = match self.tls_config.get() {
            Some(config) => config.clone(),
            None => {
                let config = self.client_config()?;
                self.tls_config.get_or_init(|| config).clone()
            }
        };
        // The host of `host:port`, an IPv6 address without its brackets.
        let host = self.addr.rsplit_once(':').map_or(&*self.addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let name = rustls::pki_types::ServerName::try_from(host.to_owned())
            .with_context(|| format!("{host} is neither a host name nor an IP address"))?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .with_context(|| format!("TLS with the operator API at https://{}", self.addr))?;
        Ok(Box::new(tls))
    }

    /// The token given, or read from its file now.
    pub fn token(&self) -> anyhow::Result<String> {
        self.token.read()
    }
}

/// A minimal HTTP client for the CLI and tests: one request, JSON in and out.
pub async fn call(
    api: &AdminApi,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Value> {
    let body = body
        .map(serde_json::to_vec)
        .transpose()?
        .unwrap_or_default();
    let addr = api.addr.as_str();
    let token = api.token()?;
    let unreachable = || {
        format!("the manager's admin API at {addr} (is `fleet-manager serve` running, with this admin_listen?)")
    };
    let tcp = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .with_context(unreachable)?
        .with_context(unreachable)?;
    let mut stream: Stream = match api.https {
        true => tokio::time::timeout(Duration::from_secs(10), api.tls(tcp))
            .await
            .context("TLS handshake with the operator API")??,
        false => Box::new(tcp),
    };
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(&body).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut response)).await??;
    // A TLS alert record: the API speaks TLS, and this client did not.
    anyhow::ensure!(
        response.first() != Some(&0x15),
        "{addr}: the operator API answered in TLS: reach it as https:// (admin_tls)"
    );
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("bad HTTP response"))?;
    let status = head.split(' ').nth(1).unwrap_or("0");
    let value: Value = serde_json::from_str(body)?;
    anyhow::ensure!(status == "200", "{method} {path}: HTTP {status}: {value}");
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_is_ok_only_while_subscribed_and_the_store_writes() {
        let (status, report) = health(false, [5, 0, 1, 2], 7, 3, true);
        assert_eq!((status, &report["ok"]), (503, &json!(false)));
        assert_eq!(report["requests"]["dropped"], 2);
        assert_eq!(report["changes_waiting_for_notices"], 7);
        assert_eq!(report["operator_requests_refused"], 3);
        // A store that failed to write makes the manager unhealthy.
        let (status, report) = health(true, [5, 0, 1, 2], 0, 0, false);
        assert_eq!((status, &report["ok"]), (503, &json!(false)));
        assert_eq!(report["store_ok"], json!(false));
        let (status, report) = health(true, [5, 0, 1, 2], 0, 0, true);
        assert_eq!((status, &report["ok"]), (200, &json!(true)));
    }
}

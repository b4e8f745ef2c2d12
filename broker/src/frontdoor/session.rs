//! One MQTT connection, 3.1.1 or 5 ([`codec`](super::codec)): CONNECT and
//! identity binding, then every packet authorized before it reaches the
//! router, and the router's packets written back, within the limits the
//! client announced ([`outbound`]). The router link is in process
//! (`LinkTx`/`LinkRx`), so a device costs one file descriptor.

mod answers;
mod outbound;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::shown::{shown_bytes, Shown};
use answers::Answers;
use bytes::Bytes;
use outbound::{Out, Outbound};

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    Connect, ConnectProperties, Disconnect, DisconnectReasonCode, LastWill, LastWillProperties,
    Login, Packet, Publish, PublishProperties, QoS, SubAck, UnsubAck, UnsubAckReason,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::codec::{Framed, Refusal, TopicAliases, Version, MAX_WRITE_STALL};
use super::grants::Identity;
use super::{ListenerKind, Shared};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("MQTT: {0:?}")]
    Mqtt(rumqttd::protocol::Error),
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("first packet was not CONNECT")]
    NotConnect,
    #[error("refused: {0}")]
    Refused(String),
    /// The client broke the protocol; MQTT 5 clients are told with `code`.
    #[error("protocol violation ({0:?}): {1}")]
    Violation(DisconnectReasonCode, String),
    #[error("router: {0}")]
    Router(String),
    /// The client holds more than the broker keeps for one connection;
    /// MQTT 5 clients are told Quota exceeded (0x97).
    #[error("quota exceeded: {0}")]
    Quota(String),
    /// The router ended the session: nothing to tell the router on the way out.
    #[error("closed by the router: {0}")]
    RouterClosed(String),
    /// A newer connection of the same identity took the session over.
    #[error("taken over by a newer connection of the same identity")]
    TakenOver,
    #[error("idle past keep-alive")]
    KeepAlive,
    /// The client took nothing of a write for this long: it stopped
    /// reading. Nothing more can be told to it.
    #[error("the client took no data for {0:?}")]
    WriteStalled(Duration),
    #[error("closed: certificate revoked or expired, the broker stopping, or a bootstrap session closed for a newcomer")]
    Revoked,
}

impl SessionError {
    /// The reason an MQTT 5 client is given in the broker's DISCONNECT
    /// when its connection ends this way, if it is told at all.
    pub(crate) fn disconnect_reason(&self) -> Option<DisconnectReasonCode> {
        match self {
            SessionError::Refused(_) => Some(DisconnectReasonCode::NotAuthorized),
            SessionError::Violation(code, _) => Some(*code),
            SessionError::Mqtt(rumqttd::protocol::Error::PayloadSizeLimitExceeded(_)) => {
                Some(DisconnectReasonCode::PacketTooLarge)
            }
            SessionError::Mqtt(
                rumqttd::protocol::Error::DuplicateProperty(_)
                | rumqttd::protocol::Error::InvalidPropertyValue(_),
            ) => Some(DisconnectReasonCode::ProtocolError),
            SessionError::Mqtt(_) => Some(DisconnectReasonCode::MalformedPacket),
            SessionError::KeepAlive => Some(DisconnectReasonCode::KeepAliveTimeout),
            SessionError::Quota(_) => Some(DisconnectReasonCode::QuotaExceeded),
            SessionError::TakenOver => Some(DisconnectReasonCode::SessionTakenOver),
            SessionError::Revoked => Some(DisconnectReasonCode::AdministrativeAction),
            _ => None,
        }
    }
}

/// How long a closing connection gets to take the broker's last word.
const FAREWELL: Duration = Duration::from_secs(2);

/// The same for a session cut (its certificate revoked or expired, the
/// broker stopping): the watcher's 200 ms and the revocation's grace of
/// 400 ms leave it this much of the second.
const CUT_FAREWELL: Duration = Duration::from_millis(300);

/// QoS 2 PUBLISHes a client may have sent and not yet released (PUBREL);
/// announced as Receive Maximum in an MQTT 5 CONNACK. Each is delivered
/// when it comes, and only its packet id is kept until its release, with
/// the session.
pub(crate) const RECEIVE_MAXIMUM: u16 = 32;

/// Filters a connection other than the manager's may hold at once: a
/// device needs a few, a provider its service's telemetry. The router
/// keeps a filter, and its log, for as long as anyone subscribes to it.
pub(crate) const MAX_SUBSCRIPTIONS: usize = 1_000;

/// Refusals a connection gets logged at WARN; the rest go to DEBUG (the
/// metrics count them all), so that a client cannot fill the log.
const LOUD_REFUSALS: u32 = 10;

/// How many of a connection's refusals were logged.
struct Complaints(u32);

impl Complaints {
    /// Whether this refusal is logged at WARN; after the last such, says
    /// that the rest are not.
    fn loud(&mut self, identity: &Identity) -> bool {
        self.0 += 1;
        if self.0 == LOUD_REFUSALS + 1 {
            warn!(identity = %identity.label(), "further refusals of this connection are logged at debug level");
        }
        self.0 <= LOUD_REFUSALS
    }
}

/// A refusal, at WARN for a connection's first few and DEBUG after.
macro_rules! refusal {
    ($complaints:expr, $identity:expr, $($event:tt)+) => {
        crate::paced!($complaints.loud($identity), warn, $($event)+)
    };
}

/// The longest a Will waits after its connection ends: a longer Will Delay
/// Interval (or Session Expiry Interval) is cut to this, so a pending Will
/// is not held for ever.
pub const MAX_WILL_DELAY: Duration = Duration::from_secs(300);

/// The router id of the link delayed Wills go through; no connection's
/// router id has this form (see [`Identity::router_client_id`]).
const WILL_LINK: &str = "w.front-door";

/// Longest a connection that takes a session over waits for the previous
/// one to end before its CONNACK.
const TAKEOVER_WAIT: Duration = Duration::from_secs(1);

/// A Will the grants allow, published by the front door when the
/// connection ends without a normal DISCONNECT.
#[derive(Clone)]
struct Will {
    /// At the Will's QoS, packet id 0 until it is published
    /// ([`Will::packets`]).
    publish: Publish,
    properties: Option<PublishProperties>,
    /// The client's Will Delay Interval (MQTT 5), 0 if none.
    delay: Duration,
}

impl Will {
    /// How long a Will waits after its connection ends: its delay or the end
    /// of the session, whichever comes first (MQTT 5 §3.1.3.2.2), and never
    /// more than [`MAX_WILL_DELAY`]. A session that ends with its
    /// connection (`clean`) has its Will at once.
    fn wait(will: Option<&Will>, clean: bool, session_expiry: u32) -> Duration {
        match (will, clean) {
            (Some(w), false) => w
                .delay
                .min(Duration::from_secs(session_expiry.into()))
                .min(MAX_WILL_DELAY),
            _ => Duration::ZERO,
        }
    }

    /// What a link sends the router to publish the Will under packet id
    /// `pkid`: at QoS 1 and 2 the router answers (PUBACK, or PUBREC and
    /// PUBCOMP), and a QoS 2 message is released at once, as a client's is
    /// (see `serve`); so it reaches each subscriber at the lower of its
    /// QoS and the subscription's.
    fn packets(self, pkid: u16) -> Vec<Packet> {
        let mut publish = self.publish;
        let (qos, _) = publish.qos_and_pkid();
        if qos != QoS::AtMostOnce {
            publish.set_qos_and_pkid(qos, pkid);
        }
        let mut packets = vec![Packet::Publish(publish, self.properties)];
        if qos == QoS::ExactlyOnce {
            packets.push(pubrel(pkid));
        }
        packets
    }

    fn new(will: LastWill, properties: Option<LastWillProperties>) -> Will {
        let delay = properties
            .as_ref()
            .and_then(|p| p.delay_interval)
            .map_or(Duration::ZERO, |s| Duration::from_secs(s.into()));
        Will {
            delay,
            // Copied: as parsed they are slices of the connection's read
            // buffer, which they would keep whole for the session's life.
            publish: {
                let mut publish = Publish::new(
                    Bytes::copy_from_slice(&will.topic),
                    Bytes::copy_from_slice(&will.message),
                    will.retain,
                );
                publish.set_qos_and_pkid(will.qos, 0);
                publish
            },
            properties: properties.map(|p| PublishProperties {
                payload_format_indicator: p.payload_format_indicator,
                message_expiry_interval: p.message_expiry_interval,
                response_topic: p.response_topic,
                correlation_data: p.correlation_data.map(|d| Bytes::copy_from_slice(&d)),
                user_properties: p.user_properties,
                content_type: p.content_type,
                ..Default::default()
            }),
        }
    }
}

/// Decides who the client is from its CONNECT and what its listener proved.
fn bind_identity(
    kind: &ListenerKind,
    connect: &Connect,
    login: Option<&Login>,
    shared: &Shared,
) -> Result<Identity, (Refusal, String)> {
    match kind {
        ListenerKind::Bootstrap => {
            fleet_protocol::topic::validate_device_id(&connect.client_id).map_err(|_| {
                (
                    Refusal::ClientId,
                    format!("client id {} is not a device id", Shown(&connect.client_id)),
                )
            })?;
            Ok(Identity::Bootstrap {
                device_id: connect.client_id.clone(),
            })
        }
        ListenerKind::Service(cert) => {
            if connect.client_id != cert.cn {
                return Err((
                    Refusal::ClientId,
                    format!(
                        "client id {} is not the certificate's CN {}",
                        Shown(&connect.client_id),
                        cert.cn
                    ),
                ));
            }
            Ok(match cert.provider() {
                Some(name) => Identity::Provider {
                    name: name.to_owned(),
                    service_id: cert.service_id.clone(),
                },
                None => Identity::Device {
                    device_id: cert.cn.clone(),
                    service_id: cert.service_id.clone(),
                    serial: cert.serial.clone(),
                },
            })
        }
        ListenerKind::Internal => {
            let Some(login) = login else {
                return Err((Refusal::Credentials, "no credentials".into()));
            };
            let ok = shared
                .internal_users
                .get(&login.username)
                .is_some_and(|secret| {
                    secret.len() == login.password.len()
                        && openssl::memcmp::eq(secret.as_bytes(), login.password.as_bytes())
                });
            if !ok {
                return Err((
                    Refusal::Credentials,
                    format!("bad credentials for {}", Shown(&login.username)),
                ));
            }
            if connect.client_id.is_empty() || connect.client_id.contains(['+', '#', '/', '$']) {
                return Err((
                    Refusal::ClientId,
                    format!("client id {}", Shown(&connect.client_id)),
                ));
            }
            Ok(Identity::Manager {
                name: login.username.clone(),
                client_id: connect.client_id.clone(),
            })
        }
    }
}

/// Decides whether a CONNECT is admitted, and as whom: the identity, then
/// what MQTT 5 adds to a CONNECT, then the Will, which is a PUBLISH too.
fn admit(
    kind: &ListenerKind,
    connect: &Connect,
    properties: Option<&ConnectProperties>,
    will: Option<&LastWill>,
    login: Option<&Login>,
    shared: &Shared,
) -> Result<Identity, (Refusal, String)> {
    let identity = bind_identity(kind, connect, login, shared)?;
    if let Some(p) = properties {
        if p.receive_maximum == Some(0) || p.max_packet_size == Some(0) {
            return Err((
                Refusal::Protocol,
                "Receive Maximum or Maximum Packet Size of 0".into(),
            ));
        }
        // MQTT 5 §3.1.2.11.10: Authentication Data without a Method.
        if p.authentication_data.is_some() && p.authentication_method.is_none() {
            return Err((
                Refusal::Protocol,
                "Authentication Data without an Authentication Method".into(),
            ));
        }
    }
    if let Some(method) = properties.and_then(|p| p.authentication_method.as_ref()) {
        return Err((
            Refusal::AuthMethod,
            format!("authentication method {}", Shown(method)),
        ));
    }
    if let Some(will) = will {
        let granted = std::str::from_utf8(&will.topic).is_ok_and(|t| identity.may_publish(t));
        if !granted {
            return Err((
                Refusal::NotAuthorized,
                format!(
                    "will topic {} is outside the grants",
                    shown_bytes(&will.topic)
                ),
            ));
        }
    }
    Ok(identity)
}

/// Runs one connection to its end.
///
/// Not an `async fn`: the future is an `async move` block that works on
/// what it captured in place. An `async fn` keeps each argument twice (as
/// passed, and as the local it is moved into), and the stream, moved into
/// the [`Framed`], would stay as a third, dead copy (a TLS stream is
/// 1.2 KiB) for the life of the connection.
pub fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    kind: ListenerKind,
    shared: Arc<Shared>,
    connection: u64,
    source: std::net::IpAddr,
    cut: CancellationToken,
) -> impl std::future::Future<Output = Result<(), SessionError>> {
    let max_packet = match kind {
        ListenerKind::Bootstrap => shared.limits.max_bootstrap_packet_size,
        _ => shared.limits.max_packet_size,
    };
    let mut framed = Framed::new(stream, max_packet);
    async move {
        // Closed for a newcomer when the bootstrap listeners are full
        // (`room_for`).
        if matches!(kind, ListenerKind::Bootstrap) {
            shared.bootstrap_session(source, connection, cut.clone());
        }
        let result: Result<(), SessionError> = 'session: {
            // Matched and admitted without naming the packet, the admission or
            // the opened link: a named value moved apart stays in the future,
            // dead, for the life of the connection.
            let first = tokio::time::timeout(shared.limits.connect_timeout, framed.read_connect());
            // Cut before its CONNECT (the broker stopping, the certificate
            // revoked, a bootstrap session closed for a newcomer), a
            // connection does not wait for it.
            let bootstrap = matches!(kind, ListenerKind::Bootstrap);
            let first = async {
                tokio::select! {
                    biased;
                    _ = cut.cancelled() => Ok(Err(SessionError::Revoked)),
                    first = first => first,
                }
            };
            // What the CONNECT carried is read in this block and only what the
            // session needs leaves it: a value merely dropped (the User
            // Properties, up to a packet's size, and the password) would keep
            // its room in the future for the connection's life.
            let (
                version,
                identity,
                will,
                label,
                mut expiry,
                clean,
                mut will_wait,
                receive_max,
                max_packet,
                keep_alive,
            ) = {
                // A CONNECT refused as it is read (an unknown protocol level:
                // CONNACK 0x01) is lingered on like any refusal.
                let (connect, properties, will, will_properties, login) = match first.await {
                    Ok(Ok(Packet::Connect(connect, properties, will, will_properties, login))) => {
                        (connect, properties, will, will_properties, login)
                    }
                    Ok(Ok(_)) => break 'session Err(SessionError::NotConnect),
                    Ok(Err(err)) => break 'session Err(err),
                    Err(_) => {
                        break 'session Err(SessionError::ConnectTimeout(
                            shared.limits.connect_timeout,
                        ))
                    }
                };
                let version = framed.version;
                if bootstrap {
                    shared.bootstrap_session_heard(source, connection);
                }
                let identity = match admit(
                    &kind,
                    &connect,
                    properties.as_ref(),
                    will.as_ref(),
                    login.as_ref(),
                    &shared,
                ) {
                    Ok(id) => id,
                    Err((refusal, why)) => {
                        shared
                            .metrics
                            .refused_connects
                            .fetch_add(1, Ordering::Relaxed);
                        crate::paced!(
                            shared.refusal_loud(super::Refused::Connect),
                            warn,
                            client_id = %Shown(&connect.client_id),
                            ?version,
                            reason = %why,
                            "connection refused"
                        );
                        let _ = framed.write(vec![version.connack_refusal(refusal)]).await;
                        break 'session Err(SessionError::Refused(why));
                    }
                };
                let manager = matches!(identity, Identity::Manager { .. });
                let will = will.map(|mut w| {
                    // As for every PUBLISH: only the manager may retain.
                    w.retain &= manager;
                    Will::new(w, will_properties)
                });
                let label = identity.label();
                if manager {
                    shared.internal_settled(connection);
                }
                // A connection without Clean Start (Clean Session in 3.1.1)
                // resumes the session its identity has; MQTT 5 keeps it past the
                // connection only for its Session Expiry Interval (0 when absent:
                // it ends with the connection, MQTT 5 §3.1.2.11.2). One with
                // Clean Start and an interval is told 0 in its CONNACK: a fresh
                // session ends with its connection. Bootstrap sessions are always
                // clean: a claimed identity keeps nothing.
                let expiry = properties
                    .as_ref()
                    .and_then(|p| p.session_expiry_interval)
                    .unwrap_or(0);
                let clean = connect.clean_session || matches!(identity, Identity::Bootstrap { .. });
                let will_wait = Will::wait(will.as_ref(), clean, expiry);
                // What the client announced it takes (MQTT 5 §3.1.2.11.3-4).
                let (receive_max, max_packet) = match (version, properties.as_ref()) {
                    (Version::V5, Some(p)) => (p.receive_maximum, p.max_packet_size),
                    _ => (None, None),
                };
                if let Some(max) = max_packet {
                    framed.peer_max = max as usize;
                }
                (
                    version,
                    identity,
                    will,
                    label,
                    expiry,
                    clean,
                    will_wait,
                    receive_max,
                    max_packet,
                    connect.keep_alive,
                )
            };
            // The session is claimed first, so the connection it replaces knows it
            // was taken over.
            let router_id = identity.router_client_id(connection);
            let claim = shared.claim(&router_id, connection);
            let _ended = claim.ended;
            let (tx, rx, ack) = match shared.link.open(router_id.clone(), clean).await {
                Ok(link) => link,
                Err(why) => {
                    shared.release(&router_id, connection);
                    let _ = framed
                        .write(vec![version.connack_refusal(Refusal::Unavailable)])
                        .await;
                    break 'session Err(SessionError::Router(why));
                }
            };
            let ack: Option<Packet> = ack.into();
            let ack = match (version, ack) {
                (Version::V5, Some(Packet::ConnAck(ack, props))) => {
                    let mut props = props.unwrap_or_default();
                    // Aliases are resolved here, not by the router (`TopicAliases`).
                    props.topic_alias_max = Some(TopicAliases::MAX);
                    props.receive_max = Some(RECEIVE_MAXIMUM);
                    props.max_packet_size = Some(framed.max_packet.min(u32::MAX as usize) as u32);
                    if clean && expiry > 0 {
                        props.session_expiry_interval = Some(0);
                    } else if !clean
                        && u64::from(expiry) > shared.limits.max_session_expiry.as_secs()
                    {
                        props.session_expiry_interval =
                            Some(shared.limits.max_session_expiry.as_secs() as u32);
                    }
                    // The longest keep-alive the idle limit allows, announced when
                    // the client asked for none or for more.
                    let longest =
                        (shared.limits.max_idle.as_secs() * 2 / 3).clamp(1, u16::MAX.into());
                    if keep_alive == 0 || u64::from(keep_alive) > longest {
                        props.server_keep_alive = Some(longest as u16);
                    }
                    Some(Packet::ConnAck(ack, Some(props)))
                }
                (_, ack) => ack,
            };
            // Opening this link made the router drop the one of the session
            // taken over, whose Will (if one goes at once) is then published:
            // waited for, briefly, so that it comes before anything of ours.
            if let Some(previous) = claim.previous {
                let _ = tokio::time::timeout(TAKEOVER_WAIT, previous.cancelled()).await;
            }
            let mut tx = tx;
            if let Err(err) = framed.write(ack.into_iter().collect()).await {
                // The client went away before its CONNACK: the router holds a link
                // for it all the same, which must not outlive this connection.
                shared.release(&router_id, connection);
                let _ = send_now(&mut tx, router_goodbye()).await;
                break 'session Err(err);
            }
            debug!(identity = %label, ?version, "connected");
            let keep_alive = match keep_alive {
                0 => shared.limits.max_idle,
                k => (Duration::from_secs(k as u64) * 3 / 2).min(shared.limits.max_idle),
            };
            // While a write waits the client's packets are not read, so the
            // keep-alive is what bounds it too.
            framed.write_stall = keep_alive.min(MAX_WRITE_STALL);
            framed.cut = cut.clone();
            let mut outbound = Outbound::new(receive_max, max_packet);
            // A session the router keeps comes back with its filters: they
            // count towards the limit again.
            let mut carried = shared.kept_state(&router_id, connection, clean);
            let result = serve(
                &mut framed,
                &identity,
                &mut tx,
                rx,
                &mut outbound,
                keep_alive,
                &shared,
                (source, connection, will.is_some()),
                &mut carried,
                &cut,
            )
            .await;
            // No longer one to close for a newcomer: it is ending.
            if matches!(kind, ListenerKind::Bootstrap) {
                shared.bootstrap_session_ends(source, connection);
            }
            // A newer connection of the same identity has claimed the session:
            // the router has dropped this connection's link, whatever ended it
            // here (the router's close, or a read error that came first).
            let taken_over = !shared.holds(&router_id, connection);
            let result = match result {
                Err(SessionError::RouterClosed(_)) if taken_over => {
                    info!(identity = %label, "session taken over by a newer connection of the same identity");
                    Err(SessionError::TakenOver)
                }
                // A DISCONNECT's Session Expiry Interval replaces the CONNECT's
                // (MQTT 5 §3.14.2.2.2), for the Will's wait and the session's.
                // One that would keep a session the CONNECT did not is not a
                // valid DISCONNECT.
                Ok((_, Some(ends))) if expiry == 0 && ends > 0 => Err(SessionError::Violation(
                    DisconnectReasonCode::ProtocolError,
                    "Session Expiry Interval set by DISCONNECT after 0 at CONNECT".into(),
                )),
                Ok((reason, Some(ends))) => {
                    will_wait = Will::wait(will.as_ref(), clean, ends);
                    expiry = ends;
                    Ok(reason)
                }
                Ok((reason, None)) => Ok(reason),
                Err(err) => Err(err),
            };
            // The router's link is gone or no longer speaks for this connection:
            // nothing more goes to it.
            let link_alive = !taken_over && !matches!(result, Err(SessionError::RouterClosed(_)));
            // The Will goes out unless the client said a normal goodbye (MQTT 5:
            // DISCONNECT 0x00; any other reason keeps it), and never
            // for a certificate that is no longer valid. A session taken over by
            // a newer connection publishes its Will at once if it has no delay
            // (MQTT 5 §3.1.4, §3.1.2.5); a delayed one is cancelled by that very
            // connection once it has taken the session (its CONNACK sent).
            let now = rustls::pki_types::UnixTime::now().as_secs();
            let invalid = matches!(&kind, ListenerKind::Service(cert)
            if shared.is_revoked(&cert.serial) || cert.expired(now));
            let publish_will = !invalid
                && match &result {
                    // Only a normal disconnection deletes the Will (MQTT 5
                    // §3.1.2.5); MQTT 3.1.1's DISCONNECT reads as one.
                    Ok(reason) => *reason != DisconnectReasonCode::NormalDisconnection,
                    Err(SessionError::Revoked) => false,
                    Err(_) if taken_over => true,
                    Err(_) => link_alive,
                };
            // A session the router keeps waits for its identity to come
            // back, with its delayed Will (only a kept session's Will waits,
            // see `Will::wait`), until it expires.
            let delayed = publish_will && will.is_some() && !will_wait.is_zero();
            // A Will takes from the pace when it goes: one due now, now; a
            // delayed one when its wait is over (a reconnect cancels it,
            // and then it takes nothing). (Filtered in one step: a second
            // binding of `will` would stay in this future, moved from.)
            let mut will = will
                .filter(|_| publish_will && (delayed || will_paced(&shared, &identity, source)));
            // Taken over, it is kept all the same: the router hands this
            // session's filters to the newer connection, which counts them
            // again once this one has ended (it waits up to
            // `TAKEOVER_WAIT` for that) and takes its unreleased QoS 2
            // packet ids and cancels its delayed Will, or, if that
            // connection ends before its CONNACK, the Will and the session
            // go as they would have (`after_session`). If the newer
            // connection has already taken the session, nothing is kept
            // (`Shared::keep_session`).
            if !clean {
                let will = will.take_if(|_| delayed).map(|will| {
                    debug!(identity = %label, delay = ?will_wait, "will delayed");
                    let certificate = match &kind {
                        ListenerKind::Service(cert) => Some((cert.serial.clone(), cert.not_after)),
                        _ => None,
                    };
                    DelayedWill {
                        will,
                        wait: will_wait,
                        identity: identity.clone(),
                        source,
                        certificate,
                    }
                });
                // MQTT 3.1.1 names no expiry; MQTT 5's is the client's.
                let lasts = match version {
                    Version::V5 => Duration::from_secs(expiry.into()),
                    _ => Duration::MAX,
                }
                .min(shared.limits.max_session_expiry);
                let after = after_session(
                    shared.clone(),
                    (router_id.clone(), connection),
                    will,
                    (lasts, shared.ended(&router_id, connection)),
                    cut.clone(),
                );
                shared.keep_session(
                    router_id.clone(),
                    connection,
                    std::mem::take(&mut carried),
                    after,
                );
            }
            match will {
                // (Held for the delayed Will, see `publish_will_later`.)
                None if delayed => shared.overtaken_ends(&router_id, connection),
                Some(will) if !link_alive => {
                    // This connection's router link is gone: the front door's
                    // own link carries the Will.
                    shared.release(&router_id, connection);
                    debug!(identity = %label, "publishing the will of a session taken over");
                    if let Err(why) = publish_through_will_link(&shared, will).await {
                        warn!(identity = %label, error = %why, "will not published");
                    }
                }
                Some(will) => {
                    shared.release(&router_id, connection);
                    debug!(identity = %label, "publishing the will");
                    // The link ends after it: the router's answer goes nowhere.
                    let _ = send_all_now(&mut tx, will.packets(1)).await;
                }
                None => shared.release(&router_id, connection),
            }
            if link_alive {
                // Tell the router this connection is gone, however it ended.
                let _ = send_now(&mut tx, router_goodbye()).await;
            }
            if outbound.discarded > 0 {
                debug!(identity = %label, discarded = outbound.discarded, "publishes over the client's Maximum Packet Size were discarded");
            }
            let result = result.map(|_| ());
            if let Err(err) = &result {
                let reason = match err {
                    // The router drops a link that answers a PUBLISH or PUBREL it
                    // never sent: the client broke the protocol.
                    SessionError::RouterClosed(_) if !taken_over && outbound.unknown_acks > 0 => {
                        Some(DisconnectReasonCode::ProtocolError)
                    }
                    // The broker stops: its listeners cut the sessions, and
                    // its router may close a link before the cut is seen.
                    SessionError::Revoked | SessionError::RouterClosed(_)
                        if shared.stopping.is_cancelled() =>
                    {
                        Some(DisconnectReasonCode::ServerShuttingDown)
                    }
                    // Closed for a newcomer (`room_for`).
                    SessionError::Revoked if matches!(kind, ListenerKind::Bootstrap) => {
                        Some(DisconnectReasonCode::ServerBusy)
                    }
                    err => err.disconnect_reason(),
                };
                // Nothing follows a packet cut off part-way.
                let reason = reason.filter(|_| !framed.torn);
                if let Some(bye) = reason.and_then(|r| version.disconnect(r)) {
                    // The last word is bounded by its own time, not by the cut
                    // that may have ended the session: a write that watched the
                    // cut would end at once, and the DISCONNECT would be lost.
                    // A cut session's is short, so it ends within the second its
                    // revocation promises however slowly the client reads.
                    let farewell = if matches!(err, SessionError::Revoked) {
                        CUT_FAREWELL
                    } else {
                        FAREWELL
                    };
                    framed.cut = CancellationToken::new();
                    let _ = tokio::time::timeout(farewell, framed.write(vec![bye])).await;
                }
                match err {
                    SessionError::WriteStalled(_) => {
                        shared.metrics.write_stalls.fetch_add(1, Ordering::Relaxed);
                        warn!(identity = %label, error = %err, "client stopped reading; connection closed")
                    }
                    SessionError::Quota(_) => {
                        warn!(identity = %label, error = %err, "client held back its answers; connection closed")
                    }
                    _ => debug!(identity = %label, error = %err, "session ended"),
                }
            }
            result
        };
        if matches!(kind, ListenerKind::Bootstrap) {
            shared.bootstrap_session_ends(source, connection);
        }
        // However the broker ended it, what the client still sends does
        // not make the kernel reset the connection under its last word.
        if let Err(err) = &result {
            framed.linger_after(err).await;
        }
        result
    }
}

/// What tells the router a connection is gone: rumqttd does not notice a
/// dropped link by itself, and keeps its slot until it is told.
pub(crate) fn router_goodbye() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

/// Longest a kept session's end waits for its last connection to have
/// finished with the router (see `after_session`).
const ENDED_WAIT: Duration = Duration::from_secs(5);

/// A Will that waits ([`Will::wait`]), with what decides when its wait is
/// over whether it still goes: the certificate it came with (serial and
/// notAfter), if any, and the pace of the identity that left it
/// ([`will_paced`]).
struct DelayedWill {
    will: Will,
    wait: Duration,
    identity: Identity,
    source: std::net::IpAddr,
    certificate: Option<(String, u64)>,
}

/// What follows the last connection of a session the router keeps: its
/// delayed Will, after its wait or when the session ends if that comes
/// first, then the end of the session after `lasts`, both counted from
/// now, and never before the connection has finished with the router
/// (`ended`: a Will due at once published, the router told). A
/// connection of the same identity that takes the session after its
/// CONNACK cancels both (`Shared::kept_state` aborts this task); while it
/// has claimed the session and not yet taken it, neither goes, and if it
/// ends before that, the Will and the session go when they would have,
/// or at once if that time has passed. The broker stopping ends both.
async fn after_session(
    shared: Arc<Shared>,
    (router_id, connection): (String, u64),
    will: Option<DelayedWill>,
    (lasts, ended): (Duration, Option<CancellationToken>),
    cut: CancellationToken,
) {
    let start = tokio::time::Instant::now();
    if let Some(will) = will {
        let wait = will.wait.min(lasts);
        publish_will_later(&shared, (&router_id, connection), will, wait, &cut).await;
    }
    if let Some(ended) = ended {
        let _ = tokio::time::timeout(ENDED_WAIT, ended.cancelled()).await;
    }
    tokio::select! {
        _ = shared.stopping.cancelled() => return,
        _ = tokio::time::sleep(lasts.saturating_sub(start.elapsed())) => {}
    }
    shared.expire_session(&router_id, connection).await;
}

/// Publishes `will` after `delay` unless a newer connection of the same
/// identity takes the session `router_id` first (a claim whose connection
/// ends before its CONNACK only holds the Will while it lasts), its
/// certificate is revoked or expires (its notAfter passes) meanwhile, the
/// connection's `cut` is cancelled (the broker stops, the certificate is
/// revoked), or its identity's pace has no room for it then.
async fn publish_will_later(
    shared: &Shared,
    (router_id, connection): (&str, u64),
    will: DelayedWill,
    delay: Duration,
    cut: &CancellationToken,
) {
    let due = tokio::time::Instant::now() + delay;
    loop {
        let taken = shared.taken(router_id, connection);
        tokio::select! {
            biased;
            _ = cut.cancelled() => {
                shared.release(router_id, connection);
                debug!(session = %router_id, "delayed will dropped: the broker stops or the certificate was revoked");
                return;
            }
            _ = taken.cancelled() => {}
            _ = tokio::time::sleep_until(due) => break,
        }
        // The identity is back: the connection that claimed the session
        // takes it, and cancels the Will, once its CONNACK is out (this
        // task is aborted then). One that ends before that leaves the
        // session as it was, and the Will waits out its delay, or goes at
        // once if that passed meanwhile.
        debug!(session = %router_id, "delayed will held: the identity is reconnecting");
        if !shared.claims_failed(router_id, connection).await {
            debug!(session = %router_id, "delayed will cancelled: the identity reconnected, or the broker stops");
            return;
        }
    }
    shared.release(router_id, connection);
    let now = rustls::pki_types::UnixTime::now().as_secs();
    if let Some((serial, not_after)) = &will.certificate {
        if shared.is_revoked(serial) || now > *not_after {
            info!(session = %router_id, "delayed will dropped: its certificate was revoked or expired");
            return;
        }
    }
    if !will_paced(shared, &will.identity, will.source) {
        return;
    }
    debug!(session = %router_id, "publishing the delayed will");
    if let Err(why) = publish_through_will_link(shared, will.will).await {
        warn!(session = %router_id, reason = %why, "delayed will not published");
    }
}

/// Sends a due Will through the front door's one Will link (router id
/// [`WILL_LINK`]): the session's own link is closed, and opening that again
/// would resume the session. The link is opened on first use, and again if
/// a send on it fails (the router's channel closed).
async fn publish_through_will_link(shared: &Shared, will: Will) -> Result<(), String> {
    let mut link = shared.will_link.lock().await;
    for _ in 0..2 {
        if link.is_none() {
            let (tx, rx, _ack) = shared.link.open(WILL_LINK.to_owned(), true).await?;
            tokio::spawn(drop_answers(rx));
            *link = Some((tx, 0));
        }
        let (tx, last) = link.as_mut().expect("opened above");
        *last = last.checked_add(1).unwrap_or(1);
        match send_all_now(tx, will.clone().packets(*last)).await {
            Ok(()) => return Ok(()),
            Err(_) => *link = None,
        }
    }
    Err("the router refused the will link".into())
}

/// Reads what the router sends a link that only publishes (its answers to
/// the Wills' QoS 1 and 2 PUBLISHes) until the link ends.
async fn drop_answers(mut rx: LinkRx) {
    loop {
        match rx.next().await {
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

/// How a connection's PUBLISHes are paced.
enum Pace {
    Free,
    Connection(super::Bucket),
    /// The device's, shared by its connections ([`Shared::device_pace`]),
    /// less `kept` tokens that only the connection's Will may take.
    Device {
        bucket: Arc<std::sync::Mutex<super::Bucket>>,
        kept: f64,
    },
}

impl Pace {
    /// Takes a token for one PUBLISH, if there is one.
    fn take(&mut self) -> bool {
        match self {
            Pace::Free => true,
            Pace::Connection(bucket) => bucket.take(),
            Pace::Device { bucket, kept } => bucket
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take_leaving(*kept),
        }
    }
}

/// Whether a Will due now may go: it is a PUBLISH, paced as the
/// connection's were (a certified device's by its pace, a bootstrap
/// client's by its address's budget); one over the pace is dropped.
fn will_paced(shared: &Shared, identity: &Identity, source: std::net::IpAddr) -> bool {
    let paced = match identity {
        Identity::Device { device_id, .. } => Pace::Device {
            bucket: shared.device_pace(device_id),
            kept: 0.0,
        }
        .take(),
        Identity::Bootstrap { .. } => shared.admit_bootstrap_publish(source),
        _ => true,
    };
    if !paced {
        shared
            .metrics
            .publish_rate_exceeded
            .fetch_add(1, Ordering::Relaxed);
        warn!(identity = %identity.label(), %source, "will dropped: publish rate exceeded");
    }
    paced
}

/// Serves packets both ways until the connection ends; returns the reason
/// of the client's DISCONNECT.
// The connection's parts, each borrowed from `run`, which still needs them.
#[allow(clippy::too_many_arguments)]
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S>,
    identity: &Identity,
    tx: &mut LinkTx,
    mut rx: LinkRx,
    outbound: &mut Outbound,
    keep_alive: Duration,
    shared: &Shared,
    (source, connection, has_will): (std::net::IpAddr, u64, bool),
    carried: &mut super::Carried,
    cut: &CancellationToken,
) -> Result<(DisconnectReasonCode, Option<u32>), SessionError> {
    let version = framed.version;
    let mut out = Vec::new();
    // SUBSCRIBE packets whose filters were partly refused: packet id → which
    // filters went to the router.
    let mut partial: HashMap<u16, Vec<bool>> = HashMap::new();
    let mut aliases = TopicAliases::default();
    let mut answers = Answers::default();
    let super::Carried {
        filters: subscribed,
        unreleased,
    } = carried;
    // The filters it holds (not counted for the manager).
    let manager = matches!(identity, Identity::Manager { .. });
    let mut complaints = Complaints(0);
    // Devices' PUBLISHes are paced; providers' and the manager's are not.
    // A certified device's pace is its own, over all its connections, so
    // that reconnecting does not refill it, and it keeps a token for the
    // connection's Will, so that a connection closed for its pace still
    // has its Will published; a bootstrap connection's is its own (anyone
    // may claim a device id there), and its address's budget is shared.
    let mut pace = match identity {
        Identity::Device { device_id, .. } => Pace::Device {
            bucket: shared.device_pace(device_id),
            // (Less under a burst of 2: a full pace lets a PUBLISH through.)
            kept: match has_will {
                true => (shared.limits.publish_burst_per_device - 1.0).clamp(0.0, 1.0),
                false => 0.0,
            },
        },
        Identity::Bootstrap { .. } => Pace::Connection(super::Bucket::full(
            shared.limits.publishes_per_sec_per_device,
            shared.limits.publish_burst_per_device,
        )),
        _ => Pace::Free,
    };
    // Only a packet from the client moves the keep-alive deadline; traffic
    // the router sends it does not.
    let mut deadline = tokio::time::Instant::now() + keep_alive;
    // Packets queued for the router while its channel was full.
    let mut untold = false;
    loop {
        if untold {
            // A revoked certificate is not kept waiting for a busy router.
            tokio::select! {
                _ = cut.cancelled() => return Err(SessionError::Revoked),
                told = tell_router(tx) => told?,
            }
            untold = false;
        }
        tokio::select! {
            _ = cut.cancelled() => {
                return Err(SessionError::Revoked);
            }
            read = tokio::time::timeout_at(answer_due(outbound, framed, manager).map_or(deadline, |due| due.min(deadline)), framed.read()) => {
                // (Whether an answer was due is worked out again rather than
                // kept across the wait: nothing it depends on changed.)
                let packet = read.map_err(|_| timed_out(answer_due(outbound, framed, manager), deadline, framed.write_stall))??;
                deadline = tokio::time::Instant::now() + keep_alive;
                // A bootstrap session that sends nothing is the one closed
                // for a newcomer (`room_for`).
                if matches!(identity, Identity::Bootstrap { .. }) {
                    shared.bootstrap_session_heard(source, connection);
                }
                match packet {
                    Packet::Publish(mut publish, mut props) => {
                        let too_fast = if !pace.take() {
                            Some("publish rate of the connection exceeded")
                        } else if matches!(identity, Identity::Bootstrap { .. }) && !shared.admit_bootstrap_publish(source) {
                            Some("bootstrap publish rate of the source address exceeded")
                        } else {
                            None
                        };
                        if let Some(why) = too_fast {
                            shared.metrics.publish_rate_exceeded.fetch_add(1, Ordering::Relaxed);
                            warn!(identity = %identity.label(), %source, "{why}; closing");
                            return Err(SessionError::Violation(DisconnectReasonCode::MessageRateTooHigh, why.into()));
                        }
                        if version == Version::V5 {
                            aliases.route(&mut publish, props.as_mut())?;
                        }
                        // A topic is UTF-8 with no U+0000 (MQTT 3.1.1 §1.5.3,
                        // MQTT 5 §1.5.4): anything else is a malformed packet.
                        let Some(topic) = std::str::from_utf8(&publish.topic).ok().filter(|t| !t.contains('\0')) else {
                            return Err(SessionError::Violation(DisconnectReasonCode::MalformedPacket, "topic not UTF-8, or with U+0000".into()));
                        };
                        if !identity.may_publish(topic) {
                            shared.metrics.refused_publishes.fetch_add(1, Ordering::Relaxed);
                            aliases.refused(topic);
                            let topic = topic.to_owned();
                            let (qos, pkid) = publish.qos_and_pkid();
                            let qos = qos as u8;
                            match version.refused_publish(qos, pkid) {
                                Some(answer) => {
                                    refusal!(complaints, identity, identity = %identity.label(), topic = %Shown(&topic), qos, "publish refused");
                                    if answers.refused(qos, pkid)? {
                                        framed.write(vec![answer]).await?;
                                    }
                                    continue;
                                }
                                None => {
                                    warn!(identity = %identity.label(), topic = %Shown(&topic), qos, ?version, "publish refused; closing");
                                    return Err(SessionError::Refused(format!("publish to {}", Shown(&topic))));
                                }
                            }
                        }
                        // topics.md: retain is always false. Only the
                        // manager may leave a retained message behind.
                        if !manager {
                            publish.retain = false;
                        }
                        // A QoS 2 PUBLISH is handed to the router at once and
                        // released there (PUBREL) with it: delivery when it
                        // comes (MQTT 5 §4.3.3). The client's PUBREC goes when
                        // the router's PUBCOMP says it has the message (see
                        // the notifications below); from then on only its
                        // packet id waits for the client's PUBREL, kept with
                        // the session, so that a reconnect loses nothing.
                        let mut released = None;
                        if let (QoS::ExactlyOnce, pkid) = publish.qos_and_pkid() {
                            // A packet id not yet released is a resend of that
                            // PUBLISH (MQTT 3.1.1 §4.3.3, MQTT 5 §4.3.3): it is
                            // not delivered again; its PUBREC comes, or came.
                            let id = u32::from(pkid);
                            if unreleased.iter().any(|p| p & !super::CARRIED == id) {
                                framed.write(vec![pubrec(pkid)]).await?;
                                continue;
                            }
                            if unreleased.contains(&(id | super::UNCONFIRMED)) {
                                continue;
                            }
                            // Refused before its id is kept: it is not delivered.
                            // Those carried from an earlier connection do not
                            // count against this one's Receive Maximum (MQTT 5
                            // §4.9), but against a cap of twice it.
                            let here = unreleased.iter().filter(|p| *p & super::CARRIED == 0).count();
                            let most = usize::from(RECEIVE_MAXIMUM);
                            if here >= most || unreleased.len() >= 2 * most {
                                return Err(SessionError::Violation(
                                    DisconnectReasonCode::ReceiveMaximumExceeded,
                                    format!("more than {RECEIVE_MAXIMUM} QoS 2 PUBLISHes not released"),
                                ));
                            }
                            unreleased.push(id | super::UNCONFIRMED);
                            released = Some(pkid);
                        }
                        // Copied out of the read buffer: the router keeps what
                        // it is given, and a slice of the buffer would keep
                        // the buffer's whole allocation with it.
                        publish.topic = Bytes::copy_from_slice(&publish.topic);
                        publish.payload = Bytes::copy_from_slice(&publish.payload);
                        if let Some(data) = props.as_mut().and_then(|p| p.correlation_data.as_mut()) {
                            *data = Bytes::copy_from_slice(data);
                        }
                        answers.passed(publish.qos_and_pkid().0 as u8);
                        untold |= !send(tx, Packet::Publish(publish, props))?;
                        if let Some(pkid) = released {
                            untold |= !send(tx, pubrel(pkid))?;
                        }
                    }
                    Packet::Subscribe(mut subscribe, props) => {
                        // Whatever its filters (MQTT 5 §3.8.2.1.2).
                        if props.as_ref().and_then(|p| p.id) == Some(0) {
                            return Err(SessionError::Violation(DisconnectReasonCode::ProtocolError, "Subscription Identifier 0".into()));
                        }
                        if subscribe.filters.iter().any(|f| f.path.contains('\0')) {
                            return Err(SessionError::Violation(DisconnectReasonCode::MalformedPacket, "filter with U+0000".into()));
                        }
                        let mut allowed = Vec::with_capacity(subscribe.filters.len());
                        for f in &subscribe.filters {
                            let granted = identity.may_subscribe(&f.path);
                            let room = manager || subscribed.contains(&f.path) || subscribed.len() < MAX_SUBSCRIPTIONS;
                            if granted && room {
                                if !manager {
                                    subscribed.insert(f.path.clone());
                                }
                            } else {
                                shared.metrics.refused_subscribes.fetch_add(1, Ordering::Relaxed);
                                let why = if granted { "subscription refused: too many" } else { "subscription refused" };
                                refusal!(complaints, identity, identity = %identity.label(), filter = %Shown(&f.path), held = subscribed.len(), "{why}");
                            }
                            allowed.push(granted && room);
                        }
                        if allowed.iter().all(|a| !a) {
                            let codes = vec![version.refused_filter(); allowed.len()];
                            framed.write(vec![Packet::SubAck(SubAck { pkid: subscribe.pkid, return_codes: codes }, None)]).await?;
                            continue;
                        }
                        if allowed.iter().any(|a| !a) {
                            let mut keep = allowed.iter();
                            subscribe.filters.retain(|_| *keep.next().unwrap_or(&false));
                            partial.insert(subscribe.pkid, allowed);
                        }
                        untold |= !send(tx, Packet::Subscribe(subscribe, props))?;
                    }
                    // Answered here, one code per filter: the router answers
                    // only filters it had, one UNSUBACK each.
                    Packet::Unsubscribe(mut unsubscribe, props) => {
                        let reasons = unsubscribe
                            .filters
                            .iter()
                            .map(|f| if identity.may_subscribe(f) { UnsubAckReason::Success } else { UnsubAckReason::NoSubscriptionExisted })
                            .collect();
                        let ack = Packet::UnsubAck(UnsubAck { pkid: unsubscribe.pkid, reasons }, None);
                        unsubscribe.filters.retain(|f| identity.may_subscribe(f));
                        for f in &unsubscribe.filters {
                            subscribed.remove(f);
                        }
                        if !unsubscribe.filters.is_empty() {
                            untold |= !send(tx, Packet::Unsubscribe(unsubscribe, props))?;
                        }
                        framed.write(vec![ack]).await?;
                    }
                    Packet::Connect(..) => {
                        return Err(SessionError::Violation(DisconnectReasonCode::ProtocolError, "second CONNECT".into()))
                    }
                    // Answered here: liveness of this connection is the front
                    // door's business, and a busy router must not make a
                    // healthy client miss its keep-alive.
                    Packet::PingReq(_) => framed.write(vec![Packet::PingResp(rumqttd::protocol::PingResp)]).await?,
                    Packet::Disconnect(bye, props) => {
                        let expiry = props.and_then(|p| p.session_expiry_interval);
                        return Ok((bye.reason_code, expiry));
                    }
                    // The router has had the PUBLISH released since it came:
                    // the client's PUBREL is completed here.
                    Packet::PubRel(pubrel, _) => {
                        // (One the router has not confirmed yet, released
                        // before its PUBREC, ends here too.)
                        let at = unreleased.iter().position(|p| *p & 0xFFFF == u32::from(pubrel.pkid));
                        let reason = if let Some(at) = at {
                            unreleased.swap_remove(at);
                            rumqttd::protocol::PubCompReason::Success
                        } else {
                            rumqttd::protocol::PubCompReason::PacketIdentifierNotFound
                        };
                        let done = rumqttd::protocol::PubComp { pkid: pubrel.pkid, reason };
                        framed.write(vec![Packet::PubComp(done, None)]).await?;
                    }
                    // Answers to the router's PUBLISHes free the client's quota.
                    ack @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {
                        outbound.on_client(ack, &mut out);
                        untold |= deliver(framed, tx, &mut out).await?;
                    }
                    other => untold |= !send(tx, other)?,
                }
            }
            notification = rx.next() => {
                let notification = notification.map_err(|e| SessionError::RouterClosed(e.to_string()))?;
                let Some(notification) = notification else { continue };
                if matches!(notification, Notification::Unschedule) {
                    rx.wake().await.map_err(|e| SessionError::Router(e.to_string()))?;
                    continue;
                }
                let packet: Option<Packet> = notification.into();
                let Some(packet) = packet else { continue };
                // The router goes on: it took the answers it was given.
                outbound.unknown_acks = 0;
                let packet = match packet {
                    Packet::SubAck(mut ack, props) => {
                        if let Some(allowed) = partial.remove(&ack.pkid) {
                            let mut granted = ack.return_codes.into_iter();
                            let refused = version.refused_filter();
                            ack.return_codes = allowed
                                .iter()
                                .map(|ok| if *ok { granted.next().unwrap_or(refused) } else { refused })
                                .collect();
                        }
                        Packet::SubAck(ack, props)
                    }
                    Packet::UnsubAck(..) => continue,
                    // For the QoS 2 PUBLISHes released as they came (the
                    // router sends a PUBREC and a PUBCOMP for nothing else):
                    // its PUBCOMP confirms the message, which the client's
                    // PUBREC then says.
                    Packet::PubRec(..) => continue,
                    Packet::PubComp(done, _) => {
                        let id = u32::from(done.pkid);
                        let mut to_client = Vec::new();
                        if let Some(at) = unreleased.iter().position(|p| *p == id | super::UNCONFIRMED) {
                            unreleased[at] = id;
                            to_client.push(pubrec(done.pkid));
                        }
                        to_client.extend(answers.refusals_answered(version, 2));
                        if !to_client.is_empty() {
                            framed.write(to_client).await?;
                        }
                        continue;
                    }
                    // The router's answer to the client's QoS 1 PUBLISH, and
                    // the refusals that waited for it.
                    Packet::PubAck(ack, props) => {
                        let mut to_client = vec![Packet::PubAck(ack, props)];
                        to_client.extend(answers.refusals_answered(version, 1));
                        framed.write(to_client).await?;
                        continue;
                    }
                    Packet::Disconnect(ref bye, _) => {
                        info!(identity = %identity.label(), reason = ?bye.reason_code, "router closed the session");
                        framed.write(vec![packet]).await?;
                        return Err(SessionError::RouterClosed("router sent DISCONNECT".into()));
                    }
                    other => other,
                };
                let before = outbound.discarded;
                outbound.on_router(packet, &mut out)?;
                if outbound.discarded > before {
                    shared.metrics.outgoing_discarded.fetch_add(outbound.discarded - before, Ordering::Relaxed);
                }
                untold |= deliver(framed, tx, &mut out).await?;
            }
        }
    }
}

/// When a client that owes an answer to a QoS 1 or 2 PUBLISH and gives
/// none is closed: as long after its last answer, or after the last
/// progress of a write of such a PUBLISH to it if that came later (what it
/// owes may still be on its way), as it may take no byte of what is
/// written to it
/// ([`Framed::write_stall`]: 1.5 × its keep-alive, at most 30 s). Until
/// then the router keeps what it would send it (up to 4 MiB per filter);
/// a client that never acknowledges would pin that for its connection's
/// life. The manager is not closed.
fn answer_due<S>(
    outbound: &Outbound,
    framed: &Framed<S>,
    manager: bool,
) -> Option<tokio::time::Instant> {
    if manager {
        return None;
    }
    outbound
        .owed_since()
        .map(|since| since.max(framed.wrote_at) + framed.write_stall)
}

/// Why a wait for the client's next packet that ended at the earlier of
/// `answer_due` and `deadline` (the keep-alive's) ended.
fn timed_out(
    answer_due: Option<tokio::time::Instant>,
    deadline: tokio::time::Instant,
    stall: Duration,
) -> SessionError {
    match answer_due {
        Some(due) if due < deadline => SessionError::Quota(format!(
            "no acknowledgement for {stall:?} while one was owed"
        )),
        _ => SessionError::KeepAlive,
    }
}

/// The PUBREL that releases, in the router, the QoS 2 PUBLISH `pkid` a
/// link has just sent it.
fn pubrel(pkid: u16) -> Packet {
    let rel = rumqttd::protocol::PubRel {
        pkid,
        reason: rumqttd::protocol::PubRelReason::Success,
    };
    Packet::PubRel(rel, None)
}

/// A successful PUBREC for the client's QoS 2 PUBLISH `pkid`.
fn pubrec(pkid: u16) -> Packet {
    let rec = rumqttd::protocol::PubRec {
        pkid,
        reason: rumqttd::protocol::PubRecReason::Success,
    };
    Packet::PubRec(rec, None)
}

/// Writes what `out` has for the client and hands the router its part;
/// whether the router is still to be told ([`send`]).
async fn deliver<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S>,
    tx: &mut LinkTx,
    out: &mut Vec<Out>,
) -> Result<bool, SessionError> {
    let mut to_client = Vec::new();
    let mut untold = false;
    for o in out.drain(..) {
        match o {
            Out::Client(p) => to_client.push(p),
            Out::Router(p) => untold |= !send(tx, p)?,
        }
    }
    if !to_client.is_empty() {
        framed.write(to_client).await?;
    }
    Ok(untold)
}

/// Hands a packet to the router without waiting. `Ok(false)`: the
/// router's channel is full; the packet is queued, and [`tell_router`] must
/// be awaited (before the next packet is read) to tell the router of it.
///
/// Not an `async fn`, and the serving loop awaits [`tell_router`] in one
/// place only: an await in each arm of its `match` kept the packet being
/// matched (400 bytes) and more in the connection's future, ~700 bytes in
/// all.
fn send(tx: &mut LinkTx, packet: Packet) -> Result<bool, SessionError> {
    tx.send_nowait(packet)
        .map_err(|e| SessionError::Router(e.to_string()))
}

/// Tells the router of packets [`send`] queued while its channel was full,
/// waiting for room without blocking the worker. Boxed: a rare wait, whose
/// future (it holds the router's 800-byte event) stays out of the
/// connection's.
async fn tell_router(tx: &mut LinkTx) -> Result<(), SessionError> {
    Box::pin(tx.notify())
        .await
        .map_err(|e| SessionError::Router(e.to_string()))
}

/// [`send`], then [`tell_router`] if the router's channel was full: for the
/// packets sent outside the serving loop (and the goodbye of a link whose
/// session gave up waiting for it, `crate::router`).
pub(crate) async fn send_now(tx: &mut LinkTx, packet: Packet) -> Result<(), SessionError> {
    if !send(tx, packet)? {
        tell_router(tx).await?;
    }
    Ok(())
}

/// [`send_now`] for `packets`, in order; none is held across the wait.
async fn send_all_now(tx: &mut LinkTx, packets: Vec<Packet>) -> Result<(), SessionError> {
    let mut told = true;
    for packet in packets {
        told &= send(tx, packet)?;
    }
    if !told {
        tell_router(tx).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parking_lot::Mutex;
    use rumqttd::protocol::Publish;

    use super::*;

    fn publish(topic: &'static str) -> Packet {
        Packet::Publish(Publish::new(topic, "x", false), None)
    }

    /// A packet for a router whose channel is full is queued at once, and
    /// the router is told when it makes room, without blocking.
    #[tokio::test(flavor = "current_thread")]
    async fn a_full_router_channel_is_waited_for_without_blocking() {
        let (router_tx, router_rx) = flume::bounded(1);
        let queued = Arc::new(Mutex::new(Default::default()));
        let mut tx = LinkTx::new(7, router_tx, queued.clone());
        assert!(send(&mut tx, publish("a")).unwrap(), "room for one notice");
        // The channel is full: the packet is queued, the notice waits.
        assert!(!send(&mut tx, publish("b")).unwrap());
        assert_eq!(queued.lock().len(), 2);
        let mut tell = Box::pin(tell_router(&mut tx));
        tokio::select! {
            biased;
            _ = &mut tell => panic!("told a full channel"),
            () = std::future::ready(()) => {}
        }
        let (id, _) = router_rx.recv().expect("first notice");
        assert_eq!(id, 7);
        tokio::time::timeout(Duration::from_secs(5), tell)
            .await
            .expect("the second notice goes once there is room")
            .expect("router still there");
        let (id, _) = router_rx.try_recv().expect("second notice");
        assert_eq!(id, 7);
        drop(router_rx);
        assert!(
            send(&mut tx, publish("c")).is_err(),
            "a gone router is an error"
        );
        assert!(send_now(&mut tx, publish("d")).await.is_err());
    }

    /// A front door's shared state over a router of its own.
    fn shared() -> Arc<Shared> {
        let config = crate::BrokerConfig::default();
        let link = crate::router::start_router(&config);
        Shared::new(
            link,
            config.limits(),
            HashMap::new(),
            CancellationToken::new(),
        )
    }

    /// Whether the router answered a link's Connect with a session present.
    fn session_present(ack: &Notification) -> bool {
        let ack: Option<Packet> = ack.clone().into();
        match ack {
            Some(Packet::ConnAck(ack, _)) => ack.session_present,
            other => panic!("not a CONNACK: {other:?}"),
        }
    }

    /// A SUBSCRIBE to `path` at QoS 1.
    fn subscribe(path: &str) -> Packet {
        let subscribe = rumqttd::protocol::Subscribe {
            pkid: 1,
            filters: vec![rumqttd::protocol::Filter {
                path: path.into(),
                qos: rumqttd::protocol::QoS::AtLeastOnce,
                nolocal: false,
                preserve_retain: false,
                retain_forward_rule: rumqttd::protocol::RetainForwardRule::OnEverySubscribe,
            }],
        };
        Packet::Subscribe(subscribe, None)
    }

    /// The topic of the Wills of [`kept`].
    const WILL_TOPIC: &str = "/tenants/svcA/telemetry/dev1/will";

    /// The instants (on the test's clock) at which Wills published on
    /// [`WILL_TOPIC`] reach a subscriber.
    async fn wills(shared: &Shared) -> Arc<Mutex<Vec<tokio::time::Instant>>> {
        let (mut tx, mut rx, _ack) = shared.link.open("watcher".into(), true).await.unwrap();
        send_now(&mut tx, subscribe(WILL_TOPIC)).await.unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let wills = seen.clone();
        tokio::spawn(async move {
            let _tx = tx;
            loop {
                match rx.next().await {
                    Ok(Some(Notification::Forward(_))) => {
                        wills.lock().push(tokio::time::Instant::now())
                    }
                    Ok(Some(Notification::Unschedule)) => {
                        if rx.wake().await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        seen
    }

    /// Session `id` as connection `connection` leaves it: held by the
    /// router, kept here until `lasts` passes, with a Will delayed by
    /// `will` if some.
    async fn kept(
        shared: &Arc<Shared>,
        id: &str,
        connection: u64,
        lasts: Duration,
        will: Option<Duration>,
    ) {
        let claim = shared.claim(id, connection);
        leave(shared, id, connection, lasts, will).await;
        drop(claim);
    }

    /// Session `id` as connection 1 leaves it after connection 2 has
    /// claimed it (a takeover), with a Will delayed by `will`; connection
    /// 2's claim.
    async fn taken_over(
        shared: &Arc<Shared>,
        id: &str,
        lasts: Duration,
        will: Duration,
    ) -> crate::frontdoor::Claim {
        let first = shared.claim(id, 1);
        let second = shared.claim(id, 2);
        leave(shared, id, 1, lasts, Some(will)).await;
        drop(first);
        second
    }

    /// What [`kept`] does once the session is claimed.
    async fn leave(
        shared: &Arc<Shared>,
        id: &str,
        connection: u64,
        lasts: Duration,
        will: Option<Duration>,
    ) {
        let (mut tx, _rx, _ack) = shared.link.open(id.to_string(), false).await.unwrap();
        send_now(&mut tx, router_goodbye()).await.unwrap();
        let will = will.map(|wait| {
            let publish = Publish::new(WILL_TOPIC, "gone", false);
            let will = Will {
                publish,
                properties: None,
                delay: wait,
            };
            DelayedWill {
                will,
                wait,
                identity: Identity::Manager {
                    name: "test".into(),
                    client_id: id.into(),
                },
                source: std::net::Ipv4Addr::LOCALHOST.into(),
                certificate: None,
            }
        });
        let after = after_session(
            shared.clone(),
            (id.to_string(), connection),
            will,
            (lasts, shared.ended(id, connection)),
            CancellationToken::new(),
        );
        let carried = crate::frontdoor::Carried {
            filters: ["f".to_string()].into(),
            ..Default::default()
        };
        shared.keep_session(id.to_string(), connection, carried, after);
    }

    /// Waits (on the test's clock) until `what` holds.
    async fn until(what: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(3600), async {
            while !what() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("in time")
    }

    /// A kept session that a connection claims and then leaves before its
    /// CONNACK (its client gone, or the router refusing its link) is still
    /// kept, and expires when it would have: whether its expiry came while
    /// that connection held it, or its delayed Will was held by the claim
    /// meanwhile.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_kept_session_claimed_by_a_connection_that_fails_still_expires() {
        let shared = shared();
        let lasts = Duration::from_secs(60);
        for (n, will) in [None, Some(Duration::from_secs(10))]
            .into_iter()
            .enumerate()
        {
            let id = format!("svcA.dev{n}");
            kept(&shared, &id, 1, lasts, will).await;
            let expired = shared.metrics.sessions_expired.load(Ordering::Relaxed);
            let second = shared.claim(&id, 2);
            // Held past the Will's delay and the session's expiry.
            tokio::time::sleep(lasts * 2).await;
            assert_eq!(shared.metrics.sessions_kept.load(Ordering::Relaxed), 1);
            assert_eq!(
                shared.metrics.sessions_expired.load(Ordering::Relaxed),
                expired
            );
            // What a connection does when its CONNACK cannot go.
            shared.release(&id, 2);
            drop(second);
            until(|| shared.metrics.sessions_expired.load(Ordering::Relaxed) == expired + 1).await;
            assert_eq!(
                shared.metrics.sessions_kept.load(Ordering::Relaxed),
                0,
                "{id}"
            );
            // The router no longer has it.
            let (_tx, _rx, ack) = shared.link.open(id.clone(), false).await.unwrap();
            assert!(!session_present(&ack), "{id}");
        }
    }

    /// A claim whose connection's task ended without letting the session
    /// go (its future dropped, say) holds it no longer: the expiry goes on
    /// instead of waiting on it, or spinning.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_claim_left_behind_does_not_hold_an_expiry() {
        let shared = shared();
        let id = "svcA.dev1";
        kept(&shared, id, 1, Duration::from_secs(60), None).await;
        drop(shared.claim(id, 2));
        until(|| shared.metrics.sessions_expired.load(Ordering::Relaxed) == 1).await;
        assert_eq!(shared.metrics.sessions_kept.load(Ordering::Relaxed), 0);
    }

    /// A delayed Will is held while a connection of its identity claims
    /// the session: one that ends before its CONNACK leaves the Will to go
    /// when it would have, or at once if its delay passed meanwhile; one
    /// that takes the session cancels it.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_delayed_will_outlives_a_claim_whose_connection_fails() {
        let shared = shared();
        let wills = wills(&shared).await;
        let (delay, lasts) = (Duration::from_secs(10), Duration::from_secs(60));
        let secs = Duration::from_secs;
        // Claimed at 2 s, the claim ended at 5 s or 20 s: the Will at 10 s
        // or 20 s.
        for (n, (ended, published)) in [(secs(5), secs(10)), (secs(20), secs(20))]
            .into_iter()
            .enumerate()
        {
            let id = format!("svcA.dev{n}");
            let start = tokio::time::Instant::now();
            kept(&shared, &id, 1, lasts, Some(delay)).await;
            tokio::time::sleep(secs(2)).await;
            let claim = shared.claim(&id, 2);
            tokio::time::sleep_until(start + ended).await;
            assert_eq!(wills.lock().len(), n, "held while claimed");
            // What a connection does when its CONNACK cannot go.
            shared.release(&id, 2);
            drop(claim);
            until(|| wills.lock().len() == n + 1).await;
            let at = wills.lock()[n] - start;
            assert!(
                at.abs_diff(published) < Duration::from_millis(100),
                "{at:?}"
            );
            // The session then expires as it would have.
            until(|| shared.metrics.sessions_expired.load(Ordering::Relaxed) == n as u64 + 1).await;
        }
        // Taken over from a live connection by one that then fails: the
        // older connection's Will goes at its time all the same.
        let start = tokio::time::Instant::now();
        let claim = taken_over(&shared, "svcA.dev2", lasts, delay).await;
        tokio::time::sleep(secs(5)).await;
        assert_eq!(wills.lock().len(), 2, "held while claimed");
        shared.release("svcA.dev2", 2);
        drop(claim);
        until(|| wills.lock().len() == 3).await;
        let at = wills.lock()[2] - start;
        assert!(at.abs_diff(delay) < Duration::from_millis(100), "{at:?}");
        // A connection that takes the session, and one that takes it
        // over, each then gone with a clean session: no Will.
        let id = "svcA.dev9";
        kept(&shared, id, 1, lasts, Some(delay)).await;
        let claim = shared.claim(id, 2);
        let carried = shared.kept_state(id, 2, false);
        assert!(carried.filters.contains("f"));
        let over = taken_over(&shared, "svcA.dev8", lasts, delay).await;
        let _ = shared.kept_state("svcA.dev8", 2, false);
        shared.release(id, 2);
        shared.release("svcA.dev8", 2);
        drop((claim, over));
        tokio::time::sleep(lasts * 2).await;
        assert_eq!(wills.lock().len(), 3, "no Will once taken");
    }

    /// A connection taken over that ends only after the newer connection
    /// has taken the session (its CONNACK sent) keeps nothing, whether the
    /// newer one is still there, has ended with a clean session, or has
    /// left the session kept itself: the session is the newer
    /// connection's. Once every connection taken over has ended, nothing
    /// of them is remembered.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_connection_taken_over_keeps_nothing_of_a_session_taken_since() {
        let shared = shared();
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let older = |id: &str| {
            let carried = crate::frontdoor::Carried {
                filters: ["older".to_string()].into(),
                ..Default::default()
            };
            let ran = ran.clone();
            let after = async move { ran.store(true, Ordering::Relaxed) };
            shared.keep_session(id.to_string(), 1, carried, after);
        };
        let newer = || crate::frontdoor::Carried {
            filters: ["newer".to_string()].into(),
            ..Default::default()
        };
        for (n, newer_ends) in ["running", "clean", "kept"].into_iter().enumerate() {
            let id = &format!("svcA.dev{n}");
            let first = shared.claim(id, 1);
            let second = shared.claim(id, 2);
            let _ = shared.kept_state(id, 2, false);
            match newer_ends {
                "clean" => shared.release(id, 2),
                "kept" => {
                    shared.keep_session(id.to_string(), 2, newer(), std::future::pending());
                    shared.release(id, 2);
                }
                _ => {}
            }
            older(id);
            shared.release(id, 1);
            drop((first, second));
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert!(
                !ran.load(Ordering::Relaxed),
                "{newer_ends}: the older one's after ran"
            );
            let kept = usize::from(newer_ends == "kept");
            assert_eq!(shared.kept.lock().unwrap().len(), kept, "{newer_ends}");
            let _third = shared.claim(id, 3);
            let carried = shared.kept_state(id, 3, false);
            assert_eq!(carried.filters.contains("newer"), kept == 1, "{newer_ends}");
            shared.release(id, 3);
        }
        assert!(shared.overtaken.lock().unwrap().is_empty());
    }

    /// A connection that claims a session while its expiry is ending it
    /// gets a new session, whose link the expiry's leaves alone: the router
    /// takes the expiry's Connect first (claims and links are opened in
    /// order), and the expiry's goodbye on a link the router has dropped
    /// reaches no one.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_claim_in_the_instant_of_expiry_gets_a_new_session_and_keeps_it() {
        let shared = shared();
        let id = "svcA.dev1";
        kept(&shared, id, 1, Duration::from_secs(60), None).await;
        // The expiry claims the session and asks the router to end it ...
        let expiry = tokio::spawn({
            let shared = shared.clone();
            async move { shared.expire_session(id, 1).await }
        });
        while shared.metrics.sessions_kept.load(Ordering::Relaxed) > 0 {
            tokio::task::yield_now().await;
        }
        assert!(!expiry.is_finished());
        // ... when the identity comes back.
        let claim = shared.claim(id, 2);
        assert!(claim.previous.is_some(), "the expiry's claim");
        let (mut tx, mut rx, ack) = shared.link.open(id.to_string(), false).await.unwrap();
        assert!(!session_present(&ack), "the session expired");
        expiry.await.unwrap();
        assert_eq!(shared.metrics.sessions_expired.load(Ordering::Relaxed), 1);
        // The link is the session's: the router answers it.
        send_now(
            &mut tx,
            subscribe("/tenants/svcA/fleet/v1/service/change/dev1"),
        )
        .await
        .unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), rx.next()).await;
        assert!(
            matches!(answer, Ok(Ok(Some(Notification::DeviceAck(_))))),
            "{answer:?}"
        );
        drop(claim.ended);
    }
}

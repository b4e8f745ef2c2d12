//! One MQTT 3.1.1 connection: CONNECT and identity binding, then every
//! packet authorized before it reaches the router, and the router's
//! packets written back. The router link is in process (`LinkTx`/`LinkRx`),
//! so a device costs one file descriptor.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::{
    ConnAck, Connect, ConnectReturnCode, Disconnect, DisconnectReasonCode, Login, Packet, Protocol,
    SubAck, SubscribeReasonCode,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

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
    #[error("router: {0}")]
    Router(String),
    /// The router ended the session (a newer connection of the same
    /// identity took it over): nothing to tell the router on the way out.
    #[error("closed by the router: {0}")]
    RouterClosed(String),
    #[error("idle past keep-alive")]
    KeepAlive,
    #[error("closed: certificate revoked")]
    Revoked,
}

/// Reads MQTT packets with a size limit checked on the fixed header,
/// before the body is buffered or decoded.
struct Framed<S> {
    stream: S,
    buf: BytesMut,
    max_packet: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    async fn read(&mut self) -> Result<Packet, SessionError> {
        loop {
            match V4.read_mut(&mut self.buf, self.max_packet) {
                Ok(p) => return Ok(p),
                Err(rumqttd::protocol::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(SessionError::Mqtt(e)),
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(SessionError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    async fn write(&mut self, packets: Vec<Packet>) -> Result<(), SessionError> {
        let mut out = BytesMut::new();
        for p in packets {
            V4.write(without_properties(p), &mut out)
                .map_err(SessionError::Mqtt)?;
        }
        self.stream.write_all(&out).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

/// MQTT 3.1.1 packets carry no properties; the router may attach some.
fn without_properties(p: Packet) -> Packet {
    match p {
        Packet::ConnAck(a, _) => Packet::ConnAck(a, None),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(a, _) => Packet::PubAck(a, None),
        Packet::SubAck(a, _) => Packet::SubAck(a, None),
        Packet::PubRec(a, _) => Packet::PubRec(a, None),
        Packet::PubRel(a, _) => Packet::PubRel(a, None),
        Packet::PubComp(a, _) => Packet::PubComp(a, None),
        Packet::UnsubAck(a, _) => Packet::UnsubAck(a, None),
        Packet::Disconnect(d, _) => Packet::Disconnect(d, None),
        other => other,
    }
}

fn connack(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        None,
    )
}

/// Decides who the client is from its CONNECT and what its listener proved.
fn bind_identity(
    kind: &ListenerKind,
    connect: &Connect,
    login: Option<&Login>,
    shared: &Shared,
) -> Result<Identity, (ConnectReturnCode, String)> {
    match kind {
        ListenerKind::Bootstrap => {
            fleet_protocol::topic::validate_device_id(&connect.client_id).map_err(|_| {
                (
                    ConnectReturnCode::ClientIdentifierNotValid,
                    format!("client id {:?} is not a device id", connect.client_id),
                )
            })?;
            Ok(Identity::Bootstrap {
                device_id: connect.client_id.clone(),
            })
        }
        ListenerKind::Service(cert) => {
            if connect.client_id != cert.device_id {
                return Err((
                    ConnectReturnCode::ClientIdentifierNotValid,
                    format!(
                        "client id {:?} is not the certificate's device id {}",
                        connect.client_id, cert.device_id
                    ),
                ));
            }
            Ok(Identity::Device {
                device_id: cert.device_id.clone(),
                service_id: cert.service_id.clone(),
                serial: cert.serial.clone(),
            })
        }
        ListenerKind::Internal => {
            let Some(login) = login else {
                return Err((
                    ConnectReturnCode::BadUserNamePassword,
                    "no credentials".into(),
                ));
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
                    ConnectReturnCode::BadUserNamePassword,
                    format!("bad credentials for {:?}", login.username),
                ));
            }
            if connect.client_id.is_empty() || connect.client_id.contains(['+', '#', '/', '$']) {
                return Err((
                    ConnectReturnCode::ClientIdentifierNotValid,
                    format!("client id {:?}", connect.client_id),
                ));
            }
            Ok(Identity::Manager {
                name: login.username.clone(),
                client_id: connect.client_id.clone(),
            })
        }
    }
}

/// Runs one connection to its end.
pub async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    kind: ListenerKind,
    shared: Arc<Shared>,
    connection: u64,
    cut: CancellationToken,
) -> Result<(), SessionError> {
    let mut framed = Framed {
        stream,
        buf: BytesMut::with_capacity(1024),
        max_packet: shared.limits.max_packet_size,
    };
    let first = tokio::time::timeout(shared.limits.connect_timeout, framed.read())
        .await
        .map_err(|_| SessionError::ConnectTimeout(shared.limits.connect_timeout))??;
    let Packet::Connect(connect, _, _will, _, login) = first else {
        return Err(SessionError::NotConnect);
    };
    let identity = match bind_identity(&kind, &connect, login.as_ref(), &shared) {
        Ok(id) => id,
        Err((code, why)) => {
            shared
                .metrics
                .refused_connects
                .fetch_add(1, Ordering::Relaxed);
            warn!(client_id = %connect.client_id, reason = %why, "connection refused");
            let _ = framed.write(vec![connack(code)]).await;
            return Err(SessionError::Refused(why));
        }
    };
    let label = identity.label();
    // Bootstrap sessions are always clean: a claimed identity keeps nothing.
    let clean = connect.clean_session || matches!(identity, Identity::Bootstrap { .. });
    let router_id = identity.router_client_id(connection);
    let (tx, rx, ack) = shared
        .link
        .open(router_id, clean)
        .await
        .map_err(SessionError::Router)?;
    let ack: Option<Packet> = ack.into();
    framed.write(ack.into_iter().collect()).await?;
    debug!(identity = %label, "connected");
    let keep_alive = match connect.keep_alive {
        0 => shared.limits.max_idle,
        k => (Duration::from_secs(k as u64) * 3 / 2).min(shared.limits.max_idle),
    };
    let mut tx = tx;
    let result = serve(
        &mut framed,
        &identity,
        &mut tx,
        rx,
        keep_alive,
        &shared,
        &cut,
    )
    .await;
    // Tell the router this connection is gone, however it ended.
    let bye = Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    );
    if !matches!(result, Err(SessionError::RouterClosed(_))) {
        let _ = send(&mut tx, bye).await;
    }
    if let Err(err) = &result {
        debug!(identity = %label, error = %err, "session ended");
    }
    result
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    framed: &mut Framed<S>,
    identity: &Identity,
    tx: &mut LinkTx,
    mut rx: LinkRx,
    keep_alive: Duration,
    shared: &Shared,
    cut: &CancellationToken,
) -> Result<(), SessionError> {
    // SUBSCRIBE packets whose filters were partly refused: packet id → which
    // filters went to the router.
    let mut partial: HashMap<u16, Vec<bool>> = HashMap::new();
    loop {
        tokio::select! {
            _ = cut.cancelled() => {
                return Err(SessionError::Revoked);
            }
            read = tokio::time::timeout(keep_alive, framed.read()) => {
                let packet = read.map_err(|_| SessionError::KeepAlive)??;
                match packet {
                    Packet::Publish(ref publish, _) => {
                        let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                        if !identity.may_publish(&topic) {
                            shared.metrics.refused_publishes.fetch_add(1, Ordering::Relaxed);
                            warn!(identity = %identity.label(), topic, "publish refused; closing (MQTT 3.1.1 has no refusal code)");
                            return Err(SessionError::Refused(format!("publish to {topic}")));
                        }
                        send(tx, packet).await?;
                    }
                    Packet::Subscribe(mut subscribe, props) => {
                        let allowed: Vec<bool> = subscribe.filters.iter().map(|f| identity.may_subscribe(&f.path)).collect();
                        for (f, ok) in subscribe.filters.iter().zip(&allowed) {
                            if !ok {
                                shared.metrics.refused_subscribes.fetch_add(1, Ordering::Relaxed);
                                warn!(identity = %identity.label(), filter = %f.path, "subscription refused");
                            }
                        }
                        if allowed.iter().all(|a| !a) {
                            let codes = vec![SubscribeReasonCode::Failure; allowed.len()];
                            framed.write(vec![Packet::SubAck(SubAck { pkid: subscribe.pkid, return_codes: codes }, None)]).await?;
                            continue;
                        }
                        if allowed.iter().any(|a| !a) {
                            let mut keep = allowed.iter();
                            subscribe.filters.retain(|_| *keep.next().unwrap_or(&false));
                            partial.insert(subscribe.pkid, allowed);
                        }
                        send(tx, Packet::Subscribe(subscribe, props)).await?;
                    }
                    Packet::Connect(..) => return Err(SessionError::Refused("second CONNECT".into())),
                    // Answered here: liveness of this connection is the front
                    // door's business, and a busy router must not make a
                    // healthy client miss its keep-alive.
                    Packet::PingReq(_) => framed.write(vec![Packet::PingResp(rumqttd::protocol::PingResp)]).await?,
                    Packet::Disconnect(..) => return Ok(()),
                    other => send(tx, other).await?,
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
                let packet = match packet {
                    Packet::SubAck(mut ack, props) => {
                        if let Some(allowed) = partial.remove(&ack.pkid) {
                            let mut granted = ack.return_codes.into_iter();
                            ack.return_codes = allowed
                                .iter()
                                .map(|ok| if *ok { granted.next().unwrap_or(SubscribeReasonCode::Failure) } else { SubscribeReasonCode::Failure })
                                .collect();
                        }
                        Packet::SubAck(ack, props)
                    }
                    Packet::Disconnect(..) => {
                        info!(identity = %identity.label(), "router closed the session (taken over by the same identity)");
                        framed.write(vec![packet]).await?;
                        return Err(SessionError::RouterClosed("taken over".into()));
                    }
                    other => other,
                };
                framed.write(vec![packet]).await?;
            }
        }
    }
}

/// Hands a packet to the router. `LinkTx::send` may block on the router's
/// bounded channel when the router is busy, so the worker is marked as
/// blocking for the call and the listeners' other tasks move elsewhere.
async fn send(tx: &mut LinkTx, packet: Packet) -> Result<(), SessionError> {
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current()
            .block_on(tx.send(packet))
            .map(|_| ())
            .map_err(|e| SessionError::Router(e.to_string()))
    })
}

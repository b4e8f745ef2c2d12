//! MQTT on the wire, per connection: 3.1.1 or 5, chosen from the CONNECT's
//! protocol level, with rumqttd's own codecs (`V4`, `V5`). The size limit is
//! checked on the fixed header, before a body is buffered or decoded.
//!
//! Everything that differs between the versions lives here: how a refusal
//! is spelled ([`Refusal`], [`Version`]), which properties go out, and the
//! MQTT 5 topic aliases a client sets up ([`TopicAliases`]).

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::v4::V4;
use rumqttd::protocol::v5::{self, PacketType, V5};
use rumqttd::protocol::{
    ConnAck, ConnectReturnCode, Disconnect, DisconnectProperties, DisconnectReasonCode, Packet,
    Protocol, PubAck, PubAckReason, PubRec, PubRecReason, Publish, PublishProperties,
    SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::session::SessionError;

/// The MQTT version a connection speaks, fixed by its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V311,
    V5,
}

/// Why a CONNECT is refused, before it is spelled in a version's codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a device id, or not the certificate's device id.
    ClientId,
    /// Wrong or missing internal credentials.
    Credentials,
    /// Anything else the grants forbid (a Will outside them).
    NotAuthorized,
    /// MQTT 5 enhanced authentication, which no listener offers.
    AuthMethod,
    /// The router would not open a session.
    Unavailable,
    /// A CONNECT property with a value MQTT 5 forbids (a Receive Maximum
    /// or Maximum Packet Size of 0).
    Protocol,
}

impl Version {
    pub fn connack_refusal(self, refusal: Refusal) -> Packet {
        let code = match (self, refusal) {
            (_, Refusal::ClientId) => ConnectReturnCode::ClientIdentifierNotValid,
            (_, Refusal::Credentials) => ConnectReturnCode::BadUserNamePassword,
            (_, Refusal::NotAuthorized) => ConnectReturnCode::NotAuthorized,
            (Version::V311, Refusal::AuthMethod) => ConnectReturnCode::NotAuthorized,
            (Version::V5, Refusal::AuthMethod) => ConnectReturnCode::BadAuthenticationMethod,
            (Version::V311, Refusal::Unavailable) => ConnectReturnCode::ServiceUnavailable,
            (Version::V5, Refusal::Unavailable) => ConnectReturnCode::ServerUnavailable,
            // An MQTT 3.1.1 CONNECT has no properties to get wrong.
            (Version::V311, Refusal::Protocol) => ConnectReturnCode::RefusedProtocolVersion,
            (Version::V5, Refusal::Protocol) => ConnectReturnCode::ProtocolError,
        };
        connack_refusing(code)
    }

    /// The SUBACK code for a filter outside the grants.
    pub fn refused_filter(self) -> SubscribeReasonCode {
        match self {
            Version::V311 => SubscribeReasonCode::Failure,
            Version::V5 => SubscribeReasonCode::NotAuthorized,
        }
    }

    /// The answer to a PUBLISH outside the grants with packet id `pkid` at
    /// QoS `qos`, or `None` where the protocol has no code for it (then the
    /// connection is closed).
    pub fn refused_publish(self, qos: u8, pkid: u16) -> Option<Packet> {
        match (self, qos) {
            (Version::V5, 1) => Some(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::NotAuthorized,
                },
                None,
            )),
            (Version::V5, 2) => Some(Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::NotAuthorized,
                },
                None,
            )),
            _ => None,
        }
    }

    /// The DISCONNECT that tells a client why the broker closes its
    /// connection. MQTT 3.1.1 has no server DISCONNECT.
    pub fn disconnect(self, reason: DisconnectReasonCode) -> Option<Packet> {
        match self {
            Version::V311 => None,
            Version::V5 => Some(Packet::Disconnect(
                Disconnect {
                    reason_code: reason,
                },
                None,
            )),
        }
    }
}

/// The longest a write may wait for the client to take any of it. A
/// session writes inside its event loop, so a client that stops reading
/// would otherwise hold that loop (revocation, keep-alive, its connection
/// slot) for ever.
pub const MAX_WRITE_STALL: Duration = Duration::from_secs(30);

/// A CONNACK that refuses the connection with `code`.
fn connack_refusing(code: ConnectReturnCode) -> Packet {
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code,
        },
        None,
    )
}

/// How long a CONNECT refused on its fixed header is given for its
/// protocol level to come, and how far into it that is looked for (the
/// protocol name is at most 6 bytes long in any version).
const LEVEL_WAIT: Duration = Duration::from_millis(500);
const LEVEL_BYTES: usize = 64;

/// How long a connection the broker ends is still read from after its last
/// word, and how much of it, before it is closed.
pub const LINGER: Duration = Duration::from_secs(1);
/// How long ending the broker's side may take (a TLS close_notify after
/// whatever is still queued) before the connection is closed at once.
const LINGER_FLUSH: Duration = Duration::from_millis(100);
const LINGER_BYTES: usize = 64 * 1024;

/// Ends the broker's side of `io` (after its last word: a TLS alert, a
/// CONNACK refusal, a DISCONNECT) and reads and drops what the client still
/// sends, until it closes too, for at most [`LINGER`] and 64 KiB. A socket
/// closed with unread data, or that receives data once closed, answers
/// with a reset, and a reset can cost the client that last word: a client
/// that writes its next message first fails with a broken pipe without
/// reading it (the JDK's, on a refused certificate), and TCP stacks that
/// drop unread data on a reset (lwIP's, on many devices) lose it outright.
pub async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    // A client that does not take what is still queued for it (the
    // farewell it did not read) is not waited for: closed now.
    if !matches!(
        tokio::time::timeout(LINGER_FLUSH, io.shutdown()).await,
        Ok(Ok(()))
    ) {
        return;
    }
    let drain = async {
        let mut buf = vec![0u8; 4096];
        let mut read = 0;
        while read < LINGER_BYTES {
            match io.read(&mut buf).await? {
                0 => break,
                n => read += n,
            }
        }
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

/// A read buffer more than twice this, and more than twice what is left in
/// it after a packet, is replaced by one just large enough for that.
const SHRINK_ABOVE: usize = 16 * 1024;

/// The most User Properties one packet may carry, over all its property
/// sets. An empty pair is 5 bytes on the wire and about 50 in memory, so a
/// packet of 256 KiB made of them would take ten times its size.
pub const MAX_USER_PROPERTIES: usize = 64;

/// How many User Properties `packet` carries.
fn user_properties(packet: &Packet) -> usize {
    fn n<T>(p: &Option<T>, of: impl Fn(&T) -> usize) -> usize {
        p.as_ref().map_or(0, of)
    }
    match packet {
        Packet::Connect(_, p, _, w, _) => {
            n(p, |p| p.user_properties.len()) + n(w, |w| w.user_properties.len())
        }
        Packet::Publish(_, p) => n(p, |p| p.user_properties.len()),
        Packet::PubAck(_, p) => n(p, |p| p.user_properties.len()),
        Packet::PubRec(_, p) => n(p, |p| p.user_properties.len()),
        Packet::PubRel(_, p) => n(p, |p| p.user_properties.len()),
        Packet::PubComp(_, p) => n(p, |p| p.user_properties.len()),
        Packet::Subscribe(_, p) => n(p, |p| p.user_properties.len()),
        Packet::Unsubscribe(_, p) => n(p, |p| p.user_properties.len()),
        Packet::Disconnect(_, p) => n(p, |p| p.user_properties.len()),
        _ => 0,
    }
}

/// Reads and writes MQTT packets of one connection's version.
pub struct Framed<S> {
    stream: S,
    buf: BytesMut,
    pub(crate) max_packet: usize,
    pub version: Version,
    /// The largest packet the client takes: the Maximum Packet Size of its
    /// MQTT 5 CONNECT, unlimited otherwise. Nothing larger is written.
    pub peer_max: usize,
    /// How long a write may go without the client taking a byte before
    /// it fails with [`SessionError::WriteStalled`]: [`MAX_WRITE_STALL`]
    /// unless the session sets less.
    pub write_stall: Duration,
    /// Cancelled when the connection must end (its certificate revoked, the
    /// listeners stopping): a write in progress then fails with
    /// [`SessionError::Revoked`], however slowly the client reads.
    pub cut: CancellationToken,
    /// Set when a write ended part-way into what it had to write: the
    /// client's stream then stops inside a packet, and nothing may follow.
    pub torn: bool,
    /// When a write of a QoS 1 or 2 PUBLISH last made progress (the stream
    /// took bytes): a client that owes an answer is not held to it while
    /// what it answers is still being written to it
    /// (`session::answer_due`). Other writes (a PINGRESP) do not count.
    pub wrote_at: tokio::time::Instant,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Framed<S> {
    /// [`linger`] on the connection, unless the client is already gone or
    /// silent (it ended the connection, or stopped reading or talking) or
    /// the session was cut.
    pub async fn linger_after(&mut self, ended: &SessionError) {
        // A cut session (its certificate revoked or expired, the broker
        // stopping) is closed within the second it was promised, after its
        // farewell only.
        let gone = matches!(
            ended,
            SessionError::Io(_)
                | SessionError::WriteStalled(_)
                | SessionError::KeepAlive
                | SessionError::ConnectTimeout(_)
                | SessionError::Revoked
        );
        if !gone {
            Box::pin(linger(&mut self.stream)).await;
        }
    }

    pub fn new(stream: S, max_packet: usize) -> Framed<S> {
        Framed {
            stream,
            buf: BytesMut::with_capacity(1024),
            max_packet,
            version: Version::V311,
            peer_max: usize::MAX,
            write_stall: MAX_WRITE_STALL,
            cut: CancellationToken::new(),
            torn: false,
            wrote_at: tokio::time::Instant::now(),
        }
    }

    /// The type of the packet at the front of the buffer once it is whole;
    /// an oversized one is refused on its fixed header.
    fn buffered(&self) -> Result<Option<PacketType>, SessionError> {
        // Checked on the fixed header, before the rest is read: the
        // remaining length takes the fewest bytes it can (MQTT 5 §1.5.5;
        // 3.1.1 encodes it alike), and the limit is on the whole packet, as
        // MQTT 5's Maximum Packet Size.
        if let Some((len_len, remaining)) = remaining_length(&self.buf) {
            use rumqttd::protocol::Error;
            if len_len != remaining_length_len(remaining) {
                return Err(SessionError::Mqtt(Error::MalformedRemainingLength));
            }
            let whole = 1 + len_len + remaining;
            if whole > self.max_packet {
                return Err(SessionError::Mqtt(Error::PayloadSizeLimitExceeded(whole)));
            }
        }
        // AUTH (type 15) is MQTT 5's, for enhanced authentication, which
        // no listener offers (a CONNECT that asks for it is refused): one
        // sent all the same is a Protocol Error (MQTT 5 §4.12). In 3.1.1
        // the type is reserved, and the packet malformed, as below.
        if matches!(self.version, Version::V5) && self.buf.first().is_some_and(|b| b >> 4 == 15) {
            return Err(SessionError::Violation(
                DisconnectReasonCode::ProtocolError,
                "client sent AUTH".into(),
            ));
        }
        match v5::check(self.buf.iter(), self.max_packet) {
            Ok(header) => Ok(Some(header.packet_type().map_err(SessionError::Mqtt)?)),
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(SessionError::Mqtt(e)),
        }
    }

    /// Buffers one whole packet and returns its type.
    async fn fill(&mut self) -> Result<PacketType, SessionError> {
        loop {
            if let Some(kind) = self.buffered()? {
                return Ok(kind);
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(SessionError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    fn decode(&mut self) -> Result<Packet, SessionError> {
        // Taken before the packet is split off: what is left of the buffer
        // after it still holds the whole allocation, however little of it
        // its capacity shows.
        let held = self.buf.capacity();
        let packet = match self.version {
            Version::V311 => V4.read_mut(&mut self.buf, self.max_packet),
            Version::V5 => V5.read_mut(&mut self.buf, self.max_packet),
        }
        .map_err(SessionError::Mqtt);
        // A large packet leaves the buffer as large as it: not kept for the
        // rest of the connection (250 KB of CONNECT properties were, for
        // every connection that sent them), whatever follows the packet. A
        // buffer at least half full of what follows is kept, so the copies
        // of a long run of packets after a large one add up to no more than
        // that run.
        if held > 2 * self.buf.len().max(SHRINK_ABOVE) {
            let rest = self.buf.split();
            self.buf = BytesMut::with_capacity(1024.max(rest.len()));
            self.buf.extend_from_slice(&rest);
        }
        let packet = packet?;
        if user_properties(&packet) > MAX_USER_PROPERTIES {
            return Err(SessionError::Violation(
                DisconnectReasonCode::ImplementationSpecificError,
                format!("more than {MAX_USER_PROPERTIES} User Properties in one packet"),
            ));
        }
        Ok(packet)
    }

    /// Decodes the packet at the front of the buffer once it is whole.
    /// Packets only a server sends are a protocol error from a client (and
    /// rumqttd's v5 decoder does not expect them: it panics on some).
    fn next_buffered(&mut self) -> Result<Option<Packet>, SessionError> {
        let Some(kind) = self.buffered()? else {
            return Ok(None);
        };
        if matches!(
            kind,
            PacketType::ConnAck | PacketType::SubAck | PacketType::UnsubAck | PacketType::PingResp
        ) {
            return Err(SessionError::Violation(
                DisconnectReasonCode::ProtocolError,
                format!("client sent {kind:?}"),
            ));
        }
        if let Some(only) = only_length(self.version, kind) {
            if remaining_length(&self.buf).map(|(_, len)| len) != Some(only) {
                return Err(SessionError::Mqtt(
                    rumqttd::protocol::Error::MalformedPacket,
                ));
            }
        }
        self.decode().map(Some)
    }

    /// Reads the first packet, which must be a CONNECT, and takes the
    /// connection's version from it. An unknown protocol level gets the
    /// 3.1.1 CONNACK 0x01, as MQTT 3.1.1 answers a level it does not speak.
    pub async fn read_connect(&mut self) -> Result<Packet, SessionError> {
        match self.fill().await {
            Ok(PacketType::Connect) => {}
            Ok(_) => return Err(SessionError::NotConnect),
            // Refused on its fixed header (too large, its length not
            // minimal): an MQTT 5 CONNECT is told why, once its protocol
            // level has come (waited for briefly: it may come in a later
            // segment).
            Err(err) => {
                if self.buf.first() == Some(&0x10) && matches!(err, SessionError::Mqtt(_)) {
                    let _ = tokio::time::timeout(LEVEL_WAIT, self.until_level()).await;
                    if protocol_level(&self.buf) == Some(5) {
                        self.version = Version::V5;
                        self.refuse_connect(&err).await;
                    }
                }
                return Err(err);
            }
        }
        self.version = match protocol_level(&self.buf) {
            Some(5) => Version::V5,
            Some(4) => Version::V311,
            level => {
                let refusal = connack_refusing(ConnectReturnCode::RefusedProtocolVersion);
                let _ = self.write(vec![refusal]).await;
                return Err(SessionError::Refused(format!(
                    "unsupported protocol level {level:?}"
                )));
            }
        };
        let connect = self.decode();
        if let (Version::V5, Err(err)) = (self.version, &connect) {
            self.refuse_connect(err).await;
        }
        connect
    }

    /// Reads until the protocol level of the CONNECT at the front of the
    /// buffer has come (or [`LEVEL_BYTES`] have, or the stream ends).
    async fn until_level(&mut self) {
        while protocol_level(&self.buf).is_none() && self.buf.len() < LEVEL_BYTES {
            if !matches!(self.stream.read_buf(&mut self.buf).await, Ok(n) if n > 0) {
                return;
            }
        }
    }

    /// Tells an MQTT 5 client why its CONNECT ended the connection, in a
    /// CONNACK with the reason a DISCONNECT would give (MQTT 5 §4.13.1 lets
    /// the server send it): Malformed Packet (0x81), Protocol Error (0x82),
    /// more User Properties than the broker takes (0x83) or Packet too
    /// large (0x95).
    async fn refuse_connect(&mut self, err: &SessionError) {
        let code = match err.disconnect_reason() {
            Some(DisconnectReasonCode::MalformedPacket) => ConnectReturnCode::MalformedPacket,
            Some(DisconnectReasonCode::ProtocolError) => ConnectReturnCode::ProtocolError,
            Some(DisconnectReasonCode::ImplementationSpecificError) => {
                ConnectReturnCode::ImplementationSpecificError
            }
            Some(DisconnectReasonCode::PacketTooLarge) => ConnectReturnCode::PacketTooLarge,
            _ => return,
        };
        let _ = self.write(vec![connack_refusing(code)]).await;
    }

    /// Reads the next packet.
    pub async fn read(&mut self) -> Result<Packet, SessionError> {
        loop {
            if let Some(packet) = self.next_buffered()? {
                return Ok(packet);
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(SessionError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }

    /// Writes `packets`. A packet larger than the client's Maximum Packet
    /// Size is sent without its Reason String and User Properties, which
    /// MQTT 5 lets the sender leave out, or, still too large, not at all
    /// (MQTT 5 §3.1.2.11.4). A PUBLISH is checked before it gets here (see
    /// `session::Outbound`), so its discard is acknowledged to the router.
    pub async fn write(&mut self, packets: Vec<Packet>) -> Result<(), SessionError> {
        // Whether it carries a PUBLISH the client is to acknowledge.
        let owed = packets.iter().any(
            |p| matches!(p, Packet::Publish(p, _) if p.qos_and_pkid().0 != rumqttd::protocol::QoS::AtMostOnce),
        );
        let mut out = BytesMut::new();
        for p in packets {
            let start = out.len();
            match self.version {
                Version::V311 => V4.write(without_properties(p), &mut out),
                Version::V5 => {
                    let p = with_disconnect_properties(p);
                    let kept = (self.peer_max != usize::MAX).then(|| p.clone());
                    let written = V5.write(p, &mut out);
                    match kept {
                        Some(p) if written.is_ok() && out.len() - start > self.peer_max => {
                            out.truncate(start);
                            let connack = matches!(p, Packet::ConnAck(..));
                            let shrunk = self.write_within(p, &mut out);
                            // Without its CONNACK the client would wait for
                            // ever: the connection is closed instead.
                            if connack && matches!(shrunk, Ok(0)) {
                                return Err(SessionError::Refused(format!(
                                    "the CONNACK exceeds the client's Maximum Packet Size {}",
                                    self.peer_max
                                )));
                            }
                            shrunk
                        }
                        _ => written,
                    }
                }
            }
            .map_err(SessionError::Mqtt)?;
        }
        self.send_all(&out, owed).await
    }

    /// Writes `out` and flushes it, failing once the client has taken
    /// nothing for [`Framed::write_stall`]. A slow client that keeps taking
    /// bytes is not cut (unless it takes less in that time than wakes a
    /// writer: half the `TCP_NOTSENT_LOWAT` of [`super::bind`], or over TLS
    /// the rest of a flush); one that stopped reading is. `owed`: `out`
    /// carries a QoS 1 or 2 PUBLISH ([`Framed::wrote_at`]).
    async fn send_all(&mut self, out: &[u8], owed: bool) -> Result<(), SessionError> {
        let stall = self.write_stall;
        let stalled = |_| SessionError::WriteStalled(stall);
        let cut = self.cut.clone();
        let mut at = 0;
        while at < out.len() {
            let n = tokio::select! {
                _ = cut.cancelled() => {
                    self.torn = at > 0;
                    return Err(SessionError::Revoked);
                }
                n = tokio::time::timeout(stall, self.stream.write(&out[at..])) => n.map_err(stalled)??,
            };
            if n == 0 {
                return Err(SessionError::Io(std::io::ErrorKind::WriteZero.into()));
            }
            at += n;
            if owed {
                self.wrote_at = tokio::time::Instant::now();
            }
        }
        tokio::select! {
            _ = cut.cancelled() => Err(SessionError::Revoked),
            flushed = tokio::time::timeout(stall, self.stream.flush()) => {
                flushed.map_err(stalled)?.map_err(SessionError::from)
            }
        }
    }

    /// Appends `p` to `out` shrunk to the client's Maximum Packet Size, or
    /// nothing if it cannot be.
    fn write_within(
        &self,
        p: Packet,
        out: &mut BytesMut,
    ) -> Result<usize, rumqttd::protocol::Error> {
        let start = out.len();
        let kind = packet_name(&p);
        let shrunk = match without_optional_properties(p) {
            // Without properties rumqttd cannot frame a DISCONNECT with a
            // reason (see `with_disconnect_properties`): it is spelled
            // here, reason code and no properties.
            Packet::Disconnect(d, _)
                if d.reason_code != DisconnectReasonCode::NormalDisconnection =>
            {
                out.extend_from_slice(&[0xE0, 0x01, disconnect_code(d.reason_code)]);
                Ok(3)
            }
            p => V5.write(p, out),
        }?;
        if out.len() - start > self.peer_max {
            out.truncate(start);
            debug!(
                packet = kind,
                limit = self.peer_max,
                "packet over the client's Maximum Packet Size not sent"
            );
            return Ok(0);
        }
        Ok(shrunk)
    }
}

/// The name of a packet's type, for logs.
fn packet_name(p: &Packet) -> &'static str {
    match p {
        Packet::Connect(..) => "CONNECT",
        Packet::ConnAck(..) => "CONNACK",
        Packet::Publish(..) => "PUBLISH",
        Packet::PubAck(..) => "PUBACK",
        Packet::PingReq(..) => "PINGREQ",
        Packet::PingResp(..) => "PINGRESP",
        Packet::Subscribe(..) => "SUBSCRIBE",
        Packet::SubAck(..) => "SUBACK",
        Packet::PubRec(..) => "PUBREC",
        Packet::PubRel(..) => "PUBREL",
        Packet::PubComp(..) => "PUBCOMP",
        Packet::Unsubscribe(..) => "UNSUBSCRIBE",
        Packet::UnsubAck(..) => "UNSUBACK",
        Packet::Disconnect(..) => "DISCONNECT",
    }
}

/// The wire value of a DISCONNECT reason code, read back from rumqttd's
/// own encoding of it (the enum's values are not public).
fn disconnect_code(reason: DisconnectReasonCode) -> u8 {
    let mut out = BytesMut::new();
    let bye = with_disconnect_properties(Packet::Disconnect(
        Disconnect {
            reason_code: reason,
        },
        None,
    ));
    match V5.write(bye, &mut out) {
        Ok(_) if out.len() > 2 => out[2],
        _ => 0x80,
    }
}

/// A packet without the properties MQTT 5 lets a sender leave out when the
/// packet would exceed the receiver's Maximum Packet Size: Reason String
/// and User Properties. A PUBLISH keeps everything: its properties are
/// part of the message.
fn without_optional_properties(p: Packet) -> Packet {
    match p {
        Packet::ConnAck(a, Some(mut props)) => {
            props.reason_string = None;
            props.user_properties.clear();
            Packet::ConnAck(a, Some(props))
        }
        Packet::PubAck(a, _) => Packet::PubAck(a, None),
        Packet::PubRec(a, _) => Packet::PubRec(a, None),
        Packet::PubRel(a, _) => Packet::PubRel(a, None),
        Packet::PubComp(a, _) => Packet::PubComp(a, None),
        Packet::SubAck(a, _) => Packet::SubAck(a, None),
        Packet::UnsubAck(a, _) => Packet::UnsubAck(a, None),
        Packet::Disconnect(d, _) => Packet::Disconnect(d, None),
        other => other,
    }
}

/// The QoS, packet id and MQTT 5 encoded size of a PUBLISH the router
/// hands over. The size is read from the encoding of the PUBLISH without
/// its payload (which would otherwise be copied for nothing): its
/// remaining length, to which the payload adds.
pub fn publish_shape(publish: &Publish, properties: &Option<PublishProperties>) -> PublishShape {
    let mut shell = publish.clone();
    let payload = std::mem::take(&mut shell.payload).len();
    let mut out = BytesMut::new();
    let written = V5.write(Packet::Publish(shell, properties.clone()), &mut out);
    let Some((_, shell)) = written.ok().and_then(|_| remaining_length(&out)) else {
        return PublishShape {
            qos: 0,
            pkid: 0,
            size: usize::MAX,
        };
    };
    let remaining = shell + payload;
    let (qos, pkid) = publish.qos_and_pkid();
    let qos = qos as u8;
    PublishShape {
        qos,
        pkid: if qos == 0 { 0 } else { pkid },
        size: 1 + remaining_length_len(remaining) + remaining,
    }
}

pub struct PublishShape {
    pub qos: u8,
    pub pkid: u16,
    /// Bytes on the wire, MQTT 5.
    pub size: usize,
}

/// The remaining length at the front of a packet in `buf`, and the bytes
/// it takes, once they have all come (at most four: a fifth is left to the
/// codec, which refuses it).
fn remaining_length(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        value |= usize::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((i + 1, value));
        }
    }
    None
}

/// Bytes MQTT spends on a remaining length of `len`.
fn remaining_length_len(len: usize) -> usize {
    match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The protocol level of a buffered CONNECT: byte 1 is the type, then the
/// remaining length (1–4 bytes), the protocol name (a length-prefixed
/// string) and the level.
fn protocol_level(frame: &[u8]) -> Option<u8> {
    let (len_len, _) = remaining_length(frame)?;
    let at = 1 + len_len;
    let name_len = u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]) as usize;
    frame.get(at + 2 + name_len).copied()
}

/// The remaining length a packet of type `kind` must have in `version`,
/// where it can have only one: 0 for a PINGREQ, and in MQTT 3.1.1 also
/// for a DISCONNECT, and 2 (the packet id) for a PUBACK, PUBREC, PUBREL
/// or PUBCOMP. (rumqttd's decoders read what they need and pass over the
/// rest.)
fn only_length(version: Version, kind: PacketType) -> Option<usize> {
    match (version, kind) {
        (_, PacketType::PingReq) | (Version::V311, PacketType::Disconnect) => Some(0),
        (
            Version::V311,
            PacketType::PubAck | PacketType::PubRec | PacketType::PubRel | PacketType::PubComp,
        ) => Some(2),
        _ => None,
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

/// rumqttd's v5 encoder writes a DISCONNECT with a reason code right only
/// when it has properties of some length: without properties it counts one
/// byte and writes two, with empty ones it writes no reason at all. The
/// reason's name as Reason String makes the properties non-empty.
fn with_disconnect_properties(p: Packet) -> Packet {
    match p {
        Packet::Disconnect(d, None)
            if d.reason_code != DisconnectReasonCode::NormalDisconnection =>
        {
            let named = DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(format!("{:?}", d.reason_code)),
                user_properties: Vec::new(),
                server_reference: None,
            };
            Packet::Disconnect(d, Some(named))
        }
        other => other,
    }
}

/// The MQTT 5 topic aliases one client set up. The front door resolves
/// them itself, so every PUBLISH is authorized on the topic it is really
/// routed to, and the router only ever sees full topic names.
#[derive(Default)]
pub struct TopicAliases {
    topics: HashMap<u16, String>,
}

impl TopicAliases {
    /// The Topic Alias Maximum the broker announces in its CONNACK: a
    /// device publishes to a handful of topics.
    pub const MAX: u16 = 16;

    /// Rewrites an MQTT 5 PUBLISH for the router: the topic it is routed
    /// to, which is the one to authorize, and no alias. A client's PUBLISH
    /// carries no Subscription Identifier.
    pub fn route(
        &mut self,
        publish: &mut Publish,
        properties: Option<&mut PublishProperties>,
    ) -> Result<(), SessionError> {
        let mut alias = None;
        if let Some(p) = properties {
            if !p.subscription_identifiers.is_empty() {
                return Err(SessionError::Violation(
                    DisconnectReasonCode::ProtocolError,
                    "subscription identifier in a PUBLISH".into(),
                ));
            }
            alias = p.topic_alias.take();
        }
        let named = std::str::from_utf8(&publish.topic).map_err(|_| {
            SessionError::Violation(
                DisconnectReasonCode::MalformedPacket,
                "topic is not UTF-8".into(),
            )
        })?;
        publish.topic = Bytes::from(self.resolve(named, alias)?);
        Ok(())
    }

    /// The topic a PUBLISH with `topic` and alias `alias` is for; records a
    /// new mapping when both are given.
    pub fn resolve(&mut self, topic: &str, alias: Option<u16>) -> Result<String, SessionError> {
        let Some(alias) = alias else {
            if topic.is_empty() {
                return Err(SessionError::Violation(
                    DisconnectReasonCode::ProtocolError,
                    "empty topic without an alias".into(),
                ));
            }
            return Ok(topic.to_string());
        };
        if alias == 0 || alias > Self::MAX {
            return Err(SessionError::Violation(
                DisconnectReasonCode::TopicAliasInvalid,
                format!("topic alias {alias}"),
            ));
        }
        if topic.is_empty() {
            return self.topics.get(&alias).cloned().ok_or_else(|| {
                SessionError::Violation(
                    DisconnectReasonCode::ProtocolError,
                    format!("topic alias {alias} was never set"),
                )
            });
        }
        self.topics.insert(alias, topic.to_string());
        Ok(topic.to_string())
    }

    /// `topic` was refused: an alias set to it keeps no copy of it (a
    /// client could otherwise keep 16 topics of up to a packet's size
    /// each with the broker). A PUBLISH by that alias alone comes to the
    /// empty topic, which no grant covers, and is refused as before.
    pub fn refused(&mut self, topic: &str) {
        for set in self.topics.values_mut() {
            if set == topic {
                *set = String::new();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(4000))]

        /// Whatever a client sends after its CONNECT, in either version,
        /// decoding ends in a packet or an error, never a panic.
        #[test]
        fn any_packet_decodes_or_fails(
            byte1 in proptest::prelude::any::<u8>(),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96),
            v5 in proptest::prelude::any::<bool>(),
        ) {
            let (stream, _peer) = tokio::io::duplex(64);
            let mut framed = Framed::new(stream, 1024);
            framed.version = if v5 { Version::V5 } else { Version::V311 };
            framed.buf.extend_from_slice(&[byte1, body.len() as u8]);
            framed.buf.extend_from_slice(&body);
            let _ = framed.next_buffered();
        }

        /// The same for a CONNECT of either level, whatever follows its
        /// protocol name and level.
        #[test]
        fn any_connect_decodes_or_fails(
            rest in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96),
            v5 in proptest::prelude::any::<bool>(),
        ) {
            let (stream, _peer) = tokio::io::duplex(64);
            let mut framed = Framed::new(stream, 1024);
            let level = if v5 { 5 } else { 4 };
            let body_len = 7 + rest.len();
            framed.buf.extend_from_slice(&[0x10, body_len as u8, 0, 4, b'M', b'Q', b'T', b'T', level]);
            framed.buf.extend_from_slice(&rest);
            proptest::prop_assert_eq!(protocol_level(&framed.buf), Some(level));
            framed.version = if v5 { Version::V5 } else { Version::V311 };
            let _ = framed.decode();
        }
    }

    /// Appends `n` as an MQTT Variable Byte Integer.
    fn varint(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (n % 128) as u8;
            n /= 128;
            out.push(if n > 0 { byte | 0x80 } else { byte });
            if n == 0 {
                return;
            }
        }
    }

    /// An MQTT 5 QoS 0 PUBLISH of `x` to `a/b` with the encoded
    /// `properties`.
    fn publish_with(properties: &[u8]) -> Vec<u8> {
        let mut body = vec![0, 3, b'a', b'/', b'b'];
        varint(properties.len(), &mut body);
        body.extend(properties);
        body.push(b'x');
        let mut packet = vec![0x30];
        varint(body.len(), &mut packet);
        packet.extend(&body);
        packet
    }

    /// A packet of 64 KB (here a PUBLISH whose User Property is most of
    /// it) does not leave the connection's read buffer that large.
    #[test]
    fn a_large_packet_leaves_no_large_buffer() {
        let mut property = vec![0x26, 0, 1, b'k'];
        property.extend(u16::MAX.to_be_bytes());
        property.extend(std::iter::repeat_n(b'v', u16::MAX as usize));
        let packet = publish_with(&property);

        // The packet, then `pingreqs` PINGREQs, in a buffer of `capacity`
        // (or grown as it needs): after the packet, the rest is in a small
        // buffer of its own, not in the allocation the packet filled.
        let check = |capacity: Option<usize>, pingreqs: usize| {
            let (stream, _peer) = tokio::io::duplex(64);
            let mut framed = Framed::new(stream, 256 * 1024);
            framed.version = Version::V5;
            if let Some(capacity) = capacity {
                framed.buf = BytesMut::with_capacity(capacity);
            }
            framed.buf.extend_from_slice(&packet);
            for _ in 0..pingreqs {
                framed.buf.extend_from_slice(&[0xC0, 0x00]);
            }
            let start = framed.buf.as_ptr() as usize;
            let allocation = start..start + framed.buf.capacity();
            let Ok(Some(Packet::Publish(_, Some(properties)))) = framed.next_buffered() else {
                panic!("not the PUBLISH");
            };
            assert_eq!(properties.user_properties[0].1.len(), u16::MAX as usize);
            assert!(
                !allocation.contains(&(framed.buf.as_ptr() as usize)),
                "the rest of the buffer is still in the packet's allocation"
            );
            assert!(
                framed.buf.capacity() <= SHRINK_ABOVE,
                "{} bytes kept",
                framed.buf.capacity()
            );
            for _ in 0..pingreqs {
                assert!(matches!(
                    framed.next_buffered(),
                    Ok(Some(Packet::PingReq(_)))
                ));
            }
        };
        check(None, 1);
        // Followed by more than a few KB (3,000 PINGREQs).
        check(None, 3_000);
        // In a buffer it fills but for the few bytes after it.
        check(Some(packet.len() + 2), 1);

        // Followed by 100 KB of PINGREQs read at once: the buffer is
        // replaced a few times as they are taken, not at every one.
        let (stream, _peer) = tokio::io::duplex(64);
        let mut framed = Framed::new(stream, 256 * 1024);
        framed.version = Version::V5;
        framed.buf.extend_from_slice(&packet);
        for _ in 0..50_000 {
            framed.buf.extend_from_slice(&[0xC0, 0x00]);
        }
        assert!(matches!(
            framed.next_buffered(),
            Ok(Some(Packet::Publish(..)))
        ));
        let mut replaced = 0;
        for _ in 0..50_000 {
            let before = framed.buf.as_ptr() as usize;
            assert!(matches!(
                framed.next_buffered(),
                Ok(Some(Packet::PingReq(_)))
            ));
            replaced += usize::from(framed.buf.as_ptr() as usize != before + 2);
        }
        assert!(replaced <= 8, "the buffer was replaced {replaced} times");
    }

    /// At most 64 User Properties in a packet, empty ones included: 65 end
    /// the connection (MQTT 5: DISCONNECT 0x83).
    #[test]
    fn a_packet_with_too_many_user_properties_is_refused() {
        let decode = |pairs: usize| {
            let packet = publish_with(&[0x26, 0, 0, 0, 0].repeat(pairs));
            let (stream, _peer) = tokio::io::duplex(64);
            let mut framed = Framed::new(stream, 1024);
            framed.version = Version::V5;
            framed.buf.extend_from_slice(&packet);
            framed.next_buffered()
        };
        assert!(matches!(decode(64), Ok(Some(Packet::Publish(..)))));
        assert!(matches!(
            decode(65),
            Err(SessionError::Violation(
                DisconnectReasonCode::ImplementationSpecificError,
                _
            ))
        ));
    }

    /// What a connection of MQTT 5 (`v5`) or 3.1.1 with a limit of `max`
    /// bytes a packet makes of `bytes`.
    fn decoded(v5: bool, max: usize, bytes: &[u8]) -> Result<Option<Packet>, SessionError> {
        let (stream, _peer) = tokio::io::duplex(64);
        let mut framed = Framed::new(stream, max);
        framed.version = if v5 { Version::V5 } else { Version::V311 };
        framed.buf.extend_from_slice(bytes);
        framed.next_buffered()
    }

    /// `body` framed as a packet whose first byte is `byte1`.
    fn framed_as(byte1: u8, body: Vec<u8>) -> Vec<u8> {
        let mut frame = vec![byte1];
        varint(body.len(), &mut frame);
        frame.extend(body);
        frame
    }

    /// SUBSCRIBE (first byte `byte1`), packet id `pkid`, "a/b" with
    /// `options`.
    fn subscribe(byte1: u8, v5: bool, pkid: u8, options: u8) -> Vec<u8> {
        let mut body = vec![0, pkid];
        if v5 {
            body.push(0);
        }
        body.extend([0, 3, b'a', b'/', b'b', options]);
        framed_as(byte1, body)
    }

    /// CONNECT with `flags`, keep-alive 60, the MQTT 5 `properties` (none
    /// in 3.1.1), client id "d1", then `tail`.
    fn connect(v5: bool, flags: u8, properties: &[u8], tail: &[u8]) -> Vec<u8> {
        let level = if v5 { 5 } else { 4 };
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 60];
        if v5 {
            body.push(properties.len() as u8);
            body.extend(properties);
        }
        body.extend([0, 2, b'd', b'1']);
        body.extend(tail);
        framed_as(0x10, body)
    }

    /// Reserved bits set: the fixed header's flags, the CONNECT flags, the
    /// subscription options. Each is a malformed packet, which ends the
    /// connection (MQTT 3.1.1 §2.2.2, §3.1.2.3, §3.8.3.1; MQTT 5 the same).
    #[test]
    fn reserved_bits_make_a_packet_malformed() {
        for v5 in [false, true] {
            let ok = |bytes: &[u8]| matches!(decoded(v5, 1024, bytes), Ok(Some(_)));
            assert!(ok(&subscribe(0x82, v5, 1, 1)), "v5 {v5}: a SUBSCRIBE");
            assert!(
                !ok(&subscribe(0x80, v5, 1, 1)),
                "v5 {v5}: SUBSCRIBE flags 0000"
            );
            assert!(!ok(&subscribe(0x82, v5, 1, 0x81)), "v5 {v5}: option bit 7");
            assert!(ok(&[0xC0, 0]), "v5 {v5}: a PINGREQ");
            assert!(!ok(&[0xC1, 0]), "v5 {v5}: a PINGREQ with a flag");
            assert!(!ok(&[0x60, 2, 0, 1]), "v5 {v5}: PUBREL flags 0000");
            assert!(
                !ok(&[0xA0, 5, 0, 1, 0, 1, b'a']),
                "v5 {v5}: UNSUBSCRIBE flags 0000"
            );
            assert!(ok(&connect(v5, 0b10, &[], &[])), "v5 {v5}: a CONNECT");
            assert!(
                !ok(&connect(v5, 0b11, &[], &[])),
                "v5 {v5}: the reserved CONNECT flag"
            );
        }
        // No Local, Retain As Published: MQTT 5 options, reserved in 3.1.1.
        assert!(decoded(false, 1024, &subscribe(0x82, false, 1, 0x0D)).is_err());
        assert!(matches!(
            decoded(true, 1024, &subscribe(0x82, true, 1, 0x0D)),
            Ok(Some(_))
        ));
    }

    /// More that MQTT calls malformed (or, MQTT 5, a protocol error): a
    /// remaining length in more bytes than it needs, a SUBSCRIBE or
    /// UNSUBSCRIBE with packet id 0, an UNSUBSCRIBE with no filter, bytes
    /// after a CONNECT's payload, a 3.1.1 password without a user name, a
    /// Request Problem Information other than 0 or 1. And the limit is on
    /// the whole packet, fixed header included.
    #[test]
    fn packets_mqtt_calls_malformed_are_refused() {
        use rumqttd::protocol::Error;
        let refused = |v5, bytes: &[u8]| match decoded(v5, 1024, bytes) {
            Err(SessionError::Mqtt(e)) => Some(e),
            _ => None,
        };
        for v5 in [false, true] {
            let ok = |bytes: &[u8]| matches!(decoded(v5, 1024, bytes), Ok(Some(_)));
            assert!(matches!(
                refused(v5, &[0xC0, 0x80, 0]),
                Some(Error::MalformedRemainingLength)
            ));
            // A PUBLISH of 200 bytes to "a": a two-byte remaining length.
            let topic: &[u8] = if v5 { &[0, 1, b'a', 0] } else { &[0, 1, b'a'] };
            assert!(ok(&framed_as(0x30, [topic, &[b'x'; 200]].concat())));
            // UNSUBSCRIBE of "a" under `pkid`, or of nothing.
            let unsubscribe = |pkid: u8, filter: &[u8]| {
                let mut body = vec![0, pkid];
                if v5 {
                    body.push(0);
                }
                body.extend(filter);
                framed_as(0xA2, body)
            };
            assert!(ok(&unsubscribe(1, &[0, 1, b'a'])), "v5 {v5}");
            assert!(matches!(
                refused(v5, &unsubscribe(0, &[0, 1, b'a'])),
                Some(Error::PacketIdZero)
            ));
            assert!(matches!(
                refused(v5, &unsubscribe(1, &[])),
                Some(Error::EmptySubscription)
            ));
            assert!(matches!(
                refused(v5, &subscribe(0x82, v5, 0, 1)),
                Some(Error::PacketIdZero)
            ));
            assert!(matches!(
                refused(v5, &connect(v5, 0b10, &[], &[0])),
                Some(Error::MalformedPacket)
            ));
            // User name and password, or the password alone.
            let login = [0, 1, b'u', 0, 1, b'p'];
            assert!(ok(&connect(v5, 0b1100_0010, &[], &login)), "v5 {v5}");
            let alone = connect(v5, 0b0100_0010, &[], &login[3..]);
            assert_eq!(ok(&alone), v5, "v5 {v5}: a password alone");
            // A PINGREQ with a body; a PUBACK, PUBREC, PUBREL (flags 0010)
            // or PUBCOMP with bytes after its packet id (3.1.1) or after its
            // properties (5); a DISCONNECT with bytes after its properties,
            // or, in 3.1.1, with any.
            assert!(ok(&[0xC0, 0]));
            assert!(matches!(
                refused(v5, &[0xC0, 1, 0]),
                Some(Error::MalformedPacket)
            ));
            for byte1 in [0x40, 0x50, 0x62, 0x70] {
                assert!(ok(&[byte1, 2, 0, 1]), "{byte1:#x}");
                let over: &[u8] = if v5 { &[0, 1, 0, 0, 7] } else { &[0, 1, 0, 0] };
                assert!(
                    matches!(
                        refused(v5, &framed_as(byte1, over.to_vec())),
                        Some(Error::MalformedPacket)
                    ),
                    "v5 {v5}: {byte1:#x}"
                );
            }
            if v5 {
                // Properties longer than their length says: a Reason String
                // of 1 byte under a property length of 1.
                let straddling = framed_as(0x40, vec![0, 1, 0, 1, 0x1F, 0, 1, b'x']);
                assert!(
                    matches!(refused(v5, &straddling), Some(Error::MalformedPacket)),
                    "a property past the property length"
                );
                assert!(ok(&framed_as(0x40, vec![0, 1, 0, 4, 0x1F, 0, 1, b'x'])));
            }
            assert!(ok(&[0xE0, 0]));
            let over: &[u8] = if v5 { &[0, 0, 7] } else { &[0] };
            assert!(
                matches!(
                    refused(v5, &framed_as(0xE0, over.to_vec())),
                    Some(Error::MalformedPacket)
                ),
                "v5 {v5}: DISCONNECT"
            );
        }
        // Request Problem Information (0x17) and Request Response
        // Information (0x19): 0 or 1.
        for prop in [0x17, 0x19] {
            assert!(matches!(
                decoded(true, 1024, &connect(true, 0b10, &[prop, 1], &[])),
                Ok(Some(_))
            ));
            let err = decoded(true, 1024, &connect(true, 0b10, &[prop, 2], &[])).unwrap_err();
            assert_eq!(
                err.disconnect_reason(),
                Some(DisconnectReasonCode::ProtocolError),
                "{err:?}"
            );
        }
        // 200 bytes of remaining length and 3 of fixed header.
        let publish = framed_as(0x30, [&[0, 1, b'a', 0][..], &[b'x'; 196]].concat());
        assert_eq!(publish.len(), 203);
        assert!(matches!(decoded(true, 203, &publish), Ok(Some(_))));
        // Refused on its fixed header alone, before the rest comes.
        for bytes in [&publish[..], &publish[..3]] {
            let err = decoded(true, 202, bytes).unwrap_err();
            assert_eq!(
                err.disconnect_reason(),
                Some(DisconnectReasonCode::PacketTooLarge)
            );
        }
    }

    /// An AUTH packet is a Protocol Error in MQTT 5 (no listener offers
    /// enhanced authentication), and malformed in 3.1.1 (a reserved type).
    #[test]
    fn an_auth_packet_is_refused_as_its_version_says() {
        // AUTH, Continue Authentication (0x18), no properties.
        let auth = [0xF0, 2, 0x18, 0];
        let err = decoded(true, 1024, &auth).unwrap_err();
        assert_eq!(
            err.disconnect_reason(),
            Some(DisconnectReasonCode::ProtocolError),
            "{err:?}"
        );
        // Refused on its first byte, before the rest has come.
        assert!(decoded(true, 1024, &auth[..1]).is_err());
        let err = decoded(false, 1024, &auth).unwrap_err();
        assert!(matches!(err, SessionError::Mqtt(_)), "{err:?}");
    }

    /// A property given twice is a Protocol Error (MQTT 5 §2.2.2.2), but
    /// for User Property, which may repeat.
    #[test]
    fn a_property_given_twice_is_a_protocol_error() {
        let decode = |properties: &[u8]| {
            let (stream, _peer) = tokio::io::duplex(64);
            let mut framed = Framed::new(stream, 1024);
            framed.version = Version::V5;
            // PUBLISH QoS 0 to "a/b", with `properties`, payload "x".
            let mut body = vec![0, 3, b'a', b'/', b'b', properties.len() as u8];
            body.extend_from_slice(properties);
            body.push(b'x');
            framed.buf.extend_from_slice(&[0x30, body.len() as u8]);
            framed.buf.extend_from_slice(&body);
            framed.next_buffered()
        };
        let pfi = [0x01, 1];
        let expiry = [0x02, 0, 0, 0, 60];
        let user = [0x26, 0, 1, b'k', 0, 1, b'v'];
        let ok = |props: &[&[u8]]| matches!(decode(&props.concat()), Ok(Some(_)));
        assert!(ok(&[&pfi, &expiry, &user]));
        assert!(ok(&[&user, &pfi, &user]), "User Property repeats");
        for twice in [&pfi[..], &expiry[..]] {
            let err = decode(&[twice, &user, twice].concat()).unwrap_err();
            assert!(
                matches!(
                    err,
                    SessionError::Mqtt(rumqttd::protocol::Error::DuplicateProperty(p)) if p == twice[0]
                ),
                "{err:?}"
            );
            assert_eq!(
                err.disconnect_reason(),
                Some(DisconnectReasonCode::ProtocolError)
            );
        }
    }

    /// Every property a client's packet may carry, written by rumqttd's v5
    /// encoder, reads back the same: each decoder counts its properties to
    /// exactly their length (a Subscription Identifier was counted one
    /// byte long).
    #[test]
    fn v5_properties_read_back_as_written() {
        use rumqttd::protocol::*;
        let users = vec![("k".to_string(), "v".to_string())];
        let publish = Packet::Publish(
            Publish::new("a/b", "x", false),
            Some(PublishProperties {
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(60),
                topic_alias: Some(2),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: users.clone(),
                subscription_identifiers: vec![1, 300],
                content_type: Some("t".into()),
            }),
        );
        let connect = Packet::Connect(
            Connect {
                keep_alive: 60,
                client_id: "c".into(),
                clean_session: true,
            },
            Some(ConnectProperties {
                session_expiry_interval: Some(10),
                receive_maximum: Some(5),
                max_packet_size: Some(1000),
                topic_alias_max: Some(3),
                request_response_info: Some(1),
                request_problem_info: Some(0),
                user_properties: users.clone(),
                authentication_method: None,
                authentication_data: None,
            }),
            Some(LastWill {
                topic: Bytes::from_static(b"w"),
                message: Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: false,
            }),
            Some(LastWillProperties {
                delay_interval: Some(5),
                payload_format_indicator: Some(1),
                message_expiry_interval: Some(9),
                content_type: Some("t".into()),
                response_topic: Some("r".into()),
                correlation_data: Some(Bytes::from_static(b"c")),
                user_properties: users.clone(),
            }),
            None,
        );
        let subscribe = Packet::Subscribe(
            Subscribe {
                pkid: 1,
                filters: vec![Filter {
                    path: "a/b".into(),
                    qos: QoS::AtLeastOnce,
                    nolocal: false,
                    preserve_retain: false,
                    retain_forward_rule: RetainForwardRule::OnEverySubscribe,
                }],
            },
            Some(SubscribeProperties {
                id: Some(300),
                user_properties: users.clone(),
            }),
        );
        let puback = Packet::PubAck(
            PubAck {
                pkid: 1,
                reason: PubAckReason::Success,
            },
            Some(PubAckProperties {
                reason_string: Some("why".into()),
                user_properties: users.clone(),
            }),
        );
        let disconnect = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            Some(DisconnectProperties {
                session_expiry_interval: Some(0),
                reason_string: Some("bye".into()),
                user_properties: users,
                server_reference: None,
            }),
        );
        for packet in [publish, connect, subscribe, puback, disconnect] {
            let mut buf = BytesMut::new();
            V5.write(packet.clone(), &mut buf).unwrap();
            let read = V5.read_mut(&mut buf, 1 << 16);
            assert_eq!(read.as_ref().ok(), Some(&packet), "{read:?}");
        }
    }

    /// An MQTT 5 CONNECT refused on its fixed header whose protocol level
    /// comes in a later segment is still told why once the level comes.
    #[tokio::test]
    async fn a_split_connect_refused_on_its_fixed_header_is_told_why() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (stream, mut peer) = tokio::io::duplex(1024);
        let mut framed = Framed::new(stream, 1024);
        // 40 KiB announced, over the limit: the fixed header first.
        let head = [
            0x10, 0x80, 0xC0, 0x02, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60,
        ];
        peer.write_all(&head[..4]).await.unwrap();
        let mut read = Box::pin(framed.read_connect());
        let first = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(std::future::Future::poll(read.as_mut(), cx))
        })
        .await;
        assert!(first.is_pending(), "it waits for the protocol level");
        peer.write_all(&head[4..]).await.unwrap();
        let err = tokio::time::timeout(Duration::from_secs(5), read)
            .await
            .unwrap()
            .unwrap_err();
        assert_eq!(
            err.disconnect_reason(),
            Some(DisconnectReasonCode::PacketTooLarge)
        );
        let mut connack = [0u8; 5];
        peer.read_exact(&mut connack).await.unwrap();
        assert_eq!(connack, [0x20, 3, 0, 0x95, 0]);
    }

    #[test]
    fn protocol_level_of_connects() {
        // CONNECT, remaining length 16, "MQTT", level 5.
        let v5 = [0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 5, 2, 0, 60];
        assert_eq!(protocol_level(&v5), Some(5));
        // A two-byte remaining length, "MQIsdp", level 3.
        let v3 = [
            0x10, 0x80, 0x01, 0, 6, b'M', b'Q', b'I', b's', b'd', b'p', 3,
        ];
        assert_eq!(protocol_level(&v3), Some(3));
        assert_eq!(protocol_level(&[0x10, 16, 0, 4, b'M']), None);
    }

    #[test]
    fn a_disconnect_with_a_reason_is_framed_by_its_length() {
        let mut out = BytesMut::new();
        let bye = Version::V5
            .disconnect(DisconnectReasonCode::NotAuthorized)
            .unwrap();
        V5.write(with_disconnect_properties(bye), &mut out).unwrap();
        assert_eq!(out[0], 0xE0);
        assert_eq!(out[1] as usize, out.len() - 2, "remaining length");
        assert_eq!(out[2], 0x87);
        assert!(matches!(
            V5.read_mut(&mut out, 64).unwrap(),
            Packet::Disconnect(d, _) if d.reason_code == DisconnectReasonCode::NotAuthorized
        ));
        assert!(out.is_empty());
    }

    /// A DISCONNECT of Remaining Length 1: the property length is left out
    /// (MQTT 5 §3.14.2.2.1).
    #[test]
    fn a_disconnect_of_a_reason_code_alone_is_read() {
        let mut bytes = BytesMut::from(&[0xE0, 1, 0x04][..]);
        assert!(matches!(
            V5.read_mut(&mut bytes, 64).unwrap(),
            Packet::Disconnect(d, None)
                if d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage
        ));
        assert!(bytes.is_empty());
    }

    /// What a V5 `Framed` with the client's limit `peer_max` writes for `packets`.
    async fn written(peer_max: usize, packets: Vec<Packet>) -> Vec<u8> {
        let (stream, mut peer) = tokio::io::duplex(4096);
        let mut framed = Framed::new(stream, 1024);
        framed.version = Version::V5;
        framed.peer_max = peer_max;
        framed.write(packets).await.unwrap();
        drop(framed);
        let mut out = Vec::new();
        peer.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn nothing_larger_than_the_clients_maximum_is_written() {
        let bye = || {
            Version::V5
                .disconnect(DisconnectReasonCode::SessionTakenOver)
                .unwrap()
        };
        let ping = || Packet::PingResp(rumqttd::protocol::PingResp);
        // Within the limit: as always, the DISCONNECT with its reason named.
        let full = written(usize::MAX, vec![bye()]).await;
        assert!(full.len() > 3);
        assert_eq!(written(full.len(), vec![bye()]).await, full);
        // Over it: the reason code without the Reason String.
        assert_eq!(
            written(full.len() - 1, vec![bye(), ping()]).await,
            [0xE0, 0x01, 0x8E, 0xD0, 0x00]
        );
        // A SUBACK loses its Reason String; a packet still too large is
        // not written, the next one is.
        let suback = |codes: usize| {
            Packet::SubAck(
                rumqttd::protocol::SubAck {
                    pkid: 1,
                    return_codes: vec![SubscribeReasonCode::NotAuthorized; codes],
                },
                Some(rumqttd::protocol::SubAckProperties {
                    reason_string: Some("refused".into()),
                    user_properties: Vec::new(),
                }),
            )
        };
        assert_eq!(
            written(6, vec![suback(1)]).await,
            [0x90, 0x04, 0x00, 0x01, 0x00, 0x87]
        );
        assert_eq!(written(6, vec![suback(2), ping()]).await, [0xD0, 0x00]);
    }

    #[tokio::test]
    async fn a_connack_over_the_clients_maximum_ends_the_connection() {
        let (stream, _peer) = tokio::io::duplex(4096);
        let mut framed = Framed::new(stream, 1024);
        framed.version = Version::V5;
        framed.peer_max = 4;
        let connack = Packet::ConnAck(
            ConnAck {
                session_present: false,
                code: ConnectReturnCode::Success,
            },
            None,
        );
        assert!(matches!(
            framed.write(vec![connack]).await,
            Err(SessionError::Refused(_))
        ));
    }

    #[tokio::test]
    async fn a_cut_ends_a_write_the_client_is_slow_to_take() {
        let (stream, _peer) = tokio::io::duplex(64);
        let mut framed = Framed::new(stream, 1 << 20);
        framed.version = Version::V5;
        // The stall limit alone would wait an hour.
        framed.write_stall = Duration::from_secs(3600);
        let cut = framed.cut.clone();
        let big = Packet::Publish(Publish::new(b"t/1".to_vec(), vec![b'x'; 4096], false), None);
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            cut.cancel();
        });
        let written = tokio::time::timeout(Duration::from_secs(10), framed.write(vec![big])).await;
        assert!(
            matches!(written, Ok(Err(SessionError::Revoked))),
            "{written:?}"
        );
        // 64 bytes of the PUBLISH went out: the client's stream stops
        // inside it, and no DISCONNECT may follow.
        assert!(framed.torn);
        // A cut before a byte of the next write leaves the stream whole.
        let (stream, _peer) = tokio::io::duplex(64);
        let mut framed = Framed::new(stream, 1 << 20);
        framed.cut.cancel();
        let small = Packet::PingResp(rumqttd::protocol::PingResp);
        // Written whole or not at all, whichever the cut lets it.
        let _ = framed.write(vec![small]).await;
        assert!(!framed.torn);
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_fails_the_write() {
        let stall = Duration::from_millis(300);
        let (stream, mut peer) = tokio::io::duplex(1024);
        let mut framed = Framed::new(stream, 1 << 20);
        framed.version = Version::V5;
        framed.write_stall = stall;
        let big = || Packet::Publish(Publish::new(b"t/1".to_vec(), vec![b'x'; 4096], false), None);
        // A reader that keeps taking bytes, however slowly, is waited for:
        // the whole write takes several times the stall limit.
        let slow = tokio::spawn(async move {
            let mut chunk = [0u8; 512];
            let mut total = 0;
            while total < 4096 {
                tokio::time::sleep(stall / 3).await;
                total += peer.read(&mut chunk).await.unwrap();
            }
            peer
        });
        let started = std::time::Instant::now();
        framed.write(vec![big()]).await.unwrap();
        assert!(started.elapsed() > stall);
        let _peer = slow.await.unwrap();
        // One that stops reading is not.
        let started = std::time::Instant::now();
        assert!(matches!(
            framed.write(vec![big()]).await,
            Err(SessionError::WriteStalled(d)) if d == stall
        ));
        assert!(started.elapsed() >= stall);
    }

    #[test]
    fn routed_publishes_carry_their_topic_and_no_alias() {
        let mut a = TopicAliases::default();
        let mut publish = Publish::new("t/1", "x", false);
        let mut props = PublishProperties {
            topic_alias: Some(3),
            ..Default::default()
        };
        a.route(&mut publish, Some(&mut props)).unwrap();
        assert_eq!(props.topic_alias, None);
        let mut by_alias = Publish::new("", "x", false);
        let mut props = PublishProperties {
            topic_alias: Some(3),
            ..Default::default()
        };
        a.route(&mut by_alias, Some(&mut props)).unwrap();
        assert_eq!(&by_alias.topic[..], b"t/1");
        let mut props = PublishProperties {
            subscription_identifiers: vec![1],
            ..Default::default()
        };
        assert!(matches!(
            a.route(&mut publish, Some(&mut props)),
            Err(SessionError::Violation(
                DisconnectReasonCode::ProtocolError,
                _
            ))
        ));
    }

    #[test]
    fn aliases_resolve_to_the_topic_they_were_set_for() {
        let mut a = TopicAliases::default();
        assert_eq!(a.resolve("t/1", None).unwrap(), "t/1");
        assert_eq!(a.resolve("t/1", Some(1)).unwrap(), "t/1");
        assert_eq!(a.resolve("", Some(1)).unwrap(), "t/1");
        assert_eq!(a.resolve("t/2", Some(1)).unwrap(), "t/2");
        assert_eq!(a.resolve("", Some(1)).unwrap(), "t/2");
        assert!(matches!(
            a.resolve("", Some(2)),
            Err(SessionError::Violation(
                DisconnectReasonCode::ProtocolError,
                _
            ))
        ));
        // A refused topic is not kept: its alias comes to the empty topic,
        // which no grant covers; the others are as they were.
        let long = "x".repeat(30_000);
        assert_eq!(a.resolve(&long, Some(3)).unwrap(), long);
        a.refused(&long);
        assert_eq!(a.resolve("", Some(3)).unwrap(), "");
        assert_eq!(a.resolve("", Some(1)).unwrap(), "t/2");
        for bad in [0, TopicAliases::MAX + 1] {
            assert!(matches!(
                a.resolve("t/3", Some(bad)),
                Err(SessionError::Violation(
                    DisconnectReasonCode::TopicAliasInvalid,
                    _
                ))
            ));
        }
    }
}

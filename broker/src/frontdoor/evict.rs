//! The socket of a connection whose TLS handshake has not finished, which
//! the front door may close to make room for newer ones
//! (`max_pending_handshakes`).
//!
//! A connection told to close is closed if its client owes the next
//! message: one that never sends its ClientHello, or one that sent it and
//! never answers the server's flight. The first read [`Evictable`] is asked
//! for after that decides: it fails if it would wait and no bytes are
//! waiting in the socket (the runtime learns of readiness in batches, so a
//! read can wait on a socket the client has already written to). A client
//! that has sent something is the broker's to serve: it is spared, and not
//! closed for others again (its handshake timeout still holds).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// The error a connection closed for a newer one fails with.
#[derive(Debug)]
pub struct Evicted;

impl std::fmt::Display for Evicted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("closed for a newer connection: the client owed the next message")
    }
}

impl std::error::Error for Evicted {}

/// Whether `err` is the failure of an evicted connection.
pub fn is_evicted(err: &io::Error) -> bool {
    err.get_ref().is_some_and(|e| e.is::<Evicted>())
}

/// Whether bytes (or the end of the stream) are waiting to be read in `io`,
/// asked of the kernel, not of the runtime.
pub fn has_waiting<S: AsFd>(io: &S) -> bool {
    let mut byte = [MaybeUninit::uninit()];
    // The socket is non-blocking: an empty one answers WouldBlock.
    !matches!(
        socket2::SockRef::from(io).peek(&mut byte),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

/// The source a connection is counted under: an IPv4 address (an
/// IPv4-mapped IPv6 one as IPv4), or an IPv6 address's /64, which one
/// host is commonly given whole.
pub fn source_key(addr: IpAddr) -> IpAddr {
    match addr.to_canonical() {
        IpAddr::V6(v6) => {
            let mut octets = v6.octets();
            octets[8..].fill(0);
            IpAddr::V6(octets.into())
        }
        v4 => v4,
    }
}

/// Connections whose handshake has not finished, by source address and
/// connection id (ids rise in the order connections start), with when they
/// started.
#[derive(Default)]
pub struct PendingSet {
    by_source: HashMap<IpAddr, OfSource>,
    len: usize,
}

/// The pending connections of one source.
#[derive(Default)]
struct OfSource {
    by_id: BTreeMap<u64, Entry>,
    /// How many of them hold a bootstrap slot.
    bootstrap: usize,
}

struct Entry {
    started: Instant,
    closing: CancellationToken,
    /// Whether it holds a bootstrap slot (see [`PendingSet::make_room`]).
    bootstrap: bool,
}

/// How many connections a [`PendingSet`] counts before it picks one to
/// close, and how old that one must be.
#[derive(Debug, Clone, Copy)]
pub struct PendingLimit {
    pub max: usize,
    /// A handshake younger than this is never picked: a device's takes a
    /// few round trips, and one whose client stops talking is older.
    pub min_age: Duration,
}

impl PendingSet {
    /// Adds connection `id` from `source`, started `now`. When that makes
    /// more than `limit.max`, returns the token of the one to close: the
    /// oldest connection of the source with the most, so that a source that
    /// floods closes its own connections, not the slow handshakes of
    /// others; none if that one is younger than `limit.min_age`.
    /// `bootstrap`: whether the connection holds a bootstrap slot.
    pub fn insert(
        &mut self,
        source: IpAddr,
        id: u64,
        (closing, bootstrap): (CancellationToken, bool),
        now: Instant,
        limit: PendingLimit,
    ) -> Option<CancellationToken> {
        self.add(source, id, (closing, bootstrap), now);
        // Counted with the newcomer, which being the newest is never the
        // one chosen.
        if self.len > limit.max {
            self.pop_from_largest(now, limit.min_age)
        } else {
            None
        }
    }

    /// Adds connection `id` from `source`, started `now`, with no limit
    /// (see [`PendingSet::insert`] for the arguments).
    pub fn add(
        &mut self,
        source: IpAddr,
        id: u64,
        (closing, bootstrap): (CancellationToken, bool),
        now: Instant,
    ) {
        let of_source = self.by_source.entry(source).or_default();
        let entry = Entry {
            started: now,
            closing,
            bootstrap,
        };
        if of_source.by_id.insert(id, entry).is_none() {
            of_source.bootstrap += usize::from(bootstrap);
            self.len += 1;
        }
    }

    /// A listener is full and a new connection from `source` waits for a
    /// slot: the token of the pending connection to close for it, taken out
    /// of the set. Of the sources with a connection (holding a bootstrap
    /// slot, if `bootstrap`) at least `min_age` old, the one with the most
    /// connections, the newcomer counted with its own, and of it the oldest
    /// such one. None if no source has one that old. (Age counts from
    /// `insert`, or from the last [`PendingSet::touch`].)
    pub fn make_room(
        &mut self,
        source: IpAddr,
        now: Instant,
        min_age: Duration,
        bootstrap: bool,
    ) -> Option<CancellationToken> {
        let (from, id) = self
            .by_source
            .iter()
            .filter_map(|(&from, of)| {
                let (&id, _) = of.by_id.iter().find(|(_, e)| {
                    (e.bootstrap || !bootstrap)
                        && now.saturating_duration_since(e.started) >= min_age
                })?;
                let count = match bootstrap {
                    true => of.bootstrap,
                    false => of.by_id.len(),
                } + usize::from(from == source);
                Some((from, id, count))
            })
            .max_by_key(|&(_, id, count)| (count, Reverse(id)))
            .map(|(from, id, _)| (from, id))?;
        self.take(from, id)
    }

    /// A listener of `capacity` is full, and nothing is old enough for
    /// [`PendingSet::make_room`]: the token of the oldest entry of the
    /// source with the most, taken out of the set, if that source has more
    /// than its fair share (`capacity` divided among the sources, the
    /// newcomer's counted) and more than the newcomer's `source` has with
    /// the newcomer counted. So no source holds every slot by keeping its
    /// connections busy, and no source loses one to its own newcomer, to a
    /// source that would end up with more, or below its share (a client
    /// that only comes and goes, holding nothing, trims the others to
    /// their shares at most).
    pub fn share_fairly(&mut self, source: IpAddr, capacity: usize) -> Option<CancellationToken> {
        let theirs = self.by_source.get(&source).map_or(0, |of| of.by_id.len()) + 1;
        let sources = self.by_source.len() + usize::from(!self.by_source.contains_key(&source));
        let share = capacity.div_ceil(sources);
        let (from, of) = self.largest()?;
        if of.by_id.len() <= theirs.max(share) {
            return None;
        }
        let (&id, _) = of.by_id.first_key_value()?;
        self.take(from, id)
    }

    /// Counts connection `id` of `source` as started `now` again.
    pub fn touch(&mut self, source: IpAddr, id: u64, now: Instant) {
        if let Some(entry) = self
            .by_source
            .get_mut(&source)
            .and_then(|of| of.by_id.get_mut(&id))
        {
            entry.started = now;
        }
    }

    pub fn remove(&mut self, source: IpAddr, id: u64) {
        self.take(source, id);
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The oldest pending connection of the source with the most, taken
    /// out of the set, if it is at least `min_age` old.
    fn pop_from_largest(&mut self, now: Instant, min_age: Duration) -> Option<CancellationToken> {
        let (source, of_source) = self.largest()?;
        let (&id, oldest) = of_source.by_id.first_key_value()?;
        if now.saturating_duration_since(oldest.started) < min_age {
            return None;
        }
        self.take(source, id)
    }

    /// The source with the most connections and its connections; of
    /// sources alike in number, the one whose oldest is the oldest.
    fn largest(&self) -> Option<(IpAddr, &OfSource)> {
        self.by_source
            .iter()
            .max_by_key(|(_, of)| (of.by_id.len(), Reverse(of.by_id.keys().next().copied())))
            .map(|(&source, of)| (source, of))
    }

    /// Takes connection `id` of `source` out of the set; its token.
    fn take(&mut self, source: IpAddr, id: u64) -> Option<CancellationToken> {
        let of_source = self.by_source.get_mut(&source)?;
        let entry = of_source.by_id.remove(&id)?;
        of_source.bootstrap -= usize::from(entry.bootstrap);
        self.len -= 1;
        if of_source.by_id.is_empty() {
            self.by_source.remove(&source);
        }
        Some(entry.closing)
    }
}

pub struct Evictable<S> {
    io: S,
    /// Cancelled when newer connections need this one's place; `None` once
    /// the handshake is done.
    closing: Option<CancellationToken>,
}

impl<S> Evictable<S> {
    pub fn new(io: S, closing: CancellationToken) -> Self {
        Evictable {
            io,
            closing: Some(closing),
        }
    }

    /// The handshake is done: the connection is no longer closed for others.
    pub fn settle(&mut self) {
        self.closing = None;
    }
}

impl<S: AsyncRead + AsFd + Unpin> AsyncRead for Evictable<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.closing.as_ref().is_some_and(|c| c.is_cancelled()) {
            // The first read since it was told to close decides.
            if read.is_pending() && !has_waiting(&this.io) {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    Evicted,
                )));
            }
            // Spared: the client has sent something, and the rest of the
            // handshake runs its course.
            this.closing = None;
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Evictable<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (client.unwrap(), accepted.unwrap().0)
    }

    const T: Duration = Duration::from_secs(5);

    /// Whether `read` is still waiting after 50 ms.
    async fn still_waits(read: impl std::future::Future) -> bool {
        tokio::time::timeout(Duration::from_millis(50), read)
            .await
            .is_err()
    }

    #[test]
    fn an_ipv6_host_is_counted_by_its_64() {
        let key = |a: &str| source_key(a.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
        assert_ne!(key("192.0.2.1"), key("192.0.2.2"));
    }

    /// Over the limit, the oldest connection of the source with the most is
    /// the one closed; a source with fewer keeps its slow handshakes.
    #[test]
    fn a_flooding_source_closes_its_own_connections() {
        let (slow, flood): (IpAddr, IpAddr) = (
            "192.0.2.1".parse().unwrap(),
            "198.51.100.7".parse().unwrap(),
        );
        let mut set = PendingSet::default();
        let token = |_| CancellationToken::new();
        let now = Instant::now();
        let lim = |max| PendingLimit {
            max,
            min_age: Duration::ZERO,
        };
        let slow_one = CancellationToken::new();
        assert!(set
            .insert(slow, 1, (slow_one.clone(), false), now, lim(4))
            .is_none());
        let mut floods = Vec::new();
        for id in 2..5 {
            floods.push(token(id));
            assert!(set
                .insert(
                    flood,
                    id,
                    (floods.last().unwrap().clone(), false),
                    now,
                    lim(4)
                )
                .is_none());
        }
        // Full: each newer connection of the flood closes its oldest.
        for id in 5..20 {
            let victim = set
                .insert(flood, id, (token(id), false), now, lim(4))
                .expect("one to close");
            victim.cancel();
            assert!(!slow_one.is_cancelled(), "the slow handshake was closed");
        }
        assert!(floods.iter().all(|t| t.is_cancelled()));
        assert_eq!(set.len(), 4);
        // The source with the most loses its oldest, to a newcomer of
        // another source too.
        let victim = set
            .insert(slow, 20, (token(20), false), now, lim(4))
            .unwrap();
        victim.cancel();
        assert!(!slow_one.is_cancelled());
        set.remove(flood, 17);
        set.remove(flood, 18);
        set.remove(flood, 19);
        // 2 left: the slow source's (1 and 20), and none of the flood's.
        assert_eq!(set.len(), 2);
        let victim = set
            .insert(flood, 21, (token(21), false), now, lim(2))
            .unwrap();
        victim.cancel();
        assert!(slow_one.is_cancelled(), "the larger source's oldest goes");
        set.remove(slow, 20);
        set.remove(flood, 21);
        assert!(set.is_empty());

        // Two sources alike: the newcomer's, counted with it, is the larger.
        let (a, b) = (slow, flood);
        let first = CancellationToken::new();
        assert!(set
            .insert(a, 30, (first.clone(), false), now, lim(4))
            .is_none());
        assert!(set.insert(a, 31, (token(31), false), now, lim(4)).is_none());
        let b_oldest = CancellationToken::new();
        assert!(set
            .insert(b, 32, (b_oldest.clone(), false), now, lim(4))
            .is_none());
        assert!(set.insert(b, 33, (token(33), false), now, lim(4)).is_none());
        set.insert(b, 34, (token(34), false), now, lim(4))
            .unwrap()
            .cancel();
        assert!(b_oldest.is_cancelled() && !first.is_cancelled());

        // A handshake younger than the age floor is not picked: the limit
        // is exceeded instead, until it is old enough.
        let floor = PendingLimit {
            max: 1,
            min_age: Duration::from_secs(1),
        };
        let young = CancellationToken::new();
        let mut set = PendingSet::default();
        assert!(set
            .insert(flood, 40, (young.clone(), false), now, floor)
            .is_none());
        assert!(set
            .insert(flood, 41, (token(41), false), now, floor)
            .is_none());
        assert_eq!(set.len(), 2);
        let later = now + Duration::from_secs(2);
        set.insert(flood, 42, (token(42), false), later, floor)
            .expect("old enough")
            .cancel();
        assert!(young.is_cancelled());
    }

    /// An empty set, now, an age floor of 1 s, and a limit with it that is
    /// never reached.
    fn with_floor() -> (PendingSet, Instant, Duration, PendingLimit) {
        let floor = Duration::from_secs(1);
        let lim = PendingLimit {
            max: 100,
            min_age: floor,
        };
        (PendingSet::default(), Instant::now(), floor, lim)
    }

    /// A full listener makes room for a newcomer by closing the oldest
    /// pending connection of the source with the most (the newcomer counted
    /// with its own), of those that hold a bootstrap slot when that is the
    /// slot it needs, among sources whose oldest is old enough.
    #[test]
    fn a_full_listener_closes_a_pending_connection_for_a_newcomer() {
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "192.0.2.1".parse().unwrap(),
            "198.51.100.7".parse().unwrap(),
            "203.0.113.5".parse().unwrap(),
        );
        let (mut set, now, floor, lim) = with_floor();
        let mut add = |source, id, bootstrap, at| {
            let token = CancellationToken::new();
            assert!(set
                .insert(source, id, (token.clone(), bootstrap), at, lim)
                .is_none());
            token
        };
        let service_a: Vec<_> = (1..4).map(|id| add(a, id, false, now)).collect();
        let boot_b = add(b, 4, true, now);
        let boot_a = add(a, 5, true, now);
        let later = now + Duration::from_secs(2);
        // Five young ones of c, the most of any source.
        let young_c: Vec<_> = (6..11).map(|id| add(c, id, false, later)).collect();
        let newcomer = "192.0.2.200".parse().unwrap();
        assert!(
            set.make_room(newcomer, now, floor, false).is_none(),
            "too young"
        );
        set.make_room(newcomer, later, floor, false)
            .unwrap()
            .cancel();
        assert!(
            service_a[0].is_cancelled(),
            "the oldest of the largest old enough"
        );
        // One bootstrap connection each: the newcomer's source counts its own.
        set.make_room(b, later, floor, true).unwrap().cancel();
        assert!(boot_b.is_cancelled() && !boot_a.is_cancelled());
        set.make_room(b, later, floor, true).unwrap().cancel();
        assert!(boot_a.is_cancelled());
        assert!(set.make_room(b, later, floor, true).is_none(), "none left");
        assert_eq!(set.len(), 7);
        assert!(service_a[1..].iter().all(|t| !t.is_cancelled()));
        assert!(young_c.iter().all(|t| !t.is_cancelled()));
        for id in 2..4 {
            set.remove(a, id);
        }
        for id in 6..11 {
            set.remove(c, id);
        }
        assert!(set.is_empty());
    }

    /// A connection heard from within the age floor ([`PendingSet::touch`])
    /// is not the one closed for a newcomer; an older one of its source is.
    #[test]
    fn a_connection_heard_from_lately_is_not_the_one_closed() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let (mut set, now, floor, lim) = with_floor();
        let (first, second) = (CancellationToken::new(), CancellationToken::new());
        assert!(set.insert(a, 1, (first.clone(), false), now, lim).is_none());
        assert!(set
            .insert(a, 2, (second.clone(), false), now, lim)
            .is_none());
        let later = now + Duration::from_secs(2);
        set.touch(a, 1, later);
        set.make_room(a, later, floor, false).unwrap().cancel();
        assert!(second.is_cancelled() && !first.is_cancelled());
        assert!(set.make_room(a, later, floor, false).is_none());
        let idle = later + Duration::from_secs(2);
        set.make_room(a, idle, floor, false).unwrap().cancel();
        assert!(first.is_cancelled());
        assert!(set.is_empty());
    }

    /// Three sources, an empty set, and now.
    fn three_sources() -> ([IpAddr; 3], PendingSet, Instant) {
        let sources = ["192.0.2.1", "192.0.2.2", "192.0.2.3"].map(|s| s.parse().unwrap());
        (sources, PendingSet::default(), Instant::now())
    }

    /// With nothing old enough, a full listener still closes, for a
    /// newcomer, the oldest of the source with the most, while that source
    /// has more than its share and more than the newcomer's would: never
    /// for a newcomer of its own, nor down to fewer than the newcomer's
    /// source or its share.
    #[test]
    fn a_source_that_holds_more_than_its_share_gives_one_up() {
        let ([a, b, c], mut set, now) = three_sources();
        let tokens: Vec<_> = (0..4).map(|_| CancellationToken::new()).collect();
        for (id, token) in tokens.iter().enumerate() {
            set.add(a, id as u64, (token.clone(), false), now);
        }
        assert!(set.share_fairly(a, 4).is_none(), "its own newcomer");
        // b: 1 with its newcomer against 4, then 2 against 3 (shares of 2).
        set.share_fairly(b, 4).unwrap().cancel();
        assert!(tokens[0].is_cancelled() && !tokens[1].is_cancelled());
        set.add(b, 10, (CancellationToken::new(), false), now);
        set.share_fairly(b, 4).unwrap().cancel();
        assert!(tokens[1].is_cancelled());
        set.add(b, 11, (CancellationToken::new(), false), now);
        // 2 each: b's next newcomer would leave a with fewer.
        assert!(set.share_fairly(b, 4).is_none());
        assert_eq!(set.len(), 4);
        // c's newcomers come and go, holding nothing: a (2) and b (2) are
        // at their shares of 6 among three sources, and keep them.
        set.add(c, 20, (CancellationToken::new(), false), now);
        set.remove(c, 20);
        assert!(set.share_fairly(c, 6).is_none());
        // Of 4 among three sources, a share is 2: still none goes.
        assert!(set.share_fairly(c, 4).is_none());
    }

    /// A client that comes and goes holding nothing trims a busy source to
    /// its share and no further.
    #[test]
    fn newcomers_that_hold_nothing_trim_a_source_to_its_share_only() {
        let ([a, b, c], mut set, now) = three_sources();
        for id in 0..4 {
            set.add(a, id, (CancellationToken::new(), false), now);
        }
        for id in 10..12 {
            set.add(b, id, (CancellationToken::new(), false), now);
        }
        // 6 slots among a, b and c: shares of 2.
        let mut closed = 0;
        while let Some(token) = set.share_fairly(c, 6) {
            token.cancel();
            closed += 1;
        }
        assert_eq!(closed, 2);
        assert_eq!(set.len(), 4);
    }

    /// Told to close, a connection whose client owes the next message fails
    /// its read; one whose client has written is read as usual; a settled
    /// one is never closed.
    #[tokio::test]
    async fn only_a_connection_that_waits_for_its_client_is_closed() {
        let (_client, accepted) = pair().await;
        let closing = CancellationToken::new();
        let mut io = Evictable::new(accepted, closing.clone());
        let mut buf = [0u8; 8];
        let read = io.read(&mut buf);
        tokio::pin!(read);
        assert!(
            still_waits(&mut read).await,
            "a read with nothing sent returned"
        );
        closing.cancel();
        let err = tokio::time::timeout(T, read).await.unwrap().unwrap_err();
        assert!(is_evicted(&err), "{err}");

        let (mut client, accepted) = pair().await;
        let closing = CancellationToken::new();
        let mut io = Evictable::new(accepted, closing.clone());
        client.write_all(b"hello").await.unwrap();
        closing.cancel();
        let n = tokio::time::timeout(T, io.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"hello");
        // Spared, it waits for the client's next message as any other.
        let read = io.read(&mut buf);
        tokio::pin!(read);
        assert!(
            still_waits(&mut read).await,
            "a spared connection was closed"
        );
        client.write_all(b"again").await.unwrap();
        let n = tokio::time::timeout(T, read).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"again");

        let (mut client, accepted) = pair().await;
        let closing = CancellationToken::new();
        let mut io = Evictable::new(accepted, closing.clone());
        io.settle();
        closing.cancel();
        let read = io.read(&mut buf);
        tokio::pin!(read);
        assert!(
            still_waits(&mut read).await,
            "a settled connection was closed"
        );
        client.write_all(b"later").await.unwrap();
        let n = tokio::time::timeout(T, read).await.unwrap().unwrap();
        assert_eq!(&buf[..n], b"later");
    }
}

//! The TLS socket of a device connection, which holds the TLS 1.3 session
//! ticket back until the connection's first write (the CONNACK), so that
//! both go out in one system call and one TCP segment.
//!
//! rustls writes the NewSessionTicket as soon as it has read the client's
//! Finished, and tokio-rustls flushes it before the handshake future
//! returns: a write, a segment and a wake-up of the client of their own, for
//! a message the client only needs before it next connects. While the
//! handshake runs, [`TicketHold`] holds a write that is nothing but whole
//! TLS records of type application data (23) when it does not continue a
//! short write: in TLS 1.3 every server flight starts with a handshake
//! record (22), so that is the ticket, or an encrypted alert of a handshake
//! that failed, which [`TicketHold::release`] then writes. TLS 1.2 never
//! writes such a record before its handshake ends.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

/// TLS record content type of application data (RFC 8446 §5.1).
const APPLICATION_DATA: u8 = 23;
/// Type (1), legacy version (2), length (2).
const RECORD_HEADER: usize = 5;

pub struct TicketHold<S> {
    io: S,
    /// A write held back; empty once written.
    held: Vec<u8>,
    /// Until the handshake ends: whether to look for a write to hold.
    handshaking: bool,
    /// The last write went out in part, so the next continues it.
    after_short: bool,
    /// Called if what is held is never written: the ticket then does not
    /// count as given (see [`TicketHold::on_unsent`]).
    unsent: Option<Box<dyn FnOnce() + Send + Sync>>,
}

impl<S> Drop for TicketHold<S> {
    fn drop(&mut self) {
        if !self.held.is_empty() {
            if let Some(unsent) = self.unsent.take() {
                unsent();
            }
        }
    }
}

impl<S> TicketHold<S> {
    pub fn new(io: S) -> Self {
        TicketHold {
            io,
            held: Vec::new(),
            handshaking: true,
            after_short: false,
            unsent: None,
        }
    }

    /// Whether a write is held: after a handshake that ended, its ticket.
    pub fn holds(&self) -> bool {
        !self.held.is_empty()
    }

    /// Calls `unsent` when the connection ends with what is held still
    /// unwritten (in whole or in part): its client never got the ticket.
    pub fn on_unsent(&mut self, unsent: Box<dyn FnOnce() + Send + Sync>) {
        self.unsent = Some(unsent);
    }

    /// The handshake has ended: nothing more is held, and what is held goes
    /// out in front of the next write.
    pub fn handshake_done(&mut self) {
        self.handshaking = false;
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.io
    }
}

impl<S: AsyncWrite + Unpin> TicketHold<S> {
    /// Writes what is held now: the alert of a handshake that failed.
    pub async fn release(&mut self) -> io::Result<()> {
        self.handshaking = false;
        let held = std::mem::take(&mut self.held);
        self.io.write_all(&held).await?;
        self.io.flush().await
    }
}

/// Whether `bytes` are one or more whole TLS records, all application data.
fn only_application_data(bytes: &[u8]) -> bool {
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < RECORD_HEADER || rest[0] != APPLICATION_DATA {
            return false;
        }
        let len = RECORD_HEADER + u16::from_be_bytes([rest[3], rest[4]]) as usize;
        if rest.len() < len {
            return false;
        }
        rest = &rest[len..];
    }
    !bytes.is_empty()
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TicketHold<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let asked: usize = bufs.iter().map(|b| b.len()).sum();
        // A flight that starts with anything but application data (every
        // handshake flight) is not copied to be looked at.
        let first = bufs.iter().find_map(|b| b.first().copied());
        if this.handshaking
            && this.held.is_empty()
            && !this.after_short
            && first == Some(APPLICATION_DATA)
        {
            let mut bytes = Vec::with_capacity(asked);
            for b in bufs {
                bytes.extend_from_slice(b);
            }
            if only_application_data(&bytes) {
                this.held = bytes;
                return Poll::Ready(Ok(asked));
            }
        }
        // What is held goes first, in the same system call.
        while !this.held.is_empty() {
            let mut slices = Vec::with_capacity(bufs.len() + 1);
            slices.push(IoSlice::new(&this.held));
            slices.extend(bufs.iter().map(|b| IoSlice::new(b)));
            let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, &slices))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n >= this.held.len() {
                let theirs = n - this.held.len();
                this.held = Vec::new();
                if theirs > 0 || asked == 0 {
                    return Poll::Ready(Ok(theirs));
                }
            } else {
                this.held.drain(..n);
            }
        }
        let n = ready!(Pin::new(&mut this.io).poll_write_vectored(cx, bufs))?;
        this.after_short = n < asked;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TicketHold<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut r = vec![kind, 3, 3];
        r.extend_from_slice(&(body.len() as u16).to_be_bytes());
        r.extend_from_slice(body);
        r
    }

    #[tokio::test]
    async fn the_ticket_goes_out_with_the_first_write_after_the_handshake() {
        let mut s = TicketHold::new(Sink::default());
        let flight = [record(22, b"hello"), record(23, b"encrypted")].concat();
        s.write_all(&flight).await.unwrap();
        let ticket = [record(23, b"ticket"), record(23, b"ticket2")].concat();
        s.write_all(&ticket).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            s.io.calls,
            vec![flight.clone()],
            "the ticket went out alone"
        );
        s.handshake_done();
        let connack = record(23, b"connack");
        s.write_all(&connack).await.unwrap();
        assert_eq!(s.io.calls, vec![flight, [ticket, connack.clone()].concat()]);
        s.write_all(&connack).await.unwrap();
        assert_eq!(s.io.calls.len(), 3);
    }

    #[tokio::test]
    async fn an_alert_held_is_released_and_nothing_else_is_held() {
        let mut s = TicketHold::new(Sink::default());
        let alert = record(23, b"alert");
        s.write_all(&alert).await.unwrap();
        s.release().await.unwrap();
        assert_eq!(s.io.calls, vec![alert.clone()]);
        s.write_all(&alert).await.unwrap();
        assert_eq!(s.io.calls.len(), 2, "held after the handshake");
    }

    /// Records each write call it takes. Takes at most the next of
    /// `limits` bytes per call (all, once they run out); with `pend`,
    /// answers every other call `Pending` first.
    #[derive(Default)]
    struct Sink {
        calls: Vec<Vec<u8>>,
        limits: std::collections::VecDeque<usize>,
        pend: bool,
        pending: bool,
    }

    impl Sink {
        fn out(&self) -> Vec<u8> {
            self.calls.concat()
        }
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.pend {
                this.pending = !this.pending;
                if this.pending {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            }
            let mut room = this.limits.pop_front().unwrap_or(usize::MAX);
            let mut taken = Vec::new();
            for b in bufs {
                let take = b.len().min(room);
                taken.extend_from_slice(&b[..take]);
                room -= take;
            }
            let n = taken.len();
            this.calls.push(taken);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Short writes and `Pending` on the way: the rest of a flight cut at a
    /// record boundary is not taken for a ticket, and everything goes out
    /// once, in order.
    #[tokio::test]
    async fn short_writes_keep_every_byte_in_order() {
        let hello = record(22, b"hello");
        let rest = record(23, b"encrypted flight");
        let ticket = record(23, b"ticket");
        let connack = record(23, b"connack");
        let mut s = TicketHold::new(Sink {
            // The flight cut right after its first record; the held ticket
            // and the CONNACK in three pieces.
            limits: [hello.len(), usize::MAX, usize::MAX, 3, 4, 5].into(),
            pend: true,
            ..Sink::default()
        });
        s.write_all(&[hello.clone(), rest.clone()].concat())
            .await
            .unwrap();
        assert_eq!(
            s.io.out(),
            [hello.clone(), rest.clone()].concat(),
            "the flight's rest was held"
        );
        s.write_all(&ticket).await.unwrap();
        assert_eq!(
            s.io.out().len(),
            hello.len() + rest.len(),
            "the ticket went out alone"
        );
        s.handshake_done();
        s.write_all(&connack).await.unwrap();
        assert_eq!(s.io.out(), [hello, rest, ticket, connack].concat());
    }

    #[test]
    fn only_whole_application_data_records_are_held() {
        let app = record(23, b"x");
        assert!(only_application_data(&app));
        assert!(only_application_data(&[app.clone(), app.clone()].concat()));
        assert!(!only_application_data(&[]));
        assert!(!only_application_data(&app[..app.len() - 1]));
        assert!(!only_application_data(&[app.clone(), vec![23, 3]].concat()));
        assert!(!only_application_data(
            &[app.clone(), record(21, b"a")].concat()
        ));
        assert!(!only_application_data(&record(22, b"x")));
    }
}

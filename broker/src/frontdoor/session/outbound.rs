//! What the router sends one client, held to the limits the client
//! announced in its MQTT 5 CONNECT (§3.1.2.11.3, §3.1.2.11.4):
//!
//! - **Receive Maximum**: at most that many QoS 1 and 2 PUBLISHes
//!   unacknowledged at the client; the rest wait here in order until a
//!   PUBACK, a PUBCOMP or a refusing PUBREC frees a slot. A PUBLISH also
//!   waits while the client still holds its packet id: rumqttd frees an id
//!   at PUBREC and reuses ids 1 to 100, while the client holds a QoS 2 id
//!   until its PUBCOMP.
//! - **Maximum Packet Size**: a PUBLISH larger than that is discarded and
//!   treated as delivered, so the router is acknowledged for it.
//!
//! The router's acknowledgements must come back in the order it sent its
//! PUBLISHes (and its PUBRELs): rumqttd drops a link that acknowledges out
//! of order. The acknowledgements of the client and those given here for
//! discarded PUBLISHes are therefore queued in the router's order and
//! released in it. rumqttd takes only a successful PUBREC and always
//! follows it with a PUBREL: for a QoS 2 flow the client ended (a refusing
//! PUBREC) or never saw (a discarded PUBLISH), that PUBREL is completed
//! here and never reaches the client, which would take it as a protocol
//! error (MQTT 5 §4.3.3).
//!
//! No I/O here: each step says what goes to the client and what to the
//! router.

use std::collections::{HashMap, VecDeque};

use rumqttd::protocol::{
    Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, Publish,
    PublishProperties,
};
use tracing::debug;

use super::super::codec::publish_shape;
use super::SessionError;

/// The most QoS 1 and 2 PUBLISHes rumqttd's router leaves unacknowledged on
/// one link (`MAX_INFLIGHT` in its `router/iobufs.rs`): it sends no more
/// until one is acknowledged, so no more than this can ever wait here.
pub const ROUTER_INFLIGHT: usize = 100;

/// Where a packet goes.
#[derive(Debug)]
pub enum Out {
    Client(Packet),
    Router(Packet),
}

/// How far a QoS 1 or 2 PUBLISH sent to the client has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// QoS 1, waiting for its PUBACK.
    Ack,
    /// QoS 2, waiting for its PUBREC.
    Rec,
    /// QoS 2, PUBREC received, waiting for its PUBCOMP.
    Comp,
}

/// One entry of a list the router keeps in order: a packet id and whether
/// its answer is due (and so may go as soon as those before it have gone).
#[derive(Debug)]
struct InOrder {
    pkid: u16,
    qos: u8,
    due: bool,
}

/// One connection's outgoing flow control.
#[derive(Debug)]
pub struct Outbound {
    receive_max: usize,
    max_packet: usize,
    /// QoS 1 and 2 PUBLISHes at the client, by packet id: the quota used.
    sent: HashMap<u16, Stage>,
    /// QoS 1 and 2 PUBLISHes waiting for quota, in the router's order.
    held: VecDeque<(Publish, Option<PublishProperties>, u16, u8)>,
    /// The router's unacknowledged PUBLISHes, in its order; `due` once the
    /// client acknowledged it or it was discarded.
    router_publishes: VecDeque<InOrder>,
    /// The router's PUBRELs not yet completed, in its order; at most
    /// [`ROUTER_INFLIGHT`].
    router_pubrels: VecDeque<InOrder>,
    /// QoS 2 flows the client will not complete, discarded or refused by
    /// its PUBREC: the router's PUBREL for them is completed here.
    ended_qos2: Vec<u16>,
    /// PUBLISHes discarded for their size.
    pub discarded: u64,
    /// Answers of the client to nothing this connection sent, passed on to
    /// the router since it last sent anything: the router drops a link
    /// whose answer it did not expect (and takes, say, a PUBCOMP for a
    /// PUBREL of an earlier connection).
    pub unknown_acks: u64,
    /// Since when the client has owed an answer and given none: the time
    /// of its last answer, or of the PUBLISH that it owed first after it
    /// owed nothing ([`Outbound::owed_since`]).
    owed_since: Option<tokio::time::Instant>,
}

impl Outbound {
    /// Limits as announced: `receive_max` (MQTT 5 default 65,535) and the
    /// Maximum Packet Size (none: unlimited).
    pub fn new(receive_max: Option<u16>, max_packet: Option<u32>) -> Outbound {
        Outbound {
            receive_max: receive_max.map_or(usize::from(u16::MAX), usize::from),
            max_packet: max_packet.map_or(usize::MAX, |m| m as usize),
            sent: HashMap::new(),
            held: VecDeque::new(),
            router_publishes: VecDeque::new(),
            router_pubrels: VecDeque::new(),
            ended_qos2: Vec::new(),
            discarded: 0,
            unknown_acks: 0,
            owed_since: None,
        }
    }

    /// Whether the router waits for an answer the client owes to a
    /// PUBLISH (those held for the client's quota included). PUBRELs are
    /// left out: one of a flow the client ended on an earlier connection
    /// may come again on resuming, and a client rightly leaves it
    /// unanswered (their number is capped instead).
    fn owes(&self) -> bool {
        !self.router_publishes.is_empty()
    }

    /// Since when the client has given no answer while it owed one; `None`
    /// while it owes none. A client that stays silent past a limit from
    /// this pins what the router keeps for it (up to 4 MiB per filter,
    /// topics.md §2.3) and is closed.
    pub fn owed_since(&self) -> Option<tokio::time::Instant> {
        self.owed_since.filter(|_| self.owes())
    }

    /// The client owes one more answer: the clock starts if it owed none.
    fn owe(&mut self) {
        if !self.owes() {
            self.owed_since = Some(tokio::time::Instant::now());
        }
    }

    /// A packet the router sends the client.
    pub fn on_router(&mut self, packet: Packet, out: &mut Vec<Out>) -> Result<(), SessionError> {
        match packet {
            Packet::Publish(publish, properties) => {
                let shape = publish_shape(&publish, &properties);
                if shape.qos == 0 {
                    // Outside the quota (§4.9): it goes at once, if it fits.
                    if shape.size > self.max_packet {
                        self.discard(&publish, shape.size);
                    } else {
                        out.push(Out::Client(Packet::Publish(publish, properties)));
                    }
                    return Ok(());
                }
                if self.router_publishes.len() >= ROUTER_INFLIGHT {
                    return Err(SessionError::Router(format!(
                        "more than {ROUTER_INFLIGHT} unacknowledged publishes from the router"
                    )));
                }
                self.owe();
                self.router_publishes.push_back(InOrder {
                    pkid: shape.pkid,
                    qos: shape.qos,
                    due: false,
                });
                self.held
                    .push_back((publish, properties, shape.pkid, shape.qos));
                self.release(out);
            }
            Packet::PubRel(pubrel, properties) => {
                // With ids held back while the client holds them (see
                // `release`), the router has at most one PUBREL per id
                // outstanding here: more means a client that takes PUBRELs
                // and never completes them, which would grow this list.
                if self.router_pubrels.len() >= ROUTER_INFLIGHT {
                    return Err(SessionError::Quota(format!(
                        "more than {ROUTER_INFLIGHT} PUBRELs not completed by the client"
                    )));
                }
                let ours = match self.ended_qos2.iter().position(|p| *p == pubrel.pkid) {
                    Some(at) => {
                        self.ended_qos2.swap_remove(at);
                        true
                    }
                    None => false,
                };

                self.router_pubrels.push_back(InOrder {
                    pkid: pubrel.pkid,
                    qos: 2,
                    due: ours,
                });
                if ours {
                    self.flush(out);
                } else {
                    out.push(Out::Client(Packet::PubRel(pubrel, properties)));
                }
            }
            other => out.push(Out::Client(other)),
        }
        Ok(())
    }

    /// A packet the client sends that answers the router's: PUBACK, PUBREC,
    /// PUBCOMP. One this flow knows nothing of (a PUBCOMP for a PUBREL of
    /// an earlier connection, say) goes to the router as it is.
    pub fn on_client(&mut self, packet: Packet, out: &mut Vec<Out>) {
        let known = match &packet {
            Packet::PubAck(ack, _) => self.answer(ack.pkid, Stage::Ack, true),
            Packet::PubRec(rec, _) => {
                // A refusing PUBREC ends the flow (§4.3.3): no PUBREL may
                // follow. The router is told of a success all the same (it
                // knows no other), and its PUBREL is completed here.
                let refused = !matches!(
                    rec.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                );
                let known = self.answer(rec.pkid, Stage::Rec, refused);
                if known && refused {
                    self.ended_qos2.push(rec.pkid);
                }
                known
            }
            Packet::PubComp(comp, _) => {
                let known = self.answer(comp.pkid, Stage::Comp, true);
                let pubrel = self
                    .router_pubrels
                    .iter_mut()
                    .find(|p| p.pkid == comp.pkid && !p.due);
                match pubrel {
                    Some(p) => {
                        p.due = true;
                        true
                    }
                    None => known,
                }
            }
            _ => false,
        };
        if known {
            self.owed_since = Some(tokio::time::Instant::now());
            self.flush(out);
            self.release(out);
        } else {
            self.unknown_acks += 1;
            out.push(Out::Router(packet));
        }
    }

    /// Records the client's answer `stage` for `pkid`; `done` ends the flow
    /// and frees its slot. False if nothing waited for that answer.
    fn answer(&mut self, pkid: u16, stage: Stage, done: bool) -> bool {
        if self.sent.get(&pkid) != Some(&stage) {
            return false;
        }
        if stage != Stage::Comp {
            self.settle(pkid);
        }
        if done {
            self.sent.remove(&pkid);
        } else {
            self.sent.insert(pkid, Stage::Comp);
        }
        true
    }

    /// Marks the router's PUBLISH `pkid` answered.
    fn settle(&mut self, pkid: u16) {
        if let Some(p) = self
            .router_publishes
            .iter_mut()
            .find(|p| p.pkid == pkid && !p.due)
        {
            p.due = true;
        }
    }

    /// Sends held PUBLISHes, in order, while the client's quota allows and
    /// the next one's packet id is free at the client.
    fn release(&mut self, out: &mut Vec<Out>) {
        while self.sent.len() < self.receive_max {
            // The router reuses an id once it has the PUBREC; the client
            // holds it until its PUBCOMP (§4.3.3, §4.9). That PUBCOMP, not
            // the router, frees it.
            match self.held.front() {
                Some((_, _, pkid, _)) if !self.sent.contains_key(pkid) => {}
                _ => break,
            }
            let Some((publish, properties, pkid, qos)) = self.held.pop_front() else {
                break;
            };
            let size = publish_shape(&publish, &properties).size;
            if size > self.max_packet {
                // As if delivered and acknowledged (§3.1.2.11.4).
                self.discard(&publish, size);
                self.settle(pkid);
                if qos == 2 {
                    self.ended_qos2.push(pkid);
                }
                self.flush(out);
                continue;
            }
            let stage = if qos == 1 { Stage::Ack } else { Stage::Rec };
            self.sent.insert(pkid, stage);
            out.push(Out::Client(Packet::Publish(publish, properties)));
        }
    }

    /// Sends the router every answer now due, in its order.
    fn flush(&mut self, out: &mut Vec<Out>) {
        while self.router_publishes.front().is_some_and(|p| p.due) {
            let Some(p) = self.router_publishes.pop_front() else {
                break;
            };
            out.push(Out::Router(if p.qos == 1 {
                Packet::PubAck(
                    PubAck {
                        pkid: p.pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                )
            } else {
                Packet::PubRec(
                    PubRec {
                        pkid: p.pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                )
            }));
        }
        while self.router_pubrels.front().is_some_and(|p| p.due) {
            let Some(p) = self.router_pubrels.pop_front() else {
                break;
            };
            out.push(Out::Router(Packet::PubComp(
                PubComp {
                    pkid: p.pkid,
                    reason: PubCompReason::Success,
                },
                None,
            )));
        }
    }

    fn discard(&mut self, publish: &Publish, size: usize) {
        self.discarded += 1;
        debug!(
            topic = %crate::frontdoor::shown::shown_bytes(&publish.topic),
            size,
            limit = self.max_packet,
            "publish over the client's Maximum Packet Size discarded"
        );
    }

    /// QoS 1 and 2 PUBLISHes waiting for the client's quota.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rumqttd::protocol::v5::V5;
    use rumqttd::protocol::{Protocol, PubRel, PubRelReason};

    /// A PUBLISH as the router hands it over: QoS and packet id set.
    fn publish(qos: u8, pkid: u16, payload: usize) -> Packet {
        let topic = b"t/1";
        let mut body = vec![0, topic.len() as u8];
        body.extend(topic);
        if qos > 0 {
            body.extend(pkid.to_be_bytes());
        }
        body.push(0); // no properties
        body.extend(std::iter::repeat(b'x').take(payload));
        let mut frame = BytesMut::new();
        frame.extend_from_slice(&[0x30 | (qos << 1)]);
        let mut len = body.len();
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            frame.extend_from_slice(&[byte]);
            if len == 0 {
                break;
            }
        }
        frame.extend_from_slice(&body);
        V5.read_mut(&mut frame, 1 << 20).unwrap()
    }

    fn puback(pkid: u16) -> Packet {
        Packet::PubAck(
            PubAck {
                pkid,
                reason: PubAckReason::Success,
            },
            None,
        )
    }

    fn pubrec(pkid: u16, reason: PubRecReason) -> Packet {
        Packet::PubRec(PubRec { pkid, reason }, None)
    }

    fn pubrel(pkid: u16) -> Packet {
        Packet::PubRel(
            PubRel {
                pkid,
                reason: PubRelReason::Success,
            },
            None,
        )
    }

    fn pubcomp(pkid: u16) -> Packet {
        Packet::PubComp(
            PubComp {
                pkid,
                reason: PubCompReason::Success,
            },
            None,
        )
    }

    /// What went to the client (packet ids of PUBLISHes, 0 for QoS 0, and
    /// PUBRELs as 1000 + id) and to the router (PUBACK id, PUBREC 1000 +
    /// id, PUBCOMP 2000 + id).
    fn split(out: Vec<Out>) -> (Vec<u16>, Vec<u16>) {
        let (mut client, mut router) = (Vec::new(), Vec::new());
        for o in out {
            match o {
                Out::Client(Packet::Publish(p, props)) => {
                    client.push(publish_shape(&p, &props).pkid)
                }
                Out::Client(Packet::PubRel(r, _)) => client.push(1000 + r.pkid),
                Out::Router(Packet::PubAck(a, _)) => router.push(a.pkid),
                Out::Router(Packet::PubRec(r, _)) => router.push(1000 + r.pkid),
                Out::Router(Packet::PubComp(c, _)) => router.push(2000 + c.pkid),
                other => panic!("unexpected {other:?}"),
            }
        }
        (client, router)
    }

    fn step(
        flow: &mut Outbound,
        from_router: Vec<Packet>,
        from_client: Vec<Packet>,
    ) -> (Vec<u16>, Vec<u16>) {
        let mut out = Vec::new();
        for p in from_router {
            flow.on_router(p, &mut out).unwrap();
        }
        for p in from_client {
            flow.on_client(p, &mut out);
        }
        split(out)
    }

    #[test]
    fn publish_shape_reads_qos_packet_id_and_size() {
        let Packet::Publish(p, props) = publish(1, 7, 300) else {
            unreachable!()
        };
        let mut wire = BytesMut::new();
        V5.write(Packet::Publish(p.clone(), props.clone()), &mut wire)
            .unwrap();
        let shape = publish_shape(&p, &props);
        assert_eq!((shape.qos, shape.pkid, shape.size), (1, 7, wire.len()));
        let Packet::Publish(p, props) = publish(0, 0, 3) else {
            unreachable!()
        };
        assert_eq!(publish_shape(&p, &props).qos, 0);
    }

    /// The clock of a client's silence runs only while it owes an answer,
    /// and starts again at each answer it gives.
    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_client_owes_answers_from_its_last_one() {
        let second = std::time::Duration::from_secs(1);
        let mut flow = Outbound::new(Some(1), None);
        assert_eq!(flow.owed_since(), None);
        // QoS 0 is owed nothing.
        step(&mut flow, vec![publish(0, 0, 1)], vec![]);
        assert_eq!(flow.owed_since(), None);
        let t0 = tokio::time::Instant::now();
        step(&mut flow, vec![publish(1, 1, 1), publish(1, 2, 1)], vec![]);
        assert_eq!(flow.owed_since(), Some(t0));
        // More owed later does not move the clock; an answer does.
        tokio::time::advance(second).await;
        step(&mut flow, vec![publish(1, 3, 1)], vec![]);
        assert_eq!(flow.owed_since(), Some(t0));
        tokio::time::advance(second).await;
        step(&mut flow, vec![], vec![puback(1)]);
        assert_eq!(flow.owed_since(), Some(t0 + 2 * second));
        // An answer to nothing it was sent is no answer.
        tokio::time::advance(second).await;
        step(&mut flow, vec![], vec![puback(9)]);
        assert_eq!(flow.owed_since(), Some(t0 + 2 * second));
        step(&mut flow, vec![], vec![puback(2), puback(3)]);
        assert_eq!(flow.owed_since(), None, "nothing owed");
        // A PUBLISH too large for the client is owed nothing.
        let mut small = Outbound::new(None, Some(10));
        step(&mut small, vec![publish(1, 1, 100)], vec![]);
        assert_eq!(small.owed_since(), None);
    }

    #[test]
    fn receive_maximum_holds_the_rest_in_order() {
        let mut flow = Outbound::new(Some(2), None);
        let router = (1..=5).map(|i| publish(1, i, 1)).collect();
        assert_eq!(step(&mut flow, router, vec![]), (vec![1, 2], vec![]));
        assert_eq!(flow.held(), 3);
        // QoS 0 is outside the quota.
        assert_eq!(step(&mut flow, vec![publish(0, 0, 1)], vec![]).0, [0]);
        assert_eq!(step(&mut flow, vec![], vec![puback(1)]), (vec![3], vec![1]));
        assert_eq!(
            step(&mut flow, vec![], vec![puback(2), puback(3)]),
            (vec![4, 5], vec![2, 3])
        );
        assert_eq!(flow.held(), 0);
    }

    #[test]
    fn qos2_holds_its_slot_until_pubcomp() {
        let mut flow = Outbound::new(Some(1), None);
        let router = vec![publish(2, 1, 1), publish(2, 2, 1)];
        assert_eq!(step(&mut flow, router, vec![]), (vec![1], vec![]));
        // PUBREC goes to the router; the slot stays taken.
        assert_eq!(
            step(&mut flow, vec![], vec![pubrec(1, PubRecReason::Success)]),
            (vec![], vec![1001])
        );
        assert_eq!(
            step(&mut flow, vec![pubrel(1)], vec![]),
            (vec![1001], vec![])
        );
        assert_eq!(
            step(&mut flow, vec![], vec![pubcomp(1)]),
            (vec![2], vec![2001])
        );
        // A refusing PUBREC ends the flow and frees the slot; the router
        // hears of a success, and its PUBREL is completed here, never
        // forwarded: the client ended the flow (§4.3.3).
        assert_eq!(
            step(
                &mut flow,
                vec![publish(1, 3, 1)],
                vec![pubrec(2, PubRecReason::UnspecifiedError)]
            ),
            (vec![3], vec![1002])
        );
        assert_eq!(
            step(&mut flow, vec![pubrel(2)], vec![]),
            (vec![], vec![2002])
        );
        // The flow goes on: 3's PUBACK reaches the router.
        assert_eq!(step(&mut flow, vec![], vec![puback(3)]), (vec![], vec![3]));
    }

    #[test]
    fn a_refused_flows_pubrel_waits_its_turn_and_is_not_forwarded() {
        let mut flow = Outbound::new(Some(2), None);
        let router = vec![publish(2, 1, 1), publish(2, 2, 1)];
        assert_eq!(step(&mut flow, router, vec![]), (vec![1, 2], vec![]));
        // 1 is accepted, its PUBREL forwarded and not yet completed; 2 is
        // refused.
        assert_eq!(
            step(
                &mut flow,
                vec![],
                vec![
                    pubrec(1, PubRecReason::Success),
                    pubrec(2, PubRecReason::ImplementationSpecificError)
                ]
            ),
            (vec![], vec![1001, 1002])
        );
        // The router's PUBCOMPs go in its order: 2's waits for 1's.
        assert_eq!(
            step(&mut flow, vec![pubrel(1), pubrel(2)], vec![]),
            (vec![1001], vec![])
        );
        assert_eq!(
            step(&mut flow, vec![], vec![pubcomp(1)]),
            (vec![], vec![2001, 2002])
        );
    }

    #[test]
    fn an_id_the_client_still_holds_is_not_reused() {
        let mut flow = Outbound::new(None, None);
        // 1 is received, its PUBREL sent; the client has not completed it.
        assert_eq!(
            step(&mut flow, vec![publish(2, 1, 1)], vec![]),
            (vec![1], vec![])
        );
        assert_eq!(
            step(&mut flow, vec![], vec![pubrec(1, PubRecReason::Success)]),
            (vec![], vec![1001])
        );
        assert_eq!(
            step(&mut flow, vec![pubrel(1)], vec![]),
            (vec![1001], vec![])
        );
        // The router, which freed 1 at PUBREC, uses it again: that one and
        // those behind it wait; QoS 0 does not.
        let router = vec![publish(1, 1, 1), publish(1, 2, 1), publish(0, 0, 1)];
        assert_eq!(step(&mut flow, router, vec![]), (vec![0], vec![]));
        assert_eq!(flow.held(), 2);
        // The PUBCOMP frees the id.
        assert_eq!(
            step(&mut flow, vec![], vec![pubcomp(1)]),
            (vec![1, 2], vec![2001])
        );
        assert_eq!(
            step(&mut flow, vec![], vec![puback(1), puback(2)]),
            (vec![], vec![1, 2])
        );
    }

    #[test]
    fn pubrels_the_client_never_completes_are_capped() {
        let mut flow = Outbound::new(None, None);
        let mut out = Vec::new();
        // PUBRELs of an earlier connection, which this flow knows nothing
        // of, all forwarded and none completed.
        for i in 1..=ROUTER_INFLIGHT as u16 {
            flow.on_router(pubrel(i), &mut out).unwrap();
        }
        assert!(matches!(
            flow.on_router(pubrel(1), &mut out),
            Err(SessionError::Quota(_))
        ));
    }

    #[test]
    fn oversized_publishes_are_discarded_and_acknowledged_in_order() {
        let mut flow = Outbound::new(None, Some(64));
        // 1 is sent, 2 too large, 3 sent: the router hears of 2 only once
        // 1 is acknowledged.
        let router = vec![publish(1, 1, 1), publish(1, 2, 100), publish(1, 3, 1)];
        assert_eq!(step(&mut flow, router, vec![]), (vec![1, 3], vec![]));
        assert_eq!(flow.discarded, 1);
        assert_eq!(
            step(&mut flow, vec![], vec![puback(1)]),
            (vec![], vec![1, 2])
        );
        assert_eq!(step(&mut flow, vec![], vec![puback(3)]), (vec![], vec![3]));
        // Nothing outstanding: a discard is acknowledged at once; QoS 0 is
        // just dropped.
        assert_eq!(
            step(
                &mut flow,
                vec![publish(1, 4, 100), publish(0, 0, 100)],
                vec![]
            ),
            (vec![], vec![4])
        );
        assert_eq!(flow.discarded, 3);
        // QoS 2: PUBREC for the router, then its PUBREL completed here.
        assert_eq!(
            step(&mut flow, vec![publish(2, 5, 100)], vec![]),
            (vec![], vec![1005])
        );
        assert_eq!(
            step(&mut flow, vec![pubrel(5)], vec![]),
            (vec![], vec![2005])
        );
    }

    #[test]
    fn discarded_publishes_do_not_take_quota() {
        let mut flow = Outbound::new(Some(1), Some(64));
        let router = vec![publish(1, 1, 1), publish(1, 2, 100), publish(1, 3, 1)];
        assert_eq!(step(&mut flow, router, vec![]), (vec![1], vec![]));
        assert_eq!(
            step(&mut flow, vec![], vec![puback(1)]),
            (vec![3], vec![1, 2])
        );
    }

    #[test]
    fn unknown_answers_go_to_the_router_unchanged() {
        let mut flow = Outbound::new(Some(1), None);
        assert_eq!(
            step(&mut flow, vec![], vec![puback(9), pubcomp(8)]),
            (vec![], vec![9, 2008])
        );
        // A PUBREL of an earlier connection, completed by the client.
        assert_eq!(
            step(&mut flow, vec![pubrel(7)], vec![]),
            (vec![1007], vec![])
        );
        assert_eq!(
            step(&mut flow, vec![], vec![pubcomp(7)]),
            (vec![], vec![2007])
        );
    }

    #[test]
    fn more_than_the_router_inflight_is_an_error() {
        let mut flow = Outbound::new(Some(1), None);
        let mut out = Vec::new();
        for i in 1..=ROUTER_INFLIGHT as u16 {
            flow.on_router(publish(1, i, 1), &mut out).unwrap();
        }
        assert_eq!(flow.held(), ROUTER_INFLIGHT - 1);
        assert!(flow.on_router(publish(1, 101, 1), &mut out).is_err());
    }
}

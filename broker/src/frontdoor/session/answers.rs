//! The answers to a client's QoS 1 and 2 PUBLISHes, kept in the order it
//! sent them: PUBACKs in the order of their PUBLISHes, and PUBRECs in
//! theirs (MQTT 3.1.1 §4.6, MQTT 5 §4.6).
//!
//! A PUBLISH the front door lets through is answered when the router says
//! it has it (its PUBACK, or for QoS 2 its PUBCOMP), a little later; one
//! the front door refuses is answered here (MQTT 5: reason code 0x87). A
//! refusal therefore waits behind the router's answers to the PUBLISHes of
//! its QoS that came before it, and goes right after them. The router
//! answers a link's PUBLISHes in the order it took them.
//!
//! No I/O here: the session writes what each step returns.

use std::collections::VecDeque;

use rumqttd::protocol::{DisconnectReasonCode, Packet};

use super::super::codec::Version;
use super::{SessionError, RECEIVE_MAXIMUM};

/// One PUBLISH not yet answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// Handed to the router, which answers it.
    Router,
    /// Refused; its packet id, to be answered once those before it are.
    Refused(u16),
}

/// The client's QoS 1 and 2 PUBLISHes not yet answered, one list per QoS.
/// A list never starts with a refusal: those are answered as soon as they
/// come first.
#[derive(Debug, Default)]
pub struct Answers {
    qos1: VecDeque<Waiting>,
    qos2: VecDeque<Waiting>,
}

impl Answers {
    fn list(&mut self, qos: u8) -> &mut VecDeque<Waiting> {
        if qos == 2 {
            &mut self.qos2
        } else {
            &mut self.qos1
        }
    }

    /// A PUBLISH of `qos` (1 or 2) went to the router.
    pub fn passed(&mut self, qos: u8) {
        if qos > 0 {
            self.list(qos).push_back(Waiting::Router);
        }
    }

    /// A PUBLISH of `qos` under `pkid` was refused. `Ok(true)`: answer it
    /// now; `Ok(false)`: it waits, and [`Answers::answered`] gives it.
    /// More refusals waiting than the Receive Maximum the broker announced
    /// means a client with more unanswered PUBLISHes than that (MQTT 5
    /// §3.3.4: 0x93).
    pub fn refused(&mut self, qos: u8, pkid: u16) -> Result<bool, SessionError> {
        let list = self.list(qos);
        if list.is_empty() {
            return Ok(true);
        }
        let waiting = list
            .iter()
            .filter(|w| matches!(w, Waiting::Refused(_)))
            .count();
        if waiting >= usize::from(RECEIVE_MAXIMUM) {
            return Err(SessionError::Violation(
                DisconnectReasonCode::ReceiveMaximumExceeded,
                format!("more than {RECEIVE_MAXIMUM} PUBLISHes unanswered"),
            ));
        }
        list.push_back(Waiting::Refused(pkid));
        Ok(false)
    }

    /// The router answered the first PUBLISH of `qos` it was given; the
    /// packet ids of the refusals that now come first, in order, to be
    /// answered right after it.
    pub fn answered(&mut self, qos: u8) -> Vec<u16> {
        let list = self.list(qos);
        // (An answer with nothing waiting cannot come from the router,
        // which answers only what it was given; it is passed on as it is.)
        if list.front() == Some(&Waiting::Router) {
            list.pop_front();
        }
        let mut due = Vec::new();
        while let Some(Waiting::Refused(pkid)) = list.front().copied() {
            list.pop_front();
            due.push(pkid);
        }
        due
    }

    /// [`Answers::answered`], as the refusals `version` writes for them.
    pub fn refusals_answered(&mut self, version: Version, qos: u8) -> impl Iterator<Item = Packet> {
        self.answered(qos)
            .into_iter()
            .filter_map(move |pkid| version.refused_publish(qos, pkid))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_with_nothing_before_it_is_answered_at_once() {
        let mut answers = Answers::default();
        assert!(answers.refused(1, 7).unwrap());
        assert!(answers.refused(2, 8).unwrap());
    }

    #[test]
    fn a_refusal_waits_for_the_router_s_answers_before_it() {
        let mut answers = Answers::default();
        answers.passed(1);
        answers.passed(1);
        assert!(!answers.refused(1, 3).unwrap());
        answers.passed(1);
        assert!(!answers.refused(1, 5).unwrap());
        assert!(!answers.refused(1, 6).unwrap());
        // A QoS 2 refusal does not wait for QoS 1 answers.
        assert!(answers.refused(2, 9).unwrap());
        assert_eq!(answers.answered(1), Vec::<u16>::new());
        assert_eq!(answers.answered(1), vec![3]);
        assert_eq!(answers.answered(1), vec![5, 6]);
        assert!(answers.refused(1, 10).unwrap());
    }

    #[test]
    fn qos_2_refusals_wait_for_the_router_s_pubcomps() {
        let mut answers = Answers::default();
        answers.passed(2);
        answers.passed(0);
        assert!(!answers.refused(2, 4).unwrap());
        assert!(answers.refused(1, 5).unwrap());
        assert_eq!(answers.answered(2), vec![4]);
        assert_eq!(answers.answered(2), Vec::<u16>::new());
    }

    #[test]
    fn more_refusals_waiting_than_the_receive_maximum_are_a_violation() {
        let mut answers = Answers::default();
        answers.passed(1);
        for pkid in 0..RECEIVE_MAXIMUM {
            assert!(!answers.refused(1, pkid).unwrap());
        }
        let err = answers.refused(1, 999).unwrap_err();
        assert_eq!(
            err.disconnect_reason(),
            Some(DisconnectReasonCode::ReceiveMaximumExceeded)
        );
    }
}

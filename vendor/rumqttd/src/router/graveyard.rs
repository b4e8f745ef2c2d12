use std::collections::{HashMap, HashSet, VecDeque};

use super::{
    scheduler::{PauseReason, Tracker},
    ConnectionEvents,
};

pub struct Graveyard {
    connections: HashMap<String, SavedState>,
}

impl Graveyard {
    pub fn new() -> Graveyard {
        Graveyard {
            connections: HashMap::new(),
        }
    }

    /// Add a new connection.
    /// Return tracker of previous connection if connection id already exists
    pub fn retrieve(&mut self, id: &str) -> Option<SavedState> {
        self.connections.remove(id)
    }

    /// fleetshift: the saved persistent sessions.
    pub fn sessions(&self) -> usize {
        self.connections.len()
    }

    /// fleetshift: the trackers of the saved persistent sessions, whose
    /// data requests still read their filters' logs.
    pub fn saved_trackers(&self) -> impl Iterator<Item = &Tracker> {
        self.connections
            .values()
            .filter_map(|saved| saved.session_state.as_ref())
            .map(|session| &session.tracker)
    }

    /// Save connection tracker
    pub fn save_state(
        &mut self,
        mut tracker: Tracker,
        subscriptions: HashSet<String>,
        subscription_ids: HashMap<String, usize>,
        metrics: ConnectionEvents,
        unacked_pubrels: VecDeque<u16>,
    ) {
        tracker.pause(PauseReason::Busy);
        let id = tracker.id.clone();

        let session_state = SessionState {
            tracker,
            subscriptions,
            subscription_ids,
            unacked_pubrels,
        };

        self.connections.insert(
            id,
            SavedState {
                session_state: Some(session_state),
                metrics,
            },
        );
    }

    /// Save only metrics for connection
    pub fn save_metrics(&mut self, id: String, metrics: ConnectionEvents) {
        self.connections.insert(
            id,
            SavedState {
                session_state: None,
                metrics,
            },
        );
    }
}

#[derive(Debug)]
pub struct SavedState {
    pub session_state: Option<SessionState>,
    pub metrics: ConnectionEvents,
}

#[derive(Debug)]
pub struct SessionState {
    pub tracker: Tracker,
    pub subscriptions: HashSet<String>,
    /// fleetshift: the MQTT 5 Subscription Identifiers of its filters,
    /// which a resumed session delivers with (MQTT 5 §3.8.2.1.2)
    pub subscription_ids: HashMap<String, usize>,
    // used for pubrel in qos2
    pub unacked_pubrels: VecDeque<u16>,
}

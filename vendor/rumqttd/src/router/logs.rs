use super::Ack;
use slab::Slab;
use tracing::{info, trace};

use crate::protocol::{
    has_wildcards, matches, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubRec, PubRel, Publish,
    PublishProperties, SubAck, UnsubAck,
};
use crate::router::{DataRequest, FilterIdx, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig, Topic};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

type PubWithProp = (Publish, Option<PublishProperties>);

#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    pub timestamp: Instant,
}

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
        }
    }
}

// TODO: remove this from here
impl Storage for PublishData {
    /// fleetshift: the properties are counted too (they were not), so that
    /// a log's byte limit bounds what an MQTT 5 publisher can make the
    /// router hold: 250 KB of User Property counted as a few bytes.
    fn size(&self) -> usize {
        crate::protocol::publish_size(&self.publish, self.properties.as_ref())
    }
}

/// fleetshift: at most this many topics' matching filters are cached
/// (`DataLog::matches`); past it, the cache starts again empty.
pub const PUBLISH_FILTERS_MAX: usize = 1 << 16;

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: Slab<Data<PublishData>>,
    /// Map of subscription filter name to filter index
    filter_indexes: HashMap<Filter, FilterIdx>,
    retained_publishes: HashMap<Topic, PublishData>,
    /// List of filters associated with a topic
    publish_filters: HashMap<Topic, Vec<FilterIdx>>,
    /// fleetshift: the filters with a `+` or `#`, which a new topic is
    /// matched against one by one. Any other filter matches only the topic
    /// equal to it (and no topic starting with `$`), found in
    /// `filter_indexes` at once: a new topic was matched against every
    /// filter, and a new filter against every topic seen, which grew with
    /// the square of a fleet's connections.
    wildcard_filters: Vec<(Filter, FilterIdx)>,
    /// fleetshift: bytes appended to the logs since they were last
    /// trimmed (`trim_read`), each entry counted with `ENTRY_OVERHEAD`.
    appended: usize,
    /// fleetshift: the bytes (topic and payload) the logs held at the last
    /// trim, plus those appended since; read by the broker's metrics.
    held: Arc<AtomicU64>,
    /// fleetshift: the filters held (`native`), read by the broker's
    /// metrics.
    filter_count: Arc<AtomicU64>,
    /// fleetshift: messages readers never got because the log dropped them
    /// first (a read cursor that jumped), read by the broker's metrics.
    pub(crate) skipped: Arc<AtomicU64>,
    /// fleetshift: a subscription ended since the last trim, so a filter
    /// may have lost its last reader.
    readers_left: bool,
    /// fleetshift: filters made since the last trim.
    created: usize,
    /// fleetshift: a reader read since the last trim, so one that was
    /// behind may have caught up.
    read_since_trim: std::cell::Cell<bool>,
}

/// fleetshift: the filters made after which the logs are trimmed, at
/// least; a trim also waits for as many as half the filters held, so that
/// its cost stays a small share of the subscriptions'.
const TRIM_MIN_FILTERS: usize = 1_024;

/// fleetshift: what an entry of a log costs beyond its topic and payload
/// (the `PublishData`, its place in a segment), counted towards a trim.
const ENTRY_OVERHEAD: usize = 256;

/// fleetshift: the bytes appended after which the logs are trimmed, at
/// least; a trim also waits for `TRIM_PER_READER` bytes per filter and per
/// reader it looks at, so that its cost stays a small share of the
/// appends' however large the fleet.
const TRIM_MIN_BYTES: usize = 1 << 20;
pub(crate) const TRIM_PER_READER: usize = 256;

impl DataLog {
    pub fn new(config: RouterConfig) -> io::Result<DataLog> {
        let mut native = Slab::new();
        let mut filter_indexes = HashMap::new();
        let retained_publishes = HashMap::new();
        let publish_filters = HashMap::new();
        let mut wildcard_filters = Vec::new();

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                let data = Data::new(&filter, &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                if has_wildcards(&filter) {
                    wildcard_filters.push((filter.clone(), idx));
                }
                filter_indexes.insert(filter, idx);
            }
        }

        Ok(DataLog {
            config,
            native,
            publish_filters,
            filter_indexes,
            retained_publishes,
            wildcard_filters,
            appended: 0,
            held: Arc::default(),
            filter_count: Arc::default(),
            skipped: Arc::default(),
            readers_left: false,
            created: 0,
            read_since_trim: std::cell::Cell::new(false),
        })
    }

    /// fleetshift: counts an entry about to be appended towards the next
    /// trim.
    pub fn note_appended(&mut self, data: &PublishData) {
        self.appended += data.size() + ENTRY_OVERHEAD;
        self.held.fetch_add(data.size() as u64, Ordering::Relaxed);
    }

    /// fleetshift: the bytes the logs hold, as of the last trim plus what
    /// was appended since (retention by size in between is not counted).
    pub fn held_bytes(&self) -> Arc<AtomicU64> {
        self.held.clone()
    }

    /// fleetshift: whether a trim may drop something: something was
    /// appended, a subscription ended or a filter was made, or the logs
    /// held something at the last trim and a reader has read since (one
    /// then behind may have caught up). A reader that stays behind, a saved
    /// session that never returns, say, does not wake the router every
    /// second.
    pub fn trim_pending(&self) -> bool {
        self.appended > 0
            || self.readers_left
            || self.created > 0
            || (self.held.load(Ordering::Relaxed) > 0 && self.read_since_trim.get())
    }

    /// fleetshift: a subscription ended; the next trim looks for filters
    /// left with no reader.
    pub fn note_readers_left(&mut self) {
        self.readers_left = true;
    }

    /// fleetshift: the number of filters held, kept up to date.
    pub fn filter_count(&self) -> Arc<AtomicU64> {
        self.filter_count.clone()
    }

    /// fleetshift: the messages readers skipped, kept up to date.
    pub fn skipped(&self) -> Arc<AtomicU64> {
        self.skipped.clone()
    }

    /// fleetshift: whether enough was appended, or enough filters made,
    /// since the last trim for one that looks at `readers` readers'
    /// cursors. Filters count too: subscriptions made and left without a
    /// message published would otherwise wait for an idle second, which a
    /// busy router may never have.
    pub fn trim_due(&self, readers: usize) -> bool {
        self.appended >= TRIM_MIN_BYTES.max((readers + self.native.len()) * TRIM_PER_READER)
            || self.created >= TRIM_MIN_FILTERS.max(self.native.len() / 2)
    }

    /// fleetshift: drops from each filter's log what all its readers have
    /// read. `upto` holds, per filter, the lowest absolute offset a reader
    /// of it (a live subscription, a saved session, an unacknowledged
    /// message of a session that keeps state, a shared group) will read
    /// next. A filter it does not name has no reader: it goes, log and
    /// all, and out of the topics it was matched to (a new subscription to
    /// it starts a new log, at whose end it would have started anyway).
    /// Otherwise the router kept a filter for every topic anyone ever
    /// subscribed to, or published to with no subscriber (its dynamic
    /// filters), any client id's own topics among them. Returns the bytes
    /// dropped.
    pub fn trim_read(&mut self, upto: &HashMap<FilterIdx, u64>) -> u64 {
        self.appended = 0;
        self.readers_left = false;
        self.created = 0;
        self.read_since_trim.set(false);
        let (mut dropped, mut held) = (0, 0);
        let mut gone = std::collections::HashSet::new();
        for (idx, data) in self.native.iter_mut() {
            match upto.get(&idx) {
                Some(&offset) => {
                    dropped += data.log.trim_read(offset);
                    held += data.log.size();
                }
                None => {
                    gone.insert(idx);
                }
            }
        }
        if !gone.is_empty() {
            for &idx in &gone {
                let data = self.native.remove(idx);
                dropped += data.log.size();
                self.filter_indexes.remove(&data.filter);
            }
            self.wildcard_filters.retain(|(_, idx)| !gone.contains(idx));
            self.publish_filters.retain(|_, idxs| {
                idxs.retain(|idx| !gone.contains(idx));
                !idxs.is_empty()
            });
        }
        self.held.store(held, Ordering::Relaxed);
        self.filter_count
            .store(self.native.len() as u64, Ordering::Relaxed);
        dropped
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    /// fleetshift: `log` is the filter whose log the request reads,
    /// `filter` the subscription's own (they differ for a shared
    /// subscription, `$share/{group}/{log}`); a connection subscribed to
    /// both waits on one log with two requests.
    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        log: &Filter,
        filter: &Filter,
    ) -> Option<DataRequest> {
        let data = self
            .native
            .get_mut(*self.filter_indexes.get(log)?)
            .unwrap();
        let waiters = data.waiters.get_mut();

        waiters
            .iter()
            .position(|(conn_id, request)| *conn_id == id && request.filter == *filter)
            .and_then(|index| {
                waiters
                    .swap_remove_back(index)
                    .map(|(_, data_req)| data_req)
            })
    }

    // TODO: Currently returning a Option<Vec> instead of Option<&Vec> due to Rust borrow checker
    // limitation
    pub fn matches(&mut self, topic: &str) -> Option<Vec<usize>> {
        match &self.publish_filters.get(topic) {
            Some(v) => Some(v.to_vec()),
            None => {
                // fleetshift: the filter equal to the topic, then the
                // wildcard filters, instead of every filter.
                let mut v: Vec<usize> = self
                    .wildcard_filters
                    .iter()
                    .filter(|(filter, _)| matches(topic, filter))
                    .map(|(_, filter_idx)| *filter_idx)
                    .collect();
                if let Some(&idx) = self.filter_indexes.get(topic) {
                    if !topic.starts_with('$') && !v.contains(&idx) {
                        v.push(idx);
                    }
                }

                if !v.is_empty() {
                    // fleetshift: the cache is bounded. Every topic anyone
                    // published to a filter with a reader stayed in it, so
                    // clients with ever new ids (one topic each, matched by
                    // the manager's wildcard filters) grew it for good.
                    if self.publish_filters.len() >= PUBLISH_FILTERS_MAX {
                        self.publish_filters.clear();
                    }
                    self.publish_filters.insert(topic.to_owned(), v.clone());
                }

                Some(v)
            }
        }
    }

    /// fleetshift: topics whose matching filters are cached.
    pub fn topics_cached(&self) -> usize {
        self.publish_filters.len()
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let publish_filters = &mut self.publish_filters;
        let filter_indexes = &mut self.filter_indexes;

        let (filter_idx, data) = match filter_indexes.get(filter) {
            Some(idx) => (*idx, self.native.get(*idx).unwrap()),
            None => {
                let data = Data::new(filter, &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(filter.to_owned(), idx);
                self.filter_count.fetch_add(1, Ordering::Relaxed); // fleetshift
                self.created += 1; // fleetshift

                // Match new filter to existing topics and add to publish_filters if it matches
                // (fleetshift: a filter without wildcards only to the topic equal to it)
                if has_wildcards(filter) {
                    self.wildcard_filters.push((filter.to_owned(), idx));
                    for (topic, filters) in publish_filters.iter_mut() {
                        if matches(topic, filter) {
                            filters.push(idx);
                        }
                    }
                } else if !filter.starts_with('$') {
                    if let Some(filters) = publish_filters.get_mut(filter) {
                        filters.push(idx);
                    }
                }

                (idx, self.native.get(idx).unwrap())
            }
        };

        (filter_idx, data.log.next_offset())
    }

    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
    ) -> io::Result<(Position, Vec<(PubWithProp, Offset)>)> {
        // unwrap to get index of `self.native` is fine here, because when a new subscribe packet
        // arrives in `Router::handle_device_payload`, it first calls the function
        // `next_native_offset` which creates a new commitlog if one doesn't exist. So any new
        // reads will definitely happen on a valid filter.
        let data = self.native.get(filter_idx).unwrap();
        self.read_since_trim.set(true); // fleetshift
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        let next = data.log.readv(offset, len, &mut o)?;

        let now = Instant::now();
        o.retain_mut(|(pubdata, _)| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        let o = o
            .into_iter()
            .map(|(pubdata, offset)| ((pubdata.publish, pubdata.properties), offset))
            .collect();

        Ok((next, o))
    }

    pub fn shadow(&mut self, filter: &str) -> Option<PubWithProp> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.log.last().map(|p| (p.publish, p.properties))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // calling unwrap on index here is fine, because only place this function is called is in
        // `Router::consume` method, when the status after reading from commit log of the same
        // filter as `request` is "done", that is, the subscriber has caught up. In other words,
        // there has been atleast 1 call to `native_readv` for the same filter, which means if
        // `native_readv` hasn't paniced, so this won't panic either.
        let data = self.native.get_mut(request.filter_idx).unwrap();
        data.waiters.register(id, request);
    }

    /// fleetshift: added. Removes a connection's parked requests from the
    /// waiters of `filters`, its subscriptions: a connection parks a request
    /// only on a filter it subscribed to (one data request per
    /// subscription). `clean` looked at the waiters of every filter the
    /// router ever had, a few per device of a fleet, at every disconnect.
    pub fn clean_filters<'a>(
        &mut self,
        id: ConnectionId,
        filters: impl IntoIterator<Item = &'a Filter>,
    ) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for filter in filters {
            let Some(&idx) = self.filter_indexes.get(filter) else {
                continue;
            };
            if let Some(data) = self.native.get_mut(idx) {
                inflight.append(&mut data.waiters.remove(id));
            }
        }
        inflight
    }

    /// Cleanup a connection from all the waiters
    #[allow(dead_code)] // fleetshift: `clean_filters` instead
    pub fn clean(&mut self, id: ConnectionId) -> Vec<DataRequest> {
        let mut inflight = Vec::new();
        for (_, data) in self.native.iter_mut() {
            inflight.append(&mut data.waiters.remove(id));
        }

        inflight
    }

    pub fn insert_to_retained_publishes(
        &mut self,
        publish: Publish,
        publish_properties: Option<PublishProperties>,
        topic: Topic,
    ) {
        let pub_with_props = (publish, publish_properties);
        self.retained_publishes.insert(topic, pub_with_props.into());
    }

    pub fn remove_from_retained_publishes(&mut self, topic: Topic) {
        self.retained_publishes.remove(&topic);
    }

    pub fn read_retained_messages(&mut self, filter: &str) -> Vec<PubWithProp> {
        trace!(info = "reading retain msg", filter = &filter);
        let now = Instant::now();

        // discard expired retained messages
        self.retained_publishes.retain(|_, pubdata| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        self.retained_publishes
            .iter()
            .filter(|(topic, _)| matches(topic, filter))
            .map(|(_, p)| (p.publish.clone(), p.properties.clone()))
            .collect()
    }
}

pub struct Data<T> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: &str, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
                    info!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // max_segment_size: usize, max_mem_segments: usize
        let log = CommitLog::new(max_segment_size, max_mem_segments).unwrap();

        let waiters = Waiters::with_capacity(0); // fleetshift: grows on demand (was 10)
        let metrics = SubscriptionMeter::default();
        Data {
            filter: filter.to_owned(),
            log,
            waiters,
            meter: metrics,
        }
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    ) -> (Offset, &Filter) {
        let size = item.size();
        let offset = self.log.append(item);
        if let Some(mut parked) = self.waiters.take() {
            notifications.append(&mut parked);
        }

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // Recorded qos 2 publishes
    recorded: VecDeque<(Publish, Option<PublishProperties>)>,
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        AckLog {
            committed: VecDeque::new(), // fleetshift: grows on demand (was with_capacity(100))
            recorded: VecDeque::new(),  // fleetshift: grows on demand (was with_capacity(100))
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrec(&mut self, publish: Publish, props: Option<PublishProperties>, ack: PubRec) {
        let ack = Ack::PubRec(ack);
        self.recorded.push_back((publish, props));
        self.committed.push_back(ack);
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    pub fn pubcomp(&mut self, ack: PubComp) -> Option<(Publish, Option<PublishProperties>)> {
        let ack = Ack::PubComp(ack);
        self.committed.push_back(ack);
        self.recorded.pop_front()
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

#[cfg(test)]
mod test {
    use super::DataLog;
    use crate::router::shared_subs::Strategy;
    use crate::RouterConfig;

    /// fleetshift: a PUBLISH's properties count towards a log's bytes.
    #[test]
    fn a_publish_is_counted_with_its_properties() {
        use crate::protocol::{Publish, PublishProperties};
        use crate::Storage;
        let publish = Publish::new("t/1", "x", false);
        let bare = super::PublishData::from((publish.clone(), None)).size();
        let properties = PublishProperties {
            user_properties: vec![("k".repeat(1_000), "v".repeat(99_000))],
            response_topic: Some("r".repeat(500)),
            correlation_data: Some(vec![0u8; 500].into()),
            content_type: Some("c".repeat(500)),
            ..Default::default()
        };
        let with = super::PublishData::from((publish, Some(properties))).size();
        assert!(with >= bare + 101_500, "{with} bytes against {bare} without properties");
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("topic/a");
        data.matches("topic/a");

        data.next_native_offset("topic/+");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 2);
    }

    /// fleetshift: the filters a topic gets, whichever comes first (the
    /// topic or the filter), are the ones `matches` gives against every
    /// filter, as before the exact filters were looked up instead.
    #[test]
    fn matched_filters_are_those_of_matching_every_filter() {
        let filters = [
            "a/b", "a/+", "#", "+/b", "$SYS/x", "$SYS/#", "a/b/#", "c", "", "a/b/c", "+", "+/+/+",
            "/tenants/s/telemetry/d", "/tenants/+/telemetry/+",
        ];
        let topics = [
            "a/b", "a/c", "$SYS/x", "c", "a/b/c", "", "x", "/tenants/s/telemetry/d", "a",
            "/tenants/t/telemetry/e",
        ];
        let config = || RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        // Topics seen before, between and after the subscriptions.
        for split in 0..=filters.len() {
            let mut data = DataLog::new(config()).unwrap();
            for topic in &topics[..topics.len() / 2] {
                data.matches(topic);
            }
            for filter in &filters[..split] {
                data.next_native_offset(filter);
            }
            for topic in &topics {
                data.matches(topic);
            }
            for filter in &filters[split..] {
                data.next_native_offset(filter);
            }
            for topic in topics {
                let mut got = data.matches(topic).unwrap();
                got.sort_unstable();
                let mut want: Vec<_> = filters
                    .iter()
                    .filter(|f| crate::protocol::matches(topic, f))
                    .map(|f| *data.filter_indexes.get(*f).unwrap())
                    .collect();
                want.sort_unstable();
                assert_eq!(got, want, "topic {topic:?}, {split} filters first");
            }
        }
    }

    /// fleetshift: topics published once each, all matched by a wildcard
    /// filter, leave at most `PUBLISH_FILTERS_MAX` cached, and each still
    /// gets its filter.
    #[test]
    fn the_publish_cache_is_bounded() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        let (idx, _) = data.next_native_offset("fleet/v1/activate/+");
        for n in 0..super::PUBLISH_FILTERS_MAX + 10 {
            let topic = format!("fleet/v1/activate/d{n}");
            assert_eq!(data.matches(&topic), Some(vec![idx]), "{topic}");
        }
        assert!(data.topics_cached() <= super::PUBLISH_FILTERS_MAX);
        assert!(data.topics_cached() > 0);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let config = RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Strategy::RoundRobin,
        };
        let mut data = DataLog::new(config).unwrap();
        data.next_native_offset("+/+");

        data.matches("topic/a");

        assert_eq!(data.publish_filters.get("topic/a").unwrap().len(), 1);
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config).unwrap();
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }
}

//! The Kafka event log (rdkafka over librdkafka), for the distributed deployment.
//!
//! # Writing
//! Events go to one topic (`tally.usage-events` by default), keyed by customer with the
//! `murmur2_random` partitioner (the Java client's), so one customer's events stay ordered on one
//! partition whoever produced them. The producer is idempotent with `acks=all` and lz4
//! compression, lingering a few milliseconds to batch. [`EventLog::append`] returns only when the
//! broker acknowledged every event of the call; if any delivery fails or times out
//! (`delivery_timeout`), the call fails and the caller answers 503: events of that call may or
//! may not be on the topic (the producer keeps trying for up to five minutes), and the client's
//! retry is de-duplicated downstream. Ingest processes
//! hold no state and can run side by side.
//!
//! Duplicates are dropped for the whole de-duplication window by the aggregator, against its
//! table in the store. In front of that, two best-effort in-memory filters (within
//! [`KafkaLogConfig::reader_dedup_window`], at most a million ids each): an ingest process
//! answers a retry of what *it* delivered as a duplicate without sending it again, and readers
//! made by [`EventLog::reader`] (the enforcer) skip repeats they have already counted.
//!
//! # Reading
//! - [`EventLog::group_reader`]: a member of a consumer group (the aggregator). Partitions move
//!   between members on rebalance; [`LogReader::assignment_epoch`] changes when they do, and
//!   records buffered for a revoked partition are dropped (the new owner reads them). Offsets are
//!   committed to Kafka only through [`LogReader::commit`], after the records are durable
//!   downstream; they are advisory (the aggregator's truth is the positions in its store).
//! - [`EventLog::reader`]: reads every partition without joining a group (the enforcer).
//!
//! # Notifications
//! Threshold notifications are claimed on a second topic, `<topic>.notifications` (one
//! partition, 40-day retention). Every replica produces its claim and then reads the topic up to
//! its own claim: the first claim of a (customer, meter, period, threshold) in the topic's order
//! wins, so exactly one replica sends each notification.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tally_schemas::{Notification, UsageEvent, wire};
use tokio::sync::watch;

use super::{AppendOutcome, EventLog, LogReader, Record};
use crate::{Error, Result};

/// Settings of the Kafka log.
#[derive(Debug, Clone)]
pub struct KafkaLogConfig {
    /// Bootstrap servers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Topic of usage events.
    pub topic: String,
    /// Partitions of the topic when `tally migrate` creates it.
    pub partitions: u32,
    /// Replication factor when `tally migrate` creates the topics.
    pub replication: u32,
    /// Longest an append waits for the broker's acknowledgements.
    pub delivery_timeout: Duration,
    /// How long a reader remembers (source, id) to drop repeats.
    pub reader_dedup_window: Duration,
    /// Consumer-group session timeout: how soon a dead member's partitions move.
    pub session_timeout: Duration,
}

impl KafkaLogConfig {
    pub fn new(brokers: impl Into<String>, topic: impl Into<String>) -> Self {
        KafkaLogConfig {
            brokers: brokers.into(),
            topic: topic.into(),
            partitions: 8,
            replication: 1,
            delivery_timeout: Duration::from_secs(10),
            reader_dedup_window: Duration::from_secs(3600),
            session_timeout: Duration::from_secs(10),
        }
    }

    fn notifications_topic(&self) -> String {
        format!("{}.notifications", self.topic)
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "tally");
        c
    }
}

fn kafka(e: KafkaError) -> Error {
    Error::Kafka(e.to_string())
}

/// The Kafka log. Cheap to share behind an `Arc`.
pub struct KafkaLog {
    config: KafkaLogConfig,
    /// Replaced when it stops working (see [`KafkaLog::renew_producer`]).
    producer: Arc<Mutex<(Producer_, Option<std::time::Instant>)>>,
    /// Set by the producer when every broker is unreachable.
    down: Arc<AtomicBool>,
    /// The notifications follower, started by the first notification call: processes that
    /// never publish one (ingest, aggregators) never read that topic.
    claims: Mutex<Option<Arc<Claims>>>,
    /// Events this process delivered recently, to answer a client's retry as a duplicate.
    delivered: Mutex<RecentIds>,
}

impl KafkaLog {
    /// Connects the producer (lazily: librdkafka connects in the background and reconnects by
    /// itself) and starts following the notifications topic.
    pub fn connect(config: KafkaLogConfig) -> Result<KafkaLog> {
        let down = Arc::new(AtomicBool::new(false));
        let producer = Self::new_producer(&config, &down)?;
        let delivered = Mutex::new(RecentIds::new(config.reader_dedup_window));
        let log = KafkaLog {
            config,
            producer: Arc::new(Mutex::new((producer, None))),
            down: down.clone(),
            claims: Mutex::new(None),
            delivered,
        };
        // Renew the producer as soon as every broker is lost (see `renew_producer`).
        let (slot, config) = (Arc::downgrade(&log.producer), log.config.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Some(slot) = slot.upgrade() else { break };
                if down.swap(false, Ordering::SeqCst) {
                    renew_producer(&slot, &config, &down, true);
                }
            }
        });
        Ok(log)
    }

    fn claims(&self) -> Result<Arc<Claims>> {
        let mut claims = self.claims.lock().expect("claims lock");
        if let Some(c) = &*claims {
            return Ok(c.clone());
        }
        let c = Arc::new(Claims::start(&self.config)?);
        *claims = Some(c.clone());
        Ok(c)
    }

    fn producer(&self) -> Producer_ {
        self.producer.lock().expect("producer lock").0.clone()
    }

    fn new_producer(config: &KafkaLogConfig, down: &Arc<AtomicBool>) -> Result<Producer_> {
        // librdkafka keeps retrying a message for much longer than an append waits (the append
        // gives up at `delivery_timeout` and the client retries, a duplicate dropped
        // downstream). A message librdkafka times out makes the idempotent producer bump its
        // epoch by itself, and tansu 0.6.0 cannot take a produce with an epoch it did not hand
        // out (its storage stops serving); on Apache Kafka the bump is harmless.
        let timeout_ms = config
            .delivery_timeout
            .max(MESSAGE_TIMEOUT)
            .as_millis()
            .to_string();
        config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            .set("batch.size", "1000000")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("partitioner", "murmur2_random")
            .set("message.timeout.ms", &timeout_ms)
            .create_with_context(ProducerWatch { down: down.clone() })
            .map_err(kafka)
    }

    /// Creates the topics if they do not exist (`tally migrate`).
    pub async fn create_topics(config: &KafkaLogConfig) -> Result<()> {
        let admin: AdminClient<DefaultClientContext> = config.client().create().map_err(kafka)?;
        let notifications = config.notifications_topic();
        let retention = (40 * 86_400_000u64).to_string();
        let topics = [
            NewTopic::new(
                &config.topic,
                config.partitions as i32,
                TopicReplication::Fixed(config.replication as i32),
            ),
            NewTopic::new(
                &notifications,
                1,
                TopicReplication::Fixed(config.replication as i32),
            )
            .set("retention.ms", &retention),
        ];
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in admin
            .create_topics(&topics, &options)
            .await
            .map_err(kafka)?
        {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(Error::Kafka(format!("cannot create topic {topic}: {code}")));
                }
            }
        }
        Ok(())
    }

    /// A member of consumer group `group`, for the aggregator.
    fn group_reader_for(&self, group: &str) -> Result<Box<dyn LogReader>> {
        let events = Arc::new(Mutex::new(Assignment::default()));
        let consumer: StreamConsumer<GroupContext> = self
            .config
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set(
                "session.timeout.ms",
                self.config.session_timeout.as_millis().to_string(),
            )
            .set("fetch.wait.max.ms", "50")
            .create_with_context(GroupContext {
                events: events.clone(),
            })
            .map_err(kafka)?;
        consumer.subscribe(&[&self.config.topic]).map_err(kafka)?;
        Ok(Box::new(KafkaReader::new(
            consumer,
            &self.config,
            true,
            events,
        )))
    }

    async fn partitions(&self) -> Result<Vec<i32>> {
        let producer = self.producer();
        let topic = self.config.topic.clone();
        tokio::task::spawn_blocking(move || topic_partitions(producer.client(), &topic))
            .await
            .map_err(|e| Error::Kafka(e.to_string()))?
    }
}

/// How long librdkafka itself tries to deliver a message (`message.timeout.ms`), unless
/// `delivery_timeout` is longer.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(300);

/// Longest a notification claim waits for the broker's acknowledgement.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(10);

/// The producer, with its context.
type Producer_ = FutureProducer<ProducerWatch>;

/// Notices when every broker is unreachable.
#[derive(Clone)]
struct ProducerWatch {
    down: Arc<AtomicBool>,
}

impl ClientContext for ProducerWatch {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.down.store(true, Ordering::SeqCst);
        }
        tracing::warn!(%error, reason, "kafka producer");
    }
}

/// Replaces the producer with a new one (a new producer id), cancelling what the old one still
/// holds (those appends fail, their clients retry). Done when a delivery failed in a way the
/// broker did not explain (a fatal error, lost idempotence state), at most every 5 s; and as
/// soon as every broker was lost (`now`): a broker that restarted may have lost the producer's
/// idempotence state, and tansu 0.6.0 even stops serving when an older producer id writes to
/// it after an unclean restart. On Apache Kafka a fresh producer after an outage costs one
/// InitProducerId request.
fn renew_producer(
    slot: &Mutex<(Producer_, Option<std::time::Instant>)>,
    config: &KafkaLogConfig,
    down: &Arc<AtomicBool>,
    now: bool,
) {
    let mut p = slot.lock().expect("producer lock");
    if !now && p.1.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
        return;
    }
    match KafkaLog::new_producer(config, down) {
        Ok(fresh) => {
            p.0.purge(PurgeConfig::default().queue().inflight().non_blocking());
            tracing::warn!("kafka producer replaced");
            *p = (fresh, Some(std::time::Instant::now()));
        }
        Err(e) => tracing::error!(error = %e, "cannot create a kafka producer"),
    }
}

/// The partitions of `topic`, from the cluster's metadata (blocking).
fn topic_partitions<C: ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<Vec<i32>> {
    let md = client
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(kafka)?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| Error::Kafka(format!("topic {topic} not found")))?;
    if let Some(e) = t.error() {
        return Err(Error::Kafka(format!("topic {topic}: {e:?}")));
    }
    if t.partitions().is_empty() {
        return Err(Error::Kafka(format!(
            "topic {topic} does not exist (run `tally migrate`)"
        )));
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

#[async_trait]
impl EventLog for KafkaLog {
    async fn append(&self, events: Vec<UsageEvent>) -> Result<AppendOutcome> {
        // A retry of what this process already delivered is acknowledged without sending it
        // again. Ids are remembered only once delivered: a failed append is retried in full.
        let total = events.len();
        let (keys, events): (Vec<u128>, Vec<UsageEvent>) = {
            let delivered = self.delivered.lock().expect("delivered lock");
            events
                .into_iter()
                .map(|e| (digest(&e), e))
                .filter(|(key, _)| !delivered.contains(*key))
                .unzip()
        };
        let duplicates = total - events.len();
        let producer = self.producer();
        let mut deliveries = Vec::with_capacity(events.len());
        let mut buf = Vec::with_capacity(128);
        for e in &events {
            buf.clear();
            wire::encode_into(e, &mut buf);
            let record = FutureRecord::to(&self.config.topic)
                .key(e.customer.as_str())
                .payload(buf.as_slice())
                .timestamp(e.received_ms);
            let mut record = Some(record);
            // A full local queue is back-pressure, not failure: wait for room.
            loop {
                match producer.send_result(record.take().expect("record")) {
                    Ok(d) => {
                        deliveries.push(d);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = Some(r);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(kafka(e)),
                }
            }
        }
        let mut failure = None;
        let mut unexplained = false;
        let deadline = tokio::time::Instant::now() + self.config.delivery_timeout;
        for d in deliveries {
            // Past the deadline the append fails; what is still queued may be delivered later.
            let Ok(delivered) = tokio::time::timeout_at(deadline, d).await else {
                failure = Some(Error::Kafka(format!(
                    "not acknowledged within {:?}",
                    self.config.delivery_timeout
                )));
                break;
            };
            match delivered {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    // Timeouts and transport errors heal by themselves; others may not.
                    unexplained |= !matches!(
                        e.rdkafka_error_code(),
                        Some(
                            RDKafkaErrorCode::MessageTimedOut
                                | RDKafkaErrorCode::BrokerTransportFailure
                                | RDKafkaErrorCode::AllBrokersDown
                                | RDKafkaErrorCode::RequestTimedOut
                                | RDKafkaErrorCode::NotEnoughReplicas
                                | RDKafkaErrorCode::LeaderNotAvailable
                                | RDKafkaErrorCode::NotLeaderForPartition
                        )
                    );
                    failure = Some(kafka(e));
                }
                Err(_) => failure = Some(Error::Closed),
            }
        }
        if unexplained || producer.client().fatal_error().is_some() {
            renew_producer(&self.producer, &self.config, &self.down, false);
        }
        match failure {
            None => {
                let mut delivered = self.delivered.lock().expect("delivered lock");
                for (key, e) in keys.iter().zip(&events) {
                    delivered.remember(*key, e.received_ms);
                }
                Ok(AppendOutcome {
                    accepted: events.len(),
                    duplicates,
                })
            }
            Some(e) => Err(e),
        }
    }

    fn group_reader(&self, group: &str) -> Result<Box<dyn LogReader>> {
        self.group_reader_for(group)
    }

    fn reader(&self) -> Result<Box<dyn LogReader>> {
        let consumer: StreamConsumer<GroupContext> = self
            .config
            .client()
            // Never joins the group (assign, not subscribe); librdkafka still wants an id.
            .set("group.id", "tally-follower")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", "read_committed")
            .set("fetch.wait.max.ms", "50")
            .create_with_context(GroupContext::default())
            .map_err(kafka)?;
        let assignment = Arc::new(Mutex::new(Assignment::default()));
        Ok(Box::new(KafkaReader::new(
            consumer,
            &self.config,
            false,
            assignment,
        )))
    }

    async fn end_offsets(&self) -> Result<Vec<(u32, u64)>> {
        let mut out = Vec::new();
        for p in self.partitions().await? {
            let producer = self.producer();
            let topic = self.config.topic.clone();
            let (_, high) = tokio::task::spawn_blocking(move || {
                producer
                    .client()
                    .fetch_watermarks(&topic, p, Duration::from_secs(10))
            })
            .await
            .map_err(|e| Error::Kafka(e.to_string()))?
            .map_err(kafka)?;
            out.push((p as u32, high.max(0) as u64));
        }
        Ok(out)
    }

    async fn publish_notification(&self, n: &Notification) -> Result<bool> {
        self.claims()?
            .claim(&self.producer(), &self.config.notifications_topic(), n)
            .await
    }

    async fn notifications_since(&self, since_ms: i64) -> Result<Vec<Notification>> {
        let claims = self.claims()?;
        claims.wait_caught_up().await;
        let state = claims.state.lock().expect("claims lock");
        Ok(state
            .first
            .values()
            .filter(|c| c.notification.period_end_ms > since_ms)
            .map(|c| c.notification.clone())
            .collect())
    }
}

/// Rebalance events seen by a group member.
#[derive(Default)]
struct Assignment {
    epoch: u64,
    revoked: Vec<u32>,
}

#[derive(Default, Clone)]
struct GroupContext {
    events: Arc<Mutex<Assignment>>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let mut a = self.events.lock().expect("assignment lock");
        match rebalance {
            Rebalance::Revoke(tpl) => {
                a.revoked
                    .extend(tpl.elements().iter().map(|e| e.partition() as u32));
                a.epoch += 1;
            }
            Rebalance::Assign(_) => a.epoch += 1,
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
        tracing::info!(?rebalance, "partitions rebalanced");
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, _: &Rebalance<'_>) {
        let owned = consumer.assignment().map_or(0, |tpl| tpl.count());
        crate::metrics::ASSIGNED_PARTITIONS.set(owned as i64);
    }
}

/// Most (source, id) pairs a process keeps in memory for [`RecentIds`] (about 40 MB).
const RECENT_IDS_MAX: usize = 1_000_000;

/// (source, id) pairs seen recently (within a window, and at most [`RECENT_IDS_MAX`]), oldest
/// first: a best-effort, in-memory first line of de-duplication. The aggregator's table is the
/// one that holds for the whole window. Pairs are kept as 128-bit digests (two keyed SipHash
/// passes): no allocation per event, and a false match among a million entries has a
/// probability around 10^-27.
struct RecentIds {
    window: Duration,
    set: HashSet<u128>,
    order: VecDeque<(i64, u128)>,
    /// Wall-clock time this filter began: it knows nothing received before.
    began_ms: i64,
    /// The latest receipt time among forgotten ids (the window passed, or the cap was hit).
    forgot_up_to_ms: i64,
}

fn digest(e: &UsageEvent) -> u128 {
    use std::hash::{Hash, Hasher};
    let half = |salt: u8| {
        let mut h = std::hash::DefaultHasher::new();
        salt.hash(&mut h);
        e.source.hash(&mut h);
        e.id.hash(&mut h);
        h.finish()
    };
    (u128::from(half(1)) << 64) | u128::from(half(2))
}

impl RecentIds {
    fn new(window: Duration) -> Self {
        RecentIds {
            window,
            set: HashSet::new(),
            order: VecDeque::new(),
            began_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
            forgot_up_to_ms: i64::MIN,
        }
    }

    /// Receipt times from which every id received is still held.
    fn complete_since_ms(&self) -> i64 {
        self.began_ms.max(self.forgot_up_to_ms.saturating_add(1))
    }

    fn contains(&self, key: u128) -> bool {
        self.set.contains(&key)
    }

    /// Remembers `key` of an event received at `received_ms`.
    fn remember(&mut self, key: u128, received_ms: i64) {
        let horizon = received_ms - self.window.as_millis() as i64;
        while let Some(&(t, key)) = self.order.front() {
            if t >= horizon && self.order.len() < RECENT_IDS_MAX {
                break;
            }
            self.order.pop_front();
            self.set.remove(&key);
            self.forgot_up_to_ms = self.forgot_up_to_ms.max(t);
        }
        if self.set.insert(key) {
            self.order.push_back((received_ms, key));
        }
    }

    /// Whether `e` is the first of its (source, id) within the window; remembers it.
    fn first(&mut self, e: &UsageEvent) -> bool {
        let key = digest(e);
        if self.contains(key) {
            return false;
        }
        self.remember(key, e.received_ms);
        true
    }
}

struct KafkaReader {
    consumer: Arc<StreamConsumer<GroupContext>>,
    topic: String,
    /// A consumer-group member (else: assigned every partition by `seek`).
    group: bool,
    assignment: Arc<Mutex<Assignment>>,
    epoch: u64,
    pending: Vec<Record>,
    pending_since: Option<tokio::time::Instant>,
    recent: RecentIds,
    /// Offsets below which records are skipped, per partition (set by `seek`).
    floors: HashMap<u32, u64>,
    /// Positions sought and not reached yet, with the tries: until the record sought comes, a
    /// partition's records are skipped and the seek is tried again (librdkafka refuses one on a
    /// partition just assigned, and records fetched before a seek may still come).
    unsought: HashMap<u32, (u64, u32)>,
    /// Follower: the partitions it was assigned, once it has looked them up.
    assigned: bool,
}

impl KafkaReader {
    fn new(
        consumer: StreamConsumer<GroupContext>,
        config: &KafkaLogConfig,
        group: bool,
        assignment: Arc<Mutex<Assignment>>,
    ) -> KafkaReader {
        KafkaReader {
            consumer: Arc::new(consumer),
            topic: config.topic.clone(),
            group,
            assignment,
            epoch: 0,
            pending: Vec::new(),
            pending_since: None,
            recent: RecentIds::new(config.reader_dedup_window),
            floors: HashMap::new(),
            unsought: HashMap::new(),
            assigned: false,
        }
    }

    fn take(&mut self, max: usize) -> Vec<Record> {
        let rest = if self.pending.len() > max {
            self.pending.split_off(max)
        } else {
            Vec::new()
        };
        self.pending_since = (!rest.is_empty()).then(tokio::time::Instant::now);
        std::mem::replace(&mut self.pending, rest)
    }

    /// Follower: assigns every partition of the topic, at its floor or the beginning.
    async fn assign_all(&mut self) -> Result<()> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let partitions =
            tokio::task::spawn_blocking(move || topic_partitions(consumer.client(), &topic))
                .await
                .map_err(|e| Error::Kafka(e.to_string()))??;
        let mut tpl = TopicPartitionList::new();
        for p in partitions {
            let at = match self.floors.get(&(p as u32)) {
                Some(&next) => Offset::Offset(next as i64),
                None => Offset::Beginning,
            };
            tpl.add_partition_offset(&self.topic, p, at)
                .map_err(kafka)?;
        }
        self.consumer.assign(&tpl).map_err(kafka)?;
        self.assigned = true;
        Ok(())
    }

    /// Moves `partition`'s cursor to `next_offset` (tried again on its next record if refused).
    fn move_cursor(&self, partition: u32, next_offset: u64) {
        if let Err(e) = self.consumer.seek(
            &self.topic,
            partition as i32,
            Offset::Offset(next_offset as i64),
            Duration::from_secs(5),
        ) {
            tracing::debug!(partition, error = %e, "seek refused; trying again");
        }
    }

    /// Whether a record at `offset` of `partition` comes where the cursor was sought: the
    /// first one after a seek must be the one sought (or, if retention removed it, the log's
    /// first). If not, the seek is tried again and the record skipped.
    fn where_sought(&mut self, partition: u32, offset: u64) -> bool {
        let Some(&(sought, tries)) = self.unsought.get(&partition) else {
            return true;
        };
        if offset == sought {
            self.unsought.remove(&partition);
            return true;
        }
        if tries > 0 && tries % 20 == 0 {
            let low = self
                .consumer
                .fetch_watermarks(&self.topic, partition as i32, Duration::from_secs(5))
                .map(|(low, _)| low.max(0) as u64);
            if low.is_ok_and(|low| low > sought && offset == low) {
                tracing::warn!(
                    partition,
                    sought,
                    first = offset,
                    "records sought are gone from the log"
                );
                self.unsought.remove(&partition);
                return true;
            }
        }
        self.unsought.insert(partition, (sought, tries + 1));
        self.move_cursor(partition, sought);
        false
    }

    /// Applies rebalance events: drops what was buffered for revoked partitions.
    fn observe_rebalance(&mut self) -> bool {
        let mut a = self.assignment.lock().expect("assignment lock");
        if a.epoch == self.epoch {
            return false;
        }
        self.epoch = a.epoch;
        let revoked: HashSet<u32> = a.revoked.drain(..).collect();
        drop(a);
        self.pending.retain(|r| !revoked.contains(&r.partition));
        for p in revoked {
            self.floors.remove(&p);
            self.unsought.remove(&p);
        }
        true
    }
}

#[async_trait]
impl LogReader for KafkaReader {
    fn rejoin(&mut self) -> Result<()> {
        if !self.group {
            return Ok(());
        }
        tracing::warn!("rejoining the consumer group");
        self.consumer.unsubscribe();
        self.consumer.subscribe(&[&self.topic]).map_err(kafka)
    }

    fn seek(&mut self, partition: u32, next_offset: u64) {
        self.floors.insert(partition, next_offset);
        // The cursor moves: whatever was buffered for the partition comes again, in order.
        self.pending.retain(|r| r.partition != partition);
        let owned = self.assigned
            || (self.group
                && self
                    .consumer
                    .assignment()
                    .is_ok_and(|tpl| tpl.find_partition(&self.topic, partition as i32).is_some()));
        if owned {
            // Already reading it: move this partition's cursor.
            self.move_cursor(partition, next_offset);
        }
        if self.group || owned {
            // (A group member's partition not assigned yet starts from the group's committed
            // offset: moved on its first record.)
            self.unsought.insert(partition, (next_offset, 0));
        }
    }

    fn assignment_epoch(&self) -> u64 {
        self.epoch
    }

    async fn poll(&mut self, max: usize, linger: Duration) -> Result<Vec<Record>> {
        let started = tokio::time::Instant::now();
        if !self.group && !self.assigned {
            self.assign_all().await?;
        }
        // Messages borrow the consumer: a handle of its own leaves `self` free.
        let consumer = self.consumer.clone();
        loop {
            if self.observe_rebalance() {
                // The caller re-reads its positions for the new assignment first.
                return Ok(self.take(max));
            }
            if self.pending.len() >= max {
                return Ok(self.take(max));
            }
            let deadline = self.pending_since.unwrap_or(started) + linger;
            let msg = tokio::select! {
                m = consumer.recv() => m,
                _ = tokio::time::sleep_until(deadline) => return Ok(self.take(max)),
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "kafka consumer error");
                    continue;
                }
            };
            let partition = msg.partition() as u32;
            let offset = msg.offset() as u64;
            if self.floors.get(&partition).is_some_and(|f| offset < *f) {
                continue;
            }
            if !self.where_sought(partition, offset) {
                continue;
            }
            let event = match msg.payload().map(wire::decode) {
                Some(Ok(e)) => e,
                _ => {
                    // Not written by Tally: nothing to count. Skip it, loudly.
                    crate::metrics::UNDECODABLE.inc();
                    tracing::error!(partition, offset, "undecodable record skipped");
                    continue;
                }
            };
            if !self.group && !self.recent.first(&event) {
                continue;
            }
            if self.pending.is_empty() {
                self.pending_since = Some(tokio::time::Instant::now());
            }
            self.pending.push(Record {
                partition,
                offset,
                event,
            });
        }
    }

    /// Receipt time is at most the future tolerance after an event's time, so an event whose
    /// time is at or after this plus that tolerance was received while the filter held every
    /// id (see [`LogReader::remembers_since_ms`]; callers add the tolerance).
    fn remembers_since_ms(&self) -> Option<i64> {
        (!self.group).then(|| self.recent.complete_since_ms())
    }

    async fn commit(&mut self, positions: &BTreeMap<u32, u64>) -> Result<()> {
        if !self.group {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (&p, &next) in positions {
            tpl.add_partition_offset(&self.topic, p as i32, Offset::Offset(next as i64))
                .map_err(kafka)?;
        }
        self.consumer.commit(&tpl, CommitMode::Async).map_err(kafka)
    }
}

/// A notification claim on the notifications topic.
#[derive(Serialize, Deserialize)]
struct Claim {
    claimant: String,
    notification: Notification,
}

#[derive(Default)]
struct ClaimState {
    /// First claim per (customer, meter, period start, threshold).
    first: HashMap<(String, String, i64, u32), Claim>,
}

/// Follows the notifications topic from the start.
struct Claims {
    me: String,
    state: Arc<Mutex<ClaimState>>,
    progress: watch::Receiver<i64>,
    high: Arc<dyn Fn() -> Option<i64> + Send + Sync>,
}

impl Claims {
    fn start(config: &KafkaLogConfig) -> Result<Claims> {
        let topic = config.notifications_topic();
        let consumer: StreamConsumer = config
            .client()
            .set("group.id", "tally-notifications")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "20")
            .create()
            .map_err(kafka)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning)
            .map_err(kafka)?;
        consumer.assign(&tpl).map_err(kafka)?;
        let consumer = Arc::new(consumer);
        let state = Arc::new(Mutex::new(ClaimState::default()));
        let (tx, progress) = watch::channel(0i64);
        let high = {
            let consumer = consumer.clone();
            let topic = topic.clone();
            Arc::new(move || {
                consumer
                    .fetch_watermarks(&topic, 0, Duration::from_secs(5))
                    .ok()
                    .map(|(_, h)| h)
            })
        };
        let follower_state = state.clone();
        tokio::spawn(async move {
            loop {
                let m = match consumer.recv().await {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!(error = %e, "notifications topic");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let offset = m.offset();
                if let Some(Ok(claim)) = m.payload().map(serde_json::from_slice::<Claim>) {
                    let n = &claim.notification;
                    let key = (
                        n.customer.clone(),
                        n.meter.clone(),
                        n.period_start_ms,
                        n.threshold,
                    );
                    let mut s = follower_state.lock().expect("claims lock");
                    s.first.entry(key).or_insert(claim);
                }
                if tx.send(offset + 1).is_err() {
                    break;
                }
            }
        });
        Ok(Claims {
            me: format!("{}-{}", std::process::id(), random_suffix()),
            state,
            progress,
            high,
        })
    }

    /// Waits until the follower has read what the topic held when this was called.
    async fn wait_caught_up(&self) {
        let high = self.high.clone();
        let Ok(Some(target)) = tokio::task::spawn_blocking(move || high()).await else {
            return;
        };
        self.wait_past(target - 1).await;
    }

    async fn wait_past(&self, offset: i64) {
        let mut progress = self.progress.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            progress.wait_for(|next| *next > offset),
        )
        .await;
    }

    async fn claim(&self, producer: &Producer_, topic: &str, n: &Notification) -> Result<bool> {
        let key = (
            n.customer.clone(),
            n.meter.clone(),
            n.period_start_ms,
            n.threshold,
        );
        if let Some(c) = self.state.lock().expect("claims lock").first.get(&key) {
            return Ok(c.claimant == self.me);
        }
        let claim = Claim {
            claimant: self.me.clone(),
            notification: n.clone(),
        };
        let payload = serde_json::to_vec(&claim).map_err(|e| Error::Append(e.to_string()))?;
        let key_text = format!("{}/{}/{}/{}", key.0, key.1, key.2, key.3);
        let send = producer.send(
            FutureRecord::to(topic).key(&key_text).payload(&payload),
            Duration::from_secs(5),
        );
        let delivery = tokio::time::timeout(CLAIM_TIMEOUT, send)
            .await
            .map_err(|_| Error::Kafka("notification claim not acknowledged in time".into()))?
            .map_err(|(e, _)| kafka(e))?;
        self.wait_past(delivery.offset).await;
        let state = self.state.lock().expect("claims lock");
        match state.first.get(&key) {
            Some(c) => Ok(c.claimant == self.me),
            None => Err(Error::Kafka(
                "notification claim not read back in time".into(),
            )),
        }
    }
}

fn random_suffix() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    format!("{:016x}", h.finish())
}

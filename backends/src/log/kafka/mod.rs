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

use super::{AppendOutcome, EventLog, LogReader, Notifications, Record};
use crate::{Error, Result};

mod claims;
mod reader;

use claims::Claims;
use reader::{Assignment, GroupContext, KafkaReader, RecentIds, digest};

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
    Error::Kafka(e)
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
                    return Err(Error::Config(format!(
                        "cannot create topic {topic}: {code}"
                    )));
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
            .map_err(|_| Error::Closed)?
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
        .ok_or_else(|| Error::Config(format!("topic {topic} not found")))?;
    if let Some(e) = t.error() {
        return Err(Error::Config(format!("topic {topic}: {e:?}")));
    }
    if t.partitions().is_empty() {
        return Err(Error::Config(format!(
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
                failure = Some(Error::Timeout {
                    what: "append",
                    after: self.config.delivery_timeout,
                });
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
            .map_err(|_| Error::Closed)?
            .map_err(kafka)?;
            out.push((p as u32, high.max(0) as u64));
        }
        Ok(out)
    }
}

#[async_trait]
impl Notifications for KafkaLog {
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

//! The Kafka log's read side: a consumer-group member (or a reader of every partition) with its
//! rebalance tracking and the in-memory de-duplication of repeats it reads.

use super::*;

/// Rebalance events seen by a group member.
#[derive(Default)]
pub(super) struct Assignment {
    pub(super) epoch: u64,
    pub(super) revoked: Vec<u32>,
}

#[derive(Default, Clone)]
pub(super) struct GroupContext {
    pub(super) events: Arc<Mutex<Assignment>>,
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
pub(super) const RECENT_IDS_MAX: usize = 1_000_000;

/// (source, id) pairs seen recently (within a window, and at most [`RECENT_IDS_MAX`]), oldest
/// first: a best-effort, in-memory first line of de-duplication. The aggregator's table is the
/// one that holds for the whole window. Pairs are kept as 128-bit digests (two keyed SipHash
/// passes): no allocation per event, and a false match among a million entries has a
/// probability around 10^-27.
pub(super) struct RecentIds {
    pub(super) window: Duration,
    pub(super) set: HashSet<u128>,
    pub(super) order: VecDeque<(i64, u128)>,
    /// Wall-clock time this filter began: it knows nothing received before.
    pub(super) began_ms: i64,
    /// The latest receipt time among forgotten ids (the window passed, or the cap was hit).
    pub(super) forgot_up_to_ms: i64,
}

pub(super) fn digest(e: &UsageEvent) -> u128 {
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
    pub(super) fn new(window: Duration) -> Self {
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
    pub(super) fn complete_since_ms(&self) -> i64 {
        self.began_ms.max(self.forgot_up_to_ms.saturating_add(1))
    }

    pub(super) fn contains(&self, key: u128) -> bool {
        self.set.contains(&key)
    }

    /// Remembers `key` of an event received at `received_ms`.
    pub(super) fn remember(&mut self, key: u128, received_ms: i64) {
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
    pub(super) fn first(&mut self, e: &UsageEvent) -> bool {
        let key = digest(e);
        if self.contains(key) {
            return false;
        }
        self.remember(key, e.received_ms);
        true
    }
}

pub(super) struct KafkaReader {
    pub(super) consumer: Arc<StreamConsumer<GroupContext>>,
    pub(super) topic: String,
    /// A consumer-group member (else: assigned every partition by `seek`).
    pub(super) group: bool,
    pub(super) assignment: Arc<Mutex<Assignment>>,
    pub(super) epoch: u64,
    pub(super) pending: Vec<Record>,
    pub(super) pending_since: Option<tokio::time::Instant>,
    pub(super) recent: RecentIds,
    /// Offsets below which records are skipped, per partition (set by `seek`).
    pub(super) floors: HashMap<u32, u64>,
    /// Positions sought and not reached yet, with the tries: until the record sought comes, a
    /// partition's records are skipped and the seek is tried again (librdkafka refuses one on a
    /// partition just assigned, and records fetched before a seek may still come).
    pub(super) unsought: HashMap<u32, (u64, u32)>,
    /// Follower: the partitions it was assigned, once it has looked them up.
    pub(super) assigned: bool,
}

impl KafkaReader {
    pub(super) fn new(
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

    pub(super) fn take(&mut self, max: usize) -> Vec<Record> {
        let rest = if self.pending.len() > max {
            self.pending.split_off(max)
        } else {
            Vec::new()
        };
        self.pending_since = (!rest.is_empty()).then(tokio::time::Instant::now);
        std::mem::replace(&mut self.pending, rest)
    }

    /// Follower: assigns every partition of the topic, at its floor or the beginning.
    pub(super) async fn assign_all(&mut self) -> Result<()> {
        let consumer = self.consumer.clone();
        let topic = self.topic.clone();
        let partitions =
            tokio::task::spawn_blocking(move || topic_partitions(consumer.client(), &topic))
                .await
                .map_err(|_| Error::Closed)??;
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
    pub(super) fn move_cursor(&self, partition: u32, next_offset: u64) {
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
    pub(super) fn where_sought(&mut self, partition: u32, offset: u64) -> bool {
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
    pub(super) fn observe_rebalance(&mut self) -> bool {
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

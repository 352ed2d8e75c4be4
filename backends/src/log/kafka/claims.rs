//! Threshold-notification claims on their own compacted topic: the first claim of a
//! (customer, meter, period, threshold) read back from the topic wins, so one replica notifies.

use super::*;

/// A notification claim on the notifications topic.
#[derive(Serialize, Deserialize)]
pub(super) struct Claim {
    pub(super) claimant: String,
    pub(super) notification: Notification,
}

#[derive(Default)]
pub(super) struct ClaimState {
    /// First claim per (customer, meter, period start, threshold).
    pub(super) first: HashMap<(String, String, i64, u32), Claim>,
    /// Claims of this log handle already answered `true`: a publication repeated by the same
    /// handle answers `false`, like a replica's; one retried after an error (its claim landed,
    /// the read-back did not come in time) still answers `true` once.
    pub(super) granted: HashSet<(String, String, i64, u32)>,
}

/// Follows the notifications topic from the start.
pub(super) struct Claims {
    pub(super) me: String,
    pub(super) state: Arc<Mutex<ClaimState>>,
    pub(super) progress: watch::Receiver<i64>,
    pub(super) high: Arc<dyn Fn() -> Option<i64> + Send + Sync>,
}

impl Claims {
    pub(super) fn start(config: &KafkaLogConfig) -> Result<Claims> {
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
    pub(super) async fn wait_caught_up(&self) {
        let high = self.high.clone();
        let Ok(Some(target)) = tokio::task::spawn_blocking(move || high()).await else {
            return;
        };
        self.wait_past(target - 1).await;
    }

    pub(super) async fn wait_past(&self, offset: i64) {
        let mut progress = self.progress.clone();
        let _ = tokio::time::timeout(
            Duration::from_secs(30),
            progress.wait_for(|next| *next > offset),
        )
        .await;
    }

    pub(super) async fn claim(
        &self,
        producer: &Producer_,
        topic: &str,
        n: &Notification,
    ) -> Result<bool> {
        let key = (
            n.customer.clone(),
            n.meter.clone(),
            n.period_start_ms,
            n.threshold,
        );
        {
            let mut state = self.state.lock().expect("claims lock");
            if let Some(c) = state.first.get(&key) {
                let mine = c.claimant == self.me;
                return Ok(mine && state.granted.insert(key));
            }
        }
        let claim = Claim {
            claimant: self.me.clone(),
            notification: n.clone(),
        };
        let payload = serde_json::to_vec(&claim)?;
        let key_text = format!("{}/{}/{}/{}", key.0, key.1, key.2, key.3);
        let send = producer.send(
            FutureRecord::to(topic).key(&key_text).payload(&payload),
            Duration::from_secs(5),
        );
        let delivery = tokio::time::timeout(CLAIM_TIMEOUT, send)
            .await
            .map_err(|_| Error::Timeout {
                what: "notification claim",
                after: CLAIM_TIMEOUT,
            })?
            .map_err(|(e, _)| kafka(e))?;
        self.wait_past(delivery.offset).await;
        let mut state = self.state.lock().expect("claims lock");
        match state.first.get(&key) {
            Some(c) => {
                let mine = c.claimant == self.me;
                Ok(mine && state.granted.insert(key))
            }
            None => Err(Error::Timeout {
                what: "notification claim read-back",
                after: CLAIM_TIMEOUT,
            }),
        }
    }
}

pub(super) fn random_suffix() -> String {
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

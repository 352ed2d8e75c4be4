//! `tally replay`: feeds events again into the pipeline's log, from a file of CloudEvents or
//! from a range of another log (a Kafka topic, or an embedded `events.db`), with a progress bar.
//!
//! # Contract
//! Replay appends through the same path as ingest: events are validated with the same rules
//! (an event older than `late_window` or further ahead than `future_tolerance` is refused, so
//! that every replayed event is still inside the de-duplication window), and an event whose
//! (`source`, `id`) was already counted is dropped. Replaying the same input twice, or input
//! that overlaps what edge nodes already sent, therefore counts each event once. The embedded log
//! drops duplicates when they are appended (reported as duplicates); on Kafka the aggregator and
//! the enforcer drop them when they read.
//!
//! Events are appended in batches of [`BATCH`]; an append that fails stops the replay with an
//! error, and every batch appended before it stays (running the same replay again is safe).

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use tally_backends::log::{EventLog, LogReader};
use tally_schemas::event::{BatchError, decode_event};
use tally_schemas::{Catalog, Clock, EventError, TimePolicy, UsageEvent};

use crate::{Error, Result};

/// Events per append.
pub const BATCH: usize = 5_000;
/// How many refused events are listed (the counts stay exact).
const LISTED: usize = 20;

/// What a replay did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Events read from the input.
    pub read: u64,
    /// Events appended to the log.
    pub accepted: u64,
    /// Events the log dropped as already counted.
    pub duplicates: u64,
    /// Refused events, by error code.
    pub rejected: BTreeMap<&'static str, u64>,
    /// The first refused events: (position in the input, message).
    pub examples: Vec<(u64, String)>,
}

impl Summary {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.values().sum()
    }

    fn refuse(&mut self, at: u64, e: &EventError) {
        *self.rejected.entry(e.code()).or_default() += 1;
        if self.examples.len() < LISTED {
            self.examples.push((at, e.to_string()));
        }
    }
}

/// Validation and batching shared by both inputs.
struct Feeder<'a> {
    log: &'a dyn EventLog,
    policy: TimePolicy,
    clock: &'a dyn Clock,
    batch: Vec<UsageEvent>,
    summary: Summary,
}

impl<'a> Feeder<'a> {
    fn new(log: &'a dyn EventLog, policy: TimePolicy, clock: &'a dyn Clock) -> Feeder<'a> {
        Feeder {
            log,
            policy,
            clock,
            batch: Vec::with_capacity(BATCH),
            summary: Summary::default(),
        }
    }

    async fn push(&mut self, at: u64, event: Result<UsageEvent, EventError>) -> Result<()> {
        self.summary.read += 1;
        let event = event.and_then(|e| {
            let now = self.clock.now_ms();
            if e.time_ms < now - self.policy.late_window_ms {
                Err(EventError::TooOld {
                    window_hours: self.policy.late_window_ms / 3_600_000,
                })
            } else if e.time_ms > now + self.policy.future_tolerance_ms {
                Err(EventError::InFuture {
                    tolerance_secs: self.policy.future_tolerance_ms / 1000,
                })
            } else {
                Ok(e)
            }
        });
        match event {
            Ok(e) => self.batch.push(e),
            Err(e) => self.summary.refuse(at, &e),
        }
        if self.batch.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let outcome = self.log.append(std::mem::take(&mut self.batch)).await?;
        self.summary.accepted += outcome.accepted as u64;
        self.summary.duplicates += outcome.duplicates as u64;
        Ok(())
    }
}

fn bar(len: u64, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let rate = if unit == "bytes" {
        "bytes_per_sec"
    } else {
        "per_sec"
    };
    let template = format!(
        "{{elapsed_precise}} [{{wide_bar}}] {{{unit}}}/{{total_{unit}}} ({{{rate}}}, {{eta}} left)"
    );
    bar.set_style(
        ProgressStyle::with_template(&template)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

/// Replays a file of CloudEvents: NDJSON (one event per line) or one JSON array. The progress
/// bar counts bytes read.
pub async fn from_file(
    path: &Path,
    catalog: &Catalog,
    policy: TimePolicy,
    clock: &dyn Clock,
    log: &dyn EventLog,
    progress: bool,
) -> Result<Summary> {
    let file = std::fs::File::open(path)
        .map_err(|e| Error::Config(format!("cannot open {}: {e}", path.display())))?;
    let len = file.metadata()?.len();
    let bar = if progress {
        bar(len, "bytes")
    } else {
        ProgressBar::hidden()
    };
    let mut reader = std::io::BufReader::with_capacity(1 << 20, bar.wrap_read(file));
    let mut feeder = Feeder::new(log, policy, clock);
    let mut first = String::new();
    // Skip leading blank lines to see whether the file is one JSON array.
    while reader.read_line(&mut first)? > 0 && first.trim().is_empty() {
        first.clear();
    }
    if first.trim_start().starts_with('[') {
        let mut text = first;
        std::io::Read::read_to_string(&mut reader, &mut text)?;
        let now = clock.now_ms();
        // A file is read whole, with no limit on its events.
        match tally_schemas::event::decode_batch(&text, catalog, &policy, now, usize::MAX) {
            Ok(events) => {
                for (i, e) in events.into_iter().enumerate() {
                    feeder.push(i as u64, e).await?;
                }
            }
            Err(BatchError::Invalid(e)) => feeder.summary.refuse(0, &e),
            Err(BatchError::TooMany(n)) => {
                return Err(Error::Config(format!(
                    "{n} events are more than replay can hold"
                )));
            }
        }
    } else {
        let mut line_no = 0u64;
        let mut line = first;
        loop {
            line_no += 1;
            let text = line.trim_end_matches(['\n', '\r']);
            if !text.trim().is_empty() {
                let now = clock.now_ms();
                feeder
                    .push(line_no, decode_event(text, catalog, &policy, now))
                    .await?;
            }
            line.clear();
            if reader.read_line(&mut line)? == 0 {
                break;
            }
        }
    }
    feeder.flush().await?;
    bar.finish_and_clear();
    Ok(feeder.summary)
}

/// Replays the records of `source` at offsets `[from, to)` of each of `partitions` (every
/// partition when empty; `to` defaults to each partition's end when the replay starts). The
/// progress bar counts records.
#[allow(clippy::too_many_arguments)]
pub async fn from_log(
    source: &dyn EventLog,
    partitions: &[u32],
    from: u64,
    to: Option<u64>,
    policy: TimePolicy,
    clock: &dyn Clock,
    log: &dyn EventLog,
    progress: bool,
) -> Result<Summary> {
    let ends = source.end_offsets().await?;
    if let Some(p) = partitions
        .iter()
        .find(|p| !ends.iter().any(|(q, _)| q == *p))
    {
        return Err(Error::Config(format!("the source has no partition {p}")));
    }
    let mut reader: Box<dyn LogReader> = source.reader()?;
    // Remaining range per partition; partitions not replayed are moved to their end.
    let mut ranges: BTreeMap<u32, (u64, u64)> = BTreeMap::new();
    for &(p, end) in &ends {
        let wanted = partitions.is_empty() || partitions.contains(&p);
        let stop = to.unwrap_or(end).min(end);
        if wanted && from < stop {
            ranges.insert(p, (from, stop));
            reader.seek(p, from);
        } else {
            reader.seek(p, end);
        }
    }
    let total: u64 = ranges.values().map(|(a, b)| b - a).sum();
    let bar = if progress {
        bar(total, "pos")
    } else {
        ProgressBar::hidden()
    };
    let mut feeder = Feeder::new(log, policy, clock);
    let mut idle = 0;
    while !ranges.is_empty() {
        let records = reader.poll(BATCH, Duration::from_millis(200)).await?;
        if records.is_empty() {
            // The source may have dropped records below `to` (retention, compaction): give up
            // on a range once nothing came for a while.
            idle += 1;
            if idle >= 50 {
                bar.println(format!(
                    "no more records in {:?} (offsets below the end are gone); stopping",
                    ranges.keys().collect::<Vec<_>>()
                ));
                break;
            }
            continue;
        }
        idle = 0;
        for r in records {
            let Some(&(_, stop)) = ranges.get(&r.partition) else {
                continue;
            };
            if r.offset >= stop {
                continue;
            }
            bar.inc(1);
            feeder.push(r.offset, Ok(r.event)).await?;
            if r.offset + 1 >= stop {
                ranges.remove(&r.partition);
            }
        }
    }
    feeder.flush().await?;
    bar.finish_and_clear();
    Ok(feeder.summary)
}

/// The log to replay from: a Kafka topic on the configured brokers or an embedded `events.db`.
pub fn open_source(
    config: &crate::Config,
    topic: Option<&str>,
    events_db: Option<&Path>,
    clock: Arc<dyn Clock>,
) -> Result<Arc<dyn EventLog>> {
    match (topic, events_db) {
        (Some(topic), None) => {
            let mut k = crate::app::kafka_config(config).ok_or_else(|| {
                Error::Config("--from-topic needs kafka_brokers (TALLY_KAFKA_BROKERS)".into())
            })?;
            k.topic = topic.to_owned();
            Ok(Arc::new(tally_backends::log::kafka::KafkaLog::connect(k)?))
        }
        (None, Some(path)) => {
            if !path.exists() {
                return Err(Error::Config(format!("{} does not exist", path.display())));
            }
            let c = tally_backends::log::embedded::EmbeddedLogConfig::new(path.to_path_buf());
            Ok(Arc::new(tally_backends::log::embedded::EmbeddedLog::open(
                c, clock,
            )?))
        }
        _ => Err(Error::Config(
            "give one of --file, --from-topic or --from-events-db".into(),
        )),
    }
}

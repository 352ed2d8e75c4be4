//! Tally's configuration: built-in defaults, then an optional TOML file (`--config` or
//! `TALLY_CONFIG`), then `TALLY_*` environment variables. Every setting has one name: the key
//! `data_dir` in the file is `TALLY_DATA_DIR` in the environment. Unknown keys in the file are
//! errors; unknown `TALLY_*` variables are reported in the log. Durations are written like `200ms`,
//! `30s`, `5m`, `35d`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Public API listener (events, checks, usage, customers). `TALLY_LISTEN`.
    pub listen: SocketAddr,
    /// Admin listener: `/metrics`, `/healthz`, `/readyz`. `TALLY_ADMIN_LISTEN`.
    pub admin_listen: SocketAddr,
    /// Directory of the embedded log and store. `TALLY_DATA_DIR`.
    pub data_dir: PathBuf,
    /// A meter and plan catalogue replacing the built-in one. `TALLY_CATALOG_FILE`.
    pub catalog_file: Option<PathBuf>,
    /// Log filter, in `tracing` directive syntax (`info`, `tally=debug`). `TALLY_LOG`.
    pub log: String,
    /// `text` or `json` log lines. `TALLY_LOG_FORMAT`.
    pub log_format: LogFormat,
    /// A bootstrap API key with every scope, for automation (at least 32 characters; not
    /// stored). With it set the API never runs open. `TALLY_ADMIN_KEY`.
    #[serde(serialize_with = "redacted")]
    pub admin_key: Option<String>,
    /// Longest a client may take to send a request's headers, or stay idle between requests on
    /// a kept-alive connection, before the connection is closed. `TALLY_HEADER_TIMEOUT`.
    #[serde(with = "duration")]
    pub header_timeout: Duration,
    /// Longest a client may take to send a request's body; slower ones get 408.
    /// `TALLY_BODY_TIMEOUT`.
    #[serde(with = "duration")]
    pub body_timeout: Duration,
    /// Largest request body accepted by `POST /v1/events`, in bytes. `TALLY_MAX_BODY_BYTES`.
    pub max_body_bytes: usize,
    /// Most events in one ingest request. `TALLY_MAX_BATCH_EVENTS`.
    pub max_batch_events: usize,
    /// Most distinct combinations of dimension values per customer, meter and month that an
    /// ingest process admits (`dimension_cap_exceeded` past it).
    /// `TALLY_MAX_DIMENSION_COMBINATIONS`.
    pub max_dimension_combinations: usize,
    /// Most distinct values of a `unique_count` meter per customer, meter and month that an
    /// ingest process admits (`distinct_cap_exceeded` past it). `TALLY_MAX_DISTINCT_VALUES`.
    pub max_distinct_values: usize,
    /// Oldest event time accepted; older events are refused with `event_too_old`.
    /// `TALLY_LATE_WINDOW`.
    #[serde(with = "duration")]
    pub late_window: Duration,
    /// Furthest event time ahead of the clock accepted (clock skew). `TALLY_FUTURE_TOLERANCE`.
    #[serde(with = "duration")]
    pub future_tolerance: Duration,
    /// How long an event's (`source`, `id`) is remembered to drop duplicates; at least the late
    /// window plus the future tolerance. `TALLY_DEDUP_WINDOW`.
    #[serde(with = "duration")]
    pub dedup_window: Duration,
    /// How long the embedded log keeps records every consumer has passed. `TALLY_LOG_RETENTION`.
    #[serde(with = "duration")]
    pub log_retention: Duration,
    /// Most records the aggregator writes in one store transaction.
    /// `TALLY_AGGREGATOR_BATCH_EVENTS`.
    pub aggregator_batch_events: usize,
    /// Longest an event waits in the aggregator before it is written. `TALLY_FLUSH_INTERVAL`.
    #[serde(with = "duration")]
    pub flush_interval: Duration,
    /// How long a partition with unread records may make no progress in the store before an
    /// aggregator rejoins its consumer group. `TALLY_AGGREGATOR_STALL_REJOIN`.
    #[serde(with = "duration")]
    pub aggregator_stall_rejoin: Duration,
    /// Whether the enforcer answers before its state is loaded (fail open) or answers 503
    /// (fail closed). `TALLY_FAIL_OPEN`.
    pub fail_open: bool,
    /// How often the enforcer reads customer changes made by other processes.
    /// `TALLY_CUSTOMER_REFRESH`.
    #[serde(with = "duration")]
    pub customer_refresh: Duration,
    /// How often meters created, changed or archived through `/v1/meters` by other processes
    /// are picked up. `TALLY_METERS_REFRESH`.
    #[serde(with = "duration")]
    pub meters_refresh: Duration,
    /// URLs that receive every threshold notification as a signed POST. In the environment, a
    /// comma-separated list. `TALLY_WEBHOOK_URLS`.
    #[serde(deserialize_with = "list")]
    pub webhook_urls: Vec<String>,
    /// Key of the `Tally-Signature` HMAC-SHA256 on webhooks; unsigned when unset.
    /// `TALLY_WEBHOOK_SECRET`.
    #[serde(serialize_with = "redacted")]
    pub webhook_secret: Option<String>,
    /// Delivery attempts per webhook URL before giving up. `TALLY_WEBHOOK_MAX_ATTEMPTS`.
    pub webhook_max_attempts: u32,
    /// Wait before the first webhook retry; doubles with every attempt.
    /// `TALLY_WEBHOOK_RETRY_BASE`.
    #[serde(with = "duration")]
    pub webhook_retry_base: Duration,
    /// Timeout of one webhook attempt; a delivery's lease in the outbox is its next attempt's
    /// time plus twice this. `TALLY_WEBHOOK_TIMEOUT`.
    #[serde(with = "duration")]
    pub webhook_timeout: Duration,
    /// How long a shutdown may take to drain requests and flush. `TALLY_SHUTDOWN_TIMEOUT`.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
    /// Kafka bootstrap servers (`host:port,...`); when set, Kafka replaces the embedded log.
    /// `TALLY_KAFKA_BROKERS`.
    pub kafka_brokers: Option<String>,
    /// Topic of usage events (threshold notifications use `<topic>.notifications`).
    /// `TALLY_KAFKA_TOPIC`.
    pub kafka_topic: String,
    /// Consumer group the aggregators share the topic's partitions in.
    /// `TALLY_KAFKA_CONSUMER_GROUP`.
    pub kafka_consumer_group: String,
    /// Partitions of the topic when `tally migrate` creates it. `TALLY_KAFKA_PARTITIONS`.
    pub kafka_partitions: u32,
    /// Replication factor of the topics `tally migrate` creates. `TALLY_KAFKA_REPLICATION`.
    pub kafka_replication: u32,
    /// Longest ingest waits for the broker's acknowledgement before answering 503.
    /// `TALLY_KAFKA_DELIVERY_TIMEOUT`.
    #[serde(with = "duration")]
    pub kafka_delivery_timeout: Duration,
    /// Consumer-group session timeout: how soon a dead aggregator's partitions move.
    /// `TALLY_KAFKA_SESSION_TIMEOUT`.
    #[serde(with = "duration")]
    pub kafka_session_timeout: Duration,
    /// ClickHouse HTTP endpoint (`http://host:8123`); when set, ClickHouse replaces the
    /// embedded store. `TALLY_CLICKHOUSE_URL`.
    pub clickhouse_url: Option<String>,
    /// ClickHouse database. `TALLY_CLICKHOUSE_DATABASE`.
    pub clickhouse_database: String,
    /// ClickHouse user. `TALLY_CLICKHOUSE_USER`.
    pub clickhouse_user: Option<String>,
    /// ClickHouse password. `TALLY_CLICKHOUSE_PASSWORD`.
    #[serde(serialize_with = "redacted")]
    pub clickhouse_password: Option<String>,
    /// Stripe secret key; without it billing-sync only logs what it would send.
    /// `TALLY_STRIPE_SECRET_KEY`.
    #[serde(serialize_with = "redacted")]
    pub stripe_secret_key: Option<String>,
    /// Signing secret of Stripe's webhooks (`whsec_...`). `TALLY_STRIPE_WEBHOOK_SECRET`.
    #[serde(serialize_with = "redacted")]
    pub stripe_webhook_secret: Option<String>,
    /// Stripe's API, or a compatible server. `TALLY_STRIPE_API_BASE`.
    pub stripe_api_base: String,
    /// `v1` (one meter event per request, through async-stripe) or `v2` (the meter event
    /// stream, up to 100 events per request). `TALLY_STRIPE_METER_API`.
    pub stripe_meter_api: tally_billing_sync::MeterApi,
    /// Host of Stripe's v2 meter event stream. `TALLY_STRIPE_METER_EVENTS_BASE`.
    pub stripe_meter_events_base: String,
    /// Most Stripe requests per second. `TALLY_STRIPE_REQUESTS_PER_SECOND`.
    pub stripe_requests_per_second: u32,
    /// Stripe meter `event_name` for Tally meters whose names differ, as `meter=event_name`;
    /// in the environment a comma-separated list. `TALLY_STRIPE_EVENT_NAMES`.
    #[serde(deserialize_with = "list")]
    pub stripe_event_names: Vec<String>,
    /// Meters of other aggregations than count and sum (max, min, unique_count, latest)
    /// reported to Stripe, each as its period's figure, to a Stripe meter with the `last`
    /// formula; in the environment a comma-separated list. `TALLY_STRIPE_LAST_METERS`.
    #[serde(deserialize_with = "list")]
    pub stripe_last_meters: Vec<String>,
    /// Tally plan per Stripe price or product id, as `price_or_product=plan`, for subscription
    /// webhooks; in the environment a comma-separated list. `TALLY_STRIPE_PLANS`.
    #[serde(deserialize_with = "list")]
    pub stripe_plans: Vec<String>,
    /// How often billing-sync reports. `TALLY_BILLING_SYNC_INTERVAL`.
    #[serde(with = "duration")]
    pub billing_sync_interval: Duration,
    /// How far behind now a reported window ends, so the aggregator has flushed it.
    /// `TALLY_BILLING_SYNC_SETTLE`.
    #[serde(with = "duration")]
    pub billing_sync_settle: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            data_dir: PathBuf::from("./data"),
            catalog_file: None,
            admin_key: None,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            log: "info".into(),
            log_format: LogFormat::Text,
            max_body_bytes: 16 * 1024 * 1024,
            max_batch_events: 50_000,
            max_dimension_combinations: 1_000,
            max_distinct_values: 100_000,
            late_window: Duration::from_secs(35 * 86_400),
            future_tolerance: Duration::from_secs(5 * 60),
            dedup_window: Duration::from_secs(36 * 86_400),
            log_retention: Duration::from_secs(7 * 86_400),
            aggregator_batch_events: 50_000,
            flush_interval: Duration::from_millis(200),
            aggregator_stall_rejoin: Duration::from_secs(60),
            fail_open: true,
            customer_refresh: Duration::from_secs(1),
            meters_refresh: Duration::from_secs(2),
            webhook_urls: Vec::new(),
            webhook_secret: None,
            webhook_max_attempts: 8,
            webhook_retry_base: Duration::from_secs(1),
            webhook_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            kafka_brokers: None,
            kafka_topic: "tally.usage-events".into(),
            kafka_consumer_group: "tally-aggregator".into(),
            kafka_partitions: 8,
            kafka_replication: 1,
            kafka_delivery_timeout: Duration::from_secs(10),
            kafka_session_timeout: Duration::from_secs(10),
            clickhouse_url: None,
            clickhouse_database: "tally".into(),
            clickhouse_user: None,
            clickhouse_password: None,
            stripe_secret_key: None,
            stripe_webhook_secret: None,
            stripe_api_base: "https://api.stripe.com".into(),
            stripe_meter_api: tally_billing_sync::MeterApi::V1,
            stripe_meter_events_base: "https://meter-events.stripe.com".into(),
            stripe_requests_per_second: 25,
            stripe_event_names: Vec::new(),
            stripe_last_meters: Vec::new(),
            stripe_plans: Vec::new(),
            billing_sync_interval: Duration::from_secs(60),
            billing_sync_settle: Duration::from_secs(120),
        }
    }
}

/// Durations as people write them: `200ms`, `30s`, `5m`, `48h`, `35d`.
mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let ms = d.as_millis();
        let text = match ms {
            0 => "0s".to_string(),
            ms if ms % 86_400_000 == 0 => format!("{}d", ms / 86_400_000),
            ms if ms % 3_600_000 == 0 => format!("{}h", ms / 3_600_000),
            ms if ms % 60_000 == 0 => format!("{}m", ms / 60_000),
            ms if ms % 1_000 == 0 => format!("{}s", ms / 1_000),
            ms => format!("{ms}ms"),
        };
        s.serialize_str(&text)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!("`{text}` is not a duration such as 30s or 5m: {e}"))
        })
    }
}

/// A list written as a sequence (file) or as a comma-separated string (environment).
fn list<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum List {
        One(String),
        Many(Vec<String>),
    }
    Ok(match List::deserialize(d)? {
        List::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        List::Many(v) => v,
    })
}

/// Secrets are never printed.
fn redacted<S: serde::Serializer>(
    v: &Option<String>,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_some("<redacted>"),
        None => s.serialize_none(),
    }
}

/// Environment variables that name Tally's configuration file rather than a setting.
const NOT_SETTINGS: &[&str] = &["CONFIG"];

impl Config {
    /// The setting names, as written in the file.
    pub fn keys() -> Vec<String> {
        match serde_json::to_value(Config::default()) {
            Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// Loads defaults, then `file`, then the `TALLY_*` variables of `env`.
    pub fn load(file: Option<&Path>, env: &[(String, String)]) -> Result<(Config, Vec<String>)> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(Error::Config(format!(
                    "configuration file {} does not exist",
                    path.display()
                )));
            }
            fig = fig.merge(Toml::file(path));
        }
        let keys = Config::keys();
        let mut unknown = Vec::new();
        let mut known_env = Vec::new();
        for (k, v) in env {
            let Some(name) = k.strip_prefix("TALLY_") else {
                continue;
            };
            if NOT_SETTINGS.contains(&name) {
                continue;
            }
            let key = name.to_ascii_lowercase();
            if keys.contains(&key) {
                known_env.push((key, v.clone()));
            } else {
                unknown.push(k.clone());
            }
        }
        for (key, value) in known_env {
            // Values are typed the way figment's `Env` types them: numbers, booleans, strings.
            let value: figment::value::Value = value.parse().unwrap_or_else(|e| match e {});
            fig = fig.merge(Serialized::default(&key, value));
        }
        let config: Config = fig.extract().map_err(|e| Error::Config(e.to_string()))?;
        config.check()?;
        Ok((config, unknown))
    }

    /// Cross-field rules, checked at load time.
    pub fn check(&self) -> Result<()> {
        if self.dedup_window < self.late_window + self.future_tolerance {
            return Err(Error::Config(format!(
                "dedup_window ({}) must be at least late_window + future_tolerance ({}): \
                 otherwise a late duplicate could be counted twice",
                humantime::format_duration(self.dedup_window),
                humantime::format_duration(self.late_window + self.future_tolerance),
            )));
        }
        if self.max_batch_events == 0 || self.aggregator_batch_events == 0 {
            return Err(Error::Config("batch sizes must be at least 1".into()));
        }
        for url in &self.webhook_urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "webhook URL `{url}` must start with http:// or https://"
                )));
            }
        }
        if !tally_backends::store::clickhouse::schema::valid_database_name(
            &self.clickhouse_database,
        ) {
            return Err(Error::Config(format!(
                "clickhouse_database `{}` must be a letter followed by letters, digits or _",
                self.clickhouse_database
            )));
        }
        if self.kafka_partitions == 0 || self.kafka_replication == 0 {
            return Err(Error::Config(
                "kafka_partitions and kafka_replication must be at least 1".into(),
            ));
        }
        for pair in &self.stripe_event_names {
            if !pair
                .split_once('=')
                .is_some_and(|(m, e)| !m.is_empty() && !e.is_empty())
            {
                return Err(Error::Config(format!(
                    "stripe_event_names entry `{pair}` must be meter=event_name"
                )));
            }
        }
        if self.stripe_requests_per_second == 0 || self.billing_sync_interval.is_zero() {
            return Err(Error::Config(
                "stripe_requests_per_second and billing_sync_interval must be above zero".into(),
            ));
        }
        if self.admin_key.as_ref().is_some_and(|k| k.trim().len() < 32) {
            return Err(Error::Config(
                "admin_key must be at least 32 characters (for example `openssl rand -hex 32`)"
                    .into(),
            ));
        }
        if self.header_timeout.is_zero() || self.body_timeout.is_zero() {
            return Err(Error::Config(
                "header_timeout and body_timeout must be greater than zero".into(),
            ));
        }
        if self.kafka_brokers.is_some() && self.clickhouse_url.is_none() {
            // The embedded store trusts the embedded log to drop duplicates; a Kafka topic
            // does not, so a retried event would be counted twice.
            return Err(Error::Config(
                "kafka_brokers needs clickhouse_url: the embedded store does not drop the \
                 duplicates a Kafka log carries (set both, or neither for the embedded default)"
                    .into(),
            ));
        }
        if self.flush_interval.is_zero() {
            return Err(Error::Config(
                "flush_interval must be greater than zero".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tally.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:7000\"\nflush_interval = \"1s\"\nfail_open = false\n",
        )
        .unwrap();
        let (c, unknown) = Config::load(
            Some(&file),
            &env(&[
                ("TALLY_FLUSH_INTERVAL", "50ms"),
                ("TALLY_CONFIG", "x"),
                ("TALLY_NOPE", "1"),
                ("HOME", "/"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(c.flush_interval, Duration::from_millis(50));
        assert!(!c.fail_open);
        assert_eq!(c.admin_listen, Config::default().admin_listen);
        assert_eq!(unknown, vec!["TALLY_NOPE".to_string()]);
        let (c, _) = Config::load(
            None,
            &env(&[
                ("TALLY_MAX_BATCH_EVENTS", "10000"),
                ("TALLY_FAIL_OPEN", "false"),
            ]),
        )
        .unwrap();
        assert_eq!((c.max_batch_events, c.fail_open), (10_000, false));
    }

    #[test]
    fn bad_settings_are_refused_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tally.toml");
        std::fs::write(&file, "lisen = \"127.0.0.1:7000\"\n").unwrap();
        let err = Config::load(Some(&file), &[]).unwrap_err().to_string();
        assert!(err.contains("lisen"), "{err}");
        let err = Config::load(None, &env(&[("TALLY_FLUSH_INTERVAL", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("soon"), "{err}");
        let err = Config::load(None, &env(&[("TALLY_DEDUP_WINDOW", "1d")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dedup_window"), "{err}");
        assert!(Config::load(Some(Path::new("/nonexistent/tally.toml")), &[]).is_err());
    }

    #[test]
    fn kafka_log_with_embedded_store_is_refused() {
        let err = Config::load(None, &env(&[("TALLY_KAFKA_BROKERS", "127.0.0.1:9092")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka_brokers needs clickhouse_url"), "{err}");
        let both = env(&[
            ("TALLY_KAFKA_BROKERS", "127.0.0.1:9092"),
            ("TALLY_CLICKHOUSE_URL", "http://127.0.0.1:8123"),
        ]);
        assert!(Config::load(None, &both).is_ok());
    }

    #[test]
    fn the_shipped_example_file_matches_the_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/tally.toml");
        let (c, _) = Config::load(Some(&example), &[]).unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn stripe_last_meters_name_meters_reported_by_their_figure() {
        let (c, _) = Config::load(
            None,
            &env(&[("TALLY_STRIPE_LAST_METERS", "wasm_modules, collaborators")]),
        )
        .unwrap();
        assert_eq!(c.stripe_last_meters, ["wasm_modules", "collaborators"]);
        assert!(crate::app::load_catalog(&c).is_ok());
        for (list, why) in [
            ("api_requests", "a count or sum meter"),
            ("seats", "not a meter of the catalogue"),
        ] {
            let (c, _) = Config::load(None, &env(&[("TALLY_STRIPE_LAST_METERS", list)])).unwrap();
            let e = crate::app::load_catalog(&c).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }
}

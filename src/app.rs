//! Wiring: builds the adapters once, starts the pipeline tasks of the chosen components and
//! assembles the public and admin routers. `tally run` starts every component in one process;
//! `tally ingest|aggregator|enforcer|billing-sync` start one each.

use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::middleware;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tally_aggregator::{AggregatorSettings, query};
use tally_backends::catalog::LiveCatalog;
use tally_backends::log::EventLog;
use tally_backends::log::embedded::{EmbeddedLog, EmbeddedLogConfig};
use tally_backends::log::kafka::{KafkaLog, KafkaLogConfig};
use tally_backends::store::Store;
use tally_backends::store::clickhouse::{ClickHouseConfig, ClickHouseStore};
use tally_backends::store::sqlite::SqliteStore;
use tally_enforcer::http::EnforcerHttp;
use tally_enforcer::{EnforcerSettings, State};
use tally_http::metrics;
use tally_http::problem::ApiError;
use tally_ingest::{IngestSettings, IngestState};
use tally_schemas::{Catalog, Clock, TimePolicy};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_http::catch_panic::CatchPanicLayer;

use crate::auth::KeyRing;
use crate::config::Config;
use crate::{Error, Result};

/// A stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Component {
    Ingest,
    Aggregator,
    Enforcer,
    BillingSync,
}

impl Component {
    pub const ALL: [Component; 4] = [
        Component::Ingest,
        Component::Aggregator,
        Component::Enforcer,
        Component::BillingSync,
    ];
}

/// A started set of components.
pub struct App {
    /// The public API of the started components.
    pub router: Router,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub admin: Router,
    /// The enforcer's state, when the enforcer runs here.
    pub enforcer: Option<Arc<State>>,
    /// The API keys (see [`crate::auth`]).
    pub keys: Arc<KeyRing>,
    tasks: TaskTracker,
    stop: CancellationToken,
    fatal: Arc<Mutex<Option<String>>>,
}

/// Loads the catalogue named in the configuration, or the built-in one, and checks that
/// `stripe_last_meters` names meters of it that are reported by their figure.
pub fn load_catalog(config: &Config) -> Result<Catalog> {
    let catalog = match &config.catalog_file {
        None => Catalog::builtin(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Config(format!("cannot read catalogue {}: {e}", path.display()))
            })?;
            Catalog::from_toml(&text)?
        }
    };
    for name in &config.stripe_last_meters {
        match catalog.meter(name) {
            Some(m) if !m.aggregation.is_additive() => {}
            Some(_) => {
                return Err(Error::Config(format!(
                    "stripe_last_meters names `{name}`, a count or sum meter: those are reported \
                     as they grow"
                )));
            }
            None => {
                return Err(Error::Config(format!(
                    "stripe_last_meters names `{name}`, which is not a meter of the catalogue"
                )));
            }
        }
    }
    Ok(catalog)
}

/// The Kafka settings, when Kafka is configured.
pub fn kafka_config(config: &Config) -> Option<KafkaLogConfig> {
    let brokers = config.kafka_brokers.as_ref()?;
    let mut c = KafkaLogConfig::new(brokers.clone(), config.kafka_topic.clone());
    c.partitions = config.kafka_partitions;
    c.replication = config.kafka_replication;
    c.delivery_timeout = config.kafka_delivery_timeout;
    c.session_timeout = config.kafka_session_timeout;
    Some(c)
}

/// The ClickHouse settings, when ClickHouse is configured.
pub fn clickhouse_config(config: &Config) -> Option<ClickHouseConfig> {
    let url = config.clickhouse_url.as_ref()?;
    let mut c = ClickHouseConfig::new(url.clone(), config.clickhouse_database.clone());
    c.user = config.clickhouse_user.clone();
    c.password = config.clickhouse_password.clone();
    c.dedup_window = config.dedup_window;
    Some(c)
}

/// `name=value` settings (checked at load time) as a map.
fn name_value_pairs(list: &[String]) -> std::collections::HashMap<String, String> {
    list.iter()
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// Billing-sync's settings from the configuration.
pub fn billing_settings(config: &Config) -> tally_billing_sync::BillingSettings {
    tally_billing_sync::BillingSettings {
        interval: config.billing_sync_interval,
        settle: config.billing_sync_settle,
        stripe: config
            .stripe_secret_key
            .as_ref()
            .map(|key| tally_billing_sync::StripeSettings {
                secret_key: key.clone(),
                api_base: config.stripe_api_base.clone(),
                requests_per_second: config.stripe_requests_per_second,
                timeout: std::time::Duration::from_secs(30),
                api: config.stripe_meter_api,
                events_base: config.stripe_meter_events_base.clone(),
            }),
        event_names: name_value_pairs(&config.stripe_event_names),
        last_meters: config.stripe_last_meters.iter().cloned().collect(),
        ..Default::default()
    }
}

/// `tally billing reconcile`: Tally's totals against Stripe's, for `[from_ms, to_ms)`.
pub async fn reconcile(
    config: &Config,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<tally_billing_sync::Difference>> {
    let store = open_store(config)?;
    let catalog = LiveCatalog::new(load_catalog(config)?, store.clone())
        .refresh()
        .await?;
    tally_billing_sync::reconcile(
        &billing_settings(config),
        &catalog,
        store.as_ref(),
        from_ms,
        to_ms,
    )
    .await
    .map_err(Error::from)
}

/// The API keys of the configured store, read (`tally keys`).
pub async fn key_ring(config: &Config) -> Result<KeyRing> {
    let ring = KeyRing::new(
        open_store(config)?,
        Arc::new(tally_schemas::SystemClock),
        None,
        false,
        config.max_batch_events,
    );
    ring.refresh().await.map_err(|e| match e {
        crate::auth::KeyError::Store(e) => Error::Backend(e),
        other => Error::Config(other.to_string()),
    })?;
    Ok(ring)
}

/// `tally migrate`: creates or upgrades the Kafka topics and the ClickHouse schema that the
/// configuration names; idempotent. Returns what it did, one line each.
pub async fn migrate(config: &Config) -> Result<Vec<String>> {
    let mut done = Vec::new();
    if let Some(k) = kafka_config(config) {
        KafkaLog::create_topics(&k).await?;
        done.push(format!(
            "kafka: topics {} and {}.notifications exist",
            k.topic, k.topic
        ));
    }
    if let Some(c) = clickhouse_config(config) {
        let applied = ClickHouseStore::migrate(&c).await?;
        done.push(format!(
            "clickhouse: database {} at schema version {} (applied now: {:?})",
            c.database,
            tally_backends::store::clickhouse::schema::MIGRATIONS
                .last()
                .map_or(0, |m| m.version),
            applied
        ));
    }
    if done.is_empty() {
        done.push("nothing to migrate: neither kafka_brokers nor clickhouse_url is set".into());
    }
    Ok(done)
}

/// The configured event log: Kafka when `kafka_brokers` is set, else the embedded one.
pub fn open_log(config: &Config, clock: Arc<dyn Clock>) -> Result<Arc<dyn EventLog>> {
    if let Some(k) = kafka_config(config) {
        return Ok(Arc::new(KafkaLog::connect(k)?));
    }
    let mut c = EmbeddedLogConfig::new(Path::new(&config.data_dir).join("events.db"));
    c.dedup_window = config.dedup_window;
    c.retention = config.log_retention;
    Ok(Arc::new(EmbeddedLog::open(c, clock)?))
}

fn open_store(config: &Config) -> Result<Arc<dyn Store>> {
    if let Some(c) = clickhouse_config(config) {
        return Ok(Arc::new(ClickHouseStore::new(&c)));
    }
    Ok(Arc::new(SqliteStore::open(
        Path::new(&config.data_dir).join("usage.db"),
    )?))
}

impl App {
    /// Opens the adapters and starts the pipeline tasks of `components`.
    pub async fn start(
        config: &Config,
        components: &[Component],
        clock: Arc<dyn Clock>,
    ) -> Result<App> {
        let wants = |c: Component| components.contains(&c);
        let needs_log =
            wants(Component::Ingest) || wants(Component::Aggregator) || wants(Component::Enforcer);
        let log = needs_log
            .then(|| open_log(config, clock.clone()))
            .transpose()?;
        // Every component reads the API keys and the managed meters from the store.
        let store = open_store(config)?;
        let catalog = LiveCatalog::new(load_catalog(config)?, store.clone());
        if let Err(e) = catalog.refresh().await {
            // Read again every `meters_refresh`, and whenever a reading names a meter unknown.
            tracing::warn!(error = %e, "managed meters not read yet; retrying in the background");
        }
        let w = Wiring {
            config,
            catalog,
            store,
            clock,
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            fatal: Arc::new(Mutex::new(None)),
        };
        // The enforcer's state, made first: ingest in the same process reads its period totals
        // to refuse events past the usage cap.
        let enforcer = (wants(Component::Enforcer) && log.is_some()).then(|| {
            Arc::new(State::following(
                w.catalog.clone(),
                w.clock.clone(),
                config.fail_open,
            ))
        });
        let mut router = Router::new();
        if let Some(log) = &log {
            if wants(Component::Ingest) {
                router = router.merge(w.ingest(log, enforcer.as_ref()));
            }
            if wants(Component::Aggregator) {
                router = router.merge(w.aggregator(log));
            }
            if let Some(state) = &enforcer {
                router = router.merge(w.enforcer(log, state));
            }
        }
        if wants(Component::BillingSync) {
            router = router.merge(w.billing_sync(enforcer.as_ref()));
        }
        router = router.merge(crate::meters::router(
            w.catalog.clone(),
            w.store.clone(),
            w.clock.clone(),
        ));
        w.tasks.spawn(
            w.catalog
                .clone()
                .keep_fresh(config.meters_refresh, w.stop.clone()),
        );
        let keys = w.key_ring().await;
        w.tasks.close();
        Ok(App {
            router: api_layers(router, &keys, config),
            admin: admin_router(enforcer.clone(), w.fatal.clone()),
            enforcer,
            keys,
            tasks: w.tasks,
            stop: w.stop,
            fatal: w.fatal,
        })
    }

    /// A token cancelled when a pipeline task failed: the process should stop.
    pub fn failed(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops the pipeline tasks (each finishes the batch in hand) and waits for them.
    pub async fn stop(self, timeout: std::time::Duration) -> Result<()> {
        self.stop.cancel();
        if tokio::time::timeout(timeout, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("pipeline tasks did not stop within the shutdown timeout");
        }
        match self.fatal.lock().ok().and_then(|f| f.clone()) {
            Some(reason) => Err(Error::Failed(reason)),
            None => Ok(()),
        }
    }
}

/// What the components of one process share while [`App::start`] wires them.
struct Wiring<'a> {
    config: &'a Config,
    catalog: Arc<LiveCatalog>,
    clock: Arc<dyn Clock>,
    store: Arc<dyn Store>,
    tasks: TaskTracker,
    stop: CancellationToken,
    fatal: Arc<Mutex<Option<String>>>,
}

impl Wiring<'_> {
    /// Runs a pipeline task; its failure stops the process (the reason goes to `/healthz`).
    fn spawn<E: std::fmt::Display + Send + 'static>(
        &self,
        name: &'static str,
        fut: impl std::future::Future<Output = std::result::Result<(), E>> + Send + 'static,
    ) {
        let (stop, fatal) = (self.stop.clone(), self.fatal.clone());
        self.tasks.spawn(async move {
            if let Err(e) = fut.await {
                tracing::error!(component = name, error = %e, "pipeline task failed; stopping");
                if let Ok(mut f) = fatal.lock() {
                    f.get_or_insert_with(|| format!("{name}: {e}"));
                }
                stop.cancel();
            }
        });
    }

    /// `POST /v1/events`, refusing events past the usage cap of the enforcer in this process.
    fn ingest(&self, log: &Arc<dyn EventLog>, enforcer: Option<&Arc<State>>) -> Router {
        let config = self.config;
        tally_ingest::router(IngestState {
            log: log.clone(),
            catalog: self.catalog.clone(),
            clock: self.clock.clone(),
            settings: Arc::new(IngestSettings {
                max_body_bytes: config.max_body_bytes,
                max_batch_events: config.max_batch_events,
                time_policy: TimePolicy {
                    late_window_ms: config.late_window.as_millis() as i64,
                    future_tolerance_ms: config.future_tolerance.as_millis() as i64,
                },
            }),
            dimensions: Arc::new(tally_ingest::dimensions::DimensionCap::new(
                config.max_dimension_combinations,
                config.max_distinct_values,
            )),
            room: enforcer.cloned().map(|state| {
                let room: tally_ingest::UsageRoom =
                    Arc::new(move |customer, meter, time_ms| state.room(customer, meter, time_ms));
                room
            }),
        })
    }

    /// The aggregator's task, and the query API and dashboard over what it writes.
    fn aggregator(&self, log: &Arc<dyn EventLog>) -> Router {
        let config = self.config;
        let settings = AggregatorSettings {
            max_batch_events: config.aggregator_batch_events,
            flush_interval: config.flush_interval,
            group: config.kafka_consumer_group.clone(),
            stall_rejoin: config.aggregator_stall_rejoin,
        };
        let run = tally_aggregator::run(
            settings,
            self.catalog.clone(),
            log.clone(),
            self.store.clone(),
            self.stop.clone(),
        );
        self.spawn("aggregator", run);
        query::router(query::QueryState {
            usage: self.store.clone(),
            customers: self.store.clone(),
            catalog: self.catalog.clone(),
            clock: self.clock.clone(),
        })
        .merge(crate::dashboard::router())
    }

    /// The enforcer's task (load, then follow the log), its HTTP and gRPC checks.
    fn enforcer(&self, log: &Arc<dyn EventLog>, state: &Arc<State>) -> Router {
        let config = self.config;
        let settings = EnforcerSettings {
            fail_open: config.fail_open,
            customer_refresh: config.customer_refresh,
            webhooks: tally_enforcer::webhooks::WebhookSettings {
                urls: config.webhook_urls.clone(),
                secret: config.webhook_secret.clone(),
                max_attempts: config.webhook_max_attempts,
                retry_base: config.webhook_retry_base,
                timeout: config.webhook_timeout,
                ..Default::default()
            },
            ..EnforcerSettings::default()
        };
        let run = tally_enforcer::run(
            settings,
            state.clone(),
            log.clone(),
            self.store.clone(),
            self.stop.clone(),
        );
        self.spawn("enforcer", run);
        tally_enforcer::http::router(EnforcerHttp {
            state: state.clone(),
            store: self.store.clone(),
        })
        .merge(tally_enforcer::grpc::router(state.clone()))
    }

    /// Billing-sync's task, its status and the Stripe webhooks, which update the enforcer of
    /// this process at once (enforcers elsewhere read changes from the store within
    /// `customer_refresh`).
    fn billing_sync(&self, enforcer: Option<&Arc<State>>) -> Router {
        let config = self.config;
        let status = tally_billing_sync::StatusHandle::default();
        let on_change = enforcer.cloned().map(|state| {
            let store = self.store.clone();
            let f: tally_billing_sync::webhooks::OnChange = Arc::new(move |id, record| {
                let (state, store) = (state.clone(), store.clone());
                Box::pin(async move {
                    if let Err(e) =
                        tally_enforcer::update_customer(&state, store.as_ref(), &id, record).await
                    {
                        tracing::warn!(customer = %id, error = %e, "enforcer not updated");
                    }
                })
            });
            f
        });
        let webhooks = tally_billing_sync::webhooks::StripeWebhooks {
            secret: config.stripe_webhook_secret.clone(),
            plans: name_value_pairs(&config.stripe_plans),
            catalog: self.catalog.clone(),
            store: self.store.clone(),
            clock: self.clock.clone(),
            on_change,
            status: status.clone(),
        };
        let run = tally_billing_sync::run(
            billing_settings(config),
            self.catalog.clone(),
            self.store.clone(),
            self.clock.clone(),
            status.clone(),
            self.stop.clone(),
        );
        self.spawn("billing-sync", run);
        tally_billing_sync::router(status)
            .merge(tally_billing_sync::webhooks::router(Arc::new(webhooks)))
    }

    /// The API keys, read once (until then only the bootstrap key passes) and kept fresh.
    async fn key_ring(&self) -> Arc<KeyRing> {
        let config = self.config;
        let keys = Arc::new(KeyRing::new(
            self.store.clone(),
            self.clock.clone(),
            config.admin_key.as_deref(),
            open_on_loopback(config),
            config.max_batch_events,
        ));
        if let Err(e) = keys.refresh().await {
            // Until the keys are read, only the bootstrap key passes; others get 503.
            tracing::warn!(error = %e, "API keys not read yet; retrying in the background");
        }
        announce_access(config, &keys);
        self.tasks.spawn(keys.clone().keep_fresh(self.stop.clone()));
        keys
    }
}

/// The public API: the components' routes, the key and operator endpoints, and the layers
/// every request passes (access control, body timeout, request metrics, panics as 500).
fn api_layers(router: Router, keys: &Arc<KeyRing>, config: &Config) -> Router {
    router
        .merge(crate::keys::router(keys.clone()))
        .route("/openapi.json", get(crate::openapi::openapi_json))
        .route("/v1/operator/stats", get(crate::operator::stats))
        .fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
        .layer(middleware::from_fn_with_state(
            keys.clone(),
            crate::auth::require,
        ))
        .layer(tower_http::timeout::RequestBodyTimeoutLayer::new(
            config.body_timeout,
        ))
        .layer(middleware::from_fn(metrics::track))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
            .into_response()
        }))
}

/// Whether the API may run open while no key exists: the embedded default, listening on
/// loopback only, without a bootstrap admin key (see [`crate::auth`]).
pub fn open_on_loopback(config: &Config) -> bool {
    config.kafka_brokers.is_none()
        && config.clickhouse_url.is_none()
        && config.listen.ip().is_loopback()
        && config.admin_key.is_none()
}

/// Says, loudly where it matters, how the API is protected.
fn announce_access(config: &Config, keys: &KeyRing) {
    if keys.is_open() {
        tracing::warn!(
            listen = %config.listen,
            "API OPEN: no API key exists, so every request on this loopback listener is allowed, \
             from any local user or process. Create a key (`tally keys create --name me --scope \
             admin`) or set TALLY_ADMIN_KEY to require keys; a listener beyond loopback, Kafka \
             or ClickHouse always requires them"
        );
    } else if config.admin_key.is_none() && keys.list().is_empty() {
        tracing::warn!(
            "no API key exists and TALLY_ADMIN_KEY is not set: every API call that needs a key \
             is refused; create one with `tally keys create --name me --scope admin`"
        );
    } else {
        tracing::info!(
            keys = keys.list().len(),
            bootstrap_admin_key = config.admin_key.is_some(),
            "API keys required"
        );
    }
}

/// What the admin endpoints read.
#[derive(Clone)]
pub(crate) struct AdminState {
    enforcer: Option<Arc<State>>,
    fatal: Arc<Mutex<Option<String>>>,
}

/// The body of `/healthz` and `/readyz`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, `failed`, `ready` or `loading`.
    pub status: &'static str,
    /// Why a pipeline task failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Liveness (admin listener): 503 once a pipeline task failed.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "admin",
    responses(
        (status = 200, description = "Running", body = Health),
        (status = 503, description = "A pipeline task failed; the process is stopping", body = Health),
    )
)]
pub(crate) async fn health(AxState(s): AxState<AdminState>) -> (StatusCode, Json<Health>) {
    let failed = s.fatal.lock().ok().and_then(|f| f.clone());
    match failed {
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "failed",
                reason: Some(reason),
            }),
        ),
        None => (
            StatusCode::OK,
            Json(Health {
                status: "ok",
                reason: None,
            }),
        ),
    }
}

/// Readiness (admin listener): 503 while the enforcer loads its state.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "admin",
    responses(
        (status = 200, description = "Ready to serve", body = Health),
        (status = 503, description = "The enforcer is loading its state", body = Health),
    )
)]
pub(crate) async fn ready(AxState(s): AxState<AdminState>) -> (StatusCode, Json<Health>) {
    let (status, word) = match s.enforcer {
        Some(e) if !e.is_ready() => (StatusCode::SERVICE_UNAVAILABLE, "loading"),
        _ => (StatusCode::OK, "ready"),
    };
    (
        status,
        Json(Health {
            status: word,
            reason: None,
        }),
    )
}

fn admin_router(enforcer: Option<Arc<State>>, fatal: Arc<Mutex<Option<String>>>) -> Router {
    Router::new()
        .route("/metrics", get(metrics::render))
        .route("/healthz", get(health))
        .route("/readyz", get(ready))
        .with_state(AdminState { enforcer, fatal })
}

/// Runs `components` on the given listeners until `shutdown` is cancelled or a pipeline task
/// fails; then drains HTTP requests and stops the pipeline within the shutdown timeout.
pub async fn run(
    config: Config,
    components: &[Component],
    clock: Arc<dyn Clock>,
    listener: TcpListener,
    admin_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut config = config;
    // Open-on-loopback is decided on the address actually bound.
    config.listen = listener.local_addr()?;
    let app = App::start(&config, components, clock).await?;
    let failed = app.failed();
    let http_stop = CancellationToken::new();
    {
        let (http_stop, shutdown, failed) = (http_stop.clone(), shutdown.clone(), failed.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = failed.cancelled() => {}
            }
            http_stop.cancel();
        });
    }
    tracing::info!(
        listen = %listener.local_addr()?,
        admin = %admin_listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        components = ?components,
        "tally is serving"
    );
    let public = crate::serve::serve(
        listener,
        app.router.clone(),
        config.header_timeout,
        http_stop.clone(),
    );
    let admin = crate::serve::serve(
        admin_listener,
        app.admin.clone(),
        config.header_timeout,
        http_stop.clone(),
    );
    let (a, b) = tokio::join!(public, admin);
    a?;
    b?;
    app.stop(config.shutdown_timeout).await
}

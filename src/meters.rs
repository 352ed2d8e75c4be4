//! The catalogue, read back and managed: `GET /v1/meters`, `GET /v1/meters/{name}` and
//! `GET /v1/plans` (any key with the `read` scope), so dashboards and clients learn each meter's
//! unit, aggregation, scale, dimensions and event type, and each plan's limits, without reading
//! the TOML; and `POST /v1/meters`, `PATCH /v1/meters/{name}`, `DELETE /v1/meters/{name}`
//! (admin keys), which manage meters at runtime.
//!
//! # Managed meters
//! A meter created through the API is kept in the store and reaches every process within
//! `meters_refresh` (2 s by default), the one that created it at once; no restart. It is
//! counted from the first event accepted after that (earlier events of its type were refused as
//! of an unknown meter, or fed only the meters that existed). The catalogue file's meters are
//! read-only here (`meter_in_catalogue`): they change with the file.
//!
//! What may change (`PATCH`, a JSON merge patch over the meter's fields):
//! - always: `description`, and new dimensions in `group_by` (usage counted before has none of
//!   them: it reads back under the empty value);
//! - only while the store holds no usage of the meter: everything else (`aggregation`, `unit`,
//!   `value`, `scale`, `event_type`, `filter`, changing or removing a dimension), since it would
//!   rewrite what was counted (`immutable_field` otherwise). Events accepted but not yet
//!   counted were read under the definition of the time they were accepted.
//!
//! `DELETE` archives: the meter reads no more events, its usage stays readable, its name stays
//! taken (`meter_exists` for a new meter of that name). Archiving twice is no error.
//!
//! Concurrent changes of one meter in one process apply one after the other; in two processes
//! at once, the later write wins.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use serde_json::Value;
use tally_backends::catalog::LiveCatalog;
use tally_backends::store::UsageReader;
use tally_http::problem::ApiError;
use tally_schemas::catalog::MAX_METERS;
use tally_schemas::period::rfc3339;
use tally_schemas::{Catalog, Clock, ManagedMeter, Meter, Plan};
use utoipa::ToSchema;

/// Where a meter is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MeterSource {
    /// The catalogue file (read-only through the API).
    Catalogue,
    /// Created through `POST /v1/meters`.
    Api,
}

/// One meter, with its name.
#[derive(Debug, Serialize, ToSchema)]
pub struct MeterView {
    pub name: String,
    #[serde(flatten)]
    pub meter: Meter,
    pub source: MeterSource,
    /// Managed meters: when created, last changed and archived (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub archived: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MeterList {
    /// Every meter, archived ones included, in name order.
    pub meters: Vec<MeterView>,
}

/// One plan, with its id.
#[derive(Debug, Serialize, ToSchema)]
pub struct PlanView {
    pub id: String,
    #[serde(flatten)]
    pub plan: Plan,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PlanList {
    /// Every plan, in id order.
    pub plans: Vec<PlanView>,
    /// The plan of customers never assigned one.
    pub default_plan: String,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    paths(
        list_meters,
        get_meter,
        create_meter,
        update_meter,
        archive_meter,
        list_plans
    ),
    components(schemas(MeterList, MeterView, MeterSource, PlanList, PlanView))
)]
pub struct CatalogueApi;

/// What the catalogue endpoints share.
#[derive(Clone)]
pub struct MetersState {
    pub catalog: Arc<LiveCatalog>,
    /// Whether a meter has usage yet (what may still change).
    pub usage: Arc<dyn UsageReader>,
    pub clock: Arc<dyn Clock>,
    /// One change at a time in this process.
    pub changing: Arc<tokio::sync::Mutex<()>>,
}

pub fn router(
    catalog: Arc<LiveCatalog>,
    usage: Arc<dyn UsageReader>,
    clock: Arc<dyn Clock>,
) -> Router {
    Router::new()
        .route("/v1/meters", get(list_meters).post(create_meter))
        .route(
            "/v1/meters/{name}",
            get(get_meter).patch(update_meter).delete(archive_meter),
        )
        .route("/v1/plans", get(list_plans))
        .with_state(MetersState {
            catalog,
            usage,
            clock,
            changing: Arc::default(),
        })
}

fn view(catalog: &Catalog, name: &str, meter: &Meter) -> MeterView {
    let managed = catalog.managed(name);
    MeterView {
        name: name.to_owned(),
        meter: meter.clone(),
        source: match managed {
            Some(_) => MeterSource::Api,
            None => MeterSource::Catalogue,
        },
        created: managed.map(|m| rfc3339(m.created_ms)),
        updated: managed.map(|m| rfc3339(m.updated_ms)),
        archived: managed.and_then(|m| m.archived_ms).map(rfc3339),
    }
}

fn unknown(name: &str) -> ApiError {
    ApiError::not_found("unknown_meter", format!("no meter `{name}`"))
}

/// Every meter of the catalogue.
#[utoipa::path(
    get,
    path = "/v1/meters",
    tag = "catalogue",
    responses((status = 200, description = "The meters", body = MeterList))
)]
pub async fn list_meters(State(s): State<MetersState>) -> Json<MeterList> {
    let catalog = s.catalog.get();
    Json(MeterList {
        meters: catalog
            .meters
            .iter()
            .map(|(n, m)| view(&catalog, n, m))
            .collect(),
    })
}

/// One meter.
#[utoipa::path(
    get,
    path = "/v1/meters/{name}",
    tag = "catalogue",
    params(("name" = String, Path, description = "The meter's name")),
    responses(
        (status = 200, description = "The meter", body = MeterView),
        (status = 404, description = "unknown_meter", body = tally_http::problem::Problem),
    )
)]
pub async fn get_meter(
    State(s): State<MetersState>,
    Path(name): Path<String>,
) -> Result<Json<MeterView>, ApiError> {
    let catalog = s.catalog.get();
    catalog
        .meter(&name)
        .map(|m| Json(view(&catalog, &name, m)))
        .ok_or_else(|| unknown(&name))
}

/// Creates a meter: a JSON object with `name` and the meter's fields, as in the catalogue file
/// (`aggregation` and `unit` required).
#[utoipa::path(
    post,
    path = "/v1/meters",
    tag = "catalogue",
    request_body(content = MeterView, description = "`name` and the meter's fields; `source`, `created`, `updated` and `archived` are not given"),
    responses(
        (status = 201, description = "Created; counted from the next event", body = MeterView),
        (status = 400, description = "invalid_request, invalid_meter", body = tally_http::problem::Problem),
        (status = 409, description = "meter_exists, too_many_meters", body = tally_http::problem::Problem),
    )
)]
pub async fn create_meter(
    State(s): State<MetersState>,
    tally_http::extract::Json(body): tally_http::extract::Json<Value>,
) -> Result<(StatusCode, Json<MeterView>), ApiError> {
    let mut fields = object(body)?;
    let name = match fields.remove("name") {
        Some(Value::String(n)) => n,
        _ => {
            return Err(ApiError::bad_request(
                "invalid_request",
                "`name` (a string) is required",
            ));
        }
    };
    tally_schemas::event::check_meter_name(&name).map_err(|_| {
        ApiError::bad_request(
            "invalid_meter",
            "a meter name is 1-64 bytes of lowercase letters, digits and _, starting with a letter",
        )
    })?;
    let meter = parse_meter(Value::Object(fields))?;
    let (_one, catalog) = s.begin_change().await?;
    if catalog.meter(&name).is_some() {
        let why = if catalog.is_archived(&name) {
            "an archived meter keeps its name"
        } else {
            "a meter of that name exists"
        };
        return Err(ApiError::new(StatusCode::CONFLICT, "meter_exists", why).with("meter", name));
    }
    if catalog.meters.len() >= MAX_METERS {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "too_many_meters",
            format!("a catalogue holds at most {MAX_METERS} meters, archived ones included"),
        ));
    }
    let now = s.clock.now_ms();
    let record = ManagedMeter {
        name: name.clone(),
        meter,
        created_ms: now,
        updated_ms: now,
        archived_ms: None,
    };
    let catalog = put(&s, &catalog, record).await?;
    let meter = catalog.meter(&name).ok_or_else(|| unknown(&name))?;
    Ok((StatusCode::CREATED, Json(view(&catalog, &name, meter))))
}

/// Changes a meter created through the API: a JSON merge patch of its fields (`null` removes
/// one). See the module docs (and the README) for what may change once it has usage.
#[utoipa::path(
    patch,
    path = "/v1/meters/{name}",
    tag = "catalogue",
    params(("name" = String, Path, description = "The meter's name")),
    request_body(content = Object, description = "The fields to change"),
    responses(
        (status = 200, description = "The meter as changed", body = MeterView),
        (status = 400, description = "invalid_request, invalid_meter", body = tally_http::problem::Problem),
        (status = 404, description = "unknown_meter", body = tally_http::problem::Problem),
        (status = 409, description = "meter_in_catalogue, meter_archived, immutable_field", body = tally_http::problem::Problem),
    )
)]
pub async fn update_meter(
    State(s): State<MetersState>,
    Path(name): Path<String>,
    tally_http::extract::Json(body): tally_http::extract::Json<Value>,
) -> Result<Json<MeterView>, ApiError> {
    let patch = object(body)?;
    if patch.contains_key("name") {
        return Err(ApiError::bad_request(
            "invalid_request",
            "a meter's name does not change",
        ));
    }
    let (_one, catalog) = s.begin_change().await?;
    let current = managed(&catalog, &name)?;
    if current.archived_ms.is_some() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "meter_archived",
            format!("meter `{name}` is archived"),
        ));
    }
    let mut fields = match serde_json::to_value(&current.meter) {
        Ok(Value::Object(f)) => f,
        _ => unreachable!("a meter serializes as an object"),
    };
    for (k, v) in patch {
        if v.is_null() {
            fields.remove(&k);
        } else {
            fields.insert(k, v);
        }
    }
    let meter = parse_meter(Value::Object(fields))?;
    let record = ManagedMeter {
        meter,
        updated_ms: s.clock.now_ms().max(current.updated_ms),
        ..current.clone()
    };
    validate(&s, &catalog, &record)?;
    let rewrites = rewrites_history(&current.meter, &record.meter);
    if !rewrites.is_empty() && has_usage(&s, &name, &current.meter).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "immutable_field",
            format!(
                "meter `{name}` has counted usage: {} would rewrite it; only `description` \
                 and new dimensions may change",
                rewrites.join(", ")
            ),
        )
        .with("fields", rewrites));
    }
    let catalog = put(&s, &catalog, record).await?;
    let meter = catalog.meter(&name).ok_or_else(|| unknown(&name))?;
    Ok(Json(view(&catalog, &name, meter)))
}

/// Archives a meter created through the API: it reads no more events; its usage stays
/// readable and its name taken.
#[utoipa::path(
    delete,
    path = "/v1/meters/{name}",
    tag = "catalogue",
    params(("name" = String, Path, description = "The meter's name")),
    responses(
        (status = 200, description = "The meter, archived", body = MeterView),
        (status = 404, description = "unknown_meter", body = tally_http::problem::Problem),
        (status = 409, description = "meter_in_catalogue", body = tally_http::problem::Problem),
    )
)]
pub async fn archive_meter(
    State(s): State<MetersState>,
    Path(name): Path<String>,
) -> Result<Json<MeterView>, ApiError> {
    let (_one, catalog) = s.begin_change().await?;
    let current = managed(&catalog, &name)?;
    let catalog = if current.archived_ms.is_some() {
        catalog.clone()
    } else {
        let now = s.clock.now_ms().max(current.updated_ms);
        let record = ManagedMeter {
            updated_ms: now,
            archived_ms: Some(now),
            ..current.clone()
        };
        put(&s, &catalog, record).await?
    };
    let meter = catalog.meter(&name).ok_or_else(|| unknown(&name))?;
    Ok(Json(view(&catalog, &name, meter)))
}

impl MetersState {
    /// Waits for this process's other changes, then reads the stored meters afresh.
    async fn begin_change(
        &self,
    ) -> Result<(tokio::sync::MutexGuard<'_, ()>, Arc<Catalog>), ApiError> {
        let one = self.changing.lock().await;
        let catalog = self
            .catalog
            .refresh()
            .await
            .map_err(|e| ApiError::unavailable(&e))?;
        Ok((one, catalog))
    }
}

/// A request body that must be a JSON object.
fn object(body: Value) -> Result<serde_json::Map<String, Value>, ApiError> {
    match body {
        Value::Object(fields) => Ok(fields),
        _ => Err(ApiError::bad_request(
            "invalid_request",
            "the body must be a JSON object",
        )),
    }
}

/// The managed meter `name`, or why it cannot be managed.
fn managed<'c>(catalog: &'c Catalog, name: &str) -> Result<&'c ManagedMeter, ApiError> {
    match catalog.managed(name) {
        Some(m) => Ok(m),
        None if catalog.meter(name).is_some() => Err(ApiError::new(
            StatusCode::CONFLICT,
            "meter_in_catalogue",
            format!("meter `{name}` is defined in the catalogue file, which alone changes it"),
        )),
        None => Err(unknown(name)),
    }
}

fn parse_meter(fields: Value) -> Result<Meter, ApiError> {
    serde_json::from_value(fields)
        .map_err(|e| ApiError::bad_request("invalid_meter", e.to_string()))
}

/// The fields of `before` that `after` changes in a way that would rewrite counted usage: any
/// but `description` and dimensions added to `group_by`.
fn rewrites_history(before: &Meter, after: &Meter) -> Vec<&'static str> {
    let mut out = Vec::new();
    if before.aggregation != after.aggregation {
        out.push("aggregation");
    }
    if before.unit != after.unit {
        out.push("unit");
    }
    if before.event_type != after.event_type {
        out.push("event_type");
    }
    if before.value != after.value {
        out.push("value");
    }
    if before.scale != after.scale {
        out.push("scale");
    }
    if before.filter != after.filter {
        out.push("filter");
    }
    if !before
        .group_by
        .iter()
        .all(|(n, p)| after.group_by.get(n) == Some(p))
    {
        out.push("group_by");
    }
    out
}

/// Whether the store holds usage of `name` (any customer, any time up to a day ahead).
async fn has_usage(s: &MetersState, name: &str, meter: &Meter) -> Result<bool, ApiError> {
    let to = s.clock.now_ms().saturating_add(86_400_000);
    let total = s
        .usage
        .meter_total(name, meter.aggregation, 0, to)
        .await
        .map_err(|e| ApiError::unavailable(&e))?;
    Ok(total.customers > 0)
}

/// Checks that `record` makes a valid catalogue with the other managed meters.
fn validate(s: &MetersState, catalog: &Catalog, record: &ManagedMeter) -> Result<(), ApiError> {
    let others = catalog
        .managed_meters()
        .filter(|m| m.name != record.name)
        .cloned();
    s.catalog
        .base()
        .with_managed(others.chain([record.clone()]))
        .map(|_| ())
        .map_err(|e| ApiError::bad_request("invalid_meter", e.to_string()))
}

/// Checks `record` ([`validate`]), then stores it.
async fn put(
    s: &MetersState,
    catalog: &Catalog,
    record: ManagedMeter,
) -> Result<Arc<Catalog>, ApiError> {
    validate(s, catalog, &record)?;
    s.catalog
        .put(&record)
        .await
        .map_err(|e| ApiError::unavailable(&e))
}

/// Every plan of the catalogue, with its limits.
#[utoipa::path(
    get,
    path = "/v1/plans",
    tag = "catalogue",
    responses((status = 200, description = "The plans", body = PlanList))
)]
pub async fn list_plans(State(s): State<MetersState>) -> Json<PlanList> {
    let catalog = s.catalog.get();
    Json(PlanList {
        plans: catalog
            .plans
            .iter()
            .map(|(id, p)| PlanView {
                id: id.clone(),
                plan: p.clone(),
            })
            .collect(),
        default_plan: catalog.policy.default_plan.clone(),
    })
}

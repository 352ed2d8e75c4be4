//! The catalogue, read back: `GET /v1/meters`, `GET /v1/meters/{name}` and `GET /v1/plans`,
//! so dashboards and clients learn each meter's unit, aggregation, scale, dimensions and event
//! type, and each plan's limits, without reading the TOML. Any key with the `read` scope may
//! read them.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tally_http::problem::ApiError;
use tally_schemas::{Catalog, Meter, Plan};
use utoipa::ToSchema;

/// One meter, with its name.
#[derive(Debug, Serialize, ToSchema)]
pub struct MeterView {
    pub name: String,
    #[serde(flatten)]
    pub meter: Meter,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct MeterList {
    /// Every meter, in name order.
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
    paths(list_meters, get_meter, list_plans),
    components(schemas(MeterList, MeterView, PlanList, PlanView))
)]
pub struct CatalogueApi;

pub fn router(catalog: Arc<Catalog>) -> Router {
    Router::new()
        .route("/v1/meters", get(list_meters))
        .route("/v1/meters/{name}", get(get_meter))
        .route("/v1/plans", get(list_plans))
        .with_state(catalog)
}

fn view(name: &str, meter: &Meter) -> MeterView {
    MeterView {
        name: name.to_owned(),
        meter: meter.clone(),
    }
}

/// Every meter of the catalogue.
#[utoipa::path(
    get,
    path = "/v1/meters",
    tag = "catalogue",
    responses((status = 200, description = "The meters", body = MeterList))
)]
pub async fn list_meters(State(catalog): State<Arc<Catalog>>) -> Json<MeterList> {
    Json(MeterList {
        meters: catalog.meters.iter().map(|(n, m)| view(n, m)).collect(),
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
    State(catalog): State<Arc<Catalog>>,
    Path(name): Path<String>,
) -> Result<Json<MeterView>, ApiError> {
    catalog
        .meter(&name)
        .map(|m| Json(view(&name, m)))
        .ok_or_else(|| ApiError::not_found("unknown_meter", format!("no meter `{name}`")))
}

/// Every plan of the catalogue, with its limits.
#[utoipa::path(
    get,
    path = "/v1/plans",
    tag = "catalogue",
    responses((status = 200, description = "The plans", body = PlanList))
)]
pub async fn list_plans(State(catalog): State<Arc<Catalog>>) -> Json<PlanList> {
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

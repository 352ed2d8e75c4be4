//! The OpenAPI document, generated from the handlers' annotations (utoipa): each component
//! crate contributes its part, merged here with the admin endpoints. Served at
//! `GET /openapi.json` and printed by `tally openapi`; `schemas/openapi.json` is a copy that a
//! test keeps equal to the generated document.

use axum::Json;
use axum::response::IntoResponse;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Tally API",
        description = "Usage metering: ingest usage events, check quotas, read usage, assign plans. \
            Every error reply is JSON with a stable machine-readable `code` and a `message`. \
            Times are RFC 3339; quantities are whole numbers in the meter's unit."
    ),
    servers(
        (url = "http://127.0.0.1:8080", description = "public API (TALLY_LISTEN)"),
        (url = "http://127.0.0.1:9090", description = "admin endpoints (TALLY_ADMIN_LISTEN)")
    ),
    paths(
        crate::metrics::render,
        crate::app::health,
        crate::app::ready,
        openapi_json,
        crate::operator::stats
    ),
    components(schemas(tally_ingest::problem::Problem, crate::app::Health, crate::operator::OperatorStats))
)]
struct TallyApi;

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = TallyApi::openapi();
    doc.merge(tally_ingest::http::IngestApi::openapi());
    doc.merge(tally_enforcer::http::EnforcerApi::openapi());
    doc.merge(tally_aggregator::query::QueryApi::openapi());
    doc.merge(tally_billing_sync::BillingApi::openapi());
    utoipa::Modify::modify(&tally_ingest::http::EventCodes, &mut doc);
    doc
}

/// The document as pretty JSON with a final newline (the form of `schemas/openapi.json`).
pub fn pretty() -> String {
    let mut text = document()
        .to_pretty_json()
        .expect("the document serializes");
    text.push('\n');
    text
}

/// This OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "OpenAPI 3.1", body = Object))
)]
pub async fn openapi_json() -> impl IntoResponse {
    Json(document())
}

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
            Times are RFC 3339; quantities are whole numbers in the meter's unit. \
            Calls need an API key (`Authorization: Bearer <key>` or `X-Tally-Key`) with the \
            scope of the endpoint: ingest, check, read (optionally one customer's) or admin; \
            /openapi.json, the dashboard page and the Stripe webhook need none, nor does the \
            embedded default on loopback before the first key exists."
    ),
    servers(
        (url = "http://127.0.0.1:8080", description = "public API (TALLY_LISTEN)"),
        (url = "http://127.0.0.1:9090", description = "admin endpoints (TALLY_ADMIN_LISTEN)")
    ),
    paths(
        tally_http::metrics::render,
        crate::app::health,
        crate::app::ready,
        openapi_json,
        crate::operator::stats
    ),
    components(schemas(tally_http::problem::Problem, crate::app::Health, crate::operator::OperatorStats))
)]
struct TallyApi;

/// The whole document.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = TallyApi::openapi();
    doc.merge(tally_ingest::http::IngestApi::openapi());
    doc.merge(tally_enforcer::http::EnforcerApi::openapi());
    doc.merge(tally_aggregator::query::QueryApi::openapi());
    doc.merge(tally_billing_sync::BillingApi::openapi());
    doc.merge(crate::keys::KeysApi::openapi());
    doc.merge(crate::meters::CatalogueApi::openapi());
    utoipa::Modify::modify(&tally_ingest::http::EventCodes, &mut doc);
    utoipa::Modify::modify(&ApiKeys, &mut doc);
    doc
}

/// Declares the bearer API key and adds its 401 and 403 replies to every operation of the
/// public listener that needs one (see [`crate::auth`]).
struct ApiKeys;

impl utoipa::Modify for ApiKeys {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            Http, HttpAuthScheme, SecurityRequirement, SecurityScheme,
        };
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        let problem = || {
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("Problem")))
                .build()
        };
        let unauthorized = ResponseBuilder::new()
            .description("missing_api_key or invalid_api_key (unknown, revoked or expired)")
            .content("application/json", problem())
            .build();
        let forbidden = ResponseBuilder::new()
            .description("forbidden: the key lacks the scope, or may read another customer only")
            .content("application/json", problem())
            .build();
        let keyless = [
            "/openapi.json",
            "/v1/webhooks/stripe",
            "/metrics",
            "/healthz",
            "/readyz",
        ];
        for (path, item) in doc.paths.paths.iter_mut() {
            if keyless.contains(&path.as_str()) {
                continue;
            }
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
            ]
            .into_iter()
            .flatten()
            {
                let r = &mut op.responses.responses;
                r.entry("401".into())
                    .or_insert_with(|| unauthorized.clone().into());
                r.entry("403".into())
                    .or_insert_with(|| forbidden.clone().into());
                op.security = Some(vec![SecurityRequirement::new(
                    "api_key",
                    Vec::<String>::new(),
                )]);
            }
        }
    }
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

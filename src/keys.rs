//! `/v1/keys`: the admin API of API keys (admin scope; see [`crate::auth`]). The same
//! operations are `tally keys create|list|revoke|rotate`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tally_http::problem::{ApiError, Problem};
use utoipa::{OpenApi, ToSchema};

use crate::auth::{ApiKey, KeyError, KeyGrant, KeyRing, NewKey, Scope};

/// Overlap of a rotation when none is asked: the old key works this long after.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(24 * 3600);

pub fn router(ring: Arc<KeyRing>) -> Router {
    Router::new()
        .route("/v1/keys", get(list).post(create))
        .route("/v1/keys/{id}", delete(revoke))
        .route("/v1/keys/{id}/rotate", post(rotate))
        .with_state(ring)
}

/// A key's record as the API shows it (never the key or its hash).
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// Events per second (ingest).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ingest_rate: Option<u32>,
    /// `active`, `expired` or `revoked`.
    pub state: &'static str,
    /// RFC 3339.
    pub created: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revoked: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rotated_from: Option<String>,
}

impl KeyInfo {
    pub fn of(k: &ApiKey, now_ms: i64) -> KeyInfo {
        let time = tally_schemas::period::rfc3339;
        KeyInfo {
            id: k.id.clone(),
            name: k.name.clone(),
            scopes: k.scopes.clone(),
            customer: k.customer.clone(),
            ingest_rate: k.ingest_rate.map(|r| r.get()),
            state: k.state(now_ms),
            created: time(k.created_ms),
            expires: k.expires_ms.map(time),
            revoked: k.revoked_ms.map(time),
            rotated_from: k.rotated_from.clone(),
        }
    }
}

/// A new key: `key` is shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    /// The key to send as `Authorization: Bearer <key>`. Not retrievable later.
    pub key: String,
    #[serde(flatten)]
    pub info: KeyInfo,
}

impl CreatedKey {
    fn of(new: NewKey, now_ms: i64) -> CreatedKey {
        CreatedKey {
            info: KeyInfo::of(&new.record, now_ms),
            key: new.key,
        }
    }
}

/// The body of a rotation.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rotation {
    /// How long the old key keeps working (default 86,400: a day).
    pub overlap_seconds: Option<u64>,
}

fn api_error(e: KeyError) -> ApiError {
    match e {
        KeyError::Invalid(m) => ApiError::bad_request("invalid_key_request", m),
        KeyError::NotFound(id) => {
            ApiError::not_found("key_not_found", format!("no key with id `{id}`"))
        }
        KeyError::Store(e) => ApiError::unavailable(&e),
    }
}

fn body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b)
        .map_err(|r| ApiError::bad_request("invalid_key_request", r.body_text()))
}

/// Create an API key (admin).
#[utoipa::path(
    post,
    path = "/v1/keys",
    tag = "keys",
    request_body = KeyGrant,
    responses(
        (status = 201, description = "Created; the key is in the reply this once", body = CreatedKey),
        (status = 400, description = "invalid_key_request", body = Problem),
        (status = 401, description = "missing_api_key or invalid_api_key", body = Problem),
        (status = 403, description = "forbidden: not an admin key", body = Problem),
    )
)]
async fn create(
    State(ring): State<Arc<KeyRing>>,
    grant: Result<Json<KeyGrant>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let new = ring.create(&body(grant)?).await.map_err(api_error)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey::of(new, ring.now_ms())),
    ))
}

/// List API keys (admin): every key, active or not, without secrets.
#[utoipa::path(
    get,
    path = "/v1/keys",
    tag = "keys",
    responses(
        (status = 200, description = "Every key", body = [KeyInfo]),
        (status = 401, description = "missing_api_key or invalid_api_key", body = Problem),
        (status = 403, description = "forbidden: not an admin key", body = Problem),
    )
)]
async fn list(State(ring): State<Arc<KeyRing>>) -> Result<Json<Vec<KeyInfo>>, ApiError> {
    ring.refresh().await.map_err(api_error)?;
    let now = ring.now_ms();
    Ok(Json(
        ring.list().iter().map(|k| KeyInfo::of(k, now)).collect(),
    ))
}

/// Revoke an API key at once (admin).
#[utoipa::path(
    delete,
    path = "/v1/keys/{id}",
    tag = "keys",
    params(("id" = String, Path, description = "The key's id")),
    responses(
        (status = 200, description = "Revoked (or already)", body = KeyInfo),
        (status = 404, description = "key_not_found", body = Problem),
        (status = 401, description = "missing_api_key or invalid_api_key", body = Problem),
        (status = 403, description = "forbidden: not an admin key", body = Problem),
    )
)]
async fn revoke(
    State(ring): State<Arc<KeyRing>>,
    Path(id): Path<String>,
) -> Result<Json<KeyInfo>, ApiError> {
    let key = ring.revoke(&id).await.map_err(api_error)?;
    Ok(Json(KeyInfo::of(&key, ring.now_ms())))
}

/// Rotate an API key (admin): a new key with the same grants; the old one keeps working for the
/// overlap, then expires.
#[utoipa::path(
    post,
    path = "/v1/keys/{id}/rotate",
    tag = "keys",
    params(("id" = String, Path, description = "The key's id")),
    request_body(content = Rotation, description = "Optional"),
    responses(
        (status = 201, description = "The new key, shown this once", body = CreatedKey),
        (status = 400, description = "invalid_key_request (for example a revoked key)", body = Problem),
        (status = 404, description = "key_not_found", body = Problem),
        (status = 401, description = "missing_api_key or invalid_api_key", body = Problem),
        (status = 403, description = "forbidden: not an admin key", body = Problem),
    )
)]
async fn rotate(
    State(ring): State<Arc<KeyRing>>,
    Path(id): Path<String>,
    rotation: Option<Json<Rotation>>,
) -> Result<(StatusCode, Json<CreatedKey>), ApiError> {
    let overlap = rotation
        .and_then(|Json(r)| r.overlap_seconds)
        .map_or(DEFAULT_OVERLAP, Duration::from_secs);
    let new = ring.rotate(&id, overlap).await.map_err(api_error)?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedKey::of(new, ring.now_ms())),
    ))
}

/// The key API's part of the OpenAPI document.
#[derive(OpenApi)]
#[openapi(
    paths(create, list, revoke, rotate),
    components(schemas(KeyGrant, KeyInfo, CreatedKey, Rotation, Scope))
)]
pub struct KeysApi;

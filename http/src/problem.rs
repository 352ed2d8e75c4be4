//! The one error reply of Tally's HTTP API: a status, a stable machine-readable `code` and a
//! safe `message`, as `{"code": .., "message": .., ...}`. Internal detail goes to the log, never
//! to the client.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// The error body, as the OpenAPI document describes it.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct Problem {
    /// Stable, machine-readable code, for example `invalid_time`.
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// Ingest: how many events were invalid.
    pub rejected: Option<usize>,
    /// Ingest: each invalid event's error.
    pub errors: Option<Vec<EventFault>>,
}

/// An invalid event of a request.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct EventFault {
    /// Position in the batch or NDJSON line (blank lines skipped).
    pub index: usize,
    /// The event's error code.
    pub code: &'static str,
    pub message: String,
}

/// An error reply: the same status and code whichever protocol carries it (HTTP through
/// [`IntoResponse`], gRPC through [`ApiError::grpc_code`] and `tonic::Status::from`).
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Extra members of the body (for example per-event errors).
    pub extra: Map<String, Value>,
    /// Seconds the client should wait before retrying (503, 429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            extra: Map::new(),
            retry_after: None,
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    /// A failure of Tally or of a backend: logged in full, reported as 503 with a generic text.
    pub fn unavailable(detail: &dyn std::fmt::Display) -> ApiError {
        tracing::error!(error = %detail, "request failed on a backend");
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the service cannot complete the request now; retry later",
        );
        e.retry_after = Some(1);
        e
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.to_owned(), value.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = Map::new();
        body.insert("code".into(), Value::from(self.code));
        body.insert("message".into(), Value::from(self.message));
        body.extend(self.extra);
        let mut resp = (self.status, Json(Value::Object(body))).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

impl ApiError {
    /// The gRPC status code of this error's HTTP status: a request the caller must change
    /// (400, 404, 413, 415, 422) is `InvalidArgument`, refused credentials `Unauthenticated`,
    /// a forbidden one `PermissionDenied`, too many requests `ResourceExhausted`, a timeout
    /// `DeadlineExceeded`; anything else is `Unavailable` (retry later).
    pub fn grpc_code(&self) -> tonic::Code {
        match self.status {
            StatusCode::BAD_REQUEST
            | StatusCode::NOT_FOUND
            | StatusCode::PAYLOAD_TOO_LARGE
            | StatusCode::UNSUPPORTED_MEDIA_TYPE
            | StatusCode::UNPROCESSABLE_ENTITY => tonic::Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => tonic::Code::Unauthenticated,
            StatusCode::FORBIDDEN => tonic::Code::PermissionDenied,
            StatusCode::TOO_MANY_REQUESTS => tonic::Code::ResourceExhausted,
            StatusCode::REQUEST_TIMEOUT => tonic::Code::DeadlineExceeded,
            _ => tonic::Code::Unavailable,
        }
    }
}

/// The gRPC form of an error: [`ApiError::grpc_code`], with `code: message` as the message.
impl From<ApiError> for tonic::Status {
    fn from(e: ApiError) -> tonic::Status {
        tonic::Status::new(e.grpc_code(), format!("{}: {}", e.code, e.message))
    }
}

/// An invalid event attribute or identifier: 400 with the error's own code.
impl From<tally_schemas::EventError> for ApiError {
    fn from(e: tally_schemas::EventError) -> ApiError {
        ApiError::bad_request(e.code(), e.to_string())
    }
}

/// The error of a request body that could not be read: 408 `body_timeout` when the client was
/// too slow to send it (the body timeout of the listener), else as [`from_rejection`].
pub fn from_body_rejection(r: &axum::extract::rejection::BytesRejection) -> ApiError {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(r);
    while let Some(e) = cause {
        if e.is::<tower_http::timeout::TimeoutError>() {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                "the request body did not arrive in time; nothing of it was taken",
            );
        }
        cause = e.source();
    }
    from_rejection(r.status(), r.body_text())
}

/// Maps axum's body, path and query rejections to [`ApiError`]s with codes.
pub fn from_rejection(status: StatusCode, text: String) -> ApiError {
    match status {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(status, "body_too_large", text),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::new(status, "unsupported_media_type", text),
        s if s.is_client_error() => ApiError::new(s, "invalid_request", text),
        _ => ApiError::unavailable(&text),
    }
}

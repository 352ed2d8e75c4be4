//! Extractors whose rejection is the shared error reply: a query string or JSON body that does
//! not parse is answered with [`from_rejection`]'s status and code (`invalid_request`,
//! `body_too_large`, `unsupported_media_type`), like every other error.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use crate::problem::{ApiError, from_rejection};

/// `axum::extract::Query`, rejected with an [`ApiError`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Query(q)| Query(q))
            .map_err(|r| from_rejection(r.status(), r.body_text()))
    }
}

/// `axum::Json` as a request body, rejected with an [`ApiError`].
#[derive(Debug, Clone, Copy, Default)]
pub struct Json<T>(pub T);

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        axum::Json::<T>::from_request(req, state)
            .await
            .map(|axum::Json(body)| Json(body))
            .map_err(|r| from_rejection(r.status(), r.body_text()))
    }
}

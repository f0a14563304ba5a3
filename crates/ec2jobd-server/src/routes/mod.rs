//! HTTP routes, one module per feature; each exposes `router()`.

pub mod audit;
pub mod catalog;
pub mod jobs;
pub mod ops;
pub mod schedules;
pub mod sns;
pub mod templates;
pub mod tokens;

use axum::http::StatusCode;

use crate::error::ApiError;

/// A stored document's name from the path (templates, schedules): 1-64 letters, digits, `-` or
/// `_`, else 422 naming `name`.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    if crate::config::is_hook_name(name) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_name",
        "1-64 letters, digits, `-` or `_`",
    )
    .field("name"))
}

/// What a PUT answers: 201 when it created the document, 200 when it replaced one.
pub fn put_status(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

//! HTTP routes, one module per feature; each exposes `router()` and its handlers only read the
//! request, call one `service` function with the caller and answer. What they read alike is
//! `extract`, how the routes that queue a job answer is `respond`. No route module imports
//! another.

pub mod audit;
pub mod catalog;
pub mod extract;
pub mod jobs;
pub mod ops;
pub mod respond;
pub mod schedules;
pub mod sns;
pub mod templates;
pub mod tokens;

use axum::http::StatusCode;

/// What a PUT answers: 201 when it created the document, 200 when it replaced one.
pub fn put_status(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }
}

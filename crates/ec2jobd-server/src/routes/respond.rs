//! How the routes that queue a job (`POST /v1/jobs`, `POST /v1/templates/{name}/run`) answer
//! alike: the caller's idempotency key, a slot for a held answer (`?wait=`), then the job
//! queued, held until it ends or the wait is up, and answered 202/201/200 with its `Location`.
//! Must not: decide whether a job may be queued (the service did, making it `Admitted`).

use std::time::Duration;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::deadline::Deadline;
use crate::error::ApiError;
use crate::service::jobs::{self, Admitted, Key};
use crate::service::Caller;
use crate::state::{AppState, StreamSlot};

/// The caller's `Idempotency-Key`, if any.
pub fn key(headers: &HeaderMap) -> Result<Key, ApiError> {
    Ok(super::extract::idempotency_key(headers)?.map_or(Key::None, Key::Caller))
}

/// A stream slot when the answer is held (`wait`), taken before anything is stored.
pub fn slot(
    state: &AppState,
    caller: &Caller,
    wait: Option<Duration>,
) -> Result<Option<StreamSlot>, ApiError> {
    Ok(wait.map(|_| jobs::stream_slot(state, caller)).transpose()?)
}

fn location(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("/v1/jobs/{id}")).unwrap_or(HeaderValue::from_static("/v1/jobs"))
}

/// Queues an admitted job (continuing the request's trace) and answers: 202 queued, 201 ended
/// within `wait`, 200 a replay of the same key. Once the job may be stored the request is never
/// answered with the deadline's 503.
pub async fn submitted(
    state: &AppState,
    headers: &HeaderMap,
    deadline: &Deadline,
    wait: Option<Duration>,
    _slot: Option<StreamSlot>,
    admitted: Admitted,
) -> Result<Response, ApiError> {
    let admitted = admitted.traced(crate::telemetry::traceparent_header(headers));
    if let Some(w) = wait {
        deadline.extend(w);
    }
    deadline.committing();
    let (created, job) = admitted.queue(state).await?;
    let job = match wait {
        // Held no later than the deadline would have been.
        Some(w) => {
            let until = (tokio::time::Instant::now() + w).min(deadline.at());
            jobs::wait_for_end(state, job, until).await
        }
        None => job,
    };
    let status = match (created, job.state.is_terminal() && wait.is_some()) {
        (true, true) => StatusCode::CREATED,
        (true, false) => StatusCode::ACCEPTED,
        (false, _) => StatusCode::OK,
    };
    Ok((status, [(header::LOCATION, location(&job.id))], Json(job)).into_response())
}

//! `/v1/jobs`: submit (with idempotency keys), list, get, cancel, and the live event stream.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::DateTime;
use ec2jobd_spec::{Action, Job, JobEvent, JobSpec, JobState, Role, TERMINAL_EVENT_KINDS};
use ec2jobd_store::{CancelOutcome, Enqueued, ListQuery, NewJob};
use futures::Stream;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::deadline::Deadline;
use crate::error::{ApiError, Problem};
use crate::state::{AppState, StreamSlot};

/// Routes of this module (all behind authentication).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/jobs", post(submit).get(list))
        .route("/v1/jobs/{id}", get(get_job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/events", get(events))
        .route("/v1/jobs/{id}/outputs", get(outputs))
        .route("/v1/jobs/{id}/outputs/env", get(outputs_env))
        .route("/v1/jobs/{id}/report", get(report))
}

/// A page of `GET /v1/jobs`.
#[derive(Debug, Serialize, ToSchema)]
pub struct JobPage {
    /// Jobs, newest first.
    pub jobs: Vec<Job>,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

fn location(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("/v1/jobs/{id}")).unwrap_or(HeaderValue::from_static("/v1/jobs"))
}

/// Decodes a JSON body into `T`, naming the offending field on failure.
pub fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    // serde would read a JSON array as a struct by position; only objects are requests here.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        None => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                "the body is empty; send a JSON object",
            )
            .field("body"))
        }
        Some(b'{') => {}
        Some(_) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "not_an_object",
                "the body must be a JSON object",
            )
            .field("body"))
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize::<_, T>(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        json_error(&path, &inner)
    })?;
    de.end().map_err(|e| json_error(".", &e))?;
    Ok(value)
}

fn json_error(path: &str, e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    let msg = e.to_string();
    if matches!(
        e.classify(),
        Category::Syntax | Category::Eof | Category::Io
    ) {
        return ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {msg}"),
        )
        .field("body");
    }
    // serde names the unknown or missing field in its message, not in the path.
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|p| msg.split_once(p).and_then(|(_, rest)| rest.split_once('`')))
        .map(|(name, _)| name.to_string());
    let field = match (path, named) {
        (p, Some(n)) if p == n || p.ends_with(&format!(".{n}")) => p.to_string(),
        (".", Some(n)) => n,
        (p, Some(n)) => format!("{p}.{n}"),
        (".", None) => "body".to_string(),
        (p, None) => p.to_string(),
    };
    let code = if msg.starts_with("unknown field") {
        "unknown_field"
    } else if msg.starts_with("missing field") {
        "missing_field"
    } else if field == "action" && msg.starts_with("unknown variant") {
        "unknown_action"
    } else {
        "invalid_field"
    };
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, msg).field(field)
}

fn body_error(r: BytesRejection) -> ApiError {
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            "the request body is larger than http.body_limit",
        )
        .field("body")
    } else {
        ApiError::new(r.status(), "bad_body", r.body_text()).field("body")
    }
}

/// Requires `Content-Type: application/json` (or none).
pub fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    match headers.get(header::CONTENT_TYPE) {
        None => Ok(()),
        Some(v) => {
            let ok = v
                .to_str()
                .ok()
                .and_then(|s| s.split(';').next())
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"));
            if ok {
                Ok(())
            } else {
                Err(ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the body as `Content-Type: application/json`",
                )
                .field("Content-Type"))
            }
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "invalid_idempotency_key",
            "Idempotency-Key",
            "must be 1-255 visible ASCII characters",
        )
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_string()))
}

/// A resolved spec as a job to enqueue by `created_by` (a token's name, `sns:<hook>`), with the
/// queue's defaults for what it leaves out.
fn new_job(
    state: &AppState,
    spec: JobSpec,
    idempotency_key: Option<String>,
    created_by: String,
) -> NewJob {
    let q = &state.config.queue;
    NewJob {
        max_attempts: spec.max_attempts.unwrap_or(q.max_attempts),
        timeout_ms: spec
            .timeout_duration()
            .unwrap_or(q.job_timeout.0)
            .as_millis() as i64,
        spec,
        idempotency_key,
        created_by: Some(created_by),
    }
}

/// Validates a submitted spec and fills in what config decides (account, region), for a workflow's
/// steps too (each checked against its account's allowlists).
pub fn resolve_spec(state: &AppState, spec: JobSpec) -> Result<JobSpec, ApiError> {
    let mut spec = spec.normalize()?;
    fill_account(state, &mut spec, "")?;
    if let Some(steps) = spec.steps.as_mut() {
        for (i, st) in steps.iter_mut().enumerate() {
            fill_account(state, &mut st.spec, &format!("steps[{i}]."))?;
        }
    }
    Ok(spec)
}

fn fill_account(state: &AppState, spec: &mut JobSpec, prefix: &str) -> Result<(), ApiError> {
    let cfg = &state.config;
    let account = spec
        .account
        .clone()
        .unwrap_or_else(|| cfg.default_account.clone());
    let acct = cfg.accounts.get(&account).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_account",
            format!("no account `{account}` is configured"),
        )
        .field(format!("{prefix}account"))
    })?;
    if spec.region.is_none() {
        spec.region = Some(acct.region.clone());
    }
    crate::routes::catalog::check(&account, acct, spec).map_err(|mut e| {
        e.field = e.field.map(|f| format!("{prefix}{f}"));
        e
    })?;
    spec.account = Some(account);
    Ok(())
}

/// Submit a job.
///
/// Answers `202` with the queued job and its `Location`. With an `Idempotency-Key`, repeating the same
/// request returns the original job with `200`; the same key with another body is `409`.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body = JobSpec,
    params(
        ("Idempotency-Key" = Option<String>, Header, description = "Makes the submission safe to repeat"),
        ("traceparent" = Option<String>, Header, description = "W3C trace context: the job's spans (and its EC2 calls) continue this trace when OpenTelemetry export is on; kept in the job's `spec.traceparent`"),
        ("wait" = Option<String>, Query, description = "Hold the answer until the job ends or this long passes (humantime, at most 1h)"),
    ),
    responses(
        (status = 202, description = "Accepted and durably queued (with `wait`: still running when the time was up)", body = Job,
         headers(("Location" = String, description = "URL of the job"))),
        (status = 201, description = "With `wait`: the job ended in time; the final job", body = Job),
        (status = 200, description = "Replay of an earlier identical request (with `wait`: held the same way)", body = Job),
        (status = 400, description = "Malformed JSON or header", body = Problem),
        (status = 401, description = "Missing or invalid token", body = Problem),
        (status = 403, description = "Token lacks the operator role", body = Problem),
        (status = 409, description = "Idempotency key reused with another body", body = Problem),
        (status = 413, description = "Body too large", body = Problem),
        (status = 415, description = "Not JSON", body = Problem),
        (status = 422, description = "Invalid field", body = Problem),
        (status = 429, description = "queue.max_queued jobs are waiting, or (with `wait`) too many streams are open; nothing stored (Retry-After)", body = Problem),
        (status = 503, description = "Store unavailable; nothing stored", body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn submit(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(deadline): Extension<Deadline>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    caller.require(Role::Operator)?;
    let wait = wait_param(query)?;
    require_json(&headers)?;
    let body = body.map_err(body_error)?;
    let spec = resolve_spec(&state, parse_json::<JobSpec>(&body)?)?;
    enqueue_and_answer(&state, &caller, &headers, &deadline, wait, spec).await
}

/// A slot for a long-lived answer (`http.max_streams`, `http.max_streams_per_token`), or 429.
pub(crate) fn stream_slot(state: &AppState, caller: &Caller) -> Result<StreamSlot, ApiError> {
    let h = &state.config.http;
    state
        .streams
        .open(&caller.0.name, h.max_streams, h.max_streams_per_token)
        .ok_or_else(|| {
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                "too many event streams and held submissions are open (http.max_streams, \
                 http.max_streams_per_token); close one or retry later",
            );
            e.retry_after = Some(1);
            e
        })
}

/// Queues a resolved spec (honouring `Idempotency-Key` and the `wait` from [`wait_param`]) and
/// answers as `POST /v1/jobs` does; template runs answer the same way. Once the enqueue starts, the
/// request is never answered with the deadline's 503: a job that may be stored is answered with it.
pub async fn enqueue_and_answer(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    deadline: &Deadline,
    wait: Option<Duration>,
    mut spec: JobSpec,
) -> Result<Response, ApiError> {
    caller.may_submit(&spec)?;
    let key = idempotency_key(headers)?;
    if spec.traceparent.is_none() {
        // The scheduler's trace continues into the job.
        spec.traceparent = crate::telemetry::traceparent_header(headers);
    }
    let _slot = wait.map(|_| stream_slot(state, caller)).transpose()?;
    admit(state).await?;
    if let Some(w) = wait {
        deadline.extend(w);
    }
    deadline.committing();
    let (created, job) = queue(state, caller.0.name.clone(), spec, key).await?;
    let job = match wait {
        // Held no later than the deadline would have been.
        Some(w) => {
            let until = (tokio::time::Instant::now() + w).min(deadline.at());
            wait_for_end(state, job, until).await
        }
        None => job,
    };
    let status = match (created, job.state.is_terminal() && wait.is_some()) {
        (true, true) => StatusCode::CREATED,
        (true, false) => StatusCode::ACCEPTED,
        (false, _) => StatusCode::OK,
    };
    Ok((
        status,
        [(header::LOCATION, location(&job.id))],
        Json(job.redacted()),
    )
        .into_response())
}

/// Stores a resolved, checked and admitted spec as a job by `created_by` (the last step of every
/// submission: API, template run, SNS, dashboard). Returns whether it was created (not replayed).
pub async fn queue(
    state: &AppState,
    created_by: String,
    spec: JobSpec,
    key: Option<String>,
) -> Result<(bool, Job), ApiError> {
    let new = new_job(state, spec, key, created_by);
    Ok(match state.store.enqueue(new).await? {
        Enqueued::Created(j) => {
            state.metrics.submitted(j.action.as_str());
            (true, j)
        }
        Enqueued::Replayed(j) => (false, j),
    })
}

/// Refuses a submission with 429 (and Retry-After) when `queue.max_queued` jobs are waiting.
pub async fn admit(state: &AppState) -> Result<(), ApiError> {
    let max = state.config.queue.max_queued;
    let lot = (state.runner.parked() as u64, state.runner.returned());
    if state
        .admission
        .admit(state.store.as_ref(), max, lot)
        .await?
    {
        return Ok(());
    }
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "queue_full",
        format!(
            "{max} jobs are already queued (queue.max_queued); nothing was stored, retry later"
        ),
    );
    e.retry_after = Some(1);
    Err(e)
}

/// Most a submission may be held with `?wait=`.
pub const MAX_WAIT: Duration = Duration::from_secs(3600);

/// The `wait` query parameter (the only one `POST /v1/jobs` and template runs take), parsed once by
/// the handler; given twice it is refused.
pub fn wait_param(
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Option<Duration>, ApiError> {
    let Query(params) =
        query.map_err(|e| ApiError::bad_request("invalid_query", "query", e.body_text()))?;
    let mut wait = None;
    for (k, v) in params {
        if k != "wait" {
            return Err(ApiError::bad_request(
                "unknown_parameter",
                &k,
                format!("unknown query parameter `{k}` (wait)"),
            ));
        }
        if wait.is_some() {
            return Err(ApiError::bad_request(
                "invalid_wait",
                "wait",
                "`wait` is given more than once",
            ));
        }
        let d = ec2jobd_spec::parse_duration(&v)
            .map_err(|m| ApiError::bad_request("invalid_wait", "wait", m))?;
        if d > MAX_WAIT {
            return Err(ApiError::bad_request("invalid_wait", "wait", "at most 1h"));
        }
        wait = Some(d);
    }
    Ok(wait)
}

/// Holds until the job ends or `until` passes, woken by the store's change notices (and re-reading
/// every second in case another process ran it). The job is stored: a failed re-read answers with
/// what is known rather than an error.
async fn wait_for_end(state: &AppState, job: Job, until: tokio::time::Instant) -> Job {
    let mut rx = state.store.subscribe();
    let deadline = until;
    let mut job = job;
    loop {
        if job.state.is_terminal() {
            return job;
        }
        let tick = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(id) if id != job.id => continue,
                    _ => break,
                },
                _ = &mut tick => break,
                _ = tokio::time::sleep_until(deadline) => return job,
                _ = state.shutdown.cancelled() => return job,
            }
        }
        if let Ok(Some(j)) = state.store.get(&job.id).await {
            job = j;
        }
    }
}

fn parse_time(field: &str, v: &str) -> Result<i64, ApiError> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            ApiError::bad_request(
                "invalid_time",
                field,
                format!("`{v}` is not an RFC 3339 time ({e})"),
            )
        })
}

/// List jobs, newest first.
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs", operation_id = "list_jobs",
    params(
        ("state" = Option<JobState>, Query, description = "Only jobs in this state"),
        ("action" = Option<Action>, Query, description = "Only jobs of this action"),
        ("since" = Option<String>, Query, format = DateTime, description = "Created at or after (RFC 3339)"),
        ("until" = Option<String>, Query, format = DateTime, description = "Created before (RFC 3339)"),
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Page size, 1-500 (default 50)"),
        ("cursor" = Option<String>, Query, pattern = "^[0-7][0-9A-HJKMNP-TV-Za-hjkmnp-tv-z]{25}$", description = "`next_cursor` of the previous page"),
        ("created_by" = Option<String>, Query, max_length = 256, description = "Only jobs submitted with this API token (its name), or queued by an SNS hook (`sns:<hook>`)"),
        ("schedule" = Option<String>, Query, max_length = 64, description = "Only the jobs this schedule's firings queued (its history)"),
    ),
    responses(
        (status = 200, body = JobPage),
        (status = 400, description = "Bad query parameter", body = Problem),
        (status = 401, body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Json<JobPage>, ApiError> {
    caller.require(Role::Viewer)?;
    let Query(params) =
        query.map_err(|e| ApiError::bad_request("invalid_query", "query", e.body_text()))?;
    let mut q = ListQuery {
        limit: 50,
        ..Default::default()
    };
    for (k, v) in params {
        match k.as_str() {
            "state" => {
                q.state = Some(
                    v.parse::<JobState>()
                        .map_err(|m| ApiError::bad_request("invalid_state", "state", m))?,
                )
            }
            "action" => {
                let a = Action::parse(&v).ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_action",
                        "action",
                        format!("`{v}` is not an action"),
                    )
                })?;
                q.action = Some(a.as_str().to_string());
            }
            "since" => q.since_ms = Some(parse_time("since", &v)?),
            "until" => q.until_ms = Some(parse_time("until", &v)?),
            "limit" => {
                q.limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=500).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_limit",
                            "limit",
                            "must be a whole number from 1 to 500",
                        )
                    })?
            }
            "cursor" => {
                if ulid::Ulid::from_string(&v).is_err() {
                    return Err(ApiError::bad_request(
                        "invalid_cursor",
                        "cursor",
                        "not a cursor returned by this API",
                    ));
                }
                q.before_id = Some(v);
            }
            "created_by" => {
                if v.is_empty() || v.len() > 256 {
                    return Err(ApiError::bad_request(
                        "invalid_created_by",
                        "created_by",
                        "a token's name (1 to 256 bytes) or sns:<hook>",
                    ));
                }
                q.created_by = Some(v);
            }
            "schedule" => {
                if !crate::config::is_hook_name(&v) {
                    return Err(ApiError::bad_request(
                        "invalid_schedule",
                        "schedule",
                        "a schedule's name (1-64 letters, digits, `-` or `_`)",
                    ));
                }
                q.created_by = Some(ec2jobd_spec::schedule::fired_by(&v));
            }
            other => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    other,
                    format!(
                        "unknown query parameter `{other}` (state, action, since, until, limit, cursor, created_by, schedule)"
                    ),
                ))
            }
        }
    }
    let page = state.store.list(q).await?;
    Ok(Json(JobPage {
        jobs: page.jobs.into_iter().map(Job::redacted).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// One job.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = Job), (status = 404, body = Problem), (status = 401, body = Problem)),
    security(("bearer" = []))
)]
pub async fn get_job(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Job>, ApiError> {
    caller.require(Role::Viewer)?;
    let job = state
        .store
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("job `{id}`")))?;
    Ok(Json(job.redacted()))
}

/// Cancel a job.
///
/// A queued job is cancelled at once (`200`); a running one is flagged and stops at its next step or
/// wait (`202`), ending as `cancelled`. A job that already ended is `409`.
#[utoipa::path(
    post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled", body = Job),
        (status = 202, description = "Cancel requested; the job stops at its next boundary", body = Job),
        (status = 404, body = Problem),
        (status = 409, description = "Already finished", body = Problem),
        (status = 403, body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match cancel_job(&state, &caller, &id).await? {
        CancelOutcome::Cancelled(j) => Ok((StatusCode::OK, Json(j.redacted())).into_response()),
        CancelOutcome::Requested(j) => {
            Ok((StatusCode::ACCEPTED, Json(j.redacted())).into_response())
        }
        CancelOutcome::AlreadyFinished(j) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!("job `{id}` already ended as {}", j.state),
        )),
    }
}

/// Cancels a job for an operator (API and dashboard): a queued one at once, a running one at its
/// next boundary (this replica's worker is told now, another's at its next heartbeat).
pub async fn cancel_job(
    state: &AppState,
    caller: &Caller,
    id: &str,
) -> Result<CancelOutcome, ApiError> {
    caller.require(Role::Operator)?;
    let out = state
        .store
        .cancel(id, &caller.0.name)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("job `{id}`")))?;
    if let CancelOutcome::Requested(_) = out {
        state.runner.cancel_local(id);
    }
    Ok(out)
}

/// The job's progress as Server-Sent Events, from the beginning (or after `Last-Event-ID`) until the
/// job ends (events recorded after the end so far, such as `notified`, come with it). Each event's `event` is the kind, its `id` the sequence number, its `data` a JobEvent.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("Last-Event-ID" = Option<i64>, Header, description = "Resume after this event"),
    ),
    responses(
        (status = 200, description = "Server-Sent Events: `event:` the kind, `id:` the sequence number, `data:` a JobEvent as JSON", body = String, content_type = "text/event-stream"),
        (status = 404, body = Problem),
        (status = 429, description = "http.max_streams (or the token's share) event streams are open (Retry-After)", body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require(Role::Viewer)?;
    let slot = stream_slot(&state, &caller)?;
    let after = match headers.get("last-event-id") {
        None => 0,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .ok_or_else(|| {
                ApiError::bad_request("invalid_last_event_id", "Last-Event-ID", "must be a number")
            })?,
    };
    // Subscribe before the first read so nothing that happens in between is missed.
    let mut rx = state.store.subscribe();
    state
        .store
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("job `{id}`")))?;
    let (tx, out) = tokio::sync::mpsc::channel::<Event>(64);
    let (store, shutdown) = (state.store.clone(), state.shutdown.clone());
    tokio::spawn(async move {
        let _slot = slot;
        let mut last = after;
        loop {
            let batch: Vec<JobEvent> = match store.events(&id, last, 500).await {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(error = %e, "event stream read failed");
                    return;
                }
            };
            let full = batch.len() == 500;
            let mut ended = false;
            for e in batch {
                last = e.seq;
                // Events recorded after the end (its notification) are sent with it.
                ended |= TERMINAL_EVENT_KINDS.contains(&e.kind.as_str());
                let ev = Event::default()
                    .id(e.seq.to_string())
                    .event(e.kind.clone())
                    .json_data(&e)
                    .unwrap_or_default();
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            if full {
                continue;
            }
            if ended {
                return;
            }
            // Wait for news of this job; re-read at least every few seconds as a safety net.
            let deadline = tokio::time::sleep(Duration::from_secs(5));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    r = rx.recv() => match r {
                        Ok(changed) if changed != id => continue,
                        Ok(_) | Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return,
                    },
                    _ = &mut deadline => break,
                    _ = tx.closed() => return,
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    });
    let stream = ReceiverStream::new(out).map(Ok);
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(state.config.http.sse_keepalive.0)))
}

/// The flat variables of `outputs`, in order: job-level first, then per instance (1-based).
pub fn output_vars(job: &Job) -> Vec<(String, String)> {
    let mut out = vec![
        ("JOB_ID".to_string(), job.id.clone()),
        ("JOB_STATE".to_string(), job.state.to_string()),
        ("JOB_ACTION".to_string(), job.action.to_string()),
        (
            "JOB_ERROR_CODE".to_string(),
            job.error
                .as_ref()
                .map(|e| e.code.clone())
                .unwrap_or_default(),
        ),
        (
            "INSTANCE_COUNT".to_string(),
            job.results.instances.len().to_string(),
        ),
    ];
    for (n, i) in job.results.instances.iter().enumerate() {
        let n = n + 1;
        let o = |v: &Option<String>| v.clone().unwrap_or_default();
        for (key, value) in [
            ("INSTANCE_ID", i.instance_id.clone()),
            ("STATE", i.state.clone()),
            ("NAME", o(&i.name)),
            ("INSTANCE_TYPE", o(&i.instance_type)),
            ("AVAILABILITY_ZONE", o(&i.availability_zone)),
            ("PUBLIC_DNS_NAME", o(&i.public_dns_name)),
            ("PUBLIC_IP", o(&i.public_ip)),
            ("PRIVATE_DNS_NAME", o(&i.private_dns_name)),
            ("PRIVATE_IP", o(&i.private_ip)),
            ("CHECKS", o(&i.checks)),
        ] {
            out.push((format!("{key}_{n}"), value));
        }
        if job.action == Action::AuditTags {
            out.push((format!("MISSING_TAGS_{n}"), i.missing_tags.join(",")));
        }
    }
    // Backups: one numbered set per snapshot made (per volume) or described.
    let snaps: Vec<(&str, Option<&str>, &str)> = if job.results.volumes.is_empty() {
        job.results
            .snapshots
            .iter()
            .map(|s| {
                (
                    s.snapshot_id.as_str(),
                    s.volume_id.as_deref(),
                    s.state.as_str(),
                )
            })
            .collect()
    } else {
        job.results
            .volumes
            .iter()
            .filter_map(|v| {
                let s = v.snapshot.as_ref()?;
                Some((
                    s.snapshot_id.as_str(),
                    Some(v.volume_id.as_str()),
                    s.state.as_str(),
                ))
            })
            .collect()
    };
    if !job.results.images.is_empty() {
        out.push(("IMAGE_COUNT".into(), job.results.images.len().to_string()));
        for (n, i) in job.results.images.iter().enumerate() {
            out.push((format!("IMAGE_ID_{}", n + 1), i.image_id.clone()));
            out.push((format!("IMAGE_STATE_{}", n + 1), i.state.clone()));
        }
    }
    if !snaps.is_empty() {
        out.push(("SNAPSHOT_COUNT".into(), snaps.len().to_string()));
        for (n, (snap, vol, st)) in snaps.into_iter().enumerate() {
            let n = n + 1;
            out.push((format!("SNAPSHOT_ID_{n}"), snap.to_string()));
            out.push((format!("VOLUME_ID_{n}"), vol.unwrap_or("").to_string()));
            out.push((format!("SNAPSHOT_STATE_{n}"), st.to_string()));
        }
    }
    out
}

fn shell_quote(v: &str) -> String {
    if !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/@".contains(&b))
    {
        v.to_string()
    } else {
        format!("'{}'", v.replace('\'', "'\\''"))
    }
}

/// The job as a text report: job line, target volumes, snapshot status, rotation result,
/// instances, summary and error (what backup e-mails look like; SNS notifications carry the same).
#[utoipa::path(
    get, path = "/v1/jobs/{id}/report", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "The report", content_type = "text/plain", body = String),
        (status = 404, body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn report(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let job = state
        .store
        .get(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("job `{id}`")))?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        crate::report::render(&job),
    )
        .into_response())
}

/// The job's results as flat variables for schedulers: `INSTANCE_ID_1`, `PUBLIC_DNS_NAME_1`,
/// `PUBLIC_IP_1`, `PRIVATE_IP_1`, … as a JSON object, or with `?format=env` as `KEY=value` lines
/// (values quoted for a POSIX shell where needed; the same text as `/outputs/env`).
#[utoipa::path(
    get, path = "/v1/jobs/{id}/outputs", tag = "jobs",
    params(
        ("id" = String, Path, description = "Job id"),
        ("format" = Option<String>, Query, pattern = "^(json|env)$", description = "`json` (default) or `env` (text/plain `KEY=value` lines)"),
    ),
    responses(
        (status = 200, description = "Flat variables: a JSON object, or `KEY=value` lines with `?format=env`", content(
            (std::collections::BTreeMap<String, String> = "application/json"),
            (String = "text/plain"),
        )),
        (status = 400, body = Problem),
        (status = 404, body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn outputs(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        query.map_err(|e| ApiError::bad_request("invalid_query", "query", e.body_text()))?;
    let mut env = false;
    for (k, v) in params {
        match (k.as_str(), v.as_str()) {
            ("format", "env") => env = true,
            ("format", "json") => env = false,
            ("format", other) => {
                return Err(ApiError::bad_request(
                    "invalid_format",
                    "format",
                    format!("`{other}` is not `json` or `env`"),
                ))
            }
            (other, _) => {
                return Err(ApiError::bad_request(
                    "unknown_parameter",
                    other,
                    format!("unknown query parameter `{other}` (format)"),
                ))
            }
        }
    }
    output_answer(&state, &caller, &id, env).await
}

/// The job's outputs as `KEY=value` lines for `eval` in a shell: what `outputs?format=env` answers,
/// as an operation of its own for generated clients (one content type per operation).
#[utoipa::path(
    get, path = "/v1/jobs/{id}/outputs/env", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "`KEY=value` lines, values quoted for a POSIX shell", body = String, content_type = "text/plain"),
        (status = 404, body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn outputs_env(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    output_answer(&state, &caller, &id, true).await
}

/// The answer of both outputs routes.
async fn output_answer(
    state: &AppState,
    caller: &Caller,
    id: &str,
    env: bool,
) -> Result<Response, ApiError> {
    caller.require(Role::Viewer)?;
    let job = state
        .store
        .get(id)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("job `{id}`")))?;
    let vars = output_vars(&job);
    if env {
        let text: String = vars
            .iter()
            .map(|(k, v)| format!("{k}={}\n", shell_quote(v)))
            .collect();
        Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
    } else {
        let map: serde_json::Map<String, serde_json::Value> = vars
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        Ok(Json(map).into_response())
    }
}

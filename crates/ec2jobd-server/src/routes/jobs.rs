//! `/v1/jobs`: submit (with idempotency keys and `?wait=`), list, get, cancel, the live event
//! stream, outputs and the text report. Each handler reads its request, asks `service::jobs`,
//! and answers.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::DateTime;
use ec2jobd_spec::{Action, Job, JobEvent, JobSpec, JobState, TERMINAL_EVENT_KINDS};
use ec2jobd_store::CancelOutcome;
use futures::Stream;
use serde::Serialize;
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use utoipa::ToSchema;

use super::extract::{body_error, parse_json, require_json, wait_param};
use crate::deadline::Deadline;
use crate::error::{ApiError, Problem};
use crate::service::policy::{self, Op};
use crate::service::{jobs, Caller};
use crate::state::AppState;

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
    policy::role(&caller, Op::Submit)?;
    let wait = wait_param(query)?;
    require_json(&headers)?;
    let body = body.map_err(body_error)?;
    let spec: JobSpec = parse_json(&body)?;
    let key = super::respond::key(&headers)?;
    let slot = super::respond::slot(&state, &caller, wait)?;
    let admitted = jobs::submit(&state, &caller, spec, key).await?;
    super::respond::submitted(&state, &headers, &deadline, wait, slot, admitted).await
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
    policy::role(&caller, Op::ReadJobs)?;
    let Query(params) =
        query.map_err(|e| ApiError::bad_request("invalid_query", "query", e.body_text()))?;
    let mut q = jobs::newest();
    for (k, v) in params {
        match k.as_str() {
            "since" => q.since_ms = Some(parse_time("since", &v)?),
            "until" => q.until_ms = Some(parse_time("until", &v)?),
            k if jobs::filter(&mut q, k, &v)? => {}
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
    let page = jobs::list(&state, &caller, q).await?;
    Ok(Json(JobPage {
        jobs: page.jobs,
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
    Ok(Json(jobs::get(&state, &caller, &id).await?))
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
    match jobs::cancel(&state, &caller, &id).await? {
        CancelOutcome::Cancelled(j) => Ok((StatusCode::OK, Json(j)).into_response()),
        CancelOutcome::Requested(j) => Ok((StatusCode::ACCEPTED, Json(j)).into_response()),
        CancelOutcome::AlreadyFinished(j) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!("job `{id}` already ended as {}", j.state),
        )),
    }
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
    policy::role(&caller, Op::ReadJobs)?;
    let slot = jobs::stream_slot(&state, &caller)?;
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
    let mut rx = jobs::watch(&state);
    jobs::get(&state, &caller, &id).await?;
    let (tx, out) = tokio::sync::mpsc::channel::<Event>(64);
    let shutdown = state.shutdown.clone();
    let st = state.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let mut last = after;
        loop {
            let batch: Vec<JobEvent> = match jobs::events(&st, &caller, &id, last, 500).await {
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
    let job = jobs::get(&state, &caller, &id).await?;
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
    let job = jobs::get(state, caller, id).await?;
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

//! Schedules over HTTP: `PUT/GET/DELETE /v1/schedules/{name}` (admin to write, any role to read),
//! `GET /v1/schedules`, `POST /v1/schedules/{name}/pause|resume`. A schedule from config is shown
//! (`source: "config"`) but changed only in config. Reading shows the next 10 firings and the
//! newest job a firing queued; `GET /v1/jobs?schedule=<name>` has the whole history.
//!
//! What a schedule is and how it is checked lives in `crate::schedules`; this module only answers.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use chrono::{DateTime, Utc};
use ec2jobd_spec::{JobState, Role};
use ec2jobd_store::Named;
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, Problem};
use crate::routes::jobs::{parse_json, require_json};
use crate::schedules::windows::{self, Override};
use crate::schedules::{self, Schedule, Source, Upcoming};
use crate::state::AppState;

/// Routes of this module (behind authentication).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/schedules", get(list))
        .route("/v1/schedules/{name}", get(get_one).put(put).delete(delete))
        .route("/v1/schedules/{name}/pause", post(pause))
        .route("/v1/schedules/{name}/resume", post(resume))
        .route(
            "/v1/schedules/{name}/overrides",
            get(list_overrides).post(add_override),
        )
        .route(
            "/v1/schedules/{name}/overrides/{id}",
            axum::routing::delete(delete_override),
        )
}

/// The newest job a schedule's firing queued.
#[derive(Debug, Serialize, ToSchema)]
pub struct LastJob {
    /// Job id.
    pub id: String,
    /// Its state.
    pub state: JobState,
    /// When it was queued.
    pub created_at: DateTime<Utc>,
}

/// A schedule as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleInfo {
    /// Name: its firings' jobs have `schedule` = this and `created_by` = `schedule:<name>`.
    pub name: String,
    /// `config` (change it there) or `api`.
    pub source: Source,
    /// The schedule.
    pub schedule: Schedule,
    /// The next firings (10 for one schedule, 1 in the list); empty when paused or ended.
    pub next: Vec<Upcoming>,
    /// The newest job a firing queued (one schedule only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_job: Option<LastJob>,
    /// A window's unexpired overrides by id (one schedule only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, Override>,
}

fn info(
    state: &AppState,
    name: String,
    source: Source,
    schedule: Schedule,
    n: usize,
) -> ScheduleInfo {
    let next = match schedule.plan(&state.config.calendars) {
        Ok(plan) if schedule.enabled => plan.upcoming(Utc::now(), n),
        _ => Vec::new(),
    };
    ScheduleInfo {
        name,
        source,
        schedule,
        next,
        last_job: None,
        overrides: BTreeMap::new(),
    }
}

async fn one(state: &AppState, name: &str) -> Result<(Source, Schedule), ApiError> {
    schedules::find(state, name)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("schedule `{name}`")))
}

/// Every schedule (config first), each with its next firing.
#[utoipa::path(get, path = "/v1/schedules", tag = "schedules", operation_id = "list_schedules",
    responses((status = 200, body = [ScheduleInfo])), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<ScheduleInfo>>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(Json(
        schedules::all(&state)
            .await?
            .into_iter()
            .map(|(name, source, s)| info(&state, name, source, s, 1))
            .collect(),
    ))
}

/// One schedule, with its next 10 firings and its newest job.
#[utoipa::path(get, path = "/v1/schedules/{name}", tag = "schedules", operation_id = "get_schedule",
    params(("name" = String, Path, description = "Schedule name")),
    responses((status = 200, body = ScheduleInfo), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    caller.require(Role::Viewer)?;
    let (source, schedule) = one(&state, &name).await?;
    let last = schedules::last_job(&state, &name).await?.map(|j| LastJob {
        id: j.id,
        state: j.state,
        created_at: j.created_at,
    });
    let (live, _) = windows::overrides(&state, &name, Utc::now()).await?;
    let mut out = info(&state, name, source, schedule, 10);
    out.last_job = last;
    out.overrides = windows::by_id(live);
    Ok(Json(out))
}

fn from_config(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "schedule_in_config",
        format!("schedule `{name}` is defined in config ([schedules.{name}]); change it there"),
    )
}

async fn save(
    state: &AppState,
    caller: &Caller,
    name: &str,
    mut schedule: Schedule,
) -> Result<bool, ApiError> {
    schedules::check(state, &schedule).await?;
    schedule.saved_at = Some(Utc::now());
    let created = state
        .store
        .put_named(
            Named::Schedule,
            name,
            serde_json::to_value(&schedule).unwrap_or_default(),
            &caller.0.name,
        )
        .await?;
    state.schedules_changed.notify_one();
    Ok(created)
}

/// Save (create or replace) a schedule (admin). Checked completely: the expression and zone, the
/// calendars, and the job every firing makes (422 naming the field); nothing is stored otherwise.
#[utoipa::path(put, path = "/v1/schedules/{name}", tag = "schedules", operation_id = "put_schedule",
    params(("name" = String, Path, description = "Schedule name")),
    request_body = Schedule,
    responses((status = 201, body = ScheduleInfo), (status = 200, body = ScheduleInfo),
        (status = 409, description = "Defined in config", body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    caller.require(Role::Admin)?;
    require_json(&headers)?;
    crate::routes::check_name(&name)?;
    if state.config.schedules.contains_key(&name) {
        return Err(from_config(&name));
    }
    let schedule: Schedule = parse_json(&body)?;
    let created = save(&state, &caller, &name, schedule).await?;
    let (source, schedule) = one(&state, &name).await?;
    let status = crate::routes::put_status(created);
    Ok((status, Json(info(&state, name, source, schedule, 10))).into_response())
}

/// Delete a schedule (admin); its jobs stay.
#[utoipa::path(delete, path = "/v1/schedules/{name}", tag = "schedules", operation_id = "delete_schedule",
    params(("name" = String, Path, description = "Schedule name")),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Admin)?;
    if state.config.schedules.contains_key(&name) {
        return Err(from_config(&name));
    }
    if state
        .store
        .delete_named(Named::Schedule, &name, &caller.0.name)
        .await?
    {
        state.schedules_changed.notify_one();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(&format!("schedule `{name}`")))
    }
}

async fn set_enabled(
    state: &AppState,
    caller: &Caller,
    name: &str,
    enabled: bool,
) -> Result<Json<ScheduleInfo>, ApiError> {
    caller.require(Role::Admin)?;
    let (source, mut schedule) = one(state, name).await?;
    if source == Source::Config {
        return Err(from_config(name));
    }
    if schedule.enabled != enabled {
        schedule.enabled = enabled;
        save(state, caller, name, schedule).await?;
    }
    let (source, schedule) = one(state, name).await?;
    Ok(Json(info(state, name.to_string(), source, schedule, 10)))
}

/// Pause a schedule (admin): nothing fires until it is resumed (`enabled: false`).
#[utoipa::path(post, path = "/v1/schedules/{name}/pause", tag = "schedules", operation_id = "pause_schedule",
    params(("name" = String, Path, description = "Schedule name")),
    responses((status = 200, body = ScheduleInfo), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn pause(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    set_enabled(&state, &caller, &name, false).await
}

/// Resume a paused schedule (admin). Firings missed while paused are not caught up.
#[utoipa::path(post, path = "/v1/schedules/{name}/resume", tag = "schedules", operation_id = "resume_schedule",
    params(("name" = String, Path, description = "Schedule name")),
    responses((status = 200, body = ScheduleInfo), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<ScheduleInfo>, ApiError> {
    set_enabled(&state, &caller, &name, true).await
}

/// An override saved.
#[derive(Debug, Serialize, ToSchema)]
pub struct OverrideInfo {
    /// Its id (`DELETE /v1/schedules/{name}/overrides/{id}` ends it early).
    pub id: String,
    /// The override.
    #[serde(flatten)]
    pub held: Override,
}

/// Hold some of a window's instances in a state until a time (operator): "keep db-7 running
/// until Friday 18:00". The window's next reconciliation (at once for an enforced window, else
/// its next start or stop) honours it; once `until` passes they follow the window again.
#[utoipa::path(post, path = "/v1/schedules/{name}/overrides", tag = "schedules", operation_id = "add_schedule_override",
    params(("name" = String, Path, description = "Schedule name (a window)")),
    request_body = Override,
    responses((status = 201, body = OverrideInfo), (status = 404, body = Problem), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn add_override(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<OverrideInfo>), ApiError> {
    caller.require(Role::Operator)?;
    require_json(&headers)?;
    let (_, schedule) = one(&state, &name).await?;
    let held: Override = parse_json(&body)?;
    let bad = |field: &str, msg: &str| schedules::unprocessable((field.into(), msg.into()));
    if schedule.window.is_none() {
        return Err(bad("name", "overrides are for window schedules"));
    }
    match (&held.instance_ids, &held.tags) {
        (Some(ids), None) if !ids.0.is_empty() && ids.0.len() <= 1000 => {}
        (None, Some(tags)) if !tags.0.is_empty() => {}
        _ => {
            return Err(bad(
                "instance_ids",
                "give either `instance_ids` (1 to 1000) or `tags`",
            ))
        }
    }
    let now = Utc::now();
    if held.until <= now || held.until > now + chrono::Duration::days(366) {
        return Err(bad("until", "must be in the future, within a year"));
    }
    if held.reason.as_ref().is_some_and(|r| r.len() > 1024) {
        return Err(bad("reason", "at most 1024 bytes"));
    }
    let (live, _) = windows::overrides(&state, &name, now).await?;
    if live.len() >= 100 {
        return Err(bad("name", "this schedule already has 100 overrides"));
    }
    let id = ulid::Ulid::new().to_string();
    state
        .store
        .put_named(
            Named::ScheduleOverride,
            &format!("{name}/{id}"),
            serde_json::to_value(&held).unwrap_or_default(),
            &caller.0.name,
        )
        .await?;
    state.schedules_changed.notify_one();
    Ok((StatusCode::CREATED, Json(OverrideInfo { id, held })))
}

/// A window's unexpired overrides.
#[utoipa::path(get, path = "/v1/schedules/{name}/overrides", tag = "schedules", operation_id = "list_schedule_overrides",
    params(("name" = String, Path, description = "Schedule name")),
    responses((status = 200, body = [OverrideInfo]), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn list_overrides(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Vec<OverrideInfo>>, ApiError> {
    caller.require(Role::Viewer)?;
    one(&state, &name).await?;
    let (live, _) = windows::overrides(&state, &name, Utc::now()).await?;
    Ok(Json(
        windows::by_id(live)
            .into_iter()
            .map(|(id, held)| OverrideInfo { id, held })
            .collect(),
    ))
}

/// End an override early (operator).
#[utoipa::path(delete, path = "/v1/schedules/{name}/overrides/{id}", tag = "schedules", operation_id = "delete_schedule_override",
    params(("name" = String, Path, description = "Schedule name"), ("id" = String, Path, description = "Override id")),
    responses((status = 204), (status = 404, body = Problem)),
    security(("bearer" = [])))]
pub async fn delete_override(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require(Role::Operator)?;
    if state
        .store
        .delete_named(
            Named::ScheduleOverride,
            &format!("{name}/{id}"),
            &caller.0.name,
        )
        .await?
    {
        state.schedules_changed.notify_one();
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(&format!("override `{id}` of `{name}`")))
    }
}

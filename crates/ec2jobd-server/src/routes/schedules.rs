//! Schedules over HTTP: `PUT/GET/DELETE /v1/schedules/{name}` (admin to write, any role to read),
//! `GET /v1/schedules`, `POST /v1/schedules/{name}/pause|resume`. A schedule from config is shown
//! (`source: "config"`) but changed only in config. Reading shows the next 10 firings and the
//! newest job a firing queued; `GET /v1/jobs?schedule=<name>` has the whole history.
//!
//! What a schedule is lives in `crate::schedules`, what is done with it in `service::schedules`;
//! this module only reads requests and answers.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};

use super::extract::{parse_json, require_json};
use crate::error::{ApiError, Problem};
use crate::schedules::windows::Override;
use crate::schedules::Schedule;
use crate::service::policy::{self, Op};
use crate::service::schedules::{self, OverrideInfo, ScheduleInfo};
use crate::service::Caller;
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

/// Every schedule (config first), each with its next firing.
#[utoipa::path(get, path = "/v1/schedules", tag = "schedules", operation_id = "list_schedules",
    responses((status = 200, body = [ScheduleInfo])), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<ScheduleInfo>>, ApiError> {
    Ok(Json(schedules::list(&state, &caller).await?))
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
    Ok(Json(schedules::get(&state, &caller, &name).await?))
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
    policy::role(&caller, Op::SaveSchedule)?;
    require_json(&headers)?;
    crate::service::check_name(&name)?;
    let schedule: Schedule = parse_json(&body)?;
    let created = schedules::save(&state, &caller, &name, schedule).await?;
    let status = super::put_status(created);
    Ok((status, Json(schedules::get(&state, &caller, &name).await?)).into_response())
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
    schedules::delete(&state, &caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
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
    Ok(Json(
        schedules::set_enabled(&state, &caller, &name, false).await?,
    ))
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
    Ok(Json(
        schedules::set_enabled(&state, &caller, &name, true).await?,
    ))
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
    policy::role(&caller, Op::AddOverride)?;
    require_json(&headers)?;
    let held: Override = parse_json(&body)?;
    let made = schedules::add_override(&state, &caller, &name, held).await?;
    Ok((StatusCode::CREATED, Json(made)))
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
    Ok(Json(
        schedules::list_overrides(&state, &caller, &name).await?,
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
    schedules::end_override(&state, &caller, &name, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

//! `/v1/templates`: saved job templates (what a template is and how it is checked is
//! `service::templates`). `PUT /v1/templates/{name}` saves one, `POST /v1/templates/{name}/run`
//! submits a job from it with parameter values, `GET` lists and reads them.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::extract::{parse_json, require_json, wait_param};
use crate::deadline::Deadline;
use crate::error::{ApiError, Problem};
use crate::service::policy::{self, Op};
use crate::service::templates::{self, NamedTemplate, Template};
use crate::service::Caller;
use crate::state::AppState;

/// Routes of this module (behind authentication).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/templates", get(list))
        .route("/v1/templates/{name}", get(get_one).put(put).delete(delete))
        .route("/v1/templates/{name}/run", post(run))
}

/// Body of `POST /v1/templates/{name}/run`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    /// Parameter values by name.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub parameters: BTreeMap<String, Value>,
}

/// Every saved template.
#[utoipa::path(get, path = "/v1/templates", tag = "templates", operation_id = "list_templates",
    responses((status = 200, body = [NamedTemplate])), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<NamedTemplate>>, ApiError> {
    Ok(Json(templates::list(&state, &caller).await?))
}

/// One template.
#[utoipa::path(get, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 200, body = NamedTemplate), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get_one(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<NamedTemplate>, ApiError> {
    Ok(Json(templates::get(&state, &caller, &name).await?))
}

/// Save (create or replace) a template (admin): every placeholder declared, types known, the
/// rendered spec valid when every parameter has a default (422 naming the field), and what it
/// runs within the saver's scopes (403).
#[utoipa::path(put, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    request_body = Template,
    responses((status = 201, body = NamedTemplate), (status = 200, body = NamedTemplate), (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn put(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    policy::role(&caller, Op::SaveTemplate)?;
    require_json(&headers)?;
    crate::service::check_name(&name)?;
    let template: Template = parse_json(&body)?;
    let created = templates::save(&state, &caller, &name, template.clone()).await?;
    let status = super::put_status(created);
    Ok((status, Json(NamedTemplate { name, template })).into_response())
}

/// Delete a template (admin).
#[utoipa::path(delete, path = "/v1/templates/{name}", tag = "templates",
    params(("name" = String, Path, description = "Template name")),
    responses((status = 204), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    templates::delete(&state, &caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Submit a job from a template with parameter values; answers like `POST /v1/jobs` (including
/// `?wait=` and `Idempotency-Key`).
#[utoipa::path(post, path = "/v1/templates/{name}/run", tag = "templates",
    params(("name" = String, Path, description = "Template name"),
        ("wait" = Option<String>, Query, description = "As for POST /v1/jobs")),
    request_body = RunBody,
    responses((status = 202, body = ec2jobd_spec::Job), (status = 201, body = ec2jobd_spec::Job),
        (status = 404, body = Problem), (status = 422, body = Problem),
        (status = 429, description = "The queue is full, or (with `wait`) too many streams are open; nothing stored (Retry-After)", body = Problem)),
    security(("bearer" = [])))]
pub async fn run(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(deadline): Extension<Deadline>,
    Path(name): Path<String>,
    headers: HeaderMap,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    body: Bytes,
) -> Result<Response, ApiError> {
    policy::role(&caller, Op::RunTemplate)?;
    let wait = wait_param(query)?;
    let given: RunBody = if body.is_empty() {
        RunBody::default()
    } else {
        require_json(&headers)?;
        parse_json(&body)?
    };
    let key = super::respond::key(&headers)?;
    let slot = super::respond::slot(&state, &caller, wait)?;
    let admitted = templates::run(&state, &caller, &name, &given.parameters, key).await?;
    super::respond::submitted(&state, &headers, &deadline, wait, slot, admitted).await
}

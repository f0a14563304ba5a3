//! Saved job templates: `PUT /v1/templates/{name}` stores a job spec with named parameters
//! (`${instance_id}`), `POST /v1/templates/{name}/run` submits a job from it with parameter values,
//! `GET /v1/templates` lists them.
//!
//! A string that is exactly `${p}` becomes the parameter's value with its type (so numbers, booleans
//! and lists work); inside a longer string the value is inserted as text. A template is checked when
//! saved (every placeholder declared, types known, and — when every parameter has a default — the
//! rendered spec is a valid job) and again with the values on run.

use std::borrow::Cow;
use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ec2jobd_spec::placeholders::{self, Budget, RenderError, Syntax};
use ec2jobd_spec::{JobSpec, Role};
use ec2jobd_store::Named;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::deadline::Deadline;
use crate::error::{ApiError, Problem};
use crate::routes::jobs::{parse_json, require_json, resolve_spec};
use crate::state::AppState;

/// Routes of this module (behind authentication).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/templates", get(list))
        .route("/v1/templates/{name}", get(get_one).put(put).delete(delete))
        .route("/v1/templates/{name}/run", post(run))
}

/// A parameter's type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ParamType {
    /// Text.
    String,
    /// A whole number.
    Integer,
    /// true or false.
    Boolean,
    /// A list of strings.
    StringList,
}

/// One named parameter.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateParam {
    /// Its type.
    #[serde(rename = "type")]
    pub kind: ParamType,
    /// Used when a run gives no value; without one the parameter is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub default: Option<Value>,
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// A saved template (body of `PUT /v1/templates/{name}`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// What it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Parameters by name.
    #[serde(default)]
    pub parameters: BTreeMap<String, TemplateParam>,
    /// The job spec, with `${name}` placeholders.
    #[schema(value_type = Object)]
    pub spec: Value,
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

fn unprocessable(code: &str, field: impl Into<String>, msg: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, code, msg).field(field)
}

fn type_ok(kind: ParamType, v: &Value) -> bool {
    match kind {
        ParamType::String => v.is_string(),
        ParamType::Integer => v.is_i64() || v.is_u64(),
        ParamType::Boolean => v.is_boolean(),
        ParamType::StringList => v
            .as_array()
            .is_some_and(|a| a.iter().all(|x| x.is_string())),
    }
}

/// The template's spec with these values, in one pass ([`placeholders`]): a string that is exactly
/// `${p}` becomes the value with its type, elsewhere the value goes in as text; values are never
/// scanned again. The result may be at most `limit` bytes (as a submitted body), else 422.
fn render(v: &Value, values: &BTreeMap<String, Value>, limit: usize) -> Result<Value, ApiError> {
    let syntax = Syntax::Dollar;
    let whole = |name: &str| values.get(name);
    let mut text = |name: &str| -> Result<Cow<'_, str>, RenderError> {
        match values.get(name) {
            Some(Value::String(t)) => Ok(Cow::Borrowed(t.as_str())),
            Some(other) => Ok(Cow::Owned(other.to_string())),
            None => Err(RenderError::Missing(name.to_string())),
        }
    };
    let out = placeholders::render_json(v, syntax, &mut Budget::new(limit), &whole, &mut text)
        .map_err(|e| match e {
            RenderError::TooLarge(_) => {
                unprocessable("spec_too_large", "parameters", e.to_string())
            }
            e => unprocessable("invalid_template", "spec", e.to_string()),
        })?;
    let size = serde_json::to_vec(&out)
        .map(|b| b.len())
        .unwrap_or(usize::MAX);
    if size > limit {
        return Err(unprocessable(
            "spec_too_large",
            "parameters",
            format!("the rendered spec would be larger than {limit} bytes"),
        ));
    }
    Ok(out)
}

impl Template {
    /// Checks the template on save.
    fn check(&self, state: &AppState) -> Result<(), ApiError> {
        // The action is never a parameter: without a valid one the template can never run.
        let action = self
            .spec
            .get("action")
            .and_then(Value::as_str)
            .unwrap_or("");
        if ec2jobd_spec::Action::parse(action).is_none() {
            return Err(unprocessable(
                "invalid_action",
                "spec.action",
                format!("`{action}` is not a known action"),
            ));
        }
        for name in self.parameters.keys() {
            let ok = name.len() <= 64
                && name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(unprocessable(
                    "invalid_parameter_name",
                    format!("parameters.{name}"),
                    "parameter names are 1-64 letters, digits or `_`, not starting with a digit",
                ));
            }
        }
        let mut used = Vec::new();
        placeholders::json_names(&self.spec, Syntax::Dollar, &mut used)
            .map_err(|e| unprocessable("invalid_template", "spec", e.to_string()))?;
        for p in &used {
            if !self.parameters.contains_key(p) {
                return Err(unprocessable(
                    "undeclared_parameter",
                    "spec",
                    format!("`${{{p}}}` is used but not declared in `parameters`"),
                ));
            }
        }
        for (name, p) in &self.parameters {
            if let Some(d) = &p.default {
                if !type_ok(p.kind, d) {
                    return Err(unprocessable(
                        "invalid_default",
                        format!("parameters.{name}.default"),
                        format!("does not have the parameter's type ({:?})", p.kind),
                    ));
                }
            }
        }
        if self.parameters.values().all(|p| p.default.is_some()) {
            self.spec_for(state, &BTreeMap::new())?;
        }
        Ok(())
    }

    /// The job spec for these values (defaults filled), checked like a submission.
    fn spec_for(
        &self,
        state: &AppState,
        given: &BTreeMap<String, Value>,
    ) -> Result<JobSpec, ApiError> {
        for k in given.keys() {
            if !self.parameters.contains_key(k) {
                return Err(unprocessable(
                    "unknown_parameter",
                    format!("parameters.{k}"),
                    "this template has no such parameter",
                ));
            }
        }
        let mut values = BTreeMap::new();
        for (name, p) in &self.parameters {
            let v = given.get(name).or(p.default.as_ref()).ok_or_else(|| {
                unprocessable(
                    "missing_parameter",
                    format!("parameters.{name}"),
                    "required",
                )
            })?;
            if !type_ok(p.kind, v) {
                return Err(unprocessable(
                    "invalid_parameter",
                    format!("parameters.{name}"),
                    format!("must be of type {:?}", p.kind),
                ));
            }
            values.insert(name.clone(), v.clone());
        }
        let rendered = render(&self.spec, &values, state.config.http.body_limit)?;
        let spec: JobSpec = serde_json::from_value(rendered)
            .map_err(|e| unprocessable("invalid_spec", "spec", e.to_string()))?;
        resolve_spec(state, spec).map_err(|mut e| {
            e.field = Some(format!("spec.{}", e.field.unwrap_or_default()));
            e
        })
    }
}

/// The job spec a saved template makes with these values (SNS rules naming a template).
pub async fn spec_from(
    state: &AppState,
    name: &str,
    values: &BTreeMap<String, Value>,
) -> Result<JobSpec, ApiError> {
    load(state, name).await?.spec_for(state, values)
}

pub(crate) async fn load(state: &AppState, name: &str) -> Result<Template, ApiError> {
    let body = state
        .store
        .get_named(Named::Template, name)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("template `{name}`")))?;
    serde_json::from_value(body).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "corrupt_template",
            e.to_string(),
        )
    })
}

/// A template with its name.
#[derive(Debug, Serialize, ToSchema)]
pub struct NamedTemplate {
    /// Name.
    pub name: String,
    /// The template.
    pub template: Template,
}

/// Every saved template.
#[utoipa::path(get, path = "/v1/templates", tag = "templates", operation_id = "list_templates",
    responses((status = 200, body = [NamedTemplate])), security(("bearer" = [])))]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<NamedTemplate>>, ApiError> {
    caller.require(Role::Viewer)?;
    Ok(Json(
        state
            .store
            .list_named(Named::Template)
            .await?
            .into_iter()
            .filter_map(|(name, b)| {
                Some(NamedTemplate {
                    name,
                    template: serde_json::from_value(b).ok()?,
                })
            })
            .collect(),
    ))
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
    caller.require(Role::Viewer)?;
    let template = load(&state, &name).await?;
    Ok(Json(NamedTemplate { name, template }))
}

/// Save (create or replace) a template (admin); checked as the module docs say (422 naming the field).
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
    caller.require(Role::Admin)?;
    require_json(&headers)?;
    crate::routes::check_name(&name)?;
    let template: Template = parse_json(&body)?;
    template.check(&state)?;
    let created = state
        .store
        .put_named(
            Named::Template,
            &name,
            serde_json::to_value(&template).unwrap_or_default(),
            &caller.0.name,
        )
        .await?;
    let status = crate::routes::put_status(created);
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
    caller.require(Role::Admin)?;
    if state
        .store
        .delete_named(Named::Template, &name, &caller.0.name)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(&format!("template `{name}`")))
    }
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
    caller.require(Role::Operator)?;
    caller.may_run_template(&name)?;
    let wait = crate::routes::jobs::wait_param(query)?;
    let template = load(&state, &name).await?;
    let given: RunBody = if body.is_empty() {
        RunBody::default()
    } else {
        require_json(&headers)?;
        parse_json(&body)?
    };
    let spec = template.spec_for(&state, &given.parameters)?;
    crate::routes::jobs::enqueue_and_answer(&state, &caller, &headers, &deadline, wait, spec).await
}

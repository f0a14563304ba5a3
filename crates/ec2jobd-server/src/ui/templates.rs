//! The dashboard's templates: the saved templates, and a run form built from each one's typed
//! parameters. Reads and runs are `service::templates` calls with the signed-in caller, so a run
//! passes the same checks as `POST /v1/templates/{name}/run` and a reader sees what the API
//! shows it (a secret default is never put in a form: left empty, the saved one is used).

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::{Extension, Form};
use maud::{html, Markup};
use serde_json::Value;

use super::jobs::queued;
use super::page::Csrf;
use super::page::{layout, layout_status, shown};
use crate::service::jobs::Key;
use crate::service::policy::{self, Op};
use crate::service::templates::{self, ParamType, Template, TemplateParam};
use crate::service::{Caller, Kind, ServiceError};
use crate::state::AppState;

/// `GET /ui/templates`.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<Csrf>,
) -> Response {
    let all = match templates::list(&state, &caller).await {
        Ok(t) => t,
        Err(e) => return shown(e),
    };
    let body = html! {
        @if all.is_empty() {
            p.empty { "No templates yet: an admin saves one with " code { "PUT /v1/templates/{name}" } "." }
        } @else {
            table #templates {
                thead { tr { th { "Template" } th { "Action" } th { "Parameters" } th { "Description" } } }
                tbody { @for nt in &all {
                    @let (name, t) = (&nt.name, &nt.template);
                    tr data-template=(name) {
                        td { a href={ "/ui/templates/" (name) } { (name) } }
                        td { (t.spec.get("action").and_then(Value::as_str).unwrap_or("")) }
                        td { (t.parameters.keys().cloned().collect::<Vec<_>>().join(", ")) }
                        td { (t.description.as_deref().unwrap_or("")) }
                    }
                } }
            }
        }
    };
    layout("Templates", &caller, &csrf, body)
}

/// `GET /ui/templates/{name}`: the template and its run form.
pub async fn show(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<Csrf>,
    Path(name): Path<String>,
) -> Response {
    match templates::get(&state, &caller, &name).await {
        Ok(t) => form_page(&caller, &csrf, &name, &t.template, &[], None),
        Err(e) => shown(e),
    }
}

/// `POST /ui/templates/{name}/run` (operators): a job from the form's values, then its page; or
/// the form again with the values given and what is wrong (nothing stored).
pub async fn run(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<Csrf>,
    Path(name): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let template = match templates::get(&state, &caller, &name).await {
        Ok(t) => t.template,
        Err(e) => return shown(e),
    };
    let go = async {
        let values = values_of(&template.parameters, &form)?;
        templates::run(&state, &caller, &name, &values, Key::None).await
    };
    match go.await {
        Ok(admitted) => queued(&state, admitted).await,
        Err(e) if e.kind == Kind::Forbidden => shown(e),
        Err(e) => form_page(&caller, &csrf, &name, &template, &form, Some(e)),
    }
}

/// The form field of parameter `name`.
fn field(name: &str) -> String {
    format!("p.{name}")
}

/// Typed values from the form: an empty field is left out (its default applies, or the run says
/// it is required); a list is one item per line or comma.
fn values_of(
    params: &BTreeMap<String, TemplateParam>,
    form: &[(String, String)],
) -> Result<BTreeMap<String, Value>, ServiceError> {
    let mut out = BTreeMap::new();
    for (name, p) in params {
        let key = field(name);
        let Some(raw) = form.iter().find(|(k, _)| *k == key).map(|(_, v)| v.trim()) else {
            continue;
        };
        if raw.is_empty() {
            continue;
        }
        let bad = |what: &str| {
            ServiceError::unprocessable(
                "invalid_parameter",
                format!("parameters.{name}"),
                format!("`{name}` must be {what}"),
            )
        };
        let v = match p.kind {
            ParamType::String => Value::String(raw.to_string()),
            ParamType::Integer => {
                Value::from(raw.parse::<i64>().map_err(|_| bad("a whole number"))?)
            }
            ParamType::Boolean => match raw {
                "true" => Value::Bool(true),
                "false" => Value::Bool(false),
                _ => return Err(bad("true or false")),
            },
            ParamType::StringList => Value::Array(
                raw.split(['\n', ','])
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_string()))
                    .collect(),
            ),
        };
        out.insert(name.clone(), v);
    }
    Ok(out)
}

/// A parameter's default as the text its field shows.
fn shown_default(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_string))
            .collect::<Vec<_>>()
            .join("\n"),
        Some(v) => v.to_string(),
        None => String::new(),
    }
}

fn form_page(
    caller: &Caller,
    csrf: &Csrf,
    name: &str,
    t: &Template,
    given: &[(String, String)],
    error: Option<ServiceError>,
) -> Response {
    let operator = policy::role(caller, Op::RunTemplate).is_ok();
    let secret = t.secret_parameters();
    let hidden = !crate::service::redact::may_see_secrets(caller);
    let value = |p: &str, default: Option<&Value>| {
        let key = field(p);
        let default = default.filter(|_| !(hidden && secret.contains(p)));
        given
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| shown_default(default))
    };
    let spec = serde_json::to_string_pretty(&t.spec).unwrap_or_default();
    let body = html! {
        @if let Some(d) = &t.description { p { (d) } }
        @if let Some(e) = &error {
            p.error role="alert" #run-error { (e.detail) @if let Some(f) = &e.field { " (" code { (f) } ")" } }
        }
        @if operator {
            form.run #run-form method="post" action={ "/ui/templates/" (name) "/run" } {
                input type="hidden" name="csrf" value=(csrf.0);
                @for (p, param) in &t.parameters {
                    (input(p, param, &value(p, param.default.as_ref()), hidden && secret.contains(p)))
                }
                button #run type="submit" { "Run" }
            }
        } @else {
            p.empty { "Running a template needs the operator role." }
        }
        details { summary { "Spec" } pre.spec { (spec) } }
    };
    let status = if error.is_some() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::OK
    };
    layout_status(status, &format!("Template {name}"), caller, csrf, body)
}

fn input(name: &str, p: &TemplateParam, value: &str, secret: bool) -> Markup {
    let key = field(name);
    let required = p.default.is_none();
    html! {
        label.param {
            span.name { (name) @if required { " *" } }
            @match p.kind {
                ParamType::String => { input type="text" name=(key) value=(value) required[required]; }
                ParamType::Integer => { input type="number" step="1" name=(key) value=(value) required[required]; }
                ParamType::Boolean => {
                    select name=(key) required[required] {
                        @if required { option value="" { "choose" } }
                        option value="true" selected[value == "true"] { "true" }
                        option value="false" selected[value == "false"] { "false" }
                    }
                }
                ParamType::StringList => { textarea name=(key) rows="3" required[required] { (value) } }
            }
            span.hint {
                (serde_json::to_value(p.kind).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default())
                @if p.kind == ParamType::StringList { ", one per line" }
                @if let Some(d) = &p.description { " — " (d) }
                @if secret && !required { " — secret: leave empty to use the saved default" }
            }
        }
    }
}

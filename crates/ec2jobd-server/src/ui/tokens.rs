//! The dashboard's tokens page (admins): the tokens (never their secrets), a form that makes one
//! and shows its secret once, and revocation: `service::tokens` calls with the signed-in caller,
//! the same checks and audit as `/v1/tokens`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use ec2jobd_spec::Role;
use ec2jobd_store::Scopes;
use maud::{html, Markup};

use super::page::Csrf;
use super::page::{layout_status, shown, time};
use crate::error::ApiError;
use crate::service::tokens::{self, CreatedToken, NewToken};
use crate::service::{Caller, Kind, ServiceError};
use crate::state::AppState;

type Fields = Form<Vec<(String, String)>>;

fn get<'a>(f: &'a [(String, String)], k: &str) -> &'a str {
    f.iter().find(|(n, _)| n == k).map_or("", |(_, v)| v.trim())
}

/// A comma-separated list.
fn list_of(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// `GET /ui/tokens`.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<Csrf>,
) -> Response {
    page(&state, &caller, &csrf, StatusCode::OK, None, None).await
}

/// `POST /ui/tokens` (admins): makes a token and shows its secret on this answer only.
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<Csrf>,
    Form(f): Fields,
) -> Response {
    let made = async {
        let role = get(&f, "role")
            .parse::<Role>()
            .map_err(|m| ServiceError::unprocessable("invalid_role", "role", m))?;
        let req = NewToken {
            name: get(&f, "name").to_string(),
            role,
            scopes: Scopes {
                accounts: list_of(get(&f, "accounts")),
                actions: list_of(get(&f, "actions")),
                templates: list_of(get(&f, "templates")),
            },
        };
        tokens::create(&state, &caller, req).await
    };
    match made.await {
        Ok(t) => page(&state, &caller, &csrf, StatusCode::CREATED, Some(t), None).await,
        Err(e) if e.kind == Kind::Forbidden && e.field.is_none() => shown(e),
        Err(e) => {
            let status = ApiError::from(e.clone()).status;
            page(&state, &caller, &csrf, status, None, Some(e)).await
        }
    }
}

/// `POST /ui/tokens/{name}/revoke` (admins).
pub async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Response {
    match tokens::revoke(&state, &caller, &name).await {
        Ok(()) => Redirect::to("/ui/tokens").into_response(),
        Err(e) => shown(e),
    }
}

async fn page(
    state: &AppState,
    caller: &Caller,
    csrf: &Csrf,
    status: StatusCode,
    made: Option<CreatedToken>,
    error: Option<ServiceError>,
) -> Response {
    let tokens = match tokens::list(state, caller).await {
        Ok(t) => t,
        Err(e) => return shown(e),
    };
    let body = html! {
        @if let Some(t) = &made {
            section.secret #new-token {
                p { "Token " b { (t.name) } " (" (t.role) ") was made. Copy its secret now: it is not shown again and only its hash is kept." }
                pre #token-secret { (t.token) }
            }
        }
        @if let Some(e) = &error {
            p.error role="alert" { (e.detail) @if let Some(f) = &e.field { " (" code { (f) } ")" } }
        }
        (create_form(csrf))
        table #tokens {
            thead { tr { th { "Token" } th { "Role" } th { "Created" } th { "Scopes" } th {} } }
            tbody { @for t in &tokens { tr data-token=(t.name) {
                td { (t.name) }
                td { (t.role) }
                td { (time(&t.created_at)) }
                td { (scopes(&t.scopes)) }
                td { @if t.name != caller.name {
                    form method="post" action={ "/ui/tokens/" (t.name) "/revoke" } {
                        input type="hidden" name="csrf" value=(csrf.0);
                        button.danger type="submit" { "Revoke" }
                    }
                } @else { span.hint { "(signed in with it)" } } }
            } } }
        }
    };
    layout_status(status, "Tokens", caller, csrf, body)
}

fn scopes(s: &Scopes) -> String {
    if s.is_empty() {
        return "any".into();
    }
    [
        ("accounts", &s.accounts),
        ("actions", &s.actions),
        ("templates", &s.templates),
    ]
    .iter()
    .filter(|(_, v)| !v.is_empty())
    .map(|(k, v)| format!("{k}: {}", v.join(", ")))
    .collect::<Vec<_>>()
    .join("; ")
}

fn create_form(csrf: &Csrf) -> Markup {
    html! {
        form.filters #token-form method="post" action="/ui/tokens" {
            input type="hidden" name="csrf" value=(csrf.0);
            label { "Name " input name="name" required size="16" pattern="[A-Za-z0-9._\\-]{1,64}"; }
            label { "Role " select name="role" {
                option value="viewer" { "viewer" }
                option value="operator" { "operator" }
                option value="admin" { "admin" }
            } }
            label { "Accounts " input name="accounts" size="12" placeholder="any"; }
            label { "Actions " input name="actions" size="16" placeholder="any"; }
            label { "Templates " input name="templates" size="12" placeholder="any"; }
            button #create-token type="submit" { "Create token" }
        }
    }
}

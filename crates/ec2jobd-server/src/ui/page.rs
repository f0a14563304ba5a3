//! The dashboard's frame and small shared pieces: the layout every page uses, the sign-in form, an
//! error page, state badges and times. Pages themselves live beside their handlers.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};
use ec2jobd_spec::JobState;
use maud::{html, Markup, DOCTYPE};

use crate::error::ApiError;
use crate::service::policy::{self, Op};
use crate::service::Caller;

/// The signed-in session's CSRF token, which every form carries (checked by `session::require`).
#[derive(Debug, Clone)]
pub struct Csrf(pub String);

/// An HTML answer.
pub fn html(status: StatusCode, m: Markup) -> Response {
    (status, Html(m.into_string())).into_response()
}

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            // htmx must not add its indicator <style> element: the CSP allows no inline style.
            meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false}"#;
            title { (title) " · ec2jobd" }
            // No favicon request (it would 404 outside /ui and log a console error).
            link rel="icon" href="data:,";
            link rel="stylesheet" href="/ui/assets/style.css";
            script src="/ui/assets/htmx-2.0.11.min.js" defer {}
            script src="/ui/assets/app.js" defer {}
        }
    }
}

/// A whole page for a signed-in caller: navigation, who is signed in, sign-out, and `body`.
pub fn layout(title: &str, caller: &Caller, csrf: &Csrf, body: Markup) -> Response {
    layout_status(StatusCode::OK, title, caller, csrf, body)
}

/// [`layout`] answered with `status` (a form shown again with what is wrong).
pub fn layout_status(
    status: StatusCode,
    title: &str,
    caller: &Caller,
    csrf: &Csrf,
    body: Markup,
) -> Response {
    let admin = policy::role(caller, Op::ListTokens).is_ok();
    let m = html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body {
                header.top {
                    a.brand href="/ui/" { "ec2jobd" }
                    nav {
                        a href="/ui/" { "Overview" }
                        a href="/ui/jobs" { "Jobs" }
                        a href="/ui/templates" { "Templates" }
                        a href="/ui/sns" { "SNS deliveries" }
                        @if admin { a href="/ui/tokens" { "Tokens" } }
                    }
                    span.who { (caller.name) " (" (caller.role) ")" }
                    form method="post" action="/ui/signout" {
                        input type="hidden" name="csrf" value=(csrf.0);
                        button type="submit" { "Sign out" }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    };
    html(status, m)
}

/// The sign-in page, with a message when the last try failed.
pub fn signin(message: Option<&str>, status: StatusCode) -> Response {
    let m = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body.signin {
                main {
                    h1 { "ec2jobd" }
                    form method="post" action="/ui/signin" {
                        label for="token" { "API token" }
                        input #token type="password" name="token" autocomplete="off" required;
                        button #signin type="submit" { "Sign in" }
                    }
                    @if let Some(msg) = message { p.error role="alert" { (msg) } }
                    p.hint { "Sign in with a token made by " code { "ec2jobd token create" } " or " code { "POST /v1/tokens" } ". The dashboard acts with its role." }
                }
            }
        }
    };
    html(status, m)
}

/// An error page (`status`, one sentence) that links home.
pub fn problem(status: StatusCode, message: &str) -> Response {
    let m = html! {
        (DOCTYPE)
        html lang="en" {
            (head("Error"))
            body {
                main {
                    h1 { (status.as_u16()) " " (status.canonical_reason().unwrap_or("")) }
                    p.error role="alert" { (message) }
                    p { a href="/ui/" { "Back to the overview" } }
                }
            }
        }
    };
    html(status, m)
}

/// A refusal as a dashboard page (the status the API would answer, and its detail).
pub fn shown(e: impl Into<ApiError>) -> Response {
    let e = e.into();
    problem(e.status, &e.error.detail)
}

/// A job state as a coloured badge.
pub fn state(s: JobState) -> Markup {
    html! { span class={ "state " (s.as_str()) } { (s.as_str()) } }
}

/// A time as UTC, to the second.
pub fn time(t: &DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// An optional time, or a dash.
pub fn maybe_time(t: Option<&DateTime<Utc>>) -> String {
    t.map(time).unwrap_or_else(|| "–".into())
}

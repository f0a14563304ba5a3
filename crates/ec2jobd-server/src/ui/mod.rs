//! The dashboard at `/ui/`: server-rendered HTML (maud) with htmx, both embedded in the binary, no
//! request to any other host and no inline script (the Content-Security-Policy forbids them). Live
//! parts re-fetch their fragment: the job page when its event stream says something happened, the
//! overview and the job list every few seconds.
//!
//! Sessions and CSRF are in [`session`]; a session becomes the same [`crate::service::Caller`] a
//! token does, and every page reads and acts through the service as the API's routes do, never
//! through `/v1` itself; `/v1` never sees a cookie.

mod jobs;
mod overview;
pub(crate) mod page;
pub mod session;
mod sns;
mod templates;
mod tokens;

use axum::extract::{Path, Request};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::state::AppState;

/// What every dashboard answer is served with.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The embedded files: name, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "htmx-2.0.11.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/htmx-2.0.11.min.js"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_bytes!("assets/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_bytes!("assets/style.css"),
    ),
];

async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, ..)| *n == name) {
        Some((_, ty, bytes)) => (
            [
                (header::CONTENT_TYPE, *ty),
                (header::CACHE_CONTROL, "public, max-age=3600"),
            ],
            *bytes,
        )
            .into_response(),
        None => page::problem(StatusCode::NOT_FOUND, "No such file."),
    }
}

async fn headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// The dashboard's routes (empty when `ui.enabled` is false).
pub fn router(state: &AppState) -> Router<AppState> {
    if !state.config.ui.enabled {
        return Router::new();
    }
    let signed_in = Router::new()
        .route("/ui/", get(overview::overview))
        .route("/ui/overview", get(overview::fragment))
        .route("/ui/jobs", get(jobs::list))
        .route("/ui/jobs/{id}", get(jobs::show))
        .route("/ui/jobs/{id}/live", get(jobs::live))
        .route("/ui/jobs/{id}/stream", get(jobs::stream))
        .route("/ui/jobs/{id}/cancel", post(jobs::cancel))
        .route("/ui/jobs/{id}/rerun", post(jobs::rerun))
        .route("/ui/templates", get(templates::list))
        .route("/ui/templates/{name}", get(templates::show))
        .route("/ui/templates/{name}/run", post(templates::run))
        .route("/ui/sns", get(sns::list))
        .route("/ui/tokens", get(tokens::list).post(tokens::create))
        .route("/ui/tokens/{name}/revoke", post(tokens::revoke))
        .route("/ui/signout", post(session::signout))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            session::require,
        ));
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route(
            "/ui/signin",
            get(session::signin_form).post(session::signin),
        )
        .route("/ui/assets/{name}", get(asset))
        .merge(signed_in)
        .layer(middleware::from_fn(headers))
}

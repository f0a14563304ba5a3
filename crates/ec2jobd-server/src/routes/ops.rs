//! Unauthenticated operational routes: health, readiness, metrics and the Swagger UI (served from
//! assets vendored in the binary; nothing is fetched at build or run time). The OpenAPI document
//! itself is served by `crate::openapi`, which describes these routes.

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, Problem};
use crate::metrics::Exposition;
use crate::state::AppState;

/// Routes of this module (no authentication).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/docs", get(docs))
        .route("/docs/", get(docs))
        .route("/docs/init.js", get(docs_js))
        .route("/docs/swagger-ui-bundle.js", get(swagger_js))
        .route("/docs/swagger-ui.css", get(swagger_css))
}

/// Body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `ready`.
    pub status: String,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// How long readiness waits for the database's answer: a database that cannot be reached (a
/// partition drops packets, no reset) is "not ready", not a probe that hangs.
pub const READY_WITHIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Readiness: the database accepts a write within [`READY_WITHIN`] (2 s); 503 otherwise.
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = Health), (status = 503, body = Problem)))]
pub async fn readyz(State(state): State<AppState>) -> Result<Json<Health>, ApiError> {
    match tokio::time::timeout(READY_WITHIN, state.store.ping()).await {
        Ok(answer) => answer?,
        Err(_) => {
            tracing::warn!(within = ?READY_WITHIN, "not ready: the database did not answer");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "database_unreachable",
                format!("the database did not answer within {READY_WITHIN:?}"),
            ));
        }
    }
    Ok(Json(Health {
        status: "ready".into(),
    }))
}

/// Prometheus metrics, all named `ec2jobd_*`: OpenMetrics text when the `Accept` header asks for
/// `application/openmetrics-text` (Prometheus does), the classic text format 0.0.4 otherwise.
/// (OpenAPI ignores an `Accept` parameter, so the two content types below say it.)
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Metrics text", content(
        (String = "text/plain"),
        (String = "application/openmetrics-text"),
    ))))]
pub async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match state.store.counts().await {
        Ok(c) => state.metrics.set_counts(&c),
        Err(e) => tracing::warn!(error = %e, "could not count jobs for metrics"),
    }
    let off = crate::app::clock_offset_ms(state.clock.as_ref());
    state.metrics.set_clock_offset(off as f64 / 1000.0);
    let format = Exposition::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::VARY, "Accept"),
        ],
        state.metrics.render(format),
    )
        .into_response()
}

const DOCS_HTML: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ec2jobd API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="ui"></div><script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/init.js"></script>
</body></html>"##;

/// Starts Swagger UI. A token typed into "Authorize" lives in the page only: it is not persisted
/// (`persistAuthorization` would keep it in localStorage, readable by any script on this origin,
/// which the dashboard shares).
const DOCS_JS: &str = r##"window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#ui", persistAuthorization: false});
"##;

/// What the docs pages are served with: scripts from here only (no inline script), Swagger UI's
/// own inline styles, no framing.
const DOCS_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

async fn docs() -> Response {
    (docs_headers("text/html; charset=utf-8"), Html(DOCS_HTML)).into_response()
}

async fn docs_js() -> Response {
    (docs_headers("application/javascript"), DOCS_JS).into_response()
}

fn docs_headers(content_type: &'static str) -> [(header::HeaderName, &'static str); 5] {
    [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, DOCS_CSP),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ]
}

async fn swagger_js() -> Response {
    static JS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui-bundle.js");
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "application/javascript"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        JS,
    )
        .into_response()
}

async fn swagger_css() -> Response {
    static CSS: &[u8] = include_bytes!("../../assets/swagger-ui/swagger-ui.css");
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, "text/css"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        CSS,
    )
        .into_response()
}

//! `GET /v1/catalog`: what jobs may ask for (the guardrails themselves are `service::catalog`).

use axum::extract::State;
use axum::routing::get;
use axum::{Extension, Json, Router};

use crate::error::{ApiError, Problem};
use crate::service::catalog::Catalog;
use crate::service::Caller;
use crate::state::AppState;

/// Routes of this module (behind authentication, any role).
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/catalog", get(catalog))
}

/// What jobs may ask for: accounts, their allowlists of images, instance types and regions, and
/// the actions.
#[utoipa::path(
    get, path = "/v1/catalog", tag = "jobs",
    responses((status = 200, body = Catalog), (status = 401, body = Problem)),
    security(("bearer" = []))
)]
pub async fn catalog(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Catalog>, ApiError> {
    Ok(Json(crate::service::catalog::catalog(&state, &caller)?))
}

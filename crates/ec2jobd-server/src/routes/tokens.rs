//! `/v1/tokens`: admins create, list and revoke API tokens (`service::tokens`). A new token's
//! secret is returned once, in the creation response; only its SHA-256 is kept.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use ec2jobd_store::TokenInfo;

use super::extract::{body_error, parse_json, require_json};
use crate::error::{ApiError, Problem};
use crate::service::policy::{self, Op};
use crate::service::tokens::{self, CreatedToken, NewToken};
use crate::service::Caller;
use crate::state::AppState;

/// Routes of this module (all behind authentication, admin only).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tokens", get(list).post(create))
        .route("/v1/tokens/{name}", delete(revoke))
}

/// Create a token: never broader than the creator's role and scopes (403).
#[utoipa::path(
    post, path = "/v1/tokens", tag = "tokens", request_body = NewToken,
    responses(
        (status = 201, body = CreatedToken),
        (status = 409, description = "Name taken", body = Problem),
        (status = 422, body = Problem),
        (status = 403, body = Problem),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    policy::role(&caller, Op::CreateToken)?;
    require_json(&headers)?;
    let body = body.map_err(body_error)?;
    let made = tokens::create(&state, &caller, parse_json(&body)?).await?;
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

/// List tokens (names and roles; never secrets).
#[utoipa::path(
    get, path = "/v1/tokens", tag = "tokens", operation_id = "list_tokens",
    responses((status = 200, body = [TokenInfo]), (status = 403, body = Problem)),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    Ok(Json(tokens::list(&state, &caller).await?))
}

/// Revoke a token.
#[utoipa::path(
    delete, path = "/v1/tokens/{name}", tag = "tokens",
    params(("name" = String, Path, description = "Token name")),
    responses((status = 204, description = "Revoked"), (status = 404, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = []))
)]
pub async fn revoke(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    tokens::revoke(&state, &caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

//! `/v1/tokens`: admins create, list and revoke API tokens. A new token's secret is returned once,
//! in the creation response; only its SHA-256 is kept.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Json, Router};
use ec2jobd_spec::Role;
use ec2jobd_store::{Scopes, TokenInfo};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{new_token, Caller};
use crate::error::{ApiError, Problem};
use crate::routes::jobs::{parse_json, require_json};
use crate::state::AppState;

/// Routes of this module (all behind authentication, admin only).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/tokens", get(list).post(create))
        .route("/v1/tokens/{name}", delete(revoke))
}

/// Body of `POST /v1/tokens`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Unique name (1-64 of letters, digits, `.`, `_`, `-`).
    #[schema(pattern = "^[A-Za-z0-9._-]{1,64}$")]
    pub name: String,
    /// Role of the token.
    pub role: Role,
    /// What it may use beyond its role: accounts, actions, templates (each absent or empty: any).
    #[serde(default)]
    pub scopes: Scopes,
}

/// A created token: the only time its secret is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// Name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Creation time.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// What it may use beyond its role (absent: anything its role allows).
    #[serde(skip_serializing_if = "Scopes::is_empty")]
    pub scopes: Scopes,
    /// The secret to send as `Authorization: Bearer <token>`.
    pub token: String,
}

/// Checks scopes (also used by the CLI): every action one, every account configured
/// (`is_account`), every template a valid name. Returns what is wrong.
pub fn check_scopes(scopes: &Scopes, is_account: impl Fn(&str) -> bool) -> Result<(), String> {
    if let Some(a) = scopes
        .actions
        .iter()
        .find(|a| ec2jobd_spec::Action::parse(a).is_none())
    {
        return Err(format!("scopes.actions: `{a}` is not an action"));
    }
    if let Some(a) = scopes.accounts.iter().find(|a| !is_account(a)) {
        return Err(format!(
            "scopes.accounts: `{a}` is not a configured account"
        ));
    }
    if let Some(t) = scopes.templates.iter().find(|t| !valid_token_name(t)) {
        return Err(format!("scopes.templates: `{t}` is not a template name"));
    }
    Ok(())
}

/// Checks a token name (also used by the CLI).
pub fn valid_token_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Create a token.
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
    caller.require(Role::Admin)?;
    require_json(&headers)?;
    let body = body.map_err(|r| ApiError::new(r.status(), "bad_body", r.body_text()))?;
    let made = create_token(&state, &caller, parse_json(&body)?).await?;
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

/// Makes a token for an admin (API and dashboard): checks the name and scopes, stores only the
/// secret's hash, and returns the secret this once.
pub async fn create_token(
    state: &AppState,
    caller: &Caller,
    req: NewToken,
) -> Result<CreatedToken, ApiError> {
    caller.require(Role::Admin)?;
    if !valid_token_name(&req.name) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_name",
            "1-64 letters, digits, `.`, `_` or `-`",
        )
        .field("name"));
    }
    check_scopes(&req.scopes, |a| state.config.accounts.contains_key(a)).map_err(|m| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_scopes", m).field("scopes")
    })?;
    let (token, hash) = new_token();
    let info = state
        .store
        .create_token(&req.name, req.role, &hash, &req.scopes, &caller.0.name)
        .await?;
    tracing::info!(name = %info.name, role = %info.role, by = %caller.0.name, "token created");
    Ok(CreatedToken {
        name: info.name,
        role: info.role,
        created_at: info.created_at,
        scopes: info.scopes,
        token,
    })
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
    caller.require(Role::Admin)?;
    Ok(Json(state.store.list_tokens().await?))
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
    revoke_token(&state, &caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Revokes a token for an admin (API and dashboard); its cached entry and its dashboard sessions
/// stop working at once.
pub async fn revoke_token(state: &AppState, caller: &Caller, name: &str) -> Result<(), ApiError> {
    caller.require(Role::Admin)?;
    let revoked = state.store.revoke_token(name, &caller.0.name).await?;
    state.tokens.evict(name);
    if revoked {
        tracing::info!(%name, by = %caller.0.name, "token revoked");
        Ok(())
    } else {
        Err(ApiError::not_found(&format!("token `{name}`")))
    }
}

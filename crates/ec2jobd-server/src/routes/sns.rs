//! `POST /v1/sns/{hook}`: SNS HTTP deliveries, and `GET /v1/sns/deliveries` and `/v1/sns/hooks`:
//! what became of them and the hooks (`service::hooks`).
//!
//! The hook route carries no bearer token; it is protected by signature verification and the hook's
//! topic list (see [`crate::sns::verify`]), and a refused message causes no outbound request. What
//! becomes of a verified message is `service::hooks::handle` (the SQS intake hands its messages to
//! the same function); this route adds what only HTTP has: basic auth, the replay window and the
//! type header. A store failure or a full queue answers 5xx/429 so SNS retries.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ec2jobd_store::Delivery;
use serde::Serialize;
use utoipa::ToSchema;

use super::extract::{parse_json, require_json};
use crate::config::HookSection;
use crate::error::{ApiError, Problem};
use crate::paging::ById;
use crate::service::hooks::{self, DeliveryAnswer, HookInfo};
use crate::service::policy::{self, Op};
use crate::service::{Caller, Door};
use crate::state::AppState;

/// `POST /v1/sns/{hook}` (no bearer token).
pub fn hook_router() -> Router<AppState> {
    Router::new().route("/v1/sns/{hook}", post(deliver))
}

/// `GET /v1/sns/deliveries` and the hooks API (behind authentication).
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/sns/deliveries", get(deliveries))
        .route("/v1/sns/hooks", get(list_hooks))
        .route(
            "/v1/sns/hooks/{name}",
            get(get_hook).put(put_hook).delete(delete_hook),
        )
}

/// Every hook, from config and from the API.
#[utoipa::path(get, path = "/v1/sns/hooks", tag = "sns",
    responses((status = 200, body = [HookInfo])), security(("bearer" = [])))]
pub async fn list_hooks(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<HookInfo>>, ApiError> {
    Ok(Json(hooks::list(&state, &caller).await?))
}

/// One hook.
#[utoipa::path(get, path = "/v1/sns/hooks/{name}", tag = "sns",
    params(("name" = String, Path, description = "Hook name")),
    responses((status = 200, body = HookInfo), (status = 404, body = Problem)), security(("bearer" = [])))]
pub async fn get_hook(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<HookInfo>, ApiError> {
    Ok(Json(hooks::get(&state, &caller, &name).await?))
}

/// Create or replace an API-managed hook (admin). The body is checked like config: topic ARNs, the
/// account, the notification, and every rule rendered against a sample message (422 naming the
/// field). Hooks from config cannot be changed here (409).
#[utoipa::path(put, path = "/v1/sns/hooks/{name}", tag = "sns",
    params(("name" = String, Path, description = "Hook name")),
    request_body = HookSection,
    responses((status = 201, body = HookInfo), (status = 200, body = HookInfo), (status = 409, body = Problem),
        (status = 422, body = Problem)),
    security(("bearer" = [])))]
pub async fn put_hook(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    policy::role(&caller, Op::SaveHook)?;
    require_json(&headers)?;
    let hook: HookSection = parse_json(&body)?;
    let created = hooks::save(&state, &caller, &name, hook.clone()).await?;
    let status = super::put_status(created);
    Ok((
        status,
        Json(HookInfo {
            name,
            source: "api".into(),
            hook,
        }),
    )
        .into_response())
}

/// Delete an API-managed hook (admin).
#[utoipa::path(delete, path = "/v1/sns/hooks/{name}", tag = "sns",
    params(("name" = String, Path, description = "Hook name")),
    responses((status = 204), (status = 404, body = Problem), (status = 409, body = Problem)),
    security(("bearer" = [])))]
pub async fn delete_hook(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    hooks::delete(&state, &caller, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Receive an SNS delivery (Notification, SubscriptionConfirmation, UnsubscribeConfirmation).
#[utoipa::path(
    post, path = "/v1/sns/{hook}", tag = "sns",
    params(("hook" = String, Path, description = "Hook name (config `[sns.hooks.<name>]`)")),
    request_body(content = String, content_type = "text/plain", description = "The SNS message JSON"),
    responses(
        (status = 200, description = "Verified and handled (also duplicates and messages no rule matches)", body = DeliveryAnswer),
        (status = 403, description = "Bad signature, unknown topic, refused certificate URL, outside the replay window", body = Problem),
        (status = 404, description = "No such hook", body = Problem),
        (status = 503, description = "The store is unavailable: SNS retries", body = Problem),
    )
)]
pub async fn deliver(
    State(state): State<AppState>,
    Path(hook): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let cfg = &state.config.sns;
    let h = &hooks::find(&state, &hook)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("SNS hook `{hook}`")))?
        .1;
    if let Some(var) = &h.basic_auth_env {
        let want = std::env::var(var).unwrap_or_default();
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .unwrap_or_default();
        use subtle::ConstantTimeEq;
        if want.is_empty() || !bool::from(given.ct_eq(want.as_bytes())) {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this hook needs HTTP basic auth (credentials in the subscription URL)",
            ));
        }
    }
    let max_age = (!cfg.max_age.0.is_zero()).then_some(cfg.max_age.0);
    let m = hooks::verified(&state, &hook, h, &body, max_age).await?;
    // The type is the signed field; the header only has to agree with it.
    if let Some(t) = headers
        .get("x-amz-sns-message-type")
        .and_then(|v| v.to_str().ok())
    {
        if t != m.kind {
            let reason = format!(
                "x-amz-sns-message-type `{t}` disagrees with the signed Type `{}`",
                m.kind
            );
            let d = hooks::delivery(&hook, &m);
            return Err(hooks::refuse(&state, d, "type_header", reason).await.into());
        }
    }
    let caller = Caller::unattended(format!("sns:{hook}"), Door::Sns);
    let a = hooks::handle(&state, &caller, &hook, h, &m).await?;
    Ok(Json(a).into_response())
}

/// Body of `GET /v1/sns/deliveries`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryPage {
    /// Newest first.
    pub deliveries: Vec<Delivery>,
}

/// Recorded SNS deliveries, newest first: accepted, duplicate, rejected (with the reason), the
/// matched rule and the job.
#[utoipa::path(
    get, path = "/v1/sns/deliveries", tag = "sns",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Most rows, 1-500 (default 100)"),
        ("before" = Option<i64>, Query, description = "Only ids below this (next page)"),
    ),
    responses((status = 200, body = DeliveryPage), (status = 400, body = Problem)),
    security(("bearer" = []))
)]
pub async fn deliveries(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ById>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<DeliveryPage>, ApiError> {
    policy::role(&caller, Op::ReadDeliveries)?;
    let (before, limit) = ById::read(query)?;
    Ok(Json(DeliveryPage {
        deliveries: hooks::deliveries(&state, &caller, before, limit).await?,
    }))
}

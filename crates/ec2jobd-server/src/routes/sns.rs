//! `POST /v1/sns/{hook}`: SNS HTTP deliveries, and `GET /v1/sns/deliveries`: what became of them.
//!
//! The hook route carries no bearer token; it is protected by signature verification and the hook's
//! topic list (see [`crate::sns::verify`]), and a refused message causes no outbound request. A
//! notification is deduplicated on its `MessageId` (SNS delivers at least once), matched against the
//! hook's rules, and its job durably queued before the 200; a store failure answers 503 so SNS
//! retries. Subscription confirmations for accepted topics are confirmed through the SNS API
//! (`ConfirmSubscription`), never by fetching `SubscribeURL`. Every delivery is recorded.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use ec2jobd_spec::Role;
use ec2jobd_store::{cut_text, Delivery, Named, NewDelivery, DELIVERY_FIELD_MAX};
use serde::Serialize;
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::config::HookSection;
use crate::error::{ApiError, Problem};
use crate::paging::ById;
use crate::routes::jobs::{queue, resolve_spec};
use crate::sns::rules::{parse_event, RuleJob};
use crate::sns::verify::SnsMessage;
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

/// A hook from config (which the API cannot change) or from the API.
pub(crate) async fn find_hook(
    state: &AppState,
    name: &str,
) -> Result<Option<(&'static str, HookSection)>, ApiError> {
    if let Some(h) = state.config.sns.hooks.get(name) {
        return Ok(Some(("config", h.clone())));
    }
    match state.store.get_named(Named::SnsHook, name).await? {
        None => Ok(None),
        Some(body) => serde_json::from_value(body)
            .map(|h| Some(("api", h)))
            .map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "corrupt_hook",
                    e.to_string(),
                )
            }),
    }
}

/// A hook as listed by the API.
#[derive(Debug, Serialize, ToSchema)]
pub struct HookInfo {
    /// Name: deliveries go to `POST /v1/sns/{name}`.
    pub name: String,
    /// `config` (read-only here) or `api`.
    pub source: String,
    /// The hook.
    pub hook: HookSection,
}

/// Every hook, from config and from the API.
#[utoipa::path(get, path = "/v1/sns/hooks", tag = "sns",
    responses((status = 200, body = [HookInfo])), security(("bearer" = [])))]
pub async fn list_hooks(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<HookInfo>>, ApiError> {
    caller.require(Role::Viewer)?;
    let mut out: Vec<HookInfo> = state
        .config
        .sns
        .hooks
        .iter()
        .map(|(n, h)| HookInfo {
            name: n.clone(),
            source: "config".into(),
            hook: h.clone(),
        })
        .collect();
    for (name, body) in state.store.list_named(Named::SnsHook).await? {
        if let Ok(hook) = serde_json::from_value(body) {
            out.push(HookInfo {
                name,
                source: "api".into(),
                hook,
            });
        }
    }
    Ok(Json(out))
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
    caller.require(Role::Viewer)?;
    let (source, hook) = find_hook(&state, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(&format!("SNS hook `{name}`")))?;
    Ok(Json(HookInfo {
        name,
        source: source.into(),
        hook,
    }))
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
    caller.require(Role::Admin)?;
    crate::routes::jobs::require_json(&headers)?;
    if state.config.sns.hooks.contains_key(&name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "hook_in_config",
            format!("hook `{name}` is defined in the config file; change it there"),
        ));
    }
    let hook: HookSection = crate::routes::jobs::parse_json(&body)?;
    hook.check(&name, &state.config).map_err(|(field, msg)| {
        let e = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_hook", msg);
        if field.is_empty() {
            e.field("name")
        } else {
            e.field(field)
        }
    })?;
    let value = serde_json::to_value(&hook).unwrap_or_default();
    let created = state
        .store
        .put_named(Named::SnsHook, &name, value, &caller.0.name)
        .await?;
    let status = crate::routes::put_status(created);
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
    caller.require(Role::Admin)?;
    if state.config.sns.hooks.contains_key(&name) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "hook_in_config",
            format!("hook `{name}` is defined in the config file; remove it there"),
        ));
    }
    if state
        .store
        .delete_named(Named::SnsHook, &name, &caller.0.name)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(&format!("SNS hook `{name}`")))
    }
}

/// What the hook answers SNS.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryAnswer {
    /// `accepted`, `duplicate`, `no_rule`, `failed`, `confirmed`, `unsubscribed`.
    pub outcome: String,
    /// The job queued (or the earlier one, for a duplicate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
}

async fn record(state: &AppState, d: NewDelivery) -> Result<(), ApiError> {
    state.store.record_delivery(d).await?;
    Ok(())
}

fn base(hook: &str, m: &SnsMessage) -> NewDelivery {
    NewDelivery {
        hook: hook.to_string(),
        message_id: Some(m.message_id.clone()),
        topic_arn: Some(m.topic_arn.clone()),
        kind: Some(m.kind.clone()),
        ..Default::default()
    }
}

fn answer(outcome: &str, job_id: Option<String>) -> DeliveryAnswer {
    DeliveryAnswer {
        outcome: outcome.into(),
        job_id,
    }
}

/// Records a refusal (cut and folded by the store, counted in metrics, logged with its text
/// escaped so a caller's newlines cannot forge log lines) and answers 403. A failure to record it
/// answers as the store's error.
async fn refuse(state: &AppState, d: NewDelivery, code: &'static str, reason: String) -> ApiError {
    let reason = cut_text(&reason, DELIVERY_FIELD_MAX);
    tracing::warn!(hook = ?d.hook, code, reason = ?reason, "SNS delivery refused");
    state.metrics.sns_refused(code);
    let d = NewDelivery {
        outcome: "rejected".into(),
        reason: Some(reason.clone()),
        code: Some(code.into()),
        ..d
    };
    match record(state, d).await {
        Ok(()) => ApiError::new(StatusCode::FORBIDDEN, "sns_rejected", reason),
        Err(e) => e,
    }
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
    let h = &find_hook(&state, &hook)
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
    let m = verified(&state, &hook, h, &body, max_age).await?;
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
            return Err(refuse(&state, base(&hook, &m), "type_header", reason).await);
        }
    }
    let a = handle(&state, &hook, h, &m, &format!("sns:{hook}")).await?;
    Ok(Json(a).into_response())
}

/// `body` verified as an SNS message from one of the hook's topics (signature, certificate,
/// `max_age`), or refused: recorded, and answered 403.
pub(crate) async fn verified(
    state: &AppState,
    hook: &str,
    h: &HookSection,
    body: &[u8],
    max_age: Option<std::time::Duration>,
) -> Result<SnsMessage, ApiError> {
    match state
        .sns_certs
        .verify(body, &h.topics, max_age, chrono::Utc::now())
        .await
    {
        Ok(m) => Ok(m),
        Err(r) => {
            let raw: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let s = |k: &str| raw.get(k).and_then(|v| v.as_str()).map(String::from);
            Err(refuse(
                state,
                NewDelivery {
                    hook: hook.to_string(),
                    message_id: s("MessageId"),
                    topic_arn: s("TopicArn"),
                    kind: s("Type"),
                    ..Default::default()
                },
                r.code(),
                r.to_string(),
            )
            .await)
        }
    }
}

/// A verified message handled by its type: a subscription confirmed through the API, an
/// unsubscription recorded, a notification matched against the hook's rules and its job durably
/// queued (key `sns:<hook>:<MessageId>`, so the webhook and an SQS intake of the same hook queue
/// one job per message) by `created_by`. Every outcome is recorded before it is returned; an error
/// means the message should come again (store or queue unavailable, confirmation failed).
pub(crate) async fn handle(
    state: &AppState,
    hook: &str,
    h: &HookSection,
    m: &SnsMessage,
    created_by: &str,
) -> Result<DeliveryAnswer, ApiError> {
    match m.kind.as_str() {
        "SubscriptionConfirmation" => {
            let account = h.account_or(&state.config.default_account);
            let region = crate::sns::topic_region(&m.topic_arn).unwrap_or("us-east-1");
            let sns = state.pool.sns(&account, region).await.map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "sns_confirm_failed",
                    e.to_string(),
                )
            })?;
            let r = sns
                .confirm_subscription()
                .topic_arn(&m.topic_arn)
                .token(m.token.clone().unwrap_or_default())
                .send()
                .await;
            match r {
                Ok(out) => {
                    record(
                        state,
                        NewDelivery {
                            outcome: "confirmed".into(),
                            reason: out.subscription_arn().map(|a| format!("subscription {a}")),
                            ..base(hook, m)
                        },
                    )
                    .await?;
                    Ok(answer("confirmed", None))
                }
                Err(e) => {
                    let msg = crate::sns::aws_error(&e);
                    record(
                        state,
                        NewDelivery {
                            outcome: "failed".into(),
                            reason: Some(format!("ConfirmSubscription: {msg}")),
                            ..base(hook, m)
                        },
                    )
                    .await?;
                    // 5xx: SNS sends the confirmation again.
                    Err(ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "sns_confirm_failed",
                        format!("ConfirmSubscription failed: {msg}"),
                    ))
                }
            }
        }
        "UnsubscribeConfirmation" => {
            record(
                state,
                NewDelivery {
                    outcome: "unsubscribed".into(),
                    ..base(hook, m)
                },
            )
            .await?;
            Ok(answer("unsubscribed", None))
        }
        _ => notification(state, hook, h, m, created_by).await,
    }
}

async fn notification(
    state: &AppState,
    hook: &str,
    h: &HookSection,
    m: &SnsMessage,
    created_by: &str,
) -> Result<DeliveryAnswer, ApiError> {
    if let Some(first) = state.store.delivered(hook, &m.message_id).await? {
        record(
            state,
            NewDelivery {
                outcome: "duplicate".into(),
                job_id: first.job_id.clone(),
                rule: first.rule.clone(),
                ..base(hook, m)
            },
        )
        .await?;
        return Ok(answer("duplicate", first.job_id));
    }
    let event = parse_event(&m.message, &m.topic_arn);
    let Some((rule, event)) =
        event.and_then(|e| h.rules.iter().find(|r| r.matches(&e)).map(|r| (r, e)))
    else {
        record(
            state,
            NewDelivery {
                outcome: "no_rule".into(),
                reason: Some("no rule matches this message".into()),
                ..base(hook, m)
            },
        )
        .await?;
        return Ok(answer("no_rule", None));
    };
    let explain = |e: ApiError| match e.field {
        Some(f) => format!("{f}: {}", e.detail),
        None => e.detail,
    };
    let spec = match rule.render(&event) {
        Err(e) => Err(e),
        Ok(RuleJob::Spec(spec)) => resolve_spec(state, *spec).map_err(explain),
        Ok(RuleJob::Template(name, params)) => {
            crate::routes::templates::spec_from(state, &name, &params)
                .await
                .map_err(explain)
        }
    }
    .map(|mut spec| {
        if spec.notify.is_none() {
            spec.notify = h.notify.clone();
        }
        // An alarm's job goes ahead of queued bulk work unless its rule or template says otherwise.
        spec.priority.get_or_insert(state.config.sns.priority);
        spec
    });
    let spec = match spec {
        Ok(s) => s,
        Err(e) => {
            // Matched, but no job can be made from this message: retrying would not help.
            record(
                state,
                NewDelivery {
                    outcome: "failed".into(),
                    rule: Some(rule.name.clone()),
                    reason: Some(e),
                    ..base(hook, m)
                },
            )
            .await?;
            return Ok(answer("failed", None));
        }
    };
    // 429 when the queue is full: SNS delivers again later.
    crate::routes::jobs::admit(state).await?;
    let key = format!("sns:{hook}:{}", m.message_id);
    let (created, job) = queue(state, created_by.to_string(), spec, Some(key)).await?;
    let outcome = if created { "accepted" } else { "duplicate" };
    record(
        state,
        NewDelivery {
            outcome: outcome.into(),
            rule: Some(rule.name.clone()),
            job_id: Some(job.id.clone()),
            ..base(hook, m)
        },
    )
    .await?;
    Ok(answer(outcome, Some(job.id)))
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
    caller.require(Role::Viewer)?;
    let (before, limit) = ById::read(query)?;
    Ok(Json(DeliveryPage {
        deliveries: state.store.list_deliveries(before, limit).await?,
    }))
}

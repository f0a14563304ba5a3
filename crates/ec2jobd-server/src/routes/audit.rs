//! `GET /v1/audit` (admin): who changed what the API manages — templates, SNS hooks, tokens —
//! newest first, as the store recorded it with each change. Who submitted or cancelled a job is on
//! the job (`created_by`) and its events (`by`).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Extension, Json, Router};
use ec2jobd_store::AuditEntry;
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::{ApiError, Problem};
use crate::paging::ById;
use crate::service::Caller;
use crate::state::AppState;

/// Routes of this module (behind authentication, admin only).
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/audit", get(list))
}

/// Body of `GET /v1/audit`.
#[derive(Debug, Serialize, ToSchema)]
pub struct AuditPage {
    /// Newest first.
    pub entries: Vec<AuditEntry>,
}

/// The audit log: templates, SNS hooks and tokens created, replaced, deleted or revoked, and by
/// whom.
#[utoipa::path(
    get, path = "/v1/audit", tag = "tokens",
    params(
        ("limit" = Option<u32>, Query, minimum = 1, maximum = 500, description = "Most rows, 1-500 (default 100)"),
        ("before" = Option<i64>, Query, description = "Only ids below this (next page)"),
    ),
    responses((status = 200, body = AuditPage), (status = 400, body = Problem), (status = 403, body = Problem)),
    security(("bearer" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<ById>, QueryRejection>,
) -> Result<Json<AuditPage>, ApiError> {
    crate::service::policy::role(&caller, crate::service::policy::Op::ReadAudit)?;
    let (before, limit) = ById::read(query)?;
    Ok(Json(AuditPage {
        entries: crate::service::audit::list(&state, &caller, before, limit).await?,
    }))
}

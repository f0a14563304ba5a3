//! One error type for the HTTP layer, rendered as an RFC 9457 problem document
//! (`application/problem+json`) with a stable `code`, a `detail` for people and the offending `field`.
//! Internal causes (database messages, AWS internals) are logged with the request id and never sent.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ec2jobd_spec::SpecError;
use ec2jobd_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Problem {
    /// URI naming the problem kind (`urn:ec2jobd:problem:<code>`).
    #[serde(rename = "type")]
    pub kind: String,
    /// Short summary (the HTTP reason phrase).
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// Stable machine code, e.g. `invalid_instance_id`, `unauthorized`.
    pub code: String,
    /// What is wrong and how to fix it.
    pub detail: String,
    /// The offending field (JSON path like `targets.instance_ids[1]`, a query parameter or a header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// An error an API handler returns.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Status code.
    pub status: StatusCode,
    /// Stable code.
    pub code: String,
    /// Sentence for people.
    pub detail: String,
    /// Offending field.
    pub field: Option<String>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with the given status, code and detail.
    pub fn new(status: StatusCode, code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status,
            code: code.into(),
            detail: detail.into(),
            field: None,
            retry_after: None,
        }
    }

    /// Names the offending field.
    pub fn field(mut self, f: impl Into<String>) -> Self {
        self.field = Some(f.into());
        self
    }

    /// 400 for a bad query parameter or header.
    pub fn bad_request(code: &str, field: &str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, detail).field(field)
    }

    /// 404 for a missing job or token.
    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", format!("no {what}"))
    }

    /// 500 for a bug; the cause is logged, not returned.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the daemon's log for this request id",
        )
    }
}

/// `field: detail` (or the detail alone): what logs and `anyhow` chains show of a refusal met
/// outside a request (a schedule's firing).
impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

impl std::error::Error for ApiError {}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e.code, e.message).field(e.field)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::IdempotencyConflict { job_id } => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_conflict",
                format!("this Idempotency-Key was used for job {job_id} with a different body"),
            )
            .field("Idempotency-Key"),
            StoreError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m),
            StoreError::LeaseLost => ApiError::new(
                StatusCode::CONFLICT,
                "lease_lost",
                "the job changed hands; try again",
            ),
            StoreError::Unavailable(cause) => {
                tracing::error!(error = %cause, "store unavailable");
                let mut e = ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the job store cannot take writes right now; nothing was stored, retry later",
                );
                e.retry_after = Some(1);
                e
            }
            StoreError::Corrupt(cause) => ApiError::internal(cause),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Problem {
            kind: format!("urn:ec2jobd:problem:{}", self.code),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            code: self.code,
            detail: self.detail,
            field: self.field,
        };
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut res = (self.status, json).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

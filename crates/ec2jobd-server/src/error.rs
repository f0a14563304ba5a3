//! One error type for the HTTP layer, rendered as an RFC 9457 problem document
//! (`application/problem+json`) with a stable `code`, a `detail` for people and the offending `field`.
//! A service's refusal ([`ServiceError`]) becomes one by its kind; internal causes (database
//! messages, AWS internals) are logged with the request id and never sent. [`causes`] puts any
//! error's chain on one line for people (the CLI, `doctor`, logs).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ec2jobd_spec::SpecError;
use ec2jobd_store::StoreError;
use serde::Serialize;
use utoipa::ToSchema;

use crate::service::{Kind, ServiceError};

/// An error with its causes, on one line (reqwest's own text says only "error sending request":
/// the cause says connection refused, or which certificate was not trusted; the AWS SDK's
/// credentials error lists every provider it tried on lines of its own). A cause already said is
/// not repeated; never a `Debug` dump.
pub fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        let c_text = c.to_string();
        if !out.contains(&c_text) {
            out.push_str(": ");
            out.push_str(&c_text);
        }
        next = c.source();
    }
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

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

/// An error an API handler returns: a refusal ([`ServiceError`]: code, detail, field, retry
/// time) and the HTTP status it is answered with.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// Status code.
    pub status: StatusCode,
    /// What is refused, and why.
    pub error: ServiceError,
}

/// The kind of refusal an HTTP status stands for (the HTTP layer's own refusals: a malformed
/// body, a wrong method).
fn kind_of(status: StatusCode) -> Kind {
    match status {
        StatusCode::UNAUTHORIZED => Kind::Unauthorized,
        StatusCode::FORBIDDEN => Kind::Forbidden,
        StatusCode::NOT_FOUND => Kind::NotFound,
        StatusCode::CONFLICT => Kind::Conflict,
        StatusCode::PAYLOAD_TOO_LARGE => Kind::TooLarge,
        StatusCode::UNSUPPORTED_MEDIA_TYPE => Kind::UnsupportedMedia,
        StatusCode::UNPROCESSABLE_ENTITY => Kind::Unprocessable,
        StatusCode::TOO_MANY_REQUESTS => Kind::TooMany,
        StatusCode::SERVICE_UNAVAILABLE => Kind::Unavailable,
        s if s.is_server_error() => Kind::Internal,
        _ => Kind::BadRequest,
    }
}

/// The status a kind of refusal is answered with.
fn status_of(kind: Kind) -> StatusCode {
    match kind {
        Kind::BadRequest => StatusCode::BAD_REQUEST,
        Kind::Unauthorized => StatusCode::UNAUTHORIZED,
        Kind::Forbidden => StatusCode::FORBIDDEN,
        Kind::NotFound => StatusCode::NOT_FOUND,
        Kind::Conflict => StatusCode::CONFLICT,
        Kind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        Kind::UnsupportedMedia => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Kind::Unprocessable => StatusCode::UNPROCESSABLE_ENTITY,
        Kind::TooMany => StatusCode::TOO_MANY_REQUESTS,
        Kind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Kind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl ApiError {
    /// An error with the given status, code and detail.
    pub fn new(status: StatusCode, code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            status,
            error: ServiceError::new(kind_of(status), code, detail),
        }
    }

    /// Names the offending field.
    pub fn field(mut self, f: impl Into<String>) -> Self {
        self.error.field = Some(f.into());
        self
    }

    /// 400 for a bad query parameter or header.
    pub fn bad_request(code: &str, field: &str, detail: impl Into<String>) -> Self {
        ServiceError::bad_request(code, field, detail).into()
    }

    /// 404 for a missing job or token.
    pub fn not_found(what: &str) -> Self {
        ServiceError::not_found(what).into()
    }
}

/// As the refusal shows itself (`field: detail`).
impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for ApiError {}

impl From<ServiceError> for ApiError {
    fn from(error: ServiceError) -> Self {
        ApiError {
            status: status_of(error.kind),
            error,
        }
    }
}

impl From<SpecError> for ApiError {
    fn from(e: SpecError) -> Self {
        ServiceError::from(e).into()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ServiceError::from(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let e = self.error;
        let body = Problem {
            kind: format!("urn:ec2jobd:problem:{}", e.code),
            title: self
                .status
                .canonical_reason()
                .unwrap_or("Error")
                .to_string(),
            status: self.status.as_u16(),
            code: e.code,
            detail: e.detail,
            field: e.field,
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
        if let Some(s) = e.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

//! What a service function answers when it will not or cannot do what was asked: a kind (which
//! every door renders its own way: a problem+json status, an error page, a log line and a
//! metric), a stable code, a sentence for people and the offending field. Internal causes
//! (database messages) are logged here and never carried out. Must not: know HTTP.

use ec2jobd_spec::SpecError;
use ec2jobd_store::StoreError;

/// The kinds of refusal, each of which a door answers in one way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The request is malformed (a header, a query parameter, JSON that does not parse).
    BadRequest,
    /// Nobody is signed in.
    Unauthorized,
    /// The caller's role or scopes do not allow it.
    Forbidden,
    /// No such thing.
    NotFound,
    /// It conflicts with what is stored (a name taken, a key used with another body, a job over).
    Conflict,
    /// The body is larger than allowed.
    TooLarge,
    /// The body is not of a type taken.
    UnsupportedMedia,
    /// A field is invalid.
    Unprocessable,
    /// A limit holds (the queue is full, too many streams): try later.
    TooMany,
    /// The store cannot be used right now: nothing was stored, try later.
    Unavailable,
    /// A bug or a corrupt row.
    Internal,
}

/// A refusal; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceError {
    /// How doors answer it.
    pub kind: Kind,
    /// Stable machine code (`out_of_scope`, `queue_full`, …).
    pub code: String,
    /// What is wrong and how to fix it.
    pub detail: String,
    /// The offending field (a JSON path, a query parameter or a header).
    pub field: Option<String>,
    /// Seconds after which trying again may work.
    pub retry_after: Option<u64>,
}

impl ServiceError {
    /// A refusal of `kind`.
    pub fn new(kind: Kind, code: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind,
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

    /// Says when to try again.
    pub fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    /// The offending field, under `prefix` (a schedule's `job.`, a template's `spec.`).
    pub fn under(mut self, prefix: &str) -> Self {
        self.field = Some(format!("{prefix}{}", self.field.unwrap_or_default()));
        self
    }

    /// A malformed header or query parameter.
    pub fn bad_request(code: &str, field: &str, detail: impl Into<String>) -> Self {
        Self::new(Kind::BadRequest, code, detail).field(field)
    }

    /// An invalid field.
    pub fn unprocessable(code: &str, field: impl Into<String>, detail: impl Into<String>) -> Self {
        Self::new(Kind::Unprocessable, code, detail).field(field)
    }

    /// `no <what>`.
    pub fn not_found(what: &str) -> Self {
        Self::new(Kind::NotFound, "not_found", format!("no {what}"))
    }

    /// Refused by the caller's role or scopes.
    pub fn forbidden(code: &str, detail: impl Into<String>) -> Self {
        Self::new(Kind::Forbidden, code, detail)
    }

    /// A bug; the cause is logged, not carried.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            Kind::Internal,
            "internal",
            "internal error; see the daemon's log for this request id",
        )
    }
}

/// `field: detail` (or the detail alone): what logs show of a refusal met outside a request.
impl std::fmt::Display for ServiceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{field}: {}", self.detail),
            None => f.write_str(&self.detail),
        }
    }
}

impl std::error::Error for ServiceError {}

impl From<SpecError> for ServiceError {
    fn from(e: SpecError) -> Self {
        ServiceError::unprocessable(e.code, e.field, e.message)
    }
}

impl From<StoreError> for ServiceError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::IdempotencyConflict { job_id } => ServiceError::new(
                Kind::Conflict,
                "idempotency_conflict",
                format!("this Idempotency-Key was used for job {job_id} with a different body"),
            )
            .field("Idempotency-Key"),
            StoreError::Conflict(m) => ServiceError::new(Kind::Conflict, "conflict", m),
            StoreError::LeaseLost => ServiceError::new(
                Kind::Conflict,
                "lease_lost",
                "the job changed hands; try again",
            ),
            StoreError::Unavailable(cause) => {
                tracing::error!(error = %cause, "store unavailable");
                ServiceError::new(
                    Kind::Unavailable,
                    "store_unavailable",
                    "the job store cannot take writes right now; nothing was stored, retry later",
                )
                .retry_after(1)
            }
            StoreError::Corrupt(cause) => ServiceError::internal(cause),
        }
    }
}

/// What service functions return.
pub type Result<T, E = ServiceError> = std::result::Result<T, E>;

//! The service layer: the one way into the queue and the stored documents for every door. Each
//! use case is one function taking the [`Caller`] and answering a domain result or a
//! [`ServiceError`]; the routes (`crate::routes`), the dashboard (`crate::ui`), the schedule
//! ticker and windows (`crate::schedules::ticker`) and the SNS and SQS intakes (the webhook route
//! and `crate::sns::sqs`) only extract, call and answer. Every rule holds here, so it holds on every
//! door: who may do what (`policy`, one table), what callers see (`redact`), admission and the
//! idempotency keys the daemon keeps for itself (`jobs`).
//!
//! Must not: know HTTP or HTML (no axum types; a door renders [`ServiceError`] its own way), or be
//! bypassed: nothing outside this module queues a job or writes a stored document.

pub mod audit;
pub mod caller;
pub mod catalog;
pub mod error;
pub mod hooks;
pub mod jobs;
pub mod policy;
pub mod redact;
pub mod schedules;
pub mod templates;
pub mod tokens;

pub use caller::{Caller, Door};
pub use error::{Kind, ServiceError};

/// A stored document's name (templates, schedules): 1-64 letters, digits, `-` or `_`.
pub fn check_name(name: &str) -> error::Result<()> {
    if crate::config::is_hook_name(name) {
        return Ok(());
    }
    Err(ServiceError::unprocessable(
        "invalid_name",
        "name",
        "1-64 letters, digits, `-` or `_`",
    ))
}

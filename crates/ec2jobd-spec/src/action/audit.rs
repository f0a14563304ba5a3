//! `audit_tags` params: the tag keys every instance must carry, and what a gap does to the job.

use serde::Serialize;

use super::{invalid, Params};
use crate::spec::SpecError;

/// What an `audit_tags` job does when instances lack required keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OnMissing {
    /// The job fails, listing them (the default).
    Fail,
    /// The job succeeds, listing them.
    Warn,
}

/// `audit_tags`: `required_keys`, `on_missing`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditParams {
    /// Keys every instance in scope must carry.
    pub required_keys: Vec<String>,
    /// `fail` (default) or `warn`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_missing: Option<OnMissing>,
}

impl AuditParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        let required_keys = p.str_list("required_keys")?;
        let on_missing = match p.str("on_missing")?.as_deref() {
            None => None,
            Some("fail") => Some(OnMissing::Fail),
            Some("warn") => Some(OnMissing::Warn),
            Some(_) => return Err(invalid("on_missing", "must be one of fail, warn")),
        };
        Ok(AuditParams {
            required_keys: p.required("required_keys", required_keys)?,
            on_missing,
        })
    }

    /// `on_missing`, `fail` when absent.
    pub fn on_missing(&self) -> OnMissing {
        self.on_missing.unwrap_or(OnMissing::Fail)
    }
}

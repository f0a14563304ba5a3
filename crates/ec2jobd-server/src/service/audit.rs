//! The audit log: who changed what the API manages (templates, SNS hooks, schedules, overrides,
//! tokens), newest first. Must not: write it (the store records each change with the change).

use ec2jobd_store::AuditEntry;

use super::caller::Caller;
use super::error::Result;
use super::policy::{authorize, On, Op};
use crate::state::AppState;

/// Entries with id below `before`, newest first.
pub async fn list(
    st: &AppState,
    caller: &Caller,
    before: Option<i64>,
    limit: u32,
) -> Result<Vec<AuditEntry>> {
    authorize(caller, Op::ReadAudit, On::Nothing)?;
    Ok(st.store.audit_log(before, limit).await?)
}

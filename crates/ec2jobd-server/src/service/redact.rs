//! The one redaction rule: who may see the secret fields (`ec2jobd_spec::SECRET_PARAMS`, today
//! `user_data`) of stored documents. A job's secrets are shown to nobody (every read of a job
//! goes through `Job::redacted`); a template's, schedule's or hook's only to callers the policy
//! lets see them (admins, who edit them), everyone else gets the same redacted view through every
//! door. Must not: decide anything else.

use super::caller::Caller;
use super::policy::{role, Op};

/// Whether `caller` sees the secret fields of stored documents.
pub fn may_see_secrets(caller: &Caller) -> bool {
    role(caller, Op::SeeSecrets).is_ok()
}

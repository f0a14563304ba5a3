//! A `jobs` row (and an SNS delivery's, and a token's) as both backends read it: the same columns (migrations/sqlite and
//! migrations/postgres), decoded by one derive for SQLite's and PostgreSQL's rows alike, and turned
//! into the API's [`Job`] and the runner's [`Claimed`] in one place.
//! Must not: hold SQL beyond the column list, or know either backend's dialect.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use ec2jobd_spec::{Job, JobSpec, JobState};

use ec2jobd_spec::Role;

use crate::{AuditEntry, Claimed, Delivery, Result, StoreError, TokenInfo};
use ec2jobd_spec::JobEvent;

/// The columns [`JobRow`] and [`ClaimedRow`] read (with `wait_outcome` for a claim).
pub(crate) const JOB_COLS: &str = "id, state, action, spec, created_at, started_at, finished_at, \
    attempts, max_attempts, run_after, cancel_requested, error, results, progress, timeout_ms, \
    checkpoint, created_by, idempotency_key";

/// A stored time (ms since the epoch) as a time.
pub(crate) fn ts(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or_default()
}

/// Stored JSON read back; a row that does not read is corrupt, not unavailable.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// The columns of a job the API shows.
#[derive(sqlx::FromRow)]
pub(crate) struct JobRow {
    id: String,
    state: String,
    spec: String,
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    attempts: i32,
    max_attempts: i32,
    run_after: i64,
    cancel_requested: bool,
    error: Option<String>,
    results: String,
    progress: String,
    created_by: Option<String>,
    idempotency_key: Option<String>,
}

impl JobRow {
    pub(crate) fn into_job(self) -> Result<Job> {
        let state = JobState::from_str(&self.state).map_err(StoreError::Corrupt)?;
        let spec: JobSpec = decode("spec", &self.spec)?;
        Ok(Job {
            id: self.id,
            state,
            action: spec.action,
            created_at: ts(self.created_at),
            schedule: ec2jobd_spec::schedule::schedule_of(self.created_by.as_deref()),
            fired_at: ec2jobd_spec::schedule::fired_at(
                self.created_by.as_deref(),
                self.idempotency_key.as_deref(),
            ),
            created_by: self.created_by,
            started_at: self.started_at.map(ts),
            finished_at: self.finished_at.map(ts),
            attempts: self.attempts as u32,
            max_attempts: self.max_attempts as u32,
            next_attempt_at: (state == JobState::Queued && self.attempts > 0)
                .then(|| ts(self.run_after)),
            cancel_requested: self.cancel_requested,
            error: self.error.map(|e| decode("error", &e)).transpose()?,
            results: decode("results", &self.results)?,
            progress: decode("progress", &self.progress)?,
            spec,
        })
    }
}

/// A job as a claim hands it to the runner.
#[derive(sqlx::FromRow)]
pub(crate) struct ClaimedRow {
    #[sqlx(flatten)]
    job: JobRow,
    timeout_ms: i64,
    checkpoint: Option<String>,
    wait_outcome: Option<String>,
}

impl ClaimedRow {
    pub(crate) fn into_claimed(self) -> Result<Claimed> {
        Ok(Claimed {
            job: self.job.into_job()?,
            timeout_ms: self.timeout_ms,
            checkpoint: self
                .checkpoint
                .map(|c| decode("checkpoint", &c))
                .transpose()?,
            waited: self
                .wait_outcome
                .map(|w| decode("wait_outcome", &w))
                .transpose()?,
        })
    }
}

/// An `sns_deliveries` row (`SELECT *` / `RETURNING *`).
#[derive(sqlx::FromRow)]
pub(crate) struct DeliveryRow {
    id: i64,
    at: i64,
    hook: String,
    message_id: Option<String>,
    topic_arn: Option<String>,
    kind: Option<String>,
    outcome: String,
    reason: Option<String>,
    rule: Option<String>,
    job_id: Option<String>,
    code: Option<String>,
    count: i32,
    last_at: Option<i64>,
}

impl From<DeliveryRow> for Delivery {
    fn from(r: DeliveryRow) -> Self {
        Delivery {
            id: r.id,
            at: ts(r.at),
            hook: r.hook,
            message_id: r.message_id,
            topic_arn: r.topic_arn,
            kind: r.kind,
            outcome: r.outcome,
            reason: r.reason,
            rule: r.rule,
            job_id: r.job_id,
            code: r.code,
            count: i64::from(r.count),
            last_at: r.last_at.map(ts),
        }
    }
}

/// The columns [`TokenRow`] reads (not the hash).
pub(crate) const TOKEN_COLS: &str = "name, role, created_at, scopes";

/// An `api_tokens` row without its hash ([`TOKEN_COLS`]).
#[derive(sqlx::FromRow)]
pub(crate) struct TokenRow {
    name: String,
    role: String,
    created_at: i64,
    scopes: Option<String>,
}

impl TokenRow {
    pub(crate) fn into_info(self) -> Result<TokenInfo> {
        Ok(TokenInfo {
            name: self.name,
            role: Role::from_str(&self.role).map_err(StoreError::Corrupt)?,
            created_at: ts(self.created_at),
            scopes: self
                .scopes
                .map(|s| decode("token scopes", &s))
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

/// The columns [`EventRow`] reads.
pub(crate) const EVENT_COLS: &str = "seq, job_id, at, kind, message, data, actor";

/// A `job_events` row ([`EVENT_COLS`]).
#[derive(sqlx::FromRow)]
pub(crate) struct EventRow {
    seq: i64,
    job_id: String,
    at: i64,
    kind: String,
    message: String,
    data: String,
    actor: Option<String>,
}

impl EventRow {
    pub(crate) fn into_event(self) -> Result<JobEvent> {
        Ok(JobEvent {
            seq: self.seq,
            job_id: self.job_id,
            at: ts(self.at),
            kind: self.kind,
            message: self.message,
            data: decode("event data", &self.data)?,
            by: self.actor,
        })
    }
}

/// An `audit_log` row (`SELECT *`).
#[derive(sqlx::FromRow)]
pub(crate) struct AuditRow {
    id: i64,
    at: i64,
    actor: String,
    what: String,
    name: String,
    change: String,
}

impl From<AuditRow> for AuditEntry {
    fn from(r: AuditRow) -> Self {
        AuditEntry {
            id: r.id,
            at: ts(r.at),
            by: r.actor,
            what: r.what,
            name: r.name,
            change: r.change,
        }
    }
}

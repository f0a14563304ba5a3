//! The durable job queue.
//!
//! [`Store`] is the whole contract, split by concern: the job [`Queue`] (enqueue with idempotency
//! keys, claim with a lease, heartbeat, fenced completion, retries with a not-before time, lease
//! expiry, cancel, the event log, executor checkpoints, parked waits, the outbox), named
//! [`Documents`], [`Tokens`] and dashboard sessions, the [`AuditLog`], SNS [`Deliveries`] and
//! [`Leadership`] leases. [`SqliteStore`] implements it for the
//! embedded default, [`PgStore`] for replicas that share one queue ([`postgres`]). Both write the
//! same rows and events (`shared`, `row`), and one test suite (`suite`) runs against both.
//!
//! This room knows SQL and the spec types; it must not know HTTP or AWS. Backoff is decided by the
//! caller (the runner) and passed in as a time, so the store stays free of policy.

pub mod postgres;
mod row;
mod shared;
mod sqlite;
#[cfg(test)]
mod suite;

use std::sync::Arc;

use async_trait::async_trait;
use ec2jobd_spec::{Job, JobError, JobEvent, JobResults, JobSpec, JobState, Progress, Role};
use serde::Serialize;
use tokio::sync::{broadcast, Notify};

pub use postgres::{PgOptions, PgStore};
pub use shared::SEARCH_SCAN;
pub use sqlite::{
    backup, check_backup, database_file, restore, Backup, Checked, Restored, SqliteOptions,
    SqliteStore, Synchronous,
};

/// What `ec2jobd doctor` learns about a database without changing it.
#[derive(Debug)]
pub struct DbCheck {
    /// Migrations applied.
    pub applied: usize,
    /// Migrations this build knows.
    pub known: usize,
    /// Whether a write would be possible, or why not.
    pub writable: std::result::Result<(), String>,
}

/// Looks at the database `url` names (either backend), changing nothing.
pub async fn check(url: &str) -> Result<DbCheck> {
    if postgres::is_postgres_url(url) {
        postgres::check(url).await
    } else {
        sqlite::check(url).await
    }
}

/// Everything that can go wrong in the store, in terms the API can map to a status code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The idempotency key is already bound to a job with another request body.
    #[error("idempotency key already used for job {job_id} with a different request")]
    IdempotencyConflict {
        /// The job the key belongs to.
        job_id: String,
    },
    /// The caller no longer holds the job's lease (it expired and another worker took it, or the
    /// job was finished by someone else): its write was refused.
    #[error("lease lost: job is no longer held by this worker")]
    LeaseLost,
    /// A uniqueness rule was broken (e.g. a token name that exists).
    #[error("{0}")]
    Conflict(String),
    /// The database cannot be used right now (busy, read-only, disk full, closed).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored row could not be decoded; a bug or a hand-edited database.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// Result alias for store calls.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A job to enqueue: the normalised spec plus the limits resolved from config.
#[derive(Debug, Clone)]
pub struct NewJob {
    /// Normalised spec (already validated).
    pub spec: JobSpec,
    /// Client-chosen key making the submission safe to repeat.
    pub idempotency_key: Option<String>,
    /// Attempts allowed before a transient failure becomes final.
    pub max_attempts: u32,
    /// Per-attempt time limit in milliseconds.
    pub timeout_ms: i64,
    /// Who submits it (the token's name, `sns:<hook>`), recorded on the job and its first event.
    pub created_by: Option<String>,
}

/// What `enqueue` did.
#[derive(Debug, Clone)]
pub enum Enqueued {
    /// A new job was stored.
    Created(Job),
    /// The idempotency key matched an earlier identical request: that job is returned.
    Replayed(Job),
}

/// Filters of `GET /v1/jobs`. Results are newest first.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this action (wire name).
    pub action: Option<String>,
    /// Created at or after (ms).
    pub since_ms: Option<i64>,
    /// Created before (ms).
    pub until_ms: Option<i64>,
    /// Only jobs submitted by this token (or `sns:<hook>`).
    pub created_by: Option<String>,
    /// Only the job with this id, or jobs among the newest [`SEARCH_SCAN`] whose spec or results
    /// contain this text (an instance, volume or image id, a tag): the dashboard's search.
    pub text: Option<String>,
    /// Page size.
    pub limit: u32,
    /// Continue after this job id (the previous page's cursor).
    pub before_id: Option<String>,
}

/// Jobs that ended in one hour in one final state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourCount {
    /// The hour's start (ms since the epoch, UTC).
    pub hour_ms: i64,
    /// Succeeded, failed or cancelled.
    pub state: JobState,
    /// How many.
    pub count: i64,
}

/// One page of jobs.
#[derive(Debug, Clone)]
pub struct Page {
    /// The jobs, newest first.
    pub jobs: Vec<Job>,
    /// Pass back to get the next page; `None` on the last one.
    pub next_cursor: Option<String>,
}

/// What `cancel` did.
#[derive(Debug, Clone)]
pub enum CancelOutcome {
    /// A queued job was cancelled at once.
    Cancelled(Job),
    /// A running job was flagged; its worker stops at the next step or wait.
    Requested(Job),
    /// The job had already ended; nothing changed.
    AlreadyFinished(Job),
}

/// A job handed to a worker, with what the worker needs beyond the public document.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The job as it is now (state `running`, attempts counted).
    pub job: Job,
    /// Per-attempt time limit.
    pub timeout_ms: i64,
    /// Resume state saved by an earlier attempt's executor.
    pub checkpoint: Option<serde_json::Value>,
    /// What the job's last parked wait saw, once it ended (see [`Store::park`]).
    pub waited: Option<serde_json::Value>,
}

/// How a worker ends its hold on a job.
#[derive(Debug, Clone)]
pub enum Finish {
    /// Done, with results.
    Succeeded(JobResults),
    /// Failed for good.
    Failed(JobError, JobResults),
    /// Stopped on the user's request.
    Cancelled(JobResults),
    /// Failed transiently: back to `queued`, not claimable before `run_after_ms`; what the
    /// attempt's last parked wait saw is forgotten (the next attempt looks again).
    Retry {
        /// The error that caused the retry (kept on the job while it waits).
        error: JobError,
        /// Earliest time of the next attempt.
        run_after_ms: i64,
        /// The attempt is given back (`max_attempts` grows by one): EC2 had no capacity, which
        /// says nothing about the job; the runner bounds these retries by the job's time limit.
        refund: bool,
    },
}

/// An event to append to a job's log together with a progress update.
#[derive(Debug, Clone, Serialize)]
pub struct NewEvent {
    /// Event kind (`progress`, …).
    pub kind: String,
    /// Sentence for people.
    pub message: String,
    /// Structured detail.
    pub data: serde_json::Value,
}

/// A stored API token (its hash is never returned).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Unique name chosen at creation.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// When it was created.
    pub created_at: chrono::DateTime<chrono::Utc>,
    /// What it may use beyond its role (absent: anything its role allows).
    #[serde(default, skip_serializing_if = "Scopes::is_empty")]
    pub scopes: Scopes,
}

/// A new dashboard session: the SHA-256 of the cookie's secret, of the token signed in with, the
/// form token (CSRF) its forms carry, and when it ends.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub session_sha256: String,
    pub token_sha256: String,
    pub csrf: String,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
}

/// A live dashboard session: the token it acts as (still valid), its form token, its end.
#[derive(Debug, Clone)]
pub struct Session {
    pub token: TokenInfo,
    pub csrf: String,
    pub expires_at_ms: i64,
}

/// How many sessions one token keeps; signing in again ends the oldest beyond it.
pub const MAX_SESSIONS_PER_TOKEN: i64 = 20;

/// What a token may use, each list empty for "any": the accounts its jobs may name, the actions
/// they may be (a workflow's steps each count), the templates it may run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Scopes {
    /// Accounts (config names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub accounts: Vec<String>,
    /// Actions (wire names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<String>,
    /// Templates (names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub templates: Vec<String>,
}

impl Scopes {
    /// No limit beyond the role.
    pub fn is_empty(&self) -> bool {
        self.accounts.is_empty() && self.actions.is_empty() && self.templates.is_empty()
    }
}

/// Kinds of named documents the API manages (each has its own table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Named {
    /// SNS hooks created over the API.
    SnsHook,
    /// Saved job templates.
    Template,
    /// Schedules created over the API (`PUT /v1/schedules/{name}`).
    Schedule,
    /// A window schedule's overrides with expiry, named `<schedule>/<id>`.
    ScheduleOverride,
}

impl Named {
    /// The table holding this kind (fixed names: never from input).
    pub fn table(self) -> &'static str {
        match self {
            Named::SnsHook => "sns_hooks",
            Named::Template => "templates",
            Named::Schedule => "schedules",
            Named::ScheduleOverride => "schedule_overrides",
        }
    }

    /// What the audit log calls this kind.
    pub fn noun(self) -> &'static str {
        match self {
            Named::SnsHook => "sns_hook",
            Named::Template => "template",
            Named::Schedule => "schedule",
            Named::ScheduleOverride => "schedule_override",
        }
    }
}

/// One change the audit log recorded (`GET /v1/audit`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Increasing id; the log is newest first and pages with `before`.
    pub id: i64,
    /// When.
    pub at: chrono::DateTime<chrono::Utc>,
    /// Who: the API token's name, or `cli` for `ec2jobd token …` on the host.
    pub by: String,
    /// `template`, `sns_hook`, `schedule`, `schedule_override` or `token`.
    pub what: String,
    /// Its name.
    pub name: String,
    /// `created`, `replaced`, `deleted` or `revoked`.
    pub change: String,
}

/// One SNS delivery to be recorded.
#[derive(Debug, Clone, Default)]
pub struct NewDelivery {
    /// The hook it was posted to.
    pub hook: String,
    /// SNS `MessageId`, when the body had one.
    pub message_id: Option<String>,
    /// SNS `TopicArn`.
    pub topic_arn: Option<String>,
    /// SNS `Type`.
    pub kind: Option<String>,
    /// `accepted`, `duplicate`, `no_rule`, `rejected`, `confirmed`, `unsubscribed`.
    pub outcome: String,
    /// Why (a rejection's reason, the rule's render error, …).
    pub reason: Option<String>,
    /// The rule that matched.
    pub rule: Option<String>,
    /// The job it queued (or the earlier one, for a duplicate).
    pub job_id: Option<String>,
    /// For a refusal: its kind (`topic`, `cert_url`, `signature`, …). Refusals of one kind to one
    /// hook within [`REFUSAL_FOLD_MS`] are folded into one row with a count.
    pub code: Option<String>,
}

/// Most bytes stored of any text of a delivery (ids, ARNs and reasons come from the caller).
pub const DELIVERY_FIELD_MAX: usize = 256;

/// Refusals of one kind to one hook within this many milliseconds share a row.
pub const REFUSAL_FOLD_MS: i64 = 60_000;

/// `s` cut to at most `max` bytes on a character boundary, with `…` when cut.
pub fn cut_text(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl NewDelivery {
    /// Every text cut to [`DELIVERY_FIELD_MAX`] bytes: what every store records.
    pub fn bounded(self) -> Self {
        let cut = |s: Option<String>| s.map(|s| cut_text(&s, DELIVERY_FIELD_MAX));
        Self {
            hook: cut_text(&self.hook, DELIVERY_FIELD_MAX),
            message_id: cut(self.message_id),
            topic_arn: cut(self.topic_arn),
            kind: cut(self.kind),
            outcome: self.outcome,
            reason: cut(self.reason),
            rule: cut(self.rule),
            job_id: self.job_id,
            code: cut(self.code),
        }
    }
}

/// A recorded SNS delivery (`GET /v1/sns/deliveries`).
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Delivery {
    /// Increasing id; the list is newest first and pages with `before`.
    pub id: i64,
    /// When it arrived.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The hook it was posted to.
    pub hook: String,
    /// SNS `MessageId`.
    pub message_id: Option<String>,
    /// SNS `TopicArn`.
    pub topic_arn: Option<String>,
    /// SNS `Type`.
    pub kind: Option<String>,
    /// `accepted`, `duplicate`, `no_rule`, `rejected`, `confirmed`, `unsubscribed`.
    pub outcome: String,
    /// Why.
    pub reason: Option<String>,
    /// The rule that matched.
    pub rule: Option<String>,
    /// The job it queued.
    pub job_id: Option<String>,
    /// For a refusal, its kind (`topic`, `cert_url`, `signature`, `stale`, …).
    pub code: Option<String>,
    /// How many deliveries this row stands for: refusals of one kind to one hook within a minute
    /// are counted into the first one's row.
    pub count: i64,
    /// When the last delivery counted into this row arrived (folded refusals only).
    pub last_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// What a job's lease holder learns from a heartbeat.
#[derive(Debug, Clone, Copy)]
pub struct Heartbeat {
    /// A user asked to cancel the job.
    pub cancel_requested: bool,
}

/// The job queue: jobs, their leases (writes that depend on holding a lease take the worker id and
/// fail with [`StoreError::LeaseLost`] when the lease has moved on: fencing), parked waits, the event
/// log, the outbox of finished jobs and their retention.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Stores a job (or returns the earlier one for a replayed idempotency key) and wakes a worker.
    async fn enqueue(&self, new: NewJob) -> Result<Enqueued>;
    /// One job by id.
    async fn get(&self, id: &str) -> Result<Option<Job>>;
    /// A page of jobs, newest first.
    async fn list(&self, q: ListQuery) -> Result<Page>;
    /// Cancels a queued job at once, or flags a running one, recording `by` (who asked) on the
    /// event. `None` when there is no such job.
    async fn cancel(&self, id: &str, by: &str) -> Result<Option<CancelOutcome>>;
    /// Claims up to `n` runnable jobs for `worker`, leasing them for `lease_ms`.
    async fn claim(&self, worker: &str, lease_ms: i64, n: u32) -> Result<Vec<Claimed>>;
    /// Extends the lease; tells the worker whether a cancel was asked.
    async fn heartbeat(&self, id: &str, worker: &str, lease_ms: i64) -> Result<Heartbeat>;
    /// Records progress (and an event) for a job the worker holds.
    async fn progress(
        &self,
        id: &str,
        worker: &str,
        progress: Progress,
        event: NewEvent,
    ) -> Result<()>;
    /// Saves the executor's resume state for a job the worker holds.
    async fn checkpoint(&self, id: &str, worker: &str, state: serde_json::Value) -> Result<()>;
    /// Ends the worker's hold: final state or a scheduled retry.
    async fn finish(&self, id: &str, worker: &str, outcome: Finish) -> Result<Job> {
        self.finish_with(id, worker, outcome, None).await
    }
    /// [`finish`](Queue::finish) writing `last` as the job's progress with its final state, in the
    /// same write (the executor's closing line: "stopped 3 instances"); `None` keeps the last
    /// progress, its phase set to `done`. A retry writes its own progress and ignores `last`.
    async fn finish_with(
        &self,
        id: &str,
        worker: &str,
        outcome: Finish,
        last: Option<Progress>,
    ) -> Result<Job>;
    /// Gives a job back untouched (graceful shutdown): queued again, the attempt not counted.
    async fn release(&self, id: &str, worker: &str) -> Result<()>;
    /// Re-queues running jobs whose lease expired (failing those out of attempts). Returns how many.
    async fn requeue_expired(&self) -> Result<u64>;
    /// Parks a job the worker holds for a wait that needs no worker: saves `checkpoint` (what it
    /// waits for and how it goes on), and hands the lease to the parking lot `lot`, which renews it
    /// with [`Store::renew_lot`]. The job stays `running` with `progress`, whose message goes into
    /// its event log: one write for all three.
    async fn park(
        &self,
        id: &str,
        worker: &str,
        lot: &str,
        lease_ms: i64,
        checkpoint: serde_json::Value,
        progress: Progress,
    ) -> Result<()>;
    /// Ends a parked wait: the job is queued again with `outcome` (claims hand it over as
    /// [`Claimed::waited`]), the attempt not counted a second time. Fenced by the lot's id.
    async fn unpark(
        &self,
        id: &str,
        lot: &str,
        outcome: serde_json::Value,
        message: &str,
    ) -> Result<()>;
    /// Renews the lease of every job `lot` holds; returns each of them (a job not among them is
    /// no longer the lot's) with whether its cancel was asked.
    async fn renew_lot(&self, lot: &str, lease_ms: i64) -> Result<Vec<(String, bool)>>;
    /// Gives every job `lot` holds back to the queue untouched (graceful shutdown), the attempt not
    /// counted: the next claim parks it again. Returns how many.
    async fn release_lot(&self, lot: &str) -> Result<u64>;
    /// A job's events after `after_seq`, oldest first.
    async fn events(&self, id: &str, after_seq: i64, limit: u32) -> Result<Vec<JobEvent>>;
    /// The earliest `run_after` (ms) among queued jobs, so idle workers can sleep exactly until a
    /// retry's backoff ends instead of polling for it.
    async fn next_run_after(&self) -> Result<Option<i64>>;
    /// Number of jobs per state.
    async fn counts(&self) -> Result<Vec<(JobState, i64)>>;
    /// Jobs finished at or after `since_ms`, per hour (its start, ms) and final state, oldest
    /// hour first (the dashboard's chart; the `jobs_finished` index makes it a range read).
    async fn finished_per_hour(&self, since_ms: i64) -> Result<Vec<HourCount>>;
    /// Jobs waiting to be claimed (cheap: the claim index), for admission control.
    async fn queued(&self) -> Result<i64>;
    /// Proves the database accepts a write.
    async fn ping(&self) -> Result<()>;
    /// Appends an event to a job in any state, unfenced: things that happen after a job ended
    /// (its notification was published or failed).
    async fn note(&self, id: &str, ev: NewEvent) -> Result<()>;
    /// Finished jobs whose outcome has not been handed on yet (the outbox), due by `now_ms`, oldest
    /// first, with how many publishes of each failed so far.
    async fn outbox(&self, now_ms: i64, limit: u32) -> Result<Vec<(Job, u32)>>;
    /// Marks finished jobs handed on; each may get an event (`notified`, `notify_failed`) in the
    /// same transaction.
    async fn outbox_done(&self, done: Vec<(String, Option<NewEvent>)>) -> Result<()>;
    /// A publish failed: counts it and holds the job back until `after_ms`.
    async fn outbox_retry(&self, id: &str, after_ms: i64) -> Result<()>;
    /// Deletes up to `limit` finished jobs created before `created_before_ms` (their events go with
    /// them; jobs still in the outbox stay); returns how many. With `dry_run`, deletes nothing and
    /// counts every job that would go.
    async fn prune_jobs(&self, created_before_ms: i64, limit: u32, dry_run: bool) -> Result<u64>;
    /// Receives the id of every job whose event log grew (for live event streams), including
    /// jobs other processes sharing the queue work on.
    fn subscribe(&self) -> broadcast::Receiver<String>;
    /// Notified whenever work may have become claimable (enqueue, retry, release, requeue).
    fn work_available(&self) -> Arc<Notify>;
}

/// Named documents the API manages (templates, SNS hooks, schedules, overrides), each change
/// recorded in the audit log.
#[async_trait]
pub trait Documents: Send + Sync + 'static {
    /// Creates or replaces a named document (`body` is opaque JSON); true when created. The audit
    /// log records `by`.
    async fn put_named(
        &self,
        kind: Named,
        name: &str,
        body: serde_json::Value,
        by: &str,
    ) -> Result<bool>;
    /// A named document's body.
    async fn get_named(&self, kind: Named, name: &str) -> Result<Option<serde_json::Value>>;
    /// Every named document of a kind, by name.
    async fn list_named(&self, kind: Named) -> Result<Vec<(String, serde_json::Value)>>;
    /// A stamp that changes whenever a document of this kind is created, replaced or deleted
    /// (the schedule ticker reloads only then).
    async fn named_stamp(&self, kind: Named) -> Result<(i64, i64, i64)>;
    /// Deletes a named document; false when there was none. The audit log records `by`.
    async fn delete_named(&self, kind: Named, name: &str, by: &str) -> Result<bool>;
}

/// API tokens (by the SHA-256 of their secret) and the dashboard sessions signed in with them.
#[async_trait]
pub trait Tokens: Send + Sync + 'static {
    /// Stores a token by the SHA-256 of its secret, with what it may use; the audit log records
    /// `by` (who created it) in the same transaction.
    async fn create_token(
        &self,
        name: &str,
        role: Role,
        sha256_hex: &str,
        scopes: &Scopes,
        by: &str,
    ) -> Result<TokenInfo>;
    /// Looks a token up by the SHA-256 of its secret.
    async fn token_by_hash(&self, sha256_hex: &str) -> Result<Option<(TokenInfo, String)>>;
    /// All tokens (without hashes).
    async fn list_tokens(&self) -> Result<Vec<TokenInfo>>;
    /// Deletes a token; false when there was none by that name. The audit log records `by`.
    async fn revoke_token(&self, name: &str, by: &str) -> Result<bool>;
    /// Starts a dashboard session; ends expired sessions and the token's oldest beyond
    /// [`MAX_SESSIONS_PER_TOKEN`], so sessions never grow without bound.
    async fn create_session(&self, new: &NewSession) -> Result<()>;
    /// The session with this hash, unexpired at `now_ms`, whose token still exists.
    async fn session(&self, session_sha256: &str, now_ms: i64) -> Result<Option<Session>>;
    /// Ends a session (signing out); nothing when there is none.
    async fn end_session(&self, session_sha256: &str) -> Result<()>;
}

/// Who changed what: written by the document and token writes, read here.
#[async_trait]
pub trait AuditLog: Send + Sync + 'static {
    /// The audit log, newest first, with id below `before` when given.
    async fn audit_log(&self, before: Option<i64>, limit: u32) -> Result<Vec<AuditEntry>>;
}

/// SNS deliveries: what became of each, refusals folded, and their retention.
#[async_trait]
pub trait Deliveries: Send + Sync + 'static {
    /// Deletes up to `limit` of the oldest SNS deliveries that arrived before `before_ms`; returns
    /// how many. With `dry_run`, deletes nothing and counts every one that would go.
    async fn prune_deliveries(&self, before_ms: i64, limit: u32, dry_run: bool) -> Result<u64>;
    /// Records an SNS delivery, cut by [`NewDelivery::bounded`]; a refusal (outcome `rejected`, with
    /// a `code`) within [`REFUSAL_FOLD_MS`] of an earlier one of the same code to the same hook is
    /// counted into that row instead.
    async fn record_delivery(&self, d: NewDelivery) -> Result<Delivery>;
    /// The first delivery of `message_id` to `hook` that was acted on (accepted, no rule, confirmed).
    async fn delivered(&self, hook: &str, message_id: &str) -> Result<Option<Delivery>>;
    /// Deliveries, newest first, with id below `before` when given.
    async fn list_deliveries(&self, before: Option<i64>, limit: u32) -> Result<Vec<Delivery>>;
}

/// Leases held by one process of those sharing the database (the maintenance leader), and what
/// replicas share beyond the queue.
#[async_trait]
pub trait Leadership: Send + Sync + 'static {
    /// Takes or renews the leader lease `name` for this process for `ttl_ms`; true while this
    /// process holds it. Periodic work that must run once per queue, not once per daemon
    /// (publishing the outbox, pruning), runs only while its lease is held. A queue one process
    /// owns (SQLite) always grants it.
    async fn lead(&self, name: &str, ttl_ms: i64) -> Result<bool>;
    /// Gives the lease `name` up if this process holds it (a graceful stop).
    async fn resign(&self, name: &str) -> Result<()>;
    /// Notified when another process gave a lease up (or such news may have been missed): ask
    /// for it now. `None`: nobody else can hold one (SQLite), or news is not heard (`poll_only`
    /// leaves renewals as the only way).
    fn lease_freed(&self) -> Option<Arc<Notify>> {
        None
    }
    /// What this store shares between processes beyond the queue (replicas on PostgreSQL);
    /// `None` for a store one process owns.
    fn cluster(&self) -> Option<Arc<dyn Cluster>> {
        None
    }
}

/// The whole store, every concern: what the daemon is built on (`Arc<dyn Store>`). Callers bring
/// the concerns they use into scope (`use ec2jobd_store::prelude::*`).
pub trait Store: Queue + Documents + Tokens + AuditLog + Deliveries + Leadership {}

impl<T: Queue + Documents + Tokens + AuditLog + Deliveries + Leadership> Store for T {}

/// Every concern's trait, for `use ec2jobd_store::prelude::*`.
pub mod prelude {
    pub use crate::{AuditLog, Deliveries, Documents, Leadership, Queue, Store, Tokens};
}

/// What replicas sharing one queue keep for each other beyond jobs: the status polling one of
/// them does for all (what each waits on, by account+region `scope`, and the poller's latest
/// round of each). Values are opaque JSON to the store.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// This process's name among the replicas.
    fn node(&self) -> &str;
    /// Records what this process waits on in `scope`, until `until_ms` unless renewed.
    async fn put_wants(&self, scope: &str, wants: serde_json::Value, until_ms: i64) -> Result<()>;
    /// What the other processes wait on and have renewed by `now_ms`: (scope, node, wants).
    async fn wants(&self, now_ms: i64) -> Result<Vec<(String, String, serde_json::Value)>>;
    /// Publishes the latest round of `scope`.
    async fn put_round(&self, scope: &str, round: serde_json::Value) -> Result<()>;
    /// The latest round of `scope`.
    async fn round(&self, scope: &str) -> Result<Option<serde_json::Value>>;
}

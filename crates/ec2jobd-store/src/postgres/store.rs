//! PostgreSQL implementation of [`Store`], for several daemons sharing one queue.
//!
//! Every write is one transaction on a pooled connection; PostgreSQL's row locks do what SQLite's
//! single writer does. What replicas must agree on is the database's to enforce: claims take rows
//! with `FOR UPDATE SKIP LOCKED` (two replicas never claim one job, and neither waits for the
//! other), an idempotency key is a unique index (`ON CONFLICT DO NOTHING`, then the row that won is
//! read back), a lease is the `lease_owner` fencing token as on SQLite, and expired leases are
//! re-queued by whichever replica looks (the update is idempotent). The same writes as SQLite's,
//! with the same events and progress (`shared`), so a job reads the same on either backend.
//!
//! Replicas learn of each other's work two ways, both hints with polling as the correctness path:
//! new work wakes workers through LISTEN/NOTIFY ([`hints`], sent inside the writing transaction;
//! off with `poll_only`), and job events written by other replicas are found by a watcher that
//! reads new `job_events` rows every `watch_interval` and announces their jobs to this replica's
//! live streams (SSE), so a stream on one replica follows a job running on another.
//! Must not: know HTTP or AWS.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ec2jobd_spec::{Clock, Job, JobEvent, JobState, Progress, Role};
use serde_json::{json, Value};
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{FromRow, PgConnection, Row};
use tokio::sync::{broadcast, Notify};
use tokio::task::JoinHandle;

use super::ingest::{Ingest, NewRow};
use super::{connect, hints, migrate, redact, release_lease, take_lease};
use crate::prelude::*;
use crate::row::{decode, ClaimedRow, JOB_COLS};
use crate::shared::{self, encode, id_bound, same_sql, spec_hash, Ids};
use crate::{
    CancelOutcome, Claimed, Cluster, Enqueued, Finish, Heartbeat, HourCount, ListQuery, Named,
    NewEvent, NewJob, Page, Result, Scopes, StoreError, TokenInfo,
};

same_sql!(helpers for PgConnection, PgRow);

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgres://user:password@host:port/database?…`
    pub url: String,
    /// Connections this replica keeps open (its workers, its API and its watcher share them).
    pub max_connections: u32,
    /// Never LISTEN (PgBouncer in transaction pooling cannot hold one): workers find new work by
    /// polling only.
    pub poll_only: bool,
    /// How often other replicas' job events are looked for (live streams lag at most this).
    pub watch_interval: Duration,
}

/// The shared queue. Cheap to share behind an `Arc`; its background tasks end when it is dropped.
pub struct PgStore {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    ids: Ids,
    /// This replica's name in leader leases and shared status polling.
    node: Arc<str>,
    events_tx: broadcast::Sender<String>,
    notify: Arc<Notify>,
    /// Told when another replica gave a leader lease up (none with `poll_only`: nobody listens).
    lease_freed: Option<Arc<Notify>>,
    /// Submissions' group commit.
    ingest: Ingest,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Claims the `$4` due queued jobs of the highest priority, the one due first among equals,
/// skipping rows another replica is claiming. The CTE walks `jobs_claim_priority` in its order (a
/// test checks the plan).
pub(super) const PICK: &str =
    "SELECT id AS pick FROM jobs WHERE state = 'queued' AND run_after <= $3 \
     ORDER BY priority DESC, run_after, id LIMIT $4 FOR UPDATE SKIP LOCKED";

/// The claim and each claimed job's `started` (or `resumed`) event in one statement, so a claim
/// of any size is one round trip and one commit. The event says what [`shared::claim_event`]
/// says (SQLite writes that one; a suite test checks both backends' events are the same).
fn claim_sql() -> String {
    format!(
        "WITH picked AS ({PICK}), \
         claimed AS (UPDATE jobs SET state = 'running', lease_owner = $1, lease_expires_at = $2, \
         attempts = attempts + 1, started_at = COALESCE(started_at, $3), updated_at = $3 \
         FROM picked WHERE jobs.id = picked.pick RETURNING {JOB_COLS}, wait_outcome), \
         event AS (INSERT INTO job_events (job_id, at, kind, message, data) \
         SELECT id, $3, CASE WHEN wait_outcome IS NULL THEN 'started' ELSE 'resumed' END, \
         'attempt ' || attempts || ' of ' || max_attempts || CASE WHEN wait_outcome IS NULL \
         THEN ' started' ELSE ' resumed after its wait' END, \
         jsonb_build_object('attempt', attempts, 'worker', $1::text)::text FROM claimed) \
         SELECT * FROM claimed"
    )
}

/// Finished jobs created before `$1` (an id) that have left the outbox: what retention deletes.
const PRUNABLE: &str = "WHERE state IN ('succeeded', 'failed', 'cancelled') \
    AND id < $1 AND outbox_done_at IS NOT NULL";

/// `update` (a fenced `UPDATE … RETURNING id, …, updated_at`) with the job's event (at the
/// update's time) in the same statement: the
/// event's kind, message and data are parameters `$first` to `$first + 2`, and with `hint` the
/// wake-up hint goes too (delivered at commit). Returns the updated rows: none when the lease has
/// moved on, and then nothing was written.
fn with_event(update: &str, first: usize, hint: bool) -> String {
    let (k, m, d) = (first, first + 1, first + 2);
    let hint_cte = if hint {
        format!(
            ", hint AS (SELECT pg_notify('{}', '') FROM done)",
            hints::JOBS_CHANNEL
        )
    } else {
        String::new()
    };
    let from = if hint { "done, hint" } else { "done" };
    format!(
        "WITH done AS ({update}), \
         event AS (INSERT INTO job_events (job_id, at, kind, message, data) \
                   SELECT id, updated_at, ${k}, ${m}, ${d} FROM done){hint_cte} \
         SELECT done.* FROM {from}"
    )
}

/// `change` (a statement `RETURNING name, change` whose last parameter is `$n`) with its audit
/// log row in the same statement: `$n+1` the time, `$n+2` who, `what` the kind of thing changed.
/// Returns the changed rows' (name, change).
fn audited(change: &str, what: &str) -> String {
    let n = (1..=9)
        .rev()
        .find(|i| change.contains(&format!("${i}")))
        .unwrap_or(0);
    let (at, by) = (n + 1, n + 2);
    format!(
        "WITH changed AS ({change}), \
         logged AS (INSERT INTO audit_log (at, actor, what, name, change) \
                    SELECT ${at}, ${by}, '{what}', name, change FROM changed) \
         SELECT name, change FROM changed"
    )
}

fn vanished(id: &str) -> StoreError {
    StoreError::Corrupt(format!("job {id} vanished"))
}

impl PgStore {
    /// Runs `f` in one transaction on a pooled connection and returns its result once committed
    /// (the shape of SQLite's writer, so `same_sql!` writes one body for both).
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut PgConnection) -> shared::OpFuture<'c, T> + Send + 'static,
    {
        let mut tx = self.pool.begin().await?;
        let out = f(&mut tx).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Connects, applies migrations (safe from several replicas at once) and starts the hint
    /// listener (unless `poll_only`) and the event watcher.
    pub async fn open(opts: PgOptions, clock: Arc<dyn Clock>) -> Result<Self> {
        let pool = connect(&opts.url, opts.max_connections).await?;
        migrate(&pool).await?;
        let notify = Arc::new(Notify::new());
        let (events_tx, _) = broadcast::channel(4096);
        let mut tasks = Vec::new();
        let mut lease_freed = None;
        if !opts.poll_only {
            let freed = Arc::new(Notify::new());
            tasks.push(hints::listen(
                opts.url.clone(),
                notify.clone(),
                freed.clone(),
            ));
            lease_freed = Some(freed);
        }
        // Events from here on are watched for: read before the store is handed out.
        let from: Option<i64> = sqlx::query_scalar("SELECT max(seq) FROM job_events")
            .fetch_one(&pool)
            .await?;
        tasks.push(tokio::spawn(watch_events(
            pool.clone(),
            events_tx.clone(),
            opts.watch_interval,
            from.unwrap_or(0),
        )));
        let (ingest, writers) = Ingest::start(pool.clone());
        tasks.extend(writers);
        tracing::info!(database = %redact(&opts.url), poll_only = opts.poll_only, "PostgreSQL store open");
        Ok(Self {
            pool,
            ids: Ids::new(clock.clone()),
            clock,
            node: format!("node-{}", ulid::Ulid::new()).into(),
            events_tx,
            notify,
            lease_freed,
            ingest,
            tasks,
        })
    }

    fn announce(&self, job_id: &str) {
        let _ = self.events_tx.send(job_id.to_string());
    }
}

/// Announces the jobs of events other replicas wrote, read by sequence number. A number below the
/// highest one read may still commit later (transactions end out of order), so numbers missing
/// below it are looked for again until they appear or have been missing for [`GAP_PATIENCE`] (a
/// rolled-back insert leaves a gap for good). Announcing a job twice is harmless: streams re-read
/// its events after what they sent.
async fn watch_events(pool: PgPool, tx: broadcast::Sender<String>, every: Duration, from: i64) {
    const GAP_PATIENCE: Duration = Duration::from_secs(5);
    const PAGE: i64 = 2_000;
    let mut floor = from;
    let mut seen: BTreeSet<i64> = BTreeSet::new();
    let mut gap_since: Option<Instant> = None;
    loop {
        tokio::time::sleep(every).await;
        let from = floor;
        let rows: Vec<(i64, String)> = match sqlx::query_as(
            "SELECT seq, job_id FROM job_events WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(from)
        .bind(PAGE)
        .fetch_all(&pool)
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "event watch failed; trying again");
                continue;
            }
        };
        let mut jobs = HashSet::new();
        for (seq, job) in rows {
            if seen.insert(seq) {
                jobs.insert(job);
            }
        }
        // Nobody streaming here: nothing to tell, but the floor moves on.
        if tx.receiver_count() > 0 {
            for job in jobs {
                let _ = tx.send(job);
            }
        }
        let mut at = from;
        while seen.remove(&(at + 1)) {
            at += 1;
        }
        if let Some(&next) = seen.first() {
            let since = *gap_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= GAP_PATIENCE {
                at = next - 1;
                while seen.remove(&(at + 1)) {
                    at += 1;
                }
                gap_since = None;
            }
        } else {
            gap_since = None;
        }
        floor = at;
    }
}

same_sql!(reads of PgStore, sqlx::Postgres, shared::Dialect::Postgres);

#[async_trait]
impl Queue for PgStore {
    async fn enqueue(&self, new: NewJob) -> Result<Enqueued> {
        let id = self.ids.next();
        let spec_json = encode(&new.spec);
        let hash = spec_hash(&new.spec, &spec_json);
        let now = self.clock.now_ms();
        let progress = shared::queued_progress();
        let (kind, message, data) = shared::queued_event(&new);
        // With the submissions arriving meanwhile, in one statement and transaction: the job, its
        // first event and the wake-up hint (delivered at commit) — see `ingest`. A key another
        // replica is inserting right now makes the insert wait for that commit and then do
        // nothing; the row that won is read back.
        let inserted = self
            .ingest
            .insert(NewRow {
                id: id.clone(),
                action: new.spec.action.as_str().to_string(),
                spec: spec_json,
                idempotency_key: new.idempotency_key.clone(),
                request_hash: hash.clone(),
                now,
                max_attempts: new.max_attempts as i32,
                timeout_ms: new.timeout_ms,
                progress: encode(&progress),
                priority: new.spec.priority.unwrap_or(0),
                kind: kind.to_string(),
                message,
                data: encode(&data),
                created_by: new.created_by.clone(),
            })
            .await?;
        if !inserted {
            let key = new.idempotency_key.as_deref().unwrap_or_default();
            let row = sqlx::query("SELECT id, request_hash FROM jobs WHERE idempotency_key = $1")
                .bind(key)
                .fetch_one(&self.pool)
                .await?;
            let existing: String = row.try_get("id")?;
            let existing_hash: Option<String> = row.try_get("request_hash")?;
            if existing_hash.as_deref() != Some(hash.as_str()) {
                return Err(StoreError::IdempotencyConflict { job_id: existing });
            }
            let mut conn = self.pool.acquire().await?;
            let job = load_job(&mut conn, &existing)
                .await?
                .ok_or_else(|| vanished(&existing))?;
            return Ok(Enqueued::Replayed(job));
        }
        self.announce(&id);
        self.notify.notify_one();
        Ok(Enqueued::Created(shared::created_job(
            id, new, now, progress,
        )))
    }

    async fn get(&self, id: &str) -> Result<Option<Job>> {
        let mut conn = self.pool.acquire().await?;
        load_job(&mut conn, id).await
    }

    async fn list(&self, q: ListQuery) -> Result<Page> {
        self.read_list(q).await
    }

    async fn cancel(&self, id: &str, by: &str) -> Result<Option<CancelOutcome>> {
        let now = self.clock.now_ms();
        let mut tx = self.pool.begin().await?;
        // Locked, so a claim on another replica cannot slip between the look and the write.
        let row = sqlx::query(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(job) = row.as_ref().map(job_from_row).transpose()? else {
            return Ok(None);
        };
        let out = match job.state {
            JobState::Queued => {
                sqlx::query(
                    "UPDATE jobs SET state = 'cancelled', finished_at = $1, updated_at = $1, \
                     progress = $2 WHERE id = $3",
                )
                .bind(now)
                .bind(encode(&shared::cancelled_progress()))
                .bind(id)
                .execute(&mut *tx)
                .await?;
                let ev = ("cancelled", "cancelled while queued", &Value::Null);
                add_event_by(&mut tx, id, now, ev, Some(by)).await?;
                CancelOutcome::Cancelled(load_job(&mut tx, id).await?.unwrap_or(job))
            }
            JobState::Running => {
                if !job.cancel_requested {
                    sqlx::query(
                        "UPDATE jobs SET cancel_requested = true, updated_at = $1 WHERE id = $2",
                    )
                    .bind(now)
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
                    let ev = ("cancel_requested", shared::CANCEL_REQUESTED, &Value::Null);
                    add_event_by(&mut tx, id, now, ev, Some(by)).await?;
                }
                CancelOutcome::Requested(load_job(&mut tx, id).await?.unwrap_or(job))
            }
            _ => return Ok(Some(CancelOutcome::AlreadyFinished(job))),
        };
        tx.commit().await?;
        self.announce(id);
        Ok(Some(out))
    }

    async fn claim(&self, worker: &str, lease_ms: i64, n: u32) -> Result<Vec<Claimed>> {
        let now = self.clock.now_ms();
        let rows = sqlx::query(&claim_sql())
            .bind(worker)
            .bind(now + lease_ms)
            .bind(now)
            .bind(n as i64)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(ClaimedRow::from_row(row)?.into_claimed()?);
        }
        for c in &out {
            self.announce(&c.job.id);
        }
        Ok(out)
    }

    async fn heartbeat(&self, id: &str, worker: &str, lease_ms: i64) -> Result<Heartbeat> {
        let now = self.clock.now_ms();
        let cancel: Option<bool> = sqlx::query_scalar(
            "UPDATE jobs SET lease_expires_at = $1, updated_at = $2 \
             WHERE id = $3 AND lease_owner = $4 AND state = 'running' RETURNING cancel_requested",
        )
        .bind(now + lease_ms)
        .bind(now)
        .bind(id)
        .bind(worker)
        .fetch_optional(&self.pool)
        .await?;
        cancel
            .map(|cancel_requested| Heartbeat { cancel_requested })
            .ok_or(StoreError::LeaseLost)
    }

    async fn progress(
        &self,
        id: &str,
        worker: &str,
        progress: Progress,
        event: NewEvent,
    ) -> Result<()> {
        let now = self.clock.now_ms();
        let held: Option<String> = sqlx::query_scalar(&with_event(
            "UPDATE jobs SET progress = $1, updated_at = $2 \
             WHERE id = $3 AND lease_owner = $4 AND state = 'running' RETURNING id, updated_at",
            5,
            false,
        ))
        .bind(encode(&progress))
        .bind(now)
        .bind(id)
        .bind(worker)
        .bind(&event.kind)
        .bind(&event.message)
        .bind(encode(&event.data))
        .fetch_optional(&self.pool)
        .await?;
        held.ok_or(StoreError::LeaseLost)?;
        self.announce(id);
        Ok(())
    }

    async fn checkpoint(&self, id: &str, worker: &str, state: Value) -> Result<()> {
        let n = sqlx::query(
            "UPDATE jobs SET checkpoint = $1 WHERE id = $2 AND lease_owner = $3 AND state = 'running'",
        )
        .bind(encode(&state))
        .bind(id)
        .bind(worker)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n == 0 {
            return Err(StoreError::LeaseLost);
        }
        Ok(())
    }

    async fn finish_with(
        &self,
        id: &str,
        worker: &str,
        outcome: Finish,
        last: Option<Progress>,
    ) -> Result<Job> {
        let now = self.clock.now_ms();
        let retry = matches!(outcome, Finish::Retry { .. });
        let (kind, message, data) = shared::finish_event(&outcome, now);
        // One statement: the fenced update (returning the job as it is now), its event, and for a
        // retry the wake-up hint.
        let sql = if let Finish::Retry { refund, .. } = &outcome {
            // The refund is the runner's, never a caller's: written into the statement.
            let refund = i32::from(*refund);
            with_event(
                &format!(
                    "UPDATE jobs SET state = 'queued', run_after = $1, error = $2, updated_at = $3, \
                     lease_owner = NULL, lease_expires_at = NULL, progress = $4, \
                     max_attempts = max_attempts + {refund}, wait_outcome = NULL \
                     WHERE id = $5 AND lease_owner = $6 AND state = 'running' RETURNING {JOB_COLS}, updated_at"
                ),
                7,
                true,
            )
        } else {
            with_event(
                &format!(
                    "UPDATE jobs SET state = $1, finished_at = $3, updated_at = $3, error = $2, \
                     results = $4, lease_owner = NULL, lease_expires_at = NULL, \
                     progress = COALESCE($7, jsonb_set(progress::jsonb, '{{phase}}', '\"done\"')::text) \
                     WHERE id = $5 AND lease_owner = $6 AND state = 'running' RETURNING {JOB_COLS}, updated_at"
                ),
                8,
                false,
            )
        };
        let row = match (&outcome, shared::final_state(&outcome)) {
            (
                Finish::Retry {
                    error,
                    run_after_ms,
                    ..
                },
                _,
            ) => sqlx::query(&sql)
                .bind(run_after_ms)
                .bind(encode(error))
                .bind(now)
                .bind(encode(&shared::retry_progress(error, *run_after_ms))),
            (
                Finish::Succeeded(results)
                | Finish::Failed(_, results)
                | Finish::Cancelled(results),
                state,
            ) => {
                let (state, error) = state.unwrap_or(("failed", None));
                sqlx::query(&sql)
                    .bind(state)
                    .bind(error)
                    .bind(now)
                    .bind(encode(results))
            }
        }
        .bind(id)
        .bind(worker);
        // $7 of a final state: its closing progress.
        let row = if retry {
            row
        } else {
            row.bind(last.as_ref().map(encode))
        }
        .bind(kind)
        .bind(&message)
        .bind(encode(&data))
        .fetch_optional(&self.pool)
        .await?;
        let job = row
            .as_ref()
            .map(job_from_row)
            .transpose()?
            .ok_or(StoreError::LeaseLost)?;
        self.announce(id);
        if retry {
            self.notify.notify_one();
        }
        Ok(job)
    }

    async fn release(&self, id: &str, worker: &str) -> Result<()> {
        let now = self.clock.now_ms();
        let held: Option<String> = sqlx::query_scalar(&with_event(
            "UPDATE jobs SET state = 'queued', attempts = GREATEST(attempts - 1, 0), run_after = $1, \
             updated_at = $1, lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $2 AND lease_owner = $3 AND state = 'running' RETURNING id, updated_at",
            4,
            true,
        ))
        .bind(now)
        .bind(id)
        .bind(worker)
        .bind("requeued")
        .bind(shared::RELEASED)
        .bind(encode(&Value::Null))
        .fetch_optional(&self.pool)
        .await?;
        held.ok_or(StoreError::LeaseLost)?;
        self.announce(id);
        self.notify.notify_one();
        Ok(())
    }

    async fn requeue_expired(&self) -> Result<u64> {
        // A re-queued job keeps its due time: work that was under way (a dead replica's parked
        // waits among it) goes on ahead of queued jobs of its priority that have not started.
        let now = self.clock.now_ms();
        let mut tx = self.pool.begin().await?;
        // Any replica may run this at any time: a row another is re-queuing is locked until it
        // commits, and then no longer matches.
        let rows: Vec<(String, String)> = sqlx::query_as(
            "UPDATE jobs SET \
               state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
               finished_at = CASE WHEN attempts >= max_attempts THEN $1 ELSE NULL END, \
               error = CASE WHEN attempts >= max_attempts THEN $2 ELSE error END, \
               lease_owner = NULL, lease_expires_at = NULL, updated_at = $1 \
             WHERE state = 'running' AND lease_expires_at < $1 RETURNING id, state",
        )
        .bind(now)
        .bind(shared::lease_expired_error())
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        for (id, state) in &rows {
            let (kind, msg) = shared::expired_event(state);
            add_event(&mut tx, id, now, kind, msg, &Value::Null).await?;
        }
        hints::hint(&mut tx).await?;
        tx.commit().await?;
        for (id, _) in &rows {
            self.announce(id);
        }
        self.notify.notify_one();
        Ok(rows.len() as u64)
    }

    async fn park(
        &self,
        id: &str,
        worker: &str,
        lot: &str,
        lease_ms: i64,
        checkpoint: Value,
        progress: Progress,
    ) -> Result<()> {
        let now = self.clock.now_ms();
        let data = json!({"lot": lot, "phase": progress.phase});
        let held: Option<String> = sqlx::query_scalar(&with_event(
            "UPDATE jobs SET checkpoint = $1, progress = $2, wait_outcome = NULL, \
             lease_owner = $3, lease_expires_at = $4, updated_at = $5 \
             WHERE id = $6 AND lease_owner = $7 AND state = 'running' RETURNING id, updated_at",
            8,
            false,
        ))
        .bind(encode(&checkpoint))
        .bind(encode(&progress))
        .bind(lot)
        .bind(now + lease_ms)
        .bind(now)
        .bind(id)
        .bind(worker)
        .bind("parked")
        .bind(&progress.message)
        .bind(encode(&data))
        .fetch_optional(&self.pool)
        .await?;
        held.ok_or(StoreError::LeaseLost)?;
        self.announce(id);
        Ok(())
    }

    async fn unpark(&self, id: &str, lot: &str, outcome: Value, message: &str) -> Result<()> {
        let now = self.clock.now_ms();
        // `run_after` stays the job's first due time: a job that has waited goes on ahead of jobs
        // of its priority that have not started.
        let held: Option<String> = sqlx::query_scalar(&with_event(
            "UPDATE jobs SET state = 'queued', attempts = GREATEST(attempts - 1, 0), \
             wait_outcome = $1, lease_owner = NULL, lease_expires_at = NULL, updated_at = $2 \
             WHERE id = $3 AND lease_owner = $4 AND state = 'running' RETURNING id, updated_at",
            5,
            true,
        ))
        .bind(encode(&outcome))
        .bind(now)
        .bind(id)
        .bind(lot)
        .bind("wait_ended")
        .bind(message)
        .bind(encode(&Value::Null))
        .fetch_optional(&self.pool)
        .await?;
        held.ok_or(StoreError::LeaseLost)?;
        self.announce(id);
        self.notify.notify_one();
        Ok(())
    }

    async fn renew_lot(&self, lot: &str, lease_ms: i64) -> Result<Vec<(String, bool)>> {
        let now = self.clock.now_ms();
        let rows: Vec<(String, bool)> = sqlx::query_as(
            "UPDATE jobs SET lease_expires_at = $1 \
             WHERE lease_owner = $2 AND state = 'running' RETURNING id, cancel_requested",
        )
        .bind(now + lease_ms)
        .bind(lot)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    async fn release_lot(&self, lot: &str) -> Result<u64> {
        let now = self.clock.now_ms();
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "UPDATE jobs SET state = 'queued', attempts = GREATEST(attempts - 1, 0), \
             run_after = $1, updated_at = $1, lease_owner = NULL, lease_expires_at = NULL \
             WHERE lease_owner = $2 AND state = 'running' RETURNING id",
        )
        .bind(now)
        .bind(lot)
        .fetch_all(&mut *tx)
        .await?;
        let (kind, message, data) = shared::lot_released();
        for id in &ids {
            add_event(&mut tx, id, now, kind, &message, &data).await?;
        }
        if !ids.is_empty() {
            hints::hint(&mut tx).await?;
        }
        tx.commit().await?;
        for id in &ids {
            self.announce(id);
        }
        Ok(ids.len() as u64)
    }

    async fn events(&self, id: &str, after_seq: i64, limit: u32) -> Result<Vec<JobEvent>> {
        self.read_events(id, after_seq, limit).await
    }

    async fn next_run_after(&self) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar("SELECT min(run_after) FROM jobs WHERE state = 'queued'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn finished_per_hour(&self, since_ms: i64) -> Result<Vec<HourCount>> {
        self.read_finished_per_hour(since_ms).await
    }

    async fn counts(&self) -> Result<Vec<(JobState, i64)>> {
        self.read_counts().await
    }

    async fn queued(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'queued'")
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn ping(&self) -> Result<()> {
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('last_ping', $1) \
             ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
        )
        .bind(self.clock.now_ms().to_string())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn note(&self, id: &str, ev: NewEvent) -> Result<()> {
        let mut conn = self.pool.acquire().await?;
        add_event(
            &mut conn,
            id,
            self.clock.now_ms(),
            &ev.kind,
            &ev.message,
            &ev.data,
        )
        .await?;
        self.announce(id);
        Ok(())
    }

    async fn outbox(&self, now_ms: i64, limit: u32) -> Result<Vec<(Job, u32)>> {
        self.read_outbox(now_ms, limit).await
    }

    async fn outbox_done(&self, done: Vec<(String, Option<NewEvent>)>) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let now = self.clock.now_ms();
        let mut tx = self.pool.begin().await?;
        mark_outbox_done(&mut tx, now, &done).await?;
        tx.commit().await?;
        for (id, ev) in &done {
            if ev.is_some() {
                self.announce(id);
            }
        }
        Ok(())
    }

    async fn outbox_retry(&self, id: &str, after_ms: i64) -> Result<()> {
        sqlx::query(
            "UPDATE jobs SET outbox_tries = outbox_tries + 1, outbox_after = $1 WHERE id = $2",
        )
        .bind(after_ms)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn prune_jobs(&self, created_before_ms: i64, limit: u32, dry_run: bool) -> Result<u64> {
        let before = id_bound(created_before_ms);
        if dry_run {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM jobs {PRUNABLE}"))
                .bind(&before)
                .fetch_one(&self.pool)
                .await?;
            return Ok(n as u64);
        }
        let n = sqlx::query(&format!(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs {PRUNABLE} ORDER BY id LIMIT $2)"
        ))
        .bind(&before)
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n)
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events_tx.subscribe()
    }

    fn work_available(&self) -> Arc<Notify> {
        self.notify.clone()
    }
}

#[async_trait]
impl Documents for PgStore {
    async fn put_named(&self, kind: Named, name: &str, body: Value, by: &str) -> Result<bool> {
        let now = self.clock.now_ms();
        // `xmax = 0` holds for a row this statement inserted, not for one it updated.
        let (_, change): (String, String) = sqlx::query_as(&audited(
            &format!(
                "INSERT INTO {} (name, body, created_at, updated_at) VALUES ($1, $2, $3, $3) \
                 ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body, updated_at = EXCLUDED.updated_at \
                 RETURNING name, CASE WHEN xmax = 0 THEN 'created' ELSE 'replaced' END AS change",
                kind.table()
            ),
            kind.noun(),
        ))
        .bind(name)
        .bind(encode(&body))
        .bind(now)
        .bind(now)
        .bind(by)
        .fetch_one(&self.pool)
        .await?;
        Ok(change == "created")
    }

    async fn get_named(&self, kind: Named, name: &str) -> Result<Option<Value>> {
        let body: Option<String> = sqlx::query_scalar(&format!(
            "SELECT body FROM {} WHERE name = $1",
            kind.table()
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        body.map(|b| decode("body", &b)).transpose()
    }

    async fn list_named(&self, kind: Named) -> Result<Vec<(String, Value)>> {
        let rows: Vec<(String, String)> = sqlx::query_as(&format!(
            "SELECT name, body FROM {} ORDER BY name",
            kind.table()
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(name, body)| Ok((name, decode("body", &body)?)))
            .collect()
    }

    async fn named_stamp(&self, kind: Named) -> Result<(i64, i64, i64)> {
        Ok(sqlx::query_as(&crate::shared::named_stamp_sql(kind))
            .fetch_one(&self.pool)
            .await?)
    }

    async fn delete_named(&self, kind: Named, name: &str, by: &str) -> Result<bool> {
        let gone: Option<String> = sqlx::query_scalar(&audited(
            &format!(
                "DELETE FROM {} WHERE name = $1 RETURNING name, 'deleted' AS change",
                kind.table()
            ),
            kind.noun(),
        ))
        .bind(name)
        .bind(self.clock.now_ms())
        .bind(by)
        .fetch_optional(&self.pool)
        .await?;
        Ok(gone.is_some())
    }
}

same_sql!(impl Tokens for PgStore {
    async fn create_token(
        &self,
        name: &str,
        role: Role,
        sha256_hex: &str,
        scopes: &Scopes,
        by: &str,
    ) -> Result<TokenInfo> {
        let now = self.clock.now_ms();
        let r = sqlx::query(&audited(
            "INSERT INTO api_tokens (name, role, token_sha256, created_at, scopes) \
             VALUES ($1, $2, $3, $4, $5) RETURNING name, 'created' AS change",
            "token",
        ))
        .bind(name)
        .bind(role.as_str())
        .bind(sha256_hex)
        .bind(now)
        .bind((!scopes.is_empty()).then(|| encode(scopes)))
        .bind(now)
        .bind(by)
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(TokenInfo {
                name: name.to_string(),
                role,
                created_at: crate::row::ts(now),
                scopes: scopes.clone(),
            }),
            Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err(StoreError::Conflict(
                format!("a token named `{name}` already exists"),
            )),
            Err(e) => Err(e.into()),
        }
    }

    async fn revoke_token(&self, name: &str, by: &str) -> Result<bool> {
        let gone: Option<String> = sqlx::query_scalar(&audited(
            "DELETE FROM api_tokens WHERE name = $1 RETURNING name, 'revoked' AS change",
            "token",
        ))
        .bind(name)
        .bind(self.clock.now_ms())
        .bind(by)
        .fetch_optional(&self.pool)
        .await?;
        Ok(gone.is_some())
    }
});

same_sql!(impl AuditLog for PgStore);

same_sql!(impl Deliveries for PgStore, shared::Dialect::Postgres, {
    async fn prune_deliveries(&self, before_ms: i64, limit: u32, dry_run: bool) -> Result<u64> {
        if dry_run {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM sns_deliveries WHERE at < $1")
                .bind(before_ms)
                .fetch_one(&self.pool)
                .await?;
            return Ok(n as u64);
        }
        let n = sqlx::query(
            "DELETE FROM sns_deliveries WHERE id IN \
             (SELECT id FROM sns_deliveries ORDER BY id LIMIT $1) AND at < $2",
        )
        .bind(i64::from(limit))
        .bind(before_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n)
    }

});

#[async_trait]
impl Leadership for PgStore {
    async fn lead(&self, name: &str, ttl_ms: i64) -> Result<bool> {
        take_lease(&self.pool, name, &self.node, self.clock.now_ms(), ttl_ms).await
    }

    async fn resign(&self, name: &str) -> Result<()> {
        release_lease(&self.pool, name, &self.node).await
    }

    fn lease_freed(&self) -> Option<Arc<Notify>> {
        self.lease_freed.clone()
    }

    fn cluster(&self) -> Option<Arc<dyn Cluster>> {
        Some(Arc::new(PgCluster {
            pool: self.pool.clone(),
            node: self.node.clone(),
            clock: self.clock.clone(),
        }))
    }
}

/// The replicas' shared status polling, in `status_wants` and `status_rounds`.
struct PgCluster {
    pool: PgPool,
    node: Arc<str>,
    clock: Arc<dyn Clock>,
}

#[async_trait]
impl Cluster for PgCluster {
    fn node(&self) -> &str {
        &self.node
    }

    async fn put_wants(&self, scope: &str, wants: Value, until_ms: i64) -> Result<()> {
        sqlx::query(
            "INSERT INTO status_wants (scope, node, wants, until_ms) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (scope, node) DO UPDATE SET wants = EXCLUDED.wants, until_ms = EXCLUDED.until_ms",
        )
        .bind(scope)
        .bind(&*self.node)
        .bind(encode(&wants))
        .bind(until_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn wants(&self, now_ms: i64) -> Result<Vec<(String, String, Value)>> {
        // Rows of replicas that stopped renewing (stopped waiting, or died) go after a minute.
        sqlx::query("DELETE FROM status_wants WHERE until_ms < $1")
            .bind(now_ms - 60_000)
            .execute(&self.pool)
            .await?;
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT scope, node, wants FROM status_wants WHERE until_ms >= $1 AND node <> $2",
        )
        .bind(now_ms)
        .bind(&*self.node)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(scope, node, w)| Ok((scope, node, decode("status wants", &w)?)))
            .collect()
    }

    async fn put_round(&self, scope: &str, round: Value) -> Result<()> {
        sqlx::query(
            "INSERT INTO status_rounds (scope, round, at) VALUES ($1, $2, $3) \
             ON CONFLICT (scope) DO UPDATE SET round = EXCLUDED.round, at = EXCLUDED.at",
        )
        .bind(scope)
        .bind(encode(&round))
        .bind(self.clock.now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn round(&self, scope: &str) -> Result<Option<Value>> {
        let r: Option<String> =
            sqlx::query_scalar("SELECT round FROM status_rounds WHERE scope = $1")
                .bind(scope)
                .fetch_optional(&self.pool)
                .await?;
        r.map(|r| decode("status round", &r)).transpose()
    }
}

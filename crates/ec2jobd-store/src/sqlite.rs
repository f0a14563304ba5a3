//! SQLite implementation of [`Store`].
//!
//! Reads go through a small connection pool (WAL lets them run beside a writer). Every write goes
//! through one writer task that owns one connection: it takes whatever writes are waiting, runs them
//! in a single `BEGIN IMMEDIATE` transaction, commits once, and only then answers each caller. That is
//! group commit: with `synchronous = FULL` one fsync serves every submission that arrived meanwhile.
//! It also means a caller that goes away (an HTTP client hanging up) can never leave a transaction
//! half-open.
//!
//! Invariant that lets writes share a transaction without a savepoint each: a write either *refuses*
//! before it has changed anything (lease lost, idempotency conflict, name taken — a failed statement
//! changes nothing), and its neighbours commit; or it fails *fatally* (I/O, a corrupt row), and the
//! whole batch is rolled back and every caller in it is told the store is unavailable. New writes must
//! keep to this: check, then write.

use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ec2jobd_spec::{Clock, Job, JobEvent, JobState, Progress, Role};
use serde_json::{json, Value};
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions, FromRow, Row};
use tokio::sync::{broadcast, mpsc, oneshot, Notify};

use crate::prelude::*;
use crate::row::{ts, ClaimedRow, JOB_COLS};
use crate::shared::{self, encode, same_sql, spec_hash, Ids};
use crate::{
    CancelOutcome, Claimed, Enqueued, Finish, Heartbeat, HourCount, ListQuery, Named, NewEvent,
    NewJob, Page, Result, Scopes, StoreError, TokenInfo,
};

mod backup;
pub use backup::{backup, check_backup, restore, Backup, Checked, Restored};

static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/sqlite");

same_sql!(helpers for SqliteConnection, SqliteRow);

/// SQLite's `synchronous` pragma as offered in config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// Durable against process crashes; a power loss may lose the last commits (WAL default).
    Normal,
    /// fsync on every commit: durable against power loss.
    Full,
}

/// How to open the database.
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    /// `sqlite://path.db` (created if missing) or `sqlite::memory:`.
    pub url: String,
    /// Durability level.
    pub synchronous: Synchronous,
    /// How long a write waits for another process's lock before failing.
    pub busy_timeout: Duration,
    /// Read connections.
    pub max_connections: u32,
    /// Most writes folded into one commit.
    pub max_batch: usize,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            url: "sqlite://ec2jobd.db".into(),
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(5),
            max_connections: 8,
            max_batch: 256,
        }
    }
}

type Reply = Box<dyn FnOnce(Option<String>) + Send>;
type WorkFuture<'c> = Pin<Box<dyn Future<Output = (Fate, Reply)> + Send + 'c>>;

/// How a write ended, for the batch it is part of.
enum Fate {
    /// Done; commit with the batch.
    Done,
    /// Refused before changing anything; the batch commits without it.
    Refused,
    /// Failed with the database in doubt; the whole batch is rolled back.
    Fatal(String),
}

/// A queued write: given the writer's connection (or why there is none this round), it runs and
/// returns its fate plus how to answer its caller once the commit's fate is known.
type Work = Box<
    dyn for<'c> FnOnce(std::result::Result<&'c mut SqliteConnection, String>) -> WorkFuture<'c>
        + Send,
>;
use shared::OpFuture;

/// The embedded queue. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    pool: SqlitePool,
    writer: mpsc::Sender<Work>,
    clock: Arc<dyn Clock>,
    ids: Ids,
    events_tx: broadcast::Sender<String>,
    notify: Arc<Notify>,
    /// Held while the store is open, so `ec2jobd restore` cannot replace the file under it.
    _using: Option<backup::FileLock>,
}

impl SqliteStore {
    /// Opens (creating if needed) the database, applies migrations and starts the writer task.
    pub async fn open(opts: SqliteOptions, clock: Arc<dyn Clock>) -> Result<Self> {
        let connect = SqliteConnectOptions::from_str(&opts.url)
            .map_err(|e| StoreError::Unavailable(format!("database url `{}`: {e}", opts.url)))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match opts.synchronous {
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(opts.busy_timeout)
            .foreign_keys(true);
        let using = match file_of(&connect) {
            Some(file) => {
                create_private(file)?;
                Some(backup::FileLock::using(file)?)
            }
            None => None,
        };
        let pool = SqlitePoolOptions::new()
            .max_connections(opts.max_connections.max(1))
            .connect_with(connect.clone())
            .await?;
        let mut migrator = sqlx::migrate!("../../migrations/sqlite");
        migrator.set_ignore_missing(shared::newer_schema(&pool, &migrator).await?);
        migrator
            .run(&pool)
            .await
            .map_err(|e| StoreError::Unavailable(format!("migrations: {e}")))?;
        let conn = connect.connect().await?;
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(writer_loop(conn, rx, opts.max_batch.max(1)));
        let (events_tx, _) = broadcast::channel(4096);
        Ok(Self {
            pool,
            writer: tx,
            ids: Ids::new(clock.clone()),
            clock,
            events_tx,
            notify: Arc::new(Notify::new()),
            _using: using,
        })
    }

    /// Runs `f` inside the writer's transaction and returns its result once committed.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> OpFuture<'c, T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<T>>();
        let work: Work = Box::new(move |conn| {
            Box::pin(async move {
                let r = match conn {
                    Ok(conn) => f(conn).await,
                    Err(msg) => Err(StoreError::Unavailable(msg)),
                };
                let fate = match &r {
                    Ok(_) => Fate::Done,
                    Err(e @ (StoreError::Unavailable(_) | StoreError::Corrupt(_))) => {
                        Fate::Fatal(e.to_string())
                    }
                    Err(_) => Fate::Refused,
                };
                let reply: Reply = Box::new(move |commit_err| {
                    let out = match commit_err {
                        Some(e) => Err(StoreError::Unavailable(e)),
                        None => r,
                    };
                    let _ = tx.send(out);
                });
                (fate, reply)
            })
        });
        let gone = || StoreError::Unavailable("database writer stopped".into());
        self.writer.send(work).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    fn announce(&self, job_id: &str) {
        let _ = self.events_tx.send(job_id.to_string());
    }
}

/// The file a `sqlite:` database URL names, as sqlx reads it; `None` for in-memory databases,
/// `file:` URIs and URLs that are not SQLite's.
pub fn database_file(url: &str) -> Option<std::path::PathBuf> {
    if !url.starts_with("sqlite:") {
        return None;
    }
    let connect = SqliteConnectOptions::from_str(url).ok()?;
    file_of(&connect).map(std::path::Path::to_path_buf)
}

fn file_of(connect: &SqliteConnectOptions) -> Option<&std::path::Path> {
    let path = connect.get_filename();
    let name = path.to_string_lossy();
    (!(name.is_empty() || name == ":memory:" || name.starts_with("file:"))).then_some(path)
}

/// Creates the database file readable by its owner only (0600) when it does not exist yet; SQLite
/// gives its WAL and shared-memory files the database file's permissions. An existing file keeps
/// its permissions (an operator may have chosen them).
fn create_private(path: &std::path::Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(StoreError::Unavailable(format!(
                    "creating database `{}`: {e}",
                    path.display()
                )))
            }
        }
    }
    Ok(())
}

/// Runs one statement of the writer's own (BEGIN, COMMIT, ROLLBACK). Boxed with an explicit `Send`
/// so the spawned writer future does not trip over sqlx's higher-ranked `Executor` bounds.
fn exec_raw<'c>(
    conn: &'c mut SqliteConnection,
    sql: &'static str,
) -> Pin<Box<dyn Future<Output = std::result::Result<(), sqlx::Error>> + Send + 'c>> {
    Box::pin(async move { sqlx::query(sql).execute(conn).await.map(|_| ()) })
}

async fn writer_loop(mut conn: SqliteConnection, mut rx: mpsc::Receiver<Work>, max_batch: usize) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(w) => batch.push(w),
                Err(_) => break,
            }
        }
        if let Err(e) = exec_raw(&mut conn, "BEGIN IMMEDIATE").await {
            let msg = e.to_string();
            tracing::warn!(error = %msg, "could not begin write transaction");
            for w in batch {
                let (_, reply) = w(Err(msg.clone())).await;
                reply(None);
            }
            continue;
        }
        let mut replies: Vec<Reply> = Vec::with_capacity(batch.len());
        let mut fatal: Option<String> = None;
        for w in batch {
            if let Some(msg) = &fatal {
                // The batch is lost; do not run the rest against a transaction in doubt.
                let (_, reply) = w(Err(msg.clone())).await;
                replies.push(reply);
                continue;
            }
            let (fate, reply) = w(Ok(&mut conn)).await;
            if let Fate::Fatal(msg) = fate {
                fatal = Some(msg);
            }
            replies.push(reply);
        }
        let commit_err = match fatal {
            Some(msg) => {
                let _ = exec_raw(&mut conn, "ROLLBACK").await;
                tracing::warn!(error = %msg, "write failed; batch rolled back");
                Some(msg)
            }
            None => match exec_raw(&mut conn, "COMMIT").await {
                Ok(_) => None,
                Err(e) => {
                    let _ = exec_raw(&mut conn, "ROLLBACK").await;
                    tracing::warn!(error = %e, "commit failed");
                    Some(e.to_string())
                }
            },
        };
        for r in replies {
            r(commit_err.clone());
        }
    }
}

/// Claims the `?4` due queued jobs of the highest priority, the one due first among equals.
/// `INDEXED BY jobs_claim_priority` pins the partial index on (priority DESC, run_after, id): left
/// to itself the planner picks `jobs_state_id` for `state = 'queued'` and sorts every queued job in
/// a temporary B-tree on each claim, which made claiming O(queue) (339 claims/s with 20,000 queued,
/// measured by `benches/daemon.rs`). A test checks the plan.
const CLAIM: &str = "UPDATE jobs SET state = 'running', lease_owner = ?1, lease_expires_at = ?2, \
     attempts = attempts + 1, started_at = COALESCE(started_at, ?3), updated_at = ?3 \
     WHERE id IN (SELECT id FROM jobs INDEXED BY jobs_claim_priority \
                  WHERE state = 'queued' AND run_after <= ?3 \
                  ORDER BY priority DESC, run_after, id LIMIT ?4)";

/// When the next queued job is due (idle workers ask on each idle loop): the first entry of
/// `jobs_claim`, not a scan of the queued jobs.
const NEXT_RUN_AFTER: &str =
    "SELECT MIN(run_after) AS t FROM jobs INDEXED BY jobs_claim WHERE state = 'queued'";

/// Finished jobs created before `?1` (an id) that have left the outbox: what retention deletes.
/// Walks `jobs_state_id` over the three final states' id ranges.
const PRUNABLE: &str =
    "INDEXED BY jobs_state_id WHERE state IN ('succeeded', 'failed', 'cancelled') \
    AND id < ?1 AND outbox_done_at IS NOT NULL";

fn claimed_from_row(row: &SqliteRow) -> Result<Claimed> {
    ClaimedRow::from_row(row)?.into_claimed()
}

/// Records in the audit log that `by` changed `(what, name, change)`.
async fn add_audit(
    conn: &mut SqliteConnection,
    at: i64,
    by: &str,
    (what, name, change): (&str, &str, &str),
) -> Result<()> {
    sqlx::query("INSERT INTO audit_log (at, actor, what, name, change) VALUES (?, ?, ?, ?, ?)")
        .bind(at)
        .bind(by)
        .bind(what)
        .bind(name)
        .bind(change)
        .execute(conn)
        .await?;
    Ok(())
}

same_sql!(reads of SqliteStore, sqlx::Sqlite, shared::Dialect::Sqlite);

#[async_trait]
impl Queue for SqliteStore {
    async fn enqueue(&self, new: NewJob) -> Result<Enqueued> {
        let id = self.ids.next();
        let clock = self.clock.clone();
        let out = self
            .write(move |conn| {
                Box::pin(async move {
                    let spec_json = encode(&new.spec);
                    let hash = spec_hash(&new.spec, &spec_json);
                    if let Some(key) = &new.idempotency_key {
                        let row = sqlx::query(
                            "SELECT id, request_hash FROM jobs WHERE idempotency_key = ?",
                        )
                        .bind(key)
                        .fetch_optional(&mut *conn)
                        .await?;
                        if let Some(row) = row {
                            let existing: String = row.try_get("id")?;
                            let existing_hash: Option<String> = row.try_get("request_hash")?;
                            if existing_hash.as_deref() != Some(hash.as_str()) {
                                return Err(StoreError::IdempotencyConflict { job_id: existing });
                            }
                            let job = load_job(conn, &existing).await?.ok_or_else(|| {
                                StoreError::Corrupt(format!("job {existing} vanished"))
                            })?;
                            return Ok(Enqueued::Replayed(job));
                        }
                    }
                    let now = clock.now_ms();
                    let progress = shared::queued_progress();
                    sqlx::query(
                        "INSERT INTO jobs (id, state, action, spec, idempotency_key, request_hash, \
                         created_at, updated_at, max_attempts, run_after, timeout_ms, progress, \
                         priority, created_by) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    )
                    .bind(&id)
                    .bind(new.spec.action.as_str())
                    .bind(&spec_json)
                    .bind(&new.idempotency_key)
                    .bind(&hash)
                    .bind(now)
                    .bind(now)
                    .bind(new.max_attempts as i64)
                    .bind(now)
                    .bind(new.timeout_ms)
                    .bind(encode(&progress))
                    .bind(new.spec.priority.unwrap_or(0))
                    .bind(&new.created_by)
                    .execute(&mut *conn)
                    .await?;
                    let (kind, message, data) = shared::queued_event(&new);
                    let by = new.created_by.as_deref();
                    add_event_by(conn, &id, now, (kind, &message, &data), by).await?;
                    Ok(Enqueued::Created(shared::created_job(
                        id, new, now, progress,
                    )))
                })
            })
            .await?;
        if let Enqueued::Created(job) = &out {
            self.announce(&job.id);
            self.notify.notify_one();
        }
        Ok(out)
    }

    async fn get(&self, id: &str) -> Result<Option<Job>> {
        let mut conn = self.pool.acquire().await?;
        load_job(&mut conn, id).await
    }

    async fn list(&self, q: ListQuery) -> Result<Page> {
        self.read_list(q).await
    }

    async fn cancel(&self, id: &str, by: &str) -> Result<Option<CancelOutcome>> {
        let (id, by) = (id.to_string(), by.to_string());
        let clock = self.clock.clone();
        let out = self
            .write(move |conn| {
                Box::pin(async move {
                    let Some(job) = load_job(conn, &id).await? else {
                        return Ok(None);
                    };
                    let now = clock.now_ms();
                    match job.state {
                        JobState::Queued => {
                            sqlx::query(
                                "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, \
                                 progress = ? WHERE id = ?",
                            )
                            .bind(now)
                            .bind(now)
                            .bind(encode(&shared::cancelled_progress()))
                            .bind(&id)
                            .execute(&mut *conn)
                            .await?;
                            let ev = ("cancelled", "cancelled while queued", &Value::Null);
                                add_event_by(conn, &id, now, ev, Some(&by)).await?;
                            let job = load_job(conn, &id).await?.unwrap_or(job);
                            Ok(Some(CancelOutcome::Cancelled(job)))
                        }
                        JobState::Running => {
                            if !job.cancel_requested {
                                sqlx::query(
                                    "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?",
                                )
                                .bind(now)
                                .bind(&id)
                                .execute(&mut *conn)
                                .await?;
                                let ev = ("cancel_requested", shared::CANCEL_REQUESTED, &Value::Null);
                                add_event_by(conn, &id, now, ev, Some(&by)).await?;
                            }
                            let job = load_job(conn, &id).await?.unwrap_or(job);
                            Ok(Some(CancelOutcome::Requested(job)))
                        }
                        _ => Ok(Some(CancelOutcome::AlreadyFinished(job))),
                    }
                })
            })
            .await?;
        if let Some(CancelOutcome::Cancelled(j) | CancelOutcome::Requested(j)) = &out {
            self.announce(&j.id);
        }
        Ok(out)
    }

    async fn claim(&self, worker: &str, lease_ms: i64, n: u32) -> Result<Vec<Claimed>> {
        let worker = worker.to_string();
        let clock = self.clock.clone();
        let claimed = self
            .write(move |conn| {
                Box::pin(async move {
                    let now = clock.now_ms();
                    let rows = sqlx::query(&format!("{CLAIM} RETURNING {JOB_COLS}, wait_outcome"))
                        .bind(&worker)
                        .bind(now + lease_ms)
                        .bind(now)
                        .bind(n as i64)
                        .fetch_all(&mut *conn)
                        .await?;
                    let mut out = Vec::with_capacity(rows.len());
                    for row in &rows {
                        out.push(claimed_from_row(row)?);
                    }
                    // The claimed jobs' events in one statement.
                    let said: Vec<_> = out
                        .iter()
                        .map(|c| shared::claim_event(c, &worker))
                        .collect();
                    let events: Vec<_> = out
                        .iter()
                        .zip(&said)
                        .map(|(c, (kind, message, data))| {
                            (c.job.id.as_str(), *kind, message.as_str(), data)
                        })
                        .collect();
                    add_events(conn, now, &events).await?;
                    Ok(out)
                })
            })
            .await?;
        for c in &claimed {
            self.announce(&c.job.id);
        }
        Ok(claimed)
    }

    async fn heartbeat(&self, id: &str, worker: &str, lease_ms: i64) -> Result<Heartbeat> {
        let (id, worker) = (id.to_string(), worker.to_string());
        let clock = self.clock.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let now = clock.now_ms();
                let row = sqlx::query(
                    "UPDATE jobs SET lease_expires_at = ?, updated_at = ? \
                     WHERE id = ? AND lease_owner = ? AND state = 'running' RETURNING cancel_requested",
                )
                .bind(now + lease_ms)
                .bind(now)
                .bind(&id)
                .bind(&worker)
                .fetch_optional(conn)
                .await?;
                match row {
                    Some(r) => Ok(Heartbeat {
                        cancel_requested: r.try_get::<i64, _>("cancel_requested")? != 0,
                    }),
                    None => Err(StoreError::LeaseLost),
                }
            })
        })
        .await
    }

    async fn progress(
        &self,
        id: &str,
        worker: &str,
        progress: Progress,
        event: NewEvent,
    ) -> Result<()> {
        let (job_id, worker) = (id.to_string(), worker.to_string());
        let clock = self.clock.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let now = clock.now_ms();
                let n = sqlx::query(
                    "UPDATE jobs SET progress = ?, updated_at = ? \
                     WHERE id = ? AND lease_owner = ? AND state = 'running'",
                )
                .bind(encode(&progress))
                .bind(now)
                .bind(&job_id)
                .bind(&worker)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err(StoreError::LeaseLost);
                }
                add_event(conn, &job_id, now, &event.kind, &event.message, &event.data).await
            })
        })
        .await?;
        self.announce(id);
        Ok(())
    }

    async fn checkpoint(&self, id: &str, worker: &str, state: Value) -> Result<()> {
        let (id, worker) = (id.to_string(), worker.to_string());
        self.write(move |conn| {
            Box::pin(async move {
                let n = sqlx::query(
                    "UPDATE jobs SET checkpoint = ? WHERE id = ? AND lease_owner = ? AND state = 'running'",
                )
                .bind(encode(&state))
                .bind(&id)
                .bind(&worker)
                .execute(conn)
                .await?
                .rows_affected();
                if n == 0 {
                    Err(StoreError::LeaseLost)
                } else {
                    Ok(())
                }
            })
        })
        .await
    }

    async fn finish_with(
        &self,
        id: &str,
        worker: &str,
        outcome: Finish,
        last: Option<Progress>,
    ) -> Result<Job> {
        let (job_id, worker) = (id.to_string(), worker.to_string());
        let last = last.as_ref().map(encode);
        let clock = self.clock.clone();
        let retry = matches!(outcome, Finish::Retry { .. });
        let job = self
            .write(move |conn| {
                Box::pin(async move {
                    let now = clock.now_ms();
                    let n = match &outcome {
                        Finish::Retry {
                            error,
                            run_after_ms,
                            refund,
                        } => {
                            sqlx::query(
                                "UPDATE jobs SET state = 'queued', run_after = ?, error = ?, updated_at = ?, \
                                 lease_owner = NULL, lease_expires_at = NULL, progress = ?, \
                                 max_attempts = max_attempts + ?, wait_outcome = NULL \
                                 WHERE id = ? AND lease_owner = ? AND state = 'running'",
                            )
                            .bind(run_after_ms)
                            .bind(encode(error))
                            .bind(now)
                            .bind(encode(&shared::retry_progress(error, *run_after_ms)))
                            .bind(i64::from(*refund))
                            .bind(&job_id)
                            .bind(&worker)
                            .execute(&mut *conn)
                            .await?
                            .rows_affected()
                        }
                        Finish::Succeeded(results)
                        | Finish::Failed(_, results)
                        | Finish::Cancelled(results) => {
                            let (state, error) =
                                shared::final_state(&outcome).unwrap_or(("failed", None));
                            sqlx::query(
                                "UPDATE jobs SET state = ?, finished_at = ?, updated_at = ?, error = ?, \
                                 results = ?, lease_owner = NULL, lease_expires_at = NULL, \
                                 progress = COALESCE(?, json_set(progress, '$.phase', 'done')) \
                                 WHERE id = ? AND lease_owner = ? AND state = 'running'",
                            )
                            .bind(state)
                            .bind(now)
                            .bind(now)
                            .bind(error)
                            .bind(encode(results))
                            .bind(&last)
                            .bind(&job_id)
                            .bind(&worker)
                            .execute(&mut *conn)
                            .await?
                            .rows_affected()
                        }
                    };
                    if n == 0 {
                        return Err(StoreError::LeaseLost);
                    }
                    let (kind, message, data) = shared::finish_event(&outcome, now);
                    add_event(conn, &job_id, now, kind, &message, &data).await?;
                    load_job(conn, &job_id)
                        .await?
                        .ok_or_else(|| StoreError::Corrupt(format!("job {job_id} vanished")))
                })
            })
            .await?;
        self.announce(id);
        if retry {
            self.notify.notify_one();
        }
        Ok(job)
    }

    async fn release(&self, id: &str, worker: &str) -> Result<()> {
        let (job_id, worker) = (id.to_string(), worker.to_string());
        let clock = self.clock.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let now = clock.now_ms();
                let n = sqlx::query(
                    "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), run_after = ?, \
                     updated_at = ?, lease_owner = NULL, lease_expires_at = NULL \
                     WHERE id = ? AND lease_owner = ? AND state = 'running'",
                )
                .bind(now)
                .bind(now)
                .bind(&job_id)
                .bind(&worker)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err(StoreError::LeaseLost);
                }
                add_event(
                    conn,
                    &job_id,
                    now,
                    "requeued",
                    shared::RELEASED,
                    &Value::Null,
                )
                .await
            })
        })
        .await?;
        self.announce(id);
        self.notify.notify_one();
        Ok(())
    }

    async fn requeue_expired(&self) -> Result<u64> {
        // A re-queued job keeps its due time: work that was under way (a dead replica's parked
        // waits among it) goes on ahead of queued jobs of its priority that have not started.
        let clock = self.clock.clone();
        let ids = self
            .write(move |conn| {
                Box::pin(async move {
                    let now = clock.now_ms();
                    let expired = shared::lease_expired_error();
                    let rows = sqlx::query(
                        "UPDATE jobs SET \
                           state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'queued' END, \
                           finished_at = CASE WHEN attempts >= max_attempts THEN ?1 ELSE NULL END, \
                           error = CASE WHEN attempts >= max_attempts THEN ?2 ELSE error END, \
                           lease_owner = NULL, lease_expires_at = NULL, updated_at = ?1 \
                         WHERE state = 'running' AND lease_expires_at < ?1 RETURNING id, state",
                    )
                    .bind(now)
                    .bind(&expired)
                    .fetch_all(&mut *conn)
                    .await?;
                    let mut ids = Vec::with_capacity(rows.len());
                    for row in rows {
                        let id: String = row.try_get("id")?;
                        let state: String = row.try_get("state")?;
                        let (kind, msg) = shared::expired_event(&state);
                        add_event(conn, &id, now, kind, msg, &Value::Null).await?;
                        ids.push(id);
                    }
                    Ok(ids)
                })
            })
            .await?;
        for id in &ids {
            self.announce(id);
        }
        if !ids.is_empty() {
            self.notify.notify_one();
        }
        Ok(ids.len() as u64)
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
        let (job_id, worker, lot) = (id.to_string(), worker.to_string(), lot.to_string());
        let clock = self.clock.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let now = clock.now_ms();
                let n = sqlx::query(
                    "UPDATE jobs SET checkpoint = ?, progress = ?, wait_outcome = NULL, \
                     lease_owner = ?, lease_expires_at = ?, updated_at = ? \
                     WHERE id = ? AND lease_owner = ? AND state = 'running'",
                )
                .bind(encode(&checkpoint))
                .bind(encode(&progress))
                .bind(&lot)
                .bind(now + lease_ms)
                .bind(now)
                .bind(&job_id)
                .bind(&worker)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err(StoreError::LeaseLost);
                }
                let data = json!({"lot": lot, "phase": progress.phase});
                add_event(conn, &job_id, now, "parked", &progress.message, &data).await
            })
        })
        .await?;
        self.announce(id);
        Ok(())
    }

    async fn unpark(&self, id: &str, lot: &str, outcome: Value, message: &str) -> Result<()> {
        let (job_id, lot, message) = (id.to_string(), lot.to_string(), message.to_string());
        let clock = self.clock.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let now = clock.now_ms();
                // `run_after` stays the job's first due time: a job that has waited goes on ahead
                // of jobs of its priority that have not started.
                let n = sqlx::query(
                    "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - 1, 0), \
                     wait_outcome = ?, lease_owner = NULL, lease_expires_at = NULL, updated_at = ? \
                     WHERE id = ? AND lease_owner = ? AND state = 'running'",
                )
                .bind(encode(&outcome))
                .bind(now)
                .bind(&job_id)
                .bind(&lot)
                .execute(&mut *conn)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err(StoreError::LeaseLost);
                }
                add_event(conn, &job_id, now, "wait_ended", &message, &Value::Null).await
            })
        })
        .await?;
        self.announce(id);
        self.notify.notify_one();
        Ok(())
    }

    async fn renew_lot(&self, lot: &str, lease_ms: i64) -> Result<Vec<(String, bool)>> {
        let lot = lot.to_string();
        let clock = self.clock.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let now = clock.now_ms();
                let rows = sqlx::query(
                    "UPDATE jobs INDEXED BY jobs_lease_owner SET lease_expires_at = ? \
                     WHERE lease_owner = ? AND state = 'running' RETURNING id, cancel_requested",
                )
                .bind(now + lease_ms)
                .bind(&lot)
                .fetch_all(conn)
                .await?;
                let mut held = Vec::with_capacity(rows.len());
                for r in rows {
                    held.push((
                        r.try_get("id")?,
                        r.try_get::<i64, _>("cancel_requested")? != 0,
                    ));
                }
                Ok(held)
            })
        })
        .await
    }

    async fn release_lot(&self, lot: &str) -> Result<u64> {
        let lot = lot.to_string();
        let clock = self.clock.clone();
        let ids = self
            .write(move |conn| {
                Box::pin(async move {
                    let now = clock.now_ms();
                    let rows = sqlx::query(
                        "UPDATE jobs INDEXED BY jobs_lease_owner SET state = 'queued', \
                         attempts = MAX(attempts - 1, 0), run_after = ?1, updated_at = ?1, \
                         lease_owner = NULL, lease_expires_at = NULL \
                         WHERE lease_owner = ?2 AND state = 'running' RETURNING id",
                    )
                    .bind(now)
                    .bind(&lot)
                    .fetch_all(&mut *conn)
                    .await?;
                    let mut ids = Vec::with_capacity(rows.len());
                    let (kind, message, data) = shared::lot_released();
                    for row in rows {
                        let id: String = row.try_get("id")?;
                        add_event(conn, &id, now, kind, &message, &data).await?;
                        ids.push(id);
                    }
                    Ok(ids)
                })
            })
            .await?;
        for id in &ids {
            self.announce(id);
        }
        Ok(ids.len() as u64)
    }

    async fn events(&self, id: &str, after_seq: i64, limit: u32) -> Result<Vec<JobEvent>> {
        self.read_events(id, after_seq, limit).await
    }

    async fn next_run_after(&self) -> Result<Option<i64>> {
        let row = sqlx::query(NEXT_RUN_AFTER).fetch_one(&self.pool).await?;
        Ok(row.try_get("t")?)
    }

    async fn queued(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE state = 'queued'")
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

    async fn ping(&self) -> Result<()> {
        let clock = self.clock.clone();
        self.write(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "INSERT INTO meta (key, value) VALUES ('last_ping', ?) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .bind(clock.now_ms().to_string())
                .execute(conn)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn note(&self, id: &str, ev: NewEvent) -> Result<()> {
        let (job_id, clock) = (id.to_string(), self.clock.clone());
        let jid = job_id.clone();
        self.write(move |conn| {
            Box::pin(async move {
                add_event(conn, &jid, clock.now_ms(), &ev.kind, &ev.message, &ev.data).await
            })
        })
        .await?;
        self.announce(&job_id);
        Ok(())
    }

    async fn outbox(&self, now_ms: i64, limit: u32) -> Result<Vec<(Job, u32)>> {
        self.read_outbox(now_ms, limit).await
    }

    async fn outbox_done(&self, done: Vec<(String, Option<NewEvent>)>) -> Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let clock = self.clock.clone();
        let noted: Vec<String> = done
            .iter()
            .filter(|(_, ev)| ev.is_some())
            .map(|(id, _)| id.clone())
            .collect();
        self.write(move |conn| {
            Box::pin(async move { mark_outbox_done(conn, clock.now_ms(), &done).await })
        })
        .await?;
        for id in noted {
            self.announce(&id);
        }
        Ok(())
    }

    async fn outbox_retry(&self, id: &str, after_ms: i64) -> Result<()> {
        let id = id.to_string();
        self.write(move |conn| {
            Box::pin(async move {
                sqlx::query(
                    "UPDATE jobs SET outbox_tries = outbox_tries + 1, outbox_after = ? WHERE id = ?",
                )
                .bind(after_ms)
                .bind(&id)
                .execute(conn)
                .await?;
                Ok(())
            })
        })
        .await
    }

    async fn prune_jobs(&self, created_before_ms: i64, limit: u32, dry_run: bool) -> Result<u64> {
        // Ids are ULIDs of the creation time: "created before" is an id range of the state index.
        let before = ulid::Ulid::from_parts(created_before_ms.max(0) as u64, 0).to_string();
        if dry_run {
            let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM jobs {PRUNABLE}"))
                .bind(&before)
                .fetch_one(&self.pool)
                .await?;
            return Ok(n as u64);
        }
        self.write(move |conn| {
            Box::pin(async move {
                let n = sqlx::query(&format!(
                    "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs {PRUNABLE} LIMIT ?2)"
                ))
                .bind(&before)
                .bind(i64::from(limit))
                .execute(conn)
                .await?
                .rows_affected();
                Ok(n)
            })
        })
        .await
    }

    fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events_tx.subscribe()
    }

    fn work_available(&self) -> Arc<Notify> {
        self.notify.clone()
    }
}

#[async_trait]
impl Documents for SqliteStore {
    async fn put_named(&self, kind: Named, name: &str, body: Value, by: &str) -> Result<bool> {
        let (name, clock, table) = (name.to_string(), self.clock.clone(), kind.table());
        let by = by.to_string();
        self.write(move |conn| {
            Box::pin(async move {
                let now = clock.now_ms();
                let existed: Option<i64> =
                    sqlx::query_scalar(&format!("SELECT created_at FROM {table} WHERE name = ?"))
                        .bind(&name)
                        .fetch_optional(&mut *conn)
                        .await?;
                sqlx::query(&format!(
                    "INSERT INTO {table} (name, body, created_at, updated_at) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (name) DO UPDATE SET body = excluded.body, updated_at = excluded.updated_at"
                ))
                .bind(&name)
                .bind(encode(&body))
                .bind(now)
                .bind(now)
                .execute(&mut *conn)
                .await?;
                let change = if existed.is_none() { "created" } else { "replaced" };
                add_audit(conn, now, &by, (kind.noun(), &name, change)).await?;
                Ok(existed.is_none())
            })
        })
        .await
    }

    async fn get_named(&self, kind: Named, name: &str) -> Result<Option<Value>> {
        let body: Option<String> =
            sqlx::query_scalar(&format!("SELECT body FROM {} WHERE name = ?", kind.table()))
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        body.map(|b| serde_json::from_str(&b).map_err(|e| StoreError::Corrupt(e.to_string())))
            .transpose()
    }

    async fn list_named(&self, kind: Named) -> Result<Vec<(String, Value)>> {
        let rows = sqlx::query(&format!(
            "SELECT name, body FROM {} ORDER BY name",
            kind.table()
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let body: String = r.try_get("body")?;
                Ok((
                    r.try_get("name")?,
                    serde_json::from_str(&body).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                ))
            })
            .collect()
    }

    async fn named_stamp(&self, kind: Named) -> Result<(i64, i64, i64)> {
        Ok(sqlx::query_as(&crate::shared::named_stamp_sql(kind))
            .fetch_one(&self.pool)
            .await?)
    }

    async fn delete_named(&self, kind: Named, name: &str, by: &str) -> Result<bool> {
        let (name, table, by) = (name.to_string(), kind.table(), by.to_string());
        let clock = self.clock.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let n = sqlx::query(&format!("DELETE FROM {table} WHERE name = ?"))
                    .bind(&name)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                if n > 0 {
                    let at = clock.now_ms();
                    add_audit(conn, at, &by, (kind.noun(), &name, "deleted")).await?;
                }
                Ok(n > 0)
            })
        })
        .await
    }
}

same_sql!(impl Tokens for SqliteStore {
    async fn create_token(
        &self,
        name: &str,
        role: Role,
        sha256_hex: &str,
        scopes: &Scopes,
        by: &str,
    ) -> Result<TokenInfo> {
        let (name, hash, scopes) = (name.to_string(), sha256_hex.to_string(), scopes.clone());
        let by = by.to_string();
        let clock = self.clock.clone();
        self.write(move |conn| {
            Box::pin(async move {
                let now = clock.now_ms();
                let r = sqlx::query(
                    "INSERT INTO api_tokens (name, role, token_sha256, created_at, scopes) \
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&name)
                .bind(role.as_str())
                .bind(&hash)
                .bind(now)
                .bind((!scopes.is_empty()).then(|| encode(&scopes)))
                .execute(&mut *conn)
                .await;
                if r.is_ok() {
                    add_audit(conn, now, &by, ("token", &name, "created")).await?;
                }
                match r {
                    Ok(_) => Ok(TokenInfo {
                        name,
                        role,
                        created_at: ts(now),
                        scopes,
                    }),
                    Err(sqlx::Error::Database(d)) if d.is_unique_violation() => Err(
                        StoreError::Conflict(format!("a token named `{name}` already exists")),
                    ),
                    Err(e) => Err(e.into()),
                }
            })
        })
        .await
    }

    async fn revoke_token(&self, name: &str, by: &str) -> Result<bool> {
        let (name, by, clock) = (name.to_string(), by.to_string(), self.clock.clone());
        self.write(move |conn| {
            Box::pin(async move {
                let n = sqlx::query("DELETE FROM api_tokens WHERE name = ?")
                    .bind(&name)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                if n > 0 {
                    let at = clock.now_ms();
                    add_audit(conn, at, &by, ("token", &name, "revoked")).await?;
                }
                Ok(n > 0)
            })
        })
        .await
    }
});

same_sql!(impl AuditLog for SqliteStore);

same_sql!(impl Deliveries for SqliteStore, shared::Dialect::Sqlite, {
    async fn prune_deliveries(&self, before_ms: i64, limit: u32, dry_run: bool) -> Result<u64> {
        if dry_run {
            // Deliveries are stored in arrival order: the old ones are the lowest ids.
            let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM sns_deliveries WHERE at < ?")
                .bind(before_ms)
                .fetch_one(&self.pool)
                .await?;
            return Ok(n as u64);
        }
        self.write(move |conn| {
            Box::pin(async move {
                let n = sqlx::query(
                    "DELETE FROM sns_deliveries WHERE id IN \
                     (SELECT id FROM sns_deliveries ORDER BY id LIMIT ?1) AND at < ?2",
                )
                .bind(i64::from(limit))
                .bind(before_ms)
                .execute(conn)
                .await?
                .rows_affected();
                Ok(n)
            })
        })
        .await
    }

});

#[async_trait]
impl Leadership for SqliteStore {
    async fn lead(&self, _name: &str, _ttl_ms: i64) -> Result<bool> {
        // One process owns a SQLite queue (its lock file says so): it always leads.
        Ok(true)
    }

    async fn resign(&self, _name: &str) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// `ec2jobd doctor`'s look at a SQLite database, changing nothing: it must exist, every migration
/// this build knows must be applied, and a write transaction must be possible (`BEGIN IMMEDIATE`,
/// then rolled back).
pub async fn check(url: &str) -> Result<crate::DbCheck> {
    let connect = SqliteConnectOptions::from_str(url)
        .map_err(|e| StoreError::Unavailable(format!("database url `{url}`: {e}")))?
        .create_if_missing(false);
    if let Some(file) = file_of(&connect) {
        if !file.exists() {
            return Err(StoreError::Unavailable(format!(
                "{} does not exist",
                file.display()
            )));
        }
    }
    let mut conn = connect.connect().await?;
    let applied: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&mut conn)
        .await
        .unwrap_or(0);
    let writable = match sqlx::query("BEGIN IMMEDIATE").execute(&mut conn).await {
        Ok(_) => sqlx::query("ROLLBACK")
            .execute(&mut conn)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    Ok(crate::DbCheck {
        applied: applied as usize,
        known: MIGRATOR.iter().count(),
        writable,
    })
}

//! Group commit on PostgreSQL: concurrent writes of one kind — submissions ([`Ingest`]), a job's
//! final state ([`Finishes`]) — are gathered into one statement over arrays (`unnest`), so a burst
//! costs a round trip and a commit per batch, not per job. Each caller is answered only after its
//! batch committed: its durability point is unchanged. A few writers take turns: while one batch is
//! written the next gathers.
//!
//! A batch that fails is written again one row at a time, so each caller gets its own answer (a bad
//! row cannot fail its neighbours). Rows keep every guard of the single statement: a submission
//! whose idempotency key is another job's (an earlier batch, another replica, or a neighbour in the
//! same batch) is answered "not inserted" and its caller reads the job that holds it; a finish is
//! fenced per row by its worker's lease, and one whose lease is gone is answered "lost".
//! Must not: decide anything about idempotency or leases itself, or know HTTP.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

use super::hints;
use crate::row::JOB_COLS;
use crate::{Result, StoreError};

/// Most rows in one statement.
const MAX_BATCH: usize = 256;
/// Writers taking turns per kind (each holds a connection while it writes).
const WRITERS: usize = 3;

/// One kind of write that can be batched.
#[async_trait]
pub(crate) trait Batch: Send + Sync + 'static {
    /// What one caller writes.
    type Row: Send + Sync + 'static;
    /// What one caller is answered.
    type Out: Send + 'static;
    /// Writes `rows` in one statement; one answer per row, in order.
    async fn write(pool: &PgPool, rows: &[Self::Row]) -> Result<Vec<Self::Out>>;
}

type Ask<B> = (
    <B as Batch>::Row,
    oneshot::Sender<Result<<B as Batch>::Out>>,
);

/// The writers of one kind of batch.
pub(crate) struct Batcher<B: Batch> {
    tx: mpsc::Sender<Ask<B>>,
}

impl<B: Batch> Batcher<B> {
    /// Starts the writers on `pool`; their tasks end when the returned `Batcher` is dropped.
    pub(crate) fn start(pool: PgPool) -> (Self, Vec<JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let rx = Arc::new(Mutex::new(rx));
        let tasks = (0..WRITERS)
            .map(|_| tokio::spawn(writer::<B>(pool.clone(), rx.clone())))
            .collect();
        (Self { tx }, tasks)
    }

    /// Writes `row` with its batch and returns its answer.
    pub(crate) async fn write(&self, row: B::Row) -> Result<B::Out> {
        let closing = || StoreError::Unavailable("the store is closing".into());
        let (reply, answer) = oneshot::channel();
        self.tx.send((row, reply)).await.map_err(|_| closing())?;
        answer.await.map_err(|_| closing())?
    }
}

async fn writer<B: Batch>(pool: PgPool, rx: Arc<Mutex<mpsc::Receiver<Ask<B>>>>) {
    loop {
        let mut batch: Vec<Ask<B>> = Vec::new();
        {
            let mut rx = rx.lock().await;
            match rx.recv().await {
                Some(a) => batch.push(a),
                None => return,
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(a) => batch.push(a),
                    Err(_) => break,
                }
            }
        }
        let (rows, replies): (Vec<B::Row>, Vec<_>) = batch.into_iter().unzip();
        match B::write(&pool, &rows).await {
            Ok(outs) => {
                for (out, reply) in outs.into_iter().zip(replies) {
                    let _ = reply.send(Ok(out));
                }
            }
            Err(e) if rows.len() == 1 => {
                let _ = replies.into_iter().next().map(|r| r.send(Err(e)));
            }
            Err(_) => {
                for (row, reply) in rows.iter().zip(replies) {
                    let one = B::write(&pool, std::slice::from_ref(row)).await;
                    let _ = reply.send(one.and_then(|mut o| {
                        o.pop()
                            .ok_or_else(|| StoreError::Unavailable("no answer for the row".into()))
                    }));
                }
            }
        }
    }
}

/// Column `f` of every row, for an array parameter.
fn col<R, T>(rows: &[R], f: impl Fn(&R) -> T) -> Vec<T> {
    rows.iter().map(f).collect()
}

/// Submissions: the jobs whose keys are free, their first events, and one wake-up hint (sent at
/// commit) when any was inserted. Answers whether each row was inserted.
pub(crate) struct Ingest;

/// One job as inserted, with its first event.
pub(crate) struct NewRow {
    pub id: String,
    pub action: String,
    pub spec: String,
    pub idempotency_key: Option<String>,
    pub request_hash: String,
    pub now: i64,
    pub max_attempts: i32,
    pub timeout_ms: i64,
    pub progress: String,
    pub priority: i32,
    pub kind: String,
    pub message: String,
    pub data: String,
    pub created_by: Option<String>,
}

#[async_trait]
impl Batch for Ingest {
    type Row = NewRow;
    type Out = bool;

    async fn write(pool: &PgPool, rows: &[NewRow]) -> Result<Vec<bool>> {
        let ids: Vec<String> = sqlx::query_scalar(
        "WITH r AS ( \
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], \
             $6::int8[], $7::int4[], $8::int8[], $9::text[], $10::int4[], $11::text[], \
             $12::text[], $13::text[], $14::text[]) \
           AS t(id, action, spec, idempotency_key, request_hash, now, max_attempts, timeout_ms, \
             progress, priority, kind, message, data, created_by)), \
         job AS ( \
           INSERT INTO jobs (id, state, action, spec, idempotency_key, request_hash, \
             created_at, updated_at, max_attempts, run_after, timeout_ms, progress, priority, \
             created_by) \
           SELECT id, 'queued', action, spec, idempotency_key, request_hash, now, now, \
             max_attempts, now, timeout_ms, progress, priority, created_by FROM r \
           ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING \
           RETURNING id), \
         event AS ( \
           INSERT INTO job_events (job_id, at, kind, message, data, actor) \
           SELECT r.id, r.now, r.kind, r.message, r.data, r.created_by FROM r JOIN job USING (id)), \
         hint AS (SELECT pg_notify($15, '') FROM (SELECT 1 FROM job LIMIT 1) AS one) \
         SELECT job.id FROM job LEFT JOIN hint ON true",
    )
    .bind(col(rows, |r| r.id.clone()))
    .bind(col(rows, |r| r.action.clone()))
    .bind(col(rows, |r| r.spec.clone()))
    .bind(col(rows, |r| r.idempotency_key.clone()))
    .bind(col(rows, |r| r.request_hash.clone()))
    .bind(col(rows, |r| r.now))
    .bind(col(rows, |r| r.max_attempts))
    .bind(col(rows, |r| r.timeout_ms))
    .bind(col(rows, |r| r.progress.clone()))
    .bind(col(rows, |r| r.priority))
    .bind(col(rows, |r| r.kind.clone()))
    .bind(col(rows, |r| r.message.clone()))
    .bind(col(rows, |r| r.data.clone()))
    .bind(col(rows, |r| r.created_by.clone()))
    .bind(hints::JOBS_CHANNEL)
    .fetch_all(pool)
    .await?;
        let ids: HashSet<String> = ids.into_iter().collect();
        Ok(rows.iter().map(|r| ids.contains(&r.id)).collect())
    }
}

/// A job's final state (succeeded, failed, cancelled), fenced by its worker's lease.
pub(crate) struct FinalRow {
    pub id: String,
    pub worker: String,
    pub now: i64,
    pub state: String,
    pub error: Option<String>,
    pub results: String,
    /// The closing progress (none: the current one marked done).
    pub progress: Option<String>,
    pub kind: String,
    pub message: String,
    pub data: String,
}

/// Final states: each row's fenced update and its event. Answers each row's job as it is now
/// (`JOB_COLS`), or `None` when the worker no longer holds the job.
pub(crate) struct Finishes;

#[async_trait]
impl Batch for Finishes {
    type Row = FinalRow;
    type Out = Option<PgRow>;

    async fn write(pool: &PgPool, rows: &[FinalRow]) -> Result<Vec<Option<PgRow>>> {
        // The arrays' columns are named apart from the table's, so RETURNING names only jobs'.
        let done: Vec<PgRow> = sqlx::query(&format!(
            "WITH r AS ( \
               SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], \
                 $6::text[], $7::text[], $8::text[], $9::text[], $10::text[]) \
               AS t(r_id, r_worker, r_now, r_state, r_error, r_results, r_progress, r_kind, \
                 r_message, r_data)), \
             done AS ( \
               UPDATE jobs SET state = r_state, finished_at = r_now, updated_at = r_now, \
                 error = r_error, results = r_results, lease_owner = NULL, lease_expires_at = NULL, \
                 progress = COALESCE(r_progress, \
                   jsonb_set(progress::jsonb, '{{phase}}', '\"done\"')::text) \
               FROM r WHERE id = r_id AND lease_owner = r_worker AND state = 'running' \
               RETURNING {JOB_COLS}, updated_at), \
             event AS ( \
               INSERT INTO job_events (job_id, at, kind, message, data) \
               SELECT id, updated_at, r_kind, r_message, r_data FROM done JOIN r ON r_id = id) \
             SELECT done.* FROM done"
        ))
        .bind(col(rows, |r| r.id.clone()))
        .bind(col(rows, |r| r.worker.clone()))
        .bind(col(rows, |r| r.now))
        .bind(col(rows, |r| r.state.clone()))
        .bind(col(rows, |r| r.error.clone()))
        .bind(col(rows, |r| r.results.clone()))
        .bind(col(rows, |r| r.progress.clone()))
        .bind(col(rows, |r| r.kind.clone()))
        .bind(col(rows, |r| r.message.clone()))
        .bind(col(rows, |r| r.data.clone()))
        .fetch_all(pool)
        .await?;
        let mut by_id: HashMap<String, PgRow> = HashMap::new();
        for row in done {
            by_id.insert(row.try_get("id")?, row);
        }
        Ok(rows.iter().map(|r| by_id.remove(&r.id)).collect())
    }
}

//! Group commit of submissions on PostgreSQL: concurrent `enqueue`s are gathered into one
//! statement (one multi-row `INSERT … SELECT FROM unnest(…)` of the jobs, their first events and
//! one wake-up `NOTIFY`), so a burst of submissions costs a round trip and a commit per batch, not
//! per job. Each submission is answered only after its batch committed: its durability point is
//! unchanged. A few writers take turns: while one batch is written the next gathers.
//!
//! A batch that fails is written again one job at a time, so each submission gets its own answer
//! (a bad row cannot fail its neighbours). A key taken by another job (an earlier batch, another
//! replica, or a neighbour in the same batch) is answered "not inserted" and the caller reads the
//! job that holds it, as before.
//! Must not: decide anything about idempotency itself, or know HTTP.

use std::collections::HashSet;
use std::sync::Arc;

use sqlx::postgres::PgPool;
use tokio::sync::{mpsc, oneshot, Mutex};
use tokio::task::JoinHandle;

use super::hints;
use crate::{Result, StoreError};

/// Most jobs in one statement.
const MAX_BATCH: usize = 256;
/// Writers taking turns (each holds a connection while it writes).
const WRITERS: usize = 3;

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

type Ask = (NewRow, oneshot::Sender<Result<bool>>);

/// The submissions' writers.
pub(crate) struct Ingest {
    tx: mpsc::Sender<Ask>,
}

impl Ingest {
    /// Starts the writers on `pool`; their tasks end when the returned `Ingest` is dropped.
    pub(crate) fn start(pool: PgPool) -> (Self, Vec<JoinHandle<()>>) {
        let (tx, rx) = mpsc::channel(4 * MAX_BATCH);
        let rx = Arc::new(Mutex::new(rx));
        let tasks = (0..WRITERS)
            .map(|_| tokio::spawn(writer(pool.clone(), rx.clone())))
            .collect();
        (Self { tx }, tasks)
    }

    /// Inserts `row` (with its batch); false when its idempotency key is another job's.
    pub(crate) async fn insert(&self, row: NewRow) -> Result<bool> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((row, reply))
            .await
            .map_err(|_| StoreError::Unavailable("the store is closing".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Unavailable("the store is closing".into()))?
    }
}

async fn writer(pool: PgPool, rx: Arc<Mutex<mpsc::Receiver<Ask>>>) {
    loop {
        let mut batch: Vec<Ask> = Vec::new();
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
        let (rows, replies): (Vec<NewRow>, Vec<_>) = batch.into_iter().unzip();
        match insert_many(&pool, &rows).await {
            Ok(inserted) => {
                for (row, reply) in rows.iter().zip(replies) {
                    let _ = reply.send(Ok(inserted.contains(&row.id)));
                }
            }
            Err(e) if rows.len() == 1 => {
                let _ = replies.into_iter().next().map(|r| r.send(Err(e)));
            }
            Err(_) => {
                for (row, reply) in rows.iter().zip(replies) {
                    let one = insert_many(&pool, std::slice::from_ref(row)).await;
                    let _ = reply.send(one.map(|ids| ids.contains(&row.id)));
                }
            }
        }
    }
}

/// One statement: the jobs whose keys are free, their first events, and one wake-up hint (sent at
/// commit) when any was inserted. Returns the ids inserted.
async fn insert_many(pool: &PgPool, rows: &[NewRow]) -> Result<HashSet<String>> {
    fn col<T>(rows: &[NewRow], f: impl Fn(&NewRow) -> T) -> Vec<T> {
        rows.iter().map(f).collect()
    }
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
    Ok(ids.into_iter().collect())
}

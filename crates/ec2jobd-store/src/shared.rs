//! What both backends do alike, so a job's life reads the same on SQLite and PostgreSQL: job
//! ids, the stored JSON and request hash, the progress a transition leaves, and the event each
//! transition records (kind, sentence, detail); the job list query (built with sqlx's
//! `QueryBuilder`, which numbers placeholders per backend) and the page it makes; and the SQL both
//! write the same way, once: statements as constants, and `same_sql!`, which compiles one body for
//! each backend (`$N` placeholders bind on SQLite too). Where the dialects differ only in a clause
//! (an `INDEXED BY` hint, a JSON function), [`Dialect`] writes each.
//! Must not: hold a backend's own way of writing (SQLite's writer task, PostgreSQL's one-statement
//! CTEs, leases and hints stay in their modules).

use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use ec2jobd_spec::{Clock, Job, JobError, JobResults, JobState, Progress};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::row::{ts, JOB_COLS};
use crate::{Claimed, Finish, ListQuery, NewJob, Page};

/// Job ids: ULIDs of the store clock's time, increasing within a process.
pub(crate) struct Ids {
    clock: Arc<dyn Clock>,
    ulids: Mutex<ulid::Generator>,
}

impl Ids {
    pub(crate) fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            ulids: Mutex::new(ulid::Generator::new()),
        }
    }

    pub(crate) fn next(&self) -> String {
        let at = UNIX_EPOCH + Duration::from_millis(self.clock.now_ms().max(0) as u64);
        let mut g = self.ulids.lock().unwrap_or_else(|p| p.into_inner());
        match g.generate_from_datetime(at) {
            Ok(id) => id.to_string(),
            Err(_) => ulid::Ulid::from_datetime(at).to_string(),
        }
    }
}

/// JSON as stored (text).
pub(crate) fn encode<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// The SHA-256 of a normalised spec (`spec_json` is its encoding): what makes an idempotency key's
/// replay "the same request". The trace context is where the request came from, not what it asks
/// for, so a spec carrying one is hashed without it (the rest encode the same either way).
pub(crate) fn spec_hash(spec: &ec2jobd_spec::JobSpec, spec_json: &str) -> String {
    let digest = match spec.traceparent {
        None => Sha256::digest(spec_json.as_bytes()),
        Some(_) => Sha256::digest(
            encode(&ec2jobd_spec::JobSpec {
                traceparent: None,
                ..spec.clone()
            })
            .as_bytes(),
        ),
    };
    hex::encode(digest)
}

/// The smallest ULID of a millisecond (ids of jobs created at or after it sort at or after it).
pub(crate) fn id_bound(ms: i64) -> String {
    ulid::Ulid::from_parts(ms.max(0) as u64, 0).to_string()
}

/// A new job's progress.
/// The `meta` key a migration sets to its own version when daemons that do not know it cannot use
/// the schema it leaves (the *contract* step of expand/contract: a column dropped or renamed, a
/// meaning changed). Additive migrations (a table, a nullable column, an index) leave it alone,
/// so a daemon one release behind keeps working while a newer replica migrates the shared
/// database, and after a rollback.
pub(crate) const SCHEMA_REQUIRES: &str = "schema_requires";

/// Whether `migrator` (this build's migrations) must leave newer applied migrations alone on the
/// database behind `pool` (`set_ignore_missing`), or an error when this build must not use it
/// ([`schema_verdict`]). A database not migrated yet has neither table: nothing is newer.
pub(crate) async fn newer_schema<DB>(
    pool: &sqlx::Pool<DB>,
    migrator: &sqlx::migrate::Migrator,
) -> crate::Result<bool>
where
    DB: sqlx::Database,
    for<'c> &'c sqlx::Pool<DB>: sqlx::Executor<'c, Database = DB>,
    for<'q> <DB as sqlx::Database>::Arguments<'q>: sqlx::IntoArguments<'q, DB>,
    (i64,): for<'r> sqlx::FromRow<'r, DB::Row>,
    (String,): for<'r> sqlx::FromRow<'r, DB::Row>,
{
    let applied = sqlx::query_scalar::<DB, i64>(
        "SELECT version FROM _sqlx_migrations WHERE success ORDER BY version",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let requires = sqlx::query_scalar::<DB, String>(&format!(
        "SELECT value FROM meta WHERE key = '{SCHEMA_REQUIRES}'"
    ))
    .fetch_optional(pool)
    .await
    .ok()
    .flatten()
    .and_then(|v| v.trim().parse().ok());
    let known: Vec<i64> = migrator.iter().map(|m| m.version).collect();
    let newer =
        schema_verdict(&known, &applied, requires).map_err(crate::StoreError::Unavailable)?;
    if !newer.is_empty() {
        tracing::info!(
            ?newer,
            "the database has newer additive migrations; using it as it is"
        );
    }
    Ok(!newer.is_empty())
}

/// Whether a build that knows the migrations `known` may use a database with the migrations
/// `applied` and the [`SCHEMA_REQUIRES`] mark `requires`: the applied migrations it does not know
/// (newer, additive: left alone), or why it must not start.
pub(crate) fn schema_verdict(
    known: &[i64],
    applied: &[i64],
    requires: Option<i64>,
) -> std::result::Result<Vec<i64>, String> {
    let newest = known.iter().max().copied().unwrap_or(0);
    if let Some(r) = requires.filter(|r| !known.contains(r)) {
        return Err(format!(
            "the database's schema was changed by a newer ec2jobd in a way this one cannot use \
             (it requires migration {r}; this ec2jobd knows migrations up to {newest}): run that \
             version or a later one, or restore a backup taken before the upgrade (README \
             \"Upgrading\")"
        ));
    }
    Ok(applied
        .iter()
        .filter(|v| !known.contains(v))
        .copied()
        .collect())
}

pub(crate) fn queued_progress() -> Progress {
    Progress {
        phase: "queued".into(),
        message: "waiting for a worker".into(),
        ..Default::default()
    }
}

/// The job `enqueue` stored, as the API shows it.
pub(crate) fn created_job(id: String, new: NewJob, now: i64, progress: Progress) -> Job {
    Job {
        id,
        state: JobState::Queued,
        action: new.spec.action,
        spec: new.spec,
        created_at: ts(now),
        schedule: ec2jobd_spec::schedule::schedule_of(new.created_by.as_deref()),
        fired_at: ec2jobd_spec::schedule::fired_at(
            new.created_by.as_deref(),
            new.idempotency_key.as_deref(),
        ),
        created_by: new.created_by,
        started_at: None,
        finished_at: None,
        attempts: 0,
        max_attempts: new.max_attempts,
        next_attempt_at: None,
        cancel_requested: false,
        error: None,
        results: JobResults::default(),
        progress,
    }
}

/// A stored event: kind, sentence, detail.
pub(crate) type EventText = (&'static str, String, Value);

/// The event of a new job.
pub(crate) fn queued_event(new: &NewJob) -> EventText {
    (
        "queued",
        "job accepted".into(),
        json!({"action": new.spec.action}),
    )
}

/// A queued job's progress once cancelled.
pub(crate) fn cancelled_progress() -> Progress {
    Progress {
        phase: "done".into(),
        message: "cancelled before it started".into(),
        ..Default::default()
    }
}

/// The event of a claim: a start, or a resumption after a parked wait.
pub(crate) fn claim_event(c: &Claimed, worker: &str) -> EventText {
    let (kind, verb) = if c.waited.is_some() {
        ("resumed", "resumed after its wait")
    } else {
        ("started", "started")
    };
    (
        kind,
        format!(
            "attempt {} of {} {verb}",
            c.job.attempts, c.job.max_attempts
        ),
        json!({"attempt": c.job.attempts, "worker": worker}),
    )
}

/// A job's progress while it waits for its retry at `run_after_ms`.
pub(crate) fn retry_progress(error: &JobError, run_after_ms: i64) -> Progress {
    let message = if error.is_capacity() {
        format!(
            "EC2 has no capacity for it now ({}); trying again at {}",
            error.code,
            ts(run_after_ms).format("%H:%M:%S UTC")
        )
    } else {
        format!("retrying after transient error {}", error.code)
    };
    Progress {
        phase: "retry_wait".into(),
        message,
        ..Default::default()
    }
}

/// The final state a finish writes, with its error (`None` for a retry).
pub(crate) fn final_state(outcome: &Finish) -> Option<(&'static str, Option<String>)> {
    match outcome {
        Finish::Succeeded(_) => Some(("succeeded", None)),
        Finish::Failed(e, _) => Some(("failed", Some(encode(e)))),
        Finish::Cancelled(_) => Some(("cancelled", None)),
        Finish::Retry { .. } => None,
    }
}

/// The event of a finish.
pub(crate) fn finish_event(outcome: &Finish, now: i64) -> EventText {
    match outcome {
        Finish::Succeeded(r) => (
            "succeeded",
            r.summary.clone().unwrap_or_else(|| "job succeeded".into()),
            Value::Null,
        ),
        Finish::Failed(e, _) => (
            "failed",
            format!("{}: {}", e.code, e.message),
            json!({"error": e}),
        ),
        Finish::Cancelled(_) => ("cancelled", "job cancelled".into(), Value::Null),
        Finish::Retry {
            error,
            run_after_ms,
            ..
        } => (
            "retry_scheduled",
            format!(
                "{}: {}; next attempt in {} ms",
                error.code,
                error.message,
                (run_after_ms - now).max(0)
            ),
            json!({"error": error, "run_after": ts(*run_after_ms)}),
        ),
    }
}

/// The error of a job whose lease expired with no attempts left.
pub(crate) fn lease_expired_error() -> String {
    encode(&JobError {
        code: "LeaseExpired".into(),
        message: "the worker holding the job stopped answering and no attempts are left".into(),
        request_id: None,
    })
}

/// The event of a job whose lease expired, by the state it went to.
pub(crate) fn expired_event(state: &str) -> (&'static str, &'static str) {
    if state == "failed" {
        (
            "failed",
            "LeaseExpired: lease expired and no attempts are left",
        )
    } else {
        ("requeued", "lease expired; queued again")
    }
}

/// What changes when a named document is created, replaced or deleted (both backends): the
/// count, and the newest and the sum of their `updated_at`.
pub(crate) fn named_stamp_sql(kind: crate::Named) -> String {
    format!(
        "SELECT count(*), CAST(coalesce(max(updated_at), 0) AS BIGINT), \
         CAST(coalesce(sum(updated_at), 0) AS BIGINT) FROM {}",
        kind.table()
    )
}

pub(crate) const CANCEL_REQUESTED: &str =
    "cancel requested; the worker stops at its next step or wait";
pub(crate) const RELEASED: &str = "released at shutdown; resumes from its last checkpoint";
const LOT_RELEASED: &str = "released at shutdown while waiting; waits again after restart";

/// The event of a parked job given back at shutdown.
pub(crate) fn lot_released() -> EventText {
    ("requeued", LOT_RELEASED.into(), Value::Null)
}

/// How a backend writes a spec without its secret fields (every `SECRET_PARAMS` value of its
/// `params` and of each workflow step's), for a text search to look in: what every reader may see,
/// so a search cannot be asked about a secret one character at a time.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dialect {
    /// `json_remove(spec, '$.params.user_data', '$.steps[0].params.user_data', …)`.
    Sqlite,
    /// `spec::jsonb #- '{params,user_data}' #- '{steps,0,params,user_data}' …`.
    Postgres,
}

impl Dialect {
    /// The SQL expression: the stored spec as it is when it has no secret field (the cheap
    /// common case), else without them.
    pub(crate) fn searchable_spec(self) -> &'static str {
        static SQLITE: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| Dialect::Sqlite.write_searchable());
        static POSTGRES: std::sync::LazyLock<String> =
            std::sync::LazyLock::new(|| Dialect::Postgres.write_searchable());
        match self {
            Dialect::Sqlite => &SQLITE,
            Dialect::Postgres => &POSTGRES,
        }
    }

    /// Finished jobs not yet handed on, due by `$1`, oldest first (`$2` of them), with how many
    /// publishes failed (as a 64-bit integer on both).
    pub(crate) fn outbox_sql(self) -> String {
        let (hint, tries) = match self {
            Dialect::Sqlite => ("INDEXED BY jobs_outbox", "outbox_tries"),
            Dialect::Postgres => ("", "outbox_tries::bigint AS outbox_tries"),
        };
        format!(
            "SELECT {JOB_COLS}, {tries} FROM jobs {hint} \
             WHERE outbox_done_at IS NULL AND finished_at IS NOT NULL AND outbox_after <= $1 \
             ORDER BY outbox_after, id LIMIT $2"
        )
    }

    /// Counts a refusal (`$2` hook, `$3` code) into the newest row of its kind if that came at or
    /// after `$4`, at `$1`; answers that row.
    pub(crate) fn fold_refusal_sql(self) -> &'static str {
        match self {
            Dialect::Sqlite => {
                "UPDATE sns_deliveries SET count = count + 1, last_at = $1 WHERE id = \
                 (SELECT id FROM sns_deliveries INDEXED BY sns_deliveries_fold \
                  WHERE hook = $2 AND code = $3 AND outcome = 'rejected' \
                  ORDER BY id DESC LIMIT 1) AND at >= $4 RETURNING *"
            }
            Dialect::Postgres => {
                "UPDATE sns_deliveries SET count = count + 1, last_at = $1 WHERE id = \
                 (SELECT id FROM sns_deliveries WHERE hook = $2 AND code = $3 \
                  AND outcome = 'rejected' ORDER BY id DESC LIMIT 1) AND at >= $4 RETURNING *"
            }
        }
    }

    fn write_searchable(self) -> String {
        use ec2jobd_spec::{MAX_STEPS, SECRET_PARAMS};
        let mut paths: Vec<Vec<String>> = Vec::new();
        for key in SECRET_PARAMS {
            paths.push(vec!["params".into(), key.to_string()]);
            for i in 0..MAX_STEPS {
                paths.push(vec![
                    "steps".into(),
                    i.to_string(),
                    "params".into(),
                    key.to_string(),
                ]);
            }
        }
        let stripped = match self {
            Dialect::Sqlite => {
                let p: Vec<String> = paths
                    .iter()
                    .map(|p| match p.as_slice() {
                        [a, b] => format!("'$.{a}.{b}'"),
                        [a, i, b, c] => format!("'$.{a}[{i}].{b}.{c}'"),
                        _ => unreachable!("paths have two or four parts"),
                    })
                    .collect();
                format!("json_remove(spec, {})", p.join(", "))
            }
            Dialect::Postgres => {
                let p: String = paths
                    .iter()
                    .map(|p| format!(" #- '{{{}}}'", p.join(",")))
                    .collect();
                format!("((spec::jsonb){p})::text")
            }
        };
        let marks: Vec<String> = SECRET_PARAMS
            .iter()
            .map(|k| format!("spec LIKE '%\"{k}\"%'"))
            .collect();
        format!(
            "(CASE WHEN {} THEN {stripped} ELSE spec END)",
            marks.join(" OR ")
        )
    }
}

/// The `GET /v1/jobs` query for these filters, asking one row more than the page holds (so the
/// page knows whether there is a next one: [`page`]). A text search looks in what the dialect's
/// [`Dialect::searchable_spec`] leaves of each spec, and in the results.
pub(crate) fn list_query<'a, DB>(q: &'a ListQuery, dialect: Dialect) -> sqlx::QueryBuilder<'a, DB>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'a, DB> + sqlx::Type<DB>,
{
    let mut b = sqlx::QueryBuilder::new(format!("SELECT {JOB_COLS} FROM jobs WHERE 1 = 1"));
    if let Some(s) = q.state {
        b.push(" AND state = ").push_bind(s.as_str().to_string());
    }
    if let Some(a) = &q.action {
        b.push(" AND action = ").push_bind(a.clone());
    }
    if let Some(by) = &q.created_by {
        b.push(" AND created_by = ").push_bind(by.clone());
    }
    // Ids are ULIDs of the creation time: a time window is also an id range, which lets the
    // primary key find it instead of scanning every newer job for `created_at` (a second of
    // slack covers the id and created_at being read from the clock apart).
    if let Some(s) = q.since_ms {
        b.push(" AND created_at >= ").push_bind(s);
        b.push(" AND id >= ").push_bind(id_bound(s - 1000));
    }
    if let Some(u) = q.until_ms {
        b.push(" AND created_at < ").push_bind(u);
        b.push(" AND id < ").push_bind(id_bound(u + 1000));
    }
    if let Some(t) = &q.text {
        if t.len() == 26 && ulid::Ulid::from_string(t).is_ok() {
            // A job id: the primary key finds it.
            b.push(" AND id = ").push_bind(t.clone());
        } else {
            // Anything else is looked for in the spec and results of the newest SEARCH_SCAN jobs
            // (a scan: at 1,000,000 jobs the whole table would take seconds).
            let escaped: String = t
                .chars()
                .flat_map(|c| match c {
                    '%' | '_' | '\\' => vec!['\\', c],
                    c => vec![c],
                })
                .collect();
            let like = format!("%{escaped}%");
            b.push(" AND id >= COALESCE((SELECT id FROM jobs ORDER BY id DESC LIMIT 1 OFFSET ")
                .push_bind(SEARCH_SCAN - 1);
            b.push("), '')");
            b.push(format!(" AND ({} LIKE ", dialect.searchable_spec()))
                .push_bind(like.clone());
            b.push(" ESCAPE '\\' OR results LIKE ").push_bind(like);
            b.push(" ESCAPE '\\')");
        }
    }
    if let Some(before) = &q.before_id {
        b.push(" AND id < ").push_bind(before.clone());
    }
    b.push(" ORDER BY id DESC LIMIT ")
        .push_bind(i64::from(q.limit.max(1)) + 1);
    b
}

/// How many of the newest jobs a text search ([`crate::ListQuery::text`]) looks through.
pub const SEARCH_SCAN: i64 = 20_000;

/// The page of `GET /v1/jobs` from what [`list_query`] read.
pub(crate) fn page(mut jobs: Vec<Job>, limit: u32) -> Page {
    let limit = limit.max(1) as usize;
    let next_cursor = if jobs.len() > limit {
        jobs.truncate(limit);
        jobs.last().map(|j| j.id.clone())
    } else {
        None
    };
    Page { jobs, next_cursor }
}

/// Jobs per state (every state, zero where none) from `(state, count)` rows.
pub(crate) fn counts(rows: impl IntoIterator<Item = (String, i64)>) -> Vec<(JobState, i64)> {
    let mut out: Vec<(JobState, i64)> = JobState::ALL.iter().map(|s| (*s, 0)).collect();
    for (s, n) in rows {
        if let Ok(st) = s.parse::<JobState>() {
            if let Some(slot) = out.iter_mut().find(|(k, _)| *k == st) {
                slot.1 = n;
            }
        }
    }
    out
}

/// Dashboard sessions' statements, the same on both backends (`$N` binds on SQLite too): expired
/// ones go, then the token's oldest beyond the newest `$2`, then the new one is stored.
/// Jobs finished since `$1`, per hour and state ([`crate::Store::finished_per_hour`]).
pub(crate) const FINISHED_PER_HOUR: &str = "SELECT (finished_at / 3600000) * 3600000 AS h, state, \
     count(*) AS n FROM jobs WHERE finished_at >= $1 GROUP BY 1, 2 ORDER BY 1";

/// [`FINISHED_PER_HOUR`]'s rows as counts (rows of a state that is not final are dropped).
pub(crate) fn hour_counts(rows: Vec<(i64, String, i64)>) -> Vec<crate::HourCount> {
    rows.into_iter()
        .filter_map(|(hour_ms, s, count)| {
            let state = s.parse::<JobState>().ok().filter(|s| s.is_terminal())?;
            Some(crate::HourCount {
                hour_ms,
                state,
                count,
            })
        })
        .collect()
}

pub(crate) const SESSIONS_EXPIRED: &str = "DELETE FROM ui_sessions WHERE expires_at <= $1";
pub(crate) const SESSIONS_OLDEST: &str = "DELETE FROM ui_sessions WHERE token_sha256 = $1 AND session_sha256 NOT IN \
     (SELECT session_sha256 FROM ui_sessions WHERE token_sha256 = $1 ORDER BY created_at DESC LIMIT $2)";
pub(crate) const SESSION_INSERT: &str =
    "INSERT INTO ui_sessions (session_sha256, token_sha256, csrf, created_at, expires_at) \
     VALUES ($1, $2, $3, $4, $5)";
pub(crate) const SESSION_GET: &str =
    "SELECT t.name, t.role, t.created_at, t.scopes, s.csrf, s.expires_at \
     FROM ui_sessions s JOIN api_tokens t ON t.token_sha256 = s.token_sha256 \
     WHERE s.session_sha256 = $1 AND s.expires_at > $2";
pub(crate) const SESSION_END: &str = "DELETE FROM ui_sessions WHERE session_sha256 = $1";

/// A write's body: what runs inside a backend's transaction (`write`) on its connection.
pub(crate) type OpFuture<'c, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = crate::Result<T>> + Send + 'c>>;

/// What both backends do with the same SQL (`$N` placeholders bind on SQLite too), written once
/// and compiled for each: `same_sql!(impl Tokens for SqliteStore { …its own methods… })` makes
/// the whole impl, these methods and the backend's. Each backend module provides what the bodies
/// name: `self.pool` (its read pool), `self.write` (its transaction, [`OpFuture`]),
/// `delivery_row`, and the `FromRow`/`Row` traits in scope.
macro_rules! same_sql {
    (impl Tokens for $store:ty { $($own:tt)* }) => {
        #[async_trait::async_trait]
        impl $crate::Tokens for $store {
            async fn token_by_hash(
                &self,
                sha256_hex: &str,
            ) -> $crate::Result<Option<($crate::TokenInfo, String)>> {
                let row = sqlx::query(&format!(
                    "SELECT {}, token_sha256 FROM api_tokens WHERE token_sha256 = $1",
                    $crate::row::TOKEN_COLS
                ))
                .bind(sha256_hex)
                .fetch_optional(&self.pool)
                .await?;
                row.map(|r| {
                    Ok((
                        $crate::row::TokenRow::from_row(&r)?.into_info()?,
                        r.try_get("token_sha256")?,
                    ))
                })
                .transpose()
            }

            async fn list_tokens(&self) -> $crate::Result<Vec<$crate::TokenInfo>> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM api_tokens ORDER BY name",
                    $crate::row::TOKEN_COLS
                ))
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| $crate::row::TokenRow::from_row(r)?.into_info())
                    .collect()
            }

            async fn create_session(&self, new: &$crate::NewSession) -> $crate::Result<()> {
                let new = new.clone();
                self.write(move |conn| {
                    Box::pin(async move {
                        sqlx::query($crate::shared::SESSIONS_EXPIRED)
                            .bind(new.created_at_ms)
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query($crate::shared::SESSIONS_OLDEST)
                            .bind(&new.token_sha256)
                            .bind($crate::MAX_SESSIONS_PER_TOKEN - 1)
                            .execute(&mut *conn)
                            .await?;
                        sqlx::query($crate::shared::SESSION_INSERT)
                            .bind(&new.session_sha256)
                            .bind(&new.token_sha256)
                            .bind(&new.csrf)
                            .bind(new.created_at_ms)
                            .bind(new.expires_at_ms)
                            .execute(&mut *conn)
                            .await?;
                        Ok(())
                    })
                })
                .await
            }

            async fn session(
                &self,
                session_sha256: &str,
                now_ms: i64,
            ) -> $crate::Result<Option<$crate::Session>> {
                let row = sqlx::query($crate::shared::SESSION_GET)
                    .bind(session_sha256)
                    .bind(now_ms)
                    .fetch_optional(&self.pool)
                    .await?;
                row.map(|r| {
                    Ok($crate::Session {
                        token: $crate::row::TokenRow::from_row(&r)?.into_info()?,
                        csrf: r.try_get("csrf")?,
                        expires_at_ms: r.try_get("expires_at")?,
                    })
                })
                .transpose()
            }

            async fn end_session(&self, session_sha256: &str) -> $crate::Result<()> {
                let hash = session_sha256.to_string();
                self.write(move |conn| {
                    Box::pin(async move {
                        sqlx::query($crate::shared::SESSION_END)
                            .bind(&hash)
                            .execute(&mut *conn)
                            .await?;
                        Ok(())
                    })
                })
                .await
            }

            $($own)*
        }
    };
    (impl AuditLog for $store:ty) => {
        #[async_trait::async_trait]
        impl $crate::AuditLog for $store {
            async fn audit_log(
                &self,
                before: Option<i64>,
                limit: u32,
            ) -> $crate::Result<Vec<$crate::AuditEntry>> {
                let rows: Vec<$crate::row::AuditRow> = sqlx::query_as(
                    "SELECT * FROM audit_log WHERE id < $1 ORDER BY id DESC LIMIT $2",
                )
                .bind(before.unwrap_or(i64::MAX))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
                Ok(rows.into_iter().map($crate::AuditEntry::from).collect())
            }
        }
    };
    (impl Deliveries for $store:ty, $dialect:expr, { $($own:tt)* }) => {
        #[async_trait::async_trait]
        impl $crate::Deliveries for $store {
            async fn record_delivery(
                &self,
                d: $crate::NewDelivery,
            ) -> $crate::Result<$crate::Delivery> {
                let clock = self.clock.clone();
                let d = d.bounded();
                self.write(move |conn| {
                    Box::pin(async move {
                        let now = clock.now_ms();
                        if let (true, Some(code)) = (d.outcome == "rejected", &d.code) {
                            let folded = sqlx::query($dialect.fold_refusal_sql())
                                .bind(now)
                                .bind(&d.hook)
                                .bind(code)
                                .bind(now - $crate::REFUSAL_FOLD_MS)
                                .fetch_optional(&mut *conn)
                                .await?;
                            if let Some(row) = folded {
                                return delivery_row(&row);
                            }
                        }
                        match $crate::shared::insert_delivery!(now, d).fetch_one(conn).await {
                            Ok(row) => delivery_row(&row),
                            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                                Err($crate::StoreError::Conflict(format!(
                                    "message {} to hook `{}` was already accepted",
                                    d.message_id.unwrap_or_default(),
                                    d.hook
                                )))
                            }
                            Err(e) => Err(e.into()),
                        }
                    })
                })
                .await
            }

            async fn delivered(
                &self,
                hook: &str,
                message_id: &str,
            ) -> $crate::Result<Option<$crate::Delivery>> {
                let row = sqlx::query(
                    "SELECT * FROM sns_deliveries WHERE hook = $1 AND message_id = $2 \
                     AND outcome IN ('accepted', 'no_rule', 'confirmed') ORDER BY id LIMIT 1",
                )
                .bind(hook)
                .bind(message_id)
                .fetch_optional(&self.pool)
                .await?;
                row.as_ref().map(delivery_row).transpose()
            }

            async fn list_deliveries(
                &self,
                before: Option<i64>,
                limit: u32,
            ) -> $crate::Result<Vec<$crate::Delivery>> {
                let rows = sqlx::query(
                    "SELECT * FROM sns_deliveries WHERE id < $1 ORDER BY id DESC LIMIT $2",
                )
                .bind(before.unwrap_or(i64::MAX))
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
                rows.iter().map(delivery_row).collect()
            }

            $($own)*
        }
    };
    // What a backend's writes do on its connection alike: read a job back, record events.
    (helpers for $conn:ty, $row:ty) => {
        fn job_from_row(row: &$row) -> $crate::Result<ec2jobd_spec::Job> {
            $crate::row::JobRow::from_row(row)?.into_job()
        }

        fn delivery_row(row: &$row) -> $crate::Result<$crate::Delivery> {
            Ok($crate::row::DeliveryRow::from_row(row)?.into())
        }

        async fn load_job(conn: &mut $conn, id: &str) -> $crate::Result<Option<ec2jobd_spec::Job>> {
            let row = sqlx::query(&format!(
                "SELECT {} FROM jobs WHERE id = $1",
                $crate::row::JOB_COLS
            ))
            .bind(id)
            .fetch_optional(conn)
            .await?;
            row.as_ref().map(job_from_row).transpose()
        }

        async fn add_event(
            conn: &mut $conn,
            job_id: &str,
            at: i64,
            kind: &str,
            message: &str,
            data: &serde_json::Value,
        ) -> $crate::Result<()> {
            add_event_by(conn, job_id, at, (kind, message, data), None).await
        }

        /// Events of several jobs at one time `at` as one statement (`(job, kind, message,
        /// data)`; nothing for none).
        async fn add_events(
            conn: &mut $conn,
            at: i64,
            events: &[(&str, &str, &str, &serde_json::Value)],
        ) -> $crate::Result<()> {
            if events.is_empty() {
                return Ok(());
            }
            let mut b = sqlx::QueryBuilder::<<$conn as sqlx::Connection>::Database>::new(
                "INSERT INTO job_events (job_id, at, kind, message, data) ",
            );
            b.push_values(events, |mut row, (id, kind, message, data)| {
                row.push_bind(*id)
                    .push_bind(at)
                    .push_bind(*kind)
                    .push_bind(*message)
                    .push_bind($crate::shared::encode(data));
            });
            b.build().execute(conn).await?;
            Ok(())
        }

        /// Marks jobs as through the outbox, with the event each brought (two statements for
        /// any number).
        async fn mark_outbox_done(
            conn: &mut $conn,
            now: i64,
            done: &[(String, Option<$crate::NewEvent>)],
        ) -> $crate::Result<()> {
            if done.is_empty() {
                return Ok(());
            }
            let mut b = sqlx::QueryBuilder::<<$conn as sqlx::Connection>::Database>::new(
                "UPDATE jobs SET outbox_done_at = ",
            );
            b.push_bind(now).push(" WHERE id IN (");
            let mut ids = b.separated(", ");
            for (id, _) in done {
                ids.push_bind(id.as_str());
            }
            b.push(")");
            b.build().execute(&mut *conn).await?;
            let events: Vec<_> = done
                .iter()
                .filter_map(|(id, ev)| {
                    ev.as_ref().map(|ev| {
                        (id.as_str(), ev.kind.as_str(), ev.message.as_str(), &ev.data)
                    })
                })
                .collect();
            add_events(conn, now, &events).await
        }

        /// An event someone caused (`by`: a token's name).
        async fn add_event_by(
            conn: &mut $conn,
            job_id: &str,
            at: i64,
            (kind, message, data): (&str, &str, &serde_json::Value),
            by: Option<&str>,
        ) -> $crate::Result<()> {
            sqlx::query(
                "INSERT INTO job_events (job_id, at, kind, message, data, actor) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(job_id)
            .bind(at)
            .bind(kind)
            .bind(message)
            .bind($crate::shared::encode(data))
            .bind(by)
            .execute(conn)
            .await?;
            Ok(())
        }
    };
    // The queue's reads, as inherent methods its impl calls (the queue's impl is the backend's).
    (reads of $store:ty, $db:ty, $dialect:expr) => {
        impl $store {
            async fn read_list(&self, q: $crate::ListQuery) -> $crate::Result<$crate::Page> {
                let rows = $crate::shared::list_query::<$db>(&q, $dialect)
                    .build()
                    .fetch_all(&self.pool)
                    .await?;
                let jobs = rows.iter().map(job_from_row).collect::<$crate::Result<Vec<_>>>()?;
                Ok($crate::shared::page(jobs, q.limit))
            }

            async fn read_events(
                &self,
                id: &str,
                after_seq: i64,
                limit: u32,
            ) -> $crate::Result<Vec<ec2jobd_spec::JobEvent>> {
                let rows = sqlx::query(&format!(
                    "SELECT {} FROM job_events WHERE job_id = $1 AND seq > $2 \
                     ORDER BY seq LIMIT $3",
                    $crate::row::EVENT_COLS
                ))
                .bind(id)
                .bind(after_seq)
                .bind(limit as i64)
                .fetch_all(&self.pool)
                .await?;
                rows.iter()
                    .map(|r| $crate::row::EventRow::from_row(r)?.into_event())
                    .collect()
            }

            async fn read_outbox(
                &self,
                now_ms: i64,
                limit: u32,
            ) -> $crate::Result<Vec<(ec2jobd_spec::Job, u32)>> {
                let rows = sqlx::query(&$dialect.outbox_sql())
                    .bind(now_ms)
                    .bind(i64::from(limit))
                    .fetch_all(&self.pool)
                    .await?;
                rows.iter()
                    .map(|r| {
                        let tries: i64 = r.try_get("outbox_tries")?;
                        Ok((job_from_row(r)?, tries.max(0) as u32))
                    })
                    .collect()
            }

            async fn read_counts(&self) -> $crate::Result<Vec<(ec2jobd_spec::JobState, i64)>> {
                let rows: Vec<(String, i64)> =
                    sqlx::query_as("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state")
                        .fetch_all(&self.pool)
                        .await?;
                Ok($crate::shared::counts(rows))
            }

            async fn read_finished_per_hour(
                &self,
                since_ms: i64,
            ) -> $crate::Result<Vec<$crate::HourCount>> {
                let rows = sqlx::query_as($crate::shared::FINISHED_PER_HOUR)
                    .bind(since_ms)
                    .fetch_all(&self.pool)
                    .await?;
                Ok($crate::shared::hour_counts(rows))
            }
        }
    };
}
pub(crate) use same_sql;

/// [`DELIVERY_INSERT`] with a delivery's values bound (`now`: when it arrived).
macro_rules! insert_delivery {
    ($now:expr, $d:expr) => {
        sqlx::query($crate::shared::DELIVERY_INSERT)
            .bind($now)
            .bind(&$d.hook)
            .bind(&$d.message_id)
            .bind(&$d.topic_arn)
            .bind(&$d.kind)
            .bind(&$d.outcome)
            .bind(&$d.reason)
            .bind(&$d.rule)
            .bind(&$d.job_id)
            .bind(&$d.code)
    };
}
pub(crate) use insert_delivery;

/// A delivery's row as inserted (the same statement on both backends).
pub(crate) const DELIVERY_INSERT: &str = "INSERT INTO sns_deliveries (at, hook, message_id, \
     topic_arn, kind, outcome, reason, rule, job_id, code) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) RETURNING *";

#[cfg(test)]
mod tests {
    use super::schema_verdict;

    #[test]
    fn newer_migrations_are_tolerated_unless_required() {
        let known = [1, 2, 3];
        assert_eq!(schema_verdict(&known, &[1, 2], None), Ok(vec![]));
        assert_eq!(schema_verdict(&known, &[1, 2, 3, 4], None), Ok(vec![4]));
        // A mark this build knows (it made it): fine.
        assert_eq!(schema_verdict(&known, &[1, 2, 3], Some(3)), Ok(vec![]));
        let e = schema_verdict(&known, &[1, 2, 3, 4, 5], Some(5)).unwrap_err();
        assert!(
            e.contains("requires migration 5") && e.contains("up to 3"),
            "{e}"
        );
    }
}

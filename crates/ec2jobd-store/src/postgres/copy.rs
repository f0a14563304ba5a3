//! `ec2jobd store copy`: a single node's SQLite history moved into a PostgreSQL database, so a team
//! that outgrows one host keeps its jobs, events, tokens, templates, SNS hooks, schedules and deliveries.
//!
//! The two schemas have the same tables and columns (migrations/sqlite, migrations/postgres), so
//! rows move as they are, page by page (memory stays bounded whatever the history), inside one
//! PostgreSQL transaction: a copy that fails leaves the target as it was. Event and delivery
//! numbers are kept (SSE clients resume by them), and the target's counters continue after them.
//! A target with rows is refused unless asked for; then rows whose key exists are left as they are.
//! The source is read in one transaction (one moment's snapshot), so its daemon may keep running.
//! Must not: write to the source (it is opened read-only) or know HTTP or AWS.

use std::str::FromStr;

use sqlx::postgres::{PgArguments, PgPool};
use sqlx::query::Query;
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions, SqliteRow};
use sqlx::{Postgres, Row};

use crate::{Result, StoreError};

/// How a column's values are read from SQLite and written to PostgreSQL.
#[derive(Clone, Copy)]
enum Ty {
    Text,
    Int,
    /// SQLite 0/1, PostgreSQL boolean.
    Bool,
}

/// One table: its name, columns (the first is the key pages are read by), and whether its key is
/// an identity column PostgreSQL numbers itself.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Ty)],
    identity: bool,
}

use Ty::{Bool, Int, Text};

/// Templates and SNS hooks (`Named` rows).
const NAMED: &[(&str, Ty)] = &[
    ("name", Text),
    ("body", Text),
    ("created_at", Int),
    ("updated_at", Int),
];

/// In dependency order (events refer to jobs).
const TABLES: &[Table] = &[
    Table {
        name: "jobs",
        columns: &[
            ("id", Text),
            ("state", Text),
            ("action", Text),
            ("spec", Text),
            ("idempotency_key", Text),
            ("request_hash", Text),
            ("created_at", Int),
            ("updated_at", Int),
            ("started_at", Int),
            ("finished_at", Int),
            ("attempts", Int),
            ("max_attempts", Int),
            ("run_after", Int),
            ("timeout_ms", Int),
            ("lease_owner", Text),
            ("lease_expires_at", Int),
            ("cancel_requested", Bool),
            ("error", Text),
            ("results", Text),
            ("progress", Text),
            ("checkpoint", Text),
            ("priority", Int),
            ("wait_outcome", Text),
            ("outbox_done_at", Int),
            ("outbox_tries", Int),
            ("outbox_after", Int),
            ("created_by", Text),
        ],
        identity: false,
    },
    Table {
        name: "job_events",
        columns: &[
            ("seq", Int),
            ("job_id", Text),
            ("at", Int),
            ("kind", Text),
            ("message", Text),
            ("data", Text),
            ("actor", Text),
        ],
        identity: true,
    },
    Table {
        name: "api_tokens",
        columns: &[
            ("name", Text),
            ("role", Text),
            ("token_sha256", Text),
            ("created_at", Int),
            ("scopes", Text),
        ],
        identity: false,
    },
    Table {
        name: "templates",
        columns: NAMED,
        identity: false,
    },
    Table {
        name: "sns_hooks",
        columns: NAMED,
        identity: false,
    },
    Table {
        name: "schedules",
        columns: NAMED,
        identity: false,
    },
    Table {
        name: "schedule_overrides",
        columns: NAMED,
        identity: false,
    },
    Table {
        name: "sns_deliveries",
        columns: &[
            ("id", Int),
            ("at", Int),
            ("hook", Text),
            ("message_id", Text),
            ("topic_arn", Text),
            ("kind", Text),
            ("outcome", Text),
            ("reason", Text),
            ("rule", Text),
            ("job_id", Text),
            ("code", Text),
            ("count", Int),
            ("last_at", Int),
        ],
        identity: true,
    },
    Table {
        name: "audit_log",
        columns: &[
            ("id", Int),
            ("at", Int),
            ("actor", Text),
            ("what", Text),
            ("name", Text),
            ("change", Text),
        ],
        identity: true,
    },
];

/// Rows read from SQLite at a time.
pub(super) const PAGE: i64 = 500;

/// One value read from SQLite.
enum Value {
    Text(Option<String>),
    Int(Option<i64>),
    Bool(Option<bool>),
}

fn read(row: &SqliteRow, i: usize, ty: Ty) -> Result<Value> {
    let bad = |e: sqlx::Error| StoreError::Corrupt(format!("column {i}: {e}"));
    Ok(match ty {
        Text => Value::Text(row.try_get(i).map_err(bad)?),
        Int => Value::Int(row.try_get(i).map_err(bad)?),
        Bool => Value::Bool(
            row.try_get::<Option<i64>, _>(i)
                .map_err(bad)?
                .map(|v| v != 0),
        ),
    })
}

fn bind<'q>(q: Query<'q, Postgres, PgArguments>, v: Value) -> Query<'q, Postgres, PgArguments> {
    match v {
        Value::Text(v) => q.bind(v),
        Value::Int(v) => q.bind(v),
        Value::Bool(v) => q.bind(v),
    }
}

/// Copies the SQLite database at `from` (`sqlite://PATH`, opened read-only) into `to` (migrated
/// first). Refuses a target that has rows in any copied table unless `allow_non_empty`. Returns the
/// rows written per table.
pub async fn copy_from_sqlite(
    from: &str,
    to: &PgPool,
    allow_non_empty: bool,
) -> Result<Vec<(&'static str, u64)>> {
    let opts = SqliteConnectOptions::from_str(from)
        .map_err(|e| StoreError::Unavailable(format!("source `{from}`: {e}")))?
        .read_only(true)
        .create_if_missing(false);
    let src = SqlitePoolOptions::new()
        .max_connections(1)
        .connect_with(opts)
        .await
        .map_err(|e| StoreError::Unavailable(format!("source `{from}`: {e}")))?;
    super::migrate(to).await?;
    if !allow_non_empty {
        let mut held = Vec::new();
        for t in TABLES {
            let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {}", t.name))
                .fetch_one(to)
                .await?;
            if n > 0 {
                held.push(format!("{n} in {}", t.name));
            }
        }
        if !held.is_empty() {
            return Err(StoreError::Conflict(format!(
                "the target already has rows ({}); copy into it anyway with --allow-non-empty \
                 (rows whose key exists are kept as they are)",
                held.join(", ")
            )));
        }
    }
    // One read transaction: every table as of one moment, so a daemon may go on writing to the
    // source meanwhile without events arriving for jobs the copy did not see.
    let mut conn = src.acquire().await?;
    sqlx::query("BEGIN").execute(&mut *conn).await?;
    let mut tx = to.begin().await?;
    let mut copied = Vec::new();
    for t in TABLES {
        let names: Vec<&str> = t.columns.iter().map(|(c, _)| *c).collect();
        let (key, key_ty) = t.columns[0];
        let select = format!(
            "SELECT {} FROM {} WHERE {key} > ? ORDER BY {key} LIMIT {PAGE}",
            names.join(", "),
            t.name
        );
        let params: Vec<String> = (1..=names.len()).map(|i| format!("${i}")).collect();
        let insert = format!(
            "INSERT INTO {} ({}){} VALUES ({}) ON CONFLICT DO NOTHING",
            t.name,
            names.join(", "),
            if t.identity {
                " OVERRIDING SYSTEM VALUE"
            } else {
                ""
            },
            params.join(", ")
        );
        let (mut after_text, mut after_int) = (String::new(), i64::MIN);
        let mut written = 0u64;
        loop {
            let q = sqlx::query(&select);
            let q = match key_ty {
                Int => q.bind(after_int),
                _ => q.bind(after_text.clone()),
            };
            let rows = q.fetch_all(&mut *conn).await.map_err(|e| {
                StoreError::Unavailable(format!(
                    "reading {} from the source (is it a current ec2jobd database? \
                     `ec2jobd migrate` brings an older one up to date): {e}",
                    t.name
                ))
            })?;
            for row in &rows {
                let mut q = sqlx::query(&insert);
                for (i, (_, ty)) in t.columns.iter().enumerate() {
                    q = bind(q, read(row, i, *ty)?);
                }
                written += q.execute(&mut *tx).await?.rows_affected();
            }
            let Some(last) = rows.last() else {
                break;
            };
            match key_ty {
                Int => {
                    after_int = last
                        .try_get(0)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?
                }
                _ => {
                    after_text = last
                        .try_get(0)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?
                }
            }
            if (rows.len() as i64) < PAGE {
                break;
            }
        }
        if t.identity {
            // The target's own numbering continues after the rows brought in.
            sqlx::query(&format!(
                "SELECT setval(pg_get_serial_sequence('{0}', '{key}'), \
                 COALESCE((SELECT max({key}) FROM {0}), 0) + 1, false)",
                t.name
            ))
            .execute(&mut *tx)
            .await?;
        }
        copied.push((t.name, written));
    }
    tx.commit().await?;
    sqlx::query("ROLLBACK").execute(&mut *conn).await?;
    drop(conn);
    src.close().await;
    Ok(copied)
}

//! PostgreSQL, for several daemons sharing one queue: the schema (`migrations/postgres`) and
//! applying it, leader leases ([`take_lease`]), wake-up hints ([`hints`]), the database's clock
//! ([`DbClock`]), the [`PgStore`] built on them (`store`), and moving a SQLite history in
//! ([`copy_from_sqlite`], `ec2jobd store copy`).
//!
//! The schema enforces what replicas must agree on without talking to each other: one job per
//! idempotency key, one accepted SNS delivery per message and hook, one leader per lease name.
//! Must not: know HTTP or AWS.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

use crate::{Result, StoreError};

static MIGRATOR: Migrator = sqlx::migrate!("../../migrations/postgres");

/// Whether `url` names a PostgreSQL database (`postgres://…` or `postgresql://…`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// `url` with its passwords replaced by `***`, for messages and logs: the user info's
/// (`postgres://app:pw@host/db`, a password holding `@`, `:` or `?` too) and any query parameter
/// naming one (`?password=…`, `&sslpassword=…`). Anything not a URL is returned as it is (it holds
/// no `://`, so no user info).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    // The user info ends at the last `@`; the query begins at the first `?` after it.
    let at = rest.rfind('@');
    let query_at = rest[at.map_or(0, |a| a + 1)..]
        .find('?')
        .map(|q| q + at.map_or(0, |a| a + 1));
    let (main, query) = match query_at {
        Some(q) => (&rest[..q], Some(&rest[q + 1..])),
        None => (rest, None),
    };
    let main = match main.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => main.to_string(),
    };
    let mut out = format!("{scheme}://{main}");
    if let Some(q) = query {
        let q: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.to_ascii_lowercase().contains("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&q.join("&"));
    }
    out
}

/// A pool of at most `max_connections` to `url`.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool> {
    let opts: PgConnectOptions = url
        .parse()
        .map_err(|_| StoreError::Unavailable(format!("not a PostgreSQL URL: {}", redact(url))))?;
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
        .map_err(StoreError::from)
}

/// Applies the migrations not applied yet; returns how many it applied. Safe to run from several
/// replicas at once (sqlx holds an advisory lock while it migrates).
pub async fn migrate(pool: &PgPool) -> Result<usize> {
    let before = applied(pool).await?;
    // A newer replica may have migrated the shared database (additively: left alone).
    let mut migrator = sqlx::migrate!("../../migrations/postgres");
    migrator.set_ignore_missing(crate::shared::newer_schema(pool, &migrator).await?);
    migrator
        .run(pool)
        .await
        .map_err(|e| StoreError::Unavailable(format!("migrating: {e}")))?;
    Ok(applied(pool).await? - before)
}

/// Takes or renews the lease `name` for `holder` until `now_ms + ttl_ms`: granted when no one
/// holds it, `holder` already does, or the holder's lease ran out (a replica that died). One
/// statement, so two replicas asking at once cannot both be granted. Returns whether `holder`
/// holds it now.
pub async fn take_lease(
    pool: &PgPool,
    name: &str,
    holder: &str,
    now_ms: i64,
    ttl_ms: i64,
) -> Result<bool> {
    let granted: Option<String> = sqlx::query_scalar(
        "INSERT INTO leader (name, holder, expires_at) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, expires_at = EXCLUDED.expires_at
         WHERE leader.holder = EXCLUDED.holder OR leader.expires_at <= $4
         RETURNING holder",
    )
    .bind(name)
    .bind(holder)
    .bind(now_ms + ttl_ms)
    .bind(now_ms)
    .fetch_optional(pool)
    .await?;
    Ok(granted.is_some())
}

/// Gives the lease `name` up if `holder` has it (a graceful stop), and says so to the other
/// replicas ([`hints::LEASES_CHANNEL`], at commit), so one of them takes it at once instead of
/// when it would have run out.
pub async fn release_lease(pool: &PgPool, name: &str, holder: &str) -> Result<()> {
    sqlx::query(
        "WITH gone AS (DELETE FROM leader WHERE name = $1 AND holder = $2 RETURNING name) \
         SELECT pg_notify($3, name) FROM gone",
    )
    .bind(name)
    .bind(holder)
    .bind(hints::LEASES_CHANNEL)
    .execute(pool)
    .await?;
    Ok(())
}

async fn applied(pool: &PgPool) -> Result<usize> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(0);
    }
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(pool)
        .await?;
    Ok(n as usize)
}

mod clock;
mod copy;
pub mod hints;
mod ingest;
mod store;
pub use clock::DbClock;
pub use copy::copy_from_sqlite;
pub use store::{PgOptions, PgStore};

#[cfg(test)]
pub(crate) mod tests;

/// `ec2jobd doctor`'s look at a PostgreSQL database, changing nothing: every migration this build
/// knows applied, and the server a primary where this user may write the queue.
pub async fn check(url: &str) -> Result<crate::DbCheck> {
    let pool = connect(url, 1).await?;
    let applied = applied(&pool).await.unwrap_or(0);
    let writable = async {
        let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
            .fetch_one(&pool)
            .await
            .map_err(|e| e.to_string())?;
        if standby {
            return Err("the server is a read-only standby".to_string());
        }
        if applied == 0 {
            return Ok(());
        }
        let may: bool =
            sqlx::query_scalar("SELECT has_table_privilege('jobs', 'INSERT, UPDATE, DELETE')")
                .fetch_one(&pool)
                .await
                .map_err(|e| e.to_string())?;
        may.then_some(())
            .ok_or_else(|| "this user may not insert, update and delete jobs".to_string())
    }
    .await;
    pool.close().await;
    Ok(crate::DbCheck {
        applied,
        known: MIGRATOR.iter().count(),
        writable,
    })
}

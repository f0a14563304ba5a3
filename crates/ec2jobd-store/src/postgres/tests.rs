//! Against a real PostgreSQL server: `scripts/test` starts a throwaway one
//! (`scripts/ensure-postgres`) and passes its URL in `TEST_POSTGRES_URL`; each test makes a
//! database of its own on it. Without the variable (a bare `cargo test`) these tests say so and
//! return.

use crate::prelude::*;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};

use super::*;
use crate::suite::{enqueue, new_job, pg_options};
use crate::{Enqueued, NewEvent};
use ec2jobd_spec::{Clock, JobState, ManualClock, Progress};
use std::sync::Arc;

/// A pool on a new, empty database, or `None` when no server was given.
async fn fresh_database() -> Option<PgPool> {
    fresh_database_at().await.map(|(pool, _)| pool)
}

/// The URL of a new, empty database, or `None` when no server was given.
pub(crate) async fn fresh_database_url() -> Option<String> {
    fresh_database_at().await.map(|(_, url)| url)
}

/// A pool on a new, empty database and its URL, or `None` when no server was given.
async fn fresh_database_at() -> Option<(PgPool, String)> {
    let Ok(url) = std::env::var("TEST_POSTGRES_URL") else {
        eprintln!("TEST_POSTGRES_URL is not set: skipped (scripts/test starts a server)");
        return None;
    };
    let admin = PgConnectOptions::from_str(&url).expect("TEST_POSTGRES_URL is a PostgreSQL URL");
    let name = format!("t_{}", ulid::Ulid::new().to_string().to_lowercase());
    let mut conn = PgConnection::connect_with(&admin)
        .await
        .expect("connect to the test server");
    conn.execute(format!("CREATE DATABASE {name}").as_str())
        .await
        .expect("create a test database");
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect_with(admin.database(&name))
        .await
        .expect("connect to the test database");
    let at = url
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{name}"));
    Some((pool, at.expect("the URL names a database")))
}

#[tokio::test]
async fn the_database_clock_reads_the_servers_time() {
    let Some(pool) = fresh_database().await else {
        return;
    };
    let clock = DbClock::follow(pool.clone()).await.unwrap();
    let server: i64 =
        sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8")
            .fetch_one(&pool)
            .await
            .unwrap();
    let ours = clock.now_ms();
    assert!(
        (ours - server).abs() < 1_000,
        "ours {ours}, server {server}"
    );
}

#[test]
fn passwords_never_reach_messages() {
    assert_eq!(
        redact("postgres://app:s3cr:et@db.internal:5432/ec2jobd?sslmode=require"),
        "postgres://app:***@db.internal:5432/ec2jobd?sslmode=require"
    );
    assert_eq!(
        redact("postgres://app@db/ec2jobd"),
        "postgres://app@db/ec2jobd"
    );
    assert_eq!(redact("sqlite://ec2jobd.db"), "sqlite://ec2jobd.db");
    // Finding 8 (issue 30): every form a password can take in a URL.
    assert_eq!(
        redact("postgres://db/ec2jobd?user=app&password=hunter2&sslmode=require"),
        "postgres://db/ec2jobd?user=app&password=***&sslmode=require"
    );
    assert_eq!(
        redact("postgresql://app:p@ss?w:rd@db:5432/q?PassWord=x&sslpassword=y"),
        "postgresql://app:***@db:5432/q?PassWord=***&sslpassword=***"
    );
    assert_eq!(
        redact("postgres:///q?password=x"),
        "postgres:///q?password=***"
    );
    assert!(is_postgres_url("postgresql://h/d") && !is_postgres_url("sqlite://x"));
}

#[tokio::test]
async fn migrations_apply_once_and_make_every_table() {
    let Some(pool) = fresh_database().await else {
        return;
    };
    let n = migrate(&pool).await.unwrap();
    assert!(n >= 1, "applied {n}");
    assert_eq!(
        migrate(&pool).await.unwrap(),
        0,
        "a second run applies nothing"
    );
    for table in [
        "jobs",
        "job_events",
        "api_tokens",
        "meta",
        "sns_deliveries",
        "sns_hooks",
        "templates",
        "schedules",
        "schedule_overrides",
        "leader",
    ] {
        let rows: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
            .fetch_one(&pool)
            .await
            .unwrap_or_else(|e| panic!("{table}: {e}"));
        assert_eq!(rows, 0, "{table}");
    }
}

/// Upgrades with replicas: a database a newer replica migrated additively is used by an older
/// one as it is (its migration left alone); one marked as needing the newer version is refused.
#[tokio::test]
async fn newer_schemas_are_used_when_additive_and_refused_when_not() {
    let Some(pool) = fresh_database().await else {
        return;
    };
    migrate(&pool).await.unwrap();
    let future = |v, requires| crate::suite::future_migration(v, requires, "'\\x00'::bytea");
    sqlx::raw_sql(&future(29991231000001, false))
        .execute(&pool)
        .await
        .unwrap();
    assert_eq!(migrate(&pool).await.unwrap(), 0, "additive: used as it is");
    sqlx::raw_sql(&future(29991231000002, true))
        .execute(&pool)
        .await
        .unwrap();
    match migrate(&pool).await {
        Err(StoreError::Unavailable(m)) => {
            assert!(
                m.contains("newer ec2jobd") && m.contains("29991231000002"),
                "{m}"
            )
        }
        other => panic!("an incompatible newer schema: {other:?}"),
    }
}

/// The claim walks the index in claim order (priority, due time, id) instead of sorting the queue.
#[tokio::test]
async fn the_claim_order_has_its_index() {
    let Some(pool) = fresh_database().await else {
        return;
    };
    migrate(&pool).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    conn.execute("SET enable_seqscan = off").await.unwrap();
    // The store's own claim pick ($1, $2 unused by it).
    let plan: Vec<String> = sqlx::query_scalar(&format!(
        "EXPLAIN {}",
        store::PICK.replace("$3", "1").replace("$4", "8")
    ))
    .fetch_all(&mut *conn)
    .await
    .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("jobs_claim_priority"), "{plan}");
    assert!(!plan.contains("Sort"), "the index gives the order:\n{plan}");
}

/// What two replicas must agree on is the database's to enforce: one job per idempotency key, one
/// accepted delivery per SNS message and hook (duplicates are still recorded).
#[tokio::test]
async fn keys_and_deliveries_are_unique_across_writers() {
    let Some(pool) = fresh_database().await else {
        return;
    };
    migrate(&pool).await.unwrap();
    let job = |id: &str| {
        sqlx::query(
            "INSERT INTO jobs (id, state, action, spec, idempotency_key, created_at, updated_at,
                max_attempts, run_after, timeout_ms)
             VALUES ($1, 'queued', 'start_instances', '{}', 'key-1', 0, 0, 3, 0, 1000)
             ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING",
        )
        .bind(id.to_string())
    };
    assert_eq!(job("a").execute(&pool).await.unwrap().rows_affected(), 1);
    assert_eq!(job("b").execute(&pool).await.unwrap().rows_affected(), 0);

    let delivery = |outcome: &'static str| {
        sqlx::query(
            "INSERT INTO sns_deliveries (at, hook, message_id, outcome) VALUES (0, 'alarms', 'm-1', $1)",
        )
        .bind(outcome)
    };
    delivery("accepted").execute(&pool).await.unwrap();
    let second = delivery("accepted").execute(&pool).await.unwrap_err();
    let code = second
        .as_database_error()
        .and_then(|e| e.code())
        .map(|c| c.to_string());
    assert_eq!(code.as_deref(), Some("23505"), "{second}");
    delivery("duplicate").execute(&pool).await.unwrap();
}

/// One leader per lease: taken, renewed by its holder, refused to another until it runs out, then
/// taken over; given up at a graceful stop.
#[tokio::test]
async fn leader_lease_is_held_by_one_replica_at_a_time() {
    let Some(pool) = fresh_database().await else {
        return;
    };
    migrate(&pool).await.unwrap();
    let ttl = 10_000;
    assert!(take_lease(&pool, "maintenance", "a", 0, ttl).await.unwrap());
    assert!(!take_lease(&pool, "maintenance", "b", 1_000, ttl)
        .await
        .unwrap());
    assert!(take_lease(&pool, "maintenance", "a", 5_000, ttl)
        .await
        .unwrap());
    // a's renewal runs to 15 000.
    assert!(!take_lease(&pool, "maintenance", "b", 14_999, ttl)
        .await
        .unwrap());
    assert!(take_lease(&pool, "maintenance", "b", 15_000, ttl)
        .await
        .unwrap());
    assert!(!take_lease(&pool, "maintenance", "a", 15_001, ttl)
        .await
        .unwrap());
    // Another lease name is independent.
    assert!(take_lease(&pool, "schedules", "a", 15_001, ttl)
        .await
        .unwrap());
    release_lease(&pool, "maintenance", "a").await.unwrap();
    assert!(!take_lease(&pool, "maintenance", "a", 15_002, ttl)
        .await
        .unwrap());
    release_lease(&pool, "maintenance", "b").await.unwrap();
    assert!(take_lease(&pool, "maintenance", "a", 15_003, ttl)
        .await
        .unwrap());

    // Many replicas asking at once: exactly one is granted.
    sqlx::query("DELETE FROM leader")
        .execute(&pool)
        .await
        .unwrap();
    let asks = (0..16).map(|i| {
        let pool = pool.clone();
        async move {
            take_lease(&pool, "race", &format!("r{i}"), 0, ttl)
                .await
                .unwrap()
        }
    });
    let granted = futures_join_all(asks).await;
    assert_eq!(granted.iter().filter(|g| **g).count(), 1, "{granted:?}");
}

async fn futures_join_all<F: std::future::Future<Output = bool> + Send + 'static>(
    fs: impl Iterator<Item = F>,
) -> Vec<bool> {
    let handles: Vec<_> = fs.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// A single node's history moves into PostgreSQL as it is: every table's rows (more than one page
/// of jobs), event numbers kept and continued after, booleans as booleans; a target with rows is
/// refused unless asked, and then nothing is written twice.
#[tokio::test]
async fn a_sqlite_history_is_copied_whole_and_only_into_an_empty_target() {
    use crate::{Enqueued, Named, NewDelivery, NewEvent, NewJob, SqliteOptions, SqliteStore};
    use ec2jobd_spec::{JobSpec, ManualClock, Role};
    use serde_json::json;

    let Some(pool) = fresh_database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("node.db").display());
    let clock = std::sync::Arc::new(ManualClock::new(1_800_000_000_000));
    let opts = SqliteOptions {
        url: url.clone(),
        ..Default::default()
    };
    let node = SqliteStore::open(opts, clock).await.unwrap();
    let spec: JobSpec = serde_json::from_value::<JobSpec>(
        json!({"action": "describe_instances", "targets": {"instance_ids": "i-01234567"}}),
    )
    .unwrap()
    .normalize()
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..(copy::PAGE + 20) {
        let new = NewJob {
            spec: spec.clone(),
            idempotency_key: (i == 3).then(|| "key-3".to_string()),
            max_attempts: 3,
            timeout_ms: 60_000,
            created_by: Some("ci".into()),
        };
        match node.enqueue(new).await.unwrap() {
            Enqueued::Created(j) => ids.push(j.id),
            Enqueued::Replayed(_) => panic!("new key"),
        }
    }
    node.note(
        &ids[7],
        NewEvent {
            kind: "progress".into(),
            message: "half way".into(),
            data: json!({"done": 1}),
        },
    )
    .await
    .unwrap();
    // A running job with a cancel asked for: its flag must arrive as a boolean true.
    let running = node.claim("w-1", 60_000, 1).await.unwrap().remove(0).job.id;
    node.cancel(&running, "ops").await.unwrap();
    node.create_token(
        "ops",
        Role::Operator,
        &"ab".repeat(32),
        &Default::default(),
        "cli",
    )
    .await
    .unwrap();
    node.put_named(
        Named::Template,
        "nightly",
        json!({"spec": {"action": "stop_instances"}}),
        "admin",
    )
    .await
    .unwrap();
    node.put_named(Named::SnsHook, "alarms", json!({"rules": []}), "admin")
        .await
        .unwrap();
    node.put_named(
        Named::Schedule,
        "nightly",
        json!({"cron": "@daily"}),
        "admin",
    )
    .await
    .unwrap();
    node.record_delivery(NewDelivery {
        hook: "alarms".into(),
        message_id: Some("m-1".into()),
        topic_arn: None,
        kind: Some("Notification".into()),
        outcome: "accepted".into(),
        reason: None,
        rule: Some("r".into()),
        job_id: Some(ids[0].clone()),
        code: None,
    })
    .await
    .unwrap();
    let events_in_node = node.events(&ids[7], 0, 100).await.unwrap();
    let running_in_node = node.get(&running).await.unwrap().unwrap();
    drop(node);

    let copied = copy_from_sqlite(&url, &pool, false).await.unwrap();
    let n = |t: &str| copied.iter().find(|(name, _)| *name == t).unwrap().1;
    assert_eq!(n("jobs"), ids.len() as u64);
    assert!(n("job_events") >= ids.len() as u64, "{copied:?}");
    assert_eq!(
        (
            n("api_tokens"),
            n("templates"),
            n("sns_hooks"),
            n("schedules"),
            n("sns_deliveries")
        ),
        (1, 1, 1, 1, 1)
    );
    let (state, cancel, owner): (String, bool, Option<String>) =
        sqlx::query_as("SELECT state, cancel_requested, lease_owner FROM jobs WHERE id = $1")
            .bind(&running)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), cancel, owner.as_deref()),
        ("running", true, Some("w-1"))
    );
    let cancelled: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE cancel_requested")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(cancelled, 1);
    // The copied row reads back, through the decoding both backends share, as the node showed it.
    let row: crate::row::JobRow = sqlx::query_as(&format!(
        "SELECT {} FROM jobs WHERE id = $1",
        crate::row::JOB_COLS
    ))
    .bind(&running)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(
        serde_json::to_value(row.into_job().unwrap()).unwrap(),
        serde_json::to_value(&running_in_node).unwrap()
    );
    let key: Option<String> = sqlx::query_scalar("SELECT idempotency_key FROM jobs WHERE id = $1")
        .bind(&ids[3])
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(key.as_deref(), Some("key-3"));
    // Event numbers as they were; new ones continue after the highest.
    let seqs: Vec<i64> =
        sqlx::query_scalar("SELECT seq FROM job_events WHERE job_id = $1 ORDER BY seq")
            .bind(&ids[7])
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        seqs,
        events_in_node.iter().map(|e| e.seq).collect::<Vec<_>>()
    );
    let max: i64 = sqlx::query_scalar("SELECT max(seq) FROM job_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let next: i64 = sqlx::query_scalar(
        "INSERT INTO job_events (job_id, at, kind, message) VALUES ($1, 0, 'x', 'y') RETURNING seq",
    )
    .bind(&ids[0])
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(next, max + 1);

    // Again: refused, naming what is there; with leave to, nothing is written twice.
    let e = copy_from_sqlite(&url, &pool, false).await.unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict(m) if m.contains("--allow-non-empty")),
        "{e}"
    );
    let again = copy_from_sqlite(&url, &pool, true).await.unwrap();
    assert!(again.iter().all(|(_, n)| *n == 0), "{again:?}");
}

/// A hint sent in a committed transaction wakes a listener on another connection; when the
/// listener's connection is killed it reconnects, wakes once for what it may have missed, and
/// hears the next hint.
#[tokio::test]
async fn hints_wake_listeners_and_survive_a_lost_connection() {
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::Notify;

    let Some((pool, url)) = fresh_database_at().await else {
        return;
    };
    let wake = Arc::new(Notify::new());
    let bound = Duration::from_secs(20);
    // Registers for the next wake-up before the thing that causes it.
    macro_rules! armed {
        ($n:ident) => {
            let $n = wake.notified();
            tokio::pin!($n);
            $n.as_mut().enable();
        };
    }
    armed!(first);
    let freed = Arc::new(Notify::new());
    let listener = hints::listen(url, wake.clone(), freed.clone());
    let waited = |what: &'static str| move |r: Result<(), _>| r.map_err(|_| what).unwrap();
    waited("the first look, once listening")(tokio::time::timeout(bound, first).await);

    armed!(committed);
    let mut tx = pool.begin().await.unwrap();
    hints::hint(&mut tx).await.unwrap();
    hints::hint(&mut tx).await.unwrap();
    tx.commit().await.unwrap();
    waited("a committed hint")(tokio::time::timeout(bound, committed).await);

    armed!(reconnected);
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(killed, [true], "one listening connection");
    waited("the look after the killed connection was made again")(
        tokio::time::timeout(bound, reconnected).await,
    );

    armed!(after);
    let mut tx = pool.begin().await.unwrap();
    hints::hint(&mut tx).await.unwrap();
    tx.commit().await.unwrap();
    waited("a hint after the reconnect")(tokio::time::timeout(bound, after).await);

    // A lease given up is heard on its own channel (the permit the reconnect left is used first).
    waited("the look at leases after the reconnect")(
        tokio::time::timeout(bound, freed.notified()).await,
    );
    crate::postgres::migrate(&pool).await.unwrap();
    assert!(
        crate::postgres::take_lease(&pool, "maintenance", "a", 0, 60_000)
            .await
            .unwrap()
    );
    crate::postgres::release_lease(&pool, "maintenance", "a")
        .await
        .unwrap();
    waited("a lease given up")(tokio::time::timeout(bound, freed.notified()).await);
    listener.abort();
}

/// Two replicas' stores on one database.
async fn two_replicas() -> Option<(PgStore, PgStore, Arc<ManualClock>)> {
    let url = fresh_database_url().await?;
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let a = PgStore::open(pg_options(&url), clock.clone())
        .await
        .unwrap();
    let b = PgStore::open(pg_options(&url), clock.clone())
        .await
        .unwrap();
    Some((a, b, clock))
}

/// Replicas claiming from one queue at once never claim a job twice, and between them claim every
/// job.
#[tokio::test]
async fn replicas_never_claim_one_job_twice() {
    let Some((a, b, _)) = two_replicas().await else {
        return;
    };
    let (a, b) = (Arc::new(a), Arc::new(b));
    for _ in 0..300 {
        enqueue(&*a, "i-01234567").await;
    }
    let claimers = [a.clone(), b.clone(), a.clone(), b.clone()]
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            tokio::spawn(async move {
                let mut got = Vec::new();
                loop {
                    let c = s.claim(&format!("w{i}"), 60_000, 3).await.unwrap();
                    if c.is_empty() {
                        return got;
                    }
                    got.extend(c.into_iter().map(|c| c.job.id));
                }
            })
        })
        .collect::<Vec<_>>();
    let mut all = Vec::new();
    let mut per = Vec::new();
    for c in claimers {
        let got = c.await.unwrap();
        per.push(got.len());
        all.extend(got);
    }
    let n = all.len();
    all.sort();
    all.dedup();
    assert_eq!((n, all.len()), (300, 300), "claims per claimer {per:?}");
    assert!(per.iter().filter(|n| **n > 0).count() >= 2, "{per:?}");
}

/// The same Idempotency-Key (or SNS message) reaching several replicas at once queues one job: one
/// is created, every other submission gets that job back.
#[tokio::test]
async fn one_key_sent_to_replicas_at_once_queues_one_job() {
    let Some((a, b, _)) = two_replicas().await else {
        return;
    };
    let (a, b) = (Arc::new(a), Arc::new(b));
    let sends: Vec<_> = (0..16)
        .map(|i| {
            let s = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move {
                s.enqueue(new_job("i-01234567", Some("sns:alarms:m-1")))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut created = Vec::new();
    let mut replayed = Vec::new();
    for t in sends {
        match t.await.unwrap() {
            Enqueued::Created(j) => created.push(j.id),
            Enqueued::Replayed(j) => replayed.push(j.id),
        }
    }
    assert_eq!(created.len(), 1, "{created:?}");
    assert!(replayed.iter().all(|id| *id == created[0]));
    assert!(a.counts().await.unwrap().contains(&(JobState::Queued, 1)));
}

/// Work queued on one replica wakes the other's workers (a hint), and a job's events written on
/// one replica reach live streams on the other (the event watcher); leader leases are held by one
/// replica at a time and handed over when given up.
#[tokio::test]
async fn replicas_hear_of_each_others_work() {
    let Some((a, b, _)) = two_replicas().await else {
        return;
    };
    let bound = std::time::Duration::from_secs(20);
    let wake = b.work_available();
    let woken = wake.notified();
    tokio::pin!(woken);
    woken.as_mut().enable();
    let mut stream = b.subscribe();
    let job = enqueue(&a, "i-01234567").await;
    tokio::time::timeout(bound, woken)
        .await
        .expect("b's workers woken by a's enqueue");
    // Claimed and progressing on a; a stream on b hears of it.
    let c = a.claim("a-w1", 60_000, 1).await.unwrap();
    assert_eq!(c[0].job.id, job.id);
    a.progress(
        &job.id,
        "a-w1",
        Progress::default(),
        NewEvent {
            kind: "progress".into(),
            message: "half way".into(),
            data: serde_json::Value::Null,
        },
    )
    .await
    .unwrap();
    let heard = tokio::time::timeout(bound, async {
        loop {
            match stream.recv().await {
                Ok(id) if id == job.id => return,
                Ok(_) => continue,
                Err(e) => panic!("{e}"),
            }
        }
    })
    .await;
    assert!(heard.is_ok(), "b's stream heard of a's job");
    let kinds: Vec<String> = b
        .events(&job.id, 0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["queued", "started", "progress"]);

    assert!(a.lead("maintenance", 10_000).await.unwrap());
    assert!(!b.lead("maintenance", 10_000).await.unwrap());
    a.resign("maintenance").await.unwrap();
    assert!(b.lead("maintenance", 10_000).await.unwrap());
}

/// Shared status polling's rows: each replica's wants are seen by the others (not by itself) until
/// they expire, renewed in place; the latest round of a scope replaces the one before.
#[tokio::test]
async fn replicas_share_what_they_wait_on_and_the_latest_round() {
    let Some((a, b, clock)) = two_replicas().await else {
        return;
    };
    let (ca, cb) = (a.cluster().unwrap(), b.cluster().unwrap());
    assert_ne!(ca.node(), cb.node());
    let now = clock.now_ms();
    ca.put_wants("s1", serde_json::json!({"instances": ["i-1"]}), now + 1_000)
        .await
        .unwrap();
    ca.put_wants("s1", serde_json::json!({"instances": ["i-2"]}), now + 1_000)
        .await
        .unwrap();
    assert!(ca.wants(now).await.unwrap().is_empty(), "not its own");
    let seen = cb.wants(now).await.unwrap();
    assert_eq!(seen.len(), 1, "renewed in place: {seen:?}");
    assert_eq!(seen[0].0, "s1");
    assert_eq!(seen[0].1, ca.node());
    assert_eq!(seen[0].2["instances"][0], "i-2");
    assert!(cb.wants(now + 1_001).await.unwrap().is_empty(), "expired");

    assert!(cb.round("s1").await.unwrap().is_none());
    for n in 1..=2 {
        ca.put_round("s1", serde_json::json!({"number": n}))
            .await
            .unwrap();
    }
    assert_eq!(cb.round("s1").await.unwrap().unwrap()["number"], 2);
    assert!(cb.round("s2").await.unwrap().is_none());
}

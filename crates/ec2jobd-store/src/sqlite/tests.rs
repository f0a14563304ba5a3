//! What only the SQLite backend has: its query plans and its file modes (the queue's contract is
//! tested on both backends in `suite`).

use std::sync::Arc;

use ec2jobd_spec::ManualClock;

use super::*;
use crate::suite::enqueue;

struct Fixture {
    store: Arc<SqliteStore>,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = SqliteOptions {
        url: format!("sqlite://{}", dir.path().join("q.db").display()),
        ..Default::default()
    };
    let clock = Arc::new(ManualClock::new(1_800_000_000_000));
    let store = SqliteStore::open(opts, clock).await.expect("open");
    Fixture {
        store: Arc::new(store),
        _dir: dir,
    }
}

/// The claim and the next-due query walk their partial indexes (`jobs_claim_priority`,
/// `jobs_claim`): no temporary B-tree, no scan of every queued job (which made claims O(queue)).
#[tokio::test]
async fn claim_queries_use_the_claim_index() {
    let f = fixture().await;
    for (sql, index) in [
        (CLAIM, "jobs_claim_priority"),
        (NEXT_RUN_AFTER, "jobs_claim"),
    ] {
        let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
            .bind("w")
            .bind(1i64)
            .bind(1i64)
            .bind(1i64)
            .fetch_all(&f.store.pool)
            .await
            .unwrap()
            .iter()
            .map(|r| r.get::<String, _>("detail"))
            .collect();
        let text = plan.join("\n");
        let names_it = text
            .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
            .any(|w| w == index);
        assert!(names_it, "{sql}:\n{text}");
        assert!(!text.contains("TEMP B-TREE"), "{sql}:\n{text}");
        assert!(!text.contains("jobs_state_id"), "{sql}:\n{text}");
    }
}

/// A time window is searched through the primary key (ids are ULIDs of the creation time), not by
/// scanning every newer job.
#[tokio::test]
async fn time_windows_are_id_range_searches() {
    let f = fixture().await;
    let window = ListQuery {
        since_ms: Some(0),
        until_ms: Some(1),
        ..Default::default()
    };
    let sql = crate::shared::list_query::<sqlx::Sqlite>(&window, crate::shared::Dialect::Sqlite)
        .sql()
        .to_string();
    let plan: Vec<String> = sqlx::query(&format!("EXPLAIN QUERY PLAN {sql}"))
        .bind(0i64)
        .bind("0")
        .bind(1i64)
        .bind("1")
        .bind(10i64)
        .fetch_all(&f.store.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String, _>("detail"))
        .collect();
    assert!(plan.iter().any(|p| p.contains("id>? AND id<?")), "{plan:?}");
}

/// The database and its WAL and shared-memory files are created readable by the owner only.
#[cfg(unix)]
#[tokio::test]
async fn database_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let f = fixture().await;
    enqueue(&*f.store, "i-01234567").await;
    let dir = f._dir.path();
    for name in ["q.db", "q.db-wal", "q.db-shm"] {
        let mode = std::fs::metadata(dir.join(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{name} has mode {mode:o}");
    }
}

/// Backups taken while jobs are being acknowledged one after another: each passes the integrity
/// check and holds every job acknowledged before it began (and the writer never waited on it:
/// submissions go on between and during the backups).
#[tokio::test]
async fn backups_during_writes_hold_every_job_acknowledged_before_them() {
    let f = fixture().await;
    let url = format!("sqlite://{}", f._dir.path().join("q.db").display());
    let acked = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm = tokio::spawn({
        let (store, acked, stop) = (f.store.clone(), acked.clone(), stop.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let j = enqueue(&*store, "i-0123456789abcdef0").await;
                acked.lock().unwrap().push(j.id);
            }
        }
    });
    let out = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for k in 0..5 {
        // Wait until the storm has acknowledged more since the last backup (no fixed sleep).
        while acked.lock().unwrap().len() < seen + 20 {
            tokio::task::yield_now().await;
        }
        let before: Vec<String> = acked.lock().unwrap().clone();
        seen = before.len();
        let dest = out.path().join(format!("b{k}.db"));
        let b = backup(&url, &dest).await.expect("backup");
        assert!(b.bytes > 0);
        let checked = check_backup(&dest).await.expect("check");
        assert_eq!(checked.applied, MIGRATOR.iter().count());
        assert!(
            checked.jobs >= before.len() as i64,
            "{checked:?} < {}",
            before.len()
        );
        let copy = SqliteConnectOptions::new()
            .filename(&dest)
            .read_only(true)
            .immutable(true);
        let mut conn = copy.connect().await.unwrap();
        let ids: std::collections::HashSet<String> = sqlx::query_scalar("SELECT id FROM jobs")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .collect();
        let missing: Vec<&String> = before.iter().filter(|id| !ids.contains(*id)).collect();
        assert!(
            missing.is_empty(),
            "backup {k} lacks {} acknowledged jobs",
            missing.len()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    storm.await.unwrap();
    // No temporary file is left behind, and a backup never overwrites.
    let names: Vec<String> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    let again = backup(&url, &out.path().join("b0.db")).await;
    assert!(matches!(again, Err(StoreError::Conflict(_))), "{again:?}");
}

/// A restore refuses while the store is open, and once it is closed replaces the database with
/// the backup (the replaced one kept aside, whole, with what was written after the backup).
#[tokio::test]
async fn restore_replaces_a_closed_database_and_keeps_the_old_one() {
    let f = fixture().await;
    let dir = f._dir.path().to_path_buf();
    let url = format!("sqlite://{}", dir.join("q.db").display());
    let early = enqueue(&*f.store, "i-0123456789abcdef0").await;
    let dest = dir.join("backup.db");
    backup(&url, &dest).await.unwrap();
    let late = enqueue(&*f.store, "i-0123456789abcdef1").await;
    let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();

    let refused = restore(&url, &dest, now).await;
    match refused {
        Err(StoreError::Conflict(m)) => assert!(m.contains("open"), "{m}"),
        other => panic!("restore while open: {other:?}"),
    }
    drop(f.store);
    // While a restore holds the file, nothing opens the store on it.
    let held = backup::FileLock::take(&dir.join("q.db"), true)
        .unwrap()
        .expect("free");
    let opts = SqliteOptions {
        url: url.clone(),
        ..Default::default()
    };
    match SqliteStore::open(opts, Arc::new(ManualClock::new(0))).await {
        Err(StoreError::Unavailable(m)) => assert!(m.contains("ec2jobd restore"), "{m}"),
        Err(e) => panic!("open during a restore: {e}"),
        Ok(_) => panic!("opened during a restore"),
    }
    drop(held);
    let done = restore(&url, &dest, now).await.expect("restore");
    assert_eq!(done.checked.jobs, 1);
    assert_eq!(done.migrated, 0);
    let aside = done.replaced.expect("the old database is kept");
    assert!(
        aside
            .to_string_lossy()
            .ends_with("q.db.replaced-20270115T080000Z"),
        "{aside:?}"
    );

    let reopen = |path: std::path::PathBuf| async move {
        let opts = SqliteOptions {
            url: format!("sqlite://{}", path.display()),
            ..Default::default()
        };
        SqliteStore::open(opts, Arc::new(ManualClock::new(1_800_000_000_000)))
            .await
            .expect("open")
    };
    let restored = reopen(dir.join("q.db")).await;
    let back = restored
        .get(&early.id)
        .await
        .unwrap()
        .expect("in the backup");
    assert!(restored.get(&late.id).await.unwrap().is_none());
    // The queued job may have run on after the backup: it counts an attempt (its retries kept),
    // so its next claim resumes it and looks for what it made; the event says why.
    assert_eq!(
        (back.attempts, back.max_attempts),
        (early.attempts + 1, early.max_attempts + 1)
    );
    let ev = restored.events(&early.id, 0, 10).await.unwrap();
    assert_eq!(
        ev.last().map(|e| e.kind.as_str()),
        Some("restored"),
        "{ev:?}"
    );
    let c = restored.claim("w", 60_000, 1).await.unwrap();
    assert_eq!(c[0].job.attempts, 2, "resumed, not a first attempt");
    let old = reopen(aside).await;
    assert!(
        old.get(&late.id).await.unwrap().is_some(),
        "the WAL went aside with its database"
    );
}

/// What is not a whole ec2jobd database of this or an older version is refused, and the
/// database is left as it was.
#[tokio::test]
async fn restore_refuses_newer_schemas_and_files_that_are_not_databases() {
    let f = fixture().await;
    let dir = f._dir.path().to_path_buf();
    let url = format!("sqlite://{}", dir.join("q.db").display());
    let job = enqueue(&*f.store, "i-0123456789abcdef0").await;
    let newer = dir.join("newer.db");
    backup(&url, &newer).await.unwrap();
    drop(f.store);
    {
        let mut conn = SqliteConnectOptions::new()
            .filename(&newer)
            .connect()
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (29991231000001, 'from the future', 1, x'00', 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    let garbage = dir.join("garbage.db");
    std::fs::write(&garbage, b"not a database at all, just some bytes").unwrap();
    let now = chrono::Utc::now();
    match restore(&url, &newer, now).await {
        Err(StoreError::Conflict(m)) => {
            assert!(
                m.contains("newer ec2jobd") && m.contains("29991231000001"),
                "{m}"
            )
        }
        other => panic!("newer schema: {other:?}"),
    }
    assert!(restore(&url, &garbage, now).await.is_err());
    assert!(restore(&url, &dir.join("absent.db"), now).await.is_err());
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("replaced") || n.contains("restoring"))
        .collect();
    assert!(names.is_empty(), "{names:?}");
    let opts = SqliteOptions {
        url,
        ..Default::default()
    };
    let store = SqliteStore::open(opts, Arc::new(ManualClock::new(1_800_000_000_000)))
        .await
        .unwrap();
    assert!(store.get(&job.id).await.unwrap().is_some());
}

/// Upgrades: a database one additive migration ahead (a newer daemon migrated it) is used as it
/// is; one whose newer migration says older daemons cannot use it is refused with a message that
/// says what to do, and is left as it was.
#[tokio::test]
async fn newer_schemas_are_used_when_additive_and_refused_when_not() {
    let f = fixture().await;
    let job = enqueue(&*f.store, "i-0123456789abcdef0").await;
    let opts = SqliteOptions {
        url: format!("sqlite://{}", f._dir.path().join("q.db").display()),
        ..Default::default()
    };
    let migrate = |sql: String| {
        let pool = f.store.pool.clone();
        async move { sqlx::raw_sql(&sql).execute(&pool).await.unwrap() }
    };
    migrate(crate::suite::future_migration(
        29991231000001,
        false,
        "X'00'",
    ))
    .await;
    let store = f.store.clone();
    drop(store);
    let clock = || Arc::new(ManualClock::new(1_800_000_000_000));
    let ahead = SqliteStore::open(opts.clone(), clock())
        .await
        .expect("additive: used");
    assert!(ahead.get(&job.id).await.unwrap().is_some());
    drop(ahead);
    migrate(crate::suite::future_migration(
        29991231000002,
        true,
        "X'00'",
    ))
    .await;
    match SqliteStore::open(opts, clock()).await {
        Err(StoreError::Unavailable(m)) => {
            assert!(
                m.contains("newer ec2jobd") && m.contains("29991231000002"),
                "{m}"
            )
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("an incompatible newer schema was used"),
    }
}

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

//! The queue's contract, one suite for both backends: every test here runs against SQLite (a
//! file in a temp dir) and against PostgreSQL (a fresh database on the server `scripts/test`
//! starts, `TEST_POSTGRES_URL`; without it the PostgreSQL half says so and returns), each with a
//! hand-moved clock. What only one backend has (query plans, file modes, replicas) is tested
//! beside it (`sqlite/tests.rs`, `postgres/tests.rs`).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use ec2jobd_spec::{
    Clock, Job, JobError, JobResults, JobSpec, JobState, ManualClock, Progress, Role,
};
use serde_json::json;

use crate::*;

/// A store on a fresh database, its clock, and what must live as long as it (the temp dir).
pub(crate) struct Fixture {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) clock: Arc<ManualClock>,
    _keep: Box<dyn Any + Send>,
}

const T0: i64 = 1_800_000_000_000;

pub(crate) async fn sqlite_fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(T0));
    let opts = SqliteOptions {
        url: format!("sqlite://{}", dir.path().join("q.db").display()),
        ..Default::default()
    };
    let store = SqliteStore::open(opts, clock.clone()).await.expect("open");
    Fixture {
        store: Arc::new(store),
        clock,
        _keep: Box::new(dir),
    }
}

/// A PostgreSQL store on a new database, or `None` when no server was given.
pub(crate) async fn postgres_fixture() -> Option<Fixture> {
    let url = crate::postgres::tests::fresh_database_url().await?;
    let clock = Arc::new(ManualClock::new(T0));
    let store = PgStore::open(pg_options(&url), clock.clone())
        .await
        .expect("open");
    Some(Fixture {
        store: Arc::new(store),
        clock,
        _keep: Box::new(()),
    })
}

/// Options for a test replica on `url`.
pub(crate) fn pg_options(url: &str) -> PgOptions {
    PgOptions {
        url: url.to_string(),
        max_connections: 8,
        poll_only: false,
        watch_interval: Duration::from_millis(50),
    }
}

pub(crate) fn spec(ids: &str) -> JobSpec {
    serde_json::from_value::<JobSpec>(json!({
        "action": "describe_instances", "targets": {"instance_ids": ids}
    }))
    .unwrap()
    .normalize()
    .unwrap()
}

pub(crate) fn new_job(ids: &str, key: Option<&str>) -> NewJob {
    NewJob {
        spec: spec(ids),
        idempotency_key: key.map(String::from),
        max_attempts: 3,
        timeout_ms: 60_000,
        created_by: None,
    }
}

pub(crate) async fn enqueue(s: &dyn Store, ids: &str) -> Job {
    match s.enqueue(new_job(ids, None)).await.unwrap() {
        Enqueued::Created(j) => j,
        Enqueued::Replayed(_) => panic!("no key, no replay"),
    }
}

/// A migration from a newer ec2jobd, for the schema compatibility tests: additive (a table of its
/// own), or (`requires`) one older daemons must not run against. `hex` writes a bytea/blob literal
/// of the backend (`X'00'` on SQLite, `'\\x00'` on PostgreSQL).
pub(crate) fn future_migration(version: i64, requires: bool, hex: &str) -> String {
    let mark = if requires {
        format!(
            "INSERT INTO meta (key, value) VALUES ('{}', '{version}') \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value;",
            crate::shared::SCHEMA_REQUIRES
        )
    } else {
        String::new()
    };
    format!(
        "CREATE TABLE future_{version} (id BIGINT PRIMARY KEY); \
         INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES ({version}, 'from a newer ec2jobd', TRUE, {hex}, 0); {mark}"
    )
}

/// Each named test of this file, once per backend.
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[tokio::test]
            async fn $name() {
                super::$name(super::sqlite_fixture().await).await
            })*
        }
        mod on_postgres {
            $(#[tokio::test]
            async fn $name() {
                if let Some(f) = super::postgres_fixture().await {
                    super::$name(f).await
                }
            })*
        }
    };
}

on_both_backends!(
    who_did_it_is_recorded_and_filterable,
    expired_lease_is_requeued_with_attempt_counted,
    lease_expiry_out_of_attempts_fails_the_job,
    fencing_stops_a_stale_worker,
    finishes_at_once_are_fenced_one_by_one,
    the_outbox_marks_many_jobs_at_once_with_their_events,
    claims_take_the_highest_priority_first,
    retry_is_not_claimable_before_its_time,
    idempotency_key_replays_and_conflicts,
    cancel_queued_at_once_and_running_by_flag,
    list_pages_newest_first_with_filters,
    concurrent_enqueues_all_land_and_progress_is_fenced,
    one_key_submitted_at_once_makes_one_job,
    release_gives_the_attempt_back,
    the_closing_progress_is_written_with_the_final_state,
    tokens_are_unique_and_revocable,
    refused_deliveries_are_cut_and_folded,
    prune_deletes_old_finished_jobs_and_deliveries_in_batches,
    parked_jobs_belong_to_their_lot_until_the_wait_ends,
    time_windows_find_jobs_created_in_them,
    sessions_end_by_expiry_sign_out_revocation_and_cap,
    search_and_hourly_finished_counts,
    search_never_matches_secret_fields,
);

/// A text search looks only at what every reader may see: a job whose `user_data` (top level or a
/// workflow step's) holds a secret is not found by any part of it, while its other fields are.
async fn search_never_matches_secret_fields(f: Fixture) {
    let specs = [
        serde_json::json!({"action": "run_instances", "dry_run": true, "params": {
            "image_id": "ami-12345678", "instance_type": "t3.nano",
            "user_data": "#!/bin/sh\nexport TOKEN=s3cret-alpha\n"}}),
        serde_json::json!({"action": "workflow", "steps": [
            {"action": "describe_instances", "targets": {"instance_ids": ["i-0ccccccc"]}},
            {"action": "run_instances", "params": {"image_id": "ami-12345678",
                "instance_type": "t3.nano", "user_data": "s3cret-beta"}}]}),
    ];
    let mut ids = Vec::new();
    for v in specs {
        let spec: ec2jobd_spec::JobSpec = serde_json::from_value(v).unwrap();
        let new = NewJob {
            spec: spec.normalize().unwrap(),
            idempotency_key: None,
            max_attempts: 3,
            timeout_ms: 60_000,
            created_by: None,
        };
        match f.store.enqueue(new).await.unwrap() {
            Enqueued::Created(j) => ids.push(j.id),
            Enqueued::Replayed(_) => panic!("no key, no replay"),
        }
    }
    let found = |text: &'static str| {
        let store = f.store.clone();
        async move {
            let q = ListQuery {
                text: Some(text.to_string()),
                limit: 10,
                ..Default::default()
            };
            let mut ids: Vec<String> = store
                .list(q)
                .await
                .unwrap()
                .jobs
                .into_iter()
                .map(|j| j.id)
                .collect();
            ids.sort();
            ids
        }
    };
    for secret in ["s3cret", "s3cret-a", "s3cret-b", "TOKEN=", "user_data"] {
        assert!(found(secret).await.is_empty(), "`{secret}` was found");
    }
    assert_eq!(
        found("t3.nano").await,
        ids,
        "the rest of the spec is searched"
    );
    assert_eq!(found("i-0ccccccc").await, ids[1..], "a step's targets too");
}

/// The dashboard's reads: text search on id or target (LIKE wildcards taken literally) and jobs
/// finished per hour and final state.
async fn search_and_hourly_finished_counts(f: Fixture) {
    let a = enqueue(&*f.store, "i-0aaaaaaa").await;
    let b = enqueue(&*f.store, "i-0bbbbbbb").await;
    let found = |text: &str| {
        let (store, text) = (f.store.clone(), text.to_string());
        async move {
            let q = ListQuery {
                text: Some(text),
                limit: 10,
                ..Default::default()
            };
            let p = store.list(q).await.unwrap();
            p.jobs.into_iter().map(|j| j.id).collect::<Vec<_>>()
        }
    };
    assert_eq!(found("i-0aaaaaaa").await, [a.id.as_str()]);
    assert_eq!(found(&b.id).await, [b.id.as_str()]);
    assert_eq!(
        found("i-0%").await,
        Vec::<String>::new(),
        "% is not a wildcard"
    );
    assert_eq!(
        found("i-0_aaaaaa").await,
        Vec::<String>::new(),
        "_ is not a wildcard"
    );
    assert_eq!(found("i-0").await, [b.id.as_str(), a.id.as_str()]);

    let hour = 3_600_000;
    let start = (T0 / hour + 1) * hour;
    f.clock.advance(start + 10 - f.clock.now_ms());
    f.store.claim("w", 60_000, 2).await.unwrap();
    f.store
        .finish(&a.id, "w", Finish::Succeeded(JobResults::default()))
        .await
        .unwrap();
    f.clock.advance(hour);
    let err = ec2jobd_spec::JobError {
        code: "X".into(),
        message: "x".into(),
        request_id: None,
    };
    f.store
        .finish(&b.id, "w", Finish::Failed(err, JobResults::default()))
        .await
        .unwrap();
    let counts = f.store.finished_per_hour(start).await.unwrap();
    assert_eq!(
        counts,
        [
            HourCount {
                hour_ms: start,
                state: JobState::Succeeded,
                count: 1
            },
            HourCount {
                hour_ms: start + hour,
                state: JobState::Failed,
                count: 1
            },
        ]
    );
    assert!(f
        .store
        .finished_per_hour(start + 2 * hour)
        .await
        .unwrap()
        .is_empty());
}

async fn expired_lease_is_requeued_with_attempt_counted(f: Fixture) {
    let job = enqueue(&*f.store, "i-01234567").await;
    let c = f.store.claim("w1", 1_000, 1).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].job.attempts, 1);
    assert_eq!(
        f.store.requeue_expired().await.unwrap(),
        0,
        "lease still valid"
    );
    let later = enqueue(&*f.store, "i-01234568").await;
    f.clock.advance(1_001);
    assert_eq!(f.store.requeue_expired().await.unwrap(), 1);
    let j = f.store.get(&job.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Queued);
    let c = f.store.claim("w2", 1_000, 1).await.unwrap();
    assert_eq!(
        c[0].job.id, job.id,
        "work under way goes before {}",
        later.id
    );
    assert_eq!(c[0].job.attempts, 2, "the re-queued attempt counts");
}

async fn lease_expiry_out_of_attempts_fails_the_job(f: Fixture) {
    let job = enqueue(&*f.store, "i-01234567").await;
    for _ in 0..3 {
        assert_eq!(f.store.claim("w", 10, 1).await.unwrap().len(), 1);
        f.clock.advance(11);
        f.store.requeue_expired().await.unwrap();
    }
    let j = f.store.get(&job.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Failed);
    assert_eq!(j.error.unwrap().code, "LeaseExpired");
}

async fn fencing_stops_a_stale_worker(f: Fixture) {
    let job = enqueue(&*f.store, "i-01234567").await;
    f.store.claim("stale", 100, 1).await.unwrap();
    f.clock.advance(101);
    f.store.requeue_expired().await.unwrap();
    let c = f.store.claim("fresh", 10_000, 1).await.unwrap();
    assert_eq!(c.len(), 1);
    // The stale worker wakes up and tries to write: every fenced write is refused.
    let r = f
        .store
        .finish(&job.id, "stale", Finish::Succeeded(JobResults::default()))
        .await;
    assert!(matches!(r, Err(StoreError::LeaseLost)), "{r:?}");
    assert!(matches!(
        f.store.heartbeat(&job.id, "stale", 100).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        f.store
            .checkpoint(&job.id, "stale", json!({"step": 1}))
            .await,
        Err(StoreError::LeaseLost)
    ));
    let j = f
        .store
        .finish(&job.id, "fresh", Finish::Succeeded(JobResults::default()))
        .await
        .unwrap();
    assert_eq!(j.state, JobState::Succeeded);
    // And nobody can finish it twice.
    assert!(f
        .store
        .finish(&job.id, "fresh", Finish::Succeeded(JobResults::default()))
        .await
        .is_err());
}

/// Jobs finished at once (written in one batch where the backend gathers them) are each fenced by
/// their own lease: of 40 running jobs, the 30 finished by their worker succeed (with the closing
/// progress given and their final event), the 10 an intruder tries are refused and stay running.
async fn the_outbox_marks_many_jobs_at_once_with_their_events(f: Fixture) {
    let mut ids = Vec::new();
    for _ in 0..3 {
        enqueue(&*f.store, "i-01234567").await;
        let c = f.store.claim("w", 60_000, 1).await.unwrap();
        f.store
            .finish(&c[0].job.id, "w", Finish::Succeeded(Default::default()))
            .await
            .unwrap();
        ids.push(c[0].job.id.clone());
    }
    let untouched = ids.pop().unwrap();
    let sent = |n: u32| NewEvent {
        kind: "notified".into(),
        message: format!("sent {n}"),
        data: json!({"n": n}),
    };
    f.store
        .outbox_done(vec![
            (ids[0].clone(), Some(sent(0))),
            (ids[1].clone(), None),
        ])
        .await
        .unwrap();
    let due: Vec<String> = f
        .store
        .outbox(f.clock.now_ms(), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|(j, _)| j.id)
        .collect();
    assert_eq!(
        due,
        std::slice::from_ref(&untouched),
        "only the job not marked is left"
    );
    let notified = |id: &str| {
        let store = f.store.clone();
        let id = id.to_string();
        async move {
            store
                .events(&id, 0, 100)
                .await
                .unwrap()
                .into_iter()
                .filter(|e| e.kind == "notified")
                .map(|e| (e.message, e.data))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        notified(&ids[0]).await,
        [("sent 0".to_string(), json!({"n": 0}))]
    );
    assert!(notified(&ids[1]).await.is_empty());
    assert!(notified(&untouched).await.is_empty());
}

async fn finishes_at_once_are_fenced_one_by_one(f: Fixture) {
    for _ in 0..40 {
        enqueue(&*f.store, "i-01234567").await;
    }
    let claimed = f.store.claim("w", 60_000, 40).await.unwrap();
    assert_eq!(claimed.len(), 40);
    let mut tasks = Vec::new();
    for (i, c) in claimed.iter().enumerate() {
        let (s, id) = (f.store.clone(), c.job.id.clone());
        let who = if i % 4 == 0 { "intruder" } else { "w" };
        tasks.push(tokio::spawn(async move {
            let last = Progress {
                phase: "done".into(),
                message: format!("closing {id}"),
                ..Default::default()
            };
            let r = s
                .finish_with(
                    &id,
                    who,
                    Finish::Succeeded(JobResults::default()),
                    Some(last),
                )
                .await;
            (id, who, r)
        }));
    }
    let (mut done, mut refused) = (0, 0);
    for t in tasks {
        let (id, who, r) = t.await.unwrap();
        match (who, r) {
            ("w", Ok(j)) => {
                assert_eq!(j.state, JobState::Succeeded);
                assert_eq!(j.progress.message, format!("closing {id}"));
                let ev = f.store.events(&id, 0, 10).await.unwrap();
                assert_eq!(
                    ev.last().map(|e| e.kind.as_str()),
                    Some("succeeded"),
                    "{ev:?}"
                );
                done += 1;
            }
            ("intruder", Err(StoreError::LeaseLost)) => {
                let j = f.store.get(&id).await.unwrap().unwrap();
                assert_eq!(j.state, JobState::Running);
                refused += 1;
            }
            (who, r) => panic!("{id} by {who}: {r:?}"),
        }
    }
    assert_eq!((done, refused), (30, 10));
}

/// Claims take the highest priority first, then the job due first: a later high-priority job
/// overtakes queued bulk work, and a low one waits for it.
async fn claims_take_the_highest_priority_first(f: Fixture) {
    let with = |priority: i32| {
        let mut n = new_job("i-01234567", None);
        n.spec.priority = Some(priority);
        n
    };
    let bulk: Vec<Job> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(enqueue(&*f.store, "i-01234567").await);
        }
        v
    };
    f.clock.advance(1);
    let low = match f.store.enqueue(with(-5)).await.unwrap() {
        Enqueued::Created(j) => j,
        Enqueued::Replayed(_) => unreachable!(),
    };
    f.clock.advance(1);
    let alarm = match f.store.enqueue(with(100)).await.unwrap() {
        Enqueued::Created(j) => j,
        Enqueued::Replayed(_) => unreachable!(),
    };
    let order: Vec<String> = {
        let mut v = Vec::new();
        while let Some(c) = f.store.claim("w", 10_000, 1).await.unwrap().pop() {
            v.push(c.job.id);
        }
        v
    };
    let want: Vec<String> = std::iter::once(alarm.id.clone())
        .chain({
            let mut ids: Vec<String> = bulk.iter().map(|j| j.id.clone()).collect();
            ids.sort();
            ids
        })
        .chain(std::iter::once(low.id.clone()))
        .collect();
    assert_eq!(order, want);
}

async fn retry_is_not_claimable_before_its_time(f: Fixture) {
    let job = enqueue(&*f.store, "i-01234567").await;
    f.store.claim("w", 10_000, 1).await.unwrap();
    let at = f.clock.now_ms() + 5_000;
    let err = JobError {
        code: "Throttling".into(),
        message: "slow down".into(),
        request_id: None,
    };
    let j = f
        .store
        .finish(
            &job.id,
            "w",
            Finish::Retry {
                error: err,
                run_after_ms: at,
                refund: false,
            },
        )
        .await
        .unwrap();
    assert_eq!(j.state, JobState::Queued);
    assert_eq!(j.next_attempt_at.unwrap().timestamp_millis(), at);
    assert_eq!(j.max_attempts, 3, "a transient error uses up its attempt");
    assert!(f.store.claim("w", 10_000, 1).await.unwrap().is_empty());
    f.clock.advance(5_000);
    let c = f.store.claim("w", 10_000, 1).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].job.attempts, 2);
    // No capacity says nothing about the job: the attempt is given back, and the progress says
    // when the next one is.
    let capacity = JobError {
        code: "InsufficientInstanceCapacity".into(),
        message: "no t3.micro".into(),
        request_id: None,
    };
    let j = f
        .store
        .finish(
            &job.id,
            "w",
            Finish::Retry {
                error: capacity,
                run_after_ms: f.clock.now_ms() + 1_000,
                refund: true,
            },
        )
        .await
        .unwrap();
    assert_eq!((j.attempts, j.max_attempts), (2, 4));
    assert!(
        j.progress
            .message
            .starts_with("EC2 has no capacity for it now"),
        "{:?}",
        j.progress
    );
    // A retry forgets what the attempt's last parked wait saw (the lot's failed call): the next
    // attempt looks again instead of failing on the old outcome.
    f.clock.advance(2_000);
    assert_eq!(f.store.claim("w", 10_000, 1).await.unwrap().len(), 1);
    let cp = json!({"phase": "parked", "ids": ["i-01234567"]});
    f.store
        .park(&job.id, "w", "lot", 1_000, cp, waiting())
        .await
        .unwrap();
    let failed_call = json!({"error": {"code": "InsufficientInstanceCapacity"}});
    f.store
        .unpark(&job.id, "lot", failed_call.clone(), "done")
        .await
        .unwrap();
    let c = f.store.claim("w", 10_000, 1).await.unwrap();
    assert_eq!(c[0].waited.as_ref(), Some(&failed_call));
    let retry = Finish::Retry {
        error: c[0].job.error.clone().expect("the last error"),
        run_after_ms: f.clock.now_ms(),
        refund: true,
    };
    f.store.finish(&job.id, "w", retry).await.unwrap();
    let c = f.store.claim("w", 10_000, 1).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].waited, None);
}

async fn idempotency_key_replays_and_conflicts(f: Fixture) {
    let a = f
        .store
        .enqueue(new_job("i-01234567", Some("k1")))
        .await
        .unwrap();
    let Enqueued::Created(a) = a else {
        panic!("first is created")
    };
    let b = f
        .store
        .enqueue(new_job("i-01234567", Some("k1")))
        .await
        .unwrap();
    let Enqueued::Replayed(b) = b else {
        panic!("same body replays")
    };
    assert_eq!(a.id, b.id);
    let c = f.store.enqueue(new_job("i-89abcdef", Some("k1"))).await;
    assert!(matches!(c, Err(StoreError::IdempotencyConflict { job_id }) if job_id == a.id));
    let page = f
        .store
        .list(ListQuery {
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 1, "a conflict stores nothing");
}

async fn cancel_queued_at_once_and_running_by_flag(f: Fixture) {
    let q = enqueue(&*f.store, "i-01234567").await;
    let Some(CancelOutcome::Cancelled(j)) = f.store.cancel(&q.id, "ops").await.unwrap() else {
        panic!("queued job cancels at once")
    };
    assert_eq!(j.state, JobState::Cancelled);
    assert!(f.store.claim("w", 1_000, 5).await.unwrap().is_empty());

    let r = enqueue(&*f.store, "i-01234567").await;
    f.store.claim("w", 10_000, 1).await.unwrap();
    assert!(matches!(
        f.store.cancel(&r.id, "ops").await.unwrap(),
        Some(CancelOutcome::Requested(_))
    ));
    assert!(
        f.store
            .heartbeat(&r.id, "w", 10_000)
            .await
            .unwrap()
            .cancel_requested
    );
    f.store
        .finish(&r.id, "w", Finish::Cancelled(JobResults::default()))
        .await
        .unwrap();
    assert!(matches!(
        f.store.cancel(&r.id, "ops").await.unwrap(),
        Some(CancelOutcome::AlreadyFinished(_))
    ));
    assert!(f
        .store
        .cancel("01ARZ3NDEKTSV4RRFFQ69G5FAV", "ops")
        .await
        .unwrap()
        .is_none());
    let kinds: Vec<String> = f
        .store
        .events(&r.id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        ["queued", "started", "cancel_requested", "cancelled"]
    );
}

async fn list_pages_newest_first_with_filters(f: Fixture) {
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(enqueue(&*f.store, "i-01234567").await.id);
        f.clock.advance(10);
    }
    let p1 = f
        .store
        .list(ListQuery {
            limit: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        p1.jobs.iter().map(|j| &j.id).collect::<Vec<_>>(),
        [&ids[4], &ids[3]]
    );
    let p2 = f
        .store
        .list(ListQuery {
            limit: 2,
            before_id: p1.next_cursor,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        p2.jobs.iter().map(|j| &j.id).collect::<Vec<_>>(),
        [&ids[2], &ids[1]]
    );
    let p3 = f
        .store
        .list(ListQuery {
            limit: 2,
            before_id: p2.next_cursor,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(p3.jobs.len(), 1);
    assert!(p3.next_cursor.is_none());
    f.store.claim("w", 1_000, 1).await.unwrap();
    let running = f
        .store
        .list(ListQuery {
            limit: 10,
            state: Some(JobState::Running),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(running.jobs.len(), 1);
    assert_eq!(
        running.jobs[0].id, ids[0],
        "oldest runnable is claimed first"
    );
}

async fn concurrent_enqueues_all_land_and_progress_is_fenced(f: Fixture) {
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let s = f.store.clone();
        tasks.push(tokio::spawn(
            async move { enqueue(&*s, "i-01234567").await.id },
        ));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200);
    let counts = f.store.counts().await.unwrap();
    assert!(counts.contains(&(JobState::Queued, 200)));
    let c = f.store.claim("w", 1_000, 3).await.unwrap();
    assert_eq!(c.len(), 3);
    let ev = NewEvent {
        kind: "progress".into(),
        message: "half".into(),
        data: json!({}),
    };
    f.store
        .progress(
            &c[0].job.id,
            "w",
            Progress {
                phase: "calling".into(),
                ..Default::default()
            },
            ev.clone(),
        )
        .await
        .unwrap();
    assert!(matches!(
        f.store
            .progress(&c[0].job.id, "other", Progress::default(), ev)
            .await,
        Err(StoreError::LeaseLost)
    ));
}

/// Submissions that arrive together (written in one batch where the backend gathers them) keep
/// every submission's own answer: of 20 with one key and body, one creates the job and the others
/// replay it; 10 with that key and another body conflict; 30 without a key all land, each with
/// its first event.
async fn one_key_submitted_at_once_makes_one_job(f: Fixture) {
    let mut tasks = Vec::new();
    for i in 0..60 {
        let s = f.store.clone();
        tasks.push(tokio::spawn(async move {
            let new = match i {
                0..20 => new_job("i-01234567", Some("together")),
                20..30 => new_job("i-89abcdef", Some("together")),
                _ => new_job("i-01234567", None),
            };
            (i, s.enqueue(new).await)
        }));
    }
    // Per body (0: the first, 1: the other, 2: no key): created, replayed, conflicting.
    let mut seen = [(0, 0, 0); 3];
    let (mut created, mut plain) = (Vec::new(), Vec::new());
    for t in tasks {
        let (i, r) = t.await.unwrap();
        let body = if i < 20 {
            0
        } else if i < 30 {
            1
        } else {
            2
        };
        match r {
            Ok(Enqueued::Created(j)) if body == 2 => plain.push(j.id),
            Ok(Enqueued::Created(j)) => {
                seen[body].0 += 1;
                created.push(j.id)
            }
            Ok(Enqueued::Replayed(j)) => {
                seen[body].1 += 1;
                created.push(j.id)
            }
            Err(StoreError::IdempotencyConflict { .. }) => seen[body].2 += 1,
            Err(e) => panic!("submission {i}: {e}"),
        }
    }
    // Whichever body won the key: its submissions made or replayed the job, the other's conflict.
    let (won, lost) = if seen[0].0 == 1 { (0, 1) } else { (1, 0) };
    let size = [20, 10];
    assert_eq!(seen[won], (1, size[won] - 1, 0), "{seen:?}");
    assert_eq!(seen[lost], (0, 0, size[lost]), "{seen:?}");
    created.sort();
    created.dedup();
    assert_eq!(created.len(), 1, "one job for the key: {created:?}");
    plain.sort();
    plain.dedup();
    assert_eq!(plain.len(), 30);
    let counts = f.store.counts().await.unwrap();
    assert!(counts.contains(&(JobState::Queued, 31)), "{counts:?}");
    for id in plain.iter().chain(&created) {
        let ev = f.store.events(id, 0, 10).await.unwrap();
        assert_eq!(ev.len(), 1, "{id}: {ev:?}");
    }
}

async fn release_gives_the_attempt_back(f: Fixture) {
    let job = enqueue(&*f.store, "i-01234567").await;
    f.store.claim("w", 1_000, 1).await.unwrap();
    f.store.release(&job.id, "w").await.unwrap();
    let j = f.store.get(&job.id).await.unwrap().unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Queued, 0));
}

/// The executor's closing line goes in the same write as the final state (no event of its own);
/// without one the last progress stays, its phase `done`.
async fn the_closing_progress_is_written_with_the_final_state(f: Fixture) {
    let a = enqueue(&*f.store, "i-01234567").await;
    let b = enqueue(&*f.store, "i-0aaaaaaa").await;
    f.store.claim("w", 60_000, 2).await.unwrap();
    let closing = Progress {
        phase: "done".into(),
        message: "stopped 1 instance".into(),
        done: Some(1),
        total: Some(1),
    };
    let results = JobResults {
        summary: Some("stopped 1 instance".into()),
        ..Default::default()
    };
    let events_before = f.store.events(&a.id, 0, 100).await.unwrap().len();
    let j = f
        .store
        .finish_with(
            &a.id,
            "w",
            Finish::Succeeded(results),
            Some(closing.clone()),
        )
        .await
        .unwrap();
    assert_eq!(j.progress, closing);
    let events = f.store.events(&a.id, 0, 100).await.unwrap();
    assert_eq!(events.len(), events_before + 1, "{events:?}");
    assert_eq!(events[events.len() - 1].kind, "succeeded");
    assert_eq!(events[events.len() - 1].message, "stopped 1 instance");
    let before = f.store.get(&b.id).await.unwrap().unwrap().progress;
    let j = f
        .store
        .finish(&b.id, "w", Finish::Cancelled(JobResults::default()))
        .await
        .unwrap();
    assert_eq!(j.progress.phase, "done");
    assert_eq!(j.progress.message, before.message);
}

async fn tokens_are_unique_and_revocable(f: Fixture) {
    let scoped = Scopes {
        actions: vec!["start_instances".into(), "stop_instances".into()],
        accounts: vec!["prod".into()],
        ..Default::default()
    };
    f.store
        .create_token("ops", Role::Admin, "ef", &Scopes::default(), "cli")
        .await
        .unwrap();
    f.store
        .create_token("ci", Role::Operator, "ab", &scoped, "ops")
        .await
        .unwrap();
    assert!(matches!(
        f.store
            .create_token("ci", Role::Admin, "cd", &Scopes::default(), "ops")
            .await,
        Err(StoreError::Conflict(_))
    ));
    let (t, h) = f.store.token_by_hash("ab").await.unwrap().unwrap();
    assert_eq!(
        (t.name.as_str(), t.role, h.as_str()),
        ("ci", Role::Operator, "ab")
    );
    assert_eq!(t.scopes, scoped, "scopes come back as stored");
    let listed = f.store.list_tokens().await.unwrap();
    let scopes: Vec<(&str, bool)> = listed
        .iter()
        .map(|t| (t.name.as_str(), t.scopes.is_empty()))
        .collect();
    assert_eq!(scopes, [("ci", false), ("ops", true)]);
    assert!(f.store.revoke_token("ci", "ops").await.unwrap());
    assert!(!f.store.revoke_token("ci", "ops").await.unwrap());
    assert!(f.store.token_by_hash("ab").await.unwrap().is_none());
    // Templates and hooks: created, replaced, deleted; deleting nothing records nothing.
    let body = json!({"spec": {"action": "describe_instances"}});
    assert!(f
        .store
        .put_named(Named::Template, "t", body.clone(), "ops")
        .await
        .unwrap());
    assert!(!f
        .store
        .put_named(Named::Template, "t", body, "ci")
        .await
        .unwrap());
    assert!(f
        .store
        .delete_named(Named::Template, "t", "ops")
        .await
        .unwrap());
    assert!(!f
        .store
        .delete_named(Named::Template, "t", "ops")
        .await
        .unwrap());
    assert!(f
        .store
        .put_named(Named::SnsHook, "h", json!({}), "ops")
        .await
        .unwrap());
    let stamp = f.store.named_stamp(Named::Schedule).await.unwrap();
    assert_eq!(stamp, (0, 0, 0));
    assert!(f
        .store
        .put_named(Named::Schedule, "s", json!({"cron": "@daily"}), "ops")
        .await
        .unwrap());
    assert_ne!(f.store.named_stamp(Named::Schedule).await.unwrap(), stamp);
    assert_eq!(
        f.store.list_named(Named::Schedule).await.unwrap(),
        [("s".to_string(), json!({"cron": "@daily"}))]
    );
    let log = f.store.audit_log(None, 100).await.unwrap();
    let seen: Vec<(&str, &str, &str, &str)> = log
        .iter()
        .map(|e| {
            (
                e.by.as_str(),
                e.what.as_str(),
                e.name.as_str(),
                e.change.as_str(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("ops", "schedule", "s", "created"),
            ("ops", "sns_hook", "h", "created"),
            ("ops", "template", "t", "deleted"),
            ("ci", "template", "t", "replaced"),
            ("ops", "template", "t", "created"),
            ("ops", "token", "ci", "revoked"),
            ("ops", "token", "ci", "created"),
            ("cli", "token", "ops", "created"),
        ],
        "newest first; the refused second `ci` left no row"
    );
    let older = f.store.audit_log(Some(log[3].id), 2).await.unwrap();
    assert_eq!(older.len(), 2);
    assert_eq!(older[0].id, log[4].id);
}

/// Refused SNS deliveries cannot fill the disk: every caller-supplied text is cut, and repeats of
/// one kind to one hook within a minute count into one row (a new row once the minute has passed).
async fn refused_deliveries_are_cut_and_folded(f: Fixture) {
    let huge = "A".repeat(60_000);
    let refusal = |code: &str| NewDelivery {
        hook: "alarms".into(),
        message_id: Some(huge.clone()),
        topic_arn: Some(format!("arn:{huge}")),
        kind: Some(huge.clone()),
        outcome: "rejected".into(),
        reason: Some(format!("topic `{huge}` is not accepted")),
        code: Some(code.into()),
        ..Default::default()
    };
    for _ in 0..300 {
        f.store.record_delivery(refusal("topic")).await.unwrap();
    }
    f.store.record_delivery(refusal("signature")).await.unwrap();
    let rows = f.store.list_deliveries(None, 500).await.unwrap();
    assert_eq!(rows.len(), 2, "one row per kind: {rows:?}");
    let topic = rows
        .iter()
        .find(|d| d.code.as_deref() == Some("topic"))
        .unwrap();
    assert_eq!(topic.count, 300);
    assert!(topic.last_at.is_some());
    for text in [
        &topic.message_id,
        &topic.topic_arn,
        &topic.kind,
        &topic.reason,
    ] {
        let t = text.as_deref().unwrap();
        assert!(t.len() <= DELIVERY_FIELD_MAX, "{} bytes", t.len());
        assert!(t.ends_with('…'));
    }
    // A minute later the same refusal starts a new row; accepted deliveries are never folded.
    f.clock.advance(REFUSAL_FOLD_MS + 1);
    f.store.record_delivery(refusal("topic")).await.unwrap();
    for _ in 0..2 {
        f.store
            .record_delivery(NewDelivery {
                hook: "alarms".into(),
                outcome: "accepted".into(),
                code: Some("topic".into()),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let rows = f.store.list_deliveries(None, 500).await.unwrap();
    assert_eq!(rows.len(), 5);
    assert_eq!(rows[2].count, 1, "the new minute's refusal: {:?}", rows[2]);
}

/// Retention deletes finished jobs created before the cutoff (their events with them) once they
/// left the outbox, in batches; running and queued jobs, newer jobs and outbox entries stay. Old
/// deliveries go oldest first.
async fn prune_deletes_old_finished_jobs_and_deliveries_in_batches(f: Fixture) {
    let mut old = Vec::new();
    for _ in 0..5 {
        let j = enqueue(&*f.store, "i-01234567").await;
        let c = f.store.claim("w", 60_000, 1).await.unwrap();
        f.store
            .finish(&c[0].job.id, "w", Finish::Succeeded(Default::default()))
            .await
            .unwrap();
        old.push(j.id);
    }
    let queued_old = enqueue(&*f.store, "i-01234567").await;
    f.store
        .record_delivery(NewDelivery {
            hook: "h".into(),
            outcome: "accepted".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    f.clock.advance(1_000);
    let cutoff = f.clock.now_ms();
    f.clock.advance(1_000);
    let newer = enqueue(&*f.store, "i-01234567").await;
    // Still in the outbox: nothing to prune yet.
    assert_eq!(f.store.prune_jobs(cutoff, 100, true).await.unwrap(), 0);
    let due: Vec<_> = f.store.outbox(f.clock.now_ms(), 100).await.unwrap();
    assert_eq!(due.len(), 5);
    f.store
        .outbox_done(due.into_iter().map(|(j, _)| (j.id, None)).collect())
        .await
        .unwrap();
    assert_eq!(f.store.prune_jobs(cutoff, 100, true).await.unwrap(), 5);
    assert_eq!(f.store.prune_jobs(cutoff, 2, false).await.unwrap(), 2);
    assert_eq!(f.store.prune_jobs(cutoff, 100, false).await.unwrap(), 3);
    for id in &old {
        assert!(f.store.get(id).await.unwrap().is_none());
        assert!(f.store.events(id, 0, 10).await.unwrap().is_empty());
    }
    assert!(f.store.get(&queued_old.id).await.unwrap().is_some());
    assert!(f.store.get(&newer.id).await.unwrap().is_some());
    assert_eq!(
        f.store.prune_deliveries(cutoff, 100, true).await.unwrap(),
        1
    );
    assert_eq!(
        f.store.prune_deliveries(cutoff, 100, false).await.unwrap(),
        1
    );
    assert!(f.store.list_deliveries(None, 10).await.unwrap().is_empty());
}

/// A parked job is held by its lot, not by the worker that parked it: the worker's writes are
/// refused, the lot renews every lease it holds in one call (learning of cancels), and ending the
/// wait queues the job again with the outcome, the attempt counted once.
fn waiting() -> Progress {
    Progress {
        phase: "waiting".into(),
        message: "waiting".into(),
        done: None,
        total: None,
    }
}

async fn parked_jobs_belong_to_their_lot_until_the_wait_ends(f: Fixture) {
    let job = enqueue(&*f.store, "i-01234567").await;
    let other = enqueue(&*f.store, "i-01234568").await;
    assert_eq!(f.store.claim("w", 1_000, 2).await.unwrap().len(), 2);
    let cp = json!({"phase": "parked", "ids": ["i-01234567"]});
    f.store
        .park(&job.id, "w", "lot", 1_000, cp.clone(), waiting())
        .await
        .unwrap();
    f.store
        .park(&other.id, "w", "lot", 1_000, cp.clone(), waiting())
        .await
        .unwrap();
    // The worker that parked it no longer holds it.
    assert!(matches!(
        f.store.heartbeat(&job.id, "w", 1_000).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        f.store
            .finish(&job.id, "w", Finish::Succeeded(JobResults::default()))
            .await,
        Err(StoreError::LeaseLost)
    ));
    // The lot's renewal keeps both past the first lease, and reports a cancel.
    f.clock.advance(900);
    f.store.cancel(&other.id, "ops").await.unwrap();
    let mut held = f.store.renew_lot("lot", 1_000).await.unwrap();
    held.sort();
    let mut want = vec![(job.id.clone(), false), (other.id.clone(), true)];
    want.sort();
    assert_eq!(held, want);
    f.clock.advance(900);
    assert_eq!(f.store.requeue_expired().await.unwrap(), 0, "renewed");
    assert_eq!(
        f.store.get(&job.id).await.unwrap().unwrap().state,
        JobState::Running,
        "a parked job stays running"
    );
    // Another lot cannot end the wait; this one can.
    let outcome = json!({"error": null});
    assert!(matches!(
        f.store
            .unpark(&job.id, "other-lot", outcome.clone(), "done")
            .await,
        Err(StoreError::LeaseLost)
    ));
    f.store
        .unpark(&job.id, "lot", outcome.clone(), "done")
        .await
        .unwrap();
    let c = f.store.claim("w2", 1_000, 1).await.unwrap();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].job.id, job.id);
    assert_eq!(c[0].job.attempts, 1, "resuming is not another attempt");
    assert_eq!(c[0].checkpoint.as_ref(), Some(&cp));
    assert_eq!(c[0].waited.as_ref(), Some(&outcome));
    let kinds: Vec<String> = f
        .store
        .events(&job.id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        ["queued", "started", "parked", "wait_ended", "resumed"]
    );
    // Both backends word a claim's event alike (PostgreSQL writes it in the claim's statement).
    let events = f.store.events(&job.id, 0, 100).await.unwrap();
    let said = |kind: &str| {
        let e = events.iter().find(|e| e.kind == kind).expect("event");
        (e.kind.clone(), e.message.clone(), e.data.clone())
    };
    // The first claim was attempt 1 too, without a wait's outcome.
    let first = Claimed {
        waited: None,
        ..c[0].clone()
    };
    for (kind, claim, worker) in [("started", first, "w"), ("resumed", c[0].clone(), "w2")] {
        let (k, m, d) = crate::shared::claim_event(&claim, worker);
        assert_eq!(said(kind), (k.to_string(), m, d), "{kind}");
    }
    // Parking again forgets the last outcome.
    f.store
        .park(&job.id, "w2", "lot", 1_000, cp.clone(), waiting())
        .await
        .unwrap();
    // At shutdown the lot gives its jobs back; the next claim has no outcome and counts no attempt.
    assert_eq!(f.store.release_lot("lot").await.unwrap(), 2);
    let c = f.store.claim("w3", 1_000, 2).await.unwrap();
    assert_eq!(c.len(), 2);
    for c in &c {
        assert_eq!(c.job.attempts, 1);
        assert_eq!(c.waited, None);
    }
    // A lot that dies leaves its leases to expire like a worker's.
    for c in &c {
        f.store
            .park(&c.job.id, "w3", "dead-lot", 1_000, cp.clone(), waiting())
            .await
            .unwrap();
    }
    f.clock.advance(1_001);
    assert_eq!(f.store.requeue_expired().await.unwrap(), 2);
}

/// A time window finds exactly the jobs created in it.
async fn time_windows_find_jobs_created_in_them(f: Fixture) {
    let t0 = f.clock.now_ms();
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(enqueue(&*f.store, "i-01234567").await.id);
        f.clock.advance(60_000);
    }
    // Created at t0, +1 min, ... +4 min: the window [+1 min, +3 min) holds the 2nd and 3rd.
    let page = f
        .store
        .list(ListQuery {
            since_ms: Some(t0 + 60_000),
            until_ms: Some(t0 + 180_000),
            limit: 50,
            ..Default::default()
        })
        .await
        .unwrap();
    let got: Vec<&str> = page.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(got, vec![ids[2].as_str(), ids[1].as_str()]);
}

/// Who submitted a job is recorded on it and its first event, and lists filter by it; who asked
/// to cancel is recorded on the cancel's event.
async fn who_did_it_is_recorded_and_filterable(f: Fixture) {
    let by = |who: &str| {
        let mut n = new_job("i-01234567", None);
        n.created_by = Some(who.into());
        n
    };
    let mut ci = Vec::new();
    for who in ["ci", "ops", "ci", "sns:alarms"] {
        let Enqueued::Created(j) = f.store.enqueue(by(who)).await.unwrap() else {
            panic!("created")
        };
        assert_eq!(j.created_by.as_deref(), Some(who));
        if who == "ci" {
            ci.push(j.id);
        }
    }
    let page = f
        .store
        .list(ListQuery {
            created_by: Some("ci".into()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let got: Vec<&str> = page.jobs.iter().map(|j| j.id.as_str()).collect();
    assert_eq!(got, [ci[1].as_str(), ci[0].as_str()], "newest first");
    assert!(page
        .jobs
        .iter()
        .all(|j| j.created_by.as_deref() == Some("ci")));
    f.store.cancel(&ci[0], "ops").await.unwrap();
    let events = f.store.events(&ci[0], 0, 10).await.unwrap();
    let who: Vec<(&str, Option<&str>)> = events
        .iter()
        .map(|e| (e.kind.as_str(), e.by.as_deref()))
        .collect();
    assert_eq!(who, [("queued", Some("ci")), ("cancelled", Some("ops"))]);
}

/// A session acts as its token until it expires, is signed out, or its token is revoked; one
/// token keeps at most MAX_SESSIONS_PER_TOKEN (the oldest end first).
async fn sessions_end_by_expiry_sign_out_revocation_and_cap(f: Fixture) {
    f.store
        .create_token("ops", Role::Operator, "tok-ops", &Scopes::default(), "cli")
        .await
        .unwrap();
    let new = |n: i64| crate::NewSession {
        session_sha256: format!("s{n}"),
        token_sha256: "tok-ops".into(),
        csrf: format!("c{n}"),
        created_at_ms: 1_000 + n,
        expires_at_ms: 10_000 + n,
    };
    f.store.create_session(&new(0)).await.unwrap();
    let s = f.store.session("s0", 5_000).await.unwrap().unwrap();
    assert_eq!(
        (s.token.name.as_str(), s.token.role),
        ("ops", Role::Operator)
    );
    assert_eq!((s.csrf.as_str(), s.expires_at_ms), ("c0", 10_000));
    assert!(
        f.store.session("s0", 10_000).await.unwrap().is_none(),
        "expired"
    );
    assert!(f.store.session("nope", 5_000).await.unwrap().is_none());
    f.store.end_session("s0").await.unwrap();
    assert!(
        f.store.session("s0", 5_000).await.unwrap().is_none(),
        "signed out"
    );
    for n in 1..=crate::MAX_SESSIONS_PER_TOKEN + 1 {
        f.store.create_session(&new(n)).await.unwrap();
    }
    assert!(
        f.store.session("s1", 5_000).await.unwrap().is_none(),
        "the oldest ended"
    );
    let last = crate::MAX_SESSIONS_PER_TOKEN + 1;
    for n in 2..=last {
        assert!(
            f.store
                .session(&format!("s{n}"), 5_000)
                .await
                .unwrap()
                .is_some(),
            "s{n}"
        );
    }
    assert!(f.store.revoke_token("ops", "cli").await.unwrap());
    assert!(
        f.store
            .session(&format!("s{last}"), 5_000)
            .await
            .unwrap()
            .is_none(),
        "a revoked token's sessions end"
    );
}

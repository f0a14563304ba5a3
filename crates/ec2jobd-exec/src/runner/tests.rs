//! Runner behaviour with a scripted executor: retries and backoff, permanent failures, time limits,
//! cancellation, wake-up on enqueue, and release at shutdown. The EC2 executor itself is tested
//! end to end against moto in tests/.

use ec2jobd_store::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::AtomicU32;

use ec2jobd_spec::{JobSpec, JobState, SystemClock};
use ec2jobd_store::{Enqueued, NewJob, SqliteOptions, SqliteStore};
use serde_json::json;

use super::*;

/// Plays back one scripted step per attempt.
enum Step {
    Ok,
    Transient,
    Permanent,
    Hang,
    /// Works (counts a tick every 10 ms, as an attempt making EC2 calls would) until dropped.
    Tick,
    WaitForCancel,
}

struct Script {
    steps: Mutex<VecDeque<Step>>,
    calls: AtomicU32,
    /// Attempts whose `Hang` or `Tick` was stopped from outside (their future dropped).
    dropped: Arc<AtomicU32>,
    /// Ticks of `Tick` attempts.
    ticks: AtomicU32,
}

/// Counts a hanging attempt's future being dropped.
struct Dropped(Arc<AtomicU32>);

impl Drop for Dropped {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[async_trait]
impl Executor for Script {
    async fn execute(&self, ctx: &ExecCtx) -> Result<JobResults, ExecError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let step = self.steps.lock().unwrap().pop_front().unwrap_or(Step::Ok);
        match step {
            Step::Ok => Ok(JobResults {
                summary: Some("done".into()),
                ..Default::default()
            }),
            Step::Transient => Err(ExecError::Failed {
                error: JobError {
                    code: "RequestLimitExceeded".into(),
                    message: "slow down".into(),
                    request_id: Some("req-1".into()),
                },
                transient: true,
                results: JobResults::default(),
            }),
            Step::Permanent => Err(ExecError::permanent("InvalidInstanceID.NotFound", "gone")),
            Step::Hang => {
                let _guard = Dropped(self.dropped.clone());
                tokio::time::sleep(Duration::from_secs(3600)).await;
                std::mem::forget(_guard);
                Ok(JobResults::default())
            }
            Step::Tick => {
                let _guard = Dropped(self.dropped.clone());
                loop {
                    self.ticks.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Step::WaitForCancel => {
                ctx.progress("waiting", "waiting for cancel", None, None)
                    .await?;
                ctx.cancelled().await;
                ctx.check_cancel(&JobResults::default())?;
                Ok(JobResults::default())
            }
        }
    }
}

struct Rig {
    store: Arc<SqliteStore>,
    runner: Arc<Runner>,
    script: Arc<Script>,
    stop: CancellationToken,
    handle: Option<tokio::task::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

fn cfg() -> RunnerConfig {
    RunnerConfig {
        workers: 2,
        lease: Duration::from_secs(30),
        heartbeat: Duration::from_millis(50),
        // Long on purpose: a job that starts promptly proves the enqueue woke a worker.
        poll_interval: Duration::from_secs(3600),
        reap_interval: Duration::from_secs(3600),
        backoff_base: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
        grace: Duration::from_millis(100),
    }
}

async fn rig(steps: Vec<Step>, cfg: RunnerConfig) -> Rig {
    rig_with_queued(steps, cfg, 0).await.0
}

/// A rig whose queue holds `queued` jobs before its runner starts; their ids.
async fn rig_with_queued(steps: Vec<Step>, cfg: RunnerConfig, queued: usize) -> (Rig, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(
        SqliteStore::open(
            SqliteOptions {
                url: format!("sqlite://{}", dir.path().join("r.db").display()),
                ..Default::default()
            },
            Arc::new(SystemClock),
        )
        .await
        .unwrap(),
    );
    let script = Arc::new(Script {
        steps: Mutex::new(steps.into()),
        calls: AtomicU32::new(0),
        dropped: Arc::default(),
        ticks: AtomicU32::new(0),
    });
    let runner = Arc::new(Runner::new(
        store.clone(),
        script.clone(),
        cfg,
        Arc::new(()),
        Arc::new(SystemClock),
        7,
    ));
    let mut ids = Vec::new();
    for _ in 0..queued {
        ids.push(submit(&store, 5, 60_000).await);
    }
    let stop = CancellationToken::new();
    let handle = Some(runner.start(stop.clone()));
    let rig = Rig {
        store,
        runner,
        script,
        stop,
        handle,
        _dir: dir,
    };
    (rig, ids)
}

async fn submit(store: &SqliteStore, max_attempts: u32, timeout_ms: i64) -> String {
    let spec: JobSpec = serde_json::from_value::<JobSpec>(json!({
        "action": "describe_instances", "targets": {"instance_ids": "i-01234567"}
    }))
    .unwrap()
    .normalize()
    .unwrap();
    match store
        .enqueue(NewJob {
            spec,
            idempotency_key: None,
            max_attempts,
            timeout_ms,
            created_by: None,
        })
        .await
        .unwrap()
    {
        Enqueued::Created(j) => j.id,
        Enqueued::Replayed(j) => j.id,
    }
}

/// Polls until the job is in `state` or ten seconds pass.
async fn wait_state(store: &SqliteStore, id: &str, state: JobState) -> Job {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let j = store.get(id).await.unwrap().unwrap();
        if j.state == state {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} stuck in {} (wanted {state})",
            j.state
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Self-fencing: an attempt whose lease is not renewed in time (heartbeats far apart here, as when
/// the database does not answer them) is paused when its fence lapses, a quarter of the lease
/// before the lease runs out: it does no more work (its future is not polled). Once the lease has
/// run out the job is claimed again and succeeds; the paused attempt, not renewed within a lease,
/// is dropped without writing anything.
#[tokio::test]
async fn an_attempt_stops_acting_before_its_lease_can_run_out() {
    let mut c = cfg();
    c.lease = Duration::from_secs(2);
    c.heartbeat = Duration::from_secs(3600);
    c.reap_interval = Duration::from_millis(100);
    let (r, ids) = rig_with_queued(vec![Step::Tick, Step::Ok], c, 1).await;
    let j = wait_state(&r.store, &ids[0], JobState::Succeeded).await;
    assert_eq!(j.attempts, 2, "claimed again once the lease ran out");
    let ticks = r.script.ticks.load(Ordering::SeqCst);
    assert!(
        ticks > 0,
        "the first attempt worked before its fence lapsed"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.script.dropped.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the paused attempt was never given up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        r.script.ticks.load(Ordering::SeqCst),
        ticks,
        "no work while paused, from before the job was claimed again until it was given up"
    );
    let kinds: Vec<String> = r
        .store
        .events(&ids[0], 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(
        !kinds.iter().any(|k| k.contains("retry") || k == "failed"),
        "{kinds:?}"
    );
}

#[tokio::test]
async fn transient_failures_retry_until_success() {
    let r = rig(vec![Step::Transient, Step::Transient, Step::Ok], cfg()).await;
    let id = submit(&r.store, 5, 60_000).await;
    let j = wait_state(&r.store, &id, JobState::Succeeded).await;
    assert_eq!(j.attempts, 3);
    assert_eq!(r.script.calls.load(Ordering::SeqCst), 3);
    let kinds: Vec<String> = r
        .store
        .events(&id, 0, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| *k == "retry_scheduled").count(),
        2,
        "{kinds:?}"
    );
}

#[tokio::test]
async fn idle_workers_share_one_claim() {
    // Eight idle workers, eight due jobs: one claim takes them all (one lease owner, named in
    // each job's `started` event), not one claim per worker.
    let mut c = cfg();
    c.workers = 8;
    let (r, ids) = rig_with_queued((0..8).map(|_| Step::Hang).collect(), c, 8).await;
    let mut owners = std::collections::BTreeSet::new();
    for id in &ids {
        wait_state(&r.store, id, JobState::Running).await;
        let events = r.store.events(id, 0, 100).await.unwrap();
        let started = events
            .iter()
            .find(|e| e.kind == "started")
            .expect("started event");
        owners.insert(
            started.data["worker"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(owners.len(), 1, "claims: {owners:?}");
    assert_eq!(r.runner.running(), 8, "every worker runs one job");
}

#[tokio::test]
async fn transient_failures_stop_at_max_attempts() {
    let r = rig(vec![Step::Transient, Step::Transient], cfg()).await;
    let id = submit(&r.store, 2, 60_000).await;
    let j = wait_state(&r.store, &id, JobState::Failed).await;
    assert_eq!(j.attempts, 2);
    let e = j.error.unwrap();
    assert_eq!(e.code, "RequestLimitExceeded");
    assert_eq!(e.request_id.as_deref(), Some("req-1"));
}

#[tokio::test]
async fn permanent_failure_fails_at_once() {
    let r = rig(vec![Step::Permanent], cfg()).await;
    let id = submit(&r.store, 5, 60_000).await;
    let j = wait_state(&r.store, &id, JobState::Failed).await;
    assert_eq!(j.attempts, 1);
    assert_eq!(j.error.unwrap().code, "InvalidInstanceID.NotFound");
}

#[tokio::test]
async fn attempt_time_limit_fails_the_job() {
    let r = rig(vec![Step::Hang], cfg()).await;
    let id = submit(&r.store, 5, 100).await;
    let j = wait_state(&r.store, &id, JobState::Failed).await;
    assert_eq!(j.error.unwrap().code, "JobTimeout");
}

#[tokio::test]
async fn cancel_reaches_a_running_job_through_the_heartbeat() {
    let r = rig(vec![Step::WaitForCancel], cfg()).await;
    let id = submit(&r.store, 5, 60_000).await;
    // Wait for the executor to report it is waiting, then cancel through the store only (as another
    // replica would): the heartbeat must carry the request to the worker.
    let deadline = Instant::now() + Duration::from_secs(10);
    while r.store.get(&id).await.unwrap().unwrap().progress.phase != "waiting" {
        assert!(Instant::now() < deadline, "executor never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    r.store.cancel(&id, "ops").await.unwrap();
    let j = wait_state(&r.store, &id, JobState::Cancelled).await;
    assert!(j.finished_at.is_some());
}

#[tokio::test]
async fn shutdown_releases_running_jobs_after_grace() {
    let mut r = rig(vec![Step::Hang], cfg()).await;
    let id = submit(&r.store, 5, 60_000).await;
    wait_state(&r.store, &id, JobState::Running).await;
    r.stop.cancel();
    r.handle.take().unwrap().await.unwrap();
    let j = r.store.get(&id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Queued, "released for the next start");
    assert_eq!(j.attempts, 0, "a released attempt is not counted");
    assert_eq!(r.runner.running(), 0);
}

#[test]
fn backoff_grows_with_jitter_inside_bounds() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut c = cfg();
        c.backoff_base = Duration::from_secs(1);
        c.backoff_max = Duration::from_secs(60);
        c.workers = 0;
        let r = rig(vec![], c).await;
        let mut prev = Duration::ZERO;
        for attempt in 1..=8u32 {
            let full = Duration::from_secs(1 << (attempt - 1)).min(Duration::from_secs(60));
            let d = r.runner.backoff(attempt);
            assert!(
                d >= full / 2 && d <= full,
                "attempt {attempt}: {d:?} not in [{:?}, {full:?}]",
                full / 2
            );
            assert!(d >= prev, "backoff shrank at attempt {attempt}");
            prev = d;
        }
        // The cap holds far out, and jitter makes two draws differ.
        let a: Vec<Duration> = (0..8).map(|_| r.runner.backoff(30)).collect();
        assert!(a.iter().all(|d| *d <= Duration::from_secs(60)));
        assert!(a.windows(2).any(|w| w[0] != w[1]), "no jitter: {a:?}");
    });
}

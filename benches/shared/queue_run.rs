//! The queue's own cost, shared by the benchmarks of both backends (`daemon.rs` for SQLite,
//! `replicas.rs` for PostgreSQL): describe jobs enqueued up front, then claimed and finished
//! either through the store's API one job per claim, or through the daemon's own [`Runner`] (one
//! claimer for all idle workers, each worker finishing its job) with an executor that succeeds at
//! once, so only the queue's writes are measured. Not a test helper: tests never time things.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ec2jobd_exec::runner::{ExecCtx, ExecError, Executor, Runner, RunnerConfig};
use ec2jobd_spec::{JobResults, SystemClock};
use ec2jobd_store::{Finish, NewJob, Store};

/// Enqueues `jobs` describe jobs from 16 tasks, spread over `stores`.
async fn enqueue(stores: &[Arc<dyn Store>], jobs: u64) {
    let spec: ec2jobd_spec::JobSpec = serde_json::from_value(
        serde_json::json!({"action": "describe_instances", "targets": {"tags": {"Bench": "yes"}}}),
    )
    .expect("spec");
    let spec = spec.normalize().expect("normalize");
    let mut enq = Vec::new();
    for t in 0..16u64 {
        let (store, spec) = (stores[t as usize % stores.len()].clone(), spec.clone());
        enq.push(tokio::spawn(async move {
            for _ in (t..jobs).step_by(16) {
                store
                    .enqueue(NewJob {
                        spec: spec.clone(),
                        idempotency_key: None,
                        max_attempts: 3,
                        timeout_ms: 60_000,
                        created_by: None,
                    })
                    .await
                    .expect("enqueue");
            }
        }));
    }
    for t in enq {
        t.await.expect("enqueue task");
    }
}

/// `jobs` claimed and finished one at a time by `workers` tasks calling the store's API (one
/// job per claim); tasks use `stores` in turn (replicas of one queue). Returns the jobs finished
/// and the jobs per second.
pub async fn claim_complete_rate(
    stores: &[Arc<dyn Store>],
    jobs: u64,
    workers: usize,
) -> (u64, f64) {
    enqueue(stores, jobs).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let store = stores[w % stores.len()].clone();
        tasks.push(tokio::spawn(async move {
            let me = format!("bench-{w}");
            let mut done = 0u64;
            loop {
                let got = store.claim(&me, 60_000, 1).await.expect("claim");
                if got.is_empty() {
                    return done;
                }
                for c in got {
                    store
                        .finish(&c.job.id, &me, Finish::Succeeded(Default::default()))
                        .await
                        .expect("finish");
                    done += 1;
                }
            }
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("worker");
    }
    (done, done as f64 / start.elapsed().as_secs_f64())
}

/// Succeeds at once: the runner's path without EC2.
struct Done;

#[async_trait::async_trait]
impl Executor for Done {
    async fn execute(&self, _: &ExecCtx) -> Result<JobResults, ExecError> {
        Ok(JobResults {
            summary: Some("done".into()),
            ..Default::default()
        })
    }
}

/// `jobs` run by one [`Runner`] per store with `workers` workers each, as the daemon runs them
/// (one claim for every idle worker, the lease renewed by a heartbeat, the finish with its
/// closing line). Returns the jobs finished and the jobs per second, from the runners' start to
/// the last final state.
pub async fn runner_rate(stores: &[Arc<dyn Store>], jobs: u64, workers: usize) -> (u64, f64) {
    enqueue(stores, jobs).await;
    let finished = Arc::new(AtomicU64::new(0));
    let all_done = Arc::new(tokio::sync::Notify::new());
    let stop = tokio_util::sync::CancellationToken::new();
    let cfg = RunnerConfig {
        workers,
        lease: Duration::from_secs(60),
        heartbeat: Duration::from_secs(20),
        poll_interval: Duration::from_secs(1),
        reap_interval: Duration::from_secs(30),
        backoff_base: Duration::from_secs(1),
        backoff_max: Duration::from_secs(60),
        grace: Duration::from_secs(5),
    };
    let start = Instant::now();
    let mut runs = Vec::new();
    for (n, store) in stores.iter().enumerate() {
        let runner = Arc::new(Runner::new(
            store.clone(),
            Arc::new(Done),
            cfg.clone(),
            Arc::new(()),
            Arc::new(SystemClock),
            n as u64,
        ));
        let (finished, all_done) = (finished.clone(), all_done.clone());
        runner.on_finished(Arc::new(move |_| {
            if finished.fetch_add(1, Ordering::SeqCst) + 1 == jobs {
                all_done.notify_one();
            }
        }));
        runs.push(runner.start(stop.clone()));
    }
    all_done.notified().await;
    let elapsed = start.elapsed().as_secs_f64();
    stop.cancel();
    for r in runs {
        r.await.expect("runner");
    }
    let done = finished.load(Ordering::SeqCst);
    (done, done as f64 / elapsed)
}

//! The runner: worker tasks that claim jobs, keep their leases alive, run them through an
//! [`Executor`], and record the outcome, retrying transient failures with backoff.
//!
//! Life of one attempt: claim (lease) → heartbeat task renews the lease and picks up cancel requests
//! → executor runs under the job's time limit → `finish` (fenced by the worker id). A worker whose
//! lease was taken over writes nothing. On shutdown workers stop claiming, running attempts get the
//! grace period to finish, and whatever is still running after it is released back to the queue so
//! the next start resumes it from its last checkpoint.
//!
//! An executor that reaches a wait needing no worker returns [`ExecError::Park`]: the runner parks
//! the job in the store (checkpoint saved, lease handed to the [`Parking`] lot) and hands the wait to
//! the lot, and the worker takes the next job. When the wait ends the lot queues the job again and
//! a worker claims it with the wait's outcome ([`ExecCtx::waited`]).

// `ExecError::Failed` carries the results gathered so far, which makes it large; it is returned once
// per attempt, so boxing it would buy nothing measurable and cost clarity at every match.
#![allow(clippy::result_large_err)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use ec2jobd_spec::{Clock, Job, JobError, JobResults, Progress, WaitUntil};
use ec2jobd_store::{Claimed, Finish, NewEvent, Store, StoreError};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::fence::Fence;
use crate::parking::{Parked, Parking, PlannedCall, Wait};
use crate::RunObserver;

/// How long a step may take before [`ExecCtx::quietly`] records its progress.
pub const QUIET_STEP: Duration = Duration::from_millis(200);

/// Why an attempt did not succeed.
#[derive(Debug)]
pub enum ExecError {
    /// The work failed; `transient` failures are retried while attempts remain.
    Failed {
        /// What went wrong.
        error: JobError,
        /// Whether another attempt may succeed.
        transient: bool,
        /// Results gathered before the failure.
        results: JobResults,
    },
    /// The user cancelled; results gathered so far.
    Cancelled(JobResults),
    /// This worker no longer holds the job; nothing may be written.
    LeaseLost,
    /// The job waits for instances (and perhaps for a call the lot makes first) and needs no
    /// worker meanwhile: park it.
    Park(Box<Parked>),
}

impl ExecError {
    /// The same error carrying `results` instead (failures and cancels; a lost lease carries none).
    pub fn with_results(self, results: JobResults) -> Self {
        match self {
            ExecError::Failed {
                error, transient, ..
            } => ExecError::Failed {
                error,
                transient,
                results,
            },
            ExecError::Cancelled(_) => ExecError::Cancelled(results),
            other @ (ExecError::LeaseLost | ExecError::Park(_)) => other,
        }
    }

    /// A permanent failure with no results.
    pub fn permanent(code: &str, message: impl Into<String>) -> Self {
        ExecError::Failed {
            error: JobError {
                code: code.into(),
                message: message.into(),
                request_id: None,
            },
            transient: false,
            results: JobResults::default(),
        }
    }
}

/// What an executor sees of the job it runs, and how it reports back.
pub struct ExecCtx {
    /// The job (state `running`).
    pub job: Job,
    /// Resume state from an earlier attempt.
    pub checkpoint: Option<serde_json::Value>,
    /// What the job's parked wait saw, when it resumes after one.
    pub waited: Option<serde_json::Value>,
    /// When this attempt's time limit ends (ms).
    pub deadline_ms: i64,
    /// The attempt's time limit.
    pub limit: Duration,
    lot: Option<Arc<Parking>>,
    worker: String,
    store: Arc<dyn Store>,
    cancel: CancellationToken,
    /// For a workflow step: the workflow's own checkpoint, which wraps the step's as `inner`.
    envelope: Option<serde_json::Value>,
    /// For a workflow step: `[name] ` before every progress message.
    prefix: String,
    /// For a workflow step: its index and name (what it creates is tagged with them).
    pub step: Option<(usize, String)>,
    /// The job's closing progress ("stopped 3 instances"), written with its final state rather
    /// than on its own (one write less per job).
    closing: Mutex<Option<Progress>>,
}

impl ExecCtx {
    /// The context of one workflow step: the same job, lease and cancel, with the step's spec,
    /// its own resume state, and checkpoints saved inside the workflow's `envelope`.
    pub fn step(
        &self,
        spec: ec2jobd_spec::JobSpec,
        checkpoint: Option<serde_json::Value>,
        envelope: serde_json::Value,
        (index, name): (usize, &str),
    ) -> ExecCtx {
        let mut job = self.job.clone();
        job.action = spec.action;
        job.spec = spec;
        // The outcome of a wait this step parked for: only the step the job resumes in has one.
        let waited = checkpoint.as_ref().and(self.waited.clone());
        ExecCtx {
            job,
            checkpoint,
            waited,
            deadline_ms: self.deadline_ms,
            limit: self.limit,
            lot: self.lot.clone(),
            worker: self.worker.clone(),
            store: self.store.clone(),
            cancel: self.cancel.clone(),
            envelope: Some(envelope),
            prefix: format!("[{name}] "),
            step: Some((index, name.to_string())),
            closing: Mutex::new(None),
        }
    }

    /// Records progress and an event; fails with `LeaseLost` if the job moved on. A job's closing
    /// line (phase `done`, not a workflow step's) is kept and written with the job's final state
    /// instead ([`ExecCtx::closing`]); its `succeeded`/`failed` event says the same.
    pub async fn progress(
        &self,
        phase: &str,
        message: &str,
        done: Option<u64>,
        total: Option<u64>,
    ) -> Result<(), ExecError> {
        let message = format!("{}{message}", self.prefix);
        let p = Progress {
            phase: phase.into(),
            message: message.clone(),
            done,
            total,
        };
        {
            let mut closing = self.closing.lock().unwrap_or_else(|e| e.into_inner());
            if self.envelope.is_none() && phase == "done" {
                *closing = Some(p);
                return Ok(());
            }
            *closing = None;
        }
        let ev = NewEvent {
            kind: "progress".into(),
            message,
            data: json!({"phase": phase, "done": done, "total": total}),
        };
        match self.store.progress(&self.job.id, &self.worker, p, ev).await {
            Ok(()) => Ok(()),
            Err(StoreError::LeaseLost) => Err(ExecError::LeaseLost),
            Err(e) => {
                // Progress is informative: a failed write must not fail the job.
                tracing::warn!(job = %self.job.id, error = %e, "could not record progress");
                Ok(())
            }
        }
    }

    /// The closing progress line the executor gave, to be written with the final state.
    pub fn closing(&self) -> Option<Progress> {
        self.closing
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Awaits `step`, recording `phase`/`message` as progress only if it is still going after
    /// [`QUIET_STEP`]: a step that ends sooner (a describe shared with other jobs) costs no write,
    /// one that hangs still shows what the job is doing.
    pub async fn quietly<T>(
        &self,
        phase: &str,
        message: &str,
        step: impl std::future::Future<Output = T>,
    ) -> Result<T, ExecError> {
        tokio::pin!(step);
        tokio::select! {
            out = &mut step => return Ok(out),
            _ = tokio::time::sleep(QUIET_STEP) => {}
        }
        self.progress(phase, message, None, None).await?;
        Ok(step.await)
    }

    /// `state` as the job's checkpoint: a workflow step's goes inside the workflow's envelope.
    fn wrap(&self, state: serde_json::Value) -> serde_json::Value {
        match &self.envelope {
            Some(env) => {
                let mut env = env.clone();
                env["inner"] = state;
                env
            }
            None => state,
        }
    }

    /// The lease holder's id (progress written on the job's behalf is written as it).
    pub fn worker(&self) -> &str {
        &self.worker
    }

    /// What goes before this context's progress messages (a workflow step's `[name] `).
    pub fn label(&self) -> &str {
        &self.prefix
    }

    /// Whether the job may park its wait (a workflow step: the whole job, resuming in that step):
    /// a runner with a parking lot that has room (`queue.max_waiting`).
    pub fn may_park(&self) -> bool {
        self.lot.as_ref().is_some_and(|l| l.has_room())
    }

    /// The error that parks the job for `wait`, saving `state` as its checkpoint; with `call`, the
    /// lot makes that call first.
    pub fn park(
        &self,
        wait: Wait,
        state: serde_json::Value,
        call: Option<PlannedCall>,
    ) -> ExecError {
        ExecError::Park(Box::new(Parked {
            wait,
            label: self.prefix.clone(),
            checkpoint: self.wrap(state),
            call: call.map(|c| PlannedCall {
                then: self.wrap(c.then),
                ..c
            }),
        }))
    }

    /// Saves resume state; later attempts receive it as `checkpoint`.
    pub async fn save_checkpoint(&self, state: serde_json::Value) -> Result<(), ExecError> {
        let state = self.wrap(state);
        self.store
            .checkpoint(&self.job.id, &self.worker, state)
            .await
            .map_err(|e| match e {
                StoreError::LeaseLost => ExecError::LeaseLost,
                other => ExecError::Failed {
                    error: JobError {
                        code: "StoreUnavailable".into(),
                        message: other.to_string(),
                        request_id: None,
                    },
                    transient: true,
                    results: JobResults::default(),
                },
            })
    }

    /// Which of `jobs` have not reached a final state (a job the store cannot read counts as not
    /// ended): what they made is still theirs.
    pub async fn unfinished(&self, jobs: impl IntoIterator<Item = String>) -> HashSet<String> {
        let mut out = HashSet::new();
        for id in jobs {
            match self.store.get(&id).await {
                Ok(Some(j)) if j.state.is_terminal() => {}
                Ok(None) => {}
                _ => {
                    out.insert(id);
                }
            }
        }
        out
    }

    /// True when an earlier attempt may have made calls already (it left a checkpoint, or this is
    /// not the first attempt): creating steps look for what they made before making it again.
    pub fn resumed(&self) -> bool {
        self.checkpoint.is_some() || self.job.attempts > 1
    }

    /// Fails with `Cancelled` when a cancel was asked; call at every step or wait boundary.
    pub fn check_cancel(&self, results: &JobResults) -> Result<(), ExecError> {
        if self.cancel.is_cancelled() {
            Err(ExecError::Cancelled(results.clone()))
        } else {
            Ok(())
        }
    }

    /// Completes when a cancel is asked (or the lease is lost); for `select!` around waits.
    pub async fn cancelled(&self) {
        self.cancel.cancelled().await
    }
}

/// Runs one attempt of a job. Implementations check [`ExecCtx::check_cancel`] between steps.
#[async_trait]
pub trait Executor: Send + Sync {
    /// Does the work and returns its results.
    async fn execute(&self, ctx: &ExecCtx) -> Result<JobResults, ExecError>;
}

/// Runner settings (from `[queue]` and `shutdown_grace`).
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Worker tasks.
    pub workers: usize,
    /// Lease length.
    pub lease: Duration,
    /// Lease renewal interval.
    pub heartbeat: Duration,
    /// Fallback claim poll.
    pub poll_interval: Duration,
    /// Expired-lease sweep interval.
    pub reap_interval: Duration,
    /// First retry delay.
    pub backoff_base: Duration,
    /// Largest retry delay.
    pub backoff_max: Duration,
    /// Time running attempts get after shutdown begins.
    pub grace: Duration,
}

/// A claimed job on its way to an idle worker: the job, its lease owner, when the claim was sent
/// (its lease's fence starts there), and the worker's place (given back when the job is done).
type Handed = (Claimed, String, tokio::time::Instant, OwnedSemaphorePermit);

/// The worker pool of one process.
pub struct Runner {
    store: Arc<dyn Store>,
    executor: Arc<dyn Executor>,
    cfg: RunnerConfig,
    metrics: Arc<dyn RunObserver>,
    clock: Arc<dyn Clock>,
    rng: Mutex<StdRng>,
    active: Mutex<HashMap<String, CancellationToken>>,
    id_prefix: String,
    on_finished: Mutex<Option<FinishedHook>>,
    on_job_span: Mutex<Option<JobSpanHook>>,
    lot: Option<Arc<Parking>>,
}

/// What the runner calls with a job it brought to a final state.
pub type FinishedHook = Arc<dyn Fn(Job) + Send + Sync>;

/// Called with each attempt's span before it is entered (the server continues the job's trace).
pub type JobSpanHook = Arc<dyn Fn(&tracing::Span, &Job) + Send + Sync>;

impl Runner {
    /// A runner; `seed` fixes the backoff jitter (tests pass a constant, the daemon a random one).
    pub fn new(
        store: Arc<dyn Store>,
        executor: Arc<dyn Executor>,
        cfg: RunnerConfig,
        metrics: Arc<dyn RunObserver>,
        clock: Arc<dyn Clock>,
        seed: u64,
    ) -> Self {
        let id_prefix = format!("{}-{:08x}", std::process::id(), rand::random::<u32>());
        Self {
            store,
            executor,
            cfg,
            metrics,
            clock,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            active: Mutex::new(HashMap::new()),
            id_prefix,
            on_finished: Mutex::new(None),
            on_job_span: Mutex::new(None),
            lot: None,
        }
    }

    /// Jobs of this runner park their waits in `lot` instead of holding a worker.
    pub fn with_parking(mut self, lot: Arc<Parking>) -> Self {
        self.lot = Some(lot);
        self
    }

    /// Called with each job this runner brings to a final state (notifications).
    pub fn on_finished(&self, f: FinishedHook) {
        *self.on_finished.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Installs the hook every attempt's span goes through (one; a later call replaces it).
    pub fn on_job_span(&self, f: JobSpanHook) {
        *self.on_job_span.lock().unwrap_or_else(|p| p.into_inner()) = Some(f);
    }

    /// Delay before attempt `attempt + 1`: `base * 2^(attempt-1)` capped at `backoff_max`, with
    /// "equal jitter" (half fixed, half random) so the delay always grows with the attempt while
    /// simultaneous failures still spread out.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .cfg
            .backoff_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.cfg.backoff_max);
        let half = cap / 2;
        let jitter = {
            let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
            rng.gen_range(0..=half.as_millis() as u64)
        };
        half + Duration::from_millis(jitter)
    }

    /// Signals a job running in this process to stop at its next boundary.
    pub fn cancel_local(&self, job_id: &str) {
        if let Some(t) = self.lock_active().get(job_id) {
            t.cancel();
        }
        if let Some(lot) = &self.lot {
            lot.cancel(job_id);
        }
    }

    /// Jobs parked in this process's lot now (each returns to the queue when its wait ends).
    pub fn parked(&self) -> usize {
        self.lot.as_ref().map_or(0, |l| l.parked())
    }

    /// Jobs this process's lot has queued again since it started ([`Parking::returned`]).
    pub fn returned(&self) -> u64 {
        self.lot.as_ref().map_or(0, |l| l.returned())
    }

    /// Jobs running in this process now.
    pub fn running(&self) -> usize {
        self.lock_active().len()
    }

    fn lock_active(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the workers and the lease reaper. The returned task ends once `stop` fired and every
    /// worker is done (running attempts finished, or released after the grace period).
    pub fn start(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        let hard = CancellationToken::new();
        let mut set = JoinSet::new();
        // One claimer hands due jobs to idle workers: one claim for as many jobs as workers are
        // idle, and an idle pool costs one claim per poll, not one per worker.
        let (tx, rx) = mpsc::channel::<Handed>(self.cfg.workers.max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let idle = Arc::new(Semaphore::new(self.cfg.workers));
        if self.cfg.workers > 0 {
            let me = self.clone();
            let (stop, idle) = (stop.clone(), idle.clone());
            set.spawn(async move { me.claimer(tx, idle, stop).await });
        }
        for _ in 0..self.cfg.workers {
            let me = self.clone();
            let (rx, hard) = (rx.clone(), hard.clone());
            set.spawn(async move { me.worker(rx, hard).await });
        }
        let reaper = {
            let me = self.clone();
            let stop = stop.clone();
            tokio::spawn(async move { me.reap(stop).await })
        };
        let lot = self.lot.clone().map(|lot| {
            let (every, stop) = (self.cfg.heartbeat, stop.clone());
            (lot.clone(), tokio::spawn(lot.run(every, stop)))
        });
        let grace = self.cfg.grace;
        tokio::spawn(async move {
            let timer = {
                let (stop, hard) = (stop.clone(), hard.clone());
                tokio::spawn(async move {
                    stop.cancelled().await;
                    tokio::time::sleep(grace).await;
                    hard.cancel();
                })
            };
            while set.join_next().await.is_some() {}
            timer.abort();
            let _ = reaper.await;
            if let Some((lot, renewals)) = lot {
                // After the workers: no job parks once its jobs are given back.
                let _ = renewals.await;
                lot.release().await;
            }
        })
    }

    async fn reap(&self, stop: CancellationToken) {
        loop {
            match self.store.requeue_expired().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(jobs = n, "re-queued jobs whose lease expired"),
                Err(e) => tracing::warn!(error = %e, "lease sweep failed"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.reap_interval) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Claims due jobs for the idle workers (one claim for all of them) and hands them over; ends
    /// at `stop`, after which the workers run what they were handed and end too. An idle pool
    /// writes nothing: after a quiet spell the claimer reads when the next job is due and claims
    /// (a write) only once one is.
    async fn claimer(
        self: Arc<Self>,
        tx: mpsc::Sender<Handed>,
        idle: Arc<Semaphore>,
        stop: CancellationToken,
    ) {
        let notify = self.store.work_available();
        let lease_ms = self.cfg.lease.as_millis() as i64;
        let mut claims = 0u64;
        // Whether jobs may be due without looking: woken by an enqueue, or the last claim was
        // full.
        let mut maybe_due = true;
        loop {
            // Wait for an idle worker; then ask for as many jobs as workers are idle.
            let first = tokio::select! {
                p = idle.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            };
            // Register for a wake-up before looking, so an enqueue between the look and the
            // wait is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = if maybe_due {
                None
            } else {
                self.next_due().await
            };
            if let Some(wait) = next.filter(|w| !w.is_zero()) {
                drop(first);
                let Some(woken) = self.idle_for(wait, notified, &stop).await else {
                    return;
                };
                maybe_due = woken;
                continue;
            }
            let mut permits = vec![first];
            while let Ok(p) = idle.clone().try_acquire_owned() {
                permits.push(p);
            }
            // The lease owner names this claim: a job claimed again later (its lease expired)
            // has another owner, so a stale attempt can never write over the new one.
            claims += 1;
            let owner = format!("{}-c{claims}", self.id_prefix);
            let want = permits.len() as u32;
            let sent = tokio::time::Instant::now();
            let got = match self.store.claim(&owner, lease_ms, want).await {
                Ok(jobs) => jobs,
                Err(e) => {
                    tracing::warn!(error = %e, "claim failed");
                    Vec::new()
                }
            };
            maybe_due = got.len() as u32 == want;
            let none = got.is_empty();
            for c in got {
                let Some(permit) = permits.pop() else { break };
                if tx.send((c, owner.clone(), sent, permit)).await.is_err() {
                    return;
                }
            }
            drop(permits);
            if !maybe_due {
                let mut wait = self.next_due().await.unwrap_or(self.cfg.poll_interval);
                if none {
                    // Due but not claimable (another replica is claiming it): not a busy loop.
                    wait = wait.max(Duration::from_millis(5));
                }
                let Some(woken) = self.idle_for(wait, notified, &stop).await else {
                    return;
                };
                maybe_due = woken;
            }
        }
    }

    /// How long until the next queued job is due (zero: one is), at most the poll interval.
    async fn next_due(&self) -> Option<Duration> {
        Some(match self.store.next_run_after().await {
            Ok(Some(at)) => {
                let ms = (at - self.clock.now_ms()).max(0) as u64;
                Duration::from_millis(ms).min(self.cfg.poll_interval)
            }
            Ok(None) => self.cfg.poll_interval,
            Err(e) => {
                tracing::warn!(error = %e, "could not read when the next job is due");
                return None;
            }
        })
    }

    /// Sleeps `wait` or until woken; `Some(true)` when woken by new work, `None` at `stop`.
    async fn idle_for(
        &self,
        wait: Duration,
        notified: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>,
        stop: &CancellationToken,
    ) -> Option<bool> {
        tokio::select! {
            _ = notified => Some(true),
            _ = tokio::time::sleep(wait) => Some(false),
            _ = stop.cancelled() => None,
        }
    }

    /// Runs the jobs the claimer hands over, one at a time, until it has stopped and nothing is
    /// left for it.
    async fn worker(
        self: Arc<Self>,
        rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Handed>>>,
        hard: CancellationToken,
    ) {
        loop {
            let next = rx.lock().await.recv().await;
            let Some((claimed, owner, sent, idle_again)) = next else {
                return;
            };
            let fence = Fence::new();
            fence.renewed(sent, self.cfg.lease);
            self.run_one(&owner, claimed, fence, &hard).await;
            drop(idle_again);
        }
    }

    async fn run_one(
        &self,
        worker: &str,
        claimed: Claimed,
        fence: Fence,
        hard: &CancellationToken,
    ) {
        let job = &claimed.job;
        let span = tracing::info_span!("job", id = %job.id, action = job.action.as_str(), attempt = job.attempts);
        let hook = self
            .on_job_span
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(hook) = hook {
            hook(&span, job);
        }
        // `instrument`, never `span.enter()` held across an await: a task that resumes on another
        // thread corrupts the span registry's bookkeeping, and tracing-subscriber panics ("tried to
        // clone a span that already closed") inside whatever logs next; the overload campaign hit
        // it as HTTP connections closed mid-answer.
        self.attempt(worker, claimed, fence, hard)
            .instrument(span)
            .await
    }

    /// One attempt under the job's lease, known held until `fence` lapses: the heartbeat moves the
    /// fence on. An attempt whose heartbeats go unanswered (the database slow or cut off) is
    /// paused when the fence lapses, before the lease could have run out and another worker taken
    /// the job: its future is not polled, so it makes no EC2 call (self-fencing). A late answer
    /// that renews the lease lets it go on; a lease lost, or not renewed within a lease's time,
    /// ends it without a write (whoever claims the job next resumes it from its checkpoint).
    async fn attempt(
        &self,
        worker: &str,
        claimed: Claimed,
        fence: Fence,
        hard: &CancellationToken,
    ) {
        let job = claimed.job.clone();
        let id = job.id.clone();
        let action = job.action.as_str();
        // A job resuming after its wait goes to the executor even when cancelled: it reports what
        // the wait saw.
        if job.cancel_requested && claimed.waited.is_none() {
            let cancelled = Finish::Cancelled(job.results.clone());
            self.record(worker, &job, cancelled, None, 0.0).await;
            return;
        }
        let cancel = CancellationToken::new();
        self.lock_active().insert(id.clone(), cancel.clone());
        let lease_lost = Arc::new(AtomicBool::new(false));
        let fence = Arc::new(fence);
        let heartbeat = {
            let (store, id, worker) = (self.store.clone(), id.clone(), worker.to_string());
            let (cancel, lost, fence) = (cancel.clone(), lease_lost.clone(), fence.clone());
            let (every, lease) = (self.cfg.heartbeat, self.cfg.lease);
            let lease_ms = lease.as_millis() as i64;
            tokio::spawn(
                async move {
                    loop {
                        tokio::time::sleep(every).await;
                        let sent = tokio::time::Instant::now();
                        match store.heartbeat(&id, &worker, lease_ms).await {
                            Ok(h) => {
                                fence.renewed(sent, lease);
                                if h.cancel_requested {
                                    cancel.cancel();
                                }
                            }
                            Err(StoreError::LeaseLost) => {
                                fence.lost();
                                lost.store(true, Ordering::SeqCst);
                                cancel.cancel();
                                return;
                            }
                            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
                        }
                    }
                }
                .instrument(tracing::Span::current()),
            )
        };
        let limit = Duration::from_millis(claimed.timeout_ms.max(1) as u64);
        let ctx = ExecCtx {
            job: job.clone(),
            checkpoint: claimed.checkpoint,
            waited: claimed.waited,
            deadline_ms: self.clock.now_ms() + limit.as_millis() as i64,
            limit,
            lot: self.lot.clone(),
            worker: worker.to_string(),
            store: self.store.clone(),
            cancel,
            envelope: None,
            prefix: String::new(),
            step: None,
            closing: Mutex::new(None),
        };
        let started = Instant::now();
        // Coalesced calls the attempt joins go only while its lease is known held.
        let gate: ec2jobd_ec2::Gate = {
            let fence = fence.clone();
            Arc::new(move || fence.valid())
        };
        let exec =
            tokio::time::timeout(limit, ec2jobd_ec2::gated(gate, self.executor.execute(&ctx)));
        tokio::pin!(exec);
        let outcome = loop {
            if fence.valid() {
                tokio::select! {
                    r = &mut exec => break Some(r.unwrap_or_else(|_| {
                        Err(ExecError::permanent(
                            "JobTimeout",
                            format!("the attempt exceeded its time limit of {}", humantime::format_duration(limit)),
                        ))
                    })),
                    _ = hard.cancelled() => break None,
                    _ = fence.lapsed() => tracing::warn!(
                        "the job's lease was not renewed in time (is the database reachable?): \
                         its work is paused until it is"
                    ),
                }
                continue;
            }
            // Paused: the attempt's future is not polled, so it starts no EC2 call, until the
            // lease is known held again; known lost, or not back within a lease, it is dropped.
            tokio::select! {
                held = fence.settled() => if held {
                    tracing::info!("the job's lease was renewed: its work goes on");
                    continue;
                },
                _ = tokio::time::sleep(self.cfg.lease) => {}
                _ = hard.cancelled() => break None,
            }
            heartbeat.abort();
            self.lock_active().remove(&id);
            tracing::warn!(
                "stopped acting on the job: its lease is lost or was not renewed within a lease's \
                 time; whoever claims it next resumes it from its checkpoint"
            );
            self.metrics
                .attempt(action, "fenced", started.elapsed().as_secs_f64());
            return;
        };
        heartbeat.abort();
        self.lock_active().remove(&id);
        let closing = ctx.closing();
        let secs = started.elapsed().as_secs_f64();
        let finish = match outcome {
            None => {
                match self.store.release(&id, worker).await {
                    Ok(()) => tracing::info!("released at shutdown"),
                    Err(e) => {
                        tracing::warn!(error = %e, "could not release; the lease will expire")
                    }
                }
                self.metrics.attempt(action, "released", secs);
                return;
            }
            Some(Ok(results)) => Finish::Succeeded(results),
            Some(Err(ExecError::LeaseLost)) => {
                tracing::warn!("lease lost; another worker owns the job now");
                return;
            }
            Some(Err(ExecError::Park(parked))) => {
                self.park(worker, &id, *parked).await;
                return;
            }
            Some(Err(ExecError::Cancelled(results))) => {
                if lease_lost.load(Ordering::SeqCst) {
                    tracing::warn!("lease lost; another worker owns the job now");
                    return;
                }
                Finish::Cancelled(results)
            }
            Some(Err(ExecError::Failed {
                error,
                transient,
                results,
            })) => {
                let run_after_ms =
                    self.clock.now_ms() + self.backoff(job.attempts).as_millis() as i64;
                if error.is_capacity() {
                    // EC2 has no capacity now: tried again, without using up an attempt, until
                    // the job's time limit has passed since it first started.
                    let first_ms = job
                        .started_at
                        .map_or(self.clock.now_ms(), |t| t.timestamp_millis());
                    let until_ms = first_ms + limit.as_millis() as i64;
                    if run_after_ms < until_ms {
                        Finish::Retry {
                            error,
                            run_after_ms,
                            refund: true,
                        }
                    } else {
                        let mut error = error;
                        error.message = format!(
                            "{}; EC2 had no capacity for the job's time limit of {} since it first started",
                            error.message,
                            humantime::format_duration(limit)
                        );
                        Finish::Failed(error, results)
                    }
                } else if transient && job.attempts < job.max_attempts {
                    Finish::Retry {
                        error,
                        run_after_ms,
                        refund: false,
                    }
                } else {
                    Finish::Failed(error, results)
                }
            }
        };
        self.record(worker, &job, finish, closing, secs).await;
    }

    /// Parks the job in the store and hands its call and wait to the lot; the worker is free
    /// afterwards.
    async fn park(&self, worker: &str, id: &str, parked: Parked) {
        let Parked {
            wait,
            checkpoint,
            call,
            label,
        } = parked;
        let Some(lot) = &self.lot else {
            // Executors park only when `ExecCtx::may_park` said yes, which needs a lot.
            tracing::error!("an executor parked a job in a runner without a parking lot");
            return;
        };
        let (phase, message) = match &call {
            Some(c) => {
                let then = match wait.until {
                    WaitUntil::None => String::new(),
                    _ => format!(", then waiting for {}", wait.describe()),
                };
                let (op, n) = (c.call.operation(), c.ids.len());
                let message =
                    format!("{label}{op} on {n} instance(s){then} without holding a worker");
                ("calling", message)
            }
            None => (
                "waiting",
                format!(
                    "{label}waiting for {} without holding a worker",
                    wait.describe()
                ),
            ),
        };
        let progress = Progress {
            phase: phase.into(),
            message,
            done: Some(0),
            total: Some(wait.ids.len() as u64),
        };
        let lease_ms = self.cfg.lease.as_millis() as i64;
        let sent = tokio::time::Instant::now();
        match self
            .store
            .park(id, worker, lot.id(), lease_ms, checkpoint, progress)
            .await
        {
            Ok(()) => {
                tracing::info!(wait = %wait.describe(), "parked");
                lot.park(id, sent, wait, call, label).await;
            }
            Err(StoreError::LeaseLost) => tracing::warn!("lease lost before the job was parked"),
            Err(e) => tracing::warn!(
                error = %e,
                "could not park; the lease will expire and the job resumes from its last checkpoint"
            ),
        }
    }

    async fn record(
        &self,
        worker: &str,
        job: &Job,
        finish: Finish,
        closing: Option<Progress>,
        secs: f64,
    ) {
        let outcome = match &finish {
            Finish::Succeeded(_) => "succeeded",
            Finish::Failed(..) => "failed",
            Finish::Cancelled(_) => "cancelled",
            Finish::Retry { .. } => "retry",
        };
        match self
            .store
            .finish_with(&job.id, worker, finish, closing)
            .await
        {
            Ok(done) => {
                self.metrics.attempt(job.action.as_str(), outcome, secs);
                tracing::info!(outcome, seconds = secs, "attempt finished");
                if done.state.is_terminal() {
                    let hook = self
                        .on_finished
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    if let Some(hook) = hook {
                        hook(done);
                    }
                }
            }
            Err(StoreError::LeaseLost) => tracing::warn!("lease lost before the outcome was saved"),
            Err(e) => {
                tracing::error!(error = %e, "could not save the outcome; the lease will expire and the job re-run")
            }
        }
    }
}

#[cfg(test)]
mod tests;

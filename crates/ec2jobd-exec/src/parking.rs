//! The parking lot: where every job's final wait is judged, most of them without a worker.
//!
//! A job that reaches its wait for instances (running, stopped, terminated, "2/2 checks passed"),
//! or for the snapshots or AMIs it made to be ready ([`Wait::kind`]), hands it here. **Parked** —
//! the usual case — its worker is free at once: the store keeps the wait in the job's checkpoint
//! and passes the job's lease to this lot, which renews the leases of all its jobs in one write per
//! heartbeat and learns of cancels from it. **Waited in place** (actions that go on after their
//! wait within the attempt, or once `queue.max_waiting` jobs are parked) the worker awaits the
//! outcome here instead. Either way one task per account+region feeds every wait from the shared
//! [`StatusWatcher`]'s rounds (⌈N/100⌉ DescribeInstanceStatus and ⌈N/200⌉
//! DescribeSnapshots/DescribeImages calls a round, whatever the number of jobs), reports progress,
//! and ends each wait — arrived, failed, timed out or cancelled — with a [`WaitOutcome`]: a parked
//! job is queued again with it and the executor resumes after the wait; a waiting worker gets it
//! back.
//!
//! A parked job may hand over its mutating call too ([`PlannedCall`]): the lot makes it through the
//! account+region's [`Coalescer`](ec2jobd_ec2::Coalescer), together with the same call of every other
//! job (one StartInstances for many jobs), saves the checkpoint that says the call was made, and then
//! watches the instances. A call that fails ends the wait with its error.
//!
//! A lot that dies (kill -9) leaves its leases to expire; the jobs are then claimed like any running
//! job whose worker died, and the executor parks them again from their checkpoint. At shutdown the
//! lot gives its jobs back to the queue so the next start parks them again at once. A lot cut off
//! from its database fences itself: once its lease is not known held ([`Fence`]) it describes
//! nothing for its jobs, and a renewal that shows a job taken by another process drops its wait.
//!
//! Must not: call EC2 itself (the watcher polls), decide what a job does after its wait (the
//! executor does), or keep more per job than its wait: memory per parked job is a benchmark figure.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ec2jobd_ec2::{
    evaluate, Ec2Error, Ec2Pool, InstanceStatus, Judge, ReadyJudge, ReadyState, Registration,
    Round, SharedCall, StatusWatcher, Verdict, WaitFailure, Watched,
};
use ec2jobd_spec::{Clock, JobError, Progress, WaitUntil};
use ec2jobd_store::{NewEvent, Store, StoreError};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::fence::Fence;
use crate::RunObserver;

/// What a job waits for: saved in its checkpoint while parked, so a restart can park it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wait {
    /// Account of the instances.
    pub account: String,
    /// Region of the instances.
    pub region: String,
    /// What `ids` are: instances (the default, absent from the JSON), or snapshots or AMIs that
    /// must be ready (`until` is then `completed`).
    #[serde(default, skip_serializing_if = "is_instances")]
    pub kind: Watched,
    /// The instances that must meet `until` (snapshots or AMIs: be ready).
    pub ids: Vec<String>,
    /// How a snapshot or AMI is named in messages (`snapshot snap-1 of vol-1`), when not by its id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// The condition.
    pub until: WaitUntil,
    /// When the call the wait follows was made (ms): seconds to running and to status ok count
    /// from here.
    pub since_ms: i64,
    /// When the wait gives up (ms).
    pub deadline_ms: i64,
    /// The wait's timeout, for the message of a `WaitTimeout`.
    pub timeout_ms: u64,
    /// Polling interval asked for.
    pub interval_ms: u64,
    /// When the current attempt's time limit ends (ms): reaching it first is the attempt's
    /// `JobTimeout`, as for a worker that waits in place. Set again at each (re)parking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_deadline_ms: Option<i64>,
    /// The attempt's time limit, for the `JobTimeout` message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_limit_ms: Option<u64>,
    /// How long an instance EC2 does not know yet is waited for before the wait fails
    /// `InvalidInstanceID.NotFound` (eventual consistency): the consistency bound for ids the job
    /// made, a short grace for the caller's. 0: at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unknown_grace_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_instances(k: &Watched) -> bool {
    *k == Watched::Instances
}

impl Wait {
    /// "status_ok on 3 instance(s)", "completed on 2 snapshot(s)".
    pub fn describe(&self) -> String {
        format!(
            "{} on {} {}",
            self.until.as_str(),
            self.ids.len(),
            self.kind.noun()
        )
    }

    /// How `id` reads in messages.
    fn label<'a>(&'a self, id: &'a str) -> &'a str {
        self.labels.get(id).map_or(id, String::as_str)
    }

    /// When the wait ends at the latest: its own deadline or the attempt's, whichever is first.
    pub fn ends_ms(&self) -> i64 {
        self.attempt_deadline_ms
            .map_or(self.deadline_ms, |a| a.min(self.deadline_ms))
    }

    fn attempt_ran_out(&self) -> bool {
        self.attempt_deadline_ms
            .is_some_and(|a| a < self.deadline_ms)
    }
}

/// How a wait ended, and what it saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WaitOutcome {
    /// Why the wait failed (`WaitTimeout`, `StatusCheckImpaired`, `InstanceTerminated`,
    /// `InstanceStopped`, `JobTimeout`, or EC2's code); `None` when every instance arrived or the
    /// wait was cancelled.
    pub error: Option<JobError>,
    /// A user cancelled the job during the wait.
    #[serde(default)]
    pub cancelled: bool,
    /// The latest status seen of each instance.
    #[serde(default)]
    pub last: HashMap<String, InstanceStatus>,
    /// Seconds from the call until each instance was first seen running.
    #[serde(default)]
    pub to_running: HashMap<String, f64>,
    /// Seconds from the call until each instance first passed every status check.
    #[serde(default)]
    pub to_ok: HashMap<String, f64>,
    /// Request ids of the call the lot made for the job ([`PlannedCall`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_ids: Vec<String>,
    /// The error may pass on another attempt (a call that failed transiently).
    #[serde(default)]
    pub transient: bool,
    /// The instances as described when the wait ended (addresses, names), by one describe shared
    /// with the other jobs whose waits ended then; absent when that describe failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub described: Option<Vec<ec2jobd_spec::InstanceResult>>,
    /// Snapshots or AMIs waited for: the latest state and progress seen of each.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ready: BTreeMap<String, ReadyState>,
}

/// A mutating call a parked job leaves to the lot, to be made with the same call of other jobs.
#[derive(Debug, Clone)]
pub struct PlannedCall {
    /// The call.
    pub call: SharedCall,
    /// The job's instances.
    pub ids: Vec<String>,
    /// The job's checkpoint once the call is made (it then waits like any parked job).
    pub then: serde_json::Value,
}

/// What a job hands over when it gives its worker back.
#[derive(Debug)]
pub struct Parked {
    /// What it waits for.
    pub wait: Wait,
    /// The checkpoint saved as it parks.
    pub checkpoint: serde_json::Value,
    /// The call to make before the wait, if the job left it to the lot.
    pub call: Option<PlannedCall>,
    /// Put before the wait's progress messages (a workflow step's `[name] `).
    pub label: String,
}

/// How an instance status reads in an error message: `i-1 (running, 1/2 checks passed)`.
pub fn describe_status(id: &str, s: Option<&InstanceStatus>) -> String {
    match s {
        None => format!("{id} (not reported)"),
        Some(s) => match s.checks() {
            Some(c) => format!("{id} ({}, {c})", s.state),
            None => format!("{id} ({})", s.state),
        },
    }
}

/// A failed wait as the job's error, and the last status seen.
pub fn wait_error(
    f: WaitFailure,
    ids: &[String],
    until: WaitUntil,
    timeout: Duration,
) -> (JobError, HashMap<String, InstanceStatus>) {
    let error = |code: String, message: String| JobError {
        code,
        message,
        request_id: None,
    };
    match f {
        WaitFailure::Timeout(seen) => {
            let list: Vec<String> = ids
                .iter()
                .map(|id| describe_status(id, seen.get(id)))
                .collect();
            let message = format!(
                "not {} after {}: {}",
                until.as_str(),
                humantime::format_duration(timeout),
                list.join("; ")
            );
            (error("WaitTimeout".into(), message), seen)
        }
        WaitFailure::Failed {
            instance_id,
            code,
            message,
            last,
        } => (error(code, format!("{instance_id}: {message}")), last),
        WaitFailure::Aws(e) => (e.into(), HashMap::new()),
    }
}

enum Cmd {
    Add {
        job: String,
        wait: Box<Wait>,
        holder: String,
        label: String,
        reply: Option<oneshot::Sender<WaitOutcome>>,
    },
    /// A parked job whose call the lot makes first.
    Call {
        job: String,
        wait: Box<Wait>,
        call: PlannedCall,
        label: String,
        /// The parking attempt's span: the call is made under it (traces run on into EC2).
        span: tracing::Span,
    },
    /// The call was made (and its checkpoint saved): wait now.
    Called {
        job: String,
        wait: Box<Wait>,
        request_ids: Vec<String>,
        label: String,
    },
    /// The call failed, or its job was lost: end with this outcome (`None`: drop the job).
    Uncalled {
        job: String,
        outcome: Option<Box<WaitOutcome>>,
    },
    Cancel(String),
    /// A renewal sent at `sent` found the lot holding `held` (and no other job): a parked wait
    /// added before it whose job is not among them was taken over (its lease ran out): drop it,
    /// without a describe or a word to the store.
    Held {
        held: std::collections::HashSet<String>,
        sent: tokio::time::Instant,
    },
}

/// One wait being judged.
struct Entry {
    wait: Wait,
    /// Who holds the job's lease (the lot, or the worker waiting in place): progress is written
    /// as them.
    holder: String,
    /// Put before progress messages (a workflow step's `[name] `).
    label: String,
    judge: Judging,
    to_running: HashMap<String, f64>,
    to_ok: HashMap<String, f64>,
    /// What the latest progress report said (ids done, and for snapshots the overall percent).
    reported: (usize, u64, usize),
    request_ids: Vec<String>,
    reply: Option<oneshot::Sender<WaitOutcome>>,
    /// When the lot took the wait on.
    added: tokio::time::Instant,
    _registration: Registration,
}

/// The judge of one wait, by what it waits for.
enum Judging {
    Instances(Box<Judge>),
    Ready(ReadyJudge),
}

impl Judging {
    fn new(wait: &Wait) -> Self {
        match wait.kind {
            Watched::Instances => Judging::Instances(Box::new(
                Judge::new(&wait.ids, wait.until)
                    .with_unknown_grace(Duration::from_millis(wait.unknown_grace_ms)),
            )),
            kind => Judging::Ready(
                ReadyJudge::new(kind, &wait.ids)
                    .with_unknown_grace(Duration::from_millis(wait.unknown_grace_ms)),
            ),
        }
    }

    fn concerns(&self, round: &Round) -> bool {
        match self {
            Judging::Instances(j) => j.concerns(round),
            Judging::Ready(j) => j.concerns(round),
        }
    }

    fn observe(&mut self, round: &Round) -> Option<Result<(), WaitFailure>> {
        match self {
            Judging::Instances(j) => j.observe(round),
            Judging::Ready(j) => j.observe(round),
        }
    }

    /// Progress as (done, overall percent, ids EC2 does not know yet); a new report is written
    /// when it changes.
    fn progress(&self) -> (usize, u64, usize) {
        match self {
            Judging::Instances(j) => (j.done(), 0, j.unknown.len()),
            Judging::Ready(j) => (j.done(), j.percent(), j.unknown.len()),
        }
    }

    /// The ids EC2 did not know in the latest round, in order.
    fn unknown(&self) -> Vec<&String> {
        let mut ids: Vec<&String> = match self {
            Judging::Instances(j) => j.unknown.iter().collect(),
            Judging::Ready(j) => j.unknown.iter().collect(),
        };
        ids.sort();
        ids
    }
}

enum Ending {
    Arrived,
    Failed(WaitFailure),
    TimedOut,
    Cancelled,
}

impl Entry {
    fn new(
        watcher: &Arc<StatusWatcher>,
        wait: Wait,
        holder: String,
        label: String,
        reply: Option<oneshot::Sender<WaitOutcome>>,
    ) -> Self {
        let interval = Duration::from_millis(wait.interval_ms.max(1));
        Entry {
            judge: Judging::new(&wait),
            _registration: watcher.register_kind(wait.kind, &wait.ids, interval),
            wait,
            holder,
            label,
            to_running: HashMap::new(),
            to_ok: HashMap::new(),
            reported: (0, 0, 0),
            request_ids: Vec::new(),
            reply,
            added: tokio::time::Instant::now(),
        }
    }

    fn note_times(&mut self, now_ms: i64) {
        let Judging::Instances(judge) = &self.judge else {
            return;
        };
        let t = (now_ms - self.wait.since_ms).max(0) as f64 / 1000.0;
        for (id, st) in &judge.last {
            if st.state == "running" {
                self.to_running.entry(id.clone()).or_insert(t);
            }
            if evaluate(WaitUntil::StatusOk, Some(st)) == Verdict::Done {
                self.to_ok.entry(id.clone()).or_insert(t);
            }
        }
    }

    fn outcome(self, ending: Ending) -> (WaitOutcome, Option<oneshot::Sender<WaitOutcome>>) {
        let w = &self.wait;
        let timeout = Duration::from_millis(w.timeout_ms);
        let error = |code: &str, message: String| JobError {
            code: code.into(),
            message,
            request_id: None,
        };
        let (last, ready) = match self.judge {
            Judging::Instances(j) => (j.last, BTreeMap::new()),
            Judging::Ready(j) => (HashMap::new(), j.seen),
        };
        let (error, last, cancelled) = match ending {
            Ending::Arrived => (None, last, false),
            Ending::Cancelled => (None, last, true),
            Ending::TimedOut => match w.attempt_limit_ms.filter(|_| w.attempt_ran_out()) {
                Some(limit) => (
                    Some(error(
                        "JobTimeout",
                        format!(
                            "the attempt exceeded its time limit of {}",
                            humantime::format_duration(Duration::from_millis(limit))
                        ),
                    )),
                    last,
                    false,
                ),
                None if w.kind != Watched::Instances => {
                    let list: Vec<String> = ready
                        .iter()
                        .filter(|(_, (st, _))| st != w.kind.done())
                        .map(|(id, (st, p))| {
                            let p = p.as_deref().map(|p| format!(", {p}")).unwrap_or_default();
                            format!("{} ({st}{p})", w.label(id))
                        })
                        .collect();
                    let message = format!(
                        "not {} after {}: {}",
                        w.kind.done(),
                        humantime::format_duration(timeout),
                        list.join("; ")
                    );
                    (Some(error("WaitTimeout", message)), last, false)
                }
                None => {
                    let (e, last) =
                        wait_error(WaitFailure::Timeout(last), &w.ids, w.until, timeout);
                    (Some(e), last, false)
                }
            },
            Ending::Failed(WaitFailure::Failed {
                instance_id,
                code,
                message,
                ..
            }) if w.kind != Watched::Instances => {
                let message = format!("{} {message}", w.label(&instance_id));
                (Some(error(&code, message)), last, false)
            }
            Ending::Failed(f) => {
                let (e, seen) = wait_error(f, &w.ids, w.until, timeout);
                (Some(e), if seen.is_empty() { last } else { seen }, false)
            }
        };
        (
            WaitOutcome {
                error,
                cancelled,
                last,
                to_running: self.to_running,
                to_ok: self.to_ok,
                request_ids: self.request_ids,
                transient: false,
                described: None,
                ready,
            },
            self.reply,
        )
    }
}

/// The parking lot of one process.
pub struct Parking {
    id: String,
    store: Arc<dyn Store>,
    pool: Arc<Ec2Pool>,
    clock: Arc<dyn Clock>,
    metrics: Arc<dyn RunObserver>,
    lease: Duration,
    max_parked: usize,
    parked: AtomicUsize,
    /// Jobs this lot has queued again since it started (see [`Parking::returned`]).
    returned: AtomicU64,
    regions: Mutex<HashMap<(String, String), mpsc::UnboundedSender<Cmd>>>,
    /// Until when the lot's lease on its parked jobs is known held ([`Fence`]): after that it
    /// makes no EC2 call for them (another process may have them by now).
    fence: Fence,
}

impl Parking {
    /// A lot whose jobs' leases last `lease`, holding at most `max_parked` parked jobs.
    pub fn new(
        store: Arc<dyn Store>,
        pool: Arc<Ec2Pool>,
        clock: Arc<dyn Clock>,
        metrics: Arc<dyn RunObserver>,
        lease: Duration,
        max_parked: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            id: format!("{}-{:08x}-lot", std::process::id(), rand::random::<u32>()),
            store,
            pool,
            clock,
            metrics,
            lease,
            max_parked,
            parked: AtomicUsize::new(0),
            returned: AtomicU64::new(0),
            regions: Mutex::new(HashMap::new()),
            fence: Fence::new(),
        })
    }

    /// Shut while the lot's lease is not known held: the coalesced calls the lot makes for its
    /// jobs are sent only while it is open.
    fn gate(self: &Arc<Self>) -> ec2jobd_ec2::Gate {
        let me = Arc::downgrade(self);
        Arc::new(move || me.upgrade().is_some_and(|lot| lot.fence.valid()))
    }

    /// The lot's lease-holder id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The lot's clock (waits count time from it).
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    /// Whether another job may park (`queue.max_waiting`).
    pub fn has_room(&self) -> bool {
        self.parked.load(Ordering::SeqCst) < self.max_parked
    }

    /// Jobs parked here now (each counted until the store has it queued again).
    pub fn parked(&self) -> usize {
        self.parked.load(Ordering::SeqCst)
    }

    /// Jobs this lot has queued again since it started: admission adds those returned since it
    /// last read the queue's depth, which does not hold them yet.
    pub fn returned(&self) -> u64 {
        self.returned.load(Ordering::SeqCst)
    }

    fn set_parked(&self, delta: isize) {
        let n = if delta >= 0 {
            self.parked.fetch_add(delta as usize, Ordering::SeqCst) + delta as usize
        } else {
            self.parked
                .fetch_sub(delta.unsigned_abs(), Ordering::SeqCst)
                - delta.unsigned_abs()
        };
        self.metrics.set_parked(n as i64);
    }

    async fn region(
        self: &Arc<Self>,
        account: &str,
        region: &str,
    ) -> Result<mpsc::UnboundedSender<Cmd>, Ec2Error> {
        let key = (account.to_string(), region.to_string());
        if let Some(tx) = self.lock().get(&key) {
            return Ok(tx.clone());
        }
        let watcher = self.pool.watcher(account, region).await?;
        let mut regions = self.lock();
        let tx = regions.entry(key).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(self.clone().judge_region(watcher, tx.clone(), rx));
            tx
        });
        Ok(tx.clone())
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), mpsc::UnboundedSender<Cmd>>> {
        self.regions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes over a job the store just parked in this lot (the park sent at `sent`): its call, if
    /// it left one, then its wait.
    pub async fn park(
        self: &Arc<Self>,
        job: &str,
        sent: tokio::time::Instant,
        wait: Wait,
        call: Option<PlannedCall>,
        label: String,
    ) {
        if self.parked() == 0 {
            // The lot's first job: its lease starts the fence (later ones are renewed with it).
            self.fence.renewed(sent, self.lease);
        }
        self.set_parked(1);
        let (account, region) = (wait.account.clone(), wait.region.clone());
        let error = match self.region(&account, &region).await {
            Ok(tx) => {
                let (job, wait) = (job.to_string(), Box::new(wait));
                let cmd = match call {
                    Some(call) => Cmd::Call {
                        job,
                        wait,
                        call,
                        label,
                        span: tracing::Span::current(),
                    },
                    None => Cmd::Add {
                        job,
                        wait,
                        holder: self.id.clone(),
                        label,
                        reply: None,
                    },
                };
                if tx.send(cmd).is_ok() {
                    return;
                }
                Ec2Error {
                    code: "Internal".into(),
                    message: format!("the wait task of {account}/{region} stopped"),
                    request_id: None,
                    transient: true,
                }
            }
            Err(e) => e,
        };
        // Not expected (the job's own client was built). The lot renews every lease it holds, so
        // the job must not stay here untracked: its wait ends with the error, to be retried.
        tracing::error!(job, error = %error.message, "cannot watch {account}/{region}");
        let outcome = WaitOutcome {
            error: Some(error.into()),
            transient: true,
            ..Default::default()
        };
        self.deliver(job.to_string(), outcome, None);
    }

    /// Makes a parked job's call (shared with other jobs'), saves the checkpoint that says so, and
    /// tells the region's task how it went.
    async fn make_call(
        self: Arc<Self>,
        tx: mpsc::UnboundedSender<Cmd>,
        job: String,
        wait: Box<Wait>,
        (call, label): (PlannedCall, String),
    ) {
        let failed = |e: Ec2Error| Cmd::Uncalled {
            job: job.clone(),
            outcome: Some(Box::new(WaitOutcome {
                transient: e.transient,
                error: Some(e.into()),
                ..Default::default()
            })),
        };
        let answer = match self.pool.coalescer(&wait.account, &wait.region).await {
            Ok(c) => ec2jobd_ec2::gated(self.gate(), c.call(call.call, call.ids)).await,
            Err(e) => Err(e),
        };
        let cmd = match answer {
            Err(e) => failed(e),
            Ok(answer) => {
                let mut delay = Duration::from_millis(200);
                loop {
                    match self
                        .store
                        .checkpoint(&job, &self.id, call.then.clone())
                        .await
                    {
                        Ok(()) => {
                            break Cmd::Called {
                                job: job.clone(),
                                wait,
                                request_ids: answer.request_ids,
                                label,
                            }
                        }
                        Err(StoreError::LeaseLost) => {
                            break Cmd::Uncalled {
                                job: job.clone(),
                                outcome: None,
                            }
                        }
                        Err(e) => {
                            tracing::warn!(job, error = %e, "could not record a call; retrying");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(10));
                        }
                    }
                }
            }
        };
        let _ = tx.send(cmd);
    }

    /// Judges a wait for a worker that waits in place (holding the job's lease as `holder`);
    /// progress messages start with `label`.
    pub async fn wait_here(
        self: &Arc<Self>,
        job: &str,
        holder: &str,
        label: &str,
        wait: Wait,
    ) -> Result<oneshot::Receiver<WaitOutcome>, Ec2Error> {
        let tx = self.region(&wait.account, &wait.region).await?;
        let (reply, rx) = oneshot::channel();
        let _ = tx.send(Cmd::Add {
            job: job.to_string(),
            wait: Box::new(wait),
            holder: holder.to_string(),
            label: label.to_string(),
            reply: Some(reply),
        });
        Ok(rx)
    }

    /// Ends the wait of a job (parked or waited in place) as cancelled, if it is waiting here.
    pub fn cancel(&self, job: &str) {
        for tx in self.lock().values() {
            let _ = tx.send(Cmd::Cancel(job.to_string()));
        }
    }

    /// Renews the leases of the parked jobs every `heartbeat` and hands on cancels, until `stop`.
    pub async fn run(self: Arc<Self>, heartbeat: Duration, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(heartbeat) => {}
                _ = stop.cancelled() => break,
            }
            if self.parked() == 0 {
                continue;
            }
            let sent = tokio::time::Instant::now();
            match self
                .store
                .renew_lot(&self.id, self.lease.as_millis() as i64)
                .await
            {
                Ok(held) => {
                    self.fence.renewed(sent, self.lease);
                    for (id, cancel) in &held {
                        if *cancel {
                            self.cancel(id);
                        }
                    }
                    let held: std::collections::HashSet<String> =
                        held.into_iter().map(|(id, _)| id).collect();
                    for tx in self.lock().values() {
                        let _ = tx.send(Cmd::Held {
                            held: held.clone(),
                            sent,
                        });
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not renew the parked jobs' leases"),
            }
        }
    }

    /// Gives the parked jobs back to the queue (shutdown, once no worker can park any more): the
    /// next start parks them again at once instead of waiting for their leases to expire.
    pub async fn release(&self) {
        match self.store.release_lot(&self.id).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "parked jobs given back to the queue at shutdown"),
            Err(e) => {
                tracing::warn!(error = %e, "could not give the parked jobs back; their leases will expire")
            }
        }
    }

    /// The task judging every wait of one account+region.
    async fn judge_region(
        self: Arc<Self>,
        watcher: Arc<StatusWatcher>,
        tx: mpsc::UnboundedSender<Cmd>,
        mut rx: mpsc::UnboundedReceiver<Cmd>,
    ) {
        let mut waits: HashMap<String, Entry> = HashMap::new();
        // Jobs whose call is being made, and whether a cancel came meanwhile (honoured after it).
        let mut calling: HashMap<String, bool> = HashMap::new();
        let mut rounds = watcher.rounds();
        loop {
            let next = waits.values().map(|e| e.wait.ends_ms()).min();
            let sleep = match next {
                Some(at) => Duration::from_millis((at - self.clock.now_ms()).max(0) as u64),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    None => return,
                    Some(Cmd::Call { job, wait, call, label, span }) => {
                        calling.insert(job.clone(), false);
                        tokio::spawn(
                            self.clone()
                                .make_call(tx.clone(), job, wait, (call, label))
                                .instrument(span),
                        );
                    }
                    Some(Cmd::Uncalled { job, outcome }) => {
                        calling.remove(&job);
                        match outcome {
                            Some(o) => self.deliver(job, *o, None),
                            None => self.set_parked(-1),
                        }
                    }
                    Some(Cmd::Called { job, wait, request_ids, label }) => {
                        let cancelled = calling.remove(&job).unwrap_or(false);
                        if cancelled || wait.until == WaitUntil::None || wait.ids.is_empty() {
                            let outcome = WaitOutcome { cancelled, request_ids, ..Default::default() };
                            self.describe_then_deliver(job, outcome, None, *wait);
                            continue;
                        }
                        let mut entry = Entry::new(&watcher, *wait, self.id.clone(), label, None);
                        entry.request_ids = request_ids;
                        drop(self.report(&job, &entry));
                        waits.insert(job, entry);
                    }
                    Some(Cmd::Add { job, wait, holder, label, reply }) => {
                        let entry = Entry::new(&watcher, *wait, holder, label, reply);
                        if let Some(old) = waits.insert(job, entry) {
                            // The same job handed over twice: the newer wait replaces the older.
                            if old.reply.is_none() {
                                self.set_parked(-1);
                            }
                        }
                    }
                    Some(Cmd::Cancel(job)) => {
                        if let Some(e) = waits.remove(&job) {
                            self.end(job, e, Ending::Cancelled);
                        } else if let Some(c) = calling.get_mut(&job) {
                            *c = true;
                        }
                    }
                    Some(Cmd::Held { held, sent }) => {
                        let gone: Vec<String> = waits
                            .iter()
                            .filter(|(job, e)| {
                                e.reply.is_none() && e.added < sent && !held.contains(*job)
                            })
                            .map(|(job, _)| job.clone())
                            .collect();
                        for job in gone {
                            waits.remove(&job);
                            self.set_parked(-1);
                            tracing::warn!(job, "a parked job's lease ran out and another process has it: its wait here is dropped");
                        }
                    }
                },
                changed = rounds.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let round = rounds.borrow_and_update().clone();
                    let now = self.clock.now_ms();
                    let mut ended = Vec::new();
                    for (job, e) in waits.iter_mut() {
                        if !e.judge.concerns(&round) {
                            continue;
                        }
                        let verdict = e.judge.observe(&round);
                        e.note_times(now);
                        match verdict {
                            Some(Ok(())) => ended.push((job.clone(), Ending::Arrived)),
                            Some(Err(f)) => ended.push((job.clone(), Ending::Failed(f))),
                            None => {
                                let now = e.judge.progress();
                                if now != e.reported {
                                    e.reported = now;
                                    drop(self.report(job, e));
                                }
                            }
                        }
                    }
                    for (job, ending) in ended {
                        if let Some(e) = waits.remove(&job) {
                            self.end(job, e, ending);
                        }
                    }
                }
                _ = tokio::time::sleep(sleep) => {
                    let now = self.clock.now_ms();
                    let late: Vec<String> = waits
                        .iter()
                        .filter(|(_, e)| e.wait.ends_ms() <= now)
                        .map(|(j, _)| j.clone())
                        .collect();
                    for job in late {
                        if let Some(e) = waits.remove(&job) {
                            self.end(job, e, Ending::TimedOut);
                        }
                    }
                }
            }
        }
    }

    /// Writes the wait's progress as the job's lease holder: "waiting for status_ok on 3
    /// instance(s)", "1 of 3 instance(s) reached status_ok", "1 of 2 snapshot(s) completed (70%
    /// overall)".
    fn report(&self, job: &str, e: &Entry) -> tokio::task::JoinHandle<()> {
        let wait = &e.wait;
        let total = wait.ids.len() as u64;
        let until = wait.until.as_str();
        let label = &e.label;
        let (done, _, _) = e.judge.progress();
        let unknown = e.judge.unknown();
        let message = match &e.judge {
            _ if !unknown.is_empty() => {
                let more = match unknown.len() {
                    1 => String::new(),
                    n => format!(" and {} more", n - 1),
                };
                format!(
                    "{label}waiting for EC2 to know {}{more} (new ids reach every EC2 endpoint within seconds), then for {until}",
                    unknown[0]
                )
            }
            Judging::Ready(j) => format!("{label}{}", j.report()),
            Judging::Instances(_) if done == 0 => {
                format!("{label}waiting for {until} on {total} instance(s)")
            }
            Judging::Instances(_) => {
                format!("{label}{done} of {total} instance(s) reached {until}")
            }
        };
        let progress = Progress {
            phase: "waiting".into(),
            message: message.clone(),
            done: Some(done as u64),
            total: Some(total),
        };
        let event = NewEvent {
            kind: "progress".into(),
            message,
            data: json!({"phase": "waiting", "done": done, "total": total}),
        };
        let (store, job, holder) = (self.store.clone(), job.to_string(), e.holder.clone());
        tokio::spawn(async move {
            match store.progress(&job, &holder, progress, event).await {
                Ok(()) | Err(StoreError::LeaseLost) => {}
                Err(e) => tracing::warn!(job, error = %e, "could not record wait progress"),
            }
        })
    }

    /// Hands a finished wait's outcome on: to the waiting worker, or back to the queue.
    fn end(self: &Arc<Self>, job: String, e: Entry, ending: Ending) {
        if let Judging::Ready(_) = &e.judge {
            // The last progress ("2 of 2 snapshot(s) completed") is written before the job moves
            // on; there is nothing to describe.
            let last = matches!(ending, Ending::Arrived).then(|| self.report(&job, &e));
            let (outcome, reply) = e.outcome(ending);
            let me = self.clone();
            tokio::spawn(async move {
                if let Some(written) = last {
                    let _ = written.await;
                }
                me.deliver(job, outcome, reply);
            });
            return;
        }
        let wait = e.wait.clone();
        let (outcome, reply) = e.outcome(ending);
        self.describe_then_deliver(job, outcome, reply, wait);
    }

    /// Describes the wait's instances for the job's results first: the describes of every wait
    /// ending together are one shared call, where each resumed job would otherwise make its own.
    fn describe_then_deliver(
        self: &Arc<Self>,
        job: String,
        mut outcome: WaitOutcome,
        reply: Option<oneshot::Sender<WaitOutcome>>,
        wait: Wait,
    ) {
        if reply.is_none() && !self.fence.valid() {
            // The lot's lease is not known held (renewals unanswered): no EC2 call for the job;
            // the outcome goes to the store, which refuses it if the job is another's by now,
            // and whoever resumes the job describes it.
            tracing::debug!(
                job,
                "lot lease not known held: ending the wait without a describe"
            );
            self.deliver(job, outcome, reply);
            return;
        }
        let me = self.clone();
        // A parked job's describe is the lot's to make (gated by its lease); a worker waiting in
        // place holds the lease itself (its attempt is paused when that lapses).
        let gate = reply.is_none().then(|| self.gate());
        tokio::spawn(async move {
            let described = match me.pool.coalescer(&wait.account, &wait.region).await {
                Ok(c) => {
                    let call = c.call(SharedCall::Describe, wait.ids.clone());
                    match gate {
                        Some(g) => ec2jobd_ec2::gated(g, call).await,
                        None => call.await,
                    }
                }
                Err(e) => Err(e),
            };
            match described {
                Ok(a) => outcome.described = Some(a.instances),
                Err(e) => {
                    tracing::debug!(job, error = %e, "describe after the wait failed; the job describes")
                }
            }
            me.deliver(job, outcome, reply);
        });
    }

    fn deliver(
        self: &Arc<Self>,
        job: String,
        outcome: WaitOutcome,
        reply: Option<oneshot::Sender<WaitOutcome>>,
    ) {
        if let Some(reply) = reply {
            let _ = reply.send(outcome);
            return;
        }
        let message = match (&outcome.error, outcome.cancelled) {
            (_, true) => "wait ended by the cancel; resuming".to_string(),
            (Some(err), _) => format!("wait failed ({}); resuming", err.code),
            (None, false) => "wait over; resuming".to_string(),
        };
        let value = serde_json::to_value(&outcome).unwrap_or_default();
        let me = self.clone();
        tokio::spawn(async move {
            // A failed write is retried: the lease is still this lot's and renewed meanwhile.
            let mut delay = Duration::from_millis(500);
            loop {
                match me.store.unpark(&job, &me.id, value.clone(), &message).await {
                    Ok(()) | Err(StoreError::LeaseLost) => {
                        // Counted as returned before it stops counting as parked: admission
                        // never sees it in neither.
                        me.returned.fetch_add(1, Ordering::SeqCst);
                        me.set_parked(-1);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(job, error = %e, "could not end a parked wait; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
    }
}

//! Shared status polling. One [`StatusWatcher`] per account+region serves every waiting job: jobs
//! register the instance ids they wait on, the watcher polls `DescribeInstanceStatus`
//! (`IncludeAllInstances=true`, so stopped and terminated instances are reported too) for the union of
//! those ids in chunks of 100 — ⌈N/100⌉ calls per round however many jobs wait, several at once —
//! and publishes each round; every waiter then judges its own condition. State waits (`running`,
//! `stopped`, `terminated`) use the same rounds, since the call reports the instance state as well.
//!
//! The round interval is the shortest interval any current waiter asked for. The watcher's task runs
//! only while someone waits.
//!
//! The same rounds poll snapshots and AMIs that jobs wait on ([`Watched`]): the union of their ids in
//! chunks of 200 per DescribeSnapshots / DescribeImages call, whatever the number of jobs.
//!
//! When several processes share one queue, the watcher of each may share its rounds
//! ([`RoundShare`]): one process polls for all of them and the others read its rounds.
//!
//! Judging one wait round by round is [`Judge`]'s (instances) and [`ReadyJudge`]'s (snapshots and
//! AMIs): [`StatusWatcher::wait`] uses the first for a worker that waits in place, and the parking
//! lot both, for jobs whose waits hold no worker (many judges fed by one subscription to the
//! rounds).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ec2jobd_spec::WaitUntil;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::Instrument;

use crate::share::{RoundShare, SharedRound, Wants};
use crate::{Ec2, Ec2Error};

/// Most DescribeInstanceStatus calls of one round in flight together.
const ROUND_CALLS: usize = 8;

/// Most instance ids one DescribeInstanceStatus takes.
const STATUS_IDS: usize = 100;

/// Rounds after which a fleet found too large to page through is tried again (it may have
/// shrunk).
const FLEET_RETRY_ROUNDS: u32 = 50;

/// What the watcher knows of its region's fleet, to poll each round with the fewest calls: one
/// unfiltered DescribeInstanceStatus page holds 1,000 instances, one call by id 100, so when the
/// waits cover much of the fleet ⌈fleet/1,000⌉ pages beat ⌈waits/100⌉ calls by id. The fleet's
/// size is learnt by paging through it (never more pages than asking by id would take); a fleet
/// found larger is tried again every [`FLEET_RETRY_ROUNDS`] rounds.
#[derive(Debug, Default)]
struct Fleet {
    /// Pages the last listing took, and whether it reached the end.
    pages: Option<(usize, bool)>,
    /// Rounds asked by id since the fleet was found too large.
    by_id_rounds: u32,
}

impl Fleet {
    /// How many pages to read this round before falling back to ids (`None`: ask by id), when
    /// asking by id takes `by_id` calls.
    fn pages_worth_trying(&mut self, by_id: usize) -> Option<usize> {
        if by_id < 2 {
            return None;
        }
        let most = by_id - 1;
        let worth = match self.pages {
            None => true,
            Some((pages, true)) => pages <= most,
            Some((pages, false)) => pages < most || self.by_id_rounds >= FLEET_RETRY_ROUNDS,
        };
        if worth {
            self.by_id_rounds = 0;
            Some(most)
        } else {
            self.by_id_rounds += 1;
            None
        }
    }

    fn learn(&mut self, pages: usize, complete: bool) {
        self.pages = Some((pages, complete));
    }
}

/// What one round saw of one instance.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct InstanceStatus {
    /// Instance state name (`pending`, `running`, `stopped`, …).
    pub state: String,
    /// SystemStatus summary.
    pub system: Option<String>,
    /// InstanceStatus summary.
    pub instance: Option<String>,
    /// AttachedEbsStatus summary, where reported.
    pub ebs: Option<String>,
}

fn reported(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|v| *v != "not-applicable")
}

impl InstanceStatus {
    /// "2/2 checks passed", "1/2 checks passed", "3/3 checks passed"; `None` when no check reports.
    pub fn checks(&self) -> Option<String> {
        let checks: Vec<&str> = [&self.system, &self.instance, &self.ebs]
            .into_iter()
            .filter_map(reported)
            .collect();
        if checks.is_empty() || self.state != "running" {
            return None;
        }
        let ok = checks.iter().filter(|c| **c == "ok").count();
        Some(format!("{ok}/{} checks passed", checks.len()))
    }
}

/// Where one instance stands against a wait condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The condition holds.
    Done,
    /// Not yet (with what is missing).
    Waiting(String),
    /// It can no longer hold; the job must fail with this code and message.
    Failed(String, String),
}

/// Judges one instance's latest status (`None`: not reported in the round) against `until`.
pub fn evaluate(until: WaitUntil, st: Option<&InstanceStatus>) -> Verdict {
    let Some(st) = st else {
        // Terminated instances drop out of EC2's answers after a while.
        return if until == WaitUntil::Terminated {
            Verdict::Done
        } else {
            Verdict::Waiting("not reported yet".into())
        };
    };
    let gone = matches!(st.state.as_str(), "terminated" | "shutting-down");
    let want = |state: &str| {
        if st.state == state {
            Verdict::Done
        } else if gone {
            Verdict::Failed(
                "InstanceTerminated".into(),
                format!("the instance is {} while waiting for {state}", st.state),
            )
        } else {
            Verdict::Waiting(format!("state {}", st.state))
        }
    };
    match until {
        // `completed` is about snapshots, never an instance's condition (the spec refuses it).
        WaitUntil::None | WaitUntil::Completed => Verdict::Done,
        WaitUntil::Running => want("running"),
        WaitUntil::Stopped => want("stopped"),
        WaitUntil::Terminated => {
            if st.state == "terminated" {
                Verdict::Done
            } else {
                Verdict::Waiting(format!("state {}", st.state))
            }
        }
        WaitUntil::StatusOk => {
            if st.state != "running" {
                return match want("running") {
                    Verdict::Done => Verdict::Waiting("state running".into()),
                    other => other,
                };
            }
            for (name, v) in [
                ("SystemStatus", &st.system),
                ("InstanceStatus", &st.instance),
                ("AttachedEbsStatus", &st.ebs),
            ] {
                if v.as_deref() == Some("impaired") {
                    return Verdict::Failed(
                        "StatusCheckImpaired".into(),
                        format!("{name} is impaired"),
                    );
                }
            }
            let pending: Vec<String> = [
                ("SystemStatus", &st.system),
                ("InstanceStatus", &st.instance),
                ("AttachedEbsStatus", &st.ebs),
            ]
            .into_iter()
            .filter_map(|(name, v)| match v.as_deref() {
                Some("ok") | Some("not-applicable") => None,
                None if name == "AttachedEbsStatus" => None,
                other => Some(format!("{name} {}", other.unwrap_or("not reported"))),
            })
            .collect();
            if pending.is_empty() {
                Verdict::Done
            } else {
                Verdict::Waiting(pending.join(", "))
            }
        }
    }
}

/// One polling round as published to waiters.
#[derive(Debug, Clone, Default)]
pub struct Round {
    /// Counts up from 1.
    pub number: u64,
    /// Ids asked about in this round (a waiter judges only those).
    pub asked: HashSet<String>,
    /// When its first call was made (a wait judges only rounds that began after it did).
    pub began: Option<Instant>,
    /// What EC2 reported.
    pub statuses: HashMap<String, InstanceStatus>,
    /// A failed call in this round, if any.
    pub error: Option<Ec2Error>,
    /// Instances EC2 answered `InvalidInstanceID.NotFound` for this round (the rest of their
    /// chunk was asked again without them): just made and not yet known everywhere (eventual
    /// consistency), or gone for good; each wait's grace tells which.
    pub unknown: HashSet<String>,
    /// Snapshots and AMIs: state and progress of each id asked about.
    pub resources: HashMap<String, (String, Option<String>)>,
    /// Snapshots and AMIs the round could not describe (a chunk that failed for one id is asked
    /// again one id at a time, so one job's vanished snapshot fails only that job).
    pub resource_errors: HashMap<String, Ec2Error>,
}

/// What a registration asks each round about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Watched {
    /// Instance status (DescribeInstanceStatus, 100 ids per call).
    #[default]
    Instances,
    /// Snapshots (DescribeSnapshots, 200 ids per call), until `completed` (`error` fails).
    Snapshots,
    /// AMIs (DescribeImages, 200 ids per call), until `available` (`failed`, `invalid`, `error`,
    /// `deregistered` fail).
    Images,
}

impl Watched {
    /// The state a snapshot or AMI is ready in.
    pub fn done(self) -> &'static str {
        match self {
            Watched::Instances => "running",
            Watched::Snapshots => "completed",
            Watched::Images => "available",
        }
    }

    /// Whether a snapshot or AMI in `state` will never be ready.
    pub fn failed(self, state: &str) -> bool {
        match self {
            Watched::Instances => false,
            Watched::Snapshots => state == "error",
            Watched::Images => matches!(state, "failed" | "invalid" | "error" | "deregistered"),
        }
    }

    /// How ids of this kind are counted in messages.
    pub fn noun(self) -> &'static str {
        match self {
            Watched::Instances => "instance(s)",
            Watched::Snapshots => "snapshot(s)",
            Watched::Images => "AMI(s)",
        }
    }

    /// The error code of a snapshot or AMI that will never be ready.
    pub fn failure_code(self) -> &'static str {
        match self {
            Watched::Images => "ImageFailed",
            _ => "SnapshotFailed",
        }
    }
}

/// State and progress (`"40%"`, snapshots only) of a snapshot or AMI.
pub type ReadyState = (String, Option<String>);

/// One wait for snapshots or AMIs to be ready, judged round by round ([`Judge`]'s counterpart).
#[derive(Debug, Clone)]
pub struct ReadyJudge {
    kind: Watched,
    /// The latest state seen of each id (`pending` until a round tells).
    pub seen: BTreeMap<String, ReadyState>,
    since: Instant,
    /// How long an id EC2 does not know yet is waited for (the ids are the daemon's own, made a
    /// moment ago), from `since`; then the wait fails as EC2 said. Zero: at once.
    unknown_grace: Duration,
    /// Ids the latest round found unknown.
    pub unknown: BTreeSet<String>,
}

impl ReadyJudge {
    /// A judge of `ids` (snapshots or AMIs, by `kind`).
    pub fn new(kind: Watched, ids: &[String]) -> Self {
        Self {
            kind,
            seen: ids
                .iter()
                .map(|id| (id.clone(), ("pending".to_string(), None)))
                .collect(),
            since: Instant::now(),
            unknown_grace: Duration::ZERO,
            unknown: BTreeSet::new(),
        }
    }

    /// The same, waiting up to `grace` for ids EC2 does not know yet.
    pub fn with_unknown_grace(mut self, grace: Duration) -> Self {
        self.unknown_grace = grace;
        self
    }

    /// How many are ready.
    pub fn done(&self) -> usize {
        self.seen
            .values()
            .filter(|(st, _)| st == self.kind.done())
            .count()
    }

    /// Those not ready yet.
    pub fn pending(&self) -> impl Iterator<Item = (&String, &ReadyState)> {
        self.seen
            .iter()
            .filter(|(_, (st, _))| st != self.kind.done())
    }

    /// "1 of 2 snapshot(s) completed (40% overall)": changes whenever there is progress to show.
    pub fn report(&self) -> String {
        let total = self.seen.len();
        let mut report = format!(
            "{} of {total} {} {}",
            self.done(),
            self.kind.noun(),
            self.kind.done()
        );
        if self.kind == Watched::Snapshots {
            report.push_str(&format!(" ({}% overall)", self.percent()));
        }
        report
    }

    /// Snapshots: their mean progress in percent (AMIs report none: 0).
    pub fn percent(&self) -> u64 {
        if self.kind != Watched::Snapshots {
            return 0;
        }
        let sum: u64 = self
            .seen
            .values()
            .map(|(st, p)| {
                if st == self.kind.done() {
                    100
                } else {
                    p.as_deref()
                        .and_then(|p| p.trim_end_matches('%').parse::<u64>().ok())
                        .unwrap_or(0)
                }
            })
            .sum();
        sum / self.seen.len().max(1) as u64
    }

    /// Whether `round` tells about this wait: it began after the wait did and asked about every id
    /// not ready yet.
    pub fn concerns(&self, round: &Round) -> bool {
        round.began.is_none_or(|b| b >= self.since)
            && self.pending().all(|(id, _)| round.asked.contains(id))
    }

    /// Judges one round: `None` while the wait goes on, `Some(Ok)` once every id is ready,
    /// `Some(Err)` when one never will be (`Failed` naming it, with `failure_code`) or EC2 refused
    /// to describe it for good.
    pub fn observe(&mut self, round: &Round) -> Option<Result<(), WaitFailure>> {
        if !self.concerns(round) {
            return None;
        }
        let pending: Vec<String> = self.pending().map(|(id, _)| id.clone()).collect();
        self.unknown.clear();
        for id in &pending {
            if let Some(e) = round.resource_errors.get(id) {
                if e.is_not_found() && self.since.elapsed() < self.unknown_grace {
                    self.unknown.insert(id.clone());
                    continue;
                }
                if !e.transient {
                    return Some(Err(WaitFailure::Aws(e.clone())));
                }
            }
            if let Some(st) = round.resources.get(id) {
                self.seen.insert(id.clone(), st.clone());
            }
        }
        if let Some((id, (state, _))) = self.seen.iter().find(|(_, (st, _))| self.kind.failed(st)) {
            return Some(Err(WaitFailure::Failed {
                instance_id: id.clone(),
                code: self.kind.failure_code().into(),
                message: format!("ended in state {state}"),
                last: HashMap::new(),
            }));
        }
        self.pending().next().is_none().then_some(Ok(()))
    }
}

/// Why a wait ended without its condition holding.
#[derive(Debug, Clone)]
pub enum WaitFailure {
    /// The timeout passed; the last status seen of each instance.
    Timeout(HashMap<String, InstanceStatus>),
    /// An instance can no longer reach the condition (impaired check, terminated…).
    Failed {
        /// Instance at fault.
        instance_id: String,
        /// Stable code (`StatusCheckImpaired`, `InstanceTerminated`).
        code: String,
        /// What happened.
        message: String,
        /// Last status seen of each instance.
        last: HashMap<String, InstanceStatus>,
    },
    /// EC2 refused the status call for good.
    Aws(Ec2Error),
}

struct Waiter {
    kind: Watched,
    ids: Vec<String>,
    interval: Duration,
}

#[derive(Default)]
struct Registry {
    waiters: HashMap<u64, Waiter>,
    next: u64,
    polling: bool,
}

/// The shared poller of one account+region.
pub struct StatusWatcher {
    ec2: Ec2,
    reg: Mutex<Registry>,
    rounds: watch::Sender<Arc<Round>>,
    /// Rounds shared with the other processes of the queue, and this watcher's scope in it.
    share: Option<(Arc<dyn RoundShare>, String)>,
}

/// Keeps instance ids in the watcher's rounds until dropped.
pub struct Registration {
    watcher: Arc<StatusWatcher>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.watcher.lock().waiters.remove(&self.id);
    }
}

/// One wait judged round by round: which instances must meet which condition, and what has been
/// seen of them so far.
#[derive(Debug, Clone)]
pub struct Judge {
    ids: Vec<String>,
    until: WaitUntil,
    /// Purged while waiting for `terminated`: counted as gone.
    gone: HashSet<String>,
    /// Instances seen on their way up: one that is back at stopping/stopped was started and fell
    /// back (EC2 stops an instance it cannot start, e.g. without a KMS grant for its volume).
    moving: HashSet<String>,
    /// The latest status seen of each instance.
    pub last: HashMap<String, InstanceStatus>,
    /// Rounds that began earlier may have asked before the call this wait follows took effect.
    since: Instant,
    /// How long an instance EC2 does not know yet is waited for (eventual consistency), from
    /// `since`; then it fails `InvalidInstanceID.NotFound`. Zero: at once.
    unknown_grace: Duration,
    /// Instances the latest round found unknown.
    pub unknown: HashSet<String>,
}

impl Judge {
    /// A judge of `until` over `ids`.
    pub fn new(ids: &[String], until: WaitUntil) -> Self {
        Self {
            ids: ids.to_vec(),
            until,
            gone: HashSet::new(),
            moving: HashSet::new(),
            last: HashMap::new(),
            since: Instant::now(),
            unknown_grace: Duration::ZERO,
            unknown: HashSet::new(),
        }
    }

    /// The same, waiting up to `grace` for instances EC2 does not know yet.
    pub fn with_unknown_grace(mut self, grace: Duration) -> Self {
        self.unknown_grace = grace;
        self
    }

    /// The instances judged.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// How many instances met the condition in the latest round seen.
    pub fn done(&self) -> usize {
        self.ids
            .iter()
            .filter(|id| evaluate(self.until, self.last.get(*id)) == Verdict::Done)
            .count()
    }

    /// Whether `round` tells about this wait: it asked about every instance, and began after the
    /// wait did.
    pub fn concerns(&self, round: &Round) -> bool {
        round.began.is_none_or(|b| b >= self.since)
            && self.ids.iter().all(|i| round.asked.contains(i))
    }

    /// Judges one round: `None` while the wait goes on (or the round did not ask about all of this
    /// wait's instances: it began before they were registered), `Some(Ok)` once every instance meets
    /// the condition, `Some(Err)` when one never can or EC2 refused the status call for good.
    pub fn observe(&mut self, round: &Round) -> Option<Result<(), WaitFailure>> {
        if !self.concerns(round) {
            return None;
        }
        for id in &self.ids {
            if let Some(s) = round.statuses.get(id) {
                self.last.insert(id.clone(), s.clone());
            }
        }
        if let Some(e) = &round.error {
            if !e.transient {
                return Some(Err(WaitFailure::Aws(e.clone())));
            }
            return None;
        }
        self.unknown = self
            .ids
            .iter()
            .filter(|i| round.unknown.contains(*i))
            .cloned()
            .collect();
        if self.until == WaitUntil::Terminated {
            // A purged terminated instance is unknown: it is gone.
            self.gone.extend(self.unknown.drain());
        } else if let Some(id) = self.unknown.iter().min() {
            if self.since.elapsed() >= self.unknown_grace {
                return Some(Err(WaitFailure::Failed {
                    instance_id: id.clone(),
                    code: "InvalidInstanceID.NotFound".into(),
                    message: format!(
                        "EC2 does not know {id} ({}s after the wait began)",
                        self.since.elapsed().as_secs()
                    ),
                    last: self.last.clone(),
                }));
            }
            return None;
        }
        let mut all_done = true;
        for id in &self.ids {
            let st = if self.gone.contains(id) {
                None
            } else {
                round.statuses.get(id)
            };
            let verdict = match st.map(|s| s.state.as_str()) {
                Some("pending" | "running") => {
                    self.moving.insert(id.clone());
                    evaluate(self.until, st)
                }
                Some(state @ ("stopping" | "stopped"))
                    if self.moving.contains(id)
                        && matches!(self.until, WaitUntil::Running | WaitUntil::StatusOk) =>
                {
                    Verdict::Failed(
                        "InstanceStopped".into(),
                        format!("the instance went back to {state} while starting"),
                    )
                }
                _ => evaluate(self.until, st),
            };
            match verdict {
                Verdict::Done => {}
                Verdict::Waiting(_) => all_done = false,
                Verdict::Failed(code, message) => {
                    return Some(Err(WaitFailure::Failed {
                        instance_id: id.clone(),
                        code,
                        message,
                        last: self.last.clone(),
                    }))
                }
            }
        }
        all_done.then_some(Ok(()))
    }
}

impl StatusWatcher {
    /// A watcher polling through `ec2`.
    pub fn new(ec2: Ec2) -> Arc<Self> {
        Self::build(ec2, None)
    }

    /// A watcher whose rounds are shared through `share` under `scope` (see [`RoundShare`]):
    /// it polls through `ec2` only while this process is the one that polls.
    pub fn shared(ec2: Ec2, share: Arc<dyn RoundShare>, scope: String) -> Arc<Self> {
        Self::build(ec2, Some((share, scope)))
    }

    fn build(ec2: Ec2, share: Option<(Arc<dyn RoundShare>, String)>) -> Arc<Self> {
        Arc::new(Self {
            ec2,
            reg: Mutex::new(Registry::default()),
            rounds: watch::channel(Arc::new(Round::default())).0,
            share,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Registry> {
        self.reg.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rounds as they are published (the latest one first).
    pub fn rounds(&self) -> watch::Receiver<Arc<Round>> {
        self.rounds.subscribe()
    }

    /// Adds instance `ids` to every round, polled at least every `interval`, until the
    /// registration drops.
    pub fn register(self: &Arc<Self>, ids: &[String], interval: Duration) -> Registration {
        self.register_kind(Watched::Instances, ids, interval)
    }

    /// Adds `ids` of `kind` to every round, polled at least every `interval`, until the
    /// registration drops.
    pub fn register_kind(
        self: &Arc<Self>,
        kind: Watched,
        ids: &[String],
        interval: Duration,
    ) -> Registration {
        let mut reg = self.lock();
        reg.next += 1;
        let id = reg.next;
        reg.waiters.insert(
            id,
            Waiter {
                kind,
                ids: ids.to_vec(),
                interval,
            },
        );
        if !reg.polling {
            reg.polling = true;
            let me = self.clone();
            tokio::spawn(async move { me.poll().await });
        }
        Registration {
            watcher: self.clone(),
            id,
        }
    }

    /// DescribeInstanceStatus for `chunk` into `round`. An instance EC2 does not know is set
    /// apart (`Round::unknown`) and the rest asked again, so one job's fresh or vanished id does
    /// not blind every other wait of the chunk.
    async fn describe_status(&self, chunk: &[String], round: &mut Round) {
        let mut ask: Vec<String> = chunk.to_vec();
        while !ask.is_empty() {
            match self.ec2.describe_instance_status(&ask).await {
                Ok(found) => {
                    round.statuses.extend(found);
                    return;
                }
                Err(e) if e.code == "InvalidInstanceID.NotFound" => {
                    let named = crate::coalesce::named_ids(&e.message);
                    let before = ask.len();
                    ask.retain(|id| !named.contains(id));
                    if ask.len() == before {
                        // EC2 named none of them: the whole chunk is in doubt.
                        round.unknown.extend(ask);
                        return;
                    }
                    round
                        .unknown
                        .extend(named.into_iter().filter(|id| chunk.contains(id)));
                }
                Err(e) => {
                    round.error = Some(e);
                    return;
                }
            }
        }
    }

    /// The status of every id of a round: the region's whole fleet page by page when that takes
    /// fewer calls than asking by id ([`Fleet`]), else by id.
    async fn describe_statuses(
        self: Arc<Self>,
        ids: &[String],
        round: &mut Round,
        fleet: &mut Fleet,
    ) {
        let by_id = ids.len().div_ceil(STATUS_IDS);
        let Some(most) = fleet.pages_worth_trying(by_id) else {
            return self.describe_by_id(ids, round).await;
        };
        let asked: HashSet<&String> = ids.iter().collect();
        let (mut pages, mut token, mut failed) = (0, None, false);
        let complete = loop {
            match self.ec2.instance_status_fleet_page(token.take()).await {
                Ok((found, next)) => {
                    pages += 1;
                    round
                        .statuses
                        .extend(found.into_iter().filter(|(id, _)| asked.contains(id)));
                    match next {
                        None => break true,
                        Some(_) if pages >= most => break false,
                        Some(t) => token = Some(t),
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e.message, "fleet status page failed; asking by id");
                    failed = true;
                    break false;
                }
            }
        };
        // A listing that failed is tried again only as rarely as one that was too long.
        fleet.learn(if failed { usize::MAX } else { pages }, complete);
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| !round.statuses.contains_key(*id))
            .cloned()
            .collect();
        if complete {
            // Not in the region's listing: EC2 does not know them (yet, or any more).
            round.unknown.extend(missing);
        } else if !missing.is_empty() {
            self.describe_by_id(&missing, round).await;
        }
    }

    /// DescribeInstanceStatus for `ids`, 100 per call, up to [`ROUND_CALLS`] calls at once (the
    /// pacer still spaces them to EC2's bucket): a round of 1,000 waits takes about one call's
    /// time, not ten.
    async fn describe_by_id(self: Arc<Self>, ids: &[String], round: &mut Round) {
        let mut chunks: Vec<Vec<String>> = ids.chunks(STATUS_IDS).map(<[String]>::to_vec).collect();
        while !chunks.is_empty() {
            let mut calls = tokio::task::JoinSet::new();
            for chunk in chunks.drain(..chunks.len().min(ROUND_CALLS)) {
                let me = self.clone();
                calls.spawn(
                    async move {
                        let mut part = Round::default();
                        me.describe_status(&chunk, &mut part).await;
                        part
                    }
                    .instrument(tracing::Span::current()),
                );
            }
            while let Some(part) = calls.join_next().await {
                match part {
                    Ok(part) => {
                        round.statuses.extend(part.statuses);
                        round.unknown.extend(part.unknown);
                        if part.error.is_some() {
                            round.error = part.error;
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "a status call of the round panicked"),
                }
            }
        }
    }

    async fn poll(self: Arc<Self>) {
        let mut number = self.rounds.borrow().number;
        // The last shared round taken (when another process polls): its number and start.
        let mut followed = (0, 0);
        let mut fleet = Fleet::default();
        loop {
            let ([ids, snapshots, images], interval) = {
                let mut reg = self.lock();
                if reg.waiters.is_empty() {
                    reg.polling = false;
                    return;
                }
                let union = |kind: Watched| {
                    let mut ids: Vec<String> = reg
                        .waiters
                        .values()
                        .filter(|w| w.kind == kind)
                        .flat_map(|w| w.ids.iter().cloned())
                        .collect::<HashSet<_>>()
                        .into_iter()
                        .collect();
                    ids.sort();
                    ids
                };
                let all = [
                    union(Watched::Instances),
                    union(Watched::Snapshots),
                    union(Watched::Images),
                ];
                let interval = reg
                    .waiters
                    .values()
                    .map(|w| w.interval)
                    .min()
                    .unwrap_or(Duration::from_secs(15));
                (all, interval)
            };
            number += 1;
            if let Some((share, scope)) = self.share.as_ref().filter(|(s, _)| !s.polls()) {
                // Another process polls: take its latest round instead of calling EC2.
                let wants = Wants {
                    instances: ids,
                    snapshots,
                    images,
                    interval_ms: interval.as_millis() as u64,
                };
                match share.follow(scope, &wants).await {
                    Ok(Some(shared)) if (shared.number, shared.began_ms) != followed => {
                        followed = (shared.number, shared.began_ms);
                        self.rounds.send_replace(Arc::new(shared.cut(
                            number,
                            &wants,
                            share.now_ms(),
                        )));
                    }
                    Ok(_) => number -= 1,
                    Err(e) => {
                        number -= 1;
                        tracing::debug!(error = %e, "shared status round unavailable");
                    }
                }
                tokio::time::sleep(interval).await;
                continue;
            }
            let mut round = Round {
                number,
                asked: ids
                    .iter()
                    .chain(&snapshots)
                    .chain(&images)
                    .cloned()
                    .collect(),
                began: Some(Instant::now()),
                ..Default::default()
            };
            self.clone()
                .describe_statuses(&ids, &mut round, &mut fleet)
                .await;
            for (kind, list) in [(Watched::Snapshots, &snapshots), (Watched::Images, &images)] {
                for chunk in list.chunks(200) {
                    self.describe_resources(kind, chunk, &mut round).await;
                }
            }
            self.ec2.observer.round(ids.len());
            if let Some((share, scope)) = &self.share {
                if let Err(e) = share
                    .publish(scope, &SharedRound::of(&round, share.now_ms()))
                    .await
                {
                    tracing::debug!(error = %e, "could not share a status round");
                }
            }
            self.rounds.send_replace(Arc::new(round));
            tokio::time::sleep(interval).await;
        }
    }

    /// One chunk of snapshots or AMIs into `round`; a chunk EC2 refuses for good is asked again
    /// one id at a time, so the error lands on the id at fault only.
    async fn describe_resources(&self, kind: Watched, chunk: &[String], round: &mut Round) {
        let ask = |ids: Vec<String>| async move {
            match kind {
                Watched::Snapshots => self
                    .ec2
                    .describe_snapshots(Some(ids), &Vec::new(), false)
                    .await
                    .map(|(found, _, _)| {
                        found
                            .into_iter()
                            .map(|s| (s.snapshot_id, (s.state, s.progress)))
                            .collect::<Vec<_>>()
                    }),
                _ => self
                    .ec2
                    .describe_images(Some(ids), &Vec::new())
                    .await
                    .map(|(found, _)| {
                        found
                            .into_iter()
                            .map(|i| (i.image_id, (i.state, None)))
                            .collect::<Vec<_>>()
                    }),
            }
        };
        match ask(chunk.to_vec()).await {
            Ok(found) => round.resources.extend(found),
            Err(e) if e.transient || chunk.len() == 1 => {
                for id in chunk {
                    round.resource_errors.insert(id.clone(), e.clone());
                }
            }
            Err(_) => {
                for id in chunk {
                    match ask(vec![id.clone()]).await {
                        Ok(found) => round.resources.extend(found),
                        Err(e) => {
                            round.resource_errors.insert(id.clone(), e);
                        }
                    }
                }
            }
        }
    }

    /// Waits until every instance in `ids` meets `until`, or fails. `on_round` sees each round with
    /// the latest status of every instance (for progress reports).
    pub async fn wait(
        self: &Arc<Self>,
        ids: &[String],
        until: WaitUntil,
        timeout: Duration,
        interval: Duration,
        mut on_round: impl FnMut(&Round, &HashMap<String, InstanceStatus>),
    ) -> Result<HashMap<String, InstanceStatus>, WaitFailure> {
        if until == WaitUntil::None || ids.is_empty() {
            return Ok(HashMap::new());
        }
        let mut rx = self.rounds.subscribe();
        let _reg = self.register(ids, interval);
        let deadline = Instant::now() + timeout;
        let mut judge = Judge::new(ids, until);
        loop {
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err(WaitFailure::Timeout(judge.last)) },
                _ = tokio::time::sleep_until(deadline) => return Err(WaitFailure::Timeout(judge.last)),
            }
            let round = rx.borrow_and_update().clone();
            let verdict = judge.observe(&round);
            if judge.concerns(&round) {
                on_round(&round, &judge.last);
            }
            match verdict {
                None => {}
                Some(Ok(())) => return Ok(judge.last),
                Some(Err(f)) => return Err(f),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fleet_is_listed_only_while_that_takes_fewer_calls_than_ids() {
        let mut f = Fleet::default();
        // One call by id: nothing to save.
        assert_eq!(f.pages_worth_trying(1), None);
        // Unknown fleet, 100 calls by id: list at most 99 pages.
        assert_eq!(f.pages_worth_trying(100), Some(99));
        f.learn(12, true);
        assert_eq!(
            f.pages_worth_trying(100),
            Some(99),
            "12 pages beat 100 calls"
        );
        assert_eq!(f.pages_worth_trying(13), Some(12), "12 pages beat 13 calls");
        assert_eq!(
            f.pages_worth_trying(12),
            None,
            "12 pages do not beat 12 calls"
        );
        // A listing cut short: the fleet is larger than what was read.
        f.learn(4, false);
        assert_eq!(f.pages_worth_trying(5), None);
        assert_eq!(
            f.pages_worth_trying(6),
            Some(5),
            "more waits: worth reading further"
        );
        f.learn(5, false);
        for _ in 0..FLEET_RETRY_ROUNDS {
            assert_eq!(f.pages_worth_trying(6), None);
        }
        assert_eq!(
            f.pages_worth_trying(6),
            Some(5),
            "tried again after {FLEET_RETRY_ROUNDS} rounds by id"
        );
        // A failed listing counts as too long.
        f.learn(usize::MAX, false);
        assert_eq!(f.pages_worth_trying(100), None);
    }

    fn round(asked: &[&str], states: &[(&str, &str, Option<&str>)]) -> Round {
        Round {
            number: 1,
            asked: asked.iter().map(|s| s.to_string()).collect(),
            began: Some(Instant::now()),
            resources: states
                .iter()
                .map(|(id, st, p)| (id.to_string(), (st.to_string(), p.map(String::from))))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn readiness_is_judged_on_rounds_that_asked_about_every_pending_id() {
        let ids = ["snap-1".to_string(), "snap-2".to_string()];
        let mut j = ReadyJudge::new(Watched::Snapshots, &ids);
        // A round that did not ask about snap-2 tells nothing.
        assert!(j
            .observe(&round(&["snap-1"], &[("snap-1", "completed", None)]))
            .is_none());
        assert_eq!(j.done(), 0);
        let r = round(
            &["snap-1", "snap-2"],
            &[
                ("snap-1", "completed", Some("100%")),
                ("snap-2", "pending", Some("40%")),
            ],
        );
        assert!(j.observe(&r).is_none());
        assert_eq!(j.report(), "1 of 2 snapshot(s) completed (70% overall)");
        // Once snap-1 is ready, rounds need ask only about snap-2.
        assert!(matches!(
            j.observe(&round(
                &["snap-2"],
                &[("snap-2", "completed", Some("100%"))]
            )),
            Some(Ok(()))
        ));

        let mut j = ReadyJudge::new(Watched::Images, &["ami-1".to_string()]);
        match j.observe(&round(&["ami-1"], &[("ami-1", "failed", None)])) {
            Some(Err(WaitFailure::Failed {
                instance_id,
                code,
                message,
                ..
            })) => {
                assert_eq!(
                    (instance_id.as_str(), code.as_str()),
                    ("ami-1", "ImageFailed")
                );
                assert_eq!(message, "ended in state failed");
            }
            other => panic!("{other:?}"),
        }
        // A transient describe error waits; a lasting one fails.
        let mut j = ReadyJudge::new(Watched::Snapshots, &["snap-9".to_string()]);
        let err = |transient| Ec2Error {
            code: "X".into(),
            message: "m".into(),
            request_id: None,
            transient,
        };
        let mut r = round(&["snap-9"], &[]);
        r.resource_errors.insert("snap-9".into(), err(true));
        assert!(j.observe(&r).is_none());
        r.resource_errors.insert("snap-9".into(), err(false));
        assert!(matches!(j.observe(&r), Some(Err(WaitFailure::Aws(_)))));
    }

    fn st(state: &str, sys: &str, inst: &str, ebs: Option<&str>) -> InstanceStatus {
        InstanceStatus {
            state: state.into(),
            system: Some(sys.into()),
            instance: Some(inst.into()),
            ebs: ebs.map(String::from),
        }
    }

    /// An instance EC2 does not know yet (eventual consistency) is waited for within the wait's
    /// grace, then fails NotFound; a terminated wait counts it gone; the others of the round are
    /// judged as usual.
    #[test]
    fn unknown_instances_are_waited_for_within_the_grace_only() {
        let ids = ["i-1".to_string(), "i-2".to_string()];
        let mut r = Round {
            number: 1,
            asked: ids.iter().cloned().collect(),
            began: None,
            ..Default::default()
        };
        r.unknown.insert("i-2".into());
        r.statuses
            .insert("i-1".into(), st("running", "ok", "ok", None));
        let mut patient =
            Judge::new(&ids, WaitUntil::StatusOk).with_unknown_grace(Duration::from_secs(60));
        assert!(patient.observe(&r).is_none(), "waits for EC2 to know i-2");
        assert_eq!(patient.unknown, ["i-2".to_string()].into());
        assert_eq!(patient.done(), 1);
        let mut hasty = Judge::new(&ids, WaitUntil::StatusOk);
        match hasty.observe(&r) {
            Some(Err(WaitFailure::Failed {
                instance_id, code, ..
            })) => {
                assert_eq!(
                    (instance_id.as_str(), code.as_str()),
                    ("i-2", "InvalidInstanceID.NotFound")
                )
            }
            other => panic!("{other:?}"),
        }
        let mut gone = Judge::new(&ids, WaitUntil::Terminated);
        r.statuses
            .insert("i-1".into(), st("terminated", "", "", None));
        assert!(
            matches!(gone.observe(&r), Some(Ok(()))),
            "a purged instance is gone"
        );
    }

    /// A snapshot EC2 does not know yet is pending within the grace, then the wait fails as EC2
    /// said; one it knows is judged as usual.
    #[test]
    fn unknown_snapshots_are_waited_for_within_the_grace_only() {
        let ids = ["snap-1".to_string(), "snap-2".to_string()];
        let mut r = Round {
            number: 1,
            asked: ids.iter().cloned().collect(),
            began: None,
            ..Default::default()
        };
        let not_found = Ec2Error {
            code: "InvalidSnapshot.NotFound".into(),
            message: "The snapshot 'snap-2' does not exist.".into(),
            request_id: None,
            transient: false,
        };
        r.resource_errors.insert("snap-2".into(), not_found);
        r.resources
            .insert("snap-1".into(), ("completed".into(), Some("100%".into())));
        let mut patient =
            ReadyJudge::new(Watched::Snapshots, &ids).with_unknown_grace(Duration::from_secs(60));
        assert!(
            patient.observe(&r).is_none(),
            "waits for EC2 to know snap-2"
        );
        assert_eq!(patient.unknown, ["snap-2".to_string()].into());
        assert_eq!(patient.done(), 1);
        let mut hasty = ReadyJudge::new(Watched::Snapshots, &ids);
        match hasty.observe(&r) {
            Some(Err(WaitFailure::Aws(e))) => assert_eq!(e.code, "InvalidSnapshot.NotFound"),
            other => panic!("{other:?}"),
        }
        r.resource_errors.clear();
        r.resources
            .insert("snap-2".into(), ("completed".into(), Some("100%".into())));
        assert!(matches!(patient.observe(&r), Some(Ok(()))));
        assert!(patient.unknown.is_empty());
    }

    #[test]
    fn status_ok_needs_every_reported_check() {
        let ok = st("running", "ok", "ok", None);
        assert_eq!(evaluate(WaitUntil::StatusOk, Some(&ok)), Verdict::Done);
        assert_eq!(ok.checks().as_deref(), Some("2/2 checks passed"));
        let three = st("running", "ok", "ok", Some("ok"));
        assert_eq!(three.checks().as_deref(), Some("3/3 checks passed"));
        let na = st("running", "ok", "ok", Some("not-applicable"));
        assert_eq!(evaluate(WaitUntil::StatusOk, Some(&na)), Verdict::Done);
        assert_eq!(na.checks().as_deref(), Some("2/2 checks passed"));
        let init = st("running", "ok", "initializing", None);
        assert!(
            matches!(evaluate(WaitUntil::StatusOk, Some(&init)), Verdict::Waiting(w) if w.contains("InstanceStatus initializing"))
        );
        assert_eq!(init.checks().as_deref(), Some("1/2 checks passed"));
        let insufficient = st("running", "insufficient-data", "ok", None);
        assert!(matches!(
            evaluate(WaitUntil::StatusOk, Some(&insufficient)),
            Verdict::Waiting(_)
        ));
        let ebs_pending = st("running", "ok", "ok", Some("initializing"));
        assert!(
            matches!(evaluate(WaitUntil::StatusOk, Some(&ebs_pending)), Verdict::Waiting(w) if w.contains("AttachedEbsStatus"))
        );
        let pending = st("pending", "not-applicable", "not-applicable", None);
        assert!(matches!(
            evaluate(WaitUntil::StatusOk, Some(&pending)),
            Verdict::Waiting(_)
        ));
        assert!(matches!(
            evaluate(WaitUntil::StatusOk, None),
            Verdict::Waiting(_)
        ));
    }

    #[test]
    fn impaired_and_terminated_fail_naming_the_cause() {
        let bad = st("running", "ok", "impaired", None);
        assert_eq!(
            evaluate(WaitUntil::StatusOk, Some(&bad)),
            Verdict::Failed(
                "StatusCheckImpaired".into(),
                "InstanceStatus is impaired".into()
            )
        );
        let bad = st("running", "impaired", "ok", Some("ok"));
        assert!(
            matches!(evaluate(WaitUntil::StatusOk, Some(&bad)), Verdict::Failed(_, m) if m.starts_with("SystemStatus"))
        );
        let gone = st("terminated", "not-applicable", "not-applicable", None);
        assert!(
            matches!(evaluate(WaitUntil::Running, Some(&gone)), Verdict::Failed(c, _) if c == "InstanceTerminated")
        );
        assert!(
            matches!(evaluate(WaitUntil::StatusOk, Some(&gone)), Verdict::Failed(c, _) if c == "InstanceTerminated")
        );
    }

    #[test]
    fn state_waits() {
        let stopping = st("stopping", "not-applicable", "not-applicable", None);
        assert!(matches!(
            evaluate(WaitUntil::Stopped, Some(&stopping)),
            Verdict::Waiting(_)
        ));
        let stopped = st("stopped", "not-applicable", "not-applicable", None);
        assert_eq!(evaluate(WaitUntil::Stopped, Some(&stopped)), Verdict::Done);
        assert!(matches!(
            evaluate(WaitUntil::Running, Some(&stopped)),
            Verdict::Waiting(_)
        ));
        assert_eq!(
            evaluate(WaitUntil::Terminated, None),
            Verdict::Done,
            "purged counts as terminated"
        );
        let shutting = st("shutting-down", "not-applicable", "not-applicable", None);
        assert!(matches!(
            evaluate(WaitUntil::Terminated, Some(&shutting)),
            Verdict::Waiting(_)
        ));
        assert_eq!(stopped.checks(), None, "no checks for a stopped instance");
    }
}

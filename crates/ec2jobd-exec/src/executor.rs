//! The executor that runs jobs against EC2 through the driver crate. It reads the job's stored
//! params back into its [`ActionSpec`] and dispatches on it (each action gets its typed params),
//! checks for cancellation at every boundary and turns driver errors into job errors that keep the
//! AWS code and request id. What to call for which instances is planned in `plan.rs` (pure); what
//! an attempt leaves for the next is a typed `Checkpoint` (`checkpoint.rs`).
//!
//! Instance actions share one flow: resolve the targets (describe), make the call for the instances
//! that need it, wait through the account+region's shared [`StatusWatcher`](ec2jobd_ec2::StatusWatcher),
//! then describe again for the results. Resuming after a crash is safe: start, stop and terminate
//! call only for instances not already in (or moving to) the wanted state, so a repeated attempt
//! observes instead of repeating; reboot and tag calls, which leave nothing to observe, record a
//! checkpoint after the call and are not made again once it is there.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ec2jobd_ec2::{
    Attribute, CallOutcome, Coalescer, Described, Ec2, Ec2Error, Ec2Pool, Launch, Protection,
    SharedCall, Watched,
};
use ec2jobd_spec::action::{AuditParams, ModifyParams, OnMissing, RunParams};
use ec2jobd_spec::{
    Action, ActionSpec, InstanceResult, JobError, JobResults, WaitUntil, CAPACITY_CODES,
};
use serde::{Deserialize, Serialize};

use crate::parking::{wait_error, Parking, PlannedCall, Wait, WaitOutcome};
use crate::runner::{ExecCtx, ExecError, Executor};

mod backup;
mod checkpoint;
mod images;
mod plan;
mod ready;
mod rotation;
mod waves;
mod workflow;
use checkpoint::Checkpoint;
use images::Ready;
pub use images::SOURCE_TAG;
pub use rotation::ROTATION_TAG;

/// Tag put on every instance a job launches, holding the job id.
pub const JOB_TAG: &str = "ec2jobd:job-id";

/// Tag put on what a workflow step creates, holding the step's name (a workflow may launch or
/// snapshot more than once; a resumed step must find only its own).
pub const STEP_TAG: &str = "ec2jobd:step";

/// Most bytes a rendered backup name or description may have before it is cut to EC2's limits
/// (AMI names 128, descriptions 255): a bound on work, not the final length.
const NAME_BUDGET: usize = 4096;

/// The job's region (filled in at submission; the fallback only guards old rows).
fn job_region(ctx: &ExecCtx) -> &str {
    ctx.job.spec.region.as_deref().unwrap_or("us-east-1")
}

/// The tags marking what this job (and step) creates.
fn made_by(ctx: &ExecCtx) -> BTreeMap<String, String> {
    let mut t = BTreeMap::from([(JOB_TAG.to_string(), ctx.job.id.clone())]);
    if let Some((_, name)) = &ctx.step {
        t.insert(STEP_TAG.to_string(), name.clone());
    }
    t
}

/// Describe filters matching every one of `tags`.
fn filters_for_tags(tags: &BTreeMap<String, String>) -> ec2jobd_ec2::Filters {
    tags.iter()
        .map(|(k, v)| (format!("tag:{k}"), vec![v.clone()]))
        .collect()
}

/// Describe filters finding what this job (and step) created.
fn made_by_filters(ctx: &ExecCtx) -> ec2jobd_ec2::Filters {
    filters_for_tags(&made_by(ctx))
}

/// Runs EC2 jobs.
pub struct Ec2Executor {
    pool: Arc<Ec2Pool>,
    lot: Arc<Parking>,
    settings: Settings,
}

/// How the executor meets EC2's eventual consistency (`[ec2]` in config).
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// How long an id the job itself made (a launch's instances) may be unknown to EC2's other
    /// calls before that is a failure.
    pub consistency_timeout: Duration,
    /// How long an id the caller gave may be unknown before the job fails `NotFound` (an
    /// instance another job launched a moment ago).
    pub not_found_grace: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            consistency_timeout: Duration::from_secs(180),
            not_found_grace: Duration::from_secs(15),
        }
    }
}

impl Ec2Executor {
    /// An executor over the configured accounts, judging instance waits in `lot`.
    pub fn new(pool: Arc<Ec2Pool>, lot: Arc<Parking>) -> Self {
        Self {
            pool,
            lot,
            settings: Settings::default(),
        }
    }

    /// The same with these consistency settings.
    pub fn with_settings(mut self, settings: Settings) -> Self {
        self.settings = settings;
        self
    }
}

/// Ends `wait` with the attempt's time limit, if that comes first.
fn bound_by_attempt(ctx: &ExecCtx, wait: &mut Wait) {
    wait.attempt_deadline_ms = Some(ctx.deadline_ms);
    wait.attempt_limit_ms = Some(ctx.limit.as_millis() as u64);
}

/// What an instance action knows when its final wait begins and needs after it: the checkpoint
/// of a job parked for that wait, from which it is finished once the wait ends (or parked again,
/// when the process holding it died).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct AfterWait {
    /// The wait.
    wait: Wait,
    /// Every target.
    ids: Vec<String>,
    /// Their states before the call.
    before: HashMap<String, String>,
    /// Those the call was made for.
    todo: Vec<String>,
    /// Those whose termination protection the job turned off (checkpoints written before
    /// `outcomes` held it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    unprotected: Vec<String>,
    /// Request ids of the calls made before the wait.
    #[serde(default)]
    request_ids: Vec<String>,
    /// What the action did to an instance, where it says more than "called": termination
    /// protection turned off, a resize's account of the change.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    outcomes: BTreeMap<String, String>,
    /// A resized instance's type before the resize.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    previous_types: BTreeMap<String, String>,
}

/// The outcome of an instance whose termination protection a terminate job turned off.
const UNPROTECTED: &str = "called (termination protection turned off)";

/// The outcome of the wait a parked job resumes after (none: its lot died before the wait ended).
#[allow(clippy::result_large_err)] // once per resumed attempt
fn waited(ctx: &ExecCtx) -> Result<Option<WaitOutcome>, ExecError> {
    let Some(v) = &ctx.waited else {
        return Ok(None);
    };
    serde_json::from_value(v.clone()).map(Some).map_err(|e| {
        ExecError::permanent(
            "CorruptCheckpoint",
            format!("the outcome of the job's wait cannot be read: {e}"),
        )
    })
}

fn failed(e: Ec2Error, results: JobResults) -> ExecError {
    ExecError::Failed {
        transient: e.transient,
        error: e.into(),
        results,
    }
}

#[async_trait]
impl Executor for Ec2Executor {
    async fn execute(&self, ctx: &ExecCtx) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        let act = spec.action_spec().map_err(|e| {
            ExecError::permanent(
                "InvalidSpec",
                format!("the job's stored parameters no longer read: {e}"),
            )
        })?;
        if act == ActionSpec::Workflow {
            return self.workflow(ctx).await;
        }
        Checkpoint::check(ctx)?;
        // Account and region are filled in at submission; these fallbacks only guard old rows.
        let account = spec.account.as_deref().unwrap_or("default");
        let region = job_region(ctx);
        let ec2 = self
            .pool
            .get(account, region)
            .await
            .map_err(|e| failed(e, JobResults::default()))?;
        // A job parked for a wait resumes after it with the wait's outcome. Parked by a process
        // that died (or given back at shutdown), an instance wait is waited again; a backup or
        // copy runs again from the start, which finds what it made (and what rotation removed
        // meanwhile) before it waits again.
        match Checkpoint::of(ctx) {
            // The lot could not make the call the job left it: the job ends with that error (or
            // tries again, if it may pass), instead of handing the same call back.
            Some(Checkpoint::Calling { .. }) => {
                if let Some(o) = waited(ctx)? {
                    if o.cancelled {
                        return Err(ExecError::Cancelled(JobResults::default()));
                    }
                    if let Some(error) = o.error {
                        return Err(ExecError::Failed {
                            error,
                            transient: o.transient,
                            results: JobResults::default(),
                        });
                    }
                }
            }
            // Parked until the targets settled: the action goes on from the start (looking at
            // them again), unless the wait failed.
            Some(Checkpoint::Settling { .. }) => {
                if let Some(o) = waited(ctx)? {
                    ready_failure(&o, JobResults::default, false)?;
                }
            }
            Some(Checkpoint::Parked(after)) => {
                let results = JobResults {
                    request_ids: after.request_ids.clone(),
                    ..Default::default()
                };
                return match waited(ctx)? {
                    Some(o) => self.finish_wait(ctx, &ec2, *after, results, o).await,
                    None => self.wait_and_finish(ctx, &ec2, *after, results).await,
                };
            }
            Some(Checkpoint::ParkedReady(after)) => {
                let backup = match &act {
                    ActionSpec::CreateSnapshots(p) => Some(&p.backup),
                    ActionSpec::CreateImage(p) => Some(&p.backup),
                    _ => None,
                };
                if let Some(o) = waited(ctx)? {
                    return self.finish_ready(ctx, &ec2, backup, *after, o).await;
                }
            }
            _ => {}
        }
        let at = (account, region);
        let instances = |call, unprotect| self.instance_action(ctx, &ec2, at, call, unprotect);
        match &act {
            ActionSpec::DescribeInstances => describe(ctx, &ec2, account, region).await,
            ActionSpec::RunInstances(p) => self.run_instances(ctx, &ec2, p, at).await,
            ActionSpec::ModifyInstanceAttribute(p) => self.modify(ctx, &ec2, p, at).await,
            ActionSpec::AuditTags(p) => audit_tags(ctx, &ec2, p).await,
            ActionSpec::CreateSnapshots(p) => self.create_snapshots(ctx, &ec2, p, at).await,
            ActionSpec::DescribeSnapshots => self.snapshots_action(ctx, &ec2, false).await,
            ActionSpec::DeleteSnapshots => self.snapshots_action(ctx, &ec2, true).await,
            ActionSpec::CreateImage(p) => self.create_image(ctx, &ec2, p).await,
            ActionSpec::DeregisterImage(p) => self.deregister_image(ctx, &ec2, p).await,
            ActionSpec::CopySnapshot(p) => self.copy(ctx, &ec2, p, at, Ready::Snapshots).await,
            ActionSpec::CopyImage(p) => self.copy(ctx, &ec2, p, at, Ready::Images).await,
            ActionSpec::StartInstances => instances(SharedCall::Start, false).await,
            ActionSpec::StopInstances(p) => {
                let call = SharedCall::Stop {
                    force: p.force(),
                    hibernate: p.hibernate(),
                    fallback: p.fallback_to_stop(),
                };
                instances(call, false).await
            }
            ActionSpec::RebootInstances => instances(SharedCall::Reboot, false).await,
            ActionSpec::TerminateInstances(p) => instances(SharedCall::Terminate, p.force()).await,
            ActionSpec::CreateTags(p) => {
                instances(SharedCall::CreateTags(p.tags.clone()), false).await
            }
            ActionSpec::DeleteTags(p) => {
                let call = SharedCall::DeleteTags {
                    keys: p.keys.clone().unwrap_or_default(),
                    tags: p.tags.clone().unwrap_or_default(),
                };
                instances(call, false).await
            }
            ActionSpec::Workflow => self.workflow(ctx).await,
        }
    }
}

async fn describe(
    ctx: &ExecCtx,
    ec2: &Ec2,
    account: &str,
    region: &str,
) -> Result<JobResults, ExecError> {
    let spec = &ctx.job.spec;
    let mut results = JobResults::default();
    ctx.check_cancel(&results)?;
    ctx.progress(
        "calling",
        &format!("DescribeInstances in {account}/{region}"),
        None,
        None,
    )
    .await?;
    let d = tokio::select! {
        r = ec2.describe_instances(&spec.targets, spec.dry_run) => r,
        _ = ctx.cancelled() => return Err(ExecError::Cancelled(results)),
    }
    .map_err(|e| failed(e, JobResults::default()))?;
    results.request_ids = d.request_ids;
    if d.dry_run_ok {
        results.summary = Some("dry run: DescribeInstances would succeed".into());
        return Ok(results);
    }
    let n = d.instances.len() as u64;
    results.instances = d.instances;
    if n == 0 && !spec.allow_empty {
        return Err(no_targets(results));
    }
    let summary = format!("described {n} instance{}", plural(n));
    ctx.progress("done", &summary, Some(n), Some(n)).await?;
    results.summary = Some(summary);
    Ok(results)
}

/// Finds the target instances (one paginated DescribeInstances; shared with other jobs' through
/// `shared` when the targets are instance ids alone). An id EC2 answers `NotFound` for is looked
/// for again, with backoff, for up to `grace` (an instance launched a moment ago is not known
/// everywhere yet), then the job fails as EC2 said. `Ok(None)`: none matched and the job allows
/// that, so it is done with `results`' summary.
async fn resolve(
    ctx: &ExecCtx,
    ec2: &Ec2,
    shared: Option<Arc<Coalescer>>,
    grace: Duration,
    results: &mut JobResults,
) -> Result<Option<Vec<InstanceResult>>, ExecError> {
    ctx.check_cancel(results)?;
    let t = &ctx.job.spec.targets;
    let by_id = match (&t.instance_ids, &t.tags, &t.filters, shared) {
        (Some(ids), None, None, Some(c)) => Some((ids.0.clone(), c)),
        _ => None,
    };
    let mut unknown = ec2jobd_ec2::Unknown::new(grace);
    let found = loop {
        let describe = async {
            tokio::select! {
                r = async {
                    match &by_id {
                        Some((ids, c)) => c.call(SharedCall::Describe, ids.clone()).await.map(|a| Described {
                            instances: a.instances,
                            request_ids: a.request_ids,
                            dry_run_ok: false,
                        }),
                        None => ec2.describe_instances(t, false).await,
                    }
                } => Some(r),
                _ = ctx.cancelled() => None,
            }
        };
        let r = ctx
            .quietly(
                "resolving_targets",
                "finding the target instances",
                describe,
            )
            .await?
            .ok_or_else(|| ExecError::Cancelled(results.clone()))?;
        let pause = match &r {
            Err(e) => unknown.again(e),
            Ok(_) => None,
        };
        match (r, pause) {
            (Err(e), Some(pause)) => {
                let message = format!("waiting for EC2 to know the targets ({})", e.message);
                ctx.progress("resolving_targets", &message, None, None)
                    .await?;
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = ctx.cancelled() => return Err(ExecError::Cancelled(results.clone())),
                }
            }
            (r, _) => break r.map_err(|e| failed(e, JobResults::default()))?,
        }
    };
    results.request_ids.extend(found.request_ids);
    if found.instances.is_empty() {
        if ctx.job.spec.allow_empty {
            results.summary = Some("no instance matched the targets; nothing to do".into());
            return Ok(None);
        }
        return Err(no_targets(results.clone()));
    }
    Ok(Some(found.instances))
}

/// How many times an action looks at its targets while they settle before it acts anyway.
const SETTLE_LOOKS: usize = 5;

/// The request ids of `outs` into `results`.
fn noted(results: &mut JobResults, outs: Vec<CallOutcome>) {
    results
        .request_ids
        .extend(outs.into_iter().filter_map(|o| o.request_id));
}

/// A dry-run modify: the stops a resize needs and every requested change on every target
/// (needed or not), each with DryRun.
async fn modify_dry_run(
    ec2: &Ec2,
    m: &plan::Modify,
    (ids, before): (&[String], &HashMap<String, String>),
    want_type: Option<&str>,
    mut results: JobResults,
) -> Result<JobResults, ExecError> {
    let mut outs = Vec::new();
    let stop: Vec<String> = m
        .restart
        .iter()
        .filter(|id| matches!(before[*id].as_str(), "running" | "pending"))
        .cloned()
        .collect();
    if !stop.is_empty() {
        outs.extend(
            ec2.stop_instances(&stop, false, false, true)
                .await
                .map_err(|e| failed(e, results.clone()))?,
        );
    }
    for id in ids {
        let mut changes = m.protections.clone();
        if let Some(t) = want_type {
            changes.push(Attribute::InstanceType(t.to_string()));
        }
        for c in &changes {
            outs.push(
                ec2.modify_attribute(id, c, true)
                    .await
                    .map_err(|e| failed(e, results.clone()))?,
            );
        }
    }
    let ok = outs.iter().all(|o| o.dry_run_ok);
    results.summary = Some(format!(
        "dry run: {} call(s) {} ({} to resize, {} to stop and start again)",
        outs.len(),
        dry_run_verdict(ok),
        m.resize.len(),
        stop.len()
    ));
    noted(&mut results, outs);
    Ok(results)
}

/// What a modify did to `id`, in words ("type t3.micro -> t3.small; stopped and started again",
/// "already t3.small", protections), and whether it was resized (then `previous` is its old type).
fn modify_outcome(
    id: &String,
    m: &plan::Modify,
    previous: Option<&str>,
    want_type: Option<&str>,
) -> (bool, String) {
    let mut did = Vec::new();
    // `restart` holds those an earlier attempt resized (they already have the new type).
    let resized = m.resize.contains(id) || m.restart.contains(id);
    if resized {
        did.push(format!(
            "type {} -> {}",
            previous.unwrap_or("?"),
            want_type.unwrap_or("?")
        ));
        if m.restart.contains(id) {
            did.push("stopped and started again".into());
        }
    } else if let Some(t) = want_type {
        did.push(format!("already {t}"));
    }
    for c in &m.protections {
        if let Attribute::Protection(p, on) = c {
            let which = match p {
                Protection::Termination => "termination",
                Protection::Stop => "stop",
            };
            did.push(format!(
                "{which} protection {}",
                if *on { "on" } else { "off" }
            ));
        }
    }
    (resized, did.join("; "))
}

/// The job's end when a wait (for readiness, or for targets to settle) was cancelled or failed,
/// with `results` (built only then); `rotation`: the message says rotation did not run.
#[allow(clippy::result_large_err)] // once per backup or copy job, like the action's own result
pub(super) fn ready_failure(
    outcome: &WaitOutcome,
    results: impl FnOnce() -> JobResults,
    rotation: bool,
) -> Result<(), ExecError> {
    if outcome.cancelled {
        return Err(ExecError::Cancelled(results()));
    }
    if let Some(e) = &outcome.error {
        let mut error = e.clone();
        if rotation {
            error.message.push_str("; rotation did not run");
        }
        return Err(ExecError::Failed {
            error,
            transient: outcome.transient,
            results: results(),
        });
    }
    Ok(())
}

/// The refusal when some target is in a state the action cannot act from.
fn refuse_states(
    action: Action,
    found: &[InstanceResult],
    results: &JobResults,
) -> Option<ExecError> {
    let bad = plan::refused(action, found);
    if bad.is_empty() {
        return None;
    }
    Some(ExecError::Failed {
        error: JobError {
            code: "IncorrectInstanceState".into(),
            message: format!(
                "{action} cannot act on {}; nothing was changed",
                bad.join(", ")
            ),
            request_id: None,
        },
        transient: false,
        results: JobResults {
            instances: found.to_vec(),
            ..results.clone()
        },
    })
}

/// How a dry run's answer reads: EC2 answered `DryRunOperation` (would succeed), or it did not.
fn dry_run_verdict(ok: bool) -> &'static str {
    if ok {
        "would succeed"
    } else {
        "answered without DryRunOperation"
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn no_targets(results: JobResults) -> ExecError {
    ExecError::Failed {
        error: JobError {
            code: "NoTargets".into(),
            message: "no instance matches the targets (set allow_empty to accept that)".into(),
            request_id: None,
        },
        transient: false,
        results,
    }
}

/// `audit_tags`: lists the live instances in scope that lack any required tag key. Terminated
/// instances are left out: they cannot be fixed and drop out of EC2 within the hour.
async fn audit_tags(ctx: &ExecCtx, ec2: &Ec2, p: &AuditParams) -> Result<JobResults, ExecError> {
    let spec = &ctx.job.spec;
    if spec.dry_run {
        return describe(ctx, ec2, "", "").await;
    }
    let mut results = JobResults::default();
    let Some(found) = resolve(ctx, ec2, None, Duration::ZERO, &mut results).await? else {
        return Ok(results);
    };
    let required = &p.required_keys;
    let mut offenders = Vec::new();
    for mut i in found {
        if matches!(i.state.as_str(), "terminated" | "shutting-down") {
            continue;
        }
        i.missing_tags = required
            .iter()
            .filter(|k| !i.tags.contains_key(*k))
            .cloned()
            .collect();
        i.outcome = Some(if i.missing_tags.is_empty() {
            "has every required tag".into()
        } else {
            offenders.push(format!("{} ({})", i.instance_id, i.missing_tags.join(", ")));
            format!("missing {}", i.missing_tags.join(", "))
        });
        results.instances.push(i);
    }
    let n = results.instances.len() as u64;
    let summary = format!(
        "audited {n} instance{}: {} missing required tags ({})",
        plural(n),
        offenders.len(),
        required.join(", ")
    );
    ctx.progress("done", &summary, Some(n), Some(n)).await?;
    results.summary = Some(summary);
    if !offenders.is_empty() && p.on_missing() == OnMissing::Fail {
        return Err(ExecError::Failed {
            error: JobError {
                code: "MissingTags".into(),
                message: format!(
                    "{} of {n} instance{} lack required tags: {}",
                    offenders.len(),
                    plural(n),
                    offenders.join("; ")
                ),
                request_id: None,
            },
            transient: false,
            results,
        });
    }
    Ok(results)
}

impl Ec2Executor {
    /// Makes `call` for `ids`: shared with other jobs' same call through the account's
    /// coalescer, except dry runs, which stay the job's own.
    async fn call(
        &self,
        ec2: &Ec2,
        ctx: &ExecCtx,
        (account, region): (&str, &str),
        call: &SharedCall,
        ids: &[String],
    ) -> Result<Vec<CallOutcome>, Ec2Error> {
        let dry = ctx.job.spec.dry_run;
        if !dry {
            let answer = self
                .pool
                .coalescer(account, region)
                .await?
                .call(call.clone(), ids.to_vec())
                .await?;
            return Ok(answer
                .request_ids
                .into_iter()
                .map(|r| CallOutcome {
                    request_id: Some(r),
                    dry_run_ok: false,
                })
                .collect());
        }
        ec2.instance_call(call, ids, true).await
    }

    /// Launches instances, never twice for one job: the call carries a ClientToken derived from
    /// the job id (AWS returns the same instances for a repeated token) and tags every instance with
    /// the job id at creation; an attempt that resumes after a crash first looks for instances with
    /// that tag and launches only if there are none (moto, unlike AWS, ignores ClientToken).
    async fn run_instances(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        p: &RunParams,
        (account, region): (&str, &str),
    ) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        let job_id = &ctx.job.id;
        let mut results = JobResults::default();
        let resumed = ctx.resumed();
        let mut launched: Vec<InstanceResult> = Vec::new();
        if resumed && !spec.dry_run {
            ctx.progress(
                "resolving_targets",
                "looking for instances an earlier attempt launched",
                None,
                None,
            )
            .await?;
            let mine = ec2jobd_spec::Targets {
                tags: Some(ec2jobd_spec::TagSet(made_by(ctx))),
                ..Default::default()
            };
            let found = ec2
                .describe_instances(&mine, false)
                .await
                .map_err(|e| failed(e, results.clone()))?;
            results.request_ids.extend(found.request_ids);
            launched = found
                .instances
                .into_iter()
                .filter(|i| i.state != "terminated" && i.state != "shutting-down")
                .collect();
        }
        let since = self.lot.now_ms();
        let fresh = launched.is_empty();
        if fresh {
            ctx.check_cancel(&results)?;
            let (min, max) = p.counts();
            let mut tags = p.tags.clone().unwrap_or_default();
            tags.extend(made_by(ctx));
            let launch = Launch {
                image_id: p.image_id.clone(),
                instance_type: p.instance_type.clone(),
                min_count: min,
                max_count: max,
                key_name: p.key_name.clone(),
                subnet_id: p.subnet_id.clone(),
                security_group_ids: p.security_group_ids.clone().unwrap_or_default(),
                availability_zone: p.availability_zone.clone(),
                user_data: p.user_data.clone(),
                iam_instance_profile: p.iam_instance_profile.clone(),
                tags,
                termination_protection: p.termination_protection.unwrap_or(false),
                client_token: match &ctx.step {
                    Some((i, _)) => format!("ec2jobd-{job_id}-step{i}"),
                    None => format!("ec2jobd-{job_id}-run"),
                },
            };
            Checkpoint::Calling { ids: Vec::new() }.save(ctx).await?;
            let (insts, out) = self
                .launch_where_there_is_room(ctx, ec2, launch, p, (account, region), &results)
                .await?;
            results.request_ids.extend(out.request_id);
            if spec.dry_run {
                results.summary = Some(format!(
                    "dry run: RunInstances {}",
                    dry_run_verdict(out.dry_run_ok)
                ));
                return Ok(results);
            }
            launched = insts;
        } else if spec.dry_run {
            results.summary = Some("dry run: the instances already exist".into());
            return Ok(results);
        }
        let ids: Vec<String> = launched.iter().map(|i| i.instance_id.clone()).collect();
        let called = Checkpoint::Called {
            ids: ids.clone(),
            restart: Vec::new(),
        };
        called.save(ctx).await?;
        let todo = if fresh { ids.clone() } else { Vec::new() };
        let before: HashMap<String, String> = if fresh {
            HashMap::new()
        } else {
            ids.iter()
                .map(|id| (id.clone(), "launched by an earlier attempt".to_string()))
                .collect()
        };
        let mut after = self.after_wait(
            ctx,
            (account, region),
            (&ids, &ids),
            &before,
            &todo,
            since,
            &results,
        );
        // The instances are the job's own: EC2 may not know them everywhere for a while.
        after.wait.unknown_grace_ms = self.settings.consistency_timeout.as_millis() as u64;
        if after.wait.until == WaitUntil::None {
            // What RunInstances answered stands for a describe EC2 may not answer yet.
            let seen = WaitOutcome {
                described: Some(launched),
                ..Default::default()
            };
            return self.finish_wait(ctx, ec2, after, results, seen).await;
        }
        self.wait_and_finish(ctx, ec2, after, results).await
    }

    /// RunInstances at the first of the job's placements ([`RunParams::placements`]) where EC2
    /// has capacity; a capacity refusal at the last one is the job's error (the runner tries
    /// again later, within the job's time limit), naming every placement refused.
    async fn launch_where_there_is_room(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        launch: Launch,
        p: &RunParams,
        (account, region): (&str, &str),
        results: &JobResults,
    ) -> Result<(Vec<InstanceResult>, CallOutcome), ExecError> {
        let dry_run = ctx.job.spec.dry_run;
        let (min, max) = (launch.min_count, launch.max_count);
        let mut refused: Vec<String> = Vec::new();
        let mut last = None;
        for (k, (instance_type, subnet_id)) in p.placements().into_iter().enumerate() {
            let place = match &subnet_id {
                Some(s) => format!("{instance_type} in {s}"),
                None => instance_type.clone(),
            };
            let after = match refused.is_empty() {
                true => String::new(),
                false => format!(" (no capacity for {})", refused.join(", ")),
            };
            let message =
                format!("RunInstances ({min}-{max} x {place}) in {account}/{region}{after}");
            ctx.progress("calling", &message, None, None).await?;
            let attempt = Launch {
                instance_type,
                subnet_id,
                // One token per placement: EC2 refuses a token reused with other parameters.
                client_token: match k {
                    0 => launch.client_token.clone(),
                    k => format!("{}-{k}", launch.client_token),
                },
                ..launch.clone()
            };
            match ec2.run_instances(&attempt, dry_run).await {
                Err(e) if CAPACITY_CODES.contains(&e.code.as_str()) => {
                    refused.push(place);
                    last = Some(e);
                }
                r => return r.map_err(|e| failed(e, results.clone())),
            }
        }
        let mut e = last.unwrap_or_else(|| Ec2Error {
            code: CAPACITY_CODES[0].into(),
            message: String::new(),
            request_id: None,
            transient: true,
        });
        if refused.len() > 1 {
            e.message = format!(
                "{}; no capacity at any placement: {}",
                e.message,
                refused.join(", ")
            );
        }
        Err(failed(e, results.clone()))
    }

    /// Start, stop, reboot, terminate and tag jobs: `call` for the targets that need it;
    /// `unprotect`: turn termination protection off first (`terminate_instances`, `params.force`).
    async fn instance_action(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        (account, region): (&str, &str),
        call: SharedCall,
        unprotect: bool,
    ) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        let action = spec.action;
        let mut results = JobResults::default();
        let shared = self.pool.coalescer(account, region).await.ok();
        let Some(found) = self
            .settled_targets(ctx, ec2, (account, region), shared, &mut results)
            .await?
        else {
            return Ok(results);
        };
        let targets = plan::Targets::of(&found);
        let todo = plan::to_call(action, &targets, Checkpoint::of(ctx).as_ref(), spec.dry_run);
        let plan::Targets { ids, before } = targets;
        let op = action.as_str();
        let unprotected = if action == Action::TerminateInstances {
            self.clear_termination_protection(ctx, ec2, &todo, unprotect, &results)
                .await?
        } else {
            Vec::new()
        };
        if let (Some(rate), false) = (&spec.rate, spec.dry_run) {
            return self
                .in_waves(
                    ctx,
                    ec2,
                    (account, region),
                    &ids,
                    &before,
                    (&call, &todo),
                    rate,
                    results,
                )
                .await;
        }
        let mut after = self.after_wait(
            ctx,
            (account, region),
            (&ids, &ids),
            &before,
            &todo,
            self.lot.now_ms(),
            &results,
        );
        after.outcomes.extend(
            unprotected
                .into_iter()
                .map(|id| (id, UNPROTECTED.to_string())),
        );
        if !todo.is_empty() {
            ctx.check_cancel(&results)?;
            let calling = Checkpoint::Calling { ids: todo.clone() };
            if !spec.dry_run && ctx.may_park() {
                // The lot makes the call with other jobs' same call, then watches the instances.
                // Parking saves `calling` and the progress naming the call in one write.
                bound_by_attempt(ctx, &mut after.wait);
                let wait = after.wait.clone();
                let call = PlannedCall {
                    call,
                    ids: todo,
                    then: Checkpoint::Parked(Box::new(after)).to_value(),
                };
                return Err(ctx.park(wait, calling.to_value(), Some(call)));
            }
            calling.save(ctx).await?;
            ctx.progress(
                "calling",
                &format!("{op} on {} instance(s) in {account}/{region}", todo.len()),
                Some(0),
                Some(todo.len() as u64),
            )
            .await?;
            // A mutating call is never abandoned half-way: cancel is honoured after it returns.
            let outs = self
                .call(ec2, ctx, (account, region), &call, &todo)
                .await
                .map_err(|e| failed(e, results.clone()))?;
            results
                .request_ids
                .extend(outs.iter().filter_map(|o| o.request_id.clone()));
            if spec.dry_run {
                let ok = outs.iter().all(|o| o.dry_run_ok);
                results.summary = Some(format!(
                    "dry run: {op} {} for {} instance(s)",
                    dry_run_verdict(ok),
                    todo.len()
                ));
                return Ok(results);
            }
            let called = Checkpoint::Called {
                ids: todo,
                restart: Vec::new(),
            };
            called.save(ctx).await?;
            after.request_ids.clone_from(&results.request_ids);
        }
        self.wait_and_finish(ctx, ec2, after, results).await
    }

    /// The targets (see [`resolve`]), refused when one is in a state the action can never act
    /// from, and waited for while one is on its way to a state it can ([`plan::unsettled`]):
    /// then looked at again. `Ok(None)`: none matched and the job allows that.
    async fn settled_targets(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        at: (&str, &str),
        shared: Option<Arc<Coalescer>>,
        results: &mut JobResults,
    ) -> Result<Option<Vec<InstanceResult>>, ExecError> {
        let action = ctx.job.spec.action;
        let grace = self.settings.not_found_grace;
        // A state can flap (stopping, then pending again under someone else's start): a few
        // looks, then the action goes on and EC2 says what it thinks.
        for _ in 0..SETTLE_LOOKS {
            let Some(found) = resolve(ctx, ec2, shared.clone(), grace, results).await? else {
                return Ok(None);
            };
            if let Some(e) = refuse_states(action, &found, results) {
                return Err(e);
            }
            match plan::unsettled(action, &found) {
                Some((ids, until)) if !ctx.job.spec.dry_run => {
                    self.settle(ctx, at, ids, until, results).await?
                }
                _ => return Ok(Some(found)),
            }
        }
        resolve(ctx, ec2, shared, grace, results).await
    }

    /// Waits for `ids` to reach `until` before the action acts on them: parked when the job may
    /// park (`Err(Park)`: the job resumes from the start with the outcome,
    /// [`Checkpoint::Settling`]), else in place.
    async fn settle(
        &self,
        ctx: &ExecCtx,
        at: (&str, &str),
        ids: Vec<String>,
        until: WaitUntil,
        results: &JobResults,
    ) -> Result<(), ExecError> {
        let mut wait = self.new_wait(
            ctx,
            at,
            (Watched::Instances, ids.clone()),
            self.lot.now_ms(),
        );
        wait.until = until;
        bound_by_attempt(ctx, &mut wait);
        let parked = ctx.may_park().then_some(Checkpoint::Settling { ids });
        let outcome = self.wait_for(ctx, wait, parked, results).await?;
        ready_failure(&outcome, || results.clone(), false)
    }

    /// `modify_instance_attribute`. A type change needs a stopped instance, so a running one is
    /// stopped, changed and started again (then waited for `wait.until`, `status_ok` by default);
    /// one found stopped stays stopped. The list of instances to restart is checkpointed before the
    /// stop, so an attempt resumed after a crash starts them again even though they no longer look
    /// running. Once the first stop is made, cancel waits until they are started again.
    /// Protections are set after the resize (stop protection would block the stop).
    async fn modify(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        p: &ModifyParams,
        (account, region): (&str, &str),
    ) -> Result<JobResults, ExecError> {
        let mut results = JobResults::default();
        let Some(found) = self
            .settled_targets(ctx, ec2, (account, region), None, &mut results)
            .await?
        else {
            return Ok(results);
        };
        let targets = plan::Targets::of(&found);
        let m = plan::modify(p, &found, &targets, Checkpoint::of(ctx).as_ref());
        let plan::Targets { ids, before } = targets;
        let want_type = p.instance_type.as_deref();
        if ctx.job.spec.dry_run {
            return modify_dry_run(ec2, &m, (&ids, &before), want_type, results).await;
        }
        ctx.check_cancel(&results)?;
        let since = self.lot.now_ms();
        if !m.resize.is_empty() || !m.restart.is_empty() {
            self.resize(
                ctx,
                ec2,
                (account, region),
                &m,
                &before,
                want_type,
                &mut results,
            )
            .await?;
        }
        for id in &ids {
            for c in &m.protections {
                let out = ec2
                    .modify_attribute(id, c, false)
                    .await
                    .map_err(|e| failed(e, results.clone()))?;
                noted(&mut results, vec![out]);
            }
        }
        let called = Checkpoint::Called {
            ids: Vec::new(),
            restart: m.restart.clone(),
        };
        called.save(ctx).await?;
        let todo: Vec<String> = ids
            .iter()
            .filter(|id| {
                m.resize.contains(*id) || m.restart.contains(*id) || !m.protections.is_empty()
            })
            .cloned()
            .collect();
        let mut after = self.after_wait(
            ctx,
            (account, region),
            (&ids, &m.restart),
            &before,
            &todo,
            since,
            &results,
        );
        // The per-instance account of the change goes into the checkpoint, so the final wait
        // parks like any other.
        let old_type: HashMap<&str, &str> = found
            .iter()
            .filter_map(|i| Some((i.instance_id.as_str(), i.instance_type.as_deref()?)))
            .collect();
        for id in &ids {
            let previous = old_type.get(id.as_str()).copied();
            let (resized, outcome) = modify_outcome(id, &m, previous, want_type);
            if let (true, Some(t)) = (resized, previous) {
                after.previous_types.insert(id.clone(), t.to_string());
            }
            after.outcomes.insert(id.clone(), outcome);
        }
        self.wait_and_finish(ctx, ec2, after, results).await
    }

    /// A resize's calls: stop the running ones to resize (checkpointed first, so a resumed
    /// attempt starts them again), wait for `stopped`, change the type, start again those to
    /// restart. `before` is this attempt's own look, so a resumed attempt acts on what is true now.
    #[allow(clippy::too_many_arguments)] // one call site, each a different part of the plan
    async fn resize(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        place: (&str, &str),
        m: &plan::Modify,
        before: &HashMap<String, String>,
        want_type: Option<&str>,
        results: &mut JobResults,
    ) -> Result<(), ExecError> {
        let plan::Modify {
            resize, restart, ..
        } = m;
        let resizing = Checkpoint::Resizing {
            restart: restart.clone(),
        };
        resizing.save(ctx).await?;
        let state = |id: &String| before.get(id).map(String::as_str);
        let stop: Vec<String> = restart
            .iter()
            .filter(|id| resize.contains(*id) && matches!(state(id), Some("running" | "pending")))
            .cloned()
            .collect();
        if !stop.is_empty() {
            let message = format!(
                "StopInstances on {} running instance(s) to change their type",
                stop.len()
            );
            ctx.progress("calling", &message, None, None).await?;
            let outs = ec2
                .stop_instances(&stop, false, false, false)
                .await
                .map_err(|e| failed(e, results.clone()))?;
            noted(results, outs);
        }
        let must_stop: Vec<String> = resize
            .iter()
            .filter(|id| state(id) != Some("stopped"))
            .cloned()
            .collect();
        self.wait_quietly(ctx, place, &must_stop, WaitUntil::Stopped, results)
            .await?;
        if let Some(t) = want_type {
            let message = format!("changing the type of {} instance(s) to {t}", resize.len());
            ctx.progress("calling", &message, None, None).await?;
            for id in resize {
                let out = ec2
                    .modify_attribute(id, &Attribute::InstanceType(t.to_string()), false)
                    .await
                    .map_err(|e| failed(e, results.clone()))?;
                noted(results, vec![out]);
            }
        }
        let start: Vec<String> = restart
            .iter()
            .filter(|id| {
                !plan::settled(Action::StartInstances, state(id).unwrap_or(""))
                    || stop.contains(*id)
            })
            .cloned()
            .collect();
        if !start.is_empty() {
            let message = format!("StartInstances on {} resized instance(s)", start.len());
            ctx.progress("calling", &message, None, None).await?;
            let outs = ec2
                .start_instances(&start, false)
                .await
                .map_err(|e| failed(e, results.clone()))?;
            noted(results, outs);
        }
        Ok(())
    }

    /// Waits through the shared watcher until every instance in `ids` meets `until`, with one
    /// progress line; the job's wait timeout and interval apply. For intermediate waits (stopped
    /// before a resize or a snapshot); the final wait of a job is [`Self::wait_and_finish`].
    async fn wait_quietly(
        &self,
        ctx: &ExecCtx,
        (account, region): (&str, &str),
        ids: &[String],
        until: WaitUntil,
        results: &JobResults,
    ) -> Result<(), ExecError> {
        if ids.is_empty() || until == WaitUntil::None {
            return Ok(());
        }
        let (_, timeout, interval) = ctx.job.spec.wait_settings();
        ctx.progress(
            "waiting",
            &format!(
                "waiting for {} instance(s) to be {}",
                ids.len(),
                until.as_str()
            ),
            None,
            None,
        )
        .await?;
        let watcher = self
            .pool
            .watcher(account, region)
            .await
            .map_err(|e| failed(e, results.clone()))?;
        match watcher.wait(ids, until, timeout, interval, |_, _| {}).await {
            Ok(_) => Ok(()),
            Err(f) => Err(ExecError::Failed {
                error: wait_error(f, ids, until, timeout).0,
                transient: false,
                results: results.clone(),
            }),
        }
    }

    /// Terminating a protected instance needs `params.force`: without it the job fails before
    /// terminating anything, naming the protected instances; with it, protection is turned off first
    /// (and the job records where). Returns the instances whose protection was turned off.
    async fn clear_termination_protection(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        ids: &[String],
        force: bool,
        results: &JobResults,
    ) -> Result<Vec<String>, ExecError> {
        let spec = &ctx.job.spec;
        let mut protected = Vec::new();
        for id in ids {
            if ec2
                .protection(id, Protection::Termination)
                .await
                .map_err(|e| failed(e, results.clone()))?
            {
                protected.push(id.clone());
            }
        }
        if protected.is_empty() || spec.dry_run {
            return Ok(Vec::new());
        }
        if !force {
            return Err(ExecError::Failed {
                error: JobError {
                    code: "TerminationProtected".into(),
                    message: format!(
                        "termination protection is on for {}; nothing was terminated (set params.force to turn it off and terminate)",
                        protected.join(", ")
                    ),
                    request_id: None,
                },
                transient: false,
                results: results.clone(),
            });
        }
        for id in &protected {
            ec2.modify_attribute(
                id,
                &Attribute::Protection(Protection::Termination, false),
                false,
            )
            .await
            .map_err(|e| failed(e, results.clone()))?;
        }
        ctx.progress(
            "calling",
            &format!(
                "turned off termination protection on {}",
                protected.join(", ")
            ),
            None,
            None,
        )
        .await?;
        Ok(protected)
    }

    /// A wait for `ids` (of `kind`) in `account`/`region` with the job's wait settings, ending
    /// its timeout from now; `since_ms`: when the call it follows was made.
    fn new_wait(
        &self,
        ctx: &ExecCtx,
        (account, region): (&str, &str),
        (kind, ids): (Watched, Vec<String>),
        since_ms: i64,
    ) -> Wait {
        let (until, timeout, interval) = ctx.job.spec.wait_settings();
        Wait {
            account: account.into(),
            region: region.into(),
            kind,
            ids,
            labels: BTreeMap::new(),
            until,
            since_ms,
            deadline_ms: self.lot.now_ms() + timeout.as_millis() as i64,
            timeout_ms: timeout.as_millis() as u64,
            interval_ms: interval.as_millis() as u64,
            attempt_deadline_ms: None,
            attempt_limit_ms: None,
            unknown_grace_ms: self.settings.not_found_grace.as_millis() as u64,
        }
    }

    /// What an instance action knows when its final wait begins: `ids` are every target,
    /// `wait_ids` those to wait for, `since_ms` when the call was made.
    #[allow(clippy::too_many_arguments)]
    fn after_wait(
        &self,
        ctx: &ExecCtx,
        (account, region): (&str, &str),
        (ids, wait_ids): (&[String], &[String]),
        before: &HashMap<String, String>,
        todo: &[String],
        since_ms: i64,
        results: &JobResults,
    ) -> AfterWait {
        AfterWait {
            wait: self.new_wait(
                ctx,
                (account, region),
                (Watched::Instances, wait_ids.to_vec()),
                since_ms,
            ),
            ids: ids.to_vec(),
            before: before.clone(),
            todo: todo.to_vec(),
            unprotected: Vec::new(),
            outcomes: BTreeMap::new(),
            previous_types: BTreeMap::new(),
            request_ids: results.request_ids.clone(),
        }
    }

    /// Waits for the instances — parked without a worker when the job may park, in place
    /// otherwise — then finishes the job with [`Self::finish_wait`].
    async fn wait_and_finish(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        mut after: AfterWait,
        results: JobResults,
    ) -> Result<JobResults, ExecError> {
        if after.wait.until == WaitUntil::None || after.wait.ids.is_empty() {
            return self
                .finish_wait(ctx, ec2, after, results, WaitOutcome::default())
                .await;
        }
        ctx.check_cancel(&results)?;
        bound_by_attempt(ctx, &mut after.wait);
        let parked = ctx
            .may_park()
            .then(|| Checkpoint::Parked(Box::new(after.clone())));
        let outcome = self
            .wait_for(ctx, after.wait.clone(), parked, &results)
            .await?;
        self.finish_wait(ctx, ec2, after, results, outcome).await
    }

    /// Parks the job for `wait` when given the checkpoint to park with (the job may park: see
    /// [`ExecCtx::may_park`]): `Err(Park)`, its worker is free. Otherwise the worker waits here
    /// for the lot's judgement, passing a cancel on. The wait is bounded by the attempt's limit.
    async fn wait_for(
        &self,
        ctx: &ExecCtx,
        wait: Wait,
        parked: Option<Checkpoint>,
        results: &JobResults,
    ) -> Result<WaitOutcome, ExecError> {
        if let Some(state) = parked {
            // Parking records the waiting progress with the checkpoint.
            return Err(ctx.park(wait, state.to_value(), None));
        }
        let total = wait.ids.len() as u64;
        let message = format!("waiting for {}", wait.describe());
        ctx.progress("waiting", &message, Some(0), Some(total))
            .await?;
        let rx = self
            .lot
            .wait_here(&ctx.job.id, ctx.worker(), ctx.label(), wait)
            .await
            .map_err(|e| failed(e, results.clone()))?;
        tokio::pin!(rx);
        let outcome = tokio::select! {
            o = &mut rx => o,
            _ = ctx.cancelled() => {
                // The lot answers a cancel with what the wait saw so far.
                self.lot.cancel(&ctx.job.id);
                rx.await
            }
        }
        .unwrap_or_else(|_| WaitOutcome {
            cancelled: true,
            ..Default::default()
        });
        Ok(outcome)
    }

    /// After the wait: describes the instances for the results and writes the summary, or fails
    /// (or ends cancelled) with what the wait saw.
    async fn finish_wait(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        after: AfterWait,
        mut results: JobResults,
        outcome: WaitOutcome,
    ) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        let op = spec.action.as_str();
        let AfterWait {
            wait,
            ids,
            before,
            todo,
            unprotected,
            mut outcomes,
            previous_types,
            ..
        } = after;
        outcomes.extend(
            unprotected
                .into_iter()
                .map(|id| (id, UNPROTECTED.to_string())),
        );
        let until = wait.until;
        results
            .request_ids
            .extend(outcome.request_ids.iter().cloned());
        results.instances = self
            .final_results(ec2, &ids, &before, &outcome, &todo)
            .await;
        for r in &mut results.instances {
            if let Some(o) = outcomes.remove(&r.instance_id) {
                r.outcome = Some(o);
            }
            if let Some(t) = previous_types.get(&r.instance_id) {
                r.previous_instance_type = Some(t.clone());
            }
        }
        if outcome.cancelled {
            return Err(ExecError::Cancelled(results));
        }
        if let Some(mut error) = outcome.error {
            if error.code == "InstanceStopped" {
                let reason = results
                    .instances
                    .iter()
                    .find(|i| error.message.starts_with(&format!("{}:", i.instance_id)))
                    .and_then(|i| i.state_reason.as_deref());
                error.message.push_str(&format!(
                    " (StateReason: {})",
                    reason.unwrap_or("none reported")
                ));
            }
            return Err(ExecError::Failed {
                error,
                transient: outcome.transient,
                results,
            });
        }
        let n = ids.len() as u64;
        let acted = todo.len();
        let mut summary = format!("{op}: {acted} of {n} instance{} needed the call", plural(n));
        if until != WaitUntil::None && !wait.ids.is_empty() {
            let all = if wait.ids.len() == ids.len() {
                "all"
            } else {
                "the restarted ones"
            };
            summary.push_str(&format!("; {all} reached {}", until.as_str()));
            if until == WaitUntil::StatusOk {
                let checks: Vec<String> = results
                    .instances
                    .iter()
                    .filter_map(|i| i.checks.clone())
                    .collect();
                if let Some(c) = checks.first() {
                    if checks.iter().all(|x| x == c) {
                        summary.push_str(&format!(" ({c})"));
                    }
                }
            }
        }
        ctx.progress("done", &summary, Some(n), Some(n)).await?;
        results.summary = Some(summary);
        Ok(results)
    }

    /// Describes the instances once more for their addresses and names, and merges in what the wait
    /// saw. A failing describe is not the job's failure: the call and wait already succeeded.
    async fn final_results(
        &self,
        ec2: &Ec2,
        ids: &[String],
        before: &HashMap<String, String>,
        seen: &WaitOutcome,
        todo: &[String],
    ) -> Vec<InstanceResult> {
        let targets = ec2jobd_spec::Targets {
            instance_ids: Some(ec2jobd_spec::IdList(ids.to_vec())),
            ..Default::default()
        };
        // The parking lot describes the instances as their wait ends (one call for every wait that
        // ended together); describe here only what it did not.
        let mut described: HashMap<String, InstanceResult> = seen
            .described
            .iter()
            .flatten()
            .map(|i| (i.instance_id.clone(), i.clone()))
            .collect();
        if !ids.iter().all(|id| described.contains_key(id)) {
            match ec2.describe_instances(&targets, false).await {
                Ok(d) => {
                    described.extend(d.instances.into_iter().map(|i| (i.instance_id.clone(), i)))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "final describe failed; results carry what the wait saw")
                }
            }
        }
        ids.iter()
            .map(|id| {
                let mut r = described
                    .get(id)
                    .cloned()
                    .unwrap_or_else(|| InstanceResult {
                        instance_id: id.clone(),
                        state: "unknown".into(),
                        ..Default::default()
                    });
                if let Some(st) = seen.last.get(id) {
                    if !st.state.is_empty() {
                        r.state = st.state.clone();
                    }
                    r.system_status = st.system.clone();
                    r.instance_status = st.instance.clone();
                    r.ebs_status = st.ebs.clone();
                    r.checks = st.checks();
                }
                r.previous_state = before.get(id).cloned();
                r.seconds_to_running = seen.to_running.get(id).copied();
                r.seconds_to_status_ok = seen.to_ok.get(id).copied();
                r.outcome = Some(if todo.contains(id) {
                    "called".to_string()
                } else {
                    format!(
                        "already {}",
                        before.get(id).map(String::as_str).unwrap_or("done")
                    )
                });
                r
            })
            .collect()
    }
}

//! Jobs: the one way into the queue for every door. A submission is resolved against config
//! (account, region, allowlists), authorized by the policy (role and scopes against the jobs it
//! will run), its idempotency key checked against the namespaces the daemon keeps for itself,
//! and admitted (`queue.max_queued`, with the reserve for priority work) before anything is
//! stored: the result is an [`Admitted`] job, the only thing [`Admitted::queue`] stores. Reads
//! answer jobs as every caller may see them (secrets redacted). Must not: know HTTP or HTML, or
//! how long a door holds its answer.

use std::time::Duration;

use ec2jobd_spec::{Job, JobEvent, JobSpec, JobState};
use ec2jobd_store::{CancelOutcome, Enqueued, HourCount, ListQuery, NewJob, Page};
use tokio::sync::broadcast::error::RecvError;

use super::caller::Caller;
use super::error::{Kind, Result, ServiceError};
use super::policy::{self, authorize, On, Op, Runs};
use crate::state::{AppState, StreamSlot};

/// Idempotency-key prefixes the daemon uses for what it queues itself (schedule firings and
/// windows, SNS and SQS deliveries); a caller's key may not start with one, so nobody can take
/// a firing's or an alarm's key before it comes.
pub const RESERVED_KEYS: &[&str] = &["schedule:", "window:", "sns:", "sqs:"];

/// The idempotency key of a submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// None: every submission is a new job.
    None,
    /// Chosen by the caller (`Idempotency-Key`): never in a [`RESERVED_KEYS`] namespace.
    Caller(String),
    /// Made by an unattended door for what it queues (a firing's, a delivery's).
    Door(String),
}

impl Key {
    fn check(self, caller: &Caller) -> Result<Option<String>> {
        match self {
            Key::None => Ok(None),
            Key::Caller(k) => match RESERVED_KEYS.iter().find(|p| k.starts_with(*p)) {
                Some(p) => Err(ServiceError::unprocessable(
                    "reserved_key",
                    "Idempotency-Key",
                    format!("keys starting with `{p}` are the daemon's own (schedules, windows, SNS and SQS deliveries); choose another"),
                )),
                None => Ok(Some(k)),
            },
            Key::Door(k) if caller.door.unattended() => Ok(Some(k)),
            Key::Door(_) => Err(ServiceError::internal(format!(
                "a door key from the {} door",
                caller.door.as_str()
            ))),
        }
    }
}

/// Validates a spec and fills in what config decides (account, region), for a workflow's steps
/// too, each checked against its account's allowlists ([`super::catalog::check`]).
pub fn resolve(st: &AppState, spec: JobSpec) -> Result<JobSpec> {
    let mut spec = spec.normalize()?;
    if let Some(n) = &spec.notify {
        check_topic(st, &n.topic_arn, "notify.topic_arn")?;
    }
    fill_account(st, &mut spec, "")?;
    if let Some(steps) = spec.steps.as_mut() {
        for (i, step) in steps.iter_mut().enumerate() {
            fill_account(st, &mut step.spec, &format!("steps[{i}]."))?;
        }
    }
    Ok(spec)
}

/// Refuses a notification topic outside `notify.allowed_topics` (when that is set).
pub fn check_topic(st: &AppState, topic: &str, field: &str) -> Result<()> {
    let allowed = &st.config.notify.allowed_topics;
    if super::catalog::allowed(allowed, topic) {
        return Ok(());
    }
    Err(ServiceError::unprocessable(
        "topic_not_allowed",
        field,
        format!(
            "`{topic}` is not one of notify.allowed_topics ({})",
            allowed.join(", ")
        ),
    ))
}

fn fill_account(st: &AppState, spec: &mut JobSpec, prefix: &str) -> Result<()> {
    let cfg = &st.config;
    let account = spec
        .account
        .clone()
        .unwrap_or_else(|| cfg.default_account.clone());
    let acct = cfg.accounts.get(&account).ok_or_else(|| {
        ServiceError::unprocessable(
            "unknown_account",
            format!("{prefix}account"),
            format!("no account `{account}` is configured"),
        )
    })?;
    if spec.region.is_none() {
        spec.region = Some(acct.region.clone());
    }
    super::catalog::check(&account, acct, spec).map_err(|e| e.under(prefix))?;
    spec.account = Some(account);
    Ok(())
}

/// A job that passed every rule and may be stored: resolved, authorized, its key checked, and
/// admitted. Made only by this module's functions.
#[derive(Debug)]
#[must_use = "an admitted job is stored only by `queue`"]
pub struct Admitted {
    spec: JobSpec,
    key: Option<String>,
    created_by: String,
}

impl Admitted {
    /// The job's spec.
    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }

    /// Continues the caller's trace (W3C `traceparent`) in the job unless its spec names one: a
    /// job's trace context is where it came from, not what it asks for (it is left out of the
    /// idempotency comparison).
    pub fn traced(mut self, traceparent: Option<String>) -> Self {
        if self.spec.traceparent.is_none() {
            self.spec.traceparent = traceparent;
        }
        self
    }

    /// Stores it (or finds the job its key already made): whether it was created, and the job
    /// as the caller may see it.
    pub async fn queue(self, st: &AppState) -> Result<(bool, Job)> {
        let q = &st.config.queue;
        let new = NewJob {
            max_attempts: self.spec.max_attempts.unwrap_or(q.max_attempts),
            timeout_ms: self
                .spec
                .timeout_duration()
                .unwrap_or(q.job_timeout.0)
                .as_millis() as i64,
            spec: self.spec,
            idempotency_key: self.key,
            created_by: Some(self.created_by),
        };
        Ok(match st.store.enqueue(new).await? {
            Enqueued::Created(j) => {
                st.metrics.submitted(j.action.as_str());
                (true, j.redacted())
            }
            Enqueued::Replayed(j) => (false, j.redacted()),
        })
    }
}

/// Checks a resolved spec for `op` (what it runs, and the template it comes from) and admits it.
async fn admit_job(
    st: &AppState,
    caller: &Caller,
    op: Op,
    template: Option<&str>,
    spec: JobSpec,
    key: Key,
) -> Result<Admitted> {
    let mut runs = Runs::spec(&spec, &st.config.default_account);
    if let Some(t) = template {
        runs = runs.by_template(t);
    }
    authorize(caller, op, On::Runs(&runs))?;
    let key = key.check(caller)?;
    admit(st, &spec).await?;
    Ok(Admitted {
        spec,
        key,
        created_by: caller.name.clone(),
    })
}

/// A submission (`POST /v1/jobs`, a scheduler's `ec2jobd submit`, a schedule's firing, an alarm's
/// rule): resolved, authorized and admitted.
pub async fn submit(st: &AppState, caller: &Caller, spec: JobSpec, key: Key) -> Result<Admitted> {
    policy::role(caller, Op::Submit)?;
    let spec = resolve(st, spec)?;
    admit_job(st, caller, Op::Submit, None, spec, key).await
}

/// A job from a template's spec (already rendered and resolved by `templates`).
pub(super) async fn from_template(
    st: &AppState,
    caller: &Caller,
    template: &str,
    spec: JobSpec,
    key: Key,
) -> Result<Admitted> {
    admit_job(st, caller, Op::RunTemplate, Some(template), spec, key).await
}

/// A new job with the spec of job `id` (checked and admitted as a submission is).
pub async fn rerun(st: &AppState, caller: &Caller, id: &str) -> Result<Admitted> {
    policy::role(caller, Op::Rerun)?;
    let old = stored(st, id).await?;
    let spec = resolve(st, old.spec)?;
    admit_job(st, caller, Op::Rerun, None, spec, Key::None).await
}

/// Refuses (429, Retry-After) when `queue.max_queued` jobs are waiting; the last
/// `queue.reserved_for_priority` places are kept for jobs of at least `sns.priority` (an alarm's
/// recovery job), so a busy schedule or a burst of bulk work cannot starve them.
async fn admit(st: &AppState, spec: &JobSpec) -> Result<()> {
    let q = &st.config.queue;
    let max = q.max_queued;
    let reserved = spec.priority.unwrap_or(0) < st.config.sns.priority;
    let kept = q.reserved_for_priority.of(max);
    let limit = if reserved && max > 0 {
        max.saturating_sub(kept).max(1)
    } else {
        max
    };
    let lot = (st.runner.parked() as u64, st.runner.returned());
    if st.admission.admit(st.store.as_ref(), limit, lot).await? {
        return Ok(());
    }
    let detail = if limit < max {
        format!("{limit} jobs are already queued; the last {kept} places of queue.max_queued ({max}) are kept for jobs of priority {} or more (queue.reserved_for_priority); nothing was stored, retry later", st.config.sns.priority)
    } else {
        format!("{max} jobs are already queued (queue.max_queued); nothing was stored, retry later")
    };
    Err(ServiceError::new(Kind::TooMany, "queue_full", detail).retry_after(1))
}

/// Cancels job `id`: a queued one at once, a running one at its next boundary (this replica's
/// worker is told now, another's at its next heartbeat).
pub async fn cancel(st: &AppState, caller: &Caller, id: &str) -> Result<CancelOutcome> {
    policy::role(caller, Op::Cancel)?;
    let job = stored(st, id).await?;
    authorize(caller, Op::Cancel, On::Job(&job))?;
    let out = st
        .store
        .cancel(id, &caller.name)
        .await?
        .ok_or_else(|| ServiceError::not_found(&format!("job `{id}`")))?;
    if let CancelOutcome::Requested(_) = out {
        st.runner.cancel_local(id);
    }
    Ok(match out {
        CancelOutcome::Cancelled(j) => CancelOutcome::Cancelled(j.redacted()),
        CancelOutcome::Requested(j) => CancelOutcome::Requested(j.redacted()),
        CancelOutcome::AlreadyFinished(j) => CancelOutcome::AlreadyFinished(j.redacted()),
    })
}

async fn stored(st: &AppState, id: &str) -> Result<Job> {
    st.store
        .get(id)
        .await?
        .ok_or_else(|| ServiceError::not_found(&format!("job `{id}`")))
}

/// One job as the caller may see it.
pub async fn get(st: &AppState, caller: &Caller, id: &str) -> Result<Job> {
    authorize(caller, Op::ReadJobs, On::Nothing)?;
    Ok(stored(st, id).await?.redacted())
}

/// A list's first page with no filter: the newest 50.
pub fn newest() -> ListQuery {
    ListQuery {
        limit: 50,
        ..Default::default()
    }
}

/// One list filter every door takes, from a caller's `key=value`, into `q`: `state`, `action`,
/// `created_by` (a token's name or `sns:<hook>`), `schedule` (its firings' jobs), `cursor` (a page's
/// `next_cursor`), `limit` (1-500). `Ok(false)`: not one of these (the door's own, or unknown).
pub fn filter(q: &mut ListQuery, key: &str, v: &str) -> Result<bool> {
    let bad = |code: &str, message: String| Err(ServiceError::bad_request(code, key, message));
    match key {
        "state" => match v.parse::<JobState>() {
            Ok(s) => q.state = Some(s),
            Err(m) => return bad("invalid_state", m),
        },
        "action" => match ec2jobd_spec::Action::parse(v) {
            Some(a) => q.action = Some(a.as_str().to_string()),
            None => return bad("invalid_action", format!("`{v}` is not an action")),
        },
        "limit" => match v.parse::<u32>().ok().filter(|n| (1..=500).contains(n)) {
            Some(n) => q.limit = n,
            None => {
                return bad(
                    "invalid_limit",
                    "must be a whole number from 1 to 500".into(),
                )
            }
        },
        "cursor" => match ulid::Ulid::from_string(v) {
            Ok(_) => q.before_id = Some(v.to_string()),
            Err(_) => return bad("invalid_cursor", "not a cursor returned by this API".into()),
        },
        "created_by" => match v.len() {
            1..=256 => q.created_by = Some(v.to_string()),
            _ => {
                let m = "a token's name (1 to 256 bytes) or sns:<hook>";
                return bad("invalid_created_by", m.into());
            }
        },
        "schedule" => match crate::config::is_hook_name(v) {
            true => q.created_by = Some(ec2jobd_spec::schedule::fired_by(v)),
            false => {
                let m = "a schedule's name (1-64 letters, digits, `-` or `_`)";
                return bad("invalid_schedule", m.into());
            }
        },
        _ => return Ok(false),
    }
    Ok(true)
}

/// A page of jobs as the caller may see them. A text search matches only what every reader may
/// see (the store leaves secret fields out of what it searches), so it cannot be asked about them.
pub async fn list(st: &AppState, caller: &Caller, q: ListQuery) -> Result<Page> {
    authorize(caller, Op::ReadJobs, On::Nothing)?;
    let mut page = st.store.list(q).await?;
    page.jobs = page.jobs.into_iter().map(Job::redacted).collect();
    Ok(page)
}

/// What the dashboard's overview shows: jobs per state (at most a few seconds old), jobs finished
/// per hour since `since_ms`, and the newest running and failed jobs (at most `n` each).
#[derive(Debug)]
pub struct Overview {
    /// Jobs per state.
    pub counts: Vec<(JobState, i64)>,
    /// Finished per hour and final state.
    pub hours: Vec<HourCount>,
    /// The newest running jobs.
    pub running: Vec<Job>,
    /// The newest failed jobs.
    pub failed: Vec<Job>,
}

/// The overview for `caller` (see [`Overview`]).
pub async fn overview(st: &AppState, caller: &Caller, since_ms: i64, n: u32) -> Result<Overview> {
    authorize(caller, Op::ReadJobs, On::Nothing)?;
    let newest = |state| ListQuery {
        state: Some(state),
        limit: n,
        ..Default::default()
    };
    let (counts, hours, running, failed) = tokio::try_join!(
        st.counts.get(&st.store),
        st.store.finished_per_hour(since_ms),
        st.store.list(newest(JobState::Running)),
        st.store.list(newest(JobState::Failed)),
    )?;
    let shown = |p: Page| p.jobs.into_iter().map(Job::redacted).collect();
    Ok(Overview {
        counts,
        hours,
        running: shown(running),
        failed: shown(failed),
    })
}

/// A job's events after `after`, oldest first (at most `limit`).
pub async fn events(
    st: &AppState,
    caller: &Caller,
    id: &str,
    after: i64,
    limit: u32,
) -> Result<Vec<JobEvent>> {
    authorize(caller, Op::ReadJobs, On::Nothing)?;
    Ok(st.store.events(id, after, limit).await?)
}

/// Notices of changed jobs (their ids), on any replica: subscribe before reading a job, so
/// nothing that happens in between is missed.
pub fn watch(st: &AppState) -> tokio::sync::broadcast::Receiver<String> {
    st.store.subscribe()
}

/// A slot for a long-lived answer (an event stream, a held submission): `http.max_streams`
/// overall and `http.max_streams_per_token` per caller, else a refusal to try later.
pub fn stream_slot(st: &AppState, caller: &Caller) -> Result<StreamSlot> {
    let h = &st.config.http;
    st.streams
        .open(&caller.name, h.max_streams, h.max_streams_per_token)
        .ok_or_else(|| {
            ServiceError::new(
                Kind::TooMany,
                "too_many_streams",
                "too many event streams and held submissions are open (http.max_streams, \
                 http.max_streams_per_token); close one or retry later",
            )
            .retry_after(1)
        })
}

/// Holds until the job ends or `until` passes (or the daemon stops), woken by the store's change
/// notices and re-reading every second in case another process ran it. The job is stored: a
/// failed re-read answers with what is known rather than an error.
pub async fn wait_for_end(st: &AppState, job: Job, until: tokio::time::Instant) -> Job {
    let mut rx = st.store.subscribe();
    let mut job = job;
    loop {
        if job.state.is_terminal() {
            return job;
        }
        let tick = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(tick);
        loop {
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(id) if id != job.id => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => break,
                    Err(RecvError::Closed) => return job,
                },
                _ = &mut tick => break,
                _ = tokio::time::sleep_until(until) => return job,
                _ = st.shutdown.cancelled() => return job,
            }
        }
        if let Ok(Some(j)) = st.store.get(&job.id).await {
            job = j.redacted();
        }
    }
}

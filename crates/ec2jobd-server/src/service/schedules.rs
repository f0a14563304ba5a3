//! Schedules at work: saved, listed, paused and deleted for callers; fired by the ticker and
//! reconciled for windows, each firing's job admitted through [`super::jobs`] like any other.
//! A schedule is checked completely when saved — its times, the job of every kind of firing it
//! makes, and what those jobs run against the saver's scopes — so its unattended firings act with
//! the authority saving gave them. Overrides are checked against the scopes of whoever adds or
//! ends them (the start or stop they cause). Must not: decide when a schedule fires (the model
//! in `crate::schedules` and `ec2jobd_spec::schedule`) or when the ticker runs.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use ec2jobd_spec::schedule::{fired_by, firing_key};
use ec2jobd_spec::{Action, Job, JobSpec, JobState};
use ec2jobd_store::{ListQuery, Named};
use serde::Serialize;
use utoipa::ToSchema;

use super::caller::{Caller, Door};
use super::error::{Kind, Result, ServiceError};
use super::jobs::Key;
use super::policy::{self, authorize, On, Op, Runs};
use crate::schedules::windows::{self, Changes, Held, Override, Reconcile, Reconciled};
use crate::schedules::{Fires, Invalid, Overlap, Plan, Schedule, Source, Upcoming};
use crate::state::AppState;

/// The newest job a schedule's firing queued.
#[derive(Debug, Serialize, ToSchema)]
pub struct LastJob {
    /// Job id.
    pub id: String,
    /// Its state.
    pub state: JobState,
    /// When it was queued.
    pub created_at: DateTime<Utc>,
}

/// A schedule as callers see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ScheduleInfo {
    /// Name: its firings' jobs have `schedule` = this and `created_by` = `schedule:<name>`.
    pub name: String,
    /// `config` (change it there) or `api`.
    pub source: Source,
    /// The schedule.
    pub schedule: Schedule,
    /// The next firings (10 for one schedule, 1 in the list); empty when paused or ended.
    pub next: Vec<Upcoming>,
    /// The newest job a firing queued (one schedule only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_job: Option<LastJob>,
    /// A window's unexpired overrides by id (one schedule only).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub overrides: BTreeMap<String, Override>,
}

/// An override saved.
#[derive(Debug, Serialize, ToSchema)]
pub struct OverrideInfo {
    /// Its id (`DELETE /v1/schedules/{name}/overrides/{id}` ends it early).
    pub id: String,
    /// The override.
    #[serde(flatten)]
    pub held: Override,
}

/// A bad schedule as a refusal naming the field.
pub fn invalid((field, msg): Invalid) -> ServiceError {
    ServiceError::unprocessable("invalid_schedule", field, msg)
}

/// The job one firing queues, resolved like a submission (the account's allowlists, a
/// template's parameters); a refusal names the schedule's field.
pub async fn spec_for(st: &AppState, schedule: &Schedule, fires: Fires) -> Result<JobSpec> {
    if let (Fires::Job, Some(t)) = (fires, &schedule.template) {
        return super::templates::spec_of(st, t, &schedule.parameters)
            .await
            .map_err(|e| e.under("template."));
    }
    let raw = schedule.raw_spec(fires).map_err(invalid)?;
    let prefix = if fires == Fires::Job { "job." } else { "" };
    super::jobs::resolve(st, raw).map_err(|e| e.under(prefix))
}

/// A schedule checked completely (as saved, or from config at start): its times, the job of
/// every kind of firing it makes, and what those jobs run.
pub async fn check(st: &AppState, schedule: &Schedule) -> Result<(Plan, Runs)> {
    let plan = schedule.plan(&st.config.calendars).map_err(invalid)?;
    let default = &st.config.default_account;
    let mut runs = Runs::nothing();
    for (fires, _) in &plan.firings {
        let spec = spec_for(st, schedule, *fires).await?;
        let prefix = match fires {
            Fires::Job if schedule.template.is_some() => "template.",
            Fires::Job => "job.",
            Fires::Start | Fires::Stop => "",
        };
        runs = runs.and(prefix, Runs::spec(&spec, default));
    }
    if let Some(t) = &schedule.template {
        runs = runs.by_template(t);
    }
    Ok((plan, runs))
}

/// Every schedule, config first, then the API's (a name defined in config cannot be saved over
/// the API). A stored body that no longer reads is left out with a warning.
pub async fn all(st: &AppState) -> Result<Vec<(String, Source, Schedule)>> {
    let mut out: Vec<_> = st
        .config
        .schedules
        .iter()
        .map(|(n, s)| (n.clone(), Source::Config, s.clone()))
        .collect();
    for (name, body) in st.store.list_named(Named::Schedule).await? {
        match serde_json::from_value(body) {
            Ok(s) => out.push((name, Source::Api, s)),
            Err(e) => tracing::warn!(schedule = %name, error = %e, "stored schedule does not read"),
        }
    }
    Ok(out)
}

/// One schedule by name.
pub async fn find(st: &AppState, name: &str) -> Result<Option<(Source, Schedule)>> {
    if let Some(s) = st.config.schedules.get(name) {
        return Ok(Some((Source::Config, s.clone())));
    }
    match st.store.get_named(Named::Schedule, name).await? {
        None => Ok(None),
        Some(body) => serde_json::from_value(body)
            .map(|s| Some((Source::Api, s)))
            .map_err(|e| ServiceError::new(Kind::Internal, "corrupt_schedule", e.to_string())),
    }
}

async fn one(st: &AppState, name: &str) -> Result<(Source, Schedule)> {
    find(st, name)
        .await?
        .ok_or_else(|| ServiceError::not_found(&format!("schedule `{name}`")))
}

/// The newest job a firing of the schedule `name` queued.
pub async fn last_job(st: &AppState, name: &str) -> Result<Option<Job>> {
    let page = st
        .store
        .list(ListQuery {
            created_by: Some(fired_by(name)),
            limit: 1,
            ..Default::default()
        })
        .await?;
    Ok(page.jobs.into_iter().next())
}

/// The secret parameters of each template a schedule may name (loaded once per answer).
#[derive(Default)]
struct SecretParams(BTreeMap<String, BTreeSet<String>>);

impl SecretParams {
    async fn of(&mut self, st: &AppState, template: &str) -> &BTreeSet<String> {
        if !self.0.contains_key(template) {
            let secret = super::templates::load(st, template)
                .await
                .map(|t| t.secret_parameters())
                .unwrap_or_default();
            self.0.insert(template.to_string(), secret);
        }
        &self.0[template]
    }
}

/// The schedule as `caller` may see it: its job's secrets, and the values of the template
/// parameters that fill secret fields, redacted (see `super::redact`).
async fn shown(
    st: &AppState,
    caller: &Caller,
    mut s: Schedule,
    secrets: &mut SecretParams,
) -> Schedule {
    if super::redact::may_see_secrets(caller) {
        return s;
    }
    if let Some(job) = s.job.as_mut() {
        job.redact_secrets();
    }
    if let Some(t) = s.template.clone() {
        let secret = secrets.of(st, &t).await;
        for (k, v) in s.parameters.iter_mut() {
            if secret.contains(k) {
                ec2jobd_spec::redact_value(v);
            }
        }
    }
    s
}

fn info(st: &AppState, name: String, source: Source, schedule: Schedule, n: usize) -> ScheduleInfo {
    let next = match schedule.plan(&st.config.calendars) {
        Ok(plan) if schedule.enabled => plan.upcoming(st.now(), n),
        _ => Vec::new(),
    };
    ScheduleInfo {
        name,
        source,
        schedule,
        next,
        last_job: None,
        overrides: BTreeMap::new(),
    }
}

/// Every schedule (config first), each with its next firing.
pub async fn list(st: &AppState, caller: &Caller) -> Result<Vec<ScheduleInfo>> {
    authorize(caller, Op::ReadSchedules, On::Nothing)?;
    let mut secrets = SecretParams::default();
    let mut out = Vec::new();
    for (name, source, s) in all(st).await? {
        let s = shown(st, caller, s, &mut secrets).await;
        out.push(info(st, name, source, s, 1));
    }
    Ok(out)
}

/// One schedule, with its next 10 firings, its newest job and its overrides.
pub async fn get(st: &AppState, caller: &Caller, name: &str) -> Result<ScheduleInfo> {
    authorize(caller, Op::ReadSchedules, On::Nothing)?;
    let (source, schedule) = one(st, name).await?;
    let last = last_job(st, name).await?.map(|j| LastJob {
        id: j.id,
        state: j.state,
        created_at: j.created_at,
    });
    let (live, _) = overrides(st, name, st.now()).await?;
    let schedule = shown(st, caller, schedule, &mut SecretParams::default()).await;
    let mut out = info(st, name.to_string(), source, schedule, 10);
    out.last_job = last;
    out.overrides = windows::by_id(live);
    Ok(out)
}

fn from_config(name: &str) -> ServiceError {
    ServiceError::new(
        Kind::Conflict,
        "schedule_in_config",
        format!("schedule `{name}` is defined in config ([schedules.{name}]); change it there"),
    )
}

/// A schedule of the API's, and what it runs, for `op` by `caller` (config's are changed there).
async fn changeable(
    st: &AppState,
    caller: &Caller,
    op: Op,
    name: &str,
) -> Result<(Schedule, Runs)> {
    policy::role(caller, op)?;
    let (source, schedule) = one(st, name).await?;
    if source == Source::Config {
        return Err(from_config(name));
    }
    let (_, runs) = check(st, &schedule).await?;
    authorize(caller, op, On::Runs(&runs))?;
    Ok((schedule, runs))
}

async fn store_schedule(
    st: &AppState,
    caller: &Caller,
    name: &str,
    schedule: &Schedule,
) -> Result<bool> {
    let body = serde_json::to_value(schedule).map_err(ServiceError::internal)?;
    let created = st
        .store
        .put_named(Named::Schedule, name, body, &caller.name)
        .await?;
    st.schedules_changed.notify_one();
    Ok(created)
}

/// Creates or replaces schedule `name` (checked completely; what it runs within the saver's
/// scopes; one that can never fire is refused); true when created.
pub async fn save(
    st: &AppState,
    caller: &Caller,
    name: &str,
    mut schedule: Schedule,
) -> Result<bool> {
    policy::role(caller, Op::SaveSchedule)?;
    super::check_name(name)?;
    if st.config.schedules.contains_key(name) {
        return Err(from_config(name));
    }
    let (plan, runs) = check(st, &schedule).await?;
    let now = st.now();
    if let Some((fires, _)) = plan.firings.iter().find(|(_, t)| t.next(now).is_none()) {
        let field = if *fires == Fires::Job {
            "cron"
        } else {
            "window"
        };
        return Err(invalid((
            field.into(),
            "never fires: no firing within the next nine years, the active span or the skipped dates"
                .into(),
        )));
    }
    authorize(caller, Op::SaveSchedule, On::Runs(&runs))?;
    schedule.saved_at = Some(now);
    store_schedule(st, caller, name, &schedule).await
}

/// Deletes schedule `name` (its jobs stay).
pub async fn delete(st: &AppState, caller: &Caller, name: &str) -> Result<()> {
    if st.config.schedules.contains_key(name) {
        policy::role(caller, Op::DeleteSchedule)?;
        return Err(from_config(name));
    }
    changeable(st, caller, Op::DeleteSchedule, name).await?;
    if st
        .store
        .delete_named(Named::Schedule, name, &caller.name)
        .await?
    {
        st.schedules_changed.notify_one();
        Ok(())
    } else {
        Err(ServiceError::not_found(&format!("schedule `{name}`")))
    }
}

/// Pauses (`enabled` false: nothing fires) or resumes schedule `name`; missed firings are not
/// caught up. Answers the schedule as it is now.
pub async fn set_enabled(
    st: &AppState,
    caller: &Caller,
    name: &str,
    enabled: bool,
) -> Result<ScheduleInfo> {
    let (mut schedule, _) = changeable(st, caller, Op::PauseSchedule, name).await?;
    if schedule.enabled != enabled {
        schedule.enabled = enabled;
        schedule.saved_at = Some(st.now());
        store_schedule(st, caller, name, &schedule).await?;
    }
    get(st, caller, name).await
}

/// The unexpired overrides of a schedule, and the names of the expired ones.
pub async fn overrides(
    st: &AppState,
    schedule: &str,
    now: DateTime<Utc>,
) -> Result<(Vec<(String, Override)>, Vec<String>)> {
    let prefix = format!("{schedule}/");
    let mut live = Vec::new();
    let mut expired = Vec::new();
    for (name, body) in st.store.list_named(Named::ScheduleOverride).await? {
        if !name.starts_with(&prefix) {
            continue;
        }
        match serde_json::from_value::<Override>(body) {
            Ok(o) if o.until > now => live.push((name, o)),
            _ => expired.push(name),
        }
    }
    Ok((live, expired))
}

/// Holds some of a window's instances in a state until a time ("keep db-7 running until Friday
/// 18:00"): allowed to whoever may run the start or stop it causes. The window's next
/// reconciliation honours it.
pub async fn add_override(
    st: &AppState,
    caller: &Caller,
    name: &str,
    held: Override,
) -> Result<OverrideInfo> {
    policy::role(caller, Op::AddOverride)?;
    let (_, schedule) = one(st, name).await?;
    let bad = |field: &str, msg: &str| invalid((field.into(), msg.into()));
    if schedule.window.is_none() {
        return Err(bad("name", "overrides are for window schedules"));
    }
    let fires = match held.state {
        Held::Running => Fires::Start,
        Held::Stopped => Fires::Stop,
    };
    let spec = spec_for(st, &schedule, fires).await?;
    authorize(
        caller,
        Op::AddOverride,
        On::Runs(&Runs::spec(&spec, &st.config.default_account)),
    )?;
    match (&held.instance_ids, &held.tags) {
        (Some(ids), None) if !ids.0.is_empty() && ids.0.len() <= 1000 => {}
        (None, Some(tags)) if !tags.0.is_empty() => {}
        _ => {
            return Err(bad(
                "instance_ids",
                "give either `instance_ids` (1 to 1000) or `tags`",
            ))
        }
    }
    let now = st.now();
    if held.until <= now || held.until > now + chrono::Duration::days(366) {
        return Err(bad("until", "must be in the future, within a year"));
    }
    if held.reason.as_ref().is_some_and(|r| r.len() > 1024) {
        return Err(bad("reason", "at most 1024 bytes"));
    }
    let (live, _) = overrides(st, name, now).await?;
    if live.len() >= 100 {
        return Err(bad("name", "this schedule already has 100 overrides"));
    }
    let id = ulid::Ulid::new().to_string();
    let body = serde_json::to_value(&held).map_err(ServiceError::internal)?;
    st.store
        .put_named(
            Named::ScheduleOverride,
            &format!("{name}/{id}"),
            body,
            &caller.name,
        )
        .await?;
    st.schedules_changed.notify_one();
    Ok(OverrideInfo { id, held })
}

/// A window's unexpired overrides.
pub async fn list_overrides(
    st: &AppState,
    caller: &Caller,
    name: &str,
) -> Result<Vec<OverrideInfo>> {
    authorize(caller, Op::ReadSchedules, On::Nothing)?;
    one(st, name).await?;
    let (live, _) = overrides(st, name, st.now()).await?;
    Ok(windows::by_id(live)
        .into_iter()
        .map(|(id, held)| OverrideInfo { id, held })
        .collect())
}

/// Ends an override early: allowed to whoever may run what the window then does to its
/// instances (start and stop).
pub async fn end_override(st: &AppState, caller: &Caller, name: &str, id: &str) -> Result<()> {
    policy::role(caller, Op::EndOverride)?;
    let missing = || ServiceError::not_found(&format!("override `{id}` of `{name}`"));
    let (_, schedule) = one(st, name).await.map_err(|_| missing())?;
    let (_, runs) = check(st, &schedule).await?;
    authorize(caller, Op::EndOverride, On::Runs(&runs))?;
    if st
        .store
        .delete_named(
            Named::ScheduleOverride,
            &format!("{name}/{id}"),
            &caller.name,
        )
        .await?
    {
        st.schedules_changed.notify_one();
        Ok(())
    } else {
        Err(missing())
    }
}

/// What one firing came to (the ticker logs and counts it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fired {
    /// A job was queued (its id).
    Queued(String),
    /// The firing's job was already queued (a restart, another leader): that job.
    Already(String),
    /// The previous firing's job has not finished (`overlap: "skip"`): that job.
    Skipped(String),
    /// The job could not be made (a template gone, an account removed): why.
    Failed(String),
    /// A window opened or closed: its instances are reconciled.
    Window,
}

/// Queues the job of schedule `name`'s firing at `at` (a cron schedule's), unless `overlap` is
/// skip and the previous firing's job (`previous`, else the newest one) has not finished. The
/// job is admitted like any submission; a full queue or an unavailable store is an error, so the
/// ticker tries the firing again while it is on time.
pub async fn fire(
    st: &AppState,
    name: &str,
    schedule: &Schedule,
    at: DateTime<Utc>,
    previous: Option<&str>,
) -> Result<Fired> {
    if schedule.overlap == Overlap::Skip {
        let previous = match previous {
            Some(id) => st.store.get(id).await?,
            None => last_job(st, name).await?,
        };
        // A job made at or after this firing's time is this firing's own (queued before a
        // restart): not an overlap; its key answers below.
        if let Some(p) = previous.filter(|p| !p.state.is_terminal() && p.created_at < at) {
            return Ok(Fired::Skipped(p.id));
        }
    }
    let spec = match spec_for(st, schedule, Fires::Job).await {
        Ok(s) => s,
        Err(e) => return Ok(Fired::Failed(e.to_string())),
    };
    let caller = Caller::unattended(fired_by(name), Door::Schedule);
    let admitted = super::jobs::submit(st, &caller, spec, Key::Door(firing_key(name, at))).await?;
    let (created, job) = admitted.queue(st).await?;
    Ok(if created {
        Fired::Queued(job.id)
    } else {
        Fired::Already(job.id)
    })
}

/// Describes a window's instances and queues one job per direction for those in the wrong state
/// (see `crate::schedules::windows`); expired overrides are deleted on the way.
pub async fn reconcile(st: &AppState, r: &Reconcile, now: DateTime<Utc>) -> Result<Reconciled> {
    let open = r.plan.window_open(r.at).unwrap_or(false);
    let by = fired_by(&r.name);
    let (live, expired) = overrides(st, &r.name, now).await?;
    for name in expired {
        st.store
            .delete_named(Named::ScheduleOverride, &name, &by)
            .await?;
    }
    let live: Vec<Override> = live.into_iter().map(|(_, o)| o).collect();
    let base = spec_for(st, &r.schedule, Fires::Start).await?;
    let account = base.account.clone().unwrap_or_default();
    let region = base.region.clone().unwrap_or_default();
    let unavailable = |e: String| ServiceError::new(Kind::Unavailable, "ec2_unavailable", e);
    let ec2 = st
        .pool
        .get(&account, &region)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let found = ec2
        .describe_instances(&base.targets, false)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let Changes { start, stop } = windows::changes(&found.instances, open, &live, now);
    let caller = Caller::unattended(by, Door::Window);
    let mut out = Reconciled {
        open,
        ..Default::default()
    };
    for (action, ids) in [
        (Action::StartInstances, start),
        (Action::StopInstances, stop),
    ] {
        if ids.is_empty() {
            continue;
        }
        let mut v = serde_json::json!({
            "action": action.as_str(),
            "account": account,
            "region": region,
            "targets": {"instance_ids": ids},
        });
        if action == Action::StopInstances && r.schedule.hibernate {
            v["params"] = serde_json::json!({"hibernate": true, "fallback_to_stop": true});
        }
        let spec: JobSpec = serde_json::from_value(v).map_err(ServiceError::internal)?;
        let key = Key::Door(windows::key(r, action));
        let (_, job) = super::jobs::submit(st, &caller, spec, key)
            .await?
            .queue(st)
            .await?;
        let done = Some((job.id, ids));
        if action == Action::StartInstances {
            out.started = done;
        } else {
            out.stopped = done;
        }
    }
    Ok(out)
}

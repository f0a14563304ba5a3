//! Schedules (issue 17): what a schedule is (`PUT /v1/schedules/{name}` and `[schedules.<name>]`
//! in config), how it is checked, when it fires and which job each firing queues. A schedule either
//! fires a job spec or a saved template on a `cron` expression, or keeps an office-hours `window`
//! (start jobs when it opens, stop jobs when it closes) for the instances its `targets` name.
//!
//! This module is the model, pure (config reads it): the schedule, its checks without the store,
//! its firing times (`ec2jobd_spec::schedule` answers when, with the time passed in) and the job
//! spec each firing makes. What is done with schedules (saved, listed, fired, reconciled) is
//! `service::schedules`; the [`ticker`] is the door that fires them. Must not: read the clock,
//! the store or AWS, or queue jobs.

pub mod ticker;
pub mod windows;

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, NaiveDate, Utc};
use ec2jobd_spec::schedule::{CatchUp, Recurrence, Times, Window};
use ec2jobd_spec::{Action, JobSpec, Targets};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

/// How late a firing may be found and still run as on time (a tick delayed, a restart at the
/// firing instant); an older missed firing runs only with `catch_up: "latest"`.
pub const ON_TIME: chrono::Duration = chrono::Duration::seconds(60);

/// What a firing does when the job of the schedule's previous firing has not finished.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Nothing is queued this time (the default).
    #[default]
    Skip,
    /// The new job is queued anyway.
    Queue,
}

fn utc() -> String {
    "UTC".into()
}

fn yes() -> bool {
    true
}

/// A schedule (body of `PUT /v1/schedules/{name}`, and `[schedules.<name>]` in config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// What it is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// When it fires: 5 fields (minute hour day month weekday), 6 with seconds first, or an alias
    /// (`@hourly`, `@daily`, `@weekly`, `@monthly`, `@yearly`). Not with `window`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "0 2 * * *")]
    pub cron: Option<String>,
    /// IANA time zone of `cron` and `skip_dates` (default `UTC`). A firing at a local time that
    /// does not exist (spring forward) fires at the first instant after the gap; one at a time
    /// that happens twice (fall back) fires once.
    #[serde(default = "utc")]
    #[schema(example = "Europe/Berlin")]
    pub time_zone: String,
    /// The job each firing queues (with `cron`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSpec>,
    /// Or a saved template each firing runs (with `cron`), with `parameters`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template: Option<String>,
    /// Template parameter values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub parameters: BTreeMap<String, Value>,
    /// Office hours (instead of `cron`): the `targets` are started (waiting for status checks)
    /// when it opens and stopped when it closes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Window>,
    /// The instances a `window` starts and stops.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Targets>,
    /// A `window` also reconciles every `interval`: targeted instances that should be stopped but
    /// run are stopped, and the reverse (so a window survives downtime and manual starts), except
    /// instances an override holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enforce: bool,
    /// How often `enforce` looks (default `5m`, at least `1s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = "5m")]
    pub interval: Option<String>,
    /// A window closes by hibernating its instances, stopping those that cannot hibernate
    /// (default false: a plain stop).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hibernate: bool,
    /// Account of a `window`'s jobs (default: `default_account`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// Region of a `window`'s jobs (default: the account's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Local dates on which nothing fires (`YYYY-MM-DD`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Vec<String>, example = json!(["2026-12-24"]))]
    pub skip_dates: Vec<NaiveDate>,
    /// Holiday calendars (`[calendars.<name>]` in config) whose dates are skipped too.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calendars: Vec<String>,
    /// Nothing fires before this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_from: Option<DateTime<Utc>>,
    /// Nothing fires at or after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_until: Option<DateTime<Utc>>,
    /// False: nothing fires (`ec2jobd schedules pause` sets it).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// After downtime: `none` drops missed firings, `latest` runs the most recent one once.
    #[serde(default)]
    pub catch_up: CatchUp,
    /// When the previous firing's job has not finished: `skip` (default) or `queue`.
    #[serde(default)]
    pub overlap: Overlap,
    /// When it was last saved over the API (set by the daemon; a firing before it is never
    /// caught up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(read_only)]
    pub saved_at: Option<DateTime<Utc>>,
}

/// `[calendars.<name>]`: holidays a schedule can skip by naming the calendar.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calendar {
    /// What it is.
    pub description: Option<String>,
    /// Its dates, `YYYY-MM-DD` (quoted).
    pub dates: Vec<NaiveDate>,
}

/// What one firing does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Fires {
    /// The schedule's job or template.
    Job,
    /// A window opens: start its instances.
    Start,
    /// A window closes: stop its instances.
    Stop,
}

/// A checked schedule's firing times, by what they do.
#[derive(Debug, Clone)]
pub struct Plan {
    /// One entry for a cron schedule, two (start, stop) for a window.
    pub firings: Vec<(Fires, Times)>,
    /// How often an enforced window reconciles (`None`: it does not).
    pub enforce_every: Option<std::time::Duration>,
}

/// `interval` when `enforce` gives none.
pub const ENFORCE_EVERY: std::time::Duration = std::time::Duration::from_secs(300);

/// A bad schedule: the field (relative to the schedule) and what is wrong.
pub type Invalid = (String, String);

fn invalid(field: &str, msg: impl Into<String>) -> Invalid {
    (field.to_string(), msg.into())
}

impl Schedule {
    /// The firing times, checked without the store or AWS: exactly one of `cron` and `window`,
    /// a job or a template with `cron` and targets with `window`, known calendars, a span that
    /// is not empty.
    pub fn plan(&self, calendars: &BTreeMap<String, Calendar>) -> Result<Plan, Invalid> {
        if self.description.as_ref().is_some_and(|d| d.len() > 1024) {
            return Err(invalid("description", "at most 1024 bytes"));
        }
        if let (Some(f), Some(u)) = (self.active_from, self.active_until) {
            if f >= u {
                return Err(invalid("active_until", "must be after active_from"));
            }
        }
        let mut skip: BTreeSet<NaiveDate> = self.skip_dates.iter().copied().collect();
        for name in &self.calendars {
            let cal = calendars.get(name).ok_or_else(|| {
                invalid(
                    "calendars",
                    format!("no calendar `{name}` is configured ([calendars.{name}])"),
                )
            })?;
            skip.extend(cal.dates.iter().copied());
        }
        let times = |r: Recurrence, skip: &BTreeSet<NaiveDate>| Times {
            recurrence: r,
            skip: skip.clone(),
            active_from: self.active_from,
            active_until: self.active_until,
        };
        if (self.enforce || self.interval.is_some()) && self.window.is_none() {
            return Err(invalid(
                "enforce",
                "`enforce` and `interval` are for windows",
            ));
        }
        let enforce_every = match (&self.interval, self.enforce) {
            (_, false) => None,
            (None, true) => Some(ENFORCE_EVERY),
            (Some(i), true) => match humantime::parse_duration(i) {
                Ok(d) if d >= std::time::Duration::from_secs(1) => Some(d),
                _ => {
                    return Err(invalid(
                        "interval",
                        format!("`{i}` is not a duration of at least 1s"),
                    ))
                }
            },
        };
        let firings = match (&self.cron, &self.window) {
            (Some(cron), None) => {
                match (&self.job, &self.template) {
                    (Some(_), None) | (None, Some(_)) => {}
                    _ => return Err(invalid("job", "give either `job` or `template`")),
                }
                if self.targets.is_some() || self.account.is_some() || self.region.is_some() {
                    return Err(invalid(
                        "targets",
                        "`targets`, `account` and `region` go inside `job` (they are for windows)",
                    ));
                }
                let r = Recurrence::parse(cron, &self.time_zone).map_err(|e| {
                    let field = if e.contains("time zone") {
                        "time_zone"
                    } else {
                        "cron"
                    };
                    invalid(field, e)
                })?;
                vec![(Fires::Job, times(r, &skip))]
            }
            (None, Some(w)) => {
                if self.job.is_some() || self.template.is_some() {
                    return Err(invalid(
                        "window",
                        "a window starts and stops its `targets`; it takes no `job` or `template`",
                    ));
                }
                if self
                    .targets
                    .as_ref()
                    .is_none_or(|t| *t == Targets::default())
                {
                    return Err(invalid(
                        "targets",
                        "a window needs targets (instance_ids, tags or filters)",
                    ));
                }
                let (start, stop) = w.recurrences().map_err(|e| invalid("window", e))?;
                // A day off means the window does not open; a closing is never skipped (an
                // overnight window ending on a holiday still stops its instances).
                vec![
                    (Fires::Start, times(start, &skip)),
                    (Fires::Stop, times(stop, &BTreeSet::new())),
                ]
            }
            _ => return Err(invalid("cron", "give either `cron` or `window`")),
        };
        Ok(Plan {
            firings,
            enforce_every,
        })
    }

    /// The job spec of one firing (not yet resolved against config).
    pub fn raw_spec(&self, fires: Fires) -> Result<JobSpec, Invalid> {
        let window_job = |action: Action| -> Result<JobSpec, Invalid> {
            let mut v = serde_json::json!({
                "action": action.as_str(),
                "targets": self.targets,
                "allow_empty": true,
            });
            if let Some(a) = &self.account {
                v["account"] = a.clone().into();
            }
            if let Some(r) = &self.region {
                v["region"] = r.clone().into();
            }
            serde_json::from_value(v).map_err(|e| invalid("targets", e.to_string()))
        };
        match fires {
            Fires::Job => self
                .job
                .clone()
                .ok_or_else(|| invalid("job", "this schedule runs a template")),
            Fires::Start => window_job(Action::StartInstances),
            Fires::Stop => window_job(Action::StopInstances),
        }
    }
}

/// Where a schedule is defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `[schedules.<name>]` in config (read-only over the API).
    Config,
    /// `PUT /v1/schedules/{name}`.
    Api,
}

/// One firing to come.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Upcoming {
    /// When (UTC).
    pub at: DateTime<Utc>,
    /// What it does.
    pub fires: Fires,
}

impl Plan {
    /// The next `n` firings after `t`, in time order (a window's starts and stops merged).
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<Upcoming> {
        let mut all: Vec<Upcoming> = self
            .firings
            .iter()
            .flat_map(|(fires, times)| {
                times
                    .upcoming(t, n)
                    .into_iter()
                    .map(|at| Upcoming { at, fires: *fires })
            })
            .collect();
        all.sort_by_key(|u| u.at);
        all.truncate(n);
        all
    }

    /// For a window, whether it is open at `t`: its last opening is later than its last closing
    /// (`None` for a cron schedule).
    pub fn window_open(&self, t: DateTime<Utc>) -> Option<bool> {
        let times = |which: Fires| {
            self.firings
                .iter()
                .find(|(f, _)| *f == which)
                .map(|(_, times)| times)
        };
        Some(ec2jobd_spec::schedule::window_open(
            times(Fires::Start)?,
            times(Fires::Stop)?,
            t,
        ))
    }

    /// The first firing strictly after `t`.
    pub fn next(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.firings.iter().filter_map(|(_, x)| x.next(t)).min()
    }

    /// The firing to run at `now` when everything up to `seen` was dealt with ([`Times::due`]);
    /// of a window's, the latest (its state is what the window wants now).
    pub fn due(
        &self,
        seen: DateTime<Utc>,
        now: DateTime<Utc>,
        catch_up: CatchUp,
    ) -> Option<(DateTime<Utc>, Fires)> {
        self.firings
            .iter()
            .filter_map(|(fires, t)| t.due(seen, now, ON_TIME, catch_up).map(|at| (at, *fires)))
            .max_by_key(|(at, _)| *at)
    }
}

//! Office-hours windows at work: at a window's start or stop, and every `interval` when it is
//! enforced, the window's instances are described and one job per direction is queued for those
//! in the wrong state — start (waiting for status checks) while it is open, stop while it is closed
//! — except instances an unexpired override holds, which are brought to the override's state
//! instead ("keep db-7 running until Friday 18:00"). An instance on its way (pending, stopping) or
//! gone is left alone.
//!
//! [`changes`] decides, with the time passed in; `service::schedules::reconcile` describes and
//! queues. Must not: decide when a window opens (`Plan::window_open`) or when this runs (the
//! ticker), read the store or AWS.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ec2jobd_spec::{Action, IdList, InstanceResult, TagSet};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Fires, Plan, Schedule};

/// The state an override holds its instances in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Held {
    /// Kept running (started if stopped), whatever the window says.
    Running,
    /// Kept stopped.
    Stopped,
}

/// An override of a window schedule (body of `POST /v1/schedules/{name}/overrides`): the
/// instances named by `instance_ids` or `tags` are held in `state` until `until`, then follow the
/// window again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// Instances by id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<String>>)]
    pub instance_ids: Option<IdList>,
    /// Or instances carrying all of these tags.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub tags: Option<TagSet>,
    /// `running` or `stopped`.
    pub state: Held,
    /// When the override ends (RFC 3339).
    pub until: DateTime<Utc>,
    /// Why (shown in listings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Override {
    /// Whether it holds this instance.
    pub fn holds(&self, i: &InstanceResult) -> bool {
        if let Some(ids) = &self.instance_ids {
            return ids.0.contains(&i.instance_id);
        }
        self.tags
            .as_ref()
            .is_some_and(|t| t.0.iter().all(|(k, v)| i.tags.get(k) == Some(v)))
    }
}

/// What reconciling found to do: instances to start and to stop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Stopped instances that should run.
    pub start: Vec<String>,
    /// Running instances that should be stopped.
    pub stop: Vec<String>,
}

/// The instances in the wrong state at `now`, for a window that is `open` (or not) with these
/// overrides (an expired one no longer counts; the latest-ending holds when several name one).
pub fn changes(
    instances: &[InstanceResult],
    open: bool,
    overrides: &[Override],
    now: DateTime<Utc>,
) -> Changes {
    let mut out = Changes::default();
    for i in instances {
        let held = overrides
            .iter()
            .filter(|o| o.until > now && o.holds(i))
            .max_by_key(|o| o.until)
            .map(|o| o.state);
        let run = match held {
            Some(h) => h == Held::Running,
            None => open,
        };
        match (i.state.as_str(), run) {
            ("stopped", true) => out.start.push(i.instance_id.clone()),
            ("running", false) => out.stop.push(i.instance_id.clone()),
            _ => {}
        }
    }
    out
}

/// One reconciliation to do: at a window's firing (`fires`, keyed by the firing) or an
/// enforcement check.
#[derive(Debug, Clone)]
pub struct Reconcile {
    /// The schedule's name.
    pub name: String,
    /// The schedule.
    pub schedule: Schedule,
    /// Its plan.
    pub plan: Plan,
    /// The firing's time, or the check's.
    pub at: DateTime<Utc>,
    /// The firing (start or stop), or `None` for an enforcement check.
    pub fires: Option<Fires>,
}

/// What a reconciliation did: the jobs it queued (or found already queued by their keys).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Whether the window was open.
    pub open: bool,
    /// The start job and its instances.
    pub started: Option<(String, Vec<String>)>,
    /// The stop job and its instances.
    pub stopped: Option<(String, Vec<String>)>,
}

/// The job key of one direction: a firing's own direction has the firing's key
/// (`schedule:<name>:<time>`); the other direction (overrides) and enforcement checks add what
/// they are.
pub fn key(r: &Reconcile, action: Action) -> String {
    let base = ec2jobd_spec::schedule::firing_key(&r.name, r.at);
    let own = matches!(
        (r.fires, action),
        (Some(Fires::Start), Action::StartInstances) | (Some(Fires::Stop), Action::StopInstances)
    );
    match (own, r.fires) {
        (true, _) => base,
        (false, Some(_)) => format!("{base}:{}", action.as_str()),
        (false, None) => format!("{base}:enforce:{}", action.as_str()),
    }
}

/// The overrides of a schedule for listing, by id.
pub fn by_id(live: Vec<(String, Override)>) -> BTreeMap<String, Override> {
    live.into_iter()
        .map(|(name, o)| {
            let id = name
                .split_once('/')
                .map_or(name.clone(), |(_, id)| id.into());
            (id, o)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(id: &str, state: &str, tags: &[(&str, &str)]) -> InstanceResult {
        InstanceResult {
            instance_id: id.into(),
            state: state.into(),
            tags: tags
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    #[test]
    fn overrides_hold_their_instances_until_they_expire() {
        let fleet = [
            inst("i-web", "running", &[("Role", "web")]),
            inst("i-db7", "running", &[("Role", "db")]),
            inst("i-db8", "stopped", &[("Role", "db")]),
            inst("i-new", "pending", &[]),
        ];
        let keep_db7 = Override {
            instance_ids: Some(IdList(vec!["i-db7".into()])),
            tags: None,
            state: Held::Running,
            until: t("2026-12-11T17:00:00Z"), // Friday 18:00 Berlin
            reason: None,
        };
        let dbs_up = Override {
            instance_ids: None,
            tags: Some(TagSet([("Role".to_string(), "db".to_string())].into())),
            state: Held::Running,
            until: t("2026-12-05T00:00:00Z"),
            reason: None,
        };
        // Closed, no overrides: everything running stops; pending is left alone.
        assert_eq!(
            changes(&fleet, false, &[], t("2026-12-04T20:00:00Z")),
            Changes {
                start: vec![],
                stop: vec!["i-web".into(), "i-db7".into()]
            }
        );
        // Closed, db-7 kept running and every db held up until midnight: db-8 is started.
        let both = [keep_db7.clone(), dbs_up];
        assert_eq!(
            changes(&fleet, false, &both, t("2026-12-04T20:00:00Z")),
            Changes {
                start: vec!["i-db8".into()],
                stop: vec!["i-web".into()]
            }
        );
        // After midnight only db-7's override holds; after Friday 18:00 none does.
        assert_eq!(
            changes(&fleet, false, &both, t("2026-12-05T00:00:00Z")).stop,
            ["i-web"]
        );
        assert_eq!(
            changes(&fleet, false, &both, t("2026-12-11T17:00:00Z")).stop,
            ["i-web", "i-db7"]
        );
        // Open: the stopped one starts; a "stopped" override keeps web down.
        let web_down = Override {
            instance_ids: None,
            tags: Some(TagSet([("Role".to_string(), "web".to_string())].into())),
            state: Held::Stopped,
            until: t("2026-12-11T17:00:00Z"),
            reason: None,
        };
        assert_eq!(
            changes(&fleet, true, &[web_down], t("2026-12-07T08:00:00Z")),
            Changes {
                start: vec!["i-db8".into()],
                stop: vec!["i-web".into()]
            }
        );
    }
}

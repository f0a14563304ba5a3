//! Each instance action's planning as pure functions: given what the targets' describe found, the
//! action's typed params and the checkpoint an earlier attempt left, which instances to call for,
//! which to refuse, which to stop and start again. No EC2, no store, no clock: the executor applies
//! a plan (the thin, EC2-facing half, tested end to end against moto); the rules are unit-tested
//! here, one case per rule.

use std::collections::{BTreeMap, HashMap};

use ec2jobd_ec2::{Attribute, Protection};
use ec2jobd_spec::action::ModifyParams;
use ec2jobd_spec::{Action, InstanceResult, WaitUntil};

use super::checkpoint::Checkpoint;

/// States from which the action cannot do what it promises. Checked before any call, because EC2
/// does not always refuse (moto starts a terminated instance) and a wait would only time out.
pub(super) fn wrong_state(action: Action, state: &str) -> Option<&'static str> {
    let gone = matches!(state, "terminated" | "shutting-down");
    match action {
        Action::StartInstances | Action::StopInstances | Action::ModifyInstanceAttribute
            if gone =>
        {
            Some("it is terminated")
        }
        Action::RebootInstances if gone || matches!(state, "stopped" | "stopping") => {
            Some("only running instances can be rebooted")
        }
        _ => None,
    }
}

/// The targets the action cannot act on, each as `i-… is <state> (<why>)`.
pub(super) fn refused(action: Action, found: &[InstanceResult]) -> Vec<String> {
    found
        .iter()
        .filter_map(|i| {
            wrong_state(action, &i.state)
                .map(|why| format!("{} is {} ({why})", i.instance_id, i.state))
        })
        .collect()
}

/// Targets on their way to a state the action can act from, and the state to wait for first:
/// a start waits for `stopping` instances to be `stopped`; a stop, reboot or resize waits for
/// `pending` ones to be `running`; a resize also for `stopping` ones to be `stopped`. EC2 refuses
/// those calls (`IncorrectInstanceState`) until then; a wait is what the user meant. One state at
/// a time: the action looks again once they settled.
pub(super) fn unsettled(
    action: Action,
    found: &[InstanceResult],
) -> Option<(Vec<String>, WaitUntil)> {
    let waits = |from: &str| -> Vec<String> {
        found
            .iter()
            .filter(|i| i.state == from)
            .map(|i| i.instance_id.clone())
            .collect()
    };
    let order: &[(&str, WaitUntil)] = match action {
        Action::StartInstances => &[("stopping", WaitUntil::Stopped)],
        Action::StopInstances | Action::RebootInstances => &[("pending", WaitUntil::Running)],
        Action::ModifyInstanceAttribute => &[
            ("stopping", WaitUntil::Stopped),
            ("pending", WaitUntil::Running),
        ],
        _ => &[],
    };
    order.iter().find_map(|(from, until)| {
        let ids = waits(from);
        (!ids.is_empty()).then_some((ids, *until))
    })
}

/// States in which the action has nothing left to do for an instance.
pub(super) fn settled(action: Action, state: &str) -> bool {
    match action {
        Action::StartInstances => matches!(state, "running" | "pending"),
        Action::StopInstances => matches!(state, "stopped" | "stopping"),
        Action::TerminateInstances => matches!(state, "terminated" | "shutting-down"),
        _ => false,
    }
}

fn live(state: &str) -> bool {
    matches!(state, "running" | "pending")
}

/// What an instance action found and will call for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Targets {
    /// Every target, in describe order.
    pub ids: Vec<String>,
    /// Their states as found.
    pub before: HashMap<String, String>,
}

impl Targets {
    pub(super) fn of(found: &[InstanceResult]) -> Targets {
        Targets {
            ids: found.iter().map(|i| i.instance_id.clone()).collect(),
            before: found
                .iter()
                .map(|i| (i.instance_id.clone(), i.state.clone()))
                .collect(),
        }
    }

    fn is_live(&self, id: &str) -> bool {
        self.before.get(id).is_some_and(|s| live(s))
    }
}

/// The instances a start, stop, reboot, terminate or tag job calls for. A dry run asks for every
/// target (it is a permission check). Start, stop and terminate skip instances already in (or
/// moving to) the wanted state, so a resumed attempt observes instead of repeating; reboot and tag
/// calls, which leave nothing to observe, are not made again once an earlier attempt's checkpoint
/// says `called`.
pub(super) fn to_call(
    action: Action,
    t: &Targets,
    cp: Option<&Checkpoint>,
    dry_run: bool,
) -> Vec<String> {
    let called_before = matches!(cp, Some(Checkpoint::Called { .. }));
    match action {
        _ if dry_run => t.ids.clone(),
        Action::StartInstances | Action::StopInstances | Action::TerminateInstances => t
            .ids
            .iter()
            .filter(|id| !settled(action, &t.before[*id]))
            .cloned()
            .collect(),
        _ if called_before => Vec::new(),
        _ => t.ids.clone(),
    }
}

/// What a `modify_instance_attribute` job changes.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Modify {
    /// Instances whose type differs from the one asked for.
    pub resize: Vec<String>,
    /// Instances to start again after the change: running ones being resized, and those an
    /// earlier attempt had stopped (they no longer look running).
    pub restart: Vec<String>,
    /// Protections to set on every target.
    pub protections: Vec<Attribute>,
}

/// Plans a `modify_instance_attribute` job.
pub(super) fn modify(
    p: &ModifyParams,
    found: &[InstanceResult],
    t: &Targets,
    cp: Option<&Checkpoint>,
) -> Modify {
    let resize: Vec<String> = match p.instance_type.as_deref() {
        Some(want) => found
            .iter()
            .filter(|i| i.instance_type.as_deref() != Some(want))
            .map(|i| i.instance_id.clone())
            .collect(),
        None => Vec::new(),
    };
    let earlier = cp.map(Checkpoint::restart).unwrap_or_default();
    let restart = t
        .ids
        .iter()
        .filter(|id| earlier.contains(id) || (resize.contains(id) && t.is_live(id)))
        .cloned()
        .collect();
    let protections = [
        (p.termination_protection, Protection::Termination),
        (p.stop_protection, Protection::Stop),
    ]
    .into_iter()
    .filter_map(|(on, which)| Some(Attribute::Protection(which, on?)))
    .collect();
    Modify {
        resize,
        restart,
        protections,
    }
}

/// A `create_snapshots` job with `stop_first`: `(restart, to_stop)`. Instances with a volume
/// still to snapshot that are running are stopped; those and the ones an earlier attempt stopped
/// (`earlier`, from its checkpoint) are started again afterwards.
pub(super) fn stop_first(
    insts: &BTreeMap<String, InstanceResult>,
    needs_snapshot: impl Fn(&str) -> bool,
    earlier: &[String],
) -> (Vec<String>, Vec<String>) {
    let (mut restart, mut to_stop) = (Vec::new(), Vec::new());
    for (id, i) in insts {
        let stop = live(&i.state) && needs_snapshot(id);
        if stop {
            to_stop.push(id.clone());
        }
        if stop || earlier.contains(id) {
            restart.push(id.clone());
        }
    }
    (restart, to_stop)
}

/// Bulk waves: the instances of `todo` an earlier attempt has not yet handled, in waves of `size`.
pub(super) fn waves(
    todo: &[String],
    done: &[String],
    failed: &[(String, String)],
    size: usize,
) -> Vec<Vec<String>> {
    let pending: Vec<String> = todo
        .iter()
        .filter(|id| !done.contains(id) && !failed.iter().any(|(f, _)| f == *id))
        .cloned()
        .collect();
    pending.chunks(size.max(1)).map(<[_]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transitions_are_waited_through_one_state_at_a_time() {
        let found = [
            inst("i-1", "stopping"),
            inst("i-2", "pending"),
            inst("i-3", "running"),
            inst("i-4", "stopped"),
        ];
        let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            unsettled(Action::StartInstances, &found),
            Some((ids(&["i-1"]), WaitUntil::Stopped))
        );
        for a in [Action::StopInstances, Action::RebootInstances] {
            assert_eq!(
                unsettled(a, &found),
                Some((ids(&["i-2"]), WaitUntil::Running))
            );
        }
        assert_eq!(
            unsettled(Action::ModifyInstanceAttribute, &found),
            Some((ids(&["i-1"]), WaitUntil::Stopped))
        );
        assert_eq!(
            unsettled(Action::ModifyInstanceAttribute, &found[1..]),
            Some((ids(&["i-2"]), WaitUntil::Running))
        );
        assert_eq!(unsettled(Action::TerminateInstances, &found), None);
        assert_eq!(unsettled(Action::StartInstances, &found[1..]), None);
    }

    fn inst(id: &str, state: &str) -> InstanceResult {
        InstanceResult {
            instance_id: id.into(),
            state: state.into(),
            instance_type: Some("t3.micro".into()),
            ..Default::default()
        }
    }

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn called() -> Checkpoint {
        Checkpoint::Called {
            ids: ids(&["i-1"]),
            restart: Vec::new(),
        }
    }

    #[test]
    fn impossible_states_are_refused_before_any_call() {
        let found = [inst("i-1", "stopped"), inst("i-2", "terminated")];
        assert_eq!(
            refused(Action::RebootInstances, &found),
            [
                "i-1 is stopped (only running instances can be rebooted)",
                "i-2 is terminated (only running instances can be rebooted)"
            ]
        );
        assert_eq!(
            refused(Action::StartInstances, &found),
            ["i-2 is terminated (it is terminated)"]
        );
        assert!(refused(Action::TerminateInstances, &found).is_empty());
        assert!(refused(Action::CreateTags, &found).is_empty());
    }

    #[test]
    fn settled_instances_are_not_called_for_again() {
        let found = [
            inst("i-1", "stopped"),
            inst("i-2", "pending"),
            inst("i-3", "running"),
            inst("i-4", "stopping"),
        ];
        let t = Targets::of(&found);
        assert_eq!(
            to_call(Action::StartInstances, &t, None, false),
            ids(&["i-1", "i-4"])
        );
        assert_eq!(
            to_call(Action::StopInstances, &t, None, false),
            ids(&["i-2", "i-3"])
        );
        // A checkpoint does not matter where the state says it all.
        let cp = called();
        assert_eq!(
            to_call(Action::StartInstances, &t, Some(&cp), false),
            ids(&["i-1", "i-4"])
        );
        // A dry run asks for every target.
        assert_eq!(to_call(Action::StartInstances, &t, None, true).len(), 4);
    }

    #[test]
    fn reboots_and_tags_are_not_repeated_once_called() {
        let t = Targets::of(&[inst("i-1", "running")]);
        for action in [
            Action::RebootInstances,
            Action::CreateTags,
            Action::DeleteTags,
        ] {
            assert_eq!(to_call(action, &t, None, false), ids(&["i-1"]));
            assert!(to_call(action, &t, Some(&called()), false).is_empty());
            let calling = Checkpoint::Calling { ids: ids(&["i-1"]) };
            // Called or not is unknown: the call is made (reboot and tags are harmless twice).
            assert_eq!(to_call(action, &t, Some(&calling), false), ids(&["i-1"]));
        }
    }

    #[test]
    fn a_resize_restarts_running_instances_and_those_an_earlier_attempt_stopped() {
        let mut small = inst("i-3", "running");
        small.instance_type = Some("t3.small".into());
        let found = [inst("i-1", "running"), inst("i-2", "stopped"), small];
        let t = Targets::of(&found);
        let p = ModifyParams {
            instance_type: Some("t3.small".into()),
            stop_protection: Some(false),
            ..Default::default()
        };
        let m = modify(&p, &found, &t, None);
        assert_eq!(m.resize, ids(&["i-1", "i-2"]));
        assert_eq!(m.restart, ids(&["i-1"]));
        assert_eq!(
            m.protections,
            [Attribute::Protection(Protection::Stop, false)]
        );
        // Resumed after the stop: i-2 now looks stopped but the checkpoint says to restart it.
        let cp = Checkpoint::Resizing {
            restart: ids(&["i-2"]),
        };
        assert_eq!(
            modify(&p, &found, &t, Some(&cp)).restart,
            ids(&["i-1", "i-2"])
        );
        // Protections alone resize nothing.
        let p = ModifyParams {
            termination_protection: Some(true),
            ..Default::default()
        };
        let m = modify(&p, &found, &t, None);
        assert!(m.resize.is_empty() && m.restart.is_empty());
    }

    #[test]
    fn stop_first_stops_only_running_instances_with_volumes_left() {
        let insts: BTreeMap<String, InstanceResult> = [
            inst("i-1", "running"),
            inst("i-2", "running"),
            inst("i-3", "stopped"),
        ]
        .into_iter()
        .map(|i| (i.instance_id.clone(), i))
        .collect();
        // i-2's volumes are all made already; i-3 was stopped by an earlier attempt.
        let (restart, to_stop) = stop_first(&insts, |id| id != "i-2", &ids(&["i-3"]));
        assert_eq!(to_stop, ids(&["i-1"]));
        assert_eq!(restart, ids(&["i-1", "i-3"]));
    }

    #[test]
    fn waves_skip_what_an_earlier_attempt_handled() {
        let todo = ids(&["i-1", "i-2", "i-3", "i-4", "i-5"]);
        let failed = vec![("i-3".to_string(), "why".to_string())];
        let w = waves(&todo, &ids(&["i-1"]), &failed, 2);
        assert_eq!(w, [ids(&["i-2", "i-4"]), ids(&["i-5"])]);
        assert_eq!(waves(&todo, &[], &[], 0).len(), 5);
    }
}

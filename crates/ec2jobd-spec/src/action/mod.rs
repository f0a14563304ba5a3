//! What each action takes: one typed params struct per action, gathered in [`ActionSpec`].
//!
//! On the wire a job names its `action` and gives `params` as a JSON object; [`ActionSpec::parse`]
//! reads that object once, field by field through [`Params`], into the action's struct (one file
//! per action family, each with its own `parse`), and [`ActionSpec::params`] writes it back in the
//! same shape. Submission validates with it and stores the re-written object; workers decode the
//! stored object with the same `parse` and never read JSON by hand. This module knows nothing of
//! targets, waits or EC2 calls: only the parameters and their rules.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::spec::{is_aws_region, is_name, Action, SpecError};

mod audit;
mod copy;
mod image;
mod modify;
mod run;
mod snapshots;
mod stop;
mod tags;

pub use audit::{AuditParams, OnMissing};
pub use copy::CopyParams;
pub use image::{DeregisterParams, ImageParams};
pub use modify::ModifyParams;
pub use run::RunParams;
pub use snapshots::{BackupParams, SnapshotParams};
pub use stop::{StopParams, TerminateParams};
pub use tags::{CreateTagsParams, DeleteTagsParams};

/// An action with its typed parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ActionSpec {
    /// `describe_instances` (no params).
    DescribeInstances,
    /// `run_instances`.
    RunInstances(RunParams),
    /// `start_instances` (no params).
    StartInstances,
    /// `stop_instances`.
    StopInstances(StopParams),
    /// `reboot_instances` (no params).
    RebootInstances,
    /// `terminate_instances`.
    TerminateInstances(TerminateParams),
    /// `create_tags`.
    CreateTags(CreateTagsParams),
    /// `delete_tags`.
    DeleteTags(DeleteTagsParams),
    /// `modify_instance_attribute`.
    ModifyInstanceAttribute(ModifyParams),
    /// `audit_tags`.
    AuditTags(AuditParams),
    /// `create_snapshots`.
    CreateSnapshots(SnapshotParams),
    /// `describe_snapshots` (no params).
    DescribeSnapshots,
    /// `delete_snapshots` (no params).
    DeleteSnapshots,
    /// `copy_snapshot`.
    CopySnapshot(CopyParams),
    /// `create_image`.
    CreateImage(ImageParams),
    /// `deregister_image`.
    DeregisterImage(DeregisterParams),
    /// `copy_image`.
    CopyImage(CopyParams),
    /// `workflow`: its parameters are its `steps` (no params).
    Workflow,
}

impl ActionSpec {
    /// Reads `params` for `action`: every key known and well-formed, every required key there.
    /// Errors name the field as `params.<key>`.
    pub fn parse(action: Action, params: &Map<String, Value>) -> Result<ActionSpec, SpecError> {
        let mut p = Params::new(action, params);
        let spec = match action {
            Action::DescribeInstances => ActionSpec::DescribeInstances,
            Action::RunInstances => ActionSpec::RunInstances(RunParams::parse(&mut p)?),
            Action::StartInstances => ActionSpec::StartInstances,
            Action::StopInstances => ActionSpec::StopInstances(StopParams::parse(&mut p)?),
            Action::RebootInstances => ActionSpec::RebootInstances,
            Action::TerminateInstances => {
                ActionSpec::TerminateInstances(TerminateParams::parse(&mut p)?)
            }
            Action::CreateTags => ActionSpec::CreateTags(CreateTagsParams::parse(&mut p)?),
            Action::DeleteTags => ActionSpec::DeleteTags(DeleteTagsParams::parse(&mut p)?),
            Action::ModifyInstanceAttribute => {
                ActionSpec::ModifyInstanceAttribute(ModifyParams::parse(&mut p)?)
            }
            Action::AuditTags => ActionSpec::AuditTags(AuditParams::parse(&mut p)?),
            Action::CreateSnapshots => ActionSpec::CreateSnapshots(SnapshotParams::parse(&mut p)?),
            Action::DescribeSnapshots => ActionSpec::DescribeSnapshots,
            Action::DeleteSnapshots => ActionSpec::DeleteSnapshots,
            Action::CopySnapshot => ActionSpec::CopySnapshot(CopyParams::parse(&mut p, false)?),
            Action::CreateImage => ActionSpec::CreateImage(ImageParams::parse(&mut p)?),
            Action::DeregisterImage => {
                ActionSpec::DeregisterImage(DeregisterParams::parse(&mut p)?)
            }
            Action::CopyImage => ActionSpec::CopyImage(CopyParams::parse(&mut p, true)?),
            Action::Workflow => ActionSpec::Workflow,
        };
        p.check_unknown()?;
        spec.check()?;
        Ok(spec)
    }

    /// The action this is.
    pub fn action(&self) -> Action {
        match self {
            ActionSpec::DescribeInstances => Action::DescribeInstances,
            ActionSpec::RunInstances(_) => Action::RunInstances,
            ActionSpec::StartInstances => Action::StartInstances,
            ActionSpec::StopInstances(_) => Action::StopInstances,
            ActionSpec::RebootInstances => Action::RebootInstances,
            ActionSpec::TerminateInstances(_) => Action::TerminateInstances,
            ActionSpec::CreateTags(_) => Action::CreateTags,
            ActionSpec::DeleteTags(_) => Action::DeleteTags,
            ActionSpec::ModifyInstanceAttribute(_) => Action::ModifyInstanceAttribute,
            ActionSpec::AuditTags(_) => Action::AuditTags,
            ActionSpec::CreateSnapshots(_) => Action::CreateSnapshots,
            ActionSpec::DescribeSnapshots => Action::DescribeSnapshots,
            ActionSpec::DeleteSnapshots => Action::DeleteSnapshots,
            ActionSpec::CopySnapshot(_) => Action::CopySnapshot,
            ActionSpec::CreateImage(_) => Action::CreateImage,
            ActionSpec::DeregisterImage(_) => Action::DeregisterImage,
            ActionSpec::CopyImage(_) => Action::CopyImage,
            ActionSpec::Workflow => Action::Workflow,
        }
    }

    /// The parameters as the JSON object a job stores and shows (the wire shape `parse` reads).
    pub fn params(&self) -> Map<String, Value> {
        let v = match self {
            ActionSpec::DescribeInstances
            | ActionSpec::StartInstances
            | ActionSpec::RebootInstances
            | ActionSpec::DescribeSnapshots
            | ActionSpec::DeleteSnapshots
            | ActionSpec::Workflow => return Map::new(),
            ActionSpec::RunInstances(p) => serde_json::to_value(p),
            ActionSpec::StopInstances(p) => serde_json::to_value(p),
            ActionSpec::TerminateInstances(p) => serde_json::to_value(p),
            ActionSpec::CreateTags(p) => serde_json::to_value(p),
            ActionSpec::DeleteTags(p) => serde_json::to_value(p),
            ActionSpec::ModifyInstanceAttribute(p) => serde_json::to_value(p),
            ActionSpec::AuditTags(p) => serde_json::to_value(p),
            ActionSpec::CreateSnapshots(p) => serde_json::to_value(p),
            ActionSpec::CopySnapshot(p) | ActionSpec::CopyImage(p) => serde_json::to_value(p),
            ActionSpec::CreateImage(p) => serde_json::to_value(p),
            ActionSpec::DeregisterImage(p) => serde_json::to_value(p),
        };
        match v {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        }
    }

    /// Rules across fields, checked after every field was read.
    fn check(&self) -> Result<(), SpecError> {
        match self {
            ActionSpec::RunInstances(p) => p.check(),
            ActionSpec::DeleteTags(p) => p.check(),
            ActionSpec::ModifyInstanceAttribute(p) => p.check(),
            _ => Ok(()),
        }
    }

    /// The instance type the job asks for (`run_instances`, `modify_instance_attribute`).
    pub fn instance_type(&self) -> Option<&str> {
        match self {
            ActionSpec::RunInstances(p) => Some(&p.instance_type),
            ActionSpec::ModifyInstanceAttribute(p) => p.instance_type.as_deref(),
            _ => None,
        }
    }

    /// The AMI the job launches (`run_instances`).
    pub fn image_id(&self) -> Option<&str> {
        match self {
            ActionSpec::RunInstances(p) => Some(&p.image_id),
            _ => None,
        }
    }

    /// The number of generations a backup action keeps, when it rotates.
    pub fn keep(&self) -> Option<u32> {
        match self {
            ActionSpec::CreateSnapshots(p) => p.backup.keep,
            ActionSpec::CreateImage(p) => p.backup.keep,
            _ => None,
        }
    }
}

/// A cursor over a job's `params` object, in the manner of a command parser: each action's
/// `parse` takes the keys it knows, each read checks that key's shape, and [`Params::check_unknown`]
/// refuses whatever was left (a key the action does not take).
pub(crate) struct Params<'a> {
    action: Action,
    map: &'a Map<String, Value>,
    taken: Vec<&'a str>,
}

/// Longest string a parameter may be (user data, descriptions).
const MAX_PARAM_LEN: usize = 16 * 1024;

impl<'a> Params<'a> {
    fn new(action: Action, map: &'a Map<String, Value>) -> Self {
        Params {
            action,
            map,
            taken: Vec::new(),
        }
    }

    fn take(&mut self, key: &'static str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.taken.push(k.as_str());
        Some(v)
    }

    /// Reads `key` with `read`, which says whether the value has the shape described by `want`.
    fn read<T>(
        &mut self,
        key: &'static str,
        want: &str,
        read: impl FnOnce(&'a Value) -> Option<T>,
    ) -> Result<Option<T>, SpecError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => read(v)
                .map(Some)
                .ok_or_else(|| invalid(key, format!("must be {want}"))),
        }
    }

    /// `true` or `false`.
    pub(crate) fn bool(&mut self, key: &'static str) -> Result<Option<bool>, SpecError> {
        self.read(key, "true or false", Value::as_bool)
    }

    /// A non-empty string of at most 16 KiB.
    pub(crate) fn str(&mut self, key: &'static str) -> Result<Option<String>, SpecError> {
        self.read(key, "a non-empty string", |v| {
            v.as_str()
                .filter(|s| !s.is_empty() && s.len() <= MAX_PARAM_LEN)
                .map(String::from)
        })
    }

    /// A non-empty list of non-empty strings.
    pub(crate) fn str_list(&mut self, key: &'static str) -> Result<Option<Vec<String>>, SpecError> {
        self.read(key, "a non-empty list of non-empty strings", |v| {
            let a = v.as_array().filter(|a| !a.is_empty())?;
            a.iter()
                .map(|k| k.as_str().filter(|k| !k.is_empty()).map(String::from))
                .collect()
        })
    }

    /// A non-empty object of tag key (1-128 characters) to string value (at most 256).
    pub(crate) fn tags(
        &mut self,
        key: &'static str,
    ) -> Result<Option<BTreeMap<String, String>>, SpecError> {
        self.read(
            key,
            "a non-empty object of tag key (1-128 characters) to string value (at most 256)",
            |v| {
                let m = v.as_object().filter(|m| !m.is_empty())?;
                m.iter()
                    .map(|(k, v)| {
                        let v = v.as_str().filter(|v| v.chars().count() <= 256)?;
                        (!k.is_empty() && k.chars().count() <= 128)
                            .then(|| (k.clone(), v.to_string()))
                    })
                    .collect()
            },
        )
    }

    /// A whole number from 1 to 1000.
    pub(crate) fn count(&mut self, key: &'static str) -> Result<Option<u32>, SpecError> {
        self.read(key, "a whole number from 1 to 1000", |v| {
            v.as_u64()
                .filter(|n| (1..=1000).contains(n))
                .map(|n| n as u32)
        })
    }

    /// 1-64 letters, digits, `-`, `_` or `.`.
    pub(crate) fn name(&mut self, key: &'static str) -> Result<Option<String>, SpecError> {
        self.read(key, "1-64 letters, digits, `-`, `_` or `.`", |v| {
            v.as_str().filter(|s| is_name(s, b"-_.")).map(String::from)
        })
    }

    /// A region name like `eu-west-1`.
    pub(crate) fn region(&mut self, key: &'static str) -> Result<Option<String>, SpecError> {
        self.read(key, "a region name like `eu-west-1`", |v| {
            v.as_str().filter(|s| is_aws_region(s)).map(String::from)
        })
    }

    /// `value` when present, else a `missing_param` error naming `key`. Called after every read
    /// of the action: a key no read took is reported first (`imageid` is why `image_id` is
    /// missing).
    pub(crate) fn required<T>(&self, key: &'static str, value: Option<T>) -> Result<T, SpecError> {
        match value {
            Some(v) => Ok(v),
            None => {
                self.check_unknown()?;
                Err(SpecError::new(
                    format!("params.{key}"),
                    "missing_param",
                    format!("{} needs `params.{key}`", self.action),
                ))
            }
        }
    }

    /// Refuses the first key no read took.
    fn check_unknown(&self) -> Result<(), SpecError> {
        match self.map.keys().find(|k| !self.taken.contains(&k.as_str())) {
            None => Ok(()),
            Some(key) => Err(SpecError::new(
                format!("params.{key}"),
                "unknown_param",
                format!("`{}` takes no parameter `{key}`", self.action),
            )),
        }
    }
}

/// An `invalid_param` error for `params.<key>`.
pub(crate) fn invalid(key: &str, message: impl Into<String>) -> SpecError {
    SpecError::new(format!("params.{key}"), "invalid_param", message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(action: Action, v: Value) -> Result<ActionSpec, SpecError> {
        let Value::Object(m) = v else {
            panic!("not an object")
        };
        ActionSpec::parse(action, &m)
    }

    #[test]
    fn params_round_trip_in_their_wire_shape() {
        let cases = [
            (
                Action::RunInstances,
                json!({"image_id": "ami-1", "instance_type": "t3.micro", "min_count": 2,
                       "security_group_ids": ["sg-1"], "tags": {"a": "b"},
                       "termination_protection": false}),
            ),
            (Action::StopInstances, json!({"force": true})),
            (Action::TerminateInstances, json!({})),
            (
                Action::DeleteTags,
                json!({"keys": ["a"], "tags": {"b": "c"}}),
            ),
            (
                Action::ModifyInstanceAttribute,
                json!({"stop_protection": false}),
            ),
            (
                Action::AuditTags,
                json!({"required_keys": ["Owner"], "on_missing": "warn"}),
            ),
            (
                Action::CreateSnapshots,
                json!({"keep": 3, "group": "daily", "devices": ["/dev/xvda"],
                       "description": "{name} {date}", "stop_first": true}),
            ),
            (
                Action::CopyImage,
                json!({"destination_region": "eu-west-1", "name": "x"}),
            ),
            (
                Action::CreateImage,
                json!({"name": "web-{timestamp}", "no_reboot": true}),
            ),
            (Action::DeregisterImage, json!({"delete_snapshots": true})),
        ];
        for (action, v) in cases {
            let spec = parse(action, v.clone()).unwrap();
            assert_eq!(spec.action(), action);
            assert_eq!(Value::Object(spec.params()), v, "{action}");
        }
    }

    #[test]
    fn each_rule_names_its_field() {
        let err = |a, v| {
            let e = parse(a, v).unwrap_err();
            (e.field, e.code)
        };
        let f = |s: &str, c| (s.to_string(), c);
        assert_eq!(
            err(Action::StartInstances, json!({"force": true})),
            f("params.force", "unknown_param")
        );
        assert_eq!(
            err(Action::StopInstances, json!({"force": "yes"})),
            f("params.force", "invalid_param")
        );
        assert_eq!(
            err(Action::RunInstances, json!({"instance_type": "t3.micro"})),
            f("params.image_id", "missing_param")
        );
        assert_eq!(
            err(
                Action::RunInstances,
                json!({"image_id": "x", "instance_type": "t3.micro"})
            ),
            f("params.image_id", "invalid_param")
        );
        assert_eq!(
            err(
                Action::RunInstances,
                json!({"image_id": "ami-1", "instance_type": "t", "min_count": 3, "max_count": 2})
            ),
            f("params.max_count", "invalid_param")
        );
        assert_eq!(
            err(
                Action::RunInstances,
                json!({"imageid": "ami-1", "instance_type": "t"})
            ),
            f("params.imageid", "unknown_param")
        );
        assert_eq!(
            err(Action::DeleteTags, json!({})),
            f("params.keys", "missing_param")
        );
        assert_eq!(
            err(Action::ModifyInstanceAttribute, json!({})),
            f("params", "missing_param")
        );
        assert_eq!(
            err(
                Action::AuditTags,
                json!({"required_keys": ["a"], "on_missing": "shout"})
            ),
            f("params.on_missing", "invalid_param")
        );
        assert_eq!(
            err(Action::CreateImage, json!({"name": "web"})),
            f("params.name", "invalid_param")
        );
        assert_eq!(
            err(Action::CreateSnapshots, json!({"description": "{nope}"})),
            f("params.description", "invalid_param")
        );
        assert_eq!(
            err(Action::CopySnapshot, json!({"destination_region": "mars"})),
            f("params.destination_region", "invalid_param")
        );
        assert_eq!(
            err(
                Action::CopySnapshot,
                json!({"destination_region": "eu-west-1", "name": "n"})
            ),
            f("params.name", "unknown_param")
        );
        assert_eq!(
            err(Action::CreateTags, json!({"tags": {"k": 5}})),
            f("params.tags", "invalid_param")
        );
        assert_eq!(
            err(Action::CreateSnapshots, json!({"keep": 0})),
            f("params.keep", "invalid_param")
        );
    }

    #[test]
    fn defaults_are_read_where_they_are_used() {
        let Ok(ActionSpec::RunInstances(p)) = parse(
            Action::RunInstances,
            json!({"image_id": "ami-1", "instance_type": "t3.micro", "min_count": 2}),
        ) else {
            panic!("not run_instances")
        };
        assert_eq!(p.counts(), (2, 2));
        let Ok(ActionSpec::AuditTags(p)) =
            parse(Action::AuditTags, json!({"required_keys": ["a"]}))
        else {
            panic!("not audit_tags")
        };
        assert_eq!(p.on_missing(), OnMissing::Fail);
    }
}

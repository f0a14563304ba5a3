//! `run_instances` params: what to launch, how many, where, and how it is tagged.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{invalid, Params};
use crate::spec::SpecError;

/// `run_instances`: `image_id` and `instance_type` are required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RunParams {
    /// The AMI (`ami-…`).
    pub image_id: String,
    /// The instance type.
    pub instance_type: String,
    /// Fewest instances to launch (default 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_count: Option<u32>,
    /// Most instances to launch (default `min_count`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_count: Option<u32>,
    /// Key pair.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// Subnet.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subnet_id: Option<String>,
    /// Security groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security_group_ids: Option<Vec<String>>,
    /// Availability zone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    /// User data (secret: redacted wherever the spec is shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_data: Option<String>,
    /// Instance profile name or ARN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iam_instance_profile: Option<String>,
    /// Tags for the instances (the job id tag is added).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// Launch with termination protection on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub termination_protection: Option<bool>,
    /// Instance types to try in order when EC2 has no capacity for `instance_type`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_instance_types: Option<Vec<String>>,
    /// Subnets to try in order when EC2 has no capacity in `subnet_id` (the default subnet when
    /// that is absent), each with every instance type before the next type is tried.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_subnets: Option<Vec<String>>,
}

/// Most fallbacks of one kind: each is a RunInstances call while EC2 has no capacity.
const MAX_FALLBACKS: usize = 5;

impl RunParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        let image_id = p.str("image_id")?;
        let instance_type = p.str("instance_type")?;
        let run = RunParams {
            min_count: p.count("min_count")?,
            max_count: p.count("max_count")?,
            key_name: p.str("key_name")?,
            subnet_id: p.str("subnet_id")?,
            security_group_ids: p.str_list("security_group_ids")?,
            availability_zone: p.str("availability_zone")?,
            user_data: p.str("user_data")?,
            iam_instance_profile: p.str("iam_instance_profile")?,
            tags: p.tags("tags")?,
            termination_protection: p.bool("termination_protection")?,
            fallback_instance_types: p.str_list("fallback_instance_types")?,
            fallback_subnets: p.str_list("fallback_subnets")?,
            image_id: String::new(),
            instance_type: String::new(),
        };
        Ok(RunParams {
            image_id: p.required("image_id", image_id)?,
            instance_type: p.required("instance_type", instance_type)?,
            ..run
        })
    }

    pub(crate) fn check(&self) -> Result<(), SpecError> {
        if !self.image_id.starts_with("ami-") {
            return Err(invalid(
                "image_id",
                format!("`{}` is not an AMI id (ami-…)", self.image_id),
            ));
        }
        let (min, max) = self.counts();
        if max < min {
            return Err(invalid("max_count", "must be at least min_count"));
        }
        for (field, list) in [
            ("fallback_instance_types", &self.fallback_instance_types),
            ("fallback_subnets", &self.fallback_subnets),
        ] {
            if list.as_ref().is_some_and(|l| l.len() > MAX_FALLBACKS) {
                return Err(invalid(
                    field,
                    format!("at most {MAX_FALLBACKS} fallbacks, each a launch attempt"),
                ));
            }
        }
        if self.fallback_subnets.is_some() && self.availability_zone.is_some() {
            return Err(invalid(
                "fallback_subnets",
                "a subnet fixes the availability zone: leave availability_zone out",
            ));
        }
        Ok(())
    }

    /// What to launch, in the order tried while EC2 has no capacity: the instance type with the
    /// subnet, then the fallback subnets, then each fallback type with every subnet.
    pub fn placements(&self) -> Vec<(String, Option<String>)> {
        let types = std::iter::once(&self.instance_type)
            .chain(self.fallback_instance_types.iter().flatten());
        let subnets: Vec<Option<String>> = std::iter::once(self.subnet_id.clone())
            .chain(self.fallback_subnets.iter().flatten().cloned().map(Some))
            .collect();
        types
            .flat_map(|t| subnets.iter().map(move |s| (t.clone(), s.clone())))
            .collect()
    }

    /// `min_count` (default 1) and `max_count` (default `min_count`).
    pub fn counts(&self) -> (u32, u32) {
        let min = self.min_count.unwrap_or(1);
        (min, self.max_count.unwrap_or(min))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::RunParams;
    use crate::action::ActionSpec;
    use crate::spec::{Action, SpecError};

    fn run(params: Value) -> Result<RunParams, SpecError> {
        let Value::Object(m) = params else {
            panic!("not an object")
        };
        match ActionSpec::parse(Action::RunInstances, &m)? {
            ActionSpec::RunInstances(p) => Ok(p),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn placements_try_every_subnet_of_a_type_before_the_next_type() {
        let p = run(json!({"image_id": "ami-1", "instance_type": "t3.micro",
            "subnet_id": "subnet-a", "fallback_subnets": ["subnet-b"],
            "fallback_instance_types": ["t3.small"]}))
        .unwrap();
        let s = |x: &str| Some(x.to_string());
        assert_eq!(
            p.placements(),
            vec![
                ("t3.micro".into(), s("subnet-a")),
                ("t3.micro".into(), s("subnet-b")),
                ("t3.small".into(), s("subnet-a")),
                ("t3.small".into(), s("subnet-b")),
            ]
        );
        let p = run(json!({"image_id": "ami-1", "instance_type": "t3.micro"})).unwrap();
        assert_eq!(p.placements(), vec![("t3.micro".into(), None)]);
    }

    #[test]
    fn fallbacks_are_bounded_and_subnets_exclude_a_zone() {
        let e = run(json!({"image_id": "ami-1", "instance_type": "t3.micro",
            "fallback_instance_types": ["a", "b", "c", "d", "e", "f"]}))
        .unwrap_err();
        assert_eq!(e.field, "params.fallback_instance_types");
        let e = run(json!({"image_id": "ami-1", "instance_type": "t3.micro",
            "availability_zone": "eu-west-1a", "fallback_subnets": ["subnet-b"]}))
        .unwrap_err();
        assert_eq!(e.field, "params.fallback_subnets");
        let e = run(json!({"image_id": "ami-1", "instance_type": "t3.micro",
            "fallback_subnets": []}))
        .unwrap_err();
        assert_eq!(e.field, "params.fallback_subnets");
    }
}

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
}

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
        Ok(())
    }

    /// `min_count` (default 1) and `max_count` (default `min_count`).
    pub fn counts(&self) -> (u32, u32) {
        let min = self.min_count.unwrap_or(1);
        (min, self.max_count.unwrap_or(min))
    }
}

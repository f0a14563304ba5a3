//! `create_image` and `deregister_image` params.

use serde::Serialize;

use super::{invalid, BackupParams, Params};
use crate::spec::{check_template, SpecError};

/// `create_image`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ImageParams {
    /// AMI name template; must hold `{timestamp}` or `{job_id}` (AMI names are unique).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Description template.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Image without rebooting the instance.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_reboot: Option<bool>,
    /// Tags, their copying, and rotation.
    #[serde(flatten)]
    pub backup: BackupParams,
}

impl ImageParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        let s = ImageParams {
            name: p.str("name")?,
            description: p.str("description")?,
            no_reboot: p.bool("no_reboot")?,
            backup: BackupParams::parse(p)?,
        };
        if let Some(t) = &s.description {
            check_template("params.description", t)?;
        }
        if let Some(t) = &s.name {
            check_template("params.name", t)?;
            if !t.contains("{timestamp}") && !t.contains("{job_id}") {
                return Err(invalid(
                    "name",
                    "AMI names must be unique: include `{timestamp}` or `{job_id}`",
                ));
            }
        }
        Ok(s)
    }
}

/// `deregister_image`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeregisterParams {
    /// Also delete the AMIs' EBS snapshots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delete_snapshots: Option<bool>,
}

impl DeregisterParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        Ok(DeregisterParams {
            delete_snapshots: p.bool("delete_snapshots")?,
        })
    }
}

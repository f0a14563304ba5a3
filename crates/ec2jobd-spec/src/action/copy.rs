//! `copy_snapshot` and `copy_image` params: where to copy and how the copy is encrypted, named and
//! tagged (only an AMI copy has a `name`).

use std::collections::BTreeMap;

use serde::Serialize;

use super::Params;
use crate::spec::{check_template, SpecError};

/// `copy_snapshot`, `copy_image`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopyParams {
    /// The region the copies go to.
    pub destination_region: String,
    /// Name template of an AMI copy (`copy_image` only): `{name}` is the source AMI's name;
    /// `{job_id}`, `{date}`, `{datetime}`, `{timestamp}` as for backups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Description template of the copies (`{name}`: the source's name or description).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Encrypt the copies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encrypted: Option<bool>,
    /// KMS key for the encrypted copies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kms_key_id: Option<String>,
    /// Tags for the copies.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
}

impl CopyParams {
    /// `named`: whether the action takes `name` (AMI copies).
    pub(crate) fn parse(p: &mut Params, named: bool) -> Result<Self, SpecError> {
        let destination_region = p.region("destination_region")?;
        let name = if named { p.str("name")? } else { None };
        let c = CopyParams {
            name,
            description: p.str("description")?,
            encrypted: p.bool("encrypted")?,
            kms_key_id: p.str("kms_key_id")?,
            tags: p.tags("tags")?,
            destination_region: p.required("destination_region", destination_region)?,
        };
        for (field, t) in [
            ("params.name", &c.name),
            ("params.description", &c.description),
        ] {
            if let Some(t) = t {
                check_template(field, t)?;
            }
        }
        Ok(c)
    }
}

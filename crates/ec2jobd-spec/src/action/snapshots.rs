//! `create_snapshots` params: naming, tagging, rotation and the optional stop around the snapshot.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Params;
use crate::spec::{check_template, SpecError};

/// `create_snapshots`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SnapshotParams {
    /// Description template (placeholders as for backup names).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Tags, their copying, and rotation.
    #[serde(flatten)]
    pub backup: BackupParams,
    /// Only volumes attached at these device names.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<String>>,
    /// Stop running instances first (a consistent snapshot), start them again after.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_first: Option<bool>,
}

impl SnapshotParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        let s = SnapshotParams {
            description: p.str("description")?,
            backup: BackupParams::parse(p)?,
            devices: p.str_list("devices")?,
            stop_first: p.bool("stop_first")?,
        };
        if let Some(t) = &s.description {
            check_template("params.description", t)?;
        }
        Ok(s)
    }
}

/// What `create_snapshots` and `create_image` share: tags for what they make, and its rotation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BackupParams {
    /// Tags for what is made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
    /// Copy the source's tags (the volume's instance, the imaged instance) onto what is made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy_tags: Option<bool>,
    /// Generations to keep per source and group (no rotation when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep: Option<u32>,
    /// Rotation group (default `default`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl BackupParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        Ok(BackupParams {
            tags: p.tags("tags")?,
            copy_tags: p.bool("copy_tags")?,
            keep: p.count("keep")?,
            group: p.name("group")?,
        })
    }

    /// The rotation group, `default` when absent.
    pub fn group(&self) -> &str {
        self.group.as_deref().unwrap_or("default")
    }
}

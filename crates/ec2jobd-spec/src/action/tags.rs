//! `create_tags` and `delete_tags` params: which tags to put or remove.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Params;
use crate::spec::SpecError;

/// `create_tags`: the tags to add or overwrite.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CreateTagsParams {
    /// Key to value.
    pub tags: BTreeMap<String, String>,
}

impl CreateTagsParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        let tags = p.tags("tags")?;
        Ok(CreateTagsParams {
            tags: p.required("tags", tags)?,
        })
    }
}

/// `delete_tags`: keys to remove whatever their value, and tags to remove only with that value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DeleteTagsParams {
    /// Keys removed whatever their value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys: Option<Vec<String>>,
    /// Tags removed only where the value matches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
}

impl DeleteTagsParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        Ok(DeleteTagsParams {
            keys: p.str_list("keys")?,
            tags: p.tags("tags")?,
        })
    }

    pub(crate) fn check(&self) -> Result<(), SpecError> {
        if self.keys.is_none() && self.tags.is_none() {
            return Err(SpecError::new(
                "params.keys",
                "missing_param",
                "delete_tags needs `params.keys` (or `params.tags`)",
            ));
        }
        Ok(())
    }
}

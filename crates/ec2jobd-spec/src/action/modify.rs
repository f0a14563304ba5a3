//! `modify_instance_attribute` params: a new instance type and/or protections.

use serde::Serialize;

use super::Params;
use crate::spec::SpecError;

/// `modify_instance_attribute`: at least one of the three.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ModifyParams {
    /// The type to resize to (a running instance is stopped, changed and started again).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Turn termination protection on or off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub termination_protection: Option<bool>,
    /// Turn stop protection on or off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_protection: Option<bool>,
}

impl ModifyParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        Ok(ModifyParams {
            instance_type: p.str("instance_type")?,
            termination_protection: p.bool("termination_protection")?,
            stop_protection: p.bool("stop_protection")?,
        })
    }

    pub(crate) fn check(&self) -> Result<(), SpecError> {
        if self == &ModifyParams::default() {
            return Err(SpecError::new(
                "params",
                "missing_param",
                "modify_instance_attribute needs at least one of `params.instance_type`, \
                 `params.termination_protection`, `params.stop_protection`",
            ));
        }
        Ok(())
    }
}

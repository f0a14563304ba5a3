//! `stop_instances` and `terminate_instances` params: how hard to stop.

use serde::Serialize;

use super::Params;
use crate::spec::SpecError;

/// `stop_instances`: `force` (skip the OS shutdown) and `hibernate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StopParams {
    /// Stop without a clean OS shutdown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    /// Hibernate instead of stop (the instance must be enabled for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hibernate: Option<bool>,
}

impl StopParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        Ok(StopParams {
            force: p.bool("force")?,
            hibernate: p.bool("hibernate")?,
        })
    }

    /// `force`, false when absent.
    pub fn force(&self) -> bool {
        self.force.unwrap_or(false)
    }

    /// `hibernate`, false when absent.
    pub fn hibernate(&self) -> bool {
        self.hibernate.unwrap_or(false)
    }
}

/// `terminate_instances`: `force` also turns termination protection off first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TerminateParams {
    /// Turn off termination protection on the targets before terminating them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
}

impl TerminateParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        Ok(TerminateParams {
            force: p.bool("force")?,
        })
    }

    /// `force`, false when absent.
    pub fn force(&self) -> bool {
        self.force.unwrap_or(false)
    }
}

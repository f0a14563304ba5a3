//! `stop_instances` and `terminate_instances` params: how hard to stop.

use serde::Serialize;

use super::Params;
use crate::spec::SpecError;

/// `stop_instances`: `force` (skip the OS shutdown), `hibernate`, and `fallback_to_stop` (with
/// `hibernate`: instances that cannot hibernate are stopped instead of failing the job).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StopParams {
    /// Stop without a clean OS shutdown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub force: Option<bool>,
    /// Hibernate instead of stop (the instance must be enabled for it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hibernate: Option<bool>,
    /// With `hibernate`: stop the instances EC2 will not hibernate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fallback_to_stop: Option<bool>,
}

impl StopParams {
    pub(crate) fn parse(p: &mut Params) -> Result<Self, SpecError> {
        Ok(StopParams {
            force: p.bool("force")?,
            hibernate: p.bool("hibernate")?,
            fallback_to_stop: p.bool("fallback_to_stop")?,
        })
    }

    /// `fallback_to_stop`, false when absent.
    pub fn fallback_to_stop(&self) -> bool {
        self.fallback_to_stop.unwrap_or(false)
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

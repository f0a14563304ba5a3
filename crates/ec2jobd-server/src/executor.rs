//! The executor that runs jobs against EC2 through the driver crate. One function per action; each
//! checks for cancellation at its boundaries and turns driver errors into job errors that keep the
//! AWS code and request id.

use std::sync::Arc;

use async_trait::async_trait;
use ec2jobd_ec2::{Ec2Error, Ec2Pool};
use ec2jobd_spec::{Action, JobError, JobResults};

use crate::runner::{ExecCtx, ExecError, Executor};

/// Runs EC2 jobs.
pub struct Ec2Executor {
    pool: Arc<Ec2Pool>,
}

impl Ec2Executor {
    /// An executor over the configured accounts.
    pub fn new(pool: Arc<Ec2Pool>) -> Self {
        Self { pool }
    }
}

fn failed(e: Ec2Error, results: JobResults) -> ExecError {
    ExecError::Failed {
        error: JobError {
            code: e.code,
            message: e.message,
            request_id: e.request_id,
        },
        transient: e.transient,
        results,
    }
}

#[async_trait]
impl Executor for Ec2Executor {
    async fn execute(&self, ctx: &ExecCtx) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        // Account and region are filled in at submission; these fallbacks only guard old rows.
        let account = spec.account.as_deref().unwrap_or("default");
        let region = spec.region.as_deref().unwrap_or("us-east-1");
        let ec2 = self
            .pool
            .get(account, region)
            .await
            .map_err(|e| failed(e, JobResults::default()))?;
        match spec.action {
            Action::DescribeInstances => {
                let mut results = JobResults::default();
                ctx.check_cancel(&results)?;
                ctx.progress(
                    "calling",
                    &format!("DescribeInstances in {account}/{region}"),
                    None,
                    None,
                )
                .await?;
                let d = tokio::select! {
                    r = ec2.describe_instances(&spec.targets, spec.dry_run) => r,
                    _ = ctx.cancelled() => return Err(ExecError::Cancelled(results)),
                }
                .map_err(|e| failed(e, JobResults::default()))?;
                results.request_ids = d.request_ids;
                if d.dry_run_ok {
                    results.summary = Some("dry run: DescribeInstances would succeed".into());
                    return Ok(results);
                }
                let n = d.instances.len() as u64;
                results.instances = d.instances;
                if n == 0 && !spec.allow_empty {
                    return Err(ExecError::Failed {
                        error: JobError {
                            code: "NoTargets".into(),
                            message:
                                "no instance matches the targets (set allow_empty to accept that)"
                                    .into(),
                            request_id: None,
                        },
                        transient: false,
                        results,
                    });
                }
                ctx.progress(
                    "done",
                    &format!("described {n} instances"),
                    Some(n),
                    Some(n),
                )
                .await?;
                results.summary = Some(format!(
                    "described {n} instance{}",
                    if n == 1 { "" } else { "s" }
                ));
                Ok(results)
            }
        }
    }
}

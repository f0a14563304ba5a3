//! Waiting until the snapshots or AMIs a backup or copy made are ready, the same way instance
//! waits are: parked without a worker when the job may park, judged by the parking lot in place
//! otherwise (workflow steps), in both cases from the account+region's shared rounds (⌈N/200⌉
//! DescribeSnapshots or DescribeImages calls per round for every job's N ids together).
//!
//! What the action finishes with afterwards (rotation, results, summary) is an
//! [`AfterReady`] checkpoint, so a parked job resumes straight into its finish; one whose lot
//! died runs again from the start, which finds what it made by its tags (and what rotation
//! removed meanwhile, by this checkpoint) and waits again. The finishes themselves live with their actions (`backup.rs`,
//! `images.rs`); this file only waits and dispatches. Must not call EC2 itself.

// `ExecError` is large by design (see runner.rs).
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use ec2jobd_ec2::{Ec2, Watched};
use ec2jobd_spec::action::BackupParams;
use ec2jobd_spec::{JobResults, WaitUntil};

use super::checkpoint::{AfterReady, Checkpoint, ReadyMade};
use super::images::finish_copies;
use super::{bound_by_attempt, Ec2Executor};
use crate::parking::{Wait, WaitOutcome};
use crate::runner::{ExecCtx, ExecError};

impl Ec2Executor {
    /// The wait for `labels`' ids (snapshots or AMIs by `kind`, in `region`; each with how it
    /// reads in messages) to be ready, with the job's timeout and interval. Empty when the job
    /// does not wait for `completed`.
    pub(super) fn ready_wait(
        &self,
        ctx: &ExecCtx,
        region: &str,
        kind: Watched,
        labels: BTreeMap<String, String>,
    ) -> Wait {
        let account = ctx.job.spec.account.as_deref().unwrap_or("default");
        let labels = match ctx.job.spec.wait_settings().0 {
            WaitUntil::Completed => labels,
            _ => BTreeMap::new(),
        };
        let ids = labels.keys().cloned().collect();
        let mut wait = self.new_wait(ctx, (account, region), (kind, ids), self.lot.now_ms());
        wait.labels = labels.into_iter().filter(|(id, l)| id != l).collect();
        // Snapshots and AMIs waited for are the job's own: EC2 may not know them everywhere yet.
        wait.unknown_grace_ms = self.settings.consistency_timeout.as_millis() as u64;
        wait
    }

    /// Waits for `after.wait` (parked when the job may park: `Err(Park)`), then finishes the
    /// action. `backup`: the job's backup params (rotation), for snapshots and AMIs.
    pub(super) async fn ready_and_finish(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        backup: Option<&BackupParams>,
        mut after: AfterReady,
    ) -> Result<JobResults, ExecError> {
        let outcome = if after.wait.until != WaitUntil::Completed || after.wait.ids.is_empty() {
            WaitOutcome::default()
        } else {
            ctx.check_cancel(&after.results)?;
            bound_by_attempt(ctx, &mut after.wait);
            let parked = ctx
                .may_park()
                .then(|| Checkpoint::ParkedReady(Box::new(after.clone())));
            self.wait_for(ctx, after.wait.clone(), parked, &after.results)
                .await?
        };
        self.finish_ready(ctx, ec2, backup, after, outcome).await
    }

    /// Finishes the action after its wait ended with `outcome` (or was skipped).
    pub(super) async fn finish_ready(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        backup: Option<&BackupParams>,
        after: AfterReady,
        outcome: WaitOutcome,
    ) -> Result<JobResults, ExecError> {
        let AfterReady {
            wait,
            results,
            made,
        } = after;
        match (made, backup) {
            (ReadyMade::Snapshots { rows, made }, Some(b)) => {
                self.finish_snapshots(ctx, ec2, b, (rows, made), results, outcome)
                    .await
            }
            (ReadyMade::Images { made, total }, Some(b)) => {
                self.finish_images(ctx, ec2, b, (made, total), results, outcome)
                    .await
            }
            (
                ReadyMade::Copies {
                    copies,
                    source_region,
                },
                None,
            ) => {
                let places = (source_region.as_str(), wait.region.as_str());
                finish_copies(ctx, wait.kind, places, copies, results, outcome).await
            }
            _ => Err(ExecError::permanent(
                "CorruptCheckpoint",
                "the job's parked wait belongs to another action",
            )),
        }
    }
}

//! What snapshot and AMI backups share about what they made: its id in the job's checkpoint, and
//! joining the rotation group only once checkpointed.
//!
//! A resource joins its group (`ec2jobd:rotation`) only once its job holds it in a checkpoint.
//! Tagged at creation, another job's rotation could delete it while this job's answer was lost or
//! the daemon down, and this job, finding nothing by its tag, would make it again (the crash and
//! fault campaigns caught exactly that, for snapshots and for AMIs). One that rotation removes after
//! the checkpoint is reported as made and since removed, never made again.

use std::collections::BTreeMap;

use ec2jobd_ec2::{Ec2, Ec2Error};
use ec2jobd_spec::{ImageResult, JobResults, SnapshotResult};

use super::backup::ROTATION_TAG;
use super::checkpoint::{self, Checkpoint};
use crate::runner::ExecCtx;

/// A snapshot or AMI a backup job made, as rotation bookkeeping sees it.
pub(super) trait Made {
    /// The state reported when rotation removed it before its job recorded it.
    const ROTATED_AWAY: &'static str;
    /// The EC2 id.
    fn id(&self) -> &str;
    /// The EC2 state (or [`Made::ROTATED_AWAY`]).
    fn state(&self) -> &str;
    /// Its tags, as last seen or set.
    fn tags_mut(&mut self) -> &mut BTreeMap<String, String>;
    /// A result for one the checkpoint names but EC2 no longer has.
    fn rotated_away(id: String, key: &str) -> Self;
}

impl Made for SnapshotResult {
    const ROTATED_AWAY: &'static str = "deleted";
    fn id(&self) -> &str {
        &self.snapshot_id
    }
    fn state(&self) -> &str {
        &self.state
    }
    fn tags_mut(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.tags
    }
    fn rotated_away(id: String, volume: &str) -> Self {
        SnapshotResult {
            snapshot_id: id,
            volume_id: Some(volume.to_string()),
            state: Self::ROTATED_AWAY.into(),
            outcome: Some(
                "created by an earlier attempt of this job, since deleted by the rotation of a newer generation"
                    .into(),
            ),
            ..Default::default()
        }
    }
}

impl Made for ImageResult {
    const ROTATED_AWAY: &'static str = "deregistered";
    fn id(&self) -> &str {
        &self.image_id
    }
    fn state(&self) -> &str {
        &self.state
    }
    fn tags_mut(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.tags
    }
    fn rotated_away(id: String, _instance: &str) -> Self {
        ImageResult {
            image_id: id,
            state: Self::ROTATED_AWAY.into(),
            outcome: Some(
                "created by an earlier attempt of this job, since deregistered by the rotation of a newer generation"
                    .into(),
            ),
            ..Default::default()
        }
    }
}

/// Key (volume or instance) → id of what this attempt made so far, for the checkpoint.
pub(super) fn ids<T: Made>(made: &BTreeMap<String, T>) -> BTreeMap<String, String> {
    made.iter()
        .map(|(k, m)| (k.clone(), m.id().to_string()))
        .collect()
}

/// Adds what earlier attempts checkpointed (`field` picks snapshots or AMIs) but EC2 no longer
/// has (not found by the job tag) as rotated away.
pub(super) fn add_checkpointed<T: Made>(
    ctx: &ExecCtx,
    field: fn(&checkpoint::Made) -> &BTreeMap<String, String>,
    made: &mut BTreeMap<String, T>,
) {
    let saved = Checkpoint::of(ctx).and_then(|c| c.made());
    for (key, id) in saved.as_ref().map(field).into_iter().flatten() {
        let (key, id) = (key.clone(), id.clone());
        let m = T::rotated_away(id, &key);
        made.entry(key).or_insert(m);
    }
}

/// Tags what this job made with its rotation group (`<group>/<key>`), where not tagged yet.
pub(super) async fn join<T: Made>(
    ec2: &Ec2,
    group: &str,
    made: &mut BTreeMap<String, T>,
    results: &mut JobResults,
) -> Result<(), Ec2Error> {
    for (key, m) in made.iter_mut() {
        let value = format!("{group}/{key}");
        if m.state() == T::ROTATED_AWAY || m.tags_mut().get(ROTATION_TAG) == Some(&value) {
            continue;
        }
        let tag = BTreeMap::from([(ROTATION_TAG.to_string(), value.clone())]);
        let outs = ec2.create_tags(&[m.id().to_string()], &tag, false).await?;
        results
            .request_ids
            .extend(outs.into_iter().filter_map(|o| o.request_id));
        m.tags_mut().insert(ROTATION_TAG.into(), value);
    }
    Ok(())
}

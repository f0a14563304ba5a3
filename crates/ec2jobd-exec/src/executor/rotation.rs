//! What snapshot and AMI backups share about what they made: its id in the job's checkpoint, and
//! joining the rotation group only once checkpointed.
//!
//! A resource joins its group (`ec2jobd:rotation`) only once its job holds it in a checkpoint.
//! Tagged at creation, another job's rotation could delete it while this job's answer was lost or
//! the daemon down, and this job, finding nothing by its tag, would make it again (the crash and
//! fault campaigns caught exactly that, for snapshots and for AMIs). One that rotation removes after
//! the checkpoint is reported as made and since removed, never made again. Nor does a rotation
//! remove what another job still running made ([`in_flight`]): that job may not even have seen it
//! yet (EC2 is eventually consistent); it counts as a generation, and its job removes it when it
//! ends, if it is still past the kept ones then.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use ec2jobd_ec2::{until_known, Ec2, Ec2Error};
use ec2jobd_spec::{ImageResult, JobResults, SnapshotResult};

use super::checkpoint::{self, Checkpoint};
use super::JOB_TAG;
use crate::runner::ExecCtx;

/// Tag naming the rotation group of everything ec2jobd creates for backups: `<group>/<resource id>`.
pub const ROTATION_TAG: &str = "ec2jobd:rotation";

/// Tag on an AMI naming the instance it was made from (a resumed attempt maps what it finds).
pub const INSTANCE_TAG: &str = "ec2jobd:instance";

/// A snapshot or AMI a backup job made, as rotation bookkeeping sees it.
pub(super) trait Made {
    /// The state reported when rotation removed it before its job recorded it.
    const ROTATED_AWAY: &'static str;
    /// The state in which it counts as a generation (a failed or unfinished one never does).
    const READY: &'static str;
    /// When EC2 says it was made (second precision).
    fn made_at(&self) -> Option<&str>;
    /// Its tags, as last seen or set.
    fn tags(&self) -> &BTreeMap<String, String>;
    /// The EC2 id.
    fn id(&self) -> &str;
    /// The EC2 state (or [`Made::ROTATED_AWAY`]).
    fn state(&self) -> &str;
    /// Its tags, as last seen or set.
    fn tags_mut(&mut self) -> &mut BTreeMap<String, String>;
    /// A result for one the checkpoint names but EC2 no longer has.
    fn rotated_away(id: String, key: &str) -> Self;
    /// What it was made of (the volume or instance), as its own fields or tags say.
    fn key(&self) -> Option<String>;
    /// What the job did with it, for the results.
    fn set_outcome(&mut self, outcome: &str);
}

impl Made for SnapshotResult {
    const ROTATED_AWAY: &'static str = "deleted";
    const READY: &'static str = "completed";
    fn made_at(&self) -> Option<&str> {
        self.start_time.as_deref()
    }
    fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }
    fn id(&self) -> &str {
        &self.snapshot_id
    }
    fn state(&self) -> &str {
        &self.state
    }
    fn tags_mut(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.tags
    }
    fn key(&self) -> Option<String> {
        self.volume_id.clone()
    }
    fn set_outcome(&mut self, outcome: &str) {
        self.outcome = Some(outcome.into());
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
    const READY: &'static str = "available";
    fn made_at(&self) -> Option<&str> {
        self.creation_date.as_deref()
    }
    fn tags(&self) -> &BTreeMap<String, String> {
        &self.tags
    }
    fn id(&self) -> &str {
        &self.image_id
    }
    fn state(&self) -> &str {
        &self.state
    }
    fn tags_mut(&mut self) -> &mut BTreeMap<String, String> {
        &mut self.tags
    }
    fn key(&self) -> Option<String> {
        // AMIs made before the instance tag existed name it in their rotation tag.
        self.tags.get(INSTANCE_TAG).cloned().or_else(|| {
            self.tags
                .get(ROTATION_TAG)
                .and_then(|g| g.rsplit('/').next())
                .map(String::from)
        })
    }
    fn set_outcome(&mut self, outcome: &str) {
        self.outcome = Some(outcome.into());
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

/// What a describe by rotation tag found, by rotation group (`<group>/<key>`).
pub(super) fn by_group<T: Made>(found: Vec<T>) -> HashMap<String, Vec<T>> {
    let mut groups: HashMap<String, Vec<T>> = HashMap::new();
    for m in found {
        if let Some(g) = m.tags().get(ROTATION_TAG).cloned() {
            groups.entry(g).or_default().push(m);
        }
    }
    groups
}

/// The other jobs that made some of `found` and have not ended: they may still be waiting for EC2
/// to show them what they made, so no rotation removes it under them; each rotates its group
/// itself when it ends.
pub(super) async fn in_flight<T: Made>(ctx: &ExecCtx, found: &[T]) -> HashSet<String> {
    let jobs: BTreeSet<String> = found
        .iter()
        .filter_map(|m| m.tags().get(JOB_TAG))
        .filter(|j| **j != ctx.job.id)
        .cloned()
        .collect();
    ctx.unfinished(jobs).await
}

/// One group's generations, newest first, split into the `keep` kept and those past them to
/// remove. Only ready ones count. Times have second precision, so ties are broken by the id of the
/// job that made them (ULIDs sort by time), then by their own id. One past them that a job still
/// running made (`in_flight`) is left to that job's own rotation.
pub(super) fn generations<T: Made>(
    group: Vec<T>,
    keep: usize,
    in_flight: &HashSet<String>,
) -> (Vec<T>, Vec<T>) {
    let mut gens: Vec<T> = group
        .into_iter()
        .filter(|m| m.state() == T::READY)
        .collect();
    gens.sort_by(|a, b| {
        let age = |m: &T| {
            (
                m.made_at().map(String::from),
                m.tags().get(JOB_TAG).cloned(),
                m.id().to_string(),
            )
        };
        age(b).cmp(&age(a))
    });
    let mut past = gens.split_off(keep.min(gens.len()));
    past.retain(|m| !m.tags().get(JOB_TAG).is_some_and(|j| in_flight.contains(j)));
    (gens, past)
}

/// Key (volume or instance) → id of what this attempt made so far, for the checkpoint.
pub(super) fn ids<T: Made>(made: &BTreeMap<String, T>) -> BTreeMap<String, String> {
    made.iter()
        .map(|(k, m)| (k.clone(), m.id().to_string()))
        .collect()
}

/// What earlier attempts of this job made, by volume or instance: `found` (what a describe by the
/// job tag answered), and what they checkpointed (`field` picks snapshots or AMIs) but EC2 no
/// longer has, as rotated away (a newer generation's rotation removed it).
pub(super) fn earlier<T: Made>(
    ctx: &ExecCtx,
    found: Vec<T>,
    field: fn(&checkpoint::Made) -> &BTreeMap<String, String>,
) -> BTreeMap<String, T> {
    let mut made = BTreeMap::new();
    for mut m in found {
        if let Some(key) = m.key() {
            m.set_outcome("created by an earlier attempt of this job");
            made.insert(key, m);
        }
    }
    let saved = Checkpoint::of(ctx).and_then(|c| c.made());
    for (key, id) in saved.as_ref().map(field).into_iter().flatten() {
        let (key, id) = (key.clone(), id.clone());
        let m = T::rotated_away(id, &key);
        made.entry(key).or_insert(m);
    }
    made
}

/// What a job says while [`join`] takes long: EC2 does not know the new ids yet.
pub(super) const JOINING: &str =
    "tagging what was made with its rotation group (waiting for EC2 to know the new ids)";

/// Tags what this job made with its rotation group (`<group>/<key>`), where not tagged yet; an id
/// EC2 does not know yet is asked about again for up to `grace` (it was made a moment ago).
pub(super) async fn join<T: Made>(
    ec2: &Ec2,
    (group, grace): (&str, Duration),
    made: &mut BTreeMap<String, T>,
    results: &mut JobResults,
) -> Result<(), Ec2Error> {
    for (key, m) in made.iter_mut() {
        let value = format!("{group}/{key}");
        if m.state() == T::ROTATED_AWAY || m.tags_mut().get(ROTATION_TAG) == Some(&value) {
            continue;
        }
        let tag = BTreeMap::from([(ROTATION_TAG.to_string(), value.clone())]);
        let id = [m.id().to_string()];
        let outs = until_known(grace, || ec2.create_tags(&id, &tag, false)).await?;
        results
            .request_ids
            .extend(outs.into_iter().filter_map(|o| o.request_id));
        m.tags_mut().insert(ROTATION_TAG.into(), value);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(id: &str, state: &str, at: &str, job: &str, group: &str) -> SnapshotResult {
        SnapshotResult {
            snapshot_id: id.into(),
            state: state.into(),
            start_time: Some(at.into()),
            tags: BTreeMap::from([
                (JOB_TAG.to_string(), job.to_string()),
                (ROTATION_TAG.to_string(), group.to_string()),
            ]),
            ..Default::default()
        }
    }

    /// Newest first, ties within a second broken by the making job's id, then the snapshot's;
    /// failed and unfinished ones are no generation; groups apart.
    #[test]
    fn generations_are_the_ready_ones_newest_first() {
        let t = "2026-12-03T10:00:00Z";
        let found = vec![
            snap("snap-a", "completed", t, "01JOB1", "g/vol-1"),
            snap("snap-b", "completed", t, "01JOB2", "g/vol-1"),
            snap(
                "snap-c",
                "completed",
                "2026-12-03T09:00:00Z",
                "01JOB9",
                "g/vol-1",
            ),
            snap(
                "snap-d",
                "error",
                "2026-12-03T11:00:00Z",
                "01JOB3",
                "g/vol-1",
            ),
            snap(
                "snap-e",
                "pending",
                "2026-12-03T11:00:00Z",
                "01JOB4",
                "g/vol-1",
            ),
            snap("snap-f", "completed", t, "01JOB5", "g/vol-2"),
        ];
        let mut groups = by_group(found);
        let none = HashSet::new();
        let vol1 = groups.remove("g/vol-1").unwrap();
        let (kept, past) = generations(vol1.clone(), 2, &none);
        let ids =
            |v: &[SnapshotResult]| v.iter().map(|s| s.snapshot_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&kept), ["snap-b", "snap-a"]);
        assert_eq!(ids(&past), ["snap-c"]);
        let (kept, past) = generations(groups.remove("g/vol-2").unwrap(), 5, &none);
        assert_eq!((ids(&kept).len(), past.len()), (1, 0));
        // What a job still running made counts, but is left for that job to remove.
        let running = HashSet::from(["01JOB9".to_string()]);
        let (kept, past) = generations(vol1, 2, &running);
        assert_eq!(ids(&kept), ["snap-b", "snap-a"]);
        assert!(past.is_empty());
    }
}

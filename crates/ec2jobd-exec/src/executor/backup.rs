//! Backup jobs: EBS snapshots with generation rotation.
//!
//! `create_snapshots` finds the volumes (those attached to the targeted instances, or the targeted
//! volumes), snapshots each one, waits until every snapshot is `completed`, and only then rotates:
//! per volume it keeps the `keep` newest completed snapshots of the rotation group and deletes the
//! rest. Rotation looks only at snapshots carrying ec2jobd's `ec2jobd:rotation` tag for that group
//! and volume, so a snapshot someone else made is never touched; failed snapshots never count; one
//! an AMI still uses is kept and reported as in use.
//!
//! CreateSnapshot is not idempotent on AWS's side (no client token). Every snapshot is tagged with
//! the job id at creation (in the same call), and an attempt that resumes after a crash or a lost
//! answer first looks for snapshots with its job id and creates only for volumes that have none; the
//! checkpoints before and after each call say how far an attempt got, and keep the ids made. The
//! SDK never re-sends an unanswered CreateSnapshot (see `ec2jobd-ec2`'s `unanswered` module): that
//! lookup does it safely instead. A snapshot gets its rotation tag only once its job holds it in a
//! checkpoint, so no other job's rotation can delete it while this job cannot yet know it exists;
//! one deleted by rotation after that is reported as made and since deleted, not made again.

use std::collections::{BTreeMap, HashMap};

use ec2jobd_ec2::{Ec2, VolumeInfo, Watched};
use ec2jobd_spec::action::{BackupParams, SnapshotParams};
use ec2jobd_spec::{
    InstanceResult, JobResults, RotationResult, SnapshotResult, VolumeResult, WaitUntil,
};

use super::checkpoint::{self, AfterReady, Checkpoint, ReadyMade};
use super::rotation::{self, Made, ROTATION_TAG};
use super::{dry_run_verdict, failed, no_targets, plan, plural, ready_failure, Ec2Executor};
use crate::parking::WaitOutcome;
use crate::runner::{ExecCtx, ExecError};

/// Description of a snapshot when the job gives none.
const DEFAULT_DESCRIPTION: &str =
    "ec2jobd backup of {volume_id} ({device} on {instance_id} {name}) {date}";

/// Most snapshot ids or filter values sent in one Describe call.
const PER_DESCRIBE: usize = 200;

/// A volume to back up, with what the report and the description template need.
struct Source {
    volume: VolumeInfo,
    instance: Option<InstanceResult>,
    device: Option<String>,
}

impl Source {
    /// The tags its snapshot gets: with `copy_tags` the instance's then the volume's (those that
    /// may be copied), then the job's `tags`, then the job id tag.
    fn tags(&self, ctx: &ExecCtx, p: &SnapshotParams) -> BTreeMap<String, String> {
        let mut tags = BTreeMap::new();
        if p.backup.copy_tags.unwrap_or(false) {
            if let Some(i) = &self.instance {
                tags.extend(copyable(&i.tags).map(|(k, v)| (k.clone(), v.clone())));
            }
            tags.extend(copyable(&self.volume.tags).map(|(k, v)| (k.clone(), v.clone())));
        }
        tags.extend(p.backup.tags.clone().unwrap_or_default());
        tags.extend(super::made_by(ctx));
        tags
    }

    /// The volume's row in the results, before anything is made of it.
    fn row(&self) -> VolumeResult {
        VolumeResult {
            volume_id: self.volume.volume_id.clone(),
            instance_id: self.instance.as_ref().map(|i| i.instance_id.clone()),
            instance_name: self.instance.as_ref().and_then(|i| i.name.clone()),
            device: self.device.clone(),
            size_gib: self.volume.size_gib,
            snapshot: None,
            rotation: None,
        }
    }
}

/// Fills the description template (placeholders of [`ec2jobd_spec::BackupNaming`], checked at
/// submission); EC2 takes at most 255 characters.
fn describe_template(
    t: &str,
    src: &Source,
    job_id: &str,
    group: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> String {
    let inst = src.instance.as_ref();
    let s = ec2jobd_spec::BackupNaming {
        name: inst.and_then(|i| i.name.as_deref()).unwrap_or(""),
        instance_id: inst.map(|i| i.instance_id.as_str()).unwrap_or("-"),
        volume_id: &src.volume.volume_id,
        device: src.device.as_deref().unwrap_or("-"),
        job_id,
        group,
        at,
    }
    .render(t, super::NAME_BUDGET)
    .unwrap_or_else(|_| t.to_string());
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    s.chars().take(255).collect()
}

/// Tags copied from a resource: not AWS's reserved ones, not ec2jobd's own bookkeeping.
pub(super) fn copyable(
    tags: &BTreeMap<String, String>,
) -> impl Iterator<Item = (&String, &String)> {
    tags.iter()
        .filter(|(k, _)| !k.starts_with("aws:") && !k.starts_with("ec2jobd:"))
}

impl Ec2Executor {
    /// The volumes a `create_snapshots` job backs up.
    async fn backup_sources(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        devices: &[String],
        results: &mut JobResults,
    ) -> Result<Vec<Source>, ExecError> {
        let t = &ctx.job.spec.targets;
        let by_volume = t.volume_ids.is_some() || t.volume_tags.is_some();
        let mut instances: HashMap<String, InstanceResult> = HashMap::new();
        let volumes: Vec<VolumeInfo> = if by_volume {
            let filters = t
                .volume_tags
                .as_ref()
                .map(|tags| super::filters_for_tags(&tags.0))
                .unwrap_or_default();
            let (vols, rids) = ec2
                .describe_volumes(t.volume_ids.as_ref().map(|l| l.0.clone()), &filters)
                .await
                .map_err(|e| failed(e, results.clone()))?;
            results.request_ids.extend(rids);
            let attached: Vec<String> = vols
                .iter()
                .flat_map(|v| v.attachments.iter().map(|(i, _)| i.clone()))
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            if !attached.is_empty() {
                let d = ec2
                    .describe_instances(
                        &ec2jobd_spec::Targets {
                            instance_ids: Some(ec2jobd_spec::IdList(attached)),
                            ..Default::default()
                        },
                        false,
                    )
                    .await
                    .map_err(|e| failed(e, results.clone()))?;
                results.request_ids.extend(d.request_ids);
                instances.extend(d.instances.into_iter().map(|i| (i.instance_id.clone(), i)));
            }
            vols
        } else {
            let d = ec2
                .describe_instances(t, false)
                .await
                .map_err(|e| failed(e, results.clone()))?;
            results.request_ids.extend(d.request_ids);
            instances.extend(
                d.instances
                    .into_iter()
                    .filter(|i| !matches!(i.state.as_str(), "terminated" | "shutting-down"))
                    .map(|i| (i.instance_id.clone(), i)),
            );
            let mut ids: Vec<String> = instances.keys().cloned().collect();
            ids.sort();
            let mut vols = Vec::new();
            for chunk in ids.chunks(PER_DESCRIBE) {
                let (v, rids) = ec2
                    .describe_volumes(
                        None,
                        &vec![("attachment.instance-id".to_string(), chunk.to_vec())],
                    )
                    .await
                    .map_err(|e| failed(e, results.clone()))?;
                results.request_ids.extend(rids);
                vols.extend(v);
            }
            vols
        };
        let mut out = Vec::new();
        for v in volumes {
            let att = v
                .attachments
                .iter()
                .find(|(i, _)| instances.contains_key(i))
                .cloned();
            let device = att.as_ref().map(|(_, d)| d.clone());
            if !devices.is_empty() && !device.as_ref().is_some_and(|d| devices.contains(d)) {
                continue;
            }
            out.push(Source {
                instance: att.and_then(|(i, _)| instances.get(&i).cloned()),
                device,
                volume: v,
            });
        }
        out.sort_by(|a, b| a.volume.volume_id.cmp(&b.volume.volume_id));
        Ok(out)
    }

    /// `create_snapshots`; see the module docs.
    pub(super) async fn create_snapshots(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        p: &SnapshotParams,
        place: (&str, &str),
    ) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        let job_id = &ctx.job.id;
        let mut results = JobResults::default();
        ctx.check_cancel(&results)?;
        ctx.progress(
            "resolving_targets",
            "finding the volumes to back up",
            None,
            None,
        )
        .await?;
        let devices = p.devices.as_deref().unwrap_or_default();
        let sources = self.backup_sources(ctx, ec2, devices, &mut results).await?;
        if sources.is_empty() {
            if spec.allow_empty {
                results.summary = Some("no volume matched the targets; nothing to do".into());
                return Ok(results);
            }
            return Err(no_targets(results));
        }
        let rows: Vec<VolumeResult> = sources.iter().map(Source::row).collect();
        let group = p.backup.group();
        let template = p.description.as_deref().unwrap_or(DEFAULT_DESCRIPTION);
        let at = ctx.job.started_at.unwrap_or(ctx.job.created_at);
        let stop_first = p.stop_first.unwrap_or(false);
        let tags_for = |src: &Source| src.tags(ctx, p);
        if spec.dry_run {
            let mut ok = true;
            for src in &sources {
                let description = describe_template(template, src, job_id, group, at);
                let (_, out) = ec2
                    .create_snapshot(&src.volume.volume_id, &description, &tags_for(src), true)
                    .await
                    .map_err(|e| failed(e, results.clone()))?;
                ok &= out.dry_run_ok;
                results.request_ids.extend(out.request_id);
            }
            results.summary = Some(format!(
                "dry run: CreateSnapshot {} for {} volume(s)",
                dry_run_verdict(ok),
                sources.len()
            ));
            return Ok(results);
        }
        let mut made = made_earlier(ctx, ec2, &mut results).await?;
        let total = sources.len() as u64;

        // stop_first: instances with a volume still to snapshot are stopped first; the list to
        // start again is checkpointed before the first stop so a resumed attempt finishes the job.
        let earlier: Vec<String> = Checkpoint::of(ctx)
            .map(|c| c.restart().to_vec())
            .unwrap_or_default();
        let mut insts: BTreeMap<String, InstanceResult> = BTreeMap::new();
        for src in &sources {
            if let Some(i) = &src.instance {
                insts.insert(i.instance_id.clone(), i.clone());
            }
        }
        let live = |id: &str| matches!(insts[id].state.as_str(), "running" | "pending");
        let (restart, to_stop) = if stop_first {
            let needs_snapshot = |id: &str| {
                sources.iter().any(|s| {
                    s.instance.as_ref().is_some_and(|i| i.instance_id == id)
                        && !made.contains_key(&s.volume.volume_id)
                })
            };
            plan::stop_first(&insts, needs_snapshot, &earlier)
        } else {
            (Vec::new(), Vec::new())
        };
        let created = async {
            if !to_stop.is_empty() {
                let stopping = Checkpoint::Stopping {
                    restart: restart.clone(),
                };
                stopping.save(ctx).await?;
                ctx.progress(
                    "calling",
                    &format!(
                        "StopInstances on {} instance(s) before their snapshots",
                        to_stop.len()
                    ),
                    None,
                    None,
                )
                .await?;
                let outs = ec2
                    .stop_instances(&to_stop, false, false, false)
                    .await
                    .map_err(|e| failed(e, results.clone()))?;
                results
                    .request_ids
                    .extend(outs.into_iter().filter_map(|o| o.request_id));
            }
            let must_be_stopped: Vec<String> = restart
                .iter()
                .filter(|id| insts[id.as_str()].state != "stopped" || to_stop.contains(id))
                .cloned()
                .collect();
            self.wait_quietly(ctx, place, &must_be_stopped, WaitUntil::Stopped, &results)
                .await?;
            for src in &sources {
                let vol = &src.volume.volume_id;
                if made.contains_key(vol) {
                    continue;
                }
                ctx.check_cancel(&results)?;
                let creating = Checkpoint::Creating(checkpoint::Made {
                    volume: Some(vol.clone()),
                    snapshots: rotation::ids(&made),
                    restart: restart.clone(),
                    ..Default::default()
                });
                creating.save(ctx).await?;
                ctx.progress(
                    "calling",
                    &format!("CreateSnapshot of {vol} ({} of {total})", made.len() + 1),
                    Some(made.len() as u64),
                    Some(total),
                )
                .await?;
                let (snap, out) = ec2
                    .create_snapshot(
                        vol,
                        &describe_template(template, src, job_id, group, at),
                        &tags_for(src),
                        false,
                    )
                    .await
                    .map_err(|e| failed(e, partial(&rows, &made, &results)))?;
                results.request_ids.extend(out.request_id);
                if let Some(mut s) = snap {
                    s.outcome = Some("created".into());
                    made.insert(vol.clone(), s);
                }
                let created = Checkpoint::Created(checkpoint::Made {
                    snapshots: rotation::ids(&made),
                    restart: restart.clone(),
                    ..Default::default()
                });
                created.save(ctx).await?;
            }
            Ok::<(), ExecError>(())
        }
        .await;
        // Whatever happened, instances this job stopped are started again (a lost lease means
        // another worker owns the job and will do it).
        let to_start: Vec<String> = restart
            .iter()
            .filter(|id| to_stop.contains(id) || !live(id))
            .cloned()
            .collect();
        if !to_start.is_empty() && !matches!(created, Err(ExecError::LeaseLost)) {
            ctx.progress(
                "calling",
                &format!(
                    "StartInstances on {} instance(s) after their snapshots",
                    to_start.len()
                ),
                None,
                None,
            )
            .await?;
            let outs = ec2
                .start_instances(&to_start, false)
                .await
                .map_err(|e| failed(e, partial(&rows, &made, &results)))?;
            results
                .request_ids
                .extend(outs.into_iter().filter_map(|o| o.request_id));
        }
        // What was made joins its rotation group now, whatever happened to the rest (a partly
        // failed job's snapshots are rotated like any other), unless another worker owns the job.
        let joined = match created {
            Err(ExecError::LeaseLost) => Ok(Ok(())),
            _ => {
                let grace = self.settings.consistency_timeout;
                let join = rotation::join(ec2, (group, grace), &mut made, &mut results);
                ctx.quietly("calling", rotation::JOINING, join).await
            }
        };
        created?;
        joined?.map_err(|e| failed(e, partial(&rows, &made, &results)))?;
        self.wait_quietly(ctx, place, &restart, WaitUntil::StatusOk, &results)
            .await?;
        if stop_first {
            results.instances = stopped_first(insts, &restart);
        }

        let labels = made
            .iter()
            .filter(|(_, s)| {
                !matches!(s.state.as_str(), "completed" | SnapshotResult::ROTATED_AWAY)
            })
            .map(|(v, s)| {
                let id = s.snapshot_id.clone();
                (id.clone(), format!("snapshot {id} of {v}"))
            })
            .collect();
        let after = AfterReady {
            wait: self.ready_wait(ctx, place.1, Watched::Snapshots, labels),
            results,
            made: ReadyMade::Snapshots { rows, made },
        };
        self.ready_and_finish(ctx, ec2, Some(&p.backup), after)
            .await
    }

    /// After the wait for the new snapshots (or none asked for): rotation, the volume rows and
    /// the summary.
    pub(super) async fn finish_snapshots(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        backup: &BackupParams,
        (rows, mut made): (Vec<VolumeResult>, BTreeMap<String, SnapshotResult>),
        mut results: JobResults,
        outcome: WaitOutcome,
    ) -> Result<JobResults, ExecError> {
        for s in made.values_mut() {
            if let Some((state, progress)) = outcome.ready.get(&s.snapshot_id) {
                s.state = state.clone();
                s.progress = progress.clone();
            }
        }
        ready_failure(
            &outcome,
            || partial(&rows, &made, &results),
            backup.keep.is_some(),
        )?;
        let until = ctx.job.spec.wait_settings().0;
        let group = backup.group();
        let total = rows.len() as u64;

        // Rotation, only once the whole new generation completed.
        let mut rotations: HashMap<String, RotationResult> = HashMap::new();
        let rotation_note = match backup.keep {
            Some(keep) if until == WaitUntil::Completed => {
                ctx.progress(
                    "rotating",
                    &format!("keeping {keep} generation(s) per volume"),
                    None,
                    None,
                )
                .await?;
                rotations = rotate(ctx, ec2, group, &rows, keep as usize, &mut results)
                    .await
                    .map_err(|e| failed(e, partial(&rows, &made, &results)))?;
                let deleted: usize = rotations.values().map(|r| r.deleted.len()).sum();
                let in_use: usize = rotations.values().map(|r| r.in_use.len()).sum();
                let mut n = format!("; rotation kept {keep} per volume, deleted {deleted}");
                if in_use > 0 {
                    n.push_str(&format!(", kept {in_use} in use by an AMI"));
                }
                n
            }
            Some(_) => "; rotation skipped (it runs only after waiting for completed)".into(),
            None => String::new(),
        };
        results.volumes = volume_rows(&rows, &made, &mut rotations);
        let done = made.values().filter(|s| s.state == "completed").count();
        let summary = format!(
            "{} snapshot{} of {total} volume{} ({done} completed){rotation_note}",
            made.len(),
            plural(made.len() as u64),
            plural(total)
        );
        ctx.progress("done", &summary, Some(total), Some(total))
            .await?;
        results.summary = Some(summary);
        Ok(results)
    }
}

/// What an earlier attempt of this job already created, by volume ([`rotation::earlier`]);
/// empty on a first attempt.
async fn made_earlier(
    ctx: &ExecCtx,
    ec2: &Ec2,
    results: &mut JobResults,
) -> Result<BTreeMap<String, SnapshotResult>, ExecError> {
    if !ctx.resumed() {
        return Ok(BTreeMap::new());
    }
    let (found, rids, _) = ec2
        .describe_snapshots(None, &super::made_by_filters(ctx), false)
        .await
        .map_err(|e| failed(e, results.clone()))?;
    results.request_ids.extend(rids);
    Ok(rotation::earlier(ctx, found, |m| &m.snapshots))
}

/// The instances of a `stop_first` job as reported: those in `restart` were stopped for the
/// snapshots and are running again, the others were left as found.
fn stopped_first(
    insts: BTreeMap<String, InstanceResult>,
    restart: &[String],
) -> Vec<InstanceResult> {
    insts
        .into_values()
        .map(|mut i| {
            i.previous_state = Some(i.state.clone());
            i.outcome = Some(if restart.contains(&i.instance_id) {
                i.state = "running".into();
                "stopped for the snapshots and started again (status ok)".into()
            } else {
                format!("left {}", i.state)
            });
            i
        })
        .collect()
}

/// Results so far, for a failure part-way.
fn partial(
    rows: &[VolumeResult],
    made: &BTreeMap<String, SnapshotResult>,
    results: &JobResults,
) -> JobResults {
    JobResults {
        volumes: volume_rows(rows, made, &mut HashMap::new()),
        ..results.clone()
    }
}

/// The volume rows with what was made of each and its rotation.
fn volume_rows(
    rows: &[VolumeResult],
    made: &BTreeMap<String, SnapshotResult>,
    rotations: &mut HashMap<String, RotationResult>,
) -> Vec<VolumeResult> {
    rows.iter()
        .map(|r| VolumeResult {
            snapshot: made.get(&r.volume_id).cloned(),
            rotation: rotations.remove(&r.volume_id),
            ..r.clone()
        })
        .collect()
}

/// Keeps the `keep` newest completed snapshots of each volume's rotation group, deletes the
/// rest (an `InvalidSnapshot.InUse` answer keeps it as in use). Returns rotation per volume.
async fn rotate(
    ctx: &ExecCtx,
    ec2: &Ec2,
    group: &str,
    rows: &[VolumeResult],
    keep: usize,
    results: &mut JobResults,
) -> Result<HashMap<String, RotationResult>, ec2jobd_ec2::Ec2Error> {
    let keys: Vec<String> = rows
        .iter()
        .map(|r| format!("{group}/{}", r.volume_id))
        .collect();
    let mut found = Vec::new();
    for chunk in keys.chunks(PER_DESCRIBE) {
        let (f, rids, _) = ec2
            .describe_snapshots(
                None,
                &vec![(format!("tag:{ROTATION_TAG}"), chunk.to_vec())],
                false,
            )
            .await?;
        results.request_ids.extend(rids);
        found.extend(f);
    }
    let in_flight = rotation::in_flight(ctx, &found).await;
    let mut groups = rotation::by_group(found);
    let mut out = HashMap::new();
    for (row, key) in rows.iter().zip(keys) {
        let group = groups.remove(&key).unwrap_or_default();
        let (kept, past) = rotation::generations(group, keep, &in_flight);
        let mut r = RotationResult {
            group: key,
            kept: kept.into_iter().map(|s| s.snapshot_id).collect(),
            ..Default::default()
        };
        for s in past {
            match ec2.delete_snapshot(&s.snapshot_id, false).await {
                Ok(o) => {
                    results.request_ids.extend(o.request_id);
                    r.deleted.push(s.snapshot_id);
                }
                Err(e) if e.code == "InvalidSnapshot.InUse" => r.in_use.push(s.snapshot_id),
                // Gone already (a resumed rotation, or someone else deleted it).
                Err(e) if e.code == "InvalidSnapshot.NotFound" => r.deleted.push(s.snapshot_id),
                Err(e) => return Err(e),
            }
        }
        out.insert(row.volume_id.clone(), r);
    }
    Ok(out)
}

impl Ec2Executor {
    /// `describe_snapshots` and `delete_snapshots`: the snapshots by id, tags or volume.
    pub(super) async fn snapshots_action(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        delete: bool,
    ) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        let t = &spec.targets;
        let mut results = JobResults::default();
        ctx.check_cancel(&results)?;
        let mut filters = t
            .snapshot_tags
            .as_ref()
            .map(|tags| super::filters_for_tags(&tags.0))
            .unwrap_or_default();
        if let Some(v) = &t.volume_ids {
            filters.push(("volume-id".into(), v.0.clone()));
        }
        let dry_describe = spec.dry_run && !delete;
        let (found, rids, dry_ok) = ec2
            .describe_snapshots(
                t.snapshot_ids.as_ref().map(|l| l.0.clone()),
                &filters,
                dry_describe,
            )
            .await
            .map_err(|e| failed(e, JobResults::default()))?;
        results.request_ids.extend(rids);
        if dry_describe {
            results.summary = Some(format!(
                "dry run: DescribeSnapshots {}",
                dry_run_verdict(dry_ok)
            ));
            return Ok(results);
        }
        if found.is_empty() && !spec.allow_empty {
            return Err(no_targets(results));
        }
        let n = found.len() as u64;
        if !delete {
            results.snapshots = found;
            results.summary = Some(format!("described {n} snapshot{}", plural(n)));
            return Ok(results);
        }
        let (mut deleted, mut in_use, mut ok) = (0, 0, true);
        for mut s in found {
            ctx.check_cancel(&results)?;
            match ec2.delete_snapshot(&s.snapshot_id, spec.dry_run).await {
                Ok(o) => {
                    results.request_ids.extend(o.request_id);
                    ok &= o.dry_run_ok;
                    if !spec.dry_run {
                        s.state = "deleted".into();
                        s.outcome = Some("deleted".into());
                        deleted += 1;
                    }
                }
                Err(e) if e.code == "InvalidSnapshot.InUse" => {
                    s.outcome = Some(format!("kept: in use ({})", e.message));
                    in_use += 1;
                }
                Err(e) => return Err(failed(e, results)),
            }
            results.snapshots.push(s);
        }
        results.summary = Some(if spec.dry_run {
            format!(
                "dry run: DeleteSnapshot {} for {n} snapshot(s)",
                dry_run_verdict(ok)
            )
        } else {
            format!(
                "deleted {deleted} of {n} snapshot{}; {in_use} kept in use",
                plural(n)
            )
        });
        ctx.progress(
            "done",
            results.summary.as_deref().unwrap_or(""),
            Some(n),
            Some(n),
        )
        .await?;
        Ok(results)
    }
}

//! AMI backups and copies: `create_image` with generation rotation per instance,
//! `deregister_image`, and cross-region `copy_snapshot` / `copy_image`.
//!
//! The same rules as snapshot backups hold: what ec2jobd creates carries `ec2jobd:job-id` (and an
//! AMI `ec2jobd:instance`) set in the creating call, and an AMI gets `ec2jobd:rotation`
//! (`<group>/<instance id>`) once its job holds it in a checkpoint; a resumed attempt looks for what
//! it already made (by job tag, and for copies by `ec2jobd:source`) before making anything, and
//! reports a checkpointed AMI that rotation has deregistered since instead of making it again;
//! rotation runs only after the new generation is available, counts only available AMIs it made
//! for that group and instance, and deletes a deregistered AMI's snapshots with it. Waiting for
//! AMIs and copies to be ready is `ready.rs`'s.

use std::collections::{BTreeMap, HashMap};

use ec2jobd_ec2::{until_known, CopyOptions, Ec2, Watched};
use ec2jobd_spec::action::{BackupParams, CopyParams, DeregisterParams, ImageParams};
use ec2jobd_spec::{
    ImageResult, InstanceResult, JobResults, RotationResult, SnapshotResult, WaitUntil,
};

use super::backup::copyable;
use super::checkpoint::{self, AfterReady, Checkpoint, ReadyMade};
use super::rotation::{self, Made, INSTANCE_TAG, ROTATION_TAG};
use super::{dry_run_verdict, failed, no_targets, plural, ready_failure, Ec2Executor};
use crate::parking::WaitOutcome;
use crate::runner::{ExecCtx, ExecError};

/// Tag on a copy naming what it was copied from.
pub const SOURCE_TAG: &str = "ec2jobd:source";

/// Name of an AMI when the job gives none.
const DEFAULT_IMAGE_NAME: &str = "ec2jobd-{instance_id}-{timestamp}";

/// What a copy action copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// `copy_snapshot`.
    Snapshots,
    /// `copy_image`.
    Images,
}

impl Ready {
    /// What its copies' wait watches.
    fn watched(self) -> Watched {
        match self {
            Ready::Snapshots => Watched::Snapshots,
            Ready::Images => Watched::Images,
        }
    }
}

/// AMI names allow letters, digits and `()[] ./-'@_`; anything else becomes `-`. 3-128 characters.
fn ami_name(s: &str) -> String {
    let s: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if s.len() < 3 {
        format!("{s}-ami")
    } else {
        s
    }
}

/// Fills an AMI or copy name or description template (placeholders of
/// [`ec2jobd_spec::BackupNaming`], checked at submission). `source`: the imaged instance (its Name
/// tag and id), or for a copy the source's name or description and no instance; a copy has no
/// group either.
fn fill(
    t: &str,
    (name, instance_id): (&str, &str),
    job_id: &str,
    group: &str,
    at: chrono::DateTime<chrono::Utc>,
) -> String {
    ec2jobd_spec::BackupNaming {
        name,
        instance_id,
        volume_id: "",
        device: "",
        job_id,
        group,
        at,
    }
    .render(t, super::NAME_BUDGET)
    .unwrap_or_else(|_| t.to_string())
}

/// An instance as [`fill`]'s source.
fn of(i: &InstanceResult) -> (&str, &str) {
    (i.name.as_deref().unwrap_or(""), &i.instance_id)
}

/// The tags an AMI of `i` gets (and, once known, its snapshots): with `copy_tags` the instance's
/// own (not `aws:` or `ec2jobd:` ones), then the job's `tags`, the job id and the instance.
fn image_tags(ctx: &ExecCtx, p: &ImageParams, i: &InstanceResult) -> BTreeMap<String, String> {
    let mut tags = BTreeMap::new();
    if p.backup.copy_tags.unwrap_or(false) {
        tags.extend(copyable(&i.tags).map(|(k, v)| (k.clone(), v.clone())));
    }
    tags.extend(p.backup.tags.clone().unwrap_or_default());
    tags.extend(super::made_by(ctx));
    tags.insert(INSTANCE_TAG.to_string(), i.instance_id.clone());
    tags
}

impl Ec2Executor {
    /// `create_image`; see the module docs.
    pub(super) async fn create_image(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        p: &ImageParams,
    ) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        let job_id = &ctx.job.id;
        let mut results = JobResults::default();
        let Some(found) =
            super::resolve(ctx, ec2, None, self.settings.not_found_grace, &mut results).await?
        else {
            return Ok(results);
        };
        let insts: Vec<InstanceResult> = found
            .into_iter()
            .filter(|i| !matches!(i.state.as_str(), "terminated" | "shutting-down"))
            .collect();
        if insts.is_empty() {
            return Err(no_targets(results));
        }
        let group = p.backup.group();
        let at = ctx.job.started_at.unwrap_or(ctx.job.created_at);
        let name_t = p.name.as_deref().unwrap_or(DEFAULT_IMAGE_NAME);
        let desc_t = p
            .description
            .as_deref()
            .unwrap_or("ec2jobd AMI of {instance_id} ({name}) {datetime}");
        let tags_for = |i: &InstanceResult| image_tags(ctx, p, i);
        let no_reboot = p.no_reboot.unwrap_or(false);
        if spec.dry_run {
            let mut ok = true;
            for i in &insts {
                let (_, out) = ec2
                    .create_image(
                        &i.instance_id,
                        &ami_name(&fill(name_t, of(i), job_id, group, at)),
                        &fill(desc_t, of(i), job_id, group, at),
                        no_reboot,
                        &tags_for(i),
                        true,
                    )
                    .await
                    .map_err(|e| failed(e, results.clone()))?;
                ok &= out.dry_run_ok;
                results.request_ids.extend(out.request_id);
            }
            results.summary = Some(format!(
                "dry run: CreateImage {} for {} instance(s)",
                dry_run_verdict(ok),
                insts.len()
            ));
            return Ok(results);
        }
        // What an earlier attempt already made, by job tag: instance id → AMI.
        let mut made: BTreeMap<String, ImageResult> = BTreeMap::new();
        if ctx.resumed() {
            let (imgs, rids) = ec2
                .describe_images(None, &super::made_by_filters(ctx))
                .await
                .map_err(|e| failed(e, results.clone()))?;
            results.request_ids.extend(rids);
            made = rotation::earlier(ctx, imgs, |m| &m.images);
        }
        let total = insts.len() as u64;
        let created = async {
            for i in &insts {
                if made.contains_key(&i.instance_id) {
                    continue;
                }
                ctx.check_cancel(&results)?;
                let creating = Checkpoint::Creating(checkpoint::Made {
                    instance: Some(i.instance_id.clone()),
                    images: rotation::ids(&made),
                    ..Default::default()
                });
                creating.save(ctx).await?;
                ctx.progress(
                    "calling",
                    &format!(
                        "CreateImage of {} ({} of {total})",
                        i.instance_id,
                        made.len() + 1
                    ),
                    Some(made.len() as u64),
                    Some(total),
                )
                .await?;
                let name = ami_name(&fill(name_t, of(i), job_id, group, at));
                let (id, out) = ec2
                    .create_image(
                        &i.instance_id,
                        &name,
                        &fill(desc_t, of(i), job_id, group, at),
                        no_reboot,
                        &tags_for(i),
                        false,
                    )
                    .await
                    .map_err(|e| failed(e, results.clone()))?;
                results.request_ids.extend(out.request_id);
                if let Some(id) = id {
                    made.insert(
                        i.instance_id.clone(),
                        ImageResult {
                            image_id: id,
                            name: Some(name),
                            state: "pending".into(),
                            outcome: Some("created".into()),
                            tags: tags_for(i),
                            ..Default::default()
                        },
                    );
                }
                let created = Checkpoint::Created(checkpoint::Made {
                    instance: Some(i.instance_id.clone()),
                    images: rotation::ids(&made),
                    ..Default::default()
                });
                created.save(ctx).await?;
            }
            Ok::<(), ExecError>(())
        }
        .await;
        // What was made joins its rotation group now (see `rotation`), whatever happened to
        // the rest, unless another worker owns the job.
        let joined = match created {
            Err(ExecError::LeaseLost) => Ok(Ok(())),
            _ => {
                let grace = self.settings.consistency_timeout;
                let join = rotation::join(ec2, (group, grace), &mut made, &mut results);
                ctx.quietly("calling", rotation::JOINING, join).await
            }
        };
        created?;
        joined?.map_err(|e| failed(e, results.clone()))?;
        for (inst, img) in made.iter_mut() {
            img.instance_id = Some(inst.clone());
            img.instance_name = insts
                .iter()
                .find(|i| &i.instance_id == inst)
                .and_then(|i| i.name.clone());
        }
        let labels = made
            .values()
            .filter(|i| !matches!(i.state.as_str(), "available" | ImageResult::ROTATED_AWAY))
            .map(|i| (i.image_id.clone(), format!("AMI {}", i.image_id)))
            .collect();
        let after = AfterReady {
            wait: self.ready_wait(ctx, super::job_region(ctx), Watched::Images, labels),
            results,
            made: ReadyMade::Images { made, total },
        };
        self.ready_and_finish(ctx, ec2, Some(&p.backup), after)
            .await
    }

    /// After the wait for the new AMIs (or none asked for): their snapshots tagged like them,
    /// rotation and the summary.
    pub(super) async fn finish_images(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        backup: &BackupParams,
        (mut made, total): (BTreeMap<String, ImageResult>, u64),
        mut results: JobResults,
        outcome: WaitOutcome,
    ) -> Result<JobResults, ExecError> {
        for img in made.values_mut() {
            if let Some((st, _)) = outcome.ready.get(&img.image_id) {
                img.state = st.clone();
            }
        }
        let partial = |made: &BTreeMap<String, ImageResult>, results: &JobResults| JobResults {
            images: made.values().cloned().collect(),
            ..results.clone()
        };
        ready_failure(&outcome, || partial(&made, &results), backup.keep.is_some())?;
        let until = ctx.job.spec.wait_settings().0;
        let group = backup.group();
        if until == WaitUntil::Completed {
            // The AMIs' snapshots carry the same tags, added now that they are known.
            let ids: Vec<String> = made
                .values()
                .filter(|i| i.state != ImageResult::ROTATED_AWAY)
                .map(|i| i.image_id.clone())
                .collect();
            let (now, rids) = ec2
                .describe_images(Some(ids), &Vec::new())
                .await
                .map_err(|e| failed(e, results.clone()))?;
            results.request_ids.extend(rids);
            for fresh in now {
                let Some(img) = made.values_mut().find(|i| i.image_id == fresh.image_id) else {
                    continue;
                };
                img.creation_date = fresh.creation_date;
                img.snapshot_ids = fresh.snapshot_ids;
                if img.snapshot_ids.is_empty() {
                    continue;
                }
                match ec2.create_tags(&img.snapshot_ids, &fresh.tags, false).await {
                    Ok(outs) => results
                        .request_ids
                        .extend(outs.into_iter().filter_map(|o| o.request_id)),
                    // Another job's rotation (a newer generation of this group) deregistered the
                    // AMI and deleted its snapshots since it was seen available.
                    Err(e) if e.code == "InvalidSnapshot.NotFound" => {
                        let (still, rids) = ec2
                            .describe_images(None, &super::made_by_filters(ctx))
                            .await
                            .map_err(|e| failed(e, results.clone()))?;
                        results.request_ids.extend(rids);
                        if still
                            .iter()
                            .any(|i| i.image_id == img.image_id && i.state != "deregistered")
                        {
                            return Err(failed(e, results.clone()));
                        }
                        img.state = ImageResult::ROTATED_AWAY.into();
                        img.outcome = Some(
                            "created, then deregistered by the rotation of a newer generation before this job finished"
                                .into(),
                        );
                    }
                    Err(e) => return Err(failed(e, results.clone())),
                }
            }
        }
        // Rotation, once every new AMI is available.
        let mut note = String::new();
        if let Some(keep) = backup.keep {
            if until == WaitUntil::Completed {
                ctx.progress(
                    "rotating",
                    &format!("keeping {keep} AMI generation(s) per instance"),
                    None,
                    None,
                )
                .await?;
                let mut rot = self
                    .rotate_images(
                        ctx,
                        ec2,
                        group,
                        made.keys().cloned().collect(),
                        keep as usize,
                        &mut results,
                    )
                    .await
                    .map_err(|e| failed(e, partial(&made, &results)))?;
                let deregistered: usize = rot.values().map(|r| r.deleted.len()).sum();
                let snaps: usize = rot.values().map(|r| r.deleted_snapshots.len()).sum();
                note = format!(
                    "; rotation kept {keep} per instance, deregistered {deregistered} AMI(s) and deleted {snaps} snapshot(s)"
                );
                for (inst, img) in made.iter_mut() {
                    img.rotation = rot.remove(inst);
                }
            } else {
                note = "; rotation skipped (it runs only after waiting for completed)".into();
            }
        }
        results.images = made.into_values().collect();
        let n = results.images.len() as u64;
        let avail = results
            .images
            .iter()
            .filter(|i| i.state == "available")
            .count();
        let summary = format!(
            "{n} AMI{} of {total} instance{} ({avail} available){note}",
            plural(n),
            plural(total)
        );
        ctx.progress("done", &summary, Some(total), Some(total))
            .await?;
        results.summary = Some(summary);
        Ok(results)
    }

    /// Keeps the `keep` newest available AMIs of each instance's rotation group; deregisters the
    /// rest and deletes their snapshots.
    async fn rotate_images(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        group: &str,
        instances: Vec<String>,
        keep: usize,
        results: &mut JobResults,
    ) -> Result<HashMap<String, RotationResult>, ec2jobd_ec2::Ec2Error> {
        let keys: Vec<String> = instances.iter().map(|i| format!("{group}/{i}")).collect();
        let mut found = Vec::new();
        for chunk in keys.chunks(200) {
            let (f, rids) = ec2
                .describe_images(None, &vec![(format!("tag:{ROTATION_TAG}"), chunk.to_vec())])
                .await?;
            results.request_ids.extend(rids);
            found.extend(f);
        }
        let in_flight = rotation::in_flight(ctx, &found).await;
        let mut groups = rotation::by_group(found);
        let mut out = HashMap::new();
        for (inst, key) in instances.iter().zip(keys) {
            let group = groups.remove(&key).unwrap_or_default();
            let (kept, past) = rotation::generations(group, keep, &in_flight);
            let mut r = RotationResult {
                group: key,
                kept: kept.into_iter().map(|i| i.image_id).collect(),
                ..Default::default()
            };
            for img in past {
                match ec2.deregister_image(&img.image_id, false).await {
                    Ok(o) => results.request_ids.extend(o.request_id),
                    Err(e) if e.code.starts_with("InvalidAMIID") => {}
                    Err(e) => return Err(e),
                }
                r.deleted.push(img.image_id.clone());
                for s in img.snapshot_ids {
                    match ec2.delete_snapshot(&s, false).await {
                        Ok(o) => {
                            results.request_ids.extend(o.request_id);
                            r.deleted_snapshots.push(s);
                        }
                        Err(e) if e.code == "InvalidSnapshot.NotFound" => {
                            r.deleted_snapshots.push(s)
                        }
                        Err(e) if e.code == "InvalidSnapshot.InUse" => r.in_use.push(s),
                        Err(e) => return Err(e),
                    }
                }
            }
            out.insert(inst.clone(), r);
        }
        Ok(out)
    }

    /// `deregister_image`: the targeted AMIs, and with `params.delete_snapshots` their snapshots.
    pub(super) async fn deregister_image(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        p: &DeregisterParams,
    ) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        let mut results = JobResults::default();
        let imgs = self.target_images(ctx, ec2, &mut results).await?;
        if imgs.is_empty() {
            results.summary = Some("no AMI matched the targets; nothing to do".into());
            return Ok(results);
        }
        let (mut ok, mut snaps) = (true, 0);
        for mut img in imgs {
            ctx.check_cancel(&results)?;
            let o = ec2
                .deregister_image(&img.image_id, spec.dry_run)
                .await
                .map_err(|e| failed(e, results.clone()))?;
            ok &= o.dry_run_ok;
            results.request_ids.extend(o.request_id);
            if !spec.dry_run {
                img.state = "deregistered".into();
                let mut did = vec!["deregistered".to_string()];
                if p.delete_snapshots.unwrap_or(false) {
                    for s in &img.snapshot_ids {
                        match ec2.delete_snapshot(s, false).await {
                            Ok(o) => {
                                results.request_ids.extend(o.request_id);
                                snaps += 1;
                                did.push(format!("deleted {s}"));
                            }
                            Err(e) if e.code == "InvalidSnapshot.InUse" => {
                                did.push(format!("kept {s} (in use)"))
                            }
                            Err(e) => return Err(failed(e, results)),
                        }
                    }
                }
                img.outcome = Some(did.join("; "));
            }
            results.images.push(img);
        }
        let n = results.images.len() as u64;
        results.summary = Some(if spec.dry_run {
            format!(
                "dry run: DeregisterImage {} for {n} AMI(s)",
                dry_run_verdict(ok)
            )
        } else {
            format!(
                "deregistered {n} AMI{}; deleted {snaps} snapshot(s)",
                plural(n)
            )
        });
        Ok(results)
    }

    async fn target_images(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        results: &mut JobResults,
    ) -> Result<Vec<ImageResult>, ExecError> {
        let t = &ctx.job.spec.targets;
        ctx.check_cancel(results)?;
        let filters = t
            .image_tags
            .as_ref()
            .map(|tags| super::filters_for_tags(&tags.0))
            .unwrap_or_default();
        let (imgs, rids) = ec2
            .describe_images(t.image_ids.as_ref().map(|l| l.0.clone()), &filters)
            .await
            .map_err(|e| failed(e, results.clone()))?;
        results.request_ids.extend(rids);
        if imgs.is_empty() && !ctx.job.spec.allow_empty {
            return Err(no_targets(results.clone()));
        }
        Ok(imgs)
    }

    /// `copy_snapshot` and `copy_image`: each target copied into `params.destination_region`
    /// (same account), tagged with the job and its source, then waited for.
    pub(super) async fn copy(
        &self,
        ctx: &ExecCtx,
        ec2: &Ec2,
        p: &CopyParams,
        (account, region): (&str, &str),
        kind: Ready,
    ) -> Result<JobResults, ExecError> {
        let spec = &ctx.job.spec;
        let job_id = &ctx.job.id;
        let mut results = JobResults::default();
        let dest_region = p.destination_region.clone();
        let dest = self
            .pool
            .get(account, &dest_region)
            .await
            .map_err(|e| failed(e, results.clone()))?;
        // Sources: (id, name, description).
        let sources: Vec<(String, Option<String>)> = match kind {
            Ready::Snapshots => {
                let t = &spec.targets;
                let mut filters = t
                    .snapshot_tags
                    .as_ref()
                    .map(|tags| super::filters_for_tags(&tags.0))
                    .unwrap_or_default();
                if let Some(v) = &t.volume_ids {
                    filters.push(("volume-id".into(), v.0.clone()));
                }
                let (snaps, rids, _) = ec2
                    .describe_snapshots(
                        t.snapshot_ids.as_ref().map(|l| l.0.clone()),
                        &filters,
                        false,
                    )
                    .await
                    .map_err(|e| failed(e, results.clone()))?;
                results.request_ids.extend(rids);
                snaps
                    .into_iter()
                    .map(|s| (s.snapshot_id, s.description))
                    .collect()
            }
            Ready::Images => self
                .target_images(ctx, ec2, &mut results)
                .await?
                .into_iter()
                .map(|i| (i.image_id, i.name))
                .collect(),
        };
        if sources.is_empty() {
            if spec.allow_empty {
                results.summary = Some("nothing matched the targets; nothing to copy".into());
                return Ok(results);
            }
            return Err(no_targets(results));
        }
        let mut tags = p.tags.clone().unwrap_or_default();
        tags.extend(super::made_by(ctx));
        let at = ctx.job.started_at.unwrap_or(ctx.job.created_at);
        let opts = |source: &str, desc: Option<&str>| CopyOptions {
            encrypted: p.encrypted.unwrap_or(false),
            kms_key_id: p.kms_key_id.clone(),
            description: p
                .description
                .as_deref()
                .map(|t| fill(t, (desc.unwrap_or(""), ""), job_id, "", at))
                .or_else(|| {
                    Some(format!(
                        "copy of {source} from {region}{}",
                        desc.map(|d| format!(": {d}")).unwrap_or_default()
                    ))
                }),
            tags: {
                let mut t = tags.clone();
                t.insert(SOURCE_TAG.to_string(), format!("{region}/{source}"));
                t
            },
        };
        // Copies an earlier attempt made, by job tag in the destination: source → copy id.
        let mut copies: BTreeMap<String, String> = BTreeMap::new();
        if ctx.resumed() {
            let f = super::made_by_filters(ctx);
            let found: Vec<(String, BTreeMap<String, String>)> = match kind {
                Ready::Snapshots => dest
                    .describe_snapshots(None, &f, false)
                    .await
                    .map_err(|e| failed(e, results.clone()))?
                    .0
                    .into_iter()
                    .map(|s| (s.snapshot_id, s.tags))
                    .collect(),
                Ready::Images => dest
                    .describe_images(None, &f)
                    .await
                    .map_err(|e| failed(e, results.clone()))?
                    .0
                    .into_iter()
                    .map(|i| (i.image_id, i.tags))
                    .collect(),
            };
            for (id, t) in found {
                if let Some(src) = t.get(SOURCE_TAG).and_then(|s| s.rsplit('/').next()) {
                    copies.insert(src.to_string(), id);
                }
            }
        }
        let mut dry_ok = true;
        for (src, desc) in &sources {
            if copies.contains_key(src) {
                continue;
            }
            ctx.check_cancel(&results)?;
            let source = src.clone();
            Checkpoint::Copying { source }.save(ctx).await?;
            ctx.progress(
                "calling",
                &format!(
                    "copying {src} to {dest_region} ({} of {})",
                    copies.len() + 1,
                    sources.len()
                ),
                Some(copies.len() as u64),
                Some(sources.len() as u64),
            )
            .await?;
            let o = opts(src, desc.as_deref());
            let (id, out) = match kind {
                Ready::Snapshots => dest.copy_snapshot(region, src, &o, spec.dry_run).await,
                Ready::Images => {
                    let name =
                        ami_name(&format!("{}-copy-{job_id}", desc.as_deref().unwrap_or(src)));
                    let name = p
                        .name
                        .as_deref()
                        .map(|t| {
                            ami_name(&fill(
                                t,
                                (desc.as_deref().unwrap_or(""), ""),
                                job_id,
                                "",
                                at,
                            ))
                        })
                        .unwrap_or(name);
                    dest.copy_image(region, src, &name, &o, spec.dry_run).await
                }
            }
            .map_err(|e| failed(e, results.clone()))?;
            results.request_ids.extend(out.request_id);
            dry_ok &= out.dry_run_ok;
            if let Some(id) = id {
                if kind == Ready::Images {
                    // CopyImage takes no tags: they follow at once, before the checkpoint.
                    let grace = self.settings.consistency_timeout;
                    let ids = std::slice::from_ref(&id);
                    until_known(grace, || dest.create_tags(ids, &o.tags, false))
                        .await
                        .map_err(|e| failed(e, results.clone()))?;
                }
                copies.insert(src.clone(), id);
            }
            let source = src.clone();
            Checkpoint::Copied { source }.save(ctx).await?;
        }
        if spec.dry_run {
            results.summary = Some(format!(
                "dry run: copy to {dest_region} {} for {} item(s)",
                dry_run_verdict(dry_ok),
                sources.len()
            ));
            return Ok(results);
        }
        let labels = copies
            .iter()
            .map(|(src, c)| (c.clone(), format!("copy {c} of {src}")))
            .collect();
        let after = AfterReady {
            wait: self.ready_wait(ctx, &dest_region, kind.watched(), labels),
            results,
            made: ReadyMade::Copies {
                copies,
                source_region: region.to_string(),
            },
        };
        self.ready_and_finish(ctx, ec2, None, after).await
    }
}

/// After the wait for the copies (in `dest_region`, of `kind`; or none asked for): their rows and
/// the summary.
pub(super) async fn finish_copies(
    ctx: &ExecCtx,
    kind: Watched,
    (region, dest_region): (&str, &str),
    copies: BTreeMap<String, String>,
    mut results: JobResults,
    outcome: WaitOutcome,
) -> Result<JobResults, ExecError> {
    for (src, copy) in &copies {
        let (state, progress) = outcome
            .ready
            .get(copy)
            .cloned()
            .unwrap_or(("pending".into(), None));
        let outcome = Some(format!("copy of {src} ({region})"));
        let in_region = Some(dest_region.to_string());
        let image_id = copy.clone();
        match kind {
            Watched::Images => results.images.push(ImageResult {
                image_id,
                state,
                region: in_region,
                outcome,
                ..Default::default()
            }),
            _ => results.snapshots.push(SnapshotResult {
                snapshot_id: image_id,
                state,
                progress,
                region: in_region,
                outcome,
                ..Default::default()
            }),
        }
    }
    ready_failure(&outcome, || results.clone(), false)?;
    let n = copies.len() as u64;
    let summary = format!("copied {n} {} to {dest_region}", kind.noun());
    ctx.progress("done", &summary, Some(n), Some(n)).await?;
    results.summary = Some(summary);
    Ok(results)
}

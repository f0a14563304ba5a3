//! EBS and AMI calls for backup jobs: volumes to back up; snapshots and AMIs made, described,
//! copied, deleted. Like the instance calls, each is paced, counted and classified; results come
//! back as the spec's types.

use std::collections::BTreeMap;

use aws_sdk_ec2::operation::RequestId;
use aws_sdk_ec2::types::{Filter as AwsFilter, ResourceType, Snapshot};
use ec2jobd_spec::SnapshotResult;

use crate::unanswered::creating;
use crate::{classify, tag_spec, CallOutcome, Ec2, Ec2Error};

/// One EBS volume and where it is attached.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VolumeInfo {
    /// The volume id.
    pub volume_id: String,
    /// Size, GiB.
    pub size_gib: Option<i32>,
    /// Volume state (`in-use`, `available`, …).
    pub state: String,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// (instance id, device) of each attachment.
    pub attachments: Vec<(String, String)>,
}

/// A Describe* filter: name and accepted values.
pub type Filters = Vec<(String, Vec<String>)>;

fn aws_filters(f: &Filters) -> Option<Vec<AwsFilter>> {
    (!f.is_empty()).then(|| {
        f.iter()
            .map(|(n, v)| {
                AwsFilter::builder()
                    .name(n)
                    .set_values(Some(v.clone()))
                    .build()
            })
            .collect()
    })
}

fn tag_map(tags: &[aws_sdk_ec2::types::Tag]) -> BTreeMap<String, String> {
    tags.iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .collect()
}

/// Maps an EC2 snapshot to a result row.
pub fn snapshot_result(s: &Snapshot) -> SnapshotResult {
    SnapshotResult {
        snapshot_id: s.snapshot_id().unwrap_or_default().to_string(),
        volume_id: s.volume_id().map(String::from),
        state: s
            .state()
            .map(|st| st.as_str().to_string())
            .unwrap_or_else(|| "unknown".into()),
        progress: s.progress().filter(|p| !p.is_empty()).map(String::from),
        volume_size_gib: s.volume_size(),
        start_time: s
            .start_time()
            .and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok()),
        description: s.description().filter(|d| !d.is_empty()).map(String::from),
        tags: tag_map(s.tags()),
        ..Default::default()
    }
}

impl Ec2 {
    /// Volumes by id and/or filters, following `NextToken` until the last page.
    pub async fn describe_volumes(
        &self,
        ids: Option<Vec<String>>,
        filters: &Filters,
    ) -> Result<(Vec<VolumeInfo>, Vec<String>), Ec2Error> {
        let mut out = Vec::new();
        let mut request_ids = Vec::new();
        let mut token: Option<String> = None;
        loop {
            self.pace("DescribeVolumes").await;
            let mut req = self
                .client
                .describe_volumes()
                .set_volume_ids(ids.clone())
                .set_filters(aws_filters(filters))
                .set_next_token(token.clone());
            if ids.is_none() {
                req = req.max_results(500);
            }
            let r = req.send().await.map_err(|e| classify("DescribeVolumes", e));
            self.observe("DescribeVolumes", &r);
            let page = r?;
            request_ids.extend(page.request_id().map(String::from));
            for v in page.volumes() {
                out.push(VolumeInfo {
                    volume_id: v.volume_id().unwrap_or_default().to_string(),
                    size_gib: v.size(),
                    state: v
                        .state()
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_default(),
                    tags: tag_map(v.tags()),
                    attachments: v
                        .attachments()
                        .iter()
                        .filter_map(|a| {
                            Some((a.instance_id()?.to_string(), a.device()?.to_string()))
                        })
                        .collect(),
                });
            }
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(String::from);
            if token.is_none() {
                return Ok((out, request_ids));
            }
        }
    }

    /// CreateSnapshot with its tags set at creation (atomically, so a crash right after the call
    /// still leaves a snapshot a resumed job can find by tag).
    pub async fn create_snapshot(
        &self,
        volume_id: &str,
        description: &str,
        tags: &BTreeMap<String, String>,
        dry_run: bool,
    ) -> Result<(Option<SnapshotResult>, CallOutcome), Ec2Error> {
        self.pace("CreateSnapshot").await;
        let r = self
            .client
            .create_snapshot()
            .volume_id(volume_id)
            .description(description)
            .tag_specifications(tag_spec(ResourceType::Snapshot, tags))
            .dry_run(dry_run)
            .customize()
            .config_override(creating())
            .send()
            .await;
        self.created("CreateSnapshot", r, |out| SnapshotResult {
            snapshot_id: out.snapshot_id().unwrap_or_default().to_string(),
            volume_id: out.volume_id().map(String::from),
            state: out
                .state()
                .map(|s| s.as_str().to_string())
                .unwrap_or_else(|| "pending".into()),
            progress: out.progress().map(String::from),
            volume_size_gib: out.volume_size(),
            start_time: out
                .start_time()
                .and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok()),
            description: out.description().map(String::from),
            tags: tag_map(out.tags()),
            ..Default::default()
        })
    }

    /// Snapshots this account owns, by id and/or filters, following `NextToken`.
    pub async fn describe_snapshots(
        &self,
        ids: Option<Vec<String>>,
        filters: &Filters,
        dry_run: bool,
    ) -> Result<(Vec<SnapshotResult>, Vec<String>, bool), Ec2Error> {
        let mut out = Vec::new();
        let mut request_ids = Vec::new();
        let mut token: Option<String> = None;
        loop {
            self.pace("DescribeSnapshots").await;
            let mut req = self
                .client
                .describe_snapshots()
                // Never public or shared snapshots: rotation must only ever see the account's own.
                .owner_ids("self")
                .set_snapshot_ids(ids.clone())
                .set_filters(aws_filters(filters))
                .set_next_token(token.clone());
            if ids.is_none() {
                req = req.max_results(1000);
            }
            if dry_run {
                req = req.dry_run(true);
            }
            let r = req
                .send()
                .await
                .map_err(|e| classify("DescribeSnapshots", e));
            self.observe("DescribeSnapshots", &r);
            let page = match r {
                Ok(p) => p,
                Err(e) if dry_run && e.code == "DryRunOperation" => {
                    request_ids.extend(e.request_id);
                    return Ok((out, request_ids, true));
                }
                Err(e) => return Err(e),
            };
            request_ids.extend(page.request_id().map(String::from));
            out.extend(page.snapshots().iter().map(snapshot_result));
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(String::from);
            if token.is_none() {
                return Ok((out, request_ids, false));
            }
        }
    }

    /// DeleteSnapshot. `InvalidSnapshot.InUse` (an AMI uses it) comes back as an error for the
    /// caller to treat as "kept".
    pub async fn delete_snapshot(&self, id: &str, dry_run: bool) -> Result<CallOutcome, Ec2Error> {
        self.pace("DeleteSnapshot").await;
        let r = self
            .client
            .delete_snapshot()
            .snapshot_id(id)
            .dry_run(dry_run)
            .send()
            .await;
        self.outcome("DeleteSnapshot", r)
    }
}

/// Maps an EC2 image to a result row.
pub fn image_result(i: &aws_sdk_ec2::types::Image) -> ec2jobd_spec::ImageResult {
    ec2jobd_spec::ImageResult {
        image_id: i.image_id().unwrap_or_default().to_string(),
        name: i.name().map(String::from),
        state: i
            .state()
            .map(|s| s.as_str().to_string())
            .unwrap_or_else(|| "unknown".into()),
        creation_date: i.creation_date().map(String::from),
        snapshot_ids: i
            .block_device_mappings()
            .iter()
            .filter_map(|m| m.ebs()?.snapshot_id().map(String::from))
            .collect(),
        tags: tag_map(i.tags()),
        ..Default::default()
    }
}

/// Encryption of a copy: `encrypted`, with a customer key when given.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Encrypt the copy.
    pub encrypted: bool,
    /// KMS key for the copy (implies encryption).
    pub kms_key_id: Option<String>,
    /// Description of the copy.
    pub description: Option<String>,
    /// Tags of the copy (set at creation where EC2 allows it).
    pub tags: BTreeMap<String, String>,
}

impl CopyOptions {
    /// `Encrypted` for the call: set when asked for, or implied by a KMS key; left out otherwise.
    fn encrypt(&self) -> Option<bool> {
        (self.encrypted || self.kms_key_id.is_some()).then_some(true)
    }
}

impl Ec2 {
    /// CreateImage, tagging the AMI at creation (its snapshots are tagged once known: moto rejects
    /// snapshot tag specifications on CreateImage). Returns the AMI id.
    pub async fn create_image(
        &self,
        instance_id: &str,
        name: &str,
        description: &str,
        no_reboot: bool,
        tags: &BTreeMap<String, String>,
        dry_run: bool,
    ) -> Result<(Option<String>, CallOutcome), Ec2Error> {
        self.pace("CreateImage").await;
        let r = self
            .client
            .create_image()
            .instance_id(instance_id)
            .name(name)
            .description(description)
            .no_reboot(no_reboot)
            .tag_specifications(tag_spec(ResourceType::Image, tags))
            .dry_run(dry_run)
            .customize()
            .config_override(creating())
            .send()
            .await;
        self.created("CreateImage", r, |out| out.image_id().map(String::from))
            .map(|(id, o)| (id.flatten(), o))
    }

    /// AMIs this account owns, by id and/or filters.
    pub async fn describe_images(
        &self,
        ids: Option<Vec<String>>,
        filters: &Filters,
    ) -> Result<(Vec<ec2jobd_spec::ImageResult>, Vec<String>), Ec2Error> {
        let mut out = Vec::new();
        let mut request_ids = Vec::new();
        let mut token: Option<String> = None;
        loop {
            self.pace("DescribeImages").await;
            let mut req = self
                .client
                .describe_images()
                .owners("self")
                .set_image_ids(ids.clone())
                .set_filters(aws_filters(filters))
                .set_next_token(token.clone());
            if ids.is_none() {
                req = req.max_results(1000);
            }
            let r = req.send().await.map_err(|e| classify("DescribeImages", e));
            self.observe("DescribeImages", &r);
            let page = r?;
            request_ids.extend(page.request_id().map(String::from));
            out.extend(page.images().iter().map(image_result));
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(String::from);
            if token.is_none() {
                return Ok((out, request_ids));
            }
        }
    }

    /// DeregisterImage.
    pub async fn deregister_image(&self, id: &str, dry_run: bool) -> Result<CallOutcome, Ec2Error> {
        self.pace("DeregisterImage").await;
        let r = self
            .client
            .deregister_image()
            .image_id(id)
            .dry_run(dry_run)
            .send()
            .await;
        self.outcome("DeregisterImage", r)
    }

    /// CopySnapshot into this client's region from `source_region`. Returns the copy's id.
    pub async fn copy_snapshot(
        &self,
        source_region: &str,
        snapshot_id: &str,
        o: &CopyOptions,
        dry_run: bool,
    ) -> Result<(Option<String>, CallOutcome), Ec2Error> {
        self.pace("CopySnapshot").await;
        let mut req = self
            .client
            .copy_snapshot()
            .source_region(source_region)
            .source_snapshot_id(snapshot_id)
            .set_description(o.description.clone())
            .set_kms_key_id(o.kms_key_id.clone())
            .set_encrypted(o.encrypt())
            .dry_run(dry_run);
        if !o.tags.is_empty() {
            req = req.tag_specifications(tag_spec(ResourceType::Snapshot, &o.tags));
        }
        let r = req.customize().config_override(creating()).send().await;
        self.created("CopySnapshot", r, |out| out.snapshot_id().map(String::from))
            .map(|(id, o)| (id.flatten(), o))
    }

    /// CopyImage into this client's region from `source_region`. Returns the copy's id. (Tags are
    /// added afterwards with CreateTags: CopyImage takes none for the AMI in every SDK version.)
    pub async fn copy_image(
        &self,
        source_region: &str,
        image_id: &str,
        name: &str,
        o: &CopyOptions,
        dry_run: bool,
    ) -> Result<(Option<String>, CallOutcome), Ec2Error> {
        self.pace("CopyImage").await;
        let req = self
            .client
            .copy_image()
            .source_region(source_region)
            .source_image_id(image_id)
            .name(name)
            .set_description(o.description.clone())
            .set_kms_key_id(o.kms_key_id.clone())
            .set_encrypted(o.encrypt())
            .dry_run(dry_run);
        let r = req.customize().config_override(creating()).send().await;
        self.created("CopyImage", r, |out| out.image_id().map(String::from))
            .map(|(id, o)| (id.flatten(), o))
    }
}

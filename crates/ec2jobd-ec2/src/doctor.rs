//! What `ec2jobd doctor` asks EC2 before the first job: whether the region is one this account
//! may use, and whether each operation the enabled actions call is permitted, asked with EC2's
//! `DryRun` (made-up resource ids, so nothing is touched even where a dry run is ignored).
//! Must not: change anything in EC2, pace or retry (a check reports what it saw once).

use aws_sdk_ec2::types::{
    AttributeBooleanValue, InstanceAttributeName, InstanceType as AwsInstanceType, Tag,
};

use crate::{classify, Ec2, Ec2Error};

const FAKE_INSTANCE: &str = "i-0ec2b0d0c0000000f";
const FAKE_IMAGE: &str = "ami-0ec2b0d0c0000000f";
const FAKE_VOLUME: &str = "vol-0ec2b0d0c0000000f";
const FAKE_SNAPSHOT: &str = "snap-0ec2b0d0c0000000f";

/// What a dry run said about one operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Permission {
    /// `DryRunOperation` (or the call went through: an endpoint that ignores `DryRun`).
    Allowed,
    /// `UnauthorizedOperation` and the like: the policy lacks it.
    Denied(String),
    /// Another answer (a made-up id refused before the permission check, a connection error):
    /// not refused, not proven either.
    Unknown(String),
}

impl Ec2 {
    /// Asks EC2 whether `op` (an operation name, `StartInstances`) would be permitted.
    pub async fn dry_run(&self, op: &str, region: &str) -> Permission {
        macro_rules! dry {
            ($call:expr) => {
                $call
                    .dry_run(true)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| classify(op, e))
            };
        }
        let tag = Tag::builder()
            .key("ec2jobd:doctor")
            .value("dry-run")
            .build();
        let r = match op {
            "DescribeInstances" => dry!(self.client.describe_instances()),
            "DescribeInstanceStatus" => dry!(self.client.describe_instance_status()),
            "DescribeInstanceAttribute" => dry!(self
                .client
                .describe_instance_attribute()
                .instance_id(FAKE_INSTANCE)
                .attribute(InstanceAttributeName::DisableApiTermination)),
            "ModifyInstanceAttribute" => dry!(self
                .client
                .modify_instance_attribute()
                .instance_id(FAKE_INSTANCE)
                .disable_api_termination(AttributeBooleanValue::builder().value(false).build())),
            "StartInstances" => dry!(self.client.start_instances().instance_ids(FAKE_INSTANCE)),
            "StopInstances" => dry!(self.client.stop_instances().instance_ids(FAKE_INSTANCE)),
            "RebootInstances" => dry!(self.client.reboot_instances().instance_ids(FAKE_INSTANCE)),
            "TerminateInstances" => dry!(self
                .client
                .terminate_instances()
                .instance_ids(FAKE_INSTANCE)),
            "RunInstances" => dry!(self
                .client
                .run_instances()
                .image_id(FAKE_IMAGE)
                .instance_type(AwsInstanceType::T3Micro)
                .min_count(1)
                .max_count(1)),
            "CreateTags" => dry!(self
                .client
                .create_tags()
                .resources(FAKE_INSTANCE)
                .tags(tag.clone())),
            "DeleteTags" => dry!(self.client.delete_tags().resources(FAKE_INSTANCE).tags(tag)),
            "DescribeVolumes" => dry!(self.client.describe_volumes()),
            "DescribeSnapshots" => dry!(self.client.describe_snapshots().owner_ids("self")),
            "DescribeImages" => dry!(self.client.describe_images().owners("self")),
            "CreateSnapshot" => dry!(self.client.create_snapshot().volume_id(FAKE_VOLUME)),
            "DeleteSnapshot" => dry!(self.client.delete_snapshot().snapshot_id(FAKE_SNAPSHOT)),
            "CopySnapshot" => dry!(self
                .client
                .copy_snapshot()
                .source_snapshot_id(FAKE_SNAPSHOT)
                .source_region(region)),
            "CreateImage" => dry!(self
                .client
                .create_image()
                .instance_id(FAKE_INSTANCE)
                .name("ec2jobd-doctor")),
            "DeregisterImage" => dry!(self.client.deregister_image().image_id(FAKE_IMAGE)),
            "CopyImage" => dry!(self
                .client
                .copy_image()
                .source_image_id(FAKE_IMAGE)
                .source_region(region)
                .name("ec2jobd-doctor")),
            other => return Permission::Unknown(format!("no dry run for {other}")),
        };
        permission(r)
    }

    /// The region's opt-in status as EC2 lists it for this account (`opt-in-not-required`,
    /// `opted-in`, `not-opted-in`), or `None` when EC2 does not know the region at all.
    pub async fn region_status(&self, region: &str) -> Result<Option<String>, Ec2Error> {
        let out = self
            .client
            .describe_regions()
            .all_regions(true)
            .send()
            .await
            .map_err(|e| classify("DescribeRegions", e))?;
        Ok(out
            .regions()
            .iter()
            .find(|r| r.region_name() == Some(region))
            .map(|r| {
                r.opt_in_status()
                    .unwrap_or("opt-in-not-required")
                    .to_string()
            }))
    }
}

/// A dry run's answer as a permission.
fn permission(r: Result<(), Ec2Error>) -> Permission {
    match r {
        Ok(()) => Permission::Allowed,
        Err(e) if e.code == "DryRunOperation" => Permission::Allowed,
        Err(e)
            if matches!(
                e.code.as_str(),
                "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" | "AuthFailure"
            ) =>
        {
            Permission::Denied(format!("{}: {}", e.code, e.message))
        }
        Err(e) => Permission::Unknown(format!("{}: {}", e.code, e.message)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(code: &str) -> Result<(), Ec2Error> {
        Err(Ec2Error {
            code: code.into(),
            message: "m".into(),
            request_id: None,
            transient: false,
        })
    }

    #[test]
    fn dry_run_answers_read_as_permissions() {
        assert_eq!(permission(err("DryRunOperation")), Permission::Allowed);
        assert_eq!(permission(Ok(())), Permission::Allowed);
        assert_eq!(
            permission(err("UnauthorizedOperation")),
            Permission::Denied("UnauthorizedOperation: m".into())
        );
        assert!(matches!(
            permission(err("InvalidInstanceID.NotFound")),
            Permission::Unknown(_)
        ));
    }
}

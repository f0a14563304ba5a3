//! The job request (`JobSpec`) and its normalisation.
//!
//! A spec arrives in whatever shape a scheduler finds natural (`"i-1;i-2"`, `"AutoOn=yes"`), is
//! checked field by field, and is stored in one canonical shape so that replays can be compared
//! and workers never re-parse user input. Every rejection names the offending field.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::action::ActionSpec;
use crate::placeholders;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, OneOfBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::ToSchema;

/// The EC2 operation a job performs. Only actions the daemon can execute are listed, so an unknown or
/// not-yet-built action is rejected at submission instead of failing later in a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Describe the targeted instances (paginated) and record each one in the results.
    DescribeInstances,
    /// Launch instances (`params.image_id`, `params.instance_type`, counts, network, tags…); takes no
    /// targets; waits for `status_ok` by default.
    RunInstances,
    /// Start stopped instances; waits for `status_ok` by default.
    StartInstances,
    /// Stop running instances (`params.force`, `params.hibernate`, `params.fallback_to_stop`); waits for `stopped` by default.
    StopInstances,
    /// Reboot running instances; waits for `status_ok` by default.
    RebootInstances,
    /// Terminate instances; waits for `terminated` by default.
    TerminateInstances,
    /// Add or overwrite tags (`params.tags`).
    CreateTags,
    /// Remove tags (`params.keys`, or `params.tags` to remove only matching values).
    DeleteTags,
    /// Change instance attributes: `params.instance_type` (a running instance is stopped, changed,
    /// started again and waited for `status_ok`; a stopped one stays stopped),
    /// `params.termination_protection`, `params.stop_protection`.
    ModifyInstanceAttribute,
    /// Report the instances in scope that lack any of `params.required_keys`; fails the job when
    /// some do (`params.on_missing = "fail"`, the default) or only lists them (`"warn"`).
    AuditTags,
    /// Snapshot every volume of the targeted instances (or the targeted volumes), wait until the
    /// snapshots complete, then rotate: keep `params.keep` generations per volume, deleting only
    /// snapshots ec2jobd made for that volume and group.
    CreateSnapshots,
    /// Describe snapshots by `snapshot_ids`, `snapshot_tags` or `volume_ids`.
    DescribeSnapshots,
    /// Delete the targeted snapshots; one an AMI still uses is kept and reported, not an error.
    DeleteSnapshots,
    /// Copy the targeted snapshots to `params.destination_region` (optionally encrypted with
    /// `params.kms_key_id`) and wait until the copies complete.
    CopySnapshot,
    /// Make an AMI of each targeted instance (`params.name` template with `{timestamp}`,
    /// `params.no_reboot`), wait until it is available, then keep `params.keep` generations per
    /// instance: older AMIs ec2jobd made are deregistered and their snapshots deleted.
    CreateImage,
    /// Deregister the targeted AMIs (`image_ids`, `image_tags`); `params.delete_snapshots` also
    /// deletes their EBS snapshots.
    DeregisterImage,
    /// Copy the targeted AMIs to `params.destination_region` and wait until the copies are available.
    CopyImage,
    /// Run `steps` in order, each an action spec; a step's targets may be an earlier step's
    /// instances (`{"from_step": "<name>"}`).
    Workflow,
}

impl Action {
    /// Every action, for listings and metrics labels.
    pub const ALL: &'static [Action] = &[
        Action::DescribeInstances,
        Action::RunInstances,
        Action::StartInstances,
        Action::StopInstances,
        Action::RebootInstances,
        Action::TerminateInstances,
        Action::CreateTags,
        Action::DeleteTags,
        Action::ModifyInstanceAttribute,
        Action::AuditTags,
        Action::CreateSnapshots,
        Action::DescribeSnapshots,
        Action::DeleteSnapshots,
        Action::CopySnapshot,
        Action::CreateImage,
        Action::DeregisterImage,
        Action::CopyImage,
        Action::Workflow,
    ];

    /// The wire name (`describe_instances`), also used as a metrics label and list filter.
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::DescribeInstances => "describe_instances",
            Action::RunInstances => "run_instances",
            Action::StartInstances => "start_instances",
            Action::StopInstances => "stop_instances",
            Action::RebootInstances => "reboot_instances",
            Action::TerminateInstances => "terminate_instances",
            Action::CreateTags => "create_tags",
            Action::DeleteTags => "delete_tags",
            Action::ModifyInstanceAttribute => "modify_instance_attribute",
            Action::AuditTags => "audit_tags",
            Action::CreateSnapshots => "create_snapshots",
            Action::DescribeSnapshots => "describe_snapshots",
            Action::DeleteSnapshots => "delete_snapshots",
            Action::CopySnapshot => "copy_snapshot",
            Action::CreateImage => "create_image",
            Action::DeregisterImage => "deregister_image",
            Action::CopyImage => "copy_image",
            Action::Workflow => "workflow",
        }
    }

    /// Parses the wire name; `None` for anything unknown.
    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.iter().copied().find(|a| a.as_str() == s)
    }

    /// What `wait.until` means when the request leaves it out.
    pub fn default_wait(&self) -> WaitUntil {
        match self {
            // For modify_instance_attribute the wait applies to the instances it had to restart.
            Action::RunInstances
            | Action::StartInstances
            | Action::RebootInstances
            | Action::ModifyInstanceAttribute => WaitUntil::StatusOk,
            Action::StopInstances => WaitUntil::Stopped,
            Action::TerminateInstances => WaitUntil::Terminated,
            Action::CreateSnapshots
            | Action::CopySnapshot
            | Action::CreateImage
            | Action::CopyImage => WaitUntil::Completed,
            Action::DescribeInstances
            | Action::CreateTags
            | Action::DeleteTags
            | Action::AuditTags
            | Action::DescribeSnapshots
            | Action::DeleteSnapshots
            | Action::DeregisterImage
            | Action::Workflow => WaitUntil::None,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected field: the dotted path of the offending field, a stable machine code, and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct SpecError {
    /// Dotted path of the offending field, e.g. `targets.instance_ids[1]`.
    pub field: String,
    /// Stable code for programs (`invalid_instance_id`, `missing_targets`, …).
    pub code: &'static str,
    /// Human sentence saying what is wrong and what would be right.
    pub message: String,
}

impl SpecError {
    pub(crate) fn new(
        field: impl Into<String>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            field: field.into(),
            code,
            message: message.into(),
        }
    }
}

/// Instance ids as a list; also accepts the scheduler style `"i-1;i-2"` (`;` or `,` separated).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct IdList(pub Vec<String>);

impl Serialize for IdList {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for IdList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = IdList;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of instance ids or a string like \"i-1;i-2\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<IdList, E> {
                Ok(IdList(
                    v.split([';', ','])
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                        .collect(),
                ))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<IdList, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(IdList(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl utoipa::PartialSchema for IdList {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ArrayBuilder::new()
                    .items(ObjectBuilder::new().schema_type(Type::String))
                    .build(),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("Scheduler style: ids separated by `;` or `,`"))
                    .build(),
            )
            .description(Some(
                "Instance ids (`i-` and 8 or 17 hex digits), as a list or as \"i-1;i-2\"",
            ))
            .into()
    }
}
impl ToSchema for IdList {}

/// Tags to match (all must match); also accepts the scheduler style `"AutoOn=yes;Env=prod"`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TagSet(pub BTreeMap<String, String>);

impl Serialize for TagSet {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for TagSet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TagSet;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of tag key to value, or a string like \"AutoOn=yes\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TagSet, E> {
                let mut out = BTreeMap::new();
                for part in v.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    let (k, val) = part.split_once('=').ok_or_else(|| {
                        E::custom(format!("tag `{part}` is not of the form Key=Value"))
                    })?;
                    out.insert(k.trim().to_string(), val.trim().to_string());
                }
                Ok(TagSet(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TagSet, A::Error> {
                let mut out = BTreeMap::new();
                while let Some((k, v)) = map.next_entry::<String, String>()? {
                    out.insert(k, v);
                }
                Ok(TagSet(out))
            }
        }
        d.deserialize_any(V)
    }
}

impl utoipa::PartialSchema for TagSet {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String)))
                    .build(),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("Scheduler style: `Key=Value` pairs separated by `;`"))
                    .build(),
            )
            .description(Some("Tags every targeted instance must carry"))
            .into()
    }
}
impl ToSchema for TagSet {}

/// An EC2 `Filter` passed through to Describe* calls (e.g. `instance-state-name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Filter name as EC2 documents it, e.g. `instance-type` or `tag:Env`.
    pub name: String,
    /// Accepted values (any may match).
    pub values: Vec<String>,
}

/// Which instances a job acts on. At least one selector is required; given together they narrow
/// each other (EC2 ANDs ids, tags and filters).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Targets {
    /// Explicit instance ids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_ids: Option<IdList>,
    /// Tags every instance must carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tags: Option<TagSet>,
    /// Raw EC2 filters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Vec<Filter>>,
    /// EBS volume ids (`create_snapshots`; `describe_snapshots`/`delete_snapshots`: their snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_ids: Option<IdList>,
    /// Tags every targeted volume must carry (`create_snapshots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_tags: Option<TagSet>,
    /// Snapshot ids (`describe_snapshots`, `delete_snapshots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_ids: Option<IdList>,
    /// Tags every targeted snapshot must carry (`describe_snapshots`, `delete_snapshots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_tags: Option<TagSet>,
    /// AMI ids (`deregister_image`, `copy_image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_ids: Option<IdList>,
    /// Tags every targeted AMI must carry (`deregister_image`, `copy_image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tags: Option<TagSet>,
    /// In a workflow step: the instances an earlier step (by name) acted on or launched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_step: Option<String>,
}

/// What kind of resource an action's targets select.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetKind {
    Instances,
    InstancesOrVolumes,
    Snapshots,
    Images,
}

impl Action {
    fn target_kind(&self) -> TargetKind {
        match self {
            Action::CreateSnapshots => TargetKind::InstancesOrVolumes,
            Action::DescribeSnapshots | Action::DeleteSnapshots | Action::CopySnapshot => {
                TargetKind::Snapshots
            }
            Action::DeregisterImage | Action::CopyImage => TargetKind::Images,
            _ => TargetKind::Instances,
        }
    }

    /// The `wait.until` values that mean something for this action.
    fn waits(&self) -> &'static [WaitUntil] {
        use WaitUntil::*;
        match self {
            Action::CreateSnapshots
            | Action::CopySnapshot
            | Action::CreateImage
            | Action::CopyImage => &[None, Completed],
            Action::DescribeSnapshots
            | Action::DeleteSnapshots
            | Action::DeregisterImage
            | Action::Workflow => &[None],
            _ => &[None, Running, Stopped, Terminated, StatusOk],
        }
    }
}

/// What state a job waits for after its calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WaitUntil {
    /// Do not wait.
    None,
    /// Instance state `running`.
    Running,
    /// Instance state `stopped`.
    Stopped,
    /// Instance state `terminated`.
    Terminated,
    /// Running and every status check `ok` ("2/2 checks passed").
    StatusOk,
    /// What the job created is ready: snapshots `completed`, AMIs `available` (backup actions only).
    Completed,
}

impl WaitUntil {
    /// The wire name.
    pub fn as_str(&self) -> &'static str {
        match self {
            WaitUntil::None => "none",
            WaitUntil::Running => "running",
            WaitUntil::Stopped => "stopped",
            WaitUntil::Terminated => "terminated",
            WaitUntil::StatusOk => "status_ok",
            WaitUntil::Completed => "completed",
        }
    }
}

/// How long and how often to wait; durations in humantime (`15m`, `15s`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitSpec {
    /// Target condition; defaults by action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<WaitUntil>,
    /// Give up after this long (default `15m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Poll interval (default `15s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// The action of a spec that names none: a workflow, which [`JobSpec::normalize`] accepts only with
/// `steps` (otherwise `action` is reported missing).
fn implied_action() -> Action {
    Action::Workflow
}

/// A job request as submitted to `POST /v1/jobs`, and, after [`JobSpec::normalize`], as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The operation to perform; may be left out when `steps` are given (a workflow).
    #[serde(default = "implied_action")]
    pub action: Action,
    /// Configured account name (`[accounts.<name>]`); defaults to `default_account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// AWS region; defaults to the account's region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Which instances to act on.
    #[serde(default)]
    pub targets: Targets,
    /// Action-specific parameters.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub params: serde_json::Map<String, serde_json::Value>,
    /// What to wait for after the calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<WaitSpec>,
    /// Pass `DryRun` to EC2: permission check only, nothing changes.
    #[serde(default)]
    pub dry_run: bool,
    /// Succeed with no instances when the targets match none (default: fail with `NoTargets`).
    #[serde(default)]
    pub allow_empty: bool,
    /// Per-job time limit for one attempt (humantime); defaults to `queue.job_timeout`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Attempts before a transient failure becomes final; defaults to `queue.max_attempts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 100)]
    pub max_attempts: Option<u32>,
    /// Claim order: a queued job with a higher priority is started first (then the one due first).
    /// -1000 to 1000; default 0 for submissions, `sns.priority` (100) for jobs SNS rules queue, so
    /// an alarm's job never waits behind queued bulk work. Set on a workflow, not on its steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: Option<i32>,
    /// Process the instances in waves (instance actions): at most `max_concurrency` at a time, no
    /// new wave once more than `max_errors` failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<Rate>,
    /// The steps of a `workflow` job, run in order: each an object with the fields of a job spec
    /// plus `name` and `on_failure` (`stop` or `continue`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Vec<Object>>)]
    pub steps: Option<Vec<Step>>,
    /// Publish the outcome to an SNS topic when the job ends (default: config `[notify]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notify: Option<Notify>,
    /// The W3C trace context the job's spans continue (`00-<trace-id>-<parent-id>-<flags>`): the
    /// submission's `traceparent` header, or given here. Not part of the idempotency comparison (a
    /// retried submission carries a new one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// `s` as a W3C `traceparent` (version 00, lowercase hex, trace and parent ids not all zero), or
/// `None`: an invalid one is ignored, as the W3C recommendation says.
pub fn traceparent(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    let parts: Vec<&str> = s.split('-').collect();
    let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
    let nonzero = |p: &str| p.bytes().any(|b| b != b'0');
    (parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && nonzero(parts[1])
        && hex(parts[2], 16)
        && nonzero(parts[2])
        && hex(parts[3], 2))
    .then_some(s)
}

/// A count, or a percentage of the job's instances (`10` or `"10%"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Amount {
    /// That many.
    Count(u32),
    /// That share of the instances (1-100).
    Percent(u32),
}

impl Amount {
    /// The amount for `n` instances (percentages round down).
    pub fn of(self, n: usize) -> usize {
        match self {
            Amount::Count(c) => c as usize,
            Amount::Percent(p) => n * p as usize / 100,
        }
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Amount::Count(c) => s.serialize_u32(*c),
            Amount::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match &v {
            serde_json::Value::Number(n) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Amount::Count)
                .ok_or_else(|| de::Error::custom("a whole number or a percentage like \"10%\"")),
            serde_json::Value::String(s) => s
                .strip_suffix('%')
                .and_then(|p| p.trim().parse::<u32>().ok())
                .filter(|p| (1..=100).contains(p))
                .map(Amount::Percent)
                .ok_or_else(|| {
                    de::Error::custom(format!("`{s}` is not a percentage from 1% to 100%"))
                }),
            _ => Err(de::Error::custom(
                "a whole number or a percentage like \"10%\"",
            )),
        }
    }
}

impl utoipa::PartialSchema for Amount {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(ObjectBuilder::new().schema_type(Type::Integer))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .description(Some("A percentage of the job's instances, e.g. `10%`")),
            )
            .into()
    }
}
impl ToSchema for Amount {}

/// Waves for bulk instance actions (like SSM Automation's MaxConcurrency / MaxErrors).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Most instances per wave (each wave's calls and waits finish before the next starts).
    pub max_concurrency: Amount,
    /// Failed instances tolerated; one more and no new wave starts (default 0).
    #[serde(default = "no_errors")]
    pub max_errors: Amount,
}

fn no_errors() -> Amount {
    Amount::Count(0)
}

/// One step of a workflow: a name, what to do when it fails, and an action spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Name, unique in the workflow (default `step-<n>`); later steps refer to it in `from_step`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `stop` (default: the workflow fails) or `continue` (record the failure and go on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<String>,
    /// The step's action spec (same fields as a job; account and region default to the workflow's).
    #[serde(flatten)]
    pub spec: Box<JobSpec>,
}

/// Where and when a job's outcome is published.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// SNS topic ARN (`arn:aws:sns:REGION:ACCOUNT:NAME`); published through the job's account.
    pub topic_arn: String,
    /// Final states that publish: `succeeded`, `failed`, `cancelled` (default: all three).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    /// Subject (default `ec2jobd <action> <state>`); at most 100 characters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
}

impl Notify {
    /// Checks the topic ARN, states and subject.
    pub fn check(&self, field: &str) -> Result<(), SpecError> {
        let parts: Vec<&str> = self.topic_arn.split(':').collect();
        if parts.len() != 6 || parts[0] != "arn" || parts[2] != "sns" || parts[3].is_empty() {
            return Err(SpecError::new(
                format!("{field}.topic_arn"),
                "invalid_topic",
                format!(
                    "`{}` is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME)",
                    self.topic_arn
                ),
            ));
        }
        for (i, s) in self.on.iter().enumerate() {
            if !matches!(s.as_str(), "succeeded" | "failed" | "cancelled") {
                return Err(SpecError::new(
                    format!("{field}.on[{i}]"),
                    "invalid_state",
                    "must be succeeded, failed or cancelled",
                ));
            }
        }
        if let Some(s) = &self.subject {
            if s.is_empty() || s.chars().count() > 100 || s.chars().any(|c| c.is_control()) {
                return Err(SpecError::new(
                    format!("{field}.subject"),
                    "invalid_subject",
                    "1-100 characters, no line breaks (SNS's limit)",
                ));
            }
        }
        Ok(())
    }

    /// Whether a job ending in `state` publishes.
    pub fn wants(&self, state: &str) -> bool {
        self.on.is_empty() || self.on.iter().any(|s| s == state)
    }
}

/// `wait.timeout` when the request leaves it out.
/// The priorities a job (or `sns.priority`) may have.
pub const PRIORITY_RANGE: std::ops::RangeInclusive<i32> = -1000..=1000;

const DEFAULT_WAIT_TIMEOUT: &str = "15m";
/// `wait.interval` when the request leaves it out.
const DEFAULT_WAIT_INTERVAL: &str = "15s";

/// Parses a humantime duration (`15m`, `1h 30m`, `250ms`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("`{s}` is not a duration ({e})"))
}

fn check_duration(
    field: &str,
    value: &str,
    min: Duration,
    max: Duration,
) -> Result<String, SpecError> {
    let d = parse_duration(value).map_err(|m| SpecError::new(field, "invalid_duration", m))?;
    if d < min || d > max {
        return Err(SpecError::new(
            field,
            "out_of_range",
            format!(
                "must be between {} and {}",
                humantime::format_duration(min),
                humantime::format_duration(max)
            ),
        ));
    }
    Ok(humantime::format_duration(d).to_string())
}

/// Placeholders a snapshot description template may use.
pub const TEMPLATE_FIELDS: &[&str] = &[
    "name",
    "instance_id",
    "volume_id",
    "device",
    "date",
    "datetime",
    "timestamp",
    "job_id",
    "group",
];

pub(crate) fn check_template(field: &str, t: &str) -> Result<(), SpecError> {
    let syntax = placeholders::Syntax::Braces;
    let err = |e: placeholders::RenderError| SpecError::new(field, "invalid_param", e.to_string());
    for name in placeholders::names(t, syntax).map_err(err)? {
        if !TEMPLATE_FIELDS.contains(&name) {
            return Err(err(placeholders::RenderError::unknown(
                name,
                TEMPLATE_FIELDS,
                syntax,
            )));
        }
    }
    Ok(())
}

/// The values a backup name or description template ([`TEMPLATE_FIELDS`]) is filled with.
#[derive(Debug, Clone)]
pub struct BackupNaming<'a> {
    /// The instance's Name tag (empty when it has none).
    pub name: &'a str,
    /// The instance (`-` for a volume targeted on its own).
    pub instance_id: &'a str,
    /// The volume (empty for an AMI).
    pub volume_id: &'a str,
    /// The device name (`-` when unknown, empty for an AMI).
    pub device: &'a str,
    /// The job.
    pub job_id: &'a str,
    /// The rotation group.
    pub group: &'a str,
    /// The job's start, so a resumed attempt renders the same.
    pub at: chrono::DateTime<chrono::Utc>,
}

impl BackupNaming<'_> {
    /// `t` filled in one pass (checked at submission, so an unknown placeholder is an error here
    /// only for specs stored before the check); at most `limit` bytes.
    pub fn render(&self, t: &str, limit: usize) -> Result<String, placeholders::RenderError> {
        let syntax = placeholders::Syntax::Braces;
        placeholders::render(t, syntax, &mut placeholders::Budget::new(limit), |n| {
            Ok(match n {
                "name" => self.name.into(),
                "instance_id" => self.instance_id.into(),
                "volume_id" => self.volume_id.into(),
                "device" => self.device.into(),
                "date" => self.at.format("%Y-%m-%d").to_string().into(),
                "datetime" => self.at.format("%Y-%m-%dT%H:%M:%SZ").to_string().into(),
                "timestamp" => self.at.format("%Y%m%d-%H%M%S").to_string().into(),
                "job_id" => self.job_id.into(),
                "group" => self.group.into(),
                other => {
                    return Err(placeholders::RenderError::unknown(
                        other,
                        TEMPLATE_FIELDS,
                        syntax,
                    ))
                }
            })
        })
    }
}

/// A region name as AWS forms them: a two-letter area, `gov` for GovCloud, a direction, a number
/// (`us-east-1`, `ap-southeast-3`, `us-gov-west-1`, `cn-northwest-1`, `il-central-1`). Jobs name
/// only such regions (each one in use costs clients and a status watcher), and SNS certificate
/// hosts must carry one.
pub fn is_aws_region(r: &str) -> bool {
    const DIRECTIONS: &[&str] = &[
        "east",
        "west",
        "north",
        "south",
        "central",
        "northeast",
        "northwest",
        "southeast",
        "southwest",
    ];
    let mut parts: Vec<&str> = r.split('-').collect();
    if parts.len() == 4 && parts[1] == "gov" {
        parts.remove(1);
    }
    match parts.as_slice() {
        [area, dir, n] => {
            area.len() == 2
                && area.bytes().all(|b| b.is_ascii_lowercase())
                && DIRECTIONS.contains(dir)
                && (1..=2).contains(&n.len())
                && n.bytes().all(|b| b.is_ascii_digit())
        }
        _ => false,
    }
}

pub(crate) fn is_name(s: &str, extra: &[u8]) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || extra.contains(&b))
}

/// Most steps a workflow has.
pub const MAX_STEPS: usize = 50;

/// Params that are stored and used but never shown or published: user data often carries secrets.
pub const SECRET_PARAMS: &[&str] = &["user_data"];

/// A secret value as shown: `<redacted, sha256:…>` of its text, so two values can be told apart
/// without reading either.
pub fn redact_value(v: &mut serde_json::Value) {
    use sha2::Digest;
    let text = match &*v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let digest = hex::encode(sha2::Sha256::digest(text.as_bytes()));
    *v = serde_json::Value::String(format!("<redacted, sha256:{digest}>"));
}

/// The secret values of a spec written as JSON (a template's, a schedule's or an SNS rule's,
/// placeholders unfilled): every [`SECRET_PARAMS`] value of its `params` and of each workflow
/// step's.
pub fn secret_values_mut(spec: &mut serde_json::Value) -> Vec<&mut serde_json::Value> {
    let mut out = Vec::new();
    let Some(obj) = spec.as_object_mut() else {
        return out;
    };
    let (params, steps) = {
        let mut params = None;
        let mut steps = None;
        for (k, v) in obj.iter_mut() {
            match k.as_str() {
                "params" => params = Some(v),
                "steps" => steps = Some(v),
                _ => {}
            }
        }
        (params, steps)
    };
    if let Some(p) = params.and_then(|p| p.as_object_mut()) {
        out.extend(
            p.iter_mut()
                .filter(|(k, _)| SECRET_PARAMS.contains(&k.as_str()))
                .map(|(_, v)| v),
        );
    }
    for step in steps.and_then(|s| s.as_array_mut()).into_iter().flatten() {
        out.extend(secret_values_mut(step));
    }
    out
}

/// A spec written as JSON with its secrets redacted as [`JobSpec::redact_secrets`] does.
pub fn redact_secrets_json(spec: &mut serde_json::Value) {
    for v in secret_values_mut(spec) {
        redact_value(v);
    }
}

impl JobSpec {
    /// The spec as shown to API clients and published in notifications: every [`SECRET_PARAMS`]
    /// value (in workflow steps too) replaced by `<redacted, sha256:…>`, so a viewer can tell two
    /// values apart without reading either.
    pub fn redact_secrets(&mut self) {
        for key in SECRET_PARAMS {
            if let Some(v) = self.params.get_mut(*key) {
                redact_value(v);
            }
        }
        for step in self.steps.iter_mut().flatten() {
            step.spec.redact_secrets();
        }
    }

    /// Checks every field and returns the canonical form that is stored and hashed for
    /// idempotency: ids deduplicated in order, durations re-rendered, wait defaults filled.
    pub fn normalize(mut self) -> Result<JobSpec, SpecError> {
        self.check_where()?;
        if self.action == Action::Workflow && self.steps.is_none() {
            return Err(SpecError::new(
                "action",
                "missing_field",
                "missing field `action` (or give `steps` for a workflow)",
            ));
        }
        if self.action == Action::Workflow {
            if self.targets != Targets::default() {
                return Err(SpecError::new(
                    "targets",
                    "unexpected_targets",
                    "a workflow's steps have the targets",
                ));
            }
            let steps = self.steps.take().unwrap_or_default();
            self.steps = Some(self.normalize_steps(steps)?);
        } else if self.steps.is_some() {
            return Err(SpecError::new(
                "steps",
                "unexpected_steps",
                "only `\"action\": \"workflow\"` takes steps",
            ));
        } else if self.action == Action::RunInstances {
            if self.targets != Targets::default() {
                return Err(SpecError::new(
                    "targets",
                    "unexpected_targets",
                    "run_instances launches new instances and takes no targets",
                ));
            }
        } else {
            self.targets = normalize_targets(self.targets, self.action.target_kind())?;
        }
        self.params = self.action_spec()?.params();
        self.normalize_wait()?;
        self.check_limits()?;
        Ok(self)
    }

    /// `traceparent`, `account` and `region`: well-formed when given.
    fn check_where(&mut self) -> Result<(), SpecError> {
        if let Some(t) = &self.traceparent {
            self.traceparent = Some(traceparent(t).ok_or_else(|| {
                SpecError::new(
                    "traceparent",
                    "invalid_traceparent",
                    "must be a W3C traceparent: 00-<32 hex>-<16 hex>-<2 hex>",
                )
            })?);
        }
        if let Some(a) = &self.account {
            if !is_name(a, b"-_") {
                return Err(SpecError::new(
                    "account",
                    "invalid_account",
                    "must be 1-64 letters, digits, `-` or `_`",
                ));
            }
        }
        if let Some(r) = &self.region {
            if !is_aws_region(r) {
                return Err(SpecError::new(
                    "region",
                    "invalid_region",
                    format!("`{r}` is not a region name like `us-east-1`"),
                ));
            }
        }
        Ok(())
    }

    /// A workflow's steps, each named (unique), with its failure policy, inheriting the
    /// workflow's account and region, and normalized as a job of its own (a `from_step` target
    /// checked with a stand-in).
    fn normalize_steps(&self, steps: Vec<Step>) -> Result<Vec<Step>, SpecError> {
        if steps.is_empty() || steps.len() > MAX_STEPS {
            return Err(SpecError::new(
                "steps",
                "invalid_steps",
                "give 1 to 50 steps",
            ));
        }
        let mut names: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for (i, st) in steps.into_iter().enumerate() {
            let st = self.normalize_step(i, st, &names)?;
            names.extend(st.name.clone());
            out.push(st);
        }
        Ok(out)
    }

    /// Step `i` of this workflow, after the steps named `earlier`.
    fn normalize_step(
        &self,
        i: usize,
        mut st: Step,
        earlier: &[String],
    ) -> Result<Step, SpecError> {
        let field = |f: &str| format!("steps[{i}].{f}");
        let name = st.name.clone().unwrap_or_else(|| format!("step-{}", i + 1));
        if !is_name(&name, b"-_.") || earlier.contains(&name) {
            return Err(SpecError::new(
                field("name"),
                "invalid_name",
                "1-64 letters, digits, `-`, `_` or `.`, unique in the workflow",
            ));
        }
        if !matches!(
            st.on_failure.as_deref(),
            None | Some("stop") | Some("continue")
        ) {
            return Err(SpecError::new(
                field("on_failure"),
                "invalid_param",
                "stop or continue",
            ));
        }
        if matches!(st.spec.action, Action::Workflow) && st.spec.steps.is_none() {
            return Err(SpecError::new(
                field("action"),
                "missing_field",
                "each step needs its own `action` (steps do not nest)",
            ));
        }
        if st.spec.priority.is_some() {
            return Err(SpecError::new(
                field("priority"),
                "invalid_param",
                "set priority on the workflow, not on a step",
            ));
        }
        if matches!(st.spec.action, Action::Workflow) || st.spec.steps.is_some() {
            return Err(SpecError::new(
                field("action"),
                "invalid_steps",
                "steps do not nest",
            ));
        }
        let mut spec = *st.spec;
        spec.account = spec.account.or_else(|| self.account.clone());
        spec.region = spec.region.or_else(|| self.region.clone());
        let from = spec.targets.from_step.take();
        if let Some(f) = &from {
            if !earlier.contains(f) {
                return Err(SpecError::new(
                    field("targets.from_step"),
                    "unknown_step",
                    format!("`{f}` is not an earlier step"),
                ));
            }
            if spec.targets != Targets::default() {
                return Err(SpecError::new(
                    field("targets"),
                    "unexpected_targets",
                    "from_step stands alone",
                ));
            }
            // Checked with a stand-in target; the real ids come from the step at run time.
            spec.targets.instance_ids = Some(IdList(vec!["i-00000000".into()]));
        }
        let mut spec = spec.normalize().map_err(|e| SpecError {
            field: format!("steps[{i}].{}", e.field),
            ..e
        })?;
        if from.is_some() {
            spec.targets = Targets {
                from_step: from,
                ..Default::default()
            };
        }
        st.name = Some(name);
        st.on_failure = Some(st.on_failure.unwrap_or_else(|| "stop".into()));
        st.spec = Box::new(spec);
        Ok(st)
    }

    /// `wait`: what the action can wait for (its default when absent), timeout and interval
    /// within bounds and re-rendered.
    fn normalize_wait(&mut self) -> Result<(), SpecError> {
        let wait = self.wait.take().unwrap_or_default();
        let until = wait.until.unwrap_or_else(|| self.action.default_wait());
        if !self.action.waits().contains(&until) {
            let names: Vec<&str> = self.action.waits().iter().map(|w| w.as_str()).collect();
            return Err(SpecError::new(
                "wait.until",
                "invalid_wait",
                format!("{} can wait for {}", self.action, names.join(", ")),
            ));
        }
        let timeout = check_duration(
            "wait.timeout",
            wait.timeout.as_deref().unwrap_or(DEFAULT_WAIT_TIMEOUT),
            Duration::from_secs(1),
            Duration::from_secs(24 * 3600),
        )?;
        let interval = check_duration(
            "wait.interval",
            wait.interval.as_deref().unwrap_or(DEFAULT_WAIT_INTERVAL),
            Duration::from_millis(100),
            Duration::from_secs(3600),
        )?;
        self.wait = Some(WaitSpec {
            until: Some(until),
            timeout: Some(timeout),
            interval: Some(interval),
        });
        Ok(())
    }

    /// The job's own limits: `timeout`, `notify`, `rate` (only for actions that run in waves),
    /// `max_attempts`, `priority`.
    fn check_limits(&mut self) -> Result<(), SpecError> {
        if let Some(t) = &self.timeout {
            self.timeout = Some(check_duration(
                "timeout",
                t,
                Duration::from_secs(1),
                Duration::from_secs(7 * 24 * 3600),
            )?);
        }
        if let Some(n) = &self.notify {
            n.check("notify")?;
        }
        if let Some(r) = &self.rate {
            if !matches!(
                self.action,
                Action::StartInstances
                    | Action::StopInstances
                    | Action::RebootInstances
                    | Action::TerminateInstances
                    | Action::CreateTags
                    | Action::DeleteTags
            ) {
                return Err(SpecError::new(
                    "rate",
                    "unexpected_rate",
                    format!("{} does not run in waves (start, stop, reboot, terminate and tag actions do)", self.action),
                ));
            }
            if r.max_concurrency == Amount::Count(0) {
                return Err(SpecError::new(
                    "rate.max_concurrency",
                    "out_of_range",
                    "must be at least 1",
                ));
            }
        }
        if let Some(n) = self.max_attempts {
            if !(1..=100).contains(&n) {
                return Err(SpecError::new(
                    "max_attempts",
                    "out_of_range",
                    "must be between 1 and 100",
                ));
            }
        }
        if self.priority.is_some_and(|p| !PRIORITY_RANGE.contains(&p)) {
            return Err(SpecError::new(
                "priority",
                "out_of_range",
                "must be between -1000 and 1000",
            ));
        }
        Ok(())
    }

    /// The action with its typed parameters (checked at submission; a stored spec reads back).
    pub fn action_spec(&self) -> Result<ActionSpec, SpecError> {
        ActionSpec::parse(self.action, &self.params)
    }

    /// The wait settings as durations (filled in by `normalize`; defaults if called before).
    pub fn wait_settings(&self) -> (WaitUntil, Duration, Duration) {
        let w = self.wait.clone().unwrap_or_default();
        let d = |s: Option<String>, default: &str| {
            parse_duration(s.as_deref().unwrap_or(default))
                .or_else(|_| parse_duration(default))
                .unwrap_or_default()
        };
        (
            w.until.unwrap_or_else(|| self.action.default_wait()),
            d(w.timeout, DEFAULT_WAIT_TIMEOUT),
            d(w.interval, DEFAULT_WAIT_INTERVAL),
        )
    }

    /// The per-attempt time limit, if the spec sets one (already validated by `normalize`).
    pub fn timeout_duration(&self) -> Option<Duration> {
        self.timeout.as_deref().and_then(|t| parse_duration(t).ok())
    }
}

fn is_resource_id(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|hex| {
        (hex.len() == 8 || hex.len() == 17)
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Checks a list of resource ids (`i-`, `vol-`, `snap-`): 1-1000, well-formed, deduplicated in order.
fn check_ids(field: &str, ids: Vec<String>, prefix: &str, what: &str) -> Result<IdList, SpecError> {
    if ids.is_empty() {
        return Err(SpecError::new(
            field,
            "empty_targets",
            format!("must name at least one {what} id"),
        ));
    }
    if ids.len() > 1000 {
        return Err(SpecError::new(
            field,
            "too_many",
            format!("at most 1000 {what} ids per job"),
        ));
    }
    let mut seen = Vec::with_capacity(ids.len());
    for (i, id) in ids.into_iter().enumerate() {
        let id = id.trim().to_string();
        if !is_resource_id(&id, prefix) {
            return Err(SpecError::new(
                format!("{field}[{i}]"),
                if prefix == "i-" {
                    "invalid_instance_id"
                } else {
                    "invalid_id"
                },
                format!("`{id}` is not {what} id (`{prefix}` and 8 or 17 lowercase hex digits)"),
            ));
        }
        if !seen.contains(&id) {
            seen.push(id);
        }
    }
    Ok(IdList(seen))
}

fn check_tags(field: &str, tags: BTreeMap<String, String>) -> Result<TagSet, SpecError> {
    if tags.is_empty() {
        return Err(SpecError::new(
            field,
            "empty_targets",
            "must name at least one tag",
        ));
    }
    for (k, v) in &tags {
        if k.is_empty() || k.chars().count() > 128 {
            return Err(SpecError::new(
                field,
                "invalid_tag",
                format!("tag key `{k}` must be 1-128 characters"),
            ));
        }
        if v.chars().count() > 256 {
            return Err(SpecError::new(
                format!("{field}.{k}"),
                "invalid_tag",
                "tag value must be at most 256 characters",
            ));
        }
    }
    Ok(TagSet(tags))
}

fn normalize_targets(t: Targets, kind: TargetKind) -> Result<Targets, SpecError> {
    if t.from_step.is_some() {
        return Err(SpecError::new(
            "targets.from_step",
            "unexpected_targets",
            "from_step is for the steps of a workflow",
        ));
    }
    let out = Targets {
        instance_ids: t
            .instance_ids
            .map(|l| check_ids("targets.instance_ids", l.0, "i-", "an instance"))
            .transpose()?,
        tags: t
            .tags
            .map(|t| check_tags("targets.tags", t.0))
            .transpose()?,
        filters: t.filters.map(check_filters).transpose()?,
        volume_ids: t
            .volume_ids
            .map(|l| check_ids("targets.volume_ids", l.0, "vol-", "a volume"))
            .transpose()?,
        volume_tags: t
            .volume_tags
            .map(|t| check_tags("targets.volume_tags", t.0))
            .transpose()?,
        snapshot_ids: t
            .snapshot_ids
            .map(|l| check_ids("targets.snapshot_ids", l.0, "snap-", "a snapshot"))
            .transpose()?,
        snapshot_tags: t
            .snapshot_tags
            .map(|t| check_tags("targets.snapshot_tags", t.0))
            .transpose()?,
        image_ids: t
            .image_ids
            .map(|l| check_ids("targets.image_ids", l.0, "ami-", "an AMI"))
            .transpose()?,
        image_tags: t
            .image_tags
            .map(|t| check_tags("targets.image_tags", t.0))
            .transpose()?,
        from_step: None,
    };
    let instances = out.instance_ids.is_some() || out.tags.is_some() || out.filters.is_some();
    let volumes = out.volume_ids.is_some() || out.volume_tags.is_some();
    let snapshots = out.snapshot_ids.is_some() || out.snapshot_tags.is_some();
    let images = out.image_ids.is_some() || out.image_tags.is_some();
    let (ok, fields, extra) = match kind {
        TargetKind::Instances => (
            instances,
            "`instance_ids`, `tags` or `filters`",
            volumes || snapshots || images,
        ),
        TargetKind::InstancesOrVolumes => (
            instances != volumes,
            "instances (`instance_ids`, `tags`, `filters`) or volumes (`volume_ids`, `volume_tags`), not both",
            snapshots || images,
        ),
        TargetKind::Snapshots => (
            snapshots || out.volume_ids.is_some(),
            "`snapshot_ids`, `snapshot_tags` or `volume_ids`",
            instances || out.volume_tags.is_some() || images,
        ),
        TargetKind::Images => (
            images,
            "`image_ids` or `image_tags`",
            instances || volumes || snapshots,
        ),
    };
    if extra {
        return Err(SpecError::new(
            "targets",
            "unexpected_targets",
            format!("this action's targets are {fields}"),
        ));
    }
    if !ok {
        return Err(SpecError::new(
            "targets",
            "missing_targets",
            format!("give {fields}"),
        ));
    }
    Ok(out)
}

fn check_filters(filters: Vec<Filter>) -> Result<Vec<Filter>, SpecError> {
    if filters.is_empty() {
        return Err(SpecError::new(
            "targets.filters",
            "empty_targets",
            "must hold at least one filter",
        ));
    }
    for (i, f) in filters.iter().enumerate() {
        if f.name.trim().is_empty() {
            return Err(SpecError::new(
                format!("targets.filters[{i}].name"),
                "invalid_filter",
                "filter name must not be empty",
            ));
        }
        if f.values.is_empty() {
            return Err(SpecError::new(
                format!("targets.filters[{i}].values"),
                "invalid_filter",
                "filter needs at least one value",
            ));
        }
    }
    Ok(filters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn traceparents_are_w3c_or_nothing() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(traceparent(ok).as_deref(), Some(ok));
        assert_eq!(
            traceparent(&ok.to_uppercase()).as_deref(),
            Some(ok),
            "lowercased"
        );
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(traceparent(bad), None, "{bad}");
        }
        let e = parse(json!({"action": "describe_instances", "traceparent": "nope"})).unwrap_err();
        assert_eq!(e.field, "traceparent");
    }

    fn parse(v: serde_json::Value) -> Result<JobSpec, SpecError> {
        serde_json::from_value::<JobSpec>(v)
            .map_err(|e| SpecError::new("", "parse", e.to_string()))?
            .normalize()
    }

    #[test]
    fn backup_names_fill_every_documented_placeholder_once() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-11-22T04:15:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let n = BackupNaming {
            name: "web {job_id}",
            instance_id: "i-1",
            volume_id: "vol-1",
            device: "/dev/xvda",
            job_id: "J",
            group: "daily",
            at,
        };
        let all: String = TEMPLATE_FIELDS
            .iter()
            .map(|f| format!("{{{f}}}|"))
            .collect();
        assert_eq!(
            n.render(&all, 1000).unwrap(),
            "web {job_id}|i-1|vol-1|/dev/xvda|2026-11-22|2026-11-22T04:15:00Z|20261122-041500|J|daily|"
        );
        assert!(n.render("{nope}", 1000).is_err());
    }

    #[test]
    fn steps_without_an_action_are_a_workflow() {
        let s = parse(json!({"steps": [
            {"name": "stop", "action": "stop_instances", "targets": {"tags": "App=db"}},
            {"name": "start", "action": "start_instances", "targets": {"from_step": "stop"}}]}))
        .unwrap();
        assert_eq!(s.action, Action::Workflow);
        assert_eq!(s.steps.map(|v| v.len()), Some(2));
        let e = parse(json!({"targets": {"instance_ids": ["i-01234567"]}})).unwrap_err();
        assert_eq!((e.field.as_str(), e.code), ("action", "missing_field"));
        let e =
            parse(json!({"steps": [{"targets": {"instance_ids": ["i-01234567"]}}]})).unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.code),
            ("steps[0].action", "missing_field")
        );
    }

    #[test]
    fn scheduler_style_ids_and_tags_are_normalised() {
        let s = parse(json!({"action": "describe_instances",
            "targets": {"instance_ids": "i-0123456789abcdef0; i-01234567;i-01234567", "tags": "AutoOn=yes; Env = prod"}}))
        .unwrap();
        assert_eq!(
            s.targets.instance_ids.unwrap().0,
            vec!["i-0123456789abcdef0", "i-01234567"]
        );
        let tags = s.targets.tags.unwrap().0;
        assert_eq!(tags.get("AutoOn").map(String::as_str), Some("yes"));
        assert_eq!(tags.get("Env").map(String::as_str), Some("prod"));
        let w = s.wait.unwrap();
        assert_eq!(w.until, Some(WaitUntil::None));
        assert_eq!(w.timeout.as_deref(), Some("15m"));
    }

    #[test]
    fn bad_ids_name_the_index() {
        let e = parse(json!({"action": "describe_instances",
            "targets": {"instance_ids": ["i-01234567", "i-XYZ"]}}))
        .unwrap_err();
        assert_eq!(e.field, "targets.instance_ids[1]");
        assert_eq!(e.code, "invalid_instance_id");
    }

    #[test]
    fn empty_and_missing_targets_are_rejected() {
        let e = parse(json!({"action": "describe_instances"})).unwrap_err();
        assert_eq!((e.field.as_str(), e.code), ("targets", "missing_targets"));
        let e = parse(json!({"action": "describe_instances", "targets": {"instance_ids": ""}}))
            .unwrap_err();
        assert_eq!(e.code, "empty_targets");
        let e =
            parse(json!({"action": "describe_instances", "targets": {"tags": {}}})).unwrap_err();
        assert_eq!(e.field, "targets.tags");
    }

    #[test]
    fn durations_and_params_are_checked() {
        let e = parse(
            json!({"action": "describe_instances", "targets": {"tags": "a=b"},
            "wait": {"timeout": "soon"}}),
        )
        .unwrap_err();
        assert_eq!(e.field, "wait.timeout");
        let e = parse(
            json!({"action": "describe_instances", "targets": {"tags": "a=b"},
            "params": {"force": true}}),
        )
        .unwrap_err();
        assert_eq!(e.field, "params.force");
        let e = parse(
            json!({"action": "describe_instances", "targets": {"tags": "a=b"},
            "max_attempts": 0}),
        )
        .unwrap_err();
        assert_eq!(e.field, "max_attempts");
        let e = parse(
            json!({"action": "describe_instances", "targets": {"tags": "a=b"},
            "priority": 1001}),
        )
        .unwrap_err();
        assert_eq!((e.field.as_str(), e.code), ("priority", "out_of_range"));
        let e = parse(json!({"steps": [{"action": "describe_instances",
            "targets": {"tags": "a=b"}, "priority": 5}]}))
        .unwrap_err();
        assert_eq!(e.field, "steps[0].priority");
        assert!(parse(
            json!({"action": "describe_instances", "targets": {"tags": "a=b"}, "priority": -1000})
        )
        .is_ok());
    }

    #[test]
    fn unknown_fields_and_actions_fail_to_parse() {
        assert!(serde_json::from_value::<JobSpec>(
            json!({"action": "describe_instances", "targets": {"tags": "a=b"}, "bogus": 1})
        )
        .is_err());
        assert!(serde_json::from_value::<JobSpec>(
            json!({"action": "launch_rockets", "targets": {"tags": "a=b"}})
        )
        .is_err());
    }

    #[test]
    fn normalize_is_idempotent() {
        let s = parse(
            json!({"action": "describe_instances", "targets": {"instance_ids": "i-01234567"},
            "timeout": "90s"}),
        )
        .unwrap();
        assert_eq!(s.timeout.as_deref(), Some("1m 30s"));
        assert_eq!(s.clone().normalize().unwrap(), s);
    }
}

/// Property tests: whatever JSON arrives, parsing and normalising a job spec never panics, and a
/// spec that normalises once normalises again to itself.
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    const KEYS: &[&str] = &[
        "action",
        "account",
        "region",
        "targets",
        "params",
        "wait",
        "dry_run",
        "allow_empty",
        "timeout",
        "max_attempts",
        "priority",
        "rate",
        "notify",
        "steps",
        "instance_ids",
        "tags",
        "filters",
        "volume_ids",
        "snapshot_ids",
        "image_ids",
        "from_step",
        "until",
        "interval",
        "name",
        "values",
        "instance_type",
        "image_id",
        "min_count",
        "keep",
        "max_concurrency",
        "max_errors",
        "topic_arn",
        "on",
        "on_failure",
        "description",
        "x",
    ];
    const ACTIONS: &[&str] = &[
        "start_instances",
        "stop_instances",
        "run_instances",
        "create_snapshots",
        "workflow",
        "modify_instance_attribute",
        "audit_tags",
        "copy_image",
        "describe_instances",
        "bogus",
    ];

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            (0u32..2000).prop_map(|n| json!(n)),
            prop::sample::select(ACTIONS).prop_map(|s| json!(s)),
            "[a-zA-Z0-9 ;=%${}:/._-]{0,24}".prop_map(Value::String),
            Just(json!("i-0123456789abcdef0")),
            Just(json!("10%")),
            Just(json!("15s")),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 48, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                prop::collection::btree_map(prop::sample::select(KEYS), inner, 0..6).prop_map(
                    |m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
                ),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn any_json_parses_or_is_refused_without_panic(
            fields in prop::collection::btree_map(prop::sample::select(KEYS), value(), 0..8),
            action in prop::sample::select(ACTIONS),
        ) {
            let mut m: serde_json::Map<String, Value> =
                fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            m.entry("action").or_insert(json!(action));
            let v = Value::Object(m);
            if let Ok(spec) = serde_json::from_value::<JobSpec>(v) {
                if let Ok(n) = spec.normalize() {
                    prop_assert_eq!(n.clone().normalize().ok(), Some(n));
                }
            }
        }
    }
}

//! The job document returned by the API and kept in the store: state, timing, error, results, and
//! the event log that `GET /v1/jobs/{id}/events` streams.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::spec::{Action, JobSpec};

/// Where a job is in its life. `succeeded`, `failed` and `cancelled` are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for a worker (also while waiting for a retry's backoff).
    Queued,
    /// Claimed by a worker holding a lease.
    Running,
    /// Finished; every targeted instance reached the wanted state.
    Succeeded,
    /// Finished with an error (see `error`).
    Failed,
    /// Cancelled by a user before it finished.
    Cancelled,
}

impl JobState {
    /// Every state, for metrics and validation messages.
    pub const ALL: &'static [JobState] = &[
        JobState::Queued,
        JobState::Running,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ];

    /// The wire and database name.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// True for states a job never leaves.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .iter()
            .copied()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("`{s}` is not a job state (queued, running, succeeded, failed, cancelled)")
            })
    }
}

/// Why a job failed: a stable code (AWS codes are kept as AWS spells them) and a sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct JobError {
    /// Stable code, e.g. `WaitTimeout`, `NoTargets`, `InvalidInstanceID.NotFound`.
    pub code: String,
    /// What happened, for people.
    pub message: String,
    /// AWS request id of the failing call, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// EC2's answers for "no capacity for this now" (instance type, host, reservation): they pass
/// within minutes to hours, so a job meeting one tries again until its time limit.
pub const CAPACITY_CODES: &[&str] = &[
    "InsufficientInstanceCapacity",
    "InsufficientHostCapacity",
    "InsufficientReservedInstanceCapacity",
    "InsufficientCapacity",
];

impl JobError {
    /// EC2 had no capacity for the call ([`CAPACITY_CODES`]).
    pub fn is_capacity(&self) -> bool {
        CAPACITY_CODES.contains(&self.code.as_str())
    }
}

/// What a job is doing now, for people watching it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, ToSchema)]
pub struct Progress {
    /// Short phase name (`queued`, `resolving_targets`, `calling`, `waiting`, `done`).
    #[serde(default)]
    pub phase: String,
    /// A sentence about the current step.
    #[serde(default)]
    pub message: String,
    /// Units done (instances, pages…), when countable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<u64>,
    /// Units in all, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
}

/// One instance's outcome within a job.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct InstanceResult {
    /// The instance id.
    pub instance_id: String,
    /// EC2 instance state name at the end (`running`, `stopped`, …).
    pub state: String,
    /// The `Name` tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Instance type, e.g. `t3.micro`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Availability zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub availability_zone: Option<String>,
    /// Private IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_ip: Option<String>,
    /// Public IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_ip: Option<String>,
    /// Private DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_dns_name: Option<String>,
    /// Public DNS name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_dns_name: Option<String>,
    /// Launch time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launch_time: Option<String>,
    /// All tags of the instance.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// Why EC2 last changed the instance's state, when it says (`Client.InternalError: Client
    /// error on launch`, as when a start falls back to stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    /// State before the job acted on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_state: Option<String>,
    /// SystemStatus summary (`ok`, `initializing`, `impaired`, …) at the end of the wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system_status: Option<String>,
    /// InstanceStatus summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_status: Option<String>,
    /// AttachedEbsStatus summary, on instances that report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ebs_status: Option<String>,
    /// "2/2 checks passed" (or "3/3"), or what is still missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<String>,
    /// Seconds from the job's call until the instance was seen `running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_to_running: Option<f64>,
    /// Seconds from the job's call until every status check passed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_to_status_ok: Option<f64>,
    /// Instance type before the job changed it (`modify_instance_attribute`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_instance_type: Option<String>,
    /// Required tag keys the instance lacks (`audit_tags`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_tags: Vec<String>,
    /// What the job did to this instance (`started`, `already running`, `tagged`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// One EBS snapshot as a job saw or made it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct SnapshotResult {
    /// The snapshot id.
    pub snapshot_id: String,
    /// The volume it was taken from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_id: Option<String>,
    /// `pending`, `completed`, `error` (or `deleted` once rotation removed it).
    pub state: String,
    /// Progress as EC2 reports it, e.g. `45%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Size of the source volume, GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_size_gib: Option<i32>,
    /// When the snapshot was started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// Its description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Region it lives in, when it is not the job's (copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Its tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// What the job did with it (`created`, `found (created by an earlier attempt)`, `deleted`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

/// What generation rotation did for one rotation group (a volume's or an instance's backups).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct RotationResult {
    /// The rotation group (`<group>/<volume or instance id>`), the value of the `ec2jobd:rotation` tag.
    pub group: String,
    /// Generations kept, newest first.
    #[serde(default)]
    pub kept: Vec<String>,
    /// Generations deleted (older than the `keep` newest).
    #[serde(default)]
    pub deleted: Vec<String>,
    /// Generations due for deletion but kept because something still uses them (an AMI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub in_use: Vec<String>,
    /// Snapshots of deregistered AMIs that were deleted with them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted_snapshots: Vec<String>,
}

/// One AMI a job made, copied, deregistered or saw.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct ImageResult {
    /// The AMI id.
    pub image_id: String,
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `pending`, `available`, `failed`, `deregistered`.
    pub state: String,
    /// Instance it was made from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// That instance's Name tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_name: Option<String>,
    /// When it was created (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_date: Option<String>,
    /// Region it lives in, when it is not the job's (copies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// EBS snapshots behind it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshot_ids: Vec<String>,
    /// Its tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// What the job did with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// What rotation did for this instance's AMIs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationResult>,
}

/// One volume's backup within a job: where it is attached, the new snapshot, and rotation.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct VolumeResult {
    /// The volume id.
    pub volume_id: String,
    /// Instance it is attached to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
    /// The instance's Name tag.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_name: Option<String>,
    /// Device name on the instance, e.g. `/dev/xvda`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Volume size, GiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_gib: Option<i32>,
    /// The snapshot this job made of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotResult>,
    /// What rotation did for this volume's group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationResult>,
}

/// One workflow step's outcome.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct StepResult {
    /// The step's name.
    pub name: String,
    /// Its action.
    pub action: String,
    /// `succeeded`, `failed`, `cancelled`, or `not_run`.
    pub state: String,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// What it produced.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub results: Box<JobResults>,
}

/// Everything a job produced; stays queryable after the job ends.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, ToSchema)]
pub struct JobResults {
    /// Per-instance results.
    #[serde(default)]
    pub instances: Vec<InstanceResult>,
    /// Per-volume backup results (`create_snapshots`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeResult>,
    /// Snapshots described, deleted or copied (`describe_snapshots`, `delete_snapshots`, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotResult>,
    /// AMIs made, copied or deregistered (`create_image`, `copy_image`, `deregister_image`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<ImageResult>,
    /// Per step of a workflow, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schema(no_recursion)]
    pub steps: Vec<StepResult>,
    /// One-line summary, e.g. "described 3 instances".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<String>,
    /// AWS request ids of the calls made, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_ids: Vec<String>,
}

/// The job document of `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Job {
    /// Sortable id (a ULID: later jobs sort after earlier ones).
    pub id: String,
    /// Current state.
    pub state: JobState,
    /// The action (same as `spec.action`), for filtering at a glance.
    pub action: Action,
    /// The normalised request.
    pub spec: JobSpec,
    /// When it was accepted.
    pub created_at: DateTime<Utc>,
    /// Who submitted it: the API token's name, `sns:<hook>` for a job an SNS delivery queued,
    /// `schedule:<name>` for a schedule's firing (absent for jobs from before this was recorded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// The schedule whose firing queued it (`created_by` is then `schedule:<name>`); `GET
    /// /v1/jobs?schedule=<name>` lists them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<String>,
    /// The firing time it was queued for (a schedule's jobs only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fired_at: Option<DateTime<Utc>>,
    /// When a worker first started it.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached a final state.
    pub finished_at: Option<DateTime<Utc>>,
    /// Attempts started so far (a retry or a re-queued lease counts).
    pub attempts: u32,
    /// Attempts allowed before a transient failure becomes final.
    pub max_attempts: u32,
    /// When the next attempt may start, while waiting out a retry's backoff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// True once a cancel was asked for a running job.
    pub cancel_requested: bool,
    /// Why it failed (or the last transient error while retrying); null otherwise.
    pub error: Option<JobError>,
    /// What it produced.
    pub results: JobResults,
    /// What it is doing now.
    pub progress: Progress,
}

impl Job {
    /// The job as shown to API clients and published: secrets in its spec redacted
    /// ([`JobSpec::redact_secrets`]).
    pub fn redacted(mut self) -> Job {
        self.spec.redact_secrets();
        self
    }
}

/// Event kinds after which a job's event stream ends.
pub const TERMINAL_EVENT_KINDS: &[&str] = &["succeeded", "failed", "cancelled"];

/// One entry of a job's event log (`GET /v1/jobs/{id}/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobEvent {
    /// Position in the whole event log; used as the SSE `id` for `Last-Event-ID` resumption.
    pub seq: i64,
    /// The job.
    pub job_id: String,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// `queued`, `started`, `progress`, `retry_scheduled`, `cancel_requested`, `requeued`,
    /// `succeeded`, `failed`, `cancelled`.
    pub kind: String,
    /// A sentence for people.
    pub message: String,
    /// Structured detail (progress counts, error, attempt…).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    /// Who caused it, when someone did: the API token's name (or `sns:<hook>`) that submitted
    /// the job (`queued`) or asked to cancel it (`cancel_requested`, `cancelled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

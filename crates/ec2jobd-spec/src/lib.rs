//! The vocabulary of ec2jobd: what a job asks for ([`JobSpec`]), what it becomes ([`Job`]), what it
//! produced ([`JobResults`]) and what happened along the way ([`JobEvent`]).
//!
//! This room is pure data: serde types, their OpenAPI schemas, and validation that turns a request
//! into a normalised spec. It must not touch HTTP, SQL or AWS; every other crate depends on it, and
//! it depends on none of them. The injected [`Clock`] lives here because the store, the runner and the
//! EC2 waits all need the same notion of "now", and tests need to move it by hand.

pub mod action;
mod clock;
mod job;
pub mod placeholders;
mod role;
pub mod schedule;
mod spec;

pub use action::ActionSpec;
pub use clock::{Clock, ManualClock, SystemClock};
pub use job::{
    ImageResult, InstanceResult, Job, JobError, JobEvent, JobResults, JobState, Progress,
    RotationResult, SnapshotResult, StepResult, VolumeResult, CAPACITY_CODES, TERMINAL_EVENT_KINDS,
};
pub use role::Role;
pub use spec::traceparent;
pub use spec::{
    is_aws_region, parse_duration, Action, Amount, BackupNaming, Filter, IdList, JobSpec, Notify,
    Rate, SpecError, Step, TagSet, Targets, WaitSpec, WaitUntil, PRIORITY_RANGE,
};
pub use spec::{redact_secrets_json, redact_value, secret_values_mut, MAX_STEPS, SECRET_PARAMS};

//! The resume state an action's attempt leaves in its job: one typed enum, [`Checkpoint`], whose
//! variant is the `phase` it reached, stored as JSON with a format version `v`.
//!
//! Every phase an action saves is listed here and nowhere else, so what a resumed attempt may find
//! is one type. Reading still accepts the JSON of jobs checkpointed before the version field
//! existed (no `v`: version 1, the same shape); a checkpoint of a newer version, written by a
//! newer ec2jobd sharing the store, is refused rather than misread. A workflow's checkpoint is an
//! [`Envelope`] (which step, the finished steps' results) holding its running step's checkpoint.
//! This file knows nothing of EC2: only shapes and their reading.

// `ExecError` is large by design (see runner.rs); these refusals happen once per attempt.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use ec2jobd_spec::{ImageResult, JobResults, SnapshotResult, StepResult, VolumeResult};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::AfterWait;
use crate::parking::Wait;
use crate::runner::{ExecCtx, ExecError};

/// The version [`Checkpoint::save`] writes; readable: this and every earlier one.
pub(super) const VERSION: u64 = 1;

/// Where an attempt got to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub(super) enum Checkpoint {
    /// About to make the action's call for `ids` (a launch names none).
    Calling {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ids: Vec<String>,
    },
    /// The call was made for `ids` (a launch: the instances launched). A resize is past its
    /// changes and still has `restart` to start.
    Called {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        ids: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        restart: Vec<String>,
    },
    /// Parked until `ids` left a transition (`stopping`, `pending`) the action cannot act from;
    /// the action then runs from the start, looking at them again.
    Settling { ids: Vec<String> },
    /// Parked for the final instance wait: the wait and what follows it.
    Parked(Box<AfterWait>),
    /// Parked until the snapshots or AMIs a backup or copy made are ready: the wait and what
    /// the action finishes with.
    ParkedReady(Box<AfterReady>),
    /// A resize is stopping, changing and starting: `restart` must be started again.
    Resizing { restart: Vec<String> },
    /// A backup is stopping instances first: `restart` must be started again.
    Stopping { restart: Vec<String> },
    /// A backup is about to make one more snapshot or AMI.
    Creating(Made),
    /// A backup made one more snapshot or AMI.
    Created(Made),
    /// A copy of `source` is about to be made.
    Copying { source: String },
    /// A copy of `source` was made.
    Copied { source: String },
    /// Bulk waves: the instances done and those failed (with why).
    Waves {
        #[serde(default)]
        done: Vec<String>,
        #[serde(default)]
        failed: Vec<(String, String)>,
    },
}

/// What a backup made so far, keyed by volume (snapshots) or instance (AMIs), and what it is
/// making now.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Made {
    /// The volume being snapshotted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    /// The instance being imaged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    /// Volume → snapshot made.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshots: BTreeMap<String, String>,
    /// Instance → AMI made.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub images: BTreeMap<String, String>,
    /// Instances stopped for the snapshots, to start again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart: Vec<String>,
}

/// What a backup or copy holds while its snapshots or AMIs become ready, and finishes with
/// afterwards (rotation, results, summary): the same whether it waited in place or parked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(super) struct AfterReady {
    /// The wait (its `kind`: snapshots or AMIs; `ids` empty when none is pending).
    pub wait: Wait,
    /// Results so far (request ids, and the instances a backup stopped and started again).
    pub results: JobResults,
    /// What the action made.
    pub made: ReadyMade,
}

/// What a backup or copy made, by action.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "of", rename_all = "snake_case")]
pub(super) enum ReadyMade {
    /// `create_snapshots`: the volume rows (without snapshot or rotation) and volume → snapshot.
    Snapshots {
        rows: Vec<VolumeResult>,
        made: BTreeMap<String, SnapshotResult>,
    },
    /// `create_image`: instance → AMI, and the number of instances targeted.
    Images {
        made: BTreeMap<String, ImageResult>,
        total: u64,
    },
    /// `copy_snapshot`, `copy_image`: source → copy, in the wait's region, from `source_region`.
    Copies {
        copies: BTreeMap<String, String>,
        source_region: String,
    },
}

/// Reads a stored checkpoint of either kind, refusing a version this build does not know.
fn read<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, String> {
    match v.get("v").map_or(Some(1), Value::as_u64) {
        Some(n) if n <= VERSION => serde_json::from_value(v.clone()).map_err(|e| e.to_string()),
        _ => Err(format!(
            "checkpoint version {} is newer than this ec2jobd reads ({VERSION})",
            v["v"]
        )),
    }
}

/// The stored form of a checkpoint of either kind: its JSON with the version.
fn stored(t: &impl Serialize) -> Value {
    let mut v = serde_json::to_value(t).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.insert("v".into(), VERSION.into());
    }
    v
}

/// The refusal of an attempt whose checkpoint cannot be read: resuming without knowing what
/// was done could do it twice.
fn corrupt(e: String) -> ExecError {
    ExecError::permanent(
        "CorruptCheckpoint",
        format!("the job's resume state cannot be read: {e}"),
    )
}

/// A workflow's checkpoint: the step running (or next to run), the finished steps' results, and
/// the running step's own checkpoint (`inner`, written through the step's context).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(super) struct Envelope {
    /// Index of the step running or next.
    #[serde(default)]
    pub step: usize,
    /// Results of the finished steps, in order.
    #[serde(default)]
    pub done: Vec<StepResult>,
    /// The running step's checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner: Option<Value>,
}

impl Envelope {
    /// The workflow job's checkpoint (a fresh one when there is none).
    pub(super) fn of(ctx: &ExecCtx) -> Result<Envelope, ExecError> {
        match &ctx.checkpoint {
            None => Ok(Envelope::default()),
            Some(v) => read(v).map_err(corrupt),
        }
    }

    /// The stored form.
    pub(super) fn to_value(&self) -> Value {
        stored(self)
    }
}

impl Checkpoint {
    /// Reads a stored checkpoint.
    pub(super) fn read(v: &Value) -> Result<Checkpoint, String> {
        read(v)
    }

    /// What an earlier attempt of this job (or workflow step) left, if anything. An unreadable
    /// checkpoint is refused at the start of the attempt ([`Checkpoint::check`]); here it reads as
    /// none.
    pub(super) fn of(ctx: &ExecCtx) -> Option<Checkpoint> {
        Checkpoint::read(ctx.checkpoint.as_ref()?).ok()
    }

    /// Refuses to run an attempt whose checkpoint cannot be read: resuming without knowing what
    /// was done could do it twice.
    pub(super) fn check(ctx: &ExecCtx) -> Result<(), ExecError> {
        match ctx.checkpoint.as_ref().map(Checkpoint::read) {
            Some(Err(e)) => Err(corrupt(e)),
            _ => Ok(()),
        }
    }

    /// The stored form.
    pub(super) fn to_value(&self) -> Value {
        stored(self)
    }

    /// Saves this as the job's checkpoint.
    pub(super) async fn save(&self, ctx: &ExecCtx) -> Result<(), ExecError> {
        ctx.save_checkpoint(self.to_value()).await
    }

    /// Instances a resize or a backup's stop must start again.
    pub(super) fn restart(&self) -> &[String] {
        match self {
            Checkpoint::Called { restart, .. }
            | Checkpoint::Resizing { restart }
            | Checkpoint::Stopping { restart } => restart,
            Checkpoint::Creating(m) | Checkpoint::Created(m) => &m.restart,
            _ => &[],
        }
    }

    /// What a backup made so far (also while it waits for it to be ready).
    pub(super) fn made(&self) -> Option<Made> {
        match self {
            Checkpoint::Creating(m) | Checkpoint::Created(m) => Some(m.clone()),
            Checkpoint::ParkedReady(after) => match &after.made {
                ReadyMade::Snapshots { made, .. } => Some(Made {
                    snapshots: made
                        .iter()
                        .map(|(v, s)| (v.clone(), s.snapshot_id.clone()))
                        .collect(),
                    ..Default::default()
                }),
                ReadyMade::Images { made, .. } => Some(Made {
                    images: made
                        .iter()
                        .map(|(i, a)| (i.clone(), a.image_id.clone()))
                        .collect(),
                    ..Default::default()
                }),
                ReadyMade::Copies { .. } => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Checkpoints as jobs in flight hold them (written before the version field).
    #[test]
    fn checkpoints_of_jobs_in_flight_still_read() {
        let old = [
            json!({"phase": "calling"}),
            json!({"phase": "calling", "ids": ["i-1"]}),
            json!({"phase": "called", "ids": ["i-1"]}),
            json!({"phase": "called", "restart": []}),
            json!({"phase": "resizing", "restart": ["i-1"]}),
            json!({"phase": "stopping", "restart": ["i-1"]}),
            json!({"phase": "creating", "volume": "vol-1", "snapshots": {}, "restart": []}),
            json!({"phase": "created", "instance": "i-1", "images": {"i-1": "ami-1"}}),
            json!({"phase": "copying", "source": "snap-1"}),
            json!({"phase": "waves", "done": ["i-1"], "failed": [["i-2", "why"]]}),
            json!({"phase": "parked", "wait": {"account": "default", "region": "us-east-1",
                "ids": ["i-1"], "until": "status_ok", "since_ms": 1, "deadline_ms": 2,
                "timeout_ms": 3, "interval_ms": 4, "attempt_deadline_ms": 5},
                "ids": ["i-1"], "before": {"i-1": "stopped"}, "todo": ["i-1"],
                "request_ids": ["r-1"]}),
        ];
        for v in old {
            let cp = Checkpoint::read(&v).unwrap_or_else(|e| panic!("{v}: {e}"));
            // Written back, it reads as the same state.
            assert_eq!(Checkpoint::read(&cp.to_value()).unwrap(), cp, "{v}");
        }
        let cp = Checkpoint::read(&json!({"phase": "created", "volume": "vol-1",
            "snapshots": {"vol-1": "snap-1"}, "restart": ["i-1"]}))
        .unwrap();
        assert_eq!(cp.restart(), ["i-1"]);
        assert_eq!(cp.made().unwrap().snapshots["vol-1"], "snap-1");
    }

    /// A backup parked until its snapshots complete: the wait (snapshots, with labels) and what it
    /// finishes with read back, and a resumed attempt that runs again learns what it made.
    #[test]
    fn parked_readiness_waits_round_trip_and_name_what_was_made() {
        let v = json!({"phase": "parked_ready", "v": 1,
            "wait": {"account": "default", "region": "eu-west-1", "kind": "snapshots",
                "ids": ["snap-1"], "labels": {"snap-1": "snapshot snap-1 of vol-1"},
                "until": "completed", "since_ms": 1, "deadline_ms": 2, "timeout_ms": 3,
                "interval_ms": 4},
            "results": {"request_ids": ["r-1"]},
            "made": {"of": "snapshots", "rows": [{"volume_id": "vol-1"}],
                "made": {"vol-1": {"snapshot_id": "snap-1", "state": "pending"}}}});
        let cp = Checkpoint::read(&v).unwrap();
        let Checkpoint::ParkedReady(after) = &cp else {
            panic!("{cp:?}")
        };
        assert_eq!(after.wait.kind, ec2jobd_ec2::Watched::Snapshots);
        assert_eq!(after.wait.describe(), "completed on 1 snapshot(s)");
        assert_eq!(cp.made().unwrap().snapshots["vol-1"], "snap-1");
        assert_eq!(Checkpoint::read(&cp.to_value()).unwrap(), cp);
        // An instance wait's JSON has no kind: it reads as instances.
        let old = json!({"account": "a", "region": "r", "ids": ["i-1"], "until": "running",
            "since_ms": 1, "deadline_ms": 2, "timeout_ms": 3, "interval_ms": 4});
        let w: Wait = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(w.kind, ec2jobd_ec2::Watched::Instances);
        assert_eq!(serde_json::to_value(&w).unwrap(), old);
    }

    #[test]
    fn workflow_envelopes_hold_their_step_checkpoint() {
        let old = json!({"step": 1, "done": [{"name": "a", "action": "stop_instances",
            "state": "succeeded", "results": {}}], "inner": {"phase": "called", "ids": ["i-1"]}});
        let env: Envelope = read(&old).unwrap();
        assert_eq!((env.step, env.done.len()), (1, 1));
        let inner = Checkpoint::read(env.inner.as_ref().unwrap()).unwrap();
        assert_eq!(inner.restart(), [] as [String; 0]);
        assert_eq!(read::<Envelope>(&env.to_value()).unwrap(), env);
        assert!(read::<Envelope>(&json!({"step": 1, "v": VERSION + 1})).is_err());
    }

    #[test]
    fn newer_and_unknown_checkpoints_are_refused() {
        let e = Checkpoint::read(&json!({"phase": "calling", "v": VERSION + 1})).unwrap_err();
        assert!(e.contains("newer"), "{e}");
        assert!(Checkpoint::read(&json!({"phase": "teleporting"})).is_err());
        assert!(Checkpoint::read(&json!({"phase": "waves", "done": "i-1"})).is_err());
        assert_eq!(
            Checkpoint::Calling { ids: vec![] }.to_value(),
            json!({"phase": "calling", "v": VERSION})
        );
    }
}

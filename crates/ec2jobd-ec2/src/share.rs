//! Status rounds shared between processes: when several daemons share one queue, one of them
//! polls EC2 for what all of them wait on, and the others read its rounds, so a round costs
//! ⌈N/100⌉ DescribeInstanceStatus calls for the whole cluster, not per process.
//!
//! A [`StatusWatcher`](crate::StatusWatcher) given a [`RoundShare`] asks it before each round
//! whether this process polls. If it does, it polls as always (what the others want has been
//! registered with it as ordinary waiters by whoever implements the share) and hands the round on
//! ([`RoundShare::publish`]); if not, it says what it waits on and takes the latest round the
//! poller published ([`RoundShare::follow`]), cut to its own ids, instead of calling EC2.
//!
//! Rounds travel as [`SharedRound`]: the same content with the round's start as a time on the
//! share's clock ([`RoundShare::now_ms`], the clock every process of the queue agrees on: the
//! database's), since a wait judges only rounds that began after it did.
//! Must not: know where rounds are kept (the implementation of the share does), or judge waits.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::{Ec2Error, InstanceStatus, Round};

/// What one process's watcher of one account+region waits on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wants {
    /// Instances (DescribeInstanceStatus).
    pub instances: Vec<String>,
    /// Snapshots that must complete.
    pub snapshots: Vec<String>,
    /// AMIs that must become available.
    pub images: Vec<String>,
    /// The shortest polling interval asked for (ms).
    pub interval_ms: u64,
}

impl Wants {
    /// Whether nothing is wanted.
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty() && self.snapshots.is_empty() && self.images.is_empty()
    }
}

/// A round as it travels between processes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SharedRound {
    /// The polling process's round number (increasing while it polls).
    pub number: u64,
    /// When the round's first call was made (ms since the epoch).
    pub began_ms: i64,
    /// Ids asked about.
    pub asked: Vec<String>,
    /// What EC2 reported of instances.
    pub statuses: HashMap<String, InstanceStatus>,
    /// A failed DescribeInstanceStatus call in the round.
    pub error: Option<Ec2Error>,
    /// Snapshots' and AMIs' state and progress.
    pub resources: HashMap<String, (String, Option<String>)>,
    /// Snapshots and AMIs the round could not describe.
    pub resource_errors: HashMap<String, Ec2Error>,
    /// Instances EC2 did not know.
    #[serde(default, skip_serializing_if = "HashSet::is_empty")]
    pub unknown: HashSet<String>,
}

impl SharedRound {
    /// `round` for the others; `now_ms` is the time on the share's clock.
    pub fn of(round: &Round, now_ms: i64) -> Self {
        let began_ms = round
            .began
            .map_or(now_ms, |b| now_ms - b.elapsed().as_millis() as i64);
        let mut asked: Vec<String> = round.asked.iter().cloned().collect();
        asked.sort();
        Self {
            number: round.number,
            began_ms,
            asked,
            statuses: round.statuses.clone(),
            error: round.error.clone(),
            resources: round.resources.clone(),
            resource_errors: round.resource_errors.clone(),
            unknown: round.unknown.clone(),
        }
    }

    /// This round as this process's round `number`, cut to what `wants` names; `now_ms` is the
    /// time on the share's clock.
    pub fn cut(self, number: u64, wants: &Wants, now_ms: i64) -> Round {
        let mine: HashSet<&String> = wants
            .instances
            .iter()
            .chain(&wants.snapshots)
            .chain(&wants.images)
            .collect();
        let ago = Duration::from_millis((now_ms - self.began_ms).max(0) as u64);
        let now = Instant::now();
        Round {
            number,
            asked: self
                .asked
                .into_iter()
                .filter(|i| mine.contains(i))
                .collect(),
            began: Some(now.checked_sub(ago).unwrap_or(now)),
            statuses: self
                .statuses
                .into_iter()
                .filter(|(i, _)| mine.contains(i))
                .collect(),
            error: self.error,
            resources: self
                .resources
                .into_iter()
                .filter(|(i, _)| mine.contains(i))
                .collect(),
            resource_errors: self
                .resource_errors
                .into_iter()
                .filter(|(i, _)| mine.contains(i))
                .collect(),
            unknown: self
                .unknown
                .into_iter()
                .filter(|i| mine.contains(i))
                .collect(),
        }
    }
}

/// Status rounds shared by the processes of one queue. `scope` names an account+region.
#[async_trait]
pub trait RoundShare: Send + Sync {
    /// Whether this process polls EC2 (for everyone) now.
    fn polls(&self) -> bool;
    /// Now on the clock all processes of the share agree on (ms since the epoch).
    fn now_ms(&self) -> i64;
    /// A process that does not poll: records what it waits on in `scope` and returns the latest
    /// round published there, if any.
    async fn follow(&self, scope: &str, wants: &Wants) -> Result<Option<SharedRound>, String>;
    /// The polling process: hands its round of `scope` to the others.
    async fn publish(&self, scope: &str, round: &SharedRound) -> Result<(), String>;
}

/// The scope string of an account+region (what a share keys rounds and wants by).
pub fn scope(account: &str, region: &str) -> String {
    serde_json::json!([account, region]).to_string()
}

/// The account+region a scope string names.
pub fn parse_scope(scope: &str) -> Option<(String, String)> {
    serde_json::from_str(scope).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_travels_and_is_cut_to_what_the_reader_wants() {
        let mut round = Round {
            number: 7,
            began: Some(Instant::now() - Duration::from_millis(1500)),
            ..Default::default()
        };
        for id in ["i-1", "i-2", "snap-1"] {
            round.asked.insert(id.into());
        }
        round.statuses.insert(
            "i-1".into(),
            InstanceStatus {
                state: "running".into(),
                ..Default::default()
            },
        );
        round
            .statuses
            .insert("i-2".into(), InstanceStatus::default());
        round
            .resources
            .insert("snap-1".into(), ("completed".into(), Some("100%".into())));
        // Sent on a clock 30 s ahead of this process's, read on the same clock later.
        let json = serde_json::to_string(&SharedRound::of(&round, 1_800_000_030_000)).unwrap();
        let back: SharedRound = serde_json::from_str(&json).unwrap();
        let wants = Wants {
            instances: vec!["i-1".into(), "i-9".into()],
            snapshots: vec!["snap-1".into()],
            ..Default::default()
        };
        let cut = back.cut(3, &wants, 1_800_000_030_100);
        assert_eq!(cut.number, 3);
        let mut asked: Vec<&String> = cut.asked.iter().collect();
        asked.sort();
        assert_eq!(asked, ["i-1", "snap-1"], "i-2 is another process's");
        assert_eq!(cut.statuses.len(), 1);
        assert_eq!(cut.resources["snap-1"].0, "completed");
        // It began 1.5 s before it was sent, read 0.1 s after on the share's clock (this
        // process's wall clock, whatever it says, plays no part).
        let ago = cut.began.unwrap().elapsed();
        assert!(
            ago >= Duration::from_millis(1600) && ago < Duration::from_secs(5),
            "{ago:?}"
        );
        assert_eq!(
            parse_scope(&scope("prod eu", "eu-west-1")),
            Some(("prod eu".into(), "eu-west-1".into()))
        );
    }
}

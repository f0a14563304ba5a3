//! Running jobs: the [`runner`] claims queued jobs from the store, holds and renews their leases,
//! bounds each attempt and records its outcome; the [`executor`] performs each action against EC2
//! from the job's typed [`ActionSpec`](ec2jobd_spec::ActionSpec), leaving typed checkpoints; the
//! [`parking`] lot holds jobs whose instance wait gives their worker back.
//!
//! This crate is the queue's consumer, apart from the daemon that feeds and shows it (HTTP, config,
//! CLI live in `ec2jobd-server`). It touches the store only through the `Store` trait and AWS only
//! through `ec2jobd-ec2`; what it reports for metrics goes through [`RunObserver`].

pub mod executor;
pub mod fence;
pub mod parking;
pub mod runner;
pub mod share;

/// What the runner and the parking lot report as they work (the daemon's metrics implement it;
/// `()` ignores everything).
pub trait RunObserver: Send + Sync {
    /// An attempt of an `action` job ended with `outcome` after `seconds`.
    fn attempt(&self, action: &str, outcome: &str, seconds: f64);
    /// Jobs parked in this process now.
    fn set_parked(&self, n: i64);
}

impl RunObserver for () {
    fn attempt(&self, _: &str, _: &str, _: f64) {}
    fn set_parked(&self, _: i64) {}
}

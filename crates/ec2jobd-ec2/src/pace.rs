//! Client-side pacing: token buckets per account+region that mirror EC2's own request limits, so the
//! daemon slows itself down before EC2 answers `RequestLimitExceeded`. Every call takes a token from
//! its operation's bucket first and waits, without holding anything, when the bucket is empty.
//!
//! Time comes from tokio's clock, so tests run the buckets under paused time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One bucket's size: `burst` tokens, refilled at `per_second`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Bucket capacity (calls allowed at once after a quiet spell).
    pub burst: u32,
    /// Sustained calls per second.
    pub per_second: f64,
}

/// The buckets' sizes, by operation class. Defaults are EC2's documented per-account+region limits.
#[derive(Debug, Clone, PartialEq)]
pub struct PacingConfig {
    /// Off: calls are never held (EC2 throttling still applies).
    pub enabled: bool,
    /// Describe* calls.
    pub describe: Rate,
    /// Mutating calls without a bucket of their own.
    pub mutating: Rate,
    /// RunInstances.
    pub run_instances: Rate,
    /// StartInstances.
    pub start_instances: Rate,
    /// TerminateInstances.
    pub terminate_instances: Rate,
    /// CreateTags.
    pub create_tags: Rate,
    /// CreateSnapshot, DeleteSnapshot, CopySnapshot.
    pub snapshots: Rate,
    /// Describes by id of several jobs are gathered into one until none came for this long (zero:
    /// no coalescing at all).
    pub coalesce_window: Duration,
    /// The same for mutating instance calls, which jobs that hold no worker leave to the parking
    /// lot.
    pub coalesce_hold: Duration,
}

impl Default for PacingConfig {
    fn default() -> Self {
        let r = |burst, per_second| Rate { burst, per_second };
        Self {
            enabled: true,
            describe: r(100, 20.0),
            mutating: r(50, 5.0),
            run_instances: r(5, 2.0),
            start_instances: r(5, 2.0),
            terminate_instances: r(100, 5.0),
            create_tags: r(100, 10.0),
            snapshots: r(100, 5.0),
            coalesce_window: Duration::from_millis(20),
            coalesce_hold: Duration::from_millis(250),
        }
    }
}

impl PacingConfig {
    fn rate_for(&self, class: &'static str) -> Rate {
        match class {
            "describe" => self.describe,
            "run_instances" => self.run_instances,
            "start_instances" => self.start_instances,
            "terminate_instances" => self.terminate_instances,
            "create_tags" => self.create_tags,
            "snapshots" => self.snapshots,
            _ => self.mutating,
        }
    }
}

/// The bucket an operation draws from.
pub fn class_of(operation: &str) -> &'static str {
    match operation {
        "RunInstances" => "run_instances",
        "StartInstances" => "start_instances",
        "TerminateInstances" => "terminate_instances",
        "CreateTags" => "create_tags",
        "CreateSnapshot" | "DeleteSnapshot" | "CopySnapshot" => "snapshots",
        op if op.starts_with("Describe") => "describe",
        _ => "mutating",
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of one account+region.
pub struct Pacer {
    cfg: PacingConfig,
    buckets: Mutex<HashMap<&'static str, Bucket>>,
}

impl Pacer {
    /// Buckets sized by `cfg`, full at start.
    pub fn new(cfg: PacingConfig) -> Self {
        Self {
            cfg,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `operation`, waiting until one is free. Returns how long it waited.
    pub async fn acquire(&self, operation: &str) -> Duration {
        self.wait_for_token(operation, true).await
    }

    /// Waits until `operation`'s bucket has a token, without taking it: a caller that gathers work
    /// for one call (coalescing) keeps gathering until the call could go out.
    pub async fn ready(&self, operation: &str) -> Duration {
        self.wait_for_token(operation, false).await
    }

    async fn wait_for_token(&self, operation: &str, take: bool) -> Duration {
        if !self.cfg.enabled {
            return Duration::ZERO;
        }
        let class = class_of(operation);
        let rate = self.cfg.rate_for(class);
        let start = Instant::now();
        loop {
            let wait = {
                let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let b = map.entry(class).or_insert(Bucket {
                    tokens: rate.burst as f64,
                    at: now,
                });
                let refill = now.duration_since(b.at).as_secs_f64() * rate.per_second;
                b.tokens = (b.tokens + refill).min(rate.burst as f64);
                b.at = now;
                if b.tokens >= 1.0 {
                    if take {
                        b.tokens -= 1.0;
                    }
                    return start.elapsed();
                }
                Duration::from_secs_f64((1.0 - b.tokens) / rate.per_second.max(0.001))
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> PacingConfig {
        PacingConfig {
            run_instances: Rate {
                burst: 5,
                per_second: 2.0,
            },
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn burst_then_sustained_rate() {
        let p = Pacer::new(tiny());
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(
                p.acquire("RunInstances").await,
                Duration::ZERO,
                "burst is free"
            );
        }
        // The next ones come at 2 per second.
        p.acquire("RunInstances").await;
        let sixth = t0.elapsed();
        p.acquire("RunInstances").await;
        let seventh = t0.elapsed();
        assert!(
            sixth >= Duration::from_millis(499) && sixth <= Duration::from_millis(510),
            "{sixth:?}"
        );
        assert!(
            seventh >= Duration::from_millis(999) && seventh <= Duration::from_millis(1010),
            "{seventh:?}"
        );
        // Another class is not held by this one.
        assert_eq!(p.acquire("DescribeInstances").await, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn refills_after_a_quiet_spell_but_never_beyond_burst() {
        let p = Pacer::new(tiny());
        for _ in 0..5 {
            p.acquire("StartInstances").await;
        }
        tokio::time::advance(Duration::from_secs(60)).await;
        let t0 = Instant::now();
        for _ in 0..5 {
            p.acquire("StartInstances").await;
        }
        assert_eq!(t0.elapsed(), Duration::ZERO, "refilled to burst");
        p.acquire("StartInstances").await;
        assert!(
            t0.elapsed() >= Duration::from_millis(499),
            "but not beyond it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn ready_waits_for_a_token_without_taking_it() {
        let p = Pacer::new(tiny());
        for _ in 0..5 {
            p.acquire("StartInstances").await;
        }
        let t0 = Instant::now();
        p.ready("StartInstances").await;
        assert!(t0.elapsed() >= Duration::from_millis(499), "empty bucket");
        let t1 = Instant::now();
        assert_eq!(
            p.ready("StartInstances").await,
            Duration::ZERO,
            "still there"
        );
        p.acquire("StartInstances").await;
        assert_eq!(
            t1.elapsed(),
            Duration::ZERO,
            "the token `ready` saw is taken"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn disabled_never_waits() {
        let p = Pacer::new(PacingConfig {
            enabled: false,
            ..tiny()
        });
        for _ in 0..50 {
            assert_eq!(p.acquire("RunInstances").await, Duration::ZERO);
        }
    }

    #[test]
    fn operations_map_to_documented_classes() {
        assert_eq!(class_of("DescribeInstanceStatus"), "describe");
        assert_eq!(class_of("StopInstances"), "mutating");
        assert_eq!(class_of("RunInstances"), "run_instances");
        let d = PacingConfig::default();
        assert_eq!(
            d.describe,
            Rate {
                burst: 100,
                per_second: 20.0
            }
        );
        assert_eq!(
            d.terminate_instances,
            Rate {
                burst: 100,
                per_second: 5.0
            }
        );
    }
}

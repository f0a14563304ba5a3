//! The database's clock, for replicas: leases, leader terms, lease sweeps and schedule firings are
//! decided on PostgreSQL's `clock_timestamp()`, so a replica whose own clock is off (a stopped NTP,
//! a VM resumed from pause, `faketime`) neither takes another's lease early nor fires a schedule
//! at the wrong time.
//!
//! [`DbClock`] samples the server's clock (the best of a few round trips: the answer is taken to
//! be the time at the round trip's middle, so its error is at most half the round trip) and then
//! runs on this process's monotonic clock from that sample, sampling again every [`RESYNC`]. The
//! replica's wall clock is never read. It never goes back: a new sample behind the time already
//! handed out holds the clock until it catches up. Must not: decide anything itself.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use ec2jobd_spec::Clock;
use sqlx::postgres::PgPool;

use crate::Result;

/// How often the database's clock is sampled again (clock rates drift by parts per million).
pub const RESYNC: Duration = Duration::from_secs(30);
/// Round trips per sample; the shortest one is kept.
const TRIES: usize = 3;
/// A sample whose round trip took longer is not trusted for a resync (the old one is kept).
const TRUSTED_RTT: Duration = Duration::from_millis(500);

/// The database server's clock as seen from this process (see the module doc).
#[derive(Debug)]
pub struct DbClock {
    /// A monotonic instant and the database's time at that instant (ms since the epoch).
    base: Mutex<(Instant, i64)>,
    /// The latest time handed out.
    last: AtomicI64,
}

impl DbClock {
    /// A clock reading `ms` at `at`, then running with this process's monotonic clock.
    pub fn at(at: Instant, ms: i64) -> Self {
        Self {
            base: Mutex::new((at, ms)),
            last: AtomicI64::new(i64::MIN),
        }
    }

    /// Follows the clock of the database behind `pool`: sampled now (an error when it cannot be),
    /// then again every [`RESYNC`] for as long as the clock is in use.
    pub async fn follow(pool: PgPool) -> Result<Arc<Self>> {
        let (at, ms, _) = sample(&pool).await?;
        let clock = Arc::new(Self::at(at, ms));
        let weak: Weak<Self> = Arc::downgrade(&clock);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(RESYNC).await;
                let Some(clock) = weak.upgrade() else { break };
                match sample(&pool).await {
                    Ok((at, ms, rtt)) if rtt <= TRUSTED_RTT => clock.set(at, ms),
                    Ok((_, _, rtt)) => {
                        tracing::debug!(
                            rtt_ms = rtt.as_millis() as u64,
                            "clock sample too slow; kept the last one"
                        )
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "could not sample the database's clock; kept the last sample")
                    }
                }
            }
        });
        Ok(clock)
    }

    /// Moves the clock to read `ms` at `at` (never back past what it already handed out).
    pub fn set(&self, at: Instant, ms: i64) {
        *self.base.lock().unwrap_or_else(|p| p.into_inner()) = (at, ms);
    }
}

impl Clock for DbClock {
    fn now_ms(&self) -> i64 {
        let (at, ms) = *self.base.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let t = if now >= at {
            ms + now.duration_since(at).as_millis() as i64
        } else {
            ms - at.duration_since(now).as_millis() as i64
        };
        self.last.fetch_max(t, Ordering::SeqCst).max(t)
    }
}

/// The database's time at the middle of the shortest of [`TRIES`] round trips: (that instant, its
/// time in ms, the round trip).
async fn sample(pool: &PgPool) -> Result<(Instant, i64, Duration)> {
    let mut best = once(pool).await?;
    for _ in 1..TRIES {
        let next = once(pool).await?;
        if next.2 < best.2 {
            best = next;
        }
    }
    Ok(best)
}

/// One round trip: (its middle, the database's time, its length).
async fn once(pool: &PgPool) -> Result<(Instant, i64, Duration)> {
    let sent = Instant::now();
    let ms: i64 = sqlx::query_scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::int8")
        .fetch_one(pool)
        .await?;
    let rtt = sent.elapsed();
    Ok((sent + rtt / 2, ms, rtt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_from_its_sample_and_never_goes_back() {
        let t0 = Instant::now();
        let c = DbClock::at(t0, 1_000_000);
        let a = c.now_ms();
        assert!((1_000_000..1_005_000).contains(&a), "{a}");
        // A sample 10 s ahead moves it on at once.
        c.set(Instant::now(), 1_010_000);
        let b = c.now_ms();
        assert!(b >= 1_010_000, "{b}");
        // A sample behind what was handed out holds it (never back).
        c.set(Instant::now(), 1_005_000);
        assert!(c.now_ms() >= b);
    }
}

//! The state every door shares: config, store, runner, caches and limits.

use std::sync::Arc;

use ec2jobd_store::Store;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::Metrics;
use ec2jobd_exec::runner::Runner;
use ec2jobd_store::TokenInfo;

/// Passed to every handler with `Router::with_state`. Cheap to clone: everything is behind `Arc`.
#[derive(Clone)]
pub struct AppState {
    /// The loaded configuration (read-only).
    pub config: Arc<Config>,
    /// The job queue.
    pub store: Arc<dyn Store>,
    /// The clock decisions are made on (the database's with PostgreSQL: see `app::daemon_clock`).
    pub clock: Arc<dyn ec2jobd_spec::Clock>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// This process's runner, so a cancel reaches a local job at once instead of at its next
    /// heartbeat.
    pub runner: Arc<Runner>,
    /// Recently verified API tokens.
    pub tokens: Arc<TokenCache>,
    /// AWS clients (SNS subscription confirmations).
    pub pool: Arc<ec2jobd_ec2::Ec2Pool>,
    /// Verifies SNS deliveries (certificate cache included).
    pub sns_certs: Arc<crate::sns::verify::CertStore>,
    /// Queue depth seen by admission control (refreshed at most every 250 ms).
    pub admission: Arc<Admission>,
    /// Event streams and held submissions open now (bounded overall and per token).
    pub streams: Arc<Streams>,
    /// Jobs per state for the dashboard, at most a few seconds old.
    pub counts: Arc<StateCounts>,
    /// Notified when this process saved or deleted a schedule: the ticker reads them again at
    /// once (other replicas' changes it finds by their stamp).
    pub schedules_changed: Arc<tokio::sync::Notify>,
    /// Cancelled when the daemon begins to shut down; long-lived responses (event streams) end then.
    pub shutdown: CancellationToken,
}

impl AppState {
    /// Now, by [`AppState::clock`].
    pub fn now(&self) -> chrono::DateTime<chrono::Utc> {
        crate::schedules::ticker::at_ms(self.clock.now_ms())
    }
}

/// Jobs per state for the dashboard's overview. Counting a large table takes a full index scan
/// (~80 ms at 1,000,000 jobs on SQLite): when the last count took longer than
/// [`StateCounts::CHEAP`], a request gets that count and, if it is older than
/// [`StateCounts::FRESH`], starts one new count in the background. A cheap count (a small table)
/// is simply made again, so the numbers are exact there.
#[derive(Debug, Default)]
pub struct StateCounts {
    last: std::sync::Mutex<CountsSeen>,
}

#[derive(Debug, Default)]
struct CountsSeen {
    at: Option<std::time::Instant>,
    took: std::time::Duration,
    counts: Vec<(ec2jobd_spec::JobState, i64)>,
    counting: bool,
}

impl StateCounts {
    /// How old a count may be before a request starts a new one.
    pub const FRESH: std::time::Duration = std::time::Duration::from_secs(3);
    /// A count faster than this is made on every request.
    pub const CHEAP: std::time::Duration = std::time::Duration::from_millis(20);

    /// The latest count (and a new one started when this one is stale).
    pub async fn get(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
    ) -> ec2jobd_store::Result<Vec<(ec2jobd_spec::JobState, i64)>> {
        let (cached, start) = {
            let mut l = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let cached = l.at.filter(|_| l.took >= Self::CHEAP);
            let stale = cached.is_none_or(|t| t.elapsed() >= Self::FRESH);
            let start = stale && !l.counting;
            if start {
                l.counting = true;
            }
            (cached.map(|_| l.counts.clone()), start)
        };
        let count = {
            let (me, store) = (self.clone(), store.clone());
            async move {
                let t = std::time::Instant::now();
                let r = store.counts().await;
                let mut l = me.last.lock().unwrap_or_else(|p| p.into_inner());
                l.counting = false;
                if let Ok(c) = &r {
                    l.at = Some(std::time::Instant::now());
                    l.took = t.elapsed();
                    l.counts = c.clone();
                }
                r
            }
        };
        match cached {
            Some(c) => {
                if start {
                    tokio::spawn(count);
                }
                Ok(c)
            }
            // Nothing counted yet, or counting is cheap: count now.
            None if start => count.await,
            None => store.counts().await,
        }
    }
}

/// Admission control: the queue depth, read from the store at most every 250 ms and counted up
/// between reads by this process's own submissions and the parked jobs its lot queued again, so
/// neither a burst nor waits ending together slip past the limit.
#[derive(Debug, Default)]
pub struct Admission {
    /// When the depth was read, the depth (plus admissions since), the lot's `returned` then.
    seen: std::sync::Mutex<Option<(std::time::Instant, i64, u64)>>,
}

impl Admission {
    /// Admits one more job when fewer than `max` are queued (`max` 0: always), counting the
    /// jobs parked in this process, each of which comes back to the queue when its wait ends
    /// (`parked` now, and `returned`: how many the lot has queued again so far); `Ok(false)` when
    /// full.
    pub async fn admit(
        &self,
        store: &dyn Store,
        max: u64,
        (parked, returned): (u64, u64),
    ) -> Result<bool, ec2jobd_store::StoreError> {
        if max == 0 {
            return Ok(true);
        }
        let fresh = {
            let g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            g.filter(|(at, ..)| at.elapsed() < std::time::Duration::from_millis(250))
        };
        let (depth, returned_then) = match fresh {
            Some((_, d, r)) => (d, r),
            None => {
                // `returned` is taken before the read: a job returned meanwhile is counted twice
                // (refusing early), never missed.
                let d = store.queued().await?;
                *self.seen.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((std::time::Instant::now(), d, returned));
                (d, returned)
            }
        };
        let since = returned.saturating_sub(returned_then);
        if depth.max(0) as u64 + since + parked >= max {
            return Ok(false);
        }
        if let Some((_, d, _)) = self.seen.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            *d += 1;
        }
        Ok(true)
    }
}

/// Long-lived answers open at once (SSE event streams, submissions held with `?wait=`), counted
/// overall and per token, so one client cannot hold every connection or task.
#[derive(Debug, Default)]
pub struct Streams {
    open: std::sync::Mutex<(usize, std::collections::HashMap<String, usize>)>,
}

/// One open long-lived answer; its slot is given back when dropped.
#[derive(Debug)]
pub struct StreamSlot {
    streams: Arc<Streams>,
    token: String,
}

impl Streams {
    /// A slot for `token`, or `None` when `max_total` are open or `max_per_token` for this token.
    pub fn open(
        self: &Arc<Self>,
        token: &str,
        max_total: usize,
        max_per_token: usize,
    ) -> Option<StreamSlot> {
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mine = g.1.get(token).copied().unwrap_or(0);
        if g.0 >= max_total || mine >= max_per_token {
            return None;
        }
        g.0 += 1;
        *g.1.entry(token.to_string()).or_default() += 1;
        Some(StreamSlot {
            streams: self.clone(),
            token: token.to_string(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut g = self.streams.open.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = g.0.saturating_sub(1);
        if let Some(n) = g.1.get_mut(&self.token) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.token);
            }
        }
    }
}

/// Recently verified tokens by hash, so a busy client does not cost a database read per request.
/// Entries live for [`TokenCache::TTL`]; revoking through the API evicts at once, revoking with the
/// CLI (another process) takes effect within the TTL.
#[derive(Default)]
pub struct TokenCache(
    std::sync::Mutex<std::collections::HashMap<String, (TokenInfo, std::time::Instant)>>,
);

impl TokenCache {
    /// How long a verified token is trusted without asking the store again.
    pub const TTL: std::time::Duration = std::time::Duration::from_secs(5);
    const MAX: usize = 10_000;

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (TokenInfo, std::time::Instant)>>
    {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn get(&self, hash: &str) -> Option<TokenInfo> {
        let map = self.lock();
        map.get(hash)
            .filter(|(_, at)| at.elapsed() < Self::TTL)
            .map(|(t, _)| t.clone())
    }

    pub(crate) fn put(&self, hash: String, info: TokenInfo) {
        let mut map = self.lock();
        if map.len() >= Self::MAX {
            map.retain(|_, (_, at)| at.elapsed() < Self::TTL);
        }
        if map.len() < Self::MAX {
            map.insert(hash, (info, std::time::Instant::now()));
        }
    }

    /// Forgets every entry of the named token.
    pub fn evict(&self, name: &str) {
        self.lock().retain(|_, (t, _)| t.name != name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_slots_are_bounded_overall_and_per_token_and_given_back() {
        let s = Arc::new(Streams::default());
        let a: Vec<_> = (0..2).filter_map(|_| s.open("a", 3, 2)).collect();
        assert_eq!(a.len(), 2);
        assert!(s.open("a", 3, 2).is_none(), "per token");
        let b = s.open("b", 3, 2).expect("b has room");
        assert!(s.open("c", 3, 2).is_none(), "overall");
        drop(b);
        assert!(s.open("c", 3, 2).is_some());
        drop(a);
        assert_eq!(s.open.lock().unwrap().1.len(), 0);
    }
}

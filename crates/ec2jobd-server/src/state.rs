//! The state every route shares.

use std::sync::Arc;

use ec2jobd_store::Store;
use tokio_util::sync::CancellationToken;

use crate::auth::TokenCache;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::runner::Runner;

/// Passed to every handler with `Router::with_state`. Cheap to clone: everything is behind `Arc`.
#[derive(Clone)]
pub struct AppState {
    /// The loaded configuration (read-only).
    pub config: Arc<Config>,
    /// The job queue.
    pub store: Arc<dyn Store>,
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
    /// Cancelled when the daemon begins to shut down; long-lived responses (event streams) end then.
    pub shutdown: CancellationToken,
}

/// Admission control: the queue depth, read from the store at most every 250 ms and counted up
/// between reads by this process's own submissions, so a burst cannot slip past the limit.
#[derive(Debug, Default)]
pub struct Admission {
    seen: std::sync::Mutex<Option<(std::time::Instant, i64)>>,
}

impl Admission {
    /// Admits one more job when fewer than `max` are queued (`max` 0: always); `Ok(false)` when full.
    pub async fn admit(
        &self,
        store: &dyn Store,
        max: u64,
    ) -> Result<bool, ec2jobd_store::StoreError> {
        if max == 0 {
            return Ok(true);
        }
        let fresh = {
            let g = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            g.filter(|(at, _)| at.elapsed() < std::time::Duration::from_millis(250))
        };
        let depth = match fresh {
            Some((_, d)) => d,
            None => {
                let d = store.queued().await?;
                *self.seen.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((std::time::Instant::now(), d));
                d
            }
        };
        if depth as u64 >= max {
            return Ok(false);
        }
        if let Some((_, d)) = self.seen.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            *d += 1;
        }
        Ok(true)
    }
}

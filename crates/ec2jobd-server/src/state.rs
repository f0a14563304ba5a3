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
    /// Cancelled when the daemon begins to shut down; long-lived responses (event streams) end then.
    pub shutdown: CancellationToken,
}

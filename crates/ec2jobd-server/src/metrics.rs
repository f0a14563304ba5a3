//! Prometheus metrics (`GET /metrics`, all prefixed `ec2jobd_`). Counters and histograms are updated
//! where things happen; job counts by state and the queue depth are read from the store at scrape
//! time, so they are right even for jobs other processes changed.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use ec2jobd_ec2::CallObserver;
use ec2jobd_spec::JobState;

type Labels = Vec<(String, String)>;

/// All metrics of one daemon.
pub struct Metrics {
    registry: Registry,
    jobs: Family<Labels, Gauge>,
    queue_depth: Gauge,
    submitted: Family<Labels, Counter>,
    finished: Family<Labels, Counter>,
    retries: Counter,
    duration: Family<Labels, Histogram>,
    ec2_calls: Family<Labels, Counter>,
    paced: Family<Labels, Counter<f64>>,
    attempts: Family<Labels, Counter>,
    retried: Family<Labels, Counter>,
    status_rounds: Counter,
    status_round_instances: Gauge,
    sns_refused: Family<Labels, Counter>,
    pruned: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ec2jobd");
        let jobs = Family::<Labels, Gauge>::default();
        registry.register("jobs", "Jobs in the store by state", jobs.clone());
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Jobs waiting to be claimed",
            queue_depth.clone(),
        );
        let submitted = Family::<Labels, Counter>::default();
        registry.register(
            "jobs_submitted",
            "Jobs accepted by this process, by action",
            submitted.clone(),
        );
        let finished = Family::<Labels, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs finished by this process, by action and outcome",
            finished.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "job_retries",
            "Attempts rescheduled after a transient failure",
            retries.clone(),
        );
        let duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 20))
        });
        registry.register(
            "job_duration_seconds",
            "Time of one attempt, by action and outcome",
            duration.clone(),
        );
        let ec2_calls = Family::<Labels, Counter>::default();
        registry.register(
            "ec2_calls",
            "EC2 API calls by operation and outcome (`ok` or the AWS error code)",
            ec2_calls.clone(),
        );
        let paced = Family::<Labels, Counter<f64>>::default();
        registry.register(
            "ec2_pacing_wait_seconds",
            "Time EC2 calls were held by client-side pacing, by operation",
            paced.clone(),
        );
        let attempts = Family::<Labels, Counter>::default();
        registry.register(
            "ec2_attempts",
            "HTTP attempts of AWS calls by operation and outcome (`ok`, the AWS error code such as `RequestLimitExceeded`, `http_<status>`, or `no_response`), retries included",
            attempts.clone(),
        );
        let retried = Family::<Labels, Counter>::default();
        registry.register(
            "ec2_retries",
            "AWS call attempts that were retries of an earlier attempt of the same call, by operation",
            retried.clone(),
        );
        let status_rounds = Counter::default();
        registry.register(
            "status_rounds",
            "Polling rounds of the shared status watchers (each asks DescribeInstanceStatus about every waiting instance, 100 per call)",
            status_rounds.clone(),
        );
        let status_round_instances = Gauge::default();
        registry.register(
            "status_round_instances",
            "Instances asked about in the latest status round (instances jobs are waiting on)",
            status_round_instances.clone(),
        );
        let sns_refused = Family::<Labels, Counter>::default();
        registry.register(
            "sns_refused",
            "SNS deliveries refused (403), by kind (`topic`, `cert_url`, `signature`, `stale`, …)",
            sns_refused.clone(),
        );
        let pruned = Family::<Labels, Counter>::default();
        registry.register(
            "pruned",
            "Rows deleted by retention (`jobs` with their events, `sns_deliveries`)",
            pruned.clone(),
        );
        Self {
            pruned,
            sns_refused,
            registry,
            attempts,
            retried,
            paced,
            status_rounds,
            status_round_instances,
            jobs,
            queue_depth,
            submitted,
            finished,
            retries,
            duration,
            ec2_calls,
        }
    }

    /// Sets the per-state gauges from a fresh count.
    pub fn set_counts(&self, counts: &[(JobState, i64)]) {
        for (state, n) in counts {
            self.jobs
                .get_or_create(&vec![("state".into(), state.as_str().into())])
                .set(*n);
            if *state == JobState::Queued {
                self.queue_depth.set(*n);
            }
        }
    }

    /// Retention deleted `n` rows of `what`.
    pub fn pruned(&self, what: &str, n: u64) {
        self.pruned
            .get_or_create(&vec![("what".into(), what.into())])
            .inc_by(n);
    }

    /// An SNS delivery was refused.
    pub fn sns_refused(&self, code: &str) {
        self.sns_refused
            .get_or_create(&vec![("code".into(), code.into())])
            .inc();
    }

    /// A job was accepted.
    pub fn submitted(&self, action: &str) {
        self.submitted
            .get_or_create(&vec![("action".into(), action.into())])
            .inc();
    }

    /// An attempt ended; `outcome` is the resulting state or `retry`.
    pub fn attempt(&self, action: &str, outcome: &str, seconds: f64) {
        let labels = vec![
            ("action".into(), action.to_string()),
            ("outcome".into(), outcome.to_string()),
        ];
        self.duration.get_or_create(&labels).observe(seconds);
        if outcome == "retry" {
            self.retries.inc();
        } else {
            self.finished.get_or_create(&labels).inc();
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

impl CallObserver for Metrics {
    fn observe(&self, operation: &'static str, outcome: &str) {
        self.ec2_calls
            .get_or_create(&vec![
                ("operation".into(), operation.into()),
                ("outcome".into(), outcome.into()),
            ])
            .inc();
    }

    fn paced(&self, operation: &'static str, waited: std::time::Duration) {
        self.paced
            .get_or_create(&vec![("operation".into(), operation.into())])
            .inc_by(waited.as_secs_f64());
    }

    fn round(&self, instances: usize) {
        self.status_rounds.inc();
        self.status_round_instances.set(instances as i64);
    }

    fn attempt(&self, operation: &str, outcome: &str, retry: bool) {
        self.attempts
            .get_or_create(&vec![
                ("operation".into(), operation.into()),
                ("outcome".into(), outcome.into()),
            ])
            .inc();
        if retry {
            self.retried
                .get_or_create(&vec![("operation".into(), operation.into())])
                .inc();
        }
    }
}

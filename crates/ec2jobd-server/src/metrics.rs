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
use ec2jobd_exec::RunObserver;
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
    parked: Gauge,
    sns_refused: Family<Labels, Counter>,
    pruned: Family<Labels, Counter>,
    leader: Gauge,
    backups: Family<Labels, Counter>,
    backup_last: Gauge,
    clock_offset: Gauge<f64, std::sync::atomic::AtomicU64>,
    schedules: Gauge,
    schedule_firings: Family<Labels, Counter>,
    sqs_messages: Family<Labels, Counter>,
}

/// EC2 figures for the dashboard ([`Metrics::ec2_totals`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct Ec2Totals {
    pub calls: f64,
    pub throttled: f64,
    pub retries: f64,
    pub parked: f64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// The dashboard's EC2 figures, summed from the same samples `/metrics` shows: calls,
    /// attempts throttled (`RequestLimitExceeded` and other throttling codes), retries, and
    /// jobs parked in waits now.
    pub fn ec2_totals(&self) -> Ec2Totals {
        let mut t = Ec2Totals::default();
        for line in self.render(Exposition::Classic).lines() {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let v: f64 = value.parse().unwrap_or(0.0);
            let metric = name.split('{').next().unwrap_or("");
            match metric {
                "ec2jobd_ec2_calls_total" => t.calls += v,
                "ec2jobd_ec2_retries_total" => t.retries += v,
                "ec2jobd_ec2_attempts_total"
                    if name.contains("Throttl") || name.contains("RequestLimitExceeded") =>
                {
                    t.throttled += v
                }
                "ec2jobd_jobs_parked" => t.parked += v,
                _ => {}
            }
        }
        t
    }

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
            "Polling rounds of the shared status watchers (each asks DescribeInstanceStatus about every waiting instance, 100 per call, and DescribeSnapshots/DescribeImages about every awaited snapshot and AMI, 200 per call)",
            status_rounds.clone(),
        );
        let status_round_instances = Gauge::default();
        registry.register(
            "status_round_instances",
            "Instances asked about in the latest status round (instances jobs are waiting on)",
            status_round_instances.clone(),
        );
        let parked = Gauge::default();
        registry.register(
            "jobs_parked",
            "Jobs of this process waiting (for instances, snapshots or AMIs) without holding a worker",
            parked.clone(),
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
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this process holds the maintenance lease (publishes the outbox, prunes); with SQLite always 1",
            leader.clone(),
        );
        let backups = Family::<Labels, Counter>::default();
        registry.register(
            "backups",
            "Periodic database backups (`[backup]`) by outcome (`ok` or `failed`)",
            backups.clone(),
        );
        let backup_last = Gauge::default();
        registry.register(
            "backup_last_success_timestamp_seconds",
            "When the last periodic backup that succeeded began (Unix time; 0: none yet)",
            backup_last.clone(),
        );
        let clock_offset = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "clock_offset_seconds",
            "This machine's clock minus the clock the daemon decides on (the database server's with PostgreSQL; 0 with SQLite)",
            clock_offset.clone(),
        );
        let schedules = Gauge::default();
        registry.register(
            "schedules",
            "Schedules the leader's ticker holds (0 on other replicas)",
            schedules.clone(),
        );
        let schedule_firings = Family::<Labels, Counter>::default();
        registry.register(
            "schedule_firings",
            "Schedule firings by outcome (`queued`, `already` queued by its key, `skipped` for overlap, `failed`)",
            schedule_firings.clone(),
        );
        let sqs_messages = Family::<Labels, Counter>::default();
        registry.register(
            "sqs_messages",
            "Messages of SQS intakes by intake and outcome (the hook's outcomes: `accepted`, `duplicate`, `no_rule`, `failed`, …; `left` when the message stays in the queue for redelivery, `receive_error`, `delete_error`)",
            sqs_messages.clone(),
        );
        Self {
            leader,
            backups,
            backup_last,
            clock_offset,
            schedules,
            schedule_firings,
            sqs_messages,
            parked,
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

    /// How far this machine's clock is ahead of the one decisions are made on, in seconds.
    pub fn set_clock_offset(&self, seconds: f64) {
        self.clock_offset.set(seconds);
    }

    /// Whether this process leads maintenance now.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// How many schedules the ticker holds.
    pub fn set_schedules(&self, loaded: usize) {
        self.schedules.set(loaded as i64);
    }

    /// One schedule firing's outcome.
    pub fn schedule_fired(&self, outcome: &str) {
        self.schedule_firings
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
    }

    /// One SQS intake message's outcome (or a failed receive or delete).
    pub fn sqs_message(&self, intake: &str, outcome: &str) {
        self.sqs_messages
            .get_or_create(&vec![
                ("intake".into(), intake.into()),
                ("outcome".into(), outcome.into()),
            ])
            .inc();
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

    /// A periodic backup begun at `began_s` (Unix seconds) ended.
    pub fn backed_up(&self, ok: bool, began_s: i64) {
        let outcome = if ok { "ok" } else { "failed" };
        self.backups
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
        if ok {
            self.backup_last.set(began_s);
        }
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

    /// The metrics in the format asked for: OpenMetrics 1.0 text, or Prometheus's classic text
    /// format 0.0.4 (what `promtool check metrics` and older scrapers read).
    pub fn render(&self, format: Exposition) -> String {
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        match format {
            Exposition::OpenMetrics => out,
            Exposition::Classic => classic(&out),
        }
    }
}

/// The two text formats `/metrics` serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// `application/openmetrics-text; version=1.0.0`.
    OpenMetrics,
    /// `text/plain; version=0.0.4`.
    Classic,
}

impl Exposition {
    /// OpenMetrics when the `Accept` header names it with a non-zero quality (as Prometheus
    /// does), the classic format otherwise (no header, `text/plain`, `*/*`).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let asks = accept.is_some_and(|a| {
            a.split(',').any(|range| {
                let mut parts = range.split(';').map(str::trim);
                let media = parts.next().unwrap_or_default();
                let q_zero = parts.any(|p| {
                    p.strip_prefix("q=")
                        .and_then(|q| q.parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !q_zero
            })
        });
        if asks {
            Exposition::OpenMetrics
        } else {
            Exposition::Classic
        }
    }

    /// The Content-Type of the answer.
    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// OpenMetrics text rewritten as the classic format: a family is named as its samples are (a
/// counter `x` samples `x_total`, an info family `x` samples `x_info`), types the classic format
/// lacks are `untyped`, and `# UNIT` and `# EOF` lines go. Samples stay as they are.
fn classic(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            out.push_str(line);
            out.push('\n');
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
        let (family, kind) = match kind {
            "counter" if !name.ends_with("_total") => (format!("{name}_total"), kind),
            "info" => (format!("{name}_info"), "gauge"),
            "counter" | "gauge" | "histogram" | "summary" => (name.to_string(), kind),
            _ => (name.to_string(), "untyped"),
        };
        // HELP comes just before TYPE in both formats: rename the HELP line already written.
        if family != name {
            let help = format!("# HELP {name} ");
            if let Some(at) = out.rfind(&help) {
                out.replace_range(at..at + help.len(), &format!("# HELP {family} "));
            }
        }
        out.push_str(&format!("# TYPE {family} {kind}\n"));
    }
    out
}

impl RunObserver for Metrics {
    /// An attempt ended; `outcome` is the resulting state or `retry`.
    fn attempt(&self, action: &str, outcome: &str, seconds: f64) {
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

    /// Jobs parked in this process now.
    fn set_parked(&self, n: i64) {
        self.parked.set(n);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_names_families_as_their_samples() {
        let om = "# HELP a_calls Calls.\n# TYPE a_calls counter\na_calls_total{x=\"1\"} 2\n\
                  # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n\
                  # HELP a_build Build.\n# TYPE a_build info\na_build_info{v=\"1\"} 1\n\
                  # HELP a_s Sizes.\n# TYPE a_s gaugehistogram\n# UNIT a_s bytes\n# EOF\n";
        assert_eq!(
            classic(om),
            "# HELP a_calls_total Calls.\n# TYPE a_calls_total counter\na_calls_total{x=\"1\"} 2\n\
             # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n\
             # HELP a_build_info Build.\n# TYPE a_build_info gauge\na_build_info{v=\"1\"} 1\n\
             # HELP a_s Sizes.\n# TYPE a_s untyped\n"
        );
    }

    #[test]
    fn openmetrics_only_when_asked_for() {
        use Exposition::*;
        assert_eq!(Exposition::negotiate(None), Classic);
        assert_eq!(Exposition::negotiate(Some("*/*")), Classic);
        assert_eq!(
            Exposition::negotiate(Some("text/plain;version=0.0.4")),
            Classic
        );
        assert_eq!(
            Exposition::negotiate(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            OpenMetrics
        );
        assert_eq!(
            Exposition::negotiate(Some("Application/OpenMetrics-Text; q=0.1")),
            OpenMetrics
        );
        assert_eq!(
            Exposition::negotiate(Some("application/openmetrics-text;q=0, text/plain")),
            Classic
        );
    }
}

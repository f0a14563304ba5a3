//! Outbound notifications: when a job ends, its outcome is published to the SNS topic its spec
//! names (`notify`), or the configured default (`[notify]`). The message uses SNS's JSON message
//! structure: e-mail, SMS and other human subscribers get the job's text report; HTTP(S), SQS and
//! Lambda subscribers get a JSON document `{"report": <text>, "job": <the job>}`. The `job_id`,
//! `action` and `state` message attributes serve subscription filter policies.
//!
//! Publishing never changes the job's outcome, and it survives restarts: a job reaches its final
//! state and enters the store's outbox in one transaction, and this notifier publishes from the
//! outbox (woken when a local job ends, and polling for the rest; with replicas, only the one
//! leading maintenance publishes: `leader`), so a daemon killed between a
//! job's end and its publish publishes it after restart. A failed publish is retried with
//! exponential backoff and jitter, held in the outbox; every outcome is recorded as a job event
//! (`notified` with SNS's message id, or `notify_failed` with the error) in the transaction that
//! takes the job out of the outbox. A publish that succeeded just before a crash, before that
//! transaction, is sent again after restart (at least once). Jobs that ask for no notification
//! leave the outbox in batches.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sns::types::MessageAttributeValue;
use ec2jobd_ec2::Ec2Pool;
use ec2jobd_spec::{Clock, Job, Notify};
use ec2jobd_store::{NewEvent, Store};
use futures::StreamExt;
use rand::Rng;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::leader::Leading;

/// Largest job JSON carried per machine protocol (four copies); SNS caps a message at 256 KiB.
const MAX_JOB_JSON: usize = 48 * 1024;

/// Publishes job outcomes.
pub struct Notifier {
    pool: Arc<Ec2Pool>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    default: Option<Notify>,
    attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
    wake: tokio::sync::Notify,
}

/// Outbox entries taken at once; publishes in flight at once.
const BATCH: u32 = 64;
const IN_FLIGHT: usize = 8;

/// How often the outbox is looked at when nothing wakes the notifier (jobs ended by another
/// process, retries coming due).
const POLL: Duration = Duration::from_millis(500);

impl Notifier {
    /// A notifier publishing through `pool`'s SNS clients, recording in `store`.
    pub fn new(
        pool: Arc<Ec2Pool>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        default: Option<Notify>,
        attempts: u32,
        backoff_base: Duration,
        backoff_max: Duration,
    ) -> Self {
        Self {
            pool,
            store,
            clock,
            default,
            attempts: attempts.max(1),
            backoff_base,
            backoff_max,
            wake: tokio::sync::Notify::new(),
        }
    }

    /// A local job ended: look at the outbox now.
    pub fn job_finished(&self) {
        self.wake.notify_one();
    }

    /// What to publish for a finished job, if anything.
    fn target(&self, job: &Job) -> Option<Notify> {
        let n = job.spec.notify.clone().or_else(|| self.default.clone())?;
        n.wants(job.state.as_str()).then_some(n)
    }

    /// Publishes from the outbox while this process `leading`, until `shutdown`.
    pub async fn run(self: Arc<Self>, leading: Leading, shutdown: CancellationToken) {
        loop {
            if !leading.now() {
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = shutdown.cancelled() => return,
                }
                continue;
            }
            let full = match self.round().await {
                Ok(full) => full,
                Err(e) => {
                    tracing::warn!(error = %e, "notification outbox unavailable");
                    false
                }
            };
            if full {
                continue;
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// One pass over what is due; true when there may be more.
    async fn round(&self) -> Result<bool, ec2jobd_store::StoreError> {
        let due = self.store.outbox(self.clock.now_ms(), BATCH).await?;
        let full = due.len() == BATCH as usize;
        let mut done = Vec::new();
        let mut publish = Vec::new();
        for (job, tries) in due {
            match self.target(&job) {
                None => done.push((job.id, None)),
                Some(n) => publish.push((job, n, tries)),
            }
        }
        let results: Vec<_> = futures::stream::iter(publish)
            .map(|(job, n, tries)| async move {
                let r = self.publish(&job, &n).await;
                (job, n, tries + 1, r)
            })
            .buffer_unordered(IN_FLIGHT)
            .collect()
            .await;
        for (job, n, attempt, r) in results {
            match r {
                Ok(id) => done.push((
                    job.id,
                    Some(NewEvent {
                        kind: "notified".into(),
                        message: format!("published to {}", n.topic_arn),
                        data: json!({"topic_arn": n.topic_arn, "message_id": id, "attempt": attempt}),
                    }),
                )),
                Err(e) if attempt >= self.attempts => {
                    tracing::warn!(job = %job.id, attempt, error = %e, "SNS publish failed; giving up");
                    done.push((
                        job.id,
                        Some(NewEvent {
                            kind: "notify_failed".into(),
                            message: format!(
                                "could not publish to {} after {attempt} attempt(s): {e}",
                                n.topic_arn
                            ),
                            data: json!({"topic_arn": n.topic_arn, "error": e}),
                        }),
                    ));
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, attempt, error = %e, "SNS publish failed");
                    let after = self.clock.now_ms() + self.backoff(attempt).as_millis() as i64;
                    self.store.outbox_retry(&job.id, after).await?;
                }
            }
        }
        self.store.outbox_done(done).await?;
        Ok(full)
    }

    /// Full-range-jitter exponential backoff before publish attempt `attempt + 1`.
    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .backoff_base
            .saturating_mul(1 << (attempt.saturating_sub(1)).min(16))
            .min(self.backoff_max);
        cap.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }

    async fn publish(&self, job: &Job, n: &Notify) -> Result<String, String> {
        let region = crate::sns::topic_region(&n.topic_arn).unwrap_or("us-east-1");
        let account = job.spec.account.as_deref().unwrap_or("default");
        let sns = self
            .pool
            .sns(account, region)
            .await
            .map_err(|e| e.to_string())?;
        let subject = n
            .subject
            .clone()
            .unwrap_or_else(|| format!("ec2jobd {} {}", job.action, job.state));
        let mut job_doc = serde_json::to_value(job.clone().redacted()).unwrap_or_default();
        if job_doc.to_string().len() > MAX_JOB_JSON {
            job_doc = json!({"id": job.id, "state": job.state, "action": job.action,
                "error": job.error, "summary": job.results.summary, "truncated": true});
        }
        let report = crate::report::render(job);
        let machine = json!({"report": report, "job": job_doc}).to_string();
        let message = json!({
            "default": report, "email": report, "sms": job.results.summary.clone().unwrap_or_default(),
            "http": machine, "https": machine, "sqs": machine, "lambda": machine,
        });
        let attr = |v: &str| {
            MessageAttributeValue::builder()
                .data_type("String")
                .string_value(v)
                .build()
                .map_err(|e| e.to_string())
        };
        let out = sns
            .publish()
            .topic_arn(&n.topic_arn)
            .subject(subject.chars().take(100).collect::<String>())
            .message(message.to_string())
            .message_structure("json")
            .message_attributes("job_id", attr(&job.id)?)
            .message_attributes("action", attr(job.action.as_str())?)
            .message_attributes("state", attr(job.state.as_str())?)
            .send()
            .await
            .map_err(|e| super::aws_error(&e))?;
        Ok(out.message_id().unwrap_or_default().to_string())
    }
}

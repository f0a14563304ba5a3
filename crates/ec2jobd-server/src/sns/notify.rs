//! Outbound notifications: when a job ends, its outcome is published to the SNS topic its spec
//! names (`notify`), or the configured default (`[notify]`). The message uses SNS's JSON message
//! structure: e-mail, SMS and other human subscribers get the job's text report; HTTP(S), SQS and
//! Lambda subscribers get a JSON document `{"report": <text>, "job": <the job>}`. The `job_id`,
//! `action` and `state` message attributes serve subscription filter policies.
//!
//! Publishing never changes the job's outcome. A failed publish is retried with exponential backoff
//! and jitter; every outcome is recorded as a job event (`notified` with SNS's message id, or
//! `notify_failed` with the error). Retries live in this process: a daemon stopped while a
//! notification is still retrying does not send it after restart (see the issue notes).

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_sns::types::MessageAttributeValue;
use ec2jobd_ec2::Ec2Pool;
use ec2jobd_spec::{Job, Notify};
use ec2jobd_store::{NewEvent, Store};
use rand::Rng;
use serde_json::json;

/// Largest job JSON carried per machine protocol (four copies); SNS caps a message at 256 KiB.
const MAX_JOB_JSON: usize = 48 * 1024;

/// Publishes job outcomes.
pub struct Notifier {
    pool: Arc<Ec2Pool>,
    store: Arc<dyn Store>,
    default: Option<Notify>,
    attempts: u32,
    backoff_base: Duration,
    backoff_max: Duration,
}

impl Notifier {
    /// A notifier publishing through `pool`'s SNS clients, recording in `store`.
    pub fn new(
        pool: Arc<Ec2Pool>,
        store: Arc<dyn Store>,
        default: Option<Notify>,
        attempts: u32,
        backoff_base: Duration,
        backoff_max: Duration,
    ) -> Self {
        Self {
            pool,
            store,
            default,
            attempts: attempts.max(1),
            backoff_base,
            backoff_max,
        }
    }

    /// Called with every job that reached a final state; publishes in the background if asked.
    pub fn job_finished(self: &Arc<Self>, job: Job) {
        let Some(n) = job.spec.notify.clone().or_else(|| self.default.clone()) else {
            return;
        };
        if !n.wants(job.state.as_str()) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move { me.deliver(job, n).await });
    }

    async fn deliver(&self, job: Job, n: Notify) {
        let mut last = String::new();
        for attempt in 1..=self.attempts {
            match self.publish(&job, &n).await {
                Ok(id) => {
                    self.note(
                        &job,
                        "notified",
                        format!("published to {}", n.topic_arn),
                        json!({"topic_arn": n.topic_arn, "message_id": id, "attempt": attempt}),
                    )
                    .await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(job = %job.id, attempt, error = %e, "SNS publish failed");
                    last = e;
                }
            }
            if attempt < self.attempts {
                let cap = self
                    .backoff_base
                    .saturating_mul(1 << (attempt - 1).min(16))
                    .min(self.backoff_max);
                let jitter = rand::thread_rng().gen_range(0.5..=1.0);
                tokio::time::sleep(cap.mul_f64(jitter)).await;
            }
        }
        self.note(
            &job,
            "notify_failed",
            format!(
                "could not publish to {} after {} attempt(s): {last}",
                n.topic_arn, self.attempts
            ),
            json!({"topic_arn": n.topic_arn, "error": last}),
        )
        .await;
    }

    async fn note(&self, job: &Job, kind: &str, message: String, data: serde_json::Value) {
        let ev = NewEvent {
            kind: kind.into(),
            message,
            data,
        };
        if let Err(e) = self.store.note(&job.id, ev).await {
            tracing::warn!(job = %job.id, error = %e, "could not record the notification outcome");
        }
    }

    async fn publish(&self, job: &Job, n: &Notify) -> Result<String, String> {
        let region = n.topic_arn.split(':').nth(3).unwrap_or("us-east-1");
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
            .map_err(|e| super::sns_error(&e))?;
        Ok(out.message_id().unwrap_or_default().to_string())
    }
}

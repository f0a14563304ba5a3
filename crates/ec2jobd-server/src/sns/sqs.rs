//! SQS intakes (`[sqs.<name>]`): SNS deliveries for a daemon with no inbound HTTPS. Each intake
//! long-polls its queue and hands every message to its hook exactly as the webhook does
//! (`service::hooks::verified` and `service::hooks::handle`: signature and topics, rules,
//! de-duplication by `MessageId`, the delivery record), then deletes the message only when the hook
//! is done with it: its job durably queued, a duplicate, no rule matching, or no job possible. A
//! refused signature, a missing hook, a full queue or an unavailable store leave the message in the
//! queue, to come back after its visibility timeout and, if it keeps failing, go where the queue's
//! redrive policy sends it. A crash anywhere between receive and delete therefore loses nothing,
//! and the redelivery finds the job by its key instead of queueing a second one.
//!
//! Must not: delete a message before its outcome is stored, or hold a message's processing up
//! for the next receive.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::SqsSection;
use crate::service::{hooks, Caller, Door};
use crate::sns::verify::SnsMessage;
use crate::state::AppState;

/// Starts one polling task per configured intake.
pub fn start(state: &AppState, shutdown: &CancellationToken) {
    for (name, intake) in &state.config.sqs {
        tokio::spawn(poll(
            state.clone(),
            name.clone(),
            intake.clone(),
            shutdown.clone(),
        ));
    }
}

/// Receives until shutdown; a failed receive waits (doubling up to a minute) before the next.
async fn poll(state: AppState, name: String, intake: SqsSection, shutdown: CancellationToken) {
    let (account, region) = intake.account_region(&state.config);
    let mut backoff = Duration::from_secs(1);
    tracing::info!(intake = %name, queue = %intake.queue_url, hook = %intake.hook, "SQS intake polling");
    loop {
        let received = async {
            let sqs = state
                .pool
                .sqs(&account, &region)
                .await
                .map_err(|e| e.to_string())?;
            sqs.receive_message()
                .queue_url(&intake.queue_url)
                .max_number_of_messages(intake.batch)
                .wait_time_seconds(intake.wait.0.as_secs() as i32)
                // A long poll outlasts a short `call_timeout`: this call may take its wait and more.
                .customize()
                .config_override(
                    aws_sdk_sqs::config::Builder::default().timeout_config(
                        aws_sdk_sqs::config::timeout::TimeoutConfig::builder()
                            .operation_attempt_timeout(intake.wait.0 + Duration::from_secs(10))
                            .build(),
                    ),
                )
                .send()
                .await
                .map_err(|e| crate::sns::aws_error(&e))
                .map(|out| (sqs, out.messages.unwrap_or_default()))
        };
        // A receive cut by shutdown leaves its messages invisible until their timeout: none is lost.
        let received = tokio::select! {
            r = received => r,
            _ = shutdown.cancelled() => return,
        };
        let (sqs, messages) = match received {
            Ok(r) => {
                backoff = Duration::from_secs(1);
                r
            }
            Err(e) => {
                state.metrics.sqs_message(&name, "receive_error");
                tracing::warn!(intake = %name, error = %e, retry_in = ?backoff, "SQS receive failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(60));
                continue;
            }
        };
        for m in messages {
            let (Some(body), Some(receipt)) = (m.body(), m.receipt_handle()) else {
                continue;
            };
            let id = m.message_id().unwrap_or_default();
            match deliver(&state, &intake, &name, id, body).await {
                Ok(outcome) => {
                    state.metrics.sqs_message(&name, &outcome);
                    let deleted = sqs
                        .delete_message()
                        .queue_url(&intake.queue_url)
                        .receipt_handle(receipt)
                        .send()
                        .await;
                    if let Err(e) = deleted {
                        // It comes again; the hook then answers `duplicate` and it is deleted.
                        state.metrics.sqs_message(&name, "delete_error");
                        tracing::warn!(intake = %name, message_id = %id, error = %crate::sns::aws_error(&e), "SQS delete failed");
                    }
                }
                Err(why) => {
                    state.metrics.sqs_message(&name, "left");
                    tracing::warn!(intake = %name, message_id = %id, reason = %why, "SQS message left in the queue for redelivery");
                }
            }
        }
    }
}

/// One message through its hook: the hook's outcome when the message is done with, or why it stays.
async fn deliver(
    state: &AppState,
    intake: &SqsSection,
    name: &str,
    sqs_message_id: &str,
    body: &str,
) -> Result<String, String> {
    let h = match hooks::find(state, &intake.hook).await {
        Ok(Some((_, h))) => h,
        Ok(None) => return Err(format!("no SNS hook `{}`", intake.hook)),
        Err(e) => return Err(e.to_string()),
    };
    let m = if intake.raw {
        raw_message(
            sqs_message_id,
            body,
            h.topics.first().cloned().unwrap_or_default(),
        )
    } else {
        // No replay window: the queue keeps messages while the daemon is away.
        hooks::verified(state, &intake.hook, &h, body.as_bytes(), None)
            .await
            .map_err(|e| e.to_string())?
    };
    let caller = Caller::unattended(format!("sqs:{name}"), Door::Sqs);
    let answer = hooks::handle(state, &caller, &intake.hook, &h, &m)
        .await
        .map_err(|e| e.to_string())?;
    Ok(answer.outcome)
}

/// A raw delivery (`RawMessageDelivery`) as the notification it stands for: the body is the
/// message, SQS's message id (the same on every redelivery) is its id, the hook's first topic its
/// topic. Nothing is signed.
fn raw_message(id: &str, body: &str, topic: String) -> SnsMessage {
    SnsMessage {
        kind: "Notification".into(),
        message_id: id.to_string(),
        topic_arn: topic,
        subject: None,
        message: body.to_string(),
        timestamp: String::new(),
        signature_version: String::new(),
        signature: String::new(),
        signing_cert_url: String::new(),
        token: None,
        subscribe_url: None,
    }
}

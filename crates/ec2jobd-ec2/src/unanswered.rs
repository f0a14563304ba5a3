//! No blind retries of creating calls that carry no idempotency token.
//!
//! CreateSnapshot, CopySnapshot and CreateImage take no `ClientToken` (and CopyImage is sent
//! without one), so when such a call goes unanswered (a dropped connection, an attempt timeout) it
//! may have taken effect, and the SDK's standard retry would send it again: a second snapshot, or an
//! `InvalidAMIName.Duplicate` failure for an image that was in fact made. An answered error
//! (throttling, 5xx) means AWS did not act, so those are still retried by the SDK. An unanswered one
//! is handed to the job instead: its next attempt first looks for what the job already made (by the
//! job's tag) and only then creates. The fault campaign counts creations where they take effect and
//! checks this.

use aws_smithy_runtime_api::client::interceptors::context::InterceptorContext;
use aws_smithy_runtime_api::client::retries::classifiers::{ClassifyRetry, RetryAction};

/// Forbids the SDK's retry when an attempt got no HTTP response at all.
#[derive(Debug, Default)]
struct NoRetryUnanswered;

impl ClassifyRetry for NoRetryUnanswered {
    fn classify_retry(&self, ctx: &InterceptorContext) -> RetryAction {
        let failed = matches!(ctx.output_or_error(), Some(Err(_)));
        if failed && ctx.response().is_none() {
            RetryAction::RetryForbidden
        } else {
            RetryAction::NoActionIndicated
        }
    }

    fn name(&self) -> &'static str {
        "ec2jobd-no-retry-unanswered"
    }
}

/// The per-operation config override for creating calls without an idempotency token.
pub(crate) fn creating() -> aws_sdk_ec2::config::Builder {
    aws_sdk_ec2::config::Builder::default().retry_classifier(NoRetryUnanswered)
}

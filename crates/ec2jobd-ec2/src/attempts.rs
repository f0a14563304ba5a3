//! Counts every HTTP attempt of every EC2 call, retries included.
//!
//! The SDK's standard retry strategy retries throttling, 5xx and dropped connections inside one call,
//! so the per-call outcome ([`CallObserver::observe`]) only shows what the SDK gave up on. Operators
//! need to see the throttling and the retries themselves (is the account near its API limits? is the
//! network flaky?), so this interceptor reports each attempt with its outcome: `ok`, the AWS error
//! code read from the error body (`RequestLimitExceeded`, `Unavailable`, ...), `http_<status>` when
//! the body names none, or `no_response` when the connection dropped or the attempt timed out.

use std::sync::Arc;

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::FinalizerInterceptorContextRef;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::retries::RequestAttempts;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

use crate::CallObserver;

/// The interceptor installed on every EC2 and SNS client of the pool.
#[derive(Clone)]
pub(crate) struct AttemptCounter {
    pub(crate) observer: Arc<dyn CallObserver>,
}

impl std::fmt::Debug for AttemptCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AttemptCounter")
    }
}

/// The outcome of one attempt from its HTTP status and (error) body.
pub(crate) fn outcome(status: Option<u16>, body: Option<&[u8]>) -> String {
    match status {
        None => "no_response".into(),
        Some(s) if (200..300).contains(&s) => "ok".into(),
        Some(s) => body
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(error_code)
            .map(String::from)
            .unwrap_or_else(|| format!("http_{s}")),
    }
}

/// The first `<Code>` of an AWS query/EC2 XML error body.
fn error_code(body: &str) -> Option<&str> {
    let start = body.find("<Code>")? + "<Code>".len();
    let len = body[start..].find("</Code>")?;
    let code = body[start..start + len].trim();
    let plain = !code.is_empty()
        && code.len() <= 64
        && code
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_');
    plain.then_some(code)
}

impl Intercept for AttemptCounter {
    fn name(&self) -> &'static str {
        "ec2jobd-attempt-counter"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _rc: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg
            .load::<Metadata>()
            .map(|m| m.name())
            .unwrap_or("unknown");
        let retry = cfg
            .load::<RequestAttempts>()
            .is_some_and(|a| a.attempts() > 1);
        let response = context.response();
        let outcome = outcome(
            response.map(|r| r.status().as_u16()),
            response.and_then(|r| r.body().bytes()),
        );
        self.observer.attempt(operation, &outcome, retry);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes() {
        let throttled = b"<Response><Errors><Error><Code>RequestLimitExceeded</Code><Message>slow down</Message></Error></Errors></Response>";
        assert_eq!(outcome(Some(503), Some(throttled)), "RequestLimitExceeded");
        assert_eq!(outcome(Some(200), Some(throttled)), "ok");
        assert_eq!(
            outcome(Some(502), Some(b"<html>bad gateway</html>")),
            "http_502"
        );
        assert_eq!(outcome(Some(500), None), "http_500");
        assert_eq!(outcome(None, None), "no_response");
        // Nothing odd from a body reaches a metric label.
        assert_eq!(outcome(Some(400), Some(b"<Code>a b\"c</Code>")), "http_400");
        assert_eq!(outcome(Some(400), Some(b"<Code>unterminated")), "http_400");
    }
}

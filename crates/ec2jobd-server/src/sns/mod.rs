//! SNS in and out: verified HTTP deliveries from SNS topics (CloudWatch alarms, EventBridge events)
//! that rules turn into jobs (or the same messages long-polled from SQS queues), and notifications
//! of job outcomes published to topics.

pub mod notify;
pub mod rules;
pub mod sqs;
pub mod verify;

/// The region of a topic ARN (`arn:aws:sns:<region>:<account-id>:<name>`), if it names one.
pub fn topic_region(arn: &str) -> Option<&str> {
    arn.split(':').nth(3).filter(|r| !r.is_empty())
}

/// An AWS SDK error (SNS, SQS: every SDK shares these types) in one line: AWS's code and message
/// (and request id), or what went wrong on the way; never the raw response.
pub fn aws_error<E, R>(e: &aws_sdk_sns::error::SdkError<E, R>) -> String
where
    E: aws_sdk_sns::error::ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    use aws_sdk_sns::error::ProvideErrorMetadata;
    match e.code() {
        Some(code) => {
            let mut s = format!("{code}: {}", e.message().unwrap_or("no message"));
            if let Some(id) = e.meta().extra("aws_request_id") {
                s.push_str(&format!(" (request id {id})"));
            }
            s
        }
        None => crate::error::causes(e),
    }
}

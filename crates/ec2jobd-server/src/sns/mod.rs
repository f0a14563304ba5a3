//! SNS in and out: verified HTTP deliveries from SNS topics (CloudWatch alarms, EventBridge events)
//! that rules turn into jobs, and notifications of job outcomes published to topics.

pub mod notify;
pub mod rules;
pub mod verify;

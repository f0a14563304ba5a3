//! SNS in and out: verified HTTP deliveries from SNS topics (CloudWatch alarms, EventBridge events)
//! that rules turn into jobs.

pub mod rules;
pub mod verify;

//! The ec2jobd daemon: HTTP API (axum), authentication, config and the command line. This crate
//! wires the others together: `spec` for the vocabulary, `store` for the durable queue, `ec2` for
//! AWS, `exec` for the runner and executor that work the queue. It holds no SQL and no AWS calls of
//! its own.

pub mod app;
pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod db_backup;
pub mod deadline;
pub mod doctor;
pub mod error;
pub mod https;
pub mod iam;
pub mod leader;
pub mod listener;
pub mod metrics;
pub mod openapi;
pub mod paging;
pub mod report;
pub mod retention;
pub mod routes;
pub mod schedules;
pub mod service;
pub mod sns;
pub mod state;
pub mod telemetry;
pub mod ui;

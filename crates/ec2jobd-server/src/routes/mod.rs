//! HTTP routes, one module per feature; each exposes `router()`.

pub mod audit;
pub mod catalog;
pub mod jobs;
pub mod ops;
pub mod schedules;
pub mod sns;
pub mod templates;
pub mod tokens;

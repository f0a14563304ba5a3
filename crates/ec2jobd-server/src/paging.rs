//! Paging by id for the logs the API lists newest first (SNS deliveries, the audit log): the
//! `limit` and `before` query parameters, checked once.
//! Must not: know what is listed.

use axum::extract::rejection::QueryRejection;
use axum::extract::Query;
use serde::Deserialize;

use crate::error::ApiError;

/// `?limit=&before=` of a log listed newest first.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ById {
    /// Most rows (1-500, default 100).
    pub limit: Option<u32>,
    /// Only rows with a smaller id (the next page).
    pub before: Option<i64>,
}

impl ById {
    /// `(before, limit)` from the query, or a 400 naming what is wrong.
    pub fn read(
        query: Result<Query<ById>, QueryRejection>,
    ) -> Result<(Option<i64>, u32), ApiError> {
        let Query(q) =
            query.map_err(|e| ApiError::bad_request("invalid_query", "query", e.body_text()))?;
        let limit = q.limit.unwrap_or(100);
        if !(1..=500).contains(&limit) {
            return Err(ApiError::bad_request(
                "invalid_limit",
                "limit",
                "must be 1 to 500",
            ));
        }
        Ok((q.before, limit))
    }
}

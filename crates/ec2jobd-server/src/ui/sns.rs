//! The dashboard's SNS deliveries: what became of each delivery (accepted, duplicate, no rule,
//! rejected, confirmed), why, the rule that matched and the job it queued, newest first and paged
//! like `GET /v1/sns/deliveries`.

use axum::extract::{Query, State};
use axum::response::Response;
use axum::Extension;
use maud::html;

use super::page::Csrf;
use super::page::{layout, maybe_time, shown, time};
use crate::service::{hooks, Caller};
use crate::state::AppState;

const PAGE: u32 = 100;

/// `GET /ui/sns`: `?before=` an id for older rows.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<Csrf>,
    Query(p): Query<Vec<(String, String)>>,
) -> Response {
    let before = p
        .iter()
        .find(|(k, _)| k == "before")
        .and_then(|(_, v)| v.parse::<i64>().ok());
    let rows = match hooks::deliveries(&state, &caller, before, PAGE).await {
        Ok(r) => r,
        Err(e) => return shown(e),
    };
    let older = (rows.len() == PAGE as usize)
        .then(|| rows.last().map(|d| d.id))
        .flatten();
    let body = html! {
        @if rows.is_empty() {
            p.empty { "No SNS deliveries recorded. Subscribe a topic to " code { "POST /v1/sns/{hook}" } " (see the README)." }
        } @else {
            table #deliveries {
                thead { tr { th { "At" } th { "Hook" } th { "Type" } th { "Outcome" } th { "Reason" }
                    th { "Rule" } th { "Job" } th { "Count" } th { "Message" } } }
                tbody { @for d in &rows { tr data-outcome=(d.outcome) {
                    td { (time(&d.at)) }
                    td { (d.hook) }
                    td { (d.kind.as_deref().unwrap_or("")) }
                    td { span class={ "outcome " (d.outcome) } { (d.outcome) } }
                    td { @if let Some(c) = &d.code { code { (c) } " " } (d.reason.as_deref().unwrap_or("")) }
                    td { (d.rule.as_deref().unwrap_or("")) }
                    td { @if let Some(j) = &d.job_id { a href={ "/ui/jobs/" (j) } { code { (j) } } } }
                    td { (d.count) @if d.count > 1 { " (last " (maybe_time(d.last_at.as_ref())) ")" } }
                    td { code { (d.message_id.as_deref().unwrap_or("")) } }
                } } }
            }
            @if let Some(id) = older { p { a.next href={ "/ui/sns?before=" (id) } { "Older deliveries →" } } }
        }
    };
    layout("SNS deliveries", &caller, &csrf, body)
}

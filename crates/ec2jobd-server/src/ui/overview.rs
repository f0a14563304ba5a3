//! The dashboard's overview: jobs by state (at most a few seconds old,
//! [`StateCounts`](crate::state::StateCounts)), jobs finished per hour over the last 24 h (an SVG
//! drawn here, no chart script), what running jobs are waiting for, EC2 calls, throttles and
//! retries (the counters /metrics shows) and the latest failures. Its body re-reads itself every
//! few seconds.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Extension;
use ec2jobd_spec::JobState;
use ec2jobd_store::HourCount;
use maud::{html, Markup};

use super::jobs::job_table;
use super::page::Csrf;
use super::page::{self, html as answer, layout, shown};
use crate::service::{jobs, Caller, ServiceError};
use crate::state::AppState;

const HOUR_MS: i64 = 3_600_000;

/// `GET /ui/`.
pub async fn overview(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<Csrf>,
) -> Response {
    match body(&state, &caller).await {
        Ok(body) => layout(
            "Overview",
            &caller,
            &csrf,
            html! {
                div #overview hx-get="/ui/overview" hx-trigger="every 5s" hx-swap="innerHTML" { (body) }
            },
        ),
        Err(e) => shown(e),
    }
}

/// `GET /ui/overview`: the overview's live part.
pub async fn fragment(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Response {
    match body(&state, &caller).await {
        Ok(body) => answer(StatusCode::OK, body),
        Err(e) => shown(e),
    }
}

async fn body(state: &AppState, caller: &Caller) -> Result<Markup, ServiceError> {
    let now = state.clock.now_ms();
    let first_hour = (now / HOUR_MS - 23) * HOUR_MS;
    let jobs::Overview {
        counts,
        hours,
        running,
        failed,
    } = jobs::overview(state, caller, first_hour, 10).await?;
    let ec2 = state.metrics.ec2_totals();
    let count = |s: JobState| counts.iter().find(|(c, _)| *c == s).map_or(0, |(_, n)| *n);
    Ok(html! {
        section.cards #counts {
            @for s in [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
                a.card href={ "/ui/jobs?state=" (s.as_str()) } data-state=(s.as_str()) {
                    span.n { (count(s)) }
                    (page::state(s))
                }
            }
        }
        h2 { "Finished per hour, last 24 h" }
        (chart(&hours, first_hour))
        section.cards #ec2 {
            div.card { span.n { (ec2.parked) } span { "jobs waiting on EC2 (parked here)" } }
            div.card { span.n { (ec2.calls) } span { "EC2 calls" } }
            div.card { span.n { (ec2.throttled) } span { "throttled attempts" } }
            div.card { span.n { (ec2.retries) } span { "retries" } }
        }
        h2 { "Running now, and what for" }
        @if running.is_empty() {
            p.empty { "Nothing is running." }
        } @else {
            (job_table(&running, false))
        }
        h2 { "Latest failures" }
        @if failed.is_empty() {
            p.empty { "No failed jobs." }
        } @else {
            (job_table(&failed, true))
        }
    })
}

/// 24 stacked bars (succeeded below, failed above), scaled to the busiest hour, each with its
/// numbers as a tooltip; drawn with classes only (the CSP allows no inline style).
fn chart(hours: &[HourCount], first_hour: i64) -> Markup {
    let mut bars = [(0i64, 0i64); 24];
    for h in hours {
        let i = (h.hour_ms - first_hour) / HOUR_MS;
        if let Some(b) = usize::try_from(i).ok().and_then(|i| bars.get_mut(i)) {
            match h.state {
                JobState::Succeeded => b.0 += h.count,
                JobState::Failed => b.1 += h.count,
                _ => {}
            }
        }
    }
    let top = bars.iter().map(|(s, f)| s + f).max().unwrap_or(0).max(1);
    let (w, h, gap) = (24.0_f64, 100.0_f64, 4.0_f64);
    let scale = |n: i64| n as f64 / top as f64 * h;
    let label = |i: usize| {
        chrono::DateTime::from_timestamp_millis(first_hour + i as i64 * HOUR_MS)
            .map(|t| t.format("%H:00").to_string())
            .unwrap_or_default()
    };
    html! {
        figure.chart {
            svg #hourly viewBox={ "0 0 " ((w + gap) * 24.0) " " (h + 16.0) } role="img"
                aria-label="Jobs finished per hour over the last 24 hours" {
                @for (i, (ok, bad)) in bars.iter().enumerate() {
                    @let x = i as f64 * (w + gap);
                    @let (hs, hf) = (scale(*ok), scale(*bad));
                    g data-hour=(label(i)) data-succeeded=(ok) data-failed=(bad) {
                        title { (label(i)) " UTC: " (ok) " succeeded, " (bad) " failed" }
                        // Closed explicitly: in HTML, an SVG element without `/>` or an end
                        // tag holds what follows (and a rect draws no children).
                        rect.succeeded x=(x) y=(h - hs) width=(w) height=(hs) {}
                        rect.failed x=(x) y=(h - hs - hf) width=(w) height=(hf) {}
                        @if i % 3 == 0 { text x=(x) y=(h + 12.0) { (label(i)) } }
                    }
                }
            }
            figcaption { span.key.succeeded { "succeeded" } " " span.key.failed { "failed" } " (UTC hours; busiest " (top) ")" }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chart_stacks_failed_on_succeeded_scaled_to_the_busiest_hour() {
        let first = 1_800_000_000_000 / HOUR_MS * HOUR_MS;
        let at = |i: i64, state, count| HourCount {
            hour_ms: first + i * HOUR_MS,
            state,
            count,
        };
        let svg = chart(
            &[
                at(0, JobState::Succeeded, 3),
                at(0, JobState::Failed, 1),
                at(23, JobState::Failed, 2),
                at(24, JobState::Failed, 9), // the hour after the window: left out
                at(5, JobState::Cancelled, 7), // not drawn
            ],
            first,
        )
        .into_string();
        assert!(
            svg.contains(r#"data-succeeded="3" data-failed="1""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"data-succeeded="0" data-failed="2""#),
            "{svg}"
        );
        // Hour 0 is the busiest (4): full height, succeeded 75 of it.
        assert!(
            svg.contains(r#"class="succeeded" x="0" y="25" width="24" height="75"></rect>"#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"class="failed" x="0" y="0" width="24" height="25"></rect>"#),
            "{svg}"
        );
        assert_eq!(svg.matches("<text").count(), 8, "a label every 3 hours");
        assert!(svg.contains("busiest 4"), "{svg}");
    }
}

//! The dashboard's job pages: the job list, one job (its live part re-rendered when
//! its event stream says something happened), and Cancel / Run again. Every read and action is
//! a `service::jobs` call with the signed-in caller, as the API's are.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use ec2jobd_spec::{Action, Job, JobState};
use ec2jobd_store::ListQuery;
use futures::Stream;
use maud::{html, Markup};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use super::page::Csrf;
use super::page::{self, html as answer, layout, maybe_time, shown, time};
use crate::service::policy::{self, Op};
use crate::service::{jobs, Caller, ServiceError};
use crate::state::AppState;

type Params = Query<Vec<(String, String)>>;

fn param<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter()
        .find(|(n, v)| n == k && !v.is_empty())
        .map(|(_, v)| v.as_str())
}

/// Jobs as a table (the list, the overview's failures and running jobs).
pub(super) fn job_table(jobs: &[Job], with_error: bool) -> Markup {
    html! {
        table.jobs {
            thead { tr {
                th { "Job" } th { "Action" } th { "State" } th { "Created" } th { "By" } th { "Progress" }
                @if with_error { th { "Error" } }
            } }
            tbody {
                @for j in jobs {
                    tr data-job=(j.id) {
                        td { a href={ "/ui/jobs/" (j.id) } { code { (j.id) } } }
                        td { (j.action.as_str()) }
                        td { (page::state(j.state)) }
                        td { (time(&j.created_at)) }
                        td { (j.created_by.as_deref().unwrap_or("–")) }
                        td { (j.progress.message) }
                        @if with_error {
                            td { @if let Some(e) = &j.error { code { (e.code) } " " (e.message) } }
                        }
                    }
                }
            }
        }
    }
}

/// The list query from the page's filters, or a 400 page naming the bad one.
fn list_query(p: &[(String, String)], now_ms: i64) -> Result<ListQuery, ServiceError> {
    let mut q = jobs::newest();
    for key in ["state", "action", "created_by", "cursor"] {
        if let Some(v) = param(p, key) {
            jobs::filter(&mut q, key, v)?;
        }
    }
    if let Some(t) = param(p, "q") {
        q.text = Some(t.trim().chars().take(128).collect());
    }
    if let Some(c) = param(p, "cursor") {
        ulid::Ulid::from_string(c)
            .map_err(|_| ServiceError::bad_request("invalid_cursor", "cursor", "not a cursor"))?;
        q.before_id = Some(c.to_string());
    }
    for (k, within) in [("since", 1), ("until", 0)] {
        if let Some(h) = param(p, k) {
            let hours: i64 = h
                .parse()
                .ok()
                .filter(|h| (1..=24 * 366).contains(h))
                .ok_or_else(|| {
                    ServiceError::bad_request("invalid_window", k, "hours ago, 1 to 8784")
                })?;
            let at = now_ms - hours * 3_600_000;
            if within == 1 {
                q.since_ms = Some(at);
            } else {
                q.until_ms = Some(at);
            }
        }
    }
    Ok(q)
}

/// `GET /ui/jobs`: filters (state, action, text in the id or target, created by, hours ago), newest first,
/// paged by cursor; the first page re-reads itself every few seconds so new jobs appear.
pub async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<Csrf>,
    Query(p): Params,
) -> Response {
    let q = match list_query(&p, state.clock.now_ms()) {
        Ok(q) => q,
        Err(e) => return shown(e),
    };
    let first = q.before_id.is_none();
    let page = match jobs::list(&state, &caller, q).await {
        Ok(p) => p,
        Err(e) => return shown(e),
    };
    let keep: Vec<(String, String)> = p.iter().filter(|(k, _)| k != "cursor").cloned().collect();
    let next = page.next_cursor.as_ref().map(|c| {
        let mut q = keep.clone();
        q.push(("cursor".into(), c.clone()));
        format!(
            "/ui/jobs?{}",
            serde_urlencoded::to_string(&q).unwrap_or_default()
        )
    });
    let here = format!(
        "/ui/jobs?{}",
        serde_urlencoded::to_string(&p).unwrap_or_default()
    );
    let v = |k: &str| param(&p, k).unwrap_or("").to_string();
    let body = html! {
        form.filters method="get" action="/ui/jobs" {
            label { "State " select name="state" {
                option value="" { "any" }
                @for s in [JobState::Queued, JobState::Running, JobState::Succeeded, JobState::Failed, JobState::Cancelled] {
                    option value=(s.as_str()) selected[v("state") == s.as_str()] { (s.as_str()) }
                }
            } }
            label { "Action " select name="action" {
                option value="" { "any" }
                @for a in Action::ALL {
                    option value=(a.as_str()) selected[v("action") == a.as_str()] { (a.as_str()) }
                }
            } }
            label { "Search " input #search type="search" name="q" value=(v("q")) size="20" placeholder="job, instance, volume, tag"; }
            label { "Created by " input name="created_by" value=(v("created_by")) size="12"; }
            label { "Within the last " input name="since" value=(v("since")) size="4" inputmode="numeric"; " h" }
            button type="submit" { "Filter" }
        }
        @if param(&p, "q").is_some() {
            p.hint { "Text search looks through the newest " (ec2jobd_store::SEARCH_SCAN) " jobs (a job id finds any job)." }
        }
        @if first {
            div #job-rows hx-get=(here) hx-select="#job-rows" hx-swap="outerHTML" hx-trigger="every 3s" {
                (job_table(&page.jobs, false))
            }
        } @else {
            div #job-rows { (job_table(&page.jobs, false)) }
        }
        @if let Some(n) = next { p { a.next href=(n) { "Older jobs →" } } }
    };
    layout("Jobs", &caller, &csrf, body)
}

/// `GET /ui/jobs/{id}`.
pub async fn show(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<Csrf>,
    Path(id): Path<String>,
) -> Response {
    let job = match jobs::get(&state, &caller, &id).await {
        Ok(j) => j,
        Err(e) => return shown(e),
    };
    let live = match live_part(&state, &job, &caller, &csrf).await {
        Ok(m) => m,
        Err(e) => return shown(e),
    };
    let spec = serde_json::to_string_pretty(&job.spec).unwrap_or_default();
    let body = html! {
        div #live data-stream={ "/ui/jobs/" (job.id) "/stream" }
            hx-get={ "/ui/jobs/" (job.id) "/live" } hx-trigger="refresh" hx-swap="innerHTML" {
            (live)
        }
        details { summary { "Spec" } pre.spec { (spec) } }
    };
    layout(&format!("Job {}", job.id), &caller, &csrf, body)
}

/// `GET /ui/jobs/{id}/live`: the part of the job page that changes while it runs.
pub async fn live(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Extension(csrf): Extension<Csrf>,
    Path(id): Path<String>,
) -> Response {
    match jobs::get(&state, &caller, &id).await {
        Ok(job) => match live_part(&state, &job, &caller, &csrf).await {
            Ok(m) => answer(StatusCode::OK, m),
            Err(e) => shown(e),
        },
        Err(e) => shown(e),
    }
}

/// What changes while a job runs: its actions (Cancel only while it can be cancelled), facts,
/// per-instance table, steps, backups, events and text report.
async fn live_part(
    state: &AppState,
    job: &Job,
    caller: &Caller,
    csrf: &Csrf,
) -> Result<Markup, ServiceError> {
    let events = jobs::events(state, caller, &job.id, 0, 500).await?;
    let operator = policy::role(caller, Op::Cancel).is_ok();
    let report = crate::report::render(job);
    let p = &job.progress;
    let r = &job.results;
    Ok(html! {
        div.actions {
            @if operator && !job.state.is_terminal() {
                form method="post" action={ "/ui/jobs/" (job.id) "/cancel" } {
                    input type="hidden" name="csrf" value=(csrf.0);
                    button #cancel.danger type="submit" { "Cancel" }
                }
            }
            @if operator {
                form method="post" action={ "/ui/jobs/" (job.id) "/rerun" } {
                    input type="hidden" name="csrf" value=(csrf.0);
                    button #rerun type="submit" { "Run again" }
                }
            }
            a href={ "/v1/jobs/" (job.id) "/report" } { "Text report (API)" }
        }
        dl.facts data-final[job.state.is_terminal()] {
            dt { "State" } dd #state { (page::state(job.state)) @if job.cancel_requested && !job.state.is_terminal() { " (cancel requested)" } }
            dt { "Action" } dd { (job.action.as_str()) }
            dt { "Progress" } dd #progress { (p.phase) ": " (p.message)
                @if let (Some(d), Some(t)) = (p.done, p.total) { " (" (d) "/" (t) ")" } }
            dt { "Attempts" } dd { (job.attempts) " of " (job.max_attempts) }
            dt { "Created" } dd { (time(&job.created_at)) " by " (job.created_by.as_deref().unwrap_or("–")) }
            dt { "Started" } dd { (maybe_time(job.started_at.as_ref())) }
            dt { "Finished" } dd { (maybe_time(job.finished_at.as_ref())) }
            @if let Some(e) = &job.error {
                dt { "Error" } dd.error { code { (e.code) } " " (e.message) }
            }
            @if let Some(s) = &r.summary { dt { "Summary" } dd { (s) } }
        }
        @if !r.instances.is_empty() {
            h2 { "Instances" }
            table #instances {
                thead { tr { th { "Instance" } th { "Name" } th { "State" } th { "Was" } th { "Checks" }
                    th { "Private IP" } th { "Public IP" } th { "Outcome" } th { "s to running" } th { "s to status ok" } } }
                tbody { @for i in &r.instances { tr {
                    td { code { (i.instance_id) } }
                    td { (i.name.as_deref().unwrap_or("")) }
                    td { (i.state) }
                    td { (i.previous_state.as_deref().unwrap_or("")) }
                    td.checks { (i.checks.as_deref().unwrap_or("")) }
                    td { (i.private_ip.as_deref().unwrap_or("")) }
                    td { (i.public_ip.as_deref().unwrap_or("")) }
                    td { (i.outcome.as_deref().unwrap_or("")) }
                    td { @if let Some(s) = i.seconds_to_running { (format!("{s:.1}")) } }
                    td { @if let Some(s) = i.seconds_to_status_ok { (format!("{s:.1}")) } }
                } } }
            }
        }
        @if !r.steps.is_empty() {
            h2 { "Steps" }
            table { thead { tr { th { "Step" } th { "Action" } th { "State" } th { "Summary / error" } } }
                tbody { @for s in &r.steps { tr {
                    td { (s.name) } td { (s.action) } td { (s.state) }
                    td { @if let Some(e) = &s.error { code { (e.code) } " " (e.message) } @else { (s.results.summary.as_deref().unwrap_or("")) } }
                } } } }
        }
        @if !r.snapshots.is_empty() || !r.images.is_empty() {
            h2 { "Backups" }
            ul.backups {
                @for s in &r.snapshots { li { code { (s.snapshot_id) } " " (s.state) @if let Some(v) = &s.volume_id { " of " (v) } } }
                @for i in &r.images { li { code { (i.image_id) } " " (i.state) @if let Some(o) = &i.outcome { " — " (o) } } }
            }
        }
        h2 { "Events" }
        ol.events #events {
            @for e in &events {
                li data-kind=(e.kind) { time { (time(&e.at)) } " " b { (e.kind) } " " (e.message) }
            }
        }
        details open { summary { "Report" } pre.report #report { (report) } }
    })
}

/// `GET /ui/jobs/{id}/stream`: one unnamed event whenever the job changes (on any replica), so
/// the page re-fetches its live part; ends once the job is final. Bounded like the API's streams.
pub async fn stream(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Response> {
    let slot = jobs::stream_slot(&state, &caller).map_err(shown)?;
    let mut rx = jobs::watch(&state);
    let job = jobs::get(&state, &caller, &id).await.map_err(shown)?;
    let (tx, out) = tokio::sync::mpsc::channel::<Event>(4);
    let (st, shutdown) = (state.clone(), state.shutdown.clone());
    let mut done = job.state.is_terminal();
    tokio::spawn(async move {
        let _slot = slot;
        loop {
            if done {
                let _ = tx.send(Event::default().data("final")).await;
                return;
            }
            let tick = tokio::time::sleep(Duration::from_secs(5));
            tokio::pin!(tick);
            tokio::select! {
                r = rx.recv() => match r {
                    Ok(changed) if changed != id => continue,
                    Ok(_) | Err(RecvError::Lagged(_)) => {}
                    Err(RecvError::Closed) => return,
                },
                _ = &mut tick => {}
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
            }
            match jobs::get(&st, &caller, &id).await {
                Ok(j) => done = j.state.is_terminal(),
                Err(_) => return,
            }
            if !done && tx.send(Event::default().data("changed")).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(ReceiverStream::new(out).map(Ok))
        .keep_alive(KeepAlive::new().interval(state.config.http.sse_keepalive.0)))
}

/// `POST /ui/jobs/{id}/cancel` (operators): as `POST /v1/jobs/{id}/cancel`, then back to the job.
pub async fn cancel(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match jobs::cancel(&state, &caller, &id).await {
        Ok(_) => Redirect::to(&format!("/ui/jobs/{id}")).into_response(),
        Err(e) => shown(e),
    }
}

/// `POST /ui/jobs/{id}/rerun` (operators): a new job with the same spec, checked and admitted as
/// a submission is; then its page.
pub async fn rerun(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    match jobs::rerun(&state, &caller, &id).await {
        Ok(admitted) => queued(&state, admitted).await,
        Err(e) => shown(e),
    }
}

/// Queues an admitted job and goes to its page, or shows why not.
pub(super) async fn queued(state: &AppState, admitted: jobs::Admitted) -> Response {
    match admitted.queue(state).await {
        Ok((_, job)) => Redirect::to(&format!("/ui/jobs/{}", job.id)).into_response(),
        Err(e) => shown(e),
    }
}

//! The schedule ticker: in the replica leading maintenance (the only daemon with SQLite), fires
//! every schedule's firings as jobs. Each firing is queued with the idempotency key
//! `schedule:<name>:<time>` and `created_by = schedule:<name>`, so a restart, a new leader or a
//! tick run twice never queues the same firing twice: the store answers the second with the first.
//!
//! Cost at rest is a heap: each schedule's next firing is computed once and the ticker sleeps
//! until the earliest; the schedules are read again only when their change stamp moves (a cheap
//! query every [`STAMP_EVERY`]) or this replica changed one. The clock is injected: tests call
//! [`Ticker::tick`] with the times they choose. Must not: decide when a schedule fires (that is
//! `ec2jobd_spec::schedule`), check schedules, or queue a job itself: a firing's job is
//! `service::schedules::fire`, a window's is `service::schedules::reconcile`.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use ec2jobd_spec::schedule::CatchUp;
use ec2jobd_spec::Clock;
use ec2jobd_store::Named;
use tokio_util::sync::CancellationToken;

use super::windows::Reconcile;
use super::{Fires, Plan, Schedule, ON_TIME};
use crate::leader::Leading;
use crate::service::schedules::{self as service, Fired};
use crate::state::AppState;

/// How often the leader asks whether any schedule changed (on another replica).
pub const STAMP_EVERY: Duration = Duration::from_secs(5);

/// How far back `catch_up: "latest"` looks when retention keeps jobs forever.
const LOOKBACK_MAX: chrono::Duration = chrono::Duration::days(400);

struct Entry {
    schedule: Schedule,
    plan: Plan,
    /// Every firing up to here was dealt with.
    seen: DateTime<Utc>,
    /// The next firing after `seen` (its heap entry).
    next: Option<DateTime<Utc>>,
    /// An enforced window's next check (its heap entry).
    check_at: Option<DateTime<Utc>>,
    /// The job of the last firing this ticker queued (overlap).
    last_job: Option<String>,
}

impl Entry {
    /// The window reconciliation of this schedule at `at` (a firing's, or a check's).
    fn reconcile(&self, name: &str, at: DateTime<Utc>, fires: Option<Fires>) -> Reconcile {
        Reconcile {
            name: name.to_string(),
            schedule: self.schedule.clone(),
            plan: self.plan.clone(),
            at,
            fires,
        }
    }
}

/// What a heap entry is due for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Due {
    Firing,
    Check,
}

/// Fires schedules; see the module docs.
pub struct Ticker {
    state: AppState,
    entries: HashMap<String, Entry>,
    heap: BinaryHeap<Reverse<(DateTime<Utc>, String, Due)>>,
    stamp: Option<(i64, i64, i64)>,
    reconciles: Vec<Reconcile>,
}

impl Ticker {
    /// A ticker with nothing loaded yet.
    pub fn new(state: AppState) -> Self {
        Self {
            state,
            entries: HashMap::new(),
            heap: BinaryHeap::new(),
            stamp: None,
            reconciles: Vec::new(),
        }
    }

    /// Reads the schedules again when they changed (or `force`); an unchanged schedule keeps
    /// where it was, a new or changed one starts from what [`Ticker::start_seen`] says.
    pub async fn reload(&mut self, now: DateTime<Utc>, force: bool) -> anyhow::Result<()> {
        let stamp = self.state.store.named_stamp(Named::Schedule).await?;
        if !force && self.stamp == Some(stamp) {
            return Ok(());
        }
        if force {
            // Something changed here (an override, perhaps): enforced windows look at once.
            for (name, e) in &mut self.entries {
                if e.check_at.is_some() {
                    e.check_at = Some(now);
                    self.heap.push(Reverse((now, name.clone(), Due::Check)));
                }
            }
        }
        let mut keep = HashMap::new();
        for (name, _source, schedule) in service::all(&self.state).await? {
            if let Some(e) = self.entries.remove(&name) {
                if e.schedule == schedule {
                    keep.insert(name, e);
                    continue;
                }
            }
            let plan = match schedule.plan(&self.state.config.calendars) {
                Ok(p) => p,
                Err((field, msg)) => {
                    tracing::warn!(schedule = %name, field, msg, "schedule does not plan; not fired");
                    continue;
                }
            };
            let seen = self.start_seen(&name, &schedule, now).await?;
            let next = if schedule.enabled {
                plan.next(seen)
            } else {
                None
            };
            if let Some(at) = next {
                self.heap.push(Reverse((at, name.clone(), Due::Firing)));
            }
            // An enforced window is checked at once, then every interval.
            let check_at = (schedule.enabled && plan.enforce_every.is_some()).then_some(now);
            if let Some(at) = check_at {
                self.heap.push(Reverse((at, name.clone(), Due::Check)));
            }
            keep.insert(
                name,
                Entry {
                    schedule,
                    plan,
                    seen,
                    next,
                    check_at,
                    last_job: None,
                },
            );
        }
        self.entries = keep;
        self.stamp = Some(stamp);
        self.state.metrics.set_schedules(self.entries.len());
        Ok(())
    }

    /// Where a schedule new to this ticker starts: firings up to the returned time count as dealt
    /// with. Without catch-up, everything older than [`ON_TIME`] (so a restart at the firing
    /// instant still fires it, once, by its key). With `latest`, everything up to its newest
    /// job or its saving (a firing before a schedule existed is never caught up), but no further
    /// back than jobs are kept (an older firing's job and key may be pruned).
    async fn start_seen(
        &self,
        name: &str,
        schedule: &Schedule,
        now: DateTime<Utc>,
    ) -> anyhow::Result<DateTime<Utc>> {
        let on_time = now - ON_TIME;
        let saved = schedule.saved_at;
        if schedule.catch_up == CatchUp::None {
            return Ok(saved.map_or(on_time, |s| s.max(on_time)));
        }
        let kept = self.state.config.retention.jobs.0;
        let lookback = if kept.is_zero() {
            LOOKBACK_MAX
        } else {
            chrono::Duration::from_std(kept)
                .unwrap_or(LOOKBACK_MAX)
                .min(LOOKBACK_MAX)
        };
        let newest = service::last_job(&self.state, name)
            .await?
            .map(|j| j.created_at);
        Ok(match newest.max(saved) {
            Some(t) => t.max(now - lookback),
            // Never fired and not saved over the API (config): nothing to catch up.
            None => on_time,
        })
    }

    /// When the next firing is due (`None`: no schedule fires).
    pub fn next_due(&self) -> Option<DateTime<Utc>> {
        self.heap.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Fires every schedule whose next firing is at or before `now`; returns what each came to.
    /// A window's firings and enforcement checks are collected for [`Ticker::take_reconciles`].
    pub async fn tick(&mut self, now: DateTime<Utc>) -> Vec<(String, DateTime<Utc>, Fired)> {
        let mut out = Vec::new();
        while let Some(Reverse((at, name, due))) = self.heap.peek().cloned() {
            if at > now {
                break;
            }
            self.heap.pop();
            let Some(entry) = self.entries.get_mut(&name) else {
                continue;
            };
            if due == Due::Check {
                if entry.check_at != Some(at) {
                    continue; // replaced since
                }
                self.reconciles.push(entry.reconcile(&name, now, None));
                let every = entry.plan.enforce_every.unwrap_or(super::ENFORCE_EVERY);
                let next = now + chrono::Duration::from_std(every).unwrap_or(chrono::Duration::MAX);
                entry.check_at = Some(next);
                self.heap.push(Reverse((next, name, Due::Check)));
                continue;
            }
            if entry.next != Some(at) {
                continue; // replaced since
            }
            let due = entry.plan.due(entry.seen, now, entry.schedule.catch_up);
            if let Some((firing, fires)) = due {
                if fires != Fires::Job {
                    self.reconciles
                        .push(entry.reconcile(&name, firing, Some(fires)));
                    out.push((name.clone(), firing, Fired::Window));
                } else {
                    match self.fire(&name, firing).await {
                        Ok(f) => out.push((name.clone(), firing, f)),
                        Err(e) => {
                            // The store is away: `seen` stays, so this firing is tried again in
                            // a second (by its key, once).
                            tracing::warn!(schedule = %name, error = %e, "firing not queued; retrying");
                            let retry = now + chrono::Duration::seconds(1);
                            if let Some(e) = self.entries.get_mut(&name) {
                                e.next = Some(retry);
                            }
                            self.heap.push(Reverse((retry, name, Due::Firing)));
                            continue;
                        }
                    }
                }
            }
            if let Some(e) = self.entries.get_mut(&name) {
                e.seen = now;
                e.next = e.plan.next(now);
                if let Some(n) = e.next {
                    self.heap.push(Reverse((n, name, Due::Firing)));
                }
            }
        }
        out
    }

    /// The window reconciliations the last ticks asked for (firings and enforcement checks).
    pub fn take_reconciles(&mut self) -> Vec<Reconcile> {
        std::mem::take(&mut self.reconciles)
    }

    /// Queues one firing's job (a cron schedule's; a window's firings reconcile) through the
    /// service, remembering it for the next firing's overlap.
    async fn fire(&mut self, name: &str, at: DateTime<Utc>) -> anyhow::Result<Fired> {
        let Some(entry) = self.entries.get(name) else {
            return Ok(Fired::Failed("schedule gone".into()));
        };
        let f = service::fire(
            &self.state,
            name,
            &entry.schedule,
            at,
            entry.last_job.as_deref(),
        )
        .await?;
        if let (Fired::Queued(id) | Fired::Already(id), Some(e)) = (&f, self.entries.get_mut(name))
        {
            e.last_job = Some(id.clone());
        }
        self.note(name, at, &f);
        Ok(f)
    }

    fn note(&self, name: &str, at: DateTime<Utc>, f: &Fired) {
        let outcome = match f {
            Fired::Queued(id) => {
                tracing::info!(schedule = %name, %at, job = %id, "schedule fired");
                "queued"
            }
            Fired::Already(id) => {
                tracing::info!(schedule = %name, %at, job = %id, "firing was already queued");
                "already"
            }
            Fired::Skipped(id) => {
                tracing::info!(schedule = %name, %at, running = %id, "firing skipped: the previous job has not finished (overlap = skip)");
                "skipped"
            }
            Fired::Failed(why) => {
                tracing::warn!(schedule = %name, %at, why, "firing failed: no job queued");
                "failed"
            }
            Fired::Window => "window",
        };
        self.state.metrics.schedule_fired(outcome);
    }

    /// Runs until `shutdown`: while this replica leads, reloads on change and fires on time.
    pub async fn run(
        mut self,
        clock: Arc<dyn Clock>,
        leading: Leading,
        shutdown: CancellationToken,
    ) {
        let changed = self.state.schedules_changed.clone();
        let mut force = true;
        let mut stamp_at = tokio::time::Instant::now();
        let busy: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Default::default();
        loop {
            if !leading.now() {
                self.entries.clear();
                self.heap.clear();
                force = true;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    _ = shutdown.cancelled() => return,
                }
            }
            let now = at_ms(clock.now_ms());
            if force || tokio::time::Instant::now() >= stamp_at {
                if let Err(e) = self.reload(now, force).await {
                    tracing::warn!(error = %e, "cannot read schedules; trying again");
                } else {
                    force = false;
                }
                stamp_at = tokio::time::Instant::now() + STAMP_EVERY;
            }
            self.tick(now).await;
            for r in self.take_reconciles() {
                // One reconciliation per schedule at a time; a check finding one still running
                // is dropped (the next comes an interval later).
                let busy_now = busy.clone();
                if !busy_now
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(r.name.clone())
                {
                    continue;
                }
                let (state, clock) = (self.state.clone(), clock.clone());
                tokio::spawn(async move {
                    let now = at_ms(clock.now_ms());
                    match service::reconcile(&state, &r, now).await {
                        Ok(done) => {
                            if done.started.is_some() || done.stopped.is_some() {
                                tracing::info!(schedule = %r.name, open = done.open, started = ?done.started, stopped = ?done.stopped, "window reconciled");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(schedule = %r.name, error = %e, "window not reconciled");
                            state.metrics.schedule_fired("failed");
                        }
                    }
                    busy_now
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&r.name);
                });
            }
            let until_stamp = stamp_at.saturating_duration_since(tokio::time::Instant::now());
            let until_due = self
                .next_due()
                .map(|at| (at - at_ms(clock.now_ms())).to_std().unwrap_or_default())
                .unwrap_or(STAMP_EVERY);
            let sleep = until_stamp.min(until_due);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = changed.notified() => force = true,
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

/// Milliseconds since the epoch as a time.
pub fn at_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    //! The ticker against a real SQLite store with an injected clock (no workers: the jobs stay
    //! queued, which is what "the previous firing's job still runs" needs).

    use super::*;
    use ec2jobd_spec::schedule::fired_by;
    use ec2jobd_spec::ManualClock;
    use ec2jobd_store::ListQuery;

    struct Fixture {
        state: AppState,
        clock: Arc<ManualClock>,
        _dir: tempfile::TempDir,
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    async fn fixture(start: &str, toml: &str) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("config.toml");
        let db = dir.path().join("q.db");
        std::fs::write(
            &file,
            format!(
                "database = \"sqlite://{}\"\n[accounts.default]\nregion = \"us-east-1\"\nendpoint_url = \"http://127.0.0.1:9\"\n{toml}",
                db.display()
            ),
        )
        .expect("config");
        let cfg = crate::config::Config::load(Some(&file), Vec::new(), &Default::default())
            .expect("config loads");
        let clock = Arc::new(ManualClock::new(utc(start).timestamp_millis()));
        let store = crate::app::open_store(&cfg, clock.clone())
            .await
            .expect("store");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let pool = Arc::new(ec2jobd_ec2::Ec2Pool::new(
            crate::app::account_configs(&cfg),
            cfg.pacing_config(),
            metrics.clone(),
        ));
        let state = crate::app::assemble(
            &cfg,
            store,
            clock.clone(),
            metrics,
            pool,
            CancellationToken::new(),
        );
        Fixture {
            state,
            clock,
            _dir: dir,
        }
    }

    impl Fixture {
        /// Moves the clock (the store stamps jobs with it) and returns the time.
        fn at(&self, t: &str) -> DateTime<Utc> {
            let t = utc(t);
            self.clock
                .advance(t.timestamp_millis() - self.clock.now_ms());
            t
        }

        async fn jobs(&self, schedule: &str) -> Vec<ec2jobd_spec::Job> {
            let mut jobs = self
                .state
                .store
                .list(ListQuery {
                    created_by: Some(fired_by(schedule)),
                    limit: 100,
                    ..Default::default()
                })
                .await
                .expect("list")
                .jobs;
            jobs.reverse();
            jobs
        }
    }

    fn queued(out: &[(String, DateTime<Utc>, Fired)]) -> Vec<(String, String)> {
        out.iter()
            .filter(|(_, _, f)| matches!(f, Fired::Queued(_)))
            .map(|(n, at, _)| (n.clone(), at.to_rfc3339()))
            .collect()
    }

    const HOURLY: &str = r#"
[schedules.hourly]
cron = "0 * * * *"
[schedules.hourly.job]
action = "describe_instances"
targets = { tags = { Env = "dev" } }
[schedules.caught]
cron = "0 * * * *"
catch_up = "latest"
[schedules.caught.job]
action = "describe_instances"
targets = { tags = { Env = "dev" } }
"#;

    #[tokio::test]
    async fn catch_up_after_two_hours_down_runs_only_the_latest_and_only_when_asked() {
        let f = fixture("2026-12-04T07:59:58Z", HOURLY).await;
        let mut t = Ticker::new(f.state.clone());
        let now = f.at("2026-12-04T07:59:58Z");
        t.reload(now, true).await.unwrap();
        assert_eq!(t.next_due(), Some(utc("2026-12-04T08:00:00Z")));
        assert!(t.tick(now).await.is_empty());
        let now = f.at("2026-12-04T08:00:00.200Z");
        let out = t.tick(now).await;
        assert_eq!(out.len(), 2, "{out:?}");
        drop(t); // down from 08:00 to 10:20: 09:00 and 10:00 missed
        for name in ["hourly", "caught"] {
            let id = &f.jobs(name).await[0].id; // the 08:00 jobs are over (no overlap)
            f.state.store.cancel(id, "test").await.unwrap();
        }

        let now = f.at("2026-12-04T10:20:00Z");
        let mut t = Ticker::new(f.state.clone());
        t.reload(now, true).await.unwrap();
        let out = t.tick(now).await;
        assert_eq!(
            queued(&out),
            [(
                "caught".to_string(),
                "2026-12-04T10:00:00+00:00".to_string()
            )]
        );
        assert!(t.tick(f.at("2026-12-04T10:20:01Z")).await.is_empty());
        assert_eq!(f.jobs("hourly").await.len(), 1, "none: nothing missed runs");
        let caught = f.jobs("caught").await;
        assert_eq!(caught.len(), 2, "latest: 10:00 once, 09:00 never");
        assert_eq!(caught[1].schedule.as_deref(), Some("caught"));
        assert_eq!(caught[1].created_by.as_deref(), Some("schedule:caught"));
        // Both are on time again at 11:00.
        assert_eq!(t.next_due(), Some(utc("2026-12-04T11:00:00Z")));
        assert_eq!(t.tick(f.at("2026-12-04T11:00:00Z")).await.len(), 2);
    }

    #[tokio::test]
    async fn a_restart_at_the_firing_instant_queues_the_firing_once() {
        let f = fixture("2026-12-04T08:00:00Z", HOURLY).await;
        let now = f.at("2026-12-04T08:00:00Z");
        let mut first = Ticker::new(f.state.clone());
        first.reload(now, true).await.unwrap();
        let before = first.tick(now).await;
        assert_eq!(queued(&before).len(), 2);
        // Killed right after queueing; the next start (or leader) runs the same firings again.
        let now = f.at("2026-12-04T08:00:03Z");
        let mut second = Ticker::new(f.state.clone());
        second.reload(now, true).await.unwrap();
        // Without catch-up the firing is still on time and queued again: its key answers with
        // the first job. With catch-up the new start sees the firing's job and starts after it.
        let again = second.tick(now).await;
        assert_eq!(again.len(), 1, "{again:?}");
        let (Some((_, at1, Fired::Queued(a))), (n2, at2, Fired::Already(b))) =
            (before.iter().find(|(n, _, _)| n == "hourly"), &again[0])
        else {
            panic!("{before:?} then {again:?}");
        };
        assert_eq!((n2.as_str(), at2, b), ("hourly", at1, a), "the same job");
        assert_eq!(f.jobs("hourly").await.len(), 1);
        assert_eq!(f.jobs("caught").await.len(), 1);
    }

    #[tokio::test]
    async fn overlap_skips_while_the_previous_job_has_not_finished() {
        let f = fixture(
            "2026-12-04T08:00:00Z",
            r#"
[schedules.skip]
cron = "* * * * *"
[schedules.skip.job]
action = "describe_instances"
targets = { tags = { Env = "dev" } }
[schedules.pile]
cron = "* * * * *"
overlap = "queue"
[schedules.pile.job]
action = "describe_instances"
targets = { tags = { Env = "dev" } }
"#,
        )
        .await;
        let mut t = Ticker::new(f.state.clone());
        t.reload(f.at("2026-12-04T08:00:00Z"), true).await.unwrap();
        t.tick(f.at("2026-12-04T08:00:00Z")).await;
        let first = f.jobs("skip").await[0].id.clone();
        let out = t.tick(f.at("2026-12-04T08:01:00Z")).await;
        let skip = out.iter().find(|(n, _, _)| n == "skip").unwrap();
        assert_eq!(skip.2, Fired::Skipped(first.clone()), "still queued");
        assert_eq!(f.jobs("skip").await.len(), 1);
        assert_eq!(f.jobs("pile").await.len(), 2, "overlap = queue");
        f.state.store.cancel(&first, "test").await.unwrap();
        t.tick(f.at("2026-12-04T08:02:00Z")).await;
        assert_eq!(f.jobs("skip").await.len(), 2, "finished: fires again");
    }

    #[tokio::test]
    async fn dst_days_and_holidays_fire_at_the_right_instants() {
        let f = fixture(
            "2027-03-27T12:00:00Z",
            r#"
[calendars.de]
dates = ["2027-03-29"]
[schedules.night]
cron = "30 2 * * *"
time_zone = "Europe/Berlin"
calendars = ["de"]
[schedules.night.job]
action = "describe_instances"
targets = { tags = { Env = "dev" } }
"#,
        )
        .await;
        let mut t = Ticker::new(f.state.clone());
        t.reload(f.at("2027-03-27T12:00:00Z"), true).await.unwrap();
        // 2027-03-28: 02:30 does not exist in Berlin; it fires once at 03:00 CEST.
        assert_eq!(t.next_due(), Some(utc("2027-03-28T01:00:00Z")));
        assert!(t.tick(f.at("2027-03-28T00:59:59Z")).await.is_empty());
        assert_eq!(queued(&t.tick(f.at("2027-03-28T01:00:00Z")).await).len(), 1);
        // The 29th is a holiday; the 30th fires at 02:30 CEST.
        assert_eq!(t.next_due(), Some(utc("2027-03-30T00:30:00Z")));
        assert_eq!(f.jobs("night").await.len(), 1);
    }
}

//! When a schedule fires (issue 17), with no I/O: a cron expression (5 fields, or 6 with seconds
//! first; `@daily`-style aliases) read in an IANA time zone, DST-correct as Vixie cron is — a
//! firing whose local time does not exist (spring forward) fires once at the first instant after
//! the gap, one whose local time happens twice (fall back) fires once, at the first — minus skip
//! dates (holidays, local dates) and outside `active_from`/`active_until`. Also which missed firing
//! runs after downtime (`catch_up`), whether an office-hours [`Window`] is open, and the idempotency
//! key that keeps a firing from running twice.
//!
//! Time is always passed in: this module never reads the clock, so the daemon's ticker and tests
//! (with an injected clock) ask the same questions.

use std::collections::BTreeSet;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;
use serde::{Deserialize, Serialize};

/// How far ahead [`Times::next`] looks before it gives up (a pattern such as `0 0 30 2 *` never
/// fires; one on Feb 29 fires within 8 years).
const HORIZON_DAYS: i64 = 366 * 9;

/// Most steps [`Times::next`] takes (each a firing found, or a skipped day passed): more than the
/// days of [`HORIZON_DAYS`], so only a search past the horizon is cut short.
const MAX_STEPS: usize = 4 * HORIZON_DAYS as usize;

/// Most firings [`Times::latest`] looks at before it answers with the latest it has seen.
pub const LATEST_BUDGET: usize = 100_000;

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct Recurrence {
    cron: Cron,
    tz: Tz,
}

impl Recurrence {
    /// Parses `expr` (5 or 6 fields, or an alias such as `@daily`) in the IANA zone `time_zone`.
    /// The error says what is wrong, for a 422.
    pub fn parse(expr: &str, time_zone: &str) -> Result<Self, String> {
        let fields = expr.split_whitespace().count();
        if !expr.trim_start().starts_with('@') && !(5..=6).contains(&fields) {
            return Err(format!(
                "`{expr}` has {fields} fields; a cron expression has 5 (minute hour day month weekday) or 6 (seconds first)"
            ));
        }
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(expr)
            .map_err(|e| format!("`{expr}` is not a cron expression: {e}"))?;
        let tz = Tz::from_str(time_zone)
            .map_err(|_| format!("`{time_zone}` is not an IANA time zone (e.g. Europe/Berlin)"))?;
        Ok(Self { cron, tz })
    }

    /// The time zone.
    pub fn time_zone(&self) -> Tz {
        self.tz
    }

    /// The first firing strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        let next = self.cron.find_next_occurrence(&local, false).ok()?;
        // A firing carried past a gap can land on `t` itself; strictly after means later.
        if next.with_timezone(&Utc) > t {
            Some(next.with_timezone(&Utc))
        } else {
            self.next_after(t + chrono::Duration::seconds(1))
        }
    }
}

/// What a missed firing does after downtime.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CatchUp {
    /// Missed firings are dropped; the next one runs on time.
    #[default]
    None,
    /// The most recent missed firing runs once.
    Latest,
}

/// A recurrence with the dates it skips and the span it is active in.
#[derive(Debug, Clone)]
pub struct Times {
    /// The expression and zone.
    pub recurrence: Recurrence,
    /// Local dates (in the zone) on which nothing fires: `skip_dates` and holiday calendars.
    pub skip: BTreeSet<NaiveDate>,
    /// Nothing fires before this.
    pub active_from: Option<DateTime<Utc>>,
    /// Nothing fires at or after this.
    pub active_until: Option<DateTime<Utc>>,
}

impl Times {
    /// Times that fire whenever `recurrence` does.
    pub fn new(recurrence: Recurrence) -> Self {
        Self {
            recurrence,
            skip: BTreeSet::new(),
            active_from: None,
            active_until: None,
        }
    }

    /// The last instant of the local day of `t` (just before the next local midnight), so the
    /// next firing after it is on a later day.
    fn end_of_day(&self, t: DateTime<Utc>) -> DateTime<Utc> {
        let tz = self.recurrence.tz;
        let day = t.with_timezone(&tz).date_naive();
        let midnight = day
            .succ_opt()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .and_then(|m| {
                // Where midnight does not exist (a DST change at 00:00), the day ends an hour on.
                tz.from_local_datetime(&m).earliest().or_else(|| {
                    tz.from_local_datetime(&(m + chrono::Duration::hours(1)))
                        .earliest()
                })
            })
            .map(|m| m.with_timezone(&Utc));
        match midnight {
            Some(m) if m > t => m - chrono::Duration::seconds(1),
            _ => t + chrono::Duration::days(1),
        }
    }

    /// The first firing strictly after `t`, or `None` when there is none (past `active_until`,
    /// or none within nine years). A skipped date costs one step whatever fires on it (the search
    /// goes on from the end of that day), so the work is bounded by the days searched, not by
    /// the firings skipped: at most [`MAX_STEPS`] steps, then `None`.
    pub fn next(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let horizon = t + chrono::Duration::days(HORIZON_DAYS);
        let mut at = match self.active_from {
            Some(f) if f > t => f - chrono::Duration::seconds(1),
            _ => t,
        };
        for _ in 0..MAX_STEPS {
            let next = self.recurrence.next_after(at)?;
            if next > horizon || self.active_until.is_some_and(|u| next >= u) {
                return None;
            }
            let day = next.with_timezone(&self.recurrence.tz).date_naive();
            if self.skip.contains(&day) {
                at = self.end_of_day(next).max(next);
                continue;
            }
            if self.active_from.is_none_or(|f| next >= f) {
                return Some(next);
            }
            at = next;
        }
        None
    }

    /// The next `n` firings after `t` (what `GET /v1/schedules/{name}` shows).
    pub fn upcoming(&self, t: DateTime<Utc>, n: usize) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(n);
        let mut at = t;
        while out.len() < n {
            match self.next(at) {
                Some(f) => {
                    out.push(f);
                    at = f;
                }
                None => break,
            }
        }
        out
    }

    /// The firing to run now, given that every firing up to `seen` was dealt with and the clock
    /// says `now`: one that came due within `grace` of now runs; an older one (the daemon was
    /// down) runs only with [`CatchUp::Latest`], and then only the most recent. At most one.
    pub fn due(
        &self,
        seen: DateTime<Utc>,
        now: DateTime<Utc>,
        grace: chrono::Duration,
        catch_up: CatchUp,
    ) -> Option<DateTime<Utc>> {
        let after = match catch_up {
            CatchUp::None => seen.max(now - grace - chrono::Duration::milliseconds(1)),
            CatchUp::Latest => seen,
        };
        self.latest(after, now)
    }

    /// The last firing in (`after`, `now`], looked for backwards in growing spans (each scanned
    /// forwards, so a fall-back day's firing is the same instant [`Times::next`] gives): the
    /// work is a few times the firings in the span that holds the answer, not in all of it.
    ///
    /// The work is bounded: after [`LATEST_BUDGET`] firings looked at, the latest one seen so far
    /// is the answer (`None` if none), so a schedule firing every second that skipped years of
    /// days costs a bounded pause, never a stalled daemon.
    pub fn latest(&self, after: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut span = chrono::Duration::minutes(1);
        let mut budget = LATEST_BUDGET;
        loop {
            let from = (now - span).max(after);
            let mut latest = None;
            let mut at = from;
            while let Some(f) = self.next(at).filter(|f| *f <= now) {
                latest = Some(f);
                at = f;
                budget = budget.saturating_sub(1);
                if budget == 0 {
                    return latest;
                }
            }
            if latest.is_some() || from == after {
                return latest;
            }
            span = span * 4;
        }
    }
}

/// Office hours: instances run from `start` to `stop` (local `HH:MM`) on `days` (cron weekdays:
/// `mon-fri`, `sat,sun`, `*`) in `time_zone`. A stop earlier than the start spans midnight.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Local time the window opens, `HH:MM`.
    pub start: String,
    /// Local time it closes, `HH:MM`.
    pub stop: String,
    /// Days it opens on (cron day-of-week field); every day when absent.
    #[serde(default = "every_day")]
    pub days: String,
    /// IANA time zone.
    pub time_zone: String,
}

fn every_day() -> String {
    "*".into()
}

fn hh_mm(field: &str, v: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{field}: `{v}` is not a time of day HH:MM");
    let (h, m) = v.split_once(':').ok_or_else(bad)?;
    let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 || v.len() != 5 {
        return Err(bad());
    }
    Ok((h, m))
}

impl Window {
    /// When it opens and when it closes, as recurrences. A stop on the next day (overnight) keeps
    /// the days of the start.
    pub fn recurrences(&self) -> Result<(Recurrence, Recurrence), String> {
        let (sh, sm) = hh_mm("window.start", &self.start)?;
        let (eh, em) = hh_mm("window.stop", &self.stop)?;
        if (sh, sm) == (eh, em) {
            return Err("window: start and stop are the same time".into());
        }
        if self.days.split_whitespace().count() != 1 {
            return Err(format!(
                "window.days: `{}` is not one cron weekday field",
                self.days
            ));
        }
        let start = Recurrence::parse(&format!("{sm} {sh} * * {}", self.days), &self.time_zone)?;
        let stop_days = if (eh, em) < (sh, sm) {
            shift_days(&self.days)?
        } else {
            self.days.clone()
        };
        let stop = Recurrence::parse(&format!("{em} {eh} * * {stop_days}"), &self.time_zone)?;
        Ok((start, stop))
    }

    /// Whether instances should be running at `t` ([`window_open`] over its recurrences).
    pub fn open_at(&self, t: DateTime<Utc>) -> Result<bool, String> {
        let (start, stop) = self.recurrences()?;
        Ok(window_open(&Times::new(start), &Times::new(stop), t))
    }
}

/// How far back a window's last opening or closing is looked for.
const WINDOW_LOOKBACK: chrono::Duration = chrono::Duration::days(400);

/// Whether a window that opens at `start` and closes at `stop` is open at `t`: its last opening
/// up to `t` is later than its last closing.
pub fn window_open(start: &Times, stop: &Times, t: DateTime<Utc>) -> bool {
    start.latest(t - WINDOW_LOOKBACK, t) > stop.latest(t - WINDOW_LOOKBACK, t)
}

/// A weekday field moved one day later (for a stop past midnight): `mon-fri` → `tue-sat`.
fn shift_days(days: &str) -> Result<String, String> {
    if days == "*" {
        return Ok(days.into());
    }
    const NAMES: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];
    let day = |d: &str| -> Result<usize, String> {
        let d = d.to_ascii_lowercase();
        NAMES
            .iter()
            .position(|n| *n == d)
            .or_else(|| d.parse::<usize>().ok().filter(|n| *n <= 7).map(|n| n % 7))
            .ok_or_else(|| format!("window.days: `{d}` is not a weekday (sun-sat or 0-7)"))
    };
    let mut out = BTreeSet::new();
    for part in days.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (day(a)?, day(b)?);
                let mut d = a;
                loop {
                    out.insert((d + 1) % 7);
                    if d == b {
                        break;
                    }
                    d = (d + 1) % 7;
                }
            }
            None => {
                out.insert((day(part)? + 1) % 7);
            }
        }
    }
    Ok(out.iter().map(|d| NAMES[*d]).collect::<Vec<_>>().join(","))
}

/// Who a schedule's firing is submitted by (`created_by`): `schedule:<name>`.
pub fn fired_by(schedule: &str) -> String {
    format!("schedule:{schedule}")
}

/// The schedule a job's `created_by` names, if a firing queued it.
pub fn schedule_of(created_by: Option<&str>) -> Option<String> {
    created_by?.strip_prefix("schedule:").map(str::to_string)
}

/// The firing time a schedule's job was queued for, read from its idempotency key
/// (`schedule:<name>:<time>`, perhaps followed by what a window's job does).
pub fn fired_at(created_by: Option<&str>, key: Option<&str>) -> Option<DateTime<Utc>> {
    let name = schedule_of(created_by)?;
    let rest = key?.strip_prefix(&format!("{}:", fired_by(&name)))?;
    let time = rest.get(..20)?;
    DateTime::parse_from_rfc3339(time)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The idempotency key of a schedule's firing: the same firing, from any restart or replica,
/// queues one job.
pub fn firing_key(schedule: &str, at: DateTime<Utc>) -> String {
    format!(
        "schedule:{schedule}:{}",
        at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    fn times(expr: &str, tz: &str) -> Times {
        Times::new(Recurrence::parse(expr, tz).expect("parse"))
    }

    fn show(v: &[DateTime<Utc>]) -> Vec<String> {
        v.iter()
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .collect()
    }

    #[test]
    fn spring_forward_fires_once_right_after_the_gap() {
        // Berlin, 2027-03-28: 02:00 CET becomes 03:00 CEST; 02:30 does not exist that day.
        let t = times("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            show(&t.upcoming(utc("2027-03-26T12:00:00Z"), 4)),
            [
                "2027-03-27T01:30:00Z", // 02:30 CET
                "2027-03-28T01:00:00Z", // 03:00 CEST, the first instant after the gap
                "2027-03-29T00:30:00Z", // 02:30 CEST
                "2027-03-30T00:30:00Z",
            ]
        );
        // New York, 2027-03-14: 02:00 EST becomes 03:00 EDT.
        let t = times("30 2 * * *", "America/New_York");
        assert_eq!(
            show(&t.upcoming(utc("2027-03-13T12:00:00Z"), 3)),
            [
                "2027-03-14T07:00:00Z", // 03:00 EDT
                "2027-03-15T06:30:00Z", // 02:30 EDT
                "2027-03-16T06:30:00Z",
            ]
        );
        // Every 15 minutes through the gap: 01:45 CET, then 03:00 CEST once (02:00-02:45 are
        // missing; they do not each fire at 03:00).
        let t = times("*/15 * * * *", "Europe/Berlin");
        assert_eq!(
            show(&t.upcoming(utc("2027-03-28T00:40:00Z"), 3)),
            [
                "2027-03-28T00:45:00Z",
                "2027-03-28T01:00:00Z",
                "2027-03-28T01:15:00Z"
            ]
        );
    }

    #[test]
    fn fall_back_fires_once() {
        // Berlin, 2027-10-31: 03:00 CEST becomes 02:00 CET; 02:30 happens twice.
        let t = times("30 2 * * *", "Europe/Berlin");
        assert_eq!(
            show(&t.upcoming(utc("2027-10-30T12:00:00Z"), 2)),
            ["2027-10-31T00:30:00Z", "2027-11-01T01:30:00Z"]
        );
        // Asked from inside the repeated hour (after the first 02:30): not again.
        assert_eq!(
            show(&t.upcoming(utc("2027-10-31T01:10:00Z"), 1)),
            ["2027-11-01T01:30:00Z"]
        );
        // New York, 2027-11-07: 02:00 EDT becomes 01:00 EST; 01:30 happens twice.
        let t = times("30 1 * * *", "America/New_York");
        assert_eq!(
            show(&t.upcoming(utc("2027-11-06T12:00:00Z"), 2)),
            ["2027-11-07T05:30:00Z", "2027-11-08T06:30:00Z"]
        );
    }

    #[test]
    fn feb_29_aliases_seconds_and_weekdays() {
        let t = times("0 9 29 2 *", "UTC");
        assert_eq!(
            show(&t.upcoming(utc("2026-12-04T00:00:00Z"), 2)),
            ["2028-02-29T09:00:00Z", "2032-02-29T09:00:00Z"]
        );
        assert!(times("0 0 30 2 *", "UTC")
            .next(utc("2026-01-01T00:00:00Z"))
            .is_none());
        let t = times("@daily", "Europe/Berlin");
        assert_eq!(
            show(&t.upcoming(utc("2026-12-04T12:00:00Z"), 1)),
            ["2026-12-04T23:00:00Z"]
        );
        let t = times("30 0 7 * * 1-5", "Europe/Berlin"); // seconds first; Mon-Fri (POSIX)
        assert_eq!(
            show(&t.upcoming(utc("2026-12-04T12:00:00Z"), 2)), // a Friday
            ["2026-12-07T06:00:30Z", "2026-12-08T06:00:30Z"]
        );
        for (expr, tz, says) in [
            ("0 7 * *", "UTC", "has 4 fields"),
            ("0 7 * * * * 2027", "UTC", "has 7 fields"),
            ("0 25 * * *", "UTC", "is not a cron expression"),
            ("0 7 * * *", "Europe/Nowhere", "is not an IANA time zone"),
        ] {
            let e = Recurrence::parse(expr, tz).expect_err(expr);
            assert!(e.contains(says), "{expr}: {e}");
        }
    }

    #[test]
    /// Issue 30, finding 7: a firing every second with 1,000 skipped days is found by skipping
    /// whole days (one step each), in any zone, and a pattern that never fires says so.
    fn skipped_days_cost_a_step_each_not_a_step_per_firing() {
        for tz in ["UTC", "Europe/Berlin", "America/Santiago"] {
            let mut t = times("* * * * * *", tz);
            let zone = t.recurrence.time_zone();
            let first = utc("2026-12-07T12:00:00Z")
                .with_timezone(&zone)
                .date_naive();
            let mut day = first;
            for _ in 0..1000 {
                t.skip.insert(day);
                day = day.succ_opt().expect("date");
            }
            let next = t
                .next(utc("2026-12-07T12:00:00Z"))
                .expect("fires after the skipped days");
            let local = next.with_timezone(&zone);
            assert_eq!(local.date_naive(), day, "{tz}: the first day not skipped");
            assert!(
                local.time() <= chrono::NaiveTime::from_hms_opt(1, 0, 0).expect("time"),
                "{tz}: at the start of that day, not later: {local}"
            );
            assert_eq!(t.upcoming(utc("2026-12-07T12:00:00Z"), 10).len(), 10);
            // The latest firing before the skipped days, found from inside them.
            let before = t.latest(utc("2026-12-06T12:00:00Z"), utc("2029-01-01T00:00:00Z"));
            assert!(
                before.is_some_and(|b| b.with_timezone(&zone).date_naive() < first),
                "{tz}: {before:?}"
            );
        }
        assert_eq!(
            times("0 0 31 2 *", "UTC").next(utc("2026-12-07T12:00:00Z")),
            None
        );
    }

    #[test]
    fn holidays_and_the_active_span_are_skipped() {
        let mut t = times("0 7 * * mon-fri", "Europe/Berlin");
        t.skip
            .insert(NaiveDate::from_ymd_opt(2026, 12, 24).expect("date"));
        t.skip
            .insert(NaiveDate::from_ymd_opt(2026, 12, 25).expect("date"));
        t.active_until = Some(utc("2026-12-30T00:00:00Z"));
        assert_eq!(
            show(&t.upcoming(utc("2026-12-23T12:00:00Z"), 10)),
            ["2026-12-28T06:00:00Z", "2026-12-29T06:00:00Z"]
        );
        t.active_from = Some(utc("2026-12-29T00:00:00Z"));
        assert_eq!(
            show(&t.upcoming(utc("2026-12-01T00:00:00Z"), 10)),
            ["2026-12-29T06:00:00Z"]
        );
    }

    #[test]
    fn office_hours_windows_open_and_close_in_local_time() {
        let w = |start: &str, stop: &str, days: &str| Window {
            start: start.into(),
            stop: stop.into(),
            days: days.into(),
            time_zone: "Europe/Berlin".into(),
        };
        let office = w("07:00", "19:00", "mon-fri");
        // 2026-12-04 is a Friday; Berlin is UTC+1 in winter.
        for (at, open) in [
            ("2026-12-04T17:00:00Z", true),  // Fri 18:00
            ("2026-12-04T18:00:00Z", false), // Fri 19:00: closed
            ("2026-12-05T09:00:00Z", false), // Sat 10:00
            ("2026-12-07T05:59:00Z", false), // Mon 06:59
            ("2026-12-07T06:00:00Z", true),  // Mon 07:00
            ("2027-03-29T05:00:00Z", true),  // Mon 07:00 CEST, after the change
            ("2027-03-29T04:30:00Z", false), // Mon 06:30 CEST
        ] {
            assert_eq!(office.open_at(utc(at)).unwrap(), open, "{at}");
        }
        let night = w("22:00", "06:00", "mon-fri"); // Mon night to Sat morning
        assert_eq!(shift_days("mon-fri").unwrap(), "tue,wed,thu,fri,sat");
        assert_eq!(shift_days("sat,sun").unwrap(), "sun,mon");
        for (at, open) in [
            ("2026-12-04T22:00:00Z", true),  // Fri 23:00
            ("2026-12-05T04:00:00Z", true),  // Sat 05:00
            ("2026-12-05T05:30:00Z", false), // Sat 06:30
            ("2026-12-05T22:00:00Z", false), // Sat 23:00: no window opens on Saturday
            ("2026-12-07T11:00:00Z", false), // Mon noon
        ] {
            assert_eq!(night.open_at(utc(at)).unwrap(), open, "{at}");
        }
        for (bad, says) in [
            (w("7:00", "19:00", "*"), "not a time of day"),
            (w("07:00", "24:00", "*"), "not a time of day"),
            (w("07:00", "07:00", "*"), "the same time"),
            (w("07:00", "19:00", "mon fri"), "one cron weekday field"),
            (w("22:00", "06:00", "funday"), "is not a cron expression"),
        ] {
            let e = bad.recurrences().expect_err(says);
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn catch_up_after_two_hours_down() {
        let t = times("0 * * * *", "UTC");
        let seen = utc("2026-12-04T08:00:30Z"); // the 08:00 firing was dealt with, then down
        let now = utc("2026-12-04T10:20:00Z"); // back up: 09:00 and 10:00 were missed
        let grace = chrono::Duration::seconds(60);
        assert_eq!(t.due(seen, now, grace, CatchUp::None), None);
        assert_eq!(
            t.due(seen, now, grace, CatchUp::Latest),
            Some(utc("2026-12-04T10:00:00Z")),
            "only the latest, once"
        );
        // On time (a tick 1 s after the firing): runs whatever catch_up says.
        let now = utc("2026-12-04T09:00:01Z");
        assert_eq!(
            t.due(seen, now, grace, CatchUp::None),
            Some(utc("2026-12-04T09:00:00Z"))
        );
        // Every second, 90 days down: the latest is found without walking the 7.8 million.
        let every = times("* * * * * *", "Europe/Berlin");
        let back = utc("2026-12-04T10:20:00.500Z");
        assert_eq!(
            every.due(
                back - chrono::Duration::days(90),
                back,
                grace,
                CatchUp::Latest
            ),
            Some(utc("2026-12-04T10:20:00Z"))
        );
        // Nothing new since `seen`.
        assert_eq!(t.due(now, now, grace, CatchUp::Latest), None);
        let key = firing_key("dev-start", utc("2026-12-04T09:00:00Z"));
        assert_eq!(key, "schedule:dev-start:2026-12-04T09:00:00Z");
        let by = fired_by("dev-start");
        for k in [key.clone(), format!("{key}:enforce:stop_instances")] {
            assert_eq!(
                fired_at(Some(&by), Some(&k)),
                Some(utc("2026-12-04T09:00:00Z"))
            );
        }
        assert_eq!(fired_at(Some("ops"), Some(&key)), None, "not a firing");
        assert_eq!(fired_at(Some("schedule:other"), Some(&key)), None);
    }
}

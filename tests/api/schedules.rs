//! Schedules end to end (issue 17): the real daemon fires jobs on its own against moto, as a cron
//! schedule and as an enforced office-hours window with an override that expires. The firing
//! times themselves (DST, holidays, catch-up, overlap, a restart at the firing instant) are tested
//! with an injected clock in `ec2jobd-spec` and the ticker's own tests; here the clock is real, so
//! schedules fire every second or two and the tests poll for what they expect.

use std::time::{Duration, Instant};

use chrono::{Timelike, Utc};
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{bin, create_token, Daemon, DaemonOpts, Moto};
use crate::problem;

/// Polls `f` until it gives a value, at most `within`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    within: Duration,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < end, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn put(d: &Daemon, token: &str, name: &str, body: &Value) -> reqwest::Response {
    d.req(Method::PUT, &format!("/v1/schedules/{name}"), token)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn history(d: &Daemon, name: &str) -> Vec<Value> {
    let (st, page) = d
        .get_json(&format!("/v1/jobs?schedule={name}&limit=100"))
        .await;
    assert_eq!(st, 200, "{page}");
    page["jobs"].as_array().cloned().unwrap_or_default()
}

#[tokio::test]
async fn schedules_fire_jobs_and_are_managed_over_the_api_and_cli() {
    let moto = Moto::start().await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        extra: r#"
[calendars.de]
dates = ["2026-12-25", "2026-12-26"]

[schedules.nightly]
description = "from config"
cron = "0 2 * * *"
time_zone = "Europe/Berlin"
calendars = ["de"]
[schedules.nightly.job]
action = "describe_instances"
targets = { tags = { Backup = "daily" } }
"#
        .into(),
        ..DaemonOpts::default()
    })
    .await;
    let operator = create_token(&d.config, "operator", "op");
    let viewer = create_token(&d.config, "viewer", "view");
    let every2s = json!({
        "description": "every two seconds",
        "cron": "*/2 * * * * *",
        "job": {"action": "describe_instances", "targets": {"tags": {"Env": "dev"}}, "allow_empty": true},
    });

    // Writing takes an admin; bad schedules are refused naming the field, nothing stored.
    let r = put(&d, &operator, "every2s", &every2s).await;
    assert_eq!(problem(r).await.0, 403);
    for (body, field) in [
        (json!({"cron": "0 25 * * *", "job": every2s["job"]}), "cron"),
        (
            json!({"cron": "0 7 * * *", "time_zone": "Mars/Base", "job": every2s["job"]}),
            "time_zone",
        ),
        (json!({"cron": "0 7 * * *"}), "job"),
        (
            json!({"cron": "0 7 * * *", "job": every2s["job"], "calendars": ["xx"]}),
            "calendars",
        ),
        (
            json!({"cron": "0 7 * * *", "job": {"action": "start_instances"}}),
            "job.targets",
        ),
        (
            json!({"cron": "0 7 * * *", "job": every2s["job"], "enforce": true}),
            "enforce",
        ),
        (
            json!({"window": {"start": "07:00", "stop": "19:00", "time_zone": "UTC"}}),
            "targets",
        ),
    ] {
        let (st, p) = problem(put(&d, &d.admin, "bad", &body).await).await;
        assert_eq!((st, p["field"].as_str()), (422, Some(field)), "{body}: {p}");
    }
    let (st, _) = d.get_json("/v1/schedules/bad").await;
    assert_eq!(st, 404);

    let r = put(&d, &d.admin, "every2s", &every2s).await;
    assert_eq!(r.status(), 201);
    let saved: Value = r.json().await.unwrap();
    let next: Vec<chrono::DateTime<Utc>> = saved["next"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["at"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(next.len(), 10, "{saved}");
    assert!(next
        .windows(2)
        .all(|w| w[1] - w[0] == chrono::Duration::seconds(2)));

    // It fires on its own; each firing's job carries the schedule and runs against moto.
    let first = eventually(
        Duration::from_secs(30),
        "a firing's job succeeded",
        || async {
            history(&d, "every2s")
                .await
                .into_iter()
                .find(|j| j["state"] == "succeeded")
        },
    )
    .await;
    assert_eq!(first["schedule"], "every2s");
    assert_eq!(first["created_by"], "schedule:every2s");
    let (_, one) = d.get_json("/v1/schedules/every2s").await;
    assert_eq!(one["source"], "api");
    assert!(one["last_job"]["id"].is_string(), "{one}");
    // Firings are whole seconds apart and never repeat.
    let jobs = history(&d, "every2s").await;
    let ids: std::collections::BTreeSet<&str> =
        jobs.iter().filter_map(|j| j["id"].as_str()).collect();
    assert_eq!(ids.len(), jobs.len());

    // Any role reads; the list shows config's schedule too, with its next firing.
    let r = d
        .req(Method::GET, "/v1/schedules", &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let all: Vec<Value> = r.json().await.unwrap();
    let nightly = all.iter().find(|s| s["name"] == "nightly").expect("listed");
    assert_eq!(nightly["source"], "config");
    assert_eq!(nightly["next"].as_array().unwrap().len(), 1);
    let r = put(&d, &d.admin, "nightly", &every2s).await;
    assert_eq!(
        problem(r).await.0,
        409,
        "config's schedules change in config"
    );

    // The CLI: list, get, pause, resume.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(bin())
            .args(args)
            .env("EC2JOBD_URL", &d.url)
            .env("EC2JOBD_TOKEN", &d.admin)
            .output()
            .expect("run ec2jobd");
        (
            out.status,
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (st, out, err) = cli(&["schedules", "list"]);
    assert!(st.success(), "{err}");
    assert!(out.contains("every2s") && out.contains("nightly"), "{out}");
    let (st, out, err) = cli(&["schedules", "pause", "every2s"]);
    assert!(st.success(), "{err}");
    assert!(out.contains("paused"), "{out}");
    let (_, paused) = d.get_json("/v1/schedules/every2s").await;
    assert_eq!(paused["schedule"]["enabled"], false);
    assert_eq!(paused["next"], json!([]), "paused: nothing ahead");
    let (st, out, _) = cli(&["schedules", "get", "every2s"]);
    assert!(st.success());
    assert!(out.contains("paused"), "{out}");
    let (st, _, err) = cli(&["schedules", "pause", "nightly"]);
    assert!(!st.success());
    assert!(err.contains("config"), "{err}");
    let (st, out, err) = cli(&["schedules", "resume", "every2s"]);
    assert!(st.success(), "{err}");
    assert!(out.contains("next"), "{out}");

    // Who changed it is in the audit log; deleting it keeps its jobs.
    let (_, audit) = d.get_json("/v1/audit").await;
    let changes: Vec<(&str, &str)> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["what"] == "schedule")
        .map(|e| (e["change"].as_str().unwrap(), e["by"].as_str().unwrap()))
        .collect();
    assert_eq!(changes.first(), Some(&("replaced", "admin")), "{audit}");
    assert!(changes.contains(&("created", "admin")));
    let r = d
        .req(Method::DELETE, "/v1/schedules/every2s", &d.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert!(!history(&d, "every2s").await.is_empty());
}

/// `HH:MM` of now plus `hours`, in UTC.
fn hh_mm_in(hours: i64) -> String {
    let t = Utc::now() + chrono::Duration::hours(hours);
    format!("{:02}:{:02}", t.hour(), t.minute())
}

#[tokio::test]
async fn an_enforced_window_undoes_a_manual_start_and_honours_an_override_until_it_expires() {
    let moto = Moto::start().await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..DaemonOpts::default()
    })
    .await;
    let office = moto.launch(2, &[("Schedule", "office-hours")]).await;
    let other = moto.launch(1, &[("Schedule", "always")]).await;
    let (a, b) = (office[0].clone(), office[1].clone());
    // Closed now: it opens in two hours and closes in three.
    let window = json!({
        "window": {"start": hh_mm_in(2), "stop": hh_mm_in(3), "days": "*", "time_zone": "UTC"},
        "targets": {"tags": {"Schedule": "office-hours"}},
        "enforce": true,
        "interval": "1s",
    });
    let r = put(&d, &d.admin, "office", &window).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let stopped = |ids: Vec<String>| {
        let moto = &moto;
        async move { (moto.states(&ids).await.iter().all(|s| s == "stopped")).then_some(()) }
    };
    eventually(Duration::from_secs(60), "both stopped", || {
        stopped(office.clone())
    })
    .await;
    assert_eq!(moto.state(&other[0]).await, "running", "not targeted");
    let stops = |jobs: &[Value]| {
        jobs.iter()
            .filter(|j| j["action"] == "stop_instances")
            .count()
    };
    let before = stops(&history(&d, "office").await);
    assert!(before >= 1);

    // Someone starts one by hand: the window stops it again.
    moto.ec2()
        .await
        .start_instances()
        .instance_ids(&a)
        .send()
        .await
        .unwrap();
    eventually(
        Duration::from_secs(60),
        "the manual start undone",
        || async {
            let jobs = history(&d, "office").await;
            let again = jobs.iter().any(|j| {
                j["action"] == "stop_instances"
                    && j["state"] == "succeeded"
                    && j["spec"]["targets"]["instance_ids"] == json!([a.clone()])
            });
            (again && moto.state(&a).await == "stopped").then_some(())
        },
    )
    .await;

    // "Keep a running for a few seconds": it is started (and checked), b stays stopped; once
    // the override expires, a is stopped again.
    let until = Utc::now() + chrono::Duration::seconds(8);
    let r = d
        .req(Method::POST, "/v1/schedules/office/overrides", &d.admin)
        .json(&json!({"instance_ids": [a], "state": "running", "until": until, "reason": "demo"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let held: Value = r.json().await.unwrap();
    let (_, shown) = d.get_json("/v1/schedules/office").await;
    assert_eq!(
        shown["overrides"][held["id"].as_str().unwrap()]["state"],
        "running"
    );
    eventually(
        Duration::from_secs(60),
        "a started for the override",
        || async { (moto.state(&a).await == "running").then_some(()) },
    )
    .await;
    assert_eq!(moto.state(&b).await, "stopped");
    eventually(
        Duration::from_secs(60),
        "a stopped after the override",
        || async { (Utc::now() > until && moto.state(&a).await == "stopped").then_some(()) },
    )
    .await;
    let jobs = history(&d, "office").await;
    assert!(
        jobs.iter().any(|j| j["action"] == "start_instances"
            && j["spec"]["targets"]["instance_ids"] == json!([a.clone()])),
        "the override's start is in the history"
    );
    for j in &jobs {
        let key_like = j["schedule"] == "office" && j["created_by"] == "schedule:office";
        assert!(key_like, "{j}");
    }
    let (_, after) = d.get_json("/v1/schedules/office/overrides").await;
    assert_eq!(after, json!([]), "expired overrides are not listed");
}

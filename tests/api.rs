//! End-to-end tests of the v1 API: the real binary on a free port with a temporary database, and a
//! real moto server as the EC2 endpoint.

#[path = "api/clients.rs"]
mod clients;
mod common;
#[path = "api/hardening.rs"]
mod hardening;
#[path = "api/schedules.rs"]
mod schedules;
#[path = "api/telemetry.rs"]
mod telemetry;
#[path = "api/ui.rs"]
mod ui;

use std::time::Duration;

use common::{create_token, run_cli, BlackHole, Daemon, DaemonOpts, Moto};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

fn describe(targets: Value) -> Value {
    json!({"action": "describe_instances", "targets": targets})
}

async fn problem(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert_eq!(ct, "application/problem+json", "status {status}");
    let v: Value = r.json().await.expect("problem body");
    assert_eq!(v["status"], status);
    assert!(v["code"].is_string() && v["detail"].is_string(), "{v}");
    (status, v)
}

#[tokio::test]
async fn ops_routes_answer() {
    let d = Daemon::start(DaemonOpts::default()).await;
    let r = d
        .http
        .get(format!("{}/healthz", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        r.headers().contains_key("x-request-id"),
        "request id echoed"
    );
    let r = d
        .http
        .get(format!("{}/readyz", d.url))
        .header("x-request-id", "abc-123")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "abc-123");

    let m = d
        .http
        .get(format!("{}/metrics", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(m.status(), 200);
    let text = m.text().await.unwrap();
    for name in [
        "ec2jobd_jobs{state=\"queued\"}",
        "ec2jobd_queue_depth",
        "ec2jobd_job_duration_seconds",
        "ec2jobd_ec2_calls",
    ] {
        assert!(text.contains(name), "metrics lack {name}:\n{text}");
    }

    let api: Value = d
        .http
        .get(format!("{}/openapi.json", d.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(api["paths"]["/v1/jobs"]["post"].is_object());
    assert!(api["paths"]["/v1/jobs/{id}/events"].is_object());
    let (st, out, _) = run_cli(&["openapi"]);
    assert!(st.success());
    let printed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        printed, api,
        "`ec2jobd openapi` prints what the server serves"
    );

    let html = d.http.get(format!("{}/docs", d.url)).send().await.unwrap();
    assert_eq!(html.status(), 200);
    assert!(html
        .text()
        .await
        .unwrap()
        .contains("/docs/swagger-ui-bundle.js"));
    let js = d
        .http
        .get(format!("{}/docs/swagger-ui-bundle.js", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(js.status(), 200);
    assert!(
        js.bytes().await.unwrap().len() > 100_000,
        "vendored bundle served"
    );

    let (s, p) = problem(d.http.get(format!("{}/nope", d.url)).send().await.unwrap()).await;
    assert_eq!((s, p["code"].as_str()), (404, Some("not_found")));
    let (s, p) = problem(
        d.http
            .delete(format!("{}/healthz", d.url))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((s, p["code"].as_str()), (405, Some("method_not_allowed")));

    // Responses are compressed for clients that ask.
    let r = d
        .http
        .get(format!("{}/openapi.json", d.url))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
}

#[tokio::test]
async fn auth_and_roles() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    let spec = describe(json!({"instance_ids": ["i-01234567"]}));

    let r = d
        .http
        .get(format!("{}/v1/jobs", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let (s, p) = problem(r).await;
    assert_eq!((s, p["code"].as_str()), (401, Some("unauthorized")));
    let (s, _) = problem(
        d.req(Method::GET, "/v1/jobs", "ejd_not-a-token")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 401);

    let viewer = create_token(&d.config, "viewer", "v1");
    let operator = create_token(&d.config, "operator", "o1");
    let (s, p) = problem(d.post_job(&viewer, &spec).await).await;
    assert_eq!((s, p["code"].as_str()), (403, Some("forbidden")));
    let r = d.post_job(&operator, &spec).await;
    assert_eq!(r.status(), 202);
    let r = d
        .req(Method::GET, "/v1/jobs", &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let (s, _) = problem(
        d.req(Method::GET, "/v1/tokens", &operator)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s, 403, "operators do not manage tokens");

    // Admin creates a token over the API; it works, then revoked it does not.
    let r = d
        .req(Method::POST, "/v1/tokens", &d.admin)
        .json(&json!({"name": "ci", "role": "viewer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    let ci = created["token"].as_str().unwrap().to_string();
    let r = d.req(Method::GET, "/v1/jobs", &ci).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let listed: Value = d
        .req(Method::GET, "/v1/tokens", &d.admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = listed.to_string();
    assert!(
        text.contains("\"ci\"") && !text.contains(&ci),
        "no secrets listed"
    );
    let r = d
        .req(Method::POST, "/v1/tokens", &d.admin)
        .json(&json!({"name": "ci", "role": "admin"}))
        .send()
        .await
        .unwrap();
    assert_eq!(problem(r).await.0, 409);
    let r = d
        .req(Method::DELETE, "/v1/tokens/ci", &d.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = d.req(Method::GET, "/v1/jobs", &ci).send().await.unwrap();
    assert_eq!(r.status(), 401);

    // The CLI sees the same tokens and can revoke.
    let cfg = d.config.to_str().unwrap();
    let (st, out, _) = run_cli(&["token", "list", "--config", cfg]);
    assert!(st.success());
    assert!(
        out.contains("v1\tviewer") && out.contains("o1\toperator"),
        "{out}"
    );
    let (st, _, _) = run_cli(&["token", "revoke", "o1", "--config", cfg]);
    assert!(st.success());
    // The daemon caches verified tokens for 5 s: a revocation from another process lands within it.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = d
            .req(Method::GET, "/v1/jobs", &operator)
            .send()
            .await
            .unwrap();
        if r.status() == 401 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "CLI revocation not honoured"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (st, _, err) = run_cli(&["token", "revoke", "o1", "--config", cfg]);
    assert!(!st.success() && err.contains("no token named"), "{err}");
}

#[tokio::test]
async fn describe_instances_by_id_tag_and_filter_against_moto() {
    let moto = Moto::start().await;
    let tagged = moto.launch(2, &[("Env", "e2e"), ("Name", "web")]).await;
    let other = moto.launch(1, &[("Env", "other")]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;

    // By id, in the scheduler's "i-1;i-2" style.
    let r = d
        .post_job(
            &d.admin,
            &describe(json!({"instance_ids": format!("{};{}", tagged[0], other[0])})),
        )
        .await;
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let job: Value = r.json().await.unwrap();
    assert_eq!(loc, format!("/v1/jobs/{}", job["id"].as_str().unwrap()));
    assert_eq!(job["state"], "queued");
    assert_eq!(job["spec"]["account"], "default", "normalised spec");
    assert_eq!(job["spec"]["region"], "us-east-1");
    let j = d.wait_final(job["id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    let mut ids: Vec<&str> = j["results"]["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["instance_id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut want = vec![tagged[0].as_str(), other[0].as_str()];
    want.sort();
    assert_eq!(ids, want);
    assert!(j["results"]["request_ids"].as_array().unwrap().len() == 1);
    for key in ["started_at", "finished_at", "created_at"] {
        assert!(
            chrono::DateTime::parse_from_rfc3339(j[key].as_str().unwrap()).is_ok(),
            "{key} is RFC 3339"
        );
    }
    assert_eq!(j["attempts"], 1);

    // By tag ("Key=Value" style).
    let id = d.submit(&describe(json!({"tags": "Env=e2e"}))).await;
    let j = d.wait_final(&id, MINUTE).await;
    let inst = j["results"]["instances"].as_array().unwrap();
    assert_eq!(inst.len(), 2, "{j}");
    for i in inst {
        assert!(tagged.contains(&i["instance_id"].as_str().unwrap().to_string()));
        assert_eq!(i["name"], "web");
        assert_eq!(i["instance_type"], "t3.micro");
        assert!(i["private_ip"].is_string() && i["availability_zone"].is_string());
        assert!(matches!(i["state"].as_str(), Some("running" | "pending")));
    }

    // By raw filter.
    let id = d
        .submit(&describe(
            json!({"filters": [{"name": "tag:Env", "values": ["other"]}]}),
        ))
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(
        j["results"]["instances"][0]["instance_id"],
        other[0].as_str()
    );

    // No match fails clearly, unless allow_empty.
    let id = d
        .submit(&describe(json!({"tags": {"Env": "nothing"}})))
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(
        (j["state"].as_str(), j["error"]["code"].as_str()),
        (Some("failed"), Some("NoTargets"))
    );
    let mut spec = describe(json!({"tags": {"Env": "nothing"}}));
    spec["allow_empty"] = json!(true);
    let id = d.submit(&spec).await;
    assert_eq!(d.wait_final(&id, MINUTE).await["state"], "succeeded");

    // Dry run: DryRunOperation means "would succeed".
    let mut spec = describe(json!({"instance_ids": [tagged[0]]}));
    spec["dry_run"] = json!(true);
    let id = d.submit(&spec).await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert!(j["results"]["summary"]
        .as_str()
        .unwrap()
        .contains("would succeed"));

    // An unknown instance is AWS's error, with its code and request id, and no retry.
    let id = d
        .submit(&describe(json!({"instance_ids": ["i-0123456789abcdef0"]})))
        .await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "failed");
    assert_eq!(j["error"]["code"], "InvalidInstanceID.NotFound");
    assert!(j["error"]["request_id"].is_string(), "{j}");
    assert_eq!(j["attempts"], 1, "permanent errors are not retried");

    // The calls were counted.
    let text = d
        .http
        .get(format!("{}/metrics", d.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains("ec2jobd_ec2_calls_total{operation=\"DescribeInstances\",outcome=\"ok\"}"),
        "{text}"
    );
    assert!(
        text.contains("outcome=\"InvalidInstanceID.NotFound\""),
        "{text}"
    );
}

#[tokio::test]
async fn idempotency_key_replays_and_conflicts() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    let post = |spec: Value, key: &'static str| {
        d.req(Method::POST, "/v1/jobs", &d.admin)
            .header("Idempotency-Key", key)
            .json(&spec)
            .send()
    };
    let a = post(describe(json!({"instance_ids": "i-01234567"})), "nightly-1")
        .await
        .unwrap();
    assert_eq!(a.status(), 202);
    let a: Value = a.json().await.unwrap();
    // The same request in another spelling normalises to the same spec: a replay.
    let b = post(
        describe(json!({"instance_ids": ["i-01234567"]})),
        "nightly-1",
    )
    .await
    .unwrap();
    assert_eq!(b.status(), 200);
    assert!(b.headers().contains_key("location"));
    let b: Value = b.json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    let c = post(describe(json!({"instance_ids": "i-89abcdef"})), "nightly-1")
        .await
        .unwrap();
    let (s, p) = problem(c).await;
    assert_eq!(
        (s, p["code"].as_str(), p["field"].as_str()),
        (409, Some("idempotency_conflict"), Some("Idempotency-Key"))
    );
    let (_, page) = d.get_json("/v1/jobs").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn bad_input_is_rejected_and_nothing_is_stored() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    let raw = |body: String, ct: &'static str| {
        d.req(Method::POST, "/v1/jobs", &d.admin)
            .header("content-type", ct)
            .body(body)
            .send()
    };
    let json_ct = "application/json";
    let cases: Vec<(String, &str, u16, &str, Option<&str>)> = vec![
        ("{\"action\": ".into(), json_ct, 400, "malformed_json", Some("body")),
        ("[1,2]".into(), json_ct, 422, "not_an_object", Some("body")),
        ("".into(), json_ct, 400, "malformed_json", Some("body")),
        (
            r#"{"action":"describe_instances","targets":{"instance_ids":["i-01234567"]},"dry_run":"yes"}"#.into(),
            json_ct, 422, "invalid_field", Some("dry_run"),
        ),
        (
            r#"{"action":"describe_instances","targets":{"instance_ids":["i-01234567"]},"bogus":1}"#.into(),
            json_ct, 422, "unknown_field", Some("bogus"),
        ),
        (
            r#"{"action":"describe_instances","targets":{"instance_ids":["i-01234567"],"names":["x"]}}"#.into(),
            json_ct, 422, "unknown_field", Some("targets.names"),
        ),
        (
            r#"{"action":"launch_rockets","targets":{"instance_ids":["i-01234567"]}}"#.into(),
            json_ct, 422, "unknown_action", Some("action"),
        ),
        (r#"{"targets":{"instance_ids":["i-01234567"]}}"#.into(), json_ct, 422, "missing_field", Some("action")),
        (r#"{"action":"describe_instances"}"#.into(), json_ct, 422, "missing_targets", Some("targets")),
        (
            r#"{"action":"describe_instances","targets":{"instance_ids":[]}}"#.into(),
            json_ct, 422, "empty_targets", Some("targets.instance_ids"),
        ),
        (
            r#"{"action":"describe_instances","targets":{"instance_ids":["i-01234567","web-1"]}}"#.into(),
            json_ct, 422, "invalid_instance_id", Some("targets.instance_ids[1]"),
        ),
        (
            r#"{"action":"describe_instances","account":"prod","targets":{"tags":"a=b"}}"#.into(),
            json_ct, 422, "unknown_account", Some("account"),
        ),
        (
            r#"{"action":"describe_instances","targets":{"tags":"a=b"},"wait":{"timeout":"forever"}}"#.into(),
            json_ct, 422, "invalid_duration", Some("wait.timeout"),
        ),
        (
            r#"{"action":"describe_instances","targets":{"tags":"a=b"}}"#.into(),
            "text/plain", 415, "unsupported_media_type", Some("Content-Type"),
        ),
        (
            format!(
                r#"{{"action":"describe_instances","targets":{{"tags":"a=b"}},"params":{{"pad":"{}"}}}}"#,
                "x".repeat(70_000)
            ),
            json_ct, 413, "body_too_large", Some("body"),
        ),
    ];
    for (body, ct, status, code, field) in cases {
        let r = raw(body.clone(), ct).await.unwrap();
        let (s, p) = problem(r).await;
        let short: String = body.chars().take(80).collect();
        assert_eq!(s, status, "{short}: {p}");
        assert_eq!(p["code"].as_str(), Some(code), "{short}: {p}");
        assert_eq!(p["field"].as_str(), field, "{short}: {p}");
    }
    let r = d
        .req(Method::POST, "/v1/jobs", &d.admin)
        .header("Idempotency-Key", "")
        .json(&describe(json!({"tags": "a=b"})))
        .send()
        .await
        .unwrap();
    assert_eq!(problem(r).await.1["field"], "Idempotency-Key");

    for (q, field) in [
        ("cursor=not-a-cursor", "cursor"),
        ("state=sleeping", "state"),
        ("limit=0", "limit"),
        ("limit=9999", "limit"),
        ("since=yesterday", "since"),
        ("action=launch_rockets", "action"),
        ("colour=blue", "colour"),
    ] {
        let r = d
            .req(Method::GET, &format!("/v1/jobs?{q}"), &d.admin)
            .send()
            .await
            .unwrap();
        let (s, p) = problem(r).await;
        assert_eq!((s, p["field"].as_str()), (400, Some(field)), "{q}: {p}");
    }
    let (s, page) = d.get_json("/v1/jobs").await;
    assert_eq!(s, 200);
    assert_eq!(
        page["jobs"],
        json!([]),
        "nothing stored by rejected requests"
    );
    let (s, _) = d.get_json("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV").await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn list_filters_and_paginates_newest_first() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(d.submit(&describe(json!({"tags": "a=b"}))).await);
    }
    let cancelled = ids[0].clone();
    let r = d
        .req(
            Method::POST,
            &format!("/v1/jobs/{cancelled}/cancel"),
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/jobs?limit=2&cursor={c}"),
            None => "/v1/jobs?limit=2".to_string(),
        };
        let (s, page) = d.get_json(&path).await;
        assert_eq!(s, 200);
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 2);
        seen.extend(jobs.iter().map(|j| j["id"].as_str().unwrap().to_string()));
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let (_, page) = d.get_json("/v1/jobs?state=cancelled").await;
    let got: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [cancelled.as_str()]);
    let (_, page) = d
        .get_json("/v1/jobs?state=queued&action=describe_instances")
        .await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 4);
    let since = before.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (_, page) = d
        .get_json(&format!("/v1/jobs?since={}", since.replace('+', "%2B")))
        .await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 5);
    let (_, page) = d
        .get_json(&format!("/v1/jobs?until={}", since.replace('+', "%2B")))
        .await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 0);
}

/// Who did it: a job records the token that submitted it (shown in its report and by `ec2jobd jobs
/// list`, and filterable), and its events the token that submitted and the one that cancelled.
#[tokio::test]
async fn jobs_record_who_submitted_and_who_cancelled() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    let ci = create_token(&d.config, "operator", "ci");
    let ops = create_token(&d.config, "operator", "ops");
    let submit = |token: String| {
        let d = &d;
        async move {
            let r = d
                .post_job(&token, &describe(json!({"instance_ids": "i-01234567"})))
                .await;
            assert_eq!(r.status(), 202);
            r.json::<Value>().await.unwrap()
        }
    };
    let first = submit(ci.clone()).await;
    assert_eq!(first["created_by"], "ci", "{first}");
    let other = submit(ops.clone()).await;
    assert_eq!(other["created_by"], "ops");
    let second = submit(ci.clone()).await;
    let (s, page) = d.get_json("/v1/jobs?created_by=ci").await;
    assert_eq!(s, 200, "{page}");
    let ids: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            second["id"].as_str().unwrap(),
            first["id"].as_str().unwrap()
        ]
    );
    let (s, _) = d
        .get_json(&format!("/v1/jobs?created_by={}", "x".repeat(257)))
        .await;
    assert_eq!(s, 400);

    let id = first["id"].as_str().unwrap();
    let r = d
        .req(Method::POST, &format!("/v1/jobs/{id}/cancel"), &ops)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = d.text(&format!("/v1/jobs/{id}/events")).await;
    let who: Vec<(String, String)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["by"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        who,
        [
            ("queued".to_string(), "ci".to_string()),
            ("cancelled".to_string(), "ops".to_string())
        ]
    );
    let report = d.text(&format!("/v1/jobs/{id}/report")).await;
    assert!(report.contains(" by ci,"), "{report}");
    let o = std::process::Command::new(common::bin())
        .args(["jobs", "list", "--created-by", "ops", "--url", &d.url])
        .env("EC2JOBD_TOKEN", &d.admin)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].starts_with(other["id"].as_str().unwrap()) && lines[0].contains(" ops "),
        "{out}"
    );
}

/// A scoped token is refused (403 `out_of_scope`, nothing stored) outside its accounts, actions
/// and templates, a workflow's steps included; inside them it works as its role allows.
#[tokio::test]
async fn scoped_tokens_are_refused_outside_their_scope() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        extra: "\n[accounts.prod]\nregion = \"us-east-1\"\n".into(),
        ..Default::default()
    })
    .await;
    let o = std::process::Command::new(common::bin())
        .args(["token", "create", "--role", "operator", "--name", "starter"])
        .args([
            "--scope",
            "action=describe_instances,start_instances",
            "--scope",
            "account=prod",
        ])
        .args(["--config", d.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let starter = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let (st, _, err) = run_cli(&[
        "token",
        "create",
        "--role",
        "operator",
        "--name",
        "bad",
        "--scope",
        "action=fly",
        "--config",
        d.config.to_str().unwrap(),
    ]);
    assert!(
        !st.success() && err.contains("`fly` is not an action"),
        "{err}"
    );

    let send = |spec: Value| {
        let (d, t) = (&d, starter.clone());
        async move {
            let r = d.post_job(&t, &spec).await;
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let ok = json!({"action": "start_instances", "account": "prod", "targets": {"instance_ids": "i-01234567"}});
    assert_eq!(send(ok.clone()).await.0, 202);
    let mut other_action = ok.clone();
    other_action["action"] = json!("terminate_instances");
    let (s, p) = send(other_action).await;
    assert_eq!(
        (s, p["code"].as_str(), p["field"].as_str()),
        (403, Some("out_of_scope"), Some("action")),
        "{p}"
    );
    let mut other_account = ok.clone();
    other_account["account"] = json!("default");
    let (s, p) = send(other_account).await;
    assert_eq!((s, p["field"].as_str()), (403, Some("account")), "{p}");
    let workflow = json!({"account": "prod", "steps": [
        {"action": "describe_instances", "targets": {"instance_ids": "i-01234567"}},
        {"action": "reboot_instances", "targets": {"instance_ids": "i-01234567"}}]});
    let (s, p) = send(workflow).await;
    assert_eq!(
        (s, p["field"].as_str()),
        (403, Some("steps[1].action")),
        "{p}"
    );
    let (_, page) = d.get_json("/v1/jobs").await;
    assert_eq!(
        page["jobs"].as_array().unwrap().len(),
        1,
        "refusals store nothing"
    );

    // Templates: the scope names the ones it may run.
    let r = d
        .req(Method::POST, "/v1/tokens", &d.admin)
        .json(&json!({"name": "nightly", "role": "operator", "scopes": {"templates": ["nightly"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let created: Value = r.json().await.unwrap();
    assert_eq!(created["scopes"]["templates"], json!(["nightly"]));
    let nightly = created["token"].as_str().unwrap().to_string();
    let r = d
        .req(Method::POST, "/v1/templates/other/run", &nightly)
        .send()
        .await
        .unwrap();
    let (s, p) = problem(r).await;
    assert_eq!((s, p["field"].as_str()), (403, Some("template")), "{p}");
    let r = d
        .req(Method::POST, "/v1/tokens", &d.admin)
        .json(&json!({"name": "odd", "role": "viewer", "scopes": {"accounts": ["nowhere"]}}))
        .send()
        .await
        .unwrap();
    let (s, p) = problem(r).await;
    assert_eq!(
        (s, p["code"].as_str()),
        (422, Some("invalid_scopes")),
        "{p}"
    );

    // The audit log says who made each token (the CLI on the host, or a token over the API).
    let (s, log) = d.get_json("/v1/audit").await;
    assert_eq!(s, 200, "{log}");
    let seen: Vec<(&str, &str, &str)> = log["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["by"].as_str().unwrap(),
                e["name"].as_str().unwrap(),
                e["change"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("admin", "nightly", "created"),
            ("cli", "starter", "created"),
            ("cli", "admin", "created"),
        ],
        "{log}"
    );
    let r = d
        .req(Method::GET, "/v1/audit", &starter)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403, "operators do not read the audit log");
}

#[tokio::test]
async fn cancel_queued_and_running_jobs() {
    let hole = BlackHole::start();
    let d = Daemon::start(DaemonOpts {
        workers: 1,
        extra: format!(
            "\n[accounts.slow]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\ncall_timeout = \"60s\"\n",
            hole.url
        ),
        ..Default::default()
    })
    .await;
    // A running job: its DescribeInstances hangs on the black hole until cancelled.
    let mut spec = describe(json!({"instance_ids": "i-01234567"}));
    spec["account"] = json!("slow");
    let running = d.submit(&spec).await;
    d.wait_for(&running, MINUTE, |j| j["progress"]["phase"] == "calling")
        .await;
    // A queued job behind it (the only worker is busy).
    let queued = d.submit(&spec).await;
    let r = d
        .req(Method::POST, &format!("/v1/jobs/{queued}/cancel"), &d.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["state"], "cancelled");

    let r = d
        .req(
            Method::POST,
            &format!("/v1/jobs/{running}/cancel"),
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["cancel_requested"], true);
    let j = d.wait_final(&running, MINUTE).await;
    assert_eq!(j["state"], "cancelled", "{j}");

    let r = d
        .req(
            Method::POST,
            &format!("/v1/jobs/{running}/cancel"),
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    let (s, p) = problem(r).await;
    assert_eq!((s, p["code"].as_str()), (409, Some("already_finished")));
    let r = d
        .req(
            Method::POST,
            "/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV/cancel",
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(problem(r).await.0, 404);
}

#[tokio::test]
async fn events_stream_until_the_job_ends() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Env", "sse")]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        workers: 0,
        ..Default::default()
    })
    .await;
    let id = d.submit(&describe(json!({"instance_ids": ids}))).await;
    // Open the stream while the job is still queued (no workers), then start a daemon that runs it.
    let r = d
        .req(Method::GET, &format!("/v1/jobs/{id}/events"), &d.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    // A second daemon with a worker, on the same database, runs the job while we watch.
    let cfg = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("workers = 0", "workers = 1");
    let cfg_path = d.dir.join("worker.toml");
    std::fs::write(&cfg_path, cfg).unwrap();
    let _worker = Daemon::attach(cfg_path, d.admin.clone()).await;

    let mut body = String::new();
    let mut stream = r.bytes_stream();
    let read = tokio::time::timeout(MINUTE, async {
        while let Some(chunk) = stream.next().await {
            body.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
    })
    .await;
    assert!(read.is_ok(), "stream did not end by itself: {body}");
    let kinds: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds.first(), Some(&"queued"), "{body}");
    assert!(kinds.contains(&"started"), "{body}");
    assert_eq!(kinds.last(), Some(&"succeeded"), "{body}");
    // The closing line is written with the final state: the last event says what was done.
    assert!(
        body.contains("\"message\":\"described 1 instance\""),
        "{body}"
    );
    // Every event carries its sequence number as the SSE id, increasing.
    let seqs: Vec<i64> = body
        .lines()
        .filter_map(|l| l.strip_prefix("id: "))
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]) && seqs.len() == kinds.len());

    // Resuming after the last id of a finished job yields nothing and ends at once... and resuming
    // from an earlier id replays the rest.
    let r = d
        .req(Method::GET, &format!("/v1/jobs/{id}/events"), &d.admin)
        .header("Last-Event-ID", seqs[seqs.len() - 2].to_string())
        .send()
        .await
        .unwrap();
    let text = tokio::time::timeout(MINUTE, r.text())
        .await
        .unwrap()
        .unwrap();
    let kinds: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(kinds, ["succeeded"]);
    let (s, _) = d
        .get_json("/v1/jobs/01ARZ3NDEKTSV4RRFFQ69G5FAV/events")
        .await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn transient_errors_are_retried_with_backoff_then_fail() {
    // An endpoint that refuses connections: a dropped-connection class error.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        format!("http://{a}")
    };
    let d = Daemon::start(DaemonOpts {
        extra: format!(
            "\n[accounts.down]\nregion = \"us-east-1\"\nendpoint_url = \"{closed}\"\nmax_call_attempts = 2\nretry_base = \"20ms\"\nretry_max = \"50ms\"\n"
        ),
        ..Default::default()
    })
    .await;
    let mut spec = describe(json!({"instance_ids": "i-01234567"}));
    spec["account"] = json!("down");
    spec["max_attempts"] = json!(2);
    let id = d.submit(&spec).await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "failed");
    assert_eq!(j["error"]["code"], "ConnectionError");
    assert_eq!(j["attempts"], 2);
    let (_, events) = (0, {
        let r = d
            .req(Method::GET, &format!("/v1/jobs/{id}/events"), &d.admin)
            .send()
            .await
            .unwrap();
        tokio::time::timeout(MINUTE, r.text())
            .await
            .unwrap()
            .unwrap()
    });
    assert!(events.contains("event: retry_scheduled"), "{events}");
    let text = d
        .http
        .get(format!("{}/metrics", d.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("ec2jobd_job_retries_total 1"), "{text}");
}

#[tokio::test]
async fn accepted_job_survives_kill_9_and_runs_after_restart() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[]).await;
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        workers: 0,
        ..Default::default()
    })
    .await;
    let id = d.submit(&describe(json!({"instance_ids": ids}))).await;
    d.kill9();
    let cfg = std::fs::read_to_string(&d.config)
        .unwrap()
        .replace("workers = 0", "workers = 2");
    std::fs::write(&d.config, cfg).unwrap();
    d.spawn().await;
    let j = d.wait_final(&id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["results"]["instances"][0]["instance_id"], ids[0].as_str());
}

#[tokio::test]
async fn running_job_killed_mid_call_is_requeued_after_its_lease() {
    let hole = BlackHole::start();
    let mut d = Daemon::start(DaemonOpts {
        workers: 1,
        extra: format!(
            "\n[accounts.slow]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\ncall_timeout = \"60s\"\n",
            hole.url
        ),
        ..Default::default()
    })
    .await;
    let mut spec = describe(json!({"instance_ids": "i-01234567"}));
    spec["account"] = json!("slow");
    let id = d.submit(&spec).await;
    d.wait_for(&id, MINUTE, |j| j["progress"]["phase"] == "calling")
        .await;
    d.kill9();
    d.spawn().await;
    // The lease (3s) expires, the reaper re-queues the job, and a worker claims it again.
    let j = d
        .wait_for(&id, MINUTE, |j| {
            j["attempts"] == 2 && j["state"] == "running"
        })
        .await;
    assert!(j["error"].is_null());
    let r = d
        .req(Method::POST, &format!("/v1/jobs/{id}/cancel"), &d.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(d.wait_final(&id, MINUTE).await["state"], "cancelled");
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_releases_running_jobs() {
    let hole = BlackHole::start();
    let mut d = Daemon::start(DaemonOpts {
        workers: 1,
        extra: format!(
            "\n[accounts.slow]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\ncall_timeout = \"60s\"\n",
            hole.url
        ),
        ..Default::default()
    })
    .await;
    let mut spec = describe(json!({"instance_ids": "i-01234567"}));
    spec["account"] = json!("slow");
    let id = d.submit(&spec).await;
    d.wait_for(&id, MINUTE, |j| j["progress"]["phase"] == "calling")
        .await;
    // shutdown_grace is 3s in the test config: the daemon must be gone well before 15s.
    let st = d.terminate(Duration::from_secs(15));
    assert!(st.success(), "exit status {st:?}\n{}", d.log());
    assert!(d.log().contains("released at shutdown"), "{}", d.log());
    // The released job is queued again with its attempt given back.
    d.spawn().await;
    let j = d.job(&id).await;
    assert!(
        matches!(j["state"].as_str(), Some("queued" | "running")),
        "{j}"
    );
    let j = d.wait_for(&id, MINUTE, |j| j["state"] == "running").await;
    assert_eq!(
        j["attempts"], 1,
        "the released attempt was not counted: {j}"
    );
}

#[tokio::test]
async fn bad_config_fails_at_start_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bad.toml");
    std::fs::write(&f, "[queue]\nworkers = \"lots\"\n").unwrap();
    let (st, _, err) = run_cli(&["serve", "--config", f.to_str().unwrap()]);
    assert!(!st.success());
    assert!(err.contains("queue.workers"), "{err}");
    let (st, _, err) = run_cli(&[
        "serve",
        "--config",
        dir.path().join("missing.toml").to_str().unwrap(),
    ]);
    assert!(!st.success());
    assert!(err.contains("missing.toml"), "{err}");
    std::fs::write(
        &f,
        format!(
            "database = \"sqlite://{}\"\n",
            dir.path().join("m.db").display()
        ),
    )
    .unwrap();
    let (st, _, err) = run_cli(&["migrate", "--config", f.to_str().unwrap()]);
    assert!(st.success(), "{err}");
    assert!(dir.path().join("m.db").exists());
}

/// Backpressure: with `queue.max_queued` jobs waiting, a submission gets 429 with Retry-After and
/// nothing is stored; the queue stays at the limit.
#[tokio::test]
async fn a_full_queue_answers_429_and_stores_nothing() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        env: vec![("EC2JOBD_QUEUE__MAX_QUEUED".into(), "5".into())],
        ..Default::default()
    })
    .await;
    let spec = json!({"action": "describe_instances", "targets": {"tags": "a=b"}});
    for _ in 0..5 {
        assert_eq!(d.post_job(&d.admin, &spec).await.status(), 202);
    }
    let r = d.post_job(&d.admin, &spec).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["code"], "queue_full");
    let (_, page) = d.get_json("/v1/jobs?limit=100").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 5, "nothing stored");
    // Cancelling one makes room again (after the depth is re-read).
    let id = page["jobs"][0]["id"].as_str().unwrap();
    let r = d
        .req(
            reqwest::Method::POST,
            &format!("/v1/jobs/{id}/cancel"),
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let s = d.post_job(&d.admin, &spec).await.status();
        if s == 202 {
            break;
        }
        assert_eq!(s, 429);
        assert!(std::time::Instant::now() < deadline, "room never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

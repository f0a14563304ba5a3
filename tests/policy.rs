//! Issue 30: one way in. Every rule about who may do or see what holds on every door.
//!
//! - The authorization matrix, generated from the service's policy table
//!   (`ec2jobd_server::service::policy::TABLE`): every operation × every door that offers it
//!   (REST, the `ec2jobd` CLI, the dashboard, and the unattended doors: a schedule's firing, a
//!   window's reconciliation, an SNS webhook delivery, an SQS intake) × viewer/operator/admin ×
//!   scoped/unscoped, asserting allow or deny, and that a denial changes nothing. An operation of
//!   the table no door here exercises fails the test.
//! - The redaction test: a secret in the `user_data` of a job, a template, a schedule and a hook
//!   reaches no viewer through any answer, page, event, report, output, search or log line.
//!
//! The tests of the other findings (1–10 of the issue) are in this file too, each named after
//! what it shows.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, DaemonOpts, Moto};
use ec2jobd_server::service::policy::{Op, Scoped, TABLE};
use ec2jobd_spec::Role;
use reqwest::Method;
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);

/// Signs in to the dashboard; the cookie pair and the session's CSRF token.
async fn sign_in(d: &Daemon, token: &str) -> (String, String) {
    let r = common::no_redirects()
        .post(format!("{}/ui/signin", d.url))
        .form(&[("token", token)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "signed in");
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let html = common::no_redirects()
        .get(format!("{}/ui/jobs", d.url))
        .header("cookie", &cookie)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let at = html.find("name=\"csrf\" value=\"").expect("a form") + 19;
    (cookie, html[at..at + 64].to_string())
}

/// Who asks: a token of a role, scoped to what none of the matrix's operations act on, or not.
struct Who {
    role: Role,
    scoped: bool,
    name: String,
    token: String,
    session: (String, String),
}

/// What an admin sees of everything a request could change: jobs (state, cancel flag), the
/// audit log's length, tokens, templates, schedules, hooks and the window's overrides.
async fn snapshot(d: &Daemon) -> Value {
    let (_, jobs) = d.get_json("/v1/jobs?limit=500").await;
    // Jobs unattended doors queue come on their own time (a schedule fires every second until its
    // deletion is seen, a queue redelivers): each such cell checks its own effect instead.
    let jobs: Vec<Value> = jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| {
            let by = j["created_by"].as_str().unwrap_or("");
            !["schedule:", "sns:", "sqs:"]
                .iter()
                .any(|p| by.starts_with(p))
        })
        .map(|j| json!([j["id"], j["state"], j["cancel_requested"]]))
        .collect();
    let (_, audit) = d.get_json("/v1/audit?limit=500").await;
    let names = |v: Value, key: &str| -> Vec<Value> {
        v.as_array()
            .map(|a| a.iter().map(|x| x[key].clone()).collect())
            .unwrap_or_default()
    };
    let tokens = names(d.get_json("/v1/tokens").await.1, "name");
    let templates = names(d.get_json("/v1/templates").await.1, "name");
    let schedules = d.get_json("/v1/schedules").await.1;
    let schedules: Vec<Value> = schedules
        .as_array()
        .unwrap()
        .iter()
        .map(|s| json!([s["name"], s["schedule"]["enabled"]]))
        .collect();
    let hooks = names(d.get_json("/v1/sns/hooks").await.1, "name");
    let overrides = names(d.get_json("/v1/schedules/win/overrides").await.1, "id");
    json!({"jobs": jobs, "audit": audit["entries"].as_array().map(|a| a.len()),
        "tokens": tokens, "templates": templates, "schedules": schedules, "hooks": hooks,
        "overrides": overrides})
}

/// The doors of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Door {
    Rest,
    Cli,
    Dashboard,
    Schedule,
    Window,
    Sns,
    Sqs,
}

/// What one cell came to: allowed, or denied (with what was answered).
#[derive(Debug)]
enum Came {
    Allowed,
    Denied(String),
}

struct Matrix {
    d: Daemon,
    moto: Moto,
    instance: String,
    queue: String,
    n: std::cell::Cell<u32>,
}

impl Matrix {
    fn fresh(&self, what: &str) -> String {
        self.n.set(self.n.get() + 1);
        format!("{what}-{}", self.n.get())
    }

    async fn rest(&self, who: &Who, method: Method, path: &str, body: Option<Value>) -> Came {
        let mut r = self.d.req(method, path, &who.token);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        match status {
            200..=299 => Came::Allowed,
            403 => Came::Denied(text),
            other => panic!("{} {path}: {other} {text}", who.name),
        }
    }

    fn cli(&self, who: &Who, args: &[&str]) -> Came {
        let out = std::process::Command::new(common::bin())
            .args(args)
            .env("EC2JOBD_URL", &self.d.url)
            .env("EC2JOBD_TOKEN", &who.token)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        match out.status.code() {
            // 1 and 2 speak of the job (failed, not final yet): the daemon answered.
            Some(0..=2) => Came::Allowed,
            Some(3)
                if err.contains("403") || err.contains("forbidden") || err.contains("scope") =>
            {
                Came::Denied(err)
            }
            other => panic!("{} ec2jobd {args:?}: {other:?} {err}", who.name),
        }
    }

    async fn ui(&self, who: &Who, method: Method, path: &str, form: &[(&str, &str)]) -> Came {
        let (cookie, csrf) = &who.session;
        let mut r = common::no_redirects()
            .request(method.clone(), format!("{}{path}", self.d.url))
            .header("cookie", cookie);
        if method == Method::POST {
            let mut f: Vec<(&str, &str)> = vec![("csrf", csrf.as_str())];
            f.extend_from_slice(form);
            r = r.form(&f);
        }
        let r = r.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        match status {
            200..=399 => Came::Allowed,
            403 => Came::Denied(text),
            other => panic!("{} {path}: {other} {text}", who.name),
        }
    }

    /// A job queued by the admin (workers are off: it stays queued).
    async fn queued_job(&self, action: &str) -> String {
        self.d
            .submit(&json!({"action": action, "targets": {"instance_ids": [self.instance]}}))
            .await
    }

    async fn admin_put(&self, path: &str, body: Value) {
        let r = self
            .d
            .req(Method::PUT, path, &self.d.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            r.status().is_success(),
            "{path}: {}",
            r.text().await.unwrap()
        );
    }

    /// Polls the jobs `created_by` made until one is queued (each cell cancels what it caused).
    async fn job_by(&self, created_by: &str) -> String {
        let deadline = Instant::now() + MINUTE;
        loop {
            let (_, page) = self
                .d
                .get_json(&format!(
                    "/v1/jobs?created_by={created_by}&state=queued&limit=1"
                ))
                .await;
            if let Some(id) = page["jobs"][0]["id"].as_str() {
                return id.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no job by {created_by}; log:\n{}",
                self.d.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn hook(&self, topic: &str) -> Value {
        json!({"topics": [topic], "rules": [{"name": "reboot", "alarm_name": "StatusCheckFailed-*",
            "job": {"action": "reboot_instances", "targets": {"instance_ids": ["{instance_id}"]}}}]})
    }

    /// What a cell acts on, made by the admin before the cell's "before" snapshot: a job, a name
    /// to use, a document to delete, an override to end.
    async fn setup(&self, op: Op) -> String {
        let d = &self.d;
        let stop =
            json!({"action": "stop_instances", "targets": {"instance_ids": [self.instance]}});
        match op {
            Op::ReadJobs => self.queued_job("describe_instances").await,
            Op::Cancel | Op::Rerun => self.queued_job("reboot_instances").await,
            Op::SaveTemplate => self.fresh("t"),
            Op::SaveSchedule => self.fresh("s"),
            Op::SaveHook => self.fresh("h"),
            Op::CreateToken => self.fresh("tok"),
            Op::DeleteTemplate => {
                let name = self.fresh("t");
                self.admin_put(&format!("/v1/templates/{name}"), json!({"spec": stop}))
                    .await;
                name
            }
            Op::DeleteSchedule | Op::PauseSchedule => {
                let name = self.fresh("s");
                self.admin_put(
                    &format!("/v1/schedules/{name}"),
                    json!({"cron": "0 0 1 1 *", "job": stop}),
                )
                .await;
                name
            }
            Op::DeleteHook => {
                let name = self.fresh("h");
                self.admin_put(
                    &format!("/v1/sns/hooks/{name}"),
                    self.hook("arn:aws:sns:us-east-1:123456789012:matrix"),
                )
                .await;
                name
            }
            Op::EndOverride => {
                let until = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
                let r = d
                    .req(Method::POST, "/v1/schedules/win/overrides", &d.admin)
                    .json(&json!({"instance_ids": [self.instance], "state": "running", "until": until}))
                    .send()
                    .await
                    .unwrap();
                let o: Value = r.json().await.unwrap();
                format!("/v1/schedules/win/overrides/{}", o["id"].as_str().unwrap())
            }
            Op::RevokeToken => {
                let name = self.fresh("tok");
                let r = d
                    .req(Method::POST, "/v1/tokens", &d.admin)
                    .json(&json!({"name": name, "role": "viewer"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                name
            }
            _ => String::new(),
        }
    }

    /// What is left of a denied cell's setup, gone after the snapshots are compared.
    async fn cleanup(&self, op: Op, x: &str) {
        if op == Op::EndOverride {
            self.d
                .req(Method::DELETE, x, &self.d.admin)
                .send()
                .await
                .unwrap();
        }
    }

    /// One cell: `who` does `op` through `door`, on what [`Matrix::setup`] made (`x`).
    async fn cell(&self, op: Op, door: Door, who: &Who, x: &str) -> Came {
        let d = &self.d;
        let stop =
            json!({"action": "stop_instances", "targets": {"instance_ids": [self.instance]}});
        let topic = "arn:aws:sns:us-east-1:123456789012:matrix";
        match (op, door) {
            (Op::ReadJobs, Door::Rest) => {
                self.rest(who, Method::GET, &format!("/v1/jobs/{x}"), None)
                    .await
            }
            (Op::ReadJobs, Door::Cli) => self.cli(who, &["jobs", "get", x]),
            (Op::ReadJobs, _) => {
                self.ui(who, Method::GET, &format!("/ui/jobs/{x}"), &[])
                    .await
            }
            (Op::Submit, Door::Rest) => self.rest(who, Method::POST, "/v1/jobs", Some(stop)).await,
            (Op::Submit, _) => self.cli(
                who,
                &["submit", "stop", "--id", &self.instance, "--output", "id"],
            ),
            (Op::Cancel, Door::Rest) => {
                self.rest(who, Method::POST, &format!("/v1/jobs/{x}/cancel"), None)
                    .await
            }
            (Op::Cancel, Door::Cli) => self.cli(who, &["jobs", "cancel", x]),
            (Op::Cancel, _) => {
                self.ui(who, Method::POST, &format!("/ui/jobs/{x}/cancel"), &[])
                    .await
            }
            (Op::Rerun, _) => {
                self.ui(who, Method::POST, &format!("/ui/jobs/{x}/rerun"), &[])
                    .await
            }
            (Op::ReadTemplates, Door::Rest) => {
                self.rest(who, Method::GET, "/v1/templates/tpl", None).await
            }
            (Op::ReadTemplates, _) => self.ui(who, Method::GET, "/ui/templates/tpl", &[]).await,
            (Op::SaveTemplate, _) => {
                let path = format!("/v1/templates/{x}");
                self.rest(who, Method::PUT, &path, Some(json!({"spec": stop})))
                    .await
            }
            (Op::DeleteTemplate, _) => {
                self.rest(who, Method::DELETE, &format!("/v1/templates/{x}"), None)
                    .await
            }
            (Op::RunTemplate, Door::Rest) => {
                self.rest(who, Method::POST, "/v1/templates/tpl/run", Some(json!({})))
                    .await
            }
            (Op::RunTemplate, Door::Cli) => self.cli(who, &["run", "tpl", "--output", "id"]),
            (Op::RunTemplate, _) => {
                self.ui(who, Method::POST, "/ui/templates/tpl/run", &[])
                    .await
            }
            (Op::ReadSchedules, Door::Rest) => {
                self.rest(who, Method::GET, "/v1/schedules/win", None).await
            }
            (Op::ReadSchedules, _) => self.cli(who, &["schedules", "get", "win"]),
            (Op::SaveSchedule, _) => {
                let s = json!({"cron": "* * * * * *", "job": stop});
                let came = self
                    .rest(who, Method::PUT, &format!("/v1/schedules/{x}"), Some(s))
                    .await;
                if matches!(came, Came::Allowed) {
                    // It fires, as saved, through the ticker; then it goes.
                    self.job_by(&format!("schedule:{x}")).await;
                    let r = d
                        .req(Method::DELETE, &format!("/v1/schedules/{x}"), &d.admin)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 204);
                    self.cancel_all().await;
                } else {
                    let (s, _) = d.get_json(&format!("/v1/schedules/{x}")).await;
                    assert_eq!(s, 404, "a refused schedule is not saved, so never fires");
                }
                came
            }
            (Op::DeleteSchedule, _) => {
                self.rest(who, Method::DELETE, &format!("/v1/schedules/{x}"), None)
                    .await
            }
            (Op::PauseSchedule, Door::Rest) => {
                self.rest(who, Method::POST, &format!("/v1/schedules/{x}/pause"), None)
                    .await
            }
            (Op::PauseSchedule, _) => self.cli(who, &["schedules", "pause", x]),
            (Op::AddOverride, _) => {
                let until = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
                let o =
                    json!({"instance_ids": [self.instance], "state": "stopped", "until": until});
                let came = self
                    .rest(who, Method::POST, "/v1/schedules/win/overrides", Some(o))
                    .await;
                if matches!(came, Came::Allowed) {
                    // The window's enforcement stops the instance the override holds; then the
                    // override ends.
                    self.job_by("schedule:win").await;
                    let (_, live) = d.get_json("/v1/schedules/win/overrides").await;
                    for o in live.as_array().unwrap() {
                        let path =
                            format!("/v1/schedules/win/overrides/{}", o["id"].as_str().unwrap());
                        d.req(Method::DELETE, &path, &d.admin).send().await.unwrap();
                    }
                    self.cancel_all().await;
                }
                came
            }
            (Op::EndOverride, _) => self.rest(who, Method::DELETE, x, None).await,
            (Op::ReadHooks, _) => self.rest(who, Method::GET, "/v1/sns/hooks/h", None).await,
            (Op::SaveHook, Door::Sqs) => {
                let came = self
                    .rest(
                        who,
                        Method::PUT,
                        "/v1/sns/hooks/via-sqs",
                        Some(self.hook(topic)),
                    )
                    .await;
                if matches!(came, Came::Allowed) {
                    // The intake hands a message to the hook as saved.
                    self.send_sqs(&common::signed_alarm(topic, x, &self.instance))
                        .await;
                    self.job_by("sqs:matrix").await;
                    d.req(Method::DELETE, "/v1/sns/hooks/via-sqs", &d.admin)
                        .send()
                        .await
                        .unwrap();
                    self.cancel_all().await;
                } else {
                    let (s, _) = d.get_json("/v1/sns/hooks/via-sqs").await;
                    assert_eq!(s, 404, "a refused hook is not saved, so takes no message");
                }
                came
            }
            (Op::SaveHook, _) => {
                let came = self
                    .rest(
                        who,
                        Method::PUT,
                        &format!("/v1/sns/hooks/{x}"),
                        Some(self.hook(topic)),
                    )
                    .await;
                let r = d
                    .http
                    .post(format!("{}/v1/sns/{x}", d.url))
                    .header("content-type", "text/plain")
                    .body(common::signed_alarm(
                        topic,
                        &format!("{x}-m"),
                        &self.instance,
                    ))
                    .send()
                    .await
                    .unwrap();
                match came {
                    Came::Allowed => {
                        assert_eq!(r.status(), 200, "the hook as saved takes the alarm");
                        self.job_by(&format!("sns:{x}")).await;
                        self.cancel_all().await;
                    }
                    Came::Denied(_) => assert_eq!(r.status(), 404, "a refused hook is not saved"),
                }
                came
            }
            (Op::DeleteHook, _) => {
                self.rest(who, Method::DELETE, &format!("/v1/sns/hooks/{x}"), None)
                    .await
            }
            (Op::ReadDeliveries, Door::Rest) => {
                self.rest(who, Method::GET, "/v1/sns/deliveries", None)
                    .await
            }
            (Op::ReadDeliveries, _) => self.ui(who, Method::GET, "/ui/sns", &[]).await,
            (Op::ListTokens, Door::Rest) => self.rest(who, Method::GET, "/v1/tokens", None).await,
            (Op::ListTokens, _) => self.ui(who, Method::GET, "/ui/tokens", &[]).await,
            (Op::CreateToken, Door::Rest) => {
                let t = json!({"name": x, "role": "viewer"});
                self.rest(who, Method::POST, "/v1/tokens", Some(t)).await
            }
            (Op::CreateToken, _) => {
                self.ui(
                    who,
                    Method::POST,
                    "/ui/tokens",
                    &[("name", x), ("role", "viewer")],
                )
                .await
            }
            (Op::RevokeToken, Door::Rest) => {
                self.rest(who, Method::DELETE, &format!("/v1/tokens/{x}"), None)
                    .await
            }
            (Op::RevokeToken, _) => {
                self.ui(who, Method::POST, &format!("/ui/tokens/{x}/revoke"), &[])
                    .await
            }
            (Op::ReadAudit, _) => self.rest(who, Method::GET, "/v1/audit", None).await,
            (Op::ReadCatalog, _) => self.rest(who, Method::GET, "/v1/catalog", None).await,
            (Op::SeeSecrets, _) => {
                // Answered to everyone; the secret only to those who may see it.
                let r = match door {
                    Door::Rest => d.req(Method::GET, "/v1/templates/secret", &who.token),
                    _ => common::no_redirects()
                        .get(format!("{}/ui/templates/secret", d.url))
                        .header("cookie", &who.session.0),
                };
                let text = r.send().await.unwrap().text().await.unwrap();
                if text.contains(SECRET) {
                    Came::Allowed
                } else {
                    assert!(
                        text.contains("&lt;redacted, sha256:")
                            || text.contains("<redacted, sha256:"),
                        "{text}"
                    );
                    Came::Denied(text)
                }
            }
        }
    }

    async fn send_sqs(&self, body: &str) {
        aws_sdk_sqs::Client::new(&self.moto.conf().await)
            .send_message()
            .queue_url(&self.queue)
            .message_body(body)
            .send()
            .await
            .unwrap();
    }

    /// Cancels every queued job (what unattended doors queued), so the window's enforcement and
    /// the snapshot stay small.
    async fn cancel_all(&self) {
        let (_, page) = self.d.get_json("/v1/jobs?state=queued&limit=500").await;
        for j in page["jobs"].as_array().unwrap() {
            let path = format!("/v1/jobs/{}/cancel", j["id"].as_str().unwrap());
            self.d
                .req(Method::POST, &path, &self.d.admin)
                .send()
                .await
                .unwrap();
        }
    }
}

/// The doors that offer `op` (every operation of the table needs an arm in [`Matrix::cell`]: a
/// new one without a way to exercise it does not compile).
fn doors_of(op: Op) -> &'static [Door] {
    use Door::*;
    match op {
        Op::ReadJobs | Op::Cancel => &[Rest, Cli, Dashboard],
        Op::Submit => &[Rest, Cli],
        Op::Rerun => &[Dashboard],
        Op::ReadTemplates | Op::SeeSecrets | Op::ReadDeliveries => &[Rest, Dashboard],
        Op::RunTemplate => &[Rest, Cli, Dashboard],
        Op::ReadSchedules | Op::PauseSchedule => &[Rest, Cli],
        Op::SaveSchedule => &[Schedule],
        Op::AddOverride => &[Window],
        Op::SaveHook => &[Sns, Sqs],
        Op::ListTokens | Op::CreateToken | Op::RevokeToken => &[Rest, Dashboard],
        _ => &[Rest],
    }
}

const SECRET: &str = "hunter2-matrix-secret";

/// The office-hours window every override cell acts on: open now (for two hours), enforced every
/// second, over the matrix's instance.
fn open_window(instance: &str) -> Value {
    let now = chrono::Utc::now();
    let hm = |t: chrono::DateTime<chrono::Utc>| t.format("%H:%M").to_string();
    json!({"window": {"start": hm(now - chrono::Duration::minutes(30)),
        "stop": hm(now + chrono::Duration::hours(2)), "days": "*", "time_zone": "UTC"},
        "targets": {"instance_ids": [instance]}, "enforce": true, "interval": "1s"})
}

async fn make_token(d: &Daemon, name: &str, role: Role, scoped: bool) -> String {
    let scopes = if scoped {
        json!({"accounts": ["other"], "actions": ["describe_instances"], "templates": ["elsewhere"]})
    } else {
        json!({})
    };
    let r = d
        .req(Method::POST, "/v1/tokens", &d.admin)
        .json(&json!({"name": name, "role": role.as_str(), "scopes": scopes}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    r.json::<Value>().await.unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The matrix: see the module docs.
#[tokio::test]
async fn every_operation_on_every_door_for_every_role_and_scope() {
    let moto = Moto::start().await;
    let instance = moto.launch(1, &[("Matrix", "yes")]).await.remove(0);
    let queue = moto.queue("matrix", &[]).await;
    let certs = common::sns_cert_dir();
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        workers: 0,
        extra: format!(
            "\n[accounts.other]\nregion = \"us-east-1\"\nendpoint_url = \"{m}\"\n\n[sns]\ncert_dir = \"{c}\"\n\n[sqs.matrix]\nqueue_url = \"{queue}\"\nhook = \"via-sqs\"\nwait = \"1s\"\n",
            m = moto.url,
            c = certs.path().display()
        ),
        ..Default::default()
    })
    .await;
    let m = Matrix {
        d,
        moto,
        instance,
        queue,
        n: std::cell::Cell::new(0),
    };
    let d = &m.d;
    // What the cells act on, saved by the admin.
    m.admin_put(
        "/v1/templates/tpl",
        json!({"spec": {"action": "stop_instances",
        "targets": {"instance_ids": [m.instance]}}}),
    )
    .await;
    m.admin_put(
        "/v1/templates/secret",
        json!({"spec": {"action": "run_instances", "dry_run": true,
        "params": {"image_id": "ami-12345678", "instance_type": "t3.micro", "user_data": SECRET}}}),
    )
    .await;
    m.admin_put("/v1/schedules/win", open_window(&m.instance))
        .await;
    m.admin_put(
        "/v1/sns/hooks/h",
        m.hook("arn:aws:sns:us-east-1:123456789012:other"),
    )
    .await;
    let mut people = Vec::new();
    for role in [Role::Viewer, Role::Operator, Role::Admin] {
        for scoped in [false, true] {
            let name = format!("m-{role}{}", if scoped { "-scoped" } else { "" });
            let token = make_token(d, &name, role, scoped).await;
            let session = sign_in(d, &token).await;
            people.push(Who {
                role,
                scoped,
                name,
                token,
                session,
            });
        }
    }
    let mut cells = 0;
    let mut wrong = Vec::new();
    for rule in TABLE {
        for door in doors_of(rule.op) {
            for who in &people {
                let allowed = who.role >= rule.role && (rule.scoped == Scoped::No || !who.scoped);
                let x = m.setup(rule.op).await;
                let before = snapshot(d).await;
                let came = m.cell(rule.op, *door, who, &x).await;
                cells += 1;
                match (&came, allowed) {
                    (Came::Allowed, true) => {}
                    (Came::Denied(_), false) => {
                        let after = snapshot(d).await;
                        if after != before {
                            wrong.push(format!(
                                "{:?} by {} through {door:?} was denied but changed {before} into {after}",
                                rule.op, who.name
                            ));
                        }
                    }
                    (Came::Denied(why), true) => wrong.push(format!(
                        "{:?} by {} through {door:?}: expected allowed, denied: {why}",
                        rule.op, who.name
                    )),
                    (Came::Allowed, false) => wrong.push(format!(
                        "{:?} by {} through {door:?}: expected denied, allowed",
                        rule.op, who.name
                    )),
                }
                m.cleanup(rule.op, &x).await;
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {cells} cells wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    let doors: std::collections::BTreeSet<String> = TABLE
        .iter()
        .flat_map(|r| doors_of(r.op))
        .map(|d| format!("{d:?}"))
        .collect();
    assert_eq!(doors.len(), 7, "every door is tried: {doors:?}");
    assert_eq!(
        cells,
        TABLE
            .iter()
            .map(|r| doors_of(r.op).len() * 6)
            .sum::<usize>()
    );
}

/// Config for a daemon with the SNS test certificate: `extra` appended.
fn with_certs(certs: &Path, extra: &str) -> String {
    format!("\n[sns]\ncert_dir = \"{}\"\n{extra}", certs.display())
}

/// The redaction test: see the module docs.
#[tokio::test]
async fn a_secret_in_user_data_reaches_no_viewer_anywhere() {
    let certs = common::sns_cert_dir();
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        extra: with_certs(certs.path(), ""),
        ..Default::default()
    })
    .await;
    let secret = "s3cret-Zq9-viewer-must-not-see";
    let run = json!({"action": "run_instances", "dry_run": true,
        "params": {"image_id": "ami-12345678", "instance_type": "t3.micro", "user_data": secret}});
    let job = d.submit(&run).await;
    let workflow = json!({"action": "workflow", "steps": [
        {"action": "run_instances", "dry_run": true, "params": {"image_id": "ami-12345678",
            "instance_type": "t3.micro", "user_data": secret}}]});
    let flow = d.submit(&workflow).await;
    let put = |path: &'static str, body: Value| {
        let d = &d;
        async move {
            let r = d
                .req(Method::PUT, path, &d.admin)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_success(),
                "{path}: {}",
                r.text().await.unwrap()
            );
        }
    };
    put("/v1/templates/plain", json!({"spec": run})).await;
    put(
        "/v1/templates/param",
        json!({"spec": {"action": "run_instances", "dry_run": true,
        "params": {"image_id": "ami-12345678", "instance_type": "t3.micro", "user_data": "${ud}"}},
        "parameters": {"ud": {"type": "string", "default": secret}}}),
    )
    .await;
    put(
        "/v1/schedules/nightly",
        json!({"cron": "0 3 * * *", "job": run}),
    )
    .await;
    put(
        "/v1/schedules/by-template",
        json!({"cron": "0 3 * * *", "template": "param",
        "parameters": {"ud": secret}}),
    )
    .await;
    put(
        "/v1/sns/hooks/launch",
        json!({"topics": ["arn:aws:sns:us-east-1:123456789012:t"],
        "rules": [{"name": "r", "job": run}, {"name": "t", "template": "param",
            "parameters": {"ud": secret}}]}),
    )
    .await;
    // The admin, who edits them, sees the documents' secrets; a job's, nobody.
    let (_, t) = d.get_json("/v1/templates/plain").await;
    assert_eq!(t["template"]["spec"]["params"]["user_data"], secret);
    assert!(!d.text(&format!("/v1/jobs/{job}")).await.contains(secret));

    let viewer = common::create_token(&d.config, "viewer", "looker");
    let operator = common::create_token(&d.config, "operator", "runner");
    for token in [&viewer, &operator] {
        let get = |path: String| {
            let (d, token) = (&d, token.clone());
            async move {
                d.req(Method::GET, &path, &token)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap()
            }
        };
        let mut answers = Vec::new();
        for path in [
            format!("/v1/jobs/{job}"),
            format!("/v1/jobs/{flow}"),
            "/v1/jobs?limit=100".into(),
            format!("/v1/jobs/{job}/report"),
            format!("/v1/jobs/{job}/outputs"),
            format!("/v1/jobs/{job}/outputs/env"),
            "/v1/templates".into(),
            "/v1/templates/plain".into(),
            "/v1/templates/param".into(),
            "/v1/schedules".into(),
            "/v1/schedules/nightly".into(),
            "/v1/schedules/by-template".into(),
            "/v1/sns/hooks".into(),
            "/v1/sns/hooks/launch".into(),
        ] {
            let text = get(path.clone()).await;
            assert!(!text.is_empty(), "{path}");
            answers.push((path, text));
        }
        // The event stream (it stays open while the job is queued): its first events.
        let mut r = d
            .req(Method::GET, &format!("/v1/jobs/{job}/events"), token)
            .send()
            .await
            .unwrap();
        let first = tokio::time::timeout(Duration::from_secs(5), r.chunk()).await;
        let first = first.ok().and_then(|c| c.ok().flatten()).expect("an event");
        answers.push((
            "events".into(),
            String::from_utf8_lossy(&first).into_owned(),
        ));
        let (cookie, _) = sign_in(&d, token).await;
        for path in [
            "/ui/".to_string(),
            "/ui/jobs".into(),
            format!("/ui/jobs/{job}"),
            format!("/ui/jobs/{flow}"),
            format!("/ui/jobs/{job}/live"),
            "/ui/templates".into(),
            "/ui/templates/plain".into(),
            "/ui/templates/param".into(),
        ] {
            let r = common::no_redirects()
                .get(format!("{}{path}", d.url))
                .header("cookie", &cookie)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            answers.push((path, r.text().await.unwrap()));
        }
        // Searching for any part of it finds nothing: no yes/no oracle (finding 1).
        for part in ["s3cret", "Zq9", "viewer-must", "user_data"] {
            for path in [format!("/ui/jobs?q={part}")] {
                let r = common::no_redirects()
                    .get(format!("{}{path}", d.url))
                    .header("cookie", &cookie)
                    .send()
                    .await
                    .unwrap();
                let html = r.text().await.unwrap();
                assert!(
                    !html.contains(&job) && !html.contains(&flow),
                    "{path} found the job"
                );
            }
        }
        let r = common::no_redirects()
            .get(format!("{}/ui/jobs?q=t3.micro", d.url))
            .header("cookie", &cookie)
            .send()
            .await
            .unwrap();
        assert!(
            r.text().await.unwrap().contains(&job),
            "the rest is searched"
        );
        for (path, text) in &answers {
            assert!(!text.contains(secret), "{path} shows the secret:\n{text}");
            assert!(!text.contains("Zq9"), "{path} shows part of the secret");
        }
        // Every secret shows as its digest, so two values can still be told apart.
        let tpl = &answers
            .iter()
            .find(|(p, _)| p == "/v1/templates/param")
            .unwrap()
            .1;
        let tpl: Value = serde_json::from_str(tpl).unwrap();
        assert!(tpl["template"]["parameters"]["ud"]["default"]
            .as_str()
            .unwrap()
            .starts_with("<redacted, sha256:"));
    }
    // A run of the template with a secret default from the dashboard's form keeps the secret
    // (the form leaves the field empty; the saved default is used), and shows it to nobody.
    let (cookie, csrf) = sign_in(&d, &operator).await;
    let r = common::no_redirects()
        .post(format!("{}/ui/templates/param/run", d.url))
        .header("cookie", &cookie)
        .form(&[("csrf", csrf.as_str()), ("p.ud", "")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "{}", r.text().await.unwrap());
    assert!(!d.log().contains(secret), "the log never carries it");
    let mut db = std::fs::read(d.dir.join("ec2jobd.db")).unwrap();
    db.extend(std::fs::read(d.dir.join("ec2jobd.db-wal")).unwrap_or_default());
    assert!(
        String::from_utf8_lossy(&db).contains(secret),
        "it is stored (and used) all the same"
    );
    let (_, page) = d.get_json("/v1/jobs?limit=1").await;
    let digest = page["jobs"][0]["spec"]["params"]["user_data"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, first) = d.get_json(&format!("/v1/jobs/{job}")).await;
    assert_eq!(
        first["spec"]["params"]["user_data"].as_str().unwrap(),
        digest,
        "the same secret, the same digest: the form's run used the saved value"
    );
}

async fn status_and_body(r: reqwest::RequestBuilder) -> (u16, Value) {
    let r = r.send().await.unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// Findings 3 and 5: the scopes hold on every operation, compared with what it will run. A token
/// scoped to `describe_instances` cannot stop an instance through a window's override; one scoped
/// to a template cannot submit a spec of its own; one scoped to an action cannot cancel another
/// action's job; a scoped admin can neither mint a broader token nor save a schedule that runs
/// what it may not. Each refusal stores nothing.
#[tokio::test]
async fn scopes_hold_on_overrides_cancels_tokens_and_what_is_saved() {
    let moto = Moto::start().await;
    let instance = moto.launch(1, &[]).await.remove(0);
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        workers: 0,
        ..Default::default()
    })
    .await;
    let r = d
        .req(Method::PUT, "/v1/schedules/office", &d.admin)
        .json(&open_window(&instance))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let token = |name: &'static str, role: &'static str, scopes: Value| {
        let d = &d;
        async move {
            let r = d
                .req(Method::POST, "/v1/tokens", &d.admin)
                .json(&json!({"name": name, "role": role, "scopes": scopes}))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 201);
            r.json::<Value>().await.unwrap()["token"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let describer = token(
        "describer",
        "operator",
        json!({"actions": ["describe_instances"]}),
    )
    .await;
    let restarter = token(
        "restarter",
        "operator",
        json!({"templates": ["restart-web"]}),
    )
    .await;
    let boss = token(
        "boss",
        "admin",
        json!({"actions": ["describe_instances", "stop_instances"]}),
    )
    .await;
    let before = snapshot(&d).await;

    // Finding 3: the override would stop the instance: stop_instances is not the token's.
    let until = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let (s, p) = status_and_body(
        d.req(Method::POST, "/v1/schedules/office/overrides", &describer)
            .json(&json!({"instance_ids": [instance], "state": "stopped", "until": until})),
    )
    .await;
    assert_eq!(
        (s, p["code"].as_str(), p["field"].as_str()),
        (403, Some("out_of_scope"), Some("action")),
        "{p}"
    );
    // Finding 5: a template-scoped token runs its templates only.
    let (s, p) =
        status_and_body(d.req(Method::POST, "/v1/jobs", &restarter).json(
            &json!({"action": "terminate_instances", "targets": {"instance_ids": [instance]}}),
        ))
        .await;
    assert_eq!((s, p["field"].as_str()), (403, Some("template")), "{p}");
    // ... an action-scoped token cancels jobs of its actions only ...
    let reboot = d
        .submit(&json!({"action": "reboot_instances", "targets": {"instance_ids": [instance]}}))
        .await;
    let after_setup = snapshot(&d).await;
    let (s, p) = status_and_body(d.req(
        Method::POST,
        &format!("/v1/jobs/{reboot}/cancel"),
        &describer,
    ))
    .await;
    assert_eq!((s, p["field"].as_str()), (403, Some("action")), "{p}");
    // ... a scoped admin mints no token broader than itself ...
    let (s, p) = status_and_body(
        d.req(Method::POST, "/v1/tokens", &boss)
            .json(&json!({"name": "wide", "role": "admin"})),
    )
    .await;
    assert_eq!(
        (s, p["code"].as_str(), p["field"].as_str()),
        (403, Some("broader_than_creator"), Some("scopes.actions")),
        "{p}"
    );
    // ... and saves no schedule (or template, or hook) that runs what it may not.
    let (s, p) = status_and_body(d.req(Method::PUT, "/v1/schedules/doom", &boss).json(
        &json!({"cron": "* * * * * *", "job": {"action": "terminate_instances",
            "targets": {"instance_ids": [instance]}}}),
    ))
    .await;
    assert_eq!((s, p["field"].as_str()), (403, Some("job.action")), "{p}");
    let (s, _) = status_and_body(d.req(Method::PUT, "/v1/templates/doom", &boss)
        .json(&json!({"spec": {"action": "terminate_instances", "targets": {"instance_ids": [instance]}}}))).await;
    assert_eq!(s, 403);
    let (s, _) = status_and_body(d.req(Method::PUT, "/v1/sns/hooks/doom", &boss)
        .json(&json!({"topics": ["arn:aws:sns:us-east-1:123456789012:t"], "rules": [{"name": "r",
            "job": {"action": "terminate_instances", "targets": {"instance_ids": ["{instance_id}"]}}}]}))).await;
    assert_eq!(s, 403);
    assert_eq!(snapshot(&d).await, after_setup, "refusals store nothing");
    assert_ne!(before, after_setup);
    // Within their scopes they work: a narrower token, a schedule that stops.
    let (s, _) = status_and_body(d.req(Method::POST, "/v1/tokens", &boss).json(
        &json!({"name": "narrow", "role": "operator", "scopes": {"actions": ["stop_instances"]}}),
    ))
    .await;
    assert_eq!(s, 201);
    let (s, p) = status_and_body(d.req(Method::PUT, "/v1/schedules/ok", &boss).json(
        &json!({"cron": "0 3 * * *", "job": {"action": "stop_instances",
            "targets": {"instance_ids": [instance]}}}),
    ))
    .await;
    assert_eq!(s, 201, "{p}");
}

/// Finding 4: the idempotency keys the daemon uses for what it queues itself are not callers':
/// an operator cannot take a schedule firing's (or an alarm's) key ahead of it.
#[tokio::test]
async fn callers_cannot_take_the_daemons_own_idempotency_keys() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    let operator = common::create_token(&d.config, "operator", "op");
    let spec = json!({"action": "describe_instances", "targets": {"tags": "a=b"}});
    for key in [
        "schedule:nightly:2027-01-01T03:00:00+00:00",
        "sns:alarms:1234",
        "sqs:q:1",
        "window:office:x",
    ] {
        let (s, p) = status_and_body(
            d.req(Method::POST, "/v1/jobs", &operator)
                .header("Idempotency-Key", key)
                .json(&spec),
        )
        .await;
        assert_eq!(
            (s, p["code"].as_str(), p["field"].as_str()),
            (422, Some("reserved_key"), Some("Idempotency-Key")),
            "{key}: {p}"
        );
        let prefix = key.split(':').next().unwrap();
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains(&format!("`{prefix}:`")),
            "{p}"
        );
    }
    let (_, page) = d.get_json("/v1/jobs").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 0);
    let (s, _) = status_and_body(
        d.req(Method::POST, "/v1/jobs", &operator)
            .header("Idempotency-Key", "my-schedule:nightly")
            .json(&spec),
    )
    .await;
    assert_eq!(s, 202, "only the prefixes are kept");
}

/// Finding 6: schedule firings pass admission like every submission, and the places
/// `queue.reserved_for_priority` keeps still take an alarm's job when the schedule has filled
/// the rest.
#[tokio::test]
async fn schedules_are_admitted_and_alarms_keep_their_reserve() {
    let certs = common::sns_cert_dir();
    let topic = "arn:aws:sns:us-east-1:123456789012:alarms";
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        extra: with_certs(
            certs.path(),
            &format!(
                r#"
[sns.hooks.alarms]
topics = ["{topic}"]
[[sns.hooks.alarms.rules]]
name = "reboot"
job = {{ action = "reboot_instances", targets = {{ instance_ids = ["{{instance_id}}"] }} }}
[schedules.flood]
cron = "* * * * * *"
overlap = "queue"
[schedules.flood.job]
action = "describe_instances"
targets = {{ tags = {{ Env = "dev" }} }}
"#
            ),
        ),
        env: vec![
            ("EC2JOBD_QUEUE__MAX_QUEUED".into(), "5".into()),
            ("EC2JOBD_QUEUE__RESERVED_FOR_PRIORITY".into(), "2".into()),
        ],
        ..Default::default()
    })
    .await;
    // The schedule fills the three places it may take, then its firings are refused.
    let deadline = Instant::now() + MINUTE;
    while !d.log().contains("queue_full") && !d.log().contains("jobs are already queued") {
        assert!(
            Instant::now() < deadline,
            "no firing was refused:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, page) = d
        .get_json("/v1/jobs?created_by=schedule:flood&limit=100")
        .await;
    assert_eq!(
        page["jobs"].as_array().unwrap().len(),
        3,
        "max_queued 5 less the reserve of 2"
    );
    // An operator's submission is refused too; an alarm's job takes a reserved place.
    let spec = json!({"action": "describe_instances", "targets": {"tags": "a=b"}});
    assert_eq!(d.post_job(&d.admin, &spec).await.status(), 429);
    let alarm = common::signed_alarm(topic, "alarm-1", "i-0123456789abcdef0");
    let r = d
        .http
        .post(format!("{}/v1/sns/alarms", d.url))
        .header("content-type", "text/plain")
        .body(alarm)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let (_, page) = d.get_json("/v1/jobs?created_by=sns:alarms").await;
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(page["jobs"][0]["spec"]["priority"], 100);
}

/// Finding 7: a schedule whose firings are every second and whose 1,000 skipped days come first
/// is saved, listed and read at once (its next firing found day by day), and one that can never
/// fire is refused instead of saved with no next firing.
#[tokio::test]
async fn skipped_days_do_not_stall_the_daemon_and_never_firing_is_refused() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    let today = chrono::Utc::now().date_naive();
    let skip: Vec<String> = (0..1000)
        .map(|i| (today + chrono::Duration::days(i)).to_string())
        .collect();
    let body = json!({"cron": "* * * * * *", "skip_dates": skip,
        "job": {"action": "describe_instances", "targets": {"tags": "a=b"}}});
    // Each answer within 20 s (it took about a minute, and stalled every other request).
    let within = |r: reqwest::RequestBuilder| async move {
        tokio::time::timeout(Duration::from_secs(20), status_and_body(r))
            .await
            .expect("answered in time")
    };
    let (s, p) = within(
        d.req(Method::PUT, "/v1/schedules/busy", &d.admin)
            .json(&body),
    )
    .await;
    assert_eq!(s, 201, "{p}");
    let first = p["next"][0]["at"].as_str().unwrap();
    assert!(
        first.starts_with(&(today + chrono::Duration::days(1000)).to_string()),
        "{first}"
    );
    let (s, list) = within(d.req(Method::GET, "/v1/schedules", &d.admin)).await;
    assert_eq!((s, list.as_array().unwrap().len()), (200, 1));
    let (s, _) = within(d.req(Method::GET, "/healthz", &d.admin)).await;
    assert_eq!(s, 200);
    for never in [
        json!({"cron": "0 0 31 2 *", "job": {"action": "describe_instances", "targets": {"tags": "a=b"}}}),
        json!({"cron": "0 3 * * *", "active_until": "2020-01-01T00:00:00Z",
            "job": {"action": "describe_instances", "targets": {"tags": "a=b"}}}),
    ] {
        let (s, p) = within(
            d.req(Method::PUT, "/v1/schedules/never", &d.admin)
                .json(&never),
        )
        .await;
        assert_eq!(
            (s, p["code"].as_str()),
            (422, Some("invalid_schedule")),
            "{p}"
        );
        assert!(p["detail"].as_str().unwrap().contains("never fires"), "{p}");
    }
    let (s, _) = d.get_json("/v1/schedules/never").await;
    assert_eq!(s, 404);
}

/// Finding 8: a database password, in the URL's user info or as `?password=`, reaches no log
/// line, error, `doctor` line or CLI note; `token create` says it created a database only when it
/// did, naming where the value came from.
#[tokio::test]
async fn database_passwords_are_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let Some(url) = common::postgres_database() else {
        panic!("TEST_POSTGRES_URL is not set: run scripts/test, which starts a PostgreSQL server");
    };
    let sep = if url.contains('?') { '&' } else { '?' };
    let url = format!("{url}{sep}password=hunter2-db");
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        database_url: Some(url.clone()),
        ..Default::default()
    })
    .await;
    // The start-up line follows the listening line printed on stdout.
    let deadline = Instant::now() + MINUTE;
    while !d.log().contains("ec2jobd started") {
        assert!(Instant::now() < deadline, "{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let config = d.config.to_str().unwrap().to_string();
    let (_, out, err) = common::run_cli(&[
        "token", "create", "--role", "viewer", "--name", "v", "--config", &config,
    ]);
    assert!(!err.contains("created a new database"), "it existed: {err}");
    let (_, dout, derr) = common::run_cli(&["doctor", "--config", &config]);
    // A URL that does not connect: the error names it without its password.
    let bad = "postgres://app:hunter2-db@127.0.0.1:9/nowhere?password=hunter2-db";
    let m = std::process::Command::new(common::bin())
        .args(["migrate", "--config", &config])
        .env("EC2JOBD_DATABASE", bad)
        .output()
        .unwrap();
    let merr = String::from_utf8_lossy(&m.stderr).into_owned();
    assert!(!m.status.success());
    assert!(merr.contains("app:***@127.0.0.1:9"), "{merr}");
    // A new SQLite database from the environment names the environment, not the file.
    let db = dir.path().join("new.db");
    let out2 = std::process::Command::new(common::bin())
        .args([
            "token", "create", "--role", "viewer", "--name", "w", "--config", &config,
        ])
        .env("EC2JOBD_DATABASE", format!("sqlite://{}", db.display()))
        .output()
        .unwrap();
    let err2 = String::from_utf8_lossy(&out2.stderr);
    assert!(
        err2.contains("created a new database") && err2.contains("EC2JOBD_DATABASE"),
        "{err2}"
    );
    for text in [d.log(), out, err, dout, derr, merr, err2.into_owned()] {
        assert!(!text.contains("hunter2"), "a password shown:\n{text}");
    }
}

/// Finding 9: a sign-in posted from another site is refused (login CSRF), with nothing stored
/// and no cookie; the dashboard's own form signs in.
#[tokio::test]
async fn sign_in_from_another_site_is_refused() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    let viewer = common::create_token(&d.config, "viewer", "v");
    let host = d.url.trim_start_matches("http://").to_string();
    for (name, value) in [
        ("origin", "https://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
    ] {
        let r = common::no_redirects()
            .post(format!("{}/ui/signin", d.url))
            .header(name, value)
            .form(&[("token", viewer.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{name}: {value}");
        assert!(!r.headers().contains_key("set-cookie"), "{name}: {value}");
    }
    for (name, value) in [
        ("origin", format!("http://{host}")),
        ("sec-fetch-site", "same-origin".to_string()),
    ] {
        let r = common::no_redirects()
            .post(format!("{}/ui/signin", d.url))
            .header(name, value.as_str())
            .form(&[("token", viewer.as_str())])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 303, "{name}: {value}");
        assert!(r.headers().contains_key("set-cookie"));
    }
}

/// Also seen: `/docs` is served with its own CSP and frame protection, its script is not inline
/// and keeps no authorization; a job's `notify.topic_arn` (or a hook's) outside
/// `notify.allowed_topics` is refused.
#[tokio::test]
async fn docs_are_framed_by_nobody_and_notifications_go_to_allowed_topics() {
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        extra: "\n[notify]\nallowed_topics = [\"arn:aws:sns:us-east-1:123456789012:ops-*\"]\n"
            .into(),
        ..Default::default()
    })
    .await;
    let r = d.http.get(format!("{}/docs", d.url)).send().await.unwrap();
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        csp.contains("script-src 'self'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    let html = r.text().await.unwrap();
    assert!(!html.contains("<script>"), "no inline script: {html}");
    let js = d
        .http
        .get(format!("{}/docs/init.js", d.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(js.contains("persistAuthorization: false"), "{js}");
    let job = |topic: &str| {
        json!({"action": "describe_instances", "targets": {"tags": "a=b"},
        "notify": {"topic_arn": topic}})
    };
    let (s, p) = status_and_body(
        d.req(Method::POST, "/v1/jobs", &d.admin)
            .json(&job("arn:aws:sns:us-east-1:123456789012:billing")),
    )
    .await;
    assert_eq!(
        (s, p["code"].as_str(), p["field"].as_str()),
        (422, Some("topic_not_allowed"), Some("notify.topic_arn")),
        "{p}"
    );
    let (s, _) = status_and_body(
        d.req(Method::POST, "/v1/jobs", &d.admin)
            .json(&job("arn:aws:sns:us-east-1:123456789012:ops-alerts")),
    )
    .await;
    assert_eq!(s, 202);
    let (s, p) = status_and_body(
        d.req(Method::PUT, "/v1/sns/hooks/x", &d.admin)
            .json(&json!({"topics": ["arn:aws:sns:us-east-1:123456789012:t"],
            "notify": {"topic_arn": "arn:aws:sns:us-east-1:123456789012:billing"}})),
    )
    .await;
    assert_eq!(
        (s, p["field"].as_str()),
        (422, Some("notify.topic_arn")),
        "{p}"
    );
}

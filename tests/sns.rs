//! SNS end to end with moto: a topic, an HTTP subscription to the daemon's hook, a CloudWatch alarm
//! published for a moto instance → the rule's reboot job runs and waits for 2/2 checks; SNS's
//! at-least-once redelivery of the same message gives one job; forged messages are refused and
//! recorded.
//!
//! How the test trusts moto's signatures honestly: moto signs with a self-signed certificate at
//! `https://sns.<region>.amazonaws.com/SimpleNotificationService-<id>.pem` that only moto itself
//! serves. The subscription points at a relay in this test; before passing each message on to the
//! daemon, the relay fetches that certificate from moto and pre-seeds it into the daemon's
//! `sns.cert_dir` — the same directory air-gapped hosts use. The daemon's verification is unchanged:
//! it checks the signature against that certificate, and has no switch to skip it.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Daemon, DaemonOpts, Moto};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const MINUTE: Duration = Duration::from_secs(60);

async fn sns(moto: &Moto) -> aws_sdk_sns::Client {
    aws_sdk_sns::Client::new(&moto.conf().await)
}

/// What the relay saw: each SNS body, and the daemon's answers to each of its two deliveries.
#[derive(Default)]
struct Seen {
    bodies: Vec<String>,
    answers: Vec<(u16, String)>,
}

/// The relay: an HTTP endpoint moto posts to. It pre-seeds the signing certificate, then delivers
/// the message to the daemon twice, as SNS may.
async fn relay(
    moto_url: String,
    daemon_url: String,
    cert_dir: PathBuf,
) -> (String, Arc<Mutex<Seen>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Seen::default()));
    let s = seen.clone();
    tokio::spawn(async move {
        let http = reqwest::Client::new();
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let (head_end, len) = loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break (0, 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..p]).to_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    break (p + 4, len);
                }
            };
            if head_end == 0 {
                continue;
            }
            while buf.len() < head_end + len {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
            let msg: Value = serde_json::from_str(&body).unwrap_or_default();
            if let Some(cert_url) = msg["SigningCertURL"].as_str() {
                let file = cert_url.rsplit('/').next().unwrap().to_string();
                // moto serves its certificate only to requests addressed to SNS.
                let pem = http
                    .get(format!("{moto_url}/{file}"))
                    .header(
                        "Authorization",
                        "AWS4-HMAC-SHA256 Credential=testing/20261122/us-east-1/sns/aws4_request, SignedHeaders=host, Signature=x",
                    )
                    .send()
                    .await
                    .unwrap()
                    .bytes()
                    .await
                    .unwrap();
                std::fs::write(cert_dir.join(&file), &pem).unwrap();
            }
            s.lock().unwrap().bodies.push(body.clone());
            for _ in 0..2 {
                let r = http
                    .post(format!("{daemon_url}/v1/sns/alarms"))
                    .header("content-type", "text/plain; charset=UTF-8")
                    .header("x-amz-sns-message-type", msg["Type"].as_str().unwrap_or(""))
                    .body(body.clone())
                    .send()
                    .await
                    .unwrap();
                let status = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                s.lock().unwrap().answers.push((status, text));
            }
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
        }
    });
    (url, seen)
}

#[tokio::test]
async fn alarm_through_moto_sns_reboots_the_instance_once() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Name", "web")]).await;
    let client = sns(&moto).await;
    let topic = moto.topic("alarms").await;
    let certs = tempfile::tempdir().unwrap();
    let extra = format!(
        r#"
[sns]
cert_dir = "{dir}"
[sns.hooks.alarms]
topics = ["{topic}"]
[[sns.hooks.alarms.rules]]
name = "reboot-on-failed-checks"
alarm_name = "StatusCheckFailed-*"
namespace = "AWS/EC2"
dimensions = {{ InstanceId = "*" }}
job = {{ action = "reboot_instances", region = "{{region}}", targets = {{ instance_ids = ["{{instance_id}}"] }}, wait = {{ until = "status_ok", interval = "200ms", timeout = "1m" }} }}
"#,
        dir = certs.path().display(),
    );
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        extra,
        ..Default::default()
    })
    .await;
    let (relay_url, seen) =
        relay(moto.url.clone(), d.url.clone(), certs.path().to_path_buf()).await;
    client
        .subscribe()
        .topic_arn(&topic)
        .protocol("http")
        .endpoint(&relay_url)
        .send()
        .await
        .unwrap();
    let alarm = json!({
        "AlarmName": "StatusCheckFailed-web",
        "AlarmArn": format!("arn:aws:cloudwatch:us-east-1:123456789012:alarm:StatusCheckFailed-web"),
        "NewStateValue": "ALARM", "OldStateValue": "OK", "Region": "US East (N. Virginia)",
        "Trigger": {"Namespace": "AWS/EC2", "MetricName": "StatusCheckFailed",
                    "Dimensions": [{"name": "InstanceId", "value": ids[0]}]}
    });
    // No Subject: moto leaves it out of the string it signs, unlike AWS (the unit tests cover
    // signed subjects against the pinned test certificate).
    client
        .publish()
        .topic_arn(&topic)
        .message(alarm.to_string())
        .send()
        .await
        .unwrap();

    let answers = seen.lock().unwrap().answers.clone();
    assert_eq!(answers.len(), 2, "moto delivered once, the relay twice");
    let first: Value = serde_json::from_str(&answers[0].1).unwrap();
    let second: Value = serde_json::from_str(&answers[1].1).unwrap();
    assert_eq!(answers[0].0, 200, "{answers:?}\n{}", d.log());
    assert_eq!(first["outcome"], "accepted", "{first}");
    assert_eq!(second["outcome"], "duplicate", "{second}");
    assert_eq!(
        first["job_id"], second["job_id"],
        "one job for the redelivered message"
    );
    let job_id = first["job_id"].as_str().unwrap();
    let j = d.wait_final(job_id, MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["action"], "reboot_instances");
    assert_eq!(j["results"]["instances"][0]["instance_id"], ids[0].as_str());
    assert_eq!(j["results"]["instances"][0]["checks"], "2/2 checks passed");
    assert_eq!(
        d.metric("ec2jobd_ec2_calls_total{operation=\"RebootInstances\",outcome=\"ok\"}")
            .await,
        1.0
    );
    let (_, list) = d.get_json("/v1/jobs?action=reboot_instances").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);

    // A message no rule matches is recorded and answered 200, with no job.
    client
        .publish()
        .topic_arn(&topic)
        .message(json!({"AlarmName": "CPU-high", "NewStateValue": "ALARM"}).to_string())
        .send()
        .await
        .unwrap();
    let answers = seen.lock().unwrap().answers.clone();
    let outcome =
        |i: usize| serde_json::from_str::<Value>(&answers[i].1).unwrap()["outcome"].clone();
    assert_eq!(
        (outcome(2), outcome(3)),
        (json!("no_rule"), json!("duplicate"))
    );

    // A forged message (moto's body with the message changed) is refused with 403 and recorded.
    let mut forged: Value = serde_json::from_str(&seen.lock().unwrap().bodies[0]).unwrap();
    forged["Message"] = json!(alarm
        .to_string()
        .replace("StatusCheckFailed-web", "StatusCheckFailed-evil"));
    forged["MessageId"] = json!("forged-1");
    let r = d
        .http
        .post(format!("{}/v1/sns/alarms", d.url))
        .body(forged.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (s, page) = d.get_json("/v1/sns/deliveries").await;
    assert_eq!(s, 200);
    let outcomes: Vec<&str> = page["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(
        outcomes,
        vec!["rejected", "duplicate", "no_rule", "duplicate", "accepted"],
        "{page}"
    );
    let rejected = &page["deliveries"][0];
    assert!(
        rejected["reason"].as_str().unwrap().contains("signature"),
        "{rejected}"
    );
    let accepted = &page["deliveries"][4];
    assert_eq!(accepted["rule"], "reboot-on-failed-checks");
    assert_eq!(accepted["job_id"], job_id);

    // An unknown hook is 404; the deliveries list needs a token.
    let r = d
        .http
        .post(format!("{}/v1/sns/nope", d.url))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = d
        .http
        .get(format!("{}/v1/sns/deliveries", d.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test]
async fn job_outcomes_are_published_to_a_topic() {
    let moto = Moto::start().await;
    moto.launch(1, &[("Group", "notify")]).await;
    let client = sns(&moto).await;
    let topic = moto.topic("results").await;
    let (url, got) = common::json_sink().await;
    client
        .subscribe()
        .topic_arn(&topic)
        .protocol("http")
        .endpoint(&url)
        .send()
        .await
        .unwrap();
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        extra: "[notify]\nattempts = 2\nbackoff_base = \"50ms\"\n".into(),
        ..Default::default()
    })
    .await;
    let spec = |on: &str, topic: &str| {
        json!({"action": "describe_instances", "targets": {"tags": "Group=notify"},
            "notify": {"topic_arn": topic, "on": [on], "subject": "nightly check"}})
    };
    let first = d.submit(&spec("succeeded", &topic)).await;
    assert_eq!(d.wait_final(&first, MINUTE).await["state"], "succeeded");
    let wait_for = |n: usize| {
        let got = got.clone();
        async move {
            let deadline = std::time::Instant::now() + MINUTE;
            while got.lock().unwrap().len() < n {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no notification arrived"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    wait_for(1).await;
    let m = got.lock().unwrap()[0].clone();
    assert_eq!(m["Type"], "Notification");
    assert_eq!(m["Subject"], "nightly check");
    // HTTP subscribers get the JSON document: the text report and the job.
    let doc: Value = serde_json::from_str(m["Message"].as_str().unwrap()).unwrap();
    let text = doc["report"].as_str().unwrap();
    assert!(
        text.contains(&format!(
            "ec2jobd job {first} - describe_instances - succeeded"
        )),
        "{text}"
    );
    assert!(
        text.contains("Summary") && text.contains("described 1 instance"),
        "{text}"
    );
    assert_eq!(doc["job"]["id"], first.as_str());
    assert_eq!(doc["job"]["state"], "succeeded");

    // `on` is honoured: a succeeded job that asked only for failures publishes nothing (it ends
    // before the next job starts, so its message would have arrived first).
    let quiet = d.submit(&spec("failed", &topic)).await;
    assert_eq!(d.wait_final(&quiet, MINUTE).await["state"], "succeeded");
    let third = d.submit(&spec("succeeded", &topic)).await;
    d.wait_final(&third, MINUTE).await;
    wait_for(2).await;
    let ids: Vec<String> = got
        .lock()
        .unwrap()
        .iter()
        .map(|m| {
            let doc: Value = serde_json::from_str(m["Message"].as_str().unwrap()).unwrap();
            doc["job"]["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids, vec![first.clone(), third.clone()]);

    // Events record it; a topic that does not exist is retried, recorded, and the job still succeeded.
    let events = |id: String| {
        let d = &d;
        async move { d.text(&format!("/v1/jobs/{id}/events")).await }
    };
    assert!(events(first.clone()).await.contains("event: notified"));
    let missing = format!("{topic}-missing");
    let bad = d.submit(&spec("succeeded", &missing)).await;
    assert_eq!(d.wait_final(&bad, MINUTE).await["state"], "succeeded");
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let text = events(bad.clone()).await;
        if text.contains("notify_failed") {
            assert!(text.contains("after 2 attempt"), "{text}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no notify_failed event: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        d.job(&bad).await["state"],
        "succeeded",
        "publishing never changes the outcome"
    );
}

/// A SubscriptionConfirmation signed with the pinned test key (its certificate pre-seeded in
/// `sns.cert_dir`, as an air-gapped host would) is confirmed through the SNS API — the proxy in
/// front of moto sees ConfirmSubscription with the token — and never by fetching SubscribeURL. The
/// hook demands basic auth: without it, 401 and nothing else happens.
#[tokio::test]
async fn subscription_confirmation_goes_through_the_api_behind_basic_auth() {
    let moto = Moto::start().await;
    let proxy = common::proxy::FaultProxy::start(&moto.url, 1).await;
    let certs = common::sns_cert_dir();
    let topic = moto.topic("alarms").await;
    let topic = topic.as_str();
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        extra: format!(
            "[sns]\ncert_dir = \"{}\"\n[sns.hooks.alarms]\ntopics = [\"{topic}\"]\nbasic_auth_env = \"HOOK_AUTH\"\n",
            certs.path().display()
        ),
        env: vec![("HOOK_AUTH".into(), "sns:s3cret".into())],
        ..Default::default()
    })
    .await;
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let body = common::sns_signed(&[
        ("Message", "You have chosen to subscribe to the topic."),
        ("MessageId", "c0ffee00-0000-4000-8000-000000000001"),
        ("SubscribeURL", "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&TopicArn=x&Token=tok-42"),
        ("Timestamp", &now),
        ("Token", "tok-42"),
        ("TopicArn", topic),
        ("Type", "SubscriptionConfirmation"),
    ]);
    let post = |auth: Option<&str>| {
        let mut r = d
            .http
            .post(format!("{}/v1/sns/alarms", d.url))
            .header("x-amz-sns-message-type", "SubscriptionConfirmation")
            .body(body.clone());
        if let Some(a) = auth {
            r = r.basic_auth(a.split(':').next().unwrap(), a.split(':').nth(1));
        }
        r.send()
    };
    assert_eq!(post(None).await.unwrap().status(), 401);
    assert_eq!(post(Some("sns:wrong")).await.unwrap().status(), 401);
    assert_eq!(proxy.calls("ConfirmSubscription"), 0);
    let r = post(Some("sns:s3cret")).await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "{}\n{}",
        d.get_json("/v1/sns/deliveries").await.1,
        d.log()
    );
    assert_eq!(r.json::<Value>().await.unwrap()["outcome"], "confirmed");
    assert_eq!(proxy.calls("ConfirmSubscription"), 1);
    let sent = proxy.last_body("ConfirmSubscription");
    assert!(sent.contains("Token=tok-42"), "{sent}");
    let (_, page) = d.get_json("/v1/sns/deliveries").await;
    assert_eq!(page["deliveries"][0]["outcome"], "confirmed");
    assert_eq!(page["deliveries"][0]["kind"], "SubscriptionConfirmation");
}

/// Hooks managed over the API: admins create one (its rules checked: 422 naming the rule), a signed
/// EC2 state-change event delivered to it queues the rule's job, and deleting it makes the hook 404.
#[tokio::test]
async fn hooks_managed_over_the_api() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[]).await;
    let certs = common::sns_cert_dir();
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        extra: format!("[sns]\ncert_dir = \"{}\"\n", certs.path().display()),
        ..Default::default()
    })
    .await;
    let topic = "arn:aws:sns:us-east-1:123456789012:ec2-events";
    let hook = json!({"topics": [topic], "rules": [{"name": "restart-stopped", "instance_state": "stopped",
        "job": {"action": "describe_instances", "priority": 7, "targets": {"instance_ids": ["{instance_id}"]}}},
        {"name": "tag-running", "instance_state": "running", "template": "tag-it",
         "parameters": {"instance_id": "{instance_id}"}}]});
    // The second rule names a saved template.
    let r = d
        .req(reqwest::Method::PUT, "/v1/templates/tag-it", &d.admin)
        .json(&json!({"spec": {"action": "create_tags", "targets": {"instance_ids": ["${instance_id}"]},
            "params": {"tags": {"Seen": "running"}}}, "parameters": {"instance_id": {"type": "string"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let put = |token: String, body: Value| {
        let d = &d;
        async move {
            d.req(reqwest::Method::PUT, "/v1/sns/hooks/ec2-events", &token)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let operator = common::create_token(&d.config, "operator", "op");
    assert_eq!(put(operator, hook.clone()).await.status(), 403);
    let mut bad = hook.clone();
    bad["rules"][0]["job"]["targets"]["instance_ids"] = json!(["{hostname}"]);
    let r = put(d.admin.clone(), bad).await;
    assert_eq!(r.status(), 422);
    let p: Value = r.json().await.unwrap();
    assert_eq!(p["field"], "rules[0]", "{p}");
    assert!(p["detail"].as_str().unwrap().contains("{hostname}"), "{p}");
    assert_eq!(put(d.admin.clone(), hook.clone()).await.status(), 201);
    assert_eq!(put(d.admin.clone(), hook.clone()).await.status(), 200);
    let (_, list) = d.get_json("/v1/sns/hooks").await;
    assert_eq!(list[0]["name"], "ec2-events");
    assert_eq!(list[0]["source"], "api");

    let event =
        json!({"detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2",
        "region": "us-east-1", "account": "123456789012",
        "detail": {"instance-id": ids[0], "state": "stopped"}})
        .to_string();
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let body = common::sns_signed(&[
        ("Message", &event),
        ("MessageId", "e1"),
        ("Timestamp", &now),
        ("TopicArn", topic),
        ("Type", "Notification"),
    ]);
    let deliver = || {
        d.http
            .post(format!("{}/v1/sns/ec2-events", d.url))
            .body(body.clone())
            .send()
    };
    let r = deliver().await.unwrap();
    assert_eq!(r.status(), 200, "{}", d.log());
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["outcome"], "accepted", "{a}");
    let j = d.wait_final(a["job_id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(j["results"]["instances"][0]["instance_id"], ids[0].as_str());
    assert_eq!(j["spec"]["priority"], 7, "the rule's own priority");
    assert_eq!(j["created_by"], "sns:ec2-events", "queued by the hook");

    let running = event.replace("\"stopped\"", "\"running\"");
    let body2 = common::sns_signed(&[
        ("Message", &running),
        ("MessageId", "e2"),
        ("Timestamp", &now),
        ("TopicArn", topic),
        ("Type", "Notification"),
    ]);
    let r = d
        .http
        .post(format!("{}/v1/sns/ec2-events", d.url))
        .body(body2)
        .send()
        .await
        .unwrap();
    let a: Value = r.json().await.unwrap();
    assert_eq!(a["outcome"], "accepted", "{a}");
    let j = d.wait_final(a["job_id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(moto.tagged("Seen", "running").await, ids);
    assert_eq!(
        j["spec"]["priority"], 100,
        "sns.priority, as the template sets none"
    );

    let r = d
        .req(
            reqwest::Method::DELETE,
            "/v1/sns/hooks/ec2-events",
            &d.admin,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    assert_eq!(deliver().await.unwrap().status(), 404);
}

/// Notifications survive restarts: the job ends and enters the outbox in one transaction, the
/// daemon is killed while every publish still fails, and after the restart the outcome is
/// published exactly once (counted at the proxy as calls that reached moto).
#[tokio::test]
async fn a_notification_pending_at_kill_9_is_published_once_after_restart() {
    let moto = Moto::start().await;
    moto.launch(1, &[("Group", "outbox")]).await;
    let proxy = common::proxy::FaultProxy::start(&moto.url, 1).await;
    let topic = moto.topic("outbox").await;
    proxy.set(|f| f.error = Some(("Publish".into(), 500, "InternalError".into())));
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        extra: "[notify]\nattempts = 20\nbackoff_base = \"1s\"\nbackoff_max = \"1s\"\n".into(),
        ..Default::default()
    })
    .await;
    let id = d
        .submit(
            &json!({"action": "describe_instances", "targets": {"tags": "Group=outbox"},
            "notify": {"topic_arn": topic, "on": ["succeeded"]}}),
        )
        .await;
    assert_eq!(d.wait_final(&id, MINUTE).await["state"], "succeeded");
    let deadline = std::time::Instant::now() + MINUTE;
    while proxy.injected("Publish") < 2 {
        assert!(std::time::Instant::now() < deadline, "no publish was tried");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    d.kill9();
    assert_eq!(
        proxy.calls("Publish"),
        proxy.injected("Publish"),
        "nothing was published yet"
    );
    proxy.set(|f| f.error = None);
    d.spawn().await;
    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let events = d.text(&format!("/v1/jobs/{id}/events")).await;
        if events.contains("event: notified") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never notified: {events}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        proxy.calls("Publish") - proxy.injected("Publish"),
        1,
        "published exactly once"
    );
}

async fn sqs(moto: &Moto) -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&moto.conf().await)
}

/// Messages in the queue, visible or being handled.
async fn in_queue(sqs: &aws_sdk_sqs::Client, url: &str) -> u64 {
    use aws_sdk_sqs::types::QueueAttributeName as A;
    let out = sqs
        .get_queue_attributes()
        .queue_url(url)
        .attribute_names(A::ApproximateNumberOfMessages)
        .attribute_names(A::ApproximateNumberOfMessagesNotVisible)
        .send()
        .await
        .unwrap();
    let attrs = out.attributes().cloned().unwrap_or_default();
    [
        A::ApproximateNumberOfMessages,
        A::ApproximateNumberOfMessagesNotVisible,
    ]
    .iter()
    .map(|a| {
        attrs
            .get(a)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    })
    .sum()
}

/// Config: hook `alarms` for `topic` whose rule reboots the alarm's instance, fed by the SQS intake
/// `alarms` from `queue` (long polls of 1 s).
fn sqs_intake(topic: &str, queue: &str, raw: bool) -> String {
    format!(
        r#"
[sns.hooks.alarms]
topics = ["{topic}"]
[[sns.hooks.alarms.rules]]
name = "reboot-on-failed-checks"
alarm_name = "StatusCheckFailed-*"
dimensions = {{ InstanceId = "*" }}
job = {{ action = "reboot_instances", region = "us-east-1", targets = {{ instance_ids = ["{{instance_id}}"] }} }}
[sqs.alarms]
queue_url = "{queue}"
hook = "alarms"
raw = {raw}
wait = "1s"
"#
    )
}

/// The jobs the SQS intake `alarms` queued.
async fn jobs(d: &Daemon) -> Vec<Value> {
    let (_, list) = d.get_json("/v1/jobs?created_by=sqs:alarms").await;
    list["jobs"].as_array().cloned().unwrap_or_default()
}

/// The SQS intake (`[sqs.<name>]`, alarms for a daemon in a private subnet): signed SNS envelopes
/// long-polled from moto's SQS through the fault proxy. The daemon is killed with SIGKILL after
/// it received the first alarm and queued its job but before its DeleteMessage reached SQS (the
/// proxy holds that call); a second alarm arrives while it is down. After a restart, both alarms
/// have exactly one job each, the first one's redelivery is recorded as a duplicate, and the queue
/// ends empty. A forged envelope is refused and left in the queue for its redrive policy.
#[tokio::test]
async fn sqs_intake_loses_no_alarm_and_queues_none_twice_across_kill_9() {
    let moto = Moto::start().await;
    let ids = moto.launch(2, &[("Name", "web")]).await;
    let proxy = common::proxy::FaultProxy::start(&moto.url, 17).await;
    let q = sqs(&moto).await;
    // A short visibility timeout: a message received by the killed daemon comes back in 2 s.
    let queue = moto
        .queue("ec2jobd-alarms", &[("VisibilityTimeout", "2")])
        .await;
    let topic = "arn:aws:sns:us-east-1:123456789012:alarms";
    q.send_message()
        .queue_url(&queue)
        .message_body(common::signed_alarm(topic, "alarm-1", &ids[0]))
        .send()
        .await
        .unwrap();
    let certs = common::sns_cert_dir();
    let extra = format!(
        "[sns]\ncert_dir = \"{}\"\n{}",
        certs.path().display(),
        sqs_intake(topic, &queue, false)
    );
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    proxy.set(|f| f.hold = Some(("DeleteMessage".into(), gate.clone())));
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        extra,
        ..Default::default()
    })
    .await;
    let deadline = std::time::Instant::now() + MINUTE;
    while proxy.calls("DeleteMessage") == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no DeleteMessage; log:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The delete is sent only after the job was durably queued.
    let before = jobs(&d).await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(
        before[0]["spec"]["targets"]["instance_ids"][0],
        ids[0].as_str()
    );
    d.kill9();
    assert_eq!(
        proxy.answered("DeleteMessage"),
        0,
        "the delete never reached SQS"
    );

    // While the daemon is down: a second alarm, and a forged one (signature of another body).
    q.send_message()
        .queue_url(&queue)
        .message_body(common::signed_alarm(topic, "alarm-2", &ids[1]))
        .send()
        .await
        .unwrap();
    let forged = common::signed_alarm(topic, "alarm-3", &ids[1]).replace(&ids[1], &ids[0]);
    q.send_message()
        .queue_url(&queue)
        .message_body(forged)
        .send()
        .await
        .unwrap();
    // The held delete stays held (its sender is dead); the restarted daemon's calls pass.
    proxy.set(|f| f.hold = None);
    d.spawn().await;

    let deadline = std::time::Instant::now() + MINUTE;
    loop {
        let all = jobs(&d).await;
        let (_, deliveries) = d.get_json("/v1/sns/deliveries").await;
        let outcomes: Vec<(String, String)> = deliveries["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["message_id"].as_str().unwrap_or("").to_string(),
                    x["outcome"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        let has = |id: &str, o: &str| outcomes.contains(&(id.into(), o.into()));
        if all.len() == 2
            && has("alarm-1", "duplicate")
            && has("alarm-2", "accepted")
            && has("alarm-3", "rejected")
            && in_queue(&q, &queue).await == 1
        {
            let first = all.iter().find(|j| j["id"] == before[0]["id"]);
            assert!(
                first.is_some(),
                "the first job is the one queued before the kill: {all:?}"
            );
            let second = all.iter().find(|j| j["id"] != before[0]["id"]).unwrap();
            assert_eq!(
                second["spec"]["targets"]["instance_ids"][0],
                ids[1].as_str()
            );
            assert_eq!(second["created_by"], "sqs:alarms");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "jobs {all:?}\ndeliveries {outcomes:?}\nin queue {}\nlog:\n{}",
            in_queue(&q, &queue).await,
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Exactly one job per alarm, even after more redeliveries could have happened.
    assert_eq!(jobs(&d).await.len(), 2);
    assert!(
        d.metric("ec2jobd_sqs_messages_total{intake=\"alarms\",outcome=\"left\"}")
            .await
            >= 1.0
    );
}

/// A raw SQS intake fed by moto's own SNS → SQS subscription (`RawMessageDelivery`): the alarm
/// published to the topic becomes the rule's job and the message is deleted.
#[tokio::test]
async fn raw_sqs_intake_from_an_sns_subscription() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Name", "web")]).await;
    let (topics, q) = (sns(&moto).await, sqs(&moto).await);
    let topic = moto.topic("alarms").await;
    let queue = moto.queue("raw-alarms", &[]).await;
    topics
        .subscribe()
        .topic_arn(&topic)
        .protocol("sqs")
        .endpoint("arn:aws:sqs:us-east-1:123456789012:raw-alarms")
        .attributes("RawMessageDelivery", "true")
        .send()
        .await
        .unwrap();
    let extra = sqs_intake(&topic, &queue, true);
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        extra,
        ..Default::default()
    })
    .await;
    let alarm = json!({
        "AlarmName": "StatusCheckFailed-web", "NewStateValue": "ALARM",
        "Trigger": {"Namespace": "AWS/EC2", "Dimensions": [{"name": "InstanceId", "value": ids[0]}]}
    });
    topics
        .publish()
        .topic_arn(&topic)
        .message(alarm.to_string())
        .send()
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + MINUTE;
    let job = loop {
        if let Some(j) = jobs(&d).await.first() {
            if in_queue(&q, &queue).await == 0 {
                break j.clone();
            }
        }
        assert!(std::time::Instant::now() < deadline, "log:\n{}", d.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job["spec"]["targets"]["instance_ids"][0], ids[0].as_str());
    let j = d.wait_final(job["id"].as_str().unwrap(), MINUTE).await;
    assert_eq!(j["state"], "succeeded", "{j}");
}

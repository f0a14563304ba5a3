//! Hostile input and careless clients (issue 12's findings), each against the real binary: template
//! values that would expand again, refused SNS deliveries that would fill the disk, slow and idle
//! connections, a `wait` parameter given twice or encoded, and secrets in job specs.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::common::{Daemon, DaemonOpts};
use super::problem;

/// Bytes of the daemon's database once its WAL is checkpointed into it (the WAL itself is reused
/// and bounded by SQLite's auto-checkpoint).
fn db_bytes(d: &Daemon) -> u64 {
    let path = d.dir.join("ec2jobd.db");
    let conn = rusqlite::Connection::open(&path).expect("open the daemon's database");
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .expect("checkpoint");
    std::fs::metadata(&path).expect("database file").len()
}

async fn put_template(d: &Daemon, name: &str, body: &Value) -> reqwest::Response {
    d.req(
        reqwest::Method::PUT,
        &format!("/v1/templates/{name}"),
        &d.admin,
    )
    .json(body)
    .send()
    .await
    .expect("put template")
}

async fn run_template(d: &Daemon, name: &str, params: &Value) -> reqwest::Response {
    d.req(
        reqwest::Method::POST,
        &format!("/v1/templates/{name}/run"),
        &d.admin,
    )
    .json(&json!({ "parameters": params }))
    .send()
    .await
    .expect("run template")
}

/// Finding 1: values are put in once and never expanded again, and the rendered spec is capped.
/// Before the fix the nested values below asked for 4.6 GB and the daemon aborted.
#[tokio::test]
async fn template_values_are_never_expanded_again_and_the_result_is_capped() {
    let d = Daemon::start(DaemonOpts::default()).await;
    let params = |names: &[&str]| -> Value {
        names
            .iter()
            .map(|n| (n.to_string(), json!({"type": "string"})))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let r = put_template(
        &d,
        "tagger",
        &json!({
            "spec": {"action": "create_tags", "targets": {"instance_ids": ["i-0123456789abcdef0"]},
                     "params": {"tags": {"Note": "${a}", "Other": "${b}", "Third": "${c}"}}},
            "parameters": params(&["a", "b", "c"]),
        }),
    )
    .await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap_or_default());

    // A value holding another placeholder stays literal: it cannot read `b`'s value.
    let r = run_template(&d, "tagger", &json!({"a": "${b}", "b": "secret", "c": "x"})).await;
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap_or_default());
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["spec"]["params"]["tags"]["Note"], "${b}");
    assert_eq!(job["spec"]["params"]["tags"]["Other"], "secret");

    // The expansion bomb: 60 KB of nested values. One pass makes ~46 KB of literal text (no
    // exponential growth); with the spec around it that is still refused, as a 422.
    let bomb = json!({"a": "${b}".repeat(2000), "b": "${c}".repeat(2000), "c": "x".repeat(20000)});
    let before = d.rss_kib();
    let (status, p) = problem(run_template(&d, "tagger", &bomb).await).await;
    assert_eq!(status, 422, "{p}");
    assert!(
        d.rss_kib() < before + 64 * 1024,
        "RSS grew from {before} KiB to {} KiB",
        d.rss_kib()
    );

    // Placeholders repeated in the template multiply a value: the rendered spec is capped at the
    // body limit and answered 422 naming the parameters, nothing stored.
    let r = put_template(
        &d,
        "wide",
        &json!({
            "spec": {"action": "create_tags", "targets": {"instance_ids": ["i-0123456789abcdef0"]},
                     "params": {"tags": (0..40).map(|i| (format!("K{i}"), json!("${v}")))
                        .collect::<serde_json::Map<_, _>>()}},
            "parameters": {"v": {"type": "string"}},
        }),
    )
    .await;
    assert_eq!(r.status(), 201);
    let (status, p) =
        problem(run_template(&d, "wide", &json!({"v": "y".repeat(4000)})).await).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (422, Some("spec_too_large")),
        "{p}"
    );
    let (_, page) = d.get_json("/v1/jobs").await;
    assert_eq!(
        page["jobs"].as_array().map(Vec::len),
        Some(1),
        "only the first run stored a job"
    );
    assert_eq!(d.get_json("/healthz").await.0, 200);
}

/// Finding 2: refused deliveries to a hook are cut and folded, so no stream of forged posts grows the
/// database by more than a row a minute per kind. Before the fix 300 posts of a 60 KB TopicArn added
/// 40 MB.
#[tokio::test]
async fn refused_sns_deliveries_do_not_fill_the_disk() {
    let d = Daemon::start(DaemonOpts {
        extra: "[sns.hooks.alarms]\ntopics = [\"arn:aws:sns:us-east-1:123456789012:alarms\"]\n"
            .into(),
        ..Default::default()
    })
    .await;
    // Under the 64 KiB body limit: a 40 KB TopicArn and a 20 KB MessageId.
    let huge = "A".repeat(40_000);
    let base = db_bytes(&d);
    let http = reqwest::Client::new();
    for i in 0..300 {
        let body = json!({
            "Type": "Notification", "MessageId": format!("{i}-{}", &huge[..20_000]),
            "TopicArn": format!("arn:aws:sns:us-east-1:123456789012:{huge}"),
            "Message": "x\nforged log line", "Timestamp": "2026-12-02T00:00:00.000Z",
            "SignatureVersion": "1", "Signature": "AAAA",
            "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123abcd.pem",
        });
        let r = http
            .post(format!("{}/v1/sns/alarms", d.url))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403);
    }
    // A refusal whose caller text holds a newline (log injection).
    let forged = json!({"Type": "Notification", "MessageId": "m",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:x\nforged log line",
        "Message": "x", "Timestamp": "2026-12-02T00:00:00.000Z", "SignatureVersion": "1",
        "Signature": "AAAA",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123abcd.pem"});
    let r = http
        .post(format!("{}/v1/sns/alarms", d.url))
        .body(forged.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let grown = db_bytes(&d).saturating_sub(base);
    assert!(grown < 64 * 1024, "database grew by {grown} bytes");
    let (_, page) = d.get_json("/v1/sns/deliveries").await;
    let rows = page["deliveries"].as_array().unwrap();
    assert_eq!(rows.len(), 1, "{page}");
    assert_eq!(rows[0]["count"], 301);
    assert_eq!(rows[0]["code"], "topic");
    assert!(rows[0]["topic_arn"].as_str().unwrap().len() <= 256);
    assert_eq!(
        d.metric_sum("ec2jobd_sns_refused", "code=\"topic\"").await,
        301.0
    );
    // The refusal's caller text is logged escaped: no line of the log starts with what it sent.
    let log = d.log();
    assert!(log.contains("forged log line"), "the refusal was logged");
    assert!(!log.lines().any(|l| l.starts_with("forged")), "{log}");
}

/// Reads until the server closes the connection; the time it took, or None when it stayed open
/// for `within`.
async fn closed_within(sock: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = std::time::Instant::now();
    let mut buf = [0u8; 1024];
    let r = tokio::time::timeout(within, async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    r.ok().map(|_| start.elapsed())
}

/// Finding 3: a half-sent request head and an idle connection are closed by their timeouts, the
/// connection cap holds newcomers until a slot frees, and the open-files limit is raised.
#[tokio::test]
async fn slow_and_idle_connections_are_closed_and_capped() {
    let d = Daemon::start(DaemonOpts {
        extra: "[http]\nheader_read_timeout = \"1s\"\nidle_timeout = \"2s\"\nsse_keepalive = \"1s\"\nmax_connections = 8\n".into(),
        ..Default::default()
    })
    .await;
    let addr = d.url.trim_start_matches("http://").to_string();
    // Slowloris: part of a head, then a byte now and then.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t = closed_within(&mut slow, Duration::from_secs(15)).await;
    assert!(t.is_some(), "a half-sent head was kept open");
    // An idle connection that never sends anything.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    assert!(closed_within(&mut idle, Duration::from_secs(15))
        .await
        .is_some());
    // A kept-alive connection after its answer.
    let mut kept = TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut kept, Duration::from_secs(15))
        .await
        .is_some());

    // Fill every slot with idle connections from four addresses (two each: the per-client share
    // of 25% of 8): the next client waits, then is served once the idle ones are closed, and the
    // daemon never held more than the cap.
    let mut hogs = Vec::new();
    for n in 3..7u8 {
        for _ in 0..4 {
            hogs.push(connect_from(&addr, [127, 0, 0, n]).await);
        }
    }
    let r = tokio::time::timeout(Duration::from_secs(30), get_from(&d, [127, 0, 0, 9])).await;
    assert_eq!(r.ok(), Some(200));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(
        nums[0], nums[1],
        "soft limit raised to the hard one: {line}"
    );
    drop(hogs);
}

/// A TCP connection to `addr` from the loopback address `from` (all of 127/8 is this host).
async fn connect_from(addr: &str, from: [u8; 4]) -> TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind((std::net::Ipv4Addr::from(from), 0).into())
        .unwrap();
    sock.connect(addr.parse().unwrap()).await.unwrap()
}

/// `GET /healthz` from the loopback address `from`: its status, or 0 when the connection failed.
async fn get_from(d: &Daemon, from: [u8; 4]) -> u16 {
    let c = reqwest::Client::builder()
        .local_address(std::net::IpAddr::from(from))
        .build()
        .unwrap();
    match c.get(format!("{}/healthz", d.url)).send().await {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    }
}

/// Issue 30, finding 10: one client opening idle connections takes its share of the places
/// (`http.max_connections_per_client`), not all of them: another client is answered at once,
/// long before the idle ones would be closed; the hog's further connections are closed.
#[tokio::test]
async fn one_client_cannot_hold_every_connection() {
    let d = Daemon::start(DaemonOpts {
        extra: "[http]\nheader_read_timeout = \"60s\"\nidle_timeout = \"120s\"\nmax_connections = 8\nmax_connections_per_client = 3\n".into(),
        ..Default::default()
    })
    .await;
    let addr = d.url.trim_start_matches("http://").to_string();
    let mut hogs = Vec::new();
    for _ in 0..40 {
        hogs.push(connect_from(&addr, [127, 0, 0, 2]).await);
    }
    // Answered while the hog's connections would stay for a minute: well within 20 s.
    let r = tokio::time::timeout(Duration::from_secs(20), get_from(&d, [127, 0, 0, 3])).await;
    assert_eq!(r.ok(), Some(200), "another client is served");
    // The hog keeps three; the others were closed at once.
    let mut open = 0;
    for h in hogs.iter_mut() {
        if closed_within(h, Duration::from_millis(200)).await.is_none() {
            open += 1;
        }
    }
    assert_eq!(open, 3, "the hog's share");
}

/// Finding 4: `wait` is parsed once, by the handler; given twice it is 400 with nothing stored, and
/// an encoded value is held as it says instead of answered 503 after the job was stored.
#[tokio::test]
async fn wait_is_parsed_once_and_a_stored_job_is_never_answered_503() {
    let d = Daemon::start(DaemonOpts {
        extra: "[http]\nrequest_timeout = \"1s\"\n".into(),
        ..Default::default()
    })
    .await;
    let spec = json!({"action": "describe_instances", "targets": {"instance_ids": ["i-0123456789abcdef0"]}});
    let post = |q: &str| {
        d.req(reqwest::Method::POST, &format!("/v1/jobs{q}"), &d.admin)
            .json(&spec)
            .send()
    };
    let (status, p) = problem(post("?wait=1s&wait=5s").await.unwrap()).await;
    assert_eq!((status, p["field"].as_str()), (400, Some("wait")), "{p}");
    let (_, page) = d.get_json("/v1/jobs").await;
    assert_eq!(page["jobs"], json!([]));
    // `5%73` is `5s`: held up to five seconds although request_timeout is one.
    let r = post("?wait=3%73").await.unwrap();
    assert!(matches!(r.status().as_u16(), 201 | 202), "{}", r.status());
    let (_, page) = d.get_json("/v1/jobs").await;
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(1));
    // No other route can ask for more time: `wait` is not a parameter there.
    let (status, _) = problem(
        d.req(reqwest::Method::GET, "/v1/jobs?wait=1h", &d.admin)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 400);
}

/// Finding 6: user data is stored and used but shown and published only as a digest.
#[tokio::test]
async fn user_data_is_redacted_in_every_answer() {
    let d = Daemon::start(DaemonOpts::default()).await;
    let secret = "#!/bin/sh\nexport DB_PASSWORD=hunter2\n";
    let spec = json!({"action": "run_instances", "dry_run": true,
        "params": {"image_id": "ami-12345678", "instance_type": "t3.micro", "user_data": secret}});
    let r = d.post_job(&d.admin, &spec).await;
    assert_eq!(r.status(), 202);
    let text = r.text().await.unwrap();
    let job: Value = serde_json::from_str(&text).unwrap();
    let id = job["id"].as_str().unwrap();
    let shown = job["spec"]["params"]["user_data"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(shown.starts_with("<redacted, sha256:"), "{shown}");
    assert!(!text.contains("hunter2"));
    let (_, one) = d.get_json(&format!("/v1/jobs/{id}")).await;
    assert_eq!(one["spec"]["params"]["user_data"], shown);
    let (_, page) = d.get_json("/v1/jobs").await;
    assert!(!page.to_string().contains("hunter2"));
}

/// Finding 6: event streams and held submissions are bounded per token (and overall): beyond the
/// cap the answer is 429 with Retry-After and a held submission stores nothing; a closed stream
/// gives its slot back.
#[tokio::test]
async fn streams_are_capped_per_token() {
    let hole = super::BlackHole::start();
    let d = Daemon::start(DaemonOpts {
        workers: 1,
        extra: format!(
            "\n[http]\nmax_streams_per_token = 2\n\n[accounts.slow]\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\ncall_timeout = \"60s\"\n",
            hole.url
        ),
        ..Default::default()
    })
    .await;
    // A job that stays running (its EC2 endpoint never answers), so its stream stays open.
    let id = d
        .submit(&json!({"action": "describe_instances", "account": "slow",
            "targets": {"instance_ids": ["i-0123456789abcdef0"]}}))
        .await;
    let open = || async {
        d.req(
            reqwest::Method::GET,
            &format!("/v1/jobs/{id}/events"),
            &d.admin,
        )
        .send()
        .await
        .unwrap()
    };
    let first = open().await;
    let second = open().await;
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = open().await;
    assert_eq!(
        third
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap()),
        Some("1")
    );
    let (status, p) = problem(third).await;
    assert_eq!(
        (status, p["code"].as_str()),
        (429, Some("too_many_streams")),
        "{p}"
    );
    // A held submission counts too, and is refused before anything is stored.
    let r = d
        .req(reqwest::Method::POST, "/v1/jobs?wait=10s", &d.admin)
        .json(&json!({"action": "describe_instances", "targets": {"instance_ids": ["i-0123456789abcdef1"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let (_, page) = d.get_json("/v1/jobs").await;
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(1));
    // Another token has its own share; a closed stream gives the slot back.
    let viewer = super::create_token(&d.config, "viewer", "watcher");
    let r = d
        .req(
            reqwest::Method::GET,
            &format!("/v1/jobs/{id}/events"),
            &viewer,
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    drop(first);
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let r = open().await;
            if r.status() == 200 {
                return r;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert!(again.is_ok(), "the closed stream's slot never came back");
}

/// Retention: `ec2jobd prune --dry-run` counts the finished jobs past `retention.jobs` that have
/// left the notification outbox, `ec2jobd prune` deletes them (events with them); the daemon keeps
/// serving.
#[tokio::test]
async fn prune_counts_then_deletes_finished_jobs_past_retention() {
    let moto = super::Moto::start().await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        extra: "[retention]\njobs = \"1ms\"\ninterval = \"1h\"\n".into(),
        ..Default::default()
    })
    .await;
    let id = d
        .submit(
            &json!({"action": "describe_instances", "targets": {"filters": [
            {"name": "instance-state-name", "values": ["running"]}]}, "allow_empty": true}),
        )
        .await;
    assert_eq!(
        d.wait_final(&id, Duration::from_secs(60)).await["state"],
        "succeeded"
    );
    let config = d.config.to_str().unwrap().to_string();
    let prune = |dry: bool| {
        let mut args = vec!["prune", "--config", config.as_str()];
        if dry {
            args.push("--dry-run");
        }
        let (st, out, err) = super::run_cli(&args);
        assert!(st.success(), "{err}");
        out
    };
    // The job leaves the outbox (nothing to publish) within the notifier's poll.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = prune(true);
        if out.starts_with("would delete 1 finished job(s)") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(prune(false).starts_with("deleted 1 finished job(s)"));
    assert_eq!(d.get_json(&format!("/v1/jobs/{id}")).await.0, 404);
    assert!(prune(true).starts_with("would delete 0 finished job(s)"));
}

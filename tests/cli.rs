//! The command-line client against a running daemon (and moto): exit codes, JSON and env output,
//! waits, and the daemon being unreachable.

mod common;
#[path = "cli/readme.rs"]
mod readme;

use std::process::Command;
use std::time::Duration;

use common::{bin, Daemon, DaemonOpts, Moto};
use serde_json::Value;

struct Run {
    code: i32,
    out: String,
    err: String,
}

fn client(d: &Daemon, args: &[&str]) -> Run {
    client_at(&d.url, &d.admin, args)
}

fn client_at(url: &str, token: &str, args: &[&str]) -> Run {
    let o = Command::new(bin())
        .args(args)
        .env("EC2JOBD_URL", url)
        .env("EC2JOBD_TOKEN", token)
        .output()
        .expect("run ec2jobd");
    Run {
        code: o.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_commands_report_through_exit_codes_and_outputs() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Group", "cli"), ("Name", "box")]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;

    // Submit with a short action name and tag, wait, JSON output: exit 0.
    let r = tokio::task::block_in_place(|| {
        client(
            &d,
            &[
                "submit",
                "stop",
                "--tag",
                "Group=cli",
                "--wait",
                "--interval",
                "200ms",
                "--output",
                "json",
            ],
        )
    });
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    let job: Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["action"], "stop_instances");
    assert!(r.err.contains("succeeded"), "progress on stderr: {}", r.err);
    assert_eq!(moto.state(&ids[0]).await, "stopped");

    // --wait-status-ok with env output: KEY=value lines for `eval`.
    let r = tokio::task::block_in_place(|| {
        client(
            &d,
            &[
                "submit",
                "start",
                "--id",
                &ids[0],
                "--wait-status-ok",
                "--interval",
                "200ms",
                "--output",
                "env",
            ],
        )
    });
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    assert!(
        r.out
            .lines()
            .any(|l| l == format!("INSTANCE_ID_1={}", ids[0])),
        "{}",
        r.out
    );
    assert!(r.out.contains("CHECKS_1='2/2 checks passed'"), "{}", r.out);

    // A job that fails: exit 1; `jobs get` says the same.
    let r = tokio::task::block_in_place(|| {
        client(
            &d,
            &["submit", "reboot", "--id", "i-0123456789abcdef0", "--wait"],
        )
    });
    assert_eq!(r.code, 1, "{}\n{}", r.out, r.err);
    assert!(r.out.contains("InvalidInstanceID.NotFound"), "{}", r.out);
    let failed_id = r
        .out
        .lines()
        .find_map(|l| l.strip_prefix("id       "))
        .unwrap()
        .to_string();
    let r = tokio::task::block_in_place(|| client(&d, &["jobs", "get", &failed_id]));
    assert_eq!(r.code, 1);

    // Rejected input (422) and a refused cancel (409): exit 3.
    let r = tokio::task::block_in_place(|| client(&d, &["submit", "start", "--id", "i-xyz"]));
    assert_eq!(r.code, 3, "{}", r.err);
    assert!(r.err.contains("targets.instance_ids[0]"), "{}", r.err);
    let r = tokio::task::block_in_place(|| client(&d, &["jobs", "cancel", &failed_id]));
    assert_eq!(r.code, 3, "{}", r.err);
    let r = tokio::task::block_in_place(|| client(&d, &["submit", "--bogus-flag"]));
    assert_eq!(r.code, 3);

    // The wait runs out while the job goes on: exit 2.
    let r = tokio::task::block_in_place(|| {
        client(
            &d,
            &[
                "submit",
                "tag",
                "--id",
                &ids[0],
                "--param",
                "tags={\"a\":\"b\"}",
                "--until",
                "stopped",
                "--wait",
                "--wait-timeout",
                "1s",
            ],
        )
    });
    assert_eq!(r.code, 2, "{}\n{}", r.out, r.err);

    // List and outputs as JSON.
    let r = tokio::task::block_in_place(|| {
        client(
            &d,
            &[
                "jobs",
                "list",
                "--action",
                "stop_instances",
                "--output",
                "json",
            ],
        )
    });
    assert_eq!(r.code, 0);
    let page: Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1);
    let stop_id = page["jobs"][0]["id"].as_str().unwrap().to_string();
    let r = tokio::task::block_in_place(|| {
        client(&d, &["jobs", "outputs", &stop_id, "--output", "json"])
    });
    let out: Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(out["INSTANCE_ID_1"], ids[0].as_str());

    // Nobody listening: exit 4. A missing token: exit 3.
    let r = tokio::task::block_in_place(|| {
        client_at("http://127.0.0.1:9", &d.admin, &["jobs", "list"])
    });
    assert_eq!(r.code, 4, "{}", r.err);
    let o = tokio::task::block_in_place(|| {
        Command::new(bin())
            .args(["jobs", "list"])
            .env("EC2JOBD_URL", &d.url)
            .env_remove("EC2JOBD_TOKEN")
            .output()
            .unwrap()
    });
    assert_eq!(o.status.code(), Some(3));
}

/// `ec2jobd health` is a health check that needs no curl: 0 while the daemon is ready, 4 when it
/// cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_readiness_by_exit_code() {
    let mut d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    // `--url`, or (a container setting only the daemon's listen address) EC2JOBD_LISTEN.
    let health = |url: &str| {
        let mut c = Command::new(bin());
        c.arg("health").env_remove("EC2JOBD_TOKEN");
        match url.strip_prefix("listen:") {
            Some(listen) => c.env_remove("EC2JOBD_URL").env("EC2JOBD_LISTEN", listen),
            None => c.args(["--url", url]),
        };
        c.output().unwrap()
    };
    let port = d
        .url
        .rsplit(':')
        .next()
        .expect("port")
        .trim_end_matches('/');
    let listen = format!("listen:0.0.0.0:{port}");
    for url in [d.url.as_str(), &listen] {
        let o = health(url);
        assert_eq!(
            o.status.code(),
            Some(0),
            "{url}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let (url, local) = (d.url.clone(), format!("127.0.0.1:{port}/readyz"));
    d.kill9();
    for url in [url.as_str(), &listen] {
        let o = health(url);
        assert_eq!(o.status.code(), Some(4), "{url}");
        // The address checked is the one given, not the default URL.
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(&local), "{url}: {err}");
    }
}

/// A replica whose PostgreSQL is cut off (packets dropped, no reset) is not ready: `/readyz` answers
/// 503 promptly instead of hanging, and `ec2jobd health` exits 4; once the link heals it is ready
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_says_503_while_the_database_is_cut_off() {
    let Some(database) = common::postgres_database() else {
        return;
    };
    let (link, through_link) = common::TcpCut::before_postgres(&database).await;
    let d = Daemon::start(DaemonOpts {
        workers: 1,
        database_url: Some(through_link),
        ..Default::default()
    })
    .await;
    let ready = || async {
        let r = reqwest::Client::new()
            .get(format!("{}/readyz", d.url))
            .timeout(Duration::from_secs(30))
            .send()
            .await
            .expect("/readyz answers");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    };
    assert_eq!(ready().await.0, 200);
    link.set(true);
    let (status, body) = ready().await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("database_unreachable"), "{body}");
    let o = Command::new(bin())
        .args(["health", "--url", &d.url])
        .env_remove("EC2JOBD_TOKEN")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    link.set(false);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while ready().await.0 != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready after healing\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Client commands trust the system's CA roots plus `--cacert`: against a real TLS server
/// (`openssl s_server`) whose certificate a private CA signed, `ec2jobd health` fails on the
/// certificate without the CA, and passes with `--cacert` naming it; a file with no certificate is refused as bad input.
/// `ec2jobd iam-policy | head -1`: the reader is gone before the command prints. It ends as Unix
/// tools do (SIGPIPE), without a panic about a broken pipe.
#[test]
fn printing_into_a_closed_pipe_ends_quietly() {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::process::ExitStatusExt;
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: both descriptors were just made by pipe(2) and are owned here alone.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    drop(read);
    let out = std::process::Command::new(common::bin())
        .arg("iam-policy")
        .stdout(write)
        .output()
        .expect("run ec2jobd");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?} {stderr}",
        out.status
    );
}

#[test]
fn client_commands_trust_the_cacert_given() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f);
    let (ca, ca_key, cert, key) = (p("ca.pem"), p("ca.key"), p("cert.pem"), p("key.pem"));
    let openssl = |args: &[&std::ffi::OsStr]| {
        let o = Command::new("openssl").args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    let common_args = ["-newkey", "rsa:2048", "-nodes", "-days", "1"];
    let os = |v: &[&str]| v.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
    // A private CA, and the server's certificate signed by it.
    let mut a = os(&["req", "-x509", "-subj", "/CN=test CA"]);
    a.extend(os(&common_args));
    a.extend([
        "-keyout".into(),
        ca_key.clone().into(),
        "-out".into(),
        ca.clone().into(),
    ]);
    openssl(&a.iter().map(|s| s.as_os_str()).collect::<Vec<_>>());
    let mut a = os(&["req", "-x509", "-subj", "/CN=localhost"]);
    a.extend(os(&common_args));
    a.extend(os(&[
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-addext",
        "basicConstraints=CA:FALSE",
    ]));
    a.extend([
        "-CA".into(),
        ca.clone().into(),
        "-CAkey".into(),
        ca_key.clone().into(),
        "-keyout".into(),
        key.clone().into(),
        "-out".into(),
        cert.clone().into(),
    ]);
    openssl(&a.iter().map(|s| s.as_os_str()).collect::<Vec<_>>());
    let port = common::free_port();
    let mut server = Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept", &port.to_string()])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "s_server did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let url = format!("https://127.0.0.1:{port}");
    let health = |extra: &[&std::ffi::OsStr]| {
        Command::new(bin())
            .args(["health", "--url", &url])
            .args(extra)
            .env_remove("EC2JOBD_CACERT")
            .output()
            .unwrap()
    };
    let o = health(&[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.to_lowercase().contains("certificate"),
        "the cause is named: {err}"
    );
    let o = health(&["--cacert".as_ref(), ca.as_os_str()]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(o.status.code(), Some(0), "{err}");
    let o = health(&["--cacert".as_ref(), key.as_os_str()]);
    assert_eq!(
        o.status.code(),
        Some(3),
        "a file with no certificate is bad input"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("--cacert"));
}

/// Saved templates: checked when saved (undeclared placeholder → 422), run over the API with
/// values (missing one → 422 naming it; typed values keep their type) and with `ec2jobd run`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn templates_are_checked_on_save_and_run_with_values() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Group", "tpl")]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;
    let put = |body: Value| {
        let d = &d;
        async move {
            d.req(reqwest::Method::PUT, "/v1/templates/tag-one", &d.admin)
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let r = put(serde_json::json!({"spec": {"action": "create_tags",
        "targets": {"instance_ids": ["${instance_id}"]}, "params": {"tags": {"Owner": "${owner}"}}},
        "parameters": {"instance_id": {"type": "string"}}}))
    .await;
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["code"],
        "undeclared_parameter"
    );
    // A template that could never run, or a parameter no placeholder can name, is refused.
    for (body, code) in [
        (
            serde_json::json!({"spec": {}, "parameters": {"x": {"type": "string"}}}),
            "invalid_action",
        ),
        (
            serde_json::json!({"spec": {"action": "${a}"}, "parameters": {"a": {"type": "string"}}}),
            "invalid_action",
        ),
        (
            serde_json::json!({"spec": {"action": "create_tags"},
                "parameters": {"": {"type": "string"}}}),
            "invalid_parameter_name",
        ),
    ] {
        let r = put(body.clone()).await;
        assert_eq!(r.status(), 422, "{body}");
        assert_eq!(r.json::<Value>().await.unwrap()["code"], code, "{body}");
    }
    let tpl = serde_json::json!({"description": "tag one instance",
        "spec": {"action": "create_tags", "targets": {"instance_ids": ["${instance_id}"]},
                 "params": {"tags": {"Owner": "${owner}"}}, "max_attempts": "${attempts}"},
        "parameters": {"instance_id": {"type": "string"},
                       "owner": {"type": "string", "default": "ops"},
                       "attempts": {"type": "integer", "default": 2}}});
    assert_eq!(put(tpl.clone()).await.status(), 201);
    let run = |body: Value| {
        let d = &d;
        async move {
            d.req(
                reqwest::Method::POST,
                "/v1/templates/tag-one/run?wait=30s",
                &d.admin,
            )
            .json(&body)
            .send()
            .await
            .unwrap()
        }
    };
    let r = run(serde_json::json!({"parameters": {}})).await;
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["field"],
        "parameters.instance_id"
    );
    let r = run(serde_json::json!({"parameters": {"instance_id": "i-nothex"}})).await;
    assert_eq!(r.status(), 422);
    assert_eq!(
        r.json::<Value>().await.unwrap()["field"],
        "spec.targets.instance_ids[0]"
    );
    let r = run(serde_json::json!({"parameters": {"instance_id": ids[0], "owner": "web"}})).await;
    assert_eq!(r.status(), 201);
    let j: Value = r.json().await.unwrap();
    assert_eq!(j["state"], "succeeded", "{j}");
    assert_eq!(
        j["max_attempts"], 2,
        "an integer parameter stays an integer"
    );
    assert_eq!(j["spec"]["params"]["tags"]["Owner"], "web");

    let r = tokio::task::block_in_place(|| {
        client(
            &d,
            &[
                "run",
                "tag-one",
                &format!("instance_id={}", ids[0]),
                "owner=cli",
                "--wait",
                "--output",
                "json",
            ],
        )
    });
    assert_eq!(r.code, 0, "{}\n{}", r.out, r.err);
    let j: Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(j["spec"]["params"]["tags"]["Owner"], "cli");
    let r = tokio::task::block_in_place(|| client(&d, &["run", "nope", "a=b"]));
    assert_eq!(r.code, 3);
    let (_, list) = d.get_json("/v1/templates").await;
    assert_eq!(list[0]["name"], "tag-one");
}

/// A daemon restarted while `submit --wait` follows its job is not the job's outcome: the client
/// keeps reading until `--wait-timeout` and exits with the job's code; its generated idempotency
/// key (shown with `--verbose`) makes the submission safe to retry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_client_rides_out_a_daemon_restart() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Group", "restart")]).await;
    moto.stop(&ids).await;
    let proxy = common::proxy::FaultProxy::start(&moto.url, 7).await;
    proxy.set(|f| {
        f.instance_status = Some((
            "initializing".into(),
            std::time::Instant::now() + std::time::Duration::from_secs(6),
        ))
    });
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        env: vec![("EC2JOBD_LISTEN".into(), format!("127.0.0.1:{port}"))],
        ..Default::default()
    })
    .await;
    let mut child = Command::new(bin())
        .args([
            "submit",
            "start",
            "--id",
            &ids[0],
            "--wait-status-ok",
            "--interval",
            "200ms",
            "--wait-timeout",
            "2m",
            "--verbose",
        ])
        .env("EC2JOBD_URL", &d.url)
        .env("EC2JOBD_TOKEN", &d.admin)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run ec2jobd");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line.clone());
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // Once the job is waiting, the daemon dies; it comes back on the same address only after the
    // client has said it is retrying.
    let wait_line = |want: &str| loop {
        match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(l) if l.contains(want) => return,
            Ok(_) => continue,
            Err(e) => panic!("no line with `{want}`: {e}"),
        }
    };
    tokio::task::block_in_place(|| wait_line("waiting for status_ok"));
    d.kill9();
    tokio::task::block_in_place(|| wait_line("retrying"));
    d.spawn().await;
    let status = tokio::task::block_in_place(|| child.wait().unwrap());
    let err = reader.join().unwrap();
    assert_eq!(status.code(), Some(0), "stderr: {err}");
    assert!(err.contains("idempotency key: ec2jobd-cli-"), "{err}");
    let (_, page) = d.get_json("/v1/jobs").await;
    assert_eq!(page["jobs"].as_array().map(Vec::len), Some(1), "{page}");
    assert_eq!(page["jobs"][0]["state"], "succeeded");
}

/// The walkthrough's token step can be repeated (`--replace`), and a token command without
/// `--config` refuses to create a database nobody reads.
#[test]
fn token_create_is_repeatable_and_the_wrong_database_is_loud() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), &DaemonOpts::default());
    let c = config.to_str().unwrap();
    let create = |extra: &[&str]| {
        let mut args = vec![
            "token", "create", "--role", "admin", "--name", "me", "--config", c,
        ];
        args.extend_from_slice(extra);
        common::run_cli(&args)
    };
    let (st, first, err) = create(&[]);
    assert!(
        st.success() && err.contains("created a new database"),
        "{err}"
    );
    let (st, _, err) = create(&[]);
    assert!(!st.success() && err.contains("already exists"), "{err}");
    let (st, second, err) = create(&["--replace"]);
    assert!(st.success(), "{err}");
    assert!(!second.trim().is_empty() && second != first);
    // Without --config, in a directory with no database: an error naming the way out, no file.
    let empty = tempfile::tempdir().unwrap();
    let o = Command::new(bin())
        .args(["token", "create", "--role", "admin", "--name", "me"])
        .current_dir(empty.path())
        .env_remove("EC2JOBD_CONFIG")
        .env_remove("EC2JOBD_DATABASE")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--config"), "{err}");
    assert!(!empty.path().join("ec2jobd.db").exists());
}

/// `ec2jobd migrate` prepares a PostgreSQL database (once: a second run applies nothing), never
/// echoing the URL's password; `ec2jobd store copy` moves a node's SQLite history into it, once.
#[test]
fn migrate_and_copy_into_a_postgres_database() {
    let Some(fresh) = common::postgres_database() else {
        return;
    };
    // The test server trusts local connections: the password is there to be hidden.
    let url = fresh.replacen("postgres@", "postgres:hunter2@", 1);
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(dir.path(), &DaemonOpts::default());
    let run = |cmd: &str| {
        let o = Command::new(bin())
            .args([cmd, "--config", config.to_str().unwrap()])
            .env("EC2JOBD_DATABASE", &url)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!err.contains("hunter2"), "{err}");
        (o.status.success(), err)
    };
    let (ok, err) = run("migrate");
    assert!(
        ok && err.contains(" migration(s) applied to postgres://postgres:***@")
            && !err.starts_with("0 "),
        "{err}"
    );
    let (ok, err) = run("migrate");
    assert!(ok && err.contains("0 migration(s) applied"), "{err}");

    // A node's database with a token in it, copied in (the schema is there already).
    let c = config.to_str().unwrap();
    let (st, _, err) = common::run_cli(&[
        "token", "create", "--role", "viewer", "--name", "reader", "--config", c,
    ]);
    assert!(st.success(), "{err}");
    let sqlite = format!(
        "sqlite://{}",
        std::fs::read_to_string(&config)
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("database = \"sqlite://"))
            .and_then(|l| l.strip_suffix('"'))
            .expect("the test config names its database")
    );
    let copy = || {
        let o = Command::new(bin())
            .args(["store", "copy", "--from", &sqlite, "--to", &url])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!err.contains("hunter2"), "{err}");
        (o.status.success(), err)
    };
    let (ok, err) = copy();
    assert!(
        ok && err.contains("1 api_tokens") && err.contains("0 jobs"),
        "{err}"
    );
    let (ok, err) = copy();
    assert!(
        !ok && err.contains("1 in api_tokens") && err.contains("--allow-non-empty"),
        "{err}"
    );
}

/// `ec2jobd doctor` against moto, with the fault proxy refusing one permission: one line per check,
/// each failure with its fix and a non-zero exit; once the database is migrated and the permission
/// given, every check passes and it exits 0. It changes nothing (the database stays absent until
/// `migrate`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_names_what_a_deployment_gets_wrong() {
    let moto = Moto::start().await;
    let proxy = common::proxy::FaultProxy::start(&moto.url, 23).await;
    proxy.set(|f| f.error = Some(("StopInstances".into(), 403, "UnauthorizedOperation".into())));
    let topic = moto.topic("alarms").await;
    let queue = moto.queue("alarms", &[]).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::write_config(
        dir.path(),
        &DaemonOpts {
            moto_url: Some(proxy.url.clone()),
            extra: format!(
                "[sns.hooks.alarms]\ntopics = [\"{topic}\"]\n[sqs.alarms]\nqueue_url = \"{queue}\"\nhook = \"alarms\"\n"
            ),
            ..Default::default()
        },
    );
    let doctor = || {
        let o = Command::new(bin())
            .args(["doctor", "--config", config.to_str().unwrap()])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).to_string(),
        )
    };
    let (code, out) = doctor();
    assert_eq!(code, Some(1), "{out}");
    for want in [
        "ok    config: ",
        "FAIL  database: ",
        "ok    account default: credentials are arn:aws:sts::123456789012:",
        "ok    account default: region us-east-1",
        "FAIL  account default: ec2:StopInstances is not permitted (UnauthorizedOperation",
        &format!("ok    SNS hook alarms: topic {topic} reachable"),
        "ok    SQS intake alarms: queue ",
        "warn  SQS intake alarms: the queue has no redrive policy",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // Every failure says how to fix it, on the next line.
    let lines: Vec<&str> = out.lines().collect();
    for (i, l) in lines.iter().enumerate() {
        if l.starts_with("FAIL") {
            assert!(lines[i + 1].trim_start().starts_with("fix: "), "{out}");
        }
    }
    assert!(
        !dir.path().join("ec2jobd.db").exists(),
        "doctor created no database"
    );
    // Without credentials (the README's second shell): the cause on one line, not the SDK's dump.
    let o = Command::new(bin())
        .args(["doctor", "--config", config.to_str().unwrap()])
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("AWS_CONFIG_FILE", dir.path().join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let lines: Vec<&str> = out.lines().collect();
    let at = lines
        .iter()
        .position(|l| l.starts_with("FAIL  account default: credentials"))
        .unwrap_or_else(|| panic!("no credentials failure in:\n{out}"));
    assert!(lines[at].contains("no credentials found"), "{out}");
    assert!(lines[at + 1].trim_start().starts_with("fix: "), "{out}");
    assert!(!out.contains("DispatchFailure("), "{out}");

    let (status, _, err) = common::run_cli(&["migrate", "--config", config.to_str().unwrap()]);
    assert!(status.success(), "{err}");
    proxy.set(|f| f.error = None);
    let (code, out) = doctor();
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("ok    database: ") && out.contains("writable"),
        "{out}"
    );
    assert!(!out.contains("FAIL"), "{out}");
    assert!(proxy.calls("StopInstances") >= 2, "the dry run went to EC2");
    assert!(proxy.last_body("StopInstances").contains("DryRun=true"));
}

/// A PostgreSQL queue is backed up with PostgreSQL's own tools, as the README says: `ec2jobd
/// backup` points to pg_dump (without echoing the password); a `pg_dump` taken while a daemon serves,
/// restored with `pg_restore` into an empty database, gives a daemon that runs the queued jobs
/// and accepts the tokens of the original.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_queue_is_backed_up_with_pg_dump() {
    let Some(first) = common::postgres_database() else {
        return;
    };
    let Some(second) = common::postgres_database() else {
        return;
    };
    let moto = Moto::start().await;
    let ids = moto.launch(2, &[("Env", "dump")]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        workers: 0,
        database_url: Some(first.clone()),
        ..Default::default()
    })
    .await;
    let queued: Vec<String> = {
        let mut v = Vec::new();
        for i in &ids {
            v.push(
                d.submit(&serde_json::json!({"action": "describe_instances",
                    "targets": {"instance_ids": [i]}}))
                    .await,
            );
        }
        v
    };
    let with_password = first.replacen("postgres@", "postgres:hunter2@", 1);
    let o = Command::new(bin())
        .args(["backup", "--config", d.config.to_str().unwrap(), "--to"])
        .arg(d.dir.join("nope.db"))
        .env("EC2JOBD_DATABASE", &with_password)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("pg_dump"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    assert!(!d.dir.join("nope.db").exists());

    let dump = d.dir.join("queue.dump");
    let o = Command::new("pg_dump")
        .args(["--format=custom", "--file"])
        .arg(&dump)
        .arg(&first)
        .output()
        .expect("pg_dump runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = Command::new("pg_restore")
        .args(["--no-owner", "--exit-on-error", "--dbname", &second])
        .arg(&dump)
        .output()
        .expect("pg_restore runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // The README's step after a restore: unfinished jobs count a possible attempt.
    let o = Command::new("psql")
        .args([
            second.as_str(),
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            "UPDATE jobs SET attempts = attempts + 1, max_attempts = max_attempts + 1 \
             WHERE state IN ('queued', 'running')",
        ])
        .output()
        .expect("psql runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let restored = Daemon::replica(
        DaemonOpts {
            moto_url: Some(moto.url.clone()),
            workers: 2,
            database_url: Some(second),
            ..Default::default()
        },
        d.admin.clone(),
    )
    .await;
    for id in &queued {
        let j = restored.wait_final(id, Duration::from_secs(60)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["attempts"], 2, "resumed after the restore: {j}");
    }
    // The original still has them queued: the two databases are apart.
    assert_eq!(d.job(&queued[0]).await["state"], "queued");
}

/// Upgrades and rollbacks (issue 33): a daemon goes on working against a database a newer
/// ec2jobd migrated additively (a table it does not know), and refuses to start, saying what to
/// do, against one whose newer migration says older daemons cannot use it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_runs_on_additive_newer_schemas_and_refuses_incompatible_ones() {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[("Env", "upgrade")]).await;
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        workers: 1,
        ..Default::default()
    })
    .await;
    let describe = serde_json::json!({"action": "describe_instances",
        "targets": {"instance_ids": [ids[0]]}});
    let first = d.submit(&describe).await;
    d.wait_final(&first, Duration::from_secs(60)).await;
    d.terminate(Duration::from_secs(30));
    let file = d.dir.join("ec2jobd.db");
    let newer = |version: i64, requires: bool| {
        let db = rusqlite::Connection::open(&file).unwrap();
        db.execute_batch(&format!(
            "CREATE TABLE future_{version} (id INTEGER PRIMARY KEY);
             INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES ({version}, 'from a newer ec2jobd', TRUE, X'00', 0);"
        ))
        .unwrap();
        if requires {
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_requires', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                [version.to_string()],
            )
            .unwrap();
        }
    };
    newer(29991231000001, false);
    d.spawn().await;
    let second = d.submit(&describe).await;
    assert_eq!(
        d.wait_final(&second, Duration::from_secs(60)).await["state"],
        "succeeded"
    );
    assert_eq!(d.job(&first).await["state"], "succeeded");
    d.terminate(Duration::from_secs(30));
    newer(29991231000002, true);
    let o = Command::new(bin())
        .args(["serve", "--config", d.config.to_str().unwrap()])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("newer ec2jobd")
            && err.contains("29991231000002")
            && err.contains("Upgrading"),
        "{err}"
    );
}

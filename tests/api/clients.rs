//! Clients nobody here wrote, pointed at what the daemon serves: Prometheus's `promtool` on
//! `/metrics`, Redocly's linter on the OpenAPI document, and a Python client generated from that
//! document by openapi-python-client driving the main flows. `scripts/test` installs all three
//! (`scripts/ensure-clients`) and says where through `PROMTOOL`, `REDOCLY` and
//! `OPENAPI_PYTHON_CLIENT`.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};

use super::common::{repo, Daemon, DaemonOpts, Moto};
use serde_json::json;

/// The path of an outside tool `scripts/ensure-clients` installed.
fn tool(var: &str) -> PathBuf {
    std::env::var_os(var).map(PathBuf::from).unwrap_or_else(|| {
        panic!("{var} is not set: run scripts/test (scripts/ensure-clients installs it)")
    })
}

/// `promtool check metrics` on `text` (it reads stdin).
fn promtool(text: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(tool("PROMTOOL"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write metrics to promtool");
    child.wait_with_output().expect("promtool output")
}

/// A daemon on a fresh moto with one running instance.
async fn daemon_with_an_instance() -> (Moto, Daemon, Vec<String>) {
    let moto = Moto::start().await;
    let ids = moto.launch(1, &[]).await;
    let d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        ..Default::default()
    })
    .await;
    (moto, d, ids)
}

#[tokio::test]
async fn metrics_are_classic_text_for_promtool_and_openmetrics_when_asked() {
    let (_moto, d, ids) = daemon_with_an_instance().await;
    // Samples in every family kind: a finished job, EC2 calls, a status round.
    let id = d
        .submit(&json!({"action": "reboot_instances", "targets": {"instance_ids": ids}}))
        .await;
    d.wait_final(&id, std::time::Duration::from_secs(60)).await;

    let scrape = |accept: Option<&'static str>| {
        let mut r = d.http.get(format!("{}/metrics", d.url));
        if let Some(a) = accept {
            r = r.header("accept", a);
        }
        async move {
            let r = r.send().await.expect("GET /metrics");
            assert_eq!(r.status(), 200);
            let ct = r.headers()["content-type"]
                .to_str()
                .unwrap_or("")
                .to_string();
            (ct, r.text().await.expect("metrics body"))
        }
    };

    // No Accept (curl), and text/plain: the classic format, which promtool passes without a word.
    for accept in [None, Some("text/plain")] {
        let (ct, text) = scrape(accept).await;
        assert!(
            ct.starts_with("text/plain; version=0.0.4"),
            "{accept:?}: {ct}"
        );
        assert!(
            text.contains(
                "ec2jobd_ec2_calls_total{operation=\"RebootInstances\",outcome=\"ok\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("# TYPE ec2jobd_ec2_calls_total counter"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        let out = promtool(&text);
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "promtool check metrics on the classic format: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // What Prometheus itself sends: OpenMetrics, which promtool's classic parser cannot read
    // (the reason the classic format exists here).
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    let (ct, text) = scrape(Some(prometheus)).await;
    assert!(
        ct.starts_with("application/openmetrics-text; version=1.0.0"),
        "{ct}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE ec2jobd_ec2_calls counter"), "{text}");
    assert!(
        !promtool(&text).status.success(),
        "promtool read OpenMetrics as classic text"
    );
    // Asked for and refused (q=0): the classic format.
    let (ct, _) = scrape(Some("application/openmetrics-text;q=0, text/plain")).await;
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
}

#[test]
fn openapi_document_lints_clean_with_redocly() {
    let out = Command::new(tool("REDOCLY"))
        .args([
            "lint",
            "--config",
            "openapi/redocly.yaml",
            "openapi/ec2jobd.json",
        ])
        .current_dir(repo())
        .env("REDOCLY_TELEMETRY", "off")
        .env("REDOCLY_SUPPRESS_UPDATE_NOTICE", "true")
        .output()
        .expect("run redocly");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "redocly lint failed:\n{said}");
    // Redocly ends with "You have N warning(s)." when there are warnings: none either.
    assert!(
        said.contains("Your API description is valid") && !said.contains("You have "),
        "redocly lint reported problems:\n{said}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_generated_python_client_drives_the_main_flows() {
    let generator = tool("OPENAPI_PYTHON_CLIENT");
    let python = generator.with_file_name("python");
    let dir = tempfile::tempdir().expect("temp dir");
    let gen = Command::new(&generator)
        .args(["generate", "--meta", "none", "--path"])
        .arg(repo().join("openapi/ec2jobd.json"))
        .current_dir(dir.path())
        .output()
        .expect("run openapi-python-client");
    let said =
        String::from_utf8_lossy(&gen.stdout).into_owned() + &String::from_utf8_lossy(&gen.stderr);
    assert!(gen.status.success(), "generation failed:\n{said}");
    // Only the SNS hook (SNS's own text/plain POST, not for clients) may be left out.
    for line in said.lines().filter(|l| l.starts_with("WARNING")) {
        assert!(
            line.contains("/v1/sns/{hook}"),
            "generator warning: {line}\n{said}"
        );
    }
    assert!(
        dir.path()
            .join("ec2jobd_client/api/jobs/outputs_env.py")
            .exists(),
        "{said}"
    );

    let (_moto, d, ids) = daemon_with_an_instance().await;
    let run = tokio::process::Command::new(&python)
        .arg(repo().join("tests/fixtures/generated_client_flow.py"))
        .arg(&d.url)
        .arg(&ids[0])
        .env("PYTHONPATH", dir.path())
        .env("EC2JOBD_TOKEN", &d.admin)
        .output()
        .await
        .expect("run the generated client");
    assert!(
        run.status.success(),
        "generated client flow failed:\n{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(String::from_utf8_lossy(&run.stdout).contains("all flows ok"));
}

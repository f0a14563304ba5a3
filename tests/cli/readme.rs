//! The README's walkthrough, run as written: `scripts/run-local` itself (its moto, its demo
//! instances, `config/local.toml`) on free ports, then every `sh` block between "## Walkthrough
//! with curl" and the next `## ` heading, in order, in one bash with `set -euo pipefail`. Each
//! command's output must show the `#>` lines after it, in order (`…` matches anything). The only
//! edit made to the README's text is the daemon's address.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::common::{bin, free_port, repo};

/// One command (one or more lines) and the lines its output must show.
#[derive(Debug)]
struct Step {
    code: String,
    expect: Vec<String>,
}

/// The walkthrough's `sh` blocks, split into steps at each run of `#>` lines.
fn walkthrough(readme: &str) -> Vec<Step> {
    let start = readme
        .find("\n## Walkthrough with curl")
        .expect("README has a `## Walkthrough with curl` section");
    let rest = &readme[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3);
    let mut steps = Vec::new();
    let mut in_sh = false;
    let mut cur = Step {
        code: String::new(),
        expect: Vec::new(),
    };
    for line in rest[..end].lines() {
        if !in_sh {
            in_sh = line == "```sh";
            continue;
        }
        if line == "```" {
            in_sh = false;
            continue;
        }
        if let Some(e) = line.strip_prefix("#>") {
            cur.expect
                .push(e.strip_prefix(' ').unwrap_or(e).to_string());
            continue;
        }
        if !cur.expect.is_empty() {
            steps.push(std::mem::replace(
                &mut cur,
                Step {
                    code: String::new(),
                    expect: Vec::new(),
                },
            ));
        }
        cur.code.push_str(line);
        cur.code.push('\n');
    }
    if !cur.code.trim().is_empty() || !cur.expect.is_empty() {
        steps.push(cur);
    }
    steps
}

/// `line` matches `pattern` where each `…` in it stands for any text.
fn line_matches(pattern: &str, line: &str) -> bool {
    let parts: Vec<&str> = pattern.split('…').collect();
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !line.starts_with(first) {
        return false;
    }
    if parts.len() == 1 {
        return line == first;
    }
    let mut at = first.len();
    for p in &parts[1..parts.len() - 1] {
        match line[at..].find(p) {
            Some(i) => at += i + p.len(),
            None => return false,
        }
    }
    line.len() >= at + last.len() && line[at..].ends_with(last)
}

/// Every expected line is shown, in order (other lines may come between).
fn shows(expect: &[String], output: &str) -> Result<(), String> {
    let mut lines = output.lines().map(|l| l.trim_end_matches('\r'));
    for e in expect {
        if !lines.any(|l| line_matches(e, l)) {
            return Err(e.clone());
        }
    }
    Ok(())
}

/// `scripts/run-local`, in its own process group (it starts moto beside the daemon).
struct RunLocal {
    child: Child,
}

impl Drop for RunLocal {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}

#[test]
fn walkthrough_parsing_and_matching() {
    let steps = walkthrough(
        "x\n## Walkthrough with curl\n```sh\na=1\n#> one…\n#> …three\nb\n```\n```toml\nno\n```\n## Next\n```sh\nnot\n```\n",
    );
    assert_eq!(steps.len(), 2, "{steps:?}");
    assert_eq!(steps[0].code, "a=1\n");
    assert_eq!(steps[0].expect, ["one…", "…three"]);
    assert_eq!(steps[1].code, "b\n");
    assert!(line_matches(
        "{\"id\":\"…\",…\"x\":1}",
        "{\"id\":\"ab\",\"y\":2,\"x\":1}"
    ));
    assert!(!line_matches(
        "{\"id\":\"…\",…\"x\":1}",
        "{\"id\":\"ab\",\"y\":2,\"x\":2}"
    ));
    assert!(!line_matches("state    succeeded", "state    succeeded!"));
    assert!(line_matches("a…a", "aa") && !line_matches("a…a", "a"));
    assert!(shows(&["b".into(), "d…".into()], "a\nb\nc\nd1\n").is_ok());
    assert_eq!(shows(&["d".into(), "b".into()], "b\nd\n"), Err("b".into()));
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_walkthrough_runs_as_written() {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("README.md");
    let steps = walkthrough(&readme);
    assert!(
        steps.iter().filter(|s| !s.expect.is_empty()).count() >= 10,
        "the walkthrough shows fewer answers than expected: {steps:#?}"
    );

    // The set-up scripts/run-local makes, on free ports, its database and logs in a temp dir.
    let work = tempfile::tempdir().expect("temp dir");
    let w = work.path();
    let (moto_port, port) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{port}");
    let database = format!("sqlite://{}/ec2jobd.db", w.display());
    let log = std::fs::File::create(w.join("run-local.log")).expect("log");
    use std::os::unix::process::CommandExt;
    let child = Command::new(repo().join("scripts/run-local"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("MOTO_PORT", moto_port.to_string())
        .env("RUN_DIR", w.join("run"))
        .env("RUN_LOCAL_BIN", bin())
        .env("EC2JOBD_DATABASE", &database)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("run scripts/run-local");
    let mut run_local = RunLocal { child };
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while !http
        .get(format!("{url}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        let exited = run_local.child.try_wait().ok().flatten();
        assert!(
            exited.is_none() && Instant::now() < deadline,
            "scripts/run-local did not serve within 120 s (exit: {exited:?}):\n{}",
            std::fs::read_to_string(w.join("run-local.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The walkthrough's shell: at the top of a checkout (config/ and target/debug/ as in the
    // repository), one bash for every block so variables carry over, each step's output kept.
    let top = w.join("checkout");
    std::fs::create_dir_all(top.join("target")).expect("mkdir");
    std::os::unix::fs::symlink(repo().join("config"), top.join("config")).expect("symlink");
    let bin_dir = Path::new(bin()).parent().expect("binary's directory");
    std::os::unix::fs::symlink(bin_dir, top.join("target/debug")).expect("symlink");
    let mut script = String::from("set -euo pipefail\n");
    for (i, s) in steps.iter().enumerate() {
        let code = s.code.replace("http://127.0.0.1:8080", &url);
        script.push_str(&format!(
            "echo {i} > {w}/step\n{{\n{code}\n}} > {w}/out.{i} 2> {w}/err.{i}\n",
            w = w.display()
        ));
    }
    let run = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new("bash")
            .arg("-c")
            .arg(&script)
            .current_dir(&top)
            .env("EC2JOBD_DATABASE", &database)
            .env_remove("EC2JOBD_URL")
            .env_remove("EC2JOBD_TOKEN")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the walkthrough ran within 300 s")
    .expect("run bash");
    let read = |name: String| std::fs::read_to_string(w.join(name)).unwrap_or_default();
    if !run.status.success() {
        let i: usize = read("step".into()).trim().parse().unwrap_or(0);
        panic!(
            "README step {i} failed ({}):\n{}\n--- stdout:\n{}\n--- stderr:\n{}{}",
            run.status,
            steps[i].code,
            read(format!("out.{i}")),
            read(format!("err.{i}")),
            String::from_utf8_lossy(&run.stderr)
        );
    }
    for (i, s) in steps.iter().enumerate() {
        let out = read(format!("out.{i}"));
        if let Err(missing) = shows(&s.expect, &out) {
            panic!(
                "README step {i} does not answer as written: no line like `{missing}`\n{}\n--- stdout:\n{out}\n--- stderr:\n{}",
                s.code,
                read(format!("err.{i}"))
            );
        }
    }
}

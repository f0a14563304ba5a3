//! The command-line client: `ec2jobd submit` and `ec2jobd jobs …` talk to a running daemon over
//! HTTP, for schedulers that run a command and read its exit code.
//!
//! The daemon is `--url` / `EC2JOBD_URL` (default `http://127.0.0.1:8080`); the token comes only from
//! `EC2JOBD_TOKEN`, so it never shows in process listings. Exit codes: 0 the job succeeded (or the
//! command did what it was asked), 1 the job failed or was cancelled, 2 the wait timed out with the
//! job still going, 3 the daemon refused the request (4xx; also bad command-line input), 4 the daemon
//! could not be reached or failed (5xx).

use std::io::{IsTerminal, Read, Write};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Value};

/// Exit codes of client commands.
pub mod exit {
    /// The job succeeded (or the command did what it was asked).
    pub const OK: u8 = 0;
    /// The job failed or was cancelled.
    pub const FAILED: u8 = 1;
    /// `--wait` ran out of time; the job goes on.
    pub const TIMED_OUT: u8 = 2;
    /// The daemon refused the request (4xx), or the command line was wrong.
    pub const REJECTED: u8 = 3;
    /// The daemon could not be reached, was too busy (429), or answered 5xx, after retrying.
    pub const UNREACHABLE: u8 = 4;
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// The job document as JSON.
    Json,
    /// A short human table.
    Table,
    /// `KEY=value` lines from `/v1/jobs/{id}/outputs` (for `eval` in shell schedulers).
    Env,
    /// Only the job id (`JOB=$(ec2jobd submit … --output id)`); one id per line for lists.
    Id,
}

/// The daemon's URL when neither `--url` nor `EC2JOBD_URL` says otherwise.
const DEFAULT_URL: &str = "http://127.0.0.1:8080";

/// The local URL of a daemon listening on `listen` (`0.0.0.0:9090` → `http://127.0.0.1:9090`);
/// `None` for what is not an address and port.
fn listen_url(listen: &str) -> Option<String> {
    let addr: std::net::SocketAddr = listen.trim().parse().ok()?;
    let ip = match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => std::net::Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    Some(format!(
        "http://{}",
        std::net::SocketAddr::new(ip, addr.port())
    ))
}

/// Where the daemon is.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Daemon base URL (`ec2jobd health` without it checks `EC2JOBD_LISTEN`'s port when that is
    /// set).
    #[arg(long, env = "EC2JOBD_URL", default_value = DEFAULT_URL)]
    pub url: String,
    /// PEM file of CA certificates to trust for an `https://` URL, besides the system's roots
    /// (a private CA's, or the certificate a TLS proxy in front of the daemon presents).
    #[arg(long, env = "EC2JOBD_CACERT")]
    pub cacert: Option<std::path::PathBuf>,
    /// How results are printed.
    #[arg(long, value_enum, default_value = "table")]
    pub output: Output,
}

impl Conn {
    /// The HTTP client for this daemon: system roots plus `--cacert`, and `timeout` if any.
    fn http(&self, timeout: Option<std::time::Duration>) -> R<reqwest::Client> {
        let b = match &self.cacert {
            Some(path) => {
                crate::https::builder_trusting(path).map_err(|e| Fail(exit::REJECTED, e))?
            }
            None => crate::https::builder(),
        };
        let b = match timeout {
            Some(t) => b.timeout(t),
            None => b,
        };
        // The daemon records the CLI as the door its requests came through.
        b.user_agent(crate::auth::CLI_USER_AGENT)
            .build()
            .map_err(|e| Fail(exit::UNREACHABLE, format!("HTTP client: {e}")))
    }
}

/// `ec2jobd submit`.
#[derive(Args, Debug)]
pub struct Submit {
    /// Action: a full name (`start_instances`) or a short one (`start`, `stop`, `reboot`,
    /// `terminate`, `describe`, `run`, `tag`, `untag`, `snapshot`, `image`, `resize` or `modify`,
    /// `audit`); not needed with `--spec`.
    pub action: Option<String>,
    /// Job spec as JSON from a file, or `-` for stdin; flags below override its fields.
    #[arg(long)]
    pub spec: Option<String>,
    /// Target instance id (repeatable).
    #[arg(long = "id")]
    pub ids: Vec<String>,
    /// Target tag `Key=Value` (repeatable; all must match).
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Action parameter `key=value` (value parsed as JSON when it is, else a string; repeatable).
    #[arg(long = "param")]
    pub params: Vec<String>,
    /// Account name.
    #[arg(long)]
    pub account: Option<String>,
    /// Region.
    #[arg(long)]
    pub region: Option<String>,
    /// What to wait for: none, running, stopped, terminated, status_ok, completed.
    #[arg(long)]
    pub until: Option<String>,
    /// How often the daemon checks while it waits (the spec's `wait.interval`, e.g. `15s`).
    #[arg(long)]
    pub interval: Option<String>,
    /// Shorthand for `--until status_ok --wait`.
    #[arg(long)]
    pub wait_status_ok: bool,
    /// Pass DryRun to EC2.
    #[arg(long)]
    pub dry_run: bool,
    /// Idempotency key (repeat the command safely); by default one is generated for this
    /// invocation, so its own retries after a lost answer never submit twice.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Print the idempotency key used (on stderr).
    #[arg(long)]
    pub verbose: bool,
    /// Wait for the job to end, showing progress on stderr.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (exit 2; the job goes on).
    #[arg(long, default_value = "1h")]
    pub wait_timeout: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// `ec2jobd run`.
#[derive(Args, Debug)]
pub struct RunTemplate {
    /// Template name.
    pub template: String,
    /// Parameter values `key=value` (JSON values allowed: `count=3`, `ids=["i-1"]`).
    pub values: Vec<String>,
    /// Idempotency key; generated for this invocation when not given.
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Print the idempotency key used (on stderr).
    #[arg(long)]
    pub verbose: bool,
    /// Wait for the job to end, showing progress on stderr.
    #[arg(long)]
    pub wait: bool,
    /// Give up waiting after this long (exit 2; the job goes on).
    #[arg(long, default_value = "1h")]
    pub wait_timeout: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// `ec2jobd run`: a job from a saved template.
pub async fn run_template(r: RunTemplate) -> R<u8> {
    let mut params = serde_json::Map::new();
    for kv in &r.values {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| Fail(exit::REJECTED, format!("`{kv}`: use key=value")))?;
        params.insert(
            k.to_string(),
            serde_json::from_str(v).unwrap_or_else(|_| json!(v)),
        );
    }
    let client = Client::new(&r.conn)?;
    let limit = duration(&r.wait_timeout, "--wait-timeout")?;
    let key = idempotency_key(r.idempotency_key.as_deref(), r.verbose);
    let (_, text) = client
        .submit(
            &format!("/v1/templates/{}/run", r.template),
            &json!({"parameters": params}),
            &key,
        )
        .await?;
    client.answer(&text, r.wait, limit, r.conn.output).await
}

/// `ec2jobd jobs …`.
#[derive(Subcommand, Debug)]
pub enum JobsCmd {
    /// List jobs, newest first.
    List {
        /// Only this state.
        #[arg(long)]
        state: Option<String>,
        /// Only this action.
        #[arg(long)]
        action: Option<String>,
        /// Only jobs submitted with this token (its name), or queued by an SNS hook (`sns:HOOK`).
        #[arg(long)]
        created_by: Option<String>,
        /// Most jobs.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one job (exit code from its state: 0 succeeded, 1 failed/cancelled, 2 not ended).
    Get {
        /// Job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Follow a job until it ends, showing progress.
    Watch {
        /// Job id.
        id: String,
        /// Give up after this long (exit 2).
        #[arg(long, default_value = "1h")]
        wait_timeout: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Print the job's flat outputs (`--output env` for `KEY=value` lines).
    Outputs {
        /// Job id.
        id: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// `ec2jobd schedules …`.
#[derive(Subcommand, Debug)]
pub enum SchedulesCmd {
    /// List schedules with their next firing.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Show one schedule: its definition, next 10 firings, newest job and overrides.
    Get {
        /// Schedule name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Pause a schedule (admin): nothing fires until it is resumed.
    Pause {
        /// Schedule name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
    /// Resume a paused schedule (admin); firings missed meanwhile are not caught up.
    Resume {
        /// Schedule name.
        name: String,
        #[command(flatten)]
        conn: Conn,
    },
}

/// A failure with the exit code it maps to.
pub struct Fail(pub u8, pub String);

type R<T> = Result<T, Fail>;

/// The CLI's short action names and the actions they stand for (`submit --help` lists them; a
/// test checks it lists every one).
pub const SHORT_ACTIONS: &[(&str, &str)] = &[
    ("start", "start_instances"),
    ("stop", "stop_instances"),
    ("reboot", "reboot_instances"),
    ("terminate", "terminate_instances"),
    ("describe", "describe_instances"),
    ("run", "run_instances"),
    ("tag", "create_tags"),
    ("untag", "delete_tags"),
    ("snapshot", "create_snapshots"),
    ("image", "create_image"),
    ("resize", "modify_instance_attribute"),
    ("modify", "modify_instance_attribute"),
    ("audit", "audit_tags"),
];

/// The action a short or full name stands for; an unknown name is refused with the closest
/// names (a did-you-mean) and the short ones.
fn short_action(a: &str) -> R<&'static str> {
    if let Some((_, full)) = SHORT_ACTIONS.iter().find(|(short, _)| *short == a) {
        return Ok(full);
    }
    if let Some(action) = ec2jobd_spec::Action::parse(a) {
        return Ok(action.as_str());
    }
    let names = SHORT_ACTIONS
        .iter()
        .map(|(short, _)| *short)
        .chain(ec2jobd_spec::Action::ALL.iter().map(|a| a.as_str()));
    let closest = names
        .map(|n| (strsim::damerau_levenshtein(a, n), n))
        .filter(|(d, n)| *d <= 2.max(n.len() / 4))
        .min();
    let hint = closest.map_or(String::new(), |(_, n)| format!(" did you mean `{n}`?"));
    let shorts: Vec<&str> = SHORT_ACTIONS.iter().map(|(s, _)| *s).collect();
    Err(Fail(
        exit::REJECTED,
        format!(
            "unknown action `{a}`;{hint} Short names: {}; or a full name (`ec2jobd submit --help`)",
            shorts.join(", ")
        ),
    ))
}

struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Client {
    fn new(conn: &Conn) -> R<Client> {
        let token = std::env::var("EC2JOBD_TOKEN").map_err(|_| {
            Fail(
                exit::REJECTED,
                "set EC2JOBD_TOKEN to an API token (ec2jobd token create)".into(),
            )
        })?;
        Ok(Client {
            http: conn.http(None)?,
            base: conn.url.trim_end_matches('/').to_string(),
            token,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
    ) -> R<(u16, String)> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        if let Some(k) = key {
            req = req.header("Idempotency-Key", k);
        }
        let r = req.send().await.map_err(|e| {
            Fail(
                exit::UNREACHABLE,
                format!("cannot reach {}: {}", self.base, crate::error::causes(&e)),
            )
        })?;
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        match status {
            200..=299 => Ok((status, text)),
            429 => Err(Fail(
                exit::UNREACHABLE,
                format!("daemon busy (429): {text}"),
            )),
            400..=499 => {
                let p: Value = serde_json::from_str(&text).unwrap_or_default();
                let field = p["field"]
                    .as_str()
                    .map(|f| format!(" (field {f})"))
                    .unwrap_or_default();
                Err(Fail(
                    exit::REJECTED,
                    format!(
                        "{status} {}: {}{field}",
                        p["code"].as_str().unwrap_or("rejected"),
                        p["detail"].as_str().unwrap_or(&text)
                    ),
                ))
            }
            _ => Err(Fail(
                exit::UNREACHABLE,
                format!("daemon answered {status}: {text}"),
            )),
        }
    }

    /// `call`, tried again with backoff while the daemon cannot be reached, is busy or fails
    /// (exit 4), until `until`; a refusal (4xx) is final. Says once on stderr that it retries.
    async fn call_retrying(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        key: Option<&str>,
        until: Instant,
    ) -> R<(u16, String)> {
        let mut delay = Duration::from_millis(250);
        let mut said = false;
        loop {
            match self.call(method.clone(), path, body, key).await {
                Err(Fail(code, msg))
                    if code == exit::UNREACHABLE && Instant::now() + delay < until =>
                {
                    if !said {
                        eprintln!("{msg}; retrying");
                        said = true;
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// A submission, with its idempotency key, retried for up to [`SUBMIT_RETRY`] when its answer
    /// is lost: the key makes a repeat return the job the first one stored.
    async fn submit(&self, path: &str, body: &Value, key: &str) -> R<(u16, String)> {
        let until = Instant::now() + SUBMIT_RETRY;
        self.call_retrying(reqwest::Method::POST, path, Some(body), Some(key), until)
            .await
    }

    /// The job, read again while the daemon cannot be reached until `until`.
    async fn job_until(&self, id: &str, until: Instant) -> R<Value> {
        let (_, t) = self
            .call_retrying(
                reqwest::Method::GET,
                &format!("/v1/jobs/{id}"),
                None,
                None,
                until,
            )
            .await?;
        serde_json::from_str(&t).map_err(|e| Fail(exit::UNREACHABLE, format!("bad answer: {e}")))
    }

    async fn job(&self, id: &str) -> R<Value> {
        let (_, t) = self
            .call(reqwest::Method::GET, &format!("/v1/jobs/{id}"), None, None)
            .await?;
        serde_json::from_str(&t).map_err(|e| Fail(exit::UNREACHABLE, format!("bad answer: {e}")))
    }

    /// Polls until the job ends or `limit` passes, showing progress on stderr.
    async fn follow(&self, mut job: Value, limit: Duration) -> R<Value> {
        let tty = std::io::stderr().is_terminal();
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        loop {
            let state = job["state"].as_str().unwrap_or("").to_string();
            let line = format!(
                "{} {}: {}",
                job["id"].as_str().unwrap_or(""),
                state,
                job["progress"]["message"].as_str().unwrap_or("")
            );
            if line != last {
                let mut err = std::io::stderr();
                if tty {
                    let _ = write!(err, "\r\x1b[2K{line}");
                } else {
                    let _ = writeln!(err, "{line}");
                }
                let _ = err.flush();
                last = line;
            }
            if matches!(state.as_str(), "succeeded" | "failed" | "cancelled") {
                if tty {
                    eprintln!();
                }
                return Ok(job);
            }
            if Instant::now() >= deadline {
                if tty {
                    eprintln!();
                }
                return Err(Fail(
                    exit::TIMED_OUT,
                    format!(
                        "job {} still {state} after the wait; it goes on",
                        job["id"].as_str().unwrap_or("")
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(500).min(deadline - Instant::now())).await;
            // A dropped connection or a restarting daemon is not the job's outcome: keep reading
            // until the wait runs out.
            job = match self
                .job_until(job["id"].as_str().unwrap_or(""), deadline)
                .await
            {
                Ok(j) => j,
                Err(Fail(exit::UNREACHABLE, _)) if Instant::now() >= deadline => continue,
                Err(e) => return Err(e),
            };
        }
    }

    /// A submission's answer: printed at once, or followed to the end first with `wait`.
    async fn answer(&self, text: &str, wait: bool, limit: Duration, output: Output) -> R<u8> {
        let job: Value = serde_json::from_str(text)
            .map_err(|e| Fail(exit::UNREACHABLE, format!("bad answer: {e}")))?;
        if !wait {
            self.print(&job, output).await?;
            return Ok(exit::OK);
        }
        let job = self.follow(job, limit).await?;
        self.print(&job, output).await?;
        Ok(exit_for(&job))
    }

    async fn print(&self, job: &Value, output: Output) -> R<()> {
        match output {
            Output::Id => println!("{}", job["id"].as_str().unwrap_or("")),
            Output::Json => println!("{}", serde_json::to_string_pretty(job).unwrap_or_default()),
            Output::Table => {
                println!("id       {}", job["id"].as_str().unwrap_or(""));
                println!("action   {}", job["action"].as_str().unwrap_or(""));
                println!("state    {}", job["state"].as_str().unwrap_or(""));
                if let Some(s) = job["results"]["summary"].as_str() {
                    println!("summary  {s}");
                }
                if let Some(e) = job["error"].as_object() {
                    println!(
                        "error    {}: {}",
                        e["code"].as_str().unwrap_or(""),
                        e["message"].as_str().unwrap_or("")
                    );
                }
                for i in job["results"]["instances"].as_array().into_iter().flatten() {
                    println!(
                        "  {}  {}  {}",
                        i["instance_id"].as_str().unwrap_or(""),
                        i["state"].as_str().unwrap_or(""),
                        i["checks"].as_str().or(i["outcome"].as_str()).unwrap_or("")
                    );
                }
            }
            Output::Env => {
                let id = job["id"].as_str().unwrap_or("");
                let (_, t) = self
                    .call(
                        reqwest::Method::GET,
                        &format!("/v1/jobs/{id}/outputs?format=env"),
                        None,
                        None,
                    )
                    .await?;
                print!("{t}");
            }
        }
        Ok(())
    }
}

/// How long a submission is retried when the daemon cannot be reached or its answer is lost.
const SUBMIT_RETRY: Duration = Duration::from_secs(60);

/// The key a submission carries: the one given, or one generated for this invocation.
fn idempotency_key(given: Option<&str>, verbose: bool) -> String {
    let key = given
        .map(String::from)
        .unwrap_or_else(|| format!("ec2jobd-cli-{}", ulid::Ulid::new()));
    if verbose {
        eprintln!("idempotency key: {key}");
    }
    key
}

fn exit_for(job: &Value) -> u8 {
    match job["state"].as_str() {
        Some("succeeded") => exit::OK,
        Some("failed" | "cancelled") => exit::FAILED,
        _ => exit::TIMED_OUT,
    }
}

fn duration(s: &str, flag: &str) -> R<Duration> {
    humantime::parse_duration(s).map_err(|e| {
        Fail(
            exit::REJECTED,
            format!("{flag}: `{s}` is not a duration ({e})"),
        )
    })
}

fn build_spec(s: &Submit) -> R<Value> {
    let bad = |m: String| Fail(exit::REJECTED, m);
    let mut spec: Value = match s.spec.as_deref() {
        None => json!({}),
        Some(src) => {
            let text = if src == "-" {
                let mut t = String::new();
                std::io::stdin()
                    .read_to_string(&mut t)
                    .map_err(|e| bad(format!("--spec -: {e}")))?;
                t
            } else {
                std::fs::read_to_string(src).map_err(|e| bad(format!("--spec {src}: {e}")))?
            };
            serde_json::from_str(&text).map_err(|e| bad(format!("--spec {src}: not JSON ({e})")))?
        }
    };
    if !spec.is_object() {
        return Err(bad("--spec: a job spec is a JSON object".into()));
    }
    if let Some(a) = &s.action {
        spec["action"] = json!(short_action(a)?);
    }
    if spec.get("action").is_none() {
        return Err(bad(
            "give an action (e.g. `ec2jobd submit start --tag AutoOn=yes`) or --spec".into(),
        ));
    }
    if !s.ids.is_empty() {
        spec["targets"]["instance_ids"] = json!(s.ids);
    }
    for t in &s.tags {
        let (k, v) = t
            .split_once('=')
            .ok_or_else(|| bad(format!("--tag {t}: use Key=Value")))?;
        spec["targets"]["tags"][k] = json!(v);
    }
    for p in &s.params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| bad(format!("--param {p}: use key=value")))?;
        spec["params"][k] = serde_json::from_str(v).unwrap_or_else(|_| json!(v));
    }
    if let Some(a) = &s.account {
        spec["account"] = json!(a);
    }
    if let Some(r) = &s.region {
        spec["region"] = json!(r);
    }
    if s.wait_status_ok {
        spec["wait"]["until"] = json!("status_ok");
    }
    if let Some(u) = &s.until {
        spec["wait"]["until"] = json!(u);
    }
    if let Some(i) = &s.interval {
        spec["wait"]["interval"] = json!(i);
    }
    if s.dry_run {
        spec["dry_run"] = json!(true);
    }
    Ok(spec)
}

/// `ec2jobd submit`.
pub async fn submit(s: Submit) -> R<u8> {
    let spec = build_spec(&s)?;
    let client = Client::new(&s.conn)?;
    let wait = s.wait || s.wait_status_ok;
    let limit = duration(&s.wait_timeout, "--wait-timeout")?;
    let key = idempotency_key(s.idempotency_key.as_deref(), s.verbose);
    let (_, text) = client.submit("/v1/jobs", &spec, &key).await?;
    client.answer(&text, wait, limit, s.conn.output).await
}

/// `ec2jobd jobs …`.
/// `v` for a query string: everything but unreserved characters percent-encoded.
fn query_value(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `ec2jobd health`: the daemon's readiness, without a token (readiness is public).
pub async fn health(mut conn: Conn) -> R<u8> {
    // Where only the daemon's own address is set (a container's `EC2JOBD_LISTEN`), check that
    // address instead of the default URL.
    if std::env::var_os("EC2JOBD_URL").is_none() && conn.url == DEFAULT_URL {
        if let Some(url) = std::env::var("EC2JOBD_LISTEN")
            .ok()
            .and_then(|l| listen_url(&l))
        {
            conn.url = url;
        }
    }
    let url = format!("{}/readyz", conn.url.trim_end_matches('/'));
    let http = conn.http(Some(std::time::Duration::from_secs(5)))?;
    match http.get(&url).send().await {
        Ok(r) if r.status().is_success() => Ok(exit::OK),
        Ok(r) => Err(Fail(
            exit::UNREACHABLE,
            format!("{url} answered {}", r.status()),
        )),
        Err(e) => Err(Fail(
            exit::UNREACHABLE,
            format!("{url}: {}", crate::error::causes(&e)),
        )),
    }
}

pub async fn jobs(cmd: JobsCmd) -> R<u8> {
    match cmd {
        JobsCmd::List {
            state,
            action,
            created_by,
            limit,
            conn,
        } => {
            let client = Client::new(&conn)?;
            let mut q = format!("?limit={limit}");
            if let Some(s) = state {
                q.push_str(&format!("&state={s}"));
            }
            if let Some(a) = action {
                q.push_str(&format!("&action={a}"));
            }
            if let Some(by) = created_by {
                q.push_str(&format!("&created_by={}", query_value(&by)));
            }
            let (_, t) = client
                .call(reqwest::Method::GET, &format!("/v1/jobs{q}"), None, None)
                .await?;
            let page: Value = serde_json::from_str(&t).unwrap_or_default();
            match conn.output {
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&page).unwrap_or_default()
                ),
                Output::Id => {
                    for j in page["jobs"].as_array().into_iter().flatten() {
                        println!("{}", j["id"].as_str().unwrap_or(""));
                    }
                }
                Output::Table | Output::Env => {
                    for j in page["jobs"].as_array().into_iter().flatten() {
                        println!(
                            "{}  {:<10} {:<26} {:<16} {}",
                            j["id"].as_str().unwrap_or(""),
                            j["state"].as_str().unwrap_or(""),
                            j["action"].as_str().unwrap_or(""),
                            j["created_by"].as_str().unwrap_or("-"),
                            j["results"]["summary"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            Ok(exit::OK)
        }
        JobsCmd::Get { id, conn } => {
            let client = Client::new(&conn)?;
            let job = client.job(&id).await?;
            client.print(&job, conn.output).await?;
            Ok(exit_for(&job))
        }
        JobsCmd::Cancel { id, conn } => {
            let client = Client::new(&conn)?;
            let (_, t) = client
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/jobs/{id}/cancel"),
                    None,
                    None,
                )
                .await?;
            let job: Value = serde_json::from_str(&t).unwrap_or_default();
            client.print(&job, conn.output).await?;
            Ok(exit::OK)
        }
        JobsCmd::Watch {
            id,
            wait_timeout,
            conn,
        } => {
            let client = Client::new(&conn)?;
            let limit = duration(&wait_timeout, "--wait-timeout")?;
            let job = client.follow(client.job(&id).await?, limit).await?;
            client.print(&job, conn.output).await?;
            Ok(exit_for(&job))
        }
        JobsCmd::Outputs { id, conn } => {
            let client = Client::new(&conn)?;
            let format = if conn.output == Output::Env {
                "env"
            } else {
                "json"
            };
            let (_, t) = client
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/jobs/{id}/outputs?format={format}"),
                    None,
                    None,
                )
                .await?;
            print!("{t}");
            if format == "json" {
                println!();
            }
            Ok(exit::OK)
        }
    }
}

/// What a schedule does when, in a few words: its cron and zone, or its window.
fn schedule_when(s: &Value) -> String {
    if let Some(w) = s.get("window").filter(|w| w.is_object()) {
        return format!(
            "window {}-{} {} {}",
            w["start"].as_str().unwrap_or(""),
            w["stop"].as_str().unwrap_or(""),
            w["days"].as_str().unwrap_or("*"),
            w["time_zone"].as_str().unwrap_or("")
        );
    }
    format!(
        "{} {}",
        s["cron"].as_str().unwrap_or(""),
        s["time_zone"].as_str().unwrap_or("UTC")
    )
}

fn schedule_status(s: &Value) -> &'static str {
    if s["enabled"] == Value::Bool(false) {
        "paused"
    } else {
        "active"
    }
}

fn print_schedule(info: &Value, output: Output) {
    if output == Output::Json {
        println!("{}", serde_json::to_string_pretty(info).unwrap_or_default());
        return;
    }
    let s = &info["schedule"];
    println!(
        "{} ({}, {})",
        info["name"].as_str().unwrap_or(""),
        info["source"].as_str().unwrap_or(""),
        schedule_status(s)
    );
    if let Some(d) = s["description"].as_str() {
        println!("  {d}");
    }
    println!("  when: {}", schedule_when(s));
    let next: Vec<String> = info["next"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            format!(
                "{} {}",
                n["at"].as_str().unwrap_or(""),
                n["fires"].as_str().unwrap_or("")
            )
        })
        .collect();
    if next.is_empty() {
        println!("  next: none");
    } else {
        println!("  next:");
        for n in next {
            println!("    {n}");
        }
    }
    if let Some(j) = info.get("last_job").filter(|j| j.is_object()) {
        println!(
            "  last job: {} {} ({})",
            j["id"].as_str().unwrap_or(""),
            j["state"].as_str().unwrap_or(""),
            j["created_at"].as_str().unwrap_or("")
        );
    }
    if let Some(o) = info["overrides"].as_object() {
        for (id, h) in o {
            println!(
                "  override {id}: {} until {}",
                h["state"].as_str().unwrap_or(""),
                h["until"].as_str().unwrap_or("")
            );
        }
    }
}

pub async fn schedules(cmd: SchedulesCmd) -> R<u8> {
    let (method, path, conn) = match cmd {
        SchedulesCmd::List { conn } => {
            let client = Client::new(&conn)?;
            let (_, t) = client
                .call(reqwest::Method::GET, "/v1/schedules", None, None)
                .await?;
            let all: Value = serde_json::from_str(&t).unwrap_or_default();
            if conn.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&all).unwrap_or_default());
                return Ok(exit::OK);
            }
            for s in all.as_array().into_iter().flatten() {
                let next = s["next"][0]["at"].as_str().unwrap_or("-");
                println!(
                    "{:<24} {:<6} {:<6} {:<40} next {}",
                    s["name"].as_str().unwrap_or(""),
                    s["source"].as_str().unwrap_or(""),
                    schedule_status(&s["schedule"]),
                    schedule_when(&s["schedule"]),
                    next
                );
            }
            return Ok(exit::OK);
        }
        SchedulesCmd::Get { name, conn } => (
            reqwest::Method::GET,
            format!("/v1/schedules/{}", query_value(&name)),
            conn,
        ),
        SchedulesCmd::Pause { name, conn } => (
            reqwest::Method::POST,
            format!("/v1/schedules/{}/pause", query_value(&name)),
            conn,
        ),
        SchedulesCmd::Resume { name, conn } => (
            reqwest::Method::POST,
            format!("/v1/schedules/{}/resume", query_value(&name)),
            conn,
        ),
    };
    let client = Client::new(&conn)?;
    let (_, t) = client.call(method, &path, None, None).await?;
    let info: Value = serde_json::from_str(&t).unwrap_or_default();
    print_schedule(&info, conn.output);
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_address_is_checked_locally() {
        assert_eq!(
            listen_url("0.0.0.0:9090").as_deref(),
            Some("http://127.0.0.1:9090")
        );
        assert_eq!(
            listen_url("[::]:8081").as_deref(),
            Some("http://[::1]:8081")
        );
        assert_eq!(
            listen_url("10.0.0.5:80").as_deref(),
            Some("http://10.0.0.5:80")
        );
        assert_eq!(listen_url("localhost:80"), None);
    }

    #[test]
    fn action_names_short_full_and_misspelt() {
        assert_eq!(short_action("start").ok(), Some("start_instances"));
        assert_eq!(
            short_action("resize").ok(),
            Some("modify_instance_attribute")
        );
        assert_eq!(short_action("copy_image").ok(), Some("copy_image"));
        for (typo, meant) in [
            ("strat", "start"),
            ("stpo", "stop"),
            ("snapshots", "snapshot"),
            ("start_instance", "start_instances"),
        ] {
            let Err(Fail(code, msg)) = short_action(typo) else {
                panic!("{typo} was taken");
            };
            assert_eq!(code, exit::REJECTED);
            assert!(
                msg.contains(&format!("did you mean `{meant}`?")),
                "{typo}: {msg}"
            );
            assert!(msg.contains("start, stop, reboot"), "{msg}");
        }
        let Err(Fail(_, msg)) = short_action("frobnicate") else {
            panic!("frobnicate was taken");
        };
        assert!(!msg.contains("did you mean"), "{msg}");
    }
}

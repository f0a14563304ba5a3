//! End-to-end harness: a real moto server and the real `ec2jobd` binary on free ports, each with a
//! temporary directory, both killed when dropped. A missing `moto_server` fails the test with a
//! message saying how to install it; nothing is skipped silently.

#![allow(dead_code)]

pub mod browser;
pub mod proxy;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A moto server (EC2 and SNS) on a free loopback port.
pub struct Moto {
    child: Child,
    pub url: String,
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Moto {
    /// Starts one; waits up to two minutes (many tests start theirs at once on two cores, and
    /// moto's imports take seconds each), and starts again on another port when the first one
    /// exits (another test took the port between `free_port` and moto's bind).
    pub async fn start() -> Moto {
        let deadline = Instant::now() + Duration::from_secs(120);
        let http = reqwest::Client::new();
        'spawn: loop {
            let port = free_port();
            let child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!("cannot run `moto_server` ({e}): run scripts/test, which installs it (pip install 'moto[server]')")
                });
            let url = format!("http://127.0.0.1:{port}");
            let mut m = Moto { child, url };
            loop {
                if let Ok(r) = http.get(format!("{}/moto-api/", m.url)).send().await {
                    if r.status().is_success() {
                        return m;
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "moto_server did not start within 120s"
                );
                if let Ok(Some(status)) = m.child.try_wait() {
                    eprintln!("moto_server on port {port} exited ({status}); starting another");
                    continue 'spawn;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// The moto server's process id (benchmarks read its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The SDK config for this moto in us-east-1 (for clients that arrange and check directly,
    /// not through ec2jobd: EC2, SNS, SQS).
    pub async fn conf(&self) -> aws_config::SdkConfig {
        self.conf_in("us-east-1").await
    }

    /// The SDK config for this moto in `region`.
    pub async fn conf_in(&self, region: &str) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(region.to_string()))
            .endpoint_url(&self.url)
            .credentials_provider(aws_sdk_ec2::config::Credentials::new(
                "testing", "testing", None, None, "test",
            ))
            .load()
            .await
    }

    /// Creates the SNS topic `name` in moto; returns its ARN.
    pub async fn topic(&self, name: &str) -> String {
        aws_sdk_sns::Client::new(&self.conf().await)
            .create_topic()
            .name(name)
            .send()
            .await
            .expect("CreateTopic")
            .topic_arn()
            .expect("topic ARN")
            .to_string()
    }

    /// Creates the SQS queue `name` in moto with these attributes; returns its URL.
    pub async fn queue(&self, name: &str, attributes: &[(&str, &str)]) -> String {
        let mut c = aws_sdk_sqs::Client::new(&self.conf().await)
            .create_queue()
            .queue_name(name);
        for (k, v) in attributes {
            c = c.attributes(aws_sdk_sqs::types::QueueAttributeName::from(*k), *v);
        }
        c.send()
            .await
            .expect("CreateQueue")
            .queue_url()
            .expect("queue URL")
            .to_string()
    }

    /// An EC2 client talking to this moto directly.
    pub async fn ec2(&self) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&self.conf().await)
    }

    /// Launches `n` instances carrying `tags`; returns their ids.
    pub async fn launch(&self, n: i32, tags: &[(&str, &str)]) -> Vec<String> {
        use aws_sdk_ec2::types::{ResourceType, Tag, TagSpecification};
        let ec2 = self.ec2().await;
        let image = self.image().await;
        let mut spec = TagSpecification::builder().resource_type(ResourceType::Instance);
        for (k, v) in tags {
            spec = spec.tags(Tag::builder().key(*k).value(*v).build());
        }
        let mut req = ec2
            .run_instances()
            .image_id(image)
            .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
            .min_count(n)
            .max_count(n);
        if !tags.is_empty() {
            req = req.tag_specifications(spec.build());
        }
        let out = req.send().await.expect("run instances in moto");
        out.instances()
            .iter()
            .filter_map(|i| i.instance_id().map(String::from))
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a daemon is started with.
#[derive(Clone)]
pub struct DaemonOpts {
    pub moto_url: Option<String>,
    pub workers: usize,
    /// Extra TOML appended to the generated config (more accounts, other limits).
    pub extra: String,
    /// Extra environment variables of the daemon process.
    pub env: Vec<(String, String)>,
    /// Where the database lives (default: the daemon's temporary directory).
    pub database: Option<PathBuf>,
    /// A database URL instead (`postgres://…`, from [`postgres_database`]).
    pub database_url: Option<String>,
}

impl Default for DaemonOpts {
    fn default() -> Self {
        Self {
            moto_url: None,
            workers: 2,
            extra: String::new(),
            env: Vec::new(),
            database: None,
            database_url: None,
        }
    }
}

/// A running `ec2jobd serve` with its own directory and database.
pub struct Daemon {
    child: Option<Child>,
    pub url: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub admin: String,
    pub http: reqwest::Client,
    env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

/// The top of the checkout (README, scripts, config, openapi).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ec2jobd")
}

pub fn write_config(dir: &Path, opts: &DaemonOpts) -> PathBuf {
    let endpoint = opts
        .moto_url
        .as_ref()
        .map(|u| format!("endpoint_url = \"{u}\"\n"))
        .unwrap_or_default();
    let text = format!(
        r#"listen = "127.0.0.1:0"
database = "{db}"
shutdown_grace = "3s"

[accounts.default]
region = "us-east-1"
{endpoint}call_timeout = "20s"
retry_base = "20ms"
retry_max = "200ms"

[queue]
workers = {workers}
lease = "3s"
heartbeat = "500ms"
max_attempts = 3
backoff_base = "50ms"
backoff_max = "200ms"
poll_interval = "200ms"
reap_interval = "500ms"

[log]
level = "info,ec2jobd_server=debug"
{extra}
"#,
        db = opts.database_url.clone().unwrap_or_else(|| format!(
            "sqlite://{}",
            opts.database
                .clone()
                .unwrap_or_else(|| dir.join("ec2jobd.db"))
                .display()
        )),
        workers = opts.workers,
        extra = opts.extra,
    );
    let path = dir.join("ec2jobd.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// A new, empty database on the PostgreSQL server `scripts/test` started (`TEST_POSTGRES_URL`),
/// or `None` (said on stderr) when there is none.
pub fn postgres_database() -> Option<String> {
    let Ok(admin) = std::env::var("TEST_POSTGRES_URL") else {
        eprintln!("TEST_POSTGRES_URL is not set: skipped (scripts/test starts a server)");
        return None;
    };
    let name = format!("e2e_{}", ulid::Ulid::new().to_string().to_lowercase());
    let o = Command::new("psql")
        .args([
            admin.as_str(),
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            &format!("CREATE DATABASE {name}"),
        ])
        .output()
        .expect("psql runs");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    admin
        .rsplit_once('/')
        .map(|(base, _)| format!("{base}/{name}"))
}

/// The environment that runs a daemon with its clock `offset` off (`"+30s"`, `"-30s"`): Debian's
/// libfaketime preloaded, as its `faketime` command does (that command forks, so the daemon would
/// not be the child the tests signal). `scripts/ensure-clients` installs it and exports
/// `FAKETIME_LIB`.
pub fn faketime(offset: &str) -> Vec<(String, String)> {
    let lib = std::env::var("FAKETIME_LIB")
        .unwrap_or_else(|_| "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1".into());
    assert!(
        Path::new(&lib).exists(),
        "libfaketime is not at {lib}: install Debian's faketime (scripts/ensure-clients does)"
    );
    vec![
        ("LD_PRELOAD".into(), lib),
        ("FAKETIME".into(), offset.into()),
    ]
}

/// Runs `ec2jobd` with args and returns (status, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (std::process::ExitStatus, String, String) {
    let out = Command::new(bin())
        .args(args)
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("run ec2jobd");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Creates a token with the CLI against a config; returns the secret.
pub fn create_token(config: &Path, role: &str, name: &str) -> String {
    let (st, out, err) = run_cli(&[
        "token",
        "create",
        "--role",
        role,
        "--name",
        name,
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(st.success(), "token create failed: {err}");
    out.trim().to_string()
}

impl Daemon {
    pub async fn start(opts: DaemonOpts) -> Daemon {
        Self::in_own_dir(opts, None).await
    }

    /// Another daemon with a directory and config of its own, on a database an earlier one made
    /// (a replica sharing a PostgreSQL queue), authenticating with that one's admin token.
    pub async fn replica(opts: DaemonOpts, admin: String) -> Daemon {
        Self::in_own_dir(opts, Some(admin)).await
    }

    /// A daemon in a new temporary directory with its config; it creates its admin token unless
    /// given one.
    async fn in_own_dir(opts: DaemonOpts, admin: Option<String>) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let config = write_config(&dir, &opts);
        let admin = admin.unwrap_or_else(|| create_token(&config, "admin", "admin"));
        let mut d = Daemon {
            child: None,
            url: String::new(),
            dir,
            config,
            admin,
            http: reqwest::Client::new(),
            env: opts.env.clone(),
            _tmp: Some(tmp),
        };
        d.spawn().await;
        d
    }

    /// A second daemon on an existing config (e.g. sharing another's database).
    pub async fn attach(config: PathBuf, admin: String) -> Daemon {
        let dir = config.parent().expect("config dir").to_path_buf();
        let mut d = Daemon {
            child: None,
            url: String::new(),
            dir,
            config,
            admin,
            http: reqwest::Client::new(),
            env: Vec::new(),
            _tmp: None,
        };
        d.spawn().await;
        d
    }

    /// Starts the binary on the existing directory (again, after a kill).
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("daemon.log"))
            .expect("log file");
        let mut child = Command::new(bin())
            .args(["serve", "--config", self.config.to_str().unwrap()])
            .env("AWS_ACCESS_KEY_ID", "testing")
            .env("AWS_SECRET_ACCESS_KEY", "testing")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn ec2jobd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("daemon did not start; log:\n{}", self.log()));
        self.url = line
            .strip_prefix("ec2jobd listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        self.child = Some(child);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait up to `within` for a clean exit; returns the exit status.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + within;
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!("daemon did not exit within {within:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn req(&self, method: reqwest::Method, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(token)
    }

    pub async fn post_job(&self, token: &str, spec: &Value) -> reqwest::Response {
        self.req(reqwest::Method::POST, "/v1/jobs", token)
            .json(spec)
            .send()
            .await
            .expect("POST /v1/jobs")
    }

    /// Submits and expects 202; returns the job id.
    pub async fn submit(&self, spec: &Value) -> String {
        let r = self.post_job(&self.admin, spec).await;
        let status = r.status();
        let body: Value = r.json().await.expect("json");
        assert_eq!(status, 202, "submit failed: {body}");
        body["id"].as_str().expect("id").to_string()
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let r = self
            .req(reqwest::Method::GET, path, &self.admin)
            .send()
            .await
            .expect("GET");
        let s = r.status().as_u16();
        (s, r.json().await.unwrap_or(Value::Null))
    }

    /// The text an admin GET of `path` answers (events, reports, `KEY=value` outputs).
    pub async fn text(&self, path: &str) -> String {
        self.req(reqwest::Method::GET, path, &self.admin)
            .send()
            .await
            .expect("GET")
            .text()
            .await
            .expect("body")
    }

    pub async fn job(&self, id: &str) -> Value {
        let (s, v) = self.get_json(&format!("/v1/jobs/{id}")).await;
        assert_eq!(s, 200, "GET job {id}: {v}");
        v
    }

    /// Polls the job until it reaches a final state (or panics after `within`).
    pub async fn wait_final(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let j = self.job(id).await;
            if matches!(
                j["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} not final after {within:?}: {j}\nlog:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Polls until `f(job)` holds.
    pub async fn wait_for(&self, id: &str, within: Duration, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let j = self.job(id).await;
            if f(&j) {
                return j;
            }
            assert!(Instant::now() < deadline, "condition not met: {j}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A TCP endpoint that accepts connections and never answers: an EC2 call to it hangs until its
/// timeout, so a job stays `running` for as long as a test needs.
pub struct BlackHole {
    pub url: String,
    _keep: std::thread::JoinHandle<()>,
}

impl BlackHole {
    pub fn start() -> BlackHole {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let keep = std::thread::spawn(move || {
            let mut held = Vec::new();
            for s in l.incoming().flatten() {
                held.push(s);
            }
        });
        BlackHole { url, _keep: keep }
    }
}

/// A TCP forwarder to `upstream` that a test can cut off as a network partition does: while cut,
/// no byte moves either way and new connections are accepted but not forwarded, and nobody is
/// sent a reset (the peers only see silence); healed, everything carries on where it stopped.
pub struct TcpCut {
    /// `host:port` to connect to instead of the upstream.
    pub addr: String,
    cut: Arc<tokio::sync::watch::Sender<bool>>,
    _accept: tokio::task::JoinHandle<()>,
}

impl TcpCut {
    pub async fn start(upstream: &str) -> TcpCut {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr").to_string();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let upstream = upstream.to_string();
        let accept = tokio::spawn(async move {
            while let Ok((down, _)) = l.accept().await {
                let (rx, upstream) = (rx.clone(), upstream.clone());
                tokio::spawn(async move {
                    let mut open = rx.clone();
                    if open.wait_for(|cut| !cut).await.is_err() {
                        return;
                    }
                    let Ok(up) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    let (dr, dw) = down.into_split();
                    let (ur, uw) = up.into_split();
                    tokio::join!(Self::pipe(dr, uw, rx.clone()), Self::pipe(ur, dw, rx));
                });
            }
        });
        TcpCut {
            addr,
            cut: Arc::new(tx),
            _accept: accept,
        }
    }

    /// Copies one direction, holding still while the link is cut.
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        mut cut: tokio::sync::watch::Receiver<bool>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            if cut.wait_for(|c| !c).await.is_err() {
                return;
            }
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            // What was read while the cut began is held until it heals, like a dropped packet
            // that is sent again.
            if cut.wait_for(|c| !c).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }

    /// A cuttable link in front of the server of the PostgreSQL URL `database`, and the URL that
    /// goes through it.
    pub async fn before_postgres(database: &str) -> (TcpCut, String) {
        let (head, rest) = database.split_once('@').expect("user@host");
        let (server, name) = rest.split_once('/').expect("host/db");
        let link = TcpCut::start(server).await;
        let through = format!("{head}@{}/{name}", link.addr);
        (link, through)
    }

    /// Cuts the link (`true`) or heals it.
    pub fn set(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Moto {
    /// An AMI moto ships.
    pub async fn image(&self) -> String {
        self.ec2()
            .await
            .describe_images()
            .owners("amazon")
            .send()
            .await
            .expect("describe images")
            .images()
            .iter()
            .find_map(|i| i.image_id().map(String::from))
            .expect("moto ships images")
    }

    /// Instances (not terminated) carrying tag `key=value`, as moto sees them.
    pub async fn tagged(&self, key: &str, value: &str) -> Vec<String> {
        use aws_sdk_ec2::types::Filter;
        let out = self
            .ec2()
            .await
            .describe_instances()
            .filters(
                Filter::builder()
                    .name(format!("tag:{key}"))
                    .values(value)
                    .build(),
            )
            .send()
            .await
            .expect("describe in moto");
        out.reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter(|i| i.state().and_then(|s| s.name()).map(|n| n.as_str()) != Some("terminated"))
            .filter_map(|i| i.instance_id().map(String::from))
            .collect()
    }
}

impl Moto {
    /// Snapshots (any owner) whose tag `key` has `value`, as moto sees them: id → (volume, tags).
    pub async fn snapshots_tagged(
        &self,
        key: &str,
        value: &str,
    ) -> BTreeMap<String, (String, BTreeMap<String, String>)> {
        let out = self
            .ec2()
            .await
            .describe_snapshots()
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name(format!("tag:{key}"))
                    .values(value)
                    .build(),
            )
            .send()
            .await
            .expect("describe snapshots in moto");
        out.snapshots()
            .iter()
            .map(|s| {
                (
                    s.snapshot_id().unwrap_or_default().to_string(),
                    (
                        s.volume_id().unwrap_or_default().to_string(),
                        s.tags()
                            .iter()
                            .map(|t| {
                                (
                                    t.key().unwrap_or("").to_string(),
                                    t.value().unwrap_or("").to_string(),
                                )
                            })
                            .collect(),
                    ),
                )
            })
            .collect()
    }

    /// Ids of the AMIs this account owns whose tag `key` has `value`, as moto sees them.
    pub async fn images_tagged(&self, key: &str, value: &str) -> BTreeSet<String> {
        self.ec2()
            .await
            .describe_images()
            .owners("self")
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name(format!("tag:{key}"))
                    .values(value)
                    .build(),
            )
            .send()
            .await
            .expect("describe images in moto")
            .images()
            .iter()
            .filter_map(|i| i.image_id().map(String::from))
            .collect()
    }

    /// Instance states as moto sees them, in the order of `ids`.
    pub async fn states(&self, ids: &[String]) -> Vec<String> {
        let out = self
            .ec2()
            .await
            .describe_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .expect("describe in moto");
        let by_id: std::collections::HashMap<String, String> = out
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .map(|i| {
                (
                    i.instance_id().unwrap_or_default().to_string(),
                    i.state()
                        .and_then(|s| s.name())
                        .map(|n| n.as_str().to_string())
                        .unwrap_or_default(),
                )
            })
            .collect();
        ids.iter()
            .map(|id| by_id.get(id).cloned().unwrap_or_default())
            .collect()
    }

    /// Stops instances in moto directly (to arrange a test, not through ec2jobd).
    pub async fn stop(&self, ids: &[String]) {
        self.ec2()
            .await
            .stop_instances()
            .set_instance_ids(Some(ids.to_vec()))
            .send()
            .await
            .expect("stop in moto");
    }

    /// One instance's state as moto sees it.
    pub async fn state(&self, id: &str) -> String {
        self.states(&[id.to_string()]).await.remove(0)
    }
}

impl Daemon {
    /// The sum of every `/metrics` sample whose line starts with `prefix` and contains `part`.
    pub async fn metric_sum(&self, prefix: &str, part: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .filter(|l| l.starts_with(prefix) && l.contains(part))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    async fn metrics_text(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Resident set size of the daemon process in KiB (from /proc).
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// User + system CPU time of the daemon process so far.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }

    /// Whether the daemon process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The value of the first `/metrics` line starting with `prefix` (0 when absent).
    pub async fn metric(&self, prefix: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }
}

/// User + system CPU time of a process so far (from /proc/<pid>/stat; zero where unreadable).
pub fn cpu_time(pid: u32) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = s.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
            let utime: u64 = rest.get(11)?.parse().ok()?;
            let stime: u64 = rest.get(12)?.parse().ok()?;
            Some(utime + stime)
        })
        .unwrap_or(0);
    // USER_HZ is 100 on every Linux the daemon targets.
    Duration::from_millis(ticks * 10)
}

/// A daemon for benchmarks on `dir`: production defaults except pacing (off: moto is not AWS, unless
/// the extra TOML brings a `[pacing]` table) and a 200 ms idle poll, the given worker count, EC2
/// through `endpoint`. Its admin token is kept in
/// `dir/admin.token`, so a copy of the directory starts with the same token.
pub async fn bench_daemon(dir: &Path, endpoint: &str, workers: usize) -> Daemon {
    bench_daemon_with(dir, endpoint, workers, "").await
}

/// [`bench_daemon`] with more TOML appended to its config (e.g. a `[retention]` table); keys before
/// any table header go into `[queue]` (e.g. `max_waiting = 0`).
pub async fn bench_daemon_with(dir: &Path, endpoint: &str, workers: usize, extra: &str) -> Daemon {
    let db = format!("sqlite://{}", dir.join("bench.db").display());
    bench_daemon_on(dir, endpoint, workers, extra, &db).await
}

/// [`bench_daemon_with`] on the database `database` (a `postgres://` URL for replicas: each
/// replica needs a directory of its own; the first makes the token, the others are given it in
/// `dir/admin.token`).
pub async fn bench_daemon_on(
    dir: &Path,
    endpoint: &str,
    workers: usize,
    extra: &str,
    database: &str,
) -> Daemon {
    let tables = if extra.starts_with('[') {
        Some(0)
    } else {
        extra.find("\n[").map(|i| i + 1)
    };
    let (queue, extra) = extra.split_at(tables.unwrap_or(extra.len()));
    // Pacing is off (moto is not AWS) unless the caller brings its own `[pacing]`.
    let pacing = if extra.contains("[pacing]") {
        ""
    } else {
        "[pacing]\nenabled = false\n"
    };
    let config = dir.join("bench.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"{database}\"\n\
             [accounts.default]\nregion = \"us-east-1\"\nendpoint_url = \"{endpoint}\"\n\
             [queue]\nworkers = {workers}\npoll_interval = \"200ms\"\n{queue}\n\
             {pacing}[log]\nlevel = \"warn\"\n{extra}",
        ),
    )
    .expect("config");
    let token = dir.join("admin.token");
    if !token.exists() {
        std::fs::write(&token, create_token(&config, "admin", "bench")).expect("token file");
    }
    let admin = std::fs::read_to_string(&token).expect("token file");
    Daemon::attach(config, admin).await
}

/// A plain HTTP endpoint (an SNS HTTP subscriber, an OTLP/JSON receiver): keeps the JSON body of
/// every request it is sent and answers `200 {}`, one request per connection.
pub async fn json_sink() -> (String, Arc<Mutex<Vec<Value>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 65536];
            loop {
                let n = sock.read(&mut chunk).await.unwrap_or(0);
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..p]).to_lowercase();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0);
                    if buf.len() >= p + 4 + len {
                        if let Ok(v) = serde_json::from_slice::<Value>(&buf[p + 4..p + 4 + len]) {
                            g.lock().unwrap().push(v);
                        }
                        break;
                    }
                }
            }
            let _ = sock
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
                .await;
        }
    });
    (url, got)
}

/// A directory holding the test SNS signing certificate under the name [`sns_signed`]'s messages
/// point at, for `sns.cert_dir` (as an air-gapped host pre-seeds it).
pub fn sns_cert_dir() -> tempfile::TempDir {
    let certs = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        repo().join("tests/fixtures/sns-test-cert.pem"),
        certs
            .path()
            .join("SimpleNotificationService-0123456789abcdef.pem"),
    )
    .expect("copy the test certificate");
    certs
}

/// An SNS message with these signed fields (given in AWS's signing order), signed v2 with the
/// pinned test key; its certificate URL names the file the tests pre-seed.
pub fn sns_signed(fields: &[(&str, &str)]) -> String {
    use base64::Engine;
    use rsa::pkcs1v15::SigningKey;
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::signature::{SignatureEncoding, Signer};
    let text: String = fields.iter().map(|(k, v)| format!("{k}\n{v}\n")).collect();
    let key =
        rsa::RsaPrivateKey::from_pkcs8_pem(include_str!("../fixtures/sns-test-key.pem")).unwrap();
    let sig = SigningKey::<sha2::Sha256>::new(key)
        .sign(text.as_bytes())
        .to_vec();
    let mut body: serde_json::Map<String, Value> = fields
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    body.insert("SignatureVersion".into(), serde_json::json!("2"));
    body.insert(
        "Signature".into(),
        serde_json::json!(base64::engine::general_purpose::STANDARD.encode(sig)),
    );
    body.insert(
        "SigningCertURL".into(),
        serde_json::json!(
            "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0123456789abcdef.pem"
        ),
    );
    Value::Object(body).to_string()
}

/// A CloudWatch alarm for `instance` as SNS wraps it: a signed notification from `topic`.
pub fn signed_alarm(topic: &str, message_id: &str, instance: &str) -> String {
    let alarm = serde_json::json!({
        "AlarmName": "StatusCheckFailed-web", "NewStateValue": "ALARM", "OldStateValue": "OK",
        "Region": "US East (N. Virginia)",
        "Trigger": {"Namespace": "AWS/EC2", "MetricName": "StatusCheckFailed",
                    "Dimensions": [{"name": "InstanceId", "value": instance}]}
    });
    let now = chrono::Utc::now().to_rfc3339();
    sns_signed(&[
        ("Message", &alarm.to_string()),
        ("MessageId", message_id),
        ("Timestamp", &now),
        ("TopicArn", topic),
        ("Type", "Notification"),
    ])
}

/// An HTTP client that does not follow redirects (the dashboard answers forms with 303).
pub fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// Restarts the PostgreSQL server `scripts/ensure-postgres` started (fast shutdown: open
/// connections are cut, as when the server fails over), as the user that owns its cluster.
/// Returns how long the server was away.
pub fn restart_postgres() -> Duration {
    let data =
        std::env::var("TEST_POSTGRES_DATA").expect("TEST_POSTGRES_DATA (scripts/test sets it)");
    let bin = std::env::var("TEST_POSTGRES_BIN").expect("TEST_POSTGRES_BIN (scripts/test sets it)");
    let pg_ctl = format!("{bin}/pg_ctl");
    // pg_ctl does not remember the log file: without one the server would keep our pipes open.
    let log = Path::new(&data).with_file_name("server.log");
    let log = log.to_str().expect("a UTF-8 path");
    let args = [
        "-D",
        data.as_str(),
        "-l",
        log,
        "-m",
        "fast",
        "-w",
        "-t",
        "60",
        "restart",
    ];
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let started = Instant::now();
    let out = if root {
        Command::new("runuser")
            .args(["-u", "postgres", "--", pg_ctl.as_str()])
            .args(args)
            .output()
    } else {
        Command::new(&pg_ctl).args(args).output()
    }
    .expect("pg_ctl runs");
    assert!(
        out.status.success(),
        "pg_ctl restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    started.elapsed()
}

/// Benchmarks' load: `conns` connections submitting `body` for `secs`, spread over `targets`
/// (`/v1/jobs` URL, token) in turn. Returns the latency of every 202 (sorted), the number of
/// other answers and failed requests, and the seconds it ran.
pub async fn submit_load(
    targets: &[(String, String)],
    body: &'static str,
    secs: u64,
    conns: usize,
) -> (Vec<Duration>, u64, f64) {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(conns)
        .build()
        .expect("client");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (client, (url, token)) = (client.clone(), targets[c % targets.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 202 => {
                        let _ = r.bytes().await;
                        lat.push(t.elapsed());
                    }
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let start = Instant::now();
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.expect("load task");
        all.extend(l);
        errors += e;
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.sort();
    (all, errors, elapsed)
}

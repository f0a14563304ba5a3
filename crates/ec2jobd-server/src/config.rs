//! Typed configuration, loaded in layers: the documented `config/default.toml` (compiled in, so the
//! file and the defaults can never disagree), an optional file, `EC2JOBD_*` environment variables,
//! then flags. Every layer is merged as TOML before one strict deserialisation, so an unknown key, a
//! wrong type or a bad value stops the start with the key's full path in the message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use ec2jobd_store::postgres::{is_postgres_url, redact};
use serde::{Deserialize, Deserializer};

/// The defaults, documented key by key.
pub const DEFAULT_TOML: &str = include_str!("../../../config/default.toml");

/// `EC2JOBD_*` variables that belong to the command-line client, not to the daemon's config.
const CLIENT_ENV: &[&str] = &["EC2JOBD_CONFIG", "EC2JOBD_URL", "EC2JOBD_TOKEN"];

/// A humantime duration in config (`"15s"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s)
            .map(Dur)
            .map_err(|e| serde::de::Error::custom(format!("`{s}` is not a duration ({e})")))
    }
}

/// The whole daemon configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// HTTP listen address.
    pub listen: String,
    /// Store URL: `sqlite://…` (embedded) or `postgres://…` (replicas sharing one queue).
    pub database: String,
    /// Account for jobs that name none.
    pub default_account: String,
    /// Grace period for running jobs at shutdown.
    pub shutdown_grace: Dur,
    /// AWS accounts by name.
    pub accounts: BTreeMap<String, AccountSection>,
    /// Queue and worker settings.
    pub queue: QueueSection,
    /// SQLite settings.
    pub sqlite: SqliteSection,
    /// PostgreSQL settings (when `database` is a `postgres://` URL).
    pub postgres: PostgresSection,
    /// HTTP settings.
    pub http: HttpSection,
    /// Logging.
    pub log: LogSection,
    /// OpenTelemetry export of spans (OTLP/HTTP).
    pub tracing: TracingSection,
    /// How EC2's eventual consistency is met.
    pub ec2: Ec2Section,
    /// Client-side pacing of EC2 calls.
    pub pacing: PacingSection,
    /// SNS deliveries (`POST /v1/sns/{hook}`).
    pub sns: SnsSection,
    /// Job outcome notifications.
    pub notify: NotifySection,
    /// How long finished jobs and SNS deliveries are kept.
    pub retention: RetentionSection,
    /// Periodic backups of the SQLite database.
    pub backup: BackupSection,
    /// The dashboard at `/ui/`.
    pub ui: UiSection,
    /// Schedules by name (`[schedules.<name>]`, read-only over the API).
    #[serde(default)]
    pub schedules: BTreeMap<String, crate::schedules::Schedule>,
    /// Holiday calendars schedules can skip (`[calendars.<name>]`).
    #[serde(default)]
    pub calendars: BTreeMap<String, crate::schedules::Calendar>,
    /// SQS intakes by name (`[sqs.<name>]`): SNS deliveries long-polled from a queue.
    #[serde(default)]
    pub sqs: BTreeMap<String, SqsSection>,
}

/// `[sqs.<name>]`: an SQS queue subscribed to a hook's SNS topics, long-polled by the daemon, so
/// alarms reach a daemon in a private subnet with no inbound HTTPS (see [`crate::sns::sqs`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqsSection {
    /// The queue's URL (`https://sqs.<region>.amazonaws.com/<account-id>/<name>`).
    pub queue_url: String,
    /// The SNS hook (`[sns.hooks.<name>]` or one made over the API) whose topics, rules,
    /// de-duplication and notification apply.
    pub hook: String,
    /// Account whose credentials poll the queue (default: the hook's, else `default_account`).
    pub account: Option<String>,
    /// Region of the queue (default: from the URL's host, else the account's region).
    pub region: Option<String>,
    /// The subscription delivers raw messages (`RawMessageDelivery`): bodies are the alarm itself,
    /// unsigned, and the queue's access policy is all that guards it. Off: bodies are SNS's signed
    /// envelopes, verified as the webhook verifies them.
    #[serde(default)]
    pub raw: bool,
    /// Long-poll wait of one receive (1s to 20s).
    #[serde(default = "default_sqs_wait")]
    pub wait: Dur,
    /// Messages per receive (1 to 10).
    #[serde(default = "default_sqs_batch")]
    pub batch: i32,
}

/// `u` starts like an http(s) URL (endpoints, proxies, collectors, queues).
fn is_http_url(u: &str) -> bool {
    u.starts_with("http://") || u.starts_with("https://")
}

fn default_sqs_wait() -> Dur {
    Dur(Duration::from_secs(20))
}

fn default_sqs_batch() -> i32 {
    10
}

impl SqsSection {
    /// The account and region this intake polls with.
    pub fn account_region(&self, cfg: &Config) -> (String, String) {
        let account = match (&self.account, cfg.sns.hooks.get(&self.hook)) {
            (Some(a), _) => a.clone(),
            (None, Some(h)) => h.account_or(&cfg.default_account),
            (None, None) => cfg.default_account.clone(),
        };
        let from_url = self
            .queue_url
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|host| host.strip_prefix("sqs."))
            .and_then(|host| host.split('.').next())
            .map(String::from);
        let region = self
            .region
            .clone()
            .or(from_url)
            .or_else(|| cfg.accounts.get(&account).map(|a| a.region.clone()))
            .unwrap_or_default();
        (account, region)
    }
}

/// `[ui]`: the dashboard served at `/ui/`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UiSection {
    /// Serve the dashboard (false: `/ui/` is 404).
    pub enabled: bool,
    /// How long a session lasts after signing in.
    pub session_ttl: Dur,
    /// Mark the session cookie `Secure` (set it when a TLS proxy serves the daemon; a request that
    /// arrived with `X-Forwarded-Proto: https` gets it anyway).
    pub secure_cookie: bool,
}

/// `[retention]`: what the pruner deletes, and how.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionSection {
    /// Finished jobs created longer ago than this are deleted (0: kept forever).
    pub jobs: Dur,
    /// SNS deliveries older than this are deleted (0: kept forever).
    pub sns_deliveries: Dur,
    /// How often the pruner runs.
    pub interval: Dur,
    /// Rows deleted per transaction.
    pub batch: u32,
}

/// `[backup]`: periodic online backups of the embedded database (see `crate::db_backup`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackupSection {
    /// How often (0: never).
    pub interval: Dur,
    /// Where the backups go.
    pub dir: String,
    /// How many of the newest are kept.
    pub keep: u32,
}

/// `[notify]`: publishing job outcomes to SNS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySection {
    /// Topic for jobs whose spec sets no `notify` (none: only jobs that ask are published).
    pub topic_arn: Option<String>,
    /// Final states published for those jobs (empty: all).
    #[serde(default)]
    pub on: Vec<String>,
    /// Topics `notify.topic_arn` may name (ARNs or prefixes ending in `*`; empty: any).
    #[serde(default)]
    pub allowed_topics: Vec<String>,
    /// Publish attempts before giving up (recorded as `notify_failed`).
    pub attempts: u32,
    /// First delay between attempts.
    pub backoff_base: Dur,
    /// Largest delay between attempts.
    pub backoff_max: Dur,
}

impl NotifySection {
    /// The default notification, when a topic is configured.
    pub fn default_notify(&self) -> Option<ec2jobd_spec::Notify> {
        self.topic_arn.as_ref().map(|t| ec2jobd_spec::Notify {
            topic_arn: t.clone(),
            on: self.on.clone(),
            subject: None,
        })
    }
}

/// `[sns]`: how SNS HTTP deliveries are verified, and the hooks that accept them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnsSection {
    /// Replay window: older messages are refused; `0s` turns the check off.
    pub max_age: Dur,
    /// Directory of pre-seeded signing certificates, named as in `SigningCertURL`.
    pub cert_dir: Option<String>,
    /// Time limit of one certificate fetch.
    pub cert_fetch_timeout: Dur,
    /// Largest certificate accepted, in bytes.
    pub cert_max_bytes: usize,
    /// Certificates kept in memory.
    pub cert_cache: usize,
    /// Priority of the jobs rules queue when their job or template sets none (-1000 to 1000).
    pub priority: i32,
    /// Hooks by name: `POST /v1/sns/<name>`.
    #[serde(default)]
    pub hooks: BTreeMap<String, HookSection>,
}

/// `[sns.hooks.<name>]`, and the body of `PUT /v1/sns/hooks/{name}`.
#[derive(Debug, Clone, Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HookSection {
    /// Topic ARNs whose messages this hook accepts (all others: 403).
    pub topics: Vec<String>,
    /// Account used to confirm subscriptions (default: `default_account`).
    pub account: Option<String>,
    /// Rules, tried in order; the first match queues its job.
    #[serde(default)]
    pub rules: Vec<crate::sns::rules::Rule>,
    /// Notification for the jobs this hook queues, when their rule's job sets none.
    pub notify: Option<ec2jobd_spec::Notify>,
    /// Environment variable holding `user:password`: deliveries must then carry HTTP basic auth
    /// (put the credentials in the subscription URL, `https://user:password@host/v1/sns/<hook>`).
    pub basic_auth_env: Option<String>,
}

impl HookSection {
    /// The account that confirms this hook's subscriptions and polls its SQS intakes.
    pub fn account_or(&self, default_account: &str) -> String {
        self.account
            .clone()
            .unwrap_or_else(|| default_account.to_string())
    }
}

/// `[ec2]`: eventual consistency.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ec2Section {
    /// How long an id a job made may be unknown to EC2's other calls.
    pub consistency_timeout: Dur,
    /// How long an id the caller gave may be unknown before `NotFound` is final.
    pub not_found_grace: Dur,
}

/// `[pacing]`: token buckets per account+region, by operation class.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PacingSection {
    /// Off: calls are never held.
    pub enabled: bool,
    /// Describe* calls.
    pub describe: RateSection,
    /// Mutating calls without a bucket of their own.
    pub mutating: RateSection,
    /// RunInstances.
    pub run_instances: RateSection,
    /// StartInstances.
    pub start_instances: RateSection,
    /// TerminateInstances.
    pub terminate_instances: RateSection,
    /// CreateTags.
    pub create_tags: RateSection,
    /// CreateSnapshot, DeleteSnapshot, CopySnapshot.
    pub snapshots: RateSection,
    /// Describes by id of several jobs gather until none came for this long ("0s": no coalescing).
    pub coalesce_window: Dur,
    /// Mutating instance calls of several jobs gather until none came for this long.
    pub coalesce_hold: Dur,
}

/// One bucket: `{ burst = 100, per_second = 20 }`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateSection {
    /// Capacity.
    pub burst: u32,
    /// Refill per second.
    pub per_second: f64,
}

/// `[accounts.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountSection {
    /// Default region.
    pub region: String,
    /// Endpoint override.
    pub endpoint_url: Option<String>,
    /// Shared-config profile.
    pub profile: Option<String>,
    /// Env var with the access key id.
    pub access_key_id_env: Option<String>,
    /// Env var with the secret key.
    pub secret_access_key_env: Option<String>,
    /// Env var with the session token.
    pub session_token_env: Option<String>,
    /// Role to assume.
    pub role_arn: Option<String>,
    /// External id for the role.
    pub external_id: Option<String>,
    /// CloudTrail session name of the assumed role.
    #[serde(default = "default_session_name")]
    pub role_session_name: String,
    /// Proxy for this account's calls.
    pub https_proxy: Option<String>,
    /// Hosts not proxied.
    pub no_proxy: Option<String>,
    /// AMIs jobs may launch (empty: any); `*` at the end matches a prefix.
    #[serde(default)]
    pub allowed_images: Vec<String>,
    /// Instance types jobs may launch or resize to (empty: any); `t3.*` style prefixes allowed.
    #[serde(default)]
    pub allowed_instance_types: Vec<String>,
    /// Regions jobs may use (empty: any).
    #[serde(default)]
    pub allowed_regions: Vec<String>,
    /// Per-attempt call timeout.
    #[serde(default = "default_call_timeout")]
    pub call_timeout: Dur,
    /// Attempts per EC2 call (SDK retries).
    #[serde(default = "default_call_attempts")]
    pub max_call_attempts: u32,
    /// First backoff between call attempts.
    #[serde(default = "default_retry_base")]
    pub retry_base: Dur,
    /// Largest backoff between call attempts.
    #[serde(default = "default_retry_max")]
    pub retry_max: Dur,
}

// Accounts other than `default` are whole tables in the user's file, so their optional keys need
// serde defaults; these mirror config/default.toml.
impl HookSection {
    /// Checks a hook (from config or the API): name, topic ARNs, account, notification, and every
    /// rule rendered against a sample message. The error names the field, relative to the hook.
    pub fn check(&self, name: &str, cfg: &Config) -> Result<(), (String, String)> {
        if !is_hook_name(name) || name == "deliveries" || name == "hooks" {
            return Err((
                String::new(),
                "hook names are 1-64 letters, digits, `-` or `_` (not `deliveries` or `hooks`)"
                    .into(),
            ));
        }
        if self.topics.is_empty()
            || self
                .topics
                .iter()
                .any(|t| !t.starts_with("arn:") || t.split(':').count() != 6)
        {
            return Err((
                "topics".into(),
                "give one or more topic ARNs (arn:aws:sns:REGION:ACCOUNT:NAME)".into(),
            ));
        }
        if let Some(a) = &self.account {
            if !cfg.accounts.contains_key(a) {
                return Err((
                    "account".into(),
                    format!("no [accounts.{a}] table is configured"),
                ));
            }
        }
        if let Some(n) = &self.notify {
            n.check("notify").map_err(|e| (e.field, e.message))?;
        }
        for (i, r) in self.rules.iter().enumerate() {
            r.check()
                .map_err(|e| (format!("rules[{i}]"), format!("rule `{}`: {e}", r.name)))?;
        }
        Ok(())
    }
}

/// Hook names become URL path segments.
pub fn is_hook_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn default_session_name() -> String {
    "ec2jobd".into()
}
fn default_call_timeout() -> Dur {
    Dur(Duration::from_secs(30))
}
fn default_call_attempts() -> u32 {
    5
}
fn default_retry_base() -> Dur {
    Dur(Duration::from_secs(1))
}
fn default_retry_max() -> Dur {
    Dur(Duration::from_secs(20))
}

/// A part of a whole: a number, or a percentage (`"5%"`, 0 to 99).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// This many.
    Count(u64),
    /// This many hundredths of the whole, rounded down.
    Percent(u8),
}

impl Share {
    /// The part of `whole`.
    pub fn of(self, whole: u64) -> u64 {
        match self {
            Share::Count(n) => n,
            Share::Percent(p) => whole.saturating_mul(u64::from(p)) / 100,
        }
    }
}

impl<'de> Deserialize<'de> for Share {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Count(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Count(n) => Ok(Share::Count(n)),
            Raw::Text(t) => match t.trim().strip_suffix('%') {
                Some(p) => p
                    .trim()
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p < 100)
                    .map(Share::Percent),
                // An environment variable's number comes as text.
                None => t.trim().parse::<u64>().ok().map(Share::Count),
            }
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "`{t}` is not a number or a share from \"0%\" to \"99%\""
                ))
            }),
        }
    }
}

/// `[queue]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSection {
    /// Worker tasks.
    pub workers: usize,
    /// Lease length.
    pub lease: Dur,
    /// Lease renewal interval.
    pub heartbeat: Dur,
    /// Attempts before a transient failure is final.
    pub max_attempts: u32,
    /// First retry delay.
    pub backoff_base: Dur,
    /// Largest retry delay.
    pub backoff_max: Dur,
    /// Default per-attempt limit.
    pub job_timeout: Dur,
    /// Fallback claim poll.
    pub poll_interval: Dur,
    /// Lease reaper interval.
    pub reap_interval: Dur,
    /// Submissions beyond this many queued jobs get 429 with Retry-After (0: no limit).
    pub max_queued: u64,
    /// Of `max_queued`, the places only jobs of priority `sns.priority` or more may take.
    pub reserved_for_priority: Share,
    /// Most jobs parked (waiting without a worker) at once; more wait holding their worker.
    pub max_waiting: usize,
}

/// `[sqlite]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSection {
    /// `normal` or `full`.
    pub synchronous: SyncMode,
    /// Lock wait.
    pub busy_timeout: Dur,
    /// Read pool size.
    pub max_connections: u32,
    /// Group-commit batch limit.
    pub max_batch: usize,
}

/// `[postgres]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSection {
    /// Connections this daemon keeps open.
    pub max_connections: u32,
    /// Never LISTEN for wake-up hints (PgBouncer in transaction pooling): poll only.
    pub poll_only: bool,
    /// How often job events written by other replicas are looked for (live streams).
    pub watch_interval: Dur,
    /// How long the maintenance lease lasts without renewal: how soon another replica takes
    /// publishing and pruning over from one that died.
    pub leader_ttl: Dur,
}

/// `sqlite.synchronous`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// WAL + NORMAL.
    Normal,
    /// WAL + FULL.
    Full,
}

/// `[http]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSection {
    /// Response deadline.
    pub request_timeout: Dur,
    /// Body size limit in bytes.
    pub body_limit: usize,
    /// SSE keep-alive interval.
    pub sse_keepalive: Dur,
    /// Most open connections; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Most connections one client address may hold (0: no share).
    pub max_connections_per_client: Share,
    /// Longest a request's head may take to arrive (slow clients are closed).
    pub header_read_timeout: Dur,
    /// A connection with no request in flight and nothing sent either way for this long is closed.
    pub idle_timeout: Dur,
    /// Most event streams and held (`?wait=`) submissions open at once.
    pub max_streams: usize,
    /// Most of those one token may hold.
    pub max_streams_per_token: usize,
}

/// `[log]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: LogFormat,
    /// Filter directive (`info`, `ec2jobd=debug`).
    pub level: String,
}

/// `[tracing]`: OpenTelemetry export (see [`crate::telemetry`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TracingSection {
    /// OTLP/HTTP collector base URL (`http://127.0.0.1:4318`; spans go to `<url>/v1/traces`);
    /// unset: no export.
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` or `http/json`.
    pub protocol: String,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Which spans are exported (a filter like `log.level`; the AWS SDK's operation spans are at
    /// debug).
    pub level: String,
    /// Time limit of one export request.
    pub export_timeout: Dur,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Command-line overrides (the last layer).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--listen`.
    pub listen: Option<String>,
    /// `--database`.
    pub database: Option<String>,
    /// `--workers`.
    pub workers: Option<usize>,
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// An environment value typed by the key it sets: `like` is the value that key has in the layers
/// below (or, for an account not in them, in the built-in `[accounts.default]`). Strings stay
/// strings (`PROFILE=123` is the profile `123`); numbers and booleans are parsed; a list is TOML
/// (`["t3.*", "m7i.*"]`) or comma separated. A key with no value below is a string unless it is
/// written as a TOML list. A value that does not fit its key is passed on as text, so strict
/// deserialisation names the key.
fn env_value(raw: &str, like: Option<&toml::Value>) -> toml::Value {
    let parsed = || {
        toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
    };
    let text = || toml::Value::String(raw.to_string());
    if raw.trim_start().starts_with('[') {
        if let Some(v @ toml::Value::Array(_)) = parsed() {
            return v;
        }
    }
    match like {
        Some(toml::Value::Integer(_)) => match parsed() {
            Some(v @ toml::Value::Integer(_)) => v,
            _ => text(),
        },
        Some(toml::Value::Float(_)) => match parsed() {
            Some(v @ (toml::Value::Float(_) | toml::Value::Integer(_))) => v,
            _ => text(),
        },
        Some(toml::Value::Boolean(_)) => match parsed() {
            Some(v @ toml::Value::Boolean(_)) => v,
            _ => text(),
        },
        Some(toml::Value::Array(_)) => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
        _ => text(),
    }
}

/// The value at `path` in `root`, if any.
fn value_at<'a>(root: &'a toml::Value, path: &[String]) -> Option<&'a toml::Value> {
    path.iter().try_fold(root, |cur, seg| cur.get(seg.as_str()))
}

fn set_path(root: &mut toml::Value, path: &[String], v: toml::Value) {
    let mut cur = root;
    for (i, seg) in path.iter().enumerate() {
        let toml::Value::Table(t) = cur else { return };
        if i + 1 == path.len() {
            t.insert(seg.clone(), v);
            return;
        }
        cur = t
            .entry(seg.clone())
            .or_insert_with(|| toml::Value::Table(Default::default()));
    }
}

impl Config {
    /// Loads the layers in order. `env` is passed in (not read here) so tests control it.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        flags: &Overrides,
    ) -> anyhow::Result<Config> {
        let builtin: toml::Value =
            toml::from_str(DEFAULT_TOML).context("built-in config/default.toml")?;
        let mut root = builtin.clone();
        // When the operator names accounts, only those exist: the built-in `default` account (the
        // host's credentials, any region) is kept only if they name it too.
        let mut user_accounts = std::collections::BTreeSet::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("config file {}", path.display()))?;
            let v: toml::Value =
                toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
            if let Some(accounts) = v.get("accounts").and_then(toml::Value::as_table) {
                user_accounts.extend(accounts.keys().cloned());
            }
            merge(&mut root, v);
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("EC2JOBD_") && !CLIENT_ENV.contains(&k.as_str()))
            .collect();
        env.sort();
        for (k, v) in env {
            let path: Vec<String> = k["EC2JOBD_".len()..]
                .split("__")
                .map(|s| s.to_ascii_lowercase())
                .collect();
            if path.iter().any(|s| s.is_empty()) {
                bail!("environment variable {k}: empty key segment");
            }
            if let ("accounts", Some(a)) = (path[0].as_str(), path.get(1)) {
                user_accounts.insert(a.clone());
            }
            let known = root
                .as_table()
                .is_some_and(|t| t.contains_key(path[0].as_str()));
            if !known {
                bail!(
                    "environment variable {k}: no config key `{}`",
                    path.join(".")
                );
            }
            let like = value_at(&root, &path).or_else(|| match path.as_slice() {
                [first, _, rest @ ..] if first == "accounts" => {
                    let mut p = vec!["accounts".to_string(), "default".to_string()];
                    p.extend(rest.iter().cloned());
                    value_at(&builtin, &p)
                }
                _ => None,
            });
            let v = env_value(&v, like);
            set_path(&mut root, &path, v);
        }
        if !user_accounts.is_empty() && !user_accounts.contains("default") {
            if let Some(t) = root.get_mut("accounts").and_then(toml::Value::as_table_mut) {
                t.remove("default");
            }
        }
        let mut flag = |key: &[&str], v: toml::Value| {
            let p: Vec<String> = key.iter().map(|s| s.to_string()).collect();
            set_path(&mut root, &p, v);
        };
        if let Some(l) = &flags.listen {
            flag(&["listen"], toml::Value::String(l.clone()));
        }
        if let Some(d) = &flags.database {
            flag(&["database"], toml::Value::String(d.clone()));
        }
        if let Some(w) = flags.workers {
            flag(&["queue", "workers"], toml::Value::Integer(w as i64));
        }
        let cfg: Config = serde_path_to_error::deserialize(root).map_err(|e| {
            let path = e.path().to_string();
            anyhow!("config key `{path}`: {}", e.into_inner())
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.listen_addr()?;
        if !self.database.starts_with("sqlite:") && !is_postgres_url(&self.database) {
            bail!(
                "config key `database`: `{}` is not supported (use sqlite://PATH or postgres://…)",
                redact(&self.database)
            );
        }
        if !self.accounts.contains_key(&self.default_account) {
            bail!(
                "config key `default_account`: no [accounts.{}] table is configured",
                self.default_account
            );
        }
        for (name, a) in &self.accounts {
            if a.region.trim().is_empty() {
                bail!("config key `accounts.{name}.region`: must not be empty");
            }
            if let Some(u) = &a.endpoint_url {
                if !is_http_url(u) {
                    bail!("config key `accounts.{name}.endpoint_url`: `{u}` is not an http(s) URL");
                }
            }
            if a.max_call_attempts == 0 || a.max_call_attempts > 20 {
                bail!("config key `accounts.{name}.max_call_attempts`: must be 1 to 20");
            }
            if let Some(r) = &a.role_arn {
                if !r.starts_with("arn:") || !r.contains(":role/") {
                    bail!("config key `accounts.{name}.role_arn`: `{r}` is not a role ARN (arn:aws:iam::123456789012:role/NAME)");
                }
            }
            if a.external_id.is_some() && a.role_arn.is_none() {
                bail!("config key `accounts.{name}.external_id`: only used with role_arn, which is not set");
            }
            let n = a.role_session_name.len();
            if !(2..=64).contains(&n)
                || !a
                    .role_session_name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"=,.@-_".contains(&b))
            {
                bail!("config key `accounts.{name}.role_session_name`: 2-64 letters, digits or =,.@-_");
            }
            if let Some(u) = &a.https_proxy {
                if !is_http_url(u) {
                    bail!("config key `accounts.{name}.https_proxy`: `{u}` is not an http(s) URL");
                }
            }
            for (key, list) in [
                ("allowed_images", &a.allowed_images),
                ("allowed_instance_types", &a.allowed_instance_types),
                ("allowed_regions", &a.allowed_regions),
            ] {
                if list.iter().any(|v| v.trim().is_empty()) {
                    bail!("config key `accounts.{name}.{key}`: entries must not be empty");
                }
            }
            if a.access_key_id_env.is_some() != a.secret_access_key_env.is_some() {
                bail!("config key `accounts.{name}.secret_access_key_env`: set both access_key_id_env and secret_access_key_env, or neither");
            }
        }
        let t = &self.tracing;
        if let Some(u) = &t.otlp_endpoint {
            if !(u.is_empty() || is_http_url(u)) {
                bail!("config key `tracing.otlp_endpoint`: `{u}` is not an http(s) URL");
            }
        }
        if !matches!(t.protocol.as_str(), "http/protobuf" | "http/json") {
            bail!(
                "config key `tracing.protocol`: `{}` is not http/protobuf or http/json",
                t.protocol
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&t.level) {
            bail!("config key `tracing.level`: {e}");
        }
        for (name, q) in &self.sqs {
            let key = |k: &str| format!("config key `sqs.{name}.{k}`");
            if !is_http_url(&q.queue_url) {
                bail!("{}: `{}` is not a queue URL (https://sqs.<region>.amazonaws.com/<account-id>/<queue>)", key("queue_url"), q.queue_url);
            }
            if q.hook.trim().is_empty() {
                bail!("{}: must name an SNS hook", key("hook"));
            }
            if let Some(a) = &q.account {
                if !self.accounts.contains_key(a) {
                    bail!("{}: no [accounts.{a}] table is configured", key("account"));
                }
            }
            if !(1..=20).contains(&q.wait.0.as_secs()) || q.wait.0.subsec_nanos() != 0 {
                bail!(
                    "{}: whole seconds from 1s to 20s (SQS's long-poll limit)",
                    key("wait")
                );
            }
            if !(1..=10).contains(&q.batch) {
                bail!("{}: 1 to 10 (SQS's limit per receive)", key("batch"));
            }
        }
        let q = &self.queue;
        if let Share::Count(n) = q.reserved_for_priority {
            if q.max_queued > 0 && n >= q.max_queued {
                bail!(
                    "config key `queue.reserved_for_priority`: {n} leaves no place of queue.max_queued ({}) for other jobs; keep it below",
                    q.max_queued
                );
            }
        }
        if q.workers > 4096 {
            bail!("config key `queue.workers`: at most 4096");
        }
        if q.max_attempts == 0 || q.max_attempts > 100 {
            bail!("config key `queue.max_attempts`: must be 1 to 100");
        }
        if q.heartbeat.0.is_zero() || q.lease.0 < q.heartbeat.0 * 2 {
            bail!("config key `queue.lease`: must be at least twice `queue.heartbeat`");
        }
        for (k, d) in [
            ("queue.backoff_base", q.backoff_base),
            ("queue.job_timeout", q.job_timeout),
            ("queue.poll_interval", q.poll_interval),
            ("queue.reap_interval", q.reap_interval),
            ("http.request_timeout", self.http.request_timeout),
            ("http.sse_keepalive", self.http.sse_keepalive),
        ] {
            if d.0.is_zero() {
                bail!("config key `{k}`: must be greater than zero");
            }
        }
        if q.backoff_max.0 < q.backoff_base.0 {
            bail!("config key `queue.backoff_max`: must be at least `queue.backoff_base`");
        }
        let p = &self.pacing;
        for (k, r) in [
            ("describe", p.describe),
            ("mutating", p.mutating),
            ("run_instances", p.run_instances),
            ("start_instances", p.start_instances),
            ("terminate_instances", p.terminate_instances),
            ("create_tags", p.create_tags),
            ("snapshots", p.snapshots),
        ] {
            if r.burst == 0 || r.per_second.is_nan() || r.per_second <= 0.0 {
                bail!("config key `pacing.{k}`: burst and per_second must be greater than zero");
            }
        }
        for (k, d) in [
            ("coalesce_window", p.coalesce_window.0),
            ("coalesce_hold", p.coalesce_hold.0),
        ] {
            if d > std::time::Duration::from_secs(1) {
                bail!("config key `pacing.{k}`: at most 1s (a call gathering waits that long)");
            }
        }
        if let Some(n) = self.notify.default_notify() {
            n.check("notify")
                .map_err(|e| anyhow::anyhow!("config key `{}`: {}", e.field, e.message))?;
        }
        if self.notify.attempts == 0 || self.notify.attempts > 20 {
            bail!("config key `notify.attempts`: must be 1 to 20");
        }
        for (name, h) in &self.sns.hooks {
            if let Err((field, msg)) = h.check(name, self) {
                let key = if field.is_empty() {
                    format!("sns.hooks.{name}")
                } else {
                    format!("sns.hooks.{name}.{field}")
                };
                bail!("config key `{key}`: {msg}");
            }
        }
        for (name, sched) in &self.schedules {
            if !is_hook_name(name) {
                bail!("config key `schedules.{name}`: schedule names are 1-64 letters, digits, `-` or `_`");
            }
            if let Err((field, msg)) = sched.plan(&self.calendars) {
                bail!("config key `schedules.{name}.{field}`: {msg}");
            }
        }
        if !ec2jobd_spec::PRIORITY_RANGE.contains(&self.sns.priority) {
            bail!("config key `sns.priority`: -1000 to 1000");
        }
        if self.retention.batch == 0 || self.retention.batch > 10_000 {
            bail!("config key `retention.batch`: 1 to 10000");
        }
        let b = &self.backup;
        if !b.interval.0.is_zero() {
            if is_postgres_url(&self.database) {
                bail!("config key `backup.interval`: periodic backups are of the embedded SQLite database; back PostgreSQL up with pg_dump (README \"Backups and restore\") and set \"0s\"");
            }
            if ec2jobd_store::database_file(&self.database).is_none() {
                bail!("config key `backup.interval`: `database` names no file to back up");
            }
            if b.interval.0 < Duration::from_secs(1) {
                bail!("config key `backup.interval`: at least 1s (or \"0s\": off)");
            }
            if b.dir.trim().is_empty() {
                bail!("config key `backup.dir`: required when `backup.interval` is set");
            }
            if b.keep == 0 {
                bail!("config key `backup.keep`: at least 1");
            }
        }
        if self.ui.session_ttl.0 < std::time::Duration::from_secs(60) {
            bail!("config key `ui.session_ttl`: at least 1m");
        }
        if self.retention.interval.0.is_zero() {
            bail!("config key `retention.interval`: must be more than 0");
        }
        if self.http.max_connections == 0 {
            bail!("config key `http.max_connections`: at least 1");
        }
        if self.http.header_read_timeout.0.is_zero() {
            bail!("config key `http.header_read_timeout`: must be more than 0");
        }
        if self.http.idle_timeout.0 <= self.http.sse_keepalive.0 {
            bail!("config key `http.idle_timeout`: must be longer than `http.sse_keepalive`, or event streams are cut");
        }
        if self.http.body_limit < 1024 {
            bail!("config key `http.body_limit`: at least 1024 bytes");
        }
        Ok(())
    }

    /// The pacing buckets for the EC2 driver.
    pub fn pacing_config(&self) -> ec2jobd_ec2::PacingConfig {
        let p = &self.pacing;
        let r = |x: RateSection| ec2jobd_ec2::Rate {
            burst: x.burst,
            per_second: x.per_second,
        };
        ec2jobd_ec2::PacingConfig {
            enabled: p.enabled,
            describe: r(p.describe),
            mutating: r(p.mutating),
            run_instances: r(p.run_instances),
            start_instances: r(p.start_instances),
            terminate_instances: r(p.terminate_instances),
            create_tags: r(p.create_tags),
            snapshots: r(p.snapshots),
            coalesce_window: p.coalesce_window.0,
            coalesce_hold: p.coalesce_hold.0,
        }
    }

    /// The parsed listen address.
    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listen.parse().map_err(|e| {
            anyhow!(
                "config key `listen`: `{}` is not host:port ({e})",
                self.listen
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_load_and_match_the_contract() {
        let c = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.database, "sqlite://ec2jobd.db");
        assert_eq!(c.default_account, "default");
        assert!(c.accounts["default"].endpoint_url.is_none());
        // The documented defaults are EC2's own limits.
        assert_eq!(c.pacing_config(), ec2jobd_ec2::PacingConfig::default());
    }

    #[test]
    fn layers_apply_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:9000\"\n[queue]\nworkers = 2\n[accounts.default]\nregion = \"eu-west-1\"\nendpoint_url = \"http://127.0.0.1:5000\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&f),
            env(&[
                ("EC2JOBD_QUEUE__WORKERS", "7"),
                ("EC2JOBD_ACCOUNTS__DEFAULT__REGION", "ap-northeast-1"),
                ("EC2JOBD_URL", "http://ignored-client-setting"),
            ]),
            &Overrides {
                listen: Some("127.0.0.1:0".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(c.queue.workers, 7);
        assert_eq!(c.accounts["default"].region, "ap-northeast-1");
        assert_eq!(
            c.accounts["default"].endpoint_url.as_deref(),
            Some("http://127.0.0.1:5000")
        );
    }

    #[test]
    fn environment_values_take_the_type_of_their_key() {
        let c = Config::load(
            None,
            env(&[
                ("EC2JOBD_ACCOUNTS__DEFAULT__PROFILE", "123"),
                (
                    "EC2JOBD_ACCOUNTS__DEFAULT__ALLOWED_INSTANCE_TYPES",
                    "t3.*, m7i.large",
                ),
                (
                    "EC2JOBD_ACCOUNTS__DEFAULT__ALLOWED_REGIONS",
                    "[\"eu-west-1\"]",
                ),
                ("EC2JOBD_ACCOUNTS__DEFAULT__MAX_CALL_ATTEMPTS", "5"),
                ("EC2JOBD_QUEUE__WORKERS", "9"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        let a = &c.accounts["default"];
        assert_eq!(a.profile.as_deref(), Some("123"));
        assert_eq!(a.allowed_instance_types, ["t3.*", "m7i.large"]);
        assert_eq!(a.allowed_regions, ["eu-west-1"]);
        assert_eq!((a.max_call_attempts, c.queue.workers), (5, 9));
        let e = Config::load(
            None,
            env(&[("EC2JOBD_QUEUE__WORKERS", "many")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("queue.workers"), "{e:#}");
    }

    #[test]
    fn configured_accounts_replace_the_built_in_default() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            "default_account = \"prod\"\n[accounts.prod]\nregion = \"eu-west-1\"\n",
        )
        .unwrap();
        let c = Config::load(Some(&f), env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.accounts.keys().collect::<Vec<_>>(), ["prod"]);
        // Without default_account naming one of them, start fails naming the key.
        std::fs::write(&f, "[accounts.prod]\nregion = \"eu-west-1\"\n").unwrap();
        let e = Config::load(Some(&f), env(&[]), &Overrides::default()).unwrap_err();
        assert!(format!("{e:#}").contains("default_account"), "{e:#}");
        // Accounts named only in the environment count too; naming `default` keeps it.
        let c = Config::load(
            None,
            env(&[
                ("EC2JOBD_ACCOUNTS__OPS__REGION", "us-west-2"),
                ("EC2JOBD_ACCOUNTS__DEFAULT__REGION", "us-east-2"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.accounts.keys().collect::<Vec<_>>(), ["default", "ops"]);
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[queue]\nworkers = \"many\"\n").unwrap();
        let e = Config::load(Some(&f), env(&[]), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("queue.workers"), "{e}");

        std::fs::write(&f, "[queue]\nlease_time = \"1s\"\n").unwrap();
        let e = Config::load(Some(&f), env(&[]), &Overrides::default()).unwrap_err();
        assert!(e.to_string().contains("lease_time"), "{e}");

        let e = Config::load(
            None,
            env(&[("EC2JOBD_WORKERS", "3")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("EC2JOBD_WORKERS"), "{e}");

        let e = Config::load(
            None,
            env(&[("EC2JOBD_DEFAULT_ACCOUNT", "prod")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("default_account"), "{e}");

        let e = Config::load(
            Some(&dir.path().join("missing.toml")),
            env(&[]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("missing.toml"), "{e:#}");

        let e = Config::load(
            None,
            env(&[("EC2JOBD_QUEUE__LEASE", "soon")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("queue.lease"), "{e}");
    }

    /// `[backup]` is off by default; turned on it needs a directory and an SQLite file, and a
    /// PostgreSQL database is pointed to pg_dump.
    #[test]
    fn periodic_backups_are_checked() {
        let load = |vars: &[(&str, &str)]| Config::load(None, env(vars), &Overrides::default());
        let c = load(&[]).unwrap();
        assert!(c.backup.interval.0.is_zero());
        let on = [("EC2JOBD_BACKUP__INTERVAL", "1h")];
        let e = load(&on).unwrap_err();
        assert!(e.to_string().contains("backup.dir"), "{e}");
        let with_dir = [on[0], ("EC2JOBD_BACKUP__DIR", "/var/backups/ec2jobd")];
        let c = load(&with_dir).unwrap();
        assert_eq!(c.backup.keep, 7);
        let e = load(&[with_dir[0], with_dir[1], ("EC2JOBD_BACKUP__KEEP", "0")]).unwrap_err();
        assert!(e.to_string().contains("backup.keep"), "{e}");
        let e = load(&[
            with_dir[0],
            with_dir[1],
            ("EC2JOBD_BACKUP__INTERVAL", "500ms"),
        ]);
        assert!(e.unwrap_err().to_string().contains("at least 1s"));
        let pg = ("EC2JOBD_DATABASE", "postgres://u:secret@db/ec2jobd");
        let e = load(&[with_dir[0], with_dir[1], pg])
            .unwrap_err()
            .to_string();
        assert!(e.contains("pg_dump") && !e.contains("secret"), "{e}");
        let e = load(&[
            with_dir[0],
            with_dir[1],
            ("EC2JOBD_DATABASE", "sqlite::memory:"),
        ]);
        assert!(e.unwrap_err().to_string().contains("no file"));
    }
}

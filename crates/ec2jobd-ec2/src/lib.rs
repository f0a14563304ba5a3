//! The EC2 driver: turns a job's targets into EC2 calls against a configured account and region, and
//! AWS's answers into per-instance results and classified errors.
//!
//! This room knows AWS (aws-config, aws-sdk-ec2) and the spec types; it must not know HTTP or SQL.
//! Credentials are resolved by aws-config on the daemon's side and never leave this crate: they are
//! not logged, stored or returned. Errors keep AWS's own code and request id, and say whether
//! retrying could help ([`Ec2Error::transient`]); the runner decides what to do with that.
//!
//! Call-level retries are the AWS SDK's standard strategy, configured per account
//! (`max_call_attempts`, `retry_base`, `retry_max`): bounded exponential backoff with full jitter,
//! retrying throttling (`RequestLimitExceeded` included), 5xx, timeouts and I/O errors. Writing our own
//! would duplicate it; what the SDK gives up on reaches the job as a transient [`Ec2Error`] and the
//! runner's job-level backoff takes over.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_ec2::config::Credentials;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ec2::operation::RequestId;
use aws_sdk_ec2::types::{Filter as AwsFilter, Instance, Tag};
use ec2jobd_spec::{InstanceResult, Targets};

mod attempts;
mod coalesce;
pub mod doctor;
mod ebs;
mod pace;
mod share;
mod unanswered;
mod watch;

pub use coalesce::{fenced, gated, named_ids, Coalescer, Gate, SharedAnswer, SharedCall, MAX_IDS};
pub use ebs::{image_result, snapshot_result, CopyOptions, Filters, VolumeInfo};
pub use pace::{class_of, Pacer, PacingConfig, Rate};
pub use share::{parse_scope, scope, RoundShare, SharedRound, Wants};
pub use watch::{
    evaluate, InstanceStatus, Judge, ReadyJudge, ReadyState, Registration, Round, StatusWatcher,
    Verdict, WaitFailure, Watched,
};

/// How to reach one AWS account: the `[accounts.<name>]` config table, minus anything secret.
#[derive(Debug, Clone)]
pub struct AccountConfig {
    /// Default region for jobs that name none.
    pub region: String,
    /// Endpoint override (moto, a VPC endpoint, a proxy of ours in tests).
    pub endpoint_url: Option<String>,
    /// Named profile from the shared AWS config files.
    pub profile: Option<String>,
    /// Names of environment variables holding static keys (the keys themselves are never in config).
    pub access_key_id_env: Option<String>,
    /// See `access_key_id_env`.
    pub secret_access_key_env: Option<String>,
    /// See `access_key_id_env`; optional session token.
    pub session_token_env: Option<String>,
    /// Role to assume (STS AssumeRole) with the credentials above; its temporary credentials are
    /// refreshed by aws-config before they expire.
    pub role_arn: Option<String>,
    /// External id the role's trust policy asks for (the confused-deputy guard of cross-account roles).
    pub external_id: Option<String>,
    /// Session name shown in CloudTrail for calls made with the assumed role.
    pub role_session_name: String,
    /// Proxy every call of this account goes through (HTTPS to AWS is tunnelled with CONNECT).
    pub https_proxy: Option<String>,
    /// Hosts reached directly despite `https_proxy` (comma separated, `*.internal` style).
    pub no_proxy: Option<String>,
    /// Per-call timeout (one HTTP attempt).
    pub call_timeout: Duration,
    /// Attempts per call, the first included (the SDK's standard retry strategy).
    pub max_call_attempts: u32,
    /// First retry backoff of a call.
    pub retry_base: Duration,
    /// Largest retry backoff of a call.
    pub retry_max: Duration,
}

/// A failed EC2 call, classified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
#[error("{code}: {message}")]
pub struct Ec2Error {
    /// AWS's error code (`InvalidInstanceID.NotFound`) or ours (`ConnectionError`, `Timeout`).
    pub code: String,
    /// AWS's message, or what went wrong on the way.
    pub message: String,
    /// AWS request id, when AWS answered.
    pub request_id: Option<String>,
    /// Throttling, 5xx, timeouts and dropped connections: another try may succeed.
    pub transient: bool,
}

impl From<Ec2Error> for ec2jobd_spec::JobError {
    /// The job's error for an EC2 error: AWS's code, message and request id, as AWS gave them.
    fn from(e: Ec2Error) -> Self {
        ec2jobd_spec::JobError {
            code: e.code,
            message: e.message,
            request_id: e.request_id,
        }
    }
}

impl Ec2Error {
    /// EC2 does not know an id of the call (`InvalidInstanceID.NotFound`,
    /// `InvalidSnapshot.NotFound`, …): gone, or made a moment ago and not known everywhere yet.
    pub fn is_not_found(&self) -> bool {
        self.code.ends_with(".NotFound")
    }

    fn config(message: impl Into<String>) -> Self {
        Self {
            code: "AccountConfig".into(),
            message: message.into(),
            request_id: None,
            transient: false,
        }
    }
}

/// Codes that mean "slow down or try again", whatever the HTTP status.
const TRANSIENT_CODES: &[&str] = &[
    "RequestLimitExceeded",
    "Throttling",
    "ThrottlingException",
    "RequestThrottled",
    "InternalError",
    "InternalFailure",
    "ServiceUnavailable",
    "Unavailable",
    // An instance between states (stopping, pending) refuses calls that need the settled state;
    // the job's next attempt waits for it (a state it can never act from is refused before any
    // call).
    "IncorrectInstanceState",
];

/// The account quota a quota refusal is about, named so the reader knows what to raise; another
/// attempt cannot pass until it is raised, so these fail at once.
fn quota_named(code: &str, message: String) -> String {
    let quota = match code {
        "VcpuLimitExceeded" | "InstanceLimitExceeded" => {
            "Service Quotas: EC2 'Running On-Demand … instances' (vCPUs per instance family; \
             L-1216C47A for the standard families)"
        }
        "MaxSpotInstanceCountExceeded" => "Service Quotas: EC2 'All … Spot Instance Requests'",
        _ => return message,
    };
    format!("{message} (account quota: {quota}; ask for an increase)")
}

fn classify<E, R>(op: &str, err: SdkError<E, R>) -> Ec2Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
    SdkError<E, R>: RequestId,
{
    let request_id = err.request_id().map(String::from);
    match &err {
        SdkError::ServiceError(ctx) => {
            let e = ctx.err();
            let code = e.code().unwrap_or("Unknown").to_string();
            let message = quota_named(&code, e.message().unwrap_or("no message").to_string());
            let status = format!("{:?}", ctx.raw());
            let is_5xx = status.contains("StatusCode(5");
            Ec2Error {
                transient: TRANSIENT_CODES.contains(&code.as_str()) || is_5xx,
                code,
                message,
                request_id,
            }
        }
        SdkError::TimeoutError(_) => Ec2Error {
            code: "Timeout".into(),
            message: format!("{op} timed out"),
            request_id,
            transient: true,
        },
        SdkError::DispatchFailure(d) => Ec2Error {
            code: "ConnectionError".into(),
            message: format!("{op}: could not reach the endpoint ({d:?})"),
            request_id,
            transient: true,
        },
        SdkError::ResponseError(_) => Ec2Error {
            code: "ResponseError".into(),
            message: format!("{op}: the response was cut off or malformed"),
            request_id,
            transient: true,
        },
        _ => Ec2Error {
            code: "RequestError".into(),
            message: format!("{op}: {}", aws_sdk_ec2::error::DisplayErrorContext(&err)),
            request_id,
            transient: false,
        },
    }
}

/// Told about every EC2 call, so the server can count calls by operation and outcome without this
/// crate knowing about metrics.
pub trait CallObserver: Send + Sync {
    /// One call to `operation` ended with `outcome` (`ok` or an error code).
    fn observe(&self, operation: &'static str, outcome: &str);
    /// A call to `operation` was held this long by client-side pacing.
    fn paced(&self, _operation: &'static str, _waited: Duration) {}
    /// A status watcher finished a polling round over this many instances.
    fn round(&self, _instances: usize) {}
    /// One HTTP attempt of a call to `operation` ended with `outcome` (`ok`, an AWS error code,
    /// `http_<status>` or `no_response`); `retry` when it was not the call's first attempt.
    fn attempt(&self, _operation: &str, _outcome: &str, _retry: bool) {}
}

/// An observer that ignores everything (tools and tests).
#[derive(Debug, Default)]
pub struct NoObserver;

impl CallObserver for NoObserver {
    fn observe(&self, _: &'static str, _: &str) {}
}

/// Most regions one account's clients, pacers and status watchers are kept for: AWS has fewer, so
/// only names no allowlist stopped can reach it, and they cannot grow the pool without bound.
pub const MAX_REGIONS_PER_ACCOUNT: usize = 48;

/// Client and pacing buckets of each account+region.
type ClientMap = HashMap<(String, String), Clients>;

/// The clients of one account+region: EC2 and SNS share its credentials, proxy and endpoint.
#[derive(Clone)]
struct Clients {
    ec2: aws_sdk_ec2::Client,
    sns: aws_sdk_sns::Client,
    sqs: aws_sdk_sqs::Client,
    sts: aws_sdk_sts::Client,
    pacer: Arc<Pacer>,
}

/// Clients and status watchers per account and region, built on first use and then shared by every
/// job.
pub struct Ec2Pool {
    accounts: HashMap<String, AccountConfig>,
    pacing: PacingConfig,
    clients: Mutex<ClientMap>,
    watchers: Mutex<HashMap<(String, String), Arc<StatusWatcher>>>,
    share: std::sync::OnceLock<Arc<dyn RoundShare>>,
    coalescers: Mutex<HashMap<(String, String), Arc<Coalescer>>>,
    observer: Arc<dyn CallObserver>,
}

impl Ec2Pool {
    /// A pool over the configured accounts; every account+region gets its own pacing buckets.
    pub fn new(
        accounts: HashMap<String, AccountConfig>,
        pacing: PacingConfig,
        observer: Arc<dyn CallObserver>,
    ) -> Self {
        Self {
            accounts,
            pacing,
            clients: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            share: std::sync::OnceLock::new(),
            coalescers: Mutex::new(HashMap::new()),
            observer,
        }
    }

    /// Shares every status watcher's rounds through `share` (replicas of one queue); set once,
    /// before the first watcher is made.
    pub fn share_rounds(&self, share: Arc<dyn RoundShare>) {
        let _ = self.share.set(share);
    }

    /// The one coalescer of an account and region.
    pub async fn coalescer(&self, account: &str, region: &str) -> Result<Arc<Coalescer>, Ec2Error> {
        let key = (account.to_string(), region.to_string());
        let lock = || self.coalescers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = lock().get(&key) {
            return Ok(c.clone());
        }
        let ec2 = self.get(account, region).await?;
        let (window, hold) = (self.pacing.coalesce_window, self.pacing.coalesce_hold);
        Ok(lock()
            .entry(key)
            .or_insert_with(|| Coalescer::new(Arc::new(ec2), window, hold))
            .clone())
    }

    /// The one status watcher of an account and region.
    pub async fn watcher(
        &self,
        account: &str,
        region: &str,
    ) -> Result<Arc<StatusWatcher>, Ec2Error> {
        let key = (account.to_string(), region.to_string());
        let lock = || self.watchers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = lock().get(&key) {
            return Ok(w.clone());
        }
        let ec2 = self.get(account, region).await?;
        Ok(lock()
            .entry(key)
            .or_insert_with(|| match self.share.get() {
                Some(share) => StatusWatcher::shared(ec2, share.clone(), scope(account, region)),
                None => StatusWatcher::new(ec2),
            })
            .clone())
    }

    /// The driver for one account and region.
    pub async fn get(&self, account: &str, region: &str) -> Result<Ec2, Ec2Error> {
        let c = self.clients_for(account, region).await?;
        Ok(self.driver(c.ec2, c.pacer))
    }

    /// The SNS client of an account and region (same credentials, proxy and endpoint as EC2).
    pub async fn sns(&self, account: &str, region: &str) -> Result<aws_sdk_sns::Client, Ec2Error> {
        Ok(self.clients_for(account, region).await?.sns)
    }

    /// The SQS client of an account and region (SQS intakes; same credentials, proxy, endpoint).
    pub async fn sqs(&self, account: &str, region: &str) -> Result<aws_sdk_sqs::Client, Ec2Error> {
        Ok(self.clients_for(account, region).await?.sqs)
    }

    /// The STS client of an account and region (`ec2jobd doctor`: whose credentials these are).
    pub async fn sts(&self, account: &str, region: &str) -> Result<aws_sdk_sts::Client, Ec2Error> {
        Ok(self.clients_for(account, region).await?.sts)
    }

    async fn clients_for(&self, account: &str, region: &str) -> Result<Clients, Ec2Error> {
        let key = (account.to_string(), region.to_string());
        if let Some(c) = self.lock().get(&key) {
            return Ok(c.clone());
        }
        let acct = self
            .accounts
            .get(account)
            .ok_or_else(|| Ec2Error::config(format!("no account `{account}` is configured")))?;
        let in_use = self.lock().keys().filter(|(a, _)| a == account).count();
        if in_use >= MAX_REGIONS_PER_ACCOUNT {
            return Err(Ec2Error::config(format!(
                "account `{account}` already uses {in_use} regions; refusing `{region}` \
                 (set allowed_regions to the ones you use)"
            )));
        }
        let conf = sdk_config(acct, region).await?;
        let counter = attempts::AttemptCounter {
            observer: self.observer.clone(),
        };
        let clients = Clients {
            ec2: aws_sdk_ec2::Client::from_conf(
                aws_sdk_ec2::config::Builder::from(&conf)
                    .interceptor(counter.clone())
                    .build(),
            ),
            sns: aws_sdk_sns::Client::from_conf(
                aws_sdk_sns::config::Builder::from(&conf)
                    .interceptor(counter.clone())
                    .build(),
            ),
            sqs: aws_sdk_sqs::Client::from_conf(
                aws_sdk_sqs::config::Builder::from(&conf)
                    .interceptor(counter)
                    .build(),
            ),
            sts: aws_sdk_sts::Client::new(&conf),
            pacer: Arc::new(Pacer::new(self.pacing.clone())),
        };
        Ok(self.lock().entry(key).or_insert(clients).clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClientMap> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn driver(&self, client: aws_sdk_ec2::Client, pacer: Arc<Pacer>) -> Ec2 {
        Ec2 {
            client,
            pacer,
            observer: self.observer.clone(),
        }
    }
}

fn env_secret(var: &Option<String>, what: &str) -> Result<Option<String>, Ec2Error> {
    match var {
        None => Ok(None),
        Some(name) => std::env::var(name).map(Some).map_err(|_| {
            Ec2Error::config(format!(
                "{what}: environment variable `{name}` named in config is not set"
            ))
        }),
    }
}

/// The SDK configuration of one account and region: credentials (assumed role included), retries,
/// timeouts, endpoint and proxy.
async fn sdk_config(acct: &AccountConfig, region: &str) -> Result<aws_config::SdkConfig, Ec2Error> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(region.to_string()))
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(acct.max_call_attempts.max(1))
                .with_initial_backoff(acct.retry_base)
                .with_max_backoff(acct.retry_max),
        )
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(5))
                .operation_attempt_timeout(acct.call_timeout)
                .build(),
        );
    if let Some(p) = &acct.profile {
        loader = loader.profile_name(p);
    }
    if let Some(url) = &acct.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let ak = env_secret(&acct.access_key_id_env, "access_key_id_env")?;
    let sk = env_secret(&acct.secret_access_key_env, "secret_access_key_env")?;
    let st = env_secret(&acct.session_token_env, "session_token_env")?;
    match (ak, sk) {
        (Some(ak), Some(sk)) => {
            loader = loader.credentials_provider(Credentials::new(
                ak,
                sk,
                st,
                None,
                "ec2jobd-config-env",
            ));
        }
        (None, None) => {}
        _ => {
            return Err(Ec2Error::config(
                "access_key_id_env and secret_access_key_env must be set together",
            ))
        }
    }
    if let Some(url) = &acct.https_proxy {
        loader = loader.http_client(proxied_http_client(url, acct.no_proxy.as_deref())?);
    }
    let conf = loader.load().await;
    let Some(role) = &acct.role_arn else {
        return Ok(conf);
    };
    // The role is assumed with the account's own credentials, through the same endpoint override
    // and proxy; the provider refreshes the temporary credentials itself.
    let mut assume = aws_config::sts::AssumeRoleProvider::builder(role)
        .session_name(&acct.role_session_name)
        .region(Region::new(region.to_string()))
        .configure(&conf);
    if let Some(id) = &acct.external_id {
        assume = assume.external_id(id);
    }
    let provider = assume.build().await;
    Ok(conf
        .into_builder()
        .credentials_provider(aws_sdk_ec2::config::SharedCredentialsProvider::new(
            provider,
        ))
        .build())
}

/// An HTTP client that sends every request through `proxy` (except hosts matched by `no_proxy`).
/// One connector is built on first use and shared, so connections to the proxy are pooled.
fn proxied_http_client(
    proxy: &str,
    no_proxy: Option<&str>,
) -> Result<aws_smithy_runtime_api::client::http::SharedHttpClient, Ec2Error> {
    use aws_smithy_http_client::proxy::ProxyConfig;
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    use aws_smithy_http_client::Connector;
    use aws_smithy_runtime_api::client::http::{http_client_fn, SharedHttpConnector};
    let mut cfg =
        ProxyConfig::all(proxy).map_err(|e| Ec2Error::config(format!("https_proxy: {e}")))?;
    if let Some(rules) = no_proxy {
        cfg = cfg.no_proxy(rules);
    }
    let cell: Arc<std::sync::OnceLock<SharedHttpConnector>> = Arc::default();
    Ok(http_client_fn(move |settings, components| {
        cell.get_or_init(|| {
            let mut b = Connector::builder()
                .connector_settings(settings.clone())
                .proxy_config(cfg.clone());
            b.set_sleep_impl(components.sleep_impl());
            SharedHttpConnector::new(b.tls_provider(Provider::Rustls(CryptoMode::AwsLc)).build())
        })
        .clone()
    }))
}

/// What `describe_instances` found.
#[derive(Debug, Clone, Default)]
pub struct Described {
    /// One entry per instance, in EC2's order.
    pub instances: Vec<InstanceResult>,
    /// Request id of every page fetched.
    pub request_ids: Vec<String>,
    /// `DryRunOperation`: the call would have succeeded.
    pub dry_run_ok: bool,
}

/// What a mutating call returned.
#[derive(Debug, Clone, Default)]
pub struct CallOutcome {
    /// AWS request id.
    pub request_id: Option<String>,
    /// The call was a dry run and AWS answered `DryRunOperation` ("would succeed").
    pub dry_run_ok: bool,
}

/// What to launch: `run_instances` parameters, already validated.
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// AMI id.
    pub image_id: String,
    /// Instance type, e.g. `t3.micro`.
    pub instance_type: String,
    /// Launch at least this many (all or nothing).
    pub min_count: u32,
    /// Launch at most this many.
    pub max_count: u32,
    /// Key pair name.
    pub key_name: Option<String>,
    /// Subnet.
    pub subnet_id: Option<String>,
    /// Security groups.
    pub security_group_ids: Vec<String>,
    /// Placement availability zone.
    pub availability_zone: Option<String>,
    /// User data as plain text (base64-encoded for the call).
    pub user_data: Option<String>,
    /// Instance profile name, or ARN when it starts with `arn:`.
    pub iam_instance_profile: Option<String>,
    /// Tags put on the instances at creation (atomically with it).
    pub tags: std::collections::BTreeMap<String, String>,
    /// `DisableApiTermination`.
    pub termination_protection: bool,
    /// Idempotency token (≤ 64 characters): a repeated call with it launches nothing new on AWS.
    pub client_token: String,
}

/// The API protections an instance can carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// `DisableApiTermination`: TerminateInstances is refused.
    Termination,
    /// `DisableApiStop`: StopInstances is refused.
    Stop,
}

/// One attribute change of `ModifyInstanceAttribute`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attribute {
    /// A new instance type (the instance must be stopped).
    InstanceType(String),
    /// Turn a protection on or off.
    Protection(Protection, bool),
}

/// Most ids EC2 takes in one instance call.
const IDS_PER_CALL: usize = 1000;

/// Instances per page of an unfiltered DescribeInstanceStatus (EC2's most).
pub const FLEET_PAGE: i32 = 1000;

/// One account+region's EC2 client with call accounting.
#[derive(Clone)]
pub struct Ec2 {
    client: aws_sdk_ec2::Client,
    pacer: Arc<Pacer>,
    observer: Arc<dyn CallObserver>,
}

fn aws_filters(t: &Targets) -> Option<Vec<AwsFilter>> {
    let mut out = Vec::new();
    if let Some(tags) = &t.tags {
        for (k, v) in &tags.0 {
            out.push(
                AwsFilter::builder()
                    .name(format!("tag:{k}"))
                    .values(v)
                    .build(),
            );
        }
    }
    for f in t.filters.iter().flatten() {
        out.push(
            AwsFilter::builder()
                .name(&f.name)
                .set_values(Some(f.values.clone()))
                .build(),
        );
    }
    (!out.is_empty()).then_some(out)
}

/// Makes `call` again, with backoff, while EC2 answers `*.NotFound` for ids the daemon made a
/// moment ago (EC2 is eventually consistent: a new id reaches its other calls within seconds), for
/// up to `grace`; then EC2's answer stands. Only for ids the daemon made itself: a caller's unknown
/// id is an error at once (or after `ec2.not_found_grace`).
pub async fn until_known<T, Fut>(
    grace: std::time::Duration,
    mut call: impl FnMut() -> Fut,
) -> Result<T, Ec2Error>
where
    Fut: std::future::Future<Output = Result<T, Ec2Error>>,
{
    let mut unknown = Unknown::new(grace);
    loop {
        match call().await {
            Err(e) => match unknown.again(&e) {
                Some(pause) => {
                    tracing::debug!(code = %e.code, "EC2 does not know an id it just made; asking again");
                    tokio::time::sleep(pause).await;
                }
                None => return Err(e),
            },
            r => return r,
        }
    }
}

/// When to ask EC2 again about ids it does not know yet (eventual consistency): after 500 ms,
/// doubling to 5 s, while the next try still falls within the grace. One schedule for every place
/// that waits for EC2 to know an id ([`until_known`], a job's targets).
#[derive(Debug)]
pub struct Unknown {
    started: tokio::time::Instant,
    pause: std::time::Duration,
    grace: std::time::Duration,
}

impl Unknown {
    /// A schedule whose grace starts now.
    pub fn new(grace: std::time::Duration) -> Self {
        Self {
            started: tokio::time::Instant::now(),
            pause: std::time::Duration::from_millis(500),
            grace,
        }
    }

    /// How long to wait before asking again after `e`; `None`: `e` is not about an unknown id,
    /// or the grace is spent, and EC2's answer stands.
    pub fn again(&mut self, e: &Ec2Error) -> Option<std::time::Duration> {
        if !e.is_not_found() || self.started.elapsed() + self.pause >= self.grace {
            return None;
        }
        let pause = self.pause;
        self.pause = (pause * 2).min(std::time::Duration::from_secs(5));
        Some(pause)
    }
}

/// Maps an EC2 instance to a result row.
pub fn instance_result(i: &Instance) -> InstanceResult {
    let tags: std::collections::BTreeMap<String, String> = i
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or("").to_string())))
        .collect();
    let nonempty = |s: Option<&str>| s.filter(|s| !s.is_empty()).map(String::from);
    InstanceResult {
        instance_id: i.instance_id().unwrap_or_default().to_string(),
        state: i
            .state()
            .and_then(|s| s.name())
            .map(|n| n.as_str().to_string())
            .unwrap_or_else(|| "unknown".into()),
        name: tags.get("Name").cloned(),
        instance_type: i.instance_type().map(|t| t.as_str().to_string()),
        availability_zone: nonempty(i.placement().and_then(|p| p.availability_zone())),
        private_ip: nonempty(i.private_ip_address()),
        public_ip: nonempty(i.public_ip_address()),
        private_dns_name: nonempty(i.private_dns_name()),
        public_dns_name: nonempty(i.public_dns_name()),
        launch_time: i
            .launch_time()
            .and_then(|t| t.fmt(aws_smithy_types::date_time::Format::DateTime).ok()),
        state_reason: i.state_reason().and_then(|r| {
            let code = r.code().unwrap_or_default();
            let msg = r.message().filter(|m| !m.is_empty())?;
            Some(if code.is_empty() || msg.starts_with(code) {
                msg.to_string()
            } else {
                format!("{code}: {msg}")
            })
        }),
        tags,
        ..Default::default()
    }
}

fn tags_of(tags: &std::collections::BTreeMap<String, String>) -> Vec<Tag> {
    tags.iter()
        .map(|(k, v)| Tag::builder().key(k).value(v).build())
        .collect()
}

/// Tags for a resource a call creates, set in that same call.
fn tag_spec(
    rt: aws_sdk_ec2::types::ResourceType,
    tags: &std::collections::BTreeMap<String, String>,
) -> aws_sdk_ec2::types::TagSpecification {
    aws_sdk_ec2::types::TagSpecification::builder()
        .resource_type(rt)
        .set_tags(Some(tags_of(tags)))
        .build()
}

impl Ec2 {
    /// Waits for the operation's pacing token.
    async fn pace(&self, op: &'static str) {
        let waited = self.pacer.acquire(op).await;
        if !waited.is_zero() {
            self.observer.paced(op, waited);
        }
    }

    fn outcome<T, E, R>(
        &self,
        op: &'static str,
        r: Result<T, SdkError<E, R>>,
    ) -> Result<CallOutcome, Ec2Error>
    where
        T: RequestId,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
        SdkError<E, R>: RequestId,
    {
        self.created(op, r, |_| ()).map(|(_, o)| o)
    }

    /// A call's answer, counted: what it returned (through `f`) and its outcome.
    /// `DryRunOperation` is success with nothing returned.
    fn created<T, E, R, V>(
        &self,
        op: &'static str,
        r: Result<T, SdkError<E, R>>,
        f: impl FnOnce(&T) -> V,
    ) -> Result<(Option<V>, CallOutcome), Ec2Error>
    where
        T: RequestId,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
        SdkError<E, R>: RequestId,
    {
        let r = r.map_err(|e| classify(op, e));
        self.observe(op, &r);
        match r {
            Ok(out) => {
                let request_id = out.request_id().map(String::from);
                Ok((
                    Some(f(&out)),
                    CallOutcome {
                        request_id,
                        dry_run_ok: false,
                    },
                ))
            }
            Err(e) if e.code == "DryRunOperation" => Ok((
                None,
                CallOutcome {
                    request_id: e.request_id,
                    dry_run_ok: true,
                },
            )),
            Err(e) => Err(e),
        }
    }

    /// RunInstances; returns the launched instances.
    pub async fn run_instances(
        &self,
        l: &Launch,
        dry_run: bool,
    ) -> Result<(Vec<InstanceResult>, CallOutcome), Ec2Error> {
        use aws_sdk_ec2::types::{
            IamInstanceProfileSpecification, InstanceType, Placement, ResourceType,
        };
        self.pace("RunInstances").await;
        let mut req = self
            .client
            .run_instances()
            .image_id(&l.image_id)
            .instance_type(InstanceType::from(l.instance_type.as_str()))
            .min_count(l.min_count as i32)
            .max_count(l.max_count as i32)
            .set_key_name(l.key_name.clone())
            .set_subnet_id(l.subnet_id.clone())
            .client_token(&l.client_token)
            .dry_run(dry_run);
        if !l.security_group_ids.is_empty() {
            req = req.set_security_group_ids(Some(l.security_group_ids.clone()));
        }
        if let Some(az) = &l.availability_zone {
            req = req.placement(Placement::builder().availability_zone(az).build());
        }
        if let Some(ud) = &l.user_data {
            req = req.user_data(aws_smithy_types::base64::encode(ud.as_bytes()));
        }
        if let Some(p) = &l.iam_instance_profile {
            let spec = IamInstanceProfileSpecification::builder();
            let spec = if p.starts_with("arn:") {
                spec.arn(p)
            } else {
                spec.name(p)
            };
            req = req.iam_instance_profile(spec.build());
        }
        if !l.tags.is_empty() {
            req = req.tag_specifications(tag_spec(ResourceType::Instance, &l.tags));
        }
        if l.termination_protection {
            req = req.disable_api_termination(true);
        }
        let (insts, out) = self.created("RunInstances", req.send().await, |out| {
            out.instances()
                .iter()
                .map(instance_result)
                .collect::<Vec<_>>()
        })?;
        Ok((insts.unwrap_or_default(), out))
    }

    /// Whether a boolean attribute (`DisableApiTermination`, `DisableApiStop`) is set on an instance.
    pub async fn protection(&self, id: &str, which: Protection) -> Result<bool, Ec2Error> {
        use aws_sdk_ec2::types::InstanceAttributeName as A;
        self.pace("DescribeInstanceAttribute").await;
        let attr = match which {
            Protection::Termination => A::DisableApiTermination,
            Protection::Stop => A::DisableApiStop,
        };
        let r = self
            .client
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(attr)
            .send()
            .await
            .map_err(|e| classify("DescribeInstanceAttribute", e));
        self.observe("DescribeInstanceAttribute", &r);
        let out = r?;
        let v = match which {
            Protection::Termination => out.disable_api_termination(),
            Protection::Stop => out.disable_api_stop(),
        };
        Ok(v.and_then(|v| v.value()).unwrap_or(false))
    }

    /// The instance type as EC2 has it now (`DescribeInstanceAttribute instanceType`).
    pub async fn instance_type(&self, id: &str) -> Result<Option<String>, Ec2Error> {
        self.pace("DescribeInstanceAttribute").await;
        let r = self
            .client
            .describe_instance_attribute()
            .instance_id(id)
            .attribute(aws_sdk_ec2::types::InstanceAttributeName::InstanceType)
            .send()
            .await
            .map_err(|e| classify("DescribeInstanceAttribute", e));
        self.observe("DescribeInstanceAttribute", &r);
        Ok(r?.instance_type().and_then(|v| v.value()).map(String::from))
    }

    /// One `ModifyInstanceAttribute` call (EC2 takes one instance and one attribute per call).
    pub async fn modify_attribute(
        &self,
        id: &str,
        change: &Attribute,
        dry_run: bool,
    ) -> Result<CallOutcome, Ec2Error> {
        use aws_sdk_ec2::types::{AttributeBooleanValue, AttributeValue};
        self.pace("ModifyInstanceAttribute").await;
        let req = self
            .client
            .modify_instance_attribute()
            .instance_id(id)
            .dry_run(dry_run);
        let flag = |on: bool| AttributeBooleanValue::builder().value(on).build();
        let req = match change {
            Attribute::InstanceType(t) => {
                req.instance_type(AttributeValue::builder().value(t).build())
            }
            Attribute::Protection(Protection::Termination, on) => {
                req.disable_api_termination(flag(*on))
            }
            Attribute::Protection(Protection::Stop, on) => req.disable_api_stop(flag(*on)),
        };
        self.outcome("ModifyInstanceAttribute", req.send().await)
    }

    /// Makes one paced call per chunk of at most 1000 ids; one outcome per call.
    async fn per_chunk<T, E, R, F, Fut>(
        &self,
        op: &'static str,
        ids: &[String],
        call: F,
    ) -> Result<Vec<CallOutcome>, Ec2Error>
    where
        T: RequestId,
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: std::fmt::Debug,
        SdkError<E, R>: RequestId,
        F: Fn(Vec<String>) -> Fut,
        Fut: std::future::Future<Output = Result<T, SdkError<E, R>>>,
    {
        let mut out = Vec::new();
        for chunk in ids.chunks(IDS_PER_CALL) {
            self.pace(op).await;
            out.push(self.outcome(op, call(chunk.to_vec()).await)?);
        }
        Ok(out)
    }

    /// StartInstances.
    pub async fn start_instances(
        &self,
        ids: &[String],
        dry_run: bool,
    ) -> Result<Vec<CallOutcome>, Ec2Error> {
        self.per_chunk("StartInstances", ids, |c| {
            self.client
                .start_instances()
                .set_instance_ids(Some(c))
                .dry_run(dry_run)
                .send()
        })
        .await
    }

    /// StopInstances (`force`, `hibernate`).
    pub async fn stop_instances(
        &self,
        ids: &[String],
        force: bool,
        hibernate: bool,
        dry_run: bool,
    ) -> Result<Vec<CallOutcome>, Ec2Error> {
        self.per_chunk("StopInstances", ids, |c| {
            let mut req = self
                .client
                .stop_instances()
                .set_instance_ids(Some(c))
                .dry_run(dry_run);
            if force {
                req = req.force(true);
            }
            if hibernate {
                req = req.hibernate(true);
            }
            req.send()
        })
        .await
    }

    /// StopInstances with `Hibernate` where the instance supports it and a plain stop where EC2
    /// says it does not (`UnsupportedHibernationConfiguration`, `UnsupportedOperation`): the whole
    /// list is tried first; when EC2 refuses it, each instance alone, and a refused one stopped.
    pub async fn hibernate_or_stop(
        &self,
        ids: &[String],
        force: bool,
        dry_run: bool,
    ) -> Result<Vec<CallOutcome>, Ec2Error> {
        const UNSUPPORTED: [&str; 2] = [
            "UnsupportedHibernationConfiguration",
            "UnsupportedOperation",
        ];
        match self.stop_instances(ids, force, true, dry_run).await {
            Err(e) if UNSUPPORTED.contains(&e.code.as_str()) => {}
            r => return r,
        }
        let mut out = Vec::new();
        for id in ids {
            let one = std::slice::from_ref(id);
            match self.stop_instances(one, force, true, dry_run).await {
                Err(e) if UNSUPPORTED.contains(&e.code.as_str()) => {
                    out.extend(self.stop_instances(one, force, false, dry_run).await?);
                }
                r => out.extend(r?),
            }
        }
        Ok(out)
    }

    /// RebootInstances.
    pub async fn reboot_instances(
        &self,
        ids: &[String],
        dry_run: bool,
    ) -> Result<Vec<CallOutcome>, Ec2Error> {
        self.per_chunk("RebootInstances", ids, |c| {
            self.client
                .reboot_instances()
                .set_instance_ids(Some(c))
                .dry_run(dry_run)
                .send()
        })
        .await
    }

    /// TerminateInstances (idempotent on AWS's side).
    pub async fn terminate_instances(
        &self,
        ids: &[String],
        dry_run: bool,
    ) -> Result<Vec<CallOutcome>, Ec2Error> {
        self.per_chunk("TerminateInstances", ids, |c| {
            self.client
                .terminate_instances()
                .set_instance_ids(Some(c))
                .dry_run(dry_run)
                .send()
        })
        .await
    }

    /// CreateTags on instances (adds or overwrites).
    pub async fn create_tags(
        &self,
        ids: &[String],
        tags: &std::collections::BTreeMap<String, String>,
        dry_run: bool,
    ) -> Result<Vec<CallOutcome>, Ec2Error> {
        let tags = tags_of(tags);
        self.per_chunk("CreateTags", ids, |c| {
            self.client
                .create_tags()
                .set_resources(Some(c))
                .set_tags(Some(tags.clone()))
                .dry_run(dry_run)
                .send()
        })
        .await
    }

    /// DeleteTags on instances: by key (any value), or only where the value matches.
    pub async fn delete_tags(
        &self,
        ids: &[String],
        keys: &[String],
        tags: &std::collections::BTreeMap<String, String>,
        dry_run: bool,
    ) -> Result<Vec<CallOutcome>, Ec2Error> {
        let mut list: Vec<Tag> = keys.iter().map(|k| Tag::builder().key(k).build()).collect();
        list.extend(tags_of(tags));
        self.per_chunk("DeleteTags", ids, |c| {
            self.client
                .delete_tags()
                .set_resources(Some(c))
                .set_tags(Some(list.clone()))
                .dry_run(dry_run)
                .send()
        })
        .await
    }

    /// DescribeInstanceStatus for at most 100 ids, including non-running instances.
    pub async fn describe_instance_status(
        &self,
        ids: &[String],
    ) -> Result<Vec<(String, InstanceStatus)>, Ec2Error> {
        self.instance_status_page(Some(ids), None)
            .await
            .map(|(found, _)| found)
    }

    /// One page (up to 1,000 instances) of the status of *every* instance of the region, stopped
    /// and terminated ones included, after `token`; the token of the next page, if any.
    pub async fn instance_status_fleet_page(
        &self,
        token: Option<String>,
    ) -> Result<(Vec<(String, InstanceStatus)>, Option<String>), Ec2Error> {
        self.instance_status_page(None, token).await
    }

    /// DescribeInstanceStatus by id (`ids`) or, without ids, one page of the whole region.
    async fn instance_status_page(
        &self,
        ids: Option<&[String]>,
        token: Option<String>,
    ) -> Result<(Vec<(String, InstanceStatus)>, Option<String>), Ec2Error> {
        self.pace("DescribeInstanceStatus").await;
        let call = self
            .client
            .describe_instance_status()
            .include_all_instances(true);
        // EC2 refuses MaxResults beside instance ids.
        let call = match ids {
            Some(ids) => call.set_instance_ids(Some(ids.to_vec())),
            None => call.max_results(FLEET_PAGE).set_next_token(token),
        };
        let r = call
            .send()
            .await
            .map_err(|e| classify("DescribeInstanceStatus", e));
        self.observe("DescribeInstanceStatus", &r);
        let out = r?;
        let next = out
            .next_token()
            .filter(|t| !t.is_empty())
            .map(str::to_string);
        let summary =
            |s: Option<&aws_sdk_ec2::types::SummaryStatus>| s.map(|s| s.as_str().to_string());
        let found = out
            .instance_statuses()
            .iter()
            .filter_map(|s| {
                Some((
                    s.instance_id()?.to_string(),
                    InstanceStatus {
                        state: s
                            .instance_state()
                            .and_then(|st| st.name())
                            .map(|n| n.as_str().to_string())
                            .unwrap_or_default(),
                        system: summary(s.system_status().and_then(|x| x.status())),
                        instance: summary(s.instance_status().and_then(|x| x.status())),
                        ebs: summary(s.attached_ebs_status().and_then(|x| x.status())),
                    },
                ))
            })
            .collect();
        Ok((found, next))
    }

    fn observe<T>(&self, op: &'static str, r: &Result<T, Ec2Error>) {
        match r {
            Ok(_) => self.observer.observe(op, "ok"),
            Err(e) => self.observer.observe(op, &e.code),
        }
    }

    /// Every instance matching the targets, following `NextToken` until the last page.
    pub async fn describe_instances(
        &self,
        targets: &Targets,
        dry_run: bool,
    ) -> Result<Described, Ec2Error> {
        let ids = targets.instance_ids.as_ref().map(|l| l.0.clone());
        let filters = aws_filters(targets);
        let mut out = Described::default();
        let mut token: Option<String> = None;
        loop {
            self.pace("DescribeInstances").await;
            let mut req = self
                .client
                .describe_instances()
                .set_instance_ids(ids.clone())
                .set_filters(filters.clone())
                .set_next_token(token.clone());
            if ids.is_none() {
                req = req.max_results(1000);
            }
            if dry_run {
                req = req.dry_run(true);
            }
            let r = req
                .send()
                .await
                .map_err(|e| classify("DescribeInstances", e));
            self.observe("DescribeInstances", &r);
            let page = match r {
                Ok(p) => p,
                Err(e) if dry_run && e.code == "DryRunOperation" => {
                    out.dry_run_ok = true;
                    out.request_ids.extend(e.request_id);
                    return Ok(out);
                }
                Err(e) => return Err(e),
            };
            out.request_ids.extend(page.request_id().map(String::from));
            for r in page.reservations() {
                out.instances
                    .extend(r.instances().iter().map(instance_result));
            }
            token = page
                .next_token()
                .filter(|t| !t.is_empty())
                .map(String::from);
            if token.is_none() {
                return Ok(out);
            }
        }
    }
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    /// However many region names reach it, one account keeps at most `MAX_REGIONS_PER_ACCOUNT`
    /// sets of clients (each with a pacer, and a status watcher once polled).
    #[tokio::test]
    async fn regions_per_account_are_bounded() {
        let acct = AccountConfig {
            region: "us-east-1".into(),
            endpoint_url: Some("http://127.0.0.1:9".into()),
            profile: None,
            access_key_id_env: None,
            secret_access_key_env: None,
            session_token_env: None,
            role_arn: None,
            external_id: None,
            role_session_name: "test".into(),
            https_proxy: None,
            no_proxy: None,
            call_timeout: Duration::from_secs(1),
            max_call_attempts: 1,
            retry_base: Duration::from_millis(10),
            retry_max: Duration::from_millis(10),
        };
        let pool = Ec2Pool::new(
            HashMap::from([("a".to_string(), acct)]),
            PacingConfig::default(),
            Arc::new(NoObserver),
        );
        for i in 0..MAX_REGIONS_PER_ACCOUNT {
            pool.get("a", &format!("us-east-{i}"))
                .await
                .expect("within the bound");
        }
        assert!(
            pool.get("a", "us-east-1").await.is_ok(),
            "a region in use stays usable"
        );
        let e = pool
            .get("a", "eu-west-99")
            .await
            .err()
            .expect("over the bound");
        assert!(e.to_string().contains("regions"), "{e}");
    }
}

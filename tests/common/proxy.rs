//! A fault-injecting HTTP proxy in front of moto, for what moto cannot show: slow or impaired status
//! checks, throttling, 5xx, dropped connections and latency. It counts calls by AWS operation and
//! the most calls in flight at once. Share-based faults draw from a seeded RNG, so a test's faults
//! are the same on every run.
//!
//! It speaks just enough HTTP/1.1 for the AWS SDK: one request per connection, answered with
//! `Connection: close`, which also lets it drop a connection after reading a request.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does to traffic; change it at any time with [`FaultProxy::set`].
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Until this instant, DescribeInstanceStatus reports InstanceStatus with this summary.
    pub instance_status: Option<(String, Instant)>,
    /// For this long after an instance was started (a StartInstances or RebootInstances request
    /// naming it, or a RunInstances answer), DescribeInstanceStatus reports its InstanceStatus as
    /// `initializing`, as AWS does while an instance boots.
    pub checks_after_start: Option<Duration>,
    /// Until this instant, DescribeInstanceStatus reports SystemStatus with this summary.
    pub system_status: Option<(String, Instant)>,
    /// Until this instant, DescribeInstanceStatus reports running instances in this state
    /// (`stopped`: a start that fell back, as with a missing KMS grant).
    pub instance_state: Option<(String, Instant)>,
    /// Share of calls answered `503 RequestLimitExceeded`.
    pub throttle: f64,
    /// Share of calls answered `503 Unavailable`.
    pub unavailable: f64,
    /// Share of calls whose connection is closed after the request is read, with no answer.
    pub drop: f64,
    /// Added before every call is forwarded.
    pub latency: Duration,
    /// Plus a uniformly drawn extra delay up to this (latency 100 ms + jitter 400 ms: 100–500 ms).
    pub latency_jitter: Duration,
    /// Added after a call is forwarded, before its answer is written: the call takes effect at
    /// once and its answer is late (a client killed meanwhile never reads it).
    pub answer_delay: Duration,
    /// Dropped calls are first forwarded to moto, so the call takes effect and only its answer is
    /// lost (the hard case for mutating calls); otherwise they never reach moto.
    pub drop_after_forward: bool,
    /// Until this instant, CreateSnapshot and DescribeSnapshots report completed snapshots in this
    /// state (`pending`, `error`) with this progress (`40%`), as AWS does while a snapshot is taken.
    pub snapshot_state: Option<(String, String, Instant)>,
    /// Until this instant, DescribeImages reports available AMIs in this state (`pending`), as AWS
    /// does while an AMI is made.
    pub image_state: Option<(String, Instant)>,
    /// Every call of this operation is answered with this HTTP status and AWS error code.
    pub error: Option<(String, u16, String)>,
    /// When set, `error` hits only calls whose form body contains this (`Hibernate=true`).
    pub error_if: Option<String>,
    /// When set, latency and share-based faults hit only these operations.
    pub only: Option<Vec<String>>,
    /// EC2's default request token buckets per operation (Describe* 100 refilled at 20/s,
    /// StartInstances and RunInstances 5 at 2/s, TerminateInstances 100 at 5/s, CreateTags 100 at
    /// 10/s, other mutating calls 50 at 5/s): a call finding its bucket empty is answered
    /// `503 RequestLimitExceeded`, as EC2 does, and counted as injected.
    pub ec2_buckets: bool,
    /// Calls of this operation are held (counted as arrived, not yet forwarded) until the
    /// semaphore gives a permit or is closed: the test acts in EC2 between a call's sending and
    /// its effect.
    pub hold: Option<(String, Arc<tokio::sync::Semaphore>)>,
    /// EC2 as it is, not as moto is: see [`Realistic`].
    pub realistic: Option<Realistic>,
    /// RunInstances and StartInstances of this instance type (or into this subnet) are answered
    /// `InsufficientInstanceCapacity` until this instant.
    pub no_capacity: Option<(String, Instant)>,
    /// RunInstances is answered with this quota error (`InstanceLimitExceeded`,
    /// `VcpuLimitExceeded`).
    pub quota: Option<String>,
    /// Instances per page of an unfiltered DescribeInstanceStatus at most (default: the call's
    /// MaxResults). The proxy pages such calls as EC2 does (`MaxResults`, `NextToken`); moto
    /// answers every instance at once.
    pub fleet_page: Option<usize>,
}

/// What real EC2 does that moto does not ("Eventual consistency in the Amazon EC2 API"; the
/// instance lifecycle), each for a while the test chooses:
/// - an id RunInstances, CreateImage, CreateSnapshot(s), CopyImage or CopySnapshot made is unknown
///   to every call naming it for `consistency` (`InvalidInstanceID.NotFound`,
///   `InvalidAMIID.NotFound`, `InvalidSnapshot.NotFound`); describes that find by filter or tag
///   still list it at once (real EC2 may leave it out for a while: not modelled yet);
/// - an instance launched or started is `pending` for `pending` (its status checks answered as
///   DescribeInstanceStatus sees a pending instance), and StopInstances or RebootInstances naming
///   it are refused `IncorrectInstanceState`;
/// - an instance stopped is `stopping` for `stopping`, and StartInstances or
///   ModifyInstanceAttribute naming it are refused `IncorrectInstanceState`;
/// - describes that take `MaxResults` get pages of `page_size`.
#[derive(Debug, Clone, Default)]
pub struct Realistic {
    pub consistency: Duration,
    pub pending: Duration,
    pub stopping: Duration,
    pub page_size: Option<usize>,
}

impl Realistic {
    /// The stand-in of issue 31: ids unknown for 3 s after they are made, `pending` 4 s after a
    /// start or launch, `stopping` 4 s after a stop, pages of 5.
    pub fn issue_31() -> Realistic {
        Realistic {
            consistency: Duration::from_secs(3),
            pending: Duration::from_secs(4),
            stopping: Duration::from_secs(4),
            page_size: Some(5),
        }
    }
}

/// EC2's default bucket (size, refill per second) for an operation.
fn ec2_bucket(op: &str) -> (&'static str, f64, f64) {
    match op {
        "StartInstances" => ("start", 5.0, 2.0),
        "RunInstances" => ("run", 5.0, 2.0),
        "TerminateInstances" => ("terminate", 100.0, 5.0),
        "CreateTags" => ("create_tags", 100.0, 10.0),
        o if o.starts_with("Describe") => ("describe", 100.0, 20.0),
        _ => ("mutating", 50.0, 5.0),
    }
}

#[derive(Default)]
struct Stats {
    calls: HashMap<String, u64>,
    injected: HashMap<String, u64>,
    max_in_flight: HashMap<String, usize>,
    as_forward_proxy: u64,
    last_body: HashMap<String, String>,
    order: Vec<String>,
    max_ids: HashMap<String, usize>,
    ids: HashMap<String, usize>,
    answered: HashMap<String, u64>,
    /// Per operation: when each call arrived and how long it took to answer.
    timeline: Vec<(String, Instant, Duration)>,
    arrived: Vec<Instant>,
    /// (operation, the request's `ec2jobd:job-id` tag, the id moto answered) of every
    /// CreateSnapshot/RunInstances/CreateImage that took effect in moto, answered or not.
    created: Vec<(String, String, String)>,
}

struct Shared {
    upstream: String,
    faults: Mutex<Faults>,
    stats: Mutex<Stats>,
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// What EC2 remembers, shared by every door of one EC2 ([`FaultProxy::door`]).
    world: Arc<World>,
    rng: Mutex<StdRng>,
    http: reqwest::Client,
}

/// The EC2 side of the proxy: what it remembers of what passed through, whichever door it came in.
#[derive(Default)]
struct World {
    /// RunInstances answers by ClientToken: AWS makes a repeated request with the same token return
    /// the first one's instances; moto ignores the token, so the proxy does what AWS does.
    client_tokens: Mutex<HashMap<String, Reply>>,
    /// When each instance was last started, as seen passing through.
    started: Mutex<HashMap<String, Instant>>,
    /// When each instance was last stopped, as seen passing through.
    stopped: Mutex<HashMap<String, Instant>>,
    /// When each id the proxy saw made (instances, images, snapshots) was made.
    made: Mutex<HashMap<String, Instant>>,
    /// EC2's request buckets (`Faults::ec2_buckets`): tokens left and when last refilled.
    buckets: Mutex<HashMap<&'static str, (f64, Instant)>>,
}

/// The running proxy; stops with the test's runtime.
pub struct FaultProxy {
    pub url: String,
    shared: Arc<Shared>,
}

impl FaultProxy {
    pub async fn start(upstream: &str, seed: u64) -> FaultProxy {
        Self::on(upstream, seed, Arc::default()).await
    }

    /// Another door to the same EC2: its own address, faults and counts (so calls are counted per
    /// client), the same memory of starts, stops, client tokens and request buckets as this one.
    /// Its faults start as this door's are now.
    pub async fn door(&self, seed: u64) -> FaultProxy {
        let other = Self::on(&self.shared.upstream, seed, self.shared.world.clone()).await;
        *other.shared.faults.lock().unwrap() = self.shared.faults.lock().unwrap().clone();
        other
    }

    async fn on(upstream: &str, seed: u64, world: Arc<World>) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            faults: Mutex::new(Faults::default()),
            stats: Mutex::new(Stats::default()),
            in_flight: Mutex::new(HashMap::new()),
            world,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            http: reqwest::Client::new(),
        });
        let s = shared.clone();
        tokio::spawn(async move {
            while let Ok((sock, _)) = listener.accept().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let _ = handle(s, sock).await;
                });
            }
        });
        FaultProxy { url, shared }
    }

    pub fn set(&self, f: impl FnOnce(&mut Faults)) {
        f(&mut self.shared.faults.lock().unwrap());
    }

    /// When the first call (of any operation) arrived at or after `t`.
    pub fn first_call_after(&self, t: Instant) -> Option<Instant> {
        let st = self.shared.stats.lock().unwrap();
        let i = st.arrived.partition_point(|a| *a < t);
        st.arrived.get(i).copied()
    }

    /// Resources that took effect in moto by operation (CreateSnapshot, RunInstances, CreateImage), as
    /// (job id from the request's `ec2jobd:job-id` tag, resource id): what a job made, including
    /// what was deleted since and what was made by a call whose answer was lost.
    pub fn created(&self, op: &str) -> Vec<(String, String)> {
        self.shared
            .stats
            .lock()
            .unwrap()
            .created
            .iter()
            .filter(|(o, _, _)| o == op)
            .map(|(_, j, id)| (j.clone(), id.clone()))
            .collect()
    }

    /// Calls of an operation whose answer was written back to the client.
    pub fn answered(&self, op: &str) -> u64 {
        self.shared
            .stats
            .lock()
            .unwrap()
            .answered
            .get(op)
            .copied()
            .unwrap_or(0)
    }

    /// Calls seen for an operation (faulted ones included).
    pub fn calls(&self, op: &str) -> u64 {
        self.shared
            .stats
            .lock()
            .unwrap()
            .calls
            .get(op)
            .copied()
            .unwrap_or(0)
    }

    /// Faults injected into an operation.
    pub fn injected(&self, op: &str) -> u64 {
        self.shared
            .stats
            .lock()
            .unwrap()
            .injected
            .get(op)
            .copied()
            .unwrap_or(0)
    }

    /// All faults injected.
    pub fn injected_total(&self) -> u64 {
        self.shared.stats.lock().unwrap().injected.values().sum()
    }

    /// Requests that came in absolute form, i.e. from a client configured to use this as its proxy.
    pub fn forward_proxied(&self) -> u64 {
        self.shared.stats.lock().unwrap().as_forward_proxy
    }

    /// Instance ids all calls of an operation carried, together.
    pub fn ids(&self, op: &str) -> usize {
        self.shared
            .stats
            .lock()
            .unwrap()
            .ids
            .get(op)
            .copied()
            .unwrap_or(0)
    }

    /// The most instance ids one call of an operation carried.
    pub fn max_ids(&self, op: &str) -> usize {
        self.shared
            .stats
            .lock()
            .unwrap()
            .max_ids
            .get(op)
            .copied()
            .unwrap_or(0)
    }

    /// Every operation called so far, in arrival order.
    pub fn order(&self) -> Vec<String> {
        self.shared.stats.lock().unwrap().order.clone()
    }

    /// The form-encoded body of the last call of an operation.
    pub fn last_body(&self, op: &str) -> String {
        self.shared
            .stats
            .lock()
            .unwrap()
            .last_body
            .get(op)
            .cloned()
            .unwrap_or_default()
    }

    /// Every call since the proxy started, in order: (operation, when it arrived, how long moto
    /// and the proxy took to answer it).
    pub fn timeline(&self) -> Vec<(String, Instant, Duration)> {
        self.shared.stats.lock().unwrap().timeline.clone()
    }

    /// Most calls of an operation in flight at once.
    pub fn max_in_flight(&self, op: &str) -> usize {
        self.shared
            .stats
            .lock()
            .unwrap()
            .max_in_flight
            .get(op)
            .copied()
            .unwrap_or(0)
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The AWS operation of a request: `Action=` in a query-protocol form body (EC2, SNS), else the
/// `X-Amz-Target` header of the JSON protocol (SQS: `AmazonSQS.DeleteMessage` → `DeleteMessage`).
fn operation(headers: &[(String, String)], body: &str) -> String {
    let target = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-amz-target"))
        .and_then(|(_, v)| v.rsplit('.').next());
    match target {
        Some(t) => t.to_string(),
        None => action_of(body),
    }
}

fn action_of(body: &str) -> String {
    body.split('&')
        .find_map(|kv| kv.strip_prefix("Action="))
        .unwrap_or("Unknown")
        .to_string()
}

async fn respond(
    sock: &mut TcpStream,
    status: u16,
    body: &str,
    request_id: &str,
) -> std::io::Result<()> {
    // JSON-protocol answers (SQS) are JSON; the query protocol's (EC2, SNS) XML.
    let kind = if body.starts_with('{') {
        "application/x-amz-json-1.0"
    } else {
        "text/xml;charset=UTF-8"
    };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nx-amzn-requestid: {request_id}\r\nConnection: close\r\n\r\n",
        if status == 200 { "OK" } else { "Error" },
        body.len()
    );
    sock.write_all(head.as_bytes()).await?;
    sock.write_all(body.as_bytes()).await?;
    sock.shutdown().await
}

fn error_xml(code: &str, message: &str, request_id: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{request_id}</RequestID></Response>"
    )
}

fn rewrite_status(body: String, element: &str, summary: &str) -> String {
    body.replace(
        &format!("</details><status>ok</status></{element}>"),
        &format!("</details><status>{summary}</status></{element}>"),
    )
}

async fn handle(s: Arc<Shared>, mut sock: TcpStream) -> std::io::Result<()> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let mut path = request_line.split(' ').nth(1).unwrap_or("/").to_string();
    // Absolute form (`POST http://host:port/ HTTP/1.1`): a client using us as its HTTP proxy.
    if let Some(rest) = path.strip_prefix("http://") {
        path = rest.find('/').map_or("/".into(), |i| rest[i..].to_string());
        s.stats.lock().unwrap().as_forward_proxy += 1;
    }
    let mut headers = Vec::new();
    let mut len = 0usize;
    for l in lines.filter(|l| !l.is_empty()) {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_string(), v.trim().to_string());
            if k.eq_ignore_ascii_case("content-length") {
                len = v.parse().unwrap_or(0);
            }
            headers.push((k, v));
        }
    }
    while buf.len() < head_end + len {
        let n = sock.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
    let op = operation(&headers, &body);

    let counter = s
        .in_flight
        .lock()
        .unwrap()
        .entry(op.clone())
        .or_default()
        .clone();
    let now_in = counter.fetch_add(1, Ordering::SeqCst) + 1;
    {
        let mut st = s.stats.lock().unwrap();
        *st.calls.entry(op.clone()).or_default() += 1;
        st.last_body.insert(op.clone(), body.clone());
        st.order.push(op.clone());
        st.arrived.push(Instant::now());
        // Instance calls name ids as InstanceId.N; tag calls as ResourceId.N.
        let ids = body.matches("InstanceId.").count() + body.matches("ResourceId.").count();
        let m = st.max_ids.entry(op.clone()).or_default();
        *m = (*m).max(ids);
        *st.ids.entry(op.clone()).or_default() += ids;
        let m = st.max_in_flight.entry(op.clone()).or_default();
        *m = (*m).max(now_in);
    }
    let gate = (s.faults.lock().unwrap().hold.clone()).filter(|(o, _)| *o == op);
    if let Some((_, gate)) = gate {
        // A closed semaphore lets everything through.
        let _permit = gate.acquire().await;
    }
    let began = Instant::now();
    let reply = forward(&s, &op, &path, &headers, body).await;
    s.stats
        .lock()
        .unwrap()
        .timeline
        .push((op.clone(), began, began.elapsed()));
    let delay = {
        let f = s.faults.lock().unwrap();
        let applies = f.only.as_ref().is_none_or(|ops| ops.contains(&op));
        if applies {
            f.answer_delay
        } else {
            Duration::ZERO
        }
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    // Out of flight before the answer is written: the client may send its next call the moment it
    // reads this one.
    counter.fetch_sub(1, Ordering::SeqCst);
    match reply {
        Some((status, text, rid)) => {
            respond(&mut sock, status, &text, &rid).await?;
            *s.stats.lock().unwrap().answered.entry(op).or_default() += 1;
            Ok(())
        }
        None => Ok(()), // the socket is dropped: no answer at all
    }
}

/// The text of every `<element>` of an answer, in order.
fn elements(text: &str, element: &str) -> Vec<String> {
    text.split(&format!("<{element}>"))
        .skip(1)
        .filter_map(|p| {
            p.split_once(&format!("</{element}>"))
                .map(|(v, _)| v.to_string())
        })
        .collect()
}

/// The instance ids a request names (`InstanceId.N`, or `InstanceId` alone).
fn instance_ids(fields: &HashMap<String, String>) -> Vec<String> {
    fields
        .iter()
        .filter(|(k, _)| *k == "InstanceId" || k.starts_with("InstanceId."))
        .map(|(_, v)| v.clone())
        .collect()
}

/// Every resource id a request names: instances, tagged resources, images, snapshots.
fn named_ids(fields: &HashMap<String, String>) -> Vec<String> {
    fields
        .iter()
        .filter(|(k, _)| {
            let base = k.split('.').next().unwrap_or("");
            matches!(
                base,
                "InstanceId"
                    | "ResourceId"
                    | "ImageId"
                    | "SnapshotId"
                    | "SourceImageId"
                    | "SourceSnapshotId"
            )
        })
        .map(|(_, v)| v.clone())
        .collect()
}

/// What EC2 refuses that moto allows (see [`Realistic`]): a call naming an id made too recently
/// for this call to know it, or an instance still moving between states.
fn refuse_as_ec2_would(
    s: &Shared,
    op: &str,
    fields: &HashMap<String, String>,
    r: &Realistic,
) -> Option<Reply> {
    let now = Instant::now();
    let within = |at: Option<&Instant>, d: Duration| at.is_some_and(|t| now.duration_since(*t) < d);
    let refuse = |code: &str, msg: String| {
        Some((
            400,
            error_xml(code, &msg, "fault-realistic"),
            "fault-realistic".into(),
        ))
    };
    {
        let made = s.world.made.lock().unwrap();
        for id in named_ids(fields) {
            if within(made.get(&id), r.consistency) {
                let code = match id.split('-').next() {
                    Some("i") => "InvalidInstanceID.NotFound",
                    Some("ami") => "InvalidAMIID.NotFound",
                    Some("snap") => "InvalidSnapshot.NotFound",
                    _ => "InvalidID.NotFound",
                };
                return refuse(code, format!("The ID '{id}' does not exist"));
            }
        }
    }
    let ids = instance_ids(fields);
    let (moving, verb) = match op {
        "StartInstances" | "ModifyInstanceAttribute" => {
            let stopped = s.world.stopped.lock().unwrap();
            (
                ids.iter()
                    .find(|id| within(stopped.get(*id), r.stopping))
                    .cloned(),
                "stopping",
            )
        }
        "StopInstances" | "RebootInstances" => {
            let started = s.world.started.lock().unwrap();
            (
                ids.iter()
                    .find(|id| within(started.get(*id), r.pending))
                    .cloned(),
                "pending",
            )
        }
        _ => (None, ""),
    };
    let id = moving?;
    refuse(
        "IncorrectInstanceState",
        format!("The instance '{id}' is not in a state from which it can be acted on ({verb})."),
    )
}

/// An answer's instances as EC2 would show them (see [`Realistic`]): one started or launched
/// within `pending` is `pending` (its status checks `initializing`), one stopped within
/// `stopping` is `stopping`. Whether anything changed.
fn in_transition(s: &Shared, text: &str, r: &Realistic) -> (String, bool) {
    let now = Instant::now();
    let started = s.world.started.lock().unwrap().clone();
    let stopped = s.world.stopped.lock().unwrap().clone();
    let within = |at: Option<&Instant>, d: Duration| at.is_some_and(|t| now.duration_since(*t) < d);
    let mut parts = text.split("<instanceId>");
    let mut out = parts.next().unwrap_or_default().to_string();
    let mut changed = false;
    for part in parts {
        out.push_str("<instanceId>");
        let id = part.split("</instanceId>").next().unwrap_or_default();
        let mut p = part.to_string();
        if within(started.get(id), r.pending) {
            p = p.replacen(
                "<code>16</code><name>running</name>",
                "<code>0</code><name>pending</name>",
                1,
            );
            p = rewrite_status(p, "systemStatus", "initializing");
            p = rewrite_status(p, "instanceStatus", "initializing");
        } else if within(stopped.get(id), r.stopping) {
            p = p.replacen(
                "<code>80</code><name>stopped</name>",
                "<code>64</code><name>stopping</name>",
                1,
            );
        }
        changed |= p != part;
        out.push_str(&p);
    }
    (out, changed)
}

/// An answer to write: status, body, request id.
type Reply = (u16, String, String);

/// The form fields of a query-protocol request body, percent-decoded.
fn form(body: &str) -> HashMap<String, String> {
    fn decode(v: &str) -> String {
        let b = v.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'%' if i + 2 < b.len() => {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(c) => {
                            out.push(c);
                            i += 3;
                            continue;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                b'+' => out.push(b' '),
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (decode(k), decode(v)))
        .collect()
}

/// The value of tag `key` in a request's TagSpecification fields.
fn tag_value(fields: &HashMap<String, String>, key: &str) -> Option<String> {
    fields
        .iter()
        .find(|(k, v)| {
            k.starts_with("TagSpecification.") && k.ends_with(".Key") && v.as_str() == key
        })
        .and_then(|(k, _)| fields.get(&format!("{}.Value", k.trim_end_matches(".Key"))))
        .cloned()
}

/// Forwards a call to moto as it came (a repeated RunInstances ClientToken gets the first answer,
/// as from AWS); None when moto cannot be reached.
async fn send_upstream(
    s: &Shared,
    path: &str,
    headers: &[(String, String)],
    body: String,
) -> Option<Reply> {
    let fields = form(&body);
    let op = fields.get("Action").cloned().unwrap_or_default();
    let token = fields
        .get("ClientToken")
        .filter(|_| op == "RunInstances")
        .cloned();
    if let Some(r) = token
        .as_ref()
        .and_then(|t| s.world.client_tokens.lock().unwrap().get(t).cloned())
    {
        return Some(r);
    }
    let reply = send_to_moto(s, path, headers, body).await?;
    let element = match op.as_str() {
        "CreateSnapshot" => Some("snapshotId"),
        "RunInstances" => Some("instanceId"),
        "CreateImage" => Some("imageId"),
        _ => None,
    };
    if let (200, Some(element)) = (reply.0, element) {
        let job = tag_value(&fields, "ec2jobd:job-id").unwrap_or_default();
        let mut st = s.stats.lock().unwrap();
        for part in reply.1.split(&format!("<{element}>")).skip(1) {
            if let Some((id, _)) = part.split_once(&format!("</{element}>")) {
                st.created.push((op.clone(), job.clone(), id.to_string()));
            }
        }
    }
    if let Some(t) = token {
        if reply.0 == 200 {
            s.world
                .client_tokens
                .lock()
                .unwrap()
                .insert(t, reply.clone());
        }
    }
    Some(reply)
}

async fn send_to_moto(
    s: &Shared,
    path: &str,
    headers: &[(String, String)],
    body: String,
) -> Option<Reply> {
    let mut req = s.http.post(format!("{}{path}", s.upstream)).body(body);
    for (k, v) in headers {
        if !["host", "content-length", "connection"].contains(&k.to_ascii_lowercase().as_str()) {
            req = req.header(k, v);
        }
    }
    let resp = req.send().await.ok()?;
    let status = resp.status().as_u16();
    let rid = resp
        .headers()
        .get("x-amzn-requestid")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("proxied")
        .to_string();
    Some((status, resp.text().await.unwrap_or_default(), rid))
}

async fn forward(
    s: &Shared,
    op: &str,
    path: &str,
    headers: &[(String, String)],
    body: String,
) -> Option<Reply> {
    let faults = s.faults.lock().unwrap().clone();
    let applies = faults
        .only
        .as_ref()
        .is_none_or(|ops| ops.iter().any(|o| o == op));
    let (roll, jitter): (f64, f64) = {
        let mut rng = s.rng.lock().unwrap();
        (rng.gen(), rng.gen())
    };
    if applies && !(faults.latency + faults.latency_jitter).is_zero() {
        tokio::time::sleep(faults.latency + faults.latency_jitter.mul_f64(jitter)).await;
    }
    let note = |s: &Shared| {
        *s.stats
            .lock()
            .unwrap()
            .injected
            .entry(op.to_string())
            .or_default() += 1
    };
    if faults.ec2_buckets {
        let (class, size, refill) = ec2_bucket(op);
        let now = Instant::now();
        let empty = {
            let mut b = s.world.buckets.lock().unwrap();
            let (tokens, at) = b.entry(class).or_insert((size, now));
            *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * refill).min(size);
            *at = now;
            if *tokens >= 1.0 {
                *tokens -= 1.0;
                false
            } else {
                true
            }
        };
        if empty {
            note(s);
            let xml = error_xml(
                "RequestLimitExceeded",
                "Request limit exceeded.",
                "fault-bucket",
            );
            return Some((503, xml, "fault-bucket".into()));
        }
    }
    if let Some((target, status, code)) = &faults.error {
        let wanted = faults
            .error_if
            .as_ref()
            .is_none_or(|t| body.contains(t.as_str()));
        if target == op && wanted {
            note(s);
            let xml = error_xml(code, "Injected by the test proxy.", "fault-error");
            return Some((*status, xml, "fault-error".into()));
        }
    }
    if applies && roll < faults.drop {
        note(s);
        if faults.drop_after_forward {
            let _ = send_upstream(s, path, headers, body).await;
        }
        return None;
    }
    if applies && roll < faults.drop + faults.throttle {
        note(s);
        let xml = error_xml(
            "RequestLimitExceeded",
            "Request limit exceeded.",
            "fault-throttle",
        );
        return Some((503, xml, "fault-throttle".into()));
    }
    if applies && roll < faults.drop + faults.throttle + faults.unavailable {
        note(s);
        let xml = error_xml("Unavailable", "The service is unavailable.", "fault-503");
        return Some((503, xml, "fault-503".into()));
    }
    let fields = form(&body);
    if let Some((what, until)) = &faults.no_capacity {
        let asks = |k: &str| fields.get(k).is_some_and(|v| v == what);
        let launch = op == "RunInstances" && (asks("InstanceType") || asks("SubnetId"));
        if Instant::now() < *until && (launch || op == "StartInstances") {
            note(s);
            let msg = format!("We currently do not have sufficient {what} capacity.");
            let xml = error_xml("InsufficientInstanceCapacity", &msg, "fault-capacity");
            return Some((500, xml, "fault-capacity".into()));
        }
    }
    if let (Some(code), "RunInstances") = (&faults.quota, op) {
        note(s);
        let msg = "You have requested more instances than your current instance limit allows.";
        return Some((
            400,
            error_xml(code, msg, "fault-quota"),
            "fault-quota".into(),
        ));
    }
    let mut body = body;
    if let Some(r) = &faults.realistic {
        if let Some(refusal) = refuse_as_ec2_would(s, op, &fields, r) {
            note(s);
            return Some(refusal);
        }
        if let Some(n) = r.page_size {
            body = body
                .split('&')
                .map(|kv| match kv.strip_prefix("MaxResults=") {
                    Some(_) => format!("MaxResults={n}"),
                    None => kv.to_string(),
                })
                .collect::<Vec<_>>()
                .join("&");
        }
    }
    let stops: Vec<String> = if op == "StopInstances" {
        instance_ids(&fields)
    } else {
        Vec::new()
    };
    let starts: Vec<String> = if matches!(op, "StartInstances" | "RebootInstances") {
        body.split('&')
            .filter(|kv| kv.starts_with("InstanceId."))
            .filter_map(|kv| kv.split_once('=').map(|(_, v)| v.to_string()))
            .collect()
    } else {
        Vec::new()
    };
    let (status, mut text, rid) = send_upstream(s, path, headers, body).await?;
    if status == 200 {
        let now = Instant::now();
        let mut started = s.world.started.lock().unwrap();
        let mut stopped = s.world.stopped.lock().unwrap();
        for id in starts {
            stopped.remove(&id);
            started.insert(id, now);
        }
        for id in stops {
            started.remove(&id);
            stopped.insert(id, now);
        }
        if op == "RunInstances" {
            for id in elements(&text, "instanceId") {
                started.insert(id, now);
            }
        }
        let made = match op {
            "RunInstances" => elements(&text, "instanceId"),
            "CreateImage" | "CopyImage" => elements(&text, "imageId"),
            "CreateSnapshot" | "CreateSnapshots" | "CopySnapshot" => elements(&text, "snapshotId"),
            _ => Vec::new(),
        };
        let mut m = s.world.made.lock().unwrap();
        for id in made {
            m.insert(id, now);
        }
    }
    if let (Some(r), 200) = (&faults.realistic, status) {
        if matches!(
            op,
            "DescribeInstances"
                | "DescribeInstanceStatus"
                | "RunInstances"
                | "StartInstances"
                | "StopInstances"
        ) {
            let (t, changed) = in_transition(s, &text, r);
            text = t;
            if changed {
                note(s);
            }
        }
    }
    if op == "DescribeInstanceStatus" {
        if let Some(boot) = faults.checks_after_start {
            let started = s.world.started.lock().unwrap().clone();
            let booting = |id: &str| started.get(id).is_some_and(|t| t.elapsed() < boot);
            // Each instance's part of the answer runs from its <instanceId> to the next one.
            let mut parts = text.split("<instanceId>");
            let mut out = parts.next().unwrap_or_default().to_string();
            for part in parts {
                out.push_str("<instanceId>");
                let id = part.split("</instanceId>").next().unwrap_or_default();
                if booting(id) {
                    out.push_str(&rewrite_status(
                        part.to_string(),
                        "instanceStatus",
                        "initializing",
                    ));
                    note(s);
                } else {
                    out.push_str(part);
                }
            }
            text = out;
        }
    }
    if op == "DescribeSnapshots" || op == "CreateSnapshot" {
        if let Some((state, progress, until)) = &faults.snapshot_state {
            if Instant::now() < *until && text.contains("<status>completed</status>") {
                text = text
                    .replace(
                        "<status>completed</status>",
                        &format!("<status>{state}</status>"),
                    )
                    .replace(
                        "<progress>100%</progress>",
                        &format!("<progress>{progress}</progress>"),
                    );
                note(s);
            }
        }
    }
    if op == "DescribeImages" {
        if let Some((state, until)) = &faults.image_state {
            if Instant::now() < *until && text.contains("<imageState>available</imageState>") {
                text = text.replace(
                    "<imageState>available</imageState>",
                    &format!("<imageState>{state}</imageState>"),
                );
                note(s);
            }
        }
    }
    if op == "DescribeInstanceStatus" {
        let now = Instant::now();
        for (hold, element) in [
            (&faults.instance_status, "instanceStatus"),
            (&faults.system_status, "systemStatus"),
        ] {
            if let Some((summary, until)) = hold {
                if now < *until {
                    text = rewrite_status(text, element, summary);
                    note(s);
                }
            }
        }
        if let Some((state, until)) = &faults.instance_state {
            if now < *until {
                text = text.replace(
                    "<name>running</name></instanceState>",
                    &format!("<name>{state}</name></instanceState>"),
                );
                note(s);
            }
        }
    }
    if op == "DescribeInstanceStatus" && status == 200 && instance_ids(&fields).is_empty() {
        if let Some(max) = fields
            .get("MaxResults")
            .and_then(|m| m.parse::<usize>().ok())
        {
            let max = faults.fleet_page.map_or(max, |p| p.min(max)).max(1);
            let from = fields
                .get("NextToken")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            text = page_status_set(&text, from, max);
        }
    }
    Some((status, text, rid))
}

/// An unfiltered DescribeInstanceStatus answer cut to `max` instances from the `from`th, with a
/// `nextToken` (the next offset) when more remain, as EC2 pages it.
fn page_status_set(text: &str, from: usize, max: usize) -> String {
    let (open, close) = ("<instanceStatusSet>", "</instanceStatusSet>");
    let (Some(a), Some(b)) = (text.find(open), text.find(close)) else {
        return text.to_string();
    };
    let inner = &text[a + open.len()..b];
    // Top-level <item>s (each holds nested ones: its status details).
    let mut items = Vec::new();
    let (mut depth, mut start, mut i) = (0usize, 0usize, 0usize);
    while i < inner.len() {
        if inner[i..].starts_with("<item>") {
            if depth == 0 {
                start = i;
            }
            depth += 1;
            i += "<item>".len();
        } else if inner[i..].starts_with("</item>") {
            depth = depth.saturating_sub(1);
            i += "</item>".len();
            if depth == 0 {
                items.push(&inner[start..i]);
            }
        } else {
            i += inner[i..].chars().next().map_or(1, char::len_utf8);
        }
    }
    let page: String = items.iter().skip(from).take(max).copied().collect();
    let next = if from + max < items.len() {
        format!("<nextToken>{}</nextToken>", from + max)
    } else {
        String::new()
    };
    format!(
        "{}{open}{page}{close}{next}{}",
        &text[..a],
        &text[b + close.len()..]
    )
}

//! Coalesced calls: per account+region, the same instance call asked for by many jobs — start,
//! stop (same force/hibernate), reboot, terminate, tags with identical tag sets, and describe by id —
//! is gathered until no new caller came for a quiet window (at most [`MAX_GATHER`]), and further
//! until the pacer has a token for it, then sent as one call with every caller's ids (up to
//! [`MAX_IDS`]); the answer is split back per caller. Describes, which a worker waits on, use a short
//! window; mutating calls, which the parking lot makes for jobs that hold no worker, a longer one, so
//! a steady stream of jobs fills few large calls.
//!
//! A batch never turns one caller's bad input into another's failure: when EC2 refuses a batch
//! because of some ids (`InvalidInstanceID.NotFound`, `IncorrectInstanceState`, … naming them),
//! the callers that asked for those ids get the error and the rest are sent again without them; when
//! such an error names no id of the batch, the batch is split in halves until it does. Errors that
//! are not about ids (throttling beyond the SDK's retries, permissions) reach every caller, as they
//! would have reached each alone.
//!
//! It reaches EC2 through [`Ec2Api`] (the driver's [`Ec2`] in the daemon; a scripted EC2 in the unit
//! tests below, which show the batching, splitting and halving with answers moto cannot give).
//!
//! A caller acting under a lease says so with [`gated`]: its part of a batch is only sent while its
//! gate says the lease is known held; at the moment a batch goes, callers whose gate is shut get
//! [`fenced`] instead and their ids are left out (a batch gathered for a second must not carry the
//! call of a job whose process has meanwhile lost touch with its database).
//!
//! Must not: know jobs, checkpoints or dry runs (callers make dry runs alone, and keep their own
//! crash safety: they checkpoint before asking and check states after a restart).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ec2jobd_spec::{IdList, InstanceResult, Targets};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::{CallOutcome, Ec2, Ec2Error};

/// Whether the lease a caller acts under is known held now (see the module doc).
pub type Gate = Arc<dyn Fn() -> bool + Send + Sync>;

tokio::task_local! {
    static GATE: Gate;
}

/// Runs `f` with every coalesced call it makes sent only while `gate` says so.
pub async fn gated<F: std::future::Future>(gate: Gate, f: F) -> F::Output {
    GATE.scope(gate, f).await
}

/// The answer of a call left out because its caller's gate was shut (transient: whoever holds the
/// lease next makes it).
pub fn fenced() -> Ec2Error {
    Ec2Error {
        code: "Fenced".into(),
        message: "not sent: the lease of the job it was for is not known to be held".into(),
        transient: true,
        request_id: None,
    }
}

/// Most instance ids in one coalesced call.
pub const MAX_IDS: usize = 500;

/// Longest a call is held gathering callers, however many keep coming.
pub const MAX_GATHER: Duration = Duration::from_secs(1);

/// A call many callers can share: the operation and everything but the ids.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum SharedCall {
    /// DescribeInstances by instance id.
    Describe,
    /// StartInstances.
    Start,
    /// StopInstances with these flags.
    Stop {
        /// `Force`.
        force: bool,
        /// `Hibernate`.
        hibernate: bool,
        /// With `hibernate`: a plain stop for instances that cannot hibernate.
        fallback: bool,
    },
    /// RebootInstances.
    Reboot,
    /// TerminateInstances.
    Terminate,
    /// CreateTags with this tag set.
    CreateTags(BTreeMap<String, String>),
    /// DeleteTags of these keys and key/value pairs.
    DeleteTags {
        /// Keys removed whatever their value.
        keys: Vec<String>,
        /// Pairs removed where the value matches.
        tags: BTreeMap<String, String>,
    },
}

impl SharedCall {
    /// The EC2 operation.
    pub fn operation(&self) -> &'static str {
        match self {
            SharedCall::Describe => "DescribeInstances",
            SharedCall::Start => "StartInstances",
            SharedCall::Stop { .. } => "StopInstances",
            SharedCall::Reboot => "RebootInstances",
            SharedCall::Terminate => "TerminateInstances",
            SharedCall::CreateTags(_) => "CreateTags",
            SharedCall::DeleteTags { .. } => "DeleteTags",
        }
    }
}

/// One caller's part of a shared call's answer.
#[derive(Debug, Clone, Default)]
pub struct SharedAnswer {
    /// Request ids of the call(s) that carried the caller's ids.
    pub request_ids: Vec<String>,
    /// For a describe: the caller's instances, in EC2's order.
    pub instances: Vec<InstanceResult>,
}

/// Error codes EC2 gives when some ids of a call are at fault (not the caller or the service).
const ID_ERRORS: &[&str] = &[
    "InvalidInstanceID.NotFound",
    "InvalidInstanceID.Malformed",
    "IncorrectInstanceState",
    "IncorrectState",
    "InvalidParameterValue",
    "OperationNotPermitted",
    "UnsupportedOperation",
];

/// The instance ids an EC2 error message names (`The instance ID 'i-0abc' does not exist`).
pub fn named_ids(message: &str) -> HashSet<String> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|t| {
            t.strip_prefix("i-")
                .is_some_and(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        })
        .map(String::from)
        .collect()
}

struct Caller {
    ids: Vec<String>,
    reply: oneshot::Sender<Result<SharedAnswer, Ec2Error>>,
    /// The caller's span: the shared call is made under the first caller's and linked to the
    /// others' (`follows_from`), so each job's trace shows the EC2 call it shared.
    span: tracing::Span,
    /// The caller's [`Gate`], if it acts under a lease.
    gate: Option<Gate>,
}

impl Caller {
    fn open(&self) -> bool {
        self.gate.as_ref().is_none_or(|g| g())
    }
}

/// The coalescer of one account+region.
pub struct Coalescer {
    ec2: Arc<dyn Ec2Api>,
    window: Duration,
    hold: Duration,
    pending: Mutex<HashMap<SharedCall, Vec<Caller>>>,
}

impl Coalescer {
    /// Gathers describes until no caller came for `window`, mutating calls for `hold` (zero
    /// `window`: every call goes alone, at once).
    pub fn new(ec2: Arc<dyn Ec2Api>, window: Duration, hold: Duration) -> Arc<Self> {
        Arc::new(Self {
            ec2,
            window,
            hold: hold.max(window),
            pending: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SharedCall, Vec<Caller>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `what` for `ids`, together with whoever asks for the same call meanwhile.
    pub async fn call(
        self: &Arc<Self>,
        what: SharedCall,
        ids: Vec<String>,
    ) -> Result<SharedAnswer, Ec2Error> {
        let gate = GATE.try_with(|g| g.clone()).ok();
        if self.window.is_zero() || ids.is_empty() {
            if gate.is_some_and(|g| !g()) {
                return Err(fenced());
            }
            return self.ec2.call(&what, &ids).await;
        }
        let (reply, answer) = oneshot::channel();
        let first = {
            let mut pending = self.lock();
            let callers = pending.entry(what.clone()).or_default();
            callers.push(Caller {
                ids,
                reply,
                span: tracing::Span::current(),
                gate,
            });
            callers.len() == 1
        };
        if first {
            tokio::spawn(self.clone().flush(what));
        }
        answer.await.unwrap_or_else(|_| {
            Err(Ec2Error {
                code: "Internal".into(),
                message: "the shared call was dropped".into(),
                transient: true,
                request_id: None,
            })
        })
    }

    /// Sends what gathered for `what` once the window passed and the pacer has a token, one batch
    /// of at most [`MAX_IDS`] ids per token, until nobody waits.
    async fn flush(self: Arc<Self>, what: SharedCall) {
        // Gather while callers keep coming (each window brings more), up to MAX_GATHER: callers
        // that wait for the answer stop coming once all of them are here, so they are not held
        // longer than one quiet window; callers that hand work over (the parking lot) keep coming
        // under load and fill large batches.
        let began = tokio::time::Instant::now();
        let quiet = match what {
            SharedCall::Describe => self.window,
            _ => self.hold,
        };
        let mut seen = 0;
        loop {
            tokio::time::sleep(quiet).await;
            let now = self.lock().get(&what).map_or(0, |c| c.len());
            if now == seen || now >= MAX_IDS || began.elapsed() >= MAX_GATHER {
                break;
            }
            seen = now;
        }
        loop {
            self.ec2.ready(what.operation()).await;
            let (batch, more) = {
                let mut pending = self.lock();
                let callers = pending.remove(&what).unwrap_or_default();
                let mut batch = Vec::new();
                let mut rest = Vec::new();
                let mut n = 0;
                for c in callers {
                    if batch.is_empty() || n + c.ids.len() <= MAX_IDS {
                        n += c.ids.len();
                        batch.push(c);
                    } else {
                        rest.push(c);
                    }
                }
                let more = !rest.is_empty();
                if more {
                    // Callers arriving meanwhile join these; this loop stays their flusher.
                    pending.insert(what.clone(), rest);
                }
                (batch, more)
            };
            let (me, w) = (self.clone(), what.clone());
            tokio::spawn(async move { me.send(w, batch).await });
            if !more {
                return;
            }
        }
    }

    /// Sends one batch, answering each caller; ids EC2 names as at fault are answered with the
    /// error and the rest sent again.
    fn send(
        self: &Arc<Self>,
        what: SharedCall,
        mut callers: Vec<Caller>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            loop {
                let (open, shut): (Vec<Caller>, Vec<Caller>) =
                    callers.into_iter().partition(Caller::open);
                for c in shut {
                    let _ = c.reply.send(Err(fenced()));
                }
                callers = open;
                if callers.is_empty() {
                    return;
                }
                let mut ids: Vec<String> = Vec::new();
                let mut seen = HashSet::new();
                for id in callers.iter().flat_map(|c| c.ids.iter()) {
                    if seen.insert(id.as_str()) {
                        ids.push(id.clone());
                    }
                }
                let span = tracing::info_span!(
                    parent: &callers[0].span,
                    "ec2_call",
                    operation = what.operation(),
                    callers = callers.len(),
                    ids = ids.len()
                );
                for c in &callers[1..] {
                    span.follows_from(&c.span);
                }
                match self.ec2.call(&what, &ids).instrument(span).await {
                    Ok(answer) => {
                        for c in callers {
                            let mine: HashSet<&String> = c.ids.iter().collect();
                            let part = SharedAnswer {
                                request_ids: answer.request_ids.clone(),
                                instances: answer
                                    .instances
                                    .iter()
                                    .filter(|i| mine.contains(&i.instance_id))
                                    .cloned()
                                    .collect(),
                            };
                            let _ = c.reply.send(Ok(part));
                        }
                        return;
                    }
                    Err(e) if callers.len() > 1 && ID_ERRORS.contains(&e.code.as_str()) => {
                        let named = named_ids(&e.message);
                        let (bad, good): (Vec<Caller>, Vec<Caller>) = callers
                            .into_iter()
                            .partition(|c| c.ids.iter().any(|i| named.contains(i)));
                        if bad.is_empty() {
                            // The error names none of the batch's ids: halve until it does.
                            let mut first = good;
                            let second = first.split_off(first.len() / 2);
                            self.send(what.clone(), first).await;
                            self.send(what, second).await;
                            return;
                        }
                        for c in bad {
                            let _ = c.reply.send(Err(e.clone()));
                        }
                        callers = good;
                    }
                    Err(e) => {
                        for c in callers {
                            let _ = c.reply.send(Err(e.clone()));
                        }
                        return;
                    }
                }
            }
        })
    }
}

/// What a coalescer needs of EC2: the pacer's word that an operation may go, and the shared call
/// itself. [`Ec2`] is the real one; unit tests script one, to show what the batching does with
/// answers moto cannot give.
#[async_trait::async_trait]
pub trait Ec2Api: Send + Sync {
    /// Waits until the pacer would let `operation` go (taking no token).
    async fn ready(&self, operation: &str);
    /// Makes `what` for `ids`, not as a dry run.
    async fn call(&self, what: &SharedCall, ids: &[String]) -> Result<SharedAnswer, Ec2Error>;
}

#[async_trait::async_trait]
impl Ec2Api for Ec2 {
    async fn ready(&self, operation: &str) {
        self.pacer.ready(operation).await;
    }

    async fn call(&self, what: &SharedCall, ids: &[String]) -> Result<SharedAnswer, Ec2Error> {
        if *what == SharedCall::Describe {
            let targets = Targets {
                instance_ids: Some(IdList(ids.to_vec())),
                ..Default::default()
            };
            let d = self.describe_instances(&targets, false).await?;
            return Ok(SharedAnswer {
                request_ids: d.request_ids,
                instances: d.instances,
            });
        }
        let outs = self.instance_call(what, ids, false).await?;
        Ok(SharedAnswer {
            request_ids: outs.into_iter().filter_map(|o| o.request_id).collect(),
            instances: Vec::new(),
        })
    }
}

impl Ec2 {
    /// Makes a mutating shared call for `ids` alone (a dry run, or a coalescer's batch); a
    /// describe is not one (`Ok` with no outcome).
    pub async fn instance_call(
        &self,
        what: &SharedCall,
        ids: &[String],
        dry_run: bool,
    ) -> Result<Vec<CallOutcome>, Ec2Error> {
        match what {
            SharedCall::Describe => Ok(Vec::new()),
            SharedCall::Start => self.start_instances(ids, dry_run).await,
            SharedCall::Stop {
                force,
                hibernate: true,
                fallback: true,
            } => self.hibernate_or_stop(ids, *force, dry_run).await,
            SharedCall::Stop {
                force, hibernate, ..
            } => self.stop_instances(ids, *force, *hibernate, dry_run).await,
            SharedCall::Reboot => self.reboot_instances(ids, dry_run).await,
            SharedCall::Terminate => self.terminate_instances(ids, dry_run).await,
            SharedCall::CreateTags(tags) => self.create_tags(ids, tags, dry_run).await,
            SharedCall::DeleteTags { keys, tags } => {
                self.delete_tags(ids, keys, tags, dry_run).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scripted EC2: refuses any call naming an id in `missing` with the error EC2 gives
    /// (`InvalidInstanceID.NotFound` naming the ids it found missing, or, with `anonymous`, naming
    /// none), answers the rest, and records every call's ids.
    #[derive(Default)]
    struct Scripted {
        missing: Vec<String>,
        anonymous: bool,
        calls: Mutex<Vec<Vec<String>>>,
    }

    #[async_trait::async_trait]
    impl Ec2Api for Scripted {
        async fn ready(&self, _: &str) {}

        async fn call(&self, _: &SharedCall, ids: &[String]) -> Result<SharedAnswer, Ec2Error> {
            self.calls.lock().unwrap().push(ids.to_vec());
            let bad: Vec<&String> = ids.iter().filter(|i| self.missing.contains(i)).collect();
            if !bad.is_empty() {
                let named = if self.anonymous {
                    "One or more instance IDs are invalid".to_string()
                } else {
                    format!(
                        "The instance IDs '{}' do not exist",
                        bad.iter()
                            .map(|s| s.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                };
                return Err(Ec2Error {
                    code: "InvalidInstanceID.NotFound".into(),
                    message: named,
                    transient: false,
                    request_id: Some(format!("r-{}", self.calls.lock().unwrap().len())),
                });
            }
            Ok(SharedAnswer {
                request_ids: vec![format!("r-{}", self.calls.lock().unwrap().len())],
                instances: Vec::new(),
            })
        }
    }

    /// `callers` each ask for their ids at once; the answers in the same order.
    async fn gather(
        ec2: Arc<Scripted>,
        callers: &[&[&str]],
    ) -> Vec<Result<SharedAnswer, Ec2Error>> {
        let c = Coalescer::new(ec2, Duration::from_millis(20), Duration::from_millis(250));
        let asks: Vec<_> = callers
            .iter()
            .map(|ids| {
                let (c, ids) = (c.clone(), ids.iter().map(|s| s.to_string()).collect());
                tokio::spawn(async move { c.call(SharedCall::Start, ids).await })
            })
            .collect();
        let mut out = Vec::new();
        for a in asks {
            out.push(a.await.expect("caller task"));
        }
        out
    }

    fn ids(calls: &Mutex<Vec<Vec<String>>>) -> Vec<Vec<String>> {
        calls.lock().unwrap().clone()
    }

    #[tokio::test(start_paused = true)]
    async fn callers_within_the_window_share_one_call() {
        let ec2 = Arc::new(Scripted::default());
        let answers = gather(ec2.clone(), &[&["i-1"], &["i-2", "i-1"], &["i-3"]]).await;
        assert!(answers.iter().all(|a| a.is_ok()), "{answers:?}");
        assert_eq!(ids(&ec2.calls), [["i-1", "i-2", "i-3"]]);
    }

    /// A caller whose lease stops being known held while its call gathers is left out of the batch
    /// when it goes (answered `Fenced`); the others' call goes without its ids.
    #[tokio::test(start_paused = true)]
    async fn a_caller_whose_gate_shut_while_gathering_is_left_out() {
        let ec2 = Arc::new(Scripted::default());
        let c = Coalescer::new(
            ec2.clone(),
            Duration::from_millis(20),
            Duration::from_millis(250),
        );
        let held = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let gate: Gate = {
            let held = held.clone();
            Arc::new(move || held.load(std::sync::atomic::Ordering::SeqCst))
        };
        let fenced_one = {
            let c = c.clone();
            tokio::spawn(gated(gate, async move {
                c.call(SharedCall::Start, vec!["i-1".into()]).await
            }))
        };
        let other = {
            let c = c.clone();
            tokio::spawn(async move { c.call(SharedCall::Start, vec!["i-2".into()]).await })
        };
        tokio::time::sleep(Duration::from_millis(5)).await;
        held.store(false, std::sync::atomic::Ordering::SeqCst);
        let e = fenced_one.await.unwrap().unwrap_err();
        assert_eq!(e.code, "Fenced");
        assert!(other.await.unwrap().is_ok());
        assert_eq!(ids(&ec2.calls), [["i-2"]]);
        // Gated and shut from the start, alone: nothing is sent.
        let shut: Gate = Arc::new(|| false);
        let alone = gated(shut, c.call(SharedCall::Reboot, vec!["i-3".into()])).await;
        assert_eq!(alone.unwrap_err().code, "Fenced");
        assert_eq!(ec2.calls.lock().unwrap().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_caller_naming_a_missing_id_fails() {
        let ec2 = Arc::new(Scripted {
            missing: vec!["i-2".into()],
            ..Default::default()
        });
        let answers = gather(ec2.clone(), &[&["i-1"], &["i-2"], &["i-3"]]).await;
        assert!(answers[0].is_ok() && answers[2].is_ok(), "{answers:?}");
        let e = answers[1].as_ref().unwrap_err();
        assert_eq!(e.code, "InvalidInstanceID.NotFound");
        // The batch, then the others again without the missing id.
        assert_eq!(
            ids(&ec2.calls),
            [vec!["i-1", "i-2", "i-3"], vec!["i-1", "i-3"]]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_naming_no_id_is_narrowed_down_by_halving() {
        let ec2 = Arc::new(Scripted {
            missing: vec!["i-4".into()],
            anonymous: true,
            ..Default::default()
        });
        let answers = gather(ec2.clone(), &[&["i-1"], &["i-2"], &["i-3"], &["i-4"]]).await;
        let failed: Vec<usize> = (0..4).filter(|k| answers[*k].is_err()).collect();
        assert_eq!(failed, [3], "{answers:?}");
        // 4 → 2+2 → the half with i-4 splits again; i-4 alone fails by itself.
        let calls = ids(&ec2.calls);
        assert_eq!(calls.first().map(Vec::len), Some(4));
        assert_eq!(calls.last(), Some(&vec!["i-4".to_string()]));
        assert!(calls.len() <= 5, "{calls:?}");
    }

    #[test]
    fn finds_the_ids_an_error_names() {
        let one = named_ids("The instance ID 'i-0123456789abcdef0' does not exist");
        assert_eq!(one, HashSet::from(["i-0123456789abcdef0".to_string()]));
        let two = named_ids("The instance IDs 'i-01234567, i-89abcdef' do not exist");
        assert_eq!(two.len(), 2);
        assert!(named_ids("You are not authorized to perform this operation.").is_empty());
        assert!(named_ids("ami-12345678 and i- and i-xyz").is_empty());
    }
}

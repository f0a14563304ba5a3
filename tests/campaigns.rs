//! Stress campaigns (issue 7): crash, graceful stop, EC2 faults, storage faults, overload and (issue
//! 12) hostile input, each against real moto servers and the real binary. Each prints one table of
//! figures and fails on any violation of the daemon's promise: an accepted job is never lost, never runs its side effects
//! twice, and never reports success that did not happen (checked in moto, not in our own answers).
//!
//! The short forms run in CI with the rest of the suite. The long forms (the sizes issue 7 names:
//! 300 jobs, five SIGKILLs, 60 s of overload) run by hand with `scripts/campaign --long [name]`,
//! which sets `CAMPAIGN_FORM=long`. Random choices (job order, kill moments, faults) come from one
//! seed printed at the start; `CAMPAIGN_SEED=<n>` replays a run.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{FaultProxy, Realistic};
use common::{Daemon, DaemonOpts, Moto};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

const MINUTE: Duration = Duration::from_secs(60);
const JOB_TAG: &str = "ec2jobd:job-id";

fn long() -> bool {
    std::env::var("CAMPAIGN_FORM").is_ok_and(|v| v == "long")
}

/// The short (CI) or long (by hand) size of something.
fn size(short: usize, long_form: usize) -> usize {
    if long() {
        long_form
    } else {
        short
    }
}

fn seeded(name: &str) -> StdRng {
    let seed = std::env::var("CAMPAIGN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("[{name}] seed {seed} (replay: CAMPAIGN_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// The one PostgreSQL server the campaigns share: the replicas campaigns restart it, so each of them
/// runs alone (write); the other campaigns on it run together (read).
static POSTGRES: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Which queue a campaign's daemon uses.
#[derive(Clone, Copy)]
enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The daemon's `database_url` (`None`: SQLite in its directory), or `None` to skip (no
    /// PostgreSQL server was given; said on stderr).
    fn database(self) -> Option<Option<String>> {
        match self {
            Backend::Sqlite => Some(None),
            Backend::Postgres => common::postgres_database().map(Some),
        }
    }

    /// Held while a campaign uses the PostgreSQL server ([`POSTGRES`]).
    async fn share(self) -> Option<tokio::sync::RwLockReadGuard<'static, ()>> {
        match self {
            Backend::Sqlite => None,
            Backend::Postgres => Some(POSTGRES.read().await),
        }
    }

    fn named(self, campaign: &str) -> String {
        match self {
            Backend::Sqlite => campaign.to_string(),
            Backend::Postgres => format!("{campaign} on PostgreSQL"),
        }
    }
}

/// Which EC2 a campaign's daemon meets: moto as it is, or moto behind the proxy's realistic
/// profile (issue 31: ids unknown for a while, `pending` and `stopping`, small pages).
#[derive(Clone, Copy)]
enum Ec2 {
    Moto,
    Realistic,
}

impl Ec2 {
    fn apply(self, proxy: &FaultProxy) {
        if let Ec2::Realistic = self {
            proxy.set(|f| f.realistic = Some(Realistic::issue_31()));
        }
    }

    fn named(self, campaign: String) -> String {
        match self {
            Ec2::Moto => campaign,
            Ec2::Realistic => format!("{campaign} (realistic EC2)"),
        }
    }
}

/// Prints a campaign's figures as one table, then fails on any violation (after printing them all).
fn report(name: &str, rows: &[(&str, String)], violations: &[String]) {
    let form = if long() { "long" } else { "short" };
    let mut out = format!("\n== campaign {name} ({form} form) ==\n");
    for (k, v) in rows {
        out += &format!("  {k:<46} {v}\n");
    }
    out += &format!("  {:<46} {}\n", "violations", violations.len());
    eprintln!("{out}");
    assert!(
        violations.is_empty(),
        "campaign {name}: {} violation(s):\n{}",
        violations.len(),
        violations.join("\n")
    );
}

/// What a campaign job was meant to do, so its outcome can be checked in moto.
#[derive(Debug, Clone)]
enum Job {
    Run(usize),
    Stop(String),
    Start(String),
    Reboot(String),
    Tag(String),
    Snapshot(String),
    Image(String),
}

impl Job {
    fn spec(&self, image: &str, tag: &str) -> Value {
        let wait = json!({"interval": "200ms", "timeout": "3m"});
        match self {
            Job::Run(n) => json!({"action": "run_instances", "wait": wait,
                "params": {"image_id": image, "instance_type": "t3.micro", "min_count": n}}),
            Job::Stop(i) => json!({"action": "stop_instances",
                "targets": {"instance_ids": [i]}, "wait": wait}),
            Job::Start(i) => json!({"action": "start_instances",
                "targets": {"instance_ids": [i]}, "wait": wait}),
            Job::Reboot(i) => json!({"action": "reboot_instances",
                "targets": {"instance_ids": [i]}, "wait": wait}),
            Job::Tag(i) => json!({"action": "create_tags", "targets": {"instance_ids": [i]},
                "params": {"tags": {"Campaign": tag}}}),
            Job::Image(i) => json!({"action": "create_image",
                "targets": {"instance_ids": [i]}, "wait": wait,
                "params": {"keep": 2, "group": tag, "no_reboot": true, "name": "c-{job_id}"}}),
            Job::Snapshot(i) => json!({"action": "create_snapshots",
                "targets": {"instance_ids": [i]}, "wait": wait,
                "params": {"keep": 2, "group": tag}}),
        }
    }

    fn mutating_op(&self) -> &'static str {
        match self {
            Job::Run(_) => "RunInstances",
            Job::Stop(_) => "StopInstances",
            Job::Start(_) => "StartInstances",
            Job::Reboot(_) => "RebootInstances",
            Job::Tag(_) => "CreateTags",
            Job::Snapshot(_) => "CreateSnapshot",
            Job::Image(_) => "CreateImage",
        }
    }
}

/// Instances and jobs for a mixed campaign: `per` jobs of each kind, every state-changing job on an
/// instance of its own (so moto's final state is each job's doing), snapshot and AMI jobs three per
/// volume or instance (so rotation with keep 2 deletes).
async fn mixed_jobs(moto: &Moto, kinds: &[&str], per: usize, rng: &mut StdRng) -> Vec<Job> {
    let tags = [("Campaign", "yes")];
    let mut jobs = Vec::new();
    for kind in kinds {
        match *kind {
            "run" => jobs.extend((0..per).map(|i| Job::Run(1 + i % 3))),
            "snapshot" => {
                let ids = moto.launch(per.div_ceil(3) as i32, &tags).await;
                jobs.extend((0..per).map(|i| Job::Snapshot(ids[i / 3].clone())));
            }
            "image" => {
                let ids = moto.launch(per.div_ceil(3) as i32, &tags).await;
                jobs.extend((0..per).map(|i| Job::Image(ids[i / 3].clone())));
            }
            _ => {
                let ids = moto.launch(per as i32, &tags).await;
                if *kind == "start" {
                    moto.stop(&ids).await;
                }
                jobs.extend(ids.into_iter().map(|i| match *kind {
                    "stop" => Job::Stop(i),
                    "start" => Job::Start(i),
                    "reboot" => Job::Reboot(i),
                    _ => Job::Tag(i),
                }));
            }
        }
    }
    jobs.shuffle(rng);
    jobs
}

/// Outcome checks shared by the crash and fault campaigns, all against moto's own view.
struct Checker<'a> {
    moto: &'a Moto,
    proxy: &'a FaultProxy,
    tag: &'a str,
    violations: Vec<String>,
    states: BTreeMap<String, usize>,
    resumed: usize,
    /// Per volume: snapshot jobs, and the snapshots they reported.
    volumes: BTreeMap<String, (usize, BTreeSet<String>)>,
    /// Per instance: AMI jobs, and the AMIs they reported.
    images: BTreeMap<String, (usize, BTreeSet<String>)>,
}

impl<'a> Checker<'a> {
    fn new(moto: &'a Moto, proxy: &'a FaultProxy, tag: &'a str) -> Self {
        Self {
            moto,
            proxy,
            tag,
            violations: Vec::new(),
            states: BTreeMap::new(),
            resumed: 0,
            volumes: BTreeMap::new(),
            images: BTreeMap::new(),
        }
    }

    async fn job(&mut self, id: &str, job: &Job, j: &Value) {
        let state = j["state"].as_str().unwrap_or("?").to_string();
        *self.states.entry(state.clone()).or_default() += 1;
        if j["attempts"].as_u64().unwrap_or(0) > 1 {
            self.resumed += 1;
        }
        if state != "succeeded" {
            self.violations
                .push(format!("job {id} {job:?} ended {state}: {}", j["error"]));
            return;
        }
        let reported: Vec<(String, String)> = j["results"]["instances"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|i| {
                        (
                            i["instance_id"].as_str().unwrap_or("").to_string(),
                            i["state"].as_str().unwrap_or("").to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let want = match job {
            Job::Stop(_) => "stopped",
            _ => "running",
        };
        match job {
            Job::Run(n) => {
                let made = self.made("RunInstances", id);
                if made.len() != *n {
                    self.violations.push(format!(
                        "job {id} asked for {n} instance(s); RunInstances made {made:?} in moto"
                    ));
                }
                let mine: BTreeSet<String> =
                    self.moto.tagged(JOB_TAG, id).await.into_iter().collect();
                if mine.len() != *n {
                    self.violations.push(format!(
                        "job {id} ran {n} instance(s) but moto holds {} with its tag: {mine:?}",
                        mine.len()
                    ));
                }
                let said: BTreeSet<String> = reported.iter().map(|(i, _)| i.clone()).collect();
                if said != mine {
                    self.violations
                        .push(format!("job {id} reported {said:?}, moto has {mine:?}"));
                }
                self.states_match(id, &reported, want).await;
            }
            Job::Stop(i) | Job::Start(i) | Job::Reboot(i) => {
                if reported.len() != 1 || reported[0].0 != *i {
                    self.violations
                        .push(format!("job {id} on {i} reported {reported:?}"));
                }
                self.states_match(id, &reported, want).await;
            }
            Job::Tag(i) => {
                let tagged = self.moto.tagged("Campaign", self.tag).await;
                if !tagged.contains(i) {
                    self.violations
                        .push(format!("job {id} succeeded but {i} lacks its tag in moto"));
                }
            }
            Job::Image(i) => {
                let e = self.images.entry(i.clone()).or_default();
                e.0 += 1;
                for img in j["results"]["images"].as_array().into_iter().flatten() {
                    e.1.insert(img["image_id"].as_str().unwrap_or("").to_string());
                }
                let made = self.made("CreateImage", id);
                if made.len() != 1 {
                    self.violations.push(format!(
                        "job {id} images {i} once but CreateImage made {made:?}"
                    ));
                }
            }
            Job::Snapshot(_) => {
                let volumes = j["results"]["volumes"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for v in &volumes {
                    let vol = v["volume_id"].as_str().unwrap_or("").to_string();
                    let e = self.volumes.entry(vol).or_default();
                    e.0 += 1;
                    if let Some(s) = v["snapshot"]["snapshot_id"].as_str() {
                        e.1.insert(s.to_string());
                    }
                }
                // Counted where they took effect: deleted ones and ones whose answer was lost too.
                let made = self.made("CreateSnapshot", id);
                if made.len() != volumes.len() {
                    self.violations.push(format!(
                        "job {id} snapshots {} volume(s) but CreateSnapshot made {made:?}",
                        volumes.len()
                    ));
                }
            }
        }
    }

    /// What calls of `op` made in moto for job `id` (counted at the proxy).
    fn made(&self, op: &str, id: &str) -> Vec<String> {
        self.proxy
            .created(op)
            .into_iter()
            .filter(|(job, _)| job == id)
            .map(|(_, r)| r)
            .collect()
    }

    /// No job claims a state moto does not show.
    async fn states_match(&mut self, id: &str, reported: &[(String, String)], want: &str) {
        let ids: Vec<String> = reported.iter().map(|(i, _)| i.clone()).collect();
        if ids.is_empty() {
            return;
        }
        for ((iid, said), real) in reported.iter().zip(self.moto.states(&ids).await) {
            if said != &real || real != want {
                self.violations.push(format!(
                    "job {id}: {iid} reported {said}, moto says {real}, wanted {want}"
                ));
            }
        }
    }

    /// Per volume (snapshots) or instance (AMIs): rotation left exactly `keep` (2) generations, and
    /// every one a job reported or moto holds was made by a job of this campaign. Returns (made, of
    /// which removed by rotation since).
    async fn volumes(&mut self) -> (usize, usize) {
        let groups = self.volumes.clone();
        self.generations("CreateSnapshot", "volume", groups).await
    }

    /// See [`Checker::volumes`].
    async fn images(&mut self) -> (usize, usize) {
        let groups = self.images.clone();
        self.generations("CreateImage", "instance", groups).await
    }

    async fn generations(
        &mut self,
        op: &str,
        noun: &str,
        groups: BTreeMap<String, (usize, BTreeSet<String>)>,
    ) -> (usize, usize) {
        let made: BTreeSet<String> = self
            .proxy
            .created(op)
            .into_iter()
            .map(|(_, id)| id)
            .collect();
        let mut held_total = 0;
        for (key, (jobs, reported)) in groups {
            let group = format!("{}/{key}", self.tag);
            let held: BTreeSet<String> = if op == "CreateImage" {
                self.moto.images_tagged("ec2jobd:rotation", &group).await
            } else {
                self.moto
                    .snapshots_tagged("ec2jobd:rotation", &group)
                    .await
                    .into_keys()
                    .collect()
            };
            held_total += held.len();
            if held.len() != jobs.min(2) {
                self.violations.push(format!(
                    "{noun} {key}: {} generations kept after {jobs} jobs, keep is 2: {held:?}",
                    held.len()
                ));
            }
            if !reported.is_subset(&made) || !held.is_subset(&made) {
                self.violations.push(format!(
                    "{noun} {key}: reported {reported:?} / held {held:?}, not all made by these jobs"
                ));
            }
        }
        (made.len(), made.len().saturating_sub(held_total))
    }
}

/// Waits for every accepted job to end; any that did not succeed is a violation. Returns the count
/// of jobs by final state.
async fn all_succeeded(
    d: &Daemon,
    ids: &[String],
    within: Duration,
    violations: &mut Vec<String>,
) -> BTreeMap<String, usize> {
    let mut states = BTreeMap::<String, usize>::new();
    for id in ids {
        let j = d.wait_final(id, within).await;
        let state = j["state"].as_str().unwrap_or("?").to_string();
        if state != "succeeded" {
            violations.push(format!("accepted job {id} ended {state}: {}", j["error"]));
        }
        *states.entry(state).or_default() += 1;
    }
    states
}

/// Jobs in a final state, from `/metrics` (the daemon counts its database on each scrape).
async fn finished(d: &Daemon) -> u64 {
    let mut n = 0.0;
    for s in ["succeeded", "failed", "cancelled"] {
        n += d.metric(&format!("ec2jobd_jobs{{state=\"{s}\"}}")).await;
    }
    n as u64
}

/// Saves the schedule `tick`: a describe of nothing every second (`schedule_firings` reads them).
async fn every_second(d: &Daemon) {
    let r = d
        .req(reqwest::Method::PUT, "/v1/schedules/tick", &d.admin.clone())
        .json(&json!({
            "cron": "* * * * * *",
            "overlap": "queue",
            "job": {"action": "describe_instances", "targets": {"tags": {"Tick": "none"}},
                    "allow_empty": true},
        }))
        .send()
        .await
        .expect("put schedule");
    assert_eq!(r.status(), 201);
}

/// The firing times of a schedule's jobs, oldest first.
async fn schedule_firings(d: &Daemon, name: &str) -> Vec<chrono::DateTime<chrono::Utc>> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (st, page) = d
            .get_json(&format!("/v1/jobs?schedule={name}&limit=500{cursor}"))
            .await;
        assert_eq!(st, 200, "{page}");
        for j in page["jobs"].as_array().into_iter().flatten() {
            let at = j["fired_at"].as_str().and_then(|t| t.parse().ok());
            out.push(at.unwrap_or_else(|| panic!("a schedule's job without fired_at: {j}")));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    out.reverse();
    out
}

/// A fault proxy in front of `moto` with a little latency, so kills and cuts land inside calls
/// and waits, not only between them, and status checks that take 2 s after each start, so they
/// also land while jobs are parked.
async fn proxy_with_slow_checks(moto: &Moto, seed: u64) -> FaultProxy {
    let proxy = FaultProxy::start(&moto.url, seed).await;
    proxy.set(|f| {
        f.latency = Duration::from_millis(5);
        f.latency_jitter = Duration::from_millis(45);
        f.checks_after_start = Some(Duration::from_secs(2));
    });
    proxy
}

/// Crash: mixed jobs against moto, the daemon SIGKILLed at random moments and restarted each time.
/// Afterwards every accepted job is final, none ran twice (instances and snapshots counted in moto
/// by the job's tag) and none claims a state moto does not show.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_campaign() {
    crash(Backend::Sqlite, Ec2::Moto).await
}

/// The same on PostgreSQL (one daemon, its queue in a fresh database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_campaign_on_postgres() {
    crash(Backend::Postgres, Ec2::Moto).await
}

/// The same against EC2 as it is (issue 31): kills land while instances are in transition and
/// ids are not known everywhere yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_campaign_realistic() {
    crash(Backend::Sqlite, Ec2::Realistic).await
}

async fn crash(on: Backend, ec2: Ec2) {
    let _pg = on.share().await;
    let Some(database_url) = on.database() else {
        return;
    };
    let campaign = ec2.named(on.named("crash"));
    let per = size(10, 60);
    let kills = size(2, 5);
    let mut rng = seeded(&campaign);
    let moto = Moto::start().await;
    let image = moto.image().await;
    let proxy = proxy_with_slow_checks(&moto, rng.gen()).await;
    ec2.apply(&proxy);
    let jobs = mixed_jobs(
        &moto,
        &["run", "stop", "start", "reboot", "snapshot", "image"],
        per,
        &mut rng,
    )
    .await;
    let mut d = Daemon::start(DaemonOpts {
        database_url: database_url.clone(),
        moto_url: Some(proxy.url.clone()),
        workers: 8,
        // Five kills may interrupt one job several times; its attempts must not run out.
        env: vec![("EC2JOBD_QUEUE__MAX_ATTEMPTS".into(), "10".into())],
        ..Default::default()
    })
    .await;
    // A schedule firing every second through the whole run: each kill lands at a firing instant,
    // while its job is being queued.
    every_second(&d).await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for job in &jobs {
        ids.push(d.submit(&job.spec(&image, "crash")).await);
    }
    let total = ids.len() as f64;
    let mut kill_points = Vec::new();
    let mut parked_at_kill = Vec::new();
    let mut kill_times = Vec::new();
    for k in 0..kills {
        // A random moment in the k-th slice of the run, measured in finished jobs.
        let at = ((k as f64 + rng.gen_range(0.2..0.9)) / (kills as f64 + 1.0) * total) as u64;
        let deadline = Instant::now() + 3 * MINUTE;
        while finished(&d).await < at {
            assert!(
                Instant::now() < deadline,
                "no progress towards {at} finished jobs"
            );
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
        }
        kill_points.push(finished(&d).await);
        parked_at_kill.push(d.metric("ec2jobd_jobs_parked").await as u64);
        // At a firing instant: just after the next whole second, while the tick queues its job.
        let ms = chrono::Utc::now().timestamp_subsec_millis();
        tokio::time::sleep(Duration::from_millis(
            u64::from(1000 - ms) + rng.gen_range(0..4),
        ))
        .await;
        kill_times.push(chrono::Utc::now());
        d.kill9();
        d.spawn().await;
    }
    let mut check = Checker::new(&moto, &proxy, "crash");
    for (id, job) in ids.iter().zip(&jobs) {
        let j = d.wait_final(id, 3 * MINUTE).await;
        check.job(id, job, &j).await;
    }
    let elapsed = started.elapsed();
    let (made, deleted) = check.volumes().await;
    let (amis, deregistered) = check.images().await;
    let mut per_op = BTreeMap::<&str, usize>::new();
    for job in &jobs {
        *per_op.entry(job.mutating_op()).or_default() += 1;
    }
    let mutating: Vec<String> = per_op
        .iter()
        .map(|(op, n)| {
            format!(
                "{op} {} calls ({} instance ids) / {n}",
                proxy.calls(op),
                proxy.ids(op)
            )
        })
        .collect();
    let mut violations = check.violations.clone();
    // The schedule's firings: each at most once (one job per firing time), firing again after
    // every restart (on PostgreSQL once the killed leader's lease has run out).
    let last_kill = kill_times.last().copied();
    let deadline = Instant::now() + MINUTE;
    let fired = loop {
        let fired = schedule_firings(&d, "tick").await;
        if last_kill.is_none_or(|k| fired.iter().any(|f| *f > k)) || Instant::now() > deadline {
            break fired;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let distinct: BTreeSet<_> = fired.iter().collect();
    if distinct.len() != fired.len() {
        violations.push(format!(
            "{} firings queued {} jobs",
            distinct.len(),
            fired.len()
        ));
    }
    for k in &kill_times {
        if !fired.iter().any(|f| f > k) {
            violations.push(format!("nothing fired after the kill at {k}"));
        }
    }
    if parked_at_kill.iter().all(|n| *n == 0) {
        violations.push(format!(
            "no kill landed while jobs were parked ({parked_at_kill:?})"
        ));
    }
    report(
        &campaign,
        &[
            (
                "jobs (run/stop/start/reboot/snapshot/AMI)",
                format!("{}", ids.len()),
            ),
            (
                "SIGKILLs at finished-job counts",
                format!("{kills} at {kill_points:?}"),
            ),
            ("jobs parked at each kill", format!("{parked_at_kill:?}")),
            (
                "schedule firings (every second; kills at firing instants)",
                format!("{} jobs, {} firing times", fired.len(), distinct.len()),
            ),
            ("final states", format!("{:?}", check.states)),
            (
                "jobs that needed more than one attempt",
                check.resumed.to_string(),
            ),
            (
                "mutating calls made / jobs (calls are shared)",
                mutating.join(", "),
            ),
            (
                "snapshots made / deleted by rotation",
                format!("{made} / {deleted}"),
            ),
            (
                "AMIs made / deregistered by rotation",
                format!("{amis} / {deregistered}"),
            ),
            ("wall time", format!("{:.1} s", elapsed.as_secs_f64())),
        ],
        &violations,
    );
}

/// Graceful stop: SIGTERM while jobs wait for status checks; the daemon exits inside its grace
/// period, and after the restart the jobs finish without any mutating call repeated (counted at the
/// proxy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_campaign() {
    let n = size(3, 30);
    let moto = Moto::start().await;
    let ids = moto.launch(n as i32, &[("Grace", "yes")]).await;
    let proxy = FaultProxy::start(&moto.url, 42).await;
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        workers: n + 1,
        ..Default::default()
    })
    .await;
    proxy.set(|f| {
        f.instance_status = Some((
            "initializing".into(),
            Instant::now() + Duration::from_secs(3600),
        ))
    });
    let mut jobs = Vec::new();
    for iid in &ids {
        jobs.push(d.submit(&Job::Reboot(iid.clone()).spec("", "")).await);
    }
    for id in &jobs {
        d.wait_for(id, MINUTE, |j| j["progress"]["phase"] == "waiting")
            .await;
    }
    let started = Instant::now();
    let st = tokio::task::block_in_place(|| d.terminate(Duration::from_secs(10)));
    let exit = started.elapsed();
    let mut violations = Vec::new();
    if !st.success() {
        violations.push(format!("unclean exit: {st:?}"));
    }
    // shutdown_grace is 3 s in the harness's config; allow start-up noise on a loaded machine.
    if exit > Duration::from_secs(8) {
        violations.push(format!("exit took {exit:?}, grace is 3 s"));
    }
    d.spawn().await;
    proxy.set(|f| f.instance_status = None);
    let mut check = Checker::new(&moto, &proxy, "grace");
    for (id, iid) in jobs.iter().zip(&ids) {
        let j = d.wait_final(id, MINUTE).await;
        check.job(id, &Job::Reboot(iid.clone()), &j).await;
        if j["results"]["instances"][0]["checks"] != "2/2 checks passed" {
            violations.push(format!("job {id} finished without 2/2 checks: {j}"));
        }
    }
    // Instances rebooted, counted across calls (jobs share calls): one reboot per job.
    let reboots = proxy.ids("RebootInstances");
    if reboots != n {
        violations.push(format!("{reboots} instances rebooted for {n} jobs"));
    }
    violations.extend(check.violations.clone());
    report(
        "graceful-stop",
        &[
            ("jobs waiting for checks at SIGTERM", n.to_string()),
            (
                "exit after SIGTERM",
                format!("{:.2} s (grace 3 s)", exit.as_secs_f64()),
            ),
            ("instances rebooted / jobs", format!("{reboots} / {n}")),
            ("final states", format!("{:?}", check.states)),
        ],
        &violations,
    );
}

/// Faults: 20% throttling, 5% 503, 2% dropped connections (the call reaches moto, the answer is
/// lost) and 100–500 ms of latency on every call. Every job reaches the right state in moto, no
/// creation is repeated (a lost CreateSnapshot or CreateImage answer must not become a second
/// snapshot or AMI), and the throttles and retries show in `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_campaign() {
    fault(Backend::Sqlite, Ec2::Moto).await
}

/// The same on PostgreSQL (one daemon, its queue in a fresh database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_campaign_on_postgres() {
    fault(Backend::Postgres, Ec2::Moto).await
}

/// The same against EC2 as it is (issue 31): faults on top of transitions and eventual
/// consistency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_campaign_realistic() {
    fault(Backend::Sqlite, Ec2::Realistic).await
}

async fn fault(on: Backend, ec2: Ec2) {
    let _pg = on.share().await;
    let Some(database_url) = on.database() else {
        return;
    };
    let campaign = ec2.named(on.named("faults"));
    let per = size(8, 60);
    let mut rng = seeded(&campaign);
    let moto = Moto::start().await;
    let image = moto.image().await;
    let proxy = FaultProxy::start(&moto.url, rng.gen()).await;
    ec2.apply(&proxy);
    let jobs = mixed_jobs(
        &moto,
        &["run", "stop", "start", "reboot", "tag", "snapshot", "image"],
        per,
        &mut rng,
    )
    .await;
    let d = Daemon::start(DaemonOpts {
        database_url: database_url.clone(),
        moto_url: Some(proxy.url.clone()),
        workers: 16,
        ..Default::default()
    })
    .await;
    proxy.set(|f| {
        f.throttle = 0.20;
        f.unavailable = 0.05;
        f.drop = 0.02;
        f.drop_after_forward = true;
        f.latency = Duration::from_millis(100);
        f.latency_jitter = Duration::from_millis(400);
    });
    let started = Instant::now();
    let mut ids = Vec::new();
    for job in &jobs {
        ids.push(d.submit(&job.spec(&image, "faults")).await);
    }
    let mut check = Checker::new(&moto, &proxy, "faults");
    for (id, job) in ids.iter().zip(&jobs) {
        let j = d.wait_final(id, 5 * MINUTE).await;
        check.job(id, job, &j).await;
    }
    let elapsed = started.elapsed();
    let (made, deleted) = check.volumes().await;
    let (amis, deregistered) = check.images().await;
    let attempts = d.metric_sum("ec2jobd_ec2_attempts_total", "").await;
    let throttled = d
        .metric_sum(
            "ec2jobd_ec2_attempts_total",
            "outcome=\"RequestLimitExceeded\"",
        )
        .await;
    let unavailable = d
        .metric_sum("ec2jobd_ec2_attempts_total", "outcome=\"Unavailable\"")
        .await;
    let no_response = d
        .metric_sum("ec2jobd_ec2_attempts_total", "outcome=\"no_response\"")
        .await;
    let retries = d.metric_sum("ec2jobd_ec2_retries_total", "").await;
    let job_retries = d.metric("ec2jobd_job_retries_total").await;
    let mut violations = check.violations.clone();
    for (what, n) in [
        ("throttled attempts", throttled),
        ("503 attempts", unavailable),
        ("call retries", retries),
    ] {
        if n < 1.0 {
            violations.push(format!("/metrics shows no {what}"));
        }
    }
    report(
        &campaign,
        &[
            (
                "jobs (run/stop/start/reboot/tag/snapshot/AMI)",
                ids.len().to_string(),
            ),
            (
                "faults injected at the proxy",
                proxy.injected_total().to_string(),
            ),
            ("AWS call attempts (/metrics)", format!("{attempts}")),
            ("  throttled (RequestLimitExceeded)", format!("{throttled}")),
            ("  503 Unavailable", format!("{unavailable}")),
            ("  no response (dropped)", format!("{no_response}")),
            ("  retries of a call", format!("{retries}")),
            ("job attempts rescheduled", format!("{job_retries}")),
            (
                "snapshots made / deleted by rotation",
                format!("{made} / {deleted}"),
            ),
            (
                "AMIs made / deregistered by rotation",
                format!("{amis} / {deregistered}"),
            ),
            ("final states", format!("{:?}", check.states)),
            ("wall time", format!("{:.1} s", elapsed.as_secs_f64())),
        ],
        &violations,
    );
}

/// A small filesystem for the database: tmpfs when this process may mount one (root in a
/// container with CAP_SYS_ADMIN, as in CI), else None.
struct SmallFs {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl SmallFs {
    fn new(mib: u32) -> SmallFs {
        let dir = tempfile::tempdir().expect("tempdir");
        let mounted = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        SmallFs { dir, mounted }
    }

    /// Fills the filesystem until a write fails; returns the filler's path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.dir.path().join("filler");
        let mut f = std::fs::File::create(&path).expect("filler");
        let chunk = vec![0u8; 64 * 1024];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg(self.dir.path()).status();
        }
    }
}

/// How the disk is made full: a full tmpfs, or (without the right to mount) a file size limit
/// (`prlimit --fsize`) on the daemon process, which makes every write past it fail with EFBIG.
enum Full {
    Tmpfs(std::path::PathBuf),
    Fsize(u32),
}

impl Full {
    fn start(fs: &SmallFs, pid: u32) -> Full {
        if fs.mounted && std::env::var("CAMPAIGN_STORAGE").as_deref() != Ok("fsize") {
            Full::Tmpfs(fs.fill())
        } else {
            let st = Command::new("prlimit")
                .args(["--pid", &pid.to_string(), "--fsize=4096:unlimited"])
                .status()
                .expect("prlimit (util-linux)");
            assert!(st.success(), "prlimit --fsize failed");
            Full::Fsize(pid)
        }
    }

    /// The daemon's log lives on another filesystem, unless a file size limit stops all its files.
    fn log_writable(&self) -> bool {
        matches!(self, Full::Tmpfs(_))
    }

    fn name(&self) -> &'static str {
        match self {
            Full::Tmpfs(_) => "tmpfs filled to the last byte",
            Full::Fsize(_) => "file size limit (prlimit --fsize=4096)",
        }
    }

    fn end(&self) {
        match self {
            Full::Tmpfs(filler) => std::fs::remove_file(filler).expect("remove filler"),
            Full::Fsize(pid) => {
                let st = Command::new("prlimit")
                    .args(["--pid", &pid.to_string(), "--fsize=unlimited:unlimited"])
                    .status()
                    .expect("prlimit");
                assert!(st.success());
            }
        }
    }
}

/// Storage faults: the database's disk fills up while jobs are submitted. Submissions answer 503
/// with a problem document and nothing is stored; the daemon stays up and keeps answering reads;
/// when the space returns, submissions are accepted again and every accepted job completes. The
/// database passes SQLite's integrity check afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_fault_campaign() {
    let moto = Moto::start().await;
    let iid = moto.launch(1, &[("Disk", "full")]).await.remove(0);
    // CreateTags answers after 2 s, so the first jobs are mid-call when the disk fills and must
    // record their outcome after it is back.
    let proxy = FaultProxy::start(&moto.url, 1).await;
    proxy.set(|f| {
        f.latency = Duration::from_secs(2);
        f.only = Some(vec!["CreateTags".into()]);
    });
    let fs = SmallFs::new(16);
    let db = fs.dir.path().join("ec2jobd.db");
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        database: Some(db.clone()),
        workers: 5,
        ..Default::default()
    })
    .await;
    let spec = Job::Tag(iid.clone()).spec("", "storage");
    let mut accepted = Vec::new();
    for _ in 0..5 {
        accepted.push(d.submit(&spec).await);
    }
    for id in &accepted {
        d.wait_for(id, MINUTE, |j| j["progress"]["phase"] == "calling")
            .await;
    }
    let full = Full::start(&fs, d.pid());
    let mut mid_call = 0;
    for id in &accepted {
        mid_call += usize::from(d.job(id).await["state"] == "running");
    }
    let mut violations = Vec::new();
    // SQLite may still find room in pages it already has; keep submitting until a write needs more.
    let (mut refused, mut first_refusal) = (0u32, None);
    for n in 0..5000 {
        let r = d.post_job(&d.admin, &spec).await;
        match r.status().as_u16() {
            202 => {
                let v: Value = r.json().await.expect("json");
                accepted.push(v["id"].as_str().expect("id").to_string());
            }
            503 => {
                let retry = r.headers().get("retry-after").cloned();
                let ctype = r.headers().get("content-type").cloned();
                let p: Value = r.json().await.unwrap_or(Value::Null);
                if p["code"] != "store_unavailable" || retry.is_none() {
                    violations.push(format!("503 without a problem document: {p} {retry:?}"));
                }
                if ctype.is_none_or(|c| c != "application/problem+json") {
                    violations.push("503 not application/problem+json".into());
                }
                refused += 1;
                first_refusal.get_or_insert(n);
                if refused >= 20 {
                    break;
                }
            }
            s => violations.push(format!("submission answered {s} while the disk was full")),
        }
    }
    if refused == 0 {
        violations.push("no submission was refused while the disk was full".into());
    }
    let health = d.get_json("/healthz").await.0;
    let ready = d.get_json("/readyz").await.0;
    let read = d.get_json(&format!("/v1/jobs/{}", accepted[0])).await.0;
    if health != 200 || read != 200 {
        violations.push(format!("while full: /healthz {health}, GET job {read}"));
    }
    if ready != 503 {
        violations.push(format!("while full: /readyz answered {ready}, want 503"));
    }
    if !d.alive() {
        violations.push("the daemon died on a full disk".into());
    }
    // Hold the disk full until the jobs that were mid-call have their answers (their calls may be
    // shared), and (where the log can still be written) have failed to save what followed: the
    // outcome (a worker's call) or the record of the call (the parking lot's shared call).
    let unsaved_count = |log: &str| {
        ["could not save the outcome", "could not record a call"]
            .iter()
            .map(|m| log.matches(m).count())
            .sum::<usize>()
    };
    let deadline = Instant::now() + MINUTE;
    while proxy.calls("CreateTags") == 0
        || proxy.answered("CreateTags") < proxy.calls("CreateTags")
        || (full.log_writable() && unsaved_count(&d.log()) < mid_call)
    {
        assert!(
            Instant::now() < deadline,
            "mid-call jobs never tried to save"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let unsaved = unsaved_count(&d.log());
    if !d.alive() {
        violations.push("the daemon died when its workers could not save".into());
    }
    let how = full.name();
    full.end();
    // Space is back: submissions are taken again within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(20);
    let recovered_after = Instant::now();
    loop {
        let r = d.post_job(&d.admin, &spec).await;
        if r.status() == 202 {
            let v: Value = r.json().await.expect("json");
            accepted.push(v["id"].as_str().expect("id").to_string());
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {}", r.status());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let recovery = recovered_after.elapsed();
    let states = all_succeeded(&d, &accepted, 2 * MINUTE, &mut violations).await;
    let (_, page) = d.get_json("/v1/jobs?limit=500").await;
    let stored = page["jobs"].as_array().map_or(0, |a| a.len());
    if stored != accepted.len() {
        violations.push(format!(
            "{stored} jobs stored, {} accepted: refused submissions must leave nothing",
            accepted.len()
        ));
    }
    let st = tokio::task::block_in_place(|| d.terminate(Duration::from_secs(10)));
    if !st.success() {
        violations.push(format!("unclean exit after the campaign: {st:?}"));
    }
    let integrity: String = rusqlite::Connection::open(&db)
        .and_then(|c| c.query_row("PRAGMA integrity_check", [], |r| r.get(0)))
        .unwrap_or_else(|e| e.to_string());
    if integrity != "ok" {
        violations.push(format!("integrity_check: {integrity}"));
    }
    report(
        "storage",
        &[
            ("disk made full by", how.to_string()),
            ("jobs mid-call when the disk filled", mid_call.to_string()),
            (
                "outcomes that could not be saved (re-run)",
                if full.log_writable() {
                    unsaved.to_string()
                } else {
                    "(log not writable)".into()
                },
            ),
            (
                "accepted before the first 503",
                format!("{}", first_refusal.unwrap_or(0) + 5),
            ),
            (
                "503 answers (problem+json, Retry-After)",
                refused.to_string(),
            ),
            (
                "while full: /healthz, /readyz, GET job",
                format!("{health}, {ready}, {read}"),
            ),
            (
                "first 202 after space returned",
                format!("{:.2} s", recovery.as_secs_f64()),
            ),
            (
                "accepted / stored / final states",
                format!("{} / {stored} / {states:?}", accepted.len()),
            ),
            ("integrity_check", integrity),
        ],
        &violations,
    );
}

/// Overload: ten times more concurrent submitters than workers, for 10 s (60 s long form). Every
/// answer is 202 or an explicit 429 with Retry-After (no errors, no 5xx, no dropped connections),
/// the daemon's memory stays bounded, and every accepted job completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_campaign() {
    overload(Backend::Sqlite).await
}

/// The same on PostgreSQL (one daemon, its queue in a fresh database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_campaign_on_postgres() {
    overload(Backend::Postgres).await
}

async fn overload(on: Backend) {
    let _pg = on.share().await;
    let Some(database_url) = on.database() else {
        return;
    };
    let campaign = on.named("overload");
    let secs = size(10, 60) as u64;
    let workers = 4;
    let clients = workers * 10;
    let max_queued = 200;
    let moto = Moto::start().await;
    let iid = moto.launch(1, &[("Load", "yes")]).await.remove(0);
    let d = Arc::new(
        Daemon::start(DaemonOpts {
            database_url: database_url.clone(),
            moto_url: Some(moto.url.clone()),
            workers,
            env: vec![("EC2JOBD_QUEUE__MAX_QUEUED".into(), max_queued.to_string())],
            ..Default::default()
        })
        .await,
    );
    let rss_idle = d.rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, full, bad) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(Mutex::new(Vec::<String>::new())),
    );
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (d, stop, ok, full, bad, accepted) = (
            d.clone(),
            stop.clone(),
            ok.clone(),
            full.clone(),
            bad.clone(),
            accepted.clone(),
        );
        let spec = if c % 2 == 0 {
            json!({"action": "describe_instances", "targets": {"instance_ids": [iid]}})
        } else {
            Job::Tag(iid.clone()).spec("", "overload")
        };
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .post(format!("{}/v1/jobs", d.url))
                    .bearer_auth(&d.admin)
                    .json(&spec)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status() == 202 => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        let v: Value = r.json().await.unwrap_or(Value::Null);
                        let id = v["id"].as_str().unwrap_or("").to_string();
                        accepted.lock().unwrap().push(id);
                    }
                    Ok(r) if r.status() == 429 => {
                        full.fetch_add(1, Ordering::Relaxed);
                        if r.headers().get("retry-after").is_none() {
                            bad.lock().unwrap().push("429 without Retry-After".into());
                        }
                    }
                    Ok(r) => bad.lock().unwrap().push(format!("answered {}", r.status())),
                    Err(e) => {
                        let mut why = format!("request error: {e}");
                        let mut src = std::error::Error::source(&e);
                        while let Some(c) = src {
                            why += &format!(": {c}");
                            src = c.source();
                        }
                        bad.lock().unwrap().push(why)
                    }
                }
            }
        }));
    }
    let mut rss_max = 0;
    let mut depth_max = 0.0f64;
    while started.elapsed() < Duration::from_secs(secs) {
        rss_max = rss_max.max(d.rss_kib());
        depth_max = depth_max.max(d.metric("ec2jobd_queue_depth").await);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("client task");
    }
    let load_secs = started.elapsed().as_secs_f64();
    let rss_end_of_load = d.rss_kib();
    let ids = accepted.lock().unwrap().clone();
    let drain = Instant::now();
    let mut violations: Vec<String> = bad.lock().unwrap().iter().take(20).cloned().collect();
    let states = all_succeeded(&d, &ids, 5 * MINUTE, &mut violations).await;
    // A connection closed mid-answer is how a handler panic looks from outside: name any.
    violations.extend(
        d.log()
            .lines()
            .filter(|l| l.contains("panicked") || l.contains("ERROR"))
            .take(10)
            .map(|l| format!("daemon log: {l}")),
    );
    let drain = drain.elapsed();
    let fenced = d
        .metric_sum("ec2jobd_job_duration_seconds_count", "outcome=\"fenced\"")
        .await as u64;
    let (ok, full) = (ok.load(Ordering::Relaxed), full.load(Ordering::Relaxed));
    if full == 0 {
        violations.push("no 429: the queue limit was never reached".into());
    }
    // Each submitter may pass admission at once; and a running job whose lease ran out (its
    // attempt paused by its fence while the database was slow) goes back to the queue without
    // admission, at most one per worker.
    if depth_max > (max_queued + clients as u64 + workers as u64) as f64 {
        violations.push(format!(
            "queue depth reached {depth_max}, limit {max_queued}"
        ));
    }
    // Bounded: the queue is capped, so memory must not grow with the submissions refused.
    let bound = 512 * 1024;
    if rss_max > bound {
        violations.push(format!("RSS reached {rss_max} KiB (bound {bound} KiB)"));
    }
    report(
        &campaign,
        &[
            (
                "workers / concurrent submitters",
                format!("{workers} / {clients}"),
            ),
            ("load", format!("{load_secs:.1} s")),
            (
                "202 accepted",
                format!("{ok} ({:.0}/s)", ok as f64 / load_secs),
            ),
            (
                "429 with Retry-After",
                format!("{full} ({:.0}/s)", full as f64 / load_secs),
            ),
            (
                "other answers and request errors",
                bad.lock().unwrap().len().to_string(),
            ),
            (
                "queue depth max (limit)",
                format!("{depth_max} ({max_queued})"),
            ),
            (
                "RSS idle / max under load / end of load",
                format!(
                    "{} / {} / {} MiB",
                    rss_idle / 1024,
                    rss_max / 1024,
                    rss_end_of_load / 1024
                ),
            ),
            (
                "accepted jobs drained in",
                format!("{:.1} s", drain.as_secs_f64()),
            ),
            ("final states", format!("{states:?}")),
            (
                "attempts stopped by their fence (lease not renewed in time)",
                fenced.to_string(),
            ),
        ],
        &violations,
    );
}

/// Bad input: schemathesis generates requests from `/openapi.json` (valid, boundary and invalid
/// ones, plus stateful sequences) with an admin token. Every answer must be a non-5xx whose status,
/// content type, headers and body match the document. The fuzz targets for job-spec parsing and the
/// SNS verifier are property tests in the spec and server crates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_campaign() {
    let examples = size(25, 500);
    let st = std::env::var("SCHEMATHESIS").unwrap_or_else(|_| "schemathesis".into());
    // No worker runs what it accepts: this is about the HTTP surface, not EC2.
    let d = Daemon::start(DaemonOpts {
        workers: 0,
        ..Default::default()
    })
    .await;
    let seed: u64 = seeded("bad-input").gen_range(1..u64::from(u32::MAX));
    let started = Instant::now();
    let out = tokio::task::block_in_place(|| {
        Command::new(&st)
            // Its cache of found failures goes to the daemon's temporary directory.
            .current_dir(&d.dir)
            .args(["run", &format!("{}/openapi.json", d.url)])
            .args(["-H", &format!("Authorization: Bearer {}", d.admin)])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance",
            ])
            .args(["--max-examples", &examples.to_string()])
            .args(["--seed", &seed.to_string()])
            .args(["--request-timeout", "30", "--no-color"])
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run `{st}` ({e}): run scripts/test, which installs schemathesis (scripts/ensure-schemathesis)")
            })
    });
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let line = |prefix: &str| {
        text.lines()
            .skip_while(|l| !l.trim_start().starts_with(prefix))
            .nth(1)
            .unwrap_or("?")
            .trim()
            .to_string()
    };
    let mut violations = Vec::new();
    if !out.status.success() {
        violations.push(format!(
            "schemathesis failed ({}):\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    if d.get_json("/healthz").await.0 != 200 {
        violations.push("the daemon stopped answering".into());
    }
    report(
        "bad-input",
        &[
            ("operations", line("API Operations:")),
            ("test cases", line("Test cases:")),
            (
                "max examples per operation (seed)",
                format!("{examples} ({seed})"),
            ),
            (
                "wall time",
                format!("{:.1} s", started.elapsed().as_secs_f64()),
            ),
        ],
        &violations,
    );
}

/// Counts answers by class and keeps the first few surprises, for the hostile campaign.
#[derive(Default)]
struct Tally {
    answers: BTreeMap<String, u64>,
    bad: Vec<String>,
}

impl Tally {
    fn saw(&mut self, what: &str, status: u16, ok: &[u16]) {
        *self.answers.entry(format!("{what} {status}")).or_default() += 1;
        if !ok.contains(&status) && self.bad.len() < 20 {
            self.bad
                .push(format!("{what}: answered {status}, expected one of {ok:?}"));
        }
    }
}

/// Hostile input (issue 12): against one daemon at once, nested template values, 60 KB SNS fields
/// as fast as the clients can send them, idle and slowloris connections, repeated and odd `wait`
/// parameters, certificate URLs with host tricks, oversized and deeply nested JSON, and SSE floods,
/// while a steady stream of real jobs runs. Holds: the daemon stays up, RSS under a bound, `/healthz`
/// within 100 ms throughout, every real job succeeds, the database grows by less than a bound, and
/// no submission is answered 5xx (a 5xx after storing would make a retrying client submit twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_campaign() {
    let secs = size(8, 60) as u64;
    let (idle_n, slow_n) = (size(100, 500), size(30, 100));
    let moto = Moto::start().await;
    let iid = moto.launch(1, &[("Hostile", "yes")]).await.remove(0);
    let topic = "arn:aws:sns:us-east-1:123456789012:alarms";
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(moto.url.clone()),
        workers: 4,
        extra: format!(
            "[http]\nheader_read_timeout = \"2s\"\nidle_timeout = \"20s\"\nmax_streams_per_token = 20\n\n\
             [sns.hooks.alarms]\ntopics = [\"{topic}\"]\n"
        ),
        ..Default::default()
    })
    .await;
    let db = d.dir.join("ec2jobd.db");
    let db_bytes = || {
        let conn = rusqlite::Connection::open(&db).expect("open the daemon's database");
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
        std::fs::metadata(&db).expect("database").len()
    };
    let db_start = db_bytes();
    let rss_idle = d.rss_kib();
    let addr = d.url.trim_start_matches("http://").to_string();
    let (url, admin) = (d.url.clone(), d.admin.clone());
    let http = reqwest::Client::new();
    let put = http
        .put(format!("{url}/v1/templates/nested"))
        .bearer_auth(&admin)
        .json(&json!({
            "spec": {"action": "create_tags", "targets": {"instance_ids": [iid]},
                     "params": {"tags": {"A": "${a}", "B": "${b}", "C": "${c}"}}},
            "parameters": {"a": {"type": "string"}, "b": {"type": "string"}, "c": {"type": "string"}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 201);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    // Loops `f` until the campaign ends.
    macro_rules! attack {
        ($name:expr, $f:expr) => {{
            let (stop, tally, http, url, admin) = (
                stop.clone(),
                tally.clone(),
                http.clone(),
                url.clone(),
                admin.clone(),
            );
            let f = $f;
            tasks.push(tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let (status, ok): (u16, &[u16]) = f(&http, &url, &admin, n).await;
                    tally.lock().unwrap().saw($name, status, ok);
                    n += 1;
                }
            }));
        }};
    }
    async fn send(r: reqwest::RequestBuilder) -> u16 {
        match r.send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                let _ = r.bytes().await;
                s
            }
            Err(e) => {
                let mut why = format!("{e}");
                let mut src = std::error::Error::source(&e);
                while let Some(c) = src {
                    why += &format!(": {c}");
                    src = c.source();
                }
                eprintln!("request error: {why}");
                0
            }
        }
    }
    let huge = "A".repeat(40_000);
    // 60 KB of caller-supplied SNS fields, unauthenticated, as fast as they go (two senders).
    for _ in 0..2 {
        let huge = huge.clone();
        attack!(
            "sns 60 KB fields",
            move |h: &reqwest::Client, u: &String, _: &String, n: u64| {
                let body = json!({"Type": "Notification", "MessageId": format!("{n}-{}", &huge[..15_000]),
                "TopicArn": format!("arn:aws:sns:us-east-1:123456789012:{huge}"), "Message": "x\ninjected",
                "Timestamp": "2026-12-02T00:00:00.000Z", "SignatureVersion": "1", "Signature": "AAAA",
                "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0a.pem"});
                let r = h.post(format!("{u}/v1/sns/alarms")).body(body.to_string());
                async move { (send(r).await, &[403u16][..]) }
            }
        );
    }
    // Certificate URLs with host tricks, on the accepted topic: refused before any fetch.
    let tricks = [
        "https://sns.s3.amazonaws.com/SimpleNotificationService-0a.pem",
        "https://sns.s3-external-1.amazonaws.com/SimpleNotificationService-0a.pem",
        "https://sns.us-east-1.amazonaws.com.evil.com/SimpleNotificationService-0a.pem",
        "https://sns.us-east-1.amazonaws.com@evil.com/SimpleNotificationService-0a.pem",
        "https://sns.us-east-1.amazonaws.com:8443/SimpleNotificationService-0a.pem",
        "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0a.pem?x=1",
        "https://sns.us-east-1.amazonaws.com/%2e%2e/SimpleNotificationService-0a.pem",
        "http://sns.us-east-1.amazonaws.com/SimpleNotificationService-0a.pem",
    ];
    attack!(
        "cert url tricks",
        move |h: &reqwest::Client, u: &String, _: &String, n: u64| {
            let body = json!({"Type": "Notification", "MessageId": format!("m-{n}"), "TopicArn": topic,
            "Message": "{}", "Timestamp": chrono::Utc::now().to_rfc3339(), "SignatureVersion": "2",
            "Signature": "AAAA", "SigningCertURL": tricks[n as usize % tricks.len()]});
            let r = h.post(format!("{u}/v1/sns/alarms")).body(body.to_string());
            async move { (send(r).await, &[403u16][..]) }
        }
    );
    // Nested template values: one pass, refused as too large or invalid, never expanded.
    let nested = json!({"parameters": {"a": "${b}".repeat(2000), "b": "${c}".repeat(2000),
        "c": "x".repeat(20_000)}});
    attack!(
        "nested template values",
        move |h: &reqwest::Client, u: &String, a: &String, _n: u64| {
            let r = h
                .post(format!("{u}/v1/templates/nested/run"))
                .bearer_auth(a)
                .json(&nested);
            async move { (send(r).await, &[422u16][..]) }
        }
    );
    // Repeated and odd `wait` parameters; oversized and deeply nested bodies.
    let odd = [
        "?wait=1s&wait=2s",
        "?wait=abc",
        "?wait=99999h",
        "?wait=%ff",
        "?wait=",
        "?x=1&wait=1s",
    ];
    attack!(
        "odd wait / bad bodies",
        move |h: &reqwest::Client, u: &String, a: &String, n: u64| {
            let r = match n % 3 {
            0 => h
                .post(format!("{u}/v1/jobs{}", odd[n as usize % odd.len()]))
                .bearer_auth(a)
                .json(&json!({"action": "describe_instances", "targets": {"instance_ids": ["i-0123456789abcdef0"]}})),
            1 => h
                .post(format!("{u}/v1/jobs"))
                .bearer_auth(a)
                .header("content-type", "application/json")
                .body(format!("{}{}", "[".repeat(20_000), "]".repeat(20_000))),
            _ => h
                .post(format!("{u}/v1/jobs"))
                .bearer_auth(a)
                .header("content-type", "application/json")
                .body(format!("{{\"action\": \"{}\"}}", "x".repeat(100_000))),
        };
            async move { (send(r).await, &[400u16, 413, 422][..]) }
        }
    );
    // The real work: a steady stream of jobs, each checked at the end.
    let accepted = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let (stop, tally, http, url, admin, accepted, iid) = (
            stop.clone(),
            tally.clone(),
            http.clone(),
            url.clone(),
            admin.clone(),
            accepted.clone(),
            iid.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let spec = if n % 2 == 0 {
                    json!({"action": "describe_instances", "targets": {"instance_ids": [iid]}})
                } else {
                    json!({"action": "create_tags", "targets": {"instance_ids": [iid]},
                        "params": {"tags": {"Hostile": format!("n{n}")}}})
                };
                match http
                    .post(format!("{url}/v1/jobs"))
                    .bearer_auth(&admin)
                    .json(&spec)
                    .send()
                    .await
                {
                    Ok(r) => {
                        let s = r.status().as_u16();
                        tally.lock().unwrap().saw("real jobs", s, &[202]);
                        if s == 202 {
                            let v: Value = r.json().await.unwrap_or(Value::Null);
                            accepted
                                .lock()
                                .unwrap()
                                .push(v["id"].as_str().unwrap_or("").into());
                        }
                    }
                    Err(e) => tally.lock().unwrap().bad.push(format!("real job: {e}")),
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }));
    }
    // Idle connections and slowloris heads (a byte every 500 ms), held for the whole campaign.
    let mut held = Vec::new();
    for _ in 0..idle_n {
        if let Ok(s) = tokio::net::TcpStream::connect(&addr).await {
            held.push(s);
        }
    }
    for _ in 0..slow_n {
        let (addr, stop) = (addr.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while !stop.load(Ordering::Relaxed) {
                let Ok(mut s) = tokio::net::TcpStream::connect(&addr).await else {
                    return;
                };
                let _ = s.write_all(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\n").await;
                for b in b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
                    if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }));
    }
    // SSE floods on a job: beyond the token's share, 429; streams opened and dropped.
    let sse_job = accepted_first(&http, &url, &admin, &iid).await;
    attack!("sse flood", move |h: &reqwest::Client,
                               u: &String,
                               a: &String,
                               _n: u64| {
        let r = h
            .get(format!("{u}/v1/jobs/{sse_job}/events"))
            .bearer_auth(a);
        async move {
            match tokio::time::timeout(Duration::from_millis(300), r.send()).await {
                Ok(Ok(r)) => (r.status().as_u16(), &[200u16, 429][..]),
                Ok(Err(_)) => (0, &[200u16, 429][..]),
                Err(_) => (200, &[200u16, 429][..]),
            }
        }
    });

    // Meanwhile: /healthz latency, RSS and liveness, sampled.
    let (mut health_max, mut health_n, mut health_slow) = (Duration::ZERO, 0u64, 0u64);
    let mut rss_max = 0;
    let mut violations = Vec::new();
    let probe = reqwest::Client::new();
    while started.elapsed() < Duration::from_secs(secs) {
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            probe.get(format!("{url}/healthz")).send(),
        )
        .await;
        let took = t.elapsed();
        if !matches!(&r, Ok(Ok(r)) if r.status() == 200) {
            violations.push(format!("/healthz failed after {took:?}"));
        }
        health_n += 1;
        health_max = health_max.max(took);
        if took > Duration::from_millis(100) {
            health_slow += 1;
        }
        rss_max = rss_max.max(d.rss_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    drop(held);
    if !d.alive() {
        violations.push("the daemon died".into());
    }
    if health_slow > 0 {
        violations.push(format!(
            "/healthz took over 100 ms {health_slow} of {health_n} times (max {health_max:?})"
        ));
    }
    let ids = accepted.lock().unwrap().clone();
    let states = all_succeeded(&d, &ids, 5 * MINUTE, &mut violations).await;
    let grown = db_bytes().saturating_sub(db_start);
    let db_bound = 8 * 1024 * 1024;
    if grown > db_bound {
        violations.push(format!("database grew by {grown} bytes (bound {db_bound})"));
    }
    let rss_bound = 256 * 1024;
    if rss_max > rss_bound {
        violations.push(format!("RSS reached {rss_max} KiB (bound {rss_bound} KiB)"));
    }
    let t = tally.lock().unwrap();
    violations.extend(t.bad.iter().cloned());
    violations.extend(
        d.log()
            .lines()
            .filter(|l| l.contains("panicked") || l.starts_with("injected"))
            .take(10)
            .map(|l| format!("daemon log: {l}")),
    );
    let mut rows: Vec<(&str, String)> = vec![
        ("load", format!("{:.1} s", started.elapsed().as_secs_f64())),
        (
            "idle / slowloris connections",
            format!("{idle_n} / {slow_n}"),
        ),
        (
            "/healthz probes, max latency",
            format!("{health_n}, {health_max:?}"),
        ),
        (
            "RSS idle / max",
            format!("{} / {} MiB", rss_idle / 1024, rss_max / 1024),
        ),
        ("database growth", format!("{} KiB", grown / 1024)),
        ("real jobs", format!("{} {states:?}", ids.len())),
    ];
    let answers: Vec<String> = t.answers.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    let answers = answers.join(", ");
    rows.push(("answers", answers));
    report("hostile", &rows, &violations);
}

/// The job ids a restored database file holds, after SQLite's integrity check passed on it.
fn restored_ids(db: &std::path::Path) -> Result<BTreeSet<String>, String> {
    let conn = rusqlite::Connection::open(db).map_err(|e| e.to_string())?;
    let verdict: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    if verdict != "ok" {
        return Err(format!("integrity_check: {verdict}"));
    }
    let mut q = conn
        .prepare("SELECT id FROM jobs")
        .map_err(|e| e.to_string())?;
    let ids = q
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(|e| e.to_string())?
        .collect::<Result<BTreeSet<_>, _>>()
        .map_err(|e| e.to_string())?;
    Ok(ids)
}

/// `ec2jobd CMD --config CONFIG FLAG FILE` (`backup --to`, `restore --from`) off the async
/// runtime; returns (success, stderr).
async fn cli(cmd: &str, config: &str, flag: &str, file: &std::path::Path) -> (bool, String) {
    let args = [cmd, "--config", config, flag].map(String::from);
    let file = file.display().to_string();
    tokio::task::spawn_blocking(move || {
        let (st, _, err) = common::run_cli(&[&args[0], &args[1], &args[2], &args[3], &file]);
        (st.success(), err)
    })
    .await
    .expect("cli")
}

/// Restore drill (issue 33): a write storm (mixed jobs submitted one after another while earlier
/// ones run and wait) with the daemon's own backups every second (`[backup]`, keep 3) and backups
/// by hand (`ec2jobd backup`) in between. Each hand backup is restored into a scratch database:
/// SQLite's integrity check passes and every job acknowledged before the backup began is there.
/// A restore onto the serving daemon's database is refused. Then the disaster: the daemon is
/// SIGKILLed, its database restored from the last hand backup (taken while jobs were unfinished)
/// and the daemon started on it: every job the backup holds ends succeeded with no side effect
/// made twice (counted at the proxy and in moto); the jobs acknowledged after the backup are the
/// loss a restore means (printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_drill_campaign() {
    let campaign = "restore drill";
    let per = size(4, 20);
    let drills = size(3, 10);
    let mut rng = seeded(campaign);
    let moto = Moto::start().await;
    let image = moto.image().await;
    let proxy = proxy_with_slow_checks(&moto, rng.gen()).await;
    let mut jobs = mixed_jobs(&moto, &["run", "stop", "start", "tag"], per, &mut rng).await;
    // One snapshot job per volume: a generation rotated away after the backup by a later job of
    // its group would take with it the only sign that a restored job already made it (a known gap,
    // README "Backups and restore").
    let volumes = moto.launch(per as i32, &[("Campaign", "yes")]).await;
    jobs.extend(volumes.into_iter().map(Job::Snapshot));
    jobs.shuffle(&mut rng);
    let keep = tempfile::tempdir().expect("tempdir");
    let periodic = keep.path().join("periodic");
    let mut d = Daemon::start(DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        workers: 4,
        env: vec![("EC2JOBD_QUEUE__MAX_ATTEMPTS".into(), "10".into())],
        extra: format!(
            "\n[backup]\ninterval = \"1s\"\ndir = \"{}\"\nkeep = 3\n",
            periodic.display()
        ),
        ..Default::default()
    })
    .await;
    let config = d.config.display().to_string();
    let started = Instant::now();
    // The storm: one submission after another (random pauses), each id kept once acknowledged.
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let slowest_submit = Arc::new(Mutex::new(Duration::ZERO));
    let storm = tokio::spawn({
        let (http, url, admin) = (d.http.clone(), d.url.clone(), d.admin.clone());
        let specs: Vec<Value> = jobs.iter().map(|j| j.spec(&image, "drill")).collect();
        let (acked, slowest) = (acked.clone(), slowest_submit.clone());
        let pauses: Vec<u64> = specs.iter().map(|_| rng.gen_range(0..120)).collect();
        async move {
            for (spec, pause) in specs.iter().zip(pauses) {
                let t = Instant::now();
                let r = http
                    .post(format!("{url}/v1/jobs"))
                    .bearer_auth(&admin)
                    .json(spec)
                    .send()
                    .await
                    .expect("submit");
                assert_eq!(r.status(), 202);
                let v: Value = r.json().await.expect("job");
                let took = t.elapsed();
                {
                    let mut s = slowest.lock().unwrap();
                    *s = (*s).max(took);
                }
                acked
                    .lock()
                    .unwrap()
                    .push(v["id"].as_str().unwrap_or("").to_string());
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
    });
    let mut violations = Vec::new();
    let mut drilled = Vec::new();
    let mut unfinished_in_backups = Vec::new();
    for k in 0..drills {
        // The k-th slice of the storm, counted in acknowledged jobs.
        let at = (k + 1) * jobs.len() / (drills + 1);
        let deadline = Instant::now() + MINUTE;
        while acked.lock().unwrap().len() < at {
            assert!(
                Instant::now() < deadline,
                "the storm stalled before {at} jobs"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let before: Vec<String> = acked.lock().unwrap().clone();
        let path = keep.path().join(format!("drill-{k}.db"));
        let (ok, err) = cli("backup", &config, "--to", &path).await;
        if !ok {
            violations.push(format!("backup {k} failed: {err}"));
            continue;
        }
        // Restored into a scratch database of its own, through the CLI.
        let scratch = keep.path().join(format!("scratch-{k}"));
        std::fs::create_dir_all(&scratch).unwrap();
        let scratch_db = scratch.join("ec2jobd.db");
        let scratch_cfg = scratch.join("ec2jobd.toml");
        std::fs::write(
            &scratch_cfg,
            std::fs::read_to_string(&d.config).unwrap().replace(
                &d.dir.join("ec2jobd.db").display().to_string(),
                &scratch_db.display().to_string(),
            ),
        )
        .unwrap();
        let (ok, err) = cli(
            "restore",
            &scratch_cfg.display().to_string(),
            "--from",
            &path,
        )
        .await;
        if !ok {
            violations.push(format!("restore of backup {k} failed: {err}"));
            continue;
        }
        match restored_ids(&scratch_db) {
            Ok(ids) => {
                let missing = before.iter().filter(|id| !ids.contains(*id)).count();
                if missing > 0 {
                    violations.push(format!(
                        "backup {k} lacks {missing} of the {} jobs acknowledged before it",
                        before.len()
                    ));
                }
                let conn = rusqlite::Connection::open(&scratch_db).unwrap();
                let open: i64 = conn
                    .query_row(
                        "SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                unfinished_in_backups.push(open);
            }
            Err(e) => violations.push(format!("backup {k} restored badly: {e}")),
        }
        drilled.push((path, before));
    }
    storm.await.expect("storm");
    // A restore onto the database the daemon serves is refused, and the daemon goes on.
    let (ok, err) = cli(
        "restore",
        &config,
        "--from",
        &keep.path().join("drill-0.db"),
    )
    .await;
    if ok || !err.contains("open") {
        violations.push(format!(
            "a restore under the running daemon was not refused: {err}"
        ));
    }
    // The daemon's own backups: at least four taken, the newest three kept, each whole.
    let deadline = Instant::now() + MINUTE;
    while d.metric("ec2jobd_backups_total{outcome=\"ok\"}").await < 4.0 {
        assert!(
            Instant::now() < deadline,
            "periodic backups did not run\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let periodic_ok = d.metric("ec2jobd_backups_total{outcome=\"ok\"}").await;
    let kept: Vec<std::path::PathBuf> = std::fs::read_dir(&periodic)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    if kept.len() != 3 {
        violations.push(format!("[backup] keep = 3 left {kept:?}"));
    }
    for p in &kept {
        if let Err(e) = ec2jobd_store::check_backup(p).await {
            violations.push(format!("periodic backup {}: {e}", p.display()));
        }
    }
    // The disaster: the daemon dies; its database is restored from the last hand backup.
    let (chosen, held) = drilled.last().cloned().expect("a backup");
    let all: Vec<String> = acked.lock().unwrap().clone();
    d.kill9();
    let (ok, err) = cli("restore", &config, "--from", &chosen).await;
    assert!(ok, "restore after the daemon died: {err}");
    d.spawn().await;
    let mut check = Checker::new(&moto, &proxy, "drill");
    for (id, job) in all.iter().zip(&jobs) {
        if held.contains(id) {
            let j = d.wait_final(id, 3 * MINUTE).await;
            check.job(id, job, &j).await;
        }
    }
    let mut lost = 0;
    for id in all.iter().filter(|id| !held.contains(*id)) {
        let (st, _) = d.get_json(&format!("/v1/jobs/{id}")).await;
        if st == 404 {
            lost += 1;
        }
    }
    violations.extend(check.violations.clone());
    if unfinished_in_backups.last().is_none_or(|n| *n == 0) {
        violations.push(format!(
            "the restored backup held no unfinished job ({unfinished_in_backups:?}): nothing was resumed"
        ));
    }
    report(
        campaign,
        &[
            ("jobs (run/stop/start/snapshot/tag)", jobs.len().to_string()),
            (
                "hand backups restored and checked",
                format!("{} of {drills}", drilled.len()),
            ),
            (
                "unfinished jobs in each hand backup",
                format!("{unfinished_in_backups:?}"),
            ),
            (
                "periodic backups (ok) / kept",
                format!("{periodic_ok} / {}", kept.len()),
            ),
            (
                "slowest submission during backups",
                format!(
                    "{:.1} ms",
                    slowest_submit.lock().unwrap().as_secs_f64() * 1e3
                ),
            ),
            (
                "jobs in the restored backup / after it (lost)",
                format!("{} / {lost}", held.len()),
            ),
            (
                "final states (restored jobs)",
                format!("{:?}", check.states),
            ),
            (
                "restored jobs that needed more than one attempt",
                check.resumed.to_string(),
            ),
            (
                "wall time",
                format!("{:.1} s", started.elapsed().as_secs_f64()),
            ),
        ],
        &violations,
    );
}

/// Start jobs for `ids` (stopped instances whose status checks the proxy keeps `initializing`)
/// submitted to `d`, once all of them are parked there: their ids.
async fn parked_starts(d: &Daemon, ids: &[String]) -> Vec<String> {
    let mut jobs = Vec::new();
    for i in ids {
        jobs.push(
            d.submit(
                &json!({"action": "start_instances", "targets": {"instance_ids": [i]},
                "wait": {"interval": "200ms", "timeout": "5m"}}),
            )
            .await,
        );
    }
    let deadline = Instant::now() + MINUTE;
    while d.metric("ec2jobd_jobs_parked").await < ids.len() as f64 {
        assert!(
            Instant::now() < deadline,
            "the waits were never parked\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    jobs
}

/// Leases and the leader's lease of 6 s, renewed every second, swept every 500 ms: a replica cut
/// off or ahead in time shows within seconds.
fn short_leases() -> Vec<(String, String)> {
    [
        ("EC2JOBD_POSTGRES__LEADER_TTL", "6s"),
        ("EC2JOBD_QUEUE__LEASE", "6s"),
        ("EC2JOBD_QUEUE__HEARTBEAT", "1s"),
        ("EC2JOBD_QUEUE__REAP_INTERVAL", "500ms"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Partition (issue 33): three replicas on one PostgreSQL queue, each behind a cuttable link of
/// its own (packets dropped, no reset) and each calling EC2 through a door of its own of one fault
/// proxy (calls counted per replica, one EC2 behind them). Rounds of start and stop jobs (starts
/// wait ~2 s for their checks, parked) run while links are cut: the first cut takes the leader
/// while it holds parked waits, for longer than a lease; the others take a random replica at a
/// random moment for 2–10 s (leases of 6 s: some are taken over, some not). After healing every job
/// has succeeded; no instance was started or stopped more often than jobs asked; and no replica
/// made an EC2 call while cut off once its leases could have been taken (a lease's time after the
/// cut) — its fence stops it first. Takeover times are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_campaign() {
    let _pg = Backend::Postgres.share().await;
    let Some(database) = common::postgres_database() else {
        return;
    };
    let mut rng = seeded("partition");
    let lease = Duration::from_secs(6);
    let moto = Moto::start().await;
    let first = proxy_with_slow_checks(&moto, rng.gen()).await;
    let doors = [
        first.door(rng.gen()).await,
        first.door(rng.gen()).await,
        first,
    ];
    let n = size(6, 20);
    let ids = moto.launch(n as i32, &[("Partition", "yes")]).await;
    moto.stop(&ids).await;
    let mut links = Vec::new();
    let mut replicas: Vec<Daemon> = Vec::new();
    for door in &doors {
        let (link, through) = common::TcpCut::before_postgres(&database).await;
        let opts = DaemonOpts {
            moto_url: Some(door.url.clone()),
            workers: 4,
            database_url: Some(through),
            env: short_leases(),
            ..Default::default()
        };
        replicas.push(match replicas.first() {
            None => Daemon::start(opts).await,
            Some(a) => Daemon::replica(opts, a.admin.clone()).await,
        });
        links.push(link);
    }
    let names = ["A", "B", "C"];
    // Which replica is cut off now (the workload goes through the others).
    let cut_now: Mutex<Option<usize>> = Mutex::new(None);
    let done = AtomicBool::new(false);
    let cuts = size(2, 10);
    let started = Instant::now();

    // The workload: each round flips every instance (start ↔ stop) with one job each, submitted
    // and followed through replicas that are not cut off; the next round starts when all are final.
    let workload = async {
        let mut running = vec![false; n];
        let (mut starts, mut stops, mut rounds) = (0usize, 0usize, 0usize);
        let mut failed = Vec::new();
        let any = |round: usize| {
            let skip = *cut_now.lock().unwrap();
            (0..replicas.len())
                .cycle()
                .skip(round)
                .find(|i| Some(*i) != skip)
                .map(|i| &replicas[i])
                .expect("two replicas are not cut")
        };
        while !done.load(Ordering::SeqCst) {
            let mut jobs = Vec::new();
            for (i, id) in ids.iter().enumerate() {
                let action = if running[i] {
                    stops += 1;
                    "stop_instances"
                } else {
                    starts += 1;
                    "start_instances"
                };
                running[i] = !running[i];
                let spec = json!({"action": action, "targets": {"instance_ids": [id]},
                    "wait": {"interval": "200ms", "timeout": "5m"}});
                let key = format!("partition-{rounds}-{i}");
                let deadline = Instant::now() + MINUTE;
                let job = loop {
                    assert!(Instant::now() < deadline, "no replica took {key}");
                    let d = any(i + rounds);
                    let r = d
                        .req(reqwest::Method::POST, "/v1/jobs", &d.admin)
                        .header("Idempotency-Key", &key)
                        .timeout(Duration::from_secs(3))
                        .json(&spec)
                        .send()
                        .await;
                    if let Ok(r) = r {
                        if r.status().is_success() {
                            let body: Value = r.json().await.unwrap_or(Value::Null);
                            if let Some(id) = body["id"].as_str() {
                                break id.to_string();
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                };
                jobs.push(job);
            }
            for (k, job) in jobs.iter().enumerate() {
                let deadline = Instant::now() + 2 * MINUTE;
                loop {
                    assert!(Instant::now() < deadline, "{job} never ended");
                    let d = any(k);
                    let r = d
                        .req(reqwest::Method::GET, &format!("/v1/jobs/{job}"), &d.admin)
                        .timeout(Duration::from_secs(3))
                        .send()
                        .await;
                    let j: Value = match r {
                        Ok(r) => r.json().await.unwrap_or(Value::Null),
                        Err(_) => Value::Null,
                    };
                    match j["state"].as_str() {
                        Some("succeeded") => break,
                        Some("failed" | "cancelled") => {
                            failed.push(format!("{job}: {} ({})", j["state"], j["error"]));
                            break;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
            rounds += 1;
        }
        (starts, stops, rounds, failed)
    };

    // The cuts: (replica, when, healed, whether it led, how long until another led).
    let cutter = async {
        let mut out = Vec::new();
        for k in 0..cuts {
            let (who, hold) = if k == 0 {
                // The leader, once it holds parked waits, for longer than a lease.
                let deadline = Instant::now() + MINUTE;
                while replicas[0].metric("ec2jobd_jobs_parked").await < 1.0 {
                    assert!(Instant::now() < deadline, "A never parked a wait");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                // It polls for them while it leads: the cut lands between its rounds.
                let polled = doors[0].calls("DescribeInstanceStatus");
                while doors[0].calls("DescribeInstanceStatus") < polled + 2 {
                    assert!(Instant::now() < deadline, "A does not poll");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (0, lease + Duration::from_secs(2))
            } else {
                tokio::time::sleep(Duration::from_millis(rng.gen_range(500..4_000))).await;
                (
                    rng.gen_range(0..replicas.len()),
                    Duration::from_millis(rng.gen_range(2_000..10_000)),
                )
            };
            let led = replicas[who].metric("ec2jobd_leader ").await == 1.0;
            *cut_now.lock().unwrap() = Some(who);
            links[who].set(true);
            let at = Instant::now();
            let mut takeover = None;
            while at.elapsed() < hold {
                if led && takeover.is_none() {
                    for (i, d) in replicas.iter().enumerate() {
                        if i != who && d.metric("ec2jobd_leader ").await == 1.0 {
                            takeover = Some(at.elapsed());
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            links[who].set(false);
            let healed = Instant::now();
            // Until the healed replica is ready again, the workload keeps away from it.
            let deadline = healed + MINUTE;
            loop {
                let d = &replicas[who];
                let r = d
                    .req(reqwest::Method::GET, "/readyz", &d.admin)
                    .timeout(Duration::from_secs(3))
                    .send()
                    .await;
                if r.is_ok_and(|r| r.status() == 200) {
                    break;
                }
                assert!(Instant::now() < deadline, "{} never came back", names[who]);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            *cut_now.lock().unwrap() = None;
            out.push((who, at, healed, led, takeover));
        }
        done.store(true, Ordering::SeqCst);
        out
    };
    let ((starts, stops, rounds, failed), cuts_made) = tokio::join!(workload, cutter);

    let mut violations = failed;
    for (who, at, healed, _, _) in &cuts_made {
        let late: Vec<String> = doors[*who]
            .timeline()
            .into_iter()
            .filter(|(_, t, _)| *t >= *at + lease && *t <= *healed)
            .map(|(op, t, _)| format!("{op} {:?} after the cut", t - *at))
            .collect();
        if !late.is_empty() {
            violations.push(format!(
                "{} called EC2 while cut off after its leases could be taken: {late:?}",
                names[*who]
            ));
        }
    }
    for (op, asked) in [("StartInstances", starts), ("StopInstances", stops)] {
        let made: usize = doors.iter().map(|d| d.ids(op)).sum();
        if made != asked {
            violations.push(format!("{op}: {made} instance(s) for {asked} job(s)"));
        }
    }
    let calls = |i: usize| doors[i].timeline().len();
    let takeovers: Vec<String> = cuts_made
        .iter()
        .filter(|c| c.3)
        .map(|(who, ..)| names[*who])
        .zip(cuts_made.iter().filter(|c| c.3).map(|c| c.4))
        .map(|(n, t)| match t {
            Some(t) => format!("{n}: {:.1} s", t.as_secs_f64()),
            None => format!("{n}: none within the cut"),
        })
        .collect();
    report(
        "partition (three replicas on PostgreSQL)",
        &[
            ("instances", format!("{n}")),
            (
                "jobs (start / stop), rounds",
                format!("{starts} / {stops}, {rounds}"),
            ),
            (
                "cuts (replica, seconds)",
                cuts_made
                    .iter()
                    .map(|(w, at, h, ..)| format!("{} {:.1}", names[*w], (*h - *at).as_secs_f64()))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
            ("leader cut: another led after", takeovers.join(", ")),
            (
                "EC2 calls per replica (A/B/C)",
                format!("{}/{}/{}", calls(0), calls(1), calls(2)),
            ),
            (
                "wall time",
                format!("{:.1} s", started.elapsed().as_secs_f64()),
            ),
        ],
        &violations,
    );
}

/// Hand-off (issue 33): replica A leads and holds parked waits (start jobs whose status checks
/// stay `initializing`); B runs beside it. Leases and the leader lease are a minute long, so
/// without a hand-off B would lead only at its next renewal (up to 20 s) and the waits would stall
/// meanwhile. A is SIGTERMed: B leads and has taken the waits up within a few seconds (printed),
/// and once the checks pass B's own status rounds finish every job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_hands_its_waits_and_the_lead_over() {
    let _pg = Backend::Postgres.share().await;
    let Some(database) = common::postgres_database() else {
        return;
    };
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.url, 7).await;
    proxy.set(|f| f.checks_after_start = Some(10 * MINUTE));
    let ids = moto.launch(3, &[("Handoff", "yes")]).await;
    moto.stop(&ids).await;
    let opts = DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        workers: 4,
        database_url: Some(database),
        env: vec![
            ("EC2JOBD_POSTGRES__LEADER_TTL".into(), "60s".into()),
            ("EC2JOBD_QUEUE__LEASE".into(), "60s".into()),
            ("EC2JOBD_QUEUE__HEARTBEAT".into(), "5s".into()),
        ],
        ..Default::default()
    };
    let mut a = Daemon::start(opts.clone()).await;
    let jobs = parked_starts(&a, &ids).await;
    let b = Daemon::replica(opts.clone(), a.admin.clone()).await;
    assert_eq!(a.metric("ec2jobd_leader ").await, 1.0, "A leads");
    assert_eq!(b.metric("ec2jobd_leader ").await, 0.0, "B does not");

    a.terminate(MINUTE);
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(15);
    let mut led = None;
    let mut resumed = None;
    while led.is_none() || resumed.is_none() {
        assert!(
            Instant::now() < deadline,
            "B took over only partly (leads after {led:?}, waits after {resumed:?}): the hand-off waited for the lease\n{}",
            b.log()
        );
        if led.is_none() && b.metric("ec2jobd_leader ").await == 1.0 {
            led = Some(stopped.elapsed());
        }
        if resumed.is_none() && b.metric("ec2jobd_jobs_parked").await == ids.len() as f64 {
            resumed = Some(stopped.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.set(|f| f.checks_after_start = None);
    for id in &jobs {
        let j = b.wait_final(id, MINUTE).await;
        // A hand-off is not a failed attempt: the count stays.
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["attempts"], 1, "{j}");
    }
    assert_eq!(
        proxy.calls("StartInstances"),
        1,
        "the resumed jobs did not start again"
    );
    eprintln!(
        "hand-off: B led {:.0} ms and held the {} waits {:.0} ms after A exited (leases of 60 s)",
        led.unwrap_or_default().as_secs_f64() * 1e3,
        ids.len(),
        resumed.unwrap_or_default().as_secs_f64() * 1e3
    );
}

/// Clock skew (issue 33): three replicas on one PostgreSQL queue, A on this machine's clock, B's
/// clock 30 s ahead and C's 30 s behind (Debian's libfaketime). Leases, leader terms and schedule
/// firings follow the database's clock, so: while A runs, neither B nor C ever leads; no job is
/// claimed twice or has its lease swept ("requeued") although B sweeps with a clock 30 s ahead;
/// a schedule firing every second fires each second once, at its real time, while A leads and
/// after A stops and a skewed replica leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_campaign() {
    let _pg = Backend::Postgres.share().await;
    let Some(database) = common::postgres_database() else {
        return;
    };
    let moto = Moto::start().await;
    let proxy = proxy_with_slow_checks(&moto, 33).await;
    let per = size(3, 10);
    let ids = moto.launch(3 * per as i32, &[("Skew", "yes")]).await;
    moto.stop(&ids).await;
    let opts = |skew: Option<&str>| DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        workers: 4,
        database_url: Some(database.clone()),
        env: short_leases()
            .into_iter()
            .chain(skew.map(common::faketime).into_iter().flatten())
            .collect(),
        ..Default::default()
    };
    let mut a = Daemon::start(opts(None)).await;
    every_second(&a).await;
    let b = Daemon::replica(opts(Some("+30s")), a.admin.clone()).await;
    let c = Daemon::replica(opts(Some("-30s")), a.admin.clone()).await;
    let mut violations = Vec::new();
    // Each says how far its clock is off the database's.
    let mut offsets = Vec::new();
    for (d, want) in [(&a, 0.0), (&b, 30.0), (&c, -30.0)] {
        let off = d.metric("ec2jobd_clock_offset_seconds").await;
        if (off - want).abs() > 1.0 {
            violations.push(format!("clock offset {off} s where {want} s"));
        }
        offsets.push(format!("{off:+.1}"));
    }
    // Start jobs through every replica: each waits ~2 s for its checks, parked, renewed by the
    // replica that holds it while the others sweep for expired leases.
    let mut jobs = Vec::new();
    for (d, chunk) in [&a, &b, &c].into_iter().zip(ids.chunks(per)) {
        for i in chunk {
            jobs.push((
                d.submit(
                    &json!({"action": "start_instances", "targets": {"instance_ids": [i]},
                    "wait": {"interval": "200ms", "timeout": "5m"}}),
                )
                .await,
                i.clone(),
            ));
        }
    }
    // Who leads, sampled every 100 ms for a while (B's clock is past A's lease all the time).
    let mut seen: Vec<Vec<&str>> = Vec::new();
    let until = Instant::now() + Duration::from_secs(size(8, 60) as u64);
    while Instant::now() < until {
        let mut leaders = Vec::new();
        for (n, d) in [("A", &a), ("B", &b), ("C", &c)] {
            if d.metric("ec2jobd_leader ").await == 1.0 {
                leaders.push(n);
            }
        }
        if !seen.contains(&leaders) {
            seen.push(leaders);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if seen != vec![vec!["A"]] {
        violations.push(format!("leaders while A runs: {seen:?} (only A may lead)"));
    }
    for (id, _) in &jobs {
        let j = a.wait_final(id, MINUTE).await;
        let events = events_of(&a, id).await;
        let requeued = events.iter().filter(|e| e["kind"] == "requeued").count();
        if j["state"] != "succeeded" || j["attempts"] != 1 || requeued > 0 {
            violations.push(format!(
                "{id}: {} after {} attempt(s), requeued {requeued} time(s)",
                j["state"], j["attempts"]
            ));
        }
    }
    if proxy.ids("StartInstances") != jobs.len() {
        violations.push(format!(
            "{} instances started by {} jobs",
            proxy.ids("StartInstances"),
            jobs.len()
        ));
    }
    let a_fired = schedule_firings(&a, "tick").await;
    // A stops; a replica with a skewed clock leads and fires from then on.
    a.terminate(MINUTE);
    let stopped = Instant::now();
    let deadline = stopped + MINUTE;
    let successor = loop {
        if b.metric("ec2jobd_leader ").await == 1.0 {
            break &b;
        }
        if c.metric("ec2jobd_leader ").await == 1.0 {
            break &c;
        }
        assert!(
            Instant::now() < deadline,
            "no replica leads after A\n{}",
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let led_after = stopped.elapsed();
    tokio::time::sleep(Duration::from_secs(size(5, 30) as u64)).await;
    let real_now = chrono::Utc::now();
    let fired = schedule_firings(successor, "tick").await;
    let distinct: BTreeSet<_> = fired.iter().collect();
    if distinct.len() != fired.len() {
        violations.push(format!(
            "{} firing times queued {} jobs",
            distinct.len(),
            fired.len()
        ));
    }
    // While A led: every second between its first and last firing, once.
    let a_secs = a_fired.len() as i64;
    if let (Some(first), Some(last)) = (a_fired.first(), a_fired.last()) {
        if (*last - *first).num_seconds() + 1 != a_secs {
            violations.push(format!(
                "A fired {a_secs} times between {first} and {last}: slots missed or doubled"
            ));
        }
    }
    // After: firings at real times (a clock 30 s ahead fires early; one behind, late).
    let newest = fired.last().copied().unwrap_or_default();
    let lag = (real_now - newest).num_milliseconds();
    if !(0..3_000).contains(&lag) {
        violations.push(format!(
            "the newest firing ({newest}) is {lag} ms behind the real time ({real_now})"
        ));
    }
    let after: Vec<_> = fired
        .iter()
        .filter(|f| a_fired.last().is_none_or(|l| *f > l))
        .collect();
    if after.len() < 3 {
        violations.push(format!("the successor fired {} times", after.len()));
    }
    report(
        "clock skew (replicas at +0 s, +30 s, -30 s)",
        &[
            ("jobs (start, parked ~2 s)", format!("{}", jobs.len())),
            ("clock offsets A/B/C (s)", offsets.join(" / ")),
            ("firings while A led", format!("{a_secs}")),
            (
                "firings after A stopped",
                format!("{} (newest {lag} ms before the real time)", after.len()),
            ),
            (
                "a skewed replica led after A stopped",
                format!("{:.0} ms", led_after.as_secs_f64() * 1e3),
            ),
        ],
        &violations,
    );
}

/// A job that stays around for SSE floods (a describe that has finished is fine: its stream ends).
async fn accepted_first(http: &reqwest::Client, url: &str, admin: &str, iid: &str) -> String {
    let r = http
        .post(format!("{url}/v1/jobs"))
        .bearer_auth(admin)
        .json(&json!({"action": "describe_instances", "targets": {"instance_ids": [iid]}}))
        .send()
        .await
        .expect("submit");
    let v: Value = r.json().await.expect("job");
    v["id"].as_str().unwrap_or("").to_string()
}

/// Replicas (issue 15): three daemons on one PostgreSQL database behave as one service. Mixed jobs
/// go round-robin to all three; EC2 state-change alarms arrive through SNS, each delivery sent to
/// two replicas at once; replicas are SIGKILLed at random moments one at a time (and restarted),
/// and PostgreSQL itself is restarted once mid-run. Every job must end succeeded, nothing be
/// created twice (counted at the proxy, where calls take effect), each SNS message queue one job,
/// and the parked waits of a killed replica be taken up by another process once their lease runs
/// out (how long that took is printed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_campaign() {
    replicas(Ec2::Moto).await
}

/// The same against EC2 as it is (issue 31).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_campaign_realistic() {
    replicas(Ec2::Realistic).await
}

async fn replicas(ec2: Ec2) {
    // It restarts the server: alone on it.
    let _pg = POSTGRES.write().await;
    let Some(database) = common::postgres_database() else {
        return;
    };
    let per = size(5, 50);
    let kills = size(2, 5);
    let alarms = size(6, 30);
    let campaign = ec2.named("replicas".to_string());
    let mut rng = seeded(&campaign);
    let moto = Moto::start().await;
    let image = moto.image().await;
    let proxy = FaultProxy::start(&moto.url, rng.gen()).await;
    proxy.set(|f| {
        f.latency = Duration::from_millis(5);
        f.latency_jitter = Duration::from_millis(45);
        f.checks_after_start = Some(Duration::from_secs(2));
    });
    ec2.apply(&proxy);
    let jobs = mixed_jobs(
        &moto,
        &["run", "stop", "start", "reboot", "snapshot", "image"],
        per,
        &mut rng,
    )
    .await;
    let alarmed = moto.launch(alarms as i32, &[("Alarmed", "no")]).await;
    let certs = common::sns_cert_dir();
    let topic = "arn:aws:sns:us-east-1:123456789012:ec2-events";
    let opts = DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        workers: 4,
        database_url: Some(database.clone()),
        env: vec![("EC2JOBD_QUEUE__MAX_ATTEMPTS".into(), "10".into())],
        extra: format!(
            r#"
[sns]
cert_dir = "{certs}"
[sns.hooks.ec2-events]
topics = ["{topic}"]
[[sns.hooks.ec2-events.rules]]
name = "mark-stopped"
instance_state = "stopped"
job = {{ action = "create_tags", targets = {{ instance_ids = ["{{instance_id}}"] }}, params = {{ tags = {{ Alarmed = "yes" }} }} }}
"#,
            certs = certs.path().display()
        ),
        ..Default::default()
    };
    let first = Daemon::start(opts.clone()).await;
    let admin = first.admin.clone();
    let mut ds = vec![first];
    ds.push(Daemon::replica(opts.clone(), admin.clone()).await);
    // The third as behind PgBouncer in transaction pooling: no LISTEN, it finds work by polling.
    let mut poll_only = opts.clone();
    poll_only
        .env
        .push(("EC2JOBD_POSTGRES__POLL_ONLY".into(), "true".into()));
    ds.push(Daemon::replica(poll_only, admin.clone()).await);

    // A live stream on one replica follows a job another runs.
    let watched = ds[0]
        .submit(&Job::Tag(alarmed[0].clone()).spec(&image, "replicas"))
        .await;
    let stream = ds[1]
        .req(
            reqwest::Method::GET,
            &format!("/v1/jobs/{watched}/events"),
            &admin,
        )
        .send()
        .await
        .unwrap();
    let (mut kinds, mut lag_ms) = (Vec::new(), 0i64);
    {
        use futures::StreamExt;
        let mut body = stream.bytes_stream();
        let mut buf = String::new();
        let read = tokio::time::timeout(MINUTE, async {
            while let Some(chunk) = body.next().await {
                let now = chrono::Utc::now();
                buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
                while let Some(end) = buf.find("\n\n") {
                    let frame: String = buf.drain(..end + 2).collect();
                    if let Some(data) = frame.lines().find_map(|l| l.strip_prefix("data: ")) {
                        let ev: Value = serde_json::from_str(data).unwrap();
                        kinds.push(ev["kind"].as_str().unwrap_or("?").to_string());
                        if let Some(at) = ev["at"]
                            .as_str()
                            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                        {
                            lag_ms = lag_ms.max((now - at.to_utc()).num_milliseconds());
                        }
                    }
                }
            }
        })
        .await;
        assert!(
            read.is_ok(),
            "the stream on another replica ended: {kinds:?}"
        );
    }

    let started = Instant::now();
    let mut ids = Vec::new();
    for (i, job) in jobs.iter().enumerate() {
        ids.push(ds[i % 3].submit(&job.spec(&image, "replicas")).await);
    }
    // Each alarm delivered to two replicas at once.
    let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut deliveries = Vec::new();
    for (n, iid) in alarmed.iter().enumerate() {
        let event = json!({"detail-type": "EC2 Instance State-change Notification",
            "source": "aws.ec2", "region": "us-east-1", "account": "123456789012",
            "detail": {"instance-id": iid, "state": "stopped"}})
        .to_string();
        let message_id = format!("replicas-{n}");
        let body = common::sns_signed(&[
            ("Message", &event),
            ("MessageId", &message_id),
            ("Timestamp", &now),
            ("TopicArn", topic),
            ("Type", "Notification"),
        ]);
        let (a, b) = (n % 3, (n + 1) % 3);
        let send = |d: &Daemon| {
            d.http
                .post(format!("{}/v1/sns/ec2-events", d.url))
                .body(body.clone())
                .send()
        };
        let (ra, rb) = tokio::join!(send(&ds[a]), send(&ds[b]));
        let mut answers = Vec::new();
        for r in [ra, rb] {
            let r = r.unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            answers.push((status, v));
        }
        deliveries.push((message_id, answers));
    }

    let lease = Duration::from_secs(3);
    let total = (ids.len() + alarms) as f64;
    let mut kill_points = Vec::new();
    let mut parked_at_kill = Vec::new();
    let mut takeovers: Vec<(String, chrono::DateTime<chrono::Utc>, u32)> = Vec::new();
    let mut pg_restart = None;
    let pg_restart_at = rng.gen_range(0..kills);
    for k in 0..kills {
        let at = ((k as f64 + rng.gen_range(0.2..0.9)) / (kills as f64 + 1.0) * total) as u64;
        let victim = rng.gen_range(0..3);
        let watcher = (victim + 1) % 3;
        let deadline = Instant::now() + 3 * MINUTE;
        while finished(&ds[watcher]).await < at {
            assert!(
                Instant::now() < deadline,
                "no progress towards {at} finished jobs"
            );
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..40))).await;
        }
        // Jobs running now: those the victim held parked are found afterwards by their events.
        let running = running_jobs(&ds[watcher]).await;
        kill_points.push(finished(&ds[watcher]).await);
        parked_at_kill.push(ds[victim].metric("ec2jobd_jobs_parked").await as u64);
        let pid = ds[victim].pid();
        let killed_at = chrono::Utc::now();
        ds[victim].kill9();
        takeovers.extend(running.into_iter().map(|id| (id, killed_at, pid)));
        ds[victim].spawn().await;
        if k == pg_restart_at {
            pg_restart = Some(common::restart_postgres());
        }
    }

    let mut check = Checker::new(&moto, &proxy, "replicas");
    for (i, (id, job)) in ids.iter().zip(&jobs).enumerate() {
        let j = ds[i % 3].wait_final(id, 3 * MINUTE).await;
        check.job(id, job, &j).await;
    }
    let mut violations = check.violations.clone();
    // Each SNS message: one job, named by both answers; one accepted, one duplicate.
    let mut alarm_jobs = BTreeSet::new();
    let mut outcomes = BTreeMap::<String, usize>::new();
    for (message, answers) in &deliveries {
        let named: BTreeSet<&str> = answers
            .iter()
            .filter_map(|(_, v)| v["job_id"].as_str())
            .collect();
        for (status, v) in answers {
            *outcomes
                .entry(format!("{status} {}", v["outcome"].as_str().unwrap_or("?")))
                .or_default() += 1;
        }
        let accepted = answers
            .iter()
            .filter(|(_, v)| v["outcome"] == "accepted")
            .count();
        if named.len() != 1 || accepted != 1 {
            violations.push(format!(
                "SNS message {message} sent to two replicas: {answers:?}"
            ));
        }
        alarm_jobs.extend(named.into_iter().map(String::from));
    }
    for id in &alarm_jobs {
        let j = ds[0].wait_final(id, 3 * MINUTE).await;
        if j["state"] != "succeeded" {
            violations.push(format!(
                "alarm job {id} ended {}: {}",
                j["state"], j["error"]
            ));
        }
    }
    let tagged: BTreeSet<String> = moto.tagged("Alarmed", "yes").await.into_iter().collect();
    let want: BTreeSet<String> = alarmed.iter().cloned().collect();
    if tagged != want {
        violations.push(format!(
            "alarmed instances tagged {tagged:?}, want {want:?}"
        ));
    }
    let (_, listed) = ds[2].get_json("/v1/sns/deliveries?limit=500").await;
    let accepted_rows = listed["deliveries"]
        .as_array()
        .map(|a| a.iter().filter(|d| d["outcome"] == "accepted").count())
        .unwrap_or(0);
    if accepted_rows != alarms {
        violations.push(format!(
            "{accepted_rows} accepted deliveries recorded for {alarms} messages"
        ));
    }
    if !ds[2].log().contains("poll_only=true") {
        violations.push("the third replica did not run with postgres.poll_only".into());
    }
    let elapsed = started.elapsed();
    let (made, deleted) = check.volumes().await;
    let (amis, deregistered) = check.images().await;

    // Parked waits of a killed replica: re-queued by another process once their lease ran out,
    // then taken up (claimed again) by a worker.
    let (mut requeued, mut taken_up) = (Vec::new(), Vec::new());
    for (id, killed_at, pid) in &takeovers {
        let events = events_of(&ds[0], id).await;
        let at = |e: &Value| {
            e["at"]
                .as_str()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.to_utc())
        };
        // Parked in the victim's lot when it died: the last event before the kill says so (a
        // lot's id begins with its process id).
        let before = events
            .iter()
            .rfind(|e| at(e).is_some_and(|t| t < *killed_at));
        let victims = before.is_some_and(|e| {
            e["kind"] == "parked"
                && e["data"]["lot"]
                    .as_str()
                    .is_some_and(|lot| lot.starts_with(&format!("{pid}-")))
        });
        if !victims {
            continue;
        }
        let after: Vec<&Value> = events
            .iter()
            .filter(|e| at(e).is_some_and(|t| t >= *killed_at))
            .collect();
        // Its lease ran out (the victim's lot held it) rather than the wait ending.
        let expired = after
            .iter()
            .position(|e| e["kind"] == "requeued" && e["message"] == "lease expired; queued again");
        let Some(p) = expired else { continue };
        if let Some(t) = at(after[p]) {
            requeued.push((t - *killed_at).num_milliseconds());
        }
        // "resumed" when its wait had ended just before (the outcome stays with the job).
        let Some(next) = after[p..]
            .iter()
            .find(|e| e["kind"] == "started" || e["kind"] == "resumed")
        else {
            violations.push(format!(
                "job {id}: re-queued after the kill but never started again"
            ));
            continue;
        };
        let by = next["data"]["worker"].as_str().unwrap_or("");
        if by.starts_with(&format!("{pid}-")) {
            violations.push(format!("job {id}: taken up by the dead process {pid}?"));
        }
        if let Some(t) = at(next) {
            taken_up.push((t - *killed_at).num_milliseconds());
        }
    }
    if parked_at_kill.iter().all(|n| *n == 0) {
        violations.push(format!(
            "no kill landed while the victim had parked jobs ({parked_at_kill:?})"
        ));
    }
    let slowest = |v: &[i64]| v.iter().max().copied().unwrap_or(0);
    let (slowest_requeue, slowest_claim) = (slowest(&requeued), slowest(&taken_up));
    // The lease and the reaper's interval, with room for a loaded machine (and a PostgreSQL
    // restart right after the kill).
    if slowest_requeue > (lease + Duration::from_secs(10)).as_millis() as i64 {
        violations.push(format!(
            "a dead replica's parked wait was re-queued {slowest_requeue} ms after the kill (lease {lease:?})"
        ));
    }
    report(
        &campaign,
        &[
            (
                "replicas on one PostgreSQL database",
                "3 (one with postgres.poll_only)".into(),
            ),
            (
                "jobs (run/stop/start/reboot/snapshot/AMI), round-robin",
                ids.len().to_string(),
            ),
            (
                "SNS messages, each sent to two replicas",
                format!(
                    "{alarms} → {} job(s); answers {outcomes:?}",
                    alarm_jobs.len()
                ),
            ),
            (
                "event stream on another replica",
                format!("{kinds:?}, newest event {lag_ms} ms after it was written"),
            ),
            (
                "SIGKILLs at finished-job counts",
                format!("{kills} at {kill_points:?}"),
            ),
            (
                "victim's parked jobs at each kill",
                format!("{parked_at_kill:?}"),
            ),
            (
                "killed replicas' parked waits: re-queued / claimed again",
                format!(
                    "{} jobs: at most {slowest_requeue} ms / {slowest_claim} ms after the kill (lease {lease:?})",
                    requeued.len()
                ),
            ),
            (
                "PostgreSQL restarted (away for)",
                pg_restart.map_or("no".into(), |d| format!("{:.2} s", d.as_secs_f64())),
            ),
            ("final states", format!("{:?}", check.states)),
            (
                "snapshots made / deleted by rotation",
                format!("{made} / {deleted}"),
            ),
            (
                "AMIs made / deregistered by rotation",
                format!("{amis} / {deregistered}"),
            ),
            ("wall time", format!("{:.1} s", elapsed.as_secs_f64())),
        ],
        &violations,
    );
    if !kinds.contains(&"succeeded".to_string()) {
        panic!("the stream on another replica did not show the job's end: {kinds:?}");
    }
}

/// Ids of the jobs running now (parked ones among them).
async fn running_jobs(d: &Daemon) -> Vec<String> {
    let (_, page) = d.get_json("/v1/jobs?state=running&limit=500").await;
    page["jobs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|j| j["id"].as_str().map(String::from))
        .collect()
}

/// A finished job's whole event log, read from its event stream (which ends with the job).
async fn events_of(d: &Daemon, id: &str) -> Vec<Value> {
    let text = d.text(&format!("/v1/jobs/{id}/events")).await;
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|data| serde_json::from_str(data).ok())
        .collect()
}

/// Replicas poll EC2 as one: with start jobs waiting for status checks on three replicas at once,
/// one replica (the leader) asks about every replica's instances in the same calls, and the others
/// make no status call at all; every job ends with its instances' 2/2 checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_status_polling() {
    let _pg = POSTGRES.read().await;
    let Some(database) = common::postgres_database() else {
        return;
    };
    let moto = Moto::start().await;
    let proxy = FaultProxy::start(&moto.url, 1).await;
    // Checks held until every replica's job waits.
    proxy.set(|f| {
        f.instance_status = Some((
            "initializing".into(),
            Instant::now() + Duration::from_secs(3600),
        ))
    });
    let per = 20;
    let opts = DaemonOpts {
        moto_url: Some(proxy.url.clone()),
        workers: 2,
        database_url: Some(database),
        ..Default::default()
    };
    let first = Daemon::start(opts.clone()).await;
    let admin = first.admin.clone();
    let mut ds = vec![first];
    for _ in 1..3 {
        ds.push(Daemon::replica(opts.clone(), admin.clone()).await);
    }
    let mut jobs = Vec::new();
    for d in &ds {
        let ids = moto.launch(per as i32, &[("Share", "yes")]).await;
        moto.stop(&ids).await;
        let spec = json!({"action": "start_instances", "targets": {"instance_ids": ids},
            "wait": {"until": "status_ok", "interval": "200ms", "timeout": "2m"}});
        jobs.push((d.submit(&spec).await, ids));
    }
    let deadline = Instant::now() + 2 * MINUTE;
    loop {
        let mut parked = 0.0;
        for d in &ds {
            parked += d.metric("ec2jobd_jobs_parked").await;
        }
        if parked >= 3.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the three jobs never all waited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The leader takes the others' waits up within a second or so: its rounds then ask about all.
    while proxy.max_ids("DescribeInstanceStatus") < 3 * per && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.set(|f| f.instance_status = None);
    for (i, (id, ids)) in jobs.iter().enumerate() {
        let j = ds[i].wait_final(id, 2 * MINUTE).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        let checks: Vec<&str> = j["results"]["instances"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["checks"].as_str())
            .collect();
        assert_eq!(checks.len(), ids.len(), "{j}");
        assert!(checks.iter().all(|c| *c == "2/2 checks passed"), "{j}");
    }
    let most = proxy.max_ids("DescribeInstanceStatus");
    assert_eq!(
        most,
        3 * per,
        "one call asked about every replica's instances ({} calls)",
        proxy.calls("DescribeInstanceStatus")
    );
    let mut polled = Vec::new();
    for d in &ds {
        polled.push(
            d.metric_sum(
                "ec2jobd_ec2_calls_total",
                "operation=\"DescribeInstanceStatus\"",
            )
            .await,
        );
    }
    assert_eq!(
        polled.iter().filter(|n| **n > 0.0).count(),
        1,
        "one replica polls: {polled:?}"
    );
}

//! EC2 call benchmark (issue 3), against a real moto server behind our counting proxy:
//!
//! 1. EC2 calls per job, by action: one job per action over 1 instance (by id) and over 10 instances
//!    (by tag), counted by operation at the proxy.
//! 2. Shared status polling under load: 1,000 jobs, each waiting on its own instance for
//!    `status_ok` while the proxy holds the checks at `initializing`; DescribeInstanceStatus calls
//!    per polling round (target: ⌈1000/100⌉ = 10), the daemon's memory while they wait, and how long
//!    the 1,000 jobs take to finish once the checks pass.
//!
//! 3. Parked waits (issue 14): 200 one-instance start jobs whose checks stay `initializing` for 8 s
//!    after each instance starts, with the default config (16 workers): time until all succeeded, and how long
//!    a describe job submitted right after them takes; beside it the same with parking off
//!    (`queue.max_waiting = 0`: each job holds its worker while it waits) on fewer jobs, since that
//!    takes 8 s per 4 jobs.
//!
//! 4. Priority (issue 14): with 300 bulk jobs queued, an SNS-delivered alarm's job: how long from the
//!    delivery to its first EC2 call (bounded by its first progress or `parked` event: a job that
//!    parks has made its targeting describe, its first call, just before), with
//!    the rules' default priority (`sns.priority`, 100) and, as the baseline, with the rule setting 0.
//!
//! 5. Coalesced calls (issue 14): behind the proxy enforcing EC2's default request buckets, with
//!    pacing on, 500 one-instance start jobs at once (then stop, reboot, create_tags): calls made,
//!    throttles, and time until all succeeded, beside the least time one call per job could take
//!    with that bucket ((500 - size) / refill).
//!
//! 6. Snapshot waits (issue 14): N `create_snapshots` jobs (one instance's root volume each) whose
//!    snapshots the proxy holds `pending`: DescribeSnapshots calls per polling round while all wait
//!    (target ⌈N/200⌉), with the default number of workers: the waits are parked.
//!
//! 7. Realistic starts (issue 31): N one-instance start jobs on stopped instances behind the proxy's
//!    realistic profile with EC2's timings (ids unknown 3 s after they are made, `pending` 15 s,
//!    checks `initializing` 60 s after that) and EC2's default request buckets: all must succeed;
//!    wall time from the first submission to the last success beside the slowest instance's own
//!    time (start to 2/2, measured by the daemon), EC2 calls by operation and throttles (the
//!    daemon's own count).
//!
//! 8. Writes per job (issue 32): for each action's path (one instance by id), the SQL statements
//!    that write (reads are not counted: this benchmark's own polling reads jobs) and the write
//!    transactions (SQLite: the writer's commits; PostgreSQL: transaction ids used, each a commit
//!    record and a WAL flush with `synchronous_commit` on) per job, on SQLite and on PostgreSQL
//!    (when `TEST_POSTGRES_URL` is set), for jobs run one at a time and for
//!    BENCH_WRITES_AT_ONCE (200) at once. Counted from sqlx's own statement log
//!    (`sqlx::query=debug`), minus what the idle daemon writes over the same time (leader lease,
//!    ticker). BENCH_ONLY=writes runs only this; BENCH_WRITES_DUMP=DIR keeps each run's
//!    statements there.
//!
//! 9. Status rounds of a large fleet (issue 32): BENCH_FLEET_WAITS (10,000) instances waited on,
//!    in jobs of 100, in a region of BENCH_FLEET (12,000) instances, checks held at `initializing`:
//!    DescribeInstanceStatus calls per round over BENCH_FLEET_WINDOW_SECS (120), against
//!    ⌈fleet/1000⌉ + 1 (the fleet listed page by page; the proxy pages as EC2 does, moto does not)
//!    and ⌈waits/100⌉ by id. BENCH_ONLY=fleet runs only this (not part of a whole run: moto takes
//!    seconds per call over such a fleet).
//!
//! Run with `scripts/bench` (it makes sure moto is installed). Settings: BENCH_WAITERS (default
//! 1000), BENCH_WINDOW_SECS (measuring window, default 10), BENCH_PARKED (default 200),
//! BENCH_IN_PLACE (default 64), BENCH_BULK (default 300), BENCH_COALESCE (default 500),
//! BENCH_SNAPSHOTS (default 1000), BENCH_REALISTIC (default 1000); BENCH_ONLY=core (parts 3 to 8
//! only), BENCH_ONLY=coalesce (part 5; BENCH_TRACE=1 adds where each action's time went),
//! BENCH_ONLY=parked (part 3), BENCH_ONLY=snapshots (part 6), BENCH_ONLY=realistic (part 7),
//! BENCH_ONLY=writes (part 8) or BENCH_ONLY=polling (part 2).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::proxy::{FaultProxy, Realistic};
use common::{bench_daemon, bench_daemon_with, sns_cert_dir, sns_signed, Moto};
use serde_json::{json, Value};

const OPS: &[&str] = &[
    "DescribeInstances",
    "DescribeInstanceStatus",
    "DescribeInstanceAttribute",
    "RunInstances",
    "StartInstances",
    "StopInstances",
    "RebootInstances",
    "TerminateInstances",
    "CreateTags",
    "DeleteTags",
    "ModifyInstanceAttribute",
];

/// `queue.workers` in config/default.toml: the execution-core figures are for the default config.
const DEFAULT_WORKERS: usize = 32;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

fn snapshot(p: &FaultProxy) -> BTreeMap<&'static str, u64> {
    OPS.iter().map(|op| (*op, p.calls(op))).collect()
}

async fn calls_per_action(moto: &Moto) {
    let proxy = FaultProxy::start(&moto.url, 1).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = bench_daemon(tmp.path(), &proxy.url, 4).await;
    let image = moto.image().await;
    let one = moto.launch(1, &[("Bench", "one")]).await;
    moto.launch(10, &[("Bench", "ten")]).await;
    let wait = json!({"interval": "1s"});
    println!("\nEC2 calls per job (counted at the proxy; moto answers at once, so waits end in one round)");
    println!("{:<28} {:>9}  calls", "action", "instances");
    let mut rows: Vec<(String, Value, &str)> = Vec::new();
    for (label, targets) in [
        ("1", json!({"instance_ids": one})),
        ("10", json!({"tags": {"Bench": "ten"}})),
    ] {
        for (action, params) in [
            ("describe_instances", json!({})),
            ("stop_instances", json!({})),
            ("start_instances", json!({})),
            ("start_instances", json!({})), // already running: observes only
            ("reboot_instances", json!({})),
            ("create_tags", json!({"tags": {"Owner": "bench"}})),
            ("delete_tags", json!({"keys": ["Owner"]})),
            ("audit_tags", json!({"required_keys": ["Bench"]})),
            (
                "modify_instance_attribute",
                json!({"instance_type": "t3.small"}),
            ),
            ("terminate_instances", json!({})),
        ] {
            rows.push((
                action.to_string(),
                json!({"action": action, "targets": targets, "params": params, "wait": wait}),
                label,
            ));
        }
    }
    rows.insert(
        0,
        (
            "run_instances".into(),
            json!({"action": "run_instances", "params": {"image_id": image, "instance_type": "t3.micro", "min_count": 10}, "wait": wait}),
            "10",
        ),
    );
    rows.insert(
        0,
        (
            "run_instances".into(),
            json!({"action": "run_instances", "params": {"image_id": image, "instance_type": "t3.micro"}, "wait": wait}),
            "1",
        ),
    );
    let mut seen_start = 0;
    for (action, spec, n) in rows {
        let before = snapshot(&proxy);
        let id = d.submit(&spec).await;
        let j = d.wait_final(&id, Duration::from_secs(120)).await;
        assert_eq!(j["state"], "succeeded", "{spec}: {j}");
        let after = snapshot(&proxy);
        let mut parts = Vec::new();
        let mut total = 0;
        for op in OPS {
            let k = after[op] - before[op];
            if k > 0 {
                parts.push(format!("{op} {k}"));
                total += k;
            }
        }
        let mut label = action.clone();
        if action == "start_instances" {
            seen_start += 1;
            if seen_start % 2 == 0 {
                label.push_str(" (running)");
            }
        }
        println!("{label:<28} {n:>9}  {total:>2} = {}", parts.join(", "));
    }
}

/// One start job per instance (already running: no call, a wait for status_ok), 50 submissions
/// at a time.
async fn submit_herd(d: &common::Daemon, ids: &[String]) -> Vec<String> {
    submit_all(d, &herd_specs(ids)).await
}

/// One start job per instance, waiting for status_ok.
fn herd_specs(ids: &[String]) -> Vec<Value> {
    ids.iter()
        .map(|iid| {
            json!({"action": "start_instances", "targets": {"instance_ids": [iid]},
                "wait": {"interval": "1s", "timeout": "30m"}})
        })
        .collect()
}

/// Submits every spec, 50 at a time; the job ids in order.
async fn submit_all(d: &common::Daemon, specs: &[Value]) -> Vec<String> {
    let mut jobs = Vec::new();
    for chunk in specs.chunks(50) {
        jobs.extend(futures::future::join_all(chunk.iter().map(|s| d.submit(s))).await);
    }
    jobs
}

/// `waiters` jobs waiting on their own instance each: parked (`queue` empty; the default worker
/// count) or in place (`max_waiting = 0`, as many workers as jobs, each waiting in its worker).
/// Memory is reported against a fresh daemon and against one that already ran as many jobs (its
/// SQLite caches and allocator warmed up).
async fn shared_polling(moto: &Moto, ids: &[String], window: Duration, queue: &str) {
    let waiters = ids.len();
    let how = if queue.is_empty() {
        "parked"
    } else {
        "in place"
    };
    println!(
        "\nShared status polling: {waiters} jobs, each waiting for status_ok on its own instance ({how})"
    );
    let proxy = FaultProxy::start(&moto.url, 2).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let workers = if queue.is_empty() {
        DEFAULT_WORKERS
    } else {
        waiters
    };
    let d = bench_daemon_with(tmp.path(), &proxy.url, workers, queue).await;
    let cold_rss = d.rss_kib();
    // A first herd whose checks pass at once warms the daemon up (SQLite's page caches, the
    // allocator's high-water mark from handling as many jobs), so the figure below is what
    // waiting costs, not what handling 1,000 jobs once left behind.
    for id in submit_herd(&d, ids).await {
        let j = d.wait_final(&id, Duration::from_secs(600)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    let idle_rss = d.rss_kib();
    proxy.set(|f| {
        f.instance_status = Some((
            "initializing".into(),
            Instant::now() + Duration::from_secs(3600),
        ))
    });
    let t = Instant::now();
    let jobs = submit_herd(&d, ids).await;
    println!(
        "  submitted {} jobs in {:.1}s",
        jobs.len(),
        t.elapsed().as_secs_f64()
    );
    all_waiting(&d, waiters, Duration::from_secs(600)).await;
    println!(
        "  all {} jobs waiting {:.1}s after the first submission",
        waiters,
        t.elapsed().as_secs_f64()
    );
    let (rounds, calls, per_round) = status_rounds(&d, &proxy, window).await;
    let waiting_rss = d.rss_kib();
    println!(
        "  over {:.0}s: {rounds:.0} rounds, {calls} DescribeInstanceStatus calls = {per_round:.1} per round \
         (target {}: {}), at most {} in flight",
        window.as_secs_f64(),
        waiters.div_ceil(100),
        if per_round <= waiters.div_ceil(100) as f64 { "met" } else { "MISSED" },
        proxy.max_in_flight("DescribeInstanceStatus"),
    );
    println!(
        "  daemon RSS ({workers} workers): {:.1} MiB at start, {:.1} MiB after a first {waiters} jobs ran, {:.1} MiB with {waiters} jobs waiting \
         ({:.1} KiB per waiting job over the start, {:.1} KiB over the warmed-up daemon)",
        cold_rss as f64 / 1024.0,
        idle_rss as f64 / 1024.0,
        waiting_rss as f64 / 1024.0,
        (waiting_rss.saturating_sub(cold_rss)) as f64 / waiters as f64,
        (waiting_rss.saturating_sub(idle_rss)) as f64 / waiters as f64
    );
    println!(
        "| DescribeInstanceStatus calls per round, {waiters} jobs waiting ({how}) | {per_round:.1} (max {} in flight) | ⌈{waiters}/100⌉ = {} |",
        proxy.max_in_flight("DescribeInstanceStatus"),
        waiters.div_ceil(100)
    );
    println!(
        "| RSS with {waiters} jobs waiting for checks ({how}, {workers} workers) | {:.0} MiB: {:.1} KiB/job over the start, {:.1} over the warmed-up daemon | at start {:.0} MiB; after {waiters} jobs ran {:.0} MiB |",
        waiting_rss as f64 / 1024.0,
        (waiting_rss.saturating_sub(cold_rss)) as f64 / waiters as f64,
        (waiting_rss.saturating_sub(idle_rss)) as f64 / waiters as f64,
        cold_rss as f64 / 1024.0,
        idle_rss as f64 / 1024.0
    );
    proxy.set(|f| f.instance_status = None);
    let t = Instant::now();
    for id in &jobs {
        let j = d.wait_final(id, Duration::from_secs(600)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    println!(
        "  checks released: all {} jobs succeeded {:.1}s later",
        jobs.len(),
        t.elapsed().as_secs_f64()
    );
}

/// Until the daemon's status rounds cover `n` instances (every job has reached its wait), at most
/// `budget`.
async fn all_waiting(d: &common::Daemon, n: usize, budget: Duration) {
    let deadline = Instant::now() + budget;
    while d.metric("ec2jobd_status_round_instances").await < n as f64 {
        assert!(
            Instant::now() < deadline,
            "not all {n} waits began:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Status rounds and DescribeInstanceStatus calls over `window` (a measuring window, not a
/// synchronisation), and the calls per round.
async fn status_rounds(
    d: &common::Daemon,
    proxy: &FaultProxy,
    window: Duration,
) -> (f64, u64, f64) {
    let rounds0 = d.metric("ec2jobd_status_rounds_total").await;
    let calls0 = proxy.calls("DescribeInstanceStatus");
    tokio::time::sleep(window).await;
    let rounds = d.metric("ec2jobd_status_rounds_total").await - rounds0;
    let calls = proxy.calls("DescribeInstanceStatus") - calls0;
    (rounds, calls, calls as f64 / rounds.max(1.0))
}

/// One run of `n` start jobs (one stopped instance each, checks `initializing` for 8 s after the
/// start) and a describe job submitted after them; returns (seconds until all succeeded, seconds
/// the describe job took, StartInstances calls).
async fn start_herd(moto: &Moto, ids: &[String], queue: &str) -> (f64, f64, u64) {
    moto.stop(ids).await;
    let proxy = FaultProxy::start(&moto.url, 3).await;
    proxy.set(|f| f.checks_after_start = Some(Duration::from_secs(8)));
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = bench_daemon_with(tmp.path(), &proxy.url, DEFAULT_WORKERS, queue).await;
    let t = Instant::now();
    let specs = herd_specs(ids);
    let jobs = futures::future::join_all(specs.iter().map(|s| d.submit(s))).await;
    let describe = d
        .submit(&json!({"action": "describe_instances", "targets": {"instance_ids": [ids[0]]}}))
        .await;
    let j = d.wait_final(&describe, Duration::from_secs(3600)).await;
    assert_eq!(j["state"], "succeeded", "{j}");
    // The daemon's own clock, submission to final state (not this loop's polling).
    let at = |k: &str| {
        chrono::DateTime::parse_from_rfc3339(j[k].as_str().unwrap_or_default())
            .map(|t| t.timestamp_millis())
            .unwrap_or_else(|_| panic!("{k} in {j}"))
    };
    let describe_secs = (at("finished_at") - at("created_at")) as f64 / 1000.0;
    if std::env::var_os("BENCH_TRACE").is_some() {
        let events = d.text(&format!("/v1/jobs/{describe}/events")).await;
        eprintln!(
            "{}\n{events}",
            serde_json::to_string_pretty(&j).unwrap_or_default()
        );
    }
    for id in &jobs {
        let j = d.wait_final(id, Duration::from_secs(3600)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["results"]["instances"][0]["checks"], "2/2 checks passed");
    }
    (
        t.elapsed().as_secs_f64(),
        describe_secs,
        proxy.calls("StartInstances"),
    )
}

async fn snapshot_waits(moto: &Moto, n: usize) {
    println!(
        "\nSnapshot waits: {n} create_snapshots jobs, snapshots held pending, {DEFAULT_WORKERS} workers"
    );
    let mut ids = Vec::new();
    while ids.len() < n {
        let k = (n - ids.len()).min(500) as i32;
        ids.extend(moto.launch(k, &[("Bench", "snapshots")]).await);
    }
    let proxy = FaultProxy::start(&moto.url, 11).await;
    proxy.set(|f| {
        f.snapshot_state = Some((
            "pending".into(),
            "10%".into(),
            Instant::now() + Duration::from_secs(3600),
        ))
    });
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = bench_daemon(tmp.path(), &proxy.url, DEFAULT_WORKERS).await;
    let specs: Vec<Value> = ids
        .iter()
        .map(|iid| {
            json!({"action": "create_snapshots", "targets": {"instance_ids": [iid]},
                "wait": {"interval": "1s", "timeout": "30m"}})
        })
        .collect();
    let jobs = submit_all(&d, &specs).await;
    // Every job waiting: as many CreateSnapshot calls as jobs have reached the proxy, and every
    // job's progress says it waits.
    let deadline = Instant::now() + Duration::from_secs(600);
    while proxy.answered("CreateSnapshot") < n as u64 {
        assert!(
            Instant::now() < deadline,
            "not all snapshots made:\n{}",
            d.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for id in &jobs {
        d.wait_for(id, Duration::from_secs(600), |j| {
            j["progress"]["phase"] == "waiting"
        })
        .await;
    }
    println!(
        "  all {n} waiting, {} of them parked",
        d.metric("ec2jobd_jobs_parked").await
    );
    let rounds = "ec2jobd_status_rounds_total";
    let (r0, c0) = (d.metric(rounds).await, proxy.calls("DescribeSnapshots"));
    while d.metric(rounds).await < r0 + 5.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (r1, c1) = (d.metric(rounds).await, proxy.calls("DescribeSnapshots"));
    let per_round = (c1 - c0) as f64 / (r1 - r0).max(1.0);
    println!(
        "  {} DescribeSnapshots over {} rounds = {per_round:.1} per round (target ⌈{n}/200⌉ = {})",
        c1 - c0,
        r1 - r0,
        n.div_ceil(200)
    );
    println!(
        "| DescribeSnapshots calls per round, {n} snapshot jobs waiting | {per_round:.1} | ⌈{n}/200⌉ = {}; one poll per job: {n} |",
        n.div_ceil(200)
    );
    proxy.set(|f| f.snapshot_state = None);
    for id in &jobs {
        let j = d.wait_final(id, Duration::from_secs(600)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
    }
}

/// `n` stopped instances tagged `Bench=<tag>`, launched 500 at a time.
async fn stopped_fleet(moto: &Moto, n: usize, tag: &str) -> Vec<String> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let k = (n - ids.len()).min(500) as i32;
        ids.extend(moto.launch(k, &[("Bench", tag)]).await);
    }
    moto.stop(&ids).await;
    ids
}

/// A daemon with the default number of workers and pacing on, calling EC2 through `proxy` (its
/// directory lives as long as the first half).
async fn paced_daemon(proxy: &FaultProxy) -> (tempfile::TempDir, common::Daemon) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = bench_daemon_with(
        tmp.path(),
        &proxy.url,
        DEFAULT_WORKERS,
        "[pacing]\nenabled = true\n",
    )
    .await;
    (tmp, d)
}

/// The EC2 calls since `t0` (BENCH_TRACE): per operation, how many, when the first and last
/// arrived after `t0`, and how long they took at the proxy (moto's time and the proxy's) in all and
/// at most.
fn calls_since(proxy: &FaultProxy, t0: Instant) {
    let mut by_op: BTreeMap<String, (usize, Duration, Duration, Duration, Duration)> =
        BTreeMap::new();
    for (op, at, took) in proxy.timeline().into_iter().filter(|(_, at, _)| *at >= t0) {
        let since = at - t0;
        let e = by_op
            .entry(op)
            .or_insert((0, since, since, Duration::ZERO, Duration::ZERO));
        e.0 += 1;
        e.1 = e.1.min(since);
        e.2 = e.2.max(since);
        e.3 += took;
        e.4 = e.4.max(took);
    }
    for (op, (n, first, last, all, most)) in by_op {
        eprintln!(
            "  {n:>4}× {op}: first at {} ms, last at {} ms; {} ms in all, at most {} ms",
            first.as_millis(),
            last.as_millis(),
            all.as_millis(),
            most.as_millis()
        );
    }
}

/// Where the time of `jobs` went (BENCH_TRACE): for each kind of event (each progress message
/// by its first words), when the jobs reached it after `t0_ms`: p50 and the last job.
async fn phases(d: &common::Daemon, jobs: &[String], t0_ms: i64) {
    let mut seen: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for id in jobs {
        for (at, ev) in job_events(d, id).await {
            let words: Vec<&str> = ev["message"]
                .as_str()
                .unwrap_or_default()
                .split_whitespace()
                .take(4)
                .collect();
            let key = format!(
                "{} {}",
                ev["kind"].as_str().unwrap_or_default(),
                words.join(" ")
            );
            seen.entry(key).or_default().push(at - t0_ms);
        }
    }
    let mut rows: Vec<(i64, String)> = seen
        .into_iter()
        .map(|(k, mut v)| {
            v.sort();
            let (p50, last) = (v[v.len() / 2], v[v.len() - 1]);
            (
                p50,
                format!("  {p50:>6} ms p50 {last:>6} ms last  {:>4}× {k}", v.len()),
            )
        })
        .collect();
    rows.sort();
    for (_, r) in rows {
        eprintln!("{r}");
    }
}

async fn coalesced_calls(moto: &Moto, n: usize) {
    println!("\nCoalesced calls: {n} one-instance jobs per action at once, EC2's buckets enforced by the proxy, pacing on, {DEFAULT_WORKERS} workers");
    let ids = stopped_fleet(moto, n, "coalesce").await;
    let proxy = FaultProxy::start(&moto.url, 9).await;
    proxy.set(|f| f.ec2_buckets = true);
    let (_tmp, d) = paced_daemon(&proxy).await;
    // (action, operation, extra spec, EC2's bucket size and refill)
    let runs = [
        ("start_instances", "StartInstances", json!({}), 5.0, 2.0),
        ("stop_instances", "StopInstances", json!({}), 50.0, 5.0),
        ("start_instances", "StartInstances", json!({}), 5.0, 2.0),
        ("reboot_instances", "RebootInstances", json!({}), 50.0, 5.0),
        (
            "create_tags",
            "CreateTags",
            json!({"params": {"tags": {"Coalesced": "yes"}}}),
            100.0,
            10.0,
        ),
    ];
    for (action, op, extra, size, refill) in runs {
        let calls0 = proxy.calls(op);
        let throttles0 = proxy.injected_total();
        let specs: Vec<Value> = ids
            .iter()
            .map(|iid| {
                let mut s = json!({"action": action, "targets": {"instance_ids": [iid]},
                    "wait": {"interval": "1s", "timeout": "30m"}});
                if let Some(p) = extra.get("params") {
                    s["params"] = p.clone();
                }
                s
            })
            .collect();
        let t = Instant::now();
        let t0_ms = chrono::Utc::now().timestamp_millis();
        let jobs = submit_all(&d, &specs).await;
        for id in &jobs {
            let j = d.wait_final(id, Duration::from_secs(1800)).await;
            assert_eq!(j["state"], "succeeded", "{j}");
        }
        let secs = t.elapsed().as_secs_f64();
        if std::env::var_os("BENCH_TRACE").is_some() {
            phases(&d, &jobs, t0_ms).await;
            calls_since(&proxy, t);
        }
        let calls = proxy.calls(op) - calls0;
        let throttles = proxy.injected_total() - throttles0;
        let bound = (n as f64 - size).max(0.0) / refill;
        println!(
            "  {action}: {n} jobs in {secs:.1}s with {calls} {op} calls (most ids {}), {throttles} throttles; \
             one call per job needs ≥ {bound:.0}s ({:.1}%; target ≤ 5%, ≤ 10 calls, 0 throttles)",
            proxy.max_ids(op),
            secs / bound.max(0.001) * 100.0
        );
        println!(
            "| {n} one-instance {action} jobs, EC2 buckets enforced | {secs:.1} s, {calls} {op} calls, {throttles} throttles | one call per job: ≥ {bound:.0} s, {n} calls |"
        );
    }
}

async fn realistic_starts(moto: &Moto, n: usize) {
    let (pending, checks) = (Duration::from_secs(15), Duration::from_secs(60));
    println!(
        "\nRealistic starts: {n} one-instance start jobs, pending {}s then checks initializing {}s, \
         ids unknown 3s, EC2's buckets enforced, pacing on, {DEFAULT_WORKERS} workers",
        pending.as_secs(),
        checks.as_secs()
    );
    let ids = stopped_fleet(moto, n, "realistic").await;
    let proxy = FaultProxy::start(&moto.url, 31).await;
    proxy.set(|f| {
        f.ec2_buckets = true;
        f.realistic = Some(Realistic {
            consistency: Duration::from_secs(3),
            pending,
            stopping: Duration::from_secs(15),
            page_size: None,
        });
        f.checks_after_start = Some(pending + checks);
    });
    let (_tmp, d) = paced_daemon(&proxy).await;
    let calls0: Vec<u64> = OPS.iter().map(|op| proxy.calls(op)).collect();
    let specs: Vec<Value> = ids
        .iter()
        .map(|iid| {
            json!({"action": "start_instances", "targets": {"instance_ids": [iid]},
                "wait": {"interval": "5s", "timeout": "30m"}})
        })
        .collect();
    let t = Instant::now();
    let jobs = submit_all(&d, &specs).await;
    let submitted = t.elapsed().as_secs_f64();
    let mut slowest = 0f64;
    for id in &jobs {
        let j = d.wait_final(id, Duration::from_secs(1800)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        assert_eq!(j["results"]["instances"][0]["checks"], "2/2 checks passed");
        let own = j["results"]["instances"][0]["seconds_to_status_ok"]
            .as_f64()
            .unwrap_or_else(|| panic!("seconds_to_status_ok in {j}"));
        slowest = slowest.max(own);
    }
    let secs = t.elapsed().as_secs_f64();
    let throttles = d
        .metric_sum(
            "ec2jobd_ec2_attempts_total",
            "outcome=\"RequestLimitExceeded\"",
        )
        .await
        .abs() as u64;
    let calls: Vec<String> = OPS
        .iter()
        .zip(&calls0)
        .map(|(op, before)| (op, proxy.calls(op) - before))
        .filter(|(_, n)| *n > 0)
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    println!(
        "  {n} jobs in {secs:.1}s (all submitted after {submitted:.1}s); slowest instance's own time \
         {slowest:.1}s (target: within +5 s); calls: {}; {throttles} throttles",
        calls.join(", ")
    );
    println!(
        "| {n} one-instance start jobs, realistic EC2 timings and buckets | {secs:.1} s (submitting took {submitted:.1} s), {throttles} throttles; {} | slowest instance's own time {slowest:.1} s (target: wall ≤ +5 s) |",
        calls.join(", ")
    );
}

/// What the daemon's statement log says happened between two of its lengths.
#[derive(Default, Clone, Copy)]
struct Statements {
    writing: f64,
    commits: f64,
}

impl Statements {
    fn count(log: &str) -> Self {
        let mut s = Self::default();
        for line in log.lines().filter(|l| l.contains("sqlx::query")) {
            let Some(text) = line.split("db.statement=").nth(1) else {
                continue;
            };
            let head = line
                .split("summary=\"")
                .nth(1)
                .unwrap_or_default()
                .to_ascii_uppercase();
            if head.starts_with("BEGIN") {
                continue;
            }
            if head.starts_with("COMMIT") {
                s.commits += 1.0;
                continue;
            }
            let t = text.to_ascii_uppercase();
            if ["INSERT INTO", "UPDATE ", "DELETE FROM"]
                .iter()
                .any(|w| t.contains(w))
            {
                s.writing += 1.0;
            }
        }
        s
    }

    fn minus(self, o: Self, k: f64) -> Self {
        Self {
            writing: (self.writing - o.writing * k).max(0.0),
            commits: (self.commits - o.commits * k).max(0.0),
        }
    }
}

/// PostgreSQL's next transaction id on `url` (each write transaction takes one; this probe too).
fn pg_xid(url: &str) -> f64 {
    let o = std::process::Command::new("psql")
        .args([url, "-tAc", "SELECT txid_current()"])
        .output()
        .expect("psql runs");
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .expect("a transaction id")
}

async fn writes_per_job(moto: &Moto) {
    let at_once = env_num("BENCH_WRITES_AT_ONCE", 200) as usize;
    let alone = 10;
    println!("\nWrites per job: one-instance jobs by id, {alone} one at a time and {at_once} at once, {DEFAULT_WORKERS} workers");
    let mut backends = vec![("SQLite", None)];
    if let Some(url) = common::postgres_database() {
        backends.push(("PostgreSQL", Some(url)));
    }
    // The statement log: the daemon reads EC2JOBD_* over its config file.
    std::env::set_var("EC2JOBD_LOG__LEVEL", "warn,sqlx::query=debug");
    for (backend, url) in backends {
        let ids = stopped_fleet(moto, at_once + alone, "writes").await;
        let tmp = tempfile::tempdir().expect("tempdir");
        let db = url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", tmp.path().join("bench.db").display()));
        let d = common::bench_daemon_on(tmp.path(), &moto.url, DEFAULT_WORKERS, "", &db).await;
        // What the idle daemon writes (leader lease, ticker): subtracted pro rata.
        let l0 = d.log().len();
        let t0 = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let idle = Statements::count(&d.log()[l0..]);
        let idle_secs = t0.elapsed().as_secs_f64();
        let idle_xids = url.as_deref().map(|u| {
            let x0 = pg_xid(u);
            std::thread::sleep(Duration::from_secs(2));
            (pg_xid(u) - x0 - 1.0) / 2.0
        });
        let actions = [
            ("describe_instances", json!({})),
            ("start_instances", json!({})),
            ("reboot_instances", json!({})),
            ("create_tags", json!({"tags": {"Writes": "yes"}})),
            ("stop_instances", json!({})),
        ];
        for (action, params) in &actions {
            for (n, together) in [(alone, false), (at_once, true)] {
                let targets: Vec<&String> = if together {
                    ids[alone..alone + n].iter().collect()
                } else {
                    ids[..n].iter().collect()
                };
                let specs: Vec<Value> = targets
                    .iter()
                    .map(|iid| {
                        json!({"action": action, "targets": {"instance_ids": [iid]},
                            "params": params, "wait": {"interval": "1s", "timeout": "30m"}})
                    })
                    .collect();
                let l0 = d.log().len();
                let x0 = url.as_deref().map(pg_xid);
                let t0 = Instant::now();
                if together {
                    for id in submit_all(&d, &specs).await {
                        let j = d.wait_final(&id, Duration::from_secs(600)).await;
                        assert_eq!(j["state"], "succeeded", "{j}");
                    }
                } else {
                    for s in &specs {
                        let id = d.submit(s).await;
                        let j = d.wait_final(&id, Duration::from_secs(600)).await;
                        assert_eq!(j["state"], "succeeded", "{j}");
                    }
                }
                let secs = t0.elapsed().as_secs_f64();
                let x1 = url.as_deref().map(pg_xid);
                let log = d.log();
                if let Ok(dir) = std::env::var("BENCH_WRITES_DUMP") {
                    // The statements themselves, to see which write what.
                    let how = if together { "together" } else { "alone" };
                    let file = format!("{dir}/{backend}-{action}-{how}.log");
                    std::fs::write(file, &log[l0..]).expect("dump");
                }
                let k = secs / idle_secs;
                let s = Statements::count(&log[l0..]).minus(idle, k);
                let per = |v: f64| v / n as f64;
                let txns = match (x0, x1, idle_xids) {
                    (Some(a), Some(b), Some(i)) => per((b - a - 1.0 - i * secs).max(0.0)),
                    _ => per(s.commits),
                };
                let how = if together {
                    format!("{n} at once")
                } else {
                    "one at a time".into()
                };
                println!(
                    "  {backend}, {action}, {how}: {:.1} writing statements, {txns:.2} write transactions per job; {secs:.1}s",
                    per(s.writing),
                );
                println!(
                    "| writes per one-instance {action} job, {backend}, {how} | {:.1} writing statements, {txns:.2} write transactions | — |",
                    per(s.writing),
                );
            }
        }
    }
    std::env::remove_var("EC2JOBD_LOG__LEVEL");
}

async fn parked_waits(moto: &Moto, parked: usize, in_place: usize) {
    println!("\nParked waits: one-instance start jobs, checks initializing for 8 s after each start, {DEFAULT_WORKERS} workers");
    let mut ids = Vec::new();
    while ids.len() < parked.max(in_place) {
        let n = (parked.max(in_place) - ids.len()).min(500) as i32;
        ids.extend(moto.launch(n, &[("Bench", "parked")]).await);
    }
    let (all, describe, calls) = start_herd(moto, &ids[..parked], "").await;
    println!(
        "  parked: {parked} jobs succeeded {all:.1}s after submission (target ≤ 13 s), {calls} StartInstances; \
         a describe job submitted after them took {describe:.2}s (target < 1 s)"
    );
    let (all_b, describe_b, _) = start_herd(moto, &ids[..in_place], "max_waiting = 0\n").await;
    println!(
        "  in place (max_waiting = 0): {in_place} jobs succeeded {all_b:.1}s after submission; \
         the describe job took {describe_b:.2}s"
    );
    println!(
        "| {parked} start jobs, checks 8 s, default config: all succeeded | {all:.1} s (describe job behind them: {describe:.2} s) | waits in place: {in_place} jobs {all_b:.1} s (describe {describe_b:.2} s) |"
    );
}

/// Milliseconds from `t0_ms` (wall clock) to the first progress event of job `id`.
async fn first_progress_after(d: &common::Daemon, id: &str, t0_ms: i64) -> i64 {
    let (at, _) = job_events(d, id)
        .await
        .into_iter()
        .find(|(_, e)| e["kind"] == "progress" || e["kind"] == "parked")
        .expect("a progress or parked event");
    at - t0_ms
}

/// The events of job `id` (its event stream read to the end), each with its time in ms.
async fn job_events(d: &common::Daemon, id: &str) -> Vec<(i64, Value)> {
    d.text(&format!("/v1/jobs/{id}/events"))
        .await
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
        .filter_map(|e| {
            let at = chrono::DateTime::parse_from_rfc3339(e["at"].as_str()?).ok()?;
            Some((at.timestamp_millis(), e))
        })
        .collect()
}

async fn sns_priority(moto: &Moto, bulk: usize) {
    println!("\nPriority: an SNS alarm's job behind {bulk} queued bulk jobs ({DEFAULT_WORKERS} workers, 20 ms per EC2 call)");
    let ids = moto.launch(1, &[("Bench", "priority")]).await;
    let proxy = FaultProxy::start(&moto.url, 5).await;
    proxy.set(|f| f.latency = Duration::from_millis(20));
    let certs = sns_cert_dir();
    let topic = "arn:aws:sns:us-east-1:123456789012:alarms";
    let mut figures = Vec::new();
    for rule_priority in [None, Some(0)] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let d = bench_daemon_with(
            tmp.path(),
            &proxy.url,
            DEFAULT_WORKERS,
            &format!("[sns]\ncert_dir = \"{}\"\n", certs.path().display()),
        )
        .await;
        let mut job = json!({"action": "reboot_instances", "targets": {"instance_ids": ["{instance_id}"]},
            "wait": {"until": "none"}});
        if let Some(p) = rule_priority {
            job["priority"] = json!(p);
        }
        let hook = json!({"topics": [topic], "rules": [{"name": "reboot", "instance_state": "stopped", "job": job}]});
        let r = d
            .req(reqwest::Method::PUT, "/v1/sns/hooks/alarms", &d.admin)
            .json(&hook)
            .send()
            .await
            .expect("PUT hook");
        assert!(
            r.status().is_success(),
            "{}",
            r.text().await.unwrap_or_default()
        );
        let specs: Vec<Value> = (0..bulk)
            .map(|n| {
                json!({"action": "create_tags", "targets": {"instance_ids": [ids[0]]},
                    "params": {"tags": {"Bulk": n.to_string()}}})
            })
            .collect();
        let bulk_ids = futures::future::join_all(specs.iter().map(|s| d.submit(s))).await;
        let event =
            json!({"detail-type": "EC2 Instance State-change Notification", "source": "aws.ec2",
            "region": "us-east-1", "account": "123456789012",
            "detail": {"instance-id": ids[0], "state": "stopped"}})
            .to_string();
        let now = chrono::Utc::now();
        let stamp = now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let body = sns_signed(&[
            ("Message", &event),
            ("MessageId", &format!("m-{}", rule_priority.unwrap_or(100))),
            ("Timestamp", &stamp),
            ("TopicArn", topic),
            ("Type", "Notification"),
        ]);
        let t0 = chrono::Utc::now().timestamp_millis();
        let r = d
            .http
            .post(format!("{}/v1/sns/alarms", d.url))
            .body(body)
            .send()
            .await
            .expect("deliver");
        let a: Value = r.json().await.expect("delivery answer");
        let job = a["job_id"]
            .as_str()
            .unwrap_or_else(|| panic!("{a}"))
            .to_string();
        let j = d.wait_final(&job, Duration::from_secs(600)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        let ms = first_progress_after(&d, &job, t0).await;
        let behind = {
            let mut n = 0;
            for id in &bulk_ids {
                if d.job(id).await["state"] == "queued" {
                    n += 1;
                }
            }
            n
        };
        for id in &bulk_ids {
            d.wait_final(id, Duration::from_secs(600)).await;
        }
        let label = match rule_priority {
            None => "sns.priority (100)".to_string(),
            Some(p) => format!("rule priority {p}"),
        };
        println!("  {label}: first EC2 call {ms} ms after the delivery ({behind} bulk jobs still queued when it finished)");
        figures.push(ms);
    }
    println!(
        "| SNS alarm's job, first EC2 call behind {bulk} queued bulk jobs | {} ms (target ≤ 200 ms) | rule priority 0: {} ms |",
        figures[0], figures[1]
    );
}

/// Part 2 on a moto of its own: parked, then in place.
async fn polling(waiters: usize, window: Duration) {
    let moto = Moto::start().await;
    let t = Instant::now();
    let mut ids = Vec::new();
    while ids.len() < waiters {
        let n = (waiters - ids.len()).min(500) as i32;
        ids.extend(moto.launch(n, &[("Bench", "herd")]).await);
    }
    println!(
        "\n  launched {} instances in moto in {:.1}s",
        ids.len(),
        t.elapsed().as_secs_f64()
    );
    shared_polling(&moto, &ids, window, "").await;
    shared_polling(&moto, &ids, window, "max_waiting = 0\n").await;
}

/// Part 9: `waits` instances waited on (jobs of 100 instances each, checks held at
/// `initializing`) in a region whose fleet is `fleet` instances: DescribeInstanceStatus calls per
/// round, against ⌈fleet/1000⌉ + 1 (the fleet listed page by page, the proxy paging as EC2 does at
/// the call's `MaxResults`; moto itself does not page) and ⌈waits/100⌉ by id.
async fn fleet_polling(fleet: usize, waits: usize, window: Duration) {
    let moto = Moto::start().await;
    let t = Instant::now();
    let mut ids = Vec::new();
    while ids.len() < fleet {
        let n = (fleet - ids.len()).min(500) as i32;
        ids.extend(moto.launch(n, &[("Bench", "fleet")]).await);
    }
    println!(
        "\nFleet polling: {waits} waits in a fleet of {fleet} (launched in moto in {:.1}s)",
        t.elapsed().as_secs_f64()
    );
    let proxy = FaultProxy::start(&moto.url, 9).await;
    proxy.set(|f| {
        f.instance_status = Some((
            "initializing".into(),
            Instant::now() + Duration::from_secs(3600),
        ))
    });
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = bench_daemon_with(tmp.path(), &proxy.url, DEFAULT_WORKERS, "").await;
    let specs: Vec<Value> = ids[..waits]
        .chunks(100)
        .map(|chunk| {
            json!({"action": "start_instances", "targets": {"instance_ids": chunk},
                "wait": {"interval": "1s", "timeout": "2h"}})
        })
        .collect();
    let t = Instant::now();
    let jobs = submit_all(&d, &specs).await;
    all_waiting(&d, waits, Duration::from_secs(1800)).await;
    println!(
        "  {} jobs, all {waits} waits begun {:.1}s after the first submission",
        jobs.len(),
        t.elapsed().as_secs_f64()
    );
    let (rounds, calls, per_round) = status_rounds(&d, &proxy, window).await;
    let target = fleet.div_ceil(1000) + 1;
    println!(
        "  over {:.0}s: {rounds:.0} rounds, {calls} DescribeInstanceStatus calls = {per_round:.1} per round \
         (target <= {target}: {}; by id {}), RSS {:.0} MiB",
        window.as_secs_f64(),
        if per_round <= target as f64 { "met" } else { "MISSED" },
        waits.div_ceil(100),
        d.rss_kib() as f64 / 1024.0
    );
    println!(
        "| DescribeInstanceStatus calls per round, {waits} waits in a fleet of {fleet} | {per_round:.1} ({rounds:.0} rounds) | ⌈{fleet}/1000⌉ + 1 = {target}; by id ⌈{waits}/100⌉ = {} |",
        waits.div_ceil(100)
    );
    proxy.set(|f| f.instance_status = None);
    for id in &jobs {
        let j = d.wait_final(id, Duration::from_secs(1800)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes
    }
    let waiters = env_num("BENCH_WAITERS", 1000) as usize;
    let window = Duration::from_secs(env_num("BENCH_WINDOW_SECS", 10));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let only_core = only == "core";
    rt.block_on(async {
        if only == "polling" {
            return polling(waiters, window).await;
        }
        if only == "fleet" {
            let fleet = env_num("BENCH_FLEET", 12_000) as usize;
            let waits = env_num("BENCH_FLEET_WAITS", 10_000) as usize;
            let window = Duration::from_secs(env_num("BENCH_FLEET_WINDOW_SECS", 120));
            return fleet_polling(fleet, waits.min(fleet), window).await;
        }
        if only == "realistic" {
            let moto = Moto::start().await;
            return realistic_starts(&moto, env_num("BENCH_REALISTIC", 1000) as usize).await;
        }
        if only == "snapshots" {
            let moto = Moto::start().await;
            return snapshot_waits(&moto, env_num("BENCH_SNAPSHOTS", 1000) as usize).await;
        }
        if only == "coalesce" {
            let moto = Moto::start().await;
            return coalesced_calls(&moto, env_num("BENCH_COALESCE", 500) as usize).await;
        }
        if only == "writes" {
            let moto = Moto::start().await;
            return writes_per_job(&moto).await;
        }
        let moto = Moto::start().await;
        parked_waits(
            &moto,
            env_num("BENCH_PARKED", 200) as usize,
            env_num("BENCH_IN_PLACE", 64) as usize,
        )
        .await;
        if only == "parked" {
            return;
        }
        let moto = Moto::start().await;
        sns_priority(&moto, env_num("BENCH_BULK", 300) as usize).await;
        let moto = Moto::start().await;
        coalesced_calls(&moto, env_num("BENCH_COALESCE", 500) as usize).await;
        let moto = Moto::start().await;
        snapshot_waits(&moto, env_num("BENCH_SNAPSHOTS", 1000) as usize).await;
        let moto = Moto::start().await;
        realistic_starts(&moto, env_num("BENCH_REALISTIC", 1000) as usize).await;
        let moto = Moto::start().await;
        writes_per_job(&moto).await;
        if only_core {
            return;
        }
        let moto = Moto::start().await;
        calls_per_action(&moto).await;
        polling(waiters, window).await;
    });
}

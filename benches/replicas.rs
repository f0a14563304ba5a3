//! PostgreSQL replicas benchmark (issue 15), against the throwaway server `scripts/bench` starts
//! (`scripts/ensure-postgres`: fsync and synchronous_commit off, so the figures are the queue's
//! own cost, compared with a baseline on the same server):
//!
//! 1. Ingest: HTTP submissions per second at BENCH_CONNS (64) connections through one replica
//!    and through three (the connections spread over them; `queue.workers = 0`), beside raw
//!    single-row INSERT commits of the same row from as many clients, each on its own connection
//!    (pgbench-style; one client's figure too).
//! 2. Claim + complete: two replicas' stores with 4 workers each claim and finish BENCH_JOBS
//!    (20,000) jobs, beside raw SQL doing the same two single-row UPDATE commits per job from as
//!    many clients (8; one client's figure too); and through the daemon's own runner on each
//!    replica (2 × 4 and 2 × 16 workers, one claim for all idle workers, an executor that
//!    succeeds at once) beside raw from as many clients as workers.
//! 3. Status polling: BENCH_WAITERS (1,000) one-instance start jobs waiting for status_ok, their
//!    checks held at `initializing` by the proxy, spread over three replicas: DescribeInstanceStatus
//!    calls per round for the whole cluster (target ⌈N/100⌉ = 10), and how the waits are spread.
//!
//! Settings: BENCH_SECS (5), BENCH_CONNS (64), BENCH_JOBS (20000), BENCH_WAITERS (1000),
//! BENCH_WINDOW_SECS (10); BENCH_ONLY=ingest|claim|polling runs one part. Needs TEST_POSTGRES_URL.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "shared/queue_run.rs"]
mod queue_run;

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::{Daemon, Moto};
use ec2jobd_spec::SystemClock;
use ec2jobd_store::{PgOptions, PgStore, Store};
use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, Executor};

const SPEC: &str = r#"{"action":"describe_instances","targets":{"tags":{"AutoOn":"yes"}}}"#;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// A new database on the test server, migrated.
async fn database() -> String {
    let url =
        common::postgres_database().expect("TEST_POSTGRES_URL (scripts/bench starts a server)");
    let pool = ec2jobd_store::postgres::connect(&url, 1)
        .await
        .expect("connect");
    ec2jobd_store::postgres::migrate(&pool)
        .await
        .expect("migrate");
    url
}

/// One plain connection for a raw baseline (no pool, no store).
async fn raw_connection(url: &str) -> sqlx::PgConnection {
    PgConnectOptions::from_str(url)
        .expect("url")
        .connect()
        .await
        .expect("connect")
}

/// Single-row INSERT commits of a job row, each client on a connection of its own sending one
/// after the other: commits per second, all clients together.
async fn raw_inserts(url: &str, secs: u64, clients: usize) -> f64 {
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.to_string();
            tokio::spawn(async move {
                let mut conn = raw_connection(&url).await;
                let mut n: u64 = 0;
                while start.elapsed() < Duration::from_secs(secs) {
                    let now = chrono::Utc::now().timestamp_millis();
                    sqlx::query(
                        "INSERT INTO jobs (id, state, action, spec, created_at, updated_at, max_attempts, \
                         run_after, timeout_ms) VALUES ($1, 'queued', 'describe_instances', $2, $3, $3, 5, $3, 3600000)",
                    )
                    .bind(format!("{c:06}{n:020}"))
                    .bind(SPEC)
                    .bind(now)
                    .execute(&mut conn)
                    .await
                    .expect("insert");
                    n += 1;
                }
                let _ = conn.close().await;
                n
            })
        })
        .collect();
    let mut n = 0;
    for t in tasks {
        n += t.await.expect("client");
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// `replicas` daemons on one new database; submissions for `secs` over `conns` connections spread
/// over them. Returns (submits/s, p99, errors).
async fn http_ingest(replicas: usize, secs: u64, conns: usize) -> (f64, Duration, u64) {
    let url = database().await;
    let dirs: Vec<_> = (0..replicas)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut ds: Vec<Daemon> = Vec::new();
    for dir in &dirs {
        if let Some(first) = ds.first() {
            std::fs::write(dir.path().join("admin.token"), &first.admin).expect("token file");
        }
        ds.push(
            common::bench_daemon_on(
                dir.path(),
                "http://127.0.0.1:9",
                0,
                "max_queued = 0\n",
                &url,
            )
            .await,
        );
    }
    let targets: Vec<(String, String)> = ds
        .iter()
        .map(|d| (format!("{}/v1/jobs", d.url), d.admin.clone()))
        .collect();
    let (all, errors, elapsed) = common::submit_load(&targets, SPEC, secs, conns).await;
    let rate = all.len() as f64 / elapsed;
    let p99 = all
        .get((all.len() as f64 * 0.99) as usize)
        .copied()
        .unwrap_or_default();
    (rate, p99, errors)
}

async fn ingest() {
    let secs = env_num("BENCH_SECS", 5);
    let conns = env_num("BENCH_CONNS", 64) as usize;
    let raw_one = raw_inserts(&database().await, secs, 1).await;
    let raw = raw_inserts(&database().await, secs, conns).await;
    println!("\nIngest on PostgreSQL, {conns} connections, {secs} s per run; raw single-row INSERT commits {raw:.0}/s from {conns} clients ({raw_one:.0}/s from one)");
    for replicas in [1, 3] {
        let (rate, p99, errors) = http_ingest(replicas, secs, conns).await;
        println!(
            "  through {replicas} replica(s): {rate:.0} submits/s ({:.0}% of raw), p99 {:.1} ms, {errors} errors",
            100.0 * rate / raw,
            p99.as_secs_f64() * 1e3
        );
        println!(
            "| HTTP ingest on PostgreSQL through {replicas} replica(s), {conns} connections | {rate:.0} submits/s ({:.0}% of raw; p99 {:.1} ms, {errors} errors) | raw single-row INSERT commits from {conns} clients {raw:.0}/s (one client: {raw_one:.0}/s) |",
            100.0 * rate / raw,
            p99.as_secs_f64() * 1e3
        );
    }
}

async fn claim() {
    let jobs = env_num("BENCH_JOBS", 20_000);
    let url = database().await;
    let open = || async {
        Arc::new(
            PgStore::open(
                PgOptions {
                    url: url.clone(),
                    max_connections: 8,
                    poll_only: true,
                    watch_interval: Duration::from_secs(1),
                },
                Arc::new(SystemClock),
            )
            .await
            .expect("open"),
        )
    };
    let stores: [Arc<dyn Store>; 2] = [open().await, open().await];
    let (done, rate) = queue_run::claim_complete_rate(&stores, jobs, 8).await;
    let raw = raw_claim_complete(&database().await, jobs.min(20_000), 8).await;
    let raw_one = raw_claim_complete(&database().await, jobs.min(20_000), 1).await;
    println!("\nClaim + complete on PostgreSQL: {done} jobs, {rate:.0} jobs/s (2 replicas x 4 workers); raw {raw:.0} jobs/s from 8 clients ({raw_one:.0} from one)");
    println!(
        "| claim + complete on PostgreSQL, store API (2 replicas x 4 workers, one job per claim) | {rate:.0} jobs/s ({:.0}% of raw) | raw: 2 single-row UPDATE commits/job from 8 clients, {raw:.0} jobs/s (one client: {raw_one:.0}/s) |",
        100.0 * rate / raw
    );
    // The daemon's own path: one runner per replica, its claimer claiming for all idle workers.
    for per in [4usize, 16] {
        let clients = per as u64 * 2;
        let (done, rate) = queue_run::runner_rate(&stores, jobs, per).await;
        let raw = raw_claim_complete(&database().await, jobs.min(20_000), clients).await;
        println!("Claim + complete on PostgreSQL through the runner: {done} jobs, {rate:.0} jobs/s (2 replicas x {per} workers); raw {raw:.0} jobs/s from {clients} clients");
        println!(
            "| claim + complete on PostgreSQL, the daemon's runner (2 replicas x {per} workers) | {rate:.0} jobs/s ({:.0}% of raw) | raw: 2 single-row UPDATE commits/job from {clients} clients, {raw:.0} jobs/s |",
            100.0 * rate / raw
        );
    }
}

/// Claim and finish as two single-row UPDATE commits per job, `clients` connections each working
/// through their share of the jobs one after the other.
async fn raw_claim_complete(url: &str, jobs: u64, clients: u64) -> f64 {
    let mut conn = raw_connection(url).await;
    conn.execute("BEGIN").await.expect("begin");
    for n in 0..jobs {
        sqlx::query(
            "INSERT INTO jobs (id, state, action, spec, created_at, updated_at, max_attempts, \
             run_after, timeout_ms) VALUES ($1, 'queued', 'describe_instances', '{}', 0, 0, 3, 0, 60000)",
        )
        .bind(format!("{n:026}"))
        .execute(&mut conn)
        .await
        .expect("insert");
    }
    conn.execute("COMMIT").await.expect("commit");
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let url = url.to_string();
            tokio::spawn(async move {
                let mut conn = raw_connection(&url).await;
                for n in (c..jobs).step_by(clients as usize) {
                    let id = format!("{n:026}");
                    sqlx::query(
                        "UPDATE jobs SET state = 'running', lease_owner = 'w', lease_expires_at = 1, \
                         attempts = attempts + 1 WHERE id = $1",
                    )
                    .bind(&id)
                    .execute(&mut conn)
                    .await
                    .expect("claim");
                    sqlx::query(
                        "UPDATE jobs SET state = 'succeeded', lease_owner = NULL, results = '{}' WHERE id = $1",
                    )
                    .bind(&id)
                    .execute(&mut conn)
                    .await
                    .expect("finish");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client");
    }
    jobs as f64 / start.elapsed().as_secs_f64()
}

/// Jobs parked in each daemon now.
async fn parked(ds: &[Daemon]) -> Vec<u64> {
    let mut per = Vec::new();
    for d in ds {
        per.push(d.metric("ec2jobd_jobs_parked").await as u64);
    }
    per
}

/// Status rounds all daemons have polled so far.
async fn rounds(ds: &[Daemon]) -> f64 {
    let mut n = 0.0;
    for d in ds {
        n += d.metric("ec2jobd_status_rounds_total").await;
    }
    n
}

async fn polling() {
    let waiters = env_num("BENCH_WAITERS", 1000) as usize;
    let window = Duration::from_secs(env_num("BENCH_WINDOW_SECS", 10));
    let moto = Moto::start().await;
    let mut ids = Vec::new();
    while ids.len() < waiters {
        let n = (waiters - ids.len()).min(500) as i32;
        ids.extend(moto.launch(n, &[("Bench", "replicas")]).await);
    }
    let proxy = FaultProxy::start(&moto.url, 3).await;
    proxy.set(|f| {
        f.instance_status = Some((
            "initializing".into(),
            Instant::now() + Duration::from_secs(3600),
        ))
    });
    let url = database().await;
    let dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut ds: Vec<Daemon> = Vec::new();
    for dir in &dirs {
        if let Some(first) = ds.first() {
            std::fs::write(dir.path().join("admin.token"), &first.admin).expect("token file");
        }
        ds.push(common::bench_daemon_on(dir.path(), &proxy.url, 32, "", &url).await);
    }
    println!("\nStatus polling across 3 replicas: {waiters} jobs, each waiting for status_ok on its own instance");
    let t = Instant::now();
    let mut jobs = Vec::new();
    for (n, chunk) in ids.chunks(50).enumerate() {
        let d = &ds[n % 3];
        let specs: Vec<_> = chunk
            .iter()
            .map(|iid| {
                json!({"action": "start_instances", "targets": {"instance_ids": [iid]},
                    "wait": {"interval": "1s", "timeout": "30m"}})
            })
            .collect();
        jobs.extend(futures::future::join_all(specs.iter().map(|s| d.submit(s))).await);
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let per = parked(&ds).await;
        if per.iter().sum::<u64>() >= waiters as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "not all jobs parked: {per:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let per = parked(&ds).await;
    println!(
        "  all {waiters} jobs parked {:.1}s after the first submission, per replica {per:?}",
        t.elapsed().as_secs_f64()
    );
    // Let the leader's rounds cover everyone's waits (it adopts them within a second).
    let mut covered = false;
    for _ in 0..100 {
        if proxy.max_ids("DescribeInstanceStatus") >= 100.min(waiters) {
            covered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(covered, "rounds never asked about full chunks");
    let (r0, c0) = (rounds(&ds).await, proxy.calls("DescribeInstanceStatus"));
    // A measuring window, not a synchronisation: the figure is calls per round over it.
    tokio::time::sleep(window).await;
    let (r, c) = (
        rounds(&ds).await - r0,
        proxy.calls("DescribeInstanceStatus") - c0,
    );
    let per_round = c as f64 / r.max(1.0);
    let target = waiters.div_ceil(100);
    println!(
        "  over {:.0}s: {r:.0} rounds (all replicas), {c} DescribeInstanceStatus calls = {per_round:.1} per round (target ≤ {target}: {})",
        window.as_secs_f64(),
        if per_round <= target as f64 { "met" } else { "MISSED" }
    );
    let unshared: usize = per.iter().map(|n| (*n as usize).div_ceil(100)).sum();
    println!(
        "| DescribeInstanceStatus calls per round, {waiters} jobs parked across 3 replicas ({per:?}) | {per_round:.1} | ⌈{waiters}/100⌉ = {target}; each replica polling its own: {unshared} |"
    );
    proxy.set(|f| f.instance_status = None);
    for (n, id) in jobs.iter().enumerate() {
        let j = ds[n % 3].wait_final(id, Duration::from_secs(600)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes
    }
    if std::env::var("TEST_POSTGRES_URL").is_err() {
        println!("replicas: TEST_POSTGRES_URL is not set (scripts/bench starts a server); skipped");
        return;
    }
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        if only.is_empty() || only == "ingest" {
            ingest().await;
        }
        if only.is_empty() || only == "claim" {
            claim().await;
        }
        if only.is_empty() || only == "polling" {
            polling().await;
        }
    });
}

//! Daemon benchmark (issue 7): the figures of `scripts/bench` that are not ingest or EC2 call
//! counts, each beside the baseline it should be read against.
//!
//! 1. Store claim + complete throughput: jobs/s through the store's own API (8 workers claiming one
//!    job at a time, finishing it as succeeded), beside raw SQLite doing the same two single-row
//!    UPDATE commits per job through the C API; and through the daemon's own runner (8 and 32
//!    workers, one claim for all idle workers, an executor that succeeds at once) beside the same
//!    raw figure (BENCH_ONLY=claim runs only this).
//! 2. Submit → first EC2 call: p50/p99 from sending `POST /v1/jobs` to the job's first call arriving
//!    at our proxy in front of moto, one job at a time on an idle daemon; beside the 202 round trip
//!    of the same submissions.
//! 3. Daemon CPU time per job against moto (user + system, from /proc), beside moto's own CPU time
//!    for the same jobs.
//! 4. RSS idle (empty database) and with 100,000 finished jobs in the database.
//! 5. Start-up time to ready (`/readyz` answering 200), empty and with 100,000 / 1,000,000 jobs.
//! 6. `GET /v1/jobs` p50/p99 with 1,000,000 jobs in the table (newest page, a state filter, an
//!    action filter, a one-day window 15 days back, and 20 pages deep by cursor), beside the same
//!    queries over 1,000 jobs.
//!    Also every dashboard page (issue 16), p50/p99 at 1,000,000 jobs beside 1,000.
//! 7. Retention (issue 12): submission p50/p99 while the pruner deletes the ~97% of 1,000,000
//!    finished jobs that are older than a day, beside the same submissions on the same database
//!    with retention off; and how fast it prunes (BENCH_ONLY=prune runs only this,
//!    BENCH_ONLY=tables skips 1 and 7; BENCH_PRUNE_EXTRA adds `[retention]` keys, e.g. `batch = 500`, to compare settings).
//! 9. Backups (issue 33): submission p50/p99/max while the daemon backs the 1,000,000-job database
//!    up every second, beside backups off; one backup's time and size (BENCH_ONLY=backup).
//! 8. Schedules (issue 17): the daemon's CPU at rest with 10,000 schedules loaded (none due while
//!    measured), beside the same daemon with none; then 1,000 of them firing at the same instant
//!    twice: how late each firing's job was queued after its firing time, beside one schedule
//!    firing alone (BENCH_ONLY=schedules runs only this; BENCH_SCHEDULES sets the count).
//!
//! Rows are copies of a real finished job (spec, results and progress as the daemon wrote them),
//! with ids and times spread over 30 days. Settings: BENCH_JOBS (claim throughput, default 20000),
//! BENCH_ROWS (big table, default 1000000).
//! Lines starting with `| ` are the summary rows `scripts/bench` gathers into its one table.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "shared/queue_run.rs"]
mod queue_run;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::{bench_daemon, bench_daemon_with, cpu_time, Daemon, Moto};
use ec2jobd_spec::{Clock, SystemClock};
use ec2jobd_store::{SqliteOptions, SqliteStore, Store};
use serde_json::json;

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// One summary row: figure, value, baseline.
fn row(figure: &str, value: String, baseline: String) {
    println!("| {figure} | {value} | {baseline} |");
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

async fn claim_complete(jobs: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(
            SqliteOptions {
                url: format!("sqlite://{}", dir.path().join("claim.db").display()),
                ..Default::default()
            },
            Arc::new(SystemClock),
        )
        .await
        .expect("open store"),
    );
    let (done, rate) = queue_run::claim_complete_rate(std::slice::from_ref(&store), jobs, 8).await;
    let raw = raw_claim_complete(jobs.min(20_000));
    println!(
        "store claim+complete: {done} jobs, {rate:.0} jobs/s (8 workers); raw SQLite {raw:.0} jobs/s"
    );
    row(
        "store claim + complete (8 workers, NORMAL)",
        format!("{rate:.0} jobs/s"),
        format!("raw SQLite 2 UPDATE commits/job: {raw:.0} jobs/s"),
    );
    // The daemon's own path: its runner, one claim for all idle workers. SQLite has one writer,
    // so the raw baseline is the same at any concurrency.
    for workers in [8usize, 32] {
        let (done, rate) =
            queue_run::runner_rate(std::slice::from_ref(&store), jobs, workers).await;
        println!("runner claim+complete: {done} jobs, {rate:.0} jobs/s ({workers} workers)");
        row(
            &format!("claim + complete through the daemon's runner ({workers} workers, NORMAL)"),
            format!("{rate:.0} jobs/s ({:.0}% of raw)", 100.0 * rate / raw),
            format!("raw SQLite 2 UPDATE commits/job: {raw:.0} jobs/s"),
        );
    }
}

/// Claim and finish as two sequential single-row UPDATE commits per job through the C API.
fn raw_claim_complete(jobs: u64) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rusqlite::Connection::open(dir.path().join("raw.db")).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", "NORMAL")
        .expect("sync");
    conn.execute_batch(include_str!("../migrations/sqlite/20261122000001_init.sql"))
        .expect("schema");
    conn.execute_batch("BEGIN").expect("begin");
    for n in 0..jobs {
        conn.execute(
            "INSERT INTO jobs (id, state, action, spec, created_at, updated_at, max_attempts, \
             run_after, timeout_ms) VALUES (?1, 'queued', 'describe_instances', '{}', 0, 0, 3, 0, 60000)",
            [format!("{n:026}")],
        )
        .expect("insert");
    }
    conn.execute_batch("COMMIT").expect("commit");
    let start = Instant::now();
    for n in 0..jobs {
        let id = format!("{n:026}");
        conn.execute(
            "UPDATE jobs SET state = 'running', lease_owner = 'w', lease_expires_at = 1, \
             attempts = attempts + 1 WHERE id = ?1",
            [&id],
        )
        .expect("claim");
        conn.execute(
            "UPDATE jobs SET state = 'succeeded', lease_owner = NULL, results = '{}' WHERE id = ?1",
            [&id],
        )
        .expect("finish");
    }
    jobs as f64 / start.elapsed().as_secs_f64()
}

/// Submit → first EC2 call, CPU per job, RSS idle; returns a finished job's id (the row template).
async fn against_moto(moto: &Moto, dir: &Path) -> String {
    let proxy = FaultProxy::start(&moto.url, 1).await;
    let ids = moto.launch(4, &[("Bench", "cpu")]).await;
    let d = bench_daemon(dir, &proxy.url, 4).await;
    let rss_idle = d.rss_kib();
    let spec = json!({"action": "describe_instances", "targets": {"instance_ids": [ids[0]]}});
    // Warm up: connections, the SDK's first-call set-up.
    let warm = d.submit(&spec).await;
    d.wait_final(&warm, Duration::from_secs(30)).await;
    let (mut first, mut accepted) = (Vec::new(), Vec::new());
    let mut template = String::new();
    for _ in 0..200 {
        let t0 = Instant::now();
        let r = d.post_job(&d.admin, &spec).await;
        accepted.push(t0.elapsed());
        let v: serde_json::Value = r.json().await.expect("json");
        let id = v["id"].as_str().expect("id").to_string();
        let j = d.wait_final(&id, Duration::from_secs(30)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
        let call = proxy.first_call_after(t0).expect("a call was made");
        first.push(call - t0);
        template = id;
    }
    first.sort();
    accepted.sort();
    println!(
        "submit → first EC2 call over 200 sequential jobs: p50 {} p99 {}; 202 round trip p50 {} p99 {}",
        ms(pct(&first, 0.5)),
        ms(pct(&first, 0.99)),
        ms(pct(&accepted, 0.5)),
        ms(pct(&accepted, 0.99))
    );
    row(
        "submit → first EC2 call, p50 / p99",
        format!("{} / {}", ms(pct(&first, 0.5)), ms(pct(&first, 0.99))),
        format!(
            "202 round trip {} / {}",
            ms(pct(&accepted, 0.5)),
            ms(pct(&accepted, 0.99))
        ),
    );

    // CPU per job: 400 jobs in flight together, a mix of reads and writes.
    let n = 400;
    let (d0, m0) = (d.cpu_time(), cpu_time(moto.pid()));
    let mut jobs = Vec::new();
    for i in 0..n {
        let iid = &ids[i % ids.len()];
        let spec = match i % 3 {
            0 => json!({"action": "describe_instances", "targets": {"instance_ids": [iid]}}),
            1 => json!({"action": "create_tags", "targets": {"instance_ids": [iid]},
                        "params": {"tags": {"Bench": "cpu", "Round": i.to_string()}}}),
            _ => json!({"action": "start_instances", "targets": {"instance_ids": [iid]},
                        "wait": {"interval": "1s"}}),
        };
        jobs.push(d.submit(&spec).await);
    }
    for id in &jobs {
        let j = d.wait_final(id, Duration::from_secs(120)).await;
        assert_eq!(j["state"], "succeeded", "{j}");
    }
    let daemon_cpu = (d.cpu_time() - d0) / n as u32;
    let moto_cpu = (cpu_time(moto.pid()) - m0) / n as u32;
    println!(
        "CPU per job over {n} jobs: daemon {} (HTTP, store, SDK), moto {}",
        ms(daemon_cpu),
        ms(moto_cpu)
    );
    row(
        "daemon CPU time per job (against moto)",
        ms(daemon_cpu),
        format!("moto's CPU for the same job: {}", ms(moto_cpu)),
    );
    row(
        "RSS idle (empty database)",
        format!("{} MiB", rss_idle / 1024),
        "—".into(),
    );
    template
}

/// Copies the template job `rows` times with fresh ids spread over the last 30 days (one in
/// twenty failed), in one transaction with the daemon stopped.
fn fill(db: &Path, template: &str, rows: u64) {
    let conn = rusqlite::Connection::open(db).expect("open db");
    let (spec, results, progress): (String, String, String) = conn
        .query_row(
            "SELECT spec, results, progress FROM jobs WHERE id = ?1",
            [template],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("template row");
    let now = SystemClock.now_ms() as u64;
    let span = 30 * 24 * 3600 * 1000u64;
    conn.execute_batch("BEGIN").expect("begin");
    {
        let mut ins = conn
            .prepare(
                "INSERT INTO jobs (id, state, action, spec, created_at, updated_at, started_at, \
                 finished_at, attempts, max_attempts, run_after, timeout_ms, results, progress, \
                 outbox_done_at) \
                 VALUES (?1, ?2, 'describe_instances', ?3, ?4, ?4, ?4, ?4, 1, 3, ?4, 3600000, ?5, ?6, ?4)",
            )
            .expect("prepare");
        for i in 0..rows {
            let at = now - span + span * i / rows.max(1);
            let id = ulid::Ulid::from_parts(at, rand::random()).to_string();
            let state = if i % 20 == 0 { "failed" } else { "succeeded" };
            ins.execute(rusqlite::params![
                id, state, spec, at as i64, results, progress
            ])
            .expect("insert");
        }
    }
    conn.execute_batch("COMMIT").expect("commit");
}

/// Spawn → `/readyz` 200, and the daemon.
async fn start_timed(dir: &Path, endpoint: &str) -> (Duration, Daemon) {
    let t0 = Instant::now();
    let d = bench_daemon(dir, endpoint, 4).await;
    let http = reqwest::Client::new();
    loop {
        if let Ok(r) = http.get(format!("{}/readyz", d.url)).send().await {
            if r.status() == 200 {
                return (t0.elapsed(), d);
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Dashboard pages (issue 16) as a signed-in admin: p50 / p99 of each, measured at the client on
/// localhost (so an upper bound of the server's time), 20 rounds.
async fn page_latency(d: &Daemon) -> Vec<(&'static str, Duration, Duration)> {
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = http
        .post(format!("{}/ui/signin", d.url))
        .form(&[("token", d.admin.as_str())])
        .send()
        .await
        .expect("sign in");
    let cookie = r.headers()["set-cookie"]
        .to_str()
        .expect("cookie")
        .split(';')
        .next()
        .unwrap_or_default()
        .to_string();
    let (_, page) = d.get_json("/v1/jobs?state=failed&limit=1").await;
    let job = page["jobs"][0]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let pages: Vec<(&'static str, String)> = vec![
        ("overview", "/ui/".into()),
        ("overview (live part)", "/ui/overview".into()),
        ("jobs", "/ui/jobs".into()),
        ("jobs, failed", "/ui/jobs?state=failed".into()),
        ("jobs, last 24 h", "/ui/jobs?since=24".into()),
        ("search by job id", format!("/ui/jobs?q={job}")),
        ("search, a common target", "/ui/jobs?q=i-".into()),
        ("search, no match", "/ui/jobs?q=no-such-target".into()),
        ("job", format!("/ui/jobs/{job}")),
        ("templates", "/ui/templates".into()),
        ("SNS deliveries", "/ui/sns".into()),
        ("tokens", "/ui/tokens".into()),
    ];
    let mut out = Vec::new();
    for (name, path) in pages {
        let mut lat = Vec::new();
        for _ in 0..20 {
            let t = Instant::now();
            let r = http
                .get(format!("{}{path}", d.url))
                .header("cookie", &cookie)
                .send()
                .await
                .expect("page");
            let status = r.status();
            let _ = r.bytes().await;
            lat.push(t.elapsed());
            assert_eq!(status, 200, "{path}");
        }
        lat.sort();
        out.push((name, pct(&lat, 0.5), pct(&lat, 0.99)));
    }
    out
}

/// p50/p99 of the list queries.
async fn list_latency(d: &Daemon) -> (Duration, Duration) {
    let mut lat = Vec::new();
    for round in 0..50 {
        // A day's window in the middle of the 30 days.
        let day = chrono::Utc::now() - chrono::Duration::days(15);
        let window = format!(
            "since={}&until={}&limit=50",
            day.format("%Y-%m-%dT%H:%M:%SZ"),
            (day + chrono::Duration::days(1)).format("%Y-%m-%dT%H:%M:%SZ")
        );
        for q in [
            "limit=50",
            "state=failed&limit=50",
            "action=describe_instances&limit=50",
            window.as_str(),
        ] {
            let t = Instant::now();
            let (s, _) = d.get_json(&format!("/v1/jobs?{q}")).await;
            lat.push(t.elapsed());
            assert_eq!(s, 200, "{q}");
        }
        if round % 10 == 0 {
            // 20 pages deep by cursor.
            let mut cursor = String::new();
            for _ in 0..20 {
                let t = Instant::now();
                let (s, page) = d.get_json(&format!("/v1/jobs?limit=50{cursor}")).await;
                lat.push(t.elapsed());
                assert_eq!(s, 200);
                match page["next_cursor"].as_str() {
                    Some(c) => cursor = format!("&cursor={c}"),
                    None => break,
                }
            }
        }
    }
    lat.sort();
    (pct(&lat, 0.5), pct(&lat, 0.99))
}

async fn big_tables(moto: &Moto, template_dir: &Path, template: &str, big: u64) {
    let endpoint = moto.url.clone();
    // Fold the template daemon's WAL into the database file before copying it.
    rusqlite::Connection::open(template_dir.join("bench.db"))
        .and_then(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)"))
        .expect("checkpoint");
    let mut results = Vec::new();
    let mut dashboard = Vec::new();
    for rows in [1_000u64, 100_000, big] {
        let dir = tempfile::tempdir().expect("tempdir");
        // The template's database (schema, token, the template job), plus `rows` copies.
        for f in ["bench.db", "admin.token"] {
            std::fs::copy(template_dir.join(f), dir.path().join(f)).expect("copy");
        }
        let t = Instant::now();
        fill(&dir.path().join("bench.db"), template, rows);
        let filled = t.elapsed();
        let (startup, d) = start_timed(dir.path(), &endpoint).await;
        let (p50, p99) = list_latency(&d).await;
        let pages = page_latency(&d).await;
        for (name, p50, p99) in &pages {
            println!(
                "{rows:>9} jobs: dashboard {name}: p50 {} p99 {}",
                ms(*p50),
                ms(*p99)
            );
        }
        // A scrape counts jobs by state over the whole table.
        let t = Instant::now();
        let _ = d.metric("ec2jobd_jobs").await;
        let scrape = t.elapsed();
        let rss = d.rss_kib();
        println!(
            "{rows:>9} jobs: filled in {:.1} s; start-up to ready {}; list p50 {} p99 {}; /metrics {}; RSS {} MiB",
            filled.as_secs_f64(),
            ms(startup),
            ms(p50),
            ms(p99),
            ms(scrape),
            rss / 1024
        );
        results.push((rows, startup, p50, p99, rss));
        dashboard.push((rows, pages));
        drop(d);
    }
    let pages_of = |n: u64| dashboard.iter().find(|r| r.0 == n).map(|r| &r.1);
    if let (Some(small), Some(large)) = (pages_of(1_000), pages_of(big)) {
        for ((name, p50, p99), (_, s50, s99)) in large.iter().zip(small) {
            row(
                &format!("dashboard {name} p50 / p99, {big} jobs (target < 100 ms)"),
                format!("{} / {}", ms(*p50), ms(*p99)),
                format!("1,000 jobs: {} / {}", ms(*s50), ms(*s99)),
            );
        }
    }
    let get = |n: u64| results.iter().find(|r| r.0 == n).copied();
    if let (Some(small), Some(hundred), Some(large)) = (get(1_000), get(100_000), get(big)) {
        row(
            "RSS with 100,000 finished jobs in the database",
            format!("{} MiB", hundred.4 / 1024),
            format!("1,000 jobs: {} MiB", small.4 / 1024),
        );
        row(
            &format!("start-up to ready, 100,000 / {big} jobs"),
            format!("{} / {}", ms(hundred.1), ms(large.1)),
            format!("1,000 jobs: {}", ms(small.1)),
        );
        row(
            &format!("GET /v1/jobs p50 / p99, {big} jobs"),
            format!("{} / {}", ms(large.2), ms(large.3)),
            format!("1,000 jobs: {} / {}", ms(small.2), ms(small.3)),
        );
    }
}

/// p50/p99/slowest of `n` submissions from 8 concurrent clients.
async fn submit_latency(d: &Daemon, n: usize) -> (Duration, Duration, Duration) {
    let spec = json!({"action": "describe_instances", "allow_empty": true,
        "targets": {"tags": {"Bench": "none"}}});
    let lat = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (url, admin, spec, lat) = (d.url.clone(), d.admin.clone(), spec.clone(), lat.clone());
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for _ in 0..n / 8 {
                let t = Instant::now();
                let r = http
                    .post(format!("{url}/v1/jobs"))
                    .bearer_auth(&admin)
                    .json(&spec)
                    .send()
                    .await
                    .expect("submit");
                assert_eq!(r.status(), 202);
                lat.lock().unwrap().push(t.elapsed());
            }
        }));
    }
    for t in tasks {
        t.await.expect("client");
    }
    let mut lat = lat.lock().unwrap().clone();
    lat.sort();
    (pct(&lat, 0.5), pct(&lat, 0.99), pct(&lat, 1.0))
}

/// Submission latency while the pruner works through `rows` old finished jobs, beside the same
/// database with retention off.
async fn prune_under_load(moto: &Moto, template_dir: &Path, template: &str, rows: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["bench.db", "admin.token"] {
        std::fs::copy(template_dir.join(f), dir.path().join(f)).expect("copy");
    }
    fill(&dir.path().join("bench.db"), template, rows);
    let n = 2_000;
    let keep = "[retention]\njobs = \"0s\"\n";
    let d = bench_daemon_with(dir.path(), &moto.url, 4, keep).await;
    let (idle50, idle99, _) = submit_latency(&d, n).await;
    drop(d);
    let prune = format!(
        "[retention]\njobs = \"1d\"\ninterval = \"1h\"\n{}",
        std::env::var("BENCH_PRUNE_EXTRA").unwrap_or_default()
    );
    let t = Instant::now();
    let d = bench_daemon_with(dir.path(), &moto.url, 4, &prune).await;
    let (busy50, busy99, _) = submit_latency(&d, n).await;
    let during = d.metric("ec2jobd_pruned_total{what=\"jobs\"}").await;
    let mut pruned = during;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = d.metric("ec2jobd_pruned_total{what=\"jobs\"}").await;
        if now > 0.0 && now == pruned {
            break;
        }
        pruned = now;
    }
    let took = t.elapsed().as_secs_f64() - 0.5;
    println!(
        "pruning {rows} jobs: {pruned} deleted in {took:.1} s ({:.0}/s), {during} of them during {n} submissions; \
         submit p50/p99 {} / {} (retention off: {} / {})",
        pruned / took,
        ms(busy50),
        ms(busy99),
        ms(idle50),
        ms(idle99)
    );
    row(
        &format!("submit p50 / p99 while pruning {pruned} of {rows} finished jobs"),
        format!(
            "{} / {} ({:.2}× p99; {:.0} jobs pruned/s)",
            ms(busy50),
            ms(busy99),
            busy99.as_secs_f64() / idle99.as_secs_f64().max(1e-9),
            pruned / took
        ),
        format!("retention off: {} / {}", ms(idle50), ms(idle99)),
    );
}

/// Submission latency while the daemon backs a database of `rows` finished jobs up every second
/// (`[backup]`, issue 33), beside the same database with backups off; and how long one backup
/// (`ec2jobd backup`) of it takes.
async fn backup_under_load(moto: &Moto, template_dir: &Path, template: &str, rows: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    for f in ["bench.db", "admin.token"] {
        std::fs::copy(template_dir.join(f), dir.path().join(f)).expect("copy");
    }
    fill(&dir.path().join("bench.db"), template, rows);
    // Enough submissions that several backups begin and end while they go on.
    let n = 8_000;
    let d = bench_daemon_with(dir.path(), &moto.url, 4, "").await;
    let (idle50, idle99, idle_max) = submit_latency(&d, n).await;
    drop(d);
    let out = dir.path().join("backups");
    let every = format!(
        "[backup]\ninterval = \"1s\"\ndir = \"{}\"\nkeep = 2\n",
        out.display()
    );
    let d = bench_daemon_with(dir.path(), &moto.url, 4, &every).await;
    let (busy50, busy99, busy_max) = submit_latency(&d, n).await;
    let taken = d.metric("ec2jobd_backups_total{outcome=\"ok\"}").await;
    drop(d);
    let one = dir.path().join("one.db");
    let t = Instant::now();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ec2jobd"))
        .args(["backup", "--config"])
        .arg(dir.path().join("bench.toml"))
        .arg("--to")
        .arg(&one)
        .output()
        .expect("ec2jobd backup");
    let took = t.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mib = std::fs::metadata(&one).map(|m| m.len()).unwrap_or(0) as f64 / 1048576.0;
    println!(
        "backups of {rows} jobs every second: {taken} finished during {n} submissions; submit p50/p99/max \
         {} / {} / {} (backups off: {} / {} / {}); one backup {:.1} s, {mib:.0} MiB",
        ms(busy50),
        ms(busy99),
        ms(busy_max),
        ms(idle50),
        ms(idle99),
        ms(idle_max),
        took.as_secs_f64()
    );
    row(
        &format!("submit p50 / p99 / max while backing up {rows} jobs every second"),
        format!(
            "{} / {} / {} ({taken} backups finished meanwhile; one takes {:.1} s, {mib:.0} MiB)",
            ms(busy50),
            ms(busy99),
            ms(busy_max),
            took.as_secs_f64()
        ),
        format!(
            "backups off: {} / {} / {}",
            ms(idle50),
            ms(idle99),
            ms(idle_max)
        ),
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes
    }
    let jobs = env_num("BENCH_JOBS", 20_000);
    let big = env_num("BENCH_ROWS", 1_000_000);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        println!("\nec2jobd daemon figures");
        let only = std::env::var("BENCH_ONLY").unwrap_or_default();
        let only_prune = only == "prune";
        if only == "schedules" {
            let moto = Moto::start().await;
            schedules_load(&moto).await;
            return;
        }
        if !only_prune && only != "tables" {
            claim_complete(jobs).await;
        }
        if only == "claim" {
            return;
        }
        let moto = Moto::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let template = against_moto(&moto, dir.path()).await;
        if only_prune {
            prune_under_load(&moto, dir.path(), &template, big).await;
            return;
        }
        if only == "backup" {
            backup_under_load(&moto, dir.path(), &template, big).await;
            return;
        }
        big_tables(&moto, dir.path(), &template, big).await;
        if only == "tables" {
            return;
        }
        prune_under_load(&moto, dir.path(), &template, big).await;
        backup_under_load(&moto, dir.path(), &template, big).await;
        schedules_load(&moto).await;
    });
}

/// The daemon's CPU use over `secs` seconds, as a share of one core.
async fn cpu_share(d: &Daemon, secs: u64) -> f64 {
    let c0 = d.cpu_time();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    (d.cpu_time() - c0).as_secs_f64() / t0.elapsed().as_secs_f64()
}

/// Saves schedules `(name, body)`, 32 at a time; returns how long it took.
async fn put_schedules(d: &Daemon, all: Vec<(String, serde_json::Value)>) -> Duration {
    use futures::StreamExt;
    let t0 = Instant::now();
    futures::stream::iter(all)
        .for_each_concurrent(32, |(name, body)| async move {
            let r = d
                .req(
                    reqwest::Method::PUT,
                    &format!("/v1/schedules/{name}"),
                    &d.admin,
                )
                .json(&body)
                .send()
                .await
                .expect("put schedule");
            assert!(r.status().is_success(), "{name}: {}", r.status());
        })
        .await;
    t0.elapsed()
}

/// How late each job of the schedules `names` was queued after its firing time, over the jobs
/// whose firing time is at or after `from`; sorted.
async fn lateness(
    d: &Daemon,
    names: &[String],
    from: chrono::DateTime<chrono::Utc>,
) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (_, page) = d
            .get_json(&format!(
                "/v1/jobs?limit=500&action=describe_instances{cursor}"
            ))
            .await;
        for j in page["jobs"].as_array().into_iter().flatten() {
            let Some(name) = j["schedule"].as_str() else {
                continue;
            };
            if !names.iter().any(|n| n == name) {
                continue;
            }
            let at: chrono::DateTime<chrono::Utc> =
                j["fired_at"].as_str().unwrap().parse().unwrap();
            let made: chrono::DateTime<chrono::Utc> =
                j["created_at"].as_str().unwrap().parse().unwrap();
            if at >= from {
                out.push((made - at).to_std().unwrap_or_default());
            }
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => break,
        }
    }
    out.sort();
    out
}

async fn schedules_load(moto: &Moto) {
    use chrono::Timelike;
    let n = env_num("BENCH_SCHEDULES", 10_000) as usize;
    let burst = (n / 10).max(1);
    let dir = tempfile::tempdir().expect("tempdir");
    // No workers: the firings' jobs stay queued, so what is measured is the firing alone.
    let d = bench_daemon(dir.path(), &moto.url, 0).await;
    let job = json!({"action": "describe_instances", "targets": {"tags": {"Bench": "none"}}, "allow_empty": true});
    let idle_none = cpu_share(&d, 30).await;

    // One schedule alone, every 5 seconds: the baseline lateness.
    let from = chrono::Utc::now() + chrono::Duration::seconds(1);
    let alone = vec!["alone".to_string()];
    put_schedules(
        &d,
        vec![(
            "alone".into(),
            json!({"cron": "*/5 * * * * *", "overlap": "queue", "job": job}),
        )],
    )
    .await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    let one = lateness(&d, &alone, from).await;
    let r = d
        .req(reqwest::Method::DELETE, "/v1/schedules/alone", &d.admin)
        .send()
        .await
        .expect("delete");
    assert!(r.status().is_success());

    // n daily schedules at minutes spread over the hours 8 to 13 hours from now (none due while
    // measured).
    let now = chrono::Utc::now();
    let all: Vec<(String, serde_json::Value)> = (0..n)
        .map(|i| {
            let hour = (now.hour() as usize + 8 + i % 6) % 24;
            (
                format!("s{i}"),
                json!({"cron": format!("{} {hour} * * *", i % 60), "job": job}),
            )
        })
        .collect();
    let load = put_schedules(&d, all).await;
    tokio::time::sleep(Duration::from_secs(10)).await; // the ticker's last reload after the PUTs
    let idle_loaded = cpu_share(&d, 60).await;
    let rss = d.rss_kib();

    // `burst` of them replaced by one firing every 20 s, all at the same instants.
    let names: Vec<String> = (0..burst).map(|i| format!("s{i}")).collect();
    let firing: Vec<(String, serde_json::Value)> = names
        .iter()
        .map(|n| {
            (
                n.clone(),
                json!({"cron": "*/20 * * * * *", "overlap": "queue", "job": job}),
            )
        })
        .collect();
    put_schedules(&d, firing).await;
    let from = chrono::Utc::now() + chrono::Duration::seconds(2);
    tokio::time::sleep(Duration::from_secs(45)).await;
    let late = lateness(&d, &names, from).await;
    let worst = late.last().copied().unwrap_or_default();
    println!(
        "schedules: {n} loaded in {:.1} s; CPU at rest {:.2}% of a core ({:.2}% with none); RSS {} MiB; {} firings of {burst} at once: late p50 {} p99 {} max {} (one alone: p50 {} max {})",
        load.as_secs_f64(),
        idle_loaded * 100.0,
        idle_none * 100.0,
        rss / 1024,
        late.len(),
        ms(pct(&late, 0.5)),
        ms(pct(&late, 0.99)),
        ms(worst),
        ms(pct(&one, 0.5)),
        ms(one.last().copied().unwrap_or_default()),
    );
    row(
        &format!("daemon CPU at rest with {n} schedules loaded (60 s, none due; target < 1%)"),
        format!("{:.2}% of a core", idle_loaded * 100.0),
        format!("no schedules: {:.2}%", idle_none * 100.0),
    );
    row(
        &format!("firing → job queued, {burst} schedules firing at the same instant ({} firings; target ≤ 1 s each)", late.len()),
        format!("p50 {} / p99 {} / max {}", ms(pct(&late, 0.5)), ms(pct(&late, 0.99)), ms(worst)),
        format!("one schedule alone: p50 {} / max {}", ms(pct(&one, 0.5)), ms(one.last().copied().unwrap_or_default())),
    );
}

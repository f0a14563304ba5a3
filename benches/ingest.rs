//! Ingest benchmark: HTTP job submissions per second and their latency at 64 connections, beside a
//! raw SQLite baseline (single-row insert commits per second, same schema and pragmas, no HTTP),
//! for `synchronous = NORMAL` and `FULL`. Run with `scripts/bench`; prints a table.
//!
//! The daemon runs with `queue.workers = 0` so the figure is ingest alone (every accepted job is
//! durably queued before its 202). Settings: BENCH_SECS (default 5), BENCH_CONNS (default 64).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SPEC: &str = r#"{"action":"describe_instances","targets":{"tags":{"AutoOn":"yes"}}}"#;
const MIGRATION: &str = include_str!("../migrations/sqlite/20261122000001_init.sql");

fn env_num(k: &str, d: u64) -> u64 {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Sequential single-row INSERT commits through the C API (rusqlite), the ceiling one connection
/// without batching can reach.
fn raw_baseline(sync: &str, secs: u64) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let conn = rusqlite::Connection::open(dir.path().join("raw.db")).expect("open");
    conn.pragma_update(None, "journal_mode", "WAL")
        .expect("wal");
    conn.pragma_update(None, "synchronous", sync).expect("sync");
    conn.execute_batch(MIGRATION).expect("schema");
    let mut stmt = conn
        .prepare(
            "INSERT INTO jobs (id, state, action, spec, created_at, updated_at, max_attempts, \
             run_after, timeout_ms) VALUES (?1, 'queued', 'describe_instances', ?2, ?3, ?3, 5, ?3, 3600000)",
        )
        .expect("prepare");
    let start = Instant::now();
    let mut n: u64 = 0;
    while start.elapsed() < Duration::from_secs(secs) {
        let now = chrono::Utc::now().timestamp_millis();
        stmt.execute(rusqlite::params![format!("{n:026}"), SPEC, now])
            .expect("insert");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

struct Http {
    rate: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

async fn http_ingest(sync: &str, secs: u64, conns: usize) -> Http {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("bench.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:0\"\ndatabase = \"sqlite://{}\"\n[queue]\nworkers = 0\nmax_queued = 0\n[sqlite]\nsynchronous = \"{sync}\"\n[log]\nlevel = \"warn\"\n",
            dir.path().join("bench.db").display()
        ),
    )
    .expect("config");
    let bin = env!("CARGO_BIN_EXE_ec2jobd");
    let cfg_s = cfg.to_str().expect("utf-8 path");
    let out = Command::new(bin)
        .args([
            "token", "create", "--role", "operator", "--name", "bench", "--config", cfg_s,
        ])
        .output()
        .expect("token");
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut child = Command::new(bin)
        .args(["serve", "--config", cfg_s])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("serve");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("listening line");
    let url = format!(
        "{}/v1/jobs",
        line.trim().trim_start_matches("ec2jobd listening on ")
    );
    let (all, errors, elapsed) = common::submit_load(&[(url, token)], SPEC, secs, conns).await;
    let _ = child.kill();
    let _ = child.wait();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Http {
        rate: all.len() as f64 / elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        errors,
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` probes
    }
    let secs = env_num("BENCH_SECS", 5);
    let conns = env_num("BENCH_CONNS", 64) as usize;
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    println!(
        "ec2jobd ingest — {} cores, {}, {conns} connections, {secs} s per run",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model()
    );
    println!(
        "{:<8} {:>18} {:>16} {:>8} {:>9} {:>9} {:>7}",
        "sync", "raw commits/s", "http submits/s", "ratio", "p50 ms", "p99 ms", "errors"
    );
    let mut rows = Vec::new();
    for sync in ["normal", "full"] {
        let raw = raw_baseline(sync, secs);
        let h = rt.block_on(http_ingest(sync, secs, conns));
        println!(
            "{:<8} {:>18.0} {:>16.0} {:>7.0}% {:>9.2} {:>9.2} {:>7}",
            sync,
            raw,
            h.rate,
            100.0 * h.rate / raw,
            h.p50.as_secs_f64() * 1e3,
            h.p99.as_secs_f64() * 1e3,
            h.errors
        );
        println!(
            "| HTTP ingest, synchronous={}, {conns} connections | {:.0} submits/s (p99 {:.1} ms, {} errors) | raw SQLite commits {:.0}/s; target {} |",
            sync.to_uppercase(),
            h.rate,
            h.p99.as_secs_f64() * 1e3,
            h.errors,
            raw,
            if sync == "normal" { "≥ 25%" } else { "≥ 100%" }
        );
        rows.push((raw, h.rate));
    }
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!(
        "target: http(normal) >= 25% of raw(normal): {}; http(full) >= raw(full): {}",
        verdict(rows[0].1 >= 0.25 * rows[0].0),
        verdict(rows[1].1 >= rows[1].0)
    );
}

//! Periodic backups of the embedded database (`[backup]`): every `backup.interval` (first at start)
//! a consistent copy goes into `backup.dir` as `ec2jobd-<UTC time>.db`, and the oldest of those
//! beyond `backup.keep` are deleted. The copy itself is the store's ([`ec2jobd_store::backup`], the
//! same one `ec2jobd backup --to` takes); this file only names, schedules and rotates. Files in the
//! directory that are not named like ours are never touched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use ec2jobd_spec::Clock;
use tokio_util::sync::CancellationToken;

use crate::config::BackupSection;
use crate::leader::Leading;
use crate::metrics::Metrics;

const PREFIX: &str = "ec2jobd-";
const SUFFIX: &str = ".db";
const STAMP: &str = "%Y%m%dT%H%M%SZ";

/// The name of the backup begun at `at`.
pub fn file_name(at: DateTime<Utc>) -> String {
    format!("{PREFIX}{}{SUFFIX}", at.format(STAMP))
}

/// `name` is a backup this task wrote.
fn ours(name: &str) -> bool {
    name.strip_prefix(PREFIX)
        .and_then(|n| n.strip_suffix(SUFFIX))
        .is_some_and(|stamp| NaiveDateTime::parse_from_str(stamp, STAMP).is_ok())
}

/// Deletes the oldest of our backups in `dir` beyond the newest `keep`; returns what went.
pub fn rotate(dir: &Path, keep: usize) -> std::io::Result<Vec<PathBuf>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| ours(n))
        .collect();
    // The stamp sorts as the time does.
    names.sort();
    let excess = names.len().saturating_sub(keep);
    let mut gone = Vec::with_capacity(excess);
    for n in names.into_iter().take(excess) {
        let p = dir.join(n);
        std::fs::remove_file(&p)?;
        gone.push(p);
    }
    Ok(gone)
}

/// One backup of `database` into `cfg.dir`, then the rotation.
pub async fn once(
    database: &str,
    cfg: &BackupSection,
    clock: &dyn Clock,
) -> anyhow::Result<ec2jobd_store::Backup> {
    let dir = PathBuf::from(&cfg.dir);
    create_private_dir(&dir)?;
    let at = DateTime::from_timestamp_millis(clock.now_ms()).unwrap_or_default();
    let made = ec2jobd_store::backup(database, &dir.join(file_name(at))).await?;
    let gone = rotate(&dir, cfg.keep as usize)?;
    if !gone.is_empty() {
        tracing::debug!(deleted = gone.len(), "older backups rotated out");
    }
    Ok(made)
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut b, 0o700);
    b.create(dir)
}

/// Backs up every `cfg.interval` while this process is `leading` (with SQLite, the one daemon),
/// until `shutdown`. Does nothing when the interval is 0.
pub async fn run(
    database: String,
    cfg: BackupSection,
    clock: Arc<dyn Clock>,
    metrics: Arc<Metrics>,
    leading: Leading,
    shutdown: CancellationToken,
) {
    if cfg.interval.0.is_zero() {
        return;
    }
    loop {
        if leading.now() {
            let began = clock.now_ms();
            let pass = tokio::select! {
                r = once(&database, &cfg, clock.as_ref()) => r,
                _ = shutdown.cancelled() => return,
            };
            match pass {
                Ok(b) => {
                    metrics.backed_up(true, began / 1000);
                    tracing::info!(path = %b.path.display(), bytes = b.bytes, "database backed up");
                }
                Err(e) => {
                    metrics.backed_up(false, began / 1000);
                    tracing::warn!(error = %format!("{e:#}"), "database backup failed; trying again next interval");
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.interval.0.max(Duration::from_secs(1))) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ec2jobd_spec::ManualClock;

    #[test]
    fn only_our_names_are_ours() {
        let at = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        assert_eq!(file_name(at), "ec2jobd-20270115T080000Z.db");
        assert!(ours(&file_name(at)));
        for other in [
            "ec2jobd.db",
            "ec2jobd-latest.db",
            "ec2jobd-20270115T080000Z.db.partial",
            ".ec2jobd-20270115T080000Z.db.partial",
            "mine-20270115T080000Z.db",
        ] {
            assert!(!ours(other), "{other}");
        }
    }

    /// Backups on an injected clock a second apart: the newest `keep` stay, an operator's own
    /// file in the directory is left alone, and each kept one is a whole database.
    #[tokio::test]
    async fn the_newest_keep_backups_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let db = format!("sqlite://{}", tmp.path().join("q.db").display());
        let clock = Arc::new(ManualClock::new(1_800_000_000_000));
        let store = ec2jobd_store::SqliteStore::open(
            ec2jobd_store::SqliteOptions {
                url: db.clone(),
                ..Default::default()
            },
            clock.clone(),
        )
        .await
        .unwrap();
        let dir = tmp.path().join("backups");
        let cfg = BackupSection {
            interval: crate::config::Dur(Duration::from_secs(1)),
            dir: dir.display().to_string(),
            keep: 2,
        };
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("operator-copy.db"), b"kept").unwrap();
        for _ in 0..4 {
            once(&db, &cfg, clock.as_ref()).await.unwrap();
            clock.advance(1000);
        }
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ec2jobd-20270115T080002Z.db",
                "ec2jobd-20270115T080003Z.db",
                "operator-copy.db"
            ]
        );
        for n in &names[..2] {
            ec2jobd_store::check_backup(&dir.join(n)).await.unwrap();
        }
        drop(store);
    }
}

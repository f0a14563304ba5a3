//! Backups of the embedded database and their restore: what `ec2jobd backup`, `ec2jobd restore`
//! and the daemon's `[backup]` task call. SQLite only: PostgreSQL is backed up with its own tools
//! (`pg_dump`, README "Backups and restore").
//!
//! A backup is `VACUUM INTO` a private temporary file beside the destination, fsynced, then renamed:
//! one read transaction on a connection of its own, so in WAL mode the writer (submissions, job
//! state) goes on while it runs, and the copy holds exactly what was committed when it began. A
//! backup that fails or is interrupted leaves no file under the destination's name.
//!
//! Who may touch the file: every process that opens the store ([`super::SqliteStore::open`]: the
//! daemon, token and prune commands) holds a *shared* lock on `<database>.lock` while it runs;
//! a restore takes it *exclusively*, so it refuses while any of them runs and they refuse to start
//! while a restore replaces the file. This module must not know config or HTTP.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection};

use super::{create_private, file_of, MIGRATOR};
use crate::{Result, StoreError};

/// A backup written.
#[derive(Debug, Clone)]
pub struct Backup {
    /// Where it is.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
}

/// What a backup file holds, checked without changing it.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Migrations applied to it.
    pub applied: usize,
    /// Jobs in it.
    pub jobs: i64,
}

/// A restore done.
#[derive(Debug, Clone)]
pub struct Restored {
    /// What the backup held.
    pub checked: Checked,
    /// Migrations applied to bring it up to this build's schema.
    pub migrated: usize,
    /// Where the database it replaced was moved (with its `-wal`/`-shm`), if there was one.
    pub replaced: Option<PathBuf>,
}

fn unavailable(what: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(what.to_string())
}

fn options(url: &str) -> Result<SqliteConnectOptions> {
    SqliteConnectOptions::from_str(url)
        .map_err(|e| unavailable(format!("database url `{url}`: {e}")))
}

/// The database file a URL names, which must exist.
fn existing_file(url: &str) -> Result<(SqliteConnectOptions, PathBuf)> {
    let opts = options(url)?.create_if_missing(false);
    let Some(file) = file_of(&opts).map(Path::to_path_buf) else {
        return Err(unavailable(format!(
            "`{url}` is not a database file (backups are for a sqlite://PATH database)"
        )));
    };
    Ok((opts, file))
}

/// `path` with `suffix` appended to its file name (`ec2jobd.db` + `.lock`).
fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Writes a consistent copy of the database `url` names to `dest`, which must not exist.
pub async fn backup(url: &str, dest: &Path) -> Result<Backup> {
    let (opts, file) = existing_file(url)?;
    if !file.exists() {
        return Err(unavailable(format!("no database at `{}`", file.display())));
    }
    if dest.exists() {
        return Err(StoreError::Conflict(format!(
            "`{}` exists; a backup never overwrites a file",
            dest.display()
        )));
    }
    let name = dest
        .file_name()
        .ok_or_else(|| unavailable(format!("`{}` names no file", dest.display())))?;
    let tmp = dest.with_file_name(format!(".{}.partial", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    create_private(&tmp)?;
    let written = async {
        let mut conn = opts.connect().await?;
        sqlx::query("VACUUM INTO ?")
            .bind(tmp.to_string_lossy().into_owned())
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        durable_rename(&tmp, dest).await
    }
    .await;
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    Ok(Backup {
        path: dest.to_path_buf(),
        bytes,
    })
}

/// fsyncs `from`, renames it to `to` and fsyncs the directory, so the new name survives a power
/// loss with the whole content behind it.
async fn durable_rename(from: &Path, to: &Path) -> Result<()> {
    let (src, dst) = (from.to_path_buf(), to.to_path_buf());
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        File::open(&src)?.sync_all()?;
        std::fs::rename(&src, &dst)?;
        if let Some(dir) = dst.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    })
    .await
    .map_err(unavailable)?
    .map_err(|e| unavailable(format!("writing `{}`: {e}", to.display())))
}

/// Checks a backup file without changing it: SQLite's `integrity_check`, and that its schema is
/// one this build knows (a backup of a newer ec2jobd is refused: its rows may mean what this one
/// cannot read).
pub async fn check_backup(path: &Path) -> Result<Checked> {
    if !path.is_file() {
        return Err(unavailable(format!(
            "no backup file at `{}`",
            path.display()
        )));
    }
    let opts = SqliteConnectOptions::new()
        .filename(path)
        .read_only(true)
        .immutable(true);
    let not_ours = |e: sqlx::Error| {
        unavailable(format!(
            "`{}` is not an ec2jobd database: {e}",
            path.display()
        ))
    };
    let mut conn = opts.connect().await.map_err(not_ours)?;
    let verdict: Vec<String> = sqlx::query_scalar("PRAGMA integrity_check")
        .fetch_all(&mut conn)
        .await
        .map_err(not_ours)?;
    if verdict != ["ok"] {
        return Err(StoreError::Corrupt(format!(
            "`{}` fails SQLite's integrity check: {}",
            path.display(),
            verdict.join("; ")
        )));
    }
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
            .fetch_all(&mut conn)
            .await
            .map_err(not_ours)?;
    let unknown: Vec<String> = versions
        .iter()
        .filter(|v| !MIGRATOR.iter().any(|m| m.version == **v))
        .map(i64::to_string)
        .collect();
    if !unknown.is_empty() {
        return Err(StoreError::Conflict(format!(
            "`{}` was written by a newer ec2jobd (schema migration(s) {} unknown to this one): \
             restore it with that version or a later one",
            path.display(),
            unknown.join(", ")
        )));
    }
    let jobs: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs")
        .fetch_one(&mut conn)
        .await
        .map_err(not_ours)?;
    conn.close().await?;
    Ok(Checked {
        applied: versions.len(),
        jobs,
    })
}

/// A lock on `<database>.lock`: shared while a process uses the database, exclusive while a
/// restore replaces it. Released when dropped (or when the process dies).
#[derive(Debug)]
pub struct FileLock(#[allow(dead_code)] File);

impl FileLock {
    /// Takes the lock beside `db` without waiting: `Ok(None)` when another process holds it in a
    /// conflicting mode.
    pub(super) fn take(db: &Path, exclusive: bool) -> Result<Option<FileLock>> {
        let path = with_suffix(db, ".lock");
        create_private(&path)?;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| unavailable(format!("opening `{}`: {e}", path.display())))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            let mode = if exclusive {
                libc::LOCK_EX
            } else {
                libc::LOCK_SH
            };
            // SAFETY: flock on a descriptor this function owns; no memory is shared.
            if unsafe { libc::flock(f.as_raw_fd(), mode | libc::LOCK_NB) } != 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    return Ok(None);
                }
                return Err(unavailable(format!("locking `{}`: {e}", path.display())));
            }
        }
        Ok(Some(FileLock(f)))
    }

    /// The shared lock of a process that opens the database `file`; an error naming the restore
    /// when one is replacing it.
    pub(super) fn using(file: &Path) -> Result<FileLock> {
        Self::take(file, false)?.ok_or_else(|| {
            unavailable(format!(
                "`{}` is being replaced by `ec2jobd restore`; start again when it has finished",
                file.display()
            ))
        })
    }
}

/// The event of every unfinished job a restore brings back.
pub const RESTORED: &str = "restored from a backup: it may have run on after the backup was \
    taken, so it looks for what it made before making anything";

/// Replaces the database `url` names with the backup `from`: checks it ([`check_backup`]), refuses
/// while any process has the database open, copies it beside the database, applies this build's
/// migrations to the copy, marks its unfinished jobs as possibly run on ([`RESTORED`]), moves the current database (with its `-wal` and `-shm`) aside as
/// `<database>.replaced-<UTC time>` and renames the copy into place. Nothing is changed when a step
/// before the last rename fails.
pub async fn restore(
    url: &str,
    from: &Path,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Restored> {
    let (_, db) = existing_file(url)?;
    let checked = check_backup(from).await?;
    let Some(_lock) = FileLock::take(&db, true)? else {
        return Err(StoreError::Conflict(format!(
            "a process has `{}` open (the daemon, or a token or prune command): stop it first, \
             e.g. `systemctl stop ec2jobd`",
            db.display()
        )));
    };
    let tmp = with_suffix(&db, ".restoring");
    let sidecars = |p: &Path| [with_suffix(p, "-wal"), with_suffix(p, "-shm")];
    for f in std::iter::once(tmp.clone()).chain(sidecars(&tmp)) {
        let _ = std::fs::remove_file(f);
    }
    create_private(&tmp)?;
    let copy = {
        let (from, tmp) = (from.to_path_buf(), tmp.clone());
        tokio::task::spawn_blocking(move || std::fs::copy(&from, &tmp))
            .await
            .map_err(unavailable)?
    };
    copy.map_err(|e| unavailable(format!("copying `{}`: {e}", from.display())))?;
    let migrated = async {
        let opts = SqliteConnectOptions::new()
            .filename(&tmp)
            .journal_mode(SqliteJournalMode::Wal)
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| unavailable(format!("migrating the restored copy: {e}")))?;
        // What the backup holds as queued or running may have run on after it was taken: each
        // such job counts a possible attempt (without using up its retries), so whoever claims it
        // next resumes it and looks for what it made before making anything.
        let mut tx = pool.begin().await?;
        sqlx::query(
            "INSERT INTO job_events (job_id, at, kind, message, data) \
             SELECT id, ?1, 'restored', ?2, 'null' FROM jobs WHERE state IN ('queued', 'running')",
        )
        .bind(now.timestamp_millis())
        .bind(RESTORED)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE jobs SET attempts = attempts + 1, max_attempts = max_attempts + 1 \
             WHERE state IN ('queued', 'running')",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        let now_applied: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE success")
                .fetch_one(&pool)
                .await?;
        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
            .execute(&pool)
            .await?;
        pool.close().await;
        Ok::<_, StoreError>(
            usize::try_from(now_applied)
                .unwrap_or(0)
                .saturating_sub(checked.applied),
        )
    }
    .await;
    let migrated = match migrated {
        Ok(n) => n,
        Err(e) => {
            for f in std::iter::once(tmp.clone()).chain(sidecars(&tmp)) {
                let _ = std::fs::remove_file(f);
            }
            return Err(e);
        }
    };
    let mut replaced = None;
    if db.exists() {
        let aside = with_suffix(&db, &format!(".replaced-{}", now.format("%Y%m%dT%H%M%SZ")));
        std::fs::rename(&db, &aside)
            .map_err(|e| unavailable(format!("moving `{}` aside: {e}", db.display())))?;
        for (side, to) in sidecars(&db).into_iter().zip(sidecars(&aside)) {
            if side.exists() {
                std::fs::rename(&side, &to)
                    .map_err(|e| unavailable(format!("moving `{}` aside: {e}", side.display())))?;
            }
        }
        replaced = Some(aside);
    }
    for f in sidecars(&tmp) {
        let _ = std::fs::remove_file(f);
    }
    durable_rename(&tmp, &db).await?;
    Ok(Restored {
        checked,
        migrated,
        replaced,
    })
}

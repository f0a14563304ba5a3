//! Wake-up hints between replicas: LISTEN/NOTIFY on one channel. A replica that queues a job (or
//! returns a parked one) sends a hint inside the same transaction, so it is delivered at commit and
//! never for a rolled-back write (several in one transaction arrive once); every replica listens on
//! a dedicated connection and wakes its workers (debounced: at once, then at most every few
//! milliseconds during a burst). Hints only make claims prompt: polling stays the
//! correctness path, so a lost connection (hints sent meanwhile are lost) is re-made with backoff
//! and counted as a hint itself, and with `poll_only` (PgBouncer in transaction pooling, which
//! cannot hold a LISTEN) nobody listens at all.
//! The same connection hears a second channel: a replica that gives a leader lease up on a graceful
//! stop says so ([`LEASES_CHANNEL`]), so another replica asks for it at once instead of at its next
//! renewal (a third of the lease's time to live later).
//! Must not: decide what a woken worker does.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgConnection;
use tokio::sync::Notify;

use crate::Result;

/// The channel job hints go on.
pub const JOBS_CHANNEL: &str = "ec2jobd_jobs";

/// The channel a freed leader lease is announced on (payload: the lease's name).
pub const LEASES_CHANNEL: &str = "ec2jobd_leases";

/// Sends a job hint from inside the transaction on `conn`.
pub async fn hint(conn: &mut PgConnection) -> Result<()> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(JOBS_CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// At most one wake-up per this long, however many hints arrive (one for each queued job).
const DEBOUNCE: Duration = Duration::from_millis(5);

/// Listens for job hints on a connection of its own to `url` and wakes `wake` for them (at once
/// for the first, then at most once per [`DEBOUNCE`] for those that follow), and once whenever the
/// connection had to be made again; and `freed` (one stored permit) when a leader lease was given
/// up, or hints may have been missed. Runs until aborted.
pub fn listen(url: String, wake: Arc<Notify>, freed: Arc<Notify>) -> tokio::task::JoinHandle<()> {
    let heard = Arc::new(Notify::new());
    let hear = heard.clone();
    let listener = async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let mut listener = match connect(&url).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for job hints; polling meanwhile");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Hints sent while there was no listener are lost: look once.
            hear.notify_one();
            freed.notify_one();
            loop {
                match listener.try_recv().await {
                    Ok(Some(n)) if n.channel() == LEASES_CHANNEL => freed.notify_one(),
                    Ok(Some(_)) => hear.notify_one(),
                    // The connection dropped and was made again: hints may have been missed.
                    Ok(None) => {
                        hear.notify_one();
                        freed.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "job hint connection lost; reconnecting");
                        break;
                    }
                }
            }
        }
    };
    // Hints heard meanwhile leave one stored permit: the next wake-up follows the pause.
    let debounce = async move {
        loop {
            heard.notified().await;
            wake.notify_waiters();
            tokio::time::sleep(DEBOUNCE).await;
        }
    };
    tokio::spawn(async move {
        tokio::join!(listener, debounce);
    })
}

async fn connect(url: &str) -> Result<PgListener> {
    let mut l = PgListener::connect(url).await?;
    l.listen_all([JOBS_CHANNEL, LEASES_CHANNEL]).await?;
    Ok(l)
}

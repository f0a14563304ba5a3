//! Leadership of periodic maintenance: what must run once per queue, not once per daemon
//! (publishing the notification outbox, retention pruning, polling EC2 for every replica's waits
//! (`ec2jobd_exec::share`), firing schedules), runs only in the replica holding the store's
//! `maintenance` lease. Every replica keeps asking (renewing every
//! third of the lease's time to live); when the leader dies its lease runs out and another takes
//! over; a graceful stop gives it up at once and the store tells the others
//! (`Leadership::lease_freed`), so one of them leads within moments, not at its next renewal. A
//! leader leads only while its lease is known held ([`Fence`]): cut off from its database, it stops
//! before another replica can take over. With SQLite the one daemon always leads. Reaping expired
//! job leases is not here: any replica may do it (the store's update is idempotent).
//! Must not: do the maintenance itself.

use std::sync::Arc;
use std::time::Duration;

use ec2jobd_exec::fence::Fence;
use ec2jobd_store::Store;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// The lease's name in the store.
pub const MAINTENANCE: &str = "maintenance";

/// Whether this process leads now; maintenance loops look before each round.
#[derive(Clone)]
pub struct Leading(watch::Receiver<bool>, Arc<Fence>);

impl Leading {
    /// True while this process holds the lease *and* knows it: a leader whose renewals go
    /// unanswered (its database cut off) stops leading when its [`Fence`] lapses, before another
    /// replica can take the lease, not when a renewal finally fails.
    pub fn now(&self) -> bool {
        *self.0.borrow() && self.1.valid()
    }
}

/// Asks for the lease once now (so a single daemon leads from its first moment), then keeps
/// asking until `shutdown`, when it gives the lease up.
pub async fn start(
    store: Arc<dyn Store>,
    ttl: Duration,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Leading {
    let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX).max(1);
    let fence = Arc::new(Fence::new());
    let ask = {
        let (store, fence) = (store.clone(), fence.clone());
        move || {
            let (store, fence) = (store.clone(), fence.clone());
            async move {
                let sent = tokio::time::Instant::now();
                match store.lead(MAINTENANCE, ttl_ms).await {
                    Ok(true) => {
                        fence.renewed(sent, ttl);
                        true
                    }
                    Ok(false) => {
                        fence.lost();
                        false
                    }
                    Err(e) => {
                        // Unproven is not held: another replica may have it by now.
                        tracing::warn!(error = %e, "cannot renew the maintenance lease");
                        fence.lost();
                        false
                    }
                }
            }
        }
    };
    let first = ask().await;
    metrics.set_leader(first);
    let (tx, rx) = watch::channel(first);
    // The gauge follows the fence: a leader cut off from its database says 0 once its fence
    // lapses (it has stopped leading then), not when a renewal finally fails.
    {
        let (fence, metrics, mut asked) = (fence.clone(), metrics.clone(), rx.clone());
        tokio::spawn(async move {
            loop {
                fence.lapsed().await;
                metrics.set_leader(false);
                if fence.settled().await {
                    metrics.set_leader(*asked.borrow());
                } else if asked.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    let freed = store.lease_freed();
    let held = fence.clone();
    tokio::spawn(async move {
        loop {
            let given_up = async {
                match &freed {
                    Some(n) => n.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(ttl / 3) => {}
                _ = given_up => {}
                _ = shutdown.cancelled() => break,
            }
            let now = ask().await;
            if now != *tx.borrow() {
                tracing::info!(leading = now, "maintenance leadership changed");
            }
            metrics.set_leader(now);
            let _ = tx.send(now);
        }
        held.lost();
        let _ = tx.send(false);
        metrics.set_leader(false);
        if let Err(e) = store.resign(MAINTENANCE).await {
            tracing::warn!(error = %e, "could not give the maintenance lease up");
        }
    });
    Leading(rx, fence)
}

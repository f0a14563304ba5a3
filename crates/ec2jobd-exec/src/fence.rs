//! Self-fencing: until when a lease this process holds (a job's, a parking lot's, the maintenance
//! leader's) is *known* to be valid, by this process's own monotonic clock. A renewal sent at `t`
//! for `ttl` makes the database hold the lease until at least `t + ttl` by its clock (it sets the
//! expiry after receiving the request), so the lease is ours until `t + ttl`, less a margin for the
//! two clocks' rates and for a call already on its way when the time comes. Whoever acts under the
//! lease stops acting once the fence has lapsed, whether or not it has heard that the lease is lost:
//! a process cut off from its database stops before another can take its work over.
//! Must not: renew anything itself, or know the store.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The share of a lease's time to live kept as margin (a quarter).
const MARGIN_DIVISOR: u32 = 4;

/// Until when a lease is known to be held; not held until first renewed.
#[derive(Debug, Default)]
pub struct Fence {
    until: Mutex<Option<Instant>>,
    changed: tokio::sync::Notify,
}

impl Fence {
    /// A fence not held yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A renewal (or the claim) sent at `sent` for `ttl` succeeded.
    pub fn renewed(&self, sent: Instant, ttl: Duration) {
        let until = sent + ttl - ttl / MARGIN_DIVISOR;
        let mut u = self.until.lock().unwrap_or_else(|p| p.into_inner());
        // Answers may arrive out of order: a later renewal never shortens the fence.
        *u = Some(u.map_or(until, |old| old.max(until)));
        drop(u);
        self.changed.notify_waiters();
    }

    /// The lease is known lost (refused, or given up).
    pub fn lost(&self) {
        *self.until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.changed.notify_waiters();
    }

    /// Resolves once the lease is known held again (`true`) or known lost (`false`).
    pub async fn settled(&self) -> bool {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.until() {
                None => return false,
                Some(u) if Instant::now() < u => return true,
                Some(_) => changed.await,
            }
        }
    }

    fn until(&self) -> Option<Instant> {
        *self.until.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The lease is known held now.
    pub fn valid(&self) -> bool {
        self.until().is_some_and(|u| Instant::now() < u)
    }

    /// Resolves once the lease is no longer known held (at once if it is not).
    pub async fn lapsed(&self) {
        loop {
            match self.until() {
                Some(u) if Instant::now() < u => tokio::time::sleep_until(u).await,
                _ => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A lease renewed for 8 s is held for 6 s after the renewal was sent; renewals move it on,
    /// a late answer to an older renewal does not pull it back, and `lapsed` wakes when it ends.
    #[tokio::test(start_paused = true)]
    async fn a_fence_lapses_a_margin_before_the_lease() {
        let f = Fence::new();
        assert!(!f.valid());
        let t0 = Instant::now();
        let ttl = Duration::from_secs(8);
        f.renewed(t0, ttl);
        assert!(f.valid());
        tokio::time::advance(Duration::from_secs(5)).await;
        f.renewed(t0 + Duration::from_secs(4), ttl);
        f.renewed(t0, ttl);
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(f.valid(), "renewed at 4 s: held until 10 s");
        let woke = tokio::spawn(async move {
            f.lapsed().await;
            Instant::now()
        });
        let at = woke.await.unwrap();
        assert_eq!(at - t0, Duration::from_secs(10));
        let g = std::sync::Arc::new(Fence::new());
        g.renewed(Instant::now(), ttl);
        tokio::time::advance(Duration::from_secs(7)).await;
        assert!(!g.valid());
        let back = tokio::spawn({
            let g = g.clone();
            async move { g.settled().await }
        });
        tokio::task::yield_now().await;
        g.renewed(Instant::now(), ttl);
        assert!(back.await.unwrap(), "renewed: held again");
        g.lost();
        assert!(!g.valid());
        assert!(!g.settled().await, "lost");
    }
}

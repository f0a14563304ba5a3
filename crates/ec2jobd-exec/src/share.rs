//! Status polling for a cluster: replicas on one PostgreSQL queue share their status rounds
//! through the store ([`Cluster`]), so a round costs ⌈N/100⌉ DescribeInstanceStatus calls (and
//! ⌈N/200⌉ DescribeSnapshots/DescribeImages) for every wait of every replica together.
//!
//! The replica that leads maintenance polls. Its [`ClusterRounds::adopt`] loop reads what the
//! others wait on and registers it with its own watchers like any local wait, so their rounds ask
//! about everyone's ids, and each round is published ([`RoundShare::publish`]). The others' watchers
//! record what they wait on and take the published rounds instead of calling EC2
//! ([`RoundShare::follow`]). When the leader dies, the next one polls from its first round on; a
//! follower's wait sees no new round meanwhile (at most `postgres.leader_ttl`).
//! Must not: judge waits (the parking lot does) or call EC2 itself (the watchers do).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use ec2jobd_ec2::{parse_scope, Ec2Pool, Registration, RoundShare, SharedRound, Wants, Watched};
use ec2jobd_spec::Clock;
use ec2jobd_store::Cluster;
use tokio_util::sync::CancellationToken;

/// How often the polling replica looks for what the others wait on.
const ADOPT_EVERY: Duration = Duration::from_secs(1);

/// Rounds shared through the store; see the module doc.
pub struct ClusterRounds {
    cluster: Arc<dyn Cluster>,
    pool: Arc<Ec2Pool>,
    polls: Arc<dyn Fn() -> bool + Send + Sync>,
    clock: Arc<dyn Clock>,
}

impl ClusterRounds {
    /// Rounds shared through `cluster`; this process polls while `polls()` holds.
    pub fn new(
        cluster: Arc<dyn Cluster>,
        pool: Arc<Ec2Pool>,
        polls: Arc<dyn Fn() -> bool + Send + Sync>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cluster,
            pool,
            polls,
            clock,
        })
    }

    /// While this process polls, keeps what the other processes wait on registered with its
    /// watchers (updated every [`ADOPT_EVERY`]); drops it all when it stops polling. Until `stop`.
    pub async fn adopt(self: Arc<Self>, stop: CancellationToken) {
        let mut held: HashMap<String, (Wants, Vec<Registration>)> = HashMap::new();
        loop {
            if (self.polls)() {
                match self.cluster.wants(self.clock.now_ms()).await {
                    Ok(rows) => self.register(&mut held, rows).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot read what other replicas wait on")
                    }
                }
            } else {
                held.clear();
            }
            tokio::select! {
                _ = tokio::time::sleep(ADOPT_EVERY) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    async fn register(
        &self,
        held: &mut HashMap<String, (Wants, Vec<Registration>)>,
        rows: Vec<(String, String, serde_json::Value)>,
    ) {
        let mut by_scope: HashMap<String, Wants> = HashMap::new();
        for (scope, _node, w) in rows {
            let Ok(w) = serde_json::from_value::<Wants>(w) else {
                continue;
            };
            let all = by_scope.entry(scope).or_default();
            all.instances.extend(w.instances);
            all.snapshots.extend(w.snapshots);
            all.images.extend(w.images);
            all.interval_ms = match all.interval_ms {
                0 => w.interval_ms,
                n => n.min(w.interval_ms),
            };
        }
        for w in by_scope.values_mut() {
            for ids in [&mut w.instances, &mut w.snapshots, &mut w.images] {
                ids.sort();
                ids.dedup();
            }
        }
        held.retain(|scope, _| by_scope.contains_key(scope));
        for (scope, wants) in by_scope {
            if held.get(&scope).is_some_and(|(w, _)| *w == wants) {
                continue;
            }
            let Some((account, region)) = parse_scope(&scope) else {
                continue;
            };
            let watcher = match self.pool.watcher(&account, &region).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(%account, %region, error = %e, "cannot poll for another replica's waits");
                    continue;
                }
            };
            let interval = Duration::from_millis(wants.interval_ms.max(100));
            let regs = [
                (Watched::Instances, &wants.instances),
                (Watched::Snapshots, &wants.snapshots),
                (Watched::Images, &wants.images),
            ]
            .into_iter()
            .filter(|(_, ids)| !ids.is_empty())
            .map(|(kind, ids)| watcher.register_kind(kind, ids, interval))
            .collect();
            // The new registrations are in before the old ones go: the watcher never stops between.
            held.insert(scope, (wants, regs));
        }
    }
}

#[async_trait]
impl RoundShare for ClusterRounds {
    fn polls(&self) -> bool {
        (self.polls)()
    }

    fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    async fn follow(&self, scope: &str, wants: &Wants) -> Result<Option<SharedRound>, String> {
        // Renewed every round; kept a few rounds longer so a slow round does not drop it.
        let keep = 3 * wants.interval_ms as i64 + 5_000;
        let body = serde_json::to_value(wants).map_err(|e| e.to_string())?;
        self.cluster
            .put_wants(scope, body, self.clock.now_ms() + keep)
            .await
            .map_err(|e| e.to_string())?;
        let round = self.cluster.round(scope).await.map_err(|e| e.to_string())?;
        Ok(round.and_then(|r| serde_json::from_value(r).ok()))
    }

    async fn publish(&self, scope: &str, round: &SharedRound) -> Result<(), String> {
        let body = serde_json::to_value(round).map_err(|e| e.to_string())?;
        self.cluster
            .put_round(scope, body)
            .await
            .map_err(|e| e.to_string())
    }
}

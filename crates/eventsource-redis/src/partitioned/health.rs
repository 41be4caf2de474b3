//! The health of a partitioned bus: every partition's, and the ownership loop's.

use std::collections::BTreeSet;

use super::PartitionedEventBus;
use crate::bus::lock;
use crate::{Health, HealthStatus};

impl PartitionedEventBus {
    /// Healthy when it consumes, every partition's Redis answers and accepts writes, no
    /// partition it holds is paused or stuck, and its membership heartbeat gets through;
    /// degraded when Redis answers but it does not consume; unhealthy otherwise, with the
    /// partition and the reason in `error`. Pending entries and dead letters are summed over
    /// the partitions. Holding no partition is healthy (more consumers than partitions).
    pub async fn health_check(&self) -> Health {
        let consuming = self.is_consuming();
        let owned: BTreeSet<u32> = self.owned_partitions().into_iter().collect();
        let mut health = Health {
            status: HealthStatus::Healthy,
            connected: true,
            consuming,
            pending_messages: 0,
            dlq_messages: 0,
            error: None,
            warnings: Vec::new(),
        };
        // Every partition's health at once (on a cluster they live on different masters).
        let mut checks = tokio::task::JoinSet::new();
        for (i, part) in (0u32..).zip(self.partitions()) {
            let part = part.clone();
            checks.spawn(async move { (i, part.health_check().await) });
        }
        let mut all = Vec::with_capacity(self.partitions().len());
        while let Some(checked) = checks.join_next().await {
            if let Ok(checked) = checked {
                all.push(checked);
            }
        }
        all.sort_by_key(|(i, _)| *i);
        if all.len() < self.partitions().len() {
            health.error = Some("a partition's health check panicked".into());
        }
        for (i, h) in all {
            let part = self.partition(i);
            health.pending_messages += h.pending_messages;
            health.dlq_messages += h.dlq_messages;
            health.connected &= h.connected;
            for warning in h.warnings {
                if !health.warnings.contains(&warning) {
                    health.warnings.push(warning);
                }
            }
            // A partition not held here is never consuming: only its Redis counts.
            if h.status == HealthStatus::Unhealthy && health.error.is_none() {
                let held = if owned.contains(&i) {
                    ", held here"
                } else {
                    ""
                };
                health.error = Some(format!(
                    "partition {i} ({}{held}): {}",
                    part.stream_name(),
                    h.error.unwrap_or_else(|| "unhealthy".into())
                ));
            }
        }
        let ownership = lock(&self.inner.control.problem).clone();
        if consuming && health.error.is_none() {
            health.error = ownership;
        }
        health.status = if health.error.is_some() || !health.connected {
            HealthStatus::Unhealthy
        } else if consuming {
            HealthStatus::Healthy
        } else {
            HealthStatus::Degraded
        };
        health
    }
}

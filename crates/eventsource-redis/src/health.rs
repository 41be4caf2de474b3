//! Health for probes: the verdict (`healthy`, `degraded`, `unhealthy`), the server's own risks
//! read from `INFO`, and the checks the Redis user may not run.

use serde::Serialize;

use crate::bus::RedisEventBus;

/// The verdict of a [`Health`] check; serialised (and displayed) as the tutorial's
/// `"healthy"`, `"degraded"`, `"unhealthy"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum HealthStatus {
    /// Redis answers and the consumer runs without a problem.
    Healthy,
    /// Redis answers, but nothing consumes (a publisher, or a stopped consumer).
    Degraded,
    /// Redis cannot be reached or refuses writes, or the consumer is paused or stuck on a
    /// problem an operator must fix (`Health::error` says which).
    Unhealthy,
}

impl HealthStatus {
    /// `"healthy"`, `"degraded"` or `"unhealthy"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Degraded => "degraded",
            Self::Unhealthy => "unhealthy",
        }
    }
}

impl std::fmt::Display for HealthStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`RedisEventBus::health_check`] reports (the tutorial's "Health Check").
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct Health {
    /// Healthy (connected and consuming), degraded (connected, not consuming) or unhealthy.
    pub status: HealthStatus,
    /// Whether Redis answered.
    pub connected: bool,
    /// Whether the consume loop runs.
    pub consuming: bool,
    /// Pending entries of this group.
    pub pending_messages: u64,
    /// Dead letters waiting.
    pub dlq_messages: u64,
    /// The error, when unhealthy.
    pub error: Option<String>,
    /// What the server's configuration or state puts at risk although the bus works: an
    /// eviction policy that can evict streams (events, groups and pending lists would vanish
    /// under memory pressure). Empty when `INFO` is not allowed for this user.
    pub warnings: Vec<String>,
}

/// What `INFO memory` and `INFO persistence` say puts the bus at risk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct ServerRisks {
    /// Works now, may lose data later (an `allkeys-*` eviction policy).
    pub(crate) warnings: Vec<String>,
    /// Redis refuses writes now (the append-only file cannot be written).
    pub(crate) refusing_writes: Option<String>,
    /// A `volatile-*` eviction policy: keys with a time to live (a partitioned bus's leases)
    /// can be evicted under memory pressure.
    pub(crate) evicts_expiring_keys: Option<String>,
}

impl ServerRisks {
    /// Logs what puts `stream` at risk: warnings at warn level, refused writes at error
    /// level (the lease warning is a partitioned bus's to log).
    pub(crate) fn log(&self, stream: &str) {
        for warning in &self.warnings {
            tracing::warn!(stream = %stream, "{warning}");
        }
        if let Some(problem) = &self.refusing_writes {
            tracing::error!(stream = %stream, "{problem}");
        }
    }

    /// Reads the `INFO` text (any sections; unknown lines are ignored).
    pub(crate) fn from_info(text: &str) -> Self {
        let mut risks = Self::default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if let Some(policy) = field("maxmemory_policy")
            && policy.starts_with("allkeys-")
        {
            risks.warnings.push(format!(
                "Redis may evict streams: maxmemory-policy is {policy}, so under memory \
                 pressure it can delete this stream, its consumer groups and pending lists \
                 (events lost); set `maxmemory-policy noeviction` (publishes then fail with OOM \
                 instead) or a volatile-* policy"
            ));
        }
        if let Some(policy) = field("maxmemory_policy")
            && policy.starts_with("volatile-")
        {
            risks.evicts_expiring_keys = Some(format!(
                "Redis may evict partition leases: maxmemory-policy is {policy}, so under \
                 memory pressure it can delete a lease (it has a time to live) and another \
                 member take the partition while its owner still works on it; set \
                 `maxmemory-policy noeviction` for a partitioned bus"
            ));
        }
        // A failed AOF write makes a master refuse every write (MISCONF). A failed snapshot
        // does so only with `stop-writes-on-bgsave-error` and save points, which INFO does
        // not show: not reported.
        if field("aof_enabled") == Some("1") && field("aof_last_write_status") == Some("err") {
            risks.refusing_writes = Some(
                "Redis cannot write its append-only file (disk full or read-only?) and refuses \
                 every write with MISCONF until it can; free disk space where Redis keeps its \
                 AOF (`CONFIG GET dir`)"
                    .to_owned(),
            );
        }
        risks
    }
}

impl RedisEventBus {
    /// What the server's configuration or state puts at risk (`INFO memory` and
    /// `INFO persistence`). A user without `+info` gets no report: said once, and in the
    /// health's warnings.
    pub(crate) async fn server_risks(&self) -> ServerRisks {
        let Ok(mut conn) = self.commands().await else {
            return ServerRisks::default();
        };
        let mut info = redis::cmd("INFO");
        info.arg("memory").arg("persistence");
        // On a cluster: the master serving this stream (redis-rs would ask every node).
        let text: Result<String, redis::RedisError> =
            crate::conn::on_master_of(&mut conn, &self.inner.stream, info).await;
        match text {
            Ok(text) => ServerRisks::from_info(&text),
            Err(e) if crate::error::is_connection_error(&e) => ServerRisks::default(),
            Err(e) => {
                self.info_refused(&e);
                ServerRisks::default()
            }
        }
    }

    /// Health for liveness/readiness probes: `healthy` when Redis answers and the consumer
    /// runs without a problem, `degraded` when Redis answers but nothing consumes,
    /// `unhealthy` when Redis cannot be reached or refuses writes (a failing append-only
    /// file: `MISCONF`), the consumer is paused (see
    /// `pause_after_rejections`), or it is stuck on a problem an operator must fix (a missing
    /// ACL permission, a wrong password) — `error` then says what and what to do.
    pub async fn health_check(&self) -> Health {
        let info = self.stream_info().await;
        let risks = if info.connected {
            self.server_risks().await
        } else {
            ServerRisks::default()
        };
        let consuming = self.is_consuming();
        let paused = self.paused_reason();
        let problem = crate::bus::lock(&self.inner.control.problem).clone();
        let stuck = problem.as_ref().is_some_and(|p| !p.transient);
        let status = match (info.connected, consuming) {
            (false, _) => HealthStatus::Unhealthy,
            (true, _) if risks.refusing_writes.is_some() => HealthStatus::Unhealthy,
            (true, true) if paused.is_some() || stuck => HealthStatus::Unhealthy,
            (true, true) => HealthStatus::Healthy,
            (true, false) => HealthStatus::Degraded,
        };
        let error = risks
            .refusing_writes
            .or(paused.map(|reason| format!("consumer paused: {reason}")))
            .or_else(|| consuming.then(|| problem.map(|p| p.message)).flatten())
            .or(info.error);
        Health {
            status,
            connected: info.connected,
            consuming,
            pending_messages: info.pending_messages,
            dlq_messages: info.dlq_messages,
            error,
            warnings: {
                let mut warnings = risks.warnings;
                warnings.extend(crate::bus::lock(&self.inner.skipped_checks).iter().cloned());
                // A partition of a PartitionedEventBus holds a lease with a time to live.
                if !self.inner.guard_partitioned
                    && let Some(leases) = risks.evicts_expiring_keys
                {
                    warnings.push(leases);
                }
                warnings
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ServerRisks;

    #[test]
    fn info_text_is_read_for_risks() {
        let safe = "# Memory\r\nmaxmemory_policy:noeviction\r\n# Persistence\r\naof_enabled:1\r\n\
                    aof_last_write_status:ok\r\nrdb_last_bgsave_status:ok\r\n";
        assert_eq!(ServerRisks::from_info(safe), ServerRisks::default());
        let lru = "maxmemory_policy:allkeys-lru\r\n";
        let risks = ServerRisks::from_info(lru);
        assert_eq!(risks.warnings.len(), 1);
        assert!(risks.refusing_writes.is_none());
        assert!(
            ServerRisks::from_info("maxmemory_policy:volatile-lru\r\n")
                .warnings
                .is_empty()
        );
        let full = "aof_enabled:1\r\naof_last_write_status:err\r\n";
        assert!(ServerRisks::from_info(full).refusing_writes.is_some());
        let bgsave = "aof_enabled:0\r\nrdb_last_bgsave_status:err\r\n";
        assert!(
            ServerRisks::from_info(bgsave).refusing_writes.is_none(),
            "a failed snapshot refuses writes only with settings INFO does not show"
        );
    }
}

//! Pending-message recovery: claim entries idle longer than a threshold, retry them, and
//! dead-letter them when their retries are used up.
//!
//! **What an attempt is.** Every delivery of an entry to this group's handlers is one attempt,
//! and Redis counts deliveries for us (the pending entry's delivery count): the first read is
//! attempt 1, each recovery claim (`XCLAIM` without `JUSTID`) and each re-read of one's own
//! pending entries adds one. Recovery dead-letters an entry whose delivery count is already
//! above `max_retries`, *before* running it again — so an entry that always fails is handled
//! exactly `1 + max_retries` times and its dead letter says `retry_count = max_retries`, as in
//! eventsource-py. Deciding to dead-letter claims the entry with `JUSTID` first (no extra
//! delivery), so of several consumers recovering at once only one dead-letters it.
//!
//! The same limit holds for a consumer that restarts with its name and re-reads its own
//! pending entries: an entry whose delivery count would exceed `1 + max_retries` is
//! dead-lettered instead of run again, so an event that crashes the process cannot keep it in
//! a crash loop.

use redis::Value;
use serde::Serialize;

use crate::bus::{RedisEventBus, bump};
use crate::codec::{self, StreamEntry};
use crate::consume::Outcome;
use crate::error::RedisBusError;

/// Arguments of [`RedisEventBus::recover_pending_messages`]; `None` takes the config's value.
#[derive(Debug, Clone, Copy, Default)]
pub struct RecoveryOptions {
    /// Only entries idle at least this long (default `pending_idle_ms`).
    pub min_idle_time_ms: Option<u64>,
    /// Retries before dead-lettering (default `max_retries`).
    pub max_retries: Option<u32>,
    /// Page size when walking the pending list (default `batch_size`).
    pub batch_size: Option<usize>,
}

/// What one recovery run did. Counts are honest: a retry that failed again is `failed`, not
/// `reprocessed`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RecoveryStats {
    /// Pending entries idle long enough to be examined.
    pub checked: u64,
    /// Entries this consumer claimed (another consumer may win the race for some).
    pub claimed: u64,
    /// Claimed entries whose handlers then all succeeded (or that were skipped for a stated
    /// reason), now acknowledged.
    pub reprocessed: u64,
    /// Entries moved to the dead-letter queue (or dropped, with the DLQ disabled).
    pub dlq: u64,
    /// Claimed entries whose handlers failed again; they stay pending for the next run.
    pub failed: u64,
}

impl std::ops::Index<&str> for RecoveryStats {
    type Output = u64;
    /// The tutorial's dictionary access: `stats["reprocessed"]`. Panics on an unknown key.
    fn index(&self, key: &str) -> &u64 {
        match key {
            "checked" => &self.checked,
            "claimed" => &self.claimed,
            "reprocessed" => &self.reprocessed,
            "dlq" => &self.dlq,
            "failed" => &self.failed,
            other => panic!("RecoveryStats has no field {other:?}"),
        }
    }
}

/// Deletes consumer ARGV[2] of group ARGV[1] only if it has nothing pending; -1 otherwise.
const PRUNE_SCRIPT: &str = "local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) \
     if #p == 0 then return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2]) end \
     return -1";

/// One row of `XPENDING ... IDLE`: id, owner, idle ms, deliveries.
struct PendingRow {
    id: String,
    deliveries: u64,
}

fn parse_pending(v: &Value) -> Vec<PendingRow> {
    let Value::Array(rows) = v else {
        return Vec::new();
    };
    rows.iter()
        .filter_map(|row| {
            let Value::Array(cols) = row else { return None };
            let id = match cols.first()? {
                Value::BulkString(b) => String::from_utf8(b.clone()).ok()?,
                Value::SimpleString(s) => s.clone(),
                _ => return None,
            };
            let deliveries = match cols.get(3)? {
                Value::Int(n) => u64::try_from(*n).ok()?,
                _ => return None,
            };
            Some(PendingRow { id, deliveries })
        })
        .collect()
}

impl RedisEventBus {
    /// Claims this group's pending entries idle for at least `min_idle_time_ms`, retries
    /// them, and dead-letters those whose retries are used up (see the module docs for the
    /// exact attempt count). Walks the whole pending list page by page.
    ///
    /// The consumer runs this by itself every `recovery_interval_ms`; call it yourself for an
    /// immediate run or with other thresholds.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails; entries not yet handled stay pending.
    pub async fn recover_pending_messages(
        &self,
        options: RecoveryOptions,
    ) -> Result<RecoveryStats, RedisBusError> {
        let cfg = &self.inner.config;
        let min_idle = options.min_idle_time_ms.unwrap_or(cfg.pending_idle_ms);
        let max_retries = u64::from(options.max_retries.unwrap_or(cfg.max_retries));
        let page = options.batch_size.unwrap_or(cfg.batch_size).max(1);
        bump(&self.inner.counters.recovery_runs, 1);
        let mut stats = RecoveryStats::default();
        let mut conn = self.commands().await?;
        let mut start = "-".to_owned();
        loop {
            let reply: Value = redis::cmd("XPENDING")
                .arg(&self.inner.stream)
                .arg(&cfg.consumer_group)
                .arg("IDLE")
                .arg(min_idle)
                .arg(&start)
                .arg("+")
                .arg(page)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.command_error("XPENDING", e))?;
            let rows = parse_pending(&reply);
            for row in &rows {
                stats.checked += 1;
                let retries_done = row.deliveries.saturating_sub(1);
                if retries_done >= max_retries {
                    self.recover_to_dlq(&mut conn, &row.id, min_idle, retries_done, &mut stats)
                        .await?;
                } else {
                    self.recover_retry(&mut conn, &row.id, min_idle, &mut stats)
                        .await?;
                }
            }
            if rows.len() < page {
                break;
            }
            start = format!("({}", rows.last().expect("non-empty page").id);
        }
        if cfg.prune_idle_consumers_ms > 0 {
            match self.prune_idle_consumers(cfg.prune_idle_consumers_ms).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(removed = n, "removed idle consumers with nothing pending"),
                Err(e) => tracing::warn!(error = %e, "pruning idle consumers failed"),
            }
        }
        if stats.claimed > 0 {
            tracing::info!(
                checked = stats.checked,
                claimed = stats.claimed,
                reprocessed = stats.reprocessed,
                dlq = stats.dlq,
                failed = stats.failed,
                "pending recovery"
            );
        }
        Ok(stats)
    }

    /// Deletes other consumers of this group idle longer than `idle_ms` with nothing pending.
    /// The pending check and `XGROUP DELCONSUMER` run in one Lua script, so a consumer that
    /// received entries meanwhile is kept (deleting it would make its entries unclaimable).
    /// Returns how many were removed.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn prune_idle_consumers(&self, idle_ms: u64) -> Result<u64, RedisBusError> {
        let cfg = &self.inner.config;
        let mut conn = self.commands().await?;
        let reply: Result<Value, redis::RedisError> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.inner.stream)
            .arg(&cfg.consumer_group)
            .query_async(&mut conn)
            .await;
        let Ok(Value::Array(consumers)) = reply else {
            return Ok(0);
        };
        let mut removed = 0;
        for consumer in consumers {
            let Value::Array(flat) = consumer else {
                continue;
            };
            let get = |name: &str| {
                flat.chunks(2)
                    .find(|kv| matches!(kv.first(), Some(Value::BulkString(k)) if k.as_slice() == name.as_bytes()))
                    .and_then(|kv| kv.get(1))
            };
            let name = match get("name") {
                Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => continue,
            };
            let pending = matches!(get("pending"), Some(Value::Int(n)) if *n > 0);
            let idle = match get("idle") {
                Some(Value::Int(n)) => *n as u64,
                _ => 0,
            };
            if name == self.inner.consumer_name || pending || idle < idle_ms {
                continue;
            }
            let deleted: i64 = redis::cmd("EVAL")
                .arg(PRUNE_SCRIPT)
                .arg(1)
                .arg(&self.inner.stream)
                .arg(&cfg.consumer_group)
                .arg(&name)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.command_error("EVAL (prune consumer)", e))?;
            if deleted >= 0 {
                removed += 1;
            }
        }
        Ok(removed)
    }

    async fn recover_to_dlq(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        id: &str,
        min_idle: u64,
        retries_done: u64,
        stats: &mut RecoveryStats,
    ) -> Result<(), RedisBusError> {
        let cfg = &self.inner.config;
        // Claim without a delivery so only one recoverer dead-letters it.
        let claimed: Value = redis::cmd("XCLAIM")
            .arg(&self.inner.stream)
            .arg(&cfg.consumer_group)
            .arg(&self.inner.consumer_name)
            .arg(min_idle)
            .arg(id)
            .arg("JUSTID")
            .query_async(conn)
            .await
            .map_err(|e| self.command_error("XCLAIM", e))?;
        if !matches!(&claimed, Value::Array(ids) if !ids.is_empty()) {
            return Ok(()); // Another consumer took it first (or it was acked meanwhile).
        }
        stats.claimed += 1;
        let range: Value = redis::cmd("XRANGE")
            .arg(&self.inner.stream)
            .arg(id)
            .arg(id)
            .query_async(conn)
            .await
            .map_err(|e| self.command_error("XRANGE", e))?;
        let Some(entry) = codec::parse_range(&range).into_iter().next() else {
            // Deleted or trimmed while pending: nothing to dead-letter.
            bump(&self.inner.counters.entries_deleted_while_pending, 1);
            self.ack_and_note(&[id.to_owned()], &[]).await?;
            return Ok(());
        };
        let last_error: Option<String> = redis::cmd("GET")
            .arg(cfg.error_key(id))
            .query_async(conn)
            .await
            .map_err(|e| self.command_error("GET", e))?;
        let reason = last_error.unwrap_or_else(|| {
            format!(
                "not acknowledged after {} deliveries (no failure reason recorded: the consumer \
                 may have crashed or been too slow)",
                retries_done + 1
            )
        });
        self.dead_letter(&entry, retries_done, &reason).await?;
        stats.dlq += 1;
        Ok(())
    }

    async fn recover_retry(
        &self,
        conn: &mut redis::aio::ConnectionManager,
        id: &str,
        min_idle: u64,
        stats: &mut RecoveryStats,
    ) -> Result<(), RedisBusError> {
        let cfg = &self.inner.config;
        let reply: Value = redis::cmd("XCLAIM")
            .arg(&self.inner.stream)
            .arg(&cfg.consumer_group)
            .arg(&self.inner.consumer_name)
            .arg(min_idle)
            .arg(id)
            .query_async(conn)
            .await
            .map_err(|e| self.command_error("XCLAIM", e))?;
        let Some(entry) = codec::parse_range(&reply).into_iter().next() else {
            // Lost the race, or the entry was deleted (Redis 7 drops it from the PEL then).
            return Ok(());
        };
        stats.claimed += 1;
        self.retry_claimed(&entry, stats).await
    }

    async fn retry_claimed(
        &self,
        entry: &StreamEntry,
        stats: &mut RecoveryStats,
    ) -> Result<(), RedisBusError> {
        match self.process_entry(entry).await {
            Outcome::Handled | Outcome::Skipped(_) => {
                self.ack_and_note(std::slice::from_ref(&entry.id), &[])
                    .await?;
                let mut conn = self.commands().await?;
                let _: Value = redis::cmd("DEL")
                    .arg(self.inner.config.error_key(&entry.id))
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| self.command_error("DEL", e))?;
                stats.reprocessed += 1;
                bump(&self.inner.counters.messages_recovered, 1);
            }
            Outcome::Failed(reason) => {
                self.ack_and_note(&[], &[(entry.id.clone(), reason)])
                    .await?;
                stats.failed += 1;
            }
            Outcome::Malformed(reason) => {
                self.dead_letter(entry, 0, &format!("malformed: {reason}"))
                    .await?;
                stats.dlq += 1;
            }
        }
        Ok(())
    }
}

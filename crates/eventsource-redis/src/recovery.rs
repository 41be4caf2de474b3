//! Pending-message recovery: claim entries idle longer than a threshold, retry them, and
//! dead-letter them when their attempts are used up.
//!
//! **What an attempt is.** An attempt is a handler *start*, and Redis's delivery count holds
//! it: the consumer keeps the count equal to the starts (see `lease`): a fresh read or a
//! recovery claim counts one start, an entry that waits instead of starting is set back, an
//! entry re-read by its own consumer after a restart counts nothing until its handler starts.
//! Recovery dead-letters an entry whose handler started `1 + max_retries` times already,
//! *before* running it again — so an entry that always fails runs exactly `1 + max_retries`
//! times and its dead letter says `retry_count = max_retries`, as in eventsource-py. (One
//! imprecision is left: a consumer killed within 100 ms
//! of receiving a batch leaves its unstarted entries counted as started once.)
//!
//! **Atomic.** Claiming and dead-lettering (each one Lua script) re-check, inside one script, that the entry
//! is still idle (its owner did not renew or acknowledge it meanwhile): a live owner's entry
//! is never taken, and an entry its owner acknowledged is never dead-lettered. Entries
//! deleted or trimmed while pending are counted (`entries_deleted_while_pending`) on every
//! path. A consumer's recovery never claims entries it holds itself.
//!
//! **Bounded.** Inside the consume loop recovery handles one page (`batch_size`) per tick,
//! between reads of new entries, and checks for a stop between entries; while a walk finds
//! full pages the next page follows at once, so a survivor of a crashed consumer holding
//! 50,000 entries drains them page by page while new events keep flowing. An explicit
//! [`RedisEventBus::recover_pending_messages`] walks the whole list.

use redis::Value;
use redis::streams::{StreamInfoConsumersReply, StreamPendingCountReply};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::bus::{RedisEventBus, bump};
use crate::codec;
use crate::config::RedisEventBusConfig;
use crate::error::RedisBusError;
use crate::handle::{DeadLetterMode, DeadLettered, Item, ItemBody};
use crate::scripts;

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
#[non_exhaustive]
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
    /// Claimed entries whose handlers failed again (or that this version rejects); they stay
    /// pending for the next run.
    pub failed: u64,
    /// Entries found deleted or trimmed from the stream while pending (acknowledged).
    pub deleted: u64,
}

impl RecoveryStats {
    /// A counter by the tutorial's name (`"checked"`, `"claimed"`, `"reprocessed"`, `"dlq"`,
    /// `"failed"`, `"deleted"`), for code ported from eventsource-py's `stats["reprocessed"]`;
    /// `None` for an unknown name. Rust code reads the fields.
    pub fn get(&self, name: &str) -> Option<u64> {
        Some(match name {
            "checked" => self.checked,
            "claimed" => self.claimed,
            "reprocessed" => self.reprocessed,
            "dlq" => self.dlq,
            "failed" => self.failed,
            "deleted" => self.deleted,
            _ => return None,
        })
    }

    pub(crate) fn log(&self) {
        if self.claimed > 0 || self.dlq > 0 || self.deleted > 0 {
            tracing::info!(
                checked = self.checked,
                claimed = self.claimed,
                reprocessed = self.reprocessed,
                dlq = self.dlq,
                failed = self.failed,
                deleted = self.deleted,
                "pending recovery"
            );
        }
    }
}

/// Recovery options with the config's defaults filled in.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Resolved {
    pub(crate) min_idle: u64,
    pub(crate) max_retries: u32,
    pub(crate) page: usize,
}

impl Resolved {
    pub(crate) fn from_config(cfg: &RedisEventBusConfig, options: RecoveryOptions) -> Self {
        Self {
            min_idle: options
                .min_idle_time_ms
                .unwrap_or(crate::config::millis(cfg.pending_idle)),
            max_retries: options.max_retries.unwrap_or(cfg.max_retries),
            page: options.batch_size.unwrap_or(cfg.batch_size).max(1),
        }
    }
}

impl RedisEventBus {
    /// Claims this group's pending entries idle for at least `min_idle_time_ms`, retries
    /// them, and dead-letters those whose attempts are used up (see the module docs for the
    /// exact count). Walks the whole pending list page by page, then prunes idle consumers.
    ///
    /// The consumer runs recovery by itself, one page at a time, every
    /// `recovery_interval`; call this for an immediate full run or with other thresholds.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails; entries not yet handled stay pending.
    pub async fn recover_pending_messages(
        &self,
        options: RecoveryOptions,
    ) -> Result<RecoveryStats, RedisBusError> {
        let resolved = Resolved::from_config(&self.inner.config, options);
        bump(&self.inner.counters.recovery_runs, 1);
        let never = CancellationToken::new();
        let mut stats = RecoveryStats::default();
        let mut cursor = "-".to_owned();
        while self
            .recover_page(&resolved, &mut cursor, &mut stats, &never, &never)
            .await?
        {}
        self.prune_quietly().await;
        stats.log();
        Ok(stats)
    }

    /// One page of recovery from `cursor` (advanced). Returns whether the page was full (more
    /// may follow).
    pub(crate) async fn recover_page(
        &self,
        options: &Resolved,
        cursor: &mut String,
        stats: &mut RecoveryStats,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> Result<bool, RedisBusError> {
        let cfg = &self.inner.config;
        let mut conn = self.commands().await?;
        let reply: Result<StreamPendingCountReply, redis::RedisError> = redis::cmd("XPENDING")
            .arg(&self.inner.stream)
            .arg(&cfg.consumer_group)
            .arg("IDLE")
            .arg(options.min_idle)
            .arg(cursor.as_str())
            .arg("+")
            .arg(options.page)
            .query_async(&mut conn)
            .await;
        let rows = match reply {
            Ok(reply) => reply.ids,
            Err(e) if crate::error::is_nogroup(&e) => return Ok(false),
            Err(e) => return Err(self.command_error("XPENDING", e)),
        };
        let Some(last) = rows.last() else {
            return Ok(false);
        };
        *cursor = format!("({}", last.id);
        let full = rows.len() >= options.page;
        let mut to_claim = Vec::new();
        for row in &rows {
            if stop.is_cancelled() {
                return Ok(false);
            }
            stats.checked += 1;
            if row.consumer == self.inner.consumer_name && self.inner.lease.holds(&row.id) {
                continue; // Ours, and still being handled here.
            }
            let starts = u32::try_from(row.times_delivered).unwrap_or(u32::MAX);
            if starts <= options.max_retries {
                to_claim.push(row.id.clone());
                continue;
            }
            let reason = format!(
                "not acknowledged after {starts} handler starts, and no failure reason was \
                 recorded: its consumer crashed or was killed while handling it, or a handler \
                 ran longer than pending_idle_ms"
            );
            match self
                .dead_letter(
                    &row.id,
                    DeadLetterMode::Idle(options.min_idle),
                    starts.saturating_sub(1),
                    &reason,
                    true,
                )
                .await?
            {
                DeadLettered::Written(_) | DeadLettered::Dropped => {
                    stats.claimed += 1;
                    stats.dlq += 1;
                }
                DeadLettered::Deleted => stats.deleted += 1,
                DeadLettered::AlreadyAcked | DeadLettered::Busy => {}
            }
        }
        if to_claim.is_empty() || stop.is_cancelled() {
            return Ok(full && !stop.is_cancelled());
        }
        let items = self.claim(&to_claim, options, stats).await?;
        if !items.is_empty() {
            let report = self.process_items(items, stop, abort).await;
            let recovered = report.handled + report.skipped;
            stats.reprocessed += recovered;
            stats.failed += report.failed + report.rejected;
            stats.dlq += report.dead_lettered;
            stats.deleted += report.deleted;
            bump(&self.inner.counters.messages_recovered, recovered);
            self.inner.metrics.recovered(recovered);
        }
        Ok(full && !stop.is_cancelled())
    }

    /// Claims idle entries (one delivery counted each) with [`CLAIM`](scripts::CLAIM).
    async fn claim(
        &self,
        ids: &[String],
        options: &Resolved,
        stats: &mut RecoveryStats,
    ) -> Result<Vec<Item>, RedisBusError> {
        let min_idle = options.min_idle;
        let cfg = &self.inner.config;
        let mut conn = self.commands().await?;
        let mut call = scripts::CLAIM.prepare_invoke();
        call.key(&self.inner.stream)
            .arg(&cfg.consumer_group)
            .arg(&self.inner.consumer_name)
            .arg(min_idle);
        for id in ids {
            call.arg(id);
        }
        let rows: Vec<Value> = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.command_error("EVALSHA (claim)", e))?;
        let mut items = Vec::with_capacity(rows.len());
        for row in rows {
            let Value::Array(parts) = row else { continue };
            let mut parts = parts.into_iter();
            let Some(id) = parts.next().and_then(codec::into_text) else {
                continue;
            };
            let deliveries = match parts.next() {
                Some(Value::Int(n)) => n,
                _ => 0,
            };
            if deliveries < 0 {
                // Deleted or trimmed while pending; Redis dropped it from the pending list.
                bump(&self.inner.counters.entries_deleted_while_pending, 1);
                tracing::warn!(message_id = %id, "pending entry was deleted or trimmed; nothing to recover");
                stats.deleted += 1;
                continue;
            }
            let Some(fields) = parts.next() else {
                continue; // Renewed or acknowledged by its owner meanwhile: not ours to take.
            };
            let body = ItemBody::from_script(&id, fields, cfg.max_entry_bytes);
            if matches!(body, ItemBody::Deleted) {
                continue;
            }
            stats.claimed += 1;
            items.push(Item {
                id,
                body,
                starts: u32::try_from(deliveries - 1).unwrap_or(0),
                marked: true,
                max_retries: options.max_retries,
            });
        }
        Ok(items)
    }

    pub(crate) async fn prune_quietly(&self) {
        let ms = crate::config::millis(self.inner.config.prune_idle_consumers);
        if ms == 0 {
            return;
        }
        match self.prune_idle_consumers(ms).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed idle consumers with nothing pending"),
            Err(e) => tracing::warn!(error = %e, "pruning idle consumers failed"),
        }
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
        let reply: Result<StreamInfoConsumersReply, redis::RedisError> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.inner.stream)
            .arg(&cfg.consumer_group)
            .query_async(&mut conn)
            .await;
        let consumers = match reply {
            Ok(reply) => reply.consumers,
            Err(e) if crate::error::is_nogroup(&e) => return Ok(0),
            Err(e) => return Err(self.command_error("XINFO CONSUMERS", e)),
        };
        let mut removed = 0;
        for consumer in consumers {
            let idle = u64::try_from(consumer.idle).unwrap_or(u64::MAX);
            if consumer.name == self.inner.consumer_name || consumer.pending > 0 || idle < idle_ms {
                continue;
            }
            let deleted: i64 = scripts::PRUNE
                .key(&self.inner.stream)
                .arg(&cfg.consumer_group)
                .arg(&consumer.name)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.command_error("EVALSHA (prune consumer)", e))?;
            if deleted >= 0 {
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Warns (and counts `consumer_name_in_use`) when another process seems to be consuming
    /// under this consumer's name right now: it read from the group within the last block
    /// period. Two processes sharing a name share one pending list, so each may re-run the
    /// other's entries. Best effort: a restart right after a crash can look the same.
    pub(crate) async fn check_name_in_use(&self) {
        if self.fence().is_some() {
            // A partition held under a lease: only its holder consumes it, and taking it over
            // (XAUTOCLAIM) has just made this name look active.
            return;
        }
        let cfg = &self.inner.config;
        let Ok(mut conn) = self.commands().await else {
            return;
        };
        let Ok(reply) = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.inner.stream)
            .arg(&cfg.consumer_group)
            .query_async::<StreamInfoConsumersReply>(&mut conn)
            .await
        else {
            return;
        };
        for consumer in reply.consumers {
            let idle = u64::try_from(consumer.idle).unwrap_or(u64::MAX);
            if consumer.name == self.inner.consumer_name && idle < crate::config::millis(cfg.block)
            {
                bump(&self.inner.counters.consumer_name_in_use, 1);
                tracing::warn!(
                    consumer = %self.inner.consumer_name,
                    group = %cfg.consumer_group,
                    idle_ms = idle,
                    "another process may be consuming under this consumer name; give each process its own name"
                );
            }
        }
    }
}

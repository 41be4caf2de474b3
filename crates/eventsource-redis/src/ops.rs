//! Operator operations: what the `eventsource` CLI (and a dashboard) needs beyond consuming —
//! the group's consumers, purging dead letters, dead-lettering exhausted entries without
//! handling anything, and reading the stream without joining a group.

use redis::Value;
use redis::streams::{StreamInfoConsumersReply, StreamPendingCountReply};
use serde::Serialize;

use crate::bus::RedisEventBus;
use crate::codec::{self, StreamEntry};
use crate::error::RedisBusError;
use crate::handle::{DeadLetterMode, DeadLettered};
use crate::recovery::{RecoveryOptions, RecoveryStats, Resolved};
use crate::scripts;

/// One consumer of a group, as Redis reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ConsumerInfo {
    /// The consumer's name.
    pub name: String,
    /// Entries delivered to it and not yet acknowledged.
    pub pending: u64,
    /// Milliseconds since it last read from the group (a live consumer of this bus reads at
    /// least once a second).
    pub idle_ms: u64,
}

/// What [`RedisEventBus::purge_dlq_message_scoped`] did with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum PurgeOutcome {
    /// Deleted.
    Purged,
    /// No dead letter has this id.
    Missing,
    /// It belongs to another consumer group than the scope; left alone.
    OtherGroup {
        /// The group that dead-lettered it (empty for eventsource-py's dead letters).
        group: String,
    },
}

impl RedisEventBus {
    /// This bus's consumer group's consumers (empty when the stream or group does not exist).
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn consumers(&self) -> Result<Vec<ConsumerInfo>, RedisBusError> {
        self.consumers_of(&self.inner.config.consumer_group).await
    }

    /// The consumers of any `group` of this stream (an operator's view across groups).
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn consumers_of(&self, group: &str) -> Result<Vec<ConsumerInfo>, RedisBusError> {
        let mut conn = self.commands().await?;
        let reply: Result<StreamInfoConsumersReply, redis::RedisError> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.inner.stream)
            .arg(group)
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(reply) => Ok(reply
                .consumers
                .into_iter()
                .map(|c| ConsumerInfo {
                    name: c.name,
                    pending: c.pending as u64,
                    idle_ms: c.idle as u64,
                })
                .collect()),
            Err(e) if crate::error::is_nogroup(&e) || e.to_string().contains("no such key") => {
                Ok(Vec::new())
            }
            Err(e) => Err(self.command_error("XINFO CONSUMERS", e)),
        }
    }

    /// Deletes a dead letter, only if it belongs to `group` (when given), in one script.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn purge_dlq_message_scoped(
        &self,
        message_id: &str,
        group: Option<&str>,
    ) -> Result<PurgeOutcome, RedisBusError> {
        let mut conn = self.commands().await?;
        let reply: Vec<Value> = scripts::PURGE
            .key(&self.inner.dlq_stream)
            .arg(message_id)
            .arg(group.unwrap_or(""))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.command_error("EVALSHA (purge)", e))?;
        let mut parts = reply.into_iter();
        Ok(match parts.next() {
            Some(Value::Int(2)) => PurgeOutcome::Purged,
            Some(Value::Int(1)) => PurgeOutcome::OtherGroup {
                group: parts.next().and_then(codec::into_text).unwrap_or_default(),
            },
            _ => PurgeOutcome::Missing,
        })
    }

    /// One pass over this group's pending entries idle at least `min_idle_time_ms` that
    /// **handles nothing**: entries whose handler already started `1 + max_retries` times are
    /// dead-lettered (the atomic script: never an entry acknowledged meanwhile); the others
    /// are only counted (`checked`) and left for the group's consumers, whose recovery retries
    /// them. This is what an operator tool without the application's handlers may safely do:
    /// claiming an entry without handlers would acknowledge it unhandled.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn dead_letter_exhausted(
        &self,
        options: RecoveryOptions,
    ) -> Result<RecoveryStats, RedisBusError> {
        let resolved = Resolved::from_config(&self.inner.config, options);
        let mut stats = RecoveryStats::default();
        let mut cursor = "-".to_owned();
        let mut conn = self.commands().await?;
        loop {
            let reply: Result<StreamPendingCountReply, redis::RedisError> = redis::cmd("XPENDING")
                .arg(&self.inner.stream)
                .arg(&self.inner.config.consumer_group)
                .arg("IDLE")
                .arg(resolved.min_idle)
                .arg(cursor.as_str())
                .arg("+")
                .arg(resolved.page)
                .query_async(&mut conn)
                .await;
            let rows = match reply {
                Ok(reply) => reply.ids,
                Err(e) if crate::error::is_nogroup(&e) => return Ok(stats),
                Err(e) => return Err(self.command_error("XPENDING", e)),
            };
            let Some(last) = rows.last() else {
                return Ok(stats);
            };
            cursor = format!("({}", last.id);
            let full = rows.len() >= resolved.page;
            for row in &rows {
                stats.checked += 1;
                let starts = u32::try_from(row.times_delivered).unwrap_or(u32::MAX);
                if starts <= resolved.max_retries {
                    continue;
                }
                let reason = format!(
                    "not acknowledged after {starts} handler starts, and no failure reason was \
                     recorded: its consumer crashed or was killed while handling it, or a \
                     handler ran longer than pending_idle_ms (dead-lettered by an operator)"
                );
                match self
                    .dead_letter(
                        &row.id,
                        DeadLetterMode::Idle(resolved.min_idle),
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
            if !full {
                return Ok(stats);
            }
        }
    }

    /// The id of the newest dead letter, if any (where a bounded walk of the DLQ stops).
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn dlq_last_id(&self) -> Result<Option<String>, RedisBusError> {
        let mut conn = self.commands().await?;
        let reply: Value = redis::cmd("XREVRANGE")
            .arg(&self.inner.dlq_stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.command_error("XREVRANGE", e))?;
        Ok(codec::parse_range(reply).pop().map(|e| e.id))
    }

    /// Entries of the main stream after `after` (`$` for only new ones), waiting up to
    /// `block_ms` (below `socket_timeout`) for some to arrive; at most `count`. Reads with
    /// `XREAD`: no consumer group is joined, nothing is acknowledged or claimed.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn read_stream_after(
        &self,
        after: &str,
        count: usize,
        block_ms: u64,
    ) -> Result<Vec<StreamEntry>, RedisBusError> {
        let mut conn = self.commands().await?;
        let reply: Value = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.inner.stream)
            .arg(after)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.command_error("XREAD", e))?;
        Ok(codec::parse_read_reply(reply, usize::MAX)
            .into_iter()
            .filter_map(|e| match e {
                codec::ReadEntry::Present(entry) => Some(entry),
                _ => None,
            })
            .collect())
    }
}

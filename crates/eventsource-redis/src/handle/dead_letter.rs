//! The move to the dead-letter stream: one script that writes the dead letter only if the
//! acknowledgement applies, so an entry is never both handled and dead-lettered.

use redis::Value;

use crate::bus::{RedisEventBus, bump};
use crate::error::RedisBusError;
use crate::scripts;

/// Whose entry is being dead-lettered.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DeadLetterMode {
    /// This consumer's own, held entry (malformed, exhausted on restart).
    Mine,
    /// Recovery of an entry idle at least this long (any owner, this consumer included if it
    /// does not hold it).
    Idle(u64),
}

/// What the dead-letter script did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeadLettered {
    /// Written to the dead-letter stream (this id) and acknowledged.
    Written(String),
    /// Acknowledged without a dead letter: the DLQ is disabled.
    Dropped,
    /// Deleted from the stream while pending: acknowledged, nothing to write.
    Deleted,
    /// Already acknowledged (handled elsewhere): nothing written.
    AlreadyAcked,
    /// Another consumer holds it actively: nothing written.
    Busy,
}

impl RedisEventBus {
    /// Dead-letters entry `id` with `reason` (or, with `prefer_recorded`, the failure reason
    /// this group recorded for it), acknowledging it in the same script. Counts the outcome.
    pub(crate) async fn dead_letter(
        &self,
        id: &str,
        mode: DeadLetterMode,
        retry_count: u32,
        reason: &str,
        prefer_recorded: bool,
    ) -> Result<DeadLettered, RedisBusError> {
        let cfg = &self.inner.config;
        let min_idle = match mode {
            DeadLetterMode::Mine => -1,
            DeadLetterMode::Idle(ms) => i64::try_from(ms).unwrap_or(i64::MAX),
        };
        let fence = self.fence();
        let mut conn = self.commands().await?;
        let reply: Vec<Value> = scripts::DEAD_LETTER
            .key(&self.inner.stream)
            .key(&self.inner.dlq_stream)
            .key(cfg.error_key(id))
            .key(fence.as_ref().map_or(&self.inner.stream, |f| &f.key))
            .arg(&cfg.consumer_group)
            .arg(&self.inner.consumer_name)
            .arg(id)
            .arg(min_idle)
            .arg(retry_count)
            .arg(reason)
            .arg(if cfg.enable_dlq { "1" } else { "0" })
            .arg(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false))
            .arg(if prefer_recorded { "1" } else { "0" })
            .arg(fence.as_ref().map_or("", |f| f.value.as_str()))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.command_error("EVALSHA (dead letter)", e))?;
        let mut parts = reply.into_iter();
        let code = match parts.next() {
            Some(Value::Int(n)) => n,
            other => {
                return Err(RedisBusError::UnexpectedReply {
                    command: "EVALSHA (dead letter)",
                    reply: format!("{other:?}"),
                });
            }
        };
        let reason = parts
            .next()
            .and_then(crate::codec::into_bytes)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|| reason.to_owned());
        let c = &self.inner.counters;
        Ok(match code {
            3 => {
                let dlq_id = parts
                    .next()
                    .and_then(crate::codec::into_text)
                    .unwrap_or_default();
                bump(&c.messages_sent_to_dlq, 1);
                self.inner.metrics.dead_lettered();
                tracing::error!(message_id = %id, dlq = %self.inner.dlq_stream, dlq_id = %dlq_id, %reason, "entry dead-lettered");
                DeadLettered::Written(dlq_id)
            }
            4 => {
                bump(&c.messages_dropped_dlq_disabled, 1);
                tracing::error!(message_id = %id, %reason, "entry dropped: retries exhausted and the DLQ is disabled");
                DeadLettered::Dropped
            }
            2 => {
                bump(&c.entries_deleted_while_pending, 1);
                tracing::warn!(message_id = %id, "pending entry was deleted or trimmed; acknowledged");
                DeadLettered::Deleted
            }
            0 => {
                bump(&c.dead_letters_skipped_acked, 1);
                tracing::info!(message_id = %id, "not dead-lettered: it was acknowledged meanwhile (handled by its owner)");
                DeadLettered::AlreadyAcked
            }
            5 => {
                bump(&c.acks_fenced, 1);
                self.inner.metrics.acks_fenced(1);
                tracing::warn!(message_id = %id, "not dead-lettered: this consumer no longer holds the partition; its new owner handles the entry");
                DeadLettered::Busy
            }
            _ => DeadLettered::Busy,
        })
    }
}

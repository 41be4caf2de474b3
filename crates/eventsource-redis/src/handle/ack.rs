//! The batched acknowledgement: one XACK per batch, sent while the next batch is handled.

use std::sync::Arc;

use crate::bus::{RedisEventBus, bump};
use crate::error::RedisBusError;
use crate::lease::HeldBatch;

/// What a batch leaves to acknowledge and to note.
#[derive(Debug, Default)]
pub(crate) struct Acks {
    /// Entries to acknowledge.
    pub(crate) ids: Vec<String>,
    /// Of those, how many count as consumed (handled, or a known type without handlers).
    pub(crate) consumed: u64,
}

impl RedisEventBus {
    /// Sends `acks` in the background (at most one acknowledgement in flight per bus: the
    /// previous one is awaited first) and forgets `held` once it is sent, so entries stay
    /// renewed until their ack reaches Redis. Entries are acknowledged only after their
    /// handlers finished, so at-least-once holds; an ack lost to a crash means a redelivery.
    pub(crate) async fn send_acks(&self, acks: Acks, held: Arc<HeldBatch>) {
        self.flush_acks().await;
        if acks.ids.is_empty() {
            return;
        }
        let bus = self.clone();
        let task = tokio::spawn(async move {
            match bus.ack(&acks.ids).await {
                Ok(()) => {
                    bump(&bus.inner.counters.events_consumed, acks.consumed);
                    bus.inner.metrics.consumed(acks.consumed);
                }
                Err(e) => {
                    // The entries stay pending and will be redelivered: at-least-once.
                    tracing::warn!(error = %e, count = acks.ids.len(), "acknowledging a batch failed; entries will be redelivered");
                    let mut finished = crate::bus::lock(&bus.inner.finished_unacked);
                    for id in &acks.ids {
                        if finished.len() < crate::bus::FINISHED_UNACKED_MAX
                            || finished.contains_key(id)
                        {
                            *finished.entry(id.clone()).or_default() += 1;
                        }
                    }
                }
            }
            drop(held);
        });
        *self.inner.ack_in_flight.lock().await = Some(task);
    }

    /// Waits for the last batch's acknowledgement to be sent.
    pub(crate) async fn flush_acks(&self) {
        let previous = self.inner.ack_in_flight.lock().await.take();
        if let Some(previous) = previous {
            let _ = previous.await;
        }
    }

    /// The partition lease acknowledgements must check, if any.
    pub(crate) fn fence(&self) -> Option<crate::fence::Fence> {
        crate::bus::lock_read(&self.inner.fence).clone()
    }

    /// One XACK for `acks` (through the fence script when the bus holds a partition); counts the acknowledgements Redis did not apply. A failure
    /// reason recorded by an earlier attempt of an entry now acknowledged simply expires.
    pub(crate) async fn ack(&self, acks: &[String]) -> Result<(), RedisBusError> {
        if acks.is_empty() {
            return Ok(());
        }
        let mut conn = self.commands().await?;
        let applied: u64 = if let Some(fence) = self.fence() {
            let applied: i64 = crate::scripts::FENCED_ACK
                .key(&self.inner.stream)
                .key(&fence.key)
                .arg(&self.inner.config.consumer_group)
                .arg(&fence.value)
                .arg(acks)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| self.command_error("EVALSHA (fenced ack)", e))?;
            if applied < 0 {
                let n = acks.len() as u64;
                bump(&self.inner.counters.acks_fenced, n);
                self.inner.metrics.acks_fenced(n);
                tracing::warn!(
                    count = n,
                    stream = %self.inner.stream,
                    "acknowledgement refused: this consumer no longer holds the partition; \
                     its new owner handles these entries again"
                );
                return Ok(());
            }
            applied.unsigned_abs()
        } else {
            let mut cmd = redis::cmd("XACK");
            cmd.arg(&self.inner.stream)
                .arg(&self.inner.config.consumer_group)
                .arg(acks);
            cmd.query_async(&mut conn)
                .await
                .map_err(|e| self.command_error("XACK", e))?
        };
        {
            let applied = applied.min(acks.len() as u64);
            let missing = acks.len() as u64 - applied;
            if missing > 0 {
                // Another consumer claimed them meanwhile, or Redis lost the group.
                bump(&self.inner.counters.acks_not_applied, missing);
                self.inner.metrics.acks_not_applied(missing);
            }
        }
        Ok(())
    }
}

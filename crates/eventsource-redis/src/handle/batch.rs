//! A batch of entries delivered to this consumer: hold them, run them in order (or per
//! aggregate), settle each outcome, give back what was not started, acknowledge.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::ack::Acks;
use super::{DeadLetterMode, DeadLettered, Outcome};
use crate::bus::{RedisEventBus, bump};
use crate::codec::StreamEntry;
use crate::config::RejectedPolicy;
use crate::lease::{Begin, HeldBatch, ToHold};

/// What was delivered for one entry.
#[derive(Debug)]
pub(crate) enum ItemBody {
    /// The entry's fields.
    Present(StreamEntry),
    /// It was deleted from the stream while pending (Redis already dropped it).
    Deleted,
    /// Its fields exceed `max_entry_bytes`; they were not kept in memory.
    Oversized(usize),
}

impl ItemBody {
    /// The body of an entry a script returned as `fields` (a flat array of field/value
    /// strings), capped at `max_entry_bytes`.
    pub(crate) fn from_script(id: &str, fields: redis::Value, max_entry_bytes: usize) -> Self {
        let Some((_, Some(fields))) = crate::codec::take_entry(redis::Value::Array(vec![
            redis::Value::BulkString(id.as_bytes().to_vec()),
            fields,
        ])) else {
            return Self::Deleted;
        };
        let entry = StreamEntry {
            id: id.to_owned(),
            fields,
        };
        match entry.size() {
            bytes if bytes > max_entry_bytes => Self::Oversized(bytes),
            _ => Self::Present(entry),
        }
    }
}

/// One delivered entry with its attempt bookkeeping.
#[derive(Debug)]
pub(crate) struct Item {
    pub(crate) id: String,
    pub(crate) body: ItemBody,
    /// Handler starts before this delivery.
    pub(crate) starts: u32,
    /// Whether the delivery already counted a start in Redis (a fresh read or a recovery
    /// claim), so the start needs no round trip when it follows at once.
    pub(crate) marked: bool,
    /// Retries allowed before it is dead-lettered instead of run (`max_retries`, or the
    /// recovery call's own value).
    pub(crate) max_retries: u32,
}

/// What a batch did; `released` lists the entries given back unstarted (stop or pause).
#[derive(Debug, Default, Clone)]
pub(crate) struct BatchReport {
    pub(crate) handled: u64,
    pub(crate) skipped: u64,
    pub(crate) failed: u64,
    pub(crate) rejected: u64,
    pub(crate) dead_lettered: u64,
    pub(crate) taken: u64,
    pub(crate) deleted: u64,
    pub(crate) not_started: u64,
    pub(crate) released: Vec<String>,
    pub(crate) aborted: bool,
}

#[derive(Debug, Default)]
pub(crate) struct Settled {
    pub(crate) acks: Acks,
    pub(crate) report: BatchReport,
}

impl RedisEventBus {
    /// Registers delivered entries as held (the renewer protects them from now on).
    pub(crate) fn hold_items(&self, items: &[Item]) -> HeldBatch {
        self.hold(items.iter().map(|i| ToHold {
            id: &i.id,
            starts: i.starts,
            marked: i.marked,
        }))
    }

    /// Runs `items` (delivered to this consumer) until done or until `stop`, then gives back
    /// the entries not started and sends the acknowledgement. With `abort` cancelled, running
    /// handlers are abandoned (their futures dropped) and their entries given back too.
    pub(crate) async fn process_items(
        &self,
        items: Vec<Item>,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> BatchReport {
        self.process_held(items, None, stop, abort).await
    }

    /// As [`process_items`](Self::process_items) for entries already held (`None`: hold
    /// them now).
    pub(crate) async fn process_held(
        &self,
        items: Vec<Item>,
        held: Option<Arc<HeldBatch>>,
        stop: &CancellationToken,
        abort: &CancellationToken,
    ) -> BatchReport {
        if items.is_empty() {
            return BatchReport::default();
        }
        self.inner.metrics.batch(items.len());
        let held = held.unwrap_or_else(|| Arc::new(self.hold_items(&items)));
        let settled = Arc::new(Mutex::new(Settled::default()));
        let aborted = tokio::select! {
            biased;
            () = abort.cancelled() => true,
            () = self.run_items(&held, items, stop, &settled) => false,
        };
        let released = self.release(&held).await;
        if !released.is_empty() {
            lock(&self.inner.control.left_pending).extend(released.iter().cloned());
        }
        let Settled { acks, mut report } = std::mem::take(&mut *lock(&settled));
        report.released = released;
        report.aborted = aborted;
        self.send_acks(acks, held).await;
        report
    }

    async fn run_items(
        &self,
        held: &Arc<HeldBatch>,
        items: Vec<Item>,
        stop: &CancellationToken,
        settled: &Arc<Mutex<Settled>>,
    ) {
        if self.inner.config.handler_concurrency > 1 && items.len() > 1 {
            self.run_concurrently(held, items, stop, settled).await;
            return;
        }
        for (index, item) in items.into_iter().enumerate() {
            if stop.is_cancelled() || self.inner.is_paused() {
                break;
            }
            let (outcome, in_pending) = self.run_item(held, index, &item).await;
            self.settle(held, index, item, outcome, in_pending, settled)
                .await;
        }
    }

    /// Records the start of one entry and runs it. Returns the outcome and whether the entry
    /// is still in the pending list (so an ack applies).
    pub(crate) async fn run_item(
        &self,
        held: &HeldBatch,
        index: usize,
        item: &Item,
    ) -> (Outcome, bool) {
        let cfg = &self.inner.config;
        let entry = match &item.body {
            ItemBody::Deleted => {
                bump(&self.inner.counters.entries_deleted_while_pending, 1);
                tracing::warn!(message_id = %item.id, "pending entry was deleted or trimmed; nothing left to handle");
                return (Outcome::Deleted, false);
            }
            ItemBody::Oversized(bytes) => {
                bump(&self.inner.counters.malformed_messages, 1);
                return (
                    Outcome::Malformed(format!(
                        "entry holds {bytes} bytes, above max_entry_bytes ({}); raise the limit \
                         to handle it",
                        cfg.max_entry_bytes
                    )),
                    true,
                );
            }
            ItemBody::Present(entry) => entry,
        };
        if item.starts > item.max_retries {
            return (
                Outcome::Exhausted {
                    starts: item.starts,
                },
                true,
            );
        }
        match self.begin(held, index).await {
            Ok(Begin::Run) => (self.dispatch_entry(entry).await, true),
            Ok(Begin::Deleted) => {
                // Trimmed while it waited here; we hold its content, so it is handled, and
                // there is nothing left to acknowledge.
                bump(&self.inner.counters.entries_deleted_while_pending, 1);
                (self.dispatch_entry(entry).await, false)
            }
            Ok(Begin::Taken) => (Outcome::Taken, false),
            Err(e) => {
                tracing::warn!(message_id = %item.id, error = %e, "could not record the start of an entry; it stays pending and comes back");
                (Outcome::NotStarted, false)
            }
        }
    }

    /// Acts on an outcome: ack, note, dead-letter or let go.
    pub(crate) async fn settle(
        &self,
        held: &HeldBatch,
        index: usize,
        item: Item,
        outcome: Outcome,
        in_pending: bool,
        settled: &Mutex<Settled>,
    ) {
        let c = &self.inner.counters;
        let id = item.id;
        match outcome {
            Outcome::Handled | Outcome::Skipped { .. } => {
                self.finished(held, index);
                let consumed = match outcome {
                    Outcome::Skipped { reason, consumed } => {
                        tracing::debug!(message_id = %id, reason, "entry skipped");
                        consumed
                    }
                    _ => true,
                };
                let mut s = lock(settled);
                if matches!(outcome, Outcome::Handled) {
                    s.report.handled += 1;
                } else {
                    s.report.skipped += 1;
                }
                if in_pending {
                    s.acks.ids.push(id);
                    s.acks.consumed += u64::from(consumed);
                } else if consumed {
                    bump(&c.events_consumed, 1);
                }
            }
            Outcome::Failed(reason) => {
                self.let_go(held, index);
                self.note_failure(&id, &reason).await;
                lock(settled).report.failed += 1;
            }
            Outcome::Rejected { event_type, reason } => {
                self.let_go(held, index);
                let text = format!(
                    "rejected by this version of `{event_type}` (the event's data does not fit \
                     the Rust type): {reason}"
                );
                match self.inner.config.on_rejected {
                    RejectedPolicy::DeadLetter => {
                        self.dead_letter_settled(&id, item.starts, &text, false, settled)
                            .await;
                    }
                    RejectedPolicy::Retry => {
                        self.note_failure(&id, &text).await;
                        lock(settled).report.rejected += 1;
                        self.inner.note_rejection(&event_type, &text);
                    }
                }
            }
            Outcome::Malformed(reason) => {
                self.let_go(held, index);
                let text = format!("malformed: {reason}");
                self.dead_letter_settled(&id, item.starts, &text, false, settled)
                    .await;
            }
            Outcome::Exhausted { starts } => {
                self.let_go(held, index);
                let finished = lock(&self.inner.finished_unacked).remove(&id).unwrap_or(0);
                let text = exhausted_reason(starts, finished);
                self.dead_letter_settled(&id, starts.saturating_sub(1), &text, true, settled)
                    .await;
            }
            Outcome::Taken => {
                self.let_go(held, index);
                bump(&c.entries_taken_over, 1);
                tracing::info!(message_id = %id, "another consumer took this entry before it started here; not run");
                lock(settled).report.taken += 1;
            }
            Outcome::Deleted => {
                self.let_go(held, index);
                lock(settled).report.deleted += 1;
            }
            Outcome::NotStarted => {
                self.let_go(held, index);
                lock(settled).report.not_started += 1;
            }
        }
    }

    async fn dead_letter_settled(
        &self,
        id: &str,
        retry_count: u32,
        reason: &str,
        prefer_recorded: bool,
        settled: &Mutex<Settled>,
    ) {
        match self
            .dead_letter(
                id,
                DeadLetterMode::Mine,
                retry_count,
                reason,
                prefer_recorded,
            )
            .await
        {
            Ok(DeadLettered::Written(_) | DeadLettered::Dropped) => {
                lock(settled).report.dead_lettered += 1;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(message_id = %id, error = %e, "dead-lettering failed; the entry stays pending and comes back");
            }
        }
    }

    /// Records why an entry failed, for this group, so whoever dead-letters it can say why.
    pub(crate) async fn note_failure(&self, id: &str, reason: &str) {
        let cfg = &self.inner.config;
        let result = match self.commands().await {
            Ok(mut conn) => redis::cmd("SET")
                .arg(cfg.error_key(id))
                .arg(reason)
                .arg("EX")
                .arg(cfg.retry_key_expiry.as_secs())
                .query_async::<()>(&mut conn)
                .await
                .map_err(|e| self.command_error("SET (failure reason)", e)),
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(message_id = %id, error = %e, "recording the failure reason failed");
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The reason of an entry dead-lettered for its starts: what is known. Starts are recorded in
/// Redis before each run; whether a run finished is known only to the consumer that ran it,
/// so only this consumer's own finished runs (their acknowledgement failed) are counted.
pub(crate) fn exhausted_reason(starts: u32, finished_here: u32) -> String {
    let known = match finished_here {
        0 => "whether any run finished is not known here".to_owned(),
        1 => "1 run finished in this consumer, but its acknowledgement did not reach Redis"
            .to_owned(),
        n => format!(
            "{n} runs finished in this consumer, but their acknowledgements did not reach Redis"
        ),
    };
    format!(
        "its handler was started {starts} times and the entry was never acknowledged ({known}): \
         a consumer stopped (crash, kill or restart) while the handler ran, or after it \
         finished and before its batch's acknowledgement was sent"
    )
}

#[cfg(test)]
mod reason_tests {
    use super::exhausted_reason;

    #[test]
    fn the_reason_says_what_is_known() {
        let unknown = exhausted_reason(4, 0);
        assert!(unknown.contains("started 4 times"), "{unknown}");
        assert!(unknown.contains("never acknowledged"), "{unknown}");
        assert!(unknown.contains("not known"), "{unknown}");
        assert!(!unknown.contains("without finishing"), "{unknown}");
        assert!(exhausted_reason(4, 1).contains("1 run finished in this consumer"));
        assert!(exhausted_reason(4, 3).contains("3 runs finished in this consumer"));
    }
}

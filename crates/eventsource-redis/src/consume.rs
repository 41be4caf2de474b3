//! The read loop: own pending entries first, then new ones; dispatch; ack; built-in recovery;
//! reconnection with backoff.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Value;
use tracing::Instrument;

use crate::bus::{RedisEventBus, bump};
use crate::codec::{self, DecodeFailure, REPLAY_GROUP_FIELD, ReadEntry, StreamEntry};
use crate::error::RedisBusError;
use crate::reader::{ReadError, ReadRequest, Reader};
use crate::recovery::RecoveryOptions;
use crate::trace::TraceContext;

/// A reader handed back (unless its connection broke) with what it read.
type ReadOutcome = (Option<Reader>, Result<Vec<ReadEntry>, ReadError>);

/// What became of one entry.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Every handler succeeded: ack.
    Handled,
    /// Nothing to do here, for a stated and counted reason: ack.
    Skipped(&'static str),
    /// A handler failed or panicked: leave pending, remember the reason.
    Failed(String),
    /// The entry can never be decoded: dead-letter it now.
    Malformed(String),
}

/// Exponential backoff with full jitter between `min` and `max`.
pub(crate) struct Backoff {
    attempt: u32,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub(crate) fn new(max: Duration) -> Self {
        Self {
            attempt: 0,
            min: Duration::from_millis(100),
            max,
        }
    }

    pub(crate) fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: random in [base/2, base], base = min * 2^attempt capped at max.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = self
            .min
            .saturating_mul(1u32 << self.attempt.min(16))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let jitter = (uuid::Uuid::new_v4().as_u128() % 1000) as u32;
        base / 2 + base / 2 * jitter / 1000
    }
}

enum Cursor {
    /// Re-reading this consumer's own pending entries after this id.
    OwnPending(String),
    /// Reading new entries (`>`).
    New,
}

impl RedisEventBus {
    /// Consumes until [`stop_consuming`](Self::stop_consuming) (or
    /// [`disconnect`](Self::disconnect)): first this consumer's own pending entries (left by
    /// an earlier run with the same name), then new entries, `batch_size` at a time. Every
    /// `recovery_interval_ms` it also runs pending recovery.
    ///
    /// Connection loss, a Redis restart and a lost consumer group are handled inside: the loop
    /// reconnects with jittered backoff (counted in `reconnections`) and recreates the group.
    /// Stopping finishes and acknowledges the in-flight batch; a handler is never cancelled,
    /// and a read in progress is allowed to return (within `block_ms`) and its entries are
    /// handled too, so nothing this consumer received is left pending. At most two batches
    /// are in flight per consumer: the one being handled and the next one being read.
    ///
    /// # Errors
    /// [`RedisBusError::AlreadyConsuming`] if this bus is already consuming.
    pub async fn start_consuming(&self) -> Result<(), RedisBusError> {
        if self
            .inner
            .consuming
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return Err(RedisBusError::AlreadyConsuming);
        }
        struct Reset<'a>(&'a RedisEventBus);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                self.0.inner.consuming.store(false, Ordering::SeqCst);
            }
        }
        let _reset = Reset(self);
        self.inner.stop.send_replace(false);
        self.check_name_in_use().await;
        let mut stop = self.inner.stop.subscribe();
        self.consume_loop(&mut stop).await;
        Ok(())
    }

    /// Warns (and counts `consumer_name_in_use`) when another process seems to be consuming
    /// under this consumer's name right now: it read from the group within the last block
    /// period. Two processes sharing a name share one pending list, so each may re-run the
    /// other's entries. Best effort: a restart right after a crash can look the same.
    async fn check_name_in_use(&self) {
        let cfg = &self.inner.config;
        let Ok(mut conn) = self.commands().await else {
            return;
        };
        let Ok(Value::Array(consumers)) = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&self.inner.stream)
            .arg(&cfg.consumer_group)
            .query_async::<Value>(&mut conn)
            .await
        else {
            return;
        };
        for consumer in consumers {
            let Value::Array(flat) = consumer else {
                continue;
            };
            let field = |name: &str| {
                flat.chunks(2)
                    .find(|kv| matches!(kv.first(), Some(Value::BulkString(k)) if k.as_slice() == name.as_bytes()))
                    .and_then(|kv| kv.get(1))
            };
            let ours = matches!(field("name"), Some(Value::BulkString(n)) if n.as_slice() == self.inner.consumer_name.as_bytes());
            let idle = match field("idle") {
                Some(Value::Int(ms)) => *ms as u64,
                _ => u64::MAX,
            };
            if ours && idle < cfg.block_ms {
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

    /// Asks the consume loop to stop after its in-flight batch. Returns at once; the
    /// `start_consuming` future completes when the batch is acknowledged.
    pub fn stop_consuming(&self) {
        self.inner.stop.send_replace(true);
    }

    fn stop_requested(&self) -> bool {
        *self.inner.stop.borrow()
    }

    /// Sleeps `delay` unless a stop is requested first. Returns whether to go on.
    async fn pause(&self, stop: &mut tokio::sync::watch::Receiver<bool>, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => !self.stop_requested(),
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    async fn consume_loop(&self, stop: &mut tokio::sync::watch::Receiver<bool>) {
        let cfg = &self.inner.config;
        let mut backoff = Backoff::new(Duration::from_millis(cfg.reconnect_max_delay_ms));
        let mut reader: Option<Reader> = None;
        let read_timeout = Duration::from_millis(cfg.block_ms) + cfg.socket_timeout();
        let mut cursor = Cursor::OwnPending("0".to_owned());
        let recovery_every =
            (cfg.recovery_interval_ms > 0).then(|| Duration::from_millis(cfg.recovery_interval_ms));
        let mut next_recovery = recovery_every.map(|every| Instant::now() + every);
        let mut group_checked = false;
        let mut failing_since: Option<Instant> = None;
        let mut prefetched: Option<tokio::task::JoinHandle<ReadOutcome>> = None;

        while !self.stop_requested() {
            if !group_checked {
                let checked = match self.commands().await {
                    Ok(mut conn) => self.ensure_group(&mut conn).await.map(drop),
                    Err(e) => Err(e),
                };
                match checked {
                    Ok(()) => group_checked = true,
                    Err(e) => {
                        self.note_failure(&mut failing_since, &e);
                        if !self.pause(stop, backoff.next_delay()).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            if reader.is_none() {
                match self.blocking_reader().await {
                    Ok(r) => reader = Some(r),
                    Err(e) => {
                        self.note_failure(&mut failing_since, &e);
                        if !self.pause(stop, backoff.next_delay()).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            if let (Some(every), Some(due)) = (recovery_every, next_recovery) {
                if Instant::now() >= due {
                    if let Err(e) = self
                        .recover_pending_messages(RecoveryOptions::default())
                        .await
                    {
                        tracing::warn!(error = %e, "pending recovery failed; will retry");
                    }
                    next_recovery = Some(Instant::now() + every);
                }
            }
            // A read is never abandoned half-way (that would strand delivered entries as
            // pending): it returns within `block_ms`, and the loop checks for a stop after it.
            let (back, read) = match prefetched.take() {
                Some(next) => next
                    .await
                    .unwrap_or_else(|join| (None, Err(ReadError::Connection(join.to_string())))),
                None => {
                    let (id, block) = match &cursor {
                        Cursor::OwnPending(after) => (after.clone(), None),
                        Cursor::New => (">".to_owned(), Some(cfg.block_ms)),
                    };
                    let r = reader.take().expect("reader connected above");
                    r.read(self.read_request(&id, block), read_timeout).await
                }
            };
            reader = back;
            match read {
                Ok(entries) => {
                    if failing_since.take().is_some() {
                        tracing::info!(stream = %self.inner.stream, "Redis reachable again; consuming");
                    }
                    backoff.reset();
                    if entries.is_empty() {
                        if matches!(cursor, Cursor::OwnPending(_)) {
                            cursor = Cursor::New;
                        }
                        continue;
                    }
                    match &mut cursor {
                        Cursor::OwnPending(after) => {
                            if let Some(last) = entries.last() {
                                *after = match last {
                                    ReadEntry::Present(e) => e.id.clone(),
                                    ReadEntry::Deleted(id) => id.clone(),
                                };
                            }
                        }
                        Cursor::New if !self.stop_requested() => {
                            // Read the next batch while this one is handled (on another
                            // worker thread when the runtime has one). At most two batches
                            // are in flight per consumer.
                            if let Some(r) = reader.take() {
                                let request = self.read_request(">", Some(cfg.block_ms));
                                prefetched = Some(tokio::spawn(r.read(request, read_timeout)));
                            }
                        }
                        Cursor::New => {}
                    }
                    let entries = if matches!(cursor, Cursor::OwnPending(_)) {
                        self.screen_redeliveries(entries).await
                    } else {
                        entries
                    };
                    self.process_batch(entries).await;
                }
                Err(ReadError::NoGroup(_)) => {
                    // Redis restarted without persistence, the stream was deleted or evicted,
                    // or the group was destroyed: recreate it and go on.
                    tracing::warn!(
                        stream = %self.inner.stream,
                        group = %cfg.consumer_group,
                        "consumer group missing (Redis restart, eviction or deletion); recreating it"
                    );
                    bump(&self.inner.counters.group_recreations, 1);
                    group_checked = false;
                    cursor = Cursor::New;
                }
                Err(e @ ReadError::Connection(_)) => {
                    reader = None;
                    group_checked = false;
                    bump(&self.inner.counters.reconnections, 1);
                    self.inner.connected.store(false, Ordering::Relaxed);
                    self.note_failure(&mut failing_since, &format!("XREADGROUP: {e}"));
                    if !self.pause(stop, backoff.next_delay()).await {
                        break;
                    }
                }
                Err(e @ ReadError::Server(_)) => {
                    // E.g. UNBLOCKED (stream deleted while blocking), OOM, MISCONF.
                    tracing::warn!(error = %e, stream = %self.inner.stream, "XREADGROUP failed");
                    group_checked = false;
                    if !self.pause(stop, backoff.next_delay()).await {
                        break;
                    }
                }
            }
        }
        if let Some(next) = prefetched.take() {
            // Delivered to us while we were stopping: handle it rather than strand it.
            if let Ok((_, Ok(entries))) = next.await {
                if !entries.is_empty() {
                    self.process_batch(entries).await;
                }
            }
        }
        self.flush_acks().await;
        tracing::debug!(consumer = %self.inner.consumer_name, "consume loop stopped");
    }

    /// Logs a connection problem once when it starts (warn), then only at debug, so an outage
    /// does not flood the log.
    fn note_failure(&self, failing_since: &mut Option<Instant>, error: &dyn std::fmt::Display) {
        if failing_since.is_none() {
            *failing_since = Some(Instant::now());
            tracing::warn!(error = %error, "Redis unavailable; consumer retrying with backoff");
        } else {
            tracing::debug!(error = %error, "Redis still unavailable");
        }
    }

    /// Own pending entries re-read after a restart: an entry whose delivery count now
    /// exceeds `1 + max_retries` is dead-lettered instead of run again, so an event that
    /// crashes the process cannot put it into a crash loop.
    async fn screen_redeliveries(&self, entries: Vec<ReadEntry>) -> Vec<ReadEntry> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return entries;
        };
        let id_of = |e: &ReadEntry| match e {
            ReadEntry::Present(e) => e.id.clone(),
            ReadEntry::Deleted(id) => id.clone(),
        };
        let cfg = &self.inner.config;
        let deliveries: HashMap<String, u64> = match self.commands().await {
            Ok(mut conn) => redis::cmd("XPENDING")
                .arg(&self.inner.stream)
                .arg(&cfg.consumer_group)
                .arg(id_of(first))
                .arg(id_of(last))
                .arg(entries.len())
                .arg(&self.inner.consumer_name)
                .query_async::<Vec<(String, String, u64, u64)>>(&mut conn)
                .await
                .map(|rows| rows.into_iter().map(|(id, _, _, n)| (id, n)).collect())
                .unwrap_or_default(),
            Err(_) => HashMap::new(),
        };
        let limit = 1 + u64::from(cfg.max_retries);
        let mut keep = Vec::with_capacity(entries.len());
        for entry in entries {
            match entry {
                ReadEntry::Present(e) if deliveries.get(&e.id).is_some_and(|&n| n > limit) => {
                    let n = deliveries[&e.id];
                    let recorded = match self.commands().await {
                        Ok(mut conn) => redis::cmd("GET")
                            .arg(cfg.error_key(&e.id))
                            .query_async::<Option<String>>(&mut conn)
                            .await
                            .ok()
                            .flatten(),
                        Err(_) => None,
                    };
                    let reason = recorded.unwrap_or_else(|| {
                        format!(
                            "delivered {n} times without an acknowledgement (the consumer \
                             crashed or restarted while handling it)"
                        )
                    });
                    if let Err(err) = self.dead_letter(&e, n - 1, &reason).await {
                        tracing::error!(message_id = %e.id, error = %err, "dead-lettering a redelivered entry failed; handling it instead");
                        keep.push(ReadEntry::Present(e));
                    }
                }
                other => keep.push(other),
            }
        }
        keep
    }

    fn read_request(&self, id: &str, block_ms: Option<u64>) -> ReadRequest {
        ReadRequest {
            group: self.inner.config.consumer_group.clone(),
            consumer: self.inner.consumer_name.clone(),
            count: self.inner.config.batch_size,
            block_ms,
            stream: self.inner.stream.clone(),
            id: id.to_owned(),
        }
    }

    /// Handles one batch, then acknowledges it (one XACK for the batch): in stream order, or
    /// with `handler_concurrency` > 1 concurrently per aggregate.
    async fn process_batch(&self, entries: Vec<ReadEntry>) {
        let mut acks: Vec<String> = Vec::with_capacity(entries.len());
        let mut failures: Vec<(String, String)> = Vec::new();
        let mut present = Vec::with_capacity(entries.len());
        for entry in entries {
            match entry {
                ReadEntry::Deleted(id) => {
                    // Trimmed or deleted while pending: nothing left to handle.
                    bump(&self.inner.counters.entries_deleted_while_pending, 1);
                    tracing::warn!(message_id = %id, "pending entry was deleted or trimmed; acknowledging");
                    acks.push(id);
                }
                ReadEntry::Present(entry) => present.push(entry),
            }
        }
        let outcomes = if self.inner.config.handler_concurrency > 1 && present.len() > 1 {
            self.process_concurrently(present).await
        } else {
            let mut outcomes = Vec::with_capacity(present.len());
            for entry in present {
                let outcome = self.process_entry(&entry).await;
                outcomes.push((entry, outcome));
            }
            outcomes
        };
        for (entry, outcome) in outcomes {
            match outcome {
                Outcome::Handled => acks.push(entry.id),
                Outcome::Skipped(reason) => {
                    tracing::debug!(message_id = %entry.id, reason, "entry skipped");
                    acks.push(entry.id);
                }
                Outcome::Failed(reason) => failures.push((entry.id, reason)),
                Outcome::Malformed(reason) => {
                    let reason = format!("malformed: {reason}");
                    if let Err(e) = self.dead_letter(&entry, 0, &reason).await {
                        tracing::error!(message_id = %entry.id, error = %e, "dead-lettering a malformed entry failed; it stays pending");
                    }
                }
            }
        }
        // The ack goes out while the next batch is handled; at most one ack is in flight, and
        // the loop waits for it before stopping. Entries are acked only after their handlers
        // finished, so at-least-once holds; an ack lost to a crash means a redelivery.
        if let Some(previous) = self.inner.ack_in_flight.lock().await.take() {
            let _ = previous.await;
        }
        if acks.is_empty() && failures.is_empty() {
            return;
        }
        let bus = self.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = bus.ack_and_note(&acks, &failures).await {
                // The entries stay pending and will be redelivered: at-least-once.
                tracing::warn!(error = %e, count = acks.len(), "acknowledging a batch failed; entries will be redelivered");
            }
        });
        *self.inner.ack_in_flight.lock().await = Some(task);
    }

    /// Waits for the last batch's acknowledgement to be sent.
    async fn flush_acks(&self) {
        if let Some(previous) = self.inner.ack_in_flight.lock().await.take() {
            let _ = previous.await;
        }
    }

    /// Runs a batch with up to `handler_concurrency` entries in flight: one task per
    /// aggregate (its entries in stream order), at most that many tasks at once. Should a task
    /// die (handler panics are caught, so it should not), its entries stay pending.
    async fn process_concurrently(&self, entries: Vec<StreamEntry>) -> Vec<(StreamEntry, Outcome)> {
        let limit = self.inner.config.handler_concurrency;
        let total = entries.len();
        let mut chains: Vec<Vec<StreamEntry>> = Vec::new();
        let mut by_aggregate: HashMap<String, usize> = HashMap::new();
        for entry in entries {
            let key = entry
                .get("aggregate_id")
                .unwrap_or(entry.id.as_str())
                .to_owned();
            match by_aggregate.get(&key) {
                Some(&i) => chains[i].push(entry),
                None => {
                    by_aggregate.insert(key, chains.len());
                    chains.push(vec![entry]);
                }
            }
        }
        let mut results: Vec<(StreamEntry, Outcome)> = Vec::with_capacity(total);
        let mut running = tokio::task::JoinSet::new();
        let mut in_flight: HashMap<tokio::task::Id, Vec<StreamEntry>> = HashMap::new();
        let mut queue = chains.into_iter();
        loop {
            while running.len() < limit {
                let Some(chain) = queue.next() else { break };
                let bus = self.clone();
                let keep = chain.clone();
                let handle = running.spawn(async move {
                    let mut out = Vec::with_capacity(chain.len());
                    for entry in chain {
                        let outcome = bus.process_entry(&entry).await;
                        out.push((entry, outcome));
                    }
                    out
                });
                in_flight.insert(handle.id(), keep);
            }
            match running.join_next_with_id().await {
                Some(Ok((id, out))) => {
                    in_flight.remove(&id);
                    results.extend(out);
                }
                Some(Err(e)) => {
                    let lost = in_flight.remove(&e.id()).unwrap_or_default();
                    tracing::error!(error = %e, entries = lost.len(), "a handler task died; its entries stay pending");
                    for entry in lost {
                        results.push((entry, Outcome::Failed(format!("handler task died: {e}"))));
                    }
                }
                None => break,
            }
        }
        results
    }

    /// XACK `acks` and record failure reasons, in one pipelined round trip.
    pub(crate) async fn ack_and_note(
        &self,
        acks: &[String],
        failures: &[(String, String)],
    ) -> Result<(), RedisBusError> {
        if acks.is_empty() && failures.is_empty() {
            return Ok(());
        }
        let cfg = &self.inner.config;
        let mut pipe = redis::pipe();
        if !acks.is_empty() {
            let cmd = pipe
                .cmd("XACK")
                .arg(&self.inner.stream)
                .arg(&cfg.consumer_group);
            for id in acks {
                cmd.arg(id);
            }
        }
        for (id, reason) in failures {
            pipe.cmd("SET")
                .arg(cfg.error_key(id))
                .arg(reason)
                .arg("EX")
                .arg(cfg.retry_key_expiry_seconds)
                .ignore();
        }
        let mut conn = self.commands().await?;
        let reply: Vec<Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.command_error("XACK", e))?;
        if let Some(Value::Int(n)) = reply.first() {
            let missing = acks.len() as u64 - (*n as u64).min(acks.len() as u64);
            if !acks.is_empty() && missing > 0 {
                // Another consumer claimed them meanwhile, or Redis lost the group.
                bump(&self.inner.counters.acks_not_applied, missing);
            }
        }
        Ok(())
    }

    /// Decodes and dispatches one entry; never panics, never returns an error.
    pub(crate) async fn process_entry(&self, entry: &StreamEntry) -> Outcome {
        let c = &self.inner.counters;
        let group = &self.inner.config.consumer_group;
        if let Some(target) = entry.get(REPLAY_GROUP_FIELD) {
            if target != group {
                bump(&c.events_skipped_other_group, 1);
                return Outcome::Skipped("replayed for another consumer group");
            }
        }
        let event = match codec::decode_entry(entry, &self.inner.registry) {
            Ok(event) => event,
            Err(DecodeFailure::Unregistered(event)) => {
                if !self.inner.subscribers.has_handlers_for(event.event_type()) {
                    bump(&c.events_skipped_unregistered, 1);
                    tracing::debug!(event_type = event.event_type(), message_id = %entry.id, "unregistered event type with no subscriber; skipped");
                    return Outcome::Skipped("unregistered event type");
                }
                // Wildcard handlers (and typed handlers, which decode themselves) still get it.
                *event
            }
            Err(DecodeFailure::Malformed(reason)) => {
                bump(&c.malformed_messages, 1);
                tracing::error!(message_id = %entry.id, %reason, "malformed stream entry; dead-lettering");
                return Outcome::Malformed(reason);
            }
        };
        if !self.inner.subscribers.has_handlers_for(event.event_type()) {
            bump(&c.events_skipped_no_subscriber, 1);
            return Outcome::Skipped("no subscriber in this bus");
        }
        if self.inner.dedupe.seen(event.event_id()) {
            bump(&c.duplicates_skipped, 1);
            tracing::debug!(message_id = %entry.id, event_id = %event.event_id(), "event already handled by this consumer; skipped");
            return Outcome::Skipped("duplicate event id");
        }
        bump(&c.events_consumed, 1);
        if !self.inner.config.enable_tracing {
            let report = self.inner.subscribers.dispatch_with(&event, false).await;
            return self.outcome_of(entry, &event, report);
        }
        let parent = entry
            .get("traceparent")
            .and_then(|p| TraceContext::parse(p, entry.get("tracestate")));
        let context = parent
            .as_ref()
            .map_or_else(TraceContext::new_root, TraceContext::child);
        let span = tracing::info_span!(
            "eventsource.process",
            otel.kind = "consumer",
            messaging.system = "redis",
            messaging.destination.name = %self.inner.stream,
            messaging.operation = "process",
            messaging.message.id = %entry.id,
            messaging.consumer.group.name = %group,
            event.type = event.event_type(),
            event.id = %event.event_id(),
            trace_id = %context.trace_id_hex(),
            span_id = %context.span_id_hex(),
            parent_span_id = parent.as_ref().map(TraceContext::span_id_hex).unwrap_or_default(),
        );
        let report = context
            .scope(self.inner.subscribers.dispatch_with(&event, true))
            .instrument(span)
            .await;
        self.outcome_of(entry, &event, report)
    }

    fn outcome_of(
        &self,
        entry: &StreamEntry,
        event: &eventsource_core::EventEnvelope,
        report: eventsource_core::bus::DispatchReport,
    ) -> Outcome {
        let c = &self.inner.counters;
        if report.is_success() {
            bump(&c.events_processed_success, 1);
            self.inner.dedupe.remember(event.event_id());
            Outcome::Handled
        } else {
            bump(&c.events_processed_failed, 1);
            bump(&c.handler_errors, report.failures.len() as u64);
            let summary = report.failure_summary();
            tracing::warn!(message_id = %entry.id, event_type = event.event_type(), failures = %summary, "handler failed; entry stays pending for retry");
            Outcome::Failed(summary)
        }
    }

    /// Moves an entry to the DLQ and acknowledges it, atomically (MULTI/EXEC), so a crash
    /// cannot leave it both dead-lettered and pending. With the DLQ disabled it is acked,
    /// logged and counted as dropped.
    pub(crate) async fn dead_letter(
        &self,
        entry: &StreamEntry,
        retry_count: u64,
        reason: &str,
    ) -> Result<(), RedisBusError> {
        let cfg = &self.inner.config;
        let mut pipe = redis::pipe();
        pipe.atomic();
        if cfg.enable_dlq {
            let fields = codec::dead_letter_fields(entry, retry_count, reason, &cfg.consumer_group);
            let cmd = pipe.cmd("XADD").arg(&self.inner.dlq_stream).arg("*");
            for (k, v) in &fields {
                cmd.arg(k).arg(v);
            }
        }
        pipe.cmd("XACK")
            .arg(&self.inner.stream)
            .arg(&cfg.consumer_group)
            .arg(&entry.id);
        pipe.cmd("DEL").arg(cfg.error_key(&entry.id));
        let mut conn = self.commands().await?;
        let _: Value = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.command_error("XADD (dead letter)", e))?;
        if cfg.enable_dlq {
            bump(&self.inner.counters.messages_sent_to_dlq, 1);
            tracing::error!(message_id = %entry.id, dlq = %self.inner.dlq_stream, %reason, "entry dead-lettered");
        } else {
            bump(&self.inner.counters.messages_dropped_dlq_disabled, 1);
            tracing::error!(message_id = %entry.id, %reason, "entry dropped: retries exhausted and the DLQ is disabled");
        }
        Ok(())
    }
}

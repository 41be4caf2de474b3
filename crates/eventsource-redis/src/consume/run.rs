//! The read loop.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use eventsource_core::support::Backoff;
use tokio_util::sync::CancellationToken;

use crate::bus::{RedisEventBus, bump};
use crate::codec::ReadEntry;
use crate::error::{Problem, RedisBusError};
use crate::handle::{Item, ItemBody};
use crate::lease::HeldBatch;
use crate::reader::{ReadError, ReadRequest, Reader};
use crate::recovery::Resolved;

/// The next batch is read while the current one is handled only when the last batch took
/// less than this: with slow handlers a consumer holds one batch, not two, so its group's
/// other consumers get the rest.
pub(crate) const READ_AHEAD_BELOW: Duration = Duration::from_millis(100);

/// How often an idle consumer tells Redis it is alive.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A finished read: the reader back (unless its connection broke), and what it read,
/// already held so the renewer protects it from the moment it arrived.
type ReadOutcome = (
    Option<Reader>,
    Result<(Vec<Item>, Option<Arc<HeldBatch>>), ReadError>,
);

/// Where the recovery walk is and when it runs next.
struct RecoveryTicker {
    every: Option<Duration>,
    next: Option<Instant>,
    cursor: String,
}

impl RecoveryTicker {
    fn due(&self) -> bool {
        self.next.is_some_and(|at| Instant::now() >= at)
    }
}

impl RedisEventBus {
    pub(super) async fn run(&self, stop: CancellationToken, abort: CancellationToken) {
        let cfg = &self.inner.config;
        self.check_name_in_use().await;
        let mut backoff = Backoff::new(Duration::from_millis(50), cfg.reconnect_max_delay);
        let read_timeout = cfg.block + cfg.socket_timeout;
        // One read connection for the consumer's life: `reader` is None only while the
        // read-ahead holds it, or after its connection broke.
        let mut reader: Option<Reader> = None;
        let mut read_ahead: Option<tokio::task::JoinHandle<ReadOutcome>> = None;
        let mut own_pending: Option<String> = Some("-".to_owned());
        let mut recovery = RecoveryTicker {
            every: (!cfg.recovery_interval.is_zero()).then_some(cfg.recovery_interval),
            next: None,
            cursor: "-".to_owned(),
        };
        let mut group_ok = false;
        let mut ensured_once = false;
        let mut last_batch = Duration::ZERO;
        let mut last_heartbeat: Option<Instant> = None;
        let metrics_every = (!cfg.metrics_interval.is_zero()).then_some(cfg.metrics_interval);
        let mut metrics_at: Option<Instant> = None;
        // Batches this consumer received are finished on a stop (never cancelled); only
        // recovery pages stop between entries.
        let finish = CancellationToken::new();

        while !stop.is_cancelled() {
            if self.inner.is_paused() {
                super::wait_resumed(self, &stop).await;
                continue;
            }
            if !group_ok {
                let checked = self.ensure_group_now().await;
                match checked {
                    Ok(created) => {
                        // Created again after this loop had it: a restart without
                        // persistence, an eviction, a deletion (however the loss showed:
                        // NOGROUP, UNBLOCKED, a reconnect).
                        if created && ensured_once {
                            tracing::warn!(
                                stream = %self.inner.stream,
                                group = %cfg.consumer_group,
                                "consumer group was missing (Redis restart, eviction or \
                                 deletion); recreated it"
                            );
                            bump(&self.inner.counters.group_recreations, 1);
                        }
                        ensured_once = true;
                        group_ok = true;
                    }
                    Err(e) => {
                        let problem = Problem::from_bus_error(&e);
                        if !self.wait_after(&problem, &mut backoff, &stop).await {
                            break;
                        }
                        continue;
                    }
                }
            }
            // 1. This consumer's own pending entries (after a start or a reconnect).
            if let Some(after) = &own_pending {
                let sent = Instant::now();
                let mut read = self.read_own_pending(after).await;
                if read.as_ref().is_err_and(RedisBusError::is_transient) {
                    // The command connection reconnects after its first failure: try again.
                    read = self.read_own_pending(after).await;
                }
                let (page, last) = match read {
                    Ok(read) => {
                        self.inner.reply_arrived(read.1.is_some(), sent.elapsed());
                        read
                    }
                    Err(e) => {
                        if crate::error::bus_error_is_timeout(&e) {
                            self.inner.reply_timed_out("reading own pending entries");
                        }
                        if crate::error::bus_error_is_nogroup(&e) {
                            group_ok = false;
                            own_pending = None;
                            continue;
                        }
                        let problem = Problem::from_bus_error(&e);
                        if !self.wait_after(&problem, &mut backoff, &stop).await {
                            break;
                        }
                        continue;
                    }
                };
                self.recovered_from_problem(&mut backoff);
                match last {
                    None => {
                        own_pending = None;
                        // Recovery's first tick follows the own pending entries at once.
                        recovery.next = recovery.every.map(|_| Instant::now());
                    }
                    Some(last) => {
                        own_pending = Some(format!("({last}"));
                        self.process_items(page, &finish, &abort).await;
                    }
                }
                continue;
            }
            // 2. One page of recovery when due (the next page at once while the walk goes on).
            if recovery.due() {
                let mut stats = crate::RecoveryStats::default();
                let resolved = Resolved::from_config(cfg, Default::default());
                let more = match self
                    .recover_page(&resolved, &mut recovery.cursor, &mut stats, &stop, &abort)
                    .await
                {
                    Ok(more) => more,
                    Err(e) => {
                        tracing::warn!(error = %e, "pending recovery failed; will retry");
                        false
                    }
                };
                bump(&self.inner.counters.recovery_runs, 1);
                stats.log();
                if !more {
                    recovery.cursor = "-".to_owned();
                    self.prune_quietly().await;
                }
                recovery.next = recovery.every.map(|every| {
                    if more {
                        Instant::now()
                    } else {
                        Instant::now() + every
                    }
                });
            }
            // 3. New entries (with a heartbeat: a blocking read that finds nothing does not
            // refresh the consumer's idle time in Redis 7.0, so an idle consumer would look
            // dead to `XINFO CONSUMERS` and the CLI's health).
            if last_heartbeat.is_none_or(|at| at.elapsed() >= HEARTBEAT_EVERY) {
                self.heartbeat().await;
                last_heartbeat = Some(Instant::now());
            }
            if let Some(every) = metrics_every
                && metrics_at.is_none_or(|at| at.elapsed() >= every)
            {
                self.refresh_gauges().await;
                metrics_at = Some(Instant::now());
            }
            // A read is cancelled when the run is aborted: its connection closes, so Redis
            // delivers nothing more to this consumer (a partition whose lease lapsed must not
            // receive entries after its successor claimed the pending ones).
            let (back, read) = match read_ahead.take() {
                Some(mut pending) => tokio::select! {
                    biased;
                    () = abort.cancelled() => {
                        pending.abort();
                        break;
                    }
                    joined = &mut pending => joined
                        .unwrap_or_else(|join| (None, Err(ReadError::Connection(join.to_string())))),
                },
                None => {
                    let r = match reader.take() {
                        Some(r) => r,
                        None => match self.blocking_reader().await {
                            Ok(r) => r,
                            Err(e) => {
                                let problem = e.problem("connecting the reader");
                                if !self.wait_after(&problem, &mut backoff, &stop).await {
                                    break;
                                }
                                continue;
                            }
                        },
                    };
                    tokio::select! {
                        biased;
                        () = abort.cancelled() => break,
                        read = self.read_new(r, read_timeout) => read,
                    }
                }
            };
            reader = back;
            match read {
                Ok((items, held)) => {
                    self.recovered_from_problem(&mut backoff);
                    if items.is_empty() {
                        continue;
                    }
                    if last_batch < READ_AHEAD_BELOW
                        && !stop.is_cancelled()
                        && let Some(r) = reader.take()
                    {
                        let bus = self.clone();
                        read_ahead =
                            Some(tokio::spawn(
                                async move { bus.read_new(r, read_timeout).await },
                            ));
                    }
                    let started = Instant::now();
                    self.process_held(items, held, &finish, &abort).await;
                    last_batch = started.elapsed();
                }
                Err(ReadError::NoGroup(_)) => {
                    // Recreated (and counted) at the top of the loop.
                    group_ok = false;
                }
                Err(
                    e
                    @ (ReadError::Connection(_) | ReadError::TimedOut(_) | ReadError::Protocol(_)),
                ) => {
                    reader = None;
                    group_ok = false;
                    // Entries Redis delivered in a reply we never saw are ours and pending:
                    // read them first after reconnecting, instead of waiting for recovery.
                    self.flush_acks().await;
                    own_pending = Some("-".to_owned());
                    bump(&self.inner.counters.reconnections, 1);
                    self.inner.metrics.reconnected();
                    self.inner.connected.store(false, Ordering::Relaxed);
                    let problem = e.problem("XREADGROUP");
                    if !self.wait_after(&problem, &mut backoff, &stop).await {
                        break;
                    }
                }
                Err(e @ ReadError::Server(_)) => {
                    // E.g. UNBLOCKED (stream deleted while blocking), OOM, MISCONF, NOPERM.
                    group_ok = false;
                    let problem = e.problem("XREADGROUP");
                    if !self.wait_after(&problem, &mut backoff, &stop).await {
                        break;
                    }
                }
            }
        }
        if let Some(pending) = read_ahead.take() {
            if abort.is_cancelled() {
                // Abandoned: close the read; what Redis delivered stays pending.
                pending.abort();
            } else if let Ok((_, Ok((items, held)))) = pending.await
                && !items.is_empty()
            {
                // Delivered to us while we were stopping: handle it rather than leave it
                // pending.
                self.process_held(items, held, &finish, &abort).await;
            }
        }
        self.flush_acks().await;
        tracing::debug!(consumer = %self.inner.consumer_name, "consume loop stopped");
    }

    /// Makes sure the group exists; a dropped command connection (which reconnects on its
    /// first failure) is tried a second time before backing off.
    /// Returns whether it was created now.
    async fn ensure_group_now(&self) -> Result<bool, RedisBusError> {
        let mut result = Err(RedisBusError::AlreadyConsuming);
        for _ in 0..2 {
            result = match self.commands().await {
                Ok(mut conn) => self.ensure_group(&mut conn).await,
                Err(e) => Err(e),
            };
            if !result.as_ref().is_err_and(RedisBusError::is_transient) {
                break;
            }
        }
        result
    }

    /// Creates this consumer in its group (if needed) and refreshes its idle time without
    /// reading or counting anything: `XREADGROUP` of this consumer's pending entries after an
    /// id no entry reaches returns nothing.
    async fn heartbeat(&self) {
        let Ok(mut conn) = self.commands().await else {
            return;
        };
        let sent = Instant::now();
        let result: redis::RedisResult<redis::Value> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.inner.config.consumer_group)
            .arg(&self.inner.consumer_name)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(&self.inner.stream)
            // Not the largest id itself: Redis reads that one like `>` (new entries).
            .arg("18446744073709551615-18446744073709551614")
            .query_async(&mut conn)
            .await;
        match result {
            Ok(_) => self.inner.lease.observe_rtt(sent.elapsed()),
            Err(e) => tracing::debug!(error = %e, "consumer heartbeat failed"),
        }
    }

    /// Sets the gauges (pending, lag, dead-letter depth) from `XINFO GROUPS` and `XLEN`. A
    /// failure leaves them as they were (the loop reports connection problems itself).
    async fn refresh_gauges(&self) {
        match self.try_stream_info().await {
            Ok(info) => {
                let lag = info
                    .consumer_groups
                    .iter()
                    .find(|g| g.name == self.inner.config.consumer_group)
                    .and_then(|g| g.lag);
                self.inner
                    .metrics
                    .gauges(info.pending_messages, lag, info.dlq_messages);
            }
            Err(e) => tracing::debug!(error = %e, "gauges not refreshed"),
        }
    }

    /// Reads new entries (`>`) and holds them at once.
    async fn read_new(&self, reader: Reader, timeout: Duration) -> ReadOutcome {
        let cfg = &self.inner.config;
        let request = ReadRequest {
            group: cfg.consumer_group.clone(),
            consumer: self.inner.consumer_name.clone(),
            count: self.inner.read_count(),
            block_ms: Some(crate::config::millis(cfg.block).max(1)),
            stream: self.inner.stream.clone(),
            id: ">".to_owned(),
            max_entry_bytes: cfg.max_entry_bytes,
        };
        let sent = Instant::now();
        let (back, read) = reader.read(request, timeout).await;
        match &read {
            Ok(entries) => self
                .inner
                .reply_arrived(!entries.is_empty(), sent.elapsed()),
            Err(ReadError::TimedOut(_)) => self.inner.reply_timed_out("XREADGROUP"),
            Err(_) => {}
        }
        let read = read.map(|entries| {
            let items: Vec<Item> = entries
                .into_iter()
                .map(|e| fresh_item(e, cfg.max_retries))
                .collect();
            let held = (!items.is_empty()).then(|| Arc::new(self.hold_items(&items)));
            (items, held)
        });
        (back, read)
    }

    /// Logs and records a problem, then sleeps the backoff delay (the longest one for
    /// problems an operator must fix). Returns false when a stop came first.
    async fn wait_after(
        &self,
        problem: &Problem,
        backoff: &mut Backoff,
        stop: &CancellationToken,
    ) -> bool {
        self.inner.set_problem(problem);
        let delay = if problem.transient {
            backoff.next_delay()
        } else {
            self.inner.config.reconnect_max_delay
        };
        tokio::select! {
            () = tokio::time::sleep(delay) => !stop.is_cancelled(),
            () = stop.cancelled() => false,
        }
    }

    fn recovered_from_problem(&self, backoff: &mut Backoff) {
        backoff.reset();
        if self.inner.clear_problem() {
            tracing::info!(stream = %self.inner.stream, "Redis reachable again; consuming");
        }
    }
}

/// A freshly read entry: no start yet, and its delivery counts as its start.
fn fresh_item(entry: ReadEntry, max_retries: u32) -> Item {
    let (id, body) = match entry {
        ReadEntry::Present(e) => (e.id.clone(), ItemBody::Present(e)),
        ReadEntry::Deleted(id) => (id, ItemBody::Deleted),
        ReadEntry::Oversized { id, bytes } => (id, ItemBody::Oversized(bytes)),
    };
    Item {
        id,
        body,
        starts: 0,
        marked: true,
        max_retries,
    }
}

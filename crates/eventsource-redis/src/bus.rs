//! The bus itself: construction, its state (counters, the consume loop's lifecycle, the
//! partition fence), accessors and subscriptions (connections are in `connect`, publishing
//! in `publish`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use eventsource_core::EventRegistry;
use eventsource_core::bus::{EventBus, Subscribers};

use crate::conn::{ClusterShared, Commands};
use tokio_util::sync::CancellationToken;

use crate::config::RedisEventBusConfig;
use crate::error::{Problem, RedisBusError};

/// Counters of one bus instance (atomics; read with [`RedisEventBus::stats`]).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) events_published: AtomicU64,
    pub(crate) events_consumed: AtomicU64,
    pub(crate) events_processed_success: AtomicU64,
    pub(crate) events_processed_failed: AtomicU64,
    pub(crate) messages_recovered: AtomicU64,
    pub(crate) messages_sent_to_dlq: AtomicU64,
    pub(crate) handler_errors: AtomicU64,
    pub(crate) reconnections: AtomicU64,
    pub(crate) events_skipped_no_subscriber: AtomicU64,
    pub(crate) events_skipped_unregistered: AtomicU64,
    pub(crate) events_skipped_other_group: AtomicU64,
    pub(crate) malformed_messages: AtomicU64,
    pub(crate) messages_dropped_dlq_disabled: AtomicU64,
    pub(crate) entries_deleted_while_pending: AtomicU64,
    pub(crate) group_recreations: AtomicU64,
    pub(crate) recovery_runs: AtomicU64,
    pub(crate) acks_not_applied: AtomicU64,
    pub(crate) consumer_name_in_use: AtomicU64,
    pub(crate) duplicates_skipped: AtomicU64,
    pub(crate) events_dispatched: AtomicU64,
    pub(crate) events_rejected: AtomicU64,
    pub(crate) entries_taken_over: AtomicU64,
    pub(crate) entries_released: AtomicU64,
    pub(crate) dead_letters_skipped_acked: AtomicU64,
    pub(crate) acks_fenced: AtomicU64,
}

/// The ids of the last `capacity` events this consumer handled successfully.
#[derive(Debug, Default)]
pub(crate) struct Dedupe {
    capacity: usize,
    state: std::sync::Mutex<(
        std::collections::HashSet<uuid::Uuid>,
        std::collections::VecDeque<uuid::Uuid>,
    )>,
}

impl Dedupe {
    fn new(capacity: usize) -> Self {
        Self {
            capacity,
            state: std::sync::Mutex::new(Default::default()),
        }
    }

    /// Whether this event id was handled successfully recently (always false when off).
    pub(crate) fn seen(&self, id: uuid::Uuid) -> bool {
        self.capacity > 0
            && self
                .state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .contains(&id)
    }

    pub(crate) fn remember(&self, id: uuid::Uuid) {
        if self.capacity == 0 {
            return;
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (set, order) = &mut *guard;
        if set.insert(id) {
            order.push_back(id);
            if order.len() > self.capacity
                && let Some(old) = order.pop_front()
            {
                set.remove(&old);
            }
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// The consume loop's lifecycle state.
#[derive(Debug)]
pub(crate) struct Control {
    /// Cancelled by `stop_consuming`: stops the running loop, or the next one to start.
    pub(crate) stop: std::sync::Mutex<CancellationToken>,
    /// Cancelled when a shutdown gives up waiting: running handlers are abandoned.
    pub(crate) abort: std::sync::Mutex<CancellationToken>,
    /// Whether a consume loop runs.
    pub(crate) running: tokio::sync::watch::Sender<bool>,
    /// Why consuming is paused, if it is.
    pub(crate) paused: std::sync::Mutex<Option<String>>,
    pub(crate) resumed: tokio::sync::Notify,
    /// Entries rejected by this version of their type since the last one that decoded.
    pub(crate) rejected_streak: AtomicU64,
    /// What keeps the consumer from working right now, if anything.
    pub(crate) problem: std::sync::Mutex<Option<Problem>>,
    /// Entries given back unhandled while stopping (for the shutdown report).
    pub(crate) left_pending: std::sync::Mutex<Vec<String>>,
}

impl Control {
    fn new() -> Self {
        Self {
            stop: std::sync::Mutex::new(CancellationToken::new()),
            abort: std::sync::Mutex::new(CancellationToken::new()),
            running: tokio::sync::watch::channel(false).0,
            paused: std::sync::Mutex::new(None),
            resumed: tokio::sync::Notify::new(),
            rejected_streak: AtomicU64::new(0),
            problem: std::sync::Mutex::new(None),
            left_pending: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// The bus-level stop token (the current or next run's).
    pub(crate) fn stop_token(&self) -> CancellationToken {
        lock(&self.stop).clone()
    }
}

pub(crate) fn lock_read<T>(m: &std::sync::RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(|p| p.into_inner())
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// Entries to ask for in the next read (see `read_count`).
    pub(crate) fn read_count(&self) -> usize {
        self.read_count.load(Ordering::Relaxed).max(1)
    }

    /// A reply timed out: ask for half as many entries next time, so a batch too large for
    /// the link (a slow network, large events) cannot fail the same way for ever.
    pub(crate) fn reply_timed_out(&self, what: &str) {
        let before = self.read_count();
        let after = (before / 2).max(1);
        self.read_count.store(after, Ordering::Relaxed);
        if after < before {
            tracing::warn!(
                stream = %self.stream,
                read_count = after,
                "{what}: the reply for {before} entries did not arrive within socket_timeout \
                 ({:?}); reading {after} at a time until replies arrive in time (after an \
                 outage this recovers by itself; on a slow link or with large entries, raise \
                 socket_timeout)",
                self.config.socket_timeout
            );
        }
    }

    /// A reply arrived in time (`took` from sending the read): after one that carried
    /// entries, grow back towards `batch_size` — doubling when it came back quickly (under a
    /// quarter of `socket_timeout`: the timeouts were an outage, not the link), else by one
    /// (halve on timeout, add one on success, as TCP's congestion window does: a link that
    /// cannot carry a full batch costs one timeout per `batch_size / 2` reads, not one per
    /// read).
    pub(crate) fn reply_arrived(&self, carried_entries: bool, took: Duration) {
        let now = self.read_count.load(Ordering::Relaxed);
        if carried_entries && now < self.config.batch_size {
            let quick = took < self.config.socket_timeout / 4;
            let next = if quick { now * 2 } else { now + 1 };
            self.read_count
                .store(next.min(self.config.batch_size), Ordering::Relaxed);
        }
    }

    pub(crate) fn is_paused(&self) -> bool {
        lock(&self.control.paused).is_some()
    }

    pub(crate) fn pause(&self, reason: String) {
        tracing::error!(%reason, "consumer paused");
        *lock(&self.control.paused) = Some(reason);
    }

    /// An entry decoded: the run of rejected entries is over.
    pub(crate) fn note_decoded(&self) {
        if self.control.rejected_streak.load(Ordering::Relaxed) != 0 {
            self.control.rejected_streak.store(0, Ordering::Relaxed);
        }
    }

    /// An entry was rejected by this version of its type; pauses after
    /// `pause_after_rejections` in a row.
    pub(crate) fn note_rejection(&self, event_type: &str, reason: &str) {
        let streak = self.control.rejected_streak.fetch_add(1, Ordering::Relaxed) + 1;
        let limit = u64::from(self.config.pause_after_rejections);
        if limit > 0 && streak >= limit && !self.is_paused() {
            self.pause(format!(
                "{streak} entries in a row rejected by this version of their event type (last: \
                 `{event_type}`: {reason}). Entries are left pending, not dead-lettered: deploy a \
                 version that can decode them (or roll back), then resume or restart this consumer"
            ));
        }
    }

    /// Records a problem; logs it at warn when it is new, at debug while it lasts.
    pub(crate) fn set_problem(&self, problem: &Problem) {
        let mut current = lock(&self.control.problem);
        let new = current
            .as_ref()
            .is_none_or(|p| p.message != problem.message);
        if new {
            if problem.transient {
                tracing::warn!(problem = %problem.message, "Redis unavailable; consumer retrying with backoff");
            } else {
                tracing::error!(problem = %problem.message, "consumer cannot work until this is fixed; retrying at the longest backoff");
            }
            *current = Some(problem.clone());
        } else {
            tracing::debug!(problem = %problem.message, "still failing");
        }
    }

    /// Clears the problem; returns whether there was one.
    pub(crate) fn clear_problem(&self) -> bool {
        let mut current = lock(&self.control.problem);
        if current.is_none() {
            return false;
        }
        *current = None;
        true
    }
}

pub(crate) struct Inner {
    pub(crate) config: RedisEventBusConfig,
    pub(crate) consumer_name: String,
    pub(crate) stream: String,
    pub(crate) dlq_stream: String,
    pub(crate) client: redis::Client,
    /// The cluster this bus's partition lives on (`cluster = true`), shared by the
    /// partitions of one [`PartitionedEventBus`](crate::PartitionedEventBus).
    pub(crate) cluster: Option<Arc<ClusterShared>>,
    /// While set, acknowledgements and dead letters apply only while the partition's owner
    /// key still holds this consumer's lease (one script checks and acts).
    pub(crate) fence: std::sync::RwLock<Option<crate::fence::Fence>>,
    pub(crate) registry: EventRegistry,
    pub(crate) subscribers: Arc<Subscribers>,
    /// A bus of its own, not a partition of a `PartitionedEventBus`: it refuses a prefix a
    /// partitioned bus uses (a partition instead warns about evictable leases in its health).
    pub(crate) guard_partitioned: bool,
    pub(crate) counters: Counters,
    /// The same events through the `metrics` facade.
    pub(crate) metrics: crate::metrics::BusMetrics,
    /// The multiplexed command connection (publish, ack, claim, info). Created on first use;
    /// reconnects by itself.
    pub(crate) commands: tokio::sync::Mutex<Option<Commands>>,
    /// A copy of the connection for the hot path (no async lock per command).
    pub(crate) commands_ready: std::sync::RwLock<Option<Commands>>,
    pub(crate) connected: AtomicBool,
    /// Stop, abort, pause and the current problem of the consume loop.
    pub(crate) control: Control,
    /// Entries delivered to this consumer and not yet acknowledged, kept renewed.
    pub(crate) lease: crate::lease::Lease,
    /// Recently handled event ids (`dedupe_window`).
    pub(crate) dedupe: Dedupe,
    /// The acknowledgement of the last handled batch, sent while the next one is handled.
    pub(crate) ack_in_flight: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Entries asked for per read: `batch_size`, halved after a reply that did not arrive
    /// within the response timeout, one more after each reply with entries that did.
    pub(crate) read_count: std::sync::atomic::AtomicUsize,
    /// Safety checks the Redis user may not run (ACL): each said once at warn level, and
    /// listed in the health's warnings with the grant to add.
    pub(crate) skipped_checks: std::sync::Mutex<Vec<String>>,
    /// Entries whose handlers finished here but whose acknowledgement failed, with how many
    /// times: what a dead letter's reason can say for certain about earlier runs. Bounded
    /// (`FINISHED_UNACKED_MAX`); forgotten when the entry is dead-lettered.
    pub(crate) finished_unacked: std::sync::Mutex<std::collections::HashMap<String, u32>>,
}

/// The most entries [`Inner::finished_unacked`] remembers.
pub(crate) const FINISHED_UNACKED_MAX: usize = 10_000;

/// A distributed event bus on Redis Streams, wire-compatible with eventsource-py.
///
/// Cheap to clone: clones share connections, subscriptions and counters (spawn
/// `start_consuming` on a clone). See the crate docs for the guarantees.
#[derive(Clone)]
pub struct RedisEventBus {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisEventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisEventBus")
            .field("stream", &self.inner.stream)
            .field("consumer_group", &self.inner.config.consumer_group)
            .field("consumer_name", &self.inner.consumer_name)
            .field("connected", &self.is_connected())
            .field("consuming", &self.is_consuming())
            .finish()
    }
}

impl RedisEventBus {
    /// A bus with this configuration, decoding events through `registry`. Does not connect.
    ///
    /// # Errors
    /// [`RedisBusError::Config`] naming the invalid field.
    pub fn new(
        config: RedisEventBusConfig,
        registry: EventRegistry,
    ) -> Result<Self, RedisBusError> {
        config.validate()?;
        for (field, set) in [
            ("partitions", config.partitions > 1),
            ("cluster", config.cluster),
        ] {
            if set {
                return Err(crate::ConfigError::new(
                    field,
                    "is an option of PartitionedEventBus: build that instead of RedisEventBus",
                )
                .into());
            }
        }
        Self::build(config, registry, Arc::new(Subscribers::new()), None, true)
    }

    /// A bus on one stream, sharing `subscribers` (and a cluster connection) with the other
    /// partitions of a [`PartitionedEventBus`](crate::PartitionedEventBus).
    pub(crate) fn part(
        config: RedisEventBusConfig,
        registry: EventRegistry,
        subscribers: Arc<Subscribers>,
        cluster: Option<Arc<ClusterShared>>,
    ) -> Result<Self, RedisBusError> {
        Self::build(config, registry, subscribers, cluster, false)
    }

    fn build(
        config: RedisEventBusConfig,
        registry: EventRegistry,
        subscribers: Arc<Subscribers>,
        cluster: Option<Arc<ClusterShared>>,
        guard_partitioned: bool,
    ) -> Result<Self, RedisBusError> {
        let client = config.client()?;
        let consumer_name = config.effective_consumer_name();
        Ok(Self {
            inner: Arc::new(Inner {
                stream: config.stream_name(),
                dlq_stream: config.dlq_stream_name(),
                consumer_name,
                client,
                cluster,
                fence: std::sync::RwLock::new(None),
                guard_partitioned,
                registry,
                subscribers,
                counters: Counters::default(),
                metrics: crate::metrics::BusMetrics::new(
                    &config.stream_name(),
                    &config.consumer_group,
                ),
                commands: tokio::sync::Mutex::new(None),
                commands_ready: std::sync::RwLock::new(None),
                connected: AtomicBool::new(false),
                control: Control::new(),
                lease: crate::lease::Lease::default(),
                read_count: std::sync::atomic::AtomicUsize::new(config.batch_size),
                skipped_checks: std::sync::Mutex::new(Vec::new()),
                finished_unacked: std::sync::Mutex::new(std::collections::HashMap::new()),
                ack_in_flight: tokio::sync::Mutex::new(None),
                dedupe: Dedupe::new(config.dedupe_window),
                config,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisEventBusConfig {
        &self.inner.config
    }

    /// The registry events are decoded through.
    pub fn registry(&self) -> &EventRegistry {
        &self.inner.registry
    }

    /// This consumer's name in its group.
    pub fn consumer_name(&self) -> &str {
        &self.inner.consumer_name
    }

    /// The main stream's key.
    pub fn stream_name(&self) -> &str {
        &self.inner.stream
    }

    /// The dead-letter stream's key.
    pub fn dlq_stream_name(&self) -> &str {
        &self.inner.dlq_stream
    }

    /// Whether the last connection attempt or command succeeded.
    pub fn is_connected(&self) -> bool {
        self.inner.connected.load(Ordering::Relaxed)
    }

    /// Whether `start_consuming` is running.
    pub fn is_consuming(&self) -> bool {
        *self.inner.control.running.borrow()
    }
}

impl EventBus for RedisEventBus {
    fn subscribers(&self) -> &Subscribers {
        &self.inner.subscribers
    }

    fn event_registry(&self) -> Option<&EventRegistry> {
        Some(&self.inner.registry)
    }
}

//! # eventsource-redis
//!
//! A distributed event bus on Redis Streams with the same subscription interface as
//! [`InMemoryEventBus`](eventsource_core::InMemoryEventBus), wire-compatible with
//! eventsource-py 0.15.1: Python and Rust services can publish to, consume from, and replay
//! the dead letters of the same streams.
//!
//! ```no_run
//! use eventsource_core::prelude::*;
//! use eventsource_redis::{RedisEventBus, RedisEventBusConfig};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct OrderCreated {
//!     customer_id: String,
//!     total_amount: f64,
//! }
//! eventsource_core::domain_event!(OrderCreated, "OrderCreated", aggregate = "Order");
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let registry = EventRegistry::new();
//! registry.register::<OrderCreated>()?;
//! let bus = RedisEventBus::new(
//!     RedisEventBusConfig::default()
//!         .redis_url("redis://localhost:6379")
//!         .stream_prefix("myapp")
//!         .consumer_group("default"),
//!     registry,
//! )?;
//! bus.connect().await?;
//! bus.subscribe(|e: Event<OrderCreated>| async move {
//!     println!("Order created: {} - ${}", e.metadata.aggregate_id, e.total_amount);
//! });
//! let event = Event::new(uuid::Uuid::new_v4(), OrderCreated {
//!     customer_id: "cust-123".into(),
//!     total_amount: 99.99,
//! });
//! bus.publish(&[event.into_envelope()]).await?;
//! let consumer = tokio::spawn({
//!     let bus = bus.clone();
//!     async move { bus.start_consuming().await }
//! });
//! // ... the application runs ...
//! bus.stop_consuming();
//! consumer.await??;
//! bus.disconnect().await;
//! # Ok(()) }
//! ```
//!
//! ## What you use
//! Everything a program names is at the crate root: the buses ([`RedisEventBus`],
//! [`PartitionedEventBus`]), their configuration ([`RedisEventBusConfig`]), the reports they
//! return ([`BusStats`], [`StreamInfo`], [`Health`], [`DlqMessage`], [`RecoveryStats`],
//! [`TrimReport`], ...), the errors ([`RedisBusError`], [`ConfigError`]), the service
//! ([`RedisEventBusService`], [`shutdown_signal`]), [`TraceContext`] and [`FencingToken`];
//! the `http` feature adds the `http` module (`/metrics`, `/healthz`, `/readyz`). The modules
//! behind them are private: `docs/architecture.md` maps them (connections, publishing, the
//! read loop, the lease, recovery, dead letters, scripts, partitions).
//!
//! ## Guarantees
//! - **At-least-once per consumer group.** An entry is acknowledged only after every handler
//!   subscribed to its type (and every wildcard handler) succeeded. A handler error or panic
//!   leaves it pending; a crash before the ack leaves it pending. Pending entries are
//!   redelivered: to the same consumer when it restarts with the same name (it re-reads its
//!   own pending entries first, also after a reconnect), or to any consumer of the group by
//!   recovery once they have been idle `pending_idle_ms`. Handlers must therefore be
//!   idempotent (dedupe by `event_id`).
//! - **No theft from a live consumer.** A consumer keeps the entries it holds (queued in its
//!   batch or read-ahead, running, or awaiting their ack) renewed, so another consumer takes
//!   an entry from a live one only when **one handler call takes longer than
//!   `pending_idle_ms`** (then the entry comes back to the group, so a hung handler does not
//!   keep it forever). A consumer skips queued entries another consumer took meanwhile
//!   (counted as `entries_taken_over`) and never claims its own held entries in recovery.
//! - **Fan-out and load balancing.** Every consumer group receives every event; inside a
//!   group each entry is delivered to one consumer at a time. With slow handlers (a batch
//!   taking over 100 ms) a consumer does not read ahead, so it holds one batch, not two.
//! - **Order.** One consumer handles its entries one at a time in stream order (or, with
//!   `handler_concurrency`, each aggregate's in stream order); there is no order across
//!   consumers of a [`RedisEventBus`], and a retried entry runs after later ones. A
//!   [`PartitionedEventBus`] keeps each aggregate's order across all the consumers of a group:
//!   a partition has one owner at a time, a new owner first takes the pending entries of the
//!   previous one, and an owner that lost its lease can no longer acknowledge (the check and
//!   the acknowledgement are one script). The exception: an owner paused or cut off from
//!   Redis for longer than `partition_lease` while a handler runs (its successor may run that
//!   entry again; the late acknowledgement is refused and counted as `acks_fenced`).
//! - **Attempts are handler starts.** Redis's delivery count is kept equal to the number of
//!   times a handler started on the entry, so a consumer killed repeatedly while holding a
//!   batch dead-letters (after `1 + max_retries` starts) only the entry that was running, and
//!   a dead letter's `retry_count` and reason are true. The one exception: a consumer killed
//!   within 100 ms of receiving a batch leaves its unstarted entries counted as started once.
//! - **Nothing is dropped silently.** Each entry is handled; or acknowledged and skipped for
//!   a counted reason (its type has no subscriber in this bus; its type is not registered and
//!   no wildcard handler exists; it is a replay meant for another group; it was deleted while
//!   pending); or dead-lettered with the reason (it is malformed — not UTF-8 where text is
//!   needed, not JSON, no payload, invalid base fields, larger than `max_entry_bytes` — or its
//!   handlers failed `1 + max_retries` times). An entry whose data this version of its Rust
//!   type rejects is counted apart (`events_rejected`) and by default retried like a handler
//!   failure; after `pause_after_rejections` in a row the consumer pauses (see
//!   [`RejectedPolicy`]). With `enable_dlq = false` exhausted entries
//!   are acknowledged, logged at error level and counted as dropped.
//! - **Bytes are kept.** Fields are read as bytes; a dead letter and its replay copy the
//!   entry byte for byte inside Redis.
//! - **Crash and restart.** A consumer killed mid-batch loses nothing: its unacknowledged
//!   entries are pending and come back as above. A Redis restart (or a lost connection) is
//!   survived: the consumer reconnects with jittered backoff on one read connection, recreates
//!   its group when Redis lost it (`NOGROUP`), re-reads its own pending entries, and counts
//!   it all. Without Redis persistence, what Redis lost is lost. A group is (re)created at id
//!   `0`, so a group destroyed on a stream that still has entries reads them all again:
//!   duplicates rather than losses. A wrong password or a missing ACL permission is not
//!   retried quickly as if transient: the error names what to fix, and health reports it.
//! - **Stopping.** A stop finishes and acknowledges the batch in hand; a stop requested
//!   before consuming started is not lost; [`RedisEventBus::shutdown`] bounds the wait and
//!   reports what it left pending.
//! - **Trimming.** This bus never trims by itself. [`RedisEventBus::trim_acknowledged`]
//!   removes only what every consumer group has received and acknowledged. Trimming with
//!   `MAXLEN` instead can drop entries a lagging group has not read yet; entries trimmed while
//!   pending are counted (`entries_deleted_while_pending`) on every path.
//! - **Dead letters are atomic and exact.** Writing the dead letter and acknowledging the
//!   original happen in one script that writes the dead letter only if the acknowledgement
//!   applies: an entry its owner handled meanwhile is never also dead-lettered. Replaying a
//!   dead letter republishes it at most once, however many operators replay it at once.
//! - **Counters follow eventsource-py.** `events_consumed` rises when an entry's handlers
//!   succeeded and its acknowledgement reached Redis; `events_dispatched` counts deliveries.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod bus;
// The stream entry format, for the workspace's benchmark and CLI; not a stable API.
#[doc(hidden)]
pub mod codec;
mod config;
mod conn;
mod connect;
mod consume;
mod dlq;
mod error;
mod fence;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod handle;
mod health;
#[cfg(feature = "http")]
pub mod http;
mod info;
mod lease;
mod metrics;
mod ops;
#[cfg(feature = "otel")]
mod otel;
mod partitioned;
mod publish;
mod reader;
mod recovery;
mod scripts;
mod service;
mod trace;
mod trim;

pub use bus::RedisEventBus;
pub use config::{ConfigError, ENV_PREFIX, RedisEventBusConfig, RejectedPolicy, redact_url};
pub use consume::ShutdownReport;
pub use dlq::{DlqMessage, HistoryError, HistorySummary, ReplayOutcome};
pub use error::{PartitionFailure, RedisBusError};
/// The error classification shared by the workspace ([`RedisBusError::kind`]).
pub use eventsource_core::ErrorKind;
pub use fence::FencingToken;
pub use health::{Health, HealthStatus};
pub use info::{BusStats, GroupInfo, PendingEntry, StreamDetails, StreamInfo};
pub use ops::{ConsumerInfo, PurgeOutcome};
pub use partitioned::{
    OwnershipStats, PartitionState, PartitionTotals, PartitionedEventBus, partition_of,
};
pub use recovery::{RecoveryOptions, RecoveryStats};
/// redis-rs, whose types appear in this crate's public API (`redis::RedisError` as the cause
/// of [`RedisBusError`], `redis::Client` from [`RedisEventBusConfig::client`]): use this
/// re-export instead of depending on a matching redis-rs version yourself.
pub use redis;
pub use service::{RedisEventBusService, shutdown_signal};
pub use trace::TraceContext;
pub use trim::TrimReport;

/// The README's Rust examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

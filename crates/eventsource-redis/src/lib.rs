//! # eventsource-redis
//!
//! A distributed event bus on Redis Streams with the same subscription interface as
//! [`InMemoryEventBus`](eventsource_core::InMemoryEventBus), wire-compatible with
//! eventsource-py 0.15.1: Python and Rust services can publish to, consume from, and replay
//! the dead letters of the same streams.
//!
//! ```no_run
//! use eventsource_core::prelude::*;
//! use eventsource_core::testkit::orders::OrderCreated;
//! use eventsource_redis::{RedisEventBus, RedisEventBusConfig};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let registry = EventRegistry::new();
//! registry.register::<OrderCreated>()?;
//! let bus = RedisEventBus::new(
//!     RedisEventBusConfig {
//!         redis_url: "redis://localhost:6379".into(),
//!         stream_prefix: "myapp".into(),
//!         consumer_group: "default".into(),
//!         ..Default::default()
//!     },
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
//! ## Layout
//! - [`config`]: every option with the tutorial's names and defaults, validation, key names.
//! - [`codec`]: stream entry ⇄ event (shared/spec/wire-format.md).
//! - `bus`: connections, publishing (one pipelined round trip per batch), subscriptions.
//! - `consume`: the read loop — own pending entries first, then new ones; dispatch; ack.
//! - [`recovery`]: claiming idle pending entries, attempts, dead-lettering.
//! - [`dlq`]: list, inspect, replay dead letters; replay history into a projection.
//! - [`info`]: statistics, stream info, health.
//! - [`service`]: run until SIGTERM/SIGINT and shut down gracefully.
//! - [`trace`]: W3C trace context carried in entry fields.
//! - [`trim`]: trimming only what every group has acknowledged.
//!
//! ## Guarantees
//! - **At-least-once per consumer group.** An entry is acknowledged only after every handler
//!   subscribed to its type (and every wildcard handler) succeeded. A handler error or panic
//!   leaves it pending; a crash before the ack leaves it pending. Pending entries are
//!   redelivered: to the same consumer when it restarts with the same name (it re-reads its
//!   own pending entries first), or to any consumer of the group by recovery once they have
//!   been idle `pending_idle_ms`. Handlers must therefore be idempotent (dedupe by
//!   `event_id`). A handler slower than `pending_idle_ms` can be run twice.
//! - **Fan-out and load balancing.** Every consumer group receives every event; inside a
//!   group each entry is delivered to one consumer at a time.
//! - **Order.** One consumer handles its entries one at a time in stream order; there is no
//!   order across consumers, and a retried entry runs after later ones.
//! - **Nothing is dropped silently.** Each entry is handled; or acknowledged and skipped for
//!   a counted reason (its type has no subscriber in this bus; its type is not registered and
//!   no wildcard handler exists; it is a replay meant for another group; it was deleted while
//!   pending); or dead-lettered with the reason (it is malformed — retrying cannot help — or
//!   its handlers failed `1 + max_retries` times). With `enable_dlq = false` the last case is
//!   acknowledged, logged at error level and counted as dropped.
//! - **Crash and restart.** A consumer killed mid-batch loses nothing: its unacknowledged
//!   entries are pending and come back as above. A Redis restart (or a lost connection) is
//!   survived: the consumer reconnects with jittered backoff, recreates its group when Redis
//!   lost it (`NOGROUP`), and counts both. Without Redis persistence, what Redis lost is lost.
//!   A group is (re)created at id `0`, so a group destroyed on a stream that still has entries
//!   reads them all again: duplicates rather than losses.
//! - **Trimming.** This bus never trims by itself. [`RedisEventBus::trim_acknowledged`]
//!   removes only what every consumer group has received and acknowledged. Trimming with
//!   `MAXLEN` instead can drop entries a lagging group has not read yet; entries trimmed while
//!   pending are acknowledged and counted (`entries_deleted_while_pending`).
//! - **Dead letters are atomic.** Writing the dead letter and acknowledging the original
//!   happen in one MULTI/EXEC, so a crash cannot leave an entry both pending and
//!   dead-lettered, or in neither place.
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod bus;
pub mod codec;
pub mod config;
mod consume;
pub mod dlq;
mod error;
pub mod info;
mod reader;
pub mod recovery;
pub mod service;
pub mod trace;
pub mod trim;

pub use bus::RedisEventBus;
pub use config::{ConfigError, RedisEventBusConfig};
pub use dlq::{DlqMessage, HistoryError, HistorySummary};
pub use error::RedisBusError;
pub use info::{BusStats, GroupInfo, Health, PendingEntry, StreamDetails, StreamInfo};
pub use recovery::{RecoveryOptions, RecoveryStats};
pub use service::RedisEventBusService;
pub use trim::TrimReport;

/// The README's Rust examples, compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;

//! # eventsource-postgres
//!
//! A PostgreSQL [`EventStore`](eventsource_core::EventStore) and a transactional outbox relay.
//!
//! ```no_run
//! use std::sync::Arc;
//! use eventsource_core::prelude::*;
//! use eventsource_postgres::{PostgresEventStore, PostgresStoreConfig};
//! # async fn demo() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let store = PostgresEventStore::connect(
//!     "postgres://postgres@127.0.0.1:5432/test",
//!     PostgresStoreConfig { schema: "orders".into(), outbox: true, ..Default::default() },
//! ).await?;
//! let store: Arc<dyn EventStore> = Arc::new(store);
//! # let _ = store; Ok(()) }
//! ```
//!
//! ## Guarantees
//! - **Atomic appends** per batch, with optimistic concurrency: the unique
//!   `(aggregate_id, aggregate_type, version)` constraint makes exactly one of two racing
//!   writers win; the other gets [`StoreError::Concurrency`](eventsource_core::StoreError)
//!   naming expected and actual versions. A duplicate `event_id` is
//!   [`StoreError::DuplicateEventId`](eventsource_core::StoreError), so retrying an append
//!   whose commit was lost cannot store it twice.
//! - **A global order no reader skips, with parallel appends.** A `bigserial` position is
//!   taken at insert, not at commit, so a transaction that commits later can hold a lower
//!   position than one already visible. Every row therefore records its transaction id
//!   (`xid8`), the global feed is ordered by `(transaction id, position)`
//!   ([`StoreCursor`]), and readers only see transactions older than every transaction still
//!   running (`pg_snapshot_xmin`): a later commit always sorts after what a reader has seen.
//!   Appends need no global lock and commit in parallel; each aggregate's versions stay in
//!   order (an append reads its stream's version before its first write, so its transaction
//!   id is larger than that of every append it saw). `read_all` follows the same order (its
//!   `after_position` names the last event seen). The price: a long-running writing
//!   transaction anywhere in the cluster holds readers back while it runs. With
//!   `serialize_appends` appends run one at a time and position order is commit order.
//! - **The outbox closes the publish-after-commit hole.** With `outbox: true` every appended
//!   event gets an outbox row in the same transaction; [`OutboxRelay`] publishes rows in
//!   order, at least once, and records failures with backoff. A crash between commit and
//!   publish delays an event, never loses it.
//! - **The outbox never stalls.** A failed or hanging publish (`publish_timeout`) holds the
//!   rows back in order and is retried with backoff; a row whose stored event no longer
//!   decodes is quarantined with the reason (counted in [`OutboxStats`], listed by
//!   [`quarantined_rows`]) and the rows after it keep flowing, until an operator retries or
//!   skips it ([`retry_quarantined`], [`skip_quarantined`], or the relay binary's `status`,
//!   `retry` and `skip` commands). The relay looks at its shutdown between rounds, also while
//!   working off a backlog.
//! - **Catch-up subscriptions** ([`SubscriptionManager`]) page through the feed from a
//!   checkpoint stored in the same database, then follow live appends in the same loop, woken
//!   by `LISTEN/NOTIFY` (sent after commit by a task of the store, so appends never queue on
//!   PostgreSQL's notification lock): no gap and no duplicate between history and live. A
//!   [`ReadModel`] stores each page and its checkpoint in one transaction (exactly once); a
//!   [`Projector`] is at least once. Replicas share a subscription name: one instance is
//!   active, the others stand by and take over when it stops or dies, and checkpoint writes
//!   are compare-and-set, so replicas and rolling deploys keep both promises.
//!   [`PostgresSnapshotStore`] keeps aggregate snapshots.
//! - Queries are built at run time (no database needed to build); table and schema names are
//!   validated identifiers, every value is a bound parameter.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod outbox;
mod schema;
mod snapshots;
mod store;
mod subscription;

pub use outbox::{
    OutboxRelay, OutboxStats, QuarantinedRow, RelayConfig, RoundOutcome, outbox_stats,
    quarantined_rows, retry_quarantined, skip_quarantined,
};
pub use snapshots::PostgresSnapshotStore;
pub use store::{FeedFilter, PostgresEventStore, PostgresStoreConfig, SetupError, StoreCursor};
pub use subscription::{
    ProjectionError, Projector, ReadModel, StartFrom, SubscriptionHandle, SubscriptionManager,
    SubscriptionOptions, SubscriptionState, SubscriptionStatus, load_checkpoint,
};

/// Test hook, compiled only with the `failpoints` feature (which only this crate's tests turn
/// on): with `EVENTSOURCE_FAILPOINT=<name>:<ms>` the process pauses `ms` at the named point
/// (the crash tests kill a relay between commit and publish there). Without the feature it
/// does nothing and reads no environment.
#[cfg(feature = "failpoints")]
pub(crate) async fn failpoint(name: &str) {
    if name == "before_append_commit" {
        let max = failpoints::APPEND_COMMIT_DELAY_MS.load(std::sync::atomic::Ordering::Relaxed);
        if max > 0 {
            let ms = fastrand_u64(max);
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
    }
    if let Ok(spec) = std::env::var("EVENTSOURCE_FAILPOINT")
        && let Some((point, ms)) = spec.split_once(':')
        && point == name
    {
        let ms: u64 = ms.parse().unwrap_or(0);
        println!("failpoint {name}: pausing {ms} ms");
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) async fn failpoint(_name: &str) {}

/// How long the tests asked this append to pause between its insert and its commit (0: not
/// at all): a random time below `failpoints::APPEND_COMMIT_DELAY_MS`.
pub(crate) fn commit_delay_ms() -> u64 {
    #[cfg(feature = "failpoints")]
    {
        let max = failpoints::APPEND_COMMIT_DELAY_MS.load(std::sync::atomic::Ordering::Relaxed);
        if max > 0 { fastrand_u64(max) } else { 0 }
    }
    #[cfg(not(feature = "failpoints"))]
    {
        0
    }
}

/// A random number in `0..max` (test hook only; no cryptographic need).
#[cfg(feature = "failpoints")]
fn fastrand_u64(max: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(max);
    h.finish() % max
}

/// Test hooks (feature `failpoints`, turned on only by this crate's own tests).
#[cfg(feature = "failpoints")]
pub mod failpoints {
    use std::sync::atomic::AtomicU64;

    /// Every append sleeps a random time below this many milliseconds between its insert and
    /// its commit (0: off): writers that commit out of position order, for the order tests.
    pub static APPEND_COMMIT_DELAY_MS: AtomicU64 = AtomicU64::new(0);
}

//! Catch-up subscriptions: projections fed from the store's global feed, from their stored
//! checkpoint, then following new appends — with retries, a circuit breaker, pause and
//! resume, lag, rebuild, and a graceful stop.
//!
//! **Catch-up and live are one loop.** A subscription pages through the store in its global
//! order ([`PostgresEventStore::read_feed`], bounded memory: one page) and, once a page comes
//! back empty, waits for the store's append notification (`LISTEN/NOTIFY`, with polling as a
//! fallback) and reads on from the same cursor. There is no switch to another source, so no
//! gap or duplicate at the switch: live events are read exactly like history. (Following the
//! Redis bus instead would mean joining two sequences — the store's and the stream's — whose
//! ids do not correspond, on a stream that may be trimmed.)
//!
//! **Checkpoints live in PostgreSQL** (`{table}_checkpoints`). A [`ReadModel`] in the same
//! database applies each page and stores the checkpoint in one transaction: exactly once. A
//! [`Projector`] (any storage) handles a page, then the checkpoint is stored: at least once —
//! a crash between the two hands the page to it again.
//!
//! **One active instance per name.** Replicas of a service, and the old and new versions
//! during a rolling deploy, run the same subscription under the same name: one of them is
//! active (it holds a session-level advisory lock on a connection of its own), the others
//! stand by ([`SubscriptionState::Standby`]) and try to take over every
//! [`takeover_poll`](SubscriptionOptions::takeover_poll). A stopped instance hands over at
//! once, a killed one as soon as PostgreSQL sees its connection close, one cut off from the
//! database after [`leader_timeout`](SubscriptionOptions::leader_timeout). Every checkpoint
//! write is a compare-and-set on the checkpoint the instance last stored: an instance that
//! lost the lock without noticing cannot commit a page (a read model's page rolls back), it
//! stands by instead. A projection kept in each process's memory wants every event in every
//! process: give each process its own name.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use eventsource_core::BoxFuture;
use eventsource_core::store::{StoreError, StoredEvent};
use serde::Serialize;
use sqlx::postgres::PgConnection;

use crate::store::{PostgresEventStore, SetupError, StoreCursor};

mod checkpoint;
mod leader;
mod listen;
mod options;
mod page;
mod run;

pub use checkpoint::load_checkpoint;
use listen::listen;
pub use options::SubscriptionOptions;

/// A projection's error (any error type).
pub type ProjectionError = Box<dyn std::error::Error + Send + Sync>;

/// A projection fed by a subscription, at least once: a page is handled, then the checkpoint
/// is stored, so after a crash between the two the same page comes again. Make `handle`
/// idempotent (by event id or position).
pub trait Projector: Send + Sync + 'static {
    /// Handles one page of events, in the store's order.
    fn handle<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>>;

    /// Clears what the projection built (a rebuild starts from nothing). Default: nothing.
    fn reset(&self) -> BoxFuture<'_, Result<(), ProjectionError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A shared projector (keep a handle to read what it built).
impl<P: Projector> Projector for Arc<P> {
    fn handle<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        (**self).handle(events)
    }

    fn reset(&self) -> BoxFuture<'_, Result<(), ProjectionError>> {
        (**self).reset()
    }
}

/// A read model in the store's own database: each page is applied and the checkpoint stored
/// in **one transaction**, so every event is applied exactly once, crashes included.
pub trait ReadModel: Send + Sync + 'static {
    /// Applies one page of events inside `tx` (do not commit it).
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>>;

    /// Clears the read model inside `tx` (a rebuild starts from nothing; e.g. `TRUNCATE`).
    fn reset<'a>(&'a self, tx: &'a mut PgConnection) -> BoxFuture<'a, Result<(), ProjectionError>>;
}

/// Where a subscription without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// From the first event (builds the projection from the whole history).
    #[default]
    Beginning,
    /// Only what commits after it first starts. The start position and the snapshot it was
    /// read in are stored as its first checkpoint, so an event committed before the start is
    /// skipped even where it sorts after that position (behind a writing transaction still
    /// open at the start), and one committed by that open transaction later is delivered.
    End,
}

/// What a subscription is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionState {
    /// Not started yet, or stopped.
    Idle,
    /// Another instance (a replica, or the other version during a rolling deploy) is active
    /// under this name; this one takes over when that one stops or dies.
    Standby,
    /// Started and reading history (the last page was full, or none was read yet).
    CatchingUp,
    /// Caught up, following new appends.
    Live,
    /// Paused by [`SubscriptionHandle::pause`].
    Paused,
    /// The last page failed; retrying with backoff.
    Retrying,
    /// `breaker_threshold` failures in a row: waiting `breaker_cooldown`.
    BreakerOpen,
}

/// A subscription's state, position and counters.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct SubscriptionStatus {
    /// Its name (the checkpoint's key).
    pub name: String,
    /// What it is doing.
    pub state: SubscriptionState,
    /// Whether this instance is the active one for its name (holds the lock and handles
    /// events); false while it stands by, is stopped or has not started.
    pub active: bool,
    /// How many times this instance became the active one.
    pub takeovers: u64,
    /// The last event this instance handled (its checkpoint while it is active).
    pub checkpoint: StoreCursor,
    /// Events handled since it started.
    pub handled: u64,
    /// Failed pages in a row.
    pub failures: u32,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

enum Target {
    Projector(Arc<dyn Projector>),
    ReadModel(Arc<dyn ReadModel>),
}

struct Subscription {
    name: String,
    options: SubscriptionOptions,
    target: Target,
    store: PostgresEventStore,
    state: Mutex<(SubscriptionState, StoreCursor, Option<String>)>,
    handled: AtomicU64,
    failures: AtomicU32,
    active: AtomicBool,
    takeovers: AtomicU64,
    paused: AtomicBool,
    rebuild: AtomicBool,
    changed: tokio::sync::Notify,
    /// Set for a subscription started "at the end" until its position passes every
    /// transaction that snapshot could see.
    start_snapshot: Mutex<Option<StartSnapshot>>,
}

/// The snapshot a subscription started "at the end" took with its start position: events of
/// transactions visible in it were committed before the start and are skipped, although
/// those committed behind a then-open transaction sort after the start position.
#[derive(Debug, Clone)]
struct StartSnapshot {
    /// `pg_snapshot` text (`xmin:xmax:xip,...`).
    text: Arc<str>,
    /// No transaction from this id on is visible in it.
    xmax: u64,
}

impl StartSnapshot {
    fn parse(text: &str) -> Result<Self, StoreError> {
        let xmax = text.split(':').nth(1).unwrap_or_default();
        Ok(Self {
            xmax: crate::store::parse_xid(xmax)?,
            text: text.into(),
        })
    }
}

/// Controls one subscription (cheap to clone).
#[derive(Clone)]
pub struct SubscriptionHandle(Arc<Subscription>);

impl std::fmt::Debug for SubscriptionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionHandle")
            .field("name", &self.0.name)
            .finish()
    }
}

impl SubscriptionHandle {
    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Stops handling after the current page (the checkpoint stays); see [`resume`](Self::resume).
    /// An active instance that is paused keeps its name (the others go on standing by); a
    /// paused standby does not take over.
    pub fn pause(&self) {
        self.0.paused.store(true, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }

    /// Resumes a paused subscription (also closes an open breaker).
    pub fn resume(&self) {
        self.0.paused.store(false, Ordering::SeqCst);
        self.0.failures.store(0, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }

    /// Asks for a rebuild: the projection is reset (its `reset` hook), the checkpoint goes
    /// back to the beginning, and the subscription catches up again. Done by the running
    /// subscription between pages; on a standing-by instance, when it becomes active (ask
    /// the active instance, see [`SubscriptionStatus::active`]).
    pub fn rebuild(&self) {
        self.0.rebuild.store(true, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }

    /// State, checkpoint and counters.
    pub fn status(&self) -> SubscriptionStatus {
        let (state, checkpoint, last_error) = self.0.lock().clone();
        SubscriptionStatus {
            name: self.0.name.clone(),
            state,
            active: self.0.active.load(Ordering::SeqCst),
            takeovers: self.0.takeovers.load(Ordering::Relaxed),
            checkpoint,
            handled: self.0.handled.load(Ordering::Relaxed),
            failures: self.0.failures.load(Ordering::Relaxed),
            last_error,
        }
    }

    /// Events (matching the filter) not yet handled, up to the commit-safe frontier: after
    /// this instance's position while it is active, after the stored checkpoint otherwise
    /// (what the active instance has left).
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    pub async fn lag(&self) -> Result<u64, StoreError> {
        let (checkpoint, skip) = if self.0.active.load(Ordering::SeqCst) {
            let checkpoint = self.0.lock().1;
            (checkpoint, self.0.skip_visible_in(checkpoint))
        } else {
            // What the active instance has left: the stored checkpoint, with the start
            // snapshot stored with it (a standby has none of its own).
            match checkpoint::load_start(&self.0.store, &self.0.name).await? {
                Some((cursor, snapshot)) => {
                    let skip = snapshot
                        .as_deref()
                        .map(StartSnapshot::parse)
                        .transpose()?
                        .filter(|s| cursor.tx < s.xmax)
                        .map(|s| s.text);
                    (cursor, skip)
                }
                None => (StoreCursor::START, None),
            }
        };
        self.0
            .store
            .count_feed(checkpoint, &self.0.options.filter, skip.as_deref())
            .await
    }
}

/// Runs catch-up subscriptions on one store.
pub struct SubscriptionManager {
    store: PostgresEventStore,
    subscriptions: Vec<Arc<Subscription>>,
}

impl std::fmt::Debug for SubscriptionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionManager")
            .field("subscriptions", &self.subscriptions.len())
            .finish()
    }
}

impl SubscriptionManager {
    /// A manager for `store`'s feed.
    pub fn new(store: PostgresEventStore) -> Self {
        Self {
            store,
            subscriptions: Vec::new(),
        }
    }

    /// Adds an at-least-once projection under `name` (its checkpoint's key, and the name
    /// replicas share: one of them is active at a time).
    ///
    /// # Errors
    /// [`SetupError::Subscription`] naming the option that is invalid, or a name this manager
    /// already runs.
    pub fn add_projector(
        &mut self,
        name: impl Into<String>,
        projector: impl Projector,
        options: SubscriptionOptions,
    ) -> Result<SubscriptionHandle, SetupError> {
        self.add(name.into(), Target::Projector(Arc::new(projector)), options)
    }

    /// Adds an exactly-once read model in the store's database under `name` (its
    /// checkpoint's key, and the name replicas share: one of them is active at a time).
    ///
    /// # Errors
    /// As [`add_projector`](Self::add_projector).
    pub fn add_read_model(
        &mut self,
        name: impl Into<String>,
        model: impl ReadModel,
        options: SubscriptionOptions,
    ) -> Result<SubscriptionHandle, SetupError> {
        self.add(name.into(), Target::ReadModel(Arc::new(model)), options)
    }

    fn add(
        &mut self,
        name: String,
        target: Target,
        options: SubscriptionOptions,
    ) -> Result<SubscriptionHandle, SetupError> {
        let invalid = |field: &'static str, reason: String| SetupError::Subscription {
            name: name.clone(),
            field,
            reason,
        };
        if name.is_empty() {
            return Err(invalid("name", "must not be empty".into()));
        }
        if self.subscriptions.iter().any(|s| s.name == name) {
            return Err(invalid(
                "name",
                "this manager already runs a subscription of this name (each name has one \
                 checkpoint: use another name)"
                    .into(),
            ));
        }
        options
            .validate()
            .map_err(|(field, reason)| invalid(field, reason))?;
        let subscription = Arc::new(Subscription {
            name,
            options,
            target,
            store: self.store.clone(),
            state: Mutex::new((SubscriptionState::Idle, StoreCursor::START, None)),
            handled: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            active: AtomicBool::new(false),
            takeovers: AtomicU64::new(0),
            paused: AtomicBool::new(false),
            rebuild: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            start_snapshot: Mutex::new(None),
        });
        self.subscriptions.push(subscription.clone());
        Ok(SubscriptionHandle(subscription))
    }

    /// Runs every subscription until `shutdown` completes; each finishes the page in hand
    /// (handled and checkpointed) before it stops.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) {
        let stop = tokio_util::sync::CancellationToken::new();
        let (wake, _) = tokio::sync::watch::channel(0u64);
        let wake = Arc::new(wake);
        let mut tasks = tokio::task::JoinSet::new();
        for subscription in &self.subscriptions {
            let subscription = subscription.clone();
            let stop = stop.clone();
            let woken = wake.subscribe();
            tasks.spawn(async move { subscription.run(stop, woken).await });
        }
        let listener = {
            let store = self.store.clone();
            let wake = wake.clone();
            let stop = stop.clone();
            tokio::spawn(async move { listen(store, wake, stop).await })
        };
        // Dropping this future (instead of completing `shutdown`) stops everything too: the
        // subscriptions' tasks are aborted with `tasks` (their locks given up), the listener
        // with this guard.
        let _stop_on_drop = stop.clone().drop_guard();
        let _listener = AbortOnDrop(listener);
        shutdown.await;
        stop.cancel();
        while tasks.join_next().await.is_some() {}
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

//! Snapshots: an aggregate's state at a version, so loading it replays only the events after.
//!
//! An aggregate opts in with [`SnapshotAggregate`] (its state type and the version of that
//! state's shape). [`SnapshotRepository`] loads the latest snapshot plus the events after it,
//! and takes a new snapshot by its [`SnapshotStrategy`]. A stored snapshot whose shape version
//! differs from the aggregate's is ignored — the aggregate is replayed from its first event —
//! and counted ([`SnapshotStats::ignored`]), so changing the state's shape never loads a wrong
//! state. Snapshots are a cache: deleting them all only makes loads slower.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::aggregate::Aggregate;
use crate::repository::{AggregateRepository, RepositoryError};
use crate::store::{EventStore, StoreError};
use crate::util::BoxFuture;

/// An aggregate whose state can be stored and restored.
pub trait SnapshotAggregate: Aggregate {
    /// The version of the state's shape. Raise it when the state type changes: older
    /// snapshots are then ignored (full replay) instead of restored wrongly.
    const SNAPSHOT_VERSION: u32;
    /// The state kept in a snapshot (everything `apply` builds).
    type State: Serialize + DeserializeOwned + Send;

    /// The current state.
    fn snapshot_state(&self) -> Self::State;

    /// Puts `state` into a fresh aggregate (`A::new(id)`); the repository sets the version.
    fn restore_state(&mut self, state: Self::State);
}

/// A stored snapshot.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Snapshot {
    /// The aggregate.
    pub aggregate_id: Uuid,
    /// Its type.
    pub aggregate_type: String,
    /// The aggregate version the state is at.
    pub version: u64,
    /// The state's shape version ([`SnapshotAggregate::SNAPSHOT_VERSION`]).
    pub schema_version: u32,
    /// The state as JSON.
    pub state: serde_json::Value,
    /// When it was taken.
    pub taken_at: DateTime<Utc>,
}

impl Snapshot {
    /// Whether this snapshot replaces `stored` in a store: one of a newer shape
    /// (`schema_version`) always does, one of the same shape when it is at the same or a
    /// later version. During a rolling deploy the old version's pods (an older shape) thus
    /// cannot overwrite the new version's snapshots, whatever their versions; the old pods
    /// replay from the events until they are gone. (After rolling a shape back, delete the
    /// snapshots of the newer shape, or the old code never snapshots those aggregates again.)
    pub fn replaces(&self, stored: &Snapshot) -> bool {
        (self.schema_version, self.version) >= (stored.schema_version, stored.version)
    }
}

/// Where snapshots are kept. Object-safe (hold an `Arc<dyn SnapshotStore>`).
pub trait SnapshotStore: Send + Sync {
    /// The latest snapshot of an aggregate, if any.
    fn load<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
    ) -> BoxFuture<'a, Result<Option<Snapshot>, StoreError>>;

    /// Stores a snapshot when it [`replaces`](Snapshot::replaces) the stored one (a newer
    /// shape, or the same shape at the same or a later version); otherwise keeps the stored
    /// one. `testkit::snapshot_contract` checks a store for these rules.
    fn save(&self, snapshot: Snapshot) -> BoxFuture<'_, Result<(), StoreError>>;
}

/// Snapshots in memory (tests, single-process applications).
#[derive(Debug, Default)]
pub struct InMemorySnapshotStore {
    snapshots: std::sync::Mutex<std::collections::HashMap<(Uuid, String), Snapshot>>,
}

impl InMemorySnapshotStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl SnapshotStore for InMemorySnapshotStore {
    fn load<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
    ) -> BoxFuture<'a, Result<Option<Snapshot>, StoreError>> {
        let found = self
            .snapshots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(aggregate_id, aggregate_type.to_owned()))
            .cloned();
        Box::pin(async move { Ok(found) })
    }

    fn save(&self, snapshot: Snapshot) -> BoxFuture<'_, Result<(), StoreError>> {
        let mut map = self.snapshots.lock().unwrap_or_else(|p| p.into_inner());
        let key = (snapshot.aggregate_id, snapshot.aggregate_type.clone());
        if map.get(&key).is_none_or(|old| snapshot.replaces(old)) {
            map.insert(key, snapshot);
        }
        Box::pin(async { Ok(()) })
    }
}

/// When the repository takes a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotStrategy {
    /// After a save that crosses a multiple of this many versions (e.g. 100: at versions 100,
    /// 200, ...).
    EveryEvents(u64),
    /// Only when [`SnapshotRepository::take_snapshot`] is called.
    OnDemand,
}

/// What snapshots did for loads and saves.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct SnapshotStats {
    loaded: AtomicU64,
    ignored: AtomicU64,
    taken: AtomicU64,
}

impl SnapshotStats {
    /// Loads that started from a snapshot.
    pub fn loaded(&self) -> u64 {
        self.loaded.load(Ordering::Relaxed)
    }

    /// Snapshots ignored because their shape version differs from the aggregate's (the load
    /// replayed every event instead).
    pub fn ignored(&self) -> u64 {
        self.ignored.load(Ordering::Relaxed)
    }

    /// Snapshots taken.
    pub fn taken(&self) -> u64 {
        self.taken.load(Ordering::Relaxed)
    }
}

/// An [`AggregateRepository`] that loads from snapshots and takes them.
pub struct SnapshotRepository<A> {
    inner: AggregateRepository<A>,
    snapshots: Arc<dyn SnapshotStore>,
    strategy: SnapshotStrategy,
    stats: Arc<SnapshotStats>,
}

impl<A> Clone for SnapshotRepository<A> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            snapshots: self.snapshots.clone(),
            strategy: self.strategy,
            stats: self.stats.clone(),
        }
    }
}

impl<A> std::fmt::Debug for SnapshotRepository<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotRepository")
            .field("inner", &self.inner)
            .field("strategy", &self.strategy)
            .finish()
    }
}

impl<A: SnapshotAggregate> SnapshotRepository<A> {
    /// Snapshots for `repository`'s aggregates in `snapshots`, taken by `strategy`.
    pub fn new(
        repository: AggregateRepository<A>,
        snapshots: Arc<dyn SnapshotStore>,
        strategy: SnapshotStrategy,
    ) -> Self {
        Self {
            inner: repository,
            snapshots,
            strategy,
            stats: Arc::new(SnapshotStats::default()),
        }
    }

    /// The repository without snapshots.
    pub fn inner(&self) -> &AggregateRepository<A> {
        &self.inner
    }

    /// What snapshots did so far.
    pub fn stats(&self) -> &SnapshotStats {
        &self.stats
    }

    /// Loads an aggregate: its latest usable snapshot, then the events after it.
    ///
    /// # Errors
    /// [`RepositoryError::NotFound`] when it has no events; store and rehydration errors.
    pub async fn load(&self, id: Uuid) -> Result<A, RepositoryError> {
        let store: &Arc<dyn EventStore> = self.inner.store();
        let mut aggregate = A::new(id);
        let mut after = 0;
        if let Some(snapshot) = self.snapshots.load(id, A::AGGREGATE_TYPE).await? {
            let usable = snapshot.schema_version == A::SNAPSHOT_VERSION;
            let state = usable
                .then(|| serde_json::from_value::<A::State>(snapshot.state.clone()).ok())
                .flatten();
            match state {
                Some(state) => {
                    aggregate.restore_state(state);
                    aggregate.core_mut().restore_version(snapshot.version);
                    after = snapshot.version;
                    self.stats.loaded.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.stats.ignored.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(
                        aggregate_id = %id,
                        aggregate_type = A::AGGREGATE_TYPE,
                        stored = snapshot.schema_version,
                        current = A::SNAPSHOT_VERSION,
                        "snapshot ignored (another state shape, or it does not decode); replaying every event"
                    );
                }
            }
        }
        let events = store.read_stream(id, A::AGGREGATE_TYPE, after).await?;
        if events.is_empty() && after == 0 {
            return Err(RepositoryError::NotFound {
                aggregate_type: A::AGGREGATE_TYPE,
                aggregate_id: id,
            });
        }
        aggregate.load_from_history(events.into_iter().map(|s| s.event))?;
        Ok(aggregate)
    }

    /// Saves like [`AggregateRepository::save`], then takes a snapshot when the strategy
    /// says so. A failed snapshot is logged, not an error: the events are saved.
    ///
    /// # Errors
    /// As [`AggregateRepository::save`].
    pub async fn save(&self, aggregate: &mut A) -> Result<(), RepositoryError> {
        let before = aggregate.version() - aggregate.uncommitted_events().len() as u64;
        self.inner.save(aggregate).await?;
        if let SnapshotStrategy::EveryEvents(n) = self.strategy
            && n > 0
            && aggregate.version() / n > before / n
            && let Err(e) = self.take_snapshot(aggregate).await
        {
            tracing::warn!(error = %e, aggregate_id = %aggregate.id(), "taking a snapshot failed");
        }
        Ok(())
    }

    /// Stores a snapshot of `aggregate` at its current version.
    ///
    /// # Errors
    /// [`RepositoryError::Unsaved`] when it has unsaved events; [`RepositoryError::Store`]
    /// when the snapshot store fails.
    pub async fn take_snapshot(&self, aggregate: &A) -> Result<(), RepositoryError> {
        if aggregate.has_uncommitted_events() {
            return Err(RepositoryError::Unsaved {
                aggregate_type: A::AGGREGATE_TYPE,
                aggregate_id: aggregate.id(),
            });
        }
        let state = serde_json::to_value(aggregate.snapshot_state())
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        self.snapshots
            .save(Snapshot {
                aggregate_id: aggregate.id(),
                aggregate_type: A::AGGREGATE_TYPE.to_owned(),
                version: aggregate.version(),
                schema_version: A::SNAPSHOT_VERSION,
                state,
                taken_at: Utc::now(),
            })
            .await?;
        self.stats.taken.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

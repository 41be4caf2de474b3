//! Loading and saving aggregates through an [`EventStore`], publishing what was saved.

use std::marker::PhantomData;
use std::sync::Arc;

use uuid::Uuid;

use crate::aggregate::{Aggregate, AggregateError};
use crate::bus::{BusError, EventPublisher};
use crate::store::{EventStore, ExpectedVersion, StoreError};

/// Why a repository operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepositoryError {
    /// No events exist for this aggregate. Create it with `create_new` instead.
    #[error("{aggregate_type} {aggregate_id} not found")]
    NotFound {
        /// The aggregate type.
        aggregate_type: &'static str,
        /// The id looked up.
        aggregate_id: Uuid,
    },
    /// The store refused or failed. [`StoreError::Concurrency`] means another writer saved
    /// first: reload and retry the command.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Rebuilding the aggregate from its history failed (a corrupt or foreign stream).
    #[error("rebuilding aggregate from history failed: {0}")]
    Rehydrate(#[from] AggregateError),
    /// A snapshot was asked of an aggregate with unsaved events: save it first.
    #[error("{aggregate_type} {aggregate_id} has unsaved events; save it before taking a snapshot")]
    Unsaved {
        /// The aggregate type.
        aggregate_type: &'static str,
        /// The aggregate.
        aggregate_id: Uuid,
    },
    /// The events **were saved**, but publishing them failed. They are in the store; republish
    /// from there (or use a transactional outbox, which makes this impossible).
    #[error("{saved} event(s) saved but not published: {source}")]
    Publish {
        /// How many events were saved.
        saved: usize,
        /// The bus error.
        #[source]
        source: BusError,
    },
}

impl RepositoryError {
    /// Whether this is an optimistic-concurrency conflict (reload and retry).
    pub fn is_concurrency_conflict(&self) -> bool {
        matches!(self, Self::Store(StoreError::Concurrency { .. }))
    }

    /// What kind of failure this is: the store's or the bus's kind for those, else
    /// `NotFound`, `InvalidData` (a history that does not rebuild), `InvalidState` (unsaved
    /// events).
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Self::NotFound { .. } => crate::ErrorKind::NotFound,
            Self::Store(e) => e.kind(),
            Self::Rehydrate(e) => e.kind(),
            Self::Unsaved { .. } => crate::ErrorKind::InvalidState,
            Self::Publish { source, .. } => source.kind(),
        }
    }

    /// Whether the same call may succeed later (see [`crate::ErrorKind::is_transient`]).
    /// For [`Publish`](Self::Publish) the events are saved already: republish, do not save
    /// again.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
}

/// Loads and saves aggregates of type `A` with optimistic concurrency.
///
/// ```
/// # use eventsource_core::prelude::*;
/// # use eventsource_core::AggregateError;
/// # use std::sync::Arc;
/// # use uuid::Uuid;
/// # struct Counter { core: AggregateCore }
/// # impl Aggregate for Counter {
/// #     const AGGREGATE_TYPE: &'static str = "Counter";
/// #     fn new(id: Uuid) -> Self { Counter { core: AggregateCore::new(id) } }
/// #     fn core(&self) -> &AggregateCore { &self.core }
/// #     fn core_mut(&mut self) -> &mut AggregateCore { &mut self.core }
/// #     fn apply(&mut self, _e: &EventEnvelope) -> Result<(), AggregateError> { Ok(()) }
/// # }
/// let store = Arc::new(InMemoryEventStore::new());
/// let bus = Arc::new(InMemoryEventBus::new());
/// let repo = AggregateRepository::<Counter>::new(store).with_publisher(bus);
/// let counter = repo.create_new(Uuid::new_v4());
/// assert_eq!(counter.version(), 0);
/// ```
pub struct AggregateRepository<A> {
    store: Arc<dyn EventStore>,
    publisher: Option<Arc<dyn EventPublisher>>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A> Clone for AggregateRepository<A> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            publisher: self.publisher.clone(),
            _aggregate: PhantomData,
        }
    }
}

impl<A> std::fmt::Debug for AggregateRepository<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateRepository")
            .field("aggregate", &std::any::type_name::<A>())
            .field("publishes", &self.publisher.is_some())
            .finish()
    }
}

impl<A: Aggregate> AggregateRepository<A> {
    /// A repository over `store` that publishes nothing.
    pub fn new(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            publisher: None,
            _aggregate: PhantomData,
        }
    }

    /// Publishes saved events through `publisher` after each successful save.
    #[must_use]
    pub fn with_publisher(mut self, publisher: Arc<dyn EventPublisher>) -> Self {
        self.publisher = Some(publisher);
        self
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// A new, empty aggregate (version 0). Nothing is stored until [`save`](Self::save).
    pub fn create_new(&self, id: Uuid) -> A {
        A::new(id)
    }

    /// Loads an aggregate by replaying its stream.
    ///
    /// # Errors
    /// [`RepositoryError::NotFound`] when it has no events; store and rehydration errors.
    pub async fn load(&self, id: Uuid) -> Result<A, RepositoryError> {
        let events = self.store.read_stream(id, A::AGGREGATE_TYPE, 0).await?;
        if events.is_empty() {
            return Err(RepositoryError::NotFound {
                aggregate_type: A::AGGREGATE_TYPE,
                aggregate_id: id,
            });
        }
        let mut aggregate = A::new(id);
        aggregate.load_from_history(events.into_iter().map(|s| s.event))?;
        Ok(aggregate)
    }

    /// Loads an aggregate, or `None` when it has no events (eventsource-py's `get_or_none`).
    ///
    /// # Errors
    /// Store and rehydration errors.
    pub async fn get_or_none(&self, id: Uuid) -> Result<Option<A>, RepositoryError> {
        match self.load(id).await {
            Ok(aggregate) => Ok(Some(aggregate)),
            Err(RepositoryError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Loads an aggregate, or a new empty one (version 0) when it has no events.
    ///
    /// # Errors
    /// Store and rehydration errors.
    pub async fn load_or_create(&self, id: Uuid) -> Result<A, RepositoryError> {
        Ok(self.get_or_none(id).await?.unwrap_or_else(|| A::new(id)))
    }

    /// Whether the aggregate has any stored events.
    ///
    /// # Errors
    /// Store errors.
    pub async fn exists(&self, id: Uuid) -> Result<bool, RepositoryError> {
        Ok(self.store.stream_version(id, A::AGGREGATE_TYPE).await? > 0)
    }

    /// Saves the uncommitted events (nothing to do without any), with the expected version
    /// the aggregate had when loaded, then publishes them.
    ///
    /// On success the aggregate's uncommitted events are cleared. On a store error they are
    /// kept, so nothing is lost; a concurrency conflict means: reload and retry.
    ///
    /// # Errors
    /// [`RepositoryError::Store`] (e.g. [`StoreError::Concurrency`]);
    /// [`RepositoryError::Publish`] when saved but not published.
    pub async fn save(&self, aggregate: &mut A) -> Result<(), RepositoryError> {
        if !aggregate.has_uncommitted_events() {
            return Ok(());
        }
        let events = aggregate.uncommitted_events().to_vec();
        let base = aggregate.version() - events.len() as u64;
        let expected = if base == 0 {
            ExpectedVersion::NoStream
        } else {
            ExpectedVersion::Exact(base)
        };
        self.store
            .append(aggregate.id(), A::AGGREGATE_TYPE, &events, expected)
            .await?;
        aggregate.mark_committed();
        if let Some(publisher) = &self.publisher {
            publisher
                .publish(&events)
                .await
                .map_err(|source| RepositoryError::Publish {
                    saved: events.len(),
                    source,
                })?;
        }
        Ok(())
    }
}

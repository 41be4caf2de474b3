//! # eventsource-core
//!
//! The event-sourcing model of eventsource-rs, with no network I/O: domain events and their
//! metadata, the event registry, aggregates, the repository, and the two contracts every
//! backend implements — [`EventStore`] and [`EventBus`] —
//! with in-memory implementations of both.
//!
//! ## Layout
//! - [`event`]: declaring a domain event ([`DomainEvent`]), its metadata
//!   ([`EventMetadata`]), the typed [`Event<E>`] and the type-erased [`EventEnvelope`] that
//!   buses and stores carry. Serialises to the flat JSON object eventsource-py writes.
//! - [`registry`]: wire name → decoder. Unknown names are a typed error, never a panic.
//! - [`aggregate`]: state, version, uncommitted events, rehydration.
//! - [`repository`]: load / save with optimistic concurrency, publish after save.
//! - [`store`]: the event store contract and [`InMemoryEventStore`].
//! - [`bus`]: the event bus contract, handlers, projections and
//!   [`InMemoryEventBus`].
//!
//! ## Guarantees
//! - An event's wire form is one flat JSON object: the base fields in the order of
//!   eventsource-py, then the event's own fields. It round-trips.
//! - Appending to a stream with a stale expected version fails with
//!   [`StoreError::Concurrency`] naming both versions; of two
//!   concurrent saves of one aggregate exactly one wins.
//! - A failing or panicking handler never stops the other handlers of an event; every failure
//!   is reported with the handler's name and counted.
//!
//! ## Quick start
//! ```
//! use eventsource_core::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct OrderCreated { customer_id: String, total_amount: f64 }
//! eventsource_core::domain_event!(OrderCreated, "OrderCreated", aggregate = "Order");
//!
//! let event = Event::new(uuid::Uuid::new_v4(), OrderCreated {
//!     customer_id: "cust-123".into(),
//!     total_amount: 99.99,
//! });
//! let json = event.to_json().unwrap();
//! assert!(json.starts_with("{\"event_id\":"));
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod aggregate;
pub mod bus;
pub mod error;
pub mod event;
pub mod registry;
pub mod repository;
pub mod root;
pub mod snapshot;
pub mod store;
#[doc(hidden)]
pub mod support;
#[cfg(feature = "testkit")]
pub mod testkit;
mod util;

pub use aggregate::{Aggregate, AggregateCore, AggregateError};
pub use bus::{EventBus, EventPublisher, InMemoryEventBus};
pub use error::ErrorKind;
pub use event::{DomainEvent, Event, EventEnvelope, EventError, EventMetadata};
pub use registry::{EventRegistry, RegistryError};
pub use repository::{AggregateRepository, RepositoryError};
pub use root::{AggregateState, Root};
pub use snapshot::{
    InMemorySnapshotStore, Snapshot, SnapshotAggregate, SnapshotRepository, SnapshotStore,
    SnapshotStrategy,
};
pub use store::{EventStore, ExpectedVersion, InMemoryEventStore, StoreError, StoredEvent};
pub use util::BoxFuture;

// Re-exported so the `domain_event!` macro and users share one version.
#[doc(hidden)]
pub use uuid;

/// The items most programs need, for `use eventsource_core::prelude::*`.
pub mod prelude {
    pub use crate::aggregate::{Aggregate, AggregateCore, AggregateError};
    pub use crate::bus::{
        EventBus, EventPublisher, Handler, HandlerError, InMemoryEventBus, Projection,
        SubscriptionId,
    };
    pub use crate::event::{DomainEvent, Event, EventEnvelope, EventMetadata};
    pub use crate::registry::EventRegistry;
    pub use crate::repository::AggregateRepository;
    pub use crate::root::{AggregateState, Root};
    pub use crate::store::{EventStore, ExpectedVersion, InMemoryEventStore};
}

//! The event bus contract and the in-memory bus.
//!
//! Publishing is [`EventPublisher`] (object-safe, what a repository holds). Subscribing is
//! [`EventBus`], whose methods all delegate to the [`Subscribers`] table a bus embeds, so the
//! in-memory bus and the Redis bus share one interface and one dispatch rule:
//! type handlers in subscription order, then wildcard handlers; a failing or panicking handler
//! does not stop the others, and every failure is reported with the handler's name.

mod handler;
mod memory;

pub use handler::{
    DispatchReport, Handler, HandlerError, HandlerFailure, IntoHandlerResult, Named, Projection,
    Subscribers, SubscriptionId, named,
};
pub use memory::{InMemoryBusStats, InMemoryEventBus};

use crate::error::ErrorKind;
use crate::event::{DomainEvent, Event, EventEnvelope, EventError};
use crate::util::BoxFuture;

/// Why publishing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// An event is invalid (bad base field, data not an object). Fix the event.
    #[error("cannot publish event {event_id}: {source}")]
    InvalidEvent {
        /// The offending event.
        event_id: uuid::Uuid,
        /// What is wrong.
        #[source]
        source: EventError,
    },
    /// The transport failed (Redis down, timeout, a refused write...). The events may or may
    /// not have been published; publishing again may duplicate them (consumers dedupe by
    /// event id). `kind` classifies the cause (so a caller decides on a retry without
    /// downcasting `source`); build one with [`BusError::transport`].
    #[error("event bus transport error ({kind}): {source}")]
    Transport {
        /// What kind of failure the cause is; [`ErrorKind::is_transient`] says whether
        /// publishing again later may succeed.
        kind: ErrorKind,
        /// The backend's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl BusError {
    /// A transport failure of `kind`, caused by `source`.
    pub fn transport(
        kind: ErrorKind,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self::Transport {
            kind,
            source: source.into(),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::InvalidEvent { .. } => ErrorKind::InvalidInput,
            Self::Transport { kind, .. } => *kind,
        }
    }

    /// Whether publishing again later may succeed (the transport was unavailable or timed
    /// out). Mind that the first attempt's outcome is unknown then.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
}

/// Publishes events. Object-safe: a repository holds an `Arc<dyn EventPublisher>`.
pub trait EventPublisher: Send + Sync {
    /// Publishes a batch of events, in order.
    ///
    /// # Errors
    /// [`BusError::InvalidEvent`] before anything is sent; [`BusError::Transport`] when the
    /// backend fails.
    fn publish<'a>(&'a self, events: &'a [EventEnvelope]) -> BoxFuture<'a, Result<(), BusError>>;
}

/// The subscription side of a bus. Every method has a default that delegates to
/// [`subscribers`](Self::subscribers); a bus only provides the table.
pub trait EventBus: EventPublisher {
    /// The bus's subscription table.
    fn subscribers(&self) -> &Subscribers;

    /// The registry a bus decodes incoming events through, if it has one. A typed
    /// [`subscribe`](Self::subscribe) registers its event type there, so the bus decodes the
    /// event once, classifies its decode errors like any registered type's, and hands every
    /// handler the one decoded copy, shared (an `Event<E>` is two reference counts, not a
    /// copy).
    fn event_registry(&self) -> Option<&crate::EventRegistry> {
        None
    }

    /// Subscribes a handler to one event type `E` (and registers `E` in the bus's registry,
    /// when it has one; a different type already registered under the same wire name is kept,
    /// logged, and this handler decodes the event itself).
    fn subscribe<E, H>(&self, handler: H) -> SubscriptionId
    where
        Self: Sized,
        E: DomainEvent,
        H: Handler<Event<E>>,
    {
        if let Some(registry) = self.event_registry()
            && let Err(e) = registry.register::<E>()
        {
            tracing::warn!(error = %e, "typed subscription: its type is not the registered one");
        }
        self.subscribers().subscribe::<E, H>(handler)
    }

    /// Subscribes a projection to every event type it declares.
    fn subscribe_all<P: Projection>(&self, projection: P) -> SubscriptionId
    where
        Self: Sized,
    {
        self.subscribers().subscribe_all(projection)
    }

    /// Subscribes a handler to every event (wildcard); runs after the type handlers.
    fn subscribe_to_all_events<H: Handler<EventEnvelope>>(&self, handler: H) -> SubscriptionId
    where
        Self: Sized,
    {
        self.subscribers().subscribe_to_all_events(handler)
    }

    /// Removes a subscription. Returns whether it was subscribed.
    fn unsubscribe(&self, id: SubscriptionId) -> bool {
        self.subscribers().unsubscribe(id)
    }

    /// Removes a wildcard subscription. Returns whether it was one.
    fn unsubscribe_from_all_events(&self, id: SubscriptionId) -> bool {
        self.subscribers().unsubscribe_from_all_events(id)
    }

    /// Removes every subscription.
    fn clear_subscribers(&self) {
        self.subscribers().clear();
    }

    /// Type subscriptions over all event types (wildcards excluded, as in eventsource-py).
    fn subscriber_count(&self) -> usize {
        self.subscribers().count()
    }

    /// Subscriptions for one wire name.
    fn subscriber_count_for(&self, event_type: &str) -> usize {
        self.subscribers().count_for(event_type)
    }

    /// Subscriptions for the event type `E`.
    fn subscriber_count_of<E: DomainEvent>(&self) -> usize
    where
        Self: Sized,
    {
        self.subscribers().count_for(E::EVENT_TYPE)
    }

    /// Wildcard subscriptions.
    fn wildcard_subscriber_count(&self) -> usize {
        self.subscribers().wildcard_count()
    }
}

/// Validates every event of a batch before anything is published.
///
/// # Errors
/// [`BusError::InvalidEvent`] for the first invalid event.
pub fn validate_batch(events: &[EventEnvelope]) -> Result<(), BusError> {
    for event in events {
        event.validate().map_err(|source| BusError::InvalidEvent {
            event_id: event.event_id(),
            source,
        })?;
    }
    Ok(())
}

//! [`Event<E>`]: a typed event, its metadata and data shared behind `Arc`s.

use std::sync::Arc;

use serde_json::Value;
use uuid::Uuid;

use super::{DomainEvent, EventData, EventEnvelope, EventError, EventMetadata};

/// A typed event: metadata plus the event's own data. Derefs to the data.
///
/// Both parts are shared (`Arc`): a bus hands each of an event's handlers an `Event<E>` that
/// points at the one decoded copy, so a projection with several handlers on a type costs two
/// reference counts per handler, not a copy of the metadata and the data. Read through the
/// fields as before (`event.metadata.event_id`, `event.data.total`, or `event.total` through
/// `Deref`); change them with [`metadata_mut`](Self::metadata_mut) and
/// [`data_mut`](Self::data_mut), which copy only when the value is shared.
#[derive(Debug, Clone, PartialEq)]
pub struct Event<E> {
    /// The base fields.
    pub metadata: Arc<EventMetadata>,
    /// The event's own fields.
    pub data: Arc<E>,
}

impl<E> std::ops::Deref for Event<E> {
    type Target = E;
    fn deref(&self) -> &E {
        &self.data
    }
}

impl<E> Event<E> {
    /// An event from its metadata and data as they are (nothing stamped or checked; see
    /// [`Event::new`] for fresh metadata).
    pub fn from_parts(metadata: EventMetadata, data: E) -> Self {
        Self {
            metadata: Arc::new(metadata),
            data: Arc::new(data),
        }
    }
}

impl<E: Clone> Event<E> {
    /// The base fields, to change (copied first if another holder shares them).
    pub fn metadata_mut(&mut self) -> &mut EventMetadata {
        Arc::make_mut(&mut self.metadata)
    }

    /// The event's own fields, to change (copied first if another holder shares them).
    pub fn data_mut(&mut self) -> &mut E {
        Arc::make_mut(&mut self.data)
    }
}

impl<E: DomainEvent> Event<E> {
    /// A new event for `aggregate_id` with fresh metadata (aggregate version 1).
    pub fn new(aggregate_id: Uuid, data: E) -> Self {
        let mut metadata = EventMetadata::new(E::EVENT_TYPE, aggregate_id, E::AGGREGATE_TYPE);
        metadata.event_version = E::EVENT_VERSION;
        Self::from_parts(metadata, data)
    }

    /// Sets the aggregate version (the event's position in its aggregate's stream).
    #[must_use]
    pub fn with_aggregate_version(mut self, version: u64) -> Self {
        self.metadata_mut().aggregate_version = version;
        self
    }

    /// Sets the tenant id.
    #[must_use]
    pub fn with_tenant(mut self, tenant_id: Uuid) -> Self {
        self.metadata_mut().tenant_id = Some(tenant_id);
        self
    }

    /// Sets the actor id.
    #[must_use]
    pub fn with_actor(mut self, actor_id: impl Into<String>) -> Self {
        self.metadata_mut().actor_id = Some(actor_id.into());
        self
    }

    /// Marks this event as caused by `cause`: causation id = its event id, and its correlation
    /// id is carried over so the whole flow shares one correlation id.
    #[must_use]
    pub fn caused_by(mut self, cause: &EventMetadata) -> Self {
        let metadata = self.metadata_mut();
        metadata.causation_id = Some(cause.event_id);
        metadata.correlation_id = cause.correlation_id;
        self
    }

    /// Adds one free-form metadata entry.
    #[must_use]
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata_mut()
            .metadata
            .insert(key.into(), value.into());
        self
    }

    /// The flat JSON form (see the module docs).
    ///
    /// # Errors
    /// [`EventError::DataNotAnObject`] if the data does not serialise to a JSON object.
    pub fn to_json(&self) -> Result<String, EventError> {
        EventEnvelope::from(self.clone()).to_json()
    }

    /// Erases the type: what buses and stores carry.
    pub fn into_envelope(self) -> EventEnvelope {
        self.into()
    }
}

impl<E: DomainEvent> From<Event<E>> for EventEnvelope {
    fn from(event: Event<E>) -> Self {
        EventEnvelope {
            metadata: event.metadata,
            data: EventData::Typed(event.data),
        }
    }
}

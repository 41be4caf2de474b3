//! [`EventEnvelope`]: the type-erased event buses and stores carry (typed data or JSON),
//! and typed access to its data.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use serde_json::Value;
use uuid::Uuid;

use super::{DomainEvent, Event, EventError, EventMetadata};

/// Object-safe view of a typed event's data.
pub(super) trait ErasedData: Send + Sync + fmt::Debug {
    fn as_any(&self) -> &dyn Any;
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
    fn to_value(&self) -> Result<Value, serde_json::Error>;
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error>;
}

impl<E: DomainEvent> ErasedData for E {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn into_any(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
    fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::to_value(self)
    }
    fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        serde_json::to_writer(out, self)
    }
}

#[derive(Debug, Clone)]
pub(super) enum EventData {
    /// Decoded into its Rust type (created in Rust, or decoded through a registry).
    Typed(Arc<dyn ErasedData>),
    /// The event's own fields as JSON (read from a store or stream without a registry).
    Json(Arc<Value>),
}

/// A type-erased event: metadata plus the event's own data, typed or as JSON.
///
/// Cheap to clone (the data is shared). Get the typed data back with [`data`](Self::data)
/// or [`to_event`](Self::to_event).
#[derive(Debug, Clone)]
pub struct EventEnvelope {
    pub(super) metadata: Arc<EventMetadata>,
    pub(super) data: EventData,
}

impl EventEnvelope {
    /// An envelope from metadata and the event's own fields as a JSON object.
    ///
    /// # Errors
    /// [`EventError::DataNotAnObject`] if `data` is not a JSON object.
    pub fn from_json_data(metadata: EventMetadata, data: Value) -> Result<Self, EventError> {
        if !data.is_object() {
            return Err(EventError::DataNotAnObject {
                event_type: metadata.event_type,
            });
        }
        Ok(Self {
            metadata: Arc::new(metadata),
            data: EventData::Json(Arc::new(data)),
        })
    }

    /// The base fields.
    pub fn metadata(&self) -> &EventMetadata {
        &self.metadata
    }

    /// Mutable base fields (e.g. for a repository stamping versions); copied first if a
    /// clone of this envelope shares them.
    pub fn metadata_mut(&mut self) -> &mut EventMetadata {
        Arc::make_mut(&mut self.metadata)
    }

    /// The wire name.
    pub fn event_type(&self) -> &str {
        &self.metadata.event_type
    }

    /// The event id.
    pub fn event_id(&self) -> Uuid {
        self.metadata.event_id
    }

    /// The aggregate id.
    pub fn aggregate_id(&self) -> Uuid {
        self.metadata.aggregate_id
    }

    /// The aggregate type.
    pub fn aggregate_type(&self) -> &str {
        &self.metadata.aggregate_type
    }

    /// The aggregate version.
    pub fn aggregate_version(&self) -> u64 {
        self.metadata.aggregate_version
    }

    /// Whether the data is held as its Rust type (as opposed to JSON).
    pub fn is_typed(&self) -> bool {
        matches!(self.data, EventData::Typed(_))
    }

    /// The data as `E` if this event's wire name is `E::EVENT_TYPE`, else `Ok(None)`.
    ///
    /// Borrowed when the envelope holds an `E`, decoded from JSON otherwise.
    ///
    /// # Errors
    /// [`EventError::Payload`] when the wire name matches but the JSON does not fit `E`.
    pub fn data<E: DomainEvent>(&self) -> Result<Option<Cow<'_, E>>, EventError> {
        if self.metadata.event_type != E::EVENT_TYPE {
            return Ok(None);
        }
        match &self.data {
            EventData::Typed(data) => {
                if let Some(typed) = data.as_any().downcast_ref::<E>() {
                    return Ok(Some(Cow::Borrowed(typed)));
                }
                // Same wire name, another Rust type: go through JSON.
                let value = data.to_value().map_err(|e| self.payload_error::<E>(e))?;
                E::deserialize(&value)
                    .map(|e| Some(Cow::Owned(e)))
                    .map_err(|e| self.payload_error::<E>(e))
            }
            EventData::Json(value) => E::deserialize(value.as_ref())
                .map(|e| Some(Cow::Owned(e)))
                .map_err(|e| self.payload_error::<E>(e)),
        }
    }

    /// A typed [`Event<E>`] if this event's wire name is `E::EVENT_TYPE`: sharing this
    /// envelope's metadata and, when it holds an `E`, its data (no copy); decoded from JSON
    /// otherwise.
    ///
    /// # Errors
    /// As [`data`](Self::data).
    pub fn to_event<E: DomainEvent>(&self) -> Result<Option<Event<E>>, EventError> {
        if self.metadata.event_type != E::EVENT_TYPE {
            return Ok(None);
        }
        let shared = match &self.data {
            EventData::Typed(data) => data.clone().into_any().downcast::<E>().ok(),
            EventData::Json(_) => None,
        };
        let data = match shared {
            Some(data) => data,
            None => match self.data::<E>()? {
                Some(data) => Arc::new(data.into_owned()),
                None => return Ok(None),
            },
        };
        Ok(Some(Event {
            metadata: self.metadata.clone(),
            data,
        }))
    }

    pub(super) fn payload_error<E>(&self, source: serde_json::Error) -> EventError {
        EventError::Payload {
            event_type: self.metadata.event_type.clone(),
            rust_type: std::any::type_name::<E>(),
            source,
        }
    }

    /// The event's own fields as a JSON object.
    ///
    /// # Errors
    /// [`EventError::DataNotAnObject`] if typed data does not serialise to an object.
    pub fn data_json(&self) -> Result<Value, EventError> {
        let value = match &self.data {
            EventData::Typed(data) => data.to_value().map_err(|_| self.not_object())?,
            EventData::Json(value) => value.as_ref().clone(),
        };
        if value.is_object() {
            Ok(value)
        } else {
            Err(self.not_object())
        }
    }

    pub(super) fn own_field_named_like(&self, field: &'static str) -> EventError {
        EventError::OwnFieldNamedLikeBaseField {
            event_type: self.metadata.event_type.clone(),
            field,
        }
    }

    pub(super) fn not_object(&self) -> EventError {
        EventError::DataNotAnObject {
            event_type: self.metadata.event_type.clone(),
        }
    }

    /// Checks the base fields (see [`EventMetadata::validate`]).
    ///
    /// # Errors
    /// [`EventError::InvalidField`] naming the field.
    pub fn validate(&self) -> Result<(), EventError> {
        self.metadata.validate()
    }
}

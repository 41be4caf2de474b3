//! The event registry: wire name → Rust type.
//!
//! A bus consuming from Redis or a store reading rows only sees wire names and JSON; the
//! registry turns them back into typed events. An unknown name is a typed error
//! ([`RegistryError::UnknownEventType`]), never a panic.

use std::any::TypeId;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use crate::event::{DomainEvent, EventEnvelope, EventError};

/// Why registering or decoding failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// Another Rust type is already registered under this wire name. Give one of them another
    /// `EVENT_TYPE`.
    #[error("event type {name:?} is already registered to {existing}, cannot register {new}")]
    Conflict {
        /// The wire name.
        name: String,
        /// The type registered first.
        existing: &'static str,
        /// The type that was refused.
        new: &'static str,
    },
    /// No type is registered under this wire name. Register it, or treat the event as foreign.
    #[error("unknown event type {0:?}: it is not registered")]
    UnknownEventType(String),
    /// The JSON is not a valid event, or its data does not fit the registered type.
    #[error(transparent)]
    Event(#[from] EventError),
}

impl RegistryError {
    /// Whether the same call may succeed later (see
    /// [`ErrorKind::is_transient`](crate::ErrorKind::is_transient)); never for
    /// this error type today, kept so every error answers the question the same way.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
    /// What kind of failure this is: a registration conflict is `Conflict`, an unknown type
    /// `NotFound`, an event that does not decode `InvalidData`.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Self::Conflict { .. } => crate::ErrorKind::Conflict,
            Self::UnknownEventType(_) => crate::ErrorKind::NotFound,
            Self::Event(_) => crate::ErrorKind::InvalidData,
        }
    }
}

type Decoder = fn(EventEnvelope) -> Result<EventEnvelope, EventError>;
type FastDecoder = fn(&str) -> Option<EventEnvelope>;

#[derive(Clone)]
struct Registration {
    type_id: TypeId,
    type_name: &'static str,
    decode: Decoder,
    decode_str: FastDecoder,
}

fn decode_as<E: DomainEvent>(envelope: EventEnvelope) -> Result<EventEnvelope, EventError> {
    envelope.into_typed::<E>()
}

/// The `event_type` value of a flat event JSON text, when it is a plain string (no escapes)
/// found right where eventsource-py and this crate write it (the second key).
fn wire_name(json: &str) -> Option<&str> {
    const KEY: &str = "\"event_type\":\"";
    let at = json.get(..200).unwrap_or(json).find(KEY)? + KEY.len();
    let rest = &json[at..];
    let end = rest.find('"')?;
    let name = &rest[..end];
    (!name.contains('\\')).then_some(name)
}

/// Maps wire names to event types. Cheap to clone (shared); safe to use from many tasks.
///
/// ```
/// use eventsource_core::EventRegistry;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize)]
/// # struct OrderCreated { customer_id: String, total_amount: f64 }
/// # eventsource_core::domain_event!(OrderCreated, "OrderCreated", aggregate = "Order");
/// let registry = EventRegistry::new();
/// registry.register::<OrderCreated>().unwrap();
/// assert!(registry.contains("OrderCreated"));
/// assert!(registry.decode(r#"{"event_type":"Nope"}"#).is_err());
/// ```
#[derive(Clone, Default)]
pub struct EventRegistry {
    inner: Arc<RwLock<BTreeMap<String, Registration>>>,
}

impl std::fmt::Debug for EventRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventRegistry")
            .field("event_types", &self.event_types())
            .finish()
    }
}

impl EventRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `E` under `E::EVENT_TYPE`. Registering the same type again is fine.
    ///
    /// # Errors
    /// [`RegistryError::Conflict`] if another type holds that wire name.
    pub fn register<E: DomainEvent>(&self) -> Result<&Self, RegistryError> {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let new = Registration {
            type_id: TypeId::of::<E>(),
            type_name: std::any::type_name::<E>(),
            decode: decode_as::<E>,
            decode_str: crate::event::decode_typed_fast::<E>,
        };
        if let Some(existing) = map.get(E::EVENT_TYPE) {
            if existing.type_id == new.type_id {
                return Ok(self);
            }
            return Err(RegistryError::Conflict {
                name: E::EVENT_TYPE.to_owned(),
                existing: existing.type_name,
                new: new.type_name,
            });
        }
        map.insert(E::EVENT_TYPE.to_owned(), new);
        Ok(self)
    }

    /// Whether a type is registered under `event_type`.
    pub fn contains(&self, event_type: &str) -> bool {
        self.read().contains_key(event_type)
    }

    /// The registered wire names, sorted.
    pub fn event_types(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// The Rust type name registered under `event_type`.
    ///
    /// # Errors
    /// [`RegistryError::UnknownEventType`] naming it.
    pub fn type_name(&self, event_type: &str) -> Result<&'static str, RegistryError> {
        self.read()
            .get(event_type)
            .map(|r| r.type_name)
            .ok_or_else(|| RegistryError::UnknownEventType(event_type.to_owned()))
    }

    /// Parses the flat JSON form and decodes the data into the registered type.
    ///
    /// # Errors
    /// [`RegistryError::UnknownEventType`] for an unregistered wire name,
    /// [`RegistryError::Event`] for malformed JSON or data that does not fit.
    pub fn decode(&self, json: &str) -> Result<EventEnvelope, RegistryError> {
        // Fast path: find the wire name, then decode base and own fields straight from the
        // text. Anything unusual takes the slow path, which names the problem precisely.
        if let Some(event_type) = wire_name(json) {
            let fast = self.read().get(event_type).map(|r| r.decode_str);
            if let Some(decode_str) = fast
                && let Some(event) = decode_str(json)
            {
                return Ok(event);
            }
        }
        let envelope = EventEnvelope::from_json(json)?;
        self.resolve(envelope)
    }

    /// Turns an envelope holding JSON data into one holding its registered Rust type.
    ///
    /// # Errors
    /// As [`decode`](Self::decode).
    pub fn resolve(&self, envelope: EventEnvelope) -> Result<EventEnvelope, RegistryError> {
        let decode = self
            .read()
            .get(envelope.event_type())
            .map(|r| r.decode)
            .ok_or_else(|| RegistryError::UnknownEventType(envelope.event_type().to_owned()))?;
        Ok(decode(envelope)?)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Registration>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }
}

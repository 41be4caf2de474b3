//! Domain events, their metadata, and the wire form they share with eventsource-py.
//!
//! A domain event is a plain serde struct that implements [`DomainEvent`] (most easily through
//! [`domain_event!`](crate::domain_event)). [`Event<E>`] pairs it with [`EventMetadata`];
//! [`EventEnvelope`] is the type-erased form that buses and stores carry.
//!
//! The wire form is one flat JSON object: the base fields below, in this order, then the
//! event's own fields:
//! `event_id, event_type, event_version, occurred_at, aggregate_id, aggregate_type,
//! aggregate_version, tenant_id, actor_id, correlation_id, causation_id, metadata`.

use std::any::Any;
use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use uuid::Uuid;

/// The base keys of the flat JSON form, in wire order.
pub const BASE_FIELDS: [&str; 12] = [
    "event_id",
    "event_type",
    "event_version",
    "occurred_at",
    "aggregate_id",
    "aggregate_type",
    "aggregate_version",
    "tenant_id",
    "actor_id",
    "correlation_id",
    "causation_id",
    "metadata",
];

/// A domain event type: a serde struct with a wire name and the aggregate type it belongs to.
///
/// Implement it with [`domain_event!`](crate::domain_event):
/// ```
/// use serde::{Deserialize, Serialize};
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct OrderShipped { tracking_number: String }
/// eventsource_core::domain_event!(OrderShipped, "OrderShipped", aggregate = "Order");
/// ```
/// The struct's own fields must not reuse a base field name (see [`BASE_FIELDS`]).
pub trait DomainEvent:
    Serialize + DeserializeOwned + Clone + fmt::Debug + Send + Sync + 'static
{
    /// The wire name, the registry key (`event_type` on the wire).
    const EVENT_TYPE: &'static str;
    /// The aggregate type this event belongs to (letters, digits, `_ . -`).
    const AGGREGATE_TYPE: &'static str;
    /// The schema version of this event type (`event_version`, default 1).
    const EVENT_VERSION: u32 = 1;
}

/// Declares a [`DomainEvent`] in one line: wire name, aggregate type, optional schema version.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct OrderCreated { customer_id: String, total_amount: f64 }
/// eventsource_core::domain_event!(OrderCreated, "OrderCreated", aggregate = "Order");
///
/// #[derive(Debug, Clone, Serialize, Deserialize)]
/// struct OrderRenamed { name: String }
/// eventsource_core::domain_event!(OrderRenamed, "OrderRenamed", aggregate = "Order", version = 2);
/// ```
#[macro_export]
macro_rules! domain_event {
    ($ty:ty, $name:expr, aggregate = $agg:expr $(,)?) => {
        impl $crate::event::DomainEvent for $ty {
            const EVENT_TYPE: &'static str = $name;
            const AGGREGATE_TYPE: &'static str = $agg;
        }
    };
    ($ty:ty, $name:expr, aggregate = $agg:expr, version = $ver:expr $(,)?) => {
        impl $crate::event::DomainEvent for $ty {
            const EVENT_TYPE: &'static str = $name;
            const AGGREGATE_TYPE: &'static str = $agg;
            const EVENT_VERSION: u32 = $ver;
        }
    };
}

/// What is wrong with an event or its JSON form.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EventError {
    /// The JSON text is not a JSON object. Nothing can be recovered from it; dead-letter it.
    #[error("event JSON is not an object: {0}")]
    NotAnObject(String),
    /// The JSON is not valid JSON at all.
    #[error("event JSON does not parse")]
    Json(#[source] serde_json::Error),
    /// A base field is missing or has the wrong type or format.
    #[error("event field `{field}` is invalid: {reason}")]
    InvalidField {
        /// The base field's name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The event's own fields do not fit the Rust type registered for its wire name.
    #[error("payload of `{event_type}` does not match {rust_type}")]
    Payload {
        /// The wire name.
        event_type: String,
        /// The Rust type it was decoded into.
        rust_type: &'static str,
        /// The serde error.
        #[source]
        source: serde_json::Error,
    },
    /// The event's own fields did not serialise to a JSON object (e.g. a tuple struct).
    #[error("event `{event_type}` must serialise to a JSON object with named fields")]
    DataNotAnObject {
        /// The wire name.
        event_type: String,
    },
}

impl EventError {
    /// What kind of failure this is: `InvalidInput` for an event that cannot be written
    /// (its data is no JSON object), `InvalidData` for JSON that does not decode.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Self::DataNotAnObject { .. } => crate::ErrorKind::InvalidInput,
            _ => crate::ErrorKind::InvalidData,
        }
    }
}

/// The metadata every event carries, in wire order.
#[derive(Debug, Clone, PartialEq)]
pub struct EventMetadata {
    /// Unique id of this event (UUID v4 by default). Stores reject duplicates.
    pub event_id: Uuid,
    /// The wire name of the event type (registry key).
    pub event_type: String,
    /// Schema version of the event type, >= 1 (default 1).
    pub event_version: u32,
    /// When the event happened, UTC, microsecond precision.
    pub occurred_at: DateTime<Utc>,
    /// The aggregate this event belongs to.
    pub aggregate_id: Uuid,
    /// The aggregate's type: letters, digits, `_`, `.` and `-`.
    pub aggregate_type: String,
    /// Position of the event in its aggregate's stream, >= 1.
    pub aggregate_version: u64,
    /// Tenant for multi-tenant systems.
    pub tenant_id: Option<Uuid>,
    /// Who caused the event (a user or system id).
    pub actor_id: Option<String>,
    /// Ties together all events of one business flow (a new UUID by default).
    pub correlation_id: Uuid,
    /// The event that caused this one.
    pub causation_id: Option<Uuid>,
    /// Free-form metadata.
    pub metadata: Map<String, Value>,
}

/// The current time truncated to microseconds, as events store it.
pub fn now_micros() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

impl EventMetadata {
    /// Fresh metadata: new event id and correlation id, now, version 1, no tenant or actor.
    pub fn new(
        event_type: impl Into<String>,
        aggregate_id: Uuid,
        aggregate_type: impl Into<String>,
    ) -> Self {
        Self {
            event_id: Uuid::new_v4(),
            event_type: event_type.into(),
            event_version: 1,
            occurred_at: now_micros(),
            aggregate_id,
            aggregate_type: aggregate_type.into(),
            aggregate_version: 1,
            tenant_id: None,
            actor_id: None,
            correlation_id: Uuid::new_v4(),
            causation_id: None,
            metadata: Map::new(),
        }
    }

    /// Checks the invariants of the base fields.
    ///
    /// # Errors
    /// [`EventError::InvalidField`] naming the field: an empty event type, an aggregate type
    /// with characters other than letters, digits, `_ . -`, or a version of 0.
    pub fn validate(&self) -> Result<(), EventError> {
        if self.event_type.is_empty() {
            return Err(invalid("event_type", "must not be empty"));
        }
        validate_aggregate_type(&self.aggregate_type)?;
        if self.aggregate_version < 1 {
            return Err(invalid("aggregate_version", "must be >= 1"));
        }
        if self.event_version < 1 {
            return Err(invalid("event_version", "must be >= 1"));
        }
        Ok(())
    }

    /// `occurred_at` as the payload writes it: RFC 3339, microseconds, `Z`.
    pub fn occurred_at_z(&self) -> String {
        self.occurred_at
            .to_rfc3339_opts(SecondsFormat::Micros, true)
    }

    /// `occurred_at` as the flat stream field writes it: RFC 3339, microseconds, `+00:00`.
    pub fn occurred_at_offset(&self) -> String {
        self.occurred_at
            .to_rfc3339_opts(SecondsFormat::Micros, false)
    }
}

/// Checks an aggregate type name: non-empty, letters, digits, `_`, `.` and `-` only.
///
/// # Errors
/// [`EventError::InvalidField`] for `aggregate_type`.
pub fn validate_aggregate_type(aggregate_type: &str) -> Result<(), EventError> {
    if aggregate_type.is_empty() {
        return Err(invalid("aggregate_type", "must not be empty"));
    }
    if let Some(bad) = aggregate_type
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(invalid(
            "aggregate_type",
            format!(
                "{aggregate_type:?} contains {bad:?}; only letters, digits, `_ . -` are allowed"
            ),
        ));
    }
    Ok(())
}

fn invalid(field: &'static str, reason: impl Into<String>) -> EventError {
    EventError::InvalidField {
        field,
        reason: reason.into(),
    }
}

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

/// Object-safe view of a typed event's data.
trait ErasedData: Send + Sync + fmt::Debug {
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
enum EventData {
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
    metadata: Arc<EventMetadata>,
    data: EventData,
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

    fn payload_error<E>(&self, source: serde_json::Error) -> EventError {
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

    fn not_object(&self) -> EventError {
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

    /// The flat JSON object: base fields in wire order, then the event's own fields.
    ///
    /// # Errors
    /// [`EventError::DataNotAnObject`] if the data is not a JSON object.
    pub fn to_json_value(&self) -> Result<Value, EventError> {
        let m = &self.metadata;
        let mut out = Map::with_capacity(BASE_FIELDS.len() + 4);
        out.insert("event_id".into(), Value::String(m.event_id.to_string()));
        out.insert("event_type".into(), Value::String(m.event_type.clone()));
        out.insert("event_version".into(), Value::from(m.event_version));
        out.insert("occurred_at".into(), Value::String(m.occurred_at_z()));
        out.insert(
            "aggregate_id".into(),
            Value::String(m.aggregate_id.to_string()),
        );
        out.insert(
            "aggregate_type".into(),
            Value::String(m.aggregate_type.clone()),
        );
        out.insert("aggregate_version".into(), Value::from(m.aggregate_version));
        out.insert("tenant_id".into(), opt_uuid(m.tenant_id));
        out.insert(
            "actor_id".into(),
            m.actor_id.clone().map_or(Value::Null, Value::String),
        );
        out.insert(
            "correlation_id".into(),
            Value::String(m.correlation_id.to_string()),
        );
        out.insert("causation_id".into(), opt_uuid(m.causation_id));
        out.insert("metadata".into(), Value::Object(m.metadata.clone()));
        match self.data_json()? {
            Value::Object(own) => {
                for (k, v) in own {
                    out.insert(k, v);
                }
            }
            _ => return Err(self.not_object()),
        }
        Ok(Value::Object(out))
    }

    /// The flat JSON text (compact), as eventsource-py writes it into `payload`.
    ///
    /// # Errors
    /// As [`to_json_value`](Self::to_json_value).
    pub fn to_json(&self) -> Result<String, EventError> {
        let mut out = Vec::with_capacity(512);
        self.write_json(&mut out)?;
        // Only valid UTF-8 was written (serde_json output and ASCII).
        String::from_utf8(out).map_err(|_| self.not_object())
    }

    /// Writes the flat JSON text into `out` without building an intermediate JSON tree: the
    /// base fields, then the event's own fields spliced in from their serialised object.
    ///
    /// # Errors
    /// [`EventError::DataNotAnObject`] if the data is not a JSON object.
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), EventError> {
        use std::io::Write as _;
        let m = &self.metadata;
        let json_str = |out: &mut Vec<u8>, s: &str| {
            serde_json::to_writer(&mut *out, s).expect("writing a str to a Vec cannot fail");
        };
        let mut uuid_buf = uuid::Uuid::encode_buffer();
        let mut uuid = |out: &mut Vec<u8>, id: &Uuid| {
            out.push(b'"');
            out.extend_from_slice(id.hyphenated().encode_lower(&mut uuid_buf).as_bytes());
            out.push(b'"');
        };
        out.extend_from_slice(b"{\"event_id\":");
        uuid(out, &m.event_id);
        out.extend_from_slice(b",\"event_type\":");
        json_str(out, &m.event_type);
        let _ = write!(
            out,
            ",\"event_version\":{},\"occurred_at\":\"",
            m.event_version
        );
        let _ = write!(out, "{}", m.occurred_at.format("%Y-%m-%dT%H:%M:%S%.6fZ"));
        out.extend_from_slice(b"\",\"aggregate_id\":");
        uuid(out, &m.aggregate_id);
        out.extend_from_slice(b",\"aggregate_type\":");
        json_str(out, &m.aggregate_type);
        let _ = write!(
            out,
            ",\"aggregate_version\":{},\"tenant_id\":",
            m.aggregate_version
        );
        match &m.tenant_id {
            Some(t) => uuid(out, t),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"actor_id\":");
        match &m.actor_id {
            Some(a) => json_str(out, a),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"correlation_id\":");
        uuid(out, &m.correlation_id);
        out.extend_from_slice(b",\"causation_id\":");
        match &m.causation_id {
            Some(c) => uuid(out, c),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"metadata\":");
        serde_json::to_writer(&mut *out, &m.metadata).map_err(|_| self.not_object())?;
        // The event's own fields: serialise the object, then splice its members in.
        let start = out.len();
        match &self.data {
            EventData::Typed(data) => data.write_json(out),
            EventData::Json(value) => serde_json::to_writer(&mut *out, value.as_ref()),
        }
        .map_err(|_| self.not_object())?;
        let own = &out[start..];
        if own.first() != Some(&b'{') || own.last() != Some(&b'}') {
            return Err(self.not_object());
        }
        if own.len() == 2 {
            // `{}`: no own fields.
            out.truncate(start);
            out.push(b'}');
        } else {
            out[start] = b',';
        }
        Ok(())
    }

    /// Parses the flat JSON form without a registry: the data stays JSON.
    ///
    /// Missing optional base fields take their defaults (`event_version` 1,
    /// `aggregate_version` 1, new `correlation_id`, empty `metadata`).
    ///
    /// # Errors
    /// [`EventError::Json`] for invalid JSON, [`EventError::NotAnObject`], or
    /// [`EventError::InvalidField`] naming a missing or malformed base field.
    pub fn from_json(json: &str) -> Result<Self, EventError> {
        let value: Value = serde_json::from_str(json).map_err(EventError::Json)?;
        Self::from_json_value(value)
    }

    /// As [`from_json`](Self::from_json), from a parsed value.
    ///
    /// # Errors
    /// As [`from_json`](Self::from_json).
    pub fn from_json_value(value: Value) -> Result<Self, EventError> {
        let Value::Object(mut map) = value else {
            return Err(EventError::NotAnObject(kind_of(&value).to_owned()));
        };
        let metadata = take_metadata(&mut map)?;
        metadata.validate()?;
        Ok(Self {
            metadata: Arc::new(metadata),
            data: EventData::Json(Arc::new(Value::Object(map))),
        })
    }

    /// Replaces JSON data with typed data decoded as `E` (used by the registry).
    pub(crate) fn into_typed<E: DomainEvent>(self) -> Result<Self, EventError> {
        match &self.data {
            EventData::Typed(data) if data.as_any().is::<E>() => Ok(self),
            _ => {
                let data = self.data::<E>()?.map(Cow::into_owned);
                match data {
                    Some(data) => Ok(Self {
                        metadata: self.metadata,
                        data: EventData::Typed(Arc::new(data)),
                    }),
                    None => Err(invalid(
                        "event_type",
                        format!(
                            "{:?} is not the wire name of {}",
                            self.metadata.event_type,
                            std::any::type_name::<E>()
                        ),
                    )),
                }
            }
        }
    }
}

/// The base fields as borrowed from a JSON text, for the registry's fast decode path.
#[derive(serde::Deserialize)]
struct BaseFields<'a> {
    event_id: Uuid,
    #[serde(borrow)]
    event_type: Cow<'a, str>,
    event_version: Option<u32>,
    #[serde(borrow)]
    occurred_at: Option<Cow<'a, str>>,
    aggregate_id: Uuid,
    #[serde(borrow)]
    aggregate_type: Cow<'a, str>,
    aggregate_version: Option<u64>,
    tenant_id: Option<Uuid>,
    actor_id: Option<String>,
    correlation_id: Option<Uuid>,
    causation_id: Option<Uuid>,
    metadata: Option<Map<String, Value>>,
}

impl EventMetadata {
    /// Reads the base fields straight from the flat JSON text (no JSON tree), ignoring the
    /// event's own fields. `None` when anything is off; the caller then takes the slow path,
    /// which names the problem precisely.
    pub(crate) fn from_json_fast(json: &str) -> Option<Self> {
        let b: BaseFields<'_> = serde_json::from_str(json).ok()?;
        b.into_metadata()
    }
}

impl BaseFields<'_> {
    /// The metadata with the defaults of the slow path; `None` when it does not validate.
    fn into_metadata(self) -> Option<EventMetadata> {
        let b = self;
        let occurred_at = match &b.occurred_at {
            Some(s) => DateTime::parse_from_rfc3339(s)
                .ok()?
                .with_timezone(&Utc)
                .trunc_subsecs(6),
            None => now_micros(),
        };
        let metadata = EventMetadata {
            event_id: b.event_id,
            event_type: b.event_type.into_owned(),
            event_version: b.event_version.unwrap_or(1),
            occurred_at,
            aggregate_id: b.aggregate_id,
            aggregate_type: b.aggregate_type.into_owned(),
            aggregate_version: b.aggregate_version.unwrap_or(1),
            tenant_id: b.tenant_id,
            actor_id: b.actor_id,
            correlation_id: b.correlation_id.unwrap_or_else(Uuid::new_v4),
            causation_id: b.causation_id,
            metadata: b.metadata.unwrap_or_default(),
        };
        metadata.validate().ok()?;
        Some(metadata)
    }
}

/// A string borrowed from the JSON text when it has no escapes.
#[derive(serde::Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// One pass over a flat JSON object: the base fields typed, every other field kept as JSON.
struct SplitFields;

impl<'de> serde::de::Visitor<'de> for SplitFields {
    type Value = (BaseFields<'de>, Map<String, Value>);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a flat JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        use serde::de::Error;
        let (mut event_id, mut event_type, mut aggregate_id, mut aggregate_type) =
            (None, None, None, None);
        let mut b = BaseFields {
            event_id: Uuid::nil(),
            event_type: Cow::Borrowed(""),
            event_version: None,
            occurred_at: None,
            aggregate_id: Uuid::nil(),
            aggregate_type: Cow::Borrowed(""),
            aggregate_version: None,
            tenant_id: None,
            actor_id: None,
            correlation_id: None,
            causation_id: None,
            metadata: None,
        };
        let mut data = Map::new();
        while let Some(Text(key)) = map.next_key::<Text<'de>>()? {
            match key.as_ref() {
                "event_id" => event_id = Some(map.next_value::<Uuid>()?),
                "event_type" => event_type = Some(map.next_value::<Text<'de>>()?.0),
                "event_version" => b.event_version = map.next_value()?,
                "occurred_at" => {
                    b.occurred_at = map.next_value::<Option<Text<'de>>>()?.map(|t| t.0)
                }
                "aggregate_id" => aggregate_id = Some(map.next_value::<Uuid>()?),
                "aggregate_type" => aggregate_type = Some(map.next_value::<Text<'de>>()?.0),
                "aggregate_version" => b.aggregate_version = map.next_value()?,
                "tenant_id" => b.tenant_id = map.next_value()?,
                "actor_id" => b.actor_id = map.next_value()?,
                "correlation_id" => b.correlation_id = map.next_value()?,
                "causation_id" => b.causation_id = map.next_value()?,
                "metadata" => b.metadata = map.next_value()?,
                _ => {
                    let value: Value = map.next_value()?;
                    data.insert(key.into_owned(), value);
                }
            }
        }
        b.event_id = event_id.ok_or_else(|| A::Error::missing_field("event_id"))?;
        b.event_type = event_type.ok_or_else(|| A::Error::missing_field("event_type"))?;
        b.aggregate_id = aggregate_id.ok_or_else(|| A::Error::missing_field("aggregate_id"))?;
        b.aggregate_type =
            aggregate_type.ok_or_else(|| A::Error::missing_field("aggregate_type"))?;
        Ok((b, data))
    }
}

impl EventEnvelope {
    /// Reads an envelope from its flat JSON text in one pass: the base fields straight into
    /// the metadata, the event's own fields into its JSON data (no intermediate tree for the
    /// whole object). Same result as [`from_json_value`](Self::from_json_value) of the parsed
    /// text, errors included (anything the one pass does not take, such as an empty UUID
    /// string or an escaped key, goes the way of `from_json_value`, which names the problem).
    ///
    /// # Errors
    /// As [`from_json_value`](Self::from_json_value), or [`EventError::Json`] if the text is
    /// not JSON.
    pub fn from_json_str(json: &str) -> Result<Self, EventError> {
        use serde::Deserializer;
        let mut de = serde_json::Deserializer::from_str(json);
        let fast = de
            .deserialize_map(SplitFields)
            .ok()
            .filter(|_| de.end().is_ok())
            .and_then(|(base, data)| Some((base.into_metadata()?, data)));
        match fast {
            Some((metadata, data)) => Ok(Self {
                metadata: Arc::new(metadata),
                data: EventData::Json(Arc::new(Value::Object(data))),
            }),
            None => Self::from_json_value(serde_json::from_str(json).map_err(EventError::Json)?),
        }
    }
}

/// Decodes the flat JSON text as `E` in two passes over the text (base fields, own fields),
/// without a JSON tree. `None` when anything is off (the caller falls back to the slow path).
pub(crate) fn decode_typed_fast<E: DomainEvent>(json: &str) -> Option<EventEnvelope> {
    let metadata = EventMetadata::from_json_fast(json)?;
    if metadata.event_type != E::EVENT_TYPE {
        return None;
    }
    let data: E = serde_json::from_str(json).ok()?;
    Some(Event::from_parts(metadata, data).into())
}

fn opt_uuid(id: Option<Uuid>) -> Value {
    id.map_or(Value::Null, |u| Value::String(u.to_string()))
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn take_metadata(map: &mut Map<String, Value>) -> Result<EventMetadata, EventError> {
    let event_id = req_uuid(map, "event_id")?;
    let event_type = match map.remove("event_type") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(invalid(
                "event_type",
                format!("expected a string, got {}", kind_of(&other)),
            ));
        }
        None => return Err(invalid("event_type", "missing")),
    };
    let event_version = opt_u64(map, "event_version")?.unwrap_or(1);
    let event_version = u32::try_from(event_version)
        .map_err(|_| invalid("event_version", "does not fit in 32 bits"))?;
    let occurred_at = match map.remove("occurred_at") {
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(&s)
            .map_err(|e| invalid("occurred_at", format!("{s:?} is not RFC 3339: {e}")))?
            .with_timezone(&Utc)
            .trunc_subsecs(6),
        Some(Value::Null) | None => now_micros(),
        Some(other) => {
            return Err(invalid(
                "occurred_at",
                format!("expected a string, got {}", kind_of(&other)),
            ));
        }
    };
    let aggregate_id = req_uuid(map, "aggregate_id")?;
    let aggregate_type = match map.remove("aggregate_type") {
        Some(Value::String(s)) => s,
        Some(other) => {
            return Err(invalid(
                "aggregate_type",
                format!("expected a string, got {}", kind_of(&other)),
            ));
        }
        None => return Err(invalid("aggregate_type", "missing")),
    };
    let aggregate_version = opt_u64(map, "aggregate_version")?.unwrap_or(1);
    let tenant_id = opt_uuid_field(map, "tenant_id")?;
    let actor_id = match map.remove("actor_id") {
        Some(Value::String(s)) => Some(s),
        Some(Value::Null) | None => None,
        Some(other) => {
            return Err(invalid(
                "actor_id",
                format!("expected a string, got {}", kind_of(&other)),
            ));
        }
    };
    let correlation_id = opt_uuid_field(map, "correlation_id")?.unwrap_or_else(Uuid::new_v4);
    let causation_id = opt_uuid_field(map, "causation_id")?;
    let metadata = match map.remove("metadata") {
        Some(Value::Object(m)) => m,
        Some(Value::Null) | None => Map::new(),
        Some(other) => {
            return Err(invalid(
                "metadata",
                format!("expected an object, got {}", kind_of(&other)),
            ));
        }
    };
    Ok(EventMetadata {
        event_id,
        event_type,
        event_version,
        occurred_at,
        aggregate_id,
        aggregate_type,
        aggregate_version,
        tenant_id,
        actor_id,
        correlation_id,
        causation_id,
        metadata,
    })
}

fn req_uuid(map: &mut Map<String, Value>, field: &'static str) -> Result<Uuid, EventError> {
    opt_uuid_field(map, field)?.ok_or_else(|| invalid(field, "missing"))
}

fn opt_uuid_field(
    map: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<Uuid>, EventError> {
    match map.remove(field) {
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Uuid::parse_str(&s)
            .map(Some)
            .map_err(|e| invalid(field, format!("{s:?} is not a UUID: {e}"))),
        Some(Value::Null) | None => Ok(None),
        Some(other) => Err(invalid(
            field,
            format!("expected a UUID string, got {}", kind_of(&other)),
        )),
    }
}

fn opt_u64(map: &mut Map<String, Value>, field: &'static str) -> Result<Option<u64>, EventError> {
    match map.remove(field) {
        Some(Value::Number(n)) => n
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid(field, format!("{n} is not a non-negative integer"))),
        Some(Value::Null) | None => Ok(None),
        Some(other) => Err(invalid(
            field,
            format!("expected an integer, got {}", kind_of(&other)),
        )),
    }
}

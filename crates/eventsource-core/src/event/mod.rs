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

use std::fmt;

use serde::Serialize;
use serde::de::DeserializeOwned;

mod envelope;
mod fast;
mod metadata;
#[cfg(test)]
mod tests;
mod typed;
mod wire;

use envelope::EventData;
pub use envelope::EventEnvelope;
pub(crate) use fast::decode_typed_fast;
pub use metadata::{EventMetadata, now_micros, validate_aggregate_type};
pub use typed::Event;

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
    /// The event's own data has a field named like a base field (see [`BASE_FIELDS`]): on
    /// the flat wire form it would overwrite that base field. Rename the field
    /// (`#[serde(rename = "...")]`).
    #[error(
        "event `{event_type}` has an own field named `{field}`, a base field of the wire form; \
         rename it (#[serde(rename = \"...\")])"
    )]
    OwnFieldNamedLikeBaseField {
        /// The wire name.
        event_type: String,
        /// The base field's name.
        field: &'static str,
    },
    /// The event's own fields did not serialise to a JSON object (e.g. a tuple struct).
    #[error("event `{event_type}` must serialise to a JSON object with named fields")]
    DataNotAnObject {
        /// The wire name.
        event_type: String,
    },
}

impl EventError {
    /// Whether the same call may succeed later (see
    /// [`ErrorKind::is_transient`](crate::ErrorKind::is_transient)); never for
    /// this error type today, kept so every error answers the question the same way.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
    /// What kind of failure this is: `InvalidInput` for an event that cannot be written
    /// (its data is no JSON object), `InvalidData` for JSON that does not decode.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Self::DataNotAnObject { .. } | Self::OwnFieldNamedLikeBaseField { .. } => {
                crate::ErrorKind::InvalidInput
            }
            _ => crate::ErrorKind::InvalidData,
        }
    }
}

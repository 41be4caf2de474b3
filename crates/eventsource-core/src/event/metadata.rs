//! [`EventMetadata`]: the base fields every event carries, their defaults and validation.

use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::EventError;

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

pub(super) fn invalid(field: &'static str, reason: impl Into<String>) -> EventError {
    EventError::InvalidField {
        field,
        reason: reason.into(),
    }
}

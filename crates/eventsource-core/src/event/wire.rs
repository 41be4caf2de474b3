//! The wire form shared with eventsource-py: the flat JSON writer and the tree decoder (the
//! general path through a `serde_json::Value`, which names every problem; the one-pass
//! decoders are in `fast`).

use std::borrow::Cow;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::metadata::{invalid, now_micros};
use super::{BASE_FIELDS, DomainEvent, EventData, EventEnvelope, EventError, EventMetadata};

impl EventEnvelope {
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
                    if let Some(field) = BASE_FIELDS.iter().find(|f| **f == k) {
                        return Err(self.own_field_named_like(field));
                    }
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
        if let Some(field) = base_named_key(own) {
            return Err(self.own_field_named_like(field));
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

/// The first top-level key of a serialised JSON object (compact, as serde_json writes it)
/// that is a base field's name.
fn base_named_key(object: &[u8]) -> Option<&'static str> {
    let (mut depth, mut at_key, mut i) = (0usize, false, 0usize);
    while i < object.len() {
        match object[i] {
            b'"' => {
                let start = i;
                let mut escaped = false;
                i += 1;
                while i < object.len() && object[i] != b'"' {
                    if object[i] == b'\\' {
                        escaped = true;
                        i += 1;
                    }
                    i += 1;
                }
                if depth == 1 && at_key {
                    at_key = false;
                    let quoted = &object[start..=i.min(object.len() - 1)];
                    let key: Cow<'_, str> = if escaped {
                        serde_json::from_slice::<String>(quoted).ok()?.into()
                    } else {
                        std::str::from_utf8(&quoted[1..quoted.len() - 1])
                            .ok()?
                            .into()
                    };
                    if let Some(field) = BASE_FIELDS.iter().find(|f| **f == key) {
                        return Some(field);
                    }
                }
            }
            b'{' | b'[' => {
                depth += 1;
                at_key = depth == 1;
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            b',' if depth == 1 => at_key = true,
            _ => {}
        }
        i += 1;
    }
    None
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
    let event_type = match take(map, "event_type") {
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
    let occurred_at = match take(map, "occurred_at") {
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
    let aggregate_type = match take(map, "aggregate_type") {
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
    let actor_id = match take(map, "actor_id") {
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
    let metadata = match take(map, "metadata") {
        Some(Value::Object(m)) => m,
        Some(Value::Null) | None => Map::new(),
        Some(other) => {
            return Err(invalid(
                "metadata",
                format!("expected an object, got {}", kind_of(&other)),
            ));
        }
    };
    // The base fields' slots were emptied by `take`; drop them, keeping the own fields' order.
    map.retain(|key, _| !BASE_FIELDS.contains(&key.as_str()));
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

/// Takes a base field's value out of the object (its slot stays until `take_metadata` drops
/// the base fields at once): `Map::remove` would reorder the remaining fields when
/// serde_json's `preserve_order` is on somewhere in the build.
fn take(map: &mut Map<String, Value>, field: &str) -> Option<Value> {
    map.get_mut(field).map(Value::take)
}

fn req_uuid(map: &mut Map<String, Value>, field: &'static str) -> Result<Uuid, EventError> {
    opt_uuid_field(map, field)?.ok_or_else(|| invalid(field, "missing"))
}

fn opt_uuid_field(
    map: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<Uuid>, EventError> {
    match take(map, field) {
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
    match take(map, field) {
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

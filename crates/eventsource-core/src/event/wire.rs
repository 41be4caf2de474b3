//! The wire form shared with eventsource-py: the flat JSON writer and the decoders (the fast
//! one-pass path the registry uses, and the general path through a `serde_json::Value`).

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::metadata::{invalid, now_micros};
use super::{BASE_FIELDS, DomainEvent, Event, EventData, EventEnvelope, EventError, EventMetadata};

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
///
/// `E` sees the own fields only ([`OwnFields`]), as on the slow path: a
/// `#[serde(flatten)]` map does not collect base fields, and a `#[serde(deny_unknown_fields)]`
/// type is not refused for them.
pub(crate) fn decode_typed_fast<E: DomainEvent>(json: &str) -> Option<EventEnvelope> {
    let metadata = EventMetadata::from_json_fast(json)?;
    if metadata.event_type != E::EVENT_TYPE {
        return None;
    }
    let mut de = serde_json::Deserializer::from_str(json);
    let data = E::deserialize(OwnFields(&mut de)).ok()?;
    de.end().ok()?;
    Some(Event::from_parts(metadata, data).into())
}

/// A deserializer over a flat event object that shows only the event's own fields: base
/// fields are skipped where they stand, in the same single pass over the text.
struct OwnFields<'a, 'de>(&'a mut serde_json::Deserializer<serde_json::de::StrRead<'de>>);

impl<'de> serde::Deserializer<'de> for OwnFields<'_, 'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(
        self,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        serde::Deserializer::deserialize_map(self.0, SkipBase(visitor))
    }

    /// A newtype event (`struct E(Inner)`) reads its inner type from the same own fields.
    fn deserialize_newtype_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Self::Error> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct seq tuple tuple_struct map struct enum identifier ignored_any
    }
}

/// Hands the wrapped visitor a map without the base fields.
struct SkipBase<V>(V);

impl<'de, V: serde::de::Visitor<'de>> serde::de::Visitor<'de> for SkipBase<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.0.visit_map(SkipBaseMap(map))
    }
}

struct SkipBaseMap<A>(A);

impl<'de, A: serde::de::MapAccess<'de>> serde::de::MapAccess<'de> for SkipBaseMap<A> {
    type Error = A::Error;

    fn next_key_seed<K: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        use serde::de::IntoDeserializer as _;
        while let Some(Text(key)) = self.0.next_key::<Text<'de>>()? {
            if BASE_FIELDS.contains(&key.as_ref()) {
                self.0.next_value::<serde::de::IgnoredAny>()?;
                continue;
            }
            let key: serde::de::value::CowStrDeserializer<'de, A::Error> = key.into_deserializer();
            return seed.deserialize(key).map(Some);
        }
        Ok(None)
    }

    fn next_value_seed<S: serde::de::DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<S::Value, A::Error> {
        self.0.next_value_seed(seed)
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

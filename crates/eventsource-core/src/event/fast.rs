//! The one-pass decoders: the base fields read straight from the text (no JSON tree), the
//! event's own fields either kept as JSON ([`EventEnvelope::from_json_str`]) or handed to the
//! registered type with the base fields skipped in the same pass (`decode_typed_fast`). Each
//! gives up (`None`) on anything unusual, and the caller takes the tree path in `wire`, which
//! names the problem.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use chrono::{DateTime, SubsecRound, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::metadata::now_micros;
use super::{BASE_FIELDS, DomainEvent, Event, EventData, EventEnvelope, EventError, EventMetadata};

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

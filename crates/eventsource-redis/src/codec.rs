//! Stream entry ⇄ event, in the exact format eventsource-py writes (`docs/wire-format.md`).
//!
//! An entry's fields, in order: `event_id, event_type, aggregate_id, aggregate_type,
//! tenant_id, occurred_at, payload`, then optionally W3C `traceparent` / `tracestate`.
//! Only `event_type` and `payload` are authoritative on read; other flat fields are ignored.
//!
//! Entries are read as **bytes**: a field that is not valid UTF-8 reaches the decoder
//! unchanged, and where the bus must read text (the payload, `event_type`) invalid UTF-8 makes
//! the entry malformed — dead-lettered with the reason, its original bytes kept, so a replay
//! writes back exactly what was there.
//!
//! A dead letter is the original entry's fields (minus the fields below from an earlier dead
//! lettering), then `original_message_id, retry_count, dlq_timestamp, error, consumer_group`.
//! The bus writes it inside Redis (a Lua script copies the entry), so the bytes are exact.

use eventsource_core::{EventEnvelope, EventError, EventRegistry, RegistryError};
use redis::Value;

/// Fields a dead-letter entry adds after the original ones. eventsource-py strips the first
/// three on replay; this bus strips all of them.
pub const DLQ_FIELDS: [&str; 5] = [
    "original_message_id",
    "retry_count",
    "dlq_timestamp",
    "error",
    "consumer_group",
];

/// Extra flat field naming the only consumer group that should handle a replayed dead letter.
/// Consumers of this bus in other groups acknowledge and skip it (counted); eventsource-py
/// consumers ignore the field and handle it.
pub const REPLAY_GROUP_FIELD: &str = "replay_group";

/// One stream entry: its id and its fields in order, as the bytes Redis holds.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct StreamEntry {
    /// The entry id, e.g. `1700000000000-0`.
    pub id: String,
    /// Field/value pairs in stream order.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for StreamEntry {
    /// Fields as text (invalid UTF-8 shown as U+FFFD).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamEntry")
            .field("id", &self.id)
            .field("fields", &self.fields_lossy())
            .finish()
    }
}

impl StreamEntry {
    /// The raw value of a field (the first one of that name).
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k.as_slice() == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The value of a field as text; `None` when it is absent or not valid UTF-8.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_bytes(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The fields as text, invalid UTF-8 replaced by U+FFFD (for display only).
    pub fn fields_lossy(&self) -> Vec<(String, String)> {
        self.fields
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    /// Bytes held by the fields (what [`max_entry_bytes`](crate::RedisEventBusConfig) caps).
    pub fn size(&self) -> usize {
        self.fields.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

/// The fields of an event's entry, in wire order. `trace` adds `traceparent` (and
/// `tracestate` when present).
///
/// # Errors
/// [`EventError`] if the event's data does not serialise to a JSON object.
pub fn encode_fields(
    event: &EventEnvelope,
    trace: Option<(&str, Option<&str>)>,
) -> Result<Vec<(&'static str, String)>, EventError> {
    let m = event.metadata();
    let mut fields = Vec::with_capacity(9);
    fields.push(("event_id", m.event_id.to_string()));
    fields.push(("event_type", m.event_type.clone()));
    fields.push(("aggregate_id", m.aggregate_id.to_string()));
    fields.push(("aggregate_type", m.aggregate_type.clone()));
    fields.push((
        "tenant_id",
        m.tenant_id.map(|t| t.to_string()).unwrap_or_default(),
    ));
    fields.push(("occurred_at", m.occurred_at_offset()));
    fields.push(("payload", event.to_json()?));
    if let Some((parent, state)) = trace {
        fields.push(("traceparent", parent.to_owned()));
        if let Some(state) = state {
            fields.push(("tracestate", state.to_owned()));
        }
    }
    Ok(fields)
}

/// Why an entry could not become an event.
#[derive(Debug)]
pub enum DecodeFailure {
    /// Nobody can decode the entry: no payload, bytes that are not UTF-8 where text is
    /// required, invalid JSON, a missing or invalid base field. Retrying cannot help:
    /// dead-letter it.
    Malformed(String),
    /// The envelope is valid and its type is registered, but this version of the Rust type
    /// rejects the event's own fields (a new required field, a changed type). Another
    /// version of the service may decode it; see
    /// [`RejectedPolicy`](crate::config::RejectedPolicy).
    Rejected {
        /// The wire name.
        event_type: String,
        /// The serde error, with the Rust type.
        reason: String,
    },
    /// The wire name is not registered. The event is still readable as JSON.
    Unregistered(Box<EventEnvelope>),
}

/// Decodes an entry through the registry.
///
/// # Errors
/// [`DecodeFailure`] as described there.
pub fn decode_entry(
    entry: &StreamEntry,
    registry: &EventRegistry,
) -> Result<EventEnvelope, DecodeFailure> {
    let Some(payload) = entry.get_bytes("payload") else {
        return Err(DecodeFailure::Malformed(
            "entry has no `payload` field".into(),
        ));
    };
    let payload = std::str::from_utf8(payload).map_err(|e| {
        DecodeFailure::Malformed(format!(
            "payload is not valid UTF-8 (invalid byte at offset {}); the original bytes are kept \
             in the dead letter",
            e.valid_up_to()
        ))
    })?;
    let event = match registry.decode(payload) {
        Ok(event) => event,
        Err(RegistryError::UnknownEventType(_)) => {
            let envelope = EventEnvelope::from_json(payload)
                .map_err(|e| DecodeFailure::Malformed(format!("payload: {}", error_chain(&e))))?;
            check_flat_type(entry, &envelope)?;
            return Err(DecodeFailure::Unregistered(Box::new(envelope)));
        }
        Err(RegistryError::Event(e @ EventError::Payload { .. })) => {
            let EventError::Payload { event_type, .. } = &e else {
                unreachable!("matched above")
            };
            return Err(DecodeFailure::Rejected {
                event_type: event_type.clone(),
                reason: error_chain(&e),
            });
        }
        Err(e) => {
            return Err(DecodeFailure::Malformed(format!(
                "payload: {}",
                error_chain(&e)
            )));
        }
    };
    check_flat_type(entry, &event)?;
    Ok(event)
}

fn check_flat_type(entry: &StreamEntry, event: &EventEnvelope) -> Result<(), DecodeFailure> {
    match entry.get_bytes("event_type") {
        Some(flat) if flat != event.event_type().as_bytes() => {
            Err(DecodeFailure::Malformed(format!(
                "event_type field {:?} disagrees with payload event_type {:?}",
                String::from_utf8_lossy(flat),
                event.event_type()
            )))
        }
        _ => Ok(()),
    }
}

/// An error and its sources, `a: b: c`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        let next = s.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = s.source();
    }
    text
}

/// A reply value as bytes (bulk, simple or verbatim string; an integer as its digits).
pub(crate) fn into_bytes(v: Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.into_bytes()),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::VerbatimString { text, .. } => Some(text.into_bytes()),
        _ => None,
    }
}

/// A reply value as text, if it is valid UTF-8.
pub(crate) fn into_text(v: Value) -> Option<String> {
    into_bytes(v).and_then(|b| String::from_utf8(b).ok())
}

/// Field/value pairs, from a flat array or a RESP3 map.
fn take_fields(v: Value) -> Option<Fields> {
    match v {
        Value::Array(flat) => {
            let mut fields = Vec::with_capacity(flat.len() / 2);
            let mut flat = flat.into_iter();
            while let Some(k) = flat.next() {
                let key = into_bytes(k).unwrap_or_default();
                let value = flat.next().and_then(into_bytes).unwrap_or_default();
                fields.push((key, value));
            }
            Some(fields)
        }
        Value::Map(pairs) => Some(
            pairs
                .into_iter()
                .map(|(k, v)| {
                    (
                        into_bytes(k).unwrap_or_default(),
                        into_bytes(v).unwrap_or_default(),
                    )
                })
                .collect(),
        ),
        _ => None,
    }
}

/// Field/value pairs of an entry, as bytes, in order.
pub(crate) type Fields = Vec<(Vec<u8>, Vec<u8>)>;

/// One entry `[id, [f, v, ...]]`; `None` fields mean it was deleted while pending.
pub(crate) fn take_entry(v: Value) -> Option<(String, Option<Fields>)> {
    let Value::Array(parts) = v else { return None };
    let mut parts = parts.into_iter();
    let id = into_text(parts.next()?)?;
    Some((id, parts.next().and_then(take_fields)))
}

/// The entries of an XRANGE / XCLAIM reply. Deleted entries are skipped.
pub(crate) fn parse_range(v: Value) -> Vec<StreamEntry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(take_entry)
        .filter_map(|(id, fields)| fields.map(|fields| StreamEntry { id, fields }))
        .collect()
}

/// An entry read by XREADGROUP: present, deleted while it was pending, or larger than the
/// configured cap (its bytes were read and discarded).
#[derive(Debug)]
pub(crate) enum ReadEntry {
    Present(StreamEntry),
    Deleted(String),
    Oversized { id: String, bytes: usize },
}

/// The entries of an XREADGROUP reply for one stream (Nil on timeout = no entries).
pub(crate) fn parse_read_reply(v: Value, max_entry_bytes: usize) -> Vec<ReadEntry> {
    let streams: Vec<Value> = match v {
        Value::Array(items) => items,
        Value::Map(pairs) => pairs.into_iter().map(|(_, v)| v).collect(),
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    for stream in streams {
        let entries = match stream {
            Value::Array(mut parts) if parts.len() == 2 => parts.pop().unwrap_or(Value::Nil),
            other => other,
        };
        if let Value::Array(list) = entries {
            out.reserve(list.len());
            for raw in list {
                match take_entry(raw) {
                    Some((id, Some(fields))) => {
                        let entry = StreamEntry { id, fields };
                        let bytes = entry.size();
                        if bytes > max_entry_bytes {
                            out.push(ReadEntry::Oversized {
                                id: entry.id,
                                bytes,
                            });
                        } else {
                            out.push(ReadEntry::Present(entry));
                        }
                    }
                    Some((id, None)) => out.push(ReadEntry::Deleted(id)),
                    None => {}
                }
            }
        }
    }
    out
}

/// The integer field `name` of a map-like reply (`XINFO STREAM`: alternating names and values
/// in RESP2, a map in RESP3), if present.
pub(crate) fn reply_field_u64(reply: &Value, name: &str) -> Option<u64> {
    let as_u64 = |v: &Value| match v {
        Value::Int(n) => u64::try_from(*n).ok(),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    };
    let key_is = |k: &Value| match k {
        Value::BulkString(b) => b.as_slice() == name.as_bytes(),
        Value::SimpleString(s) => s == name,
        _ => false,
    };
    match reply {
        Value::Array(items) => items
            .chunks(2)
            .find(|kv| kv.first().is_some_and(key_is))
            .and_then(|kv| kv.get(1))
            .and_then(as_u64),
        Value::Map(items) => items
            .iter()
            .find(|(k, _)| key_is(k))
            .and_then(|(_, v)| as_u64(v)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(b: &[u8]) -> Value {
        Value::BulkString(b.to_vec())
    }

    #[test]
    fn redis_reply_parsing_handles_deleted_and_binary_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            bulk(b"s"),
            Value::Array(vec![
                Value::Array(vec![
                    bulk(b"1-0"),
                    Value::Array(vec![bulk(b"event_type"), bulk(b"X\xff")]),
                ]),
                Value::Array(vec![bulk(b"2-0"), Value::Nil]),
                Value::Array(vec![
                    bulk(b"3-0"),
                    Value::Array(vec![bulk(b"payload"), bulk(&[b'x'; 64])]),
                ]),
            ]),
        ])]);
        let entries = parse_read_reply(reply, 32);
        assert!(
            matches!(&entries[0], ReadEntry::Present(e) if e.get_bytes("event_type") == Some(&b"X\xff"[..]) && e.get("event_type").is_none())
        );
        assert!(matches!(&entries[1], ReadEntry::Deleted(id) if id == "2-0"));
        assert!(
            matches!(&entries[2], ReadEntry::Oversized { id, bytes: 71 } if id == "3-0"),
            "{:?}",
            entries[2]
        );
        assert!(parse_read_reply(Value::Nil, 32).is_empty());
    }

    #[test]
    fn invalid_utf8_payload_is_malformed_and_names_the_offset() {
        let registry = EventRegistry::new();
        let entry = StreamEntry {
            id: "1-0".into(),
            fields: vec![(b"payload".to_vec(), b"{\"a\":\"\xc3\x28\"}".to_vec())],
        };
        match decode_entry(&entry, &registry) {
            Err(DecodeFailure::Malformed(reason)) => {
                assert!(
                    reason.contains("not valid UTF-8") && reason.contains("offset 6"),
                    "{reason}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
}

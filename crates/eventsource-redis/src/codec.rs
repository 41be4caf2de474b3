//! Stream entry ⇄ event, in the exact format eventsource-py writes (shared/spec/wire-format.md).
//!
//! An entry's fields, in order: `event_id, event_type, aggregate_id, aggregate_type,
//! tenant_id, occurred_at, payload`, then optionally W3C `traceparent` / `tracestate`.
//! Only `event_type` and `payload` are authoritative on read; other flat fields are ignored.

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

/// One stream entry: its id and its fields in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamEntry {
    /// The entry id, e.g. `1700000000000-0`.
    pub id: String,
    /// Field/value pairs in stream order.
    pub fields: Vec<(String, String)>,
}

impl StreamEntry {
    /// The value of a field (the first one of that name).
    pub fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
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
    /// The entry can never be decoded (no payload, invalid JSON, bad base field, data that
    /// does not fit the registered type). Retrying cannot help: dead-letter it.
    Malformed(String),
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
    let Some(payload) = entry.get("payload") else {
        return Err(DecodeFailure::Malformed(
            "entry has no `payload` field".into(),
        ));
    };
    let event = match registry.decode(payload) {
        Ok(event) => event,
        Err(RegistryError::UnknownEventType(_)) => {
            let envelope = EventEnvelope::from_json(payload)
                .map_err(|e| DecodeFailure::Malformed(format!("payload: {}", error_chain(&e))))?;
            check_flat_type(entry, &envelope)?;
            return Err(DecodeFailure::Unregistered(Box::new(envelope)));
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
    match entry.get("event_type") {
        Some(flat) if flat != event.event_type() => Err(DecodeFailure::Malformed(format!(
            "event_type field {flat:?} disagrees with payload event_type {:?}",
            event.event_type()
        ))),
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

/// The fields of a dead letter: the original fields (minus DLQ fields of an earlier dead
/// lettering), then `original_message_id, retry_count, dlq_timestamp, error, consumer_group`.
pub fn dead_letter_fields(
    entry: &StreamEntry,
    retry_count: u64,
    error: &str,
    consumer_group: &str,
) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = entry
        .fields
        .iter()
        .filter(|(k, _)| !DLQ_FIELDS.contains(&k.as_str()))
        .cloned()
        .collect();
    fields.push(("original_message_id".into(), entry.id.clone()));
    fields.push(("retry_count".into(), retry_count.to_string()));
    fields.push((
        "dlq_timestamp".into(),
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, false),
    ));
    fields.push(("error".into(), error.to_owned()));
    fields.push(("consumer_group".into(), consumer_group.to_owned()));
    fields
}

fn into_text(v: Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(
            String::from_utf8(b)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        ),
        Value::SimpleString(s) => Some(s),
        Value::Int(i) => Some(i.to_string()),
        Value::VerbatimString { text, .. } => Some(text),
        _ => None,
    }
}

/// As [`parse_entry`], taking the reply apart instead of copying it (the consumer's hot path).
fn take_entry(v: Value) -> Option<(String, Option<Fields>)> {
    let Value::Array(parts) = v else { return None };
    let mut parts = parts.into_iter();
    let id = into_text(parts.next()?)?;
    let fields = match parts.next() {
        Some(Value::Array(flat)) => {
            let mut fields = Vec::with_capacity(flat.len() / 2);
            let mut flat = flat.into_iter();
            while let Some(k) = flat.next() {
                let key = into_text(k).unwrap_or_default();
                let value = flat.next().and_then(into_text).unwrap_or_default();
                fields.push((key, value));
            }
            Some(fields)
        }
        Some(Value::Map(pairs)) => Some(
            pairs
                .into_iter()
                .map(|(k, v)| {
                    (
                        into_text(k).unwrap_or_default(),
                        into_text(v).unwrap_or_default(),
                    )
                })
                .collect(),
        ),
        _ => None,
    };
    Some((id, fields))
}

fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

/// Field/value pairs of an entry, in order.
pub(crate) type Fields = Vec<(String, String)>;

/// One entry `[id, [f, v, ...]]`. `Ok(None)` fields mean the entry was deleted while pending.
/// Non-UTF-8 fields are kept lossily so the entry can still be dead-lettered.
pub(crate) fn parse_entry(v: &Value) -> Option<(String, Option<Fields>)> {
    let Value::Array(parts) = v else { return None };
    let id = as_text(parts.first()?)?;
    let fields = match parts.get(1) {
        Some(Value::Array(flat)) => Some(
            flat.chunks(2)
                .map(|kv| {
                    let text = |x: Option<&Value>| match x {
                        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                        Some(other) => as_text(other).unwrap_or_default(),
                        None => String::new(),
                    };
                    (text(kv.first()), text(kv.get(1)))
                })
                .collect(),
        ),
        Some(Value::Map(pairs)) => Some(
            pairs
                .iter()
                .map(|(k, v)| {
                    (
                        as_text(k).unwrap_or_default(),
                        as_text(v).unwrap_or_default(),
                    )
                })
                .collect(),
        ),
        _ => None,
    };
    Some((id, fields))
}

/// The entries of an XRANGE reply. Deleted entries are skipped.
pub(crate) fn parse_range(v: &Value) -> Vec<StreamEntry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(parse_entry)
        .filter_map(|(id, fields)| fields.map(|fields| StreamEntry { id, fields }))
        .collect()
}

/// An entry read by XREADGROUP: present, or deleted while it was pending.
#[derive(Debug)]
pub(crate) enum ReadEntry {
    Present(StreamEntry),
    Deleted(String),
}

/// The entries of an XREADGROUP reply for one stream (Nil on timeout = no entries).
pub(crate) fn parse_read_reply(v: Value) -> Vec<ReadEntry> {
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
                        out.push(ReadEntry::Present(StreamEntry { id, fields }))
                    }
                    Some((id, None)) => out.push(ReadEntry::Deleted(id)),
                    None => {}
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_reply_parsing_handles_deleted_entries() {
        let reply = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"s".to_vec()),
            Value::Array(vec![
                Value::Array(vec![
                    Value::BulkString(b"1-0".to_vec()),
                    Value::Array(vec![
                        Value::BulkString(b"event_type".to_vec()),
                        Value::BulkString(b"X".to_vec()),
                    ]),
                ]),
                Value::Array(vec![Value::BulkString(b"2-0".to_vec()), Value::Nil]),
            ]),
        ])]);
        let entries = parse_read_reply(reply);
        assert!(matches!(&entries[0], ReadEntry::Present(e) if e.get("event_type") == Some("X")));
        assert!(matches!(&entries[1], ReadEntry::Deleted(id) if id == "2-0"));
        assert!(parse_read_reply(Value::Nil).is_empty());
    }
}

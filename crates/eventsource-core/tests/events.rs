//! The event model and its wire form (`docs/wire-format.md`), and the registry.

use eventsource_core::EventError;
use eventsource_core::event::{BASE_FIELDS, validate_aggregate_type};
use eventsource_core::prelude::*;
use eventsource_core::registry::RegistryError;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

fn order_created() -> Event<OrderCreated> {
    Event::new(
        Uuid::new_v4(),
        OrderCreated {
            customer_id: "cust-123".into(),
            total_amount: 99.99,
        },
    )
}

/// The top-level keys of a JSON object, in the order the text has them.
fn keys_in_text_order(json: &str) -> Vec<String> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                keys.push(k);
            }
            Ok(keys)
        }
    }
    serde::Deserializer::deserialize_map(&mut serde_json::Deserializer::from_str(json), Keys)
        .unwrap()
}

/// Given the tutorial's OrderCreated, its JSON has the base keys in wire order, then its own
/// fields, and parses back to an equal event.
#[test]
fn order_created_json_has_wire_key_order_and_round_trips() {
    let event = order_created();
    let json = event.to_json().unwrap();
    let value: Value = serde_json::from_str(&json).unwrap();
    let keys = keys_in_text_order(&json);
    let mut expected: Vec<&str> = BASE_FIELDS.to_vec();
    expected.extend(["customer_id", "total_amount"]);
    assert_eq!(keys, expected);
    assert_eq!(value["event_type"], "OrderCreated");
    assert_eq!(value["aggregate_type"], "Order");
    assert_eq!(value["event_version"], 1);
    assert_eq!(value["aggregate_version"], 1);
    assert_eq!(value["tenant_id"], Value::Null);
    assert_eq!(value["metadata"], json!({}));
    let occurred = value["occurred_at"].as_str().unwrap();
    assert!(
        occurred.ends_with('Z') && occurred.len() == 27,
        "{occurred}"
    );

    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    let back = registry.decode(&json).unwrap();
    assert!(back.is_typed());
    assert_eq!(back.to_event::<OrderCreated>().unwrap().unwrap(), event);
    // Without a registry the data stays JSON and still decodes.
    let untyped = EventEnvelope::from_json(&json).unwrap();
    assert!(!untyped.is_typed());
    assert_eq!(untyped.to_event::<OrderCreated>().unwrap().unwrap(), event);
    assert_eq!(
        untyped.to_json().unwrap(),
        json,
        "byte-identical re-serialisation"
    );
}

/// A JSON document written by eventsource-py (microseconds, Z, nulls) parses.
#[test]
fn python_written_json_parses() {
    let json = r#"{"event_id":"5a0c2b56-4f43-4a4e-9c4e-0b6f8f0d2a11","event_type":"OrderCreated","event_version":1,"occurred_at":"2026-11-28T14:13:24.501310Z","aggregate_id":"0f8fad5b-d9cb-469f-a165-70867728950e","aggregate_type":"Order","aggregate_version":1,"tenant_id":null,"actor_id":null,"correlation_id":"7c9e6679-7425-40de-944b-e07fc1f90ae7","causation_id":null,"metadata":{},"customer_id":"cust-1","total_amount":1.5}"#;
    let event = EventEnvelope::from_json(json).unwrap();
    assert_eq!(
        event.metadata().occurred_at_offset(),
        "2026-11-28T14:13:24.501310+00:00"
    );
    let data = event.data::<OrderCreated>().unwrap().unwrap();
    assert_eq!(data.total_amount, 1.5);
    assert_eq!(event.to_json().unwrap(), json);
}

/// Causation copies the cause's id and correlation id; metadata entries accumulate.
#[test]
fn causation_and_metadata_helpers() {
    let cause = order_created();
    let effect = Event::new(
        cause.metadata.aggregate_id,
        OrderShipped {
            tracking_number: "T-1".into(),
        },
    )
    .caused_by(&cause.metadata)
    .with_metadata("ip", "10.0.0.1")
    .with_metadata("attempt", 2)
    .with_actor("user-7");
    assert_eq!(effect.metadata.causation_id, Some(cause.metadata.event_id));
    assert_eq!(
        effect.metadata.correlation_id,
        cause.metadata.correlation_id
    );
    assert_eq!(
        effect.metadata.metadata,
        json!({"ip": "10.0.0.1", "attempt": 2})
            .as_object()
            .unwrap()
            .clone()
    );
    assert_eq!(effect.metadata.actor_id.as_deref(), Some("user-7"));
    assert_ne!(effect.metadata.event_id, cause.metadata.event_id);
}

/// Defaults: a fresh v4 event id and correlation id, microsecond precision.
#[test]
fn defaults_are_fresh_ids_and_microseconds() {
    let a = order_created();
    let b = order_created();
    assert_ne!(a.metadata.event_id, b.metadata.event_id);
    assert_ne!(a.metadata.correlation_id, b.metadata.correlation_id);
    assert_eq!(a.metadata.event_id.get_version_num(), 4);
    assert_eq!(a.metadata.occurred_at.timestamp_subsec_nanos() % 1000, 0);
}

/// Aggregate types allow letters, digits, `_ . -` only; versions must be >= 1.
#[test]
fn invalid_base_fields_are_named() {
    assert!(validate_aggregate_type("Order.v2-x_y").is_ok());
    let err = validate_aggregate_type("Order Type").unwrap_err();
    assert!(err.to_string().contains("aggregate_type"), "{err}");
    assert!(validate_aggregate_type("").is_err());
    let event = order_created().with_aggregate_version(0).into_envelope();
    let err = event.validate().unwrap_err();
    assert!(err.to_string().contains("aggregate_version"), "{err}");
}

/// Malformed JSON gives typed errors naming the field, never a panic.
#[test]
fn malformed_json_is_a_typed_error() {
    assert!(matches!(
        EventEnvelope::from_json("not json"),
        Err(EventError::Json(_))
    ));
    assert!(matches!(
        EventEnvelope::from_json("[1]"),
        Err(EventError::NotAnObject(_))
    ));
    let missing = EventEnvelope::from_json(r#"{"event_type":"OrderCreated"}"#).unwrap_err();
    assert!(
        matches!(
            missing,
            EventError::InvalidField {
                field: "event_id",
                ..
            }
        ),
        "{missing}"
    );
    let mut value: Value = serde_json::from_str(&order_created().to_json().unwrap()).unwrap();
    value["aggregate_id"] = json!("not-a-uuid");
    let err = EventEnvelope::from_json(&value.to_string()).unwrap_err();
    assert!(
        matches!(
            err,
            EventError::InvalidField {
                field: "aggregate_id",
                ..
            }
        ),
        "{err}"
    );
    value["aggregate_id"] = json!(Uuid::new_v4().to_string());
    value["total_amount"] = json!("lots");
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    let err = registry.decode(&value.to_string()).unwrap_err();
    assert!(err.to_string().contains("OrderCreated"), "{err}");
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Imposter {
    x: u8,
}
eventsource_core::domain_event!(Imposter, "OrderCreated", aggregate = "Order");

/// The registry: one type per wire name, typed error for unknown names, sorted listing.
#[test]
fn registry_rejects_conflicts_and_names_unknown_types() {
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    registry
        .register::<OrderCreated>()
        .expect("same type twice is fine");
    registry.register::<OrderShipped>().unwrap();
    match registry.register::<Imposter>() {
        Err(RegistryError::Conflict { name, .. }) => assert_eq!(name, "OrderCreated"),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(registry.event_types(), vec!["OrderCreated", "OrderShipped"]);
    let mut value: Value = serde_json::from_str(&order_created().to_json().unwrap()).unwrap();
    value["event_type"] = json!("OrderCancelled");
    match registry.decode(&value.to_string()) {
        Err(RegistryError::UnknownEventType(name)) => assert_eq!(name, "OrderCancelled"),
        other => panic!("expected UnknownEventType, got {other:?}"),
    }
    assert!(matches!(
        registry.type_name("Nope"),
        Err(RegistryError::UnknownEventType(_))
    ));
}

/// Declaring an event with a schema version puts it on the wire.
#[test]
fn event_version_comes_from_the_type() {
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Renamed {
        name: String,
    }
    eventsource_core::domain_event!(Renamed, "OrderRenamed", aggregate = "Order", version = 3);
    let json = Event::new(Uuid::new_v4(), Renamed { name: "n".into() })
        .to_json()
        .unwrap();
    let value: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["event_version"], 3);
}

/// The direct writer and the JSON-tree form hold the same JSON, escapes and all, and the
/// writer keeps eventsource-py's field order (the tree's order is serde_json's: the library
/// does not turn on `preserve_order` for the applications that use it).
#[test]
fn direct_json_writer_matches_the_tree_form() {
    let event = Event::new(
        Uuid::new_v4(),
        OrderCreated {
            customer_id: "quote \" back\\slash ünïcode \n".into(),
            total_amount: 1e-7,
        },
    )
    .with_tenant(Uuid::new_v4())
    .with_actor("actor \"x\"")
    .with_metadata("nested", json!({"a": [1, 2, {"b": null}]}))
    .into_envelope();
    let text = event.to_json().unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap(),
        event.to_json_value().unwrap()
    );
    let order = [
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
        "customer_id",
        "total_amount",
    ];
    let positions: Vec<usize> = order
        .iter()
        .map(|k| text.find(&format!("\"{k}\":")).unwrap())
        .collect();
    assert!(positions.windows(2).all(|w| w[0] < w[1]), "{text}");
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Empty {}
    eventsource_core::domain_event!(Empty, "Empty", aggregate = "X");
    let empty = Event::new(Uuid::new_v4(), Empty {}).into_envelope();
    assert_eq!(
        serde_json::from_str::<Value>(&empty.to_json().unwrap()).unwrap(),
        empty.to_json_value().unwrap()
    );
    assert_eq!(keys_in_text_order(&empty.to_json().unwrap()), BASE_FIELDS);
    #[derive(Debug, Clone, Serialize, Deserialize)]
    struct Tuple(u8);
    eventsource_core::domain_event!(Tuple, "Tuple", aggregate = "X");
    assert!(matches!(
        Event::new(Uuid::new_v4(), Tuple(1))
            .into_envelope()
            .to_json(),
        Err(EventError::DataNotAnObject { .. })
    ));
}

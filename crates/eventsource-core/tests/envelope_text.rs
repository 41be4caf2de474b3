//! `EventEnvelope::from_json_str` (one pass over the text, used by the PostgreSQL feed) gives
//! exactly what `from_json_value` gives for the parsed text: the same envelope for every
//! well-formed object, the same error for every malformed one.

use eventsource_core::{EventEnvelope, EventError};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

fn same(text: &str) {
    let slow = serde_json::from_str::<Value>(text)
        .map_err(|e| EventError::Json(e).to_string())
        .and_then(|v| EventEnvelope::from_json_value(v).map_err(|e| e.to_string()));
    let fast = EventEnvelope::from_json_str(text).map_err(|e| e.to_string());
    match (&slow, &fast) {
        (Ok(a), Ok(b)) => {
            assert_eq!(a.metadata(), b.metadata(), "{text}");
            assert_eq!(
                a.to_json_value().unwrap(),
                b.to_json_value().unwrap(),
                "{text}"
            );
        }
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "{text}");
        }
        _ => panic!("{text}: from_json_value {slow:?}, from_json_str {fast:?}"),
    }
}

fn base() -> Map<String, Value> {
    let v = json!({
        "event_id": "0b5d8c52-1f52-4c4a-9d1e-6a3c2f1e9b10",
        "event_type": "OrderCreated",
        "event_version": 1,
        "occurred_at": "2026-11-28T10:00:00.123456Z",
        "aggregate_id": "7e0c3f7e-8a0f-4c7e-9d43-2b1c1a7f9d10",
        "aggregate_type": "Order",
        "aggregate_version": 3,
        "tenant_id": null,
        "actor_id": "ops",
        "correlation_id": "5f0c3f7e-8a0f-4c7e-9d43-2b1c1a7f9d10",
        "causation_id": null,
        "metadata": {"source": "test"},
        "customer_id": "c-1",
        "total_amount": 12.5
    });
    match v {
        Value::Object(m) => m,
        _ => unreachable!(),
    }
}

#[test]
fn named_cases_match_the_slow_path() {
    same(&Value::Object(base()).to_string());
    let cases: Vec<(&str, Value)> = vec![
        ("tenant_id", json!("")),
        ("tenant_id", json!("not-a-uuid")),
        ("tenant_id", json!("1b5d8c52-1f52-4c4a-9d1e-6a3c2f1e9b10")),
        ("event_id", json!(5)),
        ("event_id", json!("")),
        ("event_type", json!(null)),
        ("event_version", json!(1u64 << 40)),
        ("occurred_at", json!("yesterday")),
        ("occurred_at", json!(17)),
        ("aggregate_type", json!("")),
        ("aggregate_version", json!(-1)),
        ("actor_id", json!(7)),
        ("metadata", json!([1, 2])),
        (
            "causation_id",
            json!("2b5d8c52-1f52-4c4a-9d1e-6a3c2f1e9b10"),
        ),
        ("customer_id", json!({"nested": [1, "two", null]})),
    ];
    for (field, value) in cases {
        let mut m = base();
        m.insert(field.into(), value);
        same(&Value::Object(m).to_string());
    }
    for field in ["event_id", "event_type", "aggregate_id", "aggregate_type"] {
        let mut m = base();
        m.remove(field);
        same(&Value::Object(m).to_string());
    }
    // Escapes in keys and values, duplicate fields (the last one counts), not JSON, not an
    // object, trailing garbage.
    let text = Value::Object(base()).to_string();
    same(&text.replace("\"customer_id\":\"c-1\"", "\"customer_id\":\"c\\u00e9\\n\""));
    same(&text.replace(
        "\"event_type\":\"OrderCreated\"",
        "\"event\\u005ftype\":\"OrderCreated\"",
    ));
    same(&text.replace(
        "\"aggregate_type\":\"Order\"",
        "\"aggregate_type\":\"Or\\\"der\"",
    ));
    same(&text.replace("{", "{\"aggregate_version\":9,"));
    same(&text.replace("{", "{\"total_amount\":1,"));
    same("[1, 2]");
    same("\"text\"");
    same("{\"event_id\": ");
    same(&format!("{text} x"));
}

proptest! {
    #[test]
    fn any_own_fields_match_the_slow_path(
        fields in proptest::collection::btree_map("[a-z_]{1,12}", any::<i64>(), 0..8),
        text_field in "\\PC{0,20}",
        version in 1u64..1_000_000,
        with_tenant in any::<bool>(),
    ) {
        let mut m = base();
        for (k, v) in fields {
            m.insert(k, json!(v));
        }
        m.insert("note".into(), json!(text_field));
        m.insert("aggregate_version".into(), json!(version));
        if with_tenant {
            m.insert("tenant_id".into(), json!("3b5d8c52-1f52-4c4a-9d1e-6a3c2f1e9b10"));
        }
        same(&Value::Object(m).to_string());
    }
}

//! Property tests: the JSON writer and the registry's fast decoder agree with serde_json's
//! tree path (`to_json_value`, `from_json_value` + `to_event`) for events with plain fields,
//! `#[serde(flatten)]`, `#[serde(deny_unknown_fields)]`, and own fields named like a base
//! field (refused by both writers).

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use super::*;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Plain {
    name: String,
    count: i64,
    ratio: Option<f64>,
    tags: Vec<String>,
}
crate::domain_event!(Plain, "Plain", aggregate = "Thing");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Flat {
    name: String,
    #[serde(flatten)]
    extra: BTreeMap<String, String>,
}
crate::domain_event!(Flat, "Flat", aggregate = "Thing");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Strict {
    name: String,
    count: i64,
}
crate::domain_event!(Strict, "Strict", aggregate = "Thing");

/// An own field named like a base field (`metadata`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Clash {
    name: String,
    metadata: String,
}
crate::domain_event!(Clash, "Clash", aggregate = "Thing");

fn text() -> impl Strategy<Value = String> {
    // Any Unicode, with the characters JSON must escape well represented.
    prop_oneof!["\\PC{0,12}", "[a-z\"\\\\/\\n\\t\u{1}\u{7f}é😀 ]{0,12}"]
}

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "[a-z_]{1,10}",
        1 => proptest::sample::select(BASE_FIELDS.to_vec()).prop_map(str::to_owned),
    ]
}

prop_compose! {
    fn any_metadata()(
        actor in proptest::option::of(text()),
        tenant in proptest::option::of(any::<u128>()),
        causation in proptest::option::of(any::<u128>()),
        version in 1u64..1_000_000,
        extra in proptest::collection::btree_map("[a-z]{1,6}", text(), 0..3),
    ) -> Meta {
        (actor, tenant.map(Uuid::from_u128), causation.map(Uuid::from_u128), version, extra)
    }
}

/// Actor, tenant, causation, aggregate version and free-form metadata of a generated event.
type Meta = (
    Option<String>,
    Option<Uuid>,
    Option<Uuid>,
    u64,
    BTreeMap<String, String>,
);

fn event<E: DomainEvent>(
    data: E,
    (actor, tenant, causation, version, extra): Meta,
) -> EventEnvelope {
    let mut e = Event::new(Uuid::new_v4(), data).with_aggregate_version(version);
    if let Some(actor) = actor {
        e = e.with_actor(actor);
    }
    if let Some(tenant) = tenant {
        e = e.with_tenant(tenant);
    }
    e.metadata_mut().causation_id = causation;
    for (k, v) in extra {
        e = e.with_metadata(k, v);
    }
    e.into_envelope()
}

/// The writer and the tree give the same text, or the same refusal.
fn writer_agrees(envelope: &EventEnvelope) -> Option<String> {
    match (envelope.to_json(), envelope.to_json_value()) {
        (Ok(text), Ok(tree)) => {
            let reparsed: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(reparsed, tree, "{text}");
            // The writer's order: the base fields first, in wire order.
            assert!(text.starts_with("{\"event_id\":"), "{text}");
            let at: Vec<usize> = BASE_FIELDS
                .iter()
                .map(|f| text.find(&format!("\"{f}\":")).expect("every base field"))
                .collect();
            assert!(at.windows(2).all(|w| w[0] < w[1]), "{text}");
            Some(text)
        }
        (Err(a), Err(b)) => {
            assert_eq!(a.to_string(), b.to_string());
            None
        }
        (a, b) => panic!("writer {a:?}, tree {b:?}"),
    }
}

/// The fast decoder reads what the tree path reads: when it answers, the same metadata and
/// data (it may decline, and the registry then takes the tree path).
fn fast_agrees<E: DomainEvent + PartialEq>(text: &str) -> Option<Event<E>> {
    let fast = decode_typed_fast::<E>(text).map(|e| e.to_event::<E>().unwrap().unwrap());
    let slow = serde_json::from_str::<Value>(text)
        .map_err(EventError::Json)
        .and_then(EventEnvelope::from_json_value)
        .and_then(|e| e.to_event::<E>());
    if let Some(fast) = &fast {
        let slow = slow
            .as_ref()
            .unwrap_or_else(|e| panic!("fast decoded, slow failed: {e}: {text}"))
            .as_ref()
            .expect("same wire name");
        let mut slow_metadata = slow.metadata.as_ref().clone();
        if !text.contains("\"occurred_at\":\"") {
            // Both default a missing time to "now", read microseconds apart.
            slow_metadata.occurred_at = fast.metadata.occurred_at;
        }
        assert_eq!(fast.metadata.as_ref(), &slow_metadata, "{text}");
        assert_eq!(fast.data, slow.data, "{text}");
    }
    fast
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn plain_events_write_and_decode_alike(
        name in text(),
        count in any::<i64>(),
        ratio in proptest::option::of(-1e12f64..1e12),
        tags in proptest::collection::vec(text(), 0..4),
        meta in any_metadata(),
    ) {
        let data = Plain { name, count, ratio, tags };
        let envelope = event(data.clone(), meta);
        let text = writer_agrees(&envelope).expect("a plain event writes");
        // Held as JSON (no registry), both decoders give an envelope that writes the same
        // event back.
        let parsed: Value = serde_json::from_str(&text).unwrap();
        for again in [EventEnvelope::from_json(&text), EventEnvelope::from_json_str(&text)] {
            let again: Value = serde_json::from_str(&again.unwrap().to_json().unwrap()).unwrap();
            prop_assert_eq!(&again, &parsed);
        }
        let decoded = fast_agrees::<Plain>(&text).expect("the fast path reads it");
        prop_assert_eq!(decoded.data.as_ref(), &data);
        prop_assert_eq!(decoded.metadata.as_ref(), envelope.metadata());
    }

    #[test]
    fn flattened_fields_write_and_decode_alike(
        name in text(),
        extra in proptest::collection::btree_map(key(), text(), 0..5),
        meta in any_metadata(),
    ) {
        let clashes = extra.keys().any(|k| BASE_FIELDS.contains(&k.as_str()));
        let data = Flat { name, extra };
        let envelope = event(data.clone(), meta);
        match writer_agrees(&envelope) {
            None => prop_assert!(clashes, "refused only for a base field name"),
            Some(text) => {
                prop_assert!(!clashes, "a base field name must be refused: {}", text);
                let decoded = fast_agrees::<Flat>(&text).expect("the fast path reads it");
                // The flattened map holds the own fields only, never base fields.
                prop_assert_eq!(decoded.data.as_ref(), &data);
            }
        }
    }

    #[test]
    fn strict_types_decode_on_the_fast_path(
        name in text(),
        count in any::<i64>(),
        meta in any_metadata(),
        unknown in proptest::option::of("[a-z]{1,8}"),
    ) {
        let data = Strict { name, count };
        let envelope = event(data.clone(), meta);
        let text = writer_agrees(&envelope).expect("writes");
        let decoded = fast_agrees::<Strict>(&text).expect("base fields are not its fields");
        prop_assert_eq!(decoded.data.as_ref(), &data);
        if let Some(unknown) = unknown.filter(|u| u != "name" && u != "count") {
            // An own field the type does not know: both paths refuse it.
            let mut tree: Value = serde_json::from_str(&text).unwrap();
            tree[unknown.as_str()] = Value::from(1);
            let text = tree.to_string();
            prop_assert!(fast_agrees::<Strict>(&text).is_none());
            prop_assert!(EventEnvelope::from_json_value(tree).unwrap().to_event::<Strict>().is_err());
        }
    }

    #[test]
    fn perturbed_texts_never_decode_differently(
        name in text(),
        count in any::<i64>(),
        meta in any_metadata(),
        field in proptest::sample::select(vec![
            "name", "count", "ratio", "tags", "event_id", "event_type", "occurred_at",
            "aggregate_id", "aggregate_version", "tenant_id", "actor_id", "metadata",
        ]),
        value in prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            text().prop_map(Value::from),
            Just(serde_json::json!({"a": [1, {"b": null}]})),
        ],
    ) {
        let envelope = event(Plain { name, count, ratio: None, tags: vec![] }, meta);
        let mut tree = envelope.to_json_value().unwrap();
        tree[field] = value;
        fast_agrees::<Plain>(&tree.to_string());
    }
}

/// An own field named like a base field would overwrite it on the wire (the tree replaced
/// it, the writer wrote the key twice): both writers refuse it, naming the field.
#[test]
fn an_own_field_named_like_a_base_field_is_refused() {
    let envelope = Event::new(
        Uuid::new_v4(),
        Clash {
            name: "n".into(),
            metadata: "mine".into(),
        },
    )
    .into_envelope();
    for result in [
        envelope.to_json().map(drop),
        envelope.to_json_value().map(drop),
    ] {
        let err = result.unwrap_err();
        assert!(
            matches!(
                &err,
                EventError::OwnFieldNamedLikeBaseField {
                    field: "metadata",
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.kind(), crate::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("rename"), "{err}");
    }
}

/// A newtype event reads on the fast path too (its inner struct sees the own fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Wrapped(Strict);
crate::domain_event!(Wrapped, "Wrapped", aggregate = "Thing");

#[test]
fn a_newtype_event_decodes_on_the_fast_path() {
    let data = Wrapped(Strict {
        name: "n".into(),
        count: 7,
    });
    let envelope = Event::new(Uuid::new_v4(), data.clone()).into_envelope();
    let text = writer_agrees(&envelope).expect("writes");
    let decoded = fast_agrees::<Wrapped>(&text).expect("the fast path reads a newtype");
    assert_eq!(decoded.data.as_ref(), &data);
}

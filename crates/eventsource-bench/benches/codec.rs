//! Encode and decode of one stream entry (the tutorial's `OrderCreated`, about 600 bytes):
//! the client-side work per event that publish and consume cannot avoid.
//!
//! `cargo bench -p eventsource-bench --features criterion`

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::codec::{StreamEntry, decode_entry, encode_fields};

fn event() -> EventEnvelope {
    Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: "cust-12345".into(),
            total_amount: 18517.5,
        },
    )
    .into_envelope()
}

fn codec(c: &mut Criterion) {
    let event = event();
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().expect("fresh registry");
    let fields = encode_fields(&event, None).expect("encodes");
    let entry = StreamEntry {
        id: "1700000000000-0".into(),
        fields: fields
            .iter()
            .map(|(k, v)| (k.as_bytes().to_vec(), v.clone().into_bytes()))
            .collect(),
    };
    let payload = entry.get("payload").expect("payload").to_owned();

    c.bench_function("encode_entry_fields", |b| {
        b.iter(|| encode_fields(black_box(&event), None))
    });
    c.bench_function("encode_payload_json", |b| {
        b.iter(|| black_box(&event).to_json())
    });
    c.bench_function("decode_entry_registered", |b| {
        b.iter(|| decode_entry(black_box(&entry), &registry))
    });
    c.bench_function("decode_payload_untyped", |b| {
        b.iter(|| EventEnvelope::from_json(black_box(&payload)))
    });
    c.bench_function("decode_then_to_typed_event", |b| {
        b.iter(|| {
            let Ok(e) = decode_entry(black_box(&entry), &registry) else {
                panic!("decodes");
            };
            e.to_event::<OrderCreated>()
        })
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);

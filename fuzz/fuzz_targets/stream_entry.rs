//! Stream entries as the consumer decodes them, through a registry that knows the order
//! events (see `eventsource_redis::fuzzing::stream_entry_input`).
#![no_main]

use std::sync::OnceLock;

use eventsource_core::EventRegistry;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};

fn registry() -> &'static EventRegistry {
    static REGISTRY: OnceLock<EventRegistry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let r = EventRegistry::new();
        r.register::<OrderCreated>().expect("registers");
        r.register::<OrderShipped>().expect("registers");
        r
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    eventsource_redis::fuzzing::stream_entry_input(data, registry());
});

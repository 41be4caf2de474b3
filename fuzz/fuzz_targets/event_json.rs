//! The event JSON decoders agree (see `eventsource_redis::fuzzing::event_json_input`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    eventsource_redis::fuzzing::event_json_input(data);
});

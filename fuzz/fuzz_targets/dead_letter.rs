//! Dead letters as the CLI and the dashboard read them: the input as an XRANGE reply of a
//! dead-letter stream.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = eventsource_redis::fuzzing::dead_letters(data);
});

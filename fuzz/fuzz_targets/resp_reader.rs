//! The consumer's own RESP reader (XREADGROUP replies) under any bytes and any
//! fragmentation (see `eventsource_redis::fuzzing::resp_reader_input`): entries or an error,
//! never a panic or an allocation sized by a length the input declares.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    eventsource_redis::fuzzing::resp_reader_input(data);
});

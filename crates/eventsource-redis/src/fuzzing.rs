//! Entry points for the fuzz targets in `fuzz/` and for the test that replays their corpus.
//! Not an API: compiled only with the `fuzzing` feature, and free to change.
//!
//! Each function must return (an error is fine) for any input; a panic, a hang or an
//! allocation sized by a number in the input is the bug the fuzzer looks for.

use std::pin::Pin;
use std::task::{Context, Poll};

use eventsource_core::EventRegistry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::codec::{self, ReadEntry, StreamEntry};
use crate::dlq::DlqMessage;
use crate::reader::RespReader;

/// A byte stream that hands out `data` in pieces ending at `cuts` and swallows writes: a
/// socket whose reads return any fragmentation.
pub(crate) struct Chunked {
    data: Vec<u8>,
    cuts: Vec<usize>,
    pos: usize,
}

impl Chunked {
    pub(crate) fn new(data: &[u8], cuts: &[usize]) -> Self {
        let mut cuts = cuts.to_vec();
        cuts.sort_unstable();
        Self {
            data: data.to_vec(),
            cuts,
            pos: 0,
        }
    }
}

impl AsyncRead for Chunked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let pos = self.pos;
        let end = self
            .cuts
            .iter()
            .copied()
            .find(|&c| c > pos)
            .unwrap_or(self.data.len())
            .min(self.data.len())
            .min(pos + buf.remaining());
        buf.put_slice(&self.data[pos..end]);
        self.pos = end;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Chunked {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(Ok(b.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Feeds `data` to the consumer's own RESP reader as an XREADGROUP reply, in pieces ending at
/// `cuts`. Returns how many entries it read, or the error.
pub fn read_reply(data: &[u8], cuts: &[usize], max_entry_bytes: usize) -> Result<usize, String> {
    let mut reader = RespReader::new(Chunked::new(data, cuts));
    tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(reader.read_reply(max_entry_bytes))
        .map(|entries| entries.len())
        .map_err(|e| e.to_string())
}

/// Parses `data` as a RESP reply (redis-rs), reads it as an XREADGROUP reply the way the
/// redis-rs read path does, and decodes every entry through `registry`. Returns how many
/// entries decoded.
pub fn stream_entries(data: &[u8], registry: &EventRegistry, max_entry_bytes: usize) -> usize {
    let Ok(value) = redis::parse_redis_value(data) else {
        return 0;
    };
    codec::parse_read_reply(value, max_entry_bytes)
        .into_iter()
        .filter(|e| match e {
            ReadEntry::Present(entry) => decode(entry, registry),
            ReadEntry::Deleted(_) | ReadEntry::Oversized { .. } => false,
        })
        .count()
}

/// Decodes one entry through `registry`, touching what the consumer reads of it.
pub fn decode(entry: &StreamEntry, registry: &EventRegistry) -> bool {
    let _ = entry.fields_lossy();
    let _ = entry.size();
    match codec::decode_entry(entry, registry) {
        Ok(event) => {
            let _ = event.to_json();
            true
        }
        Err(failure) => {
            let _ = format!("{failure:?}");
            false
        }
    }
}

/// Parses `data` as a RESP reply (redis-rs), reads it as an XRANGE reply of a dead-letter
/// stream, and reads every letter as the CLI and the dashboard do (type, original id, retry
/// count, error, group, JSON). Returns how many letters it read.
pub fn dead_letters(data: &[u8]) -> usize {
    let Ok(value) = redis::parse_redis_value(data) else {
        return 0;
    };
    let letters: Vec<DlqMessage> = codec::parse_range(value)
        .into_iter()
        .map(DlqMessage::from_entry)
        .collect();
    for letter in &letters {
        let _ = (
            letter.event_type(),
            letter.original_message_id(),
            letter.retry_count(),
            letter.error(),
            letter.consumer_group(),
        );
        let _ = serde_json::to_string(letter);
        let _ = format!("{letter:?}");
    }
    letters.len()
}

/// The `resp_reader` target: the first byte says how many of the next bytes are gaps between
/// reads (cut points), the rest is the reply.
pub fn resp_reader_input(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 32).min(rest.len());
    let (gaps, reply) = rest.split_at(n);
    let mut at = 0;
    let cuts: Vec<usize> = gaps
        .iter()
        .map(|g| {
            at += usize::from(*g) + 1;
            at
        })
        .collect();
    let _ = read_reply(reply, &cuts, 1 << 20);
}

/// The `stream_entry` target: the input as a whole RESP reply read the redis-rs way, and the
/// input split at 0xFF bytes into the field/value pairs of one entry.
pub fn stream_entry_input(data: &[u8], registry: &EventRegistry) {
    let _ = stream_entries(data, registry, 64 * 1024);
    let parts: Vec<&[u8]> = data.split(|b| *b == 0xFF).collect();
    let fields = parts
        .chunks(2)
        .map(|kv| {
            (
                kv[0].to_vec(),
                kv.get(1).map(|v| v.to_vec()).unwrap_or_default(),
            )
        })
        .collect();
    let entry = StreamEntry {
        id: "1-0".into(),
        fields,
    };
    let _ = decode(&entry, registry);
}

/// The `dead_letter` target.
pub fn dead_letter_input(data: &[u8]) {
    let _ = dead_letters(data);
}

/// The `event_json` target: the one-pass `EventEnvelope::from_json_str` gives the same result
/// as the tree path `from_json` — both fail, or both succeed with the same event (a missing
/// `correlation_id` or `occurred_at` is generated fresh by each — a new id, the current
/// time — so those two are not compared).
///
/// # Panics
/// When they disagree (that is the finding).
pub fn event_json_input(data: &[u8]) {
    use eventsource_core::EventEnvelope;
    let comparable = |e: &EventEnvelope| {
        let mut v = e.to_json_value().expect("a decoded event encodes");
        if let Some(o) = v.as_object_mut() {
            o.remove("correlation_id");
            o.remove("occurred_at");
        }
        v
    };
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let fast = EventEnvelope::from_json_str(text);
    let tree = EventEnvelope::from_json(text);
    match (&fast, &tree) {
        (Ok(a), Ok(b)) => assert_eq!(
            comparable(a),
            comparable(b),
            "decoders disagree on {text:?}"
        ),
        (Err(_), Err(_)) => {}
        _ => panic!("one decoder failed: fast {fast:?}, tree {tree:?}, input {text:?}"),
    }
}

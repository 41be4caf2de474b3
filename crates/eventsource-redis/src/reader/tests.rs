//! The RESP reader against byte-exact replies: any fragmentation, null and deleted entries,
//! bad lengths, the entry size cap, and arbitrary or corrupted bytes (never a panic).

use proptest::prelude::*;

use super::*;
use crate::codec::Fields;

/// Entries as (id, fields).
type Entries = Vec<(String, Fields)>;

fn parse(data: &[u8], cuts: Vec<usize>, max: usize) -> Result<Vec<ReadEntry>, ReadError> {
    let mut reader = RespReader::new(crate::fuzzing::Chunked::new(data, &cuts));
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(reader.read_reply(max))
}

fn bulk(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", b.len()).as_bytes());
    out.extend_from_slice(b);
    out.extend_from_slice(b"\r\n");
}

/// The XREADGROUP reply Redis would send for these entries.
fn reply(entries: &[(String, Fields)]) -> Vec<u8> {
    let mut out = b"*1\r\n*2\r\n".to_vec();
    bulk(&mut out, b"stream");
    out.extend_from_slice(format!("*{}\r\n", entries.len()).as_bytes());
    for (id, fields) in entries {
        out.extend_from_slice(b"*2\r\n");
        bulk(&mut out, id.as_bytes());
        out.extend_from_slice(format!("*{}\r\n", fields.len() * 2).as_bytes());
        for (k, v) in fields {
            bulk(&mut out, k);
            bulk(&mut out, v);
        }
    }
    out
}

fn present(entries: &[ReadEntry]) -> Entries {
    entries
        .iter()
        .map(|e| match e {
            ReadEntry::Present(e) => (e.id.clone(), e.fields.clone()),
            other => panic!("{other:?}"),
        })
        .collect()
}

#[test]
fn null_reply_is_no_entries_and_deleted_entries_are_reported() {
    assert!(parse(b"*-1\r\n", vec![], 1024).unwrap().is_empty());
    let data = b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*-1\r\n";
    assert!(
        matches!(&parse(data, vec![], 1024).unwrap()[..], [ReadEntry::Deleted(id)] if id == "1-0")
    );
}

#[test]
fn negative_lengths_other_than_minus_one_are_protocol_errors() {
    for data in [
        &b"*-2\r\n"[..],
        b"*1\r\n*2\r\n$-2\r\n",
        b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*-2\r\n",
    ] {
        assert!(
            matches!(parse(data, vec![], 1024), Err(ReadError::Protocol(_))),
            "{}",
            String::from_utf8_lossy(data)
        );
    }
}

#[test]
fn declared_lengths_never_size_an_allocation() {
    // A bulk longer than Redis allows is refused before anything is allocated.
    let huge = b"*1\r\n*2\r\n$99999999999\r\n";
    assert!(matches!(
        parse(huge, vec![], 1024),
        Err(ReadError::Protocol(_))
    ));
    // A vast entry count with no data behind it ends in "connection closed", not in an
    // allocation of the declared size.
    let vast = b"*1\r\n*2\r\n$1\r\ns\r\n*4000000000\r\n";
    assert!(matches!(
        parse(vast, vec![], 1024),
        Err(ReadError::Connection(_))
    ));
    // An odd number of field strings is not a stream entry.
    let odd = b"*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n$3\r\n1-0\r\n*1\r\n$1\r\nk\r\n";
    assert!(matches!(
        parse(odd, vec![], 1024),
        Err(ReadError::Protocol(_))
    ));
}

#[test]
fn an_entry_over_the_cap_is_skipped_and_the_next_one_read() {
    let entries = vec![
        (
            "1-0".to_owned(),
            vec![(b"payload".to_vec(), vec![b'x'; 5000])],
        ),
        (
            "2-0".to_owned(),
            vec![(b"payload".to_vec(), b"{}".to_vec())],
        ),
    ];
    let read = parse(&reply(&entries), vec![7, 100, 3000], 1024).unwrap();
    assert!(matches!(&read[0], ReadEntry::Oversized { id, bytes } if id == "1-0" && *bytes > 1024));
    assert!(
        matches!(&read[1], ReadEntry::Present(e) if e.id == "2-0" && e.get("payload") == Some("{}"))
    );
}

fn entries_strategy() -> impl Strategy<Value = Entries> {
    let field = (
        proptest::collection::vec(any::<u8>(), 0..12),
        proptest::collection::vec(any::<u8>(), 0..64),
    );
    proptest::collection::vec(
        (1u64..u64::MAX, proptest::collection::vec(field, 0..6)),
        0..6,
    )
    .prop_map(|entries| {
        entries
            .into_iter()
            .enumerate()
            .map(|(i, (ms, fields))| (format!("{ms}-{i}"), fields))
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// However the reply is cut into reads, the entries come out the same, bytes intact.
    #[test]
    fn any_fragmentation_parses_the_same(
        entries in entries_strategy(),
        cuts in proptest::collection::vec(0usize..2000, 0..40),
    ) {
        let data = reply(&entries);
        let read = parse(&data, {
            let mut c = cuts;
            c.sort_unstable();
            c
        }, 1 << 20).unwrap();
        prop_assert_eq!(present(&read), entries);
    }

    /// Arbitrary bytes never panic; they parse or fail with an error.
    #[test]
    fn arbitrary_bytes_never_panic(
        data in proptest::collection::vec(any::<u8>(), 0..300),
        cuts in proptest::collection::vec(0usize..300, 0..20),
    ) {
        let _ = parse(&data, cuts, 1024);
    }

    /// A valid reply with garbage cut into it fails cleanly or parses, never panics.
    #[test]
    fn corrupted_replies_never_panic(
        entries in entries_strategy(),
        at in 0usize..500,
        garbage in proptest::collection::vec(any::<u8>(), 1..8),
    ) {
        let mut data = reply(&entries);
        let at = at.min(data.len());
        data.splice(at..at, garbage);
        let _ = parse(&data, vec![], 1024);
    }
}

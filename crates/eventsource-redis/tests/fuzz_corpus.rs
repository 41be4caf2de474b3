//! The fuzz targets of `fuzz/` on the stable toolchain, as part of every test run (CI's short
//! pass): each file of their committed corpus, then a proptest pass of corpus files with
//! bytes replaced, cut or duplicated, and of random bytes. libFuzzer itself needs nightly;
//! `fuzz/README.md` gives the commands and the last runs' figures.

use std::path::PathBuf;
use std::sync::OnceLock;

use eventsource_core::EventRegistry;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use eventsource_redis::fuzzing;
use proptest::prelude::*;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus {} is missing: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read(p).expect("a corpus file"))
        .collect()
}

/// A target's name and its corpus files.
type Corpus = (&'static str, Vec<Vec<u8>>);

fn corpora() -> &'static [Corpus] {
    static ALL: OnceLock<Vec<Corpus>> = OnceLock::new();
    ALL.get_or_init(|| {
        ["resp_reader", "stream_entry", "dead_letter", "event_json"]
            .into_iter()
            .map(|t| (t, corpus(t)))
            .collect()
    })
}

fn registry() -> &'static EventRegistry {
    static REGISTRY: OnceLock<EventRegistry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let r = EventRegistry::new();
        r.register::<OrderCreated>().expect("registers");
        r.register::<OrderShipped>().expect("registers");
        r
    })
}

fn run(target: &str, data: &[u8]) {
    match target {
        "resp_reader" => fuzzing::resp_reader_input(data),
        "stream_entry" => fuzzing::stream_entry_input(data, registry()),
        "dead_letter" => fuzzing::dead_letter_input(data),
        "event_json" => fuzzing::event_json_input(data),
        other => panic!("no target {other}"),
    }
}

#[test]
fn every_corpus_file_passes_its_target() {
    for (target, files) in corpora() {
        assert!(files.len() >= 5, "the {target} corpus is nearly empty");
        for data in files {
            run(target, data);
        }
    }
}

/// A corpus file with some bytes replaced, a piece cut out and a piece repeated.
fn mutated() -> impl Strategy<Value = (usize, usize, Vec<u8>)> {
    (
        0..4usize,
        any::<usize>(),
        prop::collection::vec(any::<(usize, u8)>(), 0..8),
        any::<(usize, usize)>(),
        any::<(usize, usize)>(),
    )
        .prop_map(|(t, pick, replace, cut, repeat)| {
            let files = &corpora()[t].1;
            let mut data = files[pick % files.len()].clone();
            for (at, byte) in replace {
                if !data.is_empty() {
                    let i = at % data.len();
                    data[i] = byte;
                }
            }
            if !data.is_empty() {
                let start = cut.0 % data.len();
                let end = (start + cut.1 % 16).min(data.len());
                data.drain(start..end);
            }
            if !data.is_empty() {
                let start = repeat.0 % data.len();
                let end = (start + repeat.1 % 32).min(data.len());
                let piece = data[start..end].to_vec();
                data.splice(start..start, piece);
            }
            (t, pick, data)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 20_000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_corpus_files_never_panic((t, _pick, data) in mutated()) {
        run(corpora()[t].0, &data);
    }

    #[test]
    fn random_bytes_never_panic(t in 0..4usize, data in prop::collection::vec(any::<u8>(), 0..600)) {
        run(corpora()[t].0, &data);
    }
}

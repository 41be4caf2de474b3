//! The tutorial's complete example runs against the real Redis and prints its expected
//! output (UUIDs aside), twice in a row; with Redis unreachable it says how to start Redis.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn example() -> PathBuf {
    // target/debug/deps/<this test> -> target/debug/examples/tutorial17
    let mut path = std::env::current_exe().unwrap();
    path.pop();
    path.pop();
    path.push("examples");
    path.push("tutorial17");
    assert!(path.exists(), "cargo test builds examples: {path:?}");
    path
}

fn normalise(text: &str) -> Vec<String> {
    text.lines()
        .map(|line| {
            line.split(' ')
                .map(|word| {
                    if uuid::Uuid::parse_str(word).is_ok() {
                        "<uuid>"
                    } else {
                        word
                    }
                })
                .collect::<Vec<_>>()
                .join(" ")
                .trim()
                .to_owned()
        })
        .filter(|l| !l.is_empty())
        .collect()
}

const EXPECTED: &str = include_str!("tutorial17.expected");

/// Two runs in a row both print the tutorial's expected output.
#[test]
fn tutorial_example_prints_the_expected_output_twice() {
    let prefix = unique_prefix("tutorial");
    let _cleanup: Vec<Cleanup> = (1..=4).map(|n| Cleanup(format!("{prefix}{n}"))).collect();
    for run in 1..=2 {
        let out = Command::new(example())
            .env("EVENTSOURCE_REDIS_URL", redis_url())
            .env("EVENTSOURCE_DEMO_PREFIX", &prefix)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "run {run} failed: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            normalise(&stdout),
            normalise(EXPECTED),
            "run {run}:\n{stdout}"
        );
    }
}

/// With the configured Redis unreachable the example exits non-zero and says what to do.
#[test]
fn tutorial_example_explains_an_unreachable_redis() {
    let out = Command::new(example())
        .env("EVENTSOURCE_REDIS_URL", "redis://127.0.0.1:1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("cannot connect to Redis at redis://127.0.0.1:1"),
        "{stdout}"
    );
    assert!(
        stdout.contains("start that Redis, or unset the variable"),
        "{stdout}"
    );
}

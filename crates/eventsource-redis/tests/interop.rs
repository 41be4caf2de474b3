//! Interop with the real eventsource-py 0.15.1 (from PyPI) on the same Redis streams:
//! Python publishes / Rust consumes, Rust publishes / Python consumes, and dead letters written
//! by either side are listed and replayed by the other.
//!
//! The first test to run creates a virtualenv under the target dir with the newest Python 3.13
//! or later it finds (pyenv or PATH; `EVENTSOURCE_INTEROP_PYTHON` overrides) and installs
//! `eventsource-py[redis]==0.15.1`; later runs reuse it. Without such a Python the tests are
//! reported as ignored with the reason (this file's own harness), unless
//! `EVENTSOURCE_REQUIRE_INTEROP=1` (set by CI), which makes that a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use serde_json::Value;

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop")
}

/// The venv's python with eventsource-py installed (set up once per target dir), or `None`
/// when no Python 3.13+ exists (the tests then return at once, after one loud line).
fn python() -> Option<PathBuf> {
    static PYTHON: OnceLock<Option<PathBuf>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let base = eventsource_testsupport::python::interop_python()?;
            let venv =
                Path::new(env!("CARGO_TARGET_TMPDIR")).join("interop-venv-eventsource-py-0.15.1");
            let py = venv.join("bin/python");
            let ready = |py: &Path| {
                Command::new(py)
                    .args(["-c", "import eventsource, redis"])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            };
            if py.exists() && ready(&py) {
                return Some(py);
            }
            let created = Command::new(&base)
                .args(["-m", "venv", "--clear"])
                .arg(&venv)
                .status()
                .expect("the interop Python runs");
            assert!(created.success(), "creating the virtualenv failed");
            let installed = Command::new(&py)
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                    "eventsource-py[redis]==0.15.1",
                ])
                .status()
                .unwrap();
            assert!(
                installed.success(),
                "pip install eventsource-py[redis]==0.15.1 failed"
            );
            assert!(ready(&py));
            Some(py)
        })
        .clone()
}

/// The venv's python; only called by tests that checked [`python`] first.
fn py() -> PathBuf {
    python().expect("checked at the start of the test")
}

/// Runs a script; returns its stdout lines parsed as JSON, asserting success.
fn run_py(script: &str, args: &[&str]) -> Vec<Value> {
    let out = Command::new(py())
        .arg(scripts().join(script))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Python's `model_dump(mode="json")` and ours agree on every key; timestamps compared as
/// instants (Python drops a zero fraction).
fn assert_same_event(py: &Value, ours: &Value) {
    let (p, o) = (py.as_object().unwrap(), ours.as_object().unwrap());
    assert_eq!(
        p.keys().collect::<Vec<_>>(),
        o.keys().collect::<Vec<_>>(),
        "same keys in the same order"
    );
    for (k, pv) in p {
        let ov = &o[k];
        if k == "occurred_at" {
            let t = |v: &Value| chrono::DateTime::parse_from_rfc3339(v.as_str().unwrap()).unwrap();
            assert_eq!(t(pv), t(ov));
        } else {
            assert_eq!(pv, ov, "field {k}");
        }
    }
}

/// eventsource-py publishes; this bus consumes every event with equal fields.
async fn python_publishes_rust_consumes() {
    let prefix = unique_prefix("py2rs");
    let _c = Cleanup(prefix.clone());
    let url = redis_url();
    let published = run_py(
        "py_publish.py",
        &[
            "--redis-url",
            &url,
            "--prefix",
            &prefix,
            "--count",
            "20",
            "--tenant-id",
            "11111111-2222-3333-4444-555555555555",
        ],
    );
    assert_eq!(published.len(), 20);
    let bus = bus(config(&prefix, "rust-consumers", "r"));
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    bus.subscribe(move |e: Event<OrderCreated>| {
        let g = g.clone();
        async move {
            g.lock()
                .unwrap()
                .push(e.into_envelope().to_json_value().unwrap())
        }
    });
    let task = spawn_consumer(&bus);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            got.lock().unwrap().len() == 20
        })
        .await
    );
    stop(&bus, task).await;
    for (py, ours) in published.iter().zip(got.lock().unwrap().iter()) {
        assert_same_event(py, ours);
    }
    assert_eq!(pending(bus.stream_name(), "rust-consumers").await, 0);
}

/// This bus publishes (with a trace context field Python does not know); eventsource-py
/// consumes them all with equal fields.
async fn rust_publishes_python_consumes() {
    let prefix = unique_prefix("rs2py");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "rust", "r"));
    let mut events: Vec<EventEnvelope> = (0..20).map(created).collect();
    events[3].metadata_mut().tenant_id = Some(uuid::Uuid::new_v4());
    events[4].metadata_mut().actor_id = Some("user-4".into());
    events[5]
        .metadata_mut()
        .metadata
        .insert("k".into(), "v".into());
    bus.publish_events(&events).await.unwrap();
    let url = redis_url();
    let consumed = run_py(
        "py_consume.py",
        &[
            "--redis-url",
            &url,
            "--prefix",
            &prefix,
            "--group",
            "python",
            "--expect",
            "20",
            "--timeout",
            "15",
        ],
    );
    assert_eq!(consumed.len(), 20);
    for (py, ours) in consumed.iter().zip(events.iter()) {
        assert_same_event(py, &ours.to_json_value().unwrap());
    }
    assert_eq!(
        pending(bus.stream_name(), "python").await,
        0,
        "Python acked them all"
    );
}

/// A dead letter written by eventsource-py is listed and replayed by this bus, and the replay
/// is handled by a Rust consumer.
async fn python_dead_letter_listed_and_replayed_by_rust() {
    let prefix = unique_prefix("pydlq");
    let _c = Cleanup(prefix.clone());
    let url = redis_url();
    let published = run_py(
        "py_publish.py",
        &[
            "--redis-url",
            &url,
            "--prefix",
            &prefix,
            "--count",
            "1",
            "--group",
            "py",
        ],
    );
    let event_id = published[0]["event_id"].as_str().unwrap().to_owned();
    // Python's handler fails: the entry stays pending in group `py`.
    let out = Command::new(py())
        .arg(scripts().join("py_consume.py"))
        .args([
            "--redis-url",
            &url,
            "--prefix",
            &prefix,
            "--group",
            "py",
            "--expect",
            "1",
            "--timeout",
            "10",
            "--fail",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 1);
    let stream = format!("{prefix}:stream");
    assert_eq!(pending(&stream, "py").await, 1);
    age_pending(&stream, "py", 120_000).await;
    let stats = run_py(
        "py_dlq.py",
        &[
            "recover",
            "--redis-url",
            &url,
            "--prefix",
            &prefix,
            "--group",
            "py",
            "--min-idle-ms",
            "1000",
            "--max-retries",
            "0",
        ],
    );
    assert_eq!(stats[0]["dlq"], 1, "{stats:?}");

    let bus = bus(config(&prefix, "rust", "r"));
    let letters = bus.get_dlq_messages(10).await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.event_type(), Some("OrderCreated"));
    assert_eq!(letter.get("event_id"), Some(event_id.as_str()));
    assert!(letter.original_message_id().is_some());
    assert_eq!(letter.retry_count(), Some(0));
    assert!(letter.get("dlq_timestamp").is_some());
    assert_eq!(letter.consumer_group(), None, "Python records no group");

    // A Rust consumer, caught up with the history, then sees the replay.
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let id = event_id.clone();
    bus.subscribe(move |e: Event<OrderCreated>| {
        let (h, id) = (h.clone(), id.clone());
        async move {
            if e.metadata.event_id.to_string() == id {
                h.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    let task = spawn_consumer(&bus);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            handled.load(Ordering::SeqCst) == 1
        })
        .await,
        "history read"
    );
    assert!(bus.replay_dlq_message(&letter.message_id).await.unwrap());
    assert!(
        wait_until(Duration::from_secs(10), || async {
            handled.load(Ordering::SeqCst) == 2
        })
        .await,
        "replay handled"
    );
    stop(&bus, task).await;
    assert!(bus.get_dlq_messages(10).await.unwrap().is_empty());
}

/// A dead letter written by this bus (with its extra `error` and `consumer_group` fields) is
/// listed and replayed by eventsource-py; the replayed entry is handled by a Rust consumer.
async fn rust_dead_letter_listed_and_replayed_by_python() {
    let prefix = unique_prefix("rsdlq");
    let _c = Cleanup(prefix.clone());
    let failing = bus(config(&prefix, "billing", "r").max_retries(0));
    failing.subscribe(|_: Event<OrderCreated>| async {
        Err::<(), HandlerError>("card declined".into())
    });
    failing.connect().await.unwrap();
    let event = created(7);
    failing
        .publish_events(std::slice::from_ref(&event))
        .await
        .unwrap();
    let task = spawn_consumer(&failing);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            failing.stats().events_processed_failed == 1
        })
        .await
    );
    stop(&failing, task).await;
    age_pending(failing.stream_name(), "billing", 120_000).await;
    let stats = recover_aged(&failing).await;
    assert_eq!(stats.dlq, 1);

    let url = redis_url();
    let listed = run_py(
        "py_dlq.py",
        &[
            "list",
            "--redis-url",
            &url,
            "--prefix",
            &prefix,
            "--group",
            "python-ops",
        ],
    );
    assert_eq!(listed.len(), 1);
    let data = &listed[0]["data"];
    assert_eq!(data["event_id"], event.event_id().to_string());
    assert_eq!(data["retry_count"], "0");
    assert!(data["error"].as_str().unwrap().contains("card declined"));
    assert_eq!(data["consumer_group"], "billing");
    let message_id = listed[0]["message_id"].as_str().unwrap();
    let replayed = run_py(
        "py_dlq.py",
        &[
            "replay",
            message_id,
            "--redis-url",
            &url,
            "--prefix",
            &prefix,
            "--group",
            "python-ops",
        ],
    );
    assert_eq!(replayed, vec![Value::Bool(true)]);
    assert!(failing.get_dlq_messages(10).await.unwrap().is_empty());

    // The Python replay carries our extra fields into the main stream; they are harmless.
    let healthy = bus(config(&prefix, "billing", "r2"));
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    healthy.subscribe(move |_: Event<OrderCreated>| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    let task = spawn_consumer(&healthy);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            handled.load(Ordering::SeqCst) == 1
        })
        .await
    );
    stop(&healthy, task).await;
    assert_eq!(pending(healthy.stream_name(), "billing").await, 0);
}

/// A Python consumer and a Rust consumer in the same group share the work: every event is
/// handled once, by one of them, and both get some.
async fn python_and_rust_consumers_share_one_group() {
    let prefix = unique_prefix("mixed");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "mixed", "rust-1"));
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    bus.subscribe(move |e: Event<OrderCreated>| {
        let g = g.clone();
        async move { g.lock().unwrap().push(e.metadata.event_id.to_string()) }
    });
    bus.connect().await.unwrap();
    let task = spawn_consumer(&bus);
    let url = redis_url();
    let py = py();
    let script = scripts().join("py_consume.py");
    let (p, u) = (prefix.clone(), url.clone());
    let python_side = std::thread::spawn(move || {
        Command::new(py)
            .arg(script)
            .args([
                "--redis-url",
                &u,
                "--prefix",
                &p,
                "--group",
                "mixed",
                "--consumer",
                "python-1",
                "--expect",
                "40",
                "--timeout",
                "6",
            ])
            .output()
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(2000)).await; // both consumers are waiting
    let events: Vec<EventEnvelope> = (0..40).map(created).collect();
    for e in &events {
        bus.publish_events(std::slice::from_ref(e)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = python_side.join().unwrap();
    stop(&bus, task).await;
    let by_python: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["event_id"].as_str().map(str::to_owned))
        .collect();
    let by_rust = got.lock().unwrap().clone();
    let all: std::collections::HashSet<String> =
        events.iter().map(|e| e.event_id().to_string()).collect();
    let mut union: Vec<String> = by_python.iter().chain(by_rust.iter()).cloned().collect();
    union.sort();
    let unique: std::collections::HashSet<String> = union.iter().cloned().collect();
    assert_eq!(
        union.len(),
        40,
        "python {} + rust {}: each event once",
        by_python.len(),
        by_rust.len()
    );
    assert_eq!(unique, all);
    assert!(
        !by_python.is_empty() && !by_rust.is_empty(),
        "python {} rust {}",
        by_python.len(),
        by_rust.len()
    );
    assert_eq!(pending(bus.stream_name(), "mixed").await, 0);
}

fn main() -> std::process::ExitCode {
    use eventsource_testsupport::harness;
    let missing = eventsource_testsupport::python::interop_python()
        .is_none()
        .then(|| {
            "no Python 3.13 or later (pyenv or PATH; or set EVENTSOURCE_INTEROP_PYTHON)".to_owned()
        });
    harness::run(vec![
        harness::test(
            "python_publishes_rust_consumes",
            python_publishes_rust_consumes,
        )
        .unless(missing.clone()),
        harness::test(
            "rust_publishes_python_consumes",
            rust_publishes_python_consumes,
        )
        .unless(missing.clone()),
        harness::test(
            "python_dead_letter_listed_and_replayed_by_rust",
            python_dead_letter_listed_and_replayed_by_rust,
        )
        .unless(missing.clone()),
        harness::test(
            "rust_dead_letter_listed_and_replayed_by_python",
            rust_dead_letter_listed_and_replayed_by_python,
        )
        .unless(missing.clone()),
        harness::test(
            "python_and_rust_consumers_share_one_group",
            python_and_rust_consumers_share_one_group,
        )
        .unless(missing.clone()),
    ])
}

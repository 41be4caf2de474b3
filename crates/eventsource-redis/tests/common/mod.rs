//! Shared test helpers: a unique stream prefix per test, configs, raw Redis access, waiting.
#![allow(dead_code, unreachable_pub, unused_imports)]

use std::future::Future;
use std::time::{Duration, Instant};

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};
use redis::aio::MultiplexedConnection;

pub mod http;
pub mod scale;

pub use eventsource_testsupport::{
    Cleanup, DelayProxy, OwnRedis, free_port, redis_url, temp_dir, unique_prefix,
};

pub fn config(prefix: &str, group: &str, consumer: &str) -> RedisEventBusConfig {
    RedisEventBusConfig::default()
        .redis_url(redis_url())
        .stream_prefix(prefix.to_owned())
        .consumer_group(group.to_owned())
        .consumer_name(consumer.to_owned())
        .block_ms(100)
        .recovery_interval_ms(0)
}

pub fn registry() -> EventRegistry {
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    registry.register::<OrderShipped>().unwrap();
    registry
}

pub fn bus(config: RedisEventBusConfig) -> RedisEventBus {
    RedisEventBus::new(config, registry()).unwrap()
}

pub fn created(i: usize) -> EventEnvelope {
    Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: format!("cust-{i}"),
            total_amount: i as f64 * 1.5,
        },
    )
    .into_envelope()
}

pub fn shipped(i: usize) -> EventEnvelope {
    Event::new(
        uuid::Uuid::new_v4(),
        OrderShipped {
            tracking_number: format!("TRACK-{i}"),
        },
    )
    .with_aggregate_version(2)
    .into_envelope()
}

pub async fn raw() -> MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .expect("the tests' Redis answers")
}

/// Polls `check` every 20 ms until it is true or `timeout` passes; returns the last result.
pub async fn wait_until<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Subscribes a handler to `OrderCreated` that only counts; returns the counter.
pub fn counting(bus: &RedisEventBus) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let n = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let n2 = n.clone();
    bus.subscribe(move |_: Event<OrderCreated>| {
        let n = n2.clone();
        async move {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    n
}

/// Subscribes a handler to `OrderCreated` that records event ids; returns the set.
pub fn collecting_ids(
    bus: &RedisEventBus,
) -> std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let s = seen.clone();
    bus.subscribe(move |e: Event<OrderCreated>| {
        let s = s.clone();
        async move {
            s.lock().unwrap().insert(e.metadata.event_id.to_string());
        }
    });
    seen
}

/// Runs recovery for entries idle at least 1 s (tests age them with [`age_pending`]).
pub async fn recover_aged(bus: &RedisEventBus) -> eventsource_redis::RecoveryStats {
    bus.recover_pending_messages(eventsource_redis::RecoveryOptions {
        min_idle_time_ms: Some(1000),
        ..Default::default()
    })
    .await
    .expect("recovery runs")
}

/// Starts `bus.start_consuming()` on a task.
pub fn spawn_consumer(
    bus: &RedisEventBus,
) -> tokio::task::JoinHandle<Result<(), eventsource_redis::RedisBusError>> {
    let bus = bus.clone();
    tokio::spawn(async move { bus.start_consuming().await })
}

/// Stops the consumer and waits for its loop to return (at most 10 s).
pub async fn stop(
    bus: &RedisEventBus,
    task: tokio::task::JoinHandle<Result<(), eventsource_redis::RedisBusError>>,
) {
    bus.stop_consuming();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("consumer stops within 10 s")
        .expect("consumer task does not panic")
        .expect("consumer returns Ok");
}

/// XPENDING summary count for a group.
pub async fn pending(stream: &str, group: &str) -> u64 {
    let mut conn = raw().await;
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(&mut conn)
        .await
        .unwrap();
    match reply {
        redis::Value::Array(v) => match v.first() {
            Some(redis::Value::Int(n)) => *n as u64,
            _ => 0,
        },
        _ => 0,
    }
}

/// Per-entry delivery counts of a group's pending list: (id, deliveries).
pub async fn pending_entries(stream: &str, group: &str) -> Vec<(String, u64)> {
    let mut conn = raw().await;
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(10_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    rows.into_iter().map(|(id, _, _, n)| (id, n)).collect()
}

/// Delivers every new entry to consumer `name` without acknowledging: a consumer that
/// crashed right after reading.
pub async fn read_and_crash(stream: &str, group: &str, name: &str) {
    let mut conn = raw().await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg(name)
        .arg("COUNT")
        .arg(1_000_000)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Ages every pending entry of a group instantly (XCLAIM ... IDLE ... JUSTID) without adding
/// a delivery.
pub async fn age_pending(stream: &str, group: &str, idle_ms: u64) {
    let mut conn = raw().await;
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(100_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    for (id, owner, _, _) in rows {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg(stream)
            .arg(group)
            .arg(owner)
            .arg(0)
            .arg(&id)
            .arg("IDLE")
            .arg(idle_ms)
            .arg("JUSTID")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
}

/// Kills the connections whose client name starts with `name` (e.g. a consumer's reader).
pub async fn kill_client_named(url: &str, name: &str) -> usize {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut killed = 0;
    for line in list.lines() {
        if line.contains(&format!(" name={name} "))
            && let Some(id) = line.split(' ').find_map(|kv| kv.strip_prefix("id="))
        {
            let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(&mut conn)
                .await;
            killed += 1;
        }
    }
    killed
}

/// A command running the demo worker whose standard error (its log) goes to a file of the
/// test's own instead of the terminal: a passing test shows nothing of it, a failing one
/// prints the log's last lines with its failure (see [`print_worker_logs_on_failure`]).
/// Standard output is discarded; callers may set it again.
pub fn worker_command() -> tokio::process::Command {
    print_worker_logs_on_failure();
    let test = std::thread::current()
        .name()
        .unwrap_or("worker")
        .replace(|c: char| !c.is_ascii_alphanumeric() && c != '_', "_");
    let dir = eventsource_testsupport::process_dir().join("worker-logs");
    std::fs::create_dir_all(&dir).expect("a log directory");
    let path = dir.join(format!("{test}.log"));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("a log file");
    WORKER_LOGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(std::thread::current().name().unwrap_or("").to_owned(), path);
    let mut command = tokio::process::Command::new(worker_exe());
    command
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    command
}

static WORKER_LOGS: std::sync::Mutex<std::collections::BTreeMap<String, std::path::PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Installs (once) a panic hook that prints, with a failing test's panic, the last 80 lines
/// its workers logged.
pub fn print_worker_logs_on_failure() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            previous(info);
            let name = std::thread::current().name().unwrap_or("").to_owned();
            let path = WORKER_LOGS
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&name)
                .cloned();
            if let Some(path) = path
                && let Ok(text) = std::fs::read_to_string(&path)
            {
                let lines: Vec<&str> = text.lines().collect();
                let tail = &lines[lines.len().saturating_sub(80)..];
                eprintln!(
                    "--- the workers' log ({}), last {} lines ---",
                    path.display(),
                    tail.len()
                );
                for line in tail {
                    eprintln!("{line}");
                }
            }
        }));
    });
}

/// The demo worker (`examples/worker.rs`), built (or found up to date) once per test
/// process: `cargo test --test X` does not build examples, and a stale worker would test old
/// code.
pub fn worker_exe() -> std::path::PathBuf {
    static BUILT: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            // target/debug/deps/<this test> -> target/debug/examples/worker
            let mut path = std::env::current_exe().expect("the test's path");
            path.pop();
            path.pop();
            path.push("examples");
            path.push("worker");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut build = std::process::Command::new(cargo);
            build.args([
                "build",
                "-q",
                "-p",
                "eventsource-redis",
                "--example",
                "worker",
            ]);
            // A release test run (the long runs) uses a release worker.
            if path.components().any(|c| c.as_os_str() == "release") {
                build.arg("--release");
            }
            let built = build.status().expect("cargo runs");
            assert!(built.success(), "building the worker example failed");
            assert!(path.exists(), "no worker at {}", path.display());
            path
        })
        .clone()
}

pub use eventsource_testsupport::ledger::{Expect, Ledger, Outcome, Report};
pub use eventsource_testsupport::proxy::FaultProxy;

/// Subscribes a handler to every event type that records each handling in `ledger` as
/// consumer `consumer` of the bus's group.
pub fn ledger_handler(bus: &RedisEventBus, ledger: &std::sync::Arc<Ledger>) {
    let ledger = ledger.clone();
    let group = bus.config().consumer_group.clone();
    let consumer = bus.consumer_name().to_owned();
    bus.subscribe_to_all_events(move |e: EventEnvelope| {
        ledger.handled(&group, &consumer, e.event_id());
        async {}
    });
}

/// Publishes `events` in one batch and records each event's outcome in `ledger`: written,
/// definitely not written (a refusal, an invalid event), or indeterminate (a timeout or a
/// dropped connection after sending). Returns the bus's result.
pub async fn publish_recorded(
    bus: &RedisEventBus,
    ledger: &Ledger,
    events: &[EventEnvelope],
) -> Result<(), eventsource_redis::RedisBusError> {
    use eventsource_redis::RedisBusError;
    let result = bus.publish_events(events).await;
    let aggregate = |id: uuid::Uuid| {
        events
            .iter()
            .find(|e| e.event_id() == id)
            .map(|e| e.aggregate_id().to_string())
            .unwrap_or_default()
    };
    match &result {
        Ok(_) => {
            for e in events {
                ledger.published(e.event_id(), e.aggregate_id(), Outcome::Ok);
            }
        }
        Err(RedisBusError::PartialPublish { published, failed }) => {
            for (id, _) in published {
                ledger.published(id, aggregate(*id), Outcome::Ok);
            }
            for (id, e) in failed {
                let outcome = if e.is_timeout() || e.is_connection_dropped() || e.is_io_error() {
                    Outcome::Indeterminate
                } else {
                    Outcome::Failed
                };
                ledger.published(id, aggregate(*id), outcome);
            }
        }
        Err(e) => {
            let outcome = if e.is_transient() {
                Outcome::Indeterminate
            } else {
                Outcome::Failed
            };
            for ev in events {
                ledger.published(ev.event_id(), ev.aggregate_id(), outcome);
            }
        }
    }
    result.map(drop)
}

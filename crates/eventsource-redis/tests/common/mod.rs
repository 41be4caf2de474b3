//! Shared test helpers: a unique stream prefix per test, configs, raw Redis access, waiting.
#![allow(dead_code, unreachable_pub)]

use std::future::Future;
use std::time::{Duration, Instant};

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};
use redis::aio::MultiplexedConnection;

/// The Redis the tests use; override with EVENTSOURCE_TEST_REDIS_URL.
pub fn redis_url() -> String {
    std::env::var("EVENTSOURCE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A prefix no other test (or earlier run) uses.
pub fn unique_prefix(test: &str) -> String {
    format!(
        "es-test:{test}:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Deletes every key under `prefix` when dropped, so tests leave nothing behind.
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(client) = redis::Client::open(redis_url()) {
            if let Ok(mut conn) = client.get_connection() {
                let keys: Vec<String> = redis::cmd("KEYS")
                    .arg(format!("{}:*", self.0))
                    .query(&mut conn)
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut conn);
                }
            }
        }
    }
}

pub fn config(prefix: &str, group: &str, consumer: &str) -> RedisEventBusConfig {
    RedisEventBusConfig {
        redis_url: redis_url(),
        stream_prefix: prefix.to_owned(),
        consumer_group: group.to_owned(),
        consumer_name: Some(consumer.to_owned()),
        block_ms: 100,
        recovery_interval_ms: 0,
        ..RedisEventBusConfig::default()
    }
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
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must run on 127.0.0.1:6379 for these tests")
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

/// A redis-server of the test's own on a loopback port (or Unix socket), killed on drop.
pub struct OwnRedis {
    pub child: std::process::Child,
    pub port: u16,
    pub dir: std::path::PathBuf,
}

impl OwnRedis {
    /// Starts `redis-server` on `port` (0 = no TCP) with `--dir dir` and extra arguments,
    /// and waits until it accepts connections.
    pub fn start(port: u16, dir: &std::path::Path, extra: &[&str]) -> Self {
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let mut up = false;
        for _ in 0..1000 {
            up = if port == 0 {
                std::fs::read_dir(dir)
                    .map(|d| {
                        d.flatten()
                            .any(|e| e.path().extension().is_some_and(|x| x == "sock"))
                    })
                    .unwrap_or(false)
            } else {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            };
            if up {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            up,
            "redis-server on port {port} did not come up within 20 s"
        );
        Self {
            child,
            port,
            dir: dir.to_owned(),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free loopback port for a server of the test's own. Ports come from 10000–29999, below
/// Linux's ephemeral range (so no client socket takes one meanwhile), and a counter keeps two
/// tests of one process from picking the same port.
pub fn free_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let base = std::process::id() % 1000 * 20;
    loop {
        let offset = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let port = 10_000 + (base + offset) % 20_000;
        if std::net::TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
}

/// A fresh temporary directory for a test's own server.
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "es-{tag}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A TCP proxy in front of a Redis that delays every chunk a client sends by `delay`, so a
/// test can widen the window between two commands of one client (and slip another client's
/// command in between). Replies pass through undelayed. Stops when dropped.
pub struct DelayProxy {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl DelayProxy {
    pub async fn start(upstream: u16, delay: Duration) -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                else {
                    continue;
                };
                let (mut client_rx, mut client_tx) = client.into_split();
                let (mut server_rx, mut server_tx) = server.into_split();
                connections.spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = client_rx.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        tokio::time::sleep(delay).await;
                        if server_tx.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                connections.spawn(async move {
                    let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
                });
            }
        });
        Self { port, task }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Kills the connections whose client name starts with `name` (e.g. a consumer's reader).
pub async fn kill_client_named(url: &str, name: &str) -> usize {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut killed = 0;
    for line in list.lines() {
        if line.contains(&format!(" name={name} ")) {
            if let Some(id) = line.split(' ').find_map(|kv| kv.strip_prefix("id=")) {
                let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(id)
                    .query_async(&mut conn)
                    .await;
                killed += 1;
            }
        }
    }
    killed
}

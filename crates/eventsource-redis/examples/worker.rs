//! A consumer process for demos and fault tests: consumes `OrderCreated` / `OrderShipped`
//! from the bus configured by `EVENTSOURCE_REDIS_*` variables, records each handled event id
//! in the Redis set `{stream_prefix}:handled` (each handler start in the list
//! `{stream_prefix}:started`, and each handling as a `group consumer id micros` line in the
//! list `{stream_prefix}:ledger`, which the fault tests' ledger reads; in the Redis at
//! `WORKER_LEDGER_URL` when set, else the bus's), optionally sleeping per event (`WORKER_SLEEP_MS`), and shuts
//! down gracefully on SIGTERM/SIGINT. With `EVENTSOURCE_HTTP_LISTEN=127.0.0.1:9464` it also
//! serves `/metrics`, `/healthz` and `/readyz` there. With `EVENTSOURCE_REDIS_PARTITIONS` > 1
//! or `EVENTSOURCE_REDIS_CLUSTER=true` it runs `WORKER_CONSUMERS` (default 1)
//! `PartitionedEventBus` consumers named `<consumer name>-<k>` (ready when all are healthy).
//!
//! ```text
//! EVENTSOURCE_REDIS_STREAM_PREFIX=orders EVENTSOURCE_REDIS_CONSUMER_NAME=w1 \
//!   cargo run -p eventsource-redis --example worker
//! ```
//!
//! Logs go to standard error, filtered by `RUST_LOG` (default `info`).

use std::time::Duration;

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use eventsource_redis::{
    PartitionedEventBus, RedisEventBus, RedisEventBusConfig, RedisEventBusService,
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours for a terminal only: in a file or a test's output they are noise.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("worker: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let config = RedisEventBusConfig::from_env()?;
    let sleep = Duration::from_millis(
        std::env::var("WORKER_SLEEP_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
    );
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>()?;
    registry.register::<OrderShipped>()?;
    let handled_key = format!("{}:handled", config.stream_prefix);
    let started_key = format!("{}:started", config.stream_prefix);
    let ledger_key = format!("{}:ledger", config.stream_prefix);
    let group = config.consumer_group.clone();
    // The records may go to another Redis (`WORKER_LEDGER_URL`), so that a fault test that
    // kills the bus's Redis does not lose them with it.
    let ledger_url =
        std::env::var("WORKER_LEDGER_URL").unwrap_or_else(|_| config.redis_url.clone());
    let client = redis::Client::open(ledger_url.as_str())?;
    // Connected on first use, so the worker starts (and waits for its Redis, as the service
    // does) when Redis is not up yet; a handler that cannot record fails and is retried.
    let records = std::sync::Arc::new(tokio::sync::OnceCell::new());
    let record = Recorder {
        client,
        records,
        handled_key,
        started_key,
        ledger_key,
        group,
        sleep,
    };
    if config.partitions > 1 || config.cluster {
        return run_partitioned(config, registry, record).await;
    }
    let bus = RedisEventBus::new(config, registry)?;
    record.subscribe(&bus, bus.consumer_name());
    let surface = match std::env::var("EVENTSOURCE_HTTP_LISTEN") {
        Ok(addr) => {
            eventsource_redis::http::install_prometheus_recorder();
            let readiness = eventsource_redis::http::Readiness::new().consumer(bus.clone());
            let surface = eventsource_redis::http::HttpSurface::start(addr.as_str(), readiness)
                .await
                .map_err(|e| format!("EVENTSOURCE_HTTP_LISTEN={addr}: {e}"))?;
            println!("metrics and health on http://{}", surface.local_addr());
            Some(surface)
        }
        Err(_) => None,
    };
    println!(
        "worker {} consuming {}",
        bus.consumer_name(),
        bus.stream_name()
    );
    RedisEventBusService::new(bus.clone())
        .run_until_signal()
        .await?;
    if let Some(surface) = surface {
        surface.shutdown().await;
    }
    println!("worker stopped");
    println!("{}", serde_json::json!({ "stats": bus.stats() }));
    Ok(())
}

/// Records each handling (see the module docs).
#[derive(Clone)]
struct Recorder {
    client: redis::Client,
    records: std::sync::Arc<tokio::sync::OnceCell<redis::aio::MultiplexedConnection>>,
    handled_key: String,
    started_key: String,
    ledger_key: String,
    group: String,
    sleep: Duration,
}

impl Recorder {
    fn subscribe(&self, bus: &impl EventBus, me: &str) {
        let this = self.clone();
        let line_start = format!("{} {me}", self.group);
        bus.subscribe_to_all_events(move |event: EventEnvelope| {
            let this = this.clone();
            let line = format!("{line_start} {}", event.event_id());
            async move {
                let mut conn = this
                    .records
                    .get_or_try_init(|| async {
                        // The records must not fail on a loaded machine (redis-rs waits 500 ms
                        // for a reply by default).
                        let patient = redis::AsyncConnectionConfig::new()
                            .set_response_timeout(Some(Duration::from_secs(10)));
                        this.client
                            .get_multiplexed_async_connection_with_config(&patient)
                            .await
                    })
                    .await?
                    .clone();
                redis::cmd("RPUSH")
                    .arg(&this.started_key)
                    .arg(event.event_id().to_string())
                    .query_async::<i64>(&mut conn)
                    .await?;
                tokio::time::sleep(this.sleep).await;
                let micros = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_micros())
                    .unwrap_or(0);
                redis::pipe()
                    .cmd("SADD")
                    .arg(&this.handled_key)
                    .arg(event.event_id().to_string())
                    .ignore()
                    .cmd("RPUSH")
                    .arg(&this.ledger_key)
                    .arg(format!("{line} {micros}"))
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            }
        });
    }
}

/// `partitions > 1` or `cluster`: `WORKER_CONSUMERS` (default 1) partitioned consumers in
/// this process, named `<consumer name>-<k>` when there are several.
async fn run_partitioned(
    config: RedisEventBusConfig,
    registry: EventRegistry,
    record: Recorder,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let consumers: usize = std::env::var("WORKER_CONSUMERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let base = config.effective_consumer_name();
    let mut buses = Vec::new();
    for k in 0..consumers {
        let name = if consumers == 1 {
            base.clone()
        } else {
            format!("{base}-{k}")
        };
        let bus = PartitionedEventBus::new(config.clone().consumer_name(name), registry.clone())?;
        record.subscribe(&bus, bus.consumer_name());
        println!(
            "worker {} consuming {} partitions of {}",
            bus.consumer_name(),
            bus.partition_count(),
            config.stream_prefix
        );
        buses.push(bus);
    }
    let surface = match std::env::var("EVENTSOURCE_HTTP_LISTEN") {
        Ok(addr) => {
            eventsource_redis::http::install_prometheus_recorder();
            let readiness = buses.iter().fold(
                eventsource_redis::http::Readiness::new(),
                |readiness, bus| readiness.partitioned_consumer(bus.clone()),
            );
            let surface = eventsource_redis::http::HttpSurface::start(addr.as_str(), readiness)
                .await
                .map_err(|e| format!("EVENTSOURCE_HTTP_LISTEN={addr}: {e}"))?;
            println!("metrics and health on http://{}", surface.local_addr());
            Some(surface)
        }
        Err(_) => None,
    };
    let tasks: Vec<_> = buses
        .iter()
        .map(|bus| {
            let bus = bus.clone();
            tokio::spawn(async move { bus.start_consuming().await })
        })
        .collect();
    eventsource_redis::shutdown_signal().await;
    for bus in &buses {
        bus.stop_consuming();
    }
    for task in tasks {
        task.await??;
    }
    if let Some(surface) = surface {
        surface.shutdown().await;
    }
    println!("worker stopped");
    for bus in &buses {
        println!(
            "{}",
            serde_json::json!({ "consumer": bus.consumer_name(), "stats": bus.stats(), "ownership": bus.ownership_stats() })
        );
    }
    Ok(())
}

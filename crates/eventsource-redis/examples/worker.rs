//! A consumer process for demos and fault tests: consumes `OrderCreated` / `OrderShipped`
//! from the bus configured by `EVENTSOURCE_REDIS_*` variables, records each handled event id
//! in the Redis set `{stream_prefix}:handled` (each handler start in the list
//! `{stream_prefix}:started`, and each handling as a `group consumer id micros` line in the
//! list `{stream_prefix}:ledger`, which the fault tests' ledger reads; in the Redis at
//! `WORKER_LEDGER_URL` when set, else the bus's), optionally sleeping per event (`WORKER_SLEEP_MS`), and shuts
//! down gracefully on SIGTERM/SIGINT. With `EVENTSOURCE_HTTP_LISTEN=127.0.0.1:9464` it also
//! serves `/metrics`, `/healthz` and `/readyz` there.
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
use eventsource_redis::{RedisEventBus, RedisEventBusConfig, RedisEventBusService};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
    let bus = RedisEventBus::new(config, registry)?;
    let me = bus.consumer_name().to_owned();
    bus.subscribe_to_all_events(move |event: EventEnvelope| {
        let (client, records) = (client.clone(), records.clone());
        let key = handled_key.clone();
        let started = started_key.clone();
        let ledger = ledger_key.clone();
        let line = format!("{group} {me} {}", event.event_id());
        async move {
            let mut conn = records
                .get_or_try_init(|| client.get_multiplexed_async_connection())
                .await?
                .clone();
            redis::cmd("RPUSH")
                .arg(&started)
                .arg(event.event_id().to_string())
                .query_async::<i64>(&mut conn)
                .await?;
            tokio::time::sleep(sleep).await;
            let micros = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_micros())
                .unwrap_or(0);
            redis::pipe()
                .cmd("SADD")
                .arg(&key)
                .arg(event.event_id().to_string())
                .ignore()
                .cmd("RPUSH")
                .arg(&ledger)
                .arg(format!("{line} {micros}"))
                .ignore()
                .query_async::<()>(&mut conn)
                .await
        }
    });
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

//! `eventsource-outbox-relay`: relays a PostgreSQL store's outbox to a Redis stream until
//! SIGTERM/SIGINT.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/test EVENTSOURCE_PG_SCHEMA=orders \
//! EVENTSOURCE_REDIS_STREAM_PREFIX=orders eventsource-outbox-relay
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use eventsource_postgres::{OutboxRelay, PostgresEventStore, PostgresStoreConfig, RelayConfig};
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};

const HELP: &str = "eventsource-outbox-relay: publishes a PostgreSQL event store's outbox rows to a Redis stream, in order, until SIGTERM or SIGINT

usage: eventsource-outbox-relay [--help] [--version]

Configuration comes from the environment:
  DATABASE_URL                 the PostgreSQL database (required)
  EVENTSOURCE_PG_SCHEMA        the store's schema (default public)
  EVENTSOURCE_PG_TABLE         the store's table (default events)
  EVENTSOURCE_REDIS_*          the Redis bus (EVENTSOURCE_REDIS_URL, _STREAM_PREFIX, ...)
  RUST_LOG                     log filter (default info); logs go to standard error

Several relays may run at once: one publishes at a time, the others stand by.
Exit codes: 0 after a clean stop, 1 when it cannot start (the reason is printed).";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("eventsource-outbox-relay {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    if let Some(other) = args.first() {
        eprintln!("eventsource-outbox-relay: unknown argument {other:?} (see --help)");
        return ExitCode::from(2);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("eventsource-outbox-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "DATABASE_URL is not set: point it at the event store's database")?;
    let config = PostgresStoreConfig {
        schema: std::env::var("EVENTSOURCE_PG_SCHEMA").unwrap_or_else(|_| "public".into()),
        table: std::env::var("EVENTSOURCE_PG_TABLE").unwrap_or_else(|_| "events".into()),
        outbox: true,
        max_connections: 2,
        ..Default::default()
    };
    let store = PostgresEventStore::connect(&url, config).await?;
    let bus = RedisEventBus::new(
        RedisEventBusConfig {
            enable_tracing: false,
            ..RedisEventBusConfig::from_env()?
        },
        eventsource_core::EventRegistry::new(),
    )?;
    bus.connect().await?;
    let relay = OutboxRelay::new(store, Arc::new(bus), RelayConfig::default());
    println!("relay running");
    tracing::info!("outbox relay running");
    relay
        .run_until(eventsource_redis::service::shutdown_signal())
        .await;
    println!("relay stopped");
    Ok(())
}

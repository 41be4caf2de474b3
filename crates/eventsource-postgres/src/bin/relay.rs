//! `eventsource-outbox-relay`: relays a PostgreSQL store's outbox to a Redis stream until
//! SIGTERM/SIGINT.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/test EVENTSOURCE_PG_SCHEMA=orders \
//! EVENTSOURCE_REDIS_STREAM_PREFIX=orders eventsource-outbox-relay
//! ```

use std::sync::Arc;

use eventsource_postgres::{OutboxRelay, PostgresEventStore, PostgresStoreConfig, RelayConfig};
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let url = std::env::var("DATABASE_URL").map_err(|_| "set DATABASE_URL")?;
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
    relay
        .run_until(eventsource_redis::service::shutdown_signal())
        .await;
    println!("relay stopped");
    Ok(())
}

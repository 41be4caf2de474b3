//! Orders saved to PostgreSQL, published to Redis through the transactional outbox, and a
//! projection updated by a Redis consumer.
//!
//! Run: `cargo run -p eventsource-postgres --example orders_postgres_redis`
//! (PostgreSQL at `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; Redis at
//! `EVENTSOURCE_REDIS_URL`, default `redis://127.0.0.1:6379`.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderAggregate, OrderCreated, OrderShipped};
use eventsource_postgres::{OutboxRelay, PostgresEventStore, PostgresStoreConfig, RelayConfig};
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[derive(Default)]
struct Totals {
    orders: u64,
    revenue: f64,
    shipped: u64,
}

struct OrderTotals(Arc<Mutex<Totals>>);

impl Projection for OrderTotals {
    fn event_types(&self) -> Vec<String> {
        vec![
            OrderCreated::EVENT_TYPE.into(),
            OrderShipped::EVENT_TYPE.into(),
        ]
    }
    async fn handle(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        let mut t = self.0.lock().expect("not poisoned");
        if let Some(e) = event.data::<OrderCreated>()? {
            t.orders += 1;
            t.revenue += e.total_amount;
            println!(
                "  [projection] order {} created: ${:.2}",
                event.aggregate_id(),
                e.total_amount
            );
        } else if let Some(e) = event.data::<OrderShipped>()? {
            t.shipped += 1;
            println!(
                "  [projection] order {} shipped: {}",
                event.aggregate_id(),
                e.tracking_number
            );
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One sentence, the URL redacted, and what to do.
            eprintln!("orders_postgres_redis: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Error> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    // The bus's own configuration story: EVENTSOURCE_REDIS_* variables, else REDIS_URL.
    let redis_url = RedisEventBusConfig::from_env()?.redis_url;

    // The write side: PostgreSQL with an outbox, no direct publisher.
    let store = PostgresEventStore::connect(
        &database_url,
        PostgresStoreConfig {
            schema: "orders_example".into(),
            outbox: true,
            // Say at once when PostgreSQL is not there.
            acquire_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await
    .map_err(|e| format!("{e} (set DATABASE_URL to your PostgreSQL)"))?;
    let repo = AggregateRepository::<OrderAggregate>::new(Arc::new(store.clone()));

    // The relay: outbox -> Redis stream.
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>()?;
    registry.register::<OrderShipped>()?;
    let config = RedisEventBusConfig::default()
        .redis_url(redis_url)
        .stream_prefix("orders-example")
        .consumer_group("projections")
        .block_ms(200);
    // Start from a fresh stream each run (it stays afterwards for inspection).
    let unreachable = |e: redis::RedisError| {
        format!(
            "cannot connect to Redis at {}: {e}; start Redis or set EVENTSOURCE_REDIS_URL",
            eventsource_redis::redact_url(&config.redis_url)
        )
    };
    let mut conn = config
        .client()?
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(Some(config.socket_timeout)),
        )
        .await
        .map_err(unreachable)?;
    redis::cmd("DEL")
        .arg(config.stream_name())
        .arg(config.dlq_stream_name())
        .query_async::<()>(&mut conn)
        .await?;
    let publisher = RedisEventBus::new(config.clone(), registry.clone())?;
    publisher.connect().await?;
    let relay = OutboxRelay::new(store.clone(), Arc::new(publisher), RelayConfig::default());
    let stop_relay = Arc::new(tokio::sync::Notify::new());
    let relay_task = tokio::spawn({
        let stop = stop_relay.clone();
        async move { relay.run_until(async move { stop.notified().await }).await }
    });

    // The read side: a Redis consumer feeding a projection.
    let consumer = RedisEventBus::new(config, registry)?;
    let totals = Arc::new(Mutex::new(Totals::default()));
    consumer.subscribe_all(OrderTotals(totals.clone()));
    consumer.connect().await?;
    let consume_task = tokio::spawn({
        let c = consumer.clone();
        async move { c.start_consuming().await }
    });

    let order_id = Uuid::new_v4();
    println!(
        "Saving order {order_id} to PostgreSQL ({})",
        store.events_table()
    );
    let mut order = repo.create_new(order_id);
    order.create("cust-123", 99.99)?;
    repo.save(&mut order).await?;
    let mut order = repo.load(order_id).await?;
    order.ship("TRACK-12345")?;
    repo.save(&mut order).await?;
    println!(
        "Saved version {}; the outbox relay publishes to {}",
        order.version(),
        consumer.stream_name()
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while totals.lock().expect("not poisoned").shipped < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    consumer.stop_consuming();
    consume_task.await??;
    stop_relay.notify_waiters();
    relay_task.await?;

    {
        let t = totals.lock().expect("not poisoned");
        println!("Projection (fed through Redis):");
        println!("  Total orders: {}", t.orders);
        println!("  Total revenue: ${:.2}", t.revenue);
        println!("  Shipped count: {}", t.shipped);
    }
    let outbox = eventsource_postgres::outbox_stats(&store).await?;
    println!(
        "Outbox: {} published, {} pending",
        outbox.published, outbox.pending
    );
    Ok(())
}

//! The repository over the PostgreSQL store publishing through the Redis bus: directly, and
//! through the outbox relay.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderAggregate, OrderCreated, OrderShipped};
use eventsource_postgres::{OutboxRelay, RelayConfig};
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};
use uuid::Uuid;

fn bus(prefix: &str, name: &str) -> RedisEventBus {
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    registry.register::<OrderShipped>().unwrap();
    RedisEventBus::new(
        RedisEventBusConfig::default()
            .redis_url(common::redis_url())
            .stream_prefix(prefix)
            .consumer_group("projections")
            .consumer_name(name)
            .block_ms(100)
            .recovery_interval_ms(0),
        registry,
    )
    .unwrap()
}

async fn drop_stream(bus: &RedisEventBus) {
    let client = redis::Client::open(bus.config().redis_url.as_str()).unwrap();
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg(bus.stream_name())
        .arg(bus.dlq_stream_name())
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// Saves an order (create, ship) and returns what a Redis consumer saw: event types in order.
async fn saved_and_seen(outbox: bool) -> Vec<String> {
    let (store, _guard) = store(if outbox { "repo_outbox" } else { "repo_direct" }, outbox).await;
    let prefix = format!(
        "es-test:pgrepo:{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let consumer = bus(&prefix, "consumer");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    consumer.subscribe_to_all_events(move |e: EventEnvelope| {
        let s = s.clone();
        async move { s.lock().unwrap().push(e.event_type().to_owned()) }
    });
    consumer.connect().await.unwrap();
    let consume = tokio::spawn({
        let c = consumer.clone();
        async move { c.start_consuming().await }
    });
    let publisher = Arc::new(bus(&prefix, "publisher"));
    let mut repo = AggregateRepository::<OrderAggregate>::new(Arc::new(store.clone()));
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut relay_task = None;
    if outbox {
        let relay = OutboxRelay::new(
            store.clone(),
            publisher.clone(),
            RelayConfig {
                poll_interval: Duration::from_millis(50),
                ..Default::default()
            },
        );
        let stop = stop.clone();
        relay_task = Some(tokio::spawn(async move {
            relay.run_until(async move { stop.notified().await }).await
        }));
    } else {
        repo = repo.with_publisher(publisher.clone());
    }
    let id = Uuid::new_v4();
    let mut order = repo.create_new(id);
    order.create("cust-1", 10.0).unwrap();
    repo.save(&mut order).await.unwrap();
    let mut order = repo.load(id).await.unwrap();
    order.ship("T-1").unwrap();
    repo.save(&mut order).await.unwrap();
    for _ in 0..200 {
        if seen.lock().unwrap().len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    consumer.stop_consuming();
    consume.await.unwrap().unwrap();
    stop.notify_waiters();
    if let Some(t) = relay_task {
        t.await.unwrap();
    }
    drop_stream(&consumer).await;
    assert_eq!(store.stream_version(id, "Order").await.unwrap(), 2);
    seen.lock().unwrap().clone()
}

/// Direct: the repository publishes after the commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_publishes_directly_through_redis() {
    assert_eq!(
        saved_and_seen(false).await,
        ["OrderCreated", "OrderShipped"]
    );
}

/// Through the outbox: the append writes outbox rows, the relay publishes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repository_publishes_through_the_outbox_relay() {
    assert_eq!(saved_and_seen(true).await, ["OrderCreated", "OrderShipped"]);
}

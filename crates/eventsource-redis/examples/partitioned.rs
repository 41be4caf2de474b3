//! Per-aggregate order across consumers: two consumers of one group share 8 partitions of a
//! stream; 50 orders get 20 events each; every order's events are handled in the order they
//! were published, by whichever consumer holds the order's partition. A third consumer joins
//! half-way and takes its share.
//!
//! ```text
//! cargo run -p eventsource-redis --example partitioned
//! ```
//!
//! The Redis is `REDIS_URL` (default `redis://127.0.0.1:6379`); on a Redis Cluster set
//! `CLUSTER=1` and point `REDIS_URL` at any node. The example deletes its keys at the end.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderShipped;
use eventsource_redis::{PartitionedEventBus, RedisEventBusConfig, partition_of};

type Seen = Arc<Mutex<HashMap<uuid::Uuid, Vec<u64>>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let cluster = std::env::var("CLUSTER").is_ok_and(|v| v == "1" || v == "true");
    let prefix = format!(
        "partitioned-demo-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    let config = RedisEventBusConfig::default()
        .redis_url(url.clone())
        .cluster(cluster)
        .partitions(8)
        .partition_lease(Duration::from_secs(2))
        .stream_prefix(prefix.clone())
        .consumer_group("shipping")
        .block_ms(100)
        .enable_tracing(false);
    let registry = EventRegistry::new();
    registry.register::<OrderShipped>()?;

    // Each handler records the version of every event it sees, per order.
    let seen: Seen = Arc::default();
    let consumer = |name: &str| -> Result<PartitionedEventBus, Box<dyn std::error::Error>> {
        let bus = PartitionedEventBus::new(config.clone().consumer_name(name), registry.clone())?;
        let seen = seen.clone();
        bus.subscribe(move |event: Event<OrderShipped>| {
            let seen = seen.clone();
            async move {
                tokio::time::sleep(Duration::from_micros(200)).await;
                seen.lock()
                    .unwrap()
                    .entry(event.metadata.aggregate_id)
                    .or_default()
                    .push(event.metadata.aggregate_version);
            }
        });
        Ok(bus)
    };
    let publisher =
        PartitionedEventBus::new(config.clone().consumer_name("publisher"), registry.clone())?;
    publisher.connect().await?;
    let (a, b) = (consumer("consumer-a")?, consumer("consumer-b")?);
    let mut running = vec![spawn(&a), spawn(&b)];

    let orders: Vec<uuid::Uuid> = (0..50).map(|_| uuid::Uuid::new_v4()).collect();
    let mut c = None;
    for version in 1..=20u64 {
        let round: Vec<EventEnvelope> = orders
            .iter()
            .map(|id| {
                Event::new(
                    *id,
                    OrderShipped {
                        tracking_number: format!("T-{version}"),
                    },
                )
                .with_aggregate_version(version)
                .into_envelope()
            })
            .collect();
        publisher.publish_events(&round).await?;
        if version == 10 {
            let third = consumer("consumer-c")?;
            running.push(spawn(&third));
            c = Some(third);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let c = c.expect("the third consumer joined");
    while seen.lock().unwrap().values().map(Vec::len).sum::<usize>() < 1000 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for bus in [&a, &b, &c] {
        println!(
            "{} holds partitions {:?}; handled {} events",
            bus.consumer_name(),
            bus.owned_partitions(),
            bus.stats().events_consumed
        );
    }
    let in_order = seen
        .lock()
        .unwrap()
        .values()
        .filter(|versions| versions.windows(2).all(|w| w[0] < w[1]))
        .count();
    println!(
        "orders whose 20 events were handled in order: {in_order} of {}",
        orders.len()
    );
    println!(
        "order {} lives in partition {} (uuid mod 8)",
        orders[0],
        partition_of(orders[0], 8)
    );
    for bus in [&a, &b, &c] {
        bus.stop_consuming();
    }
    for task in running {
        task.await??;
    }
    // Leave nothing behind: every key of the demo's partitions, members and marker.
    cleanup(&url, cluster, &prefix)?;
    if in_order != orders.len() {
        return Err("some order's events were handled out of order".into());
    }
    Ok(())
}

fn spawn(
    bus: &PartitionedEventBus,
) -> tokio::task::JoinHandle<Result<(), eventsource_redis::RedisBusError>> {
    let bus = bus.clone();
    tokio::spawn(async move { bus.start_consuming().await })
}

/// Deletes the demo's keys on every node (on a cluster, each master holds some).
fn cleanup(url: &str, cluster: bool, prefix: &str) -> Result<(), Box<dyn std::error::Error>> {
    let mut nodes = vec![url.to_owned()];
    if cluster {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_connection()?;
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut conn)?;
        nodes = slots
            .iter()
            .filter_map(|range| match range {
                redis::Value::Array(parts) => match parts.get(2) {
                    Some(redis::Value::Array(master)) => match (master.first(), master.get(1)) {
                        (Some(redis::Value::BulkString(host)), Some(redis::Value::Int(port))) => {
                            Some(format!("redis://{}:{port}", String::from_utf8_lossy(host)))
                        }
                        _ => None,
                    },
                    _ => None,
                },
                _ => None,
            })
            .collect();
    }
    for node in nodes {
        let mut conn = redis::Client::open(node.as_str())?.get_connection()?;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{{{prefix}*"))
            .query(&mut conn)?;
        for key in keys {
            let _: () = redis::cmd("DEL").arg(key).query(&mut conn)?;
        }
    }
    Ok(())
}

//! A bounded load test (faults.md L-1, scaled to run in CI): 20,000 events, four consumers in
//! one group and one in another, all running at once while events are published.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::RedisEventBusConfig;
use uuid::Uuid;

/// Lost 0 in both groups; inside the load-balanced group each event handled once; every
/// worker got a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_plus_one_consumers_lose_nothing() {
    let prefix = unique_prefix("load");
    let _c = Cleanup(prefix.clone());
    let n = 20_000;
    let counts: Arc<Mutex<HashMap<(String, Uuid), u32>>> = Default::default();
    let mut buses = Vec::new();
    for (group, name) in [
        ("workers", "w1"),
        ("workers", "w2"),
        ("workers", "w3"),
        ("workers", "w4"),
        ("audit", "a1"),
    ] {
        let bus = bus(RedisEventBusConfig {
            batch_size: 50,
            ..config(&prefix, group, name)
        });
        let c = counts.clone();
        let key = format!("{group}/{name}");
        bus.subscribe(move |e: Event<OrderCreated>| {
            let (c, key) = (c.clone(), key.clone());
            async move {
                *c.lock()
                    .unwrap()
                    .entry((key, e.metadata.event_id))
                    .or_default() += 1;
            }
        });
        bus.connect().await.unwrap();
        buses.push(bus);
    }
    let tasks: Vec<_> = buses.iter().map(spawn_consumer).collect();
    let events: Vec<EventEnvelope> = (0..n).map(created).collect();
    for chunk in events.chunks(500) {
        buses[0].publish_events(chunk).await.unwrap();
    }
    let done = wait_until(Duration::from_secs(120), || async {
        let c = counts.lock().unwrap();
        c.len() >= 2 * n
    })
    .await;
    for (bus, task) in buses.iter().zip(tasks) {
        stop(bus, task).await;
    }
    assert!(
        done,
        "handled {} of {}",
        counts.lock().unwrap().len(),
        2 * n
    );
    let c = counts.lock().unwrap().clone();
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    let mut workers_seen: HashMap<Uuid, u32> = HashMap::new();
    let mut audit_seen: HashMap<Uuid, u32> = HashMap::new();
    for ((key, id), times) in c.iter() {
        if key.starts_with("workers/") {
            *per_worker.entry(key.clone()).or_default() += 1;
            *workers_seen.entry(*id).or_default() += times;
        } else {
            *audit_seen.entry(*id).or_default() += times;
        }
    }
    assert_eq!(workers_seen.len(), n, "workers group: lost 0");
    assert_eq!(audit_seen.len(), n, "audit group: lost 0");
    assert!(
        workers_seen.values().all(|&t| t == 1),
        "each event once in the load-balanced group"
    );
    assert_eq!(
        per_worker.len(),
        4,
        "every worker got a share: {per_worker:?}"
    );
    assert_eq!(pending(buses[0].stream_name(), "workers").await, 0);
    assert_eq!(pending(buses[0].stream_name(), "audit").await, 0);
}

//! Helpers of the scale-out tests: a cluster bus's configuration, rounds of events over
//! aggregates, publishing until written, worker processes on a cluster.

use std::process::Stdio;
use std::time::{Duration, Instant};

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderShipped;
use eventsource_redis::{PartitionedEventBus, RedisEventBusConfig};

use super::{Ledger, Outcome, redis_url, worker_exe};

pub const LEASE: Duration = Duration::from_secs(2);

pub fn cluster_config(url: &str, prefix: &str, consumer: &str) -> RedisEventBusConfig {
    RedisEventBusConfig::default()
        .redis_url(url)
        .cluster(true)
        .partitions(12)
        .partition_lease(LEASE)
        .stream_prefix(prefix)
        .consumer_group("g")
        .consumer_name(consumer)
        .block_ms(100)
        .batch_size(10)
}

/// One round of events: event `round` of every aggregate.
pub fn round(aggregates: &[uuid::Uuid], round: usize) -> Vec<EventEnvelope> {
    aggregates
        .iter()
        .map(|id| {
            Event::new(
                *id,
                OrderShipped {
                    tracking_number: format!("T-{round}"),
                },
            )
            .with_aggregate_version(round as u64 + 1)
            .into_envelope()
        })
        .collect()
}

/// Publishes `batch` until it is written (a failover refuses writes for a few seconds), and
/// records it in `ledger` once it is. Returns how many attempts failed.
pub async fn publish_until_written(
    bus: &PartitionedEventBus,
    ledger: &Ledger,
    batch: &[EventEnvelope],
) -> usize {
    let mut failures = 0;
    let started = Instant::now();
    loop {
        match bus.publish_events(batch).await {
            Ok(_) => break,
            Err(e) => {
                failures += 1;
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "publishing failed for a minute: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    for e in batch {
        ledger.published(e.event_id(), e.aggregate_id(), Outcome::Ok);
    }
    failures
}

/// A worker process running two partitioned consumers named `<name>-0`, `<name>-1`.
pub fn worker(node: &str, prefix: &str, name: &str) -> tokio::process::Child {
    super::worker_command()
        .env("EVENTSOURCE_REDIS_URL", node)
        .env("EVENTSOURCE_REDIS_CLUSTER", "true")
        .env("EVENTSOURCE_REDIS_PARTITIONS", "12")
        .env("EVENTSOURCE_REDIS_PARTITION_LEASE_MS", "2000")
        .env("EVENTSOURCE_REDIS_STREAM_PREFIX", prefix)
        .env("EVENTSOURCE_REDIS_CONSUMER_GROUP", "g")
        .env("EVENTSOURCE_REDIS_CONSUMER_NAME", name)
        .env("EVENTSOURCE_REDIS_BATCH_SIZE", "10")
        .env("EVENTSOURCE_REDIS_BLOCK_MS", "100")
        .env("WORKER_CONSUMERS", "2")
        .env("WORKER_SLEEP_MS", "2")
        // The records go to the test's standalone Redis, which no fault touches.
        .env("WORKER_LEDGER_URL", redis_url())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("worker binary starts")
}

pub fn signal(child: &tokio::process::Child, sig: &str) {
    let pid = child.id().expect("running").to_string();
    assert!(
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success()
    );
}

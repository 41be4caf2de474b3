//! The HTTP surface of a partitioned consumer: `/readyz` follows its health, `/metrics` shows
//! the partitions it holds and the changes of ownership.

mod common;

use std::time::Duration;

use common::http::{get, sample};
use common::*;
use eventsource_core::prelude::*;
use eventsource_redis::PartitionedEventBus;
use eventsource_redis::http::{HttpSurface, Readiness, install_prometheus_recorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_consumer_reports_readiness_and_ownership() {
    install_prometheus_recorder().expect("no other recorder in this test binary");
    let prefix = unique_prefix("http-part");
    let _cleanup = Cleanup(prefix.clone());
    let bus = PartitionedEventBus::new(
        config(&prefix, "workers", "w1")
            .partitions(3)
            .partition_lease(Duration::from_secs(1)),
        registry(),
    )
    .unwrap();
    bus.subscribe_to_all_events(|_e: EventEnvelope| async {});
    bus.connect().await.unwrap();
    let surface = HttpSurface::start(
        "127.0.0.1:0",
        Readiness::new()
            .partitioned_consumer(bus.clone())
            .timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let addr = surface.local_addr();
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "not consuming yet: {body}");
    assert!(body.contains("3 partitions"), "{body}");
    let task = tokio::spawn({
        let b = bus.clone();
        async move { b.start_consuming().await }
    });
    assert!(
        wait_until(Duration::from_secs(10), || async {
            get(addr, "/readyz").await.0 == 200
        })
        .await
    );
    let labels = [
        format!("prefix=\"{prefix}\""),
        "group=\"workers\"".to_owned(),
    ];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    let mut text = String::new();
    for _ in 0..100 {
        text = get(addr, "/metrics").await.1;
        if sample(&text, "eventsource_partitions_owned", &labels) == 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        sample(&text, "eventsource_partitions_owned", &labels),
        3.0,
        "{text}"
    );
    let taken: Vec<&str> = labels.iter().copied().chain(["change=\"taken\""]).collect();
    assert_eq!(
        sample(&text, "eventsource_partition_changes_total", &taken),
        3.0
    );
    // Stopping gives every partition back.
    assert!(bus.shutdown(Duration::from_secs(10)).await);
    task.await.unwrap().unwrap();
    let text = get(addr, "/metrics").await.1;
    assert_eq!(sample(&text, "eventsource_partitions_owned", &labels), 0.0);
    let released: Vec<&str> = labels
        .iter()
        .copied()
        .chain(["change=\"released\""])
        .collect();
    assert_eq!(
        sample(&text, "eventsource_partition_changes_total", &released),
        3.0
    );
    surface.shutdown().await;
}

//! Load tests, judged by the shared ledger: L-1 scaled to run in CI (20,000 events, four
//! consumers in one group and one in another, all running while events are published).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;

/// Lost 0 in both groups; inside the load-balanced group each event handled once; every
/// worker got a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_plus_one_consumers_lose_nothing() {
    let prefix = unique_prefix("load");
    let _c = Cleanup(prefix.clone());
    let n = 20_000;
    let ledger = Arc::new(Ledger::new());
    let mut buses = Vec::new();
    for (group, name) in [
        ("workers", "w1"),
        ("workers", "w2"),
        ("workers", "w3"),
        ("workers", "w4"),
        ("audit", "a1"),
    ] {
        let bus = bus(config(&prefix, group, name).batch_size(50));
        ledger_handler(&bus, &ledger);
        bus.connect().await.unwrap();
        buses.push(bus);
    }
    let tasks: Vec<_> = buses.iter().map(spawn_consumer).collect();
    let events: Vec<EventEnvelope> = (0..n).map(created).collect();
    let started = std::time::Instant::now();
    for chunk in events.chunks(500) {
        publish_recorded(&buses[0], &ledger, chunk).await.unwrap();
    }
    let done = wait_until(Duration::from_secs(120), || async {
        ledger.complete(&["workers", "audit"])
    })
    .await;
    let elapsed = started.elapsed();
    for (bus, task) in buses.iter().zip(tasks) {
        stop(bus, task).await;
    }
    assert!(done, "not complete");
    // The rate the L-3 soak runs at half of (release build): published and handled by both
    // groups, per second.
    eprintln!(
        "L-1 rate: {n} events through both groups in {elapsed:?} = {:.0} events/s",
        n as f64 / elapsed.as_secs_f64()
    );
    ledger
        .check(&Expect::new(
            "L-1 (20,000 events, 4 + 1 consumers)",
            &["workers", "audit"],
        ))
        .assert_ok();
    let per_worker = ledger.handlings_per_consumer("workers");
    assert_eq!(
        per_worker.len(),
        4,
        "every worker got a share: {per_worker:?}"
    );
    assert_eq!(pending(buses[0].stream_name(), "workers").await, 0);
    assert_eq!(pending(buses[0].stream_name(), "audit").await, 0);
}

//! The handler_concurrency option: several entries in flight per consumer, per-aggregate order
//! kept, at-least-once kept under handler failures.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use eventsource_core::bus::HandlerError;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use uuid::Uuid;

/// Ten aggregates, twenty events each, interleaved; with handler_concurrency 8 and handlers
/// of varying duration, entries run concurrently, yet each aggregate's events are handled in
/// version order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_handling_keeps_per_aggregate_order() {
    let prefix = unique_prefix("conc-order");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c")
        .handler_concurrency(8)
        .batch_size(50));
    let seen: Arc<Mutex<HashMap<Uuid, Vec<u64>>>> = Default::default();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let max_in_flight = Arc::new(AtomicUsize::new(0));
    let (s, f, m) = (seen.clone(), in_flight.clone(), max_in_flight.clone());
    bus.subscribe(move |e: Event<OrderCreated>| {
        let (s, f, m) = (s.clone(), f.clone(), m.clone());
        async move {
            let now = f.fetch_add(1, Ordering::SeqCst) + 1;
            m.fetch_max(now, Ordering::SeqCst);
            let pause = (e.metadata.aggregate_version * 7 + e.total_amount as u64) % 3;
            tokio::time::sleep(Duration::from_millis(pause)).await;
            s.lock()
                .unwrap()
                .entry(e.metadata.aggregate_id)
                .or_default()
                .push(e.metadata.aggregate_version);
            f.fetch_sub(1, Ordering::SeqCst);
        }
    });
    bus.connect().await.unwrap();
    let aggregates: Vec<Uuid> = (0..10).map(|_| Uuid::new_v4()).collect();
    let mut events = Vec::new();
    for version in 1..=20u64 {
        for (i, id) in aggregates.iter().enumerate() {
            events.push(
                Event::new(
                    *id,
                    OrderCreated {
                        customer_id: format!("c{i}"),
                        total_amount: i as f64,
                    },
                )
                .with_aggregate_version(version)
                .into_envelope(),
            );
        }
    }
    bus.publish_events(&events).await.unwrap();
    let task = spawn_consumer(&bus);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            seen.lock().unwrap().values().map(Vec::len).sum::<usize>() == 200
        })
        .await
    );
    stop(&bus, task).await;
    let expected: Vec<u64> = (1..=20).collect();
    for (id, versions) in seen.lock().unwrap().iter() {
        assert_eq!(versions, &expected, "aggregate {id} out of order");
    }
    let peak = max_in_flight.load(Ordering::SeqCst);
    assert!(peak > 1 && peak <= 8, "in flight at once: {peak}");
    assert_eq!(pending(bus.stream_name(), "g").await, 0);
}

/// With concurrency, a handler failing the first attempt of some events still ends with every
/// event handled at least once (through recovery) and nothing pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_handling_is_at_least_once_under_failures() {
    let prefix = unique_prefix("conc-fail");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c")
        .handler_concurrency(16)
        .pending_idle_ms(100)
        .recovery_interval_ms(50));
    let attempts: Arc<Mutex<HashMap<Uuid, usize>>> = Default::default();
    let done: Arc<Mutex<HashSet<Uuid>>> = Default::default();
    let (a, d) = (attempts.clone(), done.clone());
    bus.subscribe(move |e: Event<OrderCreated>| {
        let (a, d) = (a.clone(), d.clone());
        async move {
            let n = {
                let mut a = a.lock().unwrap();
                let n = a.entry(e.metadata.event_id).or_default();
                *n += 1;
                *n
            };
            tokio::time::sleep(Duration::from_millis(1)).await;
            if e.customer_id.ends_with('7') && n == 1 {
                return Err::<(), HandlerError>("transient failure".into());
            }
            d.lock().unwrap().insert(e.metadata.event_id);
            Ok(())
        }
    });
    bus.connect().await.unwrap();
    let events: Vec<EventEnvelope> = (0..100).map(created).collect();
    bus.publish_events(&events).await.unwrap();
    let task = spawn_consumer(&bus);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            done.lock().unwrap().len() == 100
        })
        .await,
        "handled {}",
        done.lock().unwrap().len()
    );
    assert!(
        wait_until(Duration::from_secs(10), || async {
            pending(bus.stream_name(), "g").await == 0
        })
        .await
    );
    stop(&bus, task).await;
    let stats = bus.stats();
    assert_eq!(
        stats.events_processed_failed, 10,
        "cust-7, cust-17, ... failed once each"
    );
    assert_eq!(stats.messages_recovered, 10);
    assert_eq!(stats.messages_sent_to_dlq, 0);
}

//! The golden entry, the repository publishing through Redis, replaying history into a new
//! projection, and graceful shutdown of a worker process on SIGTERM.

mod common;

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{TimeZone, Utc};
use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderAggregate, OrderCreated, OrderShipped};
use eventsource_redis::codec::encode_fields;
use uuid::Uuid;

/// The entry this bus writes for an event is byte-identical to the one eventsource-py 0.15.1
/// wrote for the same event (captured with redis-cli XRANGE from `py_publish.py`).
#[test]
fn golden_entry_matches_eventsource_py() {
    let mut metadata = EventMetadata::new(
        "OrderCreated",
        Uuid::parse_str("1992c17e-8d4c-4416-a6a6-045f494b9afe").unwrap(),
        "Order",
    );
    metadata.event_id = Uuid::parse_str("89c8673a-a3c4-42d9-b5a9-edc419ef397d").unwrap();
    metadata.occurred_at = Utc.with_ymd_and_hms(2026, 11, 28, 17, 47, 52).unwrap()
        + chrono::Duration::microseconds(978_527);
    metadata.tenant_id = Some(Uuid::parse_str("11111111-2222-3333-4444-555555555555").unwrap());
    metadata.correlation_id = Uuid::parse_str("03e477d1-27aa-4bf0-9402-a05acb78a599").unwrap();
    let event = Event::from_parts(
        metadata,
        OrderCreated {
            customer_id: "cust-0".into(),
            total_amount: 0.0,
        },
    )
    .into_envelope();
    let fields = encode_fields(&event, None).unwrap();
    let expected: Vec<(&str, &str)> = vec![
        ("event_id", "89c8673a-a3c4-42d9-b5a9-edc419ef397d"),
        ("event_type", "OrderCreated"),
        ("aggregate_id", "1992c17e-8d4c-4416-a6a6-045f494b9afe"),
        ("aggregate_type", "Order"),
        ("tenant_id", "11111111-2222-3333-4444-555555555555"),
        ("occurred_at", "2026-11-28T17:47:52.978527+00:00"),
        (
            "payload",
            r#"{"event_id":"89c8673a-a3c4-42d9-b5a9-edc419ef397d","event_type":"OrderCreated","event_version":1,"occurred_at":"2026-11-28T17:47:52.978527Z","aggregate_id":"1992c17e-8d4c-4416-a6a6-045f494b9afe","aggregate_type":"Order","aggregate_version":1,"tenant_id":"11111111-2222-3333-4444-555555555555","actor_id":null,"correlation_id":"03e477d1-27aa-4bf0-9402-a05acb78a599","causation_id":null,"metadata":{},"customer_id":"cust-0","total_amount":0.0}"#,
        ),
    ];
    let got: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_eq!(got, expected);
}

struct Totals(Arc<Mutex<(u64, f64, u64)>>);

impl Projection for Totals {
    fn event_types(&self) -> Vec<String> {
        vec!["OrderCreated".into(), "OrderShipped".into()]
    }
    async fn handle(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        let mut t = self.0.lock().unwrap();
        if let Some(e) = event.data::<OrderCreated>()? {
            t.0 += 1;
            t.1 += e.total_amount;
        } else if event.data::<OrderShipped>()?.is_some() {
            t.2 += 1;
        }
        Ok(())
    }
}

/// A repository whose publisher is the Redis bus: saving an aggregate stores its events and
/// publishes them; a projection on another bus instance sees them through Redis.
#[tokio::test]
async fn repository_publishes_saved_events_through_redis() {
    let prefix = unique_prefix("repo");
    let _c = Cleanup(prefix.clone());
    let publisher = Arc::new(bus(config(&prefix, "writers", "w")));
    let consumer = bus(config(&prefix, "projections", "p"));
    let totals = Arc::new(Mutex::new((0, 0.0, 0)));
    consumer.subscribe_all(Totals(totals.clone()));
    consumer.connect().await.unwrap();
    let task = spawn_consumer(&consumer);

    let store = Arc::new(InMemoryEventStore::new());
    let repo =
        AggregateRepository::<OrderAggregate>::new(store.clone()).with_publisher(publisher.clone());
    let id = Uuid::new_v4();
    let mut order = repo.create_new(id);
    order.create("cust-123", 99.99).unwrap();
    repo.save(&mut order).await.unwrap();
    let mut order = repo.load(id).await.unwrap();
    order.ship("TRACK-1").unwrap();
    repo.save(&mut order).await.unwrap();

    assert!(
        wait_until(Duration::from_secs(10), || async {
            totals.lock().unwrap().2 == 1
        })
        .await
    );
    stop(&consumer, task).await;
    assert_eq!(*totals.lock().unwrap(), (1, 99.99, 1));
    assert_eq!(store.len(), 2);
    assert_eq!(publisher.stats().events_published, 2);
    let entries = publisher.read_stream_range("-", "+", 10).await.unwrap();
    let versions: Vec<String> = entries
        .iter()
        .map(|e| {
            EventEnvelope::from_json(e.get("payload").unwrap())
                .unwrap()
                .aggregate_version()
                .to_string()
        })
        .collect();
    assert_eq!(versions, ["1", "2"]);
}

/// Replaying the stream from the beginning, in pages, feeds a new projection every event in
/// order; an undecodable entry is skipped and counted; no consumer group is touched.
#[tokio::test]
async fn history_replays_into_a_new_projection() {
    let prefix = unique_prefix("history");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c"));
    let events: Vec<EventEnvelope> = (0..250).map(created).collect();
    bus.publish_events(&events[..120]).await.unwrap();
    let mut conn = raw().await;
    let _: String = redis::cmd("XADD")
        .arg(bus.stream_name())
        .arg("*")
        .arg("event_type")
        .arg("OrderCreated")
        .arg("payload")
        .arg("garbage")
        .query_async(&mut conn)
        .await
        .unwrap();
    bus.publish_events(&events[120..]).await.unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let summary = bus
        .replay_history(100, move |event| {
            let s = s.clone();
            async move {
                let e = event
                    .to_event::<OrderCreated>()?
                    .expect("only OrderCreated here");
                s.lock().unwrap().push(e.customer_id.clone());
                Ok::<(), eventsource_core::EventError>(())
            }
        })
        .await
        .unwrap();
    assert_eq!(summary.applied, 250);
    assert_eq!(summary.skipped_malformed, 1);
    let expected: Vec<String> = (0..250).map(|i| format!("cust-{i}")).collect();
    assert_eq!(*seen.lock().unwrap(), expected);
    let info = bus.get_stream_info().await;
    assert!(
        info.consumer_groups.is_empty(),
        "replay does not create or use groups"
    );
}

/// A worker process sent SIGTERM mid-batch finishes and acknowledges its in-flight batch and
/// exits cleanly: nothing is left pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_batch_and_exits_cleanly() {
    let prefix = unique_prefix("sigterm");
    let _c = Cleanup(prefix.clone());
    let publisher = bus(config(&prefix, "workers", "p"));
    publisher.connect().await.unwrap();
    publisher
        .publish_events(&(0..100).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let worker = worker_command()
        .env("EVENTSOURCE_REDIS_URL", redis_url())
        .env("EVENTSOURCE_REDIS_STREAM_PREFIX", &prefix)
        .env("EVENTSOURCE_REDIS_CONSUMER_GROUP", "workers")
        .env("EVENTSOURCE_REDIS_CONSUMER_NAME", "graceful")
        .env("EVENTSOURCE_REDIS_BATCH_SIZE", "20")
        .env("EVENTSOURCE_REDIS_BLOCK_MS", "100")
        .env("WORKER_SLEEP_MS", "10")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let key = format!("{prefix}:handled");
    let h = handled.clone();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let key = key.clone();
            let h = h.clone();
            async move {
                let mut conn = raw().await;
                let n: usize = redis::cmd("SCARD")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                h.store(n, Ordering::SeqCst);
                n >= 5
            }
        })
        .await
    );
    let pid = worker.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = tokio::time::timeout(Duration::from_secs(20), worker.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success(), "exit: {:?}", out.status);
    assert!(String::from_utf8_lossy(&out.stdout).contains("worker stopped"));
    assert_eq!(
        pending(publisher.stream_name(), "workers").await,
        0,
        "in-flight batch acked before exit"
    );
    let mut conn = raw().await;
    let n: usize = redis::cmd("SCARD")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(n < 100, "stopped early ({n} handled)");
    assert_eq!(n % 20, 0, "whole batches only: {n}");
}

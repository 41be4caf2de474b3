//! Connecting, publishing, the subscription API, and consuming against the real Redis.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use eventsource_core::bus::{HandlerError, named};
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use eventsource_redis::{RedisBusError, RedisEventBus};

const WAIT: Duration = Duration::from_secs(10);

/// connect creates the group with MKSTREAM; connecting again (group exists) is fine.
#[tokio::test]
async fn connect_creates_group_and_stream() {
    let prefix = unique_prefix("connect");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g1", "c1"));
    assert!(!bus.is_connected());
    bus.connect().await.unwrap();
    assert!(bus.is_connected());
    bus.connect().await.expect("existing group is fine");
    let mut conn = raw().await;
    let groups: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(bus.stream_name())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(format!("{groups:?}").contains("g1"));
    bus.disconnect().await;
    assert!(!bus.is_connected());
}

/// An unreachable Redis gives a Connect error naming the URL, quickly, not a hang.
#[tokio::test]
async fn unreachable_redis_is_a_clear_error() {
    let config = config("unused", "g", "c")
        .redis_url("redis://127.0.0.1:1")
        .socket_connect_timeout(std::time::Duration::from_secs(1));
    let bus = bus(config);
    let started = std::time::Instant::now();
    let err = bus.connect().await.unwrap_err();
    assert!(matches!(err, RedisBusError::Connect { .. }), "{err:?}");
    assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    assert!(err.is_transient());
    assert_eq!(err.kind(), eventsource_redis::ErrorKind::Unavailable);
    // Through the object-safe publisher a repository holds: the kind survives, no downcast.
    let via_trait = eventsource_core::EventPublisher::publish(&bus, &[created(1)])
        .await
        .unwrap_err();
    assert_eq!(via_trait.kind(), eventsource_redis::ErrorKind::Unavailable);
    assert!(via_trait.is_transient(), "{via_trait}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let info = bus.get_stream_info().await;
    assert!(!info.connected);
    assert!(info.error.is_some());
    assert_eq!(
        bus.health_check().await.status,
        eventsource_redis::HealthStatus::Unhealthy
    );
}

/// A batch is published in one pipelined call; entries have the wire fields in order; ids
/// come back in order; stats count the events.
#[tokio::test]
async fn publish_batch_writes_wire_entries() {
    let prefix = unique_prefix("publish");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c").enable_tracing(false));
    let events = vec![created(1), created(2), shipped(3)];
    let ids = bus.publish_events(&events).await.unwrap();
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let entries = bus.read_stream_range("-", "+", 10).await.unwrap();
    assert_eq!(
        entries.iter().map(|e| e.id.clone()).collect::<Vec<_>>(),
        ids
    );
    let keys: Vec<&str> = entries[0]
        .fields
        .iter()
        .map(|(k, _)| std::str::from_utf8(k).unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "event_id",
            "event_type",
            "aggregate_id",
            "aggregate_type",
            "tenant_id",
            "occurred_at",
            "payload"
        ]
    );
    assert_eq!(
        entries[0].get("event_id").unwrap(),
        events[0].event_id().to_string()
    );
    assert_eq!(entries[2].get("event_type").unwrap(), "OrderShipped");
    assert_eq!(entries[0].get("tenant_id").unwrap(), "");
    assert!(entries[0].get("occurred_at").unwrap().ends_with("+00:00"));
    assert_eq!(
        entries[0].get("payload").unwrap(),
        events[0].to_json().unwrap()
    );
    assert_eq!(bus.stats().events_published, 3);
    assert!(bus.publish_events(&[]).await.unwrap().is_empty());
    // An invalid event refuses the whole batch before anything is sent.
    let mut bad = created(9);
    bad.metadata_mut().aggregate_type = "bad type".into();
    let err = bus.publish_events(&[created(8), bad]).await.unwrap_err();
    assert!(matches!(err, RedisBusError::InvalidEvent { .. }), "{err}");
    assert_eq!(bus.read_stream_range("-", "+", 10).await.unwrap().len(), 3);
}

/// The Redis bus has the in-memory bus's subscription interface and counts.
#[tokio::test]
async fn subscription_api_matches_in_memory_bus() {
    let bus = bus(config("unused-sub", "g", "c"));
    let a = bus.subscribe(|_: Event<OrderCreated>| async {});
    bus.subscribe(|_: Event<OrderShipped>| async {});
    let w = bus.subscribe_to_all_events(|_: EventEnvelope| async {});
    assert_eq!(bus.subscriber_count(), 2);
    assert_eq!(bus.subscriber_count_of::<OrderCreated>(), 1);
    assert_eq!(bus.wildcard_subscriber_count(), 1);
    assert!(bus.unsubscribe(a));
    assert!(!bus.unsubscribe(a));
    assert!(bus.unsubscribe_from_all_events(w));
    assert_eq!(bus.subscriber_count(), 1);
    assert_eq!(bus.wildcard_subscriber_count(), 0);
}

/// Published events reach typed and wildcard handlers in order; each entry is acked only
/// after its handlers ran; stopping returns; a second start while consuming is refused.
#[tokio::test]
async fn consume_dispatches_and_acks() {
    let prefix = unique_prefix("consume");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c"));
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let l = log.clone();
    bus.subscribe(move |e: Event<OrderCreated>| {
        let l = l.clone();
        async move { l.lock().unwrap().push(format!("created {}", e.customer_id)) }
    });
    let l = log.clone();
    bus.subscribe_to_all_events(move |e: EventEnvelope| {
        let l = l.clone();
        async move { l.lock().unwrap().push(format!("all {}", e.event_type())) }
    });
    bus.connect().await.unwrap();
    bus.publish_events(&[created(1), shipped(2)]).await.unwrap();
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { log.lock().unwrap().len() == 3 }).await);
    assert!(bus.is_consuming());
    assert!(matches!(
        bus.start_consuming().await,
        Err(RedisBusError::AlreadyConsuming)
    ));
    assert_eq!(
        *log.lock().unwrap(),
        ["created cust-1", "all OrderCreated", "all OrderShipped"]
    );
    assert!(
        wait_until(WAIT, || async {
            pending(bus.stream_name(), "g").await == 0
        })
        .await
    );
    stop(&bus, task).await;
    assert!(!bus.is_consuming());
    let stats = bus.stats();
    assert_eq!(stats.events_consumed, 2);
    assert_eq!(stats.events_processed_success, 2);
    assert_eq!(stats.events_processed_failed, 0);
}

/// A failing handler and a panicking handler leave the entry pending (not acked) and are
/// counted; the consumer keeps going and handles the next entry.
#[tokio::test]
async fn failing_or_panicking_handler_leaves_entry_pending() {
    let prefix = unique_prefix("fail");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c"));
    let ok = Arc::new(AtomicUsize::new(0));
    bus.subscribe(named(
        "fails-on-cust-1",
        |e: Event<OrderCreated>| async move {
            if e.customer_id == "cust-1" {
                return Err::<(), HandlerError>("cannot handle cust-1".into());
            }
            Ok(())
        },
    ));
    bus.subscribe(named(
        "panics-on-shipped",
        |e: Event<OrderShipped>| async move {
            if e.tracking_number.starts_with("TRACK") {
                panic!("shipping handler exploded");
            }
        },
    ));
    let o = ok.clone();
    bus.subscribe(move |_: Event<OrderCreated>| {
        let o = o.clone();
        async move {
            o.fetch_add(1, Ordering::SeqCst);
        }
    });
    bus.connect().await.unwrap();
    let ids = bus
        .publish_events(&[created(1), shipped(2), created(3)])
        .await
        .unwrap();
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { bus.stats().events_dispatched == 3 }).await);
    assert!(
        wait_until(WAIT, || async {
            pending(bus.stream_name(), "g").await == 2
        })
        .await
    );
    stop(&bus, task).await;
    let left: Vec<String> = pending_entries(bus.stream_name(), "g")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(left, vec![ids[0].clone(), ids[1].clone()]);
    assert_eq!(
        ok.load(Ordering::SeqCst),
        2,
        "the other handler still ran for both OrderCreated"
    );
    let stats = bus.stats();
    assert_eq!(stats.events_processed_failed, 2);
    assert_eq!(stats.events_processed_success, 1);
    assert_eq!(stats.handler_errors, 2);
    assert_eq!(
        stats.events_consumed, 1,
        "only the handled and acknowledged one"
    );
    // The failure reason is kept for the dead letter.
    let mut conn = raw().await;
    let reason: String = redis::cmd("GET")
        .arg(bus.config().error_key(&ids[0]))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        reason.contains("fails-on-cust-1") && reason.contains("cannot handle cust-1"),
        "{reason}"
    );
    let reason: String = redis::cmd("GET")
        .arg(bus.config().error_key(&ids[1]))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        reason.contains("panicked") && reason.contains("shipping handler exploded"),
        "{reason}"
    );
}

/// No subscriber for a type: acked and counted as skipped. Unregistered type with no
/// handler: acked and counted. Unregistered type with a wildcard handler: delivered as JSON.
/// A malformed entry is dead-lettered with the reason. Nothing stays pending, nothing crashes.
#[tokio::test]
async fn skips_and_malformed_entries_are_counted_never_lost() {
    let prefix = unique_prefix("skip");
    let _c = Cleanup(prefix.clone());
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    registry.register::<OrderShipped>().unwrap();
    let plain = RedisEventBus::new(config(&prefix, "plain", "c"), registry.clone()).unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    plain.subscribe(move |_: Event<OrderCreated>| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
        }
    });
    plain.connect().await.unwrap();
    let wild = RedisEventBus::new(config(&prefix, "wild", "c"), registry).unwrap();
    let foreign = Arc::new(Mutex::new(Vec::new()));
    let f = foreign.clone();
    wild.subscribe_to_all_events(move |e: EventEnvelope| {
        let f = f.clone();
        async move { f.lock().unwrap().push(e.event_type().to_owned()) }
    });
    wild.connect().await.unwrap();

    plain
        .publish_events(&[created(1), shipped(2)])
        .await
        .unwrap();
    let mut unknown: serde_json::Value =
        serde_json::from_str(&created(3).to_json().unwrap()).unwrap();
    unknown["event_type"] = "OrderCancelled".into();
    let mut conn = raw().await;
    let stream = plain.stream_name().to_owned();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("event_type")
        .arg("OrderCancelled")
        .arg("payload")
        .arg(unknown.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();
    let bad_id: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("event_type")
        .arg("OrderCreated")
        .arg("payload")
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();

    let t1 = spawn_consumer(&plain);
    let t2 = spawn_consumer(&wild);
    assert!(
        wait_until(WAIT, || async {
            pending(&stream, "plain").await == 0
                && pending(&stream, "wild").await == 0
                && plain.stats().malformed_messages == 1
                && wild.stats().malformed_messages == 1
        })
        .await
    );
    stop(&plain, t1).await;
    stop(&wild, t2).await;
    assert_eq!(seen.load(Ordering::SeqCst), 1);
    let p = plain.stats();
    assert_eq!(
        p.events_skipped_no_subscriber, 1,
        "OrderShipped has no subscriber in `plain`"
    );
    assert_eq!(p.events_skipped_unregistered, 1, "OrderCancelled");
    assert_eq!(p.messages_sent_to_dlq, 1);
    assert_eq!(
        *foreign.lock().unwrap(),
        ["OrderCreated", "OrderShipped", "OrderCancelled"]
    );
    let dlq = plain.get_dlq_messages(10).await.unwrap();
    assert_eq!(dlq.len(), 2, "one dead letter per group");
    for letter in &dlq {
        assert_eq!(letter.original_message_id(), Some(bad_id.as_str()));
        assert!(
            letter.error().unwrap().starts_with("malformed"),
            "{letter:?}"
        );
        assert_eq!(letter.get("payload"), Some("{not json"));
    }
    let groups: Vec<&str> = dlq.iter().filter_map(|l| l.consumer_group()).collect();
    assert!(groups.contains(&"plain") && groups.contains(&"wild"));
}

/// Two consumers of one group share 1000 events (1 ms handler): each handles at least a
/// quarter, together exactly all of them once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_two_consumers_share_the_work() {
    let prefix = unique_prefix("share");
    let _c = Cleanup(prefix.clone());
    let seen = Arc::new(Mutex::new(std::collections::HashSet::new()));
    let mut buses = Vec::new();
    let mut counts = Vec::new();
    for name in ["w1", "w2"] {
        let bus = bus(config(&prefix, "workers", name).batch_size(10));
        let n = Arc::new(AtomicUsize::new(0));
        let (n2, s) = (n.clone(), seen.clone());
        bus.subscribe(move |e: Event<OrderCreated>| {
            let (n, s) = (n2.clone(), s.clone());
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                assert!(
                    s.lock().unwrap().insert(e.metadata.event_id),
                    "delivered twice"
                );
                n.fetch_add(1, Ordering::SeqCst);
            }
        });
        bus.connect().await.unwrap();
        counts.push(n);
        buses.push(bus);
    }
    let tasks: Vec<_> = buses.iter().map(spawn_consumer).collect();
    let events: Vec<EventEnvelope> = (0..1000).map(created).collect();
    for chunk in events.chunks(50) {
        buses[0].publish_events(chunk).await.unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(60), || async {
            seen.lock().unwrap().len() == 1000
        })
        .await
    );
    for (bus, task) in buses.iter().zip(tasks) {
        stop(bus, task).await;
    }
    let (a, b) = (
        counts[0].load(Ordering::SeqCst),
        counts[1].load(Ordering::SeqCst),
    );
    assert_eq!(a + b, 1000);
    assert!(a >= 250 && b >= 250, "split {a}/{b}");
}

/// Two groups each receive every event.
#[tokio::test]
async fn two_groups_each_receive_every_event() {
    let prefix = unique_prefix("fanout");
    let _c = Cleanup(prefix.clone());
    let mut pairs = Vec::new();
    for group in ["projections", "notifications"] {
        let bus = bus(config(&prefix, group, "c"));
        let n = counting(&bus);
        bus.connect().await.unwrap();
        pairs.push((bus, n));
    }
    let events: Vec<EventEnvelope> = (0..100).map(created).collect();
    pairs[0].0.publish_events(&events).await.unwrap();
    let tasks: Vec<_> = pairs.iter().map(|(b, _)| spawn_consumer(b)).collect();
    assert!(
        wait_until(WAIT, || async {
            pairs.iter().all(|(_, n)| n.load(Ordering::SeqCst) == 100)
        })
        .await
    );
    for ((bus, _), task) in pairs.iter().zip(tasks) {
        stop(bus, task).await;
    }
}

/// Stopping mid-batch finishes the in-flight handlers (never cancelled) and acks them.
#[tokio::test]
async fn stop_finishes_and_acks_the_in_flight_batch() {
    let prefix = unique_prefix("stop");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c"));
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let (s, f) = (started.clone(), finished.clone());
    bus.subscribe(move |_: Event<OrderCreated>| {
        let (s, f) = (s.clone(), f.clone());
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            f.fetch_add(1, Ordering::SeqCst);
        }
    });
    bus.connect().await.unwrap();
    bus.publish_events(&(0..5).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { started.load(Ordering::SeqCst) >= 1 }).await);
    stop(&bus, task).await;
    assert_eq!(finished.load(Ordering::SeqCst), 5, "the whole batch ran");
    assert_eq!(pending(bus.stream_name(), "g").await, 0, "and was acked");
}

/// A consumer restarted with the same name first re-reads its own pending entries.
#[tokio::test]
async fn restart_drains_own_pending_entries_first() {
    let prefix = unique_prefix("own-pending");
    let _c = Cleanup(prefix.clone());
    let first = bus(config(&prefix, "g", "worker-1"));
    first.connect().await.unwrap();
    first
        .publish_events(&[created(1), created(2)])
        .await
        .unwrap();
    // Simulate a crash after reading: deliver both to worker-1 without acking.
    let mut conn = raw().await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("worker-1")
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(first.stream_name())
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pending(first.stream_name(), "g").await, 2);
    let again = bus(config(&prefix, "g", "worker-1"));
    let n = counting(&again);
    let task = spawn_consumer(&again);
    assert!(wait_until(WAIT, || async { n.load(Ordering::SeqCst) == 2 }).await);
    assert!(
        wait_until(WAIT, || async {
            pending(again.stream_name(), "g").await == 0
        })
        .await
    );
    stop(&again, task).await;
}

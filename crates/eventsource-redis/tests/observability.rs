//! Statistics, stream info, health, tracing spans and W3C trace context, against real Redis.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use eventsource_core::bus::named;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use eventsource_redis::TraceContext;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event as TracingEvent, Metadata, Subscriber};

const WAIT: Duration = Duration::from_secs(10);

/// get_stream_info on an empty stream, then with entries, groups and pending; the stats dict
/// has the tutorial's eight counters.
#[tokio::test]
async fn stream_info_and_stats() {
    let prefix = unique_prefix("info");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "monitoring", "c"));
    let before = bus.get_stream_info().await;
    assert!(before.connected, "{before:?}");
    assert_eq!(before.stream.length, 0);
    assert!(before.consumer_groups.is_empty());
    bus.connect().await.unwrap();
    let empty = bus.get_stream_info().await;
    assert_eq!(
        empty.stream.length, 0,
        "empty stream after MKSTREAM: {empty:?}"
    );
    assert_eq!(empty.stream.first_entry_id, None);
    assert_eq!(empty.consumer_groups.len(), 1);
    assert_eq!(empty.error, None);

    let ids = bus
        .publish_events(&(0..10).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let other = bus_with_group(&prefix, "other");
    other.connect().await.unwrap();
    let mut conn = raw().await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("monitoring")
        .arg("x")
        .arg("COUNT")
        .arg(4)
        .arg("STREAMS")
        .arg(bus.stream_name())
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let info = bus.get_stream_info().await;
    assert!(info.connected);
    assert_eq!(info.stream.name, bus.stream_name());
    assert_eq!(info.stream.length, 10);
    assert_eq!(info.stream.first_entry_id.as_deref(), Some(ids[0].as_str()));
    assert_eq!(info.stream.last_entry_id.as_deref(), Some(ids[9].as_str()));
    assert_eq!(info.consumer_groups.len(), 2);
    let mine = info
        .consumer_groups
        .iter()
        .find(|g| g.name == "monitoring")
        .unwrap();
    assert_eq!((mine.consumers, mine.pending), (1, 4));
    assert_eq!(info.pending_messages, 4);
    assert_eq!(info.dlq_messages, 0);
    assert_eq!(info.active_consumers, 1);
    let json = serde_json::to_value(&info).unwrap();
    assert_eq!(json["stream"]["length"], 10);

    let stats = bus.get_stats_dict();
    for key in [
        "events_published",
        "events_consumed",
        "events_processed_success",
        "events_processed_failed",
        "messages_recovered",
        "messages_sent_to_dlq",
        "handler_errors",
        "reconnections",
    ] {
        assert!(stats.contains_key(key), "the tutorial's {key}");
    }
    assert_eq!(stats["events_published"], 10);
    assert_eq!(stats["events_consumed"], 0);

    let health = bus.health_check().await;
    assert_eq!(
        (
            health.status,
            health.connected,
            health.consuming,
            health.pending_messages
        ),
        (eventsource_redis::HealthStatus::Degraded, true, false, 4)
    );
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { bus.is_consuming() }).await);
    assert_eq!(
        bus.health_check().await.status,
        eventsource_redis::HealthStatus::Healthy
    );
    stop(&bus, task).await;
}

fn bus_with_group(prefix: &str, group: &str) -> eventsource_redis::RedisEventBus {
    bus(config(prefix, group, "c"))
}

/// A span's name and its recorded fields.
type SpanRecord = (String, HashMap<String, String>);

#[derive(Default, Clone)]
struct Captured {
    spans: Arc<Mutex<Vec<SpanRecord>>>,
    /// Log events at WARN or ERROR: (target, message fields).
    warnings: Arc<Mutex<Vec<HashMap<String, String>>>>,
    next: Arc<AtomicU64>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            format!("{value:?}").trim_matches('"').to_owned(),
        );
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

impl Subscriber for Captured {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        let mut spans = self.spans.lock().unwrap();
        spans.push((attrs.metadata().name().to_owned(), fields));
        self.next.fetch_add(1, Ordering::SeqCst);
        Id::from_u64(spans.len() as u64)
    }
    fn record(&self, span: &Id, values: &Record<'_>) {
        let mut spans = self.spans.lock().unwrap();
        if let Some((_, fields)) = spans.get_mut(span.into_u64() as usize - 1) {
            values.record(&mut Fields(fields));
        }
    }
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &TracingEvent<'_>) {
        if *event.metadata().level() <= tracing::Level::WARN {
            let mut fields = HashMap::new();
            event.record(&mut Fields(&mut fields));
            self.warnings.lock().unwrap().push(fields);
        }
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Publish, process and handle spans carry the OpenTelemetry messaging attributes; the
/// traceparent travels in an extra entry field (never in the payload) and a handler's own
/// publishes continue the same trace.
#[tokio::test]
async fn spans_and_trace_context_cross_the_stream() {
    let captured = Captured::default();
    let _guard = tracing::subscriber::set_default(captured.clone());
    let prefix = unique_prefix("trace");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c"));
    let publisher = bus.clone();
    bus.subscribe(named("ship-it", move |e: Event<OrderCreated>| {
        let publisher = publisher.clone();
        async move {
            let follow_up = Event::new(
                e.metadata.aggregate_id,
                OrderShipped {
                    tracking_number: "T".into(),
                },
            )
            .with_aggregate_version(2)
            .caused_by(&e.metadata);
            publisher
                .publish_events(&[follow_up.into_envelope()])
                .await
                .map(drop)
        }
    }));
    bus.connect().await.unwrap();
    let root = TraceContext::new_root();
    root.clone()
        .scope(bus.publish_events(&[created(1)]))
        .await
        .unwrap();
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { bus.stats().events_published == 2 }).await);
    stop(&bus, task).await;

    let entries = bus.read_stream_range("-", "+", 10).await.unwrap();
    assert_eq!(entries.len(), 2);
    let first = TraceContext::parse(entries[0].get("traceparent").unwrap(), None).unwrap();
    let second = TraceContext::parse(entries[1].get("traceparent").unwrap(), None).unwrap();
    assert_eq!(
        first.trace_id, root.trace_id,
        "publish continues the caller's trace"
    );
    assert_eq!(
        second.trace_id, root.trace_id,
        "the handler's publish continues it too"
    );
    assert_ne!(second.span_id, first.span_id);
    assert!(!entries[0].get("payload").unwrap().contains("traceparent"));

    let spans = captured.spans.lock().unwrap();
    let find = |name: &str| {
        spans
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, f)| f.clone())
            .collect::<Vec<_>>()
    };
    let publish = find("eventsource.publish");
    assert_eq!(publish.len(), 2);
    assert_eq!(publish[0]["messaging.system"], "redis");
    assert_eq!(publish[0]["messaging.operation"], "publish");
    assert_eq!(publish[0]["messaging.destination.name"], bus.stream_name());
    let process = find("eventsource.process");
    assert_eq!(
        process.len(),
        1,
        "the OrderShipped entry has no subscriber: skipped before any handler span"
    );
    assert_eq!(process[0]["messaging.message.id"], entries[0].id);
    assert_eq!(process[0]["messaging.consumer.group.name"], "g");
    assert_eq!(process[0]["trace_id"], root.trace_id_hex());
    assert_eq!(process[0]["parent_span_id"], first.span_id_hex());
    let handle = find("eventsource.handle");
    assert_eq!(handle[0]["handler"], "ship-it");
    assert_eq!(handle[0]["otel.status_code"], "OK");
}

/// With enable_tracing off: no traceparent field and no spans.
#[tokio::test]
async fn tracing_can_be_switched_off() {
    let captured = Captured::default();
    let _guard = tracing::subscriber::set_default(captured.clone());
    let prefix = unique_prefix("notrace");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c").enable_tracing(false));
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    bus.subscribe(move |_: Event<OrderCreated>| {
        let n = n2.clone();
        async move {
            n.fetch_add(1, Ordering::SeqCst);
        }
    });
    bus.connect().await.unwrap();
    bus.publish_events(&[created(1)]).await.unwrap();
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { n.load(Ordering::SeqCst) == 1 }).await);
    stop(&bus, task).await;
    let entries = bus.read_stream_range("-", "+", 10).await.unwrap();
    assert_eq!(entries[0].get("traceparent"), None);
    let spans = captured.spans.lock().unwrap();
    assert!(
        spans
            .iter()
            .all(|(name, _)| !name.starts_with("eventsource.")),
        "{:?}",
        spans.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
}

/// An idle consumer (nothing to read for many block periods) logs no warning or error.
#[tokio::test]
async fn idle_consumer_logs_nothing_alarming() {
    let captured = Captured::default();
    let _guard = tracing::subscriber::set_default(captured.clone());
    let prefix = unique_prefix("idle");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c")
        .block_ms(50)
        .socket_timeout(std::time::Duration::from_millis(200))
        .recovery_interval_ms(100));
    bus.subscribe(|_: Event<OrderCreated>| async {});
    bus.connect().await.unwrap();
    let task = spawn_consumer(&bus);
    tokio::time::sleep(Duration::from_millis(800)).await;
    stop(&bus, task).await;
    assert!(bus.stats().recovery_runs >= 3, "recovery ran while idle");
    assert_eq!(bus.stats().reconnections, 0);
    assert!(
        captured.warnings.lock().unwrap().is_empty(),
        "{:?}",
        captured.warnings.lock().unwrap()
    );
}

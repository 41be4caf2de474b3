//! OpenTelemetry across two bus instances (feature `otel`): a publish made inside the caller's
//! request span and the consuming bus's process and handler spans form one trace, exported
//! through the SDK's in-memory exporter; the process span's parent is the publish span.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_request_through_publish_to_the_handler() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber here");

    let prefix = unique_prefix("otel");
    let _cleanup = Cleanup(prefix.clone());
    let publisher = bus(config(&prefix, "g", "publisher"));
    let consumer = bus(config(&prefix, "g", "consumer"));
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    consumer.subscribe(move |_: Event<OrderCreated>| {
        let h = h.clone();
        async move {
            tracing::info_span!("charge card").in_scope(|| ());
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    consumer.connect().await.unwrap();
    publisher.connect().await.unwrap();
    let task = spawn_consumer(&consumer);

    let request = tracing::info_span!("POST /orders");
    publisher
        .publish_events(&[created(1)])
        .instrument(request)
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            handled.load(Ordering::SeqCst) == 1
        })
        .await
    );
    stop(&consumer, task).await;
    // Spans are exported when they close; the consumer's have closed once it stopped.
    let _ = provider.force_flush();
    let spans = exporter.get_finished_spans().unwrap();
    let by_name = |name: &str| {
        spans
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no {name} span among {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
            .clone()
    };
    let request = by_name("POST /orders");
    let publish = by_name("eventsource.publish");
    let process = by_name("eventsource.process");
    let charge = by_name("charge card");
    let trace = request.span_context.trace_id();
    for span in [&publish, &process, &charge] {
        assert_eq!(span.span_context.trace_id(), trace, "{}", span.name);
    }
    assert_eq!(publish.parent_span_id, request.span_context.span_id());
    assert_eq!(process.parent_span_id, publish.span_context.span_id());
    assert!(
        process.parent_span_is_remote,
        "the parent came through Redis"
    );
}

//! The HTTP surface against a real Redis: `/metrics` shows the counts a run caused (handled ok
//! and failed per event type, published, consumed, dead-lettered, gauges), `/healthz` answers,
//! `/readyz` turns unready when Redis goes away and ready again when it returns.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::http::{get, sample};
use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use eventsource_redis::http::{HttpSurface, Readiness, install_prometheus_recorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness() {
    install_prometheus_recorder().expect("no other recorder in this test binary");
    let port = free_port();
    let mut server = OwnRedis::start(port, &temp_dir("http"), &[]);
    let prefix = unique_prefix("http");
    let bus = bus(config(&prefix, "workers", "w1")
        .redis_url(server.url())
        .max_retries(0)
        .recovery_interval_ms(100)
        .pending_idle_ms(200)
        .metrics_interval_ms(100)
        .reconnect_max_delay_ms(200));
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    bus.subscribe(move |_: Event<OrderCreated>| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    let failing = Arc::new(AtomicUsize::new(0));
    let f = failing.clone();
    bus.subscribe(move |_: Event<OrderShipped>| {
        let f = f.clone();
        async move {
            f.fetch_add(1, Ordering::SeqCst);
            Err::<(), HandlerError>("carrier down (test)".into())
        }
    });
    bus.connect().await.unwrap();
    let surface = HttpSurface::start(
        "127.0.0.1:0",
        Readiness::new()
            .consumer(bus.clone())
            .timeout(Duration::from_millis(500)),
    )
    .await
    .unwrap();
    let addr = surface.local_addr();
    assert_eq!(get(addr, "/healthz").await, (200, "ok\n".to_owned()));
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503, "not consuming yet: {body}");
    assert!(
        body.contains(&format!("consumer {prefix}:stream")),
        "{body}"
    );

    let task = spawn_consumer(&bus);
    let mut events: Vec<EventEnvelope> = (0..5).map(created).collect();
    events.push(shipped(1));
    bus.publish_events(&events).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            handled.load(Ordering::SeqCst) == 5 && bus.stats().messages_sent_to_dlq == 1
        })
        .await
    );
    let stream = format!("stream=\"{prefix}:stream\"");
    let mut text = String::new();
    for _ in 0..200 {
        text = get(addr, "/metrics").await.1;
        if sample(&text, "eventsource_events_consumed_total", &[&stream]) == 5.0
            && sample(&text, "eventsource_dlq_depth", &[&stream]) == 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        sample(&text, "eventsource_events_consumed_total", &[&stream]),
        5.0,
        "{text}"
    );
    assert_eq!(sample(&text, "eventsource_dlq_depth", &[&stream]), 1.0);
    let ok = [
        stream.as_str(),
        "event_type=\"OrderCreated\"",
        "outcome=\"ok\"",
    ];
    assert_eq!(sample(&text, "eventsource_events_handled_total", &ok), 5.0);
    let failed = [
        stream.as_str(),
        "event_type=\"OrderShipped\"",
        "outcome=\"failed\"",
    ];
    assert_eq!(
        sample(&text, "eventsource_events_handled_total", &failed),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "eventsource_events_published_total",
            &[&stream, "event_type=\"OrderCreated\""]
        ),
        5.0
    );
    assert_eq!(
        sample(&text, "eventsource_dead_letters_total", &[&stream]),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "eventsource_handler_duration_seconds_count",
            &[&stream, "event_type=\"OrderCreated\""]
        ),
        5.0
    );
    assert_eq!(
        sample(&text, "eventsource_pending_entries", &[&stream]),
        0.0
    );
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));

    // Redis goes away: unready, saying why; it comes back: ready again.
    server.kill();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            get(addr, "/readyz").await.0 == 503
        })
        .await
    );
    let (_, body) = get(addr, "/readyz").await;
    assert!(body.contains("unhealthy"), "{body}");
    let _server = OwnRedis::start(port, &temp_dir("http-again"), &[]);
    assert!(
        wait_until(Duration::from_secs(30), || async {
            get(addr, "/readyz").await.0 == 200
        })
        .await,
        "{}",
        get(addr, "/readyz").await.1
    );
    assert!(
        sample(
            &get(addr, "/metrics").await.1,
            "eventsource_reconnections_total",
            &[&stream]
        ) >= 1.0
    );
    stop(&bus, task).await;
    surface.shutdown().await;
}

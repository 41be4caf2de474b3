//! The event bus contract on the in-memory bus: subscriptions, dispatch order, failure
//! isolation and counts.

use std::sync::{Arc, Mutex};

use eventsource_core::bus::named;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use uuid::Uuid;

type Log = Arc<Mutex<Vec<String>>>;

fn created() -> EventEnvelope {
    Event::new(
        Uuid::new_v4(),
        OrderCreated {
            customer_id: "c".into(),
            total_amount: 1.0,
        },
    )
    .into_envelope()
}

fn shipped() -> EventEnvelope {
    Event::new(
        Uuid::new_v4(),
        OrderShipped {
            tracking_number: "T".into(),
        },
    )
    .into_envelope()
}

fn push(log: &Log, s: impl Into<String>) {
    log.lock().unwrap().push(s.into());
}

struct Stats {
    log: Log,
}

impl Projection for Stats {
    fn event_types(&self) -> Vec<String> {
        vec!["OrderCreated".into(), "OrderShipped".into()]
    }
    async fn handle(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        if let Some(e) = event.data::<OrderCreated>()? {
            push(&self.log, format!("stats created {}", e.total_amount));
        } else if let Some(e) = event.data::<OrderShipped>()? {
            push(&self.log, format!("stats shipped {}", e.tracking_number));
        }
        Ok(())
    }
}

/// Type handlers run in subscription order, then wildcard handlers; each typed handler gets
/// the concrete type.
#[tokio::test]
async fn dispatch_order_is_type_handlers_then_wildcards() {
    let bus = InMemoryEventBus::new();
    let log: Log = Default::default();
    let l = log.clone();
    bus.subscribe_to_all_events(move |e: EventEnvelope| {
        let l = l.clone();
        async move { push(&l, format!("wildcard {}", e.event_type())) }
    });
    let l = log.clone();
    bus.subscribe(move |e: Event<OrderCreated>| {
        let l = l.clone();
        async move { push(&l, format!("first {}", e.customer_id)) }
    });
    let l = log.clone();
    bus.subscribe(move |_: Event<OrderCreated>| {
        let l = l.clone();
        async move { push(&l, "second") }
    });
    bus.subscribe_all(Stats { log: log.clone() });
    bus.publish(&[created(), shipped()]).await.unwrap();
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            "first c",
            "second",
            "stats created 1",
            "wildcard OrderCreated",
            "stats shipped T",
            "wildcard OrderShipped"
        ]
    );
}

/// A handler that panics and one that fails do not stop the next handler; both failures are
/// reported under the handlers' names and counted.
#[tokio::test]
async fn failing_and_panicking_handlers_do_not_stop_others() {
    let bus = InMemoryEventBus::new();
    let log: Log = Default::default();
    bus.subscribe(named("panicker", |e: Event<OrderCreated>| async move {
        if e.total_amount > 0.0 {
            panic!("boom");
        }
    }));
    bus.subscribe(named("failer", |_: Event<OrderCreated>| async move {
        Err::<(), HandlerError>("database down".into())
    }));
    let l = log.clone();
    bus.subscribe(named("survivor", move |_: Event<OrderCreated>| {
        let l = l.clone();
        async move { push(&l, "survivor ran") }
    }));
    let reports = bus.publish_with_report(&[created()]).await.unwrap();
    assert_eq!(*log.lock().unwrap(), vec!["survivor ran"]);
    let report = &reports[0];
    assert_eq!(report.handlers_run, 3);
    assert_eq!(report.failures.len(), 2);
    assert_eq!(&*report.failures[0].handler, "panicker");
    assert!(report.failures[0].panicked);
    assert!(report.failures[0].error.to_string().contains("boom"));
    assert_eq!(&*report.failures[1].handler, "failer");
    assert!(!report.failures[1].panicked);
    assert!(report.failure_summary().contains("database down"));
    // publish (the contract) does not fail because a handler did; the stats count it.
    bus.publish(&[created()]).await.unwrap();
    let stats = bus.stats();
    assert_eq!(stats.events_published, 2);
    assert_eq!(stats.handlers_invoked, 6);
    assert_eq!(stats.handler_errors, 4);
}

/// Counts: total over types (wildcards excluded), per type, wildcard; unsubscribe tells
/// whether it removed something; clear removes all.
#[tokio::test]
async fn subscriber_counts_and_unsubscribe() {
    let bus = InMemoryEventBus::new();
    assert_eq!(bus.subscriber_count(), 0);
    assert_eq!(bus.wildcard_subscriber_count(), 0);
    let a = bus.subscribe(|_: Event<OrderCreated>| async {});
    let _b = bus.subscribe(|_: Event<OrderCreated>| async {});
    let p = bus.subscribe_all(Stats {
        log: Default::default(),
    });
    let w = bus.subscribe_to_all_events(|_: EventEnvelope| async {});
    assert_eq!(bus.subscriber_count(), 4);
    assert_eq!(bus.subscriber_count_of::<OrderCreated>(), 3);
    assert_eq!(bus.subscriber_count_for("OrderShipped"), 1);
    assert_eq!(bus.wildcard_subscriber_count(), 1);
    assert!(bus.unsubscribe(a));
    assert!(!bus.unsubscribe(a), "second unsubscribe reports false");
    assert!(bus.unsubscribe(p));
    assert_eq!(bus.subscriber_count(), 1);
    assert!(
        !bus.unsubscribe_from_all_events(_b),
        "not a wildcard subscription"
    );
    assert!(bus.unsubscribe_from_all_events(w));
    assert_eq!(bus.wildcard_subscriber_count(), 0);
    bus.clear_subscribers();
    assert_eq!(bus.subscriber_count(), 0);
}

/// A type with a `handle` method works as a handler; an invalid event is refused before any
/// handler runs.
#[tokio::test]
async fn handler_types_and_invalid_events() {
    struct Counter(Arc<Mutex<u32>>);
    impl Handler<Event<OrderShipped>> for Counter {
        async fn handle(&self, _event: Event<OrderShipped>) -> Result<(), HandlerError> {
            *self.0.lock().unwrap() += 1;
            Ok(())
        }
    }
    let bus = InMemoryEventBus::new();
    let n = Arc::new(Mutex::new(0));
    bus.subscribe(Counter(n.clone()));
    bus.publish(&[shipped(), created(), shipped()])
        .await
        .unwrap();
    assert_eq!(*n.lock().unwrap(), 2);
    let mut bad = shipped();
    bad.metadata_mut().aggregate_type = "has space".into();
    let err = bus.publish(&[bad]).await.unwrap_err();
    assert!(err.to_string().contains("aggregate_type"), "{err}");
    assert_eq!(*n.lock().unwrap(), 2);
}

/// The bus works behind the object-safe publisher trait, shared between tasks.
#[tokio::test]
async fn publisher_is_object_safe_and_shareable() {
    let bus = Arc::new(InMemoryEventBus::new());
    let count = Arc::new(Mutex::new(0));
    let c = count.clone();
    bus.subscribe(move |_: Event<OrderCreated>| {
        let c = c.clone();
        async move { *c.lock().unwrap() += 1 }
    });
    let publisher: Arc<dyn EventPublisher> = bus.clone();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let p = publisher.clone();
        tasks.push(tokio::spawn(async move {
            p.publish(&[created()]).await.unwrap()
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(*count.lock().unwrap(), 8);
}

/// Every typed handler of an event receives the one decoded copy: the same metadata and data
/// allocation as the envelope (shared, not cloned), and a handler that changes its event
/// changes only its own copy.
#[tokio::test]
async fn handlers_share_the_decoded_event() {
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    let envelope = registry.decode(&created().to_json().unwrap()).unwrap();
    assert!(envelope.is_typed());
    let original = envelope.to_event::<OrderCreated>().unwrap().unwrap();
    let seen: Arc<Mutex<Vec<(usize, usize)>>> = Arc::default();
    let copied: Arc<Mutex<Vec<usize>>> = Arc::default();
    let bus = InMemoryEventBus::new();
    for _ in 0..3 {
        let (seen, copied) = (seen.clone(), copied.clone());
        bus.subscribe(move |mut e: Event<OrderCreated>| {
            let (seen, copied) = (seen.clone(), copied.clone());
            async move {
                let pointers = (
                    Arc::as_ptr(&e.metadata) as usize,
                    Arc::as_ptr(&e.data) as usize,
                );
                seen.lock().unwrap().push(pointers);
                e.data_mut().total_amount = -1.0;
                copied.lock().unwrap().push(Arc::as_ptr(&e.data) as usize);
            }
        });
    }
    let report = bus.subscribers().dispatch(&envelope).await;
    assert!(report.is_success(), "{}", report.failure_summary());
    let expected = (
        Arc::as_ptr(&original.metadata) as usize,
        Arc::as_ptr(&original.data) as usize,
    );
    assert_eq!(*seen.lock().unwrap(), vec![expected; 3]);
    assert!(copied.lock().unwrap().iter().all(|&p| p != expected.1));
    // Copy on write: the handlers' changes did not reach the shared copy.
    let after = envelope.to_event::<OrderCreated>().unwrap().unwrap();
    assert_eq!(after.total_amount, 1.0);
    assert!(Arc::ptr_eq(&after.data, &original.data));
}

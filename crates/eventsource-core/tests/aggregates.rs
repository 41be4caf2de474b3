//! Aggregates and the repository over the in-memory store.

use std::sync::Arc;

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderAggregate, OrderShipped, OrderStatus};
use eventsource_core::{AggregateError, RepositoryError, StoreError};
use tokio::sync::Mutex;
use uuid::Uuid;

/// Given a new order, when it is created and shipped, then its state, version and uncommitted
/// events follow; shipping twice or shipping a draft is refused.
#[test]
fn order_create_then_ship() {
    let mut order = OrderAggregate::new(Uuid::new_v4());
    let err = order.ship("T-0").unwrap_err();
    assert!(
        matches!(err, AggregateError::Rule(_)),
        "a draft cannot ship"
    );
    order.create("cust-1", 99.99).unwrap();
    assert_eq!(order.status, OrderStatus::Created);
    assert_eq!(order.version(), 1);
    assert_eq!(order.next_version(), 2);
    order.ship("TRACK-1").unwrap();
    assert_eq!(order.status, OrderStatus::Shipped);
    assert_eq!(order.version(), 2);
    let versions: Vec<u64> = order
        .uncommitted_events()
        .iter()
        .map(|e| e.aggregate_version())
        .collect();
    assert_eq!(versions, vec![1, 2]);
    assert!(
        order
            .uncommitted_events()
            .iter()
            .all(|e| e.aggregate_id() == order.id())
    );
    assert!(matches!(order.ship("again"), Err(AggregateError::Rule(_))));
    order.mark_committed();
    assert!(order.uncommitted_events().is_empty());
    assert_eq!(order.version(), 2);
}

/// Rehydration rebuilds state; an event for another aggregate or out of sequence is refused.
#[test]
fn history_must_fit_id_and_version() {
    let id = Uuid::new_v4();
    let mut source = OrderAggregate::new(id);
    source.create("c", 5.0).unwrap();
    source.ship("T").unwrap();
    let history = source.uncommitted_events().to_vec();

    let mut copy = OrderAggregate::new(id);
    copy.load_from_history(history.clone()).unwrap();
    assert_eq!(copy.status, OrderStatus::Shipped);
    assert_eq!(copy.version(), 2);
    assert!(copy.uncommitted_events().is_empty());

    let mut other = OrderAggregate::new(Uuid::new_v4());
    assert!(matches!(
        other.load_from_history(history.clone()),
        Err(AggregateError::WrongAggregate { .. })
    ));
    let mut gap = OrderAggregate::new(id);
    match gap.load_from_history(vec![history[1].clone()]) {
        Err(AggregateError::VersionMismatch {
            expected, actual, ..
        }) => {
            assert_eq!((expected, actual), (1, 2));
        }
        other => panic!("expected VersionMismatch, got {other:?}"),
    }
    let stray = Event::new(
        id,
        OrderShipped {
            tracking_number: "x".into(),
        },
    )
    .with_aggregate_version(1)
    .into_envelope();
    let mut typed = OrderAggregate::new(id);
    let mut wrong_type = stray.clone();
    wrong_type.metadata_mut().aggregate_type = "Invoice".into();
    assert!(matches!(
        typed.apply_event(wrong_type, false),
        Err(AggregateError::WrongAggregateType { .. })
    ));
}

fn repo(store: &InMemoryEventStore) -> AggregateRepository<OrderAggregate> {
    AggregateRepository::new(Arc::new(store.clone()))
}

/// Save appends the uncommitted events, load rebuilds the aggregate, exists tells.
#[tokio::test]
async fn repository_save_load_exists() {
    let store = InMemoryEventStore::new();
    let repo = repo(&store);
    let id = Uuid::new_v4();
    assert!(!repo.exists(id).await.unwrap());
    assert!(matches!(
        repo.load(id).await,
        Err(RepositoryError::NotFound { .. })
    ));
    let mut order = repo.create_new(id);
    repo.save(&mut order)
        .await
        .expect("nothing to save is fine");
    assert!(store.is_empty());
    order.create("cust-9", 12.5).unwrap();
    repo.save(&mut order).await.unwrap();
    assert!(order.uncommitted_events().is_empty());
    assert!(repo.exists(id).await.unwrap());

    let mut loaded = repo.load(id).await.unwrap();
    assert_eq!(loaded.version(), 1);
    assert_eq!(loaded.customer_id.as_deref(), Some("cust-9"));
    loaded.ship("T-9").unwrap();
    repo.save(&mut loaded).await.unwrap();
    let reloaded = repo.load(id).await.unwrap();
    assert_eq!(reloaded.status, OrderStatus::Shipped);
    assert_eq!(store.len(), 2);
}

/// Two concurrent saves of the same loaded aggregate: exactly one wins; the loser gets a
/// concurrency error naming expected and actual, and keeps its uncommitted event.
#[tokio::test]
async fn concurrent_saves_exactly_one_wins() {
    let store = InMemoryEventStore::new();
    let repo = repo(&store);
    let id = Uuid::new_v4();
    let mut order = repo.create_new(id);
    order.create("c", 1.0).unwrap();
    repo.save(&mut order).await.unwrap();

    let mut tasks = Vec::new();
    for n in 0..2 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = repo.load(id).await.unwrap();
            mine.ship(&format!("T-{n}")).unwrap();
            // Both have loaded before either saves.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let result = repo.save(&mut mine).await;
            (result, mine.uncommitted_events().len())
        }));
    }
    let mut wins = 0;
    for task in tasks {
        let (result, left) = task.await.unwrap();
        match result {
            Ok(()) => {
                wins += 1;
                assert_eq!(left, 0);
            }
            Err(RepositoryError::Store(StoreError::Concurrency {
                expected, actual, ..
            })) => {
                assert_eq!(expected, ExpectedVersion::Exact(1));
                assert_eq!(actual, 2);
                assert_eq!(left, 1, "the loser keeps its event");
            }
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(store.len(), 2);
}

/// After a save the repository publishes exactly the saved events, in order.
#[tokio::test]
async fn save_publishes_saved_events() {
    let store = InMemoryEventStore::new();
    let bus = Arc::new(InMemoryEventBus::new());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    bus.subscribe_to_all_events(move |e: EventEnvelope| {
        let log = log.clone();
        async move {
            log.lock()
                .await
                .push((e.event_type().to_owned(), e.aggregate_version()))
        }
    });
    let repo = AggregateRepository::<OrderAggregate>::new(Arc::new(store.clone()))
        .with_publisher(bus.clone());
    let mut order = repo.create_new(Uuid::new_v4());
    order.create("c", 3.0).unwrap();
    order.ship("T").unwrap();
    repo.save(&mut order).await.unwrap();
    repo.save(&mut order).await.unwrap();
    assert_eq!(
        *seen.lock().await,
        vec![
            ("OrderCreated".to_owned(), 1),
            ("OrderShipped".to_owned(), 2)
        ]
    );
    assert_eq!(bus.stats().events_published, 2);
}

/// The in-memory store satisfies the shared store contract.
#[tokio::test]
async fn in_memory_store_contract() {
    eventsource_core::testkit::store_contract::run_all(|| async { InMemoryEventStore::new() })
        .await;
}

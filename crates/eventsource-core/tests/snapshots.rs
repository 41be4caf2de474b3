//! Snapshots and the repository helpers: a snapshot load equals a full replay (a property test
//! over random order histories), a snapshot of another shape is ignored and counted,
//! `get_or_none`, `load_or_create`, and the given/when/then harness.

use std::sync::Arc;

use eventsource_core::prelude::*;
use eventsource_core::snapshot::{
    InMemorySnapshotStore, Snapshot, SnapshotRepository, SnapshotStore, SnapshotStrategy,
};
use eventsource_core::testkit::orders::{OrderAggregate, OrderCreated, OrderShipped, OrderStatus};
use eventsource_core::testkit::scenario::{AggregateTest, event};
use proptest::prelude::*;
use uuid::Uuid;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// What a random history does to an order: create, maybe ship, with random values.
#[derive(Debug, Clone)]
struct History {
    customer: String,
    amount: f64,
    ship: Option<String>,
    snapshot_every: u64,
}

fn histories() -> impl Strategy<Value = Vec<History>> {
    proptest::collection::vec(
        (
            "[a-z]{1,12}",
            0.0f64..1e9,
            proptest::option::of("[A-Z0-9]{1,10}"),
            1u64..3,
        )
            .prop_map(|(customer, amount, ship, snapshot_every)| History {
                customer,
                amount,
                ship,
                snapshot_every,
            }),
        1..12,
    )
}

fn same(a: &OrderAggregate, b: &OrderAggregate) {
    assert_eq!(a.id(), b.id());
    assert_eq!(a.version(), b.version());
    assert_eq!(a.customer_id, b.customer_id);
    assert_eq!(a.total_amount.to_bits(), b.total_amount.to_bits());
    assert_eq!(a.status, b.status);
    assert_eq!(a.tracking_number, b.tracking_number);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// For random histories and snapshot frequencies, loading through snapshots gives the
    /// same aggregate as replaying every event.
    #[test]
    fn snapshot_load_equals_full_replay(histories in histories()) {
        runtime().block_on(async {
            let store = Arc::new(InMemoryEventStore::new());
            let plain = AggregateRepository::<OrderAggregate>::new(store.clone());
            for h in &histories {
                let snapshots = SnapshotRepository::new(
                    plain.clone(),
                    Arc::new(InMemorySnapshotStore::new()),
                    SnapshotStrategy::EveryEvents(h.snapshot_every),
                );
                let id = Uuid::new_v4();
                let mut order = snapshots.inner().create_new(id);
                order.create(&h.customer, h.amount).unwrap();
                snapshots.save(&mut order).await.unwrap();
                if let Some(tracking) = &h.ship {
                    let mut order = snapshots.load(id).await.unwrap();
                    order.ship(tracking).unwrap();
                    snapshots.save(&mut order).await.unwrap();
                }
                let through_snapshots = snapshots.load(id).await.unwrap();
                let replayed = plain.load(id).await.unwrap();
                same(&through_snapshots, &replayed);
                let version = 1 + u64::from(h.ship.is_some());
                if version >= h.snapshot_every {
                    prop_assert!(snapshots.stats().taken() >= 1);
                    prop_assert!(snapshots.stats().loaded() >= 1, "loaded from the snapshot");
                }
            }
            Ok(())
        })?;
    }
}

/// A snapshot of another state shape is ignored (full replay) and counted; a snapshot
/// taken with unsaved events is refused.
#[tokio::test]
async fn a_snapshot_of_another_shape_is_ignored_and_counted() {
    let store = Arc::new(InMemoryEventStore::new());
    let snapshots_store = Arc::new(InMemorySnapshotStore::new());
    let repo = SnapshotRepository::new(
        AggregateRepository::<OrderAggregate>::new(store),
        snapshots_store.clone(),
        SnapshotStrategy::OnDemand,
    );
    let id = Uuid::new_v4();
    let mut order = repo.inner().create_new(id);
    order.create("c", 5.0).unwrap();
    assert!(repo.take_snapshot(&order).await.is_err(), "unsaved");
    repo.save(&mut order).await.unwrap();
    assert_eq!(repo.stats().taken(), 0, "on demand only");
    // A snapshot of an older shape, claiming something else.
    snapshots_store
        .save(Snapshot {
            aggregate_id: id,
            aggregate_type: "Order".into(),
            version: 1,
            schema_version: 0,
            state: serde_json::json!({"whatever": true}),
            taken_at: chrono::Utc::now(),
        })
        .await
        .unwrap();
    let loaded = repo.load(id).await.unwrap();
    assert_eq!(loaded.customer_id.as_deref(), Some("c"));
    assert_eq!(repo.stats().ignored(), 1);
    repo.take_snapshot(&loaded).await.unwrap();
    assert_eq!(repo.load(id).await.unwrap().total_amount, 5.0);
    assert_eq!(repo.stats().loaded(), 1);
}

/// `get_or_none` and `load_or_create` for absent and present aggregates.
#[tokio::test]
async fn get_or_none_and_load_or_create() {
    let repo = AggregateRepository::<OrderAggregate>::new(Arc::new(InMemoryEventStore::new()));
    let id = Uuid::new_v4();
    assert!(repo.get_or_none(id).await.unwrap().is_none());
    let mut order = repo.load_or_create(id).await.unwrap();
    assert_eq!(order.version(), 0);
    order.create("c", 1.0).unwrap();
    repo.save(&mut order).await.unwrap();
    assert_eq!(repo.get_or_none(id).await.unwrap().unwrap().version(), 1);
    assert_eq!(
        repo.load_or_create(id).await.unwrap().status,
        OrderStatus::Created
    );
}

/// The harness: given / when / then for events and for errors.
#[test]
fn given_when_then() {
    AggregateTest::<OrderAggregate>::new()
        .when(|o| o.create("c", 2.0))
        .then(&[event(OrderCreated {
            customer_id: "c".into(),
            total_amount: 2.0,
        })]);
    let shipped = AggregateTest::<OrderAggregate>::new()
        .given(OrderCreated {
            customer_id: "c".into(),
            total_amount: 2.0,
        })
        .when(|o| o.ship("T"))
        .then(&[event(OrderShipped {
            tracking_number: "T".into(),
        })]);
    assert_eq!(shipped.aggregate().status, OrderStatus::Shipped);
    AggregateTest::<OrderAggregate>::new()
        .given(OrderCreated {
            customer_id: "c".into(),
            total_amount: 2.0,
        })
        .when(|o| o.create("again", 1.0))
        .then_error(|e| e.to_string().contains("already created"));
}

/// The in-memory store keeps the snapshot rules, old and new shapes writing alternately
/// included (a rolling deploy).
#[tokio::test]
async fn in_memory_snapshots_pass_the_snapshot_contract() {
    eventsource_core::testkit::snapshot_contract::run_all(&InMemorySnapshotStore::new()).await;
}

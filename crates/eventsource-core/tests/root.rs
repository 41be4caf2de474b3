//! `Root<S>`: an aggregate written as state + apply + commands goes through the repository,
//! optimistic concurrency, snapshots and history replay like a hand-written one.

use std::sync::Arc;

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use eventsource_core::{
    AggregateError, InMemorySnapshotStore, SnapshotRepository, SnapshotStrategy,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
struct Order {
    customer: Option<String>,
    total: f64,
    tracking: Option<String>,
}

impl AggregateState for Order {
    const AGGREGATE_TYPE: &'static str = "Order";

    fn apply(&mut self, event: &EventEnvelope) -> Result<(), AggregateError> {
        if let Some(e) = event.data::<OrderCreated>()? {
            self.customer = Some(e.customer_id.clone());
            self.total = e.total_amount;
        } else if let Some(e) = event.data::<OrderShipped>()? {
            self.tracking = Some(e.tracking_number.clone());
        }
        Ok(())
    }
}

impl Order {
    fn create(&self, customer: &str, total: f64) -> Result<OrderCreated, AggregateError> {
        if self.customer.is_some() {
            return Err(AggregateError::rule("order already created"));
        }
        Ok(OrderCreated {
            customer_id: customer.into(),
            total_amount: total,
        })
    }

    fn ship(&self, tracking: &str) -> Result<OrderShipped, AggregateError> {
        match (&self.customer, &self.tracking) {
            (Some(_), None) => Ok(OrderShipped {
                tracking_number: tracking.into(),
            }),
            _ => Err(AggregateError::rule(
                "only a created, unshipped order ships",
            )),
        }
    }
}

#[tokio::test]
async fn a_root_saves_loads_conflicts_and_snapshots() {
    let store = Arc::new(InMemoryEventStore::new());
    let orders = AggregateRepository::<Root<Order>>::new(store.clone());
    let id = Uuid::new_v4();
    let mut order = orders.create_new(id);
    order.execute(|o| o.create("ada", 12.5)).unwrap();
    let refused = order.execute(|o| o.create("bob", 1.0)).unwrap_err();
    assert_eq!(refused.kind(), eventsource_core::ErrorKind::InvalidInput);
    assert_eq!(
        order.uncommitted_events().len(),
        1,
        "a refused command raises nothing"
    );
    orders.save(&mut order).await.unwrap();

    // Two writers load version 1; the second save is a conflict.
    let mut first = orders.load(id).await.unwrap();
    let mut second = orders.load(id).await.unwrap();
    assert_eq!(
        first.state(),
        &Order {
            customer: Some("ada".into()),
            total: 12.5,
            tracking: None
        }
    );
    first.execute(|o| o.ship("T-1")).unwrap();
    second.execute(|o| o.ship("T-2")).unwrap();
    orders.save(&mut first).await.unwrap();
    let conflict = orders.save(&mut second).await.unwrap_err();
    assert!(conflict.is_concurrency_conflict(), "{conflict}");

    let loaded = orders.load(id).await.unwrap();
    assert_eq!(loaded.version(), 2);
    assert_eq!(loaded.tracking.as_deref(), Some("T-1"));

    // Snapshots store the state itself, and a load from one gives the same aggregate.
    let snapshots = SnapshotRepository::new(
        AggregateRepository::<Root<Order>>::new(store),
        Arc::new(InMemorySnapshotStore::new()),
        SnapshotStrategy::OnDemand,
    );
    snapshots.take_snapshot(&loaded).await.unwrap();
    let restored = snapshots.load(id).await.unwrap();
    assert_eq!(snapshots.stats().loaded(), 1);
    assert_eq!(restored.version(), 2);
    assert_eq!(restored.state(), loaded.state());
}

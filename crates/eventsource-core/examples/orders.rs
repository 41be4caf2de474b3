//! The order example in one process: an aggregate saved to the in-memory store, its events
//! published on the in-memory bus, and a projection keeping totals.
//!
//! Run: `cargo run -p eventsource-core --example orders`

use std::sync::{Arc, Mutex};

use eventsource_core::prelude::*;
use eventsource_core::{AggregateError, domain_event};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

// --- Events ------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderCreated {
    customer_id: String,
    total_amount: f64,
}
domain_event!(OrderCreated, "OrderCreated", aggregate = "Order");

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderShipped {
    tracking_number: String,
}
domain_event!(OrderShipped, "OrderShipped", aggregate = "Order");

// --- Aggregate ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Draft,
    Created,
    Shipped,
}

struct OrderAggregate {
    core: AggregateCore,
    customer_id: Option<String>,
    total_amount: f64,
    status: Status,
    tracking_number: Option<String>,
}

impl OrderAggregate {
    fn create(&mut self, customer_id: &str, total_amount: f64) -> Result<(), AggregateError> {
        if self.status != Status::Draft {
            return Err(AggregateError::rule("order already created"));
        }
        self.raise(OrderCreated {
            customer_id: customer_id.into(),
            total_amount,
        })?;
        Ok(())
    }

    fn ship(&mut self, tracking_number: &str) -> Result<(), AggregateError> {
        if self.status != Status::Created {
            return Err(AggregateError::rule("only a created order can ship"));
        }
        self.raise(OrderShipped {
            tracking_number: tracking_number.into(),
        })?;
        Ok(())
    }
}

impl Aggregate for OrderAggregate {
    const AGGREGATE_TYPE: &'static str = "Order";

    fn new(id: Uuid) -> Self {
        Self {
            core: AggregateCore::new(id),
            customer_id: None,
            total_amount: 0.0,
            status: Status::Draft,
            tracking_number: None,
        }
    }
    fn core(&self) -> &AggregateCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut AggregateCore {
        &mut self.core
    }
    fn apply(&mut self, event: &EventEnvelope) -> Result<(), AggregateError> {
        if let Some(e) = event.data::<OrderCreated>()? {
            self.customer_id = Some(e.customer_id.clone());
            self.total_amount = e.total_amount;
            self.status = Status::Created;
        } else if let Some(e) = event.data::<OrderShipped>()? {
            self.tracking_number = Some(e.tracking_number.clone());
            self.status = Status::Shipped;
        }
        Ok(())
    }
}

// --- Projection --------------------------------------------------------------------------

#[derive(Default)]
struct Totals {
    orders: u64,
    revenue: f64,
    shipped: u64,
}

struct OrderStatisticsProjection(Arc<Mutex<Totals>>);

impl Projection for OrderStatisticsProjection {
    fn event_types(&self) -> Vec<String> {
        vec![
            OrderCreated::EVENT_TYPE.into(),
            OrderShipped::EVENT_TYPE.into(),
        ]
    }
    async fn handle(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        let mut totals = self.0.lock().expect("not poisoned");
        if let Some(e) = event.data::<OrderCreated>()? {
            totals.orders += 1;
            totals.revenue += e.total_amount;
            println!("  [Stats] Order created: ${:.2}", e.total_amount);
        } else if let Some(e) = event.data::<OrderShipped>()? {
            totals.shipped += 1;
            println!("  [Stats] Order shipped: {}", e.tracking_number);
        }
        Ok(())
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let store = Arc::new(InMemoryEventStore::new());
    let bus = Arc::new(InMemoryEventBus::new());
    let totals = Arc::new(Mutex::new(Totals::default()));
    bus.subscribe_all(OrderStatisticsProjection(totals.clone()));
    bus.subscribe_to_all_events(|e: EventEnvelope| async move {
        println!(
            "  [Audit] {} v{} of {}",
            e.event_type(),
            e.aggregate_version(),
            e.aggregate_id()
        );
    });
    let repo =
        AggregateRepository::<OrderAggregate>::new(store.clone()).with_publisher(bus.clone());

    let order_id = Uuid::new_v4();
    println!("Creating order {order_id}");
    let mut order = repo.create_new(order_id);
    order.create("cust-123", 99.99)?;
    repo.save(&mut order).await?;

    println!("Shipping order {order_id}");
    let mut order = repo.load(order_id).await?;
    order.ship("TRACK-12345")?;
    repo.save(&mut order).await?;

    let order = repo.load(order_id).await?;
    println!(
        "Order {order_id}: status {:?}, customer {}, total ${:.2}, tracking {}, version {}",
        order.status,
        order.customer_id.as_deref().unwrap_or("-"),
        order.total_amount,
        order.tracking_number.as_deref().unwrap_or("-"),
        order.version()
    );
    if let Err(e) = repo.load(order_id).await?.ship("TRACK-2") {
        println!("Shipping again is refused: {e}");
    }

    let totals = totals.lock().expect("not poisoned");
    println!("Projection totals:");
    println!("  Total orders: {}", totals.orders);
    println!("  Total revenue: ${:.2}", totals.revenue);
    println!("  Shipped count: {}", totals.shipped);
    println!("Events in store: {}", store.len());
    Ok(())
}

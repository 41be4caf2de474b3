//! Projections built from the PostgreSQL store: a read model table kept exactly once and an
//! in-memory projector, both catching up on the history and then following live appends;
//! aggregates loaded from snapshots.
//!
//! Run: `cargo run -p eventsource-postgres --example projection`
//! (PostgreSQL at `DATABASE_URL`, default `postgres://postgres@127.0.0.1:5432/test`; the
//! example works in a schema of its own and drops it at the end.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use eventsource_core::BoxFuture;
use eventsource_core::prelude::*;
use eventsource_core::snapshot::{SnapshotRepository, SnapshotStrategy};
use eventsource_core::store::StoredEvent;
use eventsource_core::testkit::orders::{OrderAggregate, OrderCreated};
use eventsource_postgres::{
    PostgresEventStore, PostgresSnapshotStore, PostgresStoreConfig, ProjectionError, Projector,
    ReadModel, SubscriptionHandle, SubscriptionManager, SubscriptionOptions, SubscriptionState,
};
use sqlx::postgres::PgConnection;
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;

const SCHEMA: &str = "example_projection";

/// Revenue per customer in a table of the store's database: each page and its checkpoint in
/// one transaction, so every event counts exactly once.
struct RevenueByCustomer;

impl ReadModel for RevenueByCustomer {
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            for stored in events {
                if let Some(order) = stored.event.data::<OrderCreated>()? {
                    sqlx::query(
                        "INSERT INTO example_projection.revenue (customer_id, orders, revenue) \
                         VALUES ($1, 1, $2) ON CONFLICT (customer_id) DO UPDATE \
                         SET orders = revenue.orders + 1, revenue = revenue.revenue + $2",
                    )
                    .bind(&order.customer_id)
                    .bind(order.total_amount)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            Ok(())
        })
    }

    fn reset<'a>(&'a self, tx: &'a mut PgConnection) -> BoxFuture<'a, Result<(), ProjectionError>> {
        Box::pin(async move {
            sqlx::query("TRUNCATE example_projection.revenue")
                .execute(&mut *tx)
                .await?;
            Ok(())
        })
    }
}

/// Counts in memory (at least once: it may see a page again after a crash).
#[derive(Default)]
struct EventCounter(AtomicU64);

impl Projector for EventCounter {
    fn handle<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        self.0.fetch_add(events.len() as u64, Ordering::Relaxed);
        Box::pin(async { Ok(()) })
    }
}

#[tokio::main]
async fn main() -> Result<(), Error> {
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let store = PostgresEventStore::connect(
        &database_url,
        PostgresStoreConfig {
            schema: SCHEMA.into(),
            ..Default::default()
        },
    )
    .await?;
    let result = run(&store).await;
    sqlx::query("DROP SCHEMA example_projection CASCADE")
        .execute(store.pool())
        .await?;
    result
}

async fn run(store: &PostgresEventStore) -> Result<(), Error> {
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS example_projection.revenue \
         (customer_id TEXT PRIMARY KEY, orders BIGINT NOT NULL, revenue DOUBLE PRECISION NOT NULL)",
    )
    .execute(store.pool())
    .await?;

    // History first: 200 orders, saved through a repository that snapshots every 2 versions.
    let repository = AggregateRepository::<OrderAggregate>::new(Arc::new(store.clone()));
    let orders = SnapshotRepository::new(
        repository,
        Arc::new(PostgresSnapshotStore::new(store.clone())),
        SnapshotStrategy::EveryEvents(2),
    );
    let mut ids = Vec::new();
    for i in 0..200 {
        let id = Uuid::new_v4();
        let mut order = orders.inner().create_new(id);
        order.create(&format!("customer-{}", i % 5), 10.0 + i as f64)?;
        order.ship(&format!("TRACK-{i}"))?;
        orders.save(&mut order).await?;
        ids.push(id);
    }
    println!("stored 200 orders (400 events)");

    // Two subscriptions from the beginning: they catch up, then follow live appends.
    let counter = Arc::new(EventCounter::default());
    let mut manager = SubscriptionManager::new(store.clone());
    let revenue = manager.add_read_model(
        "revenue-by-customer",
        RevenueByCustomer,
        SubscriptionOptions::default(),
    )?;
    let counting = manager.add_projector(
        "event-counter",
        counter.clone(),
        SubscriptionOptions::default(),
    )?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(async move {
        manager
            .run_until(async {
                let _ = stopped.await;
            })
            .await;
    });
    wait_live(&[&revenue, &counting]).await?;
    println!(
        "caught up: revenue model {:?} (lag {}), counter {:?} saw {} events",
        revenue.status().state,
        revenue.lag().await?,
        counting.status().state,
        counter.0.load(Ordering::Relaxed)
    );

    // A live order: both subscriptions are woken by the store's notification.
    let mut order = orders.inner().create_new(Uuid::new_v4());
    order.create("customer-0", 1000.0)?;
    orders.save(&mut order).await?;
    wait_live(&[&revenue, &counting]).await?;
    println!(
        "after a live order: counter saw {} events",
        counter.0.load(Ordering::Relaxed)
    );
    let rows: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT customer_id, orders, revenue FROM example_projection.revenue ORDER BY customer_id",
    )
    .fetch_all(store.pool())
    .await?;
    println!("revenue by customer after one live order:");
    for (customer, n, total) in rows {
        println!("  {customer}: {n} orders, ${total:.2}");
    }

    // Loading from snapshots: the newest snapshot, then the events after it.
    let loaded = orders.load(ids[7]).await?;
    println!(
        "order {} loaded at version {} ({} loads from a snapshot, {} snapshots taken)",
        ids[7],
        loaded.version(),
        orders.stats().loaded(),
        orders.stats().taken()
    );

    stop.send(()).ok();
    running.await?;
    Ok(())
}

/// Waits until every subscription follows live with nothing left to read.
async fn wait_live(handles: &[&SubscriptionHandle]) -> Result<(), Error> {
    for _ in 0..3000 {
        let mut caught_up = true;
        for h in handles {
            caught_up &= h.status().state == SubscriptionState::Live && h.lag().await? == 0;
        }
        if caught_up {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err("timed out waiting for the subscriptions".into())
}

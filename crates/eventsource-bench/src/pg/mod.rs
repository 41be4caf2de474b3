//! PostgreSQL workloads: the event store's appends ([`append`]), a catch-up subscription
//! ([`catchup`]) and the outbox relay ([`relay`]), each next to the raw limit of the same
//! PostgreSQL measured in the same run.
//!
//! Every run works in a schema of its own (`bench_<tag>_<random>`), dropped at the end. The
//! raw limits write the same rows into a table made `LIKE` the events table `INCLUDING ALL`
//! (same columns, defaults and indexes), so they pay the same index maintenance.

mod append;
mod catchup;
mod relay;

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_postgres::{PostgresEventStore, PostgresStoreConfig};
use serde_json::Value as Json;
use sqlx::PgPool;
use uuid::Uuid;

use crate::{Error, Options, one};

pub(crate) use catchup::{CatchupArgs, run_role as run_catchup_role};

/// Runs one PostgreSQL workload.
pub(crate) async fn workload(o: &Options, name: &str) -> Result<Vec<(String, Json)>, Error> {
    match name {
        "pg_catchup" => one(name, catchup::workload(o).await),
        "outbox_relay" => one(name, relay::workload(o).await),
        _ => append::workload(o, name).await,
    }
}

/// A schema of its own, dropped by [`Schema::drop_now`].
pub(super) struct Schema {
    pub(super) name: String,
    pub(super) pool: PgPool,
}

impl Schema {
    pub(super) fn unique(tag: &str) -> String {
        format!("bench_{tag}_{}", &Uuid::new_v4().simple().to_string()[..10])
    }

    pub(super) async fn drop_now(self) {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.name
        )))
        .execute(&self.pool)
        .await;
        self.pool.close().await;
    }
}

pub(super) async fn open_store(
    o: &Options,
    schema: &str,
    config: PostgresStoreConfig,
) -> Result<PostgresEventStore, Error> {
    let store = PostgresEventStore::connect(
        &o.database_url,
        PostgresStoreConfig {
            schema: schema.into(),
            ..config
        },
    )
    .await?;
    Ok(store)
}

/// Events of new aggregates, each at version 1.
pub(super) fn singles(n: usize) -> Vec<EventEnvelope> {
    (0..n).map(crate::fixture::event).collect()
}

/// `batches` aggregates of 100 events each (versions 1..=100).
pub(super) fn batches(batches: usize) -> Vec<Vec<EventEnvelope>> {
    (0..batches)
        .map(|b| {
            let aggregate = Uuid::new_v4();
            (1..=100u64)
                .map(|v| {
                    Event::new(
                        aggregate,
                        OrderCreated {
                            customer_id: format!("cust-{b}-{v}"),
                            total_amount: v as f64,
                        },
                    )
                    .with_aggregate_version(v)
                    .into_envelope()
                })
                .collect()
        })
        .collect()
}

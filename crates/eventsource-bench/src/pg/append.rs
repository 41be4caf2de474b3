//! The append workloads (`pg_append_1`, `pg_append_16`, `pg_append_batch100`): the store's
//! appends next to `INSERT`s of the same rows into a copy of the events table.

use std::sync::Arc;
use std::time::Instant;

use eventsource_core::prelude::*;
use eventsource_core::store::{EventStore, ExpectedVersion};
use eventsource_postgres::{PostgresEventStore, PostgresStoreConfig};
use serde_json::{Value as Json, json};
use sqlx::PgPool;
use uuid::Uuid;

use super::{Schema, batches, open_store, singles};
use crate::stats::throughput_json;
use crate::{Error, Options};

/// The raw table: the events table's shape, defaults and indexes.
async fn raw_table(store: &PostgresEventStore) -> Result<String, Error> {
    let events = store.events_table();
    let raw = format!("{events}_raw");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {raw} (LIKE {events} INCLUDING ALL)"
    )))
    .execute(store.pool())
    .await?;
    Ok(raw)
}

/// One row as the raw `INSERT` binds it (the same values the store writes).
struct RawRow {
    id: Uuid,
    aggregate_id: Uuid,
    version: i64,
    event_type: String,
    occurred: chrono::DateTime<chrono::Utc>,
    payload: Json,
}

impl RawRow {
    fn of(e: &EventEnvelope) -> Result<Self, Error> {
        let m = e.metadata();
        Ok(Self {
            id: m.event_id,
            aggregate_id: m.aggregate_id,
            version: m.aggregate_version as i64,
            event_type: m.event_type.clone(),
            occurred: m.occurred_at,
            payload: e.to_json_value()?,
        })
    }
}

const RAW_COLUMNS: &str = "event_id, aggregate_id, aggregate_type, version, event_type, tenant_id, actor_id, occurred_at, payload";

async fn raw_insert_one(pool: &PgPool, sql: &str, r: &RawRow) -> Result<(), Error> {
    sqlx::query(sqlx::AssertSqlSafe(sql.to_owned()))
        .bind(r.id)
        .bind(r.aggregate_id)
        .bind("Order")
        .bind(r.version)
        .bind(&r.event_type)
        .bind(None::<Uuid>)
        .bind(None::<String>)
        .bind(r.occurred)
        .bind(&r.payload)
        .execute(pool)
        .await?;
    Ok(())
}

/// One event per append (each a transaction), `writers` tasks on different aggregates, next
/// to one-row `INSERT`s (autocommit) by as many tasks. Returns (store, raw) events/s.
async fn append_singles_run(
    store: &PostgresEventStore,
    raw_pool: &PgPool,
    raw: &str,
    n: usize,
    writers: usize,
) -> Result<(f64, f64), Error> {
    let events = singles(n);
    let per = n.div_ceil(writers);
    let chunks: Vec<Vec<EventEnvelope>> = events.chunks(per).map(<[_]>::to_vec).collect();
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in chunks {
        let store = store.clone();
        tasks.spawn(async move {
            for e in &chunk {
                store
                    .append(
                        e.aggregate_id(),
                        "Order",
                        std::slice::from_ref(e),
                        ExpectedVersion::NoStream,
                    )
                    .await?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let store_rate = n as f64 / t.elapsed().as_secs_f64();

    let rows: Vec<RawRow> = singles(n)
        .iter()
        .map(RawRow::of)
        .collect::<Result<_, _>>()?;
    let sql =
        format!("INSERT INTO {raw} ({RAW_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)");
    let rows = Arc::new(rows);
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..writers {
        let (pool, sql, rows) = (raw_pool.clone(), sql.clone(), rows.clone());
        tasks.spawn(async move {
            for r in rows.iter().skip(w * per).take(per) {
                raw_insert_one(&pool, &sql, r).await?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let raw_rate = n as f64 / t.elapsed().as_secs_f64();
    Ok((store_rate, raw_rate))
}

/// Appends of 100 events to one aggregate next to one 100-row `INSERT ... VALUES`.
async fn append_batches_run(
    store: &PostgresEventStore,
    raw: &str,
    n_batches: usize,
) -> Result<(f64, f64), Error> {
    let data = batches(n_batches);
    let t = Instant::now();
    for batch in &data {
        store
            .append(
                batch[0].aggregate_id(),
                "Order",
                batch,
                ExpectedVersion::NoStream,
            )
            .await?;
    }
    let store_rate = (n_batches * 100) as f64 / t.elapsed().as_secs_f64();

    let rows: Vec<Vec<RawRow>> = batches(n_batches)
        .iter()
        .map(|b| b.iter().map(RawRow::of).collect::<Result<_, _>>())
        .collect::<Result<_, _>>()?;
    let values: Vec<String> = (0..100)
        .map(|i| {
            let p = i * 9;
            format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}, ${})",
                p + 1,
                p + 2,
                p + 3,
                p + 4,
                p + 5,
                p + 6,
                p + 7,
                p + 8,
                p + 9
            )
        })
        .collect();
    let sql = format!(
        "INSERT INTO {raw} ({RAW_COLUMNS}) VALUES {}",
        values.join(", ")
    );
    let pool = store.pool();
    let t = Instant::now();
    for batch in &rows {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
        for r in batch {
            q = q
                .bind(r.id)
                .bind(r.aggregate_id)
                .bind("Order")
                .bind(r.version)
                .bind(&r.event_type)
                .bind(None::<Uuid>)
                .bind(None::<String>)
                .bind(r.occurred)
                .bind(&r.payload);
        }
        q.execute(pool).await?;
    }
    let raw_rate = (n_batches * 100) as f64 / t.elapsed().as_secs_f64();
    Ok((store_rate, raw_rate))
}

/// Runs one append workload; `pg_append_16` also reports `pg_append_16_pool16` and
/// `pg_append_16_serialized`.
pub(super) async fn workload(o: &Options, name: &str) -> Result<Vec<(String, Json)>, Error> {
    let mut out = Vec::new();
    match name {
        "pg_append_1" | "pg_append_16" => {
            let writers = if name == "pg_append_1" { 1 } else { 16 };
            let n = o.n.unwrap_or(if writers == 1 { 3_000 } else { 8_000 });
            // The default configuration (pool of 10), and for 16 writers also a pool of 16 (the
            // raw side always has one connection per writer) and serialised appends.
            let mut configs = vec![("default", PostgresStoreConfig::default())];
            if writers > 1 {
                configs.push((
                    "pool16",
                    PostgresStoreConfig {
                        max_connections: 16,
                        ..Default::default()
                    },
                ));
                // The old design for comparison: every append under one lock to its commit.
                configs.push((
                    "serialized",
                    PostgresStoreConfig {
                        serialize_appends: true,
                        ..Default::default()
                    },
                ));
            }
            for (label, config) in configs {
                let (mut store_rates, mut raw_rates) = (vec![], vec![]);
                for run in 1..=o.repeat {
                    let schema = Schema::unique("append");
                    let store = open_store(o, &schema, config.clone()).await?;
                    let raw = raw_table(&store).await?;
                    let raw_pool = sqlx::postgres::PgPoolOptions::new()
                        .max_connections(writers as u32)
                        .connect(&o.database_url)
                        .await?;
                    let result = append_singles_run(&store, &raw_pool, &raw, n, writers).await;
                    raw_pool.close().await;
                    Schema {
                        name: schema,
                        pool: store.pool().clone(),
                    }
                    .drop_now()
                    .await;
                    let (s, r) = result?;
                    store_rates.push(s);
                    raw_rates.push(r);
                    eprintln!(
                        "  {name} ({label}) run {run}: store {s:>8.0}/s   raw INSERT {r:>8.0}/s   ratio {:.2}",
                        s / r
                    );
                }
                let mut j = throughput_json(&store_rates, Some(&raw_rates));
                j["n"] = json!(n);
                j["writers"] = json!(writers);
                j["config"] = json!(format!(
                    "PostgresStoreConfig {label} (max_connections {}, serialize_appends {}), one event per append, \
                     ExpectedVersion::NoStream, new aggregate each; raw: one-row INSERT per \
                     statement (autocommit), {writers} connection(s)",
                    config.max_connections, config.serialize_appends
                ));
                let key = if label == "default" {
                    name.to_owned()
                } else {
                    format!("{name}_{label}")
                };
                out.push((key, j));
            }
        }
        _ => {
            let n_batches = o.n.map_or(200, |n| (n / 100).max(1));
            let (mut store_rates, mut raw_rates) = (vec![], vec![]);
            for run in 1..=o.repeat {
                let schema = Schema::unique("batch");
                let store = open_store(o, &schema, PostgresStoreConfig::default()).await?;
                let raw = raw_table(&store).await?;
                let result = append_batches_run(&store, &raw, n_batches).await;
                Schema {
                    name: schema,
                    pool: store.pool().clone(),
                }
                .drop_now()
                .await;
                let (s, r) = result?;
                store_rates.push(s);
                raw_rates.push(r);
                eprintln!(
                    "  {name} run {run}: store {s:>8.0}/s   raw 100-row INSERT {r:>8.0}/s   ratio {:.2}",
                    s / r
                );
            }
            let mut j = throughput_json(&store_rates, Some(&raw_rates));
            j["n"] = json!(n_batches * 100);
            j["config"] = json!(
                "PostgresStoreConfig default; 100 events of one new aggregate per append; raw: one 100-row INSERT ... VALUES per statement"
            );
            out.push((name.to_owned(), j));
        }
    }
    Ok(out)
}

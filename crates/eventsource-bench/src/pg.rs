//! PostgreSQL workloads: the event store's appends, a catch-up subscription and the outbox
//! relay, each next to the raw limit of the same PostgreSQL measured in the same run.
//!
//! Every run works in a schema of its own (`bench_<tag>_<random>`), dropped at the end. The
//! raw limits write the same rows into a table made `LIKE` the events table `INCLUDING ALL`
//! (same columns, defaults and indexes), so they pay the same index maintenance.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use eventsource_core::BoxFuture;
use eventsource_core::prelude::*;
use eventsource_core::store::{EventStore, ExpectedVersion, StoredEvent};
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_postgres::{
    OutboxRelay, PostgresEventStore, PostgresStoreConfig, Projector, RelayConfig,
    SubscriptionManager, SubscriptionOptions,
};
use eventsource_redis::RedisEventBus;
use serde_json::{Value as Json, json};
use sqlx::PgPool;
use uuid::Uuid;

use crate::{Error, Options, now_us, stat, stat_json, throughput_json};

/// The PostgreSQL workloads (`--workload NAME`).
pub(crate) const WORKLOADS: [&str; 5] = [
    "pg_append_1",
    "pg_append_16",
    "pg_append_batch100",
    "pg_catchup",
    "outbox_relay",
];

/// A schema of its own, dropped by [`Schema::drop_now`].
struct Schema {
    name: String,
    pool: PgPool,
}

impl Schema {
    fn unique(tag: &str) -> String {
        format!("bench_{tag}_{}", &Uuid::new_v4().simple().to_string()[..10])
    }

    async fn drop_now(self) {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.name
        )))
        .execute(&self.pool)
        .await;
        self.pool.close().await;
    }
}

async fn open_store(
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

/// Events of new aggregates, each at version 1.
fn singles(n: usize) -> Vec<EventEnvelope> {
    (0..n).map(crate::event).collect()
}

/// `batches` aggregates of 100 events each (versions 1..=100).
fn batches(batches: usize) -> Vec<Vec<EventEnvelope>> {
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

async fn append_workload(o: &Options, name: &str) -> Result<Vec<(String, Json)>, Error> {
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

// ---------------------------------------------------------------------------------------
// Catch-up
// ---------------------------------------------------------------------------------------

/// Writes `n` stored events (new aggregates, `OrderCreated`) straight into the events table,
/// 100,000 rows per statement.
async fn prefill_store(store: &PostgresEventStore, n: usize) -> Result<(), Error> {
    let template = crate::event(0).to_json_value()?;
    let sql = format!(
        "INSERT INTO {events} (event_id, aggregate_id, aggregate_type, version, event_type, \
                               occurred_at, payload) \
         SELECT id, agg, 'Order', 1, 'OrderCreated', now(), \
                $1::jsonb || jsonb_build_object('event_id', id::text, 'aggregate_id', agg::text, \
                                                'customer_id', 'cust-' || g, 'total_amount', g) \
         FROM (SELECT g, gen_random_uuid() AS id, gen_random_uuid() AS agg \
               FROM generate_series($2::bigint, $3::bigint) g) s",
        events = store.events_table()
    );
    let mut done = 0usize;
    while done < n {
        let upto = (done + 100_000).min(n);
        sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
            .bind(&template)
            .bind(done as i64 + 1)
            .bind(upto as i64)
            .execute(store.pool())
            .await?;
        done = upto;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ANALYZE {}",
        store.events_table()
    )))
    .execute(store.pool())
    .await?;
    Ok(())
}

/// An in-memory projection whose state does not grow with the events (counts and a sum), so
/// the memory figure is the subscription's own.
struct Totals {
    events: AtomicU64,
    amount_cents: AtomicU64,
    target: u64,
    reached: tokio::sync::Notify,
}

impl Projector for Totals {
    fn handle<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), eventsource_postgres::ProjectionError>> {
        Box::pin(async move {
            for e in events {
                let amount = e
                    .event
                    .data::<OrderCreated>()?
                    .map_or(0.0, |order| order.total_amount);
                self.amount_cents
                    .fetch_add((amount * 100.0) as u64, Ordering::Relaxed);
            }
            let seen = self
                .events
                .fetch_add(events.len() as u64, Ordering::Relaxed)
                + events.len() as u64;
            if seen >= self.target {
                self.reached.notify_one();
            }
            Ok(())
        })
    }
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The hidden `--role pg-catchup` child: `--database-url U --schema S --count K --mode
/// subscription|feed|raw` (a subscription, the store's `read_feed` alone, raw SQL); reads the
/// first K events and prints `{events_per_sec, vmhwm_kib}`.
pub(crate) async fn catchup_role(args: &[String]) -> Result<Json, Error> {
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or(format!("missing {name}"))
    };
    let url = get("--database-url")?;
    let schema = get("--schema")?;
    let count: u64 = get("--count")?.parse()?;
    let mode = get("--mode")?;
    let store = PostgresEventStore::connect(
        &url,
        PostgresStoreConfig {
            schema,
            ..Default::default()
        },
    )
    .await?;
    let options = SubscriptionOptions::default();
    let t = Instant::now();
    let read = if mode == "raw" {
        // The raw limit: keyset pages of the same size over the same rows and columns,
        // nothing decoded beyond the driver's own types.
        let sql = format!(
            "SELECT position, stored_at, payload::text, tx::text FROM {} \
             WHERE position > $1 ORDER BY position LIMIT $2",
            store.events_table()
        );
        let mut after = 0i64;
        let mut read = 0u64;
        let mut bytes = 0usize;
        while read < count {
            let rows: Vec<(i64, chrono::DateTime<chrono::Utc>, String, String)> =
                sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                    .bind(after)
                    .bind(options.page_size as i64)
                    .fetch_all(store.pool())
                    .await?;
            let Some(last) = rows.last() else { break };
            after = last.0;
            read += rows.len() as u64;
            bytes += rows.iter().map(|r| r.2.len()).sum::<usize>();
        }
        std::hint::black_box(bytes);
        read
    } else if mode == "feed" {
        // The store's feed read page by page, decoded into events, no subscription around it.
        let mut cursor = eventsource_postgres::StoreCursor::START;
        let mut read = 0u64;
        while read < count {
            let page = store
                .read_feed(
                    cursor,
                    &eventsource_postgres::FeedFilter::default(),
                    options.page_size,
                )
                .await?;
            let Some(&(last, _)) = page.last() else { break };
            cursor = last;
            read += page.len() as u64;
            std::hint::black_box(&page);
        }
        read
    } else {
        let totals = Arc::new(Totals {
            events: AtomicU64::new(0),
            amount_cents: AtomicU64::new(0),
            target: count,
            reached: tokio::sync::Notify::new(),
        });
        let mut manager = SubscriptionManager::new(store.clone());
        manager.add_projector(format!("bench-{}", now_us()), totals.clone(), options);
        let reached = totals.clone();
        manager
            .run_until(async move { reached.reached.notified().await })
            .await;
        std::hint::black_box(totals.amount_cents.load(Ordering::Relaxed));
        totals.events.load(Ordering::Relaxed)
    };
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({
        "read": read,
        "events_per_sec": read as f64 / secs,
        "vmhwm_kib": peak_rss_kib(),
    }))
}

async fn catchup_child(o: &Options, schema: &str, count: usize, mode: &str) -> Result<Json, Error> {
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--role", "pg-catchup", "--database-url", &o.database_url])
        .args([
            "--schema",
            schema,
            "--count",
            &count.to_string(),
            "--mode",
            mode,
        ])
        .kill_on_drop(true)
        .output()
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Json = serde_json::from_str(text.lines().last().unwrap_or("{}"))?;
    if let Some(e) = report.get("error") {
        return Err(format!("pg-catchup child: {e}").into());
    }
    if report["read"].as_u64().unwrap_or(0) < count as u64 {
        return Err(format!("pg-catchup child read {} of {count}", report["read"]).into());
    }
    Ok(report)
}

async fn catchup_workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(1_000_000);
    let small = (n / 10).max(1);
    let schema = Schema::unique("catchup");
    let store = open_store(o, &schema, PostgresStoreConfig::default()).await?;
    eprintln!("  pg_catchup: writing {n} events");
    let t = Instant::now();
    prefill_store(&store, n).await?;
    eprintln!(
        "  pg_catchup: written in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let result = async {
        let (mut sub, mut raw, mut rss) = (vec![], vec![], vec![]);
        for run in 1..=o.repeat {
            let s = catchup_child(o, &schema, n, "subscription").await?;
            let r = catchup_child(o, &schema, n, "raw").await?;
            let (sr, rr) = (
                s["events_per_sec"].as_f64().unwrap_or(0.0),
                r["events_per_sec"].as_f64().unwrap_or(0.0),
            );
            let m = s["vmhwm_kib"].as_f64().unwrap_or(0.0) / 1024.0;
            eprintln!(
                "  pg_catchup run {run}: subscription {sr:>8.0}/s (peak RSS {m:.1} MiB)   raw paged SELECT {rr:>8.0}/s   ratio {:.2}",
                sr / rr
            );
            sub.push(sr);
            raw.push(rr);
            rss.push(m);
        }
        let few = catchup_child(o, &schema, small, "subscription").await?;
        let few_rss = few["vmhwm_kib"].as_f64().unwrap_or(0.0) / 1024.0;
        eprintln!("  pg_catchup: peak RSS after {small} events {few_rss:.1} MiB");
        let mut j = throughput_json(&sub, Some(&raw));
        let m = stat(&rss);
        j["n"] = json!(n);
        j["peak_rss_mib"] = json!((m.median * 10.0).round() / 10.0);
        j["peak_rss_mib_at_tenth"] = json!({"events": small, "mib": (few_rss * 10.0).round() / 10.0});
        j["config"] = json!(
            "SubscriptionOptions default (page 500), a projector keeping counts in memory, in a child process from the beginning; raw: SELECT position, stored_at, payload::text, tx::text ... WHERE position > $1 ORDER BY position LIMIT 500 (no decoding), same rows"
        );
        Ok::<_, Error>(j)
    }
    .await;
    Schema {
        name: schema,
        pool: store.pool().clone(),
    }
    .drop_now()
    .await;
    result
}

// ---------------------------------------------------------------------------------------
// Outbox relay
// ---------------------------------------------------------------------------------------

async fn outbox_bus(o: &Options, prefix: &str) -> Result<RedisEventBus, Error> {
    let bus = RedisEventBus::new(
        crate::profile_config(
            crate::Profile::NoTracing,
            &o.redis_url,
            prefix,
            "bench",
            "relay",
        ),
        crate::registry(),
    )?;
    bus.connect().await?;
    Ok(bus)
}

async fn xlen(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Result<u64, Error> {
    Ok(redis::cmd("XLEN").arg(stream).query_async(conn).await?)
}

/// Runs a relay on a thread of its own (as its own process would) until `stop` is notified.
fn spawn_relay(
    store: PostgresEventStore,
    bus: RedisEventBus,
    stop: Arc<tokio::sync::Notify>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let relay = OutboxRelay::new(store, Arc::new(bus), RelayConfig::default());
            relay.run_until(async move { stop.notified().await }).await;
        });
    })
}

async fn outbox_workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(20_000);
    let (mut rates, mut p50s, mut p99s, mut maxs) = (vec![], vec![], vec![], vec![]);
    let mut conn = crate::raw_conn(&o.redis_url).await?;
    for run in 1..=o.repeat {
        let schema = Schema::unique("outbox");
        let store = open_store(
            o,
            &schema,
            PostgresStoreConfig {
                outbox: true,
                ..Default::default()
            },
        )
        .await?;
        let p = crate::prefix("outbox");
        let stream = format!("{p}:stream");
        let result = async {
            // Throughput: n committed events waiting, then the relay drains them.
            for batch in batches(n.div_ceil(100)) {
                store
                    .append(
                        batch[0].aggregate_id(),
                        "Order",
                        &batch,
                        ExpectedVersion::NoStream,
                    )
                    .await?;
            }
            let total = n.div_ceil(100) * 100;
            let stop = Arc::new(tokio::sync::Notify::new());
            let t = Instant::now();
            let relay = spawn_relay(store.clone(), outbox_bus(o, &p).await?, stop.clone());
            let deadline = Instant::now() + Duration::from_secs(300);
            while xlen(&mut conn, &stream).await? < total as u64 {
                if Instant::now() > deadline {
                    return Err::<_, Error>("outbox drain timed out".into());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let rate = total as f64 / t.elapsed().as_secs_f64();

            // Latency at 500 events/s: commit (the append returned) to the entry being read
            // from the stream by a blocked XREAD.
            let latency_n = 2_000usize;
            let sent: Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>> =
                Arc::default();
            let samples = Arc::new(std::sync::Mutex::new(Vec::with_capacity(latency_n)));
            let reader = tokio::spawn({
                let (url, stream, sent, samples) = (
                    o.redis_url.clone(),
                    stream.clone(),
                    sent.clone(),
                    samples.clone(),
                );
                async move {
                    let client = redis::Client::open(url)?;
                    let mut c = client
                        .get_multiplexed_async_connection_with_config(
                            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
                        )
                        .await?;
                    let mut last = "$".to_owned();
                    let mut pending: Vec<(String, u64)> = Vec::new();
                    while samples.lock().expect("not poisoned").len() < latency_n {
                        let reply: redis::streams::StreamReadReply = redis::cmd("XREAD")
                            .arg("BLOCK")
                            .arg(1000)
                            .arg("STREAMS")
                            .arg(&stream)
                            .arg(&last)
                            .query_async(&mut c)
                            .await?;
                        let now = now_us();
                        for key in reply.keys {
                            for entry in key.ids {
                                last = entry.id.clone();
                                if let Some(id) = entry.get::<String>("event_id") {
                                    pending.push((id, now));
                                }
                            }
                        }
                        let sent = sent.lock().expect("not poisoned");
                        let mut s = samples.lock().expect("not poisoned");
                        pending.retain(|(id, at)| match sent.get(id) {
                            Some(committed) => {
                                s.push(at.saturating_sub(*committed));
                                false
                            }
                            None => true,
                        });
                    }
                    Ok::<_, Error>(())
                }
            });
            tokio::time::sleep(Duration::from_millis(200)).await;
            let events = singles(latency_n);
            let t0 = Instant::now();
            for (i, e) in events.iter().enumerate() {
                tokio::time::sleep_until((t0 + Duration::from_secs_f64(i as f64 / 500.0)).into())
                    .await;
                store
                    .append(
                        e.aggregate_id(),
                        "Order",
                        std::slice::from_ref(e),
                        ExpectedVersion::NoStream,
                    )
                    .await?;
                sent.lock()
                    .expect("not poisoned")
                    .insert(e.event_id().to_string(), now_us());
            }
            tokio::time::timeout(Duration::from_secs(60), reader).await???;
            stop.notify_one();
            let _ = tokio::task::spawn_blocking(move || relay.join()).await;
            let mut v = samples.lock().expect("not poisoned").clone();
            v.sort_unstable();
            let pct = |q: f64| {
                v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0
            };
            Ok((
                rate,
                pct(0.50),
                pct(0.99),
                *v.last().unwrap_or(&0) as f64 / 1000.0,
            ))
        }
        .await;
        crate::delete_prefix(&mut conn, &p).await;
        Schema {
            name: schema,
            pool: store.pool().clone(),
        }
        .drop_now()
        .await;
        let (rate, p50, p99, max) = result?;
        eprintln!(
            "  outbox_relay run {run}: {rate:>8.0} events/s to the stream   at 500/s: p50 {p50:.2} ms  p99 {p99:.2} ms  max {max:.2} ms"
        );
        rates.push(rate);
        p50s.push(p50);
        p99s.push(p99);
        maxs.push(max);
    }
    let ms = |v: &[f64]| {
        let s = stat(v);
        json!({"median": (s.median * 100.0).round() / 100.0, "min": (s.min * 100.0).round() / 100.0, "max": (s.max * 100.0).round() / 100.0})
    };
    Ok(json!({
        "events_per_sec": stat_json(stat(&rates)),
        "n": n,
        "latency_500": {"p50_ms": ms(&p50s), "p99_ms": ms(&p99s), "max_ms": ms(&maxs)},
        "config": "RelayConfig default (batch 100, LISTEN/NOTIFY wake-up), publishing through RedisEventBus (tracing off) on its own thread; throughput: n events committed first (appends of 100), then drained; latency: one event per append at 500/s, from the append returning to a blocked XREAD receiving the entry",
    }))
}

/// Runs one PostgreSQL workload.
pub(crate) async fn workload(o: &Options, name: &str) -> Result<Vec<(String, Json)>, Error> {
    match name {
        "pg_catchup" => crate::one(name, catchup_workload(o).await),
        "outbox_relay" => crate::one(name, outbox_workload(o).await),
        _ => append_workload(o, name).await,
    }
}

//! The catch-up workload (`pg_catchup`): a subscription from the beginning over stored events
//! into an in-memory projection, in a child process (this binary with the hidden
//! `--role pg-catchup`, so the peak RSS is its own), next to a raw paged `SELECT`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use clap::Args;
use eventsource_core::BoxFuture;
use eventsource_core::store::StoredEvent;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_postgres::{
    PostgresEventStore, PostgresStoreConfig, Projector, SubscriptionManager, SubscriptionOptions,
};
use serde_json::{Value as Json, json};

use super::{Schema, open_store};
use crate::fixture::{event, now_us, peak_rss_kib};
use crate::stats::{stat, throughput_json};
use crate::{Error, Options};

/// Writes `n` stored events (new aggregates, `OrderCreated`) straight into the events table,
/// 100,000 rows per statement.
async fn prefill_store(store: &PostgresEventStore, n: usize) -> Result<(), Error> {
    let template = event(0).to_json_value()?;
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

/// The arguments of the hidden `--role pg-catchup` child (written by [`catchup_child`]).
#[derive(Debug, Clone, Args)]
pub(crate) struct CatchupArgs {
    /// The PostgreSQL holding the events.
    #[arg(long)]
    database_url: String,
    /// The schema of the run's store.
    #[arg(long)]
    schema: String,
    /// Events to read from the beginning.
    #[arg(long)]
    count: u64,
    /// What reads them: a subscription, the store's `read_feed` alone, or raw SQL.
    #[arg(long, value_parser = ["subscription", "feed", "raw"])]
    mode: String,
}

/// The `pg-catchup` child: runs [`catchup_role`] on the runtime a service gets from
/// `#[tokio::main]` (one worker per core) and returns its report (or `{"error": ...}`) for
/// the parent to read from the last line of standard output.
pub(crate) fn run_role(args: CatchupArgs) -> Json {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(catchup_role(args))
        .unwrap_or_else(|e| json!({"error": e.to_string()}))
}

/// Reads the first `count` events with `mode` and reports `{read, events_per_sec,
/// vmhwm_kib}`.
async fn catchup_role(args: CatchupArgs) -> Result<Json, Error> {
    let CatchupArgs {
        database_url: url,
        schema,
        count,
        mode,
    } = args;
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
        manager
            .add_projector(format!("bench-{}", now_us()), totals.clone(), options)
            .expect("valid subscription");
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

/// Runs `pg_catchup` over `n` stored events (default 1,000,000).
pub(super) async fn workload(o: &Options) -> Result<Json, Error> {
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

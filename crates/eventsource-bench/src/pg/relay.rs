//! The outbox relay workload (`outbox_relay`): events/s from commit to the Redis stream, and
//! commit-to-stream latency at 500 events/s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_core::store::{EventStore, ExpectedVersion};
use eventsource_postgres::{OutboxRelay, PostgresEventStore, PostgresStoreConfig, RelayConfig};
use eventsource_redis::RedisEventBus;
use serde_json::{Value as Json, json};

use super::{Schema, batches, open_store, singles};
use crate::fixture::{Profile, delete_prefix, now_us, prefix, profile_config, raw_conn, registry};
use crate::stats::{stat, stat_json, stat_json_scaled};
use crate::{Error, Options};

async fn outbox_bus(o: &Options, prefix: &str) -> Result<RedisEventBus, Error> {
    let bus = RedisEventBus::new(
        profile_config(Profile::NoTracing, &o.redis_url, prefix, "bench", "relay"),
        registry(),
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

/// Runs `outbox_relay`: `n` events (default 20,000) drained by the relay, then 2,000 at
/// 500 events/s for the latency.
pub(super) async fn workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(20_000);
    let (mut rates, mut p50s, mut p99s, mut maxs) = (vec![], vec![], vec![], vec![]);
    let mut conn = raw_conn(&o.redis_url).await?;
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
        let p = prefix("outbox");
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
        delete_prefix(&mut conn, &p).await;
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
    let ms = |v: &[f64]| stat_json_scaled(v, 100.0);
    Ok(json!({
        "events_per_sec": stat_json(stat(&rates)),
        "n": n,
        "latency_500": {"p50_ms": ms(&p50s), "p99_ms": ms(&p99s), "max_ms": ms(&maxs)},
        "config": "RelayConfig default (batch 100, LISTEN/NOTIFY wake-up), publishing through RedisEventBus (tracing off) on its own thread; throughput: n events committed first (appends of 100), then drained; latency: one event per append at 500/s, from the append returning to a blocked XREAD receiving the entry",
    }))
}

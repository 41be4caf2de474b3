//! The latency workloads (`latency_500`, `latency_5000`): publish-to-handler latency at a
//! fixed publishing rate, one publisher and one consumer bus in this process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::RedisEventBus;
use serde_json::{Value as Json, json};

use crate::fixture::{bus_config, delete_prefix, event, now_us, prefix, raw_conn, registry};
use crate::stats::stat_json_scaled;
use crate::{Error, Options};

/// Publishes `n` events one at a time at `rate` events/s; reports the percentiles of the time
/// from publishing to the handler running, milliseconds.
pub(crate) async fn workload(o: &Options, rate: u64) -> Result<Json, Error> {
    let n = o.n.unwrap_or(if rate <= 500 { 2_000 } else { 10_000 });
    let mut p50s = vec![];
    let mut p95s = vec![];
    let mut p99s = vec![];
    let mut maxs = vec![];
    for run in 1..=o.repeat {
        let p = prefix("latency");
        let consumer = RedisEventBus::new(bus_config(&o.redis_url, &p, "bench", "c"), registry())?;
        let publisher = RedisEventBus::new(bus_config(&o.redis_url, &p, "bench", "p"), registry())?;
        let samples = Arc::new(std::sync::Mutex::new(Vec::with_capacity(n)));
        let s = samples.clone();
        consumer.subscribe(move |e: Event<OrderCreated>| {
            let s = s.clone();
            async move {
                let now = now_us();
                let sent = e.total_amount as u64;
                s.lock()
                    .expect("not poisoned")
                    .push(now.saturating_sub(sent));
            }
        });
        consumer.connect().await?;
        publisher.connect().await?;
        let task = tokio::spawn({
            let c = consumer.clone();
            async move { c.start_consuming().await }
        });
        // Events built before the clock starts; the send time goes into total_amount.
        let mut events: Vec<EventEnvelope> = (0..n).map(event).collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let t0 = Instant::now();
        for (i, e) in events.iter_mut().enumerate() {
            let due = t0 + Duration::from_secs_f64(i as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
            let mut typed = e.to_event::<OrderCreated>()?.expect("OrderCreated");
            typed.data_mut().total_amount = now_us() as f64;
            publisher.publish_events(&[typed.into_envelope()]).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while samples.lock().expect("not poisoned").len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        consumer.stop_consuming();
        task.await??;
        let mut conn = raw_conn(&o.redis_url).await?;
        delete_prefix(&mut conn, &p).await;
        let mut v = samples.lock().expect("not poisoned").clone();
        if v.len() < n {
            return Err(format!("latency: {} of {n} events arrived", v.len()).into());
        }
        v.sort_unstable();
        let pct = |q: f64| {
            v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1] as f64 / 1000.0
        };
        p50s.push(pct(0.50));
        p95s.push(pct(0.95));
        p99s.push(pct(0.99));
        maxs.push(*v.last().expect("non-empty") as f64 / 1000.0);
        eprintln!(
            "  latency_{rate} run {run}: p50 {:.3} ms  p95 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            p50s[run - 1],
            p95s[run - 1],
            p99s[run - 1],
            maxs[run - 1]
        );
    }
    let ms = |v: &[f64]| stat_json_scaled(v, 1000.0);
    Ok(
        json!({"rate_per_sec": rate, "n": n, "p50_ms": ms(&p50s), "p95_ms": ms(&p95s), "p99_ms": ms(&p99s), "max_ms": ms(&maxs)}),
    )
}

//! The publishing workloads (`publish_single`, `publish_batch100`, `publish_concurrent16`):
//! the bus publishing in process, next to XADD one at a time or pipelined.

use std::time::Instant;

use eventsource_core::prelude::*;
use eventsource_redis::RedisEventBus;
use eventsource_redis::codec::encode_fields;
use serde_json::{Value as Json, json};

use crate::fixture::{Profile, delete_prefix, event, prefix, profile_config, raw_conn, registry};
use crate::limits::{raw_pipelined, raw_single};
use crate::stats::{median_ratio, stat, stat_json, throughput_json};
use crate::{Error, Options};

/// Publishes `events` with `chunk` events per call (`tasks` concurrent publishers).
async fn bus_publish(
    url: &str,
    events: &[EventEnvelope],
    chunk: usize,
    tasks: usize,
    profile: Profile,
) -> Result<f64, Error> {
    let p = prefix("publish");
    let bus = RedisEventBus::new(
        profile_config(profile, url, &p, "bench", "publisher"),
        registry(),
    )?;
    bus.connect().await?;
    let per_task = events.len().div_ceil(tasks);
    let parts: Vec<Vec<EventEnvelope>> = events.chunks(per_task).map(<[_]>::to_vec).collect();
    let t = Instant::now();
    let mut handles = Vec::new();
    for part in parts {
        let bus = bus.clone();
        handles.push(tokio::spawn(async move {
            for c in part.chunks(chunk) {
                bus.publish_events(c).await?;
            }
            Ok::<(), eventsource_redis::RedisBusError>(())
        }));
    }
    for h in handles {
        h.await??;
    }
    let rate = events.len() as f64 / t.elapsed().as_secs_f64();
    if bus.stats().events_published != events.len() as u64 {
        return Err("not every event was published".into());
    }
    let mut conn = raw_conn(url).await?;
    delete_prefix(&mut conn, &p).await;
    Ok(rate)
}

/// Runs one publishing workload; reports `name` (tracing off) and `name@default`.
pub(crate) async fn workload(o: &Options, name: &str) -> Result<Vec<(String, Json)>, Error> {
    let n = o.n.unwrap_or(20_000);
    let events: Vec<EventEnvelope> = (0..n).map(event).collect();
    let fields: Vec<Vec<(&'static str, String)>> = events
        .iter()
        .map(|e| encode_fields(e, None))
        .collect::<Result<_, _>>()?;
    let (mut bus, mut limit, mut single, mut untraced) = (vec![], vec![], vec![], vec![]);
    let url = &o.redis_url;
    for run in 1..=o.repeat {
        // Bus at the default configuration, and with tracing off.
        let (chunk, tasks) = match name {
            "publish_batch100" => (100, 1),
            "publish_single" => (1, 1),
            _ => (1, 16),
        };
        let mut measure_bus = async || -> Result<(), Error> {
            bus.push(bus_publish(url, &events, chunk, tasks, Profile::Default).await?);
            untraced.push(bus_publish(url, &events, chunk, tasks, Profile::NoTracing).await?);
            Ok(())
        };
        match name {
            // The raw limit and the bus alternate which goes first, so neither gains from
            // running second (warm caches) or loses to a noisy neighbour systematically.
            "publish_single" if run % 2 == 1 => {
                limit.push(raw_single(url, &fields).await?);
                measure_bus().await?;
            }
            "publish_single" => {
                measure_bus().await?;
                limit.push(raw_single(url, &fields).await?);
            }
            "publish_batch100" if run % 2 == 1 => {
                limit.push(raw_pipelined(url, &fields).await?);
                measure_bus().await?;
            }
            "publish_batch100" => {
                measure_bus().await?;
                limit.push(raw_pipelined(url, &fields).await?);
            }
            _ => {
                limit.push(raw_single(url, &fields).await?);
                single.push(bus_publish(url, &events, 1, 1, Profile::Default).await?);
                measure_bus().await?;
            }
        }
        eprintln!(
            "  {name} run {run}: bus {:>9.0}/s (tracing off {:>9.0}/s)   limit {:>9.0}/s{}",
            bus[run - 1],
            untraced[run - 1],
            limit[run - 1],
            single
                .get(run - 1)
                .map(|s| format!("   one-at-a-time {s:.0}/s"))
                .unwrap_or_default()
        );
    }
    // `name`: the workload's settings (tracing off); `name@default`: the library's defaults.
    let mut out = throughput_json(&untraced, Some(&limit));
    out["n"] = json!(n);
    out["config"] = json!("enable_tracing: false");
    let mut default = throughput_json(&bus, Some(&limit));
    default["n"] = json!(n);
    default["config"] = json!("RedisEventBusConfig::default() (tracing on)");
    if !single.is_empty() {
        out["single_events_per_sec"] = stat_json(stat(&single));
        out["ratio_to_single"] = json!(median_ratio(&bus, &single, 100.0));
        out["limit_is"] = json!("XADD one at a time on one connection");
    } else if name == "publish_single" {
        out["limit_is"] = json!("XADD one at a time on one connection");
    } else {
        out["limit_is"] = json!("XADD pipelined 100 at a time on one connection");
    }
    default["limit_is"] = out["limit_is"].clone();
    Ok(vec![
        (name.to_owned(), out),
        (format!("{name}@default"), default),
    ])
}

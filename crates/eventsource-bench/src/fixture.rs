//! What the workloads share: the events they send, fresh key prefixes, the bus
//! configurations measured ([`Profile`]), connections to the measured Redis, and the clock and
//! memory readings.

use std::time::{SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::RedisEventBusConfig;
use eventsource_redis::codec::encode_fields;
use redis::aio::MultiplexedConnection;

use crate::Error;

/// Microseconds since the Unix epoch (comparable across the parent and its children).
pub(crate) fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The peak resident set of this process (`VmHWM`), KiB; 0 where `/proc` does not tell.
pub(crate) fn peak_rss_kib() -> u64 {
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

/// The `i`th event of a workload: an `OrderCreated` of a new aggregate.
pub(crate) fn event(i: usize) -> EventEnvelope {
    Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: format!("cust-{i}"),
            total_amount: i as f64 * 1.5,
        },
    )
    .into_envelope()
}

/// A key prefix no other run uses (`bench:<tag>:<random>`).
pub(crate) fn prefix(tag: &str) -> String {
    format!(
        "bench:{tag}:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// How a measured bus is configured (also the consumer child's `--profile`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Profile {
    /// `RedisEventBusConfig::default()` (tracing on, block 2 s, recovery every 30 s).
    #[value(name = "default")]
    Default,
    /// The defaults with `enable_tracing: false`.
    #[value(name = "no-tracing")]
    NoTracing,
    /// Tuned for quick runs where the configuration is not the point (latency, memory,
    /// scaling): tracing off, block 100 ms, recovery off.
    #[value(name = "quick")]
    Quick,
}

impl Profile {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::NoTracing => "no-tracing",
            Self::Quick => "quick",
        }
    }
}

/// A bus at [`Profile::Quick`].
pub(crate) fn bus_config(url: &str, prefix: &str, group: &str, name: &str) -> RedisEventBusConfig {
    profile_config(Profile::Quick, url, prefix, group, name)
}

pub(crate) fn profile_config(
    profile: Profile,
    url: &str,
    prefix: &str,
    group: &str,
    name: &str,
) -> RedisEventBusConfig {
    let base = RedisEventBusConfig::default()
        .redis_url(url)
        .stream_prefix(prefix)
        .consumer_group(group)
        .consumer_name(name);
    match profile {
        Profile::Default => base,
        Profile::NoTracing => base.enable_tracing(false),
        Profile::Quick => base
            .block_ms(100)
            .enable_tracing(false)
            .recovery_interval_ms(0),
    }
}

/// A registry that knows `OrderCreated`.
pub(crate) fn registry() -> EventRegistry {
    let r = EventRegistry::new();
    r.register::<OrderCreated>().expect("fresh registry");
    r
}

/// A handler of a projection that reads the event it is given (its data and metadata).
pub(crate) fn subscribe_reader(bus: &impl EventBus) {
    bus.subscribe(|e: Event<OrderCreated>| async move {
        std::hint::black_box((e.total_amount, e.customer_id.len(), e.metadata.aggregate_id));
    });
}

pub(crate) async fn raw_conn(url: &str) -> Result<MultiplexedConnection, Error> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

/// Deletes every key under `prefix` (the end of each run).
pub(crate) async fn delete_prefix(conn: &mut MultiplexedConnection, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(conn).await;
    }
}

/// Adds one `XADD stream * fields...` to `pipe`.
pub(crate) fn xadd(pipe: &mut redis::Pipeline, stream: &str, fields: &[(&'static str, String)]) {
    let cmd = pipe.cmd("XADD").arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(v);
    }
}

/// Fills `stream` with `n` entries of the workload's shape, pipelined 1,000 at a time.
pub(crate) async fn prefill(
    conn: &mut MultiplexedConnection,
    stream: &str,
    n: usize,
) -> Result<(), Error> {
    for start in (0..n).step_by(1000) {
        let mut pipe = redis::pipe();
        for i in start..(start + 1000).min(n) {
            xadd(&mut pipe, stream, &encode_fields(&event(i), None)?);
        }
        let _: Vec<String> = pipe.query_async(conn).await?;
    }
    Ok(())
}

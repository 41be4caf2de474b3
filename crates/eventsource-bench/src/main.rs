//! `eventsource-bench`: the workloads of `docs/workloads.md`, each measured next to the raw
//! limit of the same Redis in the same run (`--help` lists them).
//!
//! ```text
//! cargo run --release -p eventsource-bench -- --workload all [--n N] [--repeat R]
//!     [--redis-url redis://127.0.0.1:6379]
//! ```
//!
//! Workloads: `publish_single`, `publish_batch100`, `publish_concurrent16`, `consume_1`,
//! `consume_2proc`, `consume_2proc_slow`, `consume_2proc_slowhandler_dup`, `latency_500`,
//! `latency_5000`,
//! `rss`, or `all`.
//! Progress and tables go to standard error; the last line of standard output is one JSON
//! object keyed by workload with medians and ranges (`events_per_sec`, `p50_ms`..`max_ms`,
//! `peak_rss_mib`) and, where a raw limit applies, `limit_events_per_sec` and
//! `ratio_to_limit`.
//!
//! Consumers for the `consume_*` and `rss` workloads run in child processes (this binary with
//! the hidden `--role consumer`), so two consumers really are two processes and the memory
//! figure is the consumer's own.

#![forbid(unsafe_code)]

mod pg;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::codec::encode_fields;
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};
use redis::Value;
use redis::aio::MultiplexedConnection;
use serde_json::{Value as Json, json};

type Error = Box<dyn std::error::Error + Send + Sync>;

const WORKLOADS: [&str; 14] = [
    "publish_single",
    "publish_batch100",
    "publish_concurrent16",
    "consume_1",
    "consume_2proc",
    "consume_2proc_slow",
    "consume_2proc_slowhandler_dup",
    "consume_1_tls",
    "consume_1_metrics",
    "consume_1_3handlers",
    "dispatch_3handlers",
    "latency_500",
    "latency_5000",
    "rss",
];

const USAGE: &str = "usage: eventsource-bench --workload NAME|redis|postgres|all [--workload NAME ...] [--n N] [--repeat R] [--redis-url URL] [--database-url URL]

Every figure is measured next to the raw limit of the same Redis (or PostgreSQL) in the same run.

workloads:
  publish_single        one event per publish call (bus at the default configuration and
                        with tracing off) vs one awaited XADD at a time
  publish_batch100      100 events per call vs XADD pipelined 100 at a time
  publish_concurrent16  16 tasks publishing one at a time vs one task
  consume_1             one consumer process: default configuration, tracing off, and the
                        redis-rs reader instead of ours, vs a raw XREADGROUP/XACK loop
  consume_2proc         two consumer processes vs one
  consume_2proc_slow    a 1 ms handler, handler_concurrency 16 and 1, two processes vs one
  consume_2proc_slowhandler_dup
                        two consumers, a 150 ms handler, batch 10, pending_idle_ms 1000:
                        handler runs per event and unapplied acks (duplicates)
  consume_1_tls         consume_1 over TLS next to plain, on one redis-server with both ports
                        (certificates made with the openssl command)
  consume_1_metrics     consume_1 with a Prometheus recorder installed next to none (the cost
                        of the metrics the bus records)
  consume_1_3handlers   one consumer process whose projection has 3 typed handlers on the
                        event type (each reads the event) vs 1 handler
  dispatch_3handlers    in process, no Redis: one decoded event dispatched to 3 typed
                        handlers vs 1 (the cost of handing each handler its event)
  latency_500           publish-to-handler latency at 500 events/s
  latency_5000          the same at 5,000 events/s
  rss                   peak memory of a consumer over 200,000 events
  pg_append_1           PostgreSQL store: one event per append vs a one-row INSERT
  pg_append_16          the same with 16 concurrent writers (pool of 10 = default, and 16)
  pg_append_batch100    appends of 100 events vs one 100-row INSERT
  pg_catchup            a catch-up subscription over 1,000,000 stored events into an
                        in-memory projection (child process, peak RSS) vs a raw paged SELECT
  outbox_relay          outbox relay: events/s from commit to the Redis stream, and
                        commit-to-stream latency at 500 events/s
  redis                 every Redis workload (publish_* .. rss)
  postgres              every PostgreSQL workload (pg_* and outbox_relay)
  all                   every workload above

options:
  --n N          events per run (each workload has its own default)
  --repeat R     runs per workload, medians reported (default 3)
  --redis-url U  the Redis to measure (default redis://127.0.0.1:6379)
  --database-url U
                 the PostgreSQL to measure (default postgres://postgres@127.0.0.1:5432/test);
                 each run works in a schema of its own and drops it
  --help         this text

Progress goes to standard error; the last line of standard output is one JSON object keyed
by workload.";

#[derive(Debug, Clone)]
struct Options {
    workloads: Vec<String>,
    redis_url: String,
    database_url: String,
    n: Option<usize>,
    repeat: usize,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        workloads: vec![],
        redis_url: "redis://127.0.0.1:6379".into(),
        database_url: "postgres://postgres@127.0.0.1:5432/test".into(),
        n: None,
        repeat: 3,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || it.next().cloned().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--workload" => {
                let w = val()?;
                if w == "all" {
                    o.workloads = WORKLOADS
                        .iter()
                        .chain(&pg::WORKLOADS)
                        .map(|s| s.to_string())
                        .collect();
                } else if w == "redis" {
                    o.workloads = WORKLOADS.iter().map(|s| s.to_string()).collect();
                } else if w == "postgres" {
                    o.workloads = pg::WORKLOADS.iter().map(|s| s.to_string()).collect();
                } else if WORKLOADS.contains(&w.as_str()) || pg::WORKLOADS.contains(&w.as_str()) {
                    o.workloads.push(w);
                } else {
                    return Err(format!(
                        "unknown workload {w:?}; one of {WORKLOADS:?}, {:?}, redis, postgres or all",
                        pg::WORKLOADS
                    ));
                }
            }
            "--redis-url" => o.redis_url = val()?,
            "--database-url" => o.database_url = val()?,
            "--n" => o.n = Some(val()?.parse().map_err(|_| "--n needs a number")?),
            "--repeat" => o.repeat = val()?.parse().map_err(|_| "--repeat needs a number")?,
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if o.workloads.is_empty() {
        return Err(USAGE.into());
    }
    o.repeat = o.repeat.max(1);
    Ok(o)
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn event(i: usize) -> EventEnvelope {
    Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: format!("cust-{i}"),
            total_amount: i as f64 * 1.5,
        },
    )
    .into_envelope()
}

fn prefix(tag: &str) -> String {
    format!(
        "bench:{tag}:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

/// How a measured bus is configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Profile {
    /// `RedisEventBusConfig::default()` (tracing on, block 2 s, recovery every 30 s).
    Default,
    /// The defaults with `enable_tracing: false`.
    NoTracing,
    /// Tuned for quick runs where the configuration is not the point (latency, memory,
    /// scaling): tracing off, block 100 ms, recovery off.
    Quick,
}

impl Profile {
    fn name(self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::NoTracing => "no-tracing",
            Self::Quick => "quick",
        }
    }

    fn parse(s: &str) -> Result<Self, Error> {
        match s {
            "default" => Ok(Self::Default),
            "no-tracing" => Ok(Self::NoTracing),
            "quick" => Ok(Self::Quick),
            other => Err(format!("unknown profile {other:?}").into()),
        }
    }
}

fn bus_config(url: &str, prefix: &str, group: &str, name: &str) -> RedisEventBusConfig {
    profile_config(Profile::Quick, url, prefix, group, name)
}

fn profile_config(
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

fn registry() -> EventRegistry {
    let r = EventRegistry::new();
    r.register::<OrderCreated>().expect("fresh registry");
    r
}

async fn raw_conn(url: &str) -> Result<MultiplexedConnection, Error> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

async fn delete_prefix(conn: &mut MultiplexedConnection, prefix: &str) {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(conn)
        .await
        .unwrap_or_default();
    if !keys.is_empty() {
        let _: Result<(), _> = redis::cmd("DEL").arg(keys).query_async(conn).await;
    }
}

fn xadd(pipe: &mut redis::Pipeline, stream: &str, fields: &[(&'static str, String)]) {
    let cmd = pipe.cmd("XADD").arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(v);
    }
}

/// Fills `stream` with `n` entries of the workload's shape, pipelined 100 at a time.
async fn prefill(conn: &mut MultiplexedConnection, stream: &str, n: usize) -> Result<(), Error> {
    for start in (0..n).step_by(1000) {
        let mut pipe = redis::pipe();
        for i in start..(start + 1000).min(n) {
            xadd(&mut pipe, stream, &encode_fields(&event(i), None)?);
        }
        let _: Vec<String> = pipe.query_async(conn).await?;
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
struct Stat {
    median: f64,
    min: f64,
    max: f64,
}

fn stat(values: &[f64]) -> Stat {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    Stat {
        median,
        min: v[0],
        max: v[v.len() - 1],
    }
}

fn stat_json(s: Stat) -> Json {
    json!({"median": s.median.round(), "min": s.min.round(), "max": s.max.round()})
}

fn throughput_json(bus: &[f64], limit: Option<&[f64]>) -> Json {
    let b = stat(bus);
    let mut out = json!({"events_per_sec": stat_json(b), "runs": bus.len()});
    if let Some(limit) = limit {
        let l = stat(limit);
        out["limit_events_per_sec"] = stat_json(l);
        out["ratio_to_limit"] = json!((b.median / l.median * 1000.0).round() / 1000.0);
        let ratios: Vec<f64> = bus.iter().zip(limit).map(|(b, l)| b / l).collect();
        let r = stat(&ratios);
        out["ratio_per_run"] = json!({"median": (r.median * 1000.0).round() / 1000.0, "min": (r.min * 1000.0).round() / 1000.0, "max": (r.max * 1000.0).round() / 1000.0});
    }
    out
}

// ---------------------------------------------------------------------------------------
// Publishing
// ---------------------------------------------------------------------------------------

async fn raw_single(url: &str, fields: &[Vec<(&'static str, String)>]) -> Result<f64, Error> {
    let mut conn = raw_conn(url).await?;
    let p = prefix("raw-single");
    let stream = format!("{p}:stream");
    let t = Instant::now();
    for f in fields {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&stream).arg("*");
        for (k, v) in f {
            cmd.arg(*k).arg(v);
        }
        let _: String = cmd.query_async(&mut conn).await?;
    }
    let rate = fields.len() as f64 / t.elapsed().as_secs_f64();
    delete_prefix(&mut conn, &p).await;
    Ok(rate)
}

async fn raw_pipelined(url: &str, fields: &[Vec<(&'static str, String)>]) -> Result<f64, Error> {
    let mut conn = raw_conn(url).await?;
    let p = prefix("raw-batch");
    let stream = format!("{p}:stream");
    let t = Instant::now();
    for chunk in fields.chunks(100) {
        let mut pipe = redis::pipe();
        for f in chunk {
            xadd(&mut pipe, &stream, f);
        }
        let _: Vec<String> = pipe.query_async(&mut conn).await?;
    }
    let rate = fields.len() as f64 / t.elapsed().as_secs_f64();
    delete_prefix(&mut conn, &p).await;
    Ok(rate)
}

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

async fn publish_workload(o: &Options, name: &str) -> Result<Vec<(String, Json)>, Error> {
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
        let s = stat(&single);
        out["single_events_per_sec"] = stat_json(s);
        out["ratio_to_single"] = json!((stat(&bus).median / s.median * 100.0).round() / 100.0);
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

// ---------------------------------------------------------------------------------------
// Consuming (child processes)
// ---------------------------------------------------------------------------------------

/// The raw loop: XREADGROUP COUNT 100, acking the previous batch in the same round trip.
async fn raw_consume(url: &str, n: usize) -> Result<f64, Error> {
    let mut conn = raw_conn(url).await?;
    let p = prefix("raw-consume");
    let stream = format!("{p}:stream");
    prefill(&mut conn, &stream, n).await?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("raw")
        .arg("0")
        .query_async(&mut conn)
        .await?;
    let t = Instant::now();
    let mut acks: Vec<String> = Vec::new();
    let mut got = 0;
    loop {
        let mut pipe = redis::pipe();
        if !acks.is_empty() {
            pipe.cmd("XACK").arg(&stream).arg("raw").arg(&acks).ignore();
        }
        pipe.cmd("XREADGROUP")
            .arg("GROUP")
            .arg("raw")
            .arg("c")
            .arg("COUNT")
            .arg(100)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">");
        let (reply,): (Value,) = pipe.query_async(&mut conn).await?;
        acks = entry_ids(&reply);
        if acks.is_empty() {
            break;
        }
        got += acks.len();
    }
    let rate = got as f64 / t.elapsed().as_secs_f64();
    delete_prefix(&mut conn, &p).await;
    if got != n {
        return Err(format!("raw loop read {got} of {n}").into());
    }
    Ok(rate)
}

/// The physical limit of consuming: the same loop over a plain socket, with a scanner that
/// reads only the entry ids out of the reply and skips the fields. What Redis and the network
/// can deliver to one client, with the least client work possible.
fn raw_consume_minimal(addr: &str, stream: &str, n: usize) -> Result<f64, Error> {
    use std::io::{BufRead, BufReader, Read, Write};
    let sock = std::net::TcpStream::connect(addr)?;
    sock.set_nodelay(true)?;
    let mut out = sock.try_clone()?;
    let mut r = BufReader::with_capacity(256 * 1024, sock);
    fn line(r: &mut BufReader<std::net::TcpStream>, buf: &mut Vec<u8>) -> Result<(u8, i64), Error> {
        buf.clear();
        r.read_until(b'\n', buf)?;
        if buf.len() < 3 {
            return Err("short line".into());
        }
        if buf[0] == b'-' {
            return Err(String::from_utf8_lossy(buf).into_owned().into());
        }
        let n = std::str::from_utf8(&buf[1..buf.len() - 2])?
            .parse::<i64>()
            .unwrap_or(0);
        Ok((buf[0], n))
    }
    fn skip_bulk(r: &mut BufReader<std::net::TcpStream>, buf: &mut Vec<u8>) -> Result<(), Error> {
        let (_, len) = line(r, buf)?;
        if len >= 0 {
            std::io::copy(&mut r.by_ref().take(len as u64 + 2), &mut std::io::sink())?;
        }
        Ok(())
    }
    fn bulk(r: &mut BufReader<std::net::TcpStream>, buf: &mut Vec<u8>) -> Result<Vec<u8>, Error> {
        let (_, len) = line(r, buf)?;
        let mut v = vec![0u8; len.max(0) as usize + 2];
        r.read_exact(&mut v)?;
        v.truncate(len.max(0) as usize);
        Ok(v)
    }
    let cmd = |args: &[&[u8]]| {
        let mut c = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            c.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            c.extend_from_slice(a);
            c.extend_from_slice(b"\r\n");
        }
        c
    };
    let read = cmd(&[
        b"XREADGROUP",
        b"GROUP",
        b"raw",
        b"c",
        b"COUNT",
        b"100",
        b"STREAMS",
        stream.as_bytes(),
        b">",
    ]);
    let mut buf = Vec::with_capacity(128);
    let mut ids: Vec<Vec<u8>> = Vec::new();
    let mut got = 0;
    let t = Instant::now();
    loop {
        let mut request = Vec::new();
        let acking = !ids.is_empty();
        if acking {
            let mut args: Vec<&[u8]> = vec![b"XACK", stream.as_bytes(), b"raw"];
            args.extend(ids.iter().map(Vec::as_slice));
            request.extend(cmd(&args));
        }
        request.extend_from_slice(&read);
        out.write_all(&request)?;
        if acking {
            line(&mut r, &mut buf)?; // :n
        }
        ids.clear();
        let (_, streams) = line(&mut r, &mut buf)?;
        for _ in 0..streams.max(0) {
            line(&mut r, &mut buf)?; // *2
            skip_bulk(&mut r, &mut buf)?; // stream name
            let (_, entries) = line(&mut r, &mut buf)?;
            for _ in 0..entries.max(0) {
                line(&mut r, &mut buf)?; // *2
                ids.push(bulk(&mut r, &mut buf)?);
                let (_, fields) = line(&mut r, &mut buf)?;
                for _ in 0..fields.max(0) {
                    skip_bulk(&mut r, &mut buf)?;
                }
            }
        }
        if ids.is_empty() {
            break;
        }
        got += ids.len();
    }
    if got != n {
        return Err(format!("minimal raw loop read {got} of {n}").into());
    }
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

async fn raw_consume_physical(url: &str, n: usize) -> Result<f64, Error> {
    let mut conn = raw_conn(url).await?;
    let p = prefix("raw-min");
    let stream = format!("{p}:stream");
    prefill(&mut conn, &stream, n).await?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("raw")
        .arg("0")
        .query_async(&mut conn)
        .await?;
    let addr = match redis::Client::open(url)?.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        _ => return Err("the minimal raw loop needs a redis:// TCP address".into()),
    };
    let s = stream.clone();
    let rate = tokio::task::spawn_blocking(move || raw_consume_minimal(&addr, &s, n)).await??;
    delete_prefix(&mut conn, &p).await;
    Ok(rate)
}

fn entry_ids(reply: &Value) -> Vec<String> {
    let Value::Array(streams) = reply else {
        return vec![];
    };
    let mut ids = Vec::new();
    for s in streams {
        if let Value::Array(parts) = s
            && let Some(Value::Array(entries)) = parts.get(1)
        {
            for e in entries {
                if let Value::Array(x) = e
                    && let Some(Value::BulkString(id)) = x.first()
                {
                    ids.push(String::from_utf8_lossy(id).into_owned());
                }
            }
        }
    }
    ids
}

/// How the consumer children of a run are configured.
#[derive(Debug, Clone)]
struct Spec {
    profile: Profile,
    /// Handler time per event.
    sleep_ms: u64,
    concurrency: usize,
    batch_size: Option<usize>,
    pending_idle_ms: Option<u64>,
    recovery_interval_ms: Option<u64>,
    /// Read with redis-rs instead of the bus's own RESP reader.
    redis_rs_reader: bool,
    /// Consumers connect here instead of the workload's Redis (the same server's TLS port).
    consumer_url: Option<String>,
    /// CA file for a `rediss://` consumer URL.
    tls_ca_file: Option<String>,
    /// The consumer installs a Prometheus recorder (metrics recorded, not scraped).
    metrics: bool,
    /// Typed handlers on `OrderCreated` in the consumer (the first counts, all read the
    /// event).
    handlers: usize,
}

impl Spec {
    fn new(profile: Profile) -> Self {
        Self {
            profile,
            sleep_ms: 0,
            concurrency: 1,
            batch_size: None,
            pending_idle_ms: None,
            recovery_interval_ms: None,
            redis_rs_reader: false,
            consumer_url: None,
            tls_ca_file: None,
            metrics: false,
            handlers: 1,
        }
    }

    fn handler(mut self, sleep_ms: u64, concurrency: usize) -> Self {
        self.sleep_ms = sleep_ms;
        self.concurrency = concurrency;
        self
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--profile".to_owned(),
            self.profile.name().to_owned(),
            "--sleep-ms".to_owned(),
            self.sleep_ms.to_string(),
            "--concurrency".to_owned(),
            self.concurrency.to_string(),
            "--handlers".to_owned(),
            self.handlers.to_string(),
        ];
        for (flag, value) in [
            ("--consumer-url", self.consumer_url.clone()),
            ("--tls-ca-file", self.tls_ca_file.clone()),
        ] {
            if let Some(v) = value {
                args.push(flag.to_owned());
                args.push(v);
            }
        }
        for (flag, value) in [
            ("--batch-size", self.batch_size.map(|v| v as u64)),
            ("--pending-idle-ms", self.pending_idle_ms),
            ("--recovery-interval-ms", self.recovery_interval_ms),
        ] {
            if let Some(v) = value {
                args.push(flag.to_owned());
                args.push(v.to_string());
            }
        }
        args
    }
}

/// What one run of consumer children did.
#[derive(Debug, Clone, Copy, Default)]
struct RunReport {
    events_per_sec: f64,
    /// Peak RSS of the largest child, MiB.
    rss_mib: f64,
    /// Handler runs, summed over the children.
    handled: u64,
    acks_not_applied: u64,
    recovered: u64,
    taken_over: u64,
}

/// Runs consumer children on a pre-filled stream of `n` events.
async fn consume_run(
    o: &Options,
    n: usize,
    processes: usize,
    spec: &Spec,
) -> Result<RunReport, Error> {
    let mut conn = raw_conn(&o.redis_url).await?;
    let p = prefix("consume");
    let stream = format!("{p}:stream");
    prefill(&mut conn, &stream, n).await?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for i in 0..processes {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args([
                "--role",
                "consumer",
                "--redis-url",
                &o.redis_url,
                "--prefix",
                &p,
                "--group",
                "bench",
            ])
            .args(["--name", &format!("c{i}"), "--expect-total", &n.to_string()])
            .args(spec.args())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true);
        if spec.redis_rs_reader {
            command.env("EVENTSOURCE_REDIS_READER", "redis-rs");
        }
        if spec.metrics {
            command.env("EVENTSOURCE_BENCH_METRICS", "1");
        }
        children.push(command.spawn()?);
    }
    let mut reports = Vec::new();
    for child in children {
        let out =
            tokio::time::timeout(Duration::from_secs(300), child.wait_with_output()).await??;
        let text = String::from_utf8_lossy(&out.stdout);
        let report: Json = serde_json::from_str(text.lines().last().unwrap_or("{}"))?;
        if let Some(e) = report.get("error") {
            return Err(format!("consumer: {e}").into());
        }
        reports.push(report);
    }
    let sum = |key: &str| {
        reports
            .iter()
            .map(|r| r[key].as_u64().unwrap_or(0))
            .sum::<u64>()
    };
    let handled = sum("handled");
    let pending: Value = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("bench")
        .query_async(&mut conn)
        .await?;
    let pending_count = match &pending {
        Value::Array(v) => match v.first() {
            Some(Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    };
    delete_prefix(&mut conn, &p).await;
    if handled < n as u64 || pending_count != 0 {
        return Err(format!("handled {handled} of {n}, {pending_count} left pending").into());
    }
    let start = reports
        .iter()
        .filter_map(|r| r["start_us"].as_u64())
        .min()
        .unwrap_or(0);
    let last = reports
        .iter()
        .filter_map(|r| r["last_us"].as_u64())
        .max()
        .unwrap_or(0);
    let rss_mib = reports
        .iter()
        .filter_map(|r| r["vmhwm_kib"].as_f64())
        .fold(0.0, f64::max)
        / 1024.0;
    Ok(RunReport {
        events_per_sec: n as f64 / ((last - start).max(1) as f64 / 1e6),
        rss_mib,
        handled,
        acks_not_applied: sum("acks_not_applied"),
        recovered: sum("messages_recovered"),
        taken_over: sum("entries_taken_over"),
    })
}

/// The hidden `--role consumer` mode: consume until the group has read `expect_total`
/// entries and nothing is pending, then print a JSON report.
async fn consumer_role(args: &[String]) -> Result<Json, Error> {
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .ok_or(format!("missing {name}"))
    };
    let url = get("--redis-url")?;
    let prefix = get("--prefix")?;
    let group = get("--group")?;
    let name = get("--name")?;
    let expect: u64 = get("--expect-total")?.parse()?;
    let sleep_ms: u64 = get("--sleep-ms")?.parse()?;
    let concurrency: usize = get("--concurrency")?.parse()?;
    let profile = Profile::parse(&get("--profile")?)?;
    let consumer_url = get("--consumer-url").unwrap_or_else(|_| url.clone());
    let mut config = profile_config(profile, &consumer_url, &prefix, &group, &name)
        .handler_concurrency(concurrency);
    config.tls_ca_file = get("--tls-ca-file").ok().map(Into::into);
    if let Ok(v) = get("--batch-size") {
        config.batch_size = v.parse()?;
    }
    if let Ok(v) = get("--pending-idle-ms") {
        config.pending_idle = Duration::from_millis(v.parse()?);
    }
    if let Ok(v) = get("--recovery-interval-ms") {
        config.recovery_interval = Duration::from_millis(v.parse()?);
    }
    if std::env::var("EVENTSOURCE_BENCH_METRICS").as_deref() == Ok("1") {
        eventsource_redis::http::install_prometheus_recorder()
            .ok_or("the Prometheus recorder did not install")?;
    }
    let bus = RedisEventBus::new(config, registry())?;
    let handled = Arc::new(AtomicU64::new(0));
    let last = Arc::new(AtomicU64::new(0));
    let (h, l) = (handled.clone(), last.clone());
    bus.subscribe(move |_: Event<OrderCreated>| {
        let (h, l) = (h.clone(), l.clone());
        async move {
            if sleep_ms > 0 {
                tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
            }
            h.fetch_add(1, Ordering::Relaxed);
            l.store(now_us(), Ordering::Relaxed);
        }
    });
    let handlers: usize = get("--handlers").map_or(Ok(1), |v| v.parse())?;
    for _ in 1..handlers {
        subscribe_reader(&bus);
    }
    bus.connect().await?;
    let start_us = now_us();
    let consumer = tokio::spawn({
        let bus = bus.clone();
        async move { bus.start_consuming().await }
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let info = bus.try_stream_info().await?;
        let g = info.consumer_groups.iter().find(|g| g.name == group);
        let read_all = g.is_some_and(|g| g.lag == Some(0));
        if read_all && info.pending_messages == 0 {
            break;
        }
        if Instant::now() > deadline {
            return Ok(
                json!({"error": format!("timed out with {} handled", handled.load(Ordering::Relaxed))}),
            );
        }
    }
    bus.stop_consuming();
    consumer.await??;
    let vmhwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let stats = bus.stats();
    Ok(json!({
        "name": name,
        "handled": handled.load(Ordering::Relaxed),
        "start_us": start_us,
        "last_us": last.load(Ordering::Relaxed),
        "vmhwm_kib": vmhwm,
        "expect_total": expect,
        "acks_not_applied": stats.acks_not_applied,
        "messages_recovered": stats.messages_recovered,
        "entries_taken_over": stats.entries_taken_over,
    }))
}

async fn consume_workload(o: &Options, name: &str) -> Result<Vec<(String, Json)>, Error> {
    match name {
        "consume_1" => {
            let n = o.n.unwrap_or(20_000);
            let (mut bus, mut limit, mut client) = (vec![], vec![], vec![]);
            let (mut untraced, mut rs_reader, mut rs_reader_untraced) = (vec![], vec![], vec![]);
            let default = Spec::new(Profile::Default);
            let no_tracing = Spec::new(Profile::Quick);
            let with_redis_rs = |spec: &Spec| Spec {
                redis_rs_reader: true,
                ..spec.clone()
            };
            for run in 1..=o.repeat {
                limit.push(raw_consume_physical(&o.redis_url, n).await?);
                client.push(raw_consume(&o.redis_url, n).await?);
                bus.push(consume_run(o, n, 1, &default).await?.events_per_sec);
                untraced.push(consume_run(o, n, 1, &no_tracing).await?.events_per_sec);
                rs_reader.push(
                    consume_run(o, n, 1, &with_redis_rs(&default))
                        .await?
                        .events_per_sec,
                );
                rs_reader_untraced.push(
                    consume_run(o, n, 1, &with_redis_rs(&no_tracing))
                        .await?
                        .events_per_sec,
                );
                eprintln!(
                    "  consume_1 run {run}: bus {:>9.0}/s (tracing off {:>9.0}/s; redis-rs reader {:>9.0}/s, tracing off {:>9.0}/s)   raw loop {:>9.0}/s   same loop with redis-rs {:>9.0}/s",
                    bus[run - 1],
                    untraced[run - 1],
                    rs_reader[run - 1],
                    rs_reader_untraced[run - 1],
                    limit[run - 1],
                    client[run - 1]
                );
            }
            let ratio =
                |a: &[f64], b: &[f64]| (stat(a).median / stat(b).median * 1000.0).round() / 1000.0;
            let mut out = throughput_json(&untraced, Some(&limit));
            out["n"] = json!(n);
            out["config"] = json!(
                "batch_size 100, block_ms 100, enable_tracing false, recovery off; own RESP reader"
            );
            out["redis_rs_reader"] = throughput_json(&rs_reader_untraced, Some(&limit));
            out["own_reader_over_redis_rs_reader"] = json!(ratio(&untraced, &rs_reader_untraced));
            let mut default = throughput_json(&bus, Some(&limit));
            default["n"] = json!(n);
            default["config"] = json!(
                "RedisEventBusConfig::default() (batch 100, block 2 s, tracing on, recovery every 30 s); own RESP reader"
            );
            default["redis_rs_reader"] = throughput_json(&rs_reader, Some(&limit));
            default["own_reader_over_redis_rs_reader"] = json!(ratio(&bus, &rs_reader));
            out["limit_is"] = json!(
                "XREADGROUP COUNT 100 + XACK of the previous batch in one round trip, one connection, a scanner that reads only the ids"
            );
            out["redis_rs_loop_events_per_sec"] = stat_json(stat(&client));
            out["ratio_to_redis_rs_loop"] = json!(ratio(&untraced, &client));
            default["limit_is"] = out["limit_is"].clone();
            Ok(vec![
                ("consume_1".to_owned(), out),
                ("consume_1@default".to_owned(), default),
            ])
        }
        "consume_2proc" => {
            let n = o.n.unwrap_or(20_000);
            let (mut one, mut two) = (vec![], vec![]);
            for run in 1..=o.repeat {
                let quick = Spec::new(Profile::Quick);
                one.push(consume_run(o, n, 1, &quick).await?.events_per_sec);
                two.push(consume_run(o, n, 2, &quick).await?.events_per_sec);
                eprintln!(
                    "  consume_2proc run {run}: two processes {:>9.0}/s   one {:>9.0}/s",
                    two[run - 1],
                    one[run - 1]
                );
            }
            let mut out = throughput_json(&two, None);
            out["n"] = json!(n);
            out["one_consumer_events_per_sec"] = stat_json(stat(&one));
            out["ratio_to_one_consumer"] =
                json!((stat(&two).median / stat(&one).median * 100.0).round() / 100.0);
            Ok(vec![(name.to_owned(), out)])
        }
        _ => {
            // consume_2proc_slow: the handler sleeps 1 ms. Without concurrency one consumer
            // does < 1000/s, so that comparison uses a smaller N (reported).
            let n = o.n.unwrap_or(20_000);
            let n_seq = n.min(2_000);
            let (mut one_c, mut two_c, mut one_s, mut two_s) = (vec![], vec![], vec![], vec![]);
            for run in 1..=o.repeat {
                let concurrent = Spec::new(Profile::Quick).handler(1, 16);
                let sequential = Spec::new(Profile::Quick).handler(1, 1);
                one_c.push(consume_run(o, n, 1, &concurrent).await?.events_per_sec);
                two_c.push(consume_run(o, n, 2, &concurrent).await?.events_per_sec);
                one_s.push(consume_run(o, n_seq, 1, &sequential).await?.events_per_sec);
                two_s.push(consume_run(o, n_seq, 2, &sequential).await?.events_per_sec);
                eprintln!(
                    "  consume_2proc_slow run {run}: concurrency 16: two {:>8.0}/s one {:>8.0}/s | sequential: two {:>6.0}/s one {:>6.0}/s",
                    two_c[run - 1],
                    one_c[run - 1],
                    two_s[run - 1],
                    one_s[run - 1]
                );
            }
            let side = |two: &[f64], one: &[f64], n: usize| {
                let mut j = throughput_json(two, None);
                j["n"] = json!(n);
                j["one_consumer_events_per_sec"] = stat_json(stat(one));
                j["ratio_to_one_consumer"] =
                    json!((stat(two).median / stat(one).median * 100.0).round() / 100.0);
                j
            };
            let with = side(&two_c, &one_c, n);
            let mut out = with.clone();
            out["with_concurrency"] = with;
            out["with_concurrency"]["handler_concurrency"] = json!(16);
            out["without_concurrency"] = side(&two_s, &one_s, n_seq);
            Ok(vec![(name.to_owned(), out)])
        }
    }
}

/// Two consumers in one group with a slow handler: how many times each event ran, and how
/// many acks Redis did not apply (the entry had been taken by the other consumer). The
/// configuration of the consumer-hardening issue: batch 10, `pending_idle_ms` 1000, recovery
/// every 200 ms, a 150 ms handler (7× faster than the idle time).
async fn slow_two_consumers_workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(200);
    let spec = Spec {
        batch_size: Some(10),
        pending_idle_ms: Some(1000),
        recovery_interval_ms: Some(200),
        ..Spec::new(Profile::Default).handler(150, 1)
    };
    let (mut runs_per_event, mut acks_lost, mut rates) = (vec![], vec![], vec![]);
    let mut last = RunReport::default();
    for run in 1..=o.repeat {
        last = consume_run(o, n, 2, &spec).await?;
        runs_per_event.push(last.handled as f64 / n as f64);
        acks_lost.push(last.acks_not_applied as f64);
        rates.push(last.events_per_sec);
        eprintln!(
            "  consume_2proc_slowhandler_dup run {run}: {} handler runs for {n} events ({:.2} per event), {} acks not applied, {} recovered, {} taken over, {:.1} events/s",
            last.handled,
            last.handled as f64 / n as f64,
            last.acks_not_applied,
            last.recovered,
            last.taken_over,
            last.events_per_sec
        );
    }
    let s = stat(&runs_per_event);
    Ok(json!({
        "n": n,
        "config": "two consumer processes, RedisEventBusConfig::default() with batch_size 10, pending_idle_ms 1000, recovery_interval_ms 200; handler sleeps 150 ms",
        "handler_runs_per_event": {"median": s.median, "min": s.min, "max": s.max},
        "duplicates_median": (s.median * n as f64 - n as f64).round(),
        "acks_not_applied_median": stat(&acks_lost).median,
        "messages_recovered_last_run": last.recovered,
        "events_per_sec": stat_json(stat(&rates)),
    }))
}

/// `consume_1` over TLS next to plain TCP, on one redis-server listening on both (so the two
/// figures differ only by TLS), with a CA and server certificate made by `openssl`.
async fn consume_tls_workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(20_000);
    let dir = std::env::temp_dir().join(format!("es-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let openssl = |args: &[&str]| -> Result<(), Error> {
        let ok = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("consume_1_tls needs the openssl command: {e}"))?
            .success();
        if ok {
            Ok(())
        } else {
            Err(format!("openssl {args:?} failed").into())
        }
    };
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )?;
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=bench-ca",
    ])?;
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ])?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "1",
        "-extfile",
        "server.ext",
    ])?;
    let free = || -> Result<u16, Error> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    };
    let (plain, tls) = (free()?, free()?);
    let file = |name: &str| dir.join(name).display().to_string();
    let mut server = tokio::process::Command::new("redis-server")
        .args(["--port", &plain.to_string(), "--tls-port", &tls.to_string()])
        .args([
            "--tls-cert-file",
            &file("server.crt"),
            "--tls-key-file",
            &file("server.key"),
        ])
        .args([
            "--tls-ca-cert-file",
            &file("ca.crt"),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--save", "", "--appendonly", "no", "--bind", "127.0.0.1"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    for _ in 0..250 {
        if std::net::TcpStream::connect(("127.0.0.1", plain)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let local = Options {
        redis_url: format!("redis://127.0.0.1:{plain}"),
        ..o.clone()
    };
    let over_tls = Spec {
        consumer_url: Some(format!("rediss://localhost:{tls}")),
        tls_ca_file: Some(file("ca.crt")),
        ..Spec::new(Profile::Quick)
    };
    let (mut plain_rates, mut tls_rates) = (vec![], vec![]);
    for run in 1..=o.repeat {
        plain_rates.push(
            consume_run(&local, n, 1, &Spec::new(Profile::Quick))
                .await?
                .events_per_sec,
        );
        tls_rates.push(consume_run(&local, n, 1, &over_tls).await?.events_per_sec);
        eprintln!(
            "  consume_1_tls run {run}: TLS {:>9.0}/s   plain TCP {:>9.0}/s (same server)",
            tls_rates[run - 1],
            plain_rates[run - 1]
        );
    }
    let _ = server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    let mut out = throughput_json(&tls_rates, None);
    out["n"] = json!(n);
    out["config"] = json!(
        "workload settings (batch 100, block 100 ms, tracing off); rediss:// with a CA file; the reader is redis-rs's over TLS (the bus's own RESP reader serves plain TCP only)"
    );
    out["plain_events_per_sec"] = stat_json(stat(&plain_rates));
    out["ratio_to_plain"] =
        json!((stat(&tls_rates).median / stat(&plain_rates).median * 100.0).round() / 100.0);
    Ok(out)
}

async fn consume_metrics_workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(20_000);
    let (mut off, mut on) = (vec![], vec![]);
    for run in 1..=o.repeat {
        off.push(
            consume_run(o, n, 1, &Spec::new(Profile::Quick))
                .await?
                .events_per_sec,
        );
        let with = Spec {
            metrics: true,
            ..Spec::new(Profile::Quick)
        };
        on.push(consume_run(o, n, 1, &with).await?.events_per_sec);
        eprintln!(
            "  consume_1_metrics run {run}: recorder installed {:>9.0}/s   none {:>9.0}/s   ratio {:.3}",
            on[run - 1],
            off[run - 1],
            on[run - 1] / off[run - 1]
        );
    }
    let mut out = throughput_json(&on, Some(&off));
    out["n"] = json!(n);
    out["config"] = json!(
        "workload settings (batch 100, block 100 ms, tracing off); the consumer process with a Prometheus recorder installed (every metric recorded, never scraped) vs without one; limit_* is the run without"
    );
    Ok(out)
}

/// A handler of a projection that reads the event it is given (its data and metadata).
fn subscribe_reader(bus: &impl EventBus) {
    bus.subscribe(|e: Event<OrderCreated>| async move {
        std::hint::black_box((e.total_amount, e.customer_id.len(), e.metadata.aggregate_id));
    });
}

async fn consume_handlers_workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(20_000);
    let (mut one, mut three) = (vec![], vec![]);
    for run in 1..=o.repeat {
        one.push(
            consume_run(o, n, 1, &Spec::new(Profile::Quick))
                .await?
                .events_per_sec,
        );
        let with = Spec {
            handlers: 3,
            ..Spec::new(Profile::Quick)
        };
        three.push(consume_run(o, n, 1, &with).await?.events_per_sec);
        eprintln!(
            "  consume_1_3handlers run {run}: 3 handlers {:>9.0}/s   1 handler {:>9.0}/s   ratio {:.3}",
            three[run - 1],
            one[run - 1],
            three[run - 1] / one[run - 1]
        );
    }
    let mut out = throughput_json(&three, Some(&one));
    out["n"] = json!(n);
    out["config"] = json!(
        "workload settings (batch 100, block 100 ms, tracing off); 3 typed handlers on OrderCreated, each reading the event, vs 1; limit_* is the run with 1"
    );
    Ok(out)
}

/// In process: a registry-decoded event (as the Redis consumer hands it over) dispatched to
/// 3 typed handlers vs 1, `n` times each.
async fn dispatch_handlers_workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(1_000_000);
    let registry = registry();
    let created = Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: "customer-1234".into(),
            total_amount: 99.5,
        },
    )
    .with_actor("bench");
    let json = created.into_envelope().to_json()?;
    let envelope = registry.decode(&json)?;
    let rate = |handlers: usize| {
        let bus = InMemoryEventBus::new();
        for _ in 0..handlers {
            subscribe_reader(&bus);
        }
        let envelope = envelope.clone();
        async move {
            let started = Instant::now();
            for _ in 0..n {
                let report = bus.subscribers().dispatch(&envelope).await;
                std::hint::black_box(report.handlers_run);
            }
            n as f64 / started.elapsed().as_secs_f64()
        }
    };
    let (mut one, mut three) = (vec![], vec![]);
    for run in 1..=o.repeat {
        one.push(rate(1).await);
        three.push(rate(3).await);
        eprintln!(
            "  dispatch_3handlers run {run}: 3 handlers {:>10.0}/s   1 handler {:>10.0}/s   ratio {:.3}",
            three[run - 1],
            one[run - 1],
            three[run - 1] / one[run - 1]
        );
    }
    let mut out = throughput_json(&three, Some(&one));
    out["n"] = json!(n);
    out["config"] = json!(
        "one OrderCreated decoded through the registry (typed data), dispatched n times to 3 typed handlers that read it vs 1; events_per_sec = dispatches/s; limit_* is 1 handler"
    );
    Ok(out)
}

async fn rss_workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(200_000);
    let mut rss = vec![];
    let mut rate = vec![];
    for run in 1..=o.repeat {
        let report = consume_run(o, n, 1, &Spec::new(Profile::Quick)).await?;
        let (r, m) = (report.events_per_sec, report.rss_mib);
        rate.push(r);
        rss.push(m);
        eprintln!(
            "  rss run {run}: consumer peak RSS {m:.1} MiB ({r:.0} events/s over {n} events)"
        );
    }
    let s = stat(&rss);
    Ok(json!({
        "peak_rss_mib": {"median": (s.median * 10.0).round() / 10.0, "min": (s.min * 10.0).round() / 10.0, "max": (s.max * 10.0).round() / 10.0},
        "n": n,
        "events_per_sec": stat_json(stat(&rate)),
    }))
}

// ---------------------------------------------------------------------------------------
// Latency
// ---------------------------------------------------------------------------------------

async fn latency_workload(o: &Options, rate: u64) -> Result<Json, Error> {
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
    let ms = |v: &[f64]| {
        let s = stat(v);
        json!({"median": (s.median * 1000.0).round() / 1000.0, "min": (s.min * 1000.0).round() / 1000.0, "max": (s.max * 1000.0).round() / 1000.0})
    };
    Ok(
        json!({"rate_per_sec": rate, "n": n, "p50_ms": ms(&p50s), "p95_ms": ms(&p95s), "p99_ms": ms(&p99s), "max_ms": ms(&maxs)}),
    )
}

/// A workload with one result, keyed by its name.
fn one(name: &str, result: Result<Json, Error>) -> Result<Vec<(String, Json)>, Error> {
    result.map(|value| vec![(name.to_owned(), value)])
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--role")
        && args.get(1).map(String::as_str) == Some("pg-catchup")
    {
        // The runtime a service gets from #[tokio::main]: one worker per core.
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let report = rt
            .block_on(pg::catchup_role(&args))
            .unwrap_or_else(|e| json!({"error": e.to_string()}));
        println!("{report}");
        return std::process::ExitCode::SUCCESS;
    }
    if args.first().map(String::as_str) == Some("--role") {
        // A consumer child. EVENTSOURCE_BENCH_CONSUMER_THREADS=N gives it a multi-thread
        // runtime (the next batch is then parsed on another worker while one is handled).
        let threads: usize = std::env::var("EVENTSOURCE_BENCH_CONSUMER_THREADS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let rt = if threads > 1 {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .enable_all()
                .build()
                .expect("runtime")
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
        };
        let report = rt
            .block_on(consumer_role(&args))
            .unwrap_or_else(|e| json!({"error": e.to_string()}));
        println!("{report}");
        return std::process::ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return std::process::ExitCode::SUCCESS;
    }
    let options = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    // One thread, as a client waiting for each reply would be: the raw limits and the bus
    // run on the same kind of runtime (a multi-thread runtime whose caller is not on a
    // worker costs a single awaited call a third of its rate here).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut results = BTreeMap::new();
    let mut failed = false;
    for name in &options.workloads {
        eprintln!("{name}:");
        let result = rt.block_on(async {
            match name.as_str() {
                "publish_single" | "publish_batch100" | "publish_concurrent16" => {
                    publish_workload(&options, name).await
                }
                "consume_1" | "consume_2proc" | "consume_2proc_slow" => {
                    consume_workload(&options, name).await
                }
                "consume_2proc_slowhandler_dup" => {
                    one(name, slow_two_consumers_workload(&options).await)
                }
                "consume_1_tls" => one(name, consume_tls_workload(&options).await),
                "consume_1_metrics" => one(name, consume_metrics_workload(&options).await),
                "consume_1_3handlers" => one(name, consume_handlers_workload(&options).await),
                "dispatch_3handlers" => one(name, dispatch_handlers_workload(&options).await),
                "latency_500" => one(name, latency_workload(&options, 500).await),
                "latency_5000" => one(name, latency_workload(&options, 5000).await),
                n if pg::WORKLOADS.contains(&n) => pg::workload(&options, n).await,
                _ => one(name, rss_workload(&options).await),
            }
        });
        match result {
            Ok(values) => results.extend(values),
            Err(e) => {
                failed = true;
                eprintln!("  {name} failed: {e}");
                results.insert(name.clone(), json!({"error": e.to_string()}));
            }
        }
    }
    println!("{}", serde_json::to_string(&results).expect("JSON"));
    if failed {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

//! The consumer child processes: [`consume_run`] starts them on a pre-filled stream and
//! collects their reports; [`run_role`] is the child itself (this binary with the hidden
//! `--role consumer` and the [`ConsumerArgs`] that [`Spec::args`] writes).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::RedisEventBus;
use redis::Value;
use serde_json::{Value as Json, json};

use crate::fixture::{
    Profile, delete_prefix, now_us, peak_rss_kib, prefill, prefix, profile_config, raw_conn,
    registry, subscribe_reader,
};
use crate::{Error, Options};

/// How the consumer children of a run are configured.
#[derive(Debug, Clone)]
pub(crate) struct Spec {
    pub(crate) profile: Profile,
    /// Handler time per event.
    pub(crate) sleep_ms: u64,
    pub(crate) concurrency: usize,
    pub(crate) batch_size: Option<usize>,
    pub(crate) pending_idle_ms: Option<u64>,
    pub(crate) recovery_interval_ms: Option<u64>,
    /// Read with redis-rs instead of the bus's own RESP reader.
    pub(crate) redis_rs_reader: bool,
    /// Consumers connect here instead of the workload's Redis (the same server's TLS port).
    pub(crate) consumer_url: Option<String>,
    /// CA file for a `rediss://` consumer URL.
    pub(crate) tls_ca_file: Option<String>,
    /// The consumer installs a Prometheus recorder (metrics recorded, not scraped).
    pub(crate) metrics: bool,
    /// Typed handlers on `OrderCreated` in the consumer (the first counts, all read the
    /// event).
    pub(crate) handlers: usize,
}

impl Spec {
    pub(crate) fn new(profile: Profile) -> Self {
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

    pub(crate) fn handler(mut self, sleep_ms: u64, concurrency: usize) -> Self {
        self.sleep_ms = sleep_ms;
        self.concurrency = concurrency;
        self
    }

    /// The child's arguments after those naming the stream (see [`ConsumerArgs`]).
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
        if self.redis_rs_reader {
            args.push("--redis-rs-reader".to_owned());
        }
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
pub(crate) struct RunReport {
    pub(crate) events_per_sec: f64,
    /// Peak RSS of the largest child, MiB.
    pub(crate) rss_mib: f64,
    /// Handler runs, summed over the children.
    pub(crate) handled: u64,
    pub(crate) acks_not_applied: u64,
    pub(crate) recovered: u64,
    pub(crate) taken_over: u64,
}

/// Runs consumer children on a pre-filled stream of `n` events.
pub(crate) async fn consume_run(
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

/// The arguments of `--role consumer` (written by [`consume_run`] and [`Spec::args`]).
/// `EVENTSOURCE_BENCH_METRICS=1` in the environment installs a Prometheus recorder;
/// `EVENTSOURCE_BENCH_CONSUMER_THREADS=N` gives the child a multi-thread runtime.
#[derive(Debug, Clone, Args)]
pub(crate) struct ConsumerArgs {
    /// The Redis the run's stream is on.
    #[arg(long)]
    redis_url: String,
    /// The run's stream prefix.
    #[arg(long)]
    prefix: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// This consumer's name in the group.
    #[arg(long)]
    name: String,
    /// Entries in the stream: the child stops once the group has read them all and nothing
    /// is pending.
    #[arg(long)]
    expect_total: u64,
    /// Handler time per event.
    #[arg(long)]
    sleep_ms: u64,
    /// `handler_concurrency`.
    #[arg(long)]
    concurrency: usize,
    /// The bus configuration.
    #[arg(long, value_enum)]
    profile: Profile,
    /// Typed handlers on the event type.
    #[arg(long, default_value_t = 1)]
    handlers: usize,
    /// Connect here instead of `--redis-url` (the same server's TLS port).
    #[arg(long)]
    consumer_url: Option<String>,
    /// CA file for a `rediss://` consumer URL.
    #[arg(long)]
    tls_ca_file: Option<String>,
    #[arg(long)]
    batch_size: Option<usize>,
    #[arg(long)]
    pending_idle_ms: Option<u64>,
    #[arg(long)]
    recovery_interval_ms: Option<u64>,
    /// Read with redis-rs (`own_reader = false`).
    #[arg(long)]
    redis_rs_reader: bool,
}

/// The consumer child: runs [`consumer_role`] on its runtime and returns its report (or
/// `{"error": ...}`) for the parent to read from the last line of standard output.
pub(crate) fn run_role(args: ConsumerArgs) -> Json {
    // EVENTSOURCE_BENCH_CONSUMER_THREADS=N gives the child a multi-thread runtime (the next
    // batch is then parsed on another worker while one is handled).
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
    rt.block_on(consumer_role(args))
        .unwrap_or_else(|e| json!({"error": e.to_string()}))
}

/// Consumes until the group has read `expect_total` entries and nothing is pending, then
/// reports.
async fn consumer_role(args: ConsumerArgs) -> Result<Json, Error> {
    let ConsumerArgs {
        redis_url: url,
        prefix,
        group,
        name,
        expect_total: expect,
        sleep_ms,
        concurrency,
        profile,
        handlers,
        consumer_url,
        tls_ca_file,
        batch_size,
        pending_idle_ms,
        recovery_interval_ms,
        redis_rs_reader,
    } = args;
    let consumer_url = consumer_url.unwrap_or_else(|| url.clone());
    let mut config = profile_config(profile, &consumer_url, &prefix, &group, &name)
        .handler_concurrency(concurrency)
        .own_reader(!redis_rs_reader);
    config.tls_ca_file = tls_ca_file.map(Into::into);
    if let Some(v) = batch_size {
        config.batch_size = v;
    }
    if let Some(v) = pending_idle_ms {
        config.pending_idle = Duration::from_millis(v);
    }
    if let Some(v) = recovery_interval_ms {
        config.recovery_interval = Duration::from_millis(v);
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
    let stats = bus.stats();
    Ok(json!({
        "name": name,
        "handled": handled.load(Ordering::Relaxed),
        "start_us": start_us,
        "last_us": last.load(Ordering::Relaxed),
        "vmhwm_kib": peak_rss_kib(),
        "expect_total": expect,
        "acks_not_applied": stats.acks_not_applied,
        "messages_recovered": stats.messages_recovered,
        "entries_taken_over": stats.entries_taken_over,
    }))
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Invocation, Role};

    #[test]
    fn the_child_reads_what_the_parent_writes() {
        let spec = Spec {
            batch_size: Some(10),
            pending_idle_ms: Some(1000),
            tls_ca_file: Some("ca.crt".into()),
            handlers: 3,
            ..Spec::new(Profile::NoTracing).handler(150, 4)
        };
        let mut args: Vec<String> = ["bench", "--role", "consumer", "--redis-url", "redis://r"]
            .into_iter()
            .chain(["--prefix", "p", "--group", "g", "--name", "c0"])
            .chain(["--expect-total", "7"])
            .map(String::from)
            .collect();
        args.extend(spec.args());
        let cli = Cli::try_parse_from(args).expect("parses");
        let Invocation::Child(Role::Consumer(a)) = cli.invocation() else {
            panic!("a consumer");
        };
        assert_eq!(
            (a.profile, a.sleep_ms, a.concurrency),
            (Profile::NoTracing, 150, 4)
        );
        assert_eq!(
            (a.handlers, a.batch_size, a.pending_idle_ms),
            (3, Some(10), Some(1000))
        );
        assert_eq!((a.expect_total, a.recovery_interval_ms), (7, None));
        assert_eq!(a.tls_ca_file.as_deref(), Some("ca.crt"));
    }
}

//! The consuming workloads: consumer child processes (see [`crate::consumer`]) on a
//! pre-filled stream — `consume_1`, `consume_2proc`, `consume_2proc_slow`,
//! `consume_2proc_slowhandler_dup`, `consume_1_tls`, `consume_1_metrics`,
//! `consume_1_3handlers`, `rss` — and `dispatch_3handlers`, the in-process dispatch that
//! `consume_1_3handlers` pays for.

use std::time::{Duration, Instant};

use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use serde_json::{Value as Json, json};

use crate::consumer::{RunReport, Spec, consume_run};
use crate::fixture::{Profile, registry, subscribe_reader};
use crate::limits::{raw_consume, raw_consume_physical};
use crate::stats::{median_ratio, stat, stat_json, stat_json_scaled, throughput_json};
use crate::{Error, Options};

/// `consume_1` (one consumer next to the raw loops), `consume_2proc` (two processes vs one) and
/// `consume_2proc_slow` (the same with a 1 ms handler).
pub(crate) async fn consume_workload(
    o: &Options,
    name: &str,
) -> Result<Vec<(String, Json)>, Error> {
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
            let ratio = |a: &[f64], b: &[f64]| median_ratio(a, b, 1000.0);
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
            out["ratio_to_one_consumer"] = json!(median_ratio(&two, &one, 100.0));
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
                j["ratio_to_one_consumer"] = json!(median_ratio(two, one, 100.0));
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
pub(crate) async fn slow_two_consumers_workload(o: &Options) -> Result<Json, Error> {
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
pub(crate) async fn consume_tls_workload(o: &Options) -> Result<Json, Error> {
    let n = o.n.unwrap_or(20_000);
    let dir = std::env::temp_dir().join(format!("es-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    eventsource_testsupport::try_certificates(&dir).map_err(|e| format!("consume_1_tls: {e}"))?;
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
    out["ratio_to_plain"] = json!(median_ratio(&tls_rates, &plain_rates, 100.0));
    Ok(out)
}

/// `consume_1` with a Prometheus recorder installed in the consumer next to none.
pub(crate) async fn consume_metrics_workload(o: &Options) -> Result<Json, Error> {
    let with = Spec {
        metrics: true,
        ..Spec::new(Profile::Quick)
    };
    quick_versus(
        o,
        "consume_1_metrics",
        &with,
        ("recorder installed", "none"),
        "workload settings (batch 100, block 100 ms, tracing off); the consumer process with a Prometheus recorder installed (every metric recorded, never scraped) vs without one; limit_* is the run without",
    )
    .await
}

/// `consume_1` with 3 typed handlers on the event type next to 1.
pub(crate) async fn consume_handlers_workload(o: &Options) -> Result<Json, Error> {
    let with = Spec {
        handlers: 3,
        ..Spec::new(Profile::Quick)
    };
    quick_versus(
        o,
        "consume_1_3handlers",
        &with,
        ("3 handlers", "1 handler"),
        "workload settings (batch 100, block 100 ms, tracing off); 3 typed handlers on OrderCreated, each reading the event, vs 1; limit_* is the run with 1",
    )
    .await
}

/// One consumer process at the workload settings with `with` next to without, `repeat`
/// times; `with`'s rate against the plain run's (reported as the limit).
async fn quick_versus(
    o: &Options,
    name: &str,
    with: &Spec,
    (with_label, plain_label): (&str, &str),
    config: &str,
) -> Result<Json, Error> {
    let n = o.n.unwrap_or(20_000);
    let (mut plain, mut changed) = (vec![], vec![]);
    for run in 1..=o.repeat {
        plain.push(
            consume_run(o, n, 1, &Spec::new(Profile::Quick))
                .await?
                .events_per_sec,
        );
        changed.push(consume_run(o, n, 1, with).await?.events_per_sec);
        eprintln!(
            "  {name} run {run}: {with_label} {:>9.0}/s   {plain_label} {:>9.0}/s   ratio {:.3}",
            changed[run - 1],
            plain[run - 1],
            changed[run - 1] / plain[run - 1]
        );
    }
    let mut out = throughput_json(&changed, Some(&plain));
    out["n"] = json!(n);
    out["config"] = json!(config);
    Ok(out)
}

/// In process: a registry-decoded event (as the Redis consumer hands it over) dispatched to
/// 3 typed handlers vs 1, `n` times each.
pub(crate) async fn dispatch_handlers_workload(o: &Options) -> Result<Json, Error> {
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

/// The peak RSS of one consumer process over `n` events (default 200,000).
pub(crate) async fn rss_workload(o: &Options) -> Result<Json, Error> {
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
    Ok(json!({
        "peak_rss_mib": stat_json_scaled(&rss, 10.0),
        "n": n,
        "events_per_sec": stat_json(stat(&rate)),
    }))
}

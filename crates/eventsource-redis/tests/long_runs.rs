//! The long runs of the fault matrix, behind a documented command and not in CI:
//!
//! ```text
//! cargo test --release -p eventsource-redis --test long_runs -- --ignored --nocapture l2
//! cargo test --release -p eventsource-redis --test long_runs -- --ignored --nocapture l3
//! ```
//!
//! - **L-2**: 1,000,000 events (`EVENTSOURCE_L2_EVENTS`) published to a Redis with an
//!   append-only file (fsync always) and consumed by four worker processes (16 handlers in
//!   flight each), while — until every event is handled — a worker is killed with SIGKILL and
//!   restarted under the same name every 3 s (R-1), every client connection is killed every
//!   5 s (R-11), and Redis itself is killed with SIGKILL once, halfway through publishing, and
//!   restarted from its AOF (R-16). Judged by the ledger: lost 0, duplicates within the bound
//!   the kills allow.
//! - **L-3**: a soak of 30 minutes (`EVENTSOURCE_L3_MINUTES`) at `EVENTSOURCE_L3_RATE` events
//!   per second (default 26,000: half the 52,000 events/s the L-1 load test reaches in a release
//!   build on the reference machine) with four consumers in one group and one in another and a safe trim every
//!   10 s; resident memory, file descriptors, live tokio tasks and the stream's length are
//!   sampled every 10 s and must stay flat. Losses are checked with per-group counts and
//!   sums of event numbers (a ledger of millions of ids would itself be the memory growth
//!   the soak looks for).
//!
//! `docs/reliability.md` has the last results.

mod common;

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::RedisEventBus;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn spawn_worker(url: &str, prefix: &str, name: &str) -> tokio::process::Child {
    worker_command()
        .env("EVENTSOURCE_REDIS_URL", url)
        .env("EVENTSOURCE_REDIS_STREAM_PREFIX", prefix)
        .env("EVENTSOURCE_REDIS_CONSUMER_GROUP", "workers")
        .env("EVENTSOURCE_REDIS_CONSUMER_NAME", name)
        .env("EVENTSOURCE_REDIS_BATCH_SIZE", "100")
        .env("EVENTSOURCE_REDIS_BLOCK_MS", "200")
        .env("EVENTSOURCE_REDIS_PENDING_IDLE_MS", "3000")
        .env("EVENTSOURCE_REDIS_RECOVERY_INTERVAL_MS", "1000")
        .env("EVENTSOURCE_REDIS_RECONNECT_MAX_DELAY_MS", "500")
        .env("EVENTSOURCE_REDIS_SOCKET_TIMEOUT", "2")
        .env("EVENTSOURCE_REDIS_HANDLER_CONCURRENCY", "16")
        .env("WORKER_LEDGER_URL", redis_url())
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("the worker starts")
}

async fn scard(url: &str, key: &str) -> u64 {
    let Ok(client) = redis::Client::open(url) else {
        return 0;
    };
    let Ok(mut conn) = client
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
    else {
        return 0;
    };
    redis::cmd("SCARD")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap_or(0)
}

/// L-2: see the module docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long run: cargo test --release -p eventsource-redis --test long_runs -- --ignored l2"]
async fn l2_a_million_events_under_kills_lose_nothing() {
    let n: usize = env_or("EVENTSOURCE_L2_EVENTS", 1_000_000);
    let port = free_port();
    let dir = temp_dir("l2");
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut server = OwnRedis::start(port, &dir, &aof);
    let url = server.url();
    let prefix = unique_prefix("l2");
    // The workers' records live in the shared Redis (not the one that is killed).
    let _c = Cleanup(prefix.clone());
    let ledger = Arc::new(Ledger::new());
    let names: Vec<String> = (1..=4).map(|i| format!("w{i}")).collect();
    let mut workers: HashMap<String, tokio::process::Child> = names
        .iter()
        .map(|name| (name.clone(), spawn_worker(&url, &prefix, name)))
        .collect();
    let publisher = bus(config(&prefix, "workers", "publisher")
        .redis_url(url.clone())
        .reconnect_max_delay_ms(500)
        .socket_timeout(std::time::Duration::from_secs(2)));
    publisher.connect().await.unwrap();
    let published = Arc::new(AtomicUsize::new(0));
    let republished = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let publishing = {
        let (publisher, ledger, published, republished) = (
            publisher.clone(),
            ledger.clone(),
            published.clone(),
            republished.clone(),
        );
        tokio::spawn(async move {
            let mut i = 0;
            while i < n {
                let batch: Vec<EventEnvelope> = (i..(i + 100).min(n)).map(created).collect();
                // Retried until acknowledged, with the same ids (a retry after an
                // indeterminate attempt may store an event twice: counted as duplicates).
                for attempt in 0.. {
                    if attempt > 0 {
                        republished.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    if publish_recorded(&publisher, &ledger, &batch).await.is_ok() {
                        break;
                    }
                    assert!(attempt < 300, "publishing never recovered");
                }
                i += batch.len();
                published.store(i, Ordering::Relaxed);
            }
        })
    };
    // The chaos, until every event published ok is handled: workers killed and restarted,
    // connections killed, Redis killed once (halfway through publishing).
    let mut worker_kills = 0;
    let mut connection_kills = 0;
    let mut redis_kills = 0;
    let mut tick = 0u64;
    let handled_key = format!("{prefix}:handled");
    let mut publish_time = None;
    let deadline = started + Duration::from_secs(env_or("EVENTSOURCE_L2_MAX_SECS", 1800));
    let done = loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        tick += 1;
        if publishing.is_finished() && publish_time.is_none() {
            publish_time = Some(started.elapsed());
            ledger.healed();
            eprintln!("L-2: {n} published in {:?}", started.elapsed());
        }
        if publish_time.is_some()
            && scard(&redis_url(), &handled_key).await >= ledger.published_ok().len() as u64
        {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        if tick.is_multiple_of(3) {
            let name = &names[fastrand::usize(..names.len())];
            if let Some(mut w) = workers.remove(name) {
                let _ = w.start_kill();
                let _ = w.wait().await;
            }
            workers.insert(name.clone(), spawn_worker(&url, &prefix, name));
            worker_kills += 1;
        }
        if tick.is_multiple_of(5) {
            let _ = kill_all_clients(&url).await;
            connection_kills += 1;
        }
        if redis_kills == 0 && published.load(Ordering::Relaxed) >= n / 2 {
            server.kill();
            server = OwnRedis::start(port, &dir, &aof);
            redis_kills += 1;
            eprintln!(
                "L-2: Redis killed and restarted from its AOF at {:?}",
                started.elapsed()
            );
        }
        if tick.is_multiple_of(30) {
            eprintln!(
                "L-2: {:?}: published {}, handled {}, {worker_kills} worker kills, \
                 {connection_kills} connection kills",
                started.elapsed(),
                published.load(Ordering::Relaxed),
                scard(&redis_url(), &handled_key).await
            );
        }
    };
    publishing.await.unwrap();
    let publish_time = publish_time.unwrap_or_default();
    let total = started.elapsed();
    for (_, mut w) in workers {
        let _ = w.start_kill();
        let _ = w.wait().await;
    }
    ledger.import_redis_list(&redis_url(), &format!("{prefix}:ledger"));
    let bound = (worker_kills + 4 * connection_kills + 4 * redis_kills) * 200
        + republished.load(Ordering::Relaxed) * 100;
    let report = ledger.check(
        &Expect::new("L-2 1,000,000 events under kills", &["workers"]).duplicates_at_most(
            bound,
            "each worker kill, connection kill or Redis kill can redeliver at most what each \
             worker held (its batch of 100 and the batch read ahead), and each republished \
             batch can be stored twice",
        ),
    );
    eprintln!(
        "L-2 | {n} events | {worker_kills} worker kills, {connection_kills} connection kills, \
         {redis_kills} Redis kill -9 | published in {:.0} s, all handled after {:.0} s",
        publish_time.as_secs_f64(),
        total.as_secs_f64()
    );
    assert!(done, "the workers did not finish");
    report.assert_ok();
    drop(server);
}

async fn kill_all_clients(url: &str) -> redis::RedisResult<i64> {
    let client = redis::Client::open(url)?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await?;
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("normal")
        .arg("SKIPME")
        .arg("yes")
        .query_async(&mut conn)
        .await
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Per group: handled count and the sum of the handled events' numbers.
#[derive(Default)]
struct Tally {
    count: AtomicU64,
    sum: AtomicU64,
}

/// L-3: see the module docs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long run: cargo test --release -p eventsource-redis --test long_runs -- --ignored l3"]
async fn l3_soak_memory_fds_and_tasks_stay_flat() {
    let minutes: u64 = env_or("EVENTSOURCE_L3_MINUTES", 30);
    let rate: u64 = env_or("EVENTSOURCE_L3_RATE", 26_000);
    let server = OwnRedis::start(free_port(), &temp_dir("l3"), &[]);
    let prefix = "l3";
    let tallies: Arc<HashMap<&'static str, Tally>> = Arc::new(
        [("workers", Tally::default()), ("audit", Tally::default())]
            .into_iter()
            .collect(),
    );
    let mut buses: Vec<RedisEventBus> = Vec::new();
    for (group, name) in [
        ("workers", "w1"),
        ("workers", "w2"),
        ("workers", "w3"),
        ("workers", "w4"),
        ("audit", "a1"),
    ] {
        let b = bus(config(prefix, group, name)
            .redis_url(server.url())
            .batch_size(100)
            .recovery_interval_ms(5_000));
        let tallies = tallies.clone();
        let g: &'static str = if group == "workers" {
            "workers"
        } else {
            "audit"
        };
        b.subscribe(move |e: Event<OrderCreated>| {
            let tally = &tallies[g];
            let number: u64 = e.data.customer_id[5..].parse().unwrap_or(0);
            tally.count.fetch_add(1, Ordering::Relaxed);
            tally.sum.fetch_add(number, Ordering::Relaxed);
            async {}
        });
        b.connect().await.unwrap();
        buses.push(b);
    }
    let tasks: Vec<_> = buses.iter().map(spawn_consumer).collect();
    let halt = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (b, halt, published) = (buses[0].clone(), halt.clone(), published.clone());
        tokio::spawn(async move {
            let batch = 50u64;
            let every = Duration::from_micros(batch * 1_000_000 / rate);
            let mut next = tokio::time::Instant::now();
            let mut i = 0u64;
            while !halt.load(Ordering::Relaxed) {
                let events: Vec<EventEnvelope> =
                    (i..i + batch).map(|k| created(k as usize)).collect();
                b.publish_events(&events).await.expect("publishing works");
                i += batch;
                published.store(i, Ordering::Relaxed);
                next += every;
                tokio::time::sleep_until(next).await;
            }
        })
    };
    let trimmer = {
        let (b, halt) = (buses[0].clone(), halt.clone());
        tokio::spawn(async move {
            let mut removed = 0;
            while !halt.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(10)).await;
                if let Ok(report) = b.trim_acknowledged().await {
                    removed += report.removed;
                }
            }
            removed
        })
    };
    let mut raw = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let started = Instant::now();
    let mut samples = Vec::new();
    println!(
        "L-3 | t (s) | RSS (KiB) | fds | tokio tasks | stream length | published | handled workers | handled audit"
    );
    while started.elapsed() < Duration::from_secs(minutes * 60) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        let xlen: u64 = redis::cmd("XLEN")
            .arg(buses[0].stream_name())
            .query_async(&mut raw)
            .await
            .unwrap_or(0);
        let sample = (
            started.elapsed().as_secs(),
            rss_kib(),
            open_fds(),
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks(),
            xlen,
        );
        println!(
            "L-3 | {} | {} | {} | {} | {} | {} | {} | {}",
            sample.0,
            sample.1,
            sample.2,
            sample.3,
            sample.4,
            published.load(Ordering::Relaxed),
            tallies["workers"].count.load(Ordering::Relaxed),
            tallies["audit"].count.load(Ordering::Relaxed)
        );
        samples.push(sample);
    }
    halt.store(true, Ordering::Relaxed);
    publisher.await.unwrap();
    let removed = trimmer.await.unwrap();
    let n = published.load(Ordering::Relaxed);
    let expected_sum = n * (n - 1) / 2;
    let complete = wait_until(Duration::from_secs(60), || async {
        tallies
            .values()
            .all(|t| t.count.load(Ordering::Relaxed) >= n)
    })
    .await;
    for (b, t) in buses.iter().zip(tasks) {
        stop(b, t).await;
    }
    assert!(complete, "not every event was handled in both groups");
    for (group, tally) in tallies.iter() {
        assert_eq!(
            (
                tally.count.load(Ordering::Relaxed),
                tally.sum.load(Ordering::Relaxed)
            ),
            (n, expected_sum),
            "group {group}: lost or duplicated events"
        );
    }
    // Flat: the last fifth against the first fifth (after a minute of warm-up).
    let warm: Vec<_> = samples.iter().filter(|s| s.0 >= 60).collect();
    let fifth = (warm.len() / 5).max(1);
    let avg = |xs: &[&(u64, u64, usize, usize, u64)],
               f: fn(&(u64, u64, usize, usize, u64)) -> f64| {
        xs.iter().map(|s| f(s)).sum::<f64>() / xs.len() as f64
    };
    let (first, last) = (&warm[..fifth], &warm[warm.len() - fifth..]);
    let rss = (avg(first, |s| s.1 as f64), avg(last, |s| s.1 as f64));
    let fds = (avg(first, |s| s.2 as f64), avg(last, |s| s.2 as f64));
    let tasks = (avg(first, |s| s.3 as f64), avg(last, |s| s.3 as f64));
    let max_len = samples.iter().map(|s| s.4).max().unwrap_or(0);
    println!(
        "L-3 summary | {minutes} min at {rate}/s | {n} events per group, lost 0, duplicated 0 | \
         RSS {:.0} → {:.0} KiB | fds {:.1} → {:.1} | tasks {:.1} → {:.1} | stream length max \
         {max_len}, trimmed {removed}",
        rss.0, rss.1, fds.0, fds.1, tasks.0, tasks.1
    );
    assert!(rss.1 < rss.0 * 1.10 + 4096.0, "memory grew: {rss:?}");
    assert!(fds.1 <= fds.0 + 2.0, "file descriptors grew: {fds:?}");
    assert!(tasks.1 <= tasks.0 + 5.0, "tasks grew: {tasks:?}");
    assert!(
        max_len < rate * 120,
        "the stream was not kept short by trimming: {max_len}"
    );
}

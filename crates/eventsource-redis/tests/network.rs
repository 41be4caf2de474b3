//! The network rows of the fault matrix (R-23, R-24, R-26, R-28, plus fragmented and cut
//! replies), through the test support's TCP fault proxy between the bus and a Redis of the
//! test's own. Every scenario is judged by the shared ledger: lost 0, duplicates within the
//! stated bound, nothing unexpected, time to recover reported.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};

/// A Redis of the test's own with the fault proxy in front of it.
struct Net {
    _redis: OwnRedis,
    proxy: FaultProxy,
    prefix: String,
}

impl Net {
    fn start(tag: &str) -> Self {
        let redis = OwnRedis::start(free_port(), &temp_dir(tag), &[]);
        let proxy = FaultProxy::start(redis.port);
        Self {
            _redis: redis,
            proxy,
            prefix: unique_prefix(tag),
        }
    }

    /// A bus that talks to Redis through the proxy, with a 1 s response timeout.
    fn bus(&self, name: &str, tweak: impl FnOnce(&mut RedisEventBusConfig)) -> RedisEventBus {
        let mut cfg = config(&self.prefix, "workers", name)
            .redis_url(self.proxy.url())
            .socket_timeout(std::time::Duration::from_secs(1))
            .socket_connect_timeout(std::time::Duration::from_secs(1))
            .block_ms(200)
            .reconnect_max_delay_ms(500);
        tweak(&mut cfg);
        bus(cfg)
    }
}

/// A consumer recording into a fresh ledger, running, and a connected publisher, both
/// talking to Redis through the proxy.
struct Flow {
    ledger: Arc<Ledger>,
    consumer: RedisEventBus,
    publisher: RedisEventBus,
    task: tokio::task::JoinHandle<Result<(), eventsource_redis::RedisBusError>>,
}

impl Net {
    async fn flow(&self, tweak: impl Fn(&mut RedisEventBusConfig)) -> Flow {
        let ledger = Arc::new(Ledger::new());
        let consumer = self.bus("c1", &tweak);
        ledger_handler(&consumer, &ledger);
        let publisher = self.bus("publisher", &tweak);
        publisher.connect().await.unwrap();
        let task = spawn_consumer(&consumer);
        Flow {
            ledger,
            consumer,
            publisher,
            task,
        }
    }
}

/// Publishes one event at a time from `tasks` concurrent tasks until `stop` is set (or
/// `limit` events each), recording every outcome; returns the slowest single publish.
fn publish_loop(
    bus: &RedisEventBus,
    ledger: &Arc<Ledger>,
    tasks: usize,
    limit: usize,
    pause: Duration,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Duration> {
    let (bus, ledger, stop) = (bus.clone(), ledger.clone(), stop.clone());
    tokio::spawn(async move {
        let slowest = Arc::new(AtomicU64::new(0));
        let mut set = tokio::task::JoinSet::new();
        for t in 0..tasks {
            let (bus, ledger, stop, slowest) =
                (bus.clone(), ledger.clone(), stop.clone(), slowest.clone());
            set.spawn(async move {
                for i in 0..limit {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let started = Instant::now();
                    let _ = publish_recorded(&bus, &ledger, &[created(t * limit + i)]).await;
                    slowest.fetch_max(started.elapsed().as_micros() as u64, Ordering::SeqCst);
                    tokio::time::sleep(pause).await;
                }
            });
        }
        while set.join_next().await.is_some() {}
        Duration::from_micros(slowest.load(Ordering::SeqCst))
    })
}

/// Two tasks publishing one event every 20 ms each until `halt`.
fn publish_steadily(
    bus: &RedisEventBus,
    ledger: &Arc<Ledger>,
    halt: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Duration> {
    publish_loop(bus, ledger, 2, 100_000, Duration::from_millis(20), halt)
}

async fn wait_complete(ledger: &Ledger, timeout: Duration) -> bool {
    wait_until(timeout, || async { ledger.complete(&["workers"]) }).await
}

/// latency of 50 ± 25 ms, then 200 ± 100 ms, on every chunk in both directions, with
/// the default timeouts (`socket_timeout` 5 s, `block_ms` 2 s): no publish fails, no
/// connection is dropped, nothing is lost or handled twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r23_latency_with_jitter_causes_no_spurious_failures() {
    let net = Net::start("r23");
    let Flow {
        ledger,
        consumer,
        publisher,
        task,
    } = net
        .flow(|c: &mut RedisEventBusConfig| {
            let d = RedisEventBusConfig::default();
            c.socket_timeout = d.socket_timeout;
            c.socket_connect_timeout = d.socket_connect_timeout;
            c.block = d.block;
        })
        .await;
    let halt = Arc::new(AtomicBool::new(false));
    for (base, jitter) in [(50, 25), (200, 100)] {
        net.proxy
            .latency(Duration::from_millis(base), Duration::from_millis(jitter));
        let slowest = publish_loop(&publisher, &ledger, 16, 8, Duration::ZERO, &halt)
            .await
            .unwrap();
        eprintln!("latency {base} ± {jitter} ms: slowest publish {slowest:?}");
    }
    let complete = wait_complete(&ledger, Duration::from_secs(30)).await;
    assert!(
        complete,
        "handled {} of {}; consumer {:?}; pending {:?}",
        ledger.handled_ids("workers").len(),
        ledger.published_ok().len(),
        consumer.stats(),
        consumer.pending_entries(10).await
    );
    stop_and_check_quiet(&consumer, task).await;
    // From publish to handling (a start recorded per entry cost a round trip each when a
    // read-ahead batch waited over 100 ms: up to 6 s here before the wait scaled with the
    // round trip).
    let mut times = ledger.delivery_times("workers");
    times.sort();
    eprintln!(
        "publish to handling: median {:?}, max {:?}",
        times[times.len() / 2],
        times.last().unwrap()
    );
    let report = ledger.check(&Expect::new(
        "R-23 latency 50±25 then 200±100 ms",
        &["workers"],
    ));
    report.assert_ok();
    assert_eq!(
        (report.failed, report.indeterminate),
        (0, 0),
        "no publish failed"
    );
}

async fn stop_and_check_quiet(
    consumer: &RedisEventBus,
    task: tokio::task::JoinHandle<Result<(), eventsource_redis::RedisBusError>>,
) {
    stop(consumer, task).await;
    let stats = consumer.stats();
    assert_eq!(stats.reconnections, 0, "no connection dropped: {stats:?}");
    assert_eq!(stats.handler_errors, 0);
    assert_eq!(stats.malformed_messages, 0);
}

/// a blackhole for 10 s (sockets open, nothing forwarded) while events are published
/// and consumed. The consumer notices within its read timeout (block + response timeout)
/// and reconnects instead of hanging; every publish returns within the response timeout
/// (indeterminate, not hung); after the blackhole everything published ok is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r24_blackhole_is_detected_within_the_response_timeout() {
    let net = Net::start("r24");
    let Flow {
        ledger,
        consumer,
        publisher,
        task,
    } = net.flow(|_| {}).await;
    let halt = Arc::new(AtomicBool::new(false));
    let publishing = publish_steadily(&publisher, &ledger, &halt);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = consumer.stats().reconnections;
    net.proxy.blackhole(true);
    let started = Instant::now();
    // block 200 ms + response timeout 1 s: the read must fail by then (plus scheduling slack).
    let noticed = wait_until(Duration::from_secs(5), || async {
        consumer.stats().reconnections > before
    })
    .await;
    let noticed_after = started.elapsed();
    assert!(noticed, "the consumer never noticed the blackhole");
    eprintln!("consumer noticed the blackhole after {noticed_after:?}");
    // block 200 ms + response timeout 1 s = 1.2 s; the slack is for a busy shared machine
    // (a hang would never notice at all).
    assert!(
        noticed_after < Duration::from_millis(1200 + 3000),
        "noticed after {noticed_after:?}, long after block + response timeout (1.2 s)"
    );
    tokio::time::sleep(Duration::from_secs(10).saturating_sub(started.elapsed())).await;
    net.proxy.blackhole(false);
    ledger.healed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    halt.store(true, Ordering::SeqCst);
    let slowest = publishing.await.unwrap();
    assert!(wait_complete(&ledger, Duration::from_secs(30)).await);
    stop(&consumer, task).await;
    let report = ledger.check(
        &Expect::new("R-24 blackhole 10 s", &["workers"]).duplicates_at_most(
            0,
            "entries delivered in a reply lost in the blackhole are re-read, not re-handled",
        ),
    );
    report.assert_ok();
    assert!(
        report.indeterminate > 0,
        "publishes during the blackhole timed out"
    );
    assert!(
        slowest < Duration::from_secs(5),
        "a publish hung for {slowest:?} (response timeout 1 s)"
    );
    let recover = report.group("workers").time_to_recover.unwrap();
    eprintln!("time to recover after the blackhole: {recover:?}");
    assert!(
        recover < Duration::from_secs(15),
        "recovered after {recover:?}"
    );
}

/// the port first drops everything (as a kernel DROP rule would), then resets every
/// connection and every new one for 2 s (a REJECT with tcp-reset), then heals. The bus
/// reconnects with backoff — a bounded number of attempts, not a tight loop — and loses
/// nothing that was acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r26_drop_then_reset_reconnects_with_backoff() {
    let net = Net::start("r26");
    let Flow {
        ledger,
        consumer,
        publisher,
        task,
    } = net.flow(|_| {}).await;
    let halt = Arc::new(AtomicBool::new(false));
    let publishing = publish_steadily(&publisher, &ledger, &halt);
    tokio::time::sleep(Duration::from_millis(500)).await;
    net.proxy.blackhole(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The publisher stops here (its attempts are the caller's, not the bus's backoff): only
    // the consumer's reconnects are counted while every connection is reset.
    halt.store(true, Ordering::SeqCst);
    net.proxy.refuse(true);
    net.proxy.reset_all();
    publishing.await.unwrap();
    let accepted = net.proxy.accepted();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let attempts = net.proxy.accepted() - accepted;
    net.proxy.heal();
    ledger.healed();
    let halt = Arc::new(AtomicBool::new(false));
    let publishing = publish_steadily(&publisher, &ledger, &halt);
    tokio::time::sleep(Duration::from_secs(1)).await;
    halt.store(true, Ordering::SeqCst);
    publishing.await.unwrap();
    assert!(wait_complete(&ledger, Duration::from_secs(30)).await);
    stop(&consumer, task).await;
    eprintln!("connection attempts while every connection was reset for 2 s: {attempts}");
    // Mostly the consumer's reader and command connection backing off from 50 ms to 500 ms
    // (jittered): a dozen or two; a tight loop would make thousands.
    assert!(attempts < 60, "{attempts} connection attempts in 2 s");
    let report = ledger.check(&Expect::new("R-26 drop, then reset", &["workers"]));
    report.assert_ok();
    assert!(consumer.stats().reconnections > 0);
}

/// 5 % of the chunks held back for a retransmission timeout (what packet loss does to
/// TCP): latency only — no errors, no reconnection, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r28_packet_loss_is_latency_only() {
    let net = Net::start("r28");
    let Flow {
        ledger,
        consumer,
        publisher,
        task,
    } = net.flow(|_| {}).await;
    net.proxy.loss(0.05);
    let halt = Arc::new(AtomicBool::new(false));
    publish_loop(&publisher, &ledger, 8, 40, Duration::ZERO, &halt)
        .await
        .unwrap();
    assert!(wait_complete(&ledger, Duration::from_secs(30)).await);
    stop_and_check_quiet(&consumer, task).await;
    let report = ledger.check(&Expect::new("R-28 5% loss", &["workers"]));
    report.assert_ok();
    assert_eq!((report.failed, report.indeterminate), (0, 0));
}

/// Replies sliced into writes of 1–7 bytes: the consumer's own RESP reader and redis-rs
/// reassemble every reply — nothing malformed, nothing lost, no reconnection (the default
/// 5 s response timeout covers the slowed replies).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_sliced_into_tiny_writes_are_reassembled() {
    let net = Net::start("slice");
    let ledger = Arc::new(Ledger::new());
    let consumer = net.bus("c1", |c| {
        c.batch_size = 50;
        c.socket_timeout = Duration::from_secs(5);
    });
    ledger_handler(&consumer, &ledger);
    let publisher = net.bus("publisher", |_| {});
    publisher.connect().await.unwrap();
    net.proxy.slice_replies(Some(7));
    let events: Vec<_> = (0..300).map(created).collect();
    for chunk in events.chunks(100) {
        publish_recorded(&publisher, &ledger, chunk).await.unwrap();
    }
    let task = spawn_consumer(&consumer);
    assert!(wait_complete(&ledger, Duration::from_secs(60)).await);
    stop_and_check_quiet(&consumer, task).await;
    ledger
        .check(&Expect::new("replies in 1–7 byte pieces", &["workers"]))
        .assert_ok();
}

/// A link too slow to carry a full batch within the response timeout (replies sliced, 1 s
/// timeout). Before: every read of 50 entries timed out, the re-read of the consumer's own
/// 50 pending entries timed out too, for ever — nothing was handled. Now a timed-out reply
/// halves the entries asked for per read (and each reply that arrives adds one back), so
/// the consumer makes progress: everything is handled, after a bounded number of timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_too_slow_for_a_full_batch_still_makes_progress() {
    let net = Net::start("slowlink");
    let ledger = Arc::new(Ledger::new());
    let consumer = net.bus("c1", |c| c.batch_size = 50);
    ledger_handler(&consumer, &ledger);
    let publisher = net.bus("publisher", |_| {});
    publisher.connect().await.unwrap();
    net.proxy.slice_replies(Some(7));
    let events: Vec<_> = (0..400).map(created).collect();
    for chunk in events.chunks(100) {
        publish_recorded(&publisher, &ledger, chunk).await.unwrap();
    }
    let task = spawn_consumer(&consumer);
    let done = wait_complete(&ledger, Duration::from_secs(90)).await;
    stop(&consumer, task).await;
    let stats = consumer.stats();
    assert!(
        done,
        "handled {} of 400; {stats:?}",
        ledger.handled_ids("workers").len()
    );
    eprintln!("read timeouts (reconnections): {}", stats.reconnections);
    // A sanity bound only: what matters is that it finished (before, nothing was handled).
    assert!(
        stats.reconnections < 100,
        "the read size did not settle: {} timeouts",
        stats.reconnections
    );
    ledger
        .check(
            &Expect::new("slow link, 1 s timeout", &["workers"]).duplicates_at_most(
                0,
                "entries of a timed-out reply are re-read as own pending entries, not re-run",
            ),
        )
        .assert_ok();
}

/// Replies cut in the middle, then the connection reset, again and again while events are
/// published and consumed (the mid-reply form of R-11). Publishes whose reply was cut are
/// indeterminate; those written arrive. Entries whose read reply was cut are re-read as the
/// consumer's own pending entries; an entry handled whose ack reply was cut is handled again
/// (the one duplicate the design allows per cut, bounded by the batch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_cut_mid_way_lose_nothing() {
    let net = Net::start("cut");
    let batch = 20;
    let Flow {
        ledger,
        consumer,
        publisher,
        task,
    } = net.flow(|c| c.batch_size = batch).await;
    let halt = Arc::new(AtomicBool::new(false));
    let publishing = publish_loop(
        &publisher,
        &ledger,
        2,
        100_000,
        Duration::from_millis(5),
        &halt,
    );
    let cuts = 10;
    for _ in 0..cuts {
        tokio::time::sleep(Duration::from_millis(300)).await;
        net.proxy.cut_next_replies(1);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    ledger.healed();
    halt.store(true, Ordering::SeqCst);
    publishing.await.unwrap();
    assert!(wait_complete(&ledger, Duration::from_secs(30)).await);
    stop(&consumer, task).await;
    eprintln!("connections reset by the proxy: {}", net.proxy.resets());
    assert!(net.proxy.resets() >= cuts as u64);
    ledger
        .check(
            &Expect::new("replies cut mid-way", &["workers"]).duplicates_at_most(
                cuts * batch,
                "an ack whose reply was cut may not have been applied: at most one batch \
                 handled again per cut",
            ),
        )
        .assert_ok();
}

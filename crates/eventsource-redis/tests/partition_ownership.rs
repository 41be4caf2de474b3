//! Holding a partition under the user's conditions: a slow handler while the partition is
//! handed over, renewals that cannot get through, and a batch larger than a script may
//! unpack.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;
use eventsource_redis::{PartitionedEventBus, RedisEventBusConfig};

fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

fn partitioned(config: RedisEventBusConfig, partitions: u32) -> PartitionedEventBus {
    PartitionedEventBus::new(
        config
            .partitions(partitions)
            .partition_lease(Duration::from_secs(1)),
        registry(),
    )
    .unwrap()
}

/// Handlers that take `slow` each, counting starts and completions per event.
#[derive(Clone, Default)]
struct Runs {
    started: Arc<std::sync::Mutex<Vec<(String, uuid::Uuid)>>>,
    finished: Arc<AtomicUsize>,
    running: Arc<AtomicUsize>,
    overlap: Arc<AtomicUsize>,
}

impl Runs {
    fn subscribe(&self, bus: &PartitionedEventBus, slow: Duration) {
        let runs = self.clone();
        let me = bus.consumer_name().to_owned();
        bus.subscribe_to_all_events(move |e: EventEnvelope| {
            let (runs, me) = (runs.clone(), me.clone());
            async move {
                runs.started.lock().unwrap().push((me, e.event_id()));
                if runs.running.fetch_add(1, Ordering::SeqCst) > 0 {
                    // Two handlers of one partition at once: ownership broke.
                    runs.overlap.fetch_add(1, Ordering::SeqCst);
                }
                // Counts the handler as not running however it ends (an abandoned handler's
                // future is dropped mid-sleep).
                let _running = Running(runs.running.clone());
                tokio::time::sleep(slow).await;
                runs.finished.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
}

struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_batch_keeps_its_partition_while_it_is_handed_over() {
    logs();
    let prefix = unique_prefix("own-handover");
    let _cleanup = Cleanup(prefix.clone());
    // One partition, handlers of 600 ms, batches of 4: a batch takes 2.4 s, more than twice
    // the 1 s lease.
    let config = |name: &str| config(&prefix, "g", name).batch_size(4);
    let runs = Runs::default();
    let first = partitioned(config("first"), 1);
    runs.subscribe(&first, Duration::from_millis(600));
    first.connect().await.unwrap();
    let events: Vec<EventEnvelope> = (0..8).map(created).collect();
    first.publish_events(&events).await.unwrap();
    let first_task = tokio::spawn({
        let b = first.clone();
        async move { b.start_consuming().await }
    });
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !runs.started.lock().unwrap().is_empty()
        })
        .await
    );
    // The first consumer leaves while its batch runs: the partition passes to the second
    // only after that batch finished; the lease must not lapse in between.
    let second = partitioned(config("second"), 1);
    runs.subscribe(&second, Duration::from_millis(600));
    let second_task = tokio::spawn({
        let b = second.clone();
        async move { b.start_consuming().await }
    });
    let leaving = std::time::Instant::now();
    first.stop_consuming();
    first_task.await.unwrap().unwrap();
    // It finished what it held (the batch in hand and the one read ahead) under its lease,
    // for longer than the lease.
    let held_for = leaving.elapsed();
    assert!(held_for > Duration::from_secs(1), "{held_for:?}");
    // New events go to the second consumer, which took the partition after the release.
    let later: Vec<EventEnvelope> = (8..12).map(created).collect();
    first.publish_events(&later).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            runs.finished.load(Ordering::SeqCst) >= 12 && second.stats().events_consumed == 4
        })
        .await,
        "finished {}, started {:?}, second {:?} {:?}, first {:?}",
        runs.finished.load(Ordering::SeqCst),
        runs.started.lock().unwrap(),
        second.stats(),
        second.ownership_stats(),
        first.ownership_stats()
    );
    assert!(second.shutdown(Duration::from_secs(10)).await);
    second_task.await.unwrap().unwrap();
    let started = runs.started.lock().unwrap().clone();
    let mut ids: Vec<uuid::Uuid> = started.iter().map(|(_, id)| *id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 12, "every event ran");
    assert_eq!(
        started.len(),
        12,
        "no event ran twice (a lapsed lease would let the second consumer re-run the first's \
         batch): {started:?}"
    );
    assert_eq!(
        runs.overlap.load(Ordering::SeqCst),
        0,
        "two handlers ran at once"
    );
    assert_eq!(second.ownership_stats().partitions_taken, 1);
    assert_eq!(first.ownership_stats().partitions_lost, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_are_abandoned_before_an_unrenewed_lease_lapses() {
    // A Redis of the test's own: the test pauses its writes.
    logs();
    let dir = temp_dir("own-watchdog");
    let redis = OwnRedis::start(free_port(), &dir, &[]);
    let prefix = unique_prefix("own-watchdog");
    let bus = partitioned(
        config(&prefix, "g", "c1")
            .redis_url(redis.url())
            .socket_timeout(Duration::from_secs(3)),
        1,
    );
    let runs = Runs::default();
    runs.subscribe(&bus, Duration::from_secs(3));
    bus.connect().await.unwrap();
    bus.publish_events(&[created(1)]).await.unwrap();
    let task = tokio::spawn({
        let b = bus.clone();
        async move { b.start_consuming().await }
    });
    assert!(
        wait_until(Duration::from_secs(10), || async {
            runs.running.load(Ordering::SeqCst) == 1
        })
        .await
    );
    // Renewals cannot get through for 2 s (the lease is 1 s): the handler must not still be
    // running when the lease lapses and another member may take the partition.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        runs.running.load(Ordering::SeqCst),
        0,
        "the handler still runs past the unrenewed lease"
    );
    assert_eq!(
        runs.finished.load(Ordering::SeqCst),
        0,
        "it was abandoned, not finished"
    );
    assert!(bus.ownership_stats().partitions_lost >= 1);
    // Once Redis takes writes again the consumer takes the partition back and the entry
    // (left pending) runs to the end.
    assert!(
        wait_until(Duration::from_secs(20), || async {
            runs.finished.load(Ordering::SeqCst) == 1
        })
        .await
    );
    assert!(bus.shutdown(Duration::from_secs(10)).await);
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_nine_thousand_is_acknowledged_through_the_fence() {
    let prefix = unique_prefix("own-bigack");
    let _cleanup = Cleanup(prefix.clone());
    let bus = partitioned(config(&prefix, "g", "c1").batch_size(10_000), 1);
    let handled = Arc::new(AtomicUsize::new(0));
    bus.subscribe_to_all_events({
        let handled = handled.clone();
        move |_e: EventEnvelope| {
            handled.fetch_add(1, Ordering::Relaxed);
            async {}
        }
    });
    bus.connect().await.unwrap();
    let events: Vec<EventEnvelope> = (0..9000).map(created).collect();
    for chunk in events.chunks(1000) {
        bus.publish_events(chunk).await.unwrap();
    }
    let task = tokio::spawn({
        let b = bus.clone();
        async move { b.start_consuming().await }
    });
    assert!(
        wait_until(Duration::from_secs(60), || async {
            bus.stats().events_consumed == 9000
        })
        .await,
        "{:?}",
        bus.stats()
    );
    assert_eq!(pending(bus.partition(0).stream_name(), "g").await, 0);
    assert!(bus.shutdown(Duration::from_secs(10)).await);
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_past_its_timeout_abandons_hung_handlers_and_gives_the_partition_up() {
    let prefix = unique_prefix("own-shutdown");
    let _cleanup = Cleanup(prefix.clone());
    let bus = partitioned(config(&prefix, "g", "c1"), 2);
    let runs = Runs::default();
    // A handler that never returns.
    runs.subscribe(&bus, Duration::from_secs(3600));
    bus.connect().await.unwrap();
    bus.publish_events(&[created(1)]).await.unwrap();
    let task = tokio::spawn({
        let b = bus.clone();
        async move { b.start_consuming().await }
    });
    assert!(
        wait_until(Duration::from_secs(10), || async {
            runs.running.load(Ordering::SeqCst) == 1
        })
        .await
    );
    let started = std::time::Instant::now();
    assert!(
        !bus.shutdown(Duration::from_millis(500)).await,
        "it cannot finish in time"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    task.await.unwrap().unwrap();
    assert_eq!(
        runs.running.load(Ordering::SeqCst),
        0,
        "the handler was abandoned"
    );
    // Its entry stays pending for the next owner; the partitions are free.
    let total: u64 = bus.totals().await.unwrap().pending;
    assert_eq!(total, 1);
    for state in bus.partition_owners().await.unwrap() {
        assert_eq!(state.owner, None, "{state:?}");
    }
}

/// Handlers see the partition and the fencing token they run under, and a member that takes
/// the partition over gets a larger token: what a handler stores with its own writes to fence
/// them. Outside a partitioned handler there is none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_see_a_fencing_token_that_grows_across_a_takeover() {
    logs();
    let prefix = unique_prefix("fence-token");
    let _c = Cleanup(prefix.clone());
    let seen: Arc<std::sync::Mutex<Vec<Option<eventsource_redis::FencingToken>>>> = Arc::default();
    let consumer = |name: &str| {
        let bus = partitioned(config(&prefix, "g", name), 1);
        let seen = seen.clone();
        bus.subscribe_to_all_events(move |_: EventEnvelope| {
            seen.lock()
                .unwrap()
                .push(eventsource_redis::FencingToken::current());
            async {}
        });
        bus
    };
    assert_eq!(eventsource_redis::FencingToken::current(), None);
    let first = consumer("c1");
    first.connect().await.unwrap();
    first.publish_events(&[created(1)]).await.unwrap();
    let task = tokio::spawn({
        let b = first.clone();
        async move { b.start_consuming().await }
    });
    assert!(
        wait_until(Duration::from_secs(20), || async {
            seen.lock().unwrap().len() == 1
        })
        .await
    );
    assert!(first.shutdown(Duration::from_secs(10)).await);
    task.await.unwrap().unwrap();
    let second = consumer("c2");
    let task = tokio::spawn({
        let b = second.clone();
        async move { b.start_consuming().await }
    });
    second.publish_events(&[created(2)]).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            seen.lock().unwrap().len() == 2
        })
        .await
    );
    assert!(second.shutdown(Duration::from_secs(10)).await);
    task.await.unwrap().unwrap();
    let seen = seen.lock().unwrap().clone();
    let (a, b) = (
        seen[0].expect("a token in the first handler"),
        seen[1].expect("and in the second"),
    );
    assert_eq!((a.partition, b.partition), (0, 0));
    assert!(
        b.token > a.token,
        "the successor's token grows: {a:?} then {b:?}"
    );

    // A plain bus's handlers run under no lease.
    let plain_seen = Arc::new(std::sync::Mutex::new(None));
    let other = unique_prefix("fence-token-plain");
    let _c2 = Cleanup(other.clone());
    let plain = bus(config(&other, "plain", "p1"));
    let s = plain_seen.clone();
    plain.subscribe_to_all_events(move |_: EventEnvelope| {
        *s.lock().unwrap() = Some(eventsource_redis::FencingToken::current());
        async {}
    });
    plain.connect().await.unwrap();
    plain.publish_events(&[created(3)]).await.unwrap();
    let task = spawn_consumer(&plain);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            plain_seen.lock().unwrap().is_some()
        })
        .await
    );
    stop(&plain, task).await;
    assert_eq!(*plain_seen.lock().unwrap(), Some(None));
}

/// With a Redis 200 ms away each way (a round trip of 400 ms, under a quarter of the 2 s
/// lease), taking a partition — the lease, then the claim of its pending entries — takes
/// most of the watchdog's three quarters of the lease before the ownership loop renews it.
/// A just-taken partition must not be dropped for want of a renewal: every partition is
/// taken once and none is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_just_taken_over_a_slow_link_is_not_dropped() {
    logs();
    let prefix = unique_prefix("slow-take");
    let _c = Cleanup(prefix.clone());
    let proxy = FaultProxy::start(eventsource_testsupport::port_of(&redis_url()));
    proxy.latency(Duration::from_millis(200), Duration::ZERO);
    let bus = PartitionedEventBus::new(
        config(&prefix, "g", "c1")
            .redis_url(proxy.url())
            .socket_timeout(Duration::from_secs(5))
            .partitions(4)
            .partition_lease(Duration::from_secs(2)),
        registry(),
    )
    .unwrap();
    let handled = counting_partitioned(&bus);
    let task = tokio::spawn({
        let b = bus.clone();
        async move { b.start_consuming().await }
    });
    assert!(
        wait_until(Duration::from_secs(60), || async {
            bus.owned_partitions().len() == 4
        })
        .await,
        "{:?}",
        bus.ownership_stats()
    );
    bus.publish_events(&(0..8).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    // Several leases' worth of renewals over the slow link.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        wait_until(Duration::from_secs(30), || async {
            handled.load(Ordering::SeqCst) == 8
        })
        .await
    );
    let stats = bus.ownership_stats();
    assert_eq!(stats.partitions_lost, 0, "{stats:?}");
    assert_eq!(stats.partitions_taken, 4, "each taken once: {stats:?}");
    assert!(bus.shutdown(Duration::from_secs(20)).await);
    task.await.unwrap().unwrap();
}

fn counting_partitioned(bus: &PartitionedEventBus) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    bus.subscribe_to_all_events(move |_: EventEnvelope| {
        n2.fetch_add(1, Ordering::SeqCst);
        async {}
    });
    n
}

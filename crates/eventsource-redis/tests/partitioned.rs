//! The partitioned bus on one Redis node: routing, per-aggregate order across consumers
//! while they join and leave, the lease fence, and a refused change of the partition count.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderShipped;
use eventsource_redis::{ErrorKind, PartitionedEventBus, RedisBusError, partition_of};

fn partitioned(prefix: &str, consumer: &str, partitions: u32) -> PartitionedEventBus {
    PartitionedEventBus::new(
        config(prefix, "g", consumer)
            .partitions(partitions)
            .partition_lease(Duration::from_secs(1)),
        registry(),
    )
    .unwrap()
}

/// `events` events for each of `aggregates` aggregates, interleaved: round r holds event r
/// of every aggregate.
fn interleaved(aggregates: usize, events: usize) -> Vec<EventEnvelope> {
    let ids: Vec<uuid::Uuid> = (0..aggregates).map(|_| uuid::Uuid::new_v4()).collect();
    let mut out = Vec::new();
    for round in 0..events {
        for id in &ids {
            out.push(
                Event::new(
                    *id,
                    OrderShipped {
                        tracking_number: format!("T-{round}"),
                    },
                )
                .with_aggregate_version(round as u64 + 1)
                .into_envelope(),
            );
        }
    }
    out
}

fn record_in(bus: &PartitionedEventBus, ledger: &Arc<Ledger>) {
    let ledger = ledger.clone();
    let consumer = bus.consumer_name().to_owned();
    bus.subscribe_to_all_events(move |e: EventEnvelope| {
        let ledger = ledger.clone();
        let consumer = consumer.clone();
        async move {
            // Long enough that a second owner of a partition would overlap and reorder.
            tokio::time::sleep(Duration::from_millis(1)).await;
            ledger.handled("g", &consumer, e.event_id());
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_to_their_aggregates_partition_on_tagged_keys() {
    let prefix = unique_prefix("part-route");
    let _cleanup = Cleanup(prefix.clone());
    let bus = partitioned(&prefix, "c1", 4);
    bus.connect().await.unwrap();
    let events = interleaved(20, 2);
    let ids = bus.publish_events(&events).await.unwrap();
    assert_eq!(ids.len(), 40);
    let mut conn = raw().await;
    for i in 0..4 {
        let stream = format!("{{{prefix}:p{i}}}:stream");
        assert_eq!(bus.partition(i).stream_name(), stream);
        let entries: Vec<redis::Value> = redis::cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let expected = events
            .iter()
            .filter(|e| partition_of(e.aggregate_id(), 4) == i)
            .count();
        assert_eq!(entries.len(), expected, "partition {i}");
    }
    assert_eq!(bus.totals().await.unwrap().length, 40);
    // The stream records its partition count.
    let stored: u32 = redis::cmd("GET")
        .arg(format!("{{{prefix}}}:partitions"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(stored, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_partition_count_is_refused_with_what_to_do() {
    let prefix = unique_prefix("part-changed");
    let _cleanup = Cleanup(prefix.clone());
    partitioned(&prefix, "c1", 4).connect().await.unwrap();
    let err = partitioned(&prefix, "c2", 8).connect().await.unwrap_err();
    assert!(
        matches!(
            err,
            RedisBusError::PartitionsChanged {
                stored: 4,
                configured: 8,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(err.to_string().contains("set partitions = 4"), "{err}");

    // A stream written before partitioning would silently stop being read: refused too.
    let plain = unique_prefix("part-plain");
    let _cleanup_plain = Cleanup(plain.clone());
    bus(config(&plain, "g", "p"))
        .publish_events(&[created(1)])
        .await
        .unwrap();
    let err = partitioned(&plain, "c1", 4).connect().await.unwrap_err();
    assert!(
        matches!(err, RedisBusError::PartitionsChanged { stored: 1, configured: 4, ref key } if key.ends_with(":stream")),
        "{err:?}"
    );
    // …while one partition keeps the plain keys and reads that stream.
    let one = partitioned(&plain, "c1", 1);
    one.connect().await.unwrap();
    assert_eq!(one.partition(0).stream_name(), format!("{plain}:stream"));

    // The single-stream bus says which type takes these options.
    let err =
        eventsource_redis::RedisEventBus::new(config(&plain, "g", "p").partitions(4), registry())
            .unwrap_err();
    assert!(err.to_string().contains("partitions"), "{err}");
    assert!(err.to_string().contains("PartitionedEventBus"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_per_aggregate_while_consumers_join_and_leave() {
    let prefix = unique_prefix("part-order");
    let _cleanup = Cleanup(prefix.clone());
    let ledger = Arc::new(Ledger::new());
    let publisher = partitioned(&prefix, "publisher", 8);
    publisher.connect().await.unwrap();
    let first = partitioned(&prefix, "c1", 8);
    record_in(&first, &ledger);
    let first_task = tokio::spawn({
        let b = first.clone();
        async move { b.start_consuming().await }
    });
    let events = interleaved(40, 25);
    let mut joined = Vec::new();
    for (n, chunk) in events.chunks(100).enumerate() {
        publisher.publish_events(chunk).await.unwrap();
        for e in chunk {
            ledger.published(e.event_id(), e.aggregate_id(), Outcome::Ok);
        }
        // Two consumers join, then the first leaves, while events keep coming.
        if n == 2 || n == 4 {
            let next = partitioned(&prefix, &format!("c{}", joined.len() + 2), 8);
            record_in(&next, &ledger);
            let task = tokio::spawn({
                let b = next.clone();
                async move { b.start_consuming().await }
            });
            joined.push((next, task));
        }
        if n == 6 {
            assert!(first.shutdown(Duration::from_secs(10)).await);
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    first_task.await.unwrap().unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            ledger.complete(&["g"])
        })
        .await,
        "not every event was handled: {:?}",
        ledger
            .check(&Expect::new("partitioned order", &["g"]))
            .problems()
    );
    // Graceful handovers: nothing handled twice, and each aggregate in publish order.
    ledger
        .check(&Expect::new("partitioned join/leave", &["g"]).ordered_per_aggregate())
        .assert_ok();
    // The two that stayed share the partitions between them.
    let owned: Vec<u32> = joined
        .iter()
        .flat_map(|(b, _)| b.owned_partitions())
        .collect();
    assert_eq!(owned.len(), 8, "{owned:?}");
    let taken = first.ownership_stats();
    assert!(taken.partitions_taken >= 1, "{taken:?}");
    assert_eq!(
        taken.partitions_released, taken.partitions_taken,
        "{taken:?}"
    );
    for (b, task) in joined {
        assert!(b.shutdown(Duration::from_secs(10)).await);
        task.await.unwrap().unwrap();
    }
    let per_consumer = ledger.handlings_per_consumer("g");
    assert!(per_consumer.len() >= 3, "{per_consumer:?}");
    // Leaving removed the member and its leases.
    let mut conn = raw().await;
    let members: Vec<String> = redis::cmd("ZRANGE")
        .arg(publisher.members_key())
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(members.is_empty(), "{members:?}");
    for state in publisher.partition_owners().await.unwrap() {
        assert_eq!(state.owner, None, "{state:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_that_lost_its_lease_cannot_acknowledge() {
    let prefix = unique_prefix("part-fence");
    let _cleanup = Cleanup(prefix.clone());
    let bus = partitioned(&prefix, "c1", 1);
    let release = Arc::new(tokio::sync::Notify::new());
    let started = Arc::new(tokio::sync::Notify::new());
    bus.subscribe_to_all_events({
        let (release, started) = (release.clone(), started.clone());
        move |_e: EventEnvelope| {
            let (release, started) = (release.clone(), started.clone());
            async move {
                started.notify_one();
                release.notified().await;
            }
        }
    });
    let task = tokio::spawn({
        let b = bus.clone();
        async move { b.start_consuming().await }
    });
    bus.connect().await.unwrap();
    bus.publish_events(&[created(1)]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), started.notified())
        .await
        .expect("the handler starts");
    // Another member takes the partition over while the handler runs (as after a pause
    // longer than the lease).
    let mut conn = raw().await;
    let _: () = redis::cmd("SET")
        .arg(bus.owner_key(0))
        .arg("intruder:999999")
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    release.notify_one();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            bus.stats().acks_fenced == 1
        })
        .await,
        "{:?}",
        bus.stats()
    );
    // The entry stays pending for the partition's owner; this consumer gave the partition up.
    assert_eq!(pending(bus.partition(0).stream_name(), "g").await, 1);
    assert!(
        wait_until(Duration::from_secs(5), || async {
            bus.owned_partitions().is_empty()
        })
        .await
    );
    assert!(bus.ownership_stats().partitions_lost >= 1);
    assert_eq!(
        bus.partition_owners().await.unwrap()[0].owner.as_deref(),
        Some("intruder")
    );
    assert!(bus.shutdown(Duration::from_secs(10)).await);
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_consume_future_stops_its_partitions() {
    let prefix = unique_prefix("part-drop");
    let _cleanup = Cleanup(prefix.clone());
    let a = partitioned(&prefix, "a", 2);
    let handled_by_a = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    a.subscribe_to_all_events({
        let n = handled_by_a.clone();
        move |_e: EventEnvelope| {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {}
        }
    });
    let task = tokio::spawn({
        let a = a.clone();
        async move { a.start_consuming().await }
    });
    assert!(
        wait_until(Duration::from_secs(10), || async {
            a.owned_partitions().len() == 2
        })
        .await
    );
    // The application drops the consuming future (a select! that lost, an aborted task).
    task.abort();
    let _ = task.await;
    assert!(!a.is_consuming());
    // Its partition consumers stop with it: they finish their read, then nothing more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events = interleaved(10, 1);
    a.publish_events(&events).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        handled_by_a.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a dropped consume loop left its partitions consuming"
    );
    // Its leases lapse (nobody renews them) and another consumer takes over.
    let b = partitioned(&prefix, "b", 2);
    let handled_by_b = counting_partitioned(&b);
    let b_task = tokio::spawn({
        let b = b.clone();
        async move { b.start_consuming().await }
    });
    assert!(
        wait_until(Duration::from_secs(10), || async {
            handled_by_b.load(std::sync::atomic::Ordering::SeqCst) == 10
        })
        .await
    );
    assert!(b.shutdown(Duration::from_secs(10)).await);
    b_task.await.unwrap().unwrap();
}

fn counting_partitioned(bus: &PartitionedEventBus) -> Arc<std::sync::atomic::AtomicUsize> {
    let n = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    bus.subscribe_to_all_events({
        let n = n.clone();
        move |_e: EventEnvelope| {
            n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async {}
        }
    });
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_sums_the_partitions_and_says_which_one_fails() {
    use eventsource_redis::HealthStatus;
    let dir = temp_dir("part-health");
    // An eviction policy that may evict keys with a time to live: the leases.
    let mut redis = OwnRedis::start(
        free_port(),
        &dir,
        &["--maxmemory", "100mb", "--maxmemory-policy", "volatile-lru"],
    );
    let prefix = unique_prefix("part-health");
    let bus = PartitionedEventBus::new(
        config(&prefix, "g", "c1")
            .redis_url(redis.url())
            .partitions(3)
            .partition_lease(Duration::from_secs(1))
            .socket_timeout(Duration::from_secs(1))
            .block_ms(100),
        registry(),
    )
    .unwrap();
    bus.subscribe_to_all_events(|_e: EventEnvelope| async {
        Err::<(), eventsource_core::bus::HandlerError>("always fails".into())
    });
    bus.connect().await.unwrap();
    let idle = bus.health_check().await;
    assert_eq!(idle.status, HealthStatus::Degraded, "{idle:?}");
    assert!(
        idle.warnings
            .iter()
            .any(|w| w.contains("evict partition leases")),
        "{:?}",
        idle.warnings
    );
    bus.publish_events(&interleaved(6, 1)).await.unwrap();
    let task = tokio::spawn({
        let b = bus.clone();
        async move { b.start_consuming().await }
    });
    assert!(
        wait_until(Duration::from_secs(10), || async {
            let h = bus.health_check().await;
            h.status == HealthStatus::Healthy && h.pending_messages == 6
        })
        .await,
        "{:?}",
        bus.health_check().await
    );
    // Redis dies: unhealthy, naming a partition and why.
    redis.kill();
    let sick = bus.health_check().await;
    assert_eq!(sick.status, HealthStatus::Unhealthy, "{sick:?}");
    assert!(!sick.connected);
    let error = sick.error.unwrap_or_default();
    assert!(error.starts_with("partition 0 ("), "{error}");
    assert!(bus.shutdown(Duration::from_secs(15)).await);
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_refuses_before_writing_anything() {
    let prefix = unique_prefix("part-refuse");
    let _cleanup = Cleanup(prefix.clone());
    let bus = partitioned(&prefix, "p", 4);
    // An invalid event anywhere in a batch over several partitions: nothing is written.
    let mut events = interleaved(12, 1);
    let bad = Event::new(
        uuid::Uuid::new_v4(),
        OrderShipped {
            tracking_number: "T".into(),
        },
    )
    .with_aggregate_version(0)
    .into_envelope();
    events.push(bad.clone());
    let err = bus.publish_events(&events).await.unwrap_err();
    assert!(
        matches!(err, RedisBusError::InvalidEvent { event_id, .. } if event_id == bad.event_id()),
        "{err:?}"
    );
    assert_eq!(bus.totals().await.unwrap().length, 0);

    // A publisher configured with another partition count is refused at its first publish,
    // without connecting first.
    bus.publish_events(&interleaved(4, 1)).await.unwrap();
    let other = partitioned(&prefix, "p2", 8);
    let err = other.publish_events(&interleaved(4, 1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            RedisBusError::PartitionsChanged {
                stored: 4,
                configured: 8,
                ..
            }
        ),
        "{err:?}"
    );
    // So is a single-stream bus on the prefix: it would write a stream nobody reads.
    let single =
        eventsource_redis::RedisEventBus::new(config(&prefix, "g", "s"), registry()).unwrap();
    let err = single.publish_events(&[created(1)]).await.unwrap_err();
    assert!(
        matches!(
            err,
            RedisBusError::PartitionsChanged {
                stored: 4,
                configured: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(bus.totals().await.unwrap().length, 4);
    let mut conn = raw().await;
    let plain: u64 = redis::cmd("XLEN")
        .arg(format!("{prefix}:stream"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(plain, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_against_a_single_node_is_a_configuration_error() {
    let prefix = unique_prefix("part-notcluster");
    let _cleanup = Cleanup(prefix.clone());
    let bus =
        PartitionedEventBus::new(config(&prefix, "g", "c").cluster(true), registry()).unwrap();
    let err = bus.connect().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config, "{err:?}");
    assert!(!err.is_transient());
    assert!(err.to_string().contains("cluster = false"), "{err}");
    // consume_until gives up at once instead of retrying for ever.
    let started = std::time::Instant::now();
    assert!(bus.start_consuming().await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_holds_per_aggregate_with_concurrent_handlers_in_each_partition() {
    let prefix = unique_prefix("part-concurrent");
    let _cleanup = Cleanup(prefix.clone());
    let ledger = Arc::new(Ledger::new());
    let consumer = |name: &str| {
        let bus = PartitionedEventBus::new(
            config(&prefix, "g", name)
                .partitions(4)
                .partition_lease(Duration::from_secs(1))
                .handler_concurrency(8),
            registry(),
        )
        .unwrap();
        let (ledger, me) = (ledger.clone(), name.to_owned());
        bus.subscribe_to_all_events(move |e: EventEnvelope| {
            let (ledger, me) = (ledger.clone(), me.clone());
            async move {
                // Uneven handler times: a later event of another aggregate often finishes
                // first, which is allowed; one of the same aggregate never may.
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..3000))).await;
                ledger.handled("g", &me, e.event_id());
            }
        });
        bus
    };
    let (a, b) = (consumer("a"), consumer("b"));
    a.connect().await.unwrap();
    let tasks: Vec<_> = [&a, &b]
        .into_iter()
        .map(|bus| {
            let bus = bus.clone();
            tokio::spawn(async move { bus.start_consuming().await })
        })
        .collect();
    // Both hold their share (2 and 2) before the events come.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            a.owned_partitions().len() == 2 && b.owned_partitions().len() == 2
        })
        .await
    );
    let events = interleaved(20, 30);
    for chunk in events.chunks(60) {
        a.publish_events(chunk).await.unwrap();
        for e in chunk {
            ledger.published(e.event_id(), e.aggregate_id(), Outcome::Ok);
        }
    }
    assert!(
        wait_until(Duration::from_secs(30), || async {
            ledger.complete(&["g"])
        })
        .await
    );
    for bus in [&a, &b] {
        assert!(bus.shutdown(Duration::from_secs(10)).await);
    }
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    ledger
        .check(&Expect::new("partitioned, handler_concurrency 8", &["g"]).ordered_per_aggregate())
        .assert_ok();
    assert_eq!(
        ledger.handlings_per_consumer("g").len(),
        2,
        "both consumers worked"
    );
}

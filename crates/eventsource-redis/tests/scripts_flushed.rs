//! Redis forgets the bus's scripts (`SCRIPT FLUSH`, or a restart) while it runs: every path
//! that runs a script — reading its own pending entries, renewing held entries, claiming,
//! dead-lettering, replaying, and a partitioned bus's ownership (heartbeat, take, renew,
//! fenced ack, release) — loads it again and goes on, losing nothing. On a Redis of the
//! test's own.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::{PartitionedEventBus, RecoveryOptions};

const WAIT: Duration = Duration::from_secs(30);

async fn flush(url: &str) {
    let mut conn = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_script_path_survives_a_script_flush() {
    let port = free_port();
    let redis = OwnRedis::start(port, &temp_dir("scripts-flushed"), &[]);
    let url = redis.url();
    let prefix = "flushed";
    // A handler that fails while `failing` is set and takes `slow` each time.
    let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handled = Arc::new(AtomicUsize::new(0));
    let consumer = |name: &str, slow: Duration| {
        let bus = bus(config(prefix, "g", name)
            .redis_url(url.clone())
            .pending_idle(Duration::from_millis(600))
            .max_retries(1));
        let (failing, handled) = (failing.clone(), handled.clone());
        bus.subscribe(move |_: Event<OrderCreated>| {
            let (failing, handled) = (failing.clone(), handled.clone());
            async move {
                tokio::time::sleep(slow).await;
                if failing.load(Ordering::SeqCst) {
                    return Err::<(), HandlerError>("failing on purpose".into());
                }
                handled.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        });
        bus
    };

    // Renewal of held entries: a handler three times the idle time, scripts flushed while it
    // runs; the entry is not taken by the second consumer's recovery and is handled once.
    let first = consumer("c1", Duration::from_millis(1800));
    let second = consumer("c2", Duration::ZERO);
    first.connect().await.unwrap();
    first.publish_events(&[created(1)]).await.unwrap();
    let t1 = spawn_consumer(&first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    flush(&url).await;
    let stats = second
        .recover_pending_messages(RecoveryOptions {
            min_idle_time_ms: Some(600),
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    flush(&url).await;
    assert_eq!(
        stats.claimed, 0,
        "a renewed entry is not claimed: {stats:?}"
    );
    assert!(wait_until(WAIT, || async { handled.load(Ordering::SeqCst) == 1 }).await);
    stop(&first, t1).await;

    // Reading its own pending entries at start (a handler failed, the consumer restarts).
    failing.store(true, Ordering::SeqCst);
    first.publish_events(&[created(2)]).await.unwrap();
    let quick = consumer("c3", Duration::ZERO);
    let t3 = spawn_consumer(&quick);
    assert!(
        wait_until(WAIT, || async {
            quick.stats().events_processed_failed >= 1
        })
        .await
    );
    stop(&quick, t3).await;
    failing.store(false, Ordering::SeqCst);
    flush(&url).await;
    let quick = consumer("c3", Duration::ZERO);
    let t3 = spawn_consumer(&quick);
    assert!(wait_until(WAIT, || async { handled.load(Ordering::SeqCst) == 2 }).await);
    stop(&quick, t3).await;

    // Claiming and dead-lettering: an entry failing twice (max_retries 1) is claimed by
    // recovery, then dead-lettered, with the scripts flushed before each step.
    failing.store(true, Ordering::SeqCst);
    first.publish_events(&[created(3)]).await.unwrap();
    let t3 = spawn_consumer(&quick);
    assert!(
        wait_until(WAIT, || async {
            quick.stats().events_processed_failed >= 1
        })
        .await
    );
    stop(&quick, t3).await;
    let mut dead = 0;
    for _ in 0..3 {
        flush(&url).await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let t2 = spawn_consumer(&second);
        let stats = second
            .recover_pending_messages(RecoveryOptions {
                min_idle_time_ms: Some(600),
                ..Default::default()
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop(&second, t2).await;
        dead += stats.dlq;
        if second.get_stream_info().await.dlq_messages == 1 {
            break;
        }
    }
    assert_eq!(
        second.get_stream_info().await.dlq_messages,
        1,
        "dead-lettered ({dead})"
    );

    // Replaying it.
    failing.store(false, Ordering::SeqCst);
    flush(&url).await;
    let letter = second.get_dlq_messages(1).await.unwrap().remove(0);
    assert!(second.replay_dlq_message(&letter.message_id).await.unwrap());
    let t2 = spawn_consumer(&second);
    assert!(wait_until(WAIT, || async { handled.load(Ordering::SeqCst) == 3 }).await);
    stop(&second, t2).await;
    assert_eq!(second.get_stream_info().await.dlq_messages, 0);
}

/// A partitioned consumer whose Redis forgets the scripts, then restarts (keeping its data,
/// append-only file on): ownership, fenced acknowledgements and handling go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_ownership_survives_a_script_flush_and_a_restart() {
    let port = free_port();
    let dir = temp_dir("scripts-flushed-partitioned");
    let mut redis = OwnRedis::start(
        port,
        &dir,
        &["--appendonly", "yes", "--appendfsync", "always"],
    );
    let url = redis.url();
    let bus = PartitionedEventBus::new(
        config("flushedp", "g", "c1")
            .redis_url(url.clone())
            .partitions(4)
            .partition_lease(Duration::from_secs(2)),
        registry(),
    )
    .unwrap();
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    let s = seen.clone();
    bus.subscribe_to_all_events(move |e: EventEnvelope| {
        s.lock().unwrap().insert(e.event_id());
        async {}
    });
    bus.connect().await.unwrap();
    let task = tokio::spawn({
        let b = bus.clone();
        async move { b.start_consuming().await }
    });
    assert!(wait_until(WAIT, || async { bus.owned_partitions().len() == 4 }).await);
    let mut published = 0;
    for round in 0..3 {
        match round {
            1 => flush(&url).await,
            2 => {
                redis.kill();
                redis = OwnRedis::start(
                    port,
                    &dir,
                    &["--appendonly", "yes", "--appendfsync", "always"],
                );
            }
            _ => {}
        }
        let events: Vec<EventEnvelope> = (0..20).map(created).collect();
        // After the restart the publisher may need a moment to reconnect.
        assert!(
            wait_until(WAIT, || async { bus.publish_events(&events).await.is_ok() }).await,
            "round {round}: publishing"
        );
        published += 20;
        assert!(
            wait_until(WAIT, || async { seen.lock().unwrap().len() >= published }).await,
            "round {round}: {} of {published} handled, {:?}",
            seen.lock().unwrap().len(),
            bus.ownership_stats()
        );
        assert!(
            wait_until(WAIT, || async {
                let mut pending = 0;
                for p in bus.partitions() {
                    pending += p.get_stream_info().await.pending_messages;
                }
                pending == 0
            })
            .await,
            "round {round}: every handled entry acknowledged (through the fence)"
        );
    }
    assert_eq!(bus.stats().acks_fenced, 0);
    assert!(wait_until(WAIT, || async { bus.owned_partitions().len() == 4 }).await);
    assert!(bus.shutdown(Duration::from_secs(10)).await);
    task.await.unwrap().unwrap();
    drop(redis);
}

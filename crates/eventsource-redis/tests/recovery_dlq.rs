//! Pending recovery, attempts, the dead-letter queue and replay, against the real Redis.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use eventsource_core::bus::{HandlerError, named};
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::{RecoveryOptions, RedisEventBus};

const WAIT: Duration = Duration::from_secs(15);

/// Entries a crashed consumer left pending are claimed once idle, handled, and acked; entries
/// not idle long enough are left alone.
#[tokio::test]
async fn recovery_reprocesses_a_crashed_consumers_entries() {
    let prefix = unique_prefix("recover");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "survivor"));
    let handled = counting(&bus);
    bus.connect().await.unwrap();
    bus.publish_events(&(0..3).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    read_and_crash(bus.stream_name(), "g", "crashed").await;

    let fresh = bus
        .recover_pending_messages(RecoveryOptions {
            min_idle_time_ms: Some(60_000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(fresh.checked, 0, "not idle long enough");
    assert_eq!(handled.load(Ordering::SeqCst), 0);

    age_pending(bus.stream_name(), "g", 120_000).await;
    let stats = bus
        .recover_pending_messages(RecoveryOptions {
            min_idle_time_ms: Some(60_000),
            max_retries: Some(3),
            batch_size: Some(100),
        })
        .await
        .unwrap();
    assert_eq!(
        (
            stats.checked,
            stats.claimed,
            stats.reprocessed,
            stats.dlq,
            stats.failed
        ),
        (3, 3, 3, 0, 0)
    );
    assert_eq!(stats.reprocessed, 3);
    assert_eq!(stats.get("reprocessed"), Some(3), "the tutorial's name");
    assert_eq!(
        stats.get("no such counter"),
        None,
        "an unknown name is None, not a panic"
    );
    assert_eq!(handled.load(Ordering::SeqCst), 3);
    assert_eq!(pending(bus.stream_name(), "g").await, 0);
    assert_eq!(bus.stats().messages_recovered, 3);
}

/// A retry that fails again is counted as failed, not reprocessed, and stays pending with one
/// more delivery.
#[tokio::test]
async fn failed_retry_is_counted_honestly() {
    let prefix = unique_prefix("honest");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c"));
    bus.subscribe(|_: Event<OrderCreated>| async {
        Err::<(), HandlerError>("still broken".into())
    });
    bus.connect().await.unwrap();
    bus.publish_events(&[created(1)]).await.unwrap();
    read_and_crash(bus.stream_name(), "g", "crashed").await;
    age_pending(bus.stream_name(), "g", 120_000).await;
    let stats = recover_aged(&bus).await;
    assert_eq!(
        (
            stats.checked,
            stats.claimed,
            stats.reprocessed,
            stats.failed
        ),
        (1, 1, 0, 1)
    );
    let entries = pending_entries(bus.stream_name(), "g").await;
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].1, 2, "one more delivery");
}

/// Recovery walks the whole pending list, not only the first page.
#[tokio::test]
async fn recovery_pages_through_all_pending_entries() {
    let prefix = unique_prefix("paging");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c").batch_size(100));
    let handled = counting(&bus);
    bus.connect().await.unwrap();
    let events: Vec<EventEnvelope> = (0..250).map(created).collect();
    bus.publish_events(&events).await.unwrap();
    read_and_crash(bus.stream_name(), "g", "crashed").await;
    age_pending(bus.stream_name(), "g", 120_000).await;
    let stats = recover_aged(&bus).await;
    assert_eq!((stats.checked, stats.reprocessed), (250, 250));
    assert_eq!(handled.load(Ordering::SeqCst), 250);
    assert_eq!(pending(bus.stream_name(), "g").await, 0);
}

/// Two consumers recovering at once: each entry is claimed and handled by exactly one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_recovery_claims_each_entry_once() {
    let prefix = unique_prefix("race");
    let _c = Cleanup(prefix.clone());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut buses = Vec::new();
    for name in ["r1", "r2"] {
        let bus = bus(config(&prefix, "g", name));
        let s = seen.clone();
        bus.subscribe(move |e: Event<OrderCreated>| {
            let s = s.clone();
            async move { s.lock().unwrap().push(e.metadata.event_id) }
        });
        bus.connect().await.unwrap();
        buses.push(bus);
    }
    buses[0]
        .publish_events(&(0..100).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    read_and_crash(buses[0].stream_name(), "g", "crashed").await;
    age_pending(buses[0].stream_name(), "g", 120_000).await;
    let opts = RecoveryOptions {
        min_idle_time_ms: Some(1000),
        batch_size: Some(10),
        ..Default::default()
    };
    let (a, b) = tokio::join!(
        buses[0].recover_pending_messages(opts),
        buses[1].recover_pending_messages(opts)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.claimed + b.claimed, 100, "{a:?} {b:?}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 100);
    assert_eq!(
        seen.iter().collect::<HashSet<_>>().len(),
        100,
        "no entry handled twice"
    );
}

/// A poison event (handler always fails) with max_retries = 3 is attempted exactly
/// 1 + 3 = 4 times by the consumer's own automatic recovery, then dead-lettered with the
/// reason and group; after the handler is fixed, a replay is handled exactly once.
#[tokio::test]
async fn poison_event_is_retried_then_dead_lettered_then_replayed() {
    let prefix = unique_prefix("poison");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "billing", "c")
        .max_retries(3)
        .pending_idle_ms(150)
        .recovery_interval_ms(50));
    let attempts = Arc::new(AtomicUsize::new(0));
    let fixed = Arc::new(AtomicBool::new(false));
    let handled = Arc::new(AtomicUsize::new(0));
    let (a, f, h) = (attempts.clone(), fixed.clone(), handled.clone());
    bus.subscribe(named("charge-card", move |e: Event<OrderCreated>| {
        let (a, f, h) = (a.clone(), f.clone(), h.clone());
        async move {
            if e.customer_id != "cust-13" {
                return Ok(());
            }
            if !f.load(Ordering::SeqCst) {
                a.fetch_add(1, Ordering::SeqCst);
                return Err::<(), HandlerError>("card declined".into());
            }
            h.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }));
    bus.connect().await.unwrap();
    let ids = bus
        .publish_events(&[created(12), created(13), created(14)])
        .await
        .unwrap();
    let task = spawn_consumer(&bus);
    assert!(
        wait_until(WAIT, || async { bus.stats().messages_sent_to_dlq == 1 }).await,
        "dead-lettered"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        attempts.load(Ordering::SeqCst),
        4,
        "exactly 1 + max_retries attempts"
    );
    assert_eq!(pending(bus.stream_name(), "billing").await, 0);

    let letters = bus.get_dlq_messages(10).await.unwrap();
    assert_eq!(letters.len(), 1);
    let letter = &letters[0];
    assert_eq!(letter.original_message_id(), Some(ids[1].as_str()));
    assert_eq!(letter.retry_count(), Some(3));
    assert_eq!(letter.consumer_group(), Some("billing"));
    assert!(
        letter.error().unwrap().contains("charge-card")
            && letter.error().unwrap().contains("card declined"),
        "{letter:?}"
    );
    assert!(letter.get("dlq_timestamp").unwrap().ends_with("+00:00"));
    assert_eq!(letter.event_type(), Some("OrderCreated"));
    let info = bus.get_stream_info().await;
    assert_eq!(info.dlq_messages, 1);

    fixed.store(true, Ordering::SeqCst);
    assert!(bus.replay_dlq_message(&letter.message_id).await.unwrap());
    assert!(
        !bus.replay_dlq_message(&letter.message_id).await.unwrap(),
        "already replayed"
    );
    assert!(!bus.replay_dlq_message("1-0").await.unwrap(), "unknown id");
    assert!(wait_until(WAIT, || async { handled.load(Ordering::SeqCst) == 1 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop(&bus, task).await;
    assert_eq!(handled.load(Ordering::SeqCst), 1, "handled exactly once");
    assert!(bus.get_dlq_messages(10).await.unwrap().is_empty());
    assert_eq!(pending(bus.stream_name(), "billing").await, 0);
}

/// A replayed dead letter is handled again only by the group that dead-lettered it; this
/// bus's consumers in other groups skip it (counted).
#[tokio::test]
async fn replay_goes_to_the_failing_group_only() {
    let prefix = unique_prefix("replay-group");
    let _c = Cleanup(prefix.clone());
    let failing = bus(config(&prefix, "failing", "c").max_retries(0));
    let healthy = bus(config(&prefix, "healthy", "c"));
    let broken = Arc::new(AtomicBool::new(true));
    let failing_ok = Arc::new(AtomicUsize::new(0));
    let (b, n) = (broken.clone(), failing_ok.clone());
    failing.subscribe(move |_: Event<OrderCreated>| {
        let (b, n) = (b.clone(), n.clone());
        async move {
            if b.load(Ordering::SeqCst) {
                return Err::<(), HandlerError>("broken".into());
            }
            n.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    let healthy_count = counting(&healthy);
    failing.connect().await.unwrap();
    healthy.connect().await.unwrap();
    failing.publish_events(&[created(1)]).await.unwrap();
    let t1 = spawn_consumer(&failing);
    let t2 = spawn_consumer(&healthy);
    assert!(
        wait_until(WAIT, || async {
            failing.stats().events_processed_failed == 1
                && healthy_count.load(Ordering::SeqCst) == 1
        })
        .await
    );
    age_pending(failing.stream_name(), "failing", 120_000).await;
    let stats = recover_aged(&failing).await;
    assert_eq!(stats.dlq, 1);
    broken.store(false, Ordering::SeqCst);
    let letter = failing.get_dlq_messages(1).await.unwrap().remove(0);
    assert!(
        healthy
            .replay_dlq_message(&letter.message_id)
            .await
            .unwrap(),
        "any bus on the stream can replay"
    );
    assert!(
        wait_until(WAIT, || async {
            failing_ok.load(Ordering::SeqCst) == 1
                && healthy.stats().events_skipped_other_group == 1
        })
        .await
    );
    stop(&failing, t1).await;
    stop(&healthy, t2).await;
    assert_eq!(
        healthy_count.load(Ordering::SeqCst),
        1,
        "the healthy group did not handle it twice"
    );
    let entries = failing.read_stream_range("-", "+", 10).await.unwrap();
    assert_eq!(entries[1].get("replay_group"), Some("failing"));
    assert!(entries[1].get("error").is_none() && entries[1].get("original_message_id").is_none());
}

/// An entry whose consumer crashed repeatedly (no failure reason recorded) is dead-lettered
/// with a reason saying so; with the DLQ disabled it is acked and counted as dropped.
#[tokio::test]
async fn dead_letter_without_recorded_reason_and_with_dlq_disabled() {
    let prefix = unique_prefix("noreason");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c").max_retries(0));
    bus.connect().await.unwrap();
    bus.publish_events(&[created(1)]).await.unwrap();
    read_and_crash(bus.stream_name(), "g", "crashed").await;
    age_pending(bus.stream_name(), "g", 120_000).await;
    let stats = recover_aged(&bus).await;
    assert_eq!(stats.dlq, 1);
    let letter = bus.get_dlq_messages(1).await.unwrap().remove(0);
    assert!(
        letter
            .error()
            .unwrap()
            .contains("not acknowledged after 1 handler starts"),
        "{letter:?}"
    );

    let off = bus_with_dlq_off(&prefix);
    off.connect().await.unwrap();
    off.publish_events(&[created(2)]).await.unwrap();
    read_and_crash(off.stream_name(), "g2", "crashed").await;
    age_pending(off.stream_name(), "g2", 120_000).await;
    let stats = recover_aged(&off).await;
    assert_eq!(
        stats.dlq, 2,
        "both entries of the stream were pending for g2"
    );
    assert_eq!(off.stats().messages_dropped_dlq_disabled, 2);
    assert_eq!(
        off.get_dlq_messages(10).await.unwrap().len(),
        1,
        "nothing added to the DLQ"
    );
    assert_eq!(pending(off.stream_name(), "g2").await, 0);
}

fn bus_with_dlq_off(prefix: &str) -> RedisEventBus {
    bus(config(prefix, "g2", "c").enable_dlq(false).max_retries(0))
}

/// Many restarts with generated names: recovery prunes consumers that are idle and hold
/// nothing, and never one that still holds pending entries.
#[tokio::test]
async fn idle_consumers_without_pending_entries_are_pruned() {
    let prefix = unique_prefix("prune");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "current").prune_idle_consumers_ms(200));
    bus.connect().await.unwrap();
    bus.publish_events(&(0..30).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let stream = bus.stream_name().to_owned();
    let mut conn = raw().await;
    // 30 "restarts": each generated name reads one entry; all but the last 3 acked it.
    for i in 0..30 {
        let name = format!("host-{i:08x}");
        let reply: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(&name)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query_async(&mut conn)
            .await
            .unwrap();
        if i < 27 {
            let id = match &reply {
                redis::Value::Array(s) => match &s[0] {
                    redis::Value::Array(p) => match &p[1] {
                        redis::Value::Array(e) => match &e[0] {
                            redis::Value::Array(x) => match &x[0] {
                                redis::Value::BulkString(b) => {
                                    String::from_utf8(b.clone()).unwrap()
                                }
                                _ => panic!(),
                            },
                            _ => panic!(),
                        },
                        _ => panic!(),
                    },
                    _ => panic!(),
                },
                _ => panic!("{reply:?}"),
            };
            let _: i64 = redis::cmd("XACK")
                .arg(&stream)
                .arg("g")
                .arg(id)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = bus
        .recover_pending_messages(RecoveryOptions {
            min_idle_time_ms: Some(600_000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stats.claimed, 0);
    let consumers: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(&stream)
        .arg("g")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        consumers.len(),
        3,
        "only the three holding pending entries remain"
    );
    assert_eq!(
        pending(&stream, "g").await,
        3,
        "their entries are still claimable"
    );
}

/// R-29 at scale, judged by the ledger: 1,000 events, 1 % of them poison (their handler
/// always fails), `max_retries` 3, two consumers. Each poison event runs exactly
/// `1 + max_retries` times and its dead letter names the reason and the group; the dead-letter
/// queue holds exactly the poison set; every healthy event is handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r29_one_percent_poison_is_dead_lettered_exactly() {
    let prefix = unique_prefix("r29");
    let _c = Cleanup(prefix.clone());
    let ledger = Arc::new(Ledger::new());
    let attempts: Arc<Mutex<std::collections::HashMap<String, u32>>> = Default::default();
    let is_poison = |customer: &str| customer.ends_with("37");
    let mut buses = Vec::new();
    for name in ["c1", "c2"] {
        let b = bus(config(&prefix, "billing", name)
            .max_retries(3)
            .pending_idle_ms(300)
            .recovery_interval_ms(50));
        let (ledger, attempts) = (ledger.clone(), attempts.clone());
        b.subscribe(named("charge-card", move |e: Event<OrderCreated>| {
            let (ledger, attempts) = (ledger.clone(), attempts.clone());
            async move {
                let id = e.metadata.event_id.to_string();
                if is_poison(&e.customer_id) {
                    *attempts.lock().unwrap().entry(id).or_default() += 1;
                    return Err::<(), HandlerError>("card declined".into());
                }
                ledger.handled("billing", name, &id);
                Ok(())
            }
        }));
        b.connect().await.unwrap();
        buses.push(b);
    }
    let tasks: Vec<_> = buses.iter().map(spawn_consumer).collect();
    let events: Vec<EventEnvelope> = (0..1000).map(created).collect();
    // `created(i)` is customer `cust-{i}`.
    let poison: HashSet<String> = events
        .iter()
        .enumerate()
        .filter(|(i, _)| is_poison(&format!("cust-{i}")))
        .map(|(_, e)| e.event_id().to_string())
        .collect();
    assert_eq!(poison.len(), 10);
    for chunk in events.chunks(100) {
        publish_recorded(&buses[0], &ledger, chunk).await.unwrap();
    }
    let dead_lettered = wait_until(Duration::from_secs(60), || async {
        buses
            .iter()
            .map(|b| b.stats().messages_sent_to_dlq)
            .sum::<u64>()
            == 10
    })
    .await;
    let complete = wait_until(Duration::from_secs(60), || async {
        ledger.handled_ids("billing").len() == 990
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (b, t) in buses.iter().zip(tasks) {
        stop(b, t).await;
    }
    assert!(dead_lettered && complete);
    for letter in buses[0].get_dlq_messages(100).await.unwrap() {
        assert_eq!(letter.consumer_group(), Some("billing"));
        assert!(
            letter.error().is_some_and(|e| e.contains("card declined")),
            "{letter:?}"
        );
        assert_eq!(letter.retry_count(), Some(3));
        ledger.dead_lettered("billing", letter.get("event_id").unwrap());
    }
    let attempts = attempts.lock().unwrap().clone();
    assert_eq!(attempts.len(), 10);
    assert!(
        attempts.values().all(|&n| n == 4),
        "each poison event ran exactly 1 + max_retries times: {attempts:?}"
    );
    ledger
        .check(&Expect::new("R-29 1 % poison, max_retries 3", &["billing"]).poison(&poison))
        .assert_ok();
    assert_eq!(pending(buses[0].stream_name(), "billing").await, 0);
}

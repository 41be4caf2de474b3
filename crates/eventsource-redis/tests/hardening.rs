//! The consumer under everyday conditions: slow handlers with several consumers, a stop
//! that comes early, a survivor of a crash holding thousands of entries, races between an
//! owner and recovery, crash loops, bytes that are not UTF-8, a bad deploy, a lost reply.
//! One test per defect of the consumer-hardening issue (numbered as there).

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::{RedisEventBus, RedisEventBusService};

const WAIT: Duration = Duration::from_secs(20);

/// An entry's fields as Redis holds them.
type RawFields = Vec<(Vec<u8>, Vec<u8>)>;

/// Subscribes a handler that sleeps `ms` and counts runs per event id.
fn slow_counting(bus: &RedisEventBus, ms: u64) -> Arc<Mutex<HashMap<String, usize>>> {
    let runs = Arc::new(Mutex::new(HashMap::new()));
    let r = runs.clone();
    bus.subscribe(move |e: Event<OrderCreated>| {
        let r = r.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            *r.lock()
                .unwrap()
                .entry(e.metadata.event_id.to_string())
                .or_default() += 1;
        }
    });
    runs
}

/// 1. Two consumers, batch 10, a 150 ms handler, `pending_idle_ms` 1000 with recovery every
/// 200 ms: a batch waits 1.5 s, longer than the idle time. The owners keep their entries
/// renewed, so nothing is taken from a live consumer: every event runs exactly once and no
/// ack is lost. (Before: 200 events gave 380 runs and 90 unapplied acks per consumer.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handlers_are_not_stolen_from_live_consumers() {
    let prefix = unique_prefix("theft");
    let _c = Cleanup(prefix.clone());
    let cfg = |name: &str| {
        config(&prefix, "g", name)
            .batch_size(10)
            .pending_idle_ms(1000)
            .recovery_interval_ms(200)
    };
    let a = bus(cfg("a"));
    let b = bus(cfg("b"));
    let runs_a = slow_counting(&a, 150);
    let runs_b = slow_counting(&b, 150);
    a.connect().await.unwrap();
    let events: Vec<EventEnvelope> = (0..60).map(created).collect();
    a.publish_events(&events).await.unwrap();
    let (ta, tb) = (spawn_consumer(&a), spawn_consumer(&b));
    let total = || {
        runs_a.lock().unwrap().values().sum::<usize>()
            + runs_b.lock().unwrap().values().sum::<usize>()
    };
    assert!(
        wait_until(Duration::from_secs(60), || async {
            pending(a.stream_name(), "g").await == 0 && total() >= 60
        })
        .await
    );
    stop(&a, ta).await;
    stop(&b, tb).await;
    let mut per_event: HashMap<String, usize> = runs_a.lock().unwrap().clone();
    for (id, n) in runs_b.lock().unwrap().iter() {
        *per_event.entry(id.clone()).or_default() += n;
    }
    assert_eq!(per_event.len(), 60, "every event handled");
    let duplicated: Vec<_> = per_event.iter().filter(|(_, n)| **n > 1).collect();
    assert!(duplicated.is_empty(), "handled twice: {duplicated:?}");
    assert_eq!(a.stats().acks_not_applied + b.stats().acks_not_applied, 0);
    assert_eq!(
        a.stats().messages_recovered + b.stats().messages_recovered,
        0
    );
}

/// 2. One read connection for the consumer's life: consuming 3,000 events in batches of
/// 10 (with the read-ahead at work) opens two connections — commands and reads — not one per
/// batch. Counted by Redis itself (`INFO stats`) on a server of the test's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_read_connection_for_the_consumers_life() {
    let server = OwnRedis::start(free_port(), &temp_dir("conns"), &[]);
    let cfg = config("conns", "g", "c")
        .redis_url(server.url())
        .batch_size(10);
    let publisher = bus(cfg.clone());
    publisher
        .publish_events(&(0..3000).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let received = || async {
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
            .await
            .unwrap();
        let info: String = redis::cmd("INFO")
            .arg("stats")
            .query_async(&mut conn)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("total_connections_received:"))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let consumer = bus(cfg);
    let n = counting(&consumer);
    let before = received().await;
    let task = spawn_consumer(&consumer);
    assert!(wait_until(WAIT, || async { n.load(Ordering::SeqCst) == 3000 }).await);
    stop(&consumer, task).await;
    // Our two checks of INFO each open a connection too.
    let opened = received().await - before - 1;
    assert!(
        opened <= 2,
        "{opened} connections for 300 batches (commands + reader expected)"
    );
    assert_eq!(consumer.stats().reconnections, 0);
}

/// 3a. A stop requested before the consumer task first runs is not lost (current-thread
/// runtime: the spawned task cannot run before the stop).
#[tokio::test(flavor = "current_thread")]
async fn a_stop_before_the_start_is_not_lost() {
    let prefix = unique_prefix("early-stop");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c"));
    bus.connect().await.unwrap();
    let task = spawn_consumer(&bus);
    bus.stop_consuming();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the consumer returned instead of running forever")
        .unwrap()
        .unwrap();
    assert!(!bus.is_consuming());
    // The stop was used up: the next start consumes.
    let n = counting(&bus);
    let task = spawn_consumer(&bus);
    bus.publish_events(&[created(1)]).await.unwrap();
    assert!(wait_until(WAIT, || async { n.load(Ordering::SeqCst) == 1 }).await);
    stop(&bus, task).await;
}

/// 3b. `run_until` with a shutdown that already happened returns at once on a current-thread
/// runtime; `run_until` on a bus that is already consuming returns `AlreadyConsuming` and
/// leaves the running consumer alone.
#[tokio::test(flavor = "current_thread")]
async fn run_until_with_a_finished_shutdown_and_on_a_busy_bus() {
    let prefix = unique_prefix("run-until");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c"));
    let service = RedisEventBusService::new(bus.clone());
    tokio::time::timeout(Duration::from_secs(10), service.run_until(async {}))
        .await
        .expect("returned at once")
        .unwrap();

    let n = counting(&bus);
    bus.connect().await.unwrap();
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { bus.is_consuming() }).await);
    let second = service.run_until(std::future::pending()).await;
    assert!(
        matches!(
            second,
            Err(eventsource_redis::RedisBusError::AlreadyConsuming)
        ),
        "{second:?}"
    );
    bus.publish_events(&[created(1)]).await.unwrap();
    assert!(
        wait_until(WAIT, || async { n.load(Ordering::SeqCst) == 1 }).await,
        "the first consumer still runs"
    );
    stop(&bus, task).await;
}

/// 3c. `shutdown(timeout)` with handlers slower than the timeout gives up, abandons them and
/// says what it left pending; those entries can be recovered at once by another consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_gives_up_after_its_timeout_and_reports_what_is_pending() {
    let prefix = unique_prefix("shutdown");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "slow"));
    let started = Arc::new(AtomicUsize::new(0));
    let s = started.clone();
    bus.subscribe(move |_: Event<OrderCreated>| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
    });
    bus.connect().await.unwrap();
    let ids = bus
        .publish_events(&(0..3).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { started.load(Ordering::SeqCst) == 1 }).await);
    let report = bus.shutdown(Duration::from_millis(300)).await;
    assert!(!report.completed);
    let mut left = report.left_pending.clone();
    left.sort();
    assert_eq!(left, ids, "all three were given back");
    task.await.unwrap().unwrap();
    // Given back: another consumer's recovery takes them now, not after pending_idle_ms.
    let other = bus_with_counter(&prefix, "other");
    let stats = other
        .0
        .recover_pending_messages(Default::default())
        .await
        .unwrap();
    assert_eq!(stats.claimed, 3, "{stats:?}");
    assert_eq!(other.1.load(Ordering::SeqCst), 3);
    assert_eq!(pending(other.0.stream_name(), "g").await, 0);
}

fn bus_with_counter(prefix: &str, name: &str) -> (RedisEventBus, Arc<AtomicUsize>) {
    let b = bus(config(prefix, "g", name));
    let n = counting(&b);
    (b, n)
}

/// 4. A survivor of a crashed consumer holding 3,000 entries recovers them a page per tick,
/// between reads of new entries: an event published meanwhile is handled while most of the
/// recovered ones are still waiting, and a stop in the middle of the walk is honoured
/// (entries remain pending for later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_in_the_loop_is_bounded_and_stoppable() {
    let prefix = unique_prefix("bounded");
    let _c = Cleanup(prefix.clone());
    let publisher = bus(config(&prefix, "g", "p"));
    publisher.connect().await.unwrap();
    for chunk in 0..3 {
        publisher
            .publish_events(
                &(0..1000)
                    .map(|i| created(chunk * 1000 + i))
                    .collect::<Vec<_>>(),
            )
            .await
            .unwrap();
    }
    read_and_crash(publisher.stream_name(), "g", "crashed").await;
    age_pending(publisher.stream_name(), "g", 120_000).await;

    let survivor = bus(config(&prefix, "g", "survivor")
        .recovery_interval_ms(50)
        .pending_idle_ms(60_000));
    let recovered = Arc::new(AtomicUsize::new(0));
    let at_new_event = Arc::new(Mutex::new(None));
    let (r, at) = (recovered.clone(), at_new_event.clone());
    survivor.subscribe(move |e: Event<OrderCreated>| {
        let (r, at) = (r.clone(), at.clone());
        async move {
            if e.customer_id == "fresh" {
                *at.lock().unwrap() = Some(r.load(Ordering::SeqCst));
            } else {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
    });
    let task = spawn_consumer(&survivor);
    assert!(wait_until(WAIT, || async { recovered.load(Ordering::SeqCst) >= 100 }).await);
    let fresh = Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: "fresh".into(),
            total_amount: 1.0,
        },
    )
    .into_envelope();
    publisher.publish_events(&[fresh]).await.unwrap();
    assert!(wait_until(WAIT, || async { at_new_event.lock().unwrap().is_some() }).await);
    let seen_at = at_new_event.lock().unwrap().unwrap();
    assert!(
        seen_at < 2000,
        "the new event waited for {seen_at} recovered entries"
    );
    stop(&survivor, task).await;
    let left = pending(survivor.stream_name(), "g").await;
    assert!(left > 0, "the stop came before the walk ended");
    assert_eq!(
        recovered.load(Ordering::SeqCst) as u64 + left,
        3000,
        "nothing lost, nothing run twice"
    );
}

/// The owner of `id` in `group`, or None when it is not pending.
async fn owner(stream: &str, group: &str, id: &str) -> Option<String> {
    let mut conn = raw().await;
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    rows.into_iter().next().map(|r| r.1)
}

async fn xlen(key: &str) -> u64 {
    let mut conn = raw().await;
    redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// 5a. Recovery dead-letters an exhausted entry while its owner, late but alive,
/// acknowledges it. Every command of the recovering bus is delayed 100 ms (a proxy), so the
/// owner's XACK lands in the middle of recovery's steps. The entry ends either handled or
/// dead-lettered, never both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_acked_by_its_owner_is_not_also_dead_lettered() {
    let prefix = unique_prefix("ack-vs-dlq");
    let _c = Cleanup(prefix.clone());
    let proxy = DelayProxy::start(
        eventsource_testsupport::port_of(&redis_url()),
        Duration::from_millis(100),
    )
    .await;
    let publisher = bus(config(&prefix, "g", "p"));
    publisher.connect().await.unwrap();
    let id = publisher
        .publish_events(&[created(1)])
        .await
        .unwrap()
        .remove(0);
    let stream = publisher.stream_name().to_owned();
    read_and_crash(&stream, "g", "live").await;
    age_pending(&stream, "g", 120_000).await;
    let recovering = bus(config(&prefix, "g", "recovering")
        .redis_url(proxy.url())
        .max_retries(0));
    recovering.connect().await.unwrap();
    let run = tokio::spawn({
        let b = recovering.clone();
        async move { recover_aged(&b).await }
    });
    // The moment recovery took the entry (or finished with it), the owner acknowledges.
    assert!(
        wait_until(WAIT, || async {
            owner(&stream, "g", &id).await.as_deref() != Some("live")
        })
        .await
    );
    let mut conn = raw().await;
    let acked: i64 = redis::cmd("XACK")
        .arg(&stream)
        .arg("g")
        .arg(&id)
        .query_async(&mut conn)
        .await
        .unwrap();
    run.await.unwrap();
    let letters = xlen(recovering.dlq_stream_name()).await;
    assert_eq!(
        acked as u64 + letters,
        1,
        "handled by its owner ({acked}) xor dead-lettered ({letters})"
    );
}

/// 5b. Two operators replay the same dead letter at the same moment (one of them slowed
/// down by a proxy): it is republished once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_replayed_twice_at_once_is_republished_once() {
    let prefix = unique_prefix("replay-race");
    let _c = Cleanup(prefix.clone());
    let proxy = DelayProxy::start(
        eventsource_testsupport::port_of(&redis_url()),
        Duration::from_millis(100),
    )
    .await;
    let direct = bus(config(&prefix, "g", "op1").max_retries(0));
    direct.connect().await.unwrap();
    direct.publish_events(&[created(1)]).await.unwrap();
    read_and_crash(direct.stream_name(), "g", "dead").await;
    age_pending(direct.stream_name(), "g", 120_000).await;
    assert_eq!(recover_aged(&direct).await.dlq, 1);
    let letter = direct.get_dlq_messages(1).await.unwrap().remove(0);
    let slow = bus(config(&prefix, "g", "op2").redis_url(proxy.url()));
    slow.connect().await.unwrap();
    let before = xlen(direct.stream_name()).await;
    let slow_replay = tokio::spawn({
        let (b, id) = (slow.clone(), letter.message_id.clone());
        async move { b.replay_dlq_message(&id).await.unwrap() }
    });
    // The slow operator has read the dead letter (its first command arrives after 100 ms);
    // the fast one acts before the slow one's next command arrives.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let fast = direct.replay_dlq_message(&letter.message_id).await.unwrap();
    let slow = slow_replay.await.unwrap();
    assert_eq!(
        xlen(direct.stream_name()).await - before,
        1,
        "republished once (replays reported {fast} and {slow})"
    );
    assert!(fast ^ slow, "exactly one replay reports success");
    assert_eq!(xlen(direct.dlq_stream_name()).await, 0);
}

/// 6. Two groups fail the same event with different errors: each group's dead letter states
/// its own group's error.
#[tokio::test]
async fn each_groups_dead_letter_has_its_own_reason() {
    let prefix = unique_prefix("reason-per-group");
    let _c = Cleanup(prefix.clone());
    let mut buses = Vec::new();
    for group in ["billing", "shipping"] {
        let b = bus(config(&prefix, group, "c").max_retries(0));
        let message = format!("{group} cannot take it");
        b.subscribe(move |_: Event<OrderCreated>| {
            let message = message.clone();
            async move { Err::<(), HandlerError>(message.into()) }
        });
        b.connect().await.unwrap();
        buses.push(b);
    }
    buses[0].publish_events(&[created(1)]).await.unwrap();
    for b in &buses {
        let task = spawn_consumer(b);
        assert!(wait_until(WAIT, || async { b.stats().events_processed_failed == 1 }).await);
        stop(b, task).await;
    }
    for (b, group) in buses.iter().zip(["billing", "shipping"]) {
        age_pending(b.stream_name(), group, 120_000).await;
        assert_eq!(recover_aged(b).await.dlq, 1);
    }
    let letters = buses[0].get_dlq_messages(10).await.unwrap();
    assert_eq!(letters.len(), 2);
    for letter in letters {
        let group = letter.consumer_group().unwrap().to_owned();
        let error = letter.error().unwrap();
        assert!(
            error.contains(&format!("{group} cannot take it")),
            "{group}'s dead letter says {error:?}"
        );
    }
}

/// 7. A worker process killed four times while its handler (10 s) runs on the first entry
/// of a batch of 5: on the fifth start only that entry — started four times — is
/// dead-lettered, with a true retry count; the four entries that never started are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_dead_letters_only_the_entry_that_ran() {
    let prefix = unique_prefix("crashloop5");
    let _c = Cleanup(prefix.clone());
    let publisher = bus(config(&prefix, "workers", "p"));
    publisher.connect().await.unwrap();
    let events: Vec<EventEnvelope> = (0..5).map(created).collect();
    let ids = publisher.publish_events(&events).await.unwrap();
    let started = || async {
        let mut conn = raw().await;
        redis::cmd("LLEN")
            .arg(format!("{prefix}:started"))
            .query_async::<u64>(&mut conn)
            .await
            .unwrap()
    };
    let spawn_worker = || {
        worker_command()
            .env("EVENTSOURCE_REDIS_URL", redis_url())
            .env("EVENTSOURCE_REDIS_STREAM_PREFIX", &prefix)
            .env("EVENTSOURCE_REDIS_CONSUMER_GROUP", "workers")
            .env("EVENTSOURCE_REDIS_CONSUMER_NAME", "crashy")
            .env("EVENTSOURCE_REDIS_BATCH_SIZE", "5")
            .env("EVENTSOURCE_REDIS_BLOCK_MS", "100")
            .env("EVENTSOURCE_REDIS_MAX_RETRIES", "3")
            .env("WORKER_SLEEP_MS", "10000")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("worker binary starts")
    };
    for run in 1..=4u64 {
        let mut worker = spawn_worker();
        assert!(
            wait_until(WAIT, || async { started().await >= run }).await,
            "run {run}: the handler started"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        worker.start_kill().unwrap();
        worker.wait().await.unwrap();
    }
    let mut worker = spawn_worker();
    assert!(
        wait_until(WAIT, || async {
            xlen(publisher.dlq_stream_name()).await >= 1
        })
        .await
    );
    // The second entry starts right after the first is dead-lettered.
    assert!(wait_until(WAIT, || async { started().await >= 5 }).await);
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    let letters = publisher.get_dlq_messages(10).await.unwrap();
    assert_eq!(letters.len(), 1, "only the entry that ran: {letters:?}");
    assert_eq!(letters[0].original_message_id(), Some(ids[0].as_str()));
    assert_eq!(letters[0].retry_count(), Some(3));
    assert!(
        letters[0].error().unwrap().contains("started 4 times"),
        "{:?}",
        letters[0].error()
    );
    let counts: HashMap<String, u64> = pending_entries(publisher.stream_name(), "workers")
        .await
        .into_iter()
        .collect();
    assert_eq!(
        counts.get(&ids[1]),
        Some(&1),
        "the second started once: {counts:?}"
    );
    for id in &ids[2..] {
        assert_eq!(counts.get(id), Some(&0), "never started: {counts:?}");
    }
}

/// 7b. A worker killed after its handler finished and before its batch's acknowledgement
/// reached Redis, four times: the entry is dead-lettered on the fifth start, and its reason
/// says what is known — started four times, never acknowledged — not that the handler never
/// finished (it finished every time: the worker's ledger shows it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_for_kills_after_the_handler_says_what_is_known() {
    // The bus on a Redis of the test's own, whose writes the test pauses; the worker's
    // records on the shared one.
    let port = free_port();
    let own = OwnRedis::start(port, &temp_dir("killed-before-ack"), &[]);
    let prefix = unique_prefix("killedbeforeack");
    let _c = Cleanup(prefix.clone());
    let publisher = bus(config(&prefix, "workers", "p").redis_url(own.url()));
    publisher.connect().await.unwrap();
    let id = publisher
        .publish_events(&[created(0)])
        .await
        .unwrap()
        .remove(0);
    let own_conn = || async {
        redis::Client::open(own.url())
            .unwrap()
            .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
            .await
            .unwrap()
    };
    let count = |key: &'static str| {
        let key = format!("{prefix}:{key}");
        async move {
            let mut conn = raw().await;
            redis::cmd("LLEN")
                .arg(&key)
                .query_async::<u64>(&mut conn)
                .await
                .unwrap()
        }
    };
    let spawn_worker = || {
        worker_command()
            .env("EVENTSOURCE_REDIS_URL", own.url())
            .env("WORKER_LEDGER_URL", redis_url())
            .env("EVENTSOURCE_REDIS_STREAM_PREFIX", &prefix)
            .env("EVENTSOURCE_REDIS_CONSUMER_GROUP", "workers")
            .env("EVENTSOURCE_REDIS_CONSUMER_NAME", "killed")
            .env("EVENTSOURCE_REDIS_BLOCK_MS", "100")
            .env("EVENTSOURCE_REDIS_MAX_RETRIES", "3")
            .env("WORKER_SLEEP_MS", "1500")
            .kill_on_drop(true)
            .spawn()
            .expect("worker binary starts")
    };
    for run in 1..=4u64 {
        let mut worker = spawn_worker();
        assert!(
            wait_until(WAIT, || async { count("started").await >= run }).await,
            "run {run}: the handler started"
        );
        // No write reaches the bus's Redis from now on (the acknowledgement waits); the
        // handler finishes.
        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(30_000)
            .arg("WRITE")
            .query_async(&mut own_conn().await)
            .await
            .unwrap();
        assert!(
            wait_until(WAIT, || async { count("ledger").await >= run }).await,
            "run {run}: the handler finished"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        worker.start_kill().unwrap();
        worker.wait().await.unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query_async(&mut own_conn().await)
            .await
            .unwrap();
    }
    let mut worker = spawn_worker();
    assert!(
        wait_until(WAIT, || async {
            let mut conn = own_conn().await;
            redis::cmd("XLEN")
                .arg(publisher.dlq_stream_name())
                .query_async::<u64>(&mut conn)
                .await
                .unwrap()
                >= 1
        })
        .await
    );
    worker.start_kill().unwrap();
    worker.wait().await.unwrap();
    let letters = publisher.get_dlq_messages(10).await.unwrap();
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].original_message_id(), Some(id.as_str()));
    assert_eq!(count("ledger").await, 4, "the handler finished four times");
    let reason = letters[0].error().unwrap();
    assert!(
        reason.contains("started 4 times") && reason.contains("never acknowledged"),
        "{reason}"
    );
    assert!(!reason.contains("without finishing"), "{reason}");
}

/// 8. Entries deleted (or trimmed) while pending are counted on every recovery path: the
/// claim for a retry and the dead-letter path.
#[tokio::test]
async fn entries_deleted_while_pending_are_counted_on_every_path() {
    let prefix = unique_prefix("deleted");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c").max_retries(1));
    let n = counting(&bus);
    bus.connect().await.unwrap();
    let ids = bus.publish_events(&[created(1), created(2)]).await.unwrap();
    read_and_crash(bus.stream_name(), "g", "dead").await;
    // The second entry is exhausted (two starts), the first has a retry left.
    let mut conn = raw().await;
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(bus.stream_name())
        .arg("g")
        .arg("dead")
        .arg(0)
        .arg(&ids[1])
        .arg("RETRYCOUNT")
        .arg(2)
        .arg("JUSTID")
        .query_async(&mut conn)
        .await
        .unwrap();
    // Aged first: on Redis 7 any XCLAIM of a deleted entry drops it from the pending list.
    age_pending(bus.stream_name(), "g", 120_000).await;
    let _: i64 = redis::cmd("XDEL")
        .arg(bus.stream_name())
        .arg(&ids[0])
        .arg(&ids[1])
        .query_async(&mut conn)
        .await
        .unwrap();
    let stats = recover_aged(&bus).await;
    assert_eq!(bus.stats().entries_deleted_while_pending, 2, "{stats:?}");
    assert_eq!(pending(bus.stream_name(), "g").await, 0);
    assert_eq!(n.load(Ordering::SeqCst), 0);
    assert_eq!(
        xlen(bus.dlq_stream_name()).await,
        0,
        "nothing to dead-letter"
    );
}

/// 9. After a reconnect the consumer re-reads its own pending entries first: entries Redis
/// delivered to it in a reply it never saw are handled at once, without recovery (off here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_reconnect_own_pending_entries_are_read_first() {
    let prefix = unique_prefix("lost-reply");
    let _c = Cleanup(prefix.clone());
    let name = format!("c-{}", &prefix[prefix.len() - 8..]);
    let consumer = bus(config(&prefix, "g", &name));
    let n = counting(&consumer);
    consumer.connect().await.unwrap();
    let task = spawn_consumer(&consumer);
    assert!(wait_until(WAIT, || async { consumer.is_consuming() }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Three entries added and delivered to `c` in one transaction: the consumer's own
    // blocking read never sees them (as if their reply had been lost with a connection).
    let mut conn = raw().await;
    let mut pipe = redis::pipe();
    pipe.atomic();
    for i in 0..3 {
        let e = created(i);
        let fields = eventsource_redis::codec::encode_fields(&e, None).unwrap();
        let cmd = pipe.cmd("XADD").arg(consumer.stream_name()).arg("*");
        for (k, v) in &fields {
            cmd.arg(*k).arg(v);
        }
    }
    pipe.cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg(&name)
        .arg("COUNT")
        .arg(10)
        .arg("STREAMS")
        .arg(consumer.stream_name())
        .arg(">");
    let _: redis::Value = pipe.query_async(&mut conn).await.unwrap();
    assert_eq!(pending(consumer.stream_name(), "g").await, 3);
    assert_eq!(
        kill_client_named(&redis_url(), &format!("eventsource-reader:{name}")).await,
        1
    );
    assert!(
        wait_until(WAIT, || async { n.load(Ordering::SeqCst) == 3 }).await,
        "handled after the reconnect"
    );
    assert!(
        wait_until(WAIT, || async {
            pending(consumer.stream_name(), "g").await == 0
        })
        .await
    );
    stop(&consumer, task).await;
    assert!(consumer.stats().reconnections >= 1);
}

/// 10. A payload holding bytes that are not UTF-8 is not handed to handlers altered: it is
/// dead-lettered with the reason, the dead letter keeps the exact bytes, and a replay writes
/// them back exactly.
#[tokio::test]
async fn bytes_that_are_not_utf8_are_dead_lettered_and_replayed_exactly() {
    let prefix = unique_prefix("bytes");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    bus.subscribe(move |e: Event<OrderCreated>| {
        let s = s.clone();
        async move {
            s.lock().unwrap().push(e.customer_id.clone());
        }
    });
    bus.connect().await.unwrap();
    let event = created(1);
    let mut fields = eventsource_redis::codec::encode_fields(&event, None).unwrap();
    let payload = fields.iter().position(|(k, _)| *k == "payload").unwrap();
    let json = fields[payload].1.replace("cust-1", "cust-\u{1}");
    let mut bytes = json.into_bytes();
    let at = bytes.iter().position(|b| *b == 1).unwrap();
    bytes[at] = 0xff; // an invalid UTF-8 byte inside the customer id
    fields.remove(payload);
    let mut conn = raw().await;
    let mut cmd = redis::cmd("XADD");
    cmd.arg(bus.stream_name()).arg("*");
    for (k, v) in &fields {
        cmd.arg(*k).arg(v);
    }
    cmd.arg("payload").arg(&bytes[..]);
    let _: String = cmd.query_async(&mut conn).await.unwrap();
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { xlen(bus.dlq_stream_name()).await == 1 }).await);
    stop(&bus, task).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "no handler saw altered text"
    );
    let raw_payload = |stream: String, at: &'static str| async move {
        let mut conn = raw().await;
        let rows: Vec<(String, RawFields)> = redis::cmd(at)
            .arg(&stream)
            .arg(if at == "XRANGE" { "-" } else { "+" })
            .arg(if at == "XRANGE" { "+" } else { "-" })
            .arg("COUNT")
            .arg(1)
            .query_async(&mut conn)
            .await
            .unwrap();
        let (id, fields) = rows.into_iter().next().unwrap();
        let payload = fields.into_iter().find(|(k, _)| k == b"payload").unwrap().1;
        (id, payload)
    };
    let (dlq_id, dead) = raw_payload(bus.dlq_stream_name().to_owned(), "XRANGE").await;
    assert_eq!(dead, bytes, "the dead letter keeps the original bytes");
    let letter = bus.get_dlq_messages(1).await.unwrap().remove(0);
    assert!(
        letter.error().unwrap().contains("not valid UTF-8"),
        "{:?}",
        letter.error()
    );
    assert!(bus.replay_dlq_message(&dlq_id).await.unwrap());
    let (_, replayed) = raw_payload(bus.stream_name().to_owned(), "XREVRANGE").await;
    assert_eq!(
        replayed, bytes,
        "the replay writes back exactly what was there"
    );
}

/// The order event as a newer version of the service defines it: a required field the
/// events on the stream do not have.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct OrderCreatedV2 {
    customer_id: String,
    total_amount: f64,
    currency: String,
}
eventsource_core::domain_event!(OrderCreatedV2, "OrderCreated", aggregate = "Order");

/// 11. A bad deploy: a new version whose `OrderCreated` requires a field the stream's events
/// lack. It does not drain the stream into the DLQ: after `pause_after_rejections` (10)
/// rejections in a row it pauses and reports unhealthy with the reason; rolled back (the old
/// version, another consumer), every event is handled and none is dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_deploy_pauses_instead_of_draining_the_stream_into_the_dlq() {
    let prefix = unique_prefix("bad-deploy");
    let _c = Cleanup(prefix.clone());
    let registry = EventRegistry::new();
    registry.register::<OrderCreatedV2>().unwrap();
    let new_version =
        RedisEventBus::new(config(&prefix, "g", "v2").pending_idle_ms(500), registry).unwrap();
    let handled_v2 = Arc::new(AtomicUsize::new(0));
    let h = handled_v2.clone();
    new_version.subscribe(move |_: Event<OrderCreatedV2>| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
        }
    });
    new_version.connect().await.unwrap();
    new_version
        .publish_events(&(0..30).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let task = spawn_consumer(&new_version);
    assert!(
        wait_until(WAIT, || async {
            new_version.health_check().await.status == eventsource_redis::HealthStatus::Unhealthy
        })
        .await
    );
    let health = new_version.health_check().await;
    let error = health.error.unwrap_or_default();
    assert!(
        error.contains("rejected") && error.contains("OrderCreated") && error.contains("currency"),
        "{error}"
    );
    assert_eq!(
        xlen(new_version.dlq_stream_name()).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(handled_v2.load(Ordering::SeqCst), 0);
    let stats = new_version.stats();
    assert_eq!(stats.events_rejected, 10, "{stats:?}");
    assert_eq!(stats.malformed_messages, 0);
    // Rollback: the old version takes over (the paused one is shut down).
    let report = new_version.shutdown(Duration::from_secs(5)).await;
    assert!(report.completed);
    task.await.unwrap().unwrap();
    let old_version = bus(config(&prefix, "g", "v1")
        .pending_idle_ms(500)
        .recovery_interval_ms(100));
    let seen = collecting_ids(&old_version);
    let task = spawn_consumer(&old_version);
    assert!(wait_until(WAIT, || async { seen.lock().unwrap().len() == 30 }).await);
    assert!(
        wait_until(WAIT, || async {
            pending(old_version.stream_name(), "g").await == 0
        })
        .await
    );
    stop(&old_version, task).await;
    assert_eq!(xlen(old_version.dlq_stream_name()).await, 0);
}

/// 12. A typed subscription registers its type: an event whose data does not fit is a
/// (counted) decode rejection, not a handler failure, exactly as for a type registered
/// beforehand.
#[tokio::test]
async fn a_typed_subscription_registers_its_type() {
    let prefix = unique_prefix("typed-registers");
    let _c = Cleanup(prefix.clone());
    let bus = RedisEventBus::new(config(&prefix, "g", "c"), EventRegistry::new()).unwrap();
    let n = counting(&bus);
    assert!(bus.registry().contains("OrderCreated"));
    bus.connect().await.unwrap();
    let good = created(1);
    let mut fields = eventsource_redis::codec::encode_fields(&good, None).unwrap();
    for (k, v) in &mut fields {
        if *k == "payload" {
            *v = v.replace("\"total_amount\":1.5", "\"total_amount\":\"lots\"");
        }
    }
    let mut conn = raw().await;
    let mut cmd = redis::cmd("XADD");
    cmd.arg(bus.stream_name()).arg("*");
    for (k, v) in &fields {
        cmd.arg(*k).arg(v);
    }
    let _: String = cmd.query_async(&mut conn).await.unwrap();
    bus.publish_events(&[created(2)]).await.unwrap();
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { n.load(Ordering::SeqCst) == 1 }).await);
    stop(&bus, task).await;
    let stats = bus.stats();
    assert_eq!(stats.handler_errors, 0, "{stats:?}");
    assert_eq!(stats.events_rejected, 1, "{stats:?}");
}

/// 15. `events_consumed` rises only once the handlers succeeded and the ack went out, so
/// waiting for `events_consumed >= events_published` waits for a slow handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_consumed_waits_for_the_handler_and_the_ack() {
    let prefix = unique_prefix("consumed");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c"));
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    bus.subscribe(move |_: Event<OrderCreated>| {
        let d = d.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            d.store(true, Ordering::SeqCst);
        }
    });
    bus.connect().await.unwrap();
    bus.publish_events(&[created(1)]).await.unwrap();
    let task = spawn_consumer(&bus);
    assert!(wait_until(WAIT, || async { bus.stats().events_consumed >= 1 }).await);
    assert!(done.load(Ordering::SeqCst), "the handler had finished");
    assert_eq!(
        pending(bus.stream_name(), "g").await,
        0,
        "and the ack was applied"
    );
    stop(&bus, task).await;
}

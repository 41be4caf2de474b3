//! Crashes and restarts: a consumer process killed with SIGKILL mid-batch, a Redis server
//! restarted without persistence, the blocking-read connection killed.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;

async fn handled_by_process(prefix: &str) -> HashSet<String> {
    let mut conn = raw().await;
    redis::cmd("SMEMBERS")
        .arg(format!("{prefix}:handled"))
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// A consumer process killed with `kill -9` in the middle of its work loses nothing: a
/// surviving consumer of the group recovers its pending entries, and every event is handled
/// at least once; the duplicates are at most the batch the killed one held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_killed_mid_batch_loses_nothing() {
    let prefix = unique_prefix("kill9");
    let _c = Cleanup(prefix.clone());
    let ledger = Arc::new(Ledger::new());
    let publisher = bus(config(&prefix, "workers", "publisher"));
    publisher.connect().await.unwrap();
    let events: Vec<EventEnvelope> = (0..200).map(created).collect();
    publish_recorded(&publisher, &ledger, &events)
        .await
        .unwrap();

    let mut victim = worker_command()
        .env("EVENTSOURCE_REDIS_URL", redis_url())
        .env("EVENTSOURCE_REDIS_STREAM_PREFIX", &prefix)
        .env("EVENTSOURCE_REDIS_CONSUMER_GROUP", "workers")
        .env("EVENTSOURCE_REDIS_CONSUMER_NAME", "victim")
        .env("EVENTSOURCE_REDIS_BATCH_SIZE", "50")
        .env("EVENTSOURCE_REDIS_BLOCK_MS", "100")
        .env("WORKER_SLEEP_MS", "5")
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("worker binary starts");
    assert!(
        wait_until(Duration::from_secs(30), || async {
            handled_by_process(&prefix).await.len() >= 20
        })
        .await,
        "the worker started handling"
    );
    victim.start_kill().unwrap(); // SIGKILL
    victim.wait().await.unwrap();
    ledger.import_redis_list(&redis_url(), &format!("{prefix}:ledger"));
    assert!(
        ledger.handled_ids("workers").len() < 200,
        "killed before it finished"
    );
    assert!(
        pending(publisher.stream_name(), "workers").await > 0,
        "it died holding pending entries"
    );
    ledger.healed();

    let survivor = bus(config(&prefix, "workers", "survivor")
        .pending_idle_ms(300)
        .recovery_interval_ms(100));
    ledger_handler(&survivor, &ledger);
    let task = spawn_consumer(&survivor);
    let complete = wait_until(Duration::from_secs(30), || async {
        ledger.complete(&["workers"])
    })
    .await;
    assert!(
        wait_until(Duration::from_secs(10), || async {
            pending(survivor.stream_name(), "workers").await == 0
        })
        .await
    );
    stop(&survivor, task).await;
    assert!(complete, "the survivor did not finish");
    ledger
        .check(
            &Expect::new("R-1/R-3 consumer killed with SIGKILL", &["workers"]).duplicates_at_most(
                50,
                "entries the killed consumer handled but had not acknowledged: at most its batch",
            ),
        )
        .assert_ok();
    assert!(
        survivor.stats().messages_recovered > 0,
        "some came back through recovery"
    );
}

/// A Redis restart without persistence: the consumer reconnects with backoff, recreates its
/// lost group, counts both, and handles events published after the restart.
#[tokio::test]
async fn survives_a_redis_restart() {
    let port = free_port();
    let dir = temp_dir("redis-restart");
    let mut server = OwnRedis::start(port, &dir, &[]);
    let cfg = config("restart", "g", "c")
        .redis_url(server.url())
        .reconnect_max_delay_ms(500)
        .socket_timeout(std::time::Duration::from_secs(1));
    let consumer = bus(cfg.clone());
    let n = counting(&consumer);
    consumer.connect().await.unwrap();
    let task = spawn_consumer(&consumer);
    let publisher = bus(cfg.consumer_name("p"));
    publisher
        .publish_events(&(0..5).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            n.load(Ordering::SeqCst) == 5
        })
        .await
    );

    server.kill();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let server = OwnRedis::start(port, &dir, &[]);
    // Publishing retries until the new server answers.
    let mut published = false;
    for _ in 0..50 {
        if publisher
            .publish_events(&(5..10).map(created).collect::<Vec<_>>())
            .await
            .is_ok()
        {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(published, "publisher recovers after the restart");
    assert!(
        wait_until(Duration::from_secs(20), || async {
            n.load(Ordering::SeqCst) == 10
        })
        .await,
        "handled {}",
        n.load(Ordering::SeqCst)
    );
    stop(&consumer, task).await;
    let stats = consumer.stats();
    assert!(stats.reconnections >= 1, "{stats:?}");
    assert!(stats.group_recreations >= 1 || stats.reconnections >= 1);
    assert!(
        stats.reconnections < 50,
        "no tight reconnect loop: {}",
        stats.reconnections
    );
    drop(server);
}

/// Killing only the blocking-read connection leaves publishing unaffected; the consumer
/// reconnects and goes on.
#[tokio::test]
async fn killing_the_reader_connection_does_not_affect_publishing() {
    let prefix = unique_prefix("killreader");
    let _c = Cleanup(prefix.clone());
    let consumer_name = format!("reader-{}", &prefix[prefix.len() - 12..]);
    let bus = bus(config(&prefix, "g", &consumer_name).reconnect_max_delay_ms(200));
    let n = counting(&bus);
    bus.connect().await.unwrap();
    let task = spawn_consumer(&bus);
    bus.publish_events(&[created(1)]).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            n.load(Ordering::SeqCst) == 1
        })
        .await
    );
    let mut conn = raw().await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await
        .unwrap();
    let reader_name = format!("eventsource-reader:{consumer_name}");
    let id = list
        .lines()
        .find(|l| l.contains(&format!("name={reader_name} ")))
        .and_then(|l| l.split_whitespace().find_map(|kv| kv.strip_prefix("id=")))
        .expect("the reader connection is named")
        .to_owned();
    let _: redis::Value = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .query_async(&mut conn)
        .await
        .unwrap();
    let started = std::time::Instant::now();
    bus.publish_events(&[created(2)])
        .await
        .expect("publishing is unaffected");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            n.load(Ordering::SeqCst) == 2
        })
        .await
    );
    stop(&bus, task).await;
    assert!(bus.stats().reconnections >= 1);
}

/// The stream deleted while the consumer blocks on it (and later the group destroyed): no
/// panic, the group is recreated and later events are handled.
#[tokio::test]
async fn stream_deleted_or_group_destroyed_while_consuming() {
    let prefix = unique_prefix("deleted");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "g", "c")
        .block_ms(500)
        .reconnect_max_delay_ms(200));
    let n = counting(&bus);
    bus.connect().await.unwrap();
    let task = spawn_consumer(&bus);
    bus.publish_events(&[created(1)]).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            n.load(Ordering::SeqCst) == 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(100)).await; // now blocking in XREADGROUP
    let mut conn = raw().await;
    let _: i64 = redis::cmd("DEL")
        .arg(bus.stream_name())
        .query_async(&mut conn)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    bus.publish_events(&[created(2)]).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            n.load(Ordering::SeqCst) == 2
        })
        .await,
        "after DEL"
    );
    let _: redis::Value = redis::cmd("XGROUP")
        .arg("DESTROY")
        .arg(bus.stream_name())
        .arg("g")
        .query_async(&mut conn)
        .await
        .unwrap();
    bus.publish_events(&[created(3)]).await.unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            n.load(Ordering::SeqCst) >= 3
        })
        .await,
        "after XGROUP DESTROY"
    );
    stop(&bus, task).await;
    assert!(bus.stats().group_recreations >= 1, "{:?}", bus.stats());
}

/// An entry that keeps crashing its consumer (its handler started again and again under the
/// same name, never acknowledged) is dead-lettered on the restart that would start it a
/// `2 + max_retries`th time, instead of looping forever. Its dead letter says how often it
/// started and carries `retry_count = max_retries`, as eventsource-py's do.
#[tokio::test]
async fn crash_loop_entry_is_dead_lettered_on_restart() {
    let prefix = unique_prefix("crashloop");
    let _c = Cleanup(prefix.clone());
    let cfg = config(&prefix, "g", "crashy").max_retries(2);
    let publisher = bus(cfg.clone());
    publisher.connect().await.unwrap();
    let ids = publisher.publish_events(&[created(1)]).await.unwrap();
    let mut conn = raw().await;
    // Three deliveries to "crashy" that never got acknowledged, each counted as a handler
    // start (the delivery count is the start count; see `lease`).
    for id in [">", "0", "0"] {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("crashy")
            .arg("COUNT")
            .arg(10)
            .arg("STREAMS")
            .arg(publisher.stream_name())
            .arg(id)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(pending_entries(publisher.stream_name(), "g").await[0].1, 3);
    let restarted = bus(cfg);
    let n = counting(&restarted);
    let task = spawn_consumer(&restarted);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            restarted.stats().messages_sent_to_dlq == 1
        })
        .await
    );
    stop(&restarted, task).await;
    assert_eq!(n.load(Ordering::SeqCst), 0, "not run a fourth time");
    let letter = restarted.get_dlq_messages(1).await.unwrap().remove(0);
    assert_eq!(letter.original_message_id(), Some(ids[0].as_str()));
    assert_eq!(letter.retry_count(), Some(2));
    assert!(
        letter.error().unwrap().contains("started 3 times"),
        "{letter:?}"
    );
    assert_eq!(pending(restarted.stream_name(), "g").await, 0);
}

/// Redis killed with SIGKILL and restarted with its append-only file: streams, groups and
/// pending lists come back, and a consumer restarted with its name handles everything — lost 0.
#[tokio::test]
async fn redis_kill_9_with_aof_loses_nothing() {
    let port = free_port();
    let dir = temp_dir("aof");
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut first = OwnRedis::start(port, &dir, &aof);
    let cfg = config("aof", "g", "worker-1")
        .redis_url(first.url())
        .reconnect_max_delay_ms(300)
        .socket_timeout(std::time::Duration::from_secs(1));
    let ledger = Arc::new(Ledger::new());
    let publisher = bus(cfg.clone());
    publisher.connect().await.unwrap();
    let events: Vec<EventEnvelope> = (0..50).map(created).collect();
    publish_recorded(&publisher, &ledger, &events)
        .await
        .unwrap();
    // worker-1 read 20 and crashed before acking them.
    let mut conn = redis::Client::open(first.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("worker-1")
        .arg("COUNT")
        .arg(20)
        .arg("STREAMS")
        .arg(publisher.stream_name())
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    drop(conn);

    first.kill(); // SIGKILL
    let second = OwnRedis::start(port, &dir, &aof);
    ledger.healed();
    let restarted = bus(cfg);
    ledger_handler(&restarted, &ledger);
    let task = spawn_consumer(&restarted);
    assert!(
        wait_until(Duration::from_secs(15), || async {
            ledger.complete(&["g"])
        })
        .await,
        "handled {}",
        ledger.handled_ids("g").len()
    );
    stop(&restarted, task).await;
    ledger
        .check(&Expect::new("R-16 Redis kill -9 with AOF", &["g"]))
        .assert_ok();
    assert_eq!(
        restarted.stats().group_recreations,
        0,
        "the group survived in the AOF"
    );
    drop(second);
}

/// Every connection to Redis killed every 300 ms for 3 s while events are published and
/// consumed: the bus reconnects with backoff (no tight loop) and every event whose publish
/// was acknowledged is handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_repeatedly_under_load() {
    let port = free_port();
    let server = OwnRedis::start(port, &temp_dir("killall"), &[]);
    let cfg = config("killall", "g", "c1")
        .redis_url(server.url())
        .reconnect_max_delay_ms(200)
        .socket_timeout(std::time::Duration::from_secs(1))
        .pending_idle_ms(500)
        .recovery_interval_ms(200);
    let ledger = Arc::new(Ledger::new());
    let consumer = bus(cfg.clone());
    ledger_handler(&consumer, &ledger);
    consumer.connect().await.unwrap();
    let task = spawn_consumer(&consumer);
    let publisher = bus(cfg.consumer_name("p"));
    let url = server.url();
    let killer = tokio::spawn(async move {
        let client = redis::Client::open(url).unwrap();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if let Ok(mut c) = client
                .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
                .await
            {
                let _: redis::RedisResult<i64> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("normal")
                    .arg("SKIPME")
                    .arg("yes")
                    .query_async(&mut c)
                    .await;
            }
        }
    });
    let started = std::time::Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_millis(3200) {
        let _ = publish_recorded(&publisher, &ledger, &[created(i)]).await;
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    killer.await.unwrap();
    ledger.healed();
    let complete = wait_until(Duration::from_secs(20), || async {
        ledger.complete(&["g"])
    })
    .await;
    stop(&consumer, task).await;
    assert!(complete, "not every acknowledged event was handled");
    let report = ledger.check(
        &Expect::new("R-11 all connections killed every 300 ms", &["g"]).duplicates_at_most(
            10 * 100,
            "an ack lost with its connection leaves the entry pending: at most one batch per kill",
        ),
    );
    report.assert_ok();
    let stats = consumer.stats();
    assert!(
        stats.reconnections >= 3,
        "the consumer was disconnected and reconnected: {stats:?}"
    );
    assert!(
        stats.reconnections < 100,
        "no tight reconnect loop: {}",
        stats.reconnections
    );
    assert!(
        report.published_ok > 100,
        "publishing kept going ({} ok, {} indeterminate, {} failed)",
        report.published_ok,
        report.indeterminate,
        report.failed
    );
    drop(server);
}

/// A consumer process frozen (SIGSTOP) longer than the idle time while it holds a batch: a
/// surviving consumer recovers and handles its entries; when the zombie resumes (SIGCONT) it
/// finishes its batch (duplicates) and its late acks are counted as not applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_consumer_is_survived_and_its_late_acks_are_counted() {
    let prefix = unique_prefix("zombie");
    let _c = Cleanup(prefix.clone());
    let ledger = Arc::new(Ledger::new());
    let publisher = bus(config(&prefix, "workers", "publisher"));
    publisher.connect().await.unwrap();
    let events: Vec<EventEnvelope> = (0..100).map(created).collect();
    let all: HashSet<String> = events.iter().map(|e| e.event_id().to_string()).collect();
    publish_recorded(&publisher, &ledger, &events)
        .await
        .unwrap();

    let zombie = worker_command()
        .env("EVENTSOURCE_REDIS_URL", redis_url())
        .env("EVENTSOURCE_REDIS_STREAM_PREFIX", &prefix)
        .env("EVENTSOURCE_REDIS_CONSUMER_GROUP", "workers")
        .env("EVENTSOURCE_REDIS_CONSUMER_NAME", "zombie")
        .env("EVENTSOURCE_REDIS_BATCH_SIZE", "50")
        .env("EVENTSOURCE_REDIS_BLOCK_MS", "100")
        .env("EVENTSOURCE_REDIS_RECOVERY_INTERVAL_MS", "0")
        .env("WORKER_SLEEP_MS", "20")
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(30), || async {
            handled_by_process(&prefix).await.len() >= 5
        })
        .await
    );
    let pid = zombie.id().unwrap().to_string();
    let signal = |sig: &str| {
        std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success()
    };
    assert!(signal("-STOP"));

    let survivor = bus(config(&prefix, "workers", "survivor")
        .pending_idle_ms(300)
        .recovery_interval_ms(100));
    let seen = collecting_ids(&survivor);
    ledger_handler(&survivor, &ledger);
    let task = spawn_consumer(&survivor);
    let by_zombie_before = handled_by_process(&prefix).await;
    let covered = wait_until(Duration::from_secs(30), || async {
        seen.lock().unwrap().union(&by_zombie_before).count() == all.len()
    })
    .await;
    assert!(
        covered,
        "the survivor handled what the frozen consumer held"
    );
    assert!(signal("-CONT"));
    // Let the zombie finish its batch, then stop it and read its counters.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(signal("-TERM"));
    let out = tokio::time::timeout(Duration::from_secs(20), zombie.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    stop(&survivor, task).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stats: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v.get("stats").is_some())
        .unwrap_or_else(|| panic!("no stats in: {stdout}"))["stats"]
        .clone();
    let by_zombie = handled_by_process(&prefix).await;
    let duplicates = seen.lock().unwrap().intersection(&by_zombie).count();
    assert!(duplicates > 0, "the zombie re-did some work after resuming");
    assert!(
        stats["acks_not_applied"].as_u64().unwrap() > 0,
        "its late acks were counted: {stats}"
    );
    assert_eq!(pending(survivor.stream_name(), "workers").await, 0);
    ledger.import_redis_list(&redis_url(), &format!("{prefix}:ledger"));
    ledger
        .check(
            &Expect::new("R-5 consumer frozen past the idle time", &["workers"])
                .duplicates_at_most(
                    50,
                    "the zombie finishes the batch it held when it resumes: at most one batch",
                ),
        )
        .assert_ok();
}

/// Two processes started with the same consumer name: the second one notices that the name
/// is in use (warning + counter); both still consume without losing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_consumer_name_twice_is_detected() {
    let prefix = unique_prefix("samename");
    let _c = Cleanup(prefix.clone());
    let first = bus(config(&prefix, "g", "twin").block_ms(2000));
    let n1 = counting(&first);
    first.connect().await.unwrap();
    let t1 = spawn_consumer(&first);
    tokio::time::sleep(Duration::from_millis(300)).await; // `twin` is now blocking in XREADGROUP
    let second = bus(config(&prefix, "g", "twin").block_ms(2000));
    let n2 = counting(&second);
    let t2 = spawn_consumer(&second);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            second.stats().consumer_name_in_use == 1
        })
        .await
    );
    first
        .publish_events(&(0..20).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            n1.load(Ordering::SeqCst) + n2.load(Ordering::SeqCst) >= 20
        })
        .await
    );
    stop(&first, t1).await;
    stop(&second, t2).await;
    assert_eq!(
        first.stats().consumer_name_in_use,
        0,
        "the first had the name to itself"
    );
}

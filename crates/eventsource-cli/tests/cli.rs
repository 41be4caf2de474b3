//! The `eventsource` operator CLI against the real Redis: every command, its `--json` form,
//! the exit codes, scoping by group, a bounded replay next to a live consumer that keeps
//! failing, health as a probe, and a closed pipe.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use eventsource_core::bus::HandlerError;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::{RecoveryOptions, RedisEventBus, RedisEventBusConfig};
use eventsource_testsupport::{Cleanup, redis_url, unique_prefix};
use serde_json::Value;

fn cli_in(prefix: &str, group: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eventsource"))
        .args(["--url", &redis_url(), "--prefix", prefix, "--group", group])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn cli(prefix: &str, args: &[&str]) -> Output {
    cli_in(prefix, "billing", args)
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn bus(prefix: &str, group: &str, name: &str) -> RedisEventBus {
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    RedisEventBus::new(
        RedisEventBusConfig::default()
            .redis_url(redis_url())
            .stream_prefix(prefix)
            .consumer_group(group)
            .consumer_name(name)
            .block_ms(100)
            .max_retries(0)
            .recovery_interval_ms(0),
        registry,
    )
    .unwrap()
}

fn order(i: usize) -> EventEnvelope {
    Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: format!("c{i}"),
            total_amount: 1.0,
        },
    )
    .into_envelope()
}

async fn wait_until(mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out");
}

/// Publishes `n` events, then fails every event `group` reads (`seen`: all entries of the
/// stream, since a new group reads the whole history) and dead-letters them (max_retries 0).
async fn dead_letters(prefix: &str, group: &str, n: usize) -> RedisEventBus {
    dead_letters_seeing(prefix, group, n, n).await
}

async fn dead_letters_seeing(prefix: &str, group: &str, n: usize, seen: usize) -> RedisEventBus {
    let bus = bus(prefix, group, "w1");
    bus.subscribe(|_: Event<OrderCreated>| async {
        Err::<(), HandlerError>("card declined".into())
    });
    bus.connect().await.unwrap();
    bus.publish_events(&(0..n).map(order).collect::<Vec<_>>())
        .await
        .unwrap();
    let task = tokio::spawn({
        let bus = bus.clone();
        async move { bus.start_consuming().await }
    });
    wait_until(|| bus.stats().events_processed_failed >= seen as u64).await;
    bus.stop_consuming();
    task.await.unwrap().unwrap();
    let stats = bus
        .recover_pending_messages(RecoveryOptions {
            min_idle_time_ms: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stats.dlq, seen as u64);
    bus
}

/// Given a dead letter and a pending entry, the CLI shows them (info, pending, dlq list and
/// show, groups, consumers), replays one, says "not found" for a missing one, and trims
/// only what every group acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_sees_and_replays_what_failed() {
    let prefix = unique_prefix("cli");
    let _c = Cleanup(prefix.clone());
    let bus = dead_letters(&prefix, "billing", 1).await;
    bus.publish_events(&[order(9)]).await.unwrap();
    let failing = bus.clone();
    let task = tokio::spawn(async move { failing.start_consuming().await });
    wait_until(|| bus.stats().events_processed_failed >= 2).await;
    bus.stop_consuming();
    task.await.unwrap().unwrap();

    let pending = json(&cli(&prefix, &["--json", "pending"]));
    assert_eq!(pending.as_array().unwrap().len(), 1);
    assert_eq!(pending[0]["consumer"], "w1");
    assert_eq!(pending[0]["deliveries"], 1, "one handler start");

    let info = json(&cli(&prefix, &["--json", "info"]));
    assert_eq!(info["dlq_messages"], 1);
    assert_eq!(info["pending_messages"], 1);
    assert_eq!(info["stream"]["length"], 2);

    let groups = json(&cli(&prefix, &["--json", "groups"]));
    assert_eq!(groups[0]["name"], "billing");
    let consumers = json(&cli(&prefix, &["--json", "consumers"]));
    assert_eq!(consumers[0]["name"], "w1");
    assert_eq!(consumers[0]["pending"], 1);
    assert!(text(&cli(&prefix, &["consumers"])).contains("w1"));

    let letters = json(&cli(&prefix, &["--json", "dlq", "list"]));
    let dlq_id = letters[0]["dlq_id"].as_str().unwrap().to_owned();
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap()
            .contains("card declined")
    );
    assert_eq!(letters[0]["consumer_group"], "billing");
    let table = text(&cli(&prefix, &["dlq", "list"]));
    assert!(
        table.contains("card declined")
            && table.contains("OrderCreated")
            && table.contains(&dlq_id),
        "{table}"
    );
    let shown = json(&cli(&prefix, &["--json", "dlq", "show", &dlq_id]));
    assert_eq!(
        shown["fields"]["event_type"], "OrderCreated",
        "fields as an object"
    );
    assert!(text(&cli(&prefix, &["dlq", "show", &dlq_id])).contains("original_message_id"));
    let missing = cli(&prefix, &["dlq", "show", "1-0"]);
    assert_eq!(missing.status.code(), Some(1));

    let replay_missing = cli(&prefix, &["--json", "dlq", "replay", "1-0"]);
    assert_eq!(replay_missing.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&replay_missing.stdout).unwrap();
    assert_eq!(report["missing"], 1);
    let replayed = json(&cli(&prefix, &["--json", "dlq", "replay", &dlq_id]));
    assert_eq!(replayed["done"], 1);
    assert!(
        json(&cli(&prefix, &["--json", "dlq", "list"]))
            .as_array()
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        json(&cli(&prefix, &["--json", "info"]))["stream"]["length"],
        3
    );

    // Trim: asks first (no terminal here: refuses without --yes), a dry run changes nothing.
    let refused = cli(&prefix, &["trim"]);
    assert_eq!(
        refused.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--yes"));
    let dry = json(&cli(&prefix, &["--json", "trim", "--dry-run"]));
    assert_eq!(dry["would_remove"], 1, "{dry}");
    let trimmed = json(&cli(&prefix, &["--json", "trim", "--yes"]));
    assert_eq!(trimmed["removed"], 1, "{trimmed}");
    assert_eq!(
        json(&cli(&prefix, &["--json", "info"]))["stream"]["length"],
        2
    );
}

/// Help and version on standard output with exit 0, per-command help, a usage error is exit
/// 2, an unreachable Redis exit 3 (health: unhealthy, exit 1), an invalid unrelated
/// `EVENTSOURCE_REDIS_*` variable does not break anything.
#[test]
fn help_version_usage_and_connection_errors() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_eventsource"))
            .args(args)
            .env("EVENTSOURCE_REDIS_BATCH_SIZE", "not-a-number")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let help = run(&["--help"]);
    assert_eq!(help.status.code(), Some(0));
    assert!(text(&help).contains("Usage: eventsource") && text(&help).contains("EXIT CODES"));
    let sub = run(&["dlq", "replay", "--help"]);
    assert_eq!(sub.status.code(), Some(0));
    assert!(text(&sub).contains("--all-groups"));
    let version = run(&["--version"]);
    assert_eq!(version.status.code(), Some(0));
    assert!(text(&version).starts_with("eventsource "));
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(
        run(&["dlq", "replay"]).status.code(),
        Some(2),
        "ids or --all"
    );
    let unreachable = run(&["--url", "redis://127.0.0.1:1", "info"]);
    assert_eq!(unreachable.status.code(), Some(3));
    assert!(
        String::from_utf8_lossy(&unreachable.stderr)
            .contains("cannot connect to Redis at redis://127.0.0.1:1")
    );
    let health = run(&["--url", "redis://127.0.0.1:1", "--json", "health"]);
    assert_eq!(health.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&health.stdout).unwrap();
    assert_eq!(report["status"], "unhealthy");
    assert_eq!(report["connected"], false);
    let empty_prefix = run(&["--prefix", "", "info"]);
    assert_eq!(empty_prefix.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&empty_prefix.stderr).contains("stream_prefix"));
}

/// `--group` scopes the dead letters: listing, replaying and purging one group's letters
/// leaves another group's alone; `--all-groups` reaches them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_scoped_by_group() {
    let prefix = unique_prefix("cli-scope");
    let _c = Cleanup(prefix.clone());
    dead_letters(&prefix, "billing", 2).await;
    // A new group reads the whole stream: shipping fails billing's 2 events and its own 3.
    dead_letters_seeing(&prefix, "shipping", 3, 5).await;
    let billing = json(&cli_in(&prefix, "billing", &["--json", "dlq", "list"]));
    assert_eq!(billing.as_array().unwrap().len(), 2);
    let all = json(&cli_in(
        &prefix,
        "billing",
        &["--json", "dlq", "list", "--all-groups"],
    ));
    assert_eq!(all.as_array().unwrap().len(), 7);
    let shipping_id = json(&cli_in(&prefix, "shipping", &["--json", "dlq", "list"]))[0]["dlq_id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A billing operator cannot replay a shipping letter by id.
    let other = cli_in(
        &prefix,
        "billing",
        &["--json", "dlq", "replay", &shipping_id],
    );
    assert_eq!(other.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&other.stdout).unwrap();
    assert_eq!(report["other_group"], 1);

    let dry = json(&cli_in(
        &prefix,
        "billing",
        &["--json", "dlq", "replay", "--all", "--dry-run"],
    ));
    assert_eq!(dry["selected"], 2);
    let replayed = json(&cli_in(
        &prefix,
        "billing",
        &["--json", "dlq", "replay", "--all", "--yes"],
    ));
    assert_eq!(replayed["done"], 2);
    let left = json(&cli_in(
        &prefix,
        "billing",
        &["--json", "dlq", "list", "--all-groups"],
    ));
    assert_eq!(
        left.as_array().unwrap().len(),
        5,
        "shipping's letters untouched"
    );
    assert!(
        left.as_array()
            .unwrap()
            .iter()
            .all(|l| l["consumer_group"] == "shipping")
    );

    let refused = cli_in(&prefix, "shipping", &["dlq", "purge", "--all"]);
    assert_eq!(refused.status.code(), Some(2), "purge asks first");
    let purged = json(&cli_in(
        &prefix,
        "shipping",
        &["--json", "dlq", "purge", &shipping_id, "--yes"],
    ));
    assert_eq!(purged["done"], 1);
    let purged = json(&cli_in(
        &prefix,
        "shipping",
        &["--json", "dlq", "purge", "--all", "--yes"],
    ));
    assert_eq!(purged["done"], 4);
    assert!(
        json(&cli_in(
            &prefix,
            "shipping",
            &["--json", "dlq", "list", "--all-groups"]
        ))
        .as_array()
        .unwrap()
        .is_empty()
    );
}

/// `dlq replay --all` next to a live consumer that dead-letters every replayed entry again:
/// it replays exactly the letters present when it started, each once, and ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_all_is_bounded_next_to_a_live_consumer_that_fails_again() {
    let prefix = unique_prefix("cli-bounded");
    let _c = Cleanup(prefix.clone());
    let live = dead_letters(&prefix, "billing", 300).await;
    let before = json(&cli(&prefix, &["--json", "info"]))["stream"]["length"]
        .as_u64()
        .unwrap();
    // The live consumer fails everything and dead-letters at once (recovery every 50 ms,
    // entries idle for 10 ms).
    let consumer = RedisEventBus::new(
        live.config()
            .clone()
            .pending_idle_ms(10)
            .recovery_interval_ms(50),
        live.registry().clone(),
    )
    .unwrap();
    consumer.subscribe(|_: Event<OrderCreated>| async {
        Err::<(), HandlerError>("still declined".into())
    });
    let task = tokio::spawn({
        let consumer = consumer.clone();
        async move { consumer.start_consuming().await }
    });
    let out = tokio::task::spawn_blocking({
        let prefix = prefix.clone();
        move || cli(&prefix, &["--json", "dlq", "replay", "--all", "--yes"])
    })
    .await
    .unwrap();
    let report = json(&out);
    assert_eq!(report["selected"], 300);
    assert_eq!(
        report["done"], 300,
        "each letter present at the start, once"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("replay: 300 of 300"),
        "progress on stderr"
    );
    consumer.stop_consuming();
    task.await.unwrap().unwrap();
    let after = json(&cli(&prefix, &["--json", "info"]))["stream"]["length"]
        .as_u64()
        .unwrap();
    assert_eq!(after - before, 300, "300 entries appended, not more");
}

/// `health` judges the group: healthy (exit 0) with a live consumer and nothing old pending;
/// unhealthy (exit 1) with no consumer alive, a pending entry older than the limit, or more
/// dead letters than allowed — each check named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_a_probe_of_the_group() {
    let prefix = unique_prefix("cli-health");
    let _c = Cleanup(prefix.clone());
    let missing = cli(&prefix, &["--json", "health"]);
    assert_eq!(missing.status.code(), Some(1), "no group yet");
    let consumer = bus(&prefix, "billing", "alive");
    let n = Arc::new(AtomicUsize::new(0));
    let counter = n.clone();
    consumer.subscribe(move |_: Event<OrderCreated>| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    consumer.connect().await.unwrap();
    let task = tokio::spawn({
        let consumer = consumer.clone();
        async move { consumer.start_consuming().await }
    });
    consumer.publish_events(&[order(1)]).await.unwrap();
    wait_until(|| n.load(Ordering::SeqCst) == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let healthy = cli(&prefix, &["--json", "health"]);
    let report: Value = serde_json::from_slice(&healthy.stdout).unwrap();
    assert_eq!(healthy.status.code(), Some(0), "{report}");
    assert_eq!(report["status"], "healthy");
    assert_eq!(report["consumers_alive"][0], "alive");
    assert!(text(&cli(&prefix, &["health"])).starts_with("healthy"));
    consumer.stop_consuming();
    task.await.unwrap().unwrap();
    // Nobody reads any more: unhealthy once the idle limit passes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stale = cli(&prefix, &["--json", "health", "--max-idle", "300ms"]);
    assert_eq!(stale.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&stale.stdout).unwrap();
    let failed: Vec<&str> = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["ok"] == false)
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["consumers"], "{report}");
    // Dead letters over the limit.
    dead_letters(&prefix, "billing", 1).await;
    let dlq = cli(&prefix, &["--json", "health", "--max-dlq", "0"]);
    assert_eq!(dlq.status.code(), Some(1));
    let report: Value = serde_json::from_slice(&dlq.stdout).unwrap();
    assert_eq!(report["dead_letters"], 1);
}

/// `tail` prints the stream's events decoded, filtered by type, without joining a group;
/// `recover` dead-letters only exhausted entries and handles nothing; a missing stream or
/// group gets a warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_recover_and_warnings() {
    let prefix = unique_prefix("cli-tail");
    let _c = Cleanup(prefix.clone());
    let warned = cli(&prefix, &["info"]);
    assert!(String::from_utf8_lossy(&warned.stderr).contains("does not exist"));
    let publisher = bus(&prefix, "billing", "p");
    publisher.connect().await.unwrap();
    let ids = publisher
        .publish_events(&(0..3).map(order).collect::<Vec<_>>())
        .await
        .unwrap();
    let wrong_group = cli_in(&prefix, "biling", &["info"]);
    assert!(
        String::from_utf8_lossy(&wrong_group.stderr).contains("group biling does not exist"),
        "{}",
        String::from_utf8_lossy(&wrong_group.stderr)
    );
    let tailed = cli(
        &prefix,
        &[
            "--json",
            "tail",
            "--from",
            "0",
            "--no-follow",
            "--type",
            "OrderCreated",
        ],
    );
    assert!(tailed.status.success());
    let lines: Vec<Value> = text(&tailed)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["id"], ids[0].as_str());
    assert_eq!(lines[0]["payload"]["customer_id"], "c0");
    let none = cli(
        &prefix,
        &["tail", "--from", "0", "--no-follow", "--type", "Nope"],
    );
    assert!(text(&none).is_empty());
    let two = cli(&prefix, &["tail", "--from", "0", "--count", "2"]);
    assert_eq!(text(&two).lines().count(), 2);
    let groups = json(&cli(&prefix, &["--json", "groups"]));
    assert!(
        groups
            .as_array()
            .unwrap()
            .iter()
            .all(|g| g["name"] == "billing"),
        "tail joined no group: {groups}"
    );

    // Two entries pending with a crashed consumer; one has used up its attempts.
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let _: Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("billing")
        .arg("crashed")
        .arg("COUNT")
        .arg(2)
        .arg("STREAMS")
        .arg(publisher.stream_name())
        .arg(">")
        .query_async(&mut conn)
        .await
        .map(|_: redis::Value| Value::Null)
        .unwrap();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(publisher.stream_name())
        .arg("billing")
        .arg("crashed")
        .arg(0)
        .arg(&ids[0])
        .arg("IDLE")
        .arg(120_000)
        .arg("RETRYCOUNT")
        .arg(4)
        .arg("JUSTID")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(publisher.stream_name())
        .arg("billing")
        .arg("crashed")
        .arg(0)
        .arg(&ids[1])
        .arg("IDLE")
        .arg(120_000)
        .arg("JUSTID")
        .query_async(&mut conn)
        .await
        .unwrap();
    let recovered = json(&cli(&prefix, &["--json", "recover", "--min-idle", "60s"]));
    assert_eq!(recovered["checked"], 2, "{recovered}");
    assert_eq!(recovered["dead_lettered"], 1);
    assert_eq!(recovered["left_for_consumers"], 1);
    let pending = json(&cli(&prefix, &["--json", "pending"]));
    assert_eq!(
        pending.as_array().unwrap().len(),
        1,
        "the other is left pending, unhandled"
    );
    assert_eq!(pending[0]["message_id"], ids[1].as_str());
}

/// Output piped into a reader that closes early (`| head -1`) ends the command quietly: no
/// panic, exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_pipe_is_not_a_panic() {
    let prefix = unique_prefix("cli-pipe");
    let _c = Cleanup(prefix.clone());
    let publisher = bus(&prefix, "billing", "p");
    publisher.connect().await.unwrap();
    for _ in 0..10 {
        publisher
            .publish_events(&(0..500).map(order).collect::<Vec<_>>())
            .await
            .unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_eventsource"))
        .args([
            "--url",
            &redis_url(),
            "--prefix",
            &prefix,
            "tail",
            "--from",
            "0",
            "--no-follow",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 64];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout); // the reader goes away, like `head`
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
}

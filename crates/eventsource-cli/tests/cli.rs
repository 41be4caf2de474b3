//! The `eventsource` operator CLI against the real Redis: inspect and replay dead letters,
//! list pending entries, stream info and health.

use std::process::{Command, Output};
use std::time::Duration;

use eventsource_core::bus::HandlerError;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::{RecoveryOptions, RedisEventBus, RedisEventBusConfig};
use serde_json::Value;

use eventsource_testsupport::{Cleanup, redis_url};

fn cli(prefix: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_eventsource"))
        .args([
            "--url",
            &redis_url(),
            "--prefix",
            prefix,
            "--group",
            "billing",
        ])
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Given a dead letter and a pending entry, the CLI lists, shows and replays them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_sees_and_replays_what_failed() {
    let prefix = format!(
        "es-test:cli:{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    let _c = Cleanup(prefix.clone());
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    let bus = RedisEventBus::new(
        RedisEventBusConfig {
            redis_url: redis_url(),
            stream_prefix: prefix.clone(),
            consumer_group: "billing".into(),
            consumer_name: Some("w1".into()),
            block_ms: 100,
            max_retries: 0,
            recovery_interval_ms: 0,
            ..Default::default()
        },
        registry,
    )
    .unwrap();
    bus.subscribe(|_: Event<OrderCreated>| async {
        Err::<(), HandlerError>("card declined".into())
    });
    bus.connect().await.unwrap();
    let event = Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: "c".into(),
            total_amount: 1.0,
        },
    );
    bus.publish_events(&[event.clone().into_envelope(), event.clone().into_envelope()])
        .await
        .unwrap();
    let task = tokio::spawn({
        let bus = bus.clone();
        async move { bus.start_consuming().await }
    });
    for _ in 0..200 {
        if bus.stats().events_processed_failed == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus.stop_consuming();
    task.await.unwrap().unwrap();

    let pending = json(&cli(&prefix, &["--json", "pending"]));
    assert_eq!(pending.as_array().unwrap().len(), 2);
    assert_eq!(pending[0]["consumer"], "w1");
    assert_eq!(pending[0]["deliveries"], 1);

    // Age one entry and dead-letter it.
    let first = pending[0]["message_id"].as_str().unwrap().to_owned();
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(bus.stream_name())
        .arg("billing")
        .arg("w1")
        .arg(0)
        .arg(&first)
        .arg("IDLE")
        .arg(600_000)
        .arg("JUSTID")
        .query_async(&mut conn)
        .await
        .unwrap();
    let stats = bus
        .recover_pending_messages(RecoveryOptions {
            min_idle_time_ms: Some(300_000),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stats.dlq, 1);

    let info = json(&cli(&prefix, &["--json", "info"]));
    assert_eq!(info["dlq_messages"], 1);
    assert_eq!(info["pending_messages"], 1);
    assert_eq!(info["stream"]["length"], 2);

    let letters = json(&cli(&prefix, &["--json", "dlq", "list"]));
    let letter = &letters[0];
    let dlq_id = letter["message_id"].as_str().unwrap().to_owned();
    let table = String::from_utf8(cli(&prefix, &["dlq", "list"]).stdout).unwrap();
    assert!(
        table.contains("card declined")
            && table.contains("OrderCreated")
            && table.contains(&dlq_id),
        "{table}"
    );
    let shown = String::from_utf8(cli(&prefix, &["dlq", "show", &dlq_id]).stdout).unwrap();
    assert!(
        shown.contains(&format!("original_message_id  {first}")),
        "{shown}"
    );

    let missing = cli(&prefix, &["dlq", "replay", "1-0"]);
    assert_eq!(missing.status.code(), Some(1));
    let replayed = cli(&prefix, &["dlq", "replay", &dlq_id]);
    assert!(replayed.status.success());
    assert!(
        json(&cli(&prefix, &["--json", "dlq", "list"]))
            .as_array()
            .unwrap()
            .is_empty()
    );
    let info = json(&cli(&prefix, &["--json", "info"]));
    assert_eq!(
        info["stream"]["length"], 3,
        "the replay is back on the stream"
    );

    // The dead-lettered entry is acknowledged; the second is still pending; the replay unread.
    let trimmed = json(&cli(&prefix, &["--json", "trim"]));
    assert_eq!(trimmed["removed"], 1, "{trimmed}");
    assert_eq!(trimmed["min_id"], pending[1]["message_id"], "{trimmed}");
    assert_eq!(
        json(&cli(&prefix, &["--json", "info"]))["stream"]["length"],
        2
    );

    let health = json(&cli(&prefix, &["--json", "health"]));
    assert_eq!(health["status"], "degraded", "nothing consumes in the CLI");
}

/// Bad usage and an unreachable Redis give clear messages and distinct exit codes.
#[test]
fn usage_and_connection_errors() {
    let out = Command::new(env!("CARGO_BIN_EXE_eventsource"))
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: eventsource"));
    let out = Command::new(env!("CARGO_BIN_EXE_eventsource"))
        .args(["--url", "redis://127.0.0.1:1", "info"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("cannot connect to Redis at redis://127.0.0.1:1")
    );
    let out = Command::new(env!("CARGO_BIN_EXE_eventsource"))
        .args(["--url", "redis://127.0.0.1:1", "health"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("unhealthy"));
    let out = Command::new(env!("CARGO_BIN_EXE_eventsource"))
        .args(["--prefix", "", "info"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("stream_prefix"));
}

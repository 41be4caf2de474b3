//! The CLI on a partitioned stream (`--partitions`): totals and owners, a command run on
//! every partition in turn (text headings, one JSON document), and a dead letter found in
//! its partition and replayed there.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use eventsource_core::bus::HandlerError;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::{PartitionedEventBus, RedisEventBusConfig, partition_of};
use eventsource_testsupport::{Cleanup, redis_url, unique_prefix};
use serde_json::Value;

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
        .args(["--partitions", "3"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
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

fn order(customer: &str) -> EventEnvelope {
    Event::new(
        uuid::Uuid::new_v4(),
        OrderCreated {
            customer_id: customer.to_owned(),
            total_amount: 1.0,
        },
    )
    .into_envelope()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_finds_a_dead_letter_in_its_partition_and_replays_it() {
    let prefix = unique_prefix("cli-part");
    let _c = Cleanup(prefix.clone());
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>().unwrap();
    let bus = PartitionedEventBus::new(
        RedisEventBusConfig::default()
            .redis_url(redis_url())
            .stream_prefix(prefix.clone())
            .consumer_group("billing")
            .consumer_name("w1")
            .partitions(3)
            .partition_lease(Duration::from_secs(1))
            .block_ms(100)
            .max_retries(0)
            .recovery_interval_ms(0),
        registry,
    )
    .unwrap();
    bus.subscribe(|event: Event<OrderCreated>| async move {
        if event.customer_id == "poison" {
            Err::<(), HandlerError>("card declined".into())
        } else {
            Ok(())
        }
    });
    let mut events: Vec<EventEnvelope> = (0..8).map(|i| order(&format!("c{i}"))).collect();
    let poison = order("poison");
    let poison_partition = partition_of(poison.aggregate_id(), 3);
    events.push(poison.clone());
    bus.connect().await.unwrap();
    bus.publish_events(&events).await.unwrap();
    let task = tokio::spawn({
        let bus = bus.clone();
        async move { bus.start_consuming().await }
    });
    for _ in 0..500 {
        let s = bus.stats();
        if s.events_consumed == 8 && s.events_processed_failed >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(bus.shutdown(Duration::from_secs(10)).await);
    task.await.unwrap().unwrap();

    // Totals and each partition.
    let info = json(&cli(&prefix, &["--json", "info"]));
    assert_eq!(info["partitions"], 3);
    assert_eq!(info["length"], 9);
    assert_eq!(info["pending"], 1);
    assert_eq!(info["per_partition"].as_array().unwrap().len(), 3);
    assert_eq!(
        info["per_partition"][poison_partition as usize]["pending"],
        1
    );

    // Recovery on every partition dead-letters the poison event where it lives.
    let recovered = json(&cli(
        &prefix,
        &[
            "--json",
            "recover",
            "--min-idle",
            "0ms",
            "--max-retries",
            "0",
        ],
    ));
    assert_eq!(recovered["partitions"].as_array().unwrap().len(), 3);
    let listed = json(&cli(&prefix, &["--json", "dlq", "list"]));
    let mut found = Vec::new();
    for p in listed["partitions"].as_array().unwrap() {
        for letter in p["result"].as_array().unwrap() {
            found.push((p["partition"].as_u64().unwrap(), letter.clone()));
        }
    }
    assert_eq!(found.len(), 1, "{listed}");
    let (partition, letter) = &found[0];
    assert_eq!(*partition, u64::from(poison_partition));
    assert!(letter["error"].as_str().unwrap().contains("card declined"));
    let dlq_id = letter["dlq_id"].as_str().unwrap().to_owned();

    // Text: one heading per partition.
    let text = String::from_utf8_lossy(&cli(&prefix, &["dlq", "list"]).stdout).into_owned();
    for i in 0..3 {
        assert!(
            text.contains(&format!("== partition {i}: {{{prefix}:p{i}}}:stream ==")),
            "{text}"
        );
    }

    // An id belongs to one partition: without --partition the replay is refused…
    let refused = cli(&prefix, &["dlq", "replay", &dlq_id]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--partition"));
    // …and with it, replayed there.
    let replayed = json(&cli(
        &prefix,
        &[
            "--json",
            "--partition",
            &poison_partition.to_string(),
            "dlq",
            "replay",
            &dlq_id,
        ],
    ));
    assert_eq!(replayed["done"], 1);
    let info = json(&cli(&prefix, &["--json", "info"]));
    assert_eq!(info["dead_letters"], 0);
    assert_eq!(info["length"], 10);

    // A partition out of range is a usage error.
    assert_eq!(
        cli(&prefix, &["--partition", "3", "info"]).status.code(),
        Some(2)
    );
}

//! Redis ACL users: the documented rules for a publisher and a consumer are enough for the
//! whole flow, and a missing permission is a clear, non-transient error that names the
//! command and the `ACL SETUSER` to run — never "Redis unavailable" retried forever.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::OrderCreated;
use eventsource_redis::{RecoveryOptions, RedisBusError};

const WAIT: Duration = Duration::from_secs(20);

/// The README's keys for one stream (`orders`).
const KEYS: &str = "~orders:* %R~{orders}:partitions";

/// The README's consumer rule, word for word.
const CONSUMER_RULE: &str = "+ping +client|setname +xgroup|create \
     +xgroup|delconsumer +xreadgroup +xack +xclaim +xpending +xrange +xrevrange +xadd +xdel \
     +xinfo|consumers +xinfo|groups +xlen +exists +get +set +del +evalsha +script|load +info";

/// The README's publisher rule.
const PUBLISHER_RULE: &str = "+ping +client|setname +xadd +get +info";

async fn set_user(port: u16, user: &str, keys: &str, rule: &str) {
    let mut admin = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let mut cmd = redis::cmd("ACL");
    cmd.arg("SETUSER")
        .arg(user)
        .arg("reset")
        .arg("on")
        .arg(format!(">{user}-pw"));
    // `keys`: one or more key patterns, space-separated.
    for part in keys
        .split_whitespace()
        .chain(["-@all"])
        .chain(rule.split_whitespace())
    {
        cmd.arg(part);
    }
    let _: () = cmd.query_async(&mut admin).await.unwrap();
}

/// What Redis refused and logged (`ACL LOG`): one line per entry, "user reason object".
async fn acl_log(port: u16) -> Vec<String> {
    let mut admin = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let entries: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut admin)
        .await
        .unwrap();
    let text = |e: &std::collections::HashMap<String, redis::Value>, k: &str| match e.get(k) {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(redis::Value::SimpleString(s)) => s.clone(),
        other => format!("{other:?}"),
    };
    entries
        .iter()
        .map(|e| {
            format!(
                "{} {} {} ({})",
                text(e, "username"),
                text(e, "reason"),
                text(e, "object"),
                text(e, "context")
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_rules_run_the_whole_flow() {
    let port = free_port();
    let _server = OwnRedis::start(port, &temp_dir("acl"), &[]);
    set_user(port, "orders-consumer", KEYS, CONSUMER_RULE).await;
    set_user(port, "orders-publisher", KEYS, PUBLISHER_RULE).await;
    let url = |user: &str| format!("redis://{user}:{user}-pw@127.0.0.1:{port}");

    let publisher = bus(config("orders", "billing", "p").redis_url(url("orders-publisher")));
    let consumer = bus(config("orders", "billing", "c1")
        .redis_url(url("orders-consumer"))
        .max_retries(0));
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    consumer.subscribe(move |e: Event<OrderCreated>| {
        let h = h.clone();
        async move {
            if e.customer_id == "cust-0" && h.load(Ordering::SeqCst) < 100 {
                return Err::<(), HandlerError>("first time fails".into());
            }
            h.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    consumer.connect().await.unwrap();
    publisher
        .publish_events(&(0..5).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let task = spawn_consumer(&consumer);
    assert!(wait_until(WAIT, || async { handled.load(Ordering::SeqCst) == 4 }).await);
    let health = consumer.health_check().await;
    assert_eq!(
        health.status,
        eventsource_redis::HealthStatus::Healthy,
        "{health:?}"
    );
    // The failed entry: recovery dead-letters it (max_retries 0), replay brings it back.
    let stats = consumer
        .recover_pending_messages(RecoveryOptions {
            min_idle_time_ms: Some(0),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(stats.dlq, 1, "{stats:?}");
    handled.store(100, Ordering::SeqCst);
    let letter = consumer.get_dlq_messages(1).await.unwrap().remove(0);
    assert!(
        consumer
            .replay_dlq_message(&letter.message_id)
            .await
            .unwrap()
    );
    assert!(wait_until(WAIT, || async { handled.load(Ordering::SeqCst) == 101 }).await);
    let info = consumer.get_stream_info().await;
    assert!(info.connected, "{info:?}");
    assert_eq!(info.dlq_messages, 0);
    assert!(consumer.prune_idle_consumers(0).await.is_ok());
    stop(&consumer, task).await;
    assert_eq!(consumer.stats().reconnections, 0);
    // The rules cover everything the bus touches: Redis refused nothing.
    assert_eq!(acl_log(port).await, Vec::<String>::new(), "ACL LOG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_permission_names_the_command_and_the_grant() {
    let port = free_port();
    let _server = OwnRedis::start(port, &temp_dir("acl-missing"), &[]);
    let without_create = CONSUMER_RULE.replace("+xgroup|create ", "");
    set_user(port, "half", KEYS, &without_create).await;
    let consumer = bus(config("orders", "billing", "c1")
        .redis_url(format!("redis://half:half-pw@127.0.0.1:{port}"))
        .reconnect_max_delay_ms(200));
    let err = consumer.connect().await.unwrap_err();
    assert!(
        matches!(&err, RedisBusError::NoPermission { command, user, .. }
            if command == "xgroup|create" && user.as_deref() == Some("half")),
        "{err:?}"
    );
    assert_eq!(err.kind(), eventsource_redis::ErrorKind::Permission);
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains("ACL SETUSER half +xgroup|create"),
        "{err}"
    );
    // Consuming anyway: the loop keeps trying (slowly) and health says why.
    let task = spawn_consumer(&consumer);
    assert!(
        wait_until(WAIT, || async {
            let health = consumer.health_check().await;
            health.status == eventsource_redis::HealthStatus::Unhealthy
                && health
                    .error
                    .as_deref()
                    .is_some_and(|e| e.contains("xgroup|create") && e.contains("ACL SETUSER"))
        })
        .await,
        "{:?}",
        consumer.health_check().await
    );
    stop(&consumer, task).await;

    // A key outside the user's pattern: the publish error names XADD, not a connection.
    let stranger = bus(config("payments", "billing", "c1")
        .redis_url(format!("redis://half:half-pw@127.0.0.1:{port}")));
    let err = stranger.publish_events(&[created(1)]).await.unwrap_err();
    assert!(matches!(err, RedisBusError::NoPermission { .. }), "{err:?}");
    assert!(!err.is_transient());
}

/// The README's rules for a partitioned bus: the consumer's rule plus the ownership
/// commands, on the keys `~{prefix}:* ~{prefix:p*`.
const PARTITIONED_CONSUMER_EXTRA: &str =
    "+xautoclaim +incr +pexpire +zadd +zrange +zrem +zremrangebyscore +time";
const PARTITIONED_PUBLISHER_RULE: &str = "+ping +client|setname +xadd +set +get +xlen +info";
const PARTITIONED_KEYS: &str = "~{orders}:* ~{orders:p* %R~orders:stream";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_partitioned_rules_run_the_whole_flow() {
    use eventsource_redis::PartitionedEventBus;
    let port = free_port();
    let _server = OwnRedis::start(port, &temp_dir("acl-partitioned"), &[]);
    let consumer_rule = format!("{CONSUMER_RULE} {PARTITIONED_CONSUMER_EXTRA}");
    set_user(port, "part-consumer", PARTITIONED_KEYS, &consumer_rule).await;
    set_user(
        port,
        "part-publisher",
        PARTITIONED_KEYS,
        PARTITIONED_PUBLISHER_RULE,
    )
    .await;
    let url = |user: &str| format!("redis://{user}:{user}-pw@127.0.0.1:{port}");
    let partitioned = |user: &str, name: &str| {
        PartitionedEventBus::new(
            config("orders", "billing", name)
                .redis_url(url(user))
                .partitions(4)
                .partition_lease(Duration::from_secs(1))
                .max_retries(0),
            registry(),
        )
        .unwrap()
    };
    let publisher = partitioned("part-publisher", "p");
    let consumer = partitioned("part-consumer", "c1");
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    consumer.subscribe(move |e: Event<OrderCreated>| {
        let h = h.clone();
        async move {
            if e.customer_id == "cust-0" && h.load(Ordering::SeqCst) < 100 {
                return Err::<(), HandlerError>("first time fails".into());
            }
            h.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    });
    publisher
        .publish_events(&(0..8).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let task = tokio::spawn({
        let c = consumer.clone();
        async move { c.start_consuming().await }
    });
    assert!(wait_until(WAIT, || async { handled.load(Ordering::SeqCst) == 7 }).await);
    assert_eq!(consumer.owned_partitions().len(), 4);
    let health = consumer.health_check().await;
    assert_eq!(
        health.status,
        eventsource_redis::HealthStatus::Healthy,
        "{health:?}"
    );
    // Recovery, the dead letter and its replay, in the failed event's partition.
    let mut dead = 0;
    for part in consumer.partitions() {
        dead += part
            .recover_pending_messages(RecoveryOptions {
                min_idle_time_ms: Some(0),
                ..Default::default()
            })
            .await
            .unwrap()
            .dlq;
    }
    assert_eq!(dead, 1);
    handled.store(100, Ordering::SeqCst);
    for part in consumer.partitions() {
        for letter in part.get_dlq_messages(10).await.unwrap() {
            assert!(part.replay_dlq_message(&letter.message_id).await.unwrap());
        }
    }
    assert!(wait_until(WAIT, || async { handled.load(Ordering::SeqCst) == 101 }).await);
    assert!(consumer.shutdown(Duration::from_secs(10)).await);
    task.await.unwrap().unwrap();
    assert_eq!(consumer.stats().reconnections, 0);
    assert_eq!(consumer.ownership_stats().partitions_lost, 0);
    assert_eq!(acl_log(port).await, Vec::<String>::new(), "ACL LOG");

    // Without one of the ownership commands the consumer takes nothing, and its health
    // names the command and the grant.
    let without = consumer_rule.replace("+xautoclaim ", "");
    set_user(port, "part-consumer", PARTITIONED_KEYS, &without).await;
    let half = partitioned("part-consumer", "c2");
    let task = tokio::spawn({
        let c = half.clone();
        async move { c.start_consuming().await }
    });
    assert!(
        wait_until(WAIT, || async {
            let health = half.health_check().await;
            health.status == eventsource_redis::HealthStatus::Unhealthy
                && health.error.as_deref().is_some_and(|e| {
                    e.contains("xautoclaim") && e.contains("ACL SETUSER part-consumer")
                })
        })
        .await,
        "{:?}",
        half.health_check().await
    );
    assert!(half.owned_partitions().is_empty());
    assert!(half.shutdown(Duration::from_secs(10)).await);
    task.await.unwrap().unwrap();
}

/// A safety check the user may not run is not skipped in silence: the health's warnings say
/// which check and the grant to add (logged once at warn level too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_skipped_safety_check_is_reported_with_the_grant() {
    let port = free_port();
    let _server = OwnRedis::start(port, &temp_dir("acl-skipped"), &[]);
    // The rules of an earlier README: no key for the partition count, no INFO.
    let narrow = CONSUMER_RULE.replace(" +info", "");
    set_user(port, "old-consumer", "~orders:*", &narrow).await;
    let consumer = bus(config("orders", "billing", "c1").redis_url(format!(
        "redis://old-consumer:old-consumer-pw@127.0.0.1:{port}"
    )));
    consumer.connect().await.unwrap();
    let health = consumer.health_check().await;
    let said = health.warnings.join("\n");
    assert!(
        said.contains("refuses a prefix a PartitionedEventBus uses")
            && said.contains("ACL SETUSER old-consumer +get %R~{orders}:partitions"),
        "{said}"
    );
    assert!(said.contains("ACL SETUSER old-consumer +info"), "{said}");
    // Each said once, however often it is checked again.
    consumer.health_check().await;
    assert_eq!(consumer.health_check().await.warnings.len(), 2, "{said}");
}

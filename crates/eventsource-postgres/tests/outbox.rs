//! The transactional outbox against the real PostgreSQL (and Redis for the relay process):
//! order, retries with the error recorded, several relays, cleanup, and a relay killed with
//! SIGKILL between commit and publish.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use eventsource_core::BoxFuture;
use eventsource_core::bus::{BusError, EventPublisher};
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderAggregate, OrderCreated};
use eventsource_postgres::{OutboxRelay, RelayConfig, RoundOutcome, outbox_stats};
use uuid::Uuid;

/// Records what it publishes; fails the first `fail_first` calls.
#[derive(Default)]
struct Recorder {
    published: Mutex<Vec<Uuid>>,
    calls: AtomicUsize,
    fail_first: usize,
}

impl EventPublisher for Recorder {
    fn publish<'a>(&'a self, events: &'a [EventEnvelope]) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if call < self.fail_first {
                return Err(BusError::transport(
                    eventsource_core::ErrorKind::Unavailable,
                    "broker unavailable (test)",
                ));
            }
            self.published
                .lock()
                .unwrap()
                .extend(events.iter().map(|e| e.event_id()));
            Ok(())
        })
    }
}

async fn save_orders(store: &eventsource_postgres::PostgresEventStore, n: usize) -> Vec<Uuid> {
    let repo = AggregateRepository::<OrderAggregate>::new(Arc::new(store.clone()));
    let mut ids = Vec::new();
    for i in 0..n {
        let mut order = repo.create_new(Uuid::new_v4());
        order.create(&format!("cust-{i}"), i as f64).unwrap();
        order.ship("T").unwrap();
        ids.extend(order.uncommitted_events().iter().map(|e| e.event_id()));
        repo.save(&mut order).await.unwrap();
    }
    ids
}

/// Appends write outbox rows in the same transaction; a relay round publishes them in append
/// order to an in-memory bus and marks them published.
#[tokio::test]
async fn relay_publishes_in_order_and_marks_rows() {
    let (store, _guard) = store("outbox_order", true).await;
    let appended = save_orders(&store, 3).await;
    assert_eq!(outbox_stats(&store).await.unwrap().pending, 6);
    let bus = Arc::new(InMemoryEventBus::new());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    bus.subscribe_to_all_events(move |e: EventEnvelope| {
        let s = s.clone();
        async move { s.lock().unwrap().push(e.event_id()) }
    });
    let relay = OutboxRelay::new(store.clone(), bus.clone(), RelayConfig::default());
    assert_eq!(relay.run_once().await.unwrap(), RoundOutcome::Published(6));
    assert_eq!(relay.run_once().await.unwrap(), RoundOutcome::Idle);
    assert_eq!(*seen.lock().unwrap(), appended);
    let stats = relay.stats().await.unwrap();
    assert_eq!((stats.pending, stats.published, stats.failed), (0, 6, 0));
}

/// A failing publisher: the rows stay pending with the error and attempt recorded, are not
/// retried before the backoff, then are published.
#[tokio::test]
async fn failed_publish_is_retried_with_backoff_and_error_recorded() {
    let (store, _guard) = store("outbox_retry", true).await;
    let appended = save_orders(&store, 2).await;
    let recorder = Arc::new(Recorder {
        fail_first: 1,
        ..Default::default()
    });
    let relay = OutboxRelay::new(
        store.clone(),
        recorder.clone(),
        RelayConfig {
            retry_base: Duration::from_millis(300),
            ..Default::default()
        },
    );
    assert_eq!(relay.run_once().await.unwrap(), RoundOutcome::Failed);
    let stats = relay.stats().await.unwrap();
    assert_eq!((stats.pending, stats.failed), (4, 4));
    assert!(
        relay
            .last_error()
            .await
            .unwrap()
            .unwrap()
            .contains("broker unavailable")
    );
    assert_eq!(
        relay.run_once().await.unwrap(),
        RoundOutcome::Idle,
        "not before the backoff"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(relay.run_once().await.unwrap(), RoundOutcome::Published(4));
    assert_eq!(*recorder.published.lock().unwrap(), appended);
    assert_eq!(relay.stats().await.unwrap().failed, 0);
    assert_eq!(relay.last_error().await.unwrap(), None);
}

/// Two relays running while events are appended: every event is published exactly once, in
/// append order; cleanup removes published rows past the retention.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_each_row_once_in_order() {
    let (store, _guard) = store("outbox_two", true).await;
    let recorder = Arc::new(Recorder::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let mut tasks = Vec::new();
    for _ in 0..2 {
        let relay = OutboxRelay::new(
            store.clone(),
            recorder.clone(),
            RelayConfig {
                batch_size: 7,
                poll_interval: Duration::from_millis(50),
                retention: Duration::ZERO,
                ..Default::default()
            },
        );
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            relay.run_until(async move { stop.notified().await }).await
        }));
    }
    let appended = save_orders(&store, 40).await;
    for _ in 0..200 {
        if recorder.published.lock().unwrap().len() >= appended.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.notify_waiters();
    for t in tasks {
        t.await.unwrap();
    }
    let published = recorder.published.lock().unwrap().clone();
    assert_eq!(published.len(), appended.len(), "each exactly once");
    assert_eq!(
        published.iter().collect::<HashSet<_>>().len(),
        appended.len()
    );
    assert_eq!(published, appended, "in append order");
    let relay = OutboxRelay::new(
        store.clone(),
        recorder.clone(),
        RelayConfig {
            retention: Duration::ZERO,
            ..Default::default()
        },
    );
    assert_eq!(relay.cleanup().await.unwrap(), appended.len() as u64);
    assert_eq!(
        relay.stats().await.unwrap(),
        eventsource_postgres::OutboxStats::default()
    );
}

async fn stream_event_ids(stream: &str) -> HashSet<String> {
    common::stream_event_ids(stream).await.into_iter().collect()
}

/// A relay process killed with SIGKILL after the commit and before publishing: after a
/// restart every committed event reaches the Redis stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_before_publishing_loses_nothing() {
    let (store, guard) = store("outbox_kill", true).await;
    let prefix = format!(
        "es-test:relay:{}",
        &Uuid::new_v4().simple().to_string()[..12]
    );
    let stream = format!("{prefix}:stream");
    let appended: HashSet<String> = save_orders(&store, 25)
        .await
        .iter()
        .map(Uuid::to_string)
        .collect();

    let mut relay = relay_process(&guard.0, &prefix, Some("before_publish:30000"));
    let reached = reached_failpoint(&mut relay, "before_publish").await;
    assert!(
        reached,
        "the relay reached the point between commit and publish"
    );
    relay.start_kill().unwrap(); // SIGKILL
    relay.wait().await.unwrap();
    assert!(
        stream_event_ids(&stream).await.is_empty(),
        "nothing was published before the kill"
    );
    assert_eq!(outbox_stats(&store).await.unwrap().pending, 50);

    let mut again = relay_process(&guard.0, &prefix, None);
    let mut complete = false;
    for _ in 0..200 {
        if stream_event_ids(&stream).await == appended {
            complete = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = again.id().unwrap().to_string();
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(10), again.wait()).await;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let published = stream_event_ids(&stream).await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        complete,
        "published {} of {} committed events",
        published.len(),
        appended.len()
    );
    assert_eq!(outbox_stats(&store).await.unwrap().pending, 0);
}

/// Never completes a publish.
struct Hangs;

impl EventPublisher for Hangs {
    fn publish<'a>(&'a self, _: &'a [EventEnvelope]) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(std::future::pending())
    }
}

/// Breaks the stored event at `position` so it no longer decodes (its `event_id` removed).
async fn corrupt(store: &eventsource_postgres::PostgresEventStore, position: i64) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET payload = payload - 'event_id' WHERE position = $1",
        store.events_table()
    )))
    .bind(position)
    .execute(store.pool())
    .await
    .unwrap();
}

/// A row whose stored event no longer decodes does not stop the relay: it is quarantined with
/// the reason (stats and the quarantine list show it), the rows after it are published, and
/// an operator retries it (after fixing it) or skips it.
#[tokio::test]
async fn an_undecodable_row_is_quarantined_and_the_rest_keep_flowing() {
    let (store, _guard) = store("outbox_quarantine", true).await;
    let ids = save_orders(&store, 3).await; // 6 events, positions 1..=6
    corrupt(&store, 2).await;
    corrupt(&store, 5).await;
    let recorder = Arc::new(Recorder::default());
    let relay = OutboxRelay::new(
        store.clone(),
        recorder.clone(),
        RelayConfig {
            retry_base: Duration::ZERO,
            ..Default::default()
        },
    );
    assert_eq!(relay.run_once().await.unwrap(), RoundOutcome::Published(4));
    let published = recorder.published.lock().unwrap().clone();
    assert_eq!(
        published,
        [ids[0], ids[2], ids[3], ids[5]],
        "the rest, in order"
    );
    let stats = relay.stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.quarantined, stats.published),
        (0, 2, 4),
        "{stats:?}"
    );
    let rows = eventsource_postgres::quarantined_rows(&store, 10)
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].position, 2);
    let reason = rows[0].last_error.clone().unwrap();
    assert!(
        reason.contains("does not decode") && reason.contains("event_id"),
        "{reason}"
    );
    // The relay keeps going: nothing left to do, no error.
    assert_eq!(relay.run_once().await.unwrap(), RoundOutcome::Idle);

    // Fixed and retried: published (after the others).
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE {} SET payload = payload || jsonb_build_object('event_id', event_id::text) \
         WHERE position = 2",
        store.events_table()
    )))
    .execute(store.pool())
    .await
    .unwrap();
    assert_eq!(
        eventsource_postgres::retry_quarantined(&store, Some(rows[0].id))
            .await
            .unwrap(),
        1
    );
    assert_eq!(relay.run_once().await.unwrap(), RoundOutcome::Published(1));
    assert_eq!(recorder.published.lock().unwrap().last(), Some(&ids[1]));
    // Skipped: never published, counted.
    assert!(
        eventsource_postgres::skip_quarantined(&store, rows[1].id)
            .await
            .unwrap()
    );
    assert!(
        !eventsource_postgres::skip_quarantined(&store, rows[1].id)
            .await
            .unwrap()
    );
    let stats = relay.stats().await.unwrap();
    assert_eq!(
        (stats.pending, stats.quarantined, stats.skipped),
        (0, 0, 1),
        "{stats:?}"
    );
}

/// A publisher that never answers does not hold the relay (and its lock) forever: the round
/// fails after `publish_timeout` with the reason recorded, and the rows are retried later.
#[tokio::test]
async fn a_hanging_publisher_is_a_recorded_failure() {
    let (store, _guard) = store("outbox_hang", true).await;
    save_orders(&store, 1).await;
    let relay = OutboxRelay::new(
        store.clone(),
        Arc::new(Hangs),
        RelayConfig {
            publish_timeout: Duration::from_millis(200),
            ..Default::default()
        },
    );
    assert_eq!(relay.run_once().await.unwrap(), RoundOutcome::Failed);
    let error = relay.last_error().await.unwrap().unwrap();
    assert!(error.contains("publish_timeout"), "{error}");
    assert_eq!(relay.stats().await.unwrap().failed, 2);
}

/// A shutdown while a backlog is being worked off stops the relay between rounds (rows are
/// left for the next run), instead of after the whole backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_honoured_between_rounds_of_a_backlog() {
    let (store, _guard) = store("outbox_shutdown", true).await;
    save_orders(&store, 500).await; // 1,000 rows: 10 rounds of 100
    let recorder = Arc::new(Recorder::default());
    let relay = OutboxRelay::new(store.clone(), recorder.clone(), RelayConfig::default());
    let stop = Arc::new(tokio::sync::Notify::new());
    let calls = recorder.clone();
    let trigger = stop.clone();
    // Ask for a stop as soon as the first round published.
    let watcher = tokio::spawn(async move {
        while calls.calls.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        trigger.notify_one();
    });
    relay.run_until(async move { stop.notified().await }).await;
    watcher.await.unwrap();
    let stats = relay.stats().await.unwrap();
    assert!(stats.published >= 100, "{stats:?}");
    assert!(stats.pending > 0, "stopped with a backlog left: {stats:?}");
    assert_eq!(stats.published + stats.pending, 1000);
}

/// The relay binary shows quarantined rows (`status`, `--json`), and retries or skips them;
/// `--help` works and an unknown command is a usage error.
#[tokio::test]
async fn the_relay_binary_shows_retries_and_skips_quarantined_rows() {
    let (store, _guard) = store("outbox_cli", true).await;
    save_orders(&store, 1).await;
    corrupt(&store, 1).await;
    let relay = OutboxRelay::new(
        store.clone(),
        Arc::new(Recorder::default()),
        RelayConfig::default(),
    );
    assert_eq!(relay.run_once().await.unwrap(), RoundOutcome::Published(1));
    let schema = store.events_table().split('.').next().unwrap().to_owned();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_eventsource-outbox-relay"))
            .env("DATABASE_URL", database_url())
            .env("EVENTSOURCE_PG_SCHEMA", &schema)
            .args(args)
            .output()
            .unwrap()
    };
    let help = run(&["--help"]);
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("status [--json]"));
    assert_eq!(run(&["frobnicate"]).status.code(), Some(2));
    let status = run(&["status", "--json"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(json["stats"]["quarantined"], 1);
    let id = json["quarantined"][0]["id"].as_i64().unwrap();
    assert!(
        json["quarantined"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("does not decode")
    );
    let text = run(&["status"]);
    assert!(String::from_utf8_lossy(&text.stdout).contains(&format!("quarantined row {id}")));
    assert!(run(&["skip", &id.to_string()]).status.success());
    assert_eq!(run(&["skip", &id.to_string()]).status.code(), Some(1));
    assert_eq!(run(&["retry", &id.to_string()]).status.code(), Some(1));
    let json: serde_json::Value =
        serde_json::from_slice(&run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(json["stats"]["skipped"], 1);
    assert_eq!(json["stats"]["quarantined"], 0);
}

/// The outbox rows of one append are numbered in the order of the events' positions (the
/// relay publishes by outbox id), on both append paths, for a batch of 50.
#[tokio::test]
async fn outbox_rows_of_a_batch_follow_the_positions() {
    for serialize in [false, true] {
        let (store, guard) = common::store_with("outbox_batch_order", true, serialize).await;
        let aggregate = Uuid::new_v4();
        let events: Vec<EventEnvelope> = (0..50)
            .map(|v| {
                Event::new(
                    aggregate,
                    OrderCreated {
                        customer_id: format!("c{v}"),
                        total_amount: 1.0,
                    },
                )
                .with_aggregate_version(v + 1)
                .into_envelope()
            })
            .collect();
        store
            .append(aggregate, "Order", &events, ExpectedVersion::NoStream)
            .await
            .unwrap();
        let schema = guard.0.clone();
        let rows: Vec<(i64, Uuid)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT o.position, o.event_id FROM {schema}.events_outbox o ORDER BY o.id"
        )))
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert_eq!(rows.len(), 50);
        assert!(
            rows.windows(2).all(|w| w[0].0 < w[1].0),
            "outbox ids follow positions (serialize_appends {serialize})"
        );
        let stored: Vec<(i64, Uuid)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT position, event_id FROM {schema}.events ORDER BY position"
        )))
        .fetch_all(store.pool())
        .await
        .unwrap();
        assert_eq!(rows, stored, "each outbox row names its own event");
        let in_order: Vec<Uuid> = events.iter().map(|e| e.event_id()).collect();
        let by_position: Vec<Uuid> = stored.iter().map(|(_, id)| *id).collect();
        assert_eq!(by_position, in_order, "positions follow the versions");
    }
}

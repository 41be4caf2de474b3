//! PostgreSQL faults of the fault matrix, judged by the shared ledger: a backend terminated
//! mid-transaction (P-3), the connection lost right after the commit was sent (P-4),
//! PostgreSQL restarted under load (P-5, on a cluster of the test's own), and the relay
//! killed between publishing and marking the rows published (P-6).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use eventsource_core::{EventStore, ExpectedVersion, StoreError};
use eventsource_postgres::{OutboxRelay, PostgresEventStore, PostgresStoreConfig, RelayConfig};
use eventsource_testsupport::ledger::{Expect, Ledger, Outcome};
use eventsource_testsupport::postgres::OwnPostgres;
use eventsource_testsupport::proxy::FaultProxy;
use uuid::Uuid;

/// `n` events of one new order aggregate, versions 1..=n.
fn order_events(n: usize) -> (Uuid, Vec<EventEnvelope>) {
    let id = Uuid::new_v4();
    let events = (0..n)
        .map(|i| {
            if i == 0 {
                Event::new(
                    id,
                    OrderCreated {
                        customer_id: "c".into(),
                        total_amount: 1.0,
                    },
                )
                .with_aggregate_version(1)
                .into_envelope()
            } else {
                Event::new(
                    id,
                    OrderShipped {
                        tracking_number: format!("T{i}"),
                    },
                )
                .with_aggregate_version(i as u64 + 1)
                .into_envelope()
            }
        })
        .collect();
    (id, events)
}

async fn stored_count(store: &PostgresEventStore, id: Uuid) -> usize {
    store.read_stream(id, "Order", 0).await.unwrap().len()
}

async fn admin() -> sqlx::PgPool {
    sqlx::PgPool::connect(&database_url()).await.unwrap()
}

/// P-3: the backend running an append is terminated (`pg_terminate_backend`) while the
/// append waits inside its transaction. The append fails with the typed
/// `StoreError::ConnectionLost`, nothing of the batch is stored, and a retry stores all of it
/// — for both append paths.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p3_backend_terminated_mid_transaction_is_all_or_nothing() {
    for serialize in [false, true] {
        let (store, guard) = store_with("p3", false, serialize).await;
        let admin = admin().await;
        let (id, events) = order_events(50);
        // Another session holds the table: the append blocks inside its transaction.
        let mut blocker = admin.begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "LOCK TABLE {}.events IN EXCLUSIVE MODE",
            guard.0
        )))
        .execute(&mut *blocker)
        .await
        .unwrap();
        let appending = {
            let (store, events) = (store.clone(), events.clone());
            tokio::spawn(async move {
                store
                    .append(id, "Order", &events, ExpectedVersion::NoStream)
                    .await
            })
        };
        // Find the waiting backend and terminate it.
        let mut terminated = false;
        for _ in 0..200 {
            let pids: Vec<i32> = sqlx::query_scalar(
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                 AND pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%'",
            )
            .bind(&guard.0)
            .fetch_all(&admin)
            .await
            .unwrap();
            if let Some(pid) = pids.first() {
                let _: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
                    .bind(pid)
                    .fetch_one(&admin)
                    .await
                    .unwrap();
                terminated = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(terminated, "the append was seen waiting for the lock");
        let result = appending.await.unwrap();
        blocker.rollback().await.unwrap();
        match &result {
            Err(StoreError::ConnectionLost { operation, .. }) => assert_eq!(*operation, "append"),
            other => {
                panic!("serialize_appends={serialize}: expected ConnectionLost, got {other:?}")
            }
        }
        let err = result.unwrap_err();
        assert_eq!(err.kind(), eventsource_core::ErrorKind::Unavailable);
        assert!(err.is_transient());
        let message = err.to_string();
        assert!(
            message.contains("retry"),
            "the error says what to do: {message}"
        );
        assert_eq!(
            stored_count(&store, id).await,
            0,
            "nothing of the batch stored"
        );
        store
            .append(id, "Order", &events, ExpectedVersion::NoStream)
            .await
            .expect("the retry stores the batch");
        assert_eq!(stored_count(&store, id).await, 50, "all of it, once");
        drop(guard);
    }
}

/// P-4: the connection is lost right after the append's commit reached the server (a fault
/// proxy resets it before the reply arrives). The caller sees `ConnectionLost` — the outcome
/// is unknown — and retries the same events: the retry is refused as a duplicate (the first
/// attempt had committed), and every event is stored exactly once. The same when the request
/// never arrives (the retry then stores it). Judged by the ledger: lost 0, duplicated 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p4_connection_lost_after_commit_sent_retry_neither_duplicates_nor_loses() {
    let port = eventsource_testsupport::port_of(&database_url().replace("postgres://", "redis://"));
    let url = database_url();
    for serialize in [false, true] {
        let (direct, guard) = store_with("p4", false, serialize).await;
        let proxy = FaultProxy::start(port);
        let proxied_url = url.replacen(&format!(":{port}/"), &format!(":{}/", proxy.port), 1);
        let store = PostgresEventStore::connect(
            &proxied_url,
            PostgresStoreConfig {
                schema: guard.0.clone(),
                serialize_appends: serialize,
                max_connections: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let ledger = Ledger::new();
        let mut aggregates = Vec::new();
        // How each retry after an unknown outcome ended: refused as already stored (the
        // first attempt had committed) or stored now (it had not).
        let (mut already, mut stored_now) = (0, 0);
        for round in 0..6 {
            let (id, events) = order_events(5);
            aggregates.push(id);
            // Rounds 0 and 3: the reply to the committing request is lost (the one-statement
            // append, found by its first event id, or the transaction's COMMIT). Round 4:
            // the reply to the INSERT is lost — the client never sends COMMIT (the
            // one-statement path commits anyway). Others: no fault.
            let lost_reply = matches!(round, 0 | 3 | 4);
            if lost_reply {
                let id_bytes = events[0].event_id().as_bytes().to_vec();
                let pattern: Vec<u8> = match (serialize, round) {
                    (true, 4) | (false, _) => id_bytes,
                    (true, _) => b"COMMIT".to_vec(),
                };
                proxy.reset_after_request_containing(&pattern);
            }
            let first = store
                .append(id, "Order", &events, ExpectedVersion::NoStream)
                .await;
            let outcome = match &first {
                Ok(_) => Outcome::Ok,
                Err(StoreError::ConnectionLost { .. }) => Outcome::Indeterminate,
                Err(e) => panic!("unexpected error: {e}"),
            };
            if lost_reply {
                assert!(proxy.reset_after_fired(), "the reset fired");
                assert_eq!(outcome, Outcome::Indeterminate, "{first:?}");
            }
            for e in &events {
                ledger.published(e.event_id(), id, outcome);
            }
            if outcome == Outcome::Indeterminate {
                // The retry: the same events, the same expectation.
                let retry = store
                    .append(id, "Order", &events, ExpectedVersion::NoStream)
                    .await;
                match retry {
                    Ok(_) => stored_now += 1,
                    Err(StoreError::DuplicateEventId(_) | StoreError::Concurrency { .. }) => {
                        already += 1
                    }
                    Err(e) => panic!("the retry failed otherwise: {e}"),
                }
                for e in &events {
                    ledger.published(e.event_id(), id, Outcome::Ok);
                }
            }
        }
        assert_eq!(proxy.resets(), 3, "three connections were reset");
        eprintln!(
            "serialize_appends={serialize}: retries refused as already stored {already}, \
             stored by the retry {stored_now}"
        );
        // The one-statement append commits when its request arrives; the transaction path
        // commits only if COMMIT arrived (rounds 0 and 3), not when only the INSERT did.
        let expected = if serialize { (2, 1) } else { (3, 0) };
        assert_eq!((already, stored_now), expected);
        // "Handled" = stored: read every aggregate back.
        for id in &aggregates {
            for e in direct.read_stream(*id, "Order", 0).await.unwrap() {
                ledger.handled("store", "reader", e.event.event_id());
            }
        }
        ledger
            .check(&Expect::new(
                &format!("P-4 connection lost after commit (serialize_appends={serialize})"),
                &["store"],
            ))
            .assert_ok();
        drop(store);
        drop(proxy);
        drop(guard);
    }
}

/// P-5: PostgreSQL is restarted (an immediate shutdown, then a start with WAL recovery)
/// while four writers append and the outbox relay publishes to Redis. Appends during the
/// outage fail with `ConnectionLost` (or a timeout waiting for a connection); the pool and the
/// relay recover by themselves; every append that succeeded reaches the Redis stream (lost
/// 0), a few perhaps twice (the relay's batch in flight at the restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p5_postgres_restarted_under_load_pool_and_relay_recover() {
    let mut pg = OwnPostgres::start();
    let prefix = format!("es-test:p5:{}", &Uuid::new_v4().simple().to_string()[..12]);
    let _keys = eventsource_testsupport::Cleanup(prefix.clone());
    let store = PostgresEventStore::connect(
        &pg.url(),
        PostgresStoreConfig {
            schema: "p5".into(),
            outbox: true,
            max_connections: 6,
            acquire_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let bus = eventsource_redis::RedisEventBus::new(
        eventsource_redis::RedisEventBusConfig::default()
            .redis_url(redis_url())
            .stream_prefix(prefix.clone()),
        EventRegistry::new(),
    )
    .unwrap();
    let relay = OutboxRelay::new(
        store.clone(),
        Arc::new(bus.clone()),
        RelayConfig {
            poll_interval: Duration::from_millis(100),
            retry_base: Duration::from_millis(50),
            retry_max: Duration::from_millis(500),
            ..Default::default()
        },
    );
    let stop = Arc::new(tokio::sync::Notify::new());
    let relay_task = {
        let stop = stop.clone();
        tokio::spawn(async move { relay.run_until(stop.notified()).await })
    };
    let ledger = Arc::new(Ledger::new());
    let halt = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..4 {
        let (store, ledger, halt) = (store.clone(), ledger.clone(), halt.clone());
        writers.push(tokio::spawn(async move {
            let mut outcomes = (0u32, 0u32, 0u32);
            while !halt.load(Ordering::SeqCst) {
                let (id, events) = order_events(2);
                let outcome = match store
                    .append(id, "Order", &events, ExpectedVersion::NoStream)
                    .await
                {
                    Ok(_) => {
                        outcomes.0 += 1;
                        Outcome::Ok
                    }
                    Err(StoreError::ConnectionLost { .. }) => {
                        outcomes.1 += 1;
                        Outcome::Indeterminate
                    }
                    Err(StoreError::Timeout(_)) => {
                        // No connection within acquire_timeout: never sent.
                        outcomes.2 += 1;
                        Outcome::Failed
                    }
                    Err(e) => panic!("unexpected append error: {e}"),
                };
                for e in &events {
                    ledger.published(e.event_id(), id, outcome);
                }
                if outcome != Outcome::Ok {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            outcomes
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let ok_before = ledger.published_ok().len();
    pg.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    pg.start_again();
    ledger.healed();
    // Appends succeed again.
    let recovered = {
        let ledger = ledger.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if ledger.published_ok().len() > ok_before + 20 {
                break true;
            }
            if std::time::Instant::now() > deadline {
                break false;
            }
        }
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    halt.store(true, Ordering::SeqCst);
    let mut totals = (0, 0, 0);
    for w in writers {
        let (ok, lost, timeout) = w.await.unwrap();
        totals = (totals.0 + ok, totals.1 + lost, totals.2 + timeout);
    }
    assert!(recovered, "appends did not succeed again after the restart");
    // Everything that committed reaches Redis.
    let stream = bus.stream_name().to_owned();
    let published_ok = ledger.published_ok();
    let complete = {
        let mut ok = false;
        for _ in 0..300 {
            let ids: std::collections::HashSet<String> =
                stream_event_ids(&stream).await.into_iter().collect();
            if published_ok.is_subset(&ids) {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        ok
    };
    stop.notify_one();
    let _ = tokio::time::timeout(Duration::from_secs(10), relay_task).await;
    // Indeterminate appends (ConnectionLost) that committed are in the outbox too: they
    // reach the stream as "recovered" publishes.
    for id in stream_event_ids(&stream).await {
        ledger.handled("stream", "relay", id);
    }
    eprintln!(
        "appends ok {}, connection lost {}, no connection in time {}",
        totals.0, totals.1, totals.2
    );
    assert!(complete, "not every committed event reached Redis");
    assert!(
        totals.1 + totals.2 > 0,
        "the restart was felt by the writers"
    );
    ledger
        .check(
            &Expect::new("P-5 PostgreSQL restarted under load", &["stream"]).duplicates_at_most(
                100,
                "a relay round whose mark-published did not commit before the restart is \
                 published again: at most one batch",
            ),
        )
        .assert_ok();
}

/// P-6: the relay process is killed (SIGKILL) after publishing a batch and before marking it
/// published. The restarted relay publishes the batch again: duplicates (same event ids),
/// never a loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p6_relay_killed_between_publish_and_mark_duplicates_never_loses() {
    let (store, guard) = store("p6", true).await;
    let prefix = format!("es-test:p6:{}", &Uuid::new_v4().simple().to_string()[..12]);
    let _keys = eventsource_testsupport::Cleanup(prefix.clone());
    let stream = format!("{prefix}:stream");
    let ledger = Ledger::new();
    for _ in 0..20 {
        let (id, events) = order_events(2);
        store
            .append(id, "Order", &events, ExpectedVersion::NoStream)
            .await
            .unwrap();
        for e in &events {
            ledger.published(e.event_id(), id, Outcome::Ok);
        }
    }
    let mut first = relay_process(&guard.0, &prefix, Some("after_publish:30000"));
    let reached = reached_failpoint(&mut first, "after_publish").await;
    assert!(
        reached,
        "the relay reached the point between publish and mark"
    );
    first.start_kill().unwrap();
    first.wait().await.unwrap();
    let before = stream_event_ids(&stream).await;
    assert_eq!(before.len(), 40, "the batch was published before the kill");
    let mut second = relay_process(&guard.0, &prefix, None);
    let mut done = false;
    for _ in 0..200 {
        if eventsource_postgres::outbox_stats(&store)
            .await
            .unwrap()
            .pending
            == 0
        {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &second.id().unwrap().to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(10), second.wait()).await;
    for id in stream_event_ids(&stream).await {
        ledger.handled("stream", "relay", id);
    }
    assert!(done, "the restarted relay marked everything published");
    let report = ledger
        .check(
            &Expect::new("P-6 relay killed between publish and mark", &["stream"])
                .duplicates_at_most(40, "the batch published before the kill is published again"),
        )
        .assert_ok()
        .clone();
    assert_eq!(
        report.group("stream").extra_handlings,
        40,
        "the unmarked batch went out twice (same event ids)"
    );
}

//! The PostgreSQL store against the real PostgreSQL: the shared contract suite, concurrency,
//! a large store read back by paging, and bad input.

mod common;

use std::sync::Arc;

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::store::{ReadAllOptions, StoreError};
use eventsource_core::testkit::orders::{OrderAggregate, OrderCreated};
use eventsource_core::testkit::store_contract;
use eventsource_core::{RepositoryError, domain_event};
use eventsource_postgres::{PostgresEventStore, PostgresStoreConfig, SetupError};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The store passes the same contract suite as the in-memory store (each check in a fresh
/// schema).
#[tokio::test]
async fn passes_the_store_contract() {
    for outbox in [false, true] {
        let guards = Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = guards.clone();
        store_contract::run_all(move || {
            let g = g.clone();
            async move {
                let (s, guard) = store("contract", outbox).await;
                g.lock().unwrap().push(guard);
                s
            }
        })
        .await;
    }
}

/// The serialised append path (one transaction under the store's lock) keeps the same
/// contract as the default single-statement path.
#[tokio::test]
async fn serialized_appends_pass_the_store_contract() {
    for outbox in [false, true] {
        let guards = Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = guards.clone();
        store_contract::run_all(move || {
            let g = g.clone();
            async move {
                let (s, guard) = store_with("contract_serial", outbox, true).await;
                g.lock().unwrap().push(guard);
                s
            }
        })
        .await;
    }
}

/// Two tasks saving the same aggregate concurrently: exactly one succeeds, the other gets the
/// concurrency error; twenty writers on different aggregates all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_saves() {
    let (store, _guard) = store("concurrency", false).await;
    let repo = AggregateRepository::<OrderAggregate>::new(Arc::new(store.clone()));
    let id = Uuid::new_v4();
    let mut order = repo.create_new(id);
    order.create("c", 1.0).unwrap();
    repo.save(&mut order).await.unwrap();
    let mut a = repo.load(id).await.unwrap();
    let mut b = repo.load(id).await.unwrap();
    a.ship("A").unwrap();
    b.ship("B").unwrap();
    let (ra, rb) = tokio::join!(repo.save(&mut a), repo.save(&mut b));
    let results = [ra, rb];
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    let loser = results.iter().find_map(|r| r.as_ref().err()).unwrap();
    assert!(loser.is_concurrency_conflict(), "{loser}");
    assert!(
        matches!(
            loser,
            RepositoryError::Store(StoreError::Concurrency {
                expected: ExpectedVersion::Exact(1),
                actual: 2,
                ..
            })
        ),
        "{loser}"
    );

    let mut tasks = Vec::new();
    for i in 0..20 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            let mut o = repo.create_new(Uuid::new_v4());
            o.create(&format!("cust-{i}"), i as f64).unwrap();
            repo.save(&mut o).await?;
            o.ship("T").unwrap();
            repo.save(&mut o).await
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("writers on different aggregates all succeed");
    }
    // A losing insert used a position (sequences do not roll back): count, not max.
    let all = store
        .read_all(&eventsource_core::store::ReadAllOptions::from_start(1000))
        .await
        .unwrap();
    assert_eq!(all.len(), 2 + 40);
    assert!(store.current_position().await.unwrap() >= 2 + 40);
}

/// 100,000 events appended in batches, then read back in global order page by page: every
/// event once, in order, one page in memory at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_thousand_events_paged_in_order() {
    let (store, _guard) = store("large", false).await;
    let aggregates = 100;
    let per = 1000;
    for a in 0..aggregates {
        let id = Uuid::new_v4();
        let events: Vec<EventEnvelope> = (1..=per)
            .map(|v| {
                Event::new(
                    id,
                    OrderCreated {
                        customer_id: format!("c{a}"),
                        total_amount: v as f64,
                    },
                )
                .with_aggregate_version(v as u64)
                .into_envelope()
            })
            .collect();
        store
            .append(id, "Order", &events, ExpectedVersion::NoStream)
            .await
            .unwrap();
    }
    let mut last = 0;
    let mut largest_page = 0;
    let total = store
        .for_each_page(ReadAllOptions::from_start(2000), |page| {
            largest_page = largest_page.max(page.len());
            for e in &page {
                assert!(e.position > last, "global order");
                last = e.position;
            }
            async { Ok(()) }
        })
        .await
        .unwrap();
    assert_eq!(total, (aggregates * per) as u64);
    assert_eq!(largest_page, 2000, "one page at a time");
    assert_eq!(store.current_position().await.unwrap(), last);
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct NotAnObject(u32);
domain_event!(NotAnObject, "NotAnObject", aggregate = "Order");

/// Bad input: an invalid table or schema name, an unreachable database, a payload that is not
/// an object — each a clear error naming what is wrong, nothing written.
#[tokio::test]
async fn bad_input_is_a_clear_error() {
    for (config, field) in [
        (
            PostgresStoreConfig {
                table: "events; drop table x".into(),
                ..Default::default()
            },
            "table",
        ),
        (
            PostgresStoreConfig {
                schema: "Public".into(),
                ..Default::default()
            },
            "schema",
        ),
        (
            PostgresStoreConfig {
                table: "".into(),
                ..Default::default()
            },
            "table",
        ),
    ] {
        match PostgresEventStore::connect(&database_url(), config).await {
            Err(SetupError::Config { field: f, reason }) => {
                assert_eq!(f, field, "{reason}");
            }
            other => panic!("expected a config error for {field}, got {other:?}"),
        }
    }
    let started = std::time::Instant::now();
    let err = PostgresEventStore::connect(
        "postgres://app:secret-pw@127.0.0.1:1/test",
        PostgresStoreConfig {
            acquire_timeout: std::time::Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(err, SetupError::Connect { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("127.0.0.1:1") && !text.contains("secret-pw"),
        "{text}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(10));

    let (store, _guard) = store("badinput", false).await;
    let id = Uuid::new_v4();
    let event = Event::new(id, NotAnObject(7)).into_envelope();
    let err = store
        .append(id, "Order", &[event], ExpectedVersion::NoStream)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Event(_)), "{err:?}");
    assert!(
        err.to_string().contains("NotAnObject") && err.to_string().contains("JSON object"),
        "{err}"
    );
    assert_eq!(
        store.current_position().await.unwrap(),
        0,
        "nothing written"
    );
}

/// Running the migrations again (a second store on the same schema) is harmless.
#[tokio::test]
async fn migrations_are_idempotent() {
    let (store, guard) = store("migrate", true).await;
    let id = Uuid::new_v4();
    store
        .append(
            id,
            "Order",
            &[Event::new(
                id,
                OrderCreated {
                    customer_id: "c".into(),
                    total_amount: 1.0,
                },
            )
            .into_envelope()],
            ExpectedVersion::NoStream,
        )
        .await
        .unwrap();
    let again = PostgresEventStore::connect(
        &database_url(),
        PostgresStoreConfig {
            schema: guard.0.clone(),
            outbox: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(again.current_position().await.unwrap(), 1);
}

/// A transaction stuck on the append's way — holding the serialised-append lock, or an
/// uncommitted event of the same aggregate version — makes an append fail with a typed
/// timeout after `lock_timeout` instead of hanging; it writes nothing and works once the
/// blocker is gone.
#[tokio::test]
async fn stuck_lock_gives_a_typed_timeout() {
    let (_, guard) = store("locktimeout", false).await;
    for serialize_appends in [true, false] {
        stuck_append(&guard.0, serialize_appends).await;
    }
}

async fn stuck_append(schema: &str, serialize_appends: bool) {
    let store = PostgresEventStore::connect(
        &database_url(),
        PostgresStoreConfig {
            schema: schema.to_owned(),
            lock_timeout: std::time::Duration::from_millis(300),
            serialize_appends,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let id = Uuid::new_v4();
    let mut blocker = store.pool().begin().await.unwrap();
    if serialize_appends {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(store.append_lock_key())
            .execute(&mut *blocker)
            .await
            .unwrap();
    } else {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (event_id, aggregate_id, aggregate_type, version, event_type, \
             occurred_at, payload) VALUES ($1, $2, 'Order', 1, 'OrderCreated', now(), '{{}}')",
            store.events_table()
        )))
        .bind(Uuid::new_v4())
        .bind(id)
        .execute(&mut *blocker)
        .await
        .unwrap();
    }
    let event = Event::new(
        id,
        OrderCreated {
            customer_id: "c".into(),
            total_amount: 1.0,
        },
    )
    .into_envelope();
    let started = std::time::Instant::now();
    let err = store
        .append(
            id,
            "Order",
            std::slice::from_ref(&event),
            ExpectedVersion::NoStream,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Timeout(_)), "{err:?}");
    assert_eq!(err.kind(), eventsource_core::ErrorKind::Timeout);
    assert!(err.is_transient());
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    blocker.rollback().await.unwrap();
    assert_eq!(
        store.stream_version(id, "Order").await.unwrap(),
        0,
        "nothing written"
    );
    store
        .append(id, "Order", &[event], ExpectedVersion::NoStream)
        .await
        .expect("works once the lock is gone");
}

/// Snapshots in PostgreSQL: a load through the latest snapshot equals a full replay, an older
/// snapshot never replaces a newer one, and a snapshot of another shape is ignored.
#[tokio::test]
async fn snapshots_in_postgres() {
    use eventsource_core::snapshot::{SnapshotRepository, SnapshotStore, SnapshotStrategy};
    use eventsource_core::testkit::orders::OrderAggregate;
    use eventsource_postgres::PostgresSnapshotStore;
    let (store, _guard) = store("snapshots", false).await;
    let snapshots = Arc::new(PostgresSnapshotStore::new(store.clone()));
    let plain = AggregateRepository::<OrderAggregate>::new(Arc::new(store.clone()));
    let repo = SnapshotRepository::new(
        plain.clone(),
        snapshots.clone(),
        SnapshotStrategy::EveryEvents(1),
    );
    let id = Uuid::new_v4();
    let mut order = repo.inner().create_new(id);
    order.create("c", 12.5).unwrap();
    repo.save(&mut order).await.unwrap();
    let mut order = repo.load(id).await.unwrap();
    order.ship("TRACK").unwrap();
    repo.save(&mut order).await.unwrap();
    assert_eq!(repo.stats().taken(), 2);
    let stored = snapshots.load(id, "Order").await.unwrap().unwrap();
    assert_eq!(stored.version, 2);
    let through = repo.load(id).await.unwrap();
    let replayed = plain.load(id).await.unwrap();
    assert_eq!(
        (through.version(), &through.tracking_number, through.status),
        (
            replayed.version(),
            &replayed.tracking_number,
            replayed.status
        )
    );
    assert_eq!(repo.stats().loaded(), 2);
    // An older snapshot does not replace the newer one.
    let mut older = stored.clone();
    older.version = 1;
    older.state = serde_json::json!({"stale": true});
    snapshots.save(older).await.unwrap();
    assert_eq!(
        snapshots.load(id, "Order").await.unwrap().unwrap().version,
        2
    );
    // Another shape is ignored.
    let mut other = stored;
    other.schema_version = 99;
    snapshots.save(other).await.unwrap();
    let loaded = repo.load(id).await.unwrap();
    assert_eq!(loaded.tracking_number.as_deref(), Some("TRACK"));
    assert_eq!(repo.stats().ignored(), 1);
}

/// Setup errors carry the kind a retry loop needs: a database that does not exist is not
/// transient (retrying a typo cannot help), nothing listening is.
#[tokio::test]
async fn setup_errors_say_whether_retrying_can_help() {
    let url = database_url();
    let (base, _) = url
        .rsplit_once('/')
        .expect("a database URL names its database");
    let missing = format!("{base}/no_such_database_{}", std::process::id());
    let err = PostgresEventStore::connect(&missing, PostgresStoreConfig::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SetupError::Connect { .. }), "{err:?}");
    assert!(!err.is_transient(), "{err}: {:?}", err.kind());
    let nothing = PostgresEventStore::connect(
        "postgres://postgres@127.0.0.1:1/test",
        PostgresStoreConfig::default(),
    )
    .await
    .unwrap_err();
    // sqlx keeps trying until its acquire timeout: Unavailable or Timeout, both transient.
    assert!(nothing.is_transient(), "{nothing}: {:?}", nothing.kind());
}

/// PostgreSQL snapshots keep the snapshot rules: during a rolling deploy the old version's
/// pods (an older shape) never overwrite the new version's snapshots.
#[tokio::test]
async fn postgres_snapshots_pass_the_snapshot_contract() {
    let (store, _guard) = store("snapshot_contract", false).await;
    let snapshots = eventsource_postgres::PostgresSnapshotStore::new(store.clone());
    eventsource_core::testkit::snapshot_contract::run_all(&snapshots).await;
}

/// Migrations carry checksums: a database from before checksums gets them, one migrated by
/// a newer version of the library or whose applied migration differs is refused with a
/// sentence that says so, and nothing is changed.
#[tokio::test]
async fn migrations_are_checked_against_what_was_applied() {
    let (store, guard) = store("migration_checks", false).await;
    let schema = guard.0.clone();
    let url = database_url();
    let connect = || {
        PostgresEventStore::connect(
            &url,
            PostgresStoreConfig {
                schema: schema.clone(),
                max_connections: 2,
                ..Default::default()
            },
        )
    };
    let exec = |sql: String| {
        let pool = store.pool().clone();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    // Recorded in order, each with a checksum.
    let rows: Vec<(i32, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT version, checksum FROM {schema}.events_migrations ORDER BY version"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap();
    assert!(
        rows.len() >= 6 && rows.iter().all(|(_, c)| c.is_some()),
        "{rows:?}"
    );
    // From before checksums: filled in at the next start.
    exec(format!(
        "UPDATE {schema}.events_migrations SET checksum = NULL"
    ))
    .await;
    connect()
        .await
        .expect("a database from before checksums opens");
    let missing: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*) FROM {schema}.events_migrations WHERE checksum IS NULL"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap();
    assert_eq!(missing, 0);
    // An applied migration that differs.
    exec(format!(
        "UPDATE {schema}.events_migrations SET checksum = '0000000000000000' WHERE version = 2"
    ))
    .await;
    let e = connect().await.unwrap_err();
    assert!(matches!(e, SetupError::Schema(_)), "{e:?}");
    assert!(
        e.to_string().contains("migration 2") && e.to_string().contains("differs"),
        "{e}"
    );
    exec(format!(
        "UPDATE {schema}.events_migrations SET checksum = NULL WHERE version = 2"
    ))
    .await;
    // A newer version of the library migrated it.
    exec(format!(
        "INSERT INTO {schema}.events_migrations (version, checksum) VALUES (99, 'x')"
    ))
    .await;
    let e = connect().await.unwrap_err();
    assert!(
        e.to_string().contains("newer version") && e.to_string().contains("99"),
        "{e}"
    );
    assert_eq!(e.kind(), eventsource_core::ErrorKind::InvalidState);
}

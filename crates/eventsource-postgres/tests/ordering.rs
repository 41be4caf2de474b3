//! The global order with parallel appends: writers that sleep randomly between their insert
//! and their commit (so transactions commit out of position order) while readers follow the
//! feed; no reader skips an event, none sees one twice, and each aggregate's versions arrive
//! in order.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use eventsource_core::prelude::*;
use eventsource_core::store::ReadAllOptions;
use eventsource_core::testkit::orders::{OrderCreated, OrderShipped};
use eventsource_postgres::{FeedFilter, StoreCursor, failpoints};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_commits_are_never_skipped() {
    let (store, _guard) = store("order_race", false).await;
    failpoints::APPEND_COMMIT_DELAY_MS.store(40, Ordering::SeqCst);
    let writers = 16;
    let per_writer = 25;
    let done = Arc::new(AtomicBool::new(false));
    // A reader following the feed with a cursor, and one paging `read_all` by position.
    let follower = tokio::spawn({
        let store = store.clone();
        let done = done.clone();
        async move {
            let mut cursor = StoreCursor::START;
            let mut seen: Vec<(Uuid, Uuid, u64)> = Vec::new();
            loop {
                let finished = done.load(Ordering::SeqCst);
                let page = store
                    .read_feed(cursor, &FeedFilter::default(), 7)
                    .await
                    .unwrap();
                for (c, e) in &page {
                    assert!(*c > cursor, "the cursor only moves forward");
                    cursor = *c;
                    seen.push((
                        e.event.event_id(),
                        e.event.aggregate_id(),
                        e.event.aggregate_version(),
                    ));
                }
                if page.is_empty() {
                    if finished {
                        return seen;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
        }
    });
    let pager = tokio::spawn({
        let store = store.clone();
        let done = done.clone();
        async move {
            let mut after = 0;
            let mut seen = Vec::new();
            loop {
                let finished = done.load(Ordering::SeqCst);
                let page = store
                    .read_all(&ReadAllOptions {
                        after_position: after,
                        limit: 5,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                if let Some(last) = page.last() {
                    after = last.position;
                }
                seen.extend(page.iter().map(|e| e.event.event_id()));
                if page.is_empty() {
                    if finished {
                        return seen;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
        }
    });
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            // Each writer owns a few aggregates and appends their versions in turn.
            let aggregates: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
            for i in 0..per_writer {
                let aggregate = aggregates[i % aggregates.len()];
                let version = (i / aggregates.len()) as u64 + 1;
                let event = if version == 1 {
                    Event::new(
                        aggregate,
                        OrderCreated {
                            customer_id: format!("w{w}-{i}"),
                            total_amount: 1.0,
                        },
                    )
                    .into_envelope()
                } else {
                    Event::new(
                        aggregate,
                        OrderShipped {
                            tracking_number: format!("w{w}-{i}"),
                        },
                    )
                    .with_aggregate_version(version)
                    .into_envelope()
                };
                ids.push(event.event_id());
                store
                    .append(
                        aggregate,
                        "Order",
                        &[event],
                        ExpectedVersion::Exact(version - 1),
                    )
                    .await
                    .unwrap();
            }
            ids
        }));
    }
    let mut written = HashSet::new();
    for t in tasks {
        written.extend(t.await.unwrap());
    }
    failpoints::APPEND_COMMIT_DELAY_MS.store(0, Ordering::SeqCst);
    done.store(true, Ordering::SeqCst);
    let followed = follower.await.unwrap();
    let paged = pager.await.unwrap();
    assert_eq!(written.len(), writers * per_writer);

    let ids: Vec<Uuid> = followed.iter().map(|(id, _, _)| *id).collect();
    let unique: HashSet<Uuid> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "the follower saw no event twice");
    assert_eq!(unique, written, "the follower skipped none");
    let mut last_version: HashMap<Uuid, u64> = HashMap::new();
    for (_, aggregate, version) in &followed {
        let previous = last_version.insert(*aggregate, *version).unwrap_or(0);
        assert_eq!(*version, previous + 1, "each aggregate's versions in order");
    }

    let unique: HashSet<Uuid> = paged.iter().copied().collect();
    assert_eq!(
        unique.len(),
        paged.len(),
        "read_all paging saw no event twice"
    );
    assert_eq!(unique, written, "read_all paging skipped none");
}

/// Parallel appends really are parallel: a transaction stuck between insert and commit does
/// not block another aggregate's append (with the old global lock it did).
#[tokio::test]
async fn a_slow_append_does_not_block_another_aggregate() {
    let (store, _guard) = store("order_parallel", false).await;
    let stuck = Uuid::new_v4();
    let mut blocker = store.pool().begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO {} (event_id, aggregate_id, aggregate_type, version, event_type, \
         occurred_at, payload) VALUES ($1, $2, 'Order', 1, 'OrderCreated', now(), '{{}}')",
        store.events_table()
    )))
    .bind(Uuid::new_v4())
    .bind(stuck)
    .execute(&mut *blocker)
    .await
    .unwrap();
    let other = Uuid::new_v4();
    let event = Event::new(
        other,
        OrderCreated {
            customer_id: "free".into(),
            total_amount: 1.0,
        },
    )
    .into_envelope();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        store.append(other, "Order", &[event], ExpectedVersion::NoStream),
    )
    .await
    .expect("not blocked by the open transaction")
    .unwrap();
    // The frontier: the committed event waits behind the open (older) transaction.
    let visible = store
        .read_feed(StoreCursor::START, &FeedFilter::default(), 10)
        .await
        .unwrap();
    assert!(visible.is_empty(), "held back behind the open transaction");
    blocker.rollback().await.unwrap();
    // Other tests' transactions may hold the frontier for a moment too.
    let mut visible = Vec::new();
    for _ in 0..250 {
        visible = store
            .read_feed(StoreCursor::START, &FeedFilter::default(), 10)
            .await
            .unwrap();
        if !visible.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(visible.len(), 1);
    assert_eq!(visible[0].1.event.aggregate_id(), other);
}

/// The feed orders by the transaction id as a number: transaction 9 comes before
/// transaction 10 (ordered as text, "10" sorted first and a reader paging past it skipped
/// every event of transaction 9), and the head is the event of the larger id.
#[tokio::test]
async fn transaction_ids_are_ordered_as_numbers() {
    let (store, _guard) = store("order_numeric", false).await;
    let mut ids = Vec::new();
    for i in 0..2 {
        let aggregate = Uuid::new_v4();
        let event = Event::new(
            aggregate,
            OrderCreated {
                customer_id: format!("c{i}"),
                total_amount: 1.0,
            },
        )
        .into_envelope();
        ids.push(event.event_id());
        store
            .append(aggregate, "Order", &[event], ExpectedVersion::NoStream)
            .await
            .unwrap();
    }
    // Ids of transactions long finished (far behind the frontier), one digit apart.
    for (id, tx) in ids.iter().zip(["9", "10"]) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET tx = $1::text::xid8 WHERE event_id = $2",
            store.events_table()
        )))
        .bind(tx)
        .bind(id)
        .execute(store.pool())
        .await
        .unwrap();
    }
    let mut cursor = StoreCursor::START;
    let mut seen = Vec::new();
    loop {
        let page = store
            .read_feed(cursor, &FeedFilter::default(), 1)
            .await
            .unwrap();
        let Some((c, e)) = page.into_iter().next() else {
            break;
        };
        cursor = c;
        seen.push(e.event.event_id());
    }
    assert_eq!(seen, ids, "transaction 9, then transaction 10");
    let head = store.head().await.unwrap();
    assert_eq!(head.tx, 10, "the head is in the larger transaction");
    let all = store.read_all(&ReadAllOptions::default()).await.unwrap();
    let all: Vec<Uuid> = all.iter().map(|e| e.event.event_id()).collect();
    assert_eq!(all, ids);
}

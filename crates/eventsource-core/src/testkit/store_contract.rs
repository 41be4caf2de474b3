//! The event store contract as executable checks. Each function takes a fresh, empty store and
//! panics with a message when the store breaks the contract. A store's test suite calls
//! [`run_all`] (or the functions one by one, as separate tests).

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use serde_json::json;
use uuid::Uuid;

use super::orders::{OrderCreated, OrderShipped};
use crate::event::{Event, EventEnvelope};
use crate::store::{EventStore, ExpectedVersion, ReadAllOptions, StoreError};

fn created(id: Uuid, version: u64, i: usize) -> EventEnvelope {
    Event::new(
        id,
        OrderCreated {
            customer_id: format!("cust-{i}"),
            total_amount: i as f64 * 1.5,
        },
    )
    .with_aggregate_version(version)
    .into_envelope()
}

fn shipped(id: Uuid, version: u64) -> EventEnvelope {
    Event::new(
        id,
        OrderShipped {
            tracking_number: format!("TRACK-{version}"),
        },
    )
    .with_aggregate_version(version)
    .into_envelope()
}

/// Polls all futures on the current task until every one is done (no runtime needed).
async fn join_all<T>(mut futures: Vec<Pin<Box<dyn Future<Output = T> + Send + '_>>>) -> Vec<T> {
    let mut results: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, slot) in futures.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    Poll::Ready(v) => *slot = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    results.into_iter().map(|r| r.expect("all done")).collect()
}

/// Runs every check, each on a fresh store from `new_store`.
pub async fn run_all<S, F, Fut>(mut new_store: F)
where
    S: EventStore,
    F: FnMut() -> Fut,
    Fut: Future<Output = S>,
{
    append_then_read_stream(&new_store().await).await;
    expected_version_is_enforced(&new_store().await).await;
    duplicate_event_id_is_rejected(&new_store().await).await;
    foreign_or_gapped_batches_are_rejected(&new_store().await).await;
    read_all_pages_in_global_order_with_filters(&new_store().await).await;
    concurrent_appends_have_one_winner(&new_store().await).await;
    metadata_and_data_round_trip(&new_store().await).await;
}

/// Given two events appended to a new stream, reading the stream returns them in order, the
/// version is 2, and reading after version 1 returns only the second.
pub async fn append_then_read_stream(store: &dyn EventStore) {
    let id = Uuid::new_v4();
    let events = vec![created(id, 1, 1), shipped(id, 2)];
    let result = store
        .append(id, "Order", &events, ExpectedVersion::NoStream)
        .await
        .expect("append to a new stream");
    assert_eq!(result.new_version, 2);
    let read = store
        .read_stream(id, "Order", 0)
        .await
        .expect("read stream");
    let ids: Vec<Uuid> = read.iter().map(|s| s.event.event_id()).collect();
    assert_eq!(ids, vec![events[0].event_id(), events[1].event_id()]);
    assert!(read[0].position < read[1].position, "positions increase");
    assert_eq!(store.stream_version(id, "Order").await.unwrap(), 2);
    let tail = store.read_stream(id, "Order", 1).await.unwrap();
    assert_eq!(tail.len(), 1);
    assert_eq!(tail[0].event.aggregate_version(), 2);
    assert_eq!(
        store.stream_version(Uuid::new_v4(), "Order").await.unwrap(),
        0
    );
    // An empty batch changes nothing.
    let empty = store
        .append(id, "Order", &[], ExpectedVersion::Exact(2))
        .await
        .expect("empty append");
    assert_eq!(empty.new_version, 2);
    assert!(
        store
            .read_stream(Uuid::new_v4(), "Order", 0)
            .await
            .unwrap()
            .is_empty()
    );
}

/// A stale or wrong expected version is a concurrency error naming expected and actual.
pub async fn expected_version_is_enforced(store: &dyn EventStore) {
    let id = Uuid::new_v4();
    store
        .append(id, "Order", &[created(id, 1, 1)], ExpectedVersion::NoStream)
        .await
        .unwrap();
    for expected in [ExpectedVersion::NoStream, ExpectedVersion::Exact(5)] {
        match store.append(id, "Order", &[shipped(id, 2)], expected).await {
            Err(StoreError::Concurrency {
                expected: e,
                actual,
                aggregate_id,
                ..
            }) => {
                assert_eq!(e, expected);
                assert_eq!(actual, 1);
                assert_eq!(aggregate_id, id);
            }
            other => panic!("expected a concurrency error for {expected:?}, got {other:?}"),
        }
    }
    let err = store
        .append(id, "Order", &[shipped(id, 2)], ExpectedVersion::Exact(0))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("version 1"),
        "message names actual: {err}"
    );
    store
        .append(id, "Order", &[shipped(id, 2)], ExpectedVersion::Exact(1))
        .await
        .expect("exact version matches");
    store
        .append(id, "Order", &[shipped(id, 3)], ExpectedVersion::Any)
        .await
        .expect("any with the next version");
    let stale = store
        .append(id, "Order", &[shipped(id, 3)], ExpectedVersion::Any)
        .await;
    assert!(
        matches!(stale, Err(StoreError::Concurrency { actual: 3, .. })),
        "a taken version is a conflict even with Any: {stale:?}"
    );
    let stale = stale.unwrap_err();
    assert_eq!(stale.kind(), crate::ErrorKind::Conflict);
    assert!(
        !stale.is_transient(),
        "reload and retry the command, not the call"
    );
    store
        .append(
            id,
            "Order",
            &[shipped(id, 4)],
            ExpectedVersion::StreamExists,
        )
        .await
        .expect("the stream exists");
    assert_eq!(store.stream_version(id, "Order").await.unwrap(), 4);
    let missing = Uuid::new_v4();
    let none = store
        .append(
            missing,
            "Order",
            &[created(missing, 1, 9)],
            ExpectedVersion::StreamExists,
        )
        .await;
    assert!(
        matches!(
            none,
            Err(StoreError::Concurrency {
                actual: 0,
                expected: ExpectedVersion::StreamExists,
                ..
            })
        ),
        "StreamExists on a missing stream is a conflict: {none:?}"
    );
}

/// An event id can be stored once, across streams.
pub async fn duplicate_event_id_is_rejected(store: &dyn EventStore) {
    let a = Uuid::new_v4();
    let event = created(a, 1, 1);
    store
        .append(
            a,
            "Order",
            std::slice::from_ref(&event),
            ExpectedVersion::NoStream,
        )
        .await
        .unwrap();
    let b = Uuid::new_v4();
    let mut copy = created(b, 1, 2);
    copy.metadata_mut().event_id = event.event_id();
    match store
        .append(b, "Order", &[copy], ExpectedVersion::NoStream)
        .await
    {
        Err(e @ StoreError::DuplicateEventId(_)) => {
            assert!(matches!(e, StoreError::DuplicateEventId(id) if id == event.event_id()));
            assert_eq!(e.kind(), crate::ErrorKind::AlreadyExists);
        }
        other => panic!("expected DuplicateEventId, got {other:?}"),
    }
    assert_eq!(
        store.stream_version(b, "Order").await.unwrap(),
        0,
        "nothing written"
    );
}

/// Events of another aggregate, or with a gap in versions, are refused and nothing is written.
pub async fn foreign_or_gapped_batches_are_rejected(store: &dyn EventStore) {
    let id = Uuid::new_v4();
    let foreign = vec![created(id, 1, 1), shipped(Uuid::new_v4(), 2)];
    let err = store
        .append(id, "Order", &foreign, ExpectedVersion::NoStream)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidEvent { .. }), "{err:?}");
    let gapped = vec![created(id, 1, 1), shipped(id, 3)];
    let err = store
        .append(id, "Order", &gapped, ExpectedVersion::NoStream)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::InvalidEvent { .. }), "{err:?}");
    assert_eq!(store.stream_version(id, "Order").await.unwrap(), 0);
}

/// Reading everything in pages returns each event once, in global order; filters apply.
pub async fn read_all_pages_in_global_order_with_filters(store: &dyn EventStore) {
    let tenant = Uuid::new_v4();
    let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let mut written = Vec::new();
    for round in 1..=3u64 {
        for (i, id) in ids.iter().enumerate() {
            let mut event = created(*id, round, i);
            if i == 0 {
                event.metadata_mut().tenant_id = Some(tenant);
            }
            store
                .append(
                    *id,
                    "Order",
                    std::slice::from_ref(&event),
                    ExpectedVersion::Any,
                )
                .await
                .unwrap();
            written.push(event.event_id());
        }
    }
    let other = Uuid::new_v4();
    let mut invoice = created(other, 1, 9);
    invoice.metadata_mut().aggregate_type = "Invoice".into();
    store
        .append(other, "Invoice", &[invoice], ExpectedVersion::NoStream)
        .await
        .unwrap();
    // The global feed may hold appended events back while an older writing transaction of
    // another writer is still open (never skipping them, never reordering them): wait until
    // all ten are readable, within a generous deadline. From then on they stay readable.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while store
        .read_all(&ReadAllOptions::from_start(100))
        .await
        .unwrap()
        .len()
        < 10
    {
        assert!(
            std::time::Instant::now() < deadline,
            "appended events never became readable in the global feed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    let mut options = ReadAllOptions {
        limit: 2,
        aggregate_type: Some("Order".into()),
        ..ReadAllOptions::default()
    };
    let mut seen = Vec::new();
    let mut last = 0;
    loop {
        let page = store.read_all(&options).await.unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 2, "page size respected");
        for stored in &page {
            assert!(stored.position > last, "global order");
            last = stored.position;
            seen.push(stored.event.event_id());
        }
        options.after_position = last;
    }
    assert_eq!(seen, written, "every Order event once, in append order");

    let tenant_only = store
        .read_all(&ReadAllOptions {
            tenant_id: Some(tenant),
            ..ReadAllOptions::from_start(100)
        })
        .await
        .unwrap();
    assert_eq!(tenant_only.len(), 3);
    assert!(tenant_only.iter().all(|s| s.event.aggregate_id() == ids[0]));
    let everything = store
        .read_all(&ReadAllOptions::from_start(100))
        .await
        .unwrap();
    assert_eq!(everything.len(), 10);
    assert_eq!(
        store.current_position().await.unwrap(),
        everything.last().unwrap().position
    );
}

/// Two writers appending version 1 of the same stream at once: exactly one wins.
pub async fn concurrent_appends_have_one_winner(store: &dyn EventStore) {
    let id = Uuid::new_v4();
    let a = [created(id, 1, 1)];
    let b = [created(id, 1, 2)];
    let results = join_all(vec![
        store.append(id, "Order", &a, ExpectedVersion::NoStream),
        store.append(id, "Order", &b, ExpectedVersion::NoStream),
    ])
    .await;
    let wins = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(wins, 1, "exactly one winner: {results:?}");
    assert!(
        results
            .iter()
            .any(|r| matches!(r, Err(StoreError::Concurrency { .. })))
    );
    assert_eq!(store.stream_version(id, "Order").await.unwrap(), 1);
}

/// Every base field and the data survive a store round trip.
pub async fn metadata_and_data_round_trip(store: &dyn EventStore) {
    let id = Uuid::new_v4();
    let cause = Event::new(
        id,
        OrderShipped {
            tracking_number: "x".into(),
        },
    );
    let event = Event::new(
        id,
        OrderCreated {
            customer_id: "cust-7".into(),
            total_amount: 10.5,
        },
    )
    .with_tenant(Uuid::new_v4())
    .with_actor("user-1")
    .caused_by(&cause.metadata)
    .with_metadata("source", json!("test"));
    store
        .append(
            id,
            "Order",
            &[event.clone().into_envelope()],
            ExpectedVersion::NoStream,
        )
        .await
        .unwrap();
    let read = store.read_stream(id, "Order", 0).await.unwrap();
    let back = read[0]
        .event
        .to_event::<OrderCreated>()
        .expect("decodes")
        .expect("is OrderCreated");
    assert_eq!(back, event);
}

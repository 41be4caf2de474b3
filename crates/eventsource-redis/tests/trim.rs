//! Trimming: only what every consumer group has acknowledged goes; a naive MAXLEN trim (the
//! negative control) drops entries a lagging group still needs.

mod common;

use common::*;
use eventsource_core::prelude::*;
use redis::aio::MultiplexedConnection;

/// Group `fast` read and acked everything; group `slow` acked 4, holds 2 pending, has not read
/// 4. Returns the 10 ids.
async fn lagging_groups(
    conn: &mut MultiplexedConnection,
    bus: &eventsource_redis::RedisEventBus,
) -> Vec<String> {
    let stream = bus.stream_name().to_owned();
    let ids = bus
        .publish_events(&(0..10).map(created).collect::<Vec<EventEnvelope>>())
        .await
        .unwrap();
    for group in ["fast", "slow"] {
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(group)
            .arg("0")
            .query_async(conn)
            .await
            .unwrap();
    }
    let read = |group: &'static str, count: usize| {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(group)
            .arg("c")
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">");
        cmd
    };
    let _: redis::Value = read("fast", 100).query_async(conn).await.unwrap();
    let _: i64 = redis::cmd("XACK")
        .arg(&stream)
        .arg("fast")
        .arg(&ids)
        .query_async(conn)
        .await
        .unwrap();
    let _: redis::Value = read("slow", 6).query_async(conn).await.unwrap();
    let _: i64 = redis::cmd("XACK")
        .arg(&stream)
        .arg("slow")
        .arg(&ids[..4])
        .query_async(conn)
        .await
        .unwrap();
    ids
}

async fn remaining(conn: &mut MultiplexedConnection, stream: &str) -> Vec<String> {
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .unwrap();
    entries.into_iter().map(|(id, _)| id).collect()
}

/// The safe trim removes exactly the entries both groups acknowledged; everything the lagging
/// group still needs (its pending and unread entries) stays.
#[tokio::test]
async fn trim_keeps_what_a_lagging_group_needs() {
    let prefix = unique_prefix("trim");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "fast", "c"));
    let mut conn = raw().await;
    let nothing = bus.trim_acknowledged().await.unwrap();
    assert_eq!(nothing.removed, 0, "no stream, no group: nothing to trim");
    let ids = lagging_groups(&mut conn, &bus).await;
    let report = bus.trim_acknowledged().await.unwrap();
    assert_eq!(report.removed, 4);
    assert_eq!(report.min_id.as_deref(), Some(ids[4].as_str()));
    assert_eq!(
        remaining(&mut conn, bus.stream_name()).await,
        ids[4..].to_vec(),
        "slow's 2 pending + 4 unread kept"
    );
    assert_eq!(
        bus.trim_acknowledged().await.unwrap().removed,
        0,
        "idempotent"
    );
}

/// Negative control: `XTRIM MAXLEN 2` on the same situation drops entries the lagging group
/// has not read (and two it holds pending).
#[tokio::test]
async fn naive_maxlen_trim_loses_entries_of_a_lagging_group() {
    let prefix = unique_prefix("trim-naive");
    let _c = Cleanup(prefix.clone());
    let bus = bus(config(&prefix, "fast", "c"));
    let mut conn = raw().await;
    let ids = lagging_groups(&mut conn, &bus).await;
    let _: i64 = redis::cmd("XTRIM")
        .arg(bus.stream_name())
        .arg("MAXLEN")
        .arg(2)
        .query_async(&mut conn)
        .await
        .unwrap();
    let left = remaining(&mut conn, bus.stream_name()).await;
    let needed_by_slow = &ids[4..];
    let lost = needed_by_slow
        .iter()
        .filter(|id| !left.contains(id))
        .count();
    assert_eq!(
        lost, 4,
        "the naive trim lost entries the slow group still needed"
    );
}

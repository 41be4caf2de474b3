//! L-6 (long run, ignored by default): a partitioned bus on a Redis Cluster of the test's own
//! under a kill loop — three worker processes (two consumers each) on 12 partitions, one of
//! them killed with SIGKILL and restarted under its name every 3 s while events are
//! published. The ledger judges: nothing lost, every aggregate in order, duplicates within
//! what the killed processes held.
//!
//! ```text
//! cargo test --release -p eventsource-redis --test scale_out_long -- --ignored --nocapture
//! ```
//!
//! `EVENTSOURCE_L6_ROUNDS` (default 1,500) rounds of one event for each of 100 aggregates.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::scale::*;
use common::*;
use eventsource_redis::PartitionedEventBus;
use eventsource_testsupport::cluster::OwnCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "long run: cargo test --release -p eventsource-redis --test scale_out_long -- --ignored --nocapture"]
async fn l6_partitions_on_a_cluster_under_a_kill_loop() {
    let rounds: usize = std::env::var("EVENTSOURCE_L6_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let cluster = OwnCluster::start("l6");
    let node = cluster.urls()[0].clone();
    let prefix = unique_prefix("l6");
    let _records = Cleanup(prefix.clone());
    let ledger = Arc::new(Ledger::new());
    let publisher =
        PartitionedEventBus::new(cluster_config(&node, &prefix, "publisher"), registry()).unwrap();
    publisher.connect().await.unwrap();
    let aggregates: Vec<uuid::Uuid> = (0..100).map(|_| uuid::Uuid::new_v4()).collect();
    let names = ["a", "b", "c"];
    let mut workers: Vec<_> = names.iter().map(|n| worker(&node, &prefix, n)).collect();
    let started = Instant::now();
    let publishing = tokio::spawn({
        let (publisher, ledger, aggregates) =
            (publisher.clone(), ledger.clone(), aggregates.clone());
        async move {
            for r in 0..rounds {
                publish_until_written(&publisher, &ledger, &round(&aggregates, r)).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let total = rounds * aggregates.len();
    let handled = || async {
        let mut conn = raw().await;
        redis::cmd("SCARD")
            .arg(format!("{prefix}:handled"))
            .query_async::<usize>(&mut conn)
            .await
            .unwrap()
    };
    let mut kills = 0;
    let mut published_at = None;
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        if publishing.is_finished() && published_at.is_none() {
            published_at = Some(started.elapsed());
        }
        if published_at.is_some() && handled().await >= total {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "not done after 15 minutes: {} of {total} handled",
            handled().await
        );
        if published_at.is_none() {
            // The kill loop runs while events are published: a random worker, SIGKILL,
            // restarted under its name (it waits for its old leases to lapse).
            let k = fastrand::usize(..names.len());
            signal(&workers[k], "-KILL");
            workers[k].wait().await.unwrap();
            workers[k] = worker(&node, &prefix, names[k]);
            kills += 1;
        }
    }
    let all_handled = started.elapsed();
    publishing.await.unwrap();
    for w in &workers {
        signal(w, "-TERM");
    }
    for w in &mut workers {
        assert!(w.wait().await.unwrap().success());
    }
    ledger.import_redis_list(&redis_url(), &format!("{prefix}:ledger"));
    // Each kill can bring back what the victim's two consumers held: a batch and the batch
    // read ahead (10 entries each) on each of the partitions they held (12 at most).
    let bound = kills * 2 * 12 * 20;
    let report = ledger.check(
        &Expect::new("L-6 partitions on a cluster under a kill loop", &["g"])
            .ordered_per_aggregate()
            .duplicates_at_most(bound, "what each killed worker's consumers held"),
    );
    eprintln!(
        "L-6 | {total} events, 100 aggregates, 12 partitions on 3 masters | {kills} worker \
         kills (SIGKILL, restarted) | published in {:.0?}, all handled after {:.0?}",
        published_at.unwrap_or_default(),
        all_handled
    );
    report.assert_ok();
}

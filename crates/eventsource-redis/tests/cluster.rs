//! Pointed at a Redis Cluster node, the bus refuses at once with a clear error instead of
//! working until the first retry or dead letter (its scripts use a stream's keys together,
//! which a cluster spreads over hash slots: `CROSSSLOT` / `MOVED` at 3 a.m.).

mod common;

use common::*;
use eventsource_redis::{ErrorKind, RedisBusError};
use eventsource_testsupport::cluster::OwnCluster;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_is_refused_with_a_clear_error() {
    let cluster = OwnCluster::start("refused");
    for url in cluster.urls() {
        let consumer = bus(config("cluster-refused", "g", "c").redis_url(url.clone()));
        let err = consumer.connect().await.unwrap_err();
        assert!(
            matches!(&err, RedisBusError::ClusterNotSupported { url: u } if *u == url),
            "{err:?}"
        );
        assert_eq!(err.kind(), ErrorKind::Config);
        assert!(!err.is_transient(), "an operator must change redis_url");
        assert!(err.to_string().contains("standalone Redis"), "{err}");

        // A publish-only bus (never connected) is refused the same way, before writing.
        let publisher = bus(config("cluster-refused", "g", "p").redis_url(url));
        let err = publisher.publish_events(&[created(1)]).await.unwrap_err();
        assert!(
            matches!(err, RedisBusError::ClusterNotSupported { .. }),
            "{err:?}"
        );
    }
    // Nothing was written anywhere in the cluster.
    for port in cluster.ports() {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &port.to_string(), "DBSIZE"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    }
}

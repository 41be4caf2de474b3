//! `publish_replicas`: a publish waits until that many replicas have the events (`WAIT`),
//! and says so when fewer confirmed in time — the events are on the master, a failover now
//! could lose them.

mod common;

use std::time::Duration;

use common::*;
use eventsource_redis::{ErrorKind, RedisBusError};

fn cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_waits_for_replicas_and_says_when_they_did_not_confirm() {
    let master = OwnRedis::start(free_port(), &temp_dir("wait-master"), &[]);
    let replica_port = free_port();
    let mut replica = OwnRedis::start(
        replica_port,
        &temp_dir("wait-replica"),
        &["--replicaof", "127.0.0.1", &master.port.to_string()],
    );
    assert!(
        wait_until(Duration::from_secs(20), || async {
            cli(replica_port, &["INFO", "replication"]).contains("master_link_status:up")
        })
        .await,
        "the replica syncs"
    );
    let publisher = bus(config("durable", "g", "p")
        .redis_url(master.url())
        .publish_replicas(1)
        .publish_replicas_timeout_ms(300));

    // Confirmed: the replica has both events when the publish returns.
    let ids = publisher
        .publish_events(&[created(1), created(2)])
        .await
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert_eq!(cli(replica_port, &["XLEN", "durable:stream"]), "2");

    // No replica: written on the master, and the caller is told it is not replicated.
    replica.kill();
    let event = created(3);
    let err = publisher
        .publish_events(std::slice::from_ref(&event))
        .await
        .unwrap_err();
    match &err {
        RedisBusError::NotReplicated {
            published,
            replicas,
            wanted,
        } => {
            assert_eq!((*replicas, *wanted), (0, 1));
            assert_eq!(published.len(), 1);
            assert_eq!(published[0].0, event.event_id());
        }
        other => panic!("expected NotReplicated, got {other:?}"),
    }
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(
        err.to_string().contains("a failover now could lose them"),
        "{err}"
    );
    assert_eq!(cli(master.port, &["XLEN", "durable:stream"]), "3");

    // Without the option nothing waits: the same publish succeeds.
    let plain = bus(config("durable", "g", "q").redis_url(master.url()));
    plain.publish_events(&[created(4)]).await.unwrap();
}

//! the disk of Redis's append-only file fills up under load (a 2 MiB tmpfs mounted in a
//! mount namespace of the server's own, which needs root: without it the test is reported as
//! ignored with the reason).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;

/// the append-only file's disk (a 2 MiB tmpfs) fills up under load. Redis refuses
/// writes with MISCONF: publishes fail definitely (never indeterminately written), the health
/// check turns unhealthy and says what to do. When space returns, Redis writes again, health
/// is healthy, and everything published ok is handled.
async fn r19_a_full_aof_disk_is_unhealthy_until_space_returns() {
    let dir = temp_dir("r19");
    let server = OwnRedis::start_on_tmpfs(
        free_port(),
        &dir,
        "2m",
        // everysec (the default): with `always` a failed AOF write makes Redis exit.
        &[
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--auto-aof-rewrite-percentage",
            "0",
        ],
    );
    let ledger = Arc::new(Ledger::new());
    let cfg = config("r19", "g", "c1")
        .redis_url(server.url())
        .reconnect_max_delay_ms(200)
        .socket_timeout(std::time::Duration::from_secs(2));
    let consumer = bus(cfg.clone());
    ledger_handler(&consumer, &ledger);
    consumer.connect().await.unwrap();
    let task = spawn_consumer(&consumer);
    let publisher = bus(cfg.consumer_name("publisher"));
    // Fill the disk: each event is ~400 bytes of AOF; 2 MiB holds a few thousand.
    let mut refused = None;
    for round in 0..200 {
        let batch: Vec<_> = (0..50).map(|i| created(round * 50 + i)).collect();
        if let Err(e) = publish_recorded(&publisher, &ledger, &batch).await {
            refused = Some(e.to_string());
            break;
        }
    }
    let refused = refused.expect("the disk filled up");
    assert!(refused.contains("MISCONF"), "{refused}");
    let unhealthy = wait_until(Duration::from_secs(10), || async {
        consumer.health_check().await.status == eventsource_redis::HealthStatus::Unhealthy
    })
    .await;
    let health = consumer.health_check().await;
    assert!(unhealthy, "{health:?}");
    assert!(
        health
            .error
            .as_deref()
            .is_some_and(|e| e.contains("append-only file")),
        "{health:?}"
    );
    server.resize_tmpfs("64m");
    ledger.healed();
    assert!(
        wait_until(Duration::from_secs(15), || async {
            consumer.health_check().await.status == eventsource_redis::HealthStatus::Healthy
        })
        .await,
        "healthy again: {:?}",
        consumer.health_check().await
    );
    let after: Vec<_> = (100_000..100_050).map(created).collect();
    publish_recorded(&publisher, &ledger, &after).await.unwrap();
    let done = wait_until(Duration::from_secs(20), || async {
        ledger.complete(&["g"])
    })
    .await;
    stop(&consumer, task).await;
    assert!(done, "not everything published ok was handled");
    let report = ledger
        .check(&Expect::new(
            "R-19 AOF disk full, then space returns",
            &["g"],
        ))
        .assert_ok()
        .clone();
    assert!(report.failed > 0, "some publishes were refused");
    assert_eq!(report.indeterminate, 0, "a refusal is definite");
}

fn nix_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn main() -> std::process::ExitCode {
    use eventsource_testsupport::harness;
    let not_root = (!nix_root()).then(|| {
        "mounting a tmpfs for the server (unshare -m) needs root; run the tests as root to \
         include it"
            .to_owned()
    });
    harness::run(vec![
        harness::test(
            "r19_a_full_aof_disk_is_unhealthy_until_space_returns",
            r19_a_full_aof_disk_is_unhealthy_until_space_returns,
        )
        .unless(not_root),
    ])
}

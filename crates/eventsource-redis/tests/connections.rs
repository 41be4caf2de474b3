//! Connecting the ways operators do: a password, an ACL user, a Unix socket, a database
//! number — for publishing and for the consumer's blocking reads.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use eventsource_redis::{RedisBusError, RedisEventBus};

async fn round_trip(url: String) -> RedisEventBus {
    let bus = bus(config("conn", "g", "c").redis_url(url));
    let n = counting(&bus);
    bus.connect().await.unwrap();
    bus.publish_events(&(0..3).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let task = spawn_consumer(&bus);
    assert!(
        wait_until(Duration::from_secs(10), || async {
            n.load(Ordering::SeqCst) == 3
        })
        .await
    );
    stop(&bus, task).await;
    assert_eq!(bus.stats().reconnections, 0);
    bus
}

/// A password-protected Redis and an ACL user work for publish and consume; a wrong password
/// is a clear authentication error, not transient (retrying cannot help), that does not show
/// the password.
#[tokio::test]
async fn password_and_acl_user() {
    let port = free_port();
    let server = OwnRedis::start(port, &temp_dir("auth"), &["--requirepass", "s3cret-pw"]);
    round_trip(format!("redis://:s3cret-pw@127.0.0.1:{}/3", server.port)).await;
    let mut admin = redis::Client::open(format!("redis://:s3cret-pw@127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("app")
        .arg("on")
        .arg(">app-pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .query_async(&mut admin)
        .await
        .unwrap();
    round_trip(format!("redis://app:app-pw@127.0.0.1:{port}")).await;

    let wrong =
        bus(config("conn", "g", "c").redis_url(format!("redis://:nope-pw@127.0.0.1:{port}")));
    let err = wrong.connect().await.unwrap_err();
    assert!(
        matches!(err, RedisBusError::Authentication { .. }),
        "{err:?}"
    );
    assert_eq!(err.kind(), eventsource_redis::ErrorKind::Authentication);
    assert!(!err.is_transient());
    assert!(
        err.to_string().contains("check the user name and password"),
        "{err}"
    );
    assert!(!err.to_string().contains("nope-pw"), "{err}");
}

/// A Redis reached through a Unix socket works for publish and consume.
#[tokio::test]
async fn unix_socket() {
    let dir = temp_dir("unix");
    let socket = dir.join("redis.sock");
    let _server = OwnRedis::start(0, &dir, &["--unixsocket", socket.to_str().unwrap()]);
    round_trip(format!("unix://{}", socket.display())).await;
}

/// Redis out of memory with `noeviction`: publishing fails with a typed command error that
/// says OOM (not retried blindly as a connection problem), and nothing is half-written.
#[tokio::test]
async fn out_of_memory_is_a_clear_publish_error() {
    let port = free_port();
    let server = OwnRedis::start(
        port,
        &temp_dir("oom"),
        &["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"],
    );
    let bus = bus(config("oom", "g", "c").redis_url(server.url()));
    bus.connect().await.unwrap();
    let mut published = 0u64;
    let mut partial_seen = None;
    let err = loop {
        match bus
            .publish_events(&(0..100).map(created).collect::<Vec<_>>())
            .await
        {
            Ok(ids) => published += ids.len() as u64,
            Err(RedisBusError::PartialPublish {
                published: ok,
                failed,
            }) => {
                published += ok.len() as u64;
                partial_seen = Some((ok, failed));
            }
            Err(e) => break e,
        }
        assert!(published < 1_000_000, "never ran out of memory");
    };
    assert!(
        matches!(
            err,
            RedisBusError::Command {
                command: "XADD",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("OOM"), "{err}");
    assert_eq!(err.kind(), eventsource_redis::ErrorKind::ResourceExhausted);
    assert!(!err.is_transient(), "an operator must act");
    let info = bus.get_stream_info().await;
    assert!(info.connected);
    assert_eq!(
        info.stream.length, published,
        "exactly what was reported published is there"
    );
    if let Some((ok, failed)) = partial_seen {
        // A batch cut by OOM reports each event exactly: the published ones are in the stream.
        let entries = bus
            .read_stream_range(&ok[0].1, &ok[ok.len() - 1].1, 1000)
            .await
            .unwrap();
        assert_eq!(entries.len(), ok.len());
        assert!(failed.iter().all(|(_, e)| e.to_string().contains("OOM")));
    }
}

/// A Redis that stops answering (DEBUG SLEEP 2): a publish fails with a typed, transient
/// timeout error within the socket timeout instead of hanging, health reports it, and both
/// recover when Redis answers again.
#[tokio::test]
async fn unresponsive_redis_gives_typed_timeouts_then_recovers() {
    let port = free_port();
    let server = OwnRedis::start(
        port,
        &temp_dir("sleep"),
        &["--enable-debug-command", "local"],
    );
    let bus = bus(config("sleep", "g", "c")
        .redis_url(server.url())
        .socket_timeout(std::time::Duration::from_millis(500))
        .block_ms(100));
    bus.connect().await.unwrap();
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let sleeper = tokio::spawn(async move {
        let _: redis::RedisResult<redis::Value> = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(2)
            .query_async(&mut admin)
            .await;
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let err = bus.publish_events(&[created(1)]).await.unwrap_err();
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "bounded by the socket timeout: {:?}",
        started.elapsed()
    );
    assert!(matches!(err, RedisBusError::Command { .. }), "{err:?}");
    assert!(err.is_transient(), "{err}");
    assert_eq!(
        bus.health_check().await.status,
        eventsource_redis::HealthStatus::Unhealthy
    );
    sleeper.await.unwrap();
    let mut recovered = false;
    for _ in 0..50 {
        if bus.publish_events(&[created(2)]).await.is_ok() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "publishing works again");
    assert_eq!(
        bus.health_check().await.status,
        eventsource_redis::HealthStatus::Degraded,
        "connected, not consuming"
    );
}

/// Writes paused (CLIENT PAUSE WRITE): a publish times out and is indeterminate — Redis runs
/// the queued XADD once the pause ends. The caller's retry then duplicates the event; a
/// consumer with `dedupe_window` handles it once and counts the duplicate, one without handles
/// it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_writes_make_publish_indeterminate_and_dedupe_absorbs_the_retry() {
    let port = free_port();
    let server = OwnRedis::start(port, &temp_dir("pause"), &[]);
    let base = config("pause", "deduped", "c")
        .redis_url(server.url())
        .socket_timeout(std::time::Duration::from_millis(500))
        .block_ms(100);
    let publisher = bus(base.clone().consumer_name("p"));
    publisher.connect().await.unwrap();
    let mut admin = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1500)
        .arg("WRITE")
        .query_async(&mut admin)
        .await
        .unwrap();
    let event = created(1);
    let err = publisher
        .publish_events(std::slice::from_ref(&event))
        .await
        .unwrap_err();
    assert!(err.is_transient(), "a timeout: {err}");
    assert_eq!(err.kind(), eventsource_redis::ErrorKind::Timeout);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let info = publisher.get_stream_info().await;
    assert_eq!(
        info.stream.length, 1,
        "the timed-out XADD ran after the pause: indeterminate, not failed"
    );
    publisher
        .publish_events(std::slice::from_ref(&event))
        .await
        .expect("the caller retries");

    let deduped = bus(base.clone().dedupe_window(1000));
    let plain = bus(base.consumer_group("plain"));
    let (n1, n2) = (counting(&deduped), counting(&plain));
    let (t1, t2) = (spawn_consumer(&deduped), spawn_consumer(&plain));
    assert!(
        wait_until(Duration::from_secs(10), || async {
            deduped.stats().duplicates_skipped == 1 && n2.load(Ordering::SeqCst) == 2
        })
        .await
    );
    stop(&deduped, t1).await;
    stop(&plain, t2).await;
    assert_eq!(n1.load(Ordering::SeqCst), 1, "handled once with dedupe");
    assert_eq!(
        deduped.get_stream_info().await.pending_messages,
        0,
        "the duplicate was acked"
    );
}

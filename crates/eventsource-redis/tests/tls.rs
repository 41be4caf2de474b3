//! TLS (`rediss://`, feature `tls`) against a `redis-server` that only speaks TLS, with a CA
//! and server certificate the test generates: publish and consume (the blocking reads too),
//! a client certificate, the insecure mode, and a server certificate nobody vouched for.

mod common;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use eventsource_redis::{RedisBusError, RedisEventBusConfig};

/// A TLS-only redis-server of the test's own (see the test support).
fn tls_server(auth_clients: bool) -> (OwnRedis, PathBuf, u16) {
    eventsource_testsupport::tls_redis(auth_clients)
}

fn tls_config(port: u16, prefix: &str) -> RedisEventBusConfig {
    config(prefix, "g", "c").redis_url(format!("rediss://localhost:{port}"))
}

/// Publish and consume over TLS with the test's CA: the server has no plain port, so the
/// consumer's blocking reads went over TLS too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_over_tls() {
    let (_server, dir, port) = tls_server(false);
    let bus = bus(tls_config(port, "tls").tls_ca_file(dir.join("ca.crt")));
    let n = counting(&bus);
    bus.connect().await.unwrap();
    bus.publish_events(&(0..50).map(created).collect::<Vec<_>>())
        .await
        .unwrap();
    let task = spawn_consumer(&bus);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            n.load(Ordering::SeqCst) == 50
        })
        .await
    );
    stop(&bus, task).await;
    assert_eq!(bus.stats().events_consumed, 50);
    assert_eq!(bus.stats().reconnections, 0);
    assert_eq!(bus.get_stream_info().await.pending_messages, 0);
}

/// A server that demands client certificates accepts ours; without one the connection fails
/// with a clear error.
#[tokio::test]
async fn client_certificate() {
    let (_server, dir, port) = tls_server(true);
    let with_cert = bus(tls_config(port, "tls-mtls")
        .tls_ca_file(dir.join("ca.crt"))
        .tls_cert_file(dir.join("client.crt"))
        .tls_key_file(dir.join("client.key")));
    with_cert.connect().await.unwrap();
    with_cert.publish_events(&[created(1)]).await.unwrap();
    let without = bus(tls_config(port, "tls-mtls")
        .tls_ca_file(dir.join("ca.crt"))
        .socket_connect_timeout(std::time::Duration::from_secs(2)));
    assert!(without.connect().await.is_err());
}

/// A certificate no trusted CA signed is refused (not retried as if transient... the error
/// says why); the insecure mode accepts it, for development.
#[tokio::test]
async fn untrusted_certificate_and_insecure_mode() {
    let (_server, dir, port) = tls_server(false);
    let wrong_ca = bus(tls_config(port, "tls-untrusted")
        .tls_ca_file(dir.join("other.crt"))
        .socket_connect_timeout(std::time::Duration::from_secs(2)));
    let err = wrong_ca.connect().await.unwrap_err();
    let text = eventsource_redis::codec::error_chain(&err);
    assert!(
        text.to_lowercase().contains("certificate") || text.contains("UnknownIssuer"),
        "{text}"
    );
    let insecure = bus(tls_config(port, "tls-insecure").tls_insecure(true));
    insecure.connect().await.unwrap();
    insecure.publish_events(&[created(1)]).await.unwrap();
}

/// TLS options are checked when the bus is built, naming the field.
#[test]
fn tls_options_are_validated() {
    let refused =
        |c: RedisEventBusConfig| match eventsource_redis::RedisEventBus::new(c, registry()) {
            Err(RedisBusError::Config(e)) => e,
            other => panic!("{other:?}"),
        };
    let plain = config("x", "g", "c");
    let e = refused(plain.clone().tls_insecure(true));
    assert_eq!(e.field, "tls_insecure");
    let e = refused(
        plain
            .clone()
            .redis_url("rediss://localhost:1")
            .tls_cert_file("/nonexistent.crt"),
    );
    assert_eq!(e.field, "tls_key_file");
    let e = refused(
        plain
            .redis_url("rediss://localhost:1")
            .tls_ca_file("/nonexistent-ca.crt"),
    );
    assert_eq!(e.field, "tls_ca_file");
    assert!(e.reason.contains("/nonexistent-ca.crt"), "{e}");
}

//! Configuration: the tutorial's options and defaults, validation naming the field, derived
//! key names, redaction of passwords, loading from the environment.

use std::collections::HashMap;

use eventsource_redis::{RedisBusError, RedisEventBus, RedisEventBusConfig};

/// The defaults are eventsource-py's (except block_ms, documented), and the derived names
/// follow the wire format.
#[test]
fn defaults_and_derived_names() {
    let c = RedisEventBusConfig::default();
    assert_eq!(c.redis_url, "redis://localhost:6379");
    assert_eq!(c.socket_timeout, 5.0);
    assert_eq!(c.socket_connect_timeout, 5.0);
    assert!(!c.single_connection_client);
    assert_eq!(c.stream_prefix, "events");
    assert_eq!(c.consumer_group, "default");
    assert_eq!(c.consumer_name, None);
    assert_eq!(c.batch_size, 100);
    assert_eq!(c.block_ms, 2000);
    assert_eq!(c.max_retries, 3);
    assert!(c.enable_dlq);
    assert_eq!(c.dlq_stream_suffix, "_dlq");
    assert_eq!(c.pending_idle_ms, 60_000);
    assert_eq!(c.retry_key_prefix, "retry");
    assert_eq!(c.retry_key_expiry_seconds, 86_400);
    assert!(c.enable_tracing);
    c.validate().expect("defaults are valid");
    let orders = RedisEventBusConfig {
        stream_prefix: "orders".into(),
        ..c
    };
    assert_eq!(orders.stream_name(), "orders:stream");
    assert_eq!(orders.dlq_stream_name(), "orders:stream_dlq");
    assert_eq!(
        orders.retry_key("1700000000000-0"),
        "orders:retry:1700000000000-0"
    );
}

/// The default consumer name is `{hostname}-{8 hex}` and differs between buses.
#[test]
fn default_consumer_name_is_host_dash_8_hex() {
    let a = RedisEventBus::new(RedisEventBusConfig::default(), Default::default()).unwrap();
    let b = RedisEventBus::new(RedisEventBusConfig::default(), Default::default()).unwrap();
    let name = a.consumer_name();
    let (host, suffix) = name.rsplit_once('-').unwrap();
    assert!(!host.is_empty());
    assert_eq!(suffix.len(), 8);
    assert!(suffix.chars().all(|c| c.is_ascii_hexdigit()));
    assert_ne!(a.consumer_name(), b.consumer_name());
}

fn refused(c: RedisEventBusConfig) -> (&'static str, String) {
    match RedisEventBus::new(c, Default::default()) {
        Err(RedisBusError::Config(e)) => {
            let text = e.to_string();
            (e.field, text)
        }
        other => panic!("expected a config error, got {other:?}"),
    }
}

/// Each invalid option fails at construction with a message naming the field.
#[test]
fn invalid_options_name_the_field() {
    let d = RedisEventBusConfig::default;
    let cases: Vec<(RedisEventBusConfig, &str)> = vec![
        (
            RedisEventBusConfig {
                stream_prefix: "".into(),
                ..d()
            },
            "stream_prefix",
        ),
        (
            RedisEventBusConfig {
                stream_prefix: "a b".into(),
                ..d()
            },
            "stream_prefix",
        ),
        (
            RedisEventBusConfig {
                consumer_group: " ".into(),
                ..d()
            },
            "consumer_group",
        ),
        (
            RedisEventBusConfig {
                consumer_name: Some("".into()),
                ..d()
            },
            "consumer_name",
        ),
        (
            RedisEventBusConfig {
                batch_size: 0,
                ..d()
            },
            "batch_size",
        ),
        (RedisEventBusConfig { block_ms: 0, ..d() }, "block_ms"),
        (
            RedisEventBusConfig {
                block_ms: 5000,
                ..d()
            },
            "block_ms",
        ),
        (
            RedisEventBusConfig {
                socket_timeout: 0.0,
                ..d()
            },
            "socket_timeout",
        ),
        (
            RedisEventBusConfig {
                socket_connect_timeout: f64::NAN,
                ..d()
            },
            "socket_connect_timeout",
        ),
        (
            RedisEventBusConfig {
                redis_url: "http://localhost".into(),
                ..d()
            },
            "redis_url",
        ),
        (
            RedisEventBusConfig {
                dlq_stream_suffix: "".into(),
                ..d()
            },
            "dlq_stream_suffix",
        ),
        (
            RedisEventBusConfig {
                pending_idle_ms: 0,
                ..d()
            },
            "pending_idle_ms",
        ),
        (
            RedisEventBusConfig {
                retry_key_prefix: "".into(),
                ..d()
            },
            "retry_key_prefix",
        ),
        (
            RedisEventBusConfig {
                retry_key_expiry_seconds: 0,
                ..d()
            },
            "retry_key_expiry_seconds",
        ),
    ];
    for (config, field) in cases {
        let (got, text) = refused(config);
        assert_eq!(got, field, "{text}");
        assert!(text.contains(field), "message names the field: {text}");
    }
}

/// A password in the URL never appears in Debug output or error messages.
#[test]
fn password_is_redacted() {
    let c = RedisEventBusConfig {
        redis_url: "redis://app:s3cret-pw@127.0.0.1:6379/0".into(),
        ..RedisEventBusConfig::default()
    };
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cret-pw"), "{debug}");
    assert!(
        debug.contains("redis://app:***@127.0.0.1:6379/0"),
        "{debug}"
    );
    let bus = RedisEventBus::new(c.clone(), Default::default()).unwrap();
    assert!(!format!("{bus:?}").contains("s3cret-pw"));
    let bad = RedisEventBusConfig {
        redis_url: "http://u:s3cret-pw@h".into(),
        ..c
    };
    let (_, text) = refused(bad);
    assert!(!text.contains("s3cret-pw"), "{text}");
    assert_eq!(
        eventsource_redis::config::redact_url("redis://pw@h:1"),
        "redis://***@h:1"
    );
    assert_eq!(
        eventsource_redis::config::redact_url("redis://h:1/0"),
        "redis://h:1/0"
    );
    // Passwords holding URL delimiters, percent-encoded (as they must be) or not.
    for (url, secret) in [
        ("redis://app:p%2Fw%3Fx%23y%40z@h:1/0", "p%2Fw"),
        ("redis://app:pa/ss@h:1", "pa/ss"),
        ("redis://app:pa?ss@h:1", "pa?ss"),
        ("redis://app:pa#ss@h:1", "pa#ss"),
        ("redis://app:p@ss@h:1", "p@ss"),
        (
            "redis+unix:///tmp/r.sock?db=1&pass=top-secret",
            "top-secret",
        ),
    ] {
        let redacted = eventsource_redis::config::redact_url(url);
        assert!(!redacted.contains(secret), "{url} -> {redacted}");
        let tail = secret.split(['/', '?', '#', '@', '%']).next_back().unwrap();
        assert!(
            !redacted.contains(tail) || tail.is_empty(),
            "{url} -> {redacted}"
        );
    }
}

/// Options load from EVENTSOURCE_REDIS_* variables; a bad value names the option.
#[test]
fn from_environment_variables() {
    let vars: HashMap<&str, &str> = HashMap::from([
        ("EVENTSOURCE_REDIS_URL", "redis://127.0.0.1:6380"),
        ("EVENTSOURCE_REDIS_STREAM_PREFIX", "orders"),
        ("EVENTSOURCE_REDIS_CONSUMER_GROUP", "projections"),
        ("EVENTSOURCE_REDIS_STREAM_READ_COUNT", "25"),
        ("EVENTSOURCE_REDIS_BLOCK_MS", "500"),
        ("EVENTSOURCE_REDIS_ENABLE_DLQ", "false"),
    ]);
    let c = RedisEventBusConfig::from_lookup(|k| vars.get(k).map(|v| v.to_string())).unwrap();
    assert_eq!(c.redis_url, "redis://127.0.0.1:6380");
    assert_eq!(c.stream_prefix, "orders");
    assert_eq!(c.consumer_group, "projections");
    assert_eq!(c.batch_size, 25);
    assert_eq!(c.block_ms, 500);
    assert!(!c.enable_dlq);
    let err = RedisEventBusConfig::from_lookup(|k| {
        (k == "EVENTSOURCE_REDIS_MAX_RETRIES").then(|| "three".to_string())
    })
    .unwrap_err();
    assert_eq!(err.field, "max_retries");
}

/// Deserialising accepts both `batch_size` and eventsource-py's `stream_read_count`, and
/// refuses unknown options.
#[test]
fn deserialises_with_both_batch_names() {
    let a: RedisEventBusConfig =
        serde_json::from_str(r#"{"stream_prefix":"x","batch_size":7}"#).unwrap();
    let b: RedisEventBusConfig =
        serde_json::from_str(r#"{"stream_prefix":"x","stream_read_count":7}"#).unwrap();
    assert_eq!(a.batch_size, 7);
    assert_eq!(b.batch_size, 7);
    assert!(serde_json::from_str::<RedisEventBusConfig>(r#"{"batch_sise":7}"#).is_err());
}

//! Configuration: the tutorial's options and defaults, validation naming the field, derived
//! key names, redaction of passwords, loading from the environment.

use std::collections::HashMap;
use std::time::Duration;

use eventsource_redis::{RedisBusError, RedisEventBus, RedisEventBusConfig};

/// The defaults are eventsource-py's (except block_ms, documented), and the derived names
/// follow the wire format.
#[test]
fn defaults_and_derived_names() {
    let c = RedisEventBusConfig::default();
    assert_eq!(c.redis_url, "redis://localhost:6379");
    assert_eq!(c.socket_timeout, Duration::from_secs(5));
    assert_eq!(c.socket_connect_timeout, Duration::from_secs(5));
    assert!(!c.single_connection_client);
    assert_eq!(c.stream_prefix, "events");
    assert_eq!(c.consumer_group, "default");
    assert_eq!(c.consumer_name, None);
    assert_eq!(c.batch_size, 100);
    assert_eq!(c.block, Duration::from_millis(2000));
    assert_eq!(c.max_retries, 3);
    assert!(c.enable_dlq);
    assert_eq!(c.dlq_stream_suffix, "_dlq");
    assert_eq!(c.pending_idle, Duration::from_secs(60));
    assert_eq!(c.retry_key_prefix, "retry");
    assert_eq!(c.retry_key_expiry, Duration::from_secs(86_400));
    assert!(c.enable_tracing);
    c.validate().expect("defaults are valid");
    let orders = c.stream_prefix("orders");
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
        (d().stream_prefix(""), "stream_prefix"),
        (d().stream_prefix("a b"), "stream_prefix"),
        (d().consumer_group(" "), "consumer_group"),
        (d().consumer_name(""), "consumer_name"),
        (d().batch_size(0), "batch_size"),
        (d().block_ms(0), "block"),
        (d().block_ms(5000), "block"),
        (d().block(Duration::from_micros(300)), "block"),
        (d().socket_timeout(Duration::ZERO), "socket_timeout"),
        (
            d().socket_connect_timeout(Duration::ZERO),
            "socket_connect_timeout",
        ),
        (d().redis_url("http://localhost"), "redis_url"),
        (d().dlq_stream_suffix(""), "dlq_stream_suffix"),
        (d().pending_idle_ms(0), "pending_idle"),
        (d().retry_key_prefix(""), "retry_key_prefix"),
        (d().retry_key_expiry_seconds(0), "retry_key_expiry"),
        (
            d().retry_key_expiry(Duration::from_millis(999)),
            "retry_key_expiry",
        ),
        (d().reconnect_max_delay_ms(99), "reconnect_max_delay"),
        (
            d().socket_timeout(Duration::from_secs(400 * 24 * 3600)),
            "socket_timeout",
        ),
        (d().retry_key_expiry_seconds(u64::MAX), "retry_key_expiry"),
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
    let c = RedisEventBusConfig::default().redis_url("redis://app:s3cret-pw@127.0.0.1:6379/0");
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cret-pw"), "{debug}");
    assert!(
        debug.contains("redis://app:***@127.0.0.1:6379/0"),
        "{debug}"
    );
    let bus = RedisEventBus::new(c.clone(), Default::default()).unwrap();
    assert!(!format!("{bus:?}").contains("s3cret-pw"));
    let bad = c.redis_url("http://u:s3cret-pw@h");
    let (_, text) = refused(bad);
    assert!(!text.contains("s3cret-pw"), "{text}");
    assert_eq!(
        eventsource_redis::redact_url("redis://pw@h:1"),
        "redis://***@h:1"
    );
    assert_eq!(
        eventsource_redis::redact_url("redis://h:1/0"),
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
        let redacted = eventsource_redis::redact_url(url);
        assert!(!redacted.contains(secret), "{url} -> {redacted}");
        let tail = secret.split(['/', '?', '#', '@', '%']).next_back().unwrap();
        assert!(
            !redacted.contains(tail) || tail.is_empty(),
            "{url} -> {redacted}"
        );
    }
}

/// Options load from EVENTSOURCE_REDIS_* variables, durations in the units of their Python
/// names; `REDIS_URL` is the fallback for the URL; a bad value names the option and the
/// variable.
#[test]
fn from_environment_variables() {
    let vars: HashMap<&str, &str> = HashMap::from([
        ("EVENTSOURCE_REDIS_URL", "redis://127.0.0.1:6380"),
        ("EVENTSOURCE_REDIS_STREAM_PREFIX", "orders"),
        ("EVENTSOURCE_REDIS_CONSUMER_GROUP", "projections"),
        ("EVENTSOURCE_REDIS_STREAM_READ_COUNT", "25"),
        ("EVENTSOURCE_REDIS_BLOCK_MS", "500"),
        ("EVENTSOURCE_REDIS_ENABLE_DLQ", "false"),
        ("EVENTSOURCE_REDIS_SOCKET_TIMEOUT", "2.5"),
        ("EVENTSOURCE_REDIS_RETRY_KEY_EXPIRY_SECONDS", "60"),
        (
            "REDIS_URL",
            "redis://ignored-when-the-own-variable-is-set:1",
        ),
    ]);
    let c = RedisEventBusConfig::from_lookup(|k| vars.get(k).map(|v| v.to_string())).unwrap();
    assert_eq!(c.redis_url, "redis://127.0.0.1:6380");
    assert_eq!(c.stream_prefix, "orders");
    assert_eq!(c.consumer_group, "projections");
    assert_eq!(c.batch_size, 25);
    assert_eq!(c.block, Duration::from_millis(500));
    assert!(!c.enable_dlq);
    assert_eq!(c.socket_timeout, Duration::from_millis(2500));
    assert_eq!(c.retry_key_expiry, Duration::from_secs(60));
    let only_redis_url = RedisEventBusConfig::from_lookup(|k| {
        (k == "REDIS_URL").then(|| "redis://cache.internal:6380/2".to_string())
    })
    .unwrap();
    assert_eq!(only_redis_url.redis_url, "redis://cache.internal:6380/2");
    for (variable, value, field) in [
        ("EVENTSOURCE_REDIS_MAX_RETRIES", "three", "max_retries"),
        ("EVENTSOURCE_REDIS_BLOCK_MS", "1.5", "block_ms"),
        ("EVENTSOURCE_REDIS_SOCKET_TIMEOUT", "-1", "socket_timeout"),
        ("EVENTSOURCE_REDIS_SOCKET_TIMEOUT", "NaN", "socket_timeout"),
        ("EVENTSOURCE_REDIS_ON_REJECTED", "ignore", "on_rejected"),
    ] {
        let err = RedisEventBusConfig::from_lookup(|k| (k == variable).then(|| value.to_string()))
            .unwrap_err();
        assert_eq!(err.field, field, "{err}");
        assert!(err.to_string().contains(variable), "{err}");
    }
    // An option given under its name and its alias is refused, not silently one of them.
    let both = RedisEventBusConfig::from_lookup(|k| match k {
        "EVENTSOURCE_REDIS_BATCH_SIZE" => Some("500".to_string()),
        "EVENTSOURCE_REDIS_STREAM_READ_COUNT" => Some("100".to_string()),
        _ => None,
    })
    .unwrap_err();
    assert_eq!(both.field, "batch_size");
    assert!(both.to_string().contains("given twice"), "{both}");
    // Parsed, then validated: a block time not below the socket timeout.
    let err = RedisEventBusConfig::from_lookup(|k| {
        (k == "EVENTSOURCE_REDIS_SOCKET_TIMEOUT").then(|| "1".to_string())
    })
    .unwrap_err();
    assert_eq!(err.field, "block");
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
    let err = serde_json::from_str::<RedisEventBusConfig>(r#"{"batch_sise":7}"#).unwrap_err();
    assert!(
        err.to_string().contains("unknown option `batch_sise`"),
        "{err}"
    );
    // eventsource-py's names and units; null keeps the default.
    let py: RedisEventBusConfig = serde_json::from_str(
        r#"{"block_ms":500,"socket_timeout":1.5,"pending_idle_ms":30000,
            "retry_key_expiry_seconds":3600,"consumer_name":null,"enable_dlq":false}"#,
    )
    .unwrap();
    assert_eq!(py.block, Duration::from_millis(500));
    assert_eq!(py.socket_timeout, Duration::from_millis(1500));
    assert_eq!(py.pending_idle, Duration::from_secs(30));
    assert_eq!(py.retry_key_expiry, Duration::from_secs(3600));
    assert_eq!(py.consumer_name, None);
    assert!(!py.enable_dlq);
    let both = serde_json::from_str::<RedisEventBusConfig>(
        r#"{"batch_size":500,"stream_read_count":100}"#,
    )
    .unwrap_err();
    assert!(both.to_string().contains("given twice"), "{both}");
    let err = serde_json::from_str::<RedisEventBusConfig>(r#"{"block_ms":"soon"}"#).unwrap_err();
    assert!(err.to_string().contains("block_ms"), "{err}");
}

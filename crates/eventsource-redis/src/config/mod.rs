//! Every option of the bus, with the tutorial's names and defaults, validation that names the
//! bad field, the derived key names, and loading from environment variables.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

mod client;
mod text;
mod validate;

pub use client::redact_url;
use text::{parse_text, text_secs};

/// The longest duration an option accepts.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Prefix of the environment variables [`RedisEventBusConfig::from_env`] reads.
pub const ENV_PREFIX: &str = "EVENTSOURCE_REDIS_";

/// Variables under [`ENV_PREFIX`] that are not options but are read elsewhere in this crate.
const OTHER_ENV_VARS: &[&str] = &[];

/// Why a configuration was refused. Always names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RedisEventBusConfig.{field}: {reason}")]
#[non_exhaustive]
pub struct ConfigError {
    /// The option's name: the field of [`RedisEventBusConfig`], or the text key (for example
    /// `block_ms`) when its text form did not parse.
    pub field: &'static str,
    /// What is wrong and what would be right.
    pub reason: String,
}

impl ConfigError {
    /// Whether the same call may succeed later (see
    /// [`ErrorKind::is_transient`](eventsource_core::ErrorKind::is_transient)); never for
    /// this error type today, kept so every error answers the question the same way.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
    /// Always [`ErrorKind::Config`](eventsource_core::ErrorKind::Config).
    pub fn kind(&self) -> eventsource_core::ErrorKind {
        eventsource_core::ErrorKind::Config
    }

    pub(crate) fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Generates the configuration from one list of options: the struct with its documented
/// fields, `Default`, `Debug` (the URL redacted), a chainable setter per option, and the text
/// form used by the environment and by deserialisation (keys, aliases, units).
///
/// Each option reads `field: Type = default, kind;` where the kind says how its text parses:
/// `url` / `string` (as is), `opt_string` / `opt_path` (set when present), `parse` (`FromStr`),
/// `secs` (a `Duration` written as seconds, fractions allowed), `millis(py)` and
/// `whole_secs(py)` (a `Duration` written under eventsource-py's name `py` in milliseconds or
/// whole seconds; `py` is also a setter taking that number). `["alias"]` adds text keys.
macro_rules! bus_options {
    (
        $(
            $(#[doc = $doc:literal])*
            $field:ident : $ty:ty = $default:expr, $kind:ident $(($py:ident))? $([$($alias:literal),*])?;
        )*
    ) => {
        /// Configuration of a [`RedisEventBus`](crate::RedisEventBus).
        ///
        /// Option names and defaults are those of eventsource-py's `RedisEventBusConfig`;
        /// durations are [`Duration`]s here (`block`, `pending_idle`, ...), while the text
        /// forms — environment variables, deserialised files — keep the Python names and
        /// units (`block_ms`, `socket_timeout` in seconds), so its settings carry over.
        /// `#[non_exhaustive]`: start from [`default()`](Default::default) and chain the
        /// setters (or assign fields); the bus validates when it is built.
        /// ```
        /// use std::time::Duration;
        /// use eventsource_redis::RedisEventBusConfig;
        /// let config = RedisEventBusConfig::default()
        ///     .stream_prefix("orders")
        ///     .consumer_group("projections")
        ///     .block(Duration::from_millis(500));
        /// config.validate().unwrap();
        /// assert_eq!(config.stream_name(), "orders:stream");
        /// assert_eq!(config.dlq_stream_name(), "orders:stream_dlq");
        /// assert_eq!(config.retry_key("1-0"), "orders:retry:1-0");
        /// assert_eq!(config.error_key("1-0"), "orders:retry:projections:1-0:error");
        /// // eventsource-py's names and units, where its users look for them:
        /// assert_eq!(config.clone().block_ms(500).block, config.block);
        /// ```
        #[derive(Clone)]
        #[non_exhaustive]
        pub struct RedisEventBusConfig {
            $( $(#[doc = $doc])* pub $field: $ty, )*
        }

        impl Default for RedisEventBusConfig {
            fn default() -> Self {
                Self { $( $field: $default, )* }
            }
        }

        impl fmt::Debug for RedisEventBusConfig {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut d = f.debug_struct("RedisEventBusConfig");
                $( bus_options!(@debug $kind, d, $field, self.$field); )*
                d.finish()
            }
        }

        impl RedisEventBusConfig {
            $(
                bus_options!(@setter $kind $(($py))?, $field, $ty);
            )*

            /// Every text key (the environment variable after `EVENTSOURCE_REDIS_`, in upper
            /// case; the name in a deserialised file), aliases included.
            pub const TEXT_KEYS: &'static [&'static str] = &[
                $( bus_options!(@key $field $(, $py)?), $($($alias,)*)? )*
            ];

            /// The option (field name) a text key sets, aliases included.
            fn option_of(key: &str) -> Option<&'static str> {
                $(
                    if key == bus_options!(@key $field $(, $py)?) $($(|| key == $alias)*)? {
                        return Some(stringify!($field));
                    }
                )*
                None
            }

            /// Sets the option whose text key is `key` from its text form; `Ok(false)` when no
            /// option has that key.
            fn set_text(&mut self, key: &str, raw: &str) -> Result<bool, ConfigError> {
                $(
                    if key == bus_options!(@key $field $(, $py)?) $($(|| key == $alias)*)? {
                        self.$field =
                            bus_options!(@parse $kind, bus_options!(@key $field $(, $py)?), raw);
                        return Ok(true);
                    }
                )*
                Ok(false)
            }
        }
    };
    (@key $field:ident) => { stringify!($field) };
    (@key $field:ident, $py:ident) => { stringify!($py) };

    (@debug url, $d:ident, $field:ident, $value:expr) => {
        $d.field(stringify!($field), &redact_url(&$value));
    };
    (@debug $kind:ident, $d:ident, $field:ident, $value:expr) => {
        $d.field(stringify!($field), &$value);
    };

    (@setter url, $field:ident, $ty:ty) => { bus_options!(@setter string, $field, $ty); };
    (@setter string, $field:ident, $ty:ty) => {
        #[doc = concat!("Sets `", stringify!($field), "`.")]
        #[must_use]
        pub fn $field(mut self, value: impl Into<String>) -> Self {
            self.$field = value.into();
            self
        }
    };
    (@setter opt_string, $field:ident, $ty:ty) => {
        #[doc = concat!("Sets `", stringify!($field), "`.")]
        #[must_use]
        pub fn $field(mut self, value: impl Into<String>) -> Self {
            self.$field = Some(value.into());
            self
        }
    };
    (@setter opt_path, $field:ident, $ty:ty) => {
        #[doc = concat!("Sets `", stringify!($field), "`.")]
        #[must_use]
        pub fn $field(mut self, value: impl Into<std::path::PathBuf>) -> Self {
            self.$field = Some(value.into());
            self
        }
    };
    (@setter parse, $field:ident, $ty:ty) => {
        #[doc = concat!("Sets `", stringify!($field), "`.")]
        #[must_use]
        pub fn $field(mut self, value: $ty) -> Self {
            self.$field = value;
            self
        }
    };
    (@setter secs, $field:ident, $ty:ty) => { bus_options!(@setter parse, $field, $ty); };
    (@setter millis($py:ident), $field:ident, $ty:ty) => {
        bus_options!(@setter parse, $field, $ty);
        #[doc = concat!("Sets `", stringify!($field), "` in milliseconds (eventsource-py's `",
            stringify!($py), "`).")]
        #[must_use]
        pub fn $py(mut self, ms: u64) -> Self {
            self.$field = Duration::from_millis(ms);
            self
        }
    };
    (@setter whole_secs($py:ident), $field:ident, $ty:ty) => {
        bus_options!(@setter parse, $field, $ty);
        #[doc = concat!("Sets `", stringify!($field), "` in seconds (eventsource-py's `",
            stringify!($py), "`).")]
        #[must_use]
        pub fn $py(mut self, secs: u64) -> Self {
            self.$field = Duration::from_secs(secs);
            self
        }
    };

    (@parse url, $key:expr, $raw:expr) => { $raw.to_owned() };
    (@parse string, $key:expr, $raw:expr) => { $raw.to_owned() };
    (@parse opt_string, $key:expr, $raw:expr) => { Some($raw.to_owned()) };
    (@parse opt_path, $key:expr, $raw:expr) => { Some($raw.into()) };
    (@parse parse, $key:expr, $raw:expr) => { parse_text($key, $raw)? };
    (@parse secs, $key:expr, $raw:expr) => { text_secs($key, parse_text::<f64>($key, $raw)?)? };
    (@parse millis, $key:expr, $raw:expr) => {
        Duration::from_millis(parse_text::<u64>($key, $raw)?)
    };
    (@parse whole_secs, $key:expr, $raw:expr) => {
        Duration::from_secs(parse_text::<u64>($key, $raw)?)
    };
}

bus_options! {
    /// Redis URL, `redis://[user:password@]host:port[/db]` (or `rediss://`). Default
    /// `redis://localhost:6379`; from the environment `EVENTSOURCE_REDIS_URL`, else
    /// `REDIS_URL`. A password in it never appears in Debug output or logs.
    redis_url: String = "redis://localhost:6379".into(), url ["url"];
    /// Response timeout of ordinary commands (publish, ack, claim, info). Default 5 s (text
    /// form: seconds). A command that takes longer fails with a timeout instead of hanging.
    socket_timeout: Duration = Duration::from_secs(5), secs;
    /// Timeout of establishing a connection. Default 5 s (text form: seconds).
    socket_connect_timeout: Duration = Duration::from_secs(5), secs;
    /// TLS (`rediss://` URLs; feature `tls`): a PEM file of CA certificates to trust instead
    /// of the system's (a managed Redis's or your own CA). Default: the system's roots.
    tls_ca_file: Option<std::path::PathBuf> = None, opt_path;
    /// TLS: this client's certificate (PEM), for a server that requires one
    /// (`tls-auth-clients yes`); set `tls_key_file` with it.
    tls_cert_file: Option<std::path::PathBuf> = None, opt_path;
    /// TLS: the private key (PEM) of `tls_cert_file`.
    tls_key_file: Option<std::path::PathBuf> = None, opt_path;
    /// TLS without verifying the server's certificate. For development against a self-signed
    /// server only: anyone on the path can read and change the traffic. Default false.
    tls_insecure: bool = false, parse;
    /// Accepted for compatibility. The bus always uses one multiplexed connection for
    /// commands; the blocking read has its own, because a blocking read on the publishing
    /// connection would stall every publish behind it. Default false.
    single_connection_client: bool = false, parse;
    /// Prefix of every key of this bus: `{prefix}:stream`, its DLQ and retry keys.
    /// Default `events`.
    stream_prefix: String = "events".into(), string;
    /// Consumer group: every group receives every event; inside a group each event goes to
    /// one consumer. Default `default`.
    consumer_group: String = "default".into(), string;
    /// This consumer's name inside the group. Default `{hostname}-{8 hex}`; give a stable
    /// name to a restarting worker so it drains its own pending entries first.
    consumer_name: Option<String> = None, opt_string;
    /// Entries per XREADGROUP (eventsource-py now calls it `stream_read_count`; both names
    /// are accepted in text). Bounds the messages in flight per consumer. Default 100.
    batch_size: usize = 100, parse ["stream_read_count"];
    /// How long one XREADGROUP blocks waiting for new entries (text: `block_ms`). Must be
    /// below `socket_timeout` so an idle consumer never sees timeouts. Default **2 s** — the
    /// one default that differs from eventsource-py (5000 ms, equal to its socket timeout,
    /// which makes its idle consumers log timeouts).
    block: Duration = Duration::from_millis(2000), millis(block_ms);
    /// Retries after the first attempt before an entry is dead-lettered: an entry is handled
    /// at most `1 + max_retries` times. Default 3.
    max_retries: u32 = 3, parse;
    /// Dead-letter entries that exhausted their retries (or cannot be decoded). When false
    /// they are acknowledged and dropped with an error log and a counter. Default true.
    enable_dlq: bool = true, parse;
    /// DLQ stream suffix: `{prefix}:stream{suffix}`. Default `_dlq`.
    dlq_stream_suffix: String = "_dlq".into(), string;
    /// How long an entry must sit unacknowledged before recovery claims it (text:
    /// `pending_idle_ms`). Default 60 s.
    pending_idle: Duration = Duration::from_secs(60), millis(pending_idle_ms);
    /// Middle part of the per-message keys: `{prefix}:{retry_key_prefix}:{message id}`.
    /// This bus keeps the last failure reason under `{that key}:error` so the dead letter can
    /// state it. Default `retry`.
    retry_key_prefix: String = "retry".into(), string;
    /// Expiry of those keys, in whole seconds (text: `retry_key_expiry_seconds`). Default
    /// one day.
    retry_key_expiry: Duration = Duration::from_secs(86_400), whole_secs(retry_key_expiry_seconds);
    /// Replicas every publish waits for (`WAIT`) before it returns; 0 (the default) does not
    /// wait. Redis replicates asynchronously: an entry the master accepted but had not sent on
    /// is lost if a replica takes over. With N > 0 a publish returns
    /// [`RedisBusError::NotReplicated`](crate::RedisBusError::NotReplicated) when fewer than
    /// N replicas confirmed within `publish_replicas_timeout`. Costs one round trip plus the
    /// replication delay per publish call (a batch waits once).
    publish_replicas: u32 = 0, parse;
    /// How long a publish waits for `publish_replicas` (text: `publish_replicas_timeout_ms`).
    /// Default 1 s.
    publish_replicas_timeout: Duration = Duration::from_secs(1), millis(publish_replicas_timeout_ms);
    /// Emit tracing spans (publish, process, handle) and carry W3C trace context in entries.
    /// Default true.
    enable_tracing: bool = true, parse;
    /// Read with the bus's own RESP reader on plain TCP (`redis://`): it parses
    /// `XREADGROUP` replies straight into entries, 1.35× redis-rs's reader in the benchmark.
    /// False reads with redis-rs's connection as TLS and Unix sockets always do. Default true.
    own_reader: bool = true, parse;
    /// How often the consumer runs pending recovery by itself (text: `recovery_interval_ms`);
    /// zero turns it off (then call `recover_pending_messages` yourself). Default 30 s.
    recovery_interval: Duration = Duration::from_secs(30), millis(recovery_interval_ms);
    /// How often a consuming bus refreshes its gauges (pending entries, group lag,
    /// dead-letter depth; feature `metrics`; text: `metrics_interval_ms`); zero turns it
    /// off. Default 10 s.
    metrics_interval: Duration = Duration::from_secs(10), millis(metrics_interval_ms);
    /// Recovery also removes other consumers of the group that have nothing pending and have
    /// been idle longer than this (text: `prune_idle_consumers_ms`), so restarts with
    /// generated names do not grow the consumer list forever. A consumer holding pending
    /// entries is never removed (the check and the removal are one atomic script). Zero =
    /// never. Default one day.
    prune_idle_consumers: Duration = Duration::from_secs(86_400), millis(prune_idle_consumers_ms);
    /// Remember the ids of the last N events this consumer handled successfully and skip an
    /// entry carrying one of them again (acked, counted as `duplicates_skipped`): duplicates
    /// from a republish after an indeterminate publish, or a redelivery whose ack was lost.
    /// Only within this consumer process; handlers should still be idempotent. 0 = off
    /// (the default).
    dedupe_window: usize = 0, parse;
    /// Messages one consumer handles at the same time. 1 (the default) handles a batch
    /// strictly in stream order, one entry after the other. N > 1 runs up to N entries of a
    /// batch concurrently while entries of the same aggregate (same `aggregate_id`) still run
    /// one after the other in stream order; the next batch is read when the whole batch is
    /// done. Useful for I/O-bound handlers.
    handler_concurrency: usize = 1, parse;
    /// Longest wait between reconnection attempts (text: `reconnect_max_delay_ms`; backoff
    /// doubles from 100 ms up to this, with jitter). Problems an operator must fix (a missing
    /// ACL permission, a wrong password) are retried at this interval. Default 5 s.
    reconnect_max_delay: Duration = Duration::from_secs(5), millis(reconnect_max_delay_ms);
    /// Largest entry (sum of field and value bytes) the consumer reads into memory. A larger
    /// entry is not held: it is dead-lettered (Redis copies it to the DLQ) with a reason
    /// naming this limit. Default 16 MiB.
    max_entry_bytes: usize = 16 * 1024 * 1024, parse;
    /// What to do with an entry whose data this version of its registered Rust type rejects
    /// (a new required field, a changed type: typically a bad deploy). Default
    /// [`RejectedPolicy::Retry`].
    on_rejected: RejectedPolicy = RejectedPolicy::Retry, parse;
    /// With [`RejectedPolicy::Retry`]: after this many rejected entries in a row (none
    /// decoding in between) the consumer pauses — it stops reading and recovering, reports
    /// unhealthy with the reason, and leaves the entries pending — so a bad deploy does not
    /// drain the stream into the DLQ and a rollback continues where it stopped. 0 = never
    /// pause. Default 10.
    pause_after_rejections: u32 = 10, parse;
    /// Partitions of the stream ([`PartitionedEventBus`](crate::PartitionedEventBus) only):
    /// each event goes to partition `aggregate_id mod partitions` (the UUID as a 128-bit
    /// big-endian integer), each partition has one owner per group at a time, so events of
    /// one aggregate are handled in order by one consumer. 1 (the default) keeps the key names
    /// of [`RedisEventBus`](crate::RedisEventBus) on a single node. At most 1024.
    partitions: u32 = 1, parse;
    /// Connect to a Redis Cluster ([`PartitionedEventBus`](crate::PartitionedEventBus) only):
    /// `redis_url` names one node, the rest are discovered. Every partition's keys share one
    /// hash tag, `{<stream_prefix>:p<i>}`, so its scripts stay in one slot. Default false.
    cluster: bool = false, parse;
    /// How long a consumer's hold on a partition lasts without renewal
    /// ([`PartitionedEventBus`](crate::PartitionedEventBus); text: `partition_lease_ms`). A
    /// consumer renews it every twentieth of it; a consumer that dies loses its partitions
    /// after at most this long, and a consumer that cannot renew stops handling them before
    /// it lapses. Also how long a silent member stays in the group's member list. Default
    /// 10 s.
    partition_lease: Duration = Duration::from_secs(10), millis(partition_lease_ms);
}

/// A duration in whole milliseconds, as Redis takes them (saturating).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a consumer does with an entry its version of the event type cannot decode.
///
/// "Malformed" entries (not JSON, no payload, invalid base fields) are dead-lettered at once
/// whatever this says: no version can decode them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectedPolicy {
    /// Treat it like a handler failure: it stays pending with the reason recorded, recovery
    /// retries it, and it is dead-lettered after `1 + max_retries` attempts; and after
    /// `pause_after_rejections` rejections in a row the consumer pauses. Protects the stream
    /// from a bad deploy. The default.
    #[default]
    Retry,
    /// Dead-letter it at once, like a malformed entry (the behaviour before 0.2).
    DeadLetter,
}

impl std::str::FromStr for RejectedPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "retry" => Ok(Self::Retry),
            "dead_letter" | "dlq" => Ok(Self::DeadLetter),
            other => Err(format!("{other:?} is not one of retry, dead_letter")),
        }
    }
}

impl RedisEventBusConfig {
    /// The main stream: `{stream_prefix}:stream`.
    pub fn stream_name(&self) -> String {
        format!("{}:stream", self.stream_prefix)
    }

    /// The dead-letter stream: `{stream_prefix}:stream{dlq_stream_suffix}`.
    pub fn dlq_stream_name(&self) -> String {
        format!("{}:stream{}", self.stream_prefix, self.dlq_stream_suffix)
    }

    /// The per-message key: `{stream_prefix}:{retry_key_prefix}:{message_id}`.
    pub fn retry_key(&self, message_id: &str) -> String {
        format!(
            "{}:{}:{}",
            self.stream_prefix, self.retry_key_prefix, message_id
        )
    }

    /// Where this bus keeps the last failure reason of a pending entry for this consumer
    /// group: `{stream_prefix}:{retry_key_prefix}:{consumer_group}:{message_id}:error`. Per
    /// group, because every group handles (and may fail) the same entry; apart from the retry
    /// key, which eventsource-py reads as an integer.
    pub fn error_key(&self, message_id: &str) -> String {
        format!(
            "{}:{}:{}:{}:error",
            self.stream_prefix, self.retry_key_prefix, self.consumer_group, message_id
        )
    }

    /// The consumer name in use: the configured one, or `{hostname}-{8 hex}`.
    pub fn effective_consumer_name(&self) -> String {
        self.consumer_name
            .clone()
            .unwrap_or_else(default_consumer_name)
    }
}

/// `{hostname}-{8 random hex chars}`, as eventsource-py names consumers.
pub(crate) fn default_consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{:08x}", fastrand::u32(..))
}

//! Every option of the bus, with the tutorial's names and defaults, validation that names the
//! bad field, the derived key names, and loading from environment variables.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration was refused. Always names the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid RedisEventBusConfig.{field}: {reason}")]
pub struct ConfigError {
    /// The option's name, as in [`RedisEventBusConfig`].
    pub field: &'static str,
    /// What is wrong and what would be right.
    pub reason: String,
}

impl ConfigError {
    fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

/// Configuration of a [`RedisEventBus`](crate::RedisEventBus).
///
/// Option names and defaults are those of eventsource-py's `RedisEventBusConfig`, so its
/// examples translate line by line. Build with struct update syntax and let the bus validate:
/// ```
/// use eventsource_redis::RedisEventBusConfig;
/// let config = RedisEventBusConfig {
///     stream_prefix: "orders".into(),
///     consumer_group: "projections".into(),
///     ..RedisEventBusConfig::default()
/// };
/// config.validate().unwrap();
/// assert_eq!(config.stream_name(), "orders:stream");
/// assert_eq!(config.dlq_stream_name(), "orders:stream_dlq");
/// assert_eq!(config.retry_key("1-0"), "orders:retry:1-0");
/// assert_eq!(config.error_key("1-0"), "orders:retry:projections:1-0:error");
/// ```
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisEventBusConfig {
    /// Redis URL, `redis://[user:password@]host:port[/db]` (or `rediss://`). Default
    /// `redis://localhost:6379`. A password in it never appears in Debug output or logs.
    pub redis_url: String,
    /// Response timeout of ordinary commands (publish, ack, claim, info), in seconds.
    /// Default 5. A command that takes longer fails with a timeout instead of hanging.
    pub socket_timeout: f64,
    /// Timeout of establishing a connection, in seconds. Default 5.
    pub socket_connect_timeout: f64,
    /// TLS (`rediss://` URLs; feature `tls`): a PEM file of CA certificates to trust instead
    /// of the system's (a managed Redis's or your own CA). Default: the system's roots.
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// TLS: this client's certificate (PEM), for a server that requires one
    /// (`tls-auth-clients yes`); set `tls_key_file` with it.
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// TLS: the private key (PEM) of `tls_cert_file`.
    pub tls_key_file: Option<std::path::PathBuf>,
    /// TLS without verifying the server's certificate. For development against a self-signed
    /// server only: anyone on the path can read and change the traffic. Default false.
    pub tls_insecure: bool,
    /// Accepted for compatibility. The bus always uses one multiplexed connection for
    /// commands; the blocking read has its own, because a blocking read on the publishing
    /// connection would stall every publish behind it. Default false.
    pub single_connection_client: bool,
    /// Prefix of every key of this bus: `{prefix}:stream`, its DLQ and retry keys.
    /// Default `events`.
    pub stream_prefix: String,
    /// Consumer group: every group receives every event; inside a group each event goes to
    /// one consumer. Default `default`.
    pub consumer_group: String,
    /// This consumer's name inside the group. Default `{hostname}-{8 hex}`; give a stable
    /// name to a restarting worker so it drains its own pending entries first.
    pub consumer_name: Option<String>,
    /// Entries per XREADGROUP (eventsource-py now calls it `stream_read_count`; both names
    /// are accepted when deserialising). Bounds the messages in flight per consumer.
    /// Default 100.
    #[serde(alias = "stream_read_count")]
    pub batch_size: usize,
    /// How long one XREADGROUP blocks waiting for new entries, in milliseconds. Must be below
    /// `socket_timeout` so an idle consumer never sees timeouts. Default **2000** — the one
    /// default that differs from eventsource-py (5000, equal to its socket timeout, which
    /// makes its idle consumers log timeouts).
    pub block_ms: u64,
    /// Retries after the first attempt before an entry is dead-lettered: an entry is handled
    /// at most `1 + max_retries` times. Default 3.
    pub max_retries: u32,
    /// Dead-letter entries that exhausted their retries (or cannot be decoded). When false
    /// they are acknowledged and dropped with an error log and a counter. Default true.
    pub enable_dlq: bool,
    /// DLQ stream suffix: `{prefix}:stream{suffix}`. Default `_dlq`.
    pub dlq_stream_suffix: String,
    /// How long an entry must sit unacknowledged before recovery claims it, in milliseconds.
    /// Default 60000.
    pub pending_idle_ms: u64,
    /// Middle part of the per-message keys: `{prefix}:{retry_key_prefix}:{message id}`.
    /// This bus keeps the last failure reason under `{that key}:error` so the dead letter can
    /// state it. Default `retry`.
    pub retry_key_prefix: String,
    /// Expiry of those keys, in seconds. Default 86400.
    pub retry_key_expiry_seconds: u64,
    /// Emit tracing spans (publish, process, handle) and carry W3C trace context in entries.
    /// Default true.
    pub enable_tracing: bool,
    /// How often the consumer runs pending recovery by itself, in milliseconds; 0 turns it
    /// off (then call `recover_pending_messages` yourself). Default 30000.
    pub recovery_interval_ms: u64,
    /// How often a consuming bus refreshes its gauges (pending entries, group lag,
    /// dead-letter depth; feature `metrics`), in milliseconds; 0 turns it off. Default 10000.
    pub metrics_interval_ms: u64,
    /// Recovery also removes other consumers of the group that have nothing pending and have
    /// been idle longer than this, in milliseconds, so restarts with generated names do not
    /// grow the consumer list forever. A consumer holding pending entries is never removed (the
    /// check and the removal are one atomic script). 0 = never. Default 86400000 (one day).
    pub prune_idle_consumers_ms: u64,
    /// Remember the ids of the last N events this consumer handled successfully and skip an
    /// entry carrying one of them again (acked, counted as `duplicates_skipped`): duplicates
    /// from a republish after an indeterminate publish, or a redelivery whose ack was lost.
    /// Only within this consumer process; handlers should still be idempotent. 0 = off
    /// (the default).
    pub dedupe_window: usize,
    /// Messages one consumer handles at the same time. 1 (the default) handles a batch
    /// strictly in stream order, one entry after the other. N > 1 runs up to N entries of a
    /// batch concurrently while entries of the same aggregate (same `aggregate_id`) still run
    /// one after the other in stream order; the next batch is read when the whole batch is
    /// done. Useful for I/O-bound handlers.
    pub handler_concurrency: usize,
    /// Longest wait between reconnection attempts, in milliseconds (backoff doubles from
    /// 100 ms up to this, with jitter). Problems an operator must fix (a missing ACL
    /// permission, a wrong password) are retried at this interval. Default 5000.
    pub reconnect_max_delay_ms: u64,
    /// Largest entry (sum of field and value bytes) the consumer reads into memory. A larger
    /// entry is not held: it is dead-lettered (Redis copies it to the DLQ) with a reason
    /// naming this limit. Default 16 MiB.
    pub max_entry_bytes: usize,
    /// What to do with an entry whose data this version of its registered Rust type rejects
    /// (a new required field, a changed type: typically a bad deploy). Default
    /// [`RejectedPolicy::Retry`].
    pub on_rejected: RejectedPolicy,
    /// With [`RejectedPolicy::Retry`]: after this many rejected entries in a row (none
    /// decoding in between) the consumer pauses — it stops reading and recovering, reports
    /// unhealthy with the reason, and leaves the entries pending — so a bad deploy does not
    /// drain the stream into the DLQ and a rollback continues where it stopped. 0 = never
    /// pause. Default 10.
    pub pause_after_rejections: u32,
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

impl Default for RedisEventBusConfig {
    fn default() -> Self {
        Self {
            redis_url: "redis://localhost:6379".into(),
            socket_timeout: 5.0,
            socket_connect_timeout: 5.0,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            tls_insecure: false,
            single_connection_client: false,
            stream_prefix: "events".into(),
            consumer_group: "default".into(),
            consumer_name: None,
            batch_size: 100,
            block_ms: 2000,
            max_retries: 3,
            enable_dlq: true,
            dlq_stream_suffix: "_dlq".into(),
            pending_idle_ms: 60_000,
            retry_key_prefix: "retry".into(),
            retry_key_expiry_seconds: 86_400,
            enable_tracing: true,
            recovery_interval_ms: 30_000,
            metrics_interval_ms: 10_000,
            handler_concurrency: 1,
            dedupe_window: 0,
            prune_idle_consumers_ms: 86_400_000,
            reconnect_max_delay_ms: 5_000,
            max_entry_bytes: 16 * 1024 * 1024,
            on_rejected: RejectedPolicy::Retry,
            pause_after_rejections: 10,
        }
    }
}

impl fmt::Debug for RedisEventBusConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisEventBusConfig")
            .field("redis_url", &redact_url(&self.redis_url))
            .field("socket_timeout", &self.socket_timeout)
            .field("socket_connect_timeout", &self.socket_connect_timeout)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("tls_insecure", &self.tls_insecure)
            .field("single_connection_client", &self.single_connection_client)
            .field("stream_prefix", &self.stream_prefix)
            .field("consumer_group", &self.consumer_group)
            .field("consumer_name", &self.consumer_name)
            .field("batch_size", &self.batch_size)
            .field("block_ms", &self.block_ms)
            .field("max_retries", &self.max_retries)
            .field("enable_dlq", &self.enable_dlq)
            .field("dlq_stream_suffix", &self.dlq_stream_suffix)
            .field("pending_idle_ms", &self.pending_idle_ms)
            .field("retry_key_prefix", &self.retry_key_prefix)
            .field("retry_key_expiry_seconds", &self.retry_key_expiry_seconds)
            .field("enable_tracing", &self.enable_tracing)
            .field("recovery_interval_ms", &self.recovery_interval_ms)
            .field("metrics_interval_ms", &self.metrics_interval_ms)
            .field("handler_concurrency", &self.handler_concurrency)
            .field("dedupe_window", &self.dedupe_window)
            .field("prune_idle_consumers_ms", &self.prune_idle_consumers_ms)
            .field("reconnect_max_delay_ms", &self.reconnect_max_delay_ms)
            .field("max_entry_bytes", &self.max_entry_bytes)
            .field("on_rejected", &self.on_rejected)
            .field("pause_after_rejections", &self.pause_after_rejections)
            .finish()
    }
}

/// `redis://user:secret@host` → `redis://user:***@host`; URLs without a password unchanged.
///
/// Parsed with the `url` crate, so a password holding `/`, `?`, `#` or `@` (percent-encoded
/// as it must be, or not) never leaks; `redis://secret@host` (a password where the user
/// would be) becomes `redis://***@host`; a `pass`/`password` query parameter (Unix socket
/// URLs) is replaced too. A URL that does not parse keeps only its scheme and what follows
/// its last `@`.
pub fn redact_url(url: &str) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}***{}", &url[..scheme + 3], &url[at..])
            }
            (None, Some(at)) => format!("***{}", &url[at..]),
            _ => url.to_owned(),
        };
    };
    if parsed.password().is_some() {
        let _ = parsed.set_password(Some("***"));
    } else if !parsed.username().is_empty() {
        let _ = parsed.set_username("***");
    }
    let secret_query = parsed
        .query_pairs()
        .any(|(k, _)| k == "pass" || k == "password");
    if secret_query {
        let pairs: Vec<(String, String)> = parsed
            .query_pairs()
            .map(|(k, v)| {
                let v = if k == "pass" || k == "password" {
                    "***".to_owned()
                } else {
                    v.into_owned()
                };
                (k.into_owned(), v)
            })
            .collect();
        parsed.query_pairs_mut().clear().extend_pairs(pairs);
    }
    parsed.to_string()
}

fn non_empty(field: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::new(field, "must not be empty"));
    }
    if value.chars().any(char::is_whitespace) {
        return Err(ConfigError::new(
            field,
            format!("{value:?} must not contain whitespace"),
        ));
    }
    Ok(())
}

fn positive_secs(field: &'static str, value: f64) -> Result<(), ConfigError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(ConfigError::new(
            field,
            format!("{value} must be a positive number of seconds"),
        ));
    }
    Ok(())
}

impl RedisEventBusConfig {
    /// Checks every option; the bus calls this when it is built.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first bad field: an unparsable URL, an empty prefix, group,
    /// consumer name, DLQ suffix or retry key prefix, a zero batch size, block time, idle
    /// time or expiry, non-positive timeouts, or a block time not below the socket timeout.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.redis_url.starts_with("redis://")
            || self.redis_url.starts_with("rediss://")
            || self.redis_url.starts_with("unix://")
            || self.redis_url.starts_with("redis+unix://"))
        {
            return Err(ConfigError::new(
                "redis_url",
                format!(
                    "{:?} must start with redis://, rediss:// or unix://",
                    redact_url(&self.redis_url)
                ),
            ));
        }
        self.client()?;
        positive_secs("socket_timeout", self.socket_timeout)?;
        positive_secs("socket_connect_timeout", self.socket_connect_timeout)?;
        non_empty("stream_prefix", &self.stream_prefix)?;
        non_empty("consumer_group", &self.consumer_group)?;
        if let Some(name) = &self.consumer_name {
            non_empty("consumer_name", name)?;
        }
        if self.batch_size == 0 {
            return Err(ConfigError::new("batch_size", "must be at least 1"));
        }
        if self.batch_size > 10_000 {
            return Err(ConfigError::new(
                "batch_size",
                format!(
                    "{} is above the limit of 10000 entries per read",
                    self.batch_size
                ),
            ));
        }
        if self.block_ms == 0 {
            return Err(ConfigError::new(
                "block_ms",
                "must be at least 1 (0 would block forever and the consumer could not stop)",
            ));
        }
        if self.block_ms as f64 >= self.socket_timeout * 1000.0 {
            return Err(ConfigError::new(
                "block_ms",
                format!(
                    "{} ms must be below socket_timeout ({} s), or idle reads would time out",
                    self.block_ms, self.socket_timeout
                ),
            ));
        }
        non_empty("dlq_stream_suffix", &self.dlq_stream_suffix)?;
        if self.pending_idle_ms == 0 {
            return Err(ConfigError::new(
                "pending_idle_ms",
                "must be at least 1 (0 would claim entries other consumers are handling)",
            ));
        }
        non_empty("retry_key_prefix", &self.retry_key_prefix)?;
        if self.retry_key_expiry_seconds == 0 {
            return Err(ConfigError::new(
                "retry_key_expiry_seconds",
                "must be at least 1",
            ));
        }
        if self.handler_concurrency == 0 || self.handler_concurrency > 1024 {
            return Err(ConfigError::new(
                "handler_concurrency",
                format!("{} must be between 1 and 1024", self.handler_concurrency),
            ));
        }
        if self.dedupe_window > 10_000_000 {
            return Err(ConfigError::new(
                "dedupe_window",
                format!(
                    "{} is above the limit of 10000000 remembered ids",
                    self.dedupe_window
                ),
            ));
        }
        if self.reconnect_max_delay_ms < 100 {
            return Err(ConfigError::new(
                "reconnect_max_delay_ms",
                "must be at least 100",
            ));
        }
        if self.max_entry_bytes < 1024 {
            return Err(ConfigError::new(
                "max_entry_bytes",
                format!("{} must be at least 1024", self.max_entry_bytes),
            ));
        }
        Ok(())
    }

    /// The redis-rs client for this configuration: the URL, and for `rediss://` the TLS
    /// options (CA file, client certificate and key, insecure mode).
    ///
    /// # Errors
    /// [`ConfigError`] naming the field: an unparsable URL, TLS options without a
    /// `rediss://` URL, a certificate file that cannot be read, a certificate without its key,
    /// or `rediss://` without the `tls` feature.
    pub fn client(&self) -> Result<redis::Client, ConfigError> {
        let tls = self.redis_url.starts_with("rediss://");
        for (field, set) in [
            ("tls_ca_file", self.tls_ca_file.is_some()),
            ("tls_cert_file", self.tls_cert_file.is_some()),
            ("tls_key_file", self.tls_key_file.is_some()),
            ("tls_insecure", self.tls_insecure),
        ] {
            if set && !tls {
                return Err(ConfigError::new(
                    field,
                    "applies to TLS only: use a rediss:// URL",
                ));
            }
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err(ConfigError::new(
                if self.tls_cert_file.is_some() {
                    "tls_key_file"
                } else {
                    "tls_cert_file"
                },
                "a client certificate needs both tls_cert_file and tls_key_file",
            ));
        }
        let unparsable = |e: redis::RedisError| {
            ConfigError::new(
                "redis_url",
                format!("{:?} does not parse: {e}", redact_url(&self.redis_url)),
            )
        };
        if !tls {
            return redis::Client::open(self.redis_url.as_str()).map_err(unparsable);
        }
        #[cfg(not(feature = "tls"))]
        {
            Err(ConfigError::new(
                "redis_url",
                "rediss:// (TLS) needs the `tls` feature of eventsource-redis: \
                 `cargo add eventsource-redis --features tls`",
            ))
        }
        #[cfg(feature = "tls")]
        {
            let mut url = self.redis_url.clone();
            if self.tls_insecure && !url.contains("#insecure") {
                url.push_str("#insecure");
            }
            let read = |field: &'static str, path: &std::path::Path| {
                std::fs::read(path).map_err(|e| {
                    ConfigError::new(field, format!("cannot read {}: {e}", path.display()))
                })
            };
            if self.tls_ca_file.is_none() && self.tls_cert_file.is_none() {
                return redis::Client::open(url.as_str()).map_err(unparsable);
            }
            let root_cert = match &self.tls_ca_file {
                Some(path) => Some(read("tls_ca_file", path)?),
                None => None,
            };
            let client_tls = match (&self.tls_cert_file, &self.tls_key_file) {
                (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
                    client_cert: read("tls_cert_file", cert)?,
                    client_key: read("tls_key_file", key)?,
                }),
                _ => None,
            };
            redis::Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls,
                    root_cert,
                },
            )
            .map_err(|e| {
                ConfigError::new(
                    if self.tls_cert_file.is_some() {
                        "tls_cert_file"
                    } else {
                        "tls_ca_file"
                    },
                    format!("the TLS files do not load: {e}"),
                )
            })
        }
    }

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

    pub(crate) fn socket_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.socket_timeout)
    }

    pub(crate) fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.socket_connect_timeout)
    }

    /// Reads options from environment variables named `EVENTSOURCE_REDIS_<OPTION>` in upper
    /// case (`EVENTSOURCE_REDIS_URL` for `redis_url`, `EVENTSOURCE_REDIS_STREAM_PREFIX`, ...;
    /// `..._STREAM_READ_COUNT` is accepted for `batch_size`). Unset variables keep defaults.
    ///
    /// # Errors
    /// [`ConfigError`] naming the option whose variable does not parse, or any validation
    /// error.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// As [`from_env`](Self::from_env), reading variables through `lookup` (for tests and
    /// other sources).
    ///
    /// # Errors
    /// As [`from_env`](Self::from_env).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let mut c = Self::default();
        let get = |option: &str| lookup(&format!("EVENTSOURCE_REDIS_{}", option.to_uppercase()));
        fn parse<T: std::str::FromStr>(
            field: &'static str,
            raw: Option<String>,
        ) -> Result<Option<T>, ConfigError>
        where
            T::Err: fmt::Display,
        {
            raw.map(|s| {
                s.trim().parse::<T>().map_err(|e| {
                    ConfigError::new(
                        field,
                        format!("environment value {s:?} does not parse: {e}"),
                    )
                })
            })
            .transpose()
        }
        if let Some(v) = get("url").or_else(|| get("redis_url")) {
            c.redis_url = v;
        }
        if let Some(v) = parse("socket_timeout", get("socket_timeout"))? {
            c.socket_timeout = v;
        }
        if let Some(v) = parse("socket_connect_timeout", get("socket_connect_timeout"))? {
            c.socket_connect_timeout = v;
        }
        if let Some(v) = get("tls_ca_file") {
            c.tls_ca_file = Some(v.into());
        }
        if let Some(v) = get("tls_cert_file") {
            c.tls_cert_file = Some(v.into());
        }
        if let Some(v) = get("tls_key_file") {
            c.tls_key_file = Some(v.into());
        }
        if let Some(v) = parse("tls_insecure", get("tls_insecure"))? {
            c.tls_insecure = v;
        }
        if let Some(v) = parse("single_connection_client", get("single_connection_client"))? {
            c.single_connection_client = v;
        }
        if let Some(v) = get("stream_prefix") {
            c.stream_prefix = v;
        }
        if let Some(v) = get("consumer_group") {
            c.consumer_group = v;
        }
        if let Some(v) = get("consumer_name") {
            c.consumer_name = Some(v);
        }
        if let Some(v) = parse(
            "batch_size",
            get("batch_size").or_else(|| get("stream_read_count")),
        )? {
            c.batch_size = v;
        }
        if let Some(v) = parse("block_ms", get("block_ms"))? {
            c.block_ms = v;
        }
        if let Some(v) = parse("max_retries", get("max_retries"))? {
            c.max_retries = v;
        }
        if let Some(v) = parse("enable_dlq", get("enable_dlq"))? {
            c.enable_dlq = v;
        }
        if let Some(v) = get("dlq_stream_suffix") {
            c.dlq_stream_suffix = v;
        }
        if let Some(v) = parse("pending_idle_ms", get("pending_idle_ms"))? {
            c.pending_idle_ms = v;
        }
        if let Some(v) = get("retry_key_prefix") {
            c.retry_key_prefix = v;
        }
        if let Some(v) = parse("retry_key_expiry_seconds", get("retry_key_expiry_seconds"))? {
            c.retry_key_expiry_seconds = v;
        }
        if let Some(v) = parse("enable_tracing", get("enable_tracing"))? {
            c.enable_tracing = v;
        }
        if let Some(v) = parse("recovery_interval_ms", get("recovery_interval_ms"))? {
            c.recovery_interval_ms = v;
        }
        if let Some(v) = parse("metrics_interval_ms", get("metrics_interval_ms"))? {
            c.metrics_interval_ms = v;
        }
        if let Some(v) = parse("prune_idle_consumers_ms", get("prune_idle_consumers_ms"))? {
            c.prune_idle_consumers_ms = v;
        }
        if let Some(v) = parse("dedupe_window", get("dedupe_window"))? {
            c.dedupe_window = v;
        }
        if let Some(v) = parse("handler_concurrency", get("handler_concurrency"))? {
            c.handler_concurrency = v;
        }
        if let Some(v) = parse("reconnect_max_delay_ms", get("reconnect_max_delay_ms"))? {
            c.reconnect_max_delay_ms = v;
        }
        if let Some(v) = parse("max_entry_bytes", get("max_entry_bytes"))? {
            c.max_entry_bytes = v;
        }
        if let Some(v) = parse("on_rejected", get("on_rejected"))? {
            c.on_rejected = v;
        }
        if let Some(v) = parse("pause_after_rejections", get("pause_after_rejections"))? {
            c.pause_after_rejections = v;
        }
        c.validate()?;
        Ok(c)
    }
}

/// `{hostname}-{8 random hex chars}`, as eventsource-py names consumers.
pub fn default_consumer_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{:08x}", fastrand::u32(..))
}

//! Validation: every option checked when a bus is built, the first bad field named.

use super::*;

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

fn positive(field: &'static str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        return Err(ConfigError::new(field, "must be longer than zero"));
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
        positive("socket_timeout", self.socket_timeout)?;
        positive("socket_connect_timeout", self.socket_connect_timeout)?;
        // Beyond a year a duration is a mistake, and sums of them (a read's timeout is
        // `block + socket_timeout`) or Redis's own limits (EXPIRE in seconds) would overflow.
        for (field, value) in [
            ("socket_timeout", self.socket_timeout),
            ("socket_connect_timeout", self.socket_connect_timeout),
            ("block", self.block),
            ("pending_idle", self.pending_idle),
            ("retry_key_expiry", self.retry_key_expiry),
            ("recovery_interval", self.recovery_interval),
            ("metrics_interval", self.metrics_interval),
            ("prune_idle_consumers", self.prune_idle_consumers),
            ("reconnect_max_delay", self.reconnect_max_delay),
            ("publish_replicas_timeout", self.publish_replicas_timeout),
            ("partition_lease", self.partition_lease),
        ] {
            if value > MAX_DURATION {
                return Err(ConfigError::new(
                    field,
                    format!("{value:?} is above the limit of 365 days"),
                ));
            }
        }
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
        if self.block < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "block",
                "must be at least 1 ms (0 would block forever and the consumer could not stop)",
            ));
        }
        if self.block >= self.socket_timeout {
            return Err(ConfigError::new(
                "block",
                format!(
                    "{:?} must be below socket_timeout ({:?}), or idle reads would time out",
                    self.block, self.socket_timeout
                ),
            ));
        }
        non_empty("dlq_stream_suffix", &self.dlq_stream_suffix)?;
        if self.pending_idle < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "pending_idle",
                "must be at least 1 ms (0 would claim entries other consumers are handling)",
            ));
        }
        non_empty("retry_key_prefix", &self.retry_key_prefix)?;
        if self.retry_key_expiry < Duration::from_secs(1) {
            return Err(ConfigError::new(
                "retry_key_expiry",
                "must be at least 1 s (Redis expires keys in whole seconds)",
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
        if self.publish_replicas > 0 && self.publish_replicas_timeout < Duration::from_millis(1) {
            return Err(ConfigError::new(
                "publish_replicas_timeout",
                "must be at least 1 ms when publish_replicas is set (0 would wait for ever)",
            ));
        }
        if self.reconnect_max_delay < Duration::from_millis(100) {
            return Err(ConfigError::new(
                "reconnect_max_delay",
                "must be at least 100 ms",
            ));
        }
        if self.partitions == 0 || self.partitions > 1024 {
            return Err(ConfigError::new(
                "partitions",
                format!("{} must be between 1 and 1024", self.partitions),
            ));
        }
        if self.partition_lease < Duration::from_millis(500) {
            return Err(ConfigError::new(
                "partition_lease",
                "must be at least 500 ms (it is renewed every twentieth of it)",
            ));
        }
        if self.cluster && !self.redis_url.starts_with("redis://") {
            return Err(ConfigError::new(
                "cluster",
                "a cluster is reached over redis:// (TCP, no TLS) in this version",
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
}

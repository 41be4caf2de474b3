//! The error type of the Redis bus.

use crate::config::ConfigError;

/// Why a Redis bus operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RedisBusError {
    /// The configuration is invalid; the message names the field. Fix the configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Redis could not be reached (refused, timed out, DNS...). Is Redis running at that
    /// address? The bus's consumer retries by itself; a caller may retry with backoff.
    #[error("cannot connect to Redis at {url}: {source}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// A Redis command failed or timed out. Transient for timeouts and dropped connections;
    /// for `OOM`, `MISCONF`, `NOPERM` an operator must act.
    #[error("Redis {command} failed: {source}")]
    Command {
        /// The command, e.g. `XADD`.
        command: &'static str,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// An event could not be published (invalid base field, data not an object). Nothing of
    /// the batch was sent.
    #[error("cannot publish event {event_id}: {source}")]
    InvalidEvent {
        /// The event.
        event_id: uuid::Uuid,
        /// What is wrong.
        #[source]
        source: eventsource_core::EventError,
    },
    /// Part of a batch was written and part refused (e.g. Redis ran out of memory mid-batch).
    /// The result of every event is exact: republish only `failed`.
    #[error(
        "{} of {} events published; event {} failed: {}",
        published.len(),
        published.len() + failed.len(),
        failed.first().map(|f| f.0.to_string()).unwrap_or_default(),
        failed.first().map(|f| f.1.to_string()).unwrap_or_default()
    )]
    PartialPublish {
        /// Events written, with their stream ids, in batch order.
        published: Vec<(uuid::Uuid, String)>,
        /// Events refused, with Redis's error, in batch order.
        failed: Vec<(uuid::Uuid, redis::RedisError)>,
    },
    /// `start_consuming` was called while this bus is already consuming.
    #[error("this bus is already consuming; call stop_consuming first")]
    AlreadyConsuming,
}

impl RedisBusError {
    /// Whether retrying later may succeed (connection loss, timeout, Redis loading).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Connect { .. } => true,
            Self::Command { source, .. } => is_connection_error(source),
            Self::PartialPublish { failed, .. } => {
                failed.iter().all(|(_, e)| is_connection_error(e))
            }
            _ => false,
        }
    }
}

/// Whether a Redis error means the connection (not the command) is the problem.
pub(crate) fn is_connection_error(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(e.code(), Some("LOADING" | "MASTERDOWN" | "TRYAGAIN"))
}

/// Whether the error says the consumer group (or the stream) is gone.
pub(crate) fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

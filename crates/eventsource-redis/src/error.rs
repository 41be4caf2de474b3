//! The error type of the Redis bus, and how the consumer classifies what goes wrong.

use eventsource_core::ErrorKind;

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
    /// Redis refused the credentials (wrong password, unknown or disabled user). Not
    /// transient: fix the user and password in `redis_url`.
    #[error(
        "Redis at {url} refused the credentials: {source}; check the user name and password \
         in redis_url (ACL users: `ACL LIST` on the server)"
    )]
    Authentication {
        /// The URL, password redacted.
        url: String,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// The Redis user may not run a command (ACL `NOPERM`). Not transient: grant it.
    #[error(
        "the Redis user {} may not run `{command}`: {source}; grant it with `ACL SETUSER {} \
         +{command}` (the README lists the rules for a publisher, a consumer and an operator)",
        user.as_deref().unwrap_or("default"),
        user.as_deref().unwrap_or("default")
    )]
    NoPermission {
        /// The command (or subcommand, `xgroup|create`) that was refused.
        command: String,
        /// The Redis user, when the URL names one.
        user: Option<String>,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// A Redis command failed or timed out. Transient for timeouts and dropped connections;
    /// for `OOM` and `MISCONF` an operator must act.
    #[error("Redis {command} failed: {source}")]
    Command {
        /// The command, e.g. `XADD`.
        command: &'static str,
        /// The cause.
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered something this bus does not understand (a bug or an incompatible
    /// server).
    #[error("unexpected reply to {command}: {reply}")]
    UnexpectedReply {
        /// The command.
        command: &'static str,
        /// The reply, as debug text.
        reply: String,
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
    /// A batch spanning several partitions of a
    /// [`PartitionedEventBus`](crate::PartitionedEventBus) was written to some partitions
    /// and not (or not wholly) to others. Republish only the failed partitions' events.
    #[error(
        "{} of {} events published; {} partition(s) failed, partition {}: {}",
        published.len(),
        published.len() + failed.iter().map(|f| f.events.len()).sum::<usize>(),
        failed.len(),
        failed.first().map(|f| f.partition).unwrap_or_default(),
        failed.first().map(|f| f.error.to_string()).unwrap_or_default()
    )]
    PartitionsFailed {
        /// Events of the partitions that succeeded, with their stream ids, in batch order.
        published: Vec<(uuid::Uuid, String)>,
        /// Each partition that failed, with its events and its error (which says what of
        /// them was written: `PartialPublish` and `NotReplicated` list theirs; after a timeout
        /// or a dropped connection some may have been).
        failed: Vec<PartitionFailure>,
    },
    /// A [`PartitionedEventBus`](crate::PartitionedEventBus) was configured with another
    /// number of partitions than the stream was created with. Changing it would route an
    /// aggregate's new events to another partition than its old ones (and so to another
    /// consumer, out of order): drain the stream and start under a new `stream_prefix`, or
    /// configure the stored number. Not transient.
    #[error(
        "{key} says the stream has {stored} partition(s), this bus is configured with \
         {configured}: set partitions = {stored} (EVENTSOURCE_REDIS_PARTITIONS={stored}), or \
         drain the stream and start the new partitioning under another stream_prefix"
    )]
    PartitionsChanged {
        /// The key recording the number (`{<prefix>}:partitions`), or the unpartitioned
        /// stream that holds entries.
        key: String,
        /// The number the stream has.
        stored: u32,
        /// The number this bus was configured with.
        configured: u32,
    },
    /// The server is a Redis Cluster node (`cluster_enabled:1`) and the bus was not
    /// configured for a cluster. [`RedisEventBus`](crate::RedisEventBus) keeps
    /// eventsource-py's key names, whose scripts use keys a cluster spreads over hash slots;
    /// a [`PartitionedEventBus`](crate::PartitionedEventBus) with `cluster = true` puts each
    /// partition's keys in one slot. Not transient.
    #[error(
        "Redis at {url} is a Redis Cluster node (cluster_enabled:1): RedisEventBus needs a \
         standalone Redis (its scripts use keys in different hash slots, which a cluster \
         refuses with CROSSSLOT or MOVED); on a cluster use PartitionedEventBus with \
         cluster = true (EVENTSOURCE_REDIS_CLUSTER=true), or point redis_url at a \
         standalone Redis"
    )]
    ClusterNotSupported {
        /// The URL, password redacted.
        url: String,
    },
    /// The events were written on the master, but fewer replicas than `publish_replicas`
    /// confirmed them within `publish_replicas_timeout`: a failover now could lose them.
    /// Republishing is safe for consumers that dedupe by event id (it may duplicate them).
    #[error(
        "{} event(s) written, but confirmed by {replicas} of {wanted} replicas within \
         publish_replicas_timeout; a failover now could lose them (republish if that \
         matters: consumers dedupe by event id; check the replicas: INFO replication)",
        published.len()
    )]
    NotReplicated {
        /// Events written on the master, with their stream ids, in batch order.
        published: Vec<(uuid::Uuid, String)>,
        /// Replicas that confirmed.
        replicas: u32,
        /// Replicas asked for.
        wanted: u32,
    },
    /// `start_consuming` was called while this bus is already consuming; the running
    /// consumer is not affected.
    #[error("this bus is already consuming; call stop_consuming first")]
    AlreadyConsuming,
}

impl RedisBusError {
    /// What kind of failure this is, for retry decisions, logs and metrics without matching
    /// variants or inspecting the redis-rs cause. A partial publish has the kind of its
    /// refusals (`Unavailable` only when every one was a connection failure); a publish over
    /// partitions the first lasting kind among its partitions' errors, else the first one's.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Config(e) => e.kind(),
            // Reaching Redis failed: unavailable unless it refused who we are.
            Self::Connect { source, .. } => match redis_error_kind(source) {
                kind @ (ErrorKind::Authentication | ErrorKind::Permission) => kind,
                _ => ErrorKind::Unavailable,
            },
            Self::Authentication { .. } => ErrorKind::Authentication,
            Self::NoPermission { .. } => ErrorKind::Permission,
            Self::Command { source, .. } => redis_error_kind(source),
            Self::UnexpectedReply { .. } => ErrorKind::Protocol,
            Self::InvalidEvent { .. } => ErrorKind::InvalidInput,
            Self::PartialPublish { failed, .. } => failed
                .iter()
                .map(|(_, e)| redis_error_kind(e))
                .find(|kind| !kind.is_transient())
                .unwrap_or(ErrorKind::Unavailable),
            Self::PartitionsFailed { failed, .. } => failed
                .iter()
                .map(|f| f.error.kind())
                .find(|kind| !kind.is_transient())
                .or_else(|| failed.first().map(|f| f.error.kind()))
                .unwrap_or(ErrorKind::Other),
            Self::AlreadyConsuming => ErrorKind::InvalidState,
            Self::ClusterNotSupported { .. } | Self::PartitionsChanged { .. } => ErrorKind::Config,
            Self::NotReplicated { .. } => ErrorKind::Timeout,
        }
    }

    /// Whether retrying later may succeed (connection loss, timeout, Redis loading): the
    /// kind is `Unavailable` or `Timeout`. Authentication and permission errors are not: an
    /// operator must act; nor are `OOM` / `MISCONF` refusals (`ResourceExhausted`), which
    /// pass only when an operator frees memory or disk.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
}

/// The kind of a redis-rs error: credentials, ACL, a timeout, a connection failure (or a
/// server that is loading, failing over or resharding), a refusal for memory or disk.
pub(crate) fn redis_error_kind(e: &redis::RedisError) -> ErrorKind {
    if is_auth_error(e) {
        ErrorKind::Authentication
    } else if is_permission_error(e) {
        ErrorKind::Permission
    } else if e.is_timeout() {
        ErrorKind::Timeout
    } else if is_connection_error(e) {
        ErrorKind::Unavailable
    } else if matches!(e.code(), Some("OOM" | "MISCONF")) {
        ErrorKind::ResourceExhausted
    } else if is_nogroup(e) {
        ErrorKind::NotFound
    } else {
        ErrorKind::Other
    }
}

/// What keeps a consumer from working, as its health reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    /// Whether it may pass by itself (Redis down, a timeout) or needs an operator.
    pub(crate) transient: bool,
    /// What is wrong and, where known, what to do.
    pub(crate) message: String,
}

impl Problem {
    pub(crate) fn from_bus_error(e: &RedisBusError) -> Self {
        Self {
            transient: e.is_transient(),
            message: crate::codec::error_chain(e),
        }
    }
}

/// Classifies an error line from Redis: (transient, message with what to do).
pub(crate) fn classify_server_text(what: &str, text: &str) -> (bool, String) {
    if text.starts_with("NOPERM") {
        let command = quoted_command(text).unwrap_or("the command");
        (
            false,
            format!(
                "{what}: {text}; the Redis user lacks a permission: grant it with `ACL SETUSER \
                 <user> +{command}` (the README lists the rules for a consumer)"
            ),
        )
    } else if text.starts_with("WRONGPASS")
        || text.starts_with("NOAUTH")
        || text.contains("invalid username-password")
    {
        (
            false,
            format!("{what}: {text}; check the user name and password in redis_url"),
        )
    } else if text.starts_with("OOM") || text.starts_with("MISCONF") {
        (
            false,
            format!(
                "{what}: {text}; Redis refuses writes until an operator frees memory or fixes persistence"
            ),
        )
    } else {
        (true, format!("{what}: {text}"))
    }
}

/// The `'command'` a NOPERM message names.
fn quoted_command(text: &str) -> Option<&str> {
    let start = text.find('\'')? + 1;
    let len = text[start..].find('\'')?;
    Some(&text[start..start + len])
}

/// The command a NOPERM error names, e.g. `xgroup|create`.
pub(crate) fn denied_command(e: &redis::RedisError) -> Option<String> {
    quoted_command(&e.to_string()).map(str::to_owned)
}

/// Whether Redis refused the credentials.
pub(crate) fn is_auth_error(e: &redis::RedisError) -> bool {
    e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"))
}

/// Whether the ACL refused a command.
pub(crate) fn is_permission_error(e: &redis::RedisError) -> bool {
    e.code() == Some("NOPERM")
}

/// Whether a Redis error means the connection (not the command) is the problem.
pub(crate) fn is_connection_error(e: &redis::RedisError) -> bool {
    if is_auth_error(e) || is_permission_error(e) {
        return false;
    }
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || matches!(e.code(), Some("LOADING" | "MASTERDOWN" | "TRYAGAIN"))
}

/// Whether the error says the consumer group (or the stream) is gone.
pub(crate) fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP") || e.to_string().contains("NOGROUP")
}

/// Whether a bus error is a command that timed out.
pub(crate) fn bus_error_is_timeout(e: &RedisBusError) -> bool {
    matches!(e, RedisBusError::Command { source, .. } if source.is_timeout())
}

/// Whether Redis refused a command for lack of memory or disk (`OOM`, `MISCONF`): not
/// transient by itself, but it passes when an operator frees memory or disk.
pub(crate) fn bus_error_is_refusal(e: &RedisBusError) -> bool {
    matches!(e, RedisBusError::Command { source, .. } if matches!(source.code(), Some("OOM" | "MISCONF")))
}

/// As [`is_nogroup`], for a bus error.
pub(crate) fn bus_error_is_nogroup(e: &RedisBusError) -> bool {
    match e {
        RedisBusError::Command { source, .. } => is_nogroup(source),
        _ => false,
    }
}

/// One partition's part of a failed [`RedisBusError::PartitionsFailed`] publish.
#[derive(Debug)]
#[non_exhaustive]
pub struct PartitionFailure {
    /// The partition.
    pub partition: u32,
    /// Its events in the batch, in batch order.
    pub events: Vec<uuid::Uuid>,
    /// Why they were not (all) published.
    pub error: RedisBusError,
}

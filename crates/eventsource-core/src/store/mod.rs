//! The event store contract and the in-memory store.
//!
//! A store keeps one stream per aggregate (aggregate id + aggregate type) and a global order
//! over all events (the *position*, starting at 1). Appends are atomic per batch and guarded by
//! an [`ExpectedVersion`]: a stale expectation is [`StoreError::Concurrency`], never a silent
//! overwrite.

mod memory;

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::error::ErrorKind;
use crate::event::{EventEnvelope, EventError};
use crate::util::BoxFuture;

pub use memory::InMemoryEventStore;

/// What the writer believes the stream's version is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectedVersion {
    /// No check: append after whatever is there (the events' versions must still continue the
    /// stream).
    Any,
    /// The stream must not exist yet (version 0).
    NoStream,
    /// The stream must be at exactly this version.
    Exact(u64),
    /// The stream must exist (version 1 or more), at whatever version.
    StreamExists,
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::NoStream => f.write_str("no stream"),
            Self::Exact(v) => write!(f, "version {v}"),
            Self::StreamExists => f.write_str("an existing stream"),
        }
    }
}

impl ExpectedVersion {
    /// Whether a stream at `actual` satisfies this expectation.
    pub fn matches(self, actual: u64) -> bool {
        match self {
            Self::Any => true,
            Self::NoStream => actual == 0,
            Self::Exact(v) => v == actual,
            Self::StreamExists => actual > 0,
        }
    }
}

/// An event as stored: its global position, when it was stored, and the event.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    /// Global position, 1-based, increasing in commit order.
    pub position: u64,
    /// When the store wrote it.
    pub stored_at: DateTime<Utc>,
    /// The event.
    pub event: EventEnvelope,
}

/// The outcome of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream's version after the append.
    pub new_version: u64,
    /// The global position of the last appended event (the current position for an empty
    /// batch).
    pub last_position: u64,
}

/// Which events a global read returns: those after `after_position`, at most `limit`,
/// optionally filtered.
#[derive(Debug, Clone)]
pub struct ReadAllOptions {
    /// Return events with a position strictly greater than this (0 = from the start).
    pub after_position: u64,
    /// The page size.
    pub limit: usize,
    /// Only this tenant's events.
    pub tenant_id: Option<Uuid>,
    /// Only events of this aggregate type.
    pub aggregate_type: Option<String>,
}

impl Default for ReadAllOptions {
    fn default() -> Self {
        Self {
            after_position: 0,
            limit: 1000,
            tenant_id: None,
            aggregate_type: None,
        }
    }
}

impl ReadAllOptions {
    /// From the start, pages of `limit`.
    pub fn from_start(limit: usize) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Someone else wrote to the stream first. Reload the aggregate and retry the command.
    #[error(
        "concurrency conflict on {aggregate_type} {aggregate_id}: expected {expected}, \
         but the stream is at version {actual}"
    )]
    Concurrency {
        /// The aggregate.
        aggregate_id: Uuid,
        /// Its type.
        aggregate_type: String,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's real version.
        actual: u64,
    },
    /// An event with this id is already stored. A retried append that already succeeded;
    /// safe to treat as done after checking.
    #[error("an event with id {0} is already stored")]
    DuplicateEventId(Uuid),
    /// An event in the batch is invalid or does not belong to the target stream. A bug in
    /// the caller: fix the events.
    #[error("invalid event {event_id} in append: {reason}")]
    InvalidEvent {
        /// The offending event.
        event_id: Uuid,
        /// What is wrong.
        reason: String,
    },
    /// An event's data failed to (de)serialise.
    #[error(transparent)]
    Event(#[from] EventError),
    /// The operation waited too long (for a lock held by another transaction, or for a
    /// connection). Nothing was written; retry later, and look for a stuck transaction if it
    /// persists.
    #[error("event store operation timed out: {0}")]
    Timeout(String),
    /// The connection to the database was lost during the operation (the server restarted,
    /// the backend was terminated, the network dropped). Transient: retry with backoff. Read
    /// operations are safe to retry. An append is all or nothing, but when the connection
    /// dropped after the commit was sent its outcome is unknown: retry it with the same
    /// events (same ids) — if the first attempt committed, the retry fails with
    /// [`StoreError::DuplicateEventId`] or [`StoreError::Concurrency`] and nothing is stored
    /// twice.
    #[error(
        "lost the database connection during {operation}: {source}; retry with backoff (an \
         append retried with the same event ids cannot be stored twice)"
    )]
    ConnectionLost {
        /// What was running, e.g. `append`.
        operation: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The backend failed otherwise (a constraint, a statement error, a refused grant...);
    /// `kind()` says what is known about it. Not transient unless `is_transient()` says so.
    #[error("event store backend error: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// What kind of failure this is (`Backend`: [`ErrorKind::Other`]).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Concurrency { .. } => ErrorKind::Conflict,
            Self::DuplicateEventId(_) => ErrorKind::AlreadyExists,
            Self::InvalidEvent { .. } => ErrorKind::InvalidInput,
            Self::Event(_) => ErrorKind::InvalidData,
            Self::Timeout(_) => ErrorKind::Timeout,
            Self::ConnectionLost { .. } => ErrorKind::Unavailable,
            Self::Backend(_) => ErrorKind::Other,
        }
    }

    /// Whether the same call may succeed later (a timeout, a lost connection): retry with
    /// backoff. A conflict is not transient in this sense — reload, then retry the command.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
}

/// The event store contract. Object-safe: use `Arc<dyn EventStore>`.
pub trait EventStore: Send + Sync {
    /// Appends `events` (all of one aggregate, versions continuing its stream) atomically.
    ///
    /// # Errors
    /// [`StoreError::Concurrency`] when `expected` does not match or the first event's version
    /// is not the stream's next one; [`StoreError::DuplicateEventId`];
    /// [`StoreError::InvalidEvent`] for events of another aggregate or non-contiguous versions.
    fn append<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
        events: &'a [EventEnvelope],
        expected: ExpectedVersion,
    ) -> BoxFuture<'a, Result<AppendResult, StoreError>>;

    /// Reads one aggregate's events with version > `after_version`, in version order.
    ///
    /// # Errors
    /// Backend failures.
    fn read_stream<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
        after_version: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>>;

    /// Reads one page of all events in global order (see [`ReadAllOptions`]).
    ///
    /// A store whose appends run in parallel may hold a just-appended event back from this
    /// feed until every older writing transaction has ended (so that a reader paging by
    /// position never skips an event that commits late); it never skips or reorders one.
    /// To read your own write at once, read its stream.
    ///
    /// # Errors
    /// Backend failures.
    fn read_all<'a>(
        &'a self,
        options: &'a ReadAllOptions,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>>;

    /// The stream's version (0 if it does not exist).
    ///
    /// # Errors
    /// Backend failures.
    fn stream_version<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
    ) -> BoxFuture<'a, Result<u64, StoreError>>;

    /// The highest global position stored (0 when empty).
    ///
    /// # Errors
    /// Backend failures.
    fn current_position(&self) -> BoxFuture<'_, Result<u64, StoreError>>;
}

/// Checks a batch before append: every event valid, of this aggregate, versions contiguous.
/// Returns the first version of the batch (None for an empty batch).
///
/// # Errors
/// [`StoreError::InvalidEvent`] naming the event and the problem.
pub fn check_batch(
    aggregate_id: Uuid,
    aggregate_type: &str,
    events: &[EventEnvelope],
) -> Result<Option<u64>, StoreError> {
    let Some(first) = events.first() else {
        return Ok(None);
    };
    let first_version = first.aggregate_version();
    for (i, event) in events.iter().enumerate() {
        let bad = |reason: String| StoreError::InvalidEvent {
            event_id: event.event_id(),
            reason,
        };
        event.validate().map_err(|e| bad(e.to_string()))?;
        if event.aggregate_id() != aggregate_id || event.aggregate_type() != aggregate_type {
            return Err(bad(format!(
                "belongs to {} {}, not to the target stream {aggregate_type} {aggregate_id}",
                event.aggregate_type(),
                event.aggregate_id()
            )));
        }
        if event.aggregate_version() != first_version + i as u64 {
            return Err(bad(format!(
                "version {} breaks the batch sequence (expected {})",
                event.aggregate_version(),
                first_version + i as u64
            )));
        }
    }
    Ok(Some(first_version))
}

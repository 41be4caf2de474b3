//! The dead-letter queue: list, inspect, replay; and reading the main stream's history.

use redis::Value;
use serde::Serialize;

use crate::bus::RedisEventBus;
use crate::codec::{self, StreamEntry};
use crate::error::RedisBusError;
use crate::scripts;

/// One dead letter: its id in the DLQ stream and its fields (the original entry's, then
/// `original_message_id`, `retry_count`, `dlq_timestamp`, and from this bus `error` and
/// `consumer_group`), byte for byte as Redis holds them.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DlqMessage {
    /// The id in the DLQ stream (what [`RedisEventBus::replay_dlq_message`] takes).
    pub message_id: String,
    /// The fields, in order, as bytes.
    pub fields: Vec<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for DlqMessage {
    /// Fields as text (invalid UTF-8 shown as U+FFFD).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DlqMessage")
            .field("message_id", &self.message_id)
            .field("data", &self.fields_lossy())
            .finish()
    }
}

impl Serialize for DlqMessage {
    /// `{"message_id": ..., "data": [[field, value], ...]}`, bytes that are not UTF-8 shown
    /// as U+FFFD.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("DlqMessage", 2)?;
        st.serialize_field("message_id", &self.message_id)?;
        st.serialize_field("data", &self.fields_lossy())?;
        st.end()
    }
}

impl DlqMessage {
    pub(crate) fn from_entry(entry: StreamEntry) -> Self {
        Self {
            message_id: entry.id,
            fields: entry.fields,
        }
    }

    /// A field's value as text (`msg.get("event_type")`, `msg.get("retry_count")`, ...);
    /// `None` when absent or not valid UTF-8.
    pub fn get(&self, field: &str) -> Option<&str> {
        self.get_bytes(field)
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// A field's raw value.
    pub fn get_bytes(&self, field: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k.as_slice() == field.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The fields as text, invalid UTF-8 replaced by U+FFFD (for display).
    pub fn fields_lossy(&self) -> Vec<(String, String)> {
        self.fields
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect()
    }

    /// The wire name of the dead-lettered event.
    pub fn event_type(&self) -> Option<&str> {
        self.get("event_type")
    }

    /// The entry's id in the main stream when it was dead-lettered.
    pub fn original_message_id(&self) -> Option<&str> {
        self.get("original_message_id")
    }

    /// Retries done before dead-lettering.
    pub fn retry_count(&self) -> Option<u64> {
        self.get("retry_count").and_then(|s| s.parse().ok())
    }

    /// Why it was dead-lettered (absent in dead letters written by eventsource-py).
    pub fn error(&self) -> Option<&str> {
        self.get("error")
    }

    /// The consumer group that gave up on it (absent in eventsource-py's dead letters).
    pub fn consumer_group(&self) -> Option<&str> {
        self.get("consumer_group")
    }
}

/// What [`RedisEventBus::replay_dlq_message_scoped`] did with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ReplayOutcome {
    /// Put back on the main stream under this new id, and removed from the DLQ.
    Replayed {
        /// The new entry's id in the main stream.
        new_id: String,
    },
    /// No dead letter has this id (already replayed or purged, perhaps by someone else).
    Missing,
    /// It belongs to another consumer group than the scope; left alone.
    OtherGroup {
        /// The group that dead-lettered it (empty for eventsource-py's dead letters).
        group: String,
    },
}

impl RedisEventBus {
    /// The oldest `count` dead letters.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails (unlike eventsource-py, which returns an empty list).
    pub async fn dlq_messages(&self, count: usize) -> Result<Vec<DlqMessage>, RedisBusError> {
        self.dlq_messages_range("-", "+", count).await
    }

    /// eventsource-py's name for [`dlq_messages`](Self::dlq_messages).
    ///
    /// # Errors
    /// As [`dlq_messages`](Self::dlq_messages).
    pub async fn get_dlq_messages(&self, count: usize) -> Result<Vec<DlqMessage>, RedisBusError> {
        self.dlq_messages(count).await
    }

    /// eventsource-py's name for [`dlq_messages_range`](Self::dlq_messages_range).
    ///
    /// # Errors
    /// As [`dlq_messages_range`](Self::dlq_messages_range).
    pub async fn get_dlq_messages_range(
        &self,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<DlqMessage>, RedisBusError> {
        self.dlq_messages_range(start, end, count).await
    }

    /// Dead letters with ids in `[start, end]` (`-` and `+` for the ends), at most `count`.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn dlq_messages_range(
        &self,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<DlqMessage>, RedisBusError> {
        let entries = self
            .range(&self.inner.dlq_stream, start, end, count)
            .await?;
        Ok(entries.into_iter().map(DlqMessage::from_entry).collect())
    }

    /// Puts a dead letter back on the main stream (a new id, the original bytes) and removes
    /// it from the DLQ, in one script: of two operators replaying the same dead letter, one
    /// republishes it and the other finds it gone. Returns false when no dead letter has this
    /// id.
    ///
    /// Only the consumer group that dead-lettered it handles it again: the replayed entry
    /// carries `replay_group`, and this bus's consumers in other groups acknowledge and skip
    /// it (counted as `events_skipped_other_group`). eventsource-py consumers ignore that
    /// field, so Python groups on the same stream do see the replay. A dead letter without a
    /// group (written by eventsource-py) is replayed to every group.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails; the dead letter is then still in the DLQ.
    pub async fn replay_dlq_message(&self, message_id: &str) -> Result<bool, RedisBusError> {
        Ok(matches!(
            self.replay_dlq_message_scoped(message_id, None).await?,
            ReplayOutcome::Replayed { .. }
        ))
    }

    /// As [`replay_dlq_message`](Self::replay_dlq_message), touching the dead letter only if
    /// it belongs to `group` (when given).
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn replay_dlq_message_scoped(
        &self,
        message_id: &str,
        group: Option<&str>,
    ) -> Result<ReplayOutcome, RedisBusError> {
        let mut conn = self.commands().await?;
        let reply: Vec<Value> = scripts::REPLAY
            .key(&self.inner.dlq_stream)
            .key(&self.inner.stream)
            .arg(message_id)
            .arg(group.unwrap_or(""))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.command_error("EVALSHA (replay)", e))?;
        let mut parts = reply.into_iter();
        let outcome = match parts.next() {
            Some(Value::Int(2)) => ReplayOutcome::Replayed {
                new_id: parts.next().and_then(codec::into_text).unwrap_or_default(),
            },
            Some(Value::Int(1)) => ReplayOutcome::OtherGroup {
                group: parts.next().and_then(codec::into_text).unwrap_or_default(),
            },
            _ => ReplayOutcome::Missing,
        };
        if let ReplayOutcome::Replayed { new_id } = &outcome {
            tracing::info!(dlq_id = %message_id, %new_id, "dead letter replayed");
        }
        Ok(outcome)
    }

    /// Entries of the main stream with ids in `[start, end]`, at most `count` — for replaying
    /// history into a new projection (the tutorial's "Pattern 3"). Page with
    /// [`replay_history`](Self::replay_history) for whole streams.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn read_stream_range(
        &self,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<StreamEntry>, RedisBusError> {
        self.range(&self.inner.stream, start, end, count).await
    }

    /// Reads the whole main stream from the beginning in pages of `page_size` and hands every
    /// decodable event, in stream order, to `apply`. Entries that do not decode (malformed or
    /// unregistered) are skipped and counted in the returned summary. Does not touch consumer
    /// groups: nothing is acknowledged or claimed.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails; an error from `apply` stops the replay and is
    /// returned as [`HistoryError::Apply`].
    pub async fn replay_history<F, Fut, E>(
        &self,
        page_size: usize,
        mut apply: F,
    ) -> Result<HistorySummary, HistoryError<E>>
    where
        F: FnMut(eventsource_core::EventEnvelope) -> Fut,
        Fut: std::future::Future<Output = Result<(), E>>,
    {
        let page_size = page_size.max(1);
        let mut summary = HistorySummary::default();
        let mut start = "-".to_owned();
        loop {
            let entries = self
                .range(&self.inner.stream, &start, "+", page_size)
                .await
                .map_err(HistoryError::Redis)?;
            for entry in &entries {
                match codec::decode_entry(entry, &self.inner.registry) {
                    Ok(event) => {
                        apply(event).await.map_err(HistoryError::Apply)?;
                        summary.applied += 1;
                    }
                    Err(codec::DecodeFailure::Unregistered(_)) => summary.skipped_unregistered += 1,
                    Err(codec::DecodeFailure::Malformed(_)) => summary.skipped_malformed += 1,
                    Err(codec::DecodeFailure::Rejected { .. }) => summary.skipped_rejected += 1,
                }
            }
            match entries.last() {
                Some(last) if entries.len() == page_size => start = format!("({}", last.id),
                _ => break,
            }
        }
        Ok(summary)
    }

    pub(crate) async fn range(
        &self,
        stream: &str,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<StreamEntry>, RedisBusError> {
        let mut conn = self.commands().await?;
        let reply: Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.command_error("XRANGE", e))?;
        Ok(codec::parse_range(reply))
    }
}

/// What [`RedisEventBus::replay_history`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HistorySummary {
    /// Events handed to the callback.
    pub applied: u64,
    /// Entries whose wire name is not registered.
    pub skipped_unregistered: u64,
    /// Entries that do not decode.
    pub skipped_malformed: u64,
    /// Entries whose data this version of their registered type rejects.
    pub skipped_rejected: u64,
}

/// Why a history replay stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HistoryError<E> {
    /// Reading from Redis failed.
    #[error(transparent)]
    Redis(RedisBusError),
    /// The callback failed.
    #[error("applying an event failed")]
    Apply(E),
}

impl<E> HistoryError<E> {
    /// Whether the same call may succeed later: a transient Redis failure (see
    /// [`ErrorKind::is_transient`](eventsource_core::ErrorKind::is_transient)).
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
    /// What kind of failure this is: the bus error's kind, or `Other` for the callback's.
    pub fn kind(&self) -> eventsource_core::ErrorKind {
        match self {
            Self::Redis(e) => e.kind(),
            Self::Apply(_) => eventsource_core::ErrorKind::Other,
        }
    }
}

//! The dead-letter queue: list, inspect, replay; and reading the main stream's history.

use redis::Value;
use serde::Serialize;

use crate::bus::RedisEventBus;
use crate::codec::{self, DLQ_FIELDS, REPLAY_GROUP_FIELD, StreamEntry};
use crate::error::RedisBusError;

/// One dead letter: its id in the DLQ stream and its fields (the original entry's, then
/// `original_message_id`, `retry_count`, `dlq_timestamp`, and from this bus `error` and
/// `consumer_group`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DlqMessage {
    /// The id in the DLQ stream (what [`RedisEventBus::replay_dlq_message`] takes).
    pub message_id: String,
    /// The fields, in order.
    pub data: Vec<(String, String)>,
}

impl DlqMessage {
    /// A field's value (`msg.get("event_type")`, `msg.get("retry_count")`, ...).
    pub fn get(&self, field: &str) -> Option<&str> {
        self.data
            .iter()
            .find(|(k, _)| k == field)
            .map(|(_, v)| v.as_str())
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

impl RedisEventBus {
    /// The oldest `count` dead letters.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails (unlike eventsource-py, which returns an empty list).
    pub async fn get_dlq_messages(&self, count: usize) -> Result<Vec<DlqMessage>, RedisBusError> {
        self.get_dlq_messages_range("-", "+", count).await
    }

    /// Dead letters with ids in `[start, end]` (`-` and `+` for the ends), at most `count`.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn get_dlq_messages_range(
        &self,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<DlqMessage>, RedisBusError> {
        let entries = self
            .range(&self.inner.dlq_stream, start, end, count)
            .await?;
        Ok(entries
            .into_iter()
            .map(|e| DlqMessage {
                message_id: e.id,
                data: e.fields,
            })
            .collect())
    }

    /// Puts a dead letter back on the main stream (a new id) and removes it from the DLQ, in
    /// one transaction. Returns false when no dead letter has this id.
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
        let Some(letter) = self
            .range(&self.inner.dlq_stream, message_id, message_id, 1)
            .await?
            .into_iter()
            .next()
        else {
            return Ok(false);
        };
        let group = letter.get("consumer_group").map(str::to_owned);
        let mut pipe = redis::pipe();
        pipe.atomic();
        let cmd = pipe.cmd("XADD").arg(&self.inner.stream).arg("*");
        for (k, v) in &letter.fields {
            if DLQ_FIELDS.contains(&k.as_str()) || k == REPLAY_GROUP_FIELD {
                continue;
            }
            cmd.arg(k).arg(v);
        }
        if let Some(group) = &group {
            cmd.arg(REPLAY_GROUP_FIELD).arg(group);
        }
        pipe.cmd("XDEL").arg(&self.inner.dlq_stream).arg(message_id);
        let mut conn = self.commands().await?;
        let reply: Vec<Value> = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.command_error("XADD (replay)", e))?;
        tracing::info!(dlq_id = %message_id, new_id = ?reply.first(), group = ?group, "dead letter replayed");
        Ok(true)
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
        Ok(codec::parse_range(&reply))
    }
}

/// What [`RedisEventBus::replay_history`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HistorySummary {
    /// Events handed to the callback.
    pub applied: u64,
    /// Entries whose wire name is not registered.
    pub skipped_unregistered: u64,
    /// Entries that do not decode.
    pub skipped_malformed: u64,
}

/// Why a history replay stopped.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError<E> {
    /// Reading from Redis failed.
    #[error(transparent)]
    Redis(RedisBusError),
    /// The callback failed.
    #[error("applying an event failed")]
    Apply(E),
}

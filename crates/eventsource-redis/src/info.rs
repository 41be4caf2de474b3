//! Statistics, stream information and health.

use std::sync::atomic::Ordering;

use redis::Value;
use redis::streams::{StreamInfoGroupsReply, StreamPendingCountReply};
use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::bus::RedisEventBus;
use crate::codec;
use crate::error::RedisBusError;

/// Counters of one bus instance since it was created. The first eight are the tutorial's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct BusStats {
    /// Events written to the stream by this bus.
    pub events_published: u64,
    /// Entries handled and acknowledged: every handler succeeded (or the type is known and has
    /// no handler here) and the acknowledgement reached Redis — eventsource-py's counter, so
    /// waiting for `events_consumed >= events_published` waits for the handlers. See
    /// `events_dispatched` for deliveries given to handlers.
    pub events_consumed: u64,
    /// Deliveries where every handler succeeded.
    pub events_processed_success: u64,
    /// Deliveries where a handler failed or panicked (the entry stayed pending).
    pub events_processed_failed: u64,
    /// Entries that recovery claimed and then handled successfully.
    pub messages_recovered: u64,
    /// Entries moved to the dead-letter queue by this bus.
    pub messages_sent_to_dlq: u64,
    /// Individual handler failures (one delivery can count several).
    pub handler_errors: u64,
    /// Times the consumer lost its connection and reconnected.
    pub reconnections: u64,
    /// Entries acknowledged without handling: their type has no subscriber in this bus.
    pub events_skipped_no_subscriber: u64,
    /// Entries acknowledged without handling: their type is not registered and no handler
    /// (not even a wildcard) would take it.
    pub events_skipped_unregistered: u64,
    /// Replayed dead letters meant for another consumer group, acknowledged and skipped.
    pub events_skipped_other_group: u64,
    /// Entries that could not be decoded (and were dead-lettered).
    pub malformed_messages: u64,
    /// Entries acknowledged without a dead letter because the DLQ is disabled.
    pub messages_dropped_dlq_disabled: u64,
    /// Pending entries found deleted or trimmed (acknowledged).
    pub entries_deleted_while_pending: u64,
    /// Times the consumer group was missing and recreated.
    pub group_recreations: u64,
    /// Recovery runs (automatic and explicit).
    pub recovery_runs: u64,
    /// Acks Redis did not apply: the entry was claimed by another consumer meanwhile, or the
    /// group was lost. The handling may be duplicated elsewhere.
    pub acks_not_applied: u64,
    /// Starts at which another process seemed to consume under the same consumer name.
    pub consumer_name_in_use: u64,
    /// Entries skipped because this consumer had already handled their event id
    /// (`dedupe_window`).
    pub duplicates_skipped: u64,
    /// Deliveries given to handlers (each attempt counts, failed ones and retries included).
    pub events_dispatched: u64,
    /// Entries whose data this version of their registered type rejects (see
    /// `on_rejected`); counted apart from malformed entries.
    pub events_rejected: u64,
    /// Entries delivered to this consumer that another consumer took (or acknowledged)
    /// before they started here; not run here.
    pub entries_taken_over: u64,
    /// Entries given back to the group unhandled when consuming stopped or paused.
    pub entries_released: u64,
    /// Dead letters not written because the entry was acknowledged (handled) first.
    pub dead_letters_skipped_acked: u64,
    /// Acknowledgements and dead letters refused because this consumer no longer held the
    /// partition ([`PartitionedEventBus`](crate::PartitionedEventBus)): the entries stay
    /// pending for the partition's new owner, which handles them again.
    pub acks_fenced: u64,
}

impl BusStats {
    /// Adds `other`'s counters to these (a partitioned bus sums its partitions).
    pub fn absorb(&mut self, other: &BusStats) {
        self.events_published += other.events_published;
        self.events_consumed += other.events_consumed;
        self.events_processed_success += other.events_processed_success;
        self.events_processed_failed += other.events_processed_failed;
        self.messages_recovered += other.messages_recovered;
        self.messages_sent_to_dlq += other.messages_sent_to_dlq;
        self.handler_errors += other.handler_errors;
        self.reconnections += other.reconnections;
        self.events_skipped_no_subscriber += other.events_skipped_no_subscriber;
        self.events_skipped_unregistered += other.events_skipped_unregistered;
        self.events_skipped_other_group += other.events_skipped_other_group;
        self.malformed_messages += other.malformed_messages;
        self.messages_dropped_dlq_disabled += other.messages_dropped_dlq_disabled;
        self.entries_deleted_while_pending += other.entries_deleted_while_pending;
        self.group_recreations += other.group_recreations;
        self.recovery_runs += other.recovery_runs;
        self.acks_not_applied += other.acks_not_applied;
        self.consumer_name_in_use += other.consumer_name_in_use;
        self.duplicates_skipped += other.duplicates_skipped;
        self.events_dispatched += other.events_dispatched;
        self.events_rejected += other.events_rejected;
        self.entries_taken_over += other.entries_taken_over;
        self.entries_released += other.entries_released;
        self.dead_letters_skipped_acked += other.dead_letters_skipped_acked;
        self.acks_fenced += other.acks_fenced;
    }

    /// As a JSON object keyed by counter name (the tutorial's `get_stats_dict()` keys among
    /// them; key order is serde_json's, sorted unless the application enables its
    /// `preserve_order` feature).
    pub fn to_map(&self) -> Map<String, Json> {
        match serde_json::to_value(self) {
            Ok(Json::Object(map)) => map,
            _ => Map::new(),
        }
    }
}

/// The main stream's details.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamDetails {
    /// The stream key.
    pub name: String,
    /// Entries in it (0 when it does not exist).
    pub length: u64,
    /// Oldest entry id (None when empty).
    pub first_entry_id: Option<String>,
    /// Newest entry id (None when empty).
    pub last_entry_id: Option<String>,
}

/// One consumer group on the stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Consumers known to the group.
    pub consumers: u64,
    /// Entries delivered and not yet acknowledged.
    pub pending: u64,
    /// Last id delivered to the group.
    pub last_delivered_id: String,
    /// Entries not yet delivered to the group, when Redis knows (7.0+).
    pub lag: Option<u64>,
    /// Entries delivered to the group so far, when Redis knows (7.0+).
    pub entries_read: Option<u64>,
}

/// What [`RedisEventBus::stream_info`] reports (the tutorial's keys).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamInfo {
    /// Whether Redis answered.
    pub connected: bool,
    /// The main stream.
    pub stream: StreamDetails,
    /// Every group on the stream.
    pub consumer_groups: Vec<GroupInfo>,
    /// Pending entries of this bus's group.
    pub pending_messages: u64,
    /// Entries in the dead-letter stream.
    pub dlq_messages: u64,
    /// Consumers summed over all groups.
    pub active_consumers: u64,
    /// Why Redis could not be asked, when `connected` is false.
    pub error: Option<String>,
}

/// One entry of this group's pending list (delivered, not yet acknowledged).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct PendingEntry {
    /// The entry id in the main stream.
    pub message_id: String,
    /// The consumer holding it.
    pub consumer: String,
    /// Milliseconds since it was last delivered.
    pub idle_ms: u64,
    /// How often it was delivered (attempts so far).
    pub deliveries: u64,
}

impl RedisEventBus {
    /// The counters.
    pub fn stats(&self) -> BusStats {
        let c = &self.inner.counters;
        let get = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        BusStats {
            events_published: get(&c.events_published),
            events_consumed: get(&c.events_consumed),
            events_processed_success: get(&c.events_processed_success),
            events_processed_failed: get(&c.events_processed_failed),
            messages_recovered: get(&c.messages_recovered),
            messages_sent_to_dlq: get(&c.messages_sent_to_dlq),
            handler_errors: get(&c.handler_errors),
            reconnections: get(&c.reconnections),
            events_skipped_no_subscriber: get(&c.events_skipped_no_subscriber),
            events_skipped_unregistered: get(&c.events_skipped_unregistered),
            events_skipped_other_group: get(&c.events_skipped_other_group),
            malformed_messages: get(&c.malformed_messages),
            messages_dropped_dlq_disabled: get(&c.messages_dropped_dlq_disabled),
            entries_deleted_while_pending: get(&c.entries_deleted_while_pending),
            group_recreations: get(&c.group_recreations),
            recovery_runs: get(&c.recovery_runs),
            acks_not_applied: get(&c.acks_not_applied),
            consumer_name_in_use: get(&c.consumer_name_in_use),
            duplicates_skipped: get(&c.duplicates_skipped),
            events_dispatched: get(&c.events_dispatched),
            events_rejected: get(&c.events_rejected),
            entries_taken_over: get(&c.entries_taken_over),
            entries_released: get(&c.entries_released),
            dead_letters_skipped_acked: get(&c.dead_letters_skipped_acked),
            acks_fenced: get(&c.acks_fenced),
        }
    }

    /// The counters as an ordered map (`map["events_published"]`), for JSON and for code
    /// ported from eventsource-py's dictionary.
    pub fn stats_map(&self) -> Map<String, Json> {
        self.stats().to_map()
    }

    /// eventsource-py's name for [`stats_map`](Self::stats_map).
    pub fn get_stats_dict(&self) -> Map<String, Json> {
        self.stats_map()
    }

    /// eventsource-py's name for [`stream_info`](Self::stream_info).
    pub async fn get_stream_info(&self) -> StreamInfo {
        self.stream_info().await
    }

    /// Stream, groups, pending and DLQ counts. Never fails: when Redis cannot be asked it
    /// returns `connected: false` with the error. Correct on an empty or missing stream.
    pub async fn stream_info(&self) -> StreamInfo {
        match self.try_stream_info().await {
            Ok(info) => info,
            Err(e) => StreamInfo {
                connected: false,
                stream: StreamDetails {
                    name: self.inner.stream.clone(),
                    ..StreamDetails::default()
                },
                error: Some(codec::error_chain(&e)),
                ..StreamInfo::default()
            },
        }
    }

    /// As [`stream_info`](Self::stream_info), failing instead of reporting.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis cannot be reached or answers oddly.
    pub async fn try_stream_info(&self) -> Result<StreamInfo, RedisBusError> {
        let mut conn = self.commands().await?;
        let mut pipe = redis::pipe();
        pipe.cmd("EXISTS").arg(&self.inner.stream);
        pipe.cmd("XLEN").arg(&self.inner.dlq_stream);
        let (exists, dlq_messages): (u64, u64) = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.command_error("XLEN", e))?;
        let mut info = StreamInfo {
            connected: true,
            stream: StreamDetails {
                name: self.inner.stream.clone(),
                ..StreamDetails::default()
            },
            dlq_messages,
            ..StreamInfo::default()
        };
        if exists == 0 {
            return Ok(info);
        }
        let mut pipe = redis::pipe();
        pipe.cmd("XLEN").arg(&self.inner.stream);
        pipe.cmd("XRANGE")
            .arg(&self.inner.stream)
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1);
        pipe.cmd("XREVRANGE")
            .arg(&self.inner.stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
        pipe.cmd("XINFO").arg("GROUPS").arg(&self.inner.stream);
        let (length, first, last, groups): (u64, Value, Value, StreamInfoGroupsReply) = pipe
            .query_async(&mut conn)
            .await
            .map_err(|e| self.command_error("XINFO GROUPS", e))?;
        info.stream.length = length;
        info.stream.first_entry_id = codec::parse_range(first).pop().map(|e| e.id);
        info.stream.last_entry_id = codec::parse_range(last).pop().map(|e| e.id);
        for g in groups.groups {
            let group = GroupInfo {
                name: g.name,
                consumers: g.consumers as u64,
                pending: g.pending as u64,
                last_delivered_id: g.last_delivered_id,
                lag: g.lag.map(|n| n as u64),
                entries_read: g.entries_read.map(|n| n as u64),
            };
            if group.name == self.inner.config.consumer_group {
                info.pending_messages = group.pending;
            }
            info.active_consumers += group.consumers;
            info.consumer_groups.push(group);
        }
        Ok(info)
    }

    /// Entries ever added to the stream (`XINFO STREAM` `entries-added`, Redis 7.0+; `None`
    /// when the stream does not exist): with each group's `entries_read`, what throughput is
    /// measured from. Needs `+xinfo|stream` (the operator's rule), which the consumer's does
    /// not grant: [`stream_info`](Self::stream_info) does not ask for it.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn entries_added(&self) -> Result<Option<u64>, RedisBusError> {
        let mut conn = self.commands().await?;
        let reply: Result<Value, redis::RedisError> = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&self.inner.stream)
            .query_async(&mut conn)
            .await;
        match reply {
            Ok(reply) => Ok(codec::reply_field_u64(&reply, "entries-added")),
            Err(e) if e.to_string().contains("no such key") => Ok(None),
            Err(e) => Err(self.command_error("XINFO STREAM", e)),
        }
    }

    /// The oldest `count` entries of this group's pending list, with owner, idle time and
    /// delivery count — what an operator looks at when the pending count grows.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails (a missing stream or group is an empty list).
    pub async fn pending_entries(&self, count: usize) -> Result<Vec<PendingEntry>, RedisBusError> {
        self.pending_entries_of(&self.inner.config.consumer_group, count)
            .await
    }

    /// As [`pending_entries`](Self::pending_entries), for any `group` of this stream.
    ///
    /// # Errors
    /// As [`pending_entries`](Self::pending_entries).
    pub async fn pending_entries_of(
        &self,
        group: &str,
        count: usize,
    ) -> Result<Vec<PendingEntry>, RedisBusError> {
        let mut conn = self.commands().await?;
        let reply: Result<StreamPendingCountReply, redis::RedisError> = redis::cmd("XPENDING")
            .arg(&self.inner.stream)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(count)
            .query_async(&mut conn)
            .await;
        let rows = match reply {
            Ok(reply) => reply.ids,
            Err(e) if crate::error::is_nogroup(&e) => return Ok(Vec::new()),
            Err(e) => return Err(self.command_error("XPENDING", e)),
        };
        Ok(rows
            .into_iter()
            .map(|row| PendingEntry {
                message_id: row.id,
                consumer: row.consumer,
                idle_ms: row.last_delivered_ms as u64,
                deliveries: row.times_delivered as u64,
            })
            .collect())
    }
}

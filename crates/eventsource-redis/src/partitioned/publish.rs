//! Publishing to a partitioned stream: every event validated and encoded first, then each
//! partition's events in one round trip, the partitions concurrently.

use eventsource_core::EventEnvelope;
use tracing::Instrument;

use super::{PartitionedEventBus, partition_of};
use crate::RedisBusError;

impl PartitionedEventBus {
    /// Publishes events, each to its aggregate's partition: events of one partition go in
    /// one round trip, in their order in `events`, and the partitions are written
    /// concurrently (on a cluster, to their masters at once). Every event is validated and
    /// encoded before anything is sent. Returns the stream ids in `events` order.
    ///
    /// The first publish of a bus (or `connect`) checks the stream's partition count
    /// (`{<prefix>}:partitions`): events are never routed by another count than the stream
    /// was created with.
    ///
    /// # Errors
    /// [`RedisBusError::InvalidEvent`] (nothing sent); [`RedisBusError::PartitionsChanged`]
    /// (nothing sent); when the batch touches one partition, that partition's error as
    /// [`RedisEventBus::publish_events`](crate::RedisEventBus::publish_events) gives it; when it touches several and any failed,
    /// [`RedisBusError::PartitionsFailed`] with what was written and each failed partition's
    /// events and error (every partition is attempted).
    pub async fn publish_events(
        &self,
        events: &[EventEnvelope],
    ) -> Result<Vec<String>, RedisBusError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.check_partition_count().await?;
        let p = self.partition_count();
        let mut by_partition: std::collections::BTreeMap<u32, Vec<usize>> = Default::default();
        for (i, event) in events.iter().enumerate() {
            by_partition
                .entry(partition_of(event.aggregate_id(), p))
                .or_default()
                .push(i);
        }
        let first = self.partition(0);
        let span = first.publish_span(&self.inner.config.stream_prefix, events.len());
        let _entered = span.enter();
        // Everything is encoded before anything is sent: an invalid event refuses the batch.
        let mut writes = Vec::with_capacity(by_partition.len());
        for (partition, positions) in by_partition {
            let batch: Vec<EventEnvelope> = positions.iter().map(|i| events[*i].clone()).collect();
            let commands = self.partition(partition).encode(&batch)?;
            writes.push((partition, positions, batch, commands));
        }
        drop(_entered);
        if writes.len() == 1
            && let Some((partition, _, _, commands)) = writes.pop()
        {
            return self
                .partition(partition)
                .send(events, commands)
                .instrument(span)
                .await;
        }
        let mut tasks = tokio::task::JoinSet::new();
        let mut which = std::collections::HashMap::new();
        for (partition, positions, batch, commands) in writes {
            let bus = self.partition(partition).clone();
            let ids: Vec<uuid::Uuid> = batch.iter().map(EventEnvelope::event_id).collect();
            let task = tasks.spawn(
                async move {
                    let result = bus.send(&batch, commands).await;
                    (partition, positions, result)
                }
                .instrument(span.clone()),
            );
            which.insert(task.id(), (partition, ids));
        }
        let mut ids = vec![String::new(); events.len()];
        let mut failed = Vec::new();
        while let Some(joined) = tasks.join_next_with_id().await {
            match joined {
                Ok((_, (_, positions, Ok(written)))) => {
                    for (position, id) in positions.into_iter().zip(written) {
                        ids[position] = id;
                    }
                }
                Ok((_, (partition, positions, Err(error)))) => {
                    failed.push(crate::PartitionFailure {
                        partition,
                        events: positions.iter().map(|i| events[*i].event_id()).collect(),
                        error,
                    });
                }
                // A partition's send panicked: its events' outcome is unknown.
                Err(join) => {
                    if let Some((partition, events)) = which.remove(&join.id()) {
                        failed.push(crate::PartitionFailure {
                            partition,
                            events,
                            error: RedisBusError::UnexpectedReply {
                                command: "publish (a partition's task)",
                                reply: join.to_string(),
                            },
                        });
                    }
                }
            }
        }
        if failed.is_empty() {
            return Ok(ids);
        }
        failed.sort_by_key(|f| f.partition);
        let published = events
            .iter()
            .zip(ids)
            .filter(|(_, id)| !id.is_empty())
            .map(|(e, id)| (e.event_id(), id))
            .collect();
        Err(RedisBusError::PartitionsFailed { published, failed })
    }
}

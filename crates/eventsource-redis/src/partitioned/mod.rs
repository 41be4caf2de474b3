//! A bus over `partitions` streams with one owner per partition and group: per-aggregate
//! order across many consumers, and room to spread over the masters of a Redis Cluster.
//!
//! Each partition is a [`RedisEventBus`] of its own on the keys `{<prefix>:p<i>}:stream`,
//! `{<prefix>:p<i>}:stream_dlq`, `{<prefix>:p<i>}:retry:…` (one hash tag, so one cluster
//! slot); retries, the dead-letter stream, recovery, replay, trimming and the counters work
//! per partition exactly as on a single stream, and [`PartitionedEventBus::partition`] gives
//! an operator any of them. Events go to partition `aggregate_id mod partitions`
//! ([`partition_of`]). A consumer handles only the partitions it holds a lease on (see
//! `owner`), so an aggregate's events are handled by one consumer at a time, in stream order.
//!
//! With `partitions = 1` on a single node (no `cluster`), the one partition uses the plain
//! key names of [`RedisEventBus`] (`<prefix>:stream`), so an existing stream and
//! eventsource-py keep working.

mod health;
mod hold;
mod owner;
mod publish;
mod run;
mod state;

use std::sync::Arc;

use eventsource_core::BoxFuture;
use eventsource_core::bus::{BusError, EventBus, EventPublisher, Subscribers};
use eventsource_core::{EventEnvelope, EventRegistry};
use tokio_util::sync::CancellationToken;

use crate::conn::ClusterShared;
use crate::{BusStats, RedisBusError, RedisEventBus, RedisEventBusConfig};

pub use run::{OwnershipStats, PartitionState};

/// The partition of an aggregate: its UUID as a 128-bit big-endian integer, modulo
/// `partitions` (Python: `uuid.int % partitions`). Version 4 UUIDs are uniform in those bits,
/// so partitions fill evenly.
///
/// ```
/// # use eventsource_redis::partition_of;
/// let id = uuid::Uuid::from_u128(1_000_003);
/// assert_eq!(partition_of(id, 12), 1_000_003 % 12);
/// assert_eq!(partition_of(id, 1), 0);
/// ```
pub fn partition_of(aggregate_id: uuid::Uuid, partitions: u32) -> u32 {
    // The remainder is below `partitions`, a u32.
    u32::try_from(aggregate_id.as_u128() % u128::from(partitions.max(1))).unwrap_or(0)
}

/// An event bus over `partitions` Redis streams, each owned by one consumer of a group at a
/// time; optionally on a Redis Cluster (`cluster = true`).
///
/// Publishing routes each event by [`partition_of`] its aggregate; consuming
/// ([`start_consuming`](Self::start_consuming)) joins the group's members, takes the
/// partitions rendezvous hashing assigns to this consumer, and hands them over when members
/// join or leave. Handlers subscribe once for all partitions. Cheap to clone.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use eventsource_core::EventRegistry;
/// use eventsource_redis::{PartitionedEventBus, RedisEventBusConfig};
///
/// let config = RedisEventBusConfig::default()
///     .redis_url("redis://127.0.0.1:7000")
///     .cluster(true)
///     .partitions(12)
///     .stream_prefix("orders")
///     .consumer_group("projections");
/// let bus = PartitionedEventBus::new(config, EventRegistry::new())?;
/// bus.connect().await?;
/// bus.start_consuming().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PartitionedEventBus {
    inner: Arc<Inner>,
}

struct Inner {
    config: RedisEventBusConfig,
    parts: Vec<RedisEventBus>,
    subscribers: Arc<Subscribers>,
    registry: EventRegistry,
    member: String,
    members_key: String,
    marker_key: String,
    control: state::Control,
    /// The ownership loop's own connection.
    control_conn: tokio::sync::OnceCell<crate::conn::Commands>,
    /// The ownership scripts were loaded on `control_conn` (`prepare_control`).
    scripts_loaded: std::sync::atomic::AtomicBool,
    /// Set once the stream's partition count was checked.
    count_checked: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for PartitionedEventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartitionedEventBus")
            .field("stream_prefix", &self.inner.config.stream_prefix)
            .field("partitions", &self.inner.parts.len())
            .field("cluster", &self.inner.config.cluster)
            .field("consumer_group", &self.inner.config.consumer_group)
            .field("consumer_name", &self.inner.member)
            .field("owned", &self.owned_partitions())
            .finish()
    }
}

impl PartitionedEventBus {
    /// A partitioned bus with this configuration (`partitions`, `cluster`, `partition_lease`
    /// and every option of a single bus, applied to each partition). Does not connect.
    ///
    /// # Errors
    /// [`RedisBusError::Config`] naming the invalid field.
    pub fn new(
        config: RedisEventBusConfig,
        registry: EventRegistry,
    ) -> Result<Self, RedisBusError> {
        config.validate()?;
        let member = config.effective_consumer_name();
        let cluster = if config.cluster {
            Some(Arc::new(
                ClusterShared::new(
                    &config.redis_url,
                    config.socket_connect_timeout,
                    config.socket_timeout,
                )
                .map_err(|e| crate::ConfigError::new("redis_url", e.to_string()))?,
            ))
        } else {
            None
        };
        let subscribers = Arc::new(Subscribers::new());
        let tagged = config.partitions > 1 || config.cluster;
        let mut parts = Vec::with_capacity(config.partitions as usize);
        for i in 0..config.partitions {
            let prefix = if tagged {
                format!("{{{}:p{i}}}", config.stream_prefix)
            } else {
                config.stream_prefix.clone()
            };
            let part_config = config
                .clone()
                .stream_prefix(prefix)
                .consumer_name(member.clone());
            parts.push(RedisEventBus::part(
                part_config,
                registry.clone(),
                subscribers.clone(),
                cluster.clone(),
            )?);
        }
        let group_tag = format!("{{{}}}", config.stream_prefix);
        Ok(Self {
            inner: Arc::new(Inner {
                members_key: format!("{group_tag}:members:{}", config.consumer_group),
                marker_key: format!("{group_tag}:partitions"),
                member,
                parts,
                subscribers,
                registry,
                control: state::Control::new(&config.stream_prefix, &config.consumer_group),
                control_conn: tokio::sync::OnceCell::new(),
                scripts_loaded: std::sync::atomic::AtomicBool::new(false),
                count_checked: tokio::sync::OnceCell::new(),
                config,
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &RedisEventBusConfig {
        &self.inner.config
    }

    /// This consumer's name: its member id in the group, and its consumer name in every
    /// partition's group.
    pub fn consumer_name(&self) -> &str {
        &self.inner.member
    }

    /// The number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.inner.config.partitions
    }

    /// Partition `i`'s bus: its stream, dead letters, recovery, replay, trim and counters.
    /// Consuming it directly bypasses the ownership (use
    /// [`start_consuming`](Self::start_consuming)).
    ///
    /// # Panics
    /// When `i` is not below [`partition_count`](Self::partition_count).
    pub fn partition(&self, i: u32) -> &RedisEventBus {
        &self.inner.parts[i as usize]
    }

    /// Every partition's bus, in partition order.
    pub fn partitions(&self) -> &[RedisEventBus] {
        &self.inner.parts
    }

    /// The partition an event of `aggregate_id` goes to.
    pub fn partition_for(&self, aggregate_id: uuid::Uuid) -> &RedisEventBus {
        self.partition(partition_of(aggregate_id, self.partition_count()))
    }

    /// The key holding the group's live members (a sorted set, scores in ms of Redis time).
    pub fn members_key(&self) -> &str {
        &self.inner.members_key
    }

    /// Partition `i`'s lease key in this bus's group (it holds `<member>:<token>`).
    pub fn owner_key(&self, i: u32) -> String {
        format!(
            "{}:owner:{}",
            self.partition(i).config().stream_prefix,
            self.inner.config.consumer_group
        )
    }

    fn fence_key(&self, i: u32) -> String {
        format!(
            "{}:fence:{}",
            self.partition(i).config().stream_prefix,
            self.inner.config.consumer_group
        )
    }

    /// Connects every partition (creating its stream and group), checks the stream's number
    /// of partitions — the first bus records it in `{<prefix>}:partitions`, later ones must
    /// agree — and logs once what the server's configuration puts at risk (an eviction
    /// policy that can evict streams or leases, writes refused).
    ///
    /// # Errors
    /// [`RedisBusError::PartitionsChanged`] when the stream was created with another number
    /// (or, for `partitions > 1`, an unpartitioned stream under the same prefix holds
    /// entries); connection errors as [`RedisEventBus::connect`].
    pub async fn connect(&self) -> Result<(), RedisBusError> {
        self.check_partition_count().await?;
        for part in &self.inner.parts {
            part.open_group().await?;
        }
        // What puts the partitions at risk, each finding once: one server, or on a cluster
        // every master the partitions live on.
        let asked = if self.inner.config.cluster {
            self.partitions()
        } else {
            &self.partitions()[..1]
        };
        let mut seen = std::collections::BTreeSet::new();
        for part in asked {
            let risks = part.server_risks().await;
            let found = risks
                .warnings
                .iter()
                .chain(&risks.evicts_expiring_keys)
                .chain(&risks.refusing_writes);
            for finding in found {
                if seen.insert(finding.clone()) {
                    if risks.refusing_writes.as_ref() == Some(finding) {
                        tracing::error!(partition = %part.stream_name(), "{finding}");
                    } else {
                        tracing::warn!(partition = %part.stream_name(), "{finding}");
                    }
                }
            }
        }
        Ok(())
    }

    /// Records the partition count at the stream's first use, and refuses another count
    /// (once per bus: the first `connect` or publish).
    async fn check_partition_count(&self) -> Result<(), RedisBusError> {
        self.inner
            .count_checked
            .get_or_try_init(|| self.record_partition_count())
            .await?;
        Ok(())
    }

    async fn record_partition_count(&self) -> Result<(), RedisBusError> {
        let configured = self.inner.config.partitions;
        let first = self.partition(0);
        let mut conn = first.commands().await?;
        let (set, stored): (bool, Option<u32>) = redis::pipe()
            .cmd("SET")
            .arg(&self.inner.marker_key)
            .arg(configured)
            .arg("NX")
            .cmd("GET")
            .arg(&self.inner.marker_key)
            .query_async(&mut conn)
            .await
            .map_err(|e| first.command_error("SET NX (partitions)", e))?;
        let stored = stored.unwrap_or(configured);
        if stored != configured {
            return Err(RedisBusError::PartitionsChanged {
                key: self.inner.marker_key.clone(),
                stored,
                configured,
            });
        }
        if set && configured > 1 {
            // A stream written before partitioning would silently stop being read.
            let plain = format!("{}:stream", self.inner.config.stream_prefix);
            let length: Result<u64, _> =
                redis::cmd("XLEN").arg(&plain).query_async(&mut conn).await;
            let length = match length {
                Ok(length) => length,
                Err(e) => {
                    // Unknown: the marker is not left claiming a count nobody checked.
                    let _: Result<(), _> = redis::cmd("DEL")
                        .arg(&self.inner.marker_key)
                        .query_async(&mut conn)
                        .await;
                    return Err(first.command_error("XLEN (the unpartitioned stream)", e));
                }
            };
            if length > 0 {
                let _: Result<(), _> = redis::cmd("DEL")
                    .arg(&self.inner.marker_key)
                    .query_async(&mut conn)
                    .await;
                return Err(RedisBusError::PartitionsChanged {
                    key: plain,
                    stored: 1,
                    configured,
                });
            }
        }
        Ok(())
    }

    /// Counters summed over the partitions (see [`partition`](Self::partition) for one).
    pub fn stats(&self) -> BusStats {
        let mut total = BusStats::default();
        for part in &self.inner.parts {
            total.absorb(&part.stats());
        }
        total
    }

    /// Pending entries of this group and dead letters, summed over the partitions.
    ///
    /// # Errors
    /// The first partition whose information could not be read.
    pub async fn totals(&self) -> Result<PartitionTotals, RedisBusError> {
        let mut totals = PartitionTotals::default();
        for part in &self.inner.parts {
            let info = part.try_stream_info().await?;
            totals.length += info.stream.length;
            totals.pending += info.pending_messages;
            totals.dead_letters += info.dlq_messages;
        }
        Ok(totals)
    }
}

/// Figures summed over the partitions of a [`PartitionedEventBus`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PartitionTotals {
    /// Entries in the partitions' streams.
    pub length: u64,
    /// Entries delivered to this group and not acknowledged.
    pub pending: u64,
    /// Entries in the partitions' dead-letter streams.
    pub dead_letters: u64,
}

impl EventPublisher for PartitionedEventBus {
    fn publish<'a>(&'a self, events: &'a [EventEnvelope]) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            self.publish_events(events)
                .await
                .map(drop)
                .map_err(crate::publish::into_bus_error)
        })
    }
}

impl EventBus for PartitionedEventBus {
    fn subscribers(&self) -> &Subscribers {
        &self.inner.subscribers
    }

    fn event_registry(&self) -> Option<&EventRegistry> {
        Some(&self.inner.registry)
    }
}

/// Stops `token` when dropped (a consume loop's tasks end with it).
struct CancelOnDrop(CancellationToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

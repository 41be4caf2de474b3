//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`, on by
//! default): the bus records, the application chooses the exporter (for Prometheus,
//! `metrics-exporter-prometheus`, or the `http` feature's surface, module `http`). Without a
//! recorder installed every call is a no-op.
//!
//! | name | kind | labels |
//! | --- | --- | --- |
//! | `eventsource_events_published_total` | counter | `stream`, `event_type` |
//! | `eventsource_events_consumed_total` | counter (acknowledged after success) | `stream`, `group` |
//! | `eventsource_events_handled_total` | counter | `stream`, `group`, `event_type`, `outcome` = `ok` / `failed` |
//! | `eventsource_handler_duration_seconds` | histogram (all handlers of one event) | `stream`, `group`, `event_type` |
//! | `eventsource_events_skipped_total` | counter | `stream`, `group`, `reason` |
//! | `eventsource_events_undecodable_total` | counter | `stream`, `group`, `kind` = `malformed` / `rejected` |
//! | `eventsource_dead_letters_total` | counter | `stream`, `group` |
//! | `eventsource_messages_recovered_total` | counter | `stream`, `group` |
//! | `eventsource_reconnections_total` | counter | `stream`, `group` |
//! | `eventsource_acks_not_applied_total` | counter | `stream`, `group` |
//! | `eventsource_batch_size` | histogram (entries per batch read) | `stream`, `group` |
//! | `eventsource_pending_entries` | gauge (the group's pending entries) | `stream`, `group` |
//! | `eventsource_consumer_lag` | gauge (entries not yet delivered to the group; Redis 7) | `stream`, `group` |
//! | `eventsource_dlq_depth` | gauge (entries in the dead-letter stream) | `stream` |
//! | `eventsource_acks_fenced_total` | counter (acks refused: the partition's lease was lost) | `stream`, `group` |
//! | `eventsource_partitions_owned` | gauge (partitions this consumer holds; `PartitionedEventBus`) | `prefix`, `group` |
//! | `eventsource_partition_changes_total` | counter | `prefix`, `group`, `change` = `taken` / `released` / `lost` |
//!
//! The gauges are refreshed by a consuming bus every `metrics_interval` (default 10 s).
//! Label values are bounded: the stream and group are the bus's own, reasons are fixed
//! strings, and event types are those this process publishes or has handlers for (at most
//! [`MAX_EVENT_TYPES`]; beyond that they are counted as `other`). Ids never become labels.
//!
//! Handles are resolved once per label set and kept, so recording costs an atomic add: install
//! the recorder before the bus publishes or consumes.

/// Distinct `event_type` label values per bus; further types are recorded as `other`.
pub(crate) const MAX_EVENT_TYPES: usize = 256;

#[cfg(feature = "metrics")]
mod on {
    use std::collections::HashMap;
    use std::sync::{Arc, RwLock};
    use std::time::Duration;

    use metrics::{Counter, Gauge, Histogram};

    use super::MAX_EVENT_TYPES;

    /// Per event type.
    #[derive(Debug)]
    struct TypeHandles {
        published: Counter,
        handled_ok: Counter,
        handled_failed: Counter,
        duration: Histogram,
    }

    /// The handles of one bus.
    #[derive(Debug)]
    struct Handles {
        consumed: Counter,
        skipped_other_group: Counter,
        skipped_unregistered: Counter,
        skipped_no_subscriber: Counter,
        skipped_duplicate: Counter,
        malformed: Counter,
        rejected: Counter,
        dead_letters: Counter,
        recovered: Counter,
        reconnections: Counter,
        acks_not_applied: Counter,
        acks_fenced: Counter,
        batch_size: Histogram,
        pending: Gauge,
        lag: Gauge,
        dlq_depth: Gauge,
    }

    /// A bus's metrics: resolved on first use (after the application installed its recorder).
    #[derive(Debug)]
    pub(crate) struct BusMetrics {
        stream: Arc<str>,
        group: Arc<str>,
        handles: std::sync::OnceLock<Handles>,
        types: RwLock<HashMap<Box<str>, Arc<TypeHandles>>>,
    }

    impl BusMetrics {
        pub(crate) fn new(stream: &str, group: &str) -> Self {
            Self {
                stream: stream.into(),
                group: group.into(),
                handles: std::sync::OnceLock::new(),
                types: RwLock::new(HashMap::new()),
            }
        }

        fn h(&self) -> &Handles {
            self.handles.get_or_init(|| {
                let (s, g) = (self.stream.to_string(), self.group.to_string());
                let skipped = |reason: &'static str| {
                    metrics::counter!("eventsource_events_skipped_total",
                        "stream" => s.clone(), "group" => g.clone(), "reason" => reason)
                };
                let undecodable = |kind: &'static str| {
                    metrics::counter!("eventsource_events_undecodable_total",
                        "stream" => s.clone(), "group" => g.clone(), "kind" => kind)
                };
                Handles {
                    consumed: metrics::counter!("eventsource_events_consumed_total",
                        "stream" => s.clone(), "group" => g.clone()),
                    skipped_other_group: skipped("other_group"),
                    skipped_unregistered: skipped("unregistered"),
                    skipped_no_subscriber: skipped("no_subscriber"),
                    skipped_duplicate: skipped("duplicate"),
                    malformed: undecodable("malformed"),
                    rejected: undecodable("rejected"),
                    dead_letters: metrics::counter!("eventsource_dead_letters_total",
                        "stream" => s.clone(), "group" => g.clone()),
                    recovered: metrics::counter!("eventsource_messages_recovered_total",
                        "stream" => s.clone(), "group" => g.clone()),
                    reconnections: metrics::counter!("eventsource_reconnections_total",
                        "stream" => s.clone(), "group" => g.clone()),
                    acks_not_applied: metrics::counter!("eventsource_acks_not_applied_total",
                        "stream" => s.clone(), "group" => g.clone()),
                    acks_fenced: metrics::counter!("eventsource_acks_fenced_total",
                        "stream" => s.clone(), "group" => g.clone()),
                    batch_size: metrics::histogram!("eventsource_batch_size",
                        "stream" => s.clone(), "group" => g.clone()),
                    pending: metrics::gauge!("eventsource_pending_entries",
                        "stream" => s.clone(), "group" => g.clone()),
                    lag: metrics::gauge!("eventsource_consumer_lag",
                        "stream" => s.clone(), "group" => g.clone()),
                    dlq_depth: metrics::gauge!("eventsource_dlq_depth", "stream" => s),
                }
            })
        }

        fn of_type(&self, event_type: &str) -> Arc<TypeHandles> {
            if let Some(t) = self
                .types
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .get(event_type)
            {
                return t.clone();
            }
            let mut types = self.types.write().unwrap_or_else(|p| p.into_inner());
            let label = if types.len() < MAX_EVENT_TYPES || types.contains_key(event_type) {
                event_type
            } else {
                "other"
            };
            if let Some(t) = types.get(label) {
                return t.clone();
            }
            let (s, g, t) = (
                self.stream.to_string(),
                self.group.to_string(),
                label.to_owned(),
            );
            let handles = Arc::new(TypeHandles {
                published: metrics::counter!("eventsource_events_published_total",
                    "stream" => s.clone(), "event_type" => t.clone()),
                handled_ok: metrics::counter!("eventsource_events_handled_total",
                    "stream" => s.clone(), "group" => g.clone(), "event_type" => t.clone(),
                    "outcome" => "ok"),
                handled_failed: metrics::counter!("eventsource_events_handled_total",
                    "stream" => s.clone(), "group" => g.clone(), "event_type" => t.clone(),
                    "outcome" => "failed"),
                duration: metrics::histogram!("eventsource_handler_duration_seconds",
                    "stream" => s, "group" => g, "event_type" => t),
            });
            types.insert(label.into(), handles.clone());
            handles
        }

        pub(crate) fn published(&self, event_type: &str) {
            self.of_type(event_type).published.increment(1);
        }

        pub(crate) fn handled(&self, event_type: &str, ok: bool, took: Duration) {
            let t = self.of_type(event_type);
            if ok {
                t.handled_ok.increment(1);
            } else {
                t.handled_failed.increment(1);
            }
            t.duration.record(took.as_secs_f64());
        }

        pub(crate) fn consumed(&self, n: u64) {
            self.h().consumed.increment(n);
        }

        pub(crate) fn skipped(&self, reason: super::Skip) {
            let h = self.h();
            match reason {
                super::Skip::OtherGroup => &h.skipped_other_group,
                super::Skip::Unregistered => &h.skipped_unregistered,
                super::Skip::NoSubscriber => &h.skipped_no_subscriber,
                super::Skip::Duplicate => &h.skipped_duplicate,
            }
            .increment(1);
        }

        pub(crate) fn malformed(&self) {
            self.h().malformed.increment(1);
        }

        pub(crate) fn rejected(&self) {
            self.h().rejected.increment(1);
        }

        pub(crate) fn dead_lettered(&self) {
            self.h().dead_letters.increment(1);
        }

        pub(crate) fn recovered(&self, n: u64) {
            self.h().recovered.increment(n);
        }

        pub(crate) fn reconnected(&self) {
            self.h().reconnections.increment(1);
        }

        pub(crate) fn acks_not_applied(&self, n: u64) {
            self.h().acks_not_applied.increment(n);
        }

        pub(crate) fn batch(&self, size: usize) {
            self.h().batch_size.record(size as f64);
        }

        pub(crate) fn acks_fenced(&self, n: u64) {
            self.h().acks_fenced.increment(n);
        }

        pub(crate) fn gauges(&self, pending: u64, lag: Option<u64>, dlq_depth: u64) {
            let h = self.h();
            h.pending.set(pending as f64);
            if let Some(lag) = lag {
                h.lag.set(lag as f64);
            }
            h.dlq_depth.set(dlq_depth as f64);
        }
    }
}

#[cfg(feature = "metrics")]
mod ownership_on {
    use metrics::{Counter, Gauge};

    #[derive(Debug)]
    struct Handles {
        owned: Gauge,
        taken: Counter,
        released: Counter,
        lost: Counter,
    }

    /// A partitioned bus's ownership metrics, resolved on first use.
    #[derive(Debug)]
    pub(crate) struct OwnershipMetrics {
        prefix: String,
        group: String,
        handles: std::sync::OnceLock<Handles>,
    }

    impl OwnershipMetrics {
        pub(crate) fn new(prefix: &str, group: &str) -> Self {
            Self {
                prefix: prefix.to_owned(),
                group: group.to_owned(),
                handles: std::sync::OnceLock::new(),
            }
        }

        fn h(&self) -> &Handles {
            self.handles.get_or_init(|| {
                let (p, g) = (self.prefix.clone(), self.group.clone());
                let change = |change: &'static str| {
                    metrics::counter!("eventsource_partition_changes_total",
                        "prefix" => p.clone(), "group" => g.clone(), "change" => change)
                };
                Handles {
                    owned: metrics::gauge!("eventsource_partitions_owned",
                        "prefix" => p.clone(), "group" => g.clone()),
                    taken: change("taken"),
                    released: change("released"),
                    lost: change("lost"),
                }
            })
        }

        pub(crate) fn owned(&self, n: usize) {
            self.h().owned.set(n as f64);
        }
        pub(crate) fn taken(&self) {
            self.h().taken.increment(1);
        }
        pub(crate) fn released(&self) {
            self.h().released.increment(1);
        }
        pub(crate) fn lost(&self) {
            self.h().lost.increment(1);
        }
    }
}

#[cfg(not(feature = "metrics"))]
mod ownership_off {
    /// Without the `metrics` feature: nothing is recorded.
    #[derive(Debug)]
    pub(crate) struct OwnershipMetrics;

    #[allow(clippy::unused_self)]
    impl OwnershipMetrics {
        pub(crate) fn new(_prefix: &str, _group: &str) -> Self {
            Self
        }
        pub(crate) fn owned(&self, _n: usize) {}
        pub(crate) fn taken(&self) {}
        pub(crate) fn released(&self) {}
        pub(crate) fn lost(&self) {}
    }
}

#[cfg(feature = "metrics")]
pub(crate) use ownership_on::OwnershipMetrics;

#[cfg(not(feature = "metrics"))]
pub(crate) use ownership_off::OwnershipMetrics;

#[cfg(not(feature = "metrics"))]
mod off {
    use std::time::Duration;

    /// Without the `metrics` feature: nothing is recorded.
    #[derive(Debug)]
    pub(crate) struct BusMetrics;

    #[allow(clippy::unused_self)]
    impl BusMetrics {
        pub(crate) fn new(_stream: &str, _group: &str) -> Self {
            Self
        }
        pub(crate) fn published(&self, _event_type: &str) {}
        pub(crate) fn handled(&self, _event_type: &str, _ok: bool, _took: Duration) {}
        pub(crate) fn consumed(&self, _n: u64) {}
        pub(crate) fn skipped(&self, _reason: super::Skip) {}
        pub(crate) fn malformed(&self) {}
        pub(crate) fn rejected(&self) {}
        pub(crate) fn dead_lettered(&self) {}
        pub(crate) fn recovered(&self, _n: u64) {}
        pub(crate) fn reconnected(&self) {}
        pub(crate) fn acks_not_applied(&self, _n: u64) {}
        pub(crate) fn acks_fenced(&self, _n: u64) {}
        pub(crate) fn batch(&self, _size: usize) {}
        pub(crate) fn gauges(&self, _pending: u64, _lag: Option<u64>, _dlq_depth: u64) {}
    }
}

#[cfg(feature = "metrics")]
pub(crate) use on::BusMetrics;

#[cfg(not(feature = "metrics"))]
pub(crate) use off::BusMetrics;

/// Why an entry was skipped (the `reason` label).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Skip {
    /// A replay addressed to another consumer group.
    OtherGroup,
    /// An unregistered type with no handler.
    Unregistered,
    /// No handler for the type in this bus.
    NoSubscriber,
    /// An event id this consumer handled already.
    Duplicate,
}

//! What the ownership loop of a partitioned bus keeps between rounds: its lifecycle, the
//! partitions it holds, its problem, its counters. Below both the loop (`run`) and the holding
//! of one partition (`hold`), which read and write it.

use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;

use tokio_util::sync::CancellationToken;

/// The lifecycle state of a partitioned bus's consume loop.
pub(super) struct Control {
    pub(super) stop: std::sync::Mutex<CancellationToken>,
    pub(super) running: tokio::sync::watch::Sender<bool>,
    /// Partition → lease value, for the partitions this consumer holds.
    pub(super) owned: std::sync::RwLock<BTreeMap<u32, String>>,
    /// Why the ownership loop cannot work right now (its heartbeat fails), if it cannot.
    pub(super) problem: std::sync::Mutex<Option<String>>,
    pub(super) counters: OwnershipCounters,
    pub(super) metrics: crate::metrics::OwnershipMetrics,
    /// The last member set (sorted) and this member's partitions in it.
    pub(super) assigned: std::sync::Mutex<Option<(Vec<String>, Vec<u32>)>>,
}

impl Control {
    pub(super) fn new(prefix: &str, group: &str) -> Self {
        Self {
            stop: std::sync::Mutex::new(CancellationToken::new()),
            running: tokio::sync::watch::channel(false).0,
            owned: std::sync::RwLock::new(BTreeMap::new()),
            problem: std::sync::Mutex::new(None),
            counters: OwnershipCounters::default(),
            metrics: crate::metrics::OwnershipMetrics::new(prefix, group),
            assigned: std::sync::Mutex::new(None),
        }
    }
}

/// What the ownership loop did (read with [`PartitionedEventBus::ownership_stats`]).
#[derive(Debug, Default)]
pub(super) struct OwnershipCounters {
    pub(super) taken: AtomicU64,
    pub(super) released: AtomicU64,
    pub(super) lost: AtomicU64,
    pub(super) handed_over: AtomicU64,
}

pub(super) fn lock_write_owned(
    m: &std::sync::RwLock<BTreeMap<u32, String>>,
) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, String>> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

//! The consume loop of a partitioned bus: membership, taking and renewing leases, starting
//! and stopping the owned partitions' consumers, and handing partitions over.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::owner;
use super::{CancelOnDrop, PartitionedEventBus};
use crate::bus::{lock, lock_read};
use crate::conn::Fence;
use crate::error::RedisBusError;

/// The lifecycle state of a partitioned bus's consume loop.
pub(super) struct Control {
    stop: std::sync::Mutex<CancellationToken>,
    running: tokio::sync::watch::Sender<bool>,
    /// Partition → lease value, for the partitions this consumer holds.
    owned: std::sync::RwLock<BTreeMap<u32, String>>,
    /// Why the ownership loop cannot work right now (its heartbeat fails), if it cannot.
    pub(super) problem: std::sync::Mutex<Option<String>>,
    pub(super) counters: OwnershipCounters,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            stop: std::sync::Mutex::new(CancellationToken::new()),
            running: tokio::sync::watch::channel(false).0,
            owned: std::sync::RwLock::new(BTreeMap::new()),
            problem: std::sync::Mutex::new(None),
            counters: OwnershipCounters::default(),
        }
    }
}

/// What the ownership loop did (read with [`PartitionedEventBus::ownership_stats`]).
#[derive(Debug, Default)]
pub(super) struct OwnershipCounters {
    taken: AtomicU64,
    released: AtomicU64,
    lost: AtomicU64,
    handed_over: AtomicU64,
}

/// Counters of the ownership loop of one [`PartitionedEventBus`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct OwnershipStats {
    /// Partitions this consumer took (leases acquired).
    pub partitions_taken: u64,
    /// Partitions it gave up: another member was assigned them, or it stopped.
    pub partitions_released: u64,
    /// Partitions it lost: the lease expired or could not be renewed in time (the consumer
    /// stopped handling them; its acknowledgements there are refused from then on).
    pub partitions_lost: u64,
    /// Pending entries it took over from a partition's previous owner when taking it.
    pub entries_handed_over: u64,
}

/// Who holds one partition of a group.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PartitionState {
    /// The partition.
    pub partition: u32,
    /// The member holding its lease (`None`: nobody right now).
    pub owner: Option<String>,
    /// The lease's fencing token.
    pub token: Option<u64>,
}

/// A partition this consumer holds.
struct Held {
    value: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    renewed: Instant,
    /// Stopping: the lease is released once its consumer finished.
    releasing: bool,
}

impl PartitionedEventBus {
    /// The partitions this consumer holds right now.
    pub fn owned_partitions(&self) -> Vec<u32> {
        lock_read(&self.inner.control.owned)
            .keys()
            .copied()
            .collect()
    }

    /// Whether the consume loop runs.
    pub fn is_consuming(&self) -> bool {
        *self.inner.control.running.borrow()
    }

    /// The ownership loop's counters.
    pub fn ownership_stats(&self) -> OwnershipStats {
        let c = &self.inner.control.counters;
        OwnershipStats {
            partitions_taken: c.taken.load(Ordering::Relaxed),
            partitions_released: c.released.load(Ordering::Relaxed),
            partitions_lost: c.lost.load(Ordering::Relaxed),
            entries_handed_over: c.handed_over.load(Ordering::Relaxed),
        }
    }

    /// Who holds each partition in this bus's group (read from the lease keys).
    ///
    /// # Errors
    /// When Redis cannot be asked.
    pub async fn partition_owners(&self) -> Result<Vec<PartitionState>, RedisBusError> {
        let mut out = Vec::with_capacity(self.inner.parts.len());
        for i in 0..self.partition_count() {
            let part = self.partition(i);
            let mut conn = part.commands().await?;
            let value: Option<String> = redis::cmd("GET")
                .arg(self.owner_key(i))
                .query_async(&mut conn)
                .await
                .map_err(|e| part.command_error("GET (partition owner)", e))?;
            let (owner, token) = match value.as_deref().and_then(|v| v.rsplit_once(':')) {
                Some((member, token)) => (Some(member.to_owned()), token.parse().ok()),
                None => (value, None),
            };
            out.push(PartitionState {
                partition: i,
                owner,
                token,
            });
        }
        Ok(out)
    }

    /// Consumes until [`stop_consuming`](Self::stop_consuming): joins the group's members,
    /// takes the partitions assigned to this consumer, and follows the members as they come
    /// and go. See [`consume_until`](Self::consume_until).
    ///
    /// # Errors
    /// As [`consume_until`](Self::consume_until).
    pub async fn start_consuming(&self) -> Result<(), RedisBusError> {
        self.consume_until(std::future::pending()).await
    }

    /// Consumes until `shutdown` completes or [`stop_consuming`](Self::stop_consuming) is
    /// called, then stops every partition's consumer (the batches in hand finish and are
    /// acknowledged), gives the leases up and leaves the group's members, so the others take
    /// the partitions at once.
    ///
    /// Every `partition_lease / 20` (at least 50 ms, at most 500 ms) it writes a heartbeat,
    /// renews its leases, and takes the partitions rendezvous hashing assigns it once they
    /// are free: a partition's previous owner releases it after finishing its batch, or its
    /// lease lapses when it died. Taking a partition first claims its previous owner's
    /// pending entries, then consumes it as a [`RedisEventBus`](crate::RedisEventBus) does,
    /// with acknowledgements fenced by the lease. A consumer that cannot renew a lease for
    /// three quarters of `partition_lease` stops that partition before the lease lapses.
    ///
    /// # Errors
    /// [`RedisBusError::AlreadyConsuming`]; [`RedisBusError::PartitionsChanged`] and other
    /// errors an operator must fix from the first [`connect`](Self::connect) (transient ones
    /// are retried).
    pub async fn consume_until(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RedisBusError> {
        let control = &self.inner.control;
        let _guard = crate::consume::RunGuard::claim(&control.running, &control.stop)?;
        let stop = lock(&control.stop).clone();
        // Dropping this future stops the partitions' consumers too (their tokens are
        // children of `stop`).
        let _stop_on_drop = CancelOnDrop(stop.clone());
        tokio::pin!(shutdown);
        let mut backoff = Duration::from_millis(100);
        loop {
            let connected = tokio::select! {
                biased;
                () = &mut shutdown => return Ok(()),
                () = stop.cancelled() => return Ok(()),
                r = self.connect() => r,
            };
            match connected {
                Ok(()) => break,
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, "partitioned bus cannot connect yet; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(self.inner.config.reconnect_max_delay);
                }
                Err(e) => return Err(e),
            }
        }
        let mut held: BTreeMap<u32, Held> = BTreeMap::new();
        let tick = (self.inner.config.partition_lease / 20)
            .clamp(Duration::from_millis(50), Duration::from_millis(500));
        tracing::info!(
            member = %self.inner.member,
            partitions = self.partition_count(),
            lease_ms = crate::config::millis(self.inner.config.partition_lease),
            "joining the group's members"
        );
        loop {
            self.tick(&mut held, &stop).await;
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = stop.cancelled() => break,
                () = tokio::time::sleep(tick) => {}
            }
        }
        self.leave(held).await;
        Ok(())
    }

    /// Asks the consume loop to stop (returns at once; the loop's future completes when the
    /// partitions' batches are acknowledged and the leases given up).
    pub fn stop_consuming(&self) {
        lock(&self.inner.control.stop).cancel();
    }

    /// Stops consuming and waits at most `timeout` for it; returns whether it finished in
    /// time.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        self.stop_consuming();
        let mut running = self.inner.control.running.subscribe();
        tokio::time::timeout(timeout, running.wait_for(|r| !*r))
            .await
            .is_ok()
    }

    /// One round of the ownership loop. Every Redis call is bounded by a quarter of the
    /// lease, and renewals and takes run concurrently, so a master that does not answer (a
    /// failover) cannot hold up the renewal of partitions on the other masters.
    async fn tick(&self, held: &mut BTreeMap<u32, Held>, stop: &CancellationToken) {
        let lease = self.inner.config.partition_lease;
        let limit = lease / 4;
        // Partitions whose consumer finished: give the lease up.
        let finished: Vec<u32> = held
            .iter()
            .filter(|(_, h)| h.task.is_finished())
            .map(|(i, _)| *i)
            .collect();
        for i in finished {
            if let Some(h) = held.remove(&i) {
                self.let_go(i, &h.value).await;
            }
        }
        let heartbeat = tokio::time::timeout(limit, self.heartbeat(false)).await;
        *lock(&self.inner.control.problem) = match &heartbeat {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(format!("the membership heartbeat fails: {e}")),
            Err(_) => Some(format!(
                "the membership heartbeat gets no reply within {limit:?}"
            )),
        };
        let assigned = match heartbeat {
            Ok(Ok(members)) => Some(owner::assigned_to(
                &self.inner.member,
                self.partition_count(),
                &members,
            )),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "partition heartbeat failed; keeping the partitions held");
                None
            }
            Err(_) => {
                tracing::warn!("partition heartbeat timed out; keeping the partitions held");
                None
            }
        };
        if let Some(assigned) = &assigned {
            for (i, h) in held.iter_mut().filter(|(_, h)| !h.releasing) {
                if !assigned.contains(i) {
                    tracing::info!(
                        partition = i,
                        "partition assigned to another member; handing it over"
                    );
                    h.stop.cancel();
                    h.releasing = true;
                }
            }
        }
        enum Step {
            Renewed(u32, Result<bool, String>),
            Took(u32, Result<Option<Held>, String>),
        }
        let mut steps = tokio::task::JoinSet::new();
        for (i, h) in held.iter().filter(|(_, h)| !h.releasing) {
            let (bus, i, value) = (self.clone(), *i, h.value.clone());
            steps.spawn(async move {
                let result = match tokio::time::timeout(limit, bus.renew(i, &value)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no reply within {limit:?}")),
                };
                Step::Renewed(i, result)
            });
        }
        for i in assigned.iter().flatten() {
            if !held.contains_key(i) {
                let (bus, i, stop) = (self.clone(), *i, stop.child_token());
                steps.spawn(async move { Step::Took(i, bus.take(i, limit, stop).await) });
            }
        }
        while let Some(step) = steps.join_next().await {
            match step {
                Ok(Step::Renewed(i, Ok(true))) => {
                    if let Some(h) = held.get_mut(&i) {
                        h.renewed = Instant::now();
                    }
                }
                Ok(Step::Renewed(i, Ok(false))) => {
                    tracing::warn!(
                        partition = i,
                        "partition lease lost (it expired or another member holds it); stopping it"
                    );
                    self.inner
                        .control
                        .counters
                        .lost
                        .fetch_add(1, Ordering::Relaxed);
                    if let Some(h) = held.get_mut(&i) {
                        h.stop.cancel();
                        h.releasing = true;
                    }
                }
                Ok(Step::Renewed(i, Err(e))) => {
                    tracing::warn!(partition = i, error = %e, "renewing a partition lease failed");
                }
                Ok(Step::Took(i, Ok(Some(h)))) => {
                    held.insert(i, h);
                }
                Ok(Step::Took(_, Ok(None))) => {}
                Ok(Step::Took(i, Err(e))) => {
                    tracing::warn!(partition = i, error = %e, "taking a partition failed; trying again");
                }
                Err(e) => tracing::error!(error = %e, "an ownership step panicked"),
            }
        }
        // A lease that could not be renewed for a while is about to lapse: stop starting
        // handlers there before another member may take it.
        for (i, h) in held.iter_mut().filter(|(_, h)| !h.releasing) {
            if h.renewed.elapsed() > lease * 3 / 4 {
                tracing::warn!(
                    partition = i,
                    "partition lease not renewed in time; stopping it before it lapses"
                );
                self.inner
                    .control
                    .counters
                    .lost
                    .fetch_add(1, Ordering::Relaxed);
                h.stop.cancel();
                h.releasing = true;
            }
        }
    }

    /// Stops every partition, waits for their consumers, gives the leases up and leaves.
    async fn leave(&self, held: BTreeMap<u32, Held>) {
        for h in held.values() {
            h.stop.cancel();
        }
        for (i, h) in held {
            let _ = h.task.await;
            self.let_go(i, &h.value).await;
        }
        if let Err(e) = self.heartbeat(true).await {
            tracing::warn!(error = %e, "leaving the group's members failed; they drop this member after partition_lease");
        }
        *lock(&self.inner.control.problem) = None;
        tracing::info!(member = %self.inner.member, "left the group's members");
    }

    /// Writes this member's heartbeat (or removes it) and returns the live members.
    async fn heartbeat(&self, leaving: bool) -> Result<Vec<String>, RedisBusError> {
        let part = self.partition(0);
        let mut conn = part.commands().await?;
        owner::HEARTBEAT
            .key(&self.inner.members_key)
            .arg(&self.inner.member)
            .arg(crate::config::millis(self.inner.config.partition_lease))
            .arg(if leaving { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
            .map_err(|e| part.command_error("EVALSHA (partition heartbeat)", e))
    }

    async fn renew(&self, i: u32, value: &str) -> Result<bool, RedisBusError> {
        let part = self.partition(i);
        let mut conn = part.commands().await?;
        let renewed: i64 = owner::RENEW
            .key(self.owner_key(i))
            .arg(value)
            .arg(crate::config::millis(self.inner.config.partition_lease))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| part.command_error("EVALSHA (renew partition lease)", e))?;
        Ok(renewed == 1)
    }

    /// Tries to take partition `i`: the lease, then the previous owner's pending entries,
    /// then its consumer, which stops when `stop` is cancelled. Each Redis step is bounded
    /// by `limit`. When the pending entries
    /// cannot be claimed the lease is given back (consuming new entries before them would
    /// break the aggregates' order) and the next round tries again.
    async fn take(
        &self,
        i: u32,
        limit: Duration,
        stop: CancellationToken,
    ) -> Result<Option<Held>, String> {
        let part = self.partition(i);
        let acquire = async {
            let mut conn = part.commands().await?;
            owner::ACQUIRE
                .key(self.owner_key(i))
                .key(self.fence_key(i))
                .arg(&self.inner.member)
                .arg(crate::config::millis(self.inner.config.partition_lease))
                .invoke_async::<Vec<Value>>(&mut conn)
                .await
                .map_err(|e| part.command_error("EVALSHA (take partition)", e))
        };
        let reply = match tokio::time::timeout(limit, acquire).await {
            Ok(r) => r.map_err(|e| e.to_string())?,
            // It may have been taken: then it lapses after partition_lease.
            Err(_) => return Err(format!("no reply within {limit:?}")),
        };
        let value = match (
            reply.first(),
            reply.get(1).cloned().and_then(crate::codec::into_text),
        ) {
            (Some(Value::Int(1)), Some(value)) => value,
            _ => return Ok(None),
        };
        let renewed = Instant::now();
        let handed_over = match tokio::time::timeout(limit, self.claim_all_pending(i)).await {
            Ok(Ok(n)) => n,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no reply within {limit:?}"),
                };
                self.let_go(i, &value).await;
                return Err(format!(
                    "claiming the previous owner's pending entries: {why}"
                ));
            }
        };
        // From here acknowledgements in this partition check the lease.
        *part.inner.fence.write().unwrap_or_else(|p| p.into_inner()) = Some(Fence {
            key: self.owner_key(i),
            value: value.clone(),
        });
        let c = &self.inner.control.counters;
        c.taken.fetch_add(1, Ordering::Relaxed);
        c.handed_over.fetch_add(handed_over, Ordering::Relaxed);
        tracing::info!(partition = i, lease = %value, handed_over, "took partition");
        lock_write_owned(&self.inner.control.owned).insert(i, value.clone());
        let task = {
            let (part, stop) = (part.clone(), stop.clone());
            tokio::spawn(async move {
                if let Err(e) = part.consume_until(stop.cancelled()).await {
                    tracing::error!(partition = i, error = %e, "partition consumer ended");
                }
            })
        };
        Ok(Some(Held {
            value,
            stop,
            task,
            renewed,
            releasing: false,
        }))
    }

    /// Claims every pending entry of partition `i`'s group for this consumer (`XAUTOCLAIM`
    /// with no idle minimum, `JUSTID` so delivery counts stay the number of handler starts).
    /// Returns how many were claimed.
    async fn claim_all_pending(&self, i: u32) -> Result<u64, RedisBusError> {
        let part = self.partition(i);
        let mut conn = part.commands().await?;
        let mut cursor = "0-0".to_owned();
        let mut claimed = 0u64;
        loop {
            let reply: Vec<Value> = redis::cmd("XAUTOCLAIM")
                .arg(part.stream_name())
                .arg(&self.inner.config.consumer_group)
                .arg(&self.inner.member)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(1000)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await
                .map_err(|e| part.command_error("XAUTOCLAIM (hand over a partition)", e))?;
            let mut parts = reply.into_iter();
            cursor = parts
                .next()
                .and_then(crate::codec::into_text)
                .unwrap_or_else(|| "0-0".to_owned());
            if let Some(Value::Array(ids)) = parts.next() {
                claimed += ids.len() as u64;
            }
            if cursor == "0-0" {
                return Ok(claimed);
            }
        }
    }

    /// Partition `i`'s consumer has finished: drop the fence and give the lease up.
    async fn let_go(&self, i: u32, value: &str) {
        let part = self.partition(i);
        *part.inner.fence.write().unwrap_or_else(|p| p.into_inner()) = None;
        lock_write_owned(&self.inner.control.owned).remove(&i);
        let released: Result<i64, RedisBusError> = async {
            let mut conn = part.commands().await?;
            owner::RELEASE
                .key(self.owner_key(i))
                .arg(value)
                .invoke_async(&mut conn)
                .await
                .map_err(|e| part.command_error("EVALSHA (release partition)", e))
        }
        .await;
        match released {
            Ok(_) => {
                self.inner
                    .control
                    .counters
                    .released
                    .fetch_add(1, Ordering::Relaxed);
                tracing::info!(partition = i, "released partition");
            }
            Err(e) => {
                tracing::warn!(partition = i, error = %e, "releasing a partition failed; it lapses after partition_lease")
            }
        }
    }
}

fn lock_write_owned(
    m: &std::sync::RwLock<BTreeMap<u32, String>>,
) -> std::sync::RwLockWriteGuard<'_, BTreeMap<u32, String>> {
    m.write().unwrap_or_else(|p| p.into_inner())
}

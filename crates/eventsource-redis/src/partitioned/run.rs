//! The consume loop of a partitioned bus: membership, taking and renewing leases, starting
//! and stopping the owned partitions' consumers, and handing partitions over.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::hold::{Held, Step};
use super::owner;
use super::{CancelOnDrop, PartitionedEventBus};
use crate::bus::{lock, lock_read};
use crate::error::RedisBusError;

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

impl PartitionedEventBus {
    /// The partitions this consumer holds right now.
    pub fn owned_partitions(&self) -> Vec<u32> {
        lock_read(&self.inner.control.owned)
            .keys()
            .copied()
            .collect()
    }

    /// Pauses every partition's consumer (see [`RedisEventBus::pause`](crate::RedisEventBus::pause));
    /// a partition taken later starts paused too, until [`resume`](Self::resume). A
    /// partition pauses by itself after `pause_after_rejections` rejected entries in a row.
    pub fn pause(&self, reason: impl Into<String>) {
        let reason = reason.into();
        for part in self.partitions() {
            part.pause(reason.clone());
        }
    }

    /// Resumes every paused partition.
    pub fn resume(&self) {
        for part in self.partitions() {
            if part.paused_reason().is_some() {
                part.resume();
            }
        }
    }

    /// The partitions that are paused, with the reason.
    pub fn paused_partitions(&self) -> Vec<(u32, String)> {
        (0u32..)
            .zip(self.partitions())
            .filter_map(|(i, part)| part.paused_reason().map(|r| (i, r)))
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
    /// with acknowledgements fenced by the lease. A consumer whose lease of a partition has
    /// not been renewed for three quarters of `partition_lease`, or whose renewal finds it
    /// lost, stops that partition and abandons its running handlers (their entries stay
    /// pending for the next owner).
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
        let mut backoff = eventsource_core::support::Backoff::new(
            Duration::from_millis(100),
            self.inner.config.reconnect_max_delay,
        );
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
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Err(e) => return Err(e),
            }
        }
        let mut held: BTreeMap<u32, Held> = BTreeMap::new();
        let mut taking = Taking::new();
        let tick = self.tick_interval();
        tracing::info!(
            member = %self.inner.member,
            partitions = self.partition_count(),
            lease_ms = crate::config::millis(self.inner.config.partition_lease),
            "joining the group's members"
        );
        loop {
            self.tick(&mut held, &mut taking, &stop).await;
            tokio::select! {
                biased;
                () = &mut shutdown => break,
                () = stop.cancelled() => break,
                () = tokio::time::sleep(tick) => {}
            }
        }
        self.leave(held, taking).await;
        Ok(())
    }

    /// Asks the consume loop to stop (returns at once; the loop's future completes when the
    /// partitions' batches are acknowledged and the leases given up).
    pub fn stop_consuming(&self) {
        lock(&self.inner.control.stop).cancel();
    }

    /// Stops consuming and waits at most `timeout` for the partitions' batches to finish and
    /// be acknowledged; past the timeout it abandons the running handlers (their entries stay
    /// pending for the partitions' next owners) and waits for the leases to be given up.
    /// Returns whether it finished within the timeout.
    pub async fn shutdown(&self, timeout: Duration) -> bool {
        self.stop_consuming();
        let mut running = self.inner.control.running.subscribe();
        if tokio::time::timeout(timeout, running.wait_for(|r| !*r))
            .await
            .is_ok()
        {
            return true;
        }
        tracing::warn!(
            timeout_ms = crate::config::millis(timeout),
            "shutdown timed out; abandoning the partitions' running handlers"
        );
        for part in self.partitions() {
            part.abandon_handlers();
        }
        let _ = running.wait_for(|r| !*r).await;
        false
    }

    /// One round of the ownership loop. The renewals (and releases of finished partitions)
    /// run while the heartbeat is written; takes run on their own and report to a later
    /// round, so a slow or failing master delays nothing but its own partitions. Every Redis
    /// call is bounded by a quarter of the lease. Partitions being handed over stay renewed
    /// until their consumer has finished.
    async fn tick(
        &self,
        held: &mut BTreeMap<u32, Held>,
        taking: &mut Taking,
        stop: &CancellationToken,
    ) {
        let limit = self.inner.config.partition_lease / 4;
        if let Err(e) = self.prepare_control().await {
            let why = format!("the ownership connection cannot be opened: {e}");
            tracing::warn!(problem = %why, "keeping the partitions held");
            *lock(&self.inner.control.problem) = Some(why);
            // Held partitions cannot be renewed without it; their watchdogs let them go.
            return;
        }
        let failed_take = taking.collect(held);
        let mut steps = JoinSet::new();
        let released = self.renew_and_release(held, &mut steps);
        let (heartbeat, ()) = tokio::join!(
            tokio::time::timeout(limit, self.heartbeat(false)),
            self.settle(held, steps)
        );
        let mut problem = None;
        let assigned = match heartbeat {
            Ok(Ok(members)) => Some(self.assigned(&members)),
            failed => {
                // Redis may have forgotten the scripts (a restart, SCRIPT FLUSH): load them
                // again outside the per-call bound before the next round.
                self.inner
                    .scripts_loaded
                    .store(false, std::sync::atomic::Ordering::Release);
                let why = match failed {
                    Ok(Err(e)) => format!("the membership heartbeat fails: {e}"),
                    _ => format!("the membership heartbeat gets no reply within {limit:?}"),
                };
                tracing::warn!(problem = %why, "keeping the partitions held");
                problem = Some(why);
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
            for &i in assigned {
                // Not one released this round: its release must reach Redis first.
                if !held.contains_key(&i) && !released.contains(&i) {
                    taking.start(self, i, limit, stop.child_token());
                }
            }
        }
        // What keeps this member from working, for its health: the heartbeat, else a
        // partition it cannot take (a missing permission says which command).
        *lock(&self.inner.control.problem) = problem.or(failed_take);
    }

    /// The partitions assigned to this member among `members` (computed again only when the
    /// member set changes).
    fn assigned(&self, members: &[String]) -> Vec<u32> {
        let mut sorted = members.to_vec();
        sorted.sort_unstable();
        let mut cache = lock(&self.inner.control.assigned);
        if let Some((set, mine)) = cache.as_ref()
            && *set == sorted
        {
            return mine.clone();
        }
        let mine = owner::assigned_to(&self.inner.member, self.partition_count(), &sorted);
        *cache = Some((sorted, mine.clone()));
        mine
    }

    /// Stops every partition and leaves the group's members at once (so the others take
    /// each partition as soon as it is released), then keeps renewing the partitions whose
    /// consumers are still finishing their batch, and releases each when it is done (takes
    /// still under way are waited for and released the same way).
    async fn leave(&self, mut held: BTreeMap<u32, Held>, mut taking: Taking) {
        let limit = self.inner.config.partition_lease / 4;
        match tokio::time::timeout(limit, self.heartbeat(true)).await {
            Ok(Ok(_)) => {}
            _ => tracing::warn!(
                "leaving the group's members failed; they drop this member after partition_lease"
            ),
        }
        let tick = self.tick_interval();
        loop {
            let _ = taking.collect(&mut held);
            for h in held.values_mut() {
                h.stop.cancel();
                h.releasing = true;
            }
            if held.is_empty() && taking.is_idle() {
                break;
            }
            let mut steps = JoinSet::new();
            let _ = self.renew_and_release(&mut held, &mut steps);
            self.settle(&mut held, steps).await;
            tokio::time::sleep(tick).await;
        }
        *lock(&self.inner.control.problem) = None;
        tracing::info!(member = %self.inner.member, "left the group's members");
    }

    /// How often the ownership loop runs: a twentieth of the lease, 50 ms to 500 ms.
    pub(super) fn tick_interval(&self) -> Duration {
        (self.inner.config.partition_lease / 20)
            .clamp(Duration::from_millis(50), Duration::from_millis(500))
    }

    /// Adds to `steps` the release of every partition whose consumer finished (removed from
    /// `held`; returned) and the renewal of every other one.
    fn renew_and_release(
        &self,
        held: &mut BTreeMap<u32, Held>,
        steps: &mut JoinSet<Step>,
    ) -> Vec<u32> {
        let limit = self.inner.config.partition_lease / 4;
        let finished: Vec<u32> = held
            .iter()
            .filter(|(_, h)| h.task.is_finished())
            .map(|(i, _)| *i)
            .collect();
        for &i in &finished {
            if let Some(h) = held.remove(&i) {
                let bus = self.clone();
                steps.spawn(async move {
                    bus.let_go(i, &h.value, limit).await;
                    Step::Released
                });
            }
        }
        for (i, h) in held.iter() {
            let (bus, i, value, renewed) = (self.clone(), *i, h.value.clone(), h.renewed.clone());
            steps.spawn(async move {
                let sent = Instant::now();
                let result = match tokio::time::timeout(limit, bus.renew(i, &value)).await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(_) => Err(format!("no reply within {limit:?}")),
                };
                if let Ok(true) = result {
                    // The lease now runs until at least `sent + partition_lease`.
                    let mut at = lock(&renewed);
                    *at = (*at).max(sent);
                }
                Step::Renewed(i, result)
            });
        }
        finished
    }

    /// Waits for `steps` and applies their outcomes to `held`.
    async fn settle(&self, held: &mut BTreeMap<u32, Held>, mut steps: JoinSet<Step>) {
        while let Some(step) = steps.join_next().await {
            match step {
                Ok(Step::Renewed(_, Ok(true)) | Step::Released) => {}
                Ok(Step::Renewed(i, Ok(false))) => {
                    if let Some(h) = held.get_mut(&i)
                        && !h.lost
                    {
                        tracing::warn!(
                            partition = i,
                            "partition lease lost (it expired or another member holds it); \
                             abandoning its handlers"
                        );
                        self.count_lost();
                        h.lost = true;
                        h.releasing = true;
                        h.stop.cancel();
                        self.partition(i).abandon_handlers();
                    }
                }
                Ok(Step::Renewed(i, Err(e))) => {
                    tracing::warn!(partition = i, error = %e, "renewing a partition lease failed");
                }
                Err(e) => tracing::error!(error = %e, "an ownership step panicked"),
            }
        }
    }
}

/// Takes under way: each runs as a task of its own and reports to a later round.
pub(super) struct Taking {
    tx: tokio::sync::mpsc::UnboundedSender<(u32, Result<Option<Held>, String>)>,
    rx: tokio::sync::mpsc::UnboundedReceiver<(u32, Result<Option<Held>, String>)>,
    under_way: std::collections::BTreeSet<u32>,
}

impl Taking {
    fn new() -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            tx,
            rx,
            under_way: std::collections::BTreeSet::new(),
        }
    }

    /// Starts taking partition `i` unless a take of it is under way.
    fn start(
        &mut self,
        bus: &PartitionedEventBus,
        i: u32,
        limit: Duration,
        stop: CancellationToken,
    ) {
        if !self.under_way.insert(i) {
            return;
        }
        let (bus, tx) = (bus.clone(), self.tx.clone());
        tokio::spawn(async move {
            let result = bus.take(i, limit, stop).await;
            let _ = tx.send((i, result));
        });
    }

    /// Moves the takes that finished into `held`; returns why one failed, if one did.
    fn collect(&mut self, held: &mut BTreeMap<u32, Held>) -> Option<String> {
        let mut failed = None;
        while let Ok((i, result)) = self.rx.try_recv() {
            self.under_way.remove(&i);
            match result {
                Ok(Some(h)) => {
                    held.insert(i, h);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(partition = i, error = %e, "taking a partition failed; trying again");
                    failed.get_or_insert(format!("taking partition {i} fails: {e}"));
                }
            }
        }
        failed
    }

    fn is_idle(&self) -> bool {
        self.under_way.is_empty()
    }
}

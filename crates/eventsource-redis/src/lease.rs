//! What a consumer holds: entries delivered to it and not yet acknowledged, and the renewal
//! that keeps other consumers from taking them while they wait.
//!
//! Redis measures an entry's idle time from its last delivery. Entries wait in a batch (and in
//! the read-ahead batch) before their handler runs, so without care a slow batch ages past
//! `pending_idle_ms` and other consumers' recovery takes entries their owner will still
//! handle. Every held entry is therefore *renewed* — `XCLAIM … JUSTID` to its own consumer,
//! checked against the owner inside one script ([`RENEW`](crate::scripts::RENEW)) — at least
//! every `pending_idle_ms / 3` while it waits, while its handler runs (for at most
//! `pending_idle_ms` of handler time, so a hung handler's entry still comes back to the group),
//! and after it ran until its acknowledgement is sent. An entry is thus only taken from a live
//! consumer when one handler call takes longer than `pending_idle_ms`.
//!
//! **Attempts are handler starts.** The same scripts keep Redis's delivery count equal to the
//! number of times a handler *started* on the entry: a fresh read counts one (the entry will
//! start within milliseconds), but an entry that still waits after
//! [`UNMARK_AFTER`] (or three round trips to Redis, when Redis is far away) gets its count set
//! back to its true starts, and its start is recorded
//! (count + 1, awaited) right before its handler runs. A consumer killed with a batch in hand
//! thus leaves true counts behind, and a crash loop dead-letters only the entry that was
//! running, not the ones that merely waited behind it.
//!
//! Entries are registered in batches; dropping a batch's [`HeldBatch`] guard forgets them
//! (no more renewals), so a cancelled consumer never keeps entries alive by accident.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::bus::{Inner, RedisEventBus, bump};
use crate::error::RedisBusError;
use crate::scripts;

/// A queued entry counted as started by its delivery is set back to "not started" after
/// waiting this long (and its start is then recorded when its handler runs).
pub(crate) const UNMARK_AFTER: Duration = Duration::from_millis(100);

/// How often the renewer looks at the table (it only calls Redis when something is due).
const TICK: Duration = Duration::from_millis(50);

/// What became of an entry when its handler was about to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Begin {
    /// Still ours, start recorded: run it.
    Run,
    /// Another consumer took it, or it was acknowledged elsewhere: do not run it.
    Taken,
    /// Deleted from the stream while we held it; we hold its content: run it, nothing to ack.
    Deleted,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Queued,
    Running(Instant),
    Done,
    /// Not renewed any more: failed (left for recovery), released, taken, or deleted.
    Gone,
}

#[derive(Debug)]
struct Held {
    id: String,
    /// Handler starts before the current delivery.
    starts: u32,
    /// Whether Redis's count includes a start for this delivery already.
    marked: bool,
    state: State,
    renewed: Instant,
    /// The renewer found it taken or deleted while queued.
    lost: Option<Begin>,
}

impl Held {
    fn count(&self) -> u32 {
        match self.state {
            State::Queued => self.starts + u32::from(self.marked),
            _ => self.starts + 1,
        }
    }
}

#[derive(Debug, Default)]
struct Table {
    next_key: u64,
    batches: Vec<(u64, Vec<Held>)>,
}

impl Table {
    fn entry(&mut self, key: u64, index: usize) -> Option<&mut Held> {
        self.batches
            .iter_mut()
            .find(|(k, _)| *k == key)
            .and_then(|(_, entries)| entries.get_mut(index))
    }
}

/// The entries a bus holds, shared by its consume loop, read-ahead, recovery and renewer.
#[derive(Debug, Default)]
pub(crate) struct Lease {
    table: Mutex<Table>,
    /// Serialises renewal scripts with start marks, so Redis sees them in the order they
    /// were decided (a start mark never overtaken by an older "not started" reset).
    gate: tokio::sync::Mutex<()>,
    renewer_running: AtomicBool,
    /// Round trips to Redis (renewal scripts, heartbeats), smoothed; microseconds, 0 until
    /// measured.
    rtt_micros: AtomicU64,
}

/// A batch of held entries. Dropping it forgets them.
#[derive(Debug)]
pub(crate) struct HeldBatch {
    lease: Weak<Inner>,
    key: u64,
}

impl Drop for HeldBatch {
    fn drop(&mut self) {
        if let Some(inner) = self.lease.upgrade() {
            let mut table = inner.lease.lock();
            table.batches.retain(|(k, _)| *k != self.key);
        }
    }
}

/// One entry to hold: id, handler starts so far, whether its delivery already counted a start.
pub(crate) struct ToHold<'a> {
    pub(crate) id: &'a str,
    pub(crate) starts: u32,
    pub(crate) marked: bool,
}

impl Lease {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a queued entry's delivery keeps counting as its start: [`UNMARK_AFTER`], or
    /// three round trips to Redis when that is longer, but never longer than the renewal
    /// interval (`renew_after`, a third of `pending_idle_ms`: past that the entry's lease is
    /// what matters, and another consumer may take an entry whose renewals failed). Recording
    /// a start costs a round trip; with a far-away Redis (tens or hundreds of milliseconds) a
    /// fixed 100 ms would unmark a read-ahead batch while the batch before it is acknowledged,
    /// and then every entry's start would cost a round trip of its own: a batch of 16 took
    /// 7 s at 400 ms round trips.
    pub(crate) fn unmark_after(&self, renew_after: Duration) -> Duration {
        let rtt = Duration::from_micros(self.rtt_micros.load(Ordering::Relaxed));
        UNMARK_AFTER.max((rtt * 3).min(renew_after))
    }

    /// Takes a measured round trip into the estimate (an exponential average, 1/8 weight).
    pub(crate) fn observe_rtt(&self, rtt: Duration) {
        let sample = rtt.as_micros().min(u128::from(u32::MAX)) as u64;
        let _ = self
            .rtt_micros
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    sample
                } else {
                    (old * 7 + sample) / 8
                })
            });
    }

    /// For [`RedisEventBus::begin`]: `Err(outcome)` when the outcome is known without Redis
    /// (forgotten or lost; with `fast` (the renewal interval), also a fresh delivery that
    /// counts as its start, now marked running), else the entry's id and the count to record.
    fn still_held(
        &self,
        batch: &HeldBatch,
        index: usize,
        fast: Option<Duration>,
    ) -> Result<(String, u32), Begin> {
        let mut table = self.lock();
        let Some(held) = table.entry(batch.key, index) else {
            return Err(Begin::Taken);
        };
        if let Some(lost) = held.lost {
            held.state = State::Gone;
            return Err(lost);
        }
        let now = Instant::now();
        if let Some(renew_after) = fast
            && held.marked
            && now.duration_since(held.renewed) < self.unmark_after(renew_after)
        {
            held.state = State::Running(now);
            return Err(Begin::Run);
        }
        Ok((held.id.clone(), held.starts + 1))
    }

    /// Whether `id` is held right now.
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.lock()
            .batches
            .iter()
            .flat_map(|(_, entries)| entries.iter())
            .any(|h| h.id == id && h.state != State::Gone)
    }
}

impl RedisEventBus {
    /// Registers entries delivered to this consumer; the renewer keeps them ours until the
    /// returned guard is dropped.
    pub(crate) fn hold<'a>(&self, entries: impl IntoIterator<Item = ToHold<'a>>) -> HeldBatch {
        let now = Instant::now();
        let key = {
            let mut table = self.inner.lease.lock();
            table.next_key += 1;
            let key = table.next_key;
            let held = entries
                .into_iter()
                .map(|e| Held {
                    id: e.id.to_owned(),
                    starts: e.starts,
                    marked: e.marked,
                    state: State::Queued,
                    renewed: now,
                    lost: None,
                })
                .collect();
            table.batches.push((key, held));
            key
        };
        if !self
            .inner
            .lease
            .renewer_running
            .swap(true, Ordering::AcqRel)
        {
            tokio::spawn(renewer(Arc::downgrade(&self.inner)));
        }
        HeldBatch {
            lease: Arc::downgrade(&self.inner),
            key,
        }
    }

    /// Records the start of entry `index` of `batch` (a round trip only when its delivery no
    /// longer counts as its start) and reports whether to run it.
    ///
    /// # Errors
    /// [`RedisBusError`] when the start could not be recorded: the entry is not run (it stays
    /// pending and comes back).
    pub(crate) async fn begin(
        &self,
        batch: &HeldBatch,
        index: usize,
    ) -> Result<Begin, RedisBusError> {
        // Counted by its delivery and renewed moments ago (the common, fast case): no round
        // trip. Otherwise (it waited, or this process was frozen) record the start and check
        // it is still ours.
        let renew_after = self.inner.config.pending_idle / 3;
        if let Err(known) = self.inner.lease.still_held(batch, index, Some(renew_after)) {
            return Ok(known);
        }
        let _gate = self.inner.lease.gate.lock().await;
        let (id, count) = match self.inner.lease.still_held(batch, index, None) {
            Ok(next) => next,
            Err(known) => return Ok(known),
        };
        let codes = self.renew_script(&[(id.as_str(), count)], None).await?;
        let begin = match codes.first() {
            Some(3) => Begin::Run,
            Some(2) => Begin::Deleted,
            _ => Begin::Taken,
        };
        let mut table = self.inner.lease.lock();
        if let Some(held) = table.entry(batch.key, index) {
            let now = Instant::now();
            held.renewed = now;
            held.marked = true;
            held.state = match begin {
                Begin::Run => State::Running(now),
                _ => State::Gone,
            };
        }
        Ok(begin)
    }

    /// Entry `index` finished successfully: renew it until its ack is sent.
    pub(crate) fn finished(&self, batch: &HeldBatch, index: usize) {
        if let Some(held) = self.inner.lease.lock().entry(batch.key, index) {
            held.state = State::Done;
        }
    }

    /// Entry `index` is left to the group (failed, or skipped): stop renewing it.
    pub(crate) fn let_go(&self, batch: &HeldBatch, index: usize) {
        if let Some(held) = self.inner.lease.lock().entry(batch.key, index) {
            held.state = State::Gone;
        }
    }

    /// Gives back every entry of `batch` whose handler has not finished: their idle time is
    /// set to `pending_idle_ms` so any consumer's recovery can take them at once, and their
    /// delivery count to their true handler starts. Returns the ids given back.
    pub(crate) async fn release(&self, batch: &HeldBatch) -> Vec<String> {
        let items: Vec<(String, u32)> = {
            let mut table = self.inner.lease.lock();
            let Some((_, entries)) = table.batches.iter_mut().find(|(k, _)| *k == batch.key) else {
                return Vec::new();
            };
            entries
                .iter_mut()
                .filter(|h| {
                    matches!(h.state, State::Queued | State::Running(_)) && h.lost.is_none()
                })
                .map(|h| {
                    let count = h.count();
                    h.state = State::Gone;
                    (h.id.clone(), count)
                })
                .collect()
        };
        if items.is_empty() {
            return Vec::new();
        }
        let pairs: Vec<(&str, u32)> = items.iter().map(|(id, n)| (id.as_str(), *n)).collect();
        let _gate = self.inner.lease.gate.lock().await;
        match self
            .renew_script(
                &pairs,
                Some(crate::config::millis(self.inner.config.pending_idle)),
            )
            .await
        {
            Ok(codes) => {
                let released = codes.iter().filter(|&&c| c == 3).count();
                bump(&self.inner.counters.entries_released, released as u64);
            }
            Err(e) => {
                tracing::warn!(error = %e, entries = items.len(), "giving entries back failed; they return to the group after pending_idle_ms")
            }
        }
        items.into_iter().map(|(id, _)| id).collect()
    }

    /// Runs [`RENEW`](scripts::RENEW) for `(id, count)` pairs; `idle` sets the idle time
    /// instead of resetting it.
    async fn renew_script(
        &self,
        items: &[(&str, u32)],
        idle: Option<u64>,
    ) -> Result<Vec<i64>, RedisBusError> {
        let mut conn = self.commands().await?;
        let mut call = scripts::RENEW.prepare_invoke();
        call.key(&self.inner.stream)
            .arg(&self.inner.config.consumer_group)
            .arg(&self.inner.consumer_name)
            .arg(idle.map(|ms| ms.to_string()).unwrap_or_default());
        for (id, count) in items {
            call.arg(*id).arg(*count);
        }
        let sent = Instant::now();
        let codes = call
            .invoke_async(&mut conn)
            .await
            .map_err(|e| self.command_error("EVALSHA (renew held entries)", e))?;
        self.inner.lease.observe_rtt(sent.elapsed());
        Ok(codes)
    }
}

/// Renews what is due every [`TICK`] while anything is held; exits after a second with
/// nothing held (so a consumer handling single events does not start a task per event).
async fn renewer(inner: Weak<Inner>) {
    let mut idle_ticks = 0u32;
    loop {
        tokio::time::sleep(TICK).await;
        let Some(inner) = inner.upgrade() else { return };
        let bus = RedisEventBus { inner };
        let lease = &bus.inner.lease;
        let renew_after = bus.inner.config.pending_idle / 3;
        let handler_limit = bus.inner.config.pending_idle;
        let _gate = lease.gate.lock().await;
        // Decide under the table lock, run the script without it.
        let due: Vec<(u64, usize, String, u32)> = {
            let mut table = lease.lock();
            if table.batches.is_empty() {
                idle_ticks += 1;
                if idle_ticks >= 20 {
                    // Under the table lock: a batch registered after this finds the flag
                    // clear and starts a new renewer.
                    lease.renewer_running.store(false, Ordering::Release);
                    return;
                }
                continue;
            }
            idle_ticks = 0;
            let now = Instant::now();
            let unmark_after = lease.unmark_after(renew_after);
            let mut due = Vec::new();
            for (key, entries) in &mut table.batches {
                for (index, held) in entries.iter_mut().enumerate() {
                    if held.lost.is_some() {
                        continue;
                    }
                    let age = now.duration_since(held.renewed);
                    let wanted = match held.state {
                        State::Queued if held.marked && age >= unmark_after => {
                            held.marked = false;
                            true
                        }
                        State::Queued | State::Done => age >= renew_after,
                        State::Running(since) => {
                            age >= renew_after && now.duration_since(since) < handler_limit
                        }
                        State::Gone => false,
                    };
                    if wanted {
                        due.push((*key, index, held.id.clone(), held.count()));
                    }
                }
            }
            due
        };
        if due.is_empty() {
            continue;
        }
        let pairs: Vec<(&str, u32)> = due.iter().map(|(_, _, id, n)| (id.as_str(), *n)).collect();
        let codes = match bus.renew_script(&pairs, None).await {
            Ok(codes) => codes,
            Err(e) => {
                tracing::debug!(error = %e, entries = due.len(), "renewing held entries failed; retrying");
                continue;
            }
        };
        let now = Instant::now();
        let mut table = lease.lock();
        for ((key, index, _, _), code) in due.iter().zip(codes) {
            let Some(held) = table.entry(*key, *index) else {
                continue;
            };
            match code {
                3 => held.renewed = now,
                2 => {
                    held.renewed = now;
                    if held.state == State::Queued {
                        held.lost = Some(Begin::Deleted);
                    }
                }
                _ => {
                    if held.state == State::Queued {
                        held.lost = Some(Begin::Taken);
                    }
                }
            }
        }
    }
}

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
//!
//! ## The state of one held entry
//!
//! ```text
//!              hold (delivered; `marked`: this delivery counts as a start)
//!                 │
//!                 ▼            renewer: waited ≥ unmark_after while marked
//!   ┌────────► Queued ─────────────────────────────┐ (count set back to starts;
//!   │ renewed     │  │   renewer finds it taken or  │  marked = false)
//!   │ every       │  │   deleted → lost (stays      ◄┘
//!   │ renew_after │  │   Queued, never renewed again)
//!   └─────────────┤  │
//!       begin:    │  └─ begin while lost → Gone (not run: Taken / Deleted)
//!       fast (marked, fresh) or script says still ours → Running(since)
//!                 ▼
//!             Running ── renewed every renew_after, while since < handler_limit
//!              │    │
//!     finished │    │ let_go (failed / skipped)     release (stopping): Queued or
//!              ▼    ▼                               Running → Gone, idle set to
//!            Done  Gone ◄──── let_go ─── Done       pending_idle, count = starts
//!   (renewed until its ack is sent; the batch's guard dropped → forgotten)
//! ```
//!
//! Counts written to Redis: `starts + marked` while queued, `starts + 1` once its handler
//! began. `lease::tests` checks these transitions against random sequences of events.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// A queued entry counted as started by its delivery is set back to "not started" after
/// waiting this long (and its start is then recorded when its handler runs).
pub(crate) const UNMARK_AFTER: Duration = Duration::from_millis(100);

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
/// Pure bookkeeping: the Redis side (scripts, the renewer task) is `handle::hold`.
#[derive(Debug, Default)]
pub(crate) struct Lease {
    table: Arc<Mutex<Table>>,
    /// Serialises renewal scripts with start marks, so Redis sees them in the order they
    /// were decided (a start mark never overtaken by an older "not started" reset).
    pub(crate) gate: tokio::sync::Mutex<()>,
    /// Whether a renewer task runs.
    pub(crate) renewer_running: AtomicBool,
    /// Round trips to Redis (renewal scripts, heartbeats), smoothed; microseconds, 0 until
    /// measured.
    rtt_micros: AtomicU64,
}

/// A batch of held entries. Dropping it forgets them.
#[derive(Debug)]
pub(crate) struct HeldBatch {
    table: Weak<Mutex<Table>>,
    key: u64,
}

impl Drop for HeldBatch {
    fn drop(&mut self) {
        if let Some(table) = self.table.upgrade() {
            let mut table = table.lock().unwrap_or_else(|p| p.into_inner());
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

/// An entry whose renewal is due: where it is, its id and the count to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Due {
    key: u64,
    index: usize,
    pub(crate) id: String,
    pub(crate) count: u32,
}

impl Lease {
    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers entries delivered at `now`; forgotten when the returned guard drops.
    pub(crate) fn register<'a>(
        &self,
        entries: impl IntoIterator<Item = ToHold<'a>>,
        now: Instant,
    ) -> HeldBatch {
        let mut table = self.lock();
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
        HeldBatch {
            table: Arc::downgrade(&self.table),
            key,
        }
    }

    /// How long a queued entry's delivery keeps counting as its start: [`UNMARK_AFTER`], or
    /// three round trips to Redis when that is longer, but never longer than the renewal
    /// interval (`renew_after`, a third of `pending_idle_ms`: past that the entry's lease is
    /// what matters, and another consumer may take an entry whose renewals failed). Recording
    /// a start costs a round trip, so a far-away Redis must not unmark a read-ahead batch
    /// while the batch before it is acknowledged.
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

    /// Before a handler starts: `Err(outcome)` when the outcome is known without Redis
    /// (forgotten or lost; with `fast` (the renewal interval), also a fresh delivery that
    /// counts as its start, now marked running), else the entry's id and the count to record.
    pub(crate) fn still_held(
        &self,
        batch: &HeldBatch,
        index: usize,
        fast: Option<Duration>,
        now: Instant,
    ) -> Result<(String, u32), Begin> {
        let unmark_after = fast.map(|renew_after| self.unmark_after(renew_after));
        let mut table = self.lock();
        let Some(held) = table.entry(batch.key, index) else {
            return Err(Begin::Taken);
        };
        if let Some(lost) = held.lost {
            held.state = State::Gone;
            return Err(lost);
        }
        if let Some(unmark_after) = unmark_after
            && held.marked
            && now.duration_since(held.renewed) < unmark_after
        {
            held.state = State::Running(now);
            return Err(Begin::Run);
        }
        Ok((held.id.clone(), held.starts + 1))
    }

    /// The start was recorded at `now` and Redis said `begin`.
    pub(crate) fn begun(&self, batch: &HeldBatch, index: usize, begin: Begin, now: Instant) {
        if let Some(held) = self.lock().entry(batch.key, index) {
            held.renewed = now;
            held.marked = true;
            held.state = match begin {
                Begin::Run => State::Running(now),
                _ => State::Gone,
            };
        }
    }

    /// Entry `index` finished successfully: renew it until its ack is sent.
    pub(crate) fn finished(&self, batch: &HeldBatch, index: usize) {
        if let Some(held) = self.lock().entry(batch.key, index) {
            held.state = State::Done;
        }
    }

    /// Entry `index` is left to the group (failed, or skipped): stop renewing it.
    pub(crate) fn let_go(&self, batch: &HeldBatch, index: usize) {
        if let Some(held) = self.lock().entry(batch.key, index) {
            held.state = State::Gone;
        }
    }

    /// Every entry of `batch` whose handler has not finished (and that is not lost), now
    /// gone, with the count to write when giving it back.
    pub(crate) fn take_unfinished(&self, batch: &HeldBatch) -> Vec<(String, u32)> {
        let mut table = self.lock();
        let Some((_, entries)) = table.batches.iter_mut().find(|(k, _)| *k == batch.key) else {
            return Vec::new();
        };
        entries
            .iter_mut()
            .filter(|h| matches!(h.state, State::Queued | State::Running(_)) && h.lost.is_none())
            .map(|h| {
                let count = h.count();
                h.state = State::Gone;
                (h.id.clone(), count)
            })
            .collect()
    }

    /// Whether `id` is held right now.
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.lock()
            .batches
            .iter()
            .flat_map(|(_, entries)| entries.iter())
            .any(|h| h.id == id && h.state != State::Gone)
    }

    /// The renewals due at `now` (`None`: nothing is held). A marked entry that waited past
    /// the unmark time is unmarked here, and is due (its count goes back to its starts).
    pub(crate) fn due(
        &self,
        now: Instant,
        renew_after: Duration,
        handler_limit: Duration,
    ) -> Option<Vec<Due>> {
        let unmark_after = self.unmark_after(renew_after);
        let mut table = self.lock();
        if table.batches.is_empty() {
            return None;
        }
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
                    due.push(Due {
                        key: *key,
                        index,
                        id: held.id.clone(),
                        count: held.count(),
                    });
                }
            }
        }
        Some(due)
    }

    /// What the renewal script answered for `due`, at `now`: 3 renewed, 2 deleted from the
    /// stream (renewed: we hold its content), else taken by another consumer.
    pub(crate) fn renewed(&self, due: &[Due], codes: &[i64], now: Instant) {
        let mut table = self.lock();
        for (d, code) in due.iter().zip(codes) {
            let Some(held) = table.entry(d.key, d.index) else {
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

    /// Clears `renewer_running` when nothing is held, under the table lock (a batch
    /// registered after this finds the flag clear and starts a new renewer). True: stopped.
    pub(crate) fn stop_renewer_if_idle(&self) -> bool {
        let table = self.lock();
        if table.batches.is_empty() {
            self.renewer_running.store(false, Ordering::Release);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests;

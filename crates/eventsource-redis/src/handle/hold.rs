//! The Redis side of the lease: holding delivered entries, recording a handler's start,
//! giving entries back, and the renewer task (see `lease` for the state of one entry).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crate::bus::{Inner, RedisEventBus, bump};
use crate::error::RedisBusError;
use crate::lease::{Begin, HeldBatch, ToHold};
use crate::scripts;

/// How often the renewer looks at the table (it only calls Redis when something is due).
const TICK: Duration = Duration::from_millis(50);

impl RedisEventBus {
    /// Registers entries delivered to this consumer; the renewer keeps them ours until the
    /// returned guard is dropped.
    pub(crate) fn hold<'a>(&self, entries: impl IntoIterator<Item = ToHold<'a>>) -> HeldBatch {
        let batch = self.inner.lease.register(entries, Instant::now());
        if !self
            .inner
            .lease
            .renewer_running
            .swap(true, Ordering::AcqRel)
        {
            tokio::spawn(renewer(Arc::downgrade(&self.inner)));
        }
        batch
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
        let lease = &self.inner.lease;
        let renew_after = self.inner.config.pending_idle / 3;
        if let Err(known) = lease.still_held(batch, index, Some(renew_after), Instant::now()) {
            return Ok(known);
        }
        let _gate = lease.gate.lock().await;
        let (id, count) = match lease.still_held(batch, index, None, Instant::now()) {
            Ok(next) => next,
            Err(known) => return Ok(known),
        };
        let codes = self.renew_script(&[(id.as_str(), count)], None).await?;
        let begin = match codes.first() {
            Some(3) => Begin::Run,
            Some(2) => Begin::Deleted,
            _ => Begin::Taken,
        };
        lease.begun(batch, index, begin, Instant::now());
        Ok(begin)
    }

    /// Entry `index` finished successfully: renew it until its ack is sent.
    pub(crate) fn finished(&self, batch: &HeldBatch, index: usize) {
        self.inner.lease.finished(batch, index);
    }

    /// Entry `index` is left to the group (failed, or skipped): stop renewing it.
    pub(crate) fn let_go(&self, batch: &HeldBatch, index: usize) {
        self.inner.lease.let_go(batch, index);
    }

    /// Gives back every entry of `batch` whose handler has not finished: their idle time is
    /// set to `pending_idle_ms` so any consumer's recovery can take them at once, and their
    /// delivery count to their true handler starts. Returns the ids given back.
    pub(crate) async fn release(&self, batch: &HeldBatch) -> Vec<String> {
        let items = self.inner.lease.take_unfinished(batch);
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
        // Decided under the table lock, the script run without it.
        let Some(due) = lease.due(Instant::now(), renew_after, handler_limit) else {
            idle_ticks += 1;
            if idle_ticks >= 20 && lease.stop_renewer_if_idle() {
                return;
            }
            continue;
        };
        idle_ticks = 0;
        if due.is_empty() {
            continue;
        }
        let pairs: Vec<(&str, u32)> = due.iter().map(|d| (d.id.as_str(), d.count)).collect();
        let codes = match bus.renew_script(&pairs, None).await {
            Ok(codes) => codes,
            Err(e) => {
                tracing::debug!(error = %e, entries = due.len(), "renewing held entries failed; retrying");
                continue;
            }
        };
        lease.renewed(&due, &codes, Instant::now());
    }
}

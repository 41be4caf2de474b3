//! Consuming: the lifecycle API (start, stop, shutdown with a deadline, pause and resume).
//!
//! - `run`: the read loop — own pending entries first, then new ones with a bounded
//!   read-ahead, recovery one page per tick, reconnection with backoff.
//! - `own_pending`: re-reading this consumer's own pending entries without counting a
//!   delivery (after a restart or a reconnect).
//!
//! **Stopping.** A stop is a [`CancellationToken`]: [`RedisEventBus::stop_consuming`] cancels
//! the bus's token, [`RedisEventBus::consume_until`] cancels its own when the shutdown future
//! completes. A stop that happened before the loop ran makes it return at once. On a stop the
//! batch in hand (and a read-ahead batch that arrived) is finished and acknowledged, so
//! nothing this consumer received is left pending; a recovery page stops between entries and
//! gives the rest back. [`RedisEventBus::shutdown`] bounds the wait: past its timeout the
//! running handlers are abandoned and every entry not finished is given back to the group at
//! once (claimable by any consumer's recovery without waiting `pending_idle_ms`).

mod own_pending;
mod run;

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::bus::RedisEventBus;
use crate::error::RedisBusError;

/// What [`RedisEventBus::shutdown`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Whether the consumer finished within the timeout (its running handlers completed and
    /// were acknowledged). `false`: it gave up and abandoned the handlers still running.
    pub completed: bool,
    /// How long the shutdown waited.
    #[serde(with = "millis")]
    pub waited: Duration,
    /// Entries this consumer gave back to its group unhandled while stopping (not started, or
    /// abandoned at the deadline). They stay pending and any consumer's recovery takes them
    /// at once; a consumer restarted with the same name reads them first.
    pub left_pending: Vec<String>,
}

mod millis {
    pub(super) fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

impl RedisEventBus {
    /// Consumes until [`stop_consuming`](Self::stop_consuming),
    /// [`shutdown`](Self::shutdown) or [`disconnect`](Self::disconnect): first this consumer's
    /// own pending entries (left by an earlier run with the same name), then new entries,
    /// `batch_size` at a time, with pending recovery one page at a time every
    /// `recovery_interval` (and once at start).
    ///
    /// Connection loss, a Redis restart and a lost consumer group are handled inside: the loop
    /// reconnects with jittered exponential backoff (counted in `reconnections`), recreates
    /// the group, and re-reads its own pending entries first. Errors an operator must fix
    /// (a missing ACL permission, a wrong password) are retried at the longest backoff,
    /// logged with what to do, and reported by [`health_check`](Self::health_check).
    ///
    /// A stop requested before this runs makes it return at once (and is used up by it).
    ///
    /// # Errors
    /// [`RedisBusError::AlreadyConsuming`] if this bus is already consuming; the running
    /// consumer is not affected.
    pub async fn start_consuming(&self) -> Result<(), RedisBusError> {
        self.consume_until(std::future::pending()).await
    }

    /// As [`start_consuming`](Self::start_consuming), stopping gracefully when `shutdown`
    /// completes (a shutdown that already completed stops it at once), the way mini-redis's
    /// `run(listener, shutdown)` works. Pass `token.cancelled()` to drive it with a
    /// [`CancellationToken`].
    ///
    /// # Errors
    /// [`RedisBusError::AlreadyConsuming`] if this bus is already consuming.
    pub async fn consume_until(
        &self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), RedisBusError> {
        let control = &self.inner.control;
        let guard = RunGuard::claim(&control.running, &control.stop)?;
        let stop = control.stop_token().child_token();
        let abort = CancellationToken::new();
        *lock(&control.abort) = abort.clone();
        lock(&control.left_pending).clear();
        let _guard = guard;
        let run = self.run(stop.clone(), abort);
        tokio::pin!(run);
        tokio::pin!(shutdown);
        tokio::select! {
            biased;
            () = &mut shutdown => {
                stop.cancel();
                run.await;
            }
            () = &mut run => {}
        }
        Ok(())
    }

    /// Asks the consume loop to stop after the batch in hand: its handlers finish (never
    /// cancelled) and it is acknowledged. Returns at once; the consuming future completes when
    /// that is done. Called while nothing consumes, it stops the next run as soon as it
    /// starts. See [`shutdown`](Self::shutdown) for a stop with a deadline.
    pub fn stop_consuming(&self) {
        self.inner.control.stop_token().cancel();
    }

    /// Stops consuming and waits at most `timeout` for the batch in hand to finish and be
    /// acknowledged; past the timeout it abandons the running handlers (their futures are
    /// dropped) and gives every unfinished entry back to the group. Then disconnects. The
    /// report says what was left pending (eventsource-py's `shutdown(timeout)`).
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let started = Instant::now();
        self.stop_consuming();
        let mut running = self.inner.control.running.subscribe();
        let completed = tokio::time::timeout(timeout, running.wait_for(|r| !*r))
            .await
            .is_ok();
        if !completed {
            tracing::warn!(
                timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                "shutdown timed out; abandoning the running handlers"
            );
            lock(&self.inner.control.abort).cancel();
            let _ = running.wait_for(|r| !*r).await;
        }
        let left_pending = std::mem::take(&mut *lock(&self.inner.control.left_pending));
        self.disconnect().await;
        tracing::info!(
            completed,
            left_pending = left_pending.len(),
            "shutdown complete"
        );
        ShutdownReport {
            completed,
            waited: started.elapsed(),
            left_pending,
        }
    }

    /// Pauses consuming: the loop stops reading and recovering (entries it holds but has not
    /// started go back to the group) until [`resume`](Self::resume). Health reports the
    /// reason. The consumer pauses by itself when `pause_after_rejections` entries in a row
    /// are rejected by this version of their event type.
    pub fn pause(&self, reason: impl Into<String>) {
        self.inner.pause(reason.into());
    }

    /// Resumes a paused consumer.
    pub fn resume(&self) {
        *lock(&self.inner.control.paused) = None;
        self.inner
            .control
            .rejected_streak
            .store(0, std::sync::atomic::Ordering::Relaxed);
        self.inner.control.resumed.notify_waiters();
        tracing::info!("consumer resumed");
    }

    /// Abandons the running handlers of the current run (their futures are dropped, their
    /// entries given back), as a shutdown past its timeout does; with a stop requested, the
    /// run then ends.
    pub(crate) fn abandon_handlers(&self) {
        lock(&self.inner.control.abort).cancel();
    }

    /// Why the consumer is paused, if it is.
    pub fn paused_reason(&self) -> Option<String> {
        lock(&self.inner.control.paused).clone()
    }
}

/// Marks a consume loop as running for as long as it lives: refuses a second loop, and on
/// drop (the loop ended, or its future was dropped) marks it stopped and uses up a stop that
/// was aimed at it, so the next run starts fresh.
pub(crate) struct RunGuard<'a> {
    running: &'a tokio::sync::watch::Sender<bool>,
    stop: &'a std::sync::Mutex<CancellationToken>,
}

impl<'a> RunGuard<'a> {
    /// Claims the loop.
    ///
    /// # Errors
    /// [`RedisBusError::AlreadyConsuming`] when a loop runs.
    pub(crate) fn claim(
        running: &'a tokio::sync::watch::Sender<bool>,
        stop: &'a std::sync::Mutex<CancellationToken>,
    ) -> Result<Self, RedisBusError> {
        let mut was_running = false;
        running.send_if_modified(|r| {
            was_running = *r;
            *r = true;
            !was_running
        });
        if was_running {
            return Err(RedisBusError::AlreadyConsuming);
        }
        Ok(Self { running, stop })
    }
}

impl Drop for RunGuard<'_> {
    fn drop(&mut self) {
        let mut token = lock(self.stop);
        if token.is_cancelled() {
            *token = CancellationToken::new();
        }
        self.running.send_replace(false);
    }
}

/// Waits until `token` is cancelled or the bus is resumed.
pub(crate) async fn wait_resumed(bus: &RedisEventBus, token: &CancellationToken) {
    let resumed = bus.inner.control.resumed.notified();
    tokio::pin!(resumed);
    resumed.as_mut().enable();
    if !bus.inner.is_paused() {
        return;
    }
    tokio::select! {
        () = resumed => {}
        () = token.cancelled() => {}
    }
}

pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

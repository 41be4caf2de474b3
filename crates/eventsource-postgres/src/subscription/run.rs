//! The loop of one subscription: catch up page by page, follow live appends, retry with
//! backoff, open the breaker, pause, rebuild, and where it starts.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eventsource_core::store::{StoreError, StoredEvent};

use crate::store::StoreCursor;

use tokio_util::sync::CancellationToken;

use super::checkpoint::{CheckpointError, save_checkpoint};
use super::leader::{Candidate, Leadership};
use super::{ProjectionError, Subscription, SubscriptionState, Target};

/// The first wait before looking again at events held behind the frontier.
const HELD_BACK_FIRST_WAIT: Duration = Duration::from_millis(5);

/// A page of the feed read ahead, not yet decoded.
type FeedRows = Result<Vec<sqlx::postgres::PgRow>, StoreError>;

impl Subscription {
    pub(super) fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, (SubscriptionState, StoreCursor, Option<String>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, state: SubscriptionState) {
        self.lock().0 = state;
    }

    /// The start snapshot whose visible transactions the feed after `cursor` must leave out,
    /// while it can still contain any (dropped once the position passes its `xmax`).
    pub(super) fn skip_visible_in(&self, cursor: StoreCursor) -> Option<Arc<str>> {
        let mut start = self
            .start_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if start.as_ref().is_some_and(|s| cursor.tx >= s.xmax) {
            *start = None;
        }
        start.as_ref().map(|s| s.text.clone())
    }

    /// As [`skip_visible_in`](Self::skip_visible_in), keeping the snapshot: for the page read
    /// ahead, which may be thrown away (the current page fails and is read again from a
    /// position that still needs the snapshot).
    fn peek_skip_visible_in(&self, cursor: StoreCursor) -> Option<Arc<str>> {
        let start = self
            .start_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        start
            .as_ref()
            .filter(|s| cursor.tx < s.xmax)
            .map(|s| s.text.clone())
    }

    /// Runs the subscription until `stop`: stands by until it holds its name's lock, then
    /// handles pages until it stops or loses the lock, and stands by again.
    pub(super) async fn run(
        self: Arc<Self>,
        stop: CancellationToken,
        mut woken: tokio::sync::watch::Receiver<u64>,
    ) {
        let mut candidate: Option<Candidate> = None;
        while let Some(leadership) = self.take_over(&stop, &mut candidate).await {
            self.active.store(true, Ordering::SeqCst);
            let takeovers = self.takeovers.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::info!(subscription = %self.name, takeovers, "active: this instance handles the subscription");
            // Handling ends on the stop, or as soon as the lock may be gone.
            let halt = stop.child_token();
            let lost = {
                let (lost, halt) = (leadership.lost.clone(), halt.clone());
                tokio::spawn(async move {
                    lost.cancelled().await;
                    halt.cancel();
                })
            };
            self.run_active(&halt, &mut woken).await;
            lost.abort();
            self.active.store(false, Ordering::SeqCst);
            leadership.release().await;
        }
        self.set_state(SubscriptionState::Idle);
    }

    /// Stands by until this instance holds the lock of its name (`None`: stopped). A paused
    /// instance does not take over.
    async fn take_over(
        &self,
        stop: &CancellationToken,
        candidate: &mut Option<Candidate>,
    ) -> Option<Leadership> {
        let mut backoff =
            eventsource_core::support::Backoff::new(self.options.retry_min, self.options.retry_max);
        loop {
            if stop.is_cancelled() {
                return None;
            }
            self.set_state(if self.paused.load(Ordering::SeqCst) {
                SubscriptionState::Paused
            } else {
                SubscriptionState::Standby
            });
            let wait = if self.paused.load(Ordering::SeqCst) {
                // An idle lock connection would be ended by the server meanwhile.
                *candidate = None;
                self.options.poll_interval.max(self.options.takeover_poll)
            } else {
                // Each step bounded (a half-open connection must not block the takeover) and
                // given up at once on the stop.
                let limit = self.options.leader_timeout;
                let attempt = async {
                    let c = match candidate.take() {
                        Some(c) => c,
                        None => Candidate::connect(
                            &self.store,
                            &self.name,
                            self.options.takeover_poll,
                            self.options.leader_timeout,
                        )
                        .await
                        .map_err(|e| e.to_string())?,
                    };
                    c.try_take().await.map_err(|e| e.to_string())
                };
                let attempt = tokio::select! {
                    () = stop.cancelled() => return None,
                    r = tokio::time::timeout(limit, attempt) => {
                        r.unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
                    }
                };
                match attempt {
                    Ok(Ok(leadership)) => {
                        self.failures.store(0, Ordering::SeqCst);
                        return Some(leadership);
                    }
                    Ok(Err(c)) => {
                        *candidate = Some(c);
                        backoff.reset();
                        self.options.takeover_poll
                    }
                    Err(e) => {
                        self.failed(&format!("lock connection: {e}"));
                        backoff.next_delay()
                    }
                }
            };
            if !self.sleep(stop, wait).await {
                return None;
            }
        }
    }

    /// Handles pages while this instance holds the lock, until `halt` (stopped, or the lock
    /// may be lost) or another instance moved the checkpoint.
    async fn run_active(
        &self,
        halt: &CancellationToken,
        woken: &mut tokio::sync::watch::Receiver<u64>,
    ) {
        let mut backoff =
            eventsource_core::support::Backoff::new(self.options.retry_min, self.options.retry_max);
        // The position stored as the checkpoint (every write compares with it), loaded after
        // the lock was taken.
        let mut stored = loop {
            match self.initial_cursor().await {
                Ok(c) => break c,
                Err(e) => {
                    self.failed(&e.to_string());
                    if !self.sleep(halt, backoff.next_delay()).await {
                        return;
                    }
                }
            }
        };
        let mut cursor = stored;
        {
            let mut state = self.lock();
            state.0 = SubscriptionState::CatchingUp;
            state.1 = cursor;
        }
        backoff.reset();
        // The next page, read ahead while a page is handled (catch-up only), and where from.
        let mut prefetched: Option<(StoreCursor, tokio::task::JoinHandle<FeedRows>)> = None;
        let mut held_back_wait = HELD_BACK_FIRST_WAIT;
        let mut saved_at = tokio::time::Instant::now();
        let superseded = loop {
            if halt.is_cancelled() {
                break false;
            }
            if self.paused.load(Ordering::SeqCst) {
                if let Err(Superseded) = self.flush_checkpoint(&mut stored, cursor).await {
                    break true;
                }
                self.set_state(SubscriptionState::Paused);
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.paused.load(Ordering::SeqCst) {
                    tokio::select! {
                        () = halt.cancelled() => break false,
                        () = changed => {}
                    }
                }
                continue;
            }
            if self.rebuild.swap(false, Ordering::SeqCst) {
                match self.reset(&mut stored).await {
                    Ok(()) => {
                        cursor = StoreCursor::START;
                        self.lock().1 = cursor;
                        tracing::info!(subscription = %self.name, "rebuilding from the beginning");
                    }
                    Err(e) if is_superseded(&e) => {
                        // The rebuild was asked of this subscription, not of this holder:
                        // whoever is active next does it.
                        self.rebuild.store(true, Ordering::SeqCst);
                        break true;
                    }
                    Err(e) => {
                        self.rebuild.store(true, Ordering::SeqCst);
                        self.failed(&format!("rebuild: {e}"));
                        if !self.sleep(halt, backoff.next_delay()).await {
                            break false;
                        }
                        continue;
                    }
                }
            }
            let rows = match prefetched.take() {
                Some((from, task)) if from == cursor => task
                    .await
                    .unwrap_or_else(|e| Err(StoreError::Backend(e.into()))),
                stale => {
                    // Read from elsewhere since (a failed page, a rebuild): not what comes next.
                    if let Some((_, task)) = stale {
                        task.abort();
                    }
                    let skip = self.skip_visible_in(cursor);
                    self.store
                        .read_feed_rows(
                            cursor,
                            &self.options.filter,
                            skip.as_deref(),
                            self.options.page_size,
                        )
                        .await
                }
            };
            // Catching up (a full page): the next page is read while this one is decoded
            // and handled.
            if let Ok(rows) = &rows
                && rows.len() == self.options.page_size
                && let Some(Ok(next)) = rows.last().map(crate::store::feed_row_cursor)
            {
                let (store, filter, skip, size) = (
                    self.store.clone(),
                    self.options.filter.clone(),
                    self.peek_skip_visible_in(next),
                    self.options.page_size,
                );
                prefetched = Some((
                    next,
                    tokio::spawn(async move {
                        store
                            .read_feed_rows(next, &filter, skip.as_deref(), size)
                            .await
                    }),
                ));
            }
            let page = rows.and_then(|rows| crate::store::decode_feed_rows(&rows));
            let page = match page {
                Ok(page) => page,
                Err(e) => {
                    self.failed(&e.to_string());
                    if !self.sleep(halt, backoff.next_delay()).await {
                        break false;
                    }
                    continue;
                }
            };
            let Some(&(last, _)) = page.last() else {
                // Caught up: the checkpoint is written before the wait.
                if let Err(Superseded) = self.flush_checkpoint(&mut stored, cursor).await {
                    break true;
                }
                saved_at = tokio::time::Instant::now();
                self.set_state(SubscriptionState::Live);
                // Events committed but held behind the frontier (an older writing transaction
                // still open) send no further notification when they become readable: look
                // again soon, backing off to the poll interval.
                let skip = self.skip_visible_in(cursor);
                let wait = if self
                    .store
                    .feed_held_back(cursor, &self.options.filter, skip.as_deref())
                    .await
                    .unwrap_or(false)
                {
                    let wait = held_back_wait;
                    held_back_wait = (held_back_wait * 2).min(self.options.poll_interval);
                    wait
                } else {
                    held_back_wait = HELD_BACK_FIRST_WAIT;
                    self.options.poll_interval
                };
                // Wait for an append (or the poll interval), a control change, or the stop.
                let changed = self.changed.notified();
                tokio::select! {
                    () = halt.cancelled() => break false,
                    _ = woken.changed() => {}
                    () = changed => {}
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            };
            let events: Vec<StoredEvent> = page.into_iter().map(|(_, e)| e).collect();
            let caught_up = events.len() < self.options.page_size;
            // A read model stores its checkpoint with every page (in the page's transaction);
            // a projector at most every checkpoint_interval while catching up.
            let checkpoint = matches!(self.target, Target::ReadModel(_))
                || caught_up
                || saved_at.elapsed() >= self.options.checkpoint_interval;
            match self.handle(&events, stored, last, checkpoint).await {
                Ok(()) => {
                    if checkpoint {
                        stored = last;
                        saved_at = tokio::time::Instant::now();
                    }
                    cursor = last;
                    backoff.reset();
                    self.failures.store(0, Ordering::SeqCst);
                    self.handled
                        .fetch_add(events.len() as u64, Ordering::Relaxed);
                    let mut state = self.lock();
                    state.1 = cursor;
                    state.0 = if events.len() == self.options.page_size {
                        SubscriptionState::CatchingUp
                    } else {
                        SubscriptionState::Live
                    };
                }
                Err(e) if is_superseded(&e) => break true,
                Err(e) => {
                    let failures = self.failed(&e.to_string());
                    let wait = if failures >= self.options.breaker_threshold {
                        tracing::error!(subscription = %self.name, failures, error = %e, "circuit breaker open");
                        self.set_state(SubscriptionState::BreakerOpen);
                        self.failures.store(0, Ordering::SeqCst);
                        backoff.reset();
                        self.options.breaker_cooldown
                    } else {
                        backoff.next_delay()
                    };
                    if !self.sleep(halt, wait).await {
                        break false;
                    }
                }
            }
        };
        if let Some((_, task)) = prefetched {
            task.abort();
        }
        if superseded {
            tracing::warn!(subscription = %self.name,
                "another instance moved the checkpoint (this one lost its lock): standing by");
        } else {
            // Stopping (or the lock may be lost: then the write is refused, which is right).
            let _ = self.flush_checkpoint(&mut stored, cursor).await;
        }
    }

    /// Writes a projector's handled position that the interval held back (caught up, pause,
    /// stop) over the stored checkpoint. A failure is logged: the events after the stored
    /// checkpoint are delivered again next time. `Err`: another instance moved it.
    async fn flush_checkpoint(
        &self,
        stored: &mut StoreCursor,
        cursor: StoreCursor,
    ) -> Result<(), Superseded> {
        if cursor == *stored {
            return Ok(());
        }
        match save_checkpoint(
            self.store.pool(),
            &self.store,
            &self.name,
            *stored,
            cursor,
            true,
        )
        .await
        {
            Ok(()) => {
                *stored = cursor;
                Ok(())
            }
            Err(CheckpointError::Superseded) => Err(Superseded),
            Err(CheckpointError::Store(e)) => {
                tracing::warn!(subscription = %self.name, error = %e,
                    "checkpoint not written; events after the last one are delivered again");
                Ok(())
            }
        }
    }

    /// Records a failure; returns the failures in a row.
    fn failed(&self, error: &str) -> u32 {
        tracing::warn!(subscription = %self.name, %error, "subscription page failed; retrying");
        let mut state = self.lock();
        state.0 = SubscriptionState::Retrying;
        state.2 = Some(error.to_owned());
        drop(state);
        self.failures.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Sleeps unless stopped (or resumed, which ends an open breaker); false when stopped.
    async fn sleep(&self, stop: &CancellationToken, wait: Duration) -> bool {
        let changed = self.changed.notified();
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
            () = changed => true,
        }
    }
}

/// Another instance moved the checkpoint: this one lost its lock and must stand by.
#[derive(Debug)]
pub(super) struct Superseded;

impl std::fmt::Display for Superseded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("another instance moved the checkpoint")
    }
}

impl std::error::Error for Superseded {}

fn is_superseded(e: &ProjectionError) -> bool {
    e.downcast_ref::<Superseded>().is_some()
        || matches!(
            e.downcast_ref::<CheckpointError>(),
            Some(CheckpointError::Superseded)
        )
}

//! The loop of one subscription: catch up page by page, follow live appends, retry with
//! backoff, open the breaker, pause, rebuild, and where it starts.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use eventsource_core::store::{StoreError, StoredEvent};
use sqlx::postgres::PgListener;

use crate::store::{PostgresEventStore, StoreCursor, backend};

use super::checkpoint::{load_start, save_checkpoint, save_checkpoint_with, save_start};
use super::{ProjectionError, StartFrom, StartSnapshot, Subscription, SubscriptionState, Target};

/// The first wait before looking again at events held behind the frontier.
const HELD_BACK_FIRST_WAIT: Duration = Duration::from_millis(5);

/// A page of the feed read ahead, not yet decoded.
type FeedRows = Result<Vec<sqlx::postgres::PgRow>, StoreError>;

/// Wakes the subscriptions on every append notification.
pub(super) async fn listen(
    store: PostgresEventStore,
    wake: Arc<tokio::sync::watch::Sender<u64>>,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let mut listener = match PgListener::connect_with(store.pool()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "no LISTEN connection; subscriptions poll");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(Duration::from_secs(5)) => continue,
                }
            }
        };
        if let Err(e) = listener.listen(store.events_channel()).await {
            tracing::warn!(error = %e, "LISTEN failed; subscriptions poll");
        }
        // Appends committed before the LISTEN took hold (at start, or while the connection
        // was being re-established) sent notifications nobody heard: look once more now.
        wake.send_modify(|g| *g += 1);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                n = listener.recv() => match n {
                    Ok(_) => { wake.send_modify(|g| *g += 1); }
                    Err(e) => {
                        tracing::debug!(error = %e, "LISTEN connection lost; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}

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

    pub(super) async fn run(
        self: Arc<Self>,
        stop: tokio_util::sync::CancellationToken,
        mut woken: tokio::sync::watch::Receiver<u64>,
    ) {
        let mut cursor = loop {
            match self.initial_cursor().await {
                Ok(c) => break c,
                Err(e) => {
                    self.failed(&e.to_string());
                    if !self.sleep(&stop, self.options.retry_min).await {
                        return;
                    }
                }
            }
        };
        {
            let mut state = self.lock();
            state.0 = SubscriptionState::CatchingUp;
            state.1 = cursor;
        }
        let mut backoff = self.options.retry_min;
        // The next page, read ahead while a page is handled (catch-up only), and where from.
        let mut prefetched: Option<(StoreCursor, tokio::task::JoinHandle<FeedRows>)> = None;
        // A projector's handled position not yet written as its checkpoint, and when the
        // checkpoint was last written.
        let mut unsaved: Option<StoreCursor> = None;
        let mut held_back_wait = HELD_BACK_FIRST_WAIT;
        let mut saved_at = tokio::time::Instant::now();
        while !stop.is_cancelled() {
            if self.paused.load(Ordering::SeqCst) {
                self.flush_checkpoint(&mut unsaved).await;
                self.set_state(SubscriptionState::Paused);
                let changed = self.changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if self.paused.load(Ordering::SeqCst) {
                    tokio::select! {
                        () = stop.cancelled() => break,
                        () = changed => {}
                    }
                }
                continue;
            }
            if self.rebuild.swap(false, Ordering::SeqCst) {
                unsaved = None;
                match self.reset().await {
                    Ok(()) => {
                        cursor = StoreCursor::START;
                        self.lock().1 = cursor;
                        tracing::info!(subscription = %self.name, "rebuilding from the beginning");
                    }
                    Err(e) => {
                        self.rebuild.store(true, Ordering::SeqCst);
                        self.failed(&format!("rebuild: {e}"));
                        if !self.sleep(&stop, backoff).await {
                            break;
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
                    self.skip_visible_in(next),
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
                    if !self.sleep(&stop, backoff).await {
                        break;
                    }
                    backoff = (backoff * 2).min(self.options.retry_max);
                    continue;
                }
            };
            let Some(&(last, _)) = page.last() else {
                // Caught up: the checkpoint is written before the wait.
                self.flush_checkpoint(&mut unsaved).await;
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
                    () = stop.cancelled() => break,
                    _ = woken.changed() => {}
                    () = changed => {}
                    () = tokio::time::sleep(wait) => {}
                }
                continue;
            };
            let events: Vec<StoredEvent> = page.into_iter().map(|(_, e)| e).collect();
            let caught_up = events.len() < self.options.page_size;
            let checkpoint = caught_up || saved_at.elapsed() >= self.options.checkpoint_interval;
            match self.handle(&events, last, checkpoint).await {
                Ok(()) => {
                    if checkpoint {
                        unsaved = None;
                        saved_at = tokio::time::Instant::now();
                    } else {
                        unsaved = Some(last);
                    }
                    cursor = last;
                    backoff = self.options.retry_min;
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
                Err(e) => {
                    let failures = self.failed(&e.to_string());
                    let wait = if failures >= self.options.breaker_threshold {
                        tracing::error!(subscription = %self.name, failures, error = %e, "circuit breaker open");
                        self.set_state(SubscriptionState::BreakerOpen);
                        self.failures.store(0, Ordering::SeqCst);
                        backoff = self.options.retry_min;
                        self.options.breaker_cooldown
                    } else {
                        let wait = backoff;
                        backoff = (backoff * 2).min(self.options.retry_max);
                        wait
                    };
                    if !self.sleep(&stop, wait).await {
                        break;
                    }
                }
            }
        }
        if let Some((_, task)) = prefetched {
            task.abort();
        }
        self.flush_checkpoint(&mut unsaved).await;
        self.set_state(SubscriptionState::Idle);
    }

    /// Writes a projector's checkpoint that the interval held back (pause, stop). A failure
    /// is logged: the events after the stored checkpoint are delivered again next time.
    async fn flush_checkpoint(&self, unsaved: &mut Option<StoreCursor>) {
        if let Some(cursor) = unsaved.take()
            && let Err(e) =
                save_checkpoint(self.store.pool(), &self.store, &self.name, cursor).await
        {
            tracing::warn!(subscription = %self.name, error = %e,
                "checkpoint not written; events after the last one are delivered again");
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
    async fn sleep(&self, stop: &tokio_util::sync::CancellationToken, wait: Duration) -> bool {
        let changed = self.changed.notified();
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
            () = changed => true,
        }
    }

    /// The stored checkpoint, or the start position written as the first checkpoint. "At the
    /// end" is the head behind the frontier together with the snapshot it was read in (stored
    /// with it, so a restart before the position passes it skips the same events).
    async fn initial_cursor(&self) -> Result<StoreCursor, StoreError> {
        let (cursor, snapshot) = match load_start(&self.store, &self.name).await? {
            Some(stored) => stored,
            None => {
                let (start, snapshot) = match self.options.start {
                    StartFrom::Beginning => (StoreCursor::START, None),
                    StartFrom::End => {
                        let (head, snapshot) = self.store.head_and_snapshot().await?;
                        (head, Some(snapshot))
                    }
                };
                save_start(
                    self.store.pool(),
                    &self.store,
                    &self.name,
                    start,
                    snapshot.as_deref(),
                )
                .await?;
                (start, snapshot)
            }
        };
        *self
            .start_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) =
            snapshot.as_deref().map(StartSnapshot::parse).transpose()?;
        Ok(cursor)
    }

    /// Handles a page; a projector's checkpoint is written only when `checkpoint` is set.
    async fn handle(
        &self,
        events: &[StoredEvent],
        last: StoreCursor,
        checkpoint: bool,
    ) -> Result<(), ProjectionError> {
        match &self.target {
            Target::Projector(p) => {
                p.handle(events).await?;
                if checkpoint {
                    save_checkpoint_with(self.store.pool(), &self.store, &self.name, last, false)
                        .await?;
                }
            }
            Target::ReadModel(m) => {
                let mut tx = self.store.pool().begin().await.map_err(backend)?;
                m.apply(&mut tx, events).await?;
                save_checkpoint(&mut *tx, &self.store, &self.name, last).await?;
                tx.commit().await.map_err(backend)?;
            }
        }
        Ok(())
    }

    async fn reset(&self) -> Result<(), ProjectionError> {
        match &self.target {
            Target::Projector(p) => {
                p.reset().await?;
                save_start(
                    self.store.pool(),
                    &self.store,
                    &self.name,
                    StoreCursor::START,
                    None,
                )
                .await?;
            }
            Target::ReadModel(m) => {
                let mut tx = self.store.pool().begin().await.map_err(backend)?;
                m.reset(&mut tx).await?;
                save_start(&mut *tx, &self.store, &self.name, StoreCursor::START, None).await?;
                tx.commit().await.map_err(backend)?;
            }
        }
        // A rebuild replays the whole history: nothing is skipped any more.
        *self
            .start_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }
}

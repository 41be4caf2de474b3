//! Catch-up subscriptions: projections fed from the store's global feed, from their stored
//! checkpoint, then following new appends — with retries, a circuit breaker, pause and
//! resume, lag, rebuild, and a graceful stop.
//!
//! **Catch-up and live are one loop.** A subscription pages through the store in its global
//! order ([`PostgresEventStore::read_feed`], bounded memory: one page) and, once a page comes
//! back empty, waits for the store's append notification (`LISTEN/NOTIFY`, with polling as a
//! fallback) and reads on from the same cursor. There is no switch to another source, so no
//! gap or duplicate at the switch: live events are read exactly like history. (Following the
//! Redis bus instead would mean joining two sequences — the store's and the stream's — whose
//! ids do not correspond, on a stream that may be trimmed.)
//!
//! **Checkpoints live in PostgreSQL** (`{table}_checkpoints`). A [`ReadModel`] in the same
//! database applies each page and stores the checkpoint in one transaction: exactly once. A
//! [`Projector`] (any storage) handles a page, then the checkpoint is stored: at least once —
//! a crash between the two hands the page to it again.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventsource_core::BoxFuture;
use eventsource_core::store::{StoreError, StoredEvent};
use serde::Serialize;
use sqlx::postgres::{PgConnection, PgListener};

use crate::store::{FeedFilter, PostgresEventStore, StoreCursor, backend};

/// A projection's error (any error type).
pub type ProjectionError = Box<dyn std::error::Error + Send + Sync>;

/// A projection fed by a subscription, at least once: a page is handled, then the checkpoint
/// is stored, so after a crash between the two the same page comes again. Make `handle`
/// idempotent (by event id or position).
pub trait Projector: Send + Sync + 'static {
    /// Handles one page of events, in the store's order.
    fn handle<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>>;

    /// Clears what the projection built (a rebuild starts from nothing). Default: nothing.
    fn reset(&self) -> BoxFuture<'_, Result<(), ProjectionError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A shared projector (keep a handle to read what it built).
impl<P: Projector> Projector for Arc<P> {
    fn handle<'a>(
        &'a self,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>> {
        (**self).handle(events)
    }

    fn reset(&self) -> BoxFuture<'_, Result<(), ProjectionError>> {
        (**self).reset()
    }
}

/// A read model in the store's own database: each page is applied and the checkpoint stored
/// in **one transaction**, so every event is applied exactly once, crashes included.
pub trait ReadModel: Send + Sync + 'static {
    /// Applies one page of events inside `tx` (do not commit it).
    fn apply<'a>(
        &'a self,
        tx: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ProjectionError>>;

    /// Clears the read model inside `tx` (a rebuild starts from nothing; e.g. `TRUNCATE`).
    fn reset<'a>(&'a self, tx: &'a mut PgConnection) -> BoxFuture<'a, Result<(), ProjectionError>>;
}

/// Where a subscription without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// From the first event (builds the projection from the whole history).
    #[default]
    Beginning,
    /// Only what commits after it first starts. The start position and the snapshot it was
    /// read in are stored as its first checkpoint, so an event committed before the start is
    /// skipped even where it sorts after that position (behind a writing transaction still
    /// open at the start), and one committed by that open transaction later is delivered.
    End,
}

/// How a subscription reads, retries and backs off.
#[derive(Debug, Clone)]
pub struct SubscriptionOptions {
    /// Where to start when no checkpoint is stored. Default [`StartFrom::Beginning`].
    pub start: StartFrom,
    /// Events per page (per handler call, per checkpoint). Default 500.
    pub page_size: usize,
    /// Only these events (event types, tenant, aggregate type). Default: all.
    pub filter: FeedFilter,
    /// First retry delay after a failed page; doubles per failure. Default 100 ms.
    pub retry_min: Duration,
    /// Longest retry delay. Default 10 s.
    pub retry_max: Duration,
    /// Failures in a row that open the circuit breaker (the subscription then waits
    /// `breaker_cooldown` before trying again, and reports it). Default 5.
    pub breaker_threshold: u32,
    /// How long the breaker stays open. Default 30 s.
    pub breaker_cooldown: Duration,
    /// Longest wait for new events when no notification arrives. Default 1 s.
    pub poll_interval: Duration,
    /// For projectors (at-least-once): how often the checkpoint is written while catching up,
    /// as Kafka consumers commit offsets at an interval. It is also written whenever the
    /// subscription has caught up, before it pauses, and when it stops; after a crash, up to
    /// this much of the catch-up is delivered again. `Duration::ZERO`: after every page.
    /// Read models ignore it (their checkpoint is in every page's transaction). Default 1 s.
    pub checkpoint_interval: Duration,
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        Self {
            start: StartFrom::Beginning,
            page_size: 500,
            filter: FeedFilter::default(),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

/// What a subscription is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionState {
    /// Not started yet, or stopped.
    Idle,
    /// Started and reading history (the last page was full, or none was read yet).
    CatchingUp,
    /// Caught up, following new appends.
    Live,
    /// Paused by [`SubscriptionHandle::pause`].
    Paused,
    /// The last page failed; retrying with backoff.
    Retrying,
    /// `breaker_threshold` failures in a row: waiting `breaker_cooldown`.
    BreakerOpen,
}

/// A subscription's state, position and counters.
#[derive(Debug, Clone, Serialize)]
pub struct SubscriptionStatus {
    /// Its name (the checkpoint's key).
    pub name: String,
    /// What it is doing.
    pub state: SubscriptionState,
    /// The last event handled (its checkpoint).
    pub checkpoint: StoreCursor,
    /// Events handled since it started.
    pub handled: u64,
    /// Failed pages in a row.
    pub failures: u32,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

enum Target {
    Projector(Arc<dyn Projector>),
    ReadModel(Arc<dyn ReadModel>),
}

struct Subscription {
    name: String,
    options: SubscriptionOptions,
    target: Target,
    store: PostgresEventStore,
    state: Mutex<(SubscriptionState, StoreCursor, Option<String>)>,
    handled: AtomicU64,
    failures: AtomicU32,
    paused: AtomicBool,
    rebuild: AtomicBool,
    changed: tokio::sync::Notify,
    /// Set for a subscription started "at the end" until its position passes every
    /// transaction that snapshot could see.
    start_snapshot: Mutex<Option<StartSnapshot>>,
}

/// The snapshot a subscription started "at the end" took with its start position: events of
/// transactions visible in it were committed before the start and are skipped, although
/// those committed behind a then-open transaction sort after the start position.
#[derive(Debug, Clone)]
struct StartSnapshot {
    /// `pg_snapshot` text (`xmin:xmax:xip,...`).
    text: Arc<str>,
    /// No transaction from this id on is visible in it.
    xmax: u64,
}

impl StartSnapshot {
    fn parse(text: &str) -> Result<Self, StoreError> {
        let xmax = text.split(':').nth(1).unwrap_or_default();
        Ok(Self {
            xmax: crate::store::parse_xid(xmax)?,
            text: text.into(),
        })
    }
}

/// Controls one subscription (cheap to clone).
#[derive(Clone)]
pub struct SubscriptionHandle(Arc<Subscription>);

impl std::fmt::Debug for SubscriptionHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionHandle")
            .field("name", &self.0.name)
            .finish()
    }
}

impl SubscriptionHandle {
    /// The subscription's name.
    pub fn name(&self) -> &str {
        &self.0.name
    }

    /// Stops handling after the current page (the checkpoint stays); see [`resume`](Self::resume).
    pub fn pause(&self) {
        self.0.paused.store(true, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }

    /// Resumes a paused subscription (also closes an open breaker).
    pub fn resume(&self) {
        self.0.paused.store(false, Ordering::SeqCst);
        self.0.failures.store(0, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }

    /// Asks for a rebuild: the projection is reset (its `reset` hook), the checkpoint goes
    /// back to the beginning, and the subscription catches up again. Done by the running
    /// subscription between pages.
    pub fn rebuild(&self) {
        self.0.rebuild.store(true, Ordering::SeqCst);
        self.0.changed.notify_waiters();
    }

    /// State, checkpoint and counters.
    pub fn status(&self) -> SubscriptionStatus {
        let (state, checkpoint, last_error) = self.0.lock().clone();
        SubscriptionStatus {
            name: self.0.name.clone(),
            state,
            checkpoint,
            handled: self.0.handled.load(Ordering::Relaxed),
            failures: self.0.failures.load(Ordering::Relaxed),
            last_error,
        }
    }

    /// Events (matching the filter) not yet handled, up to the commit-safe frontier.
    ///
    /// # Errors
    /// [`StoreError`] when the store fails.
    pub async fn lag(&self) -> Result<u64, StoreError> {
        let checkpoint = self.0.lock().1;
        let skip = self.0.skip_visible_in(checkpoint);
        self.0
            .store
            .count_feed(checkpoint, &self.0.options.filter, skip.as_deref())
            .await
    }
}

/// Runs catch-up subscriptions on one store.
pub struct SubscriptionManager {
    store: PostgresEventStore,
    subscriptions: Vec<Arc<Subscription>>,
}

impl std::fmt::Debug for SubscriptionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionManager")
            .field("subscriptions", &self.subscriptions.len())
            .finish()
    }
}

impl SubscriptionManager {
    /// A manager for `store`'s feed.
    pub fn new(store: PostgresEventStore) -> Self {
        Self {
            store,
            subscriptions: Vec::new(),
        }
    }

    /// Adds an at-least-once projection under `name` (its checkpoint's key).
    pub fn add_projector(
        &mut self,
        name: impl Into<String>,
        projector: impl Projector,
        options: SubscriptionOptions,
    ) -> SubscriptionHandle {
        self.add(name.into(), Target::Projector(Arc::new(projector)), options)
    }

    /// Adds an exactly-once read model in the store's database under `name`.
    pub fn add_read_model(
        &mut self,
        name: impl Into<String>,
        model: impl ReadModel,
        options: SubscriptionOptions,
    ) -> SubscriptionHandle {
        self.add(name.into(), Target::ReadModel(Arc::new(model)), options)
    }

    fn add(
        &mut self,
        name: String,
        target: Target,
        options: SubscriptionOptions,
    ) -> SubscriptionHandle {
        let subscription = Arc::new(Subscription {
            name,
            options,
            target,
            store: self.store.clone(),
            state: Mutex::new((SubscriptionState::Idle, StoreCursor::START, None)),
            handled: AtomicU64::new(0),
            failures: AtomicU32::new(0),
            paused: AtomicBool::new(false),
            rebuild: AtomicBool::new(false),
            changed: tokio::sync::Notify::new(),
            start_snapshot: Mutex::new(None),
        });
        self.subscriptions.push(subscription.clone());
        SubscriptionHandle(subscription)
    }

    /// Runs every subscription until `shutdown` completes; each finishes the page in hand
    /// (handled and checkpointed) before it stops.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) {
        let stop = tokio_util::sync::CancellationToken::new();
        let (wake, _) = tokio::sync::watch::channel(0u64);
        let wake = Arc::new(wake);
        let mut tasks = tokio::task::JoinSet::new();
        for subscription in &self.subscriptions {
            let subscription = subscription.clone();
            let stop = stop.clone();
            let woken = wake.subscribe();
            tasks.spawn(async move { subscription.run(stop, woken).await });
        }
        let listener = {
            let store = self.store.clone();
            let wake = wake.clone();
            let stop = stop.clone();
            tokio::spawn(async move { listen(store, wake, stop).await })
        };
        shutdown.await;
        stop.cancel();
        while tasks.join_next().await.is_some() {}
        listener.abort();
    }
}

/// The first wait before looking again at events held behind the frontier.
const HELD_BACK_FIRST_WAIT: Duration = Duration::from_millis(5);

/// A page of the feed read ahead, not yet decoded.
type FeedRows = Result<Vec<sqlx::postgres::PgRow>, StoreError>;

/// Wakes the subscriptions on every append notification.
async fn listen(
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
    fn lock(&self) -> std::sync::MutexGuard<'_, (SubscriptionState, StoreCursor, Option<String>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state(&self, state: SubscriptionState) {
        self.lock().0 = state;
    }

    /// The start snapshot whose visible transactions the feed after `cursor` must leave out,
    /// while it can still contain any (dropped once the position passes its `xmax`).
    fn skip_visible_in(&self, cursor: StoreCursor) -> Option<Arc<str>> {
        let mut start = self
            .start_snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if start.as_ref().is_some_and(|s| cursor.tx >= s.xmax) {
            *start = None;
        }
        start.as_ref().map(|s| s.text.clone())
    }

    async fn run(
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

/// The checkpoint stored for `name`, if any.
///
/// # Errors
/// [`StoreError::Backend`].
pub async fn load_checkpoint(
    store: &PostgresEventStore,
    name: &str,
) -> Result<Option<StoreCursor>, StoreError> {
    Ok(load_start(store, name).await?.map(|(cursor, _)| cursor))
}

/// The checkpoint stored for `name` and the start snapshot stored with it, if any.
async fn load_start(
    store: &PostgresEventStore,
    name: &str,
) -> Result<Option<(StoreCursor, Option<String>)>, StoreError> {
    let sql = format!(
        "SELECT tx::text, position, start_snapshot::text FROM {} WHERE name = $1",
        store.names().checkpoints
    );
    let row: Option<(String, i64, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(name)
        .fetch_optional(store.pool())
        .await
        .map_err(backend)?;
    row.map(|(tx, position, snapshot)| {
        let cursor = StoreCursor {
            tx: crate::store::parse_xid(&tx)?,
            position: position as u64,
        };
        Ok((cursor, snapshot))
    })
    .transpose()
}

/// Writes a start position (the first checkpoint, or the beginning for a rebuild) with the
/// start snapshot that goes with it, replacing any stored one.
async fn save_start<'e, E>(
    executor: E,
    store: &PostgresEventStore,
    name: &str,
    cursor: StoreCursor,
    snapshot: Option<&str>,
) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let sql = format!(
        "INSERT INTO {} (name, tx, position, start_snapshot, updated_at) \
         VALUES ($1, ($2::text)::xid8, $3, ($4::text)::pg_snapshot, now()) \
         ON CONFLICT (name) DO UPDATE SET tx = EXCLUDED.tx, position = EXCLUDED.position, \
         start_snapshot = EXCLUDED.start_snapshot, updated_at = now()",
        store.names().checkpoints
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(name)
        .bind(cursor.tx.to_string())
        .bind(i64::try_from(cursor.position).unwrap_or(i64::MAX))
        .bind(snapshot)
        .execute(executor)
        .await
        .map_err(backend)?;
    Ok(())
}

async fn save_checkpoint<'e, E>(
    executor: E,
    store: &PostgresEventStore,
    name: &str,
    cursor: StoreCursor,
) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    save_checkpoint_with(executor, store, name, cursor, true).await
}

/// `durable: false` commits without waiting for the WAL flush (`synchronous_commit` off for
/// this statement): for an at-least-once projector, a checkpoint lost in a database crash
/// only means pages delivered again, and catch-up does not wait on a disk flush per page.
async fn save_checkpoint_with<'e, E>(
    executor: E,
    store: &PostgresEventStore,
    name: &str,
    cursor: StoreCursor,
    durable: bool,
) -> Result<(), StoreError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let sql = format!(
        "INSERT INTO {} (name, tx, position, updated_at) \
         SELECT $1, ($2::text)::xid8, $3, now() {} \
         ON CONFLICT (name) DO UPDATE SET tx = EXCLUDED.tx, position = EXCLUDED.position, \
         updated_at = now()",
        store.names().checkpoints,
        if durable {
            ""
        } else {
            "FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"
        }
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(name)
        .bind(cursor.tx.to_string())
        .bind(i64::try_from(cursor.position).unwrap_or(i64::MAX))
        .execute(executor)
        .await
        .map_err(backend)?;
    Ok(())
}

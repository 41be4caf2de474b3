//! The transactional outbox relay: publishes outbox rows written by appends to any
//! [`EventPublisher`], in order, marking them published.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use eventsource_core::{EventEnvelope, EventPublisher};
use serde::Serialize;
use sqlx::Row;
use sqlx::postgres::PgListener;

use crate::PostgresEventStore;
use crate::store::backend;

/// How a relay behaves.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Rows published per round (one publish call). Default 100.
    pub batch_size: usize,
    /// Longest sleep when idle: LISTEN/NOTIFY wakes the relay at once on a new row; this poll
    /// is the fallback. Default 1 s.
    pub poll_interval: Duration,
    /// First retry delay after a failed publish; doubles per attempt. Default 200 ms.
    pub retry_base: Duration,
    /// Longest retry delay. Default 30 s.
    pub retry_max: Duration,
    /// How long one publish call may take before it counts as failed (recorded and retried
    /// like any failure). A round holds its transaction, and with it the relay lock, while
    /// publishing, so a publisher that never answers must not hold them forever. Default 30 s.
    pub publish_timeout: Duration,
    /// Published rows older than this are deleted by [`OutboxRelay::cleanup`] (and by the
    /// relay once a minute). Default 7 days.
    pub retention: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            batch_size: 100,
            poll_interval: Duration::from_secs(1),
            retry_base: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(30),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// Outbox counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct OutboxStats {
    /// Rows not yet published (quarantined rows not included).
    pub pending: u64,
    /// Rows published (and not yet cleaned up).
    pub published: u64,
    /// Pending rows whose last attempt failed.
    pub failed: u64,
    /// Rows set aside because their stored event does not decode; an operator retries or
    /// skips them ([`retry_quarantined`], [`skip_quarantined`]).
    pub quarantined: u64,
    /// Quarantined rows an operator chose to skip (never published).
    pub skipped: u64,
}

/// A row set aside by the relay, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct QuarantinedRow {
    /// The outbox row's id (what [`retry_quarantined`] and [`skip_quarantined`] take).
    pub id: i64,
    /// The event's global position in the store.
    pub position: i64,
    /// The event.
    pub event_id: uuid::Uuid,
    /// Its aggregate.
    pub aggregate_id: uuid::Uuid,
    /// Attempts so far.
    pub attempts: i32,
    /// Why it was set aside.
    pub last_error: Option<String>,
    /// When, as RFC 3339.
    pub quarantined_at: String,
}

/// What one relay round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum RoundOutcome {
    /// Published this many rows.
    Published(usize),
    /// Every row taken this round had a stored event that does not decode: this many were
    /// quarantined, nothing was published.
    Quarantined(usize),
    /// Nothing was due.
    Idle,
    /// Another relay holds the relay lock; this one waits.
    Standby,
    /// Publishing failed; the rows were rescheduled with backoff.
    Failed,
}

/// Publishes a store's outbox to an [`EventPublisher`].
///
/// **Guarantees.** A committed event is published at least once: the outbox row is written
/// in the append's transaction and stays pending until a publish succeeded. Rows are
/// published in order as far as they are committed: each aggregate's events in version
/// order. Appends to different aggregates run in parallel, and a row whose transaction commits
/// late is published when it commits, after rows written later by other aggregates. Several relays may run; a transaction-scoped advisory lock lets
/// one of them publish at a time (the others stand by), so no row is published twice
/// concurrently and order is kept across relays. A relay killed after publishing and before
/// marking the rows published makes the next round publish them again: duplicates (same
/// `event_id`) are possible, losses are not.
///
/// **Never stalled by one row.** A failed publish (an error, or no answer within
/// `publish_timeout`) holds the rows back in order and retries them with backoff. A row whose
/// stored event no longer decodes cannot be helped by retrying: it is *quarantined* — set
/// aside with the reason recorded, counted in [`OutboxStats::quarantined`] — and the rows
/// after it keep flowing (the quarantined event, when retried later, is published after
/// them). [`retry_quarantined`] puts it back in line, [`skip_quarantined`] gives it up.
pub struct OutboxRelay {
    store: PostgresEventStore,
    publisher: Arc<dyn EventPublisher>,
    config: RelayConfig,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("outbox", &self.store.outbox_table())
            .field("config", &self.config)
            .finish()
    }
}

impl OutboxRelay {
    /// A relay for `store`'s outbox publishing to `publisher`.
    pub fn new(
        store: PostgresEventStore,
        publisher: Arc<dyn EventPublisher>,
        config: RelayConfig,
    ) -> Self {
        Self {
            store,
            publisher,
            config,
        }
    }

    /// One round: lock, take the due rows in order, publish them in one call, mark them.
    ///
    /// # Errors
    /// Database errors (publish errors are recorded on the rows and reported as
    /// [`RoundOutcome::Failed`]).
    pub async fn run_once(&self) -> Result<RoundOutcome, eventsource_core::StoreError> {
        let names = self.store.names();
        let mut tx = self.store.pool().begin().await.map_err(backend)?;
        // The round's commit does not wait for the WAL flush: a mark lost in a database crash
        // means those rows are published again (at least once allows it), and no round waits
        // on the disk while new rows queue up behind it.
        let leader: bool = sqlx::query_scalar(
            "SELECT pg_try_advisory_xact_lock($1) \
             FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit",
        )
        .bind(names.relay_lock_key)
        .fetch_one(&mut *tx)
        .await
        .map_err(backend)?;
        if !leader {
            return Ok(RoundOutcome::Standby);
        }
        let sql = format!(
            "SELECT o.id, e.payload::text, o.next_attempt_at <= now() \
             FROM {outbox} o JOIN {events} e ON e.position = o.position \
             WHERE o.published_at IS NULL AND o.quarantined_at IS NULL ORDER BY o.id LIMIT $1",
            outbox = names.outbox,
            events = names.events
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(self.config.batch_size as i64)
            .fetch_all(&mut *tx)
            .await
            .map_err(backend)?;
        if rows.is_empty() {
            tx.commit().await.map_err(backend)?;
            return Ok(RoundOutcome::Idle);
        }
        // In order: the first row not yet due stops the round, so a failing row is never
        // overtaken by later ones.
        let due: bool = rows[0].get(2);
        if !due {
            tx.commit().await.map_err(backend)?;
            return Ok(RoundOutcome::Idle);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut events = Vec::with_capacity(rows.len());
        let mut quarantined = 0usize;
        for row in &rows {
            let id: i64 = row.get(0);
            let payload: &str = row.get(1);
            match EventEnvelope::from_json_str(payload) {
                Ok(event) => {
                    ids.push(id);
                    events.push(event);
                }
                Err(e) => {
                    let reason = format!(
                        "stored event does not decode: {e}; fix the row and retry it, or skip it"
                    );
                    tracing::error!(outbox_id = id, %reason, "outbox row quarantined");
                    let sql = format!(
                        "UPDATE {outbox} SET quarantined_at = now(), attempts = attempts + 1, \
                         last_error = $2 WHERE id = $1",
                        outbox = names.outbox
                    );
                    sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(id)
                        .bind(&reason)
                        .execute(&mut *tx)
                        .await
                        .map_err(backend)?;
                    quarantined += 1;
                }
            }
        }
        if events.is_empty() {
            tx.commit().await.map_err(backend)?;
            return Ok(RoundOutcome::Quarantined(quarantined));
        }
        crate::failpoint("before_publish").await;
        let published =
            tokio::time::timeout(self.config.publish_timeout, self.publisher.publish(&events))
                .await
                .unwrap_or_else(|_| {
                    Err(eventsource_core::bus::BusError::transport(
                        eventsource_core::ErrorKind::Timeout,
                        format!(
                            "publish did not complete within publish_timeout ({} ms)",
                            self.config.publish_timeout.as_millis()
                        ),
                    ))
                });
        match published {
            Ok(()) => {
                crate::failpoint("after_publish").await;
                let sql = format!(
                    "UPDATE {outbox} SET published_at = now(), attempts = attempts + 1, last_error = NULL \
                     WHERE id = ANY($1)",
                    outbox = names.outbox
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(&ids)
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?;
                tx.commit().await.map_err(backend)?;
                Ok(RoundOutcome::Published(ids.len()))
            }
            Err(e) => {
                let reason = eventsource_core::bus::BusError::to_string(&e);
                tracing::warn!(error = %reason, rows = ids.len(), "outbox publish failed; will retry with backoff");
                let sql = format!(
                    "UPDATE {outbox} SET attempts = attempts + 1, last_error = $2, \
                     next_attempt_at = now() + make_interval(secs => LEAST($3::float8 * power(2, LEAST(attempts, 30)), $4::float8)) \
                     WHERE id = ANY($1)",
                    outbox = names.outbox
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(&ids)
                    .bind(&reason)
                    .bind(self.config.retry_base.as_secs_f64())
                    .bind(self.config.retry_max.as_secs_f64())
                    .execute(&mut *tx)
                    .await
                    .map_err(backend)?;
                tx.commit().await.map_err(backend)?;
                Ok(RoundOutcome::Failed)
            }
        }
    }

    /// Runs rounds until `shutdown` completes: publishes while rows are due, then sleeps until
    /// a NOTIFY from an append or `poll_interval`. Cleans up published rows older than the
    /// retention once a minute. `shutdown` is looked at between rounds, also while a backlog
    /// is being worked off; a round in progress (publish and mark) finishes first.
    ///
    /// It does not fail: database and publish errors are logged and retried (publish errors
    /// are also recorded on the rows); if LISTEN cannot be set up the relay logs it and polls.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut listener = match PgListener::connect_with(self.store.pool()).await {
            Ok(mut l) => match l.listen(&self.store.names().channel).await {
                Ok(()) => Some(l),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN failed; the relay polls");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "no listener connection; the relay polls");
                None
            }
        };
        let mut last_cleanup = tokio::time::Instant::now();
        loop {
            // A shutdown that completed stops the relay before the next round, backlog or not.
            let stopped = tokio::select! {
                biased;
                () = &mut shutdown => true,
                () = std::future::ready(()) => false,
            };
            if stopped {
                break;
            }
            let outcome = self.run_once().await;
            let busy = matches!(outcome, Ok(RoundOutcome::Published(n)) if n > 0)
                || matches!(outcome, Ok(RoundOutcome::Quarantined(_)));
            if let Err(e) = &outcome {
                tracing::warn!(error = %e, "outbox round failed; retrying");
            }
            if last_cleanup.elapsed() > Duration::from_secs(60) {
                last_cleanup = tokio::time::Instant::now();
                if let Err(e) = self.cleanup().await {
                    tracing::warn!(error = %e, "outbox cleanup failed");
                }
            }
            if busy {
                continue;
            }
            let wait = match outcome {
                Ok(RoundOutcome::Failed) | Err(_) => self.config.retry_base,
                _ => self.config.poll_interval,
            };
            let woken = async {
                match listener.as_mut() {
                    Some(l) => {
                        let _ = tokio::time::timeout(wait, l.recv()).await;
                    }
                    None => tokio::time::sleep(wait).await,
                }
            };
            tokio::select! {
                () = &mut shutdown => break,
                () = woken => {}
            }
        }
    }

    /// Deletes published rows older than the retention. Returns how many.
    ///
    /// # Errors
    /// Database errors.
    pub async fn cleanup(&self) -> Result<u64, eventsource_core::StoreError> {
        let sql = format!(
            "DELETE FROM {outbox} WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => $1)",
            outbox = self.store.names().outbox
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(self.config.retention.as_secs_f64())
            .execute(self.store.pool())
            .await
            .map_err(backend)?;
        Ok(done.rows_affected())
    }

    /// Pending, published and failed row counts.
    ///
    /// # Errors
    /// Database errors.
    pub async fn stats(&self) -> Result<OutboxStats, eventsource_core::StoreError> {
        outbox_stats(&self.store).await
    }

    /// The last error recorded on a pending row, oldest first, if any.
    ///
    /// # Errors
    /// Database errors.
    pub async fn last_error(&self) -> Result<Option<String>, eventsource_core::StoreError> {
        let sql = format!(
            "SELECT last_error FROM {outbox} WHERE published_at IS NULL AND last_error IS NOT NULL ORDER BY id LIMIT 1",
            outbox = self.store.names().outbox
        );
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_optional(self.store.pool())
            .await
            .map_err(backend)
    }
}

/// Pending, published and failed row counts of a store's outbox.
///
/// # Errors
/// Database errors.
pub async fn outbox_stats(
    store: &PostgresEventStore,
) -> Result<OutboxStats, eventsource_core::StoreError> {
    let sql = format!(
        "SELECT COUNT(*) FILTER (WHERE published_at IS NULL AND quarantined_at IS NULL), \
                COUNT(*) FILTER (WHERE published_at IS NOT NULL), \
                COUNT(*) FILTER (WHERE published_at IS NULL AND quarantined_at IS NULL \
                                 AND last_error IS NOT NULL), \
                COUNT(*) FILTER (WHERE quarantined_at IS NOT NULL AND skipped_at IS NULL), \
                COUNT(*) FILTER (WHERE skipped_at IS NOT NULL) \
         FROM {outbox}",
        outbox = store.names().outbox
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_one(store.pool())
        .await
        .map_err(backend)?;
    Ok(OutboxStats {
        pending: row.get::<i64, _>(0) as u64,
        published: row.get::<i64, _>(1) as u64,
        failed: row.get::<i64, _>(2) as u64,
        quarantined: row.get::<i64, _>(3) as u64,
        skipped: row.get::<i64, _>(4) as u64,
    })
}

/// The quarantined rows (not skipped), oldest first, at most `limit`.
///
/// # Errors
/// Database errors.
pub async fn quarantined_rows(
    store: &PostgresEventStore,
    limit: usize,
) -> Result<Vec<QuarantinedRow>, eventsource_core::StoreError> {
    let sql = format!(
        "SELECT id, position, event_id, aggregate_id, attempts, last_error, \
                to_char(quarantined_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') \
         FROM {outbox} WHERE quarantined_at IS NOT NULL AND skipped_at IS NULL \
         ORDER BY id LIMIT $1",
        outbox = store.names().outbox
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(store.pool())
        .await
        .map_err(backend)?;
    Ok(rows
        .iter()
        .map(|r| QuarantinedRow {
            id: r.get(0),
            position: r.get(1),
            event_id: r.get(2),
            aggregate_id: r.get(3),
            attempts: r.get(4),
            last_error: r.get(5),
            quarantined_at: r.get(6),
        })
        .collect())
}

/// Puts quarantined rows back in line (one by id, or all with `None`): the relay tries them
/// again in its next round — after the rows that went on meanwhile. Fix the stored event
/// first, or it is quarantined again. Returns how many rows were released.
///
/// # Errors
/// Database errors.
pub async fn retry_quarantined(
    store: &PostgresEventStore,
    id: Option<i64>,
) -> Result<u64, eventsource_core::StoreError> {
    let sql = format!(
        "UPDATE {outbox} SET quarantined_at = NULL, next_attempt_at = now() \
         WHERE quarantined_at IS NOT NULL AND skipped_at IS NULL AND ($1::bigint IS NULL OR id = $1)",
        outbox = store.names().outbox
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .execute(store.pool())
        .await
        .map_err(backend)?;
    Ok(done.rows_affected())
}

/// Gives up a quarantined row: it is never published (its event stays in the store). Returns
/// whether such a row existed.
///
/// # Errors
/// Database errors.
pub async fn skip_quarantined(
    store: &PostgresEventStore,
    id: i64,
) -> Result<bool, eventsource_core::StoreError> {
    let sql = format!(
        "UPDATE {outbox} SET skipped_at = now() \
         WHERE id = $1 AND quarantined_at IS NOT NULL AND skipped_at IS NULL",
        outbox = store.names().outbox
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .execute(store.pool())
        .await
        .map_err(backend)?;
    Ok(done.rows_affected() == 1)
}

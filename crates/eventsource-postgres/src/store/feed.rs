//! The feed subscriptions read: events in `(transaction id, position)` order up to the
//! commit-safe frontier, filters, the head, lag and held-back checks.

use eventsource_core::store::{StoreError, StoredEvent};
use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::{PostgresEventStore, backend, stored_event};

/// Binds `$1`–`$6` of a feed query (see `FEED_FILTER`): the cursor's transaction id and
/// position, tenant, aggregate type, event types, and the start snapshot to leave out.
macro_rules! bind_feed {
    ($query:expr, $after:expr, $filter:expr, $skip:expr) => {
        $query
            .bind($after.tx.to_string())
            .bind(i64::try_from($after.position).unwrap_or(i64::MAX))
            .bind($filter.tenant_id)
            .bind($filter.aggregate_type.as_deref())
            .bind($filter.event_types.as_deref())
            .bind($skip)
    };
}

impl PostgresEventStore {
    /// Up to `limit` events after `after` in the store's order — `(transaction id, position)`
    /// — that match `filter`, each with its cursor. Only events of transactions older than
    /// every transaction still running are returned (the commit-safe frontier): an append
    /// that commits later always sorts after them, so a reader that moves its cursor forward
    /// never skips an event, however appends interleave. A long-running writing transaction
    /// anywhere in the cluster holds the frontier back while it runs.
    ///
    /// # Errors
    /// [`StoreError::Backend`], or [`StoreError::Event`] for a stored event that no longer
    /// decodes.
    pub async fn read_feed(
        &self,
        after: StoreCursor,
        filter: &FeedFilter,
        limit: usize,
    ) -> Result<Vec<(StoreCursor, StoredEvent)>, StoreError> {
        let rows = self.read_feed_rows(after, filter, None, limit).await?;
        decode_feed_rows(&rows)
    }

    /// One page of the feed as rows, not yet decoded (a subscription decodes a page while the
    /// next one is being read). `skip_visible_in`: a snapshot (`pg_snapshot` text) whose
    /// visible transactions are left out (see `FEED_FILTER`).
    pub(crate) async fn read_feed_rows(
        &self,
        after: StoreCursor,
        filter: &FeedFilter,
        skip_visible_in: Option<&str>,
        limit: usize,
    ) -> Result<Vec<PgRow>, StoreError> {
        let sql = format!(
            // `e.tx` (the xid8 column) everywhere: an output column named `tx` would be
            // the text form, and ordered as text transaction 10 comes before transaction 9.
            "SELECT e.position, e.stored_at, e.payload::text AS payload, e.tx::text AS tx_text \
             FROM {events} e \
             WHERE (e.tx, e.position) > (($1::text)::xid8, $2) \
               AND e.tx < pg_snapshot_xmin(pg_current_snapshot()) {FEED_FILTER} \
             ORDER BY e.tx, e.position LIMIT $7",
            events = self.names.events
        );
        bind_feed!(
            sqlx::query(sqlx::AssertSqlSafe(sql)),
            after,
            filter,
            skip_visible_in
        )
        .bind(i64::try_from(limit.max(1)).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await
        .map_err(backend)
    }

    /// The cursor of the newest event behind the commit-safe frontier (where a subscription
    /// starting "at the end" begins).
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    pub async fn head(&self) -> Result<StoreCursor, StoreError> {
        Ok(self.head_and_snapshot().await?.0)
    }

    /// [`head`](Self::head) and the snapshot (`pg_snapshot` text) it was taken in, read in
    /// one statement: the events of transactions not visible in that snapshot are exactly
    /// those committed after it, wherever they sort.
    pub(crate) async fn head_and_snapshot(&self) -> Result<(StoreCursor, String), StoreError> {
        let sql = format!(
            "SELECT s.snap::text, h.tx::text, h.position \
             FROM (SELECT pg_current_snapshot() AS snap) s \
             LEFT JOIN LATERAL (SELECT e.tx, e.position FROM {events} e \
                 WHERE e.tx < pg_snapshot_xmin(s.snap) \
                 ORDER BY e.tx DESC, e.position DESC LIMIT 1) h ON true",
            events = self.names.events
        );
        let (snapshot, tx, position): (String, Option<String>, Option<i64>) =
            sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_one(&self.pool)
                .await
                .map_err(backend)?;
        let head = match (tx, position) {
            (Some(tx), Some(position)) => StoreCursor {
                tx: parse_xid(&tx)?,
                position: position as u64,
            },
            _ => StoreCursor::START,
        };
        Ok((head, snapshot))
    }

    /// How many events lie between `after` and the frontier (a subscription's lag).
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    pub async fn count_after(
        &self,
        after: StoreCursor,
        filter: &FeedFilter,
    ) -> Result<u64, StoreError> {
        self.count_feed(after, filter, None).await
    }

    /// [`count_after`](Self::count_after), leaving out what `skip_visible_in` shows.
    pub(crate) async fn count_feed(
        &self,
        after: StoreCursor,
        filter: &FeedFilter,
        skip_visible_in: Option<&str>,
    ) -> Result<u64, StoreError> {
        let sql = format!(
            "SELECT COUNT(*) FROM {events} e \
             WHERE (e.tx, e.position) > (($1::text)::xid8, $2) \
               AND e.tx < pg_snapshot_xmin(pg_current_snapshot()) {FEED_FILTER}",
            events = self.names.events
        );
        let n: i64 = bind_feed!(
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)),
            after,
            filter,
            skip_visible_in
        )
        .fetch_one(&self.pool)
        .await
        .map_err(backend)?;
        Ok(n as u64)
    }

    /// Whether committed events after `after` (matching `filter`) wait behind the frontier:
    /// an older writing transaction is still open somewhere in the cluster. A reader that
    /// found nothing should look again soon rather than wait for the next notification.
    ///
    /// # Errors
    /// [`StoreError::Backend`].
    pub async fn held_back(
        &self,
        after: StoreCursor,
        filter: &FeedFilter,
    ) -> Result<bool, StoreError> {
        self.feed_held_back(after, filter, None).await
    }

    /// [`held_back`](Self::held_back), leaving out what `skip_visible_in` shows.
    pub(crate) async fn feed_held_back(
        &self,
        after: StoreCursor,
        filter: &FeedFilter,
        skip_visible_in: Option<&str>,
    ) -> Result<bool, StoreError> {
        let sql = format!(
            "SELECT EXISTS (SELECT 1 FROM {events} e \
             WHERE (e.tx, e.position) > (($1::text)::xid8, $2) \
               AND e.tx >= pg_snapshot_xmin(pg_current_snapshot()) {FEED_FILTER})",
            events = self.names.events
        );
        bind_feed!(
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql)),
            after,
            filter,
            skip_visible_in
        )
        .fetch_one(&self.pool)
        .await
        .map_err(backend)
    }

    /// The LISTEN/NOTIFY channel notified after appends commit (by a task of the store, off the
    /// append's path; notifications after concurrent appends may be shared).
    pub fn events_channel(&self) -> &str {
        &self.names.events_channel
    }
}

/// A place in the store's global order: the appending transaction's id, then the position.
/// Positions are unique and increase within a transaction; with parallel appends they do not
/// increase across transactions in commit order, which is why readers keep this pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
pub struct StoreCursor {
    /// The appending transaction's id (`xid8`).
    pub tx: u64,
    /// The event's position.
    pub position: u64,
}

impl StoreCursor {
    /// Before the first event.
    pub const START: Self = Self { tx: 0, position: 0 };
}

/// Which events a feed read returns.
#[derive(Debug, Clone, Default)]
pub struct FeedFilter {
    /// Only this tenant's events.
    pub tenant_id: Option<Uuid>,
    /// Only events of this aggregate type.
    pub aggregate_type: Option<String>,
    /// Only these event types (wire names).
    pub event_types: Option<Vec<String>>,
}

/// The cursor of a row of [`PostgresEventStore::read_feed_rows`].
pub(crate) fn feed_row_cursor(row: &PgRow) -> Result<StoreCursor, StoreError> {
    let tx: &str = row.try_get("tx_text").map_err(backend)?;
    let position: i64 = row.try_get("position").map_err(backend)?;
    Ok(StoreCursor {
        tx: parse_xid(tx)?,
        position: position as u64,
    })
}

/// Decodes rows of [`PostgresEventStore::read_feed_rows`].
pub(crate) fn decode_feed_rows(
    rows: &[PgRow],
) -> Result<Vec<(StoreCursor, StoredEvent)>, StoreError> {
    rows.iter()
        .map(|row| Ok((feed_row_cursor(row)?, stored_event(row)?)))
        .collect()
}

/// A transaction id as PostgreSQL prints an `xid8`.
/// The feed queries' filter on events aliased `e`: `$3` tenant, `$4` aggregate type, `$5` event
/// types, and `$6` a snapshot (`pg_snapshot` text) whose visible transactions are left out — a
/// subscription started "at the end" skips what was committed before it started, including
/// events that sort behind a transaction still open then.
const FEED_FILTER: &str = "AND ($3::uuid IS NULL OR e.tenant_id = $3) \
     AND ($4::text IS NULL OR e.aggregate_type = $4) \
     AND ($5::text[] IS NULL OR e.event_type = ANY($5)) \
     AND ($6::text IS NULL OR NOT pg_visible_in_snapshot(e.tx, ($6::text)::pg_snapshot))";

pub(crate) fn parse_xid(text: &str) -> Result<u64, StoreError> {
    text.parse()
        .map_err(|_| StoreError::Backend(format!("transaction id {text:?} is not a number").into()))
}

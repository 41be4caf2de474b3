//! Checkpoints in the store's database: load, save (durable or not), and the start
//! position with the snapshot a subscription started "at the end" keeps.

use eventsource_core::store::StoreError;

use crate::store::{PostgresEventStore, StoreCursor, backend};

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
pub(super) async fn load_start(
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

/// Writes the first checkpoint (the start position and the start snapshot that goes with it)
/// unless one is stored already (another instance started first).
pub(super) async fn insert_start(
    store: &PostgresEventStore,
    name: &str,
    cursor: StoreCursor,
    snapshot: Option<&str>,
) -> Result<(), StoreError> {
    let sql = format!(
        "INSERT INTO {} (name, tx, position, start_snapshot, updated_at) \
         VALUES ($1, ($2::text)::xid8, $3, ($4::text)::pg_snapshot, now()) \
         ON CONFLICT (name) DO NOTHING",
        store.names().checkpoints
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(name)
        .bind(cursor.tx.to_string())
        .bind(position(cursor))
        .bind(snapshot)
        .execute(store.pool())
        .await
        .map_err(backend)?;
    Ok(())
}

/// Why a checkpoint was not written.
#[derive(Debug, thiserror::Error)]
pub(super) enum CheckpointError {
    /// The stored checkpoint is not the one this instance last wrote: another instance moved
    /// it (this one lost its lock). Nothing was written.
    #[error("another instance moved the checkpoint")]
    Superseded,
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Moves the checkpoint back to the beginning for a rebuild (and clears the start snapshot),
/// if it is still `expected`.
pub(super) async fn restart<'e, E>(
    executor: E,
    store: &PostgresEventStore,
    name: &str,
    expected: StoreCursor,
) -> Result<(), CheckpointError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let sql = format!(
        "UPDATE {} SET tx = '0'::xid8, position = 0, start_snapshot = NULL, updated_at = now() \
         WHERE name = $1 AND tx = ($2::text)::xid8 AND position = $3",
        store.names().checkpoints
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(name)
        .bind(expected.tx.to_string())
        .bind(position(expected))
        .execute(executor)
        .await
        .map_err(backend)?;
    applied(done.rows_affected())
}

/// Moves the checkpoint from `expected` (what this instance last stored) to `cursor`: a
/// compare-and-set, refused with [`CheckpointError::Superseded`] when another instance moved
/// it since. Inside a read model's transaction the refusal rolls the page back; the row lock
/// the update takes makes two instances' writes wait for each other and the second one see
/// the first one's result.
///
/// `durable: false` commits without waiting for the WAL flush (`synchronous_commit` off for
/// this statement): for an at-least-once projector, a checkpoint lost in a database crash
/// only means pages delivered again, and catch-up does not wait on a disk flush per page.
pub(super) async fn save_checkpoint<'e, E>(
    executor: E,
    store: &PostgresEventStore,
    name: &str,
    expected: StoreCursor,
    cursor: StoreCursor,
    durable: bool,
) -> Result<(), CheckpointError>
where
    E: sqlx::Executor<'e, Database = sqlx::Postgres>,
{
    let sql = format!(
        "UPDATE {} SET tx = ($4::text)::xid8, position = $5, updated_at = now() {} \
         WHERE name = $1 AND tx = ($2::text)::xid8 AND position = $3",
        store.names().checkpoints,
        if durable {
            ""
        } else {
            "FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit"
        }
    );
    let done = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(name)
        .bind(expected.tx.to_string())
        .bind(position(expected))
        .bind(cursor.tx.to_string())
        .bind(position(cursor))
        .execute(executor)
        .await
        .map_err(backend)?;
    applied(done.rows_affected())
}

fn applied(rows: u64) -> Result<(), CheckpointError> {
    if rows == 1 {
        Ok(())
    } else {
        Err(CheckpointError::Superseded)
    }
}

fn position(cursor: StoreCursor) -> i64 {
    i64::try_from(cursor.position).unwrap_or(i64::MAX)
}

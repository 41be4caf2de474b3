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

/// Writes a start position (the first checkpoint, or the beginning for a rebuild) with the
/// start snapshot that goes with it, replacing any stored one.
pub(super) async fn save_start<'e, E>(
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

pub(super) async fn save_checkpoint<'e, E>(
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
pub(super) async fn save_checkpoint_with<'e, E>(
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

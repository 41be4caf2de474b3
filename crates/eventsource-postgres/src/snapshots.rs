//! Aggregate snapshots in the store's database (`{table}_snapshots`).

use eventsource_core::BoxFuture;
use eventsource_core::snapshot::{Snapshot, SnapshotStore};
use eventsource_core::store::StoreError;
use sqlx::Row;
use uuid::Uuid;

use crate::store::{PostgresEventStore, backend};

/// A [`SnapshotStore`] in the same database and schema as a [`PostgresEventStore`]: one row
/// per aggregate, replaced only by one that [`replaces`](Snapshot::replaces) it (a newer
/// shape, or the same shape at the same or a later version: old pods of a rolling deploy
/// cannot overwrite new pods' snapshots).
#[derive(Debug, Clone)]
pub struct PostgresSnapshotStore {
    store: PostgresEventStore,
}

impl PostgresSnapshotStore {
    /// Snapshots next to `store`'s events (its migrations create the table).
    pub fn new(store: PostgresEventStore) -> Self {
        Self { store }
    }
}

impl SnapshotStore for PostgresSnapshotStore {
    fn load<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
    ) -> BoxFuture<'a, Result<Option<Snapshot>, StoreError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT version, schema_version, state, taken_at FROM {} \
                 WHERE aggregate_id = $1 AND aggregate_type = $2",
                self.store.names().snapshots
            );
            let row = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(aggregate_id)
                .bind(aggregate_type)
                .fetch_optional(self.store.pool())
                .await
                .map_err(backend)?;
            Ok(row.map(|r| Snapshot {
                aggregate_id,
                aggregate_type: aggregate_type.to_owned(),
                version: r.get::<i64, _>(0) as u64,
                schema_version: r.get::<i32, _>(1) as u32,
                state: r.get(2),
                taken_at: r.get(3),
            }))
        })
    }

    fn save(&self, snapshot: Snapshot) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            let sql = format!(
                "INSERT INTO {t} (aggregate_id, aggregate_type, version, schema_version, state, taken_at) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (aggregate_id, aggregate_type) DO UPDATE SET \
                   version = EXCLUDED.version, schema_version = EXCLUDED.schema_version, \
                   state = EXCLUDED.state, taken_at = EXCLUDED.taken_at \
                 WHERE ({t}.schema_version, {t}.version) <= (EXCLUDED.schema_version, EXCLUDED.version)",
                t = self.store.names().snapshots
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(snapshot.aggregate_id)
                .bind(&snapshot.aggregate_type)
                .bind(i64::try_from(snapshot.version).unwrap_or(i64::MAX))
                .bind(i32::try_from(snapshot.schema_version).unwrap_or(i32::MAX))
                .bind(&snapshot.state)
                .bind(snapshot.taken_at)
                .execute(self.store.pool())
                .await
                .map_err(backend)?;
            Ok(())
        })
    }
}

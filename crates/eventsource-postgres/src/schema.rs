//! Embedded, idempotent migrations and the table names derived from the configuration.

use sqlx::PgPool;

/// Fully qualified names (validated identifiers only, so they are safe to format into SQL).
#[derive(Debug, Clone)]
pub(crate) struct Names {
    pub(crate) schema: String,
    pub(crate) events: String,
    pub(crate) outbox: String,
    pub(crate) migrations: String,
    /// LISTEN/NOTIFY channel woken on outbox writes.
    pub(crate) channel: String,
    /// LISTEN/NOTIFY channel woken on every append (catch-up subscriptions follow it).
    pub(crate) events_channel: String,
    /// Subscription checkpoints.
    pub(crate) checkpoints: String,
    /// Aggregate snapshots.
    pub(crate) snapshots: String,
    /// Advisory lock key serialising appends of this store.
    pub(crate) lock_key: i64,
    /// Advisory lock key making one relay at a time publish this store's outbox.
    pub(crate) relay_lock_key: i64,
}

/// A 64-bit key for `text` (advisory lock keys), stable across processes and versions.
pub(crate) fn stable_key(text: &str) -> i64 {
    eventsource_core::support::fnv1a64(text.as_bytes(), 0) as i64
}

impl Names {
    pub(crate) fn new(schema: &str, table: &str) -> Self {
        Self {
            schema: schema.to_owned(),
            events: format!("{schema}.{table}"),
            outbox: format!("{schema}.{table}_outbox"),
            migrations: format!("{schema}.{table}_migrations"),
            channel: format!("{schema}_{table}_outbox"),
            events_channel: format!("{schema}_{table}_events"),
            checkpoints: format!("{schema}.{table}_checkpoints"),
            snapshots: format!("{schema}.{table}_snapshots"),
            lock_key: stable_key(&format!("eventsource append {schema}.{table}")),
            relay_lock_key: stable_key(&format!("eventsource relay {schema}.{table}")),
        }
    }
}

/// The migrations, in the order they apply. Each runs once, recorded in `{table}_migrations`
/// with a checksum of its text; a migration is never edited once released (add one instead).
fn migrations(n: &Names) -> Vec<(i32, String)> {
    let table = n.events.rsplit('.').next().unwrap_or("events");
    vec![
        (
            1,
            format!(
                "CREATE TABLE IF NOT EXISTS {events} (
                    position       BIGSERIAL PRIMARY KEY,
                    event_id       UUID NOT NULL,
                    aggregate_id   UUID NOT NULL,
                    aggregate_type TEXT NOT NULL,
                    version        BIGINT NOT NULL CHECK (version >= 1),
                    event_type     TEXT NOT NULL,
                    tenant_id      UUID NULL,
                    actor_id       TEXT NULL,
                    occurred_at    TIMESTAMPTZ NOT NULL,
                    payload        JSONB NOT NULL CHECK (jsonb_typeof(payload) = 'object'),
                    stored_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
                    CONSTRAINT {table}_event_id_key UNIQUE (event_id),
                    CONSTRAINT {table}_stream_version_key UNIQUE (aggregate_id, aggregate_type, version)
                );
                CREATE INDEX IF NOT EXISTS {table}_type_position_idx ON {events} (aggregate_type, position);
                CREATE INDEX IF NOT EXISTS {table}_tenant_position_idx ON {events} (tenant_id, position)
                    WHERE tenant_id IS NOT NULL;",
                events = n.events
            ),
        ),
        (
            2,
            format!(
                "CREATE TABLE IF NOT EXISTS {outbox} (
                    id              BIGSERIAL PRIMARY KEY,
                    position        BIGINT NOT NULL REFERENCES {events} (position),
                    event_id        UUID NOT NULL,
                    aggregate_id    UUID NOT NULL,
                    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
                    published_at    TIMESTAMPTZ NULL,
                    attempts        INTEGER NOT NULL DEFAULT 0,
                    last_error      TEXT NULL,
                    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now()
                );
                CREATE INDEX IF NOT EXISTS {table}_outbox_pending_idx ON {outbox} (id) WHERE published_at IS NULL;
                CREATE INDEX IF NOT EXISTS {table}_outbox_published_idx ON {outbox} (published_at)
                    WHERE published_at IS NOT NULL;",
                outbox = n.outbox,
                events = n.events
            ),
        ),
        (
            3,
            format!(
                "ALTER TABLE {outbox} ADD COLUMN IF NOT EXISTS quarantined_at TIMESTAMPTZ NULL;
                ALTER TABLE {outbox} ADD COLUMN IF NOT EXISTS skipped_at TIMESTAMPTZ NULL;
                CREATE INDEX IF NOT EXISTS {table}_outbox_due_idx ON {outbox} (id)
                    WHERE published_at IS NULL AND quarantined_at IS NULL;",
                outbox = n.outbox
            ),
        ),
        (
            4,
            format!(
                "ALTER TABLE {events} ADD COLUMN IF NOT EXISTS tx xid8 NOT NULL \
                    DEFAULT pg_current_xact_id();
                CREATE INDEX IF NOT EXISTS {table}_tx_position_idx ON {events} (tx, position);
                CREATE TABLE IF NOT EXISTS {checkpoints} (
                    name       TEXT PRIMARY KEY,
                    tx         xid8 NOT NULL,
                    position   BIGINT NOT NULL,
                    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
                );",
                events = n.events,
                checkpoints = n.checkpoints
            ),
        ),
        (
            5,
            format!(
                "CREATE TABLE IF NOT EXISTS {snapshots} (
                    aggregate_id   UUID NOT NULL,
                    aggregate_type TEXT NOT NULL,
                    version        BIGINT NOT NULL,
                    schema_version INTEGER NOT NULL,
                    state          JSONB NOT NULL,
                    taken_at       TIMESTAMPTZ NOT NULL,
                    PRIMARY KEY (aggregate_id, aggregate_type)
                );",
                snapshots = n.snapshots
            ),
        ),
        (
            6,
            // A subscription started "at the end" keeps the snapshot it started in: what was
            // visible then is skipped even where it sorts after the start position.
            format!(
                "ALTER TABLE {checkpoints} ADD COLUMN IF NOT EXISTS start_snapshot pg_snapshot NULL;",
                checkpoints = n.checkpoints
            ),
        ),
    ]
}

/// Why migrating failed.
pub(crate) enum MigrateError {
    /// The database failed.
    Database(sqlx::Error),
    /// The database's schema is not what this version of the library expects.
    Schema(String),
}

impl From<sqlx::Error> for MigrateError {
    fn from(e: sqlx::Error) -> Self {
        Self::Database(e)
    }
}

/// The checksum recorded with a migration: FNV-1a 64 of its text, in hex.
fn checksum(sql: &str) -> String {
    format!(
        "{:016x}",
        eventsource_core::support::fnv1a64(sql.as_bytes(), 0)
    )
}

/// Creates the schema and applies missing migrations, under an advisory lock so concurrent
/// starts do not race. Refuses a database with a migration this version does not know (a
/// newer version of the library migrated it) or whose applied migration differs from this
/// version's text (edited by hand, or by a build that changed a released migration).
/// Databases migrated before checksums were recorded get theirs on the first start.
pub(crate) async fn migrate(pool: &PgPool, n: &Names) -> Result<(), MigrateError> {
    let mut tx = pool.begin().await?;
    match migrate_in(&mut tx, n).await {
        Ok(()) => Ok(tx.commit().await?),
        Err(e) => {
            // At once: a dropped transaction is rolled back only when its connection is next
            // used, and until then it holds the locks the migration took.
            let _ = tx.rollback().await;
            Err(e)
        }
    }
}

async fn migrate_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    n: &Names,
) -> Result<(), MigrateError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(n.lock_key ^ 0x5a5a)
        .execute(&mut **tx)
        .await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema};
         CREATE TABLE IF NOT EXISTS {migrations} (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         );
         ALTER TABLE {migrations} ADD COLUMN IF NOT EXISTS checksum TEXT NULL;",
        schema = n.schema,
        migrations = n.migrations
    )))
    .execute(&mut **tx)
    .await?;
    let applied: Vec<(i32, Option<String>)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT version, checksum FROM {} ORDER BY version",
        n.migrations
    )))
    .fetch_all(&mut **tx)
    .await?;
    let known = migrations(n);
    let latest = known.last().map_or(0, |(v, _)| *v);
    if let Some((newer, _)) = applied.iter().find(|(v, _)| *v > latest) {
        return Err(MigrateError::Schema(format!(
            "{} was migrated by a newer version of eventsource-postgres (migration {newer}; \
             this version knows 1 to {latest}): upgrade the library, or use another schema or \
             table",
            n.events
        )));
    }
    for (version, sql) in known {
        let sum = checksum(&sql);
        match applied.iter().find(|(v, _)| *v == version) {
            Some((_, Some(stored))) if *stored == sum => {}
            Some((_, Some(stored))) => {
                return Err(MigrateError::Schema(format!(
                    "migration {version} applied to {} differs from this version's (checksum \
                     {stored} stored, {sum} here): the schema was changed by another build of \
                     eventsource-postgres; use the version that migrated it, or a new schema",
                    n.events
                )));
            }
            Some((_, None)) => {
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "UPDATE {} SET checksum = $2 WHERE version = $1",
                    n.migrations
                )))
                .bind(version)
                .bind(&sum)
                .execute(&mut **tx)
                .await?;
            }
            None => {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&mut **tx)
                    .await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO {} (version, checksum) VALUES ($1, $2)",
                    n.migrations
                )))
                .bind(version)
                .bind(&sum)
                .execute(&mut **tx)
                .await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_listed_in_order_without_gaps() {
        let versions: Vec<i32> = migrations(&Names::new("s", "events"))
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        assert_eq!(versions, (1..=versions.len() as i32).collect::<Vec<_>>());
    }
}

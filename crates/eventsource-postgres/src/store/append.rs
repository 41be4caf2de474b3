//! Appends: one statement per append (parallel appends) or a serialised transaction, the
//! version check, the outbox rows, and what a failed insert means.

use chrono::{DateTime, Utc};
use eventsource_core::EventEnvelope;
use eventsource_core::store::{AppendResult, ExpectedVersion, StoreError, check_batch};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::schema;

use super::{PostgresEventStore, backend};

impl PostgresEventStore {
    /// A parallel append: one statement (version check, insert, outbox rows),
    /// one round trip, committed on its own. Its snapshot is taken before its transaction id
    /// is assigned (at the insert), so the id is larger than that of every append whose events
    /// it counted: each aggregate's versions stay in order in the store's order.
    pub(super) async fn append_one_statement(
        &self,
        aggregate_id: Uuid,
        aggregate_type: &str,
        events: &[EventEnvelope],
        expected: ExpectedVersion,
    ) -> Result<AppendResult, StoreError> {
        let Some(first_version) = check_batch(aggregate_id, aggregate_type, events)? else {
            let actual = self
                .stream_version_now(aggregate_id, aggregate_type)
                .await?;
            if !expected.matches(actual) {
                return Err(StoreError::Concurrency {
                    aggregate_id,
                    aggregate_type: aggregate_type.to_owned(),
                    expected,
                    actual,
                });
            }
            let position = current_position(&self.pool, &self.names).await?;
            return Ok(AppendResult {
                new_version: actual,
                last_position: position,
            });
        };
        let columns = Columns::of(events)?;
        let (kind, expected_version) = match expected {
            ExpectedVersion::Any => ("any", 0),
            ExpectedVersion::NoStream => ("none", 0),
            ExpectedVersion::Exact(v) => ("exact", v),
            ExpectedVersion::StreamExists => ("exists", 0),
        };
        let outbox = if self.outbox {
            format!(
                ", ob AS (INSERT INTO {outbox} (position, event_id, aggregate_id) \
                   SELECT position, event_id, $1 FROM ins ORDER BY position)",
                outbox = self.names.outbox,
            )
        } else {
            String::new()
        };
        // Test hook: a statement that sleeps after its insert commits late, out of position
        // order (the ordering tests); never set outside them.
        let delay = crate::commit_delay_ms();
        let pause = if delay > 0 {
            format!(
                ", pause AS (SELECT pg_sleep({}) FROM (SELECT 1 FROM ins LIMIT 1) x)",
                delay as f64 / 1000.0
            )
        } else {
            ", pause AS (SELECT 1 WHERE false)".to_owned()
        };
        let sql = format!(
            "WITH cur AS (SELECT COALESCE(MAX(version), 0) AS v FROM {events} \
                          WHERE aggregate_id = $1 AND aggregate_type = $2), \
             ins AS (INSERT INTO {events} (event_id, aggregate_id, aggregate_type, version, \
                        event_type, tenant_id, actor_id, occurred_at, payload) \
                     SELECT e.id, $1, $2, e.version, e.event_type, e.tenant, e.actor, e.occurred, e.payload \
                     FROM UNNEST($3::uuid[], $4::bigint[], $5::text[], $6::uuid[], $7::text[], \
                                 $8::timestamptz[], $9::jsonb[]) \
                          AS e(id, version, event_type, tenant, actor, occurred, payload), cur \
                     WHERE cur.v + 1 = $10 AND CASE $11 WHEN 'none' THEN cur.v = 0 \
                                                    WHEN 'exact' THEN cur.v = $12 \
                                                    WHEN 'exists' THEN cur.v > 0 \
                                                    ELSE true END \
                     ORDER BY e.version \
                     RETURNING position, event_id) \
             {outbox} {pause} \
             SELECT (SELECT v FROM cur), \
                    (SELECT MAX(position) FROM ins), \
                    (SELECT COUNT(*) FROM ins), \
                    (SELECT COUNT(*) FROM pause)",
            events = self.names.events,
        );
        let row: Result<(i64, Option<i64>, i64, i64), _> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(aggregate_id)
            .bind(aggregate_type)
            .bind(&columns.ids)
            .bind(&columns.versions)
            .bind(&columns.types)
            .bind(&columns.tenants)
            .bind(&columns.actors)
            .bind(&columns.occurred)
            .bind(&columns.payloads)
            .bind(i64::try_from(first_version).unwrap_or(i64::MAX))
            .bind(kind)
            .bind(i64::try_from(expected_version).unwrap_or(i64::MAX))
            .fetch_one(&self.pool)
            .await;
        let row = match row {
            Ok(row) => row,
            Err(e) => {
                let err = self.map_insert_error(
                    e,
                    aggregate_id,
                    aggregate_type,
                    expected,
                    0,
                    &columns.ids,
                );
                // A writer that committed the same version while this statement waited: the
                // version it left is what the caller needs to see.
                return Err(match err {
                    StoreError::Concurrency { .. } => StoreError::Concurrency {
                        aggregate_id,
                        aggregate_type: aggregate_type.to_owned(),
                        expected,
                        actual: self
                            .stream_version_now(aggregate_id, aggregate_type)
                            .await?,
                    },
                    other => other,
                });
            }
        };
        let (actual, last_position, inserted, _) = row;
        let actual = actual as u64;
        if inserted > 0 {
            self.notifier.poke();
        }
        if inserted == 0 {
            return Err(StoreError::Concurrency {
                aggregate_id,
                aggregate_type: aggregate_type.to_owned(),
                expected,
                actual,
            });
        }
        Ok(AppendResult {
            new_version: actual + events.len() as u64,
            last_position: last_position.unwrap_or(0) as u64,
        })
    }

    /// The stream's current version (0 when it has no events).
    pub(super) async fn stream_version_now(
        &self,
        aggregate_id: Uuid,
        aggregate_type: &str,
    ) -> Result<u64, StoreError> {
        let sql = format!(
            "SELECT COALESCE(MAX(version), 0) FROM {events} WHERE aggregate_id = $1 AND aggregate_type = $2",
            events = self.names.events
        );
        let v: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(aggregate_id)
            .bind(aggregate_type)
            .fetch_one(&self.pool)
            .await
            .map_err(backend)?;
        Ok(v as u64)
    }

    pub(super) async fn append_tx(
        &self,
        aggregate_id: Uuid,
        aggregate_type: &str,
        events: &[EventEnvelope],
        expected: ExpectedVersion,
    ) -> Result<AppendResult, StoreError> {
        let first_version = check_batch(aggregate_id, aggregate_type, events)?;
        // Encode everything before touching the database.
        let mut payloads = Vec::with_capacity(events.len());
        for event in events {
            payloads.push(event.to_json_value()?);
        }
        let mut tx = self.pool.begin().await.map_err(backend)?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET LOCAL lock_timeout = {}",
            self.lock_timeout_ms
        )))
        .execute(&mut *tx)
        .await
        .map_err(backend)?;
        if self.serialize_appends {
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(self.names.lock_key)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        // The version is read before the transaction's first write, so its transaction id
        // (assigned at the insert) is larger than that of every append it saw committed: the
        // store's order (transaction, position) keeps each aggregate's versions in order.
        let actual = stream_version(&mut tx, &self.names, aggregate_id, aggregate_type).await?;
        let conflict = || StoreError::Concurrency {
            aggregate_id,
            aggregate_type: aggregate_type.to_owned(),
            expected,
            actual,
        };
        if !expected.matches(actual) {
            return Err(conflict());
        }
        let Some(first_version) = first_version else {
            let position = current_position(&mut *tx, &self.names).await?;
            return Ok(AppendResult {
                new_version: actual,
                last_position: position,
            });
        };
        if first_version != actual + 1 {
            return Err(conflict());
        }
        let mut ids = Vec::with_capacity(events.len());
        let mut versions = Vec::with_capacity(events.len());
        let mut types = Vec::with_capacity(events.len());
        let mut tenants: Vec<Option<Uuid>> = Vec::with_capacity(events.len());
        let mut actors: Vec<Option<String>> = Vec::with_capacity(events.len());
        let mut occurred: Vec<DateTime<Utc>> = Vec::with_capacity(events.len());
        for e in events {
            let m = e.metadata();
            ids.push(m.event_id);
            versions.push(m.aggregate_version as i64);
            types.push(m.event_type.clone());
            tenants.push(m.tenant_id);
            actors.push(m.actor_id.clone());
            occurred.push(m.occurred_at);
        }
        let sql = format!(
            "INSERT INTO {events} (event_id, aggregate_id, aggregate_type, version, event_type, \
             tenant_id, actor_id, occurred_at, payload) \
             SELECT e.id, $1, $2, e.version, e.event_type, e.tenant, e.actor, e.occurred, e.payload \
             FROM UNNEST($3::uuid[], $4::bigint[], $5::text[], $6::uuid[], $7::text[], \
                         $8::timestamptz[], $9::jsonb[]) \
                  AS e(id, version, event_type, tenant, actor, occurred, payload) \
             ORDER BY e.version \
             RETURNING position, event_id",
            events = self.names.events
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(aggregate_id)
            .bind(aggregate_type)
            .bind(&ids)
            .bind(&versions)
            .bind(&types)
            .bind(&tenants)
            .bind(&actors)
            .bind(&occurred)
            .bind(&payloads)
            .fetch_all(&mut *tx)
            .await
            .map_err(|e| {
                self.map_insert_error(e, aggregate_id, aggregate_type, expected, actual, &ids)
            })?;
        // The outbox rows in position order (their ids are the relay's order), each with
        // the event RETURNING gave it.
        let mut inserted: Vec<(i64, Uuid)> = rows
            .iter()
            .map(|r| (r.get::<i64, _>(0), r.get::<Uuid, _>(1)))
            .collect();
        inserted.sort_unstable_by_key(|(position, _)| *position);
        let (positions, ids): (Vec<i64>, Vec<Uuid>) = inserted.into_iter().unzip();
        if self.outbox {
            let sql = format!(
                "INSERT INTO {outbox} (position, event_id, aggregate_id) \
                 SELECT p, e, a FROM UNNEST($1::bigint[], $2::uuid[], $3::uuid[]) AS u(p, e, a) \
                 ORDER BY p",
                outbox = self.names.outbox
            );
            let aggregates = vec![aggregate_id; ids.len()];
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(&positions)
                .bind(&ids)
                .bind(&aggregates)
                .execute(&mut *tx)
                .await
                .map_err(backend)?;
        }
        crate::failpoint("before_append_commit").await;
        tx.commit().await.map_err(backend)?;
        self.notifier.poke();
        Ok(AppendResult {
            new_version: actual + events.len() as u64,
            last_position: positions.last().copied().unwrap_or(0) as u64,
        })
    }

    fn map_insert_error(
        &self,
        e: sqlx::Error,
        aggregate_id: Uuid,
        aggregate_type: &str,
        expected: ExpectedVersion,
        actual: u64,
        ids: &[Uuid],
    ) -> StoreError {
        if let sqlx::Error::Database(db) = &e
            && db.is_unique_violation()
        {
            let constraint = db.constraint().unwrap_or_default();
            if constraint.ends_with("_event_id_key") {
                // Which id? Report the first one of the batch that is stored already; the
                // message of PostgreSQL names it too.
                let detail = db.message().to_owned();
                let id = ids
                    .iter()
                    .find(|id| detail.contains(&id.to_string()))
                    .copied()
                    .unwrap_or(ids[0]);
                return StoreError::DuplicateEventId(id);
            }
            return StoreError::Concurrency {
                aggregate_id,
                aggregate_type: aggregate_type.to_owned(),
                expected,
                actual: actual + 1,
            };
        }
        backend(e)
    }
}

/// An append's events as the column arrays of one `UNNEST` insert.
struct Columns {
    ids: Vec<Uuid>,
    versions: Vec<i64>,
    types: Vec<String>,
    tenants: Vec<Option<Uuid>>,
    actors: Vec<Option<String>>,
    occurred: Vec<DateTime<Utc>>,
    payloads: Vec<serde_json::Value>,
}

impl Columns {
    /// Encodes everything before touching the database.
    fn of(events: &[EventEnvelope]) -> Result<Self, StoreError> {
        let mut c = Self {
            ids: Vec::with_capacity(events.len()),
            versions: Vec::with_capacity(events.len()),
            types: Vec::with_capacity(events.len()),
            tenants: Vec::with_capacity(events.len()),
            actors: Vec::with_capacity(events.len()),
            occurred: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
        };
        for e in events {
            let m = e.metadata();
            c.ids.push(m.event_id);
            c.versions
                .push(i64::try_from(m.aggregate_version).unwrap_or(i64::MAX));
            c.types.push(m.event_type.clone());
            c.tenants.push(m.tenant_id);
            c.actors.push(m.actor_id.clone());
            c.occurred.push(m.occurred_at);
            c.payloads.push(e.to_json_value()?);
        }
        Ok(c)
    }
}

pub(super) async fn stream_version(
    tx: &mut Transaction<'_, Postgres>,
    names: &schema::Names,
    aggregate_id: Uuid,
    aggregate_type: &str,
) -> Result<u64, StoreError> {
    let sql = format!(
        "SELECT COALESCE(MAX(version), 0) FROM {events} WHERE aggregate_id = $1 AND aggregate_type = $2",
        events = names.events
    );
    let v: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .bind(aggregate_id)
        .bind(aggregate_type)
        .fetch_one(&mut **tx)
        .await
        .map_err(backend)?;
    Ok(v as u64)
}

pub(super) async fn current_position<'e, E>(
    executor: E,
    names: &schema::Names,
) -> Result<u64, StoreError>
where
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let sql = format!("SELECT COALESCE(MAX(position), 0) FROM {}", names.events);
    let v: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
        .fetch_one(executor)
        .await
        .map_err(backend)?;
    Ok(v as u64)
}

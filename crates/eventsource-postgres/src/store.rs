//! The PostgreSQL event store.

use std::time::Duration;

use chrono::{DateTime, Utc};
use eventsource_core::store::{
    AppendResult, EventStore, ExpectedVersion, ReadAllOptions, StoreError, StoredEvent, check_batch,
};
use eventsource_core::{BoxFuture, ErrorKind, EventEnvelope};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};
use uuid::Uuid;

use crate::schema;

/// Why a store could not be built. Each variant names what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SetupError {
    /// A configuration value is invalid; `field` names it.
    #[error("invalid PostgresStoreConfig.{field}: {reason}")]
    Config {
        /// The option.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// PostgreSQL could not be reached or refused the login.
    #[error("cannot connect to PostgreSQL at {url}: {source}")]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// Creating the schema, tables or indexes failed.
    #[error("migrating the event store schema failed: {0}")]
    Migrate(#[source] sqlx::Error),
}

impl SetupError {
    /// What kind of failure this is: `Config`; for a failed connection or migration, the
    /// kind of the PostgreSQL error (`Unavailable`, `Authentication`, `Permission`, ...).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Config { .. } => ErrorKind::Config,
            Self::Connect { source, .. } => match sqlx_error_kind(source) {
                ErrorKind::Other => ErrorKind::Unavailable,
                kind => kind,
            },
            Self::Migrate(source) => sqlx_error_kind(source),
        }
    }

    /// Whether trying again later may succeed (PostgreSQL not reachable yet, a timeout).
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
}

/// Where the store keeps its tables and whether it writes an outbox.
#[derive(Debug, Clone)]
pub struct PostgresStoreConfig {
    /// Schema of the tables (created if missing). Default `public`.
    pub schema: String,
    /// The events table. Default `events`; the outbox is `{table}_outbox`.
    pub table: String,
    /// Write an outbox row for every appended event in the same transaction, for
    /// [`OutboxRelay`](crate::OutboxRelay) to publish. Default false.
    pub outbox: bool,
    /// Pool size. Default 10.
    pub max_connections: u32,
    /// How long to wait for a connection (from the pool, or a new one). Default 5 s.
    pub acquire_timeout: Duration,
    /// How long an append waits for locks held by other transactions before failing with
    /// [`StoreError::Timeout`] instead of hanging behind a stuck transaction. Default 5 s.
    pub lock_timeout: Duration,
    /// Run appends one at a time (an advisory lock held to the commit), so that position
    /// order is commit order. Off by default: appends run in parallel and readers follow the
    /// store's order `(transaction, position)` up to a commit-safe frontier, which never skips
    /// a late commit either (see the crate docs). Default false.
    pub serialize_appends: bool,
}

impl Default for PostgresStoreConfig {
    fn default() -> Self {
        Self {
            schema: "public".into(),
            table: "events".into(),
            outbox: false,
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            lock_timeout: Duration::from_secs(5),
            serialize_appends: false,
        }
    }
}

/// `[a-z_][a-z0-9_]*`, at most 48 characters (room for suffixes within PostgreSQL's 63).
pub(crate) fn validate_identifier(field: &'static str, value: &str) -> Result<(), SetupError> {
    let ok = !value.is_empty()
        && value.len() <= 48
        && value.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(SetupError::Config {
            field,
            reason: format!(
                "{value:?} is not a plain identifier: use lowercase letters, digits and `_`, \
                 starting with a letter or `_`, at most 48 characters"
            ),
        })
    }
}

fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..s + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

/// An [`EventStore`] on PostgreSQL.
///
/// - One row per event; `position` (bigserial) is the global order.
/// - `UNIQUE (aggregate_id, aggregate_type, version)` is the optimistic lock: a racing writer
///   fails on it and gets [`StoreError::Concurrency`]; `event_id` is unique too
///   ([`StoreError::DuplicateEventId`]).
/// - **Appends run in parallel**; the global feed is read in the store's order
///   `(transaction id, position)` up to a commit-safe frontier ([`read_feed`](Self::read_feed)),
///   so a reader never skips an event that commits later with a lower position
///   (`serialize_appends` restores one-at-a-time appends where position order must be commit
///   order).
/// - With `outbox` on, the same transaction writes one outbox row per event.
#[derive(Debug, Clone)]
pub struct PostgresEventStore {
    pool: PgPool,
    names: schema::Names,
    outbox: bool,
    lock_timeout_ms: u64,
    serialize_appends: bool,
    notifier: Notifier,
}

/// Wakes the store's listeners (subscriptions, the outbox relay) after appends, off the
/// append's own path.
///
/// A transaction that issues `NOTIFY` commits under a lock that PostgreSQL holds for the whole
/// database cluster until its commit record is flushed, so notifying inside every append would
/// put every append's commit in one line again (measured with 16 writers: 0.38 of a plain
/// `INSERT`). Instead an append pokes this task once it has committed, and the task sends the
/// notification in a transaction of its own with `synchronous_commit` off (a wake-up needs no
/// durability). Pokes that arrive while a notification waits to be sent share it. If the
/// notification is lost (the task's runtime ended, the database hiccuped), listeners still
/// find the events at their next poll.
#[derive(Debug, Clone)]
struct Notifier(tokio::sync::mpsc::Sender<()>);

impl Notifier {
    fn spawn(pool: PgPool, names: &schema::Names, outbox: bool) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let sql = if outbox {
            format!(
                "SELECT set_config('synchronous_commit', 'off', true), \
                        pg_notify('{}', ''), pg_notify('{}', '')",
                names.events_channel, names.channel
            )
        } else {
            format!(
                "SELECT set_config('synchronous_commit', 'off', true), pg_notify('{}', '')",
                names.events_channel
            )
        };
        tokio::spawn(async move {
            // Ends when the last clone of the store is dropped.
            while rx.recv().await.is_some() {
                if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                    .execute(&pool)
                    .await
                {
                    tracing::debug!(error = %e, "append notification not sent; listeners will poll");
                }
            }
        });
        Self(tx)
    }

    /// After a commit: a notification follows (now, or the one already waiting).
    fn poke(&self) {
        let _ = self.0.try_send(());
    }
}

impl PostgresEventStore {
    /// Connects to `database_url` and creates (or upgrades) the schema.
    ///
    /// # Errors
    /// [`SetupError::Config`] naming a bad option, [`SetupError::Connect`] when PostgreSQL
    /// cannot be reached (within `acquire_timeout`), [`SetupError::Migrate`].
    pub async fn connect(
        database_url: &str,
        config: PostgresStoreConfig,
    ) -> Result<Self, SetupError> {
        validate_identifier("schema", &config.schema)?;
        validate_identifier("table", &config.table)?;
        if config.max_connections == 0 {
            return Err(SetupError::Config {
                field: "max_connections",
                reason: "must be at least 1".into(),
            });
        }
        let options: PgConnectOptions =
            database_url.parse().map_err(|source| SetupError::Connect {
                url: redact(database_url),
                source,
            })?;
        // Every connection waits at most lock_timeout for a lock (appends are single
        // statements, so this is set once per connection rather than per transaction).
        let options = options.options([(
            "lock_timeout",
            config.lock_timeout.as_millis().max(1).to_string(),
        )]);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .connect_with(options)
            .await
            .map_err(|source| SetupError::Connect {
                url: redact(database_url),
                source,
            })?;
        Self::with_pool(pool, config).await
    }

    /// Uses an existing pool and creates (or upgrades) the schema.
    ///
    /// Appends that are not serialised run as one statement outside any explicit transaction,
    /// so `config.lock_timeout` reaches them only through the connection: [`connect`](Self::connect)
    /// sets it on every connection; a pool you build yourself should set `lock_timeout` in its
    /// connect options (`PgConnectOptions::options`) or appends may wait on a stuck lock for ever.
    ///
    /// # Errors
    /// As [`connect`](Self::connect).
    pub async fn with_pool(pool: PgPool, config: PostgresStoreConfig) -> Result<Self, SetupError> {
        validate_identifier("schema", &config.schema)?;
        validate_identifier("table", &config.table)?;
        let names = schema::Names::new(&config.schema, &config.table);
        schema::migrate(&pool, &names)
            .await
            .map_err(SetupError::Migrate)?;
        let notifier = Notifier::spawn(pool.clone(), &names, config.outbox);
        Ok(Self {
            pool,
            names,
            outbox: config.outbox,
            lock_timeout_ms: config.lock_timeout.as_millis().max(1) as u64,
            serialize_appends: config.serialize_appends,
            notifier,
        })
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// `schema.table` of the events.
    pub fn events_table(&self) -> &str {
        &self.names.events
    }

    /// `schema.table_outbox`.
    pub fn outbox_table(&self) -> &str {
        &self.names.outbox
    }

    pub(crate) fn names(&self) -> &schema::Names {
        &self.names
    }

    /// The advisory lock key that serialises this store's appends (for tests and operators
    /// looking at `pg_locks`).
    pub fn append_lock_key(&self) -> i64 {
        self.names.lock_key
    }

    /// A parallel append: one statement (version check, insert, outbox rows),
    /// one round trip, committed on its own. Its snapshot is taken before its transaction id
    /// is assigned (at the insert), so the id is larger than that of every append whose events
    /// it counted: each aggregate's versions stay in order in the store's order.
    async fn append_one_statement(
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
                   SELECT position, event_id, $1 FROM ins)",
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

    async fn stream_version_now(
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

    async fn append_tx(
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
             RETURNING position",
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
        let positions: Vec<i64> = rows.iter().map(|r| r.get::<i64, _>(0)).collect();
        if self.outbox {
            let sql = format!(
                "INSERT INTO {outbox} (position, event_id, aggregate_id) \
                 SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::uuid[])",
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

    /// Reads all events after `options.after_position` page by page, handing each page to
    /// `apply`: memory stays bounded by one page however large the store is.
    ///
    /// # Errors
    /// Store errors, or the first error `apply` returns (wrapped as a backend error).
    pub async fn for_each_page<F, Fut>(
        &self,
        mut options: ReadAllOptions,
        mut apply: F,
    ) -> Result<u64, StoreError>
    where
        F: FnMut(Vec<StoredEvent>) -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let mut total = 0;
        loop {
            let page = self.read_page(&options).await?;
            let Some(last) = page.last() else { break };
            options.after_position = last.position;
            total += page.len() as u64;
            let full = page.len() == options.limit;
            apply(page).await?;
            if !full {
                break;
            }
        }
        Ok(total)
    }

    /// One page of the global feed after the event at `options.after_position`, in the store's
    /// order, up to the commit-safe frontier (see the crate docs).
    async fn read_page(&self, options: &ReadAllOptions) -> Result<Vec<StoredEvent>, StoreError> {
        let after = if options.after_position == 0 {
            StoreCursor::START
        } else {
            let sql = format!(
                "SELECT tx::text FROM {events} WHERE position = $1",
                events = self.names.events
            );
            let tx: Option<String> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(i64::try_from(options.after_position).unwrap_or(i64::MAX))
                .fetch_optional(&self.pool)
                .await
                .map_err(backend)?;
            match tx.map(|t| parse_xid(&t)).transpose()? {
                Some(tx) => StoreCursor {
                    tx,
                    position: options.after_position,
                },
                // Not a stored position: everything of a later position.
                None => StoreCursor {
                    tx: 0,
                    position: options.after_position,
                },
            }
        };
        let filter = FeedFilter {
            tenant_id: options.tenant_id,
            aggregate_type: options.aggregate_type.clone(),
            event_types: None,
        };
        Ok(self
            .read_feed(after, &filter, options.limit)
            .await?
            .into_iter()
            .filter(|(_, e)| after.tx != 0 || e.position > after.position)
            .map(|(_, e)| e)
            .collect())
    }

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
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(after.tx.to_string())
            .bind(i64::try_from(after.position).unwrap_or(i64::MAX))
            .bind(filter.tenant_id)
            .bind(filter.aggregate_type.as_deref())
            .bind(filter.event_types.as_deref())
            .bind(skip_visible_in)
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
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(after.tx.to_string())
            .bind(i64::try_from(after.position).unwrap_or(i64::MAX))
            .bind(filter.tenant_id)
            .bind(filter.aggregate_type.as_deref())
            .bind(filter.event_types.as_deref())
            .bind(skip_visible_in)
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
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .bind(after.tx.to_string())
            .bind(i64::try_from(after.position).unwrap_or(i64::MAX))
            .bind(filter.tenant_id)
            .bind(filter.aggregate_type.as_deref())
            .bind(filter.event_types.as_deref())
            .bind(skip_visible_in)
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

pub(crate) fn backend(e: sqlx::Error) -> StoreError {
    match sqlx_error_kind(&e) {
        ErrorKind::Unavailable => StoreError::ConnectionLost {
            operation: "a store operation",
            source: Box::new(e),
        },
        ErrorKind::Timeout => StoreError::Timeout(match &e {
            sqlx::Error::Database(db) => db.message().to_owned(),
            _ => "no database connection became free in time".into(),
        }),
        _ => StoreError::Backend(Box::new(e)),
    }
}

/// SQLSTATEs sqlx's `DatabaseError::kind()` does not classify (it covers the constraint
/// violations only).
mod sqlstate {
    /// lock_not_available (`lock_timeout`).
    pub(super) const LOCK_NOT_AVAILABLE: &str = "55P03";
    /// query_canceled (`statement_timeout`).
    pub(super) const QUERY_CANCELED: &str = "57014";
    /// Class 08, connection exception.
    pub(super) const CONNECTION_EXCEPTION_CLASS: &str = "08";
    /// admin_shutdown, crash_shutdown, cannot_connect_now: the server ends or refuses the
    /// session.
    pub(super) const SERVER_GOING_AWAY: [&str; 3] = ["57P01", "57P02", "57P03"];
    /// Class 28, invalid authorization specification (a wrong password, an unknown role).
    pub(super) const INVALID_AUTHORIZATION_CLASS: &str = "28";
    /// insufficient_privilege (a missing grant).
    pub(super) const INSUFFICIENT_PRIVILEGE: &str = "42501";
    /// Class 53, insufficient resources (disk full, out of memory, too many connections).
    pub(super) const INSUFFICIENT_RESOURCES_CLASS: &str = "53";
    /// serialization_failure, deadlock_detected: retry the transaction.
    pub(super) const RETRY_TRANSACTION: [&str; 2] = ["40001", "40P01"];
}

/// The one place a sqlx error is classified: constraint violations through sqlx's
/// `DatabaseError::kind()`, the rest by SQLSTATE class (see `sqlstate`) and sqlx's variants.
/// A pool the application closed is `InvalidState`: retrying cannot help.
pub(crate) fn sqlx_error_kind(e: &sqlx::Error) -> ErrorKind {
    use sqlx::error::ErrorKind as Db;
    match e {
        sqlx::Error::Io(_) | sqlx::Error::WorkerCrashed => ErrorKind::Unavailable,
        sqlx::Error::PoolTimedOut => ErrorKind::Timeout,
        sqlx::Error::PoolClosed => ErrorKind::InvalidState,
        sqlx::Error::Configuration(_) | sqlx::Error::Tls(_) => ErrorKind::Config,
        sqlx::Error::Protocol(_) => ErrorKind::Protocol,
        sqlx::Error::RowNotFound => ErrorKind::NotFound,
        sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => ErrorKind::InvalidData,
        sqlx::Error::Database(db) => match db.kind() {
            Db::UniqueViolation => ErrorKind::AlreadyExists,
            Db::ForeignKeyViolation | Db::NotNullViolation | Db::CheckViolation => {
                ErrorKind::InvalidInput
            }
            _ => {
                let code = db.code().unwrap_or_default();
                let code = code.as_ref();
                if code.starts_with(sqlstate::CONNECTION_EXCEPTION_CLASS)
                    || sqlstate::SERVER_GOING_AWAY.contains(&code)
                {
                    ErrorKind::Unavailable
                } else if code == sqlstate::LOCK_NOT_AVAILABLE || code == sqlstate::QUERY_CANCELED {
                    ErrorKind::Timeout
                } else if code.starts_with(sqlstate::INVALID_AUTHORIZATION_CLASS) {
                    ErrorKind::Authentication
                } else if code == sqlstate::INSUFFICIENT_PRIVILEGE {
                    ErrorKind::Permission
                } else if code.starts_with(sqlstate::INSUFFICIENT_RESOURCES_CLASS) {
                    ErrorKind::ResourceExhausted
                } else if sqlstate::RETRY_TRANSACTION.contains(&code) {
                    ErrorKind::Conflict
                } else {
                    ErrorKind::Other
                }
            }
        },
        _ => ErrorKind::Other,
    }
}

pub(crate) fn stored_event(row: &PgRow) -> Result<StoredEvent, StoreError> {
    let position: i64 = row.try_get("position").map_err(backend)?;
    let stored_at: DateTime<Utc> = row.try_get("stored_at").map_err(backend)?;
    // The JSON text (`payload::text`): read in one pass, without a tree of the whole object.
    let payload: &str = row.try_get("payload").map_err(backend)?;
    Ok(StoredEvent {
        position: position as u64,
        stored_at,
        event: EventEnvelope::from_json_str(payload)?,
    })
}

async fn stream_version(
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

async fn current_position<'e, E>(executor: E, names: &schema::Names) -> Result<u64, StoreError>
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

impl EventStore for PostgresEventStore {
    fn append<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
        events: &'a [EventEnvelope],
        expected: ExpectedVersion,
    ) -> BoxFuture<'a, Result<AppendResult, StoreError>> {
        Box::pin(async move {
            let result = if self.serialize_appends {
                self.append_tx(aggregate_id, aggregate_type, events, expected)
                    .await
            } else {
                self.append_one_statement(aggregate_id, aggregate_type, events, expected)
                    .await
            };
            result.map_err(|e| match e {
                StoreError::ConnectionLost { source, .. } => StoreError::ConnectionLost {
                    operation: "append",
                    source,
                },
                other => other,
            })
        })
    }

    fn read_stream<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
        after_version: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        Box::pin(async move {
            let sql = format!(
                "SELECT position, stored_at, payload::text AS payload FROM {events} \
                 WHERE aggregate_id = $1 AND aggregate_type = $2 AND version > $3 ORDER BY version",
                events = self.names.events
            );
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(aggregate_id)
                .bind(aggregate_type)
                .bind(after_version as i64)
                .fetch_all(&self.pool)
                .await
                .map_err(backend)?;
            rows.iter().map(stored_event).collect()
        })
    }

    fn read_all<'a>(
        &'a self,
        options: &'a ReadAllOptions,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        Box::pin(self.read_page(options))
    }

    fn stream_version<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        Box::pin(async move {
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
        })
    }

    fn current_position(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(current_position(&self.pool, &self.names))
    }
}

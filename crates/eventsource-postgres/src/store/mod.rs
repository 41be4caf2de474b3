//! The PostgreSQL event store: setup (config, connect, migrations), the `EventStore` contract,
//! and where each part lives: appends (`append`), reading all events (`read`), the
//! transaction-ordered feed subscriptions read (`feed`), and error classification (`errors`).

use std::time::Duration;

use eventsource_core::store::{
    AppendResult, EventStore, ExpectedVersion, ReadAllOptions, StoreError, StoredEvent,
};
use eventsource_core::{BoxFuture, ErrorKind, EventEnvelope};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use uuid::Uuid;

use crate::schema;

mod append;
mod errors;
mod feed;
mod read;

use append::current_position;
pub(crate) use errors::{backend, sqlx_error_kind};
pub use feed::{FeedFilter, StoreCursor};
pub(crate) use feed::{decode_feed_rows, feed_row_cursor, parse_xid};
pub(crate) use read::stored_event;

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
    #[error(
        "cannot connect to PostgreSQL at {url}: {source}; check that it runs and that the URL is right"
    )]
    Connect {
        /// The URL, password redacted.
        url: String,
        /// The cause.
        #[source]
        source: sqlx::Error,
    },
    /// A subscription's name or option is invalid; `field` names it.
    #[error("invalid subscription {name:?}: {field} {reason}")]
    Subscription {
        /// The subscription's name.
        name: String,
        /// The option (`SubscriptionOptions.page_size`, ...) or `name`.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// The database's schema is not what this version expects: migrated by a newer version
    /// of the library, or a migration applied there differs from this version's.
    #[error("{0}")]
    Schema(String),
    /// Creating the schema, tables or indexes failed.
    #[error("migrating the event store schema failed: {0}")]
    Migrate(#[source] sqlx::Error),
}

impl SetupError {
    /// What kind of failure this is: `Config`; for a failed connection or migration, the
    /// kind of the PostgreSQL error (`Unavailable`, `Authentication`, `Permission`, ...; an
    /// unclassified refusal such as "database does not exist" is `Other`, not transient).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Config { .. } | Self::Subscription { .. } => ErrorKind::Config,
            Self::Schema(_) => ErrorKind::InvalidState,
            // I/O and pool timeouts are Unavailable / Timeout; a refusal PostgreSQL names (no
            // such database, a bad role) keeps its own kind: retrying a typo cannot help.
            Self::Connect { source, .. } => sqlx_error_kind(source),
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
    eventsource_core::support::redact_url(url)
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
        match Self::with_pool(pool.clone(), config).await {
            Ok(store) => Ok(store),
            Err(e) => {
                // The pool is ours: its connections go now, not when the runtime gets to it.
                pool.close().await;
                Err(e)
            }
        }
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
        schema::migrate(&pool, &names).await.map_err(|e| match e {
            schema::MigrateError::Database(e) => SetupError::Migrate(e),
            schema::MigrateError::Schema(reason) => SetupError::Schema(reason),
        })?;
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
        Box::pin(self.stream_version_now(aggregate_id, aggregate_type))
    }

    fn current_position(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(current_position(&self.pool, &self.names))
    }
}

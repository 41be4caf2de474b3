//! Shared helpers: a schema of its own per test (dropped when the test ends).
#![allow(dead_code, unreachable_pub, unused_imports)]

use eventsource_postgres::{PostgresEventStore, PostgresStoreConfig};

pub use eventsource_testsupport::postgres::database_url;
pub use eventsource_testsupport::redis_url;

pub fn unique_schema(tag: &str) -> String {
    format!(
        "es_test_{tag}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Drops the schema when dropped (best effort, on its own runtime thread).
pub struct DropSchema(pub String);

impl Drop for DropSchema {
    fn drop(&mut self) {
        let schema = self.0.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(&database_url()).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS {schema} CASCADE"
                    )))
                    .execute(&pool)
                    .await;
                }
            });
        })
        .join();
    }
}

pub async fn store(tag: &str, outbox: bool) -> (PostgresEventStore, DropSchema) {
    store_with(tag, outbox, false).await
}

/// As [`store`], choosing the append path (`serialize_appends`).
pub async fn store_with(
    tag: &str,
    outbox: bool,
    serialize_appends: bool,
) -> (PostgresEventStore, DropSchema) {
    let schema = unique_schema(tag);
    let store = PostgresEventStore::connect(
        &database_url(),
        PostgresStoreConfig {
            schema: schema.clone(),
            outbox,
            serialize_appends,
            max_connections: 8,
            ..Default::default()
        },
    )
    .await
    .expect("the tests' PostgreSQL answers");
    (store, DropSchema(schema))
}

/// The `event_id` of each entry of a Redis stream, in stream order (duplicates kept).
pub async fn stream_event_ids(stream: &str) -> Vec<String> {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&eventsource_testsupport::patient())
        .await
        .unwrap();
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    entries
        .into_iter()
        .filter_map(|(_, fields)| {
            fields
                .into_iter()
                .find(|(k, _)| k == "event_id")
                .map(|(_, v)| v)
        })
        .collect()
}

/// The relay binary for `schema`, publishing to the shared Redis under `prefix`, optionally
/// pausing at a failpoint (`EVENTSOURCE_FAILPOINT=name:ms`); stdout piped.
pub fn relay_process(schema: &str, prefix: &str, failpoint: Option<&str>) -> tokio::process::Child {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_eventsource-outbox-relay"));
    cmd.env("DATABASE_URL", database_url())
        // Only what goes wrong: the relay's info lines would scroll past every test run.
        .env("RUST_LOG", "warn")
        .env("EVENTSOURCE_PG_SCHEMA", schema)
        .env("EVENTSOURCE_REDIS_URL", redis_url())
        .env("EVENTSOURCE_REDIS_STREAM_PREFIX", prefix)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    if let Some(f) = failpoint {
        cmd.env("EVENTSOURCE_FAILPOINT", f);
    }
    cmd.spawn().expect("relay binary starts")
}

/// Reads `relay`'s stdout until it reports reaching failpoint `name` (at most 30 s).
pub async fn reached_failpoint(relay: &mut tokio::process::Child, name: &str) -> bool {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let mut lines = BufReader::new(relay.stdout.take().expect("stdout piped")).lines();
    let wanted = format!("failpoint {name}");
    tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.starts_with(&wanted) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

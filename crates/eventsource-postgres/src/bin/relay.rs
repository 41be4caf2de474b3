//! `eventsource-outbox-relay`: relays a PostgreSQL store's outbox to a Redis stream until
//! SIGTERM/SIGINT.
//!
//! ```text
//! DATABASE_URL=postgres://postgres@127.0.0.1/test EVENTSOURCE_PG_SCHEMA=orders \
//! EVENTSOURCE_REDIS_STREAM_PREFIX=orders eventsource-outbox-relay
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use eventsource_postgres::{OutboxRelay, PostgresEventStore, PostgresStoreConfig, RelayConfig};
use eventsource_redis::{RedisEventBus, RedisEventBusConfig};

const HELP: &str = "eventsource-outbox-relay: publishes a PostgreSQL event store's outbox rows to a Redis stream, in order, until SIGTERM or SIGINT

usage: eventsource-outbox-relay [--help] [--version] [COMMAND]

commands:
  (none)            run the relay until SIGTERM or SIGINT
  status [--json]   outbox counts, and the quarantined rows with their reasons
  retry ID|--all    put quarantined rows back in line (fix the stored event first)
  skip ID           give a quarantined row up: it is never published

Configuration comes from the environment:
  DATABASE_URL                 the PostgreSQL database (required)
  EVENTSOURCE_PG_SCHEMA        the store's schema (default public)
  EVENTSOURCE_PG_TABLE         the store's table (default events)
  EVENTSOURCE_REDIS_*          the Redis bus (EVENTSOURCE_REDIS_URL, _STREAM_PREFIX, ...)
  EVENTSOURCE_HTTP_LISTEN      serve /metrics, /healthz and /readyz at this address
                               (e.g. 127.0.0.1:9465); ready = PostgreSQL and Redis answer
  RUST_LOG                     log filter (default info); logs go to standard error

Several relays may run at once: one publishes at a time, the others stand by.
A row whose stored event no longer decodes is quarantined (the relay goes on with the rows
after it); `status` shows it, `retry` or `skip` settles it.
Exit codes: 0 on success, 1 when it cannot start or a row to retry or skip does not exist
(the reason is printed), 2 on a usage error.";

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{HELP}");
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--version" || a == "-V") {
        println!("eventsource-outbox-relay {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        [] => run().await.map(|()| ExitCode::SUCCESS),
        ["status"] => status(false).await,
        ["status", "--json"] | ["--json", "status"] => status(true).await,
        ["retry", "--all"] => retry(None).await,
        ["retry", id] | ["skip", id] => match id.parse::<i64>() {
            Ok(id) if words[0] == "retry" => retry(Some(id)).await,
            Ok(id) => skip(id).await,
            Err(_) => {
                eprintln!("eventsource-outbox-relay: {id:?} is not a row id (see status)");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("eventsource-outbox-relay: unknown arguments {words:?} (see --help)");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("eventsource-outbox-relay: {e}");
            ExitCode::FAILURE
        }
    }
}

type Error = Box<dyn std::error::Error + Send + Sync>;

/// The store named by the environment.
async fn store() -> Result<PostgresEventStore, Error> {
    let url = std::env::var("DATABASE_URL")
        .map_err(|_| "DATABASE_URL is not set: point it at the event store's database")?;
    let config = PostgresStoreConfig {
        schema: std::env::var("EVENTSOURCE_PG_SCHEMA").unwrap_or_else(|_| "public".into()),
        table: std::env::var("EVENTSOURCE_PG_TABLE").unwrap_or_else(|_| "events".into()),
        outbox: true,
        max_connections: 2,
        ..Default::default()
    };
    Ok(PostgresEventStore::connect(&url, config).await?)
}

async fn status(json: bool) -> Result<ExitCode, Error> {
    let store = store().await?;
    let stats = eventsource_postgres::outbox_stats(&store).await?;
    let rows = eventsource_postgres::quarantined_rows(&store, 100).await?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "stats": stats, "quarantined": rows })
        );
    } else {
        println!(
            "pending {}  published {}  failed {}  quarantined {}  skipped {}",
            stats.pending, stats.published, stats.failed, stats.quarantined, stats.skipped
        );
        for row in rows {
            println!(
                "quarantined row {} (position {}, event {}, since {}): {}",
                row.id,
                row.position,
                row.event_id,
                row.quarantined_at,
                row.last_error.unwrap_or_default()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn retry(id: Option<i64>) -> Result<ExitCode, Error> {
    let store = store().await?;
    let released = eventsource_postgres::retry_quarantined(&store, id).await?;
    println!("{released} quarantined row(s) put back in line");
    Ok(if released == 0 && id.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn skip(id: i64) -> Result<ExitCode, Error> {
    let store = store().await?;
    if eventsource_postgres::skip_quarantined(&store, id).await? {
        println!("row {id} skipped: it will not be published");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("eventsource-outbox-relay: no quarantined row {id}");
        Ok(ExitCode::FAILURE)
    }
}

async fn run() -> Result<(), Error> {
    let store = store().await?;
    let bus = RedisEventBus::new(
        RedisEventBusConfig::from_env()?.enable_tracing(false),
        eventsource_core::EventRegistry::new(),
    )?;
    bus.connect().await?;
    let surface = match std::env::var("EVENTSOURCE_HTTP_LISTEN") {
        Ok(addr) => {
            eventsource_redis::http::install_prometheus_recorder();
            let pool = store.pool().clone();
            let readiness = eventsource_redis::http::Readiness::new()
                .publisher(bus.clone())
                .check("postgres", move || {
                    let pool = pool.clone();
                    async move {
                        sqlx::query("SELECT 1")
                            .execute(&pool)
                            .await
                            .map(drop)
                            .map_err(|e| e.to_string())
                    }
                });
            let surface = eventsource_redis::http::HttpSurface::start(addr.as_str(), readiness)
                .await
                .map_err(|e| format!("EVENTSOURCE_HTTP_LISTEN={addr}: {e}"))?;
            println!("metrics and health on http://{}", surface.local_addr());
            Some(surface)
        }
        Err(_) => None,
    };
    let relay = OutboxRelay::new(store, Arc::new(bus), RelayConfig::default());
    println!("relay running");
    tracing::info!("outbox relay running");
    relay.run_until(eventsource_redis::shutdown_signal()).await;
    if let Some(surface) = surface {
        surface.shutdown().await;
    }
    println!("relay stopped");
    Ok(())
}

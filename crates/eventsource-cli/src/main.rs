//! `eventsource`: the operator's view of a Redis event bus.
//!
//! ```text
//! eventsource [--url URL] [--prefix P] [--group G] [--json] [-v] COMMAND
//!
//!   info | health | groups | consumers | pending | tail | recover
//!   dlq list | dlq show ID | dlq replay (ID... | --all) | dlq purge (ID... | --all)
//!   trim
//! ```
//!
//! `eventsource --help` and `eventsource COMMAND --help` describe every option; the README
//! documents the `--json` shapes and the exit codes (0 done / healthy, 1 the answer is no,
//! 2 usage, 3 Redis unreachable or refusing).

#![forbid(unsafe_code)]

mod cli;
mod commands;
mod dashboard;
mod dlq;
mod output;
mod partitions;

use std::process::ExitCode;

use clap::Parser;
use eventsource_core::EventRegistry;
use eventsource_redis::{PartitionedEventBus, RedisBusError, RedisEventBus, RedisEventBusConfig};

use crate::cli::{Cli, Command};
use crate::output::Out;

/// Why a command did not succeed, with its exit code.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The answer is no: unhealthy, not found (exit 1).
    No(String),
    /// Bad usage (exit 2).
    Usage(String),
    /// Redis unreachable, or refusing the credentials or a permission (exit 3).
    Unreachable(String),
}

impl From<RedisBusError> for Failure {
    fn from(e: RedisBusError) -> Self {
        let text = eventsource_redis::codec::error_chain(&e);
        match e {
            RedisBusError::Config(_) => Self::Usage(text),
            RedisBusError::Connect { .. }
            | RedisBusError::Authentication { .. }
            | RedisBusError::NoPermission { .. } => Self::Unreachable(text),
            ref other if other.is_transient() => Self::Unreachable(text),
            _ => Self::No(text),
        }
    }
}

pub(crate) type Outcome = Result<ExitCode, Failure>;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The library's warnings (a misspelt EVENTSOURCE_REDIS_* variable, a server risk) always
    // show; -v adds what the command does.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if cli.verbose { "info" } else { "warn" })
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .without_time()
        .with_target(cli.verbose)
        .init();
    let out = Out::new(cli.json, cli.color);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("eventsource: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli, out)) {
        Ok(code) => code,
        Err(Failure::No(text)) => {
            eprintln!("eventsource: {text}");
            ExitCode::from(1)
        }
        Err(Failure::Usage(text)) => {
            eprintln!("eventsource: {text}");
            ExitCode::from(2)
        }
        Err(Failure::Unreachable(text)) => {
            eprintln!("eventsource: {text}");
            ExitCode::from(3)
        }
    }
}

/// The options the CLI uses (their environment variables are read as the library reads them).
const CLI_OPTIONS: &[&str] = &[
    "redis_url",
    "stream_prefix",
    "consumer_group",
    "partitions",
    "cluster",
    "tls_ca_file",
    "tls_cert_file",
    "tls_key_file",
    "tls_insecure",
    "socket_timeout",
    "socket_connect_timeout",
];

/// The bus configuration of the command: the environment as the library reads it (the
/// `EVENTSOURCE_REDIS_*` variables, `REDIS_URL`), then the options given.
fn config_of(cli: &Cli) -> Result<RedisEventBusConfig, Failure> {
    let config = match RedisEventBusConfig::from_env() {
        Ok(config) => config,
        // A bad value of an option the CLI does not use (a consumer's batch size in the
        // worker's environment) does not stop the operator's tool: said, then left out.
        Err(e) if !CLI_OPTIONS.contains(&e.field) => {
            crate::output::warn(&format!("{e}; ignored (the CLI does not use it)"));
            RedisEventBusConfig::from_lookup(|name| {
                let used = CLI_OPTIONS.iter().any(|o| {
                    name == "REDIS_URL"
                        || name.eq_ignore_ascii_case(&format!("EVENTSOURCE_REDIS_{o}"))
                });
                used.then(|| std::env::var(name).ok()).flatten()
            })
            .map_err(|e| Failure::Usage(e.to_string()))?
        }
        Err(e) => return Err(Failure::Usage(e.to_string())),
    };
    let mut config = config
        .consumer_name("eventsource-cli")
        .enable_tracing(false);
    if let Some(url) = &cli.url {
        config.redis_url = url.clone();
    }
    if let Some(prefix) = &cli.prefix {
        config.stream_prefix = prefix.clone();
    }
    if let Some(group) = &cli.group {
        config.consumer_group = group.clone();
    }
    if let Some(partitions) = cli.partitions {
        config.partitions = partitions;
    }
    if let Some(cluster) = cli.cluster {
        config.cluster = cluster;
    }
    if let Some(ca) = &cli.tls_ca_file {
        config.tls_ca_file = Some(ca.clone());
    }
    if let Some(cert) = &cli.tls_cert_file {
        config.tls_cert_file = Some(cert.clone());
    }
    if let Some(key) = &cli.tls_key_file {
        config.tls_key_file = Some(key.clone());
    }
    if cli.tls_insecure {
        config.tls_insecure = true;
    }
    Ok(config)
}

async fn run(cli: Cli, out: Out) -> Outcome {
    let config = config_of(&cli)?;
    let (partitions, cluster) = (config.partitions, config.cluster);
    if let Command::Dashboard { .. } = cli.command
        && cluster
    {
        return Err(Failure::Usage(
            "the dashboard does not connect to a Redis Cluster in this version".into(),
        ));
    }
    if partitions <= 1 && !cluster {
        if cli.partition.is_some_and(|i| i > 0) {
            return Err(Failure::Usage(
                "--partition needs --partitions (or --cluster)".into(),
            ));
        }
        let bus = RedisEventBus::new(config.partitions(1).cluster(false), EventRegistry::new())?;
        if let Command::Partitions = cli.command {
            return partitions::partitions_of_one(&bus, out).await;
        }
        return one_stream(&bus, out, cli.command).await;
    }
    let all = PartitionedEventBus::new(config, EventRegistry::new())?;
    match (cli.partition, cli.command) {
        (Some(i), _) if i >= partitions => Err(Failure::Usage(format!(
            "--partition {i}: the stream has partitions 0..{partitions}"
        ))),
        (Some(i), Command::Partitions) => {
            partitions::partitions_of_one(all.partition(i), out).await
        }
        (Some(i), command) => one_stream(all.partition(i), out, command).await,
        (None, Command::Info | Command::Partitions) => partitions::partitions(&all, out).await,
        (None, command) => partitions::each(&all, out, command).await,
    }
}

/// Runs `command` on one stream (a bus's, or one partition's).
async fn one_stream(bus: &RedisEventBus, out: Out, command: Command) -> Outcome {
    match command {
        Command::Partitions => partitions::partitions_of_one(bus, out).await,
        Command::Info => commands::info(bus, out).await,
        Command::Health(args) => commands::health(bus, out, &args).await,
        Command::Groups => commands::groups(bus, out).await,
        Command::Consumers => commands::consumers(bus, out).await,
        Command::Pending { count } => commands::pending(bus, out, count).await,
        Command::Tail(args) => commands::tail(bus, out, &args).await,
        Command::Recover {
            min_idle,
            max_retries,
        } => commands::recover(bus, out, min_idle, max_retries).await,
        Command::Dlq(command) => dlq::run(bus, out, command).await,
        Command::Trim { dry_run, yes } => commands::trim(bus, out, dry_run, yes).await,
        Command::Dashboard {
            listen,
            allow_hosts,
            all_prefixes,
            read_only,
            token,
        } => {
            dashboard::run(
                bus.config(),
                dashboard::Options {
                    listen,
                    allow_hosts,
                    all_prefixes,
                    read_only,
                    token,
                },
            )
            .await
        }
    }
}

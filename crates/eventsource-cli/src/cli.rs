//! The command line: options, commands and their help (clap derive).

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// The operator's view of a Redis event bus: streams, groups, consumers, pending entries, dead
/// letters (and their replay), health, safe trimming.
///
/// Configuration is the bus's own: every `EVENTSOURCE_REDIS_*` variable the library reads
/// (`REDIS_URL` too, TLS included) applies, a misspelt one is warned about, and the options
/// below override it.
#[derive(Debug, Parser)]
#[command(
    name = "eventsource",
    version,
    after_help = "EXIT CODES\n  0  done; healthy\n  1  the answer is no: unhealthy, or a dead letter / row that does not exist\n  2  usage error (also: a destructive command without --yes and no terminal to ask)\n  3  Redis unreachable, or it refused the credentials or a permission\n\nWith --json every command prints one JSON document on standard output (shapes in the\nREADME); progress and warnings go to standard error."
)]
pub(crate) struct Cli {
    /// Redis URL (`rediss://` for TLS) [default: $EVENTSOURCE_REDIS_URL, else $REDIS_URL, else
    /// redis://localhost:6379].
    #[arg(long, global = true)]
    pub(crate) url: Option<String>,
    /// Stream prefix: the bus's keys are `{prefix}:stream`, `{prefix}:stream_dlq`, ...
    /// [default: $EVENTSOURCE_REDIS_STREAM_PREFIX, else events].
    #[arg(long, global = true)]
    pub(crate) prefix: Option<String>,
    /// Consumer group the command looks at (and scopes dead letters to)
    /// [default: $EVENTSOURCE_REDIS_CONSUMER_GROUP, else default].
    #[arg(long, global = true)]
    pub(crate) group: Option<String>,
    /// Partitions of the stream (a PartitionedEventBus's): its keys are
    /// `{prefix:p<i>}:stream`, ... With more than one, `info` sums the partitions and lists
    /// them with their owners, and the other commands run on every partition in turn (or on
    /// the one `--partition` names; `tail`, `dashboard` and dead letters named by id need it)
    /// [default: $EVENTSOURCE_REDIS_PARTITIONS, else 1].
    #[arg(long, global = true)]
    pub(crate) partitions: Option<u32>,
    /// The Redis URL names a node of a Redis Cluster (a PartitionedEventBus's)
    /// [default: $EVENTSOURCE_REDIS_CLUSTER, else false].
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true",
          value_parser = clap::builder::BoolishValueParser::new())]
    pub(crate) cluster: Option<bool>,
    /// TLS: trust this CA (PEM) instead of the system's [default: $EVENTSOURCE_REDIS_TLS_CA_FILE].
    #[arg(long, global = true, value_name = "PEM")]
    pub(crate) tls_ca_file: Option<std::path::PathBuf>,
    /// TLS: present this client certificate (PEM; with --tls-key-file)
    /// [default: $EVENTSOURCE_REDIS_TLS_CERT_FILE].
    #[arg(long, global = true, value_name = "PEM")]
    pub(crate) tls_cert_file: Option<std::path::PathBuf>,
    /// TLS: the client certificate's key (PEM) [default: $EVENTSOURCE_REDIS_TLS_KEY_FILE].
    #[arg(long, global = true, value_name = "PEM")]
    pub(crate) tls_key_file: Option<std::path::PathBuf>,
    /// TLS: do not verify the server's certificate (development only)
    /// [default: $EVENTSOURCE_REDIS_TLS_INSECURE].
    #[arg(long, global = true)]
    pub(crate) tls_insecure: bool,
    /// With --partitions / --cluster: run the command on this partition only.
    #[arg(long, global = true)]
    pub(crate) partition: Option<u32>,
    /// Print one JSON document instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Log what the command does to standard error (RUST_LOG refines it).
    #[arg(short, long, global = true)]
    pub(crate) verbose: bool,
    /// Colour in text output.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub(crate) color: ColorChoice,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// When to colour text output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum ColorChoice {
    /// On a terminal, unless NO_COLOR is set.
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Subcommand)]
pub(crate) enum Command {
    /// Stream length and ids, the groups, pending entries and dead letters (partitioned:
    /// summed, and each partition with its owner).
    Info,
    /// A partitioned stream's partitions: length, pending, dead letters and the consumer
    /// holding each in the group.
    Partitions,
    /// Judge the group: consumers alive, lag, oldest pending entry, dead letters. Exit 0 when
    /// healthy, 1 when not: usable as a Kubernetes exec probe.
    Health(HealthArgs),
    /// Every consumer group of the stream.
    Groups,
    /// The group's consumers: pending entries and idle time.
    Consumers,
    /// The group's oldest pending entries: owner, idle time, handler starts.
    Pending {
        /// How many.
        #[arg(long, short = 'n', default_value_t = 20)]
        count: usize,
    },
    /// Follow the stream's events, decoded, without joining any group.
    Tail(TailArgs),
    /// One pass of recovery that handles nothing: dead-letters the group's entries whose
    /// handler started 1 + max-retries times, counts the rest (left for the consumers).
    Recover {
        /// Only entries idle at least this long (e.g. 60s, 5m).
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        min_idle: Duration,
        /// Retries allowed before an entry is dead-lettered.
        #[arg(long, default_value_t = 3)]
        max_retries: u32,
    },
    /// Dead letters: list, show, replay, purge.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Remove the entries every consumer group has acknowledged (XTRIM MINID).
    Trim {
        /// Say what would be removed, remove nothing.
        #[arg(long)]
        dry_run: bool,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// A web page per stream prefix: groups, consumers, lag, throughput, pending entries by
    /// age, dead letters with replay and purge. Serves until Ctrl-C / SIGTERM.
    ///
    /// It prints a link with a token: only a browser that opened it may replay or purge, only
    /// requests naming the dashboard's own address (`Host`) are served, and only `--prefix`.
    Dashboard {
        /// Address to listen on (port 0: any free port; the address is printed).
        #[arg(long, default_value = "127.0.0.1:9180")]
        listen: String,
        /// Another name the dashboard is reached by (a DNS name, or NAME:PORT behind a proxy);
        /// requests for any other host are refused. Repeatable.
        #[arg(long = "allow-host", value_name = "NAME")]
        allow_hosts: Vec<String>,
        /// Serve every stream prefix on the server, not only `--prefix`.
        #[arg(long)]
        all_prefixes: bool,
        /// Show everything, change nothing: replay and purge are refused.
        #[arg(long)]
        read_only: bool,
        /// The token replay and purge need (at least 16 characters; default: a random one,
        /// printed at start).
        #[arg(long, env = "EVENTSOURCE_DASHBOARD_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
}

#[derive(Debug, Clone, Args)]
pub(crate) struct HealthArgs {
    /// Unhealthy when no consumer of the group read within this time (consumers of this bus
    /// read at least once a second, also when idle).
    #[arg(long, value_parser = parse_duration, default_value = "60s")]
    pub(crate) max_idle: Duration,
    /// Unhealthy when the oldest pending entry waits longer than this.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub(crate) max_pending_age: Duration,
    /// Unhealthy when more entries than this wait to be delivered to the group (Redis 7 lag).
    #[arg(long)]
    pub(crate) max_lag: Option<u64>,
    /// Unhealthy when the group has more dead letters than this.
    #[arg(long)]
    pub(crate) max_dlq: Option<u64>,
}

#[derive(Debug, Clone, Args)]
pub(crate) struct TailArgs {
    /// Start after this entry id (`$`: only new events; `0`: from the beginning).
    #[arg(long, default_value = "$")]
    pub(crate) from: String,
    /// Only these event types (repeat the option for several).
    #[arg(long = "type", short = 't')]
    pub(crate) types: Vec<String>,
    /// Stop after this many events.
    #[arg(long, short = 'n')]
    pub(crate) count: Option<usize>,
    /// Stop when nothing more is there instead of waiting for new events.
    #[arg(long)]
    pub(crate) no_follow: bool,
}

#[derive(Debug, Clone, Subcommand)]
pub(crate) enum DlqCommand {
    /// The oldest dead letters of the group: type, event, retries, reason.
    List {
        /// How many.
        #[arg(long, short = 'n', default_value_t = 20)]
        count: usize,
        /// Every group's dead letters (and eventsource-py's, which name no group).
        #[arg(long)]
        all_groups: bool,
    },
    /// Every field of one dead letter.
    Show {
        /// The dead letter's id (from `dlq list`).
        id: String,
    },
    /// Put dead letters back on the stream, for the group that dead-lettered them.
    Replay(Selection),
    /// Delete dead letters for good.
    Purge(Selection),
}

#[derive(Debug, Clone, Args)]
pub(crate) struct Selection {
    /// Dead-letter ids.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub(crate) ids: Vec<String>,
    /// Every dead letter of the group present when the command starts (each at most once;
    /// letters dead-lettered meanwhile are left for the next run).
    #[arg(long)]
    pub(crate) all: bool,
    /// Every group's dead letters, not only the group's.
    #[arg(long)]
    pub(crate) all_groups: bool,
    /// Say what would happen, change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub(crate) yes: bool,
}

/// `500ms`, `30s`, `5m`, `1h`, or plain milliseconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 500ms, 30s, 5m, 1h)"))?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n * 1000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        other => return Err(format!("unknown unit {other:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_millis(ms))
}

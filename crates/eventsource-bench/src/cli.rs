//! The command line: the workloads and groups `--workload` accepts (the doc comment of each is
//! its description in `--help`), the options, and the hidden `--role` of the child processes
//! the workloads start (this same binary).

use std::fmt::Write as _;

use clap::builder::{PossibleValuesParser, Styles, TypedValueParser};
use clap::{ArgAction, Parser, Subcommand, ValueEnum};

use crate::Options;
use crate::consumer::ConsumerArgs;
use crate::pg::CatchupArgs;

/// One workload. Declared in the order `all` runs them, Redis first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Workload {
    /// one event per publish call (bus at the default configuration and with tracing off) vs
    /// one awaited XADD at a time
    #[value(name = "publish_single")]
    PublishSingle,
    /// 100 events per call vs XADD pipelined 100 at a time
    #[value(name = "publish_batch100")]
    PublishBatch100,
    /// 16 tasks publishing one at a time vs one task
    #[value(name = "publish_concurrent16")]
    PublishConcurrent16,
    /// one consumer process: default configuration, tracing off, and the redis-rs reader
    /// instead of ours, vs a raw XREADGROUP/XACK loop
    #[value(name = "consume_1")]
    Consume1,
    /// two consumer processes vs one
    #[value(name = "consume_2proc")]
    Consume2proc,
    /// a 1 ms handler, handler_concurrency 16 and 1, two processes vs one
    #[value(name = "consume_2proc_slow")]
    Consume2procSlow,
    /// two consumers, a 150 ms handler, batch 10, pending_idle_ms 1000: handler runs per event
    /// and unapplied acks (duplicates)
    #[value(name = "consume_2proc_slowhandler_dup")]
    Consume2procSlowhandlerDup,
    /// consume_1 over TLS next to plain, on one redis-server with both ports (certificates
    /// made with the openssl command)
    #[value(name = "consume_1_tls")]
    Consume1Tls,
    /// consume_1 with a Prometheus recorder installed next to none (the cost of the metrics
    /// the bus records)
    #[value(name = "consume_1_metrics")]
    Consume1Metrics,
    /// one consumer process whose projection has 3 typed handlers on the event type (each
    /// reads the event) vs 1 handler
    #[value(name = "consume_1_3handlers")]
    Consume1ThreeHandlers,
    /// in process, no Redis: one decoded event dispatched to 3 typed handlers vs 1 (the cost
    /// of handing each handler its event)
    #[value(name = "dispatch_3handlers")]
    DispatchThreeHandlers,
    /// publish-to-handler latency at 500 events/s
    #[value(name = "latency_500")]
    Latency500,
    /// the same at 5,000 events/s
    #[value(name = "latency_5000")]
    Latency5000,
    /// peak memory of a consumer over 200,000 events
    #[value(name = "rss")]
    Rss,
    /// publish and consume on one Redis node, and on a 3-master Redis Cluster with 1 and with
    /// 12 partitions (PartitionedEventBus), servers of the workload's own, side by side
    #[value(name = "scale_out")]
    ScaleOut,
    /// PostgreSQL store: one event per append vs a one-row INSERT
    #[value(name = "pg_append_1")]
    PgAppend1,
    /// the same with 16 concurrent writers (pool of 10 = default, and 16)
    #[value(name = "pg_append_16")]
    PgAppend16,
    /// appends of 100 events vs one 100-row INSERT
    #[value(name = "pg_append_batch100")]
    PgAppendBatch100,
    /// a catch-up subscription over 1,000,000 stored events into an in-memory projection
    /// (child process, peak RSS) vs a raw paged SELECT
    #[value(name = "pg_catchup")]
    PgCatchup,
    /// outbox relay: events/s from commit to the Redis stream, and commit-to-stream latency
    /// at 500 events/s
    #[value(name = "outbox_relay")]
    OutboxRelay,
}

impl Workload {
    /// The name `--workload` takes, which also keys the workload's results.
    pub(crate) fn name(self) -> String {
        self.to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default()
    }

    fn is_postgres(self) -> bool {
        matches!(
            self,
            Self::PgAppend1
                | Self::PgAppend16
                | Self::PgAppendBatch100
                | Self::PgCatchup
                | Self::OutboxRelay
        )
    }
}

/// A group of workloads; naming one replaces the workloads named before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Group {
    /// every Redis workload (publish_* .. scale_out)
    #[value(name = "redis")]
    Redis,
    /// every PostgreSQL workload (pg_* and outbox_relay)
    #[value(name = "postgres")]
    Postgres,
    /// every workload above
    #[value(name = "all")]
    All,
}

impl Group {
    fn workloads(self) -> Vec<Workload> {
        let all = Workload::value_variants().iter().copied();
        match self {
            Self::Redis => all.filter(|w| !w.is_postgres()).collect(),
            Self::Postgres => all.filter(|w| w.is_postgres()).collect(),
            Self::All => all.collect(),
        }
    }
}

/// What one `--workload` names.
#[derive(Debug, Clone, Copy)]
enum Selection {
    One(Workload),
    Group(Group),
}

/// The names of every workload and group, as a parser that refuses any other (its error lists
/// them all).
fn selection_parser() -> impl TypedValueParser<Value = Selection> {
    let names = Workload::value_variants()
        .iter()
        .filter_map(ValueEnum::to_possible_value)
        .chain(
            Group::value_variants()
                .iter()
                .filter_map(ValueEnum::to_possible_value),
        );
    PossibleValuesParser::new(names).map(|name| match Group::from_str(&name, false) {
        Ok(group) => Selection::Group(group),
        Err(_) => Selection::One(
            Workload::from_str(&name, false).expect("the parser admits only these names"),
        ),
    })
}

/// Where the description column of the workload list starts, and where its lines end.
const DESCRIPTION_COLUMN: usize = 24;
const LINE_WIDTH: usize = 92;

/// The workload list and the closing note of `--help`: each name with its description.
fn workloads_help() -> String {
    let styles = Styles::default();
    let (heading, literal) = (*styles.get_header(), *styles.get_literal());
    let mut text = format!("{heading}Workloads:{heading:#}\n");
    let values = Workload::value_variants()
        .iter()
        .filter_map(ValueEnum::to_possible_value)
        .chain(
            Group::value_variants()
                .iter()
                .filter_map(ValueEnum::to_possible_value),
        );
    for value in values {
        let name = value.get_name();
        let _ = write!(text, "  {literal}{name}{literal:#}");
        let mut column = 2 + name.len();
        if column + 2 > DESCRIPTION_COLUMN {
            text.push('\n');
            column = 0;
        }
        let help = value
            .get_help()
            .map(ToString::to_string)
            .unwrap_or_default();
        for word in help.split_whitespace() {
            if column > DESCRIPTION_COLUMN && column + 1 + word.len() > LINE_WIDTH {
                text.push('\n');
                column = 0;
            }
            if column < DESCRIPTION_COLUMN {
                text.push_str(&" ".repeat(DESCRIPTION_COLUMN - column));
                column = DESCRIPTION_COLUMN;
            } else {
                text.push(' ');
                column += 1;
            }
            text.push_str(word);
            column += word.len();
        }
        text.push('\n');
    }
    text.push_str(
        "\nProgress goes to standard error; the last line of standard output is one JSON object \
         keyed\nby workload.",
    );
    text
}

/// The command line as clap reads it; [`Cli::invocation`] makes it what to do.
#[derive(Debug, Parser)]
#[command(
    name = "eventsource-bench",
    about = "Every figure is measured next to the raw limit of the same Redis (or PostgreSQL) in the same run.",
    after_help = workloads_help(),
    disable_help_flag = true,
    disable_help_subcommand = true,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub(crate) struct Cli {
    /// a workload or group to run, repeatable (the names are listed below)
    #[arg(
        long = "workload",
        value_name = "NAME",
        required = true,
        hide_possible_values = true,
        value_parser = selection_parser()
    )]
    workloads: Vec<Selection>,
    /// events per run (each workload has its own default)
    #[arg(long, value_name = "N")]
    n: Option<usize>,
    /// runs per workload, medians reported
    #[arg(long, value_name = "R", default_value_t = 3)]
    repeat: usize,
    /// the Redis to measure
    #[arg(long, value_name = "URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// the PostgreSQL to measure; each run works in a schema of its own
    /// and drops it
    #[arg(
        long,
        verbatim_doc_comment,
        value_name = "URL",
        default_value = "postgres://postgres@127.0.0.1:5432/test"
    )]
    database_url: String,
    /// this text
    #[arg(short, long, action = ArgAction::Help)]
    help: Option<bool>,
    #[command(subcommand)]
    child: Option<Child>,
}

/// The hidden roles: `--role consumer ...` and `--role pg-catchup ...` (a workload starts this
/// binary with them; they are no part of `--help`).
#[derive(Debug, Subcommand)]
pub(crate) enum Child {
    #[command(long_flag = "role", hide = true, subcommand_required = true)]
    Role {
        #[command(subcommand)]
        role: Role,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum Role {
    /// A consumer of a `consume_*` or `rss` run (see `consumer::consume_run`).
    Consumer(ConsumerArgs),
    /// The reader of a `pg_catchup` run (see `pg::catchup`).
    #[command(name = "pg-catchup")]
    PgCatchup(CatchupArgs),
}

/// What the command line asks for.
pub(crate) enum Invocation {
    /// Run workloads and print their JSON.
    Workloads(Options),
    /// Be a child process of a workload.
    Child(Role),
}

impl Cli {
    pub(crate) fn invocation(self) -> Invocation {
        if let Some(Child::Role { role }) = self.child {
            return Invocation::Child(role);
        }
        // A workload adds itself; a group replaces what was named before it.
        let mut workloads = Vec::new();
        for selection in self.workloads {
            match selection {
                Selection::One(w) => workloads.push(w),
                Selection::Group(g) => workloads = g.workloads(),
            }
        }
        Invocation::Workloads(Options {
            workloads,
            redis_url: self.redis_url,
            database_url: self.database_url,
            n: self.n,
            repeat: self.repeat.max(1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workloads(args: &[&str]) -> Vec<String> {
        let cli = Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .expect("parses");
        match cli.invocation() {
            Invocation::Workloads(o) => o.workloads.into_iter().map(Workload::name).collect(),
            Invocation::Child(_) => panic!("not a child"),
        }
    }

    #[test]
    fn a_group_replaces_what_came_before_and_names_add_to_it() {
        let redis = workloads(&["--workload", "consume_1", "--workload", "redis"]);
        assert_eq!(redis.len(), 15);
        assert_eq!(redis.first().map(String::as_str), Some("publish_single"));
        assert_eq!(redis.last().map(String::as_str), Some("scale_out"));
        let more = workloads(&["--workload", "postgres", "--workload", "rss"]);
        assert_eq!(
            more,
            [
                "pg_append_1",
                "pg_append_16",
                "pg_append_batch100",
                "pg_catchup",
                "outbox_relay",
                "rss"
            ]
        );
        assert_eq!(workloads(&["--workload", "all"]).len(), 20);
    }

    #[test]
    fn an_unknown_workload_is_refused_with_the_valid_names() {
        let e = Cli::try_parse_from(["bench", "--workload", "nonsense"]).expect_err("refused");
        let text = e.to_string();
        assert!(text.contains("nonsense") && text.contains("dispatch_3handlers"));
        assert!(text.contains("outbox_relay") && text.contains("all"));
    }
}

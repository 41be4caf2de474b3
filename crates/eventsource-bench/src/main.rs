//! `eventsource-bench`: the workloads of `docs/workloads.md`, each measured next to the raw
//! limit of the same Redis or PostgreSQL in the same run (`--help` lists them).
//!
//! ```text
//! cargo run --release -p eventsource-bench -- --workload NAME|redis|postgres|all
//!     [--workload NAME ...] [--n N] [--repeat R]
//!     [--redis-url redis://127.0.0.1:6379]
//!     [--database-url postgres://postgres@127.0.0.1:5432/test]
//! ```
//!
//! Redis workloads: `publish_single`, `publish_batch100`, `publish_concurrent16`
//! ([`publish`]); `consume_1`, `consume_2proc`, `consume_2proc_slow`,
//! `consume_2proc_slowhandler_dup`, `consume_1_tls`, `consume_1_metrics`,
//! `consume_1_3handlers`, `dispatch_3handlers` (in process, no Redis) and `rss` ([`consume`]);
//! `latency_500`, `latency_5000` ([`latency`]); `scale_out` ([`scale`]: one node vs a
//! cluster with 1 and 12 partitions, on servers of its own). PostgreSQL workloads: `pg_append_1`,
//! `pg_append_16`, `pg_append_batch100`, `pg_catchup`, `outbox_relay` ([`pg`]). The raw limits
//! are in [`limits`], the statistics in [`stats`], the command line in [`cli`].
//!
//! Progress and tables go to standard error; the last line of standard output is one JSON
//! object keyed by workload with medians and ranges (`events_per_sec`, `p50_ms`..`max_ms`,
//! `peak_rss_mib`) and, where a raw limit applies, `limit_events_per_sec` and
//! `ratio_to_limit`.
//!
//! Consumers for the `consume_*` and `rss` workloads run in child processes (this binary with
//! the hidden `--role consumer`, see [`consumer`]), so two consumers really are two processes
//! and the memory figure is the consumer's own; the `pg_catchup` reader likewise runs as
//! `--role pg-catchup`.

#![forbid(unsafe_code)]

mod cli;
mod consume;
mod consumer;
mod fixture;
mod latency;
mod limits;
mod pg;
mod publish;
mod scale;
mod stats;

use std::collections::BTreeMap;
use std::process::ExitCode;

use clap::Parser;
use serde_json::{Value as Json, json};

use crate::cli::{Cli, Invocation, Role, Workload};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// What the workloads run with.
#[derive(Debug, Clone)]
struct Options {
    workloads: Vec<Workload>,
    redis_url: String,
    database_url: String,
    /// Events per run; each workload has its own default.
    n: Option<usize>,
    /// Runs per workload (at least 1).
    repeat: usize,
}

/// Runs one workload; its results keyed by name (some workloads report more than one).
async fn run(o: &Options, workload: Workload) -> Result<Vec<(String, Json)>, Error> {
    use Workload as W;
    let name = &workload.name();
    match workload {
        W::PublishSingle | W::PublishBatch100 | W::PublishConcurrent16 => {
            publish::workload(o, name).await
        }
        W::Consume1 | W::Consume2proc | W::Consume2procSlow => {
            consume::consume_workload(o, name).await
        }
        W::Consume2procSlowhandlerDup => one(name, consume::slow_two_consumers_workload(o).await),
        W::Consume1Tls => one(name, consume::consume_tls_workload(o).await),
        W::Consume1Metrics => one(name, consume::consume_metrics_workload(o).await),
        W::Consume1ThreeHandlers => one(name, consume::consume_handlers_workload(o).await),
        W::DispatchThreeHandlers => one(name, consume::dispatch_handlers_workload(o).await),
        W::Latency500 => one(name, latency::workload(o, 500).await),
        W::Latency5000 => one(name, latency::workload(o, 5000).await),
        W::Rss => one(name, consume::rss_workload(o).await),
        W::ScaleOut => one(name, scale::workload(o).await),
        W::PgAppend1 | W::PgAppend16 | W::PgAppendBatch100 | W::PgCatchup | W::OutboxRelay => {
            pg::workload(o, name).await
        }
    }
}

/// A workload with one result, keyed by its name.
fn one(name: &str, result: Result<Json, Error>) -> Result<Vec<(String, Json)>, Error> {
    result.map(|value| vec![(name.to_owned(), value)])
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // A child answers on standard output, where its parent reads the last line.
        Err(e) if std::env::args().nth(1).as_deref() == Some("--role") && e.use_stderr() => {
            println!("{}", json!({"error": e.to_string()}));
            return ExitCode::SUCCESS;
        }
        Err(e) => e.exit(),
    };
    let options = match cli.invocation() {
        Invocation::Workloads(options) => options,
        Invocation::Child(role) => {
            let report = match role {
                Role::Consumer(args) => consumer::run_role(args),
                Role::PgCatchup(args) => pg::run_catchup_role(args),
            };
            println!("{report}");
            return ExitCode::SUCCESS;
        }
    };
    // One thread, as a client waiting for each reply would be: the raw limits and the bus
    // run on the same kind of runtime (a multi-thread runtime whose caller is not on a
    // worker costs a single awaited call a third of its rate here).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut results = BTreeMap::new();
    let mut failed = false;
    for &workload in &options.workloads {
        let name = workload.name();
        eprintln!("{name}:");
        match rt.block_on(run(&options, workload)) {
            Ok(values) => results.extend(values),
            Err(e) => {
                failed = true;
                eprintln!("  {name} failed: {e}");
                results.insert(name, json!({"error": e.to_string()}));
            }
        }
    }
    println!("{}", serde_json::to_string(&results).expect("JSON"));
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

//! A partitioned stream (`--partitions`, `--cluster`): its partitions with their owners, and
//! any command run on every partition in turn.

use std::process::ExitCode;

use eventsource_redis::{PartitionedEventBus, RedisEventBus};
use serde::Serialize;
use serde_json::json;

use crate::cli::{Command, DlqCommand};
use crate::commands;
use crate::output::confirm;
use crate::output::{Out, capture, warn};
use crate::{Failure, Outcome};

/// One partition as `partitions` reports it.
#[derive(Serialize)]
struct PartitionRow {
    partition: u32,
    stream: String,
    length: u64,
    pending: u64,
    dead_letters: u64,
    owner: Option<String>,
    token: Option<u64>,
}

/// A partitioned stream: the totals and each partition with the consumer holding it.
pub(crate) async fn partitions(bus: &PartitionedEventBus, out: Out) -> Outcome {
    let owners = bus.partition_owners().await?;
    let mut rows = Vec::new();
    let (mut length, mut pending, mut dead_letters) = (0, 0, 0);
    for (i, part) in bus.partitions().iter().enumerate() {
        let info = part.try_stream_info().await?;
        length += info.stream.length;
        pending += info.pending_messages;
        dead_letters += info.dlq_messages;
        let state = owners.get(i);
        rows.push(PartitionRow {
            partition: u32::try_from(i).unwrap_or(u32::MAX),
            stream: info.stream.name,
            length: info.stream.length,
            pending: info.pending_messages,
            dead_letters: info.dlq_messages,
            owner: state.and_then(|s| s.owner.clone()),
            token: state.and_then(|s| s.token),
        });
    }
    if length == 0 && rows.iter().all(|r| r.owner.is_none()) {
        warn(&format!(
            "no partition of {} holds entries or has an owner (check --prefix, --partitions)",
            bus.config().stream_prefix
        ));
    }
    if out.json {
        out.json(&json!({
            "partitions": bus.partition_count(),
            "group": bus.config().consumer_group,
            "length": length,
            "pending": pending,
            "dead_letters": dead_letters,
            "per_partition": rows,
        }));
        return Ok(ExitCode::SUCCESS);
    }
    out.line(&format!(
        "partitions    {} of {} (group {})",
        bus.partition_count(),
        bus.config().stream_prefix,
        bus.config().consumer_group
    ));
    out.line(&format!("length        {length}"));
    out.line(&format!("pending       {pending}"));
    out.line(&format!("dead letters  {dead_letters}"));
    let table: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.partition.to_string(),
                r.stream.clone(),
                r.length.to_string(),
                r.pending.to_string(),
                r.dead_letters.to_string(),
                r.owner.clone().unwrap_or_else(|| "-".to_owned()),
            ]
        })
        .collect();
    out.table(
        &["partition", "stream", "length", "pending", "dlq", "owner"],
        &table,
    );
    Ok(ExitCode::SUCCESS)
}

/// `partitions` on an unpartitioned stream (or one partition of a partitioned one).
pub(crate) async fn partitions_of_one(bus: &RedisEventBus, out: Out) -> Outcome {
    warn(&format!(
        "{} is one stream (no --partitions given, or --partition chose one): showing its info",
        bus.stream_name()
    ));
    commands::info(bus, out).await
}

/// Runs `command` on every partition in turn: in text, each partition's output under a
/// heading; in JSON one document, `{"partitions": [{"partition", "stream", "result"}]}`.
/// Destructive commands ask once for all partitions. Exits with the first partition's
/// non-zero code (e.g. an unhealthy partition), after running them all.
pub(crate) async fn each(all: &PartitionedEventBus, out: Out, command: Command) -> Outcome {
    let names_one = match &command {
        Command::Tail(_) => Some("tail follows one stream"),
        Command::Dashboard { .. } => Some("the dashboard shows one stream"),
        Command::Dlq(DlqCommand::Show { .. }) => {
            Some("a dead letter's id belongs to one partition")
        }
        Command::Dlq(DlqCommand::Replay(s) | DlqCommand::Purge(s)) if !s.all => {
            Some("dead-letter ids belong to one partition")
        }
        _ => None,
    };
    if let Some(why) = names_one {
        return Err(Failure::Usage(format!(
            "{why}: name it with --partition <i> (`eventsource partitions` lists them; \
             `dlq list` shows each dead letter's partition)"
        )));
    }
    let count = all.partition_count();
    let prefix = &all.config().stream_prefix;
    let command = match command {
        Command::Trim {
            dry_run: false,
            yes,
        } => {
            confirm(
                &format!(
                    "remove the entries every group acknowledged from the {count} partitions of \
                     {prefix}?"
                ),
                yes,
            )?;
            Command::Trim {
                dry_run: false,
                yes: true,
            }
        }
        Command::Dlq(DlqCommand::Replay(mut s)) if !s.dry_run => {
            confirm(
                &format!("replay the dead letters of the {count} partitions of {prefix}?"),
                s.yes,
            )?;
            s.yes = true;
            Command::Dlq(DlqCommand::Replay(s))
        }
        Command::Dlq(DlqCommand::Purge(mut s)) if !s.dry_run => {
            confirm(
                &format!("delete the dead letters of the {count} partitions of {prefix} for good?"),
                s.yes,
            )?;
            s.yes = true;
            Command::Dlq(DlqCommand::Purge(s))
        }
        other => other,
    };
    let mut code = ExitCode::SUCCESS;
    let mut docs = Vec::new();
    for (i, part) in all.partitions().iter().enumerate() {
        if !out.json {
            out.line(&format!("== partition {i}: {} ==", part.stream_name()));
        }
        let (result, mut captured) = capture(crate::one_stream(part, out, command.clone())).await;
        let result = result?;
        if code == ExitCode::SUCCESS {
            code = result;
        }
        if out.json {
            let result = if captured.len() == 1 {
                captured.remove(0)
            } else {
                json!(captured)
            };
            docs.push(json!({"partition": i, "stream": part.stream_name(), "result": result}));
        }
    }
    if out.json {
        out.json(&json!({ "partitions": docs }));
    }
    Ok(code)
}

//! Dead letters: list, show, replay and purge, scoped to the group unless `--all-groups`.
//!
//! `--all` works on the dead letters present when the command starts: it walks the DLQ up to
//! the newest id it saw first, so letters dead-lettered again meanwhile (a live consumer still
//! failing) are left for the next run instead of making the walk endless, and each letter is
//! replayed (or purged) at most once — by a script, so two operators doing it at the same
//! time replay it once.

use std::process::ExitCode;

use eventsource_redis::{DlqMessage, PurgeOutcome, RedisEventBus, ReplayOutcome};
use serde_json::{Map, Value, json};

use crate::cli::{DlqCommand, Selection};
use crate::output::confirm;
use crate::output::{Out, Progress};
use crate::{Failure, Outcome};

/// Refuses what is not a stream id (`1700000000000-0`, or just the milliseconds) with a usage
/// error, before anything is sent to Redis.
fn check_id(id: &str) -> Result<(), Failure> {
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    let valid = match id.split_once('-') {
        Some((ms, seq)) => digits(ms) && digits(seq),
        None => digits(id),
    };
    if valid {
        Ok(())
    } else {
        Err(Failure::Usage(format!(
            "{id:?} is not a dead letter id (they look like 1700000000000-0; `eventsource dlq \
             list` shows them)"
        )))
    }
}

/// Whether a dead letter belongs to `scope` (`None`: every group).
fn in_scope(letter: &DlqMessage, scope: Option<&str>) -> bool {
    scope.is_none_or(|group| letter.consumer_group() == Some(group))
}

/// Walks the dead letters present now (up to the newest id seen first), page by page.
async fn walk(
    bus: &RedisEventBus,
    scope: Option<&str>,
    limit: Option<usize>,
) -> Result<Vec<DlqMessage>, Failure> {
    let Some(end) = bus.dlq_last_id().await? else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    let mut start = "-".to_owned();
    loop {
        let page = bus.dlq_messages_range(&start, &end, 500).await?;
        let full = page.len() == 500;
        if let Some(last) = page.last() {
            start = format!("({}", last.message_id);
        }
        for letter in page {
            if in_scope(&letter, scope) {
                found.push(letter);
                if limit.is_some_and(|n| found.len() >= n) {
                    return Ok(found);
                }
            }
        }
        if !full {
            return Ok(found);
        }
    }
}

/// How many dead letters belong to `scope`.
pub(crate) async fn count_in_scope(
    bus: &RedisEventBus,
    scope: Option<&str>,
) -> Result<u64, Failure> {
    Ok(walk(bus, scope, None).await?.len() as u64)
}

fn summary(letter: &DlqMessage) -> Value {
    json!({
        "dlq_id": letter.message_id,
        "event_type": letter.event_type(),
        "event_id": letter.get("event_id"),
        "aggregate_id": letter.get("aggregate_id"),
        "original_message_id": letter.original_message_id(),
        "retry_count": letter.retry_count(),
        "consumer_group": letter.consumer_group(),
        "dlq_timestamp": letter.get("dlq_timestamp"),
        "error": letter.error(),
    })
}

pub(crate) async fn run(bus: &RedisEventBus, out: Out, command: DlqCommand) -> Outcome {
    let group = bus.config().consumer_group.clone();
    match command {
        DlqCommand::List { count, all_groups } => {
            let scope = (!all_groups).then_some(group.as_str());
            let letters = walk(bus, scope, Some(count)).await?;
            // A full page may not be all: say how many there are (on standard error, so the
            // JSON document stays the list).
            if count > 0 && letters.len() == count {
                let total = count_in_scope(bus, scope).await?;
                if total > count as u64 {
                    crate::output::warn(&format!(
                        "showing the oldest {count} of {total} dead letters{}; --count N shows more",
                        scope.map(|g| format!(" of group {g}")).unwrap_or_default()
                    ));
                }
            }
            if out.json {
                out.json(&letters.iter().map(summary).collect::<Vec<_>>());
                return Ok(ExitCode::SUCCESS);
            }
            let rows: Vec<Vec<String>> = letters
                .iter()
                .map(|l| {
                    vec![
                        l.message_id.clone(),
                        l.event_type().unwrap_or("?").to_owned(),
                        l.get("event_id").unwrap_or("-").to_owned(),
                        l.retry_count().map_or("-".into(), |n| n.to_string()),
                        l.consumer_group().unwrap_or("-").to_owned(),
                        l.error().unwrap_or("(no reason recorded)").to_owned(),
                    ]
                })
                .collect();
            out.table(
                &[
                    "dlq id",
                    "event type",
                    "event id",
                    "retries",
                    "group",
                    "reason",
                ],
                &rows,
            );
            if letters.is_empty() && scope.is_some() {
                let others = count_in_scope(bus, None).await?;
                if others > 0 {
                    crate::output::warn(&format!(
                        "no dead letters of group {group}; {others} of other groups \
                         (--all-groups shows them)"
                    ));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { id } => {
            check_id(&id)?;
            let Some(letter) = bus
                .dlq_messages_range(&id, &id, 1)
                .await?
                .into_iter()
                .next()
            else {
                return Err(Failure::No(format!(
                    "no dead letter {id} in {}",
                    bus.dlq_stream_name()
                )));
            };
            if out.json {
                let mut fields = Map::new();
                for (k, v) in letter.fields_lossy() {
                    fields.insert(k, Value::String(v));
                }
                out.json(&json!({ "dlq_id": letter.message_id, "fields": fields }));
            } else {
                out.line(&format!("dead letter {}", letter.message_id));
                let rows: Vec<Vec<String>> = letter
                    .fields_lossy()
                    .into_iter()
                    .map(|(k, v)| vec![k, v])
                    .collect();
                out.table(&["field", "value"], &rows);
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Replay(selection) => act(bus, out, &group, selection, Action::Replay).await,
        DlqCommand::Purge(selection) => act(bus, out, &group, selection, Action::Purge).await,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Replay,
    Purge,
}

async fn act(
    bus: &RedisEventBus,
    out: Out,
    group: &str,
    selection: Selection,
    action: Action,
) -> Outcome {
    let scope = (!selection.all_groups).then_some(group);
    let ids: Vec<String> = if selection.all {
        walk(bus, scope, None)
            .await?
            .into_iter()
            .map(|l| l.message_id)
            .collect()
    } else {
        for id in &selection.ids {
            check_id(id)?;
        }
        selection.ids.clone()
    };
    let verb = match action {
        Action::Replay => "replay",
        Action::Purge => "purge",
    };
    let whose = scope.map_or("of every group".to_owned(), |g| format!("of group {g}"));
    if selection.dry_run {
        if out.json {
            out.json(
                &json!({ "dry_run": true, "action": verb, "selected": ids.len(), "ids": ids }),
            );
        } else {
            out.line(&format!(
                "would {verb} {} dead letters {whose}: {}",
                ids.len(),
                ids.join(" ")
            ));
        }
        return Ok(ExitCode::SUCCESS);
    }
    if selection.all || action == Action::Purge {
        if ids.is_empty() {
            if out.json {
                out.json(&json!({ "dry_run": false, "action": verb, "selected": 0, "done": 0, "missing": 0, "other_group": 0, "results": [] }));
            } else {
                out.line(&format!("no dead letters {whose} to {verb}"));
            }
            return Ok(ExitCode::SUCCESS);
        }
        let question = match action {
            Action::Replay => format!(
                "Replay {} dead letters {whose} onto {}?",
                ids.len(),
                bus.stream_name()
            ),
            Action::Purge => format!("Delete {} dead letters {whose} for good?", ids.len()),
        };
        confirm(&question, selection.yes)?;
    }
    let (mut done, mut missing, mut other) = (0u64, 0u64, 0u64);
    let mut results = Vec::with_capacity(ids.len());
    let mut progress = Progress::new(verb, ids.len() as u64);
    for id in &ids {
        let result = match action {
            Action::Replay => match bus.replay_dlq_message_scoped(id, scope).await? {
                ReplayOutcome::Replayed { new_id } => {
                    done += 1;
                    json!({ "id": id, "outcome": "replayed", "new_id": new_id })
                }
                ReplayOutcome::Missing => {
                    missing += 1;
                    json!({ "id": id, "outcome": "missing" })
                }
                ReplayOutcome::OtherGroup { group } => {
                    other += 1;
                    json!({ "id": id, "outcome": "other_group", "group": group })
                }
            },
            Action::Purge => match bus.purge_dlq_message_scoped(id, scope).await? {
                PurgeOutcome::Purged => {
                    done += 1;
                    json!({ "id": id, "outcome": "purged" })
                }
                PurgeOutcome::Missing => {
                    missing += 1;
                    json!({ "id": id, "outcome": "missing" })
                }
                PurgeOutcome::OtherGroup { group } => {
                    other += 1;
                    json!({ "id": id, "outcome": "other_group", "group": group })
                }
            },
        };
        results.push(result);
        progress.inc();
    }
    drop(progress);
    if out.json {
        out.json(&json!({
            "dry_run": false,
            "action": verb,
            "selected": ids.len(),
            "done": done,
            "missing": missing,
            "other_group": other,
            "results": results,
        }));
    } else {
        let past = match action {
            Action::Replay => "replayed",
            Action::Purge => "purged",
        };
        out.line(&format!(
            "{past} {done} of {} dead letters{}{}",
            ids.len(),
            if missing > 0 {
                format!("; {missing} not found (already replayed or purged?)")
            } else {
                String::new()
            },
            if other > 0 {
                format!("; {other} belong to another group (--all-groups)")
            } else {
                String::new()
            }
        ));
    }
    Ok(if done == 0 && (missing > 0 || other > 0) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

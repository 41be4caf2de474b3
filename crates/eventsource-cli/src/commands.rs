//! The inspecting commands (info, health, groups, consumers, pending, tail, recover) and trim.

use std::process::ExitCode;
use std::time::Duration;

use eventsource_redis::{RecoveryOptions, RedisEventBus, StreamInfo};
use serde::Serialize;
use serde_json::json;

use crate::Outcome;
use crate::cli::{HealthArgs, TailArgs};
use crate::output::{Out, confirm, warn};

/// Warns when the stream or the group does not exist: a mistyped `--prefix` or `--group`
/// otherwise shows only zeros.
pub(crate) fn warn_missing(bus: &RedisEventBus, info: &StreamInfo) {
    if info.stream.length == 0 && info.consumer_groups.is_empty() {
        warn(&format!(
            "stream {} does not exist or is empty (check --prefix)",
            bus.stream_name()
        ));
    } else if !info
        .consumer_groups
        .iter()
        .any(|g| g.name == bus.config().consumer_group)
    {
        let names: Vec<&str> = info
            .consumer_groups
            .iter()
            .map(|g| g.name.as_str())
            .collect();
        warn(&format!(
            "group {} does not exist on {} (its groups: {}; check --group)",
            bus.config().consumer_group,
            bus.stream_name(),
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        ));
    }
}

pub(crate) async fn info(bus: &RedisEventBus, out: Out) -> Outcome {
    let info = bus.try_stream_info().await?;
    warn_missing(bus, &info);
    if out.json {
        out.json(&info);
        return Ok(ExitCode::SUCCESS);
    }
    out.line(&format!("stream        {}", info.stream.name));
    out.line(&format!("length        {}", info.stream.length));
    out.line(&format!(
        "entries       {} .. {}",
        info.stream.first_entry_id.as_deref().unwrap_or("-"),
        info.stream.last_entry_id.as_deref().unwrap_or("-")
    ));
    out.line(&format!(
        "pending       {} (group {})",
        info.pending_messages,
        bus.config().consumer_group
    ));
    out.line(&format!(
        "dead letters  {} ({})",
        info.dlq_messages,
        bus.dlq_stream_name()
    ));
    out.line(&format!("consumers     {}", info.active_consumers));
    groups_table(out, &info);
    Ok(ExitCode::SUCCESS)
}

fn groups_table(out: Out, info: &StreamInfo) {
    let rows: Vec<Vec<String>> = info
        .consumer_groups
        .iter()
        .map(|g| {
            vec![
                g.name.clone(),
                g.consumers.to_string(),
                g.pending.to_string(),
                g.lag.map_or("-".to_owned(), |l| l.to_string()),
                g.last_delivered_id.clone(),
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.table(
            &["group", "consumers", "pending", "lag", "last delivered"],
            &rows,
        );
    }
}

pub(crate) async fn groups(bus: &RedisEventBus, out: Out) -> Outcome {
    let info = bus.try_stream_info().await?;
    if info.consumer_groups.is_empty() {
        warn(&format!("no consumer group on {}", bus.stream_name()));
    }
    if out.json {
        out.json(&info.consumer_groups);
    } else {
        groups_table(out, &info);
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn consumers(bus: &RedisEventBus, out: Out) -> Outcome {
    let info = bus.try_stream_info().await?;
    warn_missing(bus, &info);
    let consumers = bus.consumers().await?;
    if out.json {
        out.json(&consumers);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = consumers
        .iter()
        .map(|c| vec![c.name.clone(), c.pending.to_string(), c.idle_ms.to_string()])
        .collect();
    out.table(&["consumer", "pending", "idle ms"], &rows);
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn pending(bus: &RedisEventBus, out: Out, count: usize) -> Outcome {
    let info = bus.try_stream_info().await?;
    warn_missing(bus, &info);
    let entries = bus.pending_entries(count).await?;
    if out.json {
        out.json(&entries);
        return Ok(ExitCode::SUCCESS);
    }
    let rows: Vec<Vec<String>> = entries
        .iter()
        .map(|e| {
            vec![
                e.message_id.clone(),
                e.consumer.clone(),
                e.idle_ms.to_string(),
                e.deliveries.to_string(),
            ]
        })
        .collect();
    out.table(&["message id", "consumer", "idle ms", "starts"], &rows);
    Ok(ExitCode::SUCCESS)
}

/// One health check's verdict.
#[derive(Debug, Serialize)]
struct Check {
    name: &'static str,
    ok: bool,
    detail: String,
}

pub(crate) async fn health(bus: &RedisEventBus, out: Out, args: &HealthArgs) -> Outcome {
    let group = bus.config().consumer_group.clone();
    let info = match bus.try_stream_info().await {
        Ok(info) => info,
        Err(e) => {
            let reason = eventsource_redis::codec::error_chain(&e);
            if out.json {
                out.json(&json!({
                    "status": "unhealthy",
                    "group": group,
                    "stream": bus.stream_name(),
                    "connected": false,
                    "error": reason,
                    "checks": [],
                }));
            } else {
                out.line(&format!("{}: {reason}", out.status("unhealthy", false)));
            }
            return Ok(ExitCode::from(1));
        }
    };
    let group_info = info.consumer_groups.iter().find(|g| g.name == group);
    let consumers = bus.consumers().await?;
    let alive: Vec<&str> = consumers
        .iter()
        .filter(|c| u128::from(c.idle_ms) <= args.max_idle.as_millis())
        .map(|c| c.name.as_str())
        .collect();
    let oldest_pending_ms = bus
        .pending_entries(1000)
        .await?
        .iter()
        .map(|p| p.idle_ms)
        .max();
    let dead_letters = crate::dlq::count_in_scope(bus, Some(&group)).await?;
    let mut checks = vec![
        Check {
            name: "group",
            ok: group_info.is_some(),
            detail: if group_info.is_some() {
                format!("group {group} exists on {}", bus.stream_name())
            } else {
                format!("group {group} does not exist on {}", bus.stream_name())
            },
        },
        Check {
            name: "consumers",
            ok: !alive.is_empty(),
            detail: format!(
                "{} of {} consumers read within {} ms",
                alive.len(),
                consumers.len(),
                args.max_idle.as_millis()
            ),
        },
        Check {
            name: "pending_age",
            ok: oldest_pending_ms
                .is_none_or(|ms| u128::from(ms) <= args.max_pending_age.as_millis()),
            detail: match oldest_pending_ms {
                Some(ms) => format!(
                    "oldest pending entry idle {ms} ms (limit {} ms)",
                    args.max_pending_age.as_millis()
                ),
                None => "nothing pending".to_owned(),
            },
        },
    ];
    let lag = group_info.and_then(|g| g.lag);
    if let Some(limit) = args.max_lag {
        checks.push(Check {
            name: "lag",
            ok: lag.is_some_and(|l| l <= limit),
            detail: match lag {
                Some(l) => format!("{l} entries not yet delivered (limit {limit})"),
                None => "lag unknown (Redis older than 7.0, or no group)".to_owned(),
            },
        });
    }
    if let Some(limit) = args.max_dlq {
        checks.push(Check {
            name: "dead_letters",
            ok: dead_letters <= limit,
            detail: format!("{dead_letters} dead letters of group {group} (limit {limit})"),
        });
    }
    let healthy = checks.iter().all(|c| c.ok);
    let status = if healthy { "healthy" } else { "unhealthy" };
    if out.json {
        out.json(&json!({
            "status": status,
            "group": group,
            "stream": bus.stream_name(),
            "connected": true,
            "consumers": consumers.len(),
            "consumers_alive": alive,
            "lag": lag,
            "oldest_pending_ms": oldest_pending_ms,
            "dead_letters": dead_letters,
            "checks": checks,
        }));
    } else {
        out.line(&format!(
            "{} (group {group} on {})",
            out.status(status, healthy),
            bus.stream_name()
        ));
        for c in &checks {
            out.line(&format!(
                "  {} {:<12} {}",
                if c.ok { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            ));
        }
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) async fn tail(bus: &RedisEventBus, out: Out, args: &TailArgs) -> Outcome {
    let mut after = args.from.clone();
    if after == "$" {
        // Resolve `$` once, so events arriving between two reads are not missed.
        after = bus
            .try_stream_info()
            .await?
            .stream
            .last_entry_id
            .unwrap_or_else(|| "0-0".to_owned());
    }
    let mut shown = 0usize;
    let stop = tokio::signal::ctrl_c();
    tokio::pin!(stop);
    loop {
        let block = if args.no_follow { 1 } else { 1000 };
        let entries = tokio::select! {
            _ = &mut stop => return Ok(ExitCode::SUCCESS),
            read = bus.read_stream_after(&after, 100, block) => read?,
        };
        if entries.is_empty() && args.no_follow {
            return Ok(ExitCode::SUCCESS);
        }
        for entry in entries {
            after = entry.id.clone();
            let event_type = entry.get("event_type").unwrap_or("?").to_owned();
            if !args.types.is_empty() && !args.types.contains(&event_type) {
                continue;
            }
            let payload = entry
                .get_bytes("payload")
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .unwrap_or_default();
            if out.json {
                let data: serde_json::Value =
                    serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload));
                let line = json!({
                    "id": entry.id,
                    "event_type": event_type,
                    "event_id": entry.get("event_id"),
                    "aggregate_id": entry.get("aggregate_id"),
                    "occurred_at": entry.get("occurred_at"),
                    "payload": data,
                });
                out.line(&line.to_string());
            } else {
                out.line(&format!(
                    "{}  {event_type}  aggregate {}  event {}  {payload}",
                    entry.id,
                    entry.get("aggregate_id").unwrap_or("-"),
                    entry.get("event_id").unwrap_or("-")
                ));
            }
            shown += 1;
            if args.count.is_some_and(|n| shown >= n) {
                return Ok(ExitCode::SUCCESS);
            }
        }
    }
}

pub(crate) async fn recover(
    bus: &RedisEventBus,
    out: Out,
    min_idle: Duration,
    max_retries: u32,
) -> Outcome {
    let info = bus.try_stream_info().await?;
    warn_missing(bus, &info);
    let stats = bus
        .dead_letter_exhausted(RecoveryOptions {
            min_idle_time_ms: Some(u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX)),
            max_retries: Some(max_retries),
            batch_size: Some(100),
        })
        .await?;
    let left = stats.checked - stats.dlq - stats.deleted;
    if out.json {
        out.json(&json!({
            "checked": stats.checked,
            "dead_lettered": stats.dlq,
            "deleted_while_pending": stats.deleted,
            "left_for_consumers": left,
        }));
    } else {
        out.line(&format!(
            "checked {} idle entries: {} dead-lettered (attempts used up), {} found deleted, \
             {left} left for the group's consumers to retry",
            stats.checked, stats.dlq, stats.deleted
        ));
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn trim(bus: &RedisEventBus, out: Out, dry_run: bool, yes: bool) -> Outcome {
    let plan = bus.trim_plan().await?;
    if dry_run || plan.removed == 0 {
        if out.json {
            out.json(&json!({ "dry_run": dry_run, "removed": 0, "would_remove": plan.removed, "min_id": plan.min_id, "reason": plan.reason }));
        } else {
            let before = plan
                .min_id
                .as_deref()
                .map(|id| format!(" before {id}"))
                .unwrap_or_default();
            let verb = if dry_run { "would remove" } else { "removed" };
            out.line(&format!(
                "{verb} {} entries{before}{}",
                plan.removed,
                plan.reason
                    .as_deref()
                    .map(|r| format!("; the rest stays: {r}"))
                    .unwrap_or_default()
            ));
        }
        return Ok(ExitCode::SUCCESS);
    }
    confirm(
        &format!(
            "Remove {} entries of {} that every group has acknowledged?",
            plan.removed,
            bus.stream_name()
        ),
        yes,
    )?;
    let report = bus.trim_acknowledged().await?;
    if out.json {
        out.json(&report);
    } else {
        out.line(&format!(
            "removed {} entries before {}{}",
            report.removed,
            report.min_id.as_deref().unwrap_or("-"),
            report
                .reason
                .as_deref()
                .map(|r| format!("; the rest stays: {r}"))
                .unwrap_or_default()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

//! The dashboard's JSON API: a prefix's overview (through the bus's own views of the stream,
//! its groups, consumers and pending entries), its dead letters page by page, and replay or
//! purge of one of them; and the throughput samples behind the chart.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use eventsource_redis::{PurgeOutcome, ReplayOutcome};
use serde_json::{Value as Json, json};

use super::{ApiResult, Dashboard, SAMPLES, Sample, Shared, problem, redis_down};

/// Pending entries of a group by idle time (of the oldest 1,000).
const AGE_BUCKETS: [(&str, u64); 5] = [
    ("< 1 s", 1_000),
    ("1–10 s", 10_000),
    ("10–60 s", 60_000),
    ("1–10 min", 600_000),
    ("> 10 min", u64::MAX),
];

/// The overview of one prefix: the stream, each group with its consumers and pending entries
/// by age, the dead letters' count, and throughput, all read through the bus's own views.
pub(super) async fn overview(State(d): State<Shared>, Path(prefix): Path<String>) -> ApiResult {
    let bus = d.bus(&prefix)?;
    let info = bus.try_stream_info().await.map_err(redis_down)?;
    let stream = info.stream;
    let dlq = json!({ "name": bus.dlq_stream_name(), "length": info.dlq_messages });
    if stream.length == 0 && stream.last_entry_id.is_none() && info.consumer_groups.is_empty() {
        return Ok(axum::Json(json!({
            "prefix": prefix, "stream": { "name": stream.name, "exists": false },
            "groups": [], "dlq": dlq, "throughput": [],
        }))
        .into_response());
    }
    let mut groups = Vec::new();
    let mut read = BTreeMap::new();
    for g in info.consumer_groups {
        let consumers: Vec<Json> = bus
            .consumers_of(&g.name)
            .await
            .map_err(redis_down)?
            .into_iter()
            .map(|c| json!({ "name": c.name, "pending": c.pending, "idle_ms": c.idle_ms }))
            .collect();
        let mut ages = [0u64; AGE_BUCKETS.len()];
        for entry in bus
            .pending_entries_of(&g.name, 1000)
            .await
            .map_err(redis_down)?
        {
            let bucket = AGE_BUCKETS
                .iter()
                .position(|(_, below)| entry.idle_ms < *below)
                .unwrap_or(AGE_BUCKETS.len() - 1);
            ages[bucket] += 1;
        }
        if let Some(n) = g.entries_read {
            read.insert(g.name.clone(), n);
        }
        groups.push(json!({
            "name": g.name,
            "pending": g.pending,
            "lag": g.lag,
            "last_delivered_id": g.last_delivered_id,
            "consumers": consumers,
            "pending_by_age": AGE_BUCKETS.iter().zip(ages).map(|((label, _), n)| json!({ "age": label, "count": n })).collect::<Vec<_>>(),
        }));
    }
    let added = bus.entries_added().await.map_err(redis_down)?.unwrap_or(0);
    let throughput = d.sample(&prefix, added, read);
    Ok(axum::Json(json!({
        "prefix": prefix,
        "stream": {
            "name": stream.name,
            "exists": true,
            "length": stream.length,
            "first_id": stream.first_entry_id,
            "last_id": stream.last_entry_id,
            "entries_added": added,
        },
        "groups": groups,
        "dlq": dlq,
        "throughput": throughput,
    }))
    .into_response())
}

impl Dashboard {
    /// Records a sample (at most one a second) and returns the rates between samples:
    /// `[{t, published, read: {group: n}}]` in events per second.
    fn sample(&self, prefix: &str, added: u64, read: BTreeMap<String, u64>) -> Vec<Json> {
        let mut all = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let samples = all.entry(prefix.to_owned()).or_default();
        let now = Instant::now();
        if samples
            .back()
            .is_none_or(|s| now.duration_since(s.at) >= Duration::from_secs(1))
        {
            let unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            samples.push_back(Sample {
                at: now,
                unix_ms,
                added,
                read,
            });
            while samples.len() > SAMPLES {
                samples.pop_front();
            }
        }
        samples
            .iter()
            .zip(samples.iter().skip(1))
            .map(|(a, b)| {
                let secs = b.at.duration_since(a.at).as_secs_f64().max(0.001);
                let groups: serde_json::Map<String, Json> = b
                    .read
                    .iter()
                    .map(|(g, n)| {
                        let before = a.read.get(g).copied().unwrap_or(*n);
                        (
                            g.clone(),
                            json!((n.saturating_sub(before) as f64 / secs).round()),
                        )
                    })
                    .collect();
                json!({
                    "t": b.unix_ms,
                    "published": (b.added.saturating_sub(a.added) as f64 / secs).round(),
                    "read": groups,
                })
            })
            .collect()
    }
}

#[derive(serde::Deserialize)]
pub(super) struct DlqQuery {
    /// Letters after this DLQ id (exclusive); the first page without it.
    after: Option<String>,
    /// Page size (1..=200, default 50).
    count: Option<usize>,
}

pub(super) async fn dead_letters(
    State(d): State<Shared>,
    Path(prefix): Path<String>,
    Query(q): Query<DlqQuery>,
) -> ApiResult {
    let bus = d.bus(&prefix)?;
    let count = q.count.unwrap_or(50).clamp(1, 200);
    let start = match &q.after {
        Some(id) if !id.is_empty() => {
            if !id.chars().all(|c| c.is_ascii_digit() || c == '-') {
                return Err(problem(
                    StatusCode::BAD_REQUEST,
                    format!("after={id:?} is not a stream id"),
                ));
            }
            format!("({id}")
        }
        _ => "-".to_owned(),
    };
    let page = match bus.dlq_messages_range(&start, "+", count + 1).await {
        Ok(p) => p,
        Err(e) => return Err(redis_down(e)),
    };
    let more = page.len() > count;
    let letters: Vec<Json> = page
        .iter()
        .take(count)
        .map(|m| {
            json!({
                "id": m.message_id,
                "original_id": m.get("original_message_id"),
                "event_type": m.get("event_type"),
                "event_id": m.get("event_id"),
                "group": m.consumer_group(),
                "reason": m.get("error"),
                "retry_count": m.get("retry_count"),
                "dead_lettered_at": m.get("dlq_timestamp"),
            })
        })
        .collect();
    let next = more
        .then(|| page.get(count - 1).map(|m| m.message_id.clone()))
        .flatten();
    Ok(axum::Json(json!({ "letters": letters, "next_after": next })).into_response())
}

pub(super) async fn act(
    State(d): State<Shared>,
    Path((prefix, id, action)): Path<(String, String, String)>,
) -> ApiResult {
    let bus = d.bus(&prefix)?;
    if !id.chars().all(|c| c.is_ascii_digit() || c == '-') {
        return Err(problem(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a stream id"),
        ));
    }
    let outcome = match action.as_str() {
        "replay" => match bus.replay_dlq_message_scoped(&id, None).await {
            Ok(ReplayOutcome::Replayed { new_id }) => {
                json!({ "outcome": "replayed", "new_id": new_id })
            }
            Ok(ReplayOutcome::Missing) => json!({ "outcome": "missing" }),
            Ok(ReplayOutcome::OtherGroup { group }) => {
                json!({ "outcome": "other_group", "group": group })
            }
            Err(e) => return Err(redis_down(e)),
        },
        "purge" => match bus.purge_dlq_message_scoped(&id, None).await {
            Ok(PurgeOutcome::Purged) => json!({ "outcome": "purged" }),
            Ok(PurgeOutcome::Missing) => json!({ "outcome": "missing" }),
            Ok(PurgeOutcome::OtherGroup { group }) => {
                json!({ "outcome": "other_group", "group": group })
            }
            Err(e) => return Err(redis_down(e)),
        },
        other => {
            return Err(problem(
                StatusCode::NOT_FOUND,
                format!("{other:?}: the actions are replay and purge"),
            ));
        }
    };
    let status = if outcome["outcome"] == "missing" {
        StatusCode::NOT_FOUND
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(outcome)).into_response())
}

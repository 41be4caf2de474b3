//! Trimming the stream without losing anything a consumer group still needs.
//!
//! `XADD ... MAXLEN` (or `XTRIM MAXLEN`) cuts by count and silently drops entries a lagging
//! group has not read yet. [`RedisEventBus::trim_acknowledged`] instead removes only entries
//! that **every** consumer group on the stream has both received and acknowledged: it trims to
//! the lowest "floor" over the groups, where a group's floor is its oldest pending entry, or
//! the entry after its last delivered one when nothing is pending.

use redis::Value;
use serde::Serialize;

use crate::bus::RedisEventBus;
use crate::error::RedisBusError;

/// What a safe trim did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TrimReport {
    /// Entries removed.
    pub removed: u64,
    /// Entries before this id were eligible (None when nothing could be trimmed).
    pub min_id: Option<String>,
    /// Why nothing was trimmed, when nothing was.
    pub reason: Option<String>,
}

/// Parses `ms-seq`.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

impl RedisEventBus {
    /// Removes the entries every consumer group has received and acknowledged (see the module
    /// docs). A stream without any group is left alone: nobody has said what it still needs.
    /// Groups that will be created later cannot be known: trim only when every reader of the
    /// stream has its group.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn trim_acknowledged(&self) -> Result<TrimReport, RedisBusError> {
        let mut conn = self.commands().await?;
        let groups: Result<Value, redis::RedisError> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.inner.stream)
            .query_async(&mut conn)
            .await;
        let groups = match groups {
            Ok(Value::Array(list)) => list,
            Ok(_) => Vec::new(),
            Err(e) if e.to_string().contains("no such key") => Vec::new(),
            Err(e) => return Err(self.command_error("XINFO", e)),
        };
        if groups.is_empty() {
            return Ok(TrimReport {
                removed: 0,
                min_id: None,
                reason: Some("no consumer group on the stream".into()),
            });
        }
        let mut floor: Option<(u64, u64)> = None;
        for group in &groups {
            let Value::Array(flat) = group else { continue };
            let field = |name: &str| {
                flat.chunks(2)
                    .find(|kv| kv.first().and_then(text).as_deref() == Some(name))
                    .and_then(|kv| kv.get(1))
            };
            let Some(name) = field("name").and_then(text) else {
                continue;
            };
            let last = field("last-delivered-id")
                .and_then(text)
                .and_then(|id| parse_id(&id))
                .unwrap_or((0, 0));
            // Oldest pending entry of this group, if any.
            let summary: Value = redis::cmd("XPENDING")
                .arg(&self.inner.stream)
                .arg(&name)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.command_error("XPENDING", e))?;
            let oldest_pending = match &summary {
                Value::Array(parts) => parts.get(1).and_then(text).and_then(|id| parse_id(&id)),
                _ => None,
            };
            let group_floor = oldest_pending.unwrap_or((last.0, last.1.saturating_add(1)));
            floor = Some(floor.map_or(group_floor, |f| f.min(group_floor)));
        }
        let Some((ms, seq)) = floor else {
            return Ok(TrimReport {
                removed: 0,
                min_id: None,
                reason: Some("no readable consumer group".into()),
            });
        };
        let min_id = format!("{ms}-{seq}");
        let removed: u64 = redis::cmd("XTRIM")
            .arg(&self.inner.stream)
            .arg("MINID")
            .arg(&min_id)
            .query_async(&mut conn)
            .await
            .map_err(|e| self.command_error("XTRIM", e))?;
        tracing::info!(stream = %self.inner.stream, removed, %min_id, "stream trimmed to what every group has acknowledged");
        Ok(TrimReport {
            removed,
            min_id: Some(min_id),
            reason: None,
        })
    }
}

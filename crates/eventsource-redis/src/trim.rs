//! Trimming the stream without losing anything a consumer group still needs.
//!
//! `XADD ... MAXLEN` (or `XTRIM MAXLEN`) cuts by count and silently drops entries a lagging
//! group has not read yet. [`RedisEventBus::trim_acknowledged`] instead removes only entries
//! that **every** consumer group on the stream has both received and acknowledged: it trims to
//! the lowest "floor" over the groups, where a group's floor is its oldest pending entry, or
//! the entry after its last delivered one when nothing is pending.

use redis::Value;
use redis::streams::{StreamInfoGroupsReply, StreamPendingReply};
use serde::Serialize;

use crate::bus::RedisEventBus;
use crate::error::RedisBusError;

/// What a safe trim did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct TrimReport {
    /// Entries removed.
    pub removed: u64,
    /// Entries before this id were eligible (None when nothing could be trimmed).
    pub min_id: Option<String>,
    /// Why nothing (more) could be trimmed: no group on the stream, or the group whose
    /// pending or unread entries hold the rest back, with how many.
    pub reason: Option<String>,
}

/// Parses `ms-seq`.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

impl RedisEventBus {
    /// Where a safe trim would cut: `Ok(Err(reason))` when nothing may be trimmed, else the
    /// lowest floor over every group (see the module docs).
    /// The lowest floor over the groups and what holds it there (`Err`: why there is none).
    async fn trim_floor(&self) -> Result<Result<(String, String), String>, RedisBusError> {
        let mut conn = self.commands().await?;
        let groups: Result<StreamInfoGroupsReply, redis::RedisError> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&self.inner.stream)
            .query_async(&mut conn)
            .await;
        let groups = match groups {
            Ok(reply) => reply.groups,
            Err(e) if e.to_string().contains("no such key") => Vec::new(),
            Err(e) => return Err(self.command_error("XINFO GROUPS", e)),
        };
        if groups.is_empty() {
            return Ok(Err("no consumer group on the stream".into()));
        }
        // (floor, what holds it there)
        let mut floor: Option<((u64, u64), String)> = None;
        for group in &groups {
            let last = parse_id(&group.last_delivered_id).unwrap_or((0, 0));
            // Oldest pending entry of this group, if any.
            let summary: StreamPendingReply = redis::cmd("XPENDING")
                .arg(&self.inner.stream)
                .arg(&group.name)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.command_error("XPENDING", e))?;
            let (oldest_pending, pending) = match &summary {
                StreamPendingReply::Data(data) => (parse_id(&data.start_id), data.count),
                _ => (None, 0),
            };
            let unread = group
                .lag
                .map(|n| format!(", {n} not yet delivered to it"))
                .unwrap_or_default();
            let (group_floor, why) = match oldest_pending {
                Some(id) => (
                    id,
                    format!(
                        "group {} still needs them: {pending} pending, the oldest {}-{}{unread}",
                        group.name, id.0, id.1
                    ),
                ),
                None => (
                    (last.0, last.1.saturating_add(1)),
                    format!(
                        "group {} has read up to {}{unread}",
                        group.name, group.last_delivered_id
                    ),
                ),
            };
            if floor.as_ref().is_none_or(|(f, _)| group_floor < *f) {
                floor = Some((group_floor, why));
            }
        }
        Ok(match floor {
            Some(((ms, seq), why)) => Ok((format!("{ms}-{seq}"), why)),
            None => Err("no readable consumer group".into()),
        })
    }

    /// What [`trim_acknowledged`](Self::trim_acknowledged) would remove, removing nothing:
    /// `removed` counts the entries before `min_id` (counted by reading their ids).
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn trim_plan(&self) -> Result<TrimReport, RedisBusError> {
        let (min_id, held) = match self.trim_floor().await? {
            Ok(floor) => floor,
            Err(reason) => {
                return Ok(TrimReport {
                    removed: 0,
                    min_id: None,
                    reason: Some(reason),
                });
            }
        };
        let mut conn = self.commands().await?;
        let mut eligible = 0u64;
        let mut start = "-".to_owned();
        loop {
            let ids: Vec<(String, Value)> = redis::cmd("XRANGE")
                .arg(&self.inner.stream)
                .arg(&start)
                .arg(format!("({min_id}"))
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut conn)
                .await
                .map_err(|e| self.command_error("XRANGE", e))?;
            eligible += ids.len() as u64;
            match ids.last() {
                Some((id, _)) if ids.len() == 10_000 => start = format!("({id}"),
                _ => break,
            }
        }
        Ok(TrimReport {
            removed: eligible,
            min_id: Some(min_id),
            reason: Some(held),
        })
    }

    /// Removes the entries every consumer group has received and acknowledged (see the module
    /// docs). A stream without any group is left alone: nobody has said what it still needs.
    /// Groups that will be created later cannot be known: trim only when every reader of the
    /// stream has its group.
    ///
    /// # Errors
    /// [`RedisBusError`] when Redis fails.
    pub async fn trim_acknowledged(&self) -> Result<TrimReport, RedisBusError> {
        let (min_id, held) = match self.trim_floor().await? {
            Ok(floor) => floor,
            Err(reason) => {
                return Ok(TrimReport {
                    removed: 0,
                    min_id: None,
                    reason: Some(reason),
                });
            }
        };
        let mut conn = self.commands().await?;
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
            reason: Some(held),
        })
    }
}

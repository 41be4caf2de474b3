//! Holding a partition: the membership heartbeat, taking a partition (lease, handover of the
//! pending entries, its consumer and the watchdog that stops it before the lease lapses),
//! renewing, and giving it up. The ownership commands go over a connection of their own, so
//! a publish waiting for replicas (`WAIT` blocks its connection) cannot delay a renewal.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redis::Value;
use tokio_util::sync::CancellationToken;

use super::PartitionedEventBus;
use super::owner;
use super::state::lock_write_owned;
use crate::bus::lock;
use crate::conn::Commands;
use crate::error::RedisBusError;
use crate::fence::Fence;

/// A partition this consumer holds.
pub(super) struct Held {
    pub(super) value: String,
    /// Stops its consumer gracefully (the batch in hand finishes).
    pub(super) stop: CancellationToken,
    pub(super) task: tokio::task::JoinHandle<()>,
    /// When the last renewal that succeeded was sent: the lease runs at least
    /// `partition_lease` from then. The watchdog reads it.
    pub(super) renewed: Arc<std::sync::Mutex<Instant>>,
    /// Stopping: the lease is renewed until its consumer finished, then released.
    pub(super) releasing: bool,
    /// The lease was found lost (counted once).
    pub(super) lost: bool,
}

/// What one concurrent step of the ownership loop did.
pub(super) enum Step {
    Renewed(u32, Result<bool, String>),
    Released,
}

/// Cancels its token when dropped: a partition consumer's task ends it however it ends
/// (a panic included), so the watchdog stops with that run.
struct DoneGuard(CancellationToken);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl PartitionedEventBus {
    /// The connection of the ownership commands (heartbeat, take, renew, release), opened on
    /// first use.
    pub(super) async fn control(&self) -> Result<Commands, RedisBusError> {
        let first = self.partition(0);
        self.inner
            .control_conn
            .get_or_try_init(|| first.open_commands())
            .await
            .cloned()
    }

    /// Opens the ownership connection and loads the ownership scripts, bounded by the
    /// connection's own timeouts rather than a quarter of the lease: the handshake and a
    /// first `EVALSHA` (refused `NOSCRIPT`, then `SCRIPT LOAD`, then again) take several
    /// round trips, which over a slow link do not fit the per-call bound, while each
    /// ownership call after them is one round trip. The scripts are loaded again after a
    /// heartbeat fails (Redis restarted, or `SCRIPT FLUSH`).
    pub(super) async fn prepare_control(&self) -> Result<(), RedisBusError> {
        if self.inner.scripts_loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        let bound = self.inner.config.socket_connect_timeout + self.inner.config.socket_timeout * 2;
        let prepare = async {
            let mut conn = self.control().await?;
            for script in [
                &*owner::HEARTBEAT,
                &*owner::ACQUIRE,
                &*owner::RENEW,
                &*owner::RELEASE,
            ] {
                let _: String = script
                    .prepare_invoke()
                    .load_async(&mut conn)
                    .await
                    .map_err(|e| {
                        self.partition(0)
                            .command_error("SCRIPT LOAD (ownership)", e)
                    })?;
            }
            Ok::<(), RedisBusError>(())
        };
        match tokio::time::timeout(bound, prepare).await {
            Ok(Ok(())) => {
                self.inner.scripts_loaded.store(true, Ordering::Release);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RedisBusError::Command {
                command: "SCRIPT LOAD (ownership)",
                source: redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "no reply",
                    format!("within {bound:?}"),
                )),
            }),
        }
    }

    pub(super) fn count_lost(&self) {
        self.inner
            .control
            .counters
            .lost
            .fetch_add(1, Ordering::Relaxed);
        self.inner.control.metrics.lost();
    }

    /// Writes this member's heartbeat (or removes it) and returns the live members.
    pub(super) async fn heartbeat(&self, leaving: bool) -> Result<Vec<String>, RedisBusError> {
        let mut conn = self.control().await?;
        owner::HEARTBEAT
            .key(&self.inner.members_key)
            .arg(&self.inner.member)
            .arg(crate::config::millis(self.inner.config.partition_lease))
            .arg(if leaving { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
            .map_err(|e| {
                self.partition(0)
                    .command_error("EVALSHA (partition heartbeat)", e)
            })
    }

    pub(super) async fn renew(&self, i: u32, value: &str) -> Result<bool, RedisBusError> {
        let mut conn = self.control().await?;
        let renewed: i64 = owner::RENEW
            .key(self.owner_key(i))
            .arg(value)
            .arg(crate::config::millis(self.inner.config.partition_lease))
            .invoke_async(&mut conn)
            .await
            .map_err(|e| {
                self.partition(i)
                    .command_error("EVALSHA (renew partition lease)", e)
            })?;
        Ok(renewed == 1)
    }

    /// Tries to take partition `i`: the lease, then the previous owner's pending entries,
    /// then its consumer (which stops when `stop` is cancelled) and its watchdog. Each Redis
    /// step is bounded by `limit`. When the pending entries cannot be claimed the lease is
    /// given back — consuming new entries before them would break the aggregates' order —
    /// and the next round tries again.
    pub(super) async fn take(
        &self,
        i: u32,
        limit: Duration,
        stop: CancellationToken,
    ) -> Result<Option<Held>, String> {
        let part = self.partition(i);
        let acquire = async {
            let mut conn = self.control().await?;
            owner::ACQUIRE
                .key(self.owner_key(i))
                .key(self.fence_key(i))
                .arg(&self.inner.member)
                .arg(crate::config::millis(self.inner.config.partition_lease))
                .invoke_async::<Vec<Value>>(&mut conn)
                .await
                .map_err(|e| part.command_error("EVALSHA (take partition)", e))
        };
        let reply = match tokio::time::timeout(limit, acquire).await {
            Ok(r) => r.map_err(|e| e.to_string())?,
            // It may have been taken: then it lapses after partition_lease.
            Err(_) => return Err(format!("no reply within {limit:?}")),
        };
        let value = match (
            reply.first(),
            reply.get(1).cloned().and_then(crate::codec::into_text),
        ) {
            (Some(Value::Int(1)), Some(value)) => value,
            _ => return Ok(None),
        };
        let handed_over = match tokio::time::timeout(limit, self.claim_all_pending(i)).await {
            Ok(Ok(n)) => n,
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no reply within {limit:?}"),
                };
                self.let_go(i, &value, limit).await;
                return Err(format!(
                    "claiming the previous owner's pending entries: {why}"
                ));
            }
        };
        // The lease is renewed before the partition is used: the watchdog counts from this
        // renewal, not from the ACQUIRE (with a slow Redis, the ACQUIRE and the claim can
        // take most of the watchdog's three quarters of the lease before the ownership loop
        // collects the take and renews it, and the partition would be dropped at once).
        let renew_sent = Instant::now();
        match tokio::time::timeout(limit, self.renew(i, &value)).await {
            Ok(Ok(true)) => {}
            failed => {
                let why = match failed {
                    Ok(Ok(_)) => "the lease was gone".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => format!("no reply within {limit:?}"),
                };
                self.let_go(i, &value, limit).await;
                return Err(format!("renewing the lease just taken: {why}"));
            }
        }
        // From here acknowledgements in this partition check the lease.
        *part.inner.fence.write().unwrap_or_else(|p| p.into_inner()) = Some(Fence {
            key: self.owner_key(i),
            value: value.clone(),
            token: crate::FencingToken {
                partition: i,
                token: value
                    .rsplit_once(':')
                    .and_then(|(_, t)| t.parse().ok())
                    .unwrap_or_default(),
            },
        });
        let c = &self.inner.control.counters;
        c.taken.fetch_add(1, Ordering::Relaxed);
        c.handed_over.fetch_add(handed_over, Ordering::Relaxed);
        tracing::info!(partition = i, lease = %value, handed_over, "took partition");
        let owned = {
            let mut owned = lock_write_owned(&self.inner.control.owned);
            owned.insert(i, value.clone());
            owned.len()
        };
        self.inner.control.metrics.taken();
        self.inner.control.metrics.owned(owned);
        let renewed = Arc::new(std::sync::Mutex::new(renew_sent));
        let done = CancellationToken::new();
        let task = {
            let (part, stop, done) = (part.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let _done = DoneGuard(done);
                if let Err(e) = part.consume_until(stop.cancelled()).await {
                    tracing::error!(partition = i, error = %e, "partition consumer ended");
                }
            })
        };
        tokio::spawn(
            self.clone()
                .watchdog(i, renewed.clone(), stop.clone(), done),
        );
        Ok(Some(Held {
            value,
            stop,
            task,
            renewed,
            releasing: false,
            lost: false,
        }))
    }

    /// Until partition `i`'s consumer ends: when its lease was last renewed three quarters
    /// of `partition_lease` ago, stops the consumer and abandons its running handlers, so
    /// they are not running when the lease lapses and another member takes the partition.
    async fn watchdog(
        self,
        i: u32,
        renewed: Arc<std::sync::Mutex<Instant>>,
        stop: CancellationToken,
        done: CancellationToken,
    ) {
        let margin = self.inner.config.partition_lease * 3 / 4;
        loop {
            let deadline = *lock(&renewed) + margin;
            tokio::select! {
                biased;
                () = done.cancelled() => return,
                () = tokio::time::sleep_until(deadline.into()) => {}
            }
            if lock(&renewed).elapsed() >= margin {
                tracing::warn!(
                    partition = i,
                    "partition lease not renewed in time; stopping the partition and \
                     abandoning its handlers before the lease lapses"
                );
                self.count_lost();
                stop.cancel();
                self.partition(i).abandon_handlers();
                return;
            }
        }
    }

    /// Claims every pending entry of partition `i`'s group for this consumer (`XAUTOCLAIM`
    /// with no idle minimum, `JUSTID` so delivery counts stay the number of handler starts).
    /// Returns how many were claimed.
    async fn claim_all_pending(&self, i: u32) -> Result<u64, RedisBusError> {
        let part = self.partition(i);
        let mut conn = part.commands().await?;
        let mut cursor = "0-0".to_owned();
        let mut claimed = 0u64;
        loop {
            let reply: Vec<Value> = redis::cmd("XAUTOCLAIM")
                .arg(part.stream_name())
                .arg(&self.inner.config.consumer_group)
                .arg(&self.inner.member)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(1000)
                .arg("JUSTID")
                .query_async(&mut conn)
                .await
                .map_err(|e| part.command_error("XAUTOCLAIM (hand over a partition)", e))?;
            let mut parts = reply.into_iter();
            cursor = parts
                .next()
                .and_then(crate::codec::into_text)
                .unwrap_or_else(|| "0-0".to_owned());
            if let Some(Value::Array(ids)) = parts.next() {
                claimed += ids.len() as u64;
            }
            if cursor == "0-0" {
                return Ok(claimed);
            }
        }
    }

    /// Partition `i`'s consumer has finished: drop the fence and give the lease up (bounded
    /// by `limit`; a release that does not arrive lets the lease lapse).
    pub(super) async fn let_go(&self, i: u32, value: &str, limit: Duration) {
        let part = self.partition(i);
        *part.inner.fence.write().unwrap_or_else(|p| p.into_inner()) = None;
        let owned = {
            let mut owned = lock_write_owned(&self.inner.control.owned);
            owned.remove(&i);
            owned.len()
        };
        self.inner.control.metrics.owned(owned);
        let release = async {
            let mut conn = self.control().await?;
            owner::RELEASE
                .key(self.owner_key(i))
                .arg(value)
                .invoke_async::<i64>(&mut conn)
                .await
                .map_err(|e| part.command_error("EVALSHA (release partition)", e))
        };
        match tokio::time::timeout(limit, release).await {
            Ok(Ok(1)) => {
                self.inner
                    .control
                    .counters
                    .released
                    .fetch_add(1, Ordering::Relaxed);
                self.inner.control.metrics.released();
                tracing::info!(partition = i, "released partition");
            }
            Ok(Ok(_)) => {
                tracing::info!(partition = i, "partition was no longer ours to release");
            }
            Ok(Err(e)) => {
                tracing::warn!(partition = i, error = %e, "releasing a partition failed; it lapses after partition_lease");
            }
            Err(_) => {
                tracing::warn!(
                    partition = i,
                    "releasing a partition got no reply in time; it lapses after partition_lease"
                );
            }
        }
    }
}

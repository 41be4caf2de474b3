//! One active instance per subscription name: a session-level advisory lock held on a
//! connection of its own.
//!
//! Every instance of a subscription (replicas of a service, old and new versions during a
//! rolling deploy) tries to take the lock keyed by the checkpoint table and the name; the one
//! that holds it reads and handles pages, the others stand by and try again every
//! `takeover_poll`. The lock is the session's, so it goes when the holder's connection goes:
//! a holder that stops releases it at once, one killed (`kill -9`) loses it as soon as the
//! server sees its socket close, and one cut off from the database loses it when the server
//! ends its session after `leader_timeout` without a word (`idle_session_timeout` on the lock
//! connection; the holder pings every `takeover_poll`). The lock alone is not trusted for
//! correctness: every checkpoint write is a compare-and-set on the position the instance
//! started from (see `checkpoint`), so an instance that lost the lock without noticing cannot
//! commit a page its successor handles.

use std::time::Duration;

use sqlx::Connection;
use sqlx::postgres::PgConnection;
use tokio_util::sync::CancellationToken;

use crate::store::PostgresEventStore;

/// The lock of one subscription name, taken on a connection of its own.
pub(super) struct Leadership {
    /// Cancelled when the lock is (or may be) lost: the lock connection failed or did not
    /// answer a ping within the leader timeout.
    pub(super) lost: CancellationToken,
    /// Cancelled to give the lock up (the watchdog unlocks and closes the connection).
    release: CancellationToken,
    watchdog: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// Gives the lock up and waits until it is released (bounded by the leader timeout).
    pub(super) async fn release(mut self) {
        self.release.cancel();
        let _ = (&mut self.watchdog).await;
    }
}

/// Dropped without `release` (the subscription's task aborted: `run_until`'s future dropped,
/// or a handler panicked): the watchdog gives the lock up by itself (or, if the runtime is
/// going away with it, its connection closes and the server releases the lock).
impl Drop for Leadership {
    fn drop(&mut self) {
        self.release.cancel();
    }
}

/// The advisory lock key of subscription `name` on `store` (stable across processes).
pub(super) fn lock_key(store: &PostgresEventStore, name: &str) -> i64 {
    crate::schema::stable_key(&format!(
        "eventsource subscription {}/{name}",
        store.names().checkpoints
    ))
}

/// A standing-by instance's connection, on which it tries to take the lock.
pub(super) struct Candidate {
    conn: PgConnection,
    key: i64,
    timeout: Duration,
    poll: Duration,
}

impl Candidate {
    /// Opens the lock connection. The server ends the session after `timeout` without a
    /// request (PostgreSQL 14 and later), which releases the lock of a holder that was cut off.
    pub(super) async fn connect(
        store: &PostgresEventStore,
        name: &str,
        poll: Duration,
        timeout: Duration,
    ) -> Result<Self, sqlx::Error> {
        let mut conn = PgConnection::connect_with(&store.pool().connect_options()).await?;
        let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
        if let Err(e) = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET idle_session_timeout = {millis}"
        )))
        .execute(&mut conn)
        .await
        {
            tracing::warn!(subscription = %name, error = %e,
                "idle_session_timeout not set on the lock connection (PostgreSQL before 14?): \
                 a holder cut off from the database keeps its lock until TCP gives its \
                 connection up");
        }
        Ok(Self {
            conn,
            key: lock_key(store, name),
            timeout,
            poll,
        })
    }

    /// Tries once to take the lock. `Err`: the connection failed (open a new one).
    pub(super) async fn try_take(mut self) -> Result<Result<Leadership, Self>, sqlx::Error> {
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(self.key)
            .fetch_one(&mut self.conn)
            .await?;
        if !taken {
            return Ok(Err(self));
        }
        let lost = CancellationToken::new();
        let release = CancellationToken::new();
        let watchdog = tokio::spawn(watch(self, lost.clone(), release.clone()));
        Ok(Ok(Leadership {
            lost,
            release,
            watchdog,
        }))
    }
}

/// Keeps the lock connection alive and checked while the lock is held: pings every `poll`; a
/// ping that fails or takes longer than the leader timeout means the lock may be gone. On
/// release, unlocks and closes the connection.
async fn watch(mut held: Candidate, lost: CancellationToken, release: CancellationToken) {
    loop {
        tokio::select! {
            () = release.cancelled() => break,
            () = tokio::time::sleep(held.poll) => {}
        }
        // Half the server's idle timeout: the holder gives up (and stops between pages)
        // before the server would end its session and let a standby in.
        let ping = tokio::time::timeout(
            held.timeout / 2,
            sqlx::query("SELECT 1").execute(&mut held.conn),
        );
        match ping.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the subscription's lock connection failed: standing by");
                lost.cancel();
                return;
            }
            Err(_) => {
                tracing::warn!(timeout = ?held.timeout,
                    "the subscription's lock connection did not answer: standing by");
                lost.cancel();
                return;
            }
        }
    }
    // A stopping holder releases at once so that a standby takes over within one poll.
    let unlock = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(held.key)
        .execute(&mut held.conn);
    let _ = tokio::time::timeout(held.timeout, unlock).await;
    let _ = tokio::time::timeout(held.timeout, held.conn.close()).await;
}

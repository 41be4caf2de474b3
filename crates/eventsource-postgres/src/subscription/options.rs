//! How a subscription reads, retries, backs off and hands over, and the checks of those
//! options.

use std::time::Duration;

use crate::store::FeedFilter;

use super::StartFrom;

/// How a subscription reads, retries and backs off.
#[derive(Debug, Clone)]
pub struct SubscriptionOptions {
    /// Where to start when no checkpoint is stored. Default [`StartFrom::Beginning`].
    pub start: StartFrom,
    /// Events per page (per handler call, per checkpoint). Default 500.
    pub page_size: usize,
    /// Only these events (event types, tenant, aggregate type). Default: all.
    pub filter: FeedFilter,
    /// First retry delay after a failed page; doubles per failure. Default 100 ms.
    pub retry_min: Duration,
    /// Longest retry delay. Default 10 s.
    pub retry_max: Duration,
    /// Failures in a row that open the circuit breaker (the subscription then waits
    /// `breaker_cooldown` before trying again, and reports it). Default 5.
    pub breaker_threshold: u32,
    /// How long the breaker stays open. Default 30 s.
    pub breaker_cooldown: Duration,
    /// Longest wait for new events when no notification arrives. Default 1 s.
    pub poll_interval: Duration,
    /// For projectors (at-least-once): how often the checkpoint is written while catching up,
    /// as Kafka consumers commit offsets at an interval. It is also written whenever the
    /// subscription has caught up, before it pauses, and when it stops; after a crash, up to
    /// this much of the catch-up is delivered again. `Duration::ZERO`: after every page.
    /// Read models ignore it (their checkpoint is in every page's transaction). Default 1 s.
    pub checkpoint_interval: Duration,
    /// How often a standing-by instance tries to take over, and how often the active one
    /// checks its lock connection. A stopped or killed active instance is replaced within
    /// about this long. Default 1 s.
    pub takeover_poll: Duration,
    /// How long the database waits for word from the active instance before it ends that
    /// instance's lock session (so that a standby takes over after a network partition or a
    /// frozen host), and how long the active instance waits for its lock connection to answer
    /// before it stands by. Must exceed `takeover_poll` (3× or more keeps a loaded host from
    /// handing over by mistake). Default 10 s.
    pub leader_timeout: Duration,
}

impl SubscriptionOptions {
    /// Checks every option; `Err` names the field and what is wrong.
    pub(super) fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("SubscriptionOptions.retry_min", self.retry_min),
            ("SubscriptionOptions.poll_interval", self.poll_interval),
            ("SubscriptionOptions.takeover_poll", self.takeover_poll),
            ("SubscriptionOptions.leader_timeout", self.leader_timeout),
        ];
        for (field, value) in positive {
            if value.is_zero() {
                return Err((field, "must be greater than zero".into()));
            }
        }
        if self.page_size == 0 {
            return Err(("SubscriptionOptions.page_size", "must be at least 1".into()));
        }
        if self.retry_max < self.retry_min {
            return Err((
                "SubscriptionOptions.retry_max",
                format!(
                    "{:?} is below retry_min ({:?})",
                    self.retry_max, self.retry_min
                ),
            ));
        }
        if self.breaker_threshold == 0 {
            return Err((
                "SubscriptionOptions.breaker_threshold",
                "must be at least 1".into(),
            ));
        }
        if self.leader_timeout <= self.takeover_poll {
            return Err((
                "SubscriptionOptions.leader_timeout",
                format!(
                    "{:?} must exceed takeover_poll ({:?}): the active instance pings its lock \
                     connection every takeover_poll, and the database ends a session silent \
                     for leader_timeout",
                    self.leader_timeout, self.takeover_poll
                ),
            ));
        }
        Ok(())
    }
}

impl Default for SubscriptionOptions {
    fn default() -> Self {
        Self {
            start: StartFrom::Beginning,
            page_size: 500,
            filter: FeedFilter::default(),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            checkpoint_interval: Duration::from_secs(1),
            takeover_poll: Duration::from_secs(1),
            leader_timeout: Duration::from_secs(10),
        }
    }
}

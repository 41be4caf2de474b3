//! Running a bus as a service: consume (with built-in recovery) until a shutdown signal, then
//! stop gracefully — the tutorial's "Graceful Shutdown".

use std::future::Future;

use crate::bus::RedisEventBus;
use crate::error::RedisBusError;

/// Runs a bus until shutdown: connects, consumes (pending recovery runs inside the consumer
/// every `recovery_interval`), and on shutdown finishes and acknowledges the in-flight
/// batch, then disconnects.
///
/// ```no_run
/// # use eventsource_redis::{RedisEventBus, RedisEventBusConfig, RedisEventBusService};
/// # async fn run(bus: RedisEventBus) -> Result<(), eventsource_redis::RedisBusError> {
/// RedisEventBusService::new(bus).run_until_signal().await
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RedisEventBusService {
    bus: RedisEventBus,
}

impl RedisEventBusService {
    /// A service for `bus` (subscribe handlers before running it).
    pub fn new(bus: RedisEventBus) -> Self {
        Self { bus }
    }

    /// The bus.
    pub fn bus(&self) -> &RedisEventBus {
        &self.bus
    }

    /// Runs until `shutdown` completes, then stops gracefully (running handlers finish and
    /// are acknowledged; entries not started go back to the group). A `shutdown` that has
    /// already completed stops it at once.
    ///
    /// A Redis that is not there yet (refused, timed out, still loading its data after a
    /// restart) or refuses writes for now (`OOM`, `MISCONF`: full memory or disk) does not stop
    /// the service: it logs it and consumes as soon as Redis answers and accepts writes,
    /// retrying with backoff (its health and `/readyz` say unready meanwhile), as a service
    /// started before its Redis — or restarted during a Redis restart — should.
    ///
    /// # Errors
    /// Problems an operator must fix, at start: [`RedisBusError::Authentication`],
    /// [`RedisBusError::NoPermission`], an invalid configuration;
    /// [`RedisBusError::AlreadyConsuming`] if the bus is consuming elsewhere — that consumer
    /// keeps running and the bus stays connected.
    pub async fn run_until(&self, shutdown: impl Future<Output = ()>) -> Result<(), RedisBusError> {
        if self.bus.is_consuming() {
            return Err(RedisBusError::AlreadyConsuming);
        }
        match self.bus.connect().await {
            Ok(()) => {}
            Err(e) if e.is_transient() => tracing::warn!(
                error = %crate::codec::error_chain(&e),
                "Redis is not reachable yet; consuming starts when it answers (retrying with \
                 backoff; check that Redis runs at the configured redis_url)"
            ),
            // A full disk or memory: the running consumer waits these out too (unhealthy).
            Err(e) if crate::error::bus_error_is_refusal(&e) => tracing::error!(
                error = %crate::codec::error_chain(&e),
                "Redis refuses writes; consuming starts when it accepts them again"
            ),
            Err(e) => return Err(e),
        }
        let result = self
            .bus
            .consume_until(async {
                shutdown.await;
                tracing::info!("shutting down: finishing the running handlers");
            })
            .await;
        if matches!(result, Err(RedisBusError::AlreadyConsuming)) {
            return result;
        }
        self.bus.disconnect().await;
        tracing::info!("shutdown complete");
        result
    }

    /// Runs until SIGTERM or SIGINT (Ctrl-C), then stops gracefully.
    ///
    /// # Errors
    /// As [`run_until`](Self::run_until).
    pub async fn run_until_signal(&self) -> Result<(), RedisBusError> {
        self.run_until(shutdown_signal()).await
    }
}

/// Completes on SIGTERM or SIGINT (on non-Unix: Ctrl-C).
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

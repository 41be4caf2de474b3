//! The HTTP surface of a service (feature `http`): `/metrics` in the Prometheus text format,
//! `/healthz` (the process answers) and `/readyz` (what the service depends on works), on a
//! small axum listener started with one call and stopped with the service.
//!
//! ```no_run
//! use eventsource_redis::http::{HttpSurface, Readiness};
//! # async fn demo(bus: eventsource_redis::RedisEventBus) -> std::io::Result<()> {
//! eventsource_redis::http::install_prometheus_recorder();
//! let surface = HttpSurface::start("0.0.0.0:9464", Readiness::new().consumer(bus)).await?;
//! // ... run the service ...
//! surface.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! `/readyz` answers `200 ready` when every check passes and `503` with one line per failing
//! check otherwise: a consumer must be connected, consuming, not paused by the decode-failure
//! policy and not stuck on a problem an operator must fix (its [`health_check`]); a publisher
//! must answer `PING`; custom checks ([`Readiness::check`]) say what they need. Each check has
//! [`Readiness::timeout`] (default 2 s) to answer.
//!
//! [`health_check`]: crate::RedisEventBus::health_check

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::RedisEventBus;

/// A readiness check: `Ok` when ready, else why not.
pub type Check =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs a Prometheus recorder as the process's `metrics` recorder (once; later calls
/// return the same handle), with bucketed histograms for handler durations and batch sizes and
/// a background thread that folds recorded samples in every 5 s. `None` when another recorder was installed first: `/metrics`
/// then says so, and that recorder's own exporter is the place to look.
pub fn install_prometheus_recorder() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| {
            // Histograms with buckets (aggregatable across instances), not summaries.
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("eventsource_handler_duration_seconds".into()),
                    &[
                        0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                        2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("eventsource_batch_size".into()),
                        &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0],
                    )
                });
            match builder.map(PrometheusBuilder::install_recorder) {
                Ok(Ok(handle)) => {
                    // Histogram samples wait in the recorder until upkeep folds them in; without
                    // a scrape they would pile up, so a small thread does it every 5 s.
                    let upkeep = handle.clone();
                    let _ = std::thread::Builder::new()
                        .name("prometheus-upkeep".into())
                        .spawn(move || {
                            loop {
                                std::thread::sleep(Duration::from_secs(5));
                                upkeep.run_upkeep();
                            }
                        });
                    Some(handle)
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "Prometheus recorder not installed; /metrics is empty");
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Prometheus recorder not built; /metrics is empty");
                    None
                }
            }
        })
        .clone()
}

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    checks: Vec<(String, Check)>,
    timeout: Duration,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readiness")
            .field(
                "checks",
                &self.checks.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

/// A consumer is ready when healthy; otherwise the status and the reason.
fn ready_if_healthy(health: crate::Health) -> Result<(), String> {
    if health.status == crate::HealthStatus::Healthy {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            health.status,
            health.error.unwrap_or_else(|| "not consuming".into())
        ))
    }
}

impl Readiness {
    /// No checks yet (always ready).
    pub fn new() -> Self {
        Self {
            checks: Vec::new(),
            timeout: Duration::from_secs(2),
        }
    }

    /// How long each check may take before it counts as failed. Default 2 s.
    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// A consuming bus: ready when its [`health_check`](RedisEventBus::health_check) is
    /// `healthy` (connected, consuming, not paused, no problem an operator must fix).
    #[must_use]
    pub fn consumer(self, bus: RedisEventBus) -> Self {
        let name = format!("consumer {}", bus.stream_name());
        self.check(name, move || {
            let bus = bus.clone();
            async move { ready_if_healthy(bus.health_check().await) }
        })
    }

    /// A partitioned consumer: ready when its
    /// [`health_check`](crate::PartitionedEventBus::health_check) says healthy.
    #[must_use]
    pub fn partitioned_consumer(self, bus: crate::PartitionedEventBus) -> Self {
        let name = format!(
            "consumer {} ({} partitions)",
            bus.config().stream_prefix,
            bus.partition_count()
        );
        self.check(name, move || {
            let bus = bus.clone();
            async move { ready_if_healthy(bus.health_check().await) }
        })
    }

    /// A publishing bus: ready when Redis answers `PING`.
    #[must_use]
    pub fn publisher(self, bus: RedisEventBus) -> Self {
        let name = format!("publisher {}", bus.stream_name());
        self.check(name, move || {
            let bus = bus.clone();
            async move { bus.connect().await.map_err(|e| e.to_string()) }
        })
    }

    /// A check of the application's own (a database, another service).
    #[must_use]
    pub fn check<F, Fut>(mut self, name: impl Into<String>, check: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.checks
            .push((name.into(), Arc::new(move || Box::pin(check()))));
        self
    }

    /// Runs every check (concurrently); the failures, each as `name: why`, in the order the
    /// checks were added.
    pub async fn failures(&self) -> Vec<String> {
        let mut running = tokio::task::JoinSet::new();
        for (i, (name, check)) in self.checks.iter().enumerate() {
            let (name, run, timeout) = (name.clone(), check(), self.timeout);
            running.spawn(async move {
                let failure = match tokio::time::timeout(timeout, run).await {
                    Ok(Ok(())) => None,
                    Ok(Err(why)) => Some(format!("{name}: {why}")),
                    Err(_) => Some(format!(
                        "{name}: no answer within {} ms",
                        timeout.as_millis()
                    )),
                };
                (i, failure)
            });
        }
        let mut failures = Vec::new();
        while let Some(done) = running.join_next().await {
            match done {
                Ok((i, Some(failure))) => failures.push((i, failure)),
                Ok((_, None)) => {}
                Err(e) => failures.push((usize::MAX, format!("a check panicked: {e}"))),
            }
        }
        failures.sort_by_key(|(i, _)| *i);
        failures.into_iter().map(|(_, f)| f).collect()
    }
}

#[derive(Clone)]
struct AppState {
    readiness: Readiness,
}

/// A running HTTP surface; stops on [`shutdown`](Self::shutdown) or when dropped.
#[derive(Debug)]
pub struct HttpSurface {
    addr: SocketAddr,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl HttpSurface {
    /// Listens on `addr` (port 0: any free port, see [`local_addr`](Self::local_addr)) and
    /// serves `/metrics`, `/healthz` and `/readyz` on a task of the current runtime.
    ///
    /// # Errors
    /// The listener cannot bind (the address is in use, or not this machine's).
    pub async fn start(
        addr: impl tokio::net::ToSocketAddrs,
        readiness: Readiness,
    ) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let app = Router::new()
            .route("/metrics", get(metrics))
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .with_state(AppState { readiness });
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP surface stopped");
            }
        });
        tracing::info!(%addr, "HTTP surface: /metrics /healthz /readyz");
        Ok(Self {
            addr,
            stop,
            task: Some(task),
        })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and waits for requests in progress.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for HttpSurface {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn metrics() -> impl IntoResponse {
    match PROMETHEUS.get().cloned().flatten() {
        Some(handle) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            "no Prometheus recorder installed: call eventsource_redis::http::install_prometheus_recorder() at startup\n".to_owned(),
        ),
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let failures = state.readiness.failures().await;
    if failures.is_empty() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready\n{}\n", failures.join("\n")),
        )
    }
}

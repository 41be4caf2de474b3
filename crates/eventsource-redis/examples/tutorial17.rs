//! Tutorial 17: Redis Event Bus — the complete example in Rust.
//!
//! Demonstrates publishing, consuming, consumer groups, monitoring and projections, printing
//! the tutorial's expected output (UUIDs aside). Each demo starts from fresh streams
//! (`demo1:stream` ... `demo4:stream`) and leaves them in Redis for inspection.
//!
//! Run: `cargo run -p eventsource-redis --example tutorial17`
//! (Redis on localhost:6379, or set `EVENTSOURCE_REDIS_URL`; with neither, a temporary
//! `redis-server` is started for the run when the binary is installed. `EVENTSOURCE_DEMO_PREFIX`
//! replaces the `demo` of the stream prefixes.)

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use eventsource_core::prelude::*;
use eventsource_core::{AggregateError, domain_event};
use eventsource_redis::{RedisBusError, RedisEventBus, RedisEventBusConfig};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

type Error = Box<dyn std::error::Error + Send + Sync>;

// =============================================================================
// Events
// =============================================================================

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderCreated {
    customer_id: String,
    total_amount: f64,
}
domain_event!(OrderCreated, "OrderCreated", aggregate = "Order");

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderShipped {
    tracking_number: String,
}
domain_event!(OrderShipped, "OrderShipped", aggregate = "Order");

// =============================================================================
// Aggregate
// =============================================================================

#[allow(dead_code)] // The tutorial defines it; the bus demos do not need it.
#[derive(Debug, Clone, Default)]
struct OrderState {
    customer_id: Option<String>,
    total_amount: f64,
    status: &'static str,
    tracking_number: Option<String>,
}

#[allow(dead_code)] // The tutorial defines it; the bus demos do not need it.
struct OrderAggregate {
    core: AggregateCore,
    state: OrderState,
}

#[allow(dead_code)]
impl OrderAggregate {
    fn create(&mut self, customer_id: &str, total_amount: f64) -> Result<(), AggregateError> {
        if self.version() > 0 {
            return Err(AggregateError::rule("Order already exists"));
        }
        self.raise(OrderCreated {
            customer_id: customer_id.into(),
            total_amount,
        })?;
        Ok(())
    }

    fn ship(&mut self, tracking_number: &str) -> Result<(), AggregateError> {
        if self.state.status != "created" {
            return Err(AggregateError::rule("Cannot ship order in current state"));
        }
        self.raise(OrderShipped {
            tracking_number: tracking_number.into(),
        })?;
        Ok(())
    }
}

impl Aggregate for OrderAggregate {
    const AGGREGATE_TYPE: &'static str = "Order";

    fn new(id: Uuid) -> Self {
        Self {
            core: AggregateCore::new(id),
            state: OrderState {
                status: "draft",
                ..OrderState::default()
            },
        }
    }
    fn core(&self) -> &AggregateCore {
        &self.core
    }
    fn core_mut(&mut self) -> &mut AggregateCore {
        &mut self.core
    }
    fn apply(&mut self, event: &EventEnvelope) -> Result<(), AggregateError> {
        if let Some(e) = event.data::<OrderCreated>()? {
            self.state = OrderState {
                customer_id: Some(e.customer_id.clone()),
                total_amount: e.total_amount,
                status: "created",
                tracking_number: None,
            };
        } else if let Some(e) = event.data::<OrderShipped>()? {
            self.state.status = "shipped";
            self.state.tracking_number = Some(e.tracking_number.clone());
        }
        Ok(())
    }
}

// =============================================================================
// Projections
// =============================================================================

/// Maintains order statistics.
#[derive(Default)]
struct OrderStatistics {
    total_orders: u64,
    total_revenue: f64,
    shipped_count: u64,
}

#[derive(Clone, Default)]
struct OrderStatisticsProjection(Arc<Mutex<OrderStatistics>>);

impl Projection for OrderStatisticsProjection {
    fn event_types(&self) -> Vec<String> {
        vec![
            OrderCreated::EVENT_TYPE.into(),
            OrderShipped::EVENT_TYPE.into(),
        ]
    }

    async fn handle(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        let mut stats = self.0.lock().expect("not poisoned");
        if let Some(e) = event.data::<OrderCreated>()? {
            stats.total_orders += 1;
            stats.total_revenue += e.total_amount;
            println!("  [Stats] Order created: ${:.2}", e.total_amount);
        } else if let Some(e) = event.data::<OrderShipped>()? {
            stats.shipped_count += 1;
            println!("  [Stats] Order shipped: {}", e.tracking_number);
        }
        Ok(())
    }
}

/// Logs all events for audit trail.
#[derive(Clone, Default)]
struct AuditLogger {
    log: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Handler<EventEnvelope> for AuditLogger {
    async fn handle(&self, event: EventEnvelope) -> Result<(), HandlerError> {
        self.log
            .lock()
            .expect("not poisoned")
            .push(serde_json::json!({
                "event_type": event.event_type(),
                "aggregate_id": event.aggregate_id().to_string(),
                "timestamp": event.metadata().occurred_at_offset(),
            }));
        Ok(())
    }
}

// =============================================================================
// Helpers
// =============================================================================

/// The Redis the demos use: `EVENTSOURCE_REDIS_URL`, localhost:6379, or the temporary server
/// `main` started.
static REDIS_URL: OnceLock<String> = OnceLock::new();

fn redis_url() -> String {
    REDIS_URL
        .get()
        .cloned()
        .or_else(|| std::env::var("EVENTSOURCE_REDIS_URL").ok())
        .unwrap_or_else(|| "redis://localhost:6379".into())
}

/// With no `EVENTSOURCE_REDIS_URL` and nothing answering on localhost:6379, starts a
/// temporary `redis-server` (no persistence) on a free port, if the binary is installed.
fn temporary_redis() -> Option<std::process::Child> {
    if std::env::var("EVENTSOURCE_REDIS_URL").is_ok() {
        return None;
    }
    let answers = |url: &str| {
        redis::Client::open(url)
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(1)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c))
            .is_ok()
    };
    if answers("redis://localhost:6379") {
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .ok()?
        .port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let url = format!("redis://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !answers(&url) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "(No Redis on localhost:6379: started a temporary redis-server on port {port} for this \
         run; it stops at the end, and its streams with it.)"
    );
    let _ = REDIS_URL.set(url);
    Some(child)
}

/// The stream prefix of demo `n`: `demo{n}`, or `{EVENTSOURCE_DEMO_PREFIX}{n}`.
fn prefix(n: u8) -> String {
    format!(
        "{}{n}",
        std::env::var("EVENTSOURCE_DEMO_PREFIX").unwrap_or_else(|_| "demo".into())
    )
}

fn registry() -> Result<EventRegistry, Error> {
    let registry = EventRegistry::new();
    registry.register::<OrderCreated>()?;
    registry.register::<OrderShipped>()?;
    Ok(registry)
}

/// Deletes a demo's streams so every run starts fresh (they stay afterwards for inspection).
async fn fresh_streams(config: &RedisEventBusConfig) -> Result<(), Error> {
    let client = redis::Client::open(config.redis_url.as_str())?;
    let mut conn = client
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(Some(config.socket_timeout)),
        )
        .await
        .map_err(|e| format!("cannot connect to Redis at {}: {e}", config.redis_url))?;
    redis::cmd("DEL")
        .arg(config.stream_name())
        .arg(config.dlq_stream_name())
        .query_async::<()>(&mut conn)
        .await?;
    Ok(())
}

/// Runs `bus.start_consuming()` until `done()` holds (or `timeout`), then stops it
/// gracefully and waits for it — the tutorial's sleep / stop_consuming / wait_for.
async fn consume_until(
    buses: &[&RedisEventBus],
    timeout: Duration,
    done: impl Fn() -> bool,
) -> Result<(), Error> {
    let tasks: Vec<_> = buses
        .iter()
        .map(|bus| {
            let bus = (*bus).clone();
            tokio::spawn(async move { bus.start_consuming().await })
        })
        .collect();
    let deadline = Instant::now() + timeout;
    while !done() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for bus in buses {
        bus.stop_consuming();
    }
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(2), task).await???;
    }
    Ok(())
}

fn banner(title: &str) {
    println!("\n{}", "=".repeat(60));
    println!("{title}");
    println!("{}", "=".repeat(60));
}

// =============================================================================
// Demo Functions
// =============================================================================

/// Demo 1: Basic publishing and subscribing.
async fn demo_basic_publish_subscribe() -> Result<(), Error> {
    banner("Demo 1: Basic Publish/Subscribe");
    let config = RedisEventBusConfig::default()
        .redis_url(redis_url())
        .stream_prefix(prefix(1))
        .consumer_group("demo-consumers")
        .block_ms(1000)
        .single_connection_client(true);
    fresh_streams(&config).await?;
    let bus = RedisEventBus::new(config, registry()?)?;
    bus.connect().await?;
    println!("Connected to Redis");

    let received = Arc::new(Mutex::new(Vec::<EventEnvelope>::new()));
    let r = received.clone();
    bus.subscribe(move |event: Event<OrderCreated>| {
        let r = r.clone();
        async move {
            println!("  Received: {}", event.metadata.event_type);
            r.lock().expect("not poisoned").push(event.into_envelope());
        }
    });
    println!("Subscribed handler to OrderCreated");

    let order_id = Uuid::new_v4();
    let event = Event::new(
        order_id,
        OrderCreated {
            customer_id: "cust-123".into(),
            total_amount: 99.99,
        },
    );
    bus.publish(&[event.into_envelope()]).await?;
    println!("Published OrderCreated for {order_id}");

    consume_until(&[&bus], Duration::from_secs(2), || {
        !received.lock().expect("not poisoned").is_empty()
    })
    .await?;
    println!(
        "Received {} event(s)",
        received.lock().expect("not poisoned").len()
    );
    bus.disconnect().await;
    Ok(())
}

/// Demo 2: Consumer groups for load balancing.
async fn demo_consumer_groups() -> Result<(), Error> {
    banner("Demo 2: Consumer Groups and Load Balancing");
    let base = RedisEventBusConfig::default()
        .redis_url(redis_url())
        .stream_prefix(prefix(2))
        .consumer_group("load-balanced-consumers")
        .block_ms(500)
        .single_connection_client(true);
    fresh_streams(&base).await?;
    let registry = registry()?;
    let bus1 = RedisEventBus::new(base.clone().consumer_name("worker-1"), registry.clone())?;
    let bus2 = RedisEventBus::new(base.consumer_name("worker-2"), registry)?;
    let worker1_events = Arc::new(Mutex::new(Vec::<String>::new()));
    let worker2_events = Arc::new(Mutex::new(Vec::<String>::new()));
    for (bus, log, n) in [(&bus1, &worker1_events, 1), (&bus2, &worker2_events, 2)] {
        let log = log.clone();
        bus.subscribe(move |event: Event<OrderCreated>| {
            let log = log.clone();
            async move {
                println!("  Worker {n} processed: {}", event.metadata.aggregate_id);
                log.lock()
                    .expect("not poisoned")
                    .push(event.metadata.aggregate_id.to_string());
            }
        });
    }
    bus1.connect().await?;
    bus2.connect().await?;
    println!("Both workers connected");

    // The workers are waiting before anything is published: Redis hands each new entry to
    // the consumer that has waited longest, so the split below is Redis's own doing.
    let task1 = {
        let bus = bus1.clone();
        tokio::spawn(async move { bus.start_consuming().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let task2 = {
        let bus = bus2.clone();
        tokio::spawn(async move { bus.start_consuming().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    println!("\nPublishing 6 events...");
    for i in 0..6 {
        let event = Event::new(
            Uuid::new_v4(),
            OrderCreated {
                customer_id: format!("cust-{i}"),
                total_amount: 10.0 * i as f64,
            },
        );
        bus1.publish(&[event.into_envelope()]).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = || {
        worker1_events.lock().expect("not poisoned").len()
            + worker2_events.lock().expect("not poisoned").len()
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while total() < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bus1.stop_consuming();
    bus2.stop_consuming();
    for task in [task1, task2] {
        tokio::time::timeout(Duration::from_secs(2), task).await???;
    }

    let (w1, w2) = (
        worker1_events.lock().expect("not poisoned").len(),
        worker2_events.lock().expect("not poisoned").len(),
    );
    println!("\nResults:");
    println!("  Worker 1 processed: {w1} events");
    println!("  Worker 2 processed: {w2} events");
    println!("  Total: {} events", w1 + w2);
    bus1.disconnect().await;
    bus2.disconnect().await;
    Ok(())
}

/// Demo 3: Statistics and monitoring.
async fn demo_statistics_and_monitoring() -> Result<(), Error> {
    banner("Demo 3: Statistics and Monitoring");
    let config = RedisEventBusConfig::default()
        .redis_url(redis_url())
        .stream_prefix(prefix(3))
        .consumer_group("monitoring-demo")
        .single_connection_client(true);
    fresh_streams(&config).await?;
    let bus = RedisEventBus::new(config, registry()?)?;
    bus.connect().await?;
    for i in 0..10 {
        let event = Event::new(
            Uuid::new_v4(),
            OrderCreated {
                customer_id: format!("cust-{i}"),
                total_amount: 100.0 + i as f64,
            },
        );
        bus.publish(&[event.into_envelope()]).await?;
    }

    let info = bus.get_stream_info().await;
    println!("Published 10 events");
    println!("Stream length: {}", info.stream.length);
    println!("Consumer groups: {}", info.consumer_groups.len());
    println!("Pending messages: {}", info.pending_messages);
    println!("DLQ messages: {}", info.dlq_messages);

    let stats = bus.get_stats_dict();
    println!("\nStatistics:");
    println!("  Published: {}", stats["events_published"]);
    println!("  Consumed: {}", stats["events_consumed"]);
    println!("  Success: {}", stats["events_processed_success"]);
    println!("  Failed: {}", stats["events_processed_failed"]);

    println!("\nSubscribers:");
    println!("  Total: {}", bus.subscriber_count());
    println!("  Wildcard: {}", bus.wildcard_subscriber_count());
    bus.disconnect().await;
    Ok(())
}

/// Demo 4: Integration with projections.
async fn demo_with_projections() -> Result<(), Error> {
    banner("Demo 4: Integration with Projections");
    let config = RedisEventBusConfig::default()
        .redis_url(redis_url())
        .stream_prefix(prefix(4))
        .consumer_group("projection-consumers")
        .block_ms(500)
        .single_connection_client(true);
    fresh_streams(&config).await?;
    let bus = RedisEventBus::new(config, registry()?)?;
    let stats_projection = OrderStatisticsProjection::default();
    let auditor = AuditLogger::default();
    bus.connect().await?;

    bus.subscribe_all(stats_projection.clone());
    println!("Subscribed statistics projection");
    bus.subscribe_to_all_events(auditor.clone());
    println!("Subscribed audit logger to all events");

    let order_id = Uuid::new_v4();
    println!("\nProcessing order: {order_id}");
    let created = Event::new(
        order_id,
        OrderCreated {
            customer_id: "premium-customer".into(),
            total_amount: 499.99,
        },
    );
    bus.publish(&[created.into_envelope()]).await?;
    let shipped = Event::new(
        order_id,
        OrderShipped {
            tracking_number: "TRACK-12345".into(),
        },
    )
    .with_aggregate_version(2);
    bus.publish(&[shipped.into_envelope()]).await?;

    consume_until(&[&bus], Duration::from_secs(2), || {
        auditor.log.lock().expect("not poisoned").len() == 2
    })
    .await?;

    {
        let stats = stats_projection.0.lock().expect("not poisoned");
        println!("\nProjection Results:");
        println!("  Total orders: {}", stats.total_orders);
        println!("  Total revenue: ${:.2}", stats.total_revenue);
        println!("  Shipped count: {}", stats.shipped_count);
    }
    println!(
        "\nAudit log entries: {}",
        auditor.log.lock().expect("not poisoned").len()
    );
    bus.disconnect().await;
    Ok(())
}

#[tokio::main]
async fn main() {
    let mut temporary = temporary_redis();
    println!("{}", "=".repeat(60));
    println!("Tutorial 17: Redis Event Bus");
    println!("{}", "=".repeat(60));
    let result = async {
        demo_basic_publish_subscribe().await?;
        demo_consumer_groups().await?;
        demo_statistics_and_monitoring().await?;
        demo_with_projections().await?;
        Ok::<(), Error>(())
    }
    .await;
    if let Some(server) = temporary.as_mut() {
        let _ = server.kill();
        let _ = server.wait();
    }
    match result {
        Ok(()) => {
            println!("\n{}", "=".repeat(60));
            println!("Tutorial 17 Complete!");
            println!("{}", "=".repeat(60));
        }
        Err(e) => {
            println!("\nError: {e}");
            if e.downcast_ref::<RedisBusError>()
                .is_some_and(RedisBusError::is_transient)
                || e.to_string().starts_with("cannot connect to Redis")
            {
                if std::env::var("EVENTSOURCE_REDIS_URL").is_ok() {
                    println!(
                        "\nNothing answers at {} (EVENTSOURCE_REDIS_URL): start that Redis, or \
                         unset the variable to use (or start) one on localhost.",
                        redis_url()
                    );
                } else {
                    println!(
                        "\nNo Redis answers at {} and no redis-server binary could be started: \
                         install Redis (Debian: apt install redis-server) and run \
                         `redis-server --daemonize yes`, or set EVENTSOURCE_REDIS_URL.",
                        redis_url()
                    );
                }
            }
            std::process::exit(1);
        }
    }
}

//! Handlers, projections, and the subscription table every bus shares.

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::event::{DomainEvent, Event, EventEnvelope};
use crate::util::{BoxFuture, CatchPanic};

/// The error a handler returns: any error type, boxed.
pub type HandlerError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What a handler closure's future may return: `()` (cannot fail) or `Result<(), E>`.
pub trait IntoHandlerResult {
    /// Converts to the handler result.
    ///
    /// # Errors
    /// The handler's own error, boxed.
    fn into_handler_result(self) -> Result<(), HandlerError>;
}

impl IntoHandlerResult for () {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl<E: Into<HandlerError>> IntoHandlerResult for Result<(), E> {
    fn into_handler_result(self) -> Result<(), HandlerError> {
        self.map_err(Into::into)
    }
}

/// Something that handles events of input type `In`: `Event<E>` for a typed subscription,
/// [`EventEnvelope`] for a wildcard one.
///
/// Implemented for async closures (`|event: Event<OrderCreated>| async move { ... }`, returning
/// `()` or `Result<(), E>`) and for your own types:
/// ```
/// use eventsource_core::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, Serialize, Deserialize)]
/// # struct OrderCreated { customer_id: String, total_amount: f64 }
/// # eventsource_core::domain_event!(OrderCreated, "OrderCreated", aggregate = "Order");
/// struct Mailer;
/// impl Handler<Event<OrderCreated>> for Mailer {
///     async fn handle(&self, event: Event<OrderCreated>) -> Result<(), HandlerError> {
///         println!("mail {}", event.customer_id);
///         Ok(())
///     }
/// }
/// let bus = InMemoryEventBus::new();
/// bus.subscribe(Mailer);
/// bus.subscribe(|e: Event<OrderCreated>| async move { println!("{}", e.total_amount) });
/// assert_eq!(bus.subscriber_count_for("OrderCreated"), 2);
/// ```
pub trait Handler<In>: Send + Sync + 'static {
    /// Handles one event. An error (or a panic) leaves the event unacknowledged on buses that
    /// acknowledge, and is reported with [`name`](Self::name).
    fn handle(&self, event: In) -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The name failures are reported under (the type name unless overridden; see [`named`]).
    fn name(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }
}

impl<F, Fut, In> Handler<In> for F
where
    F: Fn(In) -> Fut + Send + Sync + 'static,
    Fut: Future + Send,
    Fut::Output: IntoHandlerResult,
    In: Send + 'static,
{
    fn handle(&self, event: In) -> impl Future<Output = Result<(), HandlerError>> + Send {
        let fut = self(event);
        async move { fut.await.into_handler_result() }
    }
}

/// A handler with a name for reports and logs: `named("send-email", |e| async { ... })`.
pub struct Named<H> {
    name: String,
    handler: H,
}

/// Gives `handler` a name used in failure reports, logs and traces.
pub fn named<H>(name: impl Into<String>, handler: H) -> Named<H> {
    Named {
        name: name.into(),
        handler,
    }
}

impl<In, H: Handler<In>> Handler<In> for Named<H> {
    fn handle(&self, event: In) -> impl Future<Output = Result<(), HandlerError>> + Send {
        self.handler.handle(event)
    }
    fn name(&self) -> String {
        self.name.clone()
    }
}

/// A subscriber that declares which event types it handles (a read model, a process manager).
/// Subscribe it with [`EventBus::subscribe_all`](super::EventBus::subscribe_all).
///
/// ```
/// use eventsource_core::prelude::*;
/// struct Counter(std::sync::atomic::AtomicUsize);
/// impl Projection for Counter {
///     fn event_types(&self) -> Vec<String> { vec!["OrderCreated".into(), "OrderShipped".into()] }
///     async fn handle(&self, _event: EventEnvelope) -> Result<(), HandlerError> {
///         self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
///         Ok(())
///     }
/// }
/// let bus = InMemoryEventBus::new();
/// bus.subscribe_all(Counter(Default::default()));
/// assert_eq!(bus.subscriber_count(), 2);
/// ```
pub trait Projection: Send + Sync + 'static {
    /// The wire names this projection handles.
    fn event_types(&self) -> Vec<String>;

    /// Handles one event of a declared type.
    fn handle(&self, event: EventEnvelope)
    -> impl Future<Output = Result<(), HandlerError>> + Send;

    /// The name failures are reported under.
    fn name(&self) -> String {
        std::any::type_name::<Self>().to_owned()
    }
}

/// Identifies one subscription, for [`EventBus::unsubscribe`](super::EventBus::unsubscribe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SubscriptionId(u64);

/// The object-safe form every subscription is stored as.
trait ErasedHandler: Send + Sync {
    fn call<'a>(&'a self, event: &'a EventEnvelope) -> BoxFuture<'a, Result<(), HandlerError>>;
}

struct TypedHandler<E, H> {
    handler: H,
    _event: PhantomData<fn(E)>,
}

impl<E: DomainEvent, H: Handler<Event<E>>> ErasedHandler for TypedHandler<E, H> {
    fn call<'a>(&'a self, event: &'a EventEnvelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let typed = event.to_event::<E>()?.ok_or_else(|| {
                format!(
                    "event type {:?} routed to a handler of {:?}",
                    event.event_type(),
                    E::EVENT_TYPE
                )
            })?;
            self.handler.handle(typed).await
        })
    }
}

struct EnvelopeHandler<H>(H);

impl<H: Handler<EventEnvelope>> ErasedHandler for EnvelopeHandler<H> {
    fn call<'a>(&'a self, event: &'a EventEnvelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.0.handle(event.clone()))
    }
}

struct ProjectionHandler<P>(P);

impl<P: Projection> ErasedHandler for ProjectionHandler<P> {
    fn call<'a>(&'a self, event: &'a EventEnvelope) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.0.handle(event.clone()))
    }
}

#[derive(Clone)]
struct Entry {
    id: SubscriptionId,
    name: Arc<str>,
    handler: Arc<dyn ErasedHandler>,
}

#[derive(Clone, Default)]
struct Table {
    by_type: HashMap<String, Vec<Entry>>,
    wildcard: Vec<Entry>,
}

/// One handler's failure on one event.
#[derive(Debug)]
#[non_exhaustive]
pub struct HandlerFailure {
    /// The handler's name.
    pub handler: Arc<str>,
    /// Whether it panicked (as opposed to returning an error).
    pub panicked: bool,
    /// The error it returned, or the panic message.
    pub error: HandlerError,
}

impl std::fmt::Display for HandlerFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.panicked { "panicked" } else { "failed" };
        write!(f, "handler {} {what}: {}", self.handler, self.error)
    }
}

/// What happened when one event was dispatched to its handlers.
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct DispatchReport {
    /// How many handlers ran (type handlers, then wildcards).
    pub handlers_run: usize,
    /// The handlers that failed or panicked, in run order.
    pub failures: Vec<HandlerFailure>,
}

impl DispatchReport {
    /// Whether every handler succeeded (also true when none ran).
    pub fn is_success(&self) -> bool {
        self.failures.is_empty()
    }

    /// One line naming every failed handler and its error, for logs and dead letters.
    pub fn failure_summary(&self) -> String {
        self.failures
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct PanicError(String);

/// The subscription table a bus embeds: who handles which event type, and dispatch.
///
/// Subscribing is rare and dispatch frequent, so the table is copied on write and dispatch
/// works on a snapshot: no lock is held while handlers run.
#[derive(Default)]
pub struct Subscribers {
    table: RwLock<Arc<Table>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Subscribers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.snapshot();
        f.debug_struct("Subscribers")
            .field("event_types", &t.by_type.keys().collect::<Vec<_>>())
            .field("wildcard", &t.wildcard.len())
            .finish()
    }
}

impl Subscribers {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn snapshot(&self) -> Arc<Table> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn update(&self, change: impl FnOnce(&mut Table) -> bool) -> bool {
        let mut guard = self.table.write().unwrap_or_else(|p| p.into_inner());
        let mut table = Table::clone(&guard);
        let changed = change(&mut table);
        if changed {
            *guard = Arc::new(table);
        }
        changed
    }

    fn new_id(&self) -> SubscriptionId {
        SubscriptionId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    fn add(
        &self,
        types: Vec<String>,
        name: String,
        handler: Arc<dyn ErasedHandler>,
    ) -> SubscriptionId {
        let entry = Entry {
            id: self.new_id(),
            name: name.into(),
            handler,
        };
        let id = entry.id;
        self.update(|t| {
            for ty in types {
                let list = t.by_type.entry(ty).or_default();
                if !list.iter().any(|e| e.id == id) {
                    list.push(entry.clone());
                }
            }
            true
        });
        id
    }

    /// Subscribes a typed handler to `E`.
    pub fn subscribe<E: DomainEvent, H: Handler<Event<E>>>(&self, handler: H) -> SubscriptionId {
        let name = handler.name();
        self.add(
            vec![E::EVENT_TYPE.to_owned()],
            name,
            Arc::new(TypedHandler {
                handler,
                _event: PhantomData,
            }),
        )
    }

    /// Subscribes an envelope handler to the given wire names (one subscription id).
    pub fn subscribe_types<H: Handler<EventEnvelope>>(
        &self,
        event_types: Vec<String>,
        handler: H,
    ) -> SubscriptionId {
        let name = handler.name();
        self.add(event_types, name, Arc::new(EnvelopeHandler(handler)))
    }

    /// Subscribes a projection to every type it declares (one subscription id).
    pub fn subscribe_all<P: Projection>(&self, projection: P) -> SubscriptionId {
        let types = projection.event_types();
        let name = projection.name();
        self.add(types, name, Arc::new(ProjectionHandler(projection)))
    }

    /// Subscribes a handler to every event (runs after the type handlers).
    pub fn subscribe_to_all_events<H: Handler<EventEnvelope>>(&self, handler: H) -> SubscriptionId {
        let entry = Entry {
            id: self.new_id(),
            name: handler.name().into(),
            handler: Arc::new(EnvelopeHandler(handler)),
        };
        let id = entry.id;
        self.update(|t| {
            t.wildcard.push(entry);
            true
        });
        id
    }

    /// Removes a subscription (typed, projection or wildcard). Returns whether it existed.
    pub fn unsubscribe(&self, id: SubscriptionId) -> bool {
        self.update(|t| {
            let mut removed = false;
            for list in t.by_type.values_mut() {
                let before = list.len();
                list.retain(|e| e.id != id);
                removed |= list.len() != before;
            }
            t.by_type.retain(|_, list| !list.is_empty());
            let before = t.wildcard.len();
            t.wildcard.retain(|e| e.id != id);
            removed | (t.wildcard.len() != before)
        })
    }

    /// Removes a wildcard subscription only. Returns whether it was one.
    pub fn unsubscribe_from_all_events(&self, id: SubscriptionId) -> bool {
        self.update(|t| {
            let before = t.wildcard.len();
            t.wildcard.retain(|e| e.id != id);
            t.wildcard.len() != before
        })
    }

    /// Removes every subscription.
    pub fn clear(&self) {
        self.update(|t| {
            *t = Table::default();
            true
        });
    }

    /// Type subscriptions summed over all event types (a projection counts once per declared
    /// type); wildcard subscriptions are not included.
    pub fn count(&self) -> usize {
        self.snapshot().by_type.values().map(Vec::len).sum()
    }

    /// Subscriptions for one wire name (wildcards not included).
    pub fn count_for(&self, event_type: &str) -> usize {
        self.snapshot().by_type.get(event_type).map_or(0, Vec::len)
    }

    /// Wildcard subscriptions.
    pub fn wildcard_count(&self) -> usize {
        self.snapshot().wildcard.len()
    }

    /// Whether any handler (type or wildcard) would run for `event_type`.
    pub fn has_handlers_for(&self, event_type: &str) -> bool {
        let t = self.snapshot();
        !t.wildcard.is_empty() || t.by_type.get(event_type).is_some_and(|l| !l.is_empty())
    }

    /// Runs every handler of the event: type handlers in subscription order, then wildcards,
    /// one after the other. A failure or panic is recorded and the next handler still runs.
    pub async fn dispatch(&self, event: &EventEnvelope) -> DispatchReport {
        self.dispatch_with(event, false).await
    }

    /// As [`dispatch`](Self::dispatch); with `traced`, each handler runs inside an
    /// `eventsource.handle` span naming the handler and the event.
    pub async fn dispatch_with(&self, event: &EventEnvelope, traced: bool) -> DispatchReport {
        let table = self.snapshot();
        let typed = table.by_type.get(event.event_type()).map(Vec::as_slice);
        let mut report = DispatchReport::default();
        for entry in typed
            .unwrap_or_default()
            .iter()
            .chain(table.wildcard.iter())
        {
            report.handlers_run += 1;
            let call = CatchPanic::new(entry.handler.call(event));
            let outcome = if traced {
                let span = tracing::info_span!(
                    "eventsource.handle",
                    handler = %entry.name,
                    event.type = event.event_type(),
                    event.id = %event.event_id(),
                    otel.status_code = tracing::field::Empty,
                );
                let outcome = tracing::Instrument::instrument(call, span.clone()).await;
                span.record(
                    "otel.status_code",
                    if matches!(outcome, Ok(Ok(()))) {
                        "OK"
                    } else {
                        "ERROR"
                    },
                );
                outcome
            } else {
                call.await
            };
            let failure = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(error)) => Some((false, error)),
                Err(panic) => Some((true, Box::new(PanicError(panic)) as HandlerError)),
            };
            if let Some((panicked, error)) = failure {
                report.failures.push(HandlerFailure {
                    handler: entry.name.clone(),
                    panicked,
                    error,
                });
            }
        }
        report
    }
}

//! A bus inside one process: publish runs the handlers before it returns.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{BusError, DispatchReport, EventBus, EventPublisher, Subscribers, validate_batch};
use crate::event::EventEnvelope;
use crate::util::BoxFuture;

/// Counters of an [`InMemoryEventBus`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InMemoryBusStats {
    /// Events published.
    pub events_published: u64,
    /// Handler invocations.
    pub handlers_invoked: u64,
    /// Handler invocations that failed or panicked.
    pub handler_errors: u64,
}

/// An event bus in process memory, with the same subscription interface as the Redis bus.
///
/// [`publish`](EventPublisher::publish) dispatches each event to its handlers before it
/// returns. Handler failures do not fail the publish (the events *were* published); they are
/// logged with the handler name and counted in [`stats`](Self::stats). Use
/// [`publish_with_report`](Self::publish_with_report) to see them.
#[derive(Debug, Default)]
pub struct InMemoryEventBus {
    subscribers: Subscribers,
    published: AtomicU64,
    invoked: AtomicU64,
    errors: AtomicU64,
}

impl InMemoryEventBus {
    /// A bus with no subscribers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The counters so far.
    pub fn stats(&self) -> InMemoryBusStats {
        InMemoryBusStats {
            events_published: self.published.load(Ordering::Relaxed),
            handlers_invoked: self.invoked.load(Ordering::Relaxed),
            handler_errors: self.errors.load(Ordering::Relaxed),
        }
    }

    /// Publishes and returns one dispatch report per event.
    ///
    /// # Errors
    /// [`BusError::InvalidEvent`] before any handler runs.
    pub async fn publish_with_report(
        &self,
        events: &[EventEnvelope],
    ) -> Result<Vec<DispatchReport>, BusError> {
        validate_batch(events)?;
        let mut reports = Vec::with_capacity(events.len());
        for event in events {
            let report = self.subscribers.dispatch(event).await;
            self.published.fetch_add(1, Ordering::Relaxed);
            self.invoked
                .fetch_add(report.handlers_run as u64, Ordering::Relaxed);
            self.errors
                .fetch_add(report.failures.len() as u64, Ordering::Relaxed);
            for failure in &report.failures {
                tracing::error!(
                    handler = %failure.handler,
                    event_type = event.event_type(),
                    event_id = %event.event_id(),
                    panicked = failure.panicked,
                    error = %failure.error,
                    "event handler failed"
                );
            }
            reports.push(report);
        }
        Ok(reports)
    }
}

impl EventPublisher for InMemoryEventBus {
    fn publish<'a>(&'a self, events: &'a [EventEnvelope]) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move { self.publish_with_report(events).await.map(drop) })
    }
}

impl EventBus for InMemoryEventBus {
    fn subscribers(&self) -> &Subscribers {
        &self.subscribers
    }
}

//! One entry: decode it through the registry and run its handlers.

use tracing::Instrument;

use super::Outcome;
use crate::bus::{RedisEventBus, bump};
use crate::codec::{self, DecodeFailure, REPLAY_GROUP_FIELD, StreamEntry};
use crate::metrics::Skip;
use crate::trace::TraceContext;

impl RedisEventBus {
    /// Decodes and dispatches one entry whose start is already recorded; never panics.
    pub(crate) async fn dispatch_entry(&self, entry: &StreamEntry) -> Outcome {
        let c = &self.inner.counters;
        let group = &self.inner.config.consumer_group;
        if let Some(target) = entry.get_bytes(REPLAY_GROUP_FIELD)
            && target != group.as_bytes()
        {
            bump(&c.events_skipped_other_group, 1);
            self.inner.metrics.skipped(Skip::OtherGroup);
            return Outcome::Skipped {
                reason: "replayed for another consumer group",
                consumed: false,
            };
        }
        let event = match codec::decode_entry(entry, &self.inner.registry) {
            Ok(event) => event,
            Err(DecodeFailure::Unregistered(event)) => {
                if !self.inner.subscribers.has_handlers_for(event.event_type()) {
                    bump(&c.events_skipped_unregistered, 1);
                    self.inner.metrics.skipped(Skip::Unregistered);
                    tracing::debug!(event_type = event.event_type(), message_id = %entry.id, "unregistered event type with no subscriber; skipped");
                    return Outcome::Skipped {
                        reason: "unregistered event type",
                        consumed: false,
                    };
                }
                // Wildcard handlers still get it (as JSON data).
                *event
            }
            Err(DecodeFailure::Malformed(reason)) => {
                bump(&c.malformed_messages, 1);
                self.inner.metrics.malformed();
                tracing::error!(message_id = %entry.id, %reason, "malformed stream entry; dead-lettering");
                return Outcome::Malformed(reason);
            }
            Err(DecodeFailure::Rejected { event_type, reason }) => {
                bump(&c.events_rejected, 1);
                self.inner.metrics.rejected();
                tracing::error!(message_id = %entry.id, %event_type, %reason, "this version of the event type rejects the entry");
                return Outcome::Rejected { event_type, reason };
            }
        };
        self.inner.note_decoded();
        if !self.inner.subscribers.has_handlers_for(event.event_type()) {
            bump(&c.events_skipped_no_subscriber, 1);
            self.inner.metrics.skipped(Skip::NoSubscriber);
            return Outcome::Skipped {
                reason: "no subscriber in this bus",
                consumed: true,
            };
        }
        if self.inner.dedupe.seen(event.event_id()) {
            bump(&c.duplicates_skipped, 1);
            self.inner.metrics.skipped(Skip::Duplicate);
            tracing::debug!(message_id = %entry.id, event_id = %event.event_id(), "event already handled by this consumer; skipped");
            return Outcome::Skipped {
                reason: "duplicate event id",
                consumed: false,
            };
        }
        bump(&c.events_dispatched, 1);
        let started = std::time::Instant::now();
        let dispatch = async {
            if self.inner.config.enable_tracing {
                let parent = entry
                    .get("traceparent")
                    .and_then(|p| TraceContext::parse(p, entry.get("tracestate")));
                let context = parent
                    .as_ref()
                    .map_or_else(TraceContext::new_root, TraceContext::child);
                let span = tracing::info_span!(
                    "eventsource.process",
                    otel.kind = "consumer",
                    messaging.system = "redis",
                    messaging.destination.name = %self.inner.stream,
                    messaging.operation = "process",
                    messaging.message.id = %entry.id,
                    messaging.consumer.group.name = %group,
                    event.type = event.event_type(),
                    event.id = %event.event_id(),
                    trace_id = %context.trace_id_hex(),
                    span_id = %context.span_id_hex(),
                    parent_span_id = parent.as_ref().map(TraceContext::span_id_hex).unwrap_or_default(),
                );
                #[cfg(feature = "otel")]
                if let Some(p) = entry.get("traceparent") {
                    crate::otel::set_parent(&span, p, entry.get("tracestate"));
                }
                context
                    .scope(self.inner.subscribers.dispatch_with(&event, true))
                    .instrument(span)
                    .await
            } else {
                self.inner.subscribers.dispatch_with(&event, false).await
            }
        };
        // In a held partition, handlers see its fencing token.
        let fence = crate::bus::lock_read(&self.inner.fence)
            .as_ref()
            .map(|f| f.token);
        let report = match fence {
            Some(token) => token.scope(dispatch).await,
            None => dispatch.await,
        };
        self.inner
            .metrics
            .handled(event.event_type(), report.is_success(), started.elapsed());
        if report.is_success() {
            bump(&c.events_processed_success, 1);
            self.inner.dedupe.remember(event.event_id());
            Outcome::Handled
        } else {
            bump(&c.events_processed_failed, 1);
            bump(&c.handler_errors, report.failures.len() as u64);
            let summary = report.failure_summary();
            tracing::warn!(message_id = %entry.id, event_type = event.event_type(), failures = %summary, "handler failed; entry stays pending for retry");
            Outcome::Failed(summary)
        }
    }
}

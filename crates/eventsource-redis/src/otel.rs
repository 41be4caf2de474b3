//! OpenTelemetry context across the bus (feature `otel`): with a `tracing-opentelemetry`
//! layer installed, publishing writes the *current* OpenTelemetry context (the caller's
//! request trace, through the `eventsource.publish` span) into the entry's `traceparent` /
//! `tracestate` with the W3C propagator, and consuming makes the extracted context the parent
//! of the `eventsource.process` span, so the handler's spans and anything it publishes join
//! the same trace, across processes and across Python and Rust (eventsource-py carries the
//! same fields). Without such a layer the bus falls back to its own W3C context (see
//! [`crate::trace`]).

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The current span's OpenTelemetry context as `(traceparent, tracestate)`, when there is a
/// valid one (an OpenTelemetry layer is installed and the span is recorded).
pub(crate) fn inject_current() -> Option<(String, Option<String>)> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::with_capacity(2);
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    let parent = carrier.remove("traceparent")?;
    let state = carrier.remove("tracestate").filter(|s| !s.is_empty());
    Some((parent, state))
}

/// Makes the context in `traceparent` / `tracestate` the OpenTelemetry parent of `span`.
pub(crate) fn set_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    let mut carrier: HashMap<String, String> = HashMap::with_capacity(2);
    carrier.insert("traceparent".into(), traceparent.to_owned());
    if let Some(state) = tracestate {
        carrier.insert("tracestate".into(), state.to_owned());
    }
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

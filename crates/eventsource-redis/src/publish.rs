//! Publishing: events validated and encoded, one round trip for a batch (pipelined `XADD`s),
//! exact per-event results when Redis refuses part of a batch, the optional wait for
//! replicas, and the object-safe [`EventPublisher`] a repository holds.

use crate::conn::Commands;
use eventsource_core::BoxFuture;
use eventsource_core::EventEnvelope;
use eventsource_core::bus::{BusError, EventPublisher};
use tracing::Instrument;

use crate::bus::{RedisEventBus, bump};
use crate::codec;
use crate::error::RedisBusError;
use crate::trace::TraceContext;

impl RedisEventBus {
    /// Publishes events in one pipelined round trip and returns their stream ids, in order.
    /// Every event is validated and encoded before anything is sent.
    ///
    /// # Errors
    /// [`RedisBusError::InvalidEvent`] (nothing sent); [`RedisBusError::PartialPublish`]
    /// when Redis refused some events of the batch (e.g. OOM) — it lists exactly which were
    /// written and which not; [`RedisBusError::Command`] or [`RedisBusError::Connect`] when
    /// Redis refused all of them or the connection failed — after a timeout or a dropped
    /// connection some may have been written, so consumers dedupe by `event_id` if the
    /// caller republishes.
    pub async fn publish_events(
        &self,
        events: &[EventEnvelope],
    ) -> Result<Vec<String>, RedisBusError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let span = self.publish_span(&self.inner.stream, events.len());
        async {
            let commands = self.encode(events)?;
            self.send(events, commands).await
        }
        .instrument(span)
        .await
    }

    /// The producer span of a publish to `destination` (none with tracing off).
    pub(crate) fn publish_span(&self, destination: &str, count: usize) -> tracing::Span {
        if self.inner.config.enable_tracing {
            tracing::info_span!(
                "eventsource.publish",
                otel.kind = "producer",
                messaging.system = "redis",
                messaging.destination.name = %destination,
                messaging.operation = "publish",
                messaging.batch.message_count = count,
            )
        } else {
            tracing::Span::none()
        }
    }

    /// Validates and encodes `events` into this stream's `XADD`s (with the current trace
    /// context when tracing is on); nothing is sent.
    ///
    /// # Errors
    /// [`RedisBusError::InvalidEvent`] for the first event that cannot be published.
    pub(crate) fn encode(
        &self,
        events: &[EventEnvelope],
    ) -> Result<Vec<redis::Cmd>, RedisBusError> {
        let traced = self.inner.config.enable_tracing;
        let mut commands = Vec::with_capacity(events.len());
        for event in events {
            event
                .validate()
                .map_err(|source| RedisBusError::InvalidEvent {
                    event_id: event.event_id(),
                    source,
                })?;
            let trace = traced.then(|| {
                #[cfg(feature = "otel")]
                if let Some(current) = crate::otel::inject_current() {
                    return current;
                }
                let hop = TraceContext::next_hop();
                (hop.traceparent(), hop.state)
            });
            let fields = codec::encode_fields(
                event,
                trace.as_ref().map(|(p, s)| (p.as_str(), s.as_deref())),
            )
            .map_err(|source| RedisBusError::InvalidEvent {
                event_id: event.event_id(),
                source,
            })?;
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&self.inner.stream).arg("*");
            for (k, v) in &fields {
                cmd.arg(*k).arg(v);
            }
            commands.push(cmd);
        }
        Ok(commands)
    }

    /// Sends the `XADD`s [`encode`](Self::encode) made of `events` (one command, or one
    /// pipeline), then waits for replicas when configured.
    pub(crate) async fn send(
        &self,
        events: &[EventEnvelope],
        commands: Vec<redis::Cmd>,
    ) -> Result<Vec<String>, RedisBusError> {
        let mut conn = self.commands().await?;
        // One event: a plain command; several: one pipeline, one round trip.
        let ids: Vec<String> = if let [cmd] = commands.as_slice() {
            vec![
                cmd.query_async(&mut conn)
                    .await
                    .map_err(|e| self.command_error("XADD", e))?,
            ]
        } else {
            let mut pipe = redis::pipe();
            for cmd in commands {
                pipe.add_command(cmd);
            }
            let results: Vec<redis::RedisResult<String>> = pipe
                .ignore_errors()
                .query_async(&mut conn)
                .await
                .map_err(|e| self.command_error("XADD", e))?;
            let mut published = Vec::with_capacity(results.len());
            let mut failed = Vec::new();
            for (event, result) in events.iter().zip(results) {
                match result {
                    Ok(id) => {
                        self.inner.metrics.published(event.event_type());
                        published.push((event.event_id(), id));
                    }
                    Err(e) => failed.push((event.event_id(), e)),
                }
            }
            bump(
                &self.inner.counters.events_published,
                published.len() as u64,
            );
            if !failed.is_empty() {
                if published.is_empty() {
                    let (_, first) = failed.swap_remove(0);
                    return Err(self.command_error("XADD", first));
                }
                return Err(RedisBusError::PartialPublish { published, failed });
            }
            published.into_iter().map(|(_, id)| id).collect()
        };
        if events.len() == 1 {
            bump(&self.inner.counters.events_published, 1);
            self.inner.metrics.published(events[0].event_type());
        }
        self.wait_for_replicas(&mut conn, events, &ids).await?;
        Ok(ids)
    }

    /// With `publish_replicas` set: `WAIT` until that many replicas have the events (or the
    /// timeout), and refuse to call the publish durable when fewer did.
    async fn wait_for_replicas(
        &self,
        conn: &mut Commands,
        events: &[EventEnvelope],
        ids: &[String],
    ) -> Result<(), RedisBusError> {
        let wanted = self.inner.config.publish_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let mut wait = redis::cmd("WAIT");
        wait.arg(wanted).arg(crate::config::millis(
            self.inner.config.publish_replicas_timeout,
        ));
        let replicas: u32 = crate::conn::on_master_of(conn, &self.inner.stream, wait)
            .await
            .map_err(|e| self.command_error("WAIT", e))?;
        if replicas >= wanted {
            return Ok(());
        }
        Err(RedisBusError::NotReplicated {
            published: events
                .iter()
                .map(EventEnvelope::event_id)
                .zip(ids.iter().cloned())
                .collect(),
            replicas,
            wanted,
        })
    }
}

impl EventPublisher for RedisEventBus {
    fn publish<'a>(&'a self, events: &'a [EventEnvelope]) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            self.publish_events(events)
                .await
                .map(drop)
                .map_err(into_bus_error)
        })
    }
}

/// A publish error as the bus contract reports it: invalid events as such, the rest as
/// transport errors carrying their kind.
pub(crate) fn into_bus_error(e: RedisBusError) -> BusError {
    match e {
        RedisBusError::InvalidEvent { event_id, source } => {
            BusError::InvalidEvent { event_id, source }
        }
        other => BusError::transport(other.kind(), other),
    }
}

//! An event store in process memory: for tests, demos and single-process tools.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::{
    AppendResult, EventStore, ExpectedVersion, ReadAllOptions, StoreError, StoredEvent, check_batch,
};
use crate::event::{EventEnvelope, now_micros};
use crate::util::BoxFuture;

#[derive(Default)]
struct State {
    /// All events in global order; position = index + 1.
    log: Vec<StoredEvent>,
    /// (aggregate id, aggregate type) → indexes into `log`, in version order.
    streams: HashMap<(Uuid, String), Vec<usize>>,
    /// Every stored event id, for the duplicate check.
    ids: HashSet<Uuid>,
}

/// An [`EventStore`] in memory. Cheap to clone (shared); safe to use from many tasks.
/// One mutex guards everything, so appends are atomic and positions follow commit order.
#[derive(Clone, Default)]
pub struct InMemoryEventStore {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for InMemoryEventStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryEventStore")
            .field("events", &self.lock().log.len())
            .finish()
    }
}

impl InMemoryEventStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of stored events.
    pub fn len(&self) -> usize {
        self.lock().log.len()
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave State half-written (appends validate
        // before mutating), so a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append_now(
        &self,
        aggregate_id: Uuid,
        aggregate_type: &str,
        events: &[EventEnvelope],
        expected: ExpectedVersion,
    ) -> Result<AppendResult, StoreError> {
        let first_version = check_batch(aggregate_id, aggregate_type, events)?;
        let mut state = self.lock();
        let key = (aggregate_id, aggregate_type.to_owned());
        let actual = state.streams.get(&key).map_or(0, |s| s.len() as u64);
        let conflict = StoreError::Concurrency {
            aggregate_id,
            aggregate_type: aggregate_type.to_owned(),
            expected,
            actual,
        };
        if !expected.matches(actual) {
            return Err(conflict);
        }
        let Some(first_version) = first_version else {
            return Ok(AppendResult {
                new_version: actual,
                last_position: state.log.len() as u64,
            });
        };
        if first_version != actual + 1 {
            return Err(conflict);
        }
        let mut batch_ids = HashSet::with_capacity(events.len());
        for event in events {
            if state.ids.contains(&event.event_id()) || !batch_ids.insert(event.event_id()) {
                return Err(StoreError::DuplicateEventId(event.event_id()));
            }
        }
        let stored_at = now_micros();
        let mut indexes = Vec::with_capacity(events.len());
        for event in events {
            let index = state.log.len();
            state.log.push(StoredEvent {
                position: index as u64 + 1,
                stored_at,
                event: event.clone(),
            });
            state.ids.insert(event.event_id());
            indexes.push(index);
        }
        state.streams.entry(key).or_default().extend(indexes);
        Ok(AppendResult {
            new_version: actual + events.len() as u64,
            last_position: state.log.len() as u64,
        })
    }
}

impl EventStore for InMemoryEventStore {
    fn append<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
        events: &'a [EventEnvelope],
        expected: ExpectedVersion,
    ) -> BoxFuture<'a, Result<AppendResult, StoreError>> {
        let result = self.append_now(aggregate_id, aggregate_type, events, expected);
        Box::pin(async move { result })
    }

    fn read_stream<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
        after_version: u64,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        let state = self.lock();
        let events = state
            .streams
            .get(&(aggregate_id, aggregate_type.to_owned()))
            .map(|indexes| {
                indexes
                    .iter()
                    .skip(after_version as usize)
                    .map(|&i| state.log[i].clone())
                    .collect()
            })
            .unwrap_or_default();
        Box::pin(async move { Ok(events) })
    }

    fn read_all<'a>(
        &'a self,
        options: &'a ReadAllOptions,
    ) -> BoxFuture<'a, Result<Vec<StoredEvent>, StoreError>> {
        let state = self.lock();
        let start = usize::try_from(options.after_position)
            .unwrap_or(usize::MAX)
            .min(state.log.len());
        let events = state.log[start..]
            .iter()
            .filter(|s| {
                options
                    .tenant_id
                    .is_none_or(|t| s.event.metadata().tenant_id == Some(t))
                    && options
                        .aggregate_type
                        .as_deref()
                        .is_none_or(|t| s.event.aggregate_type() == t)
            })
            .take(options.limit)
            .cloned()
            .collect();
        Box::pin(async move { Ok(events) })
    }

    fn stream_version<'a>(
        &'a self,
        aggregate_id: Uuid,
        aggregate_type: &'a str,
    ) -> BoxFuture<'a, Result<u64, StoreError>> {
        let version = self
            .lock()
            .streams
            .get(&(aggregate_id, aggregate_type.to_owned()))
            .map_or(0, |s| s.len() as u64);
        Box::pin(async move { Ok(version) })
    }

    fn current_position(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        let position = self.lock().log.len() as u64;
        Box::pin(async move { Ok(position) })
    }
}

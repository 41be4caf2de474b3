//! Given / when / then for aggregates: given these past events, when this command runs, then
//! these events are raised — or this error.
//!
//! ```
//! use eventsource_core::testkit::orders::{OrderAggregate, OrderCreated, OrderShipped};
//! use eventsource_core::testkit::scenario::{AggregateTest, event};
//!
//! AggregateTest::<OrderAggregate>::new()
//!     .given(OrderCreated { customer_id: "c".into(), total_amount: 10.0 })
//!     .when(|order| order.ship("T-1"))
//!     .then(&[event(OrderShipped { tracking_number: "T-1".into() })]);
//!
//! AggregateTest::<OrderAggregate>::new()
//!     .when(|order| order.ship("T-1"))
//!     .then_error(|e| e.to_string().contains("only a created order can ship"));
//! ```

use std::marker::PhantomData;

use serde_json::Value;
use uuid::Uuid;

use crate::aggregate::{Aggregate, AggregateError};
use crate::event::{DomainEvent, Event, EventEnvelope};

/// An expected event: its wire name and its own fields as JSON (see [`event`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    /// The wire name.
    pub event_type: String,
    /// The event's own fields.
    pub data: Value,
}

/// The expectation that an event with exactly this data is raised.
///
/// # Panics
/// When `data` does not serialise to JSON (a test setup error).
pub fn event<E: DomainEvent>(data: E) -> Expected {
    Expected {
        event_type: E::EVENT_TYPE.to_owned(),
        data: serde_json::to_value(&data).expect("the event serialises"),
    }
}

/// The "given" part: an aggregate's history.
#[derive(Debug)]
pub struct AggregateTest<A> {
    id: Uuid,
    history: Vec<EventEnvelope>,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> Default for AggregateTest<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: Aggregate> AggregateTest<A> {
    /// An aggregate with no history (a new id).
    pub fn new() -> Self {
        Self {
            id: Uuid::new_v4(),
            history: Vec::new(),
            _aggregate: PhantomData,
        }
    }

    /// Adds an event to the history (next version, this aggregate).
    #[must_use]
    pub fn given<E: DomainEvent>(mut self, data: E) -> Self {
        let mut event =
            Event::new(self.id, data).with_aggregate_version(self.history.len() as u64 + 1);
        event.metadata_mut().aggregate_type = A::AGGREGATE_TYPE.to_owned();
        self.history.push(event.into_envelope());
        self
    }

    /// Runs `command` on the aggregate rebuilt from the history.
    ///
    /// # Panics
    /// When the history does not rebuild (a test setup error).
    pub fn when<R>(self, command: impl FnOnce(&mut A) -> Result<R, AggregateError>) -> Outcome<A> {
        let mut aggregate = A::new(self.id);
        aggregate
            .load_from_history(self.history)
            .expect("the given history rebuilds the aggregate");
        let result = command(&mut aggregate).map(drop);
        Outcome { aggregate, result }
    }
}

/// The "then" part: what the command raised or returned.
#[derive(Debug)]
pub struct Outcome<A> {
    aggregate: A,
    result: Result<(), AggregateError>,
}

impl<A: Aggregate> Outcome<A> {
    /// Asserts the command succeeded and raised exactly these events, in order.
    ///
    /// # Panics
    /// When it failed or raised other events.
    pub fn then(self, expected: &[Expected]) -> Self {
        if let Err(e) = &self.result {
            panic!("expected events, the command failed: {e}");
        }
        let raised: Vec<Expected> = self
            .aggregate
            .uncommitted_events()
            .iter()
            .map(|e| Expected {
                event_type: e.event_type().to_owned(),
                data: e.data_json().expect("raised events serialise"),
            })
            .collect();
        assert_eq!(raised, expected, "raised events");
        self
    }

    /// Asserts the command succeeded without raising anything.
    ///
    /// # Panics
    /// When it failed or raised events.
    pub fn then_nothing(self) -> Self {
        self.then(&[])
    }

    /// Asserts the command failed with an error `check` accepts, and raised nothing.
    ///
    /// # Panics
    /// When it succeeded, or failed otherwise.
    pub fn then_error(self, check: impl FnOnce(&AggregateError) -> bool) -> Self {
        match &self.result {
            Ok(()) => panic!("expected an error, the command succeeded"),
            Err(e) => assert!(check(e), "unexpected error: {e}"),
        }
        assert!(
            self.aggregate.uncommitted_events().is_empty(),
            "a failed command raised events"
        );
        self
    }

    /// The aggregate after the command (to check its state).
    pub fn aggregate(&self) -> &A {
        &self.aggregate
    }
}

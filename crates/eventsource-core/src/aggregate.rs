//! Aggregates: state rebuilt from events, a version, and the events raised but not yet saved.
//!
//! An aggregate is a struct of yours holding an [`AggregateCore`] and its state; it implements
//! [`Aggregate`] with one method that applies an event to the state. Command methods check the
//! business rules and call [`Aggregate::raise`].
//!
//! Without the bookkeeping: write only the state and use [`Root`](crate::Root) (see
//! [`root`](crate::root)).
//!
//! ```
//! use eventsource_core::prelude::*;
//! use eventsource_core::AggregateError;
//! use serde::{Deserialize, Serialize};
//! use uuid::Uuid;
//!
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct Opened { owner: String }
//! eventsource_core::domain_event!(Opened, "AccountOpened", aggregate = "Account");
//!
//! struct Account { core: AggregateCore, owner: Option<String> }
//!
//! impl Aggregate for Account {
//!     const AGGREGATE_TYPE: &'static str = "Account";
//!     fn new(id: Uuid) -> Self { Account { core: AggregateCore::new(id), owner: None } }
//!     fn core(&self) -> &AggregateCore { &self.core }
//!     fn core_mut(&mut self) -> &mut AggregateCore { &mut self.core }
//!     fn apply(&mut self, event: &EventEnvelope) -> Result<(), AggregateError> {
//!         if let Some(e) = event.data::<Opened>()? { self.owner = Some(e.owner.clone()); }
//!         Ok(())
//!     }
//! }
//!
//! let mut account = Account::new(Uuid::new_v4());
//! account.raise(Opened { owner: "ada".into() }).unwrap();
//! assert_eq!(account.version(), 1);
//! assert_eq!(account.uncommitted_events().len(), 1);
//! ```

use uuid::Uuid;

use crate::event::{DomainEvent, Event, EventEnvelope, EventError};

/// Why an event could not be applied, or a command was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AggregateError {
    /// The event belongs to another aggregate. A bug in the caller or a corrupt stream.
    #[error("event {event_id} belongs to aggregate {actual}, not {expected}")]
    WrongAggregate {
        /// The event's id.
        event_id: Uuid,
        /// This aggregate's id.
        expected: Uuid,
        /// The event's aggregate id.
        actual: Uuid,
    },
    /// The event's version is not this aggregate's next version: a gap or a duplicate.
    #[error("event {event_id} has version {actual}, expected {expected}")]
    VersionMismatch {
        /// The event's id.
        event_id: Uuid,
        /// The next version of this aggregate.
        expected: u64,
        /// The event's aggregate version.
        actual: u64,
    },
    /// The event is of another aggregate type.
    #[error("event {event_id} is for aggregate type {actual:?}, not {expected:?}")]
    WrongAggregateType {
        /// The event's id.
        event_id: Uuid,
        /// This aggregate's type.
        expected: &'static str,
        /// The event's aggregate type.
        actual: String,
    },
    /// A business rule refused the command (e.g. "only a created order can ship").
    #[error("{0}")]
    Rule(String),
    /// An event's data could not be decoded.
    #[error(transparent)]
    Event(#[from] EventError),
}

impl AggregateError {
    /// A business-rule refusal with a message for the caller.
    pub fn rule(message: impl Into<String>) -> Self {
        Self::Rule(message.into())
    }

    /// Whether the same call may succeed later (see
    /// [`ErrorKind::is_transient`](crate::ErrorKind::is_transient)); never for
    /// this error type today, kept so every error answers the question the same way.
    pub fn is_transient(&self) -> bool {
        self.kind().is_transient()
    }
    /// What kind of failure this is: a refused command is `InvalidInput`; an event that does
    /// not fit the aggregate, or does not decode, is `InvalidData`.
    pub fn kind(&self) -> crate::ErrorKind {
        match self {
            Self::Rule(_) => crate::ErrorKind::InvalidInput,
            Self::WrongAggregate { .. }
            | Self::VersionMismatch { .. }
            | Self::WrongAggregateType { .. }
            | Self::Event(_) => crate::ErrorKind::InvalidData,
        }
    }
}

/// The bookkeeping every aggregate holds: id, version, uncommitted events.
#[derive(Debug, Clone)]
pub struct AggregateCore {
    id: Uuid,
    version: u64,
    uncommitted: Vec<EventEnvelope>,
}

impl AggregateCore {
    /// A new aggregate's core: version 0, nothing uncommitted.
    pub fn new(id: Uuid) -> Self {
        Self {
            id,
            version: 0,
            uncommitted: Vec::new(),
        }
    }

    /// Sets the version of an aggregate restored from a snapshot (no events applied yet).
    /// For snapshot support only: the repository calls it after `restore_state`.
    pub fn restore_version(&mut self, version: u64) {
        debug_assert!(self.uncommitted.is_empty());
        self.version = version;
    }
}

/// An event-sourced aggregate. Implement the four required items; the rest is provided.
pub trait Aggregate: Send + Sync + Sized + 'static {
    /// The aggregate type written into every event (letters, digits, `_ . -`).
    const AGGREGATE_TYPE: &'static str;

    /// The initial state of a new aggregate with this id (holding `AggregateCore::new(id)`).
    fn new(id: Uuid) -> Self;

    /// The bookkeeping part.
    fn core(&self) -> &AggregateCore;

    /// The bookkeeping part, mutable.
    fn core_mut(&mut self) -> &mut AggregateCore;

    /// Applies one event to the state. Only changes state; never refuses a valid event.
    ///
    /// # Errors
    /// An event whose data does not decode.
    fn apply(&mut self, event: &EventEnvelope) -> Result<(), AggregateError>;

    /// The aggregate id.
    fn id(&self) -> Uuid {
        self.core().id
    }

    /// The version: the aggregate version of the last applied event (0 when new).
    fn version(&self) -> u64 {
        self.core().version
    }

    /// The version the next raised event gets.
    fn next_version(&self) -> u64 {
        self.core().version + 1
    }

    /// Events raised since the last save.
    fn uncommitted_events(&self) -> &[EventEnvelope] {
        &self.core().uncommitted
    }

    /// Whether there are events to save.
    fn has_uncommitted_events(&self) -> bool {
        !self.core().uncommitted.is_empty()
    }

    /// Raises a new event with `data`: stamps id, type and next version, applies it, and keeps
    /// it as uncommitted. Returns the event's metadata-bearing envelope.
    ///
    /// # Errors
    /// As [`apply`](Self::apply).
    fn raise<E: DomainEvent>(&mut self, data: E) -> Result<&EventEnvelope, AggregateError> {
        let event = Event::new(self.id(), data);
        self.raise_event(event)
    }

    /// As [`raise`](Self::raise), keeping metadata you set (tenant, actor, causation).
    /// Aggregate id, type and version are stamped here.
    ///
    /// # Errors
    /// As [`apply`](Self::apply).
    fn raise_event<E: DomainEvent>(
        &mut self,
        mut event: Event<E>,
    ) -> Result<&EventEnvelope, AggregateError> {
        let metadata = event.metadata_mut();
        metadata.aggregate_id = self.id();
        metadata.aggregate_type = Self::AGGREGATE_TYPE.to_owned();
        metadata.aggregate_version = self.next_version();
        self.apply_event(event.into_envelope(), true)?;
        Ok(self
            .core()
            .uncommitted
            .last()
            .expect("apply_event with is_new keeps the event"))
    }

    /// Applies an event after checking it fits: same aggregate id and type, and version
    /// exactly [`next_version`](Self::next_version). `is_new` keeps it as uncommitted.
    ///
    /// # Errors
    /// [`AggregateError::WrongAggregate`], [`AggregateError::WrongAggregateType`],
    /// [`AggregateError::VersionMismatch`], or an error from [`apply`](Self::apply).
    fn apply_event(&mut self, event: EventEnvelope, is_new: bool) -> Result<(), AggregateError> {
        let m = event.metadata();
        if m.aggregate_id != self.id() {
            return Err(AggregateError::WrongAggregate {
                event_id: m.event_id,
                expected: self.id(),
                actual: m.aggregate_id,
            });
        }
        if m.aggregate_type != Self::AGGREGATE_TYPE {
            return Err(AggregateError::WrongAggregateType {
                event_id: m.event_id,
                expected: Self::AGGREGATE_TYPE,
                actual: m.aggregate_type.clone(),
            });
        }
        if m.aggregate_version != self.next_version() {
            return Err(AggregateError::VersionMismatch {
                event_id: m.event_id,
                expected: self.next_version(),
                actual: m.aggregate_version,
            });
        }
        self.apply(&event)?;
        let core = self.core_mut();
        core.version = event.aggregate_version();
        if is_new {
            core.uncommitted.push(event);
        }
        Ok(())
    }

    /// Rebuilds state from stored events, oldest first.
    ///
    /// # Errors
    /// As [`apply_event`](Self::apply_event) (a gap in versions is an error).
    fn load_from_history<I>(&mut self, events: I) -> Result<(), AggregateError>
    where
        I: IntoIterator<Item = EventEnvelope>,
    {
        for event in events {
            self.apply_event(event, false)?;
        }
        Ok(())
    }

    /// Forgets the uncommitted events (after they were saved).
    fn mark_committed(&mut self) {
        self.core_mut().uncommitted.clear();
    }
}

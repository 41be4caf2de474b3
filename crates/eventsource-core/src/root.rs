//! [`Root<S>`]: an aggregate written as its state alone.
//!
//! [`Aggregate`] asks for the bookkeeping (`core()` / `core_mut()`) in every aggregate. With
//! `Root<S>` a user writes only the state, how events change it ([`AggregateState::apply`]),
//! and commands that decide which event to raise; `Root` holds the id, the version and the
//! uncommitted events, and is an [`Aggregate`] (and a
//! [`SnapshotAggregate`] when the state serialises), so
//! repositories, snapshots and the test harness take it as they take a hand-written one.
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
//! #[derive(Debug, Default, Clone, Serialize, Deserialize)]
//! struct Account { owner: Option<String> }
//!
//! impl AggregateState for Account {
//!     const AGGREGATE_TYPE: &'static str = "Account";
//!     fn apply(&mut self, event: &EventEnvelope) -> Result<(), AggregateError> {
//!         if let Some(e) = event.data::<Opened>()? { self.owner = Some(e.owner.clone()); }
//!         Ok(())
//!     }
//! }
//!
//! impl Account {
//!     /// A command: checks the rules against the state, returns the event to raise.
//!     fn open(&self, owner: &str) -> Result<Opened, AggregateError> {
//!         if self.owner.is_some() {
//!             return Err(AggregateError::rule("already open"));
//!         }
//!         Ok(Opened { owner: owner.into() })
//!     }
//! }
//!
//! let mut account = Root::<Account>::new(Uuid::new_v4());
//! account.execute(|s| s.open("ada")).unwrap();
//! assert_eq!(account.owner.as_deref(), Some("ada")); // Deref to the state
//! assert_eq!(account.version(), 1);
//! assert!(account.execute(|s| s.open("bob")).is_err());
//! assert_eq!(account.uncommitted_events().len(), 1);
//! ```

use std::ops::Deref;

use serde::Serialize;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::aggregate::{Aggregate, AggregateCore, AggregateError};
use crate::event::{DomainEvent, EventEnvelope};
use crate::snapshot::SnapshotAggregate;

/// The state of an aggregate held in a [`Root`]: its initial value (`Default`) and how each
/// event changes it.
pub trait AggregateState: Default + Send + Sync + 'static {
    /// The aggregate type written into every event (letters, digits, `_ . -`).
    const AGGREGATE_TYPE: &'static str;

    /// The version of the state's shape kept in snapshots (when the state serialises).
    /// Raise it when the state type changes: older snapshots are then ignored.
    const SNAPSHOT_VERSION: u32 = 1;

    /// Applies one event to the state. Only changes state; never refuses a valid event.
    ///
    /// # Errors
    /// An event whose data does not decode.
    fn apply(&mut self, event: &EventEnvelope) -> Result<(), AggregateError>;
}

/// An aggregate made of the state `S` and the bookkeeping every aggregate needs. Derefs to
/// the state.
#[derive(Debug, Clone)]
pub struct Root<S> {
    core: AggregateCore,
    state: S,
}

impl<S> Deref for Root<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.state
    }
}

impl<S: AggregateState> Root<S> {
    /// The state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// Runs a command: `decide` checks the rules against the current state and returns the
    /// event to raise; it is then raised (stamped with this aggregate's id, type and next
    /// version, applied, kept until saved).
    ///
    /// # Errors
    /// The command's refusal, or as [`Aggregate::raise`].
    pub fn execute<E: DomainEvent>(
        &mut self,
        decide: impl FnOnce(&S) -> Result<E, AggregateError>,
    ) -> Result<&EventEnvelope, AggregateError> {
        let event = decide(&self.state)?;
        self.raise(event)
    }
}

impl<S: AggregateState> Aggregate for Root<S> {
    const AGGREGATE_TYPE: &'static str = S::AGGREGATE_TYPE;

    fn new(id: Uuid) -> Self {
        Self {
            core: AggregateCore::new(id),
            state: S::default(),
        }
    }

    fn core(&self) -> &AggregateCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut AggregateCore {
        &mut self.core
    }

    fn apply(&mut self, event: &EventEnvelope) -> Result<(), AggregateError> {
        self.state.apply(event)
    }
}

impl<S> SnapshotAggregate for Root<S>
where
    S: AggregateState + Clone + Serialize + DeserializeOwned,
{
    const SNAPSHOT_VERSION: u32 = S::SNAPSHOT_VERSION;
    type State = S;

    fn snapshot_state(&self) -> S {
        self.state.clone()
    }

    fn restore_state(&mut self, state: S) {
        self.state = state;
    }
}

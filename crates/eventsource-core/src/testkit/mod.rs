//! Test fixtures shared by the crates of this workspace (feature `testkit`).
//!
//! - [`orders`]: the tutorial's order domain (`OrderCreated`, `OrderShipped`, `OrderAggregate`).
//! - [`store_contract`]: the behaviour every [`EventStore`](crate::EventStore) must show; each
//!   store's test suite runs it against its own store.
//! - [`snapshot_contract`]: the same for a [`SnapshotStore`](crate::SnapshotStore).

pub mod orders;
pub mod scenario;
pub mod snapshot_contract;
pub mod store_contract;

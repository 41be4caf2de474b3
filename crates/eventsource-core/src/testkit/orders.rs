//! The tutorial's order domain: two events and an aggregate with one business rule.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::aggregate::{Aggregate, AggregateCore, AggregateError};
use crate::event::EventEnvelope;
use crate::snapshot::SnapshotAggregate;

/// An order was placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// Who ordered.
    pub customer_id: String,
    /// The order's total.
    pub total_amount: f64,
}
crate::domain_event!(OrderCreated, "OrderCreated", aggregate = "Order");

/// An order was shipped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderShipped {
    /// The carrier's tracking number.
    pub tracking_number: String,
}
crate::domain_event!(OrderShipped, "OrderShipped", aggregate = "Order");

/// Where an order is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum OrderStatus {
    /// Not created yet.
    #[default]
    Draft,
    /// Created, not shipped.
    Created,
    /// Shipped.
    Shipped,
}

/// The order aggregate: create, then ship; only a created order ships.
#[derive(Debug)]
pub struct OrderAggregate {
    core: AggregateCore,
    /// Who ordered.
    pub customer_id: Option<String>,
    /// The total.
    pub total_amount: f64,
    /// The status.
    pub status: OrderStatus,
    /// Set when shipped.
    pub tracking_number: Option<String>,
}

impl OrderAggregate {
    /// Creates the order.
    ///
    /// # Errors
    /// [`AggregateError::Rule`] if it already exists.
    pub fn create(&mut self, customer_id: &str, total_amount: f64) -> Result<(), AggregateError> {
        if self.status != OrderStatus::Draft {
            return Err(AggregateError::rule("order already created"));
        }
        self.raise(OrderCreated {
            customer_id: customer_id.to_owned(),
            total_amount,
        })?;
        Ok(())
    }

    /// Ships the order.
    ///
    /// # Errors
    /// [`AggregateError::Rule`] unless the order is created and not shipped.
    pub fn ship(&mut self, tracking_number: &str) -> Result<(), AggregateError> {
        if self.status != OrderStatus::Created {
            return Err(AggregateError::rule(format!(
                "only a created order can ship (status: {:?})",
                self.status
            )));
        }
        self.raise(OrderShipped {
            tracking_number: tracking_number.to_owned(),
        })?;
        Ok(())
    }
}

impl Aggregate for OrderAggregate {
    const AGGREGATE_TYPE: &'static str = "Order";

    fn new(id: Uuid) -> Self {
        Self {
            core: AggregateCore::new(id),
            customer_id: None,
            total_amount: 0.0,
            status: OrderStatus::Draft,
            tracking_number: None,
        }
    }

    fn core(&self) -> &AggregateCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut AggregateCore {
        &mut self.core
    }

    fn apply(&mut self, event: &EventEnvelope) -> Result<(), AggregateError> {
        if let Some(e) = event.data::<OrderCreated>()? {
            self.customer_id = Some(e.customer_id.clone());
            self.total_amount = e.total_amount;
            self.status = OrderStatus::Created;
        } else if let Some(e) = event.data::<OrderShipped>()? {
            self.tracking_number = Some(e.tracking_number.clone());
            self.status = OrderStatus::Shipped;
        }
        Ok(())
    }
}

/// What a snapshot of an order keeps.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderState {
    /// Who ordered.
    pub customer_id: Option<String>,
    /// The total.
    pub total_amount: f64,
    /// The status.
    pub status: OrderStatus,
    /// Set when shipped.
    pub tracking_number: Option<String>,
}

impl SnapshotAggregate for OrderAggregate {
    const SNAPSHOT_VERSION: u32 = 1;
    type State = OrderState;

    fn snapshot_state(&self) -> OrderState {
        OrderState {
            customer_id: self.customer_id.clone(),
            total_amount: self.total_amount,
            status: self.status,
            tracking_number: self.tracking_number.clone(),
        }
    }

    fn restore_state(&mut self, state: OrderState) {
        self.customer_id = state.customer_id;
        self.total_amount = state.total_amount;
        self.status = state.status;
        self.tracking_number = state.tracking_number;
    }
}

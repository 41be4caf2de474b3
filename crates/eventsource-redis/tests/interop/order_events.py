"""The tutorial's order events, shared by the interop scripts (the Rust side has the same
types in eventsource_core::testkit::orders)."""
from __future__ import annotations

from eventsource import DomainEvent


class OrderCreated(DomainEvent):
    aggregate_type: str = "Order"
    customer_id: str
    total_amount: float


class OrderShipped(DomainEvent):
    aggregate_type: str = "Order"
    tracking_number: str

#!/usr/bin/env python3
"""Publish N OrderCreated events with eventsource-py's RedisEventBus.

Usage: py_publish.py --redis-url URL --prefix P --count N [--tenant-id UUID]

Writes to stream "<P>:stream" (consumer group "default" is created by connect()).
Prints one JSON line per published event: event.model_dump(mode="json").
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
from uuid import UUID, uuid4

from eventsource import EventRegistry, RedisEventBus, RedisEventBusConfig

from order_events import OrderCreated, OrderShipped


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--group", default="default")
    ap.add_argument("--tenant-id", default=None)
    args = ap.parse_args()

    registry = EventRegistry([OrderCreated, OrderShipped])
    cfg = RedisEventBusConfig(
        redis_url=args.redis_url,
        stream_prefix=args.prefix,
        consumer_group=args.group,
        enable_tracing=False,
    )
    bus = RedisEventBus(cfg, event_registry=registry)
    await bus.connect()
    try:
        tenant = UUID(args.tenant_id) if args.tenant_id else None
        events = [
            OrderCreated(
                aggregate_id=uuid4(),
                customer_id=f"cust-{i}",
                total_amount=i * 1.5,
                tenant_id=tenant,
            )
            for i in range(args.count)
        ]
        # One publish call: a single event uses XADD, several use a pipeline.
        await bus.publish(events)
        for ev in events:
            print(json.dumps(ev.model_dump(mode="json")), flush=True)
    finally:
        await bus.disconnect()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

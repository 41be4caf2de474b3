#!/usr/bin/env python3
"""Consume events with eventsource-py's RedisEventBus.

Usage: py_consume.py --redis-url URL --prefix P --group G --expect N --timeout S
                     [--consumer NAME] [--fail]

Registers OrderCreated/OrderShipped, subscribes a wildcard handler, reads
"<P>:stream" with XREADGROUP as group G, and stops once N events arrived or
S seconds passed. Prints one JSON line per received event
(event.model_dump(mode="json")). Exit code 0 iff at least N were received.

--fail: the handler raises for every event, so nothing is XACKed and the
entries stay pending (used to set up DLQ scenarios). The events are still
printed and counted.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from eventsource import DomainEvent, EventRegistry, RedisEventBus, RedisEventBusConfig

from order_events import OrderCreated, OrderShipped


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--group", default="default")
    ap.add_argument("--expect", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=10.0)
    ap.add_argument("--consumer", default=None)
    ap.add_argument("--fail", action="store_true")
    args = ap.parse_args()

    # Handler failures are logged at ERROR by the bus; keep stderr quiet.
    logging.basicConfig(level=logging.CRITICAL)

    registry = EventRegistry([OrderCreated, OrderShipped])
    cfg = RedisEventBusConfig(
        redis_url=args.redis_url,
        stream_prefix=args.prefix,
        consumer_group=args.group,
        consumer_name=args.consumer,
        block_ms=200,
        enable_tracing=False,
    )
    bus = RedisEventBus(cfg, event_registry=registry)
    received: list[DomainEvent] = []
    done = asyncio.Event()

    async def handler(event: DomainEvent) -> None:
        received.append(event)
        print(json.dumps(event.model_dump(mode="json")), flush=True)
        if len(received) >= args.expect:
            done.set()
        if args.fail:
            raise RuntimeError("py_consume --fail")

    bus.subscribe_to_all_events(handler)
    await bus.connect()  # creates group G at id "0" (MKSTREAM) if missing
    task = bus.start_consuming_in_background()
    try:
        await asyncio.wait_for(done.wait(), timeout=args.timeout)
    except TimeoutError:
        pass
    finally:
        # Let the loop finish its current batch (and its XACKs) before
        # disconnect() cancels the task; it exits within ~block_ms.
        await bus.stop_consuming()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
        except (TimeoutError, asyncio.CancelledError):
            pass
        await bus.disconnect()
    ok = len(received) >= args.expect
    if not ok:
        print(f"py_consume: got {len(received)} of {args.expect} events", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

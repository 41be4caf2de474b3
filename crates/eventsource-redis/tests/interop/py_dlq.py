#!/usr/bin/env python3
"""DLQ helper around eventsource-py's RedisEventBus.

Usage:
  py_dlq.py list    --redis-url URL --prefix P [--group G] [--count N]
      one JSON line per DLQ entry: {"message_id": ..., "data": {...}}
  py_dlq.py replay  --redis-url URL --prefix P [--group G] ID
      prints "true"/"false" (result of replay_dlq_message); exit 0 iff true
  py_dlq.py recover --redis-url URL --prefix P [--group G]
                    [--min-idle-ms MS] [--max-retries N]
      runs recover_pending_messages() and prints its stats dict as JSON

Note: connect() runs XGROUP CREATE <P>:stream <G> 0 MKSTREAM, so every
sub-command creates the main stream and group G if they are missing.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys

from eventsource import EventRegistry, RedisEventBus, RedisEventBusConfig

from order_events import OrderCreated, OrderShipped


async def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("command", choices=["list", "replay", "recover"])
    ap.add_argument("message_id", nargs="?")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--group", default="default")
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--min-idle-ms", type=int, default=None)
    ap.add_argument("--max-retries", type=int, default=None)
    args = ap.parse_intermixed_args()
    logging.basicConfig(level=logging.CRITICAL)

    registry = EventRegistry([OrderCreated, OrderShipped])
    cfg = RedisEventBusConfig(
        redis_url=args.redis_url,
        stream_prefix=args.prefix,
        consumer_group=args.group,
        enable_tracing=False,
    )
    bus = RedisEventBus(cfg, event_registry=registry)
    await bus.connect()  # get_dlq_messages/replay return []/False when not connected
    try:
        if args.command == "list":
            for msg in await bus.get_dlq_messages(count=args.count):
                print(json.dumps(msg), flush=True)
            return 0
        if args.command == "replay":
            if not args.message_id:
                ap.error("replay needs a message id")
            ok = await bus.replay_dlq_message(args.message_id)
            print(json.dumps(ok))
            return 0 if ok else 1
        stats = await bus.recover_pending_messages(
            min_idle_time_ms=args.min_idle_ms, max_retries=args.max_retries
        )
        print(json.dumps(stats))
        return 0
    finally:
        await bus.disconnect()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

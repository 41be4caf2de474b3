#!/usr/bin/env python3
"""Writes the named seed inputs of the fuzz corpus (fuzz/corpus/<target>/seed-*): real
XREADGROUP and XRANGE replies of the bus's wire format, fragmented and broken variants, and
event JSON texts. `cargo fuzz cmin` renames files to hashes; run this again after it."""
import json
import os
import uuid

BASE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def bulk(b):
    if isinstance(b, str):
        b = b.encode()
    return b"$%d\r\n%s\r\n" % (len(b), b)


def arr(items):
    return b"*%d\r\n" % len(items) + b"".join(items)


def payload(kind="created", **over):
    p = {"event_id": str(uuid.UUID(int=1)), "event_type": "OrderCreated", "event_version": 1,
         "occurred_at": "2026-11-28T14:13:24.501310Z", "aggregate_id": str(uuid.UUID(int=2)),
         "aggregate_type": "Order", "aggregate_version": 1, "tenant_id": None, "actor_id": None,
         "correlation_id": str(uuid.UUID(int=3)), "causation_id": None, "metadata": {},
         "customer_id": "cust-1", "total_amount": 99.99}
    if kind == "shipped":
        p.update({"event_type": "OrderShipped", "aggregate_version": 2})
        del p["customer_id"], p["total_amount"]
        p["tracking_number"] = "TRACK-1"
    p.update(over)
    return json.dumps(p, separators=(",", ":"))


def fields(pl, etype="OrderCreated", extra=()):
    f = [("event_id", str(uuid.UUID(int=1))), ("event_type", etype),
         ("aggregate_id", str(uuid.UUID(int=2))), ("aggregate_type", "Order"), ("tenant_id", ""),
         ("occurred_at", "2026-11-28T14:13:24.501310+00:00"), ("payload", pl)]
    f.extend(extra)
    return f


def entry(i, fl):
    flat = []
    for k, v in fl:
        flat += [bulk(k), bulk(v)]
    return arr([bulk(f"1700000000000-{i}"), arr(flat)])


def xread(entries, stream="orders:stream"):
    return arr([arr([bulk(stream), arr(entries)])])


def write(target, name, data):
    os.makedirs(os.path.join(BASE, target), exist_ok=True)
    mode = "w" if isinstance(data, str) else "wb"
    with open(os.path.join(BASE, target, "seed-" + name), mode) as f:
        f.write(data)


created, shipped = payload(), payload("shipped")
replies = {
    "one": xread([entry(0, fields(created))]),
    "two": xread([entry(0, fields(created)), entry(1, fields(shipped, "OrderShipped"))]),
    "deleted": xread([arr([bulk("1700000000000-5"), b"*-1\r\n"])]),
    "nil": b"*-1\r\n",
    "empty": xread([]),
    "error": b"-NOGROUP No such key or consumer group\r\n",
    "trace": xread([entry(0, fields(created, extra=[
        ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]))]),
    "nonutf8": xread([entry(0, [("event_type", "OrderCreated"), ("payload", b"\xff\xfe{")])]),
    "unknown_type": xread([entry(0, fields(payload(event_type="Refunded"), "Refunded"))]),
    "bad_payload": xread([entry(0, fields(payload(total_amount="many")))]),
    "mismatch": xread([entry(0, fields(created, "OrderShipped"))]),
    "resp3_map": b"%1\r\n" + bulk("orders:stream") + arr([entry(0, fields(created))]),
    "long_len": b"*1\r\n*2\r\n$13\r\norders:stream\r\n*1\r\n*2\r\n$15\r\n1700000000000-0\r\n"
                b"*2\r\n$999999999\r\nabc\r\n",
}
for name, r in replies.items():
    write("resp_reader", name, bytes([0]) + r)
    write("stream_entry", name, r)
write("resp_reader", "two_cut_small", bytes([8, 0, 1, 2, 3, 0, 5, 7, 1]) + replies["two"])
write("resp_reader", "one_cut_bytes", bytes([31] + [0] * 31) + replies["one"])


def ff(fl):
    enc = lambda x: x.encode() if isinstance(x, str) else x
    return b"\xff".join(enc(k) + b"\xff" + enc(v) for k, v in fl)


write("stream_entry", "fields_created", ff(fields(created)))
write("stream_entry", "fields_shipped", ff(fields(shipped, "OrderShipped")))
write("stream_entry", "fields_no_payload", ff([("event_type", "OrderCreated")]))


def dlq_entry(i, extra):
    return entry(i, fields(created) + [("original_message_id", "1700000000000-0"),
                                       ("retry_count", "3"),
                                       ("dlq_timestamp", "2026-11-28T14:13:25.000000+00:00")] + extra)


dead = {
    "one": arr([dlq_entry(0, [("error", "carrier down"), ("consumer_group", "billing")])]),
    "python_style": arr([dlq_entry(0, [])]),
    "many": arr([dlq_entry(i, [("error", f"e{i}"), ("consumer_group", "g")]) for i in range(5)]),
    "bad_retry": arr([entry(0, fields(created) + [("retry_count", "x"), ("error", b"\xff\xfe")])]),
    "empty": b"*0\r\n",
    "deleted": arr([arr([bulk("1-0"), b"*-1\r\n"])]),
}
for name, r in dead.items():
    write("dead_letter", name, r)

events = {
    "created": created,
    "shipped": shipped,
    "minimal": json.dumps({"event_id": str(uuid.UUID(int=1)), "event_type": "X",
                           "occurred_at": "2026-11-28T14:13:24.501310Z",
                           "aggregate_id": str(uuid.UUID(int=2)), "aggregate_type": "Order"}),
    "escaped": payload(customer_id="a\"b\\c\u00e9\n"),
    "escaped_key": created.replace('"customer_id"', '"cust\\u006fmer_id"'),
    "wrong_types": payload(event_version="1"),
    "nulls": payload(metadata=None),
    "nested": payload(items=[{"sku": "a", "qty": 2}, {"sku": "b", "qty": [1, 2, {"x": None}]}]),
    "not_object": "[1,2,3]",
    "truncated": created[:57],
    "dup_key": created[:-1] + ',"event_type":"Other"}',
    "big_numbers": payload(total_amount=1e308, aggregate_version=18446744073709551615),
    "empty_uuid": payload(event_id=""),
    # The fuzzer's first finding (a harness one): no occurred_at, so each decoder used "now".
    "missing_occurred_at": created.replace('"occurred_at"', '"occurredbat"'),
}
for name, r in events.items():
    write("event_json", name, r)

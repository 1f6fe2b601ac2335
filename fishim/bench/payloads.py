"""Benchmark payloads: valid fishim envelopes whose first field is the sender's clock.

Every benchmark message's first field is ``"t"``: the sender's ``time.time_ns()`` at the moment of
sending, so any receiver (or the store) can compute latency.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

from fishim.bench.plan import PAYLOAD_BYTES


def stamp_of(payload: bytes) -> int | None:
    """The ``t`` of a benchmark payload, or None for anything else.

    ``t`` is the sender's first field; fishim's own broker routes the payload with its ``seq`` and
    ``order_seq`` stamps spliced in ahead of it, so it is looked for near the start, not at it.
    """
    start = payload.find(b'"t":', 0, 64)
    if start == -1:
        return None
    start += 4
    try:
        return int(payload[start:payload.find(b",", start)])
    except ValueError:
        return None


def chat_maker(id_prefix: str, sender: str, size: int = PAYLOAD_BYTES) -> Callable[[int], bytes]:
    """Valid chat envelopes of exactly ``size`` bytes (t and ts have fixed widths until 2286)."""
    template = b'{"t":%d,"id":"%b-%09d","ts":%d,"sender":"%b","text":"%b"}'
    prefix, who = id_prefix.encode(), sender.encode()
    probe = template % (time.time_ns(), prefix, 0, time.time_ns() // 1_000_000, who, b"")
    pad = b"x" * max(0, size - len(probe))

    def make(i: int) -> bytes:
        now = time.time_ns()
        return template % (now, prefix, i, now // 1_000_000, who, pad)

    return make


def location_maker(id_prefix: str, sender: str, base: int) -> Callable[[int], bytes]:
    """A rider's location fixes, drifting a little each time."""
    template = b'{"t":%d,"id":"%b-%06d","ts":%d,"sender":"%b","lat":%.6f,"lon":%.6f,"accuracy_m":5.0}'
    prefix, who = id_prefix.encode(), sender.encode()
    lat0, lon0 = 30.25 + (base % 100) / 1000, 120.15 + (base // 100) / 1000

    def make(k: int) -> bytes:
        now = time.time_ns()
        return template % (now, prefix, k, now // 1_000_000, who, lat0 + k * 1e-5, lon0 + k * 1e-5)

    return make


def placed_status(order: str, customer: str, ident: str | None = None) -> bytes:
    body = {"id": ident or f"placed-{order}", "ts": int(time.time() * 1000), "sender": "shop", "state": "placed",
            "customer": customer, "items": [{"sku": "rod", "qty": 1}]}
    return json.dumps(body, separators=(",", ":")).encode()


def cid(role: str) -> str:
    return f"bench-{role}-{uuid.uuid4().hex[:8]}"



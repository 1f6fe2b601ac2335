"""Replay throughput: how fast a reconnecting client gets 10,000 missed events back.

Fills a fresh store with ``--events`` events through the real order rules
(:class:`fishim.testing.history.HistoryWriter`: orders from ``placed`` to ``delivered``, chat, picks,
locations, receipts), starts broker + bridge on it (:class:`fishim.testing.stack.Stack`), and measures:

- ``network_events_per_s``: a raw paho client publishes ``{"since": N}`` and receives every page up
  to ``done`` (request → done, broker and bridge included);
- ``client_events_per_s``: the same through :class:`fishim.client.FishimClient` (page parsing,
  dedup, delivery queue), from ``subscribe_orders()`` to ``wait_synced()``;
- ``direct_events_per_s``: ``SyncServer.handle`` alone on the same store, no network: the peer
  figure the network numbers are a ratio of.

Replies use ``"collapse": false`` so every one of the events travels. Prints one JSON line (best of
``--runs``). Usage::

    python scripts/bench_replay.py --events 10000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo's fishim importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fishim.auth import add_user
from fishim.client import FishimClient
from fishim.config import Config
from fishim.store import Store
from fishim.sync import SyncServer
from fishim.testing.history import HistoryWriter, lifecycle
from fishim.testing.mqtt import connect_client, publish_and_wait
from fishim.testing.stack import Stack
from fishim.topics import Topics, parse

log = logging.getLogger("fishim.scripts.bench_replay")

USER, PASSWORD = "bench", "bench-password"  # a staff account: reads every order


def fill(db: Path, events: int) -> None:
    """Exactly ``events`` events: whole order lifecycles, topped up with chat on the last order."""
    rng = random.Random(7)
    with Store(db) as store:
        add_user(store, USER, "staff", PASSWORD)
        writer = HistoryWriter(store)
        clock, n = 1_700_000_000_000, 0
        while store.count_events() < events - 40:
            clock = lifecycle(writer, f"B{n}", clock, rider=rng.choice(["rider7", "rider8"]), fixes=8, rng=rng)
            n += 1
        topics = Topics()
        i = 0
        while store.count_events() < events:
            i += 1
            writer.publish(topics.chat(f"B{n - 1}", "shop"), {"id": f"top-{i}", "ts": clock, "sender": "shop",
                                                              "text": f"note {i}: 路上注意安全"})


def direct_rate(db: Path, runs: int) -> tuple[float, int]:
    server = SyncServer(db, Config())
    ref = parse(Topics().sync_request(USER, "direct"))
    best, count = 0.0, 0
    for _ in range(runs):
        started = time.perf_counter()
        out = server.handle(ref, b'{"since": 0, "collapse": false}')
        elapsed = time.perf_counter() - started
        count = sum(len(json.loads(body)["events"]) for _, body in out)
        best = max(best, count / elapsed)
    server.close()
    return best, count


def network_rate(port: int) -> dict[str, Any]:
    """One sync from 0 over MQTT; returns events/s from publishing the request to the done page."""
    topics = Topics()
    client_id = f"bench-{uuid.uuid4().hex[:8]}"
    done = threading.Event()
    pages: list[bytes] = []
    with connect_client(port, client_id, username=USER, password=PASSWORD) as client:
        def on_page(_c: Any, _u: Any, msg: Any) -> None:
            pages.append(msg.payload)
            if msg.payload.endswith(b"}") and b'"done":true' in msg.payload:
                done.set()

        client.message_callback_add(topics.sync_events(USER, client_id), on_page)
        client.subscribe_and_wait(topics.sync_events(USER, client_id))
        started = time.perf_counter()
        publish_and_wait(client, topics.sync_request(USER, client_id), {"since": 0, "collapse": False})
        if not done.wait(120):
            raise TimeoutError("no done page within 120 s")
        elapsed = time.perf_counter() - started
    events = sum(len(json.loads(p)["events"]) for p in pages)
    return {"events": events, "seconds": elapsed, "pages": len(pages), "bytes": sum(map(len, pages))}


def client_rate(port: int) -> dict[str, Any]:
    """FishimClient from ``subscribe_orders()`` (subscribe + sync from 0) to ``wait_synced()``."""
    with FishimClient("127.0.0.1", port, USER, PASSWORD, backfill_on_assign=False,
                      collapse_locations=False) as client:
        started = time.perf_counter()
        client.subscribe_orders(wait=True, timeout=120)
        elapsed = time.perf_counter() - started
        return {"events": client.stats["queued_replay"], "seconds": elapsed, "stats": dict(client.stats),
                "sync_seconds": client.stats["last_sync_ms"] / 1000}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--kind", choices=["embedded", "mosquitto"], default="embedded",
                        help="broker under the bridge (default: the embedded one)")
    parser.add_argument("--db", type=Path, help="keep the store here (default: a temp dir)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")

    with tempfile.TemporaryDirectory(prefix="fishim-bench-") as tmp:
        db = args.db or Path(tmp) / "bench.db"
        if db.exists():
            raise SystemExit(f"{db} exists; give a new path")
        started = time.perf_counter()
        fill(db, args.events)
        fill_s = time.perf_counter() - started
        direct, direct_events = direct_rate(db, max(args.runs, 5))
        with Stack(db, kind=args.kind, probe=(USER, PASSWORD)) as stack:
            network = [network_rate(stack.port) for _ in range(args.runs)]
            library = [client_rate(stack.port) for _ in range(args.runs)]
            kind = stack.kind
    net_rates = [r["events"] / r["seconds"] for r in network]
    lib_rates = [r["events"] / r["seconds"] for r in library]
    best = max(net_rates)
    result = {
        "bench": "replay", "broker": kind, "events": network[0]["events"], "direct_events": direct_events,
        "pages": network[0]["pages"], "bytes": network[0]["bytes"],
        "network_events_per_s": round(best), "network_median_events_per_s": round(statistics.median(net_rates)),
        "network_seconds": round(min(r["seconds"] for r in network), 3),
        "client_events_per_s": round(max(lib_rates)), "client_events": library[0]["events"],
        "client_sync_only_events_per_s": round(max(r["events"] / r["sync_seconds"] for r in library)),
        "direct_events_per_s": round(direct), "network_to_direct": round(best / direct, 3),
        "fill_seconds": round(fill_s, 1), "runs": args.runs,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

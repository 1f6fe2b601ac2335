"""Section 11, replay-client: a realistic history replayed to a staff member's phone, three ways.

The store is filled through the real order rules (:class:`fishim.testing.history.HistoryWriter`:
orders from ``placed`` to ``delivered``, chat, picks, locations, receipts) with a staff account, and
served by ``fishim up`` (:class:`fishim.testing.stack.Stack`, authenticated). Figures, each from
``{"since": 0, "collapse": false}`` so every event travels:

- ``network``: a paho client publishes the request and reads every page up to ``done``;
- ``client``: :class:`fishim.client.FishimClient` from ``subscribe_orders()`` to synced (page
  parsing, dedup and the delivery queue included);
- ``engine``: ``SyncServer.handle`` alone on the same store, no network: the figure the others are a
  ratio of.
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fishim.bench.procs import progress
from fishim.bench.stacks import Bench
from fishim.bench.stats import fmt, md_table, ratio, summarise, times

USER, PASSWORD = "bench", "bench-password"  # a staff account: reads every order


def fill(db: Path, events: int) -> None:
    """Exactly ``events`` events: whole order lifecycles, topped up with chat on the last order."""
    from fishim.auth import add_user
    from fishim.store import Store
    from fishim.testing.history import HistoryWriter, lifecycle
    from fishim.topics import Topics

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


def engine_run(db: Path) -> dict[str, Any]:
    """The sync engine alone on the store: no network."""
    from fishim.config import Config
    from fishim.sync import SyncServer
    from fishim.topics import Topics, parse

    server = SyncServer(db, Config())
    try:
        started = time.perf_counter()
        pages = server.handle(parse(Topics().sync_request(USER, "direct")), b'{"since": 0, "collapse": false}')
        seconds = time.perf_counter() - started
    finally:
        server.close()
    events = sum(len(json.loads(body)["events"]) for _topic, body in pages)
    return {"events": events, "events_per_s": round(events / seconds, 1)}


def network_run(port: int) -> dict[str, Any]:
    """One sync from 0 over MQTT: events/s from publishing the request to the ``done`` page."""
    from fishim.testing.mqtt import connect_client, publish_and_wait
    from fishim.topics import Topics

    topics = Topics()
    client_id = f"bench-{uuid.uuid4().hex[:8]}"
    done = threading.Event()
    pages: list[bytes] = []
    with connect_client(port, client_id, username=USER, password=PASSWORD) as client:
        def on_page(_c: Any, _u: Any, msg: Any) -> None:
            pages.append(msg.payload)
            if b'"done":true' in msg.payload:
                done.set()

        client.message_callback_add(topics.sync_events(USER, client_id), on_page)
        client.subscribe_and_wait(topics.sync_events(USER, client_id))
        started = time.perf_counter()
        publish_and_wait(client, topics.sync_request(USER, client_id), {"since": 0, "collapse": False})
        if not done.wait(120):
            raise TimeoutError("no done page within 120 s")
        seconds = time.perf_counter() - started
    events = sum(len(json.loads(p)["events"]) for p in pages)
    return {"events": events, "events_per_s": round(events / seconds, 1), "pages": len(pages),
            "bytes": sum(map(len, pages))}


def client_run(port: int) -> dict[str, Any]:
    """FishimClient from ``subscribe_orders()`` (subscribe + sync from 0) until synced."""
    from fishim.client import FishimClient

    with FishimClient("127.0.0.1", port, USER, PASSWORD, backfill_on_assign=False,
                      collapse_locations=False) as client:
        started = time.perf_counter()
        client.subscribe_orders(wait=True, timeout=120)
        seconds = time.perf_counter() - started
        events = client.stats["queued_replay"]
    return {"events": events, "events_per_s": round(events / seconds, 1)}


def section_replay_client(b: Bench) -> dict[str, Any]:
    from fishim.testing.stack import Stack

    db = b.work / "replay-client.db"
    started = time.monotonic()
    fill(db, b.plan.client_events)
    progress(f"replay-client: {b.plan.client_events:,} events through the order rules in "
             f"{time.monotonic() - started:.1f}s")
    engine: list[dict[str, Any]] = []
    network: list[dict[str, Any]] = []
    client: list[dict[str, Any]] = []
    with Stack(db, kind="embedded", probe=(USER, PASSWORD)) as stack:
        for rep in range(b.plan.reps):
            engine.append(engine_run(db))
            network.append(network_run(stack.port))
            client.append(client_run(stack.port))
            progress(f"replay-client rep {rep + 1}: network {network[-1]['events_per_s']:,.0f}/s, FishimClient "
                     f"{client[-1]['events_per_s']:,.0f}/s, engine alone {engine[-1]['events_per_s']:,.0f}/s")
    out: dict[str, Any] = {"stored_events": b.plan.client_events, "reps": b.plan.reps,
           "engine": summarise(engine, "events_per_s", "events"),
           "network": summarise(network, "events_per_s", "events", "pages", "bytes"),
           "client": summarise(client, "events_per_s", "events")}
    out["ratio_network_vs_engine"] = ratio(out["network"]["events_per_s"], out["engine"]["events_per_s"])
    out["ratio_client_vs_engine"] = ratio(out["client"]["events_per_s"], out["engine"]["events_per_s"])
    return out


def render(d: dict[str, Any]) -> list[str]:
    engine = d["engine"]["events_per_s"]
    rows = [[name, fmt(d[key]["events_per_s"], "/s"), fmt(d[key]["events"]),
             times(ratio(d[key]["events_per_s"], engine))]
            for name, key in (("sync engine alone (no network)", "engine"), ("paho, request → done", "network"),
                              ("FishimClient, subscribe → synced", "client"))]
    return [f"### 11. Replay of a realistic history ({d['stored_events']:,} events through the order rules, staff "
            f"account, fishim up), median of {d['reps']}", "",
            *md_table(["path", "events/s", "events", "of the engine alone"], rows), ""]

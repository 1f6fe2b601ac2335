"""Section 10, drain: how fast ``fishim bridge`` stores a backlog Mosquitto queued while it was down.

A backlog is the bridge's hardest case and its cleanest measurement: the bridge subscribes once (so
Mosquitto keeps its persistent session), stops, ``drain_n`` QoS-1 chat messages are queued for it,
then a new ``fishim bridge`` process starts and the rows are watched until all are stored. Figures:
from the process start (interpreter, store and connection included) and from its first stored row to
its last (the drain itself, group commit at work).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Any

from fishim.bench.measure import StoreWatch, run_publisher
from fishim.bench.plan import PREFIX
from fishim.bench.procs import progress
from fishim.bench.stacks import Bench, Endpoint, place_orders
from fishim.bench.stats import fmt, md_table, rate, summarise

ORDERS = [f"drain-{o:02d}" for o in range(50)]


async def drain_run(b: Bench, ep: Endpoint, db: Path, rep: int) -> dict[str, Any]:
    """Queue ``drain_n`` messages for the stopped bridge, then time a new bridge storing them."""
    n, tag = b.plan.drain_n, f"drn{rep}{uuid.uuid4().hex[:4]}"
    topics = [f"{PREFIX}/orders/{o}/chat/c1" for o in ORDERS]
    await run_publisher(b, ep, {"topics": topics, "n": n, "qos": 1, "id_prefix": tag, "sender": "c1"}, [], 0,
                        "drain-queue")
    watch = StoreWatch(db, tag, every=0.01)
    watch.start()
    started = time.time_ns()
    try:
        with b.bridge(ep, db, tag=f"drain{rep}") as bridge:
            moved_at, seen = time.monotonic(), 0
            while watch.count < n and time.monotonic() - moved_at < b.plan.idle_s + 20 and bridge.poll() is None:
                await asyncio.sleep(0.02)
                if watch.count != seen:
                    moved_at, seen = time.monotonic(), watch.count
    finally:
        await watch.stop()
    return {"queued": n, "stored": watch.count, "from_start_per_s": rate(watch.count, started, watch.last_ns),
            "drain_per_s": rate(watch.count, watch.first_ns, watch.last_ns),
            "first_row_s": round((watch.first_ns - started) / 1e9, 2) if watch.first_ns else None}


def section_drain(b: Bench) -> dict[str, Any]:
    if "mosquitto" not in b.brokers:
        return {"skipped": "Mosquitto not found"}
    runs = []
    with b.broker("mosquitto", tag="drain") as ep:
        for rep in range(b.plan.reps):
            db = b.work / f"drain-{rep}.db"
            with b.bridge(ep, db, tag=f"drain{rep}-subscribe") as bridge:  # its session now exists
                asyncio.run(place_orders(ep, db, ORDERS, "c1", bridge))
            run = asyncio.run(drain_run(b, ep, db, rep))
            runs.append(run)
            progress(f"drain rep {rep + 1}: {run['stored']}/{run['queued']} stored, {run['drain_per_s']:,.0f} msg/s "
                     f"({run['from_start_per_s']:,.0f}/s from the bridge's start)")
    return {"queued": b.plan.drain_n, "orders": len(ORDERS), "reps": b.plan.reps,
            **summarise(runs, "drain_per_s", "from_start_per_s", "first_row_s", "stored")}


def render(d: dict[str, Any]) -> list[str]:
    title = "### 10. Bridge drain: a backlog queued on Mosquitto while the bridge was down"
    if "skipped" in d:
        return [title, "", f"Skipped: {d['skipped']}.", ""]
    row = [fmt(d["queued"]), fmt(d["stored"]), fmt(d["drain_per_s"], " msg/s"), fmt(d["from_start_per_s"], " msg/s"),
           fmt(d["first_row_s"], " s", 1)]
    return [f"{title} ({d['orders']} orders, median of {d['reps']})", "",
            *md_table(["queued", "stored", "first row → last row", "from the bridge's start", "first row after"],
                      [row]), ""]

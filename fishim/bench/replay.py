"""Section 4, replay: stored events to a reconnecting client, next to the sync engine alone (no network)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

from fishim.bench.payloads import cid
from fishim.bench.plan import (
    LIVE_BROKERS,
    PREFIX,
    TARGET_REPLAY_PER_S,
)
from fishim.bench.procs import progress
from fishim.bench.stacks import Bench, Live
from fishim.bench.stats import fmt, rate, ratio, summarise, times
from fishim.bench.wire import RawMqtt


async def replay_run(b: Bench, live: Live, user: str, rep: int) -> dict[str, Any]:
    """A reconnecting client asks for everything since 0 and reads pages until ``done``."""
    client_id = f"phone{rep}-{uuid.uuid4().hex[:6]}"
    done = asyncio.Event()
    got = {"events": 0, "pages": 0, "first_ns": 0, "last_ns": 0}

    def on_page(_topic: bytes, payload: bytes, _qos: int, _retain: bool) -> None:
        page = json.loads(payload)
        got["events"] += len(page.get("events", []))
        got["pages"] += 1
        got["last_ns"] = time.time_ns()
        got["first_ns"] = got["first_ns"] or got["last_ns"]
        if page.get("done"):
            done.set()

    client = RawMqtt(cid("replay"), on_page)
    await client.connect(live.ep.host, live.ep.port)
    try:
        await client.subscribe([(f"{PREFIX}/sync/{user}/{client_id}/events", 1)])
        start_ns = time.time_ns()
        await client.publish(f"{PREFIX}/sync/{user}/{client_id}/request".encode(),
                             json.dumps({"since": 0, "collapse": False, "id": f"sync-{client_id}"}).encode(), 1)
        try:
            await asyncio.wait_for(done.wait(), b.plan.run_cap_s)
        except TimeoutError:
            progress(f"  replay-{live.kind}: no done page within {b.plan.run_cap_s:.0f}s ({got['events']} events)")
    finally:
        await client.close()
    return {"events": got["events"], "pages": got["pages"], "complete": done.is_set(),
            "events_per_s": rate(got["events"], start_ns, got["last_ns"]),
            "first_page_ms": round((got["first_ns"] - start_ns) / 1e6, 2) if got["first_ns"] else None}


def direct_replay(db: Path, user: str) -> dict[str, Any]:
    """The sync engine alone on the same store, no network (the replay-client section's peer figure)."""
    from fishim.config import Config
    from fishim.sync import SyncServer
    from fishim.topics import Topics, parse

    server = SyncServer(db, Config())
    try:
        ref = parse(Topics().sync_request(user, "direct"))
        started = time.perf_counter()
        pages = server.handle(ref, b'{"since": 0, "collapse": false}')
        seconds = time.perf_counter() - started
    finally:
        server.close()
    events = sum(len(json.loads(body).get("events", [])) for _topic, body in pages)
    return {"events": events, "events_per_s": round(events / seconds, 1) if seconds > 0 else 0.0}


def live_replay(b: Bench, lives: list[Live]) -> dict[str, Any]:
    """Section 4: replay to a reconnecting client, alternating the stacks, next to the engine alone."""
    plan = b.plan
    runs: dict[str, list[dict[str, Any]]] = {lv.kind: [] for lv in lives}
    direct: list[dict[str, Any]] = []
    for rep in range(plan.reps):
        direct.append(direct_replay(lives[0].db, "replayer"))
        for lv in lives:
            run = asyncio.run(replay_run(b, lv, "replayer", rep))
            runs[lv.kind].append(run)
            progress(f"replay {lv.kind:<9} rep {rep + 1}: {run['events']:,} events, "
                     f"{run['events_per_s']:>9,.0f} events/s (engine alone {direct[-1]['events_per_s']:,.0f}/s)")
    per = {k: summarise(v, "events_per_s", "events", "first_page_ms") for k, v in runs.items()}
    engine = summarise(direct, "events_per_s", "events")
    fishim = per.get("fishim", {}).get("events_per_s")
    peer = per.get("mosquitto", {}).get("events_per_s")
    return {"stored_events": plan.replay_events, "reps": plan.reps, **per, "sync_engine_alone": engine,
            "ratio_fishim_vs_mosquitto": ratio(fishim, peer),
            "ratio_fishim_vs_engine_alone": ratio(fishim, engine["events_per_s"]),
            "target_events_per_s": TARGET_REPLAY_PER_S,
            "meets_target": None if fishim is None else fishim >= TARGET_REPLAY_PER_S}


def render(r: dict[str, Any]) -> list[str]:
    """Section 4's table."""
    lines: list[str] = []
    lines += [f"### 4. Replay: {r['stored_events']:,} stored events to a reconnecting client, median of "
              f"{r['reps']}", "", "| broker | events/s | events | first page after |", "|---|---:|---:|---:|"]
    for kind in LIVE_BROKERS:
        if kind in r:
            lines.append(f"| {kind} | {fmt(r[kind]['events_per_s'], '/s')} | {fmt(r[kind]['events'])} | "
                         f"{fmt(r[kind]['first_page_ms'], ' ms', 1)} |")
    engine = r.get("sync_engine_alone", {})
    lines += ["", f"fishim / Mosquitto: {times(r['ratio_fishim_vs_mosquitto'])}. The sync engine alone on the same "
              f"store (`SyncServer.handle`, no network): {fmt(engine.get('events_per_s'), '/s')}; fishim "
              f"delivers {times(r.get('ratio_fishim_vs_engine_alone'))} of that over MQTT.", ""]
    return lines


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    return [("replay ≥ 20,000 events/s (embedded)", fmt(r.get("fishim", {}).get("events_per_s"), "/s"),
             r["meets_target"])]

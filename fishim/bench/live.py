"""Sections 2-5 and the profile share two stacks: the embedded broker and Mosquitto, each with a bridge."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from fishim.bench.e2e import live_e2e
from fishim.bench.fanin import fanin_orders, live_fanin
from fishim.bench.latency import live_latency
from fishim.bench.procs import progress
from fishim.bench.profile import profile
from fishim.bench.replay import live_replay
from fishim.bench.stacks import Bench, live_stacks, place_orders


def section_live(b: Bench, wanted: set[str]) -> dict[str, Any]:
    """Sections 2 (e2e), 3 (latency), 4 (replay), 5 (fanin) and the profile, on shared stacks.

    Both stacks (embedded broker and Mosquitto, each with a bridge on its own store) stay up throughout
    and every repetition alternates between them; an idle broker and bridge cost next to nothing.
    Replay runs first, while the store holds just the events written for it.
    """
    plan = b.plan
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        lives = live_stacks(b, stack, wanted)
        fan_orders = fanin_orders(plan.fanin_riders) if "fanin" in wanted else []
        for lv in lives:
            lv.bridge = stack.enter_context(b.bridge(lv.ep, lv.db, tag="live"))
        for lv in lives:
            assert lv.bridge is not None
            took = asyncio.run(place_orders(lv.ep, lv.db, ["e2e", "lat", *fan_orders], "c1", lv.bridge))
            progress(f"bridge on {lv.kind} ready, {2 + len(fan_orders)} orders placed in {took:.1f}s")
        for name, section in (("replay", live_replay), ("e2e", live_e2e), ("latency", live_latency),
                              ("fanin", live_fanin)):
            if name in wanted:
                results[name] = section(b, lives)
        if "profile" in wanted:
            e2e = results.get("e2e", {})
            results["profile"] = profile(b, lives, {lv.kind: e2e.get(lv.kind, {}).get("bridge", {}).get(
                "stored_per_s") for lv in lives})
    return results

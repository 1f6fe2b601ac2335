"""Section 2, end to end: messages/s the bridge stores vs one paho subscriber doing nothing, same broker."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from fishim.bench.measure import PahoSink, StoreWatch, run_publisher
from fishim.bench.plan import (
    LIVE_BROKERS,
    PAYLOAD_BYTES,
    PREFIX,
    TARGET_E2E_OVERHEAD,
    TARGET_MOSQUITTO_STORED,
)
from fishim.bench.procs import progress
from fishim.bench.stacks import Bench, Live
from fishim.bench.stats import fmt, ms, rate, ratio, summarise, times

BASELINE_TOPIC = f"{PREFIX}/bench/chat/bench"  # outside the bridge's subscriptions: it stays idle


async def e2e_baseline_run(b: Bench, live: Live, rep: int) -> dict[str, Any]:
    """"No bridge": one paho subscriber gets the same flood on a topic the bridge does not subscribe to.

    The bridge process is up but receives nothing, so it costs nothing; that lets this run sit right
    next to the bridge run of the same repetition, under the same background load.
    """
    n = b.plan.e2e_n
    sink = PahoSink(live.ep, f"{PREFIX}/bench/#", 1)
    try:
        pub = await run_publisher(b, live.ep, {"topics": [BASELINE_TOPIC], "n": n, "qos": 1,
                                               "id_prefix": f"base{rep}", "sender": "bench"},
                                  [lambda: sink.count], n, f"e2e-base-{live.kind}")
    finally:
        sink.close()
    return {"msgs_per_s": rate(sink.count, pub["start_ns"], sink.last_ns), "received": sink.count,
            "sent": pub["sent"], "publisher_per_s": rate(pub["sent"], pub["start_ns"], pub["end_ns"])}


async def e2e_bridge_run(b: Bench, live: Live, tag: str) -> dict[str, Any]:
    """With the bridge: how fast the publisher's messages become committed rows."""
    n = b.plan.e2e_n
    watch = StoreWatch(live.db, tag, every=0.005)
    watch.start()
    try:
        pub = await run_publisher(b, live.ep, {"topics": [f"{PREFIX}/orders/e2e/chat/bench"], "n": n, "qos": 1,
                                               "id_prefix": tag, "sender": "bench"},
                                  [lambda: watch.count], n, f"e2e-{live.kind}")
    finally:
        await watch.stop()
    return {"stored_per_s": rate(watch.count, pub["start_ns"], watch.last_ns), "stored": watch.count,
            "sent": pub["sent"], "publisher_per_s": rate(pub["sent"], pub["start_ns"], pub["end_ns"]),
            "store_visible_ms": ms(watch.visible), "bridge_received_ms": ms(watch.received)}


def live_e2e(b: Bench, lives: list[Live]) -> dict[str, Any]:
    """Section 2: stored/s with the bridge vs a paho subscriber without it, run next to each other."""
    plan = b.plan
    runs: dict[str, list[dict[str, Any]]] = {lv.kind: [] for lv in lives}
    base: dict[str, list[dict[str, Any]]] = {lv.kind: [] for lv in lives}
    for rep in range(plan.reps):
        for lv in lives:
            run = asyncio.run(e2e_baseline_run(b, lv, rep))
            base[lv.kind].append(run)
            progress(f"e2e no-bridge {lv.kind:<9} rep {rep + 1}: paho subscriber "
                     f"{run['msgs_per_s']:>9,.0f} msg/s")
            run = asyncio.run(e2e_bridge_run(b, lv, f"e2e{rep}{uuid.uuid4().hex[:4]}"))
            runs[lv.kind].append(run)
            progress(f"e2e bridge    {lv.kind:<9} rep {rep + 1}: stored {run['stored_per_s']:>9,.0f} msg/s, "
                     f"visible p50/p99 {run['store_visible_ms']['p50']}/{run['store_visible_ms']['p99']} ms")
    out: dict[str, Any] = {"n": plan.e2e_n, "reps": plan.reps, "payload_bytes": PAYLOAD_BYTES}
    for lv in lives:
        with_bridge = summarise(runs[lv.kind], "stored_per_s", "publisher_per_s", "store_visible_ms.p50",
                                 "store_visible_ms.p99", "bridge_received_ms.p50", "bridge_received_ms.p99")
        without = summarise(base[lv.kind], "msgs_per_s", "publisher_per_s")
        fraction = ratio(with_bridge["stored_per_s"], without["msgs_per_s"])
        entry: dict[str, Any] = {"bridge": with_bridge, "no_bridge_paho_subscriber": without,
                                 "stored_vs_subscriber": fraction,
                                 "overhead": None if fraction is None else round(1 - fraction, 3)}
        if lv.kind == "fishim":
            entry["target_overhead_max"] = TARGET_E2E_OVERHEAD
            entry["meets_target"] = None if fraction is None else 1 - fraction <= TARGET_E2E_OVERHEAD
        else:
            entry["target_stored_vs_subscriber_min"] = TARGET_MOSQUITTO_STORED
            entry["meets_target"] = None if fraction is None else fraction >= TARGET_MOSQUITTO_STORED
        out[lv.kind] = entry
    stored = {k: out.get(k, {}).get("bridge", {}).get("stored_per_s") for k in LIVE_BROKERS}
    out["ratio_fishim_vs_mosquitto_stored"] = ratio(stored["fishim"], stored["mosquitto"])
    return out


def render(e: dict[str, Any]) -> list[str]:
    """Section 2's table."""
    lines: list[str] = []
    lines += [f"### 2. End to end with persistence: {e['n']:,} x {e['payload_bytes']} B chat at QoS 1, "
              f"median of {e['reps']}", "",
              "| broker | stored by the bridge | paho subscriber, no bridge | stored / subscriber | overhead "
              "| publish→stored p50 / p99 |",
              "|---|---:|---:|---:|---:|---:|"]
    for kind in LIVE_BROKERS:
        if kind not in e:
            continue
        row, br = e[kind], e[kind]["bridge"]
        lines.append(f"| {kind} | {fmt(br['stored_per_s'], ' msg/s')} | "
                     f"{fmt(row['no_bridge_paho_subscriber']['msgs_per_s'], ' msg/s')} | "
                     f"{fmt(row['stored_vs_subscriber'], '', 2)} | {fmt(row['overhead'], '', 2)} | "
                     f"{fmt(br['store_visible_ms_p50'], '', 1)} / {fmt(br['store_visible_ms_p99'], ' ms', 1)} |")
    lines += ["", "Stored = rows committed, seen by polling SQLite every 5 ms (latencies read up to 5 ms high, "
              "and include queueing behind a max-speed publisher). fishim / Mosquitto stored rate: "
              f"{times(e.get('ratio_fishim_vs_mosquitto_stored'))}.", ""]
    return lines


def targets(e: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    rows = []
    if "fishim" in e:
        rows.append(("bridge overhead on the embedded broker ≤ 10%", fmt(e["fishim"]["overhead"], "", 2),
                     e["fishim"]["meets_target"]))
    if "mosquitto" in e:
        rows.append(("bridge stores ≥ 90% of a subscriber's rate on Mosquitto",
                     fmt(e["mosquitto"]["stored_vs_subscriber"], "", 2), e["mosquitto"]["meets_target"]))
    return rows

"""Section 3: publish -> subscriber (and -> stored) latency at a steady rate with the bridge running."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from fishim.bench.e2e import BASELINE_TOPIC
from fishim.bench.measure import Sink, StoreWatch, run_publisher
from fishim.bench.payloads import cid
from fishim.bench.plan import (
    LIVE_BROKERS,
    PREFIX,
    TARGET_LATENCY_P99_MS,
)
from fishim.bench.procs import progress
from fishim.bench.stacks import Bench, Live
from fishim.bench.stats import fmt, ms, rate, ratio, summarise, times
from fishim.bench.wire import RawMqtt


async def latency_run(b: Bench, live: Live, tag: str, with_store: bool) -> dict[str, Any]:
    """A steady ``latency_rate`` msg/s: publish -> subscriber (and, ``with_store``, -> stored) latency.

    Without the store the messages go to a topic the bridge does not subscribe to (the baseline).
    """
    plan = b.plan
    n = int(plan.latency_rate * plan.latency_s)
    topic = f"{PREFIX}/orders/lat/chat/bench" if with_store else BASELINE_TOPIC
    sink = Sink(n, latency=True)
    sub = RawMqtt(cid("sub"), sink)
    await sub.connect(live.ep.host, live.ep.port)
    watch = StoreWatch(live.db, tag, every=0.002) if with_store else None
    try:
        await sub.subscribe([(topic, 1)])
        if watch is not None:
            watch.start()
        counters: list[Callable[[], int]] = [lambda: sink.count]
        if watch is not None:
            counters.append(lambda: watch.count)
        pub = await run_publisher(b, live.ep, {"topics": [topic], "n": n, "qos": 1, "rate": plan.latency_rate,
                                               "id_prefix": tag, "sender": "bench"}, counters, n,
                                  f"latency-{live.kind}")
    finally:
        if watch is not None:
            await watch.stop()
        await sub.close()
    out = {"sent": pub["sent"], "received": sink.count,
           "achieved_rate": rate(pub["sent"], pub["start_ns"], pub["sent_ns"]), "subscriber_ms": ms(sink.latencies)}
    if watch is not None:
        out["stored"] = watch.count
        out["store_visible_ms"] = ms(watch.visible)
    return out


def live_latency(b: Bench, lives: list[Live]) -> dict[str, Any]:
    """Section 3: latency at a steady rate with the bridge (and, in full mode, without)."""
    plan = b.plan
    runs: dict[str, list[dict[str, Any]]] = {lv.kind: [] for lv in lives}
    lat_base: dict[str, list[dict[str, Any]]] = {lv.kind: [] for lv in lives}
    for rep in range(plan.reps):
        for lv in lives:
            if plan.latency_baseline:
                run = asyncio.run(latency_run(b, lv, f"latb{rep}", with_store=False))
                lat_base[lv.kind].append(run)
                progress(f"latency no-bridge {lv.kind:<9} rep {rep + 1}: subscriber p50/p99 "
                         f"{run['subscriber_ms']['p50']}/{run['subscriber_ms']['p99']} ms")
            run = asyncio.run(latency_run(b, lv, f"lat{rep}{uuid.uuid4().hex[:4]}", with_store=True))
            runs[lv.kind].append(run)
            progress(f"latency bridge    {lv.kind:<9} rep {rep + 1}: subscriber p50/p99 "
                     f"{run['subscriber_ms']['p50']}/{run['subscriber_ms']['p99']} ms, stored p99 "
                     f"{run['store_visible_ms']['p99']} ms")
    out: dict[str, Any] = {"rate": plan.latency_rate, "seconds": plan.latency_s, "reps": plan.reps}
    for lv in lives:
        entry: dict[str, Any] = {"bridge": summarise(runs[lv.kind], "subscriber_ms.p50", "subscriber_ms.p99",
                                      "store_visible_ms.p50", "store_visible_ms.p99", "achieved_rate")}
        if lat_base[lv.kind]:
            entry["no_bridge"] = summarise(lat_base[lv.kind], "subscriber_ms.p50", "subscriber_ms.p99")
        out[lv.kind] = entry
    p99 = {k: out.get(k, {}).get("bridge", {}).get("subscriber_ms_p99") for k in LIVE_BROKERS}
    fishim_p99 = p99["fishim"]
    out["ratio_p99_fishim_vs_mosquitto"] = ratio(fishim_p99, p99["mosquitto"])
    out["target_p99_ms_max"] = TARGET_LATENCY_P99_MS
    out["meets_target"] = None if fishim_p99 is None else fishim_p99 <= TARGET_LATENCY_P99_MS
    return out


def render(lt: dict[str, Any]) -> list[str]:
    """Section 3's table."""
    lines: list[str] = []
    lines += [f"### 3. Latency at a steady {lt['rate']:,} msg/s with the bridge running ({lt['seconds']:g} s, "
              f"median of {lt['reps']})", "",
              "| broker | publish→subscriber p50 | p99 | publish→stored p50 | p99 | no bridge p50 / p99 |",
              "|---|---:|---:|---:|---:|---:|"]
    for kind in LIVE_BROKERS:
        if kind not in lt:
            continue
        br, nb = lt[kind]["bridge"], lt[kind].get("no_bridge")
        base = (f"{fmt(nb['subscriber_ms_p50'], '', 2)} / {fmt(nb['subscriber_ms_p99'], ' ms', 2)}"
                if nb else "not run")
        lines.append(f"| {kind} | {fmt(br['subscriber_ms_p50'], ' ms', 2)} | "
                     f"{fmt(br['subscriber_ms_p99'], ' ms', 2)} | {fmt(br['store_visible_ms_p50'], ' ms', 1)} | "
                     f"{fmt(br['store_visible_ms_p99'], ' ms', 1)} | {base} |")
    lines += ["", f"p99 fishim / Mosquitto: {times(lt['ratio_p99_fishim_vs_mosquitto'])}. Stored latency polls "
              "SQLite every 2 ms.", ""]
    return lines


def targets(lt: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    p99 = lt.get("fishim", {}).get("bridge", {}).get("subscriber_ms_p99")
    return [("p99 ≤ 5 ms at 1,000 msg/s with the bridge (embedded)", fmt(p99, " ms", 2), lt["meets_target"])]

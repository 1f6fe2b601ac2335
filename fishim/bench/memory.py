"""Section 6, memory: bridge RSS over a big history vs a small one; it must not grow with history."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from fishim.bench.measure import StoreWatch, run_publisher
from fishim.bench.plan import (
    PREFIX,
    TARGET_MEMORY_GROWTH,
)
from fishim.bench.procs import Sampler, memory_kb, progress
from fishim.bench.stacks import Bench, Endpoint, ensure_stored, fill_store
from fishim.bench.stats import fmt, ratio, summarise, times


async def memory_push(b: Bench, ep: Endpoint, db: Path, bridge: subprocess.Popen[bytes], rep: int,
                      orders: int) -> dict[str, Any]:
    """Readiness probe, then ``memory_push`` chat messages through the bridge; its RSS all along."""
    sampler = Sampler({"bridge": bridge.pid}, every=0.05)
    sampler.start()
    probe_id = f"probe{rep}-{uuid.uuid4().hex[:6]}"
    probe = json.dumps({"id": probe_id, "ts": int(time.time() * 1000), "sender": "memc", "text": "probe"}).encode()
    ready_s = await ensure_stored(ep, db, [(f"{PREFIX}/orders/mem-00000/chat/memc", probe, False)], [probe_id], bridge)
    idle_kb = memory_kb(bridge.pid)
    tag = f"mem{rep}{uuid.uuid4().hex[:4]}"
    watch = StoreWatch(db, tag, every=0.02)
    watch.start()
    n = b.plan.memory_push
    topics = [f"{PREFIX}/orders/mem-{i:05d}/chat/memc" for i in range(0, orders, 37)]  # placed orders only
    try:
        await run_publisher(b, ep, {"topics": topics, "n": n, "qos": 1, "id_prefix": tag, "sender": "memc"},
                            [lambda: watch.count], n, "memory")
    finally:
        await watch.stop()
        usage = (await sampler.stop())["bridge"]
    rss, hwm = memory_kb(bridge.pid), memory_kb(bridge.pid, "VmHWM")
    return {"ready_s": round(ready_s, 2), "stored": watch.count,
            "rss_idle_mib": None if idle_kb is None else round(idle_kb / 1024, 1),
            "rss_mib": None if rss is None else round(rss / 1024, 1),
            "peak_rss_mib": usage["rss_max_mib"],  # sampled every 50 ms from start
            "hwm_mib": None if hwm is None else round(hwm / 1024, 1)}


def section_memory(b: Bench) -> dict[str, Any]:
    """Bridge RSS on a small and a big history; one broker (on a store of its own) serves both."""
    plan = b.plan
    out: dict[str, Any] = {"pushed": plan.memory_push, "reps": plan.reps}
    with b.broker("fishim", b.work / "memory-broker.db", tag="mem") as ep:
        for label, size in (("small", plan.memory_small), ("big", plan.memory_big)):
            db = b.work / f"memory-{label}.db"
            orders = min(1000, size)  # fill_store places one order per event at most
            took = fill_store(db, size, orders=orders, customer="memc", prefix="mem")
            size_mib = sum(p.stat().st_size for p in db.parent.glob(db.name + "*")) / 2**20
            progress(f"memory: {size:,} events written in {took:.1f}s ({size_mib:,.0f} MiB)")
            runs = []
            for rep in range(plan.reps):
                with b.bridge(ep, db, tag=f"mem-{label}") as bridge:
                    run = asyncio.run(memory_push(b, ep, db, bridge, rep, orders))
                runs.append(run)
                progress(f"memory {label:<5} ({size:>9,} events) rep {rep + 1}: bridge RSS {run['rss_mib']} MiB "
                         f"(peak {run['peak_rss_mib']}, idle {run['rss_idle_mib']}), ready in {run['ready_s']}s")
            out[label] = {"events": size, "store_mib": round(size_mib, 1),
                          **summarise(runs, "rss_mib", "peak_rss_mib", "hwm_mib", "rss_idle_mib", "ready_s")}
            for path in db.parent.glob(db.name + "*"):
                path.unlink(missing_ok=True)
    out["ratio_big_vs_small_rss"] = ratio(out["big"]["rss_mib"], out["small"]["rss_mib"])
    out["ratio_big_vs_small_peak"] = ratio(out["big"]["peak_rss_mib"], out["small"]["peak_rss_mib"])
    out["target_growth_max"] = TARGET_MEMORY_GROWTH
    ratios = [r for r in (out["ratio_big_vs_small_rss"], out["ratio_big_vs_small_peak"]) if r is not None]
    out["meets_target"] = max(ratios) - 1 <= TARGET_MEMORY_GROWTH if ratios else None
    return out


def render(mm: dict[str, Any]) -> list[str]:
    """Section 6's table."""
    lines: list[str] = []
    lines += [f"### 6. Bridge memory against history ({mm['pushed']:,} messages pushed, median of {mm['reps']})",
              "", "| stored events | store size | bridge RSS idle | after push | peak | ready after |",
              "|---:|---:|---:|---:|---:|---:|"]
    for label in ("small", "big"):
        s = mm[label]
        lines.append(f"| {s['events']:,} | {fmt(s['store_mib'], ' MiB')} | {fmt(s['rss_idle_mib'], ' MiB', 1)} | "
                     f"{fmt(s['rss_mib'], ' MiB', 1)} | {fmt(s['peak_rss_mib'], ' MiB', 1)} | "
                     f"{fmt(s['ready_s'], ' s', 1)} |")
    lines += ["", f"Big / small: RSS {times(mm['ratio_big_vs_small_rss'])}, "
              f"peak {times(mm['ratio_big_vs_small_peak'])}.", ""]
    return lines


def targets(mm: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    return [("bridge RSS does not grow with history (≤ +10%, steady and peak)",
             f"{times(mm['ratio_big_vs_small_rss'])} / {times(mm['ratio_big_vs_small_peak'])}", mm["meets_target"])]

"""Section 5, fan-in: many riders each sending a location fix a second; delivered share, latency, CPU, RSS."""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any

from fishim.bench.measure import Sink, StoreWatch
from fishim.bench.payloads import cid
from fishim.bench.plan import (
    LIVE_BROKERS,
    PREFIX,
)
from fishim.bench.procs import Sampler, progress
from fishim.bench.stacks import Bench, Live
from fishim.bench.stats import fmt, ms, ratio, summarise, times
from fishim.bench.wire import RawMqtt
from fishim.bench.worker import Worker


async def _gather(*coros: Any) -> list[Any]:
    return list(await asyncio.gather(*coros))


def fanin_orders(n: int) -> list[str]:
    return [f"fan-{i:04d}" for i in range(n)]


async def fanin_run(b: Bench, live: Live, rep: int) -> dict[str, Any]:
    """Riders send a fix a second; a dashboard subscriber and the bridge take them all in."""
    plan = b.plan
    assert live.bridge is not None
    orders = fanin_orders(plan.fanin_riders)
    tag = f"fan{rep}{uuid.uuid4().hex[:4]}"
    start_ns = time.time_ns()
    sink = Sink(0, latency=True, since_ns=start_ns)
    dashboard = RawMqtt(cid("dash"), sink, max_inflight=1000)
    await dashboard.connect(live.ep.host, live.ep.port)
    watch = StoreWatch(live.db, tag, every=0.05)
    workers: list[Worker] = []
    try:
        await dashboard.subscribe([(f"{PREFIX}/orders/+/location", 1)])
        riders = [[f"{tag}-r{i:04d}", order, f"rider{i:04d}"] for i, order in enumerate(orders)]
        per = math.ceil(len(riders) / plan.fanin_procs)
        jobs = [{"kind": "riders", "host": live.ep.host, "port": live.ep.port, "riders": riders[p * per:(p + 1) * per],
                 "qos": 1, "retain": True, "interval": 1.0, "duration": plan.fanin_s, "prefix": PREFIX,
                 "id_prefix": f"{tag}p{p}"} for p in range(plan.fanin_procs)]
        workers += [Worker(f"riders-{live.kind}-{p}", b.log(f"worker-riders-{live.kind}")) for p in range(len(jobs))]
        connected = sum([(await w.prepare(job))["connected"] for w, job in zip(workers, jobs, strict=True)])
        sampler = Sampler({"broker": live.ep.pid, "bridge": live.bridge.pid})
        sampler.start()
        watch.start()
        for w in workers:
            w.go()
        results = [await w.result(plan.fanin_s + 60) for w in workers]
        sent = sum(r["sent"] for r in results)
        deadline = time.monotonic() + plan.idle_s  # stragglers: wait for the dashboard and the store
        while time.monotonic() < deadline and (sink.count < sent or watch.count < sent):
            await asyncio.sleep(0.05)
        usage = await sampler.stop()
    finally:
        for w in workers:
            w.close()
        await watch.stop()
        await dashboard.close()
    return {"riders": len(riders), "connected": connected, "sent": sent,
            "acked": sum(r["acked"] for r in results), "disconnected": sum(r["disconnected"] for r in results),
            "delivered": sink.count, "delivered_ratio": round(sink.count / max(sent, 1), 4),
            "stored": watch.count, "stored_ratio": round(watch.count / max(sent, 1), 4),
            "latency_ms": ms(sink.latencies), "store_visible_ms": ms(watch.visible),
            "broker_cpu_percent": usage["broker"]["cpu_percent"], "broker_rss_mib": usage["broker"]["rss_max_mib"],
            "bridge_cpu_percent": usage["bridge"]["cpu_percent"], "bridge_rss_mib": usage["bridge"]["rss_max_mib"]}


def live_fanin(b: Bench, lives: list[Live]) -> dict[str, Any]:
    """Section 5: many riders at once; both stacks at the same time in quick mode."""
    plan = b.plan
    runs: dict[str, list[dict[str, Any]]] = {lv.kind: [] for lv in lives}
    for rep in range(plan.fanin_reps):
        if plan.fanin_parallel:  # light load: both stacks at once, to save wall time
            together = asyncio.run(_gather(*(fanin_run(b, lv, rep) for lv in lives)))
        else:
            together = [asyncio.run(fanin_run(b, lv, rep)) for lv in lives]
        for lv, run in zip(lives, together, strict=True):
            runs[lv.kind].append(run)
            progress(f"fan-in {lv.kind:<9} rep {rep + 1}: {run['connected']}/{run['riders']} riders, "
                     f"delivered {run['delivered_ratio']:.3f}, stored {run['stored_ratio']:.3f}, p99 "
                     f"{run['latency_ms']['p99']} ms, broker CPU {run['broker_cpu_percent']}% "
                     f"RSS {run['broker_rss_mib']} MiB")
    out: dict[str, Any] = {"riders": plan.fanin_riders, "seconds": plan.fanin_s, "reps": plan.fanin_reps,
                           "fix_interval_s": 1.0, "qos": 1, "retain": True, "stacks_at_once": plan.fanin_parallel}
    for lv in lives:
        out[lv.kind] = summarise(runs[lv.kind], "delivered_ratio", "stored_ratio", "latency_ms.p50",
                                  "latency_ms.p99", "broker_cpu_percent", "broker_rss_mib",
                                  "bridge_cpu_percent", "bridge_rss_mib")
    fishim, mosq = out.get("fishim", {}), out.get("mosquitto", {})
    out["ratio_p99_fishim_vs_mosquitto"] = ratio(fishim.get("latency_ms_p99"), mosq.get("latency_ms_p99"))
    out["ratio_cpu_fishim_vs_mosquitto"] = ratio(fishim.get("broker_cpu_percent"),
                                                 mosq.get("broker_cpu_percent"))
    return out


def render(f: dict[str, Any]) -> list[str]:
    """Section 5's table."""
    lines: list[str] = []
    lines += [f"### 5. Fan-in: {f['riders']} riders x 1 location fix/s x {f['seconds']:g} s (QoS 1, retained), "
              f"median of {f['reps']}", "",
              "| broker | delivered | stored | p50 | p99 | broker CPU | broker RSS | bridge CPU | bridge RSS |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in LIVE_BROKERS:
        if kind in f:
            k = f[kind]
            lines.append(f"| {kind} | {fmt(k['delivered_ratio'], '', 3)} | {fmt(k['stored_ratio'], '', 3)} | "
                         f"{fmt(k['latency_ms_p50'], ' ms', 1)} | {fmt(k['latency_ms_p99'], ' ms', 1)} | "
                         f"{fmt(k['broker_cpu_percent'], '%')} | {fmt(k['broker_rss_mib'], ' MiB')} | "
                         f"{fmt(k['bridge_cpu_percent'], '%')} | {fmt(k['bridge_rss_mib'], ' MiB')} |")
    lines += ["", f"Latency is rider → a dashboard subscribed to `fishim/orders/+/location`. CPU is % of one core. "
              f"p99 fishim / Mosquitto: {times(f['ratio_p99_fishim_vs_mosquitto'])}; broker CPU fishim / "
              f"Mosquitto: {times(f['ratio_cpu_fishim_vs_mosquitto'])}.", ""]
    return lines

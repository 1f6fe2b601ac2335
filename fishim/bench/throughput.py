"""Section 1, broker throughput: 1 publisher -> 1 subscriber, QoS 0 and 1, fishim vs stock amqtt vs Mosquitto.

Runs interleave the brokers, so a neighbour's load hits all of them alike."""

from __future__ import annotations

import asyncio
from typing import Any

from fishim.bench.measure import Sink, run_publisher
from fishim.bench.payloads import cid
from fishim.bench.plan import (
    BROKERS,
    HOST,
    PAYLOAD_BYTES,
    PREFIX,
)
from fishim.bench.procs import progress
from fishim.bench.stacks import Bench, Endpoint
from fishim.bench.stats import fmt, median_of, rate, ratio, times
from fishim.bench.wire import RawMqtt


async def throughput_run(b: Bench, ep: Endpoint, n: int, qos: int) -> dict[str, Any]:
    topic = f"{PREFIX}/orders/tput/chat/bench"
    sink = Sink(n)
    sub = RawMqtt(cid("sub"), sink)
    await sub.connect(ep.host, ep.port)
    try:
        await sub.subscribe([(topic, qos)])
        pub = await run_publisher(b, ep, {"topics": [topic], "n": n, "qos": qos, "id_prefix": "tput",
                                          "sender": "bench"}, [lambda: sink.count], n, f"tput-{ep.kind}-q{qos}")
    finally:
        await sub.close()
    return {"msgs_per_s": rate(sink.count, pub["start_ns"], sink.last_ns), "sent": pub["sent"],
            "received": sink.count, "delivered": round(sink.count / max(pub["sent"], 1), 4),
            "publisher_per_s": rate(pub["sent"], pub["start_ns"], pub["end_ns"])}


def section_throughput(b: Bench) -> dict[str, Any]:
    plan = b.plan
    kinds = [k for k in BROKERS if k in b.brokers]
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {(k, q): [] for k in kinds for q in (0, 1)}
    with b.brokers_up([(k, None, "tput") for k in kinds]) as endpoints:
        eps = dict(zip(kinds, endpoints, strict=True))
        for spec in b.peers:  # already running: measured alike, started and stopped by someone else
            host, _, port = spec.rpartition(":")
            eps[spec] = Endpoint(spec, host or HOST, int(port), 0)
        kinds += b.peers
        runs.update({(k, q): [] for k in b.peers for q in (0, 1)})
        for ep in eps.values():  # warm-up, not counted: first connections, imports, caches
            asyncio.run(throughput_run(b, ep, max(100, plan.tput_n // 10), 1))
        for rep in range(plan.reps):
            for qos in (0, 1):
                for k, ep in eps.items():  # interleaved, so background load hits every broker alike
                    run = asyncio.run(throughput_run(b, ep, plan.tput_n, qos))
                    runs[(k, qos)].append(run)
                    progress(f"throughput {k:<9} qos{qos} rep {rep + 1}/{plan.reps}: {run['msgs_per_s']:>9,.0f} msg/s"
                             f" ({run['received']}/{run['sent']})")
    out: dict[str, Any] = {"n": plan.tput_n, "payload_bytes": PAYLOAD_BYTES, "reps": plan.reps, "brokers": kinds}
    for qos in (0, 1):
        per = {k: {"median_msgs_per_s": median_of(runs[(k, qos)], "msgs_per_s"),
                   "min_delivered": min(r["delivered"] for r in runs[(k, qos)]),
                   "runs": [r["msgs_per_s"] for r in runs[(k, qos)]]} for k in kinds}
        fishim = per.get("fishim", {}).get("median_msgs_per_s")
        out[f"qos{qos}"] = {
            **per,
            "ratio_fishim_vs_amqtt": ratio(fishim, per.get("amqtt", {}).get("median_msgs_per_s")),
            "ratio_fishim_vs_mosquitto": ratio(fishim, per.get("mosquitto", {}).get("median_msgs_per_s")),
        }
    return out


def render(t: dict[str, Any]) -> list[str]:
    """Section 1's table."""
    lines: list[str] = []
    lines += [f"### 1. Broker throughput: 1 publisher → 1 subscriber, {t['payload_bytes']} B, "
              f"{t['n']:,} messages, median of {t['reps']}", "",
              "| QoS | fishim embedded | stock amqtt | Mosquitto | fishim / amqtt | fishim / Mosquitto |",
              "|---|---:|---:|---:|---:|---:|"]
    for qos in (0, 1):
        q = t[f"qos{qos}"]
        cells = [fmt(q.get(k, {}).get("median_msgs_per_s"), " msg/s") for k in BROKERS]
        lines.append(f"| {qos} | {' | '.join(cells)} | {times(q['ratio_fishim_vs_amqtt'])} | "
                     f"{times(q['ratio_fishim_vs_mosquitto'])} |")
    for spec in (k for k in t["brokers"] if k not in BROKERS):
        rates = ", ".join(f"QoS {q} {fmt(t[f'qos{q}'][spec]['median_msgs_per_s'], ' msg/s')}" for q in (0, 1))
        lines += ["", f"Already running broker `{spec}` (`--peer`): {rates}."]
    lost = [f"{k} QoS {qos}: {t[f'qos{qos}'][k]['min_delivered']:.1%}" for qos in (0, 1) for k in t["brokers"]
            if t[f"qos{qos}"][k]["min_delivered"] < 1]
    lines += ["", f"Lowest delivered share in a run: {', '.join(lost)}." if lost else
              "Every run delivered every message.", ""]
    return lines

"""Sections 7-9: what ``fishim up`` promises, measured black-box on a real ``fishim up`` process.

- ``durable``: QoS-1 publishes flat out (100 in flight); the rate counts a message once it is both
  PUBACKed and stored (rows seen by polling SQLite every 5 ms). The publisher checks, every 0.25 s
  and when its last PUBACK is in, that every message PUBACKed so far is already a row in the SQLite
  store (it reads the ack count first, then the rows). At the end every row is counted. Peer:
  Mosquitto + ``fishim bridge`` (Mosquitto PUBACKs on receipt; the bridge's rows come later).
  Target: ``up`` >= 1.0x the peer.
- ``durable-latency``: a steady 1,000 msg/s on ``fishim up``: publish -> PUBACK (the publisher's own
  clock) and publish -> a live subscriber. Target: p99 <= 5 ms each.
- ``synchronous``: the ``durable`` run on ``fishim up`` for each ``store.synchronous`` setting
  (OFF, NORMAL, FULL, EXTRA); all four stacks are up at once and the runs alternate between them.

``fishim up`` runs with a broker.yaml of its own in the run's scratch directory, on a free loopback
port; it is ready once a ``placed`` order published to it is in its store, whether the broker stores
itself or through a child bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fishim.bench.measure import Sink, StoreWatch, run_publisher
from fishim.bench.payloads import cid
from fishim.bench.plan import HOST, PREFIX, TARGET_DURABLE_P99_MS, TARGET_DURABLE_RATIO
from fishim.bench.procs import log_tail, progress, spawn, stop
from fishim.bench.stacks import Bench, Endpoint, connect_ro, place_orders
from fishim.bench.stats import fmt, md_table, ms, rate, ratio, summarise, times
from fishim.bench.wire import RawMqtt
from fishim.testing import free_port, wait_for_port

UP_KINDS = ("up", "mosquitto")  # fishim up, and its peer: Mosquitto + fishim bridge
SYNC_SETTINGS = ("OFF", "NORMAL", "FULL", "EXTRA")
DURABLE_ORDER, LATENCY_ORDER = "dur", "durlat"


@dataclass
class UpStack:
    """A broker that stores: ``fishim up``, or Mosquitto with ``fishim bridge`` beside it."""

    kind: str  # up | mosquitto
    ep: Endpoint
    db: Path
    proc: subprocess.Popen[bytes]  # the process that writes the store (fishim up, or the bridge)
    label: str = ""


def synchronous_support() -> tuple[bool, str | None]:
    """Whether this fishim has ``store.synchronous``, and its default."""
    from fishim.config import StoreConfig

    field = StoreConfig.model_fields.get("synchronous")
    return (field is not None, None if field is None else str(field.default))


def write_up_config(b: Bench, name: str, port: int, db: Path, synchronous: str | None) -> Path:
    """broker.yaml for one ``fishim up``: fishim's defaults, loopback listener, the bench's queue bound."""
    store: dict[str, Any] = {"path": str(db)}
    if synchronous is not None:
        store["synchronous"] = synchronous
    data = {"listeners": [{"name": "default", "type": "tcp", "bind": f"{HOST}:{port}"}], "store": store,
            "limits": {"max_queued": 100_000}}
    path = b.work / f"{name}.yaml"
    path.write_text("# fishim bench: a fishim up of its own\n" + yaml.safe_dump(data, sort_keys=False))
    return path


@contextlib.contextmanager
def fishim_up(b: Bench, tag: str, synchronous: str | None = None) -> Iterator[UpStack]:
    """``python -m fishim -c <own broker.yaml> up`` on a free port and its own store; stopped after."""
    name = f"up-{tag}"
    port, db = free_port(), b.work / f"{name}.db"
    config = write_up_config(b, name, port, db, synchronous)
    proc = spawn([sys.executable, "-m", "fishim", "-c", str(config), "up"], name, b.log(name), cwd=b.work)
    try:
        try:
            wait_for_port(port, timeout=60.0, proc=proc)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{name} did not start: {exc}\n{log_tail(b.log(name))}") from None
        yield UpStack("up", Endpoint("fishim-up", HOST, port, proc.pid), db, proc, synchronous or "")
    finally:
        stop(proc, timeout=30.0)


@contextlib.contextmanager
def mosquitto_bridge(b: Bench, tag: str) -> Iterator[UpStack]:
    """Mosquitto and ``fishim bridge`` on a store of its own."""
    db = b.work / f"mosquitto-{tag}.db"
    with b.broker("mosquitto", db, tag=tag) as ep, b.bridge(ep, db, tag=tag) as bridge:
        yield UpStack("mosquitto", ep, db, bridge)


async def ready(stack: UpStack) -> float:
    """Place the orders the runs publish on; returns once they are stored (seconds)."""
    return await place_orders(stack.ep, stack.db, [DURABLE_ORDER, LATENCY_ORDER], "c1", stack.proc)


def count_rows(db: Path, id_prefix: str) -> int:
    """Rows of one run in the store (its ids all start with ``id_prefix-``)."""
    conn = connect_ro(db)
    try:
        sql = "SELECT count(*) FROM events WHERE id >= ? AND id < ?"
        return int(conn.execute(sql, (f"{id_prefix}-", f"{id_prefix}.")).fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


async def durable_run(b: Bench, stack: UpStack, tag: str) -> dict[str, Any]:
    """Flat-out QoS-1 publishing; the rate of messages both PUBACKed and stored."""
    n = b.plan.e2e_n
    watch = StoreWatch(stack.db, tag, every=0.005)
    watch.start()
    try:
        pub = await run_publisher(b, stack.ep, {"topics": [f"{PREFIX}/orders/{DURABLE_ORDER}/chat/bench"], "n": n,
                                                "qos": 1, "id_prefix": tag, "sender": "bench",
                                                "store": str(stack.db)},
                                  [lambda: watch.count], n, f"durable-{stack.kind}{stack.label}")
    finally:
        await watch.stop()
    stored = count_rows(stack.db, tag)
    durable_at_ack = pub["acked_not_stored_max"] == 0 and pub["stored_when_acked"] >= pub["acked"]
    # A message is durable from the later of its PUBACK and its row (the row seen by a 5 ms poll).
    end_ns = max(pub["last_ack_ns"], watch.last_ns)
    return {"sent": pub["sent"], "acked": pub["acked"], "stored": stored, "all_stored": stored == pub["acked"] == n,
            "stored_when_last_acked": pub["stored_when_acked"], "acked_not_stored_max": pub["acked_not_stored_max"],
            "pubacked_implies_stored": durable_at_ack, "store_checks": pub["store_checks"],
            "durable_per_s": round(min(stored, pub["acked"]) / max((end_ns - pub["start_ns"]) / 1e9, 1e-9), 1),
            "acked_per_s": round(pub["acked"] / max((pub["last_ack_ns"] - pub["start_ns"]) / 1e9, 1e-9), 1)}


async def latency_run(b: Bench, stack: UpStack, tag: str) -> dict[str, Any]:
    """A steady ``latency_rate`` msg/s: publish -> PUBACK and publish -> a live subscriber."""
    plan = b.plan
    n = int(plan.latency_rate * plan.latency_s)
    topic = f"{PREFIX}/orders/{LATENCY_ORDER}/chat/bench"
    sink = Sink(n, latency=True)
    sub = RawMqtt(cid("sub"), sink)
    await sub.connect(stack.ep.host, stack.ep.port)
    try:
        await sub.subscribe([(topic, 1)])
        pub = await run_publisher(b, stack.ep, {"topics": [topic], "n": n, "qos": 1, "rate": plan.latency_rate,
                                                "id_prefix": tag, "sender": "bench", "track_acks": True},
                                  [lambda: sink.count], n, f"durable-latency-{stack.kind}")
    finally:
        await sub.close()
    return {"sent": pub["sent"], "acked": pub["acked"], "received": sink.count,
            "achieved_rate": rate(pub["sent"], pub["start_ns"], pub["sent_ns"]),
            "puback_ms": pub.get("puback_ms"), "subscriber_ms": ms(sink.latencies)}


def _tag(prefix: str, rep: int) -> str:
    return f"{prefix}{rep}{uuid.uuid4().hex[:4]}"


def section_up(b: Bench, wanted: set[str]) -> dict[str, Any]:
    """``durable`` and ``durable-latency`` on one ``fishim up`` and one Mosquitto + bridge, alternating."""
    kinds = [k for k in UP_KINDS if k == "up" or k in b.brokers]
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        stacks = [stack.enter_context(fishim_up(b, "dur") if k == "up" else mosquitto_bridge(b, "dur"))
                  for k in kinds]
        for st in stacks:
            took = asyncio.run(ready(st))
            progress(f"{st.kind} ready (orders stored) in {took:.1f}s")
        if "durable" in wanted:
            results["durable"] = _durable(b, stacks)
        if "durable-latency" in wanted:
            results["durable-latency"] = _latency(b, stacks)
    return results


def _durable(b: Bench, stacks: list[UpStack]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {st.kind: [] for st in stacks}
    for rep in range(b.plan.reps):
        for st in stacks:
            run = asyncio.run(durable_run(b, st, _tag("dur", rep)))
            runs[st.kind].append(run)
            progress(f"durable {st.kind:<9} rep {rep + 1}: {run['durable_per_s']:>9,.0f} msg/s durable, "
                     f"{run['stored']}/{run['acked']} stored, most PUBACKed-not-stored {run['acked_not_stored_max']}")
    out: dict[str, Any] = {"n": b.plan.e2e_n, "reps": b.plan.reps}
    for kind, kind_runs in runs.items():
        out[kind] = {**summarise(kind_runs, "durable_per_s", "acked_per_s", "acked_not_stored_max"),
                     "all_stored": all(r["all_stored"] for r in kind_runs),
                     "pubacked_implies_stored": all(r["pubacked_implies_stored"] for r in kind_runs)}
    ratio_up = ratio(out.get("up", {}).get("durable_per_s"), out.get("mosquitto", {}).get("durable_per_s"))
    out["ratio_up_vs_mosquitto_bridge"] = ratio_up
    out["target_ratio_min"] = TARGET_DURABLE_RATIO
    out["meets_target"] = None if ratio_up is None else ratio_up >= TARGET_DURABLE_RATIO
    return out


def _latency(b: Bench, stacks: list[UpStack]) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {st.kind: [] for st in stacks}
    for rep in range(b.plan.reps):
        for st in stacks:
            run = asyncio.run(latency_run(b, st, _tag("dlat", rep)))
            runs[st.kind].append(run)
            progress(f"durable latency {st.kind:<9} rep {rep + 1}: PUBACK p99 {(run['puback_ms'] or {}).get('p99')} ms,"
                     f" subscriber p99 {run['subscriber_ms']['p99']} ms")
    out: dict[str, Any] = {"rate": b.plan.latency_rate, "seconds": b.plan.latency_s, "reps": b.plan.reps}
    for kind, kind_runs in runs.items():
        out[kind] = summarise(kind_runs, "puback_ms.p50", "puback_ms.p99", "subscriber_ms.p50", "subscriber_ms.p99",
                              "achieved_rate")
    up = out.get("up", {})
    worst = max((v for v in (up.get("puback_ms_p99"), up.get("subscriber_ms_p99")) if v is not None), default=None)
    out["target_p99_ms_max"] = TARGET_DURABLE_P99_MS
    out["meets_target"] = None if worst is None else worst <= TARGET_DURABLE_P99_MS
    return out


def section_synchronous(b: Bench) -> dict[str, Any]:
    """``durable`` on ``fishim up`` for each ``store.synchronous`` setting, the four stacks alternating."""
    supported, default = synchronous_support()
    if not supported:
        return {"skipped": "this fishim has no store.synchronous setting"}
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SYNC_SETTINGS}
    with contextlib.ExitStack() as stack:
        stacks = [stack.enter_context(fishim_up(b, f"sync-{s.lower()}", synchronous=s)) for s in SYNC_SETTINGS]
        for st in stacks:
            asyncio.run(ready(st))
        for rep in range(b.plan.reps):
            for st in stacks:
                run = asyncio.run(durable_run(b, st, _tag(f"sy{st.label.lower()}", rep)))
                runs[st.label].append(run)
                progress(f"synchronous={st.label:<6} rep {rep + 1}: {run['durable_per_s']:>9,.0f} msg/s durable, "
                         f"{run['stored']}/{run['acked']} stored")
    out: dict[str, Any] = {"n": b.plan.e2e_n, "reps": b.plan.reps, "default": default}
    for setting, setting_runs in runs.items():
        out[setting] = {**summarise(setting_runs, "durable_per_s", "acked_not_stored_max"),
                        "all_stored": all(r["all_stored"] for r in setting_runs)}
    base = out.get(default or "FULL", {}).get("durable_per_s")
    for setting in SYNC_SETTINGS:
        out[setting]["vs_default"] = ratio(out[setting]["durable_per_s"], base)
    return out


# -- report -----------------------------------------------------------------------------------------

_NAMES = {"up": "fishim up", "mosquitto": "Mosquitto + fishim bridge"}


def render_durable(d: dict[str, Any]) -> list[str]:
    rows = [[_NAMES[k], fmt(d[k]["durable_per_s"], " msg/s"), fmt(d[k]["acked_per_s"], " msg/s"),
             fmt(d[k]["acked_not_stored_max"]), fmt(d[k]["pubacked_implies_stored"]), fmt(d[k]["all_stored"])]
            for k in UP_KINDS if k in d]
    return [f"### 7. Durable throughput: {d['n']:,} x 200 B chat at QoS 1, 100 in flight, median of {d['reps']}", "",
            *md_table(["stack", "durable (PUBACKed and stored)", "PUBACKed", "most PUBACKed but not stored",
                       "PUBACK ⇒ stored", "all stored"], rows),
            "", "The publisher counts the run's rows in the store every 0.25 s and when its last PUBACK is in "
            "(ack count read first). fishim up / Mosquitto + bridge: "
            f"{times(d.get('ratio_up_vs_mosquitto_bridge'))}.", ""]


def targets_durable(d: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    rows = [("durable throughput, fishim up ≥ 1.0x Mosquitto + bridge", times(d.get("ratio_up_vs_mosquitto_bridge")),
             d.get("meets_target"))]
    if "up" in d:
        rows.append(("fishim up: every PUBACKed message stored", f"{fmt(d['up']['acked_not_stored_max'])} missing",
                     d["up"]["pubacked_implies_stored"] and d["up"]["all_stored"]))
    return rows


def render_latency(d: dict[str, Any]) -> list[str]:
    rows = [[_NAMES[k], fmt(d[k]["puback_ms_p50"], " ms", 2), fmt(d[k]["puback_ms_p99"], " ms", 2),
             fmt(d[k]["subscriber_ms_p50"], " ms", 2), fmt(d[k]["subscriber_ms_p99"], " ms", 2)]
            for k in UP_KINDS if k in d]
    return [f"### 8. Latency on fishim up at a steady {d['rate']:,} msg/s ({d['seconds']:g} s, median of "
            f"{d['reps']})", "",
            *md_table(["stack", "publish→PUBACK p50", "p99", "publish→subscriber p50", "p99"], rows), ""]


def targets_latency(d: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    up = d.get("up", {})
    measured = f"{fmt(up.get('puback_ms_p99'), ' ms', 2)} / {fmt(up.get('subscriber_ms_p99'), ' ms', 2)}"
    return [("fishim up at 1,000 msg/s: p99 publish→PUBACK / →subscriber ≤ 5 ms", measured, d.get("meets_target"))]


def render_synchronous(d: dict[str, Any]) -> list[str]:
    title = "### 9. The cost of `store.synchronous` (fishim up, durable throughput)"
    if "skipped" in d:
        return [title, "", f"Skipped: {d['skipped']}.", ""]
    rows = [[f"`{s}`" + (" (default)" if s == d.get("default") else ""), fmt(d[s]["durable_per_s"], " msg/s"),
             times(d[s]["vs_default"]), fmt(d[s]["all_stored"])] for s in SYNC_SETTINGS if s in d]
    return [f"{title}: {d['n']:,} messages, median of {d['reps']}", "",
            *md_table(["store.synchronous", "durable", "vs default", "all stored"], rows), ""]

"""The load-generator worker: a child process that publishes on command, and the parent's handle on it.

Protocol, one JSON object per line: the parent writes a job on the worker's stdin; the worker
connects, prints ``{"ready": ...}``, waits for a ``go`` line, runs, and prints ``{"result": ...}`` (or
``{"error": ...}``); then it waits for the next job. EOF on stdin ends it. One worker serves many runs,
so a run does not pay for an interpreter start. Started as ``python -m fishim.bench _worker``, so it
works from an installed package.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from fishim.bench.payloads import chat_maker, location_maker
from fishim.bench.plan import PAYLOAD_BYTES
from fishim.bench.procs import CHILDREN, ON_FORK, child_env, log_tail, stop
from fishim.bench.stats import ms
from fishim.bench.wire import MqttError, RawMqtt


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _wait_go() -> None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        raise SystemExit("no go from the parent")


class AckedVsStored:
    """Checks, from the publisher's side, that every message PUBACKed so far is already in the store.

    Reads the PUBACK count first and the store second, so a row counted may be newer than the ack,
    never older: ``stored < acked`` at any check means the broker acknowledged a message it had not
    committed. Checked every ``every`` s during the run and once when the last PUBACK is in.
    """

    def __init__(self, db: str, id_prefix: str, every: float = 0.25) -> None:
        self.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None, timeout=10.0)
        self.low, self.high = f"{id_prefix}-", f"{id_prefix}."  # every id of the run sorts between them
        self.every = every
        self.checks = 0
        self.worst = 0  # the most messages ever PUBACKed but not stored at one check

    def stored(self) -> int:
        sql = "SELECT count(*) FROM events WHERE id >= ? AND id < ?"
        return int(self.conn.execute(sql, (self.low, self.high)).fetchone()[0])

    def check(self, client: RawMqtt) -> int:
        acked = client.acked
        stored = self.stored()
        self.checks += 1
        self.worst = max(self.worst, acked - stored)
        return stored

    async def run(self, client: RawMqtt) -> None:
        while True:
            await asyncio.sleep(self.every)
            self.check(client)


async def _publish_job(job: dict[str, Any]) -> dict[str, Any]:
    """Publish ``n`` chat messages round-robin over ``topics``, flat out or at ``rate`` msg/s.

    ``track_acks``: also report publish -> PUBACK latency. ``store`` (a SQLite path): also check that
    what the broker PUBACKed is stored (:class:`AckedVsStored`).
    """
    client = RawMqtt(job["client_id"], max_inflight=job.get("inflight", 100), track_acks=job.get("track_acks", False))
    await client.connect(job["host"], job["port"])
    audit = AckedVsStored(job["store"], job["id_prefix"]) if job.get("store") else None
    topics = [t.encode() for t in job["topics"]]
    make = chat_maker(job["id_prefix"], job["sender"], job.get("size", PAYLOAD_BYTES))
    n, qos, rate, retain = job["n"], job["qos"], job.get("rate", 0), job.get("retain", False)
    deadline = time.monotonic() + job.get("max_s", 300)
    _emit({"ready": True})
    await _wait_go()
    start_ns, t0 = time.time_ns(), time.monotonic()
    count = 0
    auditing = asyncio.create_task(audit.run(client)) if audit is not None else None
    for i in range(n):
        if rate:
            delay = t0 + i / rate - time.monotonic()
            if delay > 0.0005:
                await asyncio.sleep(delay)
        if qos:
            try:  # a broker that stops acknowledging must not hold the worker past its deadline
                await client.slot(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                break
        elif i % 64 == 0:
            await client.drain()
        client.send(topics[i % len(topics)], make(i), qos, retain)
        count += 1
        if client.lost or (i % 256 == 0 and time.monotonic() > deadline):
            break
        if not rate and i % 1024 == 1023:
            await asyncio.sleep(0)  # let PUBACKs in
    sent_ns = time.time_ns()
    acked = await client.wait_acked(max(1.0, deadline - time.monotonic())) if qos else True
    end_ns = time.time_ns()
    result: dict[str, Any] = {"sent": count, "acked": client.acked, "all_acked": acked, "start_ns": start_ns,
                              "sent_ns": sent_ns, "end_ns": end_ns, "last_ack_ns": client.last_ack_ns,
                              "lost": client.lost}
    if auditing is not None and audit is not None:
        auditing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await auditing
        result["stored_when_acked"] = audit.check(client)
        result["acked_not_stored_max"] = audit.worst
        result["store_checks"] = audit.checks
        audit.conn.close()
    if client.ack_ns is not None:
        result["puback_ms"] = ms(client.ack_ns)
    await client.close()
    return result


async def _riders_job(job: dict[str, Any]) -> dict[str, Any]:
    """Riders that each publish a location fix every ``interval`` s for ``duration`` s, phases spread."""
    riders: list[list[str]] = job["riders"]  # [client_id, order, sender]
    qos, retain, interval, duration = job["qos"], job["retain"], job["interval"], job["duration"]
    gate = asyncio.Semaphore(job.get("connect_parallel", 25))

    async def connect(client_id: str) -> RawMqtt | None:
        for _attempt in range(3):
            client = RawMqtt(client_id, max_inflight=10)
            async with gate:
                try:
                    await client.connect(job["host"], job["port"], timeout=20.0)
                    return client
                except (OSError, MqttError, TimeoutError):
                    await client.close()
            await asyncio.sleep(0.5)
        return None

    clients = await asyncio.gather(*(connect(r[0]) for r in riders))
    _emit({"ready": {"connected": sum(c is not None for c in clients)}})
    await _wait_go()
    t0 = time.monotonic()
    blocked = 0

    async def ride(index: int, client: RawMqtt | None, order: str, sender: str) -> int:
        nonlocal blocked
        if client is None:
            return 0
        topic = f"{job['prefix']}/orders/{order}/location".encode()
        make = location_maker(f"{job['id_prefix']}-{index:04d}", sender, index)
        offset = interval * index / len(riders)  # spread evenly over the first interval
        sent = 0
        while client.lost is None:
            due = t0 + offset + sent * interval
            if due >= t0 + duration:
                break
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if qos:
                try:
                    await client.slot(interval * 5)
                except TimeoutError:
                    blocked += 1
                    break
            client.send(topic, make(sent), qos, retain)
            sent += 1
        return sent

    counts = await asyncio.gather(*(ride(i, c, r[1], r[2]) for i, (c, r) in enumerate(zip(clients, riders,
                                                                                            strict=True))))
    live = [c for c in clients if c is not None]
    await asyncio.gather(*(c.wait_acked(10.0) for c in live))
    lost = sum(c.lost is not None for c in live)
    acked = sum(c.acked for c in live)
    await asyncio.gather(*(c.close() for c in live))
    return {"riders": len(riders), "connected": len(live), "sent": sum(counts), "acked": acked,
            "disconnected": lost, "blocked": blocked}


async def _worker(job: dict[str, Any]) -> None:
    jobs = {"publish": _publish_job, "riders": _riders_job}
    try:
        result = await jobs[job["kind"]](job)
    except Exception as exc:
        _emit({"error": f"{type(exc).__name__}: {exc}"})
        raise
    _emit({"result": result})


def worker_main() -> int:
    """The worker process: one job per stdin line until EOF."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        if line.strip():
            asyncio.run(_worker(json.loads(line)))


class Worker:
    """The parent's handle on one load-generator process (usable across event loops)."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log_file:
            self.proc = subprocess.Popen([sys.executable, "-m", "fishim.bench", "_worker"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=log_file, env=child_env(),
                                         start_new_session=True, preexec_fn=ON_FORK)
        CHILDREN[self.proc.pid] = name
        self._lines: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        threading.Thread(target=self._pump, name=f"{name}-stdout", daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(b"")  # EOF

    def _send(self, text: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(text.encode() + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            raise RuntimeError(f"worker {self.name} is gone:\n{log_tail(self.log_path)}") from None

    async def _line(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                raw = self._lines.get_nowait()
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {self.name}: nothing within {timeout:.0f}s") from None
                await asyncio.sleep(0.005)
        if not raw:
            raise RuntimeError(f"worker {self.name} exited early:\n{log_tail(self.log_path)}")
        message: dict[str, Any] = json.loads(raw)
        if "error" in message:
            raise RuntimeError(f"worker {self.name} failed: {message['error']}")
        return message

    async def prepare(self, job: dict[str, Any], timeout: float = 120.0) -> Any:
        """Hand over a job; returns the worker's ready payload once it is connected."""
        self._send(json.dumps(job))
        return (await self._line(timeout))["ready"]

    def go(self) -> None:
        self._send("go")

    async def result(self, timeout: float) -> dict[str, Any]:
        result: dict[str, Any] = (await self._line(timeout))["result"]
        return result

    def close(self) -> None:
        """EOF (a clean exit between jobs), then stop()'s SIGTERM/SIGKILL if it lingers."""
        with contextlib.suppress(OSError, ValueError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2.0)
        stop(self.proc, timeout=5.0)



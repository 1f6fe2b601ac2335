"""What a run observes: subscribers that count and time, a store watcher, and the publisher driver."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fishim.bench.payloads import cid, stamp_of
from fishim.bench.procs import progress
from fishim.bench.stacks import Bench, Endpoint, connect_ro
from fishim.bench.wire import MqttError


class Sink:
    """What one subscriber receives: count, last arrival, and (optionally) each message's latency."""

    def __init__(self, expect: int, *, latency: bool = False, since_ns: int = 0) -> None:
        self.expect = expect
        self.latency = latency
        self.since_ns = since_ns  # ignore stamped messages sent before this (e.g. old retained ones)
        self.count = 0
        self.last_ns = 0
        self.latencies: list[int] = []

    def __call__(self, _topic: bytes, payload: bytes, _qos: int, _retain: bool) -> None:
        now = time.time_ns()
        if self.latency or self.since_ns:
            stamp = stamp_of(payload)
            if stamp is None or stamp < self.since_ns:
                return
            self.latencies.append(now - stamp)
        self.count += 1
        self.last_ns = now


class PahoSink:
    """A paho-mqtt subscriber that only counts: the bridge's own client stack, doing nothing else."""

    def __init__(self, ep: Endpoint, topic: str, qos: int = 1) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.count = 0
        self.last_ns = 0
        subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid("paho"), protocol=mqtt.MQTTv311)
        client.on_connect = lambda c, *_: c.subscribe(topic, qos)
        client.on_subscribe = lambda *_: subscribed.set()
        client.on_message = self._on_message
        client.connect(ep.host, ep.port, 60)
        client.loop_start()
        self.client = client
        if not subscribed.wait(10.0):
            self.close()
            raise MqttError(f"paho subscriber: no SUBACK for {topic}")

    def _on_message(self, *_args: Any) -> None:
        self.count += 1
        self.last_ns = time.time_ns()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class StoreWatch:
    """Polls the bridge's SQLite file for our stamped events: when each became visible (committed).

    ``visible`` latency is publish -> first poll that sees the row (poll every ``every`` s, so it reads
    up to that much high); ``received`` is publish -> the bridge's ``received_at`` stamp (ms, taken
    when the batch holding it started, before COMMIT).
    """

    def __init__(self, db: Path, id_prefix: str, every: float = 0.002) -> None:
        self.conn = connect_ro(db)
        self.id_prefix = id_prefix
        self.every = every
        self.count = 0
        self.first_ns = 0  # the poll that first saw one of our rows
        self.last_ns = 0
        self.visible: list[int] = []
        self.received: list[int] = []
        self._since = int(self.conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        sql = ("SELECT seq, received_at, json_extract(payload, '$.t') FROM events WHERE seq > ?"
               " AND substr(id, 1, ?) = ? ORDER BY seq")
        size = len(self.id_prefix)
        while True:
            rows = self.conn.execute(sql, (self._since, size, self.id_prefix)).fetchall()
            now = time.time_ns()
            for seq, received_at, stamp in rows:
                self._since = seq
                if stamp is None:
                    continue
                self.count += 1
                self.visible.append(now - stamp)
                self.received.append(received_at * 1_000_000 - stamp)
            if rows:
                self.last_ns = now
                self.first_ns = self.first_ns or now
            await asyncio.sleep(self.every)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.conn.close()


async def run_publisher(b: Bench, ep: Endpoint, job: dict[str, Any], counters: Sequence[Callable[[], int]],
                        expect: int, name: str, idle_s: float | None = None) -> dict[str, Any]:
    """Have the publisher worker connect and go, then wait until every counter reached ``expect``.

    Ends early when nothing moved for ``plan.idle_s`` after the publisher finished, and always within
    ``plan.run_cap_s``. With no counters, waits for the publisher alone. Returns its own result.
    """
    plan = b.plan
    idle_s = plan.idle_s if idle_s is None else idle_s
    job = {"kind": "publish", "host": ep.host, "port": ep.port, "client_id": cid("pub"),
           "max_s": plan.run_cap_s, **job}
    worker = b.publisher()
    try:
        await worker.prepare(job)
        worker.go()
        result_task = asyncio.ensure_future(worker.result(plan.run_cap_s + 30))
        deadline = time.monotonic() + plan.run_cap_s
        seen, moved_at = -1, time.monotonic()
        while True:
            counts = [c() for c in counters]
            if (all(c >= expect for c in counts) if counters else result_task.done()):
                break
            now = time.monotonic()
            if sum(counts) != seen:
                seen, moved_at = sum(counts), now
            if result_task.done() and (now - moved_at > idle_s or result_task.exception()):
                progress(f"  {name}: stopped waiting at {counts} of {expect} (nothing for {idle_s:.0f}s)")
                break
            if now > deadline:
                progress(f"  {name}: run cap {plan.run_cap_s:.0f}s reached at {counts} of {expect}")
                break
            await asyncio.sleep(0.01)
        return await asyncio.wait_for(result_task, plan.run_cap_s + 30)
    except BaseException:
        b.drop_publisher()
        raise



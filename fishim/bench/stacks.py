"""Brokers, bridges and stores for the benchmark: each a process of its own on a free loopback port.

:class:`Bench` is one run (plan, scratch directory, the peers found on this machine, the reusable
publisher); :class:`Live` is a broker with a bridge on its own store, shared by sections 2-5.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fishim.bench.payloads import cid, placed_status
from fishim.bench.plan import HOST, LIVE_BROKERS, PREFIX, Plan
from fishim.bench.procs import log_tail, progress, spawn, stop
from fishim.bench.wire import RawMqtt
from fishim.bench.worker import Worker
from fishim.testing import free_port, wait_for_port
from fishim.testing.mosquitto import Mosquitto, find_mosquitto


@dataclass(frozen=True)
class Endpoint:
    """A running broker."""

    kind: str  # fishim | amqtt | mosquitto
    host: str
    port: int
    pid: int


_AMQTT_STOCK = """
import asyncio, sys
from amqtt.broker import Broker

async def main() -> None:
    # amqtt's default BrokerConfig (default plugins included); only the listener is ours.
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": "127.0.0.1:" + sys.argv[1]}}})
    await broker.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


class Bench:
    """One benchmark run: its plan, scratch and output directories, brokers to compare, publisher."""

    def __init__(self, plan: Plan, work: Path, out: Path, brokers: Sequence[str],
                 peers: Sequence[str] = ()) -> None:
        self.plan = plan
        self.peers = list(peers)  # HOST:PORT of brokers already running (EMQX, a fishim up): section 1 only
        self.work = work
        self.out = out
        self.brokers = [b for b in brokers if b != "mosquitto" or find_mosquitto() is not None]
        self.skipped = [b for b in brokers if b not in self.brokers]
        self.config = work / "bench-broker.yaml"
        # fishim defaults, but the offline/backlog queue as deep as the Mosquitto peer's
        # (max_queued_messages 100000 in fishim.testing.mosquitto): a flood must not be cut by the bound.
        # The peer has no per-address connection cap either (the fan-in opens 500 loopback clients).
        self.config.write_text("# scripts/bench.py: defaults + queue bounds of the Mosquitto peer\n"
                               "limits:\n  max_queued: 100000\n  max_queued_bytes: 1G\n"
                               "  max_connections_per_address: 0\n")
        self.logs = work / "logs"
        self.logs.mkdir(exist_ok=True)
        self._publisher: Worker | None = None

    def log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def publisher(self) -> Worker:
        """The run's publisher process, started on first use and reused by every run after."""
        if self._publisher is None or self._publisher.proc.poll() is not None:
            self._publisher = Worker("publisher", self.log("worker-publisher"))
        return self._publisher

    def drop_publisher(self) -> None:
        """After a run went wrong the worker's state is unknown: end it (the next run starts anew)."""
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    @contextlib.contextmanager
    def brokers_up(self, specs: Sequence[tuple[str, Path | None, str]]) -> Iterator[list[Endpoint]]:
        """Start brokers (kind, store, tag) side by side, each on a free loopback port; all stopped after."""
        with contextlib.ExitStack() as stack:
            starting: list[tuple[str, str, int, subprocess.Popen[bytes]]] = []
            for kind, db, tag in specs:
                name = f"{kind}{'-' + tag if tag else ''}"
                port = free_port()
                if kind == "mosquitto":
                    # The test helper's config (raised queue limits, persistence), but our own process
                    # handling, so Mosquitto too dies with this script.
                    mosq = Mosquitto(port=port)
                    stack.callback(mosq.close)  # removes its temp dir
                    mosq.config_path.write_text(mosq.config_text())
                    argv = [str(mosq.binary), "-c", str(mosq.config_path)]
                elif kind == "fishim":
                    argv = [sys.executable, "-m", "fishim", "-c", str(self.config), "broker", "--bind",
                            f"{HOST}:{port}", "--db", str(db or self.work / f"{name}.db")]
                elif kind == "amqtt":
                    argv = [sys.executable, "-c", _AMQTT_STOCK, str(port)]
                else:
                    raise ValueError(f"unknown broker {kind!r}")
                proc = spawn(argv, name, self.log(name), cwd=self.work)
                stack.callback(stop, proc)
                starting.append((kind, name, port, proc))
            endpoints = []
            for kind, name, port, proc in starting:
                try:
                    wait_for_port(port, timeout=60.0, proc=proc)
                except (RuntimeError, TimeoutError) as exc:
                    raise RuntimeError(f"{name} did not start: {exc}\n{log_tail(self.log(name))}") from None
                endpoints.append(Endpoint(kind, HOST, port, proc.pid))
            yield endpoints

    @contextlib.contextmanager
    def broker(self, kind: str, db: Path | None = None, tag: str = "") -> Iterator[Endpoint]:
        with self.brokers_up([(kind, db, tag)]) as (endpoint,):
            yield endpoint

    @contextlib.contextmanager
    def bridge(self, ep: Endpoint, db: Path, tag: str = "") -> Iterator[subprocess.Popen[bytes]]:
        """``fishim bridge`` against ``ep`` on ``db``; its readiness is the caller's to check."""
        name = f"bridge-{ep.kind}{'-' + tag if tag else ''}"
        argv = [sys.executable, "-m", "fishim", "-c", str(self.config), "bridge", "--broker",
                f"mqtt://{ep.host}:{ep.port}", "--db", str(db)]
        proc = spawn(argv, name, self.log(name), cwd=self.work)
        try:
            yield proc
        finally:
            stop(proc, timeout=30.0)


async def ensure_stored(ep: Endpoint, db: Path, messages: Sequence[tuple[str, bytes, bool]], ids: Sequence[str],
                        bridge: subprocess.Popen[bytes], timeout: float = 90.0) -> float:
    """Publish ``messages`` (topic, payload, retain) until the bridge has stored every id; returns seconds.

    Also the bridge's readiness check: until it is connected and subscribed, what we publish may
    reach no session, so whatever is not stored yet is published again every 1.5 s (same ids: the
    bridge stores each once).
    """
    started = time.monotonic()
    client = RawMqtt(cid("setup"), max_inflight=200)
    await client.connect(ep.host, ep.port)
    wanted = set(ids)
    try:
        while True:
            if bridge.poll() is not None:
                raise RuntimeError(f"the bridge exited ({bridge.returncode}) before storing the setup messages")
            missing = wanted - stored_ids(db, wanted)
            if not missing:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"bridge stored {len(wanted) - len(missing)} of {len(wanted)} setup messages "
                                   f"within {timeout:.0f}s")
            for (topic, payload, retain), ident in zip(messages, ids, strict=True):
                if ident in missing:
                    await client.publish(topic.encode(), payload, 1, retain)
            await client.wait_acked(5.0)
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline and wanted - stored_ids(db, wanted):
                await asyncio.sleep(0.05)
    finally:
        await client.close()


def connect_ro(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None, timeout=10.0)


def stored_ids(db: Path, ids: set[str]) -> set[str]:
    if not db.exists():
        return set()
    conn = connect_ro(db)
    try:
        found: set[str] = set()
        wanted = list(ids)
        for start in range(0, len(wanted), 500):
            chunk = wanted[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in conn.execute(f"SELECT id FROM events WHERE id IN ({marks})", chunk))
        return found
    except sqlite3.OperationalError:  # schema not created yet
        return set()
    finally:
        conn.close()


async def place_orders(ep: Endpoint, db: Path, orders: Sequence[str], customer: str,
                       bridge: subprocess.Popen[bytes]) -> float:
    messages = [(f"{PREFIX}/orders/{o}/status", placed_status(o, customer), True) for o in orders]
    return await ensure_stored(ep, db, messages, [f"placed-{o}" for o in orders], bridge)


def fill_store(db: Path, events: int, *, orders: int, customer: str, prefix: str = "hist") -> float:
    """Write ``events`` stored events over ``orders`` placed orders straight into SQLite; returns seconds.

    Each order starts with its ``placed`` status (also in ``retained``, as the bridge would leave it),
    then chat from its customer. Rows go in through ``Store.insert_events`` in large transactions, with
    the events table's secondary indexes dropped meanwhile and rebuilt from their own SQL afterwards
    (three times faster for a million rows than keeping them up to date row by row).
    """
    from fishim.store import EventRow, OrderRow, Store

    started = time.monotonic()
    now = int(time.time() * 1000)
    chat = '{"id":"%s","ts":%d,"sender":"%s","text":"%s"}'
    text = "x" * 100
    with Store(db) as store:
        conn = store.conn
        conn.execute("PRAGMA synchronous=OFF")  # a benchmark fixture: nothing to protect yet
        first = store.next_seq()
        order_ids = [f"{prefix}-{o:05d}" for o in range(orders)]
        chat_topics = [f"{PREFIX}/orders/{o}/chat/{customer}" for o in order_ids]

        def row(i: int) -> EventRow:
            o = i % orders
            order_seq = i // orders + 1
            ident = f"{prefix}-{i:09d}"
            if order_seq == 1:
                return EventRow(first + i, ident, order_ids[o], 1, "status", f"{PREFIX}/orders/{order_ids[o]}/status",
                                "shop", now, now, 1, placed_status(order_ids[o], customer, ident).decode())
            return EventRow(first + i, ident, order_ids[o], order_seq, "chat", chat_topics[o], customer, now, now, 0,
                            chat % (ident, now, customer, text))

        indexes = conn.execute("SELECT name, sql FROM sqlite_master WHERE type='index' AND tbl_name='events'"
                               " AND sql IS NOT NULL").fetchall()
        with store.transaction():
            for name, _sql in indexes:
                conn.execute(f'DROP INDEX "{name}"')
        chunk = 50_000
        for start in range(0, events, chunk):
            with store.transaction():
                store.insert_events(row(i) for i in range(start, min(events, start + chunk)))
        with store.transaction():
            for _name, sql in indexes:
                conn.execute(sql)
            for o, order_id in enumerate(order_ids[:events]):
                count = events // orders + (1 if o < events % orders else 0)
                store.put_order(OrderRow(id=order_id, state="placed", customer=customer,
                                         items=[{"sku": "rod", "qty": 1}], created_at=now, updated_at=now,
                                         last_seq=first + o + (count - 1) * orders, order_seq=count))
                store.put_retained(f"{PREFIX}/orders/{order_id}/status",
                                   placed_status(order_id, customer, f"{prefix}-{o:09d}"), 1, first + o)
        conn.execute("PRAGMA synchronous=NORMAL")
    return time.monotonic() - started


@dataclass
class Live:
    """One broker with (once started) a bridge on its own store, for sections 2-5 and the profile."""

    kind: str
    ep: Endpoint
    db: Path
    bridge: subprocess.Popen[bytes] | None = None


def live_stacks(b: Bench, stack: contextlib.ExitStack, wanted: set[str]) -> list[Live]:
    kinds = [k for k in LIVE_BROKERS if k in b.brokers]
    dbs = {k: b.work / f"live-{k}.db" for k in kinds}
    if "replay" in wanted:
        for kind, db in dbs.items():
            took = fill_store(db, b.plan.replay_events, orders=10, customer="replayer", prefix="rp")
            progress(f"replay store for {kind}: {b.plan.replay_events:,} events written in {took:.1f}s")
    endpoints = stack.enter_context(b.brokers_up([(k, dbs[k], "live") for k in kinds]))
    return [Live(ep.kind, ep, dbs[ep.kind]) for ep in endpoints]

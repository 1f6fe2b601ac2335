"""`fishim up` acknowledges and routes only what it has stored (the durable ingest).

Real processes and clients only: ``python -m fishim up`` on a free loopback port with a real SQLite
file, paho publishers with an in-flight window of 100, and SIGKILL of the whole process group (a
power cut, as far as fishim can tell). The expectations come from the contract: a PUBACKed message
is in the store, exactly once, in its order's sequence; a refused message reaches nobody.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import paho.mqtt.client as paho_mqtt
import pytest
from _bridge_support import PY, Proc, chat, clean_env, placed, read_db, status

from fishim.testing import free_port
from fishim.testing.mqtt import Collector, MqttClient, connect_client, publish_and_wait

BURST = 3_000  # QoS-1 chats per burst
ORDERS = 30
KILLS = 3


def port_below_ephemeral_range() -> int:
    """A free port outside the kernel's ephemeral range: a client that keeps dialling a port nobody
    listens on yet could otherwise be handed that very port as its own source port and connect to
    itself (TCP simultaneous open), taking the port from the server about to bind it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(200):
        port = random.randrange(max(1024, low - 12_000), low)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    return free_port()


class UpProc:
    """``python -m fishim up`` on one port and store, restartable, killable as a process group."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.db, self.port = tmp, tmp / "shop.db", port_below_ephemeral_range()
        self.proc: Proc | None = None

    def start(self) -> Proc:
        self.proc = Proc([PY, "-m", "fishim", "up", "--bind", f"127.0.0.1:{self.port}", "--db", str(self.db)],
                         env=clean_env(), cwd=self.tmp)
        return self.proc

    def kill_group(self) -> None:
        """SIGKILL to every process of ``fishim up``'s group: no handler, no flush, no goodbye."""
        assert self.proc is not None
        os.killpg(self.proc.popen.pid, signal.SIGKILL)
        self.proc.kill()

    def stop(self) -> int:
        assert self.proc is not None
        return self.proc.terminate()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[UpProc]:
    proc = UpProc(tmp_path)
    try:
        yield proc
    finally:
        if proc.proc is not None:
            proc.proc.kill()


class Acks:
    """Which envelope ids the broker PUBACKed to a paho publisher (paho's on_publish, by mid)."""

    def __init__(self, client: paho_mqtt.Client) -> None:
        self.by_mid: dict[int, str] = {}
        self.acked: list[str] = []
        self.early: set[int] = set()  # PUBACKs paho reported before publish() returned the mid
        self._cond = threading.Condition()
        client.on_publish = self._on_publish

    def _on_publish(self, _c: object, _u: object, mid: int, _rc: object, _p: object) -> None:
        with self._cond:
            ident = self.by_mid.get(mid)
            if ident is None:
                self.early.add(mid)
            else:
                self.acked.append(ident)
            self._cond.notify_all()

    def sent(self, mid: int, ident: str) -> None:
        with self._cond:
            self.by_mid[mid] = ident
            if mid in self.early:
                self.early.discard(mid)
                self.acked.append(ident)
                self._cond.notify_all()

    def wait(self, count: int, timeout: float = 120.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.acked) >= count, timeout):
                raise TimeoutError(f"{len(self.acked)} of {count} PUBACKs within {timeout}s")


def _publisher(port: int) -> MqttClient:
    def setup(client: MqttClient) -> None:
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(0)

    return connect_client(port, "shop-burst", clean_session=False, reconnect_delay=(1, 1), setup=setup)


def _stored(db: Path) -> list[tuple[str, str, int]]:
    with closing(read_db(db)) as conn:
        return conn.execute("SELECT order_id, id, order_seq FROM events ORDER BY order_id, order_seq").fetchall()


def test_publishing_from_the_first_moment_the_port_listens_loses_nothing(up: UpProc) -> None:
    """A phone that connects as soon as the port accepts and publishes at once: every message it was
    PUBACKed is in the store (checked right after the last PUBACK: nothing to wait for). Twice: on
    the first start and on a restart while the phone reconnects immediately."""
    for round_ in range(2):
        proc = up.start()
        client = None
        while client is None:  # connect the instant the port listens
            try:
                client = connect_client(up.port, f"eager-{round_}", reconnect_delay=(1, 1))
            except OSError:
                if proc.popen.poll() is not None:
                    raise
        with client:
            msgs = [(f"fishim/orders/E{round_}-{o}/status", placed(f"E{round_}-{o}")) for o in range(30)]
            msgs += [(f"fishim/orders/E{round_}-{k % 30}/chat/cust1", chat(f"e{round_}-{k}")) for k in range(120)]
            infos = [client.publish(t, p, qos=1, retain=t.endswith("/status")) for t, p in msgs]
            for info in infos:
                info.wait_for_publish(30)
            assert all(info.is_published() for info in infos)
            stored = {row[1] for row in _stored(up.db)}
        assert {json.loads(p)["id"] for _t, p in msgs} <= stored
        assert up.stop() == 0


def test_power_cut_three_times_during_bursts_loses_and_duplicates_nothing(up: UpProc) -> None:
    """kill -9 of the whole `fishim up` process group during each of three bursts of 3,000 QoS-1
    messages (in-flight window 100), then a restart on the same port and store while paho resends
    what it was not acknowledged: 0 PUBACKed messages lost, 0 stored twice, order kept per order."""
    up.start().wait_log("broker_started")
    client = _publisher(up.port)
    acks = Acks(client)
    published: list[str] = []
    try:
        for o in range(ORDERS):
            publish_and_wait(client, f"fishim/orders/K{o}/status", placed(f"K{o}"), retain=True)
        for burst in range(KILLS):
            base = len(acks.acked)
            for k in range(BURST):
                order, ident = f"K{k % ORDERS}", f"k{burst}-{k:05d}"
                info = client.publish(f"fishim/orders/{order}/chat/cust1", chat(ident, text=str(k)), qos=1)
                acks.sent(info.mid, ident)
                published.append(ident)
            acks.wait(base + BURST // 3)  # a third of the burst acknowledged: cut the power now
            up.kill_group()
            assert len(acks.acked) < base + BURST, "the cut came after the burst ended"
            up.start().wait_log("broker_started")  # paho reconnects (persistent session) and resends
            acks.wait(base + BURST)
        assert up.stop() == 0
    finally:
        client.close()
    rows = _stored(up.db)
    ids = [r[1] for r in rows]
    assert len(ids) == len(set(ids)), "an envelope id stored twice"
    assert set(acks.acked) <= set(ids), f"lost: {sorted(set(acks.acked) - set(ids))[:5]}"
    assert set(published) <= set(ids)
    for o in range(ORDERS):  # within an order, the chats are stored in the order they were published
        chats = [r[1] for r in rows if r[0] == f"K{o}" and r[1].startswith("k")]
        assert chats == sorted(chats)
        seqs = [r[2] for r in rows if r[0] == f"K{o}"]
        assert seqs == list(range(1, len(seqs) + 1))


def test_an_illegal_transition_reaches_no_live_and_no_later_subscriber(up: UpProc) -> None:
    """A status the rules refuse is never routed: the live watcher sees the marker sent after it
    but not the refused one, a later subscriber gets the last good retained status, and the sender
    is told why on its errors topic. Publishes come back stamped with the store's seq/order_seq."""
    up.start().wait_log("broker_started")
    with connect_client(up.port, "shop-x") as shop, connect_client(up.port, "watch-x") as watcher, \
            Collector(watcher, ["fishim/orders/X1/#", "fishim/errors/shop"]) as live:
        publish_and_wait(shop, "fishim/orders/X1/status", placed("X1"), retain=True)
        publish_and_wait(shop, "fishim/orders/X1/status", status("X1", "delivered", "x-bad"), retain=True)
        publish_and_wait(shop, "fishim/orders/X1/chat/cust1", chat("x-marker"))
        seen = []
        while not seen or seen[-1][1] != "x-marker":
            message = live.get(timeout=10)
            seen.append((message.topic, message.json().get("id"), message.json()))
    assert [(t, i) for t, i, _b in seen] == [("fishim/orders/X1/status", "placed-X1"),
                                             ("fishim/errors/shop", "x-bad"),
                                             ("fishim/orders/X1/chat/cust1", "x-marker")]
    assert seen[1][2]["error"] == "illegal_transition"
    assert (seen[0][2]["seq"], seen[0][2]["order_seq"]) == (1, 1)  # server stamps on what is routed
    assert (seen[2][2]["seq"], seen[2][2]["order_seq"]) == (2, 2)
    with connect_client(up.port, "late-x") as late, Collector(late, "fishim/orders/X1/status") as retained:
        message = retained.get(timeout=10)
        assert message.retain and message.json()["id"] == "placed-X1"
    with closing(read_db(up.db)) as conn:
        assert conn.execute("SELECT msg_id, error FROM deadletters").fetchall() == [("x-bad", "illegal_transition")]


def test_retained_state_comes_from_the_store_on_start(up: UpProc) -> None:
    """The broker's memory goes with the process; the retained status and location come back from the
    store before the first client is accepted (a subscriber right after the restart gets them)."""
    up.start().wait_log("broker_started")
    with connect_client(up.port, "shop-r") as shop:
        publish_and_wait(shop, "fishim/orders/R1/status", placed("R1"), retain=True)
        publish_and_wait(shop, "fishim/orders/R1/location",
                         json.dumps({"id": "fix-1", "ts": 1, "sender": "shop", "lat": 30.2, "lon": 120.1}),
                         retain=True)
    up.kill_group()
    up.start().wait_log("broker_started")
    with connect_client(up.port, "fresh-r") as fresh, \
            Collector(fresh, ["fishim/orders/R1/status", "fishim/orders/R1/location"]) as retained:
        got = {m.topic: m.json()["id"] for m in retained.wait_for(2, timeout=10)}
    assert got == {"fishim/orders/R1/status": "placed-R1", "fishim/orders/R1/location": "fix-1"}
    assert up.stop() == 0

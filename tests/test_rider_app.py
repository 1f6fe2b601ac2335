"""examples/rider_app.py against a real `fishim up`, through a cut link: what a rider-app developer
gets from FishimClient. Every event is shown once and each order's events in `order #` order; the
last state shown is the store's; the shop's unread count for the rider drops to 0 (mark_read)."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fishim.client import FishimClient
from fishim.store import Store
from fishim.testing.proxy import Proxy
from fishim.testing.stack import Stack

APP = Path(__file__).resolve().parent.parent / "examples" / "rider_app.py"


class App:
    """The example app as a child process; its JSON lines are collected by a reader thread."""

    def __init__(self, port: int, user: str, cursor: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, str(APP), "--port", str(port), "--user", user,
                                      "--cursor", str(cursor)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._new: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._new.put(json.loads(line))

    def wait(self, check: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
        """Collect lines until one passes ``check``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                pytest.fail(f"the app never showed what was expected; it showed {self.lines[-5:]}")
            self.lines.append(line)
            if check(line):
                return line

    def stop(self) -> str:
        assert self.proc.stdin is not None and self.proc.stderr is not None
        self.proc.stdin.close()
        code = self.proc.wait(15)
        self._reader.join(5)
        while not self._new.empty():
            self.lines.append(self._new.get())
        err = self.proc.stderr.read()
        assert code == 0, err
        return err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp_path / "shop.db", kind="embedded").start()
    try:
        yield stack
    finally:
        stack.close()


def event_text(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda line: line["show"] == "event" and line.get("text") == text


def test_rider_app_through_a_disconnect(up: Stack, tmp_path: Path) -> None:
    with Proxy("127.0.0.1", up.port) as proxy, FishimClient("127.0.0.1", up.port, "shop") as shop:
        shop.publish_status("R1", "placed", customer="cust1", items=[{"sku": "ROD", "qty": 1}])
        for state in ("confirmed", "picking", "packed"):
            shop.publish_status("R1", state)
        shop.publish_status("R1", "assigned", rider="rider1")
        app = App(proxy.port, "rider1", tmp_path / "rider1.cursor")
        try:
            # the app confirms pickup on its own; it shows once fishim stored it
            app.wait(lambda line: line["show"] == "order" and line["state"] == "picked_up")
            shop.publish_chat("R1", "fragile, keep it upright")
            app.wait(event_text("fragile, keep it upright"))

            proxy.cut(refuse=True)  # the rider rides into a basement
            shop.publish_chat("R1", "customer is at the back door")
            shop.publish_status("R1", "delivering", note="rider on the way")
            shop.publish_chat("R1", "ring twice")
            time.sleep(1.5)  # the app is offline a while (it keeps retrying: the proxy refuses)
            proxy.restore()
            app.wait(event_text("ring twice"))

            shop.publish_status("R1", "delivered")
            app.wait(lambda line: line["show"] == "order" and line["state"] == "delivered")
            shop.publish_chat("R1", "thanks!")  # a marker: nothing else comes after it
            app.wait(event_text("thanks!"))

            def unread() -> int | None:
                with Store(up.db, readonly=True) as store:
                    (row,) = store.order_overview()
                    return row.unread["rider"]

            deadline = time.monotonic() + 15
            while unread() != 0:
                assert time.monotonic() < deadline, f"the shop still counts {unread()} unread for rider1"
                time.sleep(0.1)
        finally:
            err = app.stop() if app.proc.poll() is None else ""
            app.kill()
    assert "Traceback" not in err, err

    events = [line for line in app.lines if line["show"] == "event"]
    with Store(up.db, readonly=True) as store:
        stored = store.order_events("R1")
        final = store.get_order("R1")
        devices = store.devices("rider1")
    assert final is not None
    ids = [e["id"] for e in events]
    assert len(ids) == len(set(ids)), "an event was shown twice"
    assert set(ids) == {e.id for e in stored}, "an event was never shown"
    assert [e["order_seq"] for e in events] == [e.order_seq for e in stored], "not shown in order"
    assert [e["seq"] for e in events] == [e.seq for e in stored]
    live = [e for e in events if e["source"] == "live"]
    assert live and all(e["order_seq"] for e in live), "live events carry fishim's stamps"
    missed = {"customer is at the back door", "delivering", "ring twice"}
    assert missed <= {e["text"] for e in events if e["source"] == "replay"}, "the disconnect was caught up by sync"
    states = [line for line in app.lines if line["show"] == "order"]
    assert states[-1]["state"] == final.state == "delivered"
    assert not [line for line in app.lines if line["show"] == "error"]
    # fishim learnt the phone's cursor from its syncs (the first one, and the one after the cut)
    (device,) = devices
    assert device.syncs >= 2 and 0 < device.cursor <= device.served

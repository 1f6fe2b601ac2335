"""The alert service on a real store with an injected clock: restarts, and off-app push through
apprise to a real local HTTP receiver (apprise's ``json://`` webhook).

The owner is offline (no session) and the shop has no staff account, so an unanswered customer is
the owner's.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from fishim.alerts import Fact, OrderFacts
from fishim.cli import main
from fishim.config import Config
from fishim.messages import Notification
from fishim.notify import AlertService
from fishim.store import OrderRow, Store, UserRow

T0 = 1_794_000_000_000
S = 1000


class Receiver:
    """A loopback HTTP server that records every POST body; answers ``status`` to each."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: queue.Queue[dict[str, object]] = queue.Queue()
        bodies, code = self.bodies, status

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                bodies.put(json.loads(self.rfile.read(length)))
                self.send_response(code)
                self.end_headers()

            def log_message(self, *_args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def failing() -> Iterator[Receiver]:
    r = Receiver(status=500)
    yield r
    r.close()


class Shop:
    """A store with an owner and one customer, orders O1..O3 placed, and the service on a fake clock."""

    def __init__(self, db: Path, urls: list[str], now: int = T0) -> None:
        self.now = now
        with Store(db) as store:
            for name, role in (("boss", "owner"), ("cust", "customer")):
                store.put_user(UserRow(name=name, role=role, password_hash="-", created_at=T0))
            with store.transaction():
                for order in ("O1", "O2", "O3"):
                    store.put_order(OrderRow(id=order, state="confirmed", customer="cust", created_at=T0,
                                             updated_at=T0, last_seq=1, order_seq=1))
        self.config = Config.model_validate({
            "store": {"path": str(db)},
            "alerts": {"unanswered_customer_after": "60s", "push_delay": "2m", "push_attempts": 2,
                       "push_backoff": 0.05},
            "push": [{"url": url, "roles": ["owner"], "min_priority": "high"} for url in urls]})
        self.sent: list[tuple[str, Notification]] = []
        self.service = AlertService(self.config, lambda user, note: self.sent.append((user, note)),
                                    online=lambda _user: False, clock=lambda: self.now, run_thread=False)
        self.seq = {"O1": 1, "O2": 1, "O3": 1}

    def fact(self, order: str, channel: str, sender: str, **body: object) -> None:
        self.seq[order] += 1
        facts = OrderFacts(id=order, state="confirmed", customer="cust", order_seq=self.seq[order])
        self.service.step([("fact", Fact(order=facts, order_seq=self.seq[order], channel=channel, sender=sender,
                                         **body))])  # type: ignore[arg-type]

    def advance(self, ms: int) -> None:
        self.now += ms
        self.service.step()


def test_unread_alert_is_pushed_to_the_offline_owner_once_push_delay_passed(tmp_path: Path,
                                                                             receiver: Receiver) -> None:
    shop = Shop(tmp_path / "shop.db", [f"json://127.0.0.1:{receiver.port}/fishim"])
    try:
        shop.fact("O1", "chat", "cust")
        shop.advance(61 * S)
        assert [(u, n.priority, n.order) for u, n in shop.sent] == [("boss", "urgent", "O1")]
        shop.advance(60 * S)
        assert receiver.bodies.empty()  # push_delay (2m) not over yet
        shop.advance(61 * S)
        body = receiver.bodies.get(timeout=20)
        assert "urgent" in body["title"] and "O1" in body["title"]
        assert "priority: urgent" in body["message"] and "order: O1" in body["message"]
        assert body["type"] == "failure"  # apprise's loudest type for urgent
    finally:
        shop.service.close()


def test_nothing_is_pushed_when_the_owner_reads_within_push_delay(tmp_path: Path, receiver: Receiver) -> None:
    shop = Shop(tmp_path / "shop.db", [f"json://127.0.0.1:{receiver.port}/fishim"])
    try:
        shop.fact("O2", "chat", "cust")
        shop.advance(61 * S)
        about = shop.seq["O2"]
        shop.advance(30 * S)
        shop.fact("O2", "receipts", "boss", member="boss", read_up_to=about)  # read on another device
        shop.fact("O3", "chat", "cust")  # the marker: unread, so its push must come
        shop.advance(61 * S)
        shop.advance(125 * S)
        body = receiver.bodies.get(timeout=20)
        # O2's push would have been due before O3's, and one thread sends them in order: had it been
        # sent, it would have arrived first
        assert "O3" in body["title"]
        assert receiver.bodies.empty()
    finally:
        shop.service.close()


def test_a_failed_push_is_retried_then_shown_by_fishim_alerts(tmp_path: Path, failing: Receiver) -> None:
    db = tmp_path / "shop.db"
    shop = Shop(db, [f"json://127.0.0.1:{failing.port}/fishim"])
    try:
        shop.fact("O1", "chat", "cust")
        shop.advance(61 * S)
        shop.advance(121 * S)
        failing.bodies.get(timeout=20)
        failing.bodies.get(timeout=20)  # retried once (push_attempts: 2) after push_backoff
        deadline = time.monotonic() + 20
        while not shop.service.store.failed_pushes():
            assert time.monotonic() < deadline, "push never marked failed"
            time.sleep(0.02)
        shop.service.step()  # the worker records the failure on the alert
    finally:
        shop.service.close()
    result = CliRunner().invoke(main, ["alerts", "--json"], env={"FISHIM_DB": str(db)})
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [a["reason"] for a in data["alerts"]] == ["unanswered_customer"]
    assert data["alerts"][0]["push_error"].startswith("boss:")
    assert [(f["user"], f["attempts"]) for f in data["push_failures"]] == [("boss", 2)]
    text = CliRunner().invoke(main, ["alerts"], env={"FISHIM_DB": str(db)}).output
    assert "push failed" in text


def test_deadlines_and_open_alerts_survive_a_restart(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    first = Shop(db, [])
    first.fact("O1", "chat", "cust")  # due in 60 s
    first.fact("O2", "chat", "cust")
    first.advance(61 * S)  # O1 and O2 open, escalation due 10 min after
    first.fact("O3", "chat", "cust")  # pending, due in 60 s
    first.service.close()
    assert sorted((n.order, n.reason) for _u, n in first.sent) == [("O1", "unanswered_customer"),
                                                                   ("O2", "unanswered_customer")]
    second = Shop(db, [], now=first.now + 30 * S)  # a new process, 30 s later
    try:
        second.advance(31 * S)  # O3's deadline passed while down... and is kept, not restarted
        assert [(n.order, n.reason) for _u, n in second.sent] == [("O3", "unanswered_customer")]
        second.advance(10 * 60 * S)
        escalated = sorted(n.order for _u, n in second.sent if n.text.startswith("escalated"))
        assert escalated == ["O1", "O2", "O3"]  # once each, the two from before the restart included
        second.advance(10 * 60 * S)
        assert len(second.sent) == 4
    finally:
        second.service.close()


def test_an_ack_from_the_cli_reaches_the_running_service(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    shop = Shop(db, [])
    try:
        shop.fact("O1", "chat", "cust")
        shop.advance(61 * S)
        alert_id = shop.sent[0][1].alert
        assert alert_id is not None
        result = CliRunner().invoke(main, ["alerts", "ack", alert_id, "--by", "boss"], env={"FISHIM_DB": str(db)})
        assert result.exit_code == 0, result.output
        shop.advance(20 * 60 * S)  # no escalation: the service took the ack on its next step
        assert [n.text.startswith("escalated") for _u, n in shop.sent] == [False]
        assert alert_id not in shop.service.engine.alerts
        again = CliRunner().invoke(main, ["alerts", "ack", alert_id], env={"FISHIM_DB": str(db)})
        assert again.exit_code == 2 and "already closed" in again.output
        unknown = CliRunner().invoke(main, ["alerts", "ack", "al-nope"], env={"FISHIM_DB": str(db)})
        assert unknown.exit_code == 2 and "no alert" in unknown.output
    finally:
        shop.service.close()


def test_a_push_masks_a_customer_named_by_phone_number() -> None:
    from fishim.alerts import Outgoing
    from fishim.push import render

    note = Notification(id="n1", ts=T0, sender="fishim-bridge", priority="urgent", reason="unanswered_customer",
                        order="O1", text="customer 13812345678 is waiting for an answer on order O1", alert="al-1")
    title, body = render(Outgoing(id="p1", user="boss", kind="push", due_at=T0, notification=note, target=0))
    assert "13812345678" not in title + body and "*********78" in body
    assert title == "[urgent] unanswered customer - order O1"

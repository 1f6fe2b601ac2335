"""Alerts end to end: `fishim up`, real MQTT clients, the store, the CLI and an apprise webhook.

A customer's chat nobody answers becomes an urgent notification to staff on ``fishim/notify/{user}``
(stored with its ``seq``, in that user's sync and nobody else's), then an escalation to the owner,
who is offline and so gets it pushed to a local HTTP receiver. Acknowledging closes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from fishim.cli import main
from fishim.config import Config
from fishim.testing.mqtt import Collector, MqttClient, connect_client, publish_and_wait
from fishim.testing.stack import Stack
from tests._security_shop import make_shop
from tests.test_alerts_service import Receiver


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[tuple[Stack, dict[str, str]]]:
    """boss (owner, offline), clerk (staff), c1 with orders A1 and A3 (rider r1), c2 with A2."""
    db = tmp_path_factory.mktemp("alerts") / "shop.db"
    passwords = make_shop(db)
    config = Config.model_validate({
        "alerts": {"unanswered_customer_after": "1s", "escalate_after": "2s", "push_delay": "1s", "tick": 0.2},
        "push": [{"url": f"json://127.0.0.1:{receiver.port}/fishim", "roles": ["owner"], "min_priority": "urgent"}],
    })
    with Stack(db, kind="embedded", config=config, probe=("boss", passwords["boss"])) as stack:
        yield stack, passwords


def login(stack: Stack, passwords: dict[str, str], user: str, **kwargs: Any) -> MqttClient:
    return connect_client(stack.port, f"{user}-{time.monotonic_ns()}", username=user, password=passwords[user],
                          **kwargs)


def cli(stack: Stack, *args: str) -> Any:
    result = CliRunner().invoke(main, list(args), env={"FISHIM_DB": str(stack.db)})
    assert result.exit_code == 0, result.output
    return json.loads(result.output) if "--json" in args else result.output


def sync(client: MqttClient, user: str) -> list[dict[str, Any]]:
    """Every event of ``user``'s full replay (one request from 0, all pages)."""
    with Collector(client, f"fishim/sync/{user}/dev/events") as pages:
        publish_and_wait(client, f"fishim/sync/{user}/dev/request", json.dumps({"since": 0}))
        events: list[dict[str, Any]] = []
        while True:
            page = json.loads(pages.get(timeout=10).payload)
            events += page["events"]
            if page["done"]:
                return events


def ask(client: MqttClient, customer: str, order: str, inbox: Collector) -> dict[str, Any]:
    """The customer asks on its order's chat; nobody answers: the next notification in ``inbox``."""
    publish_and_wait(client, f"fishim/orders/{order}/chat/{customer}", json.dumps(
        {"id": f"{customer}-ask-{order}", "ts": 1_794_000_000_000, "sender": customer, "text": "where is it?"}))
    return json.loads(inbox.get(timeout=15).payload)


def wait_alert(stack: Stack, order: str | None, state: str, alert_id: str | None = None,
               timeout: float = 15.0) -> dict[str, Any]:
    """Poll `fishim alerts --json` until an alert of ``order`` (or with ``alert_id``) is in ``state``."""
    deadline = time.monotonic() + timeout
    while True:
        for alert in cli(stack, "alerts", "--json")["alerts"]:
            if (alert["id"] == alert_id or alert["order"] == order) and alert["state"] == state:
                return alert
        assert time.monotonic() < deadline, f"no {state} alert {alert_id or order}"
        time.sleep(0.1)


def test_unanswered_chat_notifies_staff_escalates_to_the_offline_owner_and_is_pushed(
        shop: tuple[Stack, dict[str, str]], receiver: Receiver) -> None:
    stack, passwords = shop
    with login(stack, passwords, "clerk") as clerk, login(stack, passwords, "c1") as c1, \
            Collector(clerk, "fishim/notify/clerk") as inbox:
        note = ask(c1, "c1", "A1", inbox)
        assert {k: note[k] for k in ("priority", "reason", "order")} == {
            "priority": "urgent", "reason": "unanswered_customer", "order": "A1"}
        assert set(note) >= {"id", "ts", "priority", "reason", "order", "text", "alert", "seq", "order_seq"}
        # stored: in the clerk's sync, with the same seq; in nobody else's
        assert [e["payload"]["id"] for e in sync(clerk, "clerk") if e["topic"] == "fishim/notify/clerk"] \
            == [note["id"]]
        assert not [e for e in sync(c1, "c1") if "/notify/" in e["topic"]]
        # escalated to the owner, who is offline: pushed to the webhook with priority and order
        body = receiver.bodies.get(timeout=20)
        assert "urgent" in body["title"] and "A1" in body["title"]
        assert "priority: urgent" in body["message"] and "order: A1" in body["message"]
        alert = wait_alert(stack, "A1", "open")
        assert alert["id"] == note["alert"] and alert["escalated"]
        listed = cli(stack, "orders", "list", "--json")["orders"]
        assert {o["id"]: o["alerts"] for o in listed}["A1"] == 1
        assert cli(stack, "stats", "--json")["alerts"]["open"] >= 1
        assert "acknowledged" in cli(stack, "alerts", "ack", note["alert"], "--by", "boss")
        closed = wait_alert(stack, "A1", "closed")
        assert closed["close_reason"] == "acknowledged" and closed["acked_by"] == "boss"


def test_a_staff_answer_closes_the_open_alert(
        shop: tuple[Stack, dict[str, str]]) -> None:
    stack, passwords = shop
    with login(stack, passwords, "clerk") as clerk, login(stack, passwords, "c2") as c2, \
            Collector(clerk, "fishim/notify/clerk") as inbox:
        note = ask(c2, "c2", "A2", inbox)
        assert note["order"] == "A2"
        publish_and_wait(clerk, "fishim/orders/A2/chat/clerk", json.dumps(
            {"id": "clerk-answer", "ts": 1_794_000_000_500, "sender": "clerk", "text": "sure"}))
        closed = wait_alert(stack, "A2", "closed")
        assert closed["close_reason"] == "answered"


def test_notifications_wait_in_an_offline_persistent_session(shop: tuple[Stack, dict[str, str]]) -> None:
    stack, passwords = shop
    clerk = connect_client(stack.port, "clerk-phone", clean_session=False, username="clerk",
                           password=passwords["clerk"])
    clerk.subscribe_and_wait("fishim/notify/clerk")
    clerk.close()  # offline, session kept
    with login(stack, passwords, "c1") as c1:
        publish_and_wait(c1, "fishim/orders/A3/chat/c1", json.dumps(
            {"id": "c1-ask-a3", "ts": 1_794_000_000_000, "sender": "c1", "text": "and the other one?"}))
        wait_alert(stack, "A3", "open")
    got: list[dict[str, Any]] = []

    def keep(_c: object, _u: object, msg: Any) -> None:
        got.append(json.loads(msg.payload))

    back = connect_client(stack.port, "clerk-phone", clean_session=False, username="clerk",
                          password=passwords["clerk"], setup=lambda c: setattr(c, "on_message", keep))
    try:
        deadline = time.monotonic() + 15
        while not any(n.get("order") == "A3" for n in got):
            assert time.monotonic() < deadline, "queued notification not delivered on reconnect"
            time.sleep(0.05)
    finally:
        back.close()


@pytest.fixture(scope="module")
def riders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, str]]]:
    """The same shop with a 1 s rider_offline threshold: r1 holds A1 and A3, r2 holds A2."""
    db = tmp_path_factory.mktemp("riders") / "shop.db"
    passwords = make_shop(db)
    config = Config.model_validate({"alerts": {"rider_offline_after": "1s", "escalate_after": "1h", "tick": 0.2}})
    with Stack(db, kind="embedded", config=config, probe=("boss", passwords["boss"])) as stack:
        yield stack, passwords


def test_a_rider_who_drops_off_holding_orders_raises_one_alert_per_order_until_back(
        riders: tuple[Stack, dict[str, str]]) -> None:
    stack, passwords = riders
    with login(stack, passwords, "clerk") as clerk, Collector(clerk, "fishim/notify/clerk") as inbox:
        # nobody has connected r1 since the start: its orders' alerts open, and close when it comes
        startup = {order: wait_alert(stack, order, "open")["id"] for order in ("A1", "A3")}
        rider = connect_client(stack.port, "r1-phone", username="r1", password=passwords["r1"])
        for order in ("A1", "A3"):
            assert wait_alert(stack, None, "closed", alert_id=startup[order])["close_reason"] == "rider_back"
        rider.close()  # gone again, holding A1 and A3
        notes: dict[str, dict[str, Any]] = {}
        while len(notes) < 2:
            note = json.loads(inbox.get(timeout=15).payload)
            if note["order"] in startup and note["alert"] not in startup.values():  # (r2's A2 alerts too)
                notes[note["order"]] = note
        assert sorted((n["reason"], o, n["priority"]) for o, n in notes.items()) == [
            ("rider_offline", "A1", "high"), ("rider_offline", "A3", "high")]
        with connect_client(stack.port, "r1-phone", username="r1", password=passwords["r1"]):
            for note in notes.values():
                assert wait_alert(stack, None, "closed", alert_id=note["alert"])["close_reason"] == "rider_back"
        raised = [a for a in cli(stack, "alerts", "--json")["alerts"]
                  if a["reason"] == "rider_offline" and a["order"] in ("A1", "A3")]
        assert len(raised) == 4  # per order: the one from start-up and the one for this drop, no more

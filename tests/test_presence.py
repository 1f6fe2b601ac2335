"""Presence through real MQTT: `fishim up` (broker + store), paho clients, the signal-loss proxy.

A user is online while any of its devices is connected; it goes offline when the last one goes,
however it goes (a link cut, or silence dropped after ``keepalive_grace`` x keepalive). Who may read
whose presence is the contract's: staff and owner everyone's; a customer only its open order's rider.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from fishim.store import Store
from fishim.testing.mqtt import Collector, MqttClient, connect_client, publish_and_wait
from fishim.testing.proxy import Proxy
from fishim.testing.stack import Stack
from tests._security_shop import make_shop

KEEPALIVE = 2  # seconds; the broker drops a silent client after 1.5 x this


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, dict[str, str]]]:
    """Accounts boss (owner), clerk (staff), r1/r2 (riders), c1/c2 (customers); orders A1, A3 (c1, r1)
    and A2 (c2, r2), all assigned."""
    db = tmp_path_factory.mktemp("presence") / "shop.db"
    passwords = make_shop(db)
    with Stack(db, kind="embedded", probe=("boss", passwords["boss"])) as stack:
        yield stack, passwords


def login(stack: Stack, passwords: dict[str, str], user: str, client_id: str, port: int | None = None,
          **kwargs: object) -> MqttClient:
    return connect_client(port or stack.port, client_id, username=user, password=passwords[user], **kwargs)


def next_presence(watch: Collector, user: str, timeout: float = 10.0) -> dict[str, object]:
    """The next live presence message about ``user`` (others' coming and going, and the retained
    value sent on SUBSCRIBE, are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        msg = watch.get(timeout=max(deadline - time.monotonic(), 0.01))
        if not msg.topic.startswith("fishim/presence/") or msg.retain:
            continue
        body = json.loads(msg.payload)
        if body["user"] == user:
            return body


def test_online_while_any_device_is_connected_offline_when_the_last_goes_silent(
        shop: tuple[Stack, dict[str, str]]) -> None:
    stack, passwords = shop
    with login(stack, passwords, "clerk", "clerk-pc") as clerk, Collector(clerk, "fishim/presence/r1") as watch, \
            Proxy("127.0.0.1", stack.port) as link_a, Proxy("127.0.0.1", stack.port) as link_b:
        phone = login(stack, passwords, "r1", "r1-phone", port=link_a.port, keepalive=KEEPALIVE)
        first = next_presence(watch, "r1")
        assert (first["state"], first["devices"]) == ("online", 1)
        tablet = login(stack, passwords, "r1", "r1-tablet", port=link_b.port, keepalive=KEEPALIVE)
        try:
            second = next_presence(watch, "r1")
            assert (second["state"], second["devices"]) == ("online", 2)
            link_a.cut(refuse=True)  # the phone's link dies; it cannot come back
            after_cut = next_presence(watch, "r1")
            assert (after_cut["state"], after_cut["devices"]) == ("online", 1)
            assert after_cut["since"] == second["since"]  # still online since the first device came
            link_b.stall()  # the tablet goes silent: no packet either way, nothing closes
            stalled_at = int(time.time() * 1000)
            gone = next_presence(watch, "r1", timeout=10 * KEEPALIVE)
            assert (gone["state"], gone["devices"]) == ("offline", 0)
            assert gone["last_seen"] - stalled_at <= 1.5 * KEEPALIVE * 1000 + 1000  # + scheduling slack
        finally:
            phone.close()
            tablet.close()


def test_presence_payload_fields(shop: tuple[Stack, dict[str, str]]) -> None:
    stack, passwords = shop
    with login(stack, passwords, "boss", "boss-fields") as boss, Collector(boss, "fishim/presence/r2") as watch:
        with login(stack, passwords, "r2", "r2-phone"):
            body = next_presence(watch, "r2")
        assert set(body) == {"user", "state", "devices", "since", "last_seen"}
        assert body["state"] == "online" and body["devices"] == 1
        assert isinstance(body["since"], int) and body["last_seen"] >= body["since"]
        assert next_presence(watch, "r2")["state"] == "offline"  # a clean DISCONNECT counts too


def test_a_customer_sees_its_riders_presence_only_while_the_order_is_open(
        shop: tuple[Stack, dict[str, str]]) -> None:
    stack, passwords = shop
    with login(stack, passwords, "c2", "c2-phone") as c2, login(stack, passwords, "c1", "c1-phone") as c1, \
            Collector(c2, ["fishim/presence/+", "fishim/orders/A2/#"]) as c2_sees, \
            Collector(c1, "fishim/presence/+") as c1_sees:
        with login(stack, passwords, "r2", "r2-a"):
            assert next_presence(c2_sees, "r2")["state"] == "online"
        assert next_presence(c2_sees, "r2")["state"] == "offline"
        with login(stack, passwords, "r2", "r2-b") as rider:
            assert next_presence(c2_sees, "r2")["state"] == "online"
            for n, state in enumerate(("picked_up", "delivering", "delivered")):
                publish_and_wait(rider, "fishim/orders/A2/status", json.dumps(
                    {"id": f"a2-{state}", "ts": 1_700_000_000_000 + n, "sender": "r2", "state": state}), retain=True)
            _until_status(c2_sees, "delivered")
            _until_stored(stack, "A2", "delivered")  # behind a bridge, routing may precede the commit
        # A2 is delivered: r2 leaving and coming back is no longer c2's business
        with login(stack, passwords, "r2", "r2-c"):
            publish_and_wait(c2, "fishim/orders/A2/chat/c2", json.dumps(
                {"id": "a2-thanks", "ts": 1_700_000_000_100, "sender": "c2", "text": "thanks!"}))
            seen = _until_chat(c2_sees, "a2-thanks")
        assert [t for t in seen if t.startswith("fishim/presence/")] == []
        # c1 (another customer, with a rider of its own) never saw r2 at all
        assert all(json.loads(m.payload)["user"] != "r2" for m in c1_sees.drain())


def test_nobody_but_fishim_publishes_presence(shop: tuple[Stack, dict[str, str]]) -> None:
    stack, passwords = shop
    with login(stack, passwords, "boss", "boss-errors") as boss, \
            Collector(boss, ["fishim/errors/boss", "fishim/presence/boss"]) as seen:
        publish_and_wait(boss, "fishim/presence/boss", json.dumps(
            {"user": "boss", "state": "offline", "devices": 0, "since": 1, "last_seen": 1}), retain=True)
        while True:
            msg = seen.get(timeout=10)
            if msg.topic == "fishim/errors/boss":
                break
            assert json.loads(msg.payload)["state"] == "online"  # only fishim's own word on it
        assert json.loads(msg.payload)["error"] == "forbidden"


def _until_status(watch: Collector, state: str) -> None:
    while True:
        msg = watch.get(timeout=10)
        if msg.topic.endswith("/status") and json.loads(msg.payload).get("state") == state:
            return


def _until_stored(stack: Stack, order: str, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with Store(stack.db, readonly=True) as store:
        while (row := store.get_order(order)) is None or row.state != state:
            if time.monotonic() > deadline:
                raise TimeoutError(f"order {order} not {state} in the store")
            time.sleep(0.02)


def _until_chat(watch: Collector, ident: str) -> list[str]:
    """Topics received up to the chat ``ident`` (routed after everything before it)."""
    topics = []
    while True:
        msg = watch.get(timeout=10)
        if "/chat/" in msg.topic and json.loads(msg.payload).get("id") == ident:
            return topics
        topics.append(msg.topic)


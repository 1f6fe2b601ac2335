"""The error-message table: each bad input, published over real MQTT to a real `fishim up`, and the
exact `fishim/errors/{user}` message its sender gets (code, envelope id, detail). The table doubles
as documentation of what an app developer sees; docs/protocol.md lists the codes and their fixes."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from fishim.auth import add_user
from fishim.store import Store
from fishim.testing.mqtt import Collector, MqttClient, connect_client, publish_and_wait
from fishim.testing.stack import Stack

E1 = "fishim/orders/E1"
E2 = "fishim/orders/E2"
USERS = {"shop": "staff", "cust1": "customer", "rider1": "rider", "scan1": "scanner"}

def env(ident: str, sender: str, **fields: Any) -> bytes:
    return json.dumps({"id": ident, "ts": 1794366000000, "sender": sender, **fields}).encode()


# (who publishes, topic, payload, the error message it gets: (code, id, detail), stored anyway?)
TABLE: list[tuple[str, str, bytes, tuple[str, str | None, str], bool]] = [
    ("cust1", f"{E1}/chat/cust1", b"{not json",
     ("bad_json", None, "payload is not UTF-8 JSON: Invalid JSON: key must be a string at line 1 column 2"), False),
    ("cust1", f"{E1}/chat/cust1", b'{"id": "e-arr", "sender": "cust1", "text": ["hi"], "ts": "yesterday"}',
     ("bad_schema", "e-arr", "ts: ts is not RFC 3339: 'yesterday'; text: Input should be a valid string"), False),
    ("shop", f"{E1}/location", env("e-loc", "shop", lat=91, lon="east"),
     ("bad_schema", "e-loc", "lat: Input should be less than or equal to 90; "
                             "lon: Input should be a valid number, unable to parse string as a number"), False),
    ("shop", f"{E2}/location", env("e-acc", "shop", lat=30.27, lon=120.15, acc=6),
     ("unknown_field", "e-acc", "unknown field 'acc': did you mean 'accuracy_m'? (message stored; 'acc' kept as is)"),
     True),
    ("shop", f"{E2}/status", env("e-eta", "shop", state="confirmed", eta_min=15),
     ("unknown_field", "e-eta", "unknown field 'eta_min': did you mean 'eta'? (message stored; 'eta_min' kept as is)"),
     True),
    ("cust1", f"{E1}/chat/cust1", env("e-who", "rider1", text="hi"),
     ("sender_mismatch", "e-who", "envelope sender 'rider1' does not match topic leaf 'cust1'"), False),
    ("shop", f"{E1}/status", env("e-jump", "shop", state="delivered"),
     ("illegal_transition", "e-jump", "order E1: picking -> delivered is not allowed"), False),
    ("shop", "fishim/orders/E9/status", env("e-none", "shop", state="confirmed"),
     ("unknown_order", "e-none", "unknown order: first status must be 'placed', not 'confirmed'"), False),
    ("shop", "fishim/orders/E9/status", env("e-bare", "shop", state="placed", customer="cust1"),
     ("bad_schema", "e-bare", "'placed' must carry 'customer' and non-empty 'items'"), False),
    ("scan1", f"{E1}/picks", env("e-sku", "scan1", sku="reel-9", qty=1),
     ("unknown_sku", "e-sku", "sku 'reel-9' is not an item of order E1"), False),
    ("scan1", f"{E1}/picks", env("e-over", "scan1", sku="hook", qty=3),
     ("over_pick", "e-over", "sku hook: 3 picked, order wants 2"), False),
    ("cust1", f"{E1}/chat/cust1", env("e-reply", "cust1", text="?", reply_to="nope"),
     ("bad_reply_to", "e-reply", "reply_to 'nope' is not a message of order E1"), False),
    ("cust1", f"{E1}/chat/cust1", env("e-ment", "cust1", text="hey @rider1", mentions=["rider1"]),
     ("bad_mention", "e-ment", "mention 'rider1' is not a member of order E1"), False),
    ("cust1", f"{E1}/chat/cust1", env("e-media", "cust1", text="look", media=[{"kind": "image"}]),
     ("bad_media", "e-media", "media image needs 'sha256' or 'url'"), False),
    ("cust1", f"{E1}/receipts/cust1", env("e-far", "cust1", read_up_to=99),
     ("bad_schema", "e-far", "read_up_to 99 is past the order's last event 5"), False),
    ("cust1", f"{E1}/receipts/cust1", env("e-back", "cust1", read_up_to=1),
     ("receipt_backwards", "e-back", "read_up_to 1 is behind 3"), False),
    ("cust1", f"{E1}/status", env("e-acl", "cust1", state="cancelled"),
     ("forbidden", "e-acl", f"not allowed to publish to {E1}/status"), False),
    ("cust1", "fishim/sync/cust1/app/request", b'{"since": -4, "id": "e-sync"}',
     ("bad_schema", "e-sync", "since: Input should be greater than or equal to 0"), False),
    ("cust1", "fishim/sync/cust1/app/request", b'{"since": 1000000, "id": "e-ahead"}',
     ("cursor_ahead", "e-ahead", "cursor 1000000 is ahead of this store (was it reset?): sync from 0"), False),
]


def wait_stored(db: Path, ident: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with Store(db, readonly=True) as store:
            if store.get_event(ident) is not None:
                return
        assert time.monotonic() < deadline, f"{ident} never stored"
        time.sleep(0.02)


class Shop(NamedTuple):
    stack: Stack
    clients: dict[str, MqttClient]
    passwords: dict[str, str]


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shop]:
    """`fishim up` with four accounts and order E1 (placed, confirmed, one pick: picking), each user
    connected once."""
    db = tmp_path_factory.mktemp("errors") / "shop.db"
    passwords = {name: secrets.token_urlsafe(12) for name in USERS}
    with Store(db) as store:
        for name, role in USERS.items():
            add_user(store, name, role, passwords[name])
    stack = Stack(db, kind="embedded", probe=("shop", passwords["shop"])).start()
    clients: dict[str, MqttClient] = {}
    try:
        for name in USERS:
            clients[name] = connect_client(stack.port, f"{name}-table", username=name, password=passwords[name])
        setup = [("shop", f"{E1}/status", env("E1-placed", "shop", state="placed", customer="cust1",
                                               items=[{"sku": "rod"}, {"sku": "hook", "qty": 2}])),
                 ("shop", f"{E1}/status", env("E1-conf", "shop", state="confirmed")),
                 ("scan1", f"{E1}/picks", env("E1-pick", "scan1", sku="rod", qty=1)),
                 ("cust1", f"{E1}/receipts/cust1", env("E1-read", "cust1", read_up_to=3)),
                 ("shop", f"{E2}/status", env("E2-placed", "shop", state="placed", customer="cust1",
                                              items=[{"sku": "rod"}]))]
        for user, topic, payload in setup:  # each stored before the next: they come from different clients
            publish_and_wait(clients[user], topic, payload, retain=not topic.endswith("picks"))
            wait_stored(db, json.loads(payload)["id"])
        yield Shop(stack, clients, passwords)
    finally:
        for client in clients.values():
            client.close()
        stack.close()


@pytest.mark.parametrize(("user", "topic", "payload", "told", "stored"), TABLE,
                         ids=[f"{row[3][0]}-{row[3][1] or 'noid'}" for row in TABLE])
def test_the_sender_is_told_exactly(shop: Shop, user: str, topic: str, payload: bytes,
                                    told: tuple[str, str | None, str], stored: bool) -> None:
    stack, clients, _ = shop
    client = clients[user]
    with Collector(client, f"fishim/errors/{user}") as errors:
        publish_and_wait(client, topic, payload)
        message = errors.get(timeout=10).json()
    assert (message["error"], message.get("id"), message["detail"]) == told
    assert message["topic"] == topic
    ident = told[1]
    if ident is not None and "/orders/" in topic:
        with Store(stack.db, readonly=True) as store:
            assert (store.get_event(ident) is not None) is stored


def test_an_oversize_message_is_refused_with_its_id(shop: Shop) -> None:
    """The broker drops the connection of an oversize publish; another session of the user hears why."""
    stack, clients, passwords = shop
    listener = clients["cust1"]
    big = env("e-big", "cust1", text="x" * 70_000)
    with Collector(listener, "fishim/errors/cust1") as errors:
        sender = connect_client(stack.port, "cust1-big", username="cust1", password=passwords["cust1"])
        try:
            sender.publish(f"{E1}/chat/cust1", big, qos=1)
            message = errors.get(timeout=10).json()
        finally:
            sender.close()
    assert (message["error"], message.get("id"), message["detail"]) == \
        ("too_large", "e-big", "payload over limits.max_payload (65536 bytes)")

"""Orders as the unit of conversation, end to end: real embedded broker, real bridge, real SQLite,
real paho clients. The pure rules are tabled in test_orders_rules.py; here each rule is shown
through MQTT: the sender gets an error, the store a dead letter, and retained state does not move.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from fishim.bridge import Bridge
from fishim.cli import main as cli
from fishim.config import Config, ListenerConfig
from fishim.store import Store
from fishim.testing.mqtt import Collector, MqttClient, connect_client, publish_and_wait
from fishim.topics import Topics

T = Topics()
_ids = itertools.count(1)


class Shop:
    """One broker + bridge + store, and helpers to publish as any member and await the bridge."""

    def __init__(self, broker: Any, db: Path) -> None:
        self.port = broker.port
        self.db = db
        config = Config(listeners=[ListenerConfig(bind=f"127.0.0.1:{self.port}")], store={"path": db})
        self.bridge = Bridge(config, f"mqtt://127.0.0.1:{self.port}")
        self.bridge.start()
        self.bridge.wait_ready(15)
        self.client: MqttClient = connect_client(self.port, client_id="shop-system")

    def send(self, topic: str, sender: str, retain: bool = False, **fields: Any) -> str:
        """Publish one enveloped message and wait until the bridge has committed (or refused) it."""
        msg_id = f"m{next(_ids)}"
        before = self.bridge.stats.processed
        body = {"id": msg_id, "ts": 1794366000000, "sender": sender, **fields}
        publish_and_wait(self.client, topic, body, qos=1, retain=retain)
        self.bridge.wait_for(lambda s: s.processed > before, timeout=10)
        return msg_id

    def status(self, order: str, state: str, sender: str = "shop", **fields: Any) -> str:
        return self.send(T.status(order), sender, retain=True, state=state, **fields)

    def place(self, order: str, items: list[dict[str, Any]] | None = None) -> None:
        self.status(order, "placed", customer="cust1", items=items or [{"sku": "rod", "qty": 1}])

    def store(self) -> Store:
        return Store(self.db, readonly=True)

    def retained_status(self, order: str) -> dict[str, Any]:
        """What a brand-new subscriber gets as the order's retained status."""
        with connect_client(self.port) as fresh, Collector(fresh, T.status(order)) as seen:
            return seen.get(timeout=5).json()

    def close(self) -> None:
        self.client.close()
        self.bridge.stop()


@pytest.fixture
def shop(embedded_broker: Any, tmp_path: Path) -> Iterator[Shop]:
    s = Shop(embedded_broker, tmp_path / "shop.db")
    yield s
    s.close()


@pytest.fixture
def errors_of(shop: Shop) -> Iterator[Callable[[str], Collector]]:
    """A collector on fishim/errors/{user}, opened before the bad message is sent."""
    opened: list[tuple[MqttClient, Collector]] = []

    def open_for(user: str) -> Collector:
        client = connect_client(shop.port)
        collector = Collector(client, T.errors(user))
        opened.append((client, collector))
        return collector

    yield open_for
    for client, collector in opened:
        collector.close()
        client.close()


HAPPY = ["confirmed", "picking", "packed", "assigned", "picked_up", "delivering"]

ILLEGAL = [
    ([], "delivered"),
    ([], "picked_up"),
    (["confirmed"], "assigned"),
    (["confirmed", "picking", "packed"], "delivering"),
    ([*HAPPY, "delivered"], "cancelled"),
    ([*HAPPY, "delivered"], "delivering"),
    (["cancelled"], "confirmed"),
    ([], "placed"),
]


@pytest.mark.parametrize(("path", "bad"), ILLEGAL, ids=[f"{(p or ['placed'])[-1]}->{b}" for p, b in ILLEGAL])
def test_illegal_transitions_are_refused_and_retained_state_unchanged(
    shop: Shop, errors_of: Callable[[str], Collector], path: list[str], bad: str
) -> None:
    order = f"o-{bad}-{len(path)}"
    shop.place(order)
    for state in path:
        shop.status(order, state, **({"rider": "rider7"} if state == "assigned" else {}))
    errors = errors_of("shop")
    bad_id = shop.status(order, bad, **({"customer": "cust1", "items": [{"sku": "rod"}]} if bad == "placed" else {}))

    error = errors.get(timeout=5).json()
    assert error["error"] == "illegal_transition"
    assert error["id"] == bad_id
    assert f"-> {bad}" in error["detail"]
    expected = (path or ["placed"])[-1]
    with shop.store() as store:
        assert store.get_order(order).state == expected
        assert not store.has_event(bad_id)
        assert [d.msg_id for d in store.deadletters()] == [bad_id]
    assert shop.retained_status(order)["state"] == expected


def test_status_for_unknown_order_and_assigned_without_rider(shop: Shop, errors_of: Callable[[str], Collector]) -> None:
    errors = errors_of("shop")
    shop.status("o-ghost", "confirmed")
    assert errors.get(timeout=5).json()["error"] == "unknown_order"
    shop.place("o-2")
    for state in ("confirmed", "picking", "packed"):
        shop.status("o-2", state)
    shop.status("o-2", "assigned")
    error = errors.get(timeout=5).json()
    assert error["error"] == "bad_schema" and "rider" in error["detail"]
    with shop.store() as store:
        assert store.get_order("o-ghost") is None
        assert store.get_order("o-2").state == "packed"


def test_pick_sequence_ends_in_automatic_packed(shop: Shop, errors_of: Callable[[str], Collector]) -> None:
    order = "o-picks"
    shop.place(order, items=[{"sku": "rod-3m", "qty": 1}, {"sku": "reel-2000", "qty": 2}])
    shop.status(order, "confirmed")
    scanner_errors = errors_of("scanner1")
    with connect_client(shop.port) as rider_app, Collector(rider_app, T.status(order)) as statuses:
        assert statuses.get(timeout=5).json()["state"] == "confirmed"  # the retained one
        shop.send(T.picks(order), "scanner1", sku="rod-3m", qty=1, bin="A3")
        shop.send(T.picks(order), "scanner1", sku="hook", qty=1)  # not in the order
        shop.send(T.picks(order), "scanner1", sku="reel-2000", qty=3)  # over-pick
        shop.send(T.picks(order), "scanner1", sku="reel-2000", qty=1)
        shop.send(T.picks(order), "scanner1", sku="reel-2000", qty=1)
        auto = [m.json() for m in statuses.wait_for(2, timeout=5)]

    assert [(a["state"], a["sender"]) for a in auto] == [("picking", "fishim-bridge"), ("packed", "fishim-bridge")]
    assert [scanner_errors.get(timeout=5).json()["error"] for _ in range(2)] == ["unknown_sku", "over_pick"]
    with shop.store() as store:
        row = store.get_order(order)
        assert row.state == "packed"
        assert row.picked == {"rod-3m": 1, "reel-2000": 2}
        channels = [(e.channel, json.loads(e.payload).get("state")) for e in store.order_events(order)]
    assert channels == [("status", "placed"), ("status", "confirmed"), ("picks", None), ("status", "picking"),
                        ("picks", None), ("picks", None), ("status", "packed")]
    assert shop.retained_status(order)["state"] == "packed"


def test_membership_follows_placed_and_assigned(shop: Shop) -> None:
    order = "o-members"
    shop.place(order)
    for state in ("confirmed", "picking", "packed"):
        shop.status(order, state)
    shop.status(order, "assigned", rider="rider7")
    with shop.store() as store:
        row = store.get_order(order)
        assert (row.customer, row.rider) == ("cust1", "rider7")
        assert order in store.order_ids_for("rider7", "rider")
    shop.status(order, "assigned", rider="rider9")  # reassigned
    with shop.store() as store:
        assert store.get_order(order).rider == "rider9"
        assert order not in store.order_ids_for("rider7", "rider")
        assert order in store.order_ids_for("rider9", "rider")


def test_read_receipts_never_move_backwards(shop: Shop, errors_of: Callable[[str], Collector]) -> None:
    order = "o-receipts"
    shop.place(order)
    for n in range(4):
        shop.send(T.chat(order, "shop"), "shop", text=f"update {n}")
    errors = errors_of("cust1")
    shop.send(T.receipts(order, "cust1"), "cust1", retain=True, read_up_to=4)
    shop.send(T.receipts(order, "cust1"), "cust1", retain=True, read_up_to=2)  # an old device, behind
    assert errors.get(timeout=5).json()["error"] == "receipt_backwards"
    shop.send(T.receipts(order, "cust1"), "cust1", retain=True, read_up_to=99)  # past the order's end
    assert errors.get(timeout=5).json()["error"] == "bad_schema"
    with shop.store() as store:
        assert store.receipts(order) == {"cust1": 4}
    with connect_client(shop.port) as other_device, Collector(other_device, T.receipts(order, "cust1")) as seen:
        assert seen.get(timeout=5).json()["read_up_to"] == 4


def test_chat_mentions_reply_to_and_media_are_checked(shop: Shop, errors_of: Callable[[str], Collector]) -> None:
    order = "o-chat"
    shop.place(order)
    first = shop.send(T.chat(order, "cust1"), "cust1", text="Is the 3m rod in stock?")
    good_media = {"kind": "image", "sha256": "a" * 64, "mime": "image/jpeg", "size": 120_000}
    reply = shop.send(T.chat(order, "shop"), "shop", text="Yes, photo attached", reply_to=first,
                      mentions=["cust1"], media=[good_media])
    errors = errors_of("cust1")
    leaf_errors = errors_of("rider7")  # the leaf is what the broker binds to the login: its owner is told
    shop.send(T.chat(order, "cust1"), "cust1", text="hey", mentions=["stranger"])
    shop.send(T.chat(order, "cust1"), "cust1", text="re", reply_to="no-such-message")
    shop.send(T.chat(order, "cust1"), "cust1", text="pic", media=[{"kind": "image", "mime": "image/png"}])
    shop.send(T.chat(order, "cust1"), "cust1", text="big", media=[{"kind": "video", "url": "https://x/v.mp4",
                                                                   "size": 10**9}])
    shop.send(T.chat(order, "rider7"), "cust1", text="spoofed leaf")
    got = [errors.get(timeout=5).json()["error"] for _ in range(4)]
    assert got == ["bad_mention", "bad_reply_to", "bad_media", "bad_media"]
    assert leaf_errors.get(timeout=5).json()["error"] == "sender_mismatch"
    with shop.store() as store:
        stored = [e.id for e in store.order_events(order) if e.channel == "chat"]
        assert stored == [first, reply]
        assert len(store.deadletters()) == 5


def test_orders_show_json_returns_the_timeline(shop: Shop) -> None:
    order = "o-timeline"
    shop.place(order, items=[{"sku": "rod", "qty": 1}])
    shop.status(order, "confirmed")
    shop.send(T.chat(order, "cust1"), "cust1", text="before 6pm please")
    shop.send(T.picks(order), "scanner1", sku="rod", qty=1)
    shop.bridge.wait_for(lambda s: s.stored >= 6, timeout=10)  # the automatic picking + packed too
    result = CliRunner().invoke(cli, ["orders", "show", order, "--json"], env={"FISHIM_DB": str(shop.db)})
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    events = shown["timeline"] if isinstance(shown, dict) else shown
    kinds = [(e.get("channel"), (e.get("payload") or e).get("state")) for e in events]
    assert kinds == [("status", "placed"), ("status", "confirmed"), ("chat", None), ("picks", None),
                     ("status", "picking"), ("status", "packed")]

"""FishimClient for app developers, against a real `fishim up`: the order projection (`orders()`),
server stamps on live events, `mark_read`, `on_order_changed`, never showing a refused status, and
catching up at once when an order's `order_seq` jumps."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fishim.client import ClientEvent, FishimClient, OrderView
from fishim.store import Store
from fishim.testing.stack import Stack

ITEMS = [{"sku": "rod", "qty": 1}, {"sku": "hook", "qty": 2}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    running = Stack(tmp_path_factory.mktemp("client") / "shop.db", kind="embedded").start()
    try:
        yield running
    finally:
        running.close()


def open_order(shop: FishimClient, order: str, customer: str, rider: str) -> None:
    shop.publish_status(order, "placed", customer=customer, items=ITEMS)
    for state in ("confirmed", "picking", "packed"):
        shop.publish_status(order, state)
    shop.publish_status(order, "assigned", rider=rider)


def until(check: Callable[[], Any], what: str, timeout: float = 15) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)
    return value


def take(client: FishimClient, stop: Callable[[ClientEvent], bool], timeout: float = 15) -> list[ClientEvent]:
    """Events delivered until (and including) the first that satisfies ``stop``."""
    got: list[ClientEvent] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for event in client.events(timeout=0.2):
            got.append(event)
            if stop(event):
                return got
    pytest.fail(f"no such event within {timeout}s; got {[e.payload for e in got][-5:]}")


def test_projection_stamps_and_mark_read(stack: Stack) -> None:
    with FishimClient("127.0.0.1", stack.port, "shop-p") as shop, \
            FishimClient("127.0.0.1", stack.port, "cust-p") as customer:
        open_order(shop, "P1", "cust-p", "rider-p")
        customer.subscribe_orders()
        take(customer, lambda e: e.payload.get("state") == "assigned")
        shop.publish_chat("P1", "your parcel is packed")
        chat = take(customer, lambda e: e.channel == "chat")[-1]
        assert chat.source == "live" and chat.seq is not None and chat.order_seq == 6  # stamped by the server
        view = customer.orders()["P1"]
        assert (view.state, view.rider, view.customer, view.order_seq) == ("assigned", "rider-p", "cust-p", 6)
        assert view.items == ITEMS
        assert view.unread == 6  # five status changes and a chat, all from the shop

        assert customer.mark_read(chat) is not None
        assert customer.orders()["P1"].unread == 0
        assert customer.mark_read(chat) is None  # nothing new: no second receipt

        def shop_sees_it_read() -> bool:
            with Store(stack.db, readonly=True) as store:
                (row,) = [o for o in store.order_overview() if o.order.id == "P1"]
                return row.unread["customer"] == 0 and store.get_receipt("P1", "cust-p") == 6
        until(shop_sees_it_read, "the shop's unread count for the customer drops to 0")


def test_a_refused_status_is_never_shown_and_a_pending_one_rolls_back(stack: Stack) -> None:
    changes: list[OrderView] = []
    lock = threading.Lock()

    def changed(view: OrderView) -> None:
        with lock:
            changes.append(view)

    with FishimClient("127.0.0.1", stack.port, "shop-r") as shop, \
            FishimClient("127.0.0.1", stack.port, "rider-r", on_order_changed=changed) as rider:
        open_order(shop, "R1", "cust-r", "rider-r")
        rider.subscribe_orders()
        until(lambda: rider.orders().get("R1") and rider.orders()["R1"].state == "assigned", "assigned shown")
        bad = rider.publish_status("R1", "delivered")  # assigned -> delivered: refused
        error = next(rider.errors(timeout=10))
        assert (error.id, error.error) == (bad, "illegal_transition")
        until(lambda: rider.orders()["R1"].pending_state is None, "the pending status rolled back")
        good = rider.publish_status("R1", "picked_up")
        until(lambda: rider.orders()["R1"].state == "picked_up", "the accepted status shown")
        shop.publish_chat("R1", "marker")  # nothing about R1 comes after this
        until(lambda: any(v.order_seq == 7 for v in changes), "the marker delivered")
    with lock:
        shown = [v.state for v in changes if v.order == "R1"]
        pending = [v.pending_state for v in changes if v.order == "R1"]
    assert "delivered" not in shown, "a refused status was shown as the order's state"
    assert "delivered" in pending  # it was shown as pending, then withdrawn
    assert shown[-1] == "picked_up" and changes[-1].pending_id is None
    with Store(stack.db, readonly=True) as store:
        assert store.get_event(bad) is None and store.get_event(good) is not None


def test_a_jump_in_order_seq_syncs_at_once(stack: Stack) -> None:
    """A QoS-1 message lost on its way to the client (amqtt drops in-flight ones on a timeout) is
    simulated by dropping it in the client's network callback: the next live event of that order
    jumps, the client syncs at once and delivers both, in order, once each."""
    with FishimClient("127.0.0.1", stack.port, "shop-g") as shop, \
            FishimClient("127.0.0.1", stack.port, "cust-g", sync_interval=None) as customer:
        open_order(shop, "G1", "cust-g", "rider-g")
        customer.subscribe_orders()
        take(customer, lambda e: e.payload.get("state") == "assigned")
        deliver = customer._mqtt.on_message

        def lossy(client: Any, userdata: Any, msg: Any) -> None:
            if "/orders/" not in msg.topic or b'"text":"lost on the way"' not in msg.payload:
                deliver(client, userdata, msg)

        customer._mqtt.on_message = lossy
        syncs = customer.stats["syncs"]
        shop.publish_chat("G1", "lost on the way")
        shop.publish_chat("G1", "right after")
        got = take(customer, lambda e: e.payload.get("text") == "right after")
    texts = [(e.payload.get("text"), e.order_seq, e.source) for e in got]
    assert texts == [("lost on the way", 6, "replay"), ("right after", 7, "replay")] or \
        texts == [("lost on the way", 6, "replay"), ("right after", 7, "live")], texts
    assert customer.stats["gaps"] == 1 and customer.stats["syncs"] == syncs + 1


def test_views_survive_a_restart(stack: Stack, tmp_path: Path) -> None:
    cursor = tmp_path / "cust.cursor"
    with FishimClient("127.0.0.1", stack.port, "shop-v") as shop:
        open_order(shop, "V1", "cust-v", "rider-v")
        with FishimClient("127.0.0.1", stack.port, "cust-v", cursor_path=cursor) as customer:
            customer.subscribe_orders()
            take(customer, lambda e: e.payload.get("state") == "assigned")
        with FishimClient("127.0.0.1", stack.port, "cust-v", cursor_path=cursor) as again:
            assert again.orders()["V1"].state == "assigned"  # before any sync: from the cursor file
            again.subscribe_orders()
            shop.publish_status("V1", "picked_up")
            late = take(again, lambda e: e.payload.get("state") == "picked_up")
    assert [e.order_seq for e in late] == [6]  # nothing shown twice after the restart

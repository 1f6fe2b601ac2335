"""Retained status and location survive a restart of the broker and the bridge, memory wiped or not.

The bridge keeps every retained payload in SQLite and republishes all of it on each connect before it
serves anything, so a broker that comes back empty (embedded amqtt, or Mosquitto whose persistence file
is gone) hands new subscribers the same retained state as before.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _bridge_support import Brokers, location, placed, status, without_stamps

from fishim.bridge import Bridge
from fishim.config import Config
from fishim.testing.mosquitto import find_mosquitto
from fishim.testing.mqtt import Collector, connect_client, publish_and_wait

ORDERS = 8
CASES = ["mosquitto-persisted", "mosquitto-wiped", "embedded"]


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Brokers, bool]]:
    kind = request.param.split("-")[0]
    if kind == "mosquitto" and find_mosquitto() is None:
        pytest.skip("Debian mosquitto not installed")
    brokers = Brokers(kind, tmp_path)
    try:
        yield brokers, request.param.endswith("wiped")
    finally:
        brokers.close()


def _config(brokers: Brokers) -> Config:
    return Config.model_validate({"store": {"path": str(brokers.db)},
                                  "listeners": [{"bind": f"127.0.0.1:{brokers.port}"}]})


MARKER = "fishim/test/retained-marker"  # outside the order tree: routed as is, never stored


def _retained_now(port: int, expected: int) -> dict[str, Any]:
    """What a brand-new subscriber is handed on subscribe: topic -> retained body, without the server
    stamps (``seq``/``order_seq``) the bridge adds to what it stores and republishes; and nothing more.

    A marker published after the expected messages arrived comes next: any extra retained message
    would have been in the subscribe burst, ahead of it.
    """
    with connect_client(port) as fresh, \
            Collector(fresh, ["fishim/orders/+/status", "fishim/orders/+/location", MARKER]) as inbox:
        got = inbox.wait_for(expected, timeout=10)
        assert all(m.retain for m in got)
        publish_and_wait(fresh, MARKER, b"marker")
        assert inbox.get(timeout=10).topic == MARKER, "more retained messages than expected"
        return {m.topic: without_stamps(m.payload) for m in got}


def test_retained_state_survives_broker_and_bridge_restart(case: tuple[Brokers, bool]) -> None:
    brokers, wipe = case
    config = _config(brokers)
    latest: dict[str, bytes] = {}
    with Bridge(config, brokers.bridge_url()) as bridge:
        bridge.wait_ready()
        with connect_client(brokers.port) as shop:
            for o in range(ORDERS):
                order = f"R{o}"
                publish_and_wait(shop, f"fishim/orders/{order}/status", placed(order), retain=True)
                confirmed = status(order, "confirmed", f"confirmed-{order}")
                publish_and_wait(shop, f"fishim/orders/{order}/status", confirmed, retain=True)
                latest[f"fishim/orders/{order}/status"] = confirmed
                for i, qos in enumerate((1, 0)):  # locations may come QoS 0: stored all the same
                    fix = location(f"loc-{order}-{i}", 30.25 + o / 100 + i / 1000, 120.1)
                    shop.publish(f"fishim/orders/{order}/location", fix, qos=qos, retain=True)
                    latest[f"fishim/orders/{order}/location"] = fix
        bridge.wait_for(lambda s: s.stored >= ORDERS * 4)
        assert _retained_now(brokers.port, 2 * ORDERS) == {t: json.loads(p) for t, p in latest.items()}

    brokers.stop()
    brokers.start(wipe=wipe)
    with Bridge(config, brokers.bridge_url()) as bridge:
        bridge.wait_ready()  # retained republished and acknowledged by the broker
        assert bridge.stats.republished >= 2 * ORDERS
        assert _retained_now(brokers.port, 2 * ORDERS) == {t: json.loads(p) for t, p in latest.items()}


@pytest.mark.mosquitto
def test_bridge_refills_a_broker_that_restarts_empty_under_it(tmp_path: Path) -> None:
    """The bridge keeps running; Mosquitto restarts without its persistence file."""
    if find_mosquitto() is None:
        pytest.skip("Debian mosquitto not installed")
    brokers = Brokers("mosquitto", tmp_path)
    try:
        with Bridge(_config(brokers), brokers.bridge_url()) as bridge:
            bridge.wait_ready()
            with connect_client(brokers.port) as shop:
                publish_and_wait(shop, "fishim/orders/Z1/status", placed("Z1"), retain=True)
            bridge.wait_for(lambda s: s.stored >= 1)
            brokers.stop()
            brokers.start(wipe=True)
            bridge.wait_for(lambda s: s.connects >= 2, timeout=15)  # paho reconnects on its own
            bridge.wait_ready()
            assert _retained_now(brokers.port, 1) == {"fishim/orders/Z1/status": json.loads(placed("Z1"))}
    finally:
        brokers.close()


@pytest.mark.mosquitto
def test_sync_request_queued_while_bridge_down_is_answered_after_the_republish(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("Debian mosquitto not installed")
    brokers = Brokers("mosquitto", tmp_path)
    config = _config(brokers)
    try:
        with Bridge(config, brokers.bridge_url()) as bridge:
            bridge.wait_ready()
            with connect_client(brokers.port) as shop:
                publish_and_wait(shop, "fishim/orders/S1/status", placed("S1"), retain=True)
            bridge.wait_for(lambda s: s.stored >= 1)
        with connect_client(brokers.port) as app, \
                Collector(app, ["fishim/orders/S1/status", "fishim/sync/cust1/app1/events"]) as inbox:
            assert inbox.get().retain  # what the broker holds, on subscribe
            publish_and_wait(app, "fishim/sync/cust1/app1/request", b'{"since": 0}')  # bridge is down
            with Bridge(config, brokers.bridge_url()):
                republished, page = inbox.wait_for(2, timeout=10)
        assert (republished.topic, without_stamps(republished.payload)) == ("fishim/orders/S1/status",
                                                                           json.loads(placed("S1")))
        reply = page.json()
        assert page.topic == "fishim/sync/cust1/app1/events" and reply["done"] is True
        assert [e["payload"]["id"] for e in reply["events"]] == ["placed-S1"]
    finally:
        brokers.close()

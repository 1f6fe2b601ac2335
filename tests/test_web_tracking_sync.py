"""A tracking link's ``t-{order}`` user syncs its one order and nothing else (the tracking page relies
on it after signal loss), against a real ``fishim up``; and without a ws listener the page falls back
to a plain summary."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fishim.testing.mqtt import Collector, connect_client
from tests._http_shop import HttpShop


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpShop]:
    shop = HttpShop(tmp_path_factory.mktemp("tracksync") / "shop.db").start()
    try:
        shop.place("o-1", "zhang")
        shop.place("o-2", "li")
        yield shop
    finally:
        shop.close()


def test_tracking_user_syncs_only_its_order(shop: HttpShop) -> None:
    mine = [shop.send("boss", "o-1", "chat", text="for o-1"), shop.send("boss", "o-1", "status", retain=True,
                                                                         state="confirmed")]
    shop.send("boss", "o-2", "chat", text="for o-2 only")
    token = shop.link("o-1")["token"]
    with connect_client(shop.stack.port, username="t-o-1", password=token) as client, \
            Collector(client, "fishim/sync/t-o-1/page1/events") as pages:
        client.publish("fishim/sync/t-o-1/page1/request", json.dumps({"id": "r1", "since": 0}), qos=1)
        page = pages.get(timeout=10).json()
    assert page["done"] and page["request_id"] == "r1"
    topics = {e["topic"].split("/")[2] for e in page["events"]}
    assert topics == {"o-1"}
    ids = [e["payload"]["id"] for e in page["events"]]
    assert ids[-2:] == mine
    assert [e["order_seq"] for e in page["events"]] == list(range(1, len(ids) + 1))


def test_tracking_page_without_ws_listener_is_a_plain_summary(tmp_path: Path) -> None:
    bare = HttpShop(tmp_path / "bare.db")
    bare.stack.config = bare.stack.config.model_copy(
        update={"listeners": [lst for lst in bare.stack.config.listeners if lst.type != "ws"]})
    bare.start()
    try:
        bare.place("o-5", "zhang")
        with bare.http() as client:
            page = client.get(bare.link("o-5")["url"])
            console = client.get("/console")
        assert page.status_code == 200
        assert "Order <b>o-5</b> is <b>placed</b>." in page.text and "mqtt.min.js" not in page.text
        assert (console.status_code, console.json()["error"]) == (503, "no_websocket")
    finally:
        bare.close()

"""The shop API and the HTTP refusals table, against a real ``fishim up`` (tcp + http).

Contract (docs/http.md): ``POST /api/orders`` places an order through the same ingest as MQTT (so it
reaches MQTT subscribers and ``fishim orders show``), idempotent on the envelope ``id``; refusals
carry the MQTT error codes; every bad request gets ``{"error", "detail"}`` and its documented status.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fishim.testing.mqtt import Collector
from tests._http_shop import HttpShop


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpShop]:
    db = tmp_path_factory.mktemp("api") / "shop.db"
    shop = HttpShop(db, {"limits": {"max_payload": 8192}}).start()
    try:
        result = shop.cli("keys", "add", "webshop", "--json")
        assert result.exit_code == 0, result.output
        shop.key = json.loads(result.stdout)["key"]  # type: ignore[attr-defined]
        shop.place("o-x", "zhang")
        yield shop
    finally:
        shop.close()


def api(shop: HttpShop) -> httpx.Client:
    return httpx.Client(base_url=shop.base, headers={"Authorization": f"Bearer {shop.key}"},  # type: ignore[attr-defined]
                        timeout=15.0)


def test_order_placed_over_api_reaches_mqtt_and_cli_once(shop: HttpShop) -> None:
    body = {"order": "o-api-1", "customer": "zhang", "items": [{"sku": "reel-2", "qty": 2}], "id": "ext-1001",
            "eta": "2026-11-11T18:00:00+08:00", "dropoff": {"text": "back door"}}
    with Collector(shop.mqtt("boss"), "fishim/orders/o-api-1/status") as watcher, api(shop) as client:
        first = client.post("/api/orders", json=body)
        second = client.post("/api/orders", json=body)
        seen = watcher.get(10).json()
    assert first.status_code == 201, first.text
    assert first.json() | {"seq": None} == {"order": "o-api-1", "id": "ext-1001", "state": "placed", "seq": None,
                                            "order_seq": 1, "duplicate": False}
    assert second.status_code == 200
    assert second.json()["duplicate"] is True and second.json()["seq"] == first.json()["seq"]
    assert seen["id"] == "ext-1001" and seen["sender"] == "key-webshop" and seen["dropoff"] == {"text": "back door"}
    shown = shop.cli("orders", "show", "o-api-1", "--json")
    assert shown.exit_code == 0, shown.output
    order = json.loads(shown.stdout)
    assert order["order"]["state"] == "placed" and order["order"]["customer"] == "zhang"
    assert [e["payload"]["id"] for e in order["timeline"]] == ["ext-1001"]  # posted twice, stored once


def test_status_change_and_timeline(shop: HttpShop) -> None:
    with api(shop) as client:
        assert client.post("/api/orders", json={"order": "o-api-2", "customer": "li",
                                                "items": [{"sku": "hook", "qty": 1}]}).status_code == 201
        changed = client.post("/api/orders/o-api-2/status", json={"state": "confirmed", "note": "in stock"})
        timeline = client.get("/api/orders/o-api-2")
    assert changed.status_code == 201 and changed.json()["state"] == "confirmed"
    assert timeline.status_code == 200
    data = timeline.json()
    assert data["order"]["state"] == "confirmed"
    assert [e["payload"]["state"] for e in data["timeline"]] == ["placed", "confirmed"]


def test_openapi_and_keys_lifecycle(shop: HttpShop) -> None:
    with httpx.Client(base_url=shop.base) as client:
        doc = client.get("/api/openapi.json").json()
    assert doc["openapi"].startswith("3.")
    assert {"/api/orders", "/api/orders/{order}/status", "/api/orders/{order}", "/media"} <= set(doc["paths"])
    listed = json.loads(shop.cli("keys", "list", "--json").stdout)
    assert [k["name"] for k in listed] == ["webshop"] and "key" not in listed[0]
    temp = json.loads(shop.cli("keys", "add", "temp", "--json").stdout)["key"]
    with httpx.Client(base_url=shop.base, headers={"Authorization": f"Bearer {temp}"}) as client:
        assert client.get("/api/orders/o-x").status_code == 200
        assert shop.cli("keys", "remove", "temp").exit_code == 0
        assert client.get("/api/orders/o-x").status_code == 401


PNG = {"Content-Type": "image/png"}
BAD: list[tuple[str, str, str, dict[str, Any], int, str]] = [
    # (what, method, path, request kwargs (auth: "key" | "boss" | "wrong" | None), status, error)
    ("no credentials", "POST", "/api/orders", {"json": {}}, 401, "unauthorized"),
    ("unknown API key", "POST", "/api/orders", {"auth": "fk_nope", "json": {}}, 401, "unauthorized"),
    ("an account instead of a key", "POST", "/api/orders", {"auth": "boss", "json": {}}, 401, "unauthorized"),
    ("not JSON", "POST", "/api/orders", {"auth": "key", "content": b"{nope"}, 400, "bad_json"),
    ("JSON but not an object", "POST", "/api/orders", {"auth": "key", "json": [1, 2]}, 400, "bad_json"),
    ("no order id", "POST", "/api/orders", {"auth": "key", "json": {"customer": "zhang", "items": [{"sku": "a"}]}},
     422, "bad_schema"),
    ("bad order id", "POST", "/api/orders", {"auth": "key", "json": {"order": "o 1!", "customer": "zhang",
                                                                       "items": [{"sku": "a"}]}}, 422, "bad_schema"),
    ("no items", "POST", "/api/orders", {"auth": "key", "json": {"order": "o-b1", "customer": "zhang"}},
     422, "bad_schema"),
    ("quantity zero", "POST", "/api/orders", {"auth": "key", "json": {"order": "o-b2", "customer": "zhang",
                                                                        "items": [{"sku": "a", "qty": 0}]}},
     422, "bad_schema"),
    ("placing with another state", "POST", "/api/orders",
     {"auth": "key", "json": {"order": "o-b3", "customer": "zhang", "items": [{"sku": "a"}], "state": "packed"}},
     422, "bad_schema"),
    ("body over limits.max_payload", "POST", "/api/orders",
     {"auth": "key", "json": {"order": "o-b4", "customer": "zhang", "items": [{"sku": "a"}], "note": "x" * 9000}},
     413, "too_large"),
    ("status of an unknown order", "POST", "/api/orders/o-none/status", {"auth": "key", "json": {"state": "confirmed"}},
     404, "unknown_order"),
    ("illegal transition", "POST", "/api/orders/o-x/status", {"auth": "key", "json": {"state": "delivered"}},
     409, "illegal_transition"),
    ("unknown state", "POST", "/api/orders/o-x/status", {"auth": "key", "json": {"state": "flying"}},
     422, "bad_schema"),
    ("bad timestamp", "POST", "/api/orders/o-x/status", {"auth": "key", "json": {"state": "confirmed",
                                                                                   "ts": "yesterday"}},
     422, "bad_schema"),
    ("someone else as sender", "POST", "/api/orders/o-x/status",
     {"auth": "key", "json": {"state": "confirmed", "sender": "boss"}}, 403, "sender_mismatch"),
    ("timeline of an unknown order", "GET", "/api/orders/o-none", {"auth": "key"}, 404, "unknown_order"),
    ("no such route", "GET", "/nope", {}, 404, "not_found"),
    ("wrong method", "DELETE", "/api/orders", {"auth": "key"}, 405, "method_not_allowed"),
    ("upload without an order", "POST", "/media", {"auth": "boss", "content": b"x", "headers": PNG},
     400, "bad_request"),
    ("upload with a bad order id", "POST", "/media?order=a/b", {"auth": "boss", "content": b"x", "headers": PNG},
     400, "bad_request"),
    ("upload for an unknown order", "POST", "/media?order=o-none", {"auth": "boss", "content": b"x", "headers": PNG},
     404, "unknown_order"),
    ("empty upload", "POST", "/media?order=o-x", {"auth": "boss", "content": b"", "headers": PNG}, 400, "bad_request"),
    ("wrong password", "POST", "/media?order=o-x", {"auth": "wrong", "content": b"x", "headers": PNG},
     401, "unauthorized"),
    ("bad media address", "GET", "/media/not-a-hash", {"auth": "boss"}, 400, "bad_request"),
    ("unknown media", "GET", "/media/" + "0" * 64, {"auth": "boss"}, 404, "not_found"),
    ("malformed Basic credentials", "GET", "/media/" + "0" * 64,
     {"headers": {"Authorization": "Basic !!!"}}, 401, "unauthorized"),
]


@pytest.mark.parametrize(("what", "method", "path", "kwargs", "status", "error"), BAD, ids=[b[0] for b in BAD])
def test_bad_request(shop: HttpShop, what: str, method: str, path: str, kwargs: dict[str, Any], status: int,
                     error: str) -> None:
    kwargs = dict(kwargs)
    auth = kwargs.pop("auth", None)
    headers = dict(kwargs.pop("headers", {}))
    if auth == "key":
        headers["Authorization"] = f"Bearer {shop.key}"  # type: ignore[attr-defined]
    elif auth == "boss":
        kwargs["auth"] = httpx.BasicAuth("boss", "pw-boss")
    elif auth == "wrong":
        kwargs["auth"] = httpx.BasicAuth("boss", "not-the-password")
    elif auth:
        headers["Authorization"] = f"Bearer {auth}"
    with httpx.Client(base_url=shop.base, timeout=15.0) as client:
        r = client.request(method, path, headers=headers, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == error and body["detail"]
    assert "Traceback" not in r.text


def test_refusals_are_dead_lettered_like_mqtt(shop: HttpShop) -> None:
    with api(shop) as client:
        r = client.post("/api/orders/o-x/status", json={"id": "api-illegal-1", "state": "delivered"})
    assert r.status_code == 409
    letters = json.loads(shop.cli("deadletters", "--json").stdout)["deadletters"]
    assert any(d["msg_id"] == "api-illegal-1" and d["error"] == "illegal_transition" and d["user"] == "key-webshop"
               for d in letters), letters

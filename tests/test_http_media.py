"""Media, tracking links and the HTTP listener's refusals, against a real ``fishim up`` (tcp + ws + http).

Contract (docs/http.md): uploads and downloads are for order members only (403 otherwise, 401 without
credentials or with an expired/revoked token); 413 above a kind's size limit, 415 for a MIME type not
accepted; downloads honour ETag (304) and Range (206, 416); a tracking token is the MQTT-over-WebSocket
password of ``t-{order}`` for that order only; tokens never reach the logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from fishim.http.tokens import load_secret, make_token
from fishim.store import Store
from fishim.testing.tls import self_signed
from tests._http_shop import HttpShop

IMAGE_LIMIT = 64 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(5000)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpShop]:
    db = tmp_path_factory.mktemp("http") / "shop.db"
    config = {"media": {"image": {"max_bytes": IMAGE_LIMIT, "mimes": ["image/png", "image/jpeg"]}}}
    shop = HttpShop(db, config, tls=self_signed(db.parent)).start()  # HTTPS, as MQTT listeners do TLS
    try:
        shop.place("o-1", "zhang")
        shop.place("o-2", "li")
        yield shop
    finally:
        shop.close()


@pytest.fixture(scope="module")
def photo(shop: HttpShop) -> dict[str, Any]:
    """A photo zhang uploaded for o-1 and then sent in o-1's chat."""
    with shop.http("zhang") as client:
        r = client.post("/media", params={"order": "o-1"}, content=PNG, headers={"Content-Type": "image/png"})
    assert r.status_code == 201, r.text
    ref = r.json()
    shop.send("zhang", "o-1", "chat", text="this rod?", media=[{"kind": ref["kind"], "sha256": ref["sha256"],
                                                                "mime": ref["mime"], "size": ref["size"]}])
    return ref


def test_member_uploads_and_downloads(shop: HttpShop, photo: dict[str, Any]) -> None:
    assert photo == {"kind": "image", "sha256": hashlib.sha256(PNG).hexdigest(), "mime": "image/png",
                     "size": len(PNG), "url": f"/media/{hashlib.sha256(PNG).hexdigest()}"}
    for user in ("zhang", "boss"):  # the customer and the owner (who reads every order)
        with shop.http(user) as client:
            r = client.get(photo["url"])
        assert r.status_code == 200
        assert r.content == PNG
        assert r.headers["content-type"] == "image/png"
        assert r.headers["etag"] == f'"{photo["sha256"]}"'
        assert r.headers["accept-ranges"] == "bytes"


def test_non_member_is_refused(shop: HttpShop, photo: dict[str, Any]) -> None:
    with shop.http("li") as client:
        assert client.get(photo["url"]).status_code == 403
        r = client.post("/media", params={"order": "o-1"}, content=PNG, headers={"Content-Type": "image/png"})
        assert r.status_code == 403
        assert r.json()["error"] == "forbidden"
    with shop.http("scan1") as client:  # scanners are not order members
        assert client.get(photo["url"]).status_code == 403
    with shop.http() as client:  # accounts exist: no anonymous access
        r = client.get(photo["url"])
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Basic")


def test_unreferenced_upload_is_not_served_yet(shop: HttpShop) -> None:
    blob = b"\xff\xd8\xff" + os.urandom(300)
    with shop.http("zhang") as client:
        r = client.post("/media", params={"order": "o-1"}, content=blob, headers={"Content-Type": "image/jpeg"})
        assert r.status_code == 201
        assert client.get(r.json()["url"]).status_code == 403  # no chat carries it


def test_too_big_and_refused_mime(shop: HttpShop) -> None:
    with shop.http("zhang") as client:
        big = client.post("/media", params={"order": "o-1"}, content=b"x" * (IMAGE_LIMIT + 1),
                          headers={"Content-Type": "image/png"})
        chunked = client.post("/media", params={"order": "o-1"}, content=iter([b"x" * 40_000] * 2),
                              headers={"Content-Type": "image/png"})  # no Content-Length: counted as it streams
        html = client.post("/media", params={"order": "o-1"}, content=b"<script>",
                           headers={"Content-Type": "text/html"})
    assert (big.status_code, big.json()["error"]) == (413, "too_large")
    assert (chunked.status_code, chunked.json()["error"]) == (413, "too_large")
    assert (html.status_code, html.json()["error"]) == (415, "unsupported_media_type")
    leftovers = list((shop.db.parent / "shop.db.media" / "tmp").iterdir())
    assert leftovers == []


def test_etag_and_range(shop: HttpShop, photo: dict[str, Any]) -> None:
    size = len(PNG)
    with shop.http("zhang") as client:
        first = client.get(photo["url"], headers={"Range": "bytes=0-9"})
        suffix = client.get(photo["url"], headers={"Range": "bytes=-5"})
        open_end = client.get(photo["url"], headers={"Range": f"bytes={size - 3}-"})
        beyond = client.get(photo["url"], headers={"Range": f"bytes={size}-{size + 10}"})
        cached = client.get(photo["url"], headers={"If-None-Match": photo["url"].split("/")[-1].join('""')})
        stale = client.get(photo["url"], headers={"If-None-Match": '"something-else"'})
        if_range_stale = client.get(photo["url"], headers={"Range": "bytes=0-9", "If-Range": '"old"'})
        malformed = client.get(photo["url"], headers={"Range": "lines=1-2"})
    assert first.status_code == 206
    assert first.headers["content-range"] == f"bytes 0-9/{size}"
    assert first.content == PNG[:10]
    assert (suffix.status_code, suffix.content) == (206, PNG[-5:])
    assert (open_end.status_code, open_end.content) == (206, PNG[-3:])
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == f"bytes */{size}"
    assert beyond.json()["error"] == "range_not_satisfiable"
    assert (malformed.status_code, malformed.content) == (200, PNG)  # RFC 9110 14.2: ignored
    assert cached.status_code == 304
    assert cached.content == b""
    assert cached.headers["etag"] == f'"{photo["sha256"]}"'
    assert (stale.status_code, stale.content) == (200, PNG)
    assert (if_range_stale.status_code, if_range_stale.content) == (200, PNG)  # RFC 9110 13.1.5: whole file


def test_tracking_link_page_and_media(shop: HttpShop, photo: dict[str, Any]) -> None:
    link = shop.link("o-1")
    assert link["url"].startswith(f"https://127.0.0.1:{shop.http_port}/t/")
    with shop.http() as client:
        page = client.get(link["url"])
    assert page.status_code == 200
    assert "o-1" in page.text and "placed" in page.text
    assert page.headers["referrer-policy"] == "no-referrer"
    with shop.http(token=link["token"]) as client:
        assert client.get(photo["url"]).status_code == 200  # the customer's rights on o-1
    other = shop.link("o-2")
    with shop.http(token=other["token"]) as client:
        assert client.get(photo["url"]).status_code == 403  # o-2's link says nothing about o-1


def test_expired_and_revoked_tokens(shop: HttpShop, photo: dict[str, Any]) -> None:
    expired = make_token(load_secret(shop.db), "o-1", -1)
    shop.place("o-3", "zhang")
    revoked = shop.link("o-3")["token"]
    shop.send("boss", "o-3", "status", retain=True, state="cancelled")
    forged = shop.link("o-1")["token"][:-2] + "AA"
    for token, code, words in ((expired, "token_expired", "expired"), (revoked, "token_revoked", "finished"),
                               (forged, "token_invalid", "not a valid")):
        with shop.http(token=token) as client:
            r = client.get(photo["url"])
            page = client.get(f"/t/{token}")
        assert (r.status_code, r.json()["error"]) == (401, code)
        assert page.status_code == 401
        assert words in page.text
        assert "o-1" not in page.text and "o-3" not in page.text and "rod" not in page.text
    result = shop.cli("orders", "link", "o-3")
    assert result.exit_code == 2
    assert "cancelled" in result.stderr


def _ws_client(shop: HttpShop, user: str, password: str) -> tuple[mqtt.Client, dict[str, Any]]:
    """paho over WebSocket; returns the client (not yet looping) and a dict it records into."""
    seen: dict[str, Any] = {"connack": threading.Event(), "suback": threading.Event(), "messages": [],
                            "message": threading.Condition()}
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"ws-{user}", transport="websockets",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(user, password)

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        seen["rc"] = rc
        seen["connack"].set()

    def on_subscribe(_c: Any, _u: Any, _mid: int, rcs: list[Any], _p: Any) -> None:
        seen["granted"] = [int(getattr(rc, "value", rc)) for rc in rcs]
        seen["suback"].set()

    def on_message(_c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        with seen["message"]:
            seen["messages"].append((msg.topic, json.loads(msg.payload)))
            seen["message"].notify_all()

    client.on_connect, client.on_subscribe, client.on_message = on_connect, on_subscribe, on_message
    client.connect("127.0.0.1", shop.ws_port)
    client.loop_start()
    assert seen["connack"].wait(10)
    return client, seen


def test_tracking_token_over_mqtt_websocket(shop: HttpShop) -> None:
    token = shop.link("o-1")["token"]
    wrong_user, wrong_seen = _ws_client(shop, "t-o-2", token)
    expired_client, expired_seen = _ws_client(shop, "t-o-1", make_token(load_secret(shop.db), "o-1", -1))
    for client in (wrong_user, expired_client):
        client.loop_stop()
        client.disconnect()
    assert wrong_seen["rc"].is_failure and expired_seen["rc"].is_failure

    client, seen = _ws_client(shop, "t-o-1", token)
    try:
        assert not seen["rc"].is_failure
        seen["suback"].clear()
        client.subscribe([("fishim/orders/o-2/status", 1)])
        assert seen["suback"].wait(10)
        assert seen["granted"] == [0x80]  # another order's topic: refused
        seen["suback"].clear()
        client.subscribe([("fishim/orders/+/status", 1)])
        assert seen["suback"].wait(10)
        assert seen["granted"] == [1]
        with seen["message"]:  # o-1's retained status arrives; o-2's does not
            assert seen["message"].wait_for(lambda: any(t.endswith("o-1/status") for t, _ in seen["messages"]), 10)
        shop.send("boss", "o-2", "status", retain=True, state="confirmed")
        marker = shop.send("boss", "o-1", "status", retain=True, state="confirmed")
        with seen["message"]:
            assert seen["message"].wait_for(lambda: any(p.get("id") == marker for _, p in seen["messages"]), 10)
        assert all("/o-1/" in topic for topic, _ in seen["messages"])
        # a sync replays its order's events and nothing of any other order
        seen["suback"].clear()
        client.subscribe([("fishim/sync/t-o-1/page1/events", 1)])
        assert seen["suback"].wait(10) and seen["granted"] == [1]
        client.publish("fishim/sync/t-o-1/page1/request", json.dumps({"since": 0}), 1)
        with seen["message"]:
            assert seen["message"].wait_for(lambda: any(t.endswith("/events") for t, _ in seen["messages"]), 10)
        page = next(p for t, p in seen["messages"] if t.endswith("/events"))
        assert {e["topic"].split("/")[2] for e in page["events"]} == {"o-1"}
        # the customer's rights: it may chat on its order as itself, not on another order
        client.publish("fishim/orders/o-2/chat/t-o-1", json.dumps(
            {"id": "track-chat-other", "ts": 1794366000000, "sender": "t-o-1", "text": "not mine"}), 1)
        info = client.publish("fishim/orders/o-1/chat/t-o-1", json.dumps(
            {"id": "track-chat-1", "ts": 1794366000000, "sender": "t-o-1", "text": "hi from the link"}), 1)
        info.wait_for_publish(10)
        shop.wait_stored("track-chat-1")  # published after the other order's chat: that one was decided
        with Store(shop.db, readonly=True) as store:
            assert not store.has_event("track-chat-other")
    finally:
        client.loop_stop()
        client.disconnect()
    assert token not in shop.stack.log_text()
    assert token.split(".")[2] not in shop.stack.log_text()


def test_media_gc_removes_only_unreferenced(shop: HttpShop, photo: dict[str, Any]) -> None:
    orphan = b"\x89PNG\r\n\x1a\n" + os.urandom(100)
    with shop.http("zhang") as client:
        ref = client.post("/media", params={"order": "o-1"}, content=orphan,
                          headers={"Content-Type": "image/png"}).json()
    blobs = shop.db.parent / "shop.db.media"
    assert (blobs / ref["sha256"][:2] / ref["sha256"]).exists()
    result = shop.cli("media", "gc", "--min-age", "0s", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["removed"] >= 1
    assert not (blobs / ref["sha256"][:2] / ref["sha256"]).exists()
    with shop.http("zhang") as client:
        assert client.get(photo["url"]).content == PNG  # referenced by o-1's chat: kept


def test_config_rejects_bad_http_settings(tmp_path: Path) -> None:
    from fishim.config import ConfigError, load_config

    bad = tmp_path / "broker.yaml"
    bad.write_text("listeners: [{type: http, bind: '127.0.0.1:8080'}]\n")
    with pytest.raises(ConfigError, match="at least one tcp or ws listener"):
        load_config(bad, env={})
    bad.write_text("webhooks: [{url: 'http://127.0.0.1:9/x', events: [status], secret: short}]\n")
    with pytest.raises(ConfigError, match=r"webhooks\.0\.secret"):
        load_config(bad, env={})


def test_cli_refusals_are_one_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fishim.cli import main as cli
    from fishim.store import Store

    db = tmp_path / "shop.db"
    Store(db).close()
    env = {"FISHIM_DB": str(db), "FISHIM_CONFIG": str(tmp_path / "none.yaml")}
    (tmp_path / "none.yaml").write_text("{}\n")
    runner = CliRunner()
    no_http = runner.invoke(cli, ["orders", "link", "o-1"], env=env)
    assert no_http.exit_code == 2 and "no http listener" in no_http.stderr
    bad_key = runner.invoke(cli, ["keys", "add", "bad name"], env=env)
    assert bad_key.exit_code == 2 and "bad key name" in bad_key.stderr
    reserved = runner.invoke(cli, ["users", "add", "t-o-1", "--role", "customer", "--password-stdin"],
                             input="pw\n", env=env)
    assert reserved.exit_code == 2 and "reserved" in reserved.stderr

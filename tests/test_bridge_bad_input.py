"""Bad input, interleaved with good traffic: refused, dead-lettered, explained to its sender; nothing else moves.

Runs on Mosquitto with no ACL (every bad message reaches the bridge, which repairs what Mosquitto
already routed) and on ``fishim up``, whose ingest refuses bad input before anyone sees it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pytest
from _bridge_support import Brokers, body, chat, location, placed, read_db, status, without_stamps

from fishim.bridge import Bridge
from fishim.config import Config
from fishim.testing.mosquitto import find_mosquitto
from fishim.testing.mqtt import Collector, Message, MqttClient, connect_client, publish_and_wait
from fishim.testing.stack import Stack

MAX_PAYLOAD = 4096
B1 = "fishim/orders/B1"

# (topic, payload, expected error code, user told on fishim/errors/{user})
BAD: list[tuple[str, bytes, str, str]] = [
    (f"{B1}/chat/cust1", b"{not json", "bad_json", "cust1"),
    (f"{B1}/chat/cust1", b"\xff\xfe\x00garbage", "bad_json", "cust1"),
    (f"{B1}/chat/cust1", b"[1, 2, 3]", "bad_json", "cust1"),
    (f"{B1}/chat/cust1", body(id="b-notext", sender="cust1"), "bad_schema", "cust1"),
    (f"{B1}/chat/cust1", chat("b-ts", ts="yesterday"), "bad_schema", "cust1"),
    (f"{B1}/chat/cust1", chat("b-big", text="x" * (MAX_PAYLOAD + 10)), "too_large", "cust1"),
    (f"{B1}/chat/cust1", chat("b-foreign", sender="rider9"), "sender_mismatch", "cust1"),
    (f"{B1}/bogus", chat("b-channel"), "unknown_topic", "cust1"),
    ("fishim/orders/bad.name/status", status("x", "placed", "b-name"), "unknown_topic", "shop"),
    ("fishim/orders/NOPE/chat/cust1", chat("b-noorder"), "unknown_order", "cust1"),
    (f"{B1}/status", status("B1", "delivered", "b-jump"), "illegal_transition", "shop"),
    (f"{B1}/chat/cust1", chat("b-reply", reply_to="no-such-message"), "bad_reply_to", "cust1"),
    (f"{B1}/chat/cust1", chat("b-mention", mentions=["ghost"]), "bad_mention", "cust1"),
    (f"{B1}/location", location("b-lat", 200.0, 120.0), "bad_schema", "shop"),
    (f"{B1}/picks", body(id="b-sku", sender="scan1", sku="rod-9", qty=1), "unknown_sku", "scan1"),
    (f"{B1}/picks", body(id="b-over", sender="scan1", sku="hook-6", qty=5), "over_pick", "scan1"),
    (f"{B1}/receipts/cust1", body(id="b-future", sender="cust1", read_up_to=999), "bad_schema", "cust1"),
    (f"{B1}/receipts/cust1", body(id="b-back", sender="cust1", read_up_to=1), "receipt_backwards", "cust1"),
    ("fishim/sync/cust1/app1/request", b'{"since": -4}', "bad_schema", "cust1"),
]


@dataclass
class Target:
    """Where the bad input goes: Mosquitto + an in-process bridge, or ``fishim up`` (its own ingest)."""

    kind: str
    port: int
    db: Path
    bridge: Bridge | None  # Mosquitto's writer; fishim up stores by itself


@pytest.fixture(params=[pytest.param("mosquitto", marks=pytest.mark.mosquitto), "up"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "mosquitto":
        if find_mosquitto() is None:
            pytest.skip("Debian mosquitto not installed")
        brokers = Brokers("mosquitto", tmp_path)
        config = Config.model_validate({"store": {"path": str(brokers.db)}, "limits": {"max_payload": MAX_PAYLOAD}})
        try:
            with Bridge(config, brokers.bridge_url()) as bridge:
                bridge.wait_ready()
                yield Target("mosquitto", brokers.port, brokers.db, bridge)
        finally:
            brokers.close()
    else:
        config = Config.model_validate({"limits": {"max_payload": MAX_PAYLOAD}})
        with Stack(tmp_path / "fishim.db", kind="embedded", config=config) as stack:
            yield Target("up", stack.port, stack.db, None)


def _publish_bad(target: Target, client: MqttClient, topic: str, payload: bytes) -> None:
    """One bad message. fishim up's wire guard closes a connection that sends an oversize payload
    (and reports it like any refusal), so that one goes over a connection of its own."""
    retain = topic.endswith(("/status", "/location"))
    if target.kind == "up" and len(payload) > MAX_PAYLOAD:
        with connect_client(target.port) as doomed:
            doomed.publish(topic, payload, qos=1, retain=retain)
            doomed.wait_disconnected(timeout=10)
        return
    publish_and_wait(client, topic, payload, retain=retain)


def _watch_until(watch: Collector, done: Callable[[list[Message]], bool]) -> list[Message]:
    seen: list[Message] = []
    while not seen or not done(seen):
        seen.append(watch.get(timeout=10))
    return seen


def test_bad_messages_are_dead_lettered_and_explained_good_ones_stored(target: Target) -> None:
    confirmed = status("B1", "confirmed", "g-confirmed")
    good_fix = location("g-fix", 30.27, 120.15)
    good: list[tuple[str, bytes, bool]] = [
        (f"{B1}/status", placed("B1"), True),
        (f"{B1}/status", confirmed, True),
        (f"{B1}/location", good_fix, True),
        (f"{B1}/chat/cust1", chat("g-chat-1", text="is the rod in stock?"), False),
        (f"{B1}/chat/shop", chat("g-chat-2", sender="shop", text="yes", reply_to="g-chat-1"), False),
        (f"{B1}/receipts/cust1", body(id="g-receipt", sender="cust1", read_up_to=4), True),
        (f"{B1}/chat/cust1", chat("g-chat-3", text="great"), False),
    ]
    port = target.port
    with connect_client(port) as client, Collector(client, "fishim/errors/+") as errors, \
            Collector(client, [f"{B1}/status", f"{B1}/location", f"{B1}/chat/cust1"]) as watch:
        for topic, payload, retain in good[:3]:
            publish_and_wait(client, topic, payload, retain=retain)
        pending_good = good[3:]
        for i, (topic, payload, _code, _user) in enumerate(BAD):  # one good message after every third bad
            _publish_bad(target, client, topic, payload)
            if i % 3 == 2 and pending_good:
                topic, payload, retain = pending_good.pop(0)
                publish_and_wait(client, topic, payload, retain=retain)
        assert not pending_good

        told = errors.wait_for(len(BAD), timeout=10)
        marker = chat("g-marker", text="last")  # a good one after every bad one
        publish_and_wait(client, f"{B1}/chat/cust1", marker)
        good.append((f"{B1}/chat/cust1", marker, False))
        if target.bridge is not None:  # Mosquitto routes at once, the bridge repairs later: count them too
            seen = _watch_until(watch, lambda got: any(b'"g-marker"' in m.payload for m in got)
                                and sum(not m.topic.endswith("/cust1") for m in got) >= 7)
        else:  # routed in order after what came before: a bad one routed would be ahead of the marker
            seen = _watch_until(watch, lambda got: b'"g-marker"' in got[-1].payload)
        by_topic = {t: [json.loads(m.payload)["id"] for m in seen if m.topic == t]
                    for t in (f"{B1}/status", f"{B1}/location")}
        if target.bridge is not None:
            # Mosquitto routed the bad status and location and overwrote its retained slots; the bridge
            # put the last good ones back (the watcher sees the bad one, then the repair).
            assert by_topic == {f"{B1}/status": ["placed-B1", "g-confirmed", "b-jump", "g-confirmed"],
                                f"{B1}/location": ["g-fix", "b-lat", "g-fix"]}
        else:  # fishim up routes only what it validated and stored: no subscriber ever sees a bad one
            assert by_topic == {f"{B1}/status": ["placed-B1", "g-confirmed"], f"{B1}/location": ["g-fix"]}
        with connect_client(port) as fresh, Collector(fresh, [f"{B1}/status", f"{B1}/location"]) as retained:
            # what fishim stored and routes carries the server stamps (seq, order_seq) on top
            assert {m.topic: without_stamps(m.payload) for m in retained.wait_for(2)} == {
                f"{B1}/status": json.loads(confirmed), f"{B1}/location": json.loads(good_fix)}
        if target.bridge is not None:
            # An empty retained publish (someone clearing the slot) is repaired too, without a dead letter.
            publish_and_wait(client, f"{B1}/status", b"", retain=True)
            cleared, repaired = watch.wait_for(2)
            assert (cleared.payload, without_stamps(repaired.payload)) == (b"", json.loads(confirmed))
            stats = target.bridge.wait_for(lambda s: s.processed >= len(BAD) + len(good))
            assert stats.stored == len(good) and stats.rejected == len(BAD)

    expected = sorted((f"fishim/errors/{user}", topic, code) for topic, _p, code, user in BAD)
    messages = [(m.topic, m.json()) for m in told]
    assert sorted((t, e["topic"], e["error"]) for t, e in messages) == expected
    assert all(isinstance(e["detail"], str) and len(e["detail"]) > 5 for _t, e in messages)
    assert next(e for _t, e in messages if e["error"] == "illegal_transition")["id"] == "b-jump"

    with closing(read_db(target.db)) as db:
        stored = [r[0] for r in db.execute("SELECT id FROM events ORDER BY seq")]
        letters = db.execute("SELECT topic, error, user FROM deadletters ORDER BY id").fetchall()
        state = db.execute("SELECT state FROM orders WHERE id='B1'").fetchone()[0]
        retained_status = db.execute("SELECT payload FROM retained WHERE topic=?", (f"{B1}/status",)).fetchone()[0]
    assert stored == [json.loads(p)["id"] for _t, p, _r in good]
    assert sorted(letters) == sorted((topic, code, user) for topic, _p, code, user in BAD)  # sync's: own thread
    assert state == "confirmed" and without_stamps(bytes(retained_status)) == json.loads(confirmed)

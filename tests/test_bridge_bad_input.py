"""Bad input, interleaved with good traffic: refused, dead-lettered, explained to its sender; nothing else moves.

Runs against Mosquitto with no ACL, so every bad message reaches the bridge (the embedded broker
refuses some of them itself, which its own tests cover).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from _bridge_support import Brokers, body, chat, location, placed, read_db, status, without_stamps

from fishim.bridge import Bridge
from fishim.config import Config
from fishim.testing.mosquitto import find_mosquitto
from fishim.testing.mqtt import Collector, connect_client, publish_and_wait

pytestmark = pytest.mark.mosquitto

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


@pytest.fixture
def mosquitto_broker(tmp_path: Path) -> Iterator[Brokers]:
    if find_mosquitto() is None:
        pytest.skip("Debian mosquitto not installed")
    brokers = Brokers("mosquitto", tmp_path)
    try:
        yield brokers
    finally:
        brokers.close()


def test_bad_messages_are_dead_lettered_and_explained_good_ones_stored(mosquitto_broker: Brokers) -> None:
    config = Config.model_validate({"store": {"path": str(mosquitto_broker.db)},
                                    "limits": {"max_payload": MAX_PAYLOAD}})
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
    port = mosquitto_broker.port
    with Bridge(config, mosquitto_broker.bridge_url()) as bridge, connect_client(port) as client, \
            Collector(client, "fishim/errors/+") as errors, \
            Collector(client, [f"{B1}/status", f"{B1}/location"]) as watch:
        bridge.wait_ready()
        for topic, payload, retain in good[:3]:
            publish_and_wait(client, topic, payload, retain=retain)
        pending_good = good[3:]
        for i, (topic, payload, _code, _user) in enumerate(BAD):  # one good message after every third bad
            publish_and_wait(client, topic, payload, retain=topic.endswith(("/status", "/location")))
            if i % 3 == 2 and pending_good:
                topic, payload, retain = pending_good.pop(0)
                publish_and_wait(client, topic, payload, retain=retain)
        assert not pending_good

        told = errors.wait_for(len(BAD), timeout=10)
        stats = bridge.wait_for(lambda s: s.processed >= len(BAD) + len(good))
        # The broker's retained slots were overwritten by the bad status and location; the bridge put the
        # last good ones back (the watcher sees the bad one, then the repair).
        seen = watch.wait_for(7, timeout=10)
        by_topic = {t: [json.loads(m.payload)["id"] for m in seen if m.topic == t]
                    for t in (f"{B1}/status", f"{B1}/location")}
        assert by_topic == {f"{B1}/status": ["placed-B1", "g-confirmed", "b-jump", "g-confirmed"],
                            f"{B1}/location": ["g-fix", "b-lat", "g-fix"]}
        with connect_client(port) as fresh, Collector(fresh, [f"{B1}/status", f"{B1}/location"]) as retained:
            # what the bridge stored and put back carries the server stamps (seq, order_seq) on top
            assert {m.topic: without_stamps(m.payload) for m in retained.wait_for(2)} == {
                f"{B1}/status": json.loads(confirmed), f"{B1}/location": json.loads(good_fix)}
        # An empty retained publish (someone clearing the slot) is repaired too, without a dead letter.
        publish_and_wait(client, f"{B1}/status", b"", retain=True)
        cleared, repaired = watch.wait_for(2)
        assert (cleared.payload, without_stamps(repaired.payload)) == (b"", json.loads(confirmed))

    assert stats.stored == len(good) and stats.rejected == len(BAD)
    expected = sorted((f"fishim/errors/{user}", topic, code) for topic, _p, code, user in BAD)
    messages = [(m.topic, m.json()) for m in told]
    assert sorted((t, e["topic"], e["error"]) for t, e in messages) == expected
    assert all(isinstance(e["detail"], str) and len(e["detail"]) > 5 for _t, e in messages)
    assert next(e for _t, e in messages if e["error"] == "illegal_transition")["id"] == "b-jump"

    with closing(read_db(mosquitto_broker.db)) as db:
        stored = [r[0] for r in db.execute("SELECT id FROM events ORDER BY seq")]
        letters = db.execute("SELECT topic, error, user FROM deadletters ORDER BY id").fetchall()
        state = db.execute("SELECT state FROM orders WHERE id='B1'").fetchone()[0]
        retained_status = db.execute("SELECT payload FROM retained WHERE topic=?", (f"{B1}/status",)).fetchone()[0]
    assert stored == [json.loads(p)["id"] for _t, p, _r in good]
    assert sorted(letters) == sorted((topic, code, user) for topic, _p, code, user in BAD)  # sync's: own thread
    assert state == "confirmed" and without_stamps(bytes(retained_status)) == json.loads(confirmed)


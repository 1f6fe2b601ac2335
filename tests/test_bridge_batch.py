"""Group commit without a broker: whole batches handed to the writer, as ``scripts/bench_bridge.py`` does.

Over MQTT most batches hold one message. Here one batch carries many messages on the same orders, so
the rules must see each order's latest in-batch state, a refusal mid-batch must leave that state as
it was, and a batch bigger than one multi-row INSERT must store every row, in order.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from _bridge_support import body, chat, placed, read_db, status

from fishim.bridge import Bridge, _Tag
from fishim.config import Config
from fishim.ingest import Inbound
from fishim.store import ROWS_PER_INSERT


class _NoBroker:
    """Stands in for the paho client: records PUBACKs and publishes."""

    def __init__(self) -> None:
        self.acks: list[int] = []
        self.published: list[tuple[str, bytes]] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acks.append(mid)

    def publish(self, topic: str, payload: bytes = b"", qos: int = 0, retain: bool = False) -> None:
        self.published.append((topic, payload))


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[tuple[Bridge, _NoBroker]]:
    config = Config.model_validate({"store": {"path": str(tmp_path / "batch.db")}})
    bridge = Bridge(config, "mqtt://127.0.0.1:1")  # never started: no connection is made
    broker = _NoBroker()
    bridge._client = broker  # type: ignore[assignment]
    yield bridge, broker
    bridge.store.close()


def inbound(messages: list[tuple[str, bytes]], first_mid: int = 1) -> list[Inbound]:
    return [Inbound(f"fishim/orders/{topic}", payload, tag=_Tag(first_mid + i, 1, 0)) for i, (topic, payload) in
            enumerate(messages)]


def rows(bridge: Bridge, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with closing(read_db(bridge.store.path)) as conn:
        return conn.execute(sql, args).fetchall()


def test_one_batch_sees_its_own_changes_and_a_refusal_changes_nothing(writer: tuple[Bridge, _NoBroker]) -> None:
    bridge, broker = writer
    pick = "P1/picks"
    batch = inbound([
        ("P1/status", placed("P1")),
        ("P1/status", status("P1", "confirmed", "s-conf")),
        (pick, body(id="k1", sender="scan1", sku="hook-6", qty=1)),  # -> picking, automatically
        (pick, body(id="k2", sender="scan1", sku="hook-6", qty=2)),  # 1 + 2 > 2: refused
        (pick, body(id="k3", sender="scan1", sku="hook-6", qty=1)),
        (pick, body(id="k3", sender="scan1", sku="hook-6", qty=1)),  # the same id again: a duplicate
        (pick, body(id="k4", sender="scan1", sku="line-20", qty=1)),  # all picked -> packed, automatically
        ("P1/chat/cust1", chat("c1")),
    ])
    bridge._flush(batch)

    events = rows(bridge, "SELECT id, order_seq, seq FROM events WHERE order_id='P1' ORDER BY seq")
    ids = [e[0] for e in events]
    assert ids[:3] == ["placed-P1", "s-conf", "k1"] and ids[3].startswith("auto-P1-picking-")
    assert ids[4:6] == ["k3", "k4"] and ids[6].startswith("auto-P1-packed-") and ids[7] == "c1"
    assert [e[1] for e in events] == list(range(1, 9))
    state, picked, order_seq, last_seq = rows(bridge, "SELECT state, picked, order_seq, last_seq FROM orders")[0]
    assert (state, picked, order_seq, last_seq) == ("packed", '{"hook-6": 2, "line-20": 1}', 8, events[-1][2])
    assert [r[0] for r in rows(bridge, "SELECT msg_id FROM deadletters")] == ["k2"]
    assert broker.acks == [m.tag.mid for m in batch]  # refused and duplicate ones too
    assert (bridge.stats.stored, bridge.stats.duplicates, bridge.stats.rejected) == (8, 1, 1)


def test_a_batch_bigger_than_one_insert_stores_every_row_in_order(writer: tuple[Bridge, _NoBroker]) -> None:
    bridge, broker = writer
    orders = ("A", "B", "C")
    bridge._flush(inbound([(f"{o}/status", placed(o)) for o in orders]))
    count = 2 * ROWS_PER_INSERT + 37
    messages = [(f"{orders[i % 3]}/chat/cust1", chat(f"m{i}")) for i in range(count)]
    messages.insert(50, ("A/chat/cust1", b"{not json"))
    messages.insert(120, ("B/chat/cust1", chat("m7")))  # already in this batch
    bridge._flush(inbound(messages, first_mid=100))

    for o in orders:
        events = rows(bridge, "SELECT order_seq, seq FROM events WHERE order_id=? ORDER BY seq", o)
        assert [e[0] for e in events] == list(range(1, len(events) + 1))
        assert rows(bridge, "SELECT order_seq, last_seq FROM orders WHERE id=?", o) == [(len(events), events[-1][1])]
    assert rows(bridge, "SELECT count(*) FROM events")[0][0] == 3 + count
    assert len(broker.acks) == 3 + len(messages)

    bridge._flush(inbound(messages[:5], first_mid=1000))  # redelivered after a crash: acked, not stored again
    assert rows(bridge, "SELECT count(*) FROM events")[0][0] == 3 + count
    assert broker.acks[-5:] == list(range(1000, 1005))


def test_a_failed_commit_is_retried_from_the_committed_state(writer: tuple[Bridge, _NoBroker],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    bridge, broker = writer
    bridge._flush(inbound([("F1/status", placed("F1"))]))
    real = bridge.store.insert_events
    calls = []

    def busy_once(events: Any) -> None:
        calls.append(len(events))
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        real(events)

    monkeypatch.setattr(bridge.store, "insert_events", busy_once)
    batch = inbound([("F1/chat/cust1", chat(f"f{i}")) for i in range(3)], first_mid=10)
    bridge._flush(batch)

    assert calls == [3, 3]
    assert [r[0] for r in rows(bridge, "SELECT order_seq FROM events ORDER BY seq")] == [1, 2, 3, 4]
    assert rows(bridge, "SELECT order_seq FROM orders")[0][0] == 4
    assert broker.acks == [1, 10, 11, 12]  # once each, after the COMMIT that worked

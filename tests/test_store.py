"""One suite of store tests, run on SQLite (the default) and on PostgreSQL (``store.url``).

Everything goes through :func:`fishim.store.open_store` and the real writer (:class:`fishim.ingest.Writer`)
or :class:`fishim.testing.history.HistoryWriter`, so both stores are shown to hold the same rows for
the same input: migrations, the event log and its cursor, the order projection, retained state,
receipts, users, devices, dead letters, the owner's views, sync pages and the CLI. PostgreSQL-only:
the writer lock (a second writer waits; a writer whose session ended never writes again).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from fishim.cli import main
from fishim.config import Config
from fishim.ingest import Inbound, Kind, Writer
from fishim.messages import SyncPage
from fishim.store import (
    SCHEMA_VERSION,
    AlertRecord,
    DeadLetter,
    NewEvent,
    Store,
    StoreFenced,
    StoreTarget,
    UserRow,
    open_store,
)
from fishim.sync import SyncServer
from fishim.testing.history import HistoryWriter, lifecycle
from fishim.topics import Topics

T0 = 1_764_000_000_000
TOPICS = Topics("fishim")


@pytest.fixture(params=["sqlite", "postgres"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> StoreTarget:
    if request.param == "sqlite":
        return tmp_path / "store.db"
    make: Callable[[str], str] = request.getfixturevalue("pg_url")
    return make("store")


@pytest.fixture
def store(target: StoreTarget) -> Iterator[Store]:
    with open_store(target) as s:
        yield s


def body(**fields: object) -> bytes:
    return json.dumps({"ts": T0, **fields}).encode()


def inbound(order: str, channel: str, payload: bytes) -> Inbound:
    return Inbound(f"fishim/orders/{order}/{channel}", payload)


def shop(store: Store) -> Writer:
    """Accounts, then one order placed, confirmed, chatted on, picked (auto picking/packed) and a refusal."""
    HistoryWriter(store)  # PEOPLE: owner, shop (staff), cust1, rider7, …
    writer = Writer(store, Config(), "fishim-bridge")
    work = writer.commit([
        inbound("A1", "status", body(id="s1", sender="shop", state="placed", customer="cust1",
                                     items=[{"sku": "rod", "qty": 1}])),
        inbound("A1", "chat/cust1", body(id="c1", sender="cust1", text="before 6pm?")),
        inbound("A1", "status", body(id="s2", sender="shop", state="confirmed")),
        inbound("A1", "picks", body(id="p1", sender="scan1", sku="rod", qty=1)),
        inbound("A1", "status", body(id="bad", sender="shop", state="delivered")),
        inbound("A1", "receipts/cust1", body(id="r1", sender="cust1", read_up_to=2)),
        inbound("A1", "chat/cust1", body(id="c1", sender="cust1", text="before 6pm?")),  # a redelivery
    ])
    assert [r.kind for r in work.results] == [Kind.STORED] * 4 + [Kind.REFUSED, Kind.STORED, Kind.DUPLICATE]
    return writer


def test_schema_is_migrated_once(target: StoreTarget) -> None:
    with open_store(target) as first:
        assert first.schema_version == SCHEMA_VERSION
        first.put_user(UserRow(name="u1", role="staff", password_hash="!", created_at=T0))
    with open_store(target) as again, open_store(target, readonly=True) as reader:
        assert again.schema_version == reader.schema_version == SCHEMA_VERSION
        assert [u.name for u in reader.users()] == ["u1"]


def test_event_log_and_cursor(store: Store) -> None:
    shop(store)
    events = store.events_since(0)
    # placed, chat, confirmed, pick, automatic picking + packed, receipt: seq 1..7 in commit order
    assert [e.seq for e in events] == list(range(1, 8))
    assert [e.id for e in events][:4] == ["s1", "c1", "s2", "p1"]
    assert [e.order_seq for e in events] == list(range(1, 8))
    assert events[4].sender == events[5].sender == "fishim-bridge"
    assert store.max_seq() == store.count_events() == 7 and store.next_seq() == 8
    assert [e.id for e in store.events_since(5, limit=1)] == [events[5].id]
    assert store.events_since(0, orders=["nope"]) == [] and store.events_since(0, orders=[]) == []
    assert store.existing_ids(["c1", "x", "p1"]) == {"c1", "p1"}
    assert store.has_event("s2") and not store.has_event("bad")
    assert store.event_in_order("A1", "c1") and not store.event_in_order("B1", "c1")
    got = store.get_event("c1")
    assert got is not None and got.payload_dict()["text"] == "before 6pm?" and got.payload_dict()["seq"] == 2
    assert [e.id for e in store.order_events("A1")] == [e.id for e in events]
    assert store.count_events_received_since(0) == 7
    assert store.last_order_seq("A1") == 7 and store.last_order_seq("none") == 0


def test_single_insert_event(store: Store) -> None:
    event = NewEvent(id="e1", order_id="Z", channel="chat", topic="fishim/orders/Z/chat/a", sender="a", ts=T0,
                     payload="{}")
    with store.transaction():
        assert store.insert_event(event, 1) == 1
        assert store.insert_event(event, 1) is None  # its id is stored: ignored
    assert store.max_seq() == 1


def test_projection_retained_receipts(store: Store) -> None:
    shop(store)
    order = store.get_order("A1")
    assert order is not None and (order.state, order.customer, order.last_seq, order.order_seq) == ("packed", "cust1",
                                                                                                  7, 7)
    assert order.items == [{"sku": "rod", "qty": 1}] and order.picked == {"rod": 1}
    assert [o.id for o in store.list_orders(state="packed")] == ["A1"] and store.list_orders(state="placed") == []
    assert [o.id for o in store.list_orders(customer="cust1")] == ["A1"]
    assert store.order_ids_for("cust1", "customer") == ["A1"] and store.order_ids_for("x", "staff") is None
    assert store.order_ids_for("rider7", "rider") == [] and store.order_ids_for("s", "scanner") == []
    assert store.orders_by_state() == {"packed": 1}
    retained = store.retained()
    assert [r.topic for r in retained] == ["fishim/orders/A1/receipts/cust1", "fishim/orders/A1/status"]
    status = store.get_retained("fishim/orders/A1/status")
    assert status is not None and json.loads(status.payload)["state"] == "packed" and status.seq == 6
    with store.transaction():
        store.put_retained("fishim/orders/A1/receipts/cust1", b"")  # an empty payload clears the slot
    assert store.get_retained("fishim/orders/A1/receipts/cust1") is None
    assert store.get_receipt("A1", "cust1") == 2 and store.receipts("A1") == {"cust1": 2}
    assert [(r.member, r.read_up_to) for r in store.receipt_rows("A1")] == [("cust1", 2)]
    (view,) = store.order_overview()
    assert view.order.id == "A1" and view.last_event is not None and view.last_event.seq == 7
    assert view.unread == {"customer": 3, "rider": None}  # confirmed, picking, packed after read_up_to 2
    assert [v.order.id for v in store.order_overview(open_created_before=T0 * 2, limit=None)] == ["A1"]


def test_deadletters(store: Store) -> None:
    shop(store)
    (letter,) = store.deadletters()
    assert (letter.msg_id, letter.error, letter.user, letter.topic) == ("bad", "illegal_transition", "shop",
                                                                      "fishim/orders/A1/status")
    assert letter.payload is not None and json.loads(letter.payload)["state"] == "delivered"
    store.add_deadletter(DeadLetter(received_at=T0, topic="t", error="bad_json", detail="d", payload=b"\xff\x00"))
    assert store.count_deadletters() == 2 and store.max_deadletter_id() == letter.id + 1  # type: ignore[operator]
    assert [d.payload for d in store.deadletters_after(letter.id or 0)] == [b"\xff\x00"]
    assert [d.msg_id for d in store.recent_deadletters(limit=1)] == [None]


def test_deadletters_are_bounded(store: Store) -> None:
    store.max_deadletters = 3
    for n in range(5):
        store.add_deadletter(DeadLetter(received_at=T0 + n, topic="t", msg_id=f"m{n}", error="bad_json", detail="d",
                                        payload=b"x" * 5000))
    letters = store.deadletters()
    assert [d.msg_id for d in letters] == ["m2", "m3", "m4"]  # the oldest went first
    assert all(d.payload == b"x" * 4096 and "5000 bytes" in d.detail for d in letters)


def test_alerts_and_outbox(store: Store) -> None:
    store.put_alerts([AlertRecord("a1", "A1", "mention", "high", "open", T0, T0, '{"id":"a1"}'),
                      AlertRecord("a2", None, "rider_offline", "normal", "pending", T0, T0 + 1, '{"id":"a2"}')])
    store.put_alerts([AlertRecord("a2", None, "rider_offline", "urgent", "closed", T0, T0 + 2, '{"id":"a2","v":2}')])
    assert store.alerts() == ['{"id":"a2","v":2}', '{"id":"a1"}'] and store.alerts(live_only=True) == ['{"id":"a1"}']
    assert store.get_alert("a2") == '{"id":"a2","v":2}' and store.get_alert("zz") is None
    assert store.open_alert_counts() == {"A1": 1} and store.alert_counts() == {"open": 1, "closed": 1}
    store.add_ack("a1", "boss")
    store.add_ack("a1", "boss")  # once
    assert store.pending_acks() == [("a1", "boss")]
    store.mark_acks_applied(["a1"])
    assert store.pending_acks() == []
    store.delete_alerts(["a2"])
    assert store.alerts() == ['{"id":"a1"}']
    store.put_outbox([("o1", "cust1", "push", T0 + 5, "{}"), ("o2", "rider7", "push", T0, '{"n":2}')])
    assert store.outbox() == ['{"n":2}', "{}"]
    store.outbox_result("o2", "failed", 3, "timeout")
    store.put_outbox([], drop=["o1"])
    assert store.outbox() == [] and [(i, u, a, e) for i, u, a, e, _t in store.failed_pushes()] == [
        ("o2", "rider7", 3, "timeout")]


def test_users_and_devices(store: Store) -> None:
    store.put_user(UserRow(name="zhang", role="customer", password_hash="h1", created_at=T0))
    store.put_user(UserRow(name="zhang", role="rider", password_hash="h2", created_at=T0))  # replaced
    store.put_user(UserRow(name="fishim-bridge", role="service", password_hash="h", created_at=T0))
    user = store.get_user("zhang")
    assert user is not None and (user.role, user.password_hash) == ("rider", "h2")
    assert [u.name for u in store.users()] == ["fishim-bridge", "zhang"] and store.count_users() == 1
    assert store.remove_user("zhang") and not store.remove_user("zhang") and store.get_user("zhang") is None
    store.record_device("cust1", "phone", 0, 5, T0)
    store.record_device("cust1", "phone", 5, 9, T0 + 1)
    store.record_device("rider7", "tab", 1, 2, T0 + 2)
    device = store.device("cust1", "phone")
    assert device is not None and (device.cursor, device.served, device.syncs, device.first_seen) == (5, 9, 2, T0)
    assert [d.client_id for d in store.devices()] == ["tab", "phone"]


def test_sync_pages(target: StoreTarget) -> None:
    with open_store(target) as s:
        w = HistoryWriter(s)
        t = lifecycle(w, "A1", T0, customer="cust1", rider="rider7", fixes=3)
        lifecycle(w, "B1", t, customer="cust2", rider="rider8", fixes=2)
        mine = [e.seq for e in s.events_since(0, orders=["A1"])]
    server = SyncServer(target, Config())
    try:
        out = server.handle(TOPICS.parse(TOPICS.sync_request("cust1", "phone")), b'{"since": 2, "collapse": false}')
        pages = [SyncPage.model_validate_json(payload) for _topic, payload in out]
        assert [e.seq for p in pages for e in p.events] == [seq for seq in mine if seq > 2]
        assert pages[-1].done and pages[-1].next_since >= mine[-1]
    finally:
        server.close()
    with open_store(target, readonly=True) as s:
        device = s.device("cust1", "phone")
        assert device is not None and device.cursor == 2


def test_cli_reads_the_store(target: StoreTarget) -> None:
    with open_store(target) as s:
        shop(s)
    runner = CliRunner()
    result = runner.invoke(main, ["orders", "list", "--json"], env={"FISHIM_DB": str(target)})
    assert result.exit_code == 0, result.output
    assert [o["id"] for o in json.loads(result.stdout)["orders"]] == ["A1"]
    shown = runner.invoke(main, ["replay", "cust1", "--since", "5", "--json"], env={"FISHIM_DB": str(target)})
    assert shown.exit_code == 0, shown.output
    assert [e["seq"] for e in json.loads(shown.stdout)["events"]] == [6, 7]


def test_cursor_never_skips_a_commit(target: StoreTarget) -> None:
    """A reader following the cursor while the writer commits batches sees every seq, in order, once."""
    batches, per_batch = 40, 25
    with open_store(target) as s:
        HistoryWriter(s)
        writer = Writer(s, Config(), "fishim-bridge")
        writer.commit([inbound("A1", "status", body(id="s1", sender="shop", state="placed", customer="cust1",
                                                    items=[{"sku": "rod", "qty": 1}]))])
        seen: list[int] = []
        done = threading.Event()

        def follow() -> None:
            with open_store(target, readonly=True) as reader:
                cursor = 0
                while True:
                    finished = done.is_set()  # read before the scan: the last scan sees every commit
                    for event in reader.events_since(cursor):
                        seen.append(event.seq)
                        cursor = event.seq
                    if finished:
                        return

        thread = threading.Thread(target=follow)
        thread.start()
        try:
            for b in range(batches):
                writer.commit([inbound("A1", "chat/cust1", body(id=f"c{b}-{i}", sender="cust1", text="x"))
                               for i in range(per_batch)])
        finally:
            done.set()
            thread.join(30)
    assert seen == list(range(1, batches * per_batch + 2))


# -- PostgreSQL only: the writer lock --------------------------------------------------------------


def test_a_second_writer_waits_for_the_lock(pg_url: Callable[[str], str]) -> None:
    url = pg_url("lock")
    first = open_store(url, writer=True)
    HistoryWriter(first)
    Writer(first, Config(), "fishim-bridge").commit([
        inbound("A1", "status", body(id="s1", sender="shop", state="placed", customer="cust1",
                                     items=[{"sku": "rod", "qty": 1}]))])
    got: list[Store] = []
    standby = threading.Thread(target=lambda: got.append(open_store(url, writer=True)))
    standby.start()
    try:
        with open_store(url, readonly=True) as watcher:  # the standby is blocked on the advisory lock
            waiting = watcher.conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type='Lock' AND wait_event='advisory'")
            deadline_rows = [waiting.fetchone()[0]]
            while deadline_rows[-1] == 0 and standby.is_alive() and len(deadline_rows) < 2000:
                deadline_rows.append(watcher.conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type='Lock'"
                    " AND wait_event='advisory'").fetchone()[0])
            assert deadline_rows[-1] == 1 and not got
        first.close()  # the active writer's session ends: the lock passes on
        standby.join(30)
        (second,) = got
        assert second.holds_lock()  # type: ignore[attr-defined]
        w2 = Writer(second, Config(), "fishim-bridge")
        w2.commit([inbound("A1", "chat/cust1", body(id="c1", sender="cust1", text="x"))])
        assert [e.seq for e in second.events_since(0)] == [1, 2]
        second.close()
    finally:
        first.close()
        standby.join(30)


def test_a_writer_that_lost_its_session_never_writes(pg_url: Callable[[str], str]) -> None:
    url = pg_url("fenced")
    active = open_store(url, writer=True)
    HistoryWriter(active)
    writer = Writer(active, Config(), "fishim-bridge")
    writer.commit([inbound("A1", "status", body(id="s1", sender="shop", state="placed", customer="cust1",
                                                items=[{"sku": "rod", "qty": 1}]))])
    with open_store(url) as admin:  # the server ends the active writer's session (as after a partition)
        pid = active.conn.raw.execute("SELECT pg_backend_pid()").fetchone()[0]  # type: ignore[attr-defined]
        admin.conn.execute("SELECT pg_terminate_backend(?)", (pid,))
    with open_store(url, writer=True) as successor:  # the lock is free: a standby takes it
        with pytest.raises(StoreFenced):
            writer.flush([inbound("A1", "chat/cust1", body(id="late", sender="cust1", text="x"))], threading.Event())
        assert not active.holds_lock()  # type: ignore[attr-defined]
        assert [e.id for e in successor.events_since(0)] == ["s1"] and successor.count_deadletters() == 0
    active.close()

"""Sync and replay: a rider who loses signal gets everything it missed, once, in order.

Two layers:

- ``SyncServer.handle`` on stores written by :class:`~fishim.testing.history.HistoryWriter` (the real
  order rules, no broker): membership per role, paging bounds, the cursor, collapse, refusals. Fast.
- End to end on :class:`~fishim.testing.stack.Stack` (broker + bridge + SQLite file), with real paho
  clients and the signal-loss :class:`~fishim.testing.proxy.Proxy` between the rider and the broker:
  the connection is *cut* (RST, no DISCONNECT), events pile up, the rider comes back as a new session.

The store has no accounts in the end-to-end tests (anonymous loopback mode): rider membership comes
from ``assigned`` statuses and customer membership from ``placed``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fishim.client import ClientEvent, FishimClient
from fishim.config import Config
from fishim.messages import SyncPage
from fishim.store import Store
from fishim.sync import SyncServer
from fishim.testing.history import HistoryWriter, lifecycle
from fishim.testing.mqtt import Collector, MqttClient, connect_client, publish_and_wait
from fishim.testing.proxy import Proxy
from fishim.testing.stack import Stack
from fishim.topics import Topics, parse

T = Topics("fishim")
ITEMS = [{"sku": "ROD-21", "qty": 1}]


# -- SyncServer on a store written through the order rules ------------------------------------------


def _request(server: SyncServer, user: str, body: dict[str, Any] | bytes, client: str = "dev1"
             ) -> list[tuple[str, bytes]]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return server.handle(parse(T.sync_request(user, client)), raw)


def _pages(out: list[tuple[str, bytes]]) -> list[SyncPage]:
    assert out and all(topic.endswith("/events") for topic, _ in out), out
    return [SyncPage.model_validate_json(body) for _, body in out]


def _events(out: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    return [e.model_dump() for p in _pages(out) for e in p.events]


@pytest.fixture(scope="module")
def shop_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Accounts (HistoryWriter.PEOPLE) and four orders: rider7 has A1, A2; rider8 has B1; C1 unassigned."""
    db = tmp_path_factory.mktemp("sync") / "shop.db"
    with Store(db) as store:
        w = HistoryWriter(store)
        t = 1_700_000_000_000
        t = lifecycle(w, "A1", t, customer="cust1", rider="rider7", fixes=30)
        t = lifecycle(w, "B1", t, customer="cust2", rider="rider8", fixes=10)
        t = lifecycle(w, "A2", t, customer="13812345678", rider="rider7", until="delivering", fixes=5)
        lifecycle(w, "C1", t, customer="cust1", until="packed")
    return db


@pytest.fixture
def server(shop_db: Path) -> Iterator[SyncServer]:
    srv = SyncServer(shop_db, Config())
    yield srv
    srv.close()


def _store_events(db: Path, orders: set[str] | None = None, since: int = 0) -> list[tuple[int, str]]:
    with Store(db, readonly=True) as store:
        rows = store.events_since(since, limit=1_000_000)
    return [(e.seq, e.id) for e in rows if orders is None or e.order_id in orders]


@pytest.mark.parametrize(("user", "orders"), [
    ("rider7", {"A1", "A2"}), ("rider8", {"B1"}), ("cust1", {"A1", "C1"}), ("13812345678", {"A2"}),
    ("shop", None), ("owner", None), ("scan1", set()),
])
def test_replay_holds_exactly_the_orders_the_role_may_read(server: SyncServer, shop_db: Path, user: str,
                                                           orders: set[str] | None) -> None:
    got = _events(_request(server, user, {"since": 0, "collapse": False}))
    assert [(e["seq"], e["payload"]["id"]) for e in got] == _store_events(shop_db, orders)


def test_unknown_user_reads_orders_where_it_is_rider_or_customer(tmp_path: Path) -> None:
    """Anonymous loopback mode: no accounts, membership from `assigned` (rider) and `placed` (customer)."""
    db = tmp_path / "anon.db"
    with Store(db) as store:
        w = HistoryWriter(store, people={})
        for order, customer, rider in (("X1", "ann", "bob"), ("X2", "bob", "cy"), ("X3", "cy", "dan")):
            for n, state in enumerate(("placed", "confirmed", "picking", "packed", "assigned")):
                body = {"id": f"{order}-{n}", "ts": 1, "sender": "shop", "state": state}
                body.update({"placed": {"customer": customer, "items": ITEMS}, "assigned": {"rider": rider}
                             }.get(state, {}))
                assert isinstance(w.publish(T.status(order), body), int)
    srv = SyncServer(db, Config())
    got = {e["topic"].split("/")[2] for e in _events(_request(srv, "bob", {"since": 0}))}
    assert got == {"X1", "X2"}
    assert _events(_request(srv, "nobody", {"since": 0})) == []
    srv.close()


def test_pages_are_bounded_ordered_and_resumable(shop_db: Path) -> None:
    config = Config.model_validate({"limits": {"sync_page_events": 7, "sync_page_bytes": 2048}})
    srv = SyncServer(shop_db, config)
    out = _request(srv, "shop", {"since": 0, "id": "req-1", "collapse": False})
    pages = _pages(out)
    expected = _store_events(shop_db)
    assert len(pages) > 5
    assert [p.done for p in pages] == [False] * (len(pages) - 1) + [True]
    assert [p.page for p in pages] == list(range(len(pages)))
    assert {p.request_id for p in pages} == {"req-1"}
    for (_, body), page in zip(out, pages, strict=True):
        assert len(page.events) <= 7
        assert len(body) <= 2048 or len(page.events) == 1
        if page.events:
            assert page.next_since == page.events[-1].seq or page.done
    seqs = [e.seq for p in pages for e in p.events]
    assert [(e.seq, e.payload["id"]) for p in pages for e in p.events] == expected
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert pages[-1].next_since == expected[-1][0]
    # Cut off after page 3: resuming from its cursor gives exactly the rest, nothing twice.
    rest = _events(_request(srv, "shop", {"since": pages[2].next_since, "collapse": False}))
    assert [e["seq"] for e in rest] == seqs[sum(len(p.events) for p in pages[:3]):]
    # A second sync from the final cursor returns nothing.
    again = _pages(_request(srv, "shop", {"since": pages[-1].next_since}))
    assert len(again) == 1 and again[0].events == [] and again[0].done
    assert again[0].next_since == pages[-1].next_since
    srv.close()


def test_cursor_moves_past_events_of_other_orders(server: SyncServer, shop_db: Path) -> None:
    """The done page's cursor is the end of the scanned snapshot, not the user's last event: a rider
    whose orders were quiet doesn't rescan everyone else's traffic next time, and skips nothing."""
    pages = _pages(_request(server, "rider8", {"since": 0}))
    last_b1 = max(seq for seq, _ in _store_events(shop_db, {"B1"}))
    end = _store_events(shop_db)[-1][0]
    assert last_b1 < end and pages[-1].next_since == end
    scanner = _pages(_request(server, "scan1", {"since": 0}))
    assert scanner[-1].events == [] and scanner[-1].next_since == end


def test_location_collapses_to_the_latest_fix_per_order(server: SyncServer, shop_db: Path) -> None:
    full = _events(_request(server, "rider7", {"since": 0, "collapse": False}))
    out = _request(server, "rider7", {"since": 0})
    short = _events(out)
    assert _pages(out)[-1].collapsed == ["location"]
    non_loc = [e for e in full if "/location" not in e["topic"]]
    assert [e for e in short if "/location" not in e["topic"]] == non_loc  # every other channel complete
    latest = {}
    for e in full:
        if e["topic"].endswith("/location"):
            latest[e["topic"]] = e["seq"]
    assert [e["seq"] for e in short if e["topic"].endswith("/location")] == sorted(latest.values())
    assert [e["seq"] for e in short] == sorted(e["seq"] for e in short)
    # Nothing collapsed, nothing said.
    assert _pages(_request(server, "cust2", {"since": 0, "orders": ["B1"], "collapse": False}))[-1].collapsed == []


def test_orders_narrows_but_never_widens(server: SyncServer, shop_db: Path) -> None:
    only_a2 = _events(_request(server, "rider7", {"since": 0, "orders": ["A2"], "collapse": False}))
    assert [(e["seq"], e["payload"]["id"]) for e in only_a2] == _store_events(shop_db, {"A2"})
    assert _events(_request(server, "rider7", {"since": 0, "orders": ["B1"]})) == []
    assert len(_events(_request(server, "shop", {"since": 0, "orders": ["B1", "C1"], "collapse": False}))) \
        == len(_store_events(shop_db, {"B1", "C1"}))


def test_replayed_payloads_are_the_stored_json(server: SyncServer, shop_db: Path) -> None:
    """Pages are spliced from the stored text; they must still be exactly that JSON (UTF-8 included)."""
    with Store(shop_db, readonly=True) as store:
        stored = {e.seq: (e.topic, e.order_seq, e.payload_dict()) for e in store.events_since(0, limit=10**6)}
    for e in _events(_request(server, "owner", {"since": 0, "collapse": False})):
        assert (e["topic"], e["order_seq"], e["payload"]) == stored[e["seq"]]


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "bad_json"),
    (b"[1, 2]", "bad_json"),
    (b'{"since": -1}', "bad_schema"),
    (b'{"since": "ten"}', "bad_schema"),
    (b'{"since": 0, "orders": ["bad/order"]}', "bad_schema"),
    (b'{"since": 0, "collapse": "yes"}', "bad_schema"),
    (b'{"since": 0, "sender": "rider8", "id": "r-9"}', "sender_mismatch"),
    (b'{"since": 99999999}', "cursor_ahead"),
    (b'{"since": 0, "pad": "' + b"x" * 70_000 + b'"}', "too_large"),
])
def test_bad_requests_get_an_error_not_data(server: SyncServer, body: bytes, code: str) -> None:
    refused: list[str] = []
    server.on_reject = lambda _ref, _payload, rejected: refused.append(rejected.code.value)
    out = _request(server, "rider7", body)
    assert [topic for topic, _ in out] == ["fishim/errors/rider7"]
    error = json.loads(out[0][1])
    assert error["error"] == code and error["topic"] == "fishim/sync/rider7/dev1/request"
    assert refused == [code]
    if code == "sender_mismatch":
        assert error["id"] == "r-9"


def test_per_request_bound_says_more(shop_db: Path) -> None:
    srv = SyncServer(shop_db, Config(), max_events=10)
    pages = _pages(_request(srv, "owner", {"since": 0, "collapse": False}))
    seqs = [e.seq for p in pages for e in p.events]
    assert len(seqs) == 10 and pages[-1].more and pages[-1].next_since == seqs[-1]
    rest = _pages(_request(srv, "owner", {"since": seqs[-1], "collapse": False}))
    assert rest[0].events[0].seq > seqs[-1]
    srv.close()


# -- end to end: broker + bridge + proxy ------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("e2e") / "fishim.db") as running:
        yield running


def _wait_stored(db: Path, n: int, timeout: float = 30.0) -> None:
    """Until the store holds ``n`` events (the bridge commits in batches, after the PUBACK path)."""
    deadline = time.monotonic() + timeout
    with Store(db, readonly=True) as store:
        while store.count_events() < n:
            assert time.monotonic() < deadline, f"store has {store.count_events()} of {n} events"
            time.sleep(0.05)


def _count(db: Path) -> int:
    with Store(db, readonly=True) as store:
        return store.count_events()


def _open_order(shop: MqttClient, order: str, customer: str, rider: str | None) -> int:
    """placed → … → assigned (6 events), through the broker; returns how many were published."""
    _pub(shop, T.status(order), state="placed", customer=customer, items=ITEMS)
    for state in ("confirmed", "picking", "packed"):
        _pub(shop, T.status(order), state=state)
    if rider is None:
        return 4
    _pub(shop, T.status(order), state="assigned", rider=rider)
    return 5


def _pub(client: MqttClient, topic: str, sender: str = "shop", retain: bool | None = None, **fields: Any) -> str:
    ident = uuid.uuid4().hex
    body = {"id": ident, "ts": int(time.time() * 1000), "sender": sender, **fields}
    publish_and_wait(client, topic, body, retain=topic.endswith(("/status", "/location")) if retain is None
                     else retain)
    return ident


class Syncer:
    """A raw paho client's sync: subscribed once to its events topic (re-subscribing right after an
    UNSUBSCRIBE of the same filter is a race on some brokers), one request at a time."""

    def __init__(self, client: MqttClient, user: str, client_id: str) -> None:
        self.client, self.user, self.client_id = client, user, client_id
        self.inbox = Collector(client, T.sync_events(user, client_id))

    def __call__(self, since: int, timeout: float = 20.0, **extra: Any) -> list[SyncPage]:
        """Publish one request and collect the reply up to its done page."""
        rid = uuid.uuid4().hex
        publish_and_wait(self.client, T.sync_request(self.user, self.client_id), {"id": rid, "since": since,
                                                                                  **extra})
        pages: list[SyncPage] = []
        while not pages or not pages[-1].done:
            page = SyncPage.model_validate_json(self.inbox.get(timeout).payload)
            if page.request_id == rid:
                pages.append(page)
        return pages


def test_rider_cut_off_gets_every_missed_event_once_in_order(stack: Stack) -> None:
    """The proxy cuts the rider (RST, no DISCONNECT); 100+ events on its order and others meanwhile; the
    rider returns as a NEW session and syncs: all its missed events, once, in order, none of others."""
    db = stack.db
    with connect_client(stack.port, "shop-e2e") as shop, Proxy("127.0.0.1", stack.port) as proxy:
        base = _count(db)
        n = _open_order(shop, "cut-A", "cust-a", "rider-cut") + _open_order(shop, "cut-B", "cust-b", "other-r")
        _wait_stored(db, base + n)
        rider = connect_client(proxy.port, "rider-cut-phone1", username="rider-cut")
        live = Collector(rider, T.all_orders)
        cursor = Syncer(rider, "rider-cut", "rider-cut-phone1")(0)[-1].next_since
        _pub(shop, T.chat("cut-A", "shop"), text="before the lift")
        while "/chat/" not in (msg := live.get(10)).topic:
            assert msg.retain, msg  # only the retained statuses come before it
        assert json.loads(msg.payload)["text"] == "before the lift"

        proxy.cut(refuse=True)  # the lift doors close
        rider.wait_disconnected()
        rider.loop_stop()  # the app is killed: the next connection is a new session
        missed: list[str] = []
        others: list[str] = []
        fixes: list[str] = []
        for i in range(60):
            missed.append(_pub(shop, T.chat("cut-A", "cust-a"), sender="cust-a", text=f"where are you? {i}"))
            others.append(_pub(shop, T.chat("cut-B", "cust-b"), sender="cust-b", text=f"hello {i}"))
            if i % 10 == 0:
                fixes.append(_pub(shop, T.location("cut-A"), sender="rider-cut", lat=30 + i / 1000, lon=120.0))
                missed.append(fixes[-1])
                others.append(_pub(shop, T.location("cut-B"), sender="other-r", lat=31.0, lon=121.0))
        missed.append(_pub(shop, T.status("cut-A"), sender="rider-cut", state="picked_up"))
        _wait_stored(db, base + n + 1 + len(missed) + len(others))

        proxy.restore()
        with connect_client(proxy.port, "rider-cut-phone2", username="rider-cut") as again:
            sync = Syncer(again, "rider-cut", "rider-cut-phone2")
            pages = sync(cursor, collapse=False)
            got = [e for p in pages for e in p.events]
            assert all("/orders/cut-A/" in e.topic for e in got), "events of other orders leaked"
            ids = [e.payload["id"] for e in got]
            assert len(ids) == len(set(ids)), "an event was replayed twice"
            assert [e.seq for e in got] == sorted(e.seq for e in got)
            assert ids[1:] == missed  # the chat seen live before the cut, then everything missed, in order
            with Store(db, readonly=True) as store:
                assert ids == [e.id for e in store.order_events("cut-A") if e.seq > cursor]
            # With location collapse (the default): every other channel still complete.
            short = [e for p in sync(cursor) for e in p.events]
            assert [e.payload["id"] for e in short if "/location" not in e.topic] == \
                [i for e, i in zip(got, ids, strict=True) if "/location" not in e.topic]
            assert [e.payload["id"] for e in short if "/location" in e.topic] == [fixes[-1]]
            # The returned cursor is complete: a second sync returns nothing.
            second = sync(pages[-1].next_since)
            assert [e for p in second for e in p.events] == [] and second[-1].done


def test_late_joiner_with_since_0_gets_the_whole_timeline(stack: Stack) -> None:
    db = stack.db
    with connect_client(stack.port, "shop-late") as shop:
        base = _count(db)
        n = _open_order(shop, "late-1", "cust-late", None)
        for i in range(5):
            _pub(shop, T.chat("late-1", "cust-late"), sender="cust-late", text=f"any news {i}")
        n += 5
        n += _open_order(shop, "late-2", "someone", "rider-x")
        _pub(shop, T.status("late-1"), state="assigned", rider="rider-new")  # assigned after all that
        _wait_stored(db, base + n + 1)
        with connect_client(stack.port, "rider-new-phone", username="rider-new") as rider:
            got = [e for p in Syncer(rider, "rider-new", "rider-new-phone")(0) for e in p.events]
        with Store(db, readonly=True) as store:
            assert [e.payload["id"] for e in got] == [e.id for e in store.order_events("late-1")]
        assert got[0].payload["state"] == "placed" and [e.order_seq for e in got] == list(range(1, len(got) + 1))


def test_foreign_sync_topic_or_bad_body_gets_an_error_not_data(stack: Stack) -> None:
    with connect_client(stack.port, "shop-bad") as shop:
        base = _count(stack.db)
        _wait_stored(stack.db, base + _open_order(shop, "bad-1", "cust-bad", "rider-bad"))
    with connect_client(stack.port, "snoop-phone", username="snoop") as snoop, \
            Collector(snoop, [T.errors("rider-bad"), T.errors("snoop")]) as errors, \
            Collector(snoop, [T.sync_events("rider-bad", "x"), T.sync_events("snoop", "snoop-phone")]) as data:
        # asking on the rider's sync topic while saying who we are
        publish_and_wait(snoop, T.sync_request("rider-bad", "x"), {"id": "q1", "since": 0, "sender": "snoop"})
        error = json.loads(errors.get(10).payload)
        assert (error["error"], error["id"]) == ("sender_mismatch", "q1")
        for body in (b"{oops", b'{"since": -5}', b'{"since": 1.5}'):
            publish_and_wait(snoop, T.sync_request("snoop", "snoop-phone"), body)
            assert json.loads(errors.get(10).payload)["error"] in ("bad_json", "bad_schema")
        # Marker: a valid request after the refused ones. Replies come in request order, so its page
        # being the first data proves the refused requests produced none.
        publish_and_wait(snoop, T.sync_request("snoop", "snoop-phone"), {"id": "marker", "since": 0})
        first = json.loads(data.get(10).payload)
        assert first.get("request_id") == "marker", f"a refused sync request produced data: {first}"


def _drain(client: FishimClient, seconds: float) -> list[ClientEvent]:
    """What the client delivers within ``seconds`` (events() alone only stops when traffic pauses)."""
    deadline = time.monotonic() + seconds
    got: list[ClientEvent] = []
    for event in client.events(timeout=0.1):
        got.append(event)
        if time.monotonic() > deadline:
            break
    return got


def _collect_until(client: FishimClient, done: Callable[[list[ClientEvent]], bool],
                   timeout: float = 20) -> list[ClientEvent]:
    """What the client delivers until ``done(collected)`` holds: a condition, not a time window.

    Stops only right after a live event: a replay page is one queue item, and leaving ``events()``
    in the middle of one would drop the rest of that page (and its cursor checkpoint).
    """
    deadline = time.monotonic() + timeout
    got: list[ClientEvent] = []
    while not (done(got) and (not got or got[-1].source == "live")):
        assert time.monotonic() < deadline, f"condition not reached within {timeout}s ({len(got)} events)"
        for event in client.events(timeout=0.1):  # ends after 0.1 s without an event
            got.append(event)
            if event.source == "live" and done(got):
                break
    return got


def _live(count: int) -> Callable[[list[ClientEvent]], bool]:
    return lambda got: sum(e.source == "live" for e in got) >= count


def test_client_live_and_replay_overlap_never_yields_twice(stack: Stack, tmp_path: Path) -> None:
    """FishimClient through the proxy while events flow; the signal is cut again and again (paho's
    automatic reconnect, persistent session), then the app is killed and restarted (new session).
    Every event of the rider's order is delivered exactly once; replayed ones in seq order."""
    db = stack.db
    delivered: list[ClientEvent] = []
    stop = threading.Event()
    published: list[str] = []

    def shop_traffic(shop: MqttClient) -> None:
        i = 0
        while not stop.is_set():
            published.append(_pub(shop, T.chat("ovl-1", "cust-o"), sender="cust-o", text=f"msg {i}"))
            _pub(shop, T.chat("ovl-2", "cust-p"), sender="cust-p", text=f"other {i}")
            i += 1
            time.sleep(0.01)

    cursor_file = tmp_path / "rider.cursor"
    with connect_client(stack.port, "shop-ovl") as shop, Proxy("127.0.0.1", stack.port) as proxy:
        base = _count(db)
        n = _open_order(shop, "ovl-1", "cust-o", "rider-o") + _open_order(shop, "ovl-2", "cust-p", "rider-p")
        _wait_stored(db, base + n)
        rider = FishimClient("127.0.0.1", proxy.port, "rider-o", cursor_path=cursor_file,
                             reconnect_delay=(1, 1), sync_timeout=10)
        rider.connect()
        rider.subscribe_orders()
        traffic = threading.Thread(target=shop_traffic, args=(shop,), daemon=True)
        traffic.start()
        try:
            for _ in range(3):
                delivered.extend(_collect_until(rider, _live(5)))  # live traffic is flowing
                syncs = rider.stats["syncs"]
                proxy.cut()  # paho notices, reconnects after ~1 s, syncs, releases held live messages
                delivered.extend(_collect_until(rider, lambda _got, syncs=syncs: rider.stats["syncs"] > syncs))
                rider.wait_synced(20)
            delivered.extend(_collect_until(rider, _live(5)))
            assert rider.stats["queued_live"] > 0 and rider.stats["syncs"] >= 4
            rider.close()
            # Killed app: the broker session is gone too; the shop goes on; restart from the saved cursor.
            missed = len(published) + 5
            deadline = time.monotonic() + 20
            while len(published) < missed:  # the app misses a few messages while it is down
                assert time.monotonic() < deadline, "the shop stopped publishing"
                time.sleep(0.01)
            with FishimClient("127.0.0.1", proxy.port, "rider-o", cursor_path=cursor_file,
                              clean_session=True) as restarted:
                restarted.subscribe_orders()  # returns once synced; traffic still flows: live overlaps replay
                delivered.extend(_collect_until(restarted, _live(3)))
                stop.set()
                traffic.join(10)
                _wait_stored(db, base + n + 2 * len(published))
                _pub(shop, T.chat("ovl-1", "shop"), text="last one")
                deadline = time.monotonic() + 20
                while not any(e.payload.get("text") == "last one" for e in delivered):
                    assert time.monotonic() < deadline, "the restarted client never caught up"
                    delivered.extend(_drain(restarted, 0.5))
        finally:
            stop.set()
    mine = [e for e in delivered if e.order == "ovl-1"]
    ids = [e.id for e in mine]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} events delivered twice"
    with Store(db, readonly=True) as store:
        stored = [e.id for e in store.order_events("ovl-1")]
    assert set(ids) == set(stored), f"missing {len(set(stored) - set(ids))}"
    replayed = [e.seq for e in mine if e.source == "replay" and e.seq is not None]
    assert replayed, "nothing was replayed: the test did not exercise the overlap"


def test_client_backfills_an_order_assigned_to_it_later(stack: Stack) -> None:
    """The rider's cursor is past the order's early history; on its `assigned` status the client asks
    for that order from 0, so it ends up holding the whole timeline, each event once."""
    db = stack.db
    with connect_client(stack.port, "shop-bf") as shop, \
            FishimClient("127.0.0.1", stack.port, "rider-bf") as rider:
        base = _count(db)
        n = _open_order(shop, "bf-1", "cust-bf", None)
        _pub(shop, T.chat("bf-1", "cust-bf"), sender="cust-bf", text="before any rider")
        _wait_stored(db, base + n + 1)
        rider.subscribe_orders()  # sync: bf-1 is not the rider's yet, the cursor moves past it
        assert rider.cursor >= base + n + 1
        early = _drain(rider, 0.5)  # anonymous mode: retained statuses of every order arrive live
        _pub(shop, T.status("bf-1"), state="assigned", rider="rider-bf")
        _pub(shop, T.chat("bf-1", "cust-bf"), sender="cust-bf", text="after")
        _wait_stored(db, base + n + 3)
        deadline = time.monotonic() + 10
        with Store(db, readonly=True) as store:
            stored = [e.id for e in store.order_events("bf-1")]
        got = [e for e in early if e.order == "bf-1"]
        while {e.id for e in got} != set(stored):
            assert time.monotonic() < deadline, f"missing {set(stored) - {e.id for e in got}}"
            got += [e for e in _drain(rider, 0.3) if e.order == "bf-1"]
    assert len(got) == len({e.id for e in got}), "delivered twice"
    backfilled = [e for e in got if e.source == "replay"]
    assert [e.seq for e in backfilled] == sorted(e.seq for e in backfilled) and backfilled


def test_client_resets_a_cursor_from_another_store(stack: Stack, tmp_path: Path) -> None:
    """A cursor past the store's end (the store was replaced) is refused with cursor_ahead; the client
    starts over from 0 instead of silently skipping everything."""
    import sqlite3

    cursor_file = tmp_path / "old.cursor"
    with connect_client(stack.port, "shop-ca") as shop:
        base = _count(stack.db)
        _wait_stored(stack.db, base + _open_order(shop, "ca-1", "cust-ca", "rider-ca"))
    FishimClient("127.0.0.1", stack.port, "rider-ca", cursor_path=cursor_file).close()  # makes the file
    with sqlite3.connect(cursor_file) as db:
        db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('cursor', '99999999')")
    with FishimClient("127.0.0.1", stack.port, "rider-ca", cursor_path=cursor_file) as rider:
        rider.subscribe_orders()  # returns once synced: the replay is queued for delivery
        got = [e for e in rider.events(timeout=0) if e.order == "ca-1" and e.source == "replay"]
        assert [e.payload["state"] for e in got] == ["placed", "confirmed", "picking", "packed", "assigned"]
        assert rider.cursor < 99999999
        assert [e.error for e in rider.errors()] == ["cursor_ahead"]


def test_client_publish_helpers_and_errors(stack: Stack) -> None:
    with connect_client(stack.port, "shop-ph") as shop:
        base = _count(stack.db)
        _wait_stored(stack.db, base + _open_order(shop, "ph-1", "cust-ph", "rider-ph"))
    with FishimClient("127.0.0.1", stack.port, "rider-ph") as rider:
        ok = rider.publish_chat("ph-1", "5 minutes away", mentions=["cust-ph"])
        bad = rider.publish_status("ph-1", "delivered")  # assigned -> delivered is not a legal transition
        error = next(rider.errors(timeout=10.0))
        assert (error.id, error.error) == (bad, "illegal_transition")
        with Store(stack.db, readonly=True) as store:
            stored = store.get_event(ok)
            assert stored is not None and stored.sender == "rider-ph" and stored.topic == T.chat("ph-1", "rider-ph")
            assert store.get_event(bad) is None

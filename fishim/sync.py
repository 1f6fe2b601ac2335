"""Replay after signal loss: answer ``{prefix}/sync/{user}/{client_id}/request`` with pages of events.

The bridge hands every sync request to :meth:`SyncServer.handle` on a worker thread *after* the batch
holding it has committed, so the replay includes everything the broker received before the request,
and publishes the returned ``(topic, payload)`` pairs at QoS 1. Protocol, cursor and collapse rules:
``docs/sync.md``.

Why the code looks the way it does:

- One read transaction per request: the event scan and the store-wide ``max(seq)`` come from the same
  snapshot, so ``next_since = max(seq)`` on the done page can never skip an event committed in
  between. With a single writer (the bridge) ``seq`` is committed in order, so no lower ``seq`` can
  appear later.
- Stored payloads are the JSON text as received (validated by the bridge), so pages are spliced from
  that text with byte formatting instead of ``json.loads``/``json.dumps`` per event: the replay loop
  costs a few microseconds per event.
- A served request records its device (``devices`` table): ``since`` is the cursor up to which the
  device's app has taken everything, so the owner sees each phone's progress (``fishim devices``)
  and ``fishim replay --client-id`` starts where that phone stands. The record goes through
  ``on_device`` when given (a process with a single writer passes its own), else through a small
  writable connection of this server's.
- Membership is decided at sync time from the ``orders`` projection (the *current* rider), so a rider
  reassigned mid-order stops getting that order and the new one gets it, full history with ``since 0``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from fishim.config import Config
from fishim.messages import (
    ErrorCode,
    ErrorMessage,
    Rejected,
    SyncRequest,
    parse_json,
    peek_identity,
    schema_error,
)
from fishim.store import DeviceRow, Store, now_ms
from fishim.topics import Channel, TopicRef, Topics, order_of_tracking_user

__all__ = ["COLLAPSIBLE", "SyncServer"]

log = logging.getLogger("fishim.sync")

COLLAPSIBLE = ("location",)
"""Channels a replay may shorten to the latest event per order; every other channel is complete."""

_ALL_ORDERS_ROLES = frozenset({"owner", "staff", "service"})
_EVENT_COLUMNS = "seq, order_seq, order_id, channel, topic, payload"
# Below this many seqs between the cursor and the store's end a primary-key range scan beats looking
# the user's orders up in the order index (which reads each order's whole history, then sorts).
_RANGE_SCAN_SPAN = 20_000
# Bytes of a page besides its events: {"events":[],"next_since":<20 digits>,"done":false,
# "page":<digits>,"more":true,"collapsed":["location"]} plus the request id, counted separately.
_PAGE_OVERHEAD = 128

Row = tuple[int, int, str, str, str, str | bytes]
RejectHook = Callable[[TopicRef, bytes, Rejected], None]
DeviceHook = Callable[[DeviceRow], None]


class SyncServer:
    """Builds sync replies from the store; thread-safe (one read-only connection per thread).

    Args:
        store_path: the SQLite file the bridge writes.
        config: ``prefix``, ``limits.sync_page_events``, ``limits.sync_page_bytes``, ``limits.max_payload``.
        max_events: at most this many events per request, so one ``since: 0`` from a staff account on
            a large store cannot hold gigabytes in memory; a reply cut there has ``"more": true`` on its
            done page and the client asks again from ``next_since``.
        on_reject: called with every refused request (the bridge records a dead letter there).
        on_device: called with each served request's device (``syncs`` is 1, the upsert adds it up);
            None: this server writes it to the store itself.
    """

    def __init__(self, store_path: Path, config: Config, *, max_events: int = 50_000,
                 on_reject: RejectHook | None = None, on_device: DeviceHook | None = None) -> None:
        self.store_path = Path(store_path)
        self.config = config
        self.topics = Topics(config.prefix)
        self.max_events = max_events
        self.on_reject = on_reject
        self.on_device = on_device or self._record_device
        self._local = threading.local()
        self._stores: list[Store] = []
        self._lock = threading.Lock()
        self._topic_json: dict[str, bytes] = {}

    # -- public ----------------------------------------------------------------------------------

    def handle(self, ref: TopicRef, payload: bytes) -> list[tuple[str, bytes]]:
        """Answer one sync request: the event pages for ``ref``'s client, or one error message.

        Returns ``(topic, JSON payload)`` pairs to publish at QoS 1, in order: pages on
        ``{prefix}/sync/{user}/{client_id}/events`` (the last has ``done: true``), or a single
        :class:`~fishim.messages.ErrorMessage` on ``{prefix}/errors/{user}`` if the request is refused.
        """
        started = time.perf_counter()
        try:
            request = self._parse(ref, payload)
            pages, count, served = self._replay(ref, request)
        except Rejected as rejected:
            return self._refuse(ref, payload, rejected)
        self._seen(ref, request.since, served)
        log.info("sync user=%s client=%s since=%d events=%d pages=%d ms=%.1f", ref.user, ref.client_id,
                 request.since, count, len(pages), (time.perf_counter() - started) * 1000)
        events_topic = self.topics.sync_events(ref.user or "", ref.client_id or "")
        return [(events_topic, page) for page in pages]

    def close(self) -> None:
        """Close every per-thread connection (call once the bridge's workers have stopped)."""
        with self._lock:
            stores, self._stores = self._stores, []
        for store in stores:
            store.close()

    # -- request ---------------------------------------------------------------------------------

    def _parse(self, ref: TopicRef, payload: bytes) -> SyncRequest:
        if ref.channel is not Channel.SYNC_REQUEST or not ref.user or not ref.client_id:
            raise Rejected(ErrorCode.UNKNOWN_TOPIC, "sync requests go to {prefix}/sync/{user}/{client_id}/request")
        data = parse_json(payload, self.config.limits.max_payload)
        try:
            request = SyncRequest.model_validate(data)
        except ValidationError as exc:
            raise schema_error(exc) from None
        if request.sender is not None and request.sender != ref.user:
            raise Rejected(ErrorCode.SENDER_MISMATCH,
                           f"body sender {request.sender!r} does not match the sync topic's user {ref.user!r}")
        return request

    def _refuse(self, ref: TopicRef, payload: bytes, rejected: Rejected) -> list[tuple[str, bytes]]:
        request_id = peek_identity(payload)[0]  # so an error can name the request it refuses
        log.warning("sync refused user=%s client=%s error=%s detail=%s", ref.user, ref.client_id,
                    rejected.code.value, rejected.detail)
        if self.on_reject is not None:
            try:
                self.on_reject(ref, payload, rejected)
            except Exception:
                log.exception("sync on_reject hook failed")
        if not ref.user:
            return []
        request_topic = self.topics.sync_request(ref.user, ref.client_id or "-")
        error = ErrorMessage(topic=request_topic, id=request_id, error=rejected.code, detail=rejected.detail,
                             ts=now_ms())
        return [(self.topics.errors(ref.user), error.model_dump_json(exclude_none=True).encode())]

    # -- replay ----------------------------------------------------------------------------------

    def _replay(self, ref: TopicRef, request: SyncRequest) -> tuple[list[bytes], int, int]:
        """Scan one snapshot and page it; returns (pages, events replayed, the done page's next_since)."""
        collapse = request.collapse
        conn = self._store().conn
        conn.execute("BEGIN")
        try:
            end = int(conn.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()[0])
            if request.since > end:
                raise Rejected(ErrorCode.CURSOR_AHEAD,
                               f"cursor {request.since} is ahead of this store (was it reset?): sync from 0")
            orders = self._readable_orders(conn, ref.user or "", request.orders)
            rows = self._scan(conn, request.since, end, orders)
        finally:
            conn.execute("COMMIT")
        more = len(rows) > self.max_events
        if more:
            rows = rows[: self.max_events]
            end = rows[-1][0]
        collapsed: list[str] = []
        if collapse:
            kept = _collapse_locations(rows)
            if len(kept) != len(rows):
                collapsed = list(COLLAPSIBLE)
            rows = kept
        pages = self._pages(rows, request.since, end, request.id, collapsed, more)
        return pages, len(rows), end

    def _readable_orders(self, conn: sqlite3.Connection, user: str,
                         narrowed: Sequence[str] | None) -> list[str] | None:
        """Orders ``user`` may read right now (None: all), intersected with the request's ``orders``."""
        row = conn.execute("SELECT role FROM users WHERE name=?", (user,)).fetchone()
        role = row[0] if row else None
        if role in _ALL_ORDERS_ROLES:
            allowed: set[str] | None = None
        elif role == "rider":
            allowed = _column_orders(conn, "rider", user)
        elif role == "customer":
            allowed = _column_orders(conn, "customer", user)
        elif role is None and (tracked := order_of_tracking_user(user)) is not None:
            allowed = {tracked}  # a tracking link's t-{order} (fishim.http.tokens): that order alone
        elif role is None:  # anonymous loopback mode: membership comes from `assigned` / `placed`
            allowed = _column_orders(conn, "rider", user) | _column_orders(conn, "customer", user)
        else:  # scanners (and any role fishim does not know) read no order
            allowed = set()
        if narrowed is None:
            return None if allowed is None else sorted(allowed)
        return sorted(set(narrowed) if allowed is None else allowed.intersection(narrowed))

    def _scan(self, conn: sqlite3.Connection, since: int, end: int, orders: list[str] | None) -> list[Row]:
        limit = self.max_events + 1
        if orders is None:
            sql = f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? AND seq <= ? ORDER BY seq LIMIT ?"
            return conn.execute(sql, (since, end, limit)).fetchall()
        if not orders:
            return []
        # "+order_id" keeps SQLite off the order index so it walks the seq range instead.
        column = "+order_id" if end - since <= _RANGE_SCAN_SPAN else "order_id"
        sql = (f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > ? AND seq <= ?"
               f" AND {column} IN (SELECT value FROM json_each(?)) ORDER BY seq LIMIT ?")
        return conn.execute(sql, (since, end, json.dumps(orders), limit)).fetchall()

    def _pages(self, rows: list[Row], since: int, end: int, request_id: str | None, collapsed: list[str],
               more: bool) -> list[bytes]:
        """Splice stored JSON into pages bounded by ``sync_page_events`` and ``sync_page_bytes``.

        An intermediate page's ``next_since`` is its last event's seq, so a client cut off mid-replay
        resumes exactly there; the done page's is the end of the scanned snapshot. A single event
        larger than the byte budget still goes out, alone on its page (the replay must progress).
        """
        limits = self.config.limits
        rid = b"" if request_id is None else b',"request_id":' + json.dumps(request_id).encode()
        budget = limits.sync_page_bytes - _PAGE_OVERHEAD - len(rid)
        max_events = limits.sync_page_events
        topic_json = self._topic_json
        pages: list[bytes] = []
        page: list[bytes] = []
        size = 0
        last = since
        for seq, order_seq, _order, _channel, topic, payload in rows:
            encoded = topic_json.get(topic)
            if encoded is None:
                encoded = topic_json[topic] = json.dumps(topic).encode()
            item = b'{"seq":%d,"order_seq":%d,"topic":%b,"payload":%b}' % (
                seq, order_seq, encoded, _payload_bytes(payload))
            if page and (len(page) >= max_events or size + len(item) + 1 > budget):
                pages.append(_page(page, last, len(pages), False, rid))
                page, size = [], 0
            page.append(item)
            size += len(item) + 1
            last = seq
        extra = b""
        if collapsed:
            extra += b',"collapsed":' + json.dumps(collapsed).encode()
        if more:
            extra += b',"more":true'
        pages.append(_page(page, end, len(pages), True, rid + extra))
        return pages

    # -- devices ---------------------------------------------------------------------------------

    def _seen(self, ref: TopicRef, cursor: int, served: int) -> None:
        now = now_ms()
        device = DeviceRow(user=ref.user or "", client_id=ref.client_id or "", cursor=cursor, served=served,
                           first_seen=now, last_seen=now)
        try:
            self.on_device(device)
        except Exception:  # the replay matters more than the bookkeeping: answer anyway
            log.exception("recording device user=%s client=%s failed", ref.user, ref.client_id)

    def _record_device(self, device: DeviceRow) -> None:
        writer: Store | None = getattr(self._local, "writer", None)
        if writer is None:
            writer = self._local.writer = Store(self.store_path)
            with self._lock:
                self._stores.append(writer)
        writer.record_device(device.user, device.client_id, device.cursor, device.served, device.last_seen)

    def _store(self) -> Store:
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            store = Store(self.store_path, readonly=True)
            self._local.store = store
            with self._lock:
                self._stores.append(store)
        return store


def _page(items: list[bytes], next_since: int, index: int, done: bool, extra: bytes) -> bytes:
    """``page`` numbers the reply's messages from 0, so a client notices one lost in transit."""
    return b'{"events":[%b],"next_since":%d,"done":%b,"page":%d%b}' % (
        b",".join(items), next_since, b"true" if done else b"false", index, extra)


def _payload_bytes(payload: str | bytes) -> bytes:
    """The stored JSON text, spliced as is when it is plainly one object (it always is: the bridge
    stored it after ``json.loads`` accepted it); anything else is re-encoded rather than trusted."""
    data = payload.encode() if isinstance(payload, str) else bytes(payload)
    if data[:1] == b"{" and data[-1:] == b"}":
        return data
    return json.dumps(json.loads(data), separators=(",", ":")).encode()


def _collapse_locations(rows: list[Row]) -> list[Row]:
    """Drop every location fix but the latest per order in ``rows`` (keeping seq order)."""
    latest: dict[str, int] = {}
    for seq, _oseq, order, channel, _topic, _payload in rows:
        if channel == "location":
            latest[order] = seq
    if not latest:
        return rows
    keep = set(latest.values())
    return [row for row in rows if row[3] != "location" or row[0] in keep]


def _column_orders(conn: sqlite3.Connection, column: str, user: str) -> set[str]:
    return {r[0] for r in conn.execute(f"SELECT id FROM orders WHERE {column}=?", (user,))}

"""fishim's client library for rider, scanner and customer apps (and tests): paho-mqtt underneath.

A phone loses signal in lifts and basements; the broker's offline queue may or may not have kept
what it missed (an app killed by the OS starts a new session). So this client never relies on it:
on *every* (re)connect, paho's automatic reconnects included, it asks fishim to replay everything
after its saved cursor (docs/protocol.md, Sync), holds live messages back until the replay is done,
and drops anything it has already delivered (by envelope ``id``). The app sees each event once, and
each order's events in ``order_seq`` order::

    with FishimClient("127.0.0.1", 1883, "rider7", "s3cret", cursor_path=Path("rider7.cursor"),
                      on_order_changed=show) as c:   # show(view: OrderView) on every change
        c.subscribe_orders()                     # subscribe, then sync from the saved cursor
        c.publish_location("o-17", 30.27, 120.15)
        for event in c.events(timeout=5):       # ClientEvent(topic, payload, seq, order_seq, ...)
            print(event.order, event.channel, event.payload)
            c.mark_read(event)                  # the read receipt: the shop sees the unread count drop
        print(c.orders())                       # {order: OrderView(state, rider, items, unread, ...)}

Delivery rules (docs/sync.md has the whole story):

- An event counts as delivered when :meth:`FishimClient.events` yields it or ``on_event`` returns.
  The cursor and the delivered ids are persisted (SQLite at ``cursor_path``) only for delivered
  events, so a killed app resumes where its *user* stopped, not where the network stopped.
- Every event carries ``seq`` and ``order_seq``: replayed ones from the sync page, live ones from the
  server stamps fishim's own broker puts in every payload it routes. A live event whose ``order_seq``
  jumps (something was lost on the way) is held back and a sync runs at once; so is one that arrives
  during a sync. Behind a broker that does not stamp (Mosquitto, EMQX) live events have no numbers.
- A status change counts only once fishim has stored it: stamped, or from a sync. An unstamped live
  status (a broker that routes before fishim validates) is not shown; it triggers a sync, which
  brings it if it was stored. Your own status publishes show as ``OrderView.pending_state`` until
  confirmed, and are rolled back when fishim refuses them.
- The first time an order shows up past its first event (you were assigned to it later), its earlier
  history is fetched (``since 0`` narrowed to that order) and its events wait for it, so the order's
  events still come in ``order_seq`` order. Your own publishes come back once as live events (MQTT
  3.1.1 has no "no local").
- :meth:`FishimClient.orders` is the projection of what was delivered: state, rider, items, unread
  (status and chat from others after your read receipt, as the shop's ``orders list`` counts them).

Threads: paho's network thread receives; ``on_event`` and ``on_order_changed`` run on a dispatcher
thread of its own, so a slow callback never stalls keepalive; ``on_error`` runs on the network thread
and must be quick. Use either the callbacks or :meth:`~FishimClient.events`, from one thread.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, Field

from fishim.messages import ErrorCode, ErrorMessage
from fishim.topics import Channel, TopicError, Topics
from fishim.topics import parse as parse_topic

__all__ = ["ClientEvent", "FishimClient", "FishimClientError", "OrderView"]

log = logging.getLogger("fishim.client")

Source = Literal["live", "replay"]


class FishimClientError(RuntimeError):
    """The broker refused us, a publish was not acknowledged, or a sync was refused."""


@dataclass(frozen=True, slots=True)
class ClientEvent:
    """One order event as the app sees it.

    ``seq`` (store-wide) and ``order_seq`` (within the order, what read receipts count): from the sync
    page for replayed events, from the server stamps in the payload for live ones (None behind a
    broker that does not stamp). ``retained`` marks a live message the broker replayed from its
    retained store on subscribe.
    """

    topic: str
    payload: dict[str, Any]
    seq: int | None
    source: Source
    order_seq: int | None = None
    retained: bool = False
    order: str = ""
    channel: str = ""

    @property
    def id(self) -> str:
        return str(self.payload.get("id", ""))


class OrderView(BaseModel):
    """One order as this client has seen it (:meth:`FishimClient.orders`).

    ``state`` only ever holds a status fishim stored; ``pending_state`` is our own status publish
    waiting for that (cleared when it is confirmed, or refused: the rollback).
    """

    order: str
    state: str | None = None
    rider: str | None = None
    customer: str | None = None
    items: list[dict[str, Any]] = Field(default_factory=list)
    eta: str | int | None = None
    order_seq: int = 0  # the last event of the order delivered
    seq: int = 0
    read_up_to: int = 0  # our read receipt
    unread_at: list[int] = Field(default_factory=list)  # order_seq of unread status/chat from others
    pending_state: str | None = None
    pending_id: str | None = None

    @property
    def unread(self) -> int:
        return len(self.unread_at)


@dataclass(frozen=True, slots=True)
class _Optimistic:
    """Queued by :meth:`FishimClient.publish_status`: our own status, shown pending until stored."""

    order: str
    id: str
    state: str


@dataclass(frozen=True, slots=True)
class _Rollback:
    """Queued when fishim refused a message of ours: a pending status with that id is withdrawn."""

    id: str


def _stamps(payload: dict[str, Any]) -> tuple[int | None, int | None]:
    """The server stamps fishim's broker adds to what it routes; (None, None) when absent."""
    seq, order_seq = payload.get("seq"), payload.get("order_seq")
    if type(seq) is int and type(order_seq) is int:
        return seq, order_seq
    return None, None


@dataclass(frozen=True, slots=True)
class _Checkpoint:
    """Queued after a replay page: once the app has taken everything before it, ``cursor`` is safe."""

    cursor: int


_CLOSED = object()
_SUBSCRIBING = -1  # _orders_mid between CONNACK and our SUBSCRIBE going out


@dataclass
class _Sync:
    """One outstanding sync request: the main one (moves the cursor) or an order backfill."""

    rid: str
    since: int
    orders: list[str] | None = None
    sent_at: float = field(default_factory=time.monotonic)  # moved on by every page (watchdog)
    started: float = field(default_factory=time.monotonic)
    pages: int = 0  # pages received so far; a gap means one was lost

    @property
    def main(self) -> bool:
        return self.orders is None


class _CursorFile:
    """Cursor, client id and delivered ids in a small SQLite file; in memory when ``path`` is None.

    Delivered ids are bounded (oldest dropped first): only events after the cursor can be replayed
    again, and those are recent, so a few thousand ids cover every overlap of live and replay.
    """

    def __init__(self, path: Path | None, keep: int) -> None:
        self.keep = keep
        self.path = path
        self._lock = threading.Lock()
        target = ":memory:" if path is None else str(path)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(target, check_same_thread=False, isolation_level=None)
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.execute("CREATE TABLE IF NOT EXISTS seen (n INTEGER PRIMARY KEY AUTOINCREMENT,"
                         " id TEXT NOT NULL UNIQUE)")
        self._db.execute("CREATE TABLE IF NOT EXISTS views (order_id TEXT PRIMARY KEY, view TEXT NOT NULL)")

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def set(self, **values: str) -> None:
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO meta (key, value) VALUES (?,?)", values.items())

    def seen_ids(self) -> list[str]:
        rows = self._db.execute("SELECT id FROM seen ORDER BY n DESC LIMIT ?", (self.keep,)).fetchall()
        return [r[0] for r in reversed(rows)]

    def views(self) -> dict[str, OrderView]:
        rows = self._db.execute("SELECT order_id, view FROM views").fetchall()
        return {order: OrderView.model_validate_json(view) for order, view in rows}

    def reset(self) -> None:
        with self._lock:
            self._db.execute("DELETE FROM seen")
            self._db.execute("DELETE FROM views")
            self._db.execute("DELETE FROM meta WHERE key='cursor'")

    def save(self, ids: list[str], cursor: int | None, views: list[OrderView] | None = None) -> None:
        """One transaction: newly delivered ids, changed order views and (if given) the new cursor."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT OR IGNORE INTO seen (id) VALUES (?)", ((i,) for i in ids))
                self._db.executemany("INSERT OR REPLACE INTO views (order_id, view) VALUES (?,?)",
                                     ((v.order, v.model_dump_json()) for v in views or ()))
                if cursor is not None:
                    self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('cursor', ?)",
                                     (str(cursor),))
                self._db.execute("DELETE FROM seen WHERE n <= (SELECT max(n) FROM seen) - ?", (self.keep,))
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class FishimClient:
    """A fishim MQTT client with replay-on-reconnect, dedup and a persisted cursor.

    Args:
        host, port: the broker (``fishim up`` listens on 127.0.0.1:1883 by default).
        username, password: the fishim account; in anonymous loopback mode (no accounts) the
            username alone names you (it is the ``sender`` of what you publish).
        client_id: MQTT client id. Default: one made once and kept in ``cursor_path`` (stable across
            restarts), or a fresh one when there is no ``cursor_path``.
        cursor_path: SQLite file for the cursor and delivered ids; None keeps them in memory, so a
            new process starts from ``since 0`` (full history of your orders).
        prefix: topic prefix (``broker.yaml`` ``prefix``).
        tls: an ``ssl.SSLContext`` for a TLS listener.
        clean_session: default False when the client id is stable (the broker may queue for us; a
            bonus, never relied on), True otherwise (a random id's session would only leak).
        on_event: called with each :class:`ClientEvent`, on the client's dispatcher thread.
        on_error: called with each :class:`~fishim.messages.ErrorMessage` addressed to us.
        on_order_changed: called with an :class:`OrderView` copy whenever an order's view changed (an
            event delivered, our pending status confirmed or rolled back), on the dispatcher thread.
        keepalive, reconnect_delay: MQTT keepalive seconds; paho's (min, max) reconnect backoff.
        publish_timeout: how long the ``publish_*`` helpers wait for the PUBACK.
        sync_timeout: a sync with no answer for this long is asked again (the bridge may be down).
        sync_interval: while connected, sync again after this many seconds without one (None: only
            on connect and :meth:`~FishimClient.sync`). It catches what live delivery can lose with
            the connection up: a QoS 1 message a broker dropped in flight, or an order's first events
            routed before the broker's ACL learned we were assigned to it.
        dedup_size: how many delivered ids are remembered.
        live_buffer: live messages held back during a sync; past this, newer ones are dropped and a
            follow-up sync fetches them (they are in the store), so nothing is lost.
        backfill_on_assign: fetch an order's earlier history when it first shows up past its first
            event (we were assigned to it later); its events wait for that history.
        server_stamps: trust the ``seq``/``order_seq`` in live payloads (fishim's own broker sets them
            and replaces any a client wrote). Set False behind Mosquitto/EMQX, where a publisher's own
            values would pass through: then only sync numbers events and confirms statuses.
        collapse_locations: let the bridge shorten replayed ``location`` fixes to the latest per order
            (a rider's phone needs where the parcel is, not the route); False replays every fix.
    """

    def __init__(
        self,
        host: str,
        port: int = 1883,
        username: str = "",
        password: str | None = None,
        *,
        client_id: str | None = None,
        cursor_path: Path | None = None,
        prefix: str = "fishim",
        tls: ssl.SSLContext | None = None,
        clean_session: bool | None = None,
        on_event: Callable[[ClientEvent], None] | None = None,
        on_error: Callable[[ErrorMessage], None] | None = None,
        on_order_changed: Callable[[OrderView], None] | None = None,
        keepalive: int = 30,
        publish_timeout: float = 10.0,
        reconnect_delay: tuple[int, int] = (1, 30),
        sync_timeout: float = 10.0,
        sync_interval: float | None = 60.0,
        dedup_size: int = 20_000,
        live_buffer: int = 10_000,
        backfill_on_assign: bool = True,
        collapse_locations: bool = True,
        server_stamps: bool = True,
    ) -> None:
        if not username:
            raise ValueError("username is required: it is the sender of what you publish and names your sync")
        self.host, self.port = host, port
        self.username = username
        self.topics = Topics(prefix)
        self.on_event = on_event
        self.on_error = on_error
        self.on_order_changed = on_order_changed
        self.keepalive = keepalive
        self.publish_timeout = publish_timeout
        self.sync_timeout = sync_timeout
        self.sync_interval = sync_interval
        self.live_buffer = live_buffer
        self.backfill_on_assign = backfill_on_assign
        self.collapse_locations = collapse_locations
        self.server_stamps = server_stamps
        self._cursors = _CursorFile(Path(cursor_path) if cursor_path is not None else None, dedup_size)
        self._check_owner(prefix)
        self.client_id = client_id or self._stable_client_id(cursor_path is not None)
        stable = client_id is not None or cursor_path is not None
        self.clean_session = (not stable) if clean_session is None else clean_session

        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._queue: queue.Queue[Any] = queue.Queue()
        self._errors: queue.Queue[ErrorMessage] = queue.Queue()
        self._seen: OrderedDict[str, None] = OrderedDict((i, None) for i in self._cursors.seen_ids())
        self._dedup_size = dedup_size
        self._cursor = int(self._cursors.get("cursor") or 0)  # what the next main sync asks from
        self._views = self._cursors.views()  # the projection of delivered events (consumer side)
        self._dirty: set[str] = set()  # views changed since the last save
        # order -> last order_seq queued (network side): live events must continue it, or wait
        self._positions = {order: view.order_seq for order, view in self._views.items() if view.order_seq}
        self._parked: dict[str, list[ClientEvent]] = {}  # events of orders whose history is on its way
        self._want_orders = False
        self._orders_mid: int | None = None
        self._main: _Sync | None = None
        self._syncing = False
        self._backfills: dict[str, _Sync] = {}  # in flight, by request id
        self._backfill_todo: set[str] = set()  # orders whose backfill has not completed yet
        self._backfilled: set[str] = set()  # orders whose backfill completed (once per process)
        self._held: list[ClientEvent] = []
        self._again = False  # sync once more after the current one (overflow, sync() during a sync)
        self._unanswered = 0  # consecutive main syncs that timed out
        self._last_synced = time.monotonic()
        self._sync_error: ErrorMessage | None = None
        self._connack: ReasonCode | None = None
        self._closed = False
        self._pending_ids: list[str] = []
        self._acks: dict[int, threading.Event] = {}
        self._early_acks: dict[int, float] = {}  # PUBACKs that beat _wait_ack to the table: mid -> when
        self._ack_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.stats: dict[str, int] = {"syncs": 0, "pages": 0, "queued_replay": 0, "queued_live": 0,
                                      "duplicates": 0, "held_overflow": 0, "last_sync_ms": 0, "gaps": 0,
                                      "covered": 0, "unconfirmed": 0, "late": 0}

        self._mqtt = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                 clean_session=self.clean_session, protocol=mqtt.MQTTv311)
        self._mqtt.reconnect_delay_set(*reconnect_delay)
        self._mqtt.username_pw_set(username, password)
        if tls is not None:
            self._mqtt.tls_set_context(tls)
        self._mqtt.on_connect = self._on_connect
        self._mqtt.on_disconnect = self._on_disconnect
        self._mqtt.on_subscribe = self._on_subscribe
        self._mqtt.on_message = self._on_message
        self._mqtt.on_publish = self._on_publish

    def __repr__(self) -> str:
        return f"<FishimClient {self.username}/{self.client_id} cursor={self._cursor}>"

    # -- lifecycle -------------------------------------------------------------------------------

    def connect(self, timeout: float = 10.0, *, wait: bool = True) -> FishimClient:
        """Connect and start the network thread; paho reconnects on its own from then on.

        With ``wait=False`` this returns at once and keeps trying in the background (an app started
        without signal). Raises :class:`FishimClientError` if the broker refuses the credentials,
        ``TimeoutError`` if no CONNACK came within ``timeout`` (unreachable broker); either way the
        client is closed.
        """
        if self._threads:
            raise FishimClientError(f"{self!r}: connect() called twice")
        self._mqtt.connect_async(self.host, self.port, self.keepalive)
        self._mqtt.loop_start()
        self._start_thread("watchdog", self._watchdog)
        if self.on_event is not None or self.on_order_changed is not None:
            self._start_thread("dispatch", self._dispatch)
        if wait:
            with self._lock:
                ok = self._changed.wait_for(lambda: self._connack is not None, timeout)
                rc = self._connack
            if not ok:
                self.close()
                raise TimeoutError(f"{self!r}: no CONNACK from {self.host}:{self.port} within {timeout}s")
            if rc is not None and rc.is_failure:
                self.close()
                raise FishimClientError(f"{self!r}: connection refused: {rc}")
        return self

    def close(self) -> None:
        """Disconnect, stop the threads, persist what was delivered. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._changed.notify_all()
        self._mqtt.disconnect()
        self._mqtt.loop_stop()
        self._queue.put(_CLOSED)
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(5.0)
        self._flush(None)
        self._cursors.close()

    def __enter__(self) -> FishimClient:
        if self._mqtt.is_connected() or self._threads:
            return self
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        return self._mqtt.is_connected()

    @property
    def cursor(self) -> int:
        """The seq up to which everything of our orders has been received (next sync's ``since``)."""
        with self._lock:
            return self._cursor

    # -- reading ---------------------------------------------------------------------------------

    def subscribe_orders(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Receive our orders' events: subscribe ``{prefix}/orders/#`` (the broker's ACL filters it
        per user) and sync from the cursor, now and after every reconnect.

        With ``wait`` (and a connection) it returns once the first replay is queued.
        """
        with self._lock:
            if self._want_orders:
                return
            self._want_orders = True
            self._syncing = True
            connected = self._mqtt.is_connected()
            if connected:
                self._orders_mid = _SUBSCRIBING
                self._subscribe(orders=True)
        if connected and wait:
            self.wait_synced(timeout)

    def sync(self, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Replay from the cursor now (an app coming to the foreground, a test about to check).

        Everything stored before this call is delivered once it returns (with ``wait``). Offline,
        the sync happens on reconnect, as always.
        """
        with self._lock:
            if not self._want_orders:
                raise FishimClientError("sync() needs subscribe_orders() first")
            if self._main is not None or self._orders_mid is not None:
                self._again = True  # the running one may predate this call: one more after it
            elif self._mqtt.is_connected():
                self._start_sync()
        if wait:
            self.wait_synced(timeout)

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Block until connected and the current sync is done (its replay queued for delivery).

        Raises :class:`FishimClientError` if the bridge refused the sync, ``TimeoutError`` otherwise.
        """
        with self._lock:
            done = self._changed.wait_for(
                lambda: self._closed or (self._mqtt.is_connected() and not self._syncing), timeout)
            if self._sync_error is not None:
                raise FishimClientError(f"sync refused: {self._sync_error.error}: {self._sync_error.detail}")
        if not done:
            raise TimeoutError(f"{self!r}: not synced within {timeout}s")

    def events(self, timeout: float | None = None) -> Iterator[ClientEvent]:
        """Yield events as they are delivered, each at most once.

        Ends after ``timeout`` seconds without an event (None: only when the client is closed).
        """
        yield from self._consume(timeout)

    def orders(self) -> dict[str, OrderView]:
        """Every order seen so far, as delivered to the app (copies: change them freely)."""
        with self._lock:
            return {order: view.model_copy(deep=True) for order, view in self._views.items()}

    def mark_read(self, event: ClientEvent | str, *, wait: bool = True) -> str | None:
        """Tell the order's members we have read it up to ``event`` (an order id: up to its last event).

        Publishes the read receipt (``read_up_to`` = the event's ``order_seq``) and clears our unread
        count up to there; returns the receipt's ``id``, or None when there was nothing new to mark
        (receipts never go backwards). An unnumbered event (a broker without server stamps) marks the
        order's last numbered event.
        """
        order = event if isinstance(event, str) else event.order
        with self._lock:
            view = self._views.get(order)
            if view is None:
                raise FishimClientError(f"mark_read: order {order!r} has not been delivered to this client")
            upto = view.order_seq if isinstance(event, str) or event.order_seq is None else event.order_seq
            if upto <= view.read_up_to:
                return None
            self._read(view, upto)
            self._dirty.add(order)
            changed = view.model_copy(deep=True)
        self._changed_view(changed)
        return self.publish_receipt(order, upto, wait=wait)

    def errors(self, timeout: float | None = 0.0) -> Iterator[ErrorMessage]:
        """Yield errors addressed to us (``{prefix}/errors/{username}``): refusals of what we
        published, matched by ``id``. Ends after ``timeout`` seconds without one (0: what is queued)."""
        while True:
            try:
                yield self._errors.get(timeout=timeout) if timeout != 0 else self._errors.get_nowait()
            except queue.Empty:
                return

    # -- publishing ------------------------------------------------------------------------------

    def publish(self, topic: str, fields: Mapping[str, Any], *, retain: bool = False, qos: int = 1,
                wait: bool = True, timeout: float | None = None) -> str:
        """Publish ``fields`` wrapped in an envelope (``id``, ``ts``, ``sender``); return the ``id``.

        With ``wait`` (QoS 1) it blocks until the broker's PUBACK (``timeout``, default
        ``publish_timeout``; TimeoutError after it). Offline, paho keeps the message and sends it on
        reconnect, so ``wait=False`` is how an app without signal queues. A refusal by the bridge
        arrives later on :meth:`errors` under the same ``id``.
        """
        body = {"id": uuid.uuid4().hex, "ts": int(time.time() * 1000), "sender": self.username, **fields}
        body.pop("seq", None), body.pop("order_seq", None)  # server stamps: fishim's to set
        started = time.monotonic()
        info = self._mqtt.publish(topic, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode(),
                                  qos, retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise FishimClientError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if wait and qos > 0:
            self._wait_ack(info.mid, started, topic, self.publish_timeout if timeout is None else timeout)
        return str(body["id"])

    def publish_status(self, order: str, state: str, *, wait: bool = True, **fields: Any) -> str:
        """Order state change (``rider`` with ``assigned``, ``customer``/``items`` with ``placed``).

        Until fishim has stored it the order shows it as ``pending_state``; a refusal withdraws it.
        """
        ident = str(fields.pop("id", None) or uuid.uuid4().hex)
        self._queue.put(_Optimistic(order, ident, state))
        try:
            return self.publish(self.topics.status(order), {"id": ident, "state": state, **fields}, retain=True,
                                wait=wait)
        except FishimClientError:
            self._queue.put(_Rollback(ident))
            raise

    def publish_chat(self, order: str, text: str, **fields: Any) -> str:
        """Chat line on our own ``chat/{username}`` leaf (``mentions``, ``media``, ``reply_to`` optional)."""
        return self.publish(self.topics.chat(order, self.username), {"text": text, **fields})

    def publish_location(self, order: str, lat: float, lon: float, **fields: Any) -> str:
        """The rider's position (retained: a customer opening the app sees the last fix at once)."""
        return self.publish(self.topics.location(order), {"lat": lat, "lon": lon, **fields}, retain=True)

    def publish_pick(self, order: str, sku: str, qty: int = 1, **fields: Any) -> str:
        """A scanned item; the bridge moves the order to ``packed`` once every item is picked."""
        return self.publish(self.topics.picks(order), {"sku": sku, "qty": qty, **fields})

    def publish_receipt(self, order: str, read_up_to: int, *, wait: bool = True, **fields: Any) -> str:
        """We have read the order up to ``read_up_to`` (an ``order_seq``, see :class:`ClientEvent`);
        :meth:`mark_read` is the easy way."""
        return self.publish(self.topics.receipts(order, self.username), {"read_up_to": read_up_to, **fields},
                            retain=True, wait=wait)

    # -- paho callbacks (network thread) ---------------------------------------------------------

    def _on_connect(self, _c: Any, _u: Any, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: Any) -> None:
        with self._lock:
            self._connack = rc
            if not rc.is_failure:
                # Hold live messages from now on (a persistent session may deliver queued ones before
                # our SUBACK) until the replay for this connection is done.
                self._syncing = self._want_orders
                self._orders_mid = _SUBSCRIBING if self._want_orders else None
                self._main = None
                self._backfills.clear()
            self._changed.notify_all()
        if rc.is_failure:
            log.warning("%r: connection refused: %s", self, rc)
            return
        log.info("%r: connected session_present=%s", self, flags.session_present)
        self._subscribe(orders=self._want_orders)

    def _on_disconnect(self, _c: Any, _u: Any, _f: mqtt.DisconnectFlags, rc: ReasonCode, _p: Any) -> None:
        log.info("%r: disconnected: %s", self, rc)
        with self._lock:
            self._changed.notify_all()

    def _subscribe(self, orders: bool) -> None:
        filters = [(self.topics.errors(self.username), 1),
                   (self.topics.sync_events(self.username, self.client_id), 1)]
        if orders:
            filters.append((self.topics.all_orders, 1))
        # Lock held across subscribe(): the SUBACK may be handled on the network thread before
        # subscribe() even returns, and must find _orders_mid already set (paho takes no lock here
        # that its network thread holds while calling us, so this cannot deadlock).
        with self._lock:
            result, mid = self._mqtt.subscribe(filters)
            if result != mqtt.MQTT_ERR_SUCCESS:
                log.warning("%r: subscribe failed: %s", self, mqtt.error_string(result))
                return
            if orders:
                self._orders_mid = mid

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        refused = [rc for rc in rcs if rc.is_failure]
        if refused:
            log.warning("%r: broker refused %d subscription(s)", self, len(refused))
        with self._lock:
            if mid != self._orders_mid:
                return
            self._orders_mid = None
            self._start_sync()
            for order in sorted(self._backfill_todo):  # cut off by the reconnect: ask again
                self._start_sync(orders=[order])

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        try:
            ref = parse_topic(topic, self.topics.prefix)
        except TopicError:
            log.debug("%r: message on unexpected topic %s", self, topic)
            return
        try:
            data = json.loads(msg.payload)
        except ValueError:
            log.warning("%r: non-JSON message on %s dropped", self, topic)
            return
        if not isinstance(data, dict):
            return
        if ref.channel is Channel.SYNC_EVENTS:
            self._on_page(data)
        elif ref.channel is Channel.ERRORS:
            self._on_error_message(data)
        elif ref.order is not None:
            seq, order_seq = _stamps(data) if self.server_stamps else (None, None)
            event = ClientEvent(topic, data, seq, "live", order_seq=order_seq, retained=bool(msg.retain),
                                order=ref.order, channel=ref.channel.value)
            with self._lock:
                if self._syncing:
                    self._hold(event)
                else:
                    self._accept_live(event)

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: ReasonCode, _p: Any) -> None:
        # Called with paho's outgoing-message lock held: touch nothing but the ack table here.
        with self._ack_lock:
            waiter = self._acks.get(mid)
            if waiter is not None:
                waiter.set()
                return
            now = time.monotonic()
            if len(self._early_acks) > 1000:  # acks nobody waits for (wait=False, sync requests)
                self._early_acks = {m: t for m, t in self._early_acks.items() if now - t < 60}
            self._early_acks[mid] = now

    # -- sync (network thread or watchdog, lock held) --------------------------------------------

    def _start_sync(self, orders: list[str] | None = None) -> None:
        """Ask for a replay: the main one from the cursor, or an order's whole history."""
        sync = _Sync(rid=uuid.uuid4().hex, since=self._cursor if orders is None else 0, orders=orders)
        body: dict[str, Any] = {"id": sync.rid, "since": sync.since, "sender": self.username}
        if not self.collapse_locations:
            body["collapse"] = False
        if orders is not None:
            body["orders"] = orders
            self._backfills[sync.rid] = sync
        else:
            self._main = sync
            self._syncing = True
            self._sync_error = None
            self.stats["syncs"] += 1
        self._mqtt.publish(self.topics.sync_request(self.username, self.client_id), json.dumps(body), 1)
        log.debug("%r: sync requested since=%d orders=%s", self, sync.since, orders)

    def _on_page(self, page: dict[str, Any]) -> None:
        with self._lock:
            rid = str(page.get("request_id"))
            main = self._main is not None and rid == self._main.rid
            if not main and rid not in self._backfills:
                return  # a reply to a request of an earlier connection
            sync = self._main if main else self._backfills[rid]
            assert sync is not None
            if page.get("page", sync.pages) != sync.pages:
                # QoS 1 to us can be dropped by a broker (amqtt does, on a timeout): never step over a
                # lost page; ask again from the last cursor we reached contiguously.
                log.warning("%r: sync page %s lost, asking again", self, sync.pages)
                if not main:
                    del self._backfills[rid]
                self._start_sync(sync.orders)
                return
            sync.pages += 1
            self.stats["pages"] += 1
            if main:
                self._unanswered = 0
            prefix_len = len(self.topics.prefix) + 1
            batch: list[Any] = []  # one queue item per page: Queue.put costs more than the rest
            for raw in page.get("events", []):
                topic = raw["topic"]
                levels = topic[prefix_len:].split("/", 3)
                self._accept(ClientEvent(topic, raw["payload"], raw["seq"], "replay",
                                         order_seq=raw.get("order_seq"), order=levels[1] if len(levels) > 2
                                         else "", channel=levels[2] if len(levels) > 2 else ""), batch,
                             backfill=not main)
            if main:
                assert self._main is not None
                self._main.sent_at = time.monotonic()  # progress: the watchdog waits again
                self._cursor = int(page["next_since"])
                batch.append(_Checkpoint(self._cursor))
            if batch:
                self._queue.put(batch)
            if not page.get("done"):
                return
            if not main:
                del self._backfills[rid]
                self._backfilled.update(sync.orders or ())
                self._backfill_done(sync.orders or [])
                return
            self.stats["last_sync_ms"] = round((time.monotonic() - sync.started) * 1000)
            self._main = None
            if page.get("more") or self._again:
                self._again = False
                self._start_sync()  # the rest, what did not fit the live buffer, or sync() asked
                return
            self._finish_sync()

    def _finish_sync(self) -> None:
        """Replay done: deliver the live messages held meanwhile (duplicates drop out), go live.

        Stamped ones go in ``seq`` order; one that still finds a gap starts the next sync and waits
        for it, with everything after it.
        """
        held, self._held = self._held, []
        self._syncing = False
        self._last_synced = time.monotonic()
        for event in sorted(held, key=lambda e: -1 if e.seq is None else e.seq):  # stable: unstamped keep order
            if self._syncing:
                self._held.append(event)
            else:
                self._accept_live(event)
        self._changed.notify_all()
        log.debug("%r: synced cursor=%d released=%d", self, self._cursor, len(held))

    def _on_error_message(self, data: dict[str, Any]) -> None:
        try:
            error = ErrorMessage.model_validate(data)
        except ValueError:
            log.warning("%r: unreadable error message dropped", self)
            return
        with self._lock:
            if self._main is not None and error.id == self._main.rid:
                self._main = None
                if error.error is ErrorCode.CURSOR_AHEAD:
                    log.warning("%r: cursor %d is ahead of the store (reset?): syncing from 0", self, self._cursor)
                    self._cursor = 0
                    self._queue.put(_Checkpoint(0))
                    self._start_sync()
                else:
                    log.error("%r: sync refused: %s %s", self, error.error, error.detail)
                    self._sync_error = error
                    self._finish_sync()
            elif error.id in self._backfills:
                self._backfill_done(self._backfills.pop(error.id).orders or [])
        if error.id is not None and error.error is not ErrorCode.UNKNOWN_FIELD:  # a warning: it was stored
            self._queue.put(_Rollback(error.id))  # a pending status of ours with this id is withdrawn
        self._errors.put(error)
        if self.on_error is not None:
            try:
                self.on_error(error)
            except Exception:
                log.exception("%r: on_error callback failed", self)

    def _hold(self, event: ClientEvent) -> None:
        """Keep a live event until the running sync is done."""
        if len(self._held) < self.live_buffer:
            self._held.append(event)
        else:
            self._again = True  # it is in the store: a follow-up sync fetches it
            self.stats["held_overflow"] += 1

    def _accept_live(self, event: ClientEvent) -> None:
        """A live event outside a sync: deliver it if it continues its order, else sync first."""
        if event.seq is None:
            if event.channel == "status":
                # Routed before fishim stored it (a broker without server stamps): it may yet be
                # refused. Only a sync's copy counts; ask for one now.
                self.stats["unconfirmed"] += 1
                self._want_sync()
                return
            self._accept(event)
            return
        if event.seq <= self._cursor:
            self.stats["covered"] += 1  # a sync already delivered everything up to the cursor
            return
        position = self._positions.get(event.order)
        jumped = position is not None and event.order_seq is not None and event.order_seq > position + 1
        if jumped and event.order not in self._parked:  # a parked order waits for its history anyway
            self.stats["gaps"] += 1
            log.info("%r: order %s jumped from #%s to #%s: syncing", self, event.order, position, event.order_seq)
            self._want_sync()
            self._hold(event)
            return
        self._accept(event)

    def _want_sync(self) -> None:
        """A main sync as soon as possible: now, or once the running one is done."""
        if not self._want_orders:
            return
        if self._main is not None or self._orders_mid is not None:
            self._again = True
        elif self._mqtt.is_connected():
            self._start_sync()

    def _accept(self, event: ClientEvent, batch: list[Any] | None = None, *, backfill: bool = False) -> None:
        """Queue ``event`` for the app (on ``batch``, queued later as one item, if given) unless its
        id was delivered or queued before; park it if its order's history is still to come."""
        ident = event.payload.get("id")
        if not isinstance(ident, str) or not ident:
            log.warning("%r: event without an id on %s dropped", self, event.topic)
            return
        if ident in self._seen:
            self.stats["duplicates"] += 1
            return
        order, order_seq = event.order, event.order_seq
        if not backfill and order in self._parked:
            self._parked[order].append(event)
            return
        position = self._positions.get(order)
        if (position is None and order_seq is not None and order_seq > 1 and self.backfill_on_assign
                and order not in self._backfilled):
            self._parked[order] = [event]  # first seen mid-way: its history first, then this
            self._backfill_todo.add(order)
            self._start_sync(orders=[order])
            return
        if order_seq is not None:
            if position is not None and order_seq <= position:
                self.stats["late"] += 1  # older than what was shown: never dropped, but counted
            self._positions[order] = max(position or 0, order_seq)
        self._seen[ident] = None
        if len(self._seen) > self._dedup_size:
            self._seen.popitem(last=False)
        self.stats[f"queued_{event.source}"] += 1
        if batch is None:
            self._queue.put(event)
        else:
            batch.append(event)

    def _backfill_done(self, orders: list[str]) -> None:
        """An order's history arrived (or was refused): deliver what waited for it, in order."""
        self._backfill_todo.difference_update(orders)
        for order in orders:
            for event in sorted(self._parked.pop(order, []), key=lambda e: e.seq or 0):
                if event.source == "replay":
                    self._accept(event)
                elif self._syncing:
                    self._held.append(event)
                else:
                    self._accept_live(event)

    # -- delivery --------------------------------------------------------------------------------

    def _consume(self, timeout: float | None) -> Iterator[ClientEvent]:
        """Take queued items in order; persist delivered ids and cursors as the app takes them."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                self._flush(None)  # idle: make what was delivered durable before blocking
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    return
            if item is _CLOSED:
                self._queue.put(_CLOSED)  # wake any other consumer too
                return
            for entry in item if isinstance(item, list) else (item,):
                if isinstance(entry, _Checkpoint):
                    self._flush(entry.cursor)
                    continue
                changed = self._project(entry)
                if changed is not None:
                    self._changed_view(changed)
                if isinstance(entry, ClientEvent):
                    yield entry

    # -- the projection (consumer thread) --------------------------------------------------------

    def _project(self, entry: ClientEvent | _Optimistic | _Rollback) -> OrderView | None:
        """Apply one delivered item to its order's view; returns a copy of the view if it changed."""
        with self._lock:
            if isinstance(entry, _Rollback):
                view = next((v for v in self._views.values() if v.pending_id == entry.id), None)
                if view is None:
                    return None
                view.pending_state = view.pending_id = None
            elif isinstance(entry, _Optimistic):
                view = self._views.setdefault(entry.order, OrderView(order=entry.order))
                view.pending_state, view.pending_id = entry.state, entry.id
            else:
                self._pending_ids.append(entry.id)
                view = self._views.setdefault(entry.order, OrderView(order=entry.order))
                self._apply_event(view, entry)
            self._dirty.add(view.order)
            return view.model_copy(deep=True)

    def _apply_event(self, view: OrderView, event: ClientEvent) -> None:
        payload, order_seq = event.payload, event.order_seq
        if order_seq is not None and order_seq > view.order_seq:
            view.order_seq = order_seq
            view.seq = max(view.seq, event.seq or 0)
        if event.channel == "status":
            view.state = str(payload.get("state")) if payload.get("state") is not None else view.state
            for key in ("rider", "customer", "items", "eta"):
                if payload.get(key) is not None:
                    setattr(view, key, payload[key])
            if view.pending_id == event.id:
                view.pending_state = view.pending_id = None  # ours, and now stored
        if event.channel == "receipts" and payload.get("sender") == self.username:
            read_up_to = payload.get("read_up_to")
            if isinstance(read_up_to, int) and read_up_to > view.read_up_to:
                self._read(view, read_up_to)
        elif event.channel in ("status", "chat") and payload.get("sender") != self.username:
            at = view.order_seq if order_seq is None else order_seq
            if at > view.read_up_to or order_seq is None:
                view.unread_at.append(at)

    @staticmethod
    def _read(view: OrderView, upto: int) -> None:
        view.read_up_to = upto
        view.unread_at = [at for at in view.unread_at if at > upto]

    def _changed_view(self, view: OrderView) -> None:
        if self.on_order_changed is None:
            return
        try:
            self.on_order_changed(view)
        except Exception:
            log.exception("%r: on_order_changed callback failed for %s", self, view.order)

    def _flush(self, cursor: int | None) -> None:
        with self._lock:
            ids, self._pending_ids = self._pending_ids, []
            views = [self._views[o].model_copy(deep=True) for o in self._dirty if o in self._views]
            self._dirty.clear()
        if ids or views or cursor is not None:
            try:
                self._cursors.save(ids, cursor, views)
            except sqlite3.ProgrammingError:  # closed underneath us during close()
                log.debug("%r: cursor file closed; %d ids not saved", self, len(ids))

    def _dispatch(self) -> None:
        for event in self._consume(None):
            if self.on_event is None:
                continue
            try:
                self.on_event(event)
            except Exception:
                log.exception("%r: on_event callback failed for %s", self, event.topic)

    def _watchdog(self) -> None:
        """Ask again when a sync goes unanswered (fishim restarting, reply lost), and sync every
        ``sync_interval`` while connected."""
        while True:
            with self._lock:
                if self._changed.wait_for(lambda: self._closed, 0.5):
                    return
                if not self._mqtt.is_connected():
                    continue
                now = time.monotonic()
                if (self.sync_interval is not None and self._want_orders and not self._syncing
                        and self._main is None and now - self._last_synced > self.sync_interval):
                    self._start_sync()
                if self._syncing and self._main is None and self._orders_mid is None:
                    self._start_sync()  # never expected: a sync wanted but neither asked nor pending
                if self._main is not None and now - self._main.sent_at > self.sync_timeout:
                    self._unanswered += 1
                    log.warning("%r: sync unanswered for %.0fs (%d times), asking again", self,
                                self.sync_timeout, self._unanswered)
                    self._start_sync()
                for rid, sync in list(self._backfills.items()):
                    if now - sync.sent_at > self.sync_timeout:
                        del self._backfills[rid]
                        self._start_sync(orders=sync.orders)

    # -- helpers ---------------------------------------------------------------------------------

    def _wait_ack(self, mid: int, started: float, topic: str, timeout: float) -> None:
        """Wait for the PUBACK of ``mid``; an ack recorded before ``started`` belongs to an earlier
        message that had the same (recycled) mid."""
        with self._ack_lock:
            if self._early_acks.pop(mid, float("-inf")) >= started:
                return
            waiter = self._acks[mid] = threading.Event()
        try:
            if not waiter.wait(timeout):
                raise TimeoutError(f"publish to {topic} not acknowledged within {timeout}s "
                                   "(kept queued: it is sent when the connection is back)")
        finally:
            with self._ack_lock:
                self._acks.pop(mid, None)

    def _start_thread(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=f"fishim-client-{name}-{self.client_id}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _stable_client_id(self, persist: bool) -> str:
        stored = self._cursors.get("client_id") if persist else None
        if stored:
            return stored
        made = f"{self.username}-{uuid.uuid4().hex[:10]}"[:64]
        if persist:
            self._cursors.set(client_id=made)
        return made

    def _check_owner(self, prefix: str) -> None:
        """A cursor means nothing for another user or prefix: start over rather than skip events."""
        owner = f"{self.username}@{prefix}"
        stored = self._cursors.get("owner")
        if stored is not None and stored != owner:
            log.warning("cursor file %s belonged to %s, not %s: starting from 0", self._cursors.path, stored,
                        owner)
            self._cursors.reset()
        self._cursors.set(owner=owner)

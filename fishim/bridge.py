"""The bridge: every QoS-1 and retained message on the order tree, persisted to SQLite exactly once.

Three threads (docs/bridge.md has the reasoning):

- paho's network thread only appends what arrives to an in-memory inbox, tagged with the connection
  generation it came on;
- the writer thread takes what arrived together (group commit), and per message parses the topic,
  validates the payload, drops duplicates by envelope ``id``, applies the order rules, then stores
  the whole batch in ONE transaction and only then sends the PUBACKs; publishes that depend on the
  stored state (automatic follow-ups, membership, errors, retained repairs) go out after COMMIT;
- the sync worker serves ``sync/{user}/{client_id}/request`` with its own read connection, so a long
  replay never holds up ingest.

A PUBACK only ever follows a COMMIT, so a crash at any point leaves every un-stored message un-acked in
the broker's persistent session for the bridge; the redelivery is recognised by its ``id``.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from fishim import orders
from fishim.config import Config
from fishim.logs import mask
from fishim.messages import (
    ErrorCode,
    ErrorMessage,
    Message,
    Receipt,
    Rejected,
    Status,
    decode,
    near_misses,
    peek_identity,
)
from fishim.store import DeadLetter, EventRow, OrderRow, Store, now_ms
from fishim.sync import SyncServer
from fishim.topics import ORDER_CHANNELS, Channel, TopicError, TopicRef, Topics, is_name, matches

log = logging.getLogger("fishim.bridge")

KEEPALIVE_S = 30
OUT_INFLIGHT = 1000  # our own publishes in flight: the connect-time retained republish can be large
CACHE_LIMIT = 50_000  # projection/receipt cache entries; a small shop never gets near it
ROLE_TTL_S = 5.0  # a new or removed user takes effect within this long
GATE_WAIT_S = 10.0  # how long the sync worker waits for the republish to be acknowledged
INTERNAL_ERROR = "internal"  # dead-letter code for a message the bridge itself failed on


@dataclass(frozen=True)
class BrokerTarget:
    """Where the bridge connects, and as whom."""

    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerTarget:
        """``mqtt://[user:pass@]HOST:PORT``; raise ValueError with a one-line reason."""
        parts = urlsplit(url)
        if parts.scheme != "mqtt":
            raise ValueError(f"broker URL must start with mqtt://, got {url!r}")
        if not parts.hostname:
            raise ValueError(f"broker URL has no host: {url!r}")
        try:
            port = parts.port or 1883
        except ValueError:
            raise ValueError(f"broker URL has a bad port: {url!r}") from None
        user = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        return cls(parts.hostname, port, user, password)

    def __str__(self) -> str:
        who = f"{self.username}@" if self.username else ""
        return f"mqtt://{who}{self.host}:{self.port}"


@dataclass
class BridgeStats:
    """Counters since start; tests and ``fishim stats`` read them, the hot path only adds to them."""

    processed: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    acked: int = 0
    republished: int = 0
    connects: int = 0
    refused: int = 0  # CONNACKs that said no (bad credentials, not authorised)
    sync_requests: int = 0

    def copy(self) -> BridgeStats:
        return BridgeStats(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(slots=True)
class _Inbound:
    """A PUBLISH as paho handed it over, detached from paho's objects."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    gen: int


@dataclass(frozen=True)
class _Connected:
    """Marker the network thread queues on CONNACK: republish retained state, then subscribe."""

    gen: int


@dataclass
class _Gate:
    """Sync requests after this point wait until the republish and SUBACK are acknowledged."""

    gen: int
    infos: list[mqtt.MQTTMessageInfo]


@dataclass(slots=True)
class _Decoded:
    ref: TopicRef | None  # None: a topic outside the bridge's subscriptions
    msg: Message | None  # None: a sync request, an empty payload clearing a retained topic, or no event
    text: str = ""


@dataclass(slots=True)
class _Bad:
    ref: TopicRef | None
    error: Rejected


@dataclass
class _Work:
    """Everything one batch changes: rows for the transaction, then what to do after COMMIT."""

    now: int
    next_seq: int
    known: set[str] = field(default_factory=set)  # envelope ids already in SQLite
    ids: dict[str, str] = field(default_factory=dict)  # id -> order of events stored in this batch
    events: list[EventRow] = field(default_factory=list)
    drafts: dict[str, OrderRow] = field(default_factory=dict)  # the batch's working copy of each order used
    orders: dict[str, OrderRow] = field(default_factory=dict)  # the drafts an accepted event changed
    retained: dict[str, tuple[str, int, bytes]] = field(default_factory=dict)  # topic -> (id, seq, payload)
    receipts: dict[tuple[str, str], int] = field(default_factory=dict)
    deadletters: list[DeadLetter] = field(default_factory=list)
    publishes: list[tuple[str, bytes, str]] = field(default_factory=list)  # follow-ups: topic, payload, id
    membership: dict[str, OrderRow] = field(default_factory=dict)
    errors: list[tuple[str, bytes]] = field(default_factory=list)
    restores: dict[str, bool] = field(default_factory=dict)  # topic -> clear if nothing is stored
    sync: list[tuple[TopicRef, bytes]] = field(default_factory=list)
    duplicates: int = 0


_STOP = object()


class _Directory:
    """:class:`fishim.orders.Directory` over the writer's caches, the open batch and the store.

    Lives on the writer thread only. Roles are cached for :data:`ROLE_TTL_S` so a busy sender costs
    no query per message; receipts are cached because the bridge is their only writer.
    """

    def __init__(self, store: Store, service_user: str) -> None:
        self.store = store
        self.service_user = service_user
        self.work: _Work | None = None
        self.receipts: dict[tuple[str, str], int | None] = {}
        self._roles: dict[str, tuple[str | None, float]] = {}

    def role_of(self, user: str) -> str | None:
        if user == self.service_user:
            return "service"
        now = time.monotonic()
        hit = self._roles.get(user)
        if hit is not None and hit[1] > now:
            return hit[0]
        row = self.store.get_user(user)
        role = row.role if row else None
        _bounded(self._roles)
        self._roles[user] = (role, now + ROLE_TTL_S)
        return role

    def event_in_order(self, order_id: str, event_id: str) -> bool:
        if self.work is not None and event_id in self.work.ids:
            return self.work.ids[event_id] == order_id
        return self.store.event_in_order(order_id, event_id)

    def receipt(self, order_id: str, member: str) -> int | None:
        key = (order_id, member)
        if self.work is not None and key in self.work.receipts:
            return self.work.receipts[key]
        if key not in self.receipts:
            _bounded(self.receipts)
            self.receipts[key] = self.store.get_receipt(order_id, member)
        return self.receipts[key]


def _bounded(cache: dict[Any, Any]) -> None:
    """Forget everything once a cache is full: entries reload from SQLite on the next miss."""
    if len(cache) >= CACHE_LIMIT:
        cache.clear()


class Bridge:
    """The bridge daemon, usable in-process: ``start()``, ``stop()``, and waits for tests.

    ``broker_url`` is ``mqtt://[user:pass@]HOST:PORT``; without it the bridge connects to
    ``config.listener`` with its provisioned service account (:func:`fishim.auth.service_credentials`).
    """

    def __init__(self, config: Config, broker_url: str | None = None) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        given = BrokerTarget.parse(broker_url) if broker_url else None  # bad URL: fail before any I/O
        self.store = Store(config.store.path)
        # FULL: a COMMIT (hence a PUBACK) also survives power loss, not only a crash of this process.
        # With group commit that is one fsync per batch, not per message.
        self.store.conn.execute("PRAGMA synchronous=FULL")
        self.target = self._resolve(given)
        self.service_user = self.target.username or config.bridge.username
        self.stats = BridgeStats()
        self.fatal = threading.Event()  # the writer died: run_bridge exits non-zero
        self._directory = _Directory(self.store, self.service_user)
        self._orders: dict[str, OrderRow | None] = {}
        self._retained_ids: dict[str, str | None] = {}  # topic -> envelope id of the stored row
        self._own: dict[str, deque[str | None]] = {}  # topic -> our retained publishes not echoed yet
        self._refs: dict[str, TopicRef] = {}  # parsed topics: the same few repeat all day
        self._next_seq = self.store.next_seq()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._sync_q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._conn_lock = threading.Lock()
        self._gen = 0
        self._ready = threading.Event()
        self._offline = threading.Event()
        self._suback = threading.Event()
        self._stopping = threading.Event()
        self._changed = threading.Condition()
        self._letters: Store | None = None  # the sync worker's own connection for dead letters
        self._client = self._make_client()
        self._writer = threading.Thread(target=self._run_writer, name="fishim-bridge-writer", daemon=True)
        self._syncer = threading.Thread(target=self._run_sync, name="fishim-bridge-sync", daemon=True)
        self._started = False

    # -- lifecycle ------------------------------------------------------------------------------

    def _resolve(self, given: BrokerTarget | None) -> BrokerTarget:
        """No URL: ``config.listener`` as the service account. A URL naming the service account
        without a password gets its secret from beside the store, so it never shows in ``ps``."""
        service = self.config.bridge.username
        if given is not None and (given.username != service or given.password is not None):
            return given
        from fishim.auth import service_credentials  # argon2 at import: only when it is needed

        user, secret = service_credentials(self.store, service)
        if given is not None:
            return BrokerTarget(given.host, given.port, user, secret)
        listener = self.config.listener
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listener.host, listener.host)
        return BrokerTarget(host, listener.port, user, secret)

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.config.bridge.client_id,
            clean_session=False,  # the broker keeps un-acked and offline messages for us
            protocol=mqtt.MQTTv311,
            manual_ack=True,  # PUBACK after COMMIT, never on receipt
        )
        if self.target.username is not None:
            client.username_pw_set(self.target.username, self.target.password)
        client.max_inflight_messages_set(OUT_INFLIGHT)
        client.max_queued_messages_set(0)
        client.reconnect_delay_set(1, 8)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def start(self) -> None:
        """Start the threads and begin connecting (paho retries until the broker is up)."""
        if self._started:
            raise RuntimeError("bridge already started")
        self._started = True
        log.info("bridge starting broker=%s client_id=%s db=%s next_seq=%d", self.target,
                 self.config.bridge.client_id, self.store.path, self._next_seq)
        self._writer.start()
        self._syncer.start()
        self._client.connect_async(self.target.host, self.target.port, KEEPALIVE_S)
        self._client.loop_start()

    def stop(self, timeout: float = 10.0) -> None:
        """Graceful: finish the batch in hand (commit, ack), disconnect, close the store.

        Whatever arrived after that batch stays un-acked in the broker and comes back next time.
        """
        if not self._started:
            self.store.close()
            return
        self._stopping.set()
        self._inbox.put(_STOP)
        self._writer.join(timeout)
        self._sync_q.put(_STOP)
        self._syncer.join(timeout)
        if self._client.is_connected():
            self._client.disconnect()  # queued after the last PUBACKs, so they go out first
            self._offline.wait(timeout)
        self._client.loop_stop()
        self.store.close()
        log.info("bridge stopped %s", _kv(self.stats))

    def __enter__(self) -> Bridge:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- waiting (tests, fishim up) -------------------------------------------------------------

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until connected, retained state republished and subscriptions acknowledged."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"bridge not ready within {timeout}s (broker {self.target})")

    def wait_for(self, predicate: Callable[[BridgeStats], bool], timeout: float = 10.0) -> BridgeStats:
        """Block until ``predicate(stats)`` holds after a commit; returns a snapshot of the stats."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.stats):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"bridge condition not met within {timeout}s: {_kv(self.stats)}")
                self._changed.wait(left)
            return self.stats.copy()

    # -- network thread -------------------------------------------------------------------------

    def _on_connect(self, _c: mqtt.Client, _u: Any, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: Any) -> None:
        if rc.is_failure:
            log.error("connect refused broker=%s reason=%s", self.target, rc)
            with self._changed:
                self.stats.refused += 1
                self._changed.notify_all()
            return
        with self._conn_lock:
            self._gen += 1
            gen = self._gen
        self._offline.clear()
        with self._changed:
            self.stats.connects += 1
            self._changed.notify_all()
        log.info("connected broker=%s gen=%d session_present=%s", self.target, gen, flags.session_present)
        self._inbox.put(_Connected(gen))

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: mqtt.DisconnectFlags, rc: ReasonCode,
                       _p: Any) -> None:
        with self._conn_lock:
            self._gen += 1  # acks of messages from the lost connection are never sent on a new one
        self._ready.clear()
        self._offline.set()
        if rc.is_failure and not self._stopping.is_set():
            log.warning("disconnected broker=%s reason=%s (reconnecting)", self.target, rc)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = "<not UTF-8>"
        self._inbox.put(_Inbound(topic, msg.payload, msg.qos, msg.mid, self._gen))

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        refused = [str(rc) for rc in rcs if rc.is_failure]
        if refused:
            log.error("subscription refused broker=%s reasons=%s (check the bridge account's ACL)",
                      self.target, ",".join(refused))
        self._suback.set()

    # -- writer thread --------------------------------------------------------------------------

    def _run_writer(self) -> None:
        try:
            self._writer_loop()
        except BaseException:
            log.exception("writer thread died; exiting")
            self.fatal.set()
            raise

    def _writer_loop(self) -> None:
        batch_max = self.config.bridge.batch_max
        wait_s = self.config.bridge.batch_wait_ms / 1000
        pending: Any = None
        while not self._stopping.is_set():
            item = pending if pending is not None else self._inbox.get()
            pending = None
            if item is _STOP:
                return
            if isinstance(item, _Connected):
                self._on_connected(item)
                continue
            batch: list[_Inbound] = [item]
            deadline = time.monotonic() + wait_s
            while len(batch) < batch_max:
                try:
                    nxt = self._inbox.get_nowait()
                except queue.Empty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    time.sleep(left)  # then take all that came meanwhile: one wake-up, not one per message
                    continue
                if not isinstance(nxt, _Inbound):
                    pending = nxt  # a connect marker or stop ends the batch; handled right after it
                    break
                batch.append(nxt)
            self._flush(batch)

    def _on_connected(self, marker: _Connected) -> None:
        """Give a broker that lost its memory every retained state back, then (re)subscribe.

        Runs between batches, so what it republishes is exactly what is committed. The subscription
        is made every time: a session the broker kept makes it a no-op, a lost one needs it.
        """
        rows = self.store.retained()
        self._retained_ids = {row.topic: peek_identity(row.payload)[0] for row in rows}
        self._own.clear()  # echoes of the old connection's publishes may never come
        infos = [self._publish_retained(r.topic, r.payload, self._retained_ids[r.topic]) for r in rows]
        self._suback.clear()
        self._client.subscribe([(self.topics.all_orders, 1), (self.topics.all_sync_requests, 1)])
        self.stats.republished += len(rows)
        log.info("retained republished gen=%d count=%d", marker.gen, len(rows))
        self._sync_q.put(_Gate(marker.gen, infos))

    def _flush(self, batch: list[_Inbound]) -> None:
        """Commit the batch (retrying while SQLite is unavailable), then ack and publish.

        A transient SQLite error (busy, disk full) keeps the messages un-acked and retries; any other
        failure is a bug or a poison message: the batch is split so one message cannot hold up the
        rest, and a single message that still fails is dead-lettered and acked.
        """
        backoff = 0.1
        while True:
            try:
                work = self._commit(batch)
                break
            except sqlite3.OperationalError as exc:
                self._forget()
                log.error("commit failed error=%s messages=%d retry_in=%.1fs", exc, len(batch), backoff)
                if self._stopping.wait(backoff):
                    return  # not acked: the broker redelivers on the next start
                backoff = min(backoff * 2, 5.0)
            except Exception:
                self._forget()
                if len(batch) > 1:
                    log.exception("batch failed messages=%d; retrying one by one", len(batch))
                    for one in batch:
                        self._flush([one])
                    return
                log.exception("message failed topic=%s", batch[0].topic)
                self._quarantine(batch[0])
                return
        self._finish(batch, work)

    def _forget(self) -> None:
        """After a rollback, cached projections may be ahead of SQLite: reload them on demand."""
        self._orders.clear()
        self._directory.receipts.clear()
        self._directory.work = None
        self._next_seq = 0  # re-read from SQLite by the next commit

    def _commit(self, batch: list[_Inbound]) -> _Work:
        if not self._next_seq:
            self._next_seq = self.store.next_seq()
        work = _Work(now=now_ms(), next_seq=self._next_seq)
        decoded = [self._decode(m) for m in batch]
        ids = [d.msg.id for d in decoded if isinstance(d, _Decoded) and d.msg is not None]
        self._directory.work = work
        with self.store.transaction():
            work.known = self.store.existing_ids(ids) if ids else set()
            for m, d in zip(batch, decoded, strict=True):
                self._process(m, d, work)
            self._write(work)
        self._directory.work = None
        return work

    def _decode(self, m: _Inbound) -> _Decoded | _Bad:
        """Topic and payload checks that need no database (done before the transaction opens)."""
        ref = self._refs.get(m.topic)
        if ref is None:
            try:
                ref = self.topics.parse(m.topic)
            except TopicError as exc:
                if not any(matches(m.topic, f) for f in (self.topics.all_orders, self.topics.all_sync_requests)):
                    return _Decoded(None, None)  # not ours (a broker leaking retained messages): skip
                return _Bad(None, Rejected(ErrorCode.UNKNOWN_TOPIC, str(exc)))
            _bounded(self._refs)
            self._refs[m.topic] = ref
        if ref.channel not in ORDER_CHANNELS:
            return _Decoded(ref, None)  # a sync request (fishim.sync validates it) or a broker's leak
        try:
            if not m.payload and ref.retained:
                return _Decoded(ref, None)  # someone cleared a retained topic
            msg = decode(ref, m.payload, self.config.limits.max_payload)
            return _Decoded(ref, msg, m.payload.decode("utf-8"))
        except Rejected as exc:
            return _Bad(ref, exc)
        except UnicodeDecodeError:
            return _Bad(ref, Rejected(ErrorCode.BAD_JSON, "payload is not UTF-8"))

    def _process(self, m: _Inbound, d: _Decoded | _Bad, work: _Work) -> None:
        if isinstance(d, _Bad):
            self._reject(m, d.ref, d.error, work)
            return
        ref, msg = d.ref, d.msg
        if ref is None or msg is None:
            if ref is not None and ref.channel is Channel.SYNC_REQUEST:
                work.sync.append((ref, m.payload))
            elif ref is not None and ref.retained:
                self._settle(m.topic, None, work)  # someone cleared the slot
            else:
                log.debug("ignored topic=%s (not a fishim event)", m.topic)
            return
        if msg.id in work.known or msg.id in work.ids:
            work.duplicates += 1
            if ref.retained:
                self._settle(m.topic, msg.id, work)
            return
        order = self._order(ref.order or "", work)
        try:
            outcome = orders.apply(order, ref, msg, work.next_seq, work.now, self._directory, self.service_user,
                                   in_place=True)
        except Rejected as exc:
            self._reject(m, ref, exc, work, msg.id, msg.sender)
            return
        self._accept(ref, m.topic, msg, d.text, m.payload, outcome, work)
        if msg.model_extra:  # stored; a field that looks misspelt gets an `unknown_field` warning
            for miss in near_misses(msg):
                self._warn(m.topic, msg, miss.rejected(), work)
        for follow in outcome.follow_ups:
            self._follow_up(follow, outcome.order.id, work)

    def _follow_up(self, follow: Status, order_id: str, work: _Work) -> None:
        """An automatic status (``picking``/``packed``) from the service account, stored in this batch."""
        ref = TopicRef(channel=Channel.STATUS, order=order_id)
        topic = self.topics.status(order_id)
        try:
            outcome = orders.apply(work.drafts[order_id], ref, follow, work.next_seq, work.now,
                                   self._directory, self.service_user, in_place=True)
        except Rejected as exc:
            log.error("follow-up refused order=%s state=%s error=%s", order_id, follow.state.value, exc)
            return
        text = follow.model_dump_json(exclude_none=True)
        payload = text.encode()
        self._accept(ref, topic, follow, text, payload, outcome, work)
        work.publishes.append((topic, payload, follow.id))

    def _accept(self, ref: TopicRef, topic: str, msg: Message, text: str, payload: bytes,
                outcome: orders.Outcome, work: _Work) -> None:
        seq = work.next_seq  # orders.apply gave the order this last_seq
        work.next_seq += 1
        order = outcome.order
        work.orders[order.id] = work.drafts[order.id] = order
        work.ids[msg.id] = order.id
        work.events.append(EventRow(seq, msg.id, order.id, order.order_seq, ref.channel.value, topic,
                                    msg.sender, msg.ts, work.now, int(ref.retained), text))
        if ref.retained:
            work.retained[topic] = (msg.id, seq, payload)
        if isinstance(msg, Receipt):
            work.receipts[(order.id, ref.leaf or msg.sender)] = msg.read_up_to
        if outcome.membership_changed:
            work.membership[order.id] = order

    def _reject(self, m: _Inbound, ref: TopicRef | None, error: Rejected, work: _Work,
                ident: str | None = None, sender: str | None = None) -> None:
        """Dead letter (in the batch), an error for the sender, a retained repair, one log line."""
        if ident is None and sender is None:
            ident, sender = peek_identity(m.payload)
        user = (ref.leaf or ref.user) if ref is not None else None  # names in a topic are checked
        if user is None and sender is not None and is_name(sender):
            user = sender
        work.deadletters.append(self._dead_letter(work.now, m.topic, m.payload, user, ident, error.code.value,
                                                  error.detail))
        if user is not None:
            body = ErrorMessage(topic=m.topic, id=ident, error=error.code, detail=error.detail, ts=work.now)
            work.errors.append((user, body.model_dump_json(exclude_none=True).encode()))
        if ref is not None and ref.retained:
            work.restores[m.topic] = True
        log.warning("rejected topic=%s user=%s id=%s error=%s detail=%s", m.topic, user,
                    mask(ident) if ident else None, error.code.value, mask(error.detail))

    def _warn(self, topic: str, msg: Message, warning: Rejected, work: _Work) -> None:
        """An ``errors`` message about a message that was stored anyway (no dead letter)."""
        body = ErrorMessage(topic=topic, id=msg.id, error=warning.code, detail=warning.detail, ts=work.now)
        work.errors.append((msg.sender, body.model_dump_json(exclude_none=True).encode()))

    def _dead_letter(self, now: int, topic: str, payload: bytes, user: str | None, ident: str | None,
                     error: str, detail: str) -> DeadLetter:
        """A dead-letter row; the payload is kept up to ``limits.max_payload`` bytes."""
        return DeadLetter(received_at=now, topic=topic, user=user, msg_id=ident, error=error, detail=detail,
                          payload=payload[:self.config.limits.max_payload])

    def _order(self, order_id: str, work: _Work) -> OrderRow | None:
        """The batch's working copy of the order, made on first use: the rules update it in place,
        so it always holds the batch's latest state, and the cache is untouched until COMMIT."""
        draft = work.drafts.get(order_id)
        if draft is not None:
            return draft
        if order_id not in self._orders:
            _bounded(self._orders)
            self._orders[order_id] = self.store.get_order(order_id)
        cached = self._orders[order_id]
        if cached is None:
            return None
        draft = work.drafts[order_id] = orders.working_copy(cached)
        return draft

    def _settle(self, topic: str, ident: str | None, work: _Work) -> None:
        """A copy of ``ident`` (None: an empty payload) just took the broker's retained slot for ``topic``.

        The bridge sees every message on a topic in the broker's order, so the slot now holds this
        copy. If it is not the stored latest (a redelivery, a client's retry, an echo of our own
        earlier publish) and no later publish of ours is still on its way, put the stored row back.
        """
        pending = self._own.get(topic)
        if pending and ident in pending:
            while pending.popleft() != ident:
                pass
        if pending:
            return  # a later copy of ours will land on top of this one and be checked then
        self._own.pop(topic, None)
        if self._retained_id(topic, work) != ident:
            work.restores.setdefault(topic, False)

    def _publish_retained(self, topic: str, payload: bytes, ident: str | None) -> mqtt.MQTTMessageInfo:
        """Publish retained QoS 1 and remember it, so its echo is recognised by :meth:`_settle`."""
        self._own.setdefault(topic, deque()).append(ident)
        return self._client.publish(topic, payload, qos=1, retain=True)

    def _retained_id(self, topic: str, work: _Work) -> str | None:
        if topic in work.retained:
            return work.retained[topic][0]
        return self._retained_ids.get(topic)

    def _write(self, work: _Work) -> None:
        """The batch's rows, a few multi-row INSERTs per table: events, touched orders, retained, receipts."""
        store = self.store
        store.insert_events(work.events)
        store.put_orders(work.orders.values())
        store.put_retained_rows((topic, payload, 1, seq) for topic, (_ident, seq, payload) in work.retained.items())
        store.put_receipts((order_id, member, value) for (order_id, member), value in work.receipts.items())
        for letter in work.deadletters:
            store.add_deadletter(letter)

    def _finish(self, batch: list[_Inbound], work: _Work) -> None:
        """After COMMIT: caches, PUBACKs, then the publishes that describe the committed state."""
        self._next_seq = work.next_seq
        self._orders.update(work.orders)
        self._directory.receipts.update(work.receipts)
        self._retained_ids.update({topic: value[0] for topic, value in work.retained.items()})
        acked = self._ack(batch)
        publish = self._client.publish
        for topic, payload, ident in work.publishes:
            self._publish_retained(topic, payload, ident)
        for order in work.membership.values():
            body = {"order": order.id, "customer": order.customer, "rider": order.rider}
            publish(self.topics.system("membership"), _json(body), qos=1)
        for user, payload in work.errors:
            publish(self.topics.errors(user), payload, qos=1)
        for topic, clear in work.restores.items():
            self._restore(topic, clear)
        for request in work.sync:
            self._sync_q.put(request)
        with self._changed:
            s = self.stats
            s.processed += len(batch)
            s.stored += len(work.events)
            s.duplicates += work.duplicates
            s.rejected += len(work.deadletters)
            s.batches += 1
            s.acked += acked
            s.sync_requests += len(work.sync)
            self._changed.notify_all()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch messages=%d stored=%d duplicates=%d rejected=%d acked=%d", len(batch),
                      len(work.events), work.duplicates, len(work.deadletters), acked)

    def _ack(self, batch: list[_Inbound]) -> int:
        """PUBACK in arrival order; never for a message that came on an earlier connection."""
        acked = 0
        with self._conn_lock:
            for m in batch:
                if m.qos and m.gen == self._gen:
                    self._client.ack(m.mid, m.qos)
                    acked += 1
        return acked

    def _restore(self, topic: str, clear_if_missing: bool) -> None:
        """Put the last good stored retained payload back in the broker (or clear the slot)."""
        row = self.store.get_retained(topic)
        if row is not None:
            self._publish_retained(topic, row.payload, self._retained_ids.get(topic))
            log.info("retained restored topic=%s seq=%s", topic, row.seq)
        elif clear_if_missing:
            self._publish_retained(topic, b"", None)
            log.info("retained cleared topic=%s", topic)

    def _quarantine(self, m: _Inbound) -> None:
        """A message the bridge itself cannot process: dead-letter and ack it so traffic goes on."""
        ident, sender = peek_identity(m.payload)
        letter = self._dead_letter(now_ms(), m.topic, m.payload, sender if sender and is_name(sender) else None,
                                   ident, INTERNAL_ERROR, "the bridge failed on this message; see its log")
        try:
            with self.store.transaction():
                self.store.add_deadletter(letter)
        except sqlite3.Error as exc:
            log.error("dead letter failed topic=%s error=%s (left un-acked)", m.topic, exc)
            return
        self._ack([m])

    # -- sync worker ----------------------------------------------------------------------------

    def _run_sync(self) -> None:
        server = SyncServer(Path(self.store.path), self.config, on_reject=self._sync_refused)
        try:
            while (item := self._sync_q.get()) is not _STOP:
                try:
                    if isinstance(item, _Gate):
                        self._pass_gate(item)
                        continue
                    for topic, payload in server.handle(*item):  # pages, or one error message
                        self._client.publish(topic, payload, qos=1)
                except Exception:
                    log.exception("sync request failed")
        finally:
            server.close()
            if self._letters is not None:
                self._letters.close()

    def _sync_refused(self, ref: TopicRef, payload: bytes, error: Rejected) -> None:
        """SyncServer's hook, on the sync thread: dead-letter the request (it logs and answers itself)."""
        if self._letters is None:
            self._letters = Store(self.store.path)
        ident, _sender = peek_identity(payload)
        self._letters.add_deadletter(self._dead_letter(now_ms(), self.topics.sync_request(
            ref.user or "-", ref.client_id or "-"), payload, ref.user, ident, error.code.value, error.detail))
        with self._changed:
            self.stats.rejected += 1
            self._changed.notify_all()

    def _pass_gate(self, gate: _Gate) -> None:
        """Wait until the broker acknowledged the republish and the subscription, then open up."""
        deadline = time.monotonic() + GATE_WAIT_S

        def current() -> bool:
            return gate.gen == self._gen and not self._stopping.is_set() and time.monotonic() < deadline

        for info in gate.infos:
            while not info.is_published() and current():
                try:
                    info.wait_for_publish(0.2)
                except (RuntimeError, ValueError):
                    return  # connection lost meanwhile: the next connect republishes again
        while not self._suback.wait(0.2) and current():
            pass
        if current():
            self._ready.set()
            log.info("bridge ready gen=%d retained=%d", gate.gen, len(gate.infos))
        elif gate.gen == self._gen and not self._stopping.is_set():
            log.warning("broker did not acknowledge the retained republish within %.0fs", GATE_WAIT_S)


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def _kv(stats: BridgeStats) -> str:
    return " ".join(f"{f.name}={getattr(stats, f.name)}" for f in fields(stats))


def run_bridge(config: Config, broker_url: str | None = None) -> int:
    """``fishim bridge``: run until SIGTERM/SIGINT, then stop gracefully. Returns the exit code."""
    try:
        bridge = Bridge(config, broker_url)
    except (ValueError, OSError, sqlite3.Error) as exc:
        log.error("bridge not started: %s", exc)
        return 2
    wake = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal received signal=%s; stopping", signal.Signals(signum).name)
        wake.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        bridge.start()
        while not wake.wait(1.0):
            if bridge.fatal.is_set():
                bridge.stop()
                return 1
        bridge.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

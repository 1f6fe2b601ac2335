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

import logging
import queue
import signal
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from types import FrameType
from typing import Any
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from fishim.config import Config
from fishim.ingest import Inbound, Kind, Work, Writer, set_synchronous
from fishim.messages import Rejected, peek_identity
from fishim.store import Store, StoreError, now_ms, open_store
from fishim.sync import SyncServer
from fishim.topics import TopicRef, Topics

log = logging.getLogger("fishim.bridge")

KEEPALIVE_S = 30
OUT_INFLIGHT = 1000  # our own publishes in flight: the connect-time retained republish can be large
GATE_WAIT_S = 10.0  # how long the sync worker waits for the republish to be acknowledged


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


def parse_brokers(urls: str | Sequence[str]) -> list[BrokerTarget]:
    """The nodes of one (clustered) broker: URLs given as a list and/or comma-separated."""
    items = [urls] if isinstance(urls, str) else list(urls)
    parts = [part.strip() for item in items for part in item.split(",") if part.strip()]
    if not parts:
        raise ValueError("no broker URL given")
    return [BrokerTarget.parse(part) for part in parts]


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


@dataclass(frozen=True, slots=True)
class _Tag:
    """What the bridge needs to PUBACK one message: paho's mid and QoS, and the connection it came on."""

    mid: int
    qos: int
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


_STOP = object()


class Bridge:
    """The bridge daemon, usable in-process: ``start()``, ``stop()``, and waits for tests.

    ``broker_url`` is ``mqtt://[user:pass@]HOST:PORT``; without it the bridge connects to
    ``config.listener`` with its provisioned service account (:func:`fishim.auth.service_credentials`).
    Several URLs (a list, or comma-separated) are the nodes of one clustered broker: the bridge
    moves to the next one whenever its connection fails or drops, round robin.
    """

    def __init__(self, config: Config, broker_url: str | Sequence[str] | None = None) -> None:
        self.config = config
        self.topics = Topics(config.prefix)
        given = parse_brokers(broker_url) if broker_url else [None]  # bad URL: fail before any I/O
        # On PostgreSQL this waits for the writer lock: a standby bridge stays here, off the broker
        # (it shares the active one's client id and session), until the active one's session ends.
        self.store = open_store(config.store.target, writer=True, lock_timeout=config.store.lock_timeout)
        # store.synchronous (default FULL): a COMMIT, hence a PUBACK, also survives power loss.
        # With group commit that is one fsync per batch, not per message.
        set_synchronous(self.store, config.store.synchronous)
        self.targets = [self._resolve(one) for one in given]
        self.target = self.targets[0]
        self.service_user = self.target.username or config.bridge.username
        self.stats = BridgeStats()
        self.fatal = threading.Event()  # the writer died: run_bridge exits non-zero
        self.writer = Writer(self.store, config, self.service_user)
        self._retained_ids: dict[str, str | None] = {}  # topic -> envelope id of the stored row
        self._own: dict[str, deque[str | None]] = {}  # topic -> our retained publishes not echoed yet
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
        if self.config.store.url is not None:
            raise ValueError("with store.url (PostgreSQL) give the bridge's broker account in --broker "
                             "(mqtt://USER:PASS@HOST:PORT): its secret file only exists beside a SQLite store")
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
        client.on_connect_fail = self._on_connect_fail
        return client

    def start(self) -> None:
        """Start the threads and begin connecting (paho retries until the broker is up)."""
        if self._started:
            raise RuntimeError("bridge already started")
        self._started = True
        log.info("bridge starting broker=%s client_id=%s db=%s next_seq=%d", self.target,
                 self.config.bridge.client_id, self.store.label, self.store.next_seq())
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
            self._next_target()

    def _on_connect_fail(self, _c: mqtt.Client, _u: Any) -> None:
        if not self._stopping.is_set():
            log.warning("cannot reach broker=%s (trying %s)", self.target,
                        "the next node" if len(self.targets) > 1 else "again")
            self._next_target()

    def _next_target(self) -> None:
        """Fail over to the next node of a clustered broker (paho reconnects to it after its delay).

        The session is the cluster's, under the same client id: un-acknowledged messages come back on
        whichever node holds it, and their envelope ``id`` makes a redelivery a no-op.
        """
        if len(self.targets) < 2:
            return
        self.target = self.targets[(self.targets.index(self.target) + 1) % len(self.targets)]
        client = self._client
        try:  # paho 2 reconnects to host/port; they are settable once the old socket is closed
            client.host, client.port = self.target.host, self.target.port
        except RuntimeError:  # still closing (a callback before the socket is gone): same effect
            client._host, client._port = self.target.host, self.target.port
        if self.target.username is not None:
            client.username_pw_set(self.target.username, self.target.password)

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = "<not UTF-8>"
        self._inbox.put(Inbound(topic, bytes(msg.payload), tag=_Tag(msg.mid, msg.qos, self._gen)))

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
            batch: list[Inbound] = [item]
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
                if not isinstance(nxt, Inbound):
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

    def _flush(self, batch: list[Inbound]) -> None:
        """Commit the batch (the writer retries while SQLite is unavailable), then ack and publish.

        What the writer could not commit before a stop stays un-acked: the broker redelivers it.
        """
        for done, work in self.writer.flush(batch, self._stopping):
            self._finish(done, work)

    def _settle_slots(self, batch: list[Inbound], work: Work) -> dict[str, bool]:
        """Which retained slots need the stored value put back after this batch (topic -> clear if none).

        The bridge sees every message on a topic in the broker's order, so after each one the
        broker's slot holds that copy. A refused status must be undone; a copy that is not the stored
        latest (a redelivery, a client's retry, an echo of our own earlier publish) too, unless a
        later publish of ours is still on its way and will land on top of it.
        """
        restores: dict[str, bool] = {}
        latest = dict(self._retained_ids)
        for m, result in zip(batch, work.results, strict=True):
            if result.ref is None or not result.ref.retained:
                continue
            if result.kind is Kind.STORED:
                latest[m.topic] = result.ident
            elif result.kind is Kind.REFUSED:
                restores[m.topic] = True
            elif result.kind in (Kind.DUPLICATE, Kind.CLEARED):
                ident = result.ident if result.kind is Kind.DUPLICATE else None
                if self._echo_settled(m.topic, ident) and latest.get(m.topic) != ident:
                    restores.setdefault(m.topic, False)
        return restores

    def _echo_settled(self, topic: str, ident: str | None) -> bool:
        """Consume our own pending publishes up to ``ident``; True if none of ours is still on its way."""
        pending = self._own.get(topic)
        if pending and ident in pending:
            while pending.popleft() != ident:
                pass
        if pending:
            return False
        self._own.pop(topic, None)
        return True

    def _publish_retained(self, topic: str, payload: bytes, ident: str | None) -> mqtt.MQTTMessageInfo:
        """Publish retained QoS 1 and remember it, so its echo is recognised by :meth:`_settle`."""
        self._own.setdefault(topic, deque()).append(ident)
        return self._client.publish(topic, payload, qos=1, retain=True)

    def _finish(self, batch: list[Inbound], work: Work) -> None:
        """After COMMIT: PUBACKs, then the publishes that describe the committed state."""
        restores = self._settle_slots(batch, work)
        self._retained_ids.update({topic: value[0] for topic, value in work.retained.items()})
        acked = self._ack(batch)
        publish = self._client.publish
        for result in work.results:
            for event in result.events[1:]:  # automatic follow-ups: the broker has not seen them
                self._publish_retained(event.topic, event.payload, event.msg.id)
            if result.error is not None and result.error_to is not None:
                publish(self.topics.errors(result.error_to), result.error_payload, qos=1)
        for topic, clear in restores.items():
            self._restore(topic, clear)
        sync = [(r.ref, m.payload) for m, r in zip(batch, work.results, strict=True) if r.kind is Kind.SYNC]
        for request in sync:
            self._sync_q.put(request)
        with self._changed:
            s = self.stats
            s.processed += len(batch)
            s.stored += work.stored
            s.duplicates += work.count(Kind.DUPLICATE)
            s.rejected += len(work.deadletters)
            s.batches += 1
            s.acked += acked
            s.sync_requests += len(sync)
            self._changed.notify_all()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("batch messages=%d stored=%d rejected=%d acked=%d", len(batch), work.stored,
                      len(work.deadletters), acked)

    def _ack(self, batch: list[Inbound]) -> int:
        """PUBACK in arrival order; never for a message that came on an earlier connection."""
        acked = 0
        with self._conn_lock:
            for m in batch:
                tag: _Tag = m.tag
                if tag.qos and tag.gen == self._gen:
                    self._client.ack(tag.mid, tag.qos)
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

    # -- sync worker ----------------------------------------------------------------------------

    def _run_sync(self) -> None:
        server = SyncServer(self.store.target, self.config, on_reject=self._sync_refused)
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
            self._letters = open_store(self.store.target)
        ident, _sender = peek_identity(payload)
        self._letters.add_deadletter(self.writer.dead_letter(now_ms(), self.topics.sync_request(
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


def _kv(stats: BridgeStats) -> str:
    return " ".join(f"{f.name}={getattr(stats, f.name)}" for f in fields(stats))


def run_bridge(config: Config, broker_url: str | Sequence[str] | None = None) -> int:
    """``fishim bridge``: run until SIGTERM/SIGINT, then stop gracefully. Returns the exit code."""
    try:
        bridge = Bridge(config, broker_url)
    except (ValueError, OSError, sqlite3.Error, StoreError) as exc:
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
            if bridge.fatal.is_set() or bridge.store.lost_lock():  # a standby may be the writer now
                bridge.stop()
                return 1
        bridge.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

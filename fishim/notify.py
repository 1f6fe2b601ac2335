"""The alert service: runs :class:`fishim.alerts.AlertEngine` inside the broker process.

- **Inputs** arrive on a queue, so whoever calls is never held up: committed events (the ingest's
  ``after_commit`` hook, :meth:`AlertService.after_commit`), presence changes (the broker's
  :class:`~fishim.presence.PresenceTracker`), and every ``alerts.tick`` a clock tick, which also
  picks up acknowledgements the CLI left in the store (``fishim alerts ack``).
- **One worker thread** owns the engine: it applies the inputs, saves changed alerts and waiting
  deliveries (own connection, its own small tables; never the event log), and hands notifications
  to ``emit``. ``emit`` publishes on ``{prefix}/notify/{user}`` as the service account through the
  ingest, which gives them their ``seq``, stores them and queues them like any other message;
  notification ids are deterministic, so a notification sent twice (a crash between emit and save)
  is stored once.
- **Pushes** go to :class:`~fishim.push.Pusher`'s own thread.

On start the worker restores live alerts and waiting deliveries from the store, so deadlines
survive a restart, and starts ``rider_offline`` for riders holding open orders who are not connected.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

from fishim.alerts import RIDER_STATES, Alert, AlertEngine, Changes, Fact, OrderFacts, Outgoing
from fishim.config import Config
from fishim.messages import Chat, Notification, PresenceMessage, Receipt, Status
from fishim.push import Pusher
from fishim.store import OrderRow, Store, now_ms

log = logging.getLogger("fishim.notify")

Emit = Callable[[str, Notification], None]
"""``emit(user, notification)``: publish on ``{prefix}/notify/{user}`` through the ingest (blocking is
fine: only the alert worker calls it)."""

ROLE_TTL_MS = 5_000


def parse_eta(value: Any) -> int | None:
    """A status ``eta``: epoch ms, or RFC 3339 text with an offset; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return int(parsed.timestamp() * 1000) if parsed.tzinfo is not None else None
    return None


def order_facts(order: OrderRow, eta: int | None = None) -> OrderFacts:
    return OrderFacts(id=order.id, state=order.state, customer=order.customer, rider=order.rider,
                      order_seq=order.order_seq, eta=eta)


def fact_of(msg: Any, order: OrderRow, order_seq: int, leaf: str | None = None) -> Fact | None:
    """The rules' view of one committed order event; None for channels the rules ignore."""
    if isinstance(msg, Status):
        eta = parse_eta(msg.eta)
        return Fact(order=order_facts(order, eta), order_seq=order_seq, channel="status", sender=msg.sender,
                    state=msg.state.value, eta=eta)
    if isinstance(msg, Chat):
        return Fact(order=order_facts(order), order_seq=order_seq, channel="chat", sender=msg.sender,
                    mentions=list(msg.mentions or []))
    if isinstance(msg, Receipt):
        return Fact(order=order_facts(order), order_seq=order_seq, channel="receipts", sender=msg.sender,
                    member=leaf or msg.sender, read_up_to=msg.read_up_to)
    return None


class StoreDirectory:
    """:class:`fishim.alerts.Directory` over a read connection and the broker's presence tracker."""

    def __init__(self, store: Store, online: Callable[[str], bool]) -> None:
        self.store = store
        self._online = online
        self._roles: dict[str, str] = {}
        self._roles_at = -ROLE_TTL_MS

    def _refresh(self) -> dict[str, str]:
        now = now_ms()
        if now - self._roles_at >= ROLE_TTL_MS:
            self._roles = {u.name: u.role for u in self.store.users()}
            self._roles_at = now
        return self._roles

    def users_with_role(self, role: str) -> list[str]:
        return sorted(u for u, r in self._refresh().items() if r == role)

    def role_of(self, user: str) -> str | None:
        return self._refresh().get(user)

    def order(self, order_id: str) -> OrderFacts | None:
        row = self.store.get_order(order_id)
        return order_facts(row) if row is not None else None

    def receipt(self, order_id: str, member: str) -> tuple[int, int] | None:
        for row in self.store.receipt_rows(order_id):
            if row.member == member:
                return row.read_up_to, row.updated_at
        return None

    def online(self, user: str) -> bool:
        return self._online(user)

    def rider_orders(self, rider: str) -> list[OrderFacts]:
        return [order_facts(o) for o in self.store.list_orders(rider=rider) if o.state in RIDER_STATES]

    def held_by_riders(self) -> set[str]:
        marks = ",".join("?" * len(RIDER_STATES))
        rows = self.store.conn.execute(
            f"SELECT DISTINCT rider FROM orders WHERE rider IS NOT NULL AND state IN ({marks})", sorted(RIDER_STATES))
        return {r[0] for r in rows}


class AlertService:
    """The engine, its worker thread, its store connection and its pusher.

    Args:
        config: the whole config (``alerts``, ``push``, ``store.path``, ``bridge.username``).
        emit: publishes one notification (see :data:`Emit`).
        online: is this user connected now (the broker's presence tracker).
        clock: epoch ms; tests inject one.
        run_thread: False in tests that move ``clock`` by hand and call :meth:`step` themselves.
    """

    def __init__(self, config: Config, emit: Emit, online: Callable[[str], bool] = lambda _u: False,
                 clock: Callable[[], int] = now_ms, *, run_thread: bool = True) -> None:
        self.config = config
        self.emit = emit
        self.clock = clock
        self.run_thread = run_thread
        self.store = Store(config.store.path)
        self.directory = StoreDirectory(self.store, online)
        self.engine = AlertEngine(config.alerts, self.directory, clock, config.push, sender=config.bridge.username)
        self.pusher = Pusher(config.push, config.alerts, self._push_result) if config.push else None
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._lock = threading.Lock()  # one engine call at a time (worker thread, or step() in tests)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._restore()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> AlertService:
        if self.run_thread:
            self._thread = threading.Thread(target=self._run, name="fishim-alerts", daemon=True)
            self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        self._inbox.put(("stop", None))
        if self._thread is not None:
            self._thread.join(10)
        if self.pusher is not None:
            self.pusher.close()
        self.store.close()

    # -- inputs (any thread; never block) --------------------------------------------------------

    def observe(self, facts: Iterable[Fact]) -> None:
        for fact in facts:
            self._inbox.put(("fact", fact))

    def presence_changed(self, message: PresenceMessage) -> None:
        """A :class:`~fishim.presence.PresenceTracker` listener."""
        self._inbox.put(("presence", (message.user, message.state == "online")))

    # ingest hook (fishim.ingest.IngestHook) ------------------------------------------------------

    def in_transaction(self, store: Store, committed: list[Any]) -> None:
        """Nothing to write with the events: alerts are derived, and rebuilt from them if lost."""

    def after_commit(self, committed: list[Any]) -> None:
        """A committed batch (broker loop): one queue put; the worker converts it."""
        if committed:
            self._inbox.put(("committed", committed))

    # -- the worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        tick_s = self.config.alerts.tick / 1000
        next_tick = time.monotonic()
        while not self._stopping.is_set():
            try:
                kind, value = self._inbox.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                kind, value = "tick", None
            if kind == "stop":
                break
            due = time.monotonic() >= next_tick  # deadlines are checked once a tick, not per batch
            try:
                self.step([(kind, value)], tick=due)
            except Exception:
                log.exception("alert worker step failed")
            if due:
                next_tick = time.monotonic() + tick_s

    def _drain(self) -> list[tuple[str, Any]]:
        items = []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def step(self, inputs: Iterable[tuple[str, Any]] = (), tick: bool = True) -> Changes:
        """Apply ``inputs`` and everything queued, then (``tick``) acks from the store and the clock's
        deadlines; save and send what changed."""
        changes = Changes()
        with self._lock:
            for kind, value in [*inputs, *self._drain()]:
                if kind == "fact":
                    changes.extend(self.engine.observe(value))
                elif kind == "committed":
                    for item in value:
                        fact = fact_of(item.msg, item.order, item.order_seq, item.ref.leaf)
                        if fact is not None:
                            changes.extend(self.engine.observe(fact))
                elif kind == "presence":
                    changes.extend(self.engine.presence(*value))
                elif kind == "push_failed":
                    changes.extend(self._mark_push_failed(*value))
            acks = self.store.pending_acks() if tick else []
            for alert_id, by in acks:
                changes.extend(self.engine.ack(alert_id, by))
            if tick:
                changes.extend(self.engine.tick())
            self._apply(changes)
            self.store.mark_acks_applied(a for a, _ in acks)
        return changes

    def _apply(self, changes: Changes) -> None:
        changed = {a.id: a for a in changes.alerts}.values()
        self.store.put_alerts(a.record(self.clock()) for a in changed if a.live or a.opened_at is not None)
        self.store.delete_alerts(a.id for a in changed if not a.live and a.opened_at is None)
        delivered = [note.id for _user, note in changes.notifications]
        waiting = {i.id: i for i in changes.outgoing if i.id in self.engine.waiting}
        self.store.put_outbox(((i.id, i.user, i.kind, i.due_at, i.model_dump_json()) for i in waiting.values()),
                              drop=[*changes.dropped, *delivered])
        for user, note in changes.notifications:
            try:
                self.emit(user, note)
            except Exception:
                log.exception("notification not published id=%s user=%s", note.id, user)
        for item in changes.pushes:
            if self.pusher is not None:
                self.store.outbox_result(item.id, "sending", 0, None)
                self.pusher.send(item)

    def _push_result(self, item: Outgoing, sent: bool, attempts: int, error: str | None) -> None:
        """From the pusher thread: record the fate; a failure also marks the alert (worker thread)."""
        with self._lock:
            self.store.outbox_result(item.id, "sent" if sent else "failed", attempts, error)
        if not sent and item.notification.alert:
            self._inbox.put(("push_failed", (item.notification.alert, f"{item.user}: {error}")))

    def _mark_push_failed(self, alert_id: str, error: str) -> Changes:
        changes = Changes()
        alert = self.engine.alerts.get(alert_id)
        if alert is None:
            raw = self.store.get_alert(alert_id)
            alert = Alert.model_validate_json(raw) if raw else None
        if alert is not None:
            alert.push_error = error
            changes.alerts.append(alert)
        return changes

    def _restore(self) -> None:
        alerts = [Alert.model_validate_json(raw) for raw in self.store.alerts(live_only=True, limit=1_000_000)]
        waiting = [Outgoing.model_validate_json(raw) for raw in self.store.outbox("waiting")]
        waiting += [Outgoing.model_validate_json(raw) for raw in self.store.outbox("sending")]
        self.engine.restore(alerts, waiting)
        changes = Changes()
        for rider in sorted(self.directory.held_by_riders()):
            if not self.directory.online(rider):
                changes.extend(self.engine.presence(rider, False))
        self._apply(changes)
        if alerts or waiting:
            log.info("alerts restored live=%d waiting=%d", len(alerts), len(waiting))



def attach(config: Config, broker: Any) -> AlertService:
    """Run the alert service inside ``fishim up`` (call on the broker's loop, after it started).

    Committed events reach it through the broker's ``after_commit`` hooks, presence through the
    presence tracker's listeners; its notifications go back through :meth:`EmbeddedBroker.submit` as
    the service account, so the ingest stores, stamps and routes them like any other message.
    """
    import asyncio

    from fishim.auth import Principal, Role
    from fishim.topics import Topics

    loop = asyncio.get_running_loop()
    principal = Principal(username=config.bridge.username, role=Role.SERVICE)
    topics = Topics(config.prefix)

    def emit(user: str, note: Notification) -> None:
        payload = note.model_dump_json().encode()
        future = asyncio.run_coroutine_threadsafe(broker.submit(principal, topics.notify(user), payload), loop)
        verdict = future.result(timeout=30)
        if verdict.outcome not in ("stored", "duplicate"):
            log.warning("notification not stored id=%s user=%s outcome=%s", note.id, user, verdict.outcome)

    core = broker.core
    service = AlertService(config, emit, online=core.presence.online)
    core.presence.listeners.append(service.presence_changed)
    core.after_commit.append(service.after_commit)
    log.info("alerts started push_targets=%d", len(config.push))
    return service.start()

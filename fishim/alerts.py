"""Alert rules: conditions on orders that a person must act on, and who is told, when and how loudly.

Pure rules, no I/O: :class:`AlertEngine` is fed committed events (:meth:`~AlertEngine.observe`),
presence changes (:meth:`~AlertEngine.presence`), acknowledgements (:meth:`~AlertEngine.ack`) and
clock ticks (:meth:`~AlertEngine.tick`), and returns :class:`Changes`: alerts to save, notifications
to publish, deliveries to keep for later and pushes to send. Time comes from an injected clock, so
tests and ``scripts/peak_day.py`` run a whole day in milliseconds. ``fishim.notify`` runs it inside
the broker process and does the I/O.

An **alert** is one open condition per (order, reason[, subject]). It starts ``pending`` when the
condition begins, opens when it has lasted its threshold (``alerts:`` in broker.yaml), is escalated
to the owner once after ``escalate_after``, and is closed when the condition ends (staff answered,
rider back, order assigned, order closed) or someone acknowledges it. A pending alert whose condition
ends never opens: nobody hears about a chat answered in time.

Who is not told: the person who caused it ("just did"), and anyone whose read receipt on the order
already covers what the alert is about, given since the condition began ("already read"). Quiet
hours hold everything below ``urgent`` until they end, then deliver it if it still matters.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, time, timedelta
from typing import Literal, Protocol
from zoneinfo import ZoneInfo

from pydantic import BaseModel, Field

from fishim.config import AlertsConfig, Priority, PushTarget
from fishim.messages import PRIORITY_RANK, Notification
from fishim.store import AlertRecord
from fishim.topics import tracking_user

Reason = Literal["mention", "unanswered_customer", "unassigned_packed", "pickup_overdue", "rider_offline",
                 "order_late", "delivery_failed"]
REASONS: tuple[str, ...] = ("mention", "unanswered_customer", "unassigned_packed", "pickup_overdue",
                            "rider_offline", "order_late", "delivery_failed")
PRIORITY: dict[str, Priority] = {"mention": "high", "unanswered_customer": "urgent", "unassigned_packed": "high",
                                 "pickup_overdue": "high", "rider_offline": "high", "order_late": "high",
                                 "delivery_failed": "high", "status": "normal"}
CLOSED_STATES = frozenset({"delivered", "cancelled"})
RIDER_STATES = frozenset({"assigned", "picked_up", "delivering", "failed"})  # the rider holds the order
STAFF_ROLES = frozenset({"staff", "owner"})


class OrderFacts(BaseModel):
    """What the rules need of an order's projection."""

    id: str
    state: str
    customer: str | None = None
    rider: str | None = None
    order_seq: int = 0
    eta: int | None = None


class Fact(BaseModel):
    """One committed event on an order, with the order as it is after it."""

    order: OrderFacts
    order_seq: int
    channel: str
    sender: str
    state: str | None = None  # status
    eta: int | None = None  # status, epoch ms
    mentions: list[str] = Field(default_factory=list)  # chat
    member: str | None = None  # receipts
    read_up_to: int | None = None  # receipts


class Alert(BaseModel):
    """One condition on one order; what ``fishim alerts`` lists. Times are epoch ms."""

    id: str
    order: str | None
    reason: str
    subject: str | None = None  # the mentioned user; the rider who is offline
    priority: Priority
    state: Literal["pending", "open", "closed"] = "pending"
    started_at: int  # the condition began
    due_at: int  # it opens then, if it still holds
    opened_at: int | None = None
    escalated_at: int | None = None
    closed_at: int | None = None
    close_reason: str | None = None  # ended | answered | rider_back | assigned | read | acknowledged | ...
    acked_by: str | None = None
    actor: str | None = None  # whose event started it
    about_seq: int = 0  # a read receipt at or past this order seq means "already read"
    recipients: list[str] = Field(default_factory=list)  # who was told
    text: str
    push_error: str | None = None  # the last failed off-app push, shown by `fishim alerts`

    @property
    def key(self) -> tuple[str | None, str, str | None]:
        return self.order, self.reason, self.subject

    @property
    def live(self) -> bool:
        return self.state != "closed"

    def record(self, now: int) -> AlertRecord:
        """The store row (indexed columns and the whole alert as JSON)."""
        return AlertRecord(self.id, self.order, self.reason, self.priority, self.state, self.due_at, now,
                           self.model_dump_json())


class Outgoing(BaseModel):
    """A notification waiting for its time: a coalesced status notice, one held by quiet hours
    (``deliver``), or an off-app push waiting for ``push_delay`` (``push``)."""

    id: str
    user: str
    kind: Literal["deliver", "push"]
    due_at: int
    notification: Notification
    about_seq: int = 0
    since: int = 0  # receipts given after this count as "read"
    key: str | None = None  # deliveries with the same key replace each other (status coalescing)
    target: int | None = None  # index into broker.yaml push:


class Changes(BaseModel):
    """What one engine call decided; the caller saves, publishes and sends it."""

    alerts: list[Alert] = Field(default_factory=list)  # changed alerts, to save
    notifications: list[tuple[str, Notification]] = Field(default_factory=list)  # (user, message) now
    outgoing: list[Outgoing] = Field(default_factory=list)  # new or replaced waiting deliveries
    dropped: list[str] = Field(default_factory=list)  # ids of waiting deliveries no longer needed
    pushes: list[Outgoing] = Field(default_factory=list)  # due pushes to send now

    def extend(self, other: Changes) -> None:
        for name in ("alerts", "notifications", "outgoing", "dropped", "pushes"):
            getattr(self, name).extend(getattr(other, name))


class Directory(Protocol):
    """What the engine reads from outside: accounts, orders it has not seen yet, receipts, presence."""

    def users_with_role(self, role: str) -> list[str]: ...

    def role_of(self, user: str) -> str | None: ...

    def order(self, order_id: str) -> OrderFacts | None: ...

    def receipt(self, order_id: str, member: str) -> tuple[int, int] | None:
        """(read_up_to, updated_at ms) of ``member`` on ``order_id``."""
        ...

    def online(self, user: str) -> bool: ...

    def rider_orders(self, rider: str) -> list[OrderFacts]:
        """Open orders ``rider`` holds (state in RIDER_STATES)."""
        ...


class MemoryDirectory:
    """A :class:`Directory` held in dicts: for tests, ``scripts/peak_day.py``, and as the engine's
    picture of what it observed."""

    def __init__(self, roles: dict[str, str] | None = None) -> None:
        self.roles: dict[str, str] = dict(roles or {})
        self.orders: dict[str, OrderFacts] = {}
        self.receipts: dict[tuple[str, str], tuple[int, int]] = {}
        self.present: set[str] = set()

    def users_with_role(self, role: str) -> list[str]:
        return sorted(u for u, r in self.roles.items() if r == role)

    def role_of(self, user: str) -> str | None:
        return self.roles.get(user)

    def order(self, order_id: str) -> OrderFacts | None:
        return self.orders.get(order_id)

    def receipt(self, order_id: str, member: str) -> tuple[int, int] | None:
        return self.receipts.get((order_id, member))

    def online(self, user: str) -> bool:
        return user in self.present

    def rider_orders(self, rider: str) -> list[OrderFacts]:
        return [o for o in self.orders.values() if o.rider == rider and o.state in RIDER_STATES]


class AlertEngine:
    """The rules. Not thread-safe: one caller (``fishim.notify``'s worker) drives it.

    Args:
        config: ``alerts:`` thresholds, quiet hours and push settings.
        directory: accounts, orders, receipts and presence (the engine also learns from what it observes).
        clock: epoch milliseconds.
        push: ``push:`` targets (an off-app push is planned for each matching notification).
        sender: the envelope ``sender`` of the notifications (fishim's service account).
    """

    def __init__(self, config: AlertsConfig, directory: Directory, clock: Callable[[], int],
                 push: list[PushTarget] | None = None, sender: str = "fishim") -> None:
        self.config = config
        self.directory = directory
        self.clock = clock
        self.push = push or []
        self.sender = sender
        self.tz = ZoneInfo(config.timezone) if config.timezone else None
        self.alerts: dict[str, Alert] = {}  # live (pending or open) alerts by id
        self._by_key: dict[tuple[str | None, str, str | None], str] = {}
        self._orders: dict[str, OrderFacts] = {}
        self._receipts: dict[tuple[str, str], tuple[int, int]] = {}
        self._online: dict[str, bool] = {}
        self.waiting: dict[str, Outgoing] = {}
        self._waiting_keys: dict[str, str] = {}
        self._by_order: dict[str | None, set[str]] = {}  # order -> live alert ids
        self._by_alert: dict[str, set[str]] = {}  # alert id -> waiting item ids

    # -- restart ---------------------------------------------------------------------------------

    def restore(self, alerts: Iterable[Alert], waiting: Iterable[Outgoing]) -> None:
        """Take the live alerts and waiting deliveries saved before a restart: deadlines carry on."""
        for alert in alerts:
            if alert.live:
                self._index(alert)
        for item in waiting:
            self._wait(item)

    # -- inputs ------------------------------------------------------------------------------------

    def observe(self, fact: Fact) -> Changes:
        """One committed event: start, end or update the conditions it touches."""
        changes = Changes()
        previous = self._orders.get(fact.order.id)
        self._orders[fact.order.id] = fact.order
        if fact.channel == "status":
            self._on_status(fact, previous, changes)
            if fact.order.state in CLOSED_STATES:  # nothing more can start on it: keep memory bounded
                self._forget(fact.order.id)
        elif fact.channel == "chat":
            self._on_chat(fact, changes)
        elif fact.channel == "receipts" and fact.member is not None and fact.read_up_to is not None:
            self._receipts[(fact.order.id, fact.member)] = (fact.read_up_to, self.clock())
            for alert in self._order_alerts(fact.order.id):
                if alert.reason == "mention" and alert.subject == fact.member and fact.read_up_to >= alert.about_seq:
                    self._close(alert, "read", changes)
        return changes

    def presence(self, user: str, online: bool) -> Changes:
        """A user came online or went offline: riders holding open orders start or end ``rider_offline``."""
        changes = Changes()
        self._online[user] = online
        for order in self._rider_orders(user):
            if online:
                self._end(order.id, "rider_offline", "rider_back", changes, subject=user)
            else:
                self._start("rider_offline", order, changes, after=self.config.rider_offline_after,
                            subject=user, text=f"rider {user} of order {order.id} is offline")
        return changes

    def ack(self, alert_id: str, by: str | None) -> Changes:
        """Someone acknowledged the alert: closed, nobody is told again."""
        changes = Changes()
        alert = self.alerts.get(alert_id)
        if alert is not None:
            alert.acked_by = by
            self._close(alert, "acknowledged", changes)
        return changes

    def tick(self) -> Changes:
        """Open what is due, escalate what has been open too long, deliver and push what waited."""
        now = self.clock()
        changes = Changes()
        for alert in sorted(self.alerts.values(), key=lambda a: a.due_at):
            if alert.state == "pending" and alert.due_at <= now:
                self._open(alert, now, changes)
            elif (alert.state == "open" and alert.escalated_at is None and alert.opened_at is not None
                  and alert.opened_at + self.config.escalate_after <= now):
                self._escalate(alert, now, changes)
        for item in sorted(self.waiting.values(), key=lambda w: w.due_at):
            if item.due_at <= now:
                self._unwait(item.id, changes, keep=True)
                self._due(item, changes)
        return changes

    def ranked(self, alerts: Iterable[Alert] | None = None) -> list[Alert]:
        """By priority (urgent first), then age (oldest first): what `fishim alerts` shows at peak."""
        return rank(self.alerts.values() if alerts is None else alerts)

    # -- rules -----------------------------------------------------------------------------------

    def _on_status(self, fact: Fact, previous: OrderFacts | None, changes: Changes) -> None:
        order, state = fact.order, fact.state or fact.order.state
        cfg = self.config
        if state in CLOSED_STATES:
            for alert in list(self._order_alerts(order.id)):
                self._close(alert, "order_" + state, changes)
        if state != "packed":
            self._end(order.id, "unassigned_packed", "assigned" if state == "assigned" else "ended", changes)
        if state == "packed":
            self._start("unassigned_packed", order, changes, after=cfg.unassigned_packed_after, fact=fact,
                        text=f"order {order.id} is packed and has no rider")
        if state == "assigned":
            old_rider = previous.rider if previous is not None else None
            self._end(order.id, "pickup_overdue", "reassigned", changes)
            if old_rider and old_rider != order.rider:
                self._end(order.id, "rider_offline", "reassigned", changes, subject=old_rider)
            self._start("pickup_overdue", order, changes, after=cfg.pickup_overdue_after, fact=fact,
                        text=f"order {order.id}: rider {order.rider} has not picked it up")
            if order.rider and not self._is_online(order.rider):
                self._start("rider_offline", order, changes, after=cfg.rider_offline_after, subject=order.rider,
                            text=f"rider {order.rider} of order {order.id} is offline")
        elif state in ("picked_up", "delivering"):
            self._end(order.id, "pickup_overdue", "picked_up", changes)
        if state == "failed":
            self._start("delivery_failed", order, changes, after=cfg.delivery_failed_after, fact=fact,
                        text=f"order {order.id}: delivery failed")
        else:
            self._end(order.id, "delivery_failed", "ended", changes)
        if fact.eta is not None and state not in CLOSED_STATES:
            self._end(order.id, "order_late", "rescheduled", changes)
            self._start("order_late", order, changes, after=cfg.order_late_after, fact=fact,
                        start=max(fact.eta, self.clock()), text=f"order {order.id} is past its eta")
        if order.customer and fact.sender != order.customer and state != "placed":
            self._status_notice(fact, order.customer, state, changes)

    def _on_chat(self, fact: Fact, changes: Changes) -> None:
        order = fact.order
        role = self._role(fact.sender)
        if order.customer and fact.sender in (order.customer, tracking_user(order.id)):  # app or tracking link
            self._start("unanswered_customer", order, changes, after=self.config.unanswered_customer_after,
                        fact=fact, text=f"customer {order.customer} is waiting for an answer on order {order.id}")
        elif role in STAFF_ROLES:
            self._end(order.id, "unanswered_customer", "answered", changes)
        self._end(order.id, "mention", "replied", changes, subject=fact.sender)
        for user in dict.fromkeys(fact.mentions):
            if user != fact.sender:
                self._start("mention", order, changes, after=self.config.mention_after, fact=fact, subject=user,
                            text=f"{fact.sender} mentioned you on order {order.id}")

    # -- alert lifecycle -------------------------------------------------------------------------

    def _start(self, reason: str, order: OrderFacts, changes: Changes, *, after: int, text: str,
               fact: Fact | None = None, subject: str | None = None, start: int | None = None) -> None:
        """Begin a condition unless one is already live for this key: one alert per (order, reason)."""
        if self._by_key.get((order.id, reason, subject)) is not None:
            return
        if order.state in CLOSED_STATES:
            return
        now = self.clock()
        begin = now if start is None else start
        alert = Alert(id=f"al-{uuid.uuid4().hex[:12]}", order=order.id, reason=reason, subject=subject,
                      priority=PRIORITY[reason], started_at=now, due_at=begin + after,
                      actor=fact.sender if fact is not None else None,
                      about_seq=fact.order_seq if fact is not None else order.order_seq, text=text)
        self._index(alert)
        changes.alerts.append(alert)

    def _end(self, order_id: str, reason: str, why: str, changes: Changes, subject: str | None = None) -> None:
        alert_id = self._by_key.get((order_id, reason, subject))
        if alert_id is not None:
            self._close(self.alerts[alert_id], why, changes)

    def _close(self, alert: Alert, why: str, changes: Changes) -> None:
        alert.state, alert.closed_at, alert.close_reason = "closed", self.clock(), why
        self.alerts.pop(alert.id, None)
        self._by_key.pop(alert.key, None)
        self._by_order.get(alert.order, set()).discard(alert.id)
        for item_id in list(self._by_alert.get(alert.id, ())):
            self._unwait(item_id, changes)
        changes.alerts.append(alert)

    def _open(self, alert: Alert, now: int, changes: Changes) -> None:
        alert.state, alert.opened_at = "open", now
        order = self._order(alert.order)
        recipients = self._recipients(alert, order)
        for user in recipients:
            self._send(user, alert, alert.priority, alert.text, f"n-{alert.id}-{user}", changes)
        if alert.reason == "order_late" and order is not None and order.customer:
            self._send(order.customer, alert, "normal", f"order {order.id} is running late; sorry for the wait",
                       f"n-{alert.id}-{order.customer}", changes, reason="order_late")
        changes.alerts.append(alert)

    def _escalate(self, alert: Alert, now: int, changes: Changes) -> None:
        alert.escalated_at = now
        for user in self.directory.users_with_role("owner"):
            self._send(user, alert, "urgent", f"escalated: {alert.text}", f"n-{alert.id}-esc-{user}", changes)
        changes.alerts.append(alert)

    def _recipients(self, alert: Alert, order: OrderFacts | None) -> list[str]:
        if alert.reason == "mention":
            users = [alert.subject] if alert.subject else []
        else:
            users = self.directory.users_with_role("staff") or self.directory.users_with_role("owner")
            if alert.reason == "pickup_overdue" and order is not None and order.rider:
                users = [*users, order.rider]
        return list(dict.fromkeys(users))

    # -- notifications ---------------------------------------------------------------------------

    def _status_notice(self, fact: Fact, customer: str, state: str, changes: Changes) -> None:
        """Status changes reach the customer after ``status_after``; a newer one replaces one not yet sent."""
        now = self.clock()
        order = fact.order
        note = Notification(id=f"n-{order.id}-s{fact.order_seq}-{customer}", ts=now, sender=self.sender,
                            priority="normal", reason="status", order=order.id,
                            text=f"order {order.id} is {state.replace('_', ' ')}", alert=None)
        item = Outgoing(id=note.id, user=customer, kind="deliver", due_at=now + self.config.status_after,
                        notification=note, about_seq=fact.order_seq, since=now, key=f"status:{order.id}")
        old = self._waiting_keys.get(item.key or "")
        if old is not None:
            self._unwait(old, changes)
        self._wait(item)
        changes.outgoing.append(item)

    def _send(self, user: str, alert: Alert, priority: Priority, text: str, note_id: str, changes: Changes,
              reason: str | None = None) -> None:
        now = self.clock()
        note = Notification(id=note_id, ts=now, sender=self.sender, priority=priority, reason=reason or alert.reason,
                            order=alert.order, text=text, alert=alert.id)
        item = Outgoing(id=note_id, user=user, kind="deliver", due_at=now, notification=note,
                        about_seq=alert.about_seq, since=alert.started_at)
        self._due(item, changes)

    def _due(self, item: Outgoing, changes: Changes) -> None:
        """A waiting item's time has come: deliver (or hold for quiet hours), or push, unless moot."""
        note = item.notification
        if self._moot(item):
            changes.dropped.append(item.id)
            return
        if item.kind == "push":
            changes.pushes.append(item)
            return
        quiet_end = self.quiet_until(item.user, self.clock())
        if quiet_end is not None and PRIORITY_RANK[note.priority] < PRIORITY_RANK["urgent"]:
            held = item.model_copy(update={"due_at": quiet_end})
            self._wait(held)
            changes.outgoing.append(held)
            return
        note = note.model_copy(update={"ts": self.clock()})
        changes.notifications.append((item.user, note))
        alert = self.alerts.get(note.alert or "")
        if alert is not None and item.user not in alert.recipients:
            alert.recipients.append(item.user)
        self._plan_pushes(item.user, note, item, changes)

    def _moot(self, item: Outgoing) -> bool:
        """Already read, or about an alert that closed meanwhile."""
        note = item.notification
        if note.alert is not None and note.alert not in self.alerts:
            return True
        return note.order is not None and self._has_read(note.order, item.user, item.about_seq, item.since)

    def _plan_pushes(self, user: str, note: Notification, item: Outgoing, changes: Changes) -> None:
        role = self._role(user)
        for index, target in enumerate(self.push):
            if PRIORITY_RANK[note.priority] < PRIORITY_RANK[target.min_priority]:
                continue
            if not ((target.users and user in target.users) or (target.roles and role in target.roles)):
                continue
            push = Outgoing(id=f"p-{note.id}-{index}", user=user, kind="push",
                            due_at=self.clock() + self.config.push_delay, notification=note,
                            about_seq=item.about_seq, since=item.since, target=index)
            self._wait(push)
            changes.outgoing.append(push)

    def quiet_until(self, user: str, now: int) -> int | None:
        """End of ``user``'s quiet hours (epoch ms) if ``now`` is inside them, else None."""
        span = self.config.quiet_hours.get(user)
        if span is None:
            return None
        start_text, end_text = span.split("-")
        start, end = time.fromisoformat(start_text), time.fromisoformat(end_text)
        local = datetime.fromtimestamp(now / 1000, self.tz).astimezone(self.tz)
        clock = local.time().replace(tzinfo=None)
        inside = start <= clock < end if start <= end else clock >= start or clock < end
        if not inside:
            return None
        end_at = local.replace(hour=end.hour, minute=end.minute, second=0, microsecond=0)
        if end_at <= local:
            end_at += timedelta(days=1)
        return int(end_at.timestamp() * 1000)

    # -- state -----------------------------------------------------------------------------------

    def _index(self, alert: Alert) -> None:
        self.alerts[alert.id] = alert
        self._by_key[alert.key] = alert.id
        self._by_order.setdefault(alert.order, set()).add(alert.id)

    def _wait(self, item: Outgoing) -> None:
        self.waiting[item.id] = item
        if item.key is not None:
            self._waiting_keys[item.key] = item.id
        if item.notification.alert is not None:
            self._by_alert.setdefault(item.notification.alert, set()).add(item.id)

    def _unwait(self, item_id: str, changes: Changes, keep: bool = False) -> None:
        item = self.waiting.pop(item_id, None)
        if item is None:
            return
        if item.key is not None and self._waiting_keys.get(item.key) == item_id:
            del self._waiting_keys[item.key]
        alert_id = item.notification.alert
        if alert_id is not None and alert_id in self._by_alert:
            self._by_alert[alert_id].discard(item_id)
            if not self._by_alert[alert_id]:
                del self._by_alert[alert_id]
        if not keep:
            changes.dropped.append(item_id)

    def _forget(self, order_id: str) -> None:
        if not self._by_order.get(order_id):
            self._by_order.pop(order_id, None)
        self._orders.pop(order_id, None)
        for key in [k for k in self._receipts if k[0] == order_id]:
            del self._receipts[key]

    def _order_alerts(self, order_id: str) -> list[Alert]:
        return [self.alerts[i] for i in self._by_order.get(order_id, ()) if i in self.alerts]

    def _order(self, order_id: str | None) -> OrderFacts | None:
        if order_id is None:
            return None
        return self._orders.get(order_id) or self.directory.order(order_id)

    def _rider_orders(self, rider: str) -> list[OrderFacts]:
        """Open orders the rider holds: what the engine saw, completed by the directory (cold start)."""
        found = {o.id: o for o in self.directory.rider_orders(rider)}
        for order in self._orders.values():
            if order.rider == rider:
                found[order.id] = order
        return [o for o in found.values() if o.rider == rider and o.state in RIDER_STATES]

    def _is_online(self, user: str) -> bool:
        known = self._online.get(user)
        return self.directory.online(user) if known is None else known

    def _role(self, user: str) -> str | None:
        return self.directory.role_of(user)

    def _has_read(self, order_id: str, user: str, about_seq: int, since: int) -> bool:
        mark = self._receipts.get((order_id, user)) or self.directory.receipt(order_id, user)
        return mark is not None and mark[0] >= about_seq and mark[1] >= since


def rank(alerts: Iterable[Alert]) -> list[Alert]:
    """Priority first (urgent, high, normal, low), then the oldest first."""
    return sorted(alerts, key=lambda a: (-PRIORITY_RANK[a.priority], a.opened_at or a.due_at, a.id))

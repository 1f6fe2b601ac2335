"""fishim.alerts: every rule with an injected clock.

For each reason the same five questions: it fires once (however often the clock ticks), escalates
once to the owner, closes when its condition ends (and then never fires), is not sent to someone who
already read what it is about, and waits out the recipient's quiet hours (below urgent).
Thresholds are the broker.yaml defaults unless a test says otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest

from fishim.alerts import AlertEngine, Changes, Fact, MemoryDirectory, OrderFacts
from fishim.config import AlertsConfig, PushTarget
from fishim.messages import Notification

T0 = int(datetime(2026, 11, 11, 12, 0, tzinfo=UTC).timestamp() * 1000)  # noon UTC: nobody's quiet hours
NIGHT = int(datetime(2026, 11, 11, 23, 0, tzinfo=UTC).timestamp() * 1000)
MORNING = int(datetime(2026, 11, 12, 7, 0, tzinfo=UTC).timestamp() * 1000)
S, M = 1000, 60_000
ROLES = {"boss": "owner", "staff1": "staff", "rider1": "rider", "cust1": "customer"}


@dataclass
class Shop:
    """One engine, one order ``o1`` (customer cust1), a clock the test moves, everything sent."""

    config: AlertsConfig = field(default_factory=AlertsConfig)
    push: list[PushTarget] = field(default_factory=list)
    now: int = T0
    sent: list[tuple[str, Notification]] = field(default_factory=list)
    changes: list[Changes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.directory = MemoryDirectory(ROLES)
        self.directory.present.update({"rider1", "staff1", "boss", "cust1"})
        self.engine = AlertEngine(self.config, self.directory, lambda: self.now, self.push, sender="fishim-bridge")
        self.order = OrderFacts(id="o1", state="placed", customer="cust1")
        self.directory.orders["o1"] = self.order

    def take(self, changes: Changes) -> Changes:
        self.sent.extend(changes.notifications)
        self.changes.append(changes)
        return changes

    def event(self, channel: str, sender: str, **body: object) -> int:
        """A committed event on o1 (the projection moved as the store would); returns its order seq."""
        self.order = self.order.model_copy(update={"order_seq": self.order.order_seq + 1})
        state = body.get("state")
        if isinstance(state, str):
            rider = body.get("rider", self.order.rider)
            self.order = self.order.model_copy(update={"state": state, "rider": rider})
        self.directory.orders["o1"] = self.order
        fact = Fact(order=self.order, order_seq=self.order.order_seq, channel=channel, sender=sender,
                    **body)  # type: ignore[arg-type]
        self.take(self.engine.observe(fact))
        return self.order.order_seq

    def status(self, state: str, sender: str = "staff1", **body: object) -> int:
        return self.event("status", sender, state=state, **body)

    def chat(self, sender: str, mentions: list[str] | None = None) -> int:
        return self.event("chat", sender, mentions=mentions or [])

    def read(self, member: str, upto: int | None = None) -> int:
        return self.event("receipts", member, member=member, read_up_to=upto or self.order.order_seq)

    def presence(self, user: str, online: bool) -> None:
        (self.directory.present.add if online else self.directory.present.discard)(user)
        self.take(self.engine.presence(user, online))

    def advance(self, ms: int, ticks: int = 3) -> None:
        """Move the clock in ``ticks`` steps, ticking after each (several ticks past a deadline)."""
        for _ in range(ticks):
            self.now += ms // ticks
            self.take(self.engine.tick())

    def to(self, user: str, reason: str | None = None) -> list[Notification]:
        return [n for u, n in self.sent if u == user and (reason is None or n.reason == reason)]

    def alerts(self, reason: str) -> list[str]:
        """Ids of every alert of this reason the engine ever reported."""
        return sorted({a.id for c in self.changes for a in c.alerts if a.reason == reason})

    def opened(self, reason: str) -> list[str]:
        """Ids of the alerts of this reason that opened (a condition that ended in time never does)."""
        return sorted({a.id for c in self.changes for a in c.alerts if a.reason == reason and a.opened_at})

    def live(self, reason: str) -> list[str]:
        return [a.id for a in self.engine.alerts.values() if a.reason == reason]

    def alert_state(self, reason: str) -> str:
        states = [a.state for c in self.changes for a in c.alerts if a.reason == reason]
        return states[-1]


def _packed(shop: Shop) -> None:
    shop.status("confirmed")
    shop.status("picking")
    shop.status("packed", sender="fishim-bridge")


def _assigned(shop: Shop) -> None:
    _packed(shop)
    shop.status("assigned", rider="rider1")


@dataclass
class Rule:
    """How to start and end one rule's condition, who hears first, how long it takes."""

    reason: str
    setup: Callable[[Shop], None]
    start: Callable[[Shop], None]
    end: Callable[[Shop], None]
    recipient: str
    after: Callable[[AlertsConfig], int]
    priority: str = "high"


RULES = [
    Rule("mention", lambda s: None, lambda s: s.chat("staff1", mentions=["rider1"]), lambda s: s.read("rider1"),
         "rider1", lambda c: c.mention_after),
    Rule("unanswered_customer", lambda s: None, lambda s: s.chat("cust1"), lambda s: s.chat("staff1"),
         "staff1", lambda c: c.unanswered_customer_after, priority="urgent"),
    Rule("unassigned_packed", lambda s: s.status("confirmed"), lambda s: s.status("packed", sender="fishim-bridge"),
         lambda s: s.status("assigned", rider="rider1"), "staff1", lambda c: c.unassigned_packed_after),
    Rule("pickup_overdue", _packed, lambda s: s.status("assigned", rider="rider1"),
         lambda s: s.status("picked_up", sender="rider1"), "staff1", lambda c: c.pickup_overdue_after),
    Rule("rider_offline", lambda s: (_assigned(s), s.status("picked_up", sender="rider1")),
         lambda s: s.presence("rider1", False), lambda s: s.presence("rider1", True), "staff1",
         lambda c: c.rider_offline_after),
    Rule("order_late", lambda s: (_assigned(s), s.status("picked_up", sender="rider1")),
         lambda s: s.status("delivering", sender="rider1", eta=s.now + 20 * M),
         lambda s: s.status("delivered", sender="rider1"), "staff1", lambda c: 20 * M + c.order_late_after),
    Rule("delivery_failed", lambda s: (_assigned(s), s.status("picked_up", sender="rider1"),
                                       s.status("delivering", sender="rider1")),
         lambda s: s.status("failed", sender="rider1"), lambda s: s.status("delivering", sender="rider1"),
         "staff1", lambda c: c.delivery_failed_after),
]
IDS = [r.reason for r in RULES]


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_fires_once_then_escalates_once_to_the_owner(rule: Rule) -> None:
    shop = Shop()
    rule.setup(shop)
    rule.start(shop)
    assert shop.to(rule.recipient, rule.reason) == [] or rule.after(shop.config) == 0
    shop.advance(rule.after(shop.config) + 2 * S)
    shop.advance(5 * M)  # ticking on past the deadline sends nothing more
    first = shop.to(rule.recipient, rule.reason)
    assert len(first) == 1
    assert first[0].priority == rule.priority and first[0].order == "o1" and first[0].alert is not None
    assert len(shop.opened(rule.reason)) == 1
    shop.advance(shop.config.escalate_after + 2 * S)
    shop.advance(shop.config.escalate_after * 2)
    escalated = [n for n in shop.to("boss", rule.reason) if n.text.startswith("escalated")]
    assert len(escalated) == 1 and escalated[0].priority == "urgent"
    assert escalated[0].alert == first[0].alert
    assert shop.opened(rule.reason) == shop.alerts(rule.reason) == [first[0].alert]  # one alert, all along


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_closes_when_the_condition_ends(rule: Rule) -> None:
    shop = Shop()
    rule.setup(shop)
    rule.start(shop)
    shop.advance(rule.after(shop.config) + 2 * S)
    assert shop.alert_state(rule.reason) == "open"
    rule.end(shop)
    assert shop.alert_state(rule.reason) == "closed"
    shop.advance(shop.config.escalate_after * 2)
    assert not [n for n in shop.to("boss", rule.reason) if n.text.startswith("escalated")]
    assert shop.live(rule.reason) == []


@pytest.mark.parametrize("rule", [r for r in RULES if r.after(AlertsConfig()) > 0], ids=lambda r: r.reason)
def test_ended_before_its_threshold_it_never_fires(rule: Rule) -> None:
    shop = Shop()
    rule.setup(shop)
    rule.start(shop)
    shop.advance(rule.after(shop.config) // 2, ticks=1)
    rule.end(shop)
    shop.advance(rule.after(shop.config) + shop.config.escalate_after * 2)
    assert shop.to(rule.recipient, rule.reason) == [] and shop.to("boss", rule.reason) == []
    assert shop.live(rule.reason) == [] and shop.opened(rule.reason) == []


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_not_sent_to_someone_who_already_read_it(rule: Rule) -> None:
    shop = Shop()
    rule.setup(shop)
    rule.start(shop)
    if rule.reason != "mention":  # for a mention, reading is the end of the condition itself
        shop.read(rule.recipient)
    else:
        shop.now += 1
        shop.read("rider1")
    shop.advance(rule.after(shop.config) + 2 * S)
    assert shop.to(rule.recipient, rule.reason) == []


def test_a_receipt_from_before_the_condition_does_not_count_as_read() -> None:
    shop = Shop()
    _assigned(shop)
    shop.status("picked_up", sender="rider1")
    shop.read("staff1")  # staff read everything, then the rider drops off
    shop.now += S
    shop.presence("rider1", False)
    shop.advance(shop.config.rider_offline_after + 2 * S)
    assert len(shop.to("staff1", "rider_offline")) == 1


@pytest.mark.parametrize("rule", RULES, ids=IDS)
def test_quiet_hours_hold_everything_below_urgent(rule: Rule) -> None:
    config = AlertsConfig(timezone="UTC", quiet_hours={rule.recipient: "22:00-07:00"})
    shop = Shop(config=config, now=NIGHT - rule.after(config) - 10 * S)
    rule.setup(shop)
    rule.start(shop)
    shop.advance(rule.after(config) + 20 * S)  # due at night
    held = shop.to(rule.recipient, rule.reason)
    if rule.priority == "urgent":
        assert len(held) == 1  # urgent goes through quiet hours
        return
    assert held == []
    shop.advance(MORNING - shop.now - 10 * S)
    assert shop.to(rule.recipient, rule.reason) == []
    shop.advance(20 * S)
    assert len(shop.to(rule.recipient, rule.reason)) == 1


def test_quiet_hours_never_hold_escalations() -> None:
    config = AlertsConfig(timezone="UTC", quiet_hours={"boss": "00:00-23:59"})
    shop = Shop(config=config)
    shop.status("confirmed")
    shop.status("packed", sender="fishim-bridge")
    shop.advance(config.unassigned_packed_after + 2 * S)
    shop.advance(config.escalate_after + 2 * S)
    assert [n.priority for n in shop.to("boss", "unassigned_packed")] == ["urgent"]


def test_a_held_notification_is_dropped_if_its_alert_closed_overnight() -> None:
    config = AlertsConfig(timezone="UTC", quiet_hours={"staff1": "22:00-07:00"})
    shop = Shop(config=config, now=NIGHT)
    shop.status("confirmed")
    shop.status("packed", sender="fishim-bridge")
    shop.advance(config.unassigned_packed_after + 2 * S)
    shop.status("assigned", rider="rider1")
    shop.advance(MORNING - shop.now + M)
    assert shop.to("staff1", "unassigned_packed") == []


def test_the_late_order_tells_its_customer_too() -> None:
    shop = Shop()
    _assigned(shop)
    shop.status("picked_up", sender="rider1", eta=shop.now + 10 * M)
    shop.advance(11 * M)
    late = shop.to("cust1", "order_late")
    assert len(late) == 1 and late[0].priority == "normal" and "running late" in late[0].text


def test_a_new_eta_reschedules_instead_of_raising_a_second_alert() -> None:
    shop = Shop()
    _assigned(shop)
    shop.status("picked_up", sender="rider1", eta=shop.now + 10 * M)
    shop.advance(5 * M)
    shop.status("delivering", sender="rider1", eta=shop.now + 30 * M)
    shop.advance(10 * M)
    assert shop.to("staff1", "order_late") == []
    shop.advance(25 * M)
    assert len(shop.to("staff1", "order_late")) == 1


def test_the_rider_who_is_offline_holding_orders_raises_one_alert_per_order() -> None:
    shop = Shop()
    _assigned(shop)
    shop.presence("rider1", False)
    shop.presence("rider1", True)
    shop.presence("rider1", False)  # flapping keeps the one live alert
    shop.advance(shop.config.rider_offline_after + 2 * S)
    assert len(shop.opened("rider_offline")) == 1
    assert len(shop.to("staff1", "rider_offline")) == 1


def test_status_changes_reach_the_customer_once_coalesced_and_not_if_read() -> None:
    shop = Shop()
    shop.status("confirmed")
    shop.status("picking", sender="fishim-bridge")
    shop.status("packed", sender="fishim-bridge")  # three changes within status_after: one notice
    shop.advance(shop.config.status_after + 2 * S)
    shop.advance(M)
    notes = shop.to("cust1", "status")
    assert [n.text for n in notes] == ["order o1 is packed"] and notes[0].priority == "normal"
    shop.status("assigned", rider="rider1")
    shop.read("cust1")
    shop.advance(shop.config.status_after + 2 * S)
    assert len(shop.to("cust1", "status")) == 1  # read already: no notice for `assigned`


def test_status_notice_is_held_in_the_customers_quiet_hours() -> None:
    config = AlertsConfig(timezone="UTC", quiet_hours={"cust1": "22:00-07:00"})
    shop = Shop(config=config, now=NIGHT)
    shop.status("confirmed")
    shop.advance(config.status_after + 2 * S)
    assert shop.to("cust1", "status") == []
    shop.advance(MORNING - shop.now + 2 * S)
    assert len(shop.to("cust1", "status")) == 1


def test_nobody_is_told_what_they_just_did() -> None:
    shop = Shop()
    shop.chat("rider1", mentions=["rider1"])  # mentioning oneself
    shop.status("confirmed", sender="cust1")  # (not allowed by the order rules; the engine doesn't care)
    shop.advance(M)
    assert shop.to("rider1") == [] and shop.to("cust1", "status") == []


def test_acknowledged_alert_closes_and_is_never_escalated() -> None:
    shop = Shop()
    shop.chat("cust1")
    shop.advance(shop.config.unanswered_customer_after + 2 * S)
    alert_id = shop.to("staff1", "unanswered_customer")[0].alert
    assert alert_id is not None
    shop.take(shop.engine.ack(alert_id, "staff1"))
    assert shop.alert_state("unanswered_customer") == "closed"
    shop.advance(shop.config.escalate_after * 2)
    assert shop.to("boss") == []


def test_restart_keeps_deadlines() -> None:
    shop = Shop()
    shop.chat("cust1")
    saved = [a for c in shop.changes for a in c.alerts]
    later = Shop(now=shop.now)
    later.engine.restore(saved, [])
    later.advance(later.config.unanswered_customer_after + 2 * S)
    assert len(later.to("staff1", "unanswered_customer")) == 1
    later.chat("staff1")
    assert later.live("unanswered_customer") == []


def test_ranked_by_priority_then_age() -> None:
    shop = Shop()
    shop.status("confirmed")
    shop.status("packed", sender="fishim-bridge")
    shop.advance(shop.config.unassigned_packed_after + 2 * S)
    shop.chat("cust1")
    shop.advance(shop.config.unanswered_customer_after + 2 * S)
    assert [a.reason for a in shop.engine.ranked()] == ["unanswered_customer", "unassigned_packed"]


def test_push_is_planned_after_push_delay_and_dropped_once_read() -> None:
    target = PushTarget(url="json://127.0.0.1:9/x", roles=["staff"], min_priority="high")
    shop = Shop(push=[target])
    shop.chat("cust1")
    shop.advance(shop.config.unanswered_customer_after + 2 * S)
    pushes = [p for c in shop.changes for p in c.pushes]
    assert pushes == []
    shop.advance(shop.config.push_delay + 2 * S)
    pushes = [p for c in shop.changes for p in c.pushes]
    assert [(p.user, p.notification.priority) for p in pushes] == [("staff1", "urgent")]
    # a second alert, read within push_delay: no push
    shop2 = Shop(push=[target])
    shop2.chat("cust1")
    shop2.advance(shop2.config.unanswered_customer_after + 2 * S)
    shop2.read("staff1")
    shop2.advance(shop2.config.push_delay + 2 * S)
    assert [p for c in shop2.changes for p in c.pushes] == []


def test_alerts_and_push_config_round_trip_and_name_the_bad_key(tmp_path: object) -> None:
    from pathlib import Path

    from fishim.config import Config, ConfigError, load_config

    config = Config.model_validate({"alerts": {"rider_offline_after": "90s", "push_backoff": 0.5,
                                               "quiet_hours": {"boss": "22:00-07:00"}},
                                    "push": [{"url": "json://127.0.0.1:9/x", "roles": ["owner"]}]})
    assert config.alerts.rider_offline_after == 90_000 and config.alerts.push_backoff == 500
    assert Config.model_validate(config.model_dump(mode="json")) == config  # as `fishim up` hands it on
    bad = Path(str(tmp_path)) / "broker.yaml"
    bad.write_text("alerts:\n  pickup_overdue_after: soon\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"alerts\.pickup_overdue_after: not a duration"):
        load_config(bad, env={})
    bad.write_text("push:\n  - {url: nonsense, roles: [owner]}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"push\.0\.url"):
        load_config(bad, env={})


def test_a_customer_writing_through_its_tracking_link_is_waiting_too() -> None:
    """The customer without an app chats as `t-{order}` (the tracking link's login): the same
    unanswered-customer alert to staff, closed when staff answer."""
    shop = Shop()
    shop.chat("t-o1")
    shop.advance(shop.config.unanswered_customer_after + 2 * S)
    assert len(shop.to("staff1", "unanswered_customer")) == 1
    shop.chat("staff1")
    assert shop.live("unanswered_customer") == []

#!/usr/bin/env python3
"""A peak day for the alert rules: 2,000 orders, 20 riders with outages, injected trouble.

The day is generated first, with every injected condition written down (the ground truth); then the
rules (:class:`fishim.alerts.AlertEngine`) are driven through it on a simulated clock: events are
fed in time order and the engine ticks every ``alerts.tick`` of simulated time, so 14 hours take a
few seconds. Each injected condition must raise exactly one alert and nothing else may raise one
(precision and recall 1.0), with no duplicates and at most one escalation per alert.

Injected: late pickups, unanswered customer chats, rider outages long enough to alert (every rider
also has short ones that must not), packed orders left without a rider, orders past their eta, and
failed deliveries. Normal traffic stays inside every threshold by a margin of at least a minute, so
the result does not depend on tick boundaries.

Usage::

    python scripts/peak_day.py                 # engine only, simulated clock (seconds)
    python scripts/peak_day.py --service DB    # through fishim.notify.AlertService on a real store
    python scripts/peak_day.py --json          # figures as JSON

``--service`` runs the same day through the alert service (alerts, deadlines and waiting deliveries
saved to SQLite as the broker does), still on the simulated clock: slower, same expected figures.
The simulated clock is simply the ``clock`` callable both take (``lambda: sim.now``).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fishim.alerts import AlertEngine, Changes, Fact, MemoryDirectory, OrderFacts
from fishim.config import AlertsConfig, Config

M = 60_000
DAY_START = int(datetime(2026, 11, 11, 8, 0, tzinfo=UTC).timestamp() * 1000)
DAY_HOURS = 14
STAFF = ("staff1", "staff2", "staff3")
OWNER = "boss"


@dataclass(order=True)
class Event:
    at: int
    n: int
    kind: str = field(compare=False)  # status | chat | receipts | presence
    order: str | None = field(compare=False, default=None)
    sender: str = field(compare=False, default="")
    body: dict[str, Any] = field(compare=False, default_factory=dict)


@dataclass
class Day:
    events: list[Event] = field(default_factory=list)
    expected: Counter[tuple[str, str]] = field(default_factory=Counter)  # (order, reason) -> alerts
    orders: int = 0
    outages: dict[str, int] = field(default_factory=lambda: Counter())  # long / short
    _n: itertools.count[int] = field(default_factory=itertools.count)

    def add(self, at: int, kind: str, order: str | None, sender: str, **body: Any) -> None:
        self.events.append(Event(at, next(self._n), kind, order, sender, body))


def generate(seed: int, orders: int, riders: int, config: AlertsConfig) -> Day:
    """The day's events and its ground truth. Riders work in trips of 3-5 orders, back to back."""
    rnd = random.Random(seed)
    day = Day()
    names = [f"rider{i:02d}" for i in range(riders)]
    clock = {r: DAY_START + rnd.randrange(0, 20 * M) for r in names}
    for rider in names:
        day.add(DAY_START - M, "presence", None, rider, online=True)
    number = 0
    while number < orders:
        rider = min(names, key=lambda r: clock[r])
        start = clock[rider]
        size = min(rnd.randint(3, 5), orders - number)
        trip = [f"o{number + i:04d}" for i in range(size)]
        number += size
        clock[rider] = _trip(day, rnd, config, rider, trip, start) + rnd.randrange(M, 5 * M)
        if rnd.random() < 0.3:  # a short outage between trips: holds nothing, never alerts
            off = clock[rider]
            _outage(day, rider, off, rnd.randrange(M, config.rider_offline_after - M), long=False)
            clock[rider] = off + config.rider_offline_after
    day.orders = number
    return day


def _trip(day: Day, rnd: random.Random, cfg: AlertsConfig, rider: str, trip: list[str], start: int) -> int:
    """One trip from ``start`` (assignment); returns when the last order is delivered."""
    picked = start
    for order in trip:
        customer = f"cust{rnd.randrange(600):03d}"
        placed = start - rnd.randrange(28 * M, 45 * M)  # packed (at most 25 min before start) after picking
        day.add(placed, "status", order, "shop", state="placed", customer=customer)
        day.add(placed + M, "status", order, "staff1", state="confirmed")
        day.add(placed + 2 * M, "status", order, "fishim-bridge", state="picking")
        left_alone = rnd.random() < 0.02
        packed = start - (rnd.randrange(cfg.unassigned_packed_after + M, cfg.unassigned_packed_after + 15 * M)
                          if left_alone else rnd.randrange(M, cfg.unassigned_packed_after - M))
        day.add(packed, "status", order, "fishim-bridge", state="packed")
        if left_alone:
            day.expected[(order, "unassigned_packed")] += 1
        late_eta = rnd.random() < 0.02
        eta = start + (10 * M if late_eta else 180 * M)
        day.add(start, "status", order, "staff2", state="assigned", rider=rider, eta=eta)
        if late_eta:
            day.expected[(order, "order_late")] += 1
        _chat(day, rnd, cfg, order, customer, placed)
        late_pickup = rnd.random() < 0.04
        pickup = start + (rnd.randrange(cfg.pickup_overdue_after + M, cfg.pickup_overdue_after + 15 * M)
                          if late_pickup else rnd.randrange(M, min(8 * M, cfg.pickup_overdue_after - M)))
        if late_pickup:
            day.expected[(order, "pickup_overdue")] += 1
        day.add(pickup, "status", order, rider, state="picked_up")
        picked = max(picked, pickup)
    at = picked + M
    for order in trip:
        day.add(at, "status", order, rider, state="delivering")
    at += M
    if rnd.random() < 0.5:  # an outage mid-trip, holding every order of the trip
        long = rnd.random() < 0.5
        span = (rnd.randrange(cfg.rider_offline_after + M, cfg.rider_offline_after + 15 * M) if long
                else rnd.randrange(M // 2, cfg.rider_offline_after - M))
        _outage(day, rider, at, span, long)
        if long:
            for order in trip:
                day.expected[(order, "rider_offline")] += 1
        at += span + M
    for order in trip:
        at += rnd.randrange(3 * M, 7 * M)
        if rnd.random() < 0.01:
            day.add(at, "status", order, rider, state="failed", note="nobody home")
            day.expected[(order, "delivery_failed")] += 1
            at += 3 * M
            day.add(at, "status", order, rider, state="delivering")
            at += 3 * M
        day.add(at, "status", order, rider, state="delivered")
    return at


def _chat(day: Day, rnd: random.Random, cfg: AlertsConfig, order: str, customer: str, placed: int) -> None:
    """Some customers ask something soon after ordering; staff answer in time, or (injected) not."""
    if rnd.random() > 0.35:
        return
    asked = placed + rnd.randrange(M, 4 * M)
    day.add(asked, "chat", order, customer)
    unanswered = rnd.random() < 0.08
    wait = (rnd.randrange(cfg.unanswered_customer_after + M, cfg.unanswered_customer_after + 6 * M) if unanswered
            else rnd.randrange(20_000, cfg.unanswered_customer_after - M))
    day.add(asked + wait, "chat", order, rnd.choice(STAFF))
    if unanswered:
        day.expected[(order, "unanswered_customer")] += 1


def _outage(day: Day, rider: str, at: int, span: int, long: bool) -> None:
    day.add(at, "presence", None, rider, online=False)
    day.add(at + span, "presence", None, rider, online=True)
    day.outages["long" if long else "short"] += 1


# -- the run -------------------------------------------------------------------------------------


class Sim:
    """Feeds the day's events to ``observe``/``presence`` in time order, ticking on the way."""

    def __init__(self, day: Day, directory: MemoryDirectory, tick_ms: int) -> None:
        self.day = day
        self.directory = directory
        self.tick_ms = tick_ms
        self.now = 0
        self.orders: dict[str, OrderFacts] = {}

    def fact(self, ev: Event) -> Fact | None:
        order = self.orders.get(ev.order or "")
        if ev.kind == "status":
            state = ev.body["state"]
            if order is None:
                order = OrderFacts(id=ev.order or "", state=state, customer=ev.body.get("customer"))
            order = order.model_copy(update={"state": state, "order_seq": order.order_seq + 1,
                                             "rider": ev.body.get("rider", order.rider)})
        elif order is not None:
            order = order.model_copy(update={"order_seq": order.order_seq + 1})
        if order is None:
            return None
        self.orders[order.id] = self.directory.orders[order.id] = order
        return Fact(order=order, order_seq=order.order_seq, channel=ev.kind, sender=ev.sender,
                    state=ev.body.get("state"), eta=ev.body.get("eta"))

    def run(self, observe: Any, presence: Any, tick: Any) -> None:
        heap = list(self.day.events)
        heapq.heapify(heap)
        self.now = heap[0].at
        end = max(e.at for e in heap) + 60 * M
        while self.now < end:
            while heap and heap[0].at <= self.now:
                ev = heapq.heappop(heap)
                if ev.kind == "presence":
                    (self.directory.present.add if ev.body["online"] else self.directory.present.discard)(ev.sender)
                    presence(ev.sender, ev.body["online"])
                else:
                    fact = self.fact(ev)
                    if fact is not None:
                        observe(fact)
            tick()
            self.now += self.tick_ms


def run(seed: int, orders: int, riders: int, service_db: Path | None) -> dict[str, Any]:
    config = AlertsConfig()
    day = generate(seed, orders, riders, config)
    roles = {OWNER: "owner", **{s: "staff" for s in STAFF}}
    directory = MemoryDirectory(roles)
    sim = Sim(day, directory, config.tick)
    changes: list[Changes] = []
    started = time.perf_counter()
    if service_db is None:
        engine = AlertEngine(config, directory, lambda: sim.now, sender="fishim-bridge")
        sim.run(lambda f: changes.append(engine.observe(f)), lambda u, o: changes.append(engine.presence(u, o)),
                lambda: changes.append(engine.tick()))
    else:
        changes = _through_service(sim, config, service_db)
    elapsed = time.perf_counter() - started
    return _figures(day, changes, elapsed, seed, config)


def _through_service(sim: Sim, config: AlertsConfig, db: Path) -> list[Changes]:
    """The same day through :class:`fishim.notify.AlertService` (real store, its own directory)."""
    from fishim.notify import AlertService
    from fishim.store import Store, UserRow

    with Store(db) as store:
        for name, role in sim.directory.roles.items():
            store.put_user(UserRow(name=name, role=role, password_hash="-", created_at=DAY_START))
    full = Config.model_validate({"store": {"path": str(db)}, "alerts": config.model_dump()})
    service = AlertService(full, lambda _u, _n: None, online=sim.directory.online, clock=lambda: sim.now,
                           run_thread=False)
    service.directory.order = sim.directory.order  # type: ignore[method-assign]  # orders live in the sim
    service.directory.rider_orders = sim.directory.rider_orders  # type: ignore[method-assign]
    service.directory.receipt = sim.directory.receipt  # type: ignore[method-assign]
    out: list[Changes] = []
    try:
        sim.run(lambda f: out.append(service.step([("fact", f)])),
                lambda u, o: out.append(service.step([("presence", (u, o))])),
                lambda: out.append(service.step()))
    finally:
        service.close()
    return out


def _figures(day: Day, changes: list[Changes], elapsed: float, seed: int, config: AlertsConfig) -> dict[str, Any]:
    opened: Counter[tuple[str, str]] = Counter()
    seen_open: set[str] = set()
    for change in changes:
        for alert in change.alerts:
            if alert.opened_at is not None and alert.id not in seen_open:
                seen_open.add(alert.id)
                opened[(alert.order or "", alert.reason)] += 1
    escalations = Counter(n.alert for c in changes for _u, n in c.notifications if n.id.startswith(f"n-{n.alert}-esc-"))
    notes = Counter(n.reason for c in changes for _u, n in c.notifications)
    true_pos = sum(min(opened[k], day.expected[k]) for k in day.expected)
    raised = sum(opened.values())
    expected = sum(day.expected.values())
    by_reason = {reason: {"expected": sum(v for (_o, r), v in day.expected.items() if r == reason),
                          "raised": sum(v for (_o, r), v in opened.items() if r == reason)}
                 for reason in sorted({r for _o, r in [*day.expected, *opened]})}
    return {
        "seed": seed, "orders": day.orders, "events": len(day.events), "outages": dict(day.outages),
        "expected_alerts": expected, "raised_alerts": raised,
        "precision": round(true_pos / raised, 4) if raised else 1.0,
        "recall": round(true_pos / expected, 4) if expected else 1.0,
        "duplicates": sum(n - 1 for n in opened.values() if n > 1),
        "unexpected": sorted(f"{o}:{r}" for (o, r), n in opened.items() if n > day.expected[(o, r)])[:20],
        "missed": sorted(f"{o}:{r}" for (o, r), n in day.expected.items() if opened[(o, r)] < n)[:20],
        "escalated_alerts": len(escalations), "escalated_more_than_once": sum(1 for n in escalations.values() if n > 1),
        "by_reason": by_reason, "notifications": dict(sorted(notes.items())),
        "simulated_hours": DAY_HOURS, "tick_ms": config.tick, "wall_s": round(elapsed, 2),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--riders", type=int, default=20)
    parser.add_argument("--service", metavar="DB", type=Path, nargs="?", const=Path("-"),
                        help="run through the alert service on this SQLite file ('-' or none: a temporary one)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    db = args.service
    with tempfile.TemporaryDirectory(prefix="fishim-peak-") as tmp:
        if db is not None and str(db) == "-":
            db = Path(tmp) / "peak.db"
        figures = run(args.seed, args.orders, args.riders, db)
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            print(f"{key:28} {value}")
    ok = figures["precision"] == 1.0 and figures["recall"] == 1.0 and figures["duplicates"] == 0 \
        and figures["escalated_more_than_once"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

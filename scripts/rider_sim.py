"""A small delivery day with bad coverage: do riders end up holding exactly their orders' events?

Starts its own fishim (embedded broker + bridge, free loopback port, temp store) unless ``--broker``
is given, creates accounts (shop staff, riders, scanners, customers; ``--anonymous`` skips them), then:

- the shop places and confirms orders, and assigns packed ones to riders;
- 1-3 scanners pick every item (the bridge moves the order to ``picking`` and ``packed`` itself);
- customers chat and send read receipts;
- each rider, a :class:`fishim.client.FishimClient` behind its own signal-loss
  :class:`~fishim.testing.proxy.Proxy`, picks up, delivers with location fixes, chats, and keeps
  losing signal: cuts (RST, sometimes refusing reconnects for a while), stalls, slow links, and now
  and then the app is killed and restarted from its cursor file (a new session).

Order states are driven from the store (what the bridge committed), so nothing depends on a message
having arrived anywhere else. At the end every proxy is restored, each rider syncs, and its delivered
events are compared with the store: every event of its orders, none twice, each order's events in
store order (none "late": shown after a later one of the same order), none of other orders (in
``--anonymous`` mode the broker lets everyone read everything live, so "foreign" is only reported).
Prints a tally and one JSON line; exit 1 if any rider is off. Bounded: ``--duration`` seconds of
traffic (default 35) plus at most ~12 s to settle and check, and ``--orders`` orders at most.

    python scripts/rider_sim.py --riders 5 --scanners 2 --orders 30 --duration 35
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo's fishim importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import itertools

from fishim.auth import add_user
from fishim.client import ClientEvent, FishimClient, FishimClientError
from fishim.config import split_bind
from fishim.store import OrderRow, Store
from fishim.testing.proxy import Proxy
from fishim.testing.stack import Stack

log = logging.getLogger("fishim.scripts.rider_sim")

SKUS = ["ROD-21", "REEL-3000", "LURE-7", "LINE-PE2", "HOOK-6"]
ACTION_TIMEOUT = 3.0  # PUBACK wait for one action; past it the message stays queued in paho
PENDING_RETRY_S = 15.0  # re-issue an action the store has not reflected after this long


@dataclass
class Rider:
    name: str
    password: str | None
    proxy: Proxy
    cursor_path: Path
    client: FishimClient | None = None
    events: list[ClientEvent] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    outages: Counter[str] = field(default_factory=Counter)
    syncs: int = 0
    restarts: int = 0

    def start(self, new_session: bool = False) -> None:
        self.client = FishimClient("127.0.0.1", self.proxy.port, self.name, self.password,
                                   cursor_path=self.cursor_path, on_event=self._on_event,
                                   clean_session=True if new_session else None, reconnect_delay=(1, 2),
                                   sync_timeout=8, sync_interval=5, publish_timeout=ACTION_TIMEOUT)
        self.client.connect(wait=False)
        self.client.subscribe_orders(wait=False)

    def stop(self) -> None:
        if self.client is not None:
            self.syncs += self.client.stats["syncs"]
            self.client.close()
            self.client = None

    def _on_event(self, event: ClientEvent) -> None:
        with self.lock:
            self.events.append(event)


class Sim:
    def __init__(self, args: argparse.Namespace, workdir: Path, host: str, port: int, db: Path,
                 passwords: dict[str, str | None]) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.db = db
        self.host, self.port = host, port
        self.passwords = passwords
        self.names = sorted(passwords)
        self.riders = [Rider(f"rider{i}", passwords[f"rider{i}"], Proxy(host, port).start(),
                             workdir / f"rider{i}.cursor") for i in range(1, args.riders + 1)]
        self.scanners = [self._client(f"scanner{i}") for i in range(1, args.scanners + 1)]
        self.customers = [self._client(f"cust{i}") for i in range(1, args.customers + 1)]
        self.shop = self._client("shop")
        self.store = Store(db, readonly=True)
        self.placed = 0
        self.pending: dict[str, tuple[str, float]] = {}  # order -> (what we asked for, when)
        self.tally: Counter[str] = Counter()
        self.stop = threading.Event()

    def _client(self, name: str) -> FishimClient:
        client = FishimClient(self.host, self.port, name, self.passwords[name], reconnect_delay=(1, 2))
        return client.connect()

    # -- actions ---------------------------------------------------------------------------------

    def _act(self, client: FishimClient, what: str, fn: Any, *args: Any, **kwargs: Any) -> bool:
        """One publish; False if it could not be confirmed now (it stays queued in paho)."""
        try:
            fn(*args, **kwargs)
        except (TimeoutError, FishimClientError) as exc:
            self.tally[f"{what}_unconfirmed"] += 1
            log.debug("%s by %s unconfirmed: %s", what, client.username, exc)
            return False
        self.tally[what] += 1
        return True

    def _ask(self, order: str, step: str) -> bool:
        """Should we issue ``step`` for ``order`` now (nothing pending, or pending too long)?"""
        pending = self.pending.get(order)
        return pending is None or pending[0] != step or time.monotonic() - pending[1] > PENDING_RETRY_S

    def _issued(self, order: str, step: str) -> None:
        self.pending[order] = (step, time.monotonic())

    def tick(self, placing: bool) -> None:
        rows = {o.id: o for o in self.store.list_orders(limit=10_000) if o.id.startswith("sim-")}
        open_orders = [o for o in rows.values() if o.state not in ("delivered", "cancelled")]
        if placing and self.placed < self.args.orders and len(open_orders) < self.args.concurrent:
            self._place()
        for order in open_orders:
            if self.pending.get(order.id, ("", 0.0))[0] == f"state:{order.state}":
                self.pending.pop(order.id)
            self._advance(order)
            self._chatter(order)

    def _place(self) -> None:
        self.placed += 1
        order = f"sim-{self.placed:03d}"
        items = [{"sku": sku, "qty": self.rng.randint(1, 2)} for sku in self.rng.sample(SKUS, self.rng.randint(1, 3))]
        customer = self.rng.choice(self.customers).username
        self._act(self.shop, "placed", self.shop.publish_status, order, "placed", customer=customer, items=items,
                  note="paid online")

    def _advance(self, order: OrderRow) -> None:
        state, oid = order.state, order.id
        rider = next((r for r in self.riders if r.name == order.rider), None)
        if state == "placed" and self._ask(oid, "confirm"):
            self._issued(oid, "confirm")
            self._act(self.shop, "confirmed", self.shop.publish_status, oid, "confirmed")
        elif state in ("confirmed", "picking") and self._ask(oid, f"pick:{sum(order.picked.values())}"):
            missing = [i["sku"] for i in order.items if order.picked.get(i["sku"], 0) < int(i.get("qty", 1))]
            if missing:
                self._issued(oid, f"pick:{sum(order.picked.values())}")
                scanner = self.rng.choice(self.scanners)
                self._act(scanner, "pick", scanner.publish_pick, oid, missing[0], 1, scanner=scanner.username,
                          bin=f"A{self.rng.randint(1, 9)}")
        elif state == "packed" and self._ask(oid, "assign"):
            self._issued(oid, "assign")
            chosen = self.rng.choice(self.riders).name
            self._act(self.shop, "assigned", self.shop.publish_status, oid, "assigned", rider=chosen)
        elif rider is not None and (client := rider.client) is not None and client.connected:
            self._ride(client, order)

    def _ride(self, client: FishimClient, order: OrderRow) -> None:
        oid = order.id
        nxt = {"assigned": "picked_up", "picked_up": "delivering", "failed": "delivering"}.get(order.state)
        if order.state == "delivering":
            fixes = sum(1 for _ in self.store.conn.execute(
                "SELECT 1 FROM events WHERE order_id=? AND channel='location'", (oid,)))
            if fixes < 4:
                self._act(client, "location", client.publish_location, oid, 30.27 + fixes / 500,
                          120.15 + self.rng.random() / 500, accuracy_m=8)
                return
            nxt = "delivered"
        if nxt is not None and self._ask(oid, f"state:{nxt}"):
            self._issued(oid, f"state:{nxt}")
            self._act(client, nxt, client.publish_status, oid, nxt)

    def _chatter(self, order: OrderRow) -> None:
        if order.customer and self.rng.random() < 0.08:
            customer = next(c for c in self.customers if c.username == order.customer)
            self._act(customer, "chat", customer.publish_chat, order.id, self.rng.choice(
                ["到哪了?", "Please ring twice", "Is the reel the 3000 size?", "谢谢!"]))
        if order.customer and self.rng.random() < 0.04:
            customer = next(c for c in self.customers if c.username == order.customer)
            read = self.store.get_order(order.id)
            if read is not None:
                self._act(customer, "receipt", customer.publish_receipt, order.id, read.order_seq)
        rider = next((r for r in self.riders if r.name == order.rider), None)
        client = rider.client if rider is not None else None
        if client is not None and client.connected and self.rng.random() < 0.05:
            self._act(client, "chat", client.publish_chat, order.id, "On my way, lift is slow")

    # -- signal loss -----------------------------------------------------------------------------

    def weather(self) -> None:
        """Random signal loss per rider, until stopped."""
        while not self.stop.wait(self.rng.uniform(0.3, 1.2)):
            rider = self.rng.choice(self.riders)
            kind = self.rng.choices(["cut", "tunnel", "stall", "slow", "kill"], [4, 3, 2, 2, 1])[0]
            rider.outages[kind] += 1
            try:
                if kind == "cut":
                    rider.proxy.cut()
                elif kind == "tunnel":
                    rider.proxy.cut(refuse=True)
                    self.stop.wait(self.rng.uniform(0.5, 3.0))
                    rider.proxy.restore()
                elif kind == "stall":
                    rider.proxy.stall()
                    self.stop.wait(self.rng.uniform(0.5, 2.0))
                    rider.proxy.restore()
                elif kind == "slow":
                    rider.proxy.slow(bytes_per_s=self.rng.choice([2_000, 20_000]), delay_ms=200)
                    self.stop.wait(self.rng.uniform(1.0, 3.0))
                    rider.proxy.restore()
                else:  # the OS killed the app: new session, same cursor file
                    rider.stop()
                    rider.restarts += 1
                    rider.start(new_session=True)
            except (TimeoutError, RuntimeError) as exc:
                log.warning("weather %s on %s failed: %s", kind, rider.name, exc)

    # -- the end ---------------------------------------------------------------------------------

    def settle(self, timeout: float) -> None:
        for rider in self.riders:
            rider.proxy.restore()
        deadline = time.monotonic() + timeout
        quiet_since, last = time.monotonic(), -1
        while time.monotonic() < deadline:  # the bridge has committed everything: the count stops moving
            count = self.store.count_events()
            if count != last:
                quiet_since, last = time.monotonic(), count
            elif time.monotonic() - quiet_since > 1.0:
                break
            time.sleep(0.2)
        for rider in self.riders:
            assert rider.client is not None
            try:
                rider.client.sync(timeout=max(1.0, deadline - time.monotonic()))
            except (TimeoutError, FishimClientError) as exc:
                log.error("%s did not sync at the end: %s", rider.name, exc)
        time.sleep(0.5)  # the dispatcher threads hand the last events to on_event

    def check(self) -> list[dict[str, Any]]:
        rows = []
        for rider in self.riders:
            mine = {o.id for o in self.store.list_orders(rider=rider.name, limit=10_000)}
            stored = self.store.events_since(0, mine, limit=10**7) if mine else []
            latest_fix = {e.order_id: e.id for e in stored if e.channel == "location"}
            # Location fixes may be collapsed in a replay (docs/sync.md): only the latest per order is owed.
            required = {e.id for e in stored if e.channel != "location" or latest_fix[e.order_id] == e.id}
            with rider.lock:
                got = list(rider.events)
            ids = [e.id for e in got]
            own = {e.id for e in got if e.order in mine}
            foreign = [e for e in got if e.order not in mine]
            seq_of = {e.id: e.seq for e in stored}
            late = 0
            for order in mine:  # deliveries of an order not in store order: a failure (the client orders them)
                seqs = [seq_of[e.id] for e in got if e.order == order and e.id in seq_of]
                late += sum(1 for a, b in itertools.pairwise(seqs) if b < a)
            rows.append({
                "rider": rider.name, "orders": len(mine), "owed": len(required), "delivered": len(own),
                "missing": len(required - own), "collapsed": len(seq_of) - len(own | required),
                "duplicates": len(ids) - len(set(ids)),
                "foreign": len(foreign), "out_of_order": late, "replayed": sum(1 for e in got if e.source == "replay"),
                "outages": dict(rider.outages), "restarts": rider.restarts,
                "syncs": rider.syncs + (rider.client.stats["syncs"] if rider.client else 0),
            })
        return rows

    def close(self) -> None:
        for rider in self.riders:
            rider.stop()
            rider.proxy.close()
        for client in [*self.scanners, *self.customers, self.shop]:
            client.close()
        self.store.close()


def accounts(args: argparse.Namespace) -> dict[str, str | None]:
    names = ["shop", *(f"rider{i}" for i in range(1, args.riders + 1)),
             *(f"scanner{i}" for i in range(1, args.scanners + 1)),
             *(f"cust{i}" for i in range(1, args.customers + 1))]
    if args.anonymous:
        return dict.fromkeys(names)
    return {name: secrets.token_urlsafe(12) for name in names}


def role(name: str) -> str:
    return {"shop": "staff", "rider": "rider", "scanner": "scanner", "cust": "customer"}[name.rstrip("0123456789")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--riders", type=int, default=5)
    parser.add_argument("--scanners", type=int, default=2, choices=[1, 2, 3])
    parser.add_argument("--customers", type=int, default=6)
    parser.add_argument("--orders", type=int, default=30, help="orders placed at most")
    parser.add_argument("--concurrent", type=int, default=10, help="open orders at a time")
    parser.add_argument("--duration", type=float, default=35.0, help="seconds of traffic (then settle ≤ 12 s)")
    parser.add_argument("--tick", type=float, default=0.15, help="seconds between shop/scanner/rider steps")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--anonymous", action="store_true", help="no accounts (anonymous loopback mode)")
    parser.add_argument("--broker", help="HOST:PORT of a running fishim (needs --db, its store)")
    parser.add_argument("--db", type=Path, help="the store of --broker")
    parser.add_argument("--broker-log", type=Path, help="save the broker's and bridge's log here")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.broker and not args.db:
        parser.error("--broker needs --db (the sim checks riders against the store)")
    started = time.monotonic()
    passwords = accounts(args)
    with tempfile.TemporaryDirectory(prefix="fishim-sim-") as tmp:
        workdir = Path(tmp)
        db = (args.db or workdir / "sim.db").resolve()
        if not args.anonymous:
            with Store(db) as store:
                for name, password in passwords.items():
                    add_user(store, name, role(name), password or "")
        stack = None
        if args.broker:
            host, port = split_bind(args.broker)
        else:
            stack = Stack(db, probe=("shop", passwords["shop"])).start()
            host, port = "127.0.0.1", stack.port
        sim = Sim(args, workdir, host, port, db, passwords)
        try:
            for rider in sim.riders:
                rider.start()
            weather = threading.Thread(target=sim.weather, name="weather", daemon=True)
            weather.start()
            end = time.monotonic() + args.duration
            while time.monotonic() < end:
                placing = time.monotonic() < end - min(10.0, args.duration / 3)  # leave time to finish
                sim.tick(placing)
                time.sleep(args.tick)
            sim.stop.set()
            weather.join(10)
            sim.settle(timeout=12.0)
            rows = sim.check()
            states = sim.store.orders_by_state()
            total_events = sim.store.count_events()
            for row in rows:
                if (row["missing"] or row["duplicates"] or row["out_of_order"]) and stack is not None:
                    lines = [ln for ln in stack.log_text().splitlines() if row["rider"] in ln]
                    print(f"--- fishim log lines about {row['rider']}:", *lines[-60:], sep="\n", file=sys.stderr)
        finally:
            sim.close()
            if stack is not None:
                if args.broker_log:
                    args.broker_log.write_text(stack.log_text(), encoding="utf-8")
                stack.close()
    ok = all(r["missing"] == 0 and r["duplicates"] == 0 and r["out_of_order"] == 0
             and (args.anonymous or r["foreign"] == 0) for r in rows)
    print(f"{'rider':<8} {'orders':>6} {'owed':>5} {'got':>5} {'miss':>4} {'coll':>4} {'dup':>3} {'foreign':>7} "
          f"{'late':>4} {'replay':>6} {'syncs':>5} {'restarts':>8}  outages")
    for r in rows:
        print(f"{r['rider']:<8} {r['orders']:>6} {r['owed']:>5} {r['delivered']:>5} {r['missing']:>4} "
              f"{r['collapsed']:>4} {r['duplicates']:>3} {r['foreign']:>7} {r['out_of_order']:>4} {r['replayed']:>6} "
              f"{r['syncs']:>5} {r['restarts']:>8}  {r['outages']}")
    summary = {"sim": "riders", "ok": ok, "seconds": round(time.monotonic() - started, 1), "orders": states,
               "events": total_events, "actions": dict(sim.tally), "riders": rows,
               "mode": "anonymous" if args.anonymous else "accounts"}
    print(json.dumps(summary))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

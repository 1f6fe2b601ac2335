"""Synthetic order histories written straight into a Store, through the real order rules.

The owner's CLI reads what the bridge wrote. Tests of the CLI and ``scripts/bench_cli.py`` need such
stores quickly and without a broker, so :class:`HistoryWriter` does what the bridge does for one
message (decode, :func:`fishim.orders.apply`, append the event, update the projection, receipts and
dead letters) in one transaction, with a caller-chosen clock. The real-bridge test in
``tests/test_cli.py`` checks the CLI against the bridge itself.
"""

from __future__ import annotations

import json
import random
from typing import Any

from fishim.messages import Receipt, Rejected, decode, peek_identity
from fishim.orders import apply, channel_of
from fishim.store import DeadLetter, NewEvent, Store, UserRow, now_ms
from fishim.topics import Topics

__all__ = ["PEOPLE", "HistoryWriter", "lifecycle"]

# The cast of generated histories; their accounts get an unusable password hash (nobody logs in).
PEOPLE = {"owner": "owner", "shop": "staff", "scan1": "scanner", "rider7": "rider", "rider8": "rider",
          "cust1": "customer", "cust2": "customer", "13812345678": "customer"}


class HistoryWriter:
    """Apply messages to a writable Store as the bridge would; returns the new seq or the refusal."""

    def __init__(self, store: Store, prefix: str = "fishim", service_user: str = "fishim-bridge",
                 people: dict[str, str] | None = None) -> None:
        self.store = store
        self.topics = Topics(prefix)
        self.service_user = service_user
        for name, role in (PEOPLE if people is None else people).items():
            if store.get_user(name) is None:
                store.put_user(UserRow(name=name, role=role, password_hash="!", created_at=now_ms()))

    # Directory protocol for fishim.orders.apply
    def role_of(self, user: str) -> str | None:
        row = self.store.get_user(user)
        return row.role if row else None

    def event_in_order(self, order_id: str, event_id: str) -> bool:
        return self.store.event_in_order(order_id, event_id)

    def receipt(self, order_id: str, member: str) -> int | None:
        return self.store.get_receipt(order_id, member)

    def publish(self, topic: str, body: dict[str, Any], at: int | None = None) -> int | Rejected:
        """Store one message received at ``at`` (epoch ms, default now); dead-letter it if refused."""
        at = now_ms() if at is None else at
        raw = json.dumps(body).encode()
        ref = self.topics.parse(topic)
        try:
            msg = decode(ref, raw, 64 * 1024)
            with self.store.transaction():
                order = self.store.get_order(ref.order or "")
                outcome = apply(order, ref, msg, 0, at, self, self.service_user)
                seq = self._append(topic, ref.order or "", msg.model_dump_json(exclude_none=True),
                                   channel_of(msg).value, msg.sender, msg.ts, outcome.order.order_seq, at)
                outcome.order.last_seq = seq
                if isinstance(msg, Receipt):
                    self.store.put_receipt(outcome.order.id, ref.leaf or msg.sender, msg.read_up_to)
                for follow in outcome.follow_ups:
                    outcome.order = apply(outcome.order, self.topics.parse(self.topics.status(outcome.order.id)),
                                          follow, 0, at, self, self.service_user).order
                    outcome.order.last_seq = self._append(
                        self.topics.status(outcome.order.id), outcome.order.id,
                        follow.model_dump_json(exclude_none=True), "status", follow.sender, follow.ts,
                        outcome.order.order_seq, at)
                self.store.put_order(outcome.order)
            return seq
        except Rejected as exc:
            ident, sender = peek_identity(raw)
            self.store.add_deadletter(DeadLetter(received_at=at, topic=topic, user=sender, msg_id=ident,
                                                 error=exc.code.value, detail=exc.detail, payload=raw))
            return exc

    def _append(self, topic: str, order_id: str, payload: str, channel: str, sender: str, ts: int,
                order_seq: int, at: int) -> int:
        retain = channel in ("status", "location", "receipts")
        seq = self.store.insert_event(NewEvent(id=json.loads(payload)["id"], order_id=order_id, channel=channel,
                                               topic=topic, sender=sender, ts=ts, payload=payload, retain=retain),
                                      order_seq, received_at=at)
        if seq is None:
            raise RuntimeError(f"duplicate event id in a generated history: {payload[:80]}")
        return seq


def lifecycle(writer: HistoryWriter, order_id: str, start: int, *, customer: str = "cust1",
              rider: str = "rider7", staff: str = "shop", scanner: str = "scan1", fixes: int = 5,
              until: str = "delivered", rng: random.Random | None = None) -> int:
    """Publish a realistic order from ``placed`` up to ``until``; one message per simulated 20 s.

    Returns the simulated time after the last message. Every message goes through the real rules,
    so an impossible history fails loudly here rather than producing a store the bridge never would.
    """
    rng = rng or random.Random(order_id)
    t = writer.topics
    clock = start
    n = 0

    def send(topic: str, sender: str, **body: Any) -> None:
        nonlocal clock, n
        n += 1
        result = writer.publish(topic, {"id": f"{order_id}-{n}", "ts": clock, "sender": sender, **body}, clock)
        if isinstance(result, Rejected):
            raise AssertionError(f"{topic}: {result}")
        clock += 20_000

    items: list[dict[str, Any]] = [{"sku": "ROD-21", "qty": 1, "name": "Carbon rod 2.1 m"},
             {"sku": "LURE-7", "qty": rng.randint(1, 3), "name": "Minnow lure 7 cm"}]
    order: list[str] = ["placed", "confirmed", "picking", "packed", "assigned", "picked_up", "delivering",
                        "delivered"]
    stop = order.index(until) if until in order else len(order) - 1
    send(t.status(order_id), staff, state="placed", customer=customer, items=items, note="paid online")
    if stop >= 1:
        send(t.status(order_id), staff, state="confirmed")
        send(t.chat(order_id, customer), customer, text=f"Can you add a spare leader? @{staff}",
             mentions=[staff])
    picks = [item["sku"] for item in items for _ in range(item["qty"])]
    for sku in picks[: 1 if stop == 2 else len(picks) if stop >= 3 else 0]:
        send(t.picks(order_id), scanner, sku=sku, qty=1, scanner=scanner, bin="A3")
    if stop >= 4:
        send(t.status(order_id), staff, state="assigned", rider=rider)
        send(t.receipts(order_id, customer), customer, read_up_to=_order_seq(writer, order_id))
    if stop >= 5:
        send(t.status(order_id), rider, state="picked_up")
    if stop >= 6:
        send(t.status(order_id), rider, state="delivering", eta="15 min")
        lat, lon = 31.2304, 121.4737
        for _ in range(fixes):
            lat, lon = lat + rng.uniform(-0.002, 0.002), lon + rng.uniform(-0.002, 0.002)
            send(t.location(order_id), rider, lat=round(lat, 5), lon=round(lon, 5), accuracy_m=8)
        send(t.chat(order_id, rider), rider, text="At the gate, photo of the parcel attached",
             media=[{"kind": "image", "sha256": "ab" * 32, "mime": "image/jpeg", "size": 48213}])
    if stop >= 7:
        send(t.status(order_id), rider, state="delivered")
        send(t.receipts(order_id, rider), rider, read_up_to=_order_seq(writer, order_id))
    return clock


def _order_seq(writer: HistoryWriter, order_id: str) -> int:
    order = writer.store.get_order(order_id)
    assert order is not None, f"order {order_id} was never placed"
    return order.order_seq

"""Orders as the unit of conversation: lifecycle, membership, pick gate, receipts, chat checks.

Pure rules: :func:`apply` takes the current projection of an order and one validated message and
returns the new projection (or raises :class:`~fishim.messages.Rejected`). The bridge calls it inside
the transaction that stores the event, so the projection and the log never disagree.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Protocol

from fishim.messages import (
    Chat,
    ErrorCode,
    Location,
    Message,
    OrderState,
    Pick,
    Receipt,
    Rejected,
    Status,
)
from fishim.store import OrderRow
from fishim.topics import Channel, TopicRef, tracking_user

S = OrderState
OPEN_STATES = frozenset(S) - {S.DELIVERED, S.CANCELLED}

# state -> states it may move to (docs/protocol.md, order states). `assigned -> assigned` re-sets the rider.
TRANSITIONS: dict[OrderState, frozenset[OrderState]] = {
    S.PLACED: frozenset({S.CONFIRMED, S.CANCELLED}),
    S.CONFIRMED: frozenset({S.PICKING, S.CANCELLED}),
    S.PICKING: frozenset({S.PACKED, S.CANCELLED}),
    S.PACKED: frozenset({S.ASSIGNED, S.CANCELLED}),
    S.ASSIGNED: frozenset({S.ASSIGNED, S.PICKED_UP, S.CANCELLED}),
    S.PICKED_UP: frozenset({S.DELIVERING, S.CANCELLED}),
    S.DELIVERING: frozenset({S.DELIVERED, S.FAILED, S.CANCELLED}),
    S.FAILED: frozenset({S.DELIVERING, S.CANCELLED}),
    S.DELIVERED: frozenset(),
    S.CANCELLED: frozenset(),
}

STAFF_ROLES = frozenset({"owner", "staff", "service"})
RIDER_STATES = frozenset({S.PICKED_UP, S.DELIVERING, S.DELIVERED, S.FAILED})
PICKABLE_STATES = frozenset({S.CONFIRMED, S.PICKING})
MAX_MEDIA_BYTES = 100 * 1024 * 1024


class Directory(Protocol):
    """What the rules need to know beyond the order itself (backed by the store)."""

    def role_of(self, user: str) -> str | None:
        """The user's role, or None when the user is unknown (anonymous loopback mode)."""

    def event_in_order(self, order_id: str, event_id: str) -> bool: ...

    def receipt(self, order_id: str, member: str) -> int | None: ...


@dataclass
class Outcome:
    """The order after the event, plus what the bridge must publish on the order's behalf."""

    order: OrderRow
    membership_changed: bool = False
    follow_ups: list[Status] = field(default_factory=list)


def transition_allowed(current: OrderState, new: OrderState) -> bool:
    return new in TRANSITIONS[current]


def members(order: OrderRow) -> set[str]:
    """Order-specific members; staff and owners read every order on top of these."""
    return {m for m in (order.customer, order.rider) if m}


def is_member(order: OrderRow, user: str, directory: Directory) -> bool:
    """The order's customer or rider, its tracking-link user (the customer without an app), or staff."""
    if user == order.customer or user == order.rider or user == tracking_user(order.id):
        return True
    role = directory.role_of(user)
    return role in STAFF_ROLES or role is None


def working_copy(order: OrderRow) -> OrderRow:
    """A copy :func:`apply` may update in place without touching ``order``.

    Shallow (a deep one was half the bridge's per-message cost): the rules only set scalars and
    replace ``last_location``; ``picked``, the one container the pick gate changes, gets its own dict.
    """
    return order.model_copy(update={"picked": dict(order.picked)})


def apply(order: OrderRow | None, ref: TopicRef, msg: Message, seq: int, now: int,
          directory: Directory, service_user: str = "fishim-bridge", *, in_place: bool = False) -> Outcome:
    """Check ``msg`` against ``order`` and return the updated projection; raise Rejected if refused.

    ``order`` is left as it is, unless ``in_place``: then it must be the caller's own
    :func:`working_copy` (the bridge makes one per order per batch) and is updated and returned as
    ``Outcome.order``. Every check runs before anything is changed, so a refusal leaves it intact.
    """
    if isinstance(msg, Status):
        return _apply_status(order, ref.order or "", msg, seq, now, directory, in_place)
    if order is None:
        raise Rejected(ErrorCode.UNKNOWN_ORDER, f"order {ref.order!r} does not exist (no 'placed' status yet)")
    updated = order if in_place else working_copy(order)
    outcome = Outcome(order=updated)
    match msg:
        case Chat():
            _check_chat(order, msg, directory)
        case Location():
            _check_location(order, msg, directory)
            updated.last_location = {"lat": msg.lat, "lon": msg.lon, "ts": msg.ts, "sender": msg.sender}
        case Pick():
            outcome.follow_ups = _apply_pick(updated, msg, now, service_user)
        case Receipt():
            _check_receipt(order, ref, msg, directory)
    updated.updated_at, updated.last_seq, updated.order_seq = now, seq, updated.order_seq + 1
    return outcome


def _apply_status(order: OrderRow | None, order_id: str, msg: Status, seq: int, now: int,
                  directory: Directory, in_place: bool) -> Outcome:
    role = directory.role_of(msg.sender)
    if order is None:
        if msg.state is not S.PLACED:
            raise Rejected(ErrorCode.UNKNOWN_ORDER, f"unknown order: first status must be 'placed', not "
                                                    f"{msg.state.value!r}")
        if not msg.customer or not msg.items:
            raise Rejected(ErrorCode.BAD_SCHEMA, "'placed' must carry 'customer' and non-empty 'items'")
        _require_staff(role, msg)
        new = OrderRow(id=order_id, state=S.PLACED.value, customer=msg.customer, items=[i.model_dump(exclude_none=True)
                       for i in msg.items], created_at=now, updated_at=now, last_seq=seq, order_seq=1)
        return Outcome(order=new, membership_changed=True)
    current = S(order.state)
    if not transition_allowed(current, msg.state):
        raise Rejected(ErrorCode.ILLEGAL_TRANSITION, f"order {order.id}: {current.value} -> {msg.state.value}"
                                                     f" is not allowed")
    if msg.state is S.ASSIGNED and not msg.rider:
        raise Rejected(ErrorCode.BAD_SCHEMA, "'assigned' must carry 'rider'")
    if msg.state in RIDER_STATES and role == "rider":
        if msg.sender != order.rider:
            raise Rejected(ErrorCode.FORBIDDEN, f"{msg.sender} is not the rider of order {order.id}")
    else:
        _require_staff(role, msg)
    changed = msg.state is S.ASSIGNED and msg.rider != order.rider
    updated = order if in_place else working_copy(order)
    updated.state, updated.updated_at, updated.last_seq = msg.state.value, now, seq
    updated.order_seq += 1
    if changed:
        updated.rider = msg.rider
    return Outcome(order=updated, membership_changed=changed)


def _require_staff(role: str | None, msg: Status) -> None:
    if role is not None and role not in STAFF_ROLES:
        raise Rejected(ErrorCode.FORBIDDEN, f"role {role} may not set state {msg.state.value!r}")


def _check_chat(order: OrderRow, msg: Chat, directory: Directory) -> None:
    if not is_member(order, msg.sender, directory):
        raise Rejected(ErrorCode.FORBIDDEN, f"{msg.sender} is not a member of order {order.id}")
    for name in msg.mentions or []:
        if name not in members(order) and directory.role_of(name) not in STAFF_ROLES:
            raise Rejected(ErrorCode.BAD_MENTION, f"mention {name!r} is not a member of order {order.id}")
    if msg.reply_to is not None and not directory.event_in_order(order.id, msg.reply_to):
        raise Rejected(ErrorCode.BAD_REPLY_TO, f"reply_to {msg.reply_to!r} is not a message of order {order.id}")
    for ref in msg.media or []:
        if ref.sha256 is None and ref.url is None:
            raise Rejected(ErrorCode.BAD_MEDIA, f"media {ref.kind} needs 'sha256' or 'url'")
        if ref.size is not None and ref.size > MAX_MEDIA_BYTES:
            raise Rejected(ErrorCode.BAD_MEDIA, f"media size {ref.size} over {MAX_MEDIA_BYTES} bytes")


def _check_location(order: OrderRow, msg: Location, directory: Directory) -> None:
    role = directory.role_of(msg.sender)
    if role == "rider" and msg.sender != order.rider:
        raise Rejected(ErrorCode.FORBIDDEN, f"{msg.sender} is not the rider of order {order.id}")
    if role is not None and role not in STAFF_ROLES | {"rider"}:
        raise Rejected(ErrorCode.FORBIDDEN, f"role {role} may not publish locations")


def _apply_pick(order: OrderRow, msg: Pick, now: int, service_user: str) -> list[Status]:
    """Count the pick (checks first); once every item is covered the order moves to ``packed`` on its own."""
    state = S(order.state)
    if state not in PICKABLE_STATES:
        raise Rejected(ErrorCode.ILLEGAL_TRANSITION, f"order {order.id} is {state.value}: no picks accepted")
    wanted = {item["sku"]: int(item.get("qty", 1)) for item in order.items}
    if msg.sku not in wanted:
        raise Rejected(ErrorCode.UNKNOWN_SKU, f"sku {msg.sku!r} is not an item of order {order.id}")
    have = order.picked.get(msg.sku, 0) + msg.qty
    if have > wanted[msg.sku]:
        raise Rejected(ErrorCode.OVER_PICK, f"sku {msg.sku}: {have} picked, order wants {wanted[msg.sku]}")
    order.picked[msg.sku] = have
    follow: list[Status] = []
    if state is S.CONFIRMED:
        follow.append(_auto(order.id, S.PICKING, now, service_user, "first pick scanned"))
    if all(order.picked.get(sku, 0) >= qty for sku, qty in wanted.items()):
        follow.append(_auto(order.id, S.PACKED, now, service_user, "all items picked"))
    return follow


def _auto(order_id: str, state: OrderState, now: int, sender: str, note: str) -> Status:
    return Status(id=f"auto-{order_id}-{state.value}-{uuid.uuid4().hex[:12]}", ts=now, sender=sender,
                  state=state, note=note)


def _check_receipt(order: OrderRow, ref: TopicRef, msg: Receipt, directory: Directory) -> None:
    if not is_member(order, msg.sender, directory):
        raise Rejected(ErrorCode.FORBIDDEN, f"{msg.sender} is not a member of order {order.id}")
    if msg.read_up_to > order.order_seq:
        raise Rejected(ErrorCode.BAD_SCHEMA, f"read_up_to {msg.read_up_to} is past the order's last event "
                                             f"{order.order_seq}")
    current = directory.receipt(order.id, ref.leaf or msg.sender)
    if current is not None and msg.read_up_to < current:
        raise Rejected(ErrorCode.RECEIPT_BACKWARDS, f"read_up_to {msg.read_up_to} is behind {current}")


def channel_of(msg: Message) -> Channel:
    return {Status: Channel.STATUS, Chat: Channel.CHAT, Location: Channel.LOCATION, Pick: Channel.PICKS,
            Receipt: Channel.RECEIPTS}[type(msg)]

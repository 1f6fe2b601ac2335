"""Order lifecycle, pick gate, receipts and chat rules (fishim.orders), checked without a broker.

The same rules run inside the bridge; tests/test_orders_mqtt.py drives them through real MQTT.
"""

import itertools
from dataclasses import dataclass, field

import pytest

from fishim.messages import Chat, ErrorCode, Location, OrderState, Pick, Receipt, Rejected, Status
from fishim.orders import Outcome, apply, working_copy
from fishim.store import OrderRow
from fishim.topics import Topics, parse

T = Topics()
S = OrderState


@dataclass
class Dir:
    roles: dict[str, str] = field(default_factory=lambda: {"shop": "staff", "boss": "owner", "r1": "rider",
                                                            "r2": "rider", "c1": "customer", "c2": "customer",
                                                            "scan": "scanner"})
    events: set[tuple[str, str]] = field(default_factory=set)
    marks: dict[tuple[str, str], int] = field(default_factory=dict)

    def role_of(self, user: str) -> str | None:
        return self.roles.get(user)

    def event_in_order(self, order_id: str, event_id: str) -> bool:
        return (order_id, event_id) in self.events

    def receipt(self, order_id: str, member: str) -> int | None:
        return self.marks.get((order_id, member))


def status(state: S, sender: str = "shop", **kw: object) -> Status:
    return Status(id=f"s-{state.value}", ts=1, sender=sender, state=state, **kw)


def placed(order_id: str = "o1", d: Dir | None = None) -> OrderRow:
    msg = status(S.PLACED, customer="c1", items=[{"sku": "rod", "qty": 1}, {"sku": "reel", "qty": 2}])
    return apply(None, parse(T.status(order_id)), msg, 1, 1, d or Dir()).order


def advance(order: OrderRow, *states: S, d: Dir | None = None, **kw: object) -> OrderRow:
    for i, state in enumerate(states):
        extra = {"rider": "r1"} if state is S.ASSIGNED else {}
        order = apply(order, parse(T.status(order.id)), status(state, **extra, **kw), 10 + i, 10 + i, d or Dir()).order
    return order


def test_placed_creates_the_order_with_its_customer() -> None:
    order = placed()
    assert (order.id, order.state, order.customer, order.order_seq) == ("o1", "placed", "c1", 1)


def test_happy_path_to_delivered() -> None:
    order = advance(placed(), S.CONFIRMED, S.PICKING, S.PACKED, S.ASSIGNED, S.PICKED_UP, S.DELIVERING,
                    S.FAILED, S.DELIVERING, S.DELIVERED)
    assert order.state == "delivered"
    assert order.rider == "r1"
    assert order.order_seq == 10


# The lifecycle as the contract words it, written out by hand (not read from fishim.orders):
# "placed -> confirmed -> picking -> packed -> assigned -> picked_up -> delivering -> delivered, plus
# cancelled (from any open state) and failed (a delivery attempt; back to delivering or on to
# cancelled). Other transitions are refused."
CHAIN = ["placed", "confirmed", "picking", "packed", "assigned", "picked_up", "delivering", "delivered"]
OPEN = [*CHAIN[:-1], "failed"]  # every state but the two final ones, delivered and cancelled
ALLOWED = (
    set(itertools.pairwise(CHAIN))
    | {(state, "cancelled") for state in OPEN}
    | {("delivering", "failed"), ("failed", "delivering")}
    # fishim's one addition, documented in docs/security.md and docs/sync.md: a new rider on an
    # assigned order (reassignment).
    | {("assigned", "assigned")}
)
STATES = [*CHAIN, "failed", "cancelled"]
ALL_PAIRS = [(a, b) for a in STATES for b in STATES]


def test_hand_written_states_are_the_models_states() -> None:
    assert sorted(STATES) == sorted(state.value for state in S)


@pytest.mark.parametrize(("current", "new"), ALL_PAIRS, ids=[f"{a}->{b}" for a, b in ALL_PAIRS])
def test_transition_table(current: str, new: str) -> None:
    """Every pair of states: allowed exactly when the lifecycle of docs/protocol.md says so."""
    order = placed().model_copy(update={"state": current, "rider": "r1"})
    msg = status(S(new), rider="r2") if new == "assigned" else status(S(new))
    if (current, new) in ALLOWED:
        assert apply(order, parse(T.status("o1")), msg, 5, 5, Dir()).order.state == new
    else:
        with pytest.raises(Rejected) as info:
            apply(order, parse(T.status("o1")), msg, 5, 5, Dir())
        assert info.value.code is ErrorCode.ILLEGAL_TRANSITION


def test_illegal_examples_from_the_issue() -> None:
    with pytest.raises(Rejected, match="placed -> delivered") as info:
        advance(placed(), S.DELIVERED)
    assert info.value.code is ErrorCode.ILLEGAL_TRANSITION
    done = advance(placed(), S.CONFIRMED, S.PICKING, S.PACKED, S.ASSIGNED, S.PICKED_UP, S.DELIVERING, S.DELIVERED)
    with pytest.raises(Rejected, match="delivered -> cancelled") as info:
        advance(done, S.CANCELLED)
    assert info.value.code is ErrorCode.ILLEGAL_TRANSITION
    packed = advance(placed(), S.CONFIRMED, S.PICKING, S.PACKED)
    with pytest.raises(Rejected, match="must carry 'rider'") as info:
        apply(packed, parse(T.status("o1")), status(S.ASSIGNED), 9, 9, Dir())
    assert info.value.code is ErrorCode.BAD_SCHEMA


def test_unknown_order_needs_placed_first() -> None:
    with pytest.raises(Rejected) as info:
        apply(None, parse(T.status("o9")), status(S.CONFIRMED), 1, 1, Dir())
    assert info.value.code is ErrorCode.UNKNOWN_ORDER
    with pytest.raises(Rejected) as info:
        apply(None, parse(T.chat("o9", "c1")), Chat(id="x", ts=1, sender="c1", text="hi"), 1, 1, Dir())
    assert info.value.code is ErrorCode.UNKNOWN_ORDER


def test_reassignment_changes_membership() -> None:
    order = advance(placed(), S.CONFIRMED, S.PICKING, S.PACKED, S.ASSIGNED)
    outcome = apply(order, parse(T.status("o1")), status(S.ASSIGNED, rider="r2"), 20, 20, Dir())
    assert outcome.membership_changed and outcome.order.rider == "r2"


def test_roles_on_status() -> None:
    order = advance(placed(), S.CONFIRMED, S.PICKING, S.PACKED, S.ASSIGNED)
    with pytest.raises(Rejected) as info:
        apply(order, parse(T.status("o1")), status(S.PICKED_UP, sender="r2"), 9, 9, Dir())
    assert info.value.code is ErrorCode.FORBIDDEN
    assert apply(order, parse(T.status("o1")), status(S.PICKED_UP, sender="r1"), 9, 9, Dir()).order.state == "picked_up"
    with pytest.raises(Rejected) as info:
        apply(order, parse(T.status("o1")), status(S.CANCELLED, sender="c1"), 9, 9, Dir())
    assert info.value.code is ErrorCode.FORBIDDEN


def pick(order: OrderRow, sku: str, qty: int) -> Outcome:
    return apply(order, parse(T.picks(order.id)), Pick(id=f"p-{sku}-{qty}", ts=1, sender="scan", sku=sku, qty=qty),
                 30, 30, Dir())


def test_pick_gate_moves_to_picking_then_packed() -> None:
    order = advance(placed(), S.CONFIRMED)
    first = pick(order, "rod", 1)
    assert [f.state for f in first.follow_ups] == [S.PICKING]
    order = advance(first.order, S.PICKING)
    second = pick(order, "reel", 1)
    assert second.follow_ups == []
    last = pick(second.order, "reel", 1)
    assert [f.state for f in last.follow_ups] == [S.PACKED]
    assert last.follow_ups[0].sender == "fishim-bridge"
    assert last.order.picked == {"rod": 1, "reel": 2}


@pytest.mark.parametrize(("sku", "qty", "code"), [("hook", 1, ErrorCode.UNKNOWN_SKU), ("reel", 3, ErrorCode.OVER_PICK)])
def test_bad_picks(sku: str, qty: int, code: ErrorCode) -> None:
    with pytest.raises(Rejected) as info:
        pick(advance(placed(), S.CONFIRMED), sku, qty)
    assert info.value.code is code


def test_picks_refused_before_confirmed_and_after_packed() -> None:
    with pytest.raises(Rejected) as info:
        pick(placed(), "rod", 1)
    assert info.value.code is ErrorCode.ILLEGAL_TRANSITION
    with pytest.raises(Rejected) as info:
        pick(advance(placed(), S.CONFIRMED, S.PICKING, S.PACKED), "rod", 1)
    assert info.value.code is ErrorCode.ILLEGAL_TRANSITION


def test_chat_rules() -> None:
    d = Dir(events={("o1", "m0")})
    order = placed(d=d)
    ref = parse(T.chat("o1", "c1"))
    ok = apply(order, ref, Chat(id="m1", ts=1, sender="c1", text="where?", mentions=["shop"], reply_to="m0"), 2, 2, d)
    assert ok.order.order_seq == 2
    cases = [
        (Chat(id="m2", ts=1, sender="c1", text="x", mentions=["c2"]), ErrorCode.BAD_MENTION),
        (Chat(id="m3", ts=1, sender="c1", text="x", reply_to="nope"), ErrorCode.BAD_REPLY_TO),
        (Chat(id="m4", ts=1, sender="c1", text="x", media=[{"kind": "image", "mime": "image/png"}]),
         ErrorCode.BAD_MEDIA),
        (Chat(id="m5", ts=1, sender="c2", text="x"), ErrorCode.FORBIDDEN),
    ]
    for msg, code in cases:
        with pytest.raises(Rejected) as info:
            apply(order, parse(T.chat("o1", msg.sender)), msg, 3, 3, d)
        assert info.value.code is code, msg


def test_location_only_from_the_assigned_rider() -> None:
    order = advance(placed(), S.CONFIRMED, S.PICKING, S.PACKED, S.ASSIGNED)
    fix = Location(id="l1", ts=5, sender="r1", lat=30.1, lon=120.2)
    assert apply(order, parse(T.location("o1")), fix, 9, 9, Dir()).order.last_location["lat"] == 30.1
    with pytest.raises(Rejected) as info:
        apply(order, parse(T.location("o1")), fix.model_copy(update={"sender": "r2"}), 9, 9, Dir())
    assert info.value.code is ErrorCode.FORBIDDEN


def test_receipts_never_move_backwards() -> None:
    d = Dir(marks={("o1", "c1"): 3})
    order = advance(placed(), S.CONFIRMED, S.PICKING, S.PACKED)
    ref = parse(T.receipts("o1", "c1"))
    apply(order, ref, Receipt(id="r1", ts=1, sender="c1", read_up_to=4), 9, 9, d)
    with pytest.raises(Rejected) as info:
        apply(order, ref, Receipt(id="r2", ts=1, sender="c1", read_up_to=2), 9, 9, d)
    assert info.value.code is ErrorCode.RECEIPT_BACKWARDS
    with pytest.raises(Rejected) as info:  # past the order's last event
        apply(order, ref, Receipt(id="r3", ts=1, sender="c1", read_up_to=99), 9, 9, d)
    assert info.value.code is ErrorCode.BAD_SCHEMA


def test_apply_leaves_the_order_alone_unless_in_place() -> None:
    order = advance(placed(), S.CONFIRMED)
    before = order.model_dump()
    ref = parse(T.picks("o1"))
    copied = apply(order, ref, Pick(id="p1", ts=1, sender="scan", sku="rod", qty=1), 5, 5, Dir()).order
    assert copied is not order and copied.picked == {"rod": 1} and order.model_dump() == before

    draft = working_copy(order)  # what the bridge holds for one batch
    with pytest.raises(Rejected) as info:
        apply(draft, ref, Pick(id="p2", ts=1, sender="scan", sku="reel", qty=3), 6, 6, Dir(), in_place=True)
    assert info.value.code is ErrorCode.OVER_PICK
    with pytest.raises(Rejected) as info:
        apply(draft, parse(T.status("o1")), status(S.DELIVERED), 6, 6, Dir(), in_place=True)
    assert info.value.code is ErrorCode.ILLEGAL_TRANSITION
    assert draft.model_dump() == before  # refusals change nothing

    for seq, qty in ((7, 1), (8, 1)):
        outcome = apply(draft, ref, Pick(id=f"p{seq}", ts=1, sender="scan", sku="reel", qty=qty), seq, seq, Dir(),
                        in_place=True)
        assert outcome.order is draft
    assert (draft.picked, draft.order_seq, draft.last_seq) == ({"reel": 2}, order.order_seq + 2, 8)
    with pytest.raises(Rejected) as info:  # the third reel sees the two before it
        apply(draft, ref, Pick(id="p9", ts=1, sender="scan", sku="reel", qty=1), 9, 9, Dir(), in_place=True)
    assert info.value.code is ErrorCode.OVER_PICK
    assert order.model_dump() == before

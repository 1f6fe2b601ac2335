"""The topic tree and payload contract (docs/protocol.md): parse, build, validate, refuse clearly."""

import json
from datetime import UTC, datetime

import pytest

from fishim.messages import (
    Chat,
    ErrorCode,
    Location,
    NearMiss,
    Rejected,
    Status,
    decode,
    near_misses,
    peek_identity,
)
from fishim.topics import Channel, TopicError, Topics, matches, parse

T = Topics("fishim")


@pytest.mark.parametrize(
    ("topic", "channel", "order", "leaf"),
    [
        ("fishim/orders/o-1/status", Channel.STATUS, "o-1", None),
        ("fishim/orders/o_1/chat/rider7", Channel.CHAT, "o_1", "rider7"),
        ("fishim/orders/O1/location", Channel.LOCATION, "O1", None),
        ("fishim/orders/O1/picks", Channel.PICKS, "O1", None),
        ("fishim/orders/O1/receipts/cust1", Channel.RECEIPTS, "O1", "cust1"),
    ],
)
def test_parse_order_topics(topic: str, channel: Channel, order: str, leaf: str | None) -> None:
    ref = parse(topic)
    assert (ref.channel, ref.order, ref.leaf) == (channel, order, leaf)
    assert T.order(order, channel, leaf) == topic


def test_parse_sync_and_errors() -> None:
    assert parse("fishim/sync/rider7/phone-1/request").channel is Channel.SYNC_REQUEST
    ref = parse("fishim/sync/rider7/phone-1/events")
    assert (ref.channel, ref.user, ref.client_id) == (Channel.SYNC_EVENTS, "rider7", "phone-1")
    assert parse("fishim/errors/rider7").user == "rider7"


@pytest.mark.parametrize(
    "topic",
    [
        "other/orders/o1/status",
        "fishim/orders/o1/unknown",
        "fishim/orders/o1/chat",
        "fishim/orders/o1/status/extra",
        "fishim/orders/bad name/status",
        "fishim/orders/" + "x" * 65 + "/status",
        "fishim/orders/o1/chat/bad.leaf",
        "fishim/sync/u/c",
    ],
)
def test_unknown_or_bad_topics_are_refused(topic: str) -> None:
    with pytest.raises(TopicError):
        parse(topic)


def test_prefix_is_configurable() -> None:
    assert parse("shop/a/orders/o1/status", "shop/a").order == "o1"
    assert Topics("shop/a").status("o1") == "shop/a/orders/o1/status"


@pytest.mark.parametrize(
    ("topic", "flt", "expected"),
    [
        ("fishim/orders/o1/status", "fishim/#", True),
        ("fishim/orders/o1/status", "fishim/orders/+/status", True),
        ("fishim/orders/o1/chat/a", "fishim/orders/+/status", False),
        ("fishim/orders/o1/chat/a", "fishim/orders/o1/chat/+", True),
        ("fishim/orders", "fishim/orders/#", True),
        ("$SYS/x", "#", False),
    ],
)
def test_matches(topic: str, flt: str, expected: bool) -> None:
    assert matches(topic, flt) is expected


def env(**fields: object) -> bytes:
    return json.dumps({"id": "m1", "ts": "2026-11-25T10:00:00+08:00", "sender": "cust1", **fields}).encode()


def test_decode_status_keeps_unknown_fields_and_normalises_ts() -> None:
    msg = decode(parse(T.status("o1")), env(state="placed", customer="cust1", items=[{"sku": "rod"}], x=1), 1000)
    assert isinstance(msg, Status)
    assert msg.ts == int(datetime(2026, 11, 25, 2, 0, tzinfo=UTC).timestamp() * 1000)
    assert msg.model_extra == {"x": 1}


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        (b"{not json", ErrorCode.BAD_JSON),
        (b"\xff\xfe", ErrorCode.BAD_JSON),
        (b"[1,2]", ErrorCode.BAD_JSON),
        (b"x" * 2000, ErrorCode.TOO_LARGE),
        (env(state="teleported"), ErrorCode.BAD_SCHEMA),
        (json.dumps({"ts": 1, "sender": "a", "state": "placed"}).encode(), ErrorCode.BAD_SCHEMA),
        (env(state="placed", ts="yesterday"), ErrorCode.BAD_SCHEMA),
        (env(state="placed", sender="bad name"), ErrorCode.BAD_SCHEMA),
        (b'{"id": "m\xff", "ts": 1, "sender": "cust1", "state": "placed"}', ErrorCode.BAD_JSON),
        (b"\xef\xbb\xbf" + env(state="placed"), ErrorCode.BAD_JSON),  # a BOM: stored, it would not parse back
        (b"null", ErrorCode.BAD_JSON),
        (env(state="placed", items=[1]), ErrorCode.BAD_SCHEMA),  # an object is wanted deeper down: the schema's
    ],
)
def test_decode_refuses_with_a_code(payload: bytes, code: ErrorCode) -> None:
    with pytest.raises(Rejected) as info:
        decode(parse(T.status("o1")), payload, 1000)
    assert info.value.code is code
    assert info.value.detail


def test_chat_leaf_must_match_sender() -> None:
    ok = decode(parse(T.chat("o1", "cust1")), env(text="hi"), 1000)
    assert isinstance(ok, Chat)
    with pytest.raises(Rejected) as info:
        decode(parse(T.chat("o1", "rider7")), env(text="hi"), 1000)
    assert info.value.code is ErrorCode.SENDER_MISMATCH


def test_peek_identity_for_error_routing() -> None:
    assert peek_identity(env(state="x")) == ("m1", "cust1")
    assert peek_identity(b"garbage") == (None, None)
    # an oversize or cut-off payload still names its id when the id came before the damage
    assert peek_identity(b'{"id": "big-1", "sender": "rider7", "text": "' + b"x" * 200_000) == ("big-1", "rider7")
    assert peek_identity(b'{"id": "c9", "text": oops}') == ("c9", None)
    assert peek_identity(b'{"items": [{"id": "nested"}], "id": "top"}') == ("top", None)


def test_near_misses_name_the_expected_field() -> None:
    loc = decode(parse(T.location("o1")), env(lat=1, lon=2, acc=6, battery=80), 1000)
    assert isinstance(loc, Location)
    assert near_misses(loc) == [NearMiss(field="acc", expected="accuracy_m")]
    assert loc.model_extra == {"acc": 6, "battery": 80}  # still kept
    status = decode(parse(T.status("o1")), env(state="placed", customer="c", eta_min=15,
                                                 items=[{"sku": "rod", "quantity": 2}]), 1000)
    assert {(m.field, m.expected) for m in near_misses(status)} == {("eta_min", "eta"), ("items.0.quantity", "qty")}
    both = decode(parse(T.status("o1")), env(state="confirmed", eta=10, eta_min=15), 1000)
    assert near_misses(both) == []  # the known field is set too: a deliberate extension


def test_schema_error_lists_every_problem() -> None:
    with pytest.raises(Rejected) as info:
        decode(parse(T.location("o1")), json.dumps({"ts": 1, "sender": "r", "lat": 91}).encode(), 1000)
    assert info.value.detail == ("id: Field required; lat: Input should be less than or equal to 90; "
                                 "lon: Field required")

"""Payload models: the envelope every channel shares, each channel's body, and sync/error messages.

:func:`decode` turns raw bytes on a parsed topic into a validated :class:`Message`, or raises
:class:`Rejected` with an error code and a detail the sender can read (docs/protocol.md, errors topic).
:func:`near_misses` lists the unknown fields of an accepted message that look like a typo of a known
one; the pipeline sends each as an ``unknown_field`` error while the message is still stored.
"""

from __future__ import annotations

import difflib
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveInt,
    StrictBool,
    StringConstraints,
    ValidationError,
    field_validator,
)

from fishim.topics import Channel, TopicRef

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
MessageId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class ErrorCode(StrEnum):
    """Codes carried in ``fishim/errors/{user}`` messages and dead-letter rows."""

    BAD_JSON = "bad_json"
    BAD_SCHEMA = "bad_schema"
    TOO_LARGE = "too_large"
    UNKNOWN_TOPIC = "unknown_topic"
    SENDER_MISMATCH = "sender_mismatch"
    FORBIDDEN = "forbidden"
    ILLEGAL_TRANSITION = "illegal_transition"
    UNKNOWN_ORDER = "unknown_order"
    UNKNOWN_SKU = "unknown_sku"
    OVER_PICK = "over_pick"
    BAD_REPLY_TO = "bad_reply_to"
    BAD_MEDIA = "bad_media"
    BAD_MENTION = "bad_mention"
    RECEIPT_BACKWARDS = "receipt_backwards"
    DUPLICATE_ID = "duplicate_id"
    CURSOR_AHEAD = "cursor_ahead"  # a sync cursor past the store's last seq: the store was reset
    UNKNOWN_FIELD = "unknown_field"  # a warning: the message was stored, but a field looks misspelt


class Rejected(Exception):
    """Input refused; carries what the sender is told."""

    def __init__(self, code: ErrorCode, detail: str) -> None:
        super().__init__(f"{code.value}: {detail}")
        self.code = code
        self.detail = detail


class OrderState(StrEnum):
    PLACED = "placed"
    CONFIRMED = "confirmed"
    PICKING = "picking"
    PACKED = "packed"
    ASSIGNED = "assigned"
    PICKED_UP = "picked_up"
    DELIVERING = "delivering"
    DELIVERED = "delivered"
    CANCELLED = "cancelled"
    FAILED = "failed"


class _Body(BaseModel):
    """Unknown fields are kept (docs/protocol.md), so clients can extend payloads."""

    model_config = ConfigDict(extra="allow")


class Envelope(_Body):
    id: MessageId
    ts: int
    sender: Name

    @field_validator("ts", mode="before")
    @classmethod
    def _ts_to_millis(cls, value: Any) -> int:
        """Accept RFC 3339 text or epoch milliseconds; store epoch milliseconds."""
        if type(value) is int:  # the usual case, first: this runs for every message
            return value
        if isinstance(value, bool):
            raise ValueError("ts must be RFC 3339 text or epoch milliseconds")
        if isinstance(value, int | float):
            return int(value)
        if isinstance(value, str):
            try:
                parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            except ValueError as exc:
                raise ValueError(f"ts is not RFC 3339: {value!r}") from exc
            if parsed.tzinfo is None:
                raise ValueError("ts needs a timezone offset")
            return int(parsed.timestamp() * 1000)
        raise ValueError("ts must be RFC 3339 text or epoch milliseconds")


class Item(_Body):
    sku: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    qty: PositiveInt = 1
    name: str | None = None


class Status(Envelope):
    state: OrderState
    note: str | None = Field(default=None, max_length=2000)
    eta: str | int | None = None
    rider: Name | None = None
    customer: Name | None = None
    items: list[Item] | None = None


class MediaRef(_Body):
    kind: Literal["image", "voice", "video", "file", "location"]
    sha256: Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")] | None = None
    url: Annotated[str, StringConstraints(max_length=2048)] | None = None
    mime: str | None = None
    size: NonNegativeInt | None = None


class Chat(Envelope):
    text: Annotated[str, StringConstraints(max_length=4000)]
    mentions: list[Name] | None = None
    media: list[MediaRef] | None = Field(default=None, max_length=10)
    reply_to: MessageId | None = None


class Location(Envelope):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    accuracy_m: float | None = Field(default=None, ge=0)
    speed_mps: float | None = Field(default=None, ge=0)
    heading: float | None = Field(default=None, ge=0, le=360)


class Pick(Envelope):
    sku: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    qty: PositiveInt
    scanner: Name | None = None
    bin: str | None = Field(default=None, max_length=64)


class Receipt(Envelope):
    read_up_to: NonNegativeInt


Message = Status | Chat | Location | Pick | Receipt

BODY_MODELS: dict[Channel, type[Message]] = {
    Channel.STATUS: Status,
    Channel.CHAT: Chat,
    Channel.LOCATION: Location,
    Channel.PICKS: Pick,
    Channel.RECEIPTS: Receipt,
}


class SyncRequest(_Body):
    """``{"since": N}``; envelope fields are welcome but not required on a request."""

    since: NonNegativeInt = 0
    orders: list[Name] | None = None
    id: MessageId | None = None
    sender: str | None = None  # if given, must be the topic's {user} (checked by the sync server)
    collapse: StrictBool = True  # false: every location fix, not only the latest per order


class SyncEvent(BaseModel):
    seq: int
    topic: str
    order_seq: int | None = None  # the event's place in its order, what read receipts count
    payload: dict[str, Any]


class SyncPage(BaseModel):
    """One message on ``fishim/sync/{user}/{client_id}/events``."""

    events: list[SyncEvent]
    next_since: int
    done: bool
    request_id: str | None = None
    collapsed: list[str] = Field(default_factory=list)
    page: int = 0  # index of this message within the reply, from 0: a gap means one was lost
    more: bool = False  # the reply stopped at the server's per-request bound: ask again from next_since


Priority = Literal["urgent", "high", "normal", "low"]
PRIORITY_RANK: dict[str, int] = {"urgent": 3, "high": 2, "normal": 1, "low": 0}


class Notification(BaseModel):
    """One message on ``{prefix}/notify/{user}``: something that person should know or act on.

    ``alert`` names the open alert it belongs to (``fishim alerts ack ID``), null for plain notices
    such as a status change sent to a customer.
    """

    model_config = ConfigDict(extra="allow")

    id: MessageId
    ts: int
    sender: Name
    priority: Priority
    reason: Annotated[str, StringConstraints(pattern=r"^[a-z_]{1,32}$")]
    order: Name | None = None
    text: Annotated[str, StringConstraints(max_length=2000)]
    alert: MessageId | None = None


class PresenceMessage(BaseModel):
    """The retained value of ``{prefix}/presence/{user}``."""

    user: Name
    state: Literal["online", "offline"]
    devices: NonNegativeInt
    since: int  # epoch ms of the last change of ``state``
    last_seen: int  # epoch ms the user was last connected (now, while online)


class ErrorMessage(BaseModel):
    """What a sender reads on ``fishim/errors/{user}``."""

    topic: str
    id: str | None = None
    error: ErrorCode
    detail: str
    ts: int | None = None


def parse_json(payload: bytes, max_payload: int) -> dict[str, Any]:
    """Bytes → JSON object, with size, UTF-8 and shape checks."""
    if len(payload) > max_payload:
        raise Rejected(ErrorCode.TOO_LARGE, f"payload is {len(payload)} bytes, limit {max_payload}")
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise Rejected(ErrorCode.BAD_JSON, f"payload is not UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Rejected(ErrorCode.BAD_JSON, f"payload must be a JSON object, got {type(data).__name__}")
    return data


def schema_error(exc: ValidationError) -> Rejected:
    """Every validation error of one message in one line, ``field: problem`` joined by ``; ``.

    All of them at once, so a developer fixes a payload in one round trip instead of one per field.
    """
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(payload)"
        problem = f"{where}: {err['msg'].removeprefix('Value error, ')}"
        if problem not in problems:
            problems.append(problem)
    return Rejected(ErrorCode.BAD_SCHEMA, "; ".join(problems))


def _json_error(exc: ValidationError) -> Rejected | None:
    """BAD_JSON when ``model_validate_json`` failed on the JSON itself rather than on the model."""
    err = exc.errors()[0]
    if err["type"] == "json_invalid":
        return Rejected(ErrorCode.BAD_JSON, f"payload is not UTF-8 JSON: {err['msg']}")
    if err["type"] == "model_type" and not err["loc"]:
        return Rejected(ErrorCode.BAD_JSON, f"payload must be a JSON object, got {type(err['input']).__name__}")
    return None


def decode(ref: TopicRef, payload: bytes, max_payload: int) -> Message:
    """Validate an order-channel payload; raise :class:`Rejected` if it is not acceptable.

    The same checks and codes as :func:`parse_json` then the model, in one pass: pydantic parses the
    bytes itself (UTF-8 included), with no intermediate dict.
    """
    model = BODY_MODELS.get(ref.channel)
    if model is None:
        raise Rejected(ErrorCode.UNKNOWN_TOPIC, f"no events are accepted on {ref.channel.value} topics")
    if len(payload) > max_payload:
        raise Rejected(ErrorCode.TOO_LARGE, f"payload is {len(payload)} bytes, limit {max_payload}")
    try:
        message = model.model_validate_json(payload)
    except ValidationError as exc:
        raise _json_error(exc) or schema_error(exc) from None
    if ref.leaf is not None and message.sender != ref.leaf:
        raise Rejected(
            ErrorCode.SENDER_MISMATCH, f"envelope sender {message.sender!r} does not match topic leaf {ref.leaf!r}"
        )
    return message


def decode_notification(payload: bytes, max_payload: int) -> Notification:
    """Validate a ``notify`` payload (fishim's own); :class:`Rejected` with the usual codes if bad."""
    if len(payload) > max_payload:
        raise Rejected(ErrorCode.TOO_LARGE, f"payload is {len(payload)} bytes, limit {max_payload}")
    try:
        return Notification.model_validate_json(payload)
    except ValidationError as exc:
        raise _json_error(exc) or schema_error(exc) from None


def peek_identity(payload: bytes) -> tuple[str | None, str | None]:
    """Best-effort envelope ``(id, sender)`` of a payload that failed validation, to address the error.

    Works on anything: bad JSON, a payload cut short (an oversize message the broker kept only the
    start of), or one far over the size limit. It reads the top-level object key by key and stops at
    the first thing it cannot read, so an ``id`` written before the damage is still found; values
    that are not names of at most 64 characters are ignored.
    """
    found = _top_level_strings(payload[:_PEEK_BYTES], ("id", "sender"))
    ident, sender = found.get("id"), found.get("sender")
    return (ident if ident and len(ident) <= 64 else None,
            sender if sender and len(sender) <= 64 else None)


def refusal(topic: str, code: ErrorCode, detail: str, payload: bytes | None = None,
            ts: int | None = None) -> ErrorMessage:
    """The ``errors`` message for a publish refused before it was decoded (ACL, size, topic).

    Carries the envelope ``id`` whenever ``payload`` has a readable one, so the app can match the
    refusal to what it sent.
    """
    ident = peek_identity(payload)[0] if payload else None
    return ErrorMessage(topic=topic, id=ident, error=code, detail=detail, ts=ts)


_PEEK_BYTES = 64 * 1024  # the envelope comes first in practice; never scan megabytes for it
_DECODER = json.JSONDecoder()
_SPACE = frozenset(" \t\r\n")


def _top_level_strings(payload: bytes, keys: tuple[str, ...]) -> dict[str, str]:
    """String values of ``keys`` in a JSON object's top level, read until the text stops parsing."""
    text = payload.decode("utf-8", errors="replace")
    found: dict[str, str] = {}
    pos = _skip(text, 0)
    if text[pos:pos + 1] != "{":
        return found
    pos += 1
    while len(found) < len(keys):
        try:
            pos = _skip(text, pos)
            key, pos = _DECODER.raw_decode(text, pos)
            pos = _skip(text, pos)
            if text[pos:pos + 1] != ":":
                break
            value, pos = _DECODER.raw_decode(text, _skip(text, pos + 1))
        except ValueError:
            break
        if key in keys and isinstance(value, str) and key not in found:
            found[key] = value
        pos = _skip(text, pos)
        if text[pos:pos + 1] != ",":
            break
        pos += 1
    return found


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _SPACE:
        pos += 1
    return pos


class NearMiss(BaseModel):
    """An unknown field that looks like a misspelt known one (``acc`` for ``accuracy_m``)."""

    field: str  # where it is, dotted for nested ones (``items.0.quantity``)
    expected: str  # the known field fishim expected there

    def rejected(self) -> Rejected:
        """As an ``unknown_field`` error; the message itself was stored, the field kept as given."""
        return Rejected(ErrorCode.UNKNOWN_FIELD, f"unknown field {self.field!r}: did you mean "
                                                 f"{self.expected!r}? (message stored; {self.field!r} kept as is)")


_NEAR_CUTOFF = 0.6  # difflib ratio: 'eta_min' vs 'eta' is 0.6, 'lng' vs 'lon' 0.67


def near_misses(message: BaseModel, _path: str = "") -> list[NearMiss]:
    """Unknown fields of a decoded message that are close to a known field the message does not set.

    Close means a difflib ratio of at least 0.6, or the shorter name (three letters or more) being
    an abbreviation of the longer: same first letter, its letters in order (``acc`` / ``accuracy_m``,
    ``qty`` / ``quantity``, ``eta`` / ``eta_min``). A field whose look-
    alike is already set is taken as a deliberate extension and not reported. Nested items and media
    references are checked too.
    """
    misses: list[NearMiss] = []
    known = [name for name in type(message).model_fields if name not in message.model_fields_set]
    for extra in message.model_extra or {}:
        expected = _closest(extra, known)
        if expected is not None:
            misses.append(NearMiss(field=_path + extra, expected=expected))
    for name in message.model_fields_set:
        value = getattr(message, name)
        children = value if isinstance(value, list) else [value]
        for index, child in enumerate(children):
            if isinstance(child, _Body):
                where = f"{_path}{name}.{index}." if isinstance(value, list) else f"{_path}{name}."
                misses.extend(near_misses(child, where))
    return misses


def _subsequence(short: str, long: str) -> bool:
    rest = iter(long)
    return all(char in rest for char in short)


def _closest(name: str, known: list[str]) -> str | None:
    lowered = name.lower()
    for candidate in known:
        short, long = sorted((lowered, candidate), key=len)
        if len(short) >= 3 and short[0] == long[0] and _subsequence(short, long):
            return candidate
    close = difflib.get_close_matches(lowered, known, n=1, cutoff=_NEAR_CUTOFF)
    return close[0] if close else None

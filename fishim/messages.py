"""Payload models: the envelope every channel shares, each channel's body, and sync/error messages.

:func:`decode` turns raw bytes on a parsed topic into a validated :class:`Message`, or raises
:class:`Rejected` with an error code and a detail the sender can read (DESIGN.md, errors topic).
"""

from __future__ import annotations

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
    """Unknown fields are kept (DESIGN.md), so clients can extend payloads."""

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

BODY_MODELS: dict[Channel, type[Envelope]] = {
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
    """The first validation error as one readable line."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(payload)"
    return Rejected(ErrorCode.BAD_SCHEMA, f"{where}: {err['msg']}")


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
    """Best-effort (id, sender) from a payload that failed validation, to address the error."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, ValueError):
        return None, None
    if not isinstance(data, dict):
        return None, None
    ident, sender = data.get("id"), data.get("sender")
    return (ident if isinstance(ident, str) and len(ident) <= 64 else None,
            sender if isinstance(sender, str) and len(sender) <= 64 else None)

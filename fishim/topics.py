"""The topic tree (docs/protocol.md): parse a topic into a typed reference, and build topics.

Every other module goes through here, so the prefix and the name rules live in one place.
"""

from __future__ import annotations

import re
from enum import StrEnum

from pydantic import BaseModel, ConfigDict

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class Channel(StrEnum):
    STATUS = "status"
    CHAT = "chat"
    LOCATION = "location"
    PICKS = "picks"
    RECEIPTS = "receipts"
    SYNC_REQUEST = "sync_request"
    SYNC_EVENTS = "sync_events"
    ERRORS = "errors"
    SYSTEM = "system"


ORDER_CHANNELS = frozenset({Channel.STATUS, Channel.CHAT, Channel.LOCATION, Channel.PICKS, Channel.RECEIPTS})
RETAINED_CHANNELS = frozenset({Channel.STATUS, Channel.LOCATION, Channel.RECEIPTS})
_LEAF_CHANNELS = frozenset({Channel.CHAT, Channel.RECEIPTS})


class TopicError(ValueError):
    """The topic is not part of fishim's tree; ``str()`` says why."""


class TopicRef(BaseModel):
    """A parsed fishim topic. ``leaf`` is the ``{sender}``/``{member}`` of chat and receipts."""

    model_config = ConfigDict(frozen=True)

    channel: Channel
    order: str | None = None
    leaf: str | None = None
    user: str | None = None
    client_id: str | None = None

    @property
    def retained(self) -> bool:
        return self.channel in RETAINED_CHANNELS


def is_name(value: str) -> bool:
    return bool(NAME_RE.match(value))


TRACKING_PREFIX = "t-"  # a tracking link logs in as user ``t-{order}``, the customer of that order alone


def tracking_user(order: str) -> str:
    return f"{TRACKING_PREFIX}{order}"


def order_of_tracking_user(username: str | None) -> str | None:
    """``t-o-17`` -> ``o-17``; None for any other name."""
    if not username or not username.startswith(TRACKING_PREFIX):
        return None
    order = username[len(TRACKING_PREFIX):]
    return order if is_name(order) else None


def parse(topic: str, prefix: str = "fishim") -> TopicRef:
    """Parse ``topic``; raise :class:`TopicError` for anything outside the tree."""
    head = prefix + "/"
    if not topic.startswith(head):
        raise TopicError(f"topic outside {prefix}/: {topic!r}")
    parts = topic[len(head) :].split("/")
    match parts:
        case ["orders", order, "status" | "location" | "picks" as ch]:
            ref = TopicRef(channel=Channel(ch), order=order)
        case ["orders", order, "chat" | "receipts" as ch, leaf]:
            ref = TopicRef(channel=Channel(ch), order=order, leaf=leaf)
        case ["sync", user, client_id, "request"]:
            ref = TopicRef(channel=Channel.SYNC_REQUEST, user=user, client_id=client_id)
        case ["sync", user, client_id, "events"]:
            ref = TopicRef(channel=Channel.SYNC_EVENTS, user=user, client_id=client_id)
        case ["errors", user]:
            ref = TopicRef(channel=Channel.ERRORS, user=user)
        case ["system", *rest] if rest and all(rest):
            return TopicRef(channel=Channel.SYSTEM)
        case _:
            raise TopicError(f"unknown topic: {topic!r}")
    for name in (ref.order, ref.leaf, ref.user, ref.client_id):
        if name is not None and not is_name(name):
            raise TopicError(f"bad name {name!r} in topic (1-64 of A-Z a-z 0-9 _ -)")
    return ref


class Topics:
    """Builds topics and subscription filters under one prefix."""

    def __init__(self, prefix: str = "fishim") -> None:
        self.prefix = prefix

    def parse(self, topic: str) -> TopicRef:
        return parse(topic, self.prefix)

    def order(self, order: str, channel: Channel | str, leaf: str | None = None) -> str:
        channel = Channel(channel)
        base = f"{self.prefix}/orders/{order}/{channel.value}"
        if channel in _LEAF_CHANNELS:
            if leaf is None:
                raise TopicError(f"{channel.value} topics need a sender/member leaf")
            return f"{base}/{leaf}"
        return base

    def status(self, order: str) -> str:
        return self.order(order, Channel.STATUS)

    def chat(self, order: str, sender: str) -> str:
        return self.order(order, Channel.CHAT, sender)

    def location(self, order: str) -> str:
        return self.order(order, Channel.LOCATION)

    def picks(self, order: str) -> str:
        return self.order(order, Channel.PICKS)

    def receipts(self, order: str, member: str) -> str:
        return self.order(order, Channel.RECEIPTS, member)

    def sync_request(self, user: str, client_id: str) -> str:
        return f"{self.prefix}/sync/{user}/{client_id}/request"

    def sync_events(self, user: str, client_id: str) -> str:
        return f"{self.prefix}/sync/{user}/{client_id}/events"

    def errors(self, user: str) -> str:
        return f"{self.prefix}/errors/{user}"

    @property
    def all_orders(self) -> str:
        return f"{self.prefix}/orders/#"

    def order_tree(self, order: str) -> str:
        return f"{self.prefix}/orders/{order}/#"

    @property
    def all_sync_requests(self) -> str:
        return f"{self.prefix}/sync/+/+/request"


def matches(topic: str, topic_filter: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest), ``$`` topics excluded from wildcards."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    if "+" not in topic_filter and "#" not in topic_filter:
        return topic == topic_filter
    t_parts = topic.split("/")
    f_parts = topic_filter.split("/")
    for i, level in enumerate(f_parts):
        if level == "#":
            return True
        if i >= len(t_parts) or (level != "+" and level != t_parts[i]):
            return False
    return len(t_parts) == len(f_parts)

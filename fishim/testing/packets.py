"""Raw MQTT 3.1.1 packet encoding: the one copy the tests and the benchmarks share.

Tests put hand-made (often deliberately broken) packets on a socket, and the benchmark's load
generator writes PUBLISH packets without a client library in the way; both build them here.
"""

from __future__ import annotations

import struct

from fishim.broker.wire import remaining_length

__all__ = ["connect", "packet", "publish", "string", "subscribe", "varint"]


def varint(n: int) -> bytes:
    """MQTT's variable-length integer (the fixed header's remaining length): the broker's encoder."""
    return remaining_length(n)


def string(value: str | bytes) -> bytes:
    """A length-prefixed UTF-8 string (bytes are taken as already encoded)."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack("!H", len(raw)) + raw


def packet(first_byte: int, body: bytes) -> bytes:
    """Fixed header (type/flags byte + remaining length) + body."""
    return bytes([first_byte]) + varint(len(body)) + body


def connect(client_id: str, *, clean: bool = True, keepalive: int = 0, level: int = 4,
            will: tuple[str, bytes] | None = None, username: str | None = None,
            password: str | None = None, flags_extra: int = 0) -> bytes:
    """CONNECT; ``level`` 4 is MQTT 3.1.1, ``flags_extra`` sets reserved or odd bits on purpose."""
    flags = (0x02 if clean else 0) | flags_extra
    payload = string(client_id)
    if will is not None:
        flags |= 0x04 | 0x08  # will, QoS 1
        payload += string(will[0]) + string(will[1])
    if username is not None:
        flags |= 0x80
        payload += string(username)
    if password is not None:
        flags |= 0x40
        payload += string(password)
    variable = string("MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive)
    return packet(0x10, variable + payload)


def publish(topic: str | bytes, payload: bytes, qos: int = 0, packet_id: int = 1, retain: bool = False) -> bytes:
    body = string(topic) + (struct.pack("!H", packet_id) if qos else b"") + payload
    return packet(0x30 | (qos << 1) | int(retain), body)


def subscribe(topic_filter: str | bytes, qos: int = 1, packet_id: int = 1) -> bytes:
    return packet(0x82, struct.pack("!H", packet_id) + string(topic_filter) + bytes([qos]))

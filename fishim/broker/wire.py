"""The wire guard: every byte a client sends is framed and checked here before amqtt parses it.

amqtt 0.12.1's parser trusts its input (see docs/broker.md): an invalid UTF-8 topic decodes to the
text ``"b'...'"`` (``codecs_amqtt.decode_string``), a wildcard in a PUBLISH topic raises half-way
through a packet and desynchronises the stream, an MQTT 5 CONNECT is misparsed, packet size is not
bounded and keepalive is never enforced. :class:`GuardedReader` sits between the socket and amqtt's
``ReaderAdapter`` API: it reads one whole packet, checks it against MQTT 3.1.1 and fishim's
``Limits``, and only then lets amqtt read it. A bad packet ends the stream (amqtt sees EOF), which
amqtt handles as an abrupt disconnect, so the will is published as MQTT 3.1.1 §3.1.2.5 asks when the
server closes a connection for a protocol error.
"""

from __future__ import annotations

import asyncio
import logging
import unicodedata
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from amqtt.adapters import ReaderAdapter

from fishim.config import Limits
from fishim.logs import kv

log = logging.getLogger("fishim.broker")

CONNECT_TIMEOUT = 10.0
"""Seconds a new connection gets to send its CONNECT (MQTT 3.1.1 §3.1 'reasonable amount of time')."""

# Packet types a client may send (MQTT 3.1.1 §2.2.1) and the fixed-header flags each must carry.
CONNECT, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 3, 4, 5, 6, 7
SUBSCRIBE, UNSUBSCRIBE, PINGREQ, DISCONNECT = 8, 10, 12, 14
_FLAGS = {PUBACK: 0, PUBREC: 0, PUBREL: 2, PUBCOMP: 0, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0}
_FIXED_LENGTH = {PUBACK: 2, PUBREC: 2, PUBREL: 2, PUBCOMP: 2, PINGREQ: 0, DISCONNECT: 0}
_MAX_CONTROL_PACKET = 256 * 1024  # SUBSCRIBE/UNSUBSCRIBE: many filters, but never megabytes

# CONNACK return codes (MQTT 3.1.1 §3.2.2.3).
UNACCEPTABLE_PROTOCOL = 0x01
IDENTIFIER_REJECTED = 0x02
SERVER_UNAVAILABLE = 0x03
BAD_CREDENTIALS = 0x04
NOT_AUTHORIZED = 0x05

class Violation(Exception):
    """A packet MQTT 3.1.1 calls malformed or a protocol violation: the connection is closed."""


_OVERSIZE_HEAD = 1024  # bytes of an oversize payload read to find its envelope id


class Oversize(Violation):
    """A PUBLISH whose payload is over ``limits.max_payload``; refused by closing the connection."""

    def __init__(self, topic: str, size: int, head: bytes = b"") -> None:
        super().__init__(f"payload of {size} bytes over the limit")
        self.topic = topic
        self.size = size
        self.head = head  # the payload's first bytes: enough to name the envelope id in the refusal


class ConnectRefused(Exception):
    """The first packet is not an acceptable CONNECT. ``return_code`` set: answer with that CONNACK.

    ``quiet``: nothing worth a warning (a port probe that connects and closes, or a connect timeout
    already logged by the watchdog).
    """

    def __init__(self, reason: str, return_code: int | None = None, quiet: bool = False) -> None:
        super().__init__(reason)
        self.return_code = return_code
        self.quiet = quiet


@dataclass(frozen=True)
class ConnectRequest:
    """A validated MQTT 3.1.1 CONNECT. The password is only handed to the authenticator."""

    client_id: str
    clean_session: bool
    keepalive: int
    will_topic: str | None
    will_message: bytes | None
    will_qos: int
    will_retain: bool
    username: str | None
    password: str | None = None

    def __repr__(self) -> str:  # never show the password, even in a debugger or a failed assert
        return f"ConnectRequest(client_id={self.client_id!r}, username={self.username!r}, ...)"


def _text(raw: bytes, what: str) -> str:
    """Decode an MQTT UTF-8 string strictly: invalid UTF-8 or U+0000 is malformed [MQTT-1.5.3-1/2]."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Violation(f"{what} is not valid UTF-8") from None
    if "\x00" in text:
        raise Violation(f"{what} contains U+0000")
    return text


def check_topic_name(topic: str, raw_length: int, limits: Limits) -> None:
    """A PUBLISH or will topic: non-empty, no wildcards, at most ``max_topic_length`` bytes."""
    if not topic:
        raise Violation("empty topic name")
    if raw_length > limits.max_topic_length:
        raise Violation(f"topic longer than {limits.max_topic_length} bytes")
    if "+" in topic or "#" in topic:
        raise Violation("wildcard in topic name")


class _Cursor:
    """Reads MQTT fields from one packet body; running off its end means the packet is malformed."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise Violation("packet shorter than its fields")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")

    def blob(self) -> bytes:
        return self.take(self.u16())

    def string(self, what: str) -> str:
        return _text(self.blob(), what)

    @property
    def at_end(self) -> bool:
        return self.pos == len(self.data)


def parse_connect(body: bytes, limits: Limits) -> ConnectRequest:
    """Validate a CONNECT body (MQTT 3.1.1 §3.1) or raise :class:`ConnectRefused`."""
    cur = _Cursor(body)
    try:
        name = cur.string("protocol name")
        level = cur.byte()
    except Violation as exc:
        raise ConnectRefused(str(exc)) from None
    if name not in ("MQTT", "MQIsdp"):
        raise ConnectRefused(f"unknown protocol name {name[:20]!r}")  # [MQTT-3.1.2-1]: close, no CONNACK
    if name != "MQTT" or level != 4:
        raise ConnectRefused(f"unsupported protocol level {level}", UNACCEPTABLE_PROTOCOL)  # [MQTT-3.1.2-2]
    try:
        return _connect_fields(cur, limits)
    except Violation as exc:
        raise ConnectRefused(str(exc)) from None


def _connect_fields(cur: _Cursor, limits: Limits) -> ConnectRequest:
    flags = cur.byte()
    keepalive = cur.u16()
    has_will, will_qos, will_retain = bool(flags & 0x04), (flags >> 3) & 0x03, bool(flags & 0x20)
    has_user, has_password = bool(flags & 0x80), bool(flags & 0x40)
    if flags & 0x01:
        raise Violation("reserved CONNECT flag set")  # [MQTT-3.1.2-3]
    if not has_will and (will_qos or will_retain):
        raise Violation("will QoS/retain without will flag")  # [MQTT-3.1.2-13/15]
    if will_qos == 3:
        raise Violation("will QoS 3")  # [MQTT-3.1.2-14]
    if has_password and not has_user:
        raise Violation("password without user name")  # [MQTT-3.1.2-22]
    client_id = cur.string("client id")
    will_topic = will_message = None
    if has_will:
        raw_topic = cur.blob()
        will_topic = _text(raw_topic, "will topic")
        check_topic_name(will_topic, len(raw_topic), limits)
        will_message = cur.blob()
        if len(will_message) > limits.max_payload:
            raise Violation("will message over max_payload")
    username = cur.string("user name") if has_user else None
    raw_password = cur.blob() if has_password else None
    if not cur.at_end:
        raise Violation("trailing bytes after CONNECT payload")
    clean = bool(flags & 0x02)
    client_id = _resolve_client_id(client_id, clean)
    return ConnectRequest(client_id, clean, keepalive, will_topic, will_message, will_qos, will_retain,
                          username, _password(raw_password))


MAX_CLIENT_ID = 128
_BAD_ID_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))  # control, format, separators


def _resolve_client_id(client_id: str, clean: bool) -> str:
    """Empty id: generated for a clean session, refused otherwise [MQTT-3.1.3-7/8].

    Any UTF-8 text is a valid id in MQTT 3.1.1, spaces included (Mosquitto takes them, and phones
    send device names). fishim refuses only what it cannot show safely in a log line or hold
    cheaply: control and format characters, line separators, and ids over
    :data:`MAX_CLIENT_ID` characters; CONNACK 0x02 (the server MAY restrict ids, §3.1.3.1), and the
    log line says which rule it broke.
    """
    if not client_id:
        if not clean:
            raise ConnectRefused("empty client id with clean_session=0", IDENTIFIER_REJECTED)
        return f"auto-{uuid.uuid4().hex}"
    if len(client_id) > MAX_CLIENT_ID:
        raise ConnectRefused(f"client id of {len(client_id)} characters, over {MAX_CLIENT_ID}", IDENTIFIER_REJECTED)
    bad = next((c for c in client_id if unicodedata.category(c) in _BAD_ID_CATEGORIES), None)
    if bad is not None:
        raise ConnectRefused(f"client id contains control character U+{ord(bad):04X}", IDENTIFIER_REJECTED)
    return client_id


def _password(raw: bytes | None) -> str | None:
    """MQTT passwords are binary; fishim's are text, so one that is not UTF-8 can never be right."""
    if raw is None:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConnectRefused("password is not UTF-8", BAD_CREDENTIALS) from None


class GuardedReader(ReaderAdapter):
    """amqtt's ``ReaderAdapter`` over a byte source, handing amqtt only whole, valid packets.

    ``recv`` returns the next chunk from the socket (b"" at EOF); ``abort`` drops the connection at
    once (used by the keepalive watchdog). After a violation, a timeout or EOF, every read returns
    b"", which amqtt treats as the connection closing.
    """

    def __init__(
        self,
        recv: Callable[[], Awaitable[bytes]],
        abort: Callable[[], None],
        limits: Limits,
        peer: str,
    ) -> None:
        self._recv = recv
        self._abort = abort
        self._limits = limits
        self._max_publish = limits.max_payload + limits.max_topic_length + 4
        self._inbox = bytearray()
        self._packet = b""
        self._header = b""
        self._pos = 0
        self._eof = False
        self._loop = asyncio.get_running_loop()
        self._last_packet = self._loop.time()
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.peer = peer
        self.client_id: str | None = None
        self.close_reason: str | None = None
        self.on_oversize: Callable[[str, int, bytes], None] | None = None
        self.finished = asyncio.Event()
        """Set by :meth:`close`: the broker is done with this connection (a takeover waits for it)."""
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._refilled = 0.0
        self.throttled = 0
        """PUBLISH packets this connection had to wait for (see :meth:`limit_publish_rate`)."""

    # -- amqtt's side ------------------------------------------------------------------------

    async def read(self, n: int = -1) -> bytes:
        """Serve amqtt's parser from the current packet, fetching and checking the next when done."""
        if self._pos >= len(self._packet) and not await self._next_packet():
            return b""
        end = len(self._packet) if n < 0 else self._pos + n
        chunk = self._packet[self._pos : end]
        self._pos += len(chunk)
        return chunk

    def feed_eof(self) -> None:
        self._eof = True

    # -- fishim's side ------------------------------------------------------------------------

    async def read_connect(self) -> ConnectRequest:
        """The first packet, which must be a CONNECT; watched by a CONNECT_TIMEOUT deadline."""
        self.watch(CONNECT_TIMEOUT)
        try:
            _ptype, _flags, body = await self._read_packet(first=True)
        except EOFError:
            raise ConnectRefused(self.close_reason or "closed before CONNECT", quiet=True) from None
        except Violation as exc:
            raise ConnectRefused(str(exc)) from None
        request = parse_connect(body, self._limits)
        self.client_id = request.client_id
        return request

    def limit_publish_rate(self, rate: float, burst: int) -> None:
        """At most ``rate`` PUBLISH and SUBSCRIBE packets a second on average, ``burst`` at once
        (0: no limit). SUBSCRIBE counts because each one makes the broker send retained messages.

        A token bucket checked before a PUBLISH is handed to amqtt: when it is empty, this
        connection's reader waits for the next token, so a flooder is slowed down by TCP
        back-pressure on its own socket while every other connection is served as usual.
        """
        self._rate, self._burst = rate, float(burst)
        self._tokens, self._refilled = float(burst), self._loop.time()

    async def _pace(self) -> None:
        """Take one token, waiting for it if the bucket is empty."""
        now = self._loop.time()
        self._tokens = min(self._burst, self._tokens + (now - self._refilled) * self._rate)
        self._refilled = now
        if self._tokens < 1.0:
            self.throttled += 1
            if self.throttled == 1:
                log.info("publish_throttled %s", kv(client_id=self.client_id, peer=self.peer,
                                                     rate=self._rate, burst=int(self._burst)))
            await asyncio.sleep((1.0 - self._tokens) / self._rate)
            self._tokens, self._refilled = 1.0, self._loop.time()
        self._tokens -= 1.0

    def watch(self, seconds: float | None) -> None:
        """Drop the connection once no packet has arrived for ``seconds`` (None: never).

        One timer per connection, re-armed lazily from the time of the last packet, so the hot path
        only stores a timestamp (amqtt's own per-read ``wait_for`` would cost a task per packet).
        """
        self._deadline = seconds
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if seconds:
            self._last_packet = self._loop.time()
            self._timer = self._loop.call_later(seconds, self._check_idle)

    def abort(self, reason: str) -> None:
        """Close the connection now; amqtt then sees EOF and runs its disconnect path."""
        if self.close_reason is None:
            self.close_reason = reason
        self._eof = True
        self.watch(None)
        self._abort()

    def close(self) -> None:
        """Stop the watchdog; the connection is over and torn down."""
        self._eof = True
        self.watch(None)
        self.finished.set()

    def _check_idle(self) -> None:
        self._timer = None
        if self._deadline is None or self._eof:
            return
        idle = self._loop.time() - self._last_packet
        if idle + 0.001 < self._deadline:
            self._timer = self._loop.call_later(self._deadline - idle, self._check_idle)
            return
        if self.client_id is None:
            log.info("connect_timeout %s", kv(peer=self.peer, waited=f"{idle:.1f}"))
            self.abort("connect_timeout")
        else:
            log.info("keepalive_timeout %s", kv(client_id=self.client_id, peer=self.peer, idle=f"{idle:.1f}"))
            self.abort("keepalive_timeout")

    async def _next_packet(self) -> bool:
        """Load the next valid packet for amqtt; False (and the connection closing) otherwise."""
        if self._eof:
            return False
        try:
            ptype, flags, body = await self._read_packet()
            self._check(ptype, flags, body)
            if self._rate and ptype in (PUBLISH, SUBSCRIBE):
                await self._pace()
        except EOFError:
            self._eof = True
            return False
        except Oversize as exc:
            log.warning("publish_refused %s", kv(client_id=self.client_id, peer=self.peer, topic=exc.topic,
                                                   reason="too_large", size=exc.size,
                                                   limit=self._limits.max_payload))
            if self.on_oversize is not None:
                self.on_oversize(exc.topic, exc.size, exc.head)
            self.abort("too_large")
            return False
        except Violation as exc:
            log.warning("protocol_violation %s", kv(client_id=self.client_id, peer=self.peer, reason=str(exc)))
            self.abort("protocol_violation")
            return False
        self._packet = self._header + body
        self._pos = 0
        return True

    async def _read_packet(self, first: bool = False) -> tuple[int, int, bytes]:
        """One packet's type, flags and body; type and size are checked before the body is read."""
        head = (await self._take(1))[0]
        ptype, flags = head >> 4, head & 0x0F
        if first and head != CONNECT << 4:
            raise Violation(f"first packet is type {ptype}, not CONNECT")  # [MQTT-3.1.0-1]
        if not first and ptype != PUBLISH and ptype not in _FLAGS:
            raise Violation(f"packet type {ptype} not allowed from a client after CONNECT")
        length, shift, header = 0, 0, bytearray([head])
        while True:
            byte = (await self._take(1))[0]
            header.append(byte)
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise Violation("remaining length over 4 bytes")
        if ptype == PUBLISH and length > self._max_publish:
            raise await self._oversize(length, flags)
        if ptype != PUBLISH and length > _MAX_CONTROL_PACKET + self._limits.max_payload:
            raise Violation(f"packet type {ptype} of {length} bytes")
        body = await self._take(length) if length else b""
        self._header = bytes(header)
        self._last_packet = self._loop.time()
        return ptype, flags, body

    async def _oversize(self, length: int, flags: int) -> Violation:
        """Name the topic of an oversize PUBLISH and keep the payload's first bytes (for the envelope
        id in the refusal), without reading the rest of it."""
        topic_length = int.from_bytes(await self._take(2), "big")
        if topic_length > self._limits.max_topic_length:
            return Violation(f"topic longer than {self._limits.max_topic_length} bytes")
        topic = _text(await self._take(topic_length), "topic")
        rest = length - 2 - topic_length
        packet_id = 2 if (flags >> 1) & 3 else 0
        head = await self._take(min(rest, packet_id + _OVERSIZE_HEAD))
        return Oversize(topic, rest - packet_id, head[packet_id:])

    async def _take(self, n: int) -> bytes:
        """Exactly ``n`` bytes from the socket, or EOFError."""
        while len(self._inbox) < n:
            if self._eof:
                raise EOFError
            try:
                chunk = await self._recv()
            except (OSError, asyncio.IncompleteReadError):
                chunk = b""
            if not chunk:
                self._eof = True
                raise EOFError
            self._inbox += chunk
        data = bytes(self._inbox[:n])
        del self._inbox[:n]
        return data

    def _check(self, ptype: int, flags: int, body: bytes) -> None:
        """MQTT 3.1.1 rules for each packet type a client may send after CONNECT."""
        if ptype == PUBLISH:
            self._check_publish(flags, body)
            return
        if flags != _FLAGS[ptype]:
            raise Violation(f"bad flags {flags:#x} on packet type {ptype}")  # [MQTT-2.2.2-2]
        if ptype in _FIXED_LENGTH:
            if len(body) != _FIXED_LENGTH[ptype]:
                raise Violation(f"packet type {ptype} with {len(body)} byte body")
            return
        self._check_filters(ptype, body)

    def _check_publish(self, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 0x03
        if qos == 3:
            raise Violation("PUBLISH with QoS 3")  # [MQTT-3.3.1-4]
        if qos == 0 and flags & 0x08:
            raise Violation("DUP set on a QoS 0 PUBLISH")  # [MQTT-3.3.1-2]
        cur = _Cursor(body)
        raw_topic = cur.blob()
        topic = _text(raw_topic, "topic")
        check_topic_name(topic, len(raw_topic), self._limits)
        if qos and cur.u16() == 0:
            raise Violation("packet identifier 0")  # [MQTT-2.3.1-1]
        size = len(body) - cur.pos
        if size > self._limits.max_payload:
            raise Oversize(topic, size)

    def _check_filters(self, ptype: int, body: bytes) -> None:
        """SUBSCRIBE / UNSUBSCRIBE: a packet id and at least one valid filter [MQTT-3.8.3-3]."""
        cur = _Cursor(body)
        if cur.u16() == 0:
            raise Violation("packet identifier 0")
        count = 0
        while not cur.at_end:
            raw = cur.blob()
            topic_filter = _text(raw, "topic filter")
            if not topic_filter:
                raise Violation("empty topic filter")  # [MQTT-4.7.3-1]
            if len(raw) > self._limits.max_topic_length:
                raise Violation(f"topic filter longer than {self._limits.max_topic_length} bytes")
            if ptype == SUBSCRIBE and cur.byte() > 2:
                raise Violation("bad requested QoS byte")  # [MQTT-3.8.3-4]
            count += 1
            if count > self._limits.max_filters_per_subscribe:
                raise Violation(f"more than {self._limits.max_filters_per_subscribe} topic filters in one packet")
        if not count:
            raise Violation("no topic filters")


def connack(session_present: bool, return_code: int) -> bytes:
    """A CONNACK packet (MQTT 3.1.1 §3.2)."""
    return bytes((0x20, 0x02, 1 if session_present and return_code == 0 else 0, return_code))


def suback(packet_id: int, return_codes: list[int]) -> bytes:
    """A SUBACK (MQTT 3.1.1 §3.9): one return code per filter, in the SUBSCRIBE's order."""
    body = packet_id.to_bytes(2, "big") + bytes(return_codes)
    return b"".join((bytes((0x90,)), remaining_length(len(body)), body))


def unsuback(packet_id: int) -> bytes:
    """An UNSUBACK (MQTT 3.1.1 §3.11)."""
    return b"\xb0\x02" + packet_id.to_bytes(2, "big")


def remaining_length(length: int) -> bytes:
    """MQTT 3.1.1 variable-length encoding of a packet's remaining length (§2.2.3)."""
    encoded = bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(encoded)


def encode_publish(topic: bytes, payload: bytes, qos: int, retain: bool, packet_id: int, dup: bool) -> bytes:
    """A PUBLISH packet, built directly: amqtt's PublishPacket objects cost more than the bytes."""
    head = 0x30 | (0x08 if dup else 0) | (qos << 1) | (1 if retain else 0)
    variable = len(topic).to_bytes(2, "big") + topic
    if qos:
        variable += packet_id.to_bytes(2, "big")
    length = len(variable) + len(payload)
    encoded = bytearray((head,))
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded.append(byte | 0x80 if length else byte)
        if not length:
            break
    return b"".join((encoded, variable, payload))

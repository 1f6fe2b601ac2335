"""Synchronous paho-mqtt helpers for integration tests: connect, collect, publish-and-wait.

Every integration test needs the same three things and gets them subtly wrong by hand: waiting for
CONNACK (and noticing a refusal), waiting for SUBACK before publishing (or the message is missed),
and waiting for PUBACK (or the test races the broker). These helpers do exactly that with paho-mqtt
2.x (callback API v2, MQTT 3.1.1) and nothing more::

    with connect_client(port, username="rider1", password="pw") as rider, \\
            Collector(rider, "fishim/orders/+/status") as inbox:
        publish_and_wait(staff, "fishim/orders/A1/status", {"id": "1", "state": "placed"})
        assert inbox.get().json()["state"] == "placed"

Clients run paho's network thread (``loop_start``) and reconnect on their own after an unexpected
disconnect (paho's behaviour, kept because a phone app does the same); ``close()`` / the context
manager always stops that thread. Don't replace ``on_connect``, ``on_disconnect`` or
``on_subscribe`` on these clients: the helpers rely on them. Use :meth:`MqttClient.wait_connected`
and :meth:`MqttClient.wait_disconnected` instead.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

__all__ = ["Collector", "Message", "MqttClient", "MqttError", "Will", "connect_client", "publish_and_wait"]

log = logging.getLogger("fishim.testing.mqtt")

Payload = bytes | str | Mapping[str, Any]


class MqttError(RuntimeError):
    """The broker refused something (CONNACK, SUBACK) or paho could not send."""


class Will(NamedTuple):
    """Last-will message the broker publishes when the client vanishes without DISCONNECT."""

    topic: str
    payload: Payload = b""
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Message:
    """A received PUBLISH, detached from paho so it is safe to keep and compare."""

    topic: str
    payload: bytes
    qos: int
    retain: bool

    @property
    def text(self) -> str:
        return self.payload.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.payload)


def _encode(payload: Payload) -> bytes:
    """fishim payloads are JSON objects, so mappings are JSON-encoded; str is UTF-8."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, str):
        return payload.encode("utf-8")
    return json.dumps(payload, separators=(",", ":")).encode("utf-8")


class MqttClient(mqtt.Client):
    """A paho ``Client`` that records connects, disconnects and SUBACKs so tests can wait on them.

    Attributes:
        session_present: the CONNACK flag of the latest successful connect.
        connect_count: successful connects so far (reconnects included).
        last_connack: reason code of the latest CONNACK.
        disconnected: set once the connection ended (ours or the broker's doing), never cleared.
    """

    def __init__(self, client_id: str, *, clean_session: bool = True, userdata: Any = None,
                 transport: str = "tcp") -> None:
        super().__init__(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            userdata=userdata,
            protocol=mqtt.MQTTv311,
            transport=transport,  # type: ignore[arg-type]  # "tcp" | "websockets"
        )
        self.disconnected = threading.Event()
        self.session_present = False
        self.connect_count = 0
        self.last_connack: ReasonCode | None = None
        self._fx_cond = threading.Condition()
        self._fx_disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self._fx_subacks: dict[int, list[ReasonCode]] = {}
        self.on_connect = self._track_connect
        self.on_disconnect = self._track_disconnect
        self.on_subscribe = self._track_subscribe

    def __repr__(self) -> str:
        return f"<MqttClient {self._client_id.decode()} {'connected' if self.is_connected() else 'offline'}>"

    # -- callbacks (paho thread) -----------------------------------------------------------------

    def _track_connect(self, _c: Any, _u: Any, flags: mqtt.ConnectFlags, rc: ReasonCode, _p: Any) -> None:
        with self._fx_cond:
            self.last_connack = rc
            if not rc.is_failure:
                self.session_present = bool(flags.session_present)
                self.connect_count += 1
            self._fx_cond.notify_all()
        log.debug("%r: CONNACK %s session_present=%s", self, rc, flags.session_present)

    def _track_disconnect(self, _c: Any, _u: Any, _flags: mqtt.DisconnectFlags, rc: ReasonCode, _p: Any) -> None:
        log.debug("%r: disconnected: %s", self, rc)
        self.disconnected.set()
        self._fx_disconnects.put(rc)
        with self._fx_cond:
            self._fx_cond.notify_all()

    def _track_subscribe(self, _c: Any, _u: Any, mid: int, rcs: list[ReasonCode], _p: Any) -> None:
        with self._fx_cond:
            self._fx_subacks[mid] = rcs
            self._fx_cond.notify_all()

    # -- waiting (test thread) -------------------------------------------------------------------

    def _fx_wait(self, done: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._fx_cond:
            while not done():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self!r}: no {what} within {timeout}s")
                self._fx_cond.wait(min(left, 0.1))  # is_connected() changes without a callback too

    def wait_connack(self, timeout: float = 10.0) -> ReasonCode:
        """The first CONNACK's reason code, refusals included (``rc.is_failure``)."""
        self._fx_wait(lambda: self.last_connack is not None, timeout, "CONNACK")
        assert self.last_connack is not None
        return self.last_connack

    def wait_connected(self, timeout: float = 10.0) -> bool:
        """Block until connected (now, or after paho's automatic reconnect); returns session_present."""
        self._fx_wait(self.is_connected, timeout, "connection")
        return self.session_present

    def wait_disconnected(self, timeout: float = 10.0) -> ReasonCode:
        """Return the reason of the next disconnect not yet consumed by an earlier call.

        A failure code (``rc.is_failure``) means the connection was lost rather than closed by us.
        """
        try:
            return self._fx_disconnects.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"{self!r}: no disconnect within {timeout}s") from None

    def subscribe_and_wait(self, topic: str | Sequence[str], qos: int = 1, timeout: float = 10.0) -> list[int]:
        """Subscribe and block until SUBACK; returns the granted QoS per filter.

        Raises:
            MqttError: the broker refused a filter (SUBACK 0x80), or the client is offline.
        """
        topics = [topic] if isinstance(topic, str) else list(topic)
        codes = self.suback_codes(topics, qos, timeout)
        refused = [t for t, code in zip(topics, codes, strict=False) if code >= 0x80]
        if refused:
            raise MqttError(f"{self!r}: broker refused subscription to {refused}")
        return codes

    def suback_codes(self, topics: Sequence[str], qos: int = 1, timeout: float = 10.0) -> list[int]:
        """Subscribe and return the SUBACK's code per filter as it came: 0x80 for a refused one."""
        result, mid = self.subscribe([(t, qos) for t in topics])
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise MqttError(f"{self!r}: subscribe {list(topics)} failed: {mqtt.error_string(result)}")
        self._fx_wait(lambda: mid in self._fx_subacks, timeout, f"SUBACK for {list(topics)}")
        with self._fx_cond:
            return [rc.value for rc in self._fx_subacks.pop(mid)]

    # -- lifecycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Send DISCONNECT if connected and stop the network thread. Safe to call twice."""
        if self.is_connected():
            self.disconnect()
        self.loop_stop()

    def __enter__(self) -> MqttClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect_client(
    port: int,
    client_id: str | None = None,
    *,
    host: str = "127.0.0.1",
    clean_session: bool = True,
    username: str | None = None,
    password: str | None = None,
    keepalive: int = 60,
    will: Will | None = None,
    userdata: Any = None,
    reconnect_delay: tuple[int, int] = (1, 2),
    setup: Callable[[MqttClient], object] | None = None,
    timeout: float = 10.0,
) -> MqttClient:
    """Connect an MQTT 3.1.1 client, wait for CONNACK and return it running (``loop_start``).

    ``client.session_present`` holds the CONNACK flag. ``client_id`` defaults to a unique
    ``test-…`` id. ``reconnect_delay`` is paho's (min, max) backoff in seconds for automatic
    reconnects, kept short so signal-loss tests don't wait long. ``setup(client)`` runs just before
    connecting, for paho settings that must precede it (``max_inflight_messages_set``, ``tls_set``).
    Use the result as a context manager.

    Raises:
        MqttError: the broker refused the connection (e.g. bad credentials).
        OSError: nothing listens on ``host:port``.
        TimeoutError: no CONNACK within ``timeout``.
    """
    client_id = client_id or f"test-{uuid.uuid4().hex[:12]}"
    client = MqttClient(client_id, clean_session=clean_session, userdata=userdata)
    client.reconnect_delay_set(*reconnect_delay)
    if username is not None:
        client.username_pw_set(username, password)
    if will is not None:
        client.will_set(will.topic, _encode(will.payload), will.qos, will.retain)
    if setup is not None:
        setup(client)
    try:
        client.connect(host, port, keepalive)
        client.loop_start()
        rc = client.wait_connack(timeout)
        if rc.is_failure:
            raise MqttError(f"{client!r}: connection refused: {rc}")
    except BaseException:
        client.loop_stop()
        raise
    return client


def publish_and_wait(
    client: mqtt.Client,
    topic: str,
    payload: Payload,
    qos: int = 1,
    retain: bool = False,
    timeout: float = 10.0,
) -> mqtt.MQTTMessageInfo:
    """Publish and block until it is done: PUBACK for QoS 1, handed to the socket for QoS 0.

    Mappings are sent as compact JSON, str as UTF-8.

    Raises:
        MqttError: paho refused to send (e.g. not connected).
        TimeoutError: no PUBACK within ``timeout``.
    """
    info = client.publish(topic, _encode(payload), qos, retain)
    if info.rc != mqtt.MQTT_ERR_SUCCESS:
        raise MqttError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
    try:
        info.wait_for_publish(timeout)
    except (RuntimeError, ValueError) as exc:
        raise MqttError(f"publish to {topic} failed: {exc}") from exc
    if not info.is_published():
        raise TimeoutError(f"publish to {topic} (mid {info.mid}) not acknowledged within {timeout}s")
    return info


class Collector:
    """Subscribes a client to ``topics`` and queues every message it receives on them.

    The subscription is acknowledged (SUBACK) before the constructor returns, so anything published
    afterwards is caught, and retained messages arrive first. Several collectors can share a client.
    Closing (or leaving the ``with`` block) stops collecting and unsubscribes if still connected.
    A clean-session client loses its subscriptions when it reconnects; subscribe again if needed.
    """

    def __init__(self, client: MqttClient, topics: str | Sequence[str], qos: int = 1, timeout: float = 10.0) -> None:
        self.client = client
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        self._queue: queue.Queue[Message] = queue.Queue()
        self._last: mqtt.MQTTMessage | None = None
        for topic in self.topics:
            client.message_callback_add(topic, self._on_message)
        try:
            self.granted = client.subscribe_and_wait(self.topics, qos, timeout)
        except BaseException:
            self._remove_callbacks()
            raise

    def _on_message(self, _client: Any, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg is self._last:  # overlapping filters: paho calls us once per matching filter
            return
        self._last = msg
        self._queue.put(Message(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain)))

    def get(self, timeout: float = 5.0) -> Message:
        """The next message, waiting up to ``timeout`` seconds (TimeoutError otherwise)."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message on {self.topics} within {timeout}s") from None

    def wait_for(self, n: int, timeout: float = 5.0) -> list[Message]:
        """The next ``n`` messages, all within ``timeout`` seconds (TimeoutError says how many came)."""
        deadline = time.monotonic() + timeout
        got: list[Message] = []
        while len(got) < n:
            try:
                got.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                raise TimeoutError(
                    f"got {len(got)} of {n} messages on {self.topics} within {timeout}s: {[m.topic for m in got]}"
                ) from None
        return got

    def drain(self) -> list[Message]:
        """Everything received and not yet taken, without waiting (e.g. to assert nothing leaked)."""
        got: list[Message] = []
        while True:
            try:
                got.append(self._queue.get_nowait())
            except queue.Empty:
                return got

    def _remove_callbacks(self) -> None:
        for topic in self.topics:
            self.client.message_callback_remove(topic)

    def close(self) -> None:
        self._remove_callbacks()
        if self.client.is_connected():
            self.client.unsubscribe(self.topics)

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

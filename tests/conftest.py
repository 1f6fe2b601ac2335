"""Shared pytest fixtures. Each section belongs to one module's tests; append, don't rewrite."""

from __future__ import annotations

# ==== embedded broker fixtures (fishim/broker.py; tests/test_broker*.py) ===========================
# embedded_broker_factory / embedded_broker: an EmbeddedBroker on 127.0.0.1, kernel-chosen port, in
# its own event-loop thread. paho: paho-mqtt clients recording CONNACK/SUBACK/messages, always closed.
# raw_mqtt + wire: a socket-level MQTT 3.1.1 client and packet builders for crafting bad packets.
import asyncio
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar

import paho.mqtt.client as paho_mqtt
import pytest

from fishim.broker import EmbeddedBroker
from fishim.config import BrokerSettings, Config, Limits, ListenerConfig
from fishim.testing import packets
from fishim.testing.mqtt import MqttClient, publish_and_wait
from fishim.testing.postgres import Postgres, find_postgres

_T = TypeVar("_T")


def pytest_sessionstart(session: pytest.Session) -> None:
    """In CI (``CI=true``) a missing Mosquitto fails the run: its tests would otherwise only be skipped,
    and a green run would say nothing about fishim behind Mosquitto."""
    from fishim.testing.mosquitto import find_mosquitto

    if os.environ.get("CI", "").lower() == "true" and find_mosquitto() is None:
        raise pytest.UsageError("CI=true but Debian's mosquitto is not installed: the Mosquitto tests cannot run "
                                "(scripts/test installs it when run as root)")


class BrokerThread:
    """An :class:`EmbeddedBroker` on its own asyncio loop in a daemon thread, for sync paho tests."""

    def __init__(self, config: Config, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="embedded-broker", daemon=True)
        self._thread.start()
        self.broker = EmbeddedBroker(config, **kwargs)
        try:
            self.call(self.broker.start())
        except BaseException:
            self._stop_loop()
            raise

    @property
    def port(self) -> int:
        return self.broker.port()

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        """Run a coroutine on the broker's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self, fn: Callable[[], _T], timeout: float = 10.0) -> _T:
        """Run a plain function on the broker's loop (broker state is only safe to touch there)."""

        async def wrapper() -> _T:
            return fn()

        return self.call(wrapper(), timeout)

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Poll ``predicate`` on the broker loop until true (a condition wait, not a fixed sleep)."""
        deadline = time.monotonic() + timeout
        while not self.run(predicate):
            if time.monotonic() > deadline:
                raise TimeoutError("broker condition not reached")
            time.sleep(0.01)

    def close(self) -> None:
        try:
            self.call(self.broker.stop(), timeout=15)
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


def broker_config(
    *, limits: dict[str, Any] | None = None, broker: dict[str, Any] | None = None,
    listeners: list[ListenerConfig] | None = None,
) -> Config:
    """A Config for tests: loopback listener on a kernel-chosen port unless ``listeners`` given."""
    return Config(
        listeners=listeners or [ListenerConfig(name="default", bind="127.0.0.1:0")],
        limits=Limits(**(limits or {})),
        broker=BrokerSettings(**(broker or {})),
    )


@pytest.fixture
def embedded_broker_factory() -> Iterator[Callable[..., BrokerThread]]:
    """``start(limits={...}, broker={...}, listeners=[...], authenticator=..., ...)`` -> BrokerThread."""
    started: list[BrokerThread] = []

    def start(*, limits: dict[str, Any] | None = None, broker: dict[str, Any] | None = None,
              listeners: list[ListenerConfig] | None = None, **kwargs: Any) -> BrokerThread:
        thread = BrokerThread(broker_config(limits=limits, broker=broker, listeners=listeners), **kwargs)
        started.append(thread)
        return thread

    yield start
    for thread in reversed(started):
        thread.close()


@pytest.fixture
def embedded_broker(embedded_broker_factory: Callable[..., BrokerThread]) -> BrokerThread:
    return embedded_broker_factory()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool


class Paho:
    """A :class:`fishim.testing.mqtt.MqttClient` (paho 2.x, MQTT 3.1.1) plus what broker tests wait on.

    Unlike ``connect_client`` it does not raise on a refused CONNECT (``refused``/``reason`` say so).
    Messages are queued as :class:`Received` (dup flag included) from before CONNECT, so what a
    persistent session gets right after CONNACK is not lost to paho's "no on_message" path.
    """

    def __init__(self, port: int, client_id: str, *, clean_session: bool = True,
                 username: str | None = None, password: str | None = None, keepalive: int = 60,
                 will: tuple[str, bytes] | None = None, transport: str = "tcp",
                 tls_ca: str | None = None, host: str = "127.0.0.1") -> None:
        self.client = MqttClient(client_id, clean_session=clean_session, transport=transport)
        self.messages: queue.Queue[Received] = queue.Queue()
        self.disconnected = self.client.disconnected
        self.client.on_message = self._on_message
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            self.client.will_set(will[0], will[1], qos=1)
        if tls_ca is not None:
            self.client.tls_set(ca_certs=tls_ca)
        self.client.connect(host, port, keepalive)
        self.client.loop_start()
        try:
            rc = self.client.wait_connack(10)
        except TimeoutError:
            self.client.loop_stop()
            raise
        self.refused = bool(rc.is_failure)
        self.reason = str(rc)
        self.session_present = self.client.session_present
        if self.refused:
            self.client.loop_stop()

    def _on_message(self, _client: Any, _userdata: Any, msg: paho_mqtt.MQTTMessage) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), msg.qos, bool(msg.retain), bool(msg.dup)))

    def subscribe(self, topic_filter: str, qos: int = 1) -> int:
        """SUBSCRIBE and wait for SUBACK; returns the granted QoS (0x80 if refused)."""
        return self.client.suback_codes([topic_filter], qos, timeout=5)[0]

    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Publish and wait until done: PUBACK for QoS 1, written to the socket for QoS 0."""
        publish_and_wait(self.client, topic, payload, qos, retain, timeout=5)

    def get(self, timeout: float = 5.0) -> Received:
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no message within {timeout}s") from None

    def until(self, topic: str, timeout: float = 5.0) -> list[Received]:
        """Every message up to and including the first on ``topic``: a marker proves what came before.

        The broker delivers to one session in order, so anything leaked earlier shows up in the list.
        """
        got: list[Received] = []
        deadline = time.monotonic() + timeout
        while not got or got[-1].topic != topic:
            got.append(self.get(max(0.0, deadline - time.monotonic())))
        return got

    def close(self) -> None:
        if self.client.is_connected():
            self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def paho() -> Iterator[Callable[..., Paho]]:
    """``connect(port, client_id, **Paho_kwargs)``; every client is closed after the test."""
    clients: list[Paho] = []

    def connect(port: int, client_id: str, **kwargs: Any) -> Paho:
        client = Paho(port, client_id, **kwargs)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


@dataclass(frozen=True)
class RawPacket:
    type: int
    flags: int
    body: bytes

    @property
    def publish(self) -> tuple[str, int | None, bytes]:
        """(topic, packet id, payload) of a PUBLISH."""
        length = struct.unpack("!H", self.body[:2])[0]
        topic, rest = self.body[2 : 2 + length].decode(), self.body[2 + length :]
        if (self.flags >> 1) & 3:
            return topic, struct.unpack("!H", rest[:2])[0], rest[2:]
        return topic, None, rest

    @property
    def dup(self) -> bool:
        return bool(self.flags & 0x08)


class RawMqtt:
    """A blocking MQTT 3.1.1 client on a bare socket: sends exactly the bytes a test crafts."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=5)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def connect(self, client_id: str, **kwargs: Any) -> tuple[bool, int]:
        """CONNECT and read CONNACK: (session_present, return code)."""
        self.send(packets.connect(client_id, **kwargs))
        packet = self.read()
        assert packet is not None and packet.type == 2, f"expected CONNACK, got {packet}"
        return bool(packet.body[0] & 1), packet.body[1]

    def subscribe(self, topic_filter: str, qos: int = 1, packet_id: int = 1) -> int:
        self.send(packets.subscribe(topic_filter, qos, packet_id))
        packet = self.read()
        assert packet is not None and packet.type == 9, f"expected SUBACK, got {packet}"
        return packet.body[2]

    def puback(self, packet_id: int) -> None:
        self.send(packets.packet(0x40, struct.pack("!H", packet_id)))

    def read(self, timeout: float = 5.0) -> RawPacket | None:
        """The next packet, or None if the broker closed the connection."""
        self.sock.settimeout(timeout)
        header = self._take(1)
        if header is None:
            return None
        length, shift = 0, 0
        while True:
            byte = self._take(1)
            if byte is None:
                return None
            length |= (byte[0] & 0x7F) << shift
            shift += 7
            if not byte[0] & 0x80:
                break
        body = self._take(length) if length else b""
        if body is None:
            return None
        return RawPacket(header[0] >> 4, header[0] & 0x0F, body)

    def closed_by_broker(self, timeout: float = 5.0) -> bool:
        """True once the broker closes the socket; packets received before that are skipped."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.read(max(0.01, deadline - time.monotonic())) is None:
                    return True
            except TimeoutError:
                return False
        return False

    def _take(self, n: int) -> bytes | None:
        while len(self._buffer) < n:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def abort(self) -> None:
        """Vanish like a phone losing signal: RST, no DISCONNECT."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def wire() -> SimpleNamespace:
    """Packet builders for raw_mqtt tests: wire.connect(...), wire.publish(...), wire.subscribe(...),
    wire.packet(first_byte, body), wire.string(text_or_bytes)."""
    return SimpleNamespace(connect=packets.connect, publish=packets.publish, subscribe=packets.subscribe,
                           packet=packets.packet, string=packets.string)


@pytest.fixture
def raw_mqtt() -> Iterator[Callable[[int], RawMqtt]]:
    clients: list[RawMqtt] = []

    def open_client(port: int) -> RawMqtt:
        client = RawMqtt(port)
        clients.append(client)
        return client

    yield open_client
    for client in clients:
        client.close()
# ==== end of embedded broker fixtures ===============================================================


# ==== security fixtures (fishim/auth/; tests/test_security_*.py) =================================
# secure_broker_factory: start(db, listeners=[...], limits={...}, broker={...}, ingest=False) -> BrokerThread
# running fishim's own StoreAuthenticator and OrderAcl over the store at ``db`` (thread.acl is the
# OrderAcl); with ingest=True it is the broker of `fishim up`.
# Module-scoped, so a whole access table runs against one broker.
@pytest.fixture(scope="module")
def secure_broker_factory() -> Iterator[Callable[..., BrokerThread]]:
    from fishim.auth import OrderAcl, StoreAuthenticator
    from fishim.config import StoreConfig

    started: list[tuple[BrokerThread, StoreAuthenticator, OrderAcl]] = []

    def start(db: Any, *, listeners: list[ListenerConfig] | None = None,
              limits: dict[str, Any] | None = None, broker: dict[str, Any] | None = None,
              ingest: bool = False) -> BrokerThread:
        """``ingest=True``: the broker of ``fishim up`` (durable ingest, sync served in process)."""
        from fishim.broker.ingest import BrokerIngest

        config = broker_config(limits=limits, listeners=listeners, broker=broker).model_copy(
            update={"store": StoreConfig(path=db, synchronous="NORMAL")})
        authenticator, acl = StoreAuthenticator(db, config), OrderAcl(db, config)
        thread = BrokerThread(config, authenticator=authenticator, authorizer=acl,
                              ingest=BrokerIngest(config) if ingest else None)
        thread.acl = acl  # type: ignore[attr-defined]
        started.append((thread, authenticator, acl))
        return thread

    yield start
    for thread, authenticator, acl in reversed(started):
        thread.close()
        authenticator.close()
        acl.close()
# ==== end of security fixtures ======================================================================


# ==== PostgreSQL (fishim/pgstore.py; tests/test_store.py, tests/test_pg_failover.py) ==============
# postgres: one throwaway server for the whole run (started on first use, stopped at the end);
# pg_url(name): a fresh empty database on it. Skipped with the reason when Debian's postgresql or
# psycopg is missing, except in CI (CI=true), where that is a failure: scripts/test installs both.
def _postgres_missing() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg not installed (pip install -e '.[test]')"
    if find_postgres() is None:
        return "Debian postgresql not installed (scripts/test installs it when run as root)"
    return None


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    missing = _postgres_missing()
    if missing is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL tests must run in CI: {missing}")
        pytest.skip(missing)
    with Postgres() as server:
        yield server


@pytest.fixture
def pg_url(postgres: Postgres, request: pytest.FixtureRequest) -> Callable[[str], str]:
    """``pg_url(name)``: the URL of a fresh empty database (unique per test)."""
    base = "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:40]

    def make(name: str = "db") -> str:
        return postgres.create_database(f"{base}_{name}")

    return make

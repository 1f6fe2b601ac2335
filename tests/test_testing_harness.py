"""The test harness itself: signal-loss proxy, throwaway Mosquitto, paho helpers.

Every integration test trusts these, so they are checked against a real broker: a cut must look like
lost signal to both ends (no DISCONNECT, so the broker publishes the will), a stall must be caught only
by keepalive, and a Mosquitto restart must keep retained messages.
"""

from __future__ import annotations

import contextlib
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fishim.testing import free_port, wait_for_port
from fishim.testing.mosquitto import Mosquitto, find_mosquitto, write_password_file
from fishim.testing.mqtt import Collector, MqttError, Will, connect_client, publish_and_wait
from fishim.testing.proxy import Proxy


def _require_mosquitto() -> None:
    if find_mosquitto() is None:
        pytest.skip("Debian mosquitto not installed")


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    _require_mosquitto()
    with Mosquitto() as mosquitto:
        yield mosquitto


@pytest.fixture
def proxy(broker: Mosquitto) -> Iterator[Proxy]:
    with Proxy("127.0.0.1", broker.port) as p:
        yield p


# -- proxy without a broker -------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(ConnectionResetError):  # the proxy's cut resets us too
            while data := self.request.recv(65536):
                self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _dial(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def test_proxy_forwards_and_cut_resets(echo_port: int) -> None:
    with Proxy("127.0.0.1", echo_port) as p, _dial(p.port) as s:
        s.sendall(b"hello")
        assert s.recv(100) == b"hello"
        p.wait_connections(1, timeout=5)
        assert p.cut() == 1
        with pytest.raises(ConnectionResetError):
            s.sendall(b"x")  # may succeed locally if the RST is not yet processed; recv surely fails
            s.recv(100)
        assert p.connections == 0


def test_proxy_refuses_until_restore(echo_port: int) -> None:
    with Proxy("127.0.0.1", echo_port) as p:
        p.cut(refuse=True)
        with pytest.raises(ConnectionResetError), _dial(p.port) as s:  # connect() itself may see the RST
            s.recv(100)
        p.restore()
        with _dial(p.port) as s:
            s.sendall(b"back")
            assert s.recv(100) == b"back"


def test_proxy_stall_holds_data_until_restore(echo_port: int) -> None:
    with Proxy("127.0.0.1", echo_port) as p, _dial(p.port) as s:
        p.wait_connections(1, timeout=5)
        p.stall()
        s.sendall(b"held")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(100)
        assert p.connections == 1  # sockets stay open while stalled
        p.restore()
        s.settimeout(5)
        assert s.recv(100) == b"held"


def test_proxy_argument_checks_and_wait_timeout(echo_port: int) -> None:
    with Proxy("127.0.0.1", echo_port) as p:
        with pytest.raises(ValueError):
            p.slow()
        with pytest.raises(ValueError):
            p.slow(bytes_per_s=0)
        with pytest.raises(TimeoutError):
            p.wait_connections(1, timeout=0.2)


def test_proxy_resets_client_when_upstream_is_down() -> None:
    with Proxy("127.0.0.1", free_port()) as p:
        with pytest.raises(ConnectionResetError), _dial(p.port) as s:
            s.recv(100)
        assert p.connections == 0


# -- proxy against Mosquitto ------------------------------------------------------------------------


@pytest.mark.mosquitto
def test_cut_drops_client_without_disconnect(broker: Mosquitto, proxy: Proxy) -> None:
    with (
        connect_client(broker.port) as observer,
        Collector(observer, "will/#") as wills,
        connect_client(proxy.port, will=Will("will/rider", b"gone")) as rider,
    ):
        proxy.wait_connections(1, timeout=5)
        proxy.cut()
        rc = rider.wait_disconnected(timeout=5)
        assert rc.is_failure, rc
        # The broker saw the connection die rather than a DISCONNECT, so it publishes the will.
        assert wills.get(timeout=5).payload == b"gone"


@pytest.mark.mosquitto
def test_cut_refusing_then_restore_lets_client_reconnect(broker: Mosquitto, proxy: Proxy) -> None:
    with (
        connect_client(broker.port) as observer,
        Collector(observer, "t/#") as inbox,
        connect_client(proxy.port) as rider,
    ):
        proxy.cut(refuse=True)
        assert rider.wait_disconnected(timeout=5).is_failure
        proxy.wait_refused(2, timeout=10)  # paho retries every 1-2 s; two attempts in, both refused
        assert not rider.is_connected()
        assert rider.connect_count == 1
        proxy.restore()
        rider.wait_connected(timeout=10)
        assert rider.connect_count >= 2
        proxy.wait_connections(1, timeout=5)
        publish_and_wait(rider, "t/after", b"back")
        assert inbox.get(timeout=5).payload == b"back"


@pytest.mark.mosquitto
def test_stall_lets_broker_keepalive_drop_client(broker: Mosquitto, proxy: Proxy) -> None:
    with (
        connect_client(broker.port) as observer,
        Collector(observer, "will/#") as wills,
        connect_client(proxy.port, keepalive=2, will=Will("will/rider", b"silent")) as rider,
    ):
        proxy.wait_connections(1, timeout=5)
        stalled_at = time.monotonic()
        proxy.stall()
        # Mosquitto drops a client after 1.5 x keepalive of silence and publishes its will.
        assert wills.get(timeout=10).payload == b"silent"
        assert time.monotonic() - stalled_at >= 2.0  # keepalive, not a reset
        assert proxy.connections >= 1  # the proxy kept the sockets open throughout
        assert rider.wait_disconnected(timeout=10).is_failure  # paho's own keepalive gave up too
        proxy.restore()
        rider.wait_connected(timeout=10)
        proxy.wait_connections(1, timeout=10)


@pytest.mark.mosquitto
def test_slow_delays_delivery(broker: Mosquitto, proxy: Proxy) -> None:
    with (
        connect_client(broker.port) as observer,
        Collector(observer, "t/#") as inbox,
        connect_client(proxy.port) as rider,
    ):
        proxy.slow(delay_ms=400)
        started = time.monotonic()
        publish_and_wait(rider, "t/slow", b"x", qos=1)
        assert time.monotonic() - started >= 0.75  # PUBLISH up and PUBACK down, 400 ms each
        inbox.get(timeout=5)

        proxy.slow(bytes_per_s=4000)
        started = time.monotonic()
        publish_and_wait(rider, "t/big", b"y" * 8000, qos=0)
        inbox.get(timeout=10)
        assert time.monotonic() - started >= 1.5

        proxy.restore()
        publish_and_wait(rider, "t/fast", b"z", qos=1)
        inbox.get(timeout=5)  # delivered again (how fast is the benchmarks' business)


@pytest.mark.mosquitto
def test_per_connection_cut_leaves_others_alone(broker: Mosquitto, proxy: Proxy) -> None:
    with connect_client(proxy.port) as first:
        proxy.wait_connections(1, timeout=5)
        with connect_client(proxy.port) as second:
            proxy.wait_connections(2, timeout=5)
            proxy.connection_list()[0].cut()
            assert first.wait_disconnected(timeout=5).is_failure
            assert second.is_connected()
            publish_and_wait(second, "t/still", b"ok")


# -- Mosquitto helper -------------------------------------------------------------------------------


@pytest.mark.mosquitto
def test_mosquitto_restart_keeps_retained(broker: Mosquitto) -> None:
    with connect_client(broker.port) as client:
        publish_and_wait(client, "fishim/orders/A1/status", {"state": "placed"}, qos=1, retain=True)
    pid = broker.pid
    broker.restart()
    assert broker.pid != pid
    with connect_client(broker.port) as client, Collector(client, "fishim/orders/+/status") as inbox:
        msg = inbox.get(timeout=5)
    assert msg.retain
    assert msg.json() == {"state": "placed"}


@pytest.mark.mosquitto
def test_mosquitto_password_file_and_refused_connect(tmp_path: Path) -> None:
    _require_mosquitto()
    passwords = write_password_file(tmp_path / "passwd", {"rider1": "s3cret"})
    with Mosquitto(allow_anonymous=False, password_file=passwords) as mosquitto:
        with connect_client(mosquitto.port, username="rider1", password="s3cret") as client:
            assert client.is_connected()
        with pytest.raises(MqttError):
            connect_client(mosquitto.port, username="rider1", password="wrong")
        with pytest.raises(MqttError):
            connect_client(mosquitto.port)
    assert not mosquitto.running


@pytest.mark.mosquitto
def test_persistent_session_reports_session_present(broker: Mosquitto) -> None:
    with connect_client(broker.port, "rider-phone", clean_session=False) as client:
        assert client.session_present is False
        client.subscribe_and_wait("t/#")
    with connect_client(broker.port, "rider-phone", clean_session=False) as client:
        assert client.session_present is True


def test_wait_for_port_notices_dead_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        with pytest.raises(RuntimeError):
            wait_for_port(free_port(), timeout=10, proc=proc)
    finally:
        proc.kill()
        proc.wait()

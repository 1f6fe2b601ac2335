"""Test and demo harness for fishim: real brokers, real sockets, real signal loss.

fishim's guarantees are about what survives a crash or a phone dropping off the network, so the
integration tests run against real processes and real TCP connections rather than mocks:

- :mod:`fishim.testing.proxy`: :class:`~fishim.testing.proxy.Proxy`, a TCP proxy that can cut, stall
  or slow connections the way a rider's phone loses signal.
- :mod:`fishim.testing.mosquitto`: :class:`~fishim.testing.mosquitto.Mosquitto`, a throwaway Debian
  ``mosquitto`` on a free loopback port.
- :mod:`fishim.testing.mqtt`: small synchronous paho-mqtt helpers (connect, collect, publish).

This module itself only holds the port helpers the others share; it imports nothing heavy.
"""

from __future__ import annotations

import socket
import subprocess
import time
from typing import Self

__all__ = ["Managed", "free_port", "wait_for_port"]


class Managed:
    """``with Thing(...) as thing:`` for harness pieces that have ``start()`` and ``close()``.

    ``start()`` returns the started object; if it fails half-way, ``close()`` still runs, so a
    broker that died during start-up leaves no process or temp dir behind.
    """

    def start(self) -> Self:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The kernel picks it (bind to port 0), so parallel test runs don't collide on a fixed port. There
    is an unavoidable window before the caller binds it; servers that fail to bind should be
    restarted on a new port rather than retried on this one.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    port: int,
    host: str = "127.0.0.1",
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Block until something accepts TCP connections on ``host:port``.

    Polling a real connect is the only readiness signal every broker shares. If ``proc`` is given and
    exits while we wait, fail at once instead of waiting out the timeout.

    Raises:
        RuntimeError: ``proc`` exited before the port opened.
        TimeoutError: the port did not open within ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}) before {host}:{port} opened")
        try:
            with socket.create_connection((host, port), timeout=0.5) as sock:
                if sock.getsockname() != sock.getpeername():
                    return
                # TCP self-connect: the kernel gave us ``port`` as our own source port while nothing
                # listened there; we would hold the port the server is about to bind. Let it go.
        except OSError:
            pass
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{host}:{port} did not accept connections within {timeout}s")
        time.sleep(0.05)

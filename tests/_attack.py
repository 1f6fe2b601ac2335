"""Helpers for the resource-attack tests (a helper module, not a test file).

:class:`LatencyProbe` measures what issue 17 asks of every attack test: while the attack runs, the
publish->deliver latency of the test's own well-behaved clients (p99 under 100 ms). Probes go one at
a time, each waiting for its own delivery, so the probe adds almost no load of its own.
:func:`raw_from` opens a bare MQTT socket from another loopback address (127.0.0.2, ...), so an
attacker and the shop's own clients can be told apart by address as on a real network.
"""

from __future__ import annotations

import math
import queue
import socket
import threading
import time
from typing import Any

from conftest import RawMqtt

from fishim.testing.mqtt import MqttClient

P99_BOUND_MS = 100.0  # issue 17: other clients' publish->deliver p99 while an attack runs
LOST_MS = 5000.0  # a probe not delivered within this long counts as this many ms


class LatencyProbe:
    """``with LatencyProbe(pub, sub, topic) as probe: <attack>``; then ``probe.p99()`` (ms).

    ``publisher`` should be exempt from the per-client rate limit (the service account), so the
    probe measures the broker, not its own throttling. ``subscriber`` is an ordinary account.
    """

    PACE_S = 0.01

    def __init__(self, publisher: MqttClient, subscriber: MqttClient, topic: str) -> None:
        self.publisher, self.topic = publisher, topic
        self.samples: list[float] = []
        self._arrived: queue.Queue[tuple[bytes, float]] = queue.Queue()
        subscriber.message_callback_add(topic, self._on_message)
        subscriber.subscribe_and_wait(topic)
        self._stop = threading.Event()
        self._counted = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="latency-probe", daemon=True)

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        self._arrived.put((bytes(msg.payload), time.perf_counter()))

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            tag = f"probe-{n}".encode()
            sent = time.perf_counter()
            self.publisher.publish(self.topic, tag, qos=1)
            while True:
                try:
                    payload, arrived = self._arrived.get(timeout=LOST_MS / 1000)
                except queue.Empty:
                    self.samples.append(LOST_MS)
                    break
                if payload == tag:
                    self.samples.append((arrived - sent) * 1000)
                    break
            with self._counted:
                self._counted.notify_all()
            self._stop.wait(self.PACE_S)  # pacing between probes, not synchronisation

    def count(self) -> int:
        return len(self.samples)

    def wait_samples(self, n: int, timeout: float = 30.0) -> None:
        """Block until ``n`` probes have been measured (while the caller's attack runs elsewhere)."""
        with self._counted:
            assert self._counted.wait_for(lambda: len(self.samples) >= n, timeout), \
                f"only {len(self.samples)} probes in {timeout}s"

    def p99(self) -> float:
        ordered = sorted(self.samples)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    def __enter__(self) -> LatencyProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(LOST_MS / 1000 + 5)

    def summary(self) -> str:
        ordered = sorted(self.samples)
        return (f"{len(ordered)} probes, p50 {ordered[len(ordered) // 2]:.1f} ms, p99 {self.p99():.1f} ms, "
                f"max {ordered[-1]:.1f} ms")


def keep_attacking(probe: LatencyProbe, attack: Any, *, samples: int = 200, timeout: float = 40.0) -> int:
    """Run ``attack()`` again and again until the probe has ``samples`` measurements taken while it
    ran; returns how many rounds it took. Bounded by ``timeout``."""
    deadline = time.monotonic() + timeout
    start = probe.count()
    rounds = 0
    while probe.count() - start < samples:
        assert time.monotonic() < deadline, f"only {probe.count() - start} probes in {timeout}s"
        attack()
        rounds += 1
    return rounds


class SourcedRaw(RawMqtt):
    """:class:`conftest.RawMqtt` from a chosen local address (any 127.x.y.z is loopback on Linux)."""

    def __init__(self, port: int, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
        self._buffer = b""


def raw_from(port: int, source: str) -> SourcedRaw:
    return SourcedRaw(port, source)

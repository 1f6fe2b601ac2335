"""1 publisher -> 1 subscriber MQTT throughput, for comparing brokers under fishim's traffic shape.

Measures how many 200-byte messages per second a paho subscriber receives while a paho publisher
sends as fast as it can (QoS 1 with a bounded inflight window, as a real client would). Brokers:

- ``amqtt``: stock amqtt with its *default* config (default plugins, logging plugins included),
  only the listener moved to a free loopback port, in a child Python process so it does not share
  our GIL;
- ``mosquitto``: Debian Mosquitto via :class:`fishim.testing.mosquitto.Mosquitto`;
- ``HOST:PORT``: any running broker (e.g. ``fishim up``, EMQX).

The publisher runs in a child process and the subscriber here, each a paho client; for fast brokers
the Python clients are the bottleneck, so the numbers compare brokers under the same clients, not
absolute broker limits.

Usage::

    python scripts/peer_throughput.py -n 20000 --qos 0 1 amqtt mosquitto 127.0.0.1:1883

or from Python: ``measure(host, port, n, qos) -> msgs/s``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import paho.mqtt.client as mqtt

if __package__ in (None, ""):  # run as a script: make the repo's fishim importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fishim.testing import free_port, wait_for_port
from fishim.testing.mosquitto import Mosquitto, find_mosquitto
from fishim.testing.mqtt import connect_client

log = logging.getLogger("fishim.scripts.peer_throughput")

PAYLOAD_SIZE = 200
INFLIGHT = 100

_AMQTT_CHILD = """
import asyncio, sys
from amqtt.broker import Broker

async def main() -> None:
    # Default BrokerConfig (default plugins included); only the listener address is ours.
    broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{sys.argv[1]}"}}})
    await broker.start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


class EventLike(Protocol):
    """A multiprocessing Event (its class is private to the context module)."""

    def set(self) -> None: ...
    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True)
class Result:
    """One run: ``rate`` is messages received per second, from the first publish to the last receive."""

    sent: int
    received: int
    seconds: float
    qos: int

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0

    @property
    def lost(self) -> int:
        return self.sent - self.received


def _publisher(
    host: str,
    port: int,
    topic: str,
    n: int,
    qos: int,
    payload_size: int,
    inflight: int,
    ready: EventLike,
    go: EventLike,
) -> None:
    """Child process: connect, signal ready, then publish ``n`` messages flat out once told to go."""

    def bounded(client: mqtt.Client) -> None:
        client.max_inflight_messages_set(inflight)  # paho queues the rest, sends them as PUBACKs return

    payload = b"x" * payload_size
    with connect_client(port, host=host, setup=bounded) as pub:
        ready.set()
        if not go.wait(60):
            return
        infos = [pub.publish(topic, payload, qos) for _ in range(n)]
        infos[-1].wait_for_publish(600)  # in order: the last one done means all were handed over


def run(
    host: str,
    port: int,
    n: int,
    qos: int,
    *,
    payload_size: int = PAYLOAD_SIZE,
    inflight: int = INFLIGHT,
    idle_timeout: float = 10.0,
) -> Result:
    """Publish ``n`` messages from a child process and count what a subscriber here receives.

    The publisher gets its own process so the two paho clients don't share a GIL (it roughly doubles
    the numbers on 2 cores). Stops when all ``n`` arrived, or when nothing arrived for
    ``idle_timeout`` seconds: a broker dropping QoS-0 messages must not hang the benchmark; the loss
    shows in the result.
    """
    topic = f"bench/{uuid.uuid4().hex[:8]}"
    received = 0
    last_at = 0.0
    progress = threading.Condition()

    def on_message(_c: object, _u: object, _msg: mqtt.MQTTMessage) -> None:
        nonlocal received, last_at
        with progress:
            received += 1
            last_at = time.perf_counter()
            if received >= n:
                progress.notify_all()

    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs paho threads
    ready, go = ctx.Event(), ctx.Event()
    child = ctx.Process(
        target=_publisher,
        args=(host, port, topic, n, qos, payload_size, inflight, ready, go),
        name="peer-throughput-publisher",
        daemon=True,
    )
    child.start()
    try:
        with connect_client(port, host=host) as sub:
            sub.on_message = on_message
            sub.subscribe_and_wait(topic, qos)
            if not ready.wait(30):
                raise RuntimeError(f"publisher did not connect (exit code {child.exitcode})")
            started = time.perf_counter()
            go.set()
            with progress:
                while received < n:
                    seen = received
                    progress.wait(idle_timeout)
                    if received == seen:
                        log.warning("no message for %.0fs: %d of %d received", idle_timeout, received, n)
                        break
                count, finished = received, last_at
        child.join(30)
        if child.exitcode != 0:
            raise RuntimeError(f"publisher exited with {child.exitcode}")
    finally:
        if child.is_alive():
            child.terminate()
            child.join(5)
    return Result(sent=n, received=count, seconds=max(finished - started, 0.0), qos=qos)


def measure(host: str, port: int, n: int, qos: int) -> float:
    """Messages per second received by one subscriber from one max-speed publisher."""
    return run(host, port, n, qos).rate


@contextlib.contextmanager
def amqtt_broker(startup_timeout: float = 30.0) -> Iterator[tuple[str, int]]:
    """Stock amqtt (default config) in a child process on a free loopback port; killed on exit."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _AMQTT_CHILD, str(port)], stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=startup_timeout, proc=proc)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def mosquitto_broker() -> Iterator[tuple[str, int]]:
    """Mosquitto via fishim's test helper (raised queue limits, persistence on)."""
    with Mosquitto() as broker:
        yield "127.0.0.1", broker.port


@contextlib.contextmanager
def broker_for(spec: str) -> Iterator[tuple[str, int]]:
    """``amqtt``, ``mosquitto`` or ``HOST:PORT`` (an already running broker)."""
    if spec == "amqtt":
        with amqtt_broker() as address:
            yield address
    elif spec == "mosquitto":
        if find_mosquitto() is None:
            raise SystemExit("mosquitto not installed")
        with mosquitto_broker() as address:
            yield address
    else:
        host, _, port = spec.rpartition(":")
        yield host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "brokers",
        nargs="*",
        default=["amqtt", "mosquitto"],
        help="amqtt, mosquitto or HOST:PORT (default: amqtt mosquitto)",
    )
    parser.add_argument("-n", type=int, default=20000, help="messages per run (default 20000)")
    parser.add_argument("--qos", type=int, nargs="+", default=[0, 1], choices=[0, 1])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    print(f"1 publisher -> 1 subscriber, {args.n} x {PAYLOAD_SIZE} B, paho inflight {INFLIGHT}")
    print(f"{'broker':<22} {'qos':>3} {'msg/s':>10} {'received':>10} {'seconds':>8}")
    for spec in args.brokers:
        with broker_for(spec) as (host, port):
            for qos in args.qos:
                result = run(host, port, args.n, qos)
                print(
                    f"{spec:<22} {qos:>3} {result.rate:>10,.0f} {result.received:>10} {result.seconds:>8.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())

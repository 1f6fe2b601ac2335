"""A minimal asyncio MQTT 3.1.1 client for load generation, and the raw packet encoder it uses.

A load generator written with paho spends most of its time in paho; this one costs a few
microseconds per message, so the broker (or the bridge) is what a run measures. Packets are encoded
by :mod:`fishim.testing.packets`, the encoder the tests use too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

from fishim.testing import packets

OnMessage = Callable[[bytes, bytes, int, bool], None]  # topic, payload, qos, retain


class MqttError(RuntimeError):
    """The broker refused something or the connection broke."""


class RawMqtt:
    """QoS 0/1 publish and subscribe over asyncio streams, and nothing else.

    A load generator written with paho spends most of its time in paho; this one costs a few
    microseconds per message, so the broker (or the bridge) is what a run measures. QoS-1 publishes
    are bounded by ``max_inflight`` un-acknowledged messages, like any real client. Incoming QoS-1
    messages are acknowledged once per read chunk. ``on_message`` runs on the event loop.
    """

    def __init__(self, client_id: str, on_message: OnMessage | None = None, *, max_inflight: int = 100,
                 track_acks: bool = False) -> None:
        self.client_id = client_id
        self.ack_ns: list[int] | None = [] if track_acks else None  # publish -> PUBACK, per QoS-1 message
        self._sent_at: dict[int, int] = {}
        self.on_message = on_message
        self.sent = 0
        self.acked = 0
        self.last_ack_ns = 0  # wall clock (time.time_ns) of the chunk that brought the latest PUBACK
        self.received = 0
        self.lost: str | None = None  # why the connection ended, if it did on its own
        self._slots = asyncio.Semaphore(max_inflight)
        self._inflight: set[int] = set()
        self._next_id = 0
        self._waiters: dict[int, asyncio.Future[bytes]] = {}
        self._connack: asyncio.Future[bytes] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    async def connect(self, host: str, port: int, *, clean: bool = True, keepalive: int = 60,
                      timeout: float = 10.0) -> None:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        self._writer = writer
        self._connack = asyncio.get_running_loop().create_future()
        self._tasks.append(asyncio.create_task(self._read_loop(reader)))
        writer.write(packets.connect(self.client_id, clean=clean, keepalive=keepalive))
        try:
            ack = await asyncio.wait_for(self._connack, timeout)
            if ack[1] != 0:
                raise MqttError(f"{self.client_id}: CONNACK refused (code {ack[1]})")
        except BaseException:
            await self.close()
            raise
        if keepalive:
            self._tasks.append(asyncio.create_task(self._ping(keepalive / 2)))

    async def subscribe(self, filters: Sequence[tuple[str, int]], timeout: float = 10.0) -> list[int]:
        pid = self._packet_id()
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiters[pid] = future
        body = pid.to_bytes(2, "big") + b"".join(packets.string(f.encode()) + bytes([q]) for f, q in filters)
        self._write(packets.packet(0x82, body))
        try:
            codes = list(await asyncio.wait_for(future, timeout))
        finally:
            self._waiters.pop(pid, None)
        if 0x80 in codes:
            raise MqttError(f"{self.client_id}: subscription refused: {list(filters)} -> {codes}")
        return codes

    async def slot(self, timeout: float | None = None) -> None:
        """Wait for room in the QoS-1 window (call before :meth:`send` with ``qos=1``).

        Raises TimeoutError after ``timeout`` seconds; the common case, room at once, costs no task.
        """
        if timeout is None or not self._slots.locked():
            await self._slots.acquire()
        else:
            await asyncio.wait_for(self._slots.acquire(), timeout)

    def send(self, topic: bytes, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        """Write one PUBLISH now; for QoS 1 the caller holds a :meth:`slot`."""
        head = packets.string(topic)
        if qos:
            pid = self._packet_id()
            self._inflight.add(pid)
            if self.ack_ns is not None:
                self._sent_at[pid] = time.perf_counter_ns()
            head += pid.to_bytes(2, "big")
        self._write(bytes([0x30 | qos << 1 | int(retain)]) + packets.varint(len(head) + len(payload)) + head + payload)
        self.sent += 1

    async def publish(self, topic: bytes, payload: bytes, qos: int = 0, retain: bool = False) -> None:
        if qos:
            await self.slot()
        self.send(topic, payload, qos, retain)
        if not qos:
            await self.drain()

    async def drain(self) -> None:
        """Let the socket catch up when more than 256 KiB wait in our send buffer."""
        writer = self._writer
        if writer is not None and writer.transport.get_write_buffer_size() > 256 * 1024:
            await writer.drain()

    async def wait_acked(self, timeout: float) -> bool:
        """True once every QoS-1 publish so far was acknowledged."""
        deadline = time.monotonic() + timeout
        while self._inflight and self.lost is None and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return not self._inflight

    async def close(self) -> None:
        """DISCONNECT (if still connected) and stop the client's tasks; safe to call twice."""
        self._closing = True
        writer, self._writer = self._writer, None
        if writer is not None:
            with contextlib.suppress(Exception):
                if not writer.is_closing():
                    writer.write(b"\xe0\x00")
                    await asyncio.wait_for(writer.drain(), 2.0)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()

    # -- internals ----------------------------------------------------------------------------------

    def _packet_id(self) -> int:
        while True:
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self._inflight and self._next_id not in self._waiters:
                return self._next_id

    def _write(self, data: bytes) -> None:
        if self._writer is None:
            raise MqttError(f"{self.client_id}: not connected ({self.lost or 'closed'})")
        self._writer.write(data)

    async def _ping(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            with contextlib.suppress(MqttError):
                self._write(b"\xc0\x00")

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        buf = bytearray()
        try:
            while True:
                chunk = await reader.read(1 << 18)
                if not chunk:
                    break
                buf += chunk
                acks = self._parse(buf)
                if acks and self._writer is not None:
                    self._writer.write(b"".join(acks))
        except (ConnectionError, OSError) as exc:
            self.lost = f"connection error: {exc}"
        finally:
            if self.lost is None and not self._closing:
                self.lost = "connection closed by the broker"
            error = MqttError(f"{self.client_id}: {self.lost or 'closed'}")
            for future in [self._connack, *self._waiters.values()]:
                if future is not None and not future.done():
                    future.set_exception(error)

    def _parse(self, buf: bytearray) -> list[bytes]:
        """Handle every complete packet in ``buf`` (consumed); returns the PUBACKs to send."""
        acks: list[bytes] = []
        now, wall = time.perf_counter_ns(), time.time_ns()  # when this chunk arrived
        pos, end_of_data = 0, len(buf)
        while end_of_data - pos >= 2:
            length, multiplier, i, complete = 0, 1, pos + 1, False
            while i < end_of_data and i <= pos + 4:
                byte = buf[i]
                i += 1
                length += (byte & 0x7F) * multiplier
                if not byte & 0x80:
                    complete = True
                    break
                multiplier *= 128
            end = i + length
            if not complete or end > end_of_data:
                break  # remaining length or body not all here yet
            first = buf[pos]
            body = bytes(buf[i:end])
            pos = end
            kind = first >> 4
            if kind == 3:  # PUBLISH
                qos = (first >> 1) & 3
                cut = 2 + ((body[0] << 8) | body[1])
                topic = body[2:cut]
                if qos:
                    acks.append(b"\x40\x02" + body[cut:cut + 2])
                    cut += 2
                self.received += 1
                if self.on_message is not None:
                    self.on_message(topic, body[cut:], qos, bool(first & 1))
            elif kind == 4:  # PUBACK
                pid = (body[0] << 8) | body[1]
                if pid in self._inflight:
                    self._inflight.discard(pid)
                    self.acked += 1
                    self.last_ack_ns = wall
                    self._slots.release()
                    sent_at = self._sent_at.pop(pid, None)
                    if sent_at is not None and self.ack_ns is not None:
                        self.ack_ns.append(now - sent_at)
            elif kind == 9:  # SUBACK
                future = self._waiters.get((body[0] << 8) | body[1])
                if future is not None and not future.done():
                    future.set_result(body[2:])
            elif kind == 2 and self._connack is not None and not self._connack.done():  # CONNACK
                self._connack.set_result(body)
        del buf[:pos]
        return acks



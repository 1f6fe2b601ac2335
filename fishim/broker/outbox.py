"""Per-session outbound delivery: the offline queue, the QoS-1 in-flight window and redelivery.

Replaces amqtt 0.12.1's delivery, which runs one task per message per subscriber
(``Broker._run_broadcast``), drops QoS-1 messages in flight when PUBACK times out or the client
disconnects (``ProtocolHandler._handle_qos1_message_flow`` pops ``inflight_out`` in ``finally``), and
keeps nothing for anonymous sessions. Here each session owns one :class:`Outbox` for its lifetime:

- ``pending``: messages not sent yet, FIFO, bounded by ``limits.max_queued`` messages and
  ``limits.max_queued_bytes`` (payload + topic bytes). When full, new messages are dropped (as
  Mosquitto's ``max_queued_messages``/``max_queued_bytes`` do) and the drop is logged: a WARNING
  naming the first dropped message's topic and size, and one with the totals (messages, bytes) when
  the queue next empties or the session ends.
- a hold (:meth:`Outbox.hold`/:meth:`Outbox.release`): while a SUBSCRIBE's retained messages are
  collected in chunks, messages routed to the session wait behind them, so none overtakes them.
- ``control``: SUBACK and UNSUBACK, written by the same pump ahead of everything else (not behind a
  backlog or a full in-flight window, as Mosquitto does). So a SUBSCRIBE's SUBACK comes first, and its
  retained messages, queued in the same step, come before anything published after it.
- ``inflight``: QoS-1 messages sent but not PUBACKed, keyed by packet id, at most
  ``broker.max_inflight``. They survive a disconnect and are sent again, first, with DUP=1 and the
  same packet id when a persistent session reconnects (MQTT 3.1.1 §4.4), and again to a connected
  client that has not acknowledged them within ``broker.retry_interval`` seconds.

While the session is connected one pump task writes batches of packets under the handler's write
lock (amqtt's WebSocket writer loses bytes written during another writer's drain). The outbox belongs
to one connection at a time: only the connection it is attached to can detach it, so the late
teardown of a connection that was taken over cannot stop the pump of the one that replaced it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler

from fishim.broker.wire import encode_publish, kv

log = logging.getLogger("fishim.broker")

_BATCH = 256  # packets per write: big enough to amortise the lock and drain, small enough to be fair


class Delivery(NamedTuple):
    """One message for one session. ``recheck``: queued while offline, so authorise again at send."""

    topic: str
    topic_bytes: bytes
    payload: bytes
    qos: int
    retain: bool
    recheck: bool


class Outbox:
    """The outbound half of one MQTT session (see module docstring)."""

    def __init__(self, client_id: str, max_queued: int, max_inflight: int, retry_interval: float,
                 max_queued_bytes: int = 16 * 1024 * 1024) -> None:
        self.client_id = client_id
        self.max_queued = max_queued
        self.max_queued_bytes = max_queued_bytes
        self.pending_bytes = 0
        self.dropped_bytes = 0
        self._held: deque[Delivery] | None = None
        self.max_inflight = max_inflight
        self.retry_interval = retry_interval
        self.pending: deque[Delivery] = deque()
        self.control: list[bytes] = []
        self.inflight: dict[int, Delivery] = {}
        self.dropped = 0
        self._packet_id = 0
        self._wake = asyncio.Event()
        self._pump_task: asyncio.Task[None] | None = None
        self._handler: BrokerProtocolHandler | None = None
        self._resend = False

    @property
    def connected(self) -> bool:
        return self._pump_task is not None

    def put(self, delivery: Delivery) -> None:
        """Queue a message; QoS 0 is not kept for an offline session (MQTT 3.1.1 §3.1.2.4)."""
        if self._pump_task is None and delivery.qos == 0:
            return
        size = len(delivery.payload) + len(delivery.topic_bytes)
        held = self._held
        if len(self.pending) + (len(held) if held is not None else 0) >= self.max_queued \
                or self.pending_bytes + size > self.max_queued_bytes:
            self.dropped += 1
            self.dropped_bytes += size
            if self.dropped == 1:
                log.warning("queue_full %s", kv(client_id=self.client_id, max_queued=self.max_queued,
                                                 max_queued_bytes=self.max_queued_bytes,
                                                 queued=len(self.pending), queued_bytes=self.pending_bytes,
                                                 dropped=1, topic=delivery.topic, size=size))
            return
        self.pending_bytes += size
        if held is not None:
            held.append(delivery)
            return
        self.pending.append(delivery)
        self._wake.set()

    def hold(self) -> None:
        """Keep messages routed from now on aside until :meth:`release` (one hold at a time)."""
        if self._held is None:
            self._held = deque()

    def release(self, first: list[Delivery]) -> None:
        """Queue ``first`` (a SUBSCRIBE's retained messages), then what was held, in that order."""
        held, self._held = self._held or deque(), None
        self.pending_bytes -= sum(len(d.payload) + len(d.topic_bytes) for d in held)
        for delivery in (*first, *held):
            self.put(delivery if self.connected else delivery._replace(recheck=True))

    def put_packet(self, handler: BrokerProtocolHandler, packet: bytes) -> None:
        """Queue an encoded SUBACK/UNSUBACK for the connection ``handler`` (see ``control``).

        Dropped if ``handler`` does not own the outbox (its connection was taken over or is gone).
        """
        if handler is self._handler:
            self.control.append(packet)
            self._wake.set()

    def ack(self, packet_id: int) -> None:
        """PUBACK from the client: the message is delivered; the window has room again."""
        if self.inflight.pop(packet_id, None) is not None and self.pending:
            self._wake.set()

    def attach(
        self, handler: BrokerProtocolHandler, allowed: Callable[[str], bool], abort: Callable[[str], None]
    ) -> None:
        """The client is connected through ``handler``: resend what is in flight, then drain the queue.

        ``allowed(topic)`` is the receive check for messages queued while offline; ``abort(reason)``
        drops the connection when a write fails.
        """
        if self._pump_task is not None:  # never two pumps taking from one queue
            self._pump_task.cancel()
        self._handler = handler
        self._resend = bool(self.inflight)
        self._wake.set()
        self._pump_task = asyncio.create_task(self._pump(handler, allowed, abort), name=f"outbox-{self.client_id}")

    async def detach(self, handler: BrokerProtocolHandler) -> None:
        """The connection through ``handler`` is gone: stop writing, keep ``pending`` and ``inflight``.

        Does nothing if the outbox is attached to another connection (see module docstring).
        """
        if handler is not self._handler:
            return
        task, self._pump_task, self._handler = self._pump_task, None, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        # QoS 0 and acks are never kept offline; what stays is authorised again when it is finally sent
        self.control.clear()
        self.pending = deque(d._replace(recheck=True) for d in self.pending if d.qos)
        self.pending_bytes = sum(len(d.payload) + len(d.topic_bytes) for d in self.pending)
        if self._held is not None:
            self.pending_bytes += sum(len(d.payload) + len(d.topic_bytes) for d in self._held)

    def discard(self) -> None:
        """The session is deleted (clean session, takeover by a clean connect, shutdown)."""
        self.report_drops()
        self.pending.clear()
        self.pending_bytes = 0
        self.inflight.clear()

    def report_drops(self) -> None:
        """Log, once per overflow episode, how many messages the bound dropped."""
        if self.dropped:
            log.warning("queue_overflow %s", kv(client_id=self.client_id, dropped=self.dropped,
                                                 dropped_bytes=self.dropped_bytes, max_queued=self.max_queued,
                                                 max_queued_bytes=self.max_queued_bytes))
            self.dropped = self.dropped_bytes = 0

    async def _pump(
        self, handler: BrokerProtocolHandler, allowed: Callable[[str], bool], abort: Callable[[str], None]
    ) -> None:
        """Write whatever may be sent; sleep until a put, an ack or the retry interval."""
        try:
            while True:
                data = self._take_control() + self._take_resends() + self._take_batch(allowed)
                if data:
                    await self._write(handler, data)
                    continue
                if not self.pending:
                    self.report_drops()
                self._wake.clear()
                if self.inflight:
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.retry_interval)
                    except TimeoutError:
                        self._resend = True
                else:
                    await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the connection broke under us: end it, keep the messages
            log.debug("outbox_write_failed %s", kv(client_id=self.client_id, error=repr(exc)))
            abort("write_failed")

    def _take_control(self) -> bytes:
        if not self.control:
            return b""
        data, self.control = b"".join(self.control), []
        return data

    def _take_resends(self) -> bytes:
        """Every unacknowledged QoS-1 message again, DUP=1, same packet id [MQTT-4.4.0-1]."""
        if not self._resend:
            return b""
        self._resend = False
        return b"".join(encode_publish(d.topic_bytes, d.payload, d.qos, d.retain, packet_id, True)
                        for packet_id, d in self.inflight.items())

    def _take_batch(self, allowed: Callable[[str], bool]) -> bytes:
        """Up to _BATCH queued messages, QoS 1 only while the in-flight window has room."""
        packets: list[bytes] = []
        pending = self.pending
        while pending and len(packets) < _BATCH:
            delivery = pending[0]
            if delivery.qos and len(self.inflight) >= self.max_inflight:
                break
            pending.popleft()
            self.pending_bytes -= len(delivery.payload) + len(delivery.topic_bytes)
            if delivery.recheck and not allowed(delivery.topic):
                continue
            packet_id = 0
            if delivery.qos:
                packet_id = self._next_packet_id()
                self.inflight[packet_id] = delivery
            packets.append(encode_publish(delivery.topic_bytes, delivery.payload, delivery.qos,
                                          delivery.retain, packet_id, False))
        return b"".join(packets)

    def _next_packet_id(self) -> int:
        while True:
            self._packet_id = self._packet_id % 65535 + 1
            if self._packet_id not in self.inflight:
                return self._packet_id

    @staticmethod
    async def _write(handler: BrokerProtocolHandler, data: bytes) -> None:
        writer = handler.writer
        if writer is None:
            raise ConnectionError("handler detached")
        async with handler._write_lock:
            writer.write(data)
            await writer.drain()

"""fishim's subclass of amqtt 0.12.1's ``Broker``: connections, sessions, auth, routing, retained.

Kept from amqtt: the per-connection protocol handler (reader loop, PINGREQ, the inbound QoS-2 flow),
``_client_message_loop``, the subscription and retained tables, ``Session`` objects, its ``Server``
bookkeeping and ``shutdown``. Replaced, each because of a flaw measured (docs/broker.md) or found since
(docs/broker.md has the amqtt line references):

- connection setup (``_client_connected``, ``_initialize_client_session``, ``_handle_client_session``):
  authentication now happens before an existing session is touched, a persistent session is only
  resumed by the same principal, and no retained messages are sent on connect;
- the plugin system is bypassed: no default logging/$SYS plugins, and fishim's synchronous
  ``Authenticator``/``Authorizer`` decide instead of awaited plugin calls;
- routing (``_broadcast_message``/``_run_broadcast``): synchronous, min(publish, subscription) QoS,
  receive check per delivery, into each session's :class:`~fishim.broker.outbox.Outbox`;
- retained delivery only on SUBSCRIBE, per filter, each message receive-checked (and on a
  membership announcement, an order's retained messages to the sessions it newly lets read them);
  a client's retain flag is honoured only on the retained channels of docs/protocol.md;
- packet order: PUBLISH, SUBSCRIBE and UNSUBSCRIBE take effect in the order the client sent them
  (:class:`FishimHandler`); connection end: one future per connection, so no loss goes unnoticed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import ssl
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol, cast

import websockets
from amqtt.adapters import ReaderAdapter, StreamWriterAdapter, WebSocketsWriter, WriterAdapter
from amqtt.broker import Broker, RetainedApplicationMessage, Server
from amqtt.contexts import Action, BrokerConfig
from amqtt.contexts import ListenerConfig as AmqttListenerConfig
from amqtt.errors import AMQTTError, MQTTError, ProtocolHandlerError
from amqtt.mqtt.constants import QOS_1, QOS_2
from amqtt.mqtt.disconnect import DisconnectPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket
from amqtt.session import Session
from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from fishim.auth import LoginBusy
from fishim.broker.outbox import Delivery, Outbox
from fishim.broker.wire import (
    IDENTIFIER_REJECTED,
    NOT_AUTHORIZED,
    SERVER_UNAVAILABLE,
    ConnectRefused,
    ConnectRequest,
    GuardedReader,
    connack,
    kv,
    suback,
    unsuback,
)
from fishim.config import Config, ListenerConfig, TlsConfig
from fishim.ingest import Committed, Inbound, Kind, Result, Work
from fishim.messages import ErrorCode, ErrorMessage, Rejected
from fishim.presence import PresenceTracker, Token
from fishim.store import now_ms
from fishim.topics import TopicError, TopicRef, Topics, matches, parse

if TYPE_CHECKING:
    from collections.abc import Callable

    from fishim.auth import Principal
    from fishim.broker import Authenticator, Authorizer, RefusedCallback
    from fishim.broker.ingest import BrokerIngest, SyncWorker

log = logging.getLogger("fishim.broker")

STATE_KEY = "fishim.state"
_SUBSCRIBE_REFUSED = 0x80
_RETAINED_CHUNK = 2_000  # retained matches checked between two yields to the event loop
_SERVICE_ID_PREFIX = "fishim-"  # client ids reserved for the service account (with bridge.client_id)
_MATCH_CACHE_SIZE = 10_000
_TEARDOWN_TIMEOUT = 5.0
_CONNECTION_ERRORS = (OSError, ConnectionClosed, ProtocolHandlerError, AMQTTError, MQTTError)


class Pending(Protocol):
    """What waits for an ingested message's COMMIT: settled once, on the loop, with its result."""

    qos: int

    def settle(self, result: Result | None, acks: dict[FishimHandler, list[bytes]]) -> None: ...


@dataclass(slots=True)
class PubAck:
    """A client's QoS 0/1 PUBLISH: its PUBACK (if QoS 1) joins the batch's acks for its connection;
    not committed (None) closes the connection, so the client sends it again."""

    handler: FishimHandler
    packet_id: int | None
    qos: int

    def settle(self, result: Result | None, acks: dict[FishimHandler, list[bytes]]) -> None:
        if result is None:
            self.handler.core.background(self.handler.handle_connection_closed())
        elif self.packet_id is not None:
            acks.setdefault(self.handler, []).append(b"\x40\x02" + self.packet_id.to_bytes(2, "big"))


@dataclass(slots=True)
class Waiter:
    """Someone awaits the result (the HTTP API through ``EmbeddedBroker.submit``, inbound QoS 2)."""

    future: asyncio.Future[Result | None]
    qos: int

    def settle(self, result: Result | None, acks: dict[FishimHandler, list[bytes]]) -> None:
        if not self.future.done():
            self.future.set_result(result)


class ListenerError(OSError):
    """A listener could not be opened (port taken, bad certificate); ``str()`` is one line."""


@dataclass
class SessionState:
    """What fishim keeps on an amqtt ``Session`` (in ``session.attributes[STATE_KEY]``).

    Only what outlives a connection: per-connection state lives on the :class:`FishimHandler`, so a
    connection that was taken over cannot reach the one that replaced it.
    """

    principal: Principal
    outbox: Outbox
    filters: int = 0
    """Subscriptions the session holds (bounded by ``limits.max_subscriptions``)."""
    offline_since: float | None = None
    """Loop time the session last went offline (None while connected): for session expiry."""


def state_of(session: Session) -> SessionState:
    return session.attributes[STATE_KEY]


class FishimHandler(BrokerProtocolHandler):
    """amqtt's broker-side protocol handler (one per connection), applying packets as they are read.

    amqtt's reader loop starts one task per packet, and tasks start in creation order, so what a
    ``handle_*`` method does before its first ``await`` happens in the order the client sent the
    packets. QoS 0/1 PUBLISH, SUBSCRIBE, UNSUBSCRIBE and PUBACK are applied there, synchronously, as
    MQTT requires [MQTT-4.6.0]. amqtt instead queued them for ``_client_message_loop``: SUBSCRIBE and
    UNSUBSCRIBE on separate queues with separate waiters, so an UNSUBSCRIBE+SUBSCRIBE pair read
    together was applied in reverse about half the time (the client ended up unsubscribed), and a
    PUBLISH overtook a SUBSCRIBE sent before it. Inbound QoS 2 still goes through amqtt's flow and is
    routed on PUBREL.
    """

    graceful = False
    presence: Token | None = None  # this connection's place in the user's presence (fishim.presence)

    def __init__(self, core: FishimBroker, guard: GuardedReader) -> None:
        super().__init__(core.plugins_manager, loop=core._loop)
        self.core = core
        self.guard = guard
        self.ended: asyncio.Future[DisconnectPacket | None] = asyncio.get_running_loop().create_future()
        self.gate: asyncio.Future[None] | None = None
        """Set while a SUBSCRIBE's retained messages are being collected (in chunks, yielding to the
        loop): this connection's later packets wait for it, so they still apply in the order sent."""

    async def _pass_gate(self) -> None:
        """Wait until no earlier SUBSCRIBE of this connection is still sending retained messages.

        Waiters wake in the order they started waiting, which is the order the packets arrived."""
        while self.gate is not None:
            await asyncio.shield(self.gate)

    async def handle_publish(self, publish_packet: PublishPacket) -> None:
        qos = publish_packet.qos or 0
        if qos == QOS_2:  # amqtt's PUBREC/PUBREL flow, then FishimBroker._handle_message_delivery
            await super().handle_publish(publish_packet)
            return
        if self.gate is not None:
            await self._pass_gate()
        session, header = self.session, publish_packet.variable_header
        if session is None or header is None or publish_packet.data is None:
            return
        packet_id = header.packet_id if qos == QOS_1 else None
        try:
            pending = self.core.accept_publish(session, header.topic_name, publish_packet.data, qos,
                                               publish_packet.retain_flag, PubAck(self, packet_id, qos))
        except Exception:
            log.exception("publish_failed %s", kv(client_id=session.client_id, topic=header.topic_name))
            await self.handle_connection_closed()  # no PUBACK: the client sends it again on reconnect
            return
        if not pending and packet_id is not None:  # routed at once: acknowledge now
            await self.send_raw(b"\x40\x02" + packet_id.to_bytes(2, "big"))

    async def handle_puback(self, puback: PubackPacket) -> None:
        if self.session is not None and puback.variable_header is not None:
            state_of(self.session).outbox.ack(puback.variable_header.packet_id)

    async def handle_subscribe(self, subscribe: SubscribePacket) -> None:
        """Record the filters, queue SUBACK, then the granted filters' retained messages.

        All through the session's outbox, SUBACK first, and nothing routed after this SUBSCRIBE
        overtakes its retained messages (a stale status arriving after a fresh one). Filters past
        ``limits.max_subscriptions`` for the session get 0x80 (the wire guard already closed the
        connection if the packet itself had more than ``limits.max_filters_per_subscribe``).
        Collecting retained messages yields to the loop every ``_RETAINED_CHUNK`` matches
        (:meth:`FishimBroker.send_retained`), so one SUBSCRIBE cannot stall other clients.
        """
        if self.gate is not None:
            await self._pass_gate()
        session, header, payload = self.session, subscribe.variable_header, subscribe.payload
        if session is None or header is None or payload is None:
            return
        codes = [self.core.subscribe(session, topic_filter, qos) for topic_filter, qos in payload.topics]
        state_of(session).outbox.put_packet(self, suback(header.packet_id, codes))
        granted = [(f, code) for (f, _), code in zip(payload.topics, codes, strict=True)
                   if code != _SUBSCRIBE_REFUSED]
        if granted:
            await self.core.send_retained(self, session, granted)

    async def handle_unsubscribe(self, unsubscribe: UnsubscribePacket) -> None:
        if self.gate is not None:
            await self._pass_gate()
        session, header, payload = self.session, unsubscribe.variable_header, unsubscribe.payload
        if session is None or header is None or payload is None:
            return
        for topic_filter in payload.topics:
            self.core.unsubscribe(session, topic_filter)
        state_of(session).outbox.put_packet(self, unsuback(header.packet_id))

    async def handle_disconnect(self, disconnect: DisconnectPacket | None) -> None:
        """DISCONNECT, EOF, a failed write or ``stop()``: end the client loop; the first cause counts.

        amqtt's disconnect waiter only exists from the end of ``start()`` and is dropped once used,
        so a link lost between CONNACK and ``start()`` (a phone reconnecting on a dying network)
        resolved nothing: the session stayed "connected" forever, with no will, a takeover that
        timed out, and an outbox pump writing into a closed socket.
        """
        if not self.ended.done():
            self.ended.set_result(disconnect)

    async def wait_disconnect(self) -> DisconnectPacket | None:
        return await asyncio.shield(self.ended)

    async def stop(self) -> None:
        await super().stop()
        await self.handle_disconnect(None)  # broker shutdown stops handlers directly

    async def send_raw(self, data: bytes) -> None:
        """Write an already-encoded packet; a broken link ends the connection instead of raising."""
        writer = self.writer
        if writer is None:
            return
        try:
            async with self._write_lock:
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionClosed):
            await self.handle_connection_closed()


class FishimBroker(Broker):
    """amqtt's ``Broker`` with fishim's connection lifecycle, auth, routing and delivery."""

    def __init__(self, config: Config, authenticator: Authenticator, authorizer: Authorizer,
                 on_refused: RefusedCallback | None, ingest: BrokerIngest | None = None) -> None:
        amqtt_config = BrokerConfig(
            listeners={"default": AmqttListenerConfig(bind=None)},  # fishim opens its own (bind())
            plugins={},  # no EventLogger/PacketLogger/$SYS plugins (they cost 35-40% of throughput, docs/broker.md)
            timeout_disconnect_delay=0,
        )
        super().__init__(amqtt_config)
        self.fishim_config = config
        self.limits = config.limits
        self.authenticator = authenticator
        self.authorizer = authorizer
        # OrderAcl.set_members: membership committed by the ingest reaches the ACL before the batch
        # that changed it is routed. Optional, so any Authorizer still fits.
        self._set_members: Callable[[str, str | None, str | None], object] | None = getattr(
            authorizer, "set_members", None)
        self.on_refused = on_refused
        self.ingest = ingest
        self.sync: SyncWorker | None = None
        self.initial_retained: list[tuple[str, bytes, int]] = []  # from the store, held before serving
        self._head = config.prefix + "/"
        self._orders_head = f"{config.prefix}/orders/"
        self._service_user = config.bridge.username
        self.ports: dict[str, int] = {}
        self._bound: dict[str, asyncio.Server | WebSocketServer] = {}
        self._connections: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Future[Any]] = set()
        self._match_cache: dict[str, list[str]] = {}
        self._per_host: dict[str, int] = {}  # open connections per client address
        self._host_refusals: dict[str, int] = {}  # connections refused per address, this episode
        self.presence = PresenceTracker(Topics(config.prefix), self._publish_presence)
        # called on the loop after each batch is routed: the ingest hooks' after_commit (webhooks),
        # fishim.notify (the alert rules)
        self.after_commit: list[Callable[[list[Committed]], object]] = []

    def _publish_presence(self, topic: str, payload: bytes) -> None:
        """fishim's own retained message: routed (receive-checked) and kept for later subscribers."""
        self.route(topic, payload, QOS_1)
        self.store_retained(topic, payload, QOS_1)

    # -- listeners ---------------------------------------------------------------------------

    async def bind(self) -> None:
        """Open every configured listener (not yet accepting), on exactly its configured host."""
        try:
            for listener in self.fishim_config.mqtt_listeners:
                if listener.name in self._bound:
                    raise ListenerError(f"listener {listener.name}: duplicate listener name")
                server = await self._open_listener(listener)
                self._bound[listener.name] = server
                self.ports[listener.name] = next(iter(server.sockets)).getsockname()[1]
        except BaseException:
            self.close_listeners()
            raise

    def close_listeners(self) -> None:
        """Stop accepting connections (idempotent)."""
        for server in self._bound.values():
            server.close()

    async def _open_listener(self, listener: ListenerConfig) -> asyncio.Server | WebSocketServer:
        tls = _tls_context(listener.name, listener.tls) if listener.tls else None
        try:
            if listener.type == "ws":
                return await websockets.serve(
                    partial(self._on_websocket, listener=listener), listener.host, listener.port, ssl=tls,
                    subprotocols=[websockets.Subprotocol("mqtt")], compression=None, start_serving=False,
                    max_size=self.limits.max_payload + 2 * self.limits.max_topic_length + 1024,
                )
            return await asyncio.start_server(
                partial(self._on_tcp, listener=listener), listener.host, listener.port, ssl=tls,
                reuse_address=True, start_serving=False,
            )
        except OSError as exc:
            raise ListenerError(f"listener {listener.name}: cannot listen on {listener.bind}: "
                                f"{exc.strerror or exc}") from None

    async def _start_listeners(self) -> None:
        """amqtt hook: hold the stored retained values (amqtt's ``start`` cleared its table just
        before), start the housekeeping task, then start accepting on the sockets :meth:`bind` opened."""
        for topic, payload, qos in self.initial_retained:
            self.store_retained(topic, payload, qos)
        self.initial_retained = []
        self._background.add(asyncio.ensure_future(self._housekeeping()))
        for name, server in self._bound.items():
            self._servers[name] = Server(name, server)
            await server.start_serving()
            listener = next(lst for lst in self.fishim_config.listeners if lst.name == name)
            log.info("listening %s", kv(listener=name, type=listener.type, host=listener.host,
                                        port=self.ports[name], tls=int(listener.tls is not None)))

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                      listener: ListenerConfig) -> None:
        peer = _peer(writer.get_extra_info("peername"))
        guard = GuardedReader(partial(reader.read, 65536), writer.transport.abort, self.limits, peer)
        await self._serve(listener, guard, StreamWriterAdapter(writer))

    async def _on_websocket(self, connection: ServerConnection, *, listener: ListenerConfig) -> None:
        async def recv() -> bytes:
            try:
                message = await connection.recv()
            except ConnectionClosed:
                return b""
            return message if isinstance(message, bytes) else message.encode("utf-8")

        guard = GuardedReader(recv, connection.transport.abort, self.limits, _peer(connection.remote_address))
        await self._serve(listener, guard, WebSocketsWriter(connection))

    async def _client_connected(self, listener_name: str, reader: ReaderAdapter, writer: WriterAdapter) -> None:
        """amqtt's own connection path (used by external listeners) skips every fix: refuse it."""
        log.warning("connect_refused %s", kv(listener=listener_name, reason="external listeners unsupported"))
        await writer.close()

    async def _session_monitor(self) -> None:
        """amqtt's monitor drops anonymous sessions ~1 s after disconnect; fishim keeps them until
        ``broker.session_expiry`` (:meth:`_housekeeping`).

        Clean sessions are deleted by :meth:`_end_connection` as soon as they disconnect.
        """

    async def _housekeeping(self) -> None:
        """Expire persistent sessions (:meth:`expire_sessions`) and end the sessions of removed
        accounts (:meth:`revoke_removed_accounts`), every ``broker.account_check_interval`` seconds
        (more often if a quarter of the expiry is shorter). Runs from start to :meth:`close`."""
        broker = self.fishim_config.broker
        interval = broker.account_check_interval
        if broker.session_expiry:
            interval = min(interval, broker.session_expiry / 4)
        while True:
            await asyncio.sleep(interval)
            try:
                self.expire_sessions()
                await self.revoke_removed_accounts()
            except Exception:
                log.exception("housekeeping_failed")

    def expire_sessions(self) -> int:
        """Delete persistent sessions offline for longer than ``broker.session_expiry`` (seconds).

        With the session go its subscriptions, queued messages and its claim on the client id (any
        account may then use the id; reserved ids stay reserved). The service account's sessions
        never expire. Returns how many were deleted.
        """
        expiry = self.fishim_config.broker.session_expiry
        if not expiry:
            return 0
        cutoff = self._loop.time() - expiry
        expired = [session for session, _ in self._sessions.values()
                   if STATE_KEY in session.attributes and not session.transitions.is_connected()
                   and (state := state_of(session)).offline_since is not None
                   and state.offline_since <= cutoff and state.principal.role != "service"]
        for session in expired:
            state = state_of(session)
            log.info("session_expired %s", kv(client_id=session.client_id, user=state.principal.username,
                                              queued=len(state.outbox.pending),
                                              offline_s=f"{self._loop.time() - (state.offline_since or 0):.0f}"))
            self._discard(session)
        return len(expired)

    async def revoke_removed_accounts(self) -> int:
        """End every session (connected or not) of an account the authenticator no longer knows.

        Asks the authenticator's optional ``valid_principals(principals) -> set`` (in a worker
        thread: it may read the store) about every named principal with a session. A connected
        client is dropped without its will; the session, its subscriptions and queue are deleted.
        """
        check = getattr(self.authenticator, "valid_principals", None)
        principals = {state_of(s).principal for s, _ in self._sessions.values()
                      if STATE_KEY in s.attributes and not state_of(s).principal.anonymous}
        if check is None or not principals:
            return 0
        valid = await asyncio.to_thread(check, principals)
        revoked = [(session, handler) for session, handler in list(self._sessions.values())
                   if STATE_KEY in session.attributes and state_of(session).principal in principals - valid]
        for session, handler in revoked:
            log.warning("session_revoked %s", kv(client_id=session.client_id,
                                                 user=state_of(session).principal.username,
                                                 reason="account_removed"))
            session.will_flag = False
            if session.transitions.is_connected() and isinstance(handler, FishimHandler):
                session.clean_session = True  # _end_connection deletes it once the connection is down
                handler.guard.abort("account_removed")
            else:
                self._discard(session)
        return len(revoked)

    # -- connection lifecycle ----------------------------------------------------------------

    async def _serve(self, listener: ListenerConfig, guard: GuardedReader, writer: WriterAdapter) -> None:
        """One client connection, from CONNECT to teardown; never lets an exception escape."""
        task = asyncio.current_task()
        host = guard.peer.rpartition(":")[0].strip("[]")
        if not self._admit(host):
            guard.close()
            await _refuse(writer, None)
            return
        if task is not None:
            self._connections.add(task)
        try:
            opened = await self._open(listener, guard, writer)
            if opened is not None:
                await self._run(*opened)
        except Exception:
            log.exception("connection_failed %s", kv(client_id=guard.client_id, peer=guard.peer))
        finally:
            guard.close()
            if task is not None:
                self._connections.discard(task)
            self._release(host)

    def _admit(self, host: str) -> bool:
        """Count a new connection from ``host``; False if it already has
        ``limits.max_connections_per_address`` open (0: no cap). The connection is then closed
        before its CONNECT is read. Logged once per episode (a WARNING), with the total when the
        address drops back under the cap, so a flood of refusals cannot flood the log."""
        cap = self.limits.max_connections_per_address
        count = self._per_host.get(host, 0)
        if cap and count >= cap:
            refused = self._host_refusals.get(host, 0) + 1
            self._host_refusals[host] = refused
            if refused == 1:
                log.warning("connect_refused %s", kv(peer=host, reason="too_many_connections", limit=cap))
            return False
        self._per_host[host] = count + 1
        return True

    def _release(self, host: str) -> None:
        count = self._per_host.get(host, 0) - 1
        if count > 0:
            self._per_host[host] = count
        else:
            self._per_host.pop(host, None)
        refused = self._host_refusals.pop(host, 0)
        if refused:
            log.info("connections_refused %s", kv(peer=host, refused=refused,
                                                  limit=self.limits.max_connections_per_address))

    async def _open(self, listener: ListenerConfig, guard: GuardedReader,
                    writer: WriterAdapter) -> tuple[Session, FishimHandler] | None:
        """CONNECT, authenticate, claim the session, CONNACK: None if the connection was refused."""
        try:
            request = await guard.read_connect()
        except ConnectRefused as exc:
            level = logging.DEBUG if exc.quiet else logging.INFO if exc.return_code else logging.WARNING
            log.log(level, "connect_refused %s", kv(peer=guard.peer, listener=listener.name, reason=str(exc),
                                                    code=exc.return_code))
            await _refuse(writer, exc.return_code)
            return None
        principal, reason = await self._login(request, guard.peer, listener)
        if principal is None:
            log.info("connect_refused %s", kv(client_id=request.client_id, peer=guard.peer,
                                              listener=listener.name, user=request.username, reason=reason))
            busy = reason in ("authenticator_error", "login_busy")
            await _refuse(writer, SERVER_UNAVAILABLE if busy else NOT_AUTHORIZED)
            return None
        refusal = self._client_id_refusal(request.client_id, principal)
        if refusal is not None:
            log.warning("connect_refused %s", kv(client_id=request.client_id, peer=guard.peer,
                                                 listener=listener.name, user=principal.username,
                                                 role=principal.role, reason=refusal))
            await _refuse(writer, IDENTIFIER_REJECTED)
            return None
        if principal.role != "service" and not principal.anonymous:
            guard.limit_publish_rate(self.limits.publish_rate, self.limits.publish_burst)
        claimed = await self._claim_session(request, principal, guard)
        if claimed is None:
            await _refuse(writer, IDENTIFIER_REJECTED)
            return None
        session, present = claimed
        handler = FishimHandler(self, guard)
        handler.attach(session, guard, writer)
        session.transitions.connect()
        self._sessions[request.client_id] = (session, handler)  # no await since _claim_session: no race
        guard.on_oversize = lambda topic, _size, head: self._notify_refused(principal, topic, "too_large", head)
        await handler.send_raw(connack(present, 0))
        grace = self.fishim_config.broker.keepalive_grace
        guard.watch(request.keepalive * grace if request.keepalive else None)
        log.info("connected %s", kv(client_id=request.client_id, peer=guard.peer, listener=listener.name,
                                    user=principal.username, role=principal.role,
                                    clean=int(request.clean_session), session_present=int(present),
                                    keepalive=request.keepalive))
        if self._is_current(session, handler):  # not if taken over meanwhile: the outbox is no longer ours
            state_of(session).outbox.attach(handler, partial(self.authorizer.may_receive, principal), guard.abort)
            handler.presence = self.presence.connected(principal.username, principal.role, request.client_id)
        await handler.start()  # the reader: from here on SUBSCRIBEs queue their SUBACK in the outbox
        return session, handler

    async def _login(self, request: ConnectRequest, peer: str,
                     listener: ListenerConfig) -> tuple[Principal | None, str]:
        """The authenticator's verdict (sync or async), then the will topic's publish check."""
        try:
            result = self.authenticator.authenticate(request.username, request.password, peer, listener)
            principal = await result if inspect.isawaitable(result) else result
        except LoginBusy:
            return None, "login_busy"
        except Exception:
            log.exception("authenticator_failed %s", kv(client_id=request.client_id, peer=peer))
            return None, "authenticator_error"
        if principal is None:
            return None, "not_authorized"
        if request.will_topic is not None and not self.authorizer.may_publish(principal, request.will_topic):
            return None, "will_topic_forbidden"
        return principal, "ok"

    def _client_id_refusal(self, client_id: str, principal: Principal) -> str | None:
        """Why ``principal`` may not use ``client_id`` (answered with CONNACK 0x02), or None.

        A client id belongs to the principal whose session holds it, connected or persistent and
        offline: nobody else may resume it, take it over (kicking the owner off) or end it with a
        clean connect. The same username with another role, or an anonymous loopback login using
        a user's name, is another principal. Once the session is gone (clean disconnect, expiry,
        account removal) the id is free again. ``bridge.client_id`` and every id starting with
        ``fishim-`` are reserved for the service account, session or not. The anonymous loopback
        principal may use them too: it exists only while there are no accounts, when every local
        client is equally trusted and the bridge itself may be connected anonymously.
        """
        if not (principal.role == "service" or principal.anonymous) and (
                client_id == self.fishim_config.bridge.client_id or client_id.startswith(_SERVICE_ID_PREFIX)):
            return "client_id_reserved"
        current = self._sessions.get(client_id)
        if current is not None and STATE_KEY in current[0].attributes \
                and state_of(current[0]).principal != principal:
            return "client_id_owned"
        return None

    async def _claim_session(self, request: ConnectRequest, principal: Principal,
                             guard: GuardedReader) -> tuple[Session, bool] | None:
        """Take over a connected client id, then resume or replace its session (MQTT 3.1.1 §3.1.2.4).

        Only the session's own principal gets here (:meth:`_client_id_refusal`); the check is
        repeated after the takeover's wait in case another principal claimed the id meanwhile.
        """
        client_id = request.client_id
        while (current := self._sessions.get(client_id)) and current[0].transitions.is_connected():
            await self._evict(current[0], cast(FishimHandler, current[1]))  # fishim registers no other kind
        if (refusal := self._client_id_refusal(client_id, principal)) is not None:
            log.warning("connect_refused %s", kv(client_id=client_id, peer=guard.peer,
                                                 user=principal.username, reason=refusal))
            return None
        old = current[0] if current else None
        if old is not None and not request.clean_session and state_of(old).principal == principal:
            session, present = old, True
            state_of(session).offline_since = None
        else:
            if old is not None:
                self._discard(old)
            session, present = Session(), False
            session.client_id = client_id
            broker = self.fishim_config.broker
            session.attributes[STATE_KEY] = SessionState(principal, Outbox(
                client_id, self.limits.max_queued, self._inflight_window(principal, client_id),
                broker.retry_interval, self.limits.max_queued_bytes))
        session.clean_session = request.clean_session
        session.will_flag = request.will_topic is not None
        session.will_topic, session.will_message = request.will_topic, request.will_message
        session.will_qos, session.will_retain = request.will_qos, request.will_retain
        session.username = request.username
        session.keep_alive = 0  # enforced by GuardedReader.watch; 0 spares amqtt a wait_for task per read
        session.remote_address, _, port = guard.peer.rpartition(":")
        session.remote_port = int(port) if port.isdigit() else 0
        return session, present

    def _inflight_window(self, principal: Principal, client_id: str) -> int:
        """The bridge acks only after COMMIT, so its window must cover two group-commit batches or it
        idles waiting for PUBACKs (measured: 2.5k msg/s at 100 in flight, CPU-bound past 1,000)."""
        window = self.fishim_config.broker.max_inflight
        bridge = self.fishim_config.bridge
        if principal.role == "service" or (principal.anonymous and client_id == bridge.client_id):
            return max(window, 2 * bridge.batch_max)
        return window

    async def _evict(self, session: Session, handler: FishimHandler) -> None:
        """Close the connection ``handler`` holding ``session`` and wait for its teardown [MQTT-3.1.4-2].

        If the teardown hangs (or failed half-way), take the session from it anyway: stop its outbox
        pump, which would otherwise keep taking the session's messages, and mark the session
        disconnected. Whatever the old connection does when it finally finishes is confined to its
        own handler and guard (see :meth:`_handle_disconnect`, :meth:`Outbox.detach`).
        """
        log.info("session_takeover %s", kv(client_id=session.client_id))
        handler.guard.abort("taken_over")
        try:
            await asyncio.wait_for(handler.guard.finished.wait(), _TEARDOWN_TIMEOUT)
        except TimeoutError:
            log.warning("takeover_timeout %s", kv(client_id=session.client_id))
        if self._is_current(session, handler) and session.transitions.is_connected():
            await state_of(session).outbox.detach(handler)
            session.transitions.disconnect()

    async def _run(self, session: Session, handler: FishimHandler) -> None:
        try:
            await self._client_message_loop(session, handler)
        except _CONNECTION_ERRORS as exc:
            log.info("connection_error %s", kv(client_id=session.client_id, error=repr(exc)))
        finally:
            await self._end_connection(session, handler)

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        """amqtt hook: stop writing, publish the will (abnormal end), stop the handler, mark disconnected.

        Will and state change only while this connection still owns the client id, checked again
        after stopping the handler: a connection taken over (or removed by shutdown) meanwhile must
        not mark its successor's session disconnected, as amqtt's version did.
        """
        graceful = isinstance(disconnect_waiter.result(), DisconnectPacket)
        if isinstance(handler, FishimHandler):
            handler.graceful = graceful
        await state_of(client_session).outbox.detach(handler)
        if not graceful and client_session.will_flag and self._is_current(client_session, handler):
            self._publish_will(client_session)
        await self._stop_handler(handler)
        if self._is_current(client_session, handler):
            client_session.transitions.disconnect()

    async def _end_connection(self, session: Session, handler: FishimHandler) -> None:
        """After the client loop: make sure amqtt's disconnect ran, drop clean sessions, log once."""
        if session.transitions.is_connected() and self._is_current(session, handler):
            gone: asyncio.Future[Any] = self._loop.create_future()
            gone.set_result(None)
            await self._handle_disconnect(session, handler, gone)  # abnormal end: will is published
        await state_of(session).outbox.detach(handler)
        await self._stop_handler(handler)
        if session.clean_session and self._is_current(session, handler):
            self._discard(session)
        elif self._is_current(session, handler):
            state_of(session).offline_since = self._loop.time()
        reason = handler.guard.close_reason or ("disconnect" if handler.graceful else "connection_lost")
        log.info("disconnected %s", kv(client_id=session.client_id, reason=reason))
        self.presence.disconnected(handler.presence)

    def _is_current(self, session: Session, handler: BrokerProtocolHandler) -> bool:
        return self._sessions.get(session.client_id or "", (None, None))[1] is handler

    def _discard(self, session: Session) -> None:
        """Delete a session: its entry, subscriptions and queued messages."""
        if self._sessions.get(session.client_id or "", (None, None))[0] is session:
            del self._sessions[session.client_id or ""]
        self._drop_subscriptions(session)
        state_of(session).outbox.discard()
        session.clear_queues()

    # -- publish and routing -----------------------------------------------------------------

    def accept_publish(self, session: Session, topic: str, data: bytes | bytearray, qos: int,
                       retain: bool, tag: Pending | None = None) -> bool:
        """A client's PUBLISH: ACL check, then ingest (order tree) or route. Refusals are reported.

        With an ingest, a message on the order tree (or a sync request) is only routed once it is
        committed, and ``tag`` is settled then (the PUBACK); True is returned. Other topics under
        the prefix are fishim's own (errors, presence, notify, system, sync events): only the broker
        publishes there. Without an ingest (``fishim broker``), or outside the prefix, what the ACL
        allows is routed at once and False is returned: the caller acknowledges it.
        """
        principal = state_of(session).principal
        if topic.startswith("$") or not self.authorizer.may_publish(principal, topic):
            return self._refuse_publish(session, principal, topic, bytes(data), "not allowed to publish", tag)
        payload = bytes(data)
        if self.ingest is None or not topic.startswith(self._head):
            self.route(topic, payload, qos)
            if retain and self._retainable(topic):
                self.store_retained(topic, payload, qos)
            return False
        if not (topic.startswith(self._orders_head) or topic.endswith("/request")):
            return self._refuse_publish(session, principal, topic, payload, "only fishim publishes", tag)
        return self.submit(Inbound(topic, payload, bound_user(principal, self._service_user), tag=tag,
                                   role=principal.role))

    def _refuse_publish(self, session: Session, principal: Principal, topic: str, payload: bytes,
                        why: str, tag: Pending | None) -> bool:
        log.info("publish_refused %s", kv(client_id=session.client_id, user=principal.username,
                                          topic=topic, reason="forbidden"))
        if self.ingest is None:
            self._notify_refused(principal, topic, "forbidden")
            return False
        refusal = Rejected(ErrorCode.FORBIDDEN, f"{why} to {topic}")
        return self.submit(Inbound(topic, payload, principal.username, refusal, tag=tag))

    def submit(self, inbound: Inbound) -> bool:
        """Hand one message to the ingest; its tag is settled after its COMMIT (:meth:`committed`).

        While shutting down the ingest takes nothing: the tag is settled with None at once (no
        PUBACK, the connection is closed, the client sends it again to the next broker).
        """
        assert self.ingest is not None
        if not self.ingest.submit(inbound):
            acks: dict[FishimHandler, list[bytes]] = {}
            if inbound.tag is not None:
                inbound.tag.settle(None, acks)
        return True

    def wait_for(self, inbound: Inbound, qos: int = QOS_1) -> asyncio.Future[Result | None]:
        """Submit ``inbound`` and return a future for its result (None: not committed)."""
        future: asyncio.Future[Result | None] = self._loop.create_future()
        inbound.tag = Waiter(future, qos)
        self.submit(inbound)
        return future

    def committed(self, batch: list[Inbound], work: Work) -> None:
        """After a COMMIT (on the loop, in commit order): ACL first, then route, then PUBACK.

        Membership changes reach the ACL before anything of the batch is routed, so a newly assigned
        rider receives the ``assigned`` status itself, and a rider assigned away nothing after it.
        The batch's PUBACKs go out together, one write per connection.
        """
        if self._set_members is not None:
            for order in work.membership.values():
                self._set_members(order.id, order.customer, order.rider)
        acks: dict[FishimHandler, list[bytes]] = {}
        if len(work.results) != len(batch):  # not committed (stopping with the store unavailable)
            for m in batch:
                if m.tag is not None:
                    m.tag.settle(None, acks)
            return
        for m, result in zip(batch, work.results, strict=True):
            self._deliver(m, result)
            if m.tag is not None:
                m.tag.settle(result, acks)
        for handler, packets in acks.items():
            self.background(handler.send_raw(b"".join(packets)))
        for hook in self.after_commit:  # e.g. fishim.notify: queues the events for the alert rules
            try:
                hook(work.committed)
            except Exception:
                log.exception("after_commit_hook_failed")

    def _deliver(self, m: Inbound, result: Result) -> None:
        """Route one committed result: its events (stamped), the sender's error, or a sync reply."""
        if result.kind is Kind.STORED:
            qos = m.tag.qos if m.tag is not None else QOS_1
            for event in result.events:
                self.route(event.topic, event.payload, qos)
                if event.ref.retained:
                    self.store_retained(event.topic, event.payload, QOS_1)
                qos = QOS_1  # automatic follow-ups go out at QoS 1
        if result.error is not None and result.error_to is not None:  # a refusal, or a stored one's warning
            self.route(f"{self._head}errors/{result.error_to}", result.error_payload, QOS_1)
        if result.kind is Kind.SYNC and self.sync is not None and result.ref is not None:
            self.background(self._answer_sync(result.ref, m.payload))
        elif result.kind is Kind.CLEARED and m.user is not None:
            error = ErrorMessage(topic=m.topic, error=ErrorCode.BAD_JSON, ts=now_ms(),
                                 detail="an empty payload cannot clear an order's retained state")
            self.route(f"{self._head}errors/{m.user}", error.model_dump_json(exclude_none=True).encode(), QOS_1)

    async def _answer_sync(self, ref: TopicRef, payload: bytes) -> None:
        assert self.sync is not None
        for topic, page in await self.sync.answer(ref, payload):
            self.route(topic, page, QOS_1)

    def background(self, coro: Any) -> None:
        """Run ``coro`` as a task the broker keeps (and cancels at shutdown); failures are logged."""
        future = asyncio.ensure_future(coro)
        self._background.add(future)
        future.add_done_callback(self._background_done)

    def _publish_will(self, session: Session) -> None:
        """The will of a connection that ended without DISCONNECT, published as its owner NOW.

        Authorised and validated when it fires, exactly like a PUBLISH from that session (ACL with
        the current membership, then the ingest's checks): a rider assigned away since it connected,
        or a will naming another sender, is refused like any other publish.
        """
        topic, message = session.will_topic, session.will_message
        if topic is None or message is None:
            return
        self.accept_publish(session, topic, bytes(message), session.will_qos or 0, bool(session.will_retain))

    def _retainable(self, topic: str) -> bool:
        """May a client's retain flag keep ``topic``? Only the retained channels of docs/protocol.md
        (status, location, receipts): a retained chat or picks message would be replayed to every
        later subscriber as if it were current state. Such a publish is still delivered live.
        ``may_publish`` has no retain argument, so the broker decides; MQTT 3.1.1 has no way to say
        "not retained" to the client, so it is logged at DEBUG only.
        """
        try:
            if parse(topic, self.fishim_config.prefix).retained:
                return True
        except TopicError:
            pass
        log.debug("retain_ignored %s", kv(topic=topic))
        return False

    def route(self, topic: str, payload: bytes, qos: int) -> int:
        """Queue ``payload`` for every session that subscribed to ``topic`` and may read it.

        Delivery QoS is min(publish QoS, subscription QoS) (MQTT 3.1.1 §3.8.4; amqtt used the
        subscription's). Overlapping filters deliver once, at the highest of their QoS.
        """
        targets: dict[str, tuple[Session, int]] = {}
        table = self._subscriptions
        for topic_filter in self._filters_matching(topic):
            for session, sub_qos in table.get(topic_filter, ()):
                granted = sub_qos if sub_qos < qos else qos
                best = targets.get(session.client_id or "")
                if best is None or granted > best[1]:
                    targets[session.client_id or ""] = (session, granted)
        topic_bytes = topic.encode("utf-8")
        may_receive = self.authorizer.may_receive
        queued = 0
        for session, granted in targets.values():
            state: SessionState | None = session.attributes.get(STATE_KEY)
            if state is None or not may_receive(state.principal, topic):
                continue
            outbox = state.outbox
            outbox.put(Delivery(topic, topic_bytes, payload, granted, False, not outbox.connected))
            queued += 1
        return queued

    def _subscribers(self, topic: str) -> dict[str, tuple[SessionState, int]]:
        """Sessions subscribed to ``topic`` (by client id), each with its highest subscription QoS."""
        found: dict[str, tuple[SessionState, int]] = {}
        for topic_filter in self._filters_matching(topic):
            for session, sub_qos in self._subscriptions.get(topic_filter, ()):
                state: SessionState | None = session.attributes.get(STATE_KEY)
                best = found.get(session.client_id or "")
                if state is not None and (best is None or sub_qos > best[1]):
                    found[session.client_id or ""] = (state, sub_qos)
        return found

    def store_retained(self, topic: str, payload: bytes, qos: int) -> None:
        """Keep the last retained message per topic; an empty payload clears it [MQTT-3.3.1-10]."""
        if payload:
            self._retained_messages[topic] = RetainedApplicationMessage(None, topic, payload, qos)
        else:
            self._retained_messages.pop(topic, None)

    def _filters_matching(self, topic: str) -> list[str]:
        """Subscription filters matching ``topic``, cached until the set of filters changes."""
        found = self._match_cache.get(topic)
        if found is None:
            if len(self._match_cache) >= _MATCH_CACHE_SIZE:
                self._match_cache.clear()
            found = self._match_cache[topic] = [f for f in self._subscriptions if matches(topic, f)]
        return found

    def _notify_refused(self, principal: Principal, topic: str, reason: str, head: bytes = b"") -> None:
        """Tell the ingest (dead letter + error), else call ``on_refused``; never raises."""
        if self.ingest is not None:
            code, detail = ((ErrorCode.TOO_LARGE, f"payload over limits.max_payload ({self.limits.max_payload} "
                             "bytes)") if reason == "too_large" else (ErrorCode.FORBIDDEN, f"not allowed to {topic}"))
            self.submit(Inbound(topic, head, principal.username, Rejected(code, detail)))
            return
        if self.on_refused is None:
            return
        try:
            result = self.on_refused(principal, topic, reason)
        except Exception:
            log.exception("on_refused_failed %s", kv(topic=topic, reason=reason))
            return
        if inspect.isawaitable(result):
            future = asyncio.ensure_future(result)
            self._background.add(future)
            future.add_done_callback(self._background_done)

    def _background_done(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("on_refused_failed %s", kv(error=repr(future.exception())))

    # amqtt hooks routed to the above ----------------------------------------------------------

    async def _broadcast_message(self, session: Session | None, topic: str | None,
                                 data: bytes | bytearray | None, force_qos: int | None = None) -> None:
        """amqtt hook (BrokerContext): route now instead of via the broadcast queue and tasks."""
        if topic is not None and data is not None:
            self.route(topic, bytes(data), QOS_1 if force_qos is None else force_qos)

    async def retain_message(self, source_session: Session | None, topic_name: str | None,
                             data: bytes | bytearray | None, qos: int | None = None) -> None:
        """amqtt hook (BrokerContext): same store, without a plugin event."""
        if topic_name is not None:
            self.store_retained(topic_name, bytes(data or b""), qos or 0)

    async def _handle_message_delivery(self, client_session: Session, handler: BrokerProtocolHandler,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        """amqtt hook, reached only by inbound QoS 2 (QoS 0/1 are routed in FishimHandler)."""
        message = wait_deliver.result()
        if message is not None:
            future: asyncio.Future[Result | None] = self._loop.create_future()
            if self.accept_publish(client_session, message.topic, message.data, message.qos or 0, message.retain,
                                   Waiter(future, QOS_1)):
                await future
        return True

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """amqtt hook, kept as a safety net: any amqtt path still asking gets fishim's Authorizer."""
        state: SessionState | None = session.attributes.get(STATE_KEY)
        if state is None:
            return False
        check = {Action.PUBLISH: self.authorizer.may_publish, Action.SUBSCRIBE: self.authorizer.may_subscribe,
                 Action.RECEIVE: self.authorizer.may_receive}[action]
        return check(state.principal, topic)

    # -- subscriptions (applied by FishimHandler, in packet order) ------------------------------

    def subscribe(self, session: Session, topic_filter: str, qos: int) -> int:
        """Authorise and record one filter; QoS granted is at most 1 (fishim never sends QoS 2).

        A repeated filter replaces the old subscription's QoS [MQTT-3.8.4-3] (amqtt kept the old one).
        """
        state: SessionState | None = session.attributes.get(STATE_KEY)
        if state is None or not _valid_filter(topic_filter) or not self.authorizer.may_subscribe(
                state.principal, topic_filter):
            log.info("subscribe_refused %s", kv(client_id=session.client_id, topic_filter=topic_filter,
                                                user=state.principal.username if state else None))
            return _SUBSCRIBE_REFUSED
        granted = min(qos, QOS_1)
        entries = self._subscriptions.get(topic_filter)
        held = entries is not None and any(s.client_id == session.client_id for s, _ in entries)
        if not held and state.filters >= self.limits.max_subscriptions:
            log.info("subscribe_refused %s", kv(client_id=session.client_id, topic_filter=topic_filter,
                                                user=state.principal.username, reason="too_many_subscriptions",
                                                limit=self.limits.max_subscriptions))
            return _SUBSCRIBE_REFUSED
        if entries is None:
            entries = self._subscriptions[topic_filter] = []
            self._match_cache.clear()
        if held:
            entries[:] = [(s, q) for s, q in entries if s.client_id != session.client_id]
        else:
            state.filters += 1
        entries.append((session, granted))
        log.debug("subscribed %s", kv(client_id=session.client_id, topic_filter=topic_filter, qos=granted))
        return granted

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        """amqtt hook (``BrokerContext.add_subscription``): same as :meth:`subscribe`."""
        return self.subscribe(session, *subscription)

    def unsubscribe(self, session: Session, topic_filter: str) -> None:
        """Drop ``session``'s subscription to exactly ``topic_filter``, if it has one."""
        entries = self._subscriptions.get(topic_filter)
        if entries is None:
            return
        before = len(entries)
        entries[:] = [(s, q) for s, q in entries if s.client_id != session.client_id]
        state: SessionState | None = session.attributes.get(STATE_KEY)
        if state is not None and len(entries) < before:
            state.filters -= 1
        if not entries:
            del self._subscriptions[topic_filter]
            self._match_cache.clear()
        log.debug("unsubscribed %s", kv(client_id=session.client_id, topic_filter=topic_filter))

    async def send_retained(self, handler: FishimHandler, session: Session,
                            filters: list[tuple[str, int]]) -> None:
        """Retained messages for a SUBSCRIBE's granted ``filters``, without holding the loop.

        Each retained message the SUBSCRIBE matches is sent once, at the highest QoS its filters
        grant (MQTT 3.1.1 §3.3.5 allows either; 64 copies of one filter must not mean 64 copies of
        every status). Matching runs on a snapshot and yields to the loop every ``_RETAINED_CHUNK``
        checks; meanwhile the session's outbox holds what is routed to it (:meth:`Outbox.hold`) and
        the connection's later packets wait (``handler.gate``), so the order is as if it had all
        happened in one step. Small jobs finish without yielding.
        """
        retained = list(self._retained_messages.items())
        state = state_of(session)
        if len(filters) * len(retained) > _RETAINED_CHUNK:
            gate = handler.gate = self._loop.create_future()
            state.outbox.hold()
        else:
            gate = None
        found: dict[str, Delivery] = {}
        try:
            budget = _RETAINED_CHUNK
            for topic_filter, granted in filters:
                for topic, message in retained:
                    budget -= 1
                    if not budget:
                        budget = _RETAINED_CHUNK
                        await asyncio.sleep(0)
                    qos = min(message.qos or 0, granted)
                    seen = found.get(topic)
                    if (seen is None or seen.qos < qos) and matches(topic, topic_filter) \
                            and self.authorizer.may_receive(state.principal, topic):
                        found[topic] = Delivery(topic, topic.encode("utf-8"), bytes(message.data), qos, True,
                                                not state.outbox.connected)
        finally:
            if gate is None:
                for delivery in found.values():
                    state.outbox.put(delivery)
            else:
                state.outbox.release(list(found.values()))
                handler.gate = None
                gate.set_result(None)

    def queue_retained(self, session: Session, topic_filter: str, granted: int) -> None:
        """Retained messages for one new subscription, each passing the receive check."""
        state = state_of(session)
        may_receive = self.authorizer.may_receive
        for topic, message in self._retained_messages.items():
            if matches(topic, topic_filter) and may_receive(state.principal, topic):
                self._queue_retained_message(state, topic, message, granted)

    @staticmethod
    def _queue_retained_message(state: SessionState, topic: str, message: RetainedApplicationMessage,
                                granted: int) -> None:
        """One retained message into a session's outbox: retain=1, min(retained, subscription) QoS."""
        qos = min(message.qos or 0, granted)
        state.outbox.put(Delivery(topic, topic.encode("utf-8"), bytes(message.data), qos, True,
                                  not state.outbox.connected))

    def _drop_subscriptions(self, session: Session) -> None:
        state: SessionState | None = session.attributes.get(STATE_KEY)
        if state is not None:
            state.filters = 0
        for topic_filter in list(self._subscriptions):
            entries = [(s, q) for s, q in self._subscriptions[topic_filter] if s.client_id != session.client_id]
            if entries:
                self._subscriptions[topic_filter] = entries
            else:
                del self._subscriptions[topic_filter]
        self._match_cache.clear()

    async def _del_all_subscriptions(self, session: Session) -> None:
        """amqtt hook (shutdown, ``_delete_session``): same as :meth:`_drop_subscriptions`."""
        self._drop_subscriptions(session)

    # -- shutdown ----------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop accepting, end every session (no wills), wait for the connections to finish."""
        self.close_listeners()
        for state in (state_of(s) for s, _ in self._sessions.values() if STATE_KEY in s.attributes):
            state.outbox.report_drops()
        await self.shutdown()
        if self._connections:
            _done, pending = await asyncio.wait(self._connections, timeout=_TEARDOWN_TIMEOUT)
            for task in pending:
                task.cancel()
        for future in list(self._background):
            future.cancel()

    def connected_count(self) -> int:
        return sum(1 for session, _ in self._sessions.values() if session.transitions.is_connected())


def bound_user(principal: Principal, service_user: str) -> str | None:
    """Whose name the envelope ``sender`` must carry: the login, except for anonymous loopback
    clients (no accounts yet) and the service account (it publishes on the shop's behalf)."""
    if principal.anonymous or principal.role == "service" or principal.username == service_user:
        return None
    return principal.username


def _valid_filter(topic_filter: str) -> bool:
    """'#' only as the whole last level, '+' only as a whole level [MQTT-4.7.1-2/3]."""
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            return False
        if "+" in level and level != "+":
            return False
    return True


def _peer(address: Any) -> str:
    if not address:
        return "unknown"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _tls_context(name: str, tls: TlsConfig) -> ssl.SSLContext:
    """Server TLS from PEM files; with ``ca``, client certificates are requested and verified."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.ca is not None:
            context.load_verify_locations(tls.ca)
            context.verify_mode = ssl.CERT_OPTIONAL
    except (OSError, ssl.SSLError) as exc:
        raise ListenerError(f"listener {name}: cannot load TLS files: {exc}") from None
    return context


async def _refuse(writer: WriterAdapter, return_code: int | None) -> None:
    """Answer a refused CONNECT with CONNACK ``return_code`` (if any) and close, never raising."""
    try:
        if return_code is not None:
            writer.write(connack(False, return_code))
            await writer.drain()
        await asyncio.wait_for(writer.close(), 2.0)
    except (OSError, ConnectionClosed, TimeoutError):
        pass

"""The embedded MQTT 3.1.1 broker: amqtt 0.12.1, hardened (docs/broker.md says what and why).

Public API::

    broker = EmbeddedBroker(config, authenticator=..., authorizer=..., on_refused=...)
    await broker.start()
    await broker.publish("fishim/errors/alice", b"{...}", qos=1)
    broker.sessions_connected()
    broker.stop_accepting()     # optional first step of a shutdown
    await broker.stop()


The authenticator runs once per CONNECT (it may be async). The authorizer runs on every publish,
subscribe and delivery, on the broker's event loop: keep its methods cheap and non-blocking.
Every log line goes to the ``fishim.broker`` logger as ``event key=value ...``; passwords never do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from fishim.auth import Principal
from fishim.broker.core import FishimBroker, ListenerError, bound_user
from fishim.broker.ingest import BrokerIngest, SyncWorker
from fishim.broker.wire import kv
from fishim.config import Config, ListenerConfig
from fishim.ingest import Inbound, Verdict
from fishim.messages import ErrorCode, Rejected

__all__ = [
    "AllowAll",
    "Authenticator",
    "Authorizer",
    "EmbeddedBroker",
    "ListenerError",
    "LoopbackAnonymous",
    "Principal",
    "RefusedCallback",
]

log = logging.getLogger("fishim.broker")

RefusedCallback = Callable[[Principal, str, str], Awaitable[None] | None]
"""``on_refused(principal, topic, reason)``: a publish was not delivered.

``reason`` is ``"forbidden"`` (the authorizer said no; a QoS-1 publish was still PUBACKed, as
MQTT 3.1.1 has no negative acknowledgement) or ``"too_large"`` (payload over
``limits.max_payload``; the connection was closed). fishim uses it to send an ``errors`` message. It
runs on the broker's loop: return quickly, or return an awaitable to have it run in the background.
"""


class Authenticator(Protocol):
    """Decides who a CONNECT is. ``None`` refuses it (CONNACK 0x05). May be ``async def``."""

    def authenticate(
        self, username: str | None, password: str | None, peer: str, listener: ListenerConfig
    ) -> Principal | Awaitable[Principal | None] | None: ...


class Authorizer(Protocol):
    """Topic ACL. Called per publish, subscribe and delivery: must be cheap and must not block."""

    def may_publish(self, principal: Principal, topic: str) -> bool: ...

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool: ...

    def may_receive(self, principal: Principal, topic: str) -> bool: ...


class LoopbackAnonymous:
    """Anyone on a loopback listener, as an anonymous principal; nobody on any other listener.

    docs/protocol.md: with no users in the store the broker accepts anonymous clients on loopback only,
    as Mosquitto 2 does. Credentials, if sent, are ignored (there is nothing to check them against).
    """

    def authenticate(
        self, username: str | None, password: str | None, peer: str, listener: ListenerConfig
    ) -> Principal | None:
        return Principal(username=None, role=None) if listener.is_loopback else None


class AllowAll:
    """Every principal may publish, subscribe and receive everything (the no-users default)."""

    def may_publish(self, principal: Principal, topic: str) -> bool:
        return True

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        return True

    def may_receive(self, principal: Principal, topic: str) -> bool:
        return True


class EmbeddedBroker:
    """amqtt's broker with fishim's listeners, sessions, ACL and delivery guarantees.

    Create it anywhere; call every method on the event loop that ran :meth:`start` (from another
    thread, go through ``asyncio.run_coroutine_threadsafe``).
    """

    def __init__(
        self,
        config: Config,
        authenticator: Authenticator | None = None,
        authorizer: Authorizer | None = None,
        on_refused: RefusedCallback | None = None,
        ingest: BrokerIngest | None = None,
    ) -> None:
        self.config = config
        self.authenticator: Authenticator = authenticator or LoopbackAnonymous()
        self.authorizer: Authorizer = authorizer or AllowAll()
        self.on_refused = on_refused
        self.ingest = ingest
        self._core: FishimBroker | None = None
        self._sync: SyncWorker | None = None

    @property
    def core(self) -> FishimBroker:
        """The running amqtt broker (for tests and diagnostics)."""
        if self._core is None:
            raise RuntimeError("broker not started")
        return self._core

    async def start(self) -> None:
        """Open every listener and start serving; with an ingest, only once the store is ready.

        The retained values come from the store before the first client is accepted, and the
        ingest's writer runs before anything can be published.

        Raises:
            ListenerError: a listener could not be opened (one-line message, nothing left open).
        """
        if self._core is not None:
            raise RuntimeError("broker already started")
        core = FishimBroker(self.config, self.authenticator, self.authorizer, self.on_refused, self.ingest)
        await core.bind()
        try:
            if self.ingest is not None:
                self._start_ingest(core, self.ingest)
            await core.start()
        except BaseException:
            core.close_listeners()
            raise
        self._core = core
        log.info("broker_started %s", kv(listeners=len(self.config.listeners),
                                         max_queued=self.config.limits.max_queued,
                                         max_payload=self.config.limits.max_payload,
                                         durable=int(self.ingest is not None)))

    def _start_ingest(self, core: FishimBroker, ingest: BrokerIngest) -> None:
        rows = ingest.open()
        core.initial_retained = [(row.topic, row.payload, row.qos) for row in rows]
        core.sync = self._sync = SyncWorker(self.config, ingest)
        core.after_commit.extend(ingest.after_commit_hooks())
        ingest.start(asyncio.get_running_loop(), core.committed)
        log.info("retained_loaded %s", kv(count=len(rows)))

    async def submit(self, principal: Principal, topic: str, payload: bytes) -> Verdict:
        """Validate, commit and route ``payload`` as if ``principal`` had published it (QoS 1).

        For fishim's other front doors (the HTTP API): the same ACL, ingest, errors and dead letters
        as MQTT. The ``sender`` field must be ``principal``'s name unless it is the service account.
        """
        core = self.core
        if core.ingest is None:
            raise RuntimeError("broker runs without an ingest (fishim broker): nothing to submit to")
        if not self.authorizer.may_publish(principal, topic):
            rejected = Rejected(ErrorCode.FORBIDDEN, f"not allowed to publish to {topic}")
            future = core.wait_for(Inbound(topic, payload, principal.username, rejected))
        else:
            future = core.wait_for(Inbound(topic, payload, bound_user(principal, self.config.bridge.username),
                                           role=principal.role))
        return Verdict.of(await future)

    def stop_accepting(self) -> None:
        """Close the listening sockets; connected clients stay until :meth:`stop` (e.g. while the
        bridge drains during shutdown)."""
        if self._core is not None:
            self._core.close_listeners()

    async def stop(self) -> None:
        """Stop accepting, commit what the ingest holds (and acknowledge it), close every session (no
        wills are sent) and return when all is closed."""
        core = self._core
        if core is None:
            return
        core.close_listeners()
        if self.ingest is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.ingest.stop)
            await asyncio.sleep(0)  # the last commit's callback: route and PUBACK before closing
        self._core = None
        await core.close()
        if self._sync is not None:
            self._sync.close()
        log.info("broker_stopped")

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> int:
        """Publish on the broker's own behalf (errors, system messages); returns sessions reached.

        Not subject to ``may_publish``; each delivery is still subject to ``may_receive``.
        """
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            raise ValueError(f"not a topic name: {topic!r}")
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, not {qos!r}")
        core = self.core
        payload = bytes(payload)
        reached = core.route(topic, payload, qos)
        if retain:
            core.store_retained(topic, payload, qos)
        return reached

    def sessions_connected(self) -> int:
        """Clients connected right now (persistent sessions that are offline are not counted)."""
        return self._core.connected_count() if self._core is not None else 0

    def port(self, listener: str | None = None) -> int:
        """The port a listener is bound to (useful with ``bind: 127.0.0.1:0``); default the first."""
        ports = self.core.ports
        return ports[listener] if listener is not None else ports[self.config.listeners[0].name]

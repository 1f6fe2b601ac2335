"""Who is online: the broker's view of each user's connections, published on ``{prefix}/presence/{user}``.

The broker calls :meth:`PresenceTracker.connected` once a CONNECT is accepted and
:meth:`PresenceTracker.disconnected` when that connection ends, however it ends (DISCONNECT, a lost
link, or a keepalive drop after ``broker.keepalive_grace`` times the keepalive). No will is needed, so a
phone that vanishes is shown offline as soon as the broker gives up on it.

A user is online while at least one of its devices (client ids) is connected. A client id taken over
by a new connection stays one device: each connection gets a token, and only the end of the
connection currently holding the client id counts. Each change of state or device count is
published retained (QoS 1) and handed to listeners (the alert service watches riders).

Runs on the broker's event loop; no locks, no I/O besides the ``publish`` callback.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from fishim.messages import PresenceMessage
from fishim.store import now_ms
from fishim.topics import Topics, is_name

log = logging.getLogger("fishim.presence")

Publish = Callable[[str, bytes], object]
Listener = Callable[[PresenceMessage], object]


@dataclass(frozen=True)
class Token:
    """One accepted connection, as the tracker knows it."""

    user: str
    client_id: str
    serial: int


class PresenceTracker:
    """Counts each user's connected devices and publishes the user's presence when it changes.

    Args:
        topics: builds ``{prefix}/presence/{user}``.
        publish: ``publish(topic, payload)``, retained at QoS 1 (the broker's own route + retain).
        clock: epoch milliseconds (injected in tests).
        skip_roles: roles whose presence is nobody's business (the service account).
    """

    def __init__(self, topics: Topics, publish: Publish, clock: Callable[[], int] = now_ms,
                 skip_roles: frozenset[str] = frozenset({"service"})) -> None:
        self.topics = topics
        self.publish = publish
        self.clock = clock
        self.skip_roles = skip_roles
        self.listeners: list[Listener] = []
        self._devices: dict[str, dict[str, int]] = {}
        self._state: dict[str, PresenceMessage] = {}
        self._serial = itertools.count(1)

    def connected(self, user: str | None, role: str | None, client_id: str) -> Token | None:
        """An accepted connection of ``user``; returns the token to give back on its end."""
        if not user or not is_name(user) or role in self.skip_roles:
            return None
        token = Token(user, client_id, next(self._serial))
        devices = self._devices.setdefault(user, {})
        devices[client_id] = token.serial
        self._update(user)
        return token

    def disconnected(self, token: Token | None) -> None:
        """The connection behind ``token`` ended; ignored if its client id was taken over since."""
        if token is None:
            return
        devices = self._devices.get(token.user, {})
        if devices.get(token.client_id) != token.serial:
            return
        del devices[token.client_id]
        if not devices:
            self._devices.pop(token.user, None)
        self._update(token.user)

    def get(self, user: str) -> PresenceMessage | None:
        """The last published presence of ``user`` (None: never seen since the broker started)."""
        return self._state.get(user)

    def online(self, user: str) -> bool:
        return bool(self._devices.get(user))

    def _update(self, user: str) -> None:
        now = self.clock()
        count = len(self._devices.get(user, {}))
        state: Literal["online", "offline"] = "online" if count else "offline"
        old = self._state.get(user)
        if old is not None and old.state == state and old.devices == count:
            return
        since = old.since if old is not None and old.state == state else now
        message = PresenceMessage(user=user, state=state, devices=count, since=since, last_seen=now)
        self._state[user] = message
        log.info("presence user=%s state=%s devices=%d", user, state, count)
        self.publish(self.topics.presence(user), message.model_dump_json().encode())
        for listener in self.listeners:
            try:
                listener(message)
            except Exception:
                log.exception("presence listener failed user=%s", user)

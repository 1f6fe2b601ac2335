"""What every HTTP handler shares: config, a store worker, the broker's authenticator and ACL, errors.

Who is asking (:meth:`HttpContext.principal`) is decided by the same code as for MQTT: HTTP Basic
goes through the broker's :class:`~fishim.auth.StoreAuthenticator` (same accounts, same login rate
limits, anonymous only on a loopback listener while no account exists); ``Authorization: Bearer``
carries either a tracking link's token (the ``t-{order}`` principal) or an API key (``key-{name}``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request

from fishim.auth import Principal, Role
from fishim.config import Config, ListenerConfig
from fishim.http import keys, tokens
from fishim.store import Store
from fishim.topics import tracking_user

if TYPE_CHECKING:
    from fishim.auth import OrderAcl, StoreAuthenticator

log = logging.getLogger("fishim.http")

_T = TypeVar("_T")

BASIC_CACHE_S = 60.0  # a removed account or changed password takes effect over HTTP within this
BASIC_CACHE_MAX = 10_000


class HttpError(Exception):
    """Answered as JSON ``{"error": code, "detail": detail}`` with ``status`` (see fishim.http.app)."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def unauthorized(code: str = "unauthorized", detail: str = "credentials required") -> HttpError:
    return HttpError(401, code, detail, {"WWW-Authenticate": 'Basic realm="fishim", charset="UTF-8"'})


class StoreWorker:
    """One thread with its own read-write store connection: every SQLite call of the HTTP side runs
    there, so the broker's event loop never waits on the disk or a lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fishim-http-store")
        self._store: Store | None = None

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._call, fn, args)

    def _call(self, fn: Callable[..., _T], args: tuple[Any, ...]) -> _T:
        if self._store is None:
            self._store = Store(self.path)
        return fn(self._store, *args)

    def close(self) -> None:
        def _close() -> None:
            if self._store is not None:
                self._store.close()
                self._store = None

        self._pool.submit(_close).result()
        self._pool.shutdown(wait=True)


class HttpContext:
    """Everything the routes need; one per running HTTP side (``request.app.state.fishim``)."""

    def __init__(self, config: Config, listener: ListenerConfig, authenticator: StoreAuthenticator,
                 acl: OrderAcl, broker: Any) -> None:
        self.config = config
        self.listener = listener
        self.authenticator = authenticator
        self.acl = acl
        self.broker = broker
        self.worker = StoreWorker(config.store.path)
        self.secret = tokens.load_secret(config.store.path)
        self.media_dir = media_dir(config.store.path)
        self._verified: dict[bytes, tuple[Principal, float]] = {}

    def topic(self, order: str, *rest: str) -> str:
        return "/".join((self.config.prefix, "orders", order, *rest))

    async def principal(self, request: Request, *, api: bool = False) -> Principal:
        """Who sent ``request``; raises 401 :class:`HttpError` when nobody acceptable did."""
        header = request.headers.get("authorization", "")
        scheme, _, value = header.partition(" ")
        scheme, value = scheme.lower(), value.strip()
        peer = request.client.host if request.client else "?"
        if scheme == "bearer" and value.startswith(keys.KEY_PREFIX):
            return await self._api_key(value)
        if api:
            raise unauthorized("unauthorized", "the API needs 'Authorization: Bearer KEY' (fishim keys add)")
        if scheme == "bearer" and value:
            return await self.tracking_principal(value)
        if scheme == "basic" and value:
            principal = await self._basic_login(value, peer)
        elif header:
            raise unauthorized("unauthorized", "use HTTP Basic (an account) or Bearer (a tracking token)")
        else:
            principal = await self.authenticator.authenticate(None, None, peer, self.listener)
        if principal is None:
            raise unauthorized("unauthorized", "bad or missing credentials")
        return principal

    async def _basic_login(self, value: str, peer: str) -> Principal | None:
        """HTTP Basic through the broker's authenticator. A media player seeking in a voice note sends
        a request per seek, each with the same credentials, so a verified pair is remembered (by a
        SHA-256 of it, never in clear) for ``BASIC_CACHE_S``: argon2 runs once, not per request."""
        username, password = _basic(value)
        fingerprint = hashlib.sha256(f"{username}\0{password}".encode()).digest()
        now = time.monotonic()
        hit = self._verified.get(fingerprint)
        if hit is not None and hit[1] > now:
            return hit[0]
        principal = await self.authenticator.authenticate(username, password, peer, self.listener)
        if principal is not None:
            if len(self._verified) >= BASIC_CACHE_MAX:
                self._verified.clear()
            self._verified[fingerprint] = (principal, now + BASIC_CACHE_S)
        return principal

    async def tracking_principal(self, token: str) -> Principal:
        """The ``t-{order}`` principal of a tracking token; 401 if it is invalid, expired or revoked."""
        link = tokens.read_token(self.secret, token)
        state = await self.worker.run(_order_state, link.order) if link is not None else None
        problem = tokens.token_problem(link, state)
        if link is None or problem is not None:
            raise unauthorized(f"token_{problem}", _TOKEN_PROBLEMS[problem or "invalid"])
        return Principal(username=tracking_user(link.order), role=Role.CUSTOMER, order=link.order)

    async def _api_key(self, key: str) -> Principal:
        name = await self.worker.run(keys.verify_key, key)
        if name is None:
            raise unauthorized("unauthorized", "unknown API key")
        return keys.key_principal(name)


_TOKEN_PROBLEMS = {
    "invalid": "not a valid tracking token",
    "expired": "this tracking link has expired",
    "revoked": "this tracking link no longer works: the order is finished",
}


def _order_state(store: Store, order: str) -> str | None:
    try:
        row = store.get_order(order)
    except sqlite3.Error:
        return None
    return row.state if row is not None else None


def _basic(value: str) -> tuple[str, str]:
    try:
        username, sep, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise unauthorized("unauthorized", "malformed Basic credentials") from None
    if not sep or not username:
        raise unauthorized("unauthorized", "malformed Basic credentials")
    return username, password


def media_dir(store_path: Path) -> Path:
    """Where uploaded blobs live: ``<db>.media/ab/abcdef…`` (content-addressed by sha256)."""
    return store_path.with_name(store_path.name + ".media")

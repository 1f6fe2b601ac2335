"""Logins: the broker's authenticator over the users table, and the limits that keep guessing slow.

Argon2 runs on one worker thread with a bound on checks under way; failures are counted per
(address, user) pair and per address.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fishim.auth.accounts import (
    RESERVED_PREFIXES,
    Principal,
    Role,
    StoreReader,
    dummy_hash,
    service_secret_file,
    verify_password,
)
from fishim.config import Config, ListenerConfig
from fishim.logs import kv
from fishim.store import UserRow

log = logging.getLogger("fishim.auth")


class LoginBusy(Exception):
    """Too many password checks already running: answer this CONNECT "server unavailable" (0x03)
    at once instead of queueing it behind a login storm."""


def _peer_host(peer: object) -> str:
    """The client's address without its port, from ``"h:port"``, ``"[v6]:port"`` or ``("h", port)``:
    a reconnecting client gets a new port, so the port must not be part of the rate-limit key."""
    if isinstance(peer, tuple | list) and peer:
        return str(peer[0])
    text = str(peer or "?")
    if text.startswith("["):
        return text[1:].partition("]")[0]
    host, sep, port = text.rpartition(":")
    return host if sep and port.isdigit() and ":" not in host else text


class LoginLimiter:
    """Sliding one-minute window of login attempts per key (``pair:{address}|{user}``, ``addr:…``).

    Every attempt is counted when it starts and uncounted if it succeeds, so parallel guesses can't
    all slip past the check before the first one fails. A key with ``limit`` failures in the window is
    refused outright, even with the right password, so guessing costs a minute per ``limit`` tries.
    Attempts refused while locked are not counted: a lock ends one window after what caused it.
    """

    WINDOW_S = 60.0
    _PRUNE_AT = 10_000

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._lock = threading.Lock()
        self._stamps: dict[str, deque[float]] = {}

    def _count(self, key: str, now: float) -> int:
        stamps = self._stamps.get(key)
        if stamps is None:
            return 0
        while stamps and stamps[0] <= now - self.WINDOW_S:
            stamps.popleft()
        if not stamps:
            del self._stamps[key]
        return len(stamps)

    def begin(self, *keys: str) -> float | None:
        """Count an attempt under every key; None (nothing counted) if any key is locked."""
        with self._lock:
            now = self.clock()
            if len(self._stamps) > self._PRUNE_AT:  # many addresses or names: forget expired ones
                for key in list(self._stamps):
                    self._count(key, now)
            if any(self._count(key, now) >= self.limit for key in keys):
                return None
            for key in keys:
                self._stamps.setdefault(key, deque()).append(now)
            return now

    def succeeded(self, stamp: float, *keys: str) -> None:
        """The attempt begun at ``stamp`` was not a failure: uncount it."""
        with self._lock:
            for key in keys:
                stamps = self._stamps.get(key)
                if stamps is not None and stamp in stamps:
                    stamps.remove(stamp)

    def locked(self, *keys: str) -> list[str]:
        """The keys that are locked right now."""
        with self._lock:
            now = self.clock()
            return [key for key in keys if self._count(key, now) >= self.limit]


class StoreAuthenticator:
    """Checks CONNECT credentials against the users table (the broker's ``Authenticator``).

    - While no human user exists, a client without a username, or with one the store doesn't know,
      is accepted as an anonymous principal (role None), on loopback listeners only: Mosquitto 2's
      rule. Anonymous is never accepted on any other listener.
    - Once a human user exists, every client authenticates. The service account always does.
    - Failed guesses slow down the (address, username) pair that made them: after
      ``limits.login_failures_per_minute`` failures in a sliding minute that pair is refused without
      a check until the minute has passed; the same user from another address is not affected, so
      a stranger cannot lock anyone out. An address is also refused after
      ``limits.login_failures_per_address`` failures a minute over all names (spraying).
    - The service account's secret (256 random bits, in ``<db>.secret``) is compared in constant
      time without argon2, and always lets the bridge in; wrong guesses at it are counted and
      logged like any other, from loopback too.
    - At most ``limits.max_concurrent_logins`` password checks run or wait at once (argon2 runs on
      one worker thread); a CONNECT past that raises :class:`LoginBusy` at once (CONNACK 0x03), so
      a login storm cannot build a backlog that times out everyone else's login.

    Passwords are never logged. An unknown user costs one argon2 verify too, so timing doesn't tell
    which names exist.
    """

    WORKERS = 1  # argon2 is CPU-bound (and releases the GIL): the other core stays with the broker

    def __init__(self, store_path: Path | str, config: Config,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.limiter = LoginLimiter(config.limits.login_failures_per_minute, clock)
        self.address_limiter = LoginLimiter(config.limits.login_failures_per_address, clock)
        self._reader = StoreReader(store_path)
        self._secret_file = service_secret_file(Path(store_path))
        self._service_secret: tuple[str, str, str] | None = None  # (hash, secret, name) verified once
        self._pool = ThreadPoolExecutor(self.WORKERS, thread_name_prefix="fishim-login")
        self._checking = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._reader.close()

    async def authenticate(self, username: str | None, password: str | None, peer: object,
                           listener: ListenerConfig | str | None) -> Principal | None:
        """The principal for this CONNECT, or None to refuse it (CONNACK "not authorized").

        Raises:
            LoginBusy: ``limits.max_concurrent_logins`` checks are already under way.
        """
        if self._checking >= self.config.limits.max_concurrent_logins:
            raise LoginBusy
        self._checking += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self.check, username, password, peer, listener)
        finally:
            self._checking -= 1

    def check(self, username: str | None, password: str | None, peer: object,
              listener: ListenerConfig | str | None) -> Principal | None:
        """:meth:`authenticate`, blocking (argon2 runs in the calling thread)."""
        host = _peer_host(peer)
        user, humans = self._lookup(username)
        pair, addr = f"pair:{host}|{username or ''}", f"addr:{host}"
        if user is not None and user.role == Role.SERVICE and self._is_service_secret(user, password):
            return Principal(username=user.name, role=user.role)
        stamp = self.limiter.begin(pair)
        if stamp is None:
            log.info("login refused %s", kv(user=username, peer=host, reason="rate_limited"))
            return None
        address_stamp = self.address_limiter.begin(addr)
        if address_stamp is None:
            self.limiter.succeeded(stamp, pair)
            log.info("login refused %s", kv(user=username, peer=host, reason="rate_limited"))
            return None
        if user is not None and user.role == Role.SERVICE:
            principal, reason = None, "bad_password"  # its secret was checked above, without argon2
        else:
            principal, reason = self._verify(user, humans, username, password, listener)
        if principal is not None:
            self.limiter.succeeded(stamp, pair)
            self.address_limiter.succeeded(address_stamp, addr)
            return principal
        locked = self.limiter.locked(pair) + self.address_limiter.locked(addr)
        extra = {"locked": ",".join(locked), "for": f"{LoginLimiter.WINDOW_S:.0f}s"} if locked else {}
        log.warning("login refused %s", kv(user=username, peer=host, reason=reason, **extra))
        return None

    def _is_service_secret(self, user: UserRow, password: str | None) -> bool:
        """Is ``password`` the service account's secret? Constant-time, no argon2 once the secret
        file has been verified against the account's hash (re-verified if either changes)."""
        if not password:
            return False
        cached = self._service_secret
        if cached is None or cached[0] != user.password_hash or cached[2] != user.name:
            try:
                secret = self._secret_file.read_text(encoding="utf-8").strip()
            except OSError:  # no secret file beside the store (a copied store): verify the slow way
                return verify_password(user.password_hash, password)
            if not verify_password(user.password_hash, secret):
                return verify_password(user.password_hash, password)
            cached = self._service_secret = (user.password_hash, secret, user.name)
        return hmac.compare_digest(password.encode("utf-8"), cached[1].encode("utf-8"))

    def valid_principals(self, principals: Iterable[Principal]) -> set[Principal]:
        """The named principals whose account still exists with the same role (one store read).

        The broker asks this every ``broker.account_check_interval`` seconds and ends the sessions
        of the others: ``fishim users remove`` cuts a connected user off within that interval.
        Anonymous principals are returned as they are.
        """
        with self._reader.lock:
            store = self._reader.store()
            accounts = {u.name: u.role for u in store.users()} if store is not None else {}
        return {p for p in principals if p.anonymous or accounts.get(p.username or "") == p.role}

    def _verify(self, user: UserRow | None, humans: int, username: str | None, password: str | None,
                listener: ListenerConfig | str | None) -> tuple[Principal | None, str]:
        if user is None and username is not None and username.startswith(RESERVED_PREFIXES[0]):
            return self._tracking(username, password)
        if user is None and humans == 0:
            if self._is_loopback(listener):
                return Principal(username=username, role=None), "anonymous"
            return None, "anonymous_not_allowed"
        if user is None or password is None:
            verify_password(dummy_hash(), password or "")
            return None, "unknown_user" if username else "no_credentials"
        if not verify_password(user.password_hash, password):
            return None, "bad_password"
        return Principal(username=user.name, role=user.role), "ok"

    def _tracking(self, username: str, password: str | None) -> tuple[Principal | None, str]:
        """``t-{order}`` with a tracking link's token as password: the customer's rights on that order."""
        from fishim.http.tokens import load_secret, read_token, token_problem
        from fishim.topics import order_of_tracking_user

        order = order_of_tracking_user(username)
        link = read_token(load_secret(self._reader.store_path), password or "") if order else None
        if link is None or link.order != order:
            return None, "bad_token"
        with self._reader.lock:
            store = self._reader.store()
            row = store.get_order(order) if store is not None else None
        problem = token_problem(link, row.state if row is not None else None)
        if problem is not None:
            return None, f"token_{problem}"
        return Principal(username=username, role=Role.CUSTOMER, order=order), "ok"

    def _is_loopback(self, listener: ListenerConfig | str | None) -> bool:
        if not isinstance(listener, ListenerConfig):
            listener = next((lst for lst in self.config.listeners if lst.name == listener), None)
        return listener is not None and listener.is_loopback

    def _lookup(self, username: str | None) -> tuple[UserRow | None, int]:
        """The account named ``username`` (if any) and how many human accounts exist."""
        with self._reader.lock:
            store = self._reader.store()
            if store is None:
                return None, 0
            return (store.get_user(username) if username else None), store.count_users()

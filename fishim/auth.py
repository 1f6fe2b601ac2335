"""Who is connecting and what they may do: principals, roles, password hashing, user accounts.

Passwords are hashed with argon2id and never logged or stored in clear.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from enum import StrEnum
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import BaseModel, ConfigDict

from fishim.config import Config, ListenerConfig
from fishim.logs import kv
from fishim.store import Store, UserRow, now_ms
from fishim.topics import is_name

log = logging.getLogger("fishim.auth")

_hasher = PasswordHasher()


class Role(StrEnum):
    OWNER = "owner"
    STAFF = "staff"
    RIDER = "rider"
    CUSTOMER = "customer"
    SCANNER = "scanner"
    SERVICE = "service"


HUMAN_ROLES = tuple(r.value for r in Role if r is not Role.SERVICE)
RESERVED_PREFIXES = ("t-", "key-")  # t-{order}: a tracking link (fishim.http.tokens); key-{name}: an API key


class Principal(BaseModel):
    """An authenticated (or anonymous loopback) connection's identity."""

    model_config = ConfigDict(frozen=True)

    username: str | None = None
    role: str | None = None
    order: str | None = None  # set for a tracking link's ``t-{order}``: ``<member>`` of this order only

    @property
    def anonymous(self) -> bool:
        return self.role is None


class LoginBusy(Exception):
    """Too many password checks already running: answer this CONNECT "server unavailable" (0x03)
    at once instead of queueing it behind a login storm."""


class UserError(ValueError):
    """A user-management request that cannot be done; ``str()`` is one line."""


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def add_user(store: Store, name: str, role: str, password: str) -> UserRow:
    """Create or replace an account; the password is stored only as an argon2id hash."""
    if not is_name(name):
        raise UserError(f"bad user name {name!r} (1-64 of A-Z a-z 0-9 _ -)")
    if name.startswith(RESERVED_PREFIXES):
        raise UserError(f"user names starting with {' or '.join(RESERVED_PREFIXES)} are reserved "
                        f"(tracking links and API keys)")
    if role not in {r.value for r in Role}:
        raise UserError(f"unknown role {role!r} (one of {', '.join(HUMAN_ROLES)})")
    if not password:
        raise UserError("empty password")
    user = UserRow(name=name, role=role, password_hash=hash_password(password), created_at=now_ms())
    store.put_user(user)
    log.info("user saved %s", kv(name=name, role=role))
    return user


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def service_secret_file(store_path: Path) -> Path:
    """Where the service account's clear secret lives: ``<db>.secret``, mode 0600."""
    return store_path.with_name(store_path.name + ".secret")


def service_credentials(store: Store, username: str) -> tuple[str, str]:
    """The bridge's own account, provisioned on first use: nothing for the owner to manage.

    The clear secret lives beside the store in a 0600 file (``<db>.secret``); the users table holds
    only its hash. Both are re-made if either is missing.
    """
    secret_file = service_secret_file(store.path)
    user = store.get_user(username)
    if secret_file.exists() and user is not None and user.role == Role.SERVICE:
        secret = secret_file.read_text(encoding="utf-8").strip()
        if verify_password(user.password_hash, secret):
            secret_file.chmod(0o600)  # a file made by an older version may be world-readable
            return username, secret
    secret = new_secret()
    tmp = secret_file.with_name(secret_file.name + ".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as f:
        f.write(secret)  # created 0600: never readable by others, not even for a moment
    os.replace(tmp, secret_file)
    store.put_user(UserRow(name=username, role=Role.SERVICE, password_hash=hash_password(secret),
                           created_at=now_ms()))
    log.info("service account provisioned %s", kv(name=username))
    return username, secret



# -- authentication --------------------------------------------------------------------------------


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


class _StoreReader:
    """A read-only store connection opened on first use: the broker may start before the bridge
    has created the file. Calls are serialised because the broker may use worker threads."""

    def __init__(self, store_path: Path | str) -> None:
        self.store_path = Path(store_path)
        self.lock = threading.RLock()
        self._store: Store | None = None

    def store(self) -> Store | None:
        """The open store, or None while the file does not exist yet. Call with ``lock`` held."""
        if self._store is None and self.store_path.exists():
            self._store = Store(self.store_path, readonly=True)
        return self._store

    def close(self) -> None:
        with self.lock:
            if self._store is not None:
                self._store.close()
                self._store = None


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
        self._reader = _StoreReader(store_path)
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
            verify_password(_DUMMY_HASH, password or "")
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


_DUMMY_HASH = hash_password(secrets.token_urlsafe(16))


# -- authorization ---------------------------------------------------------------------------------
# Topic templates, relative to the prefix, one tuple of levels each. Placeholders: "<any>" is any
# valid name, "<self>" the principal's username, "<member>" an order the principal is a member of
# (its customer or rider), "#" everything below. A topic is allowed if some template matches it; a
# subscription filter is allowed if some template could match a topic the filter matches.

Template = tuple[str, ...]

_ORDER_LEAVES = ("status", "location", "picks")
_READ_OWN: tuple[Template, ...] = (("sync", "<self>", "<any>", "events"), ("errors", "<self>"))
_WRITE_OWN: tuple[Template, ...] = (("sync", "<self>", "<any>", "request"),)
_EVERYTHING: tuple[Template, ...] = (("#",),)


def _order_read(order: str) -> tuple[Template, ...]:
    return (*(("orders", order, ch) for ch in _ORDER_LEAVES),
            ("orders", order, "chat", "<any>"), ("orders", order, "receipts", "<any>"))


def _order_write(order: str, *channels: str) -> tuple[Template, ...]:
    return tuple(("orders", order, ch, "<self>") if ch in ("chat", "receipts") else ("orders", order, ch)
                 for ch in channels)


_STAFF_WRITE = _order_write("<any>", "status", "location", "picks", "chat", "receipts") + _WRITE_OWN
# Only fishim itself (the service account, or the broker on its own behalf) writes what people read
# as fishim's word, whatever an account's role templates say. The anonymous loopback principal
# (no accounts yet) is exempt: a bridge run beside `fishim broker` without credentials is anonymous
# too, and every local client is equally trusted until the first account exists.
_FISHIM_ONLY = frozenset(("errors", "presence", "notify", "system"))  # first levels; and sync replies

# role -> (read templates, write templates). Role None is the anonymous loopback principal.
POLICY: dict[str | None, tuple[tuple[Template, ...], tuple[Template, ...]]] = {
    None: (_EVERYTHING, _EVERYTHING),
    Role.SERVICE: (_EVERYTHING, _EVERYTHING),
    Role.OWNER: (_EVERYTHING, _STAFF_WRITE),
    Role.STAFF: (_order_read("<any>") + _READ_OWN, _STAFF_WRITE),
    Role.RIDER: (_order_read("<member>") + _READ_OWN,
                 _order_write("<member>", "status", "location", "chat", "receipts") + _WRITE_OWN),
    Role.CUSTOMER: (_order_read("<member>") + _READ_OWN, _order_write("<member>", "chat", "receipts") + _WRITE_OWN),
    # Scanners are warehouse devices, not order members: picks on any order (the bridge gates picks
    # on the order's state and items), nothing to read but their own sync replies and errors.
    Role.SCANNER: (_READ_OWN, _order_write("<any>", "picks") + _WRITE_OWN),
}


TemplateIndex = dict[tuple[str, int] | None, tuple[Template, ...]]


def _index(templates: tuple[Template, ...]) -> TemplateIndex:
    """Templates by (first level, depth); ``None`` holds the ``#`` ones, which match any depth."""
    index: dict[tuple[str, int] | None, list[Template]] = {}
    for t in templates:
        index.setdefault(None if "#" in t else (t[0], len(t)), []).append(t)
    return {key: tuple(group) for key, group in index.items()}


_INDEX = {role: (_index(read), _index(write)) for role, (read, write) in POLICY.items()}
_NO_INDEX: tuple[TemplateIndex, TemplateIndex] = ({}, {})


class OrderAcl:
    """Who may publish, subscribe and receive what (the broker's ``Authorizer``); see :data:`POLICY`.

    Riders and customers read only orders they are members of. Membership lives in an in-memory
    cache (order -> customer, rider), filled from the store on a miss and replaced at once by
    :meth:`set_members` when the ingest commits a change, so a reassigned rider stops receiving
    from the very batch that reassigned it.
    ``may_receive`` runs on every delivery: it is string compares and a dict lookup once warm.
    """

    MAX_CACHED = 50_000
    UNKNOWN_TTL_S = 2.0  # an order not in the store yet is looked up again after this long
    STALE_AFTER_S = 1.0  # without an ingest feeding changes, a cached membership is re-read after this

    def __init__(self, store_path: Path | str, config: Config,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self._prefix = tuple(config.prefix.split("/"))
        self._head = config.prefix + "/"
        self._reader = _StoreReader(store_path)
        self._members: dict[str, tuple[str | None, str | None]] = {}
        self._unknown: dict[str, float] = {}
        self._loaded: dict[str, float] = {}  # order -> re-read after (only while not fed)
        self.fed = False  # True once the ingest announces changes: the cache is then authoritative

    def close(self) -> None:
        self._reader.close()

    # -- the Authorizer protocol ---------------------------------------------------------------

    def may_publish(self, principal: Principal, topic: str) -> bool:
        if not topic or "+" in topic or "#" in topic:
            return False
        if principal.role not in (Role.SERVICE, None) and self._fishim_only(topic):
            return False
        return self._topic_allowed(principal, topic, write=True)

    def _fishim_only(self, topic: str) -> bool:
        """``errors/…``, ``presence/…``, ``notify/…``, ``system/…`` and sync replies: fishim's voice.

        No account but the service account may publish there, so no one can make a message on
        ``errors/{user}`` reach another user as if fishim had said it."""
        if not topic.startswith(self._head):
            return False
        levels = topic[len(self._head):].split("/")
        return levels[0] in _FISHIM_ONLY or (levels[0] == "sync" and levels[-1] == "events")

    def may_subscribe(self, principal: Principal, topic_filter: str) -> bool:
        """Allowed if the principal could read SOME topic the filter matches; what is delivered is
        then filtered topic by topic through :meth:`may_receive`."""
        levels = topic_filter.split("/")
        if not _valid_filter(levels):
            return False
        return self._allowed(principal, levels, _policy(principal)[0])

    def may_receive(self, principal: Principal, topic: str) -> bool:
        return self._topic_allowed(principal, topic, write=False)

    # -- membership ----------------------------------------------------------------------------

    def set_members(self, order: str, customer: str | None, rider: str | None) -> None:
        """A membership change the ingest just committed; takes effect for the very next delivery.

        In ``fishim up`` every change arrives here, before the batch that made it is routed, so the
        cache is never stale. Without an ingest (``fishim broker`` with a separate bridge) nothing
        calls this and entries are re-read from the store after :data:`STALE_AFTER_S`.
        """
        with self._reader.lock:
            self.fed = True
            self._remember(order, (customer, rider))
        log.debug("membership %s", kv(order=order, customer=customer, rider=rider))

    def members(self, order: str) -> tuple[str | None, str | None] | None:
        """(customer, rider) of ``order``, or None if the order is unknown."""
        hit = self._members.get(order)
        if hit is not None and (self.fed or self._loaded.get(order, 0.0) > self.clock()):
            return hit
        with self._reader.lock:
            return self._load(order)

    def _load(self, order: str) -> tuple[str | None, str | None] | None:
        """Read the store on a cache miss (lock held); unknown orders are remembered briefly."""
        now = self.clock()
        if self._unknown.get(order, 0.0) > now:
            return None
        store = self._reader.store()
        row = store.get_order(order) if store is not None else None
        if row is None:
            if len(self._unknown) >= self.MAX_CACHED:
                self._unknown.clear()
            self._unknown[order] = now + self.UNKNOWN_TTL_S
            return None
        entry = (row.customer, row.rider)
        self._remember(order, entry)
        if not self.fed:
            self._loaded[order] = now + self.STALE_AFTER_S
        return entry

    def _remember(self, order: str, entry: tuple[str | None, str | None]) -> None:
        self._unknown.pop(order, None)
        self._loaded.pop(order, None)
        self._members.pop(order, None)
        if len(self._members) >= self.MAX_CACHED:  # oldest entry out; it reloads from the store
            del self._members[next(iter(self._members))]
        self._members[order] = entry

    # -- matching ------------------------------------------------------------------------------

    def _topic_allowed(self, principal: Principal, topic: str, *, write: bool) -> bool:
        """A concrete topic: only templates with its first level and depth are tried (the hot path)."""
        if not topic.startswith(self._head):
            return False
        levels = topic[len(self._head):].split("/")
        index = _INDEX.get(principal.role, _NO_INDEX)[write]
        candidates = index.get((levels[0], len(levels)), ())
        return any(self._match(principal, levels, t) for t in (*index.get(None, ()), *candidates))

    def _allowed(self, principal: Principal, levels: list[str], templates: tuple[Template, ...]) -> bool:
        n = len(self._prefix)
        if tuple(levels[:n]) != self._prefix:
            # only a wildcard filter can still reach the prefix ("#", "+/orders/#")
            if not all(lv in ("+", "#") or lv == p for lv, p in zip(levels, self._prefix, strict=False)):
                return False
            if len(levels) < n and levels[-1] != "#":
                return False
        rest = levels[n:] if len(levels) > n or levels[-1] != "#" else ["#"]
        return any(self._match(principal, rest, t) for t in templates)

    def _match(self, principal: Principal, levels: list[str], template: Template) -> bool:
        """Does ``template`` match ``levels`` (a topic, or a filter with ``+``/``#``)? Literal levels
        are compared first so that a membership lookup only happens for the one plausible template."""
        for i, tok in enumerate(template):
            if tok == "#":
                return i < len(levels) and self._placeholders(principal, levels, template[:i])
            if i >= len(levels):
                return False
            level = levels[i]
            if level == "#":
                return self._placeholders(principal, levels, template[:i])
            if tok[0] != "<" and level != "+" and level != tok:
                return False
        if len(levels) > len(template) and levels[len(template):] != ["#"]:
            return False
        return self._placeholders(principal, levels, template)

    def _placeholders(self, principal: Principal, levels: list[str], template: Template) -> bool:
        for tok, level in zip(template, levels, strict=False):
            if tok[0] != "<" or level == "+":
                continue
            if tok == "<self>":
                ok = level == principal.username
            elif tok == "<member>" and principal.order is not None:  # a tracking link: its order only
                ok = level == principal.order
            elif tok == "<member>":
                ok = (principal.username is not None and is_name(level)
                      and principal.username in (self.members(level) or ()))
            else:
                ok = is_name(level)
            if not ok:
                return False
        return True


def _policy(principal: Principal) -> tuple[tuple[Template, ...], tuple[Template, ...]]:
    """An account whose role this version doesn't know gets nothing."""
    return POLICY.get(principal.role, ((), ()))


def _valid_filter(levels: list[str]) -> bool:
    """MQTT filter syntax: ``+`` and ``#`` fill a whole level, ``#`` only last; no ``$`` topics."""
    if not levels or levels[0].startswith("$"):
        return False
    for i, level in enumerate(levels):
        if ("#" in level and (level != "#" or i != len(levels) - 1)) or ("+" in level and level != "+"):
            return False
    return True

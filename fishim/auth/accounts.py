"""Accounts: roles, principals, argon2id passwords, user rows, the service account's secret.

Passwords are hashed with argon2id and never logged or stored in clear.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from enum import StrEnum
from functools import cache
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import BaseModel, ConfigDict

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


@cache
def dummy_hash() -> str:
    """A hash to verify against when the user does not exist, so a wrong name costs the same time as
    a wrong password. Made on first use, not at import: argon2 takes tens of milliseconds."""
    return hash_password(secrets.token_urlsafe(16))


class StoreReader:
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

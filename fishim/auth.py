"""Who is connecting and what they may do: principals, roles, password hashing, user accounts.

Passwords are hashed with argon2id and never logged or stored in clear.
"""

from __future__ import annotations

import logging
import secrets
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from pydantic import BaseModel, ConfigDict

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


class Principal(BaseModel):
    """An authenticated (or anonymous loopback) connection's identity."""

    model_config = ConfigDict(frozen=True)

    username: str | None = None
    role: str | None = None

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
    if role not in {r.value for r in Role}:
        raise UserError(f"unknown role {role!r} (one of {', '.join(HUMAN_ROLES)})")
    if not password:
        raise UserError("empty password")
    user = UserRow(name=name, role=role, password_hash=hash_password(password), created_at=now_ms())
    store.put_user(user)
    log.info("user saved name=%s role=%s", name, role)
    return user


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def service_credentials(store: Store, username: str) -> tuple[str, str]:
    """The bridge's own account, provisioned on first use: nothing for the owner to manage.

    The clear secret lives beside the store in a 0600 file (``<db>.secret``); the users table holds
    only its hash. Both are re-made if either is missing.
    """
    secret_file = store.path.with_name(store.path.name + ".secret")
    user = store.get_user(username)
    if secret_file.exists() and user is not None and user.role == Role.SERVICE:
        secret = secret_file.read_text(encoding="utf-8").strip()
        if verify_password(user.password_hash, secret):
            return username, secret
    secret = new_secret()
    secret_file.touch(mode=0o600)
    secret_file.chmod(0o600)
    secret_file.write_text(secret, encoding="utf-8")
    store.put_user(UserRow(name=username, role=Role.SERVICE, password_hash=hash_password(secret),
                           created_at=now_ms()))
    log.info("service account provisioned name=%s", username)
    return username, secret

"""API keys for the shop's other systems (``fishim keys add|list|remove``).

A key is ``fk_`` + 256 random bits, shown once when it is made. The store keeps only its SHA-256.
Passwords get argon2 because people choose them: a slow hash is what stops offline guessing of a
weak one. A 256-bit random key cannot be guessed however fast the hash, so SHA-256 protects it just
as well at rest, and a request costs one indexed lookup instead of tens of milliseconds of argon2.

A key acts as the principal ``key-{name}`` with staff rights: the envelopes the API submits carry
``sender: key-{name}``, so the log says which system did what.
"""

from __future__ import annotations

import hashlib
import secrets

from pydantic import BaseModel

from fishim.auth import Principal, Role
from fishim.store import Store, now_ms
from fishim.topics import is_name

KEY_PREFIX = "fk_"
PRINCIPAL_PREFIX = "key-"


class ApiKeyError(ValueError):
    """A key request that cannot be done; ``str()`` is one line."""


class ApiKey(BaseModel):
    name: str
    created_at: int
    last_used_at: int | None = None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def add_key(store: Store, name: str) -> str:
    """Make a key for ``name`` (replacing an older one of that name); returns the clear key."""
    if not is_name(name) or len(PRINCIPAL_PREFIX + name) > 64:
        raise ApiKeyError(f"bad key name {name!r} (1-60 of A-Z a-z 0-9 _ -)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with store.transaction():
        store.conn.execute("INSERT OR REPLACE INTO api_keys (name, key_sha256, created_at) VALUES (?,?,?)",
                           (name, _digest(key), now_ms()))
    return key


def list_keys(store: Store) -> list[ApiKey]:
    rows = store.conn.execute("SELECT name, created_at, last_used_at FROM api_keys ORDER BY name")
    return [ApiKey(name=n, created_at=c, last_used_at=u) for n, c, u in rows]


def remove_key(store: Store, name: str) -> bool:
    with store.transaction():
        return store.conn.execute("DELETE FROM api_keys WHERE name=?", (name,)).rowcount > 0


def verify_key(store: Store, key: str) -> str | None:
    """The name of the key ``key``, or None. Marks it used (at most once a minute per key)."""
    row = store.conn.execute("SELECT name, last_used_at FROM api_keys WHERE key_sha256=?",
                             (_digest(key),)).fetchone()
    if row is None:
        return None
    now = now_ms()
    if row[1] is None or now - row[1] > 60_000:
        store.conn.execute("UPDATE api_keys SET last_used_at=? WHERE name=?", (now, row[0]))
    return str(row[0])


def key_principal(name: str) -> Principal:
    return Principal(username=PRINCIPAL_PREFIX + name, role=Role.STAFF)

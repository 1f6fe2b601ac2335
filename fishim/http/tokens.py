"""Tracking links: signed, expiring tokens for one order, and the secret that signs them.

A token is ``{order}.{expires}.{signature}``: the order id, the expiry in epoch seconds, and the
HMAC-SHA256 of both under a secret kept beside the store (``<db>.link-secret``, mode 0600). Nothing
is stored per link, so making one needs no write to the store; revocation is checked where a token is
used: a delivered or cancelled order's tokens stop working (:func:`token_problem`).

This module is pure (no store, no HTTP): the HTTP side, the CLI and the MQTT authenticator share it.
Tokens are credentials: never log one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from pydantic import BaseModel

from fishim.topics import is_name

FINISHED_STATES = frozenset({"delivered", "cancelled"})
_CONTEXT = b"fishim-link-v1:"


class LinkToken(BaseModel):
    """What a well-formed, correctly signed token says (it may still be expired or revoked)."""

    order: str
    expires: int  # epoch seconds


def secret_file(store_path: Path) -> Path:
    return store_path.with_name(store_path.name + ".link-secret")


def load_secret(store_path: Path) -> bytes:
    """The signing secret, created (0600, 256 random bits) by whoever needs it first.

    ``O_EXCL`` makes the creation race-free between ``fishim up`` and a CLI ``orders link``.
    """
    path = secret_file(Path(store_path))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_urlsafe(32))
    text = path.read_text(encoding="ascii").strip()
    if not text:  # a creator is between O_EXCL and its write: it finishes within microseconds
        time.sleep(0.05)
        text = path.read_text(encoding="ascii").strip()
    return text.encode("ascii")


def _signature(secret: bytes, order: str, expires: int) -> str:
    mac = hmac.new(secret, _CONTEXT + f"{order}.{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def make_token(secret: bytes, order: str, ttl_s: int, now: float | None = None) -> str:
    if not is_name(order):
        raise ValueError(f"bad order id {order!r}")
    expires = int((time.time() if now is None else now) + ttl_s)
    return f"{order}.{expires}.{_signature(secret, order, expires)}"


def read_token(secret: bytes, token: str) -> LinkToken | None:
    """The token's order and expiry if it is well formed and signed with ``secret``, else None."""
    parts = token.split(".")
    if len(parts) != 3 or not is_name(parts[0]) or not parts[1].isdigit() or len(parts[1]) > 12:
        return None
    order, expires = parts[0], int(parts[1])
    if not hmac.compare_digest(parts[2], _signature(secret, order, expires)):
        return None
    return LinkToken(order=order, expires=expires)


def token_problem(link: LinkToken | None, order_state: str | None, now: float | None = None) -> str | None:
    """Why a token must be refused (``invalid``, ``expired``, ``revoked``), or None if it is good.

    ``order_state`` is the order's current state (None: no such order, which counts as revoked).
    """
    if link is None:
        return "invalid"
    if link.expires <= (time.time() if now is None else now):
        return "expired"
    if order_state is None or order_state in FINISHED_STATES:
        return "revoked"
    return None



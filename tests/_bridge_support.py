"""Shared by the bridge tests: real brokers and bridge processes, payload builders, store reads.

Everything here starts real processes (Mosquitto, ``python -m fishim broker``, ``python -m fishim
bridge``) and the fixtures that use it stop every one of them, killed or not.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from fishim.testing import free_port, wait_for_port
from fishim.testing.mosquitto import Mosquitto
from fishim.testing.proc import Proc

PY = sys.executable
TS = 1_764_000_000_000


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without FISHIM_* (a developer's shell must not steer the children)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISHIM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait for a condition another process makes true (checked every few ms, bounded)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {timeout}s")
        time.sleep(0.003)


class EmbeddedBrokerProc:
    """``python -m fishim broker`` on a free loopback port, restartable on the same port and store."""

    def __init__(self, db: Path, cwd: Path) -> None:
        self.db, self.cwd = db, cwd
        self.port = free_port()
        self.proc: Proc | None = None

    def start(self) -> None:
        self.proc = Proc([PY, "-m", "fishim", "broker", "--bind", f"127.0.0.1:{self.port}", "--db", str(self.db)],
                         env=clean_env(), cwd=self.cwd)
        wait_for_port(self.port, timeout=15, proc=self.proc.popen)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc = None


class Brokers:
    """One broker under test, either kind, with the operations the bridge tests need."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind = kind
        self.tmp = tmp
        self.db = tmp / "fishim.db"
        self.mosquitto: Mosquitto | None = None
        self.embedded: EmbeddedBrokerProc | None = None
        if kind == "mosquitto":
            self.mosquitto = Mosquitto(workdir=tmp / "mosquitto")
            self.mosquitto.workdir.mkdir()
            self.mosquitto.start()
        else:
            self.embedded = EmbeddedBrokerProc(self.db, tmp)
            self.embedded.start()

    @property
    def port(self) -> int:
        return self.mosquitto.port if self.mosquitto else self.embedded.port  # type: ignore[union-attr]

    def bridge_args(self) -> tuple[list[str], dict[str, str]]:
        """Mosquitto: ``--broker mqtt://…`` anonymously. Embedded: like ``fishim up`` does it, no URL:
        the bridge connects to the configured listener with its provisioned service account."""
        args = [PY, "-m", "fishim", "bridge", "--db", str(self.db)]
        if self.mosquitto is not None:
            return [*args, "--broker", f"mqtt://127.0.0.1:{self.port}"], clean_env()
        return args, clean_env(FISHIM_BIND=f"127.0.0.1:{self.port}")

    def bridge_url(self) -> str | None:
        """For an in-process :class:`~fishim.bridge.Bridge` (None: the configured listener)."""
        return f"mqtt://127.0.0.1:{self.port}" if self.mosquitto is not None else None

    def stop(self) -> None:
        if self.mosquitto is not None:
            self.mosquitto.stop()
        elif self.embedded is not None:
            self.embedded.stop()

    def start(self, wipe: bool = False) -> None:
        """Start again on the same port; ``wipe`` deletes Mosquitto's persistence file first."""
        if self.mosquitto is not None:
            if wipe:
                (self.mosquitto.workdir / "mosquitto.db").unlink()
            self.mosquitto.start()
        elif self.embedded is not None:
            self.embedded.start()

    def close(self) -> None:
        if self.mosquitto is not None:
            self.mosquitto.close()
        elif self.embedded is not None:
            self.embedded.stop()


# -- payloads -----------------------------------------------------------------------------------------


def body(**fields: Any) -> bytes:
    return json.dumps({"ts": TS, **fields}, separators=(",", ":")).encode()


def placed(order: str, customer: str = "cust1", ident: str | None = None) -> bytes:
    return body(id=ident or f"placed-{order}", sender="shop", state="placed", customer=customer,
                items=[{"sku": "hook-6", "qty": 2}, {"sku": "line-20", "qty": 1}])


def status(order: str, state: str, ident: str, **extra: Any) -> bytes:
    return body(id=ident, sender="shop", state=state, **extra)


def chat(ident: str, sender: str = "cust1", text: str = "hi", **extra: Any) -> bytes:
    return body(id=ident, sender=sender, text=text, **extra)


def location(ident: str, lat: float, lon: float, sender: str = "shop") -> bytes:
    return body(id=ident, sender=sender, lat=lat, lon=lon)


# -- store reads (a read-only connection, as the CLI has) ---------------------------------------------


def read_db(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)


def count_events(db: Path) -> int:
    with closing(read_db(db)) as conn:
        return int(conn.execute("SELECT count(*) FROM events").fetchone()[0])


def without_stamps(payload: bytes) -> dict[str, Any]:
    """A body as the client published it: what fishim stores and routes carries the server's ``seq``
    and ``order_seq`` on top (``{"seq": ..}`` replaces a value the client sent itself)."""
    body = json.loads(payload)
    body.pop("seq", None)
    body.pop("order_seq", None)
    return body

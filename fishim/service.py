"""``fishim up`` and ``fishim broker``: the embedded broker in this process.

``fishim up`` runs the broker with its durable ingest (:mod:`fishim.broker.ingest`): the store is
opened and migrated, and the retained state loaded from it, before the first client is accepted;
every order-tree message is committed before it is routed or PUBACKed. ``fishim broker`` runs the
broker alone, as a plain MQTT broker with fishim's accounts and ACL, for a ``fishim bridge`` run
elsewhere (the bridge's guarantee then, as behind Mosquitto).

Shutdown (SIGTERM or SIGINT): stop accepting connections, commit and acknowledge what the ingest
already holds, close every session, close the store, and exit 0.

While running, a small status file beside the store (``<db>.status.json``) says who runs, since
when and how many clients are connected; ``fishim stats`` reads it. It is deleted on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fishim.config import Config

if TYPE_CHECKING:
    from fishim.auth import OrderAcl, Principal, StoreAuthenticator
    from fishim.broker import EmbeddedBroker
    from fishim.http.server import HttpSide
    from fishim.store import DeadLetter, Store

log = logging.getLogger("fishim.service")

STATUS_SUFFIX = ".status.json"
STATUS_EVERY_S = 2.0
STATUS_FRESH_MS = 10_000
BRIDGE_STOP_TIMEOUT_S = 15.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0
BACKOFF_RESET_AFTER_S = 60.0  # a bridge that ran this long before dying starts the backoff afresh


def status_path(db: Path) -> Path:
    return db.with_name(db.name + STATUS_SUFFIX)


def read_status(db: Path, now: int | None = None) -> dict[str, Any] | None:
    """The running service's status for this store, or None if none runs here (or it is stale)."""
    now = int(time.time() * 1000) if now is None else now
    try:
        data = json.loads(status_path(db).read_text(encoding="utf-8"))
        pid = int(data["pid"])
        fresh = now - int(data["updated_at"]) <= STATUS_FRESH_MS
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not fresh or not _alive(pid):
        return None
    return data


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RefusalReporter:
    """``fishim broker``'s ``on_refused``: tell the sender on ``{prefix}/errors/{user}``, keep a dead letter.

    An ACL violation (or an oversize packet) is refused with an errors message, logged once (the
    broker logs it) and stored in the dead-letter table for the owner. Without an ingest (the bridge
    runs elsewhere and never sees refused publishes) this process records them: one worker thread
    with its own connection writes them, and at most ``MAX_PENDING`` wait, so a client hammering a
    forbidden topic can neither grow memory nor hold the store's write lock for long. ``fishim up``
    does not need it: its ingest dead-letters refusals in its own commits.
    """

    MAX_PENDING = 100
    _CODES = {"forbidden": "forbidden", "too_large": "too_large"}

    def __init__(self, config: Config, broker: EmbeddedBroker) -> None:
        from fishim.topics import Topics

        self.config = config
        self.broker = broker
        self.topics = Topics(config.prefix)
        self.dropped = 0
        self._pending = 0
        self._store: Store | None = None
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="fishim-refusals")

    def __call__(self, principal: Principal, topic: str, reason: str) -> Awaitable[None]:
        return self._report(principal.username, topic, reason)

    async def _report(self, user: str | None, topic: str, reason: str) -> None:
        from fishim.messages import ErrorCode, ErrorMessage
        from fishim.store import DeadLetter, now_ms
        from fishim.topics import is_name

        code = ErrorCode(self._CODES.get(reason, "forbidden"))
        detail = (f"payload over limits.max_payload ({self.config.limits.max_payload} bytes)"
                  if code is ErrorCode.TOO_LARGE else f"not allowed to publish to {topic}")
        if user and is_name(user):
            body = ErrorMessage(topic=topic, error=code, detail=detail, ts=now_ms())
            await self.broker.publish(self.topics.errors(user), body.model_dump_json(exclude_none=True).encode())
        if self._pending >= self.MAX_PENDING:
            self.dropped += 1
            if self.dropped % 100 == 1:
                log.warning("refusals not dead-lettered (too many at once) dropped=%d", self.dropped)
            return
        self._pending += 1
        letter = DeadLetter(received_at=now_ms(), topic=topic[:1024], user=user, error=code.value, detail=detail)
        try:
            await asyncio.get_running_loop().run_in_executor(self._worker, self._write, letter)
        finally:
            self._pending -= 1

    def _write(self, letter: DeadLetter) -> None:
        from fishim.store import Store

        path = self.config.store.path
        try:
            if self._store is None:
                if not path.exists():  # the bridge creates the store; nothing to record into yet
                    return
                self._store = Store(path)
            self._store.add_deadletter(letter)
        except (OSError, sqlite3.Error) as exc:
            log.warning("refusal not dead-lettered topic=%s error=%s", letter.topic, exc)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        if self._store is not None:
            self._store.close()



def run_up(config: Config) -> int:
    """Broker and bridge until SIGTERM/SIGINT; 0 after a clean shutdown."""
    return asyncio.run(_serve(config, with_bridge=True))


def run_broker_only(config: Config) -> int:
    """Only the embedded broker (run ``fishim bridge`` elsewhere); 0 after a clean shutdown."""
    return asyncio.run(_serve(config, with_bridge=False))


async def _serve(config: Config, *, with_bridge: bool) -> int:
    from fishim.broker import EmbeddedBroker
    from fishim.broker.ingest import BrokerIngest

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    authenticator, acl = _auth(config)
    http = _http_side(config, authenticator, acl)
    ingest = BrokerIngest(config, hooks=http.hooks if http is not None else ()) if with_bridge else None
    broker = EmbeddedBroker(config, authenticator=authenticator, authorizer=acl, ingest=ingest)
    refusals = None if ingest is not None else RefusalReporter(config, broker)
    broker.on_refused = refusals  # read by start(); the reporter needs the broker to publish errors
    started_at = int(time.time() * 1000)
    mode = "up" if with_bridge else "broker"
    try:
        try:
            await broker.start()
        except OSError as exc:  # ListenerError: its message names the listener and the address
            log.error("broker not started: %s (is another fishim or MQTT broker running there?)", exc)
            return 2
        except sqlite3.Error as exc:
            log.error("broker not started: store %s unusable: %s", config.store.path, exc)
            return 2
        if http is not None:
            try:
                await http.start(broker)
            except OSError as exc:  # ListenerError: one line naming the listener
                log.error("http not started: %s", exc)
                await broker.stop()
                return 2
        log.info("broker listening %s store=%s durable=%d",
                 " ".join(f"{lst.type}://{lst.bind}" for lst in config.listeners), config.store.path,
                 int(ingest is not None))
        status = asyncio.create_task(_write_status(config, broker, mode, started_at))
        try:
            await stop.wait()
            log.info("shutting down")
        finally:
            status.cancel()
            if http is not None:
                await http.stop()
            await broker.stop()
            _remove_status(config.store.path)
    finally:
        if refusals is not None:
            refusals.close()
        authenticator.close()
        acl.close()
    log.info("stopped")
    return 0


def _remove_status(db: Path) -> None:
    """Delete the status file if it is ours (another ``fishim up`` on the same store keeps its own)."""
    path = status_path(db)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        if int(json.loads(path.read_text(encoding="utf-8"))["pid"]) == os.getpid():
            path.unlink()


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("received %s", sig.name)
    stop.set()


def _http_side(config: Config, authenticator: StoreAuthenticator, acl: OrderAcl) -> HttpSide | None:
    """The HTTP side (fishim.http: media, tracking links, shop API, webhooks), if broker.yaml asks for
    it. Its hooks (the webhook outbox) join the ingest's transactions, so it is made before the ingest."""
    if not config.webhooks and not any(lst.type == "http" for lst in config.listeners):
        return None
    from fishim.http.server import HttpSide

    return HttpSide(config, authenticator, acl)


def _auth(config: Config) -> tuple[StoreAuthenticator, OrderAcl]:
    """Accounts and the order ACL, both reading the store the bridge writes."""
    from fishim.auth import OrderAcl, StoreAuthenticator

    return StoreAuthenticator(config.store.path, config), OrderAcl(config.store.path, config)


async def _write_status(config: Config, broker: EmbeddedBroker, mode: str, started_at: int) -> None:
    """Refresh ``<db>.status.json`` every few seconds (written atomically: temp file + rename)."""
    path = status_path(config.store.path)
    warned = False
    while True:
        data = {"pid": os.getpid(), "mode": mode, "started_at": started_at, "updated_at": int(time.time() * 1000),
                "listeners": [lst.bind for lst in config.listeners],
                "clients_connected": _connected(broker), "durable": broker.ingest is not None}
        try:
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(data), encoding="utf-8")
            tmp.replace(path)
        except OSError as exc:
            if not warned:  # e.g. the store's directory does not exist until the bridge creates it
                log.warning("status file not written path=%s error=%s", path, exc)
                warned = True
        await asyncio.sleep(STATUS_EVERY_S)


def _connected(broker: EmbeddedBroker) -> int | None:
    try:
        return int(broker.sessions_connected())
    except Exception:  # the count is informational; never let it take the service down
        return None

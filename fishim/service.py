"""``fishim up`` and ``fishim broker``: the embedded broker in this process, the bridge as a child.

Why a child process for the bridge: on a 2-core shop PC both halves are CPU-bound Python (amqtt's
packet handling, the bridge's JSON validation and SQLite commits). In one process they would share
one GIL and one core; as two processes each gets a core, a crash or a stall in one (e.g. a long
SQLite checkpoint) does not freeze the other, and the bridge talks to the broker over a loopback
socket exactly as it does to Mosquitto, so there is one code path to test. The cost is one more
Python interpreter (~40 MB) and a loopback hop, both small next to that.

Shutdown (SIGTERM or SIGINT): stop accepting connections, stop the bridge (it drains what the
broker already acknowledged, commits and exits), then stop the broker and close its store handles,
and exit 0. A bridge that dies on its own is restarted with exponential backoff.

While running, a small status file beside the store (``<db>.status.json``) says who runs, since
when and how many clients are connected; ``fishim stats`` reads it. It is deleted on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from fishim.config import Config

if TYPE_CHECKING:
    from fishim.auth import OrderAcl, Principal, StoreAuthenticator
    from fishim.broker import EmbeddedBroker
    from fishim.http import HttpSide
    from fishim.store import DeadLetter, Store

log = logging.getLogger("fishim.service")

STATUS_SUFFIX = ".status.json"
STATUS_EVERY_S = 2.0
STATUS_FRESH_MS = 10_000
BRIDGE_STOP_TIMEOUT_S = 15.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.5, 30.0
BACKOFF_RESET_AFTER_S = 60.0  # a bridge that ran this long before dying starts the backoff afresh


def _parent_death_signal() -> Any:
    """Linux: have the kernel SIGTERM the bridge if this process dies without stopping it (SIGKILL,
    OOM), so a restarted ``fishim up`` never finds a stray bridge holding the store. The libc call is
    resolved here, before any fork, so the child only makes one system call before exec."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, int(signal.SIGTERM))


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


class BridgeSupervisor:
    """Runs ``python -m fishim bridge --db DB`` and restarts it with backoff when it dies.

    The child gets the exact effective config (file, env and command-line overrides applied) as a
    private YAML file, so it can never disagree with the broker about the store or the listener.
    """

    def __init__(self, config: Config, workdir: Path) -> None:
        self.config = config
        self.config_file = workdir / "effective-broker.yaml"
        self.config_file.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False),
                                    encoding="utf-8")
        self.config_file.chmod(0o600)
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._on_fork = _parent_death_signal()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="bridge-supervisor")

    async def _spawn(self) -> asyncio.subprocess.Process:
        env = {k: v for k, v in os.environ.items() if k not in ("FISHIM_DB", "FISHIM_BIND")}
        env["FISHIM_CONFIG"] = str(self.config_file)
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "fishim", "bridge", "--db", str(self.config.store.path),
            env=env, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal reaches us only; we stop the bridge in order
            preexec_fn=self._on_fork,
        )

    async def _run(self) -> None:
        backoff = BACKOFF_MIN_S
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.proc = await self._spawn()
            except OSError as exc:
                log.error("bridge could not start error=%s", exc)
            else:
                log.info("bridge started pid=%d", self.proc.pid)
                code = await self.proc.wait()
                if self._stopping.is_set():
                    return
                log.error("bridge exited code=%s pid=%d; restarting in %.1fs", code, self.proc.pid, backoff)
            if time.monotonic() - started > BACKOFF_RESET_AFTER_S:
                backoff = BACKOFF_MIN_S
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), backoff)
            backoff = min(backoff * 2, BACKOFF_MAX_S)
            self.restarts += 1

    async def stop(self, timeout: float = BRIDGE_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the bridge and wait for it to flush and exit; SIGKILL after ``timeout``."""
        self._stopping.set()
        proc = self.proc
        code: int | None = None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                code = await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                log.error("bridge did not stop within %.0fs pid=%d; killing it", timeout, proc.pid)
                proc.kill()
                code = await proc.wait()
            log.info("bridge stopped code=%s pid=%d", code, proc.pid)
        if self._task is not None:
            await self._task
        return code


class RefusalReporter:
    """The broker's ``on_refused``: tell the sender on ``{prefix}/errors/{user}`` and keep a dead letter.

    DESIGN.md: an ACL violation (or an oversize packet) is refused with an errors message, logged once
    (the broker logs it) and stored in the dead-letter table for the owner. The bridge never sees
    these publishes, since refused messages are not routed, so this process records them: one worker
    thread with its own connection writes them, and at most ``MAX_PENDING`` wait, so a client
    hammering a forbidden topic can neither grow memory nor hold the store's write lock for long.
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

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _on_signal, sig, stop)
    authenticator, acl = _auth(config)
    broker = EmbeddedBroker(config, authenticator=authenticator, authorizer=acl)
    refusals = RefusalReporter(config, broker)
    broker.on_refused = refusals  # read by start(); the reporter needs the broker to publish errors
    http = _http_side(config, authenticator, acl, broker)
    started_at = int(time.time() * 1000)
    try:
        with tempfile.TemporaryDirectory(prefix="fishim-") as workdir:
            try:
                await broker.start()
            except OSError as exc:  # ListenerError: its message names the listener and the address
                log.error("broker not started: %s (is another fishim or MQTT broker running there?)", exc)
                return 2
            if http is not None:
                try:
                    await http.start(broker)
                except OSError as exc:
                    log.error("http not started: %s", exc)
                    await broker.stop()
                    return 2
            log.info("broker listening %s store=%s",
                     " ".join(f"{lst.type}://{lst.bind}" for lst in config.listeners), config.store.path)
            supervisor = BridgeSupervisor(config, Path(workdir)) if with_bridge else None
            status = asyncio.create_task(
                _write_status(config, broker, supervisor, "up" if with_bridge else "broker", started_at))
            try:
                if supervisor is not None:
                    supervisor.start()
                await stop.wait()
                log.info("shutting down")
            finally:
                status.cancel()
                if http is not None:
                    await http.stop()
                broker.stop_accepting()
                if supervisor is not None:
                    await supervisor.stop()
                await broker.stop()
                _remove_status(config.store.path)
    finally:
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


def _http_side(config: Config, authenticator: StoreAuthenticator, acl: OrderAcl,
               broker: EmbeddedBroker) -> HttpSide | None:
    """The HTTP side (fishim.http: media, tracking links, shop API, webhooks), if configured.
    Its webhook hook joins the broker's ingest before the broker starts."""
    if not config.webhooks and not any(lst.type == "http" for lst in config.listeners):
        return None
    from fishim.http import HttpSide

    http = HttpSide(config, authenticator, acl)
    http.install(broker)
    return http


def _auth(config: Config) -> tuple[StoreAuthenticator, OrderAcl]:
    """Accounts and the order ACL, both reading the store the bridge writes."""
    from fishim.auth import OrderAcl, StoreAuthenticator

    return StoreAuthenticator(config.store.path, config), OrderAcl(config.store.path, config)


async def _write_status(config: Config, broker: EmbeddedBroker, supervisor: BridgeSupervisor | None, mode: str,
                        started_at: int) -> None:
    """Refresh ``<db>.status.json`` every few seconds (written atomically: temp file + rename)."""
    path = status_path(config.store.path)
    warned = False
    while True:
        data = {"pid": os.getpid(), "mode": mode, "started_at": started_at, "updated_at": int(time.time() * 1000),
                "listeners": [lst.bind for lst in config.listeners],
                "clients_connected": _connected(broker),
                "bridge": None if supervisor is None else {"pid": supervisor.pid, "restarts": supervisor.restarts}}
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

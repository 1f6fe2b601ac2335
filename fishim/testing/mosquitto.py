"""Run a throwaway Debian ``mosquitto`` for tests and benchmarks.

fishim's bridge must work unchanged against Mosquitto, and Mosquitto is the reference for what a
well-behaved broker does, so integration tests run against a real one. Each :class:`Mosquitto` gets
its own temp dir (config, log, persistence file) and a free loopback port; :meth:`Mosquitto.restart`
keeps both, so retained messages and persistent sessions can be shown to survive a broker restart.

Defaults differ from stock Mosquitto where stock would make tests lie: ``max_queued_messages`` is
raised to 100000 (the default 1000 silently drops the rest of a burst to an offline client),
``max_inflight_messages 0`` (no per-client limit), and ``persistence true``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

from fishim.testing import Managed, free_port, wait_for_port

__all__ = ["Mosquitto", "find_mosquitto", "write_password_file"]

log = logging.getLogger("fishim.testing.mosquitto")

_SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def _find(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN_DIRS:  # Debian installs the broker in sbin, often not on a user's PATH
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_mosquitto() -> str | None:
    """Path of the ``mosquitto`` binary (PATH, then /usr/sbin and friends), or None if not installed."""
    return _find("mosquitto")


def write_password_file(path: str | Path, users: Mapping[str, str]) -> Path:
    """Write a Mosquitto password file for ``users`` (name -> password) with ``mosquitto_passwd``.

    Mosquitto only reads hashed passwords, so the file must come from its own tool.
    """
    tool = _find("mosquitto_passwd")
    if tool is None:
        raise FileNotFoundError("mosquitto_passwd not found (Debian package mosquitto)")
    path = Path(path)
    path.write_text("")
    for name, password in users.items():
        subprocess.run([tool, "-b", str(path), name, password], check=True, capture_output=True, timeout=30)
    return path


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (Mosquitto saves its persistence file on it), then SIGKILL if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        log.warning("mosquitto pid %d ignored SIGTERM for %.1fs; killing", proc.pid, timeout)
        proc.kill()
        proc.wait(timeout)


class Mosquitto(Managed):
    """A Mosquitto broker on ``127.0.0.1:port`` with a generated config in a temp dir.

    Use as a context manager (or :meth:`start` / :meth:`stop`); the process is stopped and the temp
    dir removed on exit, and a finalizer kills the process even if the object is just dropped.

    Args:
        port: listener port; a free one by default. Kept across :meth:`restart`.
        allow_anonymous: Mosquitto 2 refuses anonymous clients unless told otherwise.
        extra_config: more ``mosquitto.conf`` lines, appended as-is (e.g. ``"autosave_interval 1"``).
        password_file: a file from :func:`write_password_file`.
        acl_file: a Mosquitto ACL file (``user``/``topic``/``pattern`` lines, ``%u``/``%c`` work).
        workdir: where config, log and persistence live; a temp dir (removed on exit) by default.
        binary: path of ``mosquitto``; :func:`find_mosquitto` by default.
        startup_timeout: seconds to wait for the listener to accept connections.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        allow_anonymous: bool = True,
        extra_config: Sequence[str] = (),
        password_file: str | Path | None = None,
        acl_file: str | Path | None = None,
        workdir: str | Path | None = None,
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.allow_anonymous = allow_anonymous
        self.extra_config = list(extra_config)
        self.password_file = Path(password_file).resolve() if password_file else None
        self.acl_file = Path(acl_file).resolve() if acl_file else None
        self.binary = binary or find_mosquitto()
        self.startup_timeout = startup_timeout
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fishim-mosquitto-"))
        self.config_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None

    def __repr__(self) -> str:
        return f"<Mosquitto 127.0.0.1:{self.port} {'running' if self.running else 'stopped'}>"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def config_text(self) -> str:
        """The generated ``mosquitto.conf``."""
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'true' if self.allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {self.workdir}/",
            "max_queued_messages 100000",
            "max_inflight_messages 0",
            "log_dest stdout",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root, Mosquitto drops to user "mosquitto", which cannot write our temp dir.
            lines.append("user root")
        if self.password_file:
            lines.append(f"password_file {self.password_file}")
        if self.acl_file:
            lines.append(f"acl_file {self.acl_file}")
        lines.extend(self.extra_config)
        return "\n".join(lines) + "\n"

    def start(self) -> Mosquitto:
        """Write the config, launch the broker and wait until it accepts connections."""
        if self.binary is None:
            raise FileNotFoundError("mosquitto not found (install Debian package mosquitto)")
        if self.running:
            raise RuntimeError(f"{self!r} already running")
        self.config_path.write_text(self.config_text())
        with open(self.log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, _terminate, self._proc, 5.0)
        try:
            wait_for_port(self.port, timeout=self.startup_timeout, proc=self._proc)
        except BaseException as exc:
            self.kill()
            raise RuntimeError(f"mosquitto failed to start on port {self.port}:\n{self.log_tail()}") from exc
        log.info("%r started (pid %d, dir %s)", self, self._proc.pid, self.workdir)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop gracefully (SIGTERM, which saves the persistence file), SIGKILL after ``timeout``."""
        if self._proc is not None:
            _terminate(self._proc, timeout)
            log.info("%r stopped (exit %s)", self, self._proc.returncode)
        self._detach()

    def kill(self) -> None:
        """SIGKILL, like a crash: whatever was not autosaved to the persistence file is lost."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
            log.info("%r killed", self)
        self._detach()

    def restart(self, timeout: float = 5.0) -> None:
        """Graceful stop then start on the same port, config and persistence file."""
        self.stop(timeout)
        self.start()

    def log_text(self) -> str:
        """The broker's log so far (all runs), for assertion messages and debugging."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def close(self) -> None:
        """Stop the broker and remove the temp dir it created."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _detach(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

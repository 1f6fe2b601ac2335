"""Start a process and wait for its log lines: the one helper tests use for fishim's own processes."""

from __future__ import annotations

import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["DIE_WITH_PARENT", "Proc"]


def _parent_death_hook() -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the kernel SIGTERM the child when its parent dies (Linux only).

    The kernel's "parent" is the thread that started the child: start children from a thread that
    outlives them (the main one), or they get SIGTERM when it ends.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before any fork
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


# The one PDEATHSIG helper: a test run or benchmark killed outright leaves no broker behind.
DIE_WITH_PARENT = _parent_death_hook()


class Proc:
    """A child process whose stderr is read line by line, so tests can wait for its log lines.

    Started in a session of its own (a Ctrl-C in the terminal reaches only pytest); stdout is
    discarded, since fishim logs to stderr.
    """

    def __init__(self, args: list[str], *, env: dict[str, str], cwd: Path) -> None:
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(args, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      start_new_session=True, preexec_fn=DIE_WITH_PARENT)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip())
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_log(self, text: str, timeout: float = 15.0) -> str:
        """The first log line containing ``text`` (fails fast if the process exits first)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hit = next((line for line in self.lines if text in line), None)
                if hit is not None:
                    return hit
                if self.popen.poll() is not None and not self._reader.is_alive():
                    raise RuntimeError(f"{' '.join(self.args[1:5])} exited {self.popen.returncode} before "
                                       f"{text!r}:\n" + "\n".join(self.lines[-20:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no log line {text!r} within {timeout}s:\n" + "\n".join(self.lines[-20:]))
                self._cond.wait(min(left, 0.2))

    def text(self) -> str:
        """Everything it logged so far."""
        with self._cond:
            return "\n".join(self.lines)

    def kill(self) -> None:
        """SIGKILL, like a power cut: no cleanup of any kind runs."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(10)
        self._reader.join(5)

    def terminate(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> int:
        """SIGTERM (or ``sig``) and wait; returns the exit code (SIGKILL if it does not stop in time)."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        self._reader.join(5)
        return self.popen.returncode

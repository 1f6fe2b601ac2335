"""The benchmark's child processes and what it reads about them from /proc.

Every broker, bridge and load generator is a process of its own (its own GIL), bound to 127.0.0.1,
started in its own process group (so a Ctrl-C in the terminal reaches only the benchmark, which then
stops them in order) and, on Linux, with a parent-death signal (so even a SIGKILL of the benchmark
ends them).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from fishim.bench.plan import PACKAGE_ROOT
from fishim.testing.proc import DIE_WITH_PARENT


def progress(message: str) -> None:
    """One line on stderr with the time since the run started."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {message}", file=sys.stderr, flush=True)


_T0 = time.monotonic()



CHILDREN: dict[int, str] = {}  # pid (= process group) -> name, for every child not yet stopped


ON_FORK = DIE_WITH_PARENT  # children get SIGTERM when the benchmark dies, even by SIGKILL


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def kill_leftovers() -> None:
    """Last resort (atexit): SIGKILL every child group still registered."""
    for pid in list(CHILDREN):
        _signal_group(pid, signal.SIGKILL)
        CHILDREN.pop(pid, None)


atexit.register(kill_leftovers)


def child_env() -> dict[str, str]:
    """Our environment minus fishim's overrides, with the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISHIM_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def spawn(argv: Sequence[str], name: str, log_path: Path, *, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """Start a child in its own process group, output appended to ``log_path``."""
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                                cwd=cwd, env=child_env(), start_new_session=True, preexec_fn=ON_FORK)
    CHILDREN[proc.pid] = name
    return proc


def stop(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int | None:
    """SIGTERM the child's group, SIGKILL after ``timeout``."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            progress(f"{CHILDREN.get(proc.pid, proc.pid)} ignored SIGTERM for {timeout:.0f}s; killing it")
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(10)
    CHILDREN.pop(proc.pid, None)
    return proc.returncode


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGTERM/SIGHUP behave like Ctrl-C: unwind, so every ``finally`` stops its children."""
    raise KeyboardInterrupt(f"signal {signum}")


# == /proc readings ==================================================================================

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far (Linux /proc), None if unavailable."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def memory_kb(pid: int, key: str = "VmRSS") -> int | None:
    """``VmRSS`` (resident now) or ``VmHWM`` (peak resident) of ``pid`` in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class Sampler:
    """CPU share and peak RSS of some processes over a window, sampled in the background."""

    def __init__(self, pids: dict[str, int], every: float = 0.25) -> None:
        self.pids = pids
        self.every = every
        self.rss_max: dict[str, int] = {}
        self._cpu0: dict[str, float | None] = {}
        self._t0 = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._cpu0 = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.every)

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            rss = memory_kb(pid)
            if rss is not None:
                self.rss_max[name] = max(rss, self.rss_max.get(name, 0))

    async def stop(self) -> dict[str, dict[str, float | None]]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sample()
        wall = max(time.monotonic() - self._t0, 1e-9)
        out: dict[str, dict[str, float | None]] = {}
        for name, pid in self.pids.items():
            before, after = self._cpu0.get(name), cpu_seconds(pid)
            cpu = None if before is None or after is None else round(100.0 * (after - before) / wall, 1)
            rss = self.rss_max.get(name)
            out[name] = {"cpu_percent": cpu, "rss_max_mib": None if rss is None else round(rss / 1024, 1)}
        return out


def command_output(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10, cwd=PACKAGE_ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout or done.stderr).strip()

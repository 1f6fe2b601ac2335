"""The profile section: where the CPU goes under the e2e flood, sampled by py-spy from outside."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from fishim.bench.measure import run_publisher
from fishim.bench.plan import PREFIX
from fishim.bench.procs import command_output, log_tail, progress, spawn, stop
from fishim.bench.stacks import Bench, Live

PROFILE_HZ = 200


def profile(b: Bench, lives: list[Live], stored: dict[str, float | None]) -> dict[str, Any]:
    """py-spy on the processes that limit each stack, under the e2e flood, from outside.

    On the embedded stack that is the broker (and the bridge beside it); on Mosquitto it is the
    bridge. ``--gil`` samples only the thread holding the GIL: where the Python CPU goes, which is what
    limits these processes. Time blocked in select(), queue waits or inside SQLite (which releases the
    GIL) does not show; the e2e figures cover SQLite's share.
    """
    pyspy = py_spy()
    if pyspy is None:
        return {"skipped": "py-spy not installed (pip install py-spy; it is in the test extra)"}
    out: dict[str, Any] = {"tool": f"py-spy record --gil --rate {PROFILE_HZ} --nonblocking (collapsed stacks)",
                           "seconds": b.plan.profile_s}
    for live in lives:
        assert live.bridge is not None
        targets = {"broker": live.ep.pid, "bridge": live.bridge.pid} if live.kind == "fishim" else \
            {f"bridge-on-{live.kind}": live.bridge.pid}
        out.update(_profile_stack(b, pyspy, live, targets, stored.get(live.kind)))
    progress("profile: " + ", ".join(f"{k} {v.get('samples', 0)} samples" for k, v in out.items()
                                     if isinstance(v, dict)))
    return out


def _profile_stack(b: Bench, pyspy: str, live: Live, targets: dict[str, int],
                   stored_per_s: float | None) -> dict[str, Any]:
    seconds = b.plan.profile_s
    procs: dict[str, subprocess.Popen[bytes]] = {}
    files = {name: b.out / f"profile-{name}.txt" for name in targets}
    try:
        for name, pid in targets.items():
            files[name].unlink(missing_ok=True)
            argv = [pyspy, "record", "--pid", str(pid), "--rate", str(PROFILE_HZ), "--duration",
                    str(math.ceil(seconds)), "--gil", "--format", "raw", "--output", str(files[name]), "--nonblocking"]
            procs[name] = spawn(argv, f"py-spy-{name}", b.log(f"py-spy-{name}"))
        time.sleep(0.5)  # attach
        n = int(max(b.plan.e2e_n, (stored_per_s or 3000) * seconds * 1.5))
        job = {"topics": [f"{PREFIX}/orders/e2e/chat/bench"], "n": n, "qos": 1, "sender": "bench",
               "id_prefix": f"prof{uuid.uuid4().hex[:4]}", "max_s": seconds + 1}
        asyncio.run(run_publisher(b, live.ep, job, [], 0, f"profile-{live.kind}"))
        for proc in procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(seconds + 30)
    finally:
        for proc in procs.values():
            stop(proc)
    out: dict[str, Any] = {}
    for name, path in files.items():
        if not path.exists() or path.stat().st_size == 0:
            log = b.log(f"py-spy-{name}")
            out[name] = {"error": f"no samples (see {log}): {log_tail(log, 3)}"}
            continue
        out[name] = {"file": str(path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path),
                     "gil_share": round(_total_samples(path) / (PROFILE_HZ * math.ceil(seconds)), 3),
                     **summarise_stacks(path.read_text(errors="replace"))}
    return out


def _total_samples(path: Path) -> int:
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        count = line.rpartition(" ")[2]
        total += int(count) if count.isdigit() else 0
    return total


_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def _frame_key(frame: str) -> tuple[str, str]:
    """(``function (short/file.py)``, area) for a py-spy frame such as ``run (asyncio/events.py:80)``."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip(), "other"
    path = match["file"]
    short = path
    for marker in ("site-packages/", "lib/python3", "/fishim/"):
        if marker in path:
            short = path.split(marker, 1)[1]
            if marker == "lib/python3":
                short = short.split("/", 1)[1] if "/" in short else short
            if marker == "/fishim/":
                short = "fishim/" + short
            break
    top = short.split("/", 1)[0] if "/" in short else short.removesuffix(".py")
    area = top if top in ("fishim", "amqtt", "paho", "sqlite3", "json", "pydantic", "pydantic_core", "asyncio",
                          "logging", "threading", "queue", "selectors", "socket", "ssl") else "other"
    return f"{match['func']} ({short})", area


_ENTRY_FILES = ("fishim/cli.py", "fishim/__main__.py", "fishim/service.py", "fishim/broker/__init__.py")
_ENTRY_FUNCS = ("Bridge._run_writer ", "Bridge._run_sync ", "Client._thread_main ", "Client.loop_forever ",
                "<module> ")
_WORK_AREAS = ("fishim/", "amqtt/", "paho/", "pydantic", "json/", "sqlite3/")


def _worth_inclusive(key: str) -> bool:
    where = key.rpartition("(")[2]
    return (where.startswith(_WORK_AREAS) and not where.startswith(_ENTRY_FILES)
            and not key.startswith(_ENTRY_FUNCS))


def summarise_stacks(text: str, top: int = 12) -> dict[str, Any]:
    """Self and inclusive time per function, and self time per area (package), from collapsed stacks."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    areas: Counter[str] = Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        keys = [_frame_key(f) for f in frames]
        self_time[keys[-1][0]] += count
        areas[keys[-1][1]] += count
        for key in {k for k, _ in keys}:
            inclusive[key] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * c / total, 1)] for name, c in counter.most_common(top)] if total else []

    # Inclusive time only for the code doing the work: not the event loop, click, thread bootstraps
    # or the entry points that sit under every sample of their thread.
    inner = Counter({k: c for k, c in inclusive.items() if c < 0.9 * total and _worth_inclusive(k)})
    return {"samples": total, "self_percent": share(self_time), "inclusive_percent": share(inner),
            "area_self_percent": share(areas)}


def py_spy() -> str | None:
    """py-spy from PATH or beside this interpreter (the venv's bin)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return exe if Path(exe).exists() else None


def py_spy_version() -> str | None:
    exe = py_spy()
    return (command_output([exe, "--version"]).removeprefix("py-spy ") or None) if exe else None


def render(p: dict[str, Any]) -> list[str]:
    lines = ["### Profile (generated)", ""]
    if "skipped" in p:
        return [*lines, f"Skipped: {p['skipped']}.", ""]
    names = [k for k, v in p.items() if isinstance(v, dict)]
    lines += [f"{p['tool']}, {p['seconds']:g} s per stack under the e2e flood. Files: "
              + ", ".join(f"`{p[n]['file']}`" for n in names if "file" in p[n]) + ". GIL share = the share "
              "of the time that process was running Python.", ""]
    for name in names:
        s = p[name]
        if "error" in s or not s.get("samples"):
            lines += [f"{name}: {s.get('error', 'no samples')}", ""]
            continue
        areas = ", ".join(f"{a} {v}%" for a, v in s["area_self_percent"])
        lines += [f"**{name}** ({s['samples']:,} samples, GIL share {s.get('gil_share', 0):.0%}). Self time by "
                  f"package: {areas}.", "",
                  "| self % | function | | inclusive % | function |", "|---:|---|---|---:|---|"]
        for (fs, ps), (fi, pi) in zip(s["self_percent"][:10], s["inclusive_percent"][:10], strict=False):
            lines.append(f"| {ps} | `{fs}` | | {pi} | `{fi}` |")
        lines.append("")
    return lines

"""One benchmark run: the sections asked for, grouped so shared stacks start once, and report.json."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fishim.bench import durable, live
from fishim.bench.plan import BROKERS, Plan
from fishim.bench.procs import progress
from fishim.bench.report import loadavg, machine_info
from fishim.bench.sections import SECTIONS
from fishim.bench.stacks import Bench


def run_bench(plan: Plan, sections: Sequence[str], *, brokers: Sequence[str] = BROKERS, out: Path | None = None,
              keep: bool = False, command: str = "", peers: Sequence[str] = ()) -> dict[str, Any]:
    """Run ``sections`` and return the report (also written to ``out/report.json``).

    ``own`` sections run one after another on brokers of their own; the ``live`` ones share the
    broker + bridge stacks, the ``up`` ones the ``fishim up`` stacks (each group's stacks start once).
    """
    out = (out or Path.cwd() / "bench-out").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="fishim-bench-"))
    b = Bench(plan, work, out, brokers, peers)
    started = time.monotonic()
    report: dict[str, Any] = {
        "meta": {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "mode": plan.name,
                 "command": command or f"fishim bench{' --quick' if plan.name == 'quick' else ''}",
                 "plan": asdict(plan), "sections": list(sections), "brokers": b.brokers,
                 "skipped_brokers": b.skipped, "machine": machine_info(), "load_avg_start": loadavg()},
        "results": {},
    }
    if b.skipped:
        progress(f"not found, skipped: {', '.join(b.skipped)}")
    results = report["results"]
    wanted = {s.name: s for s in SECTIONS if s.name in sections}
    try:
        if "throughput" in wanted and wanted["throughput"].run is not None:
            results["throughput"] = wanted["throughput"].run(b)
        shared = {name for name, s in wanted.items() if s.group == "live"}
        if shared:
            results.update(live.section_live(b, shared))
        ups = {name for name, s in wanted.items() if s.group == "up"}
        if ups:
            results.update(durable.section_up(b, ups))
        for name, section in wanted.items():
            if section.group == "own" and name != "throughput" and section.run is not None:
                results[name] = section.run(b)
    finally:
        b.drop_publisher()
        report["meta"]["seconds"] = round(time.monotonic() - started, 1)
        report["meta"]["load_avg_end"] = loadavg()
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        if keep:
            progress(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return report

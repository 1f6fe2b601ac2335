"""``fishim bench`` / ``python -m fishim.bench`` / ``scripts/bench.py``: the command line."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from fishim.bench.plan import BROKERS, PACKAGE_ROOT, PLANS
from fishim.bench.procs import interrupt, kill_leftovers, progress
from fishim.bench.report import render_markdown, write_markdown
from fishim.bench.run import run_bench
from fishim.bench.sections import NAMES
from fishim.bench.worker import worker_main

DESCRIPTION = "fishim benchmarks: every figure measured in one run against its peer, reported as a ratio."


def default_markdown() -> Path:
    """The checkout's BENCHMARKS.md when fishim runs from one, else BENCHMARKS.md here."""
    beside = PACKAGE_ROOT / "BENCHMARKS.md"
    return beside if beside.exists() else Path.cwd() / "BENCHMARKS.md"


EPILOG = f"""sections: {", ".join(NAMES)}

Example:
  fishim bench --quick                      # < 60 s, rough figures (python scripts/bench.py --quick)
  fishim bench                              # full mode for BENCHMARKS.md, on a quiet machine
  fishim bench --only e2e,profile --keep    # two sections; keep the stores and logs
"""


def main(argv: Sequence[str] | None = None, prog: str = "fishim bench") -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in[:1] == ["_worker"]:
        return worker_main()
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION.split("\n\n")[0], epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small counts, under a minute (rough figures)")
    parser.add_argument("--only", help="comma-separated sections to run (default: all)")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="peers to compare (default: %(default)s)")
    parser.add_argument("--peer", action="append", default=[], metavar="HOST:PORT",
                        help="also measure an already running broker in the throughput section (repeatable)")
    parser.add_argument("--reps", type=int, help="repetitions per figure (default: 5 full, 3 quick)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="report directory (default: bench-out)")
    parser.add_argument("--markdown", type=Path, help="Markdown file to update (default: BENCHMARKS.md, "
                        "and only when every section ran)")
    parser.add_argument("--no-markdown", action="store_true", help="do not touch any Markdown file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (stores, logs)")
    args = parser.parse_args(args_in)

    sections = [s.strip() for s in args.only.split(",")] if args.only else list(NAMES)
    unknown = [s for s in sections if s not in NAMES]
    brokers = [s.strip() for s in args.brokers.split(",") if s.strip()]
    if unknown or any(k not in BROKERS for k in brokers) or "fishim" not in brokers:
        parser.error(f"sections: {', '.join(NAMES)}; brokers: {', '.join(BROKERS)} (fishim always)")
    plan = PLANS["quick" if args.quick else "full"]
    if args.reps:
        plan = replace(plan, reps=max(1, args.reps))
    command = (prog if prog.startswith("fishim") else f"python {prog}") + "".join(f" {a}" for a in args_in)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    progress(f"fishim bench, {plan.name} mode: {', '.join(sections)}")
    try:
        report = run_bench(plan, sections, brokers=brokers, out=args.out, keep=args.keep, command=command,
                           peers=args.peer)
    except KeyboardInterrupt:
        progress("interrupted; children stopped")
        return 130
    finally:
        kill_leftovers()
    markdown = None if args.no_markdown else args.markdown
    if markdown is None and not args.no_markdown and set(sections) == set(NAMES):
        markdown = default_markdown()
    if markdown is not None:
        write_markdown(markdown, report)
        progress(f"updated {markdown}")
    print(render_markdown(report))
    progress(f"report: {args.out / 'report.json'}")
    return 0

"""How fast the owner's CLI answers on a real-sized history (not a timed test: prints one JSON line).

Fills a store directly through :class:`fishim.testing.history.HistoryWriter` (the real order rules,
no broker) with ``--orders`` orders of ~20 events each, then times ``orders list`` and
``orders show`` in-process (click's CliRunner: the query and rendering cost) and as subprocesses
(what the owner waits for, interpreter start-up included). Medians of ``--repeat`` runs.

    .venv/bin/python scripts/bench_cli.py                 # 5,000 orders, ~100,000 events
    .venv/bin/python scripts/bench_cli.py --db /tmp/b.db  # reuse a filled store between runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from click.testing import CliRunner

from fishim.cli import main
from fishim.store import Store
from fishim.testing.history import HistoryWriter, lifecycle

STAGES = ["placed", "confirmed", "picking", "packed", "assigned", "picked_up", "delivering"]


def fill(db: Path, orders: int, target_events: int) -> float:
    """Orders placed one after another over the last days; 90% delivered, the rest at every stage."""
    rng = random.Random(7)
    started = time.perf_counter()
    per_order = max(target_events // orders, 19)
    fixes = max(per_order - 13, 1)  # a delivered order has ~16 events besides its location fixes
    clock = int(time.time() * 1000) - orders * 60_000
    with Store(db) as store:
        writer = HistoryWriter(store)
        for n in range(orders):
            until = "delivered" if rng.random() < 0.9 else rng.choice(STAGES)
            lifecycle(writer, f"A{n:05d}", clock, customer=rng.choice(["cust1", "cust2", "13812345678"]),
                      rider=rng.choice(["rider7", "rider8"]), fixes=fixes, until=until, rng=rng)
            clock += 60_000
    return time.perf_counter() - started


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 1)


def main_() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=5000)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--db", type=Path, help="store to fill (or reuse if it exists)")
    args = parser.parse_args()
    tmp = None
    if args.db is None:
        tmp = tempfile.TemporaryDirectory(prefix="fishim-bench-")
        args.db = Path(tmp.name) / "bench.db"
    fill_s = None if args.db.exists() else round(fill(args.db, args.orders, args.events), 1)
    with Store(args.db, readonly=True) as store:
        events, orders = store.count_events(), sum(store.orders_by_state().values())
        busiest = store.conn.execute("SELECT id FROM orders ORDER BY order_seq DESC LIMIT 1").fetchone()[0]
    env = {**os.environ, "FISHIM_DB": str(args.db)}
    runner = CliRunner()

    def cli(*argv: str) -> Callable[[], object]:
        def go() -> object:
            result = runner.invoke(main, list(argv), env={"FISHIM_DB": str(args.db)}, catch_exceptions=False)
            assert result.exit_code == 0, result.output
            return result
        return go

    def proc(*argv: str) -> Callable[[], object]:
        return lambda: subprocess.run([sys.executable, "-m", "fishim", *argv], env=env, check=True,
                                      capture_output=True)

    cases = {
        "orders list": ("orders", "list"),
        "orders list --json": ("orders", "list", "--json"),
        "orders list --limit 0 --json": ("orders", "list", "--limit", "0", "--json"),
        "orders list --state delivering": ("orders", "list", "--state", "delivering"),
        "orders list --late": ("orders", "list", "--late"),
        "orders show": ("orders", "show", busiest),
        "orders show --json": ("orders", "show", busiest, "--json"),
        "stats": ("stats",),
    }
    result = {
        "events": events, "orders": orders, "fill_s": fill_s, "db_mb": round(args.db.stat().st_size / 1e6, 1),
        "show_order_events": len(Store(args.db, readonly=True).order_events(busiest)),
        "in_process_ms": {name: median_ms(cli(*argv), args.repeat) for name, argv in cases.items()},
        "subprocess_ms": {name: median_ms(proc(*argv), max(args.repeat // 2, 3)) for name, argv in cases.items()
                          if name in ("orders list", "orders show", "stats")},
        "python_startup_ms": median_ms(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), 3),
    }
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main_()

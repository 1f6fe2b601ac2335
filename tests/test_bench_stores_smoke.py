"""Keeps scripts/bench_stores.py from rotting: its smallest run on both stores. Speeds are not asserted."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fishim.testing.postgres import Postgres

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench_stores.py"


@pytest.mark.timeout(90)
def test_smallest_run_on_both_stores(postgres: Postgres, capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("fishim_bench_stores", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    url = postgres.create_database("bench_smoke")
    assert module.main(["--messages", "100", "--history", "300,600", "--runs", "1", "--pg-url", url]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["store"] for r in report["results"]] == ["sqlite", "postgres"]
    for result in report["results"]:
        assert set(result["stored_msgs_per_s"]) == {"batch_500", "batch_1"}
        assert [p["history_events"] for p in result["sync"]] == [300, 600]
        # customer c1 owns 1 order in 20: its full sync returns its share of the history, tail included
        assert all(0 < p["tail_events"] <= p["full_events"] for p in result["sync"])
    sqlite, pg = report["results"]
    assert [p["full_events"] for p in sqlite["sync"]] == [p["full_events"] for p in pg["sync"]]

"""Keeps scripts/bench.py from rotting: its smallest run of one section, in-process, plus its report.

Benchmarks never run in the test suite; this only checks that the script still starts a broker, drives
its load-generator worker and builds a report with the expected shape. Speeds are not asserted.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fishim_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(60)
def test_throughput_section_smallest_run(bench: ModuleType, tmp_path: Path) -> None:
    report = bench.run_bench(bench.PLANS["tiny"], ["throughput"], brokers=["fishim"], out=tmp_path)

    assert json.loads((tmp_path / "report.json").read_text()) == report
    meta = report["meta"]
    assert {"date", "mode", "command", "machine", "plan", "seconds"} <= set(meta)
    assert {"cores", "cpu_model", "python", "versions"} <= set(meta["machine"])
    throughput = report["results"]["throughput"]
    assert throughput["brokers"] == ["fishim"]
    assert throughput["payload_bytes"] == 200
    for qos in ("qos0", "qos1"):
        figures = throughput[qos]["fishim"]
        assert set(figures) == {"median_msgs_per_s", "min_delivered", "runs"}
        assert len(figures["runs"]) == report["meta"]["plan"]["reps"]
        assert figures["min_delivered"] == 1.0  # 300 messages on loopback: none lost, QoS 0 included
        assert {"ratio_fishim_vs_amqtt", "ratio_fishim_vs_mosquitto"} <= set(throughput[qos])
    markdown = bench.render_markdown(report)
    assert markdown.startswith(bench.MARK_BEGIN) and markdown.rstrip().endswith(bench.MARK_END)
    assert "### 1. Broker throughput" in markdown
    assert not bench._CHILDREN, "every child process is stopped when the run ends"


def test_markdown_update_keeps_hand_written_text(bench: ModuleType, tmp_path: Path) -> None:
    report = {"meta": {"date": "2026-01-01T00:00:00+00:00", "mode": "quick", "seconds": 1.0, "command": "x",
                       "machine": {"cores": 2, "cpu_model": "cpu", "memory_gib": 1, "os": "Linux", "python": "3.11",
                                   "git_commit": None, "versions": {"amqtt": "0.12.1", "paho-mqtt": "2.2.0",
                                                                    "mosquitto": None, "sqlite": "3"}}},
              "results": {}}
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(f"# Title\n\nintro\n\n{bench.MARK_BEGIN}\nold figures\n{bench.MARK_END}\n\n## Profile\nnotes\n")

    bench.write_markdown(target, report)

    text = target.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith("## Profile\nnotes\n")
    assert "old figures" not in text and text.count(bench.MARK_BEGIN) == 1 and "Run 2026-01-01" in text


def test_profile_summary_reads_collapsed_stacks(bench: ModuleType) -> None:
    text = ("process 1:\"python\";run (threading.py:10);work (/x/fishim/bridge.py:5);dumps (json/__init__.py:1) 30\n"
            "process 1:\"python\";run (threading.py:10);work (/x/fishim/bridge.py:6) 10\n")
    summary = bench.summarise_stacks(text)
    assert summary["samples"] == 40
    assert summary["self_percent"][0] == ["dumps (json/__init__.py)", 75.0]
    assert ["json", 75.0] in summary["area_self_percent"] and ["fishim", 25.0] in summary["area_self_percent"]


def test_fill_store_writes_a_replayable_history(bench: ModuleType, tmp_path: Path) -> None:
    """The replay and memory sections stand on fill_store: its rows must be what the bridge writes."""
    from fishim.store import Store

    db = tmp_path / "hist.db"
    bench.fill_store(db, 250, orders=5, customer="replayer", prefix="rp")
    with Store(db, readonly=True) as store:
        assert store.count_events() == 250
        assert [e.seq for e in store.events_since(0, limit=1000)] == list(range(1, 251))
        assert len(store.order_ids_for("replayer", "customer")) == 5

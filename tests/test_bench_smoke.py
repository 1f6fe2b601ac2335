"""Keeps the benchmark (the fishim.bench package) from rotting: every section's smallest run, one report.

Benchmarks never run in the test suite; this checks that each section still starts its brokers, drives
its load generators and reports figures with the expected shape. Speeds are not asserted. One tiny run
of every section serves all the tests below (the stacks start once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fishim.bench import procs, stacks
from fishim.bench.plan import PLANS
from fishim.bench.profile import summarise_stacks
from fishim.bench.report import MARK_BEGIN, MARK_END, render_markdown, write_markdown
from fishim.bench.run import run_bench
from fishim.bench.sections import NAMES, SECTIONS
from fishim.testing.mosquitto import find_mosquitto

BROKERS = ["fishim", "mosquitto"] if find_mosquitto() else ["fishim"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench-out")
    result = run_bench(PLANS["tiny"], list(NAMES), brokers=BROKERS, out=out)
    assert json.loads((out / "report.json").read_text()) == result
    assert not procs.CHILDREN, "every child process is stopped when the run ends"
    return result


@pytest.mark.timeout(180)
def test_report_meta_and_markdown(report: dict[str, Any]) -> None:
    meta = report["meta"]
    assert {"date", "mode", "command", "machine", "plan", "seconds"} <= set(meta)
    assert {"cores", "cpu_model", "python", "versions"} <= set(meta["machine"])
    assert set(report["results"]) == set(NAMES)
    markdown = render_markdown(report)
    assert markdown.startswith(MARK_BEGIN) and markdown.rstrip().endswith(MARK_END)
    assert "### Targets" in markdown
    for section in SECTIONS:  # each section's own part, heading first, is in the report
        lines = section.render(report["results"][section.name])
        assert lines[0].startswith("### ") and "\n".join(lines) in markdown, section.name


def test_throughput_section(report: dict[str, Any]) -> None:
    throughput = report["results"]["throughput"]
    assert throughput["brokers"] == BROKERS and throughput["payload_bytes"] == 200
    for qos in ("qos0", "qos1"):
        figures = throughput[qos]["fishim"]
        assert set(figures) == {"median_msgs_per_s", "min_delivered", "runs"}
        assert len(figures["runs"]) == report["meta"]["plan"]["reps"]
        assert figures["min_delivered"] == 1.0  # 300 messages on loopback: none lost, QoS 0 included


def test_e2e_section(report: dict[str, Any]) -> None:
    e2e = report["results"]["e2e"]["fishim"]
    assert e2e["bridge"]["runs"][0]["stored"] == report["meta"]["plan"]["e2e_n"]
    assert e2e["stored_vs_subscriber"] is not None and e2e["meets_target"] in (True, False)


def test_latency_section(report: dict[str, Any]) -> None:
    latency = report["results"]["latency"]["fishim"]["bridge"]
    assert latency["subscriber_ms_p99"] is not None and latency["store_visible_ms_p99"] is not None


def test_replay_section(report: dict[str, Any]) -> None:
    replay = report["results"]["replay"]
    assert replay["fishim"]["events"] == report["meta"]["plan"]["replay_events"]
    assert replay["sync_engine_alone"]["events"] == report["meta"]["plan"]["replay_events"]


def test_fanin_section(report: dict[str, Any]) -> None:
    fanin = report["results"]["fanin"]["fishim"]
    assert fanin["delivered_ratio"] == 1.0 and fanin["stored_ratio"] == 1.0


def test_memory_section(report: dict[str, Any]) -> None:
    memory = report["results"]["memory"]
    for label in ("small", "big"):
        assert memory[label]["rss_mib"] is not None and memory[label]["runs"][0]["stored"] == 100


def test_durable_section_counts_every_pubacked_message_in_the_store(report: dict[str, Any]) -> None:
    durable = report["results"]["durable"]
    up = durable["up"]
    assert up["all_stored"], "every message the run published and got PUBACKed is a row at the end"
    assert up["pubacked_implies_stored"] and up["acked_not_stored_max"] == 0, "fishim up PUBACKs after commit"
    assert up["durable_per_s"] and up["runs"][0]["store_checks"] >= 1
    if "mosquitto" in BROKERS:
        assert durable["ratio_up_vs_mosquitto_bridge"] is not None


def test_durable_latency_section(report: dict[str, Any]) -> None:
    up = report["results"]["durable-latency"]["up"]
    assert up["puback_ms_p99"] is not None and up["subscriber_ms_p99"] is not None


def test_synchronous_section(report: dict[str, Any]) -> None:
    sync = report["results"]["synchronous"]
    if "skipped" in sync:
        pytest.skip(f"synchronous section: {sync['skipped']}")
    for setting in ("OFF", "NORMAL", "FULL", "EXTRA"):
        assert sync[setting]["all_stored"] and sync[setting]["durable_per_s"]


def test_drain_section(report: dict[str, Any]) -> None:
    drain = report["results"]["drain"]
    if "skipped" in drain:
        pytest.skip(f"drain section: {drain['skipped']}")
    assert drain["stored"] == drain["queued"]


def test_replay_client_section(report: dict[str, Any]) -> None:
    replay = report["results"]["replay-client"]
    events = report["meta"]["plan"]["client_events"]
    assert replay["engine"]["events"] == replay["network"]["events"] == replay["client"]["events"] == events


def test_profile_section(report: dict[str, Any]) -> None:
    profile = report["results"]["profile"]
    if "skipped" in profile:
        pytest.skip(f"profile section: {profile['skipped']}")
    assert "broker" in profile and "bridge" in profile


def test_markdown_update_keeps_hand_written_text(tmp_path: Path) -> None:
    report = {"meta": {"date": "2026-01-01T00:00:00+00:00", "mode": "quick", "seconds": 1.0, "command": "x",
                       "machine": {"cores": 2, "cpu_model": "cpu", "memory_gib": 1, "os": "Linux", "python": "3.11",
                                   "git_commit": None, "versions": {"amqtt": "0.12.1", "paho-mqtt": "2.2.0",
                                                                    "mosquitto": None, "sqlite": "3"}}},
              "results": {}}
    target = tmp_path / "BENCHMARKS.md"
    target.write_text(f"# Title\n\nintro\n\n{MARK_BEGIN}\nold figures\n{MARK_END}\n\n## Profile\nnotes\n")

    write_markdown(target, report)

    text = target.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith("## Profile\nnotes\n")
    assert "old figures" not in text and text.count(MARK_BEGIN) == 1 and "Run 2026-01-01" in text


def test_profile_summary_reads_collapsed_stacks() -> None:
    text = ("process 1:\"python\";run (threading.py:10);work (/x/fishim/bridge.py:5);dumps (json/__init__.py:1) 30\n"
            "process 1:\"python\";run (threading.py:10);work (/x/fishim/bridge.py:6) 10\n")
    summary = summarise_stacks(text)
    assert summary["samples"] == 40
    assert summary["self_percent"][0] == ["dumps (json/__init__.py)", 75.0]
    assert ["json", 75.0] in summary["area_self_percent"] and ["fishim", 25.0] in summary["area_self_percent"]


def test_fill_store_writes_a_replayable_history(tmp_path: Path) -> None:
    """The replay and memory sections stand on fill_store: its rows must be what the bridge writes."""
    from fishim.store import Store

    db = tmp_path / "hist.db"
    stacks.fill_store(db, 250, orders=5, customer="replayer", prefix="rp")
    with Store(db, readonly=True) as store:
        assert store.count_events() == 250
        assert [e.seq for e in store.events_since(0, limit=1000)] == list(range(1, 251))
        assert len(store.order_ids_for("replayer", "customer")) == 5


def test_fishim_bench_runs_from_outside_a_checkout(tmp_path: Path) -> None:
    """``fishim bench`` needs only the installed package: run from an empty directory, no scripts/."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-m", "fishim", "bench", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in NAMES)

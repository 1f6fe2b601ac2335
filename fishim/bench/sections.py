"""The section table: what ``--only`` can name, in run order, and how each part of the report is made.

Every section is one module with a ``render`` (its part of BENCHMARKS.md) and, where the issues set
one, ``targets`` (rows of the Targets table). ``group`` says how it runs: ``own`` sections start
their own brokers; ``live`` sections share the two broker + bridge stacks of :mod:`fishim.bench.live`;
``up`` sections share the ``fishim up`` stacks of :mod:`fishim.bench.durable`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from fishim.bench import drain, durable, e2e, fanin, latency, memory, profile, replay, replay_client, throughput

Rows = list[tuple[str, str, bool | None]]


@dataclass(frozen=True)
class Section:
    name: str
    group: Literal["own", "live", "up"]
    render: Callable[[dict[str, Any]], list[str]]
    targets: Callable[[dict[str, Any]], Rows] | None = None
    run: Callable[..., dict[str, Any]] | None = None  # ``own`` sections: run(bench) -> result


SECTIONS: tuple[Section, ...] = (  # in report order; run order is by group (own, live, up), see run.py
    Section("throughput", "own", throughput.render, run=throughput.section_throughput),
    Section("e2e", "live", e2e.render, e2e.targets),
    Section("latency", "live", latency.render, latency.targets),
    Section("replay", "live", replay.render, replay.targets),
    Section("fanin", "live", fanin.render),
    Section("memory", "own", memory.render, memory.targets, run=memory.section_memory),
    Section("durable", "up", durable.render_durable, durable.targets_durable),
    Section("durable-latency", "up", durable.render_latency, durable.targets_latency),
    Section("synchronous", "own", durable.render_synchronous, run=durable.section_synchronous),
    Section("drain", "own", drain.render, run=drain.section_drain),
    Section("replay-client", "own", replay_client.render, run=replay_client.section_replay_client),
    Section("profile", "live", profile.render),
)
NAMES = tuple(s.name for s in SECTIONS)

"""How much one benchmark mode runs, and the targets the report checks each figure against.

Kept apart from the sections so a smoke test can build a ``tiny`` plan and every section reads its
sizes from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import fishim

HOST = "127.0.0.1"
PAYLOAD_BYTES = 200
PREFIX = "fishim"
BROKERS = ("fishim", "amqtt", "mosquitto")
LIVE_BROKERS = ("fishim", "mosquitto")  # the ones the bridge runs on in sections 2-5
# The directory holding the ``fishim`` package: a checkout's root, or site-packages when installed.
PACKAGE_ROOT = Path(fishim.__file__).resolve().parent.parent

# Targets from the benchmark issues; the report says for each whether this run met it.
TARGET_E2E_OVERHEAD = 0.10  # embedded: the bridge costs at most 10% of a plain subscriber's rate
TARGET_MOSQUITTO_STORED = 0.90  # Mosquitto: the bridge stores >= 90% of what a plain subscriber gets
TARGET_LATENCY_P99_MS = 5.0  # publish -> subscriber at 1,000 msg/s with the bridge, embedded broker
TARGET_REPLAY_PER_S = 20_000.0
TARGET_MEMORY_GROWTH = 0.10  # bridge RSS over the big history at most 10% above the small one
TARGET_DURABLE_RATIO = 1.0  # `fishim up` durable rate >= Mosquitto + bridge stored rate
TARGET_DURABLE_P99_MS = 5.0  # `fishim up` at 1,000 msg/s: publish -> PUBACK and publish -> subscriber


@dataclass(frozen=True)
class Plan:
    """How much of everything one mode runs."""

    name: str
    reps: int  # repetitions per figure; the median is reported
    tput_n: int  # messages per throughput run (section 1)
    e2e_n: int  # messages per end-to-end run (section 2, and the durable sections)
    latency_rate: int  # msg/s of the steady-rate latency runs (section 3, durable latency)
    latency_s: float
    latency_baseline: bool  # also measure section 3 without the bridge
    replay_events: int
    fanin_riders: int
    fanin_s: float
    fanin_reps: int
    fanin_procs: int  # load-generator processes the riders are spread over
    fanin_parallel: bool  # run the embedded and the Mosquitto fan-in at the same time
    memory_small: int
    memory_big: int
    memory_push: int  # messages pushed through the bridge before its RSS is read
    profile_s: float
    idle_s: float  # a run ends when nothing moved for this long after the publisher finished
    run_cap_s: float  # and never lasts longer than this
    client_events: int = 10_000  # replay-client: realistic history replayed through FishimClient
    drain_n: int = 20_000  # drain: backlog queued on Mosquitto for a stopped bridge


PLANS: dict[str, Plan] = {
    "full": Plan("full", reps=5, tput_n=20_000, e2e_n=20_000, latency_rate=1000, latency_s=10.0,
                 latency_baseline=True, replay_events=10_000, fanin_riders=500, fanin_s=60.0, fanin_reps=3,
                 fanin_procs=2, fanin_parallel=False, memory_small=10_000, memory_big=1_000_000,
                 memory_push=5_000, profile_s=15.0, idle_s=10.0, run_cap_s=240.0),
    "quick": Plan("quick", reps=3, tput_n=1_500, e2e_n=1_500, latency_rate=1000, latency_s=1.0,
                  latency_baseline=False, replay_events=10_000, fanin_riders=50, fanin_s=10.0, fanin_reps=1,
                  fanin_procs=1, fanin_parallel=True, memory_small=10_000, memory_big=100_000,
                  memory_push=1_000, profile_s=2.0, idle_s=3.0, run_cap_s=30.0, client_events=2_000,
                  drain_n=2_000),
    # The test suite's smoke run: just enough to show every part still fits together.
    "tiny": Plan("tiny", reps=1, tput_n=300, e2e_n=300, latency_rate=200, latency_s=0.5, latency_baseline=False,
                 replay_events=500, fanin_riders=5, fanin_s=1.0, fanin_reps=1, fanin_procs=1, fanin_parallel=True,
                 memory_small=100, memory_big=1_000, memory_push=100, profile_s=1.0, idle_s=2.0, run_cap_s=20.0,
                 client_events=200, drain_n=200),
}

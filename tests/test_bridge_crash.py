"""The bridge is SIGKILLed twice mid-stream and restarted: nothing lost, nothing stored twice, order kept.

Real processes only: a broker (Mosquitto, or ``python -m fishim broker``), the bridge as
``python -m fishim bridge`` and a paho publisher. What makes it hold is ack-after-commit: whatever the
killed bridge had not committed was not acknowledged, so the broker's persistent session for the bridge
redelivers it, and whatever it had committed but not acknowledged comes back as a duplicate ``id``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from _bridge_support import Brokers, Proc, chat, count_events, placed, read_db, wait_until

from fishim.testing.mosquitto import find_mosquitto
from fishim.testing.mqtt import connect_client, publish_and_wait

log = logging.getLogger("tests.bridge_crash")

ORDERS = 50
CHATS_PER_ORDER = 60
TOTAL = ORDERS * (1 + CHATS_PER_ORDER)  # 3,050 events: a 'placed' and 60 chat messages per order
KILL_AT = (900, 2000)  # stored events at which the running bridge is SIGKILLed


@pytest.fixture(params=["mosquitto", "embedded"])
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Brokers]:
    if request.param == "mosquitto" and find_mosquitto() is None:
        pytest.skip("Debian mosquitto not installed")
    brokers = Brokers(request.param, tmp_path)
    try:
        yield brokers
    finally:
        brokers.close()


def test_sigkill_twice_mid_stream_loses_and_duplicates_nothing(broker: Brokers, tmp_path: Path) -> None:
    procs: list[Proc] = []

    def start_bridge() -> Proc:
        args, env = broker.bridge_args()
        proc = Proc(args, env=env, cwd=tmp_path)
        procs.append(proc)
        return proc

    kills: list[int] = []
    try:
        bridge = start_bridge()
        bridge.wait_log("bridge ready")  # subscribed: from here on the broker keeps everything for it
        with connect_client(broker.port) as publisher:
            for o in range(ORDERS):
                publish_and_wait(publisher, f"fishim/orders/O{o}/status", placed(f"O{o}"), retain=True)
            stream = [publisher.publish(f"fishim/orders/O{o}/chat/cust1", chat(f"c-O{o}-{k}", text=f"n{k}"), qos=1)
                      for k in range(CHATS_PER_ORDER) for o in range(ORDERS)]
            for threshold in KILL_AT:
                wait_until(lambda t=threshold: count_events(broker.db) >= t, 30, f"{threshold} events stored")
                bridge.kill()
                kills.append(count_events(broker.db))
                bridge = start_bridge()
            for info in stream:
                info.wait_for_publish(30)
                assert info.is_published()
        wait_until(lambda: count_events(broker.db) >= TOTAL, 30, f"all {TOTAL} events stored")
        assert bridge.terminate() == 0  # graceful: commit, ack, disconnect, exit 0
        final = next(line for line in bridge.lines if "bridge stopped" in line)
    finally:
        for proc in procs:
            proc.kill()

    assert all(k < TOTAL for k in kills), f"a kill came after the stream ended: {kills}"
    with closing(read_db(broker.db)) as db:
        rows = db.execute("SELECT order_id, id, order_seq, seq FROM events ORDER BY order_id, order_seq").fetchall()
        deadletters = db.execute("SELECT count(*) FROM deadletters").fetchone()[0]
    ids = [r[1] for r in rows]
    expected = {f"placed-O{o}" for o in range(ORDERS)} | {
        f"c-O{o}-{k}" for o in range(ORDERS) for k in range(CHATS_PER_ORDER)}
    lost, twice = expected - set(ids), len(ids) - len(set(ids))
    assert (len(lost), twice, len(ids), deadletters) == (0, 0, TOTAL, 0), sorted(lost)[:10]
    for o in range(ORDERS):
        mine = [r for r in rows if r[0] == f"O{o}"]
        assert [r[1] for r in mine] == [f"placed-O{o}"] + [f"c-O{o}-{k}" for k in range(CHATS_PER_ORDER)]
        assert [r[2] for r in mine] == list(range(1, CHATS_PER_ORDER + 2))
        assert [r[3] for r in mine] == sorted(r[3] for r in mine)  # store-wide seq agrees with order_seq
    redelivered = re.search(r"duplicates=(\d+)", final)
    log.info("crash broker=%s messages=%d kills=%d killed_at=%s lost=%d stored_twice=%d last_run_duplicates=%s",
             broker.kind, TOTAL, len(kills), kills, len(lost), twice, redelivered and redelivered.group(1))

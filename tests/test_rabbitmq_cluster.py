"""The bridge on a 2-node RabbitMQ cluster (MQTT plugin): the node it is on is killed during a burst.

The bridge is given both nodes (``--broker URL1,URL2``) and connects to the first. A publisher on the
second node sends a burst; when part of it is stored, node 1's Erlang VM is SIGKILLed. The bridge must
move to node 2, where its persistent session (a queue, mirrored by the harness's policy) lives on,
and store every message the cluster acknowledged (PUBACK to the publisher) exactly once.

Starting the cluster costs ~40 s on 2 cores, so the module starts it once and has one test.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from _bridge_support import PY, Proc, chat, clean_env, count_events, placed, read_db, wait_until

from fishim.testing.mqtt import connect_client, publish_and_wait
from fishim.testing.rabbitmq import RabbitCluster, find_rabbitmq

log = logging.getLogger("tests.rabbitmq_cluster")

ORDERS = 10
CHATS = 100
TOTAL = ORDERS * (1 + CHATS)
KILL_AT = 300


@pytest.fixture(scope="module")
def cluster() -> Iterator[RabbitCluster]:
    if find_rabbitmq() is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the RabbitMQ cluster test must run in CI: Debian rabbitmq-server missing")
        pytest.skip("Debian rabbitmq-server not installed (scripts/test installs it when run as root)")
    with RabbitCluster(2) as running:
        yield running


def test_bridge_moves_to_the_surviving_node(cluster: RabbitCluster, tmp_path: Path) -> None:
    first, second = cluster.nodes
    db = tmp_path / "shop.db"
    urls = f"mqtt://127.0.0.1:{first.mqtt_port},mqtt://127.0.0.1:{second.mqtt_port}"
    bridge = Proc([PY, "-m", "fishim", "bridge", "--db", str(db), "--broker", urls], env=clean_env(), cwd=tmp_path)
    try:
        bridge.wait_log(f"connected broker=mqtt://127.0.0.1:{first.mqtt_port}", timeout=30)
        bridge.wait_log("bridge ready", timeout=30)
        with connect_client(second.mqtt_port, "fishim-test-publisher") as publisher:
            for o in range(ORDERS):
                publish_and_wait(publisher, f"fishim/orders/R{o}/status", placed(f"R{o}"), retain=True)
            stream = {f"c-R{o}-{k}": publisher.publish(f"fishim/orders/R{o}/chat/cust1", chat(f"c-R{o}-{k}"), qos=1)
                      for k in range(CHATS) for o in range(ORDERS)}
            wait_until(lambda: count_events(db) >= KILL_AT, 60, f"{KILL_AT} events stored")
            killed_at = count_events(db)
            cluster.kill(first)
            bridge.wait_log(f"connected broker=mqtt://127.0.0.1:{second.mqtt_port}", timeout=60)
            for info in stream.values():
                info.wait_for_publish(60)
            acked = {ident for ident, info in stream.items() if info.is_published()}
        expected = acked | {f"placed-R{o}" for o in range(ORDERS)}
        wait_until(lambda: count_events(db) >= len(expected), 60, f"{len(expected)} acknowledged events stored")
        assert bridge.terminate() == 0
    finally:
        bridge.kill()
    with closing(read_db(db)) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM events ORDER BY seq")]
        seqs = [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY seq")]
    lost, twice = expected - set(ids), len(ids) - len(set(ids))
    assert killed_at < TOTAL, "node 1 died after the whole burst was stored"
    assert (len(lost), twice) == (0, 0), sorted(lost)[:10]
    assert seqs == list(range(1, len(ids) + 1))
    for o in range(ORDERS):  # per order, the chats are stored in the order they were published
        mine = [i for i in ids if i.startswith(f"c-R{o}-")]
        assert mine == sorted(mine, key=lambda i: int(i.rsplit("-", 1)[1]))
    log.info("rabbitmq failover published=%d acked=%d stored=%d killed_at=%d", TOTAL, len(expected), len(ids),
             killed_at)

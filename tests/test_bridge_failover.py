"""Several broker URLs: the nodes of one clustered broker, tried in turn (the RabbitMQ cluster test,
tests/test_rabbitmq_cluster.py, kills a real node; this one needs only Mosquitto)."""

from __future__ import annotations

from pathlib import Path

import pytest
from _bridge_support import placed

from fishim.bridge import Bridge, BrokerTarget, parse_brokers
from fishim.config import Config
from fishim.store import open_store
from fishim.testing import free_port
from fishim.testing.mosquitto import Mosquitto, find_mosquitto
from fishim.testing.mqtt import connect_client, publish_and_wait


def test_url_lists() -> None:
    one, two = BrokerTarget("a", 1883), BrokerTarget("b", 1884, "u", "p")
    assert parse_brokers("mqtt://a, mqtt://u:p@b:1884") == [one, two]
    assert parse_brokers(["mqtt://a", "mqtt://u:p@b:1884"]) == [one, two]
    assert parse_brokers(["mqtt://a,mqtt://a"]) == [one, one]
    for bad in ("", " , ", "mqtt://a,http://b"):
        with pytest.raises(ValueError):
            parse_brokers(bad)


@pytest.mark.mosquitto
def test_a_dead_first_node_is_skipped_and_a_lost_node_left(tmp_path: Path) -> None:
    """Node 1 is down from the start: the bridge moves on to node 2. Node 2 then dies and node 1
    comes up: the bridge moves back and stores what is published there."""
    if find_mosquitto() is None:
        pytest.skip("Debian mosquitto not installed")
    config = Config.model_validate({"store": {"path": str(tmp_path / "f.db"), "synchronous": "OFF"}})
    first = Mosquitto(port=free_port(), workdir=tmp_path / "m1")
    (tmp_path / "m1").mkdir()
    with Mosquitto() as second:
        urls = f"mqtt://127.0.0.1:{first.port},mqtt://127.0.0.1:{second.port}"
        with Bridge(config, urls) as bridge:
            bridge.wait_ready(30)
            assert bridge.target.port == second.port
            with connect_client(second.port) as client:
                publish_and_wait(client, "fishim/orders/F1/status", placed("F1"), retain=True)
            bridge.wait_for(lambda s: s.stored >= 1)
            try:
                first.start()
                second.stop()
                bridge.wait_for(lambda s: s.connects >= 2, timeout=30)
                bridge.wait_ready(30)
                assert bridge.target.port == first.port
                with connect_client(first.port) as client:
                    publish_and_wait(client, "fishim/orders/F2/status", placed("F2"), retain=True)
                bridge.wait_for(lambda s: s.stored >= 2)
            finally:
                first.close()
    with open_store(config.store.target, readonly=True) as store:
        assert [e.id for e in store.events_since(0)] == ["placed-F1", "placed-F2"]

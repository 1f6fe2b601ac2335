"""How the bridge finds and logs in to its broker: ``--broker`` URLs and the service account."""

from __future__ import annotations

from pathlib import Path

import pytest

from fishim.auth import service_credentials
from fishim.bridge import Bridge, BrokerTarget, run_bridge
from fishim.config import Config
from fishim.store import Store
from fishim.testing.mosquitto import Mosquitto, find_mosquitto, write_password_file


def test_broker_urls() -> None:
    assert BrokerTarget.parse("mqtt://127.0.0.1:1884") == BrokerTarget("127.0.0.1", 1884)
    assert BrokerTarget.parse("mqtt://shop%40pc:p%3Ass@broker.local") == BrokerTarget(
        "broker.local", 1883, "shop@pc", "p:ss")
    assert str(BrokerTarget.parse("mqtt://u:secret@h:1")) == "mqtt://u@h:1"  # never the password
    for bad in ("http://h:1883", "mqtt://:1883", "mqtt://h:port", "h:1883"):
        with pytest.raises(ValueError):
            BrokerTarget.parse(bad)


def test_bad_url_exits_2_without_touching_the_store(tmp_path: Path) -> None:
    config = Config.model_validate({"store": {"path": str(tmp_path / "f.db")}})
    assert run_bridge(config, "http://127.0.0.1:1883") == 2
    assert not (tmp_path / "f.db").exists()


@pytest.mark.mosquitto
def test_service_account_logs_in_to_mosquitto_without_a_password_in_the_url(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("Debian mosquitto not installed")
    db = tmp_path / "f.db"
    with Store(db) as store:
        user, secret = service_credentials(store, "fishim-bridge")
    passwd = write_password_file(tmp_path / "passwd", {user: secret})
    config = Config.model_validate({"store": {"path": str(db)}})
    with Mosquitto(allow_anonymous=False, password_file=passwd) as broker:
        with Bridge(config, f"mqtt://fishim-bridge@127.0.0.1:{broker.port}") as bridge:
            bridge.wait_ready()
            assert bridge.target.password == secret
        with Bridge(config, f"mqtt://fishim-bridge:wrong@127.0.0.1:{broker.port}") as refused:
            assert refused.wait_for(lambda s: s.refused >= 1).connects == 0

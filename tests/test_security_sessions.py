"""Client ids belong to their owner; sessions end when they expire or their account is removed.

Issue 17, findings 1, 6 (session expiry) and 8 (removed user). Real broker with fishim's own
StoreAuthenticator and OrderAcl, real store, real paho clients and raw sockets. CONNACK return codes
come from MQTT 3.1.1 §3.2.2.3: 0x02 "identifier rejected" is what Mosquitto's
``use_username_as_clientid`` family answers, and what fishim answers to a client id that is not yours.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _security_shop import SERVICE, make_shop
from click.testing import CliRunner

from fishim.auth import add_user, service_credentials
from fishim.cli import main
from fishim.store import Store
from fishim.testing.mqtt import Collector, MqttClient, Will, connect_client, publish_and_wait

IDENTIFIER_REJECTED = 0x02
A1 = "fishim/orders/A1"


@pytest.fixture
def shop(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A fresh copy per test: some of these tests remove accounts."""
    db = tmp_path / "shop.db"
    return db, make_shop(db)


def login(port: int, passwords: dict[str, str], user: str, client_id: str, **kwargs: Any) -> MqttClient:
    return connect_client(port, client_id, username=user, password=passwords[user], **kwargs)


def raw_connect(raw_mqtt: Callable[[int], Any], port: int, client_id: str, user: str | None,
                password: str | None, clean: bool = True) -> int:
    """CONNECT on a fresh socket; the CONNACK return code."""
    _present, code = raw_mqtt(port).connect(client_id, clean=clean, username=user, password=password)
    return code


def sessions(broker: Any) -> set[str]:
    return set(broker.run(lambda: set(broker.broker.core._sessions)))


# -- 1. a client id belongs to the account whose session holds it ---------------------------------

def test_another_account_cannot_take_over_resume_or_end_a_session(
        shop: tuple[Path, dict[str, str]], secure_broker_factory: Callable[..., Any], raw_mqtt: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    db, passwords = shop
    broker = secure_broker_factory(db)
    port = broker.port
    caplog.set_level(logging.INFO, logger="fishim.broker")
    with login(port, passwords, SERVICE, "svc-1") as service, \
            login(port, passwords, "c1", "c1-phone", clean_session=False) as phone:
        inbox = Collector(phone, f"{A1}/#")
        # c2 (another customer) and boss (the owner, another role) try the id while c1 is online ...
        for user, clean in (("c2", True), ("c2", False), ("boss", True)):
            assert raw_connect(raw_mqtt, port, "c1-phone", user, passwords[user], clean) == IDENTIFIER_REJECTED
        publish_and_wait(service, f"{A1}/status", b"still-here")
        assert inbox.get().payload == b"still-here"  # c1 was never kicked off
        phone.disconnect()
        phone.wait_disconnected()
        publish_and_wait(service, f"{A1}/chat/r1", b"queued-for-c1")
        # ... and while it is offline: no resuming, and no clean connect throwing its queue away
        for user, clean in (("c2", False), ("c2", True)):
            assert raw_connect(raw_mqtt, port, "c1-phone", user, passwords[user], clean) == IDENTIFIER_REJECTED
        arrived: queue.Queue[bytes] = queue.Queue()
        with login(port, passwords, "c1", "c1-phone", clean_session=False,
                   setup=lambda c: c.message_callback_add(f"{A1}/#", lambda _c, _u, m: arrived.put(m.payload))
                   ) as again:
            assert again.session_present  # its session, with its queue, survived
            assert arrived.get(timeout=5) == b"queued-for-c1"
    refusals = [r.getMessage() for r in caplog.records if "connect_refused" in r.getMessage()]
    assert len(refusals) == 5 and all("reason=client_id_owned" in line for line in refusals)
    assert "client_id=c1-phone" in refusals[0] and "user=c2" in refusals[0]


def test_service_client_ids_are_reserved_for_the_service_account(
        shop: tuple[Path, dict[str, str]], secure_broker_factory: Callable[..., Any], raw_mqtt: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """``bridge.client_id`` and every ``fishim-*`` id, with a session or not: the bridge cannot be
    kicked off (issue 17.1: 0 of 5 PUBACKed chats were stored while a customer held its id)."""
    db, passwords = shop
    broker = secure_broker_factory(db)
    port = broker.port
    caplog.set_level(logging.INFO, logger="fishim.broker")
    with login(port, passwords, SERVICE, "fishim-bridge", clean_session=False) as bridge:
        inbox = Collector(bridge, f"{A1}/#")
        for user, client_id in (("c1", "fishim-bridge"), ("boss", "fishim-bridge"), ("c1", "fishim-cli"),
                                ("r1", "fishim-anything")):
            assert raw_connect(raw_mqtt, port, client_id, user, passwords[user], False) == IDENTIFIER_REJECTED
        with login(port, passwords, "boss", "boss-pc") as boss:
            publish_and_wait(boss, f"{A1}/status", b"bridge-still-connected")
        assert inbox.get().payload == b"bridge-still-connected"
    assert raw_connect(raw_mqtt, port, "fishim-other", SERVICE, passwords[SERVICE]) == 0  # its own, though
    lines = [r.getMessage() for r in caplog.records if "reason=client_id_reserved" in r.getMessage()]
    assert len(lines) == 4


def test_anonymous_loopback_and_a_named_user_are_different_principals(
        tmp_path: Path, secure_broker_factory: Callable[..., Any], raw_mqtt: Any) -> None:
    """Before the first account exists, a loopback client is anonymous whatever name it sends; the
    account of that name made later is someone else and may not resume the anonymous session."""
    db = tmp_path / "bare.db"
    with Store(db) as store:
        secret = service_credentials(store, SERVICE)[1]
    broker = secure_broker_factory(db)
    port = broker.port
    with connect_client(port, "dev-1", username="r7", clean_session=False) as anonymous:
        anonymous.subscribe_and_wait("fishim/orders/#")
    with Store(db) as store:
        add_user(store, "r7", "rider", "r7-password")
    assert raw_connect(raw_mqtt, port, "dev-1", "r7", "r7-password", clean=False) == IDENTIFIER_REJECTED
    assert raw_connect(raw_mqtt, port, "dev-2", "r7", "r7-password", clean=False) == 0
    assert raw_connect(raw_mqtt, port, "fishim-bridge", "r7", "r7-password") == IDENTIFIER_REJECTED
    assert raw_connect(raw_mqtt, port, "fishim-bridge", SERVICE, secret, clean=False) == 0


# -- 6. persistent sessions expire ---------------------------------------------------------------

def test_a_session_that_stays_away_expires_and_frees_its_client_id(
        shop: tuple[Path, dict[str, str]], secure_broker_factory: Callable[..., Any], raw_mqtt: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    """``broker.session_expiry``: the session, its queue and its claim on the id go; the
    service account's session stays."""
    db, passwords = shop
    broker = secure_broker_factory(db, broker={"session_expiry": "1s", "account_check_interval": 0.1})
    port = broker.port
    caplog.set_level(logging.INFO, logger="fishim.broker")
    with login(port, passwords, SERVICE, "fishim-bridge", clean_session=False) as bridge:
        bridge.subscribe_and_wait(f"{A1}/#")
    with login(port, passwords, "c1", "shared-dev", clean_session=False) as phone:
        phone.subscribe_and_wait(f"{A1}/#")
    with login(port, passwords, "boss", "boss-pc") as boss:
        publish_and_wait(boss, f"{A1}/status", b"queued-then-expired")
    broker.wait_until(lambda: "shared-dev" not in broker.broker.core._sessions, timeout=15)
    assert "fishim-bridge" in sessions(broker)
    assert any("session_expired client_id=shared-dev user=c1 queued=1" in r.getMessage() for r in caplog.records)
    assert raw_connect(raw_mqtt, port, "shared-dev", "c2", passwords["c2"], clean=False) == 0  # free again
    assert raw_connect(raw_mqtt, port, "shared-dev", "c1", passwords["c1"], clean=False) == IDENTIFIER_REJECTED


# -- 8. a removed account is cut off -------------------------------------------------------------

def test_removed_user_is_disconnected_and_its_session_deleted(
        shop: tuple[Path, dict[str, str]], secure_broker_factory: Callable[..., Any]) -> None:
    """``fishim users remove`` in another process: within ``broker.account_check_interval`` the
    broker drops the user's connection (no will) and deletes its persistent session; paho's
    automatic reconnect is refused."""
    db, passwords = shop
    broker = secure_broker_factory(db, broker={"account_check_interval": 0.1})
    port = broker.port
    with login(port, passwords, "boss", "boss-pc") as boss, \
            Collector(boss, [f"{A1}/chat/c1", f"{A1}/status"]) as watched, \
            login(port, passwords, "c1", "c1-phone", clean_session=False,
                  will=Will(f"{A1}/chat/c1", b"c1-will")) as phone, \
            login(port, passwords, "r1", "r1-phone") as rider:
        phone.subscribe_and_wait(f"{A1}/#")
        result = CliRunner().invoke(main, ["users", "remove", "c1"], env={"FISHIM_DB": str(db)})
        assert result.exit_code == 0, result.output
        assert phone.wait_disconnected(timeout=10).is_failure  # cut by the broker, not by us
        broker.wait_until(lambda: "c1-phone" not in broker.broker.core._sessions)
        assert rider.is_connected()  # nobody else is touched
        publish_and_wait(boss, f"{A1}/status", b"marker")
        assert watched.get().payload == b"marker"  # and c1's will was not published
        phone._fx_wait(lambda: phone.last_connack is not None and phone.last_connack.is_failure, 10,
                       "refused reconnect")

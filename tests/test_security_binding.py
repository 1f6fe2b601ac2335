"""The sender is the login, everywhere (issue: security round two, findings 2 and 3).

On `fishim up`'s broker (durable ingest) with real accounts and paho clients: an envelope naming
someone else is refused with ``sender_mismatch`` on every channel, status included; nobody but
fishim publishes on ``errors/``; a will is authorised and validated when it fires, as its owner at
that moment. Absence is shown by a marker routed after the thing that must not arrive.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from _bridge_support import read_db
from _security_shop import make_shop

from fishim.testing.mqtt import Collector, MqttClient, connect_client, publish_and_wait


@pytest.fixture
def shop(tmp_path: Path, secure_broker_factory: Callable[..., Any]) -> tuple[Any, dict[str, str], Path]:
    db = tmp_path / "shop.db"
    passwords = make_shop(db)
    return secure_broker_factory(db, ingest=True), passwords, db


def login(shop: tuple[Any, dict[str, str], Path], user: str, client_id: str | None = None) -> MqttClient:
    broker, passwords, _db = shop
    return connect_client(broker.port, client_id or f"{user}-{time.monotonic_ns()}", username=user,
                          password=passwords[user])


def event(ident: str, sender: str, **fields: Any) -> dict[str, Any]:
    return {"id": ident, "ts": 1, "sender": sender, **fields}


def rows(db: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with closing(read_db(db)) as conn:
        return conn.execute(sql, args).fetchall()


def until_marker(inbox: Collector, marker: str) -> list[str]:
    """Ids of everything ``inbox`` got up to and without the marker (sent after the thing tested)."""
    got = []
    while (ident := inbox.get(timeout=10).json().get("id")) != marker:
        got.append(ident)
    return got


@pytest.mark.parametrize(("channel", "body"), [
    ("status", {"state": "assigned", "rider": "r2"}),  # the attack found: a rider moving the order as boss
    ("location", {"lat": 30.2, "lon": 120.1}),
    ("picks", {"sku": "rod", "qty": 1}),
])
def test_an_envelope_naming_someone_else_is_refused(shop: tuple[Any, dict[str, str], Path], channel: str,
                                                    body: dict[str, Any]) -> None:
    _broker, _pw, db = shop
    publisher = {"picks": "scan1"}.get(channel, "r1")
    with login(shop, publisher) as attacker, login(shop, "clerk") as clerk, \
            Collector(attacker, f"fishim/errors/{publisher}") as told, \
            Collector(clerk, "fishim/orders/A1/#") as watcher:
        publish_and_wait(attacker, f"fishim/orders/A1/{channel}", event(f"forged-{channel}", "boss", **body))
        error = told.get(timeout=10).json()
        publish_and_wait(clerk, "fishim/orders/A1/chat/clerk", event(f"marker-{channel}", "clerk", text="m"))
        assert until_marker(watcher, f"marker-{channel}") == []  # never routed
    assert (error["error"], error["id"]) == ("sender_mismatch", f"forged-{channel}")
    assert "'boss'" in error["detail"] and f"'{publisher}'" in error["detail"]
    assert rows(db, "SELECT rider FROM orders WHERE id='A1'") == [("r1",)]
    assert rows(db, "SELECT user, error FROM deadletters WHERE msg_id=?", f"forged-{channel}") == [
        (publisher, "sender_mismatch")]


def test_own_name_is_accepted_and_stored_as_the_login(shop: tuple[Any, dict[str, str], Path]) -> None:
    _broker, _pw, db = shop
    with login(shop, "r1") as rider:
        publish_and_wait(rider, "fishim/orders/A1/location", event("own-fix", "r1", lat=30.2, lon=120.1))
    assert rows(db, "SELECT sender FROM events WHERE id='own-fix'") == [("r1",)]


def test_only_fishim_publishes_on_errors(shop: tuple[Any, dict[str, str], Path]) -> None:
    """A scanner (or anyone) writing to another user's errors topic, with an id it chose: refused,
    and the victim receives nothing (its next real message is the marker)."""
    with login(shop, "scan1") as scanner, login(shop, "c1") as victim, login(shop, "clerk") as clerk, \
            Collector(victim, ["fishim/errors/c1", "fishim/orders/A1/chat/+"]) as inbox, \
            Collector(scanner, "fishim/errors/scan1") as told:
        publish_and_wait(scanner, "fishim/errors/c1", {"topic": "fishim/orders/A1/chat/c1", "id": "c1-msg",
                                                       "error": "forbidden", "detail": "your order is cancelled"})
        assert told.get(timeout=10).json()["error"] == "forbidden"
        publish_and_wait(clerk, "fishim/orders/A1/chat/clerk", event("err-marker", "clerk", text="m"))
        assert until_marker(inbox, "err-marker") == []


def _will_fires(shop: tuple[Any, dict[str, str], Path], raw_mqtt: Callable[[int], Any], client_id: str,
                will: dict[str, Any]) -> None:
    """r1 connects with a retained QoS-1 will on A3's status, then its link dies without DISCONNECT."""
    broker, passwords, _db = shop
    raw = raw_mqtt(broker.port)
    raw.connect(client_id, will=("fishim/orders/A3/status", json.dumps(will).encode()), username="r1",
                password=passwords["r1"], flags_extra=0x20)  # will retain
    return raw


def _wait_deadletter(db: Path, ident: str) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + 10
    while not (found := rows(db, "SELECT user, error FROM deadletters WHERE msg_id=?", ident)):
        assert time.monotonic() < deadline, f"no dead letter for {ident}"
        time.sleep(0.02)
    return found


def test_a_will_is_checked_when_it_fires_not_at_connect(shop: tuple[Any, dict[str, str], Path],
                                                        raw_mqtt: Callable[[int], Any]) -> None:
    """r1 leaves a will cancelling A3 (as boss: a sender mismatch, and a rider may not cancel), is
    reassigned away, then drops: at that moment r1 may not publish on A3 at all, so the will is
    refused by the ACL, nothing is routed, and A3 stays assigned to r2."""
    _broker, _pw, db = shop
    raw = _will_fires(shop, raw_mqtt, "r1-will", event("will-cancel", "boss", state="cancelled"))
    with login(shop, "clerk") as clerk, Collector(clerk, "fishim/orders/A3/status") as watcher:
        publish_and_wait(clerk, "fishim/orders/A3/status", event("to-r2", "clerk", state="assigned", rider="r2"),
                         retain=True)
        assert watcher.get(timeout=10).json()["id"] == "to-r2"
        raw.abort()
        assert _wait_deadletter(db, "will-cancel") == [("r1", "forbidden")]
        publish_and_wait(clerk, "fishim/orders/A3/status", event("st-marker", "clerk", state="assigned", rider="r2"),
                         retain=True)
        assert until_marker(watcher, "st-marker") == []
    assert rows(db, "SELECT state, rider FROM orders WHERE id='A3'") == [("assigned", "r2")]


def test_a_will_naming_someone_else_is_refused_when_it_fires(shop: tuple[Any, dict[str, str], Path],
                                                             raw_mqtt: Callable[[int], Any]) -> None:
    """Still a member when it drops, but the will claims to be boss: refused like any publish."""
    _broker, _pw, db = shop
    raw = _will_fires(shop, raw_mqtt, "r1-will-2", event("will-boss", "boss", state="cancelled"))
    raw.abort()
    assert _wait_deadletter(db, "will-boss") == [("r1", "sender_mismatch")]
    assert rows(db, "SELECT state FROM orders WHERE id='A3'") == [("assigned",)]

"""Roles and order membership on every topic, on the embedded broker with real paho clients.

The expectations are the hand-written table in ``_security_shop`` (who may publish, subscribe and
receive each topic), never derived from :mod:`fishim.auth`. They are checked twice: directly
against :class:`~fishim.auth.OrderAcl` (fast, precise failures) and end to end on one broker per
module, where a denied delivery is shown by its absence before a sentinel published after it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _security_shop import (
    PUBLISH,
    PUBLISHERS,
    RECEIVE,
    RECEIVE_FILTERS,
    RECEIVERS,
    RETAINED,
    SERVICE,
    SUBSCRIBE,
    Recorder,
    allowed,
    body,
    make_shop,
    run_table,
)

from fishim.auth import OrderAcl, Principal
from fishim.bridge import Bridge
from fishim.config import Config, ListenerConfig, StoreConfig
from fishim.testing.mqtt import Collector, MqttClient, connect_client, publish_and_wait

ROLE_OF = {"boss": "owner", "clerk": "staff", "r1": "rider", "r2": "rider", "c1": "customer",
           "scan1": "scanner", SERVICE: "service"}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    db = tmp_path_factory.mktemp("secure") / "shop.db"
    return db, make_shop(db)


@pytest.fixture(scope="module")
def broker(shop: tuple[Path, dict[str, str]], secure_broker_factory: Callable[..., object]) -> object:
    return secure_broker_factory(shop[0])


def principal(user: str) -> Principal:
    return Principal(username=user, role=ROLE_OF[user])


# -- the table, straight against the Authorizer --------------------------------------------------

def test_table_against_order_acl(shop: tuple[Path, dict[str, str]]) -> None:
    acl = OrderAcl(shop[0], Config())
    wrong = []
    try:
        for user in PUBLISHERS:
            for topic in PUBLISH:
                if acl.may_publish(principal(user), f"fishim/{topic.format(me=user)}") != allowed(PUBLISH, topic, user):
                    wrong.append(f"publish {user} {topic}")
        for user in RECEIVERS:
            for topic in RECEIVE:
                if acl.may_receive(principal(user), f"fishim/{topic}") != allowed(RECEIVE, topic, user):
                    wrong.append(f"receive {user} {topic}")
            for pattern in SUBSCRIBE:
                if acl.may_subscribe(principal(user), pattern.format(me=user)) != allowed(SUBSCRIBE, pattern, user):
                    wrong.append(f"subscribe {user} {pattern}")
    finally:
        acl.close()
    assert wrong == []


def test_anonymous_and_unknown_roles(shop: tuple[Path, dict[str, str]]) -> None:
    """Anonymous (loopback, no users yet) may do everything under the prefix and nothing outside;
    an account with a role this version doesn't know may do nothing."""
    acl = OrderAcl(shop[0], Config())
    anonymous, odd = Principal(), Principal(username="x", role="auditor")
    try:
        for topic in ("fishim/orders/A2/chat/c2", "fishim/system/membership", "fishim/errors/c1"):
            assert acl.may_publish(anonymous, topic) and acl.may_receive(anonymous, topic)
            assert not acl.may_publish(odd, topic) and not acl.may_receive(odd, topic)
        assert acl.may_subscribe(anonymous, "#") and not acl.may_subscribe(odd, "#")
        for principal_ in (anonymous, principal("boss"), principal(SERVICE)):
            assert not acl.may_publish(principal_, "other/topic")
            assert not acl.may_receive(principal_, "other/topic")
            assert not acl.may_subscribe(principal_, "$SYS/#")
            assert not acl.may_publish(principal_, "fishim/orders/+/status")  # wildcards are filters only
    finally:
        acl.close()


def test_membership_cache_follows_announcements_and_the_store(shop: tuple[Path, dict[str, str]]) -> None:
    acl = OrderAcl(shop[0], Config())
    r1, r2 = principal("r1"), principal("r2")
    try:
        assert acl.may_receive(r1, "fishim/orders/A1/status")  # loaded from the store
        assert acl.observe("fishim/system/membership", b'{"order": "A1", "customer": "c1", "rider": "r2"}')
        assert not acl.may_receive(r1, "fishim/orders/A1/status")
        assert acl.may_receive(r2, "fishim/orders/A1/status")
        assert acl.members("A1") == ("c1", "r2")
        assert acl.observe("fishim/system/membership", b'{"order": "A1", "rider": "r1"}')  # customer kept
        assert acl.members("A1") == ("c1", "r1")
        assert acl.observe("fishim/system/membership", b"not json")  # ignored, logged
        assert not acl.observe("fishim/orders/A1/status", b"{}")
        assert acl.members("NOPE") is None
    finally:
        acl.close()


# -- the table on real clients ------------------------------------------------------------------

def test_access_table_on_real_clients(broker: object, shop: tuple[Path, dict[str, str]],
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Every role x channel x publish / subscribe / retained delivery / live delivery, 0 leaks; and
    no password in any log record (unmasked, DEBUG) of the 32 logins it takes."""
    caplog.set_level(logging.DEBUG)
    result = run_table(broker.port, shop[1], suback_enforced=True)  # type: ignore[attr-defined]
    assert result.wrong == []
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "connected client_id=c1-rx0" in logged
    assert not [user for user, pw in shop[1].items() if pw in logged]
    size = (len(PUBLISHERS) * len(PUBLISH) + len(RECEIVERS) * len(SUBSCRIBE)
            + len(RECEIVERS) * len(RECEIVE_FILTERS) * (len(RETAINED) + len(RECEIVE)))
    assert result.rows == size == 1028


def test_reassigned_rider_stops_receiving_at_once(broker: object, shop: tuple[Path, dict[str, str]]) -> None:
    """The bridge's membership announcement (as the service account) takes effect for the very next
    message: r1 subscribed to everything sees A3 until r2 is assigned, and nothing after."""
    port, passwords = broker.port, shop[1]  # type: ignore[attr-defined]
    clients: list[MqttClient] = []
    try:
        service, r1, r2, c1 = (connect_client(port, f"{u}-reassign", username=u, password=passwords[u])
                               for u in (SERVICE, "r1", "r2", "c1"))
        clients += [service, r1, r2, c1]
        recorders = {}
        for user, client in (("r1", r1), ("r2", r2), ("c1", c1)):
            recorders[user] = Recorder(client, sentinel=f"end:{user}")
            client.subscribe_and_wait("fishim/#")

        def round_(tag: str) -> dict[str, set[str]]:
            publish_and_wait(service, "fishim/orders/A3/status", body(tag))
            publish_and_wait(service, "fishim/orders/A3/chat/c1", body(f"{tag}-chat"))
            for user in recorders:  # sentinels; retained messages left by the table are not this test's
                publish_and_wait(service, f"fishim/errors/{user}", body(f"end:{user}"))
            got = {user: rec.wait(f"end:{user}") for user, rec in recorders.items()}
            return {user: {t for t in tags if not t.startswith("ret:")} for user, tags in got.items()}

        before = round_("before")
        publish_and_wait(service, "fishim/system/membership",
                         json.dumps({"order": "A3", "customer": "c1", "rider": "r2"}).encode())
        after = round_("after")
    finally:
        for client in clients:
            client.close()
    assert before == {"r1": {"before", "before-chat"}, "r2": set(), "c1": {"before", "before-chat"}}
    assert after == {"r1": set(), "r2": {"after", "after-chat"}, "c1": {"after", "after-chat"}}


def test_only_the_service_account_moves_membership(broker: object, shop: tuple[Path, dict[str, str]]) -> None:
    """A rider (or the owner) publishing a membership message is refused, and the ACL is unchanged."""
    port, passwords = broker.port, shop[1]  # type: ignore[attr-defined]
    acl: OrderAcl = broker.acl  # type: ignore[attr-defined]
    before = acl.members("A2")
    for user in ("r1", "boss"):
        with connect_client(port, f"{user}-grab", username=user, password=passwords[user]) as client:
            publish_and_wait(client, "fishim/system/membership",
                             json.dumps({"order": "A2", "customer": "c2", "rider": user}).encode())
    with connect_client(port, "svc-check", username=SERVICE, password=passwords[SERVICE]) as service:
        publish_and_wait(service, "fishim/errors/c2", body("flush"))  # routed after the two above
    assert broker.run(lambda: acl.members("A2")) == before == ("c2", "r2")  # type: ignore[attr-defined]


def _tags(recorder: Recorder, sentinel: str, timeout: float = 30.0) -> list[str]:
    """Every tag ``recorder`` got until ``sentinel``, in order and with repeats (``wait`` dedups)."""
    if not recorder.done.wait(timeout):
        raise TimeoutError(f"no sentinel {sentinel} within {timeout}s")
    recorder.done.clear()
    tags, recorder.got = [tag for tag, _ in recorder.got], []
    return tags


def test_reassignment_through_the_real_bridge(tmp_path: Path, secure_broker_factory: Callable[..., object]) -> None:
    """Staff reassigns A3 from r1 to r2; the bridge commits it and announces the membership. The
    retained ``assigned`` status was routed before the announcement, under the old membership, so
    the broker sends it (retained) to r2 when the announcement passes: every subscriber gets it
    exactly once, r2 included. From the announcement on, A3's chat reaches r2 and no longer r1."""
    db = tmp_path / "shop.db"
    passwords = make_shop(db)
    broker = secure_broker_factory(db)
    port: int = broker.port  # type: ignore[attr-defined]
    config = Config(store=StoreConfig(path=db), listeners=[ListenerConfig(bind=f"127.0.0.1:{port}")])
    clients: list[MqttClient] = []
    bridge = Bridge(config)
    try:
        bridge.start()
        bridge.wait_ready(30)
        clerk, r1, r2, c1, boss, watcher = (
            connect_client(port, f"{u}-bridged-{i}", username=u, password=passwords[u])
            for i, u in enumerate(("clerk", "r1", "r2", "c1", "boss", SERVICE)))
        clients += [clerk, r1, r2, c1, boss, watcher]
        readers = {"r1": (r1, "fishim/#"), "r2": (r2, "fishim/#"), "c1": (c1, "fishim/#"),
                   "clerk": (clerk, "fishim/orders/+/status"), "boss": (boss, "fishim/orders/A3/#")}
        recorders = {u: Recorder(c, sentinel=f"end:{u}") for u, (c, _) in readers.items()}
        for user, (client, topic_filter) in readers.items():
            client.subscribe_and_wait(topic_filter)
            client.subscribe_and_wait(f"fishim/errors/{user}")  # the sentinel's (once, with fishim/#)
        with Collector(watcher, "fishim/system/membership") as announcements:
            publish_and_wait(clerk, "fishim/orders/A3/status", {"id": "reassign-1", "ts": 1, "sender": "clerk",
                                                                 "state": "assigned", "rider": "r2"}, retain=True)
            # the broker hands the announcement to OrderAcl.observe before routing it, so once the
            # watcher has it, the ACL has it (and r2 has been sent the retained status)
            assert announcements.get(timeout=30).json() == {"order": "A3", "customer": "c1", "rider": "r2"}
        publish_and_wait(clerk, "fishim/orders/A3/chat/clerk", {"id": "after-1", "ts": 2, "sender": "clerk",
                                                                 "text": "r2 takes this one"})
        for user in recorders:
            publish_and_wait(watcher, f"fishim/errors/{user}", body(f"end:{user}"))
        got = {user: _tags(rec, f"end:{user}") for user, rec in recorders.items()}
    finally:
        for client in clients:
            client.close()
        bridge.stop()
    assert {user: tags.count("reassign-1") for user, tags in got.items()} == {
        "r1": 1, "r2": 1, "c1": 1, "clerk": 1, "boss": 1}
    assert "after-1" in got["r2"] and "after-1" not in got["r1"]


def test_announcement_sends_the_newly_readable_retained_state(tmp_path: Path,
                                                              secure_broker_factory: Callable[..., object]) -> None:
    """No bridge: the service account announces A3's new rider itself. r2 (live, and offline with a
    persistent session) is sent A3's retained messages once, retain=1 at min(retained, subscription)
    QoS; r1, who could read them before, and A1's retained status are left alone; a repeated
    announcement sends nothing more."""
    db = tmp_path / "shop.db"
    passwords = make_shop(db)
    broker = secure_broker_factory(db)
    port: int = broker.port  # type: ignore[attr-defined]

    def login(user: str, client_id: str, **kwargs: object) -> MqttClient:
        client = connect_client(port, client_id, username=user, password=passwords[user], **kwargs)  # type: ignore[arg-type]
        clients.append(client)
        return client

    def until_sentinel(collector: Collector, user: str) -> list[tuple[str, str, int, bool]]:
        publish_and_wait(service, f"fishim/errors/{user}", body(f"end:{user}"))
        got = []
        while (message := collector.get(timeout=30)).topic != f"fishim/errors/{user}":
            got.append((message.topic, message.json()["id"], message.qos, message.retain))
        return got

    def announce() -> None:
        publish_and_wait(service, "fishim/system/membership",
                         json.dumps({"order": "A3", "customer": "c1", "rider": "r2"}).encode())

    clients: list[MqttClient] = []
    try:
        service = login(SERVICE, "svc-catchup")
        publish_and_wait(service, "fishim/orders/A3/status", body("st-A3"), retain=True)
        publish_and_wait(service, "fishim/orders/A3/location", body("loc-A3"), qos=0, retain=True)
        publish_and_wait(service, "fishim/orders/A1/status", body("st-A1"), retain=True)
        away = login("r2", "r2-away", clean_session=False)
        away.subscribe_and_wait("fishim/orders/+/status")
        away.close()
        broker.wait_until(lambda: broker.broker.sessions_connected() == 1)  # type: ignore[attr-defined]
        r1 = Collector(login("r1", "r1-catchup"), ["fishim/orders/#", "fishim/errors/r1"])
        r2 = Collector(login("r2", "r2-catchup"), ["fishim/orders/+/status", "fishim/orders/+/location",
                                                    "fishim/errors/r2"])
        assert {m[1] for m in until_sentinel(r1, "r1")} == {"st-A3", "loc-A3", "st-A1"}  # on subscribe
        assert until_sentinel(r2, "r2") == []  # not a member of A3 (nor A1) yet
        announce()
        assert until_sentinel(r2, "r2") == [("fishim/orders/A3/status", "st-A3", 1, True),
                                            ("fishim/orders/A3/location", "loc-A3", 0, True)]
        assert until_sentinel(r1, "r1") == []
        announce()  # nothing changes: nothing is sent again
        assert until_sentinel(r2, "r2") == []
        inbox: list[tuple[str, str, bool]] = []

        def record(_c: object, _u: object, msg: Any) -> None:
            inbox.append((msg.topic, json.loads(msg.payload)["id"], bool(msg.retain)))

        back = login("r2", "r2-away", clean_session=False,
                     setup=lambda client: setattr(client, "on_message", record))
        assert back.session_present
        back.subscribe_and_wait("fishim/errors/r2")
        publish_and_wait(service, "fishim/errors/r2", body("end:r2"))
        broker.wait_until(lambda: len(inbox) >= 2, timeout=30)  # type: ignore[attr-defined]
    finally:
        for client in clients:
            client.close()
    assert inbox == [("fishim/orders/A3/status", "st-A3", True), ("fishim/errors/r2", "end:r2", False)]

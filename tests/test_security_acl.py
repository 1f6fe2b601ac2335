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
from fishim.config import Config
from fishim.testing.mqtt import MqttClient, connect_client, publish_and_wait

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
    """Anonymous (loopback, no users yet) may do everything under the prefix and nothing outside
    (a bridge beside `fishim broker` without credentials is anonymous too); an account with a role
    this version doesn't know may do nothing. What only fishim writes (errors, presence, notify,
    system, sync replies) no account but the service account may write, whatever its role."""
    acl = OrderAcl(shop[0], Config())
    anonymous, odd = Principal(), Principal(username="x", role="auditor")
    try:
        for topic in ("fishim/orders/A2/chat/c2", "fishim/system/membership", "fishim/errors/c1"):
            assert acl.may_publish(anonymous, topic) and acl.may_receive(anonymous, topic)
            assert not acl.may_publish(odd, topic) and not acl.may_receive(odd, topic)
        for topic in ("fishim/errors/c1", "fishim/presence/c1", "fishim/notify/c1", "fishim/system/membership",
                      "fishim/sync/boss/d/events"):
            assert acl.may_publish(principal(SERVICE), topic), topic
            assert not any(acl.may_publish(principal(user), topic) for user in ROLE_OF if user != SERVICE), topic
        assert acl.may_subscribe(anonymous, "#") and not acl.may_subscribe(odd, "#")
        for principal_ in (anonymous, principal("boss"), principal(SERVICE)):
            assert not acl.may_publish(principal_, "other/topic")
            assert not acl.may_receive(principal_, "other/topic")
            assert not acl.may_subscribe(principal_, "$SYS/#")
            assert not acl.may_publish(principal_, "fishim/orders/+/status")  # wildcards are filters only
    finally:
        acl.close()


def test_membership_cache_follows_set_members_and_the_store(shop: tuple[Path, dict[str, str]]) -> None:
    now = [0.0]
    acl = OrderAcl(shop[0], Config(), clock=lambda: now[0])
    r1, r2 = principal("r1"), principal("r2")
    try:
        assert acl.may_receive(r1, "fishim/orders/A1/status")  # loaded from the store (A1: c1, r1)
        acl.set_members("A1", "c1", "r2")  # what the ingest does after committing a reassignment
        assert not acl.may_receive(r1, "fishim/orders/A1/status")
        assert acl.may_receive(r2, "fishim/orders/A1/status")
        assert acl.members("A1") == ("c1", "r2")
        now[0] += 60  # fed by an ingest, the cache is authoritative: no re-read of the (older) store
        assert acl.members("A1") == ("c1", "r2")
        assert acl.members("NOPE") is None
    finally:
        acl.close()


def test_membership_without_an_ingest_is_re_read_from_the_store(shop: tuple[Path, dict[str, str]],
                                                                 tmp_path: Path) -> None:
    """`fishim broker` with a bridge elsewhere: nothing feeds the ACL, so a cached membership is read
    again from the store (where the bridge commits changes) once it is older than STALE_AFTER_S."""
    import shutil

    from fishim.store import Store

    db = tmp_path / "copy.db"
    shutil.copy2(shop[0], db)
    now = [0.0]
    acl = OrderAcl(db, Config(), clock=lambda: now[0])
    try:
        assert acl.members("A2") == ("c2", "r2")
        with Store(db) as store:
            order = store.get_order("A2")
            assert order is not None
            store.put_order(order.model_copy(update={"rider": "r1"}))
        assert acl.members("A2") == ("c2", "r2")  # still the cached value
        now[0] += OrderAcl.STALE_AFTER_S + 0.1
        assert acl.members("A2") == ("c2", "r1")
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


def _say(client: MqttClient, topic: str, tag: str, retain: bool = False, **fields: Any) -> None:
    """``clerk`` publishes a valid event (the ingest refuses anything else)."""
    publish_and_wait(client, f"fishim/orders/{topic}", {"id": tag, "ts": 1, "sender": "clerk", **fields},
                     retain=retain)


def test_reassignment_takes_effect_from_the_commit_that_made_it(
        tmp_path: Path, secure_broker_factory: Callable[..., object]) -> None:
    """`fishim up`'s broker: clerk reassigns A3 from r1 to r2. The ingest hands the new membership to
    the ACL before it routes the batch, so r2 receives the `assigned` status itself live (no sync,
    no announcement) and every later event of A3; r1, no longer a member, receives nothing from
    that status on. Absence is shown by sentinels routed after."""
    db = tmp_path / "shop.db"
    passwords = make_shop(db)
    broker = secure_broker_factory(db, ingest=True)
    port: int = broker.port  # type: ignore[attr-defined]
    clients: list[MqttClient] = []
    try:
        clerk, r1, r2, c1 = (connect_client(port, f"{u}-reassign", username=u, password=passwords[u])
                             for u in ("clerk", "r1", "r2", "c1"))
        clients += [clerk, r1, r2, c1]
        recorders = {u: Recorder(c, sentinel=f"end:{u}") for u, c in (("r1", r1), ("r2", r2), ("c1", c1))}
        for client in (r1, r2, c1):
            client.subscribe_and_wait("fishim/orders/+/status")
            client.subscribe_and_wait("fishim/orders/+/chat/+")

        def round_(tag: str, *moves: tuple[str, dict[str, Any]]) -> dict[str, set[str]]:
            for i, (state, extra) in enumerate(moves):
                _say(clerk, "A3/status", f"{tag}-{state}-{i}", retain=True, state=state, **extra)
            _say(clerk, "A3/chat/clerk", f"{tag}-chat", text="hello")
            for user, rec in recorders.items():  # sentinels: A1 chat (c1, r1 read it); r2's on A2
                rec.sentinel = f"end:{user}:{tag}"
                _say(clerk, f"{'A2' if user == 'r2' else 'A1'}/chat/clerk", rec.sentinel, text="sentinel")
            got = {user: rec.wait(rec.sentinel) for user, rec in recorders.items()}
            return {user: {t for t in tags if not t.startswith(("ret:", "end:"))} for user, tags in got.items()}

        before = round_("before")
        after = round_("after", ("assigned", {"rider": "r2"}))
    finally:
        for client in clients:
            client.close()
    assert before == {"r1": {"before-chat"}, "r2": set(), "c1": {"before-chat"}}
    assert after == {"r1": set(), "r2": {"after-assigned-0", "after-chat"},
                     "c1": {"after-assigned-0", "after-chat"}}


def test_nobody_moves_membership_by_publishing(broker: object, shop: tuple[Path, dict[str, str]]) -> None:
    """Membership changes only by committed statuses: a rider (or the owner) publishing under
    `fishim/system/` is refused, and the ACL is unchanged."""
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




def test_a_tracking_link_sees_its_riders_presence_only_while_the_order_is_open(
        shop: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """`t-A1` (a tracking link: the customer of A1, no account) reads the presence of A1's rider r1,
    not of another rider; once A1 is delivered, not even r1's."""
    import shutil

    from fishim.store import Store

    db = tmp_path / "copy.db"
    shutil.copy2(shop[0], db)
    link = Principal(username="t-A1", role="customer", order="A1")
    acl = OrderAcl(db, Config())
    try:
        assert acl.may_receive(link, "fishim/presence/r1")
        assert not acl.may_receive(link, "fishim/presence/r2")
        with Store(db) as store:
            order = store.get_order("A1")
            assert order is not None
            store.put_order(order.model_copy(update={"state": "delivered"}))
        assert not acl.may_receive(link, "fishim/presence/r1")
    finally:
        acl.close()

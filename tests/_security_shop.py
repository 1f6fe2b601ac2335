"""The accounts and orders the security tests share (a helper module, not a test file).

Orders ``A1`` and ``A3`` belong to customer ``c1`` with rider ``r1``; ``A2`` to ``c2`` with ``r2``.
Every account has its own password; the bridge's account is provisioned as the bridge does it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishim.auth import add_user, service_credentials
from fishim.store import OrderRow, Store
from fishim.testing.mqtt import MqttClient, MqttError, connect_client, publish_and_wait
from fishim.topics import matches

SERVICE = "fishim-bridge"
ROLES = {"boss": "owner", "clerk": "staff", "r1": "rider", "r2": "rider", "c1": "customer", "c2": "customer",
         "scan1": "scanner"}
ORDERS = {"A1": ("c1", "r1"), "A2": ("c2", "r2"), "A3": ("c1", "r1")}


def password(name: str) -> str:
    return f"pw-{name}-S3cret!"


_TEMPLATE = tempfile.TemporaryDirectory(prefix="fishim-security-shop-")  # removed at exit


def make_shop(db: Path) -> dict[str, str]:
    """Create the store; returns every account's clear password, the service account's included.

    argon2 makes hashing eight accounts take seconds, so the store is built once per test run and
    copied (with its ``.secret`` file) for every module that asks.
    """
    template = Path(_TEMPLATE.name) / "shop.db"
    if not template.exists():
        _build(template)
    for suffix in ("", ".secret"):
        shutil.copy2(template.with_name(template.name + suffix), db.with_name(db.name + suffix))
    passwords = {name: password(name) for name in ROLES}
    passwords[SERVICE] = template.with_name(template.name + ".secret").read_text(encoding="utf-8").strip()
    return passwords


def _build(db: Path) -> None:
    with Store(db) as store:
        for name, role in ROLES.items():
            add_user(store, name, role, password(name))
        service_credentials(store, SERVICE)
        with store.transaction():
            for order_id, (customer, rider) in ORDERS.items():
                store.put_order(OrderRow(id=order_id, state="assigned", customer=customer, rider=rider,
                                         created_at=1, updated_at=1, last_seq=1, order_seq=1))


# -- the access table: written out by hand, never derived from fishim.auth ------------------------
# Topics are relative to the prefix "fishim/". "{me}" is the acting user's own name. Each value
# lists who is allowed; everyone else must be refused.

PUBLISHERS = ("boss", "clerk", "r1", "c1", "scan1", SERVICE)
RECEIVERS = ("boss", "clerk", "r1", "c1", "scan1")
EVERYONE = " ".join(PUBLISHERS)

PUBLISH: dict[str, str] = {
    "orders/A1/status": f"boss clerk r1 {SERVICE}",
    "orders/A1/location": f"boss clerk r1 {SERVICE}",
    "orders/A1/picks": f"boss clerk scan1 {SERVICE}",
    "orders/A1/chat/{me}": f"boss clerk r1 c1 {SERVICE}",
    "orders/A1/chat/c2": SERVICE,  # someone else's leaf
    "orders/A1/receipts/{me}": f"boss clerk r1 c1 {SERVICE}",
    "orders/A1/receipts/r2": SERVICE,
    "orders/A2/status": f"boss clerk {SERVICE}",  # A2 is neither r1's nor c1's
    "orders/A2/location": f"boss clerk {SERVICE}",
    "orders/A2/picks": f"boss clerk scan1 {SERVICE}",
    "orders/A2/chat/{me}": f"boss clerk {SERVICE}",
    "orders/A2/receipts/{me}": f"boss clerk {SERVICE}",
    "sync/{me}/dev/request": EVERYONE,
    "sync/c2/dev/request": SERVICE,
    "sync/{me}/dev/events": SERVICE,
    "errors/{me}": SERVICE,
    "errors/c2": SERVICE,
    "system/membership": SERVICE,
    "system/other": SERVICE,
    "presence/{me}": SERVICE,  # only fishim speaks on presence, notify, errors and system
    "notify/{me}": SERVICE,
}

RECEIVE: dict[str, str] = {
    "orders/A1/status": "boss clerk r1 c1",
    "orders/A1/location": "boss clerk r1 c1",
    "orders/A1/picks": "boss clerk r1 c1",
    "orders/A1/chat/c1": "boss clerk r1 c1",
    "orders/A1/chat/r1": "boss clerk r1 c1",
    "orders/A1/receipts/c1": "boss clerk r1 c1",
    "orders/A1/receipts/r1": "boss clerk r1 c1",
    "orders/A2/status": "boss clerk",
    "orders/A2/location": "boss clerk",
    "orders/A2/picks": "boss clerk",
    "orders/A2/chat/c2": "boss clerk",
    "orders/A2/receipts/c2": "boss clerk",
    "sync/r1/phone/events": "boss r1",
    "sync/c1/phone/events": "boss c1",
    "sync/clerk/pc/events": "boss clerk",
    "sync/scan1/gun/events": "boss scan1",
    "sync/c2/phone/events": "boss",
    "sync/c1/phone/request": "boss",  # requests are for the bridge
    "errors/r1": "boss r1",
    "errors/c1": "boss c1",
    "errors/scan1": "boss scan1",
    "errors/c2": "boss",
    "system/other": "boss",
}
RETAINED = tuple(t for t in RECEIVE if t.split("/")[-1] in ("status", "location")
                 or t.split("/")[-2:-1] == ["receipts"])

SUBSCRIBE: dict[str, str] = {
    "#": "boss clerk r1 c1 scan1",
    "fishim/#": "boss clerk r1 c1 scan1",
    "+/orders/#": "boss clerk r1 c1",
    "fishim/orders/+/status": "boss clerk r1 c1",
    "fishim/orders/+/chat/+": "boss clerk r1 c1",
    "fishim/orders/+/picks": "boss clerk r1 c1",
    "fishim/orders/A1/#": "boss clerk r1 c1",
    "fishim/orders/A1/chat/c1": "boss clerk r1 c1",
    "fishim/orders/A2/#": "boss clerk",
    "fishim/orders/A2/chat/c2": "boss clerk",
    "fishim/sync/+/+/events": "boss clerk r1 c1 scan1",
    "fishim/sync/{me}/+/events": "boss clerk r1 c1 scan1",
    "fishim/sync/c2/+/events": "boss",
    "fishim/errors/+": "boss clerk r1 c1 scan1",
    "fishim/errors/c2": "boss",
    "fishim/system/#": "boss",
    "$SYS/#": "",
    "other/#": "",
}

# Each receiver gets one client per filter: the broad ones a rider's app might use, a foreign order.
RECEIVE_FILTERS = ("#", "fishim/orders/+/#", "fishim/orders/A2/#", "fishim/sync/+/+/events")


def allowed(table: dict[str, str], key: str, user: str) -> bool:
    return user in table[key].split()


@dataclass
class Recorder:
    """Every message one client receives, in order, until its sentinel arrives."""

    client: MqttClient
    got: list[tuple[str, str]] = field(default_factory=list)  # (tag, topic)
    done: threading.Event = field(default_factory=threading.Event)
    sentinel: str = ""

    def __post_init__(self) -> None:
        self.client.on_message = self._on_message

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        try:
            tag = str(json.loads(msg.payload).get("id", msg.topic))
        except (ValueError, AttributeError):  # not a JSON object: not one of the table's messages
            tag = msg.topic
        if tag == self.sentinel:
            self.done.set()
        elif not tag.startswith("end:"):  # other clients' sentinels, e.g. to an owner reading all
            self.got.append((tag, msg.topic))

    def wait(self, sentinel: str, timeout: float = 30.0) -> set[str]:
        if not self.done.wait(timeout):
            raise TimeoutError(f"{self.client!r}: no sentinel {sentinel} within {timeout}s")
        self.done.clear()
        tags, self.got = {tag for tag, _ in self.got}, []
        return tags


def body(tag: str) -> bytes:
    return json.dumps({"id": tag, "ts": 1, "sender": "t", "text": "x"}).encode()


@dataclass
class TableRun:
    """What one run of the table found: rows checked and every row that disagreed."""

    rows: int = 0
    wrong: list[str] = field(default_factory=list)

    def check(self, what: str, expected: bool, actual: bool) -> None:
        self.rows += 1
        if expected != actual:
            self.wrong.append(f"{what}: expected {'allow' if expected else 'deny'}, "
                              f"got {'allow' if actual else 'deny'}")


def run_table(port: int, passwords: dict[str, str], *, suback_enforced: bool) -> TableRun:
    """Publish, subscribe and (retained and live) receive rows against a broker on ``port``.

    ``suback_enforced``: the broker refuses forbidden subscriptions in the SUBACK (the embedded
    broker does; Mosquitto 2 grants every SUBACK and filters each delivery instead).
    """
    result = TableRun()
    clients: list[MqttClient] = []

    def connect(user: str, tag: str) -> MqttClient:
        client = connect_client(port, f"{user}-{tag}", username=user, password=passwords[user])
        clients.append(client)
        return client

    try:
        service = connect(SERVICE, "svc")
        # 1. retained messages exist before anyone else subscribes
        for topic in RETAINED:
            publish_and_wait(service, f"fishim/{topic}", body(f"ret:{topic}"), retain=True)
        _subscribe_rows(result, connect, suback_enforced)
        _receive_rows(result, connect, service)
        _publish_rows(result, connect, service)
    finally:
        for client in clients:
            client.close()
    return result


def _subscribe_rows(result: TableRun, connect: Any, suback_enforced: bool) -> None:
    for user in RECEIVERS:
        probe = connect(user, "probe")
        probe.on_message = lambda *_: None
        for pattern, who in SUBSCRIBE.items():
            try:
                probe.subscribe_and_wait(pattern.format(me=user))
                granted = True
            except MqttError:
                granted = False
            if suback_enforced:
                result.check(f"subscribe {user} {pattern}", user in who.split(), granted)


def _receive_rows(result: TableRun, connect: Any, service: MqttClient) -> None:
    recorders: dict[tuple[str, str], Recorder] = {}
    granted: dict[tuple[str, str], bool] = {}
    for user in RECEIVERS:
        for topic_filter in RECEIVE_FILTERS:
            rec = Recorder(connect(user, f"rx{RECEIVE_FILTERS.index(topic_filter)}"), sentinel=f"end:{user}")
            rec.client.subscribe_and_wait(f"fishim/errors/{user}")  # for the sentinel
            try:
                rec.client.subscribe_and_wait(topic_filter)
                granted[user, topic_filter] = True
            except MqttError:
                granted[user, topic_filter] = False
            recorders[user, topic_filter] = rec
    for topic in RECEIVE:
        publish_and_wait(service, f"fishim/{topic}", body(f"live:{topic}"))
    for user in RECEIVERS:
        publish_and_wait(service, f"fishim/errors/{user}", body(f"end:{user}"))
    for (user, topic_filter), rec in recorders.items():
        got = rec.wait(f"end:{user}")
        for phase, topics in (("retained", RETAINED), ("live", RECEIVE)):
            for topic in topics:
                tag = f"{'ret' if phase == 'retained' else 'live'}:{topic}"
                expected = allowed(RECEIVE, topic, user) and (
                    matches(f"fishim/{topic}", topic_filter) or topic == f"errors/{user}")
                result.check(f"{phase} {user} via {topic_filter} {topic}", expected, tag in got)
                got.discard(tag)
        for tag in got:
            result.check(f"unexpected {tag} for {user} via {topic_filter}", False, True)


def _publish_rows(result: TableRun, connect: Any, service: MqttClient) -> None:
    watcher = Recorder(connect(SERVICE, "watch"), sentinel="end:publish")
    watcher.client.subscribe_and_wait("fishim/#")
    publishers = {user: connect(user, "tx") if user != SERVICE else service for user in PUBLISHERS}
    for user, client in publishers.items():
        for topic in PUBLISH:
            publish_and_wait(client, f"fishim/{topic.format(me=user)}", body(f"pub:{user}:{topic}"))
        # the user's last message is one it may send: once the watcher has it, all before it are in
        publish_and_wait(client, f"fishim/sync/{user}/dev/request", body(f"pubend:{user}"))
    publish_and_wait(service, "fishim/system/other", body("end:publish"))
    got = watcher.wait("end:publish")
    for user in PUBLISHERS:
        assert f"pubend:{user}" in got, f"{user}'s messages did not all arrive"
        for topic in PUBLISH:
            result.check(f"publish {user} {topic}", allowed(PUBLISH, topic, user), f"pub:{user}:{topic}" in got)

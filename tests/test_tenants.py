"""Two shops on ONE Mosquitto: each its own prefix, accounts, `fishim bridge` process and store.

Nothing may cross between them: no order event, sync page or error message of one shop reaches a
client or the store of the other, even with the same order id in both shops and each shop's owner
subscribed to ``#``. Absence is proven with a marker each shop's bridge produces after everything else.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _bridge_support import PY, Proc, body, clean_env, placed, status
from click.testing import CliRunner

from fishim.auth import add_user, service_credentials
from fishim.cli import main
from fishim.config import load_config
from fishim.store import Store, UserRow
from fishim.testing.mosquitto import Mosquitto, find_mosquitto
from fishim.testing.mqtt import Collector, MqttClient, connect_client, publish_and_wait

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(find_mosquitto() is None, reason="Debian mosquitto not installed")]

PW = "Tenant-pw-1"


@dataclass
class Shop:
    name: str  # also the first letter of its account names
    prefix: str
    dir: Path
    config: Path
    db: Path

    def user(self, role: str) -> str:
        return f"{self.name}-{role}"


def make_shop(root: Path, name: str, prefix: str, *, logins: bool = True) -> Shop:
    """A shop's broker.yaml, store, accounts and its own `fishim mosquitto-acl` directory.

    ``logins=False``: accounts nobody can log in with (no password hashing), for the ACL file alone.
    """
    shop_dir = root / name
    shop_dir.mkdir()
    db = shop_dir / "shop.db"
    config = shop_dir / "broker.yaml"
    config.write_text(f"prefix: {prefix}\nstore: {{path: {db}, synchronous: 'OFF'}}\n")
    shop = Shop(name, prefix, shop_dir, config, db)
    cfg = load_config(config, env={})
    with Store(db) as store:
        for role in ("owner", "staff", "customer"):
            if logins:
                add_user(store, shop.user(role), role, PW)
            else:
                store.put_user(UserRow(name=shop.user(role), role=role, password_hash="!", created_at=0))
        if logins:
            service_credentials(store, cfg.bridge.username)
    lines = "".join(f"{shop.user(role)}:{PW}\n" for role in ("owner", "staff", "customer")) if logins else ""
    result = CliRunner().invoke(main, ["-c", str(config), "mosquitto-acl", "--out", str(shop_dir / "etc"),
                                       "--passwords-stdin"], input=lines, env={}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return shop


@pytest.fixture(scope="module")
def shops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Mosquitto, Shop, Shop]]:
    root = tmp_path_factory.mktemp("tenants")
    north = make_shop(root, "n", "chain/north")
    south = make_shop(root, "s", "chain/south")
    merged = CliRunner().invoke(main, ["mosquitto-merge", "--out", str(root / "etc"), str(north.dir / "etc"),
                                       str(south.dir / "etc")], catch_exceptions=False)
    assert merged.exit_code == 0, merged.output
    bridges: list[Proc] = []
    with Mosquitto(allow_anonymous=False, password_file=root / "etc" / "passwd",
                   acl_file=root / "etc" / "acl") as broker:
        try:
            for shop in (north, south):
                service = load_config(shop.config, env={}).bridge.username
                bridges.append(Proc([PY, "-m", "fishim", "-c", str(shop.config), "bridge", "--broker",
                                     f"mqtt://{service}@127.0.0.1:{broker.port}"], env=clean_env(), cwd=shop.dir))
            for proc in bridges:
                proc.wait_log("bridge ready")
            yield broker, north, south
        finally:
            for proc in bridges:
                assert proc.terminate() == 0, "\n".join(proc.lines[-20:])


def test_merge_refuses_clashes(tmp_path: Path) -> None:
    a = make_shop(tmp_path, "a", "chain", logins=False)
    b = make_shop(tmp_path, "b", "chain/b", logins=False)  # inside a's prefix: a's owner would read it
    c = make_shop(tmp_path, "c", "other", logins=False)
    (c.dir / "etc" / "acl").write_text((c.dir / "etc" / "acl").read_text().replace("user c-owner", "user a-owner"))
    for dirs, words in (([a, b], ["overlaps", "'chain/b'", "'chain'"]), ([a, c], ["'a-owner'", "unique"])):
        result = CliRunner().invoke(main, ["mosquitto-merge", "--out", str(tmp_path / "out"),
                                           *(str(s.dir / "etc") for s in dirs)])
        assert result.exit_code == 2 and all(w in result.stderr for w in words), result.stderr
        assert not (tmp_path / "out" / "acl").exists()


def test_bridge_names_follow_the_prefix(tmp_path: Path) -> None:
    """Two shops' bridges on one broker must not share a client id (one persistent session for both)."""
    one = load_config(env={})
    north = load_config(make_cfg(tmp_path, "prefix: chain/north\n"), env={})
    named = load_config(make_cfg(tmp_path, "prefix: x\nbridge: {client_id: mine}\n"), env={})
    assert (one.bridge.client_id, one.bridge.username) == ("fishim-bridge", "fishim-bridge")
    assert (north.bridge.client_id, north.bridge.username) == ("fishim-bridge-chain-north",) * 2
    assert (named.bridge.client_id, named.bridge.username) == ("mine", "fishim-bridge-x")


def make_cfg(tmp: Path, text: str) -> Path:
    path = tmp / f"c{abs(hash(text))}.yaml"
    path.write_text(text)
    return path


def test_nothing_crosses_between_shops(shops: tuple[Mosquitto, Shop, Shop]) -> None:
    broker, north, south = shops
    clients: list[MqttClient] = []

    def connect(shop: Shop, role: str) -> MqttClient:
        clients.append(connect_client(broker.port, f"{shop.user(role)}-t", username=shop.user(role), password=PW))
        return clients[-1]

    try:
        owners = {s.name: Collector(connect(s, "owner"), "#") for s in (north, south)}  # all the ACL lets through
        staff = {s.name: connect(s, "staff") for s in (north, south)}
        customer = {s.name: connect(s, "customer") for s in (north, south)}
        for shop in (north, south):  # the same order id in both shops
            p, st = shop.prefix, staff[shop.name]
            publish_and_wait(st, f"{p}/orders/o-1/status", placed("o-1", shop.user("customer"), f"{shop.name}-s1"),
                             retain=True)
            publish_and_wait(st, f"{p}/orders/o-1/chat/{shop.user('staff')}",
                             body(id=f"{shop.name}-c1", sender=shop.user("staff"), text="hi"))
            # an illegal move: the shop's bridge refuses it and tells the sender on its own errors topic
            bad = body(id=f"{shop.name}-bad", sender=shop.user("staff"), state="delivered")
            publish_and_wait(st, f"{p}/orders/o-1/status", bad, retain=True)
            # reaching into the other shop: Mosquitto's ACL drops it (PUBACK, never delivered)
            other = south if shop is north else north
            publish_and_wait(st, f"{other.prefix}/orders/o-1/status",
                             status("o-1", "cancelled", f"{shop.name}-intrude"), retain=True)
        pages = {}
        for shop in (north, south):
            me = customer[shop.name]
            sync = Collector(me, [f"{shop.prefix}/sync/{shop.user('customer')}/phone/events",
                                  f"{other_prefix(shop, north, south)}/sync/{shop.user('customer')}/phone/events"])
            publish_and_wait(me, f"{shop.prefix}/sync/{shop.user('customer')}/phone/request", {"since": 0})
            pages[shop.name] = sync.get(10).json()
            sync.close()
        for shop in (north, south):  # the marker: a sync reply each bridge sends after committing the rest
            publish_and_wait(staff[shop.name], f"{shop.prefix}/orders/o-1/chat/{shop.user('staff')}",
                             body(id=f"{shop.name}-end", sender=shop.user("staff"), text="end"))
            publish_and_wait(owners[shop.name].client, f"{shop.prefix}/sync/{shop.user('owner')}/end/request",
                             {"since": 0})
        for shop in (north, south):
            seen = wait_marker(owners[shop.name], f"{shop.prefix}/sync/{shop.user('owner')}/end/events")
            other = south if shop is north else north
            assert seen and all(topic.startswith(shop.prefix + "/") for topic, _ in seen), seen
            ids = {ident for _, ident in seen}
            assert f"{shop.name}-c1" in ids and not any(i and i.startswith(other.name + "-") for i in ids), ids
            errors = [t for t, i in seen if "/errors/" in t]
            assert errors == [f"{shop.prefix}/errors/{shop.user('staff')}"], seen
            page = pages[shop.name]
            assert page["done"] and [e["payload"]["id"] for e in page["events"]] == [f"{shop.name}-s1",
                                                                                     f"{shop.name}-c1"]
            with Store(shop.db, readonly=True) as store:
                stored = [e.id for e in store.events_since(0)]
                letters = [d.msg_id for d in store.deadletters()]
            assert stored == [f"{shop.name}-s1", f"{shop.name}-c1", f"{shop.name}-end"]
            assert letters == [f"{shop.name}-bad"]
    finally:
        for client in clients:
            client.close()


def other_prefix(shop: Shop, north: Shop, south: Shop) -> str:
    return (south if shop is north else north).prefix


def wait_marker(collector: Collector, marker: str) -> list[tuple[str, str | None]]:
    """(topic, envelope id) of everything the owner received, up to and including the marker topic."""
    seen: list[tuple[str, str | None]] = []
    while True:
        msg = collector.get(10)
        ident = json.loads(msg.payload).get("id") if msg.payload else None
        seen.append((msg.topic, ident))
        if msg.topic == marker:
            return seen

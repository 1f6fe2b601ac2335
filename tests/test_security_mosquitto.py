"""`fishim mosquitto-acl` files on a real Mosquitto 2: the same access table as the embedded broker.

Mosquitto grants every SUBACK and filters each delivery by its ACL, so the table's subscribe column
is not checked here; every publish and delivery row is. What Mosquitto cannot do is follow order
membership live: the last test shows the snapshot going stale and a regeneration + SIGHUP fixing it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _security_shop import SERVICE, Recorder, body, make_shop, run_table
from click.testing import CliRunner

from fishim.cli import main
from fishim.mosquitto_acl import mosquitto_hash
from fishim.store import Store
from fishim.testing.mosquitto import Mosquitto, find_mosquitto
from fishim.testing.mqtt import MqttClient, MqttError, connect_client, publish_and_wait

pytestmark = [pytest.mark.mosquitto,
              pytest.mark.skipif(find_mosquitto() is None, reason="Debian mosquitto not installed")]


def generate(db: Path, out: Path, passwords: dict[str, str]) -> tuple[int, str, str]:
    lines = "".join(f"{name}:{pw}\n" for name, pw in passwords.items())
    result = CliRunner().invoke(main, ["mosquitto-acl", "--out", str(out), "--passwords-stdin"],
                                input=lines, env={"FISHIM_DB": str(db)}, catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str], Path]:
    root = tmp_path_factory.mktemp("mosq")
    db = root / "shop.db"
    passwords = make_shop(db)
    given = {n: p for n, p in passwords.items() if n not in ("r2", SERVICE)}  # service: from its file
    code, out, err = generate(db, root / "etc", given)
    assert code == 0, err
    assert out.startswith("wrote ") and "not in passwd" in err and "r2" in err and "fishim-bridge" not in err
    return db, passwords, root / "etc"


@pytest.fixture(scope="module")
def mosquitto(shop: tuple[Path, dict[str, str], Path]) -> Iterator[Mosquitto]:
    etc = shop[2]
    with Mosquitto(allow_anonymous=False, password_file=etc / "passwd", acl_file=etc / "acl") as broker:
        yield broker


def test_generated_files(shop: tuple[Path, dict[str, str], Path]) -> None:
    _, passwords, etc = shop
    acl = (etc / "acl").read_text()
    assert "pattern read fishim/errors/%u" in acl and "pattern write fishim/sync/%u/+/request" in acl
    assert "# rider\nuser r1\ntopic read fishim/orders/A1/#\ntopic write fishim/orders/A1/chat/r1\n" in acl
    assert "fishim/orders/A2" not in acl.split("user r1\n")[1].split("\nuser ")[0]
    assert acl.index("pattern") < acl.index("user ")  # nothing for anonymous clients
    assert (etc / "passwd").stat().st_mode & 0o777 == 0o600
    text = (etc / "passwd").read_text()
    assert sorted(line.split(":")[0] for line in text.splitlines()) == sorted(set(passwords) - {"r2"})
    assert all(line.split(":", 1)[1].startswith("$7$100000$") for line in text.splitlines())
    assert not any(pw in text for pw in passwords.values())


def test_mosquitto_hash_format() -> None:
    salt = bytes(range(12))
    assert mosquitto_hash("pw", 101, salt) == mosquitto_hash("pw", 101, salt)
    _, seven, iterations, salt64, digest64 = mosquitto_hash("pw", 101, salt).split("$")
    assert (seven, iterations, salt64, len(digest64)) == ("7", "101", "AAECAwQFBgcICQoL", 88)


def test_wrong_or_unknown_password_is_not_written(shop: tuple[Path, dict[str, str], Path], tmp_path: Path) -> None:
    code, _, err = generate(shop[0], tmp_path / "etc", {"c1": "guess-Hunter2"})
    assert code == 2 and "c1" in err and "guess-Hunter2" not in err
    assert not (tmp_path / "etc" / "passwd").exists()


def test_logins(mosquitto: Mosquitto, shop: tuple[Path, dict[str, str], Path]) -> None:
    passwords = shop[1]
    with connect_client(mosquitto.port, username="c1", password=passwords["c1"]):
        pass
    for username, password in (("c1", passwords["c2"]), ("c1", None), (None, None), ("r2", passwords["r2"]),
                               ("nobody", "x")):
        with pytest.raises(MqttError, match="refused"):
            connect_client(mosquitto.port, username=username, password=password)


def test_access_table_on_mosquitto(mosquitto: Mosquitto, shop: tuple[Path, dict[str, str], Path]) -> None:
    """Publish and (retained and live) delivery rows of the embedded broker's table, 0 leaks."""
    result = run_table(mosquitto.port, shop[1], suback_enforced=False)
    assert result.wrong == []
    assert result.rows == 726  # 816 rows less the 90 SUBACK rows


def test_membership_snapshot_needs_regeneration(mosquitto: Mosquitto, shop: tuple[Path, dict[str, str], Path]) -> None:
    """What only the embedded broker does: on Mosquitto a reassigned rider keeps reading its old order
    (A3 -> r2) until the files are regenerated and Mosquitto reloads them on SIGHUP."""
    db, passwords, etc = shop
    clients: list[MqttClient] = []

    def connect(user: str) -> MqttClient:
        clients.append(connect_client(mosquitto.port, f"{user}-snap", username=user, password=passwords[user]))
        return clients[-1]

    def r1_reads_a3(tag: str) -> bool:
        publish_and_wait(service, "fishim/orders/A3/chat/c1", body(tag))
        publish_and_wait(service, "fishim/errors/r1", body("end:r1"))
        return tag in rec.wait("end:r1")

    try:
        service, r1 = connect(SERVICE), connect("r1")
        rec = Recorder(r1, sentinel="end:r1")
        r1.subscribe_and_wait(["fishim/orders/A3/#", "fishim/errors/r1"])
        with Store(db) as store, store.transaction():  # what the bridge commits on `assigned`
            order = store.get_order("A3")
            assert order is not None
            store.put_order(order.model_copy(update={"rider": "r2"}))
        assert r1_reads_a3("stale")  # the Mosquitto gap: the ACL file still says r1
        given = {n: p for n, p in passwords.items() if n not in ("r2", SERVICE)}
        assert generate(db, etc, given)[0] == 0
        os.kill(mosquitto.pid or 0, signal.SIGHUP)
        deadline = time.monotonic() + 10
        n = 0
        while r1_reads_a3(f"probe{n}"):  # each round is a publish + sentinel, not a sleep
            n += 1
            assert time.monotonic() < deadline, "mosquitto did not apply the regenerated ACL"
    finally:
        for client in clients:
            client.close()

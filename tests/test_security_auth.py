"""Who gets in: anonymous only on loopback before any user exists, passwords checked, guessing slowed
down per address and per username, and no clear password anywhere in the store or the logs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from _security_shop import SERVICE, make_shop, password

from fishim.auth import StoreAuthenticator, service_credentials
from fishim.config import Config, Limits, ListenerConfig
from fishim.store import Store
from fishim.testing.mqtt import MqttError, connect_client

LOOPBACK = ListenerConfig(name="local", bind="127.0.0.1:0")
EXPOSED = ListenerConfig(name="lan", bind="0.0.0.0:0")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    db = tmp_path_factory.mktemp("auth") / "shop.db"
    return db, make_shop(db)


@pytest.fixture
def bare_store(tmp_path: Path) -> tuple[Path, str]:
    """A store with only the bridge's service account: no human user yet."""
    db = tmp_path / "bare.db"
    with Store(db) as store:
        return db, service_credentials(store, SERVICE)[1]


def authenticator(db: Path, limit: int = 10, clock: Clock | None = None) -> StoreAuthenticator:
    config = Config(listeners=[LOOPBACK, EXPOSED], limits=Limits(login_failures_per_minute=limit))
    return StoreAuthenticator(db, config, clock or Clock())


# -- anonymous ---------------------------------------------------------------------------------

def test_no_users_yet_anonymous_on_loopback_only(bare_store: tuple[Path, str], tmp_path: Path) -> None:
    db, secret = bare_store
    auth = authenticator(db)
    try:
        anonymous = auth.check(None, None, "127.0.0.1:5000", LOOPBACK)
        assert anonymous is not None and anonymous.anonymous
        assert auth.check(None, None, "127.0.0.1:5000", EXPOSED) is None  # never off loopback
        assert auth.check(None, None, "127.0.0.1:5000", "lan") is None  # by listener name too
        named = auth.check("rider7", "anything", "127.0.0.1:5000", LOOPBACK)
        assert named is not None and named.anonymous and named.username == "rider7"
        service = auth.check(SERVICE, secret, "127.0.0.1:5000", EXPOSED)  # the service account logs in
        assert service is not None and service.role == "service"
        assert auth.check(SERVICE, "wrong", "127.0.0.1:5000", LOOPBACK) is None  # ...and only with its secret
    finally:
        auth.close()
    missing = authenticator(tmp_path / "not-yet.db")  # the bridge has not created the store yet
    assert missing.check(None, None, "127.0.0.1:5000", LOOPBACK) is not None
    assert missing.check(None, None, "127.0.0.1:5000", EXPOSED) is None


def test_once_a_user_exists_everyone_authenticates(shop: tuple[Path, dict[str, str]]) -> None:
    db, passwords = shop
    auth = authenticator(db)
    try:
        assert auth.check(None, None, "127.0.0.1:5000", LOOPBACK) is None
        assert auth.check("stranger", "x", "127.0.0.1:5000", LOOPBACK) is None
        assert auth.check("c1", passwords["c2"], "127.0.0.1:5000", LOOPBACK) is None
        assert auth.check("c1", None, "127.0.0.1:5000", LOOPBACK) is None
        c1 = auth.check("c1", passwords["c1"], "127.0.0.1:5000", LOOPBACK)
        assert c1 is not None and (c1.username, c1.role) == ("c1", "customer")
        service = auth.check(SERVICE, passwords[SERVICE], "[::1]:5000", LOOPBACK)
        assert service is not None and service.role == "service"
    finally:
        auth.close()


# -- rate limiting -----------------------------------------------------------------------------

def test_failures_slow_the_address_and_user_pair_not_the_account(
        shop: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    """Guesses at c1 from one address lock that (address, c1) pair only: c1 still logs in from
    elsewhere, and others from that address are not affected. (Issue 17.8: a global per-user lock let
    anyone lock anyone's account for a minute with 10 bad guesses.)"""
    db, passwords = shop
    clock = Clock()
    auth = authenticator(db, limit=3, clock=clock)
    caplog.set_level(logging.INFO, logger="fishim.auth")
    try:
        for guess in ("guess-1", "guess-2", "guess-3"):
            assert auth.check("c1", guess, "10.0.0.5:4000", EXPOSED) is None
        assert auth.check("c1", passwords["c1"], "10.0.0.5:4001", EXPOSED) is None  # right, but that pair is slowed
        assert auth.check("c1", passwords["c1"], "10.0.0.9:4000", EXPOSED) is not None  # the account is not locked
        assert auth.check("r1", passwords["r1"], "10.0.0.5:4002", EXPOSED) is not None  # nor the address
        clock.now += 59.0
        assert auth.check("c1", passwords["c1"], "10.0.0.5:4003", EXPOSED) is None
        clock.now += 1.5
        assert auth.check("c1", passwords["c1"], "10.0.0.5:4003", EXPOSED) is not None
    finally:
        auth.close()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("reason=bad_password" in line for line in lines) == 3
    assert "locked=pair:10.0.0.5|c1 for=60s" in lines[2]
    assert sum("reason=rate_limited" in line for line in lines) == 2
    assert not any(pw in line for line in lines for pw in (*passwords.values(), "guess-1", "guess-2"))


def test_spraying_many_names_from_one_address_locks_that_address(shop: tuple[Path, dict[str, str]]) -> None:
    db, passwords = shop
    config = Config(listeners=[LOOPBACK, EXPOSED],
                    limits=Limits(login_failures_per_minute=3, login_failures_per_address=4))
    auth = StoreAuthenticator(db, config, Clock())
    try:
        for name in ("c1", "c2", "r1", "r2"):
            assert auth.check(name, "guess", "10.0.0.7:1", EXPOSED) is None
        assert auth.check("boss", passwords["boss"], "10.0.0.7:2", EXPOSED) is None  # the address is locked
        assert auth.check("boss", passwords["boss"], "10.0.0.8:2", EXPOSED) is not None
    finally:
        auth.close()


def test_guesses_at_the_service_account_are_counted_but_never_lock_it_out(
        shop: tuple[Path, dict[str, str]], caplog: pytest.LogCaptureFixture) -> None:
    """Wrong secrets for the bridge's account are counted and logged, from loopback too, and cost no
    argon2; its real secret (256 random bits) always gets in, so strangers can't cut the bridge off."""
    db, passwords = shop
    auth = authenticator(db, limit=2)
    caplog.set_level(logging.INFO, logger="fishim.auth")
    try:
        for peer, listener in (("10.0.0.66:1", EXPOSED), ("127.0.0.1:1", LOOPBACK)):
            for _ in range(4):
                assert auth.check(SERVICE, "guess", peer, listener) is None
            assert auth.check(SERVICE, passwords[SERVICE], peer, listener) is not None
        for peer in ("[::1]:3", "[::ffff:127.0.0.1]:3"):
            assert auth.check(SERVICE, passwords[SERVICE], peer, LOOPBACK) is not None
    finally:
        auth.close()
    lines = [r.getMessage() for r in caplog.records]
    for host in ("10.0.0.66", "127.0.0.1"):
        assert sum(f"user={SERVICE} peer={host} reason=bad_password" in line for line in lines) == 2
        assert sum(f"user={SERVICE} peer={host} reason=rate_limited" in line for line in lines) == 2


def test_parallel_guesses_count_before_they_are_checked(shop: tuple[Path, dict[str, str]],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Ten simultaneous guesses with a limit of 3: at most 3 reach argon2, the rest are refused."""
    db, _ = shop
    auth = authenticator(db, limit=3)
    caplog.set_level(logging.INFO, logger="fishim.auth")
    start = threading.Barrier(10)

    def guess(n: int) -> None:
        start.wait()
        auth.check("r1", f"guess-{n}", "10.0.0.7:1", EXPOSED)

    threads = [threading.Thread(target=guess, args=(n,)) for n in range(10)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        auth.close()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("reason=bad_password" in line for line in lines) == 3
    assert sum("reason=rate_limited" in line for line in lines) == 7


# -- on the embedded broker --------------------------------------------------------------------

def test_wrong_password_and_anonymous_refused_by_the_broker(
        shop: tuple[Path, dict[str, str]], secure_broker_factory: Callable[..., object]) -> None:
    db, passwords = shop
    broker = secure_broker_factory(db)
    port: int = broker.port  # type: ignore[attr-defined]
    for username, pw in (("c1", "wrong"), ("c1", None), (None, None), ("nobody", "x")):
        with pytest.raises(MqttError, match="Not authorized"):
            connect_client(port, username=username, password=pw)
    with connect_client(port, username="c1", password=passwords["c1"]) as client:
        assert client.is_connected()


def test_rate_limit_on_the_broker(shop: tuple[Path, dict[str, str]], secure_broker_factory: Callable[..., object],
                                  caplog: pytest.LogCaptureFixture) -> None:
    db, passwords = shop
    broker = secure_broker_factory(db, limits={"login_failures_per_minute": 3})  # its own limiter
    port: int = broker.port  # type: ignore[attr-defined]
    caplog.set_level(logging.INFO)
    for n in range(3):
        with pytest.raises(MqttError, match="Not authorized"):
            connect_client(port, username="r1", password=f"guess-{n}")
    with pytest.raises(MqttError, match="Not authorized"):
        connect_client(port, username="r1", password=passwords["r1"])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "user=r1 peer=127.0.0.1 reason=rate_limited" in text
    assert "guess-0" not in text and passwords["r1"] not in text


def test_anonymous_never_on_an_exposed_listener(bare_store: tuple[Path, str],
                                                secure_broker_factory: Callable[..., object]) -> None:
    """No users yet: anonymous is accepted on 127.0.0.1, refused on a 0.0.0.0 listener even from loopback."""
    db, secret = bare_store
    broker = secure_broker_factory(db, listeners=[LOOPBACK, EXPOSED])
    local, lan = broker.broker.port("local"), broker.broker.port("lan")  # type: ignore[attr-defined]
    with connect_client(local) as client:
        assert client.is_connected()
    with pytest.raises(MqttError, match="Not authorized"):
        connect_client(lan)
    with connect_client(lan, username=SERVICE, password=secret) as client:
        assert client.is_connected()


# -- at rest -------------------------------------------------------------------------------------

def test_store_holds_no_clear_password(shop: tuple[Path, dict[str, str]]) -> None:
    db, passwords = shop
    files = [p for p in db.parent.iterdir() if p.name.startswith(db.name)]
    blobs = {p.name: p.read_bytes() for p in files if not p.name.endswith(".secret")}
    assert db.name in blobs and len(passwords) == 8 and password("c1") == passwords["c1"]
    for name, blob in blobs.items():
        for user, pw in passwords.items():
            for encoded in (pw.encode("utf-8"), pw.encode("utf-16-le")):
                assert encoded not in blob, f"{user}'s password in clear in {name}"
    assert sum(blob.count(b"$argon2id$") for blob in blobs.values()) >= len(passwords)  # hashes instead
    secret_file = db.with_name(db.name + ".secret")  # the service secret lives beside it, owner-only
    assert secret_file.stat().st_mode & 0o777 == 0o600

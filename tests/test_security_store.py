"""The store at rest: owner-only files, bounded dead letters (issue 17, findings 6 and 8).

The first test runs the whole of ``fishim up`` (a child process, as the shop runs it) and feeds it
a 60 KB invalid message through a real MQTT client; the second checks the table bound directly.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from fishim.auth import service_credentials, service_secret_file
from fishim.store import DEADLETTER_PAYLOAD_BYTES, DeadLetter, Store
from fishim.testing.mqtt import Collector, connect_client, publish_and_wait
from fishim.testing.stack import Stack


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_store_files_are_owner_only_and_dead_letters_keep_a_bounded_prefix(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    junk = b"{" + b"x" * 60_000  # not JSON: refused and dead-lettered
    with Stack(db) as stack, connect_client(stack.port, "zhang-phone") as client, \
            Collector(client, "fishim/errors/#") as errors:
        publish_and_wait(client, "fishim/orders/o-1/chat/zhang", junk)
        errors.get(timeout=30)  # the bridge reports after the dead letter is committed
        for suffix in ("", "-wal", "-shm"):
            path = db.with_name(db.name + suffix)
            assert mode(path) == 0o600, f"{path.name} is {oct(mode(path))}"
    with Store(db, readonly=True) as store:
        [letter] = store.deadletters()
    assert letter.payload == junk[:DEADLETTER_PAYLOAD_BYTES]
    assert f"payload cut to its first {DEADLETTER_PAYLOAD_BYTES} of {len(junk)} bytes" in letter.detail


def test_dead_letter_table_keeps_only_the_newest(tmp_path: Path) -> None:
    with Store(tmp_path / "shop.db") as store:
        store.max_deadletters = 5
        for n in range(8):
            store.add_deadletter(DeadLetter(received_at=n, topic="t", error="bad_json", detail=f"#{n}",
                                            payload=b"x"))
        assert [d.detail for d in store.deadletters()] == [f"#{n}" for n in range(3, 8)]


def test_an_old_world_readable_store_and_secret_are_made_owner_only(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    previous = os.umask(0)  # even with a permissive umask
    try:
        with Store(db) as store:
            service_credentials(store, "fishim-bridge")
        secret = service_secret_file(db)
        assert mode(db) == mode(secret) == 0o600
        db.chmod(0o644)
        secret.chmod(0o644)
        with Store(db) as store:
            service_credentials(store, "fishim-bridge")
    finally:
        os.umask(previous)
    assert mode(db) == mode(secret) == 0o600

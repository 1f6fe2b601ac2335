"""`fishim devices` and `fishim replay --client-id`: the server learns each device's cursor from its
sync requests, and the owner's replay starts where that device stands."""

from __future__ import annotations

import json
import time
from pathlib import Path

from click.testing import CliRunner

from fishim.cli import main
from fishim.config import load_config
from fishim.store import Store
from fishim.sync import SyncServer
from fishim.testing.history import HistoryWriter, lifecycle
from fishim.topics import Channel, TopicRef


def cli(db: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args), env={"FISHIM_DB": str(db), "FISHIM_BIND": "127.0.0.1:1883"},
                                catch_exceptions=False)
    return result.exit_code, result.stdout


def test_devices_and_replay_from_the_devices_cursor(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    now = int(time.time() * 1000)
    with Store(db) as store:
        lifecycle(HistoryWriter(store), "A1", now - 60_000, customer="cust1", rider="rider7")
        top = store.max_seq()
    config = load_config(env={"FISHIM_DB": str(db)})
    server = SyncServer(db, config)
    try:  # the phone syncs twice: the second request's since is what its app has taken
        for since in (0, top - 2):
            replies = server.handle(TopicRef(channel=Channel.SYNC_REQUEST, user="rider7", client_id="phone-1"),
                                    json.dumps({"since": since}).encode())
            assert replies and '"done":true' in replies[-1][1].decode()
    finally:
        server.close()

    code, out = cli(db, "devices", "rider7", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data["max_seq"] == top
    [device] = data["devices"]
    assert (device["client_id"], device["cursor"], device["served"], device["syncs"], device["behind"]) == \
        ("phone-1", top - 2, top, 2, 2)
    assert device["last_seen"] >= now
    code, out = cli(db, "devices", "rider7")
    assert "phone-1" in out and f"seq {top - 2}" in out

    code, out = cli(db, "replay", "rider7", "--client-id", "phone-1", "--json")
    replay = json.loads(out)
    assert (replay["since"], replay["since_from"]) == (top - 2, "device")
    assert [e["seq"] for e in replay["events"]] == [top - 1, top]
    code, out = cli(db, "replay", "rider7", "--client-id", "phone-1")
    assert f"syncing from seq {top - 2} (the last cursor phone-1 acknowledged)" in out
    assert f"seq {top}" in out and "order #" in out
    code, out = cli(db, "devices", "rider7", "--json")
    assert json.loads(out)["devices"][0]["syncs"] == 2  # the owner's replay is a look, not a device sync

    code, out = cli(db, "replay", "rider7", "--client-id", "phone-2", "--json")
    assert json.loads(out)["since_from"] == "default" and json.loads(out)["since"] == 0
    code, out = cli(db, "devices", "nobody")
    assert out.strip() == "no device of nobody has synced yet"

"""The owner's CLI: read commands on a store, one-line errors, help examples, `fishim up` end to end.

Most tests read a store written by :class:`fishim.testing.history.HistoryWriter` (the real order
rules, no broker) so they are fast; ``test_real_bridge_*`` run ``fishim up`` (embedded broker + bridge
child) as a subprocess, publish an order's whole life with paho clients and read it back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from fishim.cli import main
from fishim.store import Store
from fishim.testing.history import HistoryWriter, lifecycle
from fishim.testing.proc import Proc

HOUR = 3_600_000


def run(db: Path, *args: str, config: Path | None = None) -> Any:
    """Invoke the CLI in-process on ``db``; returns click's Result."""
    env = {"FISHIM_DB": str(db), "FISHIM_BIND": "127.0.0.1:1883"}
    if config is not None:
        env["FISHIM_CONFIG"] = str(config)
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def run_json(db: Path, *args: str) -> Any:
    result = run(db, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def subprocess_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
                   timeout: float = 30) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("FISHIM_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "fishim", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six orders in different states over the last 3 hours, plus two refused messages."""
    db = tmp_path_factory.mktemp("shop") / "shop.db"
    now = int(time.time() * 1000)
    with Store(db) as store:
        w = HistoryWriter(store)
        lifecycle(w, "A100", now - 3 * HOUR, customer="cust1", rider="rider7")  # delivered
        lifecycle(w, "A101", now - 2 * HOUR, customer="13812345678", rider="rider8", until="delivering")
        lifecycle(w, "A102", now - 90 * 60_000, customer="cust2", rider="rider7", until="assigned")
        lifecycle(w, "A103", now - 30 * 60_000, customer="cust1", until="picking")
        lifecycle(w, "A104", now - 5 * 60_000, customer="cust2", until="placed")
        w.publish("fishim/orders/A101/status", {"id": "bad1", "ts": 1, "sender": "shop", "state": "placed"},
                  now - 3 * HOUR)
        w.publish("fishim/orders/A103/chat/cust2", {"id": "bad2", "ts": 1, "sender": "cust2", "text": "hi"},
                  now - 1000)
    return db


# -- orders list ---------------------------------------------------------------------------------

def test_orders_list_table_masks_phone_customers(shop: Path) -> None:
    result = run(shop, "orders", "list")
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split() == ["ID", "STATE", "CUSTOMER", "RIDER", "AGE", "UNREAD", "C/R", "LAST"]
    assert [line.split()[0] for line in lines[1:]] == ["A104", "A103", "A102", "A101", "A100"]
    assert "13812345678" not in result.output and "*********78" in result.output
    row = next(line for line in lines if line.startswith("A101"))
    assert row.split()[1:4] == ["delivering", "*********78", "rider8"]


def test_orders_list_json_shape(shop: Path) -> None:
    data = run_json(shop, "orders", "list")
    assert set(data) == {"now", "count", "truncated", "orders"}
    assert data["count"] == 5 and not data["truncated"]
    a101 = next(o for o in data["orders"] if o["id"] == "A101")
    assert set(a101) == {"id", "state", "customer", "rider", "created_at", "updated_at", "age_s", "open",
                         "order_seq", "unread", "last_event"}
    assert a101["customer"] == "13812345678"  # JSON is for the owner's scripts: unmasked
    assert a101["open"] and 2 * 3600 - 5 <= a101["age_s"] <= 2 * 3600 + 60
    # the customer read up to the 'assigned' status (#8); since then: picked_up, delivering, rider's chat
    assert a101["unread"] == {"customer": 3, "rider": 6}
    assert a101["last_event"]["channel"] == "chat" and a101["last_event"]["sender"] == "rider8"
    assert set(a101["last_event"]) == {"seq", "order_id", "order_seq", "channel", "topic", "sender", "ts",
                                       "received_at", "payload"}
    a104 = next(o for o in data["orders"] if o["id"] == "A104")
    assert a104["unread"] == {"customer": 1, "rider": None}


def test_orders_list_filters(shop: Path) -> None:
    ids = lambda *args: [o["id"] for o in run_json(shop, "orders", "list", *args)["orders"]]  # noqa: E731
    assert ids("--state", "delivering") == ["A101"]
    assert ids("--rider", "rider7") == ["A102", "A100"]
    assert ids("--since", "45m") == ["A104", "A103"]
    assert ids("--late") == ["A101", "A102"]  # open and placed over 60 minutes ago, oldest first
    assert ids("--late", "--late-after", "20m") == ["A101", "A102", "A103"]
    assert ids("--limit", "2") == ["A104", "A103"]
    assert run_json(shop, "orders", "list", "--limit", "2")["truncated"] is True
    assert run(shop, "orders", "list", "--state", "delivering", "--rider", "rider7").output == "no orders match\n"


def test_orders_list_bad_duration_is_one_line(shop: Path) -> None:
    result = run(shop, "orders", "list", "--since", "yesterday-ish")
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("fishim: --since: not a duration")


# -- orders show ---------------------------------------------------------------------------------

def test_orders_show_timeline(shop: Path) -> None:
    result = run(shop, "orders", "show", "A101")
    assert result.exit_code == 0, result.output
    out = result.output
    for needle in ("Order A101  delivering", "customer 13812345678", "ROD-21  1/1 picked",
                   "placed items ROD-21x1", "assigned rider rider8 by shop",
                   '13812345678: "Can you add a spare leader? @shop" mentions @shop',
                   "[image image/jpeg 47 KB sha256:abababababab]", "LURE-7 x1 by scan1 bin A3 (",
                   "5 fixes by rider8: first", "13812345678 read up to order #8 of 17"):
        assert needle in out, needle
    sections = [line for line in out.splitlines() if line in ("Items", "Timeline", "Location", "Read")]
    assert sections == ["Items", "Timeline", "Location", "Read"]


def test_orders_show_json_shape(shop: Path) -> None:
    data = run_json(shop, "orders", "show", "A101")
    assert set(data) == {"order", "items", "timeline", "location", "receipts"}
    assert data["order"]["id"] == "A101" and data["order"]["state"] == "delivering"
    seqs = [e["seq"] for e in data["timeline"]]
    assert seqs == sorted(seqs) and len(seqs) == data["order"]["order_seq"] == 17
    assert [e["order_seq"] for e in data["timeline"]] == list(range(1, 18))
    states = [e["payload"]["state"] for e in data["timeline"] if e["channel"] == "status"]
    assert states == ["placed", "confirmed", "picking", "packed", "assigned", "picked_up", "delivering"]
    assert data["items"] == [{"sku": "ROD-21", "name": "Carbon rod 2.1 m", "wanted": 1, "picked": 1},
                             {"sku": "LURE-7", "name": "Minnow lure 7 cm", "wanted": 1, "picked": 1}]
    assert data["location"]["count"] == 5 and data["location"]["last"]["sender"] == "rider8"
    assert data["receipts"] == [{"member": "13812345678", "read_up_to": 8,
                                 "updated_at": data["receipts"][0]["updated_at"], "unread": 3}]


def test_orders_show_unknown_order_is_one_line(shop: Path) -> None:
    result = run(shop, "orders", "show", "NOPE")
    assert result.exit_code == 2
    assert result.output == f"fishim: no order 'NOPE' in {shop} (see `fishim orders list`)\n"


# -- deadletters, stats, replay -----------------------------------------------------------------

def test_deadletters(shop: Path) -> None:
    data = run_json(shop, "deadletters")
    assert data["count"] == 2 and not data["truncated"]
    first = data["deadletters"][0]
    assert set(first) == {"id", "received_at", "topic", "user", "msg_id", "error", "detail", "payload",
                          "payload_size"}
    assert (first["error"], first["user"], first["msg_id"]) == ("illegal_transition", "shop", "bad1")
    assert json.loads(first["payload"])["state"] == "placed"
    recent = run_json(shop, "deadletters", "--since", "1h")["deadletters"]
    assert [d["msg_id"] for d in recent] == ["bad2"]
    newest = run_json(shop, "deadletters", "--limit", "1")
    assert newest["truncated"] and [d["msg_id"] for d in newest["deadletters"]] == ["bad2"]
    lines = run(shop, "deadletters").output.splitlines()
    assert lines[2].endswith("  forbidden  from cust2  on fishim/orders/A103/chat/cust2  id bad2")
    assert lines[3] == "    cust2 is not a member of order A103"


def test_stats(shop: Path) -> None:
    data = run_json(shop, "stats")
    with Store(shop, readonly=True) as store:
        total = store.count_events()
    assert data["stored_events"] == total == data["max_seq"]
    assert data["orders"] == {"total": 5, "by_state": {"assigned": 1, "delivered": 1, "delivering": 1,
                                                       "picking": 1, "placed": 1}}
    assert data["deadletters"] == 2 and data["clients_connected"] is None and data["broker"] is None
    assert data["events_last_minute"] == 0 and data["db_bytes"] > 0
    assert "connected clients        -" in run(shop, "stats").output


def test_stats_reads_the_local_service_status(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    Store(db).close()
    now = int(time.time() * 1000)
    (tmp_path / "s.db.status.json").write_text(json.dumps(
        {"pid": os.getpid(), "mode": "up", "started_at": now, "updated_at": now, "clients_connected": 3}))
    assert run_json(db, "stats")["clients_connected"] == 3
    (tmp_path / "s.db.status.json").write_text(json.dumps(
        {"pid": os.getpid(), "mode": "up", "started_at": now, "updated_at": now - 60_000, "clients_connected": 3}))
    assert run_json(db, "stats")["clients_connected"] is None  # stale: the service is gone


def test_replay_is_what_the_user_may_read(shop: Path) -> None:
    data = run_json(shop, "replay", "rider7")
    assert set(data) == {"user", "role", "client_id", "since", "since_from", "pages", "next_since", "more", "collapsed",
                         "events"}
    orders = {e["topic"].split("/")[2] for e in data["events"]}
    assert orders == {"A100", "A102"} and data["role"] == "rider"
    with Store(shop, readonly=True) as store:
        assert data["next_since"] == store.max_seq()
    later = run_json(shop, "replay", "rider7", "--since", str(data["events"][-3]["seq"]))
    assert [e["seq"] for e in later["events"]] == [e["seq"] for e in data["events"][-2:]]
    assert run_json(shop, "replay", "scan1")["events"] == []
    assert "rider7 (rider) syncing from seq 0 would get" in run(shop, "replay", "rider7").output
    bad = run(shop, "replay", "no/slash")
    assert bad.exit_code == 2 and bad.output.startswith("fishim: USER: bad name")


# -- watch ---------------------------------------------------------------------------------------

def test_watch_replays_from_a_seq_and_stops_at_count(shop: Path) -> None:
    result = run(shop, "orders", "watch", "A101", "--since", "0", "--count", "3", "--json")
    assert result.exit_code == 0
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(x["type"], x["order_id"], x["order_seq"]) for x in lines] == [("event", "A101", n) for n in (1, 2, 3)]


def test_watch_follows_new_events_live_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    with Store(db) as store:
        w = HistoryWriter(store)
        lifecycle(w, "B1", int(time.time() * 1000), until="placed")
        proc = subprocess.Popen([sys.executable, "-m", "fishim", "orders", "watch", "--interval", "0.05"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "FISHIM_DB": str(db)})
        try:
            assert "watching" in proc.stderr.readline()  # printed once the cursor is taken
            w.publish("fishim/orders/B1/status", {"id": "B1-c", "ts": 1, "sender": "shop", "state": "confirmed"})
            w.publish("fishim/orders/B1/status", {"id": "B1-x", "ts": 1, "sender": "shop", "state": "packed"})
            assert "B1  order #2  seq 2  status: confirmed by shop" in proc.stdout.readline()
            assert "REFUSED illegal_transition from shop" in proc.stdout.readline()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(10) == 0
            assert "Traceback" not in proc.stderr.read()
        finally:
            proc.kill()
            proc.wait()


def test_watch_timeout_ends_quietly(shop: Path) -> None:
    result = run(shop, "orders", "watch", "--timeout", "0.3", "--interval", "0.05")
    assert result.exit_code == 0 and result.stdout == ""


# -- errors and help ---------------------------------------------------------------------------

def test_bad_config_is_one_line_naming_key_and_file(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("store:\n  path: x.db\nlimits:\n  max_payload: lots\n", encoding="utf-8")
    proc = subprocess_cli("-c", str(config), "orders", "list")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"fishim: {config}: limits.max_payload:")
    # found through FISHIM_CONFIG too, for every command
    proc = subprocess_cli("stats", env={"FISHIM_CONFIG": str(config)})
    assert proc.returncode == 2 and proc.stderr.startswith(f"fishim: {config}: limits.max_payload:")
    config.write_text("limits:\n  max_paylod: 64k\n", encoding="utf-8")  # a typo gets a "did you mean"
    proc = subprocess_cli("-c", str(config), "stats")
    assert proc.returncode == 2
    assert proc.stderr == f"fishim: {config}: limits.max_paylod: unknown key (did you mean 'max_payload'?)\n"


def test_missing_store_is_one_line(tmp_path: Path) -> None:
    for args in (["orders", "list"], ["orders", "show", "A1"], ["orders", "watch", "--count", "1"],
                 ["deadletters"], ["stats"], ["replay", "rider7"]):
        proc = subprocess_cli(*args, env={"FISHIM_DB": str(tmp_path / "nowhere.db")}, cwd=tmp_path)
        assert proc.returncode == 2, args
        assert proc.stderr == f"fishim: no store at {tmp_path / 'nowhere.db'}: start `fishim up` first, or " \
                              "point FISHIM_DB or store.path in broker.yaml at it\n", args
    assert not (tmp_path / "nowhere.db").exists()  # reading never creates a store


def test_not_a_store_is_one_line(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    result = run(junk, "orders", "list")
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert result.output.startswith(f"fishim: cannot read store {junk}: file is not a database")


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name)


@pytest.mark.parametrize("path", list(_commands(main)), ids=lambda p: " ".join(p) or "fishim")
def test_every_help_has_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(main, [*path, "--help"])
    assert result.exit_code == 0
    assert "Example:" in result.output and "fishim " in result.output.split("Example:")[1]


def test_every_read_command_has_json() -> None:
    reads = [("orders", "list"), ("orders", "show"), ("orders", "watch"), ("deadletters",), ("stats",),
             ("replay",), ("devices",), ("users", "list")]
    for path in reads:
        assert "--json" in CliRunner().invoke(main, [*path, "--help"]).output, path


# -- `fishim up` end to end: embedded broker with its durable ingest, real paho clients -------------

class Up:
    """``python -m fishim up`` on a free loopback port with its own store; its log lines kept."""

    def __init__(self, workdir: Path) -> None:
        from fishim.testing import free_port

        self.workdir = workdir
        self.db = workdir / "shop.db"
        self.port = free_port()
        self.proc: Proc | None = None

    def start(self) -> Up:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FISHIM_")}
        self.proc = Proc([sys.executable, "-m", "fishim", "up", "--bind", f"127.0.0.1:{self.port}", "--db",
                          str(self.db)], env=env, cwd=self.workdir)
        self.proc.wait_log("broker_started", timeout=30)  # listeners accept once the store and ingest are ready
        return self

    def text(self) -> str:
        return self.proc.text() if self.proc is not None else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        assert self.proc is not None
        return self.proc.terminate(timeout, sig)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()


def wait_store(db: Path, check: Any, timeout: float = 15) -> Any:
    """Poll the store (read-only, like the CLI) until ``check(store)`` returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        if db.exists():
            with Store(db, readonly=True) as store:
                value = check(store)
            if value:
                return value
        assert time.monotonic() < deadline, "store never reached the expected state"
        time.sleep(0.05)


def test_up_stores_a_placed_order_and_stops_on_sigterm(tmp_path: Path) -> None:
    from fishim.testing.mqtt import connect_client, publish_and_wait

    up = Up(tmp_path).start()
    try:
        with connect_client(up.port) as shop:  # no users yet: anonymous on loopback
            publish_and_wait(shop, "fishim/orders/U1/status", {
                "id": "u1-placed", "ts": int(time.time() * 1000), "sender": "shop", "state": "placed",
                "customer": "cust1", "items": [{"sku": "ROD-21", "qty": 1}]}, retain=True)
        with Store(up.db, readonly=True) as store:  # PUBACKed, so already committed: no waiting
            order = store.get_order("U1")
        assert order is not None and (order.state, order.customer) == ("placed", "cust1")
        wait_store(up.db, lambda s: (tmp_path / "shop.db.status.json").exists())
        assert run_json(up.db, "stats")["clients_connected"] is not None
        code = up.stop(signal.SIGTERM)
        assert code == 0, up.text()
        log = up.text()
        assert "Traceback" not in log
        for line in ("received SIGTERM", "ingest_stopped", "broker_stopped", "stopped"):
            assert line in log
        assert log.index("ingest_stopped") < log.index("broker_stopped")  # what it holds is committed first
        assert not (tmp_path / "shop.db.status.json").exists()
        assert run_json(up.db, "stats")["clients_connected"] is None
    finally:
        up.kill()


def test_up_on_a_busy_port_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess_cli("up", "--bind", f"127.0.0.1:{port}", "--db", str(tmp_path / "x.db"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


PEOPLE = {"shop": "staff", "scan1": "scanner", "rider7": "rider", "cust1": "customer"}


@pytest.fixture(scope="module")
def lived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An order's whole life through `fishim up` with real accounts and paho clients; yields the store.

    Also one ACL refusal (a customer setting a status) and one rule refusal (an illegal transition), so
    the CLI has dead letters of both origins to show.
    """
    from fishim.auth import add_user
    from fishim.testing.mqtt import Collector, connect_client, publish_and_wait

    workdir = tmp_path_factory.mktemp("lived")
    up = Up(workdir)
    with Store(up.db) as store:
        for name, role in PEOPLE.items():
            add_user(store, name, role, f"pw-{name}")
    up.start()
    n = 0

    def say(client: Any, topic: str, retain: bool = False, **body: Any) -> None:
        nonlocal n
        n += 1
        sender = client._username.decode()
        publish_and_wait(client, f"fishim/orders/L1/{topic}",
                         {"id": f"L1-{n}", "ts": int(time.time() * 1000), "sender": sender, **body}, retain=retain)

    def order_seq() -> int:
        return wait_store(up.db, lambda s: s.get_order("L1")).order_seq

    def member_inbox(client: Any) -> Collector:
        """Subscribe to the order: membership is in the ACL from the commit that made it, which is
        before the PUBACK of the `placed`/`assigned` status, so no retry is needed."""
        return Collector(client, "fishim/orders/L1/#")

    try:
        clients = {name: connect_client(up.port, f"{name}-phone", username=name, password=f"pw-{name}")
                   for name in PEOPLE}
        shop, scan, rider, cust = (clients[k] for k in ("shop", "scan1", "rider7", "cust1"))
        say(shop, "status", retain=True, state="placed", customer="cust1", note="paid online",
            items=[{"sku": "ROD-21", "qty": 1, "name": "Carbon rod 2.1 m"}, {"sku": "LURE-7", "qty": 2}])
        say(shop, "status", retain=True, state="confirmed")
        member_inbox(cust).close()
        say(cust, "chat/cust1", text="Can you add a spare leader? @shop", mentions=["shop"])
        say(scan, "picks", sku="ROD-21", qty=1, scanner="scan1", bin="A3")
        say(scan, "picks", sku="LURE-7", qty=2, scanner="scan1", bin="B1")
        wait_store(up.db, lambda s: s.get_order("L1").state == "packed")
        say(shop, "status", retain=True, state="assigned", rider="rider7")
        inbox = member_inbox(rider)
        assert inbox.get(5).json()["state"] == "assigned"  # the retained status, now readable by rider7
        say(shop, "chat/shop", text="Parcel is on the shelf by the door")
        assert inbox.wait_for(1, 5)[0].json()["text"] == "Parcel is on the shelf by the door"
        say(rider, "status", retain=True, state="picked_up")
        say(rider, "status", retain=True, state="delivering", eta="15 min")
        for i in range(3):
            say(rider, "location", retain=True, lat=31.23 + i / 1000, lon=121.47, accuracy_m=8)
        say(rider, "chat/rider7", text="At the gate", media=[{"kind": "image", "sha256": "ab" * 32,
                                                               "mime": "image/jpeg", "size": 48213}])
        wait_store(up.db, lambda s: s.get_order("L1").last_location and s.get_order("L1").order_seq >= 15)
        say(cust, "receipts/cust1", retain=True, read_up_to=order_seq())
        say(rider, "status", retain=True, state="delivered")
        say(cust, "status", state="cancelled")  # a customer may not set states: refused by the broker's ACL
        say(shop, "status", state="placed")  # delivered -> placed: refused by the order rules
        wait_store(up.db, lambda s: s.count_deadletters() >= 2 and s.get_order("L1").state == "delivered")
        inbox.close()
        for client in clients.values():
            client.close()
        yield up.db
        code = up.stop()
        assert code == 0, up.text()
    finally:
        up.kill()


def test_real_bridge_orders_show(lived: Path) -> None:
    proc = subprocess_cli("orders", "show", "L1", "--json", env={"FISHIM_DB": str(lived)})
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    states = [e["payload"]["state"] for e in data["timeline"] if e["channel"] == "status"]
    assert states == ["placed", "confirmed", "picking", "packed", "assigned", "picked_up", "delivering",
                      "delivered"]
    assert [e["order_seq"] for e in data["timeline"]] == list(range(1, len(data["timeline"]) + 1))
    assert data["items"] == [{"sku": "ROD-21", "name": "Carbon rod 2.1 m", "wanted": 1, "picked": 1},
                             {"sku": "LURE-7", "name": None, "wanted": 2, "picked": 2}]
    chats = [(e["sender"], e["payload"]["text"]) for e in data["timeline"] if e["channel"] == "chat"]
    assert chats == [("cust1", "Can you add a spare leader? @shop"), ("shop", "Parcel is on the shelf by the door"),
                     ("rider7", "At the gate")]
    assert data["location"]["count"] == 3 and data["location"]["last"]["lat"] == pytest.approx(31.232)
    (receipt,) = data["receipts"]
    assert receipt["member"] == "cust1" and receipt["unread"] == 1  # 'delivered' came after the receipt
    human = subprocess_cli("orders", "show", "L1", env={"FISHIM_DB": str(lived)}).stdout
    for needle in ("Order L1  delivered", "LURE-7  2/2 picked", "LURE-7 x2 by scan1 bin B1 (2/2)",
                   "mentions @shop", "[image image/jpeg 47 KB sha256:abababababab]", "3 fixes by rider7",
                   "cust1 read up to order #"):
        assert needle in human, needle


def test_real_bridge_orders_list_deadletters_replay(lived: Path) -> None:
    (row,) = run_json(lived, "orders", "list")["orders"]
    assert (row["id"], row["state"], row["customer"], row["rider"]) == ("L1", "delivered", "cust1", "rider7")
    assert row["unread"]["customer"] == 1 and row["last_event"]["channel"] == "status"
    letters = run_json(lived, "deadletters")["deadletters"]
    assert {(d["error"], d["user"]) for d in letters} == {("forbidden", "cust1"), ("illegal_transition", "shop")}
    replay = run_json(lived, "replay", "rider7")
    assert replay["role"] == "rider" and {e["topic"].split("/")[2] for e in replay["events"]} == {"L1"}
    assert replay["collapsed"] == ["location"]  # a phone gets only the latest fix
    full = run_json(lived, "replay", "rider7", "--full")
    assert len(full["events"]) == len(replay["events"]) + 2
    assert run_json(lived, "replay", "scan1")["events"] == []
    watched = run(lived, "orders", "watch", "L1", "--since", "0", "--count", "4", "--json")
    assert [json.loads(line)["order_seq"] for line in watched.stdout.splitlines()] == [1, 2, 3, 4]


def test_broker_alone_serves_and_stops(tmp_path: Path) -> None:
    from fishim.testing import free_port, wait_for_port
    from fishim.testing.mqtt import Collector, connect_client, publish_and_wait

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISHIM_")}
    proc = subprocess.Popen([sys.executable, "-m", "fishim", "broker", "--bind", f"127.0.0.1:{port}",
                             "--db", str(tmp_path / "b.db")], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc=proc)
        with connect_client(port) as a, Collector(a, "fishim/orders/+/status") as inbox:
            publish_and_wait(a, "fishim/orders/X1/status", b"{}")
            assert inbox.get().topic == "fishim/orders/X1/status"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert "bridge started" not in err and "Traceback" not in err and "stopped" in err
    finally:
        proc.kill()
        proc.wait()


def test_state_choices_match_the_order_states() -> None:
    from fishim.cli import STATES
    from fishim.messages import OrderState

    assert set(STATES) == {s.value for s in OrderState}

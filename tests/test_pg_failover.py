"""Two bridges share one PostgreSQL store behind Mosquitto: one active, one standby.

The active bridge holds the store's writer lock; the standby (same config, same broker client id) waits
for it off the broker. The active one is SIGKILLed during a burst: the standby must take over within
2 x ``store.lock_timeout`` and, from the broker's persistent session, store everything Mosquitto
acknowledged: 0 lost, 0 stored twice, ``seq`` gap-free, and a sync from a cursor taken before the kill
returns exactly the events after it.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _bridge_support import PY, Proc, chat, clean_env, placed, wait_until

from fishim.messages import SyncPage
from fishim.store import open_store
from fishim.testing.mosquitto import Mosquitto, find_mosquitto
from fishim.testing.mqtt import Collector, connect_client, publish_and_wait

pytestmark = [pytest.mark.mosquitto, pytest.mark.postgres,
              pytest.mark.skipif(find_mosquitto() is None, reason="Debian mosquitto not installed")]

log = logging.getLogger("tests.pg_failover")

LOCK_TIMEOUT = 4.0
ORDERS = 20
CHATS = 60
TOTAL = ORDERS * (1 + CHATS)
KILL_AT = 500  # stored events at which the active bridge is SIGKILLed


def count(url: str) -> int:
    with open_store(url, readonly=True) as store:
        return store.count_events()


def _config(tmp_path: Path, url: str) -> Path:
    config = tmp_path / "broker.yaml"
    config.write_text(f"store: {{url: '{url}', lock_timeout: {LOCK_TIMEOUT}}}\n")
    return config


def _bridge(config: Path, broker: Mosquitto, cwd: Path) -> Proc:
    """``fishim bridge`` on the PostgreSQL store, behind ``broker``."""
    return Proc([PY, "-m", "fishim", "-c", str(config), "bridge", "--broker", f"mqtt://127.0.0.1:{broker.port}"],
                env=clean_env(), cwd=cwd)


def _active_and_standby(start: Callable[[], Proc]) -> tuple[Proc, Proc]:
    """Two bridges on one store: the first holds the writer lock, the second waits for it."""
    active = start()
    active.wait_log("bridge ready")
    standby = start()
    standby.wait_log("standby: another bridge holds the writer lock")
    return active, standby


def test_standby_takes_over_after_kill9(pg_url: Callable[[str], str], tmp_path: Path) -> None:
    url = pg_url("failover")
    config = _config(tmp_path, url)
    procs: list[Proc] = []
    with Mosquitto() as broker:

        def bridge() -> Proc:
            procs.append(_bridge(config, broker, tmp_path))
            return procs[-1]

        try:
            active, standby = _active_and_standby(bridge)
            with connect_client(broker.port) as publisher:
                for o in range(ORDERS):
                    publish_and_wait(publisher, f"fishim/orders/O{o}/status", placed(f"O{o}"), retain=True)
                stream = [publisher.publish(f"fishim/orders/O{o}/chat/cust1", chat(f"c-O{o}-{k}"), qos=1)
                          for k in range(CHATS) for o in range(ORDERS)]
                wait_until(lambda: count(url) >= KILL_AT, 60, f"{KILL_AT} events stored")
                cursor = count(url)  # a rider's cursor before the kill: seq is gap-free, so count == max seq
                active.kill()
                killed = time.monotonic()
                standby.wait_log("writer lock acquired", timeout=2 * LOCK_TIMEOUT)
                took_over = time.monotonic() - killed
                for info in stream:  # every one of these was PUBACKed by Mosquitto
                    info.wait_for_publish(30)
                    assert info.is_published()
            standby.wait_log("bridge ready", timeout=30)
            wait_until(lambda: count(url) >= TOTAL, 60, f"all {TOTAL} events stored")
            with connect_client(broker.port) as rider:
                replies = Collector(rider, "fishim/sync/cust1/phone/events")
                publish_and_wait(rider, "fishim/sync/cust1/phone/request", {"since": cursor})
                pages = [SyncPage.model_validate_json(replies.get(15).payload)]
                while not pages[-1].done:
                    pages.append(SyncPage.model_validate_json(replies.get(15).payload))
            assert standby.terminate() == 0
        finally:
            for proc in procs:
                proc.kill()

    assert cursor < TOTAL, "the kill came after the burst had been stored"
    with open_store(url, readonly=True) as store:
        events = store.events_since(0, limit=TOTAL + 10)
        letters = store.count_deadletters()
    ids = [e.id for e in events]
    expected = {f"placed-O{o}" for o in range(ORDERS)} | {f"c-O{o}-{k}" for o in range(ORDERS) for k in range(CHATS)}
    lost, twice = expected - set(ids), len(ids) - len(set(ids))
    assert (len(lost), twice, len(ids), letters) == (0, 0, TOTAL, 0), sorted(lost)[:10]
    assert [e.seq for e in events] == list(range(1, TOTAL + 1))  # gap-free across the takeover
    for o in range(ORDERS):
        mine = [e for e in events if e.order_id == f"O{o}"]
        assert [e.id for e in mine] == [f"placed-O{o}"] + [f"c-O{o}-{k}" for k in range(CHATS)]
        assert [e.order_seq for e in mine] == list(range(1, CHATS + 2))
    synced = [e.seq for p in pages for e in p.events]
    assert synced == list(range(cursor + 1, TOTAL + 1)) and pages[-1].next_since == TOTAL
    log.info("pg failover took_over_s=%.2f lock_timeout_s=%.1f cursor=%d", took_over, LOCK_TIMEOUT, cursor)


def test_hung_holder_loses_the_lock_and_never_writes(pg_url: Callable[[str], str], tmp_path: Path) -> None:
    """A holder that stops answering (SIGSTOP: its sockets stay open, so only silence shows it) loses its
    session after lock_timeout; the standby takes over; resumed, the old one writes nothing and exits 1."""
    url = pg_url("hung")
    config = _config(tmp_path, url)
    procs: list[Proc] = []
    with Mosquitto() as broker:

        def bridge() -> Proc:
            procs.append(_bridge(config, broker, tmp_path))
            return procs[-1]

        try:
            active, standby = _active_and_standby(bridge)
            with connect_client(broker.port) as publisher:
                publish_and_wait(publisher, "fishim/orders/H1/status", placed("H1"), retain=True)
                wait_until(lambda: count(url) == 1, 30, "the first event stored")
                active.popen.send_signal(signal.SIGSTOP)
                standby.wait_log("writer lock acquired", timeout=2 * LOCK_TIMEOUT + 2)
                standby.wait_log("bridge ready", timeout=30)
                for k in range(20):
                    publish_and_wait(publisher, "fishim/orders/H1/chat/cust1", chat(f"h-{k}"))
                wait_until(lambda: count(url) == 21, 30, "the standby stored the rest")
                active.popen.send_signal(signal.SIGCONT)
                assert active.popen.wait(30) == 1  # it noticed it lost the lock and stopped
                active.wait_log("writer lock lost")
                publish_and_wait(publisher, "fishim/orders/H1/chat/cust1", chat("h-end"))
                wait_until(lambda: count(url) == 22, 30, "the marker stored by the new active bridge")
            assert standby.terminate() == 0
        finally:
            for proc in procs:
                if proc.popen.poll() is None:
                    proc.popen.send_signal(signal.SIGCONT)
                proc.kill()
    with open_store(url, readonly=True) as store:
        ids = [e.id for e in store.events_since(0)]
    assert ids == ["placed-H1", *(f"h-{k}" for k in range(20)), "h-end"]

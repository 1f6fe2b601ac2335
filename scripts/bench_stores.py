"""SQLite vs PostgreSQL, in the same run: stored msg/s, and how a sync's cost grows with history.

For each store (a SQLite file with the bridge's ``synchronous=FULL``; a throwaway PostgreSQL server
from Debian's package with its default durability, fsync on, or ``--pg-url``):

- ``stored_msgs_per_s``: chat messages committed through the real writer (:class:`fishim.ingest.Writer`,
  the bridge's and the embedded broker's group commit) in batches of ``--batch``, and of 1;
- ``sync``: at each history size in ``--history`` (events in the store), the median time of
  :meth:`fishim.sync.SyncServer.handle` for a customer's *tail* sync (the last ~100 of its events, the
  common reconnect) and for its *full* sync (``since: 0``: every event of its orders), plus how many
  events each returned.

No broker and no network between the writer and MQTT: this is the store's share of the cost only.
Prints one JSON document. Usage::

    python scripts/bench_stores.py --quick            # ~20 s: 2k messages, history 1k/5k
    python scripts/bench_stores.py                    # 20k messages, history 1k/10k/50k
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repo's fishim importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fishim.config import Config
from fishim.ingest import Inbound, Writer, set_synchronous
from fishim.store import Store, StoreTarget, UserRow, now_ms, open_store
from fishim.sync import SyncServer
from fishim.topics import Topics

TOPICS = Topics("fishim")
ORDERS = 200  # orders the load spreads over; customer c{n % 20} owns order n
CUSTOMERS = 20


def _placed(order: int) -> Inbound:
    body = {"id": f"p-{order}", "ts": now_ms(), "sender": "shop", "state": "placed",
            "customer": f"c{order % CUSTOMERS}", "items": [{"sku": "rod", "qty": 1}]}
    return Inbound(TOPICS.status(f"O{order}"), json.dumps(body).encode())


def _chat(n: int) -> Inbound:
    order = n % ORDERS
    customer = f"c{order % CUSTOMERS}"
    body = {"id": f"m-{n}", "ts": now_ms(), "sender": customer, "text": f"message {n} " + "x" * 120}
    return Inbound(TOPICS.chat(f"O{order}", customer), json.dumps(body).encode())


class Load:
    """Writes chats into one store through the real writer, numbering them across calls."""

    def __init__(self, store: Store) -> None:
        for c in range(CUSTOMERS):
            store.put_user(UserRow(name=f"c{c}", role="customer", password_hash="!", created_at=now_ms()))
        store.put_user(UserRow(name="shop", role="staff", password_hash="!", created_at=now_ms()))
        self.writer = Writer(store, Config(), "fishim-bridge")
        self.writer.flush([_placed(o) for o in range(ORDERS)], threading.Event())
        self.sent = 0

    def write(self, count: int, batch: int) -> float:
        """Commit ``count`` more chats in batches of ``batch``; returns msg/s."""
        stop = threading.Event()
        started = time.perf_counter()
        for start in range(0, count, batch):
            n = min(batch, count - start)
            self.writer.flush([_chat(self.sent + i) for i in range(n)], stop)
            self.sent += n
        return count / (time.perf_counter() - started)


def _sync_ms(server: SyncServer, since: int, runs: int) -> tuple[float, int]:
    ref = TOPICS.parse(TOPICS.sync_request("c1", "bench"))
    request = json.dumps({"since": since, "collapse": False}).encode()
    times, events = [], 0
    for _ in range(runs):
        started = time.perf_counter()
        pages = server.handle(ref, request)
        times.append((time.perf_counter() - started) * 1000)
        events = sum(len(json.loads(payload)["events"]) for _topic, payload in pages)
    return statistics.median(times), events


def measure(name: str, target: StoreTarget, messages: int, batch: int, history: list[int], runs: int) -> dict[str, Any]:
    """Sync cost while the history grows from empty, then write throughput on top (same fresh store)."""
    result: dict[str, Any] = {"store": name, "sync": []}
    with open_store(target, writer=True) as store:
        if name == "sqlite":
            set_synchronous(store, "FULL")  # the bridge's default
        load = Load(store)
        server = SyncServer(target, Config(), on_device=lambda _device: None)
        try:
            for size in history:
                load.write(max(0, size - store.count_events()), batch)
                end = store.max_seq()
                tail_ms, tail_events = _sync_ms(server, max(0, end - 100 * CUSTOMERS), runs)
                full_ms, full_events = _sync_ms(server, 0, runs)
                result["sync"].append({"history_events": store.count_events(), "tail_ms": round(tail_ms, 2),
                                       "tail_events": tail_events, "full_ms": round(full_ms, 2),
                                       "full_events": full_events})
        finally:
            server.close()
        result["stored_msgs_per_s"] = {f"batch_{batch}": round(load.write(messages, batch)),
                                       "batch_1": round(load.write(max(messages // 10, 50), 1))}
    return result


@contextmanager
def postgres_url(given: str | None) -> Iterator[str | None]:
    """``--pg-url``, or a throwaway durable server (None if PostgreSQL is not installed)."""
    if given:
        yield given
        return
    from fishim.testing.postgres import Postgres, find_postgres

    if find_postgres() is None:
        yield None
        return
    with Postgres(durable=True) as server:
        yield server.create_database("bench")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--messages", type=int, help="chats per throughput run (default 20000; quick 2000)")
    parser.add_argument("--batch", type=int, default=500, help="messages per group commit (the bridge's batch_max)")
    parser.add_argument("--history", type=lambda v: [int(x) for x in v.split(",")],
                        help="history sizes for the sync figures (default 1000,10000,50000; quick 1000,5000)")
    parser.add_argument("--runs", type=int, default=5, help="sync runs per point (median)")
    parser.add_argument("--pg-url", help="an empty PostgreSQL database to use instead of a throwaway server")
    parser.add_argument("--sqlite-only", action="store_true")
    args = parser.parse_args(argv)
    messages = args.messages or (2000 if args.quick else 20_000)
    history = args.history or ([1000, 5000] if args.quick else [1000, 10_000, 50_000])
    report: dict[str, Any] = {"messages": messages, "batch": args.batch, "results": []}
    with tempfile.TemporaryDirectory(prefix="fishim-bench-stores-") as tmp:
        report["results"].append(measure("sqlite", Path(tmp) / "bench.db", messages, args.batch, history, args.runs))
        if not args.sqlite_only:
            with postgres_url(args.pg_url) as url:
                if url is None:
                    report["postgres_skipped"] = "Debian postgresql not installed (scripts/pg_setup.sh)"
                else:
                    report["results"].append(measure("postgres", url, messages, args.batch, history, args.runs))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
